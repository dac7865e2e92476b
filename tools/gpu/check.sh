#!/usr/bin/env bash
# The GPU check, for a lent GPU machine (about 8 minutes on a warm H200), run from the repo root
# with the payload that tools/gpu/pack.sh made on the CPU machine in .gpu/ (carried: the CUDA
# build of `disendiff`, the CUDA golden-test binary, diffusers and importlib_metadata):
#
#   tools/gpu/check.sh golden     # device tool: carry [".gpu/gpu_parity.xz", ".gpu/manifest_dir"]
#   tools/gpu/check.sh bench      # then: carry [".gpu/disendiff.xz", ".gpu/site.tar.xz", ".gpu/manifest_dir"]
#   tools/gpu/check.sh            # both (only where the checkout plus all of .gpu fit in 64 MiB)
#
# Two calls because the device tool carries at most 64 MiB with the checkout (51 MiB tracked)
# and each binary is about 8 MB compressed; run them back to back so the machine stays warm.
#
# 1. the golden tests on CUDA (tests/gpu_parity.rs: UNet, pipeline and training step in f32 within
#    the CPU tests' tolerances; bf16 within the looser ones stated there);
# 2. `disendiff bench --device cuda` against tools/gpu/torch_side.py (the device's own PyTorch,
#    diffusers from the carried wheels) on unet-fwd, unet-train-kv and sd15-train-kv (full-size
#    SD1.5 UNet config, random weights, batch 2, 64x64 latents), f32 and bf16 mixed precision;
#    each side's GPU memory peak read through NVML (tools/gpu/gpumem.py);
# 3. a 250-step DisenDiff run on SD1.5, extrapolated from 20 steps (setup + 250 x median step;
#    f32 from 20 timed steps, bf16 from 10; bf16 again with gradient checkpointing, "bf16-gc");
# and prints a short table last. Results (JSON lines, logs) go to $OUT when set, else .gpu/out.
set -uo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
out=${OUT:-$root/.gpu/out}
mkdir -p "$out"
log=$out/check.log
exec > >(tee "$log") 2>&1
t0=$(date +%s)
say() { echo "== [$(( $(date +%s) - t0 ))s] $*"; }
fail=0

say "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || { echo "no GPU"; exit 1; }
python3 -c 'import torch; print("torch", torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))' || exit 1

# the carried binaries
[[ -d .gpu ]] || { echo "no .gpu/ payload: run tools/gpu/pack.sh on the CPU machine and carry .gpu"; exit 1; }
phase=${1:-all}
bin=/tmp/disendiff-gpu
mkdir -p "$bin"
for f in disendiff gpu_parity; do
    [[ -f .gpu/$f.xz ]] || continue
    xz -dc ".gpu/$f.xz" > "$bin/$f" && chmod +x "$bin/$f" || { echo "cannot unpack .gpu/$f.xz"; exit 1; }
done
# The binaries read fixtures and the toy model through the build's CARGO_MANIFEST_DIR.
manifest=$(cat .gpu/manifest_dir)
if [[ $manifest != "$root" && ! -e $manifest ]]; then
    mkdir -p "$(dirname "$manifest")" && ln -s "$root" "$manifest"
fi
# CUDA 13 libraries (cuBLAS, cuRAND, NVRTC) from the device's PyTorch wheels; the driver's libcuda.
site=$(python3 -c 'import site; print(site.getsitepackages()[0])')
libs=$(find "$site/nvidia" -name 'lib*.so*' -printf '%h\n' 2>/dev/null | sort -u | paste -sd:)
export LD_LIBRARY_PATH=${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
for f in "$bin"/*; do
    if ldd "$f" | grep 'not found'; then echo "missing libraries for $f (above)"; exit 1; fi
done
golden=skipped
if [[ $phase != bench ]]; then
say "1. golden tests on CUDA"
[[ -x $bin/gpu_parity ]] || { echo "no .gpu/gpu_parity.xz carried"; exit 1; }
if timeout 150 "$bin/gpu_parity" --test-threads=1 --nocapture > "$out/golden.txt" 2>&1; then golden=passed; else golden=FAILED; fail=1; fi
grep -E "rel err|^test |test result" "$out/golden.txt" | tail -40
say "golden tests: $golden"
fi
[[ $phase == golden ]] && { say "done in $(( $(date +%s) - t0 )) s"; exit $fail; }

# diffusers (and what it needs that the image lacks), installed from PyPI wheels by pack.sh
[[ -x $bin/disendiff ]] || { echo "no .gpu/disendiff.xz carried"; exit 1; }
mkdir -p /tmp/site && tar -C /tmp/site -xJf .gpu/site.tar.xz || { echo "cannot unpack .gpu/site.tar.xz"; exit 1; }
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
python3 -c 'import diffusers; print("diffusers", diffusers.__version__)' || exit 1

say "2. benchmarks (each case in its own process; GPU peak from NVML)"
rows=()
bench() {  # case dtype runs warmup [gc: both sides with gradient checkpointing]
    local c=$1 d=$2 n=$3 w=$4 tag=$2 flags=()
    if [[ ${5:-} == gc ]]; then tag=$d-gc; flags=(--gradient-checkpointing); fi
    timeout 200 python3 tools/gpu/gpumem.py "$out/rust.$c.$tag.json" -- \
        "$bin/disendiff" bench --child --case "$c" --device cuda --dtype "$d" --runs "$n" --warmup "$w" "${flags[@]}" > /dev/null \
        || { echo "rust $c $tag failed"; fail=1; }
    timeout 200 python3 tools/gpu/gpumem.py "$out/torch.$c.$tag.json" -- \
        python3 tools/gpu/torch_side.py --case "$c" --dtype "$d" --runs "$n" --warmup "$w" "${flags[@]}" > /dev/null \
        || { echo "torch $c $tag failed"; fail=1; }
    rows+=("$c $tag")
    say "$c $tag done"
}
bench unet-fwd f32 10 3
bench unet-train-kv f32 10 3
bench sd15-train-kv f32 20 2
bench sd15-train-kv bf16 10 1
bench sd15-train-kv bf16 10 1 gc
cat "$out"/rust.*.json "$out"/torch.*.json > "$out/bench.jsonl" 2>/dev/null

say "done in $(( $(date +%s) - t0 )) s"
python3 - "$out" "$golden" "${rows[@]}" <<'PY'
import json, os, sys
out, golden, rows = sys.argv[1], sys.argv[2], sys.argv[3:]
def load(side, c, d):
    p = f"{out}/{side}.{c}.{d}.json"
    return json.load(open(p)) if os.path.exists(p) else None
print(f"\ngolden tests on CUDA: {golden} (phase 'golden' runs them)\n")
print("| case | dtype | Rust s | PyTorch s | time ratio | Rust GPU MB | PyTorch GPU MB | memory ratio |")
print("|---|---|---|---|---|---|---|---|")
for row in rows:
    c, d = row.split()
    r, t = load("rust", c, d), load("torch", c, d)
    f = lambda x, k, fmt: format(x[k], fmt) if x else "-"
    ratio = lambda k: f"{r[k] / t[k]:.2f}" if r and t else "-"
    print(f"| {c} | {d} | {f(r, 'median_s', '.4f')} | {f(t, 'median_s', '.4f')} | {ratio('median_s')} "
          f"| {f(r, 'gpu_peak_mb', '.0f')} | {f(t, 'gpu_peak_mb', '.0f')} | {ratio('gpu_peak_mb')} |")
print("\n250-step DisenDiff run on SD1.5 (2 images at 512 px a step): setup + 250 x median step (f32: of 20 steps, bf16: of 10)")
for d in ("f32", "bf16", "bf16-gc"):
    for side in ("rust", "torch"):
        x = load(side, "sd15-train-kv", d)
        if x:
            print(f"  {side:5} {d}: setup {x['setup_s']:.1f} s + 250 x {x['median_s']:.3f} s = {x['setup_s'] + 250 * x['median_s']:.0f} s")
t = load("torch", "sd15-train-kv", "f32")
if t:
    print(f"  PyTorch allocator (sd15 f32): max allocated {t['torch_max_allocated_mb']:.0f} MB, reserved {t['torch_max_reserved_mb']:.0f} MB")
PY
exit $fail
