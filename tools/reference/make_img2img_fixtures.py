"""Golden image-to-image fixtures for disendiff's `pipelines::img2img` (contract: FIXTURES.md).

Runs diffusers' StableDiffusionImg2ImgPipeline (DDIM, `strength` < 1, classifier-free guidance,
eta 0) on the tiny folders that make_sd_fixtures.py wrote, on the CPU in float32:

    python tools/reference/make_img2img_fixtures.py --out tests/fixtures

make_sd_fixtures.py calls it at its end (it rewrites golden/), so a full regeneration keeps these.
Two things of the pipeline are pinned so that an independent implementation can reproduce it:
- the VAE posterior is read at its mean (`retrieve_latents(..., sample_mode="argmax")`; the
  pipeline samples it by default), as disendiff's img2img does;
- the noise that `prepare_latents` adds to the image latents is a seeded tensor stored in the
  golden file (`randn_tensor` of the pipeline module is replaced by one returning it).
Writes golden/img2img-<name>.safetensors and golden/img2img-<name>.json for sd1 and sd2.
"""
import common  # first: pins threads and determinism before torch is imported

import numpy as np
import PIL.Image
import torch

import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img as img2img_module
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
from common import pinned_latents, save_tensors, versions, write_json

CALL = dict(
    prompt="a red ball and a blue box",
    negative_prompt="blurry",
    num_inference_steps=10,
    guidance_scale=7.5,
    eta=0.0,
    num_images_per_prompt=2,
)
VARIANTS = {"sd1": dict(seed=1100, strength=0.65), "sd2": dict(seed=2100, strength=0.8)}
SIDE = 64


def test_picture(seed):
    """A 64x64 RGB picture with smooth regions and edges (gradient sky, a disc, a box), uint8."""
    g = np.random.default_rng(seed)
    y, x = np.mgrid[0:SIDE, 0:SIDE].astype(np.float32) / (SIDE - 1)
    img = np.stack([0.3 + 0.5 * y, 0.5 + 0.3 * x, 0.9 - 0.4 * y], axis=-1)
    disc = (x - 0.3) ** 2 + (y - 0.6) ** 2 < 0.04
    img[disc] = [0.85, 0.15, 0.1]
    box = (x > 0.55) & (x < 0.85) & (y > 0.35) & (y < 0.75)
    img[box] = [0.1, 0.2, 0.8]
    img = img + 0.03 * g.standard_normal(img.shape)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def seeded_noise(seed, n):
    """The noise the pipeline's `prepare_latents` gets (`pinned_latents`): [n, 4, SIDE / 8, SIDE / 8]."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn([n, 4, SIDE // 8, SIDE // 8], generator=g)


def run_timesteps(pipe, steps, strength):
    """The DDIM timesteps the pipeline ran at this strength."""
    pipe.scheduler.set_timesteps(steps)
    timesteps, _ = pipe.get_timesteps(steps, strength, "cpu")
    return timesteps


def call_settings(call, strength):
    """The json's record of a pipeline call's sampling settings (FIXTURES.md)."""
    return {"prompt": call["prompt"], "negative_prompt": call["negative_prompt"], "steps": call["num_inference_steps"],
            "strength": strength, "guidance_scale": call["guidance_scale"], "eta": call["eta"],
            "num_images_per_prompt": call["num_images_per_prompt"]}


def build(name, v, fixtures):
    folder = fixtures / f"{name}-tiny"
    base = StableDiffusionPipeline.from_pretrained(folder, dtype=torch.float32)
    pipe = StableDiffusionImg2ImgPipeline(**base.components)
    pipe.set_progress_bar_config(disable=True)
    seed = v["seed"]
    picture = PIL.Image.fromarray(test_picture(seed))
    image = pipe.image_processor.preprocess(picture)  # [1, 3, 64, 64] in [-1, 1], as the pipeline sees it
    noise = seeded_noise(seed, CALL["num_images_per_prompt"])
    call = dict(CALL, image=picture, strength=v["strength"])
    with pinned_latents(img2img_module, noise), torch.no_grad():
        init_latents = pipe.vae.encode(image).latent_dist.mean * pipe.vae.config.scaling_factor
        out_latents = pipe(**call, output_type="latent").images
        img_np = pipe(**call, output_type="np").images
        # the output depends on the picture: a different start gives different latents
        other = pipe(**dict(call, image=PIL.Image.fromarray(255 - test_picture(seed))), output_type="latent").images
    assert (other - out_latents).abs().max() > 1e-2
    timesteps = run_timesteps(pipe, CALL["num_inference_steps"], v["strength"])
    img = torch.from_numpy(np.ascontiguousarray(img_np)).float()
    assert img.shape == (CALL["num_images_per_prompt"], SIDE, SIDE, 3)

    gold = {"image": image, "noise": noise, "init_latents": init_latents, "timesteps": timesteps.to(torch.int64),
            "out_latents": out_latents, "out_image": img}
    golden = fixtures / "golden"
    save_tensors(golden / f"img2img-{name}.safetensors", {f"img2img.{k}": t for k, t in gold.items()},
                 "tools/reference/make_img2img_fixtures.py")
    settings = {
        "img2img": {**call_settings(CALL, v["strength"]), "scheduler": "DDIMScheduler",
                    "vae_latents": "posterior mean", "timesteps": [int(t) for t in timesteps]},
        "output_stds": {"out_latents": float(out_latents.std()), "out_image": float(img.std()),
                        "init_latents": float(init_latents.std())},
        "versions": versions(),
    }
    write_json(golden / f"img2img-{name}.json", settings, indent=2)
    print(f"== img2img {name}: strength {v['strength']}, timesteps {settings['img2img']['timesteps']}, "
          f"out_latents std {settings['output_stds']['out_latents']:.4f}")


def build_all(fixtures):
    for name, v in VARIANTS.items():
        build(name, v, fixtures)


if __name__ == "__main__":
    common.fixtures_main(build_all, "sd1-tiny, sd2-tiny, golden")
