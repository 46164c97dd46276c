"""Does an image-only encoder of the tiny world tell its concepts apart? (issue 14 item 2, the DINO score)

    python tools/world_dino_check.py FOLDER                 # measure a saved DINO-like encoder (and the CLIP one)
    python tools/world_dino_check.py FOLDER --train 3000    # train one first (fl2t.worldkit.dino), save it there

The measure, per concept: 10 fresh renders (`c.scene(np.random.default_rng([777, k]))`), each labelled by
`fl2t.metrics.nearest_concepts` against the 10 concepts' 5 reference renders and a class option (objects: plain
renders of the concept's shape in its main colour; styles: the same kind of content rendered plainly); the share
that picks its own concept. The shipped CLIP evaluator's image features are measured the same way as a reference.
"refs cos": the mean cosine between two of a concept's references in the DINO-like features.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fl2t import world
from fl2t.metrics import ClipEvaluator, DinoEvaluator, nearest_concepts
from fl2t.world.concepts import CONCEPTS, WorldConcept, concept_appearances, reference_scenes
from fl2t.world.generator import GENERIC_STYLES, STYLES, random_pair, render
from fl2t.worldkit import build, dino, train

Embed = Callable[[Sequence[Image.Image]], torch.Tensor]


def class_renders(c: WorldConcept, k: int, n: int = 10) -> list[Image.Image]:
    """What the concept adds to: its shape in its main colour (objects), or plain renderings (styles)."""
    rng = np.random.default_rng([778, k])
    if c.kind == "object":
        return [render(replace(c.scene(rng), pattern=None, colour2=None)) for _ in range(n)]
    return [render(replace(c.scene(rng), style=None)) for _ in range(n)]


def nearest(embed: Embed, per_concept: int = 10) -> dict[str, list[str]]:
    """Per concept, what each of its fresh renders is nearest (`nearest_concepts`: a concept's name or CLASS)."""
    refs = {c.name: embed([render(s) for s in reference_scenes(c)]) for c in CONCEPTS}
    out = {}
    for k, c in enumerate(CONCEPTS):
        rng = np.random.default_rng([777, k])
        fresh = embed([render(c.scene(rng)) for _ in range(per_concept)])
        out[c.name] = nearest_concepts(fresh, refs, embed(class_renders(c, k)))
    return out


def within(embed: Embed) -> dict[str, float]:
    """Per concept, the mean cosine between two of its references: how alike the features see them."""
    out = {}
    for c in CONCEPTS:
        r = embed([render(s) for s in reference_scenes(c)])
        out[c.name] = float(((r @ r.T).sum() - len(r)) / (len(r) * (len(r) - 1)))
    return out


def separation(embed: Embed, per_concept: int = 10) -> dict[str, float]:
    """Per concept, the share of its fresh renders nearest its own references (concept accuracy of renders)."""
    return {name: float(np.mean([x == name for x in got])) for name, got in nearest(embed, per_concept).items()}


def rich_data(n: int, seed: int = build.DEFAULT_SEED, styled_pairs: float = 0.0) -> train.Dataset:
    """The build's rich pictures (patterns, the three style renderings), with world v2's shares of two-object scenes
    and generic styles; never a concept's look. `styled_pairs`: the share then replaced by two-object scenes drawn
    in one rendering (a style concept's or a generic one, drawn uniformly), so that two parts of a picture share its
    rendering and not their colours or shapes."""
    exclude = concept_appearances()
    scenes = build.rich_scenes(build.BuildSettings(**{**build.V2_MIX, "seed": seed, "rich_images": n}))
    if styled_pairs:
        pick = np.random.default_rng(build._stage_seed(seed, "dino:styled-pairs"))
        renderings = (*STYLES, *GENERIC_STYLES)
        for i in np.flatnonzero(pick.random(n) < styled_pairs):
            pair = random_pair(pick, held_out=None, patterned=0.35, exclude=exclude)
            scenes[i] = replace(pair, style=renderings[pick.integers(len(renderings))])
    return train.render_dataset(scenes, lambda n: None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--train", type=int, default=0, help="train this many steps into FOLDER first")
    ap.add_argument("--images", type=int, default=20_000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--local-views", type=int, default=2)
    ap.add_argument("--seed", type=int, default=build.DEFAULT_SEED)
    ap.add_argument("--probe", type=int, default=250, help="measure the teacher every this many steps")
    ap.add_argument("--channel-permute", type=float, default=0.2)
    ap.add_argument("--local-min", type=float, default=dino.LOCAL_SCALE[0])
    ap.add_argument("--no-clip", action="store_true")
    ap.add_argument("--styled-pairs", type=float, default=0.0, help="share of two-object scenes in one rendering")
    ap.add_argument("--grayscale", type=float, default=0.0, help="share of views turned grey (DINO's own 0.2)")
    ap.add_argument("--patch-loss", type=float, default=0.0, help="weight of iBOT's masked-patch objective")
    ap.add_argument(
        "--no-positions", action="store_true", help="position embeddings zero and frozen (a set of patches)"
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.train:
        t0 = time.time()
        data = rich_data(args.images, args.seed, args.styled_pairs)
        print(f"rendered {args.images} pictures in {time.time() - t0:.0f} s", flush=True)
        t0 = time.time()
        run = dino.DinoTraining(
            args.train,
            build._stage_seed(args.seed, "dino"),
            args.local_views,
            channel_permute=args.channel_permute,
            patch_loss=args.patch_loss,
        )
        dino.LOCAL_SCALE = (args.local_min, dino.LOCAL_SCALE[1])
        if args.grayscale:  # DINO's RandomGrayscale, after the view's other colour changes
            swap, gen = run.swap, run.gen

            def grey_views(x: torch.Tensor) -> torch.Tensor:
                x = swap(x)
                grey = x.mul(torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True).expand_as(x)
                return torch.where((torch.rand(len(x), 1, 1, 1, generator=gen) < args.grayscale), grey, x)

            run.swap = grey_views
        if args.no_positions:  # the CLS feature becomes a function of the set of patches, not of their layout
            for model in (run.student, run.teacher):
                model.encoder.embeddings.position_embeddings.data.zero_()
                model.encoder.embeddings.position_embeddings.requires_grad_(False)
        rng = np.random.default_rng(build._stage_seed(args.seed, "dino"))
        for step in range(args.train):  # train_dino's loop, with progress and the measure on the way
            loss = run.step(data.batch(rng.integers(len(data.scenes), size=args.batch)))
            if (step + 1) % args.probe == 0 or step + 1 == args.train:
                el = time.time() - t0
                run.teacher.encoder.eval()
                acc = separation(DinoEvaluator(run.teacher.encoder, dino.image_processor()).image_embeds)
                print(
                    f"step {step + 1}/{args.train}: loss {loss:.3f}, {el:.0f} s, {el / (step + 1):.3f} s/step; "
                    f"renders nearest own refs mean {np.mean(list(acc.values())):.2f} "
                    + " ".join(f"{k} {v:.1f}" for k, v in acc.items()),
                    flush=True,
                )
        encoder, processor = run.encoder(), dino.image_processor()
        encoder.save_pretrained(args.folder, safe_serialization=True)
        processor.save_pretrained(args.folder)
        print(f"trained {args.train} steps (batch {args.batch}) in {time.time() - t0:.0f} s", flush=True)
    dino_embed = DinoEvaluator.load(args.folder).image_embeds
    picks, alike = {"dino": nearest(dino_embed)}, within(dino_embed)
    if not args.no_clip:
        picks["clip"] = nearest(ClipEvaluator.load(world.evaluator_path()).image_embeds)
    results = {k: {c: float(np.mean([x == c for x in got])) for c, got in v.items()} for k, v in picks.items()}
    print(f"{'concept':14s}" + "".join(f"{k:>8s}" for k in results) + " refs cos   dino's wrong picks")
    for c in CONCEPTS:
        wrong = Counter(x for x in picks["dino"][c.name] if x != c.name)
        print(
            f"{c.name:14s}"
            + "".join(f"{r[c.name]:8.2f}" for r in results.values())
            + f"{alike[c.name]:9.2f}   "
            + ", ".join(f"{w} {n}" for w, n in wrong.most_common())
        )
    print(f"{'mean':14s}" + "".join(f"{np.mean(list(r.values())):8.2f}" for r in results.values()))
    print(f"{'lowest':14s}" + "".join(f"{min(r.values()):8.2f}" for r in results.values()))


if __name__ == "__main__":
    main()
