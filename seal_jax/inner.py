"""The inner loop: K candidate fine-tunes (one per self-edit / seed / config) in one compiled program.

The reference fine-tunes one candidate at a time (HF Trainer + PEFT, batch 1, every sequence padded
to 2048). Here every per-candidate difference is data, so all K candidates train together:

host    `seal_jax/train_plan.py`: `build_plan` turns K ragged candidates into tables with a leading
        K axis (`TrainPlan`), one length bucket per step; `group_candidates` groups many
        candidates into calls by their work.
device  `seal_jax/train_step.py`: one jitted function runs a chunk of steps for all K candidates
        under `jax.vmap` (optax update of `seal_jax/optim.py`, masked commit, per-candidate NaN
        isolation, chunked cross-entropy of `seal_jax/loss.py`).
here    `train_candidates` drives the chunks and returns an `InnerResult`;
        `train_candidates_fitting` splits a call that runs out of device memory and retries;
        `train_grouped` trains many candidates in work-grouped calls.

Compiled shapes are bounded: the sequence axis of a step is padded to the smallest configured length
bucket holding the longest sequence any candidate uses in that step; consecutive steps with the same
bucket form chunks; K (padded to `InnerConfig.candidate_buckets`), bs and `steps_per_chunk` are fixed
per call. So one compile per (K, bucket) is reused across chunks and rounds.

Loss conventions (`InnerConfig`):
* default ("clean"): padding is excluded from attention and from the loss (mask from lengths).
  `append_eos=True` appends one EOS target to every sequence; this is the clean-mode default of the
  knowledge domain (the adapted model learns where a fact ends instead of learning to emit EOS
  everywhere, see reference-knowledge §1.4).
* `reference_faithful=True` reproduces the reference TTT server: each sequence right-padded to
  `faithful_length` (2048) with the pad (= EOS) id, labels on the pad positions included, so the loss
  is the mean over all 2047 shifted positions; no EOS appended (the flag implies append_eos=False).
  With the other defaults (linear decay to 0, no warmup, clip 1.0, bs 1, AdamW 0.9/0.999/1e-8, wd 0,
  lr 1e-3, 10 epochs) this is the reference recipe. One deviation we cannot avoid with the model's
  segment-id attention contract: the reference masks pad *keys* (pad queries see only the real
  tokens); here pad queries also see earlier pads. Real-token positions are unaffected.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import gc
import hashlib
import json
import logging
import os
import threading
import time
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Bool, Float, Int

from seal_jax import compile_cache
from seal_jax import distributed as dist
from seal_jax import interrupt
from seal_jax import lora as lora_lib
from seal_jax import sharding as shard_lib
from seal_jax import train_step as step_lib
from seal_jax.errors import brief
from seal_jax.model.config import LoraConfig, ModelConfig
from seal_jax.train_plan import (HPARAM_KEYS, OVERLONG, SCHEDULES, SHUFFLES, CandidateData,  # noqa: F401
                                 InnerConfig, PackedStepBatch, StepBatch, TrainPlan, bucket, build_plan,
                                 group_candidates, pin_seeds, schedule_multipliers)
from seal_jax.train_step import StepConfig, TrainState  # noqa: F401

log = logging.getLogger(__name__)


def compiled_shape_count() -> int:
    """How many distinct chunk programs this process has compiled (for benchmarks and tests)."""
    return len(step_lib.COMPILED_SHAPES)


def clear_compiled() -> None:
    """Forget every compiled chunk program (benchmarks measuring a cold start; frees executables), and
    the decode and scoring programs `compile_cache.CachedJit` holds."""
    step_lib.clear()
    compile_cache.clear_programs()


@dataclasses.dataclass
class InnerResult:
    """Outcome of `train_candidates`; host fields are numpy."""

    lora: Any  # trained params [K, ...] (adapters, or base params when full fine-tuning)
    losses: Float[np.ndarray, "K S"]  # loss per step, NaN where the candidate took no step
    grad_norms: Float[np.ndarray, "K S"]  # pre-clip global gradient norm, NaN where no step
    failed: Bool[np.ndarray, " K"]
    failure_reason: list  # [K] str | None
    steps: Int[np.ndarray, " K"]  # optimizer steps committed
    failed_step: Int[np.ndarray, " K"]  # step index of the failure, -1 if none (0 if rejected)
    truncated_sequences: Int[np.ndarray, " K"] = None  # sequences cut to the maximum length

    def select(self, index: Sequence[int]) -> "InnerResult":
        index = np.asarray(index, np.int64)
        return InnerResult(
            lora=jax.tree.map(lambda a: a[index], self.lora), losses=self.losses[index],
            grad_norms=self.grad_norms[index], failed=self.failed[index],
            failure_reason=[self.failure_reason[i] for i in index], steps=self.steps[index],
            failed_step=self.failed_step[index], truncated_sequences=self.truncated_sequences[index])


def concat_results(parts: Sequence[InnerResult], order: Optional[Sequence[int]] = None) -> InnerResult:
    """Results of several calls as one (step axes NaN-padded to the longest); `order[j]` = the
    position in the output of the j-th candidate of the concatenated parts."""
    s_max = max(p.losses.shape[1] for p in parts)

    def steps(a):
        return np.pad(a, ((0, 0), (0, s_max - a.shape[1])), constant_values=np.nan)

    out = InnerResult(
        lora=jax.tree.map(lambda *xs: jnp.concatenate(xs), *[p.lora for p in parts]),
        losses=np.concatenate([steps(p.losses) for p in parts]),
        grad_norms=np.concatenate([steps(p.grad_norms) for p in parts]),
        failed=np.concatenate([p.failed for p in parts]),
        failure_reason=[r for p in parts for r in p.failure_reason],
        steps=np.concatenate([p.steps for p in parts]),
        failed_step=np.concatenate([p.failed_step for p in parts]),
        truncated_sequences=np.concatenate([p.truncated_sequences for p in parts]))
    if order is None:
        return out
    return out.select(np.argsort(np.asarray(order)))


def _padded_count(k_count: int, multiple: int, buckets: Sequence[int]) -> int:
    target = next((b for b in buckets if b >= k_count), k_count)
    return target + (-target) % multiple


def _prepare(base_params, plan: TrainPlan, *, cfg: ModelConfig, lora_cfg: Optional[LoraConfig],
             inner_cfg: InnerConfig, init_lora: Any, mesh, rules, abstract: bool = False):
    """(padded plan, step config, rules, frozen params, initial state) of a `train_candidates` call;
    with `abstract`, the state as shapes only (what `precompile` lowers with; nothing allocated)."""
    k_real = plan.num_candidates
    rules = shard_lib.rules_from_config({"logical_axis_rules": rules})  # hashable; default if None
    if lora_cfg is None:
        if k_real != 1:
            raise ValueError(f"full fine-tuning trains the base params themselves: one candidate, "
                             f"got {k_real}")
        # One model: never split (or pad) a candidate axis; the mesh shards the params (FSDP/TP).
        rules = (("candidate", None),) + rules
    shards = shard_lib.candidate_shards(mesh, rules)
    plan = plan.padded(_padded_count(k_real, shards, inner_cfg.candidate_buckets))
    k_count = plan.num_candidates
    # The loss's logits chunk is sized for the tokens of one step: K candidates' rows side by side,
    # or packed rows holding all of them (no candidate axis).
    packed = _packs(plan, lora_cfg, mesh)
    step_cfg = StepConfig.from_inner(cfg, lora_cfg, inner_cfg,
                                     candidates_per_device=1 if packed else k_count // shards)

    frozen = None if step_cfg.full_finetune else base_params

    def make_state() -> TrainState:
        return step_lib.initial_state(_initial_trainable(base_params, plan, cfg, lora_cfg, init_lora,
                                                         full_finetune=step_cfg.full_finetune,
                                                         k_real=k_real),
                                      plan.seeds_K, inner_cfg)

    state = jax.eval_shape(make_state) if abstract else make_state()
    return plan, step_cfg, rules, frozen, state


def _initial_trainable(base_params, plan: TrainPlan, cfg: ModelConfig, lora_cfg: Optional[LoraConfig],
                       init_lora: Any, *, full_finetune: bool, k_real: int):
    k_count = plan.num_candidates
    if full_finetune:
        trainable = jax.tree.map(
            lambda p: jnp.broadcast_to(jnp.asarray(p, jnp.float32), (k_count, *jnp.shape(p))),
            base_params)
    else:
        if init_lora is None:
            trainable = lora_lib.init_lora_from_seeds(cfg, lora_cfg, plan.seeds_K)
        else:
            lora_lib.check_lora(init_lora, cfg, lora_cfg, candidate_axis=True)
            if lora_lib.num_candidates(init_lora) != k_real:
                raise ValueError(f"init_lora has {lora_lib.num_candidates(init_lora)} candidates, "
                                 f"plan has {k_real}")
            # A copy: the state is donated to the chunk program, the caller keeps its adapter.
            trainable = jax.tree.map(lambda a: jnp.array(a, jnp.float32, copy=True), init_lora)
            if k_count != k_real:
                trainable = jax.tree.map(
                    lambda a: jnp.concatenate([a, jnp.repeat(a[:1], k_count - k_real, 0)]), trainable)
    return trainable


def train_candidates(base_params, plan: TrainPlan, *, cfg: ModelConfig,
                     lora_cfg: Optional[LoraConfig], inner_cfg: InnerConfig = InnerConfig(),
                     init_lora: Any = None, mesh=None, rules=None) -> InnerResult:
    """Fine-tune K candidates as described by `plan`; see the module docstring.

    init_lora: starting adapters [K, ...]; default: candidate k from `init_lora(PRNGKey(seed_k))`
      (so a K-batched run and K single runs with the same seeds start alike). Pass one shared
      adapter broadcast over K to reproduce the ARC reference's shared A init.
    lora_cfg=None: full fine-tune of `base_params` (trainable copy in float32, returned in the base
      dtype); `plan` must then hold one candidate.
    mesh: optional jax Mesh; the candidate axis is split over its "candidate" (and "fsdp") axes and
      the base params are placed by `rules` (seal_jax.sharding).
    K is padded internally (to `inner_cfg.candidate_buckets` and a multiple of the candidate shards)
    and every result is cut back to the plan's K.
    """
    k_real = plan.num_candidates
    given = plan
    plan, step_cfg, rules, frozen, state = _prepare(base_params, plan, cfg=cfg, lora_cfg=lora_cfg,
                                                    inner_cfg=inner_cfg, init_lora=init_lora,
                                                    mesh=mesh, rules=rules)
    packed = _packs(plan, lora_cfg, mesh)

    c = inner_cfg.steps_per_chunk
    auto = _remat_mode(cfg, lora_cfg, inner_cfg)
    limit = _remat_limit(_fit_key(cfg, lora_cfg, inner_cfg)) if auto == "auto" else None
    _PLAIN_NEEDS_OF_CALL.clear()
    losses, norms = [], []
    for start, stop, xs in _chunk_batches(plan, c, packed):
        fn, _ = _chunk_program(step_cfg, auto, mesh, rules, frozen, state, xs, limit=limit,
                               plain_needs=_PLAIN_NEEDS_OF_CALL)
        state, chunk_losses, chunk_norms = fn(frozen, state, xs, np.int32(stop - start))
        losses.append(chunk_losses[: stop - start])
        norms.append(chunk_norms[: stop - start])
    result = _result(plan, state, losses, norms, k_real, base_params if step_cfg.full_finetune else None)
    if packed and (result.failed & ~plan.rejected_K[:k_real]).any():
        # In shared rows a candidate gone non-finite can reach the others' gradients (0 x inf in the
        # attention and adapter products). Failures are rare; the call is trained again with a row
        # per candidate, where they cannot, so every result is what training it alone gives.
        log.warning("inner loop: %d candidate(s) failed in packed rows; training the call of K=%d again "
                    "with a row per candidate", int(result.failed.sum()), k_real)
        return train_candidates(base_params, dataclasses.replace(given, pack=None), cfg=cfg,
                                lora_cfg=lora_cfg, inner_cfg=inner_cfg, init_lora=init_lora, mesh=mesh,
                                rules=rules)
    return result


def _packs(plan: TrainPlan, lora_cfg: Optional[LoraConfig], mesh) -> bool:
    """Whether this call trains in packed rows: the plan packs (`TrainPlan.packs_rows`: allowed by
    `InnerConfig.packs` and worth it), adapters without dropout (each token's own adapter, nothing
    random per row), and one device (rows mix candidates, which a candidate-sharded mesh splits)."""
    return _adapters_can_pack(lora_cfg, 1 if mesh is None else mesh.size) and plan.packs_rows


def _adapters_can_pack(lora_cfg: Optional[LoraConfig], devices: int) -> bool:
    """The call-side conditions of packed rows: adapters (not a full fine-tune) without dropout, on
    one device."""
    return lora_cfg is not None and lora_cfg.dropout == 0 and devices == 1


def _chunk_batches(plan: TrainPlan, steps_per_chunk: int, packed: bool):
    """(start, stop, batch) per chunk of `plan`: packed rows or a row per candidate."""
    if packed:
        for start, stop, length, rows, segments in plan.packed_chunks(steps_per_chunk):
            yield start, stop, plan.gather_packed(start, stop, length, rows, segments, steps_per_chunk)
    else:
        for start, stop, length in plan.chunks(steps_per_chunk):
            yield start, stop, plan.gather(start, stop, length, steps_per_chunk)


def _program_dims(xs) -> tuple:
    """The shape of a chunk program's step batch: (K, B, T) per candidate, (R, T, "packed", K, U, N)
    for packed rows (U: members per step, N: token places per member)."""
    if isinstance(xs, PackedStepBatch):
        return (*xs.tokens.shape[1:], "packed", xs.lr.shape[1], *xs.member_tokens.shape[1:])
    return tuple(xs.tokens.shape[1:4])


def _describe(xs) -> str:
    if isinstance(xs, PackedStepBatch):
        return f"K={xs.lr.shape[1]} in {xs.tokens.shape[1]} packed rows of {xs.tokens.shape[2]}"
    return f"K={xs.tokens.shape[1]} length {xs.tokens.shape[3]}"


# ----------------------------------------------------------------------------------------------------
# Automatic remat: per program, from its compiled memory analysis

# Learned from out-of-memory errors, per fit key (`_fit_key`): plain programs planning at least this
# many bytes are rematerialised (0: every program). The memory analysis cannot see what runs beside a
# program, so a failure teaches a bound from above: the largest plain program of the failed call
# (lowered again by each further failure). Programs planning less stay plain (faster), where remat everywhere cost every later call its speed. Kept in
# `remat_limits.json` beside the persistent compilation cache, so a resumed run does not fail again.
_REMAT_LIMIT: dict = {}
# Planned bytes of the plain programs the current `train_candidates` call dispatched (the candidates
# for the next limit if the call runs out of memory).
_PLAIN_NEEDS_OF_CALL: list = []
REMAT_LIMITS_FILE = "remat_limits.json"
# Share of the device's free memory a program without remat may plan to use. The rest is for what
# the memory analysis does not see: the evaluation of the previous call running beside it (its KV
# cache), other executables, allocator fragmentation. 0.8 was too much: on an H200 the 1B preset's
# ARC program planned 105.5 GiB with ~137 GiB free (0.77) and ran out of memory at its first step
# (`bench/results/round_h200.md`, "Session 2026-12-02 (third)"); it then recompiled with remat,
# costing minutes.
REMAT_MEMORY_SHARE = 0.65


def _free_device_bytes() -> Optional[int]:
    """Free memory of the first local device, None where the backend does not say (CPU)."""
    try:
        stats = jax.local_devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001 - backends without memory statistics
        return None
    if "bytes_limit" not in stats:
        return None
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))


def _limits_path() -> Optional[str]:
    directory = compile_cache.directory()
    return os.path.join(directory, REMAT_LIMITS_FILE) if directory else None


def _persistent_limit_key(fit_key) -> str:
    """The fit key and the device kind, as a stable string (configs are frozen dataclasses)."""
    try:
        device = jax.local_devices()[0].device_kind
    except Exception:  # noqa: BLE001
        device = "unknown"
    return hashlib.sha256(f"{device}|{fit_key!r}".encode()).hexdigest()[:32]


def _remat_limit(fit_key) -> Optional[int]:
    """The learned limit of a fit key: this process's, else the one saved beside the compile cache."""
    if fit_key in _REMAT_LIMIT:
        return _REMAT_LIMIT[fit_key]
    path = _limits_path()
    if path and os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as f:
                saved = json.load(f).get(_persistent_limit_key(fit_key))
        except (OSError, ValueError, AttributeError) as e:  # a damaged file only costs the lesson
            log.warning("inner loop: ignoring %s (%s)", path, e)
            saved = None
        if saved is not None:
            log.info("inner loop: remat for programs planning >= %.1f GiB (learned by an earlier run, %s)",
                     int(saved) / 2**30, path)
            saved = int(saved)
    else:
        saved = None
    _REMAT_LIMIT[fit_key] = saved  # read once per process (None: nothing learned yet)
    return saved


def _learn_remat_limit(fit_key, limit: int) -> None:
    known = _REMAT_LIMIT.get(fit_key)
    limit = limit if known is None else min(limit, known)
    _REMAT_LIMIT[fit_key] = limit
    path = _limits_path()
    if not path:
        return
    try:
        saved = {}
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                saved = json.load(f)
        saved[_persistent_limit_key(fit_key)] = limit
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(saved, f)
        os.replace(tmp, path)
    except (OSError, ValueError, AttributeError) as e:
        log.warning("inner loop: could not save the remat limit to %s (%s)", path, e)


def _remat_mode(cfg: ModelConfig, lora_cfg, inner_cfg: InnerConfig) -> Optional[str]:
    """None: remat as configured; "auto": chosen per program (below a learned limit, if any);
    "forced": on everywhere (an out-of-memory with no plain program to blame)."""
    if inner_cfg.remat is not None or cfg.remat or _free_device_bytes() is None:
        return None
    return "forced" if _remat_limit(_fit_key(cfg, lora_cfg, inner_cfg)) == 0 else "auto"


def _planned_bytes(compiled) -> Optional[int]:
    """Device memory a compiled program allocates beyond its (resident) arguments."""
    try:
        m = compiled.memory_analysis()
        return int(m.temp_size_in_bytes) + int(m.output_size_in_bytes) - int(m.alias_size_in_bytes)
    except Exception:  # noqa: BLE001 - no analysis on this backend: assume it fits
        return None


def _activation_bytes(cfg: ModelConfig, tokens: int, *, remat: bool = False) -> int:
    """A floor on what a training step keeps for its backward pass over `tokens` tokens (all
    candidates): without remat, per token and layer 8 hidden-wide and 6 MLP-wide tensors in the
    compute dtype (the matmul inputs and outputs a LoRA layer saves; real plans measured 1.3-1.7x
    this); with remat, each layer's input plus one layer's worth recomputed at a time.

    Counted for `saved_residuals="all"` also when the model keeps only its matmul outputs ("dots",
    the default, about half the bytes): the K a call gets and the programs compiled without remat are
    chosen as in the rounds measured before "dots" existed, and each compiled program's own memory
    analysis still decides its remat."""
    size = jnp.dtype(cfg.dtype).itemsize
    per_token_layer = (8 * cfg.hidden_size + 6 * cfg.intermediate_size) * size
    if remat:
        return int(tokens) * (cfg.num_layers * cfg.hidden_size * size + per_token_layer)
    return int(tokens) * cfg.num_layers * per_token_layer


def _activation_bytes_floor(step_cfg: StepConfig, xs) -> int:
    """`_activation_bytes` of a chunk program without remat. Only used to skip compiling a plain
    program that cannot fit: the 1B preset's ARC program (16 candidates x 2 x 2,048 tokens) planned
    172 GiB and took minutes to compile before remat was chosen."""
    return _activation_bytes(step_cfg.cfg, int(np.prod(xs.tokens.shape[1:])))


# What a real program plans relative to `_activation_bytes` (measured 1.3-1.7x on GPU plans).
ACTIVATION_PLAN_FACTOR = 1.7


# Bytes per trainable adapter parameter a candidate keeps on the device: float32 value, gradient and
# the two Adam moments.
TRAINABLE_STATE_BYTES = 16


def _step_bytes(cfg: ModelConfig, lora_cfg: Optional[LoraConfig], tokens: int, k_count: int, *,
                remat: bool) -> float:
    """Estimated device memory of a training step over `tokens` tokens (all its candidates) plus K
    candidates' trainable state (value, gradient, Adam moments)."""
    trainable = lora_lib.lora_num_params(cfg, lora_cfg) if lora_cfg is not None else cfg.num_params()
    return (ACTIVATION_PLAN_FACTOR * _activation_bytes(cfg, tokens, remat=remat)
            + TRAINABLE_STATE_BYTES * trainable * k_count)


def candidates_per_call_in_memory(cfg: ModelConfig, lora_cfg: Optional[LoraConfig], inner_cfg: InnerConfig,
                                  longest_sequence: int, *, maximum: int, fallback: int,
                                  devices: int = 1) -> int:
    """The largest K `fit_candidates_per_call` may take: the largest power of two up to `maximum`
    whose training program at the workload's longest length bucket fits REMAT_MEMORY_SHARE of the
    device's free memory, without remat or else with it (automatic remat then decides per program).
    `fallback` where the backend reports no memory (CPU); never above a K that already ran out of
    memory here."""
    free = _free_device_bytes()
    if free is None:
        return max(1, min(fallback, maximum))
    extra = 1 if inner_cfg.append_eos and not inner_cfg.reference_faithful else 0
    length = (inner_cfg.faithful_length if inner_cfg.reference_faithful
              else bucket(longest_sequence + extra, inner_cfg.length_buckets))
    tokens = inner_cfg.batch_size * length
    budget = REMAT_MEMORY_SHARE * free * max(1, devices)
    per_candidate = min(_step_bytes(cfg, lora_cfg, tokens, 1, remat=False),
                        _step_bytes(cfg, lora_cfg, tokens, 1, remat=True))
    k = 1
    while k * 2 <= maximum and k * 2 * per_candidate <= budget:
        k *= 2
    fitted = [v for key, v in _FITTED_K.items() if key[0] == cfg]
    if fitted:
        k = min(k, *fitted)
    log.info("inner loop: device memory holds K=%d (longest sequence %d -> bucket %d, ~%.2f GiB per "
             "candidate, %.1f GiB free)", k, longest_sequence, length, per_candidate / 2**30, free / 2**30)
    return k


# A cost model of a training call on the device, for `candidates_per_call=0`, fitted to H200 calls
# of the paper E-step (bench/results/round_h200.md, 2026-12-02 fifth session; `bench/estep_cost_model.py
# --log` fits a call's time to steps, computed tokens and calls). A call costs CALL_OVERHEAD_S, each
# optimizer step a fixed part (kernel launches, STEP_OVERHEAD_S, plus reading the frozen weights:
# Qwen2.5-7B 26 ms a step whatever its tokens) and each computed token 4 N FLOPs (forward and the
# backward through activations; the frozen base has no weight gradients) at a rate that grows with the
# model's width: small matrices run the tensor cores far below their peak (the 135M model ~5 us a
# token, 1.1e14 FLOP/s; the 7B 62 us, 4.9e14). The old model (a step costs the larger of a 32 ms floor
# and its FLOPs at 2.7e14) chose K=128 for the 135M model, which trained the paper E-step slower than
# K=32 (94 s against 65 s), and K=4 for the 7B, where the fit says K=8 is ~17% faster.
CALL_OVERHEAD_S = 0.3
STEP_OVERHEAD_S = 0.010
STEP_SECONDS_PER_WEIGHT_BYTE = 1.1e-12
TOKEN_FLOPS_PER_S = 4.9e14
TOKEN_FLOPS_FULL_WIDTH = 3584  # hidden size from which the token rate is TOKEN_FLOPS_PER_S
TOKEN_FLOPS_WIDTH_EXPONENT = 0.85


def _step_and_token_seconds(cfg: ModelConfig) -> tuple[float, float]:
    """The cost model's seconds per optimizer step and per computed token for this model."""
    weight_bytes = cfg.num_params() * jnp.dtype(cfg.dtype).itemsize
    step = STEP_OVERHEAD_S + STEP_SECONDS_PER_WEIGHT_BYTE * weight_bytes
    width = min(1.0, cfg.hidden_size / TOKEN_FLOPS_FULL_WIDTH) ** TOKEN_FLOPS_WIDTH_EXPONENT
    return step, 4.0 * cfg.num_params() / (TOKEN_FLOPS_PER_S * width)


def estimated_train_seconds(plan: TrainPlan, cfg: ModelConfig, inner_cfg: InnerConfig, *,
                            plain_tokens: Optional[int] = None) -> float:
    """The cost model's seconds for one call training `plan` (K padded as the call pads it). Packed
    steps above `plain_tokens` tokens are rematerialised and cost REMAT_TOKEN_COST a token."""
    if plan.packs_rows:  # dummy candidates add no rows
        tokens_S = plan.computed_tokens_S().astype(np.float64)
        computed = float(tokens_S.sum())
        if plain_tokens is not None:
            computed += (REMAT_TOKEN_COST - 1.0) * float(tokens_S[tokens_S > plain_tokens].sum())
    else:
        k_count = _padded_count(plan.num_candidates, 1, inner_cfg.candidate_buckets)
        computed = float(plan.step_length_S.astype(np.float64).sum()) * k_count * plan.batch_size
    step, token = _step_and_token_seconds(cfg)
    return CALL_OVERHEAD_S + step * plan.num_steps + token * computed


def fastest_candidates_per_call(candidates: Sequence[CandidateData], hparams, cfg: ModelConfig,
                                inner_cfg: InnerConfig, *, maximum: int, pad_id: int,
                                eos_id: Optional[int] = None,
                                fits: Optional[Callable[[list], bool]] = None,
                                plain_tokens: Optional[Callable[[int], int]] = None,
                                ) -> tuple[int, dict[int, float]]:
    """(K, {K: estimated seconds}) over the powers of two up to `maximum` that a lower bound does not
    rule out: the calls `group_candidates` cuts at each K, their plans (the real padding and step
    counts of this workload) and the cost model. Wider calls run fewer sequential steps but pad more (a call's steps are padded to its
    longest sequence, and it runs as long as its busiest candidate): a small model, bound by the step
    floor, gains from width; a large one, bound by FLOPs, from less padding."""
    # Widest first. A call runs at least its members' mean number of steps and computes at least
    # their real tokens, so K costs at least step * (all candidates' steps) / K + token * (real
    # tokens): a K whose bound exceeds the best estimate so far cannot win and is not planned
    # (planning is ~0.6 s per K on the paper workload).
    step, token = _step_and_token_seconds(cfg)
    estimates = {}
    widths = []
    k = 1
    while k <= maximum:
        widths.append(k)
        k *= 2
    total_steps = real_tokens = None
    for k in reversed(widths):
        if total_steps is not None and (step * total_steps / k + token * real_tokens
                                        > min(estimates.values())):
            continue
        plans = [build_plan([candidates[i] for i in g], [hparams[i] for i in g], inner_cfg, pad_id=pad_id,
                            eos_id=eos_id) for g in group_candidates(candidates, hparams, inner_cfg, k)]
        if fits is not None and k > 1 and not fits(plans):
            continue
        limit = plain_tokens(k) if plain_tokens is not None else None
        estimates[k] = sum(estimated_train_seconds(plan, cfg, inner_cfg, plain_tokens=limit)
                           for plan in plans)
        total_steps = sum(int(plan.num_steps_K.sum()) for plan in plans)
        real_tokens = sum(plan.token_counts()["real_tokens"] for plan in plans)
    best = min(estimates, key=lambda kk: (estimates[kk], kk))
    return best, estimates


# Packed calls may rematerialise their largest steps, up to this share of the call's computed tokens:
# on the paper workload the 7B at K=16 keeps 71 of 4,520 steps (8.7% of the tokens, 3 programs) above
# what fits without remat, at K=32 225 steps (38%, 7 programs up to 12k tokens). Remat computes the
# forward twice and deciding it can compile a program twice, so a K that needs it widely is refused
# rather than charged: on an H200 the 7B's packed programs at K=128 (up to 32k tokens a step) took ~2
# minutes each to compile and nearly all needed remat, a whole E-step's worth of compile.
PACKED_REMAT_TOKEN_SHARE = 0.1
# A rematerialised step's cost per token relative to a plain one: the frozen base's forward (2N FLOPs a
# token) runs twice beside the backward through the activations (2N).
REMAT_TOKEN_COST = 1.5


def packed_plain_tokens(cfg: ModelConfig, lora_cfg: Optional[LoraConfig], k_count: int,
                        budget: float) -> int:
    """The most tokens a packed step of K candidates may compute and still fit `budget` bytes
    without remat (`_step_bytes`)."""
    per_token = _step_bytes(cfg, lora_cfg, 1, 0, remat=False)
    return max(0, int((budget - _step_bytes(cfg, lora_cfg, 0, k_count, remat=False)) // per_token))


def _packed_plans_fit(cfg: ModelConfig, lora_cfg: LoraConfig, plans: Sequence[TrainPlan], *,
                      budget: float) -> bool:
    """Whether packed calls of `plans` fit `budget` bytes: their largest step with remat, and the
    steps that need it (above `packed_plain_tokens`) at most PACKED_REMAT_TOKEN_SHARE of the tokens
    computed."""
    k_count = max(plan.num_candidates for plan in plans)
    tokens_S = np.concatenate([plan.computed_tokens_S() for plan in plans])
    if not tokens_S.size:
        return True
    if _step_bytes(cfg, lora_cfg, int(tokens_S.max()), k_count, remat=True) > budget:
        return False
    over = tokens_S[tokens_S > packed_plain_tokens(cfg, lora_cfg, k_count, budget)]
    return over.sum() <= PACKED_REMAT_TOKEN_SHARE * tokens_S.sum()


def fit_candidates_per_call(candidates: Sequence[CandidateData], hparams, cfg: ModelConfig,
                            lora_cfg: Optional[LoraConfig], inner_cfg: InnerConfig, *, maximum: int,
                            fallback: int, pad_id: int, eos_id: Optional[int] = None,
                            devices: int = 1) -> int:
    """K for `candidates_per_call=0`: the fastest by the cost model among those the device's memory
    holds for these candidates (`candidates_per_call_in_memory`); `fallback` on a backend that reports no
    memory (CPU), where the accelerator's cost model does not apply."""
    free = _free_device_bytes()
    packs = inner_cfg.packs and _adapters_can_pack(lora_cfg, devices)
    if packs and free is not None and candidates:
        # Packed rows: a step holds about K x the mean sequence, not K x the longest, so each K is
        # checked on its own plans (their largest packed step) instead of the per-candidate bound.
        fitted = [v for key, v in _FITTED_K.items() if key[0] == cfg]
        k = min([maximum, *fitted])
        budget = REMAT_MEMORY_SHARE * free
        fits = functools.partial(_packed_plans_fit, cfg, lora_cfg, budget=budget)
        plain_tokens = functools.partial(packed_plain_tokens, cfg, lora_cfg, budget=budget)
    else:
        longest = max((len(s) for c in candidates for s in c.sequences), default=1)
        k = candidates_per_call_in_memory(cfg, lora_cfg, inner_cfg, longest, maximum=maximum,
                                          fallback=fallback, devices=devices)
        fits = plain_tokens = None
        if not candidates or free is None:
            return k
    k, estimates = fastest_candidates_per_call(candidates, hparams, cfg, inner_cfg, maximum=k,
                                               pad_id=pad_id, eos_id=eos_id, fits=fits,
                                               plain_tokens=plain_tokens)
    log.info("inner loop: candidates_per_call=0 chose K=%d (estimated training seconds by K: %s)", k,
             ", ".join(f"{kk}: {v:.0f}" for kk, v in estimates.items()))
    return k


def _shape_key(fn_key, mesh, frozen, xs) -> tuple:
    """The COMPILED_SHAPES / PRECOMPILED key of a chunk program. Without a mesh, jit specialises the
    program to where the frozen params already live (e.g. a caller's own sharding), so that
    placement is part of the key."""
    placement = None
    if (mesh is None or isinstance(xs, PackedStepBatch)) and frozen is not None:
        placement = tuple(getattr(x, "sharding", None) for x in jax.tree.leaves(frozen))
    return (fn_key, xs.lr.shape[0], *_program_dims(xs), placement)


def _compile(step_cfg: StepConfig, mesh, rules, frozen, state, xs, *, skip_compiled: bool = False):
    """(compiled executable, COMPILED_SHAPES key); compiled once per key and kept. `skip_compiled`:
    (None, key) where jit already compiled this program in a call."""
    fn, key = step_lib.chunk_fn(step_cfg, mesh, rules, frozen, state, xs)
    shape_key = _shape_key(key, mesh, frozen, xs)
    compiled = step_lib.PRECOMPILED.get(shape_key)
    if compiled is not None:
        return compiled, shape_key
    with step_lib.program_lock(shape_key):  # compiling in another thread: wait for it, then reuse
        compiled = step_lib.PRECOMPILED.get(shape_key)
        if compiled is None and skip_compiled and shape_key in step_lib.COMPILED_SHAPES:
            return None, shape_key
        if compiled is None:
            # The jitted function itself, not distributed.global_inputs' wrapper around it. Kept and
            # called directly: a later trace of the same function need not reuse this lowering (jit's
            # caches key on the traced jaxpr object), so jit could compile it again.
            jitted = fn if hasattr(fn, "lower") else fn.__wrapped__
            args = (frozen, state, xs, np.int32(0))

            def lower():
                with _lowering_turn():
                    return jitted.lower(*args)

            # A warm run loads it without tracing: tracing and lowering were most of a warm start.
            compiled = compile_cache.executable("train_chunk", key, args, lower)
            step_lib.PRECOMPILED[shape_key] = compiled
            step_lib.COMPILED_SHAPES.add(shape_key)
    return compiled, shape_key


def _chunk_program(step_cfg: StepConfig, remat_mode: Optional[str], mesh, rules, frozen, state, xs, *,
                   limit: Optional[int] = None, plain_needs: Optional[list] = None,
                   free: Optional[int] = None):
    """(callable, COMPILED_SHAPES key) of the chunk program for these inputs, the key recorded in
    COMPILED_SHAPES (by `_compile`, or here for a program jit compiles at its call). Under "auto", a plain
    program planning at least `limit` bytes is rematerialised; `plain_needs` collects the planned
    bytes of a plain program returned. `free`: the device's free bytes to decide remat by (None:
    measured now; a background precompile passes what was free before the calls began allocating)."""
    if remat_mode is None:
        fn, key = step_lib.chunk_fn(step_cfg, mesh, rules, frozen, state, xs)
        shape_key = _shape_key(key, mesh, frozen, xs)
        with step_lib.program_lock(shape_key):  # a background precompile of it finishes first
            step_lib.COMPILED_SHAPES.add(shape_key)  # jit compiles it now: precompile skips it
            return step_lib.PRECOMPILED.get(shape_key, fn), shape_key
    if remat_mode == "forced":
        return _compile(step_cfg.with_remat(True), mesh, rules, frozen, state, xs)
    choice_key = (step_cfg, mesh, rules, *_program_dims(xs), xs.lr.shape[0])
    with step_lib.program_lock(("remat choice", choice_key)):  # decided once, by whoever comes first
        _choose_remat(choice_key, step_cfg, mesh, rules, frozen, state, xs, free)
    remat = step_lib.REMAT_CHOICE[choice_key]
    need = step_lib.REMAT_NEED.get(choice_key)
    if not remat and need is not None:
        if limit is not None and need >= limit:
            # Fitted the free memory, but a program this big ran out of it beside others. The limit
            # only falls, so the choice is kept.
            remat = step_lib.REMAT_CHOICE[choice_key] = True
            log.info("inner loop: %s plans %.1f GiB without remat, at or above the %.1f GiB that ran "
                     "out of memory: rematerialised", _describe(xs), need / 2**30, limit / 2**30)
        elif plain_needs is not None:
            plain_needs.append(need)
    return _compile(step_cfg.with_remat(remat), mesh, rules, frozen, state, xs)


def _choose_remat(choice_key, step_cfg: StepConfig, mesh, rules, frozen, state, xs,
                  free: Optional[int]) -> None:
    """Record in step_lib.REMAT_CHOICE whether this program runs rematerialised (unless decided);
    `free` None: measured now."""
    if choice_key not in step_lib.REMAT_CHOICE:
        free = _free_device_bytes() if free is None else free
        floor = _activation_bytes_floor(step_cfg, xs)
        tokens = int(np.prod(xs.tokens.shape[1:]))  # of all candidates (the floor's count too)
        if free is not None and floor > REMAT_MEMORY_SHARE * free:
            step_lib.REMAT_CHOICE[choice_key] = True  # no compile of a plain program that cannot fit
            log.info("inner loop: %s keeps at least %.1f GiB of activations without remat (%.1f GiB "
                     "free): rematerialised", _describe(xs), floor / 2**30, free / 2**30)
        elif (isinstance(xs, PackedStepBatch) and free is not None
              and tokens > packed_plain_tokens(step_cfg.cfg, step_cfg.lora_cfg, xs.lr.shape[-1],
                                               REMAT_MEMORY_SHARE * free)):
            # The estimate that admitted this K (`_packed_plans_fit`) counted this step as
            # rematerialised; it is not also compiled plain to find out.
            step_lib.REMAT_CHOICE[choice_key] = True
            log.info("inner loop: %s (%d tokens) is above the packed steps that fit without remat "
                     "(%.1f GiB free): rematerialised", _describe(xs), tokens, free / 2**30)
        else:
            need = _planned_bytes(_compile(step_cfg.with_remat(False), mesh, rules, frozen, state, xs)[0])
            remat = need is not None and free is not None and need > REMAT_MEMORY_SHARE * free
            step_lib.REMAT_NEED[choice_key] = need
            step_lib.REMAT_CHOICE[choice_key] = remat
            if remat:
                log.info("inner loop: %s needs %.1f GiB without remat (%.1f GiB free): "
                         "rematerialised", _describe(xs), need / 2**30, free / 2**30)


def _result(plan: TrainPlan, state: TrainState, losses, norms, k_real: int, full_base) -> InnerResult:
    def host_steps(parts):
        if not parts:
            return np.zeros((k_real, 0), np.float32)
        return dist.to_host(jnp.concatenate(parts, axis=0)).T[:k_real]

    # to_host: with a mesh spanning processes each holds only its shards; gather them first.
    failed, codes, fail_steps, counts = (x[:k_real] for x in dist.to_host(
        (state.failed, state.fail_code, state.fail_step, state.opt_state.count)))
    rejected = plan.rejected_K[:k_real]
    reasons = []
    for k in range(k_real):
        if rejected[k]:
            reasons.append(f"{int(plan.truncated_K[k])} sequence(s) longer than {plan.max_length} "
                           f"tokens (overlong='fail'); not trained")
        elif failed[k]:
            s = int(fail_steps[k])
            reasons.append(f"{step_lib.FAILURE_MESSAGES[int(codes[k])]} at step {s} "
                           f"(lr {float(plan.lr_KxS[k, s]):g}); params kept from step {s - 1}")
        else:
            reasons.append(None)
    trained = jax.tree.map(lambda a: a[:k_real], state.params)
    if full_base is not None:
        trained = jax.tree.map(lambda a, p: a.astype(jnp.asarray(p).dtype), trained, full_base)
    return InnerResult(lora=trained, losses=host_steps(losses), grad_norms=host_steps(norms),
                       failed=failed | rejected, failure_reason=reasons,
                       steps=counts.astype(np.int32),
                       failed_step=np.where(rejected, 0, fail_steps),
                       truncated_sequences=plan.truncated_K[:k_real].copy())


# ----------------------------------------------------------------------------------------------------
# Fitting K to the device, and many candidates in grouped calls

# Largest K that ran without running out of memory, per (model, adapter, step settings): later calls
# in this process start from it instead of failing again.
_FITTED_K: dict = {}


def is_out_of_memory(error: BaseException) -> bool:
    """An XLA allocation failure (RESOURCE_EXHAUSTED), as raised by jit dispatch or execution."""
    return "RESOURCE_EXHAUSTED" in str(error) or "Out of memory" in str(error)


def _fit_key(cfg, lora_cfg, inner_cfg):
    return (cfg, lora_cfg, dataclasses.replace(inner_cfg, candidate_buckets=()))


def train_candidates_fitting(base_params, plan: TrainPlan, *, cfg: ModelConfig,
                             lora_cfg: Optional[LoraConfig], inner_cfg: InnerConfig = InnerConfig(),
                             init_lora: Any = None, mesh=None, rules=None,
                             train: Callable[..., InnerResult] = None) -> InnerResult:
    """`train_candidates`, but a call that runs out of device memory is split in halves and retried
    (recursively, finished halves kept), so a configured K never crashes a run. The K that fitted
    is logged and remembered: later calls with the same settings are split up front.

    `train` (default `train_candidates`) is the function called per piece; tests inject one that
    raises a fake RESOURCE_EXHAUSTED above some K.
    """
    train = train or train_candidates
    key = _fit_key(cfg, lora_cfg, inner_cfg)
    kw = dict(cfg=cfg, lora_cfg=lora_cfg, inner_cfg=inner_cfg, mesh=mesh, rules=rules)

    def run(index: np.ndarray) -> InnerResult:
        fitted = _FITTED_K.get(key)
        if fitted is not None and len(index) > fitted:
            return concat_results([run(index[i: i + fitted]) for i in range(0, len(index), fitted)])
        sub = plan if len(index) == plan.num_candidates else plan.select(index, inner_cfg.length_buckets)
        sub_init = None if init_lora is None else jax.tree.map(lambda a: a[index], init_lora)
        _PLAIN_NEEDS_OF_CALL.clear()  # filled by this call's plain programs
        try:
            return train(base_params, sub, init_lora=sub_init, **kw)
        except Exception as e:  # noqa: BLE001 - only allocation failures are handled
            if not is_out_of_memory(e):
                raise
            if _remat_mode(cfg, lora_cfg, inner_cfg) == "auto":
                # The memory analysis under-counted (e.g. the evaluation beside it grew): remat the
                # failed call's largest plain program and every program at least as big, and retry.
                # Each further failure lowers the limit to the largest plain program still left
                # (all programs once none is), then K is halved. Starting from the smallest instead
                # rematerialised nearly every program of the paper E-step after one failure (the
                # 135M model at K=128: limit 3.7 GiB against a 43 GiB allocation that failed), a
                # lesson that then persisted in remat_limits.json.
                limit = max(_PLAIN_NEEDS_OF_CALL) if _PLAIN_NEEDS_OF_CALL else 0
                _learn_remat_limit(key, limit)
                log.warning("inner loop: K=%d ran out of device memory; retrying with remat on %s",
                            len(index), f"programs planning >= {limit / 2**30:.1f} GiB" if limit
                            else "every program")
                gc.collect()
                return run(index)
            if len(index) == 1:
                raise
            half = (len(index) + 1) // 2
            _FITTED_K[key] = min(_FITTED_K.get(key, half), half)
            log.warning("inner loop: K=%d ran out of device memory; retrying as K=%d", len(index), half)
            gc.collect()  # release the failed attempt's device buffers before retrying
            return concat_results([run(index[:half]), run(index[half:])])

    result = run(np.arange(plan.num_candidates))
    if key in _FITTED_K:
        log.info("inner loop: settled on K=%d candidates per call", _FITTED_K[key])
    return result


def _fitted_pieces(plan: TrainPlan, cfg, lora_cfg, inner_cfg) -> list[TrainPlan]:
    """The plans `train_candidates_fitting` will run for `plan` when it splits up front."""
    fitted = _FITTED_K.get(_fit_key(cfg, lora_cfg, inner_cfg))
    k = plan.num_candidates
    if fitted is None or k <= fitted:
        return [plan]
    return [plan.select(np.arange(i, min(i + fitted, k)), inner_cfg.length_buckets)
            for i in range(0, k, fitted)]


def precompile(base_params, plans: Sequence[TrainPlan], *, cfg: ModelConfig,
               lora_cfg: Optional[LoraConfig], inner_cfg: InnerConfig = InnerConfig(), mesh=None,
               rules=None, workers: int = 0) -> int:
    """Compile the chunk programs that training `plans` will run, concurrently, and wait for them;
    returns how many were compiled. See `start_precompile`."""
    return start_precompile(base_params, plans, cfg=cfg, lora_cfg=lora_cfg, inner_cfg=inner_cfg,
                            mesh=mesh, rules=rules, workers=workers).wait()


class LoweringOrder:
    """Background compile jobs trace and lower their program one at a time, in job order.

    Tracing and lowering are Python and hold the GIL (~0.9 s a program on a CPU; with the compilation
    cache warm they are nearly all of a program's time); XLA's compile releases it. Lowered by
    parallel threads, the GIL went round-robin over all of them, so every program was ready at about
    the same time, after nearly all of them: on an H200 with the cache warm the E-step's first call,
    which needs 2-10 of its 28 programs, still waited 26-30 s for all of them. In job order (the
    order the calls need them), the first call's programs are lowered first; their compiles still run
    in parallel with the next lowerings. A job's turn ends after its first lowering (a remat choice
    may lower a second program: that one goes unordered) or when it ends without one.
    """

    def __init__(self):
        self._cond = threading.Condition()
        self._next = 0
        self._finished: set = set()
        self._open = False

    def wait(self, ticket: int) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._open or self._next == ticket)

    def finish(self, ticket: int) -> None:
        with self._cond:
            self._finished.add(ticket)
            while self._next in self._finished:
                self._finished.discard(self._next)
                self._next += 1
            self._cond.notify_all()

    def open(self) -> None:
        """Let every waiting job lower now (cancelled jobs never take their turn)."""
        with self._cond:
            self._open = True
            self._cond.notify_all()


# The ticket of the background job running on this thread (`LoweringOrder`), unset elsewhere.
_JOB_TICKET = threading.local()


@contextlib.contextmanager
def _lowering_turn():
    """Around a trace + lower: in a background compile job, its first one waits for the job's turn
    and ends it; anywhere else (a call's own compile) it runs at once."""
    order, ticket = getattr(_JOB_TICKET, "order", None), getattr(_JOB_TICKET, "ticket", None)
    if order is None:
        yield
        return
    _JOB_TICKET.order = None  # later lowerings of this job are not ordered
    order.wait(ticket)
    try:
        yield
    finally:
        order.finish(ticket)


class BackgroundCompile:
    """Chunk programs compiling in worker threads, in the order the calls will first need them.

    A feeder thread walks the plans (host work: building each call's step batches) and hands each
    new program to the workers as it meets it. A call that reaches a program still compiling waits
    for it (`step_lib.program_lock`) instead of compiling it again, and one that reaches a program
    not yet started compiles it itself (the worker then finds it done), so the calls run while this
    compiles: the first call starts once its own programs are ready instead of after the round's.
    """

    def __init__(self, jobs: Iterable[Callable[[], None]], workers: int):
        self.programs = 0  # jobs handed to the workers
        self.seconds: Optional[float] = None  # wall time until the last job finished
        self._started = time.perf_counter()
        self._before = len(step_lib.PRECOMPILED)
        self._compiled: Optional[int] = None
        self._lock = threading.Lock()
        self._pending = 1  # the feeder counts as one until it has handed over every job
        self._cancelled = False
        self._callbacks: list = []
        self._finished = threading.Event()
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers),
                                                           thread_name_prefix="precompile")
        self._futures: list = []
        self._order = LoweringOrder()
        threading.Thread(target=self._feed, args=(iter(jobs),), name="precompile-plans",
                         daemon=True).start()

    def _feed(self, jobs) -> None:
        try:
            for job in jobs:
                with self._lock:
                    if self._cancelled:
                        break
                    self._pending += 1
                    self.programs += 1
                    future = self._pool.submit(self._run_in_order, self.programs - 1, job)
                    self._futures.append(future)
                future.add_done_callback(self._job_done)
        except Exception as e:  # noqa: BLE001 - planning failed: the calls plan (and report) themselves
            log.warning("inner loop: precompile stopped planning (%s); the calls compile the rest",
                        brief(e, 200))
        finally:
            self._pool.shutdown(wait=False)  # the threads end after the last job
            self._job_done(None)

    def _run_in_order(self, ticket: int, job: Callable[[], None]) -> None:
        _JOB_TICKET.order, _JOB_TICKET.ticket = self._order, ticket
        try:
            job()
        finally:
            if _JOB_TICKET.order is not None:  # ended without lowering: the turn passes on
                _JOB_TICKET.order = None
                self._order.finish(ticket)

    def _job_done(self, _future) -> None:
        with self._lock:
            self._pending -= 1
            last = self._pending == 0
        if last:
            self.seconds = time.perf_counter() - self._started
            self._compiled = len(step_lib.PRECOMPILED) - self._before
            log.info("inner loop: precompiled %d programs in %.1f s", self._compiled, self.seconds)
            self._finished.set()
            for callback in self._callbacks:
                callback(self)

    def add_done_callback(self, callback: Callable[["BackgroundCompile"], None]) -> None:
        """Call `callback(self)` once every job has finished (now, if they have)."""
        with self._lock:
            if self._pending:
                self._callbacks.append(callback)
                return
        self._finished.wait()
        callback(self)

    def done(self) -> bool:
        return self._finished.is_set()

    def wait(self) -> int:
        """Wait for every job; returns how many programs were compiled while they ran (by the
        workers, or by calls that reached them first)."""
        self._finished.wait()
        return int(self._compiled)

    def cancel(self) -> int:
        """Drop the jobs not yet started (a stopped or failed E-step) and wait for the running ones."""
        with self._lock:
            self._cancelled = True
            futures = list(self._futures)
        for future in futures:
            future.cancel()
        self._order.open()  # a cancelled job never takes its turn: the running ones go on without it
        return self.wait()


def start_precompile(base_params, plans: Iterable[TrainPlan], *, cfg: ModelConfig,
                     lora_cfg: Optional[LoraConfig], inner_cfg: InnerConfig = InnerConfig(), mesh=None,
                     rules=None, workers: int = 0) -> BackgroundCompile:
    """Start compiling the chunk programs that training `plans` (built lazily, if a generator) will
    run, in worker threads, in the order of first use; returns at once.

    XLA compiles one program on one thread, and a round's distinct (K, length bucket) programs would
    otherwise compile one after another as the calls reach them (13 programs, 155 s of a 292 s
    E-step on an H200). Compiled here, they land in jit's own cache: the calls dispatch them without
    compiling. Nothing is allocated on the device (the state is abstract); remat is decided on the
    memory free now, before the calls allocate. A program that fails to compile here is left to the
    call itself, which reports or splits as usual. `workers`: threads (0: the host's cores less one,
    which the calls and the evaluation use).
    """
    if mesh is not None and dist.spans_processes(mesh):
        return BackgroundCompile([], 1)  # each process's calls place their inputs globally first
    mode = _remat_mode(cfg, lora_cfg, inner_cfg) or "precompile"
    limit = _remat_limit(_fit_key(cfg, lora_cfg, inner_cfg)) if mode == "auto" else None
    free = _free_device_bytes()

    def compile_one(job) -> None:
        step_cfg, piece_rules, frozen, state, xs = job
        if interrupt.stop_requested():  # Ctrl-C: stop at the next call boundary, not after all compiles
            return
        try:
            if mode == "precompile":
                _compile(step_cfg, mesh, piece_rules, frozen, state, xs, skip_compiled=True)
            else:
                _chunk_program(step_cfg, mode, mesh, piece_rules, frozen, state, xs, limit=limit, free=free)
        except Exception as e:  # noqa: BLE001 - the call itself compiles (and reports) it again
            log.warning("inner loop: precompiling %s failed (%s); left to the call", _describe(xs),
                        brief(e, 200))

    def jobs():
        seen = set()
        for plan in plans:
            for piece in _fitted_pieces(plan, cfg, lora_cfg, inner_cfg):
                padded, step_cfg, piece_rules, frozen, state = _prepare(
                    base_params, piece, cfg=cfg, lora_cfg=lora_cfg, inner_cfg=inner_cfg, init_lora=None,
                    mesh=mesh, rules=rules, abstract=True)
                c = inner_cfg.steps_per_chunk
                for _, _, xs in _chunk_batches(padded, c, _packs(padded, lora_cfg, mesh)):
                    job_key = (step_cfg, c, *_program_dims(xs))
                    if job_key not in seen:
                        seen.add(job_key)
                        yield functools.partial(compile_one, (step_cfg, piece_rules, frozen, state, xs))

    return BackgroundCompile(jobs(), workers or max(1, (os.cpu_count() or 2) - 1))


def fitted_candidates_per_call(cfg, lora_cfg, inner_cfg) -> Optional[int]:
    """The K this process settled on after running out of memory (None: never split)."""
    return _FITTED_K.get(_fit_key(cfg, lora_cfg, inner_cfg))


def train_grouped(base_params, candidates: Sequence[CandidateData],
                  hparams: Optional[Sequence[Optional[Mapping[str, Any]]]] = None, *,
                  cfg: ModelConfig, lora_cfg: LoraConfig, inner_cfg: InnerConfig = InnerConfig(),
                  max_k: int, pad_id: int, eos_id: Optional[int] = None, mesh=None,
                  rules=None) -> InnerResult:
    """Many candidates in calls of at most `max_k`, grouped by work (`group_candidates`), each call
    fitted to device memory; results in the order of `candidates`. Candidate k keeps seed k (or
    its own), so the result of each candidate is that of training it alone."""
    hparams = pin_seeds(hparams, len(candidates))
    groups = group_candidates(candidates, hparams, inner_cfg, max_k)
    parts = []
    for group in groups:
        plan = build_plan([candidates[k] for k in group], [hparams[k] for k in group], inner_cfg,
                          pad_id=pad_id, eos_id=eos_id)
        parts.append(train_candidates_fitting(base_params, plan, cfg=cfg, lora_cfg=lora_cfg,
                                              inner_cfg=inner_cfg, mesh=mesh, rules=rules))
    return concat_results(parts, order=[k for group in groups for k in group])
