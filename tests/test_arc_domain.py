"""The ARC domain: candidates from self-edits, failures with reasons, batched TTT == one by one."""
import jax
import numpy as np
import pytest

from arc_helpers import ByteTokenizer
from seal_jax import inner
from seal_jax.model import transformer
from seal_jax.model.config import LoraConfig
from seal_jax.model.presets import get_preset
from seal_jax.tasks.arc import dataset as D, evaluate as E, grids, selfedit as S, synthetic
from seal_jax.tasks.arc.domain import ArcDomain, ArcSettings
from seal_jax.tasks.base import CandidateFailure, CandidateSpec, EvalJob
from tolerances import assert_close_scaled

TOK = ByteTokenizer()
SETTINGS = ArcSettings(dataset=D.DatasetSettings(leave_n=(1,), max_samples=4, max_tokens=400),
                       queries=E.QuerySettings(augment=False, permute_n=0))
TASKS = [synthetic.make_task("flip_lr", 0, num_demos=3, max_side=2),
         synthetic.make_task("recolour", 0, num_demos=3, max_side=2, num_tests=2)]


def _cfg(**kw):
    base = dict(basic=False, size=False, chain=False, repeat=False,
                strategy="train_using_output_tokens", learning_rate=1e-3, epochs=1)
    return S.SelfEditConfig(**{**base, **kw})


def test_candidate_carries_config_as_hparams_and_masks():
    domain = ArcDomain(TOK, SETTINGS)
    spec = domain.build_candidate(TASKS[0], _cfg(basic=True, learning_rate=3e-4, epochs=2).text())
    assert isinstance(spec, CandidateSpec)
    assert spec.hparams["learning_rate"] == 3e-4 and spec.hparams["epochs"] == 2
    assert spec.hparams["schedule"] == "cosine"
    assert spec.info["planned_steps"] == S.steps_for(2, len(spec.sequences), SETTINGS.batch_size)
    for s, m in zip(spec.sequences, spec.loss_masks):
        assert 0 < m.sum() < len(s)  # output only
    spec_all = domain.build_candidate(TASKS[0], _cfg(strategy="train_using_all_tokens").text())
    assert all(m.all() for m in spec_all.loss_masks)


def test_invalid_self_edits_are_recorded_failures():
    domain = ArcDomain(TOK, SETTINGS)
    bad = domain.build_candidate(TASKS[0], "use everything, lr 1e-3")
    assert isinstance(bad, CandidateFailure) and "not_json" in bad.reason
    capped = ArcDomain(TOK, ArcSettings(dataset=SETTINGS.dataset, step_cap=3))
    over = capped.build_candidate(TASKS[0], _cfg(epochs=5).text())
    assert isinstance(over, CandidateFailure) and "step cap" in over.reason
    tiny = ArcDomain(TOK, ArcSettings(dataset=D.DatasetSettings(leave_n=(1,), max_tokens=20)))
    empty = tiny.build_candidate(TASKS[0], _cfg().text())
    assert isinstance(empty, CandidateFailure) and "empty" in empty.reason
    assert empty.info["dataset"]["dropped_too_long"] > 0


def test_score_uses_every_test_and_records_reasons():
    domain = ArcDomain(TOK, SETTINGS)
    task = TASKS[1]
    requests = domain.eval_requests(task)
    assert {r.meta["test_index"] for r in requests} == {0, 1}
    truth = [grids.format_solver(o) + "#" for o in task.test_outputs]
    good = [truth[r.meta["test_index"]] for r in requests]
    half = [truth[0] if r.meta["test_index"] == 0 else "no grid" for r in requests]
    s_good, s_half = domain.score([EvalJob(task, requests, good), EvalJob(task, requests, half)])
    assert s_good.reward == 1.0 and s_half.reward == 0.0
    assert s_half.details["tests"][1]["decode_failures"]


def test_sft_example_is_prompt_and_reply():
    domain = ArcDomain(TOK, SETTINGS)
    prompt, completion = domain.sft_example(TASKS[0], " " + _cfg().text() + "\n")
    assert prompt == domain.self_edit_prompt(TASKS[0])
    assert TOK.decode(completion) == _cfg().text()


@pytest.mark.slow
def test_batched_ttt_over_configs_equals_one_by_one():
    """Configs with different epochs, learning rates and loss strategies, of two tasks, trained in
    one vmapped call give the adapters of training each alone (shared LoRA init, as the reference)."""
    cfg = get_preset("tiny-llama").replace(vocab_size=260)
    params = transformer.init_params(cfg, jax.random.PRNGKey(0))
    lora_cfg = LoraConfig(rank=4, alpha=8.0, targets=("q", "v", "gate", "up", "down"))
    icfg = inner.InnerConfig(batch_size=2, schedule="cosine", steps_per_chunk=4,
                             length_buckets=(400,))  # one bucket: identical padding alone/together
    domain = ArcDomain(TOK, SETTINGS)
    configs = [(TASKS[0], _cfg(epochs=1, learning_rate=1e-3)),
               (TASKS[0], _cfg(epochs=3, learning_rate=3e-4, strategy="train_using_all_tokens")),
               (TASKS[1], _cfg(epochs=4, learning_rate=1e-3, basic=True))]
    specs = [domain.build_candidate(t, c.text()) for t, c in configs]
    assert all(isinstance(s, CandidateSpec) for s in specs)

    def train(chosen):
        data = [inner.CandidateData(s.sequences, s.loss_masks) for s in chosen]
        plan = inner.build_plan(data, [dict(s.hparams, seed=7) for s in chosen], icfg, pad_id=TOK.pad_id)
        return inner.train_candidates(params, plan, cfg=cfg, lora_cfg=lora_cfg, inner_cfg=icfg)

    together = train(specs)
    assert list(together.steps) == [s.info["planned_steps"] for s in specs]
    assert len(set(together.steps.tolist())) == 3
    for k, spec in enumerate(specs):
        alone = train([spec])
        assert int(alone.steps[0]) == int(together.steps[k])
        steps = int(alone.steps[0])
        assert_close_scaled(together.losses[k, :steps], alone.losses[0], eps_multiple=64,
                            what=f"candidate {k} losses")
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(alone.lora),
                                jax.tree.leaves(together.lora)):
            # Adam divides by sqrt(v): rounding differences of the vmapped matmuls in near-zero
            # gradients grow over a few steps (1.0e-5 to 1.24e-4 of the adapter's scale, depending on
            # the x86 CPU); a wrong lr, step count or loss mask changes the adapter by O(1) of its scale.
            assert_close_scaled(np.asarray(b)[k], np.asarray(a)[0], eps_multiple=8192,
                                what=f"candidate {k} {jax.tree_util.keystr(path)}")
