"""The XLA flags seal_jax sets by default, and that a user's own setting wins."""
import os
import subprocess
import sys

from seal_jax import xla_defaults

ALL = ("--xla_gpu_enable_triton_gemm=false --xla_gpu_autotune_level=0 "
       "--xla_gpu_enable_dynamic_slice_fusion=false")


def test_defaults_are_added_to_other_flags():
    flags = xla_defaults.with_defaults("--xla_force_host_platform_device_count=8")
    assert flags.split() == ["--xla_force_host_platform_device_count=8",
                             *ALL.split()]
    assert xla_defaults.with_defaults("") == ALL


def test_a_flag_the_user_sets_is_kept_as_set():
    assert xla_defaults.with_defaults(" --xla_gpu_enable_triton_gemm=true ") == \
        "--xla_gpu_enable_triton_gemm=true --xla_gpu_autotune_level=0 --xla_gpu_enable_dynamic_slice_fusion=false"
    assert xla_defaults.with_defaults("--xla_gpu_autotune_level=4 --xla_gpu_enable_triton_gemm "
                                      "--xla_gpu_enable_command_buffer=") == \
        "--xla_gpu_autotune_level=4 --xla_gpu_enable_triton_gemm --xla_gpu_enable_command_buffer= " \
        "--xla_gpu_enable_dynamic_slice_fusion=false"


def test_importing_seal_jax_sets_the_flags_before_jax_starts():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    code = ("import os, seal_jax, jax, jax.numpy as jnp; "
            "print(os.environ['XLA_FLAGS']); print(float((jnp.ones(3) * 2).sum()))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout.split("\n")
    assert out[0] == ALL
    assert float(out[1]) == 6.0  # the backend accepted the flag (an unknown flag aborts the process)
