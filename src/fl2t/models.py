"""Loading base pipelines: a hub id or a local diffusers folder, and random-init builders for tests and benches.

Weights are read from safetensors only (`use_safetensors=True`); a folder that holds only pickles is refused.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, SchedulerMixin, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils import logging as diffusers_logging
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
from transformers.utils import logging as transformers_logging

from fl2t.errors import Fl2tError

ASSETS = Path(__file__).parent / "assets"


TOKENIZER_DIR = ASSETS / "clip_tokenizer"


def clip_tokenizer() -> CLIPTokenizer:
    """The real CLIP BPE tokenizer (vocabulary from the open_clip_torch wheel, see tools/make_clip_tokenizer.py),
    for every model fl2t builds: the tiny world's, the random-init test and bench pipelines.

    transformers 5 names the arguments `vocab`/`merges`; the old `vocab_file`/`merges_file` keywords are
    silently ignored there and give a 2-token tokenizer."""
    return CLIPTokenizer(
        vocab=str(TOKENIZER_DIR / "vocab.json"), merges=str(TOKENIZER_DIR / "merges.txt"), model_max_length=77
    )


WORLD_BASE = "fl2t:world"  # the built-in tiny world's base model, by name: a library made on it is portable


def _world_base_dir() -> Path:
    from fl2t.world import WEIGHTS_DIR

    return WEIGHTS_DIR / "base"


def default_base() -> str | None:
    """The base model used when neither --base nor a library names one: the tiny world's ("fl2t:world"), when
    shipped."""
    return WORLD_BASE if (_world_base_dir() / "model_index.json").is_file() else None


def base_name(base: str | Path) -> str:
    """How a library records a base model: the built-in world's weights by name ("fl2t:world"), wherever fl2t is
    installed (a path ending in fl2t/world/weights/base, as older libraries recorded it, included); else as given."""
    text = str(base)
    if text == WORLD_BASE or Path(text).as_posix().rstrip("/").endswith("fl2t/world/weights/base"):
        return WORLD_BASE
    return text


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def load_base(
    base: str | Path, *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> StableDiffusionPipeline:
    """Load a Stable Diffusion pipeline from a local diffusers folder, a hub id, or "fl2t:world" (the built-in
    tiny world's), safetensors weights only."""
    if base_name(base) == WORLD_BASE:
        if not (_world_base_dir() / "model_index.json").is_file():
            raise Fl2tError(
                f"--base {base}: the tiny world's weights are not installed; build them with `fl2t world build`"
            )
        base = _world_base_dir()
    path = Path(base).expanduser()
    if path.is_file():
        kind = "a pickled checkpoint" if path.suffix.lower() in PICKLE_SUFFIXES else "a file"
        raise Fl2tError(
            f"--base {base}: is {kind}, not a diffusers pipeline folder; fl2t loads only diffusers folders with "
            "safetensors weights (convert it with diffusers' from_single_file(...).save_pretrained(folder))"
        )
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise Fl2tError(f"--base {base}: not a diffusers pipeline folder (no model_index.json in it)")
        _refuse_pickled_only(path, str(base))
        source = str(path.resolve())
    elif str(base).startswith((".", "/", "~")) or str(base).count("/") != 1:
        raise Fl2tError(f"--base {base}: no such folder, and not a hub id of the form owner/name")
    else:
        source = str(base)
    # Loading bars of diffusers/transformers would interleave with ours, and their error logs would add lines
    # to our one-line error.
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    levels = diffusers_logging.get_verbosity(), transformers_logging.get_verbosity()
    diffusers_logging.set_verbosity(diffusers_logging.CRITICAL)
    transformers_logging.set_verbosity(transformers_logging.CRITICAL)
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            source,
            dtype=dtype,
            use_safetensors=True,
            safety_checker=None,
            requires_safety_checker=False,
        )
    except Exception as e:  # diffusers raises many types for missing files, offline hubs, pickles
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise Fl2tError(f"--base {base}: could not load the pipeline with safetensors weights ({first})") from None
    finally:
        diffusers_logging.set_verbosity(levels[0])
        transformers_logging.set_verbosity(levels[1])
    pipe.set_progress_bar_config(disable=True)
    if device is not None:
        pipe.to(device)
    return pipe


def _refuse_pickled_only(folder: Path, base: str) -> None:
    """A component folder whose weights are only pickles cannot be loaded: say so (unpickling runs code)."""
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = [p for p in sub.iterdir() if p.is_file()]
        pickles = [p for p in files if p.suffix.lower() in PICKLE_SUFFIXES]
        if pickles and not any(p.suffix == ".safetensors" for p in files):
            raise Fl2tError(
                f"--base {base}: {sub.name}/{pickles[0].name} holds pickled weights, and fl2t loads only safetensors "
                "(unpickling can run arbitrary code); convert the pipeline with "
                "save_pretrained(folder, safe_serialization=True) in a trusted environment"
            )


def base_config_hash(pipe: StableDiffusionPipeline) -> str:
    """A hash of the architecture (configs of UNet, text encoder, VAE and the vocabulary size), not of the weights."""

    def clean(cfg: dict) -> dict:
        return {k: v for k, v in dict(cfg).items() if not k.startswith("_")}

    blob = {
        "unet": clean(pipe.unet.config),
        "vae": clean(pipe.vae.config),
        "text_encoder": clean(pipe.text_encoder.config.to_dict()),
    }
    for k in ("transformers_version", "architectures", "torch_dtype", "dtype", "_name_or_path", "vocab_size"):
        blob["text_encoder"].pop(k, None)
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]


def build_pipeline(
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    scheduler: SchedulerMixin | None = None,
) -> StableDiffusionPipeline:
    """A Stable Diffusion pipeline from its parts, with fl2t's CLIP tokenizer; SD 1.5's DDPM schedule by default."""
    scheduler = scheduler or DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def clip_text_config(**kw: object) -> CLIPTextConfig:
    """CLIP's text-tower config with the real vocabulary and special tokens; sizes from `kw`.
    Pooling is at the first end-of-text token, as real CLIP does with its tokenizer's ids."""
    return CLIPTextConfig(
        vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, **kw
    )


def tiny_random_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """A random-init SD-architecture pipeline small enough for CPU tests: 32x32 images, 16x16x4 latents."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=16,
        sample_size=32,
    )
    text_encoder = CLIPTextModel(
        clip_text_config(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_dim=32
        )
    )
    return build_pipeline(unet, vae, text_encoder)


def sd15_random_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32) -> StableDiffusionPipeline:
    """The Stable Diffusion 1.5 architecture from its public configs, random init (nothing downloaded)."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768,
        attention_head_dim=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=2,
        sample_size=512,
    )
    text_encoder = CLIPTextModel(
        clip_text_config(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            projection_dim=768,
            hidden_act="quick_gelu",
        )
    )
    pipe = build_pipeline(unet, vae, text_encoder)
    return pipe.to(dtype=dtype)


def resolution_of(pipe: StableDiffusionPipeline) -> int:
    """The native image size of a pipeline (512 for SD 1.5)."""
    return int(pipe.unet.config.sample_size) * pipe.vae_scale_factor
