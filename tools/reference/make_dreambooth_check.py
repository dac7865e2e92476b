"""diffusers loads the folder `disendiff train --method dreambooth` writes (OUT/model), and its
images are the golden files tests/dreambooth_cli.rs compares `disendiff generate --model
OUT/model` with (contract: TRAIN_FIXTURES.md, "DreamBooth").

Runs the Rust test's exact training command (TRAIN below, recorded in the json) with the given
binary, then with diffusers / transformers only:
- `StableDiffusionPipeline.from_pretrained(OUT/model)`; the tokenizer maps `<new1>` / `<new2>`
  to 49408 / 49409 and splits them out of a prompt; the text encoder's table has 49410 rows, the
  new ones the trained rows; every UNet tensor differs from the base's;
- the images of CALL on golden/export-latents.safetensors -> golden/dreambooth-0000{0,1}.png,
  and the same with the base UNet put back (golden/dreambooth-baseunet-0000{0,1}.png), which
  must differ clearly (so a generate that ignored the fine-tuned UNet fails the Rust test).

A second case runs TRAIN_TE (TRAIN with `--train-text-encoder`) and checks what that adds:
every text encoder tensor differs from the base's, the base rows of the token table included,
and the new rows are the table's last two; its images -> golden/dreambooth-te-0000{0,1}.png,
and the same with the base text encoder put back (its table resized, the trained new rows
copied in, so only the fine-tuning of the rest is undone) -> golden/dreambooth-te-basete-*.png,
which must differ clearly (so a folder whose text encoder was not the trained one fails the
Rust test). Its record is golden/dreambooth-te-check.json. The first case's files are
rewritten byte for byte the same (two runs of the binary write identical folders).

    python tools/reference/make_dreambooth_check.py --bin target/release/disendiff
"""
import common  # first: pins threads and determinism before torch is imported

import argparse
import json
import subprocess
import tempfile
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextModel
from safetensors.torch import load_file
from common import load_pipeline, mean_abs_diff, versions, write_json

ROOT = Path(__file__).resolve().parents[2]
GEN = "tools/reference/make_dreambooth_check.py"
# The Rust test's command after `train --out OUT` (run in the repository root).
TRAIN = ["--model", "tests/fixtures/sd1-tiny", "--image", "tests/fixtures/golden/sd1-pipe-00000.png",
         "--caption", "<new1> cat and <new2> dog", "--method", "dreambooth", "--resolution", "64",
         "--max-train-steps", "2", "--learning-rate", "1e-3", "--num-class-images", "2",
         "--checkpointing-steps", "1"]
TRAIN_TE = TRAIN + ["--train-text-encoder"]
CALL = dict(prompt="photo of a <new1> cat", negative_prompt="", num_inference_steps=10, guidance_scale=6.0, eta=0.0,
            height=64, width=64, num_images_per_prompt=2)


def images(pipe, latents):
    with torch.no_grad():
        return pipe(**CALL, latents=latents.clone(), output_type="pil").images


def train(bin_path, tmp, train_args):
    out = Path(tmp) / "run"
    subprocess.run([str(bin_path.resolve()), "train", "--out", str(out), *train_args], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)
    return out / "model"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", type=Path, default=ROOT / "target/release/disendiff")
    ap.add_argument("--golden", type=Path, default=ROOT / "tests/fixtures/golden")
    args = ap.parse_args()
    unet_case(args)
    te_case(args)


def load_pipe(folder):
    pipe = load_pipeline(folder)
    tok, te = pipe.tokenizer, pipe.text_encoder
    ids = tok.convert_tokens_to_ids(["<new1>", "<new2>"])
    assert ids == [49408, 49409], ids
    enc = tok("photo of a <new1> cat and <new2> dog").input_ids
    assert 49408 in enc and 49409 in enc, enc
    table = te.get_input_embeddings().weight
    assert table.shape[0] == 49410 == te.config.vocab_size, table.shape
    return pipe, ids


def unet_changed(pipe):
    base_unet = UNet2DConditionModel.from_pretrained(ROOT / "tests/fixtures/sd1-tiny", subfolder="unet").float()
    base_sd = base_unet.state_dict()
    tuned = pipe.unet.state_dict()
    assert set(tuned) == set(base_sd)
    same = [k for k in tuned if torch.equal(tuned[k], base_sd[k].to(tuned[k].dtype))]
    assert same == [], same
    return base_unet, len(tuned)


def save_pairs(golden, tuned_imgs, base_imgs, stem, base_stem, min_diff):
    """Writes the images golden/<stem>-0000i.png and golden/<base_stem>-0000i.png after asserting
    that each pair differs by at least `min_diff` (mean |a - b| of 255); returns those differences."""
    diffs = [mean_abs_diff([a], [b]) for a, b in zip(tuned_imgs, base_imgs)]
    assert min(diffs) >= min_diff, diffs
    for i, (a, b) in enumerate(zip(tuned_imgs, base_imgs)):
        a.save(golden / f"{stem}-{i:05d}.png")
        b.save(golden / f"{base_stem}-{i:05d}.png")
    return diffs


def write_record(path, train_args, ids, te, **fields):
    """The record of a case (its command, the call, the new tokens, then `fields`) as JSON at `path`."""
    info = {
        "generator": GEN, "train_args": train_args, "call": CALL, "latents": "export-latents.safetensors",
        "new_token_ids": ids, "text_encoder_vocab_size": int(te.config.vocab_size),
        **fields,
        "versions": versions(),
    }
    write_json(path, info, indent=2)
    print(json.dumps(info, indent=2))


def te_case(args):
    golden = args.golden
    with tempfile.TemporaryDirectory() as tmp:
        folder = train(args.bin, tmp, TRAIN_TE)
        pipe, ids = load_pipe(folder)
        unet_changed(pipe)
        te = pipe.text_encoder
        base_te = CLIPTextModel.from_pretrained(ROOT / "tests/fixtures/sd1-tiny", subfolder="text_encoder").float()
        tuned, base = te.state_dict(), base_te.state_dict()
        assert set(tuned) == set(base), set(tuned) ^ set(base)
        changed, unchanged_elements = [], {}
        for k, t in tuned.items():
            b = base[k]
            if k.endswith("embeddings.token_embedding.weight"):
                t = t[: b.shape[0]]  # the base rows; the two new rows are the trained modifier rows
            assert t.shape == b.shape, (k, t.shape, b.shape)
            if not torch.equal(t, b):
                changed.append(k)
            n_same = int((t == b).sum())
            if n_same:
                unchanged_elements[k] = {"elements": n_same, "of": t.numel(), "all_zero_in_base": bool((b[t == b] == 0).all())}
        # position_ids is a buffer (the same arange in both), not a parameter
        params = [n for n, _ in te.named_parameters()]
        not_changed = [k for k in params if k not in changed]
        assert not_changed == [], not_changed
        latents = load_file(str(golden / "export-latents.safetensors"))["latents"]
        tuned_imgs = images(pipe, latents)
        # the base text encoder with the trained new rows: only the text encoder's fine-tuning undone
        base_te.resize_token_embeddings(49410)
        with torch.no_grad():
            base_te.get_input_embeddings().weight[49408:] = te.get_input_embeddings().weight[49408:]
        pipe.text_encoder = base_te
        base_imgs = images(pipe, latents)
        diffs = save_pairs(golden, tuned_imgs, base_imgs, "dreambooth-te", "dreambooth-te-basete", 1.0)
        write_record(golden / "dreambooth-te-check.json", TRAIN_TE, ids, te,
                     text_encoder_tensors_changed=len(changed), text_encoder_tensors=len(params),
                     unchanged_elements=unchanged_elements, mean_abs_diff_vs_base_text_encoder=diffs)


def unet_case(args):
    golden = args.golden
    with tempfile.TemporaryDirectory() as tmp:
        folder = train(args.bin, tmp, TRAIN)
        pipe, ids = load_pipe(folder)
        tok, te = pipe.tokenizer, pipe.text_encoder
        table = te.get_input_embeddings().weight
        base_te = load_file(str(ROOT / "tests/fixtures/sd1-tiny/text_encoder/model.safetensors"))
        key = "embeddings.token_embedding.weight"
        assert torch.equal(table[:49408].detach(), base_te[key].to(table.dtype)), "the base rows changed"
        base_unet, n_unet = unet_changed(pipe)
        latents = load_file(str(golden / "export-latents.safetensors"))["latents"]
        tuned_imgs = images(pipe, latents)
        pipe.unet = base_unet
        base_imgs = images(pipe, latents)
        diffs = save_pairs(golden, tuned_imgs, base_imgs, "dreambooth", "dreambooth-baseunet", 3.0)
        write_record(golden / "dreambooth-check.json", TRAIN, ids, te,
                     unet_tensors_changed=n_unet, unet_tensors=n_unet, mean_abs_diff_vs_base_unet=diffs)


if __name__ == "__main__":
    main()
