"""How long `npvae train` takes to reach its first training step, cold and warm.

    python benchmarks/bench_startup.py [--runs 3]

First with an empty Numba cache (every kernel compiles), then with that cache warm. Every
launch uses a new, temporary cache folder (``NUMBA_CACHE_DIR``), so the cold launch is
cold wherever Numba would otherwise keep its cache, and your own cache is left alone. Each
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import describe  # noqa: E402


def time_to_first_step(out_dir: Path, cache_dir: Path) -> tuple[float, bool]:
    """Seconds from launching `npvae train` to its first step, with Numba's cache in
    ``cache_dir``, and whether it said it was compiling kernels."""
    cmd = [sys.executable, "-m", "npvae", "train", "--epochs", "1", "--limit", "1280",
           "--no-progress", "--out", str(out_dir)]
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache_dir),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
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
    print(describe())
    tmp = Path(tempfile.mkdtemp(prefix="npvae-startup-"))
    cache = tmp / "numba-cache"  # empty: the first launch compiles every kernel it needs
    try:
        cold, said = time_to_first_step(tmp / "cold", cache)
        print(f"cold cache (a new, empty cache folder): first step after {cold:.2f} s"
              f"{' (compile notice shown)' if said else ' (no compile notice: not cold?)'}")
        warm = [time_to_first_step(tmp / f"warm{i}", cache)[0] for i in range(args.runs)]
        print(f"warm cache: first step after {statistics.median(warm):.2f} s "
              f"(median of {args.runs}: {', '.join(f'{w:.2f}' for w in warm)})")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
