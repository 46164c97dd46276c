"""A DINO-like image-only encoder for the tiny world (issue 14): the field's DINO score needs one, and the world's
pictures are far from what facebook/dino-vits16 saw.

Self-distillation without labels (Caron et al. 2021): a student ViT and a teacher ViT (the EMA of the student) each
put a projection head over K prototypes on the CLS token; the teacher's softmax over the prototypes of one view is
the target of the student's softmax of every other view. The teacher's targets are balanced by Sinkhorn-Knopp
(as in SwAV and DINOv2) instead of centering: on a few thousand steps of a small world it cannot collapse onto one
prototype.

The augmentations decide what the features ignore. An earlier attempt used DINO's colour jitter, blur and solarize,
and its features became blind to exactly what a style (outline, pastel's washed-out colours on cream, mosaic's 4x4
blocks) or an object concept's colours are. Here the views are only random resized crops (2 global views at 0.5-1.0
of the area, a few local ones at 0.2-0.5 resized to 16x16) and horizontal flips: a view shows no colour its picture
does not have, up to the blend of neighbouring pixels bilinear resampling makes.

The feature is the CLS token of `last_hidden_state` of a transformers `ViTModel`, which is what
`fl2t.metrics.DinoEvaluator` reads from a folder saved with `save_pretrained`.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn.functional as F
from transformers import ViTConfig, ViTImageProcessor, ViTModel

from fl2t.world.generator import SIZE
from fl2t.worldkit.train import Dataset, Tick, _lr, _set_lr

LOCAL_SIZE = 16  # side of the local views (4x4 patches; the position embeddings are interpolated)
GLOBAL_SCALE = (0.5, 1.0)  # share of the picture's area a global view shows
LOCAL_SCALE = (0.2, 0.5)
PROTOTYPES = 512
STUDENT_TEMP = 0.1
TEACHER_TEMP = 0.05


def new_encoder() -> ViTModel:
    """A ViT on 4x4 patches of the 32x32 picture, the size of the world's CLIP image tower."""
    config = ViTConfig(
        image_size=SIZE,
        patch_size=4,
        num_channels=3,
        hidden_size=96,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return ViTModel(config)


def image_processor() -> ViTImageProcessor:
    """Resize to 32x32 and map [0, 255] to [-1, 1], the encoder's training input (as the world's CLIP evaluator)."""
    return ViTImageProcessor(
        do_resize=True,
        size={"height": SIZE, "width": SIZE},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )


class Head(torch.nn.Module):
    """DINO's projection head: an MLP to a small bottleneck, L2-normalised, then weight-normalised prototypes."""

    def __init__(self, dim: int, hidden: int = 256, bottleneck: int = 64, prototypes: int = PROTOTYPES):
        super().__init__()
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(dim, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, hidden), torch.nn.GELU()
        )
        self.out = torch.nn.Linear(hidden, bottleneck)
        self.prototypes = torch.nn.Linear(bottleneck, prototypes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.normalize(self.out(self.mlp(x)), dim=-1)
        return z @ F.normalize(self.prototypes.weight, dim=-1).T  # (B, K) cosines


class Dino(torch.nn.Module):
    """Encoder and head; the student and (as its EMA) the teacher."""

    def __init__(self, encoder: ViTModel):
        super().__init__()
        self.encoder = encoder
        self.head = Head(encoder.config.hidden_size)

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        """(B, 3, s, s) views in [-1, 1] -> (B, K) prototype cosines of their CLS tokens."""
        out = self.encoder(pixel_values=views, interpolate_pos_encoding=views.shape[-1] != SIZE)
        return self.head(out.last_hidden_state[:, 0])


def random_crops(
    x: torch.Tensor, size: int, scale: tuple[float, float], gen: torch.Generator, ratio: float = 4 / 3
) -> torch.Tensor:
    """Random resized crops of (B, 3, H, W) pictures to (B, 3, size, size), each flipped left-right half the time.

    A crop covers `scale` of the area with aspect ratio within [1/ratio, ratio] and lies inside the picture, so
    bilinear resampling only blends neighbouring pixels: a crop has no colour its picture does not have."""
    b = x.shape[0]
    u = torch.rand(b, 5, generator=gen)
    area = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    aspect = torch.exp(math.log(ratio) * (2 * u[:, 1] - 1))
    w = torch.sqrt(area * aspect).clamp(max=1.0)  # half-widths of the box in [-1, 1] coordinates are w and h
    h = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = (1 - w) * (2 * u[:, 2] - 1)  # the box stays inside the picture
    cy = (1 - h) * (2 * u[:, 3] - 1)
    flip = torch.where(u[:, 4] < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = w * flip, cx
    theta[:, 1, 1], theta[:, 1, 2] = h, cy
    grid = F.affine_grid(theta, [b, 3, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, temp: float, iterations: int = 3) -> torch.Tensor:
    """(B, K) teacher scores -> (B, K) targets whose prototypes are used equally over the batch (Sinkhorn-Knopp)."""
    q = torch.exp((scores - scores.max()) / temp).T  # (K, B)
    q /= q.sum()
    k, b = q.shape
    for _ in range(iterations):
        q /= q.sum(dim=1, keepdim=True) * k
        q /= q.sum(dim=0, keepdim=True) * b
    return (q * b).T


@torch.no_grad()
def ema_update(teacher: torch.nn.Module, student: torch.nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter."""
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.lerp_(s, 1 - momentum)


def dino_loss(student: torch.Tensor, targets: torch.Tensor, n_global: int) -> torch.Tensor:
    """Mean cross-entropy of each student view's softmax against the teacher's target of every other global view.

    student: (V * B, K) cosines of V views, the first n_global of them the global ones; targets: (n_global * B, K)."""
    b = targets.shape[0] // n_global
    logp = F.log_softmax(student / STUDENT_TEMP, dim=-1).split(b)
    terms = [-(q * lp).sum(-1).mean() for i, q in enumerate(targets.split(b)) for v, lp in enumerate(logp) if v != i]
    return torch.stack(terms).mean()


class DinoTraining:
    """The student, its EMA teacher and the optimiser; `step` is one update on a batch of pictures."""

    def __init__(self, steps: int, seed: int, local_views: int = 4, lr: float = 1e-3):
        torch.manual_seed(seed)
        self.gen = torch.Generator().manual_seed(seed)
        self.student = Dino(new_encoder()).train()
        self.teacher = copy.deepcopy(self.student).eval().requires_grad_(False)
        self.opt = torch.optim.AdamW(self.student.parameters(), lr=lr, weight_decay=0.04)
        self.steps, self.local_views, self.lr = steps, local_views, lr
        self.done = 0

    def step(self, x: torch.Tensor) -> float:
        """One update on (B, 3, 32, 32) pictures in [-1, 1]: 2 global views for the teacher, those and the local
        views for the student; then the teacher moves toward the student. Returns the loss."""
        _set_lr(self.opt, _lr(self.done, self.steps, self.lr, warmup=min(200, self.steps // 10)))
        glob = torch.cat([random_crops(x, SIZE, GLOBAL_SCALE, self.gen) for _ in range(2)])
        with torch.no_grad():
            targets = torch.cat([sinkhorn(t, TEACHER_TEMP) for t in self.teacher(glob).chunk(2)])
        out = [self.student(glob)]
        if self.local_views:
            crops = [random_crops(x, LOCAL_SIZE, LOCAL_SCALE, self.gen) for _ in range(self.local_views)]
            out.append(self.student(torch.cat(crops)))
        loss = dino_loss(torch.cat(out), targets, n_global=2)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.student.parameters(), 3.0)
        self.opt.step()
        ema_update(self.teacher, self.student, self.momentum())
        self.done += 1
        return float(loss.detach())

    def momentum(self) -> float:
        """The teacher's EMA momentum at the current step: from 0.99 up to 1 along a cosine, as in DINO."""
        return 1 - 0.01 * 0.5 * (1 + math.cos(math.pi * self.done / max(1, self.steps)))


def train_dino(
    data: Dataset, steps: int, seed: int, tick: Tick, batch: int = 64, local_views: int = 4, lr: float = 1e-3
) -> tuple[ViTModel, ViTImageProcessor]:
    """Self-distillation on `data`'s pictures (no captions, no labels); returns the teacher's encoder, which DINO
    keeps, and its image processor (save both with `save_pretrained` for `DinoEvaluator.load`)."""
    rng = np.random.default_rng(seed)
    run = DinoTraining(steps, seed, local_views, lr)
    for _ in range(steps):
        run.step(data.batch(rng.integers(len(data.scenes), size=batch)))
        tick(1)
    return run.teacher.encoder.eval(), image_processor()
