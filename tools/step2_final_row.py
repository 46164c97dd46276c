"""The fl2t row's final task of tiny10 under the current Step 2, without the nine tasks before it: the ten experts
of a run's shared store consolidated once (the library is the same in every order), scored on the final row's
prompts and seeds and on the pairs, and paired with committed task files (the same samples). First it prints each
concept's relevance (its weight, mean over layers) on its own evaluation prompts: the mean and the lowest.

    python tools/step2_final_row.py OUT [--seed N] [REFERENCE_TASK_JSON ...]
    python tools/step2_final_row.py /tmp/fr results/tiny10/fl2t/order0/task9.json results/tiny10/lookup/order0/task9.json

OUT gets a benchmark folder whose store, concepts and class images link to results/tiny10's (run it after
`fl2t bench continual --config tiny10 --out results` has learned them), and OUT/task9.json. --seed: Step 2's seed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

from fl2t.bench.continual import Benchmark, load_config
from fl2t.bench.stats import final_samples, interval, multi_samples, paired
from fl2t.consolidate.pipeline import FL2TPipeline

RUN = Path("results/tiny10")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("references", nargs="*", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_intermixed_args()
    folder = args.out / "tiny10"
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("experts", "concepts", "class_images"):
        if not (folder / name).exists():
            os.symlink((RUN / name).resolve(), folder / name)
    cfg = load_config("tiny10")
    cfg = cfg.model_copy(update={"consolidate": cfg.consolidate.model_copy(update={"seed": args.seed})})
    if args.seed == 0:
        shutil.copy(RUN / "run.json", folder / "run.json")
    bench = Benchmark(cfg, args.out, ["fl2t"])
    method, order = bench.method("fl2t", 0), bench.orders[0]
    by_name = {c.name: c for c in bench.concepts}
    for name in order:
        if name not in method.tasks:
            method.learn(by_name[name])
    method.consolidate()
    pipe = FL2TPipeline.from_pretrained(bench.base, library=method.library)
    for g, name in enumerate(pipe.concept_names):
        weights = [float(pipe.weights_for(p)[0][:, g].mean()) for p in sorted(set(bench.evaluated(name).prompts))]
        print(f"relevance {name}: mean {sum(weights) / len(weights):.2f}, lowest {min(weights):.2f}")
    scores = bench.evaluate(method, order, order)
    scores["_multi"], scores["_multi_samples"] = bench.multi(method)
    (args.out / "task9.json").write_text(json.dumps(scores))
    references = {r: json.loads(r.read_text()) for r in args.references}
    for label, get, metrics in (("final", final_samples, ("nia", "ca")), ("pairs", multi_samples, ("nia", "presence"))):
        for metric in metrics:
            s = get([[scores]], metric)
            mean, (lo, hi) = interval([list(v.values()) for v in s.values()])
            print(f"{label} {metric}: {mean:.3f} ({lo:.3f} to {hi:.3f})")
            for path, ref in references.items():
                d = paired(s, get([[ref]], metric))
                print(f"  minus {path}: {d['diff']:+.3f} ({d['ci'][0]:+.3f} to {d['ci'][1]:+.3f})")


if __name__ == "__main__":
    main()
