"""RunCheckpointer (orbax) round-trips, retention, crash recovery; RecordLog durability semantics."""
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seal_jax.checkpoints import RecordLog, RunCheckpointer


def _state(seed):
    rng = np.random.default_rng(seed)
    return {
        "policy": {
            "embed": jnp.asarray(rng.normal(size=(8, 4)), jnp.float32),
            "layers": {"wq": jnp.asarray(rng.normal(size=(2, 4, 4)), jnp.bfloat16)},
        },
        "rng": jax.random.PRNGKey(seed),
        "typed_rng": jax.random.key(seed + 100),
        "counters": np.asarray([seed, 2 * seed], np.int64),
    }


def _assert_state_equal(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        if jnp.issubdtype(w.dtype, jax.dtypes.prng_key):
            assert jnp.issubdtype(g.dtype, jax.dtypes.prng_key)
            g, w = jax.random.key_data(g), jax.random.key_data(w)
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def _meta(step):
    return {"round": step, "completed_phases": ["sample", "train"][: step % 3],
            "config": {"lr": 1e-3, "targets": ["q", "v"]}, "counters": {"candidates": 5 * step}}


def test_save_restore_roundtrip_and_latest(tmp_path):
    ckpt = RunCheckpointer(tmp_path / "ckpt", max_to_keep=5)
    assert ckpt.latest_step() is None
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        ckpt.restore()
    for step in (0, 1, 2):
        ckpt.save(step, _state(step), _meta(step))
    assert ckpt.latest_step() == 2
    ckpt.close()

    # A fresh process would open the directory anew.
    reopened = RunCheckpointer(tmp_path / "ckpt", max_to_keep=5)
    state, meta = reopened.restore()
    _assert_state_equal(state, _state(2))
    assert meta == _meta(2)
    state1, meta1 = reopened.restore(1)
    _assert_state_equal(state1, _state(1))
    assert meta1 == _meta(1)
    assert reopened.restore_metadata(0) == _meta(0)
    with pytest.raises(FileNotFoundError, match="step 7"):
        reopened.restore(7)


def test_restore_into_abstract_target(tmp_path):
    ckpt = RunCheckpointer(tmp_path)
    want = _state(3)
    ckpt.save(3, want, {"round": 3})
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), want)
    state, meta = ckpt.restore(target=abstract)
    _assert_state_equal(state, want)
    assert meta == {"round": 3}


def test_keeps_only_last_n(tmp_path):
    ckpt = RunCheckpointer(tmp_path, max_to_keep=2)
    for step in range(5):
        ckpt.save(step, {"x": jnp.full((3,), step, jnp.float32)}, {"round": step})
    assert ckpt.all_steps() == [3, 4]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["3", "4"]
    state, _ = ckpt.restore(3)
    np.testing.assert_array_equal(np.asarray(state["x"]), np.full((3,), 3.0))


def test_rejects_non_increasing_step_and_bad_metadata(tmp_path):
    ckpt = RunCheckpointer(tmp_path)
    ckpt.save(4, {"x": jnp.zeros(2)}, {"round": 4})
    with pytest.raises(ValueError, match="not after the latest saved step 4"):
        ckpt.save(4, {"x": jnp.zeros(2)}, {})
    with pytest.raises(ValueError, match="not JSON-serialisable"):
        ckpt.save(5, {"x": jnp.zeros(2)}, {"bad": object()})
    assert ckpt.all_steps() == [4]


# Orbax 0.12 names the in-progress directory `<step>.orbax-checkpoint-tmp`; older releases append a
# timestamp. Both must be ignored.
@pytest.mark.parametrize("tmp_name", ["2.orbax-checkpoint-tmp", "2.orbax-checkpoint-tmp-1700000000000000"])
def test_unfinished_save_falls_back_to_previous(tmp_path, tmp_name):
    """A crash between orbax's write and its atomic rename leaves a `<step>.orbax-checkpoint-tmp*` dir.

    We produce exactly that layout from a real step-2 save (rename it back to orbax's temporary name and
    damage its contents, as an interrupted write would) and check step 1 is what a restart sees.
    """
    root = tmp_path / "ckpt"
    ckpt = RunCheckpointer(root)
    ckpt.save(1, _state(1), _meta(1))
    ckpt.save(2, _state(2), _meta(2))
    ckpt.close()
    tmp_dir = root / tmp_name
    (root / "2").rename(tmp_dir)
    for marker in tmp_dir.rglob("commit_success.txt"):
        marker.unlink()
    shutil.rmtree(tmp_dir / "state")

    restarted = RunCheckpointer(root)
    assert restarted.latest_step() == 1
    state, meta = restarted.restore()
    _assert_state_equal(state, _state(1))
    assert meta == _meta(1)
    assert not tmp_dir.exists(), "leftover temporary checkpoint should be cleaned up on reopen"
    # The run continues and re-does step 2.
    restarted.save(2, _state(22), _meta(2))
    state2, _ = restarted.restore(2)
    _assert_state_equal(state2, _state(22))


def test_async_save_then_wait(tmp_path):
    with RunCheckpointer(tmp_path, async_save=True) as ckpt:
        ckpt.save(0, _state(0), {"round": 0}, wait=False)
        ckpt.wait_until_finished()
        assert ckpt.latest_step() == 0
    state, _ = RunCheckpointer(tmp_path).restore(0)
    _assert_state_equal(state, _state(0))


# --- RecordLog ------------------------------------------------------------------------------------

def test_record_log_append_read(tmp_path):
    log = RecordLog(tmp_path / "sub" / "records.jsonl")
    assert log.read() == []
    log.append({"round": 0, "candidate": 0, "reward": 0.5, "text": "line one\nline two"})
    log.extend([{"round": 0, "candidate": k, "reward": k / 4} for k in (1, 2)])
    got = RecordLog(tmp_path / "sub" / "records.jsonl").read()
    assert [r["candidate"] for r in got] == [0, 1, 2]
    assert got[0]["text"] == "line one\nline two"
    assert len(log) == 3
    with pytest.raises(ValueError, match="not JSON-serialisable"):
        log.append({"x": float("nan")})
    with pytest.raises(TypeError, match="must be dicts"):
        log.append([1, 2])
    assert len(log) == 3


def test_record_log_truncated_last_line(tmp_path):
    path = tmp_path / "records.jsonl"
    log = RecordLog(path)
    log.extend([{"candidate": 0, "reward": 1.0}, {"candidate": 1, "reward": 0.0}])
    full = json.dumps({"candidate": 2, "reward": 0.25}).encode()
    with open(path, "ab") as f:  # a crash mid-append: half a record, no newline
        f.write(full[: len(full) // 2])

    reader = RecordLog(path)
    assert [r["candidate"] for r in reader.read()] == [0, 1]
    # The resumed driver re-does candidate 2; the half line must not corrupt the new record.
    reader.append({"candidate": 2, "reward": 0.25})
    assert [r["candidate"] for r in RecordLog(path).read()] == [0, 1, 2]
    assert path.read_bytes().count(b"\n") == 3


def test_record_log_corrupt_middle_line_is_an_error(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_text('{"candidate": 0}\n{"candid\n{"candidate": 2}\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        RecordLog(path).read()


def _disk_bytes(path):
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def test_compact_save_stores_exact_narrow_dtypes_and_restores_bit_identical(tmp_path):
    rng = np.random.default_rng(0)
    bf16_exact = np.asarray(rng.normal(size=(64, 64)), np.float32).astype(jnp.bfloat16).astype(np.float32)
    f16_exact = np.asarray(rng.normal(size=(64, 64)), np.float32).astype(np.float16).astype(np.float32)
    full = np.asarray(rng.normal(size=(64, 64)), np.float32)  # needs all 24 mantissa bits
    state = {"a": jnp.asarray(bf16_exact), "b": f16_exact, "c": jnp.asarray(full),
             "n": np.arange(5, dtype=np.int32), "key": jax.random.key(3)}
    plain = RunCheckpointer(tmp_path / "plain")
    plain.save(0, state)
    compact = RunCheckpointer(tmp_path / "compact")
    compact.save(0, state, {"round": 1}, compact=True)
    # a and b are stored in 2 bytes instead of 4; c needs all of float32's mantissa.
    assert compact._raw_metadata(0)["_stored_dtypes"] == {
        "['a']": {"stored": "bfloat16", "restore": "float32"},
        "['b']": {"stored": "float16", "restore": "float32"}}
    assert _disk_bytes(tmp_path / "compact") < _disk_bytes(tmp_path / "plain")
    got, meta = compact.restore()
    assert meta == {"round": 1}  # the reserved dtype record is not handed back
    _assert_state_equal(got, state)
    got_t, _ = RunCheckpointer(tmp_path / "compact").restore(target=state)
    _assert_state_equal(got_t, state)
    with pytest.raises(ValueError, match="reserved"):
        compact.save(1, state, {"_stored_dtypes": {}})


def test_policy_history_rebuilds_the_policy_bit_identically_from_its_adapters(tmp_path):
    from random_lora import random_lora
    from seal_jax.lora import candidate, merge_lora
    from seal_jax.model.config import LoraConfig
    from seal_jax.model.presets import get_preset
    from seal_jax.model.transformer import init_params
    from seal_jax.checkpoints import PolicyCheckpointError, PolicyHistory, params_fingerprint

    cfg = get_preset("tiny-llama")
    base = init_params(cfg, jax.random.key(0))
    history, policy, policies = PolicyHistory(base_fingerprint=params_fingerprint(base)), base, []
    for i, lora_cfg in enumerate([LoraConfig(rank=4, alpha=8.0, targets=("q", "v")),
                                  LoraConfig(rank=2, alpha=2.0, targets=("q", "k", "v", "o", "gate", "up", "down"))]):
        lora = jax.tree.map(np.asarray, candidate(random_lora(cfg, lora_cfg, 1, seed=i), 0))
        policy = merge_lora(policy, lora, cfg, lora_cfg)  # what the M-step does
        history = history.extended(lora, lora_cfg)
        policies.append(policy)
    ckpt = RunCheckpointer(tmp_path / "policy")
    ckpt.save_policy(2, history, {"round": 2})
    RunCheckpointer(tmp_path / "full").save(2, policy)
    assert _disk_bytes(tmp_path / "policy") * 3 < _disk_bytes(tmp_path / "full")
    assert ckpt.holds_policy_history(2) and not RunCheckpointer(tmp_path / "full").holds_policy_history(2)

    restored, got_history, meta = RunCheckpointer(tmp_path / "policy").restore_policy(base, cfg)
    assert meta == {"round": 2} and got_history.lora_cfgs == history.lora_cfgs
    assert got_history.base_fingerprint == history.base_fingerprint
    _assert_state_equal(restored, policy)  # byte for byte
    # Params that already hold the first adapter get only the second merged on: the same bits.
    first_only = PolicyHistory(history.adapters[:1], history.lora_cfgs[:1], history.base_fingerprint)
    caught_up, _, _ = ckpt.restore_policy(policies[0], cfg, merged=first_only)
    _assert_state_equal(caught_up, policy)

    # A whole-params checkpoint restores as saved, with no history.
    whole, no_history, _ = RunCheckpointer(tmp_path / "full").restore_policy(base, cfg)
    assert no_history is None
    _assert_state_equal(whole, policy)

    other_base = init_params(cfg, jax.random.key(1))
    with pytest.raises(PolicyCheckpointError, match="another base model"):
        ckpt.restore_policy(other_base, cfg)
    wrong_first = PolicyHistory(history.adapters[1:], history.lora_cfgs[1:], history.base_fingerprint)
    with pytest.raises(PolicyCheckpointError, match="not the first 1 of its 2"):
        ckpt.restore_policy(base, cfg, merged=wrong_first)


def test_prune_keeps_the_newest_steps(tmp_path):
    ckpt = RunCheckpointer(tmp_path, max_to_keep=None)
    for step in range(4):
        ckpt.save(step, {"x": np.full(3, step)})
    assert ckpt.prune(keep_last=1) == [0, 1, 2] and ckpt.all_steps() == [3]
    assert ckpt.prune(keep_last=0) == [3] and ckpt.all_steps() == [] and ckpt.latest_step() is None
    with pytest.raises(ValueError):
        ckpt.prune(-1)
