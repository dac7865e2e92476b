"""Golden LoRA fixtures for disendiff's `--lora FILE:SCALE` (contract: FIXTURES.md, "LoRA files").

Writes two random LoRA files for tests/fixtures/sd1-tiny and diffusers' images with each merged:

    python tools/reference/make_lora_fixtures.py --out tests/fixtures

- golden/lora-kohya.safetensors: kohya names (`lora_unet_<diffusers path, '.' -> '_'>`,
  `lora_te_text_model_encoder_layers_<n>_...`), `lora_down` / `lora_up` / `alpha` with alpha != rank,
  on UNet self- and cross-attention (q, k, v, out), feed-forward, a 1x1 conv `proj_in` and a 3x3
  resnet conv (LoCon: down [r, in, 3, 3], up [out, r, 1, 1]), and text-encoder q/k/v/out/fc1/fc2;
- golden/lora-peft.safetensors: diffusers/PEFT names (`unet.<path>.lora_A.weight` / `lora_B.weight`,
  `text_encoder.text_model.<path>...`), no alpha (scale 1 x lora_scale);
- golden/lora-latents.safetensors: `latents` [2, 4, 8, 8], the initial noise of every image here;
- golden/lora-{kohya,peft,none}-0000{0,1}.png: StableDiffusionPipeline (DDIM, 10 steps, guidance 6,
  eta 0) after `load_lora_weights(file)` + `fuse_lora(lora_scale=0.7)`; `none` is without a LoRA;
- golden/lora.json: the call's settings and library versions.

The script checks that diffusers applied every entry: each fused weight must equal
base + scale * up @ down (a loader that skips a key silently would otherwise pass unnoticed).
"""
import common  # first: pins threads and determinism before torch is imported

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

import diffusers
import peft
import transformers
from common import load_pipeline, mean_abs_diff, save_tensors, submodule, write_json

CALL = dict(prompt="a red ball and a blue box", negative_prompt="blurry", num_inference_steps=10,
            guidance_scale=6.0, eta=0.0, height=64, width=64, num_images_per_prompt=2)
SCALE = 0.7
SEED = 1300
UP_STD = 8.0  # lora_up std relative to the weight's, so that the LoRA changes the image clearly

# One alpha for every entry (!= every rank): diffusers 0.42 / peft 0.21 apply only the most
# common alpha of a kohya file (per-module alphas go to an `alpha_pattern` whose keys, renamed to
# `attn2.processor...` / `text_model....`, match no module), so a file with mixed alphas would make
# the reference wrong, not disendiff; mixed alphas are checked by exact identities in Rust.
ALPHA = 2.0
# (diffusers module path, rank, alpha) of the UNet entries.
UNET_TARGETS = [
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", 4, ALPHA),
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k", 4, ALPHA),
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v", 4, ALPHA),
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0", 4, ALPHA),
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q", 4, ALPHA),
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", 4, ALPHA),
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v", 4, ALPHA),
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0", 4, ALPHA),
    ("mid_block.attentions.0.transformer_blocks.0.attn2.to_k", 2, ALPHA),
    ("mid_block.attentions.0.transformer_blocks.0.attn2.to_v", 2, ALPHA),
    ("up_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj", 4, ALPHA),
    ("up_blocks.1.attentions.0.transformer_blocks.0.ff.net.2", 4, ALPHA),
    ("up_blocks.2.attentions.1.proj_in", 4, ALPHA),
    ("up_blocks.2.resnets.0.conv1", 4, ALPHA),
]
TE_TARGETS = [
    ("encoder.layers.0.self_attn.q_proj", 4, ALPHA),
    ("encoder.layers.0.self_attn.k_proj", 4, ALPHA),
    ("encoder.layers.0.self_attn.v_proj", 4, ALPHA),
    ("encoder.layers.1.self_attn.out_proj", 4, ALPHA),
    ("encoder.layers.1.mlp.fc1", 4, ALPHA),
    ("encoder.layers.1.mlp.fc2", 4, ALPHA),
]


def random_entries(root, targets, g):
    """(path, down, up, alpha) per target; down [r, in(, kh, kw)], up [out, r(, 1, 1)]."""
    out = []
    for path, r, alpha in targets:
        w = submodule(root, path).weight
        out_dim, in_dim = w.shape[0], w.shape[1]
        kernel = tuple(w.shape[2:])
        down = torch.randn((r, in_dim) + kernel, generator=g) / (in_dim * int(np.prod(kernel or (1,)))) ** 0.5
        up = torch.randn((out_dim, r) + (1,) * len(kernel), generator=g) * UP_STD * float(w.detach().std())
        out.append((path, down, up, alpha))
    return out


def delta(w, down, up, scale):
    return (up.flatten(1) @ down.flatten(1)).reshape(w.shape) * scale


def text_model(pipe):
    te = pipe.text_encoder
    return te.text_model if hasattr(te, "text_model") else te


def kohya_file(unet_entries, te_entries):
    sd = {}
    for prefix, entries in (("lora_unet_", unet_entries), ("lora_te_text_model_", te_entries)):
        for path, down, up, alpha in entries:
            key = prefix + path.replace(".", "_")
            sd[f"{key}.lora_down.weight"] = down.contiguous()
            sd[f"{key}.lora_up.weight"] = up.contiguous()
            sd[f"{key}.alpha"] = torch.tensor(alpha)
    return sd


def peft_file(unet_entries, te_entries):
    sd = {}
    for prefix, entries in (("unet.", unet_entries), ("text_encoder.text_model.", te_entries)):
        for path, down, up, _ in entries:
            sd[f"{prefix}{path}.lora_A.weight"] = down.contiguous()
            sd[f"{prefix}{path}.lora_B.weight"] = up.contiguous()
    return sd


def run(folder, latents, lora_file=None, expected=None):
    pipe = load_pipeline(folder)
    if lora_file is not None:
        bases = {k: submodule(r, p).weight.detach().clone() for k, (r, p) in expected(pipe).items()}
        pipe.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name, adapter_name="x")
        pipe.fuse_lora(lora_scale=SCALE)
        pipe.unload_lora_weights()
        # every entry was applied, with the scale this contract says
        for k, (r, p) in expected(pipe).items():
            down, up, alpha = expected.entries[k]
            w = submodule(r, p).weight.detach()
            want = bases[k] + delta(w, down, up, alpha * SCALE)
            err = (w - want).abs().max().item()
            assert err < 1e-5 * max(1.0, want.abs().max().item()), (lora_file.name, k, err)
    with torch.no_grad():
        imgs = pipe(**CALL, latents=latents.clone(), output_type="pil").images
    return imgs


class Expected:
    """Which module each entry targets in a pipeline, and its (down, up, alpha-over-rank)."""

    def __init__(self, unet_entries, te_entries, with_alpha):
        self.entries = {}
        for kind, entries in (("unet", unet_entries), ("te", te_entries)):
            for path, down, up, alpha in entries:
                self.entries[f"{kind}:{path}"] = (down, up, (alpha / down.shape[0]) if with_alpha else 1.0)

    def __call__(self, pipe):
        roots = {"unet": pipe.unet, "te": text_model(pipe)}
        return {k: (roots[k.split(":")[0]], k.split(":", 1)[1]) for k in self.entries}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True, type=Path, help="the fixtures folder (holds sd1-tiny and golden)")
    fixtures = ap.parse_args().out
    folder = fixtures / "sd1-tiny"
    golden = fixtures / "golden"
    g = torch.Generator().manual_seed(SEED)

    pipe = load_pipeline(folder)
    unet_entries = random_entries(pipe.unet, UNET_TARGETS, g)
    te_entries = random_entries(text_model(pipe), TE_TARGETS, g)
    del pipe
    latents = torch.randn([2, 4, 8, 8], generator=g)

    meta = {"generator": "tools/reference/make_lora_fixtures.py"}
    kohya = golden / "lora-kohya.safetensors"
    peft_path = golden / "lora-peft.safetensors"
    save_file(kohya_file(unet_entries, te_entries), str(kohya), metadata=dict(meta, ss_network_module="networks.lora"))
    save_file(peft_file(unet_entries, te_entries), str(peft_path), metadata=meta)
    save_tensors(golden / "lora-latents.safetensors", {"latents": latents}, meta["generator"])

    outputs = {
        "none": run(folder, latents),
        "kohya": run(folder, latents, kohya, Expected(unet_entries, te_entries, True)),
        "peft": run(folder, latents, peft_path, Expected(unet_entries, te_entries, False)),
    }
    diffs = {}
    for name, imgs in outputs.items():
        for i, im in enumerate(imgs):
            im.save(golden / f"lora-{name}-{i:05d}.png")
        if name != "none":
            diffs[name] = mean_abs_diff(imgs, outputs["none"])
            assert diffs[name] > 5.0, (name, diffs[name])  # the LoRA changes the image clearly
    settings = {
        "call": dict(CALL, scale=SCALE, scheduler="DDIMScheduler"),
        "mean_abs_diff_from_none": diffs,
        "versions": common.versions(torch, diffusers, transformers, peft),
    }
    write_json(golden / "lora.json", settings, indent=2)
    print("== lora goldens:", json.dumps(diffs))


if __name__ == "__main__":
    main()
