"""Shared test fixtures. Tests run on CPU; multi-device tests spawn a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8 because the flag must be set before jax starts."""
import os
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

# Tests patch functions inside traced programs (fault injection, spies), which the executable cache's
# key cannot see (`seal_jax.compile_cache`): it is off here, subprocesses included, except in the tests
# of it, which turn it on.
os.environ["SEAL_JAX_EXECUTABLE_CACHE"] = "0"


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


# XLA:CPU maps each compiled executable's code into memory (~9 mappings apiece) and jit keeps
# executables for the life of the process, so one process running the whole suite reached the kernel's
# 65,530-mapping limit (vm.max_map_count) and the next compile segfaulted inside LLVM. Compiled
# programs are therefore freed after each module, and after any test that leaves the process above
# this many mappings (one module alone reached 28k).
MAPPINGS_BEFORE_RELEASE = 20_000


def _release_compiled_programs() -> None:
    import gc

    import jax

    from seal_jax import inner

    inner.clear_compiled()
    jax.clear_caches()
    gc.collect()


def _mappings() -> int:
    try:
        with open("/proc/self/maps", "rb") as f:
            return sum(1 for _ in f)
    except OSError:  # not Linux: no such limit to watch
        return 0


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs_per_module():
    yield
    _release_compiled_programs()


@pytest.fixture(autouse=True)
def _release_compiled_programs_when_mappings_pile_up():
    yield
    if _mappings() > MAPPINGS_BEFORE_RELEASE:
        _release_compiled_programs()
