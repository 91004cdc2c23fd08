"""Tiny random models built in code (fast tests, demos, the ``tiny-*`` short names).

Each has a byte-level tokenizer (256 byte tokens + BOS/EOS) so nothing is downloaded.
"""

from __future__ import annotations

import torch

TINY_KINDS = ("tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-qwen3", "tiny-gemma", "tiny-gemma2", "tiny-gemma3",
              "tiny-phi3", "tiny-olmo2", "tiny-smollm3", "tiny-gpt2")
# model_type of each tiny kind (one per supported architecture family; tests/test_families.py covers each)
TINY_MODEL_TYPES = {"tiny-llama": "llama", "tiny-mistral": "mistral", "tiny-qwen2": "qwen2", "tiny-qwen3": "qwen3",
                    "tiny-gemma": "gemma", "tiny-gemma2": "gemma2", "tiny-gemma3": "gemma3_text", "tiny-phi3": "phi3",
                    "tiny-olmo2": "olmo2", "tiny-smollm3": "smollm3", "tiny-gpt2": "gpt2"}
_EAGER = {"tiny-gemma2"}  # sdpa refuses attention-logit soft-capping: the stock model runs eager attention
_BOS = {"tiny-gemma", "tiny-gemma2", "tiny-gemma3"}


def byte_tokenizer(add_bos: bool = False):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<bos>"] = len(vocab)
    vocab["<eos>"] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    if add_bos:
        from tokenizers import processors

        tk.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<eos>")


def tiny_config(kind: str):
    """Config of a tiny model, from the family's stock transformers config with tiny sizes:
    llama (RoPE, GQA), mistral (sliding window in the config, every layer), qwen2 (q/k/v bias),
    qwen3 (per-head q/k norm), gemma, gemma2 (logit soft-capping, alternating sliding layers),
    gemma3 (per-head q/k norm, sliding layers), phi3 (fused qkv_proj), olmo2 (q/k norm over all
    heads before the head split), smollm3 (NoPE every other layer), gpt2 (no RoPE, MHA, biases)."""
    from transformers import (Gemma2Config, Gemma3TextConfig, GemmaConfig, GPT2Config, LlamaConfig, MistralConfig,
                              Olmo2Config, Phi3Config, Qwen2Config, Qwen3Config, SmolLM3Config)

    vocab = 258
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
                  bos_token_id=256, eos_token_id=257, pad_token_id=257, tie_word_embeddings=True)
    if kind == "tiny-llama":
        return LlamaConfig(**common, rope_theta=10000.0)
    if kind == "tiny-mistral":
        return MistralConfig(**common, rope_theta=10000.0, sliding_window=32)
    if kind == "tiny-qwen2":
        return Qwen2Config(**common, rope_theta=10000.0)
    if kind == "tiny-qwen3":
        return Qwen3Config(**common, rope_theta=10000.0)
    if kind == "tiny-gemma":
        return GemmaConfig(**common)
    if kind == "tiny-gemma2":  # layers: sliding, full, sliding; a soft cap the logits reach (see build_tiny)
        return Gemma2Config(**{**common, "num_hidden_layers": 3}, sliding_window=32, query_pre_attn_scalar=16,
                            attn_logit_softcapping=5.0, final_logit_softcapping=30.0)
    if kind == "tiny-phi3":
        return Phi3Config(**common)
    if kind == "tiny-olmo2":
        return Olmo2Config(**common)
    if kind == "tiny-smollm3":  # layer 1 is NoPE
        return SmolLM3Config(**common, no_rope_layer_interval=2)
    if kind == "tiny-gemma3":
        return Gemma3TextConfig(**{**common, "num_hidden_layers": 3}, sliding_window=32,
                                layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                                query_pre_attn_scalar=16)
    if kind == "tiny-gpt2":
        return GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=2048,
                          bos_token_id=256, eos_token_id=257)
    raise ValueError(f"unknown tiny model kind {kind!r}; choose from {', '.join(TINY_KINDS)}")


def build_tiny(kind: str = "tiny-llama", seed: int = 0):
    """(model, tokenizer) with deterministic random weights, fp32, eval mode."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(kind)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager" if kind in _EAGER else "sdpa")
    if kind == "tiny-qwen2":  # make the biases non-trivial
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            for layer in model.model.layers:
                for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    lin.bias.normal_(0, 0.5)
    if kind == "tiny-gemma2":  # larger q/k weights: logits of several units, where the soft cap bends them
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            for layer in model.model.layers:
                for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                    lin.weight.normal_(0, 0.3)
    return model.eval(), byte_tokenizer(add_bos=kind in _BOS)


def train_tiny(model, tokenizer, text: str, *, steps: int = 300, seq_len: int = 128, batch: int = 16,
               lr: float = 3e-3, seed: int = 0):
    """Train a tiny model in place as a byte-level LM on ``text`` (a few seconds on CPU), so that its
    attention has learned structure: orderings of fidelity and perplexity are meaningful on it,
    unlike on random weights. Deterministic for a seed. Returns the model in eval mode."""
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    if len(ids) <= seq_len + 1:
        raise ValueError(f"need more than {seq_len + 1} tokens of text to train, got {len(ids)}")
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    try:
        for _ in range(steps):
            starts = torch.randint(0, len(ids) - seq_len - 1, (batch,), generator=gen)
            x = torch.stack([ids[s : s + seq_len] for s in starts])  # (batch, seq_len)
            loss = model(input_ids=x, labels=x).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    finally:
        model.eval()
    return model
