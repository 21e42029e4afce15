"""What machine a benchmark ran on: CPU vendor and model, vector extensions, cores, BLAS.

Every figure in benchmarks/RESULTS.md is printed beside this description, because the
same code runs at different relative speeds on different CPUs: NumPy's SIMD kernels
round and perform differently with AVX2 and AVX-512, and subnormal floats cost about a
hundred cycles per operation on many Intel cores and little on AMD ones.

    python benchmarks/machine.py          # prints one line
"""
from __future__ import annotations

import os
import platform


def _cpuinfo() -> dict:
    """The first processor's fields from /proc/cpuinfo (Linux); empty elsewhere."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    if fields:
                        break
                    continue
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


def cpu() -> dict:
    """vendor, model, the widest x86 vector extension (or the architecture), logical cores."""
    info = _cpuinfo()
    flags = set(info.get("flags", info.get("Features", "")).split())
    if "avx512f" in flags:
        simd = "AVX-512"
    elif "avx2" in flags:
        simd = "AVX2"
    elif "asimd" in flags:
        simd = "NEON"
    else:
        simd = "no AVX2"
    vendor = {"GenuineIntel": "Intel", "AuthenticAMD": "AMD"}.get(
        info.get("vendor_id", ""), info.get("vendor_id") or info.get("CPU implementer") or "?")
    model = info.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in info and "model" in info:  # the generation, when the name is vague
        model += f" (family {info['cpu family']}, model {info['model']})"
    return dict(vendor=vendor, model=model, simd=simd, cores=os.cpu_count(),
                machine=platform.machine())


def blas() -> str:
    """NumPy's BLAS library, version, kernel and thread count, as threadpoolctl reports."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "BLAS unknown"
    for pool in threadpool_info():
        if pool.get("user_api") == "blas":
            arch = pool.get("architecture")
            return (f"{pool.get('internal_api')} {pool.get('version')}"
                    + (f" ({arch} kernels)" if arch else "")
                    + f", {pool.get('num_threads')} threads")
    return "BLAS unknown"


def describe() -> str:
    """One line: 'AMD EPYC (AMD, AVX-512), 2 cores, x86_64; OpenBLAS ...; Python, NumPy ...'."""
    c = cpu()
    import numpy

    parts = [f"CPU: {c['model']} ({c['vendor']}, {c['simd']}), {c['cores']} cores, {c['machine']}",
             f"NumPy {numpy.__version__} with {blas()}"]
    try:
        import numba

        parts.append(f"Numba {numba.__version__}")
    except ImportError:
        pass
    try:
        import torch

        parts.append(f"PyTorch {torch.__version__}")
    except ImportError:
        pass
    parts.append(f"Python {platform.python_version()}")
    return "; ".join(parts)


if __name__ == "__main__":
    print(describe())
