"""The inner loop's device side: one optimizer step of one candidate, vmapped over K, run in chunks.

One compiled function runs a chunk of up to `steps_per_chunk` steps (a loop with a dynamic trip
count) for all K candidates under `jax.vmap`; the base params are shared (in_axes=None) and passed as
arguments, never closed over. The host (`seal_jax/inner.py`) loops over chunks; nothing syncs with
the host inside a chunk or between chunks.

One step of one candidate: gather its batch, loss = sum(mask * nll) / #targets (HF's per-step
normalisation; nll from `seal_jax/loss.py`, chunked over tokens), gradients w.r.t. the trainable
params only, then the optax chain of `seal_jax/optim.py` (torch's clip_grad_norm_ by its *own*
global norm, torch AdamW, this step's lr from the plan's table), then a masked commit: params and
optimizer state change only where the candidate is active. A candidate whose loss, gradient norm or
updated params are non-finite is marked failed (code and step recorded); its params and optimizer
state stay at the last finite value and, since candidates never interact, the others are bit-for-bit
what they would have been.
"""
from __future__ import annotations

import dataclasses
import functools
import threading
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import NamedSharding
from jaxtyping import Array, Bool, Int, UInt32

from seal_jax import distributed as dist
from seal_jax import lora as lora_lib
from seal_jax import optim
from seal_jax import sharding as shard_lib
from seal_jax.loss import next_token_nll
from seal_jax.model import transformer
from seal_jax.model.config import LoraConfig, ModelConfig
from seal_jax.train_plan import InnerConfig, PackedStepBatch, StepBatch

# Failure codes recorded on the device; messages are built on the host.
OK, BAD_LOSS, BAD_GRAD, BAD_PARAMS = 0, 1, 2, 3
FAILURE_MESSAGES = {
    BAD_LOSS: "non-finite loss",
    BAD_GRAD: "non-finite gradient norm",
    BAD_PARAMS: "non-finite parameters after the update",
}

# The transformation's structure; its numbers live in each candidate's optimizer state.
OPTIMIZER = optim.optimizer(max_grad_norm=1.0, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8)


@struct.dataclass
class TrainState:
    """Per-candidate training state (a leading K axis on every leaf outside the vmapped step)."""

    params: Any  # trainable pytree: LoRA adapters, or float32 base params when full fine-tuning
    opt_state: Any  # optax state of `OPTIMIZER` (moments, count, hyperparameters)
    rng: UInt32[Array, "... 2"]  # dropout key
    failed: Bool[Array, "..."]
    fail_code: Int[Array, "..."]
    fail_step: Int[Array, "..."]  # -1 if none


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """The static part of one optimizer step (hashable: one compiled program per distinct value).

    Optimizer scalars are not here: they are arrays in the optimizer state, so changing them between
    rounds or domains reuses the compiled program.
    """

    cfg: ModelConfig  # with `remat` resolved
    lora_cfg: Optional[LoraConfig]  # None: full fine-tune of the base params
    reference_faithful: bool
    microbatches: int
    loss_chunk_tokens: Optional[int]  # None: plain (unchunked) loss

    @classmethod
    def from_inner(cls, cfg: ModelConfig, lora_cfg: Optional[LoraConfig], inner_cfg: InnerConfig,
                   candidates_per_device: int = 1) -> "StepConfig":
        # remat=None (auto) starts from the model's own setting; seal_jax.inner then turns it on
        # per program where the program without it would not fit the device's memory.
        remat = cfg.remat if inner_cfg.remat is None else inner_cfg.remat
        chunk = None
        if inner_cfg.loss_chunk_mib:
            per_token = 4 * cfg.vocab_size * max(1, candidates_per_device)  # float32 logits row, all K
            budget = max(16, (inner_cfg.loss_chunk_mib << 20) // per_token)
            chunk = 1 << (int(budget).bit_length() - 1)  # a power of two: few distinct programs
        return cls(cfg=cfg.replace(remat=bool(remat)), lora_cfg=lora_cfg,
                   reference_faithful=inner_cfg.reference_faithful,
                   microbatches=inner_cfg.microbatches, loss_chunk_tokens=chunk)

    def with_remat(self, remat: bool) -> "StepConfig":
        return dataclasses.replace(self, cfg=self.cfg.replace(remat=bool(remat)))

    @property
    def full_finetune(self) -> bool:
        return self.lora_cfg is None


def initial_state(trainable_K, seeds_K: np.ndarray, inner_cfg: InnerConfig) -> TrainState:
    """Fresh optimizer state (the numbers of `inner_cfg`) for K candidates' trainable params."""
    opt = optim.optimizer(max_grad_norm=inner_cfg.max_grad_norm, weight_decay=inner_cfg.weight_decay,
                          b1=inner_cfg.adam_b1, b2=inner_cfg.adam_b2, eps=inner_cfg.adam_eps)
    k_count = seeds_K.shape[0]
    rng = jnp.stack([jax.random.fold_in(jax.random.PRNGKey(int(s)), 1) for s in seeds_K])
    return TrainState(params=trainable_K, opt_state=jax.vmap(opt.init)(trainable_K), rng=rng,
                      failed=jnp.zeros(k_count, bool), fail_code=jnp.zeros(k_count, jnp.int32),
                      fail_step=jnp.full(k_count, -1, jnp.int32))


def _sum_nll(step_cfg: StepConfig, trainable, frozen, tokens_BxT, mask_BxT, lengths_B, dropout_rng):
    """(sum of mask-weighted next-token NLL, number of target tokens) of one batch."""
    if step_cfg.full_finetune:
        params, lora, lora_cfg = trainable, None, None
    else:
        params, lora, lora_cfg = frozen, trainable, step_cfg.lora_cfg
    segment_ids = None
    if not step_cfg.reference_faithful:
        t = tokens_BxT.shape[1]
        segment_ids = (jnp.arange(t)[None, :] < lengths_B[:, None]).astype(jnp.int32)
    use_dropout = lora_cfg is not None and lora_cfg.dropout > 0
    nll_BxT = next_token_nll(params, tokens_BxT, cfg=step_cfg.cfg, lora=lora, lora_cfg=lora_cfg,
                             segment_ids_BxT=segment_ids,
                             dropout_rng=dropout_rng if use_dropout else None,
                             chunk_tokens=step_cfg.loss_chunk_tokens)
    weight_BxT = mask_BxT[:, 1:]
    return jnp.sum(weight_BxT * nll_BxT), jnp.sum(weight_BxT > 0).astype(jnp.float32)


def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _gradients(step_cfg: StepConfig, frozen, params, x: StepBatch, dropout_rng):
    """(loss sum, target count, gradient sums) of the step's batch, in `microbatches` pieces."""
    grad_fn = jax.value_and_grad(functools.partial(_sum_nll, step_cfg), has_aux=True)
    m = step_cfg.microbatches
    if m == 1:
        (loss_sum, count), grads = grad_fn(params, frozen, x.tokens, x.loss_mask, x.lengths,
                                           dropout_rng)
        return loss_sum, count, grads

    def split(a):
        return a.reshape(m, a.shape[0] // m, *a.shape[1:])

    def accumulate(carry, mb):
        l_acc, c_acc, g_acc = carry
        tokens, mask, lengths, i = mb
        (l, c), g = grad_fn(params, frozen, tokens, mask, lengths, jax.random.fold_in(dropout_rng, i))
        return (l_acc + l, c_acc + c, jax.tree.map(jnp.add, g_acc, g)), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    mbs = (split(x.tokens), split(x.loss_mask), split(x.lengths), jnp.arange(m))
    (loss_sum, count, grads), _ = jax.lax.scan(accumulate, (jnp.float32(0), jnp.float32(0), zeros), mbs)
    return loss_sum, count, grads


def train_step(step_cfg: StepConfig, frozen, state: TrainState, x: StepBatch):
    """One optimizer step of ONE candidate (vmapped over K by `run_chunk`)."""
    dropout_rng = jax.random.fold_in(state.rng, x.step)
    loss_sum, count, grads = _gradients(step_cfg, frozen, state.params, x, dropout_rng)
    # HF normalisation: the step's loss is the mean over its target tokens (a step with no target
    # token has loss 0 and zero gradients rather than 0/0).
    denom = jnp.maximum(count, 1.0)
    loss = loss_sum / denom
    grads = jax.tree.map(lambda g: (g / denom).astype(jnp.float32), grads)
    return _commit(state, x.lr, x.active, x.step, loss, grads)


def _commit(state: TrainState, lr, active, step, loss, grads):
    """The optax update of ONE candidate from its loss and (normalised) gradients, committed where
    the candidate is active and everything is finite; records a failure otherwise."""
    grad_norm = optax.tree.norm(grads)  # pre-clip, reported
    opt_state = optim.with_learning_rate(state.opt_state, lr)
    updates, new_opt_state = OPTIMIZER.update(grads, opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)

    was_running = active & ~state.failed
    loss_ok, grad_ok, params_ok = jnp.isfinite(loss), jnp.isfinite(grad_norm), _all_finite(new_params)
    ok = loss_ok & grad_ok & params_ok
    commit = was_running & ok
    code = jnp.where(~loss_ok, BAD_LOSS, jnp.where(~grad_ok, BAD_GRAD, BAD_PARAMS))
    newly_failed = was_running & ~ok

    def select(new, old):
        return jax.tree.map(lambda a, b: jnp.where(commit, a, b), new, old)

    new_state = TrainState(
        params=select(new_params, state.params), opt_state=select(new_opt_state, state.opt_state),
        rng=state.rng, failed=state.failed | newly_failed,
        fail_code=jnp.where(newly_failed, code, state.fail_code),
        fail_step=jnp.where(newly_failed, step, state.fail_step))
    nan = jnp.float32(jnp.nan)
    return new_state, (jnp.where(was_running, loss, nan), jnp.where(was_running, grad_norm, nan))


def _packed_objective(step_cfg: StepConfig, frozen, lora_U, x: PackedStepBatch):
    """(sum over the step's members of each one's mean target NLL, (NLL sums [U], target counts [U]))
    of one packed step. Candidates share no parameter and no attention, so the gradient of the sum
    with respect to member u's adapter is the gradient of that candidate's own loss."""
    member_count, per_member = x.member_tokens.shape
    rows, t = x.tokens.shape
    # The members' adapters layer-major ([U, L, ...] -> [L, U, ...]) for the layer scan, cast to the
    # compute dtype first (the values a per-layer cast would give), so the transpose moves half the bytes.
    lora_LxU = jax.tree.map(lambda a: jnp.moveaxis(a.astype(step_cfg.cfg.dtype), 0, 1), lora_U)
    nll_RxT1 = next_token_nll(frozen, x.tokens, cfg=step_cfg.cfg, lora=lora_LxU, lora_cfg=step_cfg.lora_cfg,
                              segment_ids_BxT=x.segments, chunk_tokens=step_cfg.loss_chunk_tokens,
                              lora_tokens_GxN=x.member_tokens)
    weight_RxT1 = x.loss_mask[:, 1:]
    # Each target token's member, from its place in the members' token lists; padding (no member)
    # goes to a dropped bin U.
    place_RxT = transformer.lora_token_maps(x.member_tokens, rows * t)[1].reshape(rows, t)
    owner_RxT1 = jnp.minimum(place_RxT[:, 1:] // per_member, member_count)
    # where, not a product: a 0-weight position of a non-finite neighbour must not turn into NaN.
    weighted = jnp.where(weight_RxT1 > 0, weight_RxT1 * nll_RxT1, 0.0).reshape(-1)
    loss_sum_U = jax.ops.segment_sum(weighted, owner_RxT1.reshape(-1), member_count + 1)[:member_count]
    count_U = jax.ops.segment_sum((weight_RxT1 > 0).astype(jnp.float32).reshape(-1),
                                  owner_RxT1.reshape(-1), member_count + 1)[:member_count]
    return jnp.sum(loss_sum_U / jnp.maximum(count_U, 1.0)), (loss_sum_U, count_U)


def packed_train_step(step_cfg: StepConfig, frozen, state: TrainState, x: PackedStepBatch):
    """One optimizer step of the K candidates whose sequences share packed rows: the step's members
    (`x.members`, the candidates active at it) are gathered from the call's state, take one forward
    and backward pass over the rows and each its own update (`_commit`, vmapped over them), and are
    written back. The others are untouched, as `_commit` would leave an inactive candidate."""
    k_count = x.lr.shape[0]
    members_U = x.members
    is_member_U = members_U < k_count  # unused places hold K, K + 1, ...: read clipped, never written

    def take(a):
        return jnp.take(a, members_U, axis=0, mode="clip")

    state_U = jax.tree.map(take, state)
    grad_fn = jax.value_and_grad(functools.partial(_packed_objective, step_cfg, frozen), has_aux=True)
    (_, (loss_sum_U, count_U)), grads_U = grad_fn(state_U.params, x)
    loss_U = loss_sum_U / jnp.maximum(count_U, 1.0)
    grads_U = jax.tree.map(lambda g: g.astype(jnp.float32), grads_U)
    new_U, (loss_U, norm_U) = jax.vmap(_commit)(state_U, take(x.lr), take(x.active) & is_member_U,
                                                take(x.step), loss_U, grads_U)

    def put(full, part):  # members are distinct; the unused places (out of range) are dropped
        return full.at[members_U].set(part, mode="drop", unique_indices=True)

    nan_K = jnp.full((k_count,), jnp.nan, jnp.float32)
    return jax.tree.map(put, state, new_U), (put(nan_K, loss_U), put(nan_K, norm_U))


def run_packed_chunk(step_cfg: StepConfig, frozen, state: TrainState, xs: PackedStepBatch, num_valid):
    """Packed steps 0..num_valid-1 of a chunk. xs leaves are [C, ...]."""
    chunk, k_count = xs.lr.shape
    nan_CxK = jnp.full((chunk, k_count), jnp.nan, jnp.float32)

    def body(i, carry):
        state, losses, norms = carry
        x = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), xs)
        state, (loss, norm) = packed_train_step(step_cfg, frozen, state, x)
        return state, losses.at[i].set(loss), norms.at[i].set(norm)

    return jax.lax.fori_loop(0, num_valid, body, (state, nan_CxK, nan_CxK))


def run_chunk(step_cfg: StepConfig, frozen, state: TrainState, xs: StepBatch, num_valid):
    """Steps 0..num_valid-1 of a chunk for all K candidates. xs leaves are [C, K, ...]."""
    chunk, k_count = xs.lr.shape
    vstep = jax.vmap(functools.partial(train_step, step_cfg), in_axes=(None, 0, 0))
    nan_CxK = jnp.full((chunk, k_count), jnp.nan, jnp.float32)

    def body(i, carry):
        state, losses, norms = carry
        x = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), xs)
        state, (loss, norm) = vstep(frozen, state, x)
        return state, losses.at[i].set(loss), norms.at[i].set(norm)

    # A dynamic trip count: padding steps at the end of a chunk cost nothing.
    return jax.lax.fori_loop(0, num_valid, body, (state, nan_CxK, nan_CxK))


# (StepConfig, mesh, rules, K with a mesh) -> jitted chunk function. jit itself caches per input shape.
_CHUNK_FNS: dict = {}
# Distinct (StepConfig, mesh, shapes) dispatched: the number of programs compiled in this process.
COMPILED_SHAPES: set = set()


def state_logical_axes(step_cfg: StepConfig, state: TrainState) -> TrainState:
    if step_cfg.full_finetune:
        per = jax.tree.map(lambda axes: ("candidate",) + tuple(axes),
                           transformer.param_logical_axes(step_cfg.cfg),
                           is_leaf=shard_lib._is_axes_leaf)
    else:
        per = lora_lib.lora_logical_axes(step_cfg.cfg, step_cfg.lora_cfg, candidate_axis=True)
    scalar = ("candidate",)
    opt_axes = optim.state_logical_axes(OPTIMIZER, state.opt_state, per, scalar, shard_lib._is_axes_leaf)
    return TrainState(params=per, opt_state=opt_axes, rng=("candidate", None), failed=scalar,
                      fail_code=scalar, fail_step=scalar)


def _is_axes(x) -> bool:
    # Exactly a tuple: optax's EmptyState is a (field-less) NamedTuple, a node, not axes.
    return type(x) is tuple and all(isinstance(a, (str, type(None))) for a in x)


def _state_shardings(step_cfg: StepConfig, state: TrainState, mesh, rules) -> TrainState:
    axes = jax.tree.leaves(state_logical_axes(step_cfg, state), is_leaf=_is_axes)
    leaves, treedef = jax.tree.flatten(state)
    if len(axes) != len(leaves):
        raise ValueError(f"train state has {len(leaves)} arrays but {len(axes)} logical-axis entries")
    return treedef.unflatten([NamedSharding(mesh, shard_lib.logical_to_spec(a, mesh, rules, np.shape(x)))
                              for a, x in zip(axes, leaves)])


def chunk_fn(step_cfg: StepConfig, mesh, rules, frozen, state: TrainState, xs: StepBatch):
    """(jitted run_chunk, its cache key) for these settings, placed on `mesh` if given."""
    # Shardings are derived from the first call's shapes, so K is part of the key with a mesh.
    packed = isinstance(xs, PackedStepBatch)
    key = (step_cfg, mesh, rules, None if mesh is None else xs.lr.shape[1], packed)
    fn = _CHUNK_FNS.get(key)
    if fn is None:
        # Donating the state lets XLA update K adapters + Adam moments in place on accelerators;
        # the CPU backend does not implement donation and would only warn.
        donate = (1,) if jax.default_backend() != "cpu" else ()
        run = functools.partial(run_packed_chunk if packed else run_chunk, step_cfg)
        # Packed rows mix candidates, so they run where the candidates are not split: no mesh, or
        # one device (seal_jax.inner packs only there), with the inputs where they already are.
        if mesh is None or packed:
            fn = jax.jit(run, donate_argnums=donate)
        else:
            frozen_sh = (None if frozen is None else shard_lib.logical_to_sharding(
                transformer.param_logical_axes(step_cfg.cfg), mesh, rules, frozen))
            state_sh = _state_shardings(step_cfg, state, mesh, rules)
            xs_sh = jax.tree.map(lambda a: shard_lib.candidate_sharding(mesh, a.ndim, 1, rules), xs)
            per_step_sh = shard_lib.candidate_sharding(mesh, 2, 1, rules)
            rep = shard_lib.replicated(mesh)
            in_sh = (frozen_sh, state_sh, xs_sh, rep)
            # global_inputs: host values become global arrays when the mesh spans processes (a
            # no-op in one process).
            fn = dist.global_inputs(jax.jit(run, in_shardings=in_sh,
                                            out_shardings=(state_sh, per_step_sh, per_step_sh),
                                            donate_argnums=donate), in_sh)
        fn = (fn, key)
        _CHUNK_FNS[key] = fn
    return fn


# Executables compiled ahead of their calls (`seal_jax.inner.precompile`, or to read their memory
# needs), by COMPILED_SHAPES key.
PRECOMPILED: dict = {}
# Automatic remat: (StepConfig, mesh, rules, K, C, B, T) -> whether that program runs rematerialised.
REMAT_CHOICE: dict = {}
# ... and the bytes its plain program plans (None: unknown, or not compiled because it cannot fit).
REMAT_NEED: dict = {}


# One lock per program key (a compile, or a remat choice): the E-step compiles its programs in
# background threads while the calls run, and a call reaching a program still compiling waits for it
# instead of compiling it a second time.
_PROGRAM_LOCKS: dict = {}
_PROGRAM_LOCKS_GUARD = threading.Lock()


def program_lock(key) -> threading.Lock:
    with _PROGRAM_LOCKS_GUARD:
        return _PROGRAM_LOCKS.setdefault(key, threading.Lock())


def clear() -> None:
    _CHUNK_FNS.clear()
    COMPILED_SHAPES.clear()
    PRECOMPILED.clear()
    REMAT_CHOICE.clear()
    REMAT_NEED.clear()
    with _PROGRAM_LOCKS_GUARD:
        _PROGRAM_LOCKS.clear()
