"""The benchmark spread over processes: torchrun's ranks and --shard K/N give the numbers of one process; claims
of a unit are exclusive, a restarted worker takes its own back, a dead process's claim is taken over."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fl2t.bench.jobs import Claims, Unit, parse_shard
from fl2t.errors import Fl2tError

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
METHODS = "sequential,merge,fl2t"
CONFIG = {
    "name": "s3",
    "world": True,
    "concepts": ["stripestar", "checkdiamond", "pastel"],
    "orders": 1,
    "prompts_per_concept": 2,
    "class_images": 2,
    "sample": {"steps": 2},
    "learn": {"steps": 3, "num_anchors": 2, "anchor_steps": 2, "checkpoint_every": 0},
    "consolidate": {"relevance": "learned", "steps": 2},
}


def bench(config: Path, out: Path, *extra: str, nproc: int = 1) -> subprocess.Popen:
    launch = [sys.executable]
    if nproc > 1:
        launch += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    args = ["-m", "fl2t.cli", "-q", "bench", "continual", "-c", str(config), "--methods", METHODS, "--out", str(out)]
    return subprocess.Popen(
        [*launch, *args, *extra], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(p: subprocess.Popen) -> str:
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    return out


def numbers(out: Path) -> dict:
    """The results without what depends on the process rather than the work: wall time, compute seconds and
    peaks, and no-grad forwards (fidelity targets are cached per process, so which process scored what first
    decides where they are counted). Optimizer steps and forwards with a graph stay."""
    results = json.loads((out / "s3" / "results.json").read_text())
    results.pop("wall_s")
    for r in results["methods"].values():
        for phase in (r.get("compute") or {}).values():
            if isinstance(phase, dict):
                for key in ("seconds", "peak_mb", "unet_calls_nograd", "unet_forwards_nograd"):
                    phase.pop(key, None)
    return results


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("spread") / "s3.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    return path


@pytest.fixture(scope="module")
def one_process(config) -> dict:
    out = config.parent / "one"
    finish(bench(config, out))
    return numbers(out)


def test_torchrun_ranks_give_the_numbers_of_one_process(config, one_process):
    out = config.parent / "ranks"
    finish(bench(config, out, nproc=2))
    assert numbers(out) == one_process
    claims = Claims(out / "s3" / "jobs", "viewer").table()
    assert {c["owner"] for c in claims} == {"rank 0/2", "rank 1/2"}  # both ranks did some of the work
    assert all(c["state"] == "done" for c in claims)
    units = [c["unit"] for c in claims]
    assert len(units) == len(set(units)) == 3 + 3  # each expert learned once, each (method, order) run once


def test_shards_then_report_give_the_numbers_of_one_process(config, one_process):
    out = config.parent / "shards"
    shards = [bench(config, out, "--shard", f"{k}/2") for k in range(2)]
    for p in shards:
        finish(p)
    assert not (out / "s3" / "results.json").exists()  # shards leave the report to the final run
    finish(bench(config, out, "--report"))
    assert numbers(out) == one_process
    r = subprocess.run(
        [sys.executable, "-m", "fl2t.cli", "bench", "jobs", str(out / "s3"), "--json"],
        capture_output=True,
        text=True,
        env=ENV,
    )
    assert r.returncode == 0 and {c["owner"] for c in json.loads(r.stdout)} <= {"shard 0/2", "shard 1/2"}


def test_a_report_before_the_shards_finish_says_what_is_missing(config, tmp_path):
    p = bench(config, tmp_path, "--report")
    _, err = p.communicate(timeout=300)
    assert p.returncode == 2 and "not finished: expert.stripestar" in err


def test_claims_are_exclusive_and_a_restarted_or_dead_worker_gives_them_back(tmp_path):
    unit = Unit.run("fl2t", 0)
    first, second = Claims(tmp_path, "shard 0/2"), Claims(tmp_path, "shard 1/2")
    assert first.claim(unit) and not second.claim(unit)  # held by a live process
    first.progress(unit, "task 2/10: dog")
    assert second.read(unit)["progress"] == "task 2/10: dog"
    assert Claims(tmp_path, "shard 0/2").claim(unit)  # the same shard, restarted, takes it back
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    record = {**first.read(unit), "owner": "shard 7/8", "pid": int(dead.stdout)}
    first.path(unit).write_text(json.dumps(record))
    assert [r["state"] for r in first.table()] == ["stale"]
    assert second.claim(unit) and second.holder(unit) == "shard 1/2"  # a dead process's claim is taken over
    second.done(unit)
    assert not first.claim(unit)  # done: nobody claims it again


def test_a_claim_taken_over_between_a_read_and_the_rename_is_not_taken_twice(tmp_path):
    # The benchmark's restart after a kill: a dead "rank 1/2" holds the unit; the new rank 0 takes it over (a dead
    # process's claim) while the new rank 1 (the same identity: a restart) has read the old record, before rank 0's.
    unit = Unit.run("cidm+tokens", 0)
    rank0, rank1 = Claims(tmp_path, "rank 0/2"), Claims(tmp_path, "rank 1/2")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    old = {**rank1._record(unit, "running", "task 7/10"), "pid": int(dead.stdout)}
    rank1.path(unit).write_text(json.dumps(old))
    assert rank0.claim(unit) and rank0.holder(unit) == "rank 0/2"
    rank1.read = lambda u: old  # what rank 1 read before rank 0 took the unit over
    assert not rank1.claim(unit)
    assert rank0.holder(unit) == "rank 0/2" and rank0.read(unit)["pid"] == os.getpid()  # rank 0's claim, given back
    assert [p.name for p in tmp_path.iterdir()] == [rank0.path(unit).name]  # nothing left behind


def test_shard_text_is_checked():
    assert parse_shard("3/8") == (3, 8)
    for bad in ("3", "8/8", "a/b", "-1/2"):
        with pytest.raises(Fl2tError, match="--shard"):
            parse_shard(bad)
