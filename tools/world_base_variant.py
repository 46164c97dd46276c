"""A world v2 base model trained alone, with some of `BuildSettings`' base knobs changed, and read by the world
check's base gates: the quicker experiment before a whole `fl2t world build --v2` (issue 14).

    python tools/world_base_variant.py WORLD OUT STEPS '{"text_layers": 4, "pairs_left_first": true}'

WORLD is a built v2 world (its VAE and evaluator are used as they are); OUT gets the base pipeline, a link to WORLD's
evaluator, pairs.png (the first 32 held-out pair images) and result.json. The pretraining pictures are `V2_MIX`'s
with the JSON's overrides (any `BuildSettings` field the base stage reads). Printed: the single-object, pair and
generic-style gates, both shapes of pairs pretraining did show (84 images; the held-out gate's generalisation gap),
and the Step-1 gates (stripestar learned alone, then two more tasks). One thread per run (THREADS=N for more), so
two can share 2 cores. FROM_WORLD=1: continue WORLD's base model for STEPS instead of training a new one (a base
whose vocabulary is not compacted: `fl2t world build --v2 --until base`); QUICK=1: only the single-object and pair
gates. `train_base`'s experiment knobs (`summary_dropout`) go in the JSON too, and `"text_from_evaluator": true`: the
base's text encoder is WORLD's evaluator's text tower, frozen (as Stable Diffusion keeps CLIP's), not one trained
with the UNet; `"text_stage": {"steps": 2000, "hard_negatives": true}`: a CLIP of its own trained first on the
pretraining pictures (its seed the build's "text" stage's; hard_negatives: `train.train_evaluator`'s swapped-shape
captions), saved to OUT/text_clip, its text tower frozen as the base's text encoder.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline
from PIL import Image
from transformers import CLIPModel, CLIPTextModel

from fl2t.models import build_pipeline
from fl2t.world.generator import BACKGROUNDS, COLOURS, SHAPES, PairScene, Scene, is_held_out_pair, pair_caption
from fl2t.worldkit import build, check, models, train


def seen_pairs(n: int = 84) -> list[PairScene]:
    """Two-object prompts on shape pairs pretraining showed, colours and background from a fixed seed."""
    rng = np.random.default_rng(5)
    seen = [(a, b) for a in SHAPES for b in SHAPES if a != b and not is_held_out_pair(a, b)]
    colours, scenes = list(COLOURS), []
    for _ in range(n):
        a, b = seen[rng.integers(len(seen))]
        ca, cb = rng.choice(len(colours), size=2, replace=False)
        bg = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
        obj = Scene(shape=a, colour=colours[ca], background=bg, position="in the center", size="small")
        scenes.append(PairScene(obj, replace(obj, shape=b, colour=colours[cb]), bg))
    return scenes


def text_tower(clip: CLIPModel) -> CLIPTextModel:
    """A CLIPModel's text tower as a CLIPTextModel, every weight loaded strictly."""
    tower = CLIPTextModel(clip.config.text_config)
    tower.load_state_dict(clip.text_model.state_dict())
    return tower


def main(world: str, out: str, steps: str, overrides: str = "{}") -> None:
    torch.set_num_threads(int(os.environ.get("THREADS", "1")))
    world_dir, folder = Path(world), Path(out)
    knobs = json.loads(overrides)
    train_kw = {k: knobs.pop(k) for k in ("summary_dropout",) if k in knobs}  # train_base's experiment knobs
    text_stage = knobs.pop("text_stage", None)
    if knobs.pop("text_from_evaluator", False):
        train_kw["frozen_text"] = text_tower(CLIPModel.from_pretrained(world_dir / "evaluator"))
    s = build.BuildSettings(**{**build.V2_MIX, "base_steps": int(steps), **knobs})
    t0 = time.time()
    vae = AutoencoderKL.from_pretrained(world_dir / "base" / "vae").eval()
    scenes = build.pretraining_scenes(
        s.seed, s.plain_images, s.pair_share, s.style_share, s.patterned_share, s.pair_patterned
    )
    if text_stage is not None:  # a CLIP of its own on the pretraining pictures (at the CLIP's 32 px), its text kept
        t1 = time.time()
        data = train.render_dataset(scenes, lambda n: None, models.SIZE)
        clip = train.train_evaluator(
            data,
            int(text_stage.get("steps", s.evaluator_steps)),
            build._stage_seed(s.seed, "text"),
            lambda n: None,
            pairs_left_first=s.pairs_left_first,
            hard_negatives=bool(text_stage.get("hard_negatives", False)),
        )
        clip.save_pretrained(folder / "text_clip", safe_serialization=True)
        train_kw["frozen_text"] = text_tower(clip)
        print(f"text stage {text_stage}: {time.time() - t1:.0f} s", flush=True)
    latents = train.encode_latents(vae, train.render_dataset(scenes, lambda n: None, s.side), lambda n: None)
    print(f"rendered and encoded {len(scenes)} pictures: {time.time() - t0:.0f} s", flush=True)
    t0 = time.time()
    init = None
    if os.environ.get("FROM_WORLD"):  # continue WORLD's base model instead of training a new one
        pipe = StableDiffusionPipeline.from_pretrained(world_dir / "base")
        if pipe.text_encoder.config.vocab_size != train.clip_tokenizer().vocab_size:
            sys.exit(f"{world}: its vocabulary is compacted; continue a base built with --until base")
        init = (pipe.unet, pipe.text_encoder)
    unet, text, done = train.train_base(
        latents,
        scenes,
        s.base_steps,
        build._stage_seed(s.seed, "base"),
        lambda n: None,
        batch=s.base_batch,
        log=lambda m: print(m, flush=True),
        text_layers=s.text_layers,
        transformer_layers=s.transformer_layers,
        pairs_left_first=s.pairs_left_first,
        init=init,
        **train_kw,
    )
    result: dict = {"settings": json.loads(overrides), "steps": done, "train_seconds": round(time.time() - t0)}
    build_pipeline(unet, vae, text, models.sample_scheduler()).save_pretrained(folder / "base", safe_serialization=True)
    if not (folder / "evaluator").exists():
        os.symlink((world_dir / "evaluator").resolve(), folder / "evaluator")
    ctx = check.CheckContext(folder)
    quick = bool(os.environ.get("QUICK"))
    for gate in (check.gate_base, check.gate_base_pairs) + (() if quick else (check.gate_base_styles,)):
        for r in gate(ctx):
            print(f"{r.gate}: {r.value:.3f} ({r.detail})", flush=True)
            result[r.gate] = r.value
    pairs = seen_pairs()
    read = ctx.evaluator.read_halves(
        ctx.base_images([pair_caption(p) for p in pairs], list(range(999, 999 + len(pairs))))
    )
    result["seen pairs: both shapes"] = float(
        np.mean([{a[0], b[0]} == set(p.shapes) for (a, b), p in zip(read, pairs)])
    )
    result["seen pairs: both colours"] = float(
        np.mean([{a[1], b[1]} == {p.left.colour, p.right.colour} for (a, b), p in zip(read, pairs)])
    )
    print({k: round(v, 3) for k, v in result.items() if k.startswith("seen")}, flush=True)
    for r in [] if quick else check.gate_step1(ctx):
        print(f"{r.gate}: {r.value:.3f} ({r.detail})", flush=True)
        result[r.gate] = r.value
    side = s.side * 2
    sheet = Image.new("RGB", (8 * side, 4 * side))
    for i, im in enumerate(ctx.samples["base pairs"][:32]):
        sheet.paste(im.resize((side, side), Image.NEAREST), ((i % 8) * side, (i // 8) * side))
    sheet.save(folder / "pairs.png")
    (folder / "result.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])
