"""Step-2 ablation over the ten tiny-world experts a `fl2t demo` run learned (runs/demo): consolidate with each switch
off, score every concept with tiny10's evaluation settings.
Usage: python tools/ablate_step2.py [STEPS]  (after fl2t demo)"""

import json
import shutil
import sys
import time
from pathlib import Path

from fl2t.bench.continual import Benchmark, load_config
from fl2t.config import ConsolidateSettings
from fl2t.consolidate import consolidate
from fl2t.library import Library
from fl2t.methods import METHODS, MethodContext

src = Path("runs/demo/fl2t/order0/state")
cfg = load_config("tiny10", orders=1, name="demo")
bench = Benchmark(cfg, Path("runs"), ["fl2t"])
steps = int(sys.argv[1]) if len(sys.argv) > 1 else 150
variants = {
    "full": {},
    "no-gates": {"gates": False},
    "no-shared": {"shared": False},
    "no-contrastive": {"contrastive": False},
    "no-proxy-attention": {"proxy_attention": False},
    "no-routing": {"lambda_route": 0.0},
}
rows = {}
for name, kw in variants.items():
    work = Path(f"runs/ablate/{name}")
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(src, work)
    lib = Library(work / "library")
    t0 = time.perf_counter()
    lib.save_consolidated(consolidate(lib, ConsolidateSettings(steps=steps, **kw)).save_pretrained)
    sec = time.perf_counter() - t0
    m = METHODS["fl2t"](MethodContext(base=bench.base, learn=cfg.learn, workdir=work, store=Path("runs/demo/experts")))
    scores = bench.evaluate(m, m.tasks, m.tasks)
    avg = {k: sum(s[k] for s in scores.values()) / len(scores) for k in ("nia", "ia", "ta", "ca")}
    rows[name] = {**avg, "seconds": sec}
    print(name, json.dumps({k: round(v, 4) for k, v in rows[name].items()}), flush=True)
json.dump(rows, open("runs/ablate/results.json", "w"), indent=1)
