"""PyTorch/diffusers twin of `disendiff bench` (same cases, shapes and threads; CPU, float32).

    .venv-ref/bin/python tools/reference/bench_torch.py [--case NAME ...] [--runs 5] [--warmup 1] [--threads 2]

(tools/bench/compare.sh runs it next to `disendiff bench` and prints the BENCHMARKS.md table.)

Prints one JSON object per line: {"name", "median_s", "peak_rss_mb"}; each case runs in its own
process so its peak resident memory is its own. Threads: torch.set_num_threads(2) (this
machine's cores) unless --threads is given.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CASES = ["unet-fwd", "unet-train-kv", "train-step-toy", "sample-toy"]
TOY = ROOT / "assets" / "toy-model"


def peak_rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def gaussian(maps):
    import torch
    import torch.nn.functional as F

    k1 = torch.tensor([0.21194156, 0.57611688, 0.21194156])
    k = (k1[:, None] * k1[None, :])[None, None]
    return F.conv2d(F.pad(maps[:, None], (1, 1, 1, 1), mode="reflect"), k)[:, 0]


def iou(a, b):
    inter = (a * b).sum()
    return (inter + 1) / (a.sum() + b.sum() - inter + 1)


def calibration_losses(maps, concepts):
    """maps: [B, 77, s, s] averaged probabilities; concepts: [(modifier, class), ...]."""
    import torch

    total = 0.0
    for b in range(maps.shape[0]):
        ms, cs = [], []
        for m, c in concepts:
            pair = maps[b, [m, c]]
            flat = pair.flatten(1)
            mn, mx = flat.min(1, keepdim=True)[0], flat.max(1, keepdim=True)[0]
            pair = ((flat - mn) / (mx - mn + 1e-8)).view_as(pair)
            g = gaussian(pair)
            ms.append(g[0])
            cs.append(g[1] ** 2)
        bind = sum(1 - iou(c.detach(), m) for m, c in zip(ms, cs))
        ss = iou(cs[0], cs[1])
        total = total + bind + ss
    return total / maps.shape[0]


class Recorder:
    """Classic attention processor that detaches start-token K/V and keeps 16x16 probabilities."""

    def __init__(self, store):
        self.store = store

    @staticmethod
    def projections(attn, hidden_states, encoder_hidden_states):
        """(q, k, v), the start token's K/V detached on cross-attention."""
        import torch

        cross = encoder_hidden_states is not None
        q = attn.to_q(hidden_states)
        ctx = encoder_hidden_states if cross else hidden_states
        k, v = attn.to_k(ctx), attn.to_v(ctx)
        if cross:
            s = torch.ones_like(k)
            s[:, :1] = 0
            k = s * k + (1 - s) * k.detach()
            v = s * v + (1 - s) * v.detach()
        return q, k, v

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        import torch

        cross, b = encoder_hidden_states is not None, hidden_states.shape[0]
        q, k, v = self.projections(attn, hidden_states, encoder_hidden_states)
        q, k, v = attn.head_to_batch_dim(q), attn.head_to_batch_dim(k), attn.head_to_batch_dim(v)
        probs = attn.get_attention_scores(q, k, None)
        if cross and q.shape[1] == 256:
            self.store.append(probs.view(b, attn.heads, 256, -1))
        out = attn.batch_to_head_dim(torch.bmm(probs, v))
        return attn.to_out[1](attn.to_out[0](out))


def prepare(name):
    import torch
    from diffusers import UNet2DConditionModel, DDPMScheduler

    torch.manual_seed(0)
    if name in ("unet-fwd", "unet-train-kv"):
        unet = UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(64, 128), layers_per_block=1, cross_attention_dim=128, attention_head_dim=8,
        )
        x = torch.randn(32, 4, 16, 16)
        noise = torch.randn(32, 4, 16, 16)
        ctx = torch.randn(32, 77, 128)
        t = torch.tensor([(i * 31) % 1000 for i in range(32)])
        if name == "unet-fwd":
            unet.eval()

            def run():
                with torch.no_grad():
                    unet(x, t, encoder_hidden_states=ctx)
            return run
        unet.train()
        store = []
        unet.set_attn_processor(Recorder(store))
        params = []
        for n, p in unet.named_parameters():
            keep = n.endswith("attn2.to_k.weight") or n.endswith("attn2.to_v.weight")
            p.requires_grad_(keep)
            if keep:
                params.append(p)
        opt = torch.optim.AdamW(params, lr=8e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
        sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)

        def run():
            store.clear()
            noisy = sched.add_noise(x, noise, t)
            out = unet(noisy, t, encoder_hidden_states=ctx).sample
            diffusion = ((out - noise) ** 2).mean()
            maps = torch.stack(store).mean(0).mean(1).transpose(1, 2).reshape(32, 77, 16, 16)
            loss = diffusion + 0.01 * calibration_losses(maps, [(4, 5), (7, 8)])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return run
    if not (TOY / "model_index.json").is_file():
        raise SystemExit(f"the toy model is not at {TOY}")
    from diffusers import StableDiffusionPipeline, DDIMScheduler

    # the toy text encoder is stored in float16; run everything in float32 as the Rust side does
    pipe = StableDiffusionPipeline.from_pretrained(TOY, torch_dtype=torch.float32, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    if name == "sample-toy":
        side = pipe.unet.config.sample_size * pipe.vae_scale_factor

        def run():
            pipe("a red ball and a blue box on a white background", num_inference_steps=50, guidance_scale=7.5,
                 num_images_per_prompt=4, height=side, width=side, output_type="np")
        return run
    # train-step-toy: one DisenDiff micro-batch of 2 (VAE encode, text encoder, UNet), AdamW.
    tok, te, unet, vae = pipe.tokenizer, pipe.text_encoder, pipe.unet, pipe.vae
    tok.add_tokens(["<new1>", "<new2>"])
    te.resize_token_embeddings(len(tok))
    emb = te.get_input_embeddings().weight
    with torch.no_grad():
        emb[-2] = emb[47629]
        emb[-1] = emb[42170]
    store = []
    unet.set_attn_processor(Recorder(store))
    for m in (te, unet, vae):
        for p in m.parameters():
            p.requires_grad_(False)
    params = [p for n, p in unet.named_parameters() if n.endswith("attn2.to_k.weight") or n.endswith("attn2.to_v.weight")]
    for p in params:
        p.requires_grad_(True)
    emb.requires_grad_(True)
    opt = torch.optim.AdamW(params + [emb], lr=8e-5, weight_decay=0.01)
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    side = unet.config.sample_size * pipe.vae_scale_factor
    prompt = "photo of a <new1> ball and <new2> box"
    ids = tok([prompt, prompt], padding="max_length", max_length=77, return_tensors="pt").input_ids
    new_ids = torch.tensor(tok.convert_tokens_to_ids(["<new1>", "<new2>"]))
    pos = [(4, 5), (7, 8)]
    pixels = torch.randn(2, 3, side, side) * 0.5

    def run():
        store.clear()
        x0 = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(x0)
        t = torch.tensor([500, 100])
        ctx = te(ids).last_hidden_state
        out = unet(sched.add_noise(x0, noise, t), t, encoder_hidden_states=ctx).sample
        diffusion = ((out - noise) ** 2).sum([1, 2, 3]).mean() / (x0.shape[2] * x0.shape[3])
        s = x0.shape[2]
        maps = torch.stack(store).mean(0).mean(1).transpose(1, 2).reshape(2, 77, s, s)
        loss = diffusion + 0.01 * calibration_losses(maps, pos)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        keep = torch.isin(torch.arange(emb.shape[0]), new_ids)
        emb.grad[~keep] = 0
        opt.step()
    return run


def child(name, runs, warmup, threads):
    import torch

    torch.set_num_threads(threads)
    run = prepare(name)
    for _ in range(warmup):
        run()
    times = []
    for _ in range(max(runs, 1)):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    times.sort()
    print(json.dumps({"name": name, "median_s": times[len(times) // 2], "peak_rss_mb": peak_rss_mb()}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", action="append", default=[])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", action="store_true")
    a = ap.parse_args()
    if a.child:
        child(a.case[0], a.runs, a.warmup, a.threads)
        return
    for name in a.case or CASES:
        r = subprocess.run([sys.executable, __file__, "--child", "--case", name, "--runs", str(a.runs),
                            "--warmup", str(a.warmup), "--threads", str(a.threads)], capture_output=True, text=True)
        if r.returncode != 0:
            print(f"case {name} failed: {r.stderr.strip()[-500:]}", file=sys.stderr)
            continue
        print(r.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
