"""The world's compact vocabulary (issue 14: shipped weights <= 45 MB): only the token rows the world uses, the same
texts the same way, in both text towers."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from transformers import CLIPTextModel, CLIPTokenizer

from fl2t.errors import Fl2tError
from fl2t.metrics import ClipEvaluator
from fl2t.text import add_tokens
from fl2t.worldkit.train import world_words
from fl2t.worldkit.vocab import TOKENIZER_FILE, compact_vocabulary

TEXTS = [
    "a small red and blue striped star on a black background, top left",
    "a blue ring to the right of a red star on a gray background",
    "a circle in the style of neon",
    "a large purple diamond, in the center",
    "",
]


@pytest.fixture(scope="module")
def full(tmp_path_factory) -> tuple[Path, Path]:
    """A world's text encoder, tokenizer and evaluator before compaction, as a v1 build leaves them: random-init,
    the real CLIP vocabulary of 49408 rows, the rows of tokens the world never uses zero (the shipped world v2 is
    compact already)."""
    from fl2t.models import clip_tokenizer
    from fl2t.worldkit import models
    from fl2t.worldkit.train import world_token_ids, zero_unused_rows

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("full")
    base, evaluator = root / "base", root / "evaluator"
    text, clip = models.new_text_encoder(), models.new_evaluator()
    for tower in (text, clip.text_model):
        zero_unused_rows(tower.get_input_embeddings(), world_token_ids(True))
    text.save_pretrained(base / "text_encoder")
    clip_tokenizer().save_pretrained(base / "tokenizer")
    clip.save_pretrained(evaluator)
    clip_tokenizer().save_pretrained(evaluator)
    models.image_processor().save_pretrained(evaluator)
    return base, evaluator


@pytest.fixture(scope="module")
def compact(full, tmp_path_factory) -> tuple[Path, Path, int]:
    """A copy of `full`, compacted."""
    root = tmp_path_factory.mktemp("compact")
    base, evaluator = root / "base", root / "evaluator"
    shutil.copytree(full[0], base)
    shutil.copytree(full[1], evaluator)
    return base, evaluator, compact_vocabulary(base, evaluator, world_words(v2=True))


def test_the_compact_vocabulary_keeps_the_world_words_and_shrinks_both_towers(full, compact):
    base, evaluator, size = compact
    assert 600 < size < 1000  # 512 single bytes, the world's tokens and their merges, start and end of text
    full_tok, tok = (
        CLIPTokenizer.from_pretrained(full[0] / "tokenizer"),
        CLIPTokenizer.from_pretrained(base / "tokenizer"),
    )
    assert len(tok) == size and len(full_tok) == 49408
    for text in TEXTS + world_words(v2=True):
        assert tok.tokenize(text) == full_tok.tokenize(text)
    assert (base / "text_encoder" / "model.safetensors").stat().st_size < 1 * 2**20  # 12.5 MB before
    assert (evaluator / "model.safetensors").stat().st_size < 3 * 2**20  # 14.3 MB before
    assert (evaluator / TOKENIZER_FILE).read_bytes() == (base / "tokenizer" / TOKENIZER_FILE).read_bytes()


def test_the_compact_towers_embed_world_texts_as_the_full_ones_do(full, compact):
    base, evaluator, _ = compact
    full_enc, enc = (
        CLIPTextModel.from_pretrained(full[0] / "text_encoder"),
        CLIPTextModel.from_pretrained(base / "text_encoder"),
    )
    full_tok, tok = (
        CLIPTokenizer.from_pretrained(full[0] / "tokenizer"),
        CLIPTokenizer.from_pretrained(base / "tokenizer"),
    )
    pad = dict(padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        for text in TEXTS:
            a, b = full_enc(full_tok(text, **pad).input_ids), enc(tok(text, **pad).input_ids)
            torch.testing.assert_close(b.last_hidden_state, a.last_hidden_state, rtol=0, atol=1e-5)
            torch.testing.assert_close(b.pooler_output, a.pooler_output, rtol=0, atol=1e-5)  # pooled at end of text
    full_clip, clip = ClipEvaluator.load(full[1]), ClipEvaluator.load(evaluator)
    torch.testing.assert_close(clip.text_embeds(TEXTS), full_clip.text_embeds(TEXTS), rtol=0, atol=1e-5)


def test_compacting_again_changes_nothing_and_a_new_concept_token_gets_the_next_row(compact):
    base, evaluator, size = compact
    before = (base / "tokenizer" / TOKENIZER_FILE).read_bytes()
    assert compact_vocabulary(base, evaluator, world_words(v2=True)) == size
    assert (base / "tokenizer" / TOKENIZER_FILE).read_bytes() == before
    tok, enc = CLIPTokenizer.from_pretrained(base / "tokenizer"), CLIPTextModel.from_pretrained(base / "text_encoder")
    ids = add_tokens(tok, enc, ["<c-new>"])  # as `fl2t learn` adds a concept's token
    assert ids == [size] and enc.get_input_embeddings().num_embeddings == size + 1


def test_a_word_the_world_never_uses_still_tokenizes_into_kept_pieces(full, compact):
    base, _, size = compact
    full_tok, tok = (
        CLIPTokenizer.from_pretrained(full[0] / "tokenizer"),
        CLIPTokenizer.from_pretrained(base / "tokenizer"),
    )
    assert full_tok.tokenize("zebra") == ["zebra</w>"]
    pieces = tok.tokenize("zebra")
    assert len(pieces) > 1 and "".join(pieces) == "zebra</w>"
    assert all(i < size for i in tok("a zebra").input_ids)


def test_a_half_compacted_folder_is_refused_with_a_message_not_an_index_error(full, compact, tmp_path):
    base, evaluator, _ = compact
    half = tmp_path / "base"
    shutil.copytree(base, half)
    shutil.copy(full[0] / "tokenizer" / TOKENIZER_FILE, half / "tokenizer" / TOKENIZER_FILE)  # full tokenizer
    with pytest.raises(Fl2tError, match="rebuild"):
        compact_vocabulary(half, evaluator, world_words(v2=True))
