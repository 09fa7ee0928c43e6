"""Mesh construction, logical-axis rules, and the inner loop on 1 vs 8 (virtual CPU) devices."""
import json
import os
import pathlib
import subprocess
import sys
import textwrap
import types

import jax
import pytest
from jax.sharding import PartitionSpec as P

from seal_jax import sharding

REPO = pathlib.Path(__file__).resolve().parents[1]


def _mesh(**axes):
    """Only `mesh.shape` is read by the rules: a stand-in avoids needing that many devices."""
    return types.SimpleNamespace(shape=dict(axes))


def test_make_mesh_sizes_and_errors():
    n = len(jax.devices())
    mesh = sharding.make_mesh({"axes": {"candidate": -1}})
    assert dict(mesh.shape) == {"candidate": n}
    assert dict(sharding.make_mesh(None).shape) == {"candidate": n}
    with pytest.raises(ValueError, match="at most one"):
        sharding.make_mesh({"axes": {"candidate": -1, "fsdp": -1}})
    with pytest.raises(ValueError, match="needs"):
        sharding.make_mesh({"axes": {"candidate": n + 1}})
    with pytest.raises(ValueError, match="positive"):
        sharding.make_mesh({"axes": {"candidate": 0}})


def test_rules_fsdp_tp_and_candidate():
    kernel = ("layers", "embed", "mlp")
    down = ("layers", "mlp", "embed")
    replicated = _mesh(candidate=8)
    assert sharding.logical_to_spec(kernel, replicated) == P(None, None, None)
    assert sharding.logical_to_spec(("candidate", "layers", "lora_in", "lora_rank"),
                                    replicated) == P("candidate", None, None, None)
    fsdp = _mesh(candidate=4, fsdp=2)
    assert sharding.logical_to_spec(kernel, fsdp) == P(None, "fsdp", None)
    # Without "tensor", "mlp" falls back to "fsdp"; a mesh axis is used by one dim only (first wins).
    assert sharding.logical_to_spec(down, fsdp) == P(None, "fsdp", None)
    assert sharding.logical_to_spec(("candidate",), fsdp) == P(("candidate", "fsdp"))
    tp = _mesh(candidate=2, tensor=4)
    assert sharding.logical_to_spec(kernel, tp) == P(None, None, "tensor")
    assert sharding.logical_to_spec(("layers", "embed", "kv_heads"), tp) == P(None, None, "tensor")
    assert sharding.logical_to_spec(("vocab", "embed"), tp) == P("tensor", None)
    # A dim the mesh axes do not divide stays replicated when the shape is known.
    assert sharding.logical_to_spec(("layers", "embed", "kv_heads"), tp, shape=(2, 64, 6)) == P(
        None, None, None)
    # Size-1 mesh axes are dropped; an explicit None rule replicates.
    assert sharding.logical_to_spec(("candidate",), _mesh(candidate=4, fsdp=1)) == P("candidate")
    custom = [("embed", None), ("embed", "fsdp")]
    assert sharding.logical_to_spec(("embed",), fsdp, custom) == P(None)


def test_rules_from_config_and_distributed_noop():
    rules = sharding.rules_from_config({"logical_axis_rules": [["embed", ["fsdp", "tensor"]]]})
    assert rules == (("embed", ("fsdp", "tensor")),)
    assert sharding.rules_from_config({}) == sharding.DEFAULT_RULES
    with pytest.raises(ValueError, match="pairs"):
        sharding.rules_from_config({"logical_axis_rules": [("embed",)]})
    assert sharding.maybe_initialize_distributed(None) is False
    assert sharding.maybe_initialize_distributed({"num_processes": 1}) is False


def test_logical_to_sharding_tree_on_one_device():
    from seal_jax.model import transformer
    from seal_jax.model.presets import get_preset

    cfg = get_preset("tiny-llama")
    mesh = sharding.make_mesh({"axes": {"candidate": 1}})
    tree = sharding.logical_to_sharding(transformer.param_logical_axes(cfg), mesh)
    shapes = jax.eval_shape(lambda key: transformer.init_params(cfg, key), jax.random.PRNGKey(0))
    assert jax.tree.structure(tree) == jax.tree.structure(shapes)


_CHILD = textwrap.dedent("""
    import json, sys, time
    import jax, numpy as np
    from seal_jax import inner, sharding
    from seal_jax.model import transformer
    from seal_jax.model.config import LoraConfig
    from seal_jax.model.presets import get_preset

    assert len(jax.devices()) == 8, jax.devices()
    cfg = get_preset("tiny-llama")
    lc = LoraConfig(rank=4, alpha=8.0, targets=("q", "v", "down"))
    params = transformer.init_params(cfg, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    cands = [inner.CandidateData([rng.integers(3, 250, size=int(n)).astype(np.int32)
                                  for n in rng.integers(5, 60, size=1 + k % 3)]) for k in range(8)]
    hp = [{"lr": 1e-3 * (1 + k / 4), "epochs": 1 + k % 3, "seed": 10 + k} for k in range(8)]
    ic = inner.InnerConfig(steps_per_chunk=4, length_buckets=(64,))

    def run(mesh, k_count=8):
        plan = inner.build_plan(cands[:k_count], hp[:k_count], ic, pad_id=2)
        return inner.train_candidates(params, plan, cfg=cfg, lora_cfg=lc, inner_cfg=ic, mesh=mesh)

    def rel(x, y):  # max |x - y| / max |y|: a difference scaled to the values compared
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        return float(np.nanmax(np.abs(x - y)) / max(np.nanmax(np.abs(y)), 1e-30))

    def diff(a, b):
        d = [rel(x, y) for x, y in zip(jax.tree.leaves(a.lora), jax.tree.leaves(b.lora))]
        loss = rel(a.losses, b.losses)
        same_nan = bool((np.isnan(a.losses) == np.isnan(b.losses)).all())
        return {"params": max(d), "loss": loss, "same_nan": same_nan,
                "steps": a.steps.tolist() == b.steps.tolist()}

    out = {}
    t0 = time.time()
    ref = run(None)
    out["ref_seconds"] = time.time() - t0
    t0 = time.time()
    for name, axes in [("candidate8", {"candidate": 8}), ("candidate4_fsdp2", {"candidate": 4, "fsdp": 2}),
                       ("candidate2_fsdp2_tensor2", {"candidate": 2, "fsdp": 2, "tensor": 2})]:
        mesh = sharding.make_mesh({"axes": axes})
        res = run(mesh)
        out[name] = diff(res, ref)
        out[name]["lora_spec"] = list(jax.tree.leaves(res.lora)[0].sharding.spec)
        out[name]["seconds"] = time.time() - t0
        t0 = time.time()
    # K = 6 is padded to 8 internally (and stripped again).
    res6 = run(sharding.make_mesh({"axes": {"candidate": 8}}), 6)
    out["k6"] = {"params": max(rel(x, np.asarray(y)[:6])
                               for x, y in zip(jax.tree.leaves(res6.lora), jax.tree.leaves(ref.lora))),
                 "k": int(jax.tree.leaves(res6.lora)[0].shape[0])}
    placed = sharding.shard_candidates({"x": np.zeros((8, 3))}, sharding.make_mesh(
        {"axes": {"candidate": 4, "fsdp": 2}}))
    out["placed_shards"] = len(placed["x"].addressable_shards)
    out["placed_shard_shape"] = list(placed["x"].addressable_shards[0].data.shape)
    print("RESULT " + json.dumps(out))
""")


def test_inner_loop_same_on_1_and_8_devices():
    env = dict(os.environ)
    # 8 virtual devices must be configured before jax starts, hence a child process. LLVM opt level 0
    # halves the CPU compile time; both sides of every comparison run under the same flags.
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                        " --xla_backend_optimization_level=0").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _CHILD], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    out = json.loads(line[len("RESULT "):])
    # Sharded programs sum gradients and norms in another order than the 1-device one. Adam divides
    # each component by its own sqrt(v), so for components whose gradient is near zero those last-place
    # differences show up in the update (up to ~lr per step) and then in B (which starts at 0). Bounds
    # are relative to the values' magnitude: 1e-3 of the largest parameter of each leaf, and 1e-5 of
    # the loss, which depends on every parameter and is the tight check (a real sharding bug, e.g. a
    # gradient summed over the wrong axis, moves both by O(1)).
    for name in ("candidate8", "candidate4_fsdp2", "candidate2_fsdp2_tensor2"):
        assert out[name]["params"] < 1e-3, out
        assert out[name]["loss"] < 1e-5, out
        assert out[name]["same_nan"] and out[name]["steps"], out
    assert out["candidate8"]["lora_spec"] == ["candidate", None, None, None]
    assert out["candidate4_fsdp2"]["lora_spec"] == [["candidate", "fsdp"], None, None, None]
    assert out["k6"]["k"] == 6 and out["k6"]["params"] < 1e-3, out
    assert out["placed_shards"] == 8 and out["placed_shard_shape"] == [1, 3]
