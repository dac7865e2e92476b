#!/usr/bin/env bash
# Builds `disendiff --features cuda` on a machine WITHOUT a GPU, from registry packages only:
# the CUDA 13.0 compiler and libraries come from the PyPI wheels of the cuda-toolkit 13.0.2 set
# (pip install --no-deps --target), and `libcuda.so` (the driver, which only a GPU machine has)
# is replaced at link time by a generated stub with SONAME libcuda.so.1 that exports every
# driver symbol cudarc declares. At run time the real driver's libcuda.so.1 is loaded instead.
#
#   tools/cuda/build.sh [--tests]
#
# Environment (all optional):
#   CUDA_DIR          where the toolkit wheels go (default /work/cuda-toolkit; never inside the repo)
#   CARGO_TARGET_DIR  cargo's target dir (default target-cuda-gpu beside the repo)
#   CUDA_COMPUTE_CAP  GPU architecture (default 90: H100/H200, sm_90)
#   PYTHON            a python with pip (default python3)
# --tests also builds the CUDA golden-test executable (cargo test --no-run --test gpu_parity)
# and writes its path to $CARGO_TARGET_DIR/release/cuda-test-bins.txt (tools/gpu/pack.sh packs it).
#
# Idempotent: the wheels are installed once (a marker file records the set), the stub is
# regenerated only when missing, and cargo rebuilds only what changed.
# Needs at run time: an NVIDIA driver for CUDA >= 13.0 (driver >= 580), and the CUDA 13
# libraries libcudart.so.13, libcublas.so.13, libcublasLt.so.13, libcurand.so.10 and libnvrtc.so.13 on the
# loader path (PyTorch cu130 wheels ship them; tools/gpu/check.sh finds them there).
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
cuda_dir=${CUDA_DIR:-/work/cuda-toolkit}
python=${PYTHON:-python3}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$(dirname "$repo")/target-cuda-gpu}
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
case "$cuda_dir" in "$repo"/*) echo "CUDA_DIR must be outside the repo ($cuda_dir)" >&2; exit 2;; esac

# The cuda-toolkit 13.0.2 set (its METADATA pins these versions); 13.0 matches the GPU
# machines' driver 580: PTX from a newer nvcc would not load there.
wheels=(
    nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cublas==13.1.0.3
    nvidia-curand==10.4.0.35 nvidia-cuda-nvrtc==13.0.88
)
root=$cuda_dir/nvidia/cu13
marker=$cuda_dir/.installed
if [[ ! -f $marker || "$(cat "$marker")" != "${wheels[*]}" ]]; then
    echo "== installing CUDA 13.0 wheels into $cuda_dir"
    rm -rf "$cuda_dir/nvidia"
    mkdir -p "$cuda_dir"
    nice "$python" -m pip install --quiet --no-deps --no-compile --target "$cuda_dir" --upgrade "${wheels[@]}"
    echo "${wheels[*]}" > "$marker"
fi
[[ -x $root/bin/nvcc ]] || { echo "no nvcc at $root/bin/nvcc" >&2; exit 1; }

# The wheels ship only versioned sonames; the linker looks for the plain names.
for lib in "$root"/lib/lib*.so.*; do
    base=${lib##*/}; plain=${base%%.so.*}.so
    [[ -e $root/lib/$plain ]] || ln -s "$base" "$root/lib/$plain"
done
# nvcc looks for its include/lib next to bin under the toolkit root; some wheel sets put
# libdevice under nvvm/. Check the pieces candle-kernels' nvcc calls need.
[[ -f $root/include/cuda_runtime.h ]] || { echo "missing cuda_runtime.h under $root/include" >&2; exit 1; }

# Stub libcuda.so: one function per driver entry point in cudarc's bindings, each returning
# CUDA_ERROR_STUB_LIBRARY (34), so nothing can silently succeed if the stub were ever loaded.
stub_dir=$cuda_dir/stub
if [[ ! -f $stub_dir/libcuda.so ]]; then
    echo "== generating the libcuda stub"
    (cd "$repo" && nice cargo fetch --quiet)
    cudarc_src=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.* | sort -V | tail -1)
    mkdir -p "$stub_dir"
    grep -oE 'pub unsafe fn cu[A-Za-z0-9_]+\(' "$cudarc_src/src/driver/sys/mod.rs" \
        | sed -E 's/pub unsafe fn (cu[A-Za-z0-9_]+)\(/\1/' | sort -u \
        | awk '{ printf "int %s(void) { return 34; }\n", $1 }' > "$stub_dir/libcuda_stub.c"
    [[ -s $stub_dir/libcuda_stub.c ]] || { echo "no driver symbols found in $cudarc_src" >&2; exit 1; }
    cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stub_dir/libcuda.so" "$stub_dir/libcuda_stub.c"
fi

export PATH=$root/bin:$PATH
export CUDA_ROOT=$root CUDA_PATH=$root CUDA_HOME=$root
export RUSTFLAGS="${RUSTFLAGS:-} -L $stub_dir -L $root/lib"
nvcc --version | tail -2
cd "$repo"
start=$(date +%s)
nice cargo build --release --features cuda
echo "== cargo build --release --features cuda: $(( $(date +%s) - start )) s"
ls -l "$CARGO_TARGET_DIR/release/disendiff"
if [[ ${1:-} == --tests ]]; then
    start=$(date +%s)
    nice cargo test --release --features cuda --no-run --test gpu_parity --message-format=json 2>"$CARGO_TARGET_DIR/cuda-tests.log" \
        | "$python" -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["target"]["name"], m["executable"])' > "$CARGO_TARGET_DIR/release/cuda-test-bins.txt"
    echo "== cargo test --no-run --features cuda: $(( $(date +%s) - start )) s"
    cat "$CARGO_TARGET_DIR/release/cuda-test-bins.txt"
fi
