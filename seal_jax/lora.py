"""LoRA adapters as a pytree separate from the frozen base weights.

The base model (`seal_jax.model.transformer`) is never modified by training: an adapter is a small
nested dict `{target: {"a": A, "b": B}}` passed next to the base params, so the inner loop can vmap
over a leading candidate axis K of adapters while the multi-GB base stays one shared, resident copy.

Shapes (r = rank, L = layers, in/out = the projection's kernel shape, kernels are `x @ W`):
    one adapter:        A [L, in, r]     B [L, r, out]
    K candidates:       A [K, L, in, r]  B [K, L, r, out]

Initialisation follows PEFT: A ~ kaiming_uniform(a=sqrt(5)) on PEFT's [r, in] weight, which is
U(-1/sqrt(in), 1/sqrt(in)); B = 0, so a fresh adapter leaves the model unchanged. Adapters are float32
whatever the base dtype (PEFT autocasts adapters to fp32 as well).

PEFT file I/O lives in `seal_jax/peft_io.py`.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from seal_jax.model import transformer
from seal_jax.model.config import LoraConfig, ModelConfig
from seal_jax.model.transformer import PROJECTION_PATHS  # noqa: F401  (re-exported)

Lora = dict
Params = dict


@functools.partial(jax.jit, static_argnums=(0, 1))
def _init_one(cfg: ModelConfig, lora_cfg: LoraConfig, rng: jax.Array) -> Lora:
    # One uniform draw for all targets, sliced: a single threefry keeps the compile short.
    shapes = {t: (cfg.num_layers, cfg.projection_shape(t)[0], lora_cfg.rank) for t in lora_cfg.targets}
    unit = jax.random.uniform(rng, (sum(math.prod(s) for s in shapes.values()),), jnp.float32,
                              -1.0, 1.0)
    lora, offset = {}, 0
    for target, shape in shapes.items():
        fan_in, fan_out = cfg.projection_shape(target)
        size = math.prod(shape)
        a = unit[offset: offset + size].reshape(shape) / np.float32(np.sqrt(fan_in))
        offset += size
        b = jnp.zeros((cfg.num_layers, lora_cfg.rank, fan_out), jnp.float32)
        lora[target] = {"a": a, "b": b}
    return lora


def init_lora(cfg: ModelConfig, lora_cfg: LoraConfig, rng: jax.Array,
              num_candidates: int | None = None) -> Lora:
    """A fresh adapter (B = 0). With `num_candidates=K`, K independent adapters stacked on axis 0.

    Candidate k of `init_lora(..., rng, K)` equals `init_lora(..., jax.random.split(rng, K)[k])`, so
    a batched run and a loop over single candidates start from the same weights.
    """
    if num_candidates is None:
        return _init_one(cfg, lora_cfg, rng)
    if num_candidates <= 0:
        raise ValueError(f"num_candidates must be positive, got {num_candidates}")
    return init_lora_from_keys(cfg, lora_cfg, jax.random.split(rng, num_candidates))


def init_lora_from_keys(cfg: ModelConfig, lora_cfg: LoraConfig, keys_K: jax.Array) -> Lora:
    """One adapter per PRNG key, stacked on a leading candidate axis."""
    # A single key (or a [K, 2] array passed as typed keys) would otherwise vmap over key words.
    if jax.dtypes.issubdtype(keys_K.dtype, jax.dtypes.prng_key):
        chex.assert_rank(keys_K, 1)
    else:
        chex.assert_shape(keys_K, (None, 2))
    return _init_many(cfg, lora_cfg, keys_K)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _init_many(cfg: ModelConfig, lora_cfg: LoraConfig, keys_K: jax.Array) -> Lora:
    return jax.vmap(lambda key: _init_one(cfg, lora_cfg, key))(keys_K)


def init_lora_from_seeds(cfg: ModelConfig, lora_cfg: LoraConfig, seeds: Sequence[int]) -> Lora:
    """Stacked adapters; candidate k is `init_lora(cfg, lora_cfg, jax.random.PRNGKey(seeds[k]))`."""
    keys = jnp.stack([jax.random.PRNGKey(int(s)) for s in seeds])
    return init_lora_from_keys(cfg, lora_cfg, keys)


def check_lora(lora: Lora, cfg: ModelConfig, lora_cfg: LoraConfig, candidate_axis: bool) -> None:
    """Raise ValueError naming the first target whose shapes do not fit `cfg`/`lora_cfg`
    (`transformer.check_lora`, the one shape check of an adapter)."""
    transformer.check_lora(lora, cfg, lora_cfg, candidate_axis=candidate_axis)


def num_candidates(lora: Lora) -> int:
    """K of a candidate-stacked adapter."""
    return int(jax.tree.leaves(lora)[0].shape[0])


def stack_candidates(loras: Sequence[Lora]) -> Lora:
    """[lora_0, ..., lora_{K-1}] -> one adapter with a leading K axis."""
    if not loras:
        raise ValueError("stack_candidates needs at least one adapter")
    return jax.tree.map(lambda *xs: jnp.stack(xs), *loras)


def candidate(lora: Lora, k: int) -> Lora:
    """Adapter k of a candidate-stacked adapter (no candidate axis)."""
    return jax.tree.map(lambda x: x[k], lora)


def unstack_candidates(lora: Lora) -> list[Lora]:
    return [candidate(lora, k) for k in range(num_candidates(lora))]


def merge_lora(params: Params, lora: Lora, cfg: ModelConfig, lora_cfg: LoraConfig) -> Params:
    """Base params with `W + scale * A @ B` folded into every target kernel.

    The product and the sum are computed in float32 and cast back to W's dtype once, as PEFT's
    `merge_and_unload` does on an fp32 adapter. `lora` must have no candidate axis.
    """
    check_lora(lora, cfg, lora_cfg, candidate_axis=False)
    merged = jax.tree.map(lambda x: x, params)  # new containers; untouched leaves are shared
    layers = merged["layers"]
    for target in lora_cfg.targets:
        group, name = PROJECTION_PATHS[target]
        layers[group] = dict(layers[group])
        module = layers[group][name] = dict(layers[group][name])
        module["kernel"] = _merged_kernel(module["kernel"], lora[target]["a"], lora[target]["b"],
                                          lora_cfg.scale)
    return merged


@functools.partial(jax.jit, static_argnums=(3,))
def _merged_kernel(w_LxIxO: Float[Array, "L I O"], a_LxIxR: Float[Array, "L I R"],
                   b_LxRxO: Float[Array, "L R O"], scale: float) -> Float[Array, "L I O"]:
    ab_LxIxO = jnp.einsum("lir,lro->lio", a_LxIxR.astype(jnp.float32), b_LxRxO.astype(jnp.float32),
                          precision=jax.lax.Precision.HIGHEST)
    return (w_LxIxO.astype(jnp.float32) + scale * ab_LxIxO).astype(w_LxIxO.dtype)


def lora_logical_axes(cfg: ModelConfig, lora_cfg: LoraConfig, candidate_axis: bool = True) -> Lora:
    """Logical axis names of every adapter array, same tree structure as the adapter.

    The in/out dims get their own names ("lora_in", "lora_out") rather than the base kernel's
    ("embed", "mlp", ...): adapters are small, and the default rules keep them whole on each device
    while only the candidate axis is split.
    """
    lead = ("candidate",) if candidate_axis else ()
    return {t: {"a": lead + ("layers", "lora_in", "lora_rank"),
                "b": lead + ("layers", "lora_rank", "lora_out")} for t in lora_cfg.targets}


def lora_num_params(cfg: ModelConfig, lora_cfg: LoraConfig) -> int:
    """Trainable parameters of one adapter."""
    return sum(cfg.num_layers * lora_cfg.rank * sum(cfg.projection_shape(t))
               for t in lora_cfg.targets)
