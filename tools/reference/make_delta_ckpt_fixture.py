"""Writes tests/fixtures/golden/delta-ckpt/delta.ckpt: the concept file
golden/export-concepts.safetensors as the official DisenDiff / Custom Diffusion code saves it
(`torch.save({"state_dict": {CompVis attn2 to_k/to_v weights}, "embed": [n, dim]})`), with the
diffusers names turned into CompVis names by the pairs diffusers' own single-file converter
produced (golden/single-names.json, sd1), so that the Rust test reads a genuine torch.save file.
Also writes three files that must be refused: an unknown key, a wrong shape, and a pickle that
calls os.system (built by hand, never loaded here).

Run: /work/venv-ref/bin/python tools/reference/make_delta_ckpt_fixture.py
"""
import io
import json
import os
import pickle
import zipfile

import torch
from safetensors.torch import load_file

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures")
OUT = os.path.join(ROOT, "golden", "delta-ckpt")

concept = load_file(os.path.join(ROOT, "golden", "export-concepts.safetensors"))
pairs = json.load(open(os.path.join(ROOT, "golden", "single-names.json")))["sd1"]["pairs"]
to_compvis = {diffusers: compvis for compvis, part, diffusers, _shape in pairs if part == "unet"}

state = {}
for name, w in sorted(concept.items()):
    if name.startswith("<"):
        continue
    state[to_compvis[name]] = w.clone()
embed = concept["<new1>"].reshape(1, -1).clone()

os.makedirs(OUT, exist_ok=True)
# DisenDiff's train script: `embed` next to the state dict.
torch.save({"state_dict": state, "embed": embed}, os.path.join(OUT, "delta.ckpt"))
# Custom Diffusion's older save: `embed` inside the state dict.
torch.save({"state_dict": {**state, "embed": embed}}, os.path.join(OUT, "delta-inner.ckpt"))

first = next(iter(state))
unknown = {first: state[first]}
unknown["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_z.weight"] = next(iter(state.values())).clone()
torch.save({"state_dict": unknown, "embed": embed}, os.path.join(OUT, "unknown-key.ckpt"))

bad = {first: torch.zeros(state[first].shape[0] + 1, state[first].shape[1])}
torch.save({"state_dict": bad, "embed": embed}, os.path.join(OUT, "wrong-shape.ckpt"))


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


buf = io.BytesIO()
with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
    z.writestr("archive/data.pkl", pickle.dumps({"state_dict": Evil()}, protocol=2))
    z.writestr("archive/byteorder", "little")
open(os.path.join(OUT, "os-system.ckpt"), "wb").write(buf.getvalue())

# A check that the files are what the Rust test assumes (torch's own reader).
back = torch.load(os.path.join(OUT, "delta.ckpt"), weights_only=True)
assert set(back) == {"state_dict", "embed"} and len(back["state_dict"]) == len(state) == 22
assert torch.equal(back["embed"], embed)
for f in sorted(os.listdir(OUT)):
    print(f, os.path.getsize(os.path.join(OUT, f)))
