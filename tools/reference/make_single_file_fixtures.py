"""Single-file (CompVis / A1111 layout) fixtures for disendiff's `--model FILE` (contract: FIXTURES.md).

Writes the committed tiny diffusers pipelines (sd1-tiny, sd2-tiny) as CompVis single files, the way
the original LDM / Stability code saved them, and checks every file with diffusers' own loader:

- `golden/single-names.json`: for sd1-tiny (UNet, VAE float32, CLIP text encoder float16 as in the
  folder) and unet-inpaint-tiny's 9-channel UNet (float16), every folder tensor's CompVis name, folder
  key and CompVis shape; tests/single_file.rs writes the single files from it at run time (plus the
  int64 `position_ids` buffer real SD1 files carry). Checked here on a file written the same way:
  diffusers' converters give back every folder tensor, `StableDiffusionPipeline.from_single_file(...,
  config=sd1-tiny, local_files_only=True)` gives the folder's golden latents (golden/sd1.safetensors
  `pipe.out_latents`), and the file with the inpainting UNet is detected as "inpainting".
- `golden/single-sd2-ema.ckpt`: sd2-tiny as a `torch.save` zip (float16 throughout), OpenCLIP text
  encoder with the fused `in_proj_weight`, `text_projection`, and EMA weights: `model_ema.*` holds
  the folder's UNet, `model.diffusion_model.*` another weight set, so reading the wrong set shows: both
  are views of one storage (the UNet's tensors flat), the plain ones one element further on, so the
  UNet is stored once (and the pickle reader's storage offsets are exercised).
  No `global_step` (SD2 without it is v-prediction, as the folder's scheduler). Goldens in
  `golden/single-sd2.safetensors`: `ema.out_latents` (diffusers' converter with extract_ema=True,
  i.e. the folder UNet in float16) and `plain.out_latents` (diffusers' from_single_file, the
  non-EMA weights), from the sd2 golden start latents; PNGs `single-sd2-{ema,plain}-0000K.png`.
- `golden/single-base-configs.json`: the configs diffusers builds for a real-size file of each base kind.
- `golden/single-tokenizer.json`: transformers' CLIPTokenizer ids from the bundled merges.
- `golden/single-real-keys.json`: the CompVis key names and shapes of real SD 1.5 and SD 2.1 files (models
  built on PyTorch's meta device from the real configs, so no weights exist) with the diffusers name and
  shape diffusers' converters give each tensor, for a Rust check of the key maps at real sizes (4 levels,
  2 layers per block, the OpenCLIP text encoder's unused 24th layer).
- `golden/single-evil.ckpt`: a checkpoint whose pickle calls `posix.system` (os.system) to write
  `disendiff_pickle_ran.txt` in the working folder; checked here to really run under Python's
  unpickler (`torch.load(weights_only=False)`), so the Rust test that it is refused can fail.

    python tools/reference/make_single_file_fixtures.py --out tests/fixtures

make_sd_fixtures.py calls it at its end. The CompVis names are written by a map of this script's own
(the reverse of diffusers' `convert_ldm_*_checkpoint`), and diffusers' converters are run on the result
to check it reproduces every diffusers tensor exactly.
"""
import common  # first: pins threads and determinism before torch is imported

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from diffusers import StableDiffusionPipeline
from diffusers.loaders import single_file_utils as sfu
from common import save_tensors, write_json

from make_clip_vocab import bpe_vocab, write_bpe  # a sibling script (standard library only)

MARKER = "disendiff_pickle_ran.txt"
RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
          "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def block_name(blocks, i, p):
    """CompVis name of a down/up block's resnet or attention tensor (diffusers name split at `.`, p[2]
    `resnets` or `attentions`) in `blocks`.`i` (input_blocks / output_blocks)."""
    if p[2] == "resnets":
        return f"{blocks}.{i}.0.{RESNET[p[4]]}.{p[5]}"
    return f"{blocks}.{i}.1.{'.'.join(p[4:])}"


def unet_to_ldm(sd, config):
    """diffusers UNet2DConditionModel names -> CompVis names (model.diffusion_model.*)."""
    lpb = config.layers_per_block
    attn_down = [t.startswith("CrossAttn") for t in config.down_block_types]
    attn_up = [t.startswith("CrossAttn") for t in config.up_block_types]
    out = {}
    for k, v in sd.items():
        p = k.split(".")
        fixed = {"conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
        if p[0] in fixed:
            n = f"{fixed[p[0]]}.{p[-1]}"
        elif p[0] == "time_embedding":
            n = f"time_embed.{ {'linear_1': 0, 'linear_2': 2}[p[1]]}.{p[2]}"
        elif p[0] == "down_blocks":
            b = int(p[1])
            if p[2] in ("resnets", "attentions"):
                n = block_name("input_blocks", 1 + b * (lpb + 1) + int(p[3]), p)
            else:
                n = f"input_blocks.{(b + 1) * (lpb + 1)}.0.op.{p[-1]}"
        elif p[0] == "mid_block":
            i = {"resnets.0": 0, "attentions.0": 1, "resnets.1": 2}[f"{p[1]}.{p[2]}"]
            rest = f"{RESNET[p[3]]}.{p[4]}" if p[1] == "resnets" else ".".join(p[3:])
            n = f"middle_block.{i}.{rest}"
        elif p[0] == "up_blocks":
            b = int(p[1])
            if p[2] in ("resnets", "attentions"):
                n = block_name("output_blocks", b * (lpb + 1) + int(p[3]), p)
            else:
                n = f"output_blocks.{b * (lpb + 1) + lpb}.{2 if attn_up[b] else 1}.conv.{p[-1]}"
        else:
            raise KeyError(k)
        assert attn_down is not None
        out["model.diffusion_model." + n] = v
    return out


def vae_to_ldm(sd, config):
    """diffusers AutoencoderKL names -> CompVis names (first_stage_model.*); attention as 1x1 convs."""
    nb = len(config.block_out_channels)
    out = {}
    for k, v in sd.items():
        n = k.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        p = n.split(".")
        if p[1] == "down_blocks":
            n = f"{p[0]}.down.{p[2]}." + (f"block.{p[4]}.{'.'.join(p[5:])}" if p[3] == "resnets" else f"downsample.conv.{p[-1]}")
        elif p[1] == "up_blocks":
            n = f"{p[0]}.up.{nb - 1 - int(p[2])}." + (f"block.{p[4]}.{'.'.join(p[5:])}" if p[3] == "resnets" else f"upsample.conv.{p[-1]}")
        elif p[1] == "mid_block" and p[2] == "resnets":
            n = f"{p[0]}.mid.block_{int(p[3]) + 1}.{'.'.join(p[4:])}"
        elif p[1] == "mid_block":
            m = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}[p[4]]
            n = f"{p[0]}.mid.attn_1.{m}.{p[-1]}"
            if m != "norm" and p[-1] == "weight":
                v = v[:, :, None, None]
        out["first_stage_model." + n] = v
    return out


def with_text_model(sd):
    """transformers >= 5.6 saves CLIPTextModel without its `text_model.` level; CompVis files have it."""
    return {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in sd.items()}


def clip_to_ldm(sd):
    sd = with_text_model(sd)
    out = {"cond_stage_model.transformer." + k: v for k, v in sd.items() if not k.endswith("position_ids")}
    out["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77, dtype=torch.int64)[None]
    return out


def open_clip_to_ldm(sd, hidden, seed):
    """CLIPTextModel names -> OpenCLIP names (cond_stage_model.model.*), q/k/v fused into in_proj."""
    sd = with_text_model(sd)
    pre = "cond_stage_model.model."
    out = {}
    fixed = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
             "text_model.embeddings.position_embedding.weight": "positional_embedding",
             "text_model.final_layer_norm.weight": "ln_final.weight", "text_model.final_layer_norm.bias": "ln_final.bias"}
    layer_map = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc",
                 "mlp.fc2": "mlp.c_proj"}
    for k, v in sd.items():
        if k in fixed:
            out[pre + fixed[k]] = v
            continue
        p = k.split(".")
        if k.endswith("position_ids"):
            continue
        assert p[:3] == ["text_model", "encoder", "layers"], k
        i, module, param = p[3], ".".join(p[4:-1]), p[-1]
        if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            if module.endswith("q_proj"):
                parts = [sd[f"text_model.encoder.layers.{i}.self_attn.{x}_proj.{param}"] for x in "qkv"]
                out[f"{pre}transformer.resblocks.{i}.attn.in_proj_{param}"] = torch.cat(parts, 0)
            continue
        out[f"{pre}transformer.resblocks.{i}.{layer_map[module]}.{param}"] = v
    g = torch.Generator().manual_seed(seed)
    out[pre + "text_projection"] = torch.randn(hidden, hidden, generator=g).to(next(iter(sd.values())).dtype)
    return out


def check_same(name, got, want):
    assert set(got) == set(want), (name, sorted(set(got) ^ set(want))[:8])
    for k in want:
        assert got[k].shape == want[k].shape and torch.equal(got[k].float(), want[k].float()), (name, k)
    print(f"  {name}: diffusers' converter gives back all {len(want)} tensors exactly")


def state(pipe, dtype):
    return {c: {k: v.detach().to(dtype).contiguous() for k, v in getattr(pipe, c).state_dict().items()}
            for c in ("unet", "vae", "text_encoder")}


def run(pipe, pipe_args, latents):
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        lat = pipe(**pipe_args, latents=latents.clone(), output_type="latent").images
        pil = pipe(**pipe_args, latents=latents.clone(), output_type="pil").images
    return lat, pil


def pipe_args(fixtures, name):
    p = json.loads((fixtures / "golden" / f"{name}.json").read_text())["pipe"]
    return dict(prompt=p["prompt"], negative_prompt=p["negative_prompt"], num_inference_steps=p["steps"],
                guidance_scale=p["guidance_scale"], eta=p["eta"], height=p["height"], width=p["width"],
                num_images_per_prompt=p["num_images_per_prompt"])


# The folders' weight files whose tensors the sd1 single files are written from (at test time, by
# tests/single_file.rs, from golden/single-names.json).
NAME_SOURCES = {
    "sd1": {"unet": "sd1-tiny/unet/diffusion_pytorch_model.safetensors",
            "vae": "sd1-tiny/vae/diffusion_pytorch_model.safetensors",
            "text_encoder": "sd1-tiny/text_encoder/model.safetensors"},
    "inpaint_unet": {"unet": "unet-inpaint-tiny/diffusion_pytorch_model.fp16.safetensors"},
}
POSITION_IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"


def name_pairs(fixtures, entry, configs):
    """[CompVis name, component, folder key, CompVis shape] for every tensor of the entry's folder files,
    by this script's maps (checked below with diffusers' converters and from_single_file)."""
    pairs = []
    for comp, rel in NAME_SOURCES[entry].items():
        for k, v in load_file(str(fixtures / rel)).items():
            if k.endswith("position_ids"):
                continue
            if comp == "unet":
                out = unet_to_ldm({k: v}, configs[comp])
            elif comp == "vae":
                out = vae_to_ldm({k: v}, configs[comp])
            else:
                out = {n: t for n, t in clip_to_ldm({k: v}).items() if n != POSITION_IDS}
            ((n, t),) = out.items()
            pairs.append([n, comp, k, list(t.shape)])
    return sorted(pairs)


def write_from_pairs(fixtures, entry, pairs):
    """What the Rust test writes: each folder tensor, in its dtype, reshaped to the CompVis shape, under its
    CompVis name; for an SD1 text encoder also the int64 `position_ids` buffer real SD1 files carry."""
    files = {comp: load_file(str(fixtures / rel)) for comp, rel in NAME_SOURCES[entry].items()}
    out = {n: files[comp][k].reshape(shape).contiguous() for n, comp, k, shape in pairs}
    if "text_encoder" in files:
        out[POSITION_IDS] = torch.arange(77, dtype=torch.int64)[None]
    return out


def build_names(fixtures):
    """golden/single-names.json; the sd1 single file written from it must load in diffusers'
    from_single_file as the folder and reproduce the folder's golden latents, and the inpainting file
    (its text encoder and VAE with inpaint_unet's UNet) must be detected and converted back exactly."""
    print("== single-names.json")
    from diffusers import UNet2DConditionModel
    folder = fixtures / "sd1-tiny"
    pipe = StableDiffusionPipeline.from_pretrained(folder, dtype=torch.float32)
    inpaint = UNet2DConditionModel.from_pretrained(fixtures / "unet-inpaint-tiny", variant="fp16")
    configs = {"sd1": {"unet": pipe.unet.config, "vae": pipe.vae.config, "text_encoder": None},
               "inpaint_unet": {"unet": inpaint.config}}
    names = {e: {"files": NAME_SOURCES[e], "pairs": name_pairs(fixtures, e, configs[e])} for e in NAME_SOURCES}
    names["sd1"]["position_ids"] = POSITION_IDS
    write_json(fixtures / "golden" / "single-names.json", names, separators=(",", ":"), sort_keys=True)

    ckpt = write_from_pairs(fixtures, "sd1", names["sd1"]["pairs"])
    s = state(pipe, torch.float32)
    check_same("unet", sfu.convert_ldm_unet_checkpoint(ckpt, pipe.unet.config), s["unet"])
    check_same("vae", sfu.convert_ldm_vae_checkpoint(ckpt, pipe.vae.config), s["vae"])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "single-sd1.safetensors"
        save_file(ckpt, str(path))
        gold = load_file(str(fixtures / "golden" / "sd1.safetensors"))
        single = StableDiffusionPipeline.from_single_file(str(path), config=str(folder), local_files_only=True, torch_dtype=torch.float32)
        te = {k: v for k, v in with_text_model(single.text_encoder.state_dict()).items() if not k.endswith("position_ids")}
        check_same("text encoder", te, {k: v for k, v in with_text_model(s["text_encoder"]).items() if not k.endswith("position_ids")})
        lat, _ = run(single, pipe_args(fixtures, "sd1"), gold["pipe.latents"])
    err = (lat - gold["pipe.out_latents"]).abs().max().item()
    print(f"  sd1 file from the names, diffusers from_single_file vs the folder's golden latents: max |diff| {err:.2e}")
    assert err < 1e-4, err  # SDPA attention here, the plain processor in the golden run

    sd = {k: v.detach().half().contiguous() for k, v in inpaint.state_dict().items()}
    merged = {k: v for k, v in ckpt.items() if not k.startswith("model.diffusion_model.")}
    merged.update(write_from_pairs(fixtures, "inpaint_unet", names["inpaint_unet"]["pairs"]))
    assert sfu.infer_diffusers_model_type(merged) == "inpainting", sfu.infer_diffusers_model_type(merged)
    check_same("unet (9 channels)", sfu.convert_ldm_unet_checkpoint(merged, inpaint.config), sd)


def build_sd2(fixtures):
    print("== single-sd2-ema.ckpt")
    folder = fixtures / "sd2-tiny"
    pipe = StableDiffusionPipeline.from_pretrained(folder, dtype=torch.float32)
    s = state(pipe, torch.float16)
    unet = unet_to_ldm(s["unet"], pipe.unet.config)
    # One float16 storage holds the UNet once (all tensors flat, by name, and one element more):
    # model_ema.* are views of it, model.diffusion_model.* the same views one element further on,
    # a different weight set that costs no space (torch.save writes a shared storage once).
    keys = sorted(unet)
    flat = torch.cat([unet[k].reshape(-1) for k in keys] + [torch.zeros(1, dtype=torch.float16)])
    ema_views, plain, off = {}, {}, 0
    for k in keys:
        n, shape = unet[k].numel(), unet[k].shape
        ema_views[k] = flat[off:off + n].view(shape)
        plain[k] = flat[off + 1:off + 1 + n].view(shape)
        off += n
    ema = {"model_ema." + "".join(k.split(".")[1:]): v for k, v in ema_views.items()}
    ema["model_ema.decay"] = torch.tensor(0.9999)
    ema["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32)
    hidden = pipe.text_encoder.config.hidden_size
    sd = {**plain, **ema, **vae_to_ldm(s["vae"], pipe.vae.config), **open_clip_to_ldm(s["text_encoder"], hidden, 7001)}
    path = fixtures / "golden" / "single-sd2-ema.ckpt"
    torch.save({"state_dict": sd, "epoch": 3}, path)
    loaded = torch.load(path, weights_only=True)["state_dict"]
    check_same("unet (EMA)", sfu.convert_ldm_unet_checkpoint(loaded, pipe.unet.config, extract_ema=True), s["unet"])
    check_same("vae", sfu.convert_ldm_vae_checkpoint(loaded, pipe.vae.config), s["vae"])
    te = sfu.convert_open_clip_checkpoint(pipe.text_encoder, loaded)
    check_same("text encoder", {k: v for k, v in with_text_model(te).items() if k != "text_model.text_projection.weight"},
               {k: v for k, v in with_text_model(s["text_encoder"]).items() if not k.endswith("position_ids")})

    args = pipe_args(fixtures, "sd2")
    start = load_file(str(fixtures / "golden" / "sd2.safetensors"))["pipe.latents"]
    gold = {"latents": start}
    single = StableDiffusionPipeline.from_single_file(str(path), config=str(folder), local_files_only=True, torch_dtype=torch.float32)
    assert single.scheduler.config.prediction_type == "v_prediction"
    lat, pil = run(single, args, start)
    gold["plain.out_latents"] = lat
    for i, im in enumerate(pil):
        im.save(fixtures / "golden" / f"single-sd2-plain-{i:05d}.png")
    # EMA: the folder pipeline with every weight as stored in the file (float16), i.e. what
    # extract_ema=True converts to (checked equal above).
    for c in ("unet", "vae", "text_encoder"):
        getattr(pipe, c).load_state_dict({k: v.float() for k, v in s[c].items()}, strict=False)
    lat_ema, pil = run(pipe, args, start)
    gold["ema.out_latents"] = lat_ema
    for i, im in enumerate(pil):
        im.save(fixtures / "golden" / f"single-sd2-ema-{i:05d}.png")
    diff = (lat_ema - lat).abs().max().item()
    print(f"  EMA vs non-EMA final latents max |diff| {diff:.3f} (must differ)")
    assert diff > 1e-2
    save_tensors(fixtures / "golden" / "single-sd2.safetensors", gold)


REAL = {
    "sd1": dict(unet=dict(cross_attention_dim=768, attention_head_dim=8),
                text=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                          hidden_act="quick_gelu")),
    "sd2": dict(unet=dict(cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True),
                text=dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=23,
                          hidden_act="gelu")),
}


def build_real_keys(fixtures):
    print("== single-real-keys.json")
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    out = {}
    for fam, r in REAL.items():
        with torch.device("meta"):
            unet = UNet2DConditionModel(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, **r["unet"])
            vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
            te = CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **r["text"]))
        us, vs, ts = unet.state_dict(), vae.state_dict(), with_text_model(te.state_dict())
        ldm_u, ldm_v = unet_to_ldm(us, unet.config), vae_to_ldm(vs, vae.config)
        if fam == "sd1":
            ldm_t = clip_to_ldm(ts)
            conv_t = with_text_model(sfu.convert_ldm_clip_checkpoint(ldm_t))
        else:
            ldm_t = open_clip_to_ldm(ts, r["text"]["hidden_size"], 0)
            last = r["text"]["num_hidden_layers"]  # OpenCLIP ViT-H has one layer more, unused by SD2
            for k in [k for k in ldm_t if ".resblocks.0." in k]:
                ldm_t[k.replace(".resblocks.0.", f".resblocks.{last}.")] = ldm_t[k]
            conv_t = {k: v for k, v in with_text_model(sfu.convert_open_clip_checkpoint(te, ldm_t)).items()
                      if k != "text_model.text_projection.weight"}
        conv_u, conv_v = sfu.convert_ldm_unet_checkpoint(ldm_u, unet.config), sfu.convert_ldm_vae_checkpoint(ldm_v, vae.config)
        fam_out = {}
        for comp, ldm, conv, want in (("unet", ldm_u, conv_u, us), ("vae", ldm_v, conv_v, vs), ("text_encoder", ldm_t, conv_t, ts)):
            # the position_ids buffer is not a weight (diffusers' converter passes it through)
            want = {k: v for k, v in want.items() if not k.endswith("position_ids")}
            conv = {k: v for k, v in conv.items() if not k.endswith("position_ids")}
            assert set(conv) == set(want) and all(conv[k].shape == want[k].shape for k in want), (fam, comp)
            fam_out[comp] = {"compvis": {k: list(v.shape) for k, v in ldm.items()},
                             "diffusers": {k: list(v.shape) for k, v in conv.items()}}
        out[fam] = fam_out
        print(f"  {fam}: " + ", ".join(f"{c} {len(v['compvis'])} CompVis -> {len(v['diffusers'])} diffusers tensors" for c, v in fam_out.items()))
    write_json(fixtures / "golden" / "single-real-keys.json", out, separators=(",", ":"), sort_keys=True)


# The original LDM inference configs (CompVis/Stability `configs/stable-diffusion/*.yaml`, the parts
# diffusers' `create_*_diffusers_config_from_ldm` read): v1-inference.yaml, v1-inpainting-inference.yaml,
# v2-inference.yaml (512 base, epsilon), v2-inference-v.yaml (768, v), v2-inpainting-inference.yaml.
def ldm_config(v2, in_channels):
    unet = dict(image_size=32, in_channels=in_channels, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1],
                num_res_blocks=2, channel_mult=[1, 2, 4, 4], use_spatial_transformer=True, transformer_depth=1,
                context_dim=1024 if v2 else 768, legacy=False)
    if v2:
        unet.update(num_head_channels=64, use_linear_in_transformer=True)
    else:
        unet.update(num_heads=8)
    dd = dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128, ch_mult=[1, 2, 4, 4],
              num_res_blocks=2, attn_resolutions=[], dropout=0.0)
    return {"model": {"params": {"linear_start": 0.00085, "linear_end": 0.0120, "timesteps": 1000, "scale_factor": 0.18215,
                                 "unet_config": {"params": unet}, "first_stage_config": {"params": {"ddconfig": dd}}}}}


# kind -> (SD2?, UNet input channels, global_step, image size, upcast_attention, diffusers' model type). The
# image size and upcast_attention are those of the Hub configs diffusers' single-file loader fetches
# (stable-diffusion-v1-5, -inpainting, stabilityai/stable-diffusion-2-1-base, -2-1, -2-inpainting).
BASE_KINDS = {
    "sd1": (False, 4, None, 512, None, "v1"),
    "sd1-inpainting": (False, 9, None, 512, None, "inpainting"),
    "sd2-512": (True, 4, 875000, 512, None, "v2"),
    "sd2-768": (True, 4, 110000, 768, True, "v2"),
    "sd2-inpainting": (True, 9, None, 512, None, "inpainting_v2"),
}
TEXT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "max_position_embeddings", "hidden_act", "layer_norm_eps")


def build_base_configs(fixtures):
    """The configs diffusers builds for a real-size single file of each kind, from fake state dicts (meta
    tensors with the real shapes of the keys detection reads, no weights)."""
    print("== single-base-configs.json")
    from diffusers import DDIMScheduler
    from transformers import CLIPTextConfig
    out = {}
    for kind, (v2, in_ch, step, size, upcast, model_type) in BASE_KINDS.items():
        ctx = 1024 if v2 else 768
        meta = lambda *s: torch.empty(*s, device="meta")
        ckpt = {sfu.CHECKPOINT_KEY_NAMES["inpainting"]: meta(320, in_ch, 3, 3),
                sfu.CHECKPOINT_KEY_NAMES["v2"]: meta(320, ctx),
                sfu.CHECKPOINT_KEY_NAMES["v1"]: meta(320, 640, 1, 1)}
        if v2:
            ckpt[sfu.CHECKPOINT_KEY_NAMES["open_clip"]] = meta(49408, 1024)
        else:
            ckpt[sfu.CHECKPOINT_KEY_NAMES["clip"]] = meta(77, 768)
        if step is not None:
            ckpt["global_step"] = step
        assert sfu.infer_diffusers_model_type(ckpt) == model_type, (kind, sfu.infer_diffusers_model_type(ckpt))
        orig = ldm_config(v2, in_ch)
        unet = sfu.create_unet_diffusers_config_from_ldm(orig, ckpt, image_size=size, upcast_attention=upcast)
        vae = sfu.create_vae_diffusers_config_from_ldm(orig, ckpt, image_size=size)
        sched = dict(sfu._legacy_load_scheduler(DDIMScheduler, ckpt, "scheduler", original_config=orig).config)
        sched = {k: v for k, v in sched.items() if not k.startswith("_")}
        # The text encoders' configs (openai/clip-vit-large-patch14's text part; OpenCLIP ViT-H as the
        # SD2 repos' text_encoder/config.json); their shapes are checked against diffusers' converters in
        # single-real-keys.json (REAL).
        text = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **REAL["sd2" if v2 else "sd1"]["text"]).to_dict()
        out[kind] = {"unet": unet, "vae": vae, "scheduler": sched, "text_encoder": {k: text[k] for k in TEXT_FIELDS},
                     "model_type": model_type}
        print(f"  {kind}: {model_type}, prediction {sched['prediction_type']}, sample_size {unet['sample_size']}")
    write_json(fixtures / "golden" / "single-base-configs.json", out, indent=1, sort_keys=True)


TOKENIZER_PROMPTS = [
    "a photo of a cat", "A <new1> DOG, on the beach!!", "Ünïcödé café naïve — 東京 🐈 emoji", "3.14159 and 1,000,000 ids 42x",
    "what's   up?  don't\tstop... (really)", "a <new1> cat wearing <new2>-style hat; 100% [sharp] {focus} #art @night",
    "!!! ? !", "", " ".join(f"word{i}" for i in range(90)),
]


def build_tokenizer_ids(fixtures, merges_zlib):
    """transformers' CLIPTokenizer built from the bundled merges (vocab = bytes, bytes + </w>, the merges
    joined, the two specials, as CLIP's own tokenizer builds it), with SD1's and SD2's pad tokens; the ids
    of tricky prompts, and of `<new1>` once added, for the Rust bundled tokenizer to match."""
    print("== single-tokenizer.json")
    import zlib
    from transformers import CLIPTokenizer

    merges = [tuple(l.split(" ")) for l in zlib.decompress(Path(merges_zlib).read_bytes()).decode("utf-8").splitlines()]
    assert len(merges) == 48894
    vocab = bpe_vocab(merges)
    assert len(vocab) == 49408 and len(set(vocab)) == 49408
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        write_bpe(tmp, vocab, merges)
        for fam, pad in (("sd1", "<|endoftext|>"), ("sd2", "!")):
            tok = CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), pad_token=pad)
            enc = lambda p: tok(p, padding="max_length", max_length=77, truncation=True).input_ids
            ids = {p: enc(p) for p in TOKENIZER_PROMPTS}
            tok.add_tokens(["<new1>"])
            added = {"token": "<new1>", "id": tok.convert_tokens_to_ids("<new1>"), "prompt": "a <new1> cat!", "ids": enc("a <new1> cat!")}
            out[fam] = {"pad": pad, "ids": ids, "added": added, "vocab_size": len(vocab)}
            print(f"  {fam}: {type(tok).__name__}, {len(ids)} prompts, <new1> = {added['id']}")
    write_json(fixtures / "golden" / "single-tokenizer.json", out, ensure_ascii=False, separators=(",", ":"))


class Evil:
    def __reduce__(self):
        return (os.system, (f"echo ran > {MARKER}",))


def build_evil(fixtures):
    print("== single-evil.ckpt")
    path = fixtures / "golden" / "single-evil.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1, 4, 1, 1)}, "hook": Evil()}, path)
    with tempfile.TemporaryDirectory() as tmp:
        code = f"import torch; torch.load({str(path.resolve())!r}, weights_only=False)"
        subprocess.run([sys.executable, "-c", code], cwd=tmp, check=True)
        assert (Path(tmp) / MARKER).is_file(), "the pickle did not run its command under Python's unpickler"
    print("  Python's unpickler runs its command (checked); disendiff must refuse it")


def build_all(fixtures):
    fixtures = Path(fixtures)
    build_names(fixtures)
    build_sd2(fixtures)
    build_real_keys(fixtures)
    build_base_configs(fixtures)
    build_tokenizer_ids(fixtures, Path(__file__).resolve().parents[2] / "assets" / "clip-bpe-merges.txt.zlib")
    build_evil(fixtures)


if __name__ == "__main__":
    common.fixtures_main(build_all, "sd1-tiny, sd2-tiny, golden")
