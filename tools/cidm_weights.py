"""EWA weights of cidm and cidm+tokens per cross-attention layer on three tiny-world concepts learned with a small
budget, for prompts naming each concept and one naming none.

    OMP_NUM_THREADS=1 python tools/cidm_weights.py 60 /tmp/cidm_measure
"""

import sys
import time
from pathlib import Path

import torch

from fl2t import world
from fl2t.config import LearnSettings
from fl2t.data import load_concept
from fl2t.methods import METHODS, MethodContext
from fl2t.world import get_concept, write_concepts

steps = int(sys.argv[1]) if len(sys.argv) > 1 else 60
root = Path(sys.argv[2] if len(sys.argv) > 2 else "/tmp/cidm_measure") / f"run{steps}"
names = ["stripestar", "checkdiamond", "bullseye"]
folders = {p.name: p for p in write_concepts(root / "concepts")}
learn = LearnSettings(steps=steps, num_anchors=0, checkpoint_every=0)
torch.set_num_threads(1)
ctxs = {
    m: MethodContext(
        base=str(world.base_path()), learn=learn, workdir=root / "cidm", store=root / "store", device="cpu"
    )
    for m in ("cidm", "cidm+tokens")
}
cidm = METHODS["cidm"](ctxs["cidm"])
t = time.time()
for n in names:
    cidm.learn(load_concept(folders[n]))
print(f"learned {len(names)} x {steps} steps in {time.time() - t:.0f} s", flush=True)
experts = cidm.experts()
print(
    "modules:",
    sorted({m.split(".attn")[1][:1] for e in experts for m in e.modules}),
    "layerwise:",
    [tuple(e.token_embeddings.shape) for e in experts],
)
pipe = cidm.base_pipeline(experts)
from fl2t.methods.cidm import ElasticWeights

ewa = ElasticWeights(pipe, experts)
prompts = [(n, f"a photo of {get_concept(n).subject}") for n in names] + [(None, "a photo of a star")]
torch.set_printoptions(precision=3, sci_mode=False)
for mname in ("cidm", "cidm+tokens"):
    m = METHODS[mname](ctxs[mname])  # same state folder: the same experts
    print(f"== {mname}")
    for n, p in prompts:
        w = m.layer_weights(ewa, p) * 0.8  # (L, G), scaled as applied
        print(f"  {p!r}: per-layer weights (L={w.shape[0]}, columns {names}):")
        print("   ", str(w).replace("\n", "\n    "))
        if n is not None:
            g = names.index(n)
            col = w[:, g]
            print(f"   named {n}: min {col.min():.3f} mean {col.mean():.3f} max {col.max():.3f}")
        else:
            print(f"   total per layer: {w.sum(-1).tolist()}")
    mw = m.module_weights(pipe, experts)(prompts[0][1])
    print("  module-level weights shape", tuple(mw.shape))
