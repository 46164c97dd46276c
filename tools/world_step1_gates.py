"""The world check's Step-1 gates alone on a world folder (a base variant's OUT): stripestar learned with tiny10's
Step 1 (seconds, concept accuracy) and a sequential LoRA's forgetting over three tasks.

    THREADS=1 python tools/world_step1_gates.py WORLD
"""

import os
import sys
from pathlib import Path

import torch

from fl2t.worldkit import check

torch.set_num_threads(int(os.environ.get("THREADS", "1")))
for r in check.gate_step1(check.CheckContext(Path(sys.argv[1]))):
    print(f"{r.gate}: {r.value:.3f} ({r.detail})", flush=True)
