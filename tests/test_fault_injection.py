"""Fault injection: a tiny ReST-EM round through the real CLI, killed at every stage and resumed, ends
byte-identical to an uninterrupted run, with no candidate redone or lost; SIGINT exits 130, resumable.

One chain of runs on one run folder, each resumed from where the previous one died:
  SIGKILL after sampling (before the self-edits are saved) -> SIGKILL halfway through writing the
  first chunk's record -> SIGKILL after the second chunk's evaluation -> SIGKILL entering that
  chunk's inner loop -> SIGINT during its training (exit 130, the chunk is recorded) -> SIGKILL
  after the M-step -> SIGKILL between orbax writing the checkpoint and renaming it -> done.
The stop points are wrapped from outside by tests/fault_child.py; seal_jax has no test hooks.
"""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from tiny_world import write_tiny_model_dir

REPO = pathlib.Path(__file__).resolve().parents[1]
CHILD = REPO / "tests" / "fault_child.py"
RESULT_FILES = ("results.json", "records.jsonl", "self_edits_round0.json", "sft_round0.json",
                "baseline_round0_train.json", "baseline_base.json", "baseline_seal_round1.json")


def tiny_round_args(model_dir, run_root) -> list[str]:
    """One round, 2 passages x k=2 edits, K=2 per call (two E-step chunks), an M-step, base table."""
    return [
        f"--config={REPO / 'configs' / 'knowledge.py'}:demo", f"--config.model={model_dir}",
        f"--config.run_root={run_root}", "--config.progress=False",
        "--config.data.n_train=2", "--config.data.n_eval=1", "--config.self_edit.k=2",
        "--config.self_edit.max_new_tokens=8", "--config.self_edit.max_sequence_tokens=400",
        "--config.eval.max_new_tokens=4", "--config.candidates_per_call=2",
        "--config.lora.rank=4", "--config.lora.alpha=8.0", "--config.lora.targets=('q','v')",
        "--config.inner.epochs=1", "--config.inner.length_buckets=(512,1024,2048)",
        "--config.inner.steps_per_chunk=8", "--config.rest_em.rounds=1",
        "--config.rest_em.passages_per_round=2", "--config.rest_em.sft.rank=4",
        "--config.rest_em.sft.alpha=8.0", "--config.rest_em.sft.targets=('q','v')",
        "--config.rest_em.sft.batch_size=2", "--config.rest_em.sft.microbatches=1",
        "--config.rest_em.sft.epochs=1", "--config.table.conditions=('base',)",
        "--config.table.round_conditions=('base',)",
    ]


def run_child(point, nth, args, timeout=300):
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'tests'}", TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("SEAL_DEBUG", None)
    proc = subprocess.run([sys.executable, str(CHILD), point, str(nth), *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=REPO)
    return proc.returncode, proc.stdout, proc.stderr


def only_run_dir(run_root: pathlib.Path) -> pathlib.Path:
    runs = [p for p in (run_root / "knowledge-demo").iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


def candidate_keys(run_dir):
    records = [json.loads(line) for line in (run_dir / "records.jsonl").read_text().splitlines()]
    return [(r["phase"], r["context_id"], r["edit_index"], r["rep"]) for r in records]


def final_policy(run_dir, model_dir):
    """The last round's policy: the base model with the checkpoint's adapters merged in."""
    import jax

    from seal_jax.checkpoints import RunCheckpointer
    from seal_jax.model.loading import load_model

    cfg, base, _ = load_model(model_dir)
    ckpt = RunCheckpointer(run_dir / "checkpoints")
    assert ckpt.holds_policy_history(), "a LoRA M-step's round checkpoint stores adapters"
    params, history, _ = ckpt.restore_policy(base, cfg)
    assert len(history) == 1
    return [np.asarray(x) for x in jax.tree.leaves(params)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_model_dir(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="module")
def reference_run(model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    rc, out, err = run_child("none", 0, tiny_round_args(model_dir, root))
    assert rc == 0, err[-3000:]
    return only_run_dir(root)


CHAIN = [  # (point, n-th event, expected exit)
    ("sample", 1, -9),
    ("record", 1, -9),  # chunk 1 half recorded: redone next
    ("evaluate", 2, -9),  # chunk 1 recorded, chunk 2 trained and evaluated, not recorded
    ("train", 1, -9),  # chunk 2's inner loop
    ("sigint_train", 1, 130),  # chunk 2 trained, evaluated, recorded, then the stop
    ("m_step", 1, -9),
    ("checkpoint", 1, -9),
    ("none", 0, 0),
]


@pytest.mark.slow
def test_killed_everywhere_and_resumed_equals_uninterrupted(model_dir, reference_run, tmp_path):
    ref_keys = candidate_keys(reference_run)
    assert len(ref_keys) == 4 and len(set(ref_keys)) == 4  # 2 passages x 2 edits, each once
    ref_sft = json.loads((reference_run / "sft_round0.json").read_text())
    assert ref_sft, "the round must select self-edits so that the M-step runs"

    args = tiny_round_args(model_dir, tmp_path)
    run_dir = None
    for point, nth, expected in CHAIN:
        resume = [f"--config.resume={run_dir}"] if run_dir else []
        rc, out, err = run_child(point, nth, args + resume)
        assert rc == expected, (point, rc, err[-3000:])
        run_dir = run_dir or only_run_dir(tmp_path)
        if point == "sigint_train":
            assert "interrupted: stopped by SIGINT after round0/score" in err
            assert f"--config.resume={run_dir}" in err and "Traceback" not in err
        if point == "record":  # half a record is on disk, to be cut off by the next run
            assert not (run_dir / "records.jsonl").read_bytes().endswith(b"\n")

    keys = candidate_keys(run_dir)
    assert sorted(keys) == sorted(ref_keys) and len(keys) == len(set(keys)), "a candidate was redone or lost"
    for name in RESULT_FILES:
        assert (run_dir / name).read_bytes() == (reference_run / name).read_bytes(), name
    want_policy = final_policy(reference_run, model_dir)
    for got, want in zip(final_policy(run_dir, model_dir), want_policy, strict=True):
        np.testing.assert_array_equal(got, want)
    assert not list(run_dir.rglob("*.tmp")) and not list((run_dir / "checkpoints").glob("*tmp*"))


@pytest.mark.slow
def test_same_seed_twice_gives_byte_identical_results(model_dir, reference_run, tmp_path):
    rc, _, err = run_child("none", 0, tiny_round_args(model_dir, tmp_path))
    assert rc == 0, err[-3000:]
    again = only_run_dir(tmp_path)
    for name in RESULT_FILES:
        assert (again / name).read_bytes() == (reference_run / name).read_bytes(), name
