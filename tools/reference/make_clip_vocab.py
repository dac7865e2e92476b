"""Build the CLIP BPE tokenizer files that Stable Diffusion folders ship (vocab.json, merges.txt)
from the original CLIP BPE data (MIT licence), which is bundled in the PyPI wheel `open-clip-torch`
as `open_clip/bpe_simple_vocab_16e6.txt.gz`.

SD's merges.txt is lines 1..48894 of that file (line 0 is a version header), and vocab.json is:
the 256 byte-level characters, the same with `</w>`, one entry per merge (the joined pair), then
`<|startoftext|>` and `<|endoftext|>`: 49408 entries in all.

    python tools/reference/make_clip_vocab.py BPE_GZ OUT_DIR
"""
import gzip
import json
import sys


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


def main(gz_path, out_dir):
    lines = gzip.open(gz_path).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]  # 48894 merges
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    for m in merges:
        vocab.append("".join(m.split()))
    vocab.extend(["<|startoftext|>", "<|endoftext|>"])
    assert len(vocab) == 49408, len(vocab)
    with open(f"{out_dir}/vocab.json", "w", encoding="utf-8") as f:
        json.dump({tok: i for i, tok in enumerate(vocab)}, f, ensure_ascii=False)
    with open(f"{out_dir}/merges.txt", "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        f.write("\n".join(merges) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
