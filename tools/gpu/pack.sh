#!/usr/bin/env bash
# Makes the payload tools/gpu/check.sh runs on a lent GPU machine, in .gpu/ (ignored through
# .git/info/exclude, never committed): the CUDA build of `disendiff` and of the golden-test
# binary tests/gpu_parity.rs (tools/cuda/build.sh --tests), stripped and xz-compressed, the
# Python packages the device image lacks (diffusers, importlib_metadata: installed here from
# their PyPI wheels, then one site.tar.xz, 1.9 MB against the wheel's 6.4), and the path the binaries were built under (their
# CARGO_MANIFEST_DIR, where they look for fixtures). Checks that the tree that travels stays
# under the device tool's 64 MiB.
#
#   tools/gpu/pack.sh        # then check.sh golden / check.sh bench (see there for the carry lists)
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
cd "$repo"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$(dirname "$repo")/target-cuda-gpu}
tools/cuda/build.sh --tests
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> "$(git rev-parse --git-path info/exclude)"
rm -rf .gpu && mkdir -p .gpu
test_bin=$(awk '$1 == "gpu_parity" { print $2 }' "$CARGO_TARGET_DIR/release/cuda-test-bins.txt")
[[ -x $test_bin ]] || { echo "no gpu_parity test binary in $CARGO_TARGET_DIR/release/cuda-test-bins.txt" >&2; exit 1; }
for pair in "disendiff:$CARGO_TARGET_DIR/release/disendiff" "gpu_parity:$test_bin"; do
    name=${pair%%:*}; src=${pair#*:}
    strip -o ".gpu/$name" "$src"
    nice xz -9 -T2 -f ".gpu/$name"
done
echo "$repo" > .gpu/manifest_dir
# diffusers 0.42.1 and importlib_metadata (the device image has the rest of its needs:
# filelock, huggingface-hub, numpy, regex, requests, safetensors, Pillow, zipp)
site=$(mktemp -d)
python3 -m pip install -q --no-deps --no-compile --only-binary=:all: --target "$site" diffusers==0.42.1 importlib_metadata==8.7.0
rm -rf "$site/bin"
tar -C "$site" -cf - . | nice xz -9 -T2 > .gpu/site.tar.xz
rm -rf "$site"
ls -l .gpu
tracked=$(git ls-files -z | du -cb --files0-from=- | tail -1 | cut -f1)
untracked=$(git ls-files -z --others --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
base=$(( tracked + ${untracked:-0} + $(stat -c %s .gpu/manifest_dir) ))
golden=$(( base + $(stat -c %s .gpu/gpu_parity.xz) ))
bench=$(( base + $(stat -c %s .gpu/disendiff.xz) + $(stat -c %s .gpu/site.tar.xz) ))
echo "travels: checkout $(( base >> 20 )) MiB; with check.sh golden's carry $(( golden >> 20 )) MiB, bench's $(( bench >> 20 )) MiB (limit 64)"
(( golden < 64 << 20 && bench < 64 << 20 )) || { echo "over the device tool's 64 MiB: the session's own checkout travels, not only this one" >&2; exit 1; }
