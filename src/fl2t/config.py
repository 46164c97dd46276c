"""Typed settings. A YAML `--config` holds sections (`learn:`); command-line flags override the file."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fl2t.errors import Fl2tError


class LearnSettings(BaseModel):
    """Step 1: learning one concept expert (DESIGN §3)."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(400, ge=1, description="optimisation steps")
    lr: float = Field(5e-4, gt=0, description="learning rate of the UNet LoRA")
    embedding_lr: float = Field(1e-3, ge=0, description="learning rate of the concept token embeddings")
    embedding_norm_limit: float | None = Field(
        None,
        gt=0,
        description="the concept token embeddings stop training once their mean L2 norm reaches this, so the LoRA "
        "carries the concept (ED-LoRA's rule: Mix-of-Show and CIDM stop at 0.55 on SD 1.5); None: never",
    )
    rank: int = Field(4, ge=1, le=256, description="LoRA rank r")
    lora_attention: Literal["all", "cross", "self"] = Field(
        "all", description="which attention blocks get LoRA: all, cross (attn2 only, as CIDM) or self (attn1)"
    )
    lora_targets: list[str] = Field(["to_q", "to_k", "to_v", "to_out.0"], min_length=1)
    layerwise: bool = Field(False, description="one token embedding per cross-attention layer (ED-LoRA)")
    batch_size: int = Field(1, ge=1)
    resolution: int | None = Field(None, ge=8, description="training image size; default: the base model's")
    seed: int = 0
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    weight_decay: float = Field(0.01, ge=0)
    noise_offset: float = Field(0.0, ge=0)
    flip: bool = Field(False, description="random horizontal flips of the reference images")
    checkpoint_every: int = Field(
        100, ge=0, description="save the training state every N steps for --resume (0: never)"
    )
    min_images: int = Field(3, ge=1, description="fewest reference images a concept may have")
    prior_preservation: bool = Field(False, description="DreamBooth prior preservation with base-model class images")
    num_class_images: int = Field(8, ge=1)
    prior_weight: float = Field(1.0, ge=0)
    num_anchors: int = Field(8, ge=0, description="synthetic anchor latents the expert generates for Step 2")
    anchor_steps: int = Field(25, ge=1, description="denoising steps for the synthetic anchors")
    anchor_guidance: float = Field(7.5, ge=0)


class ConsolidateSettings(BaseModel):
    """Step 2: consolidating the set of experts with proxies and a set-invariant decoder (DESIGN §3)."""

    model_config = ConfigDict(extra="forbid")

    relevance: Literal["lookup", "learned"] = Field(
        "lookup",
        description="how a prompt weighs the experts: 'lookup', every concept whose tokens the prompt contains at full "
        "weight and every other at 0, nothing trained; 'learned', the proxies, decoder and relevance heads trained "
        "below (the paper's Step 2). The lookup is the default: on world v2 the learned Step 2 moved no single-concept "
        "metric and no presence of two concepts beyond its interval, at twice the compute (BENCHMARKS.md, ablation)",
    )
    steps: int = Field(300, ge=1)
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(4, ge=1, description="prompts per step")
    decoder_layers: int = Field(2, ge=1, description="N: self-attention, cross-attention and MLP blocks")
    heads: int = Field(4, ge=1, description="attention heads of the decoder")
    mlp_ratio: int = Field(2, ge=1)
    gates: bool = Field(
        False,
        description="per-rank-component feature-selection gates gamma (off by default: on, they lowered final nIA by "
        "0.015 (0.002 to 0.034) in the pairs3 ablation, BENCHMARKS.md)",
    )
    shared: bool = Field(
        False,
        description="a shared LoRA per layer, trained in Step 2 ('learning together'; off by default: on, it lowered the "
        "pair score by 0.023 (0.002 to 0.047) in the pairs3 ablation, BENCHMARKS.md)",
    )
    shared_rank: int = Field(2, ge=1)
    contrastive: bool = Field(
        False,
        description="InfoNCE between pooled prompt states and decoded proxies (off by default: no metric moved beyond "
        "its interval in the pairs3 ablation, BENCHMARKS.md)",
    )
    proxy_attention: bool = Field(
        False,
        description="self-attention among the proxies (off by default: no metric moved beyond its interval in the "
        "pairs3 ablation, BENCHMARKS.md)",
    )
    lambda_base: float = Field(0.5, ge=0, description="weight of matching the base model on prompts naming no concept")
    lambda_con: float = Field(0.1, ge=0, description="weight of the contrastive term")
    temperature: float = Field(0.1, gt=0)
    lambda_route: float = Field(
        1.0,
        ge=0,
        description="weight of the routing term: cross-entropy of the relevance (mean over layers, with 'none') against "
        "the concepts a training prompt names ('none' for prompts naming none); 0 switches it off",
    )
    route_margin: float = Field(
        4.0,
        gt=0,
        description="at the start a prompt gives each concept it names the weight 1/(1 + e^-margin) and every other "
        "1/(1 + e^margin), on every layer (the relevance heads learn from there)",
    )
    route_batch: int = Field(
        32, ge=0, description="extra prompts per step for the relevance heads alone (decoder only, no UNet pass)"
    )
    base_share: float = Field(0.25, ge=0, le=1, description="share of each batch with prompts naming no concept")
    pair_share: float = Field(
        0.0,
        ge=0,
        le=1,
        description="share of each batch with two-concept prompts taught by the composition teacher (at least one "
        "per batch when above 0; off by default: on, with the span teacher, it lowered the pair score by 0.039 (0.008 "
        "to 0.070) in the pairs3 ablation, and the routed teacher's student was lower still, BENCHMARKS.md)",
    )
    lambda_pair: float = Field(1.0, ge=0, description="weight of matching the composition teacher on pair prompts")
    pairs_per_concept: int = Field(
        4, ge=0, description="pairs trained per concept (its partners of lowest pair hash; keeps Step 2 linear in G)"
    )
    pair_teacher: Literal["span", "routed"] = Field(
        "span",
        description="the composition teacher of pair prompts: both experts with keys/values restricted to their own "
        "tokens ('span'), or each expert where its tokens' cross-attention falls and the base elsewhere ('routed')",
    )
    pair_anchors: int = Field(4, ge=1, description="latents the composition teacher generates per trained pair")
    pair_anchor_steps: int = Field(25, ge=1, description="denoising steps for the pair anchors")
    pair_anchor_guidance: float = Field(7.5, ge=0)
    span: bool = Field(
        False,
        description="the named concepts' experts update the cross-attention keys and values of their own tokens only, "
        "in Step 2's student and at generation (fl2t.span)",
    )
    seed: int = Field(0, description="mixed with the set's hash; the same set and seed give the same model")

    @model_validator(mode="after")
    def _trained_parts_need_learning(self) -> ConsolidateSettings:
        trained = [k for k in ("gates", "shared", "contrastive", "proxy_attention") if getattr(self, k)]
        trained += ["pair_share"] if self.pair_share else []
        if self.relevance == "lookup" and trained:
            raise ValueError(
                f"{', '.join(trained)} belong(s) to the learned Step 2; set relevance: learned (--learned) to use them"
            )
        return self


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    learn: LearnSettings = LearnSettings()
    consolidate: ConsolidateSettings = ConsolidateSettings()


def load_settings(path: str | Path | None, **overrides: dict[str, Any]) -> Settings:
    """Settings from a YAML file (or defaults), with per-section overrides whose value is not None."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise Fl2tError(f"--config {p}: no such file")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise Fl2tError(f"--config {p}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise Fl2tError(f"--config {p}: expected a mapping with sections such as 'learn:'")
    for section, values in overrides.items():
        data.setdefault(section, {})
        if not isinstance(data[section], dict):
            raise Fl2tError(f"--config: section '{section}' must be a mapping")
        data[section].update({k: v for k, v in values.items() if v is not None})
    try:
        return Settings(**data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        msg = "unknown setting" if err["type"] == "extra_forbidden" else err["msg"]
        if err["type"] == "value_error":  # a rule across settings: its message names them
            raise Fl2tError(f"settings: {where}: {msg.removeprefix('Value error, ')}") from None
        raise Fl2tError(f"settings: {where}: {msg} (got {err.get('input')!r})") from None
