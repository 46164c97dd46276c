"""A concept expert: one concept learned alone (Step 1), and its on-disk form.

<folder>/expert.json              tokens, class word, kind, base, LoRA layout, settings, file hashes
<folder>/lora.safetensors         "<module>.lora_A.weight" (r, in), "<module>.lora_B.weight" (out, r)
<folder>/embeddings.safetensors   token_embeddings (n, d) or (L, n, d); stable_embedding (d,)
<folder>/anchors.safetensors      latents (N, C, h, w) the expert generated, for Step 2
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fl2t.data import ConceptSpec
from fl2t.errors import Fl2tError
from fl2t.files import atomic_write_json, read_validated
from fl2t.models import base_name

FORMAT = 1
WEIGHT_FILES = ("lora.safetensors", "embeddings.safetensors", "anchors.safetensors")
SHA256 = r"^[0-9a-f]{64}$"


def set_hash_of(content_hashes: Iterable[str]) -> str:
    """A set of experts' identity: sha256 over their content hashes, in any order (`fl2t.consolidate.set_hash`)."""
    return hashlib.sha256("".join(sorted(content_hashes)).encode()).hexdigest()


class BaseRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    config_hash: str


class ExpertRecord(BaseModel):
    """Schema of LIB/experts/<name>/expert.json."""

    model_config = ConfigDict(extra="forbid")
    format: int = Field(FORMAT, ge=FORMAT, le=FORMAT)
    name: str
    tokens: list[str]
    class_word: str
    kind: str
    base: BaseRef
    rank: int = Field(ge=1)
    layerwise: bool
    modules: int = Field(ge=1)
    anchor_prompts: list[str]
    settings: dict[str, Any]
    files: dict[str, str]
    content_hash: str = Field(pattern=SHA256)

    @property
    def spec(self) -> ConceptSpec:
        return ConceptSpec(name=self.name, tokens=self.tokens, class_word=self.class_word, kind=self.kind)


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

    def _blobs(self, anchors: bool = True) -> dict[str, bytes]:
        def pack(d: dict[str, torch.Tensor]) -> bytes:
            return st_save({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in d.items()})

        blobs = {
            "lora.safetensors": pack(self.lora),
            "embeddings.safetensors": pack(
                {"token_embeddings": self.token_embeddings, "stable_embedding": self.stable_embedding}
            ),
        }
        if anchors:
            blobs["anchors.safetensors"] = pack({"latents": self.anchors})
        return blobs

    def _record(self, files: dict[str, str]) -> dict[str, Any]:
        identity = {
            "spec": self.spec.model_dump(),
            "lora": files["lora.safetensors"],
            "embeddings": files["embeddings.safetensors"],
        }
        content_hash = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
        return {
            "format": FORMAT,
            **self.spec.model_dump(),
            "base": {**self.base, "id": base_name(self.base["id"])},  # the built-in world by name: portable
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
        blobs = self._blobs(anchors=False)  # the anchors are not part of the identity: no need to pack them
        return self._record({k: hashlib.sha256(v).hexdigest() for k, v in blobs.items()})["content_hash"]

    def save(self, folder: Path) -> dict[str, Any]:
        """Write the expert's files into an existing empty folder; returns its expert.json record."""
        blobs = self._blobs()
        for fname, blob in blobs.items():
            (folder / fname).write_bytes(blob)
        record = self._record({k: hashlib.sha256(v).hexdigest() for k, v in blobs.items()})
        atomic_write_json(folder / "expert.json", record)
        return record

    @classmethod
    def load(cls, folder: Path) -> Expert:
        record = read_expert_record(folder)
        tensors = {}
        for fname in WEIGHT_FILES:
            path = folder / fname
            if not path.is_file():
                raise Fl2tError(f"{path}: missing; the expert is incomplete; relearn it with --replace")
            blob = path.read_bytes()
            if hashlib.sha256(blob).hexdigest() != record.files.get(fname):
                raise Fl2tError(f"{path}: content does not match its recorded hash; the file was changed or damaged")
            try:
                tensors[fname] = st_load(blob)
            except SafetensorError as e:
                raise Fl2tError(f"{path}: not a valid safetensors file ({e})") from None
        emb = tensors["embeddings.safetensors"]
        for fname, keys in (
            ("embeddings.safetensors", ("token_embeddings", "stable_embedding")),
            ("anchors.safetensors", ("latents",)),
        ):
            if any(k not in tensors[fname] for k in keys):
                raise Fl2tError(
                    f"{folder / fname}: lacks tensors {keys}; the expert is damaged; relearn it with --replace"
                )
        return cls(
            spec=record.spec,
            lora=tensors["lora.safetensors"],
            token_embeddings=emb["token_embeddings"],
            stable_embedding=emb["stable_embedding"],
            anchors=tensors["anchors.safetensors"]["latents"],
            anchor_prompts=record.anchor_prompts,
            base=record.base.model_dump(),
            settings=record.settings,
        )


def read_expert_record(folder: Path) -> ExpertRecord:
    record = read_validated(ExpertRecord, folder / "expert.json")
    try:
        _ = record.spec
    except ValidationError as e:
        raise Fl2tError(f"{folder / 'expert.json'}: {e.errors()[0]['msg']}") from None
    return record
