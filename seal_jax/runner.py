"""The SEAL round driver: sample self-edits, train K candidates at once, evaluate, record.

`Engine` is the only object domains' results flow through: it owns the policy (config, params,
tokenizer) and the engine settings, and exposes three batched operations — sample, train, answer.
`score_self_edits` is the E-step for any domain: it expands (context, self-edit) pairs into candidates
(x reps, each with its own seed), trains them `candidates_per_call` at a time in one vmapped program,
asks every adapted model its context's questions in one batched generate call, and has the domain grade
all answers at once. Every finished candidate is appended to the run's record log immediately, so an
interrupted run resumes without redoing finished work.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Callable, Optional, Sequence

import numpy as np
from tqdm.auto import tqdm

from seal_jax import inner
from seal_jax.model.config import LoraConfig, ModelConfig
from seal_jax.model.tokenizer import resolve_pad_id
from seal_jax.sampling import SamplingParams, generate
from seal_jax.tasks.base import CandidateFailure, CandidateSpec, Domain, EvalJob, EvalRequest, Score

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EngineSettings:
    lora: LoraConfig
    inner: inner.InnerConfig
    candidates_per_call: int = 8  # K: candidates trained in one vmapped call
    eval_batch_size: int = 64  # rows per generate call when answering
    sample_batch_size: int = 16  # rows per generate call when sampling self-edits
    mesh: Any = None  # jax.sharding.Mesh or None (single device)
    rules: Any = None  # logical-axis rules (seal_jax.sharding); None = defaults


class Engine:
    """The policy model plus batched sample / train / answer operations."""

    def __init__(self, cfg: ModelConfig, params, tokenizer, settings: EngineSettings):
        import jax

        # Loaders return host (numpy) arrays; move them once, not on every call.
        self.cfg, self.params = cfg, jax.device_put(params)
        self.tokenizer, self.settings = tokenizer, settings

    # -- sampling ---------------------------------------------------------------------------
    def sample(self, prompts: Sequence[list[int]], sampling: SamplingParams) -> list[str]:
        out = generate(self.params, list(prompts), cfg=self.cfg, sampling=sampling,
                       tokenizer=self.tokenizer, batch_size=self.settings.sample_batch_size)
        return [g.text.strip() for g in out]

    def answer(self, requests: Sequence[EvalRequest], lora=None,
               adapter_index: Optional[Sequence[int]] = None) -> list[str]:
        """Greedy answers; row i uses candidate `adapter_index[i]` of the stacked `lora`."""
        if not requests:
            return []
        sampling = [SamplingParams(temperature=0.0, max_new_tokens=r.max_new_tokens,
                                   stop_ids=tuple(self.tokenizer.stop_ids)) for r in requests]
        out = generate(self.params, [r.prompt_ids for r in requests], cfg=self.cfg, sampling=sampling,
                       lora=lora, lora_cfg=self.settings.lora if lora is not None else None,
                       adapter_index=list(adapter_index) if adapter_index is not None else None,
                       tokenizer=self.tokenizer, batch_size=self.settings.eval_batch_size)
        return [g.text.strip() for g in out]

    # -- training ---------------------------------------------------------------------------
    def train(self, specs: Sequence[CandidateSpec], seeds: Sequence[int],
              inner_cfg: Optional[inner.InnerConfig] = None) -> inner.InnerResult:
        """Fine-tune one LoRA per spec in one vmapped program.

        K is padded with empty candidates (0 steps) up to a power of two (at most
        `candidates_per_call`), so a round compiles at most log2(K) candidate counts per length
        bucket while a small last chunk does not pay for a full K; results are cut back to len(specs).
        """
        icfg = inner_cfg or self.settings.inner
        data = [inner.CandidateData(sequences=list(s.sequences), loss_masks=list(s.loss_masks))
                for s in specs]
        hparams = [dict(s.hparams, seed=int(seed)) for s, seed in zip(specs, seeds)]
        real = len(data)
        padded_k = min(self.settings.candidates_per_call, 1 << max(0, real - 1).bit_length())
        pad = max(0, padded_k - real)
        data += [inner.CandidateData(sequences=[])] * pad
        hparams += [{"seed": 0}] * pad
        eos = self.tokenizer.eos_id if self.tokenizer is not None else self.cfg.eos_token_id
        plan = inner.build_plan(data, hparams, icfg, pad_id=self.pad_id, eos_id=eos)
        result = inner.train_candidates(self.params, plan, cfg=self.cfg, lora_cfg=self.settings.lora,
                                        inner_cfg=icfg, mesh=self.settings.mesh,
                                        rules=self.settings.rules)
        if not pad:
            return result
        cut = lambda a: a[:real]  # noqa: E731
        import jax

        return dataclasses.replace(
            result, lora=jax.tree.map(cut, result.lora), losses=cut(result.losses),
            grad_norms=cut(result.grad_norms), failed=cut(result.failed),
            failure_reason=result.failure_reason[:real], steps=cut(result.steps),
            failed_step=cut(result.failed_step))

    @property
    def pad_id(self) -> int:
        return resolve_pad_id(self.tokenizer, self.cfg)


# ------------------------------------------------------------------------------------------------
# Evaluation of base and adapted models


def evaluate_contexts(engine: Engine, domain: Domain, contexts: Sequence[Any], lora=None,
                      adapter_index: Optional[Sequence[int]] = None) -> list[Score]:
    """Score one model per context: the base (lora=None) or candidate adapter_index[i] for context i."""
    requests = [domain.eval_requests(c) for c in contexts]
    flat = [r for rs in requests for r in rs]
    rows_adapter = None
    if lora is not None:
        rows_adapter = [a for a, rs in zip(adapter_index, requests) for _ in rs]
    texts = engine.answer(flat, lora=lora, adapter_index=rows_adapter)
    jobs, pos = [], 0
    for ctx, rs in zip(contexts, requests):
        jobs.append(EvalJob(context=ctx, requests=rs, texts=texts[pos:pos + len(rs)]))
        pos += len(rs)
    return domain.score(jobs)


@dataclasses.dataclass
class EditOutcome:
    """Everything about one self-edit of one context, over its reps."""

    context_id: str
    edit_index: int
    self_edit: str
    reward: float  # mean over reps of the adapted score (0 for failures)
    rep_rewards: list[float]
    failure: Optional[str] = None
    records: list[dict] = dataclasses.field(default_factory=list)


def _loss_summary(losses: np.ndarray) -> dict:
    finite = losses[np.isfinite(losses)]
    return {
        "first_loss": float(finite[0]) if finite.size else None,
        "last_loss": float(finite[-1]) if finite.size else None,
        "losses": [None if not math.isfinite(x) else round(float(x), 5) for x in losses if not np.isnan(x)],
    }


def score_self_edits(engine: Engine, domain: Domain, items: Sequence[tuple[Any, int, str]], *,
                     reps: int, seed: int, phase: str,
                     done: Optional[dict[tuple, dict]] = None,
                     on_record: Optional[Callable[[dict], None]] = None,
                     build: Optional[Callable[[Any, str], Any]] = None,
                     progress: bool = True) -> list[EditOutcome]:
    """E-step: reward of each (context, edit_index, self_edit) = mean adapted score over `reps`.

    `done` maps (phase, context_id, edit_index, rep) -> an already written record (resume): those
    candidates are not trained again. `on_record` receives each new record as soon as it exists.
    `build(context, text)` replaces `domain.build_candidate` (e.g. the passage-only baseline).
    """
    build = build or domain.build_candidate
    done = done or {}
    outcomes: list[EditOutcome] = []
    pending = []  # (outcome, context, spec, rep, seed)
    for ctx, edit_index, text in items:
        cid = domain.context_id(ctx)
        outcome = EditOutcome(cid, edit_index, text, 0.0, [])
        outcomes.append(outcome)
        spec = build(ctx, text)
        for rep in range(reps):
            key = (phase, cid, edit_index, rep)
            if key in done:
                outcome.records.append(done[key])
                continue
            base_record = {"phase": phase, "context_id": cid, "edit_index": edit_index, "rep": rep,
                           "self_edit": text}
            if isinstance(spec, CandidateFailure):
                record = dict(base_record, failed=True, reason=spec.reason, reward=0.0, **spec.info)
                outcome.records.append(record)
                if on_record:
                    on_record(record)
                continue
            cand_seed = _candidate_seed(seed, cid, edit_index, rep)
            pending.append((outcome, ctx, spec, rep, cand_seed, base_record))

    k = engine.settings.candidates_per_call
    bar = tqdm(total=len(pending), desc=f"{phase}: train+eval", disable=not progress or not pending)
    for start in range(0, len(pending), k):
        chunk = pending[start:start + k]
        result = engine.train([c[2] for c in chunk], [c[4] for c in chunk])
        ok = [i for i in range(len(chunk)) if not result.failed[i]]
        scores: dict[int, Score] = {}
        if ok:
            ok_scores = evaluate_contexts(engine, domain, [chunk[i][1] for i in ok], lora=result.lora,
                                          adapter_index=ok)
            scores = dict(zip(ok, ok_scores))
        for i, (outcome, ctx, spec, rep, cand_seed, base_record) in enumerate(chunk):
            record = dict(base_record, seed=cand_seed, steps=int(result.steps[i]),
                          **_loss_summary(np.asarray(result.losses[i])), **spec.info)
            if i in scores:
                record.update(failed=False, reward=float(scores[i].reward), **scores[i].details)
            else:
                record.update(failed=True, reward=0.0,
                              reason=result.failure_reason[i] or "training failed")
            outcome.records.append(record)
            if on_record:
                on_record(record)
        bar.update(len(chunk))
    bar.close()

    for outcome in outcomes:
        outcome.records.sort(key=lambda r: r["rep"])
        outcome.rep_rewards = [float(r["reward"]) for r in outcome.records]
        outcome.reward = float(np.mean(outcome.rep_rewards)) if outcome.rep_rewards else 0.0
        failures = [r.get("reason") for r in outcome.records if r.get("failed")]
        outcome.failure = failures[0] if failures and len(failures) == len(outcome.records) else None
    return outcomes


def _candidate_seed(seed: int, context_id: str, edit_index: int, rep: int) -> int:
    """Deterministic per-candidate seed (independent of batching and of resume order)."""
    import zlib

    return zlib.crc32(f"{seed}/{context_id}/{edit_index}/{rep}".encode()) & 0x7FFFFFFF


def select_best(outcomes: Sequence[EditOutcome], baseline: dict[str, float], *,
                require_improvement: bool = False) -> list[EditOutcome]:
    """ReST-EM filter: per context the highest-reward edit (stable: ties keep sampling order).

    The reference keeps the top-1 even when it does not beat the baseline; `require_improvement`
    drops contexts whose best edit is not strictly better than the baseline (a deliberate deviation).
    Failed edits are never selected.
    """
    by_context: dict[str, list[EditOutcome]] = {}
    for o in outcomes:
        by_context.setdefault(o.context_id, []).append(o)
    chosen = []
    for cid, group in by_context.items():
        viable = [o for o in sorted(group, key=lambda o: o.edit_index) if o.failure is None]
        if not viable:
            continue
        best = max(viable, key=lambda o: o.reward)  # max() keeps the first of equal rewards
        if require_improvement and not best.reward > baseline.get(cid, -math.inf):
            continue
        chosen.append(best)
    return chosen
