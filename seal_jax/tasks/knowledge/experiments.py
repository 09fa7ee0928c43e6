"""The paper's knowledge-incorporation settings, each one function over a `KnowledgeExperiment`.

* `rest_em`: the engine's round (`seal_jax.rest_em.run_rounds`) on the training passages, with the
  single-passage table as the round's evaluation hook (before the first round and after every round)
  and the knowledge report (`results.md`, reward-per-round plot).
* `single_passage`: only the table (base, passage only, self-edits of the current model, self-edits
  from a file).
* `cpt`: one adapter on the self-edits of many passages, pooled accuracy (reference §2.1).
* `continual`: sequential self-edits merged one after another, and the forgetting matrix (§2.2).
* `study`: every self-edit of a file (many per passage, any source) trained and evaluated with reps;
  per-edit rewards in the records and a table per source / prompt style (`seal_jax.study`).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
from typing import Optional, Sequence

import jax
import numpy as np

from seal_jax import interrupt, timings
from seal_jax import results as R
from seal_jax import rest_em as round_lib
from seal_jax.domain import CandidateSpec
from seal_jax.engine import evaluate_contexts
from seal_jax.estep import score_self_edits
from seal_jax.experiment import Experiment
from seal_jax.lora import merge_lora
from seal_jax.rest_em import baseline_scores, sample_self_edits
from seal_jax.study import StudyEdit, run_study
from seal_jax.tasks.knowledge import data as D
from seal_jax.tasks.knowledge.data import Passage
from seal_jax.tasks.knowledge.sequences import first_usable_self_edit

log = logging.getLogger(__name__)


@dataclasses.dataclass
class KnowledgeExperiment(Experiment):
    """An `Experiment` whose contexts are passages, plus self-edits read from a file."""

    file_self_edits: dict[str, list[str]] = dataclasses.field(default_factory=dict)


# ------------------------------------------------------------------------------------------------
# The single-passage table


def table_condition(exp: KnowledgeExperiment, condition: str, label: str, seed: int) -> dict:
    """One row of the table on the held-out passages: accuracy (mean over passages), CI, pooled."""
    passages = exp.eval_contexts
    reps = int(exp.config.eval.reps)
    phase = f"table/{label}/{condition}"  # the records' phase; timings split it into sample / score
    if condition == "base":
        with timings.phase(exp.run_dir, phase):
            base = baseline_scores(exp, passages, label)
        scorable = [p for p in passages if p.has_questions]
        return _row(condition, label, [base.get(p.id) for p in scorable], scorable, passages, failures=0)
    if condition == "passage_only":
        items = [(p, 0, "") for p in passages]
        with timings.phase(exp.run_dir, f"{phase}/score"):
            outcomes = score_self_edits(exp.engine, exp.domain, items, reps=reps, seed=seed, phase=phase,
                                        done=exp.done_records(), on_record=exp.records.append,
                                        build=lambda ctx, _text: exp.domain.passage_only_candidate(ctx),
                                        progress=exp.progress)
    elif condition in ("self_edits", "file"):
        # The first usable of the samples (table.fallback_rule; the reference: first non-empty).
        samples = int(exp.config.table.get("self_edit_samples", 1))
        rule = exp.config.table.get("fallback_rule", "usable")
        if condition == "file":
            edits = [exp.file_self_edits.get(p.id, [""]) for p in passages]
        else:
            # Only the first usable sample is scored: the later ones are sampled only for passages
            # that need them (the same texts and choice as sampling all, at ~1/k of the decoding).
            until = None if exp.config.table.get("sample_all", False) else (
                lambda e: first_usable_self_edit(e, rule) is not None)
            with timings.phase(exp.run_dir, f"{phase}/sample"):
                edits = sample_self_edits(exp, passages, samples, f"{label}_eval", seed, until=until)
            interrupt.check(f"sampling the {label} table's self-edits (saved)")
        chosen = [first_usable_self_edit(e, rule) or 0 for e in edits]
        items = [(p, i, e[i] if e else "") for p, i, e in zip(passages, chosen, edits)]
        with timings.phase(exp.run_dir, f"{phase}/score"):
            outcomes = score_self_edits(exp.engine, exp.domain, items, reps=reps, seed=seed, phase=phase,
                                        done=exp.done_records(), on_record=exp.records.append,
                                        progress=exp.progress)
    else:
        raise ValueError(f"unknown table condition {condition!r}")
    failures = sum(o.failure is not None for o in outcomes)
    return _row(condition, label, [o.reward for o in outcomes], passages, passages, failures)


def _row(condition: str, label: str, rewards: Sequence[Optional[float]], scored: Sequence[Passage],
         passages: Sequence[Passage], failures: int) -> dict:
    """rewards[i] is passage scored[i]'s accuracy, or None when it could not be graded (left out)."""
    graded = [(r, len(p.questions)) for r, p in zip(rewards, scored) if r is not None]
    mean, ci = R.mean_ci95([r for r, _ in graded])
    n_questions = [len(p.questions) for p in passages]
    pooled = (float(np.dot(*zip(*graded)) / max(1, sum(n for _, n in graded)))
              if graded else float("nan"))
    return {"model": label, "condition": condition, "accuracy": mean, "ci95": ci, "pooled": pooled,
            "passages": len(passages), "questions": int(sum(n_questions)), "failed_candidates": failures,
            "ungraded_passages": len(scored) - len(graded)}


def single_passage_table(exp: KnowledgeExperiment, label: str, seed: int,
                         conditions: Optional[Sequence[str]] = None) -> list[dict]:
    conditions = list(exp.config.table.conditions if conditions is None else conditions)
    if exp.file_self_edits and "file" not in conditions:
        conditions.append("file")
    rows = []
    for condition in conditions:
        row = table_condition(exp, condition, label, seed)
        log.info("table %s %s: %.3f", label, condition, row["accuracy"])
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------
# ReST-EM: the engine's round with the single-passage table as its evaluation


def table_after_round(exp: KnowledgeExperiment, index: int) -> list[dict]:
    """The round's evaluation hook: the full table before round 0, the SEAL rows after round index-1."""
    c = exp.config
    if index == 0:
        return single_passage_table(exp, "base", c.seed)
    return single_passage_table(exp, f"seal_round{index}", c.seed + 100 * index,
                                conditions=c.table.round_conditions)


def rest_em(exp: KnowledgeExperiment) -> dict:
    return round_lib.run_rounds(exp, round_lib.RoundHooks(evaluate=table_after_round,
                                                          write_results=write_table_results))


def table_only(exp: KnowledgeExperiment) -> dict:
    state = dict(round_lib.initial_state(), table=single_passage_table(exp, "model", exp.config.seed),
                 evaluated_start=True)
    write_table_results(exp, state)
    return state


def write_table_results(exp: KnowledgeExperiment, state: dict) -> None:
    R.write_json(exp.run_dir / "results.json", state)
    table = state["table"]
    md = [f"# Knowledge incorporation: {exp.config.run_name}", "",
          f"Model `{exp.config.model}`, grader `{exp.config.grader.kind}`, "
          f"{len(exp.eval_contexts)} held-out passages / "
          f"{sum(len(p.questions) for p in exp.eval_contexts)} questions; accuracy = mean over passages "
          f"of per-passage accuracy (± half-width of a 95% Student-t interval over passages), pooled = "
          f"over all questions; ungraded passages (the "
          f"grader could not judge) are left out and counted.", "",
          R.markdown_table(["model", "condition", "accuracy", R.CI95_LABEL, "pooled", "failed", "ungraded"],
                           [[r["model"], r["condition"], r["accuracy"], r["ci95"], r["pooled"],
                             r["failed_candidates"], r.get("ungraded_passages", 0)] for r in table])]
    md += round_lib.rounds_markdown(state)
    md += timings.markdown(timings.read(exp.run_dir))
    (exp.run_dir / "results.md").write_text("\n".join(md) + "\n")
    labels = [r["model"] for r in table if r["condition"] == "self_edits"]
    if labels:
        series = {cond: [next((r["accuracy"] for r in table if r["model"] == m and r["condition"] == cond),
                              float("nan")) for m in labels]
                  for cond in ("base", "passage_only", "self_edits")}
        R.plot_rewards_per_round(exp.run_dir / "reward_per_round.png", list(range(len(labels))), series)


# ------------------------------------------------------------------------------------------------
# CPT: one adapter over many passages


def cpt(exp: KnowledgeExperiment) -> dict:
    """Base, passage only and self-edits rows; each trained condition's row is saved as it finishes
    (`cpt_<condition>.json`), so a resumed run trains only the conditions still missing."""
    c = exp.config
    passages = [p for p in exp.eval_contexts[:int(c.cpt.n_passages)] if p.has_questions]
    k = int(c.cpt.k_completions)
    if exp.file_self_edits:
        edits = [[e for e in exp.file_self_edits.get(p.id, []) if e.strip()][:k] for p in passages]
    else:
        with timings.phase(exp.run_dir, "cpt/sample"):
            edits = sample_self_edits(exp, passages, k, "cpt", seed=c.seed)
        interrupt.check("sampling the CPT self-edits (saved)")
    inner_cfg = dataclasses.replace(exp.engine.settings.inner, epochs=int(c.cpt.epochs),
                                    learning_rate=float(c.cpt.learning_rate),
                                    batch_size=int(c.cpt.batch_size))
    rows, details = [], {}
    with timings.phase(exp.run_dir, "cpt/base"):
        baseline = baseline_scores(exp, passages, "cpt")
    n_q = sum(len(p.questions) for p in passages)
    rows.append(dict(_pooled([baseline.get(p.id) for p in passages], passages), condition="base",
                     sequences=0))
    for condition, per_passage_edits in (("passage_only", [[""] for _ in passages]),
                                         ("self_edits", edits)):
        saved = exp.run_dir / f"cpt_{condition}.json"
        if not saved.exists():
            R.write_json(saved, _cpt_condition(exp, condition, passages, per_passage_edits, inner_cfg))
            interrupt.check(f"CPT condition {condition} (saved)")
        done = json.loads(saved.read_text())
        rows.append(done["row"])
        details[condition] = done["details"]
    out = {"passages": len(passages), "questions": n_q, "rows": rows}
    R.write_json(exp.run_dir / "results.json", dict(out, details=details))
    md = [f"# CPT: one adapter on {len(passages)} passages ({n_q} questions)", "",
          "pooled = over all questions (the reference's CPT metric); accuracy = mean over passages of "
          "per-passage accuracy (± half-width of a 95% Student-t interval over passages).", "",
          R.markdown_table(["condition", "pooled accuracy", "accuracy", R.CI95_LABEL, "sequences", "steps",
                            "ungraded"],
                           [[r["condition"], r["pooled_accuracy"], r.get("accuracy", float("nan")),
                             r.get("ci95", float("nan")), r["sequences"], r.get("steps", 0),
                             r.get("ungraded_passages", 0)] for r in rows])]
    md += timings.markdown(timings.read(exp.run_dir))
    (exp.run_dir / "results.md").write_text("\n".join(md) + "\n")
    return out


def _cpt_condition(exp: KnowledgeExperiment, condition: str, passages: Sequence[Passage],
                   per_passage_edits: Sequence[Sequence[str]], inner_cfg) -> dict:
    """One adapter on the sequences of every passage's edits, asked every passage's questions."""
    sequences, masks, failures = [], [], 0
    for p, es in zip(passages, per_passage_edits):
        for e in es:
            spec = (exp.domain.passage_only_candidate(p) if condition == "passage_only"
                    else exp.domain.build_candidate(p, e))
            if isinstance(spec, CandidateSpec):
                sequences += spec.sequences
                masks += spec.loss_masks
            else:
                failures += 1
    corpus = CandidateSpec(sequences=sequences, loss_masks=masks)
    with timings.phase(exp.run_dir, f"cpt/{condition}/train"):
        result = exp.engine.train([corpus], [exp.config.seed], inner_cfg=inner_cfg)
    if result.failed[0]:
        return {"row": {"condition": condition, "pooled_accuracy": 0.0, "sequences": len(sequences),
                        "failed": result.failure_reason[0]}, "details": {}}
    with timings.phase(exp.run_dir, f"cpt/{condition}/eval"):
        scores = evaluate_contexts(exp.engine, exp.domain, passages, lora=result.lora,
                                   adapter_index=[0] * len(passages))
    return {"row": dict(_pooled([s.reward for s in scores], passages), condition=condition,
                        sequences=len(sequences), failed_self_edits=failures, steps=int(result.steps[0])),
            "details": {p.id: s.details for p, s in zip(passages, scores)}}


def _pooled(rewards: Sequence[Optional[float]], passages: Sequence[Passage]) -> dict:
    """Accuracy over all questions of the graded passages (ungraded passages left out, counted)."""
    graded = [(r, len(p.questions)) for r, p in zip(rewards, passages) if r is not None]
    n_q = sum(n for _, n in graded)
    mean, ci = R.mean_ci95([r for r, _ in graded])
    return {"pooled_accuracy": sum(r * n for r, n in graded) / max(1, n_q) if graded else float("nan"),
            "accuracy": mean, "ci95": ci, "ungraded_passages": len(passages) - len(graded)}


# ------------------------------------------------------------------------------------------------
# Continual self-edits and the forgetting matrix


def continual(exp: KnowledgeExperiment) -> dict:
    c = exp.config
    n_seq, n_data = int(c.continual.n_sequences), int(c.continual.n_datapoints)
    pool = [p for p in exp.eval_contexts if p.has_questions]
    if len(pool) < n_data:
        raise ValueError(f"continual needs {n_data} passages with questions, have {len(pool)}")
    start_params = exp.engine.params
    lora_cfg = exp.engine.settings.lora
    matrices = []
    for s in range(n_seq):
        rng = np.random.default_rng(c.seed + 42 + s)
        seq = [pool[i] for i in rng.choice(len(pool), size=n_data, replace=False)]
        exp.engine.params = start_params
        matrix = np.full((n_data + 1, n_data), np.nan)
        base = evaluate_contexts(exp.engine, exp.domain, seq)
        matrix[0] = [_nan_if_ungraded(sc) for sc in base]
        for step, passage in enumerate(seq):
            edit = sample_self_edits(exp, [passage], 1, f"continual_s{s}_k{step}", seed=c.seed + step)[0][0]
            spec = exp.domain.build_candidate(passage, edit)
            if not isinstance(spec, CandidateSpec):  # reference: an empty edit falls back to the passage
                spec = exp.domain.passage_only_candidate(passage)
            result = exp.engine.train([spec], [c.seed + 7919 * s + step])
            if result.failed[0]:
                exp.records.append({"phase": f"continual/s{s}/k{step}", "failed": True,
                                    "reason": result.failure_reason[0]})
                matrix[step + 1, :step + 1] = [_nan_if_ungraded(sc) for sc in
                                               evaluate_contexts(exp.engine, exp.domain, seq[:step + 1])]
                continue
            scores = evaluate_contexts(exp.engine, exp.domain, seq[:step + 1], lora=result.lora,
                                       adapter_index=[0] * (step + 1))
            matrix[step + 1, :step + 1] = [_nan_if_ungraded(sc) for sc in scores]
            exp.records.append({"phase": f"continual/s{s}/k{step}", "context_id": passage.id,
                                "self_edit": edit,  # NaN (not yet edited) -> null
                                "row": R._jsonable(matrix[step + 1])})
            single = jax.tree.map(lambda x: x[0], result.lora)
            exp.engine.params = merge_lora(exp.engine.params, single, exp.engine.cfg, lora_cfg)
        matrices.append(matrix)
    exp.engine.params = start_params
    stack = np.stack(matrices)
    mean = np.nanmean(stack, axis=0) if n_seq else stack
    std = np.nanstd(stack, axis=0, ddof=1) if n_seq > 1 else np.full_like(mean, np.nan)
    diag = [mean[k + 1, k] for k in range(n_data)]
    out = {"n_sequences": n_seq, "n_datapoints": n_data, "mean": mean, "std": std,
           "just_edited_mean": float(np.mean(diag)), "base_row_mean": float(np.mean(mean[0])),
           "final_row_mean": float(np.mean(mean[-1])), "matrices": stack}
    R.write_json(exp.run_dir / "results.json", out)
    R.plot_forgetting_heatmap(exp.run_dir / "forgetting.png", mean)
    rows = [[("base" if i == 0 else f"after {i}")] + [v for v in mean[i]] for i in range(n_data + 1)]
    md = [f"# Continual self-edits: {n_seq} sequences of {n_data} passages (accuracy; — = not yet edited)",
          "", R.markdown_table(["row"] + [f"d{i}" for i in range(n_data)], rows)]
    (exp.run_dir / "results.md").write_text("\n".join(md) + "\n")
    return out


def _nan_if_ungraded(score) -> float:
    return float("nan") if score.reward is None else score.reward


# ------------------------------------------------------------------------------------------------
# Edit-evaluation studies: every self-edit of one or more files, with reps


def study(exp: KnowledgeExperiment) -> dict:
    c = exp.config.study
    edits = load_study_edits(str(c.files), max_contexts=int(c.max_contexts),
                             max_edits=int(c.max_edits_per_context), style_field=str(c.style_field))
    return run_study(exp, edits, reps=int(c.reps), seed=int(exp.config.seed))


def load_study_edits(files: str, *, max_contexts: int = 0, max_edits: int = 0,
                     style_field: str = "style") -> list[StudyEdit]:
    """Self-edits from files of records {title, context, questions, completions[, style]}.

    `files`: comma-separated `path` or `name=path` (the source name; default: the file's stem). The
    passages come from the records themselves; `max_contexts` / `max_edits` (0 = all) keep the first
    passages of each file / the first completions of each record.
    """
    from seal_jax.config import ConfigError

    specs = [f.strip() for f in files.split(",") if f.strip()]
    if not specs:
        raise ConfigError("study.files is empty: give one or more self-edit files, e.g. "
                          "--config.study.files=qwen7b=../shared/data/squad/self_edits_qwen7b_train_iter0.json")
    edits = []
    for spec in specs:
        name, _, path = spec.rpartition("=")
        path = pathlib.Path(path)
        source = name or path.stem
        if not path.exists():
            raise ConfigError(f"study.files: file not found: {path}")
        try:
            records = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"study.files: {path} is not a UTF-8 JSON file ({e})") from None
        if not isinstance(records, list):
            raise ConfigError(f"study.files: {path}: expected a JSON list of records")
        if max_contexts:
            records = records[:max_contexts]
        passages = D.passages_from_records(records, source=str(path))
        for i, (rec, passage) in enumerate(zip(records, passages)):
            completions = rec.get("completions")
            if not isinstance(completions, list) or not all(isinstance(x, str) for x in completions):
                raise ConfigError(f"study.files: {path} record {i} has no list of string 'completions'")
            style = rec.get(style_field, "default")
            for text in completions[:max_edits or None]:
                edits.append(StudyEdit(context=passage, self_edit=text, source=source, style=str(style)))
    return edits
