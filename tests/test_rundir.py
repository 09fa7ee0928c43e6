"""Run directories: marked on creation, never reused, discarded when empty, resumed only when safe."""
import json

import ml_collections
import pytest

from seal_jax import rundir
from seal_jax.config import set_dotted
from seal_jax.errors import RunDirError, UserError


def _config(**overrides):
    c = ml_collections.ConfigDict()
    c.run_root, c.run_name, c.resume, c.progress, c.seed = "runs", "t", "", True, 0
    c.self_edit = ml_collections.ConfigDict({"k": 2, "prompt": "implications"})
    c.lora = ml_collections.ConfigDict({"rank": 4, "targets": ("q", "v")})
    c.rest_em = ml_collections.ConfigDict({"rounds": 1, "reps": 1})
    for key, value in overrides.items():
        set_dotted(c, key, value)
    return c


def test_create_marks_the_folder_and_never_reuses_one(tmp_path):
    cfg = _config()
    a = rundir.create(tmp_path, "demo", cfg, kind="knowledge/rest_em")
    b = rundir.create(tmp_path, "demo", cfg, kind="knowledge/rest_em")
    assert a.path != b.path and a.path.parent == b.path.parent == tmp_path / "demo"
    marker = json.loads((a.path / rundir.MARKER).read_text())
    assert marker["kind"] == "knowledge/rest_em"
    assert marker["fingerprint"] == rundir.config_fingerprint(cfg)
    assert marker["config"]["self_edit.k"] == 2 and marker["config"]["lora.targets"] == ["q", "v"]
    assert marker["seal_jax_version"] and marker["created"]
    assert json.loads((a.path / "config.json").read_text())["self_edit"]["k"] == 2
    # No temp files are left beside the marker (it is written to a temp name, then renamed).
    assert sorted(p.name for p in a.path.iterdir()) == ["config.json", rundir.MARKER]


def test_a_run_that_fails_before_producing_anything_leaves_no_folder(tmp_path):
    with pytest.raises(RuntimeError):
        with rundir.create(tmp_path, "demo", _config(), kind="k") as run:
            (run.path / "checkpoints").mkdir()  # an empty folder is not a product
            raise RuntimeError("model failed to load")
    assert not run.path.exists() and not (tmp_path / "demo").exists()

    with pytest.raises(KeyboardInterrupt):
        with rundir.create(tmp_path, "demo", _config(), kind="k") as kept:
            (kept.path / "records.jsonl").write_text("{}\n")
            raise KeyboardInterrupt
    assert kept.path.exists()  # it produced a record: kept for resuming

    with rundir.create(tmp_path, "demo", _config(), kind="k") as ok:
        pass
    assert ok.path.exists()  # success keeps even an empty run


def test_resume_refuses_a_folder_that_is_not_a_run(tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(RunDirError, match="not a seal_jax run folder.*model folder") as e:
        rundir.open_for_resume(model_dir, _config())
    assert isinstance(e.value, UserError) and "\n" not in str(e.value)
    with pytest.raises(RunDirError, match="does not exist"):
        rundir.open_for_resume(tmp_path / "nope", _config())
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunDirError, match="is a file"):
        rundir.open_for_resume(tmp_path / "file", _config())
    (model_dir / rundir.MARKER).write_text("{not json")
    with pytest.raises(RunDirError, match="corrupt"):
        rundir.open_for_resume(model_dir, _config())


def test_resume_refuses_a_changed_config_naming_each_key_and_both_values(tmp_path):
    run = rundir.create(tmp_path, "demo", _config(), kind="knowledge/rest_em")
    changed = _config(**{"self_edit.k": 1, "lora.targets": ("q",), "resume": str(run.path)})
    with pytest.raises(RunDirError) as e:
        rundir.open_for_resume(run.path, changed, kind="knowledge/rest_em")
    msg = str(e.value)
    assert "2 key(s)" in msg and "self_edit.k: 2 -> 1" in msg and "lora.targets: ['q', 'v'] -> ['q']" in msg
    assert "rest_em.rounds" in e.value.hint  # says what may change
    with pytest.raises(RunDirError, match="is a 'knowledge/rest_em' run, not 'arc'"):
        rundir.open_for_resume(run.path, _config(), kind="arc")


def test_resume_accepts_safe_changes_and_records_them(tmp_path):
    run = rundir.create(tmp_path, "demo", _config(), kind="k")
    more = _config(**{"rest_em.rounds": 3, "progress": False, "resume": str(run.path)})
    opened = rundir.open_for_resume(run.path, more, kind="k")
    assert not opened.fresh and opened.changed_safe == {"rest_em.rounds": (1, 3), "progress": (True, False),
                                                        "resume": ("", str(run.path))}
    marker = json.loads((run.path / rundir.MARKER).read_text())
    assert marker["resumed"][0]["changed"]["rest_em.rounds"] == [1, 3]
    assert marker["fingerprint"] == rundir.config_fingerprint(more)  # safe keys are not hashed
    # A resumed run that fails is never discarded, even with nothing in it.
    with pytest.raises(RuntimeError):
        with opened:
            raise RuntimeError
    assert run.path.exists()


def test_a_run_from_before_a_speed_only_key_resumes_under_a_config_that_sets_it(tmp_path):
    run = rundir.create(tmp_path, "demo", _config(), kind="k", resume_safe=("progress",))
    later = _config()
    later.attention_impl = "auto"
    opened = rundir.open_for_resume(run.path, later, kind="k")
    assert opened.changed_safe == {"attention_impl": ("<absent>", "auto")}
    assert "attention_impl" in rundir.DEFAULT_RESUME_SAFE


def test_added_or_removed_keys_count_as_changes(tmp_path):
    run = rundir.create(tmp_path, "demo", _config(), kind="k")
    extra = _config()
    extra.lora.dropout = 0.1
    with pytest.raises(RunDirError, match=r"lora.dropout: '<absent>' -> 0.1"):
        rundir.open_for_resume(run.path, extra)


def test_create_or_resume_follows_config_resume(tmp_path):
    cfg = _config(run_root=str(tmp_path))
    run = rundir.create_or_resume(cfg, kind="k")
    assert run.fresh and run.path.parent == tmp_path / "t"
    again = rundir.create_or_resume(_config(run_root=str(tmp_path), resume=str(run.path)), kind="k")
    assert again.path == run.path and not again.fresh


def test_record_key_changes_with_every_input_and_only_with_them():
    base = dict(self_edit="The sky is green.", phase="round0/score", context_id="p1", edit_index=0, rep=0,
                seed=7, config_hash=rundir.training_config_hash(_config()))
    key = rundir.record_key(**base)
    assert key == rundir.record_key(**dict(base)) and len(key) == 32
    variants = [dict(base, self_edit="The sky is green!"), dict(base, phase="round1/score"),
                dict(base, context_id="p2"), dict(base, edit_index=1), dict(base, rep=1), dict(base, seed=8),
                dict(base, config_hash=rundir.training_config_hash(_config(**{"lora.rank": 8})))]
    keys = {rundir.record_key(**v) for v in variants}
    assert key not in keys and len(keys) == len(variants)
    # Odd text (lone surrogates, NULs) still hashes.
    assert rundir.record_key(**dict(base, self_edit="\ud800\x00")) != key


def test_training_config_hash_ignores_keys_that_do_not_change_a_candidate():
    h = rundir.training_config_hash(_config())
    assert rundir.training_config_hash(_config(**{"rest_em.rounds": 5, "progress": False, "seed": 3})) == h
    assert rundir.training_config_hash(_config(**{"self_edit.prompt": "rewrite"})) != h
    assert rundir.training_config_hash(_config(**{"lora.targets": ("q", "k")})) != h


def test_packed_rows_or_not_keep_records_and_resume(tmp_path):
    # A run from before `inner.packing` existed (no key), and one that turns it off, train the same
    # candidates: their records stay valid and the run resumes.
    def config(**inner):
        c = _config()
        c.inner = ml_collections.ConfigDict({"epochs": 10, **inner})
        return c

    h = rundir.training_config_hash(config())
    assert rundir.training_config_hash(config(packing=True)) == rundir.training_config_hash(
        config(packing=False)) == h
    assert rundir.training_config_hash(config(pack_merge_share=0.0)) == h  # the step shapes alone
    assert rundir.training_config_hash(config(epochs=5)) != h  # a real change still counts
    # A run whose marker predates the shape merging resumes under a config that sets it.
    old = rundir.create(tmp_path, "old", config(), kind="k", resume_safe=("progress",))
    assert rundir.open_for_resume(old.path, config(pack_merge_share=0.03), kind="k").changed_safe == {
        "inner.pack_merge_share": ("<absent>", 0.03)}
    run = rundir.create(tmp_path, "demo", config(packing=True), kind="k")
    resumed = config(packing=False)
    resumed.resume = str(run.path)
    opened = rundir.open_for_resume(run.path, resumed, kind="k")
    assert opened.changed_safe["inner.packing"] == (True, False)


def test_discard_unproductive_runs_and_resume_command(tmp_path, monkeypatch):
    monkeypatch.setattr(rundir, "_fresh_runs", [])  # only this test's runs (the list is process-wide)
    empty = rundir.create(tmp_path, "a", _config(), kind="k")
    (empty.path / "split.json").write_text("{}")  # setup bookkeeping is not a product
    used = rundir.create(tmp_path, "b", _config(), kind="k")
    (used.path / "records.jsonl").write_text("{}\n")
    assert rundir.discard_unproductive_runs() == [empty.path]
    assert not empty.path.exists() and used.path.exists()
    assert rundir.discard_unproductive_runs() == []  # each fresh run is considered once
    cmd = rundir.resume_command(used.path, ["--config=c.py:demo", "--config.resume=old", "--config.x=a b"])
    assert cmd == f"python -m seal_jax --config=c.py:demo '--config.x=a b' --config.resume={used.path}"


def test_a_stale_record_never_scores_a_different_self_edit():
    """Same position (context, edit index, rep), other text: the candidate is trained again."""
    from seal_jax.estep import done_records, score_self_edits
    from toy_domain import ToyDomain, Word, toy_engine

    engine = toy_engine(candidates_per_call=2)
    domain = ToyDomain(engine.tokenizer)
    calls = []
    train = engine.train
    engine.train = lambda specs, seeds, **kw: calls.append(len(specs)) or train(specs, seeds, **kw)
    log = []
    first = score_self_edits(engine, domain, [(Word("apple"), 0, "red fruit")], reps=1, seed=0, phase="p",
                             on_record=log.append, progress=False)
    assert calls == [1] and len(log) == 1 and log[0]["key"]
    again = score_self_edits(engine, domain, [(Word("apple"), 0, "red fruit")], reps=1, seed=0, phase="p",
                             done=done_records(log), on_record=log.append, progress=False)
    assert calls == [1] and again[0].records == first[0].records  # reused, not retrained
    other = score_self_edits(engine, domain, [(Word("apple"), 0, "green fruit")], reps=1, seed=0, phase="p",
                             done=done_records(log), on_record=log.append, progress=False)
    assert calls == [1, 1] and other[0].records[0]["self_edit"] == "green fruit"
    assert other[0].records[0]["key"] != log[0]["key"]
    legacy = [{k: v for k, v in log[0].items() if k != "key"}]  # a record written before content keys
    score_self_edits(engine, domain, [(Word("apple"), 0, "red fruit")], reps=1, seed=0, phase="p",
                     done=done_records(legacy), progress=False)
    assert calls == [1, 1, 1]
