#!/usr/bin/env bash
# Runs `disendiff bench` and its PyTorch twin back to back on this machine and prints the
# BENCHMARKS.md table (Rust/PyTorch ratios of median time and peak memory).
#
#   tools/bench/compare.sh [THREADS] [PYTHON]
#
# THREADS (default 2) is given to both sides: RAYON_NUM_THREADS for candle and the gemm
# kernels, torch.set_num_threads for PyTorch. PYTHON (default .venv-ref/bin/python) needs
# tools/reference/requirements.txt. Run it on a quiet machine: both sides use every thread.
# ROUNDS (environment, default 3): both sides run that many times, alternating, and each
# side's time is the median over the rounds of its per-run medians (shared cloud machines
# drift by 10-30% over minutes; alternating keeps a slow spell from landing on one side).
set -euo pipefail
cd "$(dirname "$0")/../.."
threads=${1:-2}
python=${2:-.venv-ref/bin/python}
out=$(mktemp -d)
cargo build --release --quiet
rounds=${ROUNDS:-3}
for r in $(seq "$rounds"); do
    RAYON_NUM_THREADS=$threads ./target/release/disendiff bench --json > "$out/rust.$r.jsonl"
    "$python" tools/reference/bench_torch.py --threads "$threads" > "$out/torch.$r.jsonl"
done
"$python" - "$out" "$rounds" "$threads" <<'PY'
import json, statistics, sys
out, rounds, threads = sys.argv[1], int(sys.argv[2]), sys.argv[3]
def load(side):
    runs = [{r["name"]: r for r in map(json.loads, open(f"{out}/{side}.{i}.jsonl"))} for i in range(1, rounds + 1)]
    return {name: {"median_s": statistics.median(run[name]["median_s"] for run in runs),
                   "peak_rss_mb": max(run[name]["peak_rss_mb"] for run in runs),
                   "all": [run[name]["median_s"] for run in runs]} for name in runs[0]}
rust, torch = load("rust"), load("torch")
print(f"| case ({threads} threads, median of {rounds} rounds) | Rust s | PyTorch s | time ratio | Rust peak MB | PyTorch peak MB | memory ratio |")
print("|---|---|---|---|---|---|---|")
for name, r in rust.items():
    t = torch.get(name)
    if t is None:
        print(f"| {name} | {r['median_s']:.3f} | – | – | {r['peak_rss_mb']:.0f} | – | – |")
        continue
    print(f"| {name} | {r['median_s']:.3f} | {t['median_s']:.3f} | {r['median_s'] / t['median_s']:.2f} "
          f"| {r['peak_rss_mb']:.0f} | {t['peak_rss_mb']:.0f} | {r['peak_rss_mb'] / t['peak_rss_mb']:.2f} |")
print()
for name, r in rust.items():
    t = torch.get(name, {"all": []})
    print(f"{name}: Rust rounds {', '.join(f'{v:.3f}' for v in r['all'])}; PyTorch rounds {', '.join(f'{v:.3f}' for v in t['all'])}")
PY
