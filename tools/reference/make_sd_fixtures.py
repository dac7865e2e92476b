"""Golden fixtures for disendiff's Rust Stable Diffusion code (contract: FIXTURES.md, same folder).

Builds tiny random-weight diffusers folders (sd1-tiny, sd2-tiny, unet-inpaint-tiny), copies the
real CLIP BPE files, and records golden tensors from diffusers / transformers on the CPU in
float32:

    python tools/reference/make_sd_fixtures.py --out tests/fixtures [--vocab-dir DIR]

`--vocab-dir` must hold the real CLIP `vocab.json` + `merges.txt` (built by make_clip_vocab.py);
by default the committed copies in OUT/tokenizer/ are used.
Everything is seeded: a rerun with the same library versions writes the same files.
"""
import common  # first: pins threads and determinism before torch is imported

import argparse
import copy
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
from common import perturb, save_tensors, versions, write_json

BOS, EOS = 49406, 49407
NEW_TOKENS = ["<new1>", "<new2>"]
TEXT_PROMPTS = ["a photo of a cat", "a red ball and a blue box", "A  photo of a dog, 2 cats!"]
PIPE = dict(
    prompt="a red ball and a blue box",
    negative_prompt="blurry",
    num_inference_steps=10,
    guidance_scale=7.5,
    eta=0.0,
    height=64,
    width=64,
    num_images_per_prompt=2,
)
UNET_TIMESTEPS = [999, 37]
ATTN_TOKENS = 10  # columns of the attention-probability goldens that are stored
DDPM_T = [0, 1, 37, 500, 999]
GEN = "tools/reference/make_sd_fixtures.py"

VARIANTS = {
    "sd1": dict(
        seed=1000,
        text=dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, hidden_act="quick_gelu",
                  pad_token_id=EOS),
        pad_token="<|endoftext|>",
        unet=dict(cross_attention_dim=32, attention_head_dim=4, layers_per_block=2),
        prediction_type="epsilon",
    ),
    "sd2": dict(
        seed=2000,
        text=dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, hidden_act="gelu",
                  pad_token_id=0),
        pad_token="!",
        unet=dict(cross_attention_dim=16, attention_head_dim=[2, 4, 4], use_linear_projection=True, layers_per_block=1,
                  upcast_attention=True),
        prediction_type="v_prediction",
    ),
}


# ----------------------------------------------------------------------------------------------
# models


def make_text_encoder(cfg, seed):
    config = CLIPTextConfig(
        vocab_size=49408, max_position_embeddings=77, num_hidden_layers=2, bos_token_id=BOS,
        eos_token_id=EOS, **cfg,
    )
    torch.manual_seed(seed)
    model = CLIPTextModel(config).eval()
    perturb(model, seed + 1)
    with torch.no_grad():  # the goldens use exactly the float16 values stored on disk
        for p in model.parameters():
            p.copy_(p.half().float())
    return model


def make_unet(cfg, seed, in_channels=4):
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=in_channels, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(16, 32, 32), norm_num_groups=8, **cfg,
    ).eval()
    perturb(unet, seed + 1)
    return unet


def make_vae(seed):
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4,
        latent_channels=4, sample_size=64, scaling_factor=0.18215,
    ).eval()
    perturb(vae, seed + 1)
    return vae


def make_scheduler(prediction_type):
    return DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type,
        timestep_spacing="leading",
    )


def make_tokenizer(vocab_dir, pad_token, added=()):
    tok = CLIPTokenizer(
        vocab=str(vocab_dir / "vocab.json"), merges=str(vocab_dir / "merges.txt"),
        pad_token=pad_token, model_max_length=77,
    )
    assert len(tok) == 49408 and tok.bos_token_id == BOS and tok.eos_token_id == EOS
    if added:
        tok.add_tokens(list(added))
        assert tok.convert_tokens_to_ids(list(added)) == list(range(49408, 49408 + len(added)))
    return tok


# ----------------------------------------------------------------------------------------------
# cross-attention probabilities


class RecordingAttnProcessor(common.ClassicAttnProcessor):
    """diffusers' classic AttnProcessor (same code, same output) that also stores the
    cross-attention probabilities of layers whose query has 256 positions (16x16 grid)."""

    def record(self, attn, probs, is_cross, batch_size):
        if self.name.endswith("attn2") and probs.shape[1] == 256:
            self.store[self.name] = probs.detach().clone()


def unet_goldens(unet, seed, ctx_dim, in_channels, with_attn):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn([2, in_channels, 16, 16], generator=g)
    context = torch.randn([2, 77, ctx_dim], generator=g)
    timesteps = torch.tensor(UNET_TIMESTEPS, dtype=torch.int64)
    with torch.no_grad():
        out_default = unet(sample, timesteps, encoder_hidden_states=context).sample
        store, default_procs, default_name = RecordingAttnProcessor.install(unet)
        out = unet(sample, timesteps, encoder_hidden_states=context).sample
    unet.set_attn_processor(default_procs)
    err = (out - out_default).abs().max().item()
    assert torch.allclose(out, out_default, atol=1e-5, rtol=1e-4), err
    print(f"  unet: classic vs default ({default_name}) max |diff| {err:.2e}")
    gold = {"unet.sample": sample, "unet.timesteps": timesteps, "unet.context": context, "unet.out": out}
    if with_attn:
        assert len(store) > 0
        for name in sorted(store):
            p = store[name]
            heads = unet.get_submodule(name).heads
            assert p.shape == (2 * heads, 256, 77), (name, p.shape)
            assert torch.allclose(p.sum(-1), torch.ones(()), atol=1e-5)
            # Only the first ATTN_TOKENS context tokens are kept, to keep the fixture small.
            gold[f"unet.attn.{name}"] = p[..., :ATTN_TOKENS].contiguous()
            print(f"  unet.attn.{name}: {list(p.shape)} max {p.max():.3f}")
    return gold


# ----------------------------------------------------------------------------------------------


def std(t):
    return float(torch.as_tensor(t).float().std())


def build_pipeline(name, v, vocab_dir, out):
    seed = v["seed"]
    print(f"== {name}")
    text_encoder = make_text_encoder(v["text"], seed + 10)
    tokenizer = make_tokenizer(vocab_dir, v["pad_token"])
    unet = make_unet(dict(v["unet"]), seed + 20)
    vae = make_vae(seed + 30)
    scheduler = make_scheduler(v["prediction_type"])
    print(f"  params: text {sum(p.numel() for p in text_encoder.parameters()):,}, "
          f"unet {sum(p.numel() for p in unet.parameters()):,}, vae {sum(p.numel() for p in vae.parameters()):,}")
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    D = v["text"]["hidden_size"]
    gold, stds = {}, {}

    # text encoder
    ids = tokenizer(TEXT_PROMPTS, padding="max_length", max_length=77, truncation=True,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = text_encoder(ids)[0]
        eager = copy.deepcopy(text_encoder)
        eager.config._attn_implementation = "eager"
        err = (eager(ids)[0] - hidden).abs().max().item()
    assert err < 1e-5, err
    print(f"  text: {text_encoder.config._attn_implementation} vs eager max |diff| {err:.2e}")
    assert hidden.shape == (3, 77, D)
    gold["text.input_ids"], gold["text.hidden"] = ids.to(torch.int64), hidden
    stds["text.hidden"] = std(hidden)

    # unet
    gold.update(unet_goldens(unet, seed + 40, D, 4, with_attn=True))
    stds["unet.out"] = std(gold["unet.out"])

    # vae
    g = torch.Generator().manual_seed(seed + 50)
    image = torch.rand([1, 3, 64, 64], generator=g) * 2 - 1
    decode_in = torch.randn([1, 4, 8, 8], generator=g)
    with torch.no_grad():
        post = vae.encode(image).latent_dist
        decoded = vae.decode(decode_in).sample
    gold.update({"vae.image": image, "vae.mean": post.mean, "vae.std": post.std,
                 "vae.decode_in": decode_in, "vae.decoded": decoded})
    stds.update({"vae.mean": std(post.mean), "vae.std(mean of)": float(post.std.mean()),
                 "vae.decoded": std(decoded)})

    # ddim
    ddim = DDIMScheduler.from_config(scheduler.config)
    ddim.set_timesteps(50)
    gold["ddim.timesteps"] = ddim.timesteps.to(torch.int64)
    g = torch.Generator().manual_seed(seed + 60)
    for key, t in (("ddim.step", ddim.timesteps[25]), ("ddim.step_last", ddim.timesteps[-1])):
        model_output = torch.randn([2, 4, 8, 8], generator=g)
        sample = torch.randn([2, 4, 8, 8], generator=g)
        noise = torch.randn([2, 4, 8, 8], generator=g)
        prev = ddim.step(model_output, t, sample, eta=0.0).prev_sample
        prev_eta = ddim.step(model_output, t, sample, eta=0.7, variance_noise=noise).prev_sample
        gold.update({f"{key}.t": torch.tensor([int(t)], dtype=torch.int64),
                     f"{key}.model_output": model_output, f"{key}.sample": sample,
                     f"{key}.prev_sample": prev, f"{key}.noise": noise, f"{key}.prev_sample_eta": prev_eta})
    # ddpm (training scheduler built from the folder's scheduler config)
    ddpm = DDPMScheduler.from_config(scheduler.config)
    t = torch.tensor(DDPM_T, dtype=torch.int64)
    x0 = torch.randn([len(DDPM_T), 4, 8, 8], generator=g)
    noise = torch.randn([len(DDPM_T), 4, 8, 8], generator=g)
    gold.update({"ddpm.x0": x0, "ddpm.noise": noise, "ddpm.t": t,
                 "ddpm.noisy": ddpm.add_noise(x0, noise, t), "ddpm.velocity": ddpm.get_velocity(x0, noise, t),
                 "ddpm.alphas_cumprod": ddpm.alphas_cumprod.float()})

    # full pipeline
    g = torch.Generator().manual_seed(seed + 70)
    latents = torch.randn([2, 4, 8, 8], generator=g)
    with torch.no_grad():
        out_latents = pipe(**PIPE, latents=latents.clone(), output_type="latent").images
        img_np = pipe(**PIPE, latents=latents.clone(), output_type="np").images
        img_pil = pipe(**PIPE, latents=latents.clone(), output_type="pil").images
        redecoded = (vae.decode(out_latents / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    img = torch.from_numpy(np.ascontiguousarray(img_np)).float()
    assert img.shape == (2, 64, 64, 3)
    assert torch.allclose(redecoded.permute(0, 2, 3, 1), img, atol=1e-6)
    gold.update({"pipe.latents": latents, "pipe.out_latents": out_latents, "pipe.image": img})
    stds.update({"pipe.out_latents": std(out_latents), "pipe.image": std(img),
                 "pipe.image mean": float(img.mean()),
                 "pipe.image clamped frac": float(((img <= 0) | (img >= 1)).float().mean())})

    # write folder + goldens
    folder = out / f"{name}-tiny"
    pipe.save_pretrained(folder, safe_serialization=True)
    # text encoder weights as float16 (exactly the values used above)
    shutil.rmtree(folder / "text_encoder")
    copy.deepcopy(text_encoder).to(torch.float16).save_pretrained(folder / "text_encoder")
    fix_tokenizer_folder(folder / "tokenizer", vocab_dir)
    golden = out / "golden"
    save_tensors(golden / f"{name}.safetensors", gold, GEN)
    for i, im in enumerate(img_pil):
        im.save(golden / f"{name}-pipe-{i:05d}.png")
        assert np.array_equal(np.asarray(im), (img_np[i] * 255).round().astype(np.uint8))
    settings = {
        "text_prompts": TEXT_PROMPTS,
        "pipe": {"prompt": PIPE["prompt"], "negative_prompt": PIPE["negative_prompt"],
                 "steps": PIPE["num_inference_steps"], "guidance_scale": PIPE["guidance_scale"],
                 "eta": PIPE["eta"], "height": PIPE["height"], "width": PIPE["width"],
                 "num_images_per_prompt": PIPE["num_images_per_prompt"], "scheduler": "DDIMScheduler",
                 "prediction_type": v["prediction_type"]},
        "unet": {"timesteps": UNET_TIMESTEPS, "attn_layers": sorted(k[len("unet.attn."):] for k in gold
                                                                   if k.startswith("unet.attn."))},
        "ddpm": {"t": DDPM_T},
        "output_stds": stds,
        "versions": versions(),
    }
    write_json(golden / f"{name}.json", settings, indent=2)
    for k, s in stds.items():
        print(f"  {k}: {s:.4f}")

    check_reload(folder, gold, latents)


def fix_tokenizer_folder(tok_dir, vocab_dir):
    """transformers 5 saves only tokenizer.json (3.6 MB) + tokenizer_config.json; real SD folders ship
    vocab.json + merges.txt (+ tokenizer_config.json, special_tokens_map.json). Write the real layout."""
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    (tok_dir / "tokenizer.json").unlink(missing_ok=True)
    shutil.copyfile(vocab_dir / "vocab.json", tok_dir / "vocab.json")
    shutil.copyfile(vocab_dir / "merges.txt", tok_dir / "merges.txt")
    special = {k: cfg[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    write_json(tok_dir / "special_tokens_map.json", special, indent=2)


def check_reload(folder, gold, latents):
    """Reload the written folder with diffusers and check it reproduces the goldens."""
    pipe = StableDiffusionPipeline.from_pretrained(folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.text_encoder.dtype == torch.float32
    ids = pipe.tokenizer(TEXT_PROMPTS, padding="max_length", max_length=77, truncation=True,
                         return_tensors="pt").input_ids
    assert torch.equal(ids, gold["text.input_ids"])
    with torch.no_grad():
        assert torch.equal(pipe.text_encoder(ids)[0], gold["text.hidden"])
        u = pipe.unet(gold["unet.sample"], gold["unet.timesteps"], encoder_hidden_states=gold["unet.context"]).sample
        assert torch.allclose(u, gold["unet.out"], atol=1e-5)
        assert torch.equal(pipe.vae.decode(gold["vae.decode_in"]).sample, gold["vae.decoded"])
        lat = pipe(**PIPE, latents=latents.clone(), output_type="latent").images
    assert torch.allclose(lat, gold["pipe.out_latents"], atol=1e-5)
    print(f"  reload of {folder.name}: ok")


def build_inpaint(vocab_dir, out):
    print("== unet-inpaint")
    seed = 3000
    unet = make_unet(dict(VARIANTS["sd1"]["unet"], layers_per_block=1), seed + 20, in_channels=9)
    # Stored as the "fp16" variant (diffusion_pytorch_model.fp16.safetensors, float16 values): the
    # goldens use exactly those rounded values in float32.
    with torch.no_grad():
        for prm in unet.parameters():
            prm.copy_(prm.half().float())
    gold = unet_goldens(unet, seed + 40, 32, 9, with_attn=False)
    print(f"  unet.out std {std(gold['unet.out']):.4f}")
    copy.deepcopy(unet).to(torch.float16).save_pretrained(out / "unet-inpaint-tiny", safe_serialization=True, variant="fp16")
    save_tensors(out / "golden" / "unet-inpaint.safetensors", gold, GEN)
    re = UNet2DConditionModel.from_pretrained(out / "unet-inpaint-tiny", variant="fp16").float().eval()
    with torch.no_grad():
        u = re(gold["unet.sample"], gold["unet.timesteps"], encoder_hidden_states=gold["unet.context"]).sample
    assert torch.allclose(u, gold["unet.out"], atol=1e-5)


# ----------------------------------------------------------------------------------------------
# tokenizer cases

TOKENIZER_PROMPTS = [
    ("a photo of a cat", False),
    ("a red ball and a blue box", False),
    ("sks", False),
    ("A PHOTO Of A Cat", False),
    ("a   photo\tof\n\na  cat ", False),
    ("   leading and trailing spaces   ", False),
    ("dog, 2 cats!", False),
    ("wow!! really!?", False),
    ("hello...world?! (yes) [no] {maybe}", False),
    ("the dog's toy", False),
    ("it's", False),
    ("I'M sure you'LL see they'd've won", False),
    ("1234", False),
    ("year 2024: pi=3.14, 50% off", False),
    ("a well-known sci-fi movie -- really", False),
    ("snake_case and CamelCase/slashes", False),
    ("", False),
    ("café naïve", False),
    ("cafe\u0301 (decomposed e + combining accent)", False),
    ("Straße ÅNGSTRÖM", False),
    ("日本の猫", False),
    ("a cat 🐱 emoji", False),
    ("a cat <|endoftext|> dog", False),
    ("<|startoftext|>a cat", False),
    ("A  photo of a <new1> dog, 2 cats!", True),
    ("a <new1> and a <new2>", True),
    ("<new1>, <new2>.", True),
    ("a<new1>dog", True),
    ("<new1><new2>", True),
    ("A <NEW1> dog", True),
    ("a photo of a cat", True),
    (" ".join(["a photo of a very fluffy cat"] * 14), False),
    ("the quick brown fox jumps over the lazy dog " * 10, True),
]
KNOWN = ("A  photo of a <new1> dog, 2 cats!",
         [49406, 320, 1125, 539, 320, 49408, 1929, 267, 273, 3989, 256, 49407])


def tokenizer_cases(vocab_dir):
    cases = []
    for pad in ("<|endoftext|>", "!"):
        plain = make_tokenizer(vocab_dir, pad)
        added = make_tokenizer(vocab_dir, pad, NEW_TOKENS)
        for prompt, use_added in TOKENIZER_PROMPTS:
            tok = added if use_added else plain
            enc = tok(prompt, padding="max_length", max_length=77, truncation=True)
            ids, mask = list(enc.input_ids), list(enc.attention_mask)
            assert len(ids) == 77 and ids[0] == BOS and EOS in ids
            n = sum(mask)
            assert ids[n - 1] == EOS and all(i == tok.pad_token_id for i in ids[n:])
            cases.append({"prompt": prompt, "added_tokens": NEW_TOKENS if use_added else [],
                          "pad_token": pad, "pad_id": tok.pad_token_id, "length": n, "ids": ids})
            if prompt == KNOWN[0] and pad == "<|endoftext|>":
                assert ids[:12] == KNOWN[1], ids[:12]
            if prompt == KNOWN[0] and pad == "!":
                # "!" is registered as a special (added) token when it is the pad token, so a "!" in
                # the text becomes id 0 instead of BPE "!</w>" (256).
                assert ids[:12] == KNOWN[1][:10] + [0, EOS], ids[:12]
            if len(tok(prompt).input_ids) > 77:
                assert n == 77 and ids[76] == EOS
    return cases


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--vocab-dir", type=Path, default=None,
                    help="folder with the real vocab.json + merges.txt (default: OUT/tokenizer)")
    args = ap.parse_args()
    t0 = time.time()
    out = args.out
    # keep a private copy of the BPE files: OUT/tokenizer is rewritten below
    tmp = Path(tempfile.mkdtemp(prefix="clipvocab-"))
    src = args.vocab_dir or out / "tokenizer"
    for f in ("vocab.json", "merges.txt"):
        shutil.copyfile(src / f, tmp / f)
    args.vocab_dir = tmp
    for sub in ("sd1-tiny", "sd2-tiny", "unet-inpaint-tiny", "tokenizer", "golden"):
        if (out / sub).exists():
            shutil.rmtree(out / sub)
    (out / "tokenizer").mkdir(parents=True)
    (out / "golden").mkdir()
    for f in ("vocab.json", "merges.txt"):
        shutil.copyfile(args.vocab_dir / f, out / "tokenizer" / f)

    cases = tokenizer_cases(args.vocab_dir)
    write_json(out / "golden" / "tokenizer.json", cases, indent=1, ensure_ascii=False)
    print(f"== tokenizer: {len(cases)} cases")
    for c in cases:
        if c["pad_token"] == "<|endoftext|>":
            print(f"  {c['prompt'][:40]!r:44} {c['ids'][:c['length']][:14]}")

    for name, v in VARIANTS.items():
        build_pipeline(name, v, args.vocab_dir, out)
    build_inpaint(args.vocab_dir, out)
    import make_img2img_fixtures  # a sibling script; reads the folders written above

    make_img2img_fixtures.build_all(out)
    import make_inpaint_fixtures  # a sibling script; reads sd1-tiny and unet-inpaint-tiny written above

    make_inpaint_fixtures.build_all(out)
    import make_vae_tiling_fixtures  # a sibling script; reads sd1-tiny written above

    make_vae_tiling_fixtures.build_all(out)
    import make_single_file_fixtures  # a sibling script; reads sd1-tiny, sd2-tiny, unet-inpaint-tiny and their goldens

    make_single_file_fixtures.build_all(out)
    import make_clip_fixtures  # a sibling script; writes clip-tiny/ and golden/clip*

    make_clip_fixtures.build_all(out)

    print("== files")
    total = 0
    for p in sorted(out.rglob("*")):
        if p.is_file():
            total += p.stat().st_size
            print(f"  {p.relative_to(out)}  {p.stat().st_size:,}")
    print(f"  total {total / 1e6:.2f} MB; {time.time() - t0:.1f} s")
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
