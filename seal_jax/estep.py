"""The E-step for any domain: the reward of each (context, self-edit) pair, candidates batched K at a time.

`score_self_edits` expands (context, edit_index, self-edit) items into candidates (x reps, each with its
own seed, independent of batching and of resume order), groups them by work into calls of at most
`candidates_per_call` (a call that runs out of device memory is split and retried), trains each call in
one vmapped program, asks every adapted model its context's questions in one batched generate call
(overlapped with the next call's training), and
has the domain grade all answers at once. Every finished candidate is appended to the run's record log
immediately, so an interrupted run resumes without redoing finished work.

A candidate ends in one of four states, all recorded:
* scored: `failed=False`, a float `reward`;
* ungraded: `failed=False`, `reward=None`, `ungraded=True` (the grader could not judge);
* failed to build (`CandidateFailure`) or to train (non-finite loss): `failed=True`, reward 0 and a
  reason. Failures count as reward 0 in their edit's mean (the reference's convention); ungraded reps
  are left out of it, and an edit with only ungraded reps has `reward=None`.
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import logging
import math
import pathlib
import re
import zlib
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from seal_jax import distributed as dist
from seal_jax import inner, interrupt
from seal_jax.domain import CandidateFailure, CandidateSpec, Domain, Score
from seal_jax.engine import Engine, evaluate_contexts
from seal_jax.errors import brief
from seal_jax.rundir import record_key, training_config_hash

log = logging.getLogger(__name__)


@dataclasses.dataclass
class EditOutcome:
    """Everything about one self-edit of one context, over its reps."""

    context_id: str
    edit_index: int
    self_edit: str
    reward: Optional[float]  # mean over graded reps (failures count 0); None = no rep was graded
    rep_rewards: list[float]  # graded reps only
    failure: Optional[str] = None  # set when every rep failed
    records: list[dict] = dataclasses.field(default_factory=list)
    ungraded: int = 0  # reps whose grading failed

    @property
    def selectable(self) -> bool:
        return self.failure is None and self.reward is not None


def done_records(records: Sequence[dict]) -> dict[tuple, dict]:
    """Already written candidate records (resume), keyed like `score_self_edits` expects."""
    return {(r["phase"], r["context_id"], r["edit_index"], r["rep"]): r for r in records
            if "edit_index" in r}


def _loss_summary(losses: np.ndarray) -> dict:
    finite = losses[np.isfinite(losses)]
    return {
        "first_loss": float(finite[0]) if finite.size else None,
        "last_loss": float(finite[-1]) if finite.size else None,
        "losses": [None if not math.isfinite(x) else round(float(x), 5) for x in losses if not np.isnan(x)],
    }


def _score_fields(score: Score) -> dict:
    if score.reward is None:
        return dict(failed=False, reward=None, ungraded=True, **score.details)
    return dict(failed=False, reward=float(score.reward), **score.details)


def score_self_edits(engine: Engine, domain: Domain, items: Sequence[tuple[Any, int, str]], *,
                     reps: int, seed: int, phase: str,
                     done: Optional[dict[tuple, dict]] = None,
                     on_record: Optional[Callable[[dict], None]] = None,
                     build: Optional[Callable[[Any, str], Any]] = None,
                     progress: bool = True, config_hash: str = "",
                     adapter_root: Optional[pathlib.Path] = None,
                     evaluations_ahead: int = 3) -> list[EditOutcome]:
    """Reward of each (context, edit_index, self_edit) = mean adapted score over `reps`.

    `done` maps (phase, context_id, edit_index, rep) -> an already written record (resume): those
    candidates are not trained again. `on_record` receives each new record as soon as it exists.
    `build(context, text)` replaces `domain.build_candidate` (e.g. the passage-only baseline).
    `adapter_root`: also write each trained candidate's adapter there as a PEFT directory
    (`adapter_path`), so chosen adapters can be exported after the run.
    `evaluations_ahead`: how many trained calls may wait for their evaluation while the next calls
    train (at least 1: then call i+2 trains only after call i is evaluated).

    Every record carries a content `key` (`seal_jax.rundir.record_key`: the self-edit text, phase,
    context, edit index, rep, seed, and a hash of the engine's LoRA/inner settings plus `config_hash`),
    and a done record is reused only when its key matches: a stale record can never score a
    different self-edit that landed on the same position.
    """
    if evaluations_ahead < 1:
        raise ValueError(f"evaluations_ahead must be >= 1, got {evaluations_ahead}")
    build = build or domain.build_candidate
    done = done or {}
    salt = candidate_config_hash(engine, config_hash)
    outcomes: list[EditOutcome] = []
    pending = []  # (outcome, context, spec, rep, seed, base record)
    for ctx, edit_index, text in items:
        cid = domain.context_id(ctx)
        outcome = EditOutcome(cid, edit_index, text, 0.0, [])
        outcomes.append(outcome)
        spec = build(ctx, text)
        for rep in range(reps):
            cand_seed = candidate_seed(seed, cid, edit_index, rep)
            content_key = record_key(self_edit=text, phase=phase, context_id=cid, edit_index=edit_index,
                                     rep=rep, seed=cand_seed, config_hash=salt)
            previous = done.get((phase, cid, edit_index, rep))
            if previous is not None and previous.get("key") == content_key:
                outcome.records.append(previous)
                continue
            if previous is not None:
                log.warning("%s: the record of %s edit %d rep %d is stale (another self-edit or "
                            "settings); the candidate is scored again", phase, cid, edit_index, rep)
            base_record = {"phase": phase, "context_id": cid, "edit_index": edit_index, "rep": rep,
                           "self_edit": text, "key": content_key}
            if isinstance(spec, CandidateFailure):
                record = dict(base_record, failed=True, reason=spec.reason, reward=0.0, **spec.info)
                outcome.records.append(record)
                if on_record:
                    on_record(record)
                continue
            pending.append((outcome, ctx, spec, rep, cand_seed, base_record))

    k = engine.candidates_per_call_for([c[2] for c in pending], [c[4] for c in pending])
    # Calls grouped by work (optimizer steps, then sequence lengths), so a call is not held by its
    # longest member; each candidate's seed is its own, so grouping changes no candidate's result.
    groups = inner.group_candidates([_candidate_data(c[2]) for c in pending],
                                    [dict(c[2].hparams, seed=c[4]) for c in pending],
                                    engine.settings.inner, k) if pending else []
    # Least work first. The programs compile beside the calls (below), and a call waits for its own:
    # the longest candidates step through the most row shapes (24 of the paper E-step's 28 programs
    # at K=128), so a first call of them waited for nearly the whole compile (on an H200 99-114 s
    # cold, 25-32 s with the cache), where the shortest need a few (10 at K=128, 2 at K=16) and the
    # rest compile while they train. The order of the calls changes no candidate's result.
    groups = groups[::-1]
    # The bar counts calls (one train and one evaluate call per group of at most K candidates), so it
    # moves at least once per call, even when all candidates fit in one call (the first compiles).
    bar = tqdm(total=2 * len(groups), desc=f"{phase}: train+eval calls", unit="call",
               disable=not progress or not pending)
    recorded = 0

    def evaluate_and_record(chunk, result):
        nonlocal recorded
        ok = [i for i in range(len(chunk)) if not result.failed[i]]
        scores: dict[int, Score] = {}
        bar.set_postfix_str(f"evaluating {len(ok)}, {recorded}/{len(pending)} candidates done")
        if ok:
            ok_scores = evaluate_contexts(engine, domain, [chunk[i][1] for i in ok], lora=result.lora,
                                          adapter_index=ok)
            scores = dict(zip(ok, ok_scores))
        for i, (outcome, ctx, spec, rep, cand_seed, base_record) in enumerate(chunk):
            if adapter_root is not None and not result.failed[i]:
                from seal_jax.peft_io import save_peft_candidate

                save_peft_candidate(adapter_path(adapter_root, phase, outcome.context_id,
                                                 outcome.edit_index, rep),
                                    result.lora, i, engine.cfg, engine.settings.lora)
            record = dict(base_record, seed=cand_seed, steps=int(result.steps[i]),
                          **_loss_summary(np.asarray(result.losses[i])), **spec.info)
            truncated = int(result.truncated_sequences[i])
            if truncated:
                record["truncated_sequences"] = truncated
            if i in scores:
                record.update(_score_fields(scores[i]))
            else:
                record.update(failed=True, reward=0.0,
                              reason=result.failure_reason[i] or "training failed")
            outcome.records.append(record)
            if on_record:
                on_record(record)
        recorded += len(chunk)
        bar.update(1)

    def record_failed_call(chunk, reason: str):
        nonlocal recorded
        for outcome, ctx, spec, rep, cand_seed, base_record in chunk:
            record = dict(base_record, seed=cand_seed, steps=0, failed=True, reward=0.0, reason=reason,
                          **spec.info)
            outcome.records.append(record)
            if on_record:
                on_record(record)
        recorded += len(chunk)
        bar.update(1)

    # A training call that fails on the device (an XLA runtime error other than running out of
    # memory, which the call handles by splitting itself) is tried once more with nothing else on
    # the device: on an H200 a program's first run failed while the previous call's evaluation ran
    # beside it (cuDNN graphs captured into CUDA graphs, kernels/README.md). Failing again, its
    # candidates are recorded as failed with the error, and the E-step goes on. Processes of one mesh
    # run their calls in lockstep, so there the error stops the run as before.
    lockstep = engine.settings.mesh is not None and dist.spans_processes(engine.settings.mesh)

    # Every training program of this E-step compiles in parallel threads, in the order the calls
    # need them, while the calls run: a call waits only for its own programs (on an H200 the 7B's
    # 33 programs took 125 s cold before the first call, which needs a few of them).
    compiling = engine.start_precompile_training(
        [([pending[j][2] for j in g], [pending[j][4] for j in g]) for g in groups]) if groups else None
    # The evaluation of call i (generate on the device, decode and grade on the host, write records)
    # runs in a worker thread while the main thread trains the next calls: the host work of one
    # overlaps the device work of the other. One worker keeps records in call order. Up to
    # `evaluations_ahead` trained calls may wait for it, so that a slow evaluation (the first one
    # compiles the decode programs: 34-42 s on an H200, cold) does not hold the training of the
    # calls behind it. Each waiting call keeps its K adapters on the device (the 7B's 32: ~1.3 GB).
    with contextlib.ExitStack() as stack, \
            concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="estep-eval") as pool:
        if compiling is not None:  # a stopped or failed E-step drops the compiles not yet started
            stack.callback(compiling.cancel)
        evaluations: collections.deque = collections.deque()

        def settle(keep: int) -> None:
            """Wait (in call order) until at most `keep` evaluations are unfinished; finished ones
            re-raise their error here, in order."""
            while evaluations and (len(evaluations) > keep or evaluations[0].done()):
                evaluations.popleft().result()

        for group in groups:
            if interrupt.stop_requested():
                settle(0)  # the trained calls' records reach the disk before the stop
            # A stop requested by SIGINT/SIGTERM takes effect here, between calls.
            interrupt.check(f"{phase}: {recorded}/{len(pending)} candidates recorded")
            chunk = [pending[j] for j in group]
            bar.set_postfix_str(f"training {len(chunk)}, {recorded}/{len(pending)} candidates done")
            specs, seeds = [c[2] for c in chunk], [c[4] for c in chunk]
            failure = None
            try:
                result = engine.train(specs, seeds)
            except jax.errors.JaxRuntimeError as e:
                if lockstep:
                    raise
                log.warning("%s: a training call of %d candidates failed on the device (%s); trying it "
                            "again once the evaluations beside it are done", phase, len(chunk), brief(e))
                settle(0)
                try:
                    result = engine.train(specs, seeds)
                except jax.errors.JaxRuntimeError as e2:
                    log.error("%s: the training call of %d candidates failed again (%s); they are recorded "
                              "as failed", phase, len(chunk), brief(e2))
                    failure = f"training call failed on the device: {brief(e2)}"
            bar.update(1)
            settle(evaluations_ahead - 1)
            if failure is None:
                evaluations.append(pool.submit(evaluate_and_record, chunk, result))
            else:
                evaluations.append(pool.submit(record_failed_call, chunk, failure))
        settle(0)
    bar.close()
    interrupt.check(f"{phase}: {recorded}/{len(pending)} candidates recorded")

    for outcome in outcomes:
        summarize(outcome)
    return outcomes


def summarize(outcome: EditOutcome) -> EditOutcome:
    """Fill reward / rep_rewards / failure / ungraded from the outcome's records."""
    outcome.records.sort(key=lambda r: r["rep"])
    graded = [r for r in outcome.records if r.get("reward") is not None]
    outcome.ungraded = len(outcome.records) - len(graded)
    outcome.rep_rewards = [float(r["reward"]) for r in graded]
    outcome.reward = float(np.mean(outcome.rep_rewards)) if outcome.rep_rewards else None
    failures = [r.get("reason") for r in outcome.records if r.get("failed")]
    outcome.failure = failures[0] if failures and len(failures) == len(outcome.records) else None
    return outcome


def _candidate_data(spec: CandidateSpec) -> inner.CandidateData:
    return inner.CandidateData(sequences=list(spec.sequences), loss_masks=list(spec.loss_masks))


def candidate_config_hash(engine: Engine, extra: str = "") -> str:
    """Hash of what decides a candidate's training besides its data: the engine's LoRA and inner-loop
    settings, plus whatever the caller adds (e.g. `rundir.training_config_hash(config)`)."""
    settings = {"lora": dataclasses.asdict(engine.settings.lora),
                "inner": dataclasses.asdict(engine.settings.inner), "extra": extra}
    return training_config_hash(settings, keys=("lora", "inner", "extra"))


def candidate_seed(seed: int, context_id: str, edit_index: int, rep: int) -> int:
    """Deterministic per-candidate seed (independent of batching and of resume order)."""
    return zlib.crc32(f"{seed}/{context_id}/{edit_index}/{rep}".encode()) & 0x7FFFFFFF


def adapter_path(root: pathlib.Path, phase: str, context_id: str, edit_index: int, rep: int) -> pathlib.Path:
    """Where `score_self_edits` writes a candidate's PEFT adapter (ids made safe as file names)."""
    def safe(name: str) -> str:
        return re.sub(r"[^A-Za-z0-9._-]", "_", name)

    return pathlib.Path(root) / safe(phase) / safe(context_id) / f"edit{edit_index}_rep{rep}"
