"""What a 48 x 48 tiny world would cost and whether the shipped VAE carries over (issue 14's approved size), measured
on the shipped v1 weights without a rebuild:

    python tools/world_48_probe.py

1. The base UNet's forward (classifier-free guidance batch of 2) on 16 x 16 latents (32 px) and 24 x 24 (48 px), and
   the evaluator's image tower on 32 and 48 px pictures: median seconds of 20 calls, one thread, interleaved.
2. The shipped VAE's reconstruction error (mean absolute error on a 0..1 scale) on the ten concepts' references and
   on two-object scenes, rendered at 32 px and at 48 px with every radius scaled by 1.5 (the VAE is convolutional:
   it runs at any size; the question is whether it keeps the pictures).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPModel

from fl2t.world import base_path, evaluator_path
from fl2t.world import generator as gen
from fl2t.world.concepts import CONCEPTS, reference_scenes


def median_seconds(calls: dict[str, Callable[[], object]], n: int = 20) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in calls}
    for i in range(n + 2):
        for k, f in calls.items():
            t0 = time.perf_counter()
            f()
            if i >= 2:
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def pictures(size: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The concepts' references and 40 two-object scenes, rendered at `size` px with radii times `scale`."""
    old = gen.SIZE, dict(gen.SIZES), gen.PAIR_RADIUS
    gen.SIZE, gen.PAIR_RADIUS = size, gen.PAIR_RADIUS * scale
    gen.SIZES.update({k: v * scale for k, v in old[1].items()})
    try:
        refs = [gen.render(s) for c in CONCEPTS for s in reference_scenes(c)]
        rng = np.random.default_rng(0)
        pairs = [gen.render_pair(gen.random_pair(rng, held_out=None)) for _ in range(40)]
    finally:
        gen.SIZE, gen.PAIR_RADIUS = old[0], old[2]
        gen.SIZES.clear()
        gen.SIZES.update(old[1])
    return torch.from_numpy(gen.to_array(refs)), torch.from_numpy(gen.to_array(pairs))


@torch.no_grad()
def main() -> None:
    torch.set_num_threads(1)
    unet = UNet2DConditionModel.from_pretrained(base_path() / "unet").eval()
    vae = AutoencoderKL.from_pretrained(base_path() / "vae").eval()
    clip = CLIPModel.from_pretrained(evaluator_path()).eval()
    text = torch.randn(2, 77, unet.config.cross_attention_dim)
    t = torch.tensor([500, 500])
    x = {s: torch.randn(2, unet.config.in_channels, s, s) for s in (16, 24)}
    px = {s: torch.randn(8, 3, s, s) for s in (32, 48)}
    sec = median_seconds(
        {
            "unet 32 px": lambda: unet(x[16], t, text),
            "unet 48 px": lambda: unet(x[24], t, text),
            "evaluator 32 px": lambda: clip.get_image_features(pixel_values=px[32]),
            "evaluator 48 px": lambda: clip.get_image_features(pixel_values=px[48], interpolate_pos_encoding=True),
        }
    )
    for part in ("unet", "evaluator"):
        a, b = sec[f"{part} 32 px"], sec[f"{part} 48 px"]
        print(f"{part}: {a * 1000:.1f} ms at 32 px, {b * 1000:.1f} ms at 48 px: {b / a:.2f}x")
    for size, scale in ((32, 1.0), (48, 1.5)):
        for name, batch in zip(("references", "pairs"), pictures(size, scale)):
            rec = vae.decode(vae.encode(batch).latent_dist.mean).sample
            print(f"VAE at {size} px, {name}: MAE {float((rec - batch).abs().mean()) / 2:.4f} ({len(batch)} pictures)")


if __name__ == "__main__":
    main()
