"""diffusers' side of `disendiff export --format checkpoint` (contract: FIXTURES.md, "Exports").

    python tools/reference/make_checkpoint_export_check.py --fixtures tests/fixtures --bin target/release/disendiff

Runs our binary, from the repository root, on the committed concept file golden/export-concepts.safetensors
(a short `disendiff train` run on sd1-tiny):

    disendiff export --concepts tests/fixtures/golden/export-concepts.safetensors --model tests/fixtures/sd1-tiny \
        --format checkpoint --name export --out TMP

and loads TMP/export.safetensors with the calls the README shows:
`StableDiffusionPipeline.from_single_file(TMP/export.safetensors, config=sd1-tiny, local_files_only=True)` plus
`pipe.load_textual_inversion(TMP/embeddings/new1.safetensors, token="<new1>")`. It asserts that every attn2 to_k/to_v
of the loaded UNet equals the concept file's trained weight, every other UNet tensor, every VAE tensor and every
text-encoder tensor equals sd1-tiny's (bit for bit, as diffusers loads them in float32), then generates with
make_export_check.py's call and latents (golden/export-latents.safetensors) and writes:
- golden/export-ckpt-0000{0,1}.png;
- golden/export-ckpt.json: the command, the sha256 of every file the export wrote (the merged model is not committed:
  about 7 MB), versions, and the mean abs differences (of 255) of the images against make_export_check.py's PNGs
  (export-cd: the same model applied as a Custom Diffusion folder; export-base: the plain model).
"""
import common  # first: pins threads and determinism before torch is imported

import argparse
import hashlib
import json
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

import diffusers
import transformers
from diffusers import StableDiffusionPipeline
from common import load_pipeline, write_json

from make_export_check import CALL  # a sibling script: the images are compared with its PNGs

ARGS = ["export", "--concepts", "tests/fixtures/golden/export-concepts.safetensors", "--model", "tests/fixtures/sd1-tiny",
        "--format", "checkpoint", "--name", "export"]


def file_sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def strip_text_model(sd):
    return {k[len("text_model."):] if k.startswith("text_model.") else k: v for k, v in sd.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fixtures", required=True, type=Path)
    ap.add_argument("--bin", required=True, type=Path)
    a = ap.parse_args()
    fx = a.fixtures.resolve()
    root = fx.parent.parent
    golden = fx / "golden"
    folder = fx / "sd1-tiny"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ckpt"
        subprocess.run([str(a.bin.resolve()), *ARGS, "--out", str(out)], cwd=root, check=True)
        written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
        assert written == ["embeddings/new1.safetensors", "export.safetensors"], written
        shas = {w: file_sha(out / w) for w in written}
        merged = out / "export.safetensors"

        pipe = StableDiffusionPipeline.from_single_file(str(merged), config=str(folder), local_files_only=True,
                                                        torch_dtype=torch.float32, safety_checker=None)
        pipe.set_progress_bar_config(disable=True)
        ref = load_pipeline(folder)
        concept = load_file(str(golden / "export-concepts.safetensors"))
        kv = {k: v for k, v in concept.items() if k.endswith((".to_k.weight", ".to_v.weight"))}
        assert kv and all(".attn2." in k for k in kv), sorted(kv)
        unet, base_unet = pipe.unet.state_dict(), ref.unet.state_dict()
        assert set(unet) == set(base_unet), sorted(set(unet) ^ set(base_unet))[:8]
        moved = 0
        for k, v in base_unet.items():
            if k in kv:
                assert torch.equal(unet[k], kv[k].to(unet[k].dtype)), k
                moved += int(not torch.equal(v, kv[k]))
            else:
                assert torch.equal(unet[k], v), f"UNet {k} differs from sd1-tiny's"
        assert moved == len(kv), (moved, len(kv))
        for name in ("vae", "text_encoder"):
            got, want = getattr(pipe, name).state_dict(), getattr(ref, name).state_dict()
            if name == "text_encoder":
                got, want = strip_text_model(got), strip_text_model(want)
            for k, v in want.items():
                assert k in got and torch.equal(got[k], v), f"{name} {k} differs from sd1-tiny's"
        pipe.load_textual_inversion(str(out / "embeddings" / "new1.safetensors"), token="<new1>")
        emb = load_file(str(out / "embeddings" / "new1.safetensors"))
        assert list(emb) == ["emb_params"] and torch.equal(emb["emb_params"][0], concept["<new1>"]), list(emb)
        latents = load_file(str(golden / "export-latents.safetensors"))["latents"]
        with torch.no_grad():
            images = pipe(**CALL, latents=latents.clone(), output_type="pil").images

    diffs = {}
    for i, im in enumerate(images):
        im.save(golden / f"export-ckpt-{i:05d}.png")
        mine = np.asarray(im, dtype=np.float64)
        for other in ("cd", "base"):
            theirs = np.asarray(Image.open(golden / f"export-{other}-{i:05d}.png").convert("RGB"), dtype=np.float64)
            diffs[f"image{i}-vs-{other}"] = float(np.abs(mine - theirs).mean())
    info = {"generator": "tools/reference/make_checkpoint_export_check.py", "command": ARGS + ["--out", "DIR"],
            "call": CALL, **common.versions(diffusers, torch, transformers), "sha256": shas, "trained_kv": len(kv),
            "mean_abs_diff_of_255": diffs}
    write_json(golden / "export-ckpt.json", info, indent=1)
    print(json.dumps(diffs))


if __name__ == "__main__":
    main()
