"""The next-token loss, computed without ever holding the float32 [B, T, V] logits.

One function, `next_token_nll`, serves the inner loop, the M-step and scoring: the negative
log-likelihood of token t+1 given tokens <= t, per position. The LM head is applied chunk by chunk
over the flattened tokens (`chunked_nll`): each chunk's logits [chunk, V] give its logsumexp and
target logit and are dropped; the chunk body is rematerialised (`jax.checkpoint`) so the backward
pass recomputes one chunk's logits at a time instead of keeping all of them. At K = 32 candidates of
2048 tokens and Qwen2.5's 152k vocabulary the plain logits are 40 GB; a chunk is a few hundred MB.

`chunk_tokens=None` is the plain path (full logits from `transformer.forward`): the reference for the
parity test, and cheaper for tiny shapes.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from seal_jax.model import transformer
from seal_jax.model.config import LoraConfig, ModelConfig


def _nll_from_logits(logits_NxV: Float[Array, "N V"], targets_N: Int[Array, " N"]) -> Float[Array, " N"]:
    # logsumexp - target logit: no second [N, V] log-softmax array.
    target_logit_N = jnp.take_along_axis(logits_NxV, targets_N[:, None], axis=-1)[:, 0]
    return jax.nn.logsumexp(logits_NxV, axis=-1) - target_logit_N


def chunked_nll(hidden_NxD: Float[Array, "N D"], head_DxV: Float[Array, "D V"],
                targets_N: Int[Array, " N"], chunk_tokens: int) -> Float[Array, " N"]:
    """-log softmax(hidden @ head)[target] per row, `chunk_tokens` rows of logits at a time."""
    n, d = hidden_NxD.shape
    chunk = max(1, min(int(chunk_tokens), n))
    num_chunks = -(-n // chunk)
    pad = num_chunks * chunk - n
    hidden_CxMxD = jnp.pad(hidden_NxD, ((0, pad), (0, 0))).reshape(num_chunks, chunk, d)
    targets_CxM = jnp.pad(targets_N, (0, pad)).reshape(num_chunks, chunk)

    @jax.checkpoint
    def one_chunk(args):
        h_MxD, t_M = args
        # Head matmul in the compute dtype, output upcast: the same numerics as transformer.forward.
        logits_MxV = jnp.einsum("md,dv->mv", h_MxD, head_DxV).astype(jnp.float32)
        return _nll_from_logits(logits_MxV, t_M)

    nll_CxM = jax.lax.map(one_chunk, (hidden_CxMxD, targets_CxM))
    return nll_CxM.reshape(-1)[:n]


def next_token_nll(params, tokens_BxT: Int[Array, "B T"], *, cfg: ModelConfig, lora=None,
                   lora_cfg: Optional[LoraConfig] = None, positions_BxT=None, segment_ids_BxT=None,
                   dropout_rng=None, chunk_tokens: Optional[int] = 1024,
                   lora_tokens_GxN=None) -> Float[Array, "B T-1"]:
    """NLL of tokens[:, 1:] given their prefixes, float32 [B, T-1] (position t predicts t+1).

    Masking of targets is the caller's (a weight per position); padding handled by segment ids as
    in `transformer.forward` (and packed rows of several adapters by `lora_tokens_GxN`, as there).
    """
    targets_BxT1 = tokens_BxT[:, 1:]
    kw = dict(cfg=cfg, lora=lora, lora_cfg=lora_cfg, positions_BxT=positions_BxT,
              segment_ids_BxT=segment_ids_BxT, dropout_rng=dropout_rng, lora_tokens_GxN=lora_tokens_GxN)
    if chunk_tokens is None:
        logits_BxTxV = transformer.forward(params, tokens_BxT, **kw)[:, :-1]
        b, t1, v = logits_BxTxV.shape
        return _nll_from_logits(logits_BxTxV.reshape(b * t1, v), targets_BxT1.reshape(-1)).reshape(b, t1)
    hidden_BxTxD = transformer.forward_hidden(params, tokens_BxT, **kw)[:, :-1]
    b, t1, d = hidden_BxTxD.shape
    nll_N = chunked_nll(hidden_BxTxD.reshape(b * t1, d), transformer.lm_head(params, cfg),
                        targets_BxT1.reshape(-1), chunk_tokens)
    return nll_N.reshape(b, t1)
