"""Test data for `export --format webui`'s key names (contract: FIXTURES.md, "Exports").

    python tools/reference/make_export_keymaps.py --out tests/fixtures/golden/export-keymaps.json

For the SD1 and SD2 UNet layouts it writes:
- `diffusers_kv`: every attn2 to_k/to_v weight of diffusers' UNet2DConditionModel built from the
  layout's config (on the meta device: no weights needed);
- `comfyui_key_map`: what ComfyUI's LoRA loader maps for those layers, kohya name -> its UNet
  key: comfy/lora.py `model_lora_keys_unet` sets
  `key_map["lora_unet_" + k[:-len(".weight")].replace(".", "_")] = "diffusion_model." + v` for every
  (k, v) of comfy/utils.py `unet_to_diffusers(unet_config)`, whose attention part is transcribed
  below (ComfyUI commit 00728eb2 comfy/lora.py; utils.py as found by the search tool);
- `a1111_modules`: the CompVis module names A1111's Lora extension looks kohya names up in
  (`network_layer_mapping`: the LDM model's `named_modules()` with '.' -> '_') for those layers;
  the Rust test converts names with A1111's `convert_diffusers_name_to_compvis` regexes
  (extensions-builtin/Lora/networks.py, 1.10).
"""
import argparse
import json
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

SOURCES = {
    "comfyui": "comfyanonymous/ComfyUI comfy/lora.py model_lora_keys_unet (commit 00728eb20fce05955f89ef1ccf5f6167416e94cf) + comfy/utils.py unet_to_diffusers",
    "a1111": "AUTOMATIC1111/stable-diffusion-webui extensions-builtin/Lora/networks.py convert_diffusers_name_to_compvis (1.10): "
             "lora_unet_down_blocks_(\\d+)_(attentions|resnets)_(\\d+)_(.+) -> diffusion_model_input_blocks_{1 + g0*3 + g2}_{1|0}_{g3}; "
             "lora_unet_mid_block_(attentions|resnets)_(\\d+)_(.+) -> diffusion_model_middle_block_{1|g1*2}_{g2}; "
             "lora_unet_up_blocks_(\\d+)_(attentions|resnets)_(\\d+)_(.+) -> diffusion_model_output_blocks_{g0*3 + g2}_{1|0}_{g3}",
}

# ComfyUI's unet_config of SD1 and SD2 (comfy/supported_models.py / model_detection: 2 res blocks
# per level, one transformer on the first three levels and in the middle).
COMFY_CONFIG = {"num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 4, 4], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
                "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "transformer_depth_middle": 1}

DIFFUSERS_CONFIG = {
    "sd1": dict(cross_attention_dim=768, attention_head_dim=8),
    "sd2": dict(cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True),
}


def comfy_attn2_kv(cfg):
    """comfy/utils.py unet_to_diffusers, its transformer part, attn2 to_k/to_v only."""
    num_res_blocks = cfg["num_res_blocks"]
    td, tdo = cfg["transformer_depth"][:], cfg["transformer_depth_output"][:]
    out = {}
    for x in range(len(cfg["channel_mult"])):
        n = 1 + (num_res_blocks[x] + 1) * x
        for i in range(num_res_blocks[x]):
            for tb in range(td.pop(0)):
                for p in ("to_k", "to_v"):
                    out[f"down_blocks.{x}.attentions.{i}.transformer_blocks.{tb}.attn2.{p}.weight"] = f"input_blocks.{n}.1.transformer_blocks.{tb}.attn2.{p}.weight"
            n += 1
    for tb in range(cfg["transformer_depth_middle"]):
        for p in ("to_k", "to_v"):
            out[f"mid_block.attentions.0.transformer_blocks.{tb}.attn2.{p}.weight"] = f"middle_block.1.transformer_blocks.{tb}.attn2.{p}.weight"
    rev = list(reversed(num_res_blocks))
    for x in range(len(cfg["channel_mult"])):
        n = (rev[x] + 1) * x
        for i in range(rev[x] + 1):
            for tb in range(tdo.pop()):
                for p in ("to_k", "to_v"):
                    out[f"up_blocks.{x}.attentions.{i}.transformer_blocks.{tb}.attn2.{p}.weight"] = f"output_blocks.{n}.1.transformer_blocks.{tb}.attn2.{p}.weight"
            n += 1
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True, type=Path)
    out = {"sources": SOURCES, "layouts": {}}
    for name, extra in DIFFUSERS_CONFIG.items():
        with torch.device("meta"):
            unet = UNet2DConditionModel(sample_size=64, **extra)
        kv = sorted(k for k in unet.state_dict() if ".attn2.to_k.weight" in k or ".attn2.to_v.weight" in k)
        comfy = comfy_attn2_kv(COMFY_CONFIG)
        assert sorted(comfy) == kv, (name, set(comfy) ^ set(kv))
        out["layouts"][name] = {
            "diffusers_kv": kv,
            "comfyui_key_map": {"lora_unet_" + k[: -len(".weight")].replace(".", "_"): "diffusion_model." + v for k, v in sorted(comfy.items())},
            "a1111_modules": sorted("diffusion_model_" + v[: -len(".weight")].replace(".", "_") for v in comfy.values()),
        }
    args = ap.parse_args()
    args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
