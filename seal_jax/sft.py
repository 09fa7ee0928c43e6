"""The ReST-EM M-step: supervised fine-tuning of the policy on its own best self-edits.

Input: examples (prompt_ids, completion_ids, weight). Each becomes one training sequence
prompt + completion + EOS whose loss mask is 0 on the prompt and `weight` on the completion and the
EOS (TRL's completion-only loss, which appends EOS to the completion). Weights are 0/1 filters or
reward weights: a weight-0 example is dropped before batching, so it has no effect at all (not even
on which examples share a batch); a weight w > 0 scales that example's token losses, and each step's
loss is sum(w * nll) / #target tokens (so weights of 1 are exactly HF's per-step mean).

Training reuses the inner loop (`seal_jax.inner`) as a single candidate: same host plan, same
compiled chunk program, same optax update (torch clipping + AdamW, the schedule), gradient accumulation via
`microbatches`. With a LoRA config the adapter is trained and merged into the base (W + scale*A@B in
fp32, cast back), as the reference's `merge_and_unload`; the next round starts from the merged model
with a fresh adapter. `train_policy` also hands back that adapter (`PolicyUpdate`), so the round can
checkpoint the policy as the adapters merged into the base. With `lora=None` the base params
themselves are trained (fp32 master copy).

Reference recipe (knowledge, `train_SFT.py`): LoRA r64 / alpha 128 on all seven projections, lr 3e-4,
2 epochs, global batch 10 (per-device 1 x grad-accum 5 x 2 GPUs), linear decay, no warmup, AdamW
defaults, no truncation. Those are the `SFTConfig` defaults (`SFT_INNER`); microbatches=10 keeps the
reference's one-sequence-at-a-time activation memory. `SFTConfig.from_fields` builds one from a flat
config section (any InnerConfig field, plus lora and seed).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence

import jax
import numpy as np

from seal_jax import distributed, inner
from seal_jax import lora as lora_lib
from seal_jax.model.config import LORA_TARGETS, LoraConfig, ModelConfig

Example = tuple  # (prompt_ids, completion_ids, weight)


# The reference recipe as inner-loop settings. Data order "independent": with one candidate there is
# nothing to align, and it keeps the M-step's example order what it was for a given seed.
SFT_INNER = inner.InnerConfig(
    batch_size=10, microbatches=10, epochs=2, learning_rate=3e-4, schedule="linear", warmup_steps=0,
    max_grad_norm=1.0, weight_decay=0.0, append_eos=False, shuffle="independent",
    length_buckets=(128, 256, 512, 1024, 2048, 4096, 8192), steps_per_chunk=16)

SFT_LORA = LoraConfig(rank=64, alpha=128.0, targets=LORA_TARGETS)


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """The M-step: an adapter (None: full fine-tune), the inner-loop settings it trains with, and the
    seed of its data order and adapter init (HF's default seed)."""

    lora: Optional[LoraConfig] = SFT_LORA
    inner: inner.InnerConfig = SFT_INNER
    seed: int = 42

    @classmethod
    def from_fields(cls, *, lora: Optional[LoraConfig] = SFT_LORA, seed: int = 42,
                    **inner_fields) -> "SFTConfig":
        """SFTConfig from flat fields (a config section): InnerConfig fields override SFT_INNER."""
        known = {f.name for f in dataclasses.fields(inner.InnerConfig)}
        unknown = sorted(set(inner_fields) - known)
        if unknown:
            raise ValueError(f"unknown SFT field(s) {unknown}; known: lora, seed and the InnerConfig "
                             f"fields {sorted(known)}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in inner_fields.items()}
        return cls(lora=lora, inner=SFT_INNER.replace(**values), seed=int(seed))


def build_sft_candidate(examples: Sequence[Example], *, eos_id: int,
                        max_length: Optional[int] = None) -> tuple[inner.CandidateData, list[int]]:
    """One inner-loop candidate from the examples with weight > 0, and the indices it kept."""
    sequences, masks, kept = [], [], []
    for i, example in enumerate(examples):
        if len(example) != 3:
            raise ValueError(f"example {i}: expected (prompt_ids, completion_ids, weight), got "
                             f"{len(example)} fields")
        prompt, completion, weight = example
        weight = float(weight)
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"example {i}: weight must be finite and >= 0, got {weight}")
        if weight == 0:
            continue
        prompt = np.asarray(prompt, np.int32).reshape(-1)
        completion = np.asarray(completion, np.int32).reshape(-1)
        seq = np.concatenate([prompt, completion, np.array([eos_id], np.int32)])
        if max_length is not None and len(seq) > max_length:
            raise ValueError(f"example {i}: prompt + completion + EOS is {len(seq)} tokens, longer "
                             f"than the largest length bucket ({max_length}); the reference does not "
                             f"truncate, so raise the SFT length_buckets")
        mask = np.zeros(len(seq), np.float32)
        mask[len(prompt):] = weight
        sequences.append(seq)
        masks.append(mask)
        kept.append(i)
    return inner.CandidateData(sequences, masks), kept


@dataclasses.dataclass(frozen=True)
class PolicyUpdate:
    """What one M-step did to the policy.

    `params` is the new policy. With a LoRA M-step, `adapter` (host arrays, no candidate axis) and
    `lora_cfg` are the adapter that was merged: `params == merge_lora(old params, adapter, cfg,
    lora_cfg)` bit for bit, so a checkpoint may hold the adapter instead of the params
    (`seal_jax.checkpoints.PolicyHistory`). `full_finetune` says the params themselves were trained:
    no adapter describes the change. Neither set: nothing was trained, `params` is the old policy.
    """

    params: Any
    metrics: dict
    adapter: Optional[dict] = None
    lora_cfg: Optional[LoraConfig] = None
    full_finetune: bool = False


def train_policy(params, examples: Sequence[Example], *, cfg: ModelConfig,
                 sft_cfg: SFTConfig = SFTConfig(), eos_id: int, pad_id: Optional[int] = None,
                 mesh=None, rules=None) -> PolicyUpdate:
    """Fine-tune the policy on the examples; returns the new params, metrics and the merged adapter.

    With `sft_cfg.lora`, the trained adapter is merged into a copy of `params` (the input is not
    modified). If training hits a non-finite loss/gradient, the adapter/params from the last finite
    step are used and metrics["failure_reason"] says so.
    """
    pad_id = eos_id if pad_id is None else pad_id  # the reference's pad = EOS
    candidate, kept = build_sft_candidate(examples, eos_id=eos_id,
                                          max_length=sft_cfg.inner.max_length)
    metrics = {"examples": len(examples), "examples_used": len(kept), "steps": 0, "losses": [],
               "failed": False, "failure_reason": None,
               "target_tokens": int(sum(float((m > 0).sum()) for m in candidate.loss_masks))}
    if not kept:
        return PolicyUpdate(params, metrics)
    inner_cfg = sft_cfg.inner
    plan = inner.build_plan([candidate], [{"seed": sft_cfg.seed}], inner_cfg, pad_id=pad_id)
    # Its length buckets' programs compiled at once, in parallel, rather than one per new bucket.
    inner.precompile(params, [plan], cfg=cfg, lora_cfg=sft_cfg.lora, inner_cfg=inner_cfg, mesh=mesh,
                     rules=rules)
    result = inner.train_candidates(params, plan, cfg=cfg, lora_cfg=sft_cfg.lora,
                                    inner_cfg=inner_cfg, mesh=mesh, rules=rules)
    metrics.update(steps=int(result.steps[0]), losses=result.losses[0].tolist(),
                   failed=bool(result.failed[0]), failure_reason=result.failure_reason[0])
    if sft_cfg.lora is None:
        return PolicyUpdate(jax.tree.map(lambda a: a[0], result.lora), metrics, full_finetune=True)
    # The merge reads the adapter's host copy, the one a checkpoint stores: a resumed run merges the
    # same arrays with the same program and so rebuilds these params bit for bit.
    adapter = jax.tree.map(lambda a: a[0], distributed.to_host(result.lora))
    new_params = lora_lib.merge_lora(params, adapter, cfg, sft_cfg.lora)
    return PolicyUpdate(new_params, metrics, adapter, sft_cfg.lora)


def sft_update(params, examples: Sequence[Example], *, cfg: ModelConfig,
               sft_cfg: SFTConfig = SFTConfig(), eos_id: int, pad_id: Optional[int] = None,
               mesh=None, rules=None) -> tuple[Any, dict]:
    """`train_policy` for callers that need only `(new params, metrics)`."""
    update = train_policy(params, examples, cfg=cfg, sft_cfg=sft_cfg, eos_id=eos_id, pad_id=pad_id,
                          mesh=mesh, rules=rules)
    return update.params, update.metrics
