"""The optimizer of every update in seal_jax (inner loop and M-step), as one optax chain.

    clip_by_global_norm_torch(max_grad_norm)   torch's clip_grad_norm_: scale by max/(norm + 1e-6),
                                               never up (optax.clip_by_global_norm has no 1e-6 and
                                               divides by the norm: close, not equal)
    optax.adamw(lr, b1, b2, eps, weight_decay) torch.optim.AdamW: bias-corrected moments, decoupled
                                               decay scaled by lr (p -= lr * (adam + wd * p))

wrapped in `optax.inject_hyperparams`, so every scalar (learning rate, clip norm, betas, eps, decay)
is an array in the optimizer state rather than a constant of the compiled program: the per-step
learning rate of the plan's schedule table is written into the state before each update, and
changing any optimizer setting between rounds or domains reuses the compiled program. Under
`jax.vmap` each candidate carries its own copy of the scalars.
"""
from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

# torch.nn.utils.clip_grad_norm_ adds this to the norm before dividing.
TORCH_CLIP_EPS = 1e-6


def clip_by_global_norm_torch(max_norm) -> optax.GradientTransformation:
    """Scale all gradients by min(1, max_norm / (global_norm + 1e-6)), as torch's clip_grad_norm_."""

    def update(updates, state, params=None):
        del params
        norm = optax.tree.norm(updates)
        coef = jnp.minimum(1.0, max_norm / (norm + TORCH_CLIP_EPS))
        return jax.tree.map(lambda g: (g * coef).astype(g.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _chain(learning_rate, max_grad_norm, b1, b2, eps, weight_decay) -> optax.GradientTransformation:
    return optax.chain(
        clip_by_global_norm_torch(max_grad_norm),
        optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay),
    )


# One GradientTransformation factory; the numbers are given (as state) at init.
torch_adamw = optax.inject_hyperparams(_chain, hyperparam_dtype=jnp.float32)


def optimizer(*, max_grad_norm: Optional[float], weight_decay: float, b1: float, b2: float,
              eps: float) -> optax.GradientTransformation:
    """The chain with its scalars; the learning rate starts at 0 and is set per step
    (`with_learning_rate`). max_grad_norm None or 0: no clipping (an infinite max norm)."""
    clip = max_grad_norm if max_grad_norm else np.inf
    return torch_adamw(learning_rate=0.0, max_grad_norm=clip, b1=b1, b2=b2, eps=eps,
                       weight_decay=weight_decay)


def with_learning_rate(opt_state: Any, lr) -> Any:
    """The state with this step's learning rate (a traced scalar from the plan's lr table)."""
    hyper = dict(opt_state.hyperparams)
    hyper["learning_rate"] = jnp.asarray(lr, jnp.float32)
    return opt_state._replace(hyperparams=hyper)


def learning_rate(opt_state: Any) -> jax.Array:
    return opt_state.hyperparams["learning_rate"]


def state_logical_axes(opt: optax.GradientTransformation, opt_state: Any, param_axes: Any,
                       scalar_axes: tuple, is_axes_leaf) -> Any:
    """Logical axes of every leaf of `opt_state`: the param's axes for moment leaves, `scalar_axes`
    for counters and hyperparameters (for placing a candidate-stacked state on a mesh)."""
    return optax.tree_utils.tree_map_params(
        opt, lambda _, axes: axes, opt_state, param_axes,
        transform_non_params=lambda _: scalar_axes, is_leaf=is_axes_leaf)
