"""What the golden-fixture scripts of tools/reference/ share (contract: FIXTURES.md, TRAIN_FIXTURES.md).

Import it first, before torch (`import common` at the top of a script run as
`python tools/reference/make_*.py`, whose folder Python puts on the path): at import it pins what
makes a rerun write the same bytes (2 CPU threads, deterministic algorithms, no tokenizers thread
pool) and silences diffusers' / transformers' logging and progress bars. It also holds the helpers
several scripts use alike: the seeded weight perturbation of the tiny random models, diffusers'
classic attention processor with hooks to record or change what it sees, the pinned noise and VAE
posterior mean of the img2img / inpainting goldens, a float32 pipeline loader, the library
versions and the safetensors / JSON writers.
"""
import os

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("MKL_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import contextlib
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

import diffusers
import transformers
from diffusers import StableDiffusionPipeline
from diffusers.models.attention_processor import Attention, AttnProcessor

torch.set_num_threads(2)
torch.use_deterministic_algorithms(True)
diffusers.utils.logging.set_verbosity_error()
transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
diffusers.utils.logging.disable_progress_bar()


def versions(*modules):
    """{name: version} of the given modules, in that order (default: torch, diffusers, transformers)."""
    return {m.__name__: m.__version__ for m in (modules or (torch, diffusers, transformers))}


def save_tensors(path, tensors, generator=None):
    """A safetensors file of contiguous copies of `tensors`, with `generator` (the script) as metadata."""
    save_file({k: t.contiguous() for k, t in tensors.items()}, str(path),
              metadata=None if generator is None else {"generator": generator})


def save_tensors_checked(path, tensors, generator):
    """`save_tensors`, then the file read back: every tensor must be bit for bit the one given."""
    save_tensors(path, tensors, generator)
    reread = load_file(str(path))
    assert all(torch.equal(reread[k], v) for k, v in tensors.items())


def model_out_args(root):
    """The parsed command line of a training-step script: `--model` (the diffusers folder, default
    tests/fixtures/sd1-tiny) and `--out` (default tests/fixtures/golden), both below `root`."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=root / "tests/fixtures/sd1-tiny")
    ap.add_argument("--out", type=Path, default=root / "tests/fixtures/golden")
    return ap.parse_args()


def write_json(path, value, **dumps):
    """`value` as JSON (json.dumps options in `dumps`) plus a final newline."""
    path.write_text(json.dumps(value, **dumps) + "\n")


def perturb(model, seed):
    """Move every parameter off its default init so that a skipped weight/norm is caught."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            n = torch.randn(p.shape, generator=g)
            if p.ndim == 1 and name.endswith("weight"):  # GroupNorm / LayerNorm scales
                p.copy_(1.0 + 0.1 * n)
            elif name.endswith("bias"):
                p.add_(0.1 * n)
            elif p.ndim == 0:
                continue  # a scalar (CLIP's logit_scale): unused by the metrics
            else:
                s = p.std().item() if p.numel() > 1 else 0.0
                p.add_((0.1 * s if s > 0 else 0.02) * n)
            assert not torch.all(p == 0) and not torch.all(p == 1), name


def submodule(root, path):
    """The module at a dotted diffusers path (`down_blocks.0.attentions.0...`) below `root`."""
    m = root
    for part in path.split("."):
        m = m[int(part)] if part.isdigit() else getattr(m, part)
    return m


def load_pipeline(folder):
    """A diffusers folder as a float32 StableDiffusionPipeline without safety checker or progress bar."""
    pipe = StableDiffusionPipeline.from_pretrained(folder, dtype=torch.float32, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def mean_abs_diff(images_a, images_b):
    """Mean |a - b| (of 255) over two equally long lists of PIL images."""
    a = np.stack([np.asarray(x, dtype=np.float64) for x in images_a])
    b = np.stack([np.asarray(x, dtype=np.float64) for x in images_b])
    return float(np.abs(a - b).mean())


def fixtures_main(build_all, holds):
    """The command line of a script whose `build_all(fixtures)` writes into a fixtures folder:
    `--out FOLDER` (the folder that holds `holds`)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True, type=Path, help=f"the fixtures folder (holds {holds})")
    build_all(ap.parse_args().out)


@contextlib.contextmanager
def pinned_latents(module, noise):
    """Within the block, the diffusers pipeline module `module` (img2img, inpaint) draws no noise and
    samples no posterior: its `randn_tensor` returns a copy of `noise` (the shape asked is checked),
    its `retrieve_latents` reads the VAE posterior at its mean (`sample_mode="argmax"`)."""

    def fixed_noise(shape, generator=None, device=None, dtype=None, layout=None):
        assert tuple(shape) == tuple(noise.shape), (shape, noise.shape)
        return noise.clone()

    retrieve, randn = module.retrieve_latents, module.randn_tensor
    module.randn_tensor = fixed_noise
    module.retrieve_latents = lambda out, generator=None, sample_mode="sample": retrieve(out, generator, "argmax")
    try:
        yield
    finally:
        module.randn_tensor = randn
        module.retrieve_latents = retrieve


class ClassicAttnProcessor(AttnProcessor):
    """diffusers' classic AttnProcessor (same code, same forward values) with two hooks for a
    subclass: `key_value` may change the key and value projections (before the heads are split), and
    `record` sees the attention probabilities, [batch * heads, queries, keys] (b * heads + h order)."""

    def __init__(self, name, store):
        super().__init__()
        self.name, self.store = name, store

    @classmethod
    def install(cls, unet):
        """Gives every attention layer of `unet` this processor (named by its module path); returns
        the store the processors write to, the processors `unet` had (for `set_attn_processor`) and
        the class name of its default one."""
        default = dict(unet.attn_processors)
        store = {}
        for name, m in unet.named_modules():
            if isinstance(m, Attention):
                m.set_processor(cls(name, store))
        return store, default, type(next(iter(default.values()))).__name__

    def key_value(self, key, value, is_cross):
        return key, value

    def record(self, attn, probs, is_cross, batch_size):
        pass

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        is_cross = encoder_hidden_states is not None
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key, value = self.key_value(attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states), is_cross)
        query = attn.head_to_batch_dim(query)
        key = attn.head_to_batch_dim(key)
        value = attn.head_to_batch_dim(value)
        attention_probs = attn.get_attention_scores(query, key, attention_mask)
        self.record(attn, attention_probs, is_cross, batch_size)
        hidden_states = torch.bmm(attention_probs, value)
        hidden_states = attn.batch_to_head_dim(hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        hidden_states = hidden_states / attn.rescale_output_factor
        return hidden_states
