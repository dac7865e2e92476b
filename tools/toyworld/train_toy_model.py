#!/usr/bin/env python3
"""Train the toy Stable-Diffusion-architecture base model of disendiff on the synthetic toy world.

Stages (run in this order; each one reads what the previous ones left in --work):

  data    read the scenes written by `disendiff toy scenes` into uint8 arrays (work/data_*.npz)
  vae     train an AutoencoderKL (64x64x3 -> 16x16x4) on the training scenes; reports held-out PSNR
          and writes a side-by-side reconstruction sheet (work/vae_recon.png)
  encode  encode every training scene once (posterior mean and std, work/latents.pt) and fix the
          VAE scaling_factor to 1/std of the latents
  unet    train UNet2DConditionModel + CLIPTextModel jointly from scratch on the cached latents
          (epsilon prediction, DDPM scaled-linear noise, 10% empty captions)
  save    write the diffusers folder (--out): model_index.json, scheduler/, tokenizer/ (copied),
          text_encoder/ (float16), unet/, vae/ (float32), SHA256SUMS
  eval    reload --out with StableDiffusionPipeline + DDIMScheduler, generate a contact sheet of
          held-out prompts and measure how well the 16x16 cross-attention maps of class tokens
          overlap the objects' masks (soft IoU)

Example (the command used for assets/toy-model, see README.md):

  cd /work/main && cargo build --release
  ./target/release/disendiff toy scenes --n 20000 --seed 1 --out /tmp/toyscenes
  ./target/release/disendiff toy scenes --n 512 --seed 2 --out /tmp/toyscenes_val
  nice -n 10 /work/refenv/bin/python tools/toyworld/train_toy_model.py \
      --scenes /tmp/toyscenes --val-scenes /tmp/toyscenes_val --work /tmp/toywork \
      --out assets/toy-model --stages data,vae,encode,unet,save,eval

Training is bounded both by a step count and by a wall-clock budget per stage: the learning-rate
schedule follows progress = max(step / steps, elapsed / budget) and the stage ends at progress 1,
so on a busy machine it trains fewer steps instead of overrunning.
"""

import argparse
import glob
import hashlib
import json
import math
import os
import shutil
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))
TOKENIZER_SRC = os.path.join(REPO, "tests", "fixtures", "sd1-tiny", "tokenizer")
TOKENIZER_FILES = ["vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"]

# ---------------------------------------------------------------- architecture

TEXT_CONFIG = dict(
    vocab_size=49408,
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    projection_dim=64,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
)

UNET_CONFIG = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(48, 96, 96),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=64,
    attention_head_dim=4,  # diffusers' SD1 naming: this is the number of heads
    norm_num_groups=16,
)

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(32, 48, 64),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=16,
    sample_size=64,
    # Fully convolutional, so training on crops is exact (real SD VAEs have a mid attention).
    mid_block_add_attention=False,
)

SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    steps_offset=1,
    set_alpha_to_one=False,
    clip_sample=False,
    timestep_spacing="leading",
)

EVAL_PROMPTS = [
    "a red ball on a white background",
    "a blue box on a gray background",
    "a yellow star on a black background",
    "a green ring on a white background",
    "a purple heart on a gray background",
    "an orange cross on a black background",
    "a white triangle on a gray background",
    "a red striped ball on a black background",
    "a blue checked box on a white background",
    "a blue striped box and a yellow star on a gray background",
    "a green dotted ring and a red heart on a white background",
    "a red ball, a blue box and a yellow star on a gray background",
]


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def progress_schedule(step, steps, t0, budget_s, warmup, lr, final_frac):
    """Returns (progress, lr) with progress = max(step/steps, elapsed/budget)."""
    prog = max(step / steps, (time.time() - t0) / budget_s)
    if step < warmup:
        cur = lr * (step + 1) / warmup
    else:
        cur = lr * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * min(prog, 1.0))))
    return prog, cur


def to_pil(x):
    """[-1,1] tensor (3,H,W) -> PIL"""
    a = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(a)


# ---------------------------------------------------------------- data

def load_scenes(folder, with_masks):
    recs = [json.loads(l) for l in open(os.path.join(folder, "scenes.jsonl"))]
    imgs = np.stack([np.asarray(Image.open(os.path.join(folder, r["image"])).convert("RGB")) for r in recs])
    out = dict(images=imgs, captions=np.array([r["caption"] for r in recs]))
    if with_masks:
        out["masks"] = np.stack([np.asarray(Image.open(os.path.join(folder, r["mask"]))) for r in recs])
        out["records"] = np.array([json.dumps(r) for r in recs])
    return out


def stage_data(a):
    t0 = time.time()
    # --scenes may name several folders (comma-separated): their scenes are concatenated, e.g. a
    # general set and a set of two-object scenes.
    parts = [load_scenes(f, False) for f in a.scenes.split(",")]
    tr = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    np.savez(os.path.join(a.work, "data_train.npz"), **tr)
    va = load_scenes(a.val_scenes, True)
    np.savez(os.path.join(a.work, "data_val.npz"), **va)
    log(f"data: {len(tr['images'])} training, {len(va['images'])} held-out scenes ({time.time() - t0:.0f} s)")


def load_npz(a, name):
    return dict(np.load(os.path.join(a.work, f"data_{name}.npz")))


def images_to_tensor(u8):
    return torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 127.5 - 1.0


# ---------------------------------------------------------------- VAE

def new_vae():
    from diffusers import AutoencoderKL
    return AutoencoderKL(**VAE_CONFIG)


@torch.no_grad()
def vae_psnr(vae, val_u8, n=256):
    x = images_to_tensor(val_u8[:n])
    mse = []
    recon = []
    for i in range(0, len(x), 64):
        xb = x[i:i + 64]
        r = vae.decode(vae.encode(xb).latent_dist.mean).sample.clamp(-1, 1)
        # PSNR on the 0..1 scale
        mse.append((((r - xb) / 2) ** 2).mean(dim=(1, 2, 3)))
        recon.append(r)
    mse = torch.cat(mse)
    psnr = (10 * torch.log10(1 / mse)).mean().item()
    return psnr, x, torch.cat(recon)


def stage_vae(a):
    tr = load_npz(a, "train")
    va = load_npz(a, "val")
    imgs = torch.from_numpy(tr["images"]).permute(0, 3, 1, 2).contiguous()  # uint8
    torch.manual_seed(a.seed)
    if a.init_from:
        # fine-tune the shipped VAE (for example on a world with new colours) rather than start
        # afresh, so the latent space the UNet knows moves as little as possible
        from diffusers import AutoencoderKL
        vae = AutoencoderKL.from_pretrained(os.path.join(a.init_from, "vae")).train()
        log(f"vae: fine-tuning the VAE of {a.init_from}")
    else:
        vae = new_vae()
    log(f"vae: {sum(p.numel() for p in vae.parameters()) / 1e6:.3f} M params")
    opt = torch.optim.AdamW(vae.parameters(), lr=a.vae_lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(a.seed)
    t0 = time.time()
    step = 0
    c = a.vae_crop
    while True:
        prog, lr = progress_schedule(step, a.vae_steps, t0, a.vae_minutes * 60, 50, a.vae_lr, 0.05)
        if prog >= 1:
            break
        for pg in opt.param_groups:
            pg["lr"] = lr
        idx = torch.randint(0, len(imgs), (a.vae_batch,), generator=g)
        x = imgs[idx].float() / 127.5 - 1.0
        if c < 64:
            ox, oy = (torch.randint(0, (64 - c) // 4 + 1, (2,), generator=g) * 4).tolist()
            x = x[:, :, oy:oy + c, ox:ox + c]
        if torch.rand(1, generator=g).item() < 0.5:
            x = x.flip(3)
        if torch.rand(1, generator=g).item() < 0.5:
            x = x.flip(2)
        post = vae.encode(x).latent_dist
        r = vae.decode(post.sample()).sample
        rec = (r - x).abs().mean() + F.mse_loss(r, x)
        kl = post.kl().mean()
        loss = rec + a.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 100 == 0 or step == 1:
            log(f"vae step {step} rec {rec.item():.4f} kl {kl.item():.1f} lr {lr:.2e} "
                f"{(time.time() - t0) / step:.3f} s/step")
    train_s = time.time() - t0
    vae.eval()
    psnr, x, r = vae_psnr(vae, va["images"])
    log(f"vae: {step} steps in {train_s / 60:.1f} min; held-out PSNR (256 scenes, 64x64) {psnr:.2f} dB")
    vae.save_pretrained(os.path.join(a.work, "vae"))
    # side by side: originals row, reconstructions row, 16 scenes
    sheet = Image.new("RGB", (64 * 16, 128))
    for i in range(16):
        sheet.paste(to_pil(x[i]), (64 * i, 0))
        sheet.paste(to_pil(r[i]), (64 * i, 64))
    sheet = sheet.resize((sheet.width * 2, sheet.height * 2), Image.NEAREST)
    sheet.save(os.path.join(a.work, "vae_recon.png"))
    json.dump(dict(steps=step, minutes=train_s / 60, psnr=psnr), open(os.path.join(a.work, "vae_stats.json"), "w"))


def load_vae(a):
    from diffusers import AutoencoderKL
    work_vae = os.path.join(a.work, "vae")
    if a.init_from and not os.path.isdir(work_vae):
        # continuing from a shipped model: reuse its VAE instead of training one
        shutil.copytree(os.path.join(a.init_from, "vae"), work_vae)
        log(f"vae: copied from {a.init_from}")
    return AutoencoderKL.from_pretrained(work_vae).eval()


@torch.no_grad()
def stage_encode(a):
    tr = load_npz(a, "train")
    vae = load_vae(a)
    t0 = time.time()
    means, stds = [], []
    for i in range(0, len(tr["images"]), 200):
        post = vae.encode(images_to_tensor(tr["images"][i:i + 200])).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    mean = torch.cat(means)
    std = torch.cat(stds)
    total_std = math.sqrt(mean.var().item() + (std ** 2).mean().item())
    scaling = 1.0 / total_std
    log(f"encode: {len(mean)} latents in {time.time() - t0:.0f} s; latent mean {mean.mean():.3f} "
        f"std {total_std:.3f} (posterior std mean {std.mean():.4f}) -> scaling_factor {scaling:.5f}")
    torch.save(dict(mean=mean, std=std, scaling=scaling), os.path.join(a.work, "latents.pt"))
    vae.register_to_config(scaling_factor=scaling)
    vae.save_pretrained(os.path.join(a.work, "vae"))


# ---------------------------------------------------------------- UNet + text encoder

def tokenizer():
    from transformers import CLIPTokenizer
    return CLIPTokenizer.from_pretrained(TOKENIZER_SRC)


def tokenize(tok, captions):
    return tok(list(captions), padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def new_text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel
    return CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))


def new_unet():
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel(**UNET_CONFIG)


class Pair(torch.nn.Module):
    def __init__(self, unet, te):
        super().__init__()
        self.unet = unet
        self.te = te

    def forward(self, z, t, ids):
        h = self.te(ids).last_hidden_state
        return self.unet(z, t, encoder_hidden_states=h).sample


def alphas_cumprod():
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


def stage_unet(a):
    tr = load_npz(a, "train")
    lat = torch.load(os.path.join(a.work, "latents.pt"))
    mean, std, scaling = lat["mean"], lat["std"], lat["scaling"]
    tok = tokenizer()
    ids_all = tokenize(tok, tr["captions"])
    empty = tokenize(tok, [""])[0]
    torch.manual_seed(a.seed)
    model = Pair(new_unet(), new_text_encoder())
    n_unet = sum(p.numel() for p in model.unet.parameters())
    n_te = sum(p.numel() for p in model.te.parameters())
    log(f"unet: {n_unet / 1e6:.3f} M params; text encoder {n_te / 1e6:.3f} M params")
    ema = Pair(new_unet(), new_text_encoder())
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=a.unet_lr, weight_decay=0.01)
    ckpt_path = os.path.join(a.work, "unet_ckpt.pt")
    done_before = 0
    if a.resume:
        # continue a finished or interrupted run: weights (+ EMA, + optimizer state when saved) and a
        # fresh warmup + cosine schedule over --unet-steps / --unet-minutes
        ck = torch.load(ckpt_path)
        model.load_state_dict(ck["model"])
        ema.load_state_dict(ck["ema"])
        if "opt" in ck:
            opt.load_state_dict(ck["opt"])
        done_before = ck["step"]
        log(f"unet: resuming after {done_before} steps")
    elif a.init_from:
        # continue training a shipped model (weights only; the text encoder was stored in float16)
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel
        model.unet.load_state_dict(UNet2DConditionModel.from_pretrained(
            os.path.join(a.init_from, "unet")).state_dict())
        model.te.load_state_dict(CLIPTextModel.from_pretrained(
            os.path.join(a.init_from, "text_encoder")).float().state_dict())
        ema.load_state_dict(model.state_dict())
        log(f"unet: initialised from {a.init_from}")
    ac = alphas_cumprod()
    snr = ac / (1 - ac)
    g = torch.Generator().manual_seed(a.seed + 1)
    t0 = time.time()
    step = 0
    losses = []
    while True:
        prog, lr = progress_schedule(step, a.unet_steps, t0, a.unet_minutes * 60, 100, a.unet_lr, 0.1)
        if prog >= 1:
            break
        for pg in opt.param_groups:
            pg["lr"] = lr
        idx = torch.randint(0, len(mean), (a.unet_batch,), generator=g)
        z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)) * scaling
        ids = ids_all[idx].clone()
        drop = torch.rand(len(idx), generator=g) < a.uncond_prob
        ids[drop] = empty
        t = torch.randint(0, 1000, (len(idx),), generator=g)
        eps = torch.randn(z0.shape, generator=g)
        abar = ac[t].view(-1, 1, 1, 1)
        zt = abar.sqrt() * z0 + (1 - abar).sqrt() * eps
        pred = model(zt, t, ids)
        # min-SNR-5 weighting (epsilon prediction): converges faster on short runs
        w = torch.clamp(snr[t], max=a.min_snr) / snr[t]
        loss = (((pred - eps) ** 2).mean(dim=(1, 2, 3)) * w).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        decay = min(a.ema, (1 + done_before + step) / (10 + done_before + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        losses.append(loss.item())
        if step % 50 == 0 or step == 1:
            log(f"unet step {step} loss {np.mean(losses[-50:]):.4f} lr {lr:.2e} "
                f"{(time.time() - t0) / step:.3f} s/step progress {prog:.3f}")
        if step % 500 == 0:
            torch.save(dict(model=model.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(),
                            step=done_before + step), ckpt_path)
    train_s = time.time() - t0
    log(f"unet: {step} steps in {train_s / 60:.1f} min")
    torch.save(dict(model=model.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(),
                    step=done_before + step), ckpt_path)
    # choose raw or EMA weights by held-out loss (fixed noise, fixed timesteps)
    va = load_npz(a, "val")
    vae = load_vae(a)
    with torch.no_grad():
        z0 = vae.encode(images_to_tensor(va["images"][:256])).latent_dist.mean * scaling
    ids = tokenize(tok, va["captions"][:256])
    gv = torch.Generator().manual_seed(123)
    tv = torch.randint(0, 1000, (len(z0),), generator=gv)
    ev = torch.randn(z0.shape, generator=gv)
    abar = ac[tv].view(-1, 1, 1, 1)
    zt = abar.sqrt() * z0 + (1 - abar).sqrt() * ev
    res = {}
    for name, m in [("raw", model), ("ema", ema)]:
        m.eval()
        with torch.no_grad():
            l = [((m(zt[i:i + 64], tv[i:i + 64], ids[i:i + 64]) - ev[i:i + 64]) ** 2).mean().item()
                 for i in range(0, len(zt), 64)]
        res[name] = float(np.mean(l))
    best = min(res, key=res.get)
    log(f"unet: held-out epsilon MSE raw {res['raw']:.4f} ema {res['ema']:.4f} -> using {best}")
    chosen = model if best == "raw" else ema
    chosen.unet.save_pretrained(os.path.join(a.work, "unet"))
    chosen.te.save_pretrained(os.path.join(a.work, "text_encoder"))
    json.dump(dict(steps=step, steps_before=done_before, minutes=train_s / 60, final_loss=float(np.mean(losses[-100:])),
                   heldout_mse=res, chosen=best),
              open(os.path.join(a.work, "unet_stats.json"), "w"))


# ---------------------------------------------------------------- save

def sha256sums(folder):
    lines = []
    for p in sorted(glob.glob(os.path.join(folder, "**", "*"), recursive=True)):
        if os.path.isfile(p) and os.path.basename(p) != "SHA256SUMS":
            h = hashlib.sha256(open(p, "rb").read()).hexdigest()
            lines.append(f"{h}  {os.path.relpath(p, folder)}")
    open(os.path.join(folder, "SHA256SUMS"), "w").write("\n".join(lines) + "\n")


def stage_save(a):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel
    out = a.out
    if os.path.exists(out):
        shutil.rmtree(out)
    vae = AutoencoderKL.from_pretrained(os.path.join(a.work, "vae"))
    unet = UNet2DConditionModel.from_pretrained(os.path.join(a.work, "unet"))
    te = CLIPTextModel.from_pretrained(os.path.join(a.work, "text_encoder")).half()
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tokenizer(), unet=unet,
                                   scheduler=DDIMScheduler(**SCHEDULER_CONFIG), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out)
    # the tokenizer folder is exactly the four files of the real CLIP tokenizer
    shutil.rmtree(os.path.join(out, "tokenizer"))
    os.makedirs(os.path.join(out, "tokenizer"))
    for f in TOKENIZER_FILES:
        shutil.copyfile(os.path.join(TOKENIZER_SRC, f), os.path.join(out, "tokenizer", f))
    for p in glob.glob(os.path.join(out, "*", "*.json")):
        cfg = json.load(open(p))
        if "_name_or_path" in cfg:  # a path of the machine that trained it
            del cfg["_name_or_path"]
            json.dump(cfg, open(p, "w"), indent=2, sort_keys=True)
            open(p, "a").write("\n")
    for p in glob.glob(os.path.join(out, "**", "*"), recursive=True):
        os.chmod(p, 0o755 if os.path.isdir(p) else 0o644)
    sha256sums(out)
    total = 0
    for p in sorted(glob.glob(os.path.join(out, "**", "*"), recursive=True)):
        if os.path.isfile(p):
            total += os.path.getsize(p)
            log(f"  {os.path.relpath(p, out)}: {os.path.getsize(p) / 1e6:.3f} MB")
    log(f"save: {out}, {total / 1e6:.2f} MB in all")


# ---------------------------------------------------------------- eval

class CaptureProcessor:
    """AttnProcessor that records the attention probabilities of cross-attention calls."""

    def __init__(self, store, name):
        self.store = store
        self.name = name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        b, n, _ = hidden_states.shape
        q = attn.to_q(hidden_states)
        ctx = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        k = attn.to_k(ctx)
        v = attn.to_v(ctx)
        q, k, v = (attn.head_to_batch_dim(x) for x in (q, k, v))
        probs = attn.get_attention_scores(q, k, None)
        if encoder_hidden_states is not None:
            self.store.append((self.name, n, probs.view(b, attn.heads, n, -1)))
        out = attn.batch_to_head_dim(torch.bmm(probs, v))
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


def soft_iou(a, b):
    inter = (a * b).sum()
    return ((inter + 1) / (a.sum() + b.sum() - inter + 1)).item()


@torch.no_grad()
def attention_iou(pipe, va, n_scenes, t_value, seed):
    unet, vae, te, tok = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    store = []
    orig = dict(unet.attn_processors)
    procs = {}
    for name in unet.attn_processors:
        procs[name] = CaptureProcessor(store, name) if "attn2" in name else unet.attn_processors[name]
    unet.set_attn_processor(procs)
    ac = alphas_cumprod()
    g = torch.Generator().manual_seed(seed)
    ious, rand_ious, other_ious = [], [], []
    per_class = {}
    x = images_to_tensor(va["images"][:n_scenes])
    z0 = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
    eps = torch.randn(z0.shape, generator=g)
    abar = ac[t_value]
    zt = abar.sqrt() * z0 + (1 - abar).sqrt() * eps
    ids = tokenize(tok, va["captions"][:n_scenes])
    h = te(ids).last_hidden_state.float()
    maps_all = []
    for i in range(0, n_scenes, 32):
        store.clear()
        unet(zt[i:i + 32], torch.full((len(zt[i:i + 32]),), t_value), encoder_hidden_states=h[i:i + 32])
        sel = [p for (_, n, p) in store if n == 256]  # the 16x16 layers
        maps_all.append(torch.stack(sel).mean(dim=(0, 2)))  # mean over layers and heads -> (b, 256, 77)
    layers16 = sorted({nm for (nm, n, _) in store if n == 256})
    maps = torch.cat(maps_all)  # (n, 256, 77)
    vocab = tok.get_vocab()
    records = [json.loads(r) for r in va["records"][:n_scenes]]
    for si, rec in enumerate(records):
        row = ids[si].tolist()
        seen = {}
        for obj in rec["objects"]:
            cls = obj["class"]
            tid = vocab[cls + "</w>"]
            positions = [j for j, v in enumerate(row) if v == tid]
            k = seen.get(cls, 0)
            seen[cls] = k + 1
            if k >= len(positions):
                continue
            m = maps[si, :, positions[k]].view(16, 16)
            m = (m - m.min()) / (m.max() - m.min() + 1e-8)
            mask = torch.from_numpy(va["masks"][si] == obj["mask_index"]).float()
            mask16 = F.avg_pool2d(mask[None, None], 4)[0, 0]
            iou = soft_iou(m, mask16)
            ious.append(iou)
            per_class.setdefault(cls, []).append(iou)
            r = torch.rand(16, 16, generator=g)
            r = (r - r.min()) / (r.max() - r.min() + 1e-8)
            rand_ious.append(soft_iou(r, mask16))
            # the same map against the mask of a different scene's object (position-shuffled baseline)
            sj = (si + 1) % n_scenes
            om = torch.from_numpy(va["masks"][sj] == 1).float()
            other_ious.append(soft_iou(m, F.avg_pool2d(om[None, None], 4)[0, 0]))
    unet.set_attn_processor(orig)
    return dict(t=t_value, n_scenes=n_scenes, n_objects=len(ious), layers=layers16,
                iou=float(np.mean(ious)), random_map_iou=float(np.mean(rand_ious)),
                other_scene_mask_iou=float(np.mean(other_ious)),
                per_class={k: round(float(np.mean(v)), 3) for k, v in sorted(per_class.items())})


def stage_eval(a):
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(a.out, torch_dtype=torch.float32, safety_checker=None)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    t0 = time.time()
    n_per = 3
    sheet = Image.new("RGB", (64 * n_per, 64 * len(EVAL_PROMPTS)))
    for pi, prompt in enumerate(EVAL_PROMPTS):
        g = torch.Generator().manual_seed(42 + pi)
        ims = pipe(prompt, height=64, width=64, num_inference_steps=a.eval_steps, guidance_scale=a.guidance,
                   num_images_per_prompt=n_per, generator=g).images
        for j, im in enumerate(ims):
            sheet.paste(im, (64 * j, 64 * pi))
    sheet = sheet.resize((sheet.width * 2, sheet.height * 2), Image.NEAREST)
    sheet.save(os.path.join(a.work, "contact_sheet.png"))
    log(f"eval: contact sheet ({len(EVAL_PROMPTS)} prompts x {n_per}) in {time.time() - t0:.0f} s -> "
        f"{os.path.join(a.work, 'contact_sheet.png')}")
    va = load_npz(a, "val")
    res = []
    for t in (300, 100, 500):
        r = attention_iou(pipe, va, a.iou_scenes, t, a.seed)
        log(f"eval: attention soft IoU at t={t}: {r['iou']:.3f} (random map {r['random_map_iou']:.3f}, "
            f"same map vs another scene's object {r['other_scene_mask_iou']:.3f}; {r['n_objects']} objects in "
            f"{r['n_scenes']} scenes; layers {r['layers']}); per class {r['per_class']}")
        res.append(r)
    json.dump(res, open(os.path.join(a.work, "attention_iou.json"), "w"), indent=1)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenes", default="/tmp/toyscenes",
                   help="training scene folder(s) of `disendiff toy scenes`, comma-separated")
    p.add_argument("--val-scenes", default="/tmp/toyscenes_val")
    p.add_argument("--work", default="/tmp/toywork")
    p.add_argument("--out", default=os.path.join(REPO, "assets", "toy-model"))
    p.add_argument("--stages", default="data,vae,encode,unet,save,eval")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="1 is much faster than 2 when the 2 cores are shared with other jobs")
    p.add_argument("--vae-steps", type=int, default=2500)
    p.add_argument("--vae-minutes", type=float, default=7.0)
    p.add_argument("--vae-batch", type=int, default=16)
    p.add_argument("--vae-crop", type=int, default=32, help="train on random crops of this size (64: whole scenes)")
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--vae-kl", type=float, default=1e-6)
    p.add_argument("--unet-steps", type=int, default=2500)
    p.add_argument("--unet-minutes", type=float, default=27.0)
    p.add_argument("--unet-batch", type=int, default=32)
    p.add_argument("--unet-lr", type=float, default=5e-4)
    p.add_argument("--resume", action="store_true", help="unet stage: continue from work/unet_ckpt.pt")
    p.add_argument("--init-from", default=None,
                   help="a toy-model folder to continue from: the vae stage fine-tunes its VAE (without that "
                        "stage the VAE is taken as it is), its UNet and text encoder initialise the unet "
                        "stage (copy it away from --out first)")
    p.add_argument("--uncond-prob", type=float, default=0.1)
    p.add_argument("--min-snr", type=float, default=5.0)
    p.add_argument("--ema", type=float, default=0.998)
    p.add_argument("--eval-steps", type=int, default=40)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--iou-scenes", type=int, default=128)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    os.makedirs(a.work, exist_ok=True)
    stages = dict(data=stage_data, vae=stage_vae, encode=stage_encode, unet=stage_unet, save=stage_save,
                  eval=stage_eval)
    for s in a.stages.split(","):
        t0 = time.time()
        log(f"=== stage {s}")
        stages[s](a)
        log(f"=== stage {s} done in {(time.time() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
