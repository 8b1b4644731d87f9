"""Shared pytest setup: hypothesis profiles, chosen with HYPOTHESIS_PROFILE (default "default").

    default  ~20 examples per property, no deadline (numba compiles on first use)
    ci       100 examples per property, no deadline

A test's own @settings(max_examples=...) still wins over the profile. Fixtures defined here
are prefixed by the area that owns them (ops_...), so test files cannot collide.
"""

import os

# Tests are not benchmarks: with several OpenBLAS threads on a 2-core machine a small GEMM
# waits for busy cores (measured 25-50x slower). Must be set before numpy is first imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from hypothesis import settings  # noqa: E402

settings.register_profile("default", max_examples=20, deadline=None)
settings.register_profile("ci", max_examples=100, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
