"""Runs a command and reports the GPU memory it took at its peak (used memory of GPU 0, read
through NVML every 2 ms, minus what was used before the command started), for both sides of
tools/gpu/check.sh alike: candle's stream-ordered pool and PyTorch's caching allocator both show
up there, as do their CUDA contexts.

    python3 tools/gpu/gpumem.py OUT.json -- CMD ARGS...

The command's last stdout line must be a JSON object; OUT.json gets it with "gpu_peak_mb" and
"gpu_baseline_mb" added. Exits with the command's status.
"""
import json
import subprocess
import sys
import time

import pynvml


def main():
    out, sep, cmd = sys.argv[1], sys.argv[2], sys.argv[3:]
    if sep != "--" or not cmd:
        raise SystemExit(__doc__)
    pynvml.nvmlInit()
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    used = lambda: pynvml.nvmlDeviceGetMemoryInfo(h).used
    base = used()
    peak = base
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    while p.poll() is None:
        peak = max(peak, used())
        time.sleep(0.002)
    stdout = p.stdout.read()
    sys.stdout.write(stdout)
    if p.returncode != 0:
        sys.exit(p.returncode)
    lines = [l for l in stdout.strip().splitlines() if l.startswith("{")]
    if not lines:
        raise SystemExit(f"{cmd}: no JSON line on stdout")
    rec = json.loads(lines[-1])
    rec["gpu_peak_mb"] = (peak - base) / 2**20
    rec["gpu_baseline_mb"] = base / 2**20
    with open(out, "w") as f:
        json.dump(rec, f)


if __name__ == "__main__":
    main()
