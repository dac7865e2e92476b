"""PyTorch/diffusers twin of `disendiff bench --device cuda` (tools/gpu/check.sh runs both):
the same cases, shapes and losses as tools/reference/bench_torch.py (whose attention recorder
and DisenDiff losses it reuses), on the GPU, plus the full-size case.

    python3 tools/gpu/torch_side.py --case NAME [--dtype f32|bf16] [--runs 5] [--warmup 2] [--device cuda]

- unet-fwd, unet-train-kv: the 3.19 M-parameter benchmark UNet, batch 32, 16x16 latents;
- sd15-train-kv: one DisenDiff micro-batch on the SD1.5 UNet config (random weights), batch 2,
  64x64 latents, the 16x16 probe, diffusion + DisenDiff losses, backward to every attn2 K/V, AdamW.
Attention (`--attention`): `sdpa` (default) is diffusers' default processor
(F.scaled_dot_product_attention, no probabilities kept for the backward) on every layer except
the probed 16x16 cross-attention, whose probabilities the DisenDiff losses read and which keeps
them (bench_torch.py's classic processor), as disendiff's CUDA path does since
src/model/attention_recompute.rs; `classic` keeps every layer's probabilities (bench_torch.py).
--dtype bf16 is diffusers' `--mixed_precision bf16`: frozen weights in bf16, the trained K/V
in f32, the forward under torch.autocast(bfloat16). On the CPU the two attention settings give
the small case's K/V gradients within 3e-6 (relative to the largest).

Prints one JSON object: name, median_s, times_s, setup_s, torch_max_allocated_mb,
torch_max_reserved_mb. Every timed run ends with torch.cuda.synchronize(). `--device cpu` runs the
same code on the CPU (to check the script without a GPU; bf16 autocast then uses the CPU's).
"""
import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reference"))
import bench_torch  # noqa: E402  (the CPU twin: Recorder, calibration_losses)


def gaussian(maps):
    k1 = torch.tensor([0.21194156, 0.57611688, 0.21194156], device=maps.device, dtype=maps.dtype)
    k = (k1[:, None] * k1[None, :])[None, None]
    return F.conv2d(F.pad(maps[:, None], (1, 1, 1, 1), mode="reflect"), k)[:, 0]


bench_torch.gaussian = gaussian  # its kernel lives on the CPU; calibration_losses reads this name


class SdpaRecorder(bench_torch.Recorder):
    """F.scaled_dot_product_attention on every layer but the probed 16x16 cross-attention (the
    classic Recorder there); start-token K/V detached on cross-attention as the Recorder does."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        cross = encoder_hidden_states is not None
        b, n, _ = hidden_states.shape
        if cross and n == 256:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kw)
        q, k, v = self.projections(attn, hidden_states, encoder_hidden_states)
        heads = attn.heads
        split = lambda x: x.view(b, -1, heads, x.shape[-1] // heads).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(split(q), split(k), split(v), scale=attn.scale)
        out = out.transpose(1, 2).reshape(b, n, -1).to(q.dtype)
        return attn.to_out[1](attn.to_out[0](out))

SMALL = dict(sample_size=16, in_channels=4, out_channels=4,
             down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
             block_out_channels=(64, 128), layers_per_block=1, cross_attention_dim=128, attention_head_dim=8)
SD15 = dict(sample_size=64, in_channels=4, out_channels=4,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768, attention_head_dim=8)


def prepare(name, dtype, dev, attention="sdpa", checkpointing=False):
    from diffusers import DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    cfg, batch, side = (SD15, 2, 64) if name == "sd15-train-kv" else (SMALL, 32, 16)
    low = torch.bfloat16 if dtype == "bf16" else torch.float32
    unet = UNet2DConditionModel(**cfg).to(dev, low)
    x = torch.randn(batch, 4, side, side, device=dev)
    noise = torch.randn(batch, 4, side, side, device=dev)
    ctx = torch.randn(batch, 77, cfg["cross_attention_dim"], device=dev).to(low)
    t = torch.tensor([(i * 31) % 1000 for i in range(batch)], device=dev)
    autocast = (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if dtype == "bf16" else contextlib.nullcontext
    if name == "unet-fwd":
        unet.eval()

        def run():
            with torch.no_grad(), autocast():
                unet(x.to(low), t, encoder_hidden_states=ctx)
        return run
    unet.train()
    if checkpointing:
        unet.enable_gradient_checkpointing()  # diffusers' --gradient_checkpointing (every block)
    store = []
    unet.set_attn_processor(SdpaRecorder(store) if attention == "sdpa" else bench_torch.Recorder(store))
    params = []
    for n, p in unet.named_parameters():
        keep = n.endswith("attn2.to_k.weight") or n.endswith("attn2.to_v.weight")
        p.requires_grad_(keep)
        if keep:
            p.data = p.data.float()  # trained weights stay f32 under mixed precision
            params.append(p)
    opt = torch.optim.AdamW(params, lr=8e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    s = side // 4 if name == "sd15-train-kv" else side  # the 16x16 level

    def run():
        store.clear()
        noisy = sched.add_noise(x, noise, t)
        with autocast():
            out = unet(noisy.to(low), t, encoder_hidden_states=ctx).sample
        diffusion = ((out.float() - noise) ** 2).mean()
        maps = torch.stack(store).float().mean(0).mean(1).transpose(1, 2).reshape(batch, 77, s, s)
        loss = diffusion + 0.01 * bench_torch.calibration_losses(maps, [(4, 5), (7, 8)])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", required=True, choices=["unet-fwd", "unet-train-kv", "sd15-train-kv"])
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16"])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--attention", default="sdpa", choices=["sdpa", "classic"],
                    help="sdpa: no probabilities kept except the probe's (as disendiff); classic: all kept")
    ap.add_argument("--gradient-checkpointing", action="store_true",
                    help="training cases: diffusers' enable_gradient_checkpointing()")
    a = ap.parse_args()
    dev = torch.device(a.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    torch.backends.cuda.matmul.allow_tf32 = False  # full f32, as candle's cuBLAS calls
    torch.backends.cudnn.allow_tf32 = False
    start = time.perf_counter()
    run = prepare(a.case, a.dtype, dev, a.attention, a.gradient_checkpointing)
    sync()
    setup = time.perf_counter() - start
    for _ in range(a.warmup):
        run()
    sync()
    times = []
    for _ in range(max(a.runs, 1)):
        start = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - start)
    cuda = dev.type == "cuda"
    print(json.dumps({"name": a.case, "dtype": a.dtype, "device": a.device, "attention": a.attention,
                      "gradient_checkpointing": a.gradient_checkpointing, "median_s": sorted(times)[len(times) // 2],
                      "times_s": times, "setup_s": setup,
                      "torch_max_allocated_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
                      "torch_max_reserved_mb": torch.cuda.max_memory_reserved() / 2**20 if cuda else None}))


if __name__ == "__main__":
    main()
