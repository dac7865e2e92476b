"""Golden values of one DisenDiff training step (contract: TRAIN_FIXTURES.md, same folder).

Loads the committed tiny diffusers folder (tests/fixtures/sd1-tiny) with diffusers / transformers on
the CPU in float32 and records one training step of shared/spec/method.md sections 2, 3 and 5:
masked diffusion loss + attention loss (L_bind, L_ss) on the 16x16 cross-attention maps, the
gradients of every attn2 to_k / to_v weight and of the two new token rows, and one AdamW step.

    python tools/reference/make_train_fixtures.py [--model tests/fixtures/sd1-tiny] \
        [--out tests/fixtures/golden]

Everything is seeded: a rerun with the same library versions writes the same files.
"""
import common  # first: pins threads and determinism before torch is imported

import time
from pathlib import Path

import torch
import torch.nn.functional as F

from diffusers import DDPMScheduler, UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from transformers import CLIPTextModel, CLIPTokenizer
from transformers.masking_utils import create_causal_mask
from common import model_out_args, save_tensors_checked, versions, write_json

ROOT = Path(__file__).resolve().parents[2]
SEED = 4242
NEW_TOKENS = ["<new1>", "<new2>"]
INIT_IDS = [47629, 42170]  # `pll`, `ktn` (official DisenDiff initialisers)
CAPTIONS = [
    "photo of a <new1> cat and <new2> dog",
    "a far away photo of a <new1> cat and <new2> dog",
    "a cat and a dog on a sofa",
]
TARGET = [0, 1]  # samples whose caption holds the modifier tokens
TIMESTEPS = [999, 500, 37]
BOX = dict(sample=1, rows=(3, 12), cols=(2, 10))  # inclusive ranges
ATTN_Q = 256  # query grid 16x16
ATTN_WEIGHT = 0.01
ADAMW = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
G1 = [0.21194156, 0.57611688, 0.21194156]
GEN = "tools/reference/make_train_fixtures.py"


# ----------------------------------------------------------------------------------------------
# models, inputs, text path and AdamW check (make_dreambooth_fixtures.py uses them too)


def load_models(folder):
    """The tokenizer of `folder` with NEW_TOKENS added, their ids, and the text encoder, UNet (float32,
    eval mode) and DDPM scheduler."""
    tok = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    assert len(tok) == 49408 and tok.pad_token_id == 49407
    tok.add_tokens(NEW_TOKENS)
    new_ids = tok.convert_tokens_to_ids(NEW_TOKENS)
    assert new_ids == [49408, 49409], new_ids
    assert tok.convert_ids_to_tokens(INIT_IDS) == ["pll", "ktn"], tok.convert_ids_to_tokens(INIT_IDS)
    te = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", dtype=torch.float32).eval()
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").float().eval()
    sched = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    return tok, new_ids, te, unet, sched


def batch_inputs(tok):
    """The batch of CAPTIONS: token ids [3, 77] (int64), the seeded x0 and noise [3, 4, 16, 16] and
    the TIMESTEPS."""
    ids = tok(CAPTIONS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    ids = ids.to(torch.int64)
    g = torch.Generator().manual_seed(SEED)
    x0 = torch.randn([3, 4, 16, 16], generator=g)
    noise = torch.randn([3, 4, 16, 16], generator=g)
    return ids, x0, noise, torch.tensor(TIMESTEPS, dtype=torch.int64)


def encode_with_table(te, input_ids, table, grad_mask=False):
    """The text encoder's last layer-normed hidden states of `input_ids` looked up in `table` (the
    extended token table); with `grad_mask` gradients reach the embeddings only at new-token ids."""
    emb = F.embedding(input_ids, table) + te.embeddings.position_embedding(te.embeddings.position_ids[:, :77])
    if grad_mask:
        m = (input_ids >= 49408).to(emb.dtype)[..., None]
        emb = emb * m + emb.detach() * (1 - m)
    causal = create_causal_mask(config=te.config, inputs_embeds=emb, attention_mask=None,
                                past_key_values=None)
    h = te.encoder(inputs_embeds=emb, attention_mask=causal, is_causal=True).last_hidden_state
    return te.final_layer_norm(h)


def first_adamw_step(w, gr, adamw):
    """The weight after AdamW's first step (m_hat = g, sqrt(v_hat) = |g|) from `w` with gradient `gr`."""
    lr, eps, wd = adamw["lr"], adamw["eps"], adamw["weight_decay"]
    return w * (1 - lr * wd) - lr * gr / (gr.abs() + eps)


# ----------------------------------------------------------------------------------------------
# cross-attention processor


class TrainAttnProcessor(common.ClassicAttnProcessor):
    """diffusers' classic AttnProcessor (same code, same forward values) that, for cross-attention,
    detaches key and value at token position 0 (`k = s*k + (1-s)*k.detach()`, s = 0 at position 0)
    and keeps the probabilities of layers with a 16x16 query grid in the graph, as [B, heads, Q, 77]."""

    def key_value(self, key, value, is_cross):
        assert is_cross == self.name.endswith("attn2"), self.name
        if is_cross:
            s = torch.ones([1, key.shape[1], 1], dtype=key.dtype)
            s[:, 0] = 0.0
            key = s * key + (1 - s) * key.detach()
            value = s * value + (1 - s) * value.detach()
        return key, value

    def record(self, attn, probs, is_cross, batch_size):
        if is_cross and probs.shape[1] == ATTN_Q:
            # head_to_batch_dim orders the batch as b * heads + h
            self.store[self.name] = probs.reshape(batch_size, attn.heads, ATTN_Q, probs.shape[2])


# ----------------------------------------------------------------------------------------------
# attention loss: main implementation


def gauss_main(x):
    """Reflect pad 1 (built by hand) + 3x3 kernel as a sum of 9 shifted copies. x: [..., H, W]."""
    x = torch.cat([x[..., 1:2, :], x, x[..., -2:-1, :]], dim=-2)
    x = torch.cat([x[..., :, 1:2], x, x[..., :, -2:-1]], dim=-1)
    k1 = torch.tensor(G1, dtype=torch.float32)
    k = torch.outer(k1, k1)
    H, W = x.shape[-2] - 2, x.shape[-1] - 2
    out = torch.zeros(x.shape[:-2] + (H, W), dtype=x.dtype)
    for i in range(3):
        for j in range(3):
            out = out + k[i, j] * x[..., i:i + H, j:j + W]
    return out


def minmax(a):
    return (a - a.min()) / (a.max() - a.min() + 1e-8)


def soft_iou(a, b):
    inter = (a * b).sum()
    return (inter + 1) / (a.sum() + b.sum() - inter + 1)


def attention_loss_main(store, layers, mod_pos):
    """Returns (L_bind, L_ss) averaged over the target samples, and the processed maps per sample."""
    probs = torch.stack([store[n] for n in layers])  # [L, B, heads, 256, 77]
    avg = probs.mean(dim=(0, 2))  # [B, 256, 77]
    bind, ss, maps = [], [], {}
    for b in TARGET:
        a = avg[b].transpose(0, 1).reshape(77, 16, 16)
        M, C = [], []
        for p in mod_pos[b]:
            M.append(gauss_main(minmax(a[p])))
            C.append(gauss_main(minmax(a[p + 1])) ** 2)
        bind.append(sum(1 - soft_iou(c.detach(), m) for m, c in zip(M, C)))
        ss.append(soft_iou(C[0], C[1]))
        maps[b] = torch.stack([M[0], C[0], M[1], C[1]]).detach().clone()
    return torch.stack(bind).mean(), torch.stack(ss).mean(), maps


# ----------------------------------------------------------------------------------------------
# attention loss: independent check (conv2d + F.pad reflect, per-head loops, explicit formulas)


def attention_loss_check(store, layers, mod_pos, n_layers_expected):
    assert len(layers) == n_layers_expected
    k1 = torch.tensor(G1, dtype=torch.float32)
    kernel = (k1[:, None] * k1[None, :]).view(1, 1, 3, 3)
    expect = torch.tensor([[0.04491922, 0.12210311, 0.04491922],
                           [0.12210311, 0.33191066, 0.12210311],
                           [0.04491922, 0.12210311, 0.04491922]])
    assert torch.allclose(kernel[0, 0], expect, atol=1e-8)

    def blur(m):  # m [16, 16]
        return F.conv2d(F.pad(m[None, None], (1, 1, 1, 1), mode="reflect"), kernel)[0, 0]

    def norm(m):
        lo, hi = torch.amin(m), torch.amax(m)
        return (m - lo) / ((hi - lo) + 1e-8)

    def iou(x, y):
        i = torch.einsum("hw,hw->", x, y)
        return (i + 1.0) / (x.sum() + y.sum() - i + 1.0)

    binds, sss = [], []
    for b in TARGET:
        def token_map(tok):
            acc, n = 0.0, 0
            for name in layers:
                p = store[name][b]  # [heads, 256, 77]
                for h in range(p.shape[0]):
                    acc = acc + p[h, :, tok].reshape(16, 16)
                    n += 1
            return acc / n

        p1, p2 = mod_pos[b]
        M1, M2 = blur(norm(token_map(p1))), blur(norm(token_map(p2)))
        C1, C2 = blur(norm(token_map(p1 + 1))).pow(2), blur(norm(token_map(p2 + 1))).pow(2)
        binds.append((1 - iou(C1.detach(), M1)) + (1 - iou(C2.detach(), M2)))
        sss.append(iou(C1, C2))
    return sum(binds) / len(binds), sum(sss) / len(sss)


# ----------------------------------------------------------------------------------------------


def main():
    args = model_out_args(ROOT)
    t0 = time.time()
    folder = args.model

    # ---- models
    tok, new_ids, te, unet, sched = load_models(folder)
    assert te.dtype == torch.float32 and unet.dtype == torch.float32
    te.requires_grad_(False)
    unet.requires_grad_(False)

    # ---- inputs
    ids, x0, noise, timesteps = batch_inputs(tok)
    mod_pos = {}
    for b in TARGET:
        row = ids[b].tolist()
        mod_pos[b] = [row.index(i) for i in new_ids]
        assert all(row.count(i) == 1 for i in new_ids)
        for p, cls in zip(mod_pos[b], ("cat", "dog")):
            assert tok.convert_ids_to_tokens(row[p + 1]) == cls + "</w>", (b, p)
    assert not any(i in ids[2].tolist() for i in new_ids)
    mask = torch.ones([3, 1, 16, 16])
    mask[BOX["sample"]] = 0.0
    r0, r1 = BOX["rows"]
    c0, c1 = BOX["cols"]
    mask[BOX["sample"], :, r0:r1 + 1, c0:c1 + 1] = 1.0
    assert mask[1].sum() == (r1 - r0 + 1) * (c1 - c0 + 1)

    # ---- trainable set
    tok_emb = te.embeddings.token_embedding.weight.detach()
    new_rows = torch.nn.Parameter(tok_emb[INIT_IDS].clone())  # [2, 32]
    kv = {}
    for name, p in unet.named_parameters():
        if ".attn2.to_k.weight" in name or ".attn2.to_v.weight" in name:
            p.requires_grad_(True)
            kv[name] = p
    kv = dict(sorted(kv.items()))
    n_cross = sum(1 for n, m in unet.named_modules() if isinstance(m, Attention) and n.endswith("attn2"))
    assert len(kv) == 2 * n_cross, (len(kv), n_cross)

    # ---- text encoder on the extended table
    def encode(input_ids, grad_mask):
        return encode_with_table(te, input_ids, torch.cat([tok_emb, new_rows]), grad_mask)

    # the path is the model's own: with the new ids replaced by their initialisers (same rows) it
    # reproduces te(ids) exactly
    ids_init = ids.clone()
    for i, j in zip(new_ids, INIT_IDS):
        ids_init[ids_init == i] = j
    with torch.no_grad():
        ref = te(ids_init).last_hidden_state
        mine_init = encode(ids_init, grad_mask=True)
        mine_new = encode(ids, grad_mask=True)
    assert torch.equal(ref, mine_init), (ref - mine_init).abs().max()
    assert torch.equal(ref, mine_new), (ref - mine_new).abs().max()
    print(f"text path: equal to te(ids).last_hidden_state ({te.config._attn_implementation} attention)")

    # ---- forward
    noisy = sched.add_noise(x0, noise, timesteps)
    with torch.no_grad():
        out_default = unet(noisy, timesteps, encoder_hidden_states=ref).sample
    store, _, default_name = TrainAttnProcessor.install(unet)

    context = encode(ids, grad_mask=True)
    context.retain_grad()
    out = unet(noisy, timesteps, encoder_hidden_states=context).sample
    err = (out - out_default).abs().max().item()
    assert torch.allclose(out, out_default, atol=1e-5, rtol=1e-4), err
    print(f"unet: TrainAttnProcessor vs default ({default_name}) max |diff| {err:.2e}")
    layers = sorted(store)
    heads = {n: unet.get_submodule(n).heads for n in layers}
    assert len(layers) == 5, layers
    for n in layers:
        assert store[n].shape == (3, heads[n], ATTN_Q, 77) and store[n].requires_grad, n
        assert torch.allclose(store[n].sum(-1), torch.ones(()), atol=1e-5)

    # ---- losses
    per_sample = ((out - noise) ** 2 * mask).sum(dim=(1, 2, 3)) / mask.sum(dim=(1, 2, 3))
    l_diff = per_sample.mean()
    l_bind, l_ss, maps = attention_loss_main(store, layers, mod_pos)
    total = l_diff + ATTN_WEIGHT * (l_bind + l_ss)

    # independent check of the attention loss: values and gradients w.r.t. the probabilities
    cb, cs = attention_loss_check(store, layers, mod_pos, 5)
    assert torch.allclose(cb, l_bind, rtol=1e-5, atol=1e-6), (cb.item(), l_bind.item())
    assert torch.allclose(cs, l_ss, rtol=1e-5, atol=1e-6), (cs.item(), l_ss.item())
    plist = [store[n] for n in layers]
    g_main = torch.autograd.grad(l_bind + l_ss, plist, retain_graph=True)
    g_chk = torch.autograd.grad(cb + cs, plist, retain_graph=True)
    gerr = max((a - b).abs().max().item() for a, b in zip(g_main, g_chk))
    gscale = max(a.abs().max().item() for a in g_main)
    assert gerr <= 1e-4 * gscale, (gerr, gscale)
    print(f"attention loss check: bind {abs(cb - l_bind).item():.1e}, ss {abs(cs - l_ss).item():.1e}, "
          f"d/dprobs max |diff| {gerr:.1e} (max |grad| {gscale:.1e})")

    # gradient of the attention part alone (0.01 * (L_bind + L_ss)), for diagnosis only (json)
    tparams = list(kv.values()) + [new_rows]
    g_attn = torch.autograd.grad(ATTN_WEIGHT * (l_bind + l_ss), tparams, retain_graph=True, allow_unused=True)
    attn_norms = {n: (0.0 if gr is None else float(gr.norm())) for n, gr in zip(kv, g_attn)}
    g_rows = g_attn[-1] if g_attn[-1] is not None else torch.zeros_like(new_rows)
    attn_norms["embedding.<new1>"], attn_norms["embedding.<new2>"] = float(g_rows[0].norm()), float(g_rows[1].norm())

    # ---- backward
    total.backward()
    frozen_with_grad = []
    for prefix, model in (("unet.", unet), ("text_encoder.", te)):
        for name, p in model.named_parameters():
            if name in kv and prefix == "unet.":
                continue
            if p.requires_grad:
                frozen_with_grad.append(prefix + name + " (requires_grad)")
            if p.grad is not None:
                frozen_with_grad.append(prefix + name + " (grad)")
    assert frozen_with_grad == [], frozen_with_grad
    # the start-token detach: the context enters the UNet only through attn2 to_k / to_v, so its
    # gradient at position 0 must be exactly zero (and nonzero elsewhere)
    assert torch.all(context.grad[:, 0] == 0)
    assert context.grad[:, 1:].abs().sum() > 0
    assert new_rows.grad is not None

    grads = {f"grad.{n}": p.grad.detach().clone() for n, p in kv.items()}
    grads["grad.embedding.<new1>"] = new_rows.grad[0].detach().clone()
    grads["grad.embedding.<new2>"] = new_rows.grad[1].detach().clone()
    zero = [k for k, v in grads.items() if float(v.norm()) == 0.0]
    assert zero == [], zero

    # ---- AdamW
    opt = torch.optim.AdamW(list(kv.values()) + [new_rows], **ADAMW)
    before = {n: p.detach().clone() for n, p in kv.items()}
    rows_before = new_rows.detach().clone()
    opt.step()
    updated = {f"updated.{n}": p.detach().clone() for n, p in kv.items()}
    updated["updated.embedding.<new1>"] = new_rows[0].detach().clone()
    updated["updated.embedding.<new2>"] = new_rows[1].detach().clone()
    # hand-written first AdamW step as a check
    for n in kv:
        exp = first_adamw_step(before[n], grads[f"grad.{n}"], ADAMW)
        assert torch.allclose(updated[f"updated.{n}"], exp, atol=1e-7), n
    for i, key in enumerate(("<new1>", "<new2>")):
        exp = first_adamw_step(rows_before[i], grads[f"grad.embedding.{key}"], ADAMW)
        assert torch.allclose(updated[f"updated.embedding.{key}"], exp, atol=1e-7), key

    # ---- write
    gold = {
        "x0": x0, "noise": noise, "timesteps": timesteps, "mask": mask, "input_ids": ids,
        "loss.diffusion": l_diff.detach().reshape(1), "loss.bind": l_bind.detach().reshape(1),
        "loss.ss": l_ss.detach().reshape(1), "loss.total": total.detach().reshape(1),
    }
    for b in TARGET:
        gold[f"maps.{b}"] = maps[b]
    gold.update(grads)
    gold.update(updated)
    args.out.mkdir(parents=True, exist_ok=True)
    st_path = args.out / "train-step.safetensors"
    save_tensors_checked(st_path, gold, GEN)

    grad_norms = {k[len("grad."):]: float(v.norm()) for k, v in grads.items()}
    settings = {
        "generator": GEN,
        "model": str(folder.relative_to(ROOT)) if folder.is_relative_to(ROOT) else str(folder),
        "captions": CAPTIONS,
        "input_ids": ids.tolist(),
        "new_tokens": dict(zip(NEW_TOKENS, new_ids)),
        "init_ids": dict(zip(NEW_TOKENS, INIT_IDS)),
        "modifier_positions": {str(b): mod_pos[b] for b in TARGET},
        "class_positions": {str(b): [p + 1 for p in mod_pos[b]] for b in TARGET},
        "target_samples": TARGET,
        "timesteps": TIMESTEPS,
        "seed": SEED,
        "mask_box": {"sample": BOX["sample"], "rows_inclusive": list(BOX["rows"]),
                     "cols_inclusive": list(BOX["cols"])},
        "attn_layers": layers,
        "attn_heads": heads,
        "attn_weight": ATTN_WEIGHT,
        "gaussian_1d": G1,
        "minmax_eps": 1e-8,
        "diffusion_loss": "mean_b(sum_chw((out-noise)^2*mask)/sum_hw(mask))",
        "adamw": {"lr": ADAMW["lr"], "betas": list(ADAMW["betas"]), "eps": ADAMW["eps"],
                  "weight_decay": ADAMW["weight_decay"]},
        "scheduler": {"class": "DDPMScheduler", **{k: sched.config[k] for k in
                      ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type")}},
        "trainable": list(kv) + ["embedding.<new1>", "embedding.<new2>"],
        "losses": {"diffusion": l_diff.item(), "bind": l_bind.item(), "ss": l_ss.item(), "total": total.item()},
        "per_sample_diffusion": per_sample.detach().tolist(),
        "grad_norms": grad_norms,
        "grad_norms_attention_part": attn_norms,
        "grad_zero_elements": {k[len("grad."):]: int((v == 0).sum()) for k, v in grads.items()},
        "frozen_with_grad": frozen_with_grad,
        "versions": versions(),
    }
    js_path = args.out / "train-step.json"
    write_json(js_path, settings, indent=2)

    # ---- summary
    print(f"captions / modifier positions: {[(c, mod_pos.get(b)) for b, c in enumerate(CAPTIONS)]}")
    print(f"losses: diffusion {l_diff.item():.6f}  bind {l_bind.item():.6f}  ss {l_ss.item():.6f}  "
          f"total {total.item():.6f}")
    print(f"per-sample diffusion: {[round(v, 6) for v in per_sample.tolist()]}")
    print("gradient norms:")
    for k, v in grad_norms.items():
        print(f"  {k:66} {v:.4e}  (attention part {attn_norms[k]:.3e}, zero elements "
              f"{int((grads['grad.' + k] == 0).sum())})")
    upd = max((updated[f"updated.{n}"] - before[n]).abs().max().item() for n in kv)
    print(f"AdamW: max |change| of to_k/to_v {upd:.2e}; frozen_with_grad: {frozen_with_grad}")
    for p in (st_path, js_path):
        print(f"  {p.relative_to(ROOT) if p.is_relative_to(ROOT) else p}  {p.stat().st_size:,} bytes")
    print(f"{len(gold)} tensors; {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
