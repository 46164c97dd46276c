"""The on-disk library: every learned concept expert (and, later, the consolidated model for the set).

    LIB/library.json              manifest: format, base model, experts (name -> content hash)
    LIB/experts/<name>/expert.json       tokens, class word, kind, base, LoRA layout, settings, file hashes
    LIB/experts/<name>/lora.safetensors  "<module>.lora_A.weight" (r, in), "<module>.lora_B.weight" (out, r)
    LIB/experts/<name>/embeddings.safetensors  token_embeddings (n, d) or (L, n, d); stable_embedding (d,)
    LIB/experts/<name>/anchors.safetensors     latents (N, C, h, w) the expert generated, for Step 2

Every write goes to a temporary folder inside LIB and is renamed into place; the manifest is replaced last, so
it names only complete experts. Only safetensors are ever read.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fl2t.data import ConceptSpec
from fl2t.errors import Fl2tError

FORMAT = 1
MANIFEST = "library.json"
WEIGHT_FILES = ("lora.safetensors", "embeddings.safetensors", "anchors.safetensors")


@dataclass
class Expert:
    """One concept learned alone (Step 1).

    lora: peft-style keys, "<module>.lora_A.weight" (r, in) and "<module>.lora_B.weight" (out, r); scale 1.
    token_embeddings: (n_tokens, d), or (L, n_tokens, d) when layer-wise.
    stable_embedding: (d,), the text encoder's final state at the concept token in its template prompt (C_g).
    anchors: (N, C, h, w) latents the expert generated from `anchor_prompts`.
    """

    spec: ConceptSpec
    lora: dict[str, torch.Tensor]
    token_embeddings: torch.Tensor
    stable_embedding: torch.Tensor
    anchors: torch.Tensor
    anchor_prompts: list[str]
    base: dict[str, str]  # {"id": hub id or path, "config_hash": architecture hash}
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def layerwise(self) -> bool:
        return self.token_embeddings.dim() == 3

    @property
    def rank(self) -> int:
        return next(v.shape[0] for k, v in self.lora.items() if k.endswith("lora_A.weight"))

    @property
    def modules(self) -> list[str]:
        """Names of the UNet linear layers this expert adapts, sorted."""
        return sorted(k.removesuffix(".lora_A.weight") for k in self.lora if k.endswith(".lora_A.weight"))

    def _blobs(self) -> dict[str, bytes]:
        def pack(d: dict[str, torch.Tensor]) -> bytes:
            return st_save({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in d.items()})

        return {
            "lora.safetensors": pack(self.lora),
            "embeddings.safetensors": pack(
                {"token_embeddings": self.token_embeddings, "stable_embedding": self.stable_embedding}
            ),
            "anchors.safetensors": pack({"latents": self.anchors}),
        }

    def _record(self, files: dict[str, str]) -> dict[str, Any]:
        identity = {"spec": self.spec.model_dump(), "lora": files["lora.safetensors"], "embeddings": files["embeddings.safetensors"]}
        content_hash = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
        return {
            "format": FORMAT,
            **self.spec.model_dump(),
            "base": self.base,
            "rank": self.rank,
            "layerwise": self.layerwise,
            "modules": len(self.modules),
            "anchor_prompts": self.anchor_prompts,
            "settings": self.settings,
            "files": files,
            "content_hash": content_hash,
        }

    @property
    def content_hash(self) -> str:
        """Identity of the expert: its concept and its learned weights (not its anchors or settings)."""
        return self._record({k: hashlib.sha256(v).hexdigest() for k, v in self._blobs().items()})["content_hash"]

    def save(self, folder: Path) -> dict[str, Any]:
        """Write the expert's files into an existing empty folder; returns its expert.json record."""
        blobs = self._blobs()
        for fname, blob in blobs.items():
            (folder / fname).write_bytes(blob)
        record = self._record({k: hashlib.sha256(v).hexdigest() for k, v in blobs.items()})
        _write_json(folder / "expert.json", record)
        return record

    @classmethod
    def load(cls, folder: Path) -> "Expert":
        record = _read_json(folder / "expert.json")
        tensors = {}
        for fname in WEIGHT_FILES:
            path = folder / fname
            if not path.is_file():
                raise Fl2tError(f"{path}: missing; the expert is incomplete; relearn it with --replace")
            blob = path.read_bytes()
            if hashlib.sha256(blob).hexdigest() != record.get("files", {}).get(fname):
                raise Fl2tError(f"{path}: content does not match its recorded hash; the file was changed or damaged")
            try:
                tensors[fname] = st_load(blob)
            except SafetensorError as e:
                raise Fl2tError(f"{path}: not a valid safetensors file ({e})") from None
        try:
            spec = ConceptSpec(**{k: record[k] for k in ("name", "tokens", "class_word", "kind")})
        except (KeyError, ValueError) as e:
            raise Fl2tError(f"{folder / 'expert.json'}: invalid expert record ({e})") from None
        emb = tensors["embeddings.safetensors"]
        return cls(
            spec=spec,
            lora=tensors["lora.safetensors"],
            token_embeddings=emb["token_embeddings"],
            stable_embedding=emb["stable_embedding"],
            anchors=tensors["anchors.safetensors"]["latents"],
            anchor_prompts=list(record.get("anchor_prompts", [])),
            base=dict(record["base"]),
            settings=dict(record.get("settings", {})),
        )


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise Fl2tError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise Fl2tError(f"{path}: not valid JSON ({e}); the library is damaged") from None


class Library:
    """A folder of concept experts. `Library(path)` opens an existing library or a place for a new one."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        if self.path.exists() and not self.path.is_dir():
            raise Fl2tError(f"library {self.path}: is a file, not a folder; choose another --library path")
        if self.path.is_dir() and any(self.path.iterdir()) and not (self.path / MANIFEST).is_file():
            raise Fl2tError(f"library {self.path}: folder is not empty and has no {MANIFEST}; it is not an fl2t library")

    # -- reading -----------------------------------------------------------------------------------------
    @property
    def exists(self) -> bool:
        return (self.path / MANIFEST).is_file()

    def manifest(self) -> dict[str, Any]:
        if not self.exists:
            return {"format": FORMAT, "base": None, "experts": {}}
        data = _read_json(self.path / MANIFEST)
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("experts"), dict):
            raise Fl2tError(f"{self.path / MANIFEST}: not an fl2t library manifest (format {FORMAT})")
        return data

    @property
    def base(self) -> dict[str, str] | None:
        return self.manifest()["base"]

    def names(self) -> list[str]:
        return sorted(self.manifest()["experts"])

    def records(self) -> dict[str, dict[str, Any]]:
        return {name: _read_json(self.path / "experts" / name / "expert.json") for name in self.names()}

    def expert(self, name: str) -> Expert:
        entries = self.manifest()["experts"]
        if name not in entries:
            known = ", ".join(sorted(entries)) or "none"
            raise Fl2tError(f"library {self.path}: no concept named {name!r} (it has: {known})")
        expert = Expert.load(self.path / "experts" / name)
        if expert.content_hash != entries[name]:
            raise Fl2tError(f"library {self.path}: expert {name!r} does not match the manifest's hash; it was changed")
        return expert

    def experts(self) -> list[Expert]:
        return [self.expert(n) for n in self.names()]

    # -- writing -----------------------------------------------------------------------------------------
    @contextmanager
    def _writing(self) -> Iterator[Path]:
        """Hold the library's lock; yields a fresh temporary folder inside it, removed afterwards."""
        self.path.mkdir(parents=True, exist_ok=True)
        lock = self.path / ".lock"
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            raise Fl2tError(
                f"library {self.path}: another fl2t process is writing it (lock {lock}); wait for it, "
                "or delete the lock file if no fl2t process is running"
            ) from None
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        tmp = self.path / f".tmp-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            lock.unlink(missing_ok=True)

    def check_can_add(self, spec: ConceptSpec, replace: bool = False) -> None:
        """Refuse a concept whose name or a token is already taken (unless replacing that same name)."""
        for name, rec in self.records().items():
            if name == spec.name:
                if not replace:
                    raise Fl2tError(
                        f"library {self.path}: a concept named {name!r} exists; pass --replace to relearn it"
                    )
                continue
            clash = set(rec["tokens"]) & set(spec.tokens)
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
            experts_dir = self.path / "experts"
            experts_dir.mkdir(exist_ok=True)
            final = experts_dir / expert.name
            if final.exists():
                os.replace(final, tmp / "old")
            os.replace(staged, final)
            manifest["experts"][expert.name] = record["content_hash"]
            if manifest["base"] is None:
                manifest["base"] = expert.base
            _write_json(self.path / MANIFEST, manifest)
        return record["content_hash"]
