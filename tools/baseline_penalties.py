"""Task 2 of the tiny world at tiny10's Step-1 budget: diffusion loss against the penalty for ewc / c-lora (how
their default lambdas were checked), and how far task 2 moves the LoRA.

    OMP_NUM_THREADS=1 python tools/baseline_penalties.py ewc 5e4 400 /tmp/p1/ewc5e4
    OMP_NUM_THREADS=1 python tools/baseline_penalties.py c-lora 1e6 400 /tmp/p1/clora1e6
"""

import sys
import time
from pathlib import Path

import torch

from fl2t.config import LearnSettings
from fl2t.data import load_concept
from fl2t.methods import METHODS, method_settings
from fl2t.methods.base import MethodContext
from fl2t.world import base_path, get_concept
from fl2t.world.concepts import write_concept

method, lam, steps = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
out = Path(sys.argv[4])
out.mkdir(parents=True, exist_ok=True)
concepts = [load_concept(write_concept(get_concept(n), out / "concepts")) for n in ("stripestar", "checkdiamond")]
learn = LearnSettings(steps=steps, checkpoint_every=0, num_anchors=2, anchor_steps=5)
key = {"ewc": "ewc_lambda", "c-lora": "clora_lambda", "lwf": "lwf_lambda"}[method]
ctx = MethodContext(
    base=str(base_path()),
    learn=learn,
    workdir=out / method,
    store=out / "store",
    settings=method_settings(method, {key: lam}),
)
m = METHODS[method](ctx)
log = []
orig = m.regulariser


def regulariser(previous, scheduler):
    reg = orig(previous, scheduler)
    if reg is None:
        return None
    f = reg.loss

    def loss(model, tokenize, gen):
        v = f(model, tokenize, gen)
        log.append(float(v))
        return v

    reg.loss = loss
    return reg


m.regulariser = regulariser
totals = []
ctx.on_step = lambda s, v: totals.append(v)
t0 = time.time()
for c in concepts:
    totals.clear()
    log.clear()
    m.learn(c)
print("seconds", round(time.time() - t0, 1))
n = len(totals)


def avg(xs, a, b):
    xs = xs[a:b]
    return sum(xs) / max(len(xs), 1)


for a, b in [(0, n // 10), (n // 2, n // 2 + n // 10), (n - n // 10, n)]:
    pen = avg(log, a, b)
    tot = avg(totals, a, b)
    print(f"steps {a}-{b}: total {tot:.4f} penalty {pen:.4g} data {tot - pen:.4f}")
e = m.experts()
k = next(k for k in e[1].lora if k.endswith("lora_B.weight"))
dB = max((e[1].lora[k] - e[0].lora[k]).abs().max().item() for k in e[1].lora)
print(
    "max |Δ LoRA entry| over task 2:", dB, " max |task-1 entry|:", max(v.abs().max().item() for v in e[0].lora.values())
)
if method == "ewc":
    from safetensors.torch import load_file

    F = load_file(out / method / "fisher" / "stripestar.safetensors")
    flat = torch.cat([f.flatten() for f in F.values()])
    print("fisher task1: mean", flat.mean().item(), "max", flat.max().item(), "median", flat.median().item())
if method == "c-lora":
    from fl2t.methods.clora import past_updates

    p = past_updates(e[:1])
    print(
        "task-1 ΔW entries: mean |.|",
        torch.cat([v.flatten() for v in p.values()]).abs().mean().item(),
        "max",
        max(v.abs().max().item() for v in p.values()),
    )
