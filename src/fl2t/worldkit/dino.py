"""A DINO-like image-only encoder for the tiny world (issue 14): the field's DINO score needs one, and the world's
pictures are far from what facebook/dino-vits16 saw.

Self-distillation without labels (Caron et al. 2021): a student ViT and a teacher ViT (the EMA of the student) each
put a projection head over K prototypes on the CLS token; the teacher's softmax over the prototypes of one view is
the target of the student's softmax of every other view. The teacher's targets are balanced by Sinkhorn-Knopp
(as in SwAV and DINOv2) instead of centering: on a few thousand steps of a small world it cannot collapse onto one
prototype.

The augmentations decide what the features ignore. An earlier attempt used DINO's colour jitter, blur and solarize,
and its features became blind to exactly what a style (outline, pastel's washed-out colours on cream, mosaic's 4x4
blocks) or an object concept's colours are. Here the views are random resized crops (2 global views at 0.5-1.0 of
the area, a few local ones at 0.2-0.5 resized to 16x16) and horizontal flips: a view shows no colour its picture
does not have, up to the blend of neighbouring pixels bilinear resampling makes. Two colour changes are made, each
per view before its crop. A grey background may be swapped for another grey (`swap_background`): with crops alone
every view shows the background, which made it the features' easiest invariant (fresh renders nearest their own
concept's references 0.21 after 500 steps, 0.62 with the swap); no concept is a background, and pastel's cream one
is kept. A fifth of the views have their RGB channels permuted (`permute_channels`), which keeps the rendering and
a pattern's layout but not the hue, so that colour dominates the features less (0.69 after 1200 steps, pastel 0.0 ->
1.0; object concepts' colour pairs are still told apart). Measured with tools/world_dino_check.py; outline and mosaic
are still 0.0 there: their fresh renders are nearest an object concept of the same colour or shape (issue 14).

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
from fl2t.worldkit import models
from fl2t.worldkit.train import Dataset, Tick, _lr, _set_lr

LOCAL_SIZE = 16  # side of the local views (4x4 patches; the position embeddings are interpolated)
GLOBAL_SCALE = (0.5, 1.0)  # share of the picture's area a global view shows
LOCAL_SCALE = (0.2, 0.5)
PROTOTYPES = 512
STUDENT_TEMP = 0.1
TEACHER_TEMP = 0.05


def new_encoder(mask_token: bool = False) -> ViTModel:
    """A ViT on 4x4 patches of the 32x32 picture, the size of the world's CLIP image tower; `mask_token`: with the
    learned token that stands in for masked patches (the patch objective's student)."""
    config = ViTConfig(**models.VISION, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return ViTModel(config, use_mask_token=mask_token)


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
    """Encoder and heads (the CLS token's, and with `patch_head` the patch tokens' own, as iBOT); the student and
    (as its EMA) the teacher."""

    def __init__(self, encoder: ViTModel, patch_head: bool = False):
        super().__init__()
        self.encoder = encoder
        self.head = Head(encoder.config.hidden_size)
        self.patch_head = Head(encoder.config.hidden_size) if patch_head else None

    def forward(
        self, views: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, 3, s, s) views in [-1, 1], optionally (B, P) masked patches -> (B, K) prototype cosines of the CLS
        tokens and, with a patch head, (B, P, K) of the patch tokens."""
        out = self.encoder(pixel_values=views, bool_masked_pos=mask, interpolate_pos_encoding=views.shape[-1] != SIZE)
        h = out.last_hidden_state
        return self.head(h[:, 0]), self.patch_head(h[:, 1:]) if self.patch_head is not None else None


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


def swap_background(x: torch.Tensor, gen: torch.Generator, p: float = 0.8, tol: float = 0.04) -> torch.Tensor:
    """(B, 3, H, W) pictures in [-1, 1] with, for a share `p` of them, a grey background replaced by a random grey.

    The background is the median colour of the picture's border; only a grey one (all channels equal within `tol`)
    is swapped, so pastel's cream stays, and only the pixels of that exact colour change: an object's colours and
    rendering are untouched. Crops alone keep the background in every view, which made it the feature's easiest
    invariant; a view's background differing from the other views' makes the features ignore it, as no concept is a
    background."""
    border = torch.cat([x[:, :, 0], x[:, :, -1], x[:, :, :, 0], x[:, :, :, -1]], dim=-1)  # (B, 3, 4W)
    bg = border.median(dim=-1).values  # (B, 3)
    grey = (bg.max(dim=1).values - bg.min(dim=1).values) < tol
    swap = grey & (torch.rand(x.shape[0], generator=gen) < p)
    mask = ((x - bg[:, :, None, None]).abs().amax(dim=1, keepdim=True) < tol) & swap[:, None, None, None]
    new = (torch.rand(x.shape[0], 1, 1, 1, generator=gen) * 2 - 1).expand(-1, 3, -1, -1)
    return torch.where(mask, new.expand_as(x), x)


_PERMUTATIONS = torch.tensor([[0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]])


def permute_channels(x: torch.Tensor, gen: torch.Generator, p: float) -> torch.Tensor:
    """(B, 3, H, W) pictures with, for a share `p` of them, the RGB channels in another order: hue changes, the
    rendering (outline, washed-out pastel, mosaic blocks, a pattern's layout) does not."""
    if p <= 0:
        return x
    which = torch.randint(len(_PERMUTATIONS), (x.shape[0],), generator=gen)
    order = torch.where((torch.rand(x.shape[0], generator=gen) < p)[:, None], _PERMUTATIONS[which], torch.arange(3))
    return torch.gather(x, 1, order[:, :, None, None].expand_as(x))


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


def masked_patch_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """iBOT's objective: at each masked patch, the student's softmax against the teacher's balanced target for the
    same patch unmasked. student, teacher: (B, P, K) cosines; mask: (B, P)."""
    targets = sinkhorn(teacher.flatten(0, 1), TEACHER_TEMP).view_as(teacher)
    logp = F.log_softmax(student / STUDENT_TEMP, dim=-1)
    return -(targets * logp).sum(-1)[mask].mean()


def dino_loss(student: torch.Tensor, targets: torch.Tensor, n_global: int) -> torch.Tensor:
    """Mean cross-entropy of each student view's softmax against the teacher's target of every other global view.

    student: (V * B, K) cosines of V views, the first n_global of them the global ones; targets: (n_global * B, K)."""
    b = targets.shape[0] // n_global
    logp = F.log_softmax(student / STUDENT_TEMP, dim=-1).split(b)
    terms = [-(q * lp).sum(-1).mean() for i, q in enumerate(targets.split(b)) for v, lp in enumerate(logp) if v != i]
    return torch.stack(terms).mean()


class DinoTraining:
    """The student, its EMA teacher and the optimiser; `step` is one update on a batch of pictures."""

    def __init__(
        self,
        steps: int,
        seed: int,
        local_views: int = 2,
        lr: float = 1e-3,
        background_swap: bool = True,
        channel_permute: float = 0.2,
        patch_loss: float = 0.0,
    ):
        torch.manual_seed(seed)
        self.gen = torch.Generator().manual_seed(seed)
        self.student = Dino(new_encoder(mask_token=patch_loss > 0), patch_head=patch_loss > 0).train()
        self.teacher = copy.deepcopy(self.student).eval().requires_grad_(False)
        self.opt = torch.optim.AdamW(self.student.parameters(), lr=lr, weight_decay=0.04)
        self.steps, self.local_views, self.lr = steps, local_views, lr
        self.background_swap, self.channel_permute, self.patch_loss = background_swap, channel_permute, patch_loss
        self.done = 0

    def step(self, x: torch.Tensor) -> float:
        """One update on (B, 3, 32, 32) pictures in [-1, 1]: 2 global views for the teacher, those and the local
        views for the student; then the teacher moves toward the student. Returns the loss."""
        _set_lr(self.opt, _lr(self.done, self.steps, self.lr, warmup=min(200, self.steps // 10)))
        glob = torch.cat([random_crops(self.swap(x), SIZE, GLOBAL_SCALE, self.gen) for _ in range(2)])
        with torch.no_grad():
            teacher_cls, teacher_patches = self.teacher(glob)
            targets = torch.cat([sinkhorn(t, TEACHER_TEMP) for t in teacher_cls.chunk(2)])
        mask = self.masks(len(glob)) if self.patch_loss else None
        student_cls, student_patches = self.student(glob, mask)
        out = [student_cls]
        if self.local_views:
            crops = [random_crops(self.swap(x), LOCAL_SIZE, LOCAL_SCALE, self.gen) for _ in range(self.local_views)]
            out.append(self.student(torch.cat(crops))[0])
        loss = dino_loss(torch.cat(out), targets, n_global=2)
        if mask is not None:
            loss = loss + self.patch_loss * masked_patch_loss(student_patches, teacher_patches, mask)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.student.parameters(), 3.0)
        self.opt.step()
        ema_update(self.teacher, self.student, self.momentum())
        self.done += 1
        return float(loss.detach())

    def masks(self, n: int) -> torch.Tensor:
        """(n, P) patches to mask, each picture a share drawn from [0.1, 0.5] of its patches (iBOT's range)."""
        p = self.student.encoder.embeddings.patch_embeddings.num_patches
        return torch.rand(n, p, generator=self.gen) < 0.1 + 0.4 * torch.rand(n, 1, generator=self.gen)

    def encoder(self) -> ViTModel:
        """The teacher's encoder, which DINO keeps, without the student's mask token (it is never used to read)."""
        encoder = copy.deepcopy(self.teacher.encoder).eval()
        encoder.embeddings.mask_token = None
        return encoder

    def swap(self, x: torch.Tensor) -> torch.Tensor:
        """A view's colour changes before its crop: a swapped grey background, permuted channels (each optional)."""
        x = swap_background(x, self.gen) if self.background_swap else x
        return permute_channels(x, self.gen, self.channel_permute)

    def momentum(self) -> float:
        """The teacher's EMA momentum at the current step: from 0.99 up to 1 along a cosine, as in DINO."""
        return 1 - 0.01 * 0.5 * (1 + math.cos(math.pi * self.done / max(1, self.steps)))


def train_dino(
    data: Dataset,
    steps: int,
    seed: int,
    tick: Tick,
    batch: int = 32,
    local_views: int = 2,
    lr: float = 1e-3,
    channel_permute: float = 0.2,
    patch_loss: float = 0.0,
) -> tuple[ViTModel, ViTImageProcessor]:
    """Self-distillation on `data`'s pictures (no captions, no labels); returns the teacher's encoder, which DINO
    keeps, and its image processor (save both with `save_pretrained` for `DinoEvaluator.load`)."""
    rng = np.random.default_rng(seed)
    run = DinoTraining(steps, seed, local_views, lr, channel_permute=channel_permute, patch_loss=patch_loss)
    for _ in range(steps):
        run.step(data.batch(rng.integers(len(data.scenes), size=batch)))
        tick(1)
    return run.encoder(), image_processor()
