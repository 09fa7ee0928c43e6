"""bench/knowledge_paper_report.py on a hand-made pair of run folders: the table, the paired
differences, the degeneration check, the timings and the copied files; and the one-command script
end to end at a tiny size, interrupted once and resumed (slow)."""
import importlib.util
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from seal_jax import results as R

REPO = pathlib.Path(__file__).resolve().parents[1]


def _report_module():
    spec = importlib.util.spec_from_file_location("knowledge_paper_report",
                                                  REPO / "bench" / "knowledge_paper_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write(path, obj):
    path.write_text(json.dumps(obj))


def _row(model, condition, accuracy):
    return {"model": model, "condition": condition, "accuracy": accuracy, "ci95": 0.1, "pooled": accuracy,
            "passages": 4, "questions": 8, "failed_candidates": 0, "ungraded_passages": 0}


def _fake_runs(root: pathlib.Path):
    ids = ["p0", "p1", "p2", "p3"]
    base_edits = [[f"Fact {i} one.\nFact {i} two.", ""] for i in range(4)]
    looping = "the cat sat on the mat " * 12  # every 4-gram repeats: a degenerate self-edit
    seal_edits = [[looping, "short"], ["", ""], [looping, "x"], ["A fact.", "B fact."]]
    rest = root / "rest"
    rest.mkdir()
    _write(rest / "seal_run.json", {"kind": "knowledge/rest_em"})
    _write(rest / "config.json", {"model": "embedded", "chat": True, "grader": {"kind": "em_f1"},
                                  "self_edit": {"k": 2, "max_new_tokens": 12}, "eval": {"reps": 1},
                                  "rest_em": {"rounds": 1, "passages_per_round": 2, "reps": 1},
                                  "table": {"self_edit_samples": 2, "fallback_rule": "nonempty"}})
    _write(rest / "split.json", {"train": ["t0", "t1"], "eval": ids})
    _write(rest / "results.json", {
        "round": 1, "evaluated_start": True,
        "table": [_row("base", "base", 0.0), _row("base", "passage_only", 0.25),
                  _row("base", "self_edits", 0.25), _row("seal_round1", "base", 0.0),
                  _row("seal_round1", "self_edits", 0.75)],
        "rounds": [{"round": 0, "contexts": 2, "self_edits": 4, "selection": "best_of_k",
                    "baseline_mean": 0.0, "reward_mean": 0.5, "selected_reward_mean": 0.75,
                    "failed_self_edits": 0, "ungraded_candidates": 0, "selected": 2,
                    "sft": {"steps": 2, "losses": [2.0, 1.5]}}]})
    for label in ("base", "seal_round1"):
        _write(rest / f"baseline_{label}.json", {"reward": {i: 0.0 for i in ids}})
    # Per passage: base self-edits 0.5, 0, 0.5, 0; SEAL 1, 0.5, 1, 0.5 (two reps of p1: 0.5 and a
    # failure counting 0, then a resumed duplicate of rep 1 scoring 1.0, which wins); passage only
    # ungraded on p3 (left out of its pairs).
    records = []
    # Sequences trained: base 2, 20, 3, 20; SEAL 2, 2, 20, 5 and p1's second rep 3.
    for i, r, n in zip(ids, (0.5, 0.0, 0.5, 0.0), (2, 20, 3, 20)):
        records.append({"phase": "table/base/self_edits", "context_id": i, "edit_index": 0, "rep": 0,
                        "failed": False, "reward": r, "num_sequences": n})
    for i, r, n in zip(ids, (1.0, 0.5, 1.0, 0.5), (2, 2, 20, 5)):
        records.append({"phase": "table/seal_round1/self_edits", "context_id": i, "edit_index": 0,
                        "rep": 0, "failed": False, "reward": r, "num_sequences": n})
    records.append({"phase": "table/seal_round1/self_edits", "context_id": "p1", "edit_index": 0,
                    "rep": 1, "failed": True, "reward": 0.0, "num_sequences": 0})
    records.append({"phase": "table/seal_round1/self_edits", "context_id": "p1", "edit_index": 0,
                    "rep": 1, "failed": False, "reward": 0.5, "num_sequences": 3})
    for i, r in zip(ids, (0.5, 0.0, 0.0, None)):
        records.append({"phase": "table/base/passage_only", "context_id": i, "edit_index": 0, "rep": 0,
                        "failed": False, "reward": r, "ungraded": r is None})
    (rest / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"phase": "tab')
    _write(rest / "self_edits_base_eval.json", {"context_ids": ids, "k": 2, "self_edits": base_edits})
    _write(rest / "self_edits_seal_round1_eval.json", {"context_ids": ids, "k": 2, "self_edits": seal_edits})
    _write(rest / "sft_round0.json", [{"context_id": "t0", "edit_index": 1, "reward": 0.5, "baseline": 0.5,
                                       "completion": "one two three"},
                                      {"context_id": "t1", "edit_index": 0, "reward": 1.0, "baseline": 0.0,
                                       "completion": "four"}])
    (rest / "timings.jsonl").write_text("".join(json.dumps(e) + "\n" for e in [
        {"phase": "setup", "seconds": 5.0, "status": "done", "session": "a"},
        {"phase": "round0/estep", "seconds": 30.0, "status": "interrupted", "session": "a"},
        {"phase": "round0/estep", "seconds": 10.0, "status": "done", "session": "b"},
        {"phase": "round0/m_step", "seconds": 7.0, "status": "done", "session": "b"}]))
    cpt = root / "cpt"
    cpt.mkdir()
    _write(cpt / "seal_run.json", {"kind": "knowledge/cpt"})
    _write(cpt / "config.json", {"experiment": "cpt"})
    _write(cpt / "results.json", {"passages": 4, "questions": 8, "rows": [
        {"condition": "base", "pooled_accuracy": 0.0, "accuracy": 0.0, "ci95": 0.0, "sequences": 0},
        {"condition": "self_edits", "pooled_accuracy": 0.5, "accuracy": 0.5, "ci95": 0.2, "sequences": 16,
         "steps": 2}]})
    return rest, cpt


def test_report_tables_paired_differences_degeneration_and_files(tmp_path):
    report = _report_module()
    rest, cpt = _fake_runs(tmp_path)
    out = tmp_path / "results"
    report.main(["--rest-em", str(rest), "--cpt", str(cpt), "--out", str(out)])

    summary = json.loads((out / "summary.json").read_text())["rest_em"]
    [seal_vs_base] = [d for d in summary["comparisons"] if d["a"].startswith("SEAL round 1")]
    mean, ci = R.mean_ci95([0.5, 0.5, 0.5, 0.5])  # SEAL - base self-edits per passage (p1: mean of 0.5, 0.5)
    assert (seal_vs_base["n"], seal_vs_base["mean"], seal_vs_base["a_better"]) == (4, mean, 4)
    [passage_vs_base] = [d for d in summary["comparisons"] if d["a"] == "train on passage only"]
    assert passage_vs_base["n"] == 3  # p3 ungraded under passage only
    [edits_vs_passage] = [d for d in summary["comparisons"] if d["a"] == "passage + base model's self-edits"]
    want_mean, want_ci = R.mean_ci95([0.0, 0.0, 0.5])
    assert edits_vs_passage["mean"] == pytest.approx(want_mean) and edits_vs_passage["ci95"] == pytest.approx(want_ci)

    by_policy = {d["policy"]: d for d in summary["degeneration"]}
    assert by_policy["base"]["empty"] == 0.5 and by_policy["base"]["repetitive"] == 0.0
    assert by_policy["seal_round1"]["empty"] == 0.25 and by_policy["seal_round1"]["repetitive"] == 0.25
    assert summary["length_unit"] == "words"  # no tokenizer saved in the fake run
    assert by_policy["seal_round1"]["at_cap"] == 0.25  # the 72-word loop, cap 12
    assert summary["selected"][0]["not_above_baseline"] == 1

    # Binned by sequences trained (the resumed p1 rep replaces its failure); SEAL re-weighted onto the
    # base rows' bins: 2-3 holds 3 SEAL candidates (base: 0.5), 16+ one (base: 0.0), 4-7 none of base's.
    seal_bins = summary["by_sequences"]["seal_round1"]
    assert seal_bins["2-3"] == {"n": 3, "reward": pytest.approx(2.0 / 3)}
    assert seal_bins["4-7"]["n"] == 1 and seal_bins["16+"]["n"] == 1 and "0-1" not in seal_bins
    assert summary["by_sequences"]["passage only"]["0-1"]["n"] == 3  # p3 ungraded
    [matched] = summary["length_matched"]
    assert matched["matched"] == pytest.approx(0.375) and (matched["covered"], matched["n"]) == (4, 5)
    assert matched["actual"] == pytest.approx(0.7) and matched["base"] == pytest.approx(0.25)

    table = (out / "table.md").read_text()
    assert "| seal_round1 | — | 3: 66.7 | 1: 50.0 | — | 1: 100.0 |" in table
    assert "+12.5 of the +45.0 pp difference goes with the shift in length alone" in table
    assert "| SEAL round 1: its self-edits, adapting the round-1 policy | seal_round1 | 75.0 | 10.0 |" in table
    assert "SEAL round 1: its self-edits, adapting the round-1 policy did not differ detectably" not in table
    assert "beat passage + base model's self-edits: +50.0 pp" in table
    assert "| E-step (train + answer + grade) | 40 |" in table  # the interrupted and the resumed part
    assert "over 2 session(s)" in table and "## CPT" in table
    for name in ("accuracy.png", "config_rest_em.json", "config_cpt.json", "records_sample_rest_em.jsonl",
                 "selected_self_edits_round0.json", "self_edit_samples.md", "timings_rest_em.jsonl"):
        assert (out / name).stat().st_size > 0, name
    assert "the cat sat on the mat" in (out / "self_edit_samples.md").read_text()


def test_report_refuses_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(SystemExit):
        _report_module().main(["--rest-em", str(tmp_path), "--out", str(tmp_path / "out")])


# The one-command script at a tiny size: 2 rounds of 2 passages x 2 self-edits, a 3-passage table with
# 2 samples per passage, CPT on 3 passages; the M-step shrunk to one step (the paper's SFT batch of 10
# costs minutes on a CPU for nothing here).
TINY = ["--config.data.n_eval=3", "--config.data.n_train=4", "--config.rest_em.passages_per_round=2",
        "--config.self_edit.k=2", "--config.rest_em.reps=1", "--config.self_edit.max_new_tokens=16",
        "--config.inner.epochs=1", "--config.table.self_edit_samples=2", "--config.cpt.n_passages=3",
        "--config.cpt.k_completions=2", "--config.cpt.epochs=1", "--config.eval.max_new_tokens=8",
        "--config.rest_em.sft.batch_size=2", "--config.rest_em.sft.microbatches=1",
        "--config.rest_em.sft.epochs=1",
        # float32 as the checkpoint: `paper`'s bf16 matmuls are emulated, and many times slower, on a CPU.
        "--config.param_dtype=float32", "--config.compute_dtype=float32"]


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_the_paper_script_stops_on_sigterm_resumes_and_reports(shared_dir, tmp_path):
    env = dict(os.environ, DATA_DIR=str(shared_dir / "data" / "squad"), RUN_ROOT=str(tmp_path / "runs"),
               RESULTS=str(tmp_path / "results"), ARCHIVE=str(tmp_path / "runs.tgz"), PYTHON=sys.executable,
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    command = ["bash", str(REPO / "bench" / "knowledge_paper.sh"), *TINY]
    # Stop it in the first table (as timeout(1) does: the whole process group), after its first phase.
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    timings_file = None
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline and proc.poll() is None:
        found = list((tmp_path / "runs" / "knowledge-paper-embedded").glob("*/timings.jsonl"))
        if found and len(found[0].read_text().splitlines()) >= 2:  # setup and the first table row done
            timings_file = found[0]
            break
        time.sleep(1)
    assert timings_file is not None, proc.communicate()[0][-3000:]
    os.killpg(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 130, out[-3000:]
    assert "ReST-EM stopped (exit 130)" in out and "abandoning" not in out
    assert "== paper_embedded_cpt" not in out  # the next step is not started after a stop

    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert "== paper_embedded: resuming" in done.stdout
    run = timings_file.parent
    state = json.loads((run / "results.json").read_text())
    assert state["round"] == 2
    assert {(r["model"], r["condition"]) for r in state["table"]} == {
        ("base", "base"), ("base", "passage_only"), ("base", "self_edits"), ("seal_round1", "base"),
        ("seal_round1", "self_edits"), ("seal_round2", "base"), ("seal_round2", "self_edits")}
    keys = [(r["phase"], r["context_id"], r["edit_index"], r["rep"])
            for r in map(json.loads, (run / "records.jsonl").read_text().splitlines())]
    assert len(keys) == len(set(keys))  # nothing scored twice across the stop
    sessions = {json.loads(line)["session"] for line in timings_file.read_text().splitlines()}
    assert len(sessions) == 2
    table = (tmp_path / "results" / "table.md").read_text()
    assert "SEAL round 2" in table and "## CPT" in table and "over 2 session(s)" in table
    import tarfile
    with tarfile.open(tmp_path / "runs.tgz") as archive:
        names = archive.getnames()
    assert any(n.endswith("records.jsonl") for n in names) and not any("checkpoints" in n for n in names)
