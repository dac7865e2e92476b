"""Build the CLIP BPE tokenizer files that Stable Diffusion folders ship (vocab.json, merges.txt)
from the original CLIP BPE data (MIT licence), which is bundled in the PyPI wheel `open-clip-torch`
as `open_clip/bpe_simple_vocab_16e6.txt.gz`.

SD's merges.txt is lines 1..48894 of that file (line 0 is a version header), and vocab.json is:
the 256 byte-level characters, the same with `</w>`, one entry per merge (the joined pair), then
`<|startoftext|>` and `<|endoftext|>`: 49408 entries in all.

    python tools/reference/make_clip_vocab.py BPE_GZ OUT_DIR

Standard library only. make_clip_fixtures.py and make_single_file_fixtures.py build their CLIP
vocabularies with the same helpers (bpe_vocab, write_bpe).
"""
import gzip
import json
import sys
from pathlib import Path


def bytes_to_unicode():
    # GPT-2 / CLIP reversible byte -> printable character map.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def bpe_vocab(merges):
    """CLIP's vocabulary for the merges [(a, b)]: the byte symbols, the same with `</w>`, every merge
    joined, `<|startoftext|>`, `<|endoftext|>`."""
    vocab = list(bytes_to_unicode().values())
    return vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]


def write_bpe(folder, vocab, merges):
    """`folder`/vocab.json ({token: id}, UTF-8) and `folder`/merges.txt (a version line, one `a b` a line)."""
    (Path(folder) / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False),
                                             encoding="utf-8")
    (Path(folder) / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                             encoding="utf-8")


def main(gz_path, out_dir):
    lines = gzip.open(gz_path).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]  # 48894 merges
    vocab = bpe_vocab(merges)
    assert len(vocab) == 49408, len(vocab)
    write_bpe(out_dir, vocab, merges)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
