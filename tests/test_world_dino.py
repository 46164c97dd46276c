"""The tiny world's DINO-like encoder (fl2t.worldkit.dino): trains, saves, loads through DinoEvaluator, keeps colours."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fl2t.errors import Fl2tError
from fl2t.metrics import DinoEvaluator
from fl2t.world.concepts import concept_appearances
from fl2t.world.generator import Scene, random_scene, render
from fl2t.worldkit import dino, train


@pytest.fixture(scope="module")
def data() -> train.Dataset:
    rng = np.random.default_rng(0)
    scenes = [random_scene(rng, rich=True, held_out=None, exclude=concept_appearances()) for _ in range(200)]
    return train.render_dataset(scenes, lambda n: None)


def test_trained_encoder_loads_through_dino_evaluator(data, tmp_path):
    encoder, processor = dino.train_dino(data, steps=3, seed=0, tick=lambda n: None, batch=16, local_views=2)
    encoder.save_pretrained(tmp_path, safe_serialization=True)
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    ev = DinoEvaluator.load(tmp_path)
    images = [render(s) for s in data.scenes[:6]]
    a, b = ev.image_embeds(images), ev.image_embeds(images)
    assert a.shape == (6, encoder.config.hidden_size)
    assert torch.allclose(a.norm(dim=-1), torch.ones(6), atol=1e-5)
    assert torch.equal(a, b)
    # the loaded model is the trained teacher encoder: same CLS features from the same pixels
    pixels = data.batch(np.arange(6))
    with torch.no_grad():
        own = torch.nn.functional.normalize(encoder(pixel_values=pixels).last_hidden_state[:, 0], dim=-1)
    assert torch.allclose(a, own, atol=1e-4)
    # different pictures, different features
    assert (a @ a.T).fill_diagonal_(0).max() < 0.9999


def test_teacher_is_the_ema_of_the_student(data):
    run = dino.DinoTraining(steps=10, seed=0, local_views=2)
    teacher0 = [p.clone() for p in run.teacher.parameters()]
    student0 = [p.clone() for p in run.student.parameters()]
    assert all(torch.equal(t, s) for t, s in zip(teacher0, student0))  # the teacher starts as the student
    m = run.momentum()
    assert 0.98 < m < 1
    run.step(data.batch(np.arange(16)))
    moved = 0
    for t0, t1, s1 in zip(teacher0, run.teacher.parameters(), run.student.parameters()):
        assert torch.allclose(t1, m * t0 + (1 - m) * s1, atol=1e-6)
        moved += int(not torch.equal(t1, t0))
    assert moved > 10  # the student changed and the teacher followed part of the way
    assert not any(p.requires_grad for p in run.teacher.parameters())
    assert run.momentum() > m  # the momentum rises toward 1 over training


def test_views_keep_a_pictures_colours():
    red, blue = torch.tensor([1.0, -1.0, -1.0]), torch.tensor([-1.0, -1.0, 1.0])
    x = blue.view(1, 3, 1, 1).repeat(8, 1, 32, 32)
    x[:, :, 8:20, 10:26] = red.view(3, 1, 1)
    gen = torch.Generator().manual_seed(0)
    for size, scale in ((32, dino.GLOBAL_SCALE), (dino.LOCAL_SIZE, dino.LOCAL_SCALE)):
        v = dino.random_crops(x, size, scale, gen)
        assert v.shape == (8, 3, size, size)
        # every pixel is a blend of red and blue (bilinear resampling), never another colour
        a = (v[:, 0] + 1) / 2  # the share of red
        blend = a.unsqueeze(1) * red.view(1, 3, 1, 1) + (1 - a.unsqueeze(1)) * blue.view(1, 3, 1, 1)
        assert torch.allclose(v, blend, atol=1e-5)
        assert a.min() >= -1e-6 and a.max() <= 1 + 1e-6
    # on world pictures: a view's colours stay within each picture's range, channel by channel
    rng = np.random.default_rng(1)
    pics = torch.stack(
        [torch.from_numpy(np.asarray(render(random_scene(rng, rich=True))).copy()).permute(2, 0, 1) for _ in range(8)]
    ).float()
    v = dino.random_crops(pics, dino.LOCAL_SIZE, dino.LOCAL_SCALE, gen)
    lo, hi = pics.amin(dim=(2, 3), keepdim=True), pics.amax(dim=(2, 3), keepdim=True)
    assert (v >= lo - 1e-3).all() and (v <= hi + 1e-3).all()


def test_background_swap_changes_only_a_grey_background():
    rng = np.random.default_rng(2)
    scenes = [Scene("star", "red", "gray", "in the center", "large", jitter=i) for i in range(4)]
    scenes += [Scene("circle", "blue", "black", "top left", "small", style="pastel", jitter=9)]
    x = torch.stack([torch.from_numpy(np.asarray(render(s)).copy()).permute(2, 0, 1) for s in scenes]).float()
    x = x / 127.5 - 1
    y = dino.swap_background(x, torch.Generator().manual_seed(int(rng.integers(100))), p=1.0)
    assert torch.equal(y[4], x[4])  # pastel's cream background is the style: kept
    for i in range(4):
        changed = (y[i] != x[i]).any(dim=0)
        assert 0.5 < changed.float().mean() < 0.95  # the background, not the object
        assert torch.equal(y[i, :, 16, 16], x[i, :, 16, 16])  # the star's centre keeps its red
        new = y[i][:, changed]
        assert torch.allclose(new, new[:, :1].expand_as(new))  # one new grey for the whole background
        assert torch.allclose(new[0], new[1]) and torch.allclose(new[1], new[2])


def test_channel_permutation_keeps_each_pixels_values():
    x = torch.rand(16, 3, 8, 8) * 2 - 1
    y = dino.permute_channels(x, torch.Generator().manual_seed(0), p=1.0)
    assert torch.equal(y.sort(dim=1).values, x.sort(dim=1).values)  # the same three values at every pixel
    assert all(not torch.equal(y[i], x[i]) for i in range(16))  # never the identity when chosen
    assert torch.equal(dino.permute_channels(x, torch.Generator().manual_seed(0), p=0.0), x)


def test_sinkhorn_targets_are_distributions_using_prototypes_evenly():
    scores = torch.randn(64, 32) * 0.3 + torch.linspace(0, 1, 32)  # a bias toward the last prototypes
    q = dino.sinkhorn(scores, dino.TEACHER_TEMP)
    assert torch.allclose(q.sum(dim=1), torch.ones(64), atol=1e-5)
    use = q.mean(dim=0)
    assert use.max() / use.min() < 5  # softmax alone would give nearly everything to the last prototypes
    soft = torch.softmax(scores / dino.TEACHER_TEMP, dim=1).mean(dim=0)
    assert soft.max() / soft.min() > 100


def test_patch_objective_reads_only_masked_patches_and_the_saved_encoder_has_no_mask_token(data, tmp_path):
    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(4, 6, 8, generator=gen), torch.randn(4, 6, 8, generator=gen)
    mask = torch.zeros(4, 6, dtype=torch.bool)
    mask[:, :2] = True
    loss = dino.masked_patch_loss(student, teacher, mask)
    moved = student.clone()
    moved[:, 2:] += 5.0  # unmasked patches: not part of the objective
    assert torch.allclose(dino.masked_patch_loss(moved, teacher, mask), loss)
    moved[:, :2] += torch.randn(4, 2, 8, generator=gen)
    assert not torch.allclose(dino.masked_patch_loss(moved, teacher, mask), loss)

    run = dino.DinoTraining(steps=2, seed=0, local_views=1, patch_loss=1.0)
    masks = run.masks(64)
    assert masks.shape == (64, 64) and 0.05 < masks.float().mean() < 0.55
    before = run.student.patch_head.out.weight.clone()
    assert np.isfinite(run.step(data.batch(np.arange(8))))
    assert not torch.equal(run.student.patch_head.out.weight, before)  # the patch objective trains its head
    encoder = run.encoder()
    assert run.teacher.encoder.embeddings.mask_token is not None
    assert not any("mask_token" in k for k in encoder.state_dict())
    encoder.save_pretrained(tmp_path, safe_serialization=True)
    dino.image_processor().save_pretrained(tmp_path)
    images = [render(s) for s in data.scenes[:3]]
    a = DinoEvaluator.load(tmp_path).image_embeds(images)
    with torch.no_grad():
        own = torch.nn.functional.normalize(
            encoder(pixel_values=data.batch(np.arange(3))).last_hidden_state[:, 0], dim=-1
        )
    assert torch.allclose(a, own, atol=1e-4)


def test_a_v2_build_trains_the_dino_stage_into_the_manifest_and_a_v1_build_has_none(tmp_path):
    from fl2t.world.concepts import CONCEPTS
    from fl2t.worldkit import build, check

    tiny = dict(rich_images=48, plain_images=48, vae_steps=1, evaluator_steps=1, base_steps=1, base_batch=8, threads=1)
    v2 = build.BuildSettings(**{**build.V2_MIX, **tiny, "compact_vocabulary": False, "dino_steps": 2})
    assert build.build(tmp_path / "v2", v2, until="evaluator") is None  # the DINO stage is still to come
    assert not (tmp_path / "v2" / "dino").exists()
    unet = tmp_path / "v2" / "base" / "unet" / "diffusion_pytorch_model.safetensors"
    written = unet.stat().st_mtime_ns
    manifest = build.build(tmp_path / "v2", v2, resume=True)
    assert unet.stat().st_mtime_ns == written  # the first three stages are loaded, not trained again
    files = json.loads(manifest.read_text())["files"]
    assert "dino/model.safetensors" in files and "dino/preprocessor_config.json" in files
    assert json.loads(manifest.read_text())["settings"]["dino_steps"] == 2
    ev = DinoEvaluator.load(tmp_path / "v2" / "dino")
    assert ev.image_embeds([render(random_scene(np.random.default_rng(0), rich=True))]).shape == (
        1,
        dino.new_encoder().config.hidden_size,
    )

    manifest = build.build(tmp_path / "v1", build.BuildSettings(**tiny), until="evaluator")
    assert manifest is not None and not (tmp_path / "v1" / "dino").exists()

    # The DINO gate reads the encoder when the weights have one, and fails, saying why, when they do not.
    ctx = check.CheckContext(tmp_path / "v2", steps=2)
    (row,) = check.gate_dino_separation(ctx)
    assert 0.0 <= row.value <= 1.0 and row.threshold == 0.90 and "lowest" in row.detail
    assert set(ctx.separation.fresh) == {c.name for c in CONCEPTS}
    (row,) = check.gate_dino_separation(check.CheckContext(tmp_path / "v1", steps=2))
    assert row.value == 0.0 and not row.passed and "no DINO-like encoder" in row.detail


def test_the_ca_ceiling_is_each_concepts_renders_nearest_its_own_references():
    from PIL import Image

    from fl2t.worldkit.check import SeparationImages

    def solid(rgb):
        return [Image.new("RGB", (8, 8), rgb) for _ in range(3)]

    colours = {"a": (255, 0, 0), "b": (0, 255, 0), "c": (0, 0, 255)}
    classes = {name: solid((120, 120, 120)) for name in colours}

    def embed(images):
        x = torch.tensor(np.stack([np.asarray(im, dtype=np.float32).mean(axis=(0, 1)) for im in images]))
        return torch.nn.functional.normalize(x + 1.0, dim=-1)

    right = SeparationImages(
        {n: solid(c) for n, c in colours.items()}, {n: solid(c) for n, c in colours.items()}, classes
    )
    assert right.accuracies(embed) == {"a": 1.0, "b": 1.0, "c": 1.0}
    swapped = {"a": solid(colours["b"]), "b": solid(colours["a"]), "c": solid((130, 130, 130))}
    wrong = SeparationImages({n: solid(c) for n, c in colours.items()}, swapped, classes)
    assert wrong.accuracies(embed) == {"a": 0.0, "b": 0.0, "c": 0.0}  # c's renders are nearest its class


def test_a_build_in_two_processes_makes_the_same_weights_and_records_every_stages_time(tmp_path):
    from fl2t.worldkit import build

    tiny = dict(rich_images=32, plain_images=32, vae_steps=1, evaluator_steps=1, base_steps=1, base_batch=8, threads=1)
    settings = build.BuildSettings(**{**build.V2_MIX, **tiny, "compact_vocabulary": False, "dino_steps": 1})
    (tmp_path / "two").mkdir()
    (tmp_path / "two" / build.SECONDS_FILE).write_text('{"base_steps_trained": 7}')  # an earlier build's
    one = json.loads(build.build(tmp_path / "one", settings).read_text())
    two = json.loads(build.build(tmp_path / "two", settings, jobs=2).read_text())
    assert two["files"] == one["files"] and two["settings"] == one["settings"]
    assert two["settings"]["base_steps"] == 1
    assert {"vae", "base", "evaluator", "dino"} <= set(two["build_seconds"])
    with pytest.raises(Fl2tError, match="--jobs is 1 or 2"):
        build.build(tmp_path / "three", settings, jobs=3)
