#!/usr/bin/env bash
# The real-size figures of BENCHMARKS.md on a GPU machine, in priority order, each written to $OUT as it is measured
# (a run cut short keeps what it finished). A fresh machine has none of the dependencies: they are installed first.
# Run from the repository root:  OUT=gpu-figures bash tools/gpu_figures.sh
# 1. the CUDA test module (SD-1.5-size learn -> consolidate -> generate -> evaluate, a tiny benchmark)
# 2. Step 1 at SD-1.5 size (random init, 512x512, bf16, SDPA): it/s, peak memory, MFU, with and without gradient
#    checkpointing; fl2t's step against a plain diffusers + peft loop at batch 1 and 4 (diffusers'
#    train_dreambooth_lora.py is not in its wheel and cannot be fetched here: the plain loop stands in for it)
# 3. generation with FL2TPipeline at G = 10 and 100 against the bare pipeline, Step 2 seconds per step, at SD-1.5 size
set -u
OUT=${OUT:-gpu-figures}
WORK=${WORK:-/tmp/fl2t-gpu}
mkdir -p "$OUT" "$WORK"
log() { echo "$(date +%T) $*" | tee -a "$OUT/progress.log"; }

log "install"
python -m pip install -q -e '.[test]' > "$OUT/install.log" 2>&1 || { log "install failed (see install.log)"; exit 1; }
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python -c "import torch; print(torch.__version__, torch.cuda.is_available(), torch.cuda.get_device_name())" \
  > "$OUT/torch.txt" 2>&1
log "$(cat "$OUT/torch.txt")"

log "1. CUDA tests"
timeout 420 python -m pytest -q -ra tests/test_cuda.py > "$OUT/cuda-tests.txt" 2>&1
log "   $(tail -1 "$OUT/cuda-tests.txt")"

log "2. Step 1 at SD-1.5 size, and against a plain diffusers + peft loop (tiny world and SD-1.5 size)"
timeout 600 fl2t -q bench speed --out "$OUT/step1" --sizes 1 --consolidate-sizes 2,3 --repeats 1 \
  --sd15-steps 12 --overhead-steps 20 > "$OUT/step1.txt" 2>&1
log "   exit $?"

log "3. generation and Step 2 at SD-1.5 size, G = 10 and 100"
python -c "from fl2t.models import sd15_random_pipeline as p; p().save_pretrained('$WORK/sd15', safe_serialization=True)"
timeout 900 fl2t -q bench speed --base "$WORK/sd15" --out "$OUT/sd15" --sizes 10,100 --consolidate-sizes 10,100 \
  --repeats 3 --steps 20 --train-steps 4 --sd15-steps 2 --overhead-steps 4 > "$OUT/sd15.txt" 2>&1
log "   exit $?"
log "done"
