"""Per denoising step (one UNet call on the guidance batch), interleaved, against the base weights:
lookup (aggregated hooks), lookup+span (hooks + span K/V), fused (the same weights fused, as FL2TPipeline),
fused+span (the rest fused, span K/V hooks: FL2TPipeline with span), with the span K/V computed at that step
(first step of a prompt) or cached (every later step).

    OMP_NUM_THREADS=1 python tools/span_step_speed.py [REPEATS]   (the issue's note: REPEATS 60)
    BASE=/path/to/sd15 python tools/span_step_speed.py 20        (another base; on the GPU where CUDA is, in fp32)
"""

import json
import os
import sys

import torch

from fl2t.bench.measure import median, synthetic_experts, timed
from fl2t.fusion import AggregatedLoRA, stack_experts
from fl2t.models import base_config_hash, load_base
from fl2t.pipeline import ExpertPipeline
from fl2t.span import SpanKV, prompt_ids
from fl2t.world import base_path

repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 20
base = os.environ.get("BASE") or str(base_path())
device = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(0)
out = {}
for G in (2, 10):
    pipe = ExpertPipeline(**load_base(base).components, requires_safety_checker=False).to(device)
    experts = synthetic_experts(pipe, {"id": base, "config_hash": base_config_hash(pipe)}, G, 4, 0)
    for e in experts:
        pipe.add_expert_tokens(e)
    unet = pipe.unet
    stack = stack_experts(experts, unet)
    agg = AggregatedLoRA(unet, stack)
    span = SpanKV(unet, stack, [pipe.tokenizer.convert_tokens_to_ids(e.spec.tokens) for e in experts])
    prompt = f"a photo of {experts[0].spec.tokens[0]} ball next to {experts[1].spec.tokens[0]} box"
    ids = prompt_ids(pipe.tokenizer, [prompt])
    L = len(stack.modules)
    alpha = torch.zeros(1, L, G)
    alpha[:, :, :2] = 1.0  # lookup: the two named experts at weight 1
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(prompt, device, 1, True)
    states = torch.cat([uncond, cond])
    size = unet.config.sample_size
    latents = torch.randn(2, unet.config.in_channels, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    t = torch.full((2,), 500, device=device)

    @torch.no_grad()
    def step(unet=unet, latents=latents, t=t, states=states):
        unet(latents, t, states)

    names = ["base", "base (A/A)", "lookup", "lookup+span", "fused", "fused+span", "fused+span (uncached)"]
    times = {n: [] for n in names}
    warm = 3
    for rep in range(warm + repeats):
        order = names if rep % 2 == 0 else names[::-1]
        for n in order:
            if n == "lookup":
                agg.set(alpha)
            elif n == "lookup+span":
                agg.set(span.arm(ids, alpha))
                step()  # first step computes the span K/V; timed: a later step
            elif n == "fused":
                agg.fuse(alpha[0])
            elif n == "fused+span":
                agg.fuse(span.arm(ids, alpha)[0])
                step()
            elif n == "fused+span (uncached)":
                agg.fuse(span.arm(ids, alpha)[0])  # armed afresh: this step computes the span K/V
            try:
                took = timed(step)
            finally:
                agg.unfuse()
                agg.off()
                span.off()
            if rep >= warm:
                times[n].append(took)
    row = {
        n: {"median_ms": median(v) * 1e3, "ratio": median([a / b for a, b in zip(v, times["base"])])}
        for n, v in times.items()
    }
    out[G] = row
    print(
        f"G={G} (L={L} adapted layers, {len(span.rows)} key/value layers), {repeats} interleaved repeats, {device}, threads={torch.get_num_threads()}"
    )
    for n, r in row.items():
        print(f"  {n:24s} {r['median_ms']:7.2f} ms  {r['ratio']:.3f}x")
    agg.remove()
    span.remove()
print(json.dumps(out, indent=1))
