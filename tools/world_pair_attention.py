"""Where the base model's cross-attention goes on two-object prompts, and what the pair gate reads when the prompt's
padding tokens are masked out of it (issue 14: why the base binds one shape word to both objects).

    [THREADS=2] python tools/world_pair_attention.py WORLD_DIR [N_PROMPTS]

Part 1, on the pair gate's first N_PROMPTS held-out prompts (default 21: three per held-out shape pair) and seeds:
the share of cross-attention each half of the picture gives to the first- and second-named shape words, colour
words, the other words, the start token, and the end token with the padding after it (the caption's summary in a
causal text encoder), per third of the 25 sampling steps, over every cross-attention layer and head (the
conditional half of the guidance batch).
Part 2, on all 84 held-out prompts and on 84 pairs pretraining showed (`tools/world_pair_reads.py`'s): both named
shapes read back with the pipeline as it is, with the padding after the end token masked out of cross-attention
(the conditional and the unconditional prompt alike), and with the end token masked too.
"""

from __future__ import annotations

import os
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from fl2t.sampling import Sampler
from fl2t.world.generator import pair_caption
from fl2t.worldkit import check

sys.path.insert(0, str(Path(__file__).parent))
from world_base_variant import seen_pairs  # noqa: E402

GROUPS = ("first shape", "second shape", "colours", "other words", "start", "end + padding")


class Probe:
    """A cross-attention processor (diffusers' AttnProcessor's arithmetic) that masks key positions (`keep`, a
    (rows, 77) bool per call, False: masked) and, while `groups` is set, adds each query half's attention mass per
    token group of the conditional rows into `mass[(third of the steps, half)]`."""

    def __init__(self) -> None:
        self.keep: torch.Tensor | None = None
        self.groups: torch.Tensor | None = None  # (cond rows, 77) group index per token
        self.bin = 0
        self.mass: dict[tuple[int, str], np.ndarray] = defaultdict(lambda: np.zeros(len(GROUPS)))

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        rows, n, _ = hidden_states.shape
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        v = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        scores = torch.bmm(q, k.transpose(1, 2)) * attn.scale  # (rows * heads, n, 77)
        if self.keep is not None:
            keep = self.keep.repeat_interleave(attn.heads, dim=0)[:, None, :]
            scores = scores.masked_fill(~keep, float("-inf"))
        probs = scores.softmax(-1)
        if self.groups is not None:
            side = int(round(n**0.5))
            p = probs.view(rows, attn.heads, side, side, -1)[rows // 2 :]  # conditional rows (the pipeline's 2nd half)
            onehot = torch.nn.functional.one_hot(self.groups, len(GROUPS)).to(p.dtype)  # (cond, 77, G)
            for half, cols in (("left", slice(0, side // 2)), ("right", slice(side - side // 2, side))):
                per_token = p[:, :, :, cols].mean(dim=(1, 2, 3))  # (cond, 77)
                self.mass[(self.bin, half)] += torch.einsum("rt,rtg->g", per_token, onehot).double().numpy()
        out = attn.batch_to_head_dim(torch.bmm(probs, v))
        return attn.to_out[1](attn.to_out[0](out))


def token_groups(tokenizer, scenes) -> torch.Tensor:
    out = []
    for p in scenes:
        ids = tokenizer(pair_caption(p), padding="max_length", max_length=77).input_ids
        words = [tokenizer.convert_ids_to_tokens(i).removesuffix("</w>") for i in ids]
        end = ids.index(tokenizer.eos_token_id)
        g, shapes_seen = [], 0
        for pos, w in enumerate(words):
            if pos == 0:
                g.append(4)
            elif pos >= end:
                g.append(5)
            elif w in p.shapes and shapes_seen < 2:
                g.append(shapes_seen)
                shapes_seen += 1
            elif w in (p.left.colour, p.right.colour):
                g.append(2)
            else:
                g.append(3)
        out.append(g)
    return torch.tensor(out)


def keep_mask(tokenizer, prompts: list[str], drop_end: bool) -> torch.Tensor:
    """(2 x prompts, 77): the unconditional rows ("") then the prompts', True up to the end token (or before it)."""
    rows = []
    for text in [""] * len(prompts) + prompts:
        ids = tokenizer(text, padding="max_length", max_length=77).input_ids
        end = ids.index(tokenizer.eos_token_id)
        rows.append([i < end + (0 if drop_end else 1) for i in range(77)])
    return torch.tensor(rows)


def both(ctx: check.CheckContext, scenes, images) -> float:
    return float(
        np.mean([{a[0], b[0]} == set(p.shapes) for (a, b), p in zip(ctx.evaluator.read_halves(images), scenes)])
    )


def main(world: str, n_prompts: int = 21) -> None:
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    ctx = check.CheckContext(Path(world))
    pipe, probe = ctx.pipeline, Probe()
    pipe.unet.set_attn_processor(
        {name: probe if "attn2" in name else proc for name, proc in pipe.unet.attn_processors.items()}
    )
    forward = pipe.unet.forward
    steps = ctx.steps

    def timed(sample, timestep, *args, **kwargs):  # which third of the sampling steps this call is in
        done = int((pipe.scheduler.timesteps == timestep).nonzero()[0, 0])
        probe.bin = min(2, 3 * done // steps)
        return forward(sample, timestep, *args, **kwargs)

    pipe.unet.forward = timed
    held = check.pair_prompts()
    held_seeds = [check.CHECK_SEED + 40_000 + i for i in range(len(held))]
    # Part 1: three prompts per held-out shape pair (the gate's prompts come 12 per pair)
    pick = [i for i in range(len(held)) if i % check.PAIR_PROMPTS_PER_PAIR < 3][:n_prompts]
    scenes = [held[i] for i in pick]
    queued = iter(scenes)

    def arm(chunk: list[str]) -> None:  # the token groups of this call's prompts
        probe.groups = token_groups(pipe.tokenizer, [next(queued) for _ in chunk])

    Sampler(pipe, arm=arm, batch=check.CHECK_BATCH)(
        [pair_caption(p) for p in scenes], [held_seeds[i] for i in pick], steps, ctx.guidance_scale
    )
    probe.groups = None
    print(f"cross-attention mass per token group, {len(scenes)} held-out pair prompts (conditional half):")
    print(f"{'steps':12s} {'half':6s} " + " ".join(f"{g:>14s}" for g in GROUPS))
    for b, name in enumerate(("first third", "second third", "last third")):
        for half in ("left", "right"):
            m = probe.mass[(b, half)]
            print(f"{name:12s} {half:6s} " + " ".join(f"{x / m.sum():14.3f}" for x in m))
    # Part 2: the pair reads with the padding (and the end token) masked out of cross-attention
    seen = seen_pairs()
    for label, group, seeds in (
        ("held out", held, held_seeds),
        ("seen in pretraining", seen, [999 + i for i in range(len(seen))]),
    ):
        prompts = [pair_caption(p) for p in group]
        row = []
        for mode in ("as is", "padding masked", "end + padding masked"):

            def masked(chunk: list[str], mode: str = mode) -> None:
                probe.keep = None if mode == "as is" else keep_mask(pipe.tokenizer, chunk, mode.startswith("end"))

            images = Sampler(pipe, arm=masked, batch=check.CHECK_BATCH)(prompts, seeds, steps, ctx.guidance_scale)
            row.append(f"{mode} {both(ctx, group, images):.3f}")
        probe.keep = None
        print(f"both named shapes, {label} ({len(group)} prompts): " + ", ".join(row), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:]))
