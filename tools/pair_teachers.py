"""Which composition teacher for Step 2's pair prompts (issue 15 item 2): generate each pair's images with

  sum      both experts at full weight on every layer and token (what `lookup` does),
  span     both at full weight, each expert's cross-attention key/value update only at its own tokens (Step 2's
           teacher, `fl2t.consolidate.pairs`),
  routed   each expert's prediction (alone, full weight) where its own tokens' cross-attention falls, the base
           model's elsewhere: per pixel eps_base + sum_g M_g (eps_g - eps_base), M_g the attention mass on g's tokens
           (mean over cross-attention layers and heads, upsampled to the latent, divided by its maximum; where
           M_a + M_b > 1 both are scaled to sum to 1),

through one DDIM loop with classifier-free guidance (the unconditional prediction is the base model's for routed,
the armed UNet's for sum and span, as the samplers do; routed by `fl2t.consolidate.pairs.routed_prediction`), and
score them as the benchmark's multi-concept score:
nIA against each concept's references (normalised by the references' own IA), and the smaller of the two.

    python tools/pair_teachers.py LIBRARY CONCEPTS_DIR [N_IMAGES]

LIBRARY: a library of world experts (e.g. a benchmark's shared `experts/`), CONCEPTS_DIR: the world concept folders
(a benchmark's `concepts/`). Prints per pair and teacher the mean, and the paired difference with a 95% bootstrap.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from fl2t.consolidate.common import canonical
from fl2t.consolidate.pairs import AttentionProbe, routed_prediction
from fl2t.data import load_concept
from fl2t.fusion import AggregatedLoRA, stack_experts
from fl2t.library import Library
from fl2t.metrics import ClipEvaluator, image_alignments, reference_alignment
from fl2t.pipeline import ExpertPipeline
from fl2t.span import SpanKV, prompt_ids
from fl2t.world import evaluator_path

STEPS, GUIDANCE = 25, 5.0


@torch.no_grad()
def generate(pipe, agg, span_kv, probe, prompt, ids, G, pair, teacher, seed):
    sched = pipe.scheduler
    sched.set_timesteps(STEPS)
    cond = pipe.encode_prompt(prompt, "cpu", 1, False)[0]
    uncond = pipe.encode_prompt("", "cpu", 1, False)[0]
    size = pipe.unet.config.sample_size
    x = torch.randn((1, pipe.unet.config.in_channels, size, size), generator=torch.Generator().manual_seed(seed))
    x = x * sched.init_noise_sigma
    both = torch.zeros(1, len(agg.stack.modules), G)
    both[..., list(pair)] = 1.0
    spans = span_kv.spans(ids)  # (1, G, T)
    for t in sched.timesteps:
        xi = sched.scale_model_input(x, t)
        if teacher in ("sum", "span"):
            rest = span_kv.arm(ids, both, guided=True) if teacher == "span" else both
            agg.set(rest)
            e = pipe.unet(torch.cat([xi, xi]), t, torch.cat([uncond, cond])).sample
            agg.off()
            span_kv.off()
            eu, ec = e.chunk(2)
        else:
            eu = pipe.unet(xi, t, uncond).sample
            ec = routed_prediction(pipe.unet, agg, probe, xi, t, cond, spans, [pair])
        x = sched.step(eu + GUIDANCE * (ec - eu), t, x).prev_sample
    image = pipe.vae.decode(x / pipe.vae.config.scaling_factor).sample
    return pipe.image_processor.postprocess(image, output_type="pil")[0]


def main(library: str, concepts_dir: str, n: int = 16) -> None:
    torch.set_num_threads(1)
    lib = Library(library)
    experts = canonical(lib.experts())
    pipe, _ = ExpertPipeline.for_library(lib)
    for e in experts:
        pipe.add_expert_tokens(e)
    pipe.set_progress_bar_config(disable=True)
    stack = stack_experts(experts, pipe.unet)
    agg = AggregatedLoRA(pipe.unet, stack)
    span_kv = SpanKV(pipe.unet, stack, [pipe.tokenizer.convert_tokens_to_ids(e.spec.tokens) for e in experts])
    probe = AttentionProbe(pipe.unet)
    clip = ClipEvaluator.load(evaluator_path())
    refs = {e.name: clip.image_embeds(load_concept(f"{concepts_dir}/{e.name}").images) for e in experts}
    ref_ia = {k: reference_alignment(v) for k, v in refs.items()}
    names = [e.name for e in experts]
    objects = [g for g, e in enumerate(experts) if e.spec.kind == "object"]
    styles = [g for g, e in enumerate(experts) if e.spec.kind == "style"]
    pairs = [(a, b) for i, a in enumerate(objects) for b in objects[i + 1 :]] + [
        (a, s) for a in objects for s in styles
    ]
    rng = np.random.default_rng(0)
    for a, b in pairs:
        ea, eb = experts[a], experts[b]
        template = "a {} in the style of {}" if eb.spec.kind == "style" else "a {} and a {}"
        prompt = template.format(ea.spec.subject, eb.spec.subject)
        ids = prompt_ids(pipe.tokenizer, [prompt])
        scores = {}
        for teacher in ("sum", "span", "routed"):
            images = [
                generate(pipe, agg, span_kv, probe, prompt, ids, len(experts), (a, b), teacher, 90_000 + i)
                for i in range(n)
            ]
            emb = clip.image_embeds(images)
            na = image_alignments(emb, refs[ea.name]) / ref_ia[ea.name]
            nb = image_alignments(emb, refs[eb.name]) / ref_ia[eb.name]
            scores[teacher] = (0.5 * (na + nb)).numpy(), torch.minimum(na, nb).numpy()
            images[0].resize((96, 96)).save(f"/tmp/pair_{names[a]}_{names[b]}_{teacher}.png")
        print(f"\n{prompt}")
        for teacher, (mean, low) in scores.items():
            line = f"  {teacher:7s} nIA {mean.mean():.3f}  min of the two {low.mean():.3f}"
            if teacher != "span":
                for label, k in (("nIA", 0), ("min", 1)):
                    d = scores[teacher][k] - scores["span"][k]
                    boot = [d[rng.integers(0, n, n)].mean() for _ in range(2000)]
                    line += f"  {label} - span {d.mean():+.3f} ({np.quantile(boot, 0.025):+.3f} to {np.quantile(boot, 0.975):+.3f})"
            print(line)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *(int(x) for x in sys.argv[3:]))
