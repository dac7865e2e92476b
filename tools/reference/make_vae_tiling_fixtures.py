"""Golden values for tiled VAE decoding (diffusers' `AutoencoderKL.enable_tiling()` /
`tiled_decode`), on the tiny SD1 VAE of tests/fixtures/sd1-tiny.

    /work/venv-ref/bin/python tools/reference/make_vae_tiling_fixtures.py

Writes tests/fixtures/golden/vae-tiling.safetensors: `latents` [1, 4, 18, 30] (unscaled, as
`vae.decode` takes them), `tiled` (decoded with tiling on) and `whole` (decoded in one piece),
and vae-tiling.json with the tile sizes diffusers used. The VAE's config has sample_size 64, so
latent tiles are 8x8 with 25% overlap: 3 x 5 tiles, blended over 16 pixels.
"""
import json
import pathlib

import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIX = ROOT / "tests" / "fixtures"


def build(fixtures: pathlib.Path):
    out = fixtures / "golden"
    vae = AutoencoderKL.from_pretrained(fixtures / "sd1-tiny" / "vae").eval()
    g = torch.Generator().manual_seed(7)
    latents = torch.randn((1, 4, 18, 30), generator=g) * 3.0
    with torch.no_grad():
        whole = vae.decode(latents).sample
        vae.enable_tiling()
        tiled = vae.decode(latents).sample
    diff = (tiled - whole).abs().mean().item()
    assert diff > 1e-3, f"tiling changed nothing ({diff}): the golden would not test it"
    save_file({"latents": latents.contiguous(), "tiled": tiled.contiguous(), "whole": whole.contiguous()},
              str(out / "vae-tiling.safetensors"))
    meta = {
        "tile_sample_min_size": vae.tile_sample_min_size,
        "tile_latent_min_size": vae.tile_latent_min_size,
        "tile_overlap_factor": vae.tile_overlap_factor,
        "mean_abs_tiled_minus_whole": diff,
        "shape": list(tiled.shape),
    }
    (out / "vae-tiling.json").write_text(json.dumps(meta, indent=1) + "\n")
    print("vae-tiling:", meta)


def build_all(fixtures=FIX):
    """`fixtures`: the folder holding sd1-tiny/ and golden/ (make_sd_fixtures.py's output)."""
    (pathlib.Path(fixtures) / "golden").mkdir(parents=True, exist_ok=True)
    build(pathlib.Path(fixtures))


if __name__ == "__main__":
    build_all()
