#!/usr/bin/env bash
# The real-size figures of BENCHMARKS.md on a GPU machine, in priority order, each written to $OUT as it is measured
# (a run cut short keeps what it finished). Sized to fit one 10-minute call.
# Run from the repository root:  OUT=gpu-figures bash tools/gpu_figures.sh
# Where the machine cannot reach a package index, carry the missing wheels in .whl/ (diffusers, pydantic and their
# needs; see the device notes): they are installed to /tmp/site and the package is run from src/ without installing.
# The tracked tree is about 62 MB and a call carries at most 64 MiB: for the call, untrack results/, docs/ and
# BENCHMARKS.md (`git rm -r -q --cached ...` with them in .git/info/exclude; `git reset` after) to make room.
# 1. the CUDA test module (SD-1.5-size learn -> consolidate -> generate -> evaluate, a tiny benchmark)
# 2. a denoising step at SD-1.5 size with two and ten experts: lookup, span-restricted keys/values, fused (fp32)
# 3. `fl2t bench speed` at SD-1.5 size: Step 2 and generation at G = 10, Step 1 (bf16, SDPA) with and without
#    gradient checkpointing and its MFU, fl2t's Step-1 step against a plain diffusers + peft loop at batch 1 and 4
set -u
OUT=${OUT:-gpu-figures}
WORK=${WORK:-/tmp/fl2t-gpu}
mkdir -p "$OUT" "$WORK"
log() { echo "$(date +%T) $*" | tee -a "$OUT/progress.log"; }

log "install"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    > "$OUT/install.log" 2>&1 || { log "install failed (see install.log)"; exit 1; }
  export PYTHONPATH="/tmp/site:$PWD/src"
  FL2T="python3 -m fl2t.cli"
else
  python3 -m pip install -q -e '.[test]' > "$OUT/install.log" 2>&1 || { log "install failed (see install.log)"; exit 1; }
  FL2T=fl2t
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> "$OUT/progress.log" 2>&1
log "$(python3 -c "import torch, diffusers, peft, transformers, accelerate; print('torch', torch.__version__, torch.cuda.is_available(), torch.cuda.get_device_name(), 'diffusers', diffusers.__version__, 'peft', peft.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)" 2>&1 | tail -1)"

log "1. CUDA tests"
timeout "${T_TESTS:-200}" python3 -m pytest -q -p no:cacheprovider -ra tests/test_cuda.py > "$OUT/cuda-tests.txt" 2>&1
log "   exit $?: $(tail -1 "$OUT/cuda-tests.txt")"

SD15=${SD15:-$WORK/sd15}
if [ ! -d "$SD15" ]; then
  log "   writing a random-init SD-1.5 to $SD15"
  python3 -c "from fl2t.models import sd15_random_pipeline as p; p().save_pretrained('$SD15', safe_serialization=True)"
fi

log "2. a denoising step at SD-1.5 size: lookup, span keys/values, fused"
BASE="$SD15" timeout "${T_SPAN:-90}" python3 tools/span_step_speed.py "${SPAN_REPEATS:-20}" > "$OUT/span.txt" 2>&1
log "   exit $?"

log "3. fl2t bench speed at SD-1.5 size"
timeout "${T_BENCH:-240}" $FL2T -q bench speed --base "$SD15" --out "$OUT/sd15" --sizes 10 --consolidate-sizes 10 \
  --repeats "${REPEATS:-2}" --steps 10 --consolidate-steps 3 --train-steps 3 --sd15-steps "${SD15_STEPS:-6}" \
  --overhead-steps "${OVERHEAD_STEPS:-4}" --diffusers-max 10 > "$OUT/sd15.txt" 2>&1
log "   exit $?"
log "done"
