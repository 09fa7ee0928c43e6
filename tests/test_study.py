"""Edit-evaluation studies (configs/knowledge.py:study) on the tiny world: every self-edit of every file
is trained and evaluated with reps, per-edit rewards are written, the table has a row per source /
style with intervals, and a rerun resumes without training anything again."""
import json

import numpy as np
import pytest

from seal_jax.config import ConfigError, load_config
from seal_jax.tasks.knowledge import experiments
from seal_jax.tasks.knowledge.data import load_embedded_corpus

from tiny_world import REPO, tiny_config, tiny_experiment


def _write_edit_file(path, passages, completions, styles=None):
    records = [dict(p.to_record(), completions=completions(p),
                    **({"style": styles[i]} if styles else {})) for i, p in enumerate(passages)]
    path.write_text(json.dumps(records))


@pytest.mark.slow
def test_study_trains_every_edit_with_reps_and_tables_each_source_and_style(tmp_path):
    passages = [p for p in load_embedded_corpus() if p.has_questions][:2]
    file_a, file_b = tmp_path / "model_a.json", tmp_path / "b.json"
    _write_edit_file(file_a, passages, lambda p: [f"{p.title} is known.", f"Facts about {p.title}."],
                     styles=["implications", "rewrite"])
    _write_edit_file(file_b, passages, lambda p: [p.context[:80]])
    c = tiny_config()
    c.experiment = "study"
    c.study = load_config(str(REPO / "configs" / "knowledge.py") + ":study").study
    c.study.files = f"{file_a},hand={file_b}"
    c.study.reps = 2
    exp = tiny_experiment(tmp_path / "run", c)
    out = experiments.study(exp)

    records = [r for r in exp.records.read() if r["phase"] == "study"]
    assert len(records) == (2 * 2 + 2 * 1) * 2  # every completion of every file, x reps
    assert out["edits"] == 6 and out["contexts"] == 2
    groups = {(r["source"], r["style"]): r for r in out["rows"][1:]}
    assert set(groups) == {("model_a", "implications"), ("model_a", "rewrite"), ("hand", "default")}
    assert groups[("model_a", "implications")]["edits"] == 2  # both completions of passage 0
    assert groups[("hand", "default")]["edits"] == 2 and groups[("hand", "default")]["contexts"] == 2
    assert np.isfinite(groups[("hand", "default")]["ci95"])  # two contexts -> an interval
    assert out["rows"][0]["source"].startswith("base")
    for edit in out["per_edit"]:
        mine = [r["reward"] for r in records
                if (r["context_id"], r["edit_index"]) == (edit["context_id"], edit["edit_index"])]
        assert len(mine) == 2 and edit["reward"] == pytest.approx(np.mean(mine))
    assert "| model_a | rewrite |" in (exp.run_dir / "results.md").read_text()

    first = (exp.run_dir / "results.json").read_text()
    calls = []
    exp.engine.train = lambda *a, **k: calls.append(a) or (_ for _ in ()).throw(AssertionError("retrained"))
    experiments.study(exp)  # resume: everything is in the records already
    assert not calls and (exp.run_dir / "results.json").read_text() == first


def test_study_files_are_validated_with_the_file_named(tmp_path):
    with pytest.raises(ConfigError, match="study.files is empty"):
        experiments.load_study_edits("")
    with pytest.raises(ConfigError, match="file not found"):
        experiments.load_study_edits(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_bytes(b"\xff\xfe not json")
    with pytest.raises(ConfigError, match="bad.json"):
        experiments.load_study_edits(str(bad))
    no_completions = tmp_path / "nc.json"
    no_completions.write_text(json.dumps([{"title": "t", "context": "c", "questions": []}]))
    with pytest.raises(ConfigError, match="record 0 has no list of string 'completions'"):
        experiments.load_study_edits(str(no_completions))


def test_study_reads_the_reference_file_with_all_completions(shared_dir):
    path = shared_dir / "data" / "squad" / "self_edits_qwen7b_train_iter0.json"
    if not path.exists():
        pytest.skip("reference self-edit file not present")
    edits = experiments.load_study_edits(f"qwen7b={path}", max_contexts=3)
    records = json.loads(path.read_text())[:3]
    assert len(edits) == sum(len(r["completions"]) for r in records)  # not only the first per passage
    assert {e.source for e in edits} == {"qwen7b"}
    assert edits[1].self_edit == records[0]["completions"][1]
