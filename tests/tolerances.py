"""Float comparisons scaled to the values compared, so tests hold on any x86 CPU and jax version.

Reductions are summed in a different order on different CPUs (vector widths, thread counts) and by
different XLA versions, so two correct float32 results differ by a few units in the last place *of
their magnitude*. A tolerance must therefore scale with the values (a multiple of float32's machine
epsilon times the largest magnitude compared), never be an absolute number tuned on one machine.
"""
from __future__ import annotations

import numpy as np

F32_EPS = float(np.finfo(np.float32).eps)  # 1.19e-7


def scaled_max_diff(got, want) -> float:
    """max |got - want| divided by max |want| (NaNs must coincide and are ignored)."""
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    nan_got, nan_want = np.isnan(got), np.isnan(want)
    assert (nan_got == nan_want).all(), "NaN positions differ"
    finite = ~nan_want
    if not finite.any():
        return 0.0
    scale = max(float(np.abs(want[finite]).max()), np.finfo(np.float32).tiny)
    return float(np.abs(got[finite] - want[finite]).max()) / scale


def assert_close_scaled(got, want, *, eps_multiple: float, what: str = "") -> None:
    """|got - want| <= eps_multiple * float32 eps * max|want|, elementwise maximum."""
    rel = scaled_max_diff(got, want)
    bound = eps_multiple * F32_EPS
    assert rel <= bound, f"{what}: scaled difference {rel:.3g} > {bound:.3g} ({eps_multiple} f32 eps)"
