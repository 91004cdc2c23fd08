"""The runtime of compressed models: what a compressed checkpoint needs to run, and nothing else.

Every module here imports only torch, transformers and its siblings (relative imports), never the
rest of ``lowrank_attn``: checkpoints carry these files verbatim, so that
``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` runs the same code as
``lowrank_attn.load_compressed(DIR)``, on a machine without lowrank-attn installed.
"""
