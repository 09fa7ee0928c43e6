"""Batched text generation with a KV cache, one LoRA adapter per row group.

SEAL samples in two places: the policy writes self-edits (temperature 1.0, top-p 0.95, thousands of
tokens) and every adapted candidate answers questions (greedy, 64 tokens, stop at EOS). Both go
through `generate`, which turns a ragged list of requests into a few fixed-shape device batches:

* Requests are grouped by adapter (`adapter_index[i]` picks candidate `k` of a LoRA stacked
  `[K, L, ...]`), each adapter's rows are cut into groups of R rows, and G groups form one batch, laid
  out group-major as the model's grouped-LoRA form expects (`A: [L, G, in, r]`, rows
  `[g*R, (g+1)*R)` use adapter g). `plan_row_groups` does this and is shared with `scoring.py`.
* Prompts are left-padded so every row's last prompt token sits in the same column; each row's
  positions count only its real tokens, so padding changes nothing but the batch shape.
* One jitted function per (bucketed) shape does the prefill and then a `lax.while_loop` over decode
  steps that stops as soon as every row has hit a stop token or its own `max_new_tokens`.
  The prefill runs all but the last prompt column in chunks whose logits are discarded (XLA then
  drops their LM-head matmul, and no [B, P, V] array ever exists), then the last column alone.
  Batch size, prompt length and generation length are rounded up to powers of two, so a long run
  compiles a handful of programs, and `jax.jit` keeps them.

Randomness: row i draws from `fold_in(key(seed_i), i)` folded with the step number. Its stream
depends only on its seed and its position in the request list, not on chunking, batch size or adapter
grouping, and identical prompts repeated at different positions (SEAL's k self-edits per passage)
get independent samples from one shared `SamplingParams`.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from seal_jax.lora import check_lora, num_candidates
from seal_jax.model.tokenizer import resolve_pad_id
from seal_jax.model import transformer
from seal_jax.model.config import LoraConfig, ModelConfig

Lora = Any
Params = Any

MIN_PROMPT_BUCKET = 16
PREFILL_CHUNK = 256  # prompt tokens per prefill step: bounds the [B, heads, chunk, S] scores
MIN_NEW_TOKENS_BUCKET = 16
MIN_STOP_BUCKET = 4


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to decode one request (vLLM's names and meanings).

    temperature 0 is greedy. top_p keeps the smallest set of most likely tokens whose probability
    reaches top_p. stop_ids=None means "the tokenizer's stop ids, or cfg.eos_token_id without a
    tokenizer"; an empty tuple means stop only at max_new_tokens.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    stop_ids: Optional[Sequence[int]] = None
    seed: int = 0

    def __post_init__(self):
        if not self.temperature >= 0.0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {self.seed}")


@dataclasses.dataclass(frozen=True)
class Generation:
    """One completion. token_ids and text stop before the stop token; stop_token says which one."""

    text: Optional[str]
    token_ids: list[int]
    finish_reason: str  # "stop" | "length"
    stop_token: Optional[int] = None


# ---------------------------------------------------------------------------------------------
# Row grouping, shared with scoring.py


@dataclasses.dataclass(frozen=True)
class RowGroups:
    """One device batch of G groups of R rows, group-major.

    rows[g*R + j] is the request index of that row, or -1 for a padding row; adapters[g] is the
    candidate whose LoRA group g uses (padding groups repeat a real one; their rows are all -1).
    """

    rows: np.ndarray  # [G*R] int64
    adapters: np.ndarray  # [G] int32
    group_size: int

    @property
    def num_groups(self) -> int:
        return len(self.adapters)

    @property
    def real(self) -> np.ndarray:
        return self.rows >= 0


def bucket(n: int, minimum: int = 1, maximum: Optional[int] = None) -> int:
    """Smallest power of two >= max(n, minimum), capped at maximum (which need not be a power)."""
    size = max(int(minimum), 1)
    while size < n:
        size *= 2
    return size if maximum is None else min(size, maximum)


def plan_row_groups(
    adapter_index: Optional[Sequence[int]],
    lengths: Sequence[int],
    batch_size: int,
) -> list[RowGroups]:
    """Split requests into device batches of equal-size adapter groups.

    Rows are ordered by (adapter, length) so each batch pads prompts to similar lengths. The group
    size R is the largest adapter's row count rounded up to a power of two (at most batch_size), and
    each batch holds up to batch_size // R groups, their count rounded up to a power of two; so the
    set of compiled batch shapes stays small. Without adapters every row is "adapter 0".
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(lengths)
    if n == 0:
        return []
    adapters = np.zeros(n, np.int64) if adapter_index is None else np.asarray(adapter_index, np.int64)
    order = np.lexsort((np.asarray(lengths), adapters))  # stable: ties keep request order
    sorted_adapters = adapters[order]
    group_size = bucket(int(np.bincount(sorted_adapters).max()), maximum=batch_size)
    max_groups = max(1, batch_size // group_size)

    slots = []  # (adapter, request indices) with at most group_size rows each
    starts = np.flatnonzero(np.r_[True, sorted_adapters[1:] != sorted_adapters[:-1]])
    for begin, end in zip(starts, np.r_[starts[1:], n]):
        for s in range(begin, end, group_size):
            slots.append((int(sorted_adapters[begin]), order[s : min(s + group_size, end)]))

    batches = []
    for first in range(0, len(slots), max_groups):
        chunk = slots[first : first + max_groups]
        rows_per_group = bucket(max(len(r) for _, r in chunk), maximum=group_size)
        num_groups = bucket(len(chunk), maximum=max_groups)
        rows = np.full((num_groups, rows_per_group), -1, np.int64)
        groups = np.full(num_groups, chunk[0][0], np.int32)
        for g, (adapter, idx) in enumerate(chunk):
            rows[g, : len(idx)] = idx
            groups[g] = adapter
        batches.append(RowGroups(rows.reshape(-1), groups, rows_per_group))
    return batches


def prepare_lora(
    lora: Optional[Lora],
    lora_cfg: Optional[LoraConfig],
    cfg: ModelConfig,
    adapter_index: Optional[Sequence[int]],
    num_rows: int,
) -> tuple[Optional[Lora], Optional[np.ndarray]]:
    """Validate (lora, adapter_index) and return (lora in the [L, K, ...] layout, per-row indices).

    Accepted: no LoRA; one adapter `[L, ...]` for every row (adapter_index None or all 0); or a
    stack `[K, L, ...]` with one adapter index per row (may be omitted when K == 1). The transpose to
    the grouped layout happens here, once per call; each batch then gathers its G adapters.
    """
    if lora is None:
        if adapter_index is not None:
            raise ValueError("adapter_index was given but lora is None")
        return None, None
    if lora_cfg is None:
        raise ValueError("lora was given without lora_cfg")
    ndims = {leaf.ndim for leaf in jax.tree.leaves(lora)}
    stacked = ndims == {4}
    check_lora(lora, cfg, lora_cfg, candidate_axis=stacked)
    if not stacked:  # a single adapter: a stack of one
        lora = jax.tree.map(lambda x: x[None], lora)
    k = num_candidates(lora)
    if adapter_index is None:
        if k != 1:
            raise ValueError(f"lora stacks K={k} candidates: adapter_index (one per prompt) is required")
        index = np.zeros(num_rows, np.int64)
    else:
        index = np.asarray(adapter_index, np.int64).reshape(-1)
        if len(index) != num_rows:
            raise ValueError(f"adapter_index has {len(index)} entries for {num_rows} prompts")
        bad = np.flatnonzero((index < 0) | (index >= k))
        if len(bad):
            raise ValueError(
                f"adapter_index[{bad[0]}]={index[bad[0]]} is out of range for K={k} candidates"
            )
    grouped = jax.tree.map(lambda x: jnp.swapaxes(jnp.asarray(x), 0, 1), lora)  # [L, K, ...]
    return grouped, index


def on_device(params: Params) -> Params:
    """Host (numpy) leaves -> device arrays, once per call rather than once per batch; device
    arrays (sharded or not) pass through untouched."""
    return jax.tree.map(lambda x: x if isinstance(x, jax.Array) else jnp.asarray(x), params)


def gather_groups(lora_LxK: Optional[Lora], adapters_G: jax.Array) -> Optional[Lora]:
    """[L, K, ...] -> [L, G, ...]: the adapters of one batch's groups (traced, once per batch)."""
    if lora_LxK is None:
        return None
    return jax.tree.map(lambda x: jnp.take(x, adapters_G, axis=1), lora_LxK)


# ---------------------------------------------------------------------------------------------
# Device side


def _pick_tokens(logits_BxV, keys_B, temperature_B, top_p_B, *, stochastic: bool, nucleus: bool):
    """Next token per row: argmax where temperature == 0, else a (nucleus) sample."""
    greedy_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    if not stochastic:
        return greedy_B
    sampled_rows_B = temperature_B > 0
    scaled_BxV = logits_BxV / jnp.where(sampled_rows_B, temperature_B, 1.0)[:, None]
    if nucleus:
        # Sort descending; keep a token while the mass strictly before it is < top_p, so the most
        # likely token is always kept and top_p -> 0 is greedy. Stable sort: ties go to the lower id,
        # as argmax does.
        order_BxV = jnp.argsort(-scaled_BxV, axis=-1, stable=True)
        sorted_BxV = jnp.take_along_axis(scaled_BxV, order_BxV, axis=-1)
        probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
        mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
        keep_BxV = mass_before_BxV < top_p_B[:, None]
        keep_BxV = keep_BxV.at[:, 0].set(True)
        sorted_BxV = jnp.where(keep_BxV, sorted_BxV, -jnp.inf)
        choice_B = jax.vmap(jax.random.categorical)(keys_B, sorted_BxV)
        sampled_B = jnp.take_along_axis(order_BxV, choice_B[:, None], axis=-1)[:, 0]
    else:
        sampled_B = jax.vmap(jax.random.categorical)(keys_B, scaled_BxV)
    return jnp.where(sampled_rows_B, sampled_B.astype(jnp.int32), greedy_B)


@functools.partial(
    jax.jit,
    static_argnames=("cfg", "lora_cfg", "max_new_bucket", "prefill_chunk", "stochastic", "nucleus"),
)
def _generate_batch(
    params,
    lora_LxK,
    adapters_G,
    tokens_BxP,
    prompt_mask_BxP,
    max_new_B,
    stop_ids_BxS,
    temperature_B,
    top_p_B,
    seed_B,
    request_B,
    pad_id,
    *,
    cfg: ModelConfig,
    lora_cfg: Optional[LoraConfig],
    max_new_bucket: int,
    prefill_chunk: int,
    stochastic: bool,
    nucleus: bool,
):
    """Prefill left-padded prompts, then decode until every row is done.

    tokens_BxP holds P = Q + 1 columns, Q a multiple of prefill_chunk (or smaller than it).

    Returns (tokens_BxN with pad after each row's end, count_B tokens emitted per row including a
    stop token, stopped_B whether the row ended on a stop token).
    """
    batch = tokens_BxP.shape[0]
    lora = gather_groups(lora_LxK, adapters_G)
    row_keys_B = jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(seed_B, request_B)

    def pick(logits_BxV, step):
        keys_B = jax.vmap(jax.random.fold_in, in_axes=(0, None))(row_keys_B, step)
        return _pick_tokens(logits_BxV, keys_B, temperature_B, top_p_B,
                            stochastic=stochastic, nucleus=nucleus)

    def is_stop(tok_B):
        return jnp.any(tok_B[:, None] == stop_ids_BxS, axis=-1)

    length_B = prompt_mask_BxP.sum(axis=-1).astype(jnp.int32)
    positions_BxP = jnp.maximum(jnp.cumsum(prompt_mask_BxP, axis=-1) - 1, 0).astype(jnp.int32)
    prefix_len = tokens_BxP.shape[1] - 1
    chunk = min(prefill_chunk, prefix_len)
    # Cache slots: Q prefix + 1 last prompt token + (max_new_bucket - 1) fed-back tokens.
    cache = transformer.init_cache(cfg, batch, prefix_len + max_new_bucket)

    def prefill_chunk_step(cache, chunk_inputs):
        tokens_BxC, positions_BxC, mask_BxC = chunk_inputs
        _, cache = transformer.forward_with_cache(
            params, tokens_BxC, cache, cfg=cfg, lora=lora, lora_cfg=lora_cfg,
            positions_BxT=positions_BxC, token_mask_BxT=mask_BxC,
        )
        return cache, None

    def chunks(x_BxP):  # [B, Q + 1] -> [Q / chunk, B, chunk]
        return x_BxP[:, :prefix_len].reshape(batch, prefix_len // chunk, chunk).swapaxes(0, 1)

    cache, _ = jax.lax.scan(
        prefill_chunk_step, cache, (chunks(tokens_BxP), chunks(positions_BxP), chunks(prompt_mask_BxP))
    )
    # Left padding puts every row's last prompt token in the last column.
    logits_Bx1xV, cache = transformer.forward_with_cache(
        params, tokens_BxP[:, -1:], cache, cfg=cfg, lora=lora, lora_cfg=lora_cfg,
        positions_BxT=positions_BxP[:, -1:], token_mask_BxT=prompt_mask_BxP[:, -1:],
    )
    tok_B = pick(logits_Bx1xV[:, 0], 0)
    live_B = max_new_B > 0
    tok_B = jnp.where(live_B, tok_B, pad_id)
    stopped_B = is_stop(tok_B) & live_B
    done_B = ~live_B | stopped_B | (max_new_B <= 1)
    out_BxN = jnp.full((batch, max_new_bucket), pad_id, jnp.int32).at[:, 0].set(tok_B)
    count_B = live_B.astype(jnp.int32)

    def cond(state):
        step, _, done_B, *_ = state
        return (step < max_new_bucket) & ~jnp.all(done_B)

    def body(state):
        step, tok_B, done_B, stopped_B, count_B, out_BxN, cache = state
        # tok_B was emitted at step-1; it sits at position length + step - 1.
        logits_Bx1xV, cache = transformer.forward_with_cache(
            params, tok_B[:, None], cache, cfg=cfg, lora=lora, lora_cfg=lora_cfg,
            positions_BxT=(length_B + step - 1)[:, None], token_mask_BxT=~done_B[:, None],
        )
        new_B = jnp.where(done_B, pad_id, pick(logits_Bx1xV[:, 0], step))
        out_BxN = jax.lax.dynamic_update_slice_in_dim(out_BxN, new_B[:, None], step, axis=1)
        hit_B = is_stop(new_B) & ~done_B
        count_B = count_B + (~done_B).astype(jnp.int32)
        stopped_B = stopped_B | hit_B
        done_B = done_B | hit_B | (step + 1 >= max_new_B)
        return step + 1, new_B, done_B, stopped_B, count_B, out_BxN, cache

    state = (jnp.int32(1), tok_B, done_B, stopped_B, count_B, out_BxN, cache)
    _, _, _, stopped_B, count_B, out_BxN, _ = jax.lax.while_loop(cond, body, state)
    return out_BxN, count_B, stopped_B


# ---------------------------------------------------------------------------------------------
# Host side


def _resolve_stop_ids(sp: SamplingParams, cfg: ModelConfig, tokenizer) -> tuple[int, ...]:
    if sp.stop_ids is not None:
        return tuple(int(t) for t in sp.stop_ids)
    if tokenizer is not None:
        return tuple(int(t) for t in tokenizer.stop_ids)
    return () if cfg.eos_token_id is None else (int(cfg.eos_token_id),)


def _pad_id(cfg: ModelConfig, tokenizer) -> int:
    return resolve_pad_id(tokenizer, cfg)


def check_prompts(prompts: Sequence[Sequence[int]], cfg: ModelConfig, what: str = "prompt") -> list[np.ndarray]:
    """Token lists -> int32 arrays; rejects empty prompts and out-of-vocabulary ids."""
    if isinstance(prompts, (str, bytes)) or (len(prompts) and isinstance(prompts[0], str)):
        raise TypeError(f"{what}s must be token id lists; encode text with the tokenizer first")
    arrays = []
    for i, p in enumerate(prompts):
        a = np.asarray(p, dtype=np.int64).reshape(-1)
        if what == "prompt" and a.size == 0:
            raise ValueError(f"{what} {i} is empty; there is nothing to condition on")
        if a.size and (a.min() < 0 or a.max() >= cfg.vocab_size):
            bad = int(a[(a < 0) | (a >= cfg.vocab_size)][0])
            raise ValueError(f"{what} {i} has token id {bad} outside [0, {cfg.vocab_size})")
        arrays.append(a.astype(np.int32))
    return arrays


def generate(
    params: Params,
    prompts: Sequence[Sequence[int]],
    *,
    cfg: ModelConfig,
    sampling: Union[SamplingParams, Sequence[SamplingParams]] = SamplingParams(),
    lora: Optional[Lora] = None,
    lora_cfg: Optional[LoraConfig] = None,
    adapter_index: Optional[Sequence[int]] = None,
    tokenizer=None,
    batch_size: int = 32,
    prefill_chunk: int = PREFILL_CHUNK,
) -> list[Generation]:
    """Complete every prompt; results come back in prompt order.

    `sampling` is one SamplingParams for all prompts or one per prompt (temperature, top_p, stop ids
    and max_new_tokens may differ per row). `lora` is one adapter `[L, ...]` for all rows or a
    candidate stack `[K, L, ...]` with `adapter_index[i]` choosing prompt i's candidate. Text is
    decoded without special tokens when a tokenizer is given, else None.
    """
    arrays = check_prompts(prompts, cfg)
    n = len(arrays)
    if prefill_chunk < 1 or prefill_chunk & (prefill_chunk - 1):
        raise ValueError(f"prefill_chunk must be a power of two, got {prefill_chunk}")
    if isinstance(sampling, SamplingParams):
        per_row = [sampling] * n
    else:
        per_row = list(sampling)
        if len(per_row) != n:
            raise ValueError(f"got {len(per_row)} SamplingParams for {n} prompts")
    lora_LxK, index = prepare_lora(lora, lora_cfg, cfg, adapter_index, n)
    params = on_device(params)
    pad_id = _pad_id(cfg, tokenizer)
    stops = [_resolve_stop_ids(sp, cfg, tokenizer) for sp in per_row]
    for i, (a, sp) in enumerate(zip(arrays, per_row)):
        if a.size + sp.max_new_tokens > cfg.max_position_embeddings:
            raise ValueError(
                f"prompt {i}: {a.size} prompt + {sp.max_new_tokens} new tokens exceed "
                f"max_position_embeddings={cfg.max_position_embeddings}"
            )

    pending = []
    for plan in plan_row_groups(index, [a.size for a in arrays], batch_size):
        rows = plan.rows
        real = plan.real
        b = len(rows)
        # Q prefix columns (a power of two, so prefill chunks tile it) + the last prompt token.
        prompt_len = bucket(max(arrays[r].size for r in rows[real]) - 1, MIN_PROMPT_BUCKET) + 1
        max_new = max(per_row[r].max_new_tokens for r in rows[real])
        max_new_bucket = bucket(max(max_new, 1), MIN_NEW_TOKENS_BUCKET)
        stop_width = bucket(max(len(stops[r]) for r in rows[real]), MIN_STOP_BUCKET)

        tokens = np.full((b, prompt_len), pad_id, np.int32)
        mask = np.zeros((b, prompt_len), bool)
        max_new_B = np.zeros(b, np.int32)
        stop_BxS = np.full((b, stop_width), -1, np.int32)
        temperature_B = np.zeros(b, np.float32)
        top_p_B = np.ones(b, np.float32)
        seed_B = np.zeros(b, np.uint32)
        request_B = np.zeros(b, np.uint32)
        # Padding rows get a one-token prompt (an all-masked row would attend to nothing) and no
        # new tokens, so they are done before the first decode step.
        mask[~real, -1] = True
        for j in np.flatnonzero(real):
            r = rows[j]
            a, sp = arrays[r], per_row[r]
            tokens[j, prompt_len - a.size :] = a
            mask[j, prompt_len - a.size :] = True
            max_new_B[j] = sp.max_new_tokens
            stop_BxS[j, : len(stops[r])] = stops[r]
            temperature_B[j] = sp.temperature
            top_p_B[j] = sp.top_p
            seed_B[j] = sp.seed
            request_B[j] = r
        stochastic = bool(np.any(temperature_B > 0))
        nucleus = stochastic and bool(np.any((top_p_B < 1.0) & (temperature_B > 0)))
        result = _generate_batch(
            params, lora_LxK, jnp.asarray(plan.adapters), tokens, mask, max_new_B, stop_BxS,
            temperature_B, top_p_B, seed_B, request_B, np.int32(pad_id),
            cfg=cfg, lora_cfg=lora_cfg if lora_LxK is not None else None,
            max_new_bucket=max_new_bucket, prefill_chunk=prefill_chunk,
            stochastic=stochastic, nucleus=nucleus,
        )
        pending.append((plan, result))  # dispatch is asynchronous: build the next batch meanwhile

    generations: list[Optional[Generation]] = [None] * n
    for plan, result in pending:
        out_BxN, count_B, stopped_B = (np.asarray(x) for x in result)
        for j in np.flatnonzero(plan.real):
            r = int(plan.rows[j])
            ids = out_BxN[j, : count_B[j]].tolist()
            stop_token = ids.pop() if stopped_B[j] else None
            text = tokenizer.decode(ids, skip_special=True) if tokenizer is not None else None
            generations[r] = Generation(text, ids, "stop" if stopped_B[j] else "length", stop_token)
    return generations
