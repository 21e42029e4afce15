"""How long `npvae train` takes to reach its first training step, cold and warm.

    python benchmarks/bench_startup.py [--runs 3]

First with the Numba cache emptied (every kernel compiles), then with the cache warm. Each
run is a fresh `python -m npvae train` process on a small slice of MNIST; the script
timestamps the line "npvae: first step done" on its standard error, counting from the
moment the process was started. The MNIST files must already be in the cache (run
`npvae train` once).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def clear_numba_cache() -> int:
    """Delete npvae's compiled-kernel cache files (index .nbi and data .nbc)."""
    import npvae

    removed = 0
    for pattern in ("*.nbi", "*.nbc"):
        for f in Path(npvae.__file__).parent.rglob(pattern):
            f.unlink()
            removed += 1
    return removed


def time_to_first_step(out_dir: Path) -> tuple[float, bool]:
    cmd = [sys.executable, "-m", "npvae", "train", "--epochs", "1", "--limit", "1280",
           "--no-progress", "--out", str(out_dir)]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    first, compiled = None, False
    for line in proc.stderr:
        if "compiling kernels" in line:
            compiled = True
        if "first step done" in line and first is None:
            first = time.perf_counter() - t0
    proc.wait()
    if first is None or proc.returncode != 0:
        raise SystemExit(f"npvae train failed (exit {proc.returncode})")
    return first, compiled


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3, help="warm runs (median reported)")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    tmp = Path(tempfile.mkdtemp(prefix="npvae-startup-"))
    try:
        n = clear_numba_cache()
        cold, said = time_to_first_step(tmp / "cold")
        print(f"cold cache ({n} cache files removed): first step after {cold:.2f} s"
              f"{' (compile notice shown)' if said else ''}")
        warm = [time_to_first_step(tmp / f"warm{i}")[0] for i in range(args.runs)]
        print(f"warm cache: first step after {statistics.median(warm):.2f} s "
              f"(median of {args.runs}: {', '.join(f'{w:.2f}' for w in warm)})")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
