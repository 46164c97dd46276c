"""A method's final-row concept accuracy per prompt template, and what CA's rule read the images as:

    python tools/final_row_templates.py RUN METHOD [CONCEPT ...]

RUN is a finished `fl2t bench continual` run folder (e.g. results/v2/tiny10), read from its committed task files
(order 0's last task; the settings from its run.json). The final row's image i was made from template
i mod T (T = the config's prompts_per_concept; `Benchmark.evaluated` lays the prompts out so), so the samples split
by template exactly. Default concepts: all of the run's.
"""

import json
import sys
from collections import Counter
from pathlib import Path

from fl2t.world.concepts import PROMPT_TEMPLATES, get_concept


def main(run: Path, method: str, concepts: list[str]) -> None:
    settings = json.loads((run / "run.json").read_text())
    folder = run / method / "order0"
    last = len(json.loads((folder / "order.json").read_text())) - 1
    row = json.loads((folder / f"task{last}.json").read_text())
    n_templates = settings["prompts_per_concept"]
    for name in concepts or [k for k in row if not k.startswith("_")]:
        labels = row[name]["samples"]["label"]
        concept = get_concept(name)
        print(f"{name}: CA {row[name]['ca']:.3f} over {len(labels)} images; read as {Counter(labels).most_common()}")
        for t in range(n_templates):
            own = [label == name for label in labels[t::n_templates]]
            template = PROMPT_TEMPLATES[concept.kind][t].format(concept.subject)
            print(f"  template {t:2d} {sum(own)}/{len(own)}  {template}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3:])
