"""The paper's knowledge-incorporation settings, each one function over an `Experiment`.

* `rest_em`: for each round, sample k self-edits per training passage with the current policy, reward
  each by the adapted model's accuracy (mean over `reps` fine-tunes), keep the best per passage, SFT
  the policy on (prompt, best edit) and merge; the single-passage table is computed before the first
  round and after every round. Every round's policy is checkpointed with orbax, every candidate is
  appended to `records.jsonl` as soon as it is scored, and sampled self-edits are saved before they are
  scored, so `--config.resume=<run dir>` continues where an interrupted run stopped.
* `single_passage`: only the table (base, passage only, self-edits of the current model, self-edits
  from a file).
* `cpt`: one adapter on the self-edits of many passages, pooled accuracy (reference §2.1).
* `continual`: sequential self-edits merged one after another, and the forgetting matrix (§2.2).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import pathlib
from typing import Any, Optional, Sequence

import jax
import numpy as np

from seal_jax import results as R
from seal_jax.checkpoints import RecordLog, RunCheckpointer
from seal_jax.lora import merge_lora
from seal_jax.runner import Engine, EditOutcome, evaluate_contexts, score_self_edits, select_best
from seal_jax.sampling import SamplingParams
from seal_jax.tasks.base import CandidateSpec
from seal_jax.tasks.knowledge.data import Passage
from seal_jax.tasks.knowledge.domain import KnowledgeDomain
from seal_jax.tasks.knowledge.sequences import first_usable_self_edit

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Experiment:
    """Everything a knowledge experiment needs, built once by `seal_jax.tasks.knowledge.setup`."""

    config: Any  # ml_collections.ConfigDict
    engine: Engine
    domain: KnowledgeDomain
    train_passages: list[Passage]
    eval_passages: list[Passage]
    run_dir: pathlib.Path
    records: RecordLog
    checkpointer: RunCheckpointer
    file_self_edits: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    policy_sft: Any = None  # callable(engine, examples) -> metrics; updates engine.params

    def done_records(self) -> dict[tuple, dict]:
        """Records already written (resume): keyed like `score_self_edits` expects."""
        return {(r["phase"], r["context_id"], r["edit_index"], r["rep"]): r
                for r in self.records.read() if "edit_index" in r}

    def progress(self) -> bool:
        return bool(self.config.progress)


# ------------------------------------------------------------------------------------------------
# Self-edit sampling (saved before scoring, so a resumed run scores the same edits)


def sample_self_edits(exp: Experiment, passages: Sequence[Passage], k: int, tag: str,
                      seed: int) -> list[list[str]]:
    path = exp.run_dir / f"self_edits_{tag}.json"
    if path.exists():
        saved = json.loads(path.read_text())
        if [p.id for p in passages] == saved["passage_ids"] and saved["k"] == k:
            return saved["self_edits"]
    c = exp.config.self_edit
    sampling = SamplingParams(temperature=float(c.temperature), top_p=float(c.top_p),
                              max_new_tokens=int(c.max_new_tokens), seed=int(seed),
                              stop_ids=tuple(exp.engine.tokenizer.stop_ids))
    prompts = [exp.domain.self_edit_prompt(p) for p in passages for _ in range(k)]
    log.info("sampling %d self-edits (%s)", len(prompts), tag)
    texts = exp.engine.sample(prompts, sampling)
    edits = [texts[i * k:(i + 1) * k] for i in range(len(passages))]
    R.write_json(path, {"passage_ids": [p.id for p in passages], "k": k, "self_edits": edits,
                        "prompts": [exp.domain.self_edit_prompt_text(p) for p in passages]})
    return edits


def baseline_scores(exp: Experiment, passages: Sequence[Passage], tag: str) -> dict[str, float]:
    """No-adaptation accuracy per passage: computed once per passage and model version, cached."""
    path = exp.run_dir / f"baseline_{tag}.json"
    if path.exists():
        return json.loads(path.read_text())["accuracy"]
    scorable = [p for p in passages if p.has_questions]
    scores = evaluate_contexts(exp.engine, exp.domain, scorable)
    acc = {p.id: s.reward for p, s in zip(scorable, scores)}
    R.write_json(path, {"accuracy": acc, "details": {p.id: s.details for p, s in zip(scorable, scores)}})
    return acc


# ------------------------------------------------------------------------------------------------
# The single-passage table


def table_condition(exp: Experiment, condition: str, label: str, seed: int) -> dict:
    """One row of the table on the held-out passages: accuracy (mean over passages), CI, pooled."""
    passages = exp.eval_passages
    reps = int(exp.config.eval.reps)
    phase = f"table/{label}/{condition}"
    if condition == "base":
        base = baseline_scores(exp, passages, label)
        per_passage = [base[p.id] for p in passages if p.id in base]
        return _row(condition, label, per_passage, passages, failures=0)
    if condition == "passage_only":
        items = [(p, 0, "") for p in passages]
        outcomes = score_self_edits(exp.engine, exp.domain, items, reps=reps, seed=seed, phase=phase,
                                    done=exp.done_records(), on_record=exp.records.append,
                                    build=lambda ctx, _text: exp.domain.passage_only_candidate(ctx),
                                    progress=exp.progress())
    elif condition in ("self_edits", "file"):
        # The first usable of the samples (table.fallback_rule; the reference: first non-empty).
        samples = int(exp.config.table.get("self_edit_samples", 1))
        if condition == "file":
            edits = [exp.file_self_edits.get(p.id, [""]) for p in passages]
        else:
            edits = sample_self_edits(exp, passages, samples, f"{label}_eval", seed)
        rule = exp.config.table.get("fallback_rule", "usable")
        chosen = [first_usable_self_edit(e, rule) or 0 for e in edits]
        items = [(p, i, e[i] if e else "") for p, i, e in zip(passages, chosen, edits)]
        outcomes = score_self_edits(exp.engine, exp.domain, items, reps=reps, seed=seed, phase=phase,
                                    done=exp.done_records(), on_record=exp.records.append,
                                    progress=exp.progress())
    else:
        raise ValueError(f"unknown table condition {condition!r}")
    per_passage = [o.reward for o in outcomes]
    failures = sum(o.failure is not None for o in outcomes)
    return _row(condition, label, per_passage, passages, failures)


def _row(condition: str, label: str, per_passage: Sequence[float], passages: Sequence[Passage],
         failures: int) -> dict:
    mean, ci = R.mean_ci95(per_passage)
    n_questions = [len(p.questions) for p in passages]
    pooled = (float(np.dot(per_passage, n_questions[:len(per_passage)]) / max(1, sum(n_questions)))
              if per_passage else float("nan"))
    return {"model": label, "condition": condition, "accuracy": mean, "ci95": ci, "pooled": pooled,
            "passages": len(passages), "questions": int(sum(n_questions)), "failed_candidates": failures}


def single_passage_table(exp: Experiment, label: str, seed: int,
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
# ReST-EM


def rest_em(exp: Experiment) -> dict:
    c = exp.config
    ckpt = exp.checkpointer
    state = {"round": 0, "table": [], "rounds": []}
    latest = ckpt.latest_step()
    if latest is not None:  # resume: restore the policy of the last completed round
        params, meta = ckpt.restore(latest, target=exp.engine.params)
        exp.engine.params = params
        state = meta["state"]
        log.info("resumed after round %d from %s", state["round"], ckpt.directory)

    if not any(row["model"] == "base" for row in state["table"]):
        state["table"] += single_passage_table(exp, "base", c.seed)
        _write_rest_em_results(exp, state)

    per_round = int(c.rest_em.passages_per_round)
    for r in range(state["round"], int(c.rest_em.rounds)):
        passages = _round_passages(exp.train_passages, r, per_round)
        tag = f"round{r}"
        baseline = baseline_scores(exp, passages, f"{tag}_train")
        edits = sample_self_edits(exp, passages, int(c.self_edit.k), tag, seed=c.seed + 1000 * (r + 1))
        items = [(p, i, e) for p, es in zip(passages, edits) for i, e in enumerate(es)]
        outcomes = score_self_edits(exp.engine, exp.domain, items, reps=int(c.rest_em.reps),
                                    seed=c.seed + r, phase=f"{tag}/score", done=exp.done_records(),
                                    on_record=exp.records.append, progress=exp.progress())
        chosen = select_best(outcomes, baseline, require_improvement=bool(c.rest_em.require_improvement))
        by_id = {p.id: p for p in passages}
        examples = [(*exp.domain.sft_example(by_id[o.context_id], o.self_edit), 1.0) for o in chosen]
        R.write_json(exp.run_dir / f"sft_{tag}.json",
                     [{"context_id": o.context_id, "edit_index": o.edit_index, "reward": o.reward,
                       "baseline": baseline.get(o.context_id), "completion": o.self_edit}
                      for o in chosen])
        sft_metrics = exp.policy_sft(exp.engine, examples) if examples else {"skipped": "no examples"}
        rewards = [o.reward for o in outcomes]
        summary = {
            "round": r, "passages": len(passages), "self_edits": len(outcomes),
            "baseline_mean": float(np.mean(list(baseline.values()))) if baseline else float("nan"),
            "reward_mean": float(np.mean(rewards)) if rewards else float("nan"),
            "best_of_k_mean": float(np.mean([o.reward for o in chosen])) if chosen else float("nan"),
            "failed_self_edits": sum(o.failure is not None for o in outcomes),
            "selected": len(chosen), "sft": sft_metrics,
        }
        state["rounds"].append(summary)
        state["table"] += single_passage_table(exp, f"seal_round{r + 1}", c.seed + 100 * (r + 1),
                                               conditions=c.table.round_conditions)
        state["round"] = r + 1
        ckpt.save(r + 1, exp.engine.params, {"state": _json_safe(state)})
        _write_rest_em_results(exp, state)
    return state


def _round_passages(passages: Sequence[Passage], r: int, n: int) -> list[Passage]:
    """Fresh passages each round (the reference's round 2 uses 50 new passages); wraps if too few."""
    if not passages:
        raise ValueError("no training passages: raise data.n_train")
    return [passages[(r * n + i) % len(passages)] for i in range(min(n, len(passages)))]


def _json_safe(obj):
    return json.loads(json.dumps(R._jsonable(obj)))


def _write_rest_em_results(exp: Experiment, state: dict) -> None:
    R.write_json(exp.run_dir / "results.json", state)
    table = state["table"]
    md = [f"# Knowledge incorporation: {exp.config.run_name}", "",
          f"Model `{exp.config.model}`, grader `{exp.config.grader.kind}`, "
          f"{len(exp.eval_passages)} held-out passages / "
          f"{sum(len(p.questions) for p in exp.eval_passages)} questions; accuracy = mean over passages "
          f"of per-passage accuracy (± half-width of a 95% Student-t interval over passages), pooled = "
          f"over all questions.", "",
          R.markdown_table(["model", "condition", "accuracy", R.CI95_LABEL, "pooled", "failed"],
                           [[r["model"], r["condition"], r["accuracy"], r["ci95"], r["pooled"],
                             r["failed_candidates"]] for r in table])]
    if state["rounds"]:
        md += ["", "## ReST-EM rounds (training passages)", "",
               R.markdown_table(["round", "passages", "self-edits", "baseline", "mean reward",
                                 "best-of-k", "failed", "selected"],
                                [[s["round"], s["passages"], s["self_edits"], s["baseline_mean"],
                                  s["reward_mean"], s["best_of_k_mean"], s["failed_self_edits"],
                                  s["selected"]] for s in state["rounds"]])]
    (exp.run_dir / "results.md").write_text("\n".join(md) + "\n")
    labels = [r["model"] for r in table if r["condition"] == "self_edits"]
    if labels:
        series = {cond: [next((r["accuracy"] for r in table if r["model"] == m and r["condition"] == cond),
                              float("nan")) for m in labels]
                  for cond in ("base", "passage_only", "self_edits")}
        R.plot_rewards_per_round(exp.run_dir / "reward_per_round.png", list(range(len(labels))), series)


# ------------------------------------------------------------------------------------------------
# CPT: one adapter over many passages


def cpt(exp: Experiment) -> dict:
    c = exp.config
    passages = [p for p in exp.eval_passages[:int(c.cpt.n_passages)] if p.has_questions]
    k = int(c.cpt.k_completions)
    if exp.file_self_edits:
        edits = [[e for e in exp.file_self_edits.get(p.id, []) if e.strip()][:k] for p in passages]
    else:
        edits = sample_self_edits(exp, passages, k, "cpt", seed=c.seed)
    inner_cfg = dataclasses.replace(exp.engine.settings.inner, epochs=int(c.cpt.epochs),
                                    learning_rate=float(c.cpt.learning_rate),
                                    batch_size=int(c.cpt.batch_size))
    rows, details = [], {}
    baseline = baseline_scores(exp, passages, "cpt")
    n_q = sum(len(p.questions) for p in passages)
    pooled_base = sum(baseline[p.id] * len(p.questions) for p in passages) / max(1, n_q)
    rows.append({"condition": "base", "pooled_accuracy": pooled_base, "sequences": 0})
    for condition, per_passage_edits in (("passage_only", [[""] for _ in passages]),
                                         ("self_edits", edits)):
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
        result = exp.engine.train([corpus], [c.seed], inner_cfg=inner_cfg)
        if result.failed[0]:
            rows.append({"condition": condition, "pooled_accuracy": 0.0, "sequences": len(sequences),
                         "failed": result.failure_reason[0]})
            continue
        scores = evaluate_contexts(exp.engine, exp.domain, passages, lora=result.lora,
                                   adapter_index=[0] * len(passages))
        correct = sum(s.reward * len(p.questions) for s, p in zip(scores, passages))
        rows.append({"condition": condition, "pooled_accuracy": correct / max(1, n_q),
                     "sequences": len(sequences), "failed_self_edits": failures,
                     "steps": int(result.steps[0])})
        details[condition] = {p.id: s.details for p, s in zip(passages, scores)}
    out = {"passages": len(passages), "questions": n_q, "rows": rows}
    R.write_json(exp.run_dir / "results.json", dict(out, details=details))
    md = [f"# CPT: one adapter on {len(passages)} passages ({n_q} questions), pooled accuracy", "",
          R.markdown_table(["condition", "pooled accuracy", "sequences"],
                           [[r["condition"], r["pooled_accuracy"], r["sequences"]] for r in rows])]
    (exp.run_dir / "results.md").write_text("\n".join(md) + "\n")
    return out


# ------------------------------------------------------------------------------------------------
# Continual self-edits and the forgetting matrix


def continual(exp: Experiment) -> dict:
    c = exp.config
    n_seq, n_data = int(c.continual.n_sequences), int(c.continual.n_datapoints)
    pool = [p for p in exp.eval_passages if p.has_questions]
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
        matrix[0] = [sc.reward for sc in base]
        for step, passage in enumerate(seq):
            edit = sample_self_edits(exp, [passage], 1, f"continual_s{s}_k{step}", seed=c.seed + step)[0][0]
            spec = exp.domain.build_candidate(passage, edit)
            if not isinstance(spec, CandidateSpec):  # reference: an empty edit falls back to the passage
                spec = exp.domain.passage_only_candidate(passage)
            result = exp.engine.train([spec], [c.seed + 7919 * s + step])
            if result.failed[0]:
                exp.records.append({"phase": f"continual/s{s}/k{step}", "failed": True,
                                    "reason": result.failure_reason[0]})
                matrix[step + 1, :step + 1] = [sc.reward for sc in
                                               evaluate_contexts(exp.engine, exp.domain, seq[:step + 1])]
                continue
            scores = evaluate_contexts(exp.engine, exp.domain, seq[:step + 1], lora=result.lora,
                                       adapter_index=[0] * (step + 1))
            matrix[step + 1, :step + 1] = [sc.reward for sc in scores]
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
