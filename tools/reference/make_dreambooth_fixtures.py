"""Golden values of one DreamBooth training step (contract: TRAIN_FIXTURES.md, "DreamBooth").

The DisenDiff step of make_train_fixtures.py (same tiny pipeline, tokens, initialisers, seed,
captions and timesteps, imported from it) turned into the DreamBooth baseline of
shared/spec/method.md section 8: EVERY UNet parameter trains, the two new token rows train, the
rest of the text encoder and the VAE stay frozen, no gradient mask (no start-token K/V detach,
no modifier-rows-only mask), no attention loss, loss masks all ones (no augmentation), and the
class-image sample of the batch weighted as the instance samples (prior loss weight 1).

The full gradient set of the tiny UNet is 555k floats; to keep the fixture small each tensor is
stored as its sum, its sum of squares and K = 8 projections onto pseudo-random vectors that the
Rust test regenerates bit for bit (`probe_vector`, below: SplitMix64 of the tensor name's FNV-1a
hash and the element index, 24-bit values in [-1, 1), exact in float32). A wrong gradient
(missing, zero, a wrong term) moves the projections by its relative error.

A second case, `dreambooth-te-step.*`, is diffusers' `train_dreambooth.py --train_text_encoder`
with the added tokens: every text encoder parameter trains as well, its token table resized to
[vocab + 2, hidden] as one table (here the frozen-free base table concatenated with the two new
rows, which is the same function and, AdamW being elementwise, the same update), all in one
AdamW group with the UNet at the same lr. Text encoder tensors are stored as summaries under
`grad.text_encoder.<name>` (transformers name without `text_model.`), probed by that full name.

    python tools/reference/make_dreambooth_fixtures.py [--model tests/fixtures/sd1-tiny] \
        [--out tests/fixtures/golden]
"""
import common  # first: pins threads and determinism before torch is imported

import re
import time

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

import make_train_fixtures as base
from common import model_out_args, save_tensors_checked, versions, write_json

GEN = "tools/reference/make_dreambooth_fixtures.py"
K = 8
M64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
# PyTorch's eps 1e-8 makes the first AdamW step g / (|g| + eps) ill-conditioned at elements with
# |g| near 1e-8, which whole-UNet gradients have (layer-norm biases, ~1e-5 relative float noise
# of a tensor's gradient is ~1e-8 absolute there and flips their update). eps 1e-4 keeps the
# update a well-conditioned function of the gradient; eps 1e-8 is checked by train-step.
ADAMW = dict(base.ADAMW, eps=1e-4)
# A text encoder key bias gradient norm (exactly 0, float noise) at most this times the same
# layer's query bias gradient norm (tests/dreambooth_parity.rs: KEY_BIAS_BOUND).
KEY_BIAS_BOUND = 1e-5


def fnv1a64(s: str) -> int:
    h = 0xCBF29CE484222325
    for b in s.encode():
        h = ((h ^ b) * 0x100000001B3) & M64
    return h


def probe_vector(name: str, k: int, n: int) -> np.ndarray:
    """r_k[i] = ((splitmix64(fnv1a64(name) + (k * 2^32 + i) * GOLDEN) >> 40) / 2^23) - 1."""
    with np.errstate(over="ignore"):
        i = np.arange(n, dtype=np.uint64)
        z = np.uint64(fnv1a64(name)) + (np.uint64(k << 32) + i) * np.uint64(GOLDEN)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(40)).astype(np.float64) / float(1 << 23) - 1.0


def summary(name: str, t: torch.Tensor) -> torch.Tensor:
    """[sum, sum of squares, p_1..p_K] in float64, stored as float32."""
    x = t.detach().double().flatten().numpy()
    out = [x.sum(), (x * x).sum()] + [float(x @ probe_vector(name, k, x.size)) for k in range(K)]
    return torch.tensor(out, dtype=torch.float64).float()


def te_name(n: str) -> str:
    """A text encoder parameter's name without transformers' `text_model.` prefix."""
    return n[len("text_model."):] if n.startswith("text_model.") else n


def main():
    args = model_out_args(base.ROOT)

    # self-check of the probe vectors against values written out by hand from the formula
    assert fnv1a64("") == 0xCBF29CE484222325 and fnv1a64("a") == 0xAF63DC4C8601EC8C
    r = probe_vector("conv_in.weight", 3, 5)
    assert np.all(np.abs(r) <= 1.0) and len(set(r.tolist())) == 5
    run_case(args, train_te=False, stem="dreambooth-step")
    run_case(args, train_te=True, stem="dreambooth-te-step")


def run_case(args, train_te: bool, stem: str):
    t0 = time.time()
    folder = args.model

    tok, new_ids, te, unet, sched = base.load_models(folder)
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae").float().eval()
    te.requires_grad_(train_te)
    vae.requires_grad_(False)
    unet.requires_grad_(True)
    params = dict(sorted(unet.named_parameters()))
    n_params = sum(p.numel() for p in params.values())
    te_params = dict(sorted((f"text_encoder.{te_name(n)}", p) for n, p in te.named_parameters())) if train_te else {}

    ids, x0, noise, timesteps = base.batch_inputs(tok)
    mask = torch.ones([3, 1, 16, 16])  # DreamBooth: no augmentation, so no loss mask

    tok_emb = te.embeddings.token_embedding.weight
    if not train_te:
        tok_emb = tok_emb.detach()
    new_rows = torch.nn.Parameter(tok_emb.detach()[base.INIT_IDS].clone())
    context = base.encode_with_table(te, ids, torch.cat([tok_emb, new_rows]))  # no gradient mask
    with torch.no_grad():
        ids_init = ids.clone()
        for i, j in zip(new_ids, base.INIT_IDS):
            ids_init[ids_init == i] = j
        assert torch.equal(te(ids_init).last_hidden_state, context)

    noisy = sched.add_noise(x0, noise, timesteps)
    out = unet(noisy, timesteps, encoder_hidden_states=context).sample  # default processors
    per_sample = ((out - noise) ** 2 * mask).sum(dim=(1, 2, 3)) / mask.sum(dim=(1, 2, 3))
    loss = per_sample.mean()
    # the same loss as diffusers' train_dreambooth.py (instance MSE + 1.0 * prior MSE, each a
    # per-element mean) up to its constant factor: 4 channels, 2 instance samples of 3
    inst = F.mse_loss(out[:2], noise[:2])
    prior = F.mse_loss(out[2:], noise[2:])
    assert torch.allclose(loss, 4 * (2 * inst + prior) / 3, rtol=1e-6), (loss, inst, prior)
    loss.backward()

    frozen_with_grad = [] if train_te else [f"text_encoder.{n}" for n, p in te.named_parameters() if p.grad is not None or p.requires_grad]
    frozen_with_grad += [f"vae.{n}" for n, p in vae.named_parameters() if p.grad is not None or p.requires_grad]
    assert frozen_with_grad == [], frozen_with_grad
    no_grad = [n for n, p in params.items() if p.grad is None or float(p.grad.norm()) == 0.0]
    assert no_grad == [], no_grad
    assert new_rows.grad is not None and float(new_rows.grad.norm()) > 0
    # A key bias's exact gradient is 0 (softmax is invariant to the constant q.b_k it adds to all
    # of a query's logits): it must be float noise, tiny against the same layer's query bias
    # gradient. Every other text encoder tensor must get a gradient.
    key_bias = re.compile(r"text_encoder\.(encoder\.layers\.\d+)\.self_attn\.k_proj\.bias")
    te_no_grad, key_bias_ratios = [], {}
    for n, p in te_params.items():
        m = key_bias.fullmatch(n)
        if m:
            q = te_params[f"text_encoder.{m.group(1)}.self_attn.q_proj.bias"].grad
            assert p.grad is not None and q is not None and float(q.norm()) > 1e-6, n
            key_bias_ratios[n] = float(p.grad.norm()) / float(q.norm())
            assert key_bias_ratios[n] <= KEY_BIAS_BOUND, (n, key_bias_ratios[n])
        elif p.grad is None or float(p.grad.norm()) == 0.0:
            te_no_grad.append(n)
    assert te_no_grad == [], te_no_grad
    assert len(key_bias_ratios) == (te.config.num_hidden_layers if train_te else 0), key_bias_ratios
    params_all = {**params, **te_params}

    gold = {"x0": x0, "noise": noise, "timesteps": timesteps, "mask": mask, "input_ids": ids,
            "loss.total": loss.detach().reshape(1)}
    for n, p in params_all.items():
        gold[f"grad.{n}"] = summary(n, p.grad)
    for i, t in enumerate(base.NEW_TOKENS):
        gold[f"grad.embedding.{t}"] = new_rows.grad[i].detach().clone()

    before = {n: p.detach().clone() for n, p in params_all.items()}
    rows_before = new_rows.detach().clone()
    # one group, one lr for UNet and text encoder (train_dreambooth.py's params_to_optimize)
    opt = torch.optim.AdamW(list(params_all.values()) + [new_rows], **ADAMW)
    opt.step()
    lr, wd = ADAMW["lr"], ADAMW["weight_decay"]
    for n, p in params_all.items():
        exp = base.first_adamw_step(before[n], p.grad, ADAMW)
        assert torch.allclose(p.detach(), exp, atol=1e-7), n
        gold[f"update.{n}"] = summary(n, p.detach() - before[n])
    for i, t in enumerate(base.NEW_TOKENS):
        gold[f"update.embedding.{t}"] = (new_rows[i] - rows_before[i]).detach().clone()

    args.out.mkdir(parents=True, exist_ok=True)
    st_path = args.out / f"{stem}.safetensors"
    save_tensors_checked(st_path, gold, GEN)
    settings = {
        "generator": GEN,
        "captions": base.CAPTIONS,
        "class_samples": [2],
        "timesteps": base.TIMESTEPS,
        "seed": base.SEED,
        "probes": K,
        "summary": "[sum, sum of squares, p_1..p_K], p_k = sum_i x_i r_k[i] (probe_vector)",
        "adamw": {"lr": lr, "betas": list(ADAMW["betas"]), "eps": ADAMW["eps"], "weight_decay": wd},
        "unet_params": list(params),
        "unet_param_count": n_params,
        "train_text_encoder": train_te,
        "text_encoder_params": list(te_params),
        "text_encoder_param_count": sum(p.numel() for p in te_params.values()),
        "loss": loss.item(),
        "diffusers_dreambooth_loss": {"instance": inst.item(), "prior": prior.item()},
        "grad_norms": {n: float(p.grad.norm()) for n, p in params_all.items()},
        "key_bias_grad_norm_over_q_bias": key_bias_ratios,
        "key_bias_bound": KEY_BIAS_BOUND,
        "frozen_with_grad": frozen_with_grad,
        "versions": versions(),
    }
    write_json(args.out / f"{stem}.json", settings, indent=2)
    print(f"{stem}: {len(params)} UNet tensors ({n_params:,} parameters) + {len(te_params)} text encoder tensors + 2 rows; loss {loss.item():.6f}")
    norms = sorted(settings["grad_norms"].values())
    print(f"grad norms: min {norms[0]:.3e}, median {norms[len(norms) // 2]:.3e}, max {norms[-1]:.3e}")
    for p in (st_path, args.out / f"{stem}.json"):
        print(f"  {p.name}  {p.stat().st_size:,} bytes")
    print(f"{time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
