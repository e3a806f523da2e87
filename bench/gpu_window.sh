#!/usr/bin/env bash
# One GPU window, unattended, on the device machine from the repository root (the device tool sets $OUT):
#   bash bench/gpu_window.sh            carry: .whl (bench/fetch_wheels.sh) and .window (python -m src.ops.window --prepare)
# 1. checks: the carried wheels install, CUDA is seen, the data regenerates bit-identically, `pytest -m gpu`;
# 2. bench_stn.py --device cuda: the step time of every network, the whole-grid projection (logs/window/);
# 3. the plan: the window's cells cheapest first by those step times (src.ops.window --plan);
# 4. the window: those cells, --jobs at once, until WINDOW_BUDGET seconds after this script started, less the
#    grace and the packing; then summary.json, records.tar.gz, runs*.tar.gz, logs.tar.gz and this
#    transcript in $OUT (at most 8 files).
# Knobs (environment): WINDOW_BUDGET (s, default 540: a device command may run 600), CELLS (default: seed-0 CNN
# family), PROFILE (default: params.yaml's), JOBS (default: cores / 2), BENCH=0 (skip 2: plan by input size),
# DEVICE=cpu (a rehearsal without a GPU: no CUDA check, no GPU tests; wheels installed only if .whl exists).
set -uo pipefail
T0=$(date +%s)
BUDGET=${WINDOW_BUDGET:-540}
GRACE=30
OUT=${OUT:-logs/window-out}
LOGS=logs/window
mkdir -p "$OUT" "$LOGS"
exec > >(tee -a "$OUT/transcript.log") 2>&1
export PYTHONUNBUFFERED=1
elapsed() { echo $(( $(date +%s) - T0 )); }
step() { echo "== [$(elapsed) s] $*"; }
fail() { echo "error: $*"; exit 1; }

step "1. wheels, CUDA, data"
DEVICE=${DEVICE:-cuda}
if [ "$DEVICE" = cuda ] || [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || fail "the carried wheels do not install (run bench/fetch_wheels.sh here and carry .whl)"
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -c "import torch, pytorch_lightning as pl, hydra, omegaconf
assert torch.cuda.is_available() or '$DEVICE' == 'cpu', 'torch sees no CUDA device'
print('torch', torch.__version__, '| lightning', pl.__version__, '| hydra', hydra.__version__, '|',
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')" \
  || fail "the Python environment is not ready"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
[ -f .window/mnist.pt.gz ] || fail ".window/mnist.pt.gz missing: run python -m src.ops.window --prepare and carry .window"
git rev-parse HEAD >/dev/null 2>&1 || export STN_COMMIT=$(cat .window/commit 2>/dev/null)  # a copy without .git
mkdir -p data/raw
gunzip -c .window/mnist.pt.gz > data/raw/mnist.pt && cp .window/mnist.pt.sha256 data/raw/ || fail "cannot unpack the raw digits"
if ls .window/runs*.tar.gz >/dev/null 2>&1; then
  python3 -m src.ops.window --unpack .window || fail "cannot unpack the carried runs"
fi
DISTORTIONS=$(ls .window/manifests 2>/dev/null | sed 's/\.json$//')
[ -n "$DISTORTIONS" ] || fail ".window/manifests is empty: run python -m src.ops.window --prepare where data/distorted exists"
PIDS=()
for d in $DISTORTIONS; do  # the thread count does not change the data (src/data/distort.py)
  OMP_NUM_THREADS=3 python3 -m src.data.distort data="$d" > "$LOGS/distort-$d.log" 2>&1 & PIDS+=($!)
done
wait "${PIDS[@]}"  # these alone: a bare wait would also wait for the transcript's tee
for d in $DISTORTIONS; do
  if cmp -s "data/distorted/$d/manifest.json" ".window/manifests/$d.json"; then echo "data $d: identical to the committed data"
  else echo "warning: data $d differs from the committed data; its records will be refused at unpack"; fi
done
if [ "$DEVICE" = cuda ]; then
  timeout 90 python3 -m pytest -m gpu -q -p no:cacheprovider > "$LOGS/pytest-gpu.log" 2>&1
  echo "pytest -m gpu: exit $? ($(tail -1 "$LOGS/pytest-gpu.log"))"
fi

if [ "${BENCH:-1}" != 0 ]; then
  step "2. benchmark"
  timeout 150 python3 bench/bench_stn.py --device "$DEVICE" --rounds 2 --calls 2 --loop-steps 100 \
    --out "$LOGS/benchmarks.md" --json "$LOGS/bench.json" || echo "warning: the benchmark failed; planning by input size"
  [ -f "$LOGS/benchmarks.md" ] && sed -n '/^## 4\./,/^<details>/p' "$LOGS/benchmarks.md"
fi

step "3. plan"
LEFT=$(( BUDGET - $(elapsed) - GRACE - 45 ))  # what training may use, packing and the grace period kept
if [ "$LEFT" -lt 60 ]; then  # a window under a minute would pass the command's limit and lose its packing
  echo "warning: only $LEFT s left after the checks; no window this time (WINDOW_BUDGET, or BENCH=0)"
  exit 0
fi
MINUTES=$(python3 -c "print(round($LEFT / 60, 2))")
ARGS=(--device "$DEVICE" ${CELLS:+--cells "$CELLS"} ${PROFILE:+--profile "$PROFILE"} ${JOBS:+--jobs "$JOBS"})
python3 -m src.ops.window "${ARGS[@]}" --plan "$LOGS/bench.json" --minutes "$MINUTES" --out "$LOGS" \
  || fail "no plan"

step "4. window of $MINUTES min"
python3 -m src.ops.window "${ARGS[@]}" --cells "@$LOGS/plan.json" --minutes "$MINUTES" --grace "$GRACE" --out "$OUT"
echo "== [$(elapsed) s] done: $(ls "$OUT" | tr '\n' ' ')"
