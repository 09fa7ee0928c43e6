"""XLA flags seal_jax sets by default, before JAX starts its backends.

`--xla_gpu_enable_triton_gemm=false`: GEMMs on cuBLAS instead of XLA's Triton GEMMs. On an H200
(jax 0.11.2) the 7B inner loop ran within 1% of Triton's step time (0.575 s per candidate on cuBLAS,
0.571 s on Triton, K=16) but compiled in 17.5 s instead of 27.2 s, and the paper E-step's packed programs in ~34 s each
instead of ~2 minutes (Triton's autotuning): `bench/results/round_h200.md`, 2026-12-03 (third session).

`--xla_gpu_autotune_level=0`: cuBLAS picks each GEMM's algorithm by its heuristics instead of XLA
timing the candidates on the device while it compiles. On an H200 (jax 0.11.2) the 20 programs of
the paper E-step's longest call (embedded model, K=128) compiled in 24.6 s instead of 80.3 s, and
trained in 29.0 ms a step instead of 26.8 ms (`bench/results/round_h200.md`, 2026-12-03, sixth
session). The programs are compiled once per shape and kept by the compilation cache, but every E-step
of new self-edits meets new shapes, and a cold E-step spent more time compiling than training.

`--xla_gpu_enable_dynamic_slice_fusion=false`: in a training step's layer scan, the forward saves
matmul outputs (the o, gate and up projections) into the stacked residual buffers. With this fusion
on, XLA fuses such a matmul into its dynamic-update-slice and, as the matmul has another user (the
rest of the layer), computes it a second time for that user: three of a layer's largest GEMMs ran
twice in every forward (seen in the optimized HLO, jax 0.11.2). Off, the update is a copy and the
weights' slices are copied asynchronously: on an H200 the 7B inner loop (K=32, default settings) took
0.490 s per candidate instead of 0.545 s, the same final losses to the last digit, and the embedded
model's longest E-step call 25.1 ms a step instead of 25.7 ms (`bench/results/round_h200.md`,
2026-12-04, ninth session). The copies are a fixed cost per step, the duplicated GEMMs grow with its
tokens: on the 1B preset's longest packed call (~1,300 tokens a step) this flag and
`saved_residuals="dots"` together were 2% slower than neither.

The flags only concern GPU compiles; CPU and TPU ignore them.

A flag the user already sets in XLA_FLAGS (either value) is left as it is. JAX reads XLA_FLAGS when its
first backend starts, so this applies to a process that imports seal_jax before it computes anything
with JAX (the CLI, the launchers and the benchmarks do).
"""
from __future__ import annotations

import os

DEFAULT_FLAGS = {"--xla_gpu_enable_triton_gemm": "false", "--xla_gpu_autotune_level": "0",
                 "--xla_gpu_enable_dynamic_slice_fusion": "false"}


def with_defaults(xla_flags: str) -> str:
    """`xla_flags` with each default flag appended unless it is already set there."""
    present = {token.split("=", 1)[0] for token in xla_flags.split()}
    added = [f"{name}={value}" for name, value in DEFAULT_FLAGS.items() if name not in present]
    return " ".join([xla_flags.strip(), *added]).strip()


def apply() -> None:
    os.environ["XLA_FLAGS"] = with_defaults(os.environ.get("XLA_FLAGS", ""))
