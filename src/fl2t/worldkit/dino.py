"""The tiny world's DINO-like image encoder: a small transformers ViT trained by self-distillation without
labels (DINO, Caron et al. 2021), so the benchmark's DINO column has a tiny-world counterpart of
facebook/dino-vits16, loaded by `fl2t.metrics.DinoEvaluator` like any ViT folder (its feature: the CLS token).

As in DINO: a student and a teacher of the same architecture (backbone + projection head with K prototypes);
the teacher is the student's exponential moving average (momentum rising to 1 on a cosine); the teacher's
outputs are centred (a running mean) and sharpened (temperature 0.04 against the student's 0.1); the loss is the
cross-entropy between the teacher's softmax on each of 2 global views and the student's softmax on every other
view of the same picture (multi-crop: the 2 global views and 4 local ones). The teacher's backbone ships.
Where it departs from the paper, and why:
  - views suited to 32x32 synthetic pictures of one object on a plain background: windows at the picture's own
    pixel size moved by whole pixels (no rescaling, which blurred the outlines and pixelation that some concepts
    are), horizontal flips, mild brightness and contrast jitter, and the background repainted with a random grey
    (`repaint_background`; without it the encoder learned the background: fresh renders of a concept nearest its
    own references 0.36 on average after 800 steps); no hue jitter, grayscale, blur or solarisation, which would
    erase the colours that tell the world's concepts apart;
  - DINOv2's KoLeo term (weight 0.2) on the student's CLS features: self-distillation alone was satisfied by
    colour and shape, and rendered an outlined, a pixelated and a plain red star alike (cosine 0.99);
  - a thousand-odd steps on 20,000 pictures instead of 100+ ImageNet epochs: the teacher's momentum starts at
    0.99 (0.996), K is 1024 (65536), the weight decay is constant, the head is smaller (256 wide, bottleneck 64);
  - the ViT reads 8x8 patches (4x4 patches, 96 wide, took 2.2 times as long a step on 2 shared CPU cores);
  - no captions and no attribute labels: the CLIP evaluator's pictures, without their captions.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import ViTConfig, ViTImageProcessor, ViTModel

from fl2t.world.generator import SIZE
from fl2t.worldkit.train import Dataset, Tick, _lr, _set_lr

LOCAL_SIZE = SIZE // 2  # local crops: 16x16 windows of the 32x32 picture
GLOBAL_SHIFT = 6  # pixels a global view's window moves at most, each way
LOCAL_SHIFT = SIZE // 4  # a local window anywhere inside the picture


def new_encoder() -> ViTModel:
    """ViT on 8x8 patches of the 32x32 picture, 4 layers x 128 (0.7 M parameters, 2.8 MB with its pooler, which
    DINO does not use: `AutoModel` builds a ViTModel with one, so it is saved to load without warnings)."""
    config = ViTConfig(
        image_size=SIZE,
        patch_size=8,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_channels=3,
    )
    return ViTModel(config)


def image_processor() -> ViTImageProcessor:
    """32x32, [0, 255] -> [-1, 1]: the encoder's training input (`Dataset.batch`)."""
    return ViTImageProcessor(
        do_resize=True,
        size={"height": SIZE, "width": SIZE},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )


class DinoHead(nn.Module):
    """DINO's projection head: a 3-layer MLP to a bottleneck, l2-normalised, then K weight-normalised prototypes
    with their norms fixed at 1 (the paper's `norm_last_layer`)."""

    def __init__(self, dim: int, prototypes: int, hidden: int = 256, bottleneck: int = 64) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, bottleneck)
        )
        self.prototypes = nn.Parameter(torch.randn(prototypes, bottleneck) * 0.02)  # (K, bottleneck)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, dim) -> (B, K) logits: cosines between the bottleneck and each prototype."""
        return F.normalize(self.mlp(x), dim=-1) @ F.normalize(self.prototypes, dim=-1).T


class Dino(nn.Module):
    """Backbone + head; the CLS token of the last hidden state is the picture's feature."""

    def __init__(self, backbone: ViTModel, prototypes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = DinoHead(backbone.config.hidden_size, prototypes)

    def forward(self, views: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Views of a batch (each (B, 3, s, s), sizes may differ) -> per view the (B, D) CLS feature and the
        (B, K) head logits."""
        cls = [
            self.backbone(pixel_values=v, interpolate_pos_encoding=v.shape[-1] != SIZE).last_hidden_state[:, 0]
            for v in views
        ]
        return cls, [self.head(c) for c in cls]


def koleo(x: torch.Tensor) -> torch.Tensor:
    """DINOv2's KoLeo regulariser: minus the mean log distance of each unit-norm feature to its nearest neighbour
    in the batch. It spreads the pictures of a batch apart, so that what tells two pictures apart (a rendering
    style, say) is kept even where agreeing on colour and shape already satisfies the self-distillation.
    x: (B, D)."""
    x = F.normalize(x, dim=-1)
    sims = x @ x.T - 3 * torch.eye(len(x))  # (B, B), the diagonal out of the running
    nearest = (2 - 2 * sims.max(dim=1).values).clamp(min=1e-8).sqrt()
    return -torch.log(nearest + 1e-8).mean()


def repaint_background(x: torch.Tensor, gen: torch.Generator, p: float, tolerance: float = 0.1) -> torch.Tensor:
    """With probability p per picture, its plain background (the median colour of its border; pixels within
    `tolerance` of it on the [-1, 1] scale) repainted with a random grey. The world's pictures show one object on
    a plain background, which fresh pictures of a concept change; a background kept equal across views is the
    easiest thing for teacher and student to agree on, and the encoder learned it instead of the object.
    x: (B, 3, H, W) in [-1, 1]."""
    b = x.shape[0]
    border = torch.cat([x[:, :, 0], x[:, :, -1], x[:, :, 1:-1, 0], x[:, :, 1:-1, -1]], dim=-1)  # (B, 3, P)
    background = border.median(dim=-1).values.view(b, 3, 1, 1)
    near = (x - background).abs().amax(dim=1, keepdim=True) <= tolerance  # (B, 1, H, W)
    chosen = (torch.rand(b, 1, 1, 1, generator=gen) < p) & near
    grey = (2 * torch.rand(b, 1, 1, 1, generator=gen) - 1).expand(b, 3, 1, 1)
    return torch.where(chosen, grey, x)


def crops(
    x: torch.Tensor, out: int, shift: int, gen: torch.Generator, repaint: float = 1.0, jitter: float = 0.1
) -> torch.Tensor:
    """One random view per picture, at the picture's own pixel size (no resampling, which would blur the
    outlines and pixelation that some concepts are): the background repainted (`repaint_background`), an
    out x out window whose centre moves by up to `shift` whole pixels from the picture's (beyond the picture:
    the background), flipped left-right half the time, then brightness and contrast jitter.
    x: (B, 3, 32, 32) in [-1, 1] -> (B, 3, out, out) in [-1, 1]."""
    b, size = x.shape[0], x.shape[-1]
    x = repaint_background(x, gen, repaint)
    fill = x[:, :, :1, :1]  # the top-left pixel: the (repainted) background of nearly every picture
    k = torch.randint(-shift, shift + 1, (2, b), generator=gen).float()
    flip = torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = flip * out / size, out / size
    theta[:, 0, 2], theta[:, 1, 2] = 2 * k[0] / size, 2 * k[1] / size
    grid = F.affine_grid(theta, [b, 3, out, out], align_corners=False)
    v = F.grid_sample(x - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill
    u = torch.rand(2, b, 1, 1, 1, generator=gen)
    brightness, contrast = jitter * (2 * u[0] - 1), 1 + jitter * (2 * u[1] - 1)
    mean = v.mean(dim=(1, 2, 3), keepdim=True)
    return ((v - mean) * contrast + mean + brightness).clamp(-1, 1)


def dino_loss(
    student: list[torch.Tensor], teacher: list[torch.Tensor], centre: torch.Tensor, t_student: float, t_teacher: float
) -> torch.Tensor:
    """Cross-entropy between the centred, sharpened teacher softmax on each global view and the student's softmax
    on every other view, averaged over the pairs. student: per view (B, K); teacher: per global view (B, K)."""
    targets = [F.softmax((t - centre) / t_teacher, dim=-1) for t in teacher]
    logs = [F.log_softmax(s / t_student, dim=-1) for s in student]
    losses = [-(q * logs[j]).sum(-1).mean() for i, q in enumerate(targets) for j in range(len(logs)) if j != i]
    return torch.stack(losses).mean()


def train_dino(
    data: Dataset,
    steps: int,
    seed: int,
    tick: Tick,
    batch: int = 64,
    local_views: int = 4,
    prototypes: int = 1024,
    lr: float = 1e-3,
    momentum: float = 0.99,
    koleo_weight: float = 0.2,
) -> tuple[ViTModel, list[float]]:
    """Self-distillation on `data`'s pictures (never their scenes). Returns the teacher's backbone and the loss
    of every step. Temperatures: student 0.1, teacher 0.04; centre momentum 0.9 (the paper's values)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    student = Dino(new_encoder(), prototypes)
    teacher = Dino(new_encoder(), prototypes)
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False).eval()
    student.train()
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.04)
    centre = torch.zeros(prototypes)
    losses = []
    for step in range(steps):
        _set_lr(opt, _lr(step, steps, lr, warmup=min(200, steps // 10)))
        x = data.batch(rng.integers(len(data.pixels), size=batch))
        globals_ = [crops(x, SIZE, GLOBAL_SHIFT, gen) for _ in range(2)]
        locals_ = [crops(x, LOCAL_SIZE, LOCAL_SHIFT, gen) for _ in range(local_views)]
        with torch.no_grad():
            _, t_out = teacher(globals_)
        s_cls, s_out = student(globals_ + locals_)
        loss = dino_loss(s_out, t_out, centre, 0.1, 0.04) + koleo_weight * (koleo(s_cls[0]) + koleo(s_cls[1])) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 3.0)
        opt.step()
        with torch.no_grad():
            m = 1 - (1 - momentum) * (math.cos(math.pi * step / steps) + 1) / 2
            for pt, ps in zip(teacher.parameters(), student.parameters()):
                pt.lerp_(ps, 1 - m)
            centre = 0.9 * centre + 0.1 * torch.cat(t_out).mean(dim=0)
        losses.append(loss.item())
        tick(1)
    return teacher.backbone, losses


def save_encoder(encoder: ViTModel, folder: Path) -> None:
    """A ViT folder `DinoEvaluator.load` (AutoModel + AutoImageProcessor) reads: safetensors and the processor."""
    encoder.save_pretrained(folder, safe_serialization=True)
    image_processor().save_pretrained(folder)
