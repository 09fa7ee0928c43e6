"""Multi-process runs: 2 processes x 4 virtual CPU devices on 127.0.0.1 vs 1 process x 8 devices.

The multi-process side is started by the local launcher (launch/local.py, `--raw`), so the test also
covers how users start it; both sides run the same child script and process 0 alone writes results.
"""
import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from seal_jax import distributed
from tolerances import F32_EPS, assert_close_scaled, scaled_max_diff

REPO = pathlib.Path(__file__).resolve().parents[1]

_CHILD = textwrap.dedent("""
    import json, pathlib, sys
    process_id, num_processes, coordinator, out_dir = sys.argv[1:5]
    from seal_jax import distributed
    distributed.initialize(int(num_processes), coordinator or None, int(process_id))
    import jax, numpy as np
    from seal_jax import inner, sharding
    from seal_jax.model import transformer
    from seal_jax.model.config import LoraConfig
    from seal_jax.model.presets import get_preset

    assert jax.device_count() == 8, jax.devices()
    cfg = get_preset("tiny-llama")
    lc = LoraConfig(rank=4, alpha=8.0, targets=("q", "v", "down"))
    params = transformer.init_params(cfg, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    cands = [inner.CandidateData([rng.integers(3, 250, size=int(n)).astype(np.int32)
                                  for n in rng.integers(5, 40, size=1 + k % 3)]) for k in range(8)]
    hp = [{"lr": 1e-3 * (1 + k / 4), "epochs": 1 + k % 2, "seed": 10 + k} for k in range(8)]
    ic = inner.InnerConfig(steps_per_chunk=4, length_buckets=(48,))
    plan = inner.build_plan(cands, hp, ic, pad_id=2)
    arrays, info = {}, {"process_count": jax.process_count()}
    # "fsdp" first: each fsdp pair spans both processes, so the sharded base weights need
    # cross-process collectives in every step.
    for name, axes in [("candidate", {"candidate": 8}), ("fsdp_x_candidate", {"fsdp": 2, "candidate": 4})]:
        mesh = sharding.make_mesh({"axes": axes})
        res = inner.train_candidates(params, plan, cfg=cfg, lora_cfg=lc, inner_cfg=ic, mesh=mesh)
        for i, leaf in enumerate(jax.tree.leaves(distributed.to_host(res.lora))):
            arrays[f"{name}/lora{i}"] = leaf
        arrays[f"{name}/losses"] = res.losses
        arrays[f"{name}/steps"] = res.steps
        info[f"{name}/mesh_processes"] = distributed.num_hosts_in(mesh)
        info[f"{name}/lora_addressable_rows"] = sorted({int(s.index[0].start or 0)
            for s in jax.tree.leaves(res.lora)[0].addressable_shards})

    # Host work split over processes and gathered back in order; data only this process built.
    mesh = sharding.make_mesh({"axes": {"candidate": 8}})
    spec = sharding.candidate_sharding(mesh, 2)
    share = distributed.candidate_share(8, spec)
    info["shares"] = distributed.allgather_objects(share.tolist())
    rows = distributed.share_of(10)
    info["gathered"] = distributed.gather_shares([f"item{i}" for i in rows], 10)
    values = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
    local = distributed.put_local_share(values[share], spec)
    info["local_share_roundtrip"] = bool(np.array_equal(distributed.to_host(local), values))
    if distributed.is_main():
        out = pathlib.Path(out_dir) / f"result_{jax.process_index()}"
        np.savez(str(out) + ".npz", **arrays)
        (pathlib.Path(str(out) + ".json")).write_text(json.dumps(info))
    distributed.barrier("done")
""")


def _env(devices):
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
                        " --xla_backend_optimization_level=0").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run(argv, env, timeout):
    """Run in a fresh process group, killed as a whole if anything is left at the end."""
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_processes_train_like_one_process_with_eight_devices(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    single, multi = tmp_path / "single", tmp_path / "multi"
    single.mkdir()
    multi.mkdir()
    rc, out = _run([sys.executable, str(script), "0", "1", "", str(single)], _env(8), timeout=400)
    assert rc == 0, out[-4000:]
    # The local launcher's own timeout is below ours: it stops its processes itself.
    rc, out = _run([sys.executable, str(REPO / "launch" / "local.py"), "--num-processes", "2",
                    "--cpu-devices", "4", "--timeout", "400", "--raw", "--", sys.executable,
                    str(script), "{process_id}", "{num_processes}", "{coordinator}", str(multi)],
                   _env(4), timeout=450)
    assert rc == 0, out[-4000:]
    # Records are written once, by process 0.
    assert sorted(p.name for p in multi.iterdir()) == ["result_0.json", "result_0.npz"]
    want, got = np.load(single / "result_0.npz"), np.load(multi / "result_0.npz")
    info = json.loads((multi / "result_0.json").read_text())
    assert info["process_count"] == 2
    assert sorted(want.files) == sorted(got.files)
    for name in ("candidate", "fsdp_x_candidate"):
        assert info[f"{name}/mesh_processes"] == 2
        # Process 0 holds the adapters of its own devices' candidates only.
        assert len(info[f"{name}/lora_addressable_rows"]) == 4, info
        np.testing.assert_array_equal(got[f"{name}/steps"], want[f"{name}/steps"])
        # Same partitioned program on the same 8-device mesh; only where the collectives run differs
        # (gloo between processes vs in-process). Each value may differ by a few float32 ulps of its
        # magnitude from a reduction summed in another order; Adam amplifies that in near-zero
        # components (see test_sharding), hence the looser parameter bound.
        assert_close_scaled(got[f"{name}/losses"], want[f"{name}/losses"], eps_multiple=64,
                            what=f"{name} losses")
        for key in want.files:
            if key.startswith(f"{name}/lora"):
                assert scaled_max_diff(got[key], want[key]) <= 1e-4, (key, scaled_max_diff(
                    got[key], want[key]))
    # Every candidate fed by exactly one process; the host-work split reassembled in order.
    assert info["shares"] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert info["gathered"] == [f"item{i}" for i in range(10)]
    assert info["local_share_roundtrip"]
    # The single-process reference trained something (the comparison is not between zeros).
    assert np.isfinite(want["candidate/losses"][:, 0]).all()
    assert max(np.abs(want[k]).max() for k in want.files if "/lora" in k) > 100 * F32_EPS


_ROUND_CHILD = textwrap.dedent("""
    import dataclasses, json, pathlib, sys
    process_id, num_processes, coordinator, out_dir, tests_dir = sys.argv[1:6]
    from seal_jax import distributed
    distributed.initialize(int(num_processes), coordinator or None, int(process_id))
    import jax
    sys.path.insert(0, tests_dir)
    from seal_jax import engine as engine_lib, rest_em, sharding
    from seal_jax.checkpoints import RunCheckpointer
    from seal_jax.model import transformer
    from toy_domain import toy_engine, toy_experiment

    def make_run_dir():
        run_dir = pathlib.Path(out_dir) / "run"
        run_dir.mkdir(parents=True)
        return run_dir

    run_dir, own_dir = distributed.process_run_dirs(make_run_dir)
    toy = toy_engine()
    if distributed.is_main():  # the base as built here (XLA flags change its init bits): the test
        import numpy as np     # restores the checkpointed policy, adapters on their base, onto it
        np.savez(pathlib.Path(out_dir) / "base.npz", *map(np.asarray, jax.tree.leaves(toy.params)))
    engine = engine_lib.Engine(toy.cfg, distributed.to_host(toy.params), toy.tokenizer,
                               dataclasses.replace(toy.settings,
                                                   mesh=sharding.make_mesh({"axes": {"candidate": -1}})))
    exp = toy_experiment(own_dir, rounds=1, engine=engine)
    exp.checkpointer = RunCheckpointer(run_dir / "checkpoints", max_to_keep=2)
    rest_em.run_rounds(exp)
    exp.checkpointer.close()
    distributed.barrier("round done")
""")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_process_round_writes_the_single_process_records_once(tmp_path):
    script = tmp_path / "round_child.py"
    script.write_text(_ROUND_CHILD)
    tests_dir = str(REPO / "tests")
    single, multi = tmp_path / "single", tmp_path / "multi"
    rc, out = _run([sys.executable, str(script), "0", "1", "", str(single), tests_dir], _env(8),
                   timeout=400)
    assert rc == 0, out[-4000:]
    rc, out = _run([sys.executable, str(REPO / "launch" / "local.py"), "--num-processes", "2",
                    "--cpu-devices", "4", "--timeout", "400", "--raw", "--", sys.executable,
                    str(script), "{process_id}", "{num_processes}", "{coordinator}", str(multi),
                    tests_dir], _env(4), timeout=450)
    assert rc == 0, out[-4000:]
    want_dir, got_dir = single / "run", multi / "run"

    def records(run_dir):
        return [json.loads(line) for line in (run_dir / "records.jsonl").read_text().splitlines()]

    want, got = records(want_dir), records(got_dir)
    keys = [(r["phase"], r["context_id"], r["edit_index"], r["rep"]) for r in got]
    # Every candidate once: none duplicated by the second process, none lost.
    assert len(keys) == len(set(keys)) == len(want) == 4
    # The same self-edits (sampling), training losses (candidates sharded over both processes) and
    # rewards as the single-process run.
    assert got == want
    assert json.loads((got_dir / "results.json").read_text()) == json.loads(
        (want_dir / "results.json").read_text())
    # Process 1 wrote only into its private mirror, and the mirror matches what process 0 wrote.
    assert [p.name for p in got_dir.iterdir() if p.name.startswith(".process")] == [".process1"]
    assert records(got_dir / ".process1") == got
    assert not (got_dir / ".process1" / "checkpoints").exists()
    # The policy after the M-step, from the checkpoint both processes saved together.
    import jax

    from seal_jax.checkpoints import RunCheckpointer
    from tiny_world import tiny_model

    cfg, like = tiny_model()
    states, bases = [], []
    for run_dir in (want_dir, got_dir):
        saved = np.load(run_dir.parent / "base.npz")
        bases.append(jax.tree.unflatten(jax.tree.structure(like),
                                        [saved[f"arr_{i}"] for i in range(len(saved.files))]))
        ckpt = RunCheckpointer(run_dir / "checkpoints")
        assert ckpt.all_steps() == [1] and ckpt.holds_policy_history(1)
        states.append(ckpt.restore_policy(bases[-1], cfg, 1)[0])  # the run's base + its adapter
        ckpt.close()

    moved = 0.0
    for a, b, init in zip(*(jax.tree.leaves(t) for t in (states[1], states[0], bases[0]))):
        assert_close_scaled(np.asarray(a), np.asarray(b), eps_multiple=64, what="policy params")
        moved = max(moved, scaled_max_diff(np.asarray(b), np.asarray(init)))
    assert moved > 1e-4  # the M-step changed the policy: the comparison is not of two copies of init


def test_single_process_helpers_are_no_ops():
    import jax

    from seal_jax import sharding

    assert distributed.initialize(1) is False and distributed.initialize(None) is False
    assert distributed.is_main() and distributed.process_count() == 1
    mesh = sharding.make_mesh({"axes": {"candidate": -1}})
    assert not distributed.spans_processes(mesh)
    spec = sharding.candidate_sharding(mesh, 2)

    def fn(x):
        return x

    assert distributed.global_inputs(fn, (spec,)) is fn  # single process: nothing wrapped
    n = len(jax.devices())
    x = np.arange(2 * n * 3, dtype=np.float32).reshape(2 * n, 3)
    placed = distributed.put_global({"x": x}, spec)["x"]
    assert placed.sharding == spec and distributed.put_global(placed, spec) is placed
    np.testing.assert_array_equal(distributed.to_host(placed), x)
    np.testing.assert_array_equal(distributed.candidate_share(2 * n, spec), np.arange(2 * n))
    assert distributed.allgather_objects({"a": 1}) == [{"a": 1}]
    assert distributed.gather_shares(["a", "b"], 2) == ["a", "b"]
    distributed.barrier("noop")
    assert distributed.broadcast_from_main([1, "a"]) == [1, "a"]


def test_one_process_owns_the_run_directory(tmp_path):
    made = []

    def make():
        made.append(tmp_path / "run")
        made[-1].mkdir()
        return made[-1]

    assert distributed.process_run_dirs(make) == (tmp_path / "run", tmp_path / "run")
    assert made == [tmp_path / "run"] and not list((tmp_path / "run").iterdir())


def test_share_of_splits_items_into_contiguous_blocks():
    blocks = [distributed.share_of(10, i, 3) for i in range(3)]
    assert [list(b) for b in blocks] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert [len(distributed.share_of(2, i, 4)) for i in range(4)] == [1, 1, 0, 0]


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_the_cli_in_two_processes_writes_the_single_process_run(tmp_path):
    """`python -m seal_jax` (through tests/fault_child.py, which only maps the random model's junk text
    to words) started as 2 processes x 4 CPU devices by the local launcher writes the same records,
    results, self-edits and selection, byte for byte, as 1 process with 8 devices; process 1 writes
    only into its private mirror."""
    from test_fault_injection import tiny_round_args, write_tiny_model_dir

    model = write_tiny_model_dir(tmp_path / "model")
    env = _env(8)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests"), env.get("PYTHONPATH", "")])
    child = [sys.executable, str(REPO / "tests" / "fault_child.py"), "none", "0"]
    rc, out = _run(child + tiny_round_args(model, tmp_path / "single"), env, timeout=500)
    assert rc == 0, out[-4000:]
    env = _env(4)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests"), env.get("PYTHONPATH", "")])
    rc, out = _run([sys.executable, str(REPO / "launch" / "local.py"), "--num-processes", "2",
                    "--cpu-devices", "4", "--timeout", "600", "--raw", "--", *child,
                    *tiny_round_args(model, tmp_path / "multi"),
                    "--config.mesh.num_processes={num_processes}",
                    "--config.mesh.process_id={process_id}",
                    "--config.mesh.coordinator_address={coordinator}"], env, timeout=700)
    assert rc == 0, out[-4000:]
    [single] = list((tmp_path / "single" / "knowledge-demo").iterdir())
    [multi] = list((tmp_path / "multi" / "knowledge-demo").iterdir())
    for name in ("results.json", "records.jsonl", "self_edits_round0.json", "sft_round0.json"):
        assert (multi / name).read_bytes() == (single / name).read_bytes(), name
    records = (multi / "records.jsonl").read_text().splitlines()
    assert len(records) == len(set(records)) > 0  # every candidate once
    assert (multi / ".process1").is_dir() and not list((multi / ".process1").glob("checkpoints"))
    assert (multi / "checkpoints").is_dir()
