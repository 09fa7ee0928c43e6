"""A second process with the same program reads it from the persistent compilation cache."""
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

_CHILD = textwrap.dedent("""
    import json, sys
    import jax
    from jax import monitoring
    from seal_jax import compile_cache
    from seal_jax.model import transformer
    from seal_jax.model.presets import get_preset

    hits = []
    monitoring.register_event_listener(
        lambda name, **kw: hits.append(name) if name == "/jax/compilation_cache/cache_hits" else None)
    compile_cache.enable(sys.argv[1])
    cfg = get_preset("tiny-llama")
    params = transformer.init_params(cfg, jax.random.PRNGKey(0))
    logits = jax.jit(lambda p, t: transformer.forward(p, t, cfg=cfg))(
        params, jax.numpy.zeros((1, 8), jax.numpy.int32))
    print("RESULT " + json.dumps({"hits": len(hits), "sum": float(logits.sum())}))
""")


def _run(cache_dir, child=_CHILD, **env_vars):
    """The RESULT a child process prints, run on the CPU with `cache_dir` as its argument."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", **env_vars)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", child, str(cache_dir)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def test_second_process_hits_the_cache(tmp_path):
    cache = tmp_path / "xla_cache"
    first = _run(cache)
    entries = sorted(p.name for p in cache.iterdir())
    assert first["hits"] == 0 and entries  # small, fast programs are written too
    second = _run(cache)
    assert second["hits"] >= 2  # params init and the forward, read back
    assert sorted(p.name for p in cache.iterdir()) == entries  # nothing compiled anew
    assert second["sum"] == first["sum"]


# ----------------------------------------------------------------------------------------------------
# The executable cache: programs loaded without tracing


def _square_sum(x, y):
    return (x * x).sum() + y


@pytest.fixture
def executables(tmp_path, monkeypatch):
    from seal_jax import compile_cache

    monkeypatch.setenv(compile_cache.EXECUTABLES_ENV, "1")
    previous = compile_cache.directory()
    compile_cache.enable(tmp_path / "xla_cache")
    yield tmp_path / "xla_cache" / compile_cache.EXECUTABLES_DIR
    jax.config.update("jax_compilation_cache_dir", previous)


def _counting_lower(fn, args, lowered_count):
    def lower():
        lowered_count.append(1)
        return jax.jit(fn).lower(*args)
    return lower


def test_an_executable_is_stored_once_and_loaded_without_lowering(executables):
    from seal_jax import compile_cache

    args = (jnp.arange(6.0).reshape(2, 3), jnp.float32(1.5))
    lowered, before = [], compile_cache.executable_counts()
    first = compile_cache.executable("square", ("v1",), args, _counting_lower(_square_sum, args, lowered))
    assert len(list(executables.glob("square-*.jaxexe"))) == 1 and len(lowered) == 1
    again = compile_cache.executable("square", ("v1",), args, _counting_lower(_square_sum, args, lowered))
    assert len(lowered) == 1  # read back, not traced
    counts = compile_cache.executable_counts()
    assert (counts["stored"] - before["stored"], counts["loaded"] - before["loaded"]) == (1, 1)
    assert float(again(*args)) == float(first(*args)) == float(_square_sum(*args))


def test_the_key_changes_with_settings_shapes_dtypes_and_environment(executables, monkeypatch):
    from seal_jax import compile_cache

    args = (jnp.zeros((2, 3)), jnp.float32(0))
    key = compile_cache.executable_key("square", ("v1",), args)
    assert compile_cache.executable_key("square", ("v1",), args) == key
    assert compile_cache.executable_key("square", ("v2",), args) != key
    assert compile_cache.executable_key("other", ("v1",), args) != key
    assert compile_cache.executable_key("square", ("v1",), (jnp.zeros((2, 4)), jnp.float32(0))) != key
    assert compile_cache.executable_key("square", ("v1",), (jnp.zeros((2, 3), jnp.bfloat16),
                                                           jnp.float32(0))) != key
    assert compile_cache.executable_key("square", ("v1",), [jnp.zeros((2, 3)), jnp.float32(0)]) != key
    # An abstract argument is the same program as a concrete one on the default device.
    abstract = (jax.ShapeDtypeStruct((2, 3), jnp.float32), jax.ShapeDtypeStruct((), jnp.float32))
    assert compile_cache.executable_key("square", ("v1",), abstract) == key
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false")
    assert compile_cache.executable_key("square", ("v1",), args) != key


def test_an_unreadable_executable_is_recompiled_and_replaced(executables, caplog):
    from seal_jax import compile_cache

    args = (jnp.ones((4,)), jnp.float32(2))
    lowered = []
    compile_cache.executable("square", (), args, _counting_lower(_square_sum, args, lowered))
    (path,) = executables.glob("square-*.jaxexe")
    path.write_bytes(b"not an executable")
    before = compile_cache.executable_counts()
    with caplog.at_level("WARNING"):
        compiled = compile_cache.executable("square", (), args, _counting_lower(_square_sum, args, lowered))
    assert float(compiled(*args)) == 6.0 and len(lowered) == 2
    assert "could not be loaded" in caplog.text
    assert compile_cache.executable_counts()["unreadable"] == before["unreadable"] + 1
    # The damaged entry is gone: rewritten by the recompile, or removed where XLA's cache supplied it.
    again = compile_cache.executable("square", (), args, _counting_lower(_square_sum, args, lowered))
    assert float(again(*args)) == 6.0
    assert compile_cache.executable_counts()["unreadable"] == before["unreadable"] + 1


def test_a_program_read_from_xlas_cache_is_not_stored_again(executables):
    """On XLA:CPU an executable that XLA's cache loaded serializes without all its code (its copy
    failed when run), so only programs XLA compiled are stored."""
    from seal_jax import compile_cache

    args = (jnp.ones((5,)), jnp.float32(1))
    jax.jit(_square_sum).lower(*args).compile()  # now in XLA's cache, not in the executables
    jax.clear_caches()  # as a new process: the next compile reads XLA's cache
    before = compile_cache.executable_counts()
    lowered = []
    compiled = compile_cache.executable("square", (), args, _counting_lower(_square_sum, args, lowered))
    assert float(compiled(*args)) == 6.0 and len(lowered) == 1
    assert compile_cache.executable_counts()["stored"] == before["stored"]
    assert not list(executables.glob("square-*.jaxexe"))


def test_the_environment_switch_turns_the_executables_off(executables, monkeypatch):
    from seal_jax import compile_cache

    monkeypatch.setenv(compile_cache.EXECUTABLES_ENV, "0")
    args = (jnp.ones((3,)), jnp.float32(0))
    lowered = []
    for _ in range(2):
        compile_cache.executable("square", (), args, _counting_lower(_square_sum, args, lowered))
    assert len(lowered) == 2 and not executables.exists()


def training_twice(mesh_axes=None) -> dict:
    """Precompile and train a small plan twice, the in-memory programs dropped in between (as a new
    process would start); the executables stored and loaded, and whether both trained the same."""
    from seal_jax import compile_cache, inner, sharding
    from seal_jax.model import transformer
    from seal_jax.model.config import LoraConfig
    from seal_jax.model.presets import get_preset

    cfg = get_preset("tiny-llama")
    lora_cfg = LoraConfig(rank=4, alpha=8.0, targets=("q", "v"))
    ic = inner.InnerConfig(epochs=1, steps_per_chunk=4, length_buckets=(16, 32))
    params = transformer.init_params(cfg, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    cands = [inner.CandidateData([rng.integers(3, cfg.vocab_size, size=n).astype(np.int32) for n in lens])
             for lens in ([10, 20], [5, 30, 12], [28], [7, 9])]
    plan = inner.build_plan(cands, None, ic, pad_id=2)
    mesh = None if mesh_axes is None else sharding.make_mesh({"axes": mesh_axes})

    def run():
        inner.clear_compiled()
        programs = inner.precompile(params, [plan], cfg=cfg, lora_cfg=lora_cfg, inner_cfg=ic, mesh=mesh)
        result = inner.train_candidates(params, plan, cfg=cfg, lora_cfg=lora_cfg, inner_cfg=ic, mesh=mesh)
        return programs, [np.asarray(x) for x in jax.tree.leaves((result.lora, result.losses))]

    before = compile_cache.executable_counts()
    programs, first = run()
    stored = compile_cache.executable_counts()["stored"] - before["stored"]
    loaded_before = compile_cache.executable_counts()["loaded"]
    _, second = run()
    return {"devices": len(jax.devices()), "programs": programs, "stored": stored,
            "loaded": compile_cache.executable_counts()["loaded"] - loaded_before,
            "same": all(np.array_equal(a, b, equal_nan=True) for a, b in zip(first, second))}


def test_a_second_precompile_loads_the_training_programs_and_trains_the_same(executables):
    """The E-step's precompile in a later process loads every chunk program instead of tracing it,
    and the calls train bit for bit as before."""
    out = training_twice()
    assert out["programs"] >= 2 and out["stored"] == out["loaded"] == out["programs"], out
    assert out["same"], out


_MESH_CHILD = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, "tests")
    from seal_jax import compile_cache
    from test_compile_cache import training_twice

    compile_cache.enable(sys.argv[1])
    print("RESULT " + json.dumps(training_twice({"candidate": 4, "fsdp": 2})))
""")


def test_programs_on_an_8_device_mesh_are_loaded_and_train_the_same(tmp_path):
    flags = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
             " --xla_backend_optimization_level=0").strip()
    out = _run(tmp_path / "xla_cache", _MESH_CHILD, SEAL_JAX_EXECUTABLE_CACHE="1", XLA_FLAGS=flags)
    assert out["devices"] == 8 and out["programs"] >= 1
    assert out["stored"] == out["programs"] and out["loaded"] == out["programs"], out
    assert out["same"], out


_DECODE_CHILD = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, "tests")
    import jax
    from seal_jax import compile_cache
    from seal_jax.model import transformer
    from seal_jax.model.config import LoraConfig
    from seal_jax.model.presets import get_preset
    from seal_jax.sampling import SamplingParams, generate
    from seal_jax.scoring import score_sequences
    from random_lora import random_lora

    compile_cache.enable(sys.argv[1])
    cfg = get_preset("tiny-llama")
    lora_cfg = LoraConfig(rank=4, alpha=8.0, targets=("q", "v"))
    params = transformer.init_params(cfg, jax.random.PRNGKey(0))
    lora = random_lora(cfg, lora_cfg, 3, seed=1)
    prompts = [[5 + i, 9, 11 + i, 3] for i in range(6)]
    sampling = [SamplingParams(temperature=0.0 if i % 2 else 1.0, top_p=0.9, max_new_tokens=6 + i, seed=i)
                for i in range(6)]
    outs = generate(params, prompts, cfg=cfg, sampling=sampling, lora=lora, lora_cfg=lora_cfg,
                    adapter_index=[i % 3 for i in range(6)], batch_size=4)
    scores = score_sequences(params, prompts, [o.token_ids for o in outs], cfg=cfg, lora=lora,
                             lora_cfg=lora_cfg, adapter_index=[i % 3 for i in range(6)], pad_id=0)
    print("RESULT " + json.dumps({"tokens": [list(map(int, o.token_ids)) for o in outs],
                                  "scores": [float(x) for x in scores.sum_logprob],
                                  **compile_cache.executable_counts()}))
""")


def test_decode_and_scoring_programs_are_loaded_by_a_second_process_with_the_same_outputs(tmp_path):
    def run():
        return _run(tmp_path / "xla_cache", _DECODE_CHILD, SEAL_JAX_EXECUTABLE_CACHE="1")

    first, second = run(), run()
    assert first["stored"] >= 4 and first["loaded"] == 0  # prefill, install, decode, scoring at least
    assert second["loaded"] == first["stored"] and second["stored"] == 0
    assert second["tokens"] == first["tokens"]
    assert second["scores"] == first["scores"]
