"""The inner loop: K candidate fine-tunes (one per self-edit / seed / config) in one compiled program.

The reference fine-tunes one candidate at a time (HF Trainer + PEFT, batch 1, every sequence padded
to 2048). Here every per-candidate difference is data, so all K candidates train together:

host (numpy)   `build_plan` turns K ragged candidates (their own sequences, loss masks, learning rate,
               epochs, schedule, seed) into tables with a leading K axis: a token buffer
               tokens[K, N, T], per-step batch indices batch_index[K, S, bs] (-1 = empty slot),
               active[K, S] and lr[K, S] (the schedule, HF semantics), and a per-step length bucket.
device (jit)   one compiled function runs a *chunk* of up to `steps_per_chunk` steps (a loop with a
               dynamic trip count) for all K candidates under `jax.vmap`, the base params shared
               (in_axes=None) and passed as arguments, never closed over. The host loops over chunks;
               nothing syncs with the host inside a chunk or between chunks.

One optimizer step of one candidate: gather its batch, loss = sum(mask * nll) / #targets (HF's
per-step normalisation), gradients w.r.t. the LoRA params only, clip by *its own* global norm
(torch's `clip_grad_norm_`), AdamW (torch semantics, lr from the table), then a masked commit: params
and optimizer state change only where active[k, s]. A candidate whose loss, gradient norm or updated
params are non-finite is marked failed (the reason is recorded); its params stay at the last finite
value and, since candidates never interact, the others are bit-for-bit what they would have been.

Compiled shapes are bounded: the sequence axis of a step is padded to the smallest configured length
bucket that holds the longest sequence any candidate uses in that step; consecutive steps with the
same bucket form chunks; K, bs and `steps_per_chunk` are fixed per call. So one compile per (K, bucket)
is reused across chunks and rounds.

Loss conventions (`InnerConfig`):
* default ("clean"): padding is excluded from attention and from the loss (mask from lengths).
  `append_eos=True` appends one EOS target to every sequence; this is the clean-mode default of the
  knowledge domain (the adapted model learns where a fact ends instead of learning to emit EOS
  everywhere, see reference-knowledge §1.4).
* `reference_faithful=True` reproduces the reference TTT server: each sequence right-padded to
  `faithful_length` (2048) with the pad (= EOS) id, labels on the pad positions included, so the loss
  is the mean over all 2047 shifted positions; no EOS appended. With the other defaults (linear decay
  to 0, no warmup, clip 1.0, bs 1, AdamW 0.9/0.999/1e-8, wd 0, lr 1e-3, 10 epochs) this is the
  reference recipe. One deviation we cannot avoid with the model's segment-id attention contract: the
  reference masks pad *keys* (pad queries see only the real tokens); here pad queries also see
  earlier pads. Real-token positions are unaffected.

`shuffle="shared"` (a throughput option): each epoch's permutation is shared by all candidates with
the same number of sequences and applied to each candidate's sequences in *length-rank* order, so at
a given step all candidates use a sequence of similar length and the step's length bucket is not set
by one outlier among K. Each candidate still sees a uniformly random order every epoch; what is lost
is independence of the order across candidates (repeats of one self-edit differ only in LoRA init).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from seal_jax import distributed as dist
from seal_jax import lora as lora_lib
from seal_jax import sharding as shard_lib
from seal_jax.model import transformer
from seal_jax.model.config import LoraConfig, ModelConfig

SCHEDULES = ("linear", "cosine", "constant")
SHUFFLES = ("independent", "shared")
HPARAM_KEYS = ("learning_rate", "epochs", "schedule", "warmup_steps", "seed")

# Failure codes recorded on the device; messages are built on the host.
_OK, _BAD_LOSS, _BAD_GRAD, _BAD_PARAMS = 0, 1, 2, 3
_FAILURE_MESSAGES = {
    _BAD_LOSS: "non-finite loss",
    _BAD_GRAD: "non-finite gradient norm",
    _BAD_PARAMS: "non-finite parameters after the update",
}


# ----------------------------------------------------------------------------------------------------
# Configuration and host-side data


@dataclasses.dataclass
class CandidateData:
    """One candidate's training data, ragged. `loss_masks[i][t]` weights token t of sequence i as a
    prediction target (1 = target; the first token of a sequence is never a target). None = all 1."""

    sequences: list
    loss_masks: Optional[list] = None


@dataclasses.dataclass(frozen=True)
class InnerConfig:
    """Static settings and per-candidate defaults. Defaults are the knowledge reference's recipe."""

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
    shuffle: str = "independent"  # 'independent' (per-candidate seed) | 'shared' (see module doc)
    shuffle_seed: int = 0  # permutation seed of shuffle='shared'
    microbatches: int = 1  # gradient accumulation: the batch is split into this many micro-batches
    # K is padded with inactive dummy candidates up to the smallest of these that fits (e.g.
    # (8, 16, 32, 64)), so rounds with a varying number of candidates reuse compiled programs.
    # Empty: K as given (still padded to a multiple of the candidate mesh shards).
    candidate_buckets: tuple = ()

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose from {SCHEDULES}")
        if self.shuffle not in SHUFFLES:
            raise ValueError(f"unknown shuffle {self.shuffle!r}; choose from {SHUFFLES}")
        if not self.length_buckets or list(self.length_buckets) != sorted(set(self.length_buckets)):
            raise ValueError(f"length_buckets must be strictly increasing, got {self.length_buckets}")
        if min(self.length_buckets) < 2:
            raise ValueError(f"length buckets must be >= 2 tokens, got {self.length_buckets}")
        if self.steps_per_chunk < 1:
            raise ValueError(f"steps_per_chunk must be >= 1, got {self.steps_per_chunk}")
        if self.microbatches < 1 or self.batch_size % self.microbatches:
            raise ValueError(f"microbatches={self.microbatches} must divide batch_size="
                             f"{self.batch_size}")
        if self.reference_faithful and self.append_eos:
            raise ValueError("reference_faithful reproduces the reference, which appends no EOS; "
                             "set append_eos=False")
        if list(self.candidate_buckets) != sorted(set(self.candidate_buckets)) or any(
                b < 1 for b in self.candidate_buckets):
            raise ValueError(f"candidate_buckets must be increasing positive sizes, got "
                             f"{self.candidate_buckets}")
        if self.reference_faithful and self.faithful_length < 2:
            raise ValueError(f"faithful_length must be >= 2, got {self.faithful_length}")

    def replace(self, **changes) -> "InnerConfig":
        return dataclasses.replace(self, **changes)


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

    def gather(self, start: int, stop: int, length: int, pad_to: int) -> dict:
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
        return {
            "tokens": swap(tokens.astype(np.int32)),
            "loss_mask": swap(mask.astype(np.float32)),
            "lengths": swap(lengths.astype(np.int32)),
            "lr": swap(lr),
            "active": swap(active),
            "step": np.broadcast_to(step[:, None], (pad_to, k_count)).copy(),
        }

    def token_counts(self, steps_per_chunk: Optional[int] = None) -> dict:
        """Real (unpadded) tokens trained on vs tokens computed, for throughput accounting."""
        real = 0
        for k in range(self.num_candidates):
            idx = self.batch_index_KxSxB[k][self.active_KxS[k]]
            idx = idx[idx >= 0]
            real += int(self.lengths_KxN[k][idx].sum())
        computed = int(self.step_length_S.sum()) * self.num_candidates * self.batch_size
        return {"real_tokens": real, "computed_tokens": computed,
                "padding_fraction": 1.0 - real / max(1, computed)}


def _bucket(length: int, buckets: Sequence[int]) -> int:
    for b in buckets:
        if length <= b:
            return int(b)
    return int(buckets[-1])


def _candidate_hparams(overrides: Optional[Mapping[str, Any]], inner_cfg: InnerConfig, k: int) -> dict:
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


def _prepare_sequences(cand: CandidateData, k: int, inner_cfg: InnerConfig, pad_id: int,
                       eos_id: Optional[int]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    masks = cand.loss_masks
    if masks is not None and len(masks) != len(cand.sequences):
        raise ValueError(f"candidate {k}: {len(cand.sequences)} sequences but {len(masks)} loss masks")
    max_len = inner_cfg.faithful_length if inner_cfg.reference_faithful else inner_cfg.length_buckets[-1]
    seqs, out_masks = [], []
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
        # Too long: truncate, as the reference tokenizer does (truncation=True, max_length=2048).
        seqs.append(seq[:max_len])
        out_masks.append(mask[:max_len])
    return seqs, out_masks


def _epoch_orders(lengths: np.ndarray, epochs: int, seed: int, inner_cfg: InnerConfig) -> list:
    n = len(lengths)
    if inner_cfg.shuffle == "independent":
        rng = np.random.default_rng(seed)
        return [rng.permutation(n) for _ in range(epochs)]
    # shared: one permutation of length ranks per N, applied to this candidate's rank order.
    rank_to_index = np.argsort(-lengths, kind="stable")
    rng = np.random.default_rng([inner_cfg.shuffle_seed, n])
    return [rank_to_index[rng.permutation(n)] for _ in range(epochs)]


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
    hps = [_candidate_hparams(h, inner_cfg, k) for k, h in enumerate(hparams)]
    prepared = [_prepare_sequences(c, k, inner_cfg, pad_id, eos_id) for k, c in enumerate(candidates)]

    n_max = max(1, max(len(seqs) for seqs, _ in prepared))
    longest = max([len(s) for seqs, _ in prepared for s in seqs] + [2])
    if inner_cfg.reference_faithful:
        t_max = inner_cfg.faithful_length
    else:
        t_max = _bucket(longest, inner_cfg.length_buckets)
    tokens = np.full((k_count, n_max, t_max), pad_id, np.int32)
    # Faithful: every pad position of a real sequence is an EOS/pad target (HF labels = input_ids).
    pad_weight = 1.0 if inner_cfg.reference_faithful else 0.0
    masks = np.zeros((k_count, n_max, t_max), np.float32)
    lengths = np.zeros((k_count, n_max), np.int32)
    for k, (seqs, seq_masks) in enumerate(prepared):
        for i, (seq, mask) in enumerate(zip(seqs, seq_masks)):
            tokens[k, i, : len(seq)] = seq
            masks[k, i, :] = pad_weight
            masks[k, i, : len(seq)] = mask
            lengths[k, i] = len(seq)

    # Step tables.
    per_cand_batches = []
    for k, ((seqs, _), hp) in enumerate(zip(prepared, hps)):
        n = len(seqs)
        per_epoch = math.ceil(n / bs)
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
        rows = np.arange(k_count)[:, None, None]
        used = np.where(batch_index >= 0, lengths[rows, np.maximum(batch_index, 0)], 0)
        longest_S = used.max(axis=(0, 2)) if s_max else np.zeros(0, np.int32)
        step_length = np.array([_bucket(max(int(x), 2), inner_cfg.length_buckets) for x in longest_S],
                               np.int32)
    return TrainPlan(tokens_KxNxT=tokens, loss_mask_KxNxT=masks, lengths_KxN=lengths,
                     batch_index_KxSxB=batch_index, active_KxS=active, lr_KxS=lr,
                     num_steps_K=num_steps, seeds_K=np.array([int(h["seed"]) for h in hps], np.int64),
                     step_length_S=step_length, reference_faithful=inner_cfg.reference_faithful,
                     pad_id=int(pad_id))


# ----------------------------------------------------------------------------------------------------
# Device side


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """The static part of one optimizer step (hashable: one compiled program per distinct value).

    Optimizer scalars (clip norm, weight decay, Adam betas/eps) are *not* here: they are passed as
    arrays, so changing them between rounds or domains reuses the compiled program.
    """

    cfg: ModelConfig
    lora_cfg: Optional[LoraConfig]  # None: full fine-tune of the base params
    reference_faithful: bool
    microbatches: int

    @classmethod
    def from_inner(cls, cfg: ModelConfig, lora_cfg: Optional[LoraConfig],
                   inner_cfg: InnerConfig) -> "StepConfig":
        return cls(cfg=cfg, lora_cfg=lora_cfg, reference_faithful=inner_cfg.reference_faithful,
                   microbatches=inner_cfg.microbatches)

    @property
    def full_finetune(self) -> bool:
        return self.lora_cfg is None


def optimizer_hparams(inner_cfg: InnerConfig) -> dict:
    """The dynamic optimizer scalars of `InnerConfig` (no clipping = an infinite max norm)."""
    clip = inner_cfg.max_grad_norm if inner_cfg.max_grad_norm else np.inf
    return {name: np.float32(value) for name, value in (
        ("max_grad_norm", clip), ("weight_decay", inner_cfg.weight_decay),
        ("b1", inner_cfg.adam_b1), ("b2", inner_cfg.adam_b2), ("eps", inner_cfg.adam_eps))}


def _sum_nll(step_cfg: StepConfig, trainable, frozen, tokens_BxT, mask_BxT, lengths_B, dropout_rng):
    """(sum of mask-weighted next-token NLL, number of target tokens) of one batch."""
    cfg = step_cfg.cfg
    if step_cfg.full_finetune:
        params, lora, lora_cfg = trainable, None, None
    else:
        params, lora, lora_cfg = frozen, trainable, step_cfg.lora_cfg
    segment_ids = None
    if not step_cfg.reference_faithful:
        t = tokens_BxT.shape[1]
        segment_ids = (jnp.arange(t)[None, :] < lengths_B[:, None]).astype(jnp.int32)
    use_dropout = lora_cfg is not None and lora_cfg.dropout > 0
    logits_BxTxV = transformer.forward(params, tokens_BxT, cfg=cfg, lora=lora, lora_cfg=lora_cfg,
                                       segment_ids_BxT=segment_ids,
                                       dropout_rng=dropout_rng if use_dropout else None)
    logits = logits_BxTxV[:, :-1]
    targets_BxT = tokens_BxT[:, 1:]
    # nll = logsumexp - target logit: avoids materialising a second [B, T, V] log-softmax.
    target_logit = jnp.take_along_axis(logits, targets_BxT[..., None], axis=-1)[..., 0]
    nll_BxT = jax.nn.logsumexp(logits, axis=-1) - target_logit
    weight_BxT = mask_BxT[:, 1:]
    return jnp.sum(weight_BxT * nll_BxT), jnp.sum(weight_BxT > 0).astype(jnp.float32)


def _global_norm(tree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _train_step(step_cfg: StepConfig, frozen, hyper: dict, state: dict, x: dict):
    """One optimizer step of ONE candidate (vmapped over K by the caller)."""
    trainable = state["params"]
    dropout_rng = jax.random.fold_in(state["rng"], x["step"])
    grad_fn = jax.value_and_grad(functools.partial(_sum_nll, step_cfg), has_aux=True)
    m = step_cfg.microbatches
    if m == 1:
        (loss_sum, count), grads = grad_fn(trainable, frozen, x["tokens"], x["loss_mask"],
                                           x["lengths"], dropout_rng)
    else:
        def split(a):
            return a.reshape(m, a.shape[0] // m, *a.shape[1:])

        def accumulate(carry, mb):
            (l_acc, c_acc, g_acc), i = carry, mb["i"]
            (l, c), g = grad_fn(trainable, frozen, mb["tokens"], mb["loss_mask"], mb["lengths"],
                                jax.random.fold_in(dropout_rng, i))
            return (l_acc + l, c_acc + c, jax.tree.map(jnp.add, g_acc, g)), None

        zeros = jax.tree.map(jnp.zeros_like, trainable)
        mbs = {"tokens": split(x["tokens"]), "loss_mask": split(x["loss_mask"]),
               "lengths": split(x["lengths"]), "i": jnp.arange(m)}
        (loss_sum, count, grads), _ = jax.lax.scan(
            accumulate, (jnp.float32(0), jnp.float32(0), zeros), mbs)
    # HF normalisation: the step's loss is the mean over its target tokens (a step with no target
    # token has loss 0 and zero gradients rather than 0/0).
    denom = jnp.maximum(count, 1.0)
    loss = loss_sum / denom
    grads = jax.tree.map(lambda g: (g / denom).astype(jnp.float32), grads)
    grad_norm = _global_norm(grads)
    # torch.nn.utils.clip_grad_norm_: scale by max_norm / (norm + 1e-6), never up.
    coef = jnp.minimum(1.0, hyper["max_grad_norm"] / (grad_norm + 1e-6))
    grads = jax.tree.map(lambda g: g * coef, grads)

    # AdamW, torch semantics (decoupled decay scaled by lr; bias corrections on the step size).
    b1, b2, eps = hyper["b1"], hyper["b2"], hyper["eps"]
    lr = x["lr"]
    count_t = state["count"] + 1
    t = count_t.astype(jnp.float32)
    mu = jax.tree.map(lambda m_, g: b1 * m_ + (1 - b1) * g, state["mu"], grads)
    nu = jax.tree.map(lambda v_, g: b2 * v_ + (1 - b2) * g * g, state["nu"], grads)
    step_size = lr / (1 - b1 ** t)
    bc2_sqrt = jnp.sqrt(1 - b2 ** t)

    def update(p, m_, v_):
        p32 = p.astype(jnp.float32)
        p32 = p32 * (1 - lr * hyper["weight_decay"])
        return (p32 - step_size * m_ / (jnp.sqrt(v_) / bc2_sqrt + eps)).astype(p.dtype)

    new_params = jax.tree.map(update, trainable, mu, nu)

    was_running = x["active"] & ~state["failed"]
    loss_ok = jnp.isfinite(loss)
    grad_ok = jnp.isfinite(grad_norm)
    params_ok = _all_finite(new_params)
    ok = loss_ok & grad_ok & params_ok
    commit = was_running & ok
    code = jnp.where(~loss_ok, _BAD_LOSS, jnp.where(~grad_ok, _BAD_GRAD, _BAD_PARAMS))
    newly_failed = was_running & ~ok

    def select(new, old):
        return jax.tree.map(lambda a, b: jnp.where(commit, a, b), new, old)

    new_state = {
        "params": select(new_params, trainable),
        "mu": select(mu, state["mu"]),
        "nu": select(nu, state["nu"]),
        "count": jnp.where(commit, count_t, state["count"]),
        "rng": state["rng"],
        "failed": state["failed"] | newly_failed,
        "fail_code": jnp.where(newly_failed, code, state["fail_code"]),
        "fail_step": jnp.where(newly_failed, x["step"], state["fail_step"]),
    }
    nan = jnp.float32(jnp.nan)
    return new_state, (jnp.where(was_running, loss, nan), jnp.where(was_running, grad_norm, nan))


def _run_chunk(step_cfg: StepConfig, frozen, hyper: dict, state: dict, xs: dict, num_valid):
    """Steps 0..num_valid-1 of a chunk for all K candidates. xs leaves are [C, K, ...]."""
    chunk, k_count = xs["lr"].shape
    vstep = jax.vmap(functools.partial(_train_step, step_cfg), in_axes=(None, None, 0, 0))
    nan_CxK = jnp.full((chunk, k_count), jnp.nan, jnp.float32)

    def body(i, carry):
        state, losses, norms = carry
        x = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), xs)
        state, (loss, norm) = vstep(frozen, hyper, state, x)
        return state, losses.at[i].set(loss), norms.at[i].set(norm)

    # A dynamic trip count: padding steps at the end of a chunk cost nothing.
    state, losses, norms = jax.lax.fori_loop(0, num_valid, body, (state, nan_CxK, nan_CxK))
    return state, losses, norms


# (StepConfig, mesh, rules, K with a mesh) -> jitted chunk function. jit itself caches per input shape.
_CHUNK_FNS: dict = {}
# Distinct (StepConfig, mesh, shapes) dispatched: the number of programs compiled in this process.
_COMPILED_SHAPES: set = set()


def compiled_shape_count() -> int:
    """How many distinct chunk programs this process has compiled (for benchmarks and tests)."""
    return len(_COMPILED_SHAPES)


def clear_compiled() -> None:
    """Forget every compiled chunk program (benchmarks measuring a cold start; frees executables)."""
    _CHUNK_FNS.clear()
    _COMPILED_SHAPES.clear()


def _state_logical_axes(step_cfg: StepConfig) -> dict:
    if step_cfg.full_finetune:
        per = jax.tree.map(lambda axes: ("candidate",) + tuple(axes),
                           transformer.param_logical_axes(step_cfg.cfg),
                           is_leaf=shard_lib._is_axes_leaf)
    else:
        per = lora_lib.lora_logical_axes(step_cfg.cfg, step_cfg.lora_cfg, candidate_axis=True)
    scalar = ("candidate",)
    return {"params": per, "mu": per, "nu": per, "count": scalar, "rng": ("candidate", None),
            "failed": scalar, "fail_code": scalar, "fail_step": scalar}


def _chunk_fn(step_cfg: StepConfig, mesh, rules, frozen, state, xs):
    # Shardings are derived from the first call's shapes, so K is part of the key with a mesh.
    key = (step_cfg, mesh, rules, None if mesh is None else xs["lr"].shape[1])
    fn = _CHUNK_FNS.get(key)
    if fn is None:
        # Donating the state lets XLA update K adapters + Adam moments in place on accelerators;
        # the CPU backend does not implement donation and would only warn.
        donate = (2,) if jax.default_backend() != "cpu" else ()
        run = functools.partial(_run_chunk, step_cfg)
        if mesh is None:
            fn = jax.jit(run, donate_argnums=donate)
        else:
            frozen_sh = (None if frozen is None else shard_lib.logical_to_sharding(
                transformer.param_logical_axes(step_cfg.cfg), mesh, rules, frozen))
            state_sh = shard_lib.logical_to_sharding(_state_logical_axes(step_cfg), mesh, rules, state)
            xs_sh = jax.tree.map(lambda a: shard_lib.candidate_sharding(mesh, a.ndim, 1, rules), xs)
            out_sh = (state_sh, shard_lib.candidate_sharding(mesh, 2, 1, rules),
                      shard_lib.candidate_sharding(mesh, 2, 1, rules))
            rep = shard_lib.replicated(mesh)
            in_sh = (frozen_sh, rep, state_sh, xs_sh, rep)
            fn = dist.global_inputs(jax.jit(run, in_shardings=in_sh, out_shardings=out_sh,
                                            donate_argnums=donate), in_sh)
        fn = (fn, key)
        _CHUNK_FNS[key] = fn
    return fn


@dataclasses.dataclass
class InnerResult:
    """Outcome of `train_candidates`; host fields are numpy."""

    lora: Any  # trained params [K, ...] (adapters, or base params when full fine-tuning)
    losses: np.ndarray  # [K, S] loss per step, NaN where the candidate took no step
    grad_norms: np.ndarray  # [K, S] pre-clip global gradient norm, NaN where no step
    failed: np.ndarray  # [K] bool
    failure_reason: list  # [K] str | None
    steps: np.ndarray  # [K] optimizer steps committed
    failed_step: np.ndarray  # [K] step index of the failure, -1 if none


def _initial_state(trainable_K, seeds_K: np.ndarray) -> dict:
    k_count = seeds_K.shape[0]
    zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), trainable_K)
    rng = jnp.stack([jax.random.fold_in(jax.random.PRNGKey(int(s)), 1) for s in seeds_K])
    return {"params": trainable_K, "mu": zeros, "nu": jax.tree.map(jnp.copy, zeros),
            "count": jnp.zeros(k_count, jnp.int32), "rng": rng,
            "failed": jnp.zeros(k_count, bool), "fail_code": jnp.zeros(k_count, jnp.int32),
            "fail_step": jnp.full(k_count, -1, jnp.int32)}


def _padded_count(k_count: int, multiple: int, buckets: Sequence[int]) -> int:
    target = next((b for b in buckets if b >= k_count), k_count)
    return target + (-target) % multiple


def _pad_plan(plan: TrainPlan, target: int) -> TrainPlan:
    """Append inactive dummy candidates up to `target` (candidate bucket / mesh shard multiple)."""
    extra = target - plan.num_candidates
    if extra <= 0:
        return plan

    def pad(a, value):
        return np.concatenate([a, np.full((extra, *a.shape[1:]), value, a.dtype)], axis=0)

    return dataclasses.replace(
        plan, tokens_KxNxT=pad(plan.tokens_KxNxT, plan.pad_id),
        loss_mask_KxNxT=pad(plan.loss_mask_KxNxT, 0), lengths_KxN=pad(plan.lengths_KxN, 0),
        batch_index_KxSxB=pad(plan.batch_index_KxSxB, -1), active_KxS=pad(plan.active_KxS, False),
        lr_KxS=pad(plan.lr_KxS, 0), num_steps_K=pad(plan.num_steps_K, 0),
        seeds_K=pad(plan.seeds_K, 0))


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
      the base params are placed by `rules` (seal_jax.sharding); K is padded internally to a multiple
      of the candidate shards.
    """
    step_cfg = StepConfig.from_inner(cfg, lora_cfg, inner_cfg)
    k_real = plan.num_candidates
    rules = shard_lib.rules_from_config({"logical_axis_rules": rules})  # hashable; default if None
    if step_cfg.full_finetune:
        if k_real != 1:
            raise ValueError(f"full fine-tuning trains the base params themselves: one candidate, "
                             f"got {k_real}")
        # One model: never split (or pad) a candidate axis; the mesh shards the params (FSDP/TP).
        rules = (("candidate", None),) + rules
    shards = shard_lib.candidate_shards(mesh, rules)
    plan = _pad_plan(plan, _padded_count(k_real, shards, inner_cfg.candidate_buckets))
    k_count = plan.num_candidates

    if step_cfg.full_finetune:
        frozen = None
        trainable = jax.tree.map(lambda p: jnp.asarray(p, jnp.float32)[None], base_params)
        trainable = jax.tree.map(lambda p: jnp.broadcast_to(p, (k_count, *p.shape[1:])), trainable)
    else:
        frozen = base_params
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
    state = _initial_state(trainable, plan.seeds_K)

    hyper = optimizer_hparams(inner_cfg)
    c = inner_cfg.steps_per_chunk
    losses, norms = [], []
    for start, stop, length in plan.chunks(c):
        xs = plan.gather(start, stop, length, c)
        fn, key = _chunk_fn(step_cfg, mesh, rules, frozen, state, xs)
        _COMPILED_SHAPES.add((key, k_count, c, plan.batch_size, length))
        state, chunk_losses, chunk_norms = fn(frozen, hyper, state, xs, np.int32(stop - start))
        losses.append(chunk_losses[: stop - start])
        norms.append(chunk_norms[: stop - start])

    def host_steps(parts):
        if not parts:
            return np.zeros((k_real, 0), np.float32)
        return dist.to_host(jnp.concatenate(parts, axis=0)).T[:k_real]

    failed, codes, fail_steps, counts = (x[:k_real] for x in dist.to_host(
        (state["failed"], state["fail_code"], state["fail_step"], state["count"])))
    reasons = []
    for k in range(k_real):
        if not failed[k]:
            reasons.append(None)
            continue
        s = int(fail_steps[k])
        lr_value = float(plan.lr_KxS[k, s])
        reasons.append(f"{_FAILURE_MESSAGES[int(codes[k])]} at step {s} (lr {lr_value:g}); "
                       f"params kept from step {s - 1}")
    trained = jax.tree.map(lambda a: a[:k_real], state["params"])
    if step_cfg.full_finetune:
        trained = jax.tree.map(lambda a, p: a.astype(jnp.asarray(p).dtype), trained,
                               jax.tree.map(lambda p: p[None], base_params))
    return InnerResult(lora=trained, losses=host_steps(losses), grad_norms=host_steps(norms),
                       failed=failed, failure_reason=reasons,
                       steps=counts.astype(np.int32),
                       failed_step=fail_steps)
