"""Export one expert as plain diffusers files: a LoRA and textual-inversion embeddings."""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path

from diffusers import StableDiffusionPipeline
from safetensors.torch import save_file

from fl2t.errors import Fl2tError
from fl2t.expert import Expert

LORA_FILE = "pytorch_lora_weights.safetensors"


def export_expert(expert: Expert, out: str | Path) -> Path:
    """Write `out/pytorch_lora_weights.safetensors` and one `out/textual_inversion/*.safetensors` per token.

    Plain diffusers loads them with `pipe.load_lora_weights(out)` and
    `pipe.load_textual_inversion(path, token=token)` for each token file (see the README.md written there).
    """
    if expert.layerwise:
        raise Fl2tError(
            f"concept {expert.name!r} has layer-wise embeddings, which plain diffusers cannot load; "
            "learn it without --layerwise to export it"
        )
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise Fl2tError(f"export folder {out} exists and is not empty; choose a new -o folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=expert.lora, weight_name=LORA_FILE)
        (tmp / "textual_inversion").mkdir()
        files = []
        for i, token in enumerate(expert.spec.tokens):
            fname = f"{i:02d}-{re.sub(r'[^A-Za-z0-9_-]+', '_', token).strip('_') or 'token'}.safetensors"
            save_file({token: expert.token_embeddings[i].contiguous()}, tmp / "textual_inversion" / fname)
            files.append({"token": token, "file": f"textual_inversion/{fname}"})
        (tmp / "concept.json").write_text(
            json.dumps({**expert.spec.model_dump(), "base": expert.base, "textual_inversion": files}, indent=2) + "\n"
        )
        loads = "\n".join(f'pipe.load_textual_inversion("{out}/{f["file"]}", token="{f["token"]}")' for f in files)
        (tmp / "README.md").write_text(
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
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
