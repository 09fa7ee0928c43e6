"""Batched edit-evaluation studies: how good are these self-edits, from whatever source they come?

Input: many self-edits per context, each tagged with a `source` (a model, a person, a file) and a
`style` (the prompt that produced it). Every edit is trained and evaluated `reps` times (own seeds)
through the same E-step as a round (`seal_jax.estep.score_self_edits`: K candidates per call,
records appended as they finish, so an interrupted study resumes), next to the un-adapted model on
the same contexts.

Output, in the run directory:
* `study_edits.json` (written before scoring): which (context, edit index) is which source / style;
* `records.jsonl`: one record per candidate (phase "study"), i.e. per-edit, per-rep rewards;
* `results.json` / `results.md`: per edit its mean reward over reps, and a table with one row per
  (source, style): mean over contexts of the per-context mean edit reward with its 95% interval
  (contexts are the independent units; edits of one context are not), the mean over all edits, the
  best-edit-per-context mean (the best-of-k oracle the round selects by), failures and ungraded.
"""
from __future__ import annotations

import dataclasses
import json
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np

from seal_jax import results as R
from seal_jax.estep import EditOutcome, score_self_edits
from seal_jax.rest_em import baseline_scores, check_graded

if TYPE_CHECKING:
    from seal_jax.experiment import Experiment

PHASE = "study"


@dataclasses.dataclass(frozen=True)
class StudyEdit:
    context: Any
    self_edit: str
    source: str
    style: str = "default"


def run_study(exp: "Experiment", edits: Sequence[StudyEdit], *, reps: int, seed: int) -> dict:
    """Train and evaluate every edit `reps` times; write the per-edit rewards and the table."""
    if not edits:
        raise ValueError("the study has no self-edits")
    domain = exp.domain
    next_index: dict[str, int] = {}
    items, manifest = [], []
    for e in edits:  # edit_index numbers a context's edits over all sources (records are keyed by it)
        cid = domain.context_id(e.context)
        index = next_index.get(cid, 0)
        next_index[cid] = index + 1
        items.append((e.context, index, e.self_edit))
        manifest.append({"context_id": cid, "edit_index": index, "source": e.source, "style": e.style})
    _write_manifest(exp, manifest)

    contexts = list({domain.context_id(e.context): e.context for e in edits}.values())
    baseline = baseline_scores(exp, contexts, PHASE)
    outcomes = score_self_edits(exp.engine, domain, items, reps=reps, seed=seed, phase=PHASE,
                                done=exp.done_records(), on_record=exp.records.append,
                                progress=exp.progress)
    check_graded(outcomes, "study")
    per_edit = [dict(m, reward=o.reward, rep_rewards=o.rep_rewards, failure=o.failure,
                     ungraded_reps=o.ungraded) for m, o in zip(manifest, outcomes)]
    rows = [base_row(baseline, len(contexts))] + group_rows(outcomes, manifest)
    out = {"contexts": len(contexts), "edits": len(edits), "reps": reps, "rows": rows,
           "per_edit": per_edit, "baseline": baseline}
    R.write_json(exp.run_dir / "results.json", out)
    (exp.run_dir / "results.md").write_text(study_markdown(exp.domain.name, out))
    return out


def _write_manifest(exp: "Experiment", manifest: list[dict]) -> None:
    path = exp.run_dir / "study_edits.json"
    if path.exists() and json.loads(path.read_text()) != manifest:
        raise ValueError(f"{path} lists other self-edits than this study: resume with the same files "
                         "and limits, or start a new run")
    R.write_json(path, manifest)


def base_row(baseline: dict[str, float], n_contexts: int) -> dict:
    mean, ci = R.mean_ci95(list(baseline.values()))
    return {"source": "base (no adaptation)", "style": "", "contexts": n_contexts, "edits": 0,
            "reward": mean, "ci95": ci, "edit_mean": float("nan"), "best_edit_mean": float("nan"),
            "failed": 0, "ungraded": n_contexts - len(baseline)}


def group_rows(outcomes: Sequence[EditOutcome], manifest: Sequence[dict]) -> list[dict]:
    groups: dict[tuple[str, str], list[EditOutcome]] = {}
    for o, m in zip(outcomes, manifest):
        groups.setdefault((m["source"], m["style"]), []).append(o)
    return [group_row(source, style, group) for (source, style), group in groups.items()]


def group_row(source: str, style: str, outcomes: Sequence[EditOutcome]) -> dict:
    by_context: dict[str, list[float]] = {}
    for o in outcomes:
        if o.reward is not None:
            by_context.setdefault(o.context_id, []).append(o.reward)
    mean, ci = R.mean_ci95([float(np.mean(v)) for v in by_context.values()])
    graded = [o.reward for o in outcomes if o.reward is not None]
    return {"source": source, "style": style, "contexts": len({o.context_id for o in outcomes}),
            "edits": len(outcomes), "reward": mean, "ci95": ci,
            "edit_mean": float(np.mean(graded)) if graded else float("nan"),
            "best_edit_mean": _mean_or_nan([max(v) for v in by_context.values()]),
            "failed": sum(o.failure is not None for o in outcomes),
            "ungraded": sum(o.reward is None and o.failure is None for o in outcomes)}


def _mean_or_nan(values: Sequence[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def study_markdown(domain_name: str, out: dict, title: Optional[str] = None) -> str:
    lines = [f"# {title or f'Self-edit study ({domain_name})'}", "",
             f"{out['edits']} self-edits on {out['contexts']} contexts, {out['reps']} fine-tunes each. "
             "reward = mean over contexts of the mean edit reward (± 95% interval over contexts); "
             "all edits = mean over edits; best edit = mean over contexts of the best edit's reward; "
             "ungraded edits (the grader could not judge) are left out and counted.", "",
             R.markdown_table(["source", "style", "contexts", "edits", "reward", "±95%", "all edits",
                               "best edit", "failed", "ungraded"],
                              [[r["source"], r["style"], r["contexts"], r["edits"], r["reward"], r["ci95"],
                                r["edit_mean"], r["best_edit_mean"], r["failed"], r["ungraded"]]
                               for r in out["rows"]])]
    return "\n".join(lines) + "\n"
