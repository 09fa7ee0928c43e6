"""Shared test fixtures. Tests run on CPU; multi-device tests spawn a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8 because the flag must be set before jax starts."""
import os
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def shared_dir():
    if not SHARED.exists():
        pytest.skip("../shared is not present")
    return SHARED


@pytest.fixture(scope="session")
def embedded_model():
    """(cfg, params, tokenizer) of the real embedded SmolLM2-135M, loaded once per session."""
    from seal_jax.model.embedded import load_embedded

    return load_embedded()


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
    """Free every compiled program after each test module. XLA:CPU maps each executable's code into
    memory (~9 mappings apiece) and jit keeps executables for the life of the process, so one
    process running the whole suite reached the kernel's 65,530-mapping limit, and the next
    compile segfaulted inside LLVM. Programs are not shared across modules in a way tests rely on."""
    yield
    import gc

    import jax

    from seal_jax import inner

    inner.clear_compiled()
    jax.clear_caches()
    gc.collect()
