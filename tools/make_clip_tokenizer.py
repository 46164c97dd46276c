"""Write the real CLIP BPE tokenizer (vocab.json + merges.txt) from the open_clip_torch wheel.

The vocabulary ships inside that wheel as `open_clip/bpe_simple_vocab_16e6.txt.gz`; transformers'
CLIPTokenizer reads it as vocab.json + merges.txt. Run once; the output is committed under
src/fl2t/assets/clip_tokenizer/:

    pip download --no-deps -d /tmp/oc open_clip_torch
    python tools/make_clip_tokenizer.py /tmp/oc/open_clip_torch-*.whl src/fl2t/assets/clip_tokenizer
"""

import gzip
import json
import sys
import zipfile
from pathlib import Path


def bytes_to_unicode() -> dict[int, str]:
    # The byte -> printable-character table of GPT-2/CLIP BPE.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def main(wheel: str, out: str) -> None:
    with zipfile.ZipFile(wheel) as zf:
        text = gzip.decompress(zf.read("open_clip/bpe_simple_vocab_16e6.txt.gz")).decode("utf-8")
    merges = text.split("\n")[1 : 49152 - 256 - 2 + 1]
    byte_chars = list(bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
