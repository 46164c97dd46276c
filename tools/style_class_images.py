"""Which of two class-image choices moves a style's concept accuracy: tiny10's or `fl2t world check`'s.

    python tools/style_class_images.py RUN [CONCEPT ...]

RUN is a finished `fl2t bench continual` run on the tiny world (e.g. results/v2/tiny10) whose shared experts are
on disk. For each style concept (default: the run's styles) the oracle's final-row images (its expert alone, the
run's prompts and seeds) are regenerated and read by CA's rule twice, the prompts and images fixed:
  - tiny10's class images: the prompts with the token replaced by the class word ("... in the style of style");
  - the check's: the prompts with the style phrase dropped ("a red circle"), the base model at the same seeds.
The first must give the run's stored CA back (it is printed beside it): the check of the reproduction.
"""

import re
import sys
from pathlib import Path

from fl2t.bench.continual import Benchmark, load_config
from fl2t.metrics import nearest_concepts
from fl2t.models import load_base
from fl2t.sampling import Sampler
from fl2t.world.concepts import get_concept


def main(run: Path, names: list[str]) -> None:
    bench = Benchmark(load_config(run.name), run.parent, ["oracle"], say=lambda _: None)
    names = names or [n for n in bench.names if get_concept(n).kind == "style"]
    oracle = bench.method("oracle", 0)
    refs = {n: bench.evaluated(n).refs for n in bench.names}
    cfg, s = bench.cfg, bench.cfg.sample
    base = Sampler(load_base(bench.base))
    for name in names:
        ev = bench.evaluated(name)
        _, emb = bench._generate(oracle, None, name, len(ev.seeds))
        token = re.escape(" ".join(ev.concept.spec.tokens))
        plain = [re.sub(rf",? in the style of {token}", "", p) for p in ev.prompts]
        texts = [plain[i % len(plain)] for i in range(cfg.class_images)]  # as the run lays out its class prompts
        seeds = [cfg.seed + 50_000 + i for i in range(len(texts))]
        plain_emb = bench.clip.image_embeds(base(texts, seeds, s.steps, s.guidance, s.size))
        for label, class_emb in (("tiny10's class images", ev.class_images), ("style phrase dropped", plain_emb)):
            labels = nearest_concepts(emb, refs, class_emb)
            ca = labels.count(name) / len(labels)
            print(f"{name}: {label:22s} CA {ca:.3f}  class {labels.count('class')}/{len(labels)}")
        print(f"{name}: class prompts {ev.class_texts[0]!r} against {texts[0]!r}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
