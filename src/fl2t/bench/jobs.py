"""A benchmark's work spread over processes and machines, with nothing shared but its folder.

The work of a run is a list of units: first each concept's expert learned alone (shared by oracle, lookup, merge,
magmax-alone and fl2t, and the fidelity targets), then one unit per (method, order): its tasks, in order, since a method's state
carries from one task to the next. A worker claims a unit by creating its claim file `OUT/NAME/jobs/<unit>.json`
(exclusive create: one worker wins), writes its progress there, and marks it done. Workers are the ranks of
`torchrun` / `accelerate launch` (rank r of N) or the shards of a job array (`--shard K/N`, one command each).

A worker started again with the same identity takes its claims back (a killed shard resumes, its finished tasks
cached); a claim whose process is gone from this machine is taken by the next worker that finds it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fl2t.errors import Fl2tError
from fl2t.files import atomic_write_json, read_json


@dataclass(frozen=True)
class Unit:
    """One claimable piece of work: a concept's expert learned alone, or one method over one task order."""

    key: str
    concept: str | None = None
    method: str | None = None
    order: int | None = None

    @classmethod
    def expert(cls, concept: str) -> Unit:
        return cls(f"expert.{concept}", concept=concept)

    @classmethod
    def run(cls, method: str, order: int) -> Unit:
        return cls(f"run.{method}.order{order}", method=method, order=order)


def parse_shard(text: str) -> tuple[int, int]:
    """ "K/N" (0 <= K < N) -> (K, N)."""
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise Fl2tError(f"--shard {text}: give K/N, e.g. 0/4 for the first of four shards") from None
    if not 0 <= k < n:
        raise Fl2tError(f"--shard {text}: K must be 0 to N-1")
    return k, n


class Claims:
    """The claim files of one benchmark run; `owner` names this worker ("rank 1/2", "shard 3/8")."""

    def __init__(self, folder: Path, owner: str) -> None:
        self.folder, self.owner = Path(folder), owner
        self.folder.mkdir(parents=True, exist_ok=True)
        self.host, self.pid = socket.gethostname(), os.getpid()

    def path(self, unit: Unit) -> Path:
        return self.folder / f"{unit.key}.json"

    def claim(self, unit: Unit) -> bool:
        """True when this worker now holds `unit`: it was free, held by this worker's identity before (a restart), or
        held by a process that is gone from this machine."""
        path = self.path(unit)
        record = self._record(unit, "running", "")
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            held = self.read(unit)
            if held is None or held.get("state") == "done" or not self._takeable(held):
                return False
            stale = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
            try:
                os.rename(path, stale)  # of two workers taking it over, one wins the rename
            except FileNotFoundError:
                return False
            try:
                taken = read_json(stale)
            except Fl2tError:
                taken = None
            if taken != held:
                # Another worker took it over between our read and the rename, and what was renamed is its fresh
                # claim: give that back (os.link refuses to replace a file a third worker made meanwhile).
                with contextlib.suppress(FileExistsError):
                    os.link(stale, path)
                stale.unlink()
                return False
            stale.unlink()
            return self.claim(unit)
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
        return True

    def progress(self, unit: Unit, text: str) -> None:
        atomic_write_json(self.path(unit), self._record(unit, "running", text))

    def done(self, unit: Unit) -> None:
        atomic_write_json(self.path(unit), self._record(unit, "done", ""))

    def read(self, unit: Unit) -> dict[str, Any] | None:
        try:
            return read_json(self.path(unit))
        except Fl2tError:
            return None  # a claim being written: treated as held

    def holder(self, unit: Unit) -> str | None:
        held = self.read(unit)
        return None if held is None else held.get("owner")

    def table(self) -> list[dict[str, Any]]:
        """Every claim: unit, owner, host, pid, state (running, done, or stale: its process is gone), progress."""
        rows = []
        for p in sorted(self.folder.glob("*.json")):
            try:
                r = read_json(p)
            except Fl2tError:
                continue
            if r.get("state") == "running" and r.get("host") == self.host and not _alive(r.get("pid", 0)):
                r["state"] = "stale"
            rows.append(r)
        return rows

    def _takeable(self, held: dict[str, Any]) -> bool:
        if held.get("owner") == self.owner:
            return True  # this worker's identity, restarted
        return held.get("host") == self.host and not _alive(int(held.get("pid", 0)))

    def _record(self, unit: Unit, state: str, progress: str) -> dict[str, Any]:
        return {
            "unit": unit.key,
            "owner": self.owner,
            "host": self.host,
            "pid": self.pid,
            "state": state,
            "progress": progress,
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
