"""The on-disk library: every learned concept expert, and the consolidated model for the set.

    LIB/library.json              manifest: format, base model, experts (name -> content hash)
    LIB/experts/<name>/expert.json       tokens, class word, kind, base, LoRA layout, settings, file hashes
    LIB/experts/<name>/lora.safetensors  "<module>.lora_A.weight" (r, in), "<module>.lora_B.weight" (out, r)
    LIB/experts/<name>/embeddings.safetensors  token_embeddings (n, d) or (L, n, d); stable_embedding (d,)
    LIB/experts/<name>/anchors.safetensors     latents (N, C, h, w) the expert generated, for Step 2
    LIB/consolidated/              the consolidated model's folder, as its `save_pretrained` writes it
    LIB/consolidated/files.json    the library's record: the sha256 of every other file in the folder

Every write happens under an exclusive lock (`LIB/.lock`, released by the kernel if the process dies), goes to a
temporary folder inside LIB and is renamed into place; the manifest is replaced last and is the commit point.
A replaced expert is parked in `LIB/.old-<name>-*` until the manifest names its successor, so a writer killed at
any moment leaves a library that reads as the old state or the new one (see `Library._recover`).
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
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from fl2t.data import ConceptSpec
from fl2t.errors import Fl2tError
from fl2t.expert import FORMAT, SHA256, BaseRef, Expert, ExpertRecord, read_expert_record
from fl2t.files import atomic_write_json, kill_point, read_json, read_validated
from fl2t.models import PICKLE_SUFFIXES

MANIFEST = "library.json"
CONSOLIDATED = "consolidated"  # LIB/consolidated/: the consolidated model's own files, and files.json
FILES_RECORD = "files.json"


class ManifestRecord(BaseModel):
    """Schema of LIB/library.json."""

    model_config = ConfigDict(extra="forbid")
    format: int = Field(FORMAT, ge=FORMAT, le=FORMAT)
    base: BaseRef | None = None
    experts: dict[str, str] = {}  # name -> content hash


class FilesRecord(BaseModel):
    """Schema of LIB/consolidated/files.json: the sha256 of every other file in the folder, by relative path."""

    model_config = ConfigDict(extra="forbid")
    format: int = Field(FORMAT, ge=FORMAT, le=FORMAT)
    files: dict[str, Annotated[str, Field(pattern=SHA256)]]


def _file_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` but files.json, keyed by its path relative to `folder`."""
    paths = sorted(p for p in folder.rglob("*") if p.is_file())
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in paths
        if p.relative_to(folder).as_posix() != FILES_RECORD
    }


class Library:
    """A folder of concept experts. `Library(path)` opens an existing library or a place for a new one."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        if self.path.exists() and not self.path.is_dir():
            raise Fl2tError(f"library {self.path}: is a file, not a folder; choose another --library path")
        visible = self.path.is_dir() and any(not p.name.startswith(".") for p in self.path.iterdir())
        if visible and not (self.path / MANIFEST).is_file():
            raise Fl2tError(f"library {self.path}: folder is not empty and has no {MANIFEST}; it is not an fl2t library")

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
        base = self.manifest().base
        return base.model_dump() if base else None

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
            raise Fl2tError(f"library {self.path}: expert {name!r} is missing or half-written; relearn it with --replace")
        raise Fl2tError(f"library {self.path}: expert {name!r} does not match the manifest's hash; it was changed: relearn it with --replace or restore the library from a backup")

    def records(self) -> dict[str, ExpertRecord]:
        return {name: read_expert_record(self.expert_dir(name)) for name in self.names()}

    def expert(self, name: str) -> Expert:
        folder = self.expert_dir(name)
        expert = Expert.load(folder)
        if expert.content_hash != self.manifest().experts[name]:
            raise Fl2tError(f"library {self.path}: expert {name!r} does not match the manifest's hash; it was changed: relearn it with --replace or restore the library from a backup")
        return expert

    def experts(self) -> list[Expert]:
        return [self.expert(n) for n in self.names()]

    def check(self) -> list[str]:
        """Verify every expert against its hashes and schema; returns one line per problem (empty: all good)."""
        problems = []
        try:
            names = self.names()
        except Fl2tError as e:
            return [str(e)]
        for name in names:
            try:
                self.expert(name)
            except Fl2tError as e:
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
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise Fl2tError(f"library {self.path}: another fl2t process is writing it; wait for it to finish") from None
        tmp = self.path / f".tmp-{uuid.uuid4().hex}"
        try:
            if not self.exists:  # a new library is a valid empty one before anything else is written
                atomic_write_json(self.path / MANIFEST, ManifestRecord().model_dump())
            self._recover()
            tmp.mkdir()
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _recover(self) -> None:
        """Under the lock: put back any expert whose replacement a killed writer left unfinished, drop leftovers."""
        experts = self.manifest().experts
        for name in experts:
            folder = self.expert_dir(name)
            if folder.name != name or folder.parent != self.path / "experts":
                current = self.path / "experts" / name
                if current.exists():
                    os.replace(current, self.path / f".tmp-{uuid.uuid4().hex}")
                os.replace(folder, current)
        parked = sorted(self.path.glob(".old-consolidated-*"))
        if parked and not (self.path / "consolidated").exists():  # killed between parking and renaming
            os.replace(parked[0], self.path / "consolidated")
        for leftover in [*self.path.glob(".old-*"), *self.path.glob(".tmp-*")]:
            shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)
        for folder in (self.path / "experts").glob("*") if (self.path / "experts").is_dir() else []:
            if folder.name not in experts:  # written, but killed before the manifest named it
                shutil.rmtree(folder, ignore_errors=True)

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
        """Write an expert atomically and list it in the manifest; returns its content hash."""
        self.check_can_add(expert.spec, replace)
        self.check_base(expert.base)
        with self._writing() as tmp:
            manifest = self.manifest()
            staged = tmp / expert.name
            staged.mkdir()
            record = expert.save(staged)
            kill_point("staged")
            (self.path / "experts").mkdir(exist_ok=True)
            final = self.path / "experts" / expert.name
            if final.exists():
                os.replace(final, self.path / f".old-{expert.name}-{uuid.uuid4().hex[:8]}")
                kill_point("parked")
            os.replace(staged, final)
            kill_point("renamed")
            manifest.experts[expert.name] = record["content_hash"]
            if manifest.base is None:
                manifest.base = BaseRef(**expert.base)
            atomic_write_json(self.path / MANIFEST, manifest.model_dump())
            kill_point("committed")
            for old in self.path.glob(f".old-{expert.name}-*"):
                shutil.rmtree(old)
        return record["content_hash"]

    # -- the consolidated model ----------------------------------------------------------------------------
    def consolidated_dir(self) -> Path:
        """LIB/consolidated/, every file checked against the sha256 the library recorded when it placed the folder
        (after a writer was killed while replacing it: the parked old one, still valid). Read it with
        `ConsolidatedModel.from_pretrained`; its config names the set it was made for."""
        folder = self.path / CONSOLIDATED
        if not (folder / FILES_RECORD).is_file():
            parked = sorted(self.path.glob(".old-consolidated-*"))
            if not parked:
                raise Fl2tError(
                    f"library {self.path}: has no consolidated model; run `fl2t consolidate --library {self.path}`"
                )
            folder = parked[0]
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

    def save_consolidated(self, write: Callable[[Path], None]) -> dict[str, str]:
        """Place a consolidated model at LIB/consolidated/ atomically, under the library's lock: `write(folder)`
        fills a staged folder (`model.save_pretrained`), the library records each file's sha256 in files.json, then
        renames the folder into place. Returns the recorded hashes (file name -> sha256)."""
        with self._writing() as tmp:
            staged = tmp / CONSOLIDATED
            staged.mkdir()
            write(staged)
            files = _file_hashes(staged)
            if not files or FILES_RECORD in files:
                raise ValueError(f"the consolidated model's writer must write its files, and no {FILES_RECORD}")
            atomic_write_json(staged / FILES_RECORD, FilesRecord(files=files).model_dump())
            kill_point("consolidated-staged")
            final = self.path / CONSOLIDATED
            if final.exists():
                os.replace(final, self.path / f".old-consolidated-{uuid.uuid4().hex[:8]}")
                kill_point("consolidated-parked")
            os.replace(staged, final)
            kill_point("consolidated-renamed")
            for old in self.path.glob(".old-consolidated-*"):
                shutil.rmtree(old)
        return files

    def remove(self, name: str) -> None:
        """Take a concept out of the library (its consolidated model then no longer matches the set)."""
        self.expert_dir(name)
        with self._writing():
            manifest = self.manifest()
            del manifest.experts[name]
            atomic_write_json(self.path / MANIFEST, manifest.model_dump())
            kill_point("removed")
            shutil.rmtree(self.path / "experts" / name, ignore_errors=True)
