"""The policy model and its three batched operations: sample self-edits, train K candidates, answer.

`Engine` is what domains' work flows through. It owns the policy (config, params, tokenizer) and the
engine settings; the base params are placed on the device mesh once, by the logical-axis rules of
`seal_jax.sharding` (replicated by default, FSDP / tensor-parallel when the mesh has those axes).
`evaluate_contexts` asks one model per context (the base, or one candidate adapter each) the domain's
questions in one batched generate call and has the domain grade every answer at once.

The policy's params change only between rounds: the round (`seal_jax.rest_em`) assigns the M-step's
new params to `Engine.params`; nothing else writes them.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import jax

from seal_jax import distributed, inner, sharding
from seal_jax.domain import CandidateSpec, Domain, EvalJob, EvalRequest, Score
from seal_jax.model import transformer
from seal_jax.model.config import LoraConfig, ModelConfig
from seal_jax.model.tokenizer import resolve_pad_id
from seal_jax.sampling import SamplingParams, generate


@dataclasses.dataclass(frozen=True)
class EngineSettings:
    lora: LoraConfig
    inner: inner.InnerConfig
    candidates_per_call: int = 8  # K: candidates trained in one vmapped call; 0: fitted to the device
    eval_batch_size: int = 64  # rows per generate call when answering
    sample_batch_size: int = 16  # rows per generate call when sampling self-edits
    mesh: Any = None  # jax.sharding.Mesh or None (single device)
    rules: Any = None  # logical-axis rules (seal_jax.sharding); None = defaults


# candidates_per_call=0: the largest K `inner.fit_candidates_per_call` may choose, and its choice where
# the backend reports no device memory (CPU).
AUTO_MAX_CANDIDATES = 128
AUTO_FALLBACK_CANDIDATES = 8


def candidate_buckets(candidates_per_call: int) -> tuple[int, ...]:
    """Powers of two below K, then K: a small last chunk does not pay for a full K, and a round
    compiles at most log2(K) + 1 candidate counts per length bucket (0: up to AUTO_MAX_CANDIDATES)."""
    if candidates_per_call == 0:
        candidates_per_call = AUTO_MAX_CANDIDATES
    sizes = [1 << i for i in range(max(1, candidates_per_call).bit_length()) if 1 << i < candidates_per_call]
    return tuple(sizes + [int(candidates_per_call)])


def place_params(params, cfg: ModelConfig, mesh, rules=None):
    """Base params onto the mesh by the sharding rules (or onto the default device without a mesh)."""
    if mesh is None:
        return jax.device_put(params)
    shardings = sharding.logical_to_sharding(transformer.param_logical_axes(cfg), mesh,
                                             rules or sharding.DEFAULT_RULES, params)
    # put_global, not device_put: with a mesh spanning processes each process places only the shards
    # its own devices hold (device_put cannot move process-local arrays onto such a mesh).
    return distributed.put_global(params, shardings)


class Engine:
    """The policy model plus batched sample / train / answer operations."""

    def __init__(self, cfg: ModelConfig, params, tokenizer, settings: EngineSettings):
        if not settings.inner.candidate_buckets:
            # inner pads K up to a bucket and cuts results back: one place does the padding.
            settings = dataclasses.replace(settings, inner=settings.inner.replace(
                candidate_buckets=candidate_buckets(settings.candidates_per_call)))
        self.cfg, self.tokenizer, self.settings = cfg, tokenizer, settings
        # Loaders return host (numpy) arrays; place them once, not on every call.
        self.params = place_params(params, cfg, settings.mesh, settings.rules)

    # -- sampling ---------------------------------------------------------------------------
    def sample(self, prompts: Sequence[list[int]], sampling: SamplingParams) -> list[str]:
        out = generate(self.params, list(prompts), cfg=self.cfg, sampling=sampling,
                       **self._decode_placement(),
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
                       **self._decode_placement(),
                       lora=lora, lora_cfg=self.settings.lora if lora is not None else None,
                       adapter_index=list(adapter_index) if adapter_index is not None else None,
                       tokenizer=self.tokenizer, batch_size=self.settings.eval_batch_size)
        return [g.text.strip() for g in out]

    # -- training ---------------------------------------------------------------------------
    def train(self, specs: Sequence[CandidateSpec], seeds: Sequence[int],
              inner_cfg: Optional[inner.InnerConfig] = None) -> inner.InnerResult:
        """Fine-tune one LoRA per spec in one vmapped program (results have len(specs) rows)."""
        icfg = inner_cfg or self.settings.inner
        plan = inner.build_plan(*self._plan_inputs(specs, seeds), icfg, pad_id=self.pad_id,
                                eos_id=self.eos_id)
        # A call that runs out of device memory is split and retried, never a crashed run.
        result = inner.train_candidates_fitting(
            self.params, plan, cfg=self.cfg, lora_cfg=self.settings.lora, inner_cfg=icfg,
            mesh=self.settings.mesh, rules=self.settings.rules)
        mesh = self.settings.mesh
        if mesh is not None and distributed.spans_processes(mesh):
            # Adapters sharded over other processes' devices: gather them for the sampler, which
            # takes process-local arrays.
            result = dataclasses.replace(result, lora=distributed.to_host(result.lora))
        return result

    def candidates_per_call_for(self, specs: Sequence[CandidateSpec], seeds: Sequence[int]) -> int:
        """K for a batch of candidates: the configured one, or with `candidates_per_call=0` the one
        `inner.fit_candidates_per_call` estimates to train them fastest within the device's memory."""
        k = self.settings.candidates_per_call
        if k:
            return k
        data, hparams = self._plan_inputs(specs, seeds)
        devices = self.settings.mesh.devices.size if self.settings.mesh is not None else 1
        k = inner.fit_candidates_per_call(data, hparams, self.cfg, self.settings.lora, self.settings.inner,
                                          maximum=AUTO_MAX_CANDIDATES, fallback=AUTO_FALLBACK_CANDIDATES,
                                          pad_id=self.pad_id, eos_id=self.eos_id, devices=devices)
        if distributed.process_count() > 1:
            # Every process must cut the same calls (their programs meet in collectives), and free
            # memory differs a little between hosts: all take the smallest choice.
            k = min(distributed.allgather_objects(k))
        return k

    def precompile_training(self, calls: Sequence[tuple[Sequence[CandidateSpec], Sequence[int]]],
                            inner_cfg: Optional[inner.InnerConfig] = None) -> int:
        """Compile, concurrently, the programs that `train(specs, seeds)` will run for each of
        `calls`, and wait for them (see `inner.precompile`); returns how many were compiled."""
        return self.start_precompile_training(calls, inner_cfg).wait()

    def start_precompile_training(self, calls: Sequence[tuple[Sequence[CandidateSpec], Sequence[int]]],
                                  inner_cfg: Optional[inner.InnerConfig] = None
                                  ) -> inner.BackgroundCompile:
        """Start compiling those programs in worker threads, in the order of `calls`, and return at
        once (`inner.start_precompile`): `train` may run meanwhile and waits only for its own."""
        icfg = inner_cfg or self.settings.inner
        plans = (inner.build_plan(*self._plan_inputs(specs, seeds), icfg, pad_id=self.pad_id,
                                  eos_id=self.eos_id) for specs, seeds in calls)  # built by the feeder
        return inner.start_precompile(self.params, plans, cfg=self.cfg, lora_cfg=self.settings.lora,
                                      inner_cfg=icfg, mesh=self.settings.mesh, rules=self.settings.rules)

    @staticmethod
    def _plan_inputs(specs: Sequence[CandidateSpec], seeds: Sequence[int]):
        data = [inner.CandidateData(sequences=list(s.sequences), loss_masks=list(s.loss_masks))
                for s in specs]
        return data, [dict(s.hparams, seed=int(seed)) for s, seed in zip(specs, seeds)]

    def _decode_placement(self) -> dict:
        """Sampling and answering on the engine's mesh (rows and adapters split over its devices, the
        base as the rules place it). A mesh spanning processes decodes process-locally instead: the
        sampler takes process-local arrays (adapters are gathered to the host after training)."""
        mesh = self.settings.mesh
        if mesh is None or distributed.spans_processes(mesh):
            return {}
        return {"mesh": mesh, "rules": self.settings.rules}

    @property
    def pad_id(self) -> int:
        return resolve_pad_id(self.tokenizer, self.cfg)

    @property
    def eos_id(self) -> int:
        return int(self.tokenizer.eos_id if self.tokenizer is not None else self.cfg.eos_token_id)


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
