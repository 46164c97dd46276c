"""Seconds per Step-2 step of `consolidate` with the default settings (and a pair teacher):

    python tools/step2_step_time.py LIBRARY TEACHER STEPS

LIBRARY: any library with experts (copied, never changed); TEACHER: span or routed (used when pair training is on)."""

import shutil
import sys
import tempfile
import time

from fl2t.config import ConsolidateSettings
from fl2t.consolidate import consolidate
from fl2t.library import Library

library, teacher, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
work = tempfile.mkdtemp()
shutil.copytree(library, f"{work}/lib")
lib = Library(f"{work}/lib")
times = []
t0 = time.time()
s = ConsolidateSettings(steps=steps, pair_teacher=teacher)
m = consolidate(lib, s, on_step=lambda i, loss: times.append(time.time()))
d = [b - a for a, b in zip(times, times[1:])]
d.sort()
print(
    f"{teacher}: total {time.time() - t0:.1f} s, first step after {times[0] - t0:.1f} s (pipeline, pair anchors), median step {d[len(d) // 2]:.3f} s"
)
