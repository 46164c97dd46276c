"""The on-disk library: every learned concept expert, the consolidated model for the set, and every version of both.

    LIB/library.json              manifest: format, base model, experts (name -> content hash), current version
    LIB/experts/<name>/expert.json       tokens, class word, kind, base, LoRA layout, settings, file hashes
    LIB/experts/<name>/lora.safetensors  "<module>.lora_A.weight" (r, in), "<module>.lora_B.weight" (out, r)
    LIB/experts/<name>/embeddings.safetensors  token_embeddings (n, d) or (L, n, d); stable_embedding (d,)
    LIB/experts/<name>/anchors.safetensors     latents (N, C, h, w) the expert generated, for Step 2
    LIB/consolidated/              the consolidated model's folder, as its `save_pretrained` writes it
    LIB/consolidated/files.json    the library's record: the sha256 of every other file in the folder
    LIB/history/<N>.json           version N: what changed, its experts' and consolidated model's file hashes, fidelity
    LIB/history/objects/<sha256>   every file of every version, stored once however many versions share it

experts/ and consolidated/ hold the current version's files (a copy; the history holds every version's).
Every change (learn, replace, consolidate, forget) makes a new version N; `rollback(N)` makes an earlier one current
again, byte for byte; `gc(keep)` drops old versions and the files only they used.

Every write happens under an exclusive lock (`LIB/.lock`, released by the kernel if the process dies): its files go to
a temporary folder inside LIB and into the history's objects, version N's record is written, the working folders are
renamed into place (the replaced ones parked in `LIB/.old-*`), and the manifest, naming N as current, is replaced last:
it is the commit point. A writer killed at any moment leaves a library that reads as the old version or the new one;
the next writer finishes or undoes what was left (see `Library._recover`).
Only safetensors are ever read; a pickle anywhere in a library is refused.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from fl2t.console import say
from fl2t.data import ConceptSpec
from fl2t.errors import Fl2tError
from fl2t.expert import SHA256, BaseRef, Expert, ExpertRecord, read_expert_record, set_hash_of
from fl2t.files import atomic_write_json, kill_point, read_json, read_validated
from fl2t.models import PICKLE_SUFFIXES, base_name

MANIFEST = "library.json"
CONSOLIDATED = "consolidated"  # LIB/consolidated/: the consolidated model's own files, and files.json
FILES_RECORD = "files.json"
HISTORY = "history"
LIBRARY_FORMAT = 2  # 1: no history (fl2t before versions); opened as is, migrated on its next write
Sha = Annotated[str, Field(pattern=SHA256)]


class ManifestRecord(BaseModel):
    """Schema of LIB/library.json."""

    model_config = ConfigDict(extra="forbid")
    format: int = Field(LIBRARY_FORMAT, ge=1, le=LIBRARY_FORMAT)
    base: BaseRef | None = None
    experts: dict[str, str] = {}  # name -> content hash
    version: int | None = None  # the current version (None: format 1, or a new library)
    latest: int | None = None  # the highest version committed; a history/<N>.json above it is a killed writer's


class FilesRecord(BaseModel):
    """Schema of LIB/consolidated/files.json: the sha256 of every other file in the folder, by relative path."""

    model_config = ConfigDict(extra="forbid")
    format: int = Field(1, ge=1, le=1)
    files: dict[str, Sha]


class ExpertEntry(BaseModel):
    """One expert of a version: its identity and the sha256 of each of its files (expert.json included)."""

    model_config = ConfigDict(extra="forbid")
    content_hash: Sha
    files: dict[str, Sha]


class VersionRecord(BaseModel):
    """Schema of LIB/history/<N>.json; plain data for front ends (`Library.versions()`)."""

    model_config = ConfigDict(extra="forbid")
    number: int = Field(ge=1)
    time: str  # ISO 8601, UTC
    change: str  # what made it, e.g. "learn c-dog", "consolidate", "forget c-cat"
    parent: int | None  # the version that was current when it was made
    base: BaseRef | None
    experts: dict[str, ExpertEntry]
    set_hash: str  # sha256 over the experts' content hashes (`fl2t.expert.set_hash_of`)
    consolidated: dict[str, Sha] | None = None  # the consolidated folder's files (files.json included); None: none
    consolidated_set: str | None = None  # the set the consolidated model was made for (may lag behind `set_hash`)
    fidelity: dict[str, float] = {}  # concept -> fidelity of the consolidated model to its expert (DESIGN §4)
    candidate: bool = False  # refused by the regression gate: recorded, not made current
    evaluation: dict[str, dict[str, float]] = {}  # concept -> {"ia", "ca"} on its references, when evaluated
    evaluator: str | None = None  # the CLIP that scored `evaluation`


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _file_hashes(folder: Path, *, record: bool = False) -> dict[str, str]:
    """sha256 of every file under `folder` (but files.json unless `record`), keyed by its path relative to it."""
    paths = sorted(p for p in folder.rglob("*") if p.is_file())
    return {
        p.relative_to(folder).as_posix(): _sha(p)
        for p in paths
        if record or p.relative_to(folder).as_posix() != FILES_RECORD
    }


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class Library:
    """A folder of concept experts. `Library(path)` opens an existing library or a place for a new one."""

    def __init__(self, path: str | Path, *, wait: bool = False):
        """`wait`: a write waits for another process's write to finish instead of failing (a store several workers
        add to)."""
        self.path, self.wait = Path(path).expanduser(), wait
        if self.path.exists() and not self.path.is_dir():
            raise Fl2tError(f"library {self.path}: is a file, not a folder; choose another --library path")
        visible = self.path.is_dir() and any(not p.name.startswith(".") for p in self.path.iterdir())
        if visible and not (self.path / MANIFEST).is_file():
            raise Fl2tError(
                f"library {self.path}: folder is not empty and has no {MANIFEST}; it is not an fl2t library"
            )

    # -- reading -----------------------------------------------------------------------------------------
    @property
    def exists(self) -> bool:
        return (self.path / MANIFEST).is_file()

    def _refuse_pickles(self) -> None:
        for p in self.path.rglob("*"):
            if p.suffix.lower() in PICKLE_SUFFIXES and p.is_file():
                raise Fl2tError(
                    f"{p}: pickled weights are never loaded (unpickling can run arbitrary code); fl2t reads only "
                    "safetensors: remove the file"
                )

    def manifest(self) -> ManifestRecord:
        if not self.exists:
            return ManifestRecord()
        self._refuse_pickles()
        return read_validated(ManifestRecord, self.path / MANIFEST)

    @property
    def base(self) -> dict[str, str] | None:
        """The base model the library was learned on: {"id": hub id, folder or "fl2t:world", "config_hash": ...}."""
        base = self.manifest().base
        return {"id": base_name(base.id), "config_hash": base.config_hash} if base else None

    def checkpoint_path(self, name: str) -> Path:
        """Where `fl2t learn` keeps the training state of `name` for --resume."""
        return self.path / ".checkpoints" / f"{name}.safetensors"

    def names(self) -> list[str]:
        return sorted(self.manifest().experts)

    def expert_dir(self, name: str) -> Path:
        """The folder holding the manifest's version of `name`: normally experts/<name>; after a writer was
        killed while replacing it, the parked old version."""
        manifest = self.manifest()
        if name not in manifest.experts:
            known = ", ".join(sorted(manifest.experts)) or "none"
            raise Fl2tError(f"library {self.path}: no concept named {name!r} (it has: {known})")
        want = manifest.experts[name]
        for folder in [self.path / "experts" / name, *sorted(self.path.glob(f".old-{name}-*"))]:
            if (folder / "expert.json").is_file() and read_json(folder / "expert.json").get("content_hash") == want:
                return folder
        if not (self.path / "experts" / name / "expert.json").is_file():
            raise Fl2tError(
                f"library {self.path}: expert {name!r} is missing or half-written; relearn it with --replace"
            )
        raise Fl2tError(
            f"library {self.path}: expert {name!r} does not match the manifest's hash; it was changed: relearn it with --replace or restore the library from a backup"
        )

    def records(self) -> dict[str, ExpertRecord]:
        return {name: read_expert_record(self.expert_dir(name)) for name in self.names()}

    def expert(self, name: str) -> Expert:
        folder = self.expert_dir(name)
        expert = Expert.load(folder)
        if expert.content_hash != self.manifest().experts[name]:
            raise Fl2tError(
                f"library {self.path}: expert {name!r} does not match the manifest's hash; it was changed: relearn it with --replace or restore the library from a backup"
            )
        return expert

    def experts(self) -> list[Expert]:
        return [self.expert(n) for n in self.names()]

    # -- versions (plain data, for the command line and the web app) -------------------------------------
    def _history(self) -> Path:
        return self.path / HISTORY

    def _version_path(self, number: int) -> Path:
        return self._history() / f"{number}.json"

    def version(self, number: int) -> VersionRecord:
        """Version `number`'s record; a user error when there is none."""
        path = self._version_path(number)
        latest = self.manifest().latest or 0
        if number < 1 or number > latest or not path.is_file():
            have = ", ".join(str(v.number) for v in self.versions()) or "none"
            raise Fl2tError(f"library {self.path}: has no version {number} (it has: {have})")
        return read_validated(VersionRecord, path)

    def versions(self) -> list[VersionRecord]:
        """Every committed version, oldest first (empty for a library written by fl2t before versions)."""
        latest = self.manifest().latest or 0
        numbers = sorted(
            int(p.stem) for p in self._history().glob("*.json") if p.stem.isdigit() and int(p.stem) <= latest
        )
        return [read_validated(VersionRecord, self._version_path(n)) for n in numbers]

    def record_evaluation(self, number: int, scores: dict[str, dict[str, float]], evaluator: str) -> None:
        """Add IA/CA per concept, measured on the concepts' references with `evaluator`, to version `number`'s record."""
        with self._writing():
            record = self.version(number).model_copy(update={"evaluation": scores, "evaluator": evaluator})
            atomic_write_json(self._version_path(number), record.model_dump())

    def current(self) -> VersionRecord | None:
        """The current version (None: a new library, or one written by fl2t before versions)."""
        number = self.manifest().version
        return self.version(number) if number else None

    def fidelity(self) -> dict[str, float]:
        """Per concept, the current consolidated model's fidelity to its expert (DESIGN §4); empty when not measured."""
        current = self.current()
        return dict(current.fidelity) if current else {}

    def check(self) -> list[str]:
        """Verify every expert and every version's files against their hashes and schema; returns one line per
        problem (empty: all good)."""
        problems = []
        try:
            names = self.names()
            versions = self.versions()
        except Fl2tError as e:
            return [str(e)]
        for name in names:
            try:
                self.expert(name)
            except Fl2tError as e:
                problems.append(str(e))
        objects, verified = self._history() / "objects", set()
        for v in versions:
            files = [(f"{n}/{f}", sha) for n, e in v.experts.items() for f, sha in e.files.items()]
            files += [(f"{CONSOLIDATED}/{f}", sha) for f, sha in (v.consolidated or {}).items()]
            for where, sha in files:
                if sha in verified:
                    continue
                if not (objects / sha).is_file() or _sha(objects / sha) != sha:
                    problems.append(
                        f"library {self.path}: version {v.number}: {where} is missing or damaged in the history"
                    )
                else:
                    verified.add(sha)
        if self.manifest().version:
            try:
                self.consolidated_dir()
            except Fl2tError as e:
                if self.current().consolidated:  # type: ignore[union-attr]
                    problems.append(str(e))
        return problems

    # -- writing -----------------------------------------------------------------------------------------
    @contextmanager
    def _writing(self) -> Iterator[Path]:
        """Hold the library's exclusive lock; yields a fresh temporary folder inside it, removed afterwards."""
        self.path.mkdir(parents=True, exist_ok=True)
        lock = self.path / ".lock"
        fd = os.open(lock, os.O_CREAT | os.O_WRONLY, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if self.wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise Fl2tError(f"library {self.path}: another fl2t process is writing it; wait for it to finish") from None
        tmp = self.path / f".tmp-{uuid.uuid4().hex}"
        try:
            if not self.exists:  # a new library is a valid empty one before anything else is written
                atomic_write_json(self.path / MANIFEST, ManifestRecord().model_dump())
            self._recover()
            tmp.mkdir()
            if self.manifest().version is None:
                self._migrate(tmp)
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _recover(self) -> None:
        """Under the lock: put back what a killed writer left half-placed, drop its leftovers, and make the working
        folders (experts/, consolidated/) the current version's again."""
        manifest = self.manifest()
        experts = manifest.experts
        for name in experts:
            folder = self.expert_dir(name)
            if folder.name != name or folder.parent != self.path / "experts":
                current = self.path / "experts" / name
                if current.exists():
                    os.replace(current, self.path / f".tmp-{uuid.uuid4().hex}")
                os.replace(folder, current)
        if manifest.version:
            self._restore_consolidated(self.current())  # type: ignore[arg-type]
        else:
            parked = sorted(self.path.glob(".old-consolidated-*"))
            if parked and not (self.path / CONSOLIDATED).exists():  # killed between parking and renaming
                os.replace(parked[0], self.path / CONSOLIDATED)
        for leftover in [*self.path.glob(".old-*"), *self.path.glob(".tmp-*")]:
            shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)
        for folder in (self.path / "experts").glob("*") if (self.path / "experts").is_dir() else []:
            if folder.name not in experts:  # written, but killed before the manifest named it
                shutil.rmtree(folder, ignore_errors=True)
        for p in self._history().glob("*.json"):  # a version recorded by a writer killed before its commit
            if not p.stem.isdigit() or int(p.stem) > (manifest.latest or 0):
                p.unlink()
        self._drop_unused_objects()

    def _restore_consolidated(self, current: VersionRecord) -> None:
        """Make LIB/consolidated/ the current version's (from a parked folder or the history), or absent."""
        folder = self.path / CONSOLIDATED
        if self._consolidated_matches(folder, current):
            return
        if folder.exists():
            os.replace(folder, self.path / f".tmp-{uuid.uuid4().hex}")
        if current.consolidated:
            self._materialize(current.consolidated, folder)

    def _consolidated_matches(self, folder: Path, version: VersionRecord) -> bool:
        if version.consolidated is None:
            return not folder.exists()
        record = folder / FILES_RECORD
        return record.is_file() and _sha(record) == version.consolidated.get(FILES_RECORD)

    def _drop_unused_objects(self) -> None:
        objects = self._history() / "objects"
        if not objects.is_dir():
            return
        used = set()
        for v in self.versions():
            used |= {sha for e in v.experts.values() for sha in e.files.values()}
            used |= set((v.consolidated or {}).values())
        for p in objects.iterdir():
            if p.name not in used:
                p.unlink()

    def _store(self, folder: Path) -> dict[str, str]:
        """Put every file of `folder` into the history's objects (once per content); returns path -> sha256."""
        objects = self._history() / "objects"
        objects.mkdir(parents=True, exist_ok=True)
        files = _file_hashes(folder, record=True)
        for rel, sha in files.items():
            if not (objects / sha).is_file():
                staged = objects / f".{sha}.{uuid.uuid4().hex}.tmp"
                shutil.copyfile(folder / rel, staged)
                with open(staged, "rb") as f:
                    os.fsync(f.fileno())
                os.replace(staged, objects / sha)
        return files

    def _materialize(self, files: dict[str, str], folder: Path) -> None:
        """Write a version's files (path -> sha256) from the history's objects into a new folder, atomically."""
        staged = self.path / f".tmp-{uuid.uuid4().hex}"
        for rel, sha in files.items():
            source = self._history() / "objects" / sha
            if not source.is_file():
                raise Fl2tError(f"library {self.path}: the history lacks a file of this version ({rel}); it is damaged")
            (staged / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, staged / rel)
        os.replace(staged, folder)

    def _migrate(self, tmp: Path) -> None:
        """Under the lock: a library without versions (format 1, or new) gets its first, from its working folders."""
        manifest = self.manifest()
        entries = {}
        for name, content_hash in manifest.experts.items():
            entries[name] = ExpertEntry(content_hash=content_hash, files=self._store(self.path / "experts" / name))
        consolidated = None
        folder = self.path / CONSOLIDATED
        if folder.exists():
            try:
                self.consolidated_dir()
                consolidated = self._store(folder)
            except Fl2tError:  # the layout of fl2t before versions (consolidated.json): not loadable any more
                shutil.rmtree(folder)
                say(
                    f"library {self.path}: its consolidated model was made by an older fl2t and was removed; "
                    f"run `fl2t consolidate --library {self.path}`"
                )
        if manifest.format < LIBRARY_FORMAT:
            say(
                f"library {self.path}: migrated from format {manifest.format} to {LIBRARY_FORMAT} (versions and history)"
            )
        if not entries and consolidated is None:
            return  # a new library: its first change is version 1
        record = self._record(None, "migrated from format 1", entries, manifest.base, consolidated, None, {})
        self._commit(record, {})

    def _record(
        self,
        parent: VersionRecord | None,
        change: str,
        experts: dict[str, ExpertEntry],
        base: BaseRef | None,
        consolidated: dict[str, str] | None,
        consolidated_set: str | None,
        fidelity: dict[str, float],
        candidate: bool = False,
    ) -> VersionRecord:
        return VersionRecord(
            number=(self.manifest().latest or 0) + 1,
            time=_now(),
            change=change,
            parent=parent.number if parent else None,
            base=base,
            experts=experts,
            set_hash=set_hash_of(e.content_hash for e in experts.values()),
            consolidated=consolidated,
            consolidated_set=consolidated_set,
            fidelity=fidelity,
            candidate=candidate,
        )

    def _commit(self, record: VersionRecord, place: dict[str, Path | None]) -> None:
        """Record version N and make it current (unless it is a candidate): `place` maps working folders
        ("experts/<name>", "consolidated") to staged folders to rename there, or None to remove them. Their files
        are already in the history's objects."""
        self._history().mkdir(exist_ok=True)
        atomic_write_json(self._version_path(record.number), record.model_dump(mode="json"))
        kill_point("versioned")
        manifest = self.manifest()
        manifest.latest = record.number
        parked = []
        if not record.candidate:
            for rel, staged in place.items():
                final = self.path / rel
                if final.exists():
                    parked.append(self.path / f".old-{final.name}-{uuid.uuid4().hex[:8]}")
                    os.replace(final, parked[-1])
                    kill_point("parked")
                if staged is not None:
                    final.parent.mkdir(exist_ok=True)
                    os.replace(staged, final)
                    kill_point("renamed")
            manifest.version = record.number
            manifest.experts = {n: e.content_hash for n, e in record.experts.items()}
            manifest.base = record.base
        manifest.format = LIBRARY_FORMAT
        atomic_write_json(self.path / MANIFEST, manifest.model_dump())
        kill_point("committed")
        for old in parked:
            shutil.rmtree(old)

    def check_can_add(self, spec: ConceptSpec, replace: bool = False) -> None:
        """Refuse a concept whose name or a token is already taken (unless replacing that same name)."""
        for name, rec in self.records().items():
            if name == spec.name:
                if not replace:
                    raise Fl2tError(
                        f"library {self.path}: a concept named {name!r} exists; pass --replace to relearn it"
                    )
                continue
            clash = set(rec.tokens) & set(spec.tokens)
            if clash:
                raise Fl2tError(
                    f"library {self.path}: token {sorted(clash)[0]!r} belongs to concept {name!r}; choose other tokens"
                )

    def check_base(self, base: dict[str, str]) -> None:
        mine = self.base
        if mine is not None and mine["config_hash"] != base["config_hash"]:
            raise Fl2tError(
                f"library {self.path}: was learned on base {mine['id']!r} (architecture {mine['config_hash']}); "
                f"{base['id']!r} has another architecture ({base['config_hash']}); use a new --library"
            )

    def add(self, expert: Expert, replace: bool = False) -> str:
        """Write an expert atomically and list it in the manifest (a new version); returns its content hash."""
        self.check_can_add(expert.spec, replace)
        self.check_base(expert.base)
        with self._writing() as tmp:
            current = self.current()
            staged = tmp / expert.name
            staged.mkdir()
            saved = expert.save(staged)
            kill_point("staged")
            entries = dict(current.experts) if current else {}
            entries[expert.name] = ExpertEntry(content_hash=saved["content_hash"], files=self._store(staged))
            kill_point("stored")
            base = current.base if current and current.base else BaseRef(**saved["base"])
            verb = "replace" if current and expert.name in current.experts else "learn"
            record = self._record(
                current,
                f"{verb} {expert.name}",
                entries,
                base,
                current.consolidated if current else None,
                current.consolidated_set if current else None,
                current.fidelity if current else {},
            )
            self._commit(record, {f"experts/{expert.name}": staged})
        return saved["content_hash"]

    def remove(self, name: str) -> None:
        """Take a concept out of the library (a new version; its consolidated model then no longer matches the set)."""
        self.expert_dir(name)
        with self._writing():
            current = self.current()
            assert current is not None  # the library has an expert, so `_writing` gave it a version
            entries = {n: e for n, e in current.experts.items() if n != name}
            fidelity = {n: f for n, f in current.fidelity.items() if n != name}
            record = self._record(
                current,
                f"forget {name}",
                entries,
                current.base,
                current.consolidated,
                current.consolidated_set,
                fidelity,
            )
            self._commit(record, {f"experts/{name}": None})

    def rollback(self, number: int) -> VersionRecord:
        """Make version `number` current again: its experts and consolidated model, byte for byte. Returns it."""
        target = self.version(number)
        with self._writing() as tmp:
            current = self.current()
            place: dict[str, Path | None] = {}
            for name, entry in target.experts.items():
                working = self.path / "experts" / name / "expert.json"
                if not working.is_file() or _sha(working) != entry.files["expert.json"]:
                    self._materialize(entry.files, tmp / name)
                    place[f"experts/{name}"] = tmp / name
            for name in current.experts if current else {}:
                if name not in target.experts:
                    place[f"experts/{name}"] = None
            if not self._consolidated_matches(self.path / CONSOLIDATED, target):
                if target.consolidated:
                    self._materialize(target.consolidated, tmp / CONSOLIDATED)
                place[CONSOLIDATED] = tmp / CONSOLIDATED if target.consolidated else None
            kill_point("staged")
            self._point_at(target, place)
        return target

    def _point_at(self, target: VersionRecord, place: dict[str, Path | None]) -> None:
        """Rename the staged folders into place and make `target` (an existing version) current."""
        parked = []
        for rel, staged in place.items():
            final = self.path / rel
            if final.exists():
                parked.append(self.path / f".old-{final.name}-{uuid.uuid4().hex[:8]}")
                os.replace(final, parked[-1])
                kill_point("parked")
            if staged is not None:
                final.parent.mkdir(exist_ok=True)
                os.replace(staged, final)
                kill_point("renamed")
        manifest = self.manifest()
        manifest.version = target.number
        manifest.experts = {n: e.content_hash for n, e in target.experts.items()}
        manifest.base = target.base
        atomic_write_json(self.path / MANIFEST, manifest.model_dump())
        kill_point("committed")
        for old in parked:
            shutil.rmtree(old)

    def gc(self, keep: int) -> list[int]:
        """Drop all but the `keep` newest versions (never the current one) and the files only they used; returns
        the numbers dropped."""
        if keep < 1:
            raise Fl2tError(f"--keep {keep}: keep at least 1 version")
        with self._writing():
            current = self.manifest().version
            numbers = [v.number for v in self.versions()]
            drop = [n for n in numbers[: max(len(numbers) - keep, 0)] if n != current]
            for n in drop:
                self._version_path(n).unlink()
            kill_point("gc-dropped")
            self._drop_unused_objects()
        return drop

    # -- the consolidated model ----------------------------------------------------------------------------
    def consolidated_dir(self) -> Path:
        """LIB/consolidated/, every file checked against the sha256 the library recorded when it placed the folder
        (after a writer was killed while replacing it: the parked one of the current version). Read it with
        `ConsolidatedModel.from_pretrained`; its config names the set it was made for."""
        current = self.current() if self.manifest().version else None
        none = Fl2tError(
            f"library {self.path}: has no consolidated model; run `fl2t consolidate --library {self.path}`"
        )
        if current is not None and current.consolidated is None:
            raise none
        folders = [self.path / CONSOLIDATED, *sorted(self.path.glob(".old-consolidated-*"))]
        if current is not None:
            folders = [f for f in folders if self._consolidated_matches(f, current)] or folders[:1]
        else:
            folders = [f for f in folders if (f / FILES_RECORD).is_file()]
        if not folders or not (folders[0] / FILES_RECORD).is_file():
            raise none
        folder = folders[0]
        self._refuse_pickles()
        damaged = Fl2tError(
            f"{folder}: consolidated model is damaged (hash mismatch); run `fl2t consolidate --library {self.path}`"
        )
        try:
            record = FilesRecord(**json.loads((folder / FILES_RECORD).read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError):  # unreadable, not JSON, or not the schema
            raise damaged from None
        if _file_hashes(folder) != record.files:
            raise damaged
        return folder

    def save_consolidated(
        self,
        write: Callable[[Path], None],
        *,
        set_hash: str | None = None,
        fidelity: dict[str, float] | None = None,
        candidate: bool = False,
    ) -> dict[str, str]:
        """Place a consolidated model at LIB/consolidated/ atomically, as a new version, under the library's lock:
        `write(folder)` fills a staged folder (`model.save_pretrained`), the library records each file's sha256 in
        files.json, then renames the folder into place. `set_hash`: the set the model was made for; `fidelity`:
        its score per concept; `candidate`: record the version without making it current (the regression gate
        refused it). Returns the recorded hashes (file name -> sha256)."""
        with self._writing() as tmp:
            current = self.current()
            staged = tmp / CONSOLIDATED
            staged.mkdir()
            write(staged)
            files = _file_hashes(staged)
            if not files or FILES_RECORD in files:
                raise ValueError(f"the consolidated model's writer must write its files, and no {FILES_RECORD}")
            atomic_write_json(staged / FILES_RECORD, FilesRecord(files=files).model_dump())
            kill_point("consolidated-staged")
            stored = self._store(staged)
            kill_point("stored")
            record = self._record(
                current,
                "consolidate",
                dict(current.experts) if current else {},
                current.base if current else None,
                stored,
                set_hash,
                dict(fidelity or {}),
                candidate,
            )
            self._commit(record, {CONSOLIDATED: staged})
        return files
