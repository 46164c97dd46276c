"""The shipped world's vocabulary, compacted (issue 14: shipped weights <= 45 MB).

The world's models train on the real CLIP BPE vocabulary (49408 token rows), but the world's captions use
fewer than a hundred of them; every other row stays zero (`train.zero_unused_rows`) and is 12.6 MB of zeros in
each text tower. `compact_vocabulary` keeps, in both the base pipeline and the evaluator:

- the rows of every token a world word is made of, and every row that is not zero;
- the 512 single-byte tokens and the two special tokens, so any text still tokenizes (a word the world never
  saw splits into kept pieces, where before it was one token on a zero row: such a prompt reads differently);
- every intermediate token of those tokens' BPE merges, and the merges among kept tokens in their original order.

Token ids are renumbered in their original order (start and end of text last). A kept merge list that contains
every merge a word's BPE applies tokenizes that word into the same pieces, so the world's captions give the same
embeddings, the same end-of-text position and the same outputs, to float rounding (a matrix kernel's last bits
depend on how a tensor lies in the file it was loaded from) (`tests/test_world_vocab.py`). A 49408-row world
compacts to 671 rows: base text encoder 12.5 -> 0.6 MB, evaluator 14.3 -> 2.4 MB, tokenizer 3.5 MB -> 21 KB.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable
from pathlib import Path

import torch
from transformers import CLIPModel, CLIPTextModel, CLIPTokenizer

from fl2t.errors import Fl2tError
from fl2t.models import clip_tokenizer

SPECIAL = ("<|startoftext|>", "<|endoftext|>")
TOKENIZER_FILE = "tokenizer.json"


def _merge(pair: str | list[str]) -> tuple[str, str]:
    a, b = pair.split(" ") if isinstance(pair, str) else pair
    return a, b


def kept_tokens(tokenizer: dict, tokens: Iterable[str]) -> set[str]:
    """Token strings to keep: `tokens`, every token no merge makes (single bytes, special tokens), and the merge
    tree under each of them."""
    vocab: dict[str, int] = tokenizer["model"]["vocab"]
    made_of = {}
    for pair in tokenizer["model"]["merges"]:
        a, b = _merge(pair)
        made_of.setdefault(a + b, (a, b))
    todo = [*tokens, *(t for t in vocab if t not in made_of), *SPECIAL]
    keep: set[str] = set()
    while todo:
        t = todo.pop()
        if t not in keep:
            keep.add(t)
            todo.extend(made_of.get(t, ()))
    return keep


def _tokenizer_from(tokenizer: dict) -> CLIPTokenizer:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / TOKENIZER_FILE).write_text(json.dumps(tokenizer))
        (Path(tmp) / "tokenizer_config.json").write_text(
            json.dumps({"model_max_length": 77, "tokenizer_class": "CLIPTokenizer"})
        )
        return CLIPTokenizer.from_pretrained(tmp)


def compacted(tokenizer: dict, keep: set[str]) -> dict:
    """The tokenizer with only `keep`, ids renumbered in their old order."""
    vocab: dict[str, int] = tokenizer["model"]["vocab"]
    old_ids = sorted(vocab[t] for t in keep)
    new_id = {old: new for new, old in enumerate(old_ids)}
    out = copy.deepcopy(tokenizer)
    out["model"]["vocab"] = {t: new_id[i] for t, i in sorted(vocab.items(), key=lambda kv: kv[1]) if i in new_id}
    out["model"]["merges"] = [m for m in tokenizer["model"]["merges"] if {*_merge(m), "".join(_merge(m))} <= keep]
    for added in out["added_tokens"]:
        added["id"] = new_id[vocab[added["content"]]]
    post = out["post_processor"]
    for key in ("sep", "cls"):
        post[key][1] = new_id[vocab[post[key][0]]]
    return out


def _special_ids(tokenizer: dict) -> dict[str, int]:
    vocab = tokenizer["model"]["vocab"]
    bos, eos = (vocab[t] for t in SPECIAL)
    return {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": eos}


def _token_table(model: torch.nn.Module, folder: Path) -> tuple[dict[str, int], torch.Tensor]:
    """The token ids of the tokenizer in `folder` and the token table of `model` that they index."""
    vocab: dict[str, int] = json.loads((folder / TOKENIZER_FILE).read_text())["model"]["vocab"]
    weight = model.get_input_embeddings().weight.detach()
    if len(vocab) != len(weight):  # e.g. a compaction killed half-way
        raise Fl2tError(
            f"{folder}: the tokenizer has {len(vocab)} tokens and the text model {len(weight)} rows; delete that "
            "stage's folder and rebuild it with `fl2t world build --resume`"
        )
    return vocab, weight


def compact_vocabulary(base: Path, evaluator: Path, words: Iterable[str]) -> int:
    """Give a world's base pipeline (`base`/text_encoder, `base`/tokenizer) and its evaluator (`evaluator`, a
    CLIPModel folder with its tokenizer) one compact vocabulary drawn from the real CLIP BPE vocabulary; returns
    its size. Either may already be compact (a stage rebuilt alone): rows are matched by token string.
    Idempotent. Raises when a world word would tokenize differently from the real CLIP tokenizer."""
    words = list(words)
    full_tok = clip_tokenizer()
    full = json.loads(full_tok.backend_tokenizer.to_str())
    text_encoder = CLIPTextModel.from_pretrained(base / "text_encoder")
    clip = CLIPModel.from_pretrained(evaluator)
    folders = [base / "tokenizer", evaluator]
    models = (text_encoder, clip.text_model)  # the CLIPModel's text tower holds its token table
    tables = [_token_table(m, f) for m, f in zip(models, folders)]
    used = set()
    for vocab, weight in tables:
        nonzero = (weight.abs().sum(dim=1) > 0).tolist()
        used |= {t for t, i in vocab.items() if nonzero[i]}
    new = compacted(full, kept_tokens(full, used | {p for w in words for p in full_tok.tokenize(w)}))
    after = _tokenizer_from(new)
    for w in words:
        if full_tok.tokenize(w) != after.tokenize(w):
            raise Fl2tError(f"compacting the vocabulary would change how {w!r} tokenizes")
    tokens = sorted(new["model"]["vocab"], key=new["model"]["vocab"].get)
    ids = {"vocab_size": len(tokens), **_special_ids(new)}
    for model, (vocab, weight) in zip(models, tables):
        rows = torch.zeros(len(tokens), weight.shape[1])
        have = [k for k, t in enumerate(tokens) if t in vocab]
        rows[have] = weight[[vocab[tokens[k]] for k in have]]
        model.set_input_embeddings(torch.nn.Embedding.from_pretrained(rows, freeze=False))
    for config in (text_encoder.config, clip.config.text_config):  # read again when the folders are loaded
        for k, v in ids.items():
            setattr(config, k, v)
    text_encoder.save_pretrained(base / "text_encoder", safe_serialization=True)
    clip.save_pretrained(evaluator, safe_serialization=True)
    for f in folders:
        (f / TOKENIZER_FILE).write_text(json.dumps(new, ensure_ascii=False, indent=2) + "\n")
    return len(tokens)
