"""Batched text generation with a KV cache, one LoRA adapter per row group, rows refilled as they finish.

SEAL samples in two places: the policy writes self-edits (temperature 1.0, top-p 0.95, up to
thousands of tokens, very different lengths) and every adapted candidate answers questions (greedy,
64 tokens, stop at EOS). Both go through `generate`, which keeps one fixed-shape device batch busy:

* Rows are laid out as G groups of R rows, group-major, as the model's grouped-LoRA form expects
  (`A: [L, G, in, r]`; rows `[g*R, (g+1)*R)` use adapter g). Each adapter's requests wait in a queue;
  a free row takes the next request of its group's adapter, and a group whose queue ran dry switches
  adapter once all its rows are free.
* The device decodes until a sixteenth of the rows are free (or all are done), then the host
  harvests finished rows and prefills pending requests into them (`refill`). One long request
  therefore holds one row, not the whole batch; `refill=False` gives classic whole-batch decoding.
* The KV cache holds, per row, the positions that row has reached; its capacity follows the live
  rows (their length plus up to CAPACITY_HORIZON tokens ahead, in ratio-1.5 buckets), so attention
  reads what the rows need. Prompt lengths, row counts and capacities are bucketed, so a long run
  compiles a handful of programs, and `jax.jit` keeps them.
* The device side (prefill, the decode loop, sort-free nucleus sampling) is `seal_jax/decode.py`.

Randomness: request i draws its step-t token from `fold_in(fold_in(key(seed_i), i), t)`, i its
position in the request list (or its `SamplingParams.stream`). Its stream depends only on those, not
on batch size, refill order, which row it lands in or adapter grouping, and identical prompts
repeated at different positions (SEAL's k self-edits per passage) get independent samples from one
shared `SamplingParams`.

`plan_row_groups` (fixed batches of adapter groups) and `prepare_lora` are shared with `scoring.py`.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from seal_jax import decode, sharding
from seal_jax.lora import check_lora, num_candidates
from seal_jax.model.tokenizer import resolve_pad_id
from seal_jax.train_plan import row_buckets
from seal_jax.model import transformer
from seal_jax.model.config import LoraConfig, ModelConfig

Lora = Any
Params = Any

MIN_PROMPT_BUCKET = 16
PREFILL_CHUNK = 256  # prompt tokens per prefill step: bounds the [B, heads, chunk, S] scores
MIN_NEW_TOKENS_BUCKET = 16
MIN_STOP_BUCKET = 4
CAPACITY_HORIZON = 512  # cache slots reserved ahead of each live row (bounds resizes and compiles)
REFILL_FRACTION = 16  # with pending requests, return to refill once 1/16 of the rows are free


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
    # The request's index in its random stream (default: its position in the `generate` call). A
    # caller that asks for a subset of a larger request list later passes the positions the requests
    # have in that list, and gets the same samples as the whole list would have given.
    stream: Optional[int] = None

    def __post_init__(self):
        if not self.temperature >= 0.0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {self.seed}")
        if self.stream is not None and not 0 <= self.stream < 2**32:
            raise ValueError(f"stream must be in [0, 2**32), got {self.stream}")


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
    # [L, K, ...], K padded with zero adapters to a power of two (never indexed): the decode programs
    # are specialised to K, and an E-step's last call, with fewer candidates than the others, would
    # otherwise compile its own (8-11 s at the end of an H200 E-step, where nothing overlaps it).
    padding = bucket(k) - k
    grouped = jax.tree.map(lambda x: jnp.pad(jnp.swapaxes(jnp.asarray(x), 0, 1),
                                             [(0, 0), (0, padding)] + [(0, 0)] * (x.ndim - 2)), lora)
    return grouped, index


def on_device(params: Params) -> Params:
    """Host (numpy) leaves -> device arrays, once per call rather than once per batch; device
    arrays (sharded or not) pass through untouched."""
    return jax.tree.map(lambda x: x if isinstance(x, jax.Array) else jnp.asarray(x), params)


def place_on_mesh(params: Params, lora_LxK: Optional[Lora], cfg: ModelConfig, mesh=None,
                  rules=None) -> tuple[Params, Optional[Lora]]:
    """Base params and grouped adapters onto the devices, once per call.

    Without a mesh: host leaves -> the default device (device arrays pass through). With a mesh: the
    base follows the rules table (FSDP / tensor parallel, `seal_jax.sharding`) and the adapters
    `[L, K, ...]` are split over the candidate mesh axes when K divides evenly (else replicated).
    Arrays already placed that way are not moved.
    """
    if mesh is None:
        return on_device(params), lora_LxK
    rules = rules or sharding.DEFAULT_RULES
    params = jax.device_put(params, sharding.logical_to_sharding(
        transformer.param_logical_axes(cfg), mesh, rules, params))
    if lora_LxK is not None:
        k = jax.tree.leaves(lora_LxK)[0].shape[1]
        whole = k % sharding.candidate_shards(mesh, rules) != 0
        lora_LxK = jax.tree.map(
            lambda x: jax.device_put(x, sharding.replicated(mesh) if whole
                                     else sharding.candidate_sharding(mesh, x.ndim, 1, rules)),
            lora_LxK)
    return params, lora_LxK


def shard_rows(tree: Any, logical_axes: Any, mesh=None, rules=None) -> Any:
    """Place per-row arrays with rows on the "batch" logical axis (split where the mesh divides the
    row count, else replicated); unchanged without a mesh."""
    if mesh is None:
        return tree
    return jax.device_put(tree, sharding.logical_to_sharding(
        logical_axes, mesh, rules or sharding.DEFAULT_RULES, tree))


def gather_groups(lora_LxK: Optional[Lora], adapters_G: jax.Array) -> Optional[Lora]:
    """[L, K, ...] -> [L, G, ...]: the adapters of one batch's groups (traced, once per batch)."""
    if lora_LxK is None:
        return None
    return jax.tree.map(lambda x: jnp.take(x, adapters_G, axis=1), lora_LxK)


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


def capacity_bucket(n: int) -> int:
    """KV-cache slots for n tokens: the next of 64, 96, 128, 192, ... (ratio <= 1.5, so a resized
    cache wastes at most a third of its attention reads and long runs compile a handful of sizes)."""
    size = 64
    while True:
        for candidate in (size, size * 3 // 2):
            if candidate >= n:
                return candidate
        size *= 2


def adapter_group_size(counts: Sequence[int], batch_size: int, adapter_share: float) -> int:
    """Rows R per adapter group of a decode batch of about `batch_size` rows (G = batch_size // R
    groups, each decoding with one adapter), chosen by a cost model of the whole decode.

    Adapter a's `counts[a]` requests take ceil(c / R) waves of a group's R rows, so the decode fills
    sum_a R * ceil(c_a / R) row-slots (a group whose adapter has fewer requests than R idles the
    rest), about that / (G * R) waves of steps; a step reads the base once and one adapter per group
    (`adapter_share`: an adapter's bytes over the base's). Ties go to the larger R. Rounding the
    largest adapter's count up to a power of two instead made one passage with 10 questions set
    R=16 for a paper E-step call whose other candidates had 2-5 (28% of the rows busy; 52% without
    it), where R=6 keeps 74% busy.
    """
    counts = np.asarray([c for c in counts if c > 0], np.int64)
    if counts.size <= 1:  # one adapter (or none): every row serves it; one group as wide as needed
        return bucket(int(counts.sum()) if counts.size else 1, maximum=batch_size)
    best, best_cost = 1, float("inf")
    # The packed rows' ladder (1, 2, 3, 4, 6, 8, 12, ...): few sizes, so few batch shapes compile.
    for size in (s for s in row_buckets(int(batch_size) + 1) if s <= batch_size):
        groups = max(1, batch_size // size)
        slots = int(np.sum(size * -(-counts // size)))
        cost = slots * (1.0 + groups * adapter_share) / (groups * size)
        if cost <= best_cost * (1 + 1e-9):
            best, best_cost = size, min(cost, best_cost)
    return best


class _Rows:
    """Host bookkeeping of one device batch of G groups x R rows: which request each row serves, the
    adapter each group uses, and the queues of requests not started yet (one per adapter).

    A free row takes the next request of its group's adapter; a group whose rows are all free and
    whose adapter has nothing left switches to the adapter with the most pending requests (several
    groups may serve one adapter). R is `adapter_group_size`'s.
    """

    def __init__(self, requests: list[int], adapters: np.ndarray, lengths: np.ndarray,
                 batch_size: int, adapter_share: float = 0.0):
        counts = np.bincount(adapters[requests])
        self.group_size = adapter_group_size(counts, batch_size, adapter_share)
        groups_needed = int(sum(-(-int(c) // self.group_size) for c in counts))
        self.num_groups = max(1, min(batch_size // self.group_size, bucket(groups_needed)))
        self.batch = self.num_groups * self.group_size
        self.queues = {}
        for r in sorted(requests, key=lambda r: (adapters[r], lengths[r])):  # similar prompt lengths
            self.queues.setdefault(int(adapters[r]), collections.deque()).append(r)
        self.group_adapter = np.full(self.num_groups, -1, np.int64)
        self.request = np.full(self.batch, -1, np.int64)  # request served by each row, -1 = free

    @property
    def pending(self) -> int:
        return sum(map(len, self.queues.values()))

    def admit(self) -> list[tuple[int, int]]:
        """(row, request) for every free row that can start a request now."""
        fills = []
        for g in range(self.num_groups):
            rows = range(g * self.group_size, (g + 1) * self.group_size)
            if np.all(self.request[rows] < 0) and not self.queues.get(self.group_adapter[g]):
                busiest = max(self.queues, key=lambda a: len(self.queues[a]), default=None)
                if busiest is None or not self.queues[busiest]:
                    continue
                self.group_adapter[g] = busiest
            queue = self.queues.get(self.group_adapter[g])
            for row in rows:
                if self.request[row] < 0 and queue:
                    self.request[row] = queue.popleft()
                    fills.append((row, int(self.request[row])))
        return fills

    def adapters_G(self) -> np.ndarray:
        return np.maximum(self.group_adapter, 0).astype(np.int32)  # unused groups: any valid index


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
    refill: bool = True,
    mesh=None,
    rules=None,
) -> list[Generation]:
    """Complete every prompt; results come back in prompt order.

    `sampling` is one SamplingParams for all prompts or one per prompt (temperature, top_p, stop ids
    and max_new_tokens may differ per row). `lora` is one adapter `[L, ...]` for all rows or a
    candidate stack `[K, L, ...]` with `adapter_index[i]` choosing prompt i's candidate. Text is
    decoded without special tokens when a tokenizer is given, else None.

    At most `batch_size` requests decode at once. With `refill` (the default) a row that finishes
    takes the next pending request, so short requests do not wait for the longest in their batch;
    `refill=False` starts new requests only when the whole batch is done. Results are the same
    either way (each request's sample stream depends only on its seed and position).

    `mesh` / `rules` (`seal_jax.sharding`): run on a device mesh, the base sharded by the rules
    (FSDP and/or tensor parallel), adapters split over the candidate axes and the batch rows over
    the "batch" axes, so a model that only fits across devices can be sampled. None: one device.
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
    pad_id = _pad_id(cfg, tokenizer)
    stops = [_resolve_stop_ids(sp, cfg, tokenizer) for sp in per_row]
    for i, (a, sp) in enumerate(zip(arrays, per_row)):
        if a.size + sp.max_new_tokens > cfg.max_position_embeddings:
            raise ValueError(
                f"prompt {i}: {a.size} prompt + {sp.max_new_tokens} new tokens exceed "
                f"max_position_embeddings={cfg.max_position_embeddings}"
            )

    def finish(ids: list[int], stopped: bool) -> Generation:
        stop_token = ids.pop() if stopped else None
        text = tokenizer.decode(ids, skip_special=True) if tokenizer is not None else None
        return Generation(text, ids, "stop" if stopped else "length", stop_token)

    generations: list[Optional[Generation]] = [None] * n
    active = [i for i in range(n) if per_row[i].max_new_tokens > 0]
    for i in range(n):
        if per_row[i].max_new_tokens == 0:
            generations[i] = finish([], False)
    if active:
        _decode_requests(params, arrays, per_row, stops, active, generations, finish,
                         cfg=cfg, lora_LxK=lora_LxK, lora_cfg=lora_cfg, index=index, pad_id=pad_id,
                         batch_size=batch_size, prefill_chunk=prefill_chunk, refill=refill,
                         mesh=mesh, rules=rules)
    return generations


def _decode_requests(params, arrays, per_row, stops, active, generations, finish, *, cfg, lora_LxK,
                     lora_cfg, index, pad_id, batch_size, prefill_chunk, refill, mesh, rules):
    """Run `active` requests through one device batch, refilling rows as they free up."""
    lengths = np.array([a.size for a in arrays])
    adapters = np.zeros(len(arrays), np.int64) if index is None else index
    rows = _Rows(active, adapters, lengths, batch_size, _adapter_share(params, lora_LxK))
    temperature = np.array([sp.temperature for sp in per_row], np.float32)
    top_p = np.array([sp.top_p for sp in per_row], np.float32)
    max_new = np.array([sp.max_new_tokens for sp in per_row], np.int64)
    flags = dict(stochastic=bool(np.any(temperature[active] > 0)),
                 nucleus=bool(np.any((temperature[active] > 0) & (top_p[active] < 1.0))))
    lora_cfg = lora_cfg if lora_LxK is not None else None
    params, lora_LxK = place_on_mesh(params, lora_LxK, cfg, mesh, rules)
    weights = decode.decode_weights(params, decode.split_layers(params["layers"]), cfg)
    stop_width = bucket(max(len(stops[r]) for r in active), MIN_STOP_BUCKET)
    out_len = bucket(int(max_new[active].max()), MIN_NEW_TOKENS_BUCKET)
    state, capacity = None, 0
    row_len = np.zeros(rows.batch, np.int64)  # tokens in each row's cache (host copy)
    row_count = np.zeros(rows.batch, np.int64)  # tokens emitted by each row's request

    while True:
        fills = rows.admit() if refill or np.all(rows.request < 0) else []
        for row, r in fills:
            row_len[row], row_count[row] = lengths[r], 0
        live = rows.request >= 0
        if not live.any():
            return
        # Cache capacity: what live rows need for the next CAPACITY_HORIZON tokens, and room for
        # the prompt columns being prefilled. Grown when short, shrunk when less than half is used.
        remaining = max_new[rows.request[live]] - row_count[live]
        want = int(np.max(row_len[live] + np.minimum(remaining, CAPACITY_HORIZON)))
        prompt_cols = [_prompt_columns(lengths[[r for _, r in fills]])] if fills else []
        target = capacity_bucket(max([want] + prompt_cols))
        if state is None:
            state = decode.init_state(cfg, rows.batch, target, out_len, stop_width)
            state = shard_rows(state, decode.state_logical_axes(state), mesh, rules)
            capacity = target
        elif target > capacity or target <= capacity // 2:
            state = decode.resize(state, capacity=target)
            capacity = target
        if fills:
            state = _prefill(params, lora_LxK, state, fills, rows, arrays, per_row, stops, temperature,
                             top_p, pad_id, cfg=cfg, lora_cfg=lora_cfg, prefill_chunk=prefill_chunk)
        fresh = np.zeros(rows.batch, bool)
        fresh[[row for row, _ in fills]] = True
        if np.all(fresh[live] & (max_new[rows.request[live]] <= 1)):
            exit_after = 0  # every live row ended with its first token: nothing to decode
        else:
            free = int(np.sum(~live))
            exit_after = (free + min(rows.pending, max(1, rows.batch // REFILL_FRACTION))
                          if refill and rows.pending else rows.batch + 1)
        if exit_after:
            state = decode.decode_segment(
                weights, lora_LxK, jnp.asarray(rows.adapters_G()), state, np.int32(exit_after),
                np.int32(pad_id), cfg=cfg, lora_cfg=lora_cfg, **flags)
        done, stopped, count, length = jax.device_get(
            (state["done"], state["stopped"], state["count"], state["len"]))
        row_count[:], row_len[:] = count, length
        finished = np.flatnonzero(done & live)
        if len(finished):
            out = np.asarray(state["out"])
            for row in finished:
                generations[rows.request[row]] = finish(out[row, : count[row]].tolist(), bool(stopped[row]))
                rows.request[row] = -1


def _adapter_share(params, lora_LxK) -> float:
    """Bytes of one adapter of the [L, K, ...] stack over the base's (0 without adapters)."""
    if lora_LxK is None:
        return 0.0
    leaves = jax.tree.leaves(lora_LxK)
    k_count = max(1, int(leaves[0].shape[1]))
    adapter = sum(x.size * x.dtype.itemsize for x in leaves) / k_count
    base = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    return float(adapter / max(1, base))


def _prompt_columns(lengths) -> int:
    """Prefill columns for these prompts: a power-of-two prefix (so prefill chunks tile it) + the
    last prompt token."""
    return bucket(int(np.max(lengths)) - 1, MIN_PROMPT_BUCKET) + 1


def _prefill(params, lora_LxK, state, fills, rows, arrays, per_row, stops, temperature, top_p, pad_id,
             *, cfg, lora_cfg, prefill_chunk):
    """Start the requests in `fills` ([(row, request)]) with one prefill call, rows bucketed to a
    power of two (padding rows point past the batch, so their writes are dropped)."""
    num = bucket(len(fills))
    cols = _prompt_columns([arrays[r].size for _, r in fills])
    stop_width = state["stop_ids"].shape[1]
    tokens = np.full((num, cols), pad_id, np.int32)
    mask = np.zeros((num, cols), bool)
    mask[len(fills):, -1] = True  # padding rows: a one-token prompt (never an all-masked row)
    slot = np.full(num, rows.batch, np.int32)
    adapter = np.zeros(num, np.int32)
    max_new = np.ones(num, np.int32)
    stop = np.full((num, stop_width), -1, np.int32)
    temp, nucleus_p = np.zeros(num, np.float32), np.ones(num, np.float32)
    seed, request = np.zeros(num, np.uint32), np.zeros(num, np.uint32)
    for j, (row, r) in enumerate(fills):
        a, sp = arrays[r], per_row[r]
        tokens[j, cols - a.size:] = a
        mask[j, cols - a.size:] = True
        slot[j], adapter[j], max_new[j] = row, rows.group_adapter[row // rows.group_size], sp.max_new_tokens
        stop[j, : len(stops[r])] = stops[r]
        temp[j], nucleus_p[j], seed[j] = temperature[r], top_p[r], sp.seed
        request[j] = r if sp.stream is None else sp.stream
    adapter, seed, request = jnp.asarray(adapter), jnp.asarray(seed), jnp.asarray(request)
    temp, nucleus_p = jnp.asarray(temp), jnp.asarray(nucleus_p)
    k, v, first = decode.prefill(params, lora_LxK, adapter, tokens, mask, seed, request, temp,
                                 nucleus_p, cfg=cfg, lora_cfg=lora_cfg, prefill_chunk=prefill_chunk)
    return decode.install(state, slot, k, v, first, mask.sum(axis=1).astype(np.int32), max_new, stop,
                          temp, nucleus_p, seed, request)
