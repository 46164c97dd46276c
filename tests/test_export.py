import torch
from diffusers import StableDiffusionPipeline

from fl2t.export import export_expert
from fl2t.library import Library
from fl2t.pipeline import ExpertPipeline


def test_exported_files_load_in_plain_diffusers_and_match(tmp_path, learned_library, tiny_base):
    expert = Library(learned_library).expert("c-stripeball")
    out = export_expert(expert, tmp_path / "export")

    plain = StableDiffusionPipeline.from_pretrained(tiny_base, safety_checker=None, requires_safety_checker=False)
    plain.load_lora_weights(out)
    plain.load_textual_inversion(str(out / "textual_inversion" / "00-c-stripeball.safetensors"), token="<c-stripeball>")

    ours = ExpertPipeline.from_library(learned_library, "c-stripeball")
    prompt = "a photo of <c-stripeball> ball"
    kw = dict(num_inference_steps=4, output_type="np")
    a = plain(prompt, generator=torch.Generator().manual_seed(3), **kw).images
    b = ours(prompt, generator=torch.Generator().manual_seed(3), **kw).images
    assert abs(a - b).max() < 1e-5
    # and the LoRA really is in play: without it plain diffusers draws something else
    plain.unload_lora_weights()
    c = plain(prompt, generator=torch.Generator().manual_seed(3), **kw).images
    assert abs(a - c).max() > 1e-3
