"""Reconstruction error of two world VAEs on the ten concepts' references, and a PNG grid (per concept row:
three references, the first VAE's reconstructions, the second's).

    python tools/world_vae_reconstructions.py OLD_VAE_DIR NEW_VAE_DIR docs/world_vae_reconstructions.png
"""

import sys

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image

from fl2t.world.concepts import CONCEPTS, reference_scenes
from fl2t.worldkit import train


def main(old_dir: str, new_dir: str, out: str) -> None:
    vaes = [AutoencoderKL.from_pretrained(d).eval() for d in (old_dir, new_dir)]
    rows = []
    for c in CONCEPTS:
        x = train.render_dataset(reference_scenes(c), lambda n: None).batch(np.arange(5))
        with torch.no_grad():
            recs = [v.decode(v.encode(x).latent_dist.mean).sample for v in vaes]
        maes = [float((r - x).abs().mean()) / 2 for r in recs]  # mean absolute error on a 0..1 scale
        print(f"{c.name:<13} MAE old {maes[0]:.4f}  new {maes[1]:.4f}")
        rows.append(torch.cat([x[:3], *(r[:3] for r in recs)]))
    pix = ((torch.stack(rows).clamp(-1, 1) + 1) * 127.5).byte().permute(0, 1, 3, 4, 2).numpy()  # (C, 9, H, W, 3)
    grid = np.concatenate([np.concatenate(list(row), axis=1) for row in pix], axis=0)
    Image.fromarray(grid).resize((grid.shape[1] * 3, grid.shape[0] * 3), Image.NEAREST).save(out)


if __name__ == "__main__":
    main(*sys.argv[1:4])
