"""diffusers' side of the export round trip (contract: FIXTURES.md, "Exports").

    python tools/reference/make_export_check.py --fixtures tests/fixtures

Reads what `disendiff export` wrote from the committed concept file golden/export-concepts.safetensors
(a short `disendiff train` run on sd1-tiny):
- golden/export-diffusers/: `--format diffusers` (pytorch_custom_diffusion_weights.safetensors, new1.safetensors);
- golden/export-webui/: `--format webui` (export.safetensors: full-rank lora_up/lora_down/alpha; embeddings/new1.safetensors);
and loads them into sd1-tiny with the calls the README shows:
- diffusers: `pipe.unet.load_attn_procs(DIR, weight_name="pytorch_custom_diffusion_weights.safetensors", _pipeline=pipe)`
  and `pipe.load_textual_inversion(DIR / "new1.safetensors")`;
- webui: `pipe.load_lora_weights(DIR, weight_name="export.safetensors")` + `fuse_lora()` and
  `pipe.load_textual_inversion(DIR / "embeddings/new1.safetensors", token="<new1>")`.
It checks that diffusers applied them (every trained processor's K/V equals the file's, every
fused K/V equals base + up @ down), then writes, for the same latents (golden/export-latents.safetensors):
- golden/export-cd-0000{0,1}.png (Custom Diffusion folder), export-webui-0000{0,1}.png (webui files),
  export-ti-0000{0,1}.png (the embedding alone: the K/V must matter), export-base-0000{0,1}.png (plain sd1-tiny);
- golden/export.json: the call, versions, the sha256 of every tensor consumed, the differences between images,
  and numpy's singular values of every K/V difference (trained - base) for the Rust SVD.
"""
import common  # first: pins threads and determinism before torch is imported

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

import diffusers
import transformers
from common import load_pipeline, mean_abs_diff, save_tensors, submodule, write_json

# The call of every image here, make_checkpoint_export_check.py's and make_dreambooth_check.py's.
CALL = dict(prompt="photo of a <new1> cat", negative_prompt="", num_inference_steps=10, guidance_scale=6.0, eta=0.0,
            height=64, width=64, num_images_per_prompt=2)
SEED = 1400
CD_NAME = "pytorch_custom_diffusion_weights.safetensors"
GEN = "tools/reference/make_export_check.py"


def sha(t):
    return hashlib.sha256(t.detach().to(torch.float32).contiguous().numpy().tobytes()).hexdigest()


def images(pipe, latents):
    with torch.no_grad():
        return pipe(**CALL, latents=latents.clone(), output_type="pil").images


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fixtures", required=True, type=Path)
    fx = ap.parse_args().fixtures
    golden = fx / "golden"
    folder = fx / "sd1-tiny"
    cd_dir, webui_dir = golden / "export-diffusers", golden / "export-webui"
    latents_path = golden / "export-latents.safetensors"
    if not latents_path.exists():
        g = torch.Generator().manual_seed(SEED)
        save_tensors(latents_path, {"latents": torch.randn([2, 4, 8, 8], generator=g)}, GEN)
    latents = load_file(str(latents_path))["latents"]
    consumed = {}
    out = {}

    # the Custom Diffusion folder
    pipe = load_pipeline(folder)
    cd = load_file(str(cd_dir / CD_NAME))
    consumed[f"export-diffusers/{CD_NAME}"] = {k: sha(v) for k, v in sorted(cd.items())}
    pipe.unet.load_attn_procs(str(cd_dir), weight_name=CD_NAME, _pipeline=pipe)
    trained = 0
    for name, proc in pipe.unet.attn_processors.items():
        assert type(proc).__name__ == "CustomDiffusionAttnProcessor", (name, type(proc))
        if proc.train_kv:
            trained += 1
            for p in ("k", "v"):
                want = cd[f"{name}.to_{p}_custom_diffusion.weight"]
                got = getattr(proc, f"to_{p}_custom_diffusion").weight.detach()
                assert torch.equal(got, want), (name, p)
    n_kv = sum(1 for k in cd if k.endswith("to_k_custom_diffusion.weight"))
    assert trained == n_kv > 0, (trained, n_kv)
    for f in sorted(cd_dir.glob("*.safetensors")):
        if f.name != CD_NAME:
            consumed[f"export-diffusers/{f.name}"] = {k: sha(v) for k, v in load_file(str(f)).items()}
            pipe.load_textual_inversion(str(f))
    out["cd"] = images(pipe, latents)
    del pipe

    # the webui files through diffusers' LoRA loader
    pipe = load_pipeline(folder)
    net = load_file(str(webui_dir / "export.safetensors"))
    consumed["export-webui/export.safetensors"] = {k: sha(v) for k, v in sorted(net.items())}
    mods = sorted({k[len("lora_unet_"):].split(".")[0] for k in net})
    paths = {}
    for name, _ in pipe.unet.named_modules():
        if name.endswith(("attn2.to_k", "attn2.to_v")):
            paths[name.replace(".", "_")] = name
    bases = {m: submodule(pipe.unet, paths[m]).weight.detach().clone() for m in mods}
    pipe.load_lora_weights(str(webui_dir), weight_name="export.safetensors", adapter_name="export")
    pipe.fuse_lora(lora_scale=1.0)
    pipe.unload_lora_weights()
    for m in mods:
        up, down, alpha = net[f"lora_unet_{m}.lora_up.weight"], net[f"lora_unet_{m}.lora_down.weight"], float(net[f"lora_unet_{m}.alpha"])
        want = bases[m] + up @ down * (alpha / down.shape[0])
        got = submodule(pipe.unet, paths[m]).weight.detach()
        err = (got - want).abs().max().item()
        assert err < 1e-6 * max(1.0, want.abs().max().item()), (m, err)
    emb = webui_dir / "embeddings" / "new1.safetensors"
    consumed["export-webui/embeddings/new1.safetensors"] = {k: sha(v) for k, v in load_file(str(emb)).items()}
    pipe.load_textual_inversion(str(emb), token="<new1>")
    out["webui"] = images(pipe, latents)
    del pipe

    # the embedding alone, and the plain model
    pipe = load_pipeline(folder)
    pipe.load_textual_inversion(str(cd_dir / "new1.safetensors"))
    out["ti"] = images(pipe, latents)
    out["base"] = images(load_pipeline(folder), latents)

    # numpy's singular values of every K/V difference (trained - base), for the Rust SVD
    concept = load_file(str(golden / "export-concepts.safetensors"))
    base = load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    singular = {k: np.linalg.svd((v.double() - base[k].double()).numpy(), compute_uv=False).tolist()
                for k, v in sorted(concept.items()) if k.endswith(".weight")}

    diffs = {f"{a}-vs-{b}": mean_abs_diff(out[a], out[b]) for a, b in
             [("cd", "webui"), ("cd", "ti"), ("cd", "base"), ("ti", "base")]}
    for name, imgs in out.items():
        for i, im in enumerate(imgs):
            im.save(golden / f"export-{name}-{i:05d}.png")
    info = {"generator": GEN, "call": CALL, **common.versions(diffusers, torch, transformers), "trained_processors": trained,
            "mean_abs_diff_of_255": diffs, "consumed_sha256_f32": consumed,
            "singular_values_of_differences": singular}
    write_json(golden / "export.json", info, indent=1)
    print(json.dumps(diffs))


if __name__ == "__main__":
    main()
