"""The regression gate's threshold at the default Step-2 budget: how much a concept's fidelity moves between two
normal consolidations of the same set (Step-2 seed 0 and seed 1, `ConsolidateSettings()` defaults), and how far a
lost concept falls (its expert zeroed in the consolidated model's mix). A library of the tiny world's ten concepts:
the fl2t library of a `tiny10-fidelity` benchmark run.
Usage: python tools/gate_threshold.py RUNS/tiny10-fidelity/fl2t/order0/state/library"""

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from fl2t.config import ConsolidateSettings
from fl2t.consolidate import canonical, consolidate
from fl2t.consolidate.fidelity import fidelity
from fl2t.consolidate.train import build_pipeline
from fl2t.library import Library

source = Path(sys.argv[1])
work = Path(tempfile.mkdtemp(prefix="fl2t-gate-"))
shutil.copytree(source, work / "lib")
lib = Library(work / "lib")
experts = canonical(lib.experts())
pipe = build_pipeline(lib, experts, None)
scores = {}
for seed in (0, 1):
    t0 = time.perf_counter()
    model = consolidate(lib, ConsolidateSettings(seed=seed))
    scores[seed] = fidelity(pipe, experts, model)
    print(f"seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)
    if seed == 0:
        zeroed = [
            type(e)(**{**e.__dict__, "lora": {k: v * 0 for k, v in e.lora.items()}}) if i == 0 else e
            for i, e in enumerate(experts)
        ]
        lost = fidelity(pipe, experts, model, student=zeroed)
drops = {n: scores[0][n] - scores[1][n] for n in scores[0]}
out = {
    "fidelity_seed0": scores[0],
    "fidelity_seed1": scores[1],
    "largest_drop_between_seeds": max(abs(d) for d in drops.values()),
    "lost_concept": experts[0].name,
    "lost_fidelity": lost[experts[0].name],
    "lost_drop": scores[0][experts[0].name] - lost[experts[0].name],
}
print(json.dumps(out, indent=2))
