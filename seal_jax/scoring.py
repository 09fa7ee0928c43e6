"""Log-likelihood of completions given prompts, batched, one LoRA adapter per row group.

Used to score adapted candidates without sampling (log p(answer | question) under each candidate)
and for policy diagnostics. Rows are batched exactly as in `sampling.generate` (the same
`plan_row_groups` / `prepare_lora` helpers), right-padded, and run through one `forward` call with
segment ids marking padding. The log-probability of token t is minus the next-token loss of the
inner loop (`seal_jax/loss.py`: the LM head applied in chunks, never the full [B, T, V] logits).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Int

from seal_jax import compile_cache
from seal_jax.loss import next_token_nll
from seal_jax.model.config import LoraConfig, ModelConfig
from seal_jax.model.tokenizer import resolve_pad_id
from seal_jax.sampling import (bucket, check_prompts, gather_groups, place_on_mesh, plan_row_groups,
                               prepare_lora, shard_rows)

MIN_LENGTH_BUCKET = 16
# Rows x positions of float32 logits held at once (seal_jax/loss.py): 2048 x 152k vocab = 1.2 GB.
SCORE_CHUNK_TOKENS = 2048


@dataclasses.dataclass(frozen=True)
class SequenceScores:
    """Per row: sum of completion-token log-probs, their count, and the mean (nan when count is 0)."""

    sum_logprob: np.ndarray  # [N] float64
    num_tokens: np.ndarray  # [N] int64
    mean_logprob: np.ndarray  # [N] float64


@compile_cache.cached_jit(name="score_batch", static_argnames=("cfg", "lora_cfg"))
def _score_batch(params, lora_LxK, adapters_G: Int[Array, " G"], tokens_BxT: Int[Array, "B T"],
                 segment_ids_BxT: Int[Array, "B T"], target_mask_BxT: Bool[Array, "B T"], *,
                 cfg: ModelConfig, lora_cfg: Optional[LoraConfig]):
    """Sum of log p(token_t | tokens_<t) over target positions, and the target count, per row."""
    lora = gather_groups(lora_LxK, adapters_G)
    positions_BxT = jnp.broadcast_to(jnp.arange(tokens_BxT.shape[1], dtype=jnp.int32), tokens_BxT.shape)
    logp_BxT = -next_token_nll(params, tokens_BxT, cfg=cfg, lora=lora, lora_cfg=lora_cfg,
                               positions_BxT=positions_BxT, segment_ids_BxT=segment_ids_BxT,
                               chunk_tokens=SCORE_CHUNK_TOKENS)
    mask_BxT = target_mask_BxT[:, 1:]
    return jnp.sum(jnp.where(mask_BxT, logp_BxT, 0.0), axis=-1), jnp.sum(mask_BxT, axis=-1)


def score_sequences(
    params,
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    *,
    cfg: ModelConfig,
    lora: Optional[Any] = None,
    lora_cfg: Optional[LoraConfig] = None,
    adapter_index: Optional[Sequence[int]] = None,
    batch_size: int = 16,
    pad_id: Optional[int] = None,
    mesh=None,
    rules=None,
) -> SequenceScores:
    """log p(completion | prompt) per row, with token counts and per-token means.

    `lora` / `adapter_index` work as in `sampling.generate`: one adapter for all rows, or a
    candidate stack `[K, L, ...]` with one candidate index per row. Prompts must be non-empty (the
    first completion token needs context); an empty completion scores 0 over 0 tokens.
    `mesh` / `rules` shard the base, the adapters and the rows as in `sampling.generate`.
    """
    prompt_arrays = check_prompts(prompts, cfg, "prompt")
    completion_arrays = check_prompts(completions, cfg, "completion")
    n = len(prompt_arrays)
    if len(completion_arrays) != n:
        raise ValueError(f"got {len(completion_arrays)} completions for {n} prompts")
    lora_LxK, index = prepare_lora(lora, lora_cfg, cfg, adapter_index, n)
    params, lora_LxK = place_on_mesh(params, lora_LxK, cfg, mesh, rules)
    if pad_id is None:
        pad_id = resolve_pad_id(None, cfg)
    lengths = [p.size + c.size for p, c in zip(prompt_arrays, completion_arrays)]

    pending = []
    for plan in plan_row_groups(index, lengths, batch_size):
        rows, real = plan.rows, plan.real
        b = len(rows)
        length = bucket(max(lengths[r] for r in rows[real]), MIN_LENGTH_BUCKET)
        tokens = np.full((b, length), pad_id, np.int32)
        segments = np.zeros((b, length), np.int32)
        targets = np.zeros((b, length), bool)
        segments[~real, 0] = 1  # padding rows: one real token, so no row attends to nothing
        for j in np.flatnonzero(real):
            p, c = prompt_arrays[rows[j]], completion_arrays[rows[j]]
            tokens[j, : p.size] = p
            tokens[j, p.size : p.size + c.size] = c
            segments[j, : p.size + c.size] = 1
            targets[j, p.size : p.size + c.size] = True
        tokens, segments, targets = shard_rows((tokens, segments, targets),
                                               (("batch", None),) * 3, mesh, rules)
        result = _score_batch(
            params, lora_LxK, jnp.asarray(plan.adapters), tokens, segments, targets,
            cfg=cfg, lora_cfg=lora_cfg if lora_LxK is not None else None,
        )
        pending.append((plan, result))

    total = np.zeros(n, np.float64)
    count = np.zeros(n, np.int64)
    for plan, (sum_B, count_B) in pending:
        real_rows = plan.rows[plan.real]
        total[real_rows] = np.asarray(sum_B)[plan.real]
        count[real_rows] = np.asarray(count_B)[plan.real]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    return SequenceScores(total, count, mean)


def sequence_logprobs(
    params,
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    *,
    cfg: ModelConfig,
    lora: Optional[Any] = None,
    lora_cfg: Optional[LoraConfig] = None,
    adapter_index: Optional[Sequence[int]] = None,
    batch_size: int = 16,
    mesh=None,
    rules=None,
) -> np.ndarray:
    """sum log p(completion | prompt) per row (docs/DESIGN.md §4); see `score_sequences`."""
    return score_sequences(
        params, prompts, completions, cfg=cfg, lora=lora, lora_cfg=lora_cfg,
        adapter_index=adapter_index, batch_size=batch_size, mesh=mesh, rules=rules,
    ).sum_logprob
