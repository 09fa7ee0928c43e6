"""The SEAL outer loop (ReST-EM) for any domain: N rounds in one command, resumable.

One round r:
1. sample k self-edits per context with the current policy (`self_edits_round<r>.json`, written
   before anything is scored, so a resumed run scores the same edits);
2. E-step (`seal_jax.estep`): train K candidates per call, evaluate, reward; one record per candidate
   appended to `records.jsonl` as soon as it exists (a resumed round skips finished candidates);
3. selection, a policy chosen by config (`RoundConfig.selection`):
   * `best_of_k`: per context the highest-reward self-edit (the reference's rule; ties keep sampling
     order); with `require_improvement` only if it beats the un-adapted model on that context;
   * `all_successful`: every self-edit whose reward >= `success_threshold` (ARC's behaviour cloning
     keeps every configuration that solved its task);
   failed and ungraded self-edits are never selected;
4. M-step: `exp.m_step(params, examples) -> sft.PolicyUpdate` on (prompt, selected self-edit);
   the round installs the new params as the policy and appends the adapter the M-step merged to
   `exp.policy_history`;
5. the policy is checkpointed with orbax (step r + 1, the run state as JSON metadata) as its
   history: every adapter merged into the base so far (one rank-64 adapter on all projections is 17%
   of the 135M model's float32 params, ~2% of a 7B model's bf16 ones). The whole params are saved
   instead when no adapters describe them (a full fine-tune, or a run resumed from a checkpoint of
   whole params) or once the adapters outweigh them. Then the checkpoints before the newest
   `RoundConfig.keep_checkpoints`
   (`checkpoint.keep_last`) are deleted; each holds the whole history, so the newest is enough to
   resume. A resumed run rebuilds the policy as the base with the saved adapters merged in order,
   bit-identical to the params the interrupted run had. `results.json` is rewritten.
   `python -m seal_jax.export --run <dir> --round r+1` turns the policy into an HF checkpoint (and,
   with `save_adapters`, the selected candidates' adapters into PEFT directories).

Each step's wall time goes to the run's `timings.jsonl` (`seal_jax.timings`): round<r>/baseline,
/sample, /estep, /m_step, /checkpoint.

A domain adds its own evaluation table through `RoundHooks.evaluate`, called before the first round
(index 0) and after every round (index r + 1), and its own report through `RoundHooks.write_results`.

Ungraded candidates (the grader could not judge) are left out of rewards and selection and counted; a
round in which no trained candidate could be graded stops with `RoundError` instead of training the
policy on nothing but zeros.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import jax
import numpy as np

from seal_jax import interrupt, results as R, rundir, timings
from seal_jax.checkpoints import PolicyHistory, params_fingerprint
from seal_jax.errors import UserError
from seal_jax.domain import CandidateFailure
from seal_jax.engine import evaluate_contexts
from seal_jax.estep import EditOutcome, score_self_edits
from seal_jax.sampling import SamplingParams
from seal_jax.sft import PolicyUpdate

if TYPE_CHECKING:
    from seal_jax.experiment import Experiment

log = logging.getLogger(__name__)

SELECTIONS = ("best_of_k", "all_successful")
ADAPTERS = "adapters"  # run-directory folder of saved candidate adapters (RoundConfig.save_adapters)


class RoundError(UserError, RuntimeError):  # the CLI reports it as one line, exit 2
    """A round cannot go on without producing a wrong result (e.g. grading failed wholesale)."""


@dataclasses.dataclass(frozen=True)
class RoundConfig:
    rounds: int = 1
    contexts_per_round: int = 4  # fresh contexts each round (wraps around the training contexts)
    k: int = 2  # self-edits sampled per context
    reps: int = 1  # fine-tunes per self-edit (own seeds); reward = mean over reps
    selection: str = "best_of_k"  # | "all_successful"
    require_improvement: bool = False  # best_of_k: keep a context only if its best beats the baseline
    success_threshold: float = 1.0  # all_successful: reward >= this is a success
    temperature: float = 1.0  # self-edit sampling
    top_p: float = 0.95
    max_new_tokens: int = 160
    seed: int = 0
    save_adapters: bool = False  # write every trained candidate's adapter (PEFT) under adapters/
    keep_checkpoints: int = 2  # newest round checkpoints kept on disk; 0 keeps all

    def __post_init__(self):
        if self.selection not in SELECTIONS:
            raise ValueError(f"rest_em.selection must be one of {SELECTIONS}, got {self.selection!r}")
        for name in ("contexts_per_round", "k", "reps", "max_new_tokens"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.rounds < 0:
            raise ValueError(f"rounds must be >= 0, got {self.rounds}")
        if not math.isfinite(self.success_threshold):
            raise ValueError(f"success_threshold must be finite, got {self.success_threshold}")
        if not isinstance(self.keep_checkpoints, int) or isinstance(self.keep_checkpoints, bool) \
                or self.keep_checkpoints < 0:
            raise ValueError(f"checkpoint.keep_last must be an integer >= 0 (0 keeps all), got "
                             f"{self.keep_checkpoints!r}")

    def sampling(self, seed: int, stop_ids: Sequence[int]) -> SamplingParams:
        return SamplingParams(temperature=float(self.temperature), top_p=float(self.top_p),
                              max_new_tokens=int(self.max_new_tokens), seed=int(seed),
                              stop_ids=tuple(stop_ids))


def round_config(c, *, contexts_per_round: int) -> RoundConfig:
    """RoundConfig from a config's `rest_em`, `self_edit`, `checkpoint` and `seed` fields."""
    from seal_jax.config import ConfigError

    try:
        return RoundConfig(
            rounds=int(c.rest_em.rounds), contexts_per_round=int(contexts_per_round),
            k=int(c.self_edit.k), reps=int(c.rest_em.reps),
            selection=str(c.rest_em.get("selection", "best_of_k")),
            require_improvement=bool(c.rest_em.require_improvement),
            success_threshold=float(c.rest_em.get("success_threshold", 1.0)),
            temperature=float(c.self_edit.temperature), top_p=float(c.self_edit.top_p),
            max_new_tokens=int(c.self_edit.max_new_tokens), seed=int(c.seed),
            save_adapters=bool(c.rest_em.get("save_adapters", False)),
            keep_checkpoints=c.get("checkpoint", {}).get("keep_last", RoundConfig.keep_checkpoints))
    except ValueError as e:
        raise ConfigError(f"rest_em: {e}") from e


@dataclasses.dataclass
class RoundHooks:
    """Domain additions to the round: an evaluation table and a report."""

    # (exp, index) -> table rows; index 0 = before the first round, r + 1 = after round r.
    evaluate: Optional[Callable[["Experiment", int], list[dict]]] = None
    # (exp, state) -> None; writes results.json (and whatever else); default: `write_results`.
    write_results: Optional[Callable[["Experiment", dict], None]] = None


# ------------------------------------------------------------------------------------------------
# Sampling and the un-adapted baseline (both cached in the run directory)


def sample_self_edits(exp: "Experiment", contexts: Sequence[Any], k: int, tag: str,
                      seed: int, until: Optional[Callable[[list[str]], bool]] = None) -> list[list[str]]:
    """k self-edits per context from the current policy, saved before they are scored.

    `until(edits so far)`: a context's (j+1)-th self-edit is sampled only while its first j do not
    satisfy it (the table needs the first usable one of k). Each request keeps the stream index it
    has when all k are sampled (`SamplingParams.stream`), so the texts are the first ones of the full
    sampling, and the choice made from them is the same; a context's list may then be shorter than k.
    """
    path = exp.run_dir / f"self_edits_{tag}.json"
    ids = [exp.domain.context_id(c) for c in contexts]
    if path.exists():
        saved = json.loads(path.read_text())
        complete = saved.get("complete", True)
        if saved.get("context_ids") == ids and saved.get("k") == k and (complete or until is not None):
            return saved["self_edits"]
    sampling = exp.round.sampling(seed, exp.engine.tokenizer.stop_ids)
    prompt_ids = [exp.domain.self_edit_prompt(c) for c in contexts]
    # Per-item limit: a context whose prompt plus the generation does not fit the model is skipped
    # (its self-edits are empty, and `too_long` says why) instead of aborting the whole run.
    limit = exp.engine.cfg.max_position_embeddings
    too_long = {ids[i]: f"self-edit prompt of {len(p)} tokens + {sampling.max_new_tokens} new tokens "
                        f"exceeds the model's {limit} positions"
                for i, p in enumerate(prompt_ids) if len(p) + sampling.max_new_tokens > limit}
    fits = [i for i in range(len(contexts)) if ids[i] not in too_long]
    for cid, reason in too_long.items():
        log.warning("context %s skipped: %s", cid, reason)
    edits = [[""] * k for _ in contexts]
    if until is None:
        log.info("sampling %d self-edits (%s)", len(fits) * k, tag)
        texts = exp.engine.sample([prompt_ids[i] for i in fits for _ in range(k)], sampling) if fits else []
        for n, i in enumerate(fits):
            edits[i] = texts[n * k:(n + 1) * k]
    else:
        for i in fits:
            edits[i] = []
        need = list(enumerate(fits))  # (position among the sampled contexts, context index)
        for j in range(k):
            if not need:
                break
            log.info("sampling %d self-edits (%s, sample %d of up to %d per context)", len(need), tag,
                     j + 1, k)
            texts = exp.engine.sample([prompt_ids[i] for _, i in need],
                                      [dataclasses.replace(sampling, stream=n * k + j) for n, _ in need])
            for (_, i), text in zip(need, texts):
                edits[i].append(text)
            need = [(n, i) for n, i in need if not until(edits[i])]
    R.write_json(path, {"context_ids": ids, "k": k, "complete": until is None, "self_edits": edits,
                        "too_long": too_long,
                        "prompts": [exp.engine.tokenizer.decode(p, skip_special=False)
                                    for p in prompt_ids]})
    return edits


def too_long_contexts(exp: "Experiment", tag: str) -> dict[str, str]:
    """{context id: reason} of the contexts `sample_self_edits` skipped for `tag`."""
    path = exp.run_dir / f"self_edits_{tag}.json"
    return json.loads(path.read_text()).get("too_long", {}) if path.exists() else {}


def baseline_scores(exp: "Experiment", contexts: Sequence[Any], tag: str) -> dict[str, float]:
    """Un-adapted reward per gradable context (ungraded ones left out), computed once per tag."""
    path = exp.run_dir / f"baseline_{tag}.json"
    if path.exists():
        return json.loads(path.read_text())["reward"]
    scorable = [c for c in contexts if exp.domain.eval_requests(c)]
    scores = evaluate_contexts(exp.engine, exp.domain, scorable)
    ids = [exp.domain.context_id(c) for c in scorable]
    reward = {i: float(s.reward) for i, s in zip(ids, scores) if s.reward is not None}
    R.write_json(path, {"reward": reward, "ungraded": [i for i, s in zip(ids, scores) if s.reward is None],
                        "details": {i: s.details for i, s in zip(ids, scores)}})
    return reward


# ------------------------------------------------------------------------------------------------
# Selection


def select_best_of_k(outcomes: Sequence[EditOutcome], baseline: dict[str, float], *,
                     require_improvement: bool = False) -> list[EditOutcome]:
    """Per context the highest-reward edit (stable: ties keep sampling order).

    The reference keeps the top-1 even when it does not beat the baseline; `require_improvement`
    drops contexts whose best edit is not strictly better than the baseline (a deliberate deviation).
    Failed and ungraded edits are never selected.
    """
    by_context: dict[str, list[EditOutcome]] = {}
    for o in outcomes:
        by_context.setdefault(o.context_id, []).append(o)
    chosen = []
    for cid, group in by_context.items():
        viable = [o for o in sorted(group, key=lambda o: o.edit_index) if o.selectable]
        if not viable:
            continue
        best = max(viable, key=lambda o: o.reward)  # max() keeps the first of equal rewards
        if require_improvement and not best.reward > baseline.get(cid, -math.inf):
            continue
        chosen.append(best)
    return chosen


def select_all_successful(outcomes: Sequence[EditOutcome], threshold: float) -> list[EditOutcome]:
    """Every graded, non-failed edit with reward >= threshold, in (context, sampling) order."""
    return [o for o in outcomes if o.selectable and o.reward >= threshold]


def select(outcomes: Sequence[EditOutcome], baseline: dict[str, float], rc: RoundConfig) -> list[EditOutcome]:
    if rc.selection == "best_of_k":
        return select_best_of_k(outcomes, baseline, require_improvement=rc.require_improvement)
    return select_all_successful(outcomes, rc.success_threshold)


def check_graded(outcomes: Sequence[EditOutcome], what: str) -> None:
    """Stop when every trained candidate is ungraded: rewards would all be missing or zero."""
    trained = [r for o in outcomes for r in o.records if not r.get("failed")]
    if trained and all(r.get("reward") is None for r in trained):
        errors = [a.get("grader_error") for r in trained for a in r.get("answers", [])
                  if isinstance(a, dict) and a.get("grader_error")]
        hint = f"; first grader error: {errors[0]}" if errors else ""
        raise RoundError(f"{what}: grading failed for all {len(trained)} trained candidates, so there "
                         f"is no reward to select on{hint}. Fix the grader and resume the run.")


# ------------------------------------------------------------------------------------------------
# The rounds


def round_contexts(contexts: Sequence[Any], r: int, n: int) -> list[Any]:
    """Fresh contexts each round (the reference's round 2 uses 50 new passages); wraps if too few."""
    if not contexts:
        raise ValueError("no training contexts: raise the number of training contexts (data.n_train)")
    return [contexts[(r * n + i) % len(contexts)] for i in range(min(n, len(contexts)))]


def initial_state() -> dict:
    return {"round": 0, "rounds": [], "table": [], "evaluated_start": False}


def run_rounds(exp: "Experiment", hooks: RoundHooks = RoundHooks()) -> dict:
    """Run (or continue) `exp.round.rounds` rounds; returns the run state also saved as results.json."""
    from seal_jax.export import write_policy_spec

    rc, ckpt = exp.round, exp.checkpointer
    write = hooks.write_results or write_results
    write_policy_spec(exp.run_dir, exp.engine)  # what `python -m seal_jax.export` needs besides weights
    exp.policy_history = with_base_fingerprint(exp.policy_history, exp.engine.params)
    state = initial_state()
    latest = ckpt.latest_step()
    if latest is not None:  # resume: restore the policy of the last completed round
        state = resume_policy(exp, latest)["state"]
        log.info("resumed after round %d from %s", state["round"], ckpt.directory)

    # (a state saved before this flag existed has its start table already when it has any rows)
    if not state.get("evaluated_start", bool(state["table"])) and hooks.evaluate is not None:
        state["table"] += hooks.evaluate(exp, 0)
        state["evaluated_start"] = True
        write(exp, state)

    for r in range(state["round"], rc.rounds):
        summary = one_round(exp, r)
        state["rounds"].append(summary)
        if hooks.evaluate is not None:
            state["table"] += hooks.evaluate(exp, r + 1)
        state["round"] = r + 1
        with timings.phase(exp.run_dir, f"round{r}/checkpoint"):
            save_policy(exp, r + 1, {"state": R.json_safe(state)})
        write(exp, state)
        interrupt.check(f"round {r} (checkpointed)")
    return state


def with_base_fingerprint(history: Optional[PolicyHistory], params: Any) -> Optional[PolicyHistory]:
    """An empty history stands for the bare base model: record which base (checked on resume)."""
    if history is None or len(history) or history.base_fingerprint is not None:
        return history
    return dataclasses.replace(history, base_fingerprint=params_fingerprint(params))


def resume_policy(exp: "Experiment", step: int) -> dict:
    """Install the policy of checkpoint `step` in `exp.engine` (and its history); returns its metadata.

    The engine holds the base plus `exp.policy_history`'s adapters (just the base in a fresh process);
    the checkpoint's further adapters are merged on in order, as the M-steps merged them.
    """
    ckpt = exp.checkpointer
    if exp.policy_history is None and ckpt.holds_policy_history(step):
        raise RoundError(f"cannot resume from {ckpt.directory} step {step} in this process: the policy "
                         "in memory is no longer the base model with adapters; start a new process "
                         "(the CLI with --config.resume) to reload the base model")
    exp.engine.params, exp.policy_history, metadata = ckpt.restore_policy(
        exp.engine.params, exp.engine.cfg, step, merged=exp.policy_history)
    return metadata


def save_policy(exp: "Experiment", step: int, metadata: dict) -> None:
    """Checkpoint the policy as its history of adapters or as its params, whichever is smaller (the
    params when no history describes them), then prune old checkpoints."""
    ckpt, history = exp.checkpointer, exp.policy_history
    if history is not None and _nbytes(history.adapters) > _nbytes(exp.engine.params):
        # After enough rounds the adapters outweigh the params they describe: from here on the params
        # are the smaller checkpoint, and the history need not be kept in memory any more.
        exp.policy_history = None
    if exp.policy_history is not None:
        ckpt.save_policy(step, exp.policy_history, metadata)
    else:
        # Stored as they are: a float32 fine-tune is not exact in bfloat16 (`save(compact=True)` would
        # find nothing narrower and only add a host copy).
        ckpt.save(step, exp.engine.params, metadata)
    if exp.round.keep_checkpoints:  # after the save: the newest checkpoint is never the one deleted
        ckpt.prune(exp.round.keep_checkpoints)


def _nbytes(tree: Any) -> int:
    return sum(int(leaf.nbytes) for leaf in jax.tree.leaves(tree))


def policy_history_after(history: Optional[PolicyHistory], update: PolicyUpdate) -> Optional[PolicyHistory]:
    """The history of the params an M-step returned: + its adapter; None once params were trained."""
    if history is None or update.full_finetune:
        return None
    return history if update.adapter is None else history.extended(update.adapter, update.lora_cfg)


def one_round(exp: "Experiment", r: int) -> dict:
    """Sample -> E-step -> select -> M-step for round r; installs the new policy, returns a summary."""
    rc = exp.round
    contexts = round_contexts(exp.train_contexts, r, rc.contexts_per_round)
    tag = f"round{r}"
    with timings.phase(exp.run_dir, f"{tag}/baseline"):
        baseline = baseline_scores(exp, contexts, f"{tag}_train")
    with timings.phase(exp.run_dir, f"{tag}/sample"):
        edits = sample_self_edits(exp, contexts, rc.k, tag, seed=rc.seed + 1000 * (r + 1))
    interrupt.check(f"sampling round {r}'s self-edits (saved)")
    items = [(c, i, e) for c, es in zip(contexts, edits) for i, e in enumerate(es)]
    skipped = too_long_contexts(exp, tag)

    def build(ctx, text):  # a skipped context's candidates are recorded failures with the reason
        cid = exp.domain.context_id(ctx)
        return CandidateFailure(skipped[cid]) if cid in skipped else exp.domain.build_candidate(ctx, text)

    with timings.phase(exp.run_dir, f"{tag}/estep"):
        outcomes = score_self_edits(exp.engine, exp.domain, items, reps=rc.reps, seed=rc.seed + r,
                                    phase=f"{tag}/score", done=exp.done_records(), build=build,
                                    on_record=exp.records.append, progress=exp.progress,
                                    config_hash=rundir.training_config_hash(exp.config or {}),
                                    adapter_root=exp.run_dir / ADAPTERS if rc.save_adapters else None)
    check_graded(outcomes, f"round {r}")
    chosen = select(outcomes, baseline, rc)
    by_id = {exp.domain.context_id(c): c for c in contexts}
    examples = [(*exp.domain.sft_example(by_id[o.context_id], o.self_edit), 1.0) for o in chosen]
    R.write_json(exp.run_dir / f"sft_{tag}.json",
                 [{"context_id": o.context_id, "edit_index": o.edit_index, "reward": o.reward,
                   "baseline": baseline.get(o.context_id), "completion": o.self_edit} for o in chosen])
    if examples:
        with timings.phase(exp.run_dir, f"{tag}/m_step"):
            update = exp.m_step(exp.engine.params, examples)
        exp.engine.params = update.params
        exp.policy_history = policy_history_after(exp.policy_history, update)
        sft_metrics = update.metrics
    else:
        sft_metrics = {"skipped": "no examples"}
    graded = [o.reward for o in outcomes if o.reward is not None]
    return {
        "round": r, "contexts": len(contexts), "self_edits": len(outcomes), "selection": rc.selection,
        "baseline_mean": float(np.mean(list(baseline.values()))) if baseline else float("nan"),
        "reward_mean": float(np.mean(graded)) if graded else float("nan"),
        "selected_reward_mean": float(np.mean([o.reward for o in chosen])) if chosen else float("nan"),
        "failed_self_edits": sum(o.failure is not None for o in outcomes),
        "ungraded_candidates": sum(o.ungraded for o in outcomes),
        "selected": len(chosen), "sft": sft_metrics,
    }


def rounds_markdown(state: dict) -> list[str]:
    if not state["rounds"]:
        return []
    return ["", "## ReST-EM rounds (training contexts)", "",
            R.markdown_table(["round", "contexts", "self-edits", "baseline", "mean reward",
                              "selected reward", "failed", "ungraded", "selected"],
                             [[s["round"], s["contexts"], s["self_edits"], s["baseline_mean"],
                               s["reward_mean"], s["selected_reward_mean"], s["failed_self_edits"],
                               s["ungraded_candidates"], s["selected"]] for s in state["rounds"]])]


def write_results(exp: "Experiment", state: dict) -> None:
    """Default report: results.json (the state) and results.md (the rounds table)."""
    R.write_json(exp.run_dir / "results.json", state)
    md = [f"# SEAL rounds: {exp.domain.name}"] + rounds_markdown(state) + timings.markdown(timings.read(exp.run_dir))
    (exp.run_dir / "results.md").write_text("\n".join(md) + "\n")
