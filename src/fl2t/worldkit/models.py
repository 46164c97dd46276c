"""The tiny world's model shapes: a Stable-Diffusion-style pipeline and a CLIP evaluator, small enough to
train from scratch on 2 CPU cores. Only configs live here; `train.py` trains them.

Sizes were chosen by measurement on 2 cores (batch 64): the UNet at 16x16 latents with channels
(64, 96, 96), cross-attention at 8x8 and 4x4 only, takes 0.9 s per step; attention at 16x16 as well
doubles that. The VAE (32x32x3 -> 16x16x4) with channels (16, 32) is a small share of the build.
"""

from __future__ import annotations

from typing import Any

from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTextConfig, CLIPTextModel

from fl2t.models import clip_text_config
from fl2t.world.generator import SIZE

TEXT_WIDTH = 64  # the text encoders' hidden size; the 49408-row token table dominates their size
LATENT_SIZE = SIZE // 2

# Zero terminal SNR with v-prediction and trailing spacing: sampling starts from pure noise, which the
# tiny model's colours depend on (issue 3: the default cosine schedule returned noise).
SCHEDULE = dict(
    num_train_timesteps=1000,
    beta_schedule="squaredcos_cap_v2",
    prediction_type="v_prediction",
    rescale_betas_zero_snr=True,
    timestep_spacing="trailing",
    clip_sample=False,
)


def text_config(layers: int = 2) -> CLIPTextConfig:
    return clip_text_config(
        hidden_size=TEXT_WIDTH,
        intermediate_size=4 * TEXT_WIDTH,
        num_hidden_layers=layers,
        num_attention_heads=4,
        projection_dim=TEXT_WIDTH,
    )


def new_vae(**overrides: Any) -> AutoencoderKL:
    """32x32x3 <-> 16x16x4; `overrides`: other AutoencoderKL arguments (an experiment's, e.g. wider blocks)."""
    config = {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D", "DownEncoderBlock2D"),
        "up_block_types": ("UpDecoderBlock2D", "UpDecoderBlock2D"),
        "block_out_channels": (16, 32),
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 8,
        "sample_size": SIZE,
        "mid_block_add_attention": False,
    }
    return AutoencoderKL(**{**config, **overrides})


def new_unet(latent_size: int = LATENT_SIZE, transformer_layers: int = 1) -> UNet2DConditionModel:
    """The base UNet for latents of `latent_size` (half the picture's side: 16 for the 32 px world, 24 for 48 px),
    with `transformer_layers` attention layers in each cross-attention block."""
    return UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(64, 96, 96),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=4,  # diffusers reads this as the number of heads
        norm_num_groups=16,
        transformer_layers_per_block=transformer_layers,
    )


def new_text_encoder(layers: int = 2) -> CLIPTextModel:
    return CLIPTextModel(text_config(layers=layers))


def train_scheduler() -> DDPMScheduler:
    return DDPMScheduler(**SCHEDULE)


def sample_scheduler() -> DDIMScheduler:
    """The pipeline's scheduler: deterministic DDIM on the same zero-terminal-SNR schedule."""
    return DDIMScheduler(**SCHEDULE, set_alpha_to_one=False)


# The image towers' shape (the evaluator's CLIP, the DINO-like encoder): a ViT on 4x4 patches of the 32x32 picture.
VISION = dict(
    image_size=SIZE,
    patch_size=4,
    hidden_size=96,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_channels=3,
)


def new_evaluator() -> CLIPModel:
    """A tiny CLIP: ViT on 4x4 patches of the 32x32 image, and a 2-layer text tower."""
    config = CLIPConfig(text_config=text_config(layers=2).to_dict(), vision_config=VISION, projection_dim=64)
    return CLIPModel(config)


def image_processor() -> CLIPImageProcessor:
    """Resize to 32x32 and map [0, 255] to [-1, 1], the evaluator's training input."""
    return CLIPImageProcessor(
        do_resize=True,
        size={"shortest_edge": SIZE},
        do_center_crop=True,
        crop_size={"height": SIZE, "width": SIZE},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_convert_rgb=True,
    )
