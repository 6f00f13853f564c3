#!/usr/bin/env bash
# The GPU checks of issue 9, as one script for a GPU session (one H100 or H200). BUDGET (default 540 s) caps
# the whole script: each step runs under its own limit or what is left of the budget, whichever is
# less, and a step with under 30 s left is skipped, so the script always ends in time to pack.
#
# Prepare here (CPU machine, once):  PYTHONPATH=src python -m lorafit.bench.carry .gpu_carry/minilm-fp16
# Run there, from the repository root, carrying .gpu_carry:  bash scripts/gpu_check.sh
# There: torch 2.11 / transformers 5.17 / peft 0.21, no pip, no network; src is put on PYTHONPATH and
# the embedded model comes from the carried fp16 copy. JSON lines and logs go to $OUT (default out/gpu),
# and all of them, packed, to $OUT/gpu_check.tgz (a GPU session may bring back only a few files).
# DIAGNOSE=1 first runs scripts/gpu_diagnose.py (host syncs, CPU vs GPU time per step, eager,
# reduce-overhead and step-graph; 95 s without step-graph in the first session, whose records are
# in docs/performance/gpu/).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu}
BUDGET=${BUDGET:-540}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export LORAFIT_EMBEDDED_MODEL="${LORAFIT_EMBEDDED_MODEL:-$PWD/.gpu_carry/minilm-fp16}"
# Compile once per step, not per process; outside $OUT, which should hold results only.
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$(mktemp -d)}"
BENCH="python -m lorafit.cli bench"
start=$SECONDS

limit_for() {  # limit_for SECONDS: that, or what is left of the budget if less; 0 when under 30 s left
  local left=$((BUDGET - (SECONDS - start)))
  if [ "$left" -lt 30 ]; then echo 0; elif [ "$1" -lt "$left" ]; then echo "$1"; else echo "$left"; fi
}

step() {  # step NAME SECONDS ARGS...: one bench call, its log and JSONL in $OUT
  local name=$1 limit; limit=$(limit_for "$2"); shift 2
  if [ "$limit" -eq 0 ]; then echo "== $name: skipped, under 30 s of the ${BUDGET} s budget left"; return; fi
  echo "== $name (limit ${limit}s, $((SECONDS - start))s elapsed)"
  timeout -k 10 "$limit" $BENCH "$@" --output "$OUT/$name.jsonl" >"$OUT/$name.log" 2>&1
  echo "   exit $? after $((SECONDS - start))s"; tail -n 20 "$OUT/$name.log"
}

python - <<'PY' | tee "$OUT/environment.txt"
import torch, transformers
print("torch", torch.__version__, "transformers", transformers.__version__, "cuda", torch.version.cuda)
print(torch.cuda.get_device_name(), "bf16:", torch.cuda.is_bf16_supported())
PY

# 0. (DIAGNOSE=1) Where a step's time goes (host syncs, CPU vs GPU time, CUDA graphs), lorafit and a
#    PEFT plain loop on the same batches.
if [ "${DIAGNOSE:-0}" = 1 ]; then
  echo "== gpu_diagnose ($((SECONDS - start))s elapsed)"
  timeout -k 10 "$(limit_for 120)" python scripts/gpu_diagnose.py --steps 30 --out "$OUT" >"$OUT/gpu_diagnose.log" 2>&1
  echo "   exit $? after $((SECONDS - start))s"; grep "^== " "$OUT/gpu_diagnose.log"
fi

# 0. The captured whole step against the plain loop, on a tiny BERT (tests/test_step_graph.py):
#    if this fails, the step-graph sides below are not to be trusted. And `lorafit eval` / `predict`
#    on the GPU against the CPU (tests/test_inference.py); LoRA's evaluation path against its general
#    path on the GPU (tests/lora/test_layer.py), and packed against unpacked (tests/lora/test_packed.py).
echo "== pytest -m gpu ($((SECONDS - start))s elapsed)"
timeout -k 10 "$(limit_for 120)" python -m pytest -q -m gpu -p no:cacheprovider tests/test_step_graph.py \
  tests/test_inference.py tests/lora/test_layer.py tests/lora/test_packed.py >"$OUT/pytest_gpu.log" 2>&1
echo "   exit $? after $((SECONDS - start))s"; tail -n 15 "$OUT/pytest_gpu.log"

# 1. The issue's second GPU target: batch 64, dynamic padding, >= 30% of the bf16 matmul peak
#    (measured from CUDA graphs at the model's shapes, before the first side and after the last;
#    % of peak takes the faster). SST-2's examples are 13 tokens on average and 6 in 100,000 are
#    longer than 64, so --max-length 64 (both sides) and buckets 16,32,64 keep the padding and the
#    compiles few. The baseline runs first, so that a step cut short still has it; then the whole
#    step captured (step-graph), then torch's reduce-overhead.
step roberta_b64_dynamic 270 train --device cuda --model roberta-base --task sst2 --max-train-samples 16384 \
  --batch-size 64 --max-length 64 --length-buckets 16,32,64 --repeats 1 \
  --sides peft@bf16,lorafit@bf16+step_graph,lorafit@bf16+compile

# 2. The first GPU target: roberta-base shape, LoRA r=8, batch 16, padded to 128, >= 5x PEFT's
#    plain-loop anchor (420 examples/s on an H200); met in the second session at 2,616.8 with
#    reduce-overhead. Both compiled modes, one shape each; compilation is most of the time.
step roberta_b16_pad128 150 train --device cuda --model roberta-base --task sst2 --max-train-samples 4096 \
  --batch-size 16 --length-buckets 128 --repeats 1 --no-peak --sides lorafit@bf16+step_graph,lorafit@bf16+compile

# 3. The embedded model (pretrained) on MRPC, 1 epoch: the step graph's dev accuracy against the
#    68.38% every side reached in the second session. 3,664 examples, a multiple of 16: a last
#    partial batch would be one more shape.
step minilm_mrpc_step_graph 100 train --device cuda --task mrpc --epochs 1 --batch-size 16 --max-train-samples 3664 \
  --length-buckets 64,128 --repeats 1 --no-peak --sides lorafit@fp32+step_graph

# 4. What the budget leaves: inference latency, base vs LoRA unmerged (packed, since 2026-12-07) vs
#    merged (33 s a repeat).
step roberta_infer 60 infer --device cuda --model roberta-base --task sst2 --repeats 1 --sides lorafit@bf16

files=()
for f in "$OUT"/roberta_b64_dynamic.jsonl "$OUT"/roberta_b16_pad128.jsonl "$OUT"/minilm_mrpc_step_graph.jsonl; do
  [ -s "$f" ] && files+=(--from "$f")
done
[ ${#files[@]} -gt 0 ] && python -m lorafit.cli bench "${files[@]}" --plot "$OUT/gpu_examples_per_s.png" >"$OUT/summary.txt" 2>&1
cat "$OUT/summary.txt"
pack=$(mktemp)  # outside $OUT: tar must not read the file it writes
tar czf "$pack" -C "$OUT" --exclude=gpu_check.tgz . && mv "$pack" "$OUT/gpu_check.tgz"
echo "done in $((SECONDS - start))s"
