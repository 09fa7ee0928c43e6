"""A second process with the same program reads it from the persistent compilation cache."""
import json
import os
import pathlib
import subprocess
import sys
import textwrap

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


def _run(cache_dir):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(cache_dir)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
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
