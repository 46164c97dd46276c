"""fl2t's Step-1 step against a plain diffusers + peft loop (fl2t.bench.step1_overhead), interleaved, on the tiny
world: batch 1 and 4, two seeds each, 60 steps. `fl2t bench speed` runs the same measurement once among the rest.
Usage: OMP_NUM_THREADS=1 python tools/step1_overhead.py"""

import tempfile
from pathlib import Path

import torch

from fl2t.bench.step1_overhead import bench_step1_overhead
from fl2t.config import LearnSettings
from fl2t.data import load_concept
from fl2t.world import CONCEPTS, base_path
from fl2t.world.concepts import write_concept

concept = load_concept(write_concept(CONCEPTS[0], Path(tempfile.mkdtemp())))
print(f"threads {torch.get_num_threads()}")
print("batch  seed  ratio  fl2t ms  plain ms")
for batch in (1, 4):
    for seed in (0, 1):
        r = bench_step1_overhead(str(base_path()), concept, LearnSettings(steps=60, batch_size=batch, seed=seed))
        fl2t_ms, plain_ms = r["fl2t_step_s"]["median"] * 1e3, r["plain_step_s"]["median"] * 1e3
        print(f"{batch:5d}  {seed:4d}  {r['ratio']:.3f}  {fl2t_ms:7.1f}  {plain_ms:8.1f}", flush=True)
