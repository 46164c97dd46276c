"""Seconds per evaluator training step of `fl2t world build` (batch 128, 2 threads), steps 10-70 timed, and the 2000-step stage extrapolated. Run on a quiet machine: python tools/time_evaluator_steps.py"""

import time

import numpy as np
import torch

from fl2t.world.concepts import concept_appearances
from fl2t.world.generator import random_scene
from fl2t.worldkit import train
from fl2t.worldkit.build import BuildSettings, _stage_seed

torch.set_num_threads(2)
s = BuildSettings()
rng = np.random.default_rng(_stage_seed(s.seed, "rich"))
ex = concept_appearances()
scenes = [random_scene(rng, rich=True, held_out=None, exclude=ex) for _ in range(4000)]
data = train.render_dataset(scenes, lambda n: None)
n = [0]
t = [0.0]


def tick(k):
    n[0] += 1
    if n[0] == 10:
        t[0] = time.time()


train.train_evaluator(data, 70, 0, tick)
print(
    f"evaluator: {(time.time() - t[0]) / 60:.3f} s/step over steps 10-70 -> 2000 steps {(time.time() - t[0]) / 60 * 2000 / 60:.1f} min"
)
