#!/usr/bin/env bash
# Runs `disendiff bench` and its PyTorch twin back to back on this machine and prints the
# BENCHMARKS.md table (Rust/PyTorch ratios of median time and peak memory).
#
#   tools/bench/compare.sh [THREADS] [PYTHON]
#
# THREADS (default 2) is given to both sides: RAYON_NUM_THREADS for candle and the gemm
# kernels, torch.set_num_threads for PyTorch. PYTHON (default .venv-ref/bin/python) needs
# tools/reference/requirements.txt. Run it on a quiet machine: both sides use every thread.
set -euo pipefail
cd "$(dirname "$0")/../.."
threads=${1:-2}
python=${2:-.venv-ref/bin/python}
out=$(mktemp -d)
cargo build --release --quiet
RAYON_NUM_THREADS=$threads ./target/release/disendiff bench --json > "$out/rust.jsonl"
"$python" tools/reference/bench_torch.py --threads "$threads" > "$out/torch.jsonl"
"$python" - "$out/rust.jsonl" "$out/torch.jsonl" "$threads" <<'PY'
import json, sys
load = lambda p: {r["name"]: r for r in map(json.loads, open(p))}
rust, torch, threads = load(sys.argv[1]), load(sys.argv[2]), sys.argv[3]
print(f"| case ({threads} threads) | Rust s | PyTorch s | time ratio | Rust peak MB | PyTorch peak MB | memory ratio |")
print("|---|---|---|---|---|---|---|")
for name, r in rust.items():
    t = torch.get(name)
    if t is None:
        print(f"| {name} | {r['median_s']:.3f} | – | – | {r['peak_rss_mb']:.0f} | – | – |")
        continue
    print(f"| {name} | {r['median_s']:.3f} | {t['median_s']:.3f} | {r['median_s'] / t['median_s']:.2f} "
          f"| {r['peak_rss_mb']:.0f} | {t['peak_rss_mb']:.0f} | {r['peak_rss_mb'] / t['peak_rss_mb']:.2f} |")
PY
