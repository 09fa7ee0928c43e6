"""Decoder-only Llama / Qwen2 transformer in Flax linen, behind a small pure-function API.

The public API (docs/DESIGN.md §1) is `init_params`, `forward`, `forward_with_cache`, `init_cache`,
`param_logical_axes` and `KVCache`. Callers never touch the linen modules: parameters are a plain nested
dict and every function takes them as an argument, so `jax.jit` / `jax.vmap` compose freely.

Layout choices, and why:
* Layers run under `nn.scan`: their weights are stacked on a leading `L` axis and the compiled program
  contains the layer body once, so compile time does not grow with depth (28 layers for Qwen2.5-7B).
  `cfg.remat` wraps the layer in `nn.remat` to trade recompute for activation memory;
  `cfg.saved_residuals="dots"` (the default) saves only its matmul outputs for the backward pass.
* LoRA is *not* a linen variable. It is a separate pytree passed through the scan as a scanned input,
  so the frozen base (`params`) and the adapters stay apart and `jax.vmap` can map over `lora` while
  `params` are shared (one resident base, K candidate adapters).
* The KV cache is also a scanned input/output of the layer scan ([L, B, S, KV, Dh]).
* Normalisation statistics, RoPE angles, attention softmax and the returned logits are float32 whatever
  the compute dtype; matmuls run (inputs and outputs) in `cfg.compute_dtype`.

Parameter tree (`Params`), projection kernels are [in, out]:
    embed/embedding [V, D]
    layers/attn_norm/scale [L, D]      layers/mlp_norm/scale [L, D]
    layers/attn/{q,k,v,o}/kernel [L, in, out]   layers/attn/{q,k,v}/bias [L, out] (Qwen2 only)
    layers/mlp/{gate,up,down}/kernel [L, in, out]
    final_norm/scale [D]
    lm_head [D, V]                     (only when embeddings are untied)
`PROJECTION_PATHS[target]` gives the path of each LoRA-able kernel inside `params["layers"]`.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from seal_jax.model.config import LoraConfig, ModelConfig

Params = dict
Lora = dict

# Where each projection lives inside params["layers"]; LoRA targets use the same names.
PROJECTION_PATHS = {
    "q": ("attn", "q"), "k": ("attn", "k"), "v": ("attn", "v"), "o": ("attn", "o"),
    "gate": ("mlp", "gate"), "up": ("mlp", "up"), "down": ("mlp", "down"),
}
# Large finite negative logit for masked keys: a fully-masked row (padding query) then gets a uniform
# softmax instead of NaN, and its (finite) output is zeroed afterwards.
_MASK_VALUE = -1e30


@struct.dataclass
class KVCache:
    """Per-layer keys/values of the tokens seen so far. `cursor` is the next slot to write (shared)."""

    k: jax.Array  # [L, B, S, KV, Dh]
    v: jax.Array  # [L, B, S, KV, Dh]
    valid_BxS: jax.Array  # bool: slot holds a real token
    cursor: jax.Array  # int32 scalar


# ----------------------------------------------------------------------------------------------------
# Building blocks


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse RoPE frequencies [Dh/2], float32, incl. Llama-3 scaling (as HF's rope_init_fn)."""
    dim = cfg.head_dim
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (np.float32(1.0) / (np.float32(cfg.rope_theta) ** exponents)).astype(np.float32)
    rs = cfg.rope_scaling
    if rs is None:
        return inv_freq
    low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / rs.factor, inv_freq)
    smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_cos_sin(cfg: ModelConfig, positions_BxT: jax.Array):
    """cos, sin tables [B, T, Dh] in float32, HF rotate-half layout (frequencies repeated twice)."""
    inv_freq = jnp.asarray(rope_inv_freq(cfg))
    angles_BxTxF = positions_BxT.astype(jnp.float32)[..., None] * inv_freq
    angles_BxTxH = jnp.concatenate([angles_BxTxF, angles_BxTxF], axis=-1)
    return jnp.cos(angles_BxTxH), jnp.sin(angles_BxTxH)


def apply_rope(x_BxTxNxH, cos_BxTxH, sin_BxTxH):
    x = x_BxTxNxH.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    out = x * cos_BxTxH[:, :, None, :] + rotated * sin_BxTxH[:, :, None, :]
    return out.astype(x_BxTxNxH.dtype)


class RMSNorm(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],),
                           jnp.dtype(self.cfg.param_dtype))
        x32 = x.astype(jnp.float32)
        mean_square = jnp.mean(x32 * x32, axis=-1, keepdims=True)
        normed = x32 * jax.lax.rsqrt(mean_square + self.cfg.rms_norm_eps)
        dtype = self.cfg.dtype
        return normed.astype(dtype) * scale.astype(dtype)


def _lora_delta(x_BxTxI, a, b, dropout_mask_fn):
    """x @ A @ B for a shared ([in, r]) or row-grouped ([G, in, r]) adapter, in x's dtype."""
    dtype = x_BxTxI.dtype
    x = dropout_mask_fn(x_BxTxI)
    a, b = a.astype(dtype), b.astype(dtype)
    if a.ndim == 2:
        return x @ a @ b
    groups = a.shape[0]
    batch = x.shape[0]
    if batch % groups:
        raise ValueError(f"batch of {batch} rows cannot be split into {groups} LoRA groups")
    x_GxBxTxI = x.reshape(groups, batch // groups, *x.shape[1:])
    h_GxBxTxR = jnp.einsum("gbti,gir->gbtr", x_GxBxTxI, a)
    y_GxBxTxO = jnp.einsum("gbtr,gro->gbto", h_GxBxTxR, b)
    return y_GxBxTxO.reshape(batch, *y_GxBxTxO.shape[2:])


def lora_token_maps(group_tokens_GxN, num_tokens: int):
    """(token lists, their inverse) of `forward(lora_tokens_GxN=...)` over `num_tokens` flat token
    positions. The lists come back with every unused entry (outside [0, num_tokens)) made a distinct
    out-of-range index; the inverse gives each token its place g * N + n in the lists, or a distinct
    place >= G * N where no list has it. With every index distinct, gathers by either map and their
    transposed scatters take `unique_indices` (no atomics) and fill or drop the unused places."""
    groups, n = group_tokens_GxN.shape
    spare_GxN = num_tokens + jnp.arange(groups * n, dtype=jnp.int32).reshape(groups, n)
    group_tokens_GxN = jnp.where((group_tokens_GxN >= 0) & (group_tokens_GxN < num_tokens),
                                 group_tokens_GxN, spare_GxN)
    token_places_N = (groups * n + jnp.arange(num_tokens, dtype=jnp.int32)).at[
        group_tokens_GxN.reshape(-1)].set(jnp.arange(groups * n, dtype=jnp.int32), mode="drop",
                                          unique_indices=True)
    return group_tokens_GxN, token_places_N


def _lora_delta_tokens(x_BxTxI, a_GxIxR, b_GxRxO, token_maps):
    """x @ A @ B where adapter g applies to the tokens it lists: packed rows of several adapters.

    The listed tokens are gathered into one [N, in] block per adapter, multiplied by that adapter
    alone, and the products gathered back to their rows. A token costs its own adapter's rank, and no
    adapter is copied per row or per segment: a packed step of 512 segment slots used to lay out 1.9 GB
    of adapter copies (a third of its GPU time on the 135M model) where its 128 members are 0.5 GB.
    """
    group_tokens_GxN, token_places_N = token_maps
    batch, t, width = x_BxTxI.shape
    dtype = x_BxTxI.dtype
    x_GxNxI = x_BxTxI.reshape(batch * t, width).at[group_tokens_GxN].get(
        mode="fill", fill_value=0, unique_indices=True)
    h_GxNxR = jnp.einsum("gni,gir->gnr", x_GxNxI, a_GxIxR.astype(dtype))
    y_GxNxO = jnp.einsum("gnr,gro->gno", h_GxNxR, b_GxRxO.astype(dtype))
    out = y_GxNxO.shape[-1]
    y_NxO = y_GxNxO.reshape(-1, out).at[token_places_N].get(mode="fill", fill_value=0, unique_indices=True)
    return y_NxO.reshape(batch, t, out)


class Projection(nn.Module):
    """y = x @ W (+ bias) (+ scale * dropout(x) @ A @ B when this target carries a LoRA adapter)."""

    cfg: ModelConfig
    features: int
    use_bias: bool = False
    lora_scale: float = 0.0
    lora_dropout: float = 0.0
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, lora_ab: Optional[dict] = None, token_maps=None):
        cfg = self.cfg
        kernel = self.param("kernel", nn.initializers.normal(0.02), (x.shape[-1], self.features),
                            jnp.dtype(cfg.param_dtype))
        y = x @ kernel.astype(cfg.dtype)
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,),
                              jnp.dtype(cfg.param_dtype))
            y = y + bias.astype(cfg.dtype)
        if lora_ab is not None:
            def dropout(v):
                if self.deterministic or self.lora_dropout == 0.0:
                    return v
                keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - self.lora_dropout, v.shape)
                return jnp.where(keep, v / (1.0 - self.lora_dropout), 0).astype(v.dtype)

            if token_maps is not None:  # packed rows: no dropout (seal_jax.inner packs only without it)
                delta = _lora_delta_tokens(x, lora_ab["a"], lora_ab["b"], token_maps)
            else:
                delta = _lora_delta(x, lora_ab["a"], lora_ab["b"], dropout)
            y = y + (self.lora_scale * delta).astype(cfg.dtype)
        return y


ATTENTION_IMPLS = ("auto", "xla", "cudnn")


def _is_cuda_backend() -> bool:
    if jax.default_backend() != "gpu":
        return False
    # ROCm also reports "gpu"; cuDNN exists only on CUDA.
    client = getattr(jax.devices()[0], "client", None)
    version = str(getattr(client, "platform_version", "")).lower()
    return "rocm" not in version and "hip" not in version


def select_attention_impl(impl: str, *, dtype, head_dim: int, q_len: int, kv_len: int) -> str:
    """The attention implementation that runs: "xla" or "cudnn" (decided at trace time).

    "xla" (einsum softmax) runs on every backend. "cudnn" is the fused kernel of
    `jax.nn.dot_product_attention`, which exists only on CUDA GPUs, so on TPU/CPU/ROCm an explicit
    "cudnn" falls back to "xla": a config tuned on GPUs runs unchanged on a TPU pod. "auto" picks
    cuDNN on a CUDA GPU when the shapes meet its constraints (bf16/fp16 inputs, head_dim a multiple of
    8 and <= 128, even query and key lengths, which rules out single-token decode steps) and "xla"
    everywhere else.
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention_impl {impl!r}; use one of {ATTENTION_IMPLS}")
    if impl == "xla" or not _is_cuda_backend():
        return "xla"
    if impl == "cudnn":
        return "cudnn"
    shapes_ok = (jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0
                 and head_dim <= 128 and q_len % 2 == 0 and kv_len % 2 == 0)
    return "cudnn" if shapes_ok else "xla"


# Query-chunked XLA attention above this many score entries per (row, head): 512 x 1024.
ATTENTION_CHUNK_SCORES = 1 << 19


def _query_chunk(t: int, s: int) -> Optional[int]:
    """Queries per chunk for long attention (None: one piece): the largest of 512 / 256 / 128 that
    divides T (the length buckets are multiples of these), when T x S is large."""
    if t * s <= ATTENTION_CHUNK_SCORES:
        return None
    return next((c for c in (512, 256, 128) if t % c == 0 and c < t), None)


def _xla_attention(q_BxTxKxGxH, k_BxSxKxH, v_BxSxKxH, mask_BxTxS, scale):
    # Scores in the compute dtype, softmax in float32 (as HF's eager bf16 path). A float32
    # *output* of a bf16 matmul would make its backward a float32 GEMM against bf16 operands.
    scores = jnp.einsum("btkgh,bskh->bkgts", q_BxTxKxGxH, k_BxSxKxH).astype(jnp.float32) * scale
    scores = jnp.where(mask_BxTxS[:, None, None], scores, _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_BxSxKxH.dtype)
    return jnp.einsum("bkgts,bskh->btkgh", probs, v_BxSxKxH)


def attention(cfg: ModelConfig, q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_BxTxS, *, causal: bool = False):
    """Grouped-query attention over a boolean mask; rows with no visible key return zeros.

    `causal`: the mask is within the causal one, queries and keys being the same positions (no KV
    cache), which lets cuDNN skip the blocks above the diagonal; the mask decides either way."""
    batch, t, n_heads, head_dim = q_BxTxNxH.shape
    n_kv = k_BxSxKxH.shape[2]
    scale = 1.0 / math.sqrt(head_dim)
    impl = select_attention_impl(cfg.attention_impl, dtype=q_BxTxNxH.dtype, head_dim=head_dim,
                                 q_len=t, kv_len=k_BxSxKxH.shape[1])
    if impl == "cudnn":
        # The mask goes to every head: jax's batching rule for cuDNN attention (the inner loop vmaps
        # it over candidates) reshapes it to [B, N, T, S] and cannot broadcast a [B, 1, T, S] one.
        mask_BxNxTxS = jnp.broadcast_to(mask_BxTxS[:, None], (batch, n_heads, t, mask_BxTxS.shape[-1]))
        out_BxTxNxH = jax.nn.dot_product_attention(
            q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask=mask_BxNxTxS, scale=scale,
            is_causal=causal and t == k_BxSxKxH.shape[1], implementation="cudnn")
    else:
        q_BxTxKxGxH = q_BxTxNxH.reshape(batch, t, n_kv, n_heads // n_kv, head_dim)
        chunk = _query_chunk(t, k_BxSxKxH.shape[1])
        if chunk is None:
            out = _xla_attention(q_BxTxKxGxH, k_BxSxKxH, v_BxSxKxH, mask_BxTxS, scale)
        else:
            # Long sequences: queries in chunks, each rematerialised in the backward pass, so no
            # [T, S] score matrix is ever stored for the gradient (one would be K x layers x heads x
            # T x S floats: 256 GiB for 16 ARC candidates of 2,048 tokens on a 1B model). A softmax
            # row depends on its own query only, so the chunks compute the same function.
            n = t // chunk
            q_NxBxCxKxGxH = jnp.moveaxis(q_BxTxKxGxH.reshape(batch, n, chunk, *q_BxTxKxGxH.shape[2:]), 1, 0)
            mask_NxBxCxS = jnp.moveaxis(mask_BxTxS.reshape(batch, n, chunk, -1), 1, 0)
            one_chunk = jax.checkpoint(
                lambda qm: _xla_attention(qm[0], k_BxSxKxH, v_BxSxKxH, qm[1], scale))
            out = jnp.moveaxis(jax.lax.map(one_chunk, (q_NxBxCxKxGxH, mask_NxBxCxS)), 0, 1)
        out_BxTxNxH = out.reshape(batch, t, n_heads, head_dim)
    # A padding query sees no key; its output is meaningless. Zero it so that it can never turn into
    # NaN/Inf that would leak into real rows through 0 * NaN in later layers.
    has_key_BxT = jnp.any(mask_BxTxS, axis=-1)
    return jnp.where(has_key_BxT[..., None, None], out_BxTxNxH, 0).astype(q_BxTxNxH.dtype)


class Attention(nn.Module):
    cfg: ModelConfig
    lora_scale: float = 0.0
    lora_dropout: float = 0.0
    deterministic: bool = True

    @nn.compact
    def __call__(self, h_BxTxD, lora, xs, ctx):
        cfg = self.cfg
        proj = functools.partial(Projection, cfg, lora_scale=self.lora_scale,
                                 lora_dropout=self.lora_dropout, deterministic=self.deterministic)
        batch, t, _ = h_BxTxD.shape
        token_maps = ctx.get("lora_tokens")
        q = proj(cfg.q_dim, use_bias=cfg.attention_bias, name="q")(h_BxTxD, lora.get("q"), token_maps)
        k = proj(cfg.kv_dim, use_bias=cfg.attention_bias, name="k")(h_BxTxD, lora.get("k"), token_maps)
        v = proj(cfg.kv_dim, use_bias=cfg.attention_bias, name="v")(h_BxTxD, lora.get("v"), token_maps)
        q_BxTxNxH = apply_rope(q.reshape(batch, t, cfg.num_heads, cfg.head_dim), ctx["cos"], ctx["sin"])
        k_BxTxKxH = apply_rope(k.reshape(batch, t, cfg.num_kv_heads, cfg.head_dim), ctx["cos"],
                               ctx["sin"])
        v_BxTxKxH = v.reshape(batch, t, cfg.num_kv_heads, cfg.head_dim)

        new_cache = {}
        if "k" in xs:  # decoding: write the new keys/values at [cursor, cursor + T), attend over all
            start = (0, ctx["cursor"], 0, 0)
            k_BxTxKxH = jax.lax.dynamic_update_slice(xs["k"], k_BxTxKxH.astype(xs["k"].dtype), start)
            v_BxTxKxH = jax.lax.dynamic_update_slice(xs["v"], v_BxTxKxH.astype(xs["v"].dtype), start)
            new_cache = {"k": k_BxTxKxH, "v": v_BxTxKxH}
        out = attention(cfg, q_BxTxNxH, k_BxTxKxH.astype(cfg.dtype), v_BxTxKxH.astype(cfg.dtype),
                        ctx["mask"], causal="k" not in xs)
        out = proj(cfg.hidden_size, name="o")(out.reshape(batch, t, cfg.q_dim), lora.get("o"), token_maps)
        return out, new_cache


class Mlp(nn.Module):
    cfg: ModelConfig
    lora_scale: float = 0.0
    lora_dropout: float = 0.0
    deterministic: bool = True

    @nn.compact
    def __call__(self, h_BxTxD, lora, token_maps=None):
        cfg = self.cfg
        proj = functools.partial(Projection, cfg, lora_scale=self.lora_scale,
                                 lora_dropout=self.lora_dropout, deterministic=self.deterministic)
        gate = proj(cfg.intermediate_size, name="gate")(h_BxTxD, lora.get("gate"), token_maps)
        up = proj(cfg.intermediate_size, name="up")(h_BxTxD, lora.get("up"), token_maps)
        return proj(cfg.hidden_size, name="down")(nn.silu(gate) * up, lora.get("down"), token_maps)


class DecoderLayer(nn.Module):
    """One pre-norm block, called under nn.scan: carry x, scanned `xs`, broadcast `ctx`.

    xs:  {"lora": {target: {"a", "b"}}} plus, when decoding, {"k", "v": [B, S, KV, Dh]}
    ctx: {"cos", "sin": [B, T, Dh], "mask": [B, T, S] bool} plus, when decoding, {"cursor": int32},
         and for packed rows {"lora_tokens": ([G, N] tokens of each adapter, [B * T] their inverse)}
    """

    cfg: ModelConfig
    lora_scale: float = 0.0
    lora_dropout: float = 0.0
    deterministic: bool = True

    @nn.compact
    def __call__(self, x_BxTxD, xs, ctx):
        kw = dict(lora_scale=self.lora_scale, lora_dropout=self.lora_dropout,
                  deterministic=self.deterministic)
        lora = xs.get("lora", {})
        h = RMSNorm(self.cfg, name="attn_norm")(x_BxTxD)
        attn_out, new_cache = Attention(self.cfg, name="attn", **kw)(h, lora, xs, ctx)
        x_BxTxD = x_BxTxD + attn_out
        h = RMSNorm(self.cfg, name="mlp_norm")(x_BxTxD)
        x_BxTxD = x_BxTxD + Mlp(self.cfg, name="mlp", **kw)(h, lora, ctx.get("lora_tokens"))
        return x_BxTxD, new_cache


class Embed(nn.Module):
    cfg: ModelConfig

    def setup(self):
        self.embedding = self.param("embedding", nn.initializers.normal(0.02),
                                    (self.cfg.vocab_size, self.cfg.hidden_size),
                                    jnp.dtype(self.cfg.param_dtype))

    def __call__(self, tokens_BxT):
        return jnp.take(self.embedding, tokens_BxT, axis=0).astype(self.cfg.dtype)


class Transformer(nn.Module):
    cfg: ModelConfig
    lora_scale: float = 0.0
    lora_dropout: float = 0.0
    deterministic: bool = True
    hidden_only: bool = False  # return the final-norm hidden states instead of the logits

    @nn.compact
    def __call__(self, tokens_BxT, xs, ctx):
        cfg = self.cfg
        embed = Embed(cfg, name="embed")
        x_BxTxD = embed(tokens_BxT)
        layer = DecoderLayer
        if cfg.remat:
            layer = nn.remat(layer, prevent_cse=False)
        elif cfg.saved_residuals == "dots":
            # Not differentiated (decoding, scoring), this is the plain layer.
            layer = nn.remat(layer, prevent_cse=False, policy=jax.checkpoint_policies.dots_saveable)
        layers = nn.scan(layer, variable_axes={"params": 0},
                         split_rngs={"params": True, "dropout": True},
                         in_axes=(0, nn.broadcast), length=cfg.num_layers,
                         unroll=max(1, min(cfg.scan_unroll, cfg.num_layers)))
        x_BxTxD, new_cache = layers(cfg, self.lora_scale, self.lora_dropout, self.deterministic,
                                    name="layers")(x_BxTxD, xs, ctx)
        x_BxTxD = RMSNorm(cfg, name="final_norm")(x_BxTxD)
        if self.hidden_only:
            return x_BxTxD, new_cache
        if cfg.tie_word_embeddings:
            head_DxV = embed.embedding.T
        else:
            head_DxV = self.param("lm_head", nn.initializers.normal(0.02),
                                  (cfg.hidden_size, cfg.vocab_size), jnp.dtype(cfg.param_dtype))
        # The head matmul runs in the compute dtype and only its output is upcast (HF's bf16 autocast
        # does the same): with a float32 matmul output the backward pass (dlogits @ head.T, the
        # largest GEMM of a LoRA step) would run in float32 instead of on the bf16 tensor cores.
        logits = jnp.einsum("btd,dv->btv", x_BxTxD, head_DxV.astype(cfg.dtype))
        return logits.astype(jnp.float32), new_cache


# ----------------------------------------------------------------------------------------------------
# Pure API


def _model(cfg, lora_cfg, dropout_rng, hidden_only=False):
    if lora_cfg is None:
        return Transformer(cfg, hidden_only=hidden_only)
    return Transformer(cfg, lora_scale=lora_cfg.scale, lora_dropout=lora_cfg.dropout,
                       deterministic=dropout_rng is None or lora_cfg.dropout == 0.0,
                       hidden_only=hidden_only)


def check_lora(lora, cfg: ModelConfig, lora_cfg: Optional[LoraConfig], *,
               candidate_axis: bool = False, batch: Optional[int] = None) -> None:
    """Raise ValueError naming the first target whose adapter does not fit `cfg` / `lora_cfg`.

    The one shape check of an adapter pytree. Accepted layouts (r = rank, L = layers):
      candidate_axis=True:   A [K, L, in, r]   B [K, L, r, out]   (one K for every target)
      batch=None:            A [L, in, r]      B [L, r, out]
      batch=B (a forward):   also row-grouped  A [L, G, in, r]  B [L, G, r, out] with G dividing B
    """
    if lora_cfg is None:
        raise ValueError("a `lora` pytree was given without `lora_cfg` (needed for its scale)")
    if set(lora) != set(lora_cfg.targets):
        raise ValueError(f"LoRA targets {sorted(lora)} do not match lora_cfg.targets "
                         f"{sorted(lora_cfg.targets)}")
    lead_k = None
    for target in lora_cfg.targets:
        fan_in, fan_out = cfg.projection_shape(target)
        a, b = lora[target]["a"], lora[target]["b"]
        lead_a, lead_b, what = (a.shape[:1], b.shape[:1], "[K] + ") if candidate_axis else ((), (), "")
        grouped = not candidate_axis and batch is not None and a.ndim == 4
        mid = (a.shape[1],) if grouped else ()
        want_a = (*lead_a, cfg.num_layers, *mid, fan_in, lora_cfg.rank)
        want_b = (*lead_b, cfg.num_layers, *mid, lora_cfg.rank, fan_out)
        group_note = " (or [L, G, in, r] row groups)" if batch is not None else ""
        if tuple(a.shape) != want_a:
            raise ValueError(f"LoRA {target}.a has shape {tuple(a.shape)}, expected "
                             f"{what}{[cfg.num_layers, fan_in, lora_cfg.rank]}{group_note}")
        if tuple(b.shape) != want_b:
            raise ValueError(f"LoRA {target}.b has shape {tuple(b.shape)}, expected "
                             f"{what}{[cfg.num_layers, lora_cfg.rank, fan_out]}{group_note}")
        if candidate_axis:
            if a.shape[0] != b.shape[0] or (lead_k is not None and a.shape[0] != lead_k):
                raise ValueError(f"LoRA {target} has inconsistent candidate axes "
                                 f"{(a.shape[0], b.shape[0])} (expected {lead_k})")
            lead_k = a.shape[0]
        if grouped and batch % a.shape[1]:
            raise ValueError(f"LoRA {target!r} has {a.shape[1]} row groups, which do not divide the "
                             f"batch of {batch} rows")


def _check_forward_lora(cfg: ModelConfig, lora, lora_cfg: Optional[LoraConfig], batch: int):
    if lora is not None:
        check_lora(lora, cfg, lora_cfg, batch=batch)


def _check_lora_inputs(cfg, lora, lora_cfg, batch, segment_ids_BxT, lora_tokens_GxN) -> None:
    if lora_tokens_GxN is None:
        _check_forward_lora(cfg, lora, lora_cfg, batch)
    else:
        _check_forward_lora_tokens(cfg, lora, lora_cfg, segment_ids_BxT, lora_tokens_GxN)


def _layer_inputs(lora):
    return {} if lora is None else {"lora": lora}


def _rngs(dropout_rng):
    return {} if dropout_rng is None else {"dropout": dropout_rng}


def positions_from_segments(segment_ids_BxT: jax.Array) -> jax.Array:
    """Position of each token within its (contiguous) segment: 0, 1, ... restarting at each segment."""
    t = segment_ids_BxT.shape[1]
    idx_T = jnp.arange(t, dtype=jnp.int32)
    starts_BxT = jnp.concatenate(
        [jnp.ones_like(segment_ids_BxT[:, :1], dtype=bool),
         segment_ids_BxT[:, 1:] != segment_ids_BxT[:, :-1]], axis=1)
    last_start_BxT = jax.lax.cummax(jnp.where(starts_BxT, idx_T, 0), axis=1)
    return idx_T - last_start_BxT


def init_params(cfg: ModelConfig, rng: jax.Array) -> Params:
    """Random base weights: normal(0.02) kernels/embeddings, unit norms, zero biases; cfg.param_dtype."""
    tokens = jnp.zeros((1, 1), jnp.int32)

    def init(key):
        ctx = _forward_ctx(cfg, tokens, None, None)
        return Transformer(cfg).init(key, tokens, {}, ctx)["params"]

    return jax.jit(init)(rng)


def _forward_ctx(cfg, tokens_BxT, positions_BxT, segment_ids_BxT, lora_tokens_GxN=None):
    batch, t = tokens_BxT.shape
    if segment_ids_BxT is None:
        segment_ids_BxT = jnp.ones((batch, t), jnp.int32)
    if positions_BxT is None:
        positions_BxT = positions_from_segments(segment_ids_BxT)
    idx_T = jnp.arange(t)
    causal_TxT = idx_T[:, None] >= idx_T[None, :]
    mask_BxTxT = ((segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :])
                  & (segment_ids_BxT[:, None, :] != 0) & causal_TxT)
    cos, sin = rope_cos_sin(cfg, positions_BxT)
    ctx = {"cos": cos, "sin": sin, "mask": mask_BxTxT}
    if lora_tokens_GxN is not None:
        ctx["lora_tokens"] = lora_token_maps(lora_tokens_GxN, batch * t)
    return ctx


def _check_forward_lora_tokens(cfg: ModelConfig, lora, lora_cfg: Optional[LoraConfig], segment_ids_BxT,
                               lora_tokens_GxN) -> None:
    if lora is None or segment_ids_BxT is None:
        raise ValueError("lora_tokens_GxN (packed rows) needs `lora` ([L, G, ...] adapters) and segment_ids")
    if lora_tokens_GxN.ndim != 2:
        raise ValueError(f"lora_tokens_GxN must be [G, N] token lists, got shape {tuple(lora_tokens_GxN.shape)}")
    # [L, G, in, r] here; check_lora knows the candidate-leading layout, so check its transpose.
    check_lora(jax.tree.map(lambda a: jax.ShapeDtypeStruct((a.shape[1], a.shape[0], *a.shape[2:]), a.dtype),
                            lora), cfg, lora_cfg, candidate_axis=True)
    groups = {a.shape[1] for a in jax.tree.leaves(lora)}
    if groups != {lora_tokens_GxN.shape[0]}:
        raise ValueError(f"lora_tokens_GxN lists tokens of {lora_tokens_GxN.shape[0]} adapters, the "
                         f"adapters have {sorted(groups)}")


def forward(params: Params, tokens_BxT, *, cfg: ModelConfig, lora: Optional[Lora] = None,
            lora_cfg: Optional[LoraConfig] = None, positions_BxT=None, segment_ids_BxT=None,
            dropout_rng=None, lora_tokens_GxN=None) -> jax.Array:
    """Logits [B, T, V] (float32) of a full sequence (training / scoring).

    segment_ids (0 = padding): a query attends to earlier-or-equal keys of its own non-zero segment.
    positions default to the index within each segment (so packed segments restart at 0).
    lora_tokens_GxN (packed rows of several adapters): `lora` is [L, G, in, r] / [L, G, r, out] and
    adapter g applies to the tokens whose flat positions (b * T + t) `lora_tokens_GxN[g]` lists (no
    dropout); an entry outside [0, B * T) is unused. A token is in at most one list; a token in none
    gets no adapter.
    """
    _check_lora_inputs(cfg, lora, lora_cfg, tokens_BxT.shape[0], segment_ids_BxT, lora_tokens_GxN)
    ctx = _forward_ctx(cfg, tokens_BxT, positions_BxT, segment_ids_BxT, lora_tokens_GxN)
    logits, _ = _model(cfg, lora_cfg, dropout_rng).apply(
        {"params": params}, tokens_BxT, _layer_inputs(lora), ctx, rngs=_rngs(dropout_rng))
    return logits


def forward_hidden(params: Params, tokens_BxT, *, cfg: ModelConfig, lora: Optional[Lora] = None,
                   lora_cfg: Optional[LoraConfig] = None, positions_BxT=None, segment_ids_BxT=None,
                   dropout_rng=None, lora_tokens_GxN=None) -> jax.Array:
    """Final-norm hidden states [B, T, D] (compute dtype), i.e. `forward` without the LM head.

    `forward(...) == (forward_hidden(...) @ lm_head(params, cfg)).astype(float32)`; losses use this
    to apply the head chunk by chunk instead of materialising [B, T, V] logits.
    """
    _check_lora_inputs(cfg, lora, lora_cfg, tokens_BxT.shape[0], segment_ids_BxT, lora_tokens_GxN)
    ctx = _forward_ctx(cfg, tokens_BxT, positions_BxT, segment_ids_BxT, lora_tokens_GxN)
    hidden, _ = _model(cfg, lora_cfg, dropout_rng, hidden_only=True).apply(
        {"params": params}, tokens_BxT, _layer_inputs(lora), ctx, rngs=_rngs(dropout_rng))
    return hidden


def lm_head(params: Params, cfg: ModelConfig) -> jax.Array:
    """The output projection [D, V] in the compute dtype (the tied embedding transposed, or lm_head)."""
    head_DxV = params["embed"]["embedding"].T if cfg.tie_word_embeddings else params["lm_head"]
    return head_DxV.astype(cfg.dtype)


def init_cache(cfg: ModelConfig, batch: int, max_len: int) -> KVCache:
    shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    return KVCache(k=jnp.zeros(shape, cfg.dtype), v=jnp.zeros(shape, cfg.dtype),
                   valid_BxS=jnp.zeros((batch, max_len), bool), cursor=jnp.zeros((), jnp.int32))


def forward_with_cache(params: Params, tokens_BxT, cache: KVCache, *, cfg: ModelConfig,
                       lora: Optional[Lora] = None, lora_cfg: Optional[LoraConfig] = None,
                       positions_BxT, token_mask_BxT) -> tuple[jax.Array, KVCache]:
    """Run T new tokens against the cache: write them at slots [cursor, cursor+T), return logits.

    A new token attends to valid slots at or before its own slot. The caller sizes the cache so that
    cursor + T <= S (dynamic_update_slice would otherwise clamp the write position).
    """
    batch, t = tokens_BxT.shape
    max_len = cache.valid_BxS.shape[1]
    if t > max_len:
        raise ValueError(f"{t} new tokens do not fit in a KV cache of {max_len} slots")
    _check_forward_lora(cfg, lora, lora_cfg, batch)
    cursor = cache.cursor.astype(jnp.int32)
    valid_BxS = jax.lax.dynamic_update_slice(cache.valid_BxS, token_mask_BxT.astype(bool),
                                             (jnp.int32(0), cursor))
    slot_S = jnp.arange(max_len, dtype=jnp.int32)
    query_slot_T = cursor + jnp.arange(t, dtype=jnp.int32)
    mask_BxTxS = valid_BxS[:, None, :] & (slot_S[None, None, :] <= query_slot_T[None, :, None])
    cos, sin = rope_cos_sin(cfg, positions_BxT)
    ctx = {"cos": cos, "sin": sin, "mask": mask_BxTxS, "cursor": cursor}
    xs = {**_layer_inputs(lora), "k": cache.k, "v": cache.v}
    logits, new_kv = _model(cfg, lora_cfg, None).apply({"params": params}, tokens_BxT, xs, ctx)
    return logits, KVCache(k=new_kv["k"], v=new_kv["v"], valid_BxS=valid_BxS, cursor=cursor + t)


def param_logical_axes(cfg: ModelConfig) -> dict:
    """Logical axis names per parameter (same tree as init_params); None = replicated dimension."""
    def proj(in_axis, out_axis, bias):
        axes = {"kernel": ("layers", in_axis, out_axis)}
        if bias:
            axes["bias"] = ("layers", None)
        return axes

    bias = cfg.attention_bias
    axes = {
        "embed": {"embedding": ("vocab", "embed")},
        "layers": {
            "attn_norm": {"scale": ("layers", None)},
            "attn": {"q": proj("embed", "heads", bias), "k": proj("embed", "kv_heads", bias),
                     "v": proj("embed", "kv_heads", bias), "o": proj("heads", "embed", False)},
            "mlp_norm": {"scale": ("layers", None)},
            "mlp": {"gate": proj("embed", "mlp", False), "up": proj("embed", "mlp", False),
                    "down": proj("mlp", "embed", False)},
        },
        "final_norm": {"scale": (None,)},
    }
    if not cfg.tie_word_embeddings:
        axes["lm_head"] = ("embed", "vocab")
    return axes
