"""The inner loop's host side: K ragged candidates -> numpy tables with a leading candidate axis.

`build_plan` turns K candidates (their own sequences, loss masks, learning rate, epochs, schedule,
seed) into a `TrainPlan`: a token buffer tokens[K, N, T], per-step batch indices
batch_index[K, S, bs] (-1 = empty slot), active[K, S] and lr[K, S] (the schedule, HF semantics), and
one length bucket per step. `TrainPlan.gather` cuts a chunk of steps into a `StepBatch` for the
device step (`seal_jax/train_step.py`). Nothing here touches a device.

Data order (`InnerConfig.shuffle`), all uniformly random per candidate and epoch:
* "aligned" (default): one permutation of length *ranks* per epoch, shared by the candidates with
  the same number of sequences, applied to each candidate's sequences sorted by length bucket (ties
  within a bucket broken by the candidate's own seed, afresh each epoch). At a given step all
  candidates use sequences of the same bucket, so a step is not padded to one outlier among K (the
  7B benchmark: 68% padding with "independent"). Any fixed rank->sequence map composed with a
  uniform permutation is a uniform permutation, so each candidate's order is still uniform; what is
  shared is the rank pattern across candidates.
* "shared": as "aligned" with ties broken by position, so equal candidates see identical orders.
* "independent": each candidate draws its own permutations from its seed (the reference's
  behaviour across separate runs; the slowest at large K).

Over-long sequences (longer than the largest length bucket, or `faithful_length`) are truncated by
default, as the reference tokenizer does (truncation=True, max_length=2048); the plan counts them
per candidate (`truncated_K`). `overlong="fail"` makes such a candidate a recorded failure instead
(it takes no step).
"""
from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any, Mapping, Optional, Sequence

import numpy as np
from flax import struct
from jaxtyping import Bool, Float, Int

SCHEDULES = ("linear", "cosine", "constant")
SHUFFLES = ("aligned", "shared", "independent")
OVERLONG = ("truncate", "fail")
HPARAM_KEYS = ("learning_rate", "epochs", "schedule", "warmup_steps", "seed")


@dataclasses.dataclass
class CandidateData:
    """One candidate's training data, ragged. `loss_masks[i][t]` weights token t of sequence i as a
    prediction target (1 = target; the first token of a sequence is never a target). None = all 1."""

    sequences: list
    loss_masks: Optional[list] = None


@dataclasses.dataclass(frozen=True)
class InnerConfig:
    """Static settings and per-candidate defaults. Defaults are the knowledge reference's recipe.

    `reference_faithful=True` reproduces the reference TTT server (every sequence padded to
    `faithful_length` with pad = EOS targets); it implies `append_eos=False` (the reference appends no
    EOS), whatever `append_eos` was given.
    """

    batch_size: int = 1
    epochs: float = 10  # fractional epochs allowed: steps = ceil(epochs * ceil(N / bs)) (HF max_steps)
    learning_rate: float = 1e-3
    schedule: str = "linear"  # 'linear' | 'cosine' (HF, to 0 after warmup) | 'constant'
    warmup_steps: int = 0  # HF: warmup from lr 0 at step 0
    max_grad_norm: Optional[float] = 1.0  # None or 0: no clipping
    weight_decay: float = 0.0
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    append_eos: bool = False
    reference_faithful: bool = False
    faithful_length: int = 2048
    # Ratio <= 1.5 between buckets: padding stays small (2% on the benchmark workload vs 26% with
    # powers of two, measured on an H200) at the cost of at most 14 compiled shapes per K.
    length_buckets: tuple = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)
    steps_per_chunk: int = 16
    shuffle: str = "aligned"  # 'aligned' | 'shared' | 'independent' (module docstring)
    shuffle_seed: int = 0  # seed of the rank permutations shared by 'aligned' / 'shared'
    microbatches: int = 1  # gradient accumulation: the batch is split into this many micro-batches
    # K is padded with inactive dummy candidates up to the smallest of these that fits (e.g.
    # (8, 16, 32, 64)), so rounds with a varying number of candidates reuse compiled programs; the
    # results are cut back to the real K. Empty: K as given (still padded to a multiple of the
    # candidate mesh shards).
    candidate_buckets: tuple = ()
    overlong: str = "truncate"  # 'truncate' (counted in InnerResult.truncated_sequences) | 'fail'
    # Rematerialise each layer in the backward pass: far less activation memory at large K, but the
    # forward runs twice (+50% compute for a frozen base: its backward is ~one forward). None
    # (auto): per compiled program, on only where the program without it would not fit the device's
    # free memory (its compiled memory analysis), and everywhere after a call ran out of memory;
    # off where the backend reports no memory (CPU).
    remat: Optional[bool] = None
    # Float32 logits held at once by the chunked cross-entropy, over all K candidates of a call
    # (seal_jax/loss.py). 0: the plain loss with full [K, B, T, V] logits.
    loss_chunk_mib: int = 1024
    # Pack the sequences that the K candidates train on at one step into shared rows, attention kept
    # per sequence and each token through its own candidate's adapter (`PackedLayout`): a step then
    # computes about its real tokens instead of K rows padded to its longest sequence, and finished
    # candidates cost nothing (on the paper E-step's self-edits: 22-29% padding against 39-84% at
    # K=4-128). Rows are at least `pack_row_tokens` long (fewer distinct programs) and hold at most
    # `pack_row_segments` sequences (the width of the per-row adapter gather). Used where it is exact:
    # LoRA without dropout, one micro-batch, not `reference_faithful` (every sequence is 2,048
    # tokens there) and one candidate shard; elsewhere the rows stay per candidate.
    packing: bool = True
    pack_row_tokens: int = 256
    pack_row_segments: int = 16
    # A packed-step shape (rows x row length x slots) that few steps of a call use is computed as a
    # larger shape of the same call, while the call computes at most this share more tokens in all:
    # each distinct shape is a compiled program (traced, lowered and compiled cold, loaded from the
    # cache warm): on the paper E-step at K=128, 28 -> 20 programs for 1.7% more computed tokens
    # (bench/packed_shapes.py). 0: never.
    pack_merge_share: float = 0.03

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose from {SCHEDULES}")
        if self.shuffle not in SHUFFLES:
            raise ValueError(f"unknown shuffle {self.shuffle!r}; choose from {SHUFFLES}")
        if self.overlong not in OVERLONG:
            raise ValueError(f"unknown overlong {self.overlong!r}; choose from {OVERLONG}")
        if not self.length_buckets or list(self.length_buckets) != sorted(set(self.length_buckets)):
            raise ValueError(f"length_buckets must be strictly increasing, got {self.length_buckets}")
        if min(self.length_buckets) < 2:
            raise ValueError(f"length buckets must be >= 2 tokens, got {self.length_buckets}")
        if self.steps_per_chunk < 1:
            raise ValueError(f"steps_per_chunk must be >= 1, got {self.steps_per_chunk}")
        if self.microbatches < 1 or self.batch_size % self.microbatches:
            raise ValueError(f"microbatches={self.microbatches} must divide batch_size="
                             f"{self.batch_size}")
        if list(self.candidate_buckets) != sorted(set(self.candidate_buckets)) or any(
                b < 1 for b in self.candidate_buckets):
            raise ValueError(f"candidate_buckets must be increasing positive sizes, got "
                             f"{self.candidate_buckets}")
        if self.reference_faithful and self.faithful_length < 2:
            raise ValueError(f"faithful_length must be >= 2, got {self.faithful_length}")
        if self.loss_chunk_mib < 0:
            raise ValueError(f"loss_chunk_mib must be >= 0, got {self.loss_chunk_mib}")
        if self.pack_row_tokens < 2 or self.pack_row_segments < 1:
            raise ValueError(f"pack_row_tokens must be >= 2 and pack_row_segments >= 1, got "
                             f"{self.pack_row_tokens} and {self.pack_row_segments}")
        if not 0 <= self.pack_merge_share <= 1:
            raise ValueError(f"pack_merge_share must be in [0, 1], got {self.pack_merge_share}")
        if self.reference_faithful and self.append_eos:
            object.__setattr__(self, "append_eos", False)  # documented: faithful implies no EOS

    def replace(self, **changes) -> "InnerConfig":
        return dataclasses.replace(self, **changes)

    @property
    def max_length(self) -> int:
        """Longest sequence trained on; longer ones are truncated (or fail, `overlong`)."""
        return self.faithful_length if self.reference_faithful else int(self.length_buckets[-1])

    @property
    def packs(self) -> bool:
        """Whether plans of this config pack rows (the adapter-side conditions are `seal_jax.inner`'s)."""
        return self.packing and not self.reference_faithful and self.microbatches == 1


def schedule_multipliers(schedule: str, total_steps: int, warmup_steps: int = 0) -> np.ndarray:
    """lr / peak for optimizer steps 0..total-1, as HF's get_{linear,cosine,constant}_schedule_with_warmup
    (the s-th update uses lr_lambda(s); warmup starts at 0; linear/cosine reach 0 at `total`)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose from {SCHEDULES}")
    s = np.arange(total_steps, dtype=np.float64)
    warm = s / max(1, warmup_steps)
    if schedule == "constant":
        after = np.ones_like(s)
    elif schedule == "linear":
        after = np.maximum(0.0, (total_steps - s) / max(1, total_steps - warmup_steps))
    else:
        progress = (s - warmup_steps) / max(1, total_steps - warmup_steps)
        after = np.maximum(0.0, 0.5 * (1.0 + np.cos(np.pi * 2.0 * 0.5 * progress)))
    return np.where(s < warmup_steps, warm, after)


@struct.dataclass
class StepBatch:
    """The inputs of optimizer steps: leaves [C, K, ...] for a chunk of C steps (one step of one
    candidate inside the vmapped step function: tokens [B, T], lr a scalar, ...)."""

    tokens: Int[np.ndarray, "C K B T"]
    loss_mask: Float[np.ndarray, "C K B T"]  # target weight per token
    lengths: Int[np.ndarray, "C K B"]  # real length of each row (0 = empty batch slot)
    lr: Float[np.ndarray, "C K"]  # learning rate of the step
    active: Bool[np.ndarray, "C K"]  # the candidate takes this step
    step: Int[np.ndarray, "C K"]  # global step index (dropout rng, failure records)


@struct.dataclass
class PackedStepBatch:
    """The inputs of packed optimizer steps (`InnerConfig.packing`), leaves [C, ...] for a chunk of C
    steps: the sequences of all K candidates at a step share R rows of T tokens. Segment j of a row
    (segment id j + 1; 0 = padding) is one sequence; its positions restart at 0 and it attends only to
    itself.

    A step updates only its members: the candidates active at that step, at most U = min(K, R x M)
    of them (M: the most sequences a row holds). The device gathers their adapters and optimizer
    state, trains and updates those, and writes them back, so a step costs its members, not all K of
    the call: the longest candidates of a call run hundreds of steps after the others have finished.
    Member u's adapter applies to the tokens `member_tokens[u]` lists (flat positions r * T + t in the
    rows; its B sequences, each in a block of T places; R * T where unused).
    """

    tokens: Int[np.ndarray, "C R T"]
    segments: Int[np.ndarray, "C R T"]
    loss_mask: Float[np.ndarray, "C R T"]  # target weight per token (0 at each sequence's first token)
    members: Int[np.ndarray, "C U"]  # candidates this step updates, ascending; >= K where unused
    member_tokens: Int[np.ndarray, "C U N"]  # N = B x T
    lr: Float[np.ndarray, "C K"]
    active: Bool[np.ndarray, "C K"]
    step: Int[np.ndarray, "C K"]


def row_buckets(limit: int = 1 << 14) -> tuple:
    """1, 2, 3, 4, 6, 8, 12, 16, 24, ...: rows of a packed step are rounded up to one of these (each
    distinct count is another compiled program, and on an H200 a 7B program compiles for ~2 minutes).
    The sampler's adapter groups take their sizes from the same ladder."""
    out, size = [1, 2, 3], 4
    while size < limit:
        out.extend((size, size * 3 // 2))
        size *= 2
    return tuple(out)


ROW_BUCKETS = row_buckets()


@dataclasses.dataclass(frozen=True)
class PackedLayout:
    """Where each batch slot's sequence sits when every step's sequences are packed into rows
    (first-fit decreasing): rows_S rows of row_length_S tokens with segments_S slots each at step s;
    for batch slot (k, s, b), its row (-1 = empty slot), the column its first token starts at, and its
    segment slot in the row."""

    row_length_S: np.ndarray
    rows_S: np.ndarray
    segments_S: np.ndarray  # segment slots per row: 1 where every row holds one sequence, else all
    row_KxSxB: np.ndarray
    offset_KxSxB: np.ndarray
    slot_KxSxB: np.ndarray


def pack_sequences(lengths: Sequence[int], capacity: int, max_segments: int) -> tuple[list, int]:
    """First-fit decreasing: ([(row, offset, slot)] per length, rows used) for rows of `capacity`
    tokens holding at most `max_segments` sequences each. Every length must be <= capacity."""
    free, used = [], []
    placed = [None] * len(lengths)
    for i in sorted(range(len(lengths)), key=lambda j: -int(lengths[j])):
        n = int(lengths[i])
        row = next((r for r in range(len(free)) if free[r] >= n and used[r] < max_segments), None)
        if row is None:
            row = len(free)
            free.append(capacity)
            used.append(0)
        placed[i] = (row, capacity - free[row], used[row])
        free[row] -= n
        used[row] += 1
    return placed, len(free)


@dataclasses.dataclass
class TrainPlan:
    """Everything the device needs, as numpy arrays with a leading candidate axis K."""

    tokens_KxNxT: np.ndarray  # int32, right-padded with pad_id
    loss_mask_KxNxT: np.ndarray  # float32 target weight per token (pad positions: 0, or 1 if faithful)
    lengths_KxN: np.ndarray  # int32 real length per sequence (0 = no such sequence)
    batch_index_KxSxB: np.ndarray  # int32 sequence index per batch slot, -1 = empty slot
    active_KxS: np.ndarray  # bool: candidate k takes optimizer step s
    lr_KxS: np.ndarray  # float32 learning rate of step s (0 where inactive)
    num_steps_K: np.ndarray  # int32
    seeds_K: np.ndarray  # int64, LoRA init / dropout seed of each candidate
    step_length_S: np.ndarray  # int32 padded sequence length (bucket) of each step
    reference_faithful: bool
    pad_id: int
    truncated_K: np.ndarray = None  # int32 sequences cut to the maximum length
    rejected_K: np.ndarray = None  # bool: failed before training (overlong='fail')
    max_length: int = 0
    # (pack_row_tokens, pack_row_segments, length_buckets, pack_merge_share) when steps may be
    # packed (`InnerConfig.packs`), else None
    pack: Optional[tuple] = None

    def __post_init__(self):
        k = self.tokens_KxNxT.shape[0]
        if self.truncated_K is None:
            self.truncated_K = np.zeros(k, np.int32)
        if self.rejected_K is None:
            self.rejected_K = np.zeros(k, bool)
        s = self.active_KxS.shape[1]
        for name, arr, want in (("lengths_KxN", self.lengths_KxN, self.tokens_KxNxT.shape[:2]),
                                ("loss_mask_KxNxT", self.loss_mask_KxNxT, self.tokens_KxNxT.shape),
                                ("lr_KxS", self.lr_KxS, (k, s)),
                                ("batch_index_KxSxB", self.batch_index_KxSxB[:, :, 0], (k, s)),
                                ("step_length_S", self.step_length_S, (s,)),
                                ("seeds_K", self.seeds_K, (k,)), ("num_steps_K", self.num_steps_K, (k,))):
            if tuple(arr.shape) != tuple(want):  # a wrong table would fail deep inside XLA
                raise ValueError(f"TrainPlan.{name} has shape {arr.shape}, expected {want}")

    @property
    def num_candidates(self) -> int:
        return self.tokens_KxNxT.shape[0]

    @property
    def num_steps(self) -> int:
        return self.active_KxS.shape[1]

    @property
    def batch_size(self) -> int:
        return self.batch_index_KxSxB.shape[2]

    def chunks(self, steps_per_chunk: int) -> list[tuple[int, int, int]]:
        """(start, stop, T) per chunk: runs of consecutive steps with one length bucket, at most
        `steps_per_chunk` steps each."""
        out = []
        s, total = 0, self.num_steps
        while s < total:
            t = int(self.step_length_S[s])
            stop = s + 1
            while stop < total and stop - s < steps_per_chunk and self.step_length_S[stop] == t:
                stop += 1
            out.append((s, stop, t))
            s = stop
        return out

    def gather(self, start: int, stop: int, length: int, pad_to: int) -> StepBatch:
        """Batches of steps [start, stop) padded to `pad_to` steps, [C, K, B, ...] (C = pad_to)."""
        k_count, b = self.num_candidates, self.batch_size
        idx_KxCxB = np.full((k_count, pad_to, b), -1, np.int32)
        idx_KxCxB[:, : stop - start] = self.batch_index_KxSxB[:, start:stop]
        safe = np.maximum(idx_KxCxB, 0)
        rows = np.arange(k_count)[:, None, None]
        empty = (idx_KxCxB < 0)[..., None]
        tokens = np.where(empty, self.pad_id, self.tokens_KxNxT[rows, safe, :length])
        mask = np.where(empty, 0.0, self.loss_mask_KxNxT[rows, safe, :length])
        lengths = np.where(idx_KxCxB < 0, 0, self.lengths_KxN[rows, safe])
        lr = np.zeros((k_count, pad_to), np.float32)
        lr[:, : stop - start] = self.lr_KxS[:, start:stop]
        active = np.zeros((k_count, pad_to), bool)
        active[:, : stop - start] = self.active_KxS[:, start:stop]
        step = np.arange(start, start + pad_to, dtype=np.int32)
        swap = lambda x: np.ascontiguousarray(np.swapaxes(x, 0, 1))  # noqa: E731  [K, C] -> [C, K]
        return StepBatch(tokens=swap(tokens.astype(np.int32)),
                         loss_mask=swap(mask.astype(np.float32)),
                         lengths=swap(lengths.astype(np.int32)), lr=swap(lr), active=swap(active),
                         step=np.broadcast_to(step[:, None], (pad_to, k_count)).copy())

    def packed_layout(self) -> PackedLayout:
        """The packed rows of every step (`pack` must be set); computed once per plan."""
        layout = self.__dict__.get("_packed_layout")
        if layout is None:
            if self.pack is None:
                raise ValueError("this plan does not pack rows (InnerConfig.packing off or not applicable)")
            layout = self.__dict__["_packed_layout"] = _packed_layout(self, *self.pack)
        return layout

    def packed_chunks(self, steps_per_chunk: int) -> list[tuple[int, int, int, int, int]]:
        """(start, stop, T, R, M) per chunk of packed steps: runs of consecutive steps with the same
        rows (R rows of T tokens, M segment slots each), at most `steps_per_chunk` steps each."""
        layout = self.packed_layout()
        shape = list(zip(layout.row_length_S.tolist(), layout.rows_S.tolist(), layout.segments_S.tolist()))
        out, s = [], 0
        while s < self.num_steps:
            stop = s + 1
            while stop < self.num_steps and stop - s < steps_per_chunk and shape[stop] == shape[s]:
                stop += 1
            out.append((s, stop, *shape[s]))
            s = stop
        return out

    def gather_packed(self, start: int, stop: int, length: int, rows: int, segments: int,
                      pad_to: int) -> PackedStepBatch:
        """Packed batches of steps [start, stop) (all R = `rows` rows of T = `length` tokens with
        `segments` slots), padded to `pad_to` steps."""
        layout = self.packed_layout()
        k_count = self.num_candidates
        tokens = np.full((pad_to, rows, length), self.pad_id, np.int32)
        seg = np.zeros((pad_to, rows, length), np.int32)
        mask = np.zeros((pad_to, rows, length), np.float32)
        active = np.zeros((pad_to, k_count), bool)
        active[: stop - start] = self.active_KxS[:, start:stop].T
        # Members: every candidate active at the step (each has a sequence in a slot, so at most
        # R x M of them); all K in the odd chunk where that does not hold (one more program).
        most = int(active.sum(axis=1).max(initial=0))
        member_count = min(k_count, rows * segments) if most <= rows * segments else k_count
        # Unused places hold K, K + 1, ...: out of range (never written back) and still distinct.
        members = np.broadcast_to(k_count + np.arange(member_count, dtype=np.int32),
                                  (pad_to, member_count)).copy()
        member_of = np.zeros((pad_to, k_count), np.int32)
        for c in range(stop - start):
            ks = np.flatnonzero(active[c])
            members[c, : len(ks)] = ks
            member_of[c, ks] = np.arange(len(ks), dtype=np.int32)
        b_count = self.batch_size
        member_tokens = np.full((pad_to, member_count, b_count * length), rows * length, np.int32)
        for c, s in enumerate(range(start, stop)):
            for k, b in zip(*np.nonzero(layout.row_KxSxB[:, s] >= 0)):
                n = self.batch_index_KxSxB[k, s, b]
                size = self.lengths_KxN[k, n]
                row, off, slot = (layout.row_KxSxB[k, s, b], layout.offset_KxSxB[k, s, b],
                                  layout.slot_KxSxB[k, s, b])
                tokens[c, row, off: off + size] = self.tokens_KxNxT[k, n, :size]
                seg[c, row, off: off + size] = slot + 1
                mask[c, row, off + 1: off + size] = self.loss_mask_KxNxT[k, n, 1:size]
                member_tokens[c, member_of[c, k], b * length: b * length + size] = (
                    row * length + off + np.arange(size, dtype=np.int32))
        lr = np.zeros((pad_to, k_count), np.float32)
        lr[: stop - start] = self.lr_KxS[:, start:stop].T
        step = np.broadcast_to(np.arange(start, start + pad_to, dtype=np.int32)[:, None],
                               (pad_to, k_count)).copy()
        return PackedStepBatch(tokens=tokens, segments=seg, loss_mask=mask, members=members,
                               member_tokens=member_tokens, lr=lr, active=active, step=step)

    @property
    def packs_rows(self) -> bool:
        """Whether this plan trains in packed rows: it may (`pack`), and packing computes at most
        PACKING_MIN_GAIN of the tokens a row per candidate does (sequences of one length gain
        nothing from sharing rows, and a packed step has some fixed cost of its own)."""
        if self.pack is None:
            return False
        cached = self.__dict__.get("_packs_rows")
        if cached is None:
            rows = self.token_counts(packed=False)["computed_tokens"]
            packed = self.token_counts(packed=True)["computed_tokens"]
            cached = self.__dict__["_packs_rows"] = packed <= PACKING_MIN_GAIN * rows
        return cached

    def computed_tokens_S(self, packed: Optional[bool] = None) -> np.ndarray:
        """Tokens each step computes (int64): its packed rows, or K rows of its length bucket; as the
        plan trains (`packed=None`: `packs_rows`) or as asked."""
        if self.packs_rows if packed is None else packed:
            layout = self.packed_layout()
            return layout.rows_S.astype(np.int64) * layout.row_length_S
        return self.step_length_S.astype(np.int64) * self.num_candidates * self.batch_size

    def token_counts(self, packed: Optional[bool] = None) -> dict:
        """Real (unpadded) tokens trained on vs tokens computed, for throughput accounting; computed
        as the plan trains (`packed=None`: `packs_rows`) or as asked."""
        real = 0
        for k in range(self.num_candidates):
            idx = self.batch_index_KxSxB[k][self.active_KxS[k]]
            idx = idx[idx >= 0]
            real += int(self.lengths_KxN[k][idx].sum())
        computed = int(self.computed_tokens_S(packed).sum())
        return {"real_tokens": real, "computed_tokens": computed,
                "padding_fraction": 1.0 - real / max(1, computed)}

    def select(self, index: Sequence[int], length_buckets: Optional[Sequence[int]] = None) -> "TrainPlan":
        """The plan of candidates `index` alone (same per-candidate tables; the step axis cut to what
        they use; with `length_buckets`, step lengths re-bucketed for this subset)."""
        index = np.asarray(index, np.int64)
        s_used = int(self.num_steps_K[index].max(initial=0))
        step_length = self.step_length_S[:s_used]
        if length_buckets is not None and not self.reference_faithful:
            step_length = _step_lengths(self.batch_index_KxSxB[index, :s_used],
                                        self.lengths_KxN[index], length_buckets)
        return dataclasses.replace(
            self, tokens_KxNxT=self.tokens_KxNxT[index], loss_mask_KxNxT=self.loss_mask_KxNxT[index],
            lengths_KxN=self.lengths_KxN[index],
            batch_index_KxSxB=self.batch_index_KxSxB[index, :s_used],
            active_KxS=self.active_KxS[index, :s_used], lr_KxS=self.lr_KxS[index, :s_used],
            num_steps_K=self.num_steps_K[index], seeds_K=self.seeds_K[index],
            step_length_S=step_length[:s_used], truncated_K=self.truncated_K[index],
            rejected_K=self.rejected_K[index])

    def padded(self, target: int) -> "TrainPlan":
        """Append inactive dummy candidates up to `target` (candidate bucket / mesh shard multiple)."""
        extra = target - self.num_candidates
        if extra <= 0:
            return self

        def pad(a, value):
            return np.concatenate([a, np.full((extra, *a.shape[1:]), value, a.dtype)], axis=0)

        return dataclasses.replace(
            self, tokens_KxNxT=pad(self.tokens_KxNxT, self.pad_id),
            loss_mask_KxNxT=pad(self.loss_mask_KxNxT, 0), lengths_KxN=pad(self.lengths_KxN, 0),
            batch_index_KxSxB=pad(self.batch_index_KxSxB, -1), active_KxS=pad(self.active_KxS, False),
            lr_KxS=pad(self.lr_KxS, 0), num_steps_K=pad(self.num_steps_K, 0),
            seeds_K=pad(self.seeds_K, 0), truncated_K=pad(self.truncated_K, 0),
            rejected_K=pad(self.rejected_K, False))


def bucket(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= length (the largest bucket if none)."""
    for b in buckets:
        if length <= b:
            return int(b)
    return int(buckets[-1])


def _step_lengths(batch_index_KxSxB: np.ndarray, lengths_KxN: np.ndarray,
                  length_buckets: Sequence[int]) -> np.ndarray:
    k_count = batch_index_KxSxB.shape[0]
    if batch_index_KxSxB.shape[1] == 0:
        return np.zeros(0, np.int32)
    rows = np.arange(k_count)[:, None, None]
    used = np.where(batch_index_KxSxB >= 0, lengths_KxN[rows, np.maximum(batch_index_KxSxB, 0)], 0)
    return np.array([bucket(max(int(x), 2), length_buckets) for x in used.max(axis=(0, 2))], np.int32)


# Packed rows are used where they compute at most this share of a row per candidate's tokens.
PACKING_MIN_GAIN = 0.9


def _pack_step(sizes: np.ndarray, row_tokens: int, row_segments: int, length_buckets: Sequence[int]):
    """(row length, rows, placements) of one step's sequences: rows of `row_tokens` (or of the longest
    sequence's bucket if longer), or a single row as short as the step's tokens allow when they fit
    one; rows rounded up to ROW_BUCKETS. Few distinct shapes, since each is a compiled program."""
    longest = bucket(int(sizes.max()), length_buckets)
    length = max(longest, min(int(row_tokens), bucket(int(sizes.sum()), length_buckets)))
    placed, used = pack_sequences(sizes.tolist(), length, row_segments)
    return length, _rows(used), placed


def _rows(used: int) -> int:
    return bucket(used, ROW_BUCKETS) if used <= ROW_BUCKETS[-1] else used


def merge_rare_shapes(length_S: np.ndarray, rows_S: np.ndarray, segments_S: np.ndarray,
                      budget_tokens: int) -> None:
    """Give steps of rarely used shapes a larger shape of the same plan, in place: fewer programs.

    A step of R rows of T tokens with M slots can run in any shape (T', R', M') with T' >= T,
    R' >= R and M' >= M, with the same placements (the extra rows and columns are padding, the
    extra slots unused), at (T' R' - T R) more computed tokens. Greedily, the cheapest such merge
    of all the steps of one shape into another shape the plan already has, until the next one would
    take the plan's extra tokens over `budget_tokens`. Each merge removes one shape, so one program.
    """
    budget = int(budget_tokens)
    while budget > 0:
        shapes = collections.Counter(zip(length_S.tolist(), rows_S.tolist(), segments_S.tolist()))
        best = None
        for (t, r, m), steps in shapes.items():
            for (t2, r2, m2) in shapes:
                if (t2, r2, m2) != (t, r, m) and t2 >= t and r2 >= r and m2 >= m:
                    extra = steps * (t2 * r2 - t * r)
                    if extra <= budget and (best is None or extra < best[0]):
                        best = (extra, (t, r, m), (t2, r2, m2))
        if best is None:
            return
        extra, (t, r, m), target = best
        which = (length_S == t) & (rows_S == r) & (segments_S == m)
        length_S[which], rows_S[which], segments_S[which] = target
        budget -= extra


def _packed_layout(plan: TrainPlan, row_tokens: int, row_segments: int,
                   length_buckets: Sequence[int], merge_share: float = 0.0) -> PackedLayout:
    k_count, s_count, b = plan.batch_index_KxSxB.shape
    row = np.full((k_count, s_count, b), -1, np.int32)
    offset = np.zeros((k_count, s_count, b), np.int32)
    slot = np.zeros((k_count, s_count, b), np.int32)
    row_length = np.zeros(s_count, np.int32)
    rows = np.zeros(s_count, np.int32)
    segments = np.ones(s_count, np.int32)
    for s in range(s_count):
        idx = plan.batch_index_KxSxB[:, s]  # [K, B]
        live = (idx >= 0) & plan.active_KxS[:, s][:, None]
        ks, bs = np.nonzero(live)
        sizes = plan.lengths_KxN[ks, idx[ks, bs]] if len(ks) else np.zeros(0, np.int32)
        keep = sizes > 0
        ks, bs, sizes = ks[keep], bs[keep], sizes[keep]
        if not len(sizes):  # no candidate trains on anything at this step: one empty row
            row_length[s], rows[s] = bucket(2, length_buckets), 1
            continue
        length, rows[s], placed = _pack_step(sizes, row_tokens, row_segments, length_buckets)
        for (r, off, sl), k, bb in zip(placed, ks, bs):
            row[k, s, bb], offset[k, s, bb], slot[k, s, bb] = r, off, sl
        row_length[s] = length
        # Each token multiplies all slots' adapters of its row: one slot where every row holds one
        # sequence (sequences of one length, in rows of their own bucket), else all (two shapes,
        # not one program per count).
        segments[s] = 1 if max(sl for _, _, sl in placed) == 0 else row_segments
    computed = int(np.sum(rows.astype(np.int64) * row_length))
    merge_rare_shapes(row_length, rows, segments, int(merge_share * computed))
    return PackedLayout(row_length_S=row_length, rows_S=rows, segments_S=segments, row_KxSxB=row,
                        offset_KxSxB=offset, slot_KxSxB=slot)


def candidate_hparams(overrides: Optional[Mapping[str, Any]], inner_cfg: InnerConfig, k: int) -> dict:
    """InnerConfig defaults overridden by candidate k's hyperparameters (validated, named errors)."""
    hp = {"learning_rate": inner_cfg.learning_rate, "epochs": inner_cfg.epochs,
          "schedule": inner_cfg.schedule, "warmup_steps": inner_cfg.warmup_steps, "seed": k}
    for key, value in (overrides or {}).items():
        key = "learning_rate" if key == "lr" else key
        if key not in HPARAM_KEYS:
            raise ValueError(f"candidate {k}: unknown hyperparameter {key!r}; per-candidate keys are "
                             f"{HPARAM_KEYS}")
        hp[key] = value
    if hp["schedule"] not in SCHEDULES:
        raise ValueError(f"candidate {k}: unknown schedule {hp['schedule']!r}")
    if not (hp["epochs"] >= 0):  # also rejects NaN
        raise ValueError(f"candidate {k}: epochs must be >= 0, got {hp['epochs']}")
    if int(hp["warmup_steps"]) < 0:
        raise ValueError(f"candidate {k}: warmup_steps must be >= 0, got {hp['warmup_steps']}")
    return hp


def _prepare_sequences(cand: CandidateData, k: int, inner_cfg: InnerConfig,
                       eos_id: Optional[int]) -> tuple[list[np.ndarray], list[np.ndarray], int]:
    """(sequences, masks, number truncated) of one candidate, EOS appended if configured."""
    masks = cand.loss_masks
    if masks is not None and len(masks) != len(cand.sequences):
        raise ValueError(f"candidate {k}: {len(cand.sequences)} sequences but {len(masks)} loss masks")
    max_len = inner_cfg.max_length
    seqs, out_masks, truncated = [], [], 0
    for i, seq in enumerate(cand.sequences):
        seq = np.asarray(seq)
        if seq.ndim != 1 or not np.issubdtype(seq.dtype, np.integer) and seq.size:
            raise ValueError(f"candidate {k} sequence {i}: expected a 1-D array of token ids, got "
                             f"shape {seq.shape} dtype {seq.dtype}")
        seq = seq.astype(np.int32)
        mask = np.ones(len(seq), np.float32) if masks is None else np.asarray(masks[i], np.float32)
        if mask.shape != seq.shape:
            raise ValueError(f"candidate {k} sequence {i}: loss mask shape {mask.shape} != token "
                             f"shape {seq.shape}")
        if inner_cfg.append_eos:
            if eos_id is None:
                raise ValueError("append_eos=True needs eos_id")
            seq = np.append(seq, np.int32(eos_id))
            mask = np.append(mask, np.float32(1.0))
        truncated += int(len(seq) > max_len)
        seqs.append(seq[:max_len])
        out_masks.append(mask[:max_len])
    return seqs, out_masks, truncated


def _epoch_orders(lengths: np.ndarray, epochs: int, seed: int, inner_cfg: InnerConfig) -> list:
    n = len(lengths)
    if inner_cfg.shuffle == "independent":
        rng = np.random.default_rng(seed)
        return [rng.permutation(n) for _ in range(epochs)]
    # One permutation of length ranks per (shuffle_seed, N), applied to this candidate's rank order.
    shared_rng = np.random.default_rng([inner_cfg.shuffle_seed, n])
    if inner_cfg.shuffle == "shared":
        rank_to_index = np.argsort(-lengths, kind="stable")
        return [rank_to_index[shared_rng.permutation(n)] for _ in range(epochs)]
    own_rng = np.random.default_rng([seed, n, 1])
    buckets = np.array([bucket(int(x), inner_cfg.length_buckets) for x in lengths])
    orders = []
    for _ in range(epochs):
        rank_to_index = np.lexsort((own_rng.permutation(n), -buckets))  # bucket desc, ties random
        orders.append(rank_to_index[shared_rng.permutation(n)])
    return orders


def build_plan(candidates: Sequence[CandidateData],
               hparams: Optional[Sequence[Optional[Mapping[str, Any]]]] = None,
               inner_cfg: InnerConfig = InnerConfig(), *, pad_id: int,
               eos_id: Optional[int] = None) -> TrainPlan:
    """Host-side tables for K ragged candidates (see TrainPlan).

    hparams[k] overrides InnerConfig defaults for candidate k: learning_rate (or lr), epochs,
    schedule, warmup_steps, seed (LoRA init and shuffle; default k). A candidate with no sequences or
    0 epochs takes 0 steps (its adapter stays at init, B = 0: the base model).
    """
    k_count = len(candidates)
    if k_count == 0:
        raise ValueError("build_plan needs at least one candidate")
    if hparams is None:
        hparams = [None] * k_count
    if len(hparams) != k_count:
        raise ValueError(f"{k_count} candidates but {len(hparams)} hparam overrides")
    bs = inner_cfg.batch_size
    hps = [candidate_hparams(h, inner_cfg, k) for k, h in enumerate(hparams)]
    prepared = [_prepare_sequences(c, k, inner_cfg, eos_id) for k, c in enumerate(candidates)]
    truncated = np.array([t for _, _, t in prepared], np.int32)
    rejected = (truncated > 0) if inner_cfg.overlong == "fail" else np.zeros(k_count, bool)

    n_max = max(1, max(len(seqs) for seqs, _, _ in prepared))
    longest = max([len(s) for seqs, _, _ in prepared for s in seqs] + [2])
    t_max = (inner_cfg.faithful_length if inner_cfg.reference_faithful
             else bucket(longest, inner_cfg.length_buckets))
    tokens = np.full((k_count, n_max, t_max), pad_id, np.int32)
    # Faithful: every pad position of a real sequence is an EOS/pad target (HF labels = input_ids).
    pad_weight = 1.0 if inner_cfg.reference_faithful else 0.0
    masks = np.zeros((k_count, n_max, t_max), np.float32)
    lengths = np.zeros((k_count, n_max), np.int32)
    for k, (seqs, seq_masks, _) in enumerate(prepared):
        for i, (seq, mask) in enumerate(zip(seqs, seq_masks)):
            tokens[k, i, : len(seq)] = seq
            masks[k, i, :] = pad_weight
            masks[k, i, : len(seq)] = mask
            lengths[k, i] = len(seq)

    per_cand_batches = []
    for k, ((seqs, _, _), hp) in enumerate(zip(prepared, hps)):
        n = 0 if rejected[k] else len(seqs)  # a rejected candidate takes no step
        per_epoch = max(1, math.ceil(n / bs))
        steps = math.ceil(hp["epochs"] * per_epoch) if n else 0
        full_epochs = math.ceil(steps / per_epoch) if steps else 0
        batches = []
        for order in _epoch_orders(lengths[k, :n], full_epochs, int(hp["seed"]), inner_cfg):
            padded = np.full(per_epoch * bs, -1, np.int32)
            padded[:n] = order
            batches.extend(padded.reshape(per_epoch, bs))
        per_cand_batches.append(np.asarray(batches[:steps], np.int32).reshape(steps, bs))
    s_max = max(len(b) for b in per_cand_batches)
    batch_index = np.full((k_count, s_max, bs), -1, np.int32)
    active = np.zeros((k_count, s_max), bool)
    lr = np.zeros((k_count, s_max), np.float32)
    num_steps = np.zeros(k_count, np.int32)
    for k, (batches, hp) in enumerate(zip(per_cand_batches, hps)):
        steps = len(batches)
        batch_index[k, :steps] = batches
        active[k, :steps] = True
        num_steps[k] = steps
        with np.errstate(invalid="ignore", over="ignore"):
            lr[k, :steps] = float(hp["learning_rate"]) * schedule_multipliers(
                hp["schedule"], steps, int(hp["warmup_steps"]))

    if inner_cfg.reference_faithful:
        step_length = np.full(s_max, t_max, np.int32)
    else:
        step_length = _step_lengths(batch_index, lengths, inner_cfg.length_buckets)
    return TrainPlan(tokens_KxNxT=tokens, loss_mask_KxNxT=masks, lengths_KxN=lengths,
                     batch_index_KxSxB=batch_index, active_KxS=active, lr_KxS=lr,
                     num_steps_K=num_steps, seeds_K=np.array([int(h["seed"]) for h in hps], np.int64),
                     step_length_S=step_length, reference_faithful=inner_cfg.reference_faithful,
                     pad_id=int(pad_id), truncated_K=truncated, rejected_K=rejected,
                     max_length=inner_cfg.max_length,
                     pack=((int(inner_cfg.pack_row_tokens), int(inner_cfg.pack_row_segments),
                            tuple(int(b) for b in inner_cfg.length_buckets),
                            float(inner_cfg.pack_merge_share))
                           if inner_cfg.packs else None))


def group_candidates(candidates: Sequence[CandidateData],
                     hparams: Optional[Sequence[Optional[Mapping[str, Any]]]],
                     inner_cfg: InnerConfig, max_k: int) -> list[list[int]]:
    """Candidate indices grouped into calls of at most `max_k`, by work, so that a call is not held
    by its longest member: sorted by optimizer steps, then by their longest sequence's bucket, then by
    their total bucketed tokens (all descending), and cut into consecutive groups. Train each group with its candidates' seeds
    pinned (`pin_seeds`), so the grouping changes no candidate's result."""
    if max_k < 1:
        raise ValueError(f"max_k must be >= 1, got {max_k}")
    hparams = list(hparams) if hparams is not None else [None] * len(candidates)
    keys = []
    for k, (cand, h) in enumerate(zip(candidates, hparams)):
        hp = candidate_hparams(h, inner_cfg, k)
        n = len(cand.sequences)
        steps = math.ceil(hp["epochs"] * math.ceil(n / inner_cfg.batch_size)) if n else 0
        extra = 1 if inner_cfg.append_eos else 0
        buckets = [bucket(len(s) + extra, inner_cfg.length_buckets) for s in cand.sequences]
        keys.append((-steps, -max(buckets, default=0), -sum(buckets), k))
    order = [k for *_, k in sorted(keys)]
    return [order[i: i + max_k] for i in range(0, len(order), max_k)]


def pin_seeds(hparams: Optional[Sequence[Optional[Mapping[str, Any]]]], count: int) -> list[dict]:
    """Per-candidate hparams with the default seed (the candidate's index) made explicit, so a
    candidate keeps its seed when it is trained in another group or position."""
    hparams = list(hparams) if hparams is not None else [None] * count
    return [{"seed": k, **(h or {})} for k, h in enumerate(hparams)]
