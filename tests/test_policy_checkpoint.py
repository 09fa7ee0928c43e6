"""Round checkpoints sized to what resuming needs: the policy as the adapters its M-steps merged into
the base model (not its params), the newest `checkpoint.keep_last` kept, whole params only when no
adapters describe them, old whole-params checkpoints still resumable, a different base refused, and a
bad `keep_last` a config error. (Resuming to bit-identical params and results: tests/test_rest_em.py.)"""
import types

import jax
import ml_collections
import numpy as np
import pytest

from seal_jax import rest_em
from seal_jax.checkpoints import PolicyCheckpointError, PolicyHistory, RunCheckpointer
from seal_jax.config import ConfigError, load_config
from seal_jax.engine import Engine
from seal_jax.model.config import LoraConfig
from seal_jax.sft import PolicyUpdate

from tiny_world import REPO, tiny_config, tiny_model
from toy_domain import toy_engine, toy_experiment


def _disk_bytes(path):
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _assert_same_params(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.fixture(scope="module")
def one_round(tmp_path_factory):
    exp = toy_experiment(tmp_path_factory.mktemp("run"), rounds=1)
    base = exp.engine.params
    state = rest_em.run_rounds(exp)
    exp.checkpointer.close()
    assert state["rounds"][0]["selected"] > 0, "the toy round must run its M-step"
    return exp, base, state


def test_a_round_checkpoint_holds_only_the_adapters_and_is_much_smaller_than_the_params(one_round, tmp_path):
    exp, base, state = one_round
    ckpt = RunCheckpointer(exp.run_dir / "checkpoints")
    saved, meta = ckpt.restore(1)
    assert meta == {"state": state}
    assert list(saved) == ["adapters"] and list(saved["adapters"]) == ["0000"]
    assert set(saved["adapters"]["0000"]) == {"q", "v"}  # the toy M-step's LoRA targets
    adapter_bytes = sum(x.nbytes for x in jax.tree.leaves(saved))
    param_bytes = sum(np.asarray(x).nbytes for x in jax.tree.leaves(exp.engine.params))
    assert adapter_bytes * 40 < param_bytes
    whole = RunCheckpointer(tmp_path / "whole")
    whole.save(1, exp.engine.params, meta)  # what a round stored before
    assert _disk_bytes(exp.run_dir / "checkpoints" / "1") * 5 < _disk_bytes(tmp_path / "whole" / "1")
    # Enough to resume: the base and the adapters give the policy bit for bit.
    policy, history, _ = ckpt.restore_policy(base, exp.engine.cfg, 1)
    assert len(history) == 1 and history.lora_cfgs == [LoraConfig(rank=4, alpha=8.0, targets=("q", "v"))]
    _assert_same_params(policy, exp.engine.params)


def test_resuming_onto_another_base_model_is_refused(one_round):
    exp, _, _ = one_round
    cfg, other_base = tiny_model(seed=1)
    toy = toy_engine()
    resumed = toy_experiment(exp.run_dir, rounds=1,
                             engine=Engine(cfg, other_base, toy.tokenizer, toy.settings))
    with pytest.raises(PolicyCheckpointError, match="another base model"):
        rest_em.run_rounds(resumed)


def test_a_checkpoint_of_whole_params_still_resumes_and_later_rounds_store_whole_params(one_round, tmp_path):
    exp, _, state = one_round
    old = toy_experiment(tmp_path, rounds=1)
    old.checkpointer.save(1, exp.engine.params, {"state": state})  # a checkpoint from before adapters
    assert rest_em.run_rounds(old) == state
    _assert_same_params(old.engine.params, exp.engine.params)
    assert old.policy_history is None  # no adapters describe these params: saved whole from now on
    rest_em.save_policy(old, 2, {"state": state})
    assert not old.checkpointer.holds_policy_history(2)
    again, history, _ = old.checkpointer.restore_policy(old.engine.params, old.engine.cfg, 2)
    assert history is None
    _assert_same_params(again, exp.engine.params)


def test_the_policy_history_follows_each_kind_of_m_step():
    lora_cfg = LoraConfig(rank=1, alpha=1.0, targets=("q",))
    adapter = {"q": {"a": np.ones((2, 3, 1), np.float32), "b": np.ones((2, 1, 3), np.float32)}}
    start = PolicyHistory(base_fingerprint="base")
    grown = rest_em.policy_history_after(start, PolicyUpdate({}, {}, adapter, lora_cfg))
    assert len(start) == 0 and len(grown) == 1 and grown.base_fingerprint == "base"
    assert rest_em.policy_history_after(grown, PolicyUpdate({}, {})) is grown  # nothing trained
    assert rest_em.policy_history_after(grown, PolicyUpdate({}, {}, full_finetune=True)) is None
    assert rest_em.policy_history_after(None, PolicyUpdate({}, {}, adapter, lora_cfg)) is None


def _saving_exp(directory, keep, param_count=1000):
    params = {"w": np.arange(param_count, dtype=np.float32)}
    return types.SimpleNamespace(checkpointer=RunCheckpointer(directory, max_to_keep=None),
                                 round=rest_em.RoundConfig(keep_checkpoints=keep),
                                 policy_history=PolicyHistory(base_fingerprint="base"),
                                 engine=types.SimpleNamespace(params=params))


def _adapter(value):  # 12 float32 values: 48 bytes
    return {"q": {"a": np.full((2, 3, 1), value, np.float32), "b": np.ones((2, 1, 3), np.float32)}}


@pytest.mark.parametrize("keep, kept", [(2, [3, 4]), (1, [4]), (0, [1, 2, 3, 4])])
def test_keep_last_prunes_older_rounds_and_the_newest_holds_the_whole_history(tmp_path, keep, kept):
    exp = _saving_exp(tmp_path, keep)
    lora_cfg = LoraConfig(rank=1, alpha=2.0, targets=("q",))
    for step in range(1, 5):
        exp.policy_history = exp.policy_history.extended(_adapter(step), lora_cfg)
        rest_em.save_policy(exp, step, {"state": {"round": step}})
        assert exp.checkpointer.all_steps()[-1] == step  # the newest is never pruned
    assert exp.checkpointer.all_steps() == kept
    saved, meta = exp.checkpointer.restore(4)
    assert meta == {"state": {"round": 4}}
    assert [float(a["q"]["a"].flat[0]) for _, a in sorted(saved["adapters"].items())] == [1, 2, 3, 4]


def test_once_the_adapters_outweigh_the_params_the_params_are_saved(tmp_path):
    exp = _saving_exp(tmp_path, 0, param_count=30)  # 120 bytes: less than three adapters
    lora_cfg = LoraConfig(rank=1, alpha=2.0, targets=("q",))
    for step in (1, 2, 3):
        exp.policy_history = exp.policy_history.extended(_adapter(step), lora_cfg)
        rest_em.save_policy(exp, step, {"state": {"round": step}})
    assert [exp.checkpointer.holds_policy_history(s) for s in (1, 2, 3)] == [True, True, False]
    assert exp.policy_history is None  # whole params from now on
    whole, history, meta = exp.checkpointer.restore_policy(exp.engine.params, None, 3)
    assert history is None and meta == {"state": {"round": 3}}
    np.testing.assert_array_equal(whole["w"], exp.engine.params["w"])


def test_keep_last_is_read_from_the_config():
    c = tiny_config(**{"checkpoint.keep_last": 5})
    assert rest_em.round_config(c, contexts_per_round=2).keep_checkpoints == 5
    assert rest_em.round_config(tiny_config(), contexts_per_round=2).keep_checkpoints == 2


@pytest.mark.parametrize("value, problem", [(-1, "must be >= 0"), (1.5, "must be an integer, got float"),
                                            ("2", "must be an integer, got str"),
                                            (True, "must be an integer, got bool")])
def test_a_bad_keep_last_is_a_config_error(value, problem):
    from seal_jax import validation as V
    from seal_jax.tasks.knowledge.config_rules import _combinations, knowledge_rules
    from seal_jax.tasks.arc.experiment import build_experiment as build_arc

    knowledge = load_config(str(REPO / "configs" / "knowledge.py") + ":demo").to_dict()
    knowledge["checkpoint"]["keep_last"] = value
    problems = dict(V.config_problems(knowledge, knowledge_rules(), [_combinations], env={}))
    assert problems == {"checkpoint.keep_last": f"= {value!r} {problem}"}
    # Not type-safe: configs also come from JSON and code, where nothing casts or refuses a value.
    arc = ml_collections.ConfigDict(load_config(str(REPO / "configs" / "arc.py") + ":demo").to_dict(),
                                    type_safe=False)
    arc.checkpoint.keep_last = value
    with pytest.raises(ConfigError, match=f"checkpoint.keep_last = {value!r} {problem}"):
        build_arc(arc)  # before any task or model is loaded
    with pytest.raises(ValueError, match="checkpoint.keep_last must be an integer >= 0"):
        rest_em.RoundConfig(keep_checkpoints=value)
