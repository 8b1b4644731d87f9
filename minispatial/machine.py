"""The machine's numeric fingerprint: what moves the low digits of a float result besides the code.

Two runs of the same config and seed are bit-identical when their fingerprints are equal. Where
they differ (another OpenBLAS core type, NumPy's SIMD paths switched off, another numba target,
other library versions), float32 training turns rounding-level differences into different
metrics, and only a tolerance can compare them (tests/test_reference_runs.py,
docs/training.md "Numbers across machines").

    minispatial.machine.fingerprint() -> {"arch", "cpu", "python", "numpy", "numba", "blas",
                                          "blas_core", "numpy_simd", "numba_cpu"}
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

import numpy as np

# the names the OpenBLAS builds NumPy ships with (scipy-openblas, 64-bit ints) and plain OpenBLAS
# give to the function that reports the kernel set chosen at load time (or by OPENBLAS_CORETYPE)
_CORENAME_SYMBOLS = ("scipy_openblas_get_corename64_", "scipy_openblas_get_corename",
                     "openblas_get_corename64_", "openblas_get_corename")


def cpu_model() -> str:
    """The CPU's model name ('AMD EPYC', 'Apple M2' ...), or platform.processor() elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.split(":")[0].strip() in ("model name", "Model", "CPU part"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def blas_core() -> str:
    """The OpenBLAS kernel set NumPy's BLAS runs ('SkylakeX', 'Haswell' ...), 'unknown' if the
    BLAS is not an OpenBLAS this process can ask (Accelerate, MKL, a static build)."""
    paths = []
    try:
        with open("/proc/self/maps") as f:
            paths = sorted({ln.split()[-1] for ln in f if "openblas" in ln.lower() and "/" in ln})
    except OSError:
        pass
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for sym in _CORENAME_SYMBOLS:
            fn = getattr(lib, sym, None)
            if fn is not None:
                fn.restype = ctypes.c_char_p
                return fn().decode()
    return "unknown"


def blas_name() -> str:
    """The BLAS NumPy was built against ('scipy-openblas', 'accelerate' ...)."""
    try:
        deps = np.show_config(mode="dicts")["Build Dependencies"]
        return f"{deps['blas']['name']} {deps['blas'].get('version', '')}".strip()
    except Exception:                                     # older NumPy: no mode="dicts"
        return "unknown"


def numpy_simd() -> list[str]:
    """NumPy's SIMD dispatch targets this process uses (NPY_DISABLE_CPU_FEATURES removes some)."""
    try:
        from numpy._core import _multiarray_umath as m
    except ImportError:                                   # NumPy 1.x
        from numpy.core import _multiarray_umath as m
    feats = getattr(m, "__cpu_features__", {})
    return [t for t in getattr(m, "__cpu_dispatch__", []) if feats.get(t)]


def numba_cpu() -> str:
    """The CPU name numba compiles for (NUMBA_CPU_NAME overrides the host's)."""
    name = os.environ.get("NUMBA_CPU_NAME")
    if name:
        return name + ("+" + os.environ["NUMBA_CPU_FEATURES"] if os.environ.get("NUMBA_CPU_FEATURES") else "")
    try:
        import llvmlite.binding as llvm
        return llvm.get_host_cpu_name()
    except Exception:                                     # no llvmlite: numba is not usable either
        return "unknown"


def fingerprint() -> dict:
    """Everything above in one JSON-able dict; equal dicts promise bit-identical results."""
    import numba

    return {"arch": platform.machine(), "cpu": cpu_model(),
            "python": f"{sys.version_info.major}.{sys.version_info.minor}",
            "numpy": np.__version__, "numba": numba.__version__,
            "blas": blas_name(), "blas_core": blas_core(), "numpy_simd": numpy_simd(), "numba_cpu": numba_cpu()}




if __name__ == "__main__":
    import json

    print(json.dumps(fingerprint(), indent=2))
