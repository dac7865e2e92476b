"""Golden inpainting fixtures for disendiff's `pipelines::inpaint` and `disendiff inpaint` (contract: FIXTURES.md).

Runs diffusers' StableDiffusionInpaintPipeline (DDIM, classifier-free guidance 6, eta 0, 10 steps) on the
CPU in float32 with two tiny pipelines built from the committed fixtures:
- `inpaint9`: sd1-tiny's tokenizer, text encoder, VAE and scheduler with the 9-channel UNet of
  unet-inpaint-tiny (latents + mask + masked-image latents in), strength 1;
- `inpaint4`: the plain sd1-tiny pipeline (4-channel UNet, latent blending at every step), strength 1;
- `inpaint4s`: the plain pipeline at strength 0.75 (start from the image latents noised to t = 701).

    python tools/reference/make_inpaint_fixtures.py --out tests/fixtures

make_sd_fixtures.py calls it at its end (it rewrites golden/). Pinned, so that an independent
implementation can reproduce the pipeline:
- the VAE posterior is read at its mean (`retrieve_latents(..., sample_mode="argmax")`; the pipeline
  samples it by default), for the image latents and the masked-image latents alike;
- the noise `prepare_latents` draws is a seeded tensor stored in the golden files (the module's
  `randn_tensor` returns it): the start latents at strength 1 (times init_noise_sigma), the noise
  added to the image latents at strength < 1, and the noise of the 4-channel blend.
Writes golden/inpaint-image.png, golden/inpaint-mask.png (RGB: the pipeline converts it to grayscale
and binarises at 0.5), and per case golden/inpaint-<case>.safetensors, .json, -latents.safetensors
(the noise as one tensor `latents`, for `disendiff inpaint --latents`) and -0000K.png (the pipeline's PIL output).
"""
import common  # first: pins threads and determinism before torch is imported

import numpy as np
import PIL.Image
import torch

import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint as inpaint_module
from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline, UNet2DConditionModel
from common import pinned_latents, save_tensors, versions, write_json

# sibling script: the same seeded 64x64 picture, noise shape, timesteps and settings record
from make_img2img_fixtures import call_settings, run_timesteps, seeded_noise, test_picture

SIDE = 64
CALL = dict(
    prompt="a red ball and a blue box",
    negative_prompt="blurry",
    num_inference_steps=10,
    guidance_scale=6.0,
    eta=0.0,
    num_images_per_prompt=2,
    height=SIDE,
    width=SIDE,
)
CASES = {
    "inpaint9": dict(unet="unet-inpaint-tiny", strength=1.0, seed=1300),
    "inpaint4": dict(unet=None, strength=1.0, seed=1400),
    "inpaint4s": dict(unet=None, strength=0.75, seed=1500),
}
PICTURE_SEED = 1200
GEN = "tools/reference/make_inpaint_fixtures.py"


def test_mask():
    """A 64x64 RGB mask: white where to repaint (a rectangle not on the 8-pixel latent grid and a
    disc), gray and coloured patches on both sides of the grayscale threshold 0.5."""
    y, x = np.mgrid[0:SIDE, 0:SIDE]
    m = np.zeros((SIDE, SIDE, 3), np.uint8)
    m[(x >= 13) & (x < 43) & (y >= 5) & (y < 30)] = 255
    m[(x - 44) ** 2 + (y - 46) ** 2 < 120] = 255
    m[(x >= 2) & (x < 12) & (y >= 40) & (y < 60)] = [0, 255, 0]  # L = 150 -> repainted
    m[(x >= 16) & (x < 26) & (y >= 40) & (y < 60)] = [255, 0, 0]  # L = 76 -> kept
    m[(x >= 50) & (x < 60) & (y >= 2) & (y < 30)] = [126, 126, 126]  # 126/255 < 0.5 -> kept
    m[(x >= 28) & (x < 34) & (y >= 40) & (y < 62)] = [129, 129, 129]  # 129/255 >= 0.5 -> repainted
    return m


def build(name, v, fixtures, base, picture, mask_image):
    components = dict(base.components)
    if v["unet"] is not None:
        components["unet"] = UNet2DConditionModel.from_pretrained(fixtures / v["unet"], variant="fp16").float().eval()
    pipe = StableDiffusionInpaintPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    n = CALL["num_images_per_prompt"]
    noise = seeded_noise(v["seed"], n)
    call = dict(CALL, image=picture, mask_image=mask_image, strength=v["strength"])
    with pinned_latents(inpaint_module, noise), torch.no_grad():
        image = pipe.image_processor.preprocess(picture, height=SIDE, width=SIDE)
        mask = pipe.mask_processor.preprocess(mask_image, height=SIDE, width=SIDE)
        masked = image * (mask < 0.5)
        sf = pipe.vae.config.scaling_factor
        image_latents = pipe.vae.encode(image).latent_dist.mean * sf
        masked_latents = pipe.vae.encode(masked).latent_dist.mean * sf
        mask_latents = torch.nn.functional.interpolate(mask, size=(SIDE // 8, SIDE // 8))
        out_latents = pipe(**call, output_type="latent").images
        img_np = pipe(**call, output_type="np").images
        pils = pipe(**call, output_type="pil").images
        # the output depends on the mask: another mask gives other latents
        other = pipe(**dict(call, mask_image=PIL.Image.fromarray(255 - test_mask())), output_type="latent").images
    assert (other - out_latents).abs().max() > 1e-2
    timesteps = run_timesteps(pipe, CALL["num_inference_steps"], v["strength"])
    img = torch.from_numpy(np.ascontiguousarray(img_np)).float()
    assert img.shape == (n, SIDE, SIDE, 3)

    golden = fixtures / "golden"
    gold = {"image": image, "mask": mask, "mask_latents": mask_latents, "image_latents": image_latents,
            "masked_image_latents": masked_latents, "noise": noise, "timesteps": timesteps.to(torch.int64),
            "out_latents": out_latents, "out_image": img}
    save_tensors(golden / f"{name}.safetensors", {f"inpaint.{k}": t for k, t in gold.items()}, GEN)
    save_tensors(golden / f"{name}-latents.safetensors", {"latents": noise}, GEN)
    for i, p in enumerate(pils):
        p.save(golden / f"{name}-{i:05d}.png")
    settings = {
        "inpaint": {**call_settings(CALL, v["strength"]), "height": SIDE, "width": SIDE,
                    "unet_in_channels": pipe.unet.config.in_channels,
                    "unet": v["unet"] or "sd1-tiny/unet", "base": "sd1-tiny", "scheduler": "DDIMScheduler",
                    "vae_latents": "posterior mean", "timesteps": [int(t) for t in timesteps]},
        "output_stds": {"out_latents": float(out_latents.std()), "out_image": float(img.std())},
        "versions": versions(),
    }
    write_json(golden / f"{name}.json", settings, indent=2)
    print(f"== {name}: in_channels {pipe.unet.config.in_channels}, strength {v['strength']}, "
          f"timesteps {settings['inpaint']['timesteps']}, out_latents std {settings['output_stds']['out_latents']:.4f}")


def build_all(fixtures):
    golden = fixtures / "golden"
    picture = PIL.Image.fromarray(test_picture(PICTURE_SEED))
    mask_image = PIL.Image.fromarray(test_mask())
    picture.save(golden / "inpaint-image.png")
    mask_image.save(golden / "inpaint-mask.png")
    # the pipeline reads what a user's files would give
    picture, mask_image = PIL.Image.open(golden / "inpaint-image.png"), PIL.Image.open(golden / "inpaint-mask.png")
    base = StableDiffusionPipeline.from_pretrained(fixtures / "sd1-tiny", dtype=torch.float32)
    for name, v in CASES.items():
        build(name, v, fixtures, base, picture, mask_image)


if __name__ == "__main__":
    common.fixtures_main(build_all, "sd1-tiny, unet-inpaint-tiny, golden")
