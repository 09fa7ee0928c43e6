"""The ARC experiment end to end on a tiny random model: table rows, records, ReST-EM plumbing."""
import json

import pytest

from arc_helpers import ByteTokenizer
from seal_jax import inner, rest_em, sft
from seal_jax.checkpoints import RecordLog, RunCheckpointer
from seal_jax.config import load_config
from seal_jax.engine import EngineSettings
from seal_jax.experiment import make_m_step
from seal_jax.model.config import LoraConfig
from tiny_world import byte_tokenizer, tiny_model
from seal_jax.tasks.arc import dataset as D, evaluate as E, experiment as X, selfedit as S, synthetic
from seal_jax.tasks.arc.domain import ArcDomain, ArcSettings
from seal_jax.tasks.base import Score


def test_configs_load():
    for variant in ("demo", "reference-cpu", "paper"):
        c = load_config(f"configs/arc.py:{variant}")
        assert c.domain == "arc"
    with pytest.raises(ValueError, match="unknown arc config"):
        load_config("configs/arc.py:nope")


def test_wilson_interval():
    lo, hi = X.wilson(29, 40)
    assert 0.56 < lo < 0.6 and 0.83 < hi < 0.86  # the paper's 72.5% at n = 40
    assert X.wilson(0, 10)[0] == 0.0


@pytest.mark.slow
def test_run_end_to_end_tiny(tmp_path, monkeypatch):
    tok = byte_tokenizer()
    cfg, params = tiny_model()
    icfg = inner.InnerConfig(batch_size=2, schedule="cosine", steps_per_chunk=4,
                             length_buckets=(400,), candidate_buckets=(4,))
    engine = X.ArcEngine(cfg, params, tok, EngineSettings(
        lora=LoraConfig(rank=4, alpha=8.0, targets=("q", "v")), inner=icfg, candidates_per_call=4))
    engine.shared_seed = 0
    settings = ArcSettings(dataset=D.DatasetSettings(leave_n=(1,), max_samples=4, max_tokens=400),
                           queries=E.QuerySettings(augment=False, permute_n=0, max_answer_tokens=12))
    c = load_config("configs/arc.py:demo")
    with c.unlocked():
        c.progress = False
        c.self_edit.k = 2
        c.self_edit.k_eval = 2
        c.oracle_configs = [dict(basic=False, size=False, chain=False, repeat=False,
                                 strategy="train_using_all_tokens", learning_rate=1e-4, epochs=1)]
        c.plots = 1
        c.self_edit.max_resamples = 0  # resampling is tested on its own below
    tasks = [synthetic.make_task("flip_lr", i, num_demos=3, max_side=2) for i in range(2)]
    sft_cfg = sft.SFTConfig.from_fields(lora=LoraConfig(rank=4, alpha=4.0, targets=("q", "v")),
                                        epochs=1, batch_size=2, microbatches=1,
                                        length_buckets=(2048,))
    exp = X.ArcExperiment(
        config=c, engine=engine, domain=ArcDomain(tok, settings), train_contexts=tasks,
        eval_contexts=tasks[:1], run_dir=tmp_path, records=RecordLog(tmp_path / "records.jsonl"),
        checkpointer=RunCheckpointer(tmp_path / "checkpoints"),
        round=rest_em.round_config(c, contexts_per_round=2), m_step=make_m_step(engine, sft_cfg),
        progress=False)

    # The random model writes garbage: make the policy reply one valid config and one invalid reply
    # per task, and reward every config on task 0, to exercise selection and the M-step.
    good = S.SelfEditConfig(True, False, False, False, "train_using_output_tokens", 1e-3, 1).text()
    monkeypatch.setattr(engine, "sample", lambda prompts, sampling: [
        good if i % 2 == 0 else "not json" for i in range(len(prompts))])
    real_score = exp.domain.score

    def score(jobs):
        out = real_score(jobs)
        return [Score(1.0 if job.context is tasks[0] else s.reward, s.details)
                for job, s in zip(jobs, out)]

    monkeypatch.setattr(exp.domain, "score", score)
    params_before = engine.params
    state = X.run(exp)
    result = json.loads((tmp_path / "results.json").read_text())
    methods = [r["method"] for r in result["table"]]
    assert methods[0] == "no TTT (in-context)" and methods[1].startswith("TTT, fixed config (")
    assert methods[2] == "TTT, config 0 (no aug, all loss, lr 0.0001, 1 ep)"
    assert methods[3:] == ["oracle (best config per task, hindsight)", "SEAL round 0 (base policy)",
                           "SEAL round 1"]
    oracle = result["table"][3]
    assert oracle["configs_per_task"] == [1 + 1 + 2 + 2]  # fixed, grid, 2 SEAL rows of 2 edits
    seal1 = result["table"][5]
    assert seal1["pairs"] == 2 and seal1["invalid_self_edits"] == 1 and seal1["solved_pairs"] == 1
    [round0] = state["rounds"]
    assert round0["selected"] == 1 and round0["failed_self_edits"] == 2  # task 0's valid edit
    assert engine.params is not params_before  # the policy was fine-tuned and merged
    records = exp.records.read()
    invalid = [r for r in records if r.get("parse_error")]
    assert len(invalid) == 2 + 1 + 1  # train round 0: 2 tasks x 1; eval index 0 and 1: 1 each
    assert all(r["failed"] and r["reward"] == 0 and "invalid self-edit: not_json" in r["reason"]
               for r in invalid)
    attempts = json.loads((tmp_path / "self_edits_round0.json").read_text())["attempts"]
    assert sum(not a["valid"] for a in attempts) == 2
    assert (tmp_path / "results.md").read_text().count("SEAL round") == 2
    assert (tmp_path / f"task_{tasks[0].id}.png").exists()


def test_sampling_resamples_invalid_replies_up_to_the_limit(tmp_path):
    from types import SimpleNamespace

    c = load_config("configs/arc.py:demo")
    with c.unlocked():
        c.self_edit.max_resamples = 2
    good = S.REFERENCE_TTT_CONFIG.text()
    calls = []

    def sample(prompts, sampling):
        calls.append(len(prompts))
        # slot 0 is valid at once; slot 1 on its second resample; slot 2 never
        slots = range(3) if len(calls) == 1 else (1, 2)  # pending slots, in order
        assert len({sp.seed for sp in sampling}) == len(sampling)  # every row its own stream
        return [good if slot == 0 or (slot == 1 and len(calls) == 3) else "```json\n{}\n```"
                for slot in slots]

    tok = ByteTokenizer()
    domain = ArcDomain(tok, ArcSettings())
    big = synthetic.make_task("tile_lr", 0, num_demos=6, min_side=4, max_side=4)
    context = len(domain.self_edit_prompt(big)) - 1 + c.self_edit.max_new_tokens  # big does not fit
    exp = SimpleNamespace(config=c, run_dir=tmp_path, timings={}, domain=domain,
                          engine=SimpleNamespace(sample=sample, tokenizer=tok,
                                                 cfg=SimpleNamespace(max_position_embeddings=context)))
    tasks = [synthetic.make_task("flip_lr", 0), big]
    texts = X.sample_self_edits(exp, tasks, 3, "t", seed=0)
    assert calls == [3, 2, 2]
    assert texts[0][0] == good and texts[0][1] == good and texts[0][2].startswith("```")
    assert texts[1] == ["", "", ""]
    log = json.loads((tmp_path / "self_edits_t.json").read_text())["attempts"]
    assert "exceeds the model's" in log[0]["reason"]
    log = log[1:]
    assert len(log) == 7 and sum(a["valid"] for a in log) == 2
    assert all(a["reason"].startswith("markdown") for a in log if not a["valid"])
