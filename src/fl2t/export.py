"""Export one expert for other tools: plain diffusers files, or the kohya format that AUTOMATIC1111 and ComfyUI load.

    diffusers:  out/pytorch_lora_weights.safetensors      "unet.<module>.lora_A.weight" / "...lora_B.weight"
                out/textual_inversion/NN-<token>.safetensors   {token: (d,)}, one file per token
    kohya:      out/<name>.safetensors                     "lora_unet_<module_with_underscores>.lora_down.weight"
                                                           (r, in), ".lora_up.weight" (out, r), ".alpha" = r
                out/embeddings/<name>.safetensors          {"emb_params": (n_tokens, d)}: one embedding whose
                                                           trigger word is <name>, standing for all the tokens
Both also write concept.json (the concept and its base) and a README.md saying how to load them.
A kohya LoRA's scale is alpha / r; alpha = r keeps the expert's scale of 1.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import save_file

from fl2t.errors import Fl2tError
from fl2t.expert import Expert

LORA_FILE = "pytorch_lora_weights.safetensors"
FORMATS = ("diffusers", "kohya")
Format = Literal["diffusers", "kohya"]


def export_expert(expert: Expert, out: str | Path, format: Format = "diffusers") -> Path:
    """Write the expert into the new folder `out` in `format` ("diffusers" or "kohya"); returns `out`.

    The folder appears complete or not at all (written beside it, then renamed into place).
    """
    if format not in FORMATS:
        raise Fl2tError(f"export format {format!r} is not known; use one of: {', '.join(FORMATS)}")
    if expert.layerwise:
        raise Fl2tError(
            f"concept {expert.name!r} has layer-wise embeddings, which plain diffusers, AUTOMATIC1111 and ComfyUI "
            "cannot load; learn it without --layerwise to export it"
        )
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise Fl2tError(f"export folder {out} exists and is not empty; choose a new -o folder")
    write: Callable[[Expert, Path, Path], str] = _write_diffusers if format == "diffusers" else _write_kohya
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        readme = write(expert, tmp, out)
        (tmp / "README.md").write_text(readme)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def kohya_lora(expert: Expert) -> dict[str, torch.Tensor]:
    """The expert's LoRA in kohya's keys (SD 1.x: the diffusers UNet's module names with '_' for '.')."""
    rank = float(expert.rank)
    tensors = {}
    for module in expert.modules:
        key = "lora_unet_" + module.replace(".", "_")
        tensors[f"{key}.lora_down.weight"] = expert.lora[f"{module}.lora_A.weight"].contiguous()
        tensors[f"{key}.lora_up.weight"] = expert.lora[f"{module}.lora_B.weight"].contiguous()
        tensors[f"{key}.alpha"] = torch.tensor(rank)
    return tensors


def _write_diffusers(expert: Expert, tmp: Path, out: Path) -> str:
    StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=expert.lora, weight_name=LORA_FILE)
    (tmp / "textual_inversion").mkdir()
    files = []
    for i, token in enumerate(expert.spec.tokens):
        fname = f"{i:02d}-{re.sub(r'[^A-Za-z0-9_-]+', '_', token).strip('_') or 'token'}.safetensors"
        save_file({token: expert.token_embeddings[i].contiguous()}, tmp / "textual_inversion" / fname)
        files.append({"token": token, "file": f"textual_inversion/{fname}"})
    _write_concept_json(expert, tmp, {"format": "diffusers", "textual_inversion": files})
    loads = "\n".join(f'pipe.load_textual_inversion("{out}/{f["file"]}", token="{f["token"]}")' for f in files)
    return (
        f"# {expert.name}: an fl2t concept expert exported for plain diffusers\n\n"
        f"Base model: `{expert.base['id']}`. Prompt with `{expert.spec.subject}`.\n\n"
        "```python\n"
        "from diffusers import StableDiffusionPipeline\n"
        f'pipe = StableDiffusionPipeline.from_pretrained("{expert.base["id"]}")\n'
        f'pipe.load_lora_weights("{out}")\n'
        f"{loads}\n"
        f'image = pipe("{expert.spec.stable_prompt}").images[0]\n'
        "```\n"
    )


def _write_kohya(expert: Expert, tmp: Path, out: Path) -> str:
    name, rank = expert.name, expert.rank
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(rank),
        "ss_output_name": name,
        "fl2t_concept": json.dumps(expert.spec.model_dump()),
        "fl2t_base": expert.base["id"],
    }
    save_file(kohya_lora(expert), tmp / f"{name}.safetensors", metadata=metadata)
    (tmp / "embeddings").mkdir()
    save_file({"emb_params": expert.token_embeddings.contiguous()}, tmp / "embeddings" / f"{name}.safetensors")
    _write_concept_json(
        expert,
        tmp,
        {
            "format": "kohya",
            "lora": f"{name}.safetensors",
            "embedding": f"embeddings/{name}.safetensors",
            "trigger_word": name,
        },
    )
    # In AUTOMATIC1111 and ComfyUI an embedding is called by its file name, which stands for all the tokens.
    prompt = expert.spec.stable_prompt.replace(expert.spec.token_phrase, name)
    return (
        f"# {name}: an fl2t concept expert in the kohya format (AUTOMATIC1111, ComfyUI)\n\n"
        f"Base model: `{expert.base['id']}`. LoRA rank {rank}, alpha {rank} (weight 1 is the expert as learned).\n"
        f"The concept's token(s) `{expert.spec.token_phrase}` become the textual-inversion embedding `{name}`: "
        f"write `{name}` where fl2t prompts say `{expert.spec.token_phrase}`.\n\n"
        "## AUTOMATIC1111\n"
        f"Copy `{name}.safetensors` to `models/Lora/` and `embeddings/{name}.safetensors` to `embeddings/`, "
        f"then prompt\n`{prompt} <lora:{name}:1>`.\n\n"
        "## ComfyUI\n"
        f"Copy `{name}.safetensors` to `models/loras/` (load it with a LoraLoader node, strength 1) and\n"
        f"`embeddings/{name}.safetensors` to `models/embeddings/`; prompt "
        f"`{prompt.replace(name, 'embedding:' + name)}`.\n\n"
        "## diffusers\n"
        "```python\n"
        "from diffusers import StableDiffusionPipeline\n"
        f'pipe = StableDiffusionPipeline.from_pretrained("{expert.base["id"]}")\n'
        f'pipe.load_lora_weights("{out}", weight_name="{name}.safetensors")\n'
        f'pipe.load_textual_inversion("{out}/embeddings/{name}.safetensors", token="{name}")\n'
        f'image = pipe("{prompt}").images[0]\n'
        "```\n"
    )


def _write_concept_json(expert: Expert, tmp: Path, files: dict) -> None:
    record = {**expert.spec.model_dump(), "base": expert.base, **files}
    (tmp / "concept.json").write_text(json.dumps(record, indent=2) + "\n")
