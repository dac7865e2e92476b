"""Golden CLIP-metric fixtures for disendiff's `model::clip_model` and `eval::clip_score`
(contract: FIXTURES.md, section "CLIP metrics").

Builds a tiny random transformers `CLIPModel` (both towers) with a tiny BPE vocabulary, saves it
as a transformers folder (config.json, model.safetensors, tokenizer files,
preprocessor_config.json), writes a few small PNGs (one non-square needing the resize and the
centre crop, one smaller than the model size needing an upscale) and records, on the CPU in
float32:
- PIL's bicubic resize of a random uint8 image to several sizes (exact uint8 goldens);
- `CLIPImageProcessorPil` pixel values of every image;
- `get_image_features` / `get_text_features` of the images and of the CLIPScore texts;
- CLIPScore = 2.5 * max(cos(image, text), 0) with text "A photo depicts " + prompt after removing
  the modifier tokens `<...>` and squeezing spaces, and image alignment = mean cosine of an
  image's embedding with every reference image's.

    python tools/reference/make_clip_fixtures.py --out tests/fixtures

make_sd_fixtures.py calls it at its end. Everything is seeded: a rerun with the same library
versions writes the same files.
"""
import common  # first: pins threads and determinism before torch is imported

import argparse
import re
import shutil
from pathlib import Path

import numpy as np
import PIL
import PIL.Image
import torch

import transformers
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from common import perturb, save_tensors, write_json

from make_clip_vocab import bpe_vocab, write_bpe  # a sibling script (standard library only)

SEED = 3500  # gives two positive cosines and one clamped to 0
IMAGE_SIZE = 32
# name -> (width, height): one exactly the model size, one landscape needing a downscale and a
# horizontal crop, one portrait smaller than the model size needing an upscale and a vertical crop
IMAGES = {"clip-img-0.png": (32, 32), "clip-img-1.png": (53, 37), "clip-img-2.png": (21, 30)}
REFERENCES = {"r0.png": (40, 40), "r1.png": (45, 33)}
PAIRS = [
    ("clip-img-0.png", "a <new1> dog and a <new2> cat"),
    ("clip-img-1.png", "a photo of a red ball"),
    ("clip-img-2.png", "  <new1>   sleeping  on a sofa, "
     + "with a very long description of the room around it " * 8),  # > 77 tokens: truncated
]
# PIL bicubic goldens: a random source and target sizes (width, height)
RESIZE_SOURCE = (23, 17)
RESIZE_TARGETS = [(46, 34), (9, 7), (23, 40), (61, 17), (5, 3)]
WORDS = "a photo depicts of dog and cat red ball sleeping on sofa with very long description the room around it".split()


def clip_text(prompt):
    """The authors' CLIPScore text: modifier tokens removed, spaces squeezed."""
    return "A photo depicts " + " ".join(re.sub(r"<[^<>\s]+>", " ", prompt).split())


def write_tokenizer(folder):
    """A tiny CLIP BPE vocabulary: every byte symbol alone and word-final, merges that build the
    words of WORDS left to right, and the two special tokens."""
    merges = []
    for w in WORDS:
        parts = list(w[:-1]) + [w[-1] + "</w>"]
        cur = parts[0]
        for p in parts[1:]:
            if (cur, p) not in merges:
                merges.append((cur, p))
            cur = cur + p
    vocab = bpe_vocab(merges)
    assert len(set(vocab)) == len(vocab)  # a joined merge is never a byte symbol nor another merge
    write_bpe(folder, vocab, merges)
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
    tok.save_pretrained(folder)
    if (folder / "tokenizer.json").exists():
        (folder / "tokenizer.json").unlink()  # vocab.json + merges.txt, as openai/clip-* ship them
    return CLIPTokenizer.from_pretrained(folder), len(vocab)


def make_image(size, seed):
    """A smooth colour pattern plus noise, uint8 RGB (w, h)."""
    w, h = size
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    base = np.stack([
        128 + 100 * np.sin(x / (2 + seed % 3) + rng.uniform(0, 6)),
        128 + 100 * np.cos(y / 3.0 + rng.uniform(0, 6)),
        128 + 90 * np.sin((x + y) / 5.0 + rng.uniform(0, 6)),
    ], axis=-1)
    arr = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
    return PIL.Image.fromarray(arr, "RGB")


def build(out):
    folder = out / "clip-tiny"
    gold = out / "golden"
    refs = gold / "clip-refs"
    for p in (folder, refs):
        if p.exists():
            shutil.rmtree(p)
    folder.mkdir(parents=True)
    refs.mkdir(parents=True)
    gold.mkdir(exist_ok=True)

    tok, vocab_size = write_tokenizer(folder)
    bos, eos = tok.convert_tokens_to_ids("<|startoftext|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    config = CLIPConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
                         bos_token_id=bos, eos_token_id=eos, pad_token_id=eos),
        vision_config=dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                           image_size=IMAGE_SIZE, patch_size=8, hidden_act="gelu"),
        projection_dim=16,
    )
    torch.manual_seed(SEED)
    model = CLIPModel(config).eval()
    perturb(model, SEED + 1)
    with torch.no_grad():  # spread the image embeddings apart (a random ViT maps all images close)
        model.vision_model.embeddings.patch_embedding.weight.mul_(8.0)
        model.vision_model.embeddings.class_embedding.mul_(0.1)
        for name, p in model.vision_model.encoder.named_parameters():
            if name.endswith("proj.weight") or name.endswith("fc1.weight") or name.endswith("fc2.weight"):
                p.mul_(10.0)
    model.save_pretrained(folder)
    proc = CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    proc.save_pretrained(folder)

    tensors = {}
    # PIL's bicubic resampling, exactly (uint8)
    src = np.asarray(make_image(RESIZE_SOURCE, 7))
    tensors["resize.source"] = torch.from_numpy(src.copy())
    for w, h in RESIZE_TARGETS:
        r = np.asarray(PIL.Image.fromarray(src).resize((w, h), PIL.Image.BICUBIC))
        tensors[f"resize.{w}x{h}"] = torch.from_numpy(r.copy())

    def embed_images(names, folder_, sizes, seed0):
        pix = []
        for i, name in enumerate(names):
            img = make_image(sizes[name], seed0 + i)
            img.save(folder_ / name)
            img = PIL.Image.open(folder_ / name)
            pix.append(proc(images=img, return_tensors="pt")["pixel_values"])
        pix = torch.cat(pix)
        with torch.no_grad():
            emb = model.get_image_features(pixel_values=pix)
        emb = emb.pooler_output if hasattr(emb, "pooler_output") else emb
        return pix, emb

    names = list(IMAGES)
    pix, img_emb = embed_images(names, gold, IMAGES, 11)
    ref_names = sorted(REFERENCES)
    ref_pix, ref_emb = embed_images(ref_names, refs, REFERENCES, 21)
    texts = [clip_text(p) for _, p in PAIRS]
    enc = tok(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        txt_emb = model.get_text_features(input_ids=enc["input_ids"])
    txt_emb = txt_emb.pooler_output if hasattr(txt_emb, "pooler_output") else txt_emb

    norm = lambda e: e / e.norm(dim=-1, keepdim=True)
    by_name = {n: i for i, n in enumerate(names)}
    pi = torch.stack([norm(img_emb)[by_name[n]] for n, _ in PAIRS])
    cos_text = (pi * norm(txt_emb)).sum(-1)
    clipscore = 2.5 * cos_text.clamp(min=0)
    image_alignment = (pi @ norm(ref_emb).T).mean(-1)

    tensors.update({
        "pixel_values": pix, "image_embeds": img_emb, "ref_pixel_values": ref_pix, "ref_embeds": ref_emb,
        "input_ids": enc["input_ids"].to(torch.int64), "text_embeds": txt_emb,
        "clipscore": clipscore, "image_alignment": image_alignment,
    })
    save_tensors(gold / "clip.safetensors", tensors, "tools/reference/make_clip_fixtures.py")
    pairs = [{"image": n, "prompt": p} for n, p in PAIRS]
    write_json(gold / "clip-pairs.json", pairs, indent=1)
    meta = {
        "images": names, "references": ref_names, "texts": texts, "pairs": pairs,
        "resize_targets": RESIZE_TARGETS,
        "clipscore": clipscore.tolist(), "image_alignment": image_alignment.tolist(),
        "mean_clipscore": clipscore.mean().item(), "mean_image_alignment": image_alignment.mean().item(),
        "truncated": [int((ids == eos).nonzero()[0]) == 76 for ids in enc["input_ids"]],
        "versions": common.versions(torch, transformers, PIL),
    }
    write_json(gold / "clip.json", meta, indent=1)
    print("== clip: image cosines\n", (norm(img_emb) @ norm(torch.cat([img_emb, ref_emb])).T).numpy().round(3))
    print("== clip: cos_text", cos_text.numpy().round(3))
    print("== clip: clipscore", [round(v, 4) for v in meta["clipscore"]],
          "image_alignment", [round(v, 4) for v in meta["image_alignment"]], "truncated", meta["truncated"])


def build_all(out):
    build(Path(out))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    build_all(ap.parse_args().out)
