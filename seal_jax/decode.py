"""Device side of the sampler: a slot-per-row KV cache, prefill into freed rows, and a decode loop
that runs until enough rows finish to be worth refilling. `sampling.generate` drives it.

Decode at batch 64 is bound by reading the weights once per step (7B bf16: 15 GB, ~3 ms on an
H200), so the step is built to read each byte once:
* Layer weights are split out of the stacked `[L, ...]` arrays once per call (`split_layers`) and
  the layer loop is unrolled over the per-layer arrays. Slicing a layer out of a stacked array inside
  the step (what the model's layer scan does) makes XLA copy the slice every step, which moves the
  weights three times instead of once. The price is a second copy of the layer weights (sharded
  like the first) while `generate` runs. That copy holds q/k/v and gate/up as one kernel each
  (XLA would otherwise merge those matmuls itself and concatenate their weights at every step).
* The cache is one `[B, KV, S, Dh]` buffer per layer for k and for v: the layout a matmul batched over
  (row, kv head) reads without a transpose. Each step scatters one slot per row in place (the buffers
  are while-loop carries, and are donated from one call to the next).
* Slot s of row b holds position s of that row's sequence (its prompt starts at slot 0), so a row can
  be refilled with a new request while the others keep decoding: the mask is `slot <= position`.
  S (the cache capacity) is chosen by the caller from the live rows' lengths and changed between
  calls with `resize`, so attention reads what the rows need, not the longest possible request.
* Nucleus sampling does not sort the vocabulary: `nucleus_mask` finds the probability threshold by a
  radix search (8 passes of 16 candidate thresholds over the float bits), then keeps exactly the
  tokens a stable descending sort would keep. Sampling is `jax.random.categorical` over the kept
  logits, so the same key picks the same token as the sort-based definition.
* No host round trip per step: `decode_segment` loops on the device until all rows are done, a row
  needs more cache than S, or `exit_after` rows are done (so the host can refill them).

Every path here is plain JAX (no Pallas, no cuDNN call), so it runs unchanged on TPU and CPU; the
one GPU-only model option (`attention_impl="cudnn"`, used by the prefill through the model) falls
back to XLA attention off CUDA inside the model (`transformer.select_attention_impl`).

Prefill uses the model's own `forward_with_cache` (layer scan; prompts are compute-bound, so the
per-layer slice copies do not matter there) on left-padded prompts, then moves each row's keys and
values to slots [0, prompt length) of its cache row.

Randomness: the token a request emits at step t is drawn with `fold_in(fold_in(key(seed), request),
t)`, whichever row it occupies and whoever shares its batch.
"""
from __future__ import annotations

import itertools
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp

from seal_jax import compile_cache
from seal_jax.model import transformer
from seal_jax.model.config import LoraConfig, ModelConfig

State = dict  # see `init_state`
_MASK_VALUE = -1e30  # as the model: a finite "minus infinity" keeps masked softmax rows NaN-free
RADIX_BITS = 4  # bits of the probability threshold decided per pass of `nucleus_mask`


# ---------------------------------------------------------------------------------------------
# Token choice


def nucleus_mask(logits_BxV: jax.Array, top_p_B: jax.Array) -> jax.Array:
    """Tokens kept by nucleus (top-p) filtering, without a sort.

    The definition (vLLM's, and a stable descending sort's): order tokens by probability, ties by
    lower id first; keep a token while the probability mass strictly before it is < top_p. So the
    most likely token is always kept and top_p >= 1 keeps everything.

    Probabilities are >= 0, so their float32 bit patterns order like the values. A radix search over
    those bits finds t*, the largest bit pattern whose "mass at or above" still reaches top_p: that is
    the probability of the last kept token. Tokens above it are kept; tokens tied at it are kept in id
    order while the mass before them stays below top_p.
    """
    probs_BxV = jax.nn.softmax(logits_BxV.astype(jnp.float32), axis=-1)
    bits_BxV = jax.lax.bitcast_convert_type(probs_BxV, jnp.uint32)
    top_p_Bx1 = top_p_B.astype(jnp.float32)[:, None]
    digits_J = jnp.arange(2**RADIX_BITS, dtype=jnp.uint32)
    threshold_B = jnp.zeros(probs_BxV.shape[0], jnp.uint32)
    for shift in range(32 - RADIX_BITS, -1, -RADIX_BITS):
        candidates_BxJ = threshold_B[:, None] + (digits_J << shift)[None]
        above_BxVxJ = bits_BxV[:, :, None] >= candidates_BxJ[:, None, :]
        mass_BxJ = jnp.sum(jnp.where(above_BxVxJ, probs_BxV[:, :, None], 0.0), axis=1)
        # Mass falls as the candidate rises; digit 0 keeps the invariant mass >= top_p.
        digit_B = jnp.maximum(jnp.sum(mass_BxJ >= top_p_Bx1, axis=1) - 1, 0).astype(jnp.uint32)
        threshold_B = threshold_B + (digit_B << shift)
    threshold_Bx1 = threshold_B[:, None]
    above_BxV = bits_BxV > threshold_Bx1
    tie_BxV = bits_BxV == threshold_Bx1
    mass_above_Bx1 = jnp.sum(jnp.where(above_BxV, probs_BxV, 0.0), axis=1, keepdims=True)
    tie_prob_Bx1 = jax.lax.bitcast_convert_type(threshold_Bx1, jnp.float32)
    tie_rank_BxV = jnp.cumsum(tie_BxV, axis=1, dtype=jnp.int32) - tie_BxV
    keep_tie_BxV = tie_BxV & (mass_above_Bx1 + tie_rank_BxV * tie_prob_Bx1 < top_p_Bx1)
    return above_BxV | keep_tie_BxV | (top_p_Bx1 >= 1.0)


def pick_tokens(logits_BxV, seed_B, request_B, step_B, temperature_B, top_p_B, *,
                stochastic: bool, nucleus: bool):
    """Next token per row: argmax where temperature == 0, else a (nucleus) sample at that row's key."""
    greedy_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    if not stochastic:
        return greedy_B
    sampled_rows_B = temperature_B > 0
    scaled_BxV = logits_BxV / jnp.where(sampled_rows_B, temperature_B, 1.0)[:, None]
    if nucleus:
        scaled_BxV = jnp.where(nucleus_mask(scaled_BxV, top_p_B), scaled_BxV, -jnp.inf)
    keys_B = jax.vmap(lambda s, r, t: jax.random.fold_in(jax.random.fold_in(jax.random.key(s), r), t))(
        seed_B, request_B, step_B)
    sampled_B = jax.vmap(jax.random.categorical)(keys_B, scaled_BxV).astype(jnp.int32)
    return jnp.where(sampled_rows_B, sampled_B, greedy_B)


# ---------------------------------------------------------------------------------------------
# State


def init_state(cfg: ModelConfig, batch: int, capacity: int, out_len: int, stop_width: int) -> State:
    """All rows free (done). k/v: per layer [B, KV, S, Dh]; per row: the token to feed next (`tok`),
    tokens in the cache (`len`, = the next slot), tokens emitted (`count`), emitted ids (`out`), and
    the row's request: its sampling parameters, seed and request index."""
    shape = (batch, cfg.num_kv_heads, capacity, cfg.head_dim)
    zeros = lambda dtype: jnp.zeros((batch,), dtype)
    return {
        "k": tuple(jnp.zeros(shape, cfg.dtype) for _ in range(cfg.num_layers)),
        "v": tuple(jnp.zeros(shape, cfg.dtype) for _ in range(cfg.num_layers)),
        "tok": zeros(jnp.int32), "len": zeros(jnp.int32), "count": zeros(jnp.int32),
        "done": jnp.ones((batch,), bool), "stopped": zeros(bool),
        "out": jnp.zeros((batch, out_len), jnp.int32),
        "max_new": zeros(jnp.int32), "stop_ids": jnp.full((batch, stop_width), -1, jnp.int32),
        "temperature": zeros(jnp.float32), "top_p": jnp.ones((batch,), jnp.float32),
        "seed": zeros(jnp.uint32), "request": zeros(jnp.uint32),
    }


def state_logical_axes(state: State) -> State:
    """Logical axis names of each state leaf (rows on "batch", cache heads on "kv_heads"), for
    sharding the state like the model (`seal_jax.sharding`)."""
    def axes(x):
        if x.ndim == 4:
            return ("batch", "kv_heads", None, "head_dim")
        return ("batch",) + (None,) * (x.ndim - 1)
    return jax.tree.map(axes, state)


@compile_cache.cached_jit(name="decode_resize", static_argnames=("capacity",))
def resize(state: State, *, capacity: int) -> State:
    """Grow (zero-pad) or shrink the cache to `capacity` slots; the caller keeps live rows inside."""
    def fit(x):
        s = x.shape[2]
        if capacity <= s:
            return x[:, :, :capacity]
        return jnp.pad(x, ((0, 0), (0, 0), (0, capacity - s), (0, 0)))
    return {**state, "k": tuple(map(fit, state["k"])), "v": tuple(map(fit, state["v"]))}


# Projections that read the same input, fused into one matmul per group by `split_layers`.
FUSED_PROJECTIONS = {"attn": ("qkv", ("q", "k", "v")), "mlp": ("gate_up", ("gate", "up"))}


def _fuse(projections: list) -> dict:
    """One projection whose output is the given ones' outputs side by side (kernels and biases
    concatenated on the output axis; a missing bias is zeros)."""
    fused = {"kernel": jnp.concatenate([w["kernel"] for w in projections], axis=-1)}
    if any("bias" in w for w in projections):
        fused["bias"] = jnp.concatenate(
            [w["bias"] if "bias" in w else jnp.zeros(w["kernel"].shape[-1:], w["kernel"].dtype)
             for w in projections], axis=-1)
    return fused


@compile_cache.cached_jit(name="decode_split_layers")
def split_layers(layers: Any) -> tuple:
    """Stacked `[L, ...]` layer params -> a tuple of L per-layer trees (one copy, once per call), with
    q/k/v and gate/up each fused into one kernel ("qkv", "gate_up"; `FUSED_PROJECTIONS`).

    Fused here, once, because XLA otherwise merges those matmuls itself inside the decode loop and
    concatenates their weights again at every step (on an H200, 7B: 0.52 of 6.0 ms a step)."""
    num_layers = jax.tree.leaves(layers)[0].shape[0]
    split = []
    for i in range(num_layers):
        layer = jax.tree.map(lambda x, i=i: x[i], layers)
        for group, (fused, names) in FUSED_PROJECTIONS.items():
            rest = {name: w for name, w in layer[group].items() if name not in names}
            layer[group] = {**rest, fused: _fuse([layer[group][name] for name in names])}
        split.append(layer)
    return tuple(split)


def _gather_adapters(lora_LxK, adapters_G):
    if lora_LxK is None:
        return None
    return jax.tree.map(lambda x: jnp.take(x, adapters_G, axis=1), lora_LxK)


def _is_stop(tok_B, stop_BxS):
    return jnp.any(tok_B[:, None] == stop_BxS, axis=-1)


# ---------------------------------------------------------------------------------------------
# Prefill


@compile_cache.cached_jit(name="decode_prefill", static_argnames=("cfg", "lora_cfg", "prefill_chunk"))
def prefill(params, lora_LxK, adapters_R, tokens_RxP, mask_RxP, seed_R, request_R, temperature_R,
            top_p_R, *, cfg: ModelConfig, lora_cfg: Optional[LoraConfig], prefill_chunk: int):
    """Prefill R left-padded prompts (P = Q + 1 columns, Q a multiple of prefill_chunk or smaller
    than it; row r uses candidate adapters_R[r]) and draw each one's first token.

    Returns (k, v as [L, R, KV, P, Dh] with position s of row r at slot s, first token [R]). Independent
    of the decode state's shape, so one program serves every cache capacity; the token choice always
    includes the sampling path (greedy rows still take the argmax), so greedy and sampled calls share it.
    """
    rows, p_cols = tokens_RxP.shape
    lora = _gather_adapters(lora_LxK, adapters_R)  # R groups of one row
    length_R = mask_RxP.sum(axis=-1).astype(jnp.int32)
    positions_RxP = jnp.maximum(jnp.cumsum(mask_RxP, axis=-1) - 1, 0).astype(jnp.int32)
    prefix_len = p_cols - 1
    chunk = min(prefill_chunk, prefix_len)
    cache = transformer.init_cache(cfg, rows, p_cols)

    def prefill_chunk_step(cache, chunk_inputs):
        tokens_RxC, positions_RxC, mask_RxC = chunk_inputs
        _, cache = transformer.forward_with_cache(
            params, tokens_RxC, cache, cfg=cfg, lora=lora, lora_cfg=lora_cfg,
            positions_BxT=positions_RxC, token_mask_BxT=mask_RxC)
        return cache, None

    def chunks(x_RxP):  # [R, Q + 1] -> [Q / chunk, R, chunk]
        return x_RxP[:, :prefix_len].reshape(rows, prefix_len // chunk, chunk).swapaxes(0, 1)

    # The prefix's logits are discarded, so XLA drops their LM-head matmul.
    cache, _ = jax.lax.scan(prefill_chunk_step, cache,
                            (chunks(tokens_RxP), chunks(positions_RxP), chunks(mask_RxP)))
    logits_Rx1xV, cache = transformer.forward_with_cache(
        params, tokens_RxP[:, -1:], cache, cfg=cfg, lora=lora, lora_cfg=lora_cfg,
        positions_BxT=positions_RxP[:, -1:], token_mask_BxT=mask_RxP[:, -1:])
    first_R = pick_tokens(logits_Rx1xV[:, 0], seed_R, request_R, jnp.zeros_like(request_R),
                          temperature_R, top_p_R, stochastic=True, nucleus=True)
    # Left padding -> slot = position: row r's token at position s sits in column s + pad_r.
    source_RxP = jnp.minimum(jnp.arange(p_cols)[None] + (p_cols - length_R)[:, None], p_cols - 1)

    def to_slots(kv_LxRxPxKxH):
        aligned = jnp.take_along_axis(kv_LxRxPxKxH, source_RxP[None, :, :, None, None], axis=2)
        return jnp.swapaxes(aligned, 2, 3)

    return to_slots(cache.k), to_slots(cache.v), first_R


@compile_cache.cached_jit(name="decode_install", donate_argnums=(0,))
def install(state: State, rows_R, k_LxRxKxPxH, v_LxRxKxPxH, first_R, length_R, max_new_R, stop_RxS,
            temperature_R, top_p_R, seed_R, request_R) -> State:
    """Start R prefilled requests in rows `rows_R` (index B = a padding entry, dropped): their keys
    and values go to slots [0, P), their first token is emitted, their bookkeeping reset."""
    p_cols = k_LxRxKxPxH.shape[3]

    def put_kv(kv, buffers):
        return tuple(buf.at[rows_R, :, :p_cols].set(kv[i].astype(buf.dtype), mode="drop")
                     for i, buf in enumerate(buffers))

    stopped_R = _is_stop(first_R, stop_RxS)
    put = lambda x, value: x.at[rows_R].set(value, mode="drop")
    return {
        **state,
        "k": put_kv(k_LxRxKxPxH, state["k"]), "v": put_kv(v_LxRxKxPxH, state["v"]),
        "tok": put(state["tok"], first_R), "len": put(state["len"], length_R),
        "count": put(state["count"], jnp.ones_like(length_R)),
        "done": put(state["done"], stopped_R | (max_new_R <= 1)),
        "stopped": put(state["stopped"], stopped_R),
        "out": state["out"].at[rows_R, 0].set(first_R, mode="drop"),
        "max_new": put(state["max_new"], max_new_R), "stop_ids": put(state["stop_ids"], stop_RxS),
        "temperature": put(state["temperature"], temperature_R), "top_p": put(state["top_p"], top_p_R),
        "seed": put(state["seed"], seed_R), "request": put(state["request"], request_R),
    }


# ---------------------------------------------------------------------------------------------
# Decode


def _rms_norm(x, scale, cfg: ModelConfig):
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + cfg.rms_norm_eps)
    return normed.astype(cfg.dtype) * scale.astype(cfg.dtype)


def _project(x, w, lora_ab, cfg: ModelConfig, lora_cfg: Optional[LoraConfig]):
    """As the model's Projection: x @ W (+ bias) (+ scale * x @ A @ B per row group)."""
    y = x @ w["kernel"].astype(cfg.dtype)
    if "bias" in w:
        y = y + w["bias"].astype(cfg.dtype)
    if lora_ab is not None:
        y = y + _lora_delta(x, lora_ab, cfg, lora_cfg)
    return y


def _lora_delta(x, lora_ab, cfg: ModelConfig, lora_cfg: LoraConfig):
    """scale * x @ A @ B, row group g (of G equal groups of rows) with adapter g."""
    a, b = lora_ab["a"].astype(x.dtype), lora_ab["b"].astype(x.dtype)
    groups, batch = a.shape[0], x.shape[0]
    x_GxRxTxI = x.reshape(groups, batch // groups, *x.shape[1:])
    h = jnp.einsum("gbti,gir->gbtr", x_GxRxTxI, a)
    delta = jnp.einsum("gbtr,gro->gbto", h, b).reshape(batch, *x.shape[1:-1], b.shape[-1])
    return (lora_cfg.scale * delta).astype(cfg.dtype)


def _fused_project(x, layer, group: str, lora, cfg: ModelConfig, lora_cfg: Optional[LoraConfig]):
    """The outputs of a `FUSED_PROJECTIONS` group's projections from its fused kernel
    (`split_layers`), each with its own adapter delta where it has one."""
    fused, names = FUSED_PROJECTIONS[group]
    y = _project(x, layer[group][fused], None, cfg, None)
    widths = [cfg.projection_shape(name)[1] for name in names]
    outs = jnp.split(y, list(itertools.accumulate(widths))[:-1], axis=-1)
    return tuple(out if name not in lora else out + _lora_delta(x, lora[name], cfg, lora_cfg)
                 for name, out in zip(names, outs))


def _decode_step(weights, lora_layers, state: State, *, cfg: ModelConfig,
                 lora_cfg: Optional[LoraConfig]):
    """Feed every row's `tok` at slot `len`; return (float32 logits [B, V], new k, new v)."""
    batch = state["tok"].shape[0]
    capacity = state["k"][0].shape[2]
    position_B = state["len"]
    slot_B = jnp.minimum(position_B, capacity - 1)  # finished rows write (unread) garbage in range
    row_B = jnp.arange(batch)
    visible_BxS = jnp.arange(capacity)[None] <= position_B[:, None]
    cos, sin = transformer.rope_cos_sin(cfg, position_B[:, None])
    groups = cfg.num_heads // cfg.num_kv_heads
    scale = 1.0 / math.sqrt(cfg.head_dim)

    x = jnp.take(weights["embedding"], state["tok"][:, None], axis=0).astype(cfg.dtype)  # [B, 1, D]
    new_k, new_v = [], []
    for i, w in enumerate(weights["layers"]):
        lora = {} if lora_layers is None else lora_layers[i]
        proj = lambda h, name, group: _project(h, w[group][name], lora.get(name), cfg, lora_cfg)
        h = _rms_norm(x, w["attn_norm"]["scale"], cfg)
        q, k, v = _fused_project(h, w, "attn", lora, cfg, lora_cfg)
        q = transformer.apply_rope(q.reshape(batch, 1, cfg.num_heads, cfg.head_dim), cos, sin)
        k = transformer.apply_rope(k.reshape(batch, 1, cfg.num_kv_heads, cfg.head_dim), cos, sin)
        v = v.reshape(batch, cfg.num_kv_heads, cfg.head_dim)
        k_cache = state["k"][i].at[row_B, :, slot_B].set(k[:, 0].astype(state["k"][i].dtype))
        v_cache = state["v"][i].at[row_B, :, slot_B].set(v.astype(state["v"][i].dtype))
        new_k.append(k_cache)
        new_v.append(v_cache)
        # Scores in the compute dtype, softmax in float32 (as the model's attention).
        q_BxKxGxH = q.reshape(batch, cfg.num_kv_heads, groups, cfg.head_dim)
        scores = jnp.einsum("bkgh,bksh->bkgs", q_BxKxGxH, k_cache.astype(cfg.dtype))
        scores = jnp.where(visible_BxS[:, None, None], scores.astype(jnp.float32) * scale, _MASK_VALUE)
        probs = jax.nn.softmax(scores, axis=-1).astype(cfg.dtype)
        attn = jnp.einsum("bkgs,bksh->bkgh", probs, v_cache.astype(cfg.dtype))
        x = x + proj(attn.reshape(batch, 1, cfg.q_dim).astype(cfg.dtype), "o", "attn")
        h = _rms_norm(x, w["mlp_norm"]["scale"], cfg)
        gate, up = _fused_project(h, w, "mlp", lora, cfg, lora_cfg)
        mlp = jax.nn.silu(gate) * up
        x = x + proj(mlp, "down", "mlp")
    x = _rms_norm(x, weights["final_norm"], cfg)
    logits = jnp.einsum("btd,dv->btv", x, weights["head"].astype(cfg.dtype))
    return logits[:, 0].astype(jnp.float32), tuple(new_k), tuple(new_v)


def decode_weights(params, layers: tuple, cfg: ModelConfig) -> dict:
    """What `decode_segment` reads: the per-layer trees from `split_layers` and the rest."""
    head = params["embed"]["embedding"].T if cfg.tie_word_embeddings else params["lm_head"]
    return {"embedding": params["embed"]["embedding"], "layers": layers,
            "final_norm": params["final_norm"]["scale"], "head": head}


@compile_cache.cached_jit(name="decode_segment", static_argnames=("cfg", "lora_cfg", "stochastic", "nucleus"),
                          donate_argnums=(3,))
def decode_segment(weights, lora_LxK, adapters_G, state: State, exit_after, pad_id, *,
                   cfg: ModelConfig, lora_cfg: Optional[LoraConfig], stochastic: bool,
                   nucleus: bool) -> State:
    """Decode until every row is done, `exit_after` rows are done, or a live row needs slot S.

    Row group g (rows [g*B/G, (g+1)*B/G)) uses candidate adapters_G[g].
    """
    capacity = state["k"][0].shape[2]
    out_len = state["out"].shape[1]
    lora = _gather_adapters(lora_LxK, adapters_G)
    # One copy of each layer's adapters per call, outside the loop (cheap: adapters are small).
    lora_layers = None if lora is None else tuple(
        jax.tree.map(lambda x, i=i: x[i], lora) for i in range(cfg.num_layers))

    def cond(state):
        live_B = ~state["done"]
        room = jnp.all(~live_B | (state["len"] < capacity))
        return jnp.any(live_B) & room & (jnp.sum(state["done"]) < exit_after)

    def body(state):
        live_B = ~state["done"]
        logits_BxV, k, v = _decode_step(weights, lora_layers, state, cfg=cfg, lora_cfg=lora_cfg)
        new_B = pick_tokens(logits_BxV, state["seed"], state["request"], state["count"],
                            state["temperature"], state["top_p"], stochastic=stochastic,
                            nucleus=nucleus)
        new_B = jnp.where(live_B, new_B, pad_id)
        batch = new_B.shape[0]
        column_B = jnp.where(live_B, state["count"], out_len)  # finished rows: dropped write
        out = state["out"].at[jnp.arange(batch), column_B].set(new_B, mode="drop")
        count_B = state["count"] + live_B
        hit_B = live_B & _is_stop(new_B, state["stop_ids"])
        return {
            **state, "k": k, "v": v, "out": out, "count": count_B,
            "tok": jnp.where(live_B, new_B, state["tok"]), "len": state["len"] + live_B,
            "stopped": state["stopped"] | hit_B,
            "done": state["done"] | hit_B | (count_B >= state["max_new"]),
        }

    return jax.lax.while_loop(cond, body, state)
