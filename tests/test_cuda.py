"""The CUDA paths: Step 1 (bf16), Step 2, generation and evaluation at the SD-1.5 architecture (random init), and a
tiny benchmark, all on the GPU. Skipped, with the reason, on a machine without CUDA (CI); run on a GPU machine:

    pytest tests/test_cuda.py -ra
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from conftest import write_demo_concept
from fl2t.config import ConsolidateSettings, LearnSettings
from fl2t.consolidate.pipeline import FL2TPipeline
from fl2t.library import Library
from fl2t.metrics import ClipEvaluator
from fl2t.models import sd15_random_pipeline
from fl2t.world import evaluator_path

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device here: these run on a GPU machine (pytest tests/test_cuda.py)"
)


def test_learn_consolidate_generate_evaluate_at_sd15_size_on_the_gpu(tmp_path):
    from fl2t.learning import learn

    base = tmp_path / "sd15"
    sd15_random_pipeline(seed=0).save_pretrained(base, safe_serialization=True)
    concept = write_demo_concept(tmp_path / "c-ball", "c-ball", "stripes")
    settings = LearnSettings(steps=4, num_anchors=2, anchor_steps=2, mixed_precision="bf16", checkpoint_every=0)
    result = learn(
        [concept],
        tmp_path / "lib",
        base=str(base),
        learn_settings=settings,
        consolidate_settings=ConsolidateSettings(relevance="learned", steps=3),
    )
    assert result.set_hash and result.refused is None
    lib = Library(tmp_path / "lib")
    assert all(np.isfinite(f) for f in lib.fidelity().values())
    pipe = FL2TPipeline.from_pretrained(str(base), library=lib, device="cuda")
    assert pipe.unet.device.type == "cuda" and pipe.consolidated.none_logit.device.type == "cuda"
    torch.cuda.reset_peak_memory_stats()
    image = pipe("a photo of <c-ball> ball", num_inference_steps=3, generator=torch.Generator().manual_seed(0)).images[
        0
    ]
    assert image.size == (512, 512) and torch.cuda.max_memory_allocated() > 1e9  # the UNet ran on the GPU
    clip = ClipEvaluator.load(evaluator_path(), "cuda")
    emb = clip.image_embeds([image])
    assert emb.device.type == "cpu" and torch.isfinite(emb).all() and abs(emb.norm().item() - 1) < 1e-3


def test_a_tiny_benchmark_runs_on_the_gpu(tmp_path):
    from fl2t.bench.continual import Benchmark, load_config
    from fl2t.methods import METHODS

    config = {
        "name": "gpu3",
        "world": True,
        "concepts": ["stripestar", "pastel"],
        "prompts_per_concept": 2,
        "class_images": 2,
        "sample": {"steps": 3},
        "learn": {"steps": 4, "num_anchors": 2, "anchor_steps": 2, "checkpoint_every": 0, "mixed_precision": "bf16"},
        "consolidate": {"steps": 3},
        "fidelity": True,
    }
    path = tmp_path / "gpu3.yaml"
    path.write_text(yaml.safe_dump(config))
    bench = Benchmark(load_config(path), tmp_path / "runs", list(METHODS))
    assert bench.device.type == "cuda" and bench.autocast == torch.bfloat16
    results = bench.run()
    for method, r in results["methods"].items():
        for name, s in r["runs"][0]["final"].items():
            assert all(np.isfinite(v) for k, v in s.items() if v is not None), (method, name, s)
    assert bench.method("fl2t", 0).base_pipeline().unet.device.type == "cuda"
