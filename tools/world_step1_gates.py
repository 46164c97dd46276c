"""The world check's Step-1 gates alone on a world folder (a base variant's OUT): stripestar learned with tiny10's
Step 1 (seconds, concept accuracy) and a sequential LoRA's forgetting over three tasks (`--full`'s, the mean of
three Step-1 seeds).

    THREADS=1 python tools/world_step1_gates.py WORLD
    SETTINGS='{"batch_size": 1, "rank": 4}' THREADS=2 python tools/world_step1_gates.py WORLD

SETTINGS: LearnSettings fields changed from tiny10's Step 1 (as in tools/world_concept_alone.py).
"""

import json
import os
import sys
from pathlib import Path

import torch

from fl2t.worldkit import check

torch.set_num_threads(int(os.environ.get("THREADS", "1")))
ctx = check.CheckContext(Path(sys.argv[1]), learn_overrides=json.loads(os.environ.get("SETTINGS", "{}")))
for r in check.gate_step1(ctx) + check.gate_forgetting(ctx):
    print(f"{r.gate}: {r.value:.3f} ({r.detail})", flush=True)
