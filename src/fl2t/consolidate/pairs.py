"""Two concepts in one prompt: which pairs Step 2 trains, their prompts, and the composition teacher (DESIGN §3).

The teacher of a pair prompt is the base UNet with both experts at full weight, each expert's update on the
cross-attention keys and values restricted to its own tokens (`fl2t.span`: exact, since a text token's key and value
depend on that token alone), the other adapted layers carrying both updates. Its latents for a pair (the pair
anchors) are generated once and kept beside the consolidated model, as each expert keeps its own anchors.

Which pairs are trained, their prompts and their anchors' seeds derive from the two experts' content hashes alone:
adding a concept adds pairs and may displace a pair of a concept with more partners than `pairs_per_concept`, but
never reshuffles the others, and the library stays byte-identical across arrival orders.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch

from fl2t.config import ConsolidateSettings
from fl2t.expert import Expert
from fl2t.fusion import AggregatedLoRA, stack_experts
from fl2t.pipeline import ExpertPipeline
from fl2t.span import SpanKV, prompt_ids

# Per kind of pair, object first ({} are the subjects); a pair of two styles is not trained.
PAIR_TEMPLATES = {
    "object+object": ["a photo of a {} and a {}", "a {} and a {}", "a rendering of a {} next to a {}"],
    "object+style": [
        "a {} in the style of {}",
        "a photo of a {} in the style of {}",
        "a rendering of a {} in the style of {}",
    ],
}


@dataclass(frozen=True)
class Pair:
    """Two experts of the set (indices in canonical order, object first) and their prompts."""

    first: int
    second: int
    key: str  # sha256 of the two content hashes and the anchor settings: the pair anchors' cache key
    prompts: tuple[str, ...]  # one per pair anchor
    seed: int  # of the pair anchors' noise


def _pair_hash(a: Expert, b: Expert) -> str:
    return hashlib.sha256("".join(sorted((a.content_hash, b.content_hash))).encode()).hexdigest()


def trained_pairs(experts: list[Expert], settings: ConsolidateSettings) -> list[Pair]:
    """For each concept, its `pairs_per_concept` partners of lowest pair hash; the union, by pair hash."""
    chosen: dict[str, tuple[int, int]] = {}
    for g, e in enumerate(experts):
        partners = sorted(
            (_pair_hash(e, f), k) for k, f in enumerate(experts) if k != g and "object" in (e.spec.kind, f.spec.kind)
        )
        for h, k in partners[: settings.pairs_per_concept]:
            chosen[h] = (g, k)
    pairs = []
    for h in sorted(chosen):
        g, k = sorted(chosen[h], key=lambda i: (experts[i].spec.kind != "object", experts[i].content_hash))
        a, b = experts[g], experts[k]
        templates = PAIR_TEMPLATES[f"{a.spec.kind}+{b.spec.kind}"]
        prompts = tuple(
            templates[i % len(templates)].format(a.spec.subject, b.spec.subject) for i in range(settings.pair_anchors)
        )
        what = [h, settings.pair_anchors, settings.pair_anchor_steps, settings.pair_anchor_guidance, prompts]
        key = hashlib.sha256(json.dumps(what).encode()).hexdigest()
        pairs.append(Pair(g, k, key, prompts, int(h[:15], 16)))
    return pairs


class CompositionTeacher:
    """Arms `agg` and `span` so that the UNet predicts as each row's teacher: expert g alone (at full weight, on every
    token) for a row naming concept g, the base model for a row naming none, and for a pair row both experts at full
    weight with their key/value updates restricted to their own tokens."""

    def __init__(self, agg: AggregatedLoRA, span: SpanKV) -> None:
        self.agg, self.span = agg, span

    def arm(self, input_ids: torch.Tensor, named: torch.Tensor, pair_rows: torch.Tensor, guided: bool = False) -> None:
        """input_ids (B, T); named (B, G): 1 for each concept a row names; pair_rows (B,) bool."""
        L = len(self.agg.stack.modules)
        alpha = named.float()[:, None, :].expand(-1, L, -1).to(self.agg.device)
        where = named.bool() & pair_rows.bool()[:, None]
        self.agg.set(self.span.arm(input_ids, alpha, guided=guided, where=where))

    def off(self) -> None:
        self.agg.off()
        self.span.off()


@torch.no_grad()
def pair_anchors(
    pipe: ExpertPipeline, experts: tuple[Expert, Expert], pair: Pair, size: int, settings: ConsolidateSettings
) -> torch.Tensor:
    """(N, C, h, w): the latents the composition teacher of the two experts generates for the pair's prompts, seeded
    from the pair. Made with the pair's own two experts only, so the bytes do not depend on the rest of the set."""
    stack = stack_experts(list(experts), pipe.unet)
    teacher = CompositionTeacher(
        AggregatedLoRA(pipe.unet, stack),
        SpanKV(pipe.unet, stack, [pipe.tokenizer.convert_tokens_to_ids(e.spec.tokens) for e in experts]),
    )
    named = torch.ones(1, 2)
    latents = []
    try:
        for i, prompt in enumerate(pair.prompts):
            teacher.arm(prompt_ids(pipe.tokenizer, [prompt]), named, torch.ones(1, dtype=torch.bool), guided=True)
            try:
                out = pipe(
                    prompt,
                    height=size,
                    width=size,
                    num_inference_steps=settings.pair_anchor_steps,
                    guidance_scale=settings.pair_anchor_guidance,
                    generator=torch.Generator().manual_seed((pair.seed + i) % 2**63),
                    output_type="latent",
                )
            finally:
                teacher.off()
            latents.append(out.images.float().cpu())
    finally:
        teacher.agg.remove()
        teacher.span.remove()
    return torch.cat(latents)
