"""The relevance Step 2 learns, read on the world's evaluation prompts (issue 15 item 1):

    python tools/step2_selection.py LIBRARY STEPS [setting=value ...]

LIBRARY: a library of world experts (e.g. `fl2t demo`'s `runs/demo/experts`; copied, never changed). Prints, per
concept, the lowest weight (mean over layers) each concept gets over 10 of the world's evaluation prompts naming it,
the highest over 4 prompts naming none, and the weights of two-concept prompts (mean, and lowest over layers)."""

import json
import shutil
import sys
import tempfile
import time

import torch

from fl2t.config import ConsolidateSettings
from fl2t.consolidate import consolidate
from fl2t.consolidate.pipeline import FL2TPipeline
from fl2t.library import Library
from fl2t.world.concepts import PROMPT_TEMPLATES

library, steps = sys.argv[1], int(sys.argv[2])
over = {k: json.loads(v) for k, v in (a.split("=", 1) for a in sys.argv[3:])}
work = tempfile.mkdtemp()
shutil.copytree(library, f"{work}/lib")
lib = Library(f"{work}/lib")
t0 = time.time()
s = ConsolidateSettings(steps=steps, **over)
model = consolidate(lib, s)
print(f"consolidate {steps} steps: {time.time() - t0:.1f} s")
lib.save_consolidated(model.save_pretrained)
pipe = FL2TPipeline.from_pretrained(library=lib)
names = pipe.concept_names
rows = []
for e in pipe.experts:
    ts = PROMPT_TEMPLATES[e.spec.kind]
    a = torch.stack([pipe.weights_for(t.format(e.spec.subject))[0].mean(0) for t in ts[::2]]).min(0).values
    rows.append(a)
    print(e.name, "(min over 10 eval prompts)", " ".join(f"{x:.3f}" for x in a.tolist()))
base = (
    torch.stack(
        [
            pipe.weights_for(p)[0].mean(0)
            for p in [
                "a star",
                "a diamond on a black background",
                "a red circle in the style of",
                "a large star, top left",
            ]
        ]
    )
    .max(0)
    .values
)
print("none (max over 4)", " ".join(f"{x:.3f}" for x in base.tolist()))
objs = [e for e in pipe.experts if e.spec.kind == "object"]
sty = [e for e in pipe.experts if e.spec.kind == "style"]
for p in [f"a {objs[0].spec.subject} and a {objs[1].spec.subject}"] + [
    f"a {o.spec.subject} in the style of {sty[0].spec.subject}" for o in objs
]:
    a = pipe.weights_for(p)[0]
    print(
        p,
        " ".join(f"{x:.3f}" for x in a.mean(0).tolist()),
        "min over layers",
        " ".join(f"{x:.3f}" for x in a.min(0).values.tolist()),
    )
print("names", names)
