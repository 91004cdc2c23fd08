#!/usr/bin/env bash
# The whole lowrank-attn path on one model and device, as one table: analyze → compress (the defaults) → reload
# (+ every tensor on the device) → generate → eval (lm-eval, vs dense) → RULER (dense vs ours) → prefill and decode
# benchmarks. It has never run on a GPU: its first CUDA run is its test.
#
#   eval/gpu_check.sh --model qwen2.5-1.5b     # CUDA, full sizes; writes eval/results/gpu_check-qwen2.5-1.5b.md
#   eval/gpu_check.sh --device cpu --small     # the same path on CPU with small sizes (a few minutes)
#   options: --model NAME (smollm2-135m)  --device DEV (cuda)  --dtype float32|bfloat16|float16 (bfloat16 on cuda,
#            float32 on cpu)  --small  --out FILE (eval/results/gpu_check[-MODEL].md; on cpu gpu_check-cpu.md)
#            --work DIR (scratch, default: a temp dir, removed at the end)
# Each step's exit status, seconds and key number go into the table; a failed step is marked and the
# script goes on (later steps that need its output are skipped), exiting 1 if any step failed.
set -u -o pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

DEVICE=cuda DTYPE="" SMALL=0 OUT="" WORK="" MODEL=smollm2-135m
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=$2; shift 2 ;;
    --dtype) DTYPE=$2; shift 2 ;;
    --small) SMALL=1; shift ;;
    --out) OUT=$2; shift 2 ;;
    --work) WORK=$2; shift 2 ;;
    --model) MODEL=$2; shift 2 ;;
    -h|--help) sed -n 2,13p "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
[ -n "$DTYPE" ] || { [ "${DEVICE%%:*}" = cuda ] && DTYPE=bfloat16 || DTYPE=float32; }
SUFFIX=$([ "$MODEL" = smollm2-135m ] || echo "-$MODEL")
[ -n "$OUT" ] || { [ "${DEVICE%%:*}" = cpu ] && OUT=eval/results/gpu_check-cpu$SUFFIX.md || OUT=eval/results/gpu_check$SUFFIX.md; }
if [ -z "$WORK" ]; then WORK=$(mktemp -d -t gpu-check-XXXXXX); trap 'rm -rf "$WORK"' EXIT; fi
mkdir -p "$WORK"
PY=${PYTHON:-python}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
CLI="$PY -m lowrank_attn.cli"
TEXT='../shared/data/gutenberg-*.txt'

if [ $SMALL = 1 ]; then  # CPU-sized: proves the path, not the numbers
  AN_TOK=2048 CAL_TOK=2048 SEQ=512 HELD=512 EV_LIMIT=2 EV_LEN=512 CTX="256" BATCH="1" NEW=8 REP=1 GEN=8
  RULER_LEN=1024 RULER_N=1 RULER_TASKS=niah_single_1 PRE_LEN="512"
else                     # GPU-sized: the recipe's calibration, WikiText-2 in full, decode to 16k, RULER 4k and 8k
  AN_TOK=32768 CAL_TOK=16384 SEQ=2048 HELD=2048 EV_LIMIT="" EV_LEN=2048 CTX="4096 16384" BATCH="1 8" NEW=64 REP=3 GEN=32
  RULER_LEN=4096,8192 RULER_N=10 PRE_LEN="2048 8192 16384"
  RULER_TASKS=niah_single_1,niah_multikey_2,niah_multikey_3,ruler_vt,ruler_cwe,ruler_fwe
fi

ROWS=() FAILED=0
row() { ROWS+=("| $1 | $2 | $3 | $4 |"); printf '%-10s %-6s %6ss  %s\n' "$1" "$2" "$3" "$4"; }
run() {  # run NAME LOG CMD... → sets $ok (0/1) and $secs
  local name=$1 log=$2; shift 2
  local t0=$(date +%s.%N)
  "$@" >"$log" 2>&1; local rc=$?
  secs=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  if [ $rc = 0 ]; then ok=1; else ok=0; FAILED=1; echo "--- $name failed (exit $rc); last lines of $log:"; tail -5 "$log"; fi
}

echo "gpu_check: device $DEVICE, dtype $DTYPE, work $WORK"
$PY - "$DEVICE" <<'EOF' > "$WORK/env.txt" 2>&1 || true
import sys, torch, transformers
d = sys.argv[1]
name = torch.cuda.get_device_name(torch.device(d)) if d.startswith("cuda") and torch.cuda.is_available() else "cpu"
print(f"torch {torch.__version__}, transformers {transformers.__version__}, {name}")
EOF
ENV=$(tail -1 "$WORK/env.txt")

# 1. analyze
run analyze "$WORK/analyze.log" $CLI analyze "$MODEL" --text "$TEXT" --max-tokens $AN_TOK --seq-len $SEQ \
    --device "$DEVICE" --dtype "$DTYPE" --out "$WORK/spectra" --no-plots --overwrite
if [ $ok = 1 ]; then
  res=$($PY -c "import json,statistics as s; r=json.load(open('$WORK/spectra/spectra.json')); \
v=[h['logit_field']['r90'] for l in r.get('layers', []) for h in l['kv_heads']]; \
print(f'median r90(E~) {s.median(v):g} over {len(v)} KV heads' if v else 'spectra.json written')" 2>/dev/null || echo "spectra.json written")
  row analyze ok "$secs" "$AN_TOK tokens; $res"
else row analyze FAIL "$secs" "see $WORK/analyze.log"; fi

# 2. compress (the model's recipe, i.e. the defaults, in $DTYPE on $DEVICE)
{ [ -f "recipes/$MODEL.yaml" ] && grep -v -E '^(model|dtype|device|max_tokens|seq_len|heldout_tokens):' "recipes/$MODEL.yaml"
  printf 'model: %s\ndtype: %s\ndevice: %s\nmax_tokens: %s\nseq_len: %s\nheldout_tokens: %s\n' "$MODEL" "$DTYPE" "$DEVICE" $CAL_TOK $SEQ $HELD
} > "$WORK/recipe.yaml"
run compress "$WORK/compress.log" $CLI compress "$MODEL" --recipe "$WORK/recipe.yaml" --out "$WORK/ckpt"
C_OK=$ok
if [ $ok = 1 ]; then
  row compress ok "$secs" "$(grep -o 'mean rank [0-9.]*·d_h' "$WORK/compress.log" | head -1), $CAL_TOK calibration tokens"
else row compress FAIL "$secs" "see $WORK/compress.log"; fi

# 3. reload + device check, 4. generate
if [ $C_OK = 1 ]; then
  run reload "$WORK/reload.log" $PY - "$WORK/ckpt" "$DEVICE" "$DTYPE" $GEN <<'EOF'
import sys, time, torch
from lowrank_attn.checkpoint import load_compressed
path, dev, dtype, n = sys.argv[1], torch.device(sys.argv[2]), sys.argv[3], int(sys.argv[4])
t = time.time()
lm = load_compressed(path, device=str(dev), dtype=dtype)
load_s = time.time() - t
where = lambda t: t.device.type == dev.type and (dev.index is None or t.device.index == dev.index) and not t.is_meta
bad = [n for n, t in list(lm.model.named_parameters()) + list(lm.model.named_buffers()) if not where(t)]
ids = lm.tokenizer("The old lighthouse keeper climbed the stairs and", return_tensors="pt").input_ids.to(dev)
with torch.inference_mode():
    out = lm.model(input_ids=ids, use_cache=True)
    cache = [x for layer in out.past_key_values.layers for x in vars(layer).values() if isinstance(x, torch.Tensor)]
    bad += [f"cache tensor on {x.device}" for x in cache if not where(x)]
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t = time.time()
    gen = lm.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                            pad_token_id=lm.tokenizer.eos_token_id)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    gen_s = time.time() - t
text = lm.tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).replace("\n", " ").replace("|", "/")
n_tensors = len(list(lm.model.parameters())) + len(list(lm.model.buffers()))
print(f"RELOAD load {load_s:.1f} s, {n_tensors} parameters and buffers + {len(cache)} cache "
      f"tensors, {len(bad)} off {dev}{': ' + ', '.join(bad[:3]) if bad else ''}")
print(f"GENERATE {n} tokens in {gen_s:.2f} s: {text!r}")
sys.exit(1 if bad else 0)
EOF
  if [ $ok = 1 ]; then
    row reload ok "$secs" "$(grep '^RELOAD' "$WORK/reload.log" | cut -c8-)"
    row generate ok "-" "$(grep '^GENERATE' "$WORK/reload.log" | cut -c10-)"
  else row reload FAIL "$secs" "$(grep '^RELOAD' "$WORK/reload.log" | cut -c8-) see $WORK/reload.log"; fi
fi

# 5. eval through lm-eval, with the dense model beside it
if [ $C_OK = 1 ]; then
  run eval "$WORK/eval.log" $CLI eval "$WORK/ckpt" --dense "$MODEL" --device "$DEVICE" --dtype "$DTYPE" \
      --max-length $EV_LEN ${EV_LIMIT:+--limit $EV_LIMIT} --out "$WORK/eval.json"
  if [ $ok = 1 ]; then row eval ok "$secs" "$(tail -1 "$WORK/eval.log" | sed 's/^.*: word/word/')"
  else row eval FAIL "$secs" "see $WORK/eval.log"; fi
fi

# 6. RULER (lm-eval's offline tasks): dense vs the checkpoint, same prompts
if [ $C_OK = 1 ]; then
  run ruler "$WORK/ruler.log" $PY eval/ruler.py --model "$MODEL" --methods dense "ours:default=$WORK/ckpt" \
      --tasks $RULER_TASKS --lengths $RULER_LEN --limit $RULER_N --device "$DEVICE" --dtype "$DTYPE" \
      --results "$WORK/ruler"
  if [ $ok = 1 ]; then
    $PY eval/ruler.py --model "$MODEL" --results "$WORK/ruler" --table > /dev/null 2>&1
    row ruler ok "$secs" "$(grep -E '^\| (dense|ours)' "$WORK/ruler/README.md" 2>/dev/null | head -4 | tr '\n' ' ')"
  else row ruler FAIL "$secs" "see $WORK/ruler.log"; fi
fi

# 7. prefill benchmark (dense vs the defaults vs low-rank only, interleaved)
run prefill "$WORK/prefill.log" $PY eval/bench_prefill.py --model "$MODEL" --device "$DEVICE" --dtype "$DTYPE" \
    --lengths $PRE_LEN --repeats 2 --calib-tokens $CAL_TOK --out "$WORK/prefill.json"
if [ $ok = 1 ]; then row prefill ok "$secs" "$(grep '× dense' "$WORK/prefill.log" | tr -s ' ' | tr '\n' ';')"
else row prefill FAIL "$secs" "see $WORK/prefill.log"; fi

# 8. decode benchmark (dense vs the defaults, lockstep, synchronised on CUDA)
run decode "$WORK/decode.log" $PY eval/bench_decode.py --model "$MODEL" --device "$DEVICE" --dtype "$DTYPE" \
    --recipe "$WORK/recipe.yaml" --modes ours-kv --rank-ratio 0.75 --contexts $CTX --batches $BATCH --new-tokens $NEW --repeats $REP \
    --prefill-repeats 1 --calib-tokens $CAL_TOK --ckpt-dir "$WORK/bench" --out "$WORK/decode.json"
if [ $ok = 1 ]; then
  res=$($PY - "$WORK/decode.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
parts = []
for row in r["rows"]:
    for b, e in row["decode"].items():
        t = e["tokens_per_s"]
        parts.append(f"ctx {row['context']} B{b}: dense {t['dense']['median']:.0f} vs ours {t['ours-kv']['median']:.0f} tok/s")
print("; ".join(parts))
EOF
)
  row decode ok "$secs" "$res"
else row decode FAIL "$secs" "see $WORK/decode.log"; fi

{
  echo "# gpu_check: $MODEL end to end on $DEVICE ($DTYPE)"
  echo
  echo "\`eval/gpu_check.sh --model $MODEL --device $DEVICE --dtype $DTYPE$([ $SMALL = 1 ] && echo ' --small')\`, $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null), $ENV"
  echo
  echo "| step | status | seconds | result |"
  echo "|---|---|---|---|"
  printf '%s\n' "${ROWS[@]}"
} > "$WORK/table.md"
echo
cat "$WORK/table.md"
mkdir -p "$(dirname "$OUT")" && cp "$WORK/table.md" "$OUT" && echo "wrote $OUT"
exit $FAILED
