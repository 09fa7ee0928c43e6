"""Transformer: masks, packing, KV-cache decoding, LoRA (shared / grouped / vmapped), remat, dtypes."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seal_jax.model import transformer as T
from seal_jax.model.config import LoraConfig
from seal_jax.model.presets import get_preset

from tolerances import assert_close_scaled, scaled_max_diff

# Jitted once per module: eager op-by-op dispatch would dominate the runtime of these tiny models.
fwd = jax.jit(T.forward, static_argnames=("cfg", "lora_cfg"))
decode_step = jax.jit(T.forward_with_cache, static_argnames=("cfg", "lora_cfg"))


@functools.lru_cache(maxsize=None)
def preset_params(name):
    """Random params of a preset, initialised once per session (compiling init is the slow part)."""
    cfg = get_preset(name)
    params = T.init_params(cfg, jax.random.key(0))
    if cfg.attention_bias:  # zero-init biases would leave the bias path untested
        params = jax.tree_util.tree_map_with_path(
            lambda path, x: x + 0.05 if path[-1].key == "bias" else x, params)
    return cfg, params


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-qwen2"])
def model(request):
    return preset_params(request.param)


@pytest.fixture(scope="module")
def qwen():
    """LoRA behaviour does not depend on the architecture: test it once, on the variant with biases."""
    return preset_params("tiny-qwen2")


def random_lora(cfg, lora_cfg, key, groups=None):
    lora = {}
    for i, target in enumerate(lora_cfg.targets):
        d_in, d_out = cfg.projection_shape(target)
        lead = (cfg.num_layers,) if groups is None else (cfg.num_layers, groups)
        ka, kb = jax.random.split(jax.random.fold_in(key, i))
        lora[target] = {"a": 0.1 * jax.random.normal(ka, (*lead, d_in, lora_cfg.rank)),
                        "b": 0.1 * jax.random.normal(kb, (*lead, lora_cfg.rank, d_out))}
    return lora


def test_param_tree_and_logical_axes(model):
    cfg, params = model
    shapes = jax.tree.map(lambda x: x.shape, params)
    assert shapes["layers"]["attn"]["q"]["kernel"] == (cfg.num_layers, cfg.hidden_size, cfg.q_dim)
    assert shapes["layers"]["mlp"]["down"]["kernel"] == (
        cfg.num_layers, cfg.intermediate_size, cfg.hidden_size)
    assert ("lm_head" in params) == (not cfg.tie_word_embeddings)
    n = sum(x.size for x in jax.tree.leaves(params))
    assert n == cfg.num_params()
    axes = T.param_logical_axes(cfg)
    is_axes = lambda x: isinstance(x, tuple)  # noqa: E731
    assert jax.tree.structure(axes, is_leaf=is_axes) == jax.tree.structure(params)
    for leaf, names in zip(jax.tree.leaves(params), jax.tree.leaves(axes, is_leaf=is_axes)):
        assert len(names) == leaf.ndim


def test_forward_shapes_dtype_and_causality(model):
    cfg, params = model
    tokens = jax.random.randint(jax.random.key(1), (2, 10), 0, cfg.vocab_size)
    logits = fwd(params, tokens, cfg=cfg)
    assert logits.shape == (2, 10, cfg.vocab_size) and logits.dtype == jnp.float32
    # Changing a later token must not change earlier logits; it must change its own.
    changed = tokens.at[:, 6].set((tokens[:, 6] + 1) % cfg.vocab_size)
    logits2 = fwd(params, changed, cfg=cfg)
    assert_close_scaled(logits2[:, :6], logits[:, :6], eps_multiple=8, what="earlier logits")
    assert scaled_max_diff(logits2[:, 6], logits[:, 6]) > 1e-3


def test_packing_and_padding_match_separate_sequences(model):
    cfg, params = model
    key = jax.random.key(2)
    a = jax.random.randint(key, (5,), 3, cfg.vocab_size)
    b = jax.random.randint(jax.random.fold_in(key, 1), (4,), 3, cfg.vocab_size)
    ref_a = fwd(params, a[None], cfg=cfg)[0]
    ref_b = fwd(params, b[None], cfg=cfg)[0]
    # Row 0: a and b packed, then padding; row 1: left padding then b.
    row0 = jnp.concatenate([a, b, jnp.array([2, 2, 2])])
    seg0 = jnp.array([1] * 5 + [2] * 4 + [0] * 3)
    row1 = jnp.concatenate([jnp.array([2] * 8), b])
    seg1 = jnp.array([0] * 8 + [1] * 4)
    tokens, segs = jnp.stack([row0, row1]), jnp.stack([seg0, seg1])
    pos = T.positions_from_segments(segs)
    np.testing.assert_array_equal(pos[0, :9], [0, 1, 2, 3, 4, 0, 1, 2, 3])
    logits = fwd(params, tokens, cfg=cfg, segment_ids_BxT=segs, positions_BxT=pos)
    assert np.isfinite(np.asarray(logits)).all()
    assert_close_scaled(logits[0, :5], ref_a, eps_multiple=128, what="packed a")
    assert_close_scaled(logits[0, 5:9], ref_b, eps_multiple=128, what="packed b")
    assert_close_scaled(logits[1, 8:], ref_b, eps_multiple=128, what="left-padded b")


def _decode_greedy(cfg, params, prompts, new_tokens, lora=None, lora_cfg=None):
    """Left-pad prompts, prefill, then greedy-decode one token at a time through the cache."""
    width = max(map(len, prompts))
    tokens = np.full((len(prompts), width), 2, np.int32)
    mask = np.zeros((len(prompts), width), bool)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p):] = p
        mask[i, width - len(p):] = True
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    cache = T.init_cache(cfg, len(prompts), width + new_tokens)
    def step(p, t, c, pos, m, l):
        return decode_step(p, t, c, cfg=cfg, lora=l, lora_cfg=lora_cfg, positions_BxT=pos,
                           token_mask_BxT=m)

    logits, cache = step(params, tokens, cache, positions, mask, lora)
    out, step_logits = [], [logits[:, -1]]
    next_pos = positions[:, -1] + 1
    for _ in range(new_tokens):
        tok = jnp.argmax(step_logits[-1], axis=-1).astype(jnp.int32)
        out.append(tok)
        logits, cache = step(params, tok[:, None], cache, next_pos[:, None],
                             np.ones((len(prompts), 1), bool), lora)
        step_logits.append(logits[:, -1])
        next_pos = next_pos + 1
    return np.stack(out, axis=1), np.stack(step_logits[:-1], axis=1)


def _right_padded(seqs):
    """Batch of sequences padded on the right (segment 0), for one full-recompute forward."""
    width = max(map(len, seqs))
    tokens = np.full((len(seqs), width), 2, np.int32)
    segs = np.zeros((len(seqs), width), np.int32)
    for i, s in enumerate(seqs):
        tokens[i, :len(s)] = s
        segs[i, :len(s)] = 1
    return tokens, segs


def test_kv_cache_decode_matches_full_recompute(model):
    cfg, params = model
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, cfg.vocab_size, n).tolist() for n in (3, 7, 5)]
    new = 6
    tokens, logits = _decode_greedy(cfg, params, prompts, new)
    full_tokens, segs = _right_padded([p + t.tolist() for p, t in zip(prompts, tokens)])
    full = fwd(params, full_tokens, cfg=cfg, segment_ids_BxT=segs)
    for i, prompt in enumerate(prompts):
        ref_logits = full[i, len(prompt) - 1:len(prompt) - 1 + new]
        np.testing.assert_array_equal(np.argmax(ref_logits, -1), tokens[i])
        assert_close_scaled(logits[i], ref_logits, eps_multiple=1024, what="cached decode")


def test_lora_zero_b_is_identity_and_matches_merged_weights(qwen):
    cfg, params = qwen
    lora_cfg = LoraConfig(rank=4, alpha=8.0, targets=("q", "k", "v", "o", "gate", "up", "down"))
    tokens = jax.random.randint(jax.random.key(3), (2, 8), 0, cfg.vocab_size)
    lora = random_lora(cfg, lora_cfg, jax.random.key(4))
    zero_b = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.zeros_like(x) if path[-1].key == "b" else x, lora)
    base = fwd(params, tokens, cfg=cfg)
    assert_close_scaled(fwd(params, tokens, cfg=cfg, lora=zero_b, lora_cfg=lora_cfg), base,
                        eps_multiple=16, what="zero-B LoRA")
    merged = jax.tree.map(lambda x: x, params)
    for target, (group, name) in T.PROJECTION_PATHS.items():
        w = merged["layers"][group][name]["kernel"]
        merged["layers"][group][name]["kernel"] = w + lora_cfg.scale * (
            lora[target]["a"] @ lora[target]["b"])
    with_lora = fwd(params, tokens, cfg=cfg, lora=lora, lora_cfg=lora_cfg)
    assert scaled_max_diff(with_lora, base) > 1e-3
    assert_close_scaled(with_lora, fwd(merged, tokens, cfg=cfg), eps_multiple=1024, what="merged")


def test_grouped_lora_equals_per_group_shared_and_vmap(qwen):
    cfg, params = qwen
    lora_cfg = LoraConfig(rank=4, alpha=8.0, targets=("q", "v", "down"))
    groups, rows = 3, 2
    grouped = random_lora(cfg, lora_cfg, jax.random.key(5), groups=groups)
    tokens = jax.random.randint(jax.random.key(6), (groups * rows, 7), 0, cfg.vocab_size)
    out = fwd(params, tokens, cfg=cfg, lora=grouped, lora_cfg=lora_cfg)
    # The same adapters stacked on a leading candidate axis, vmapped with params shared.
    stacked_K = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), grouped)
    vmapped = jax.vmap(lambda l, t: fwd(params, t, cfg=cfg, lora=l, lora_cfg=lora_cfg))(
        stacked_K, tokens.reshape(groups, rows, -1))
    for g in range(groups):
        shared = jax.tree.map(lambda x: x[:, g], grouped)
        ref = fwd(params, tokens[g * rows:(g + 1) * rows], cfg=cfg, lora=shared,
                        lora_cfg=lora_cfg)
        assert_close_scaled(out[g * rows:(g + 1) * rows], ref, eps_multiple=128, what="grouped")
        assert_close_scaled(vmapped[g], ref, eps_multiple=128, what="vmapped")
    with pytest.raises(ValueError, match="row groups"):
        fwd(params, tokens[:4], cfg=cfg, lora=grouped, lora_cfg=lora_cfg)


def test_packed_rows_with_per_token_adapters_equal_each_sequence_alone(qwen):
    cfg, params = qwen
    lora_cfg = LoraConfig(rank=4, alpha=8.0, targets=("q", "v", "down"))
    adapters = random_lora(cfg, lora_cfg, jax.random.key(9), groups=3)  # [L, G=3, ...]
    rng = np.random.default_rng(2)
    seqs = [rng.integers(3, cfg.vocab_size, n) for n in (7, 5, 9, 3, 4)]
    owner = [0, 2, 1, 2, 2]  # adapter 2 has three sequences: two in row 0 and one in row 1
    place = [(0, 0), (0, 7), (1, 0), (1, 9), (0, 12)]  # (row, column)
    width = 16
    tokens = np.zeros((2, width), np.int32)
    segments = np.zeros((2, width), np.int32)
    lists = [[] for _ in range(3)]
    for j, ((r, col), seq, g) in enumerate(zip(place, seqs, owner)):
        tokens[r, col:col + len(seq)] = seq
        segments[r, col:col + len(seq)] = j + 1
        lists[g].extend(r * width + col + np.arange(len(seq)))
    # Each adapter's token list in any order, padded with entries that name no token (out of range
    # on either side).
    group_tokens = np.full((3, 20), 2 * width, np.int32)
    for g, toks in enumerate(lists):
        group_tokens[g, :len(toks)] = rng.permutation(toks)
    group_tokens[0, -1] = -1
    out = fwd(params, jnp.asarray(tokens), cfg=cfg, lora=adapters, lora_cfg=lora_cfg,
              segment_ids_BxT=jnp.asarray(segments), lora_tokens_GxN=jnp.asarray(group_tokens))
    for (r, col), seq, g in zip(place, seqs, owner):
        alone = fwd(params, jnp.asarray(seq)[None], cfg=cfg,
                    lora=jax.tree.map(lambda x: x[:, g], adapters), lora_cfg=lora_cfg)[0]
        assert_close_scaled(out[r, col:col + len(seq)], alone, eps_multiple=128, what=f"segment of {g}")
    # Gradients reach each adapter from its own tokens only: a loss on adapter 1's sequence alone
    # leaves the other adapters' gradients zero.
    def loss(lora):
        logits = fwd(params, jnp.asarray(tokens), cfg=cfg, lora=lora, lora_cfg=lora_cfg,
                     segment_ids_BxT=jnp.asarray(segments), lora_tokens_GxN=jnp.asarray(group_tokens))
        return jnp.sum(logits[1, 0:9] ** 2)

    grads = jax.grad(loss)(adapters)
    for target in lora_cfg.targets:
        a_grad = np.asarray(grads[target]["a"], np.float32)
        assert np.abs(a_grad[:, 1]).max() > 0
        assert not a_grad[:, [0, 2]].any()
    with pytest.raises(ValueError, match="lists tokens of 2 adapters"):
        fwd(params, jnp.asarray(tokens), cfg=cfg, lora=adapters, lora_cfg=lora_cfg,
            segment_ids_BxT=jnp.asarray(segments), lora_tokens_GxN=jnp.asarray(group_tokens[:2]))
    with pytest.raises(ValueError, match="segment_ids"):
        fwd(params, jnp.asarray(tokens), cfg=cfg, lora=adapters, lora_cfg=lora_cfg,
            lora_tokens_GxN=jnp.asarray(group_tokens))


def test_grouped_lora_decode_matches_full_forward(qwen):
    cfg, params = qwen
    lora_cfg = LoraConfig(rank=4, alpha=8.0, targets=("q", "v"))
    grouped = random_lora(cfg, lora_cfg, jax.random.key(7), groups=2)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, cfg.vocab_size, n).tolist() for n in (4, 6)]
    tokens, _ = _decode_greedy(cfg, params, prompts, 4, lora=grouped, lora_cfg=lora_cfg)
    full_tokens, segs = _right_padded([p + t.tolist() for p, t in zip(prompts, tokens)])
    for g, prompt in enumerate(prompts):
        shared = jax.tree.map(lambda x: x[:, g], grouped)
        full = fwd(params, full_tokens[g:g + 1], cfg=cfg, lora=shared, lora_cfg=lora_cfg,
                   segment_ids_BxT=segs[g:g + 1])[0]
        np.testing.assert_array_equal(np.argmax(full[len(prompt) - 1:len(prompt) + 3], -1),
                                      tokens[g])


def test_lora_validation_errors(qwen):
    cfg, params = qwen
    lora_cfg = LoraConfig(rank=4, alpha=8.0, targets=("q", "v"))
    lora = random_lora(cfg, lora_cfg, jax.random.key(8))
    tokens = jnp.zeros((2, 4), jnp.int32)
    with pytest.raises(ValueError, match="lora_cfg"):
        fwd(params, tokens, cfg=cfg, lora=lora)
    with pytest.raises(ValueError, match="targets"):
        fwd(params, tokens, cfg=cfg, lora={"q": lora["q"]}, lora_cfg=lora_cfg)
    bad = {**lora, "v": {"a": lora["v"]["a"][:, :-1], "b": lora["v"]["b"]}}
    with pytest.raises(ValueError, match=r"LoRA v\.a has shape"):
        fwd(params, tokens, cfg=cfg, lora=bad, lora_cfg=lora_cfg)


def test_lora_dropout_uses_rng_and_remat_keeps_gradients():
    cfg, params = preset_params("tiny-llama")
    lora_cfg = LoraConfig(rank=4, alpha=8.0, targets=("q", "v"), dropout=0.5)
    lora = random_lora(cfg, lora_cfg, jax.random.key(9))
    tokens = jax.random.randint(jax.random.key(10), (2, 6), 0, cfg.vocab_size)
    no_drop = fwd(params, tokens, cfg=cfg, lora=lora, lora_cfg=lora_cfg)
    d1 = fwd(params, tokens, cfg=cfg, lora=lora, lora_cfg=lora_cfg,
                   dropout_rng=jax.random.key(1))
    d1b = fwd(params, tokens, cfg=cfg, lora=lora, lora_cfg=lora_cfg,
                    dropout_rng=jax.random.key(1))
    d2 = fwd(params, tokens, cfg=cfg, lora=lora, lora_cfg=lora_cfg,
                   dropout_rng=jax.random.key(2))
    np.testing.assert_array_equal(d1, d1b)
    assert scaled_max_diff(d1, no_drop) > 1e-3 and scaled_max_diff(d1, d2) > 1e-3

    def loss(lora, cfg):
        logits = fwd(params, tokens, cfg=cfg, lora=lora, lora_cfg=lora_cfg)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0])

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    g_plain = grad(lora, cfg)
    g_remat = grad(lora, cfg.replace(remat=True))
    for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_remat)):
        assert_close_scaled(b, a, eps_multiple=64, what="remat grad")
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(g_plain))


def test_dots_residuals_give_the_same_gradients_from_fewer_saved_bytes(qwen):
    """saved_residuals="dots" (the default) keeps only matmul outputs for the backward pass and
    recomputes the rest: the same gradients, from well under the bytes of keeping everything."""
    cfg, params = qwen
    tokens = jax.random.randint(jax.random.key(12), (2, 24), 0, cfg.vocab_size)

    def loss(lora, params, lora_cfg, cfg):
        logits = T.forward(params, tokens, cfg=cfg, lora=lora, lora_cfg=lora_cfg)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0])

    lora_cfg = LoraConfig(rank=4, alpha=8.0, targets=("q", "v", "up"))
    lora = random_lora(cfg, lora_cfg, jax.random.key(11))
    grad = jax.jit(jax.grad(loss), static_argnums=(2, 3))
    want = grad(lora, params, lora_cfg, cfg.replace(saved_residuals="all"))
    got = grad(lora, params, lora_cfg, cfg.replace(saved_residuals="dots"))
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        assert_close_scaled(b, a, eps_multiple=64, what="dots vs all grad")

    # Bytes kept, as training runs (bfloat16): the backward function closes over exactly the
    # residuals its forward pass kept, plus the (frozen) params, which are left out of the count.
    cfg16 = cfg.replace(param_dtype="bfloat16", compute_dtype="bfloat16")
    params16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    param_ids = {id(x) for x in jax.tree.leaves(params16)}
    qv_cfg = LoraConfig(rank=4, alpha=8.0, targets=("q", "v"))
    qv_lora = random_lora(cfg, qv_cfg, jax.random.key(13))
    saved = {}
    for mode in ("dots", "all"):
        _, backward = jax.vjp(functools.partial(loss, params=params16, lora_cfg=qv_cfg,
                                                cfg=cfg16.replace(saved_residuals=mode)), qv_lora)
        saved[mode] = sum(x.nbytes for x in jax.tree.leaves(backward)
                          if hasattr(x, "nbytes") and id(x) not in param_ids)
    assert saved["dots"] < 0.7 * saved["all"], saved  # 0.56 when written
    with pytest.raises(ValueError, match="saved_residuals"):
        cfg.replace(saved_residuals="some")


def test_bfloat16_forward_is_close_to_float32():
    cfg32, params32 = preset_params("tiny-qwen2")
    cfg16 = cfg32.replace(param_dtype="bfloat16", compute_dtype="bfloat16")
    params16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params32)
    tokens = jax.random.randint(jax.random.key(11), (2, 9), 0, cfg32.vocab_size)
    segs = jnp.array([[0, 0, 1, 1, 1, 1, 1, 1, 1], [1] * 9])
    l32 = fwd(params32, tokens, cfg=cfg32, segment_ids_BxT=segs)
    l16 = fwd(params16, tokens, cfg=cfg16, segment_ids_BxT=segs)
    assert l16.dtype == jnp.float32 and np.isfinite(np.asarray(l16)).all()
    rel = jnp.linalg.norm(l16 - l32) / jnp.linalg.norm(l32)
    assert rel < 0.05


def test_long_attention_in_query_chunks_equals_one_piece(monkeypatch):
    """Above ATTENTION_CHUNK_SCORES the XLA path attends in rematerialised query chunks (no [T, S]
    scores stored for the backward pass); values and gradients are those of the one-piece path,
    padded and causal rows included."""
    cfg = get_preset("tiny-llama")
    rng = np.random.default_rng(0)
    batch, t = 2, 512
    shape_q = (batch, t, cfg.num_heads, cfg.head_dim)
    shape_kv = (batch, t, cfg.num_kv_heads, cfg.head_dim)
    q, k, v = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in (shape_q, shape_kv, shape_kv))
    pos = np.arange(t)
    lengths = np.array([t, 300])
    mask = jnp.asarray((pos[None, :, None] >= pos[None, None, :])
                       & (pos[None, None, :] < lengths[:, None, None])
                       & (pos[None, :, None] < lengths[:, None, None]))

    def run(limit):
        monkeypatch.setattr(T, "ATTENTION_CHUNK_SCORES", limit)
        loss = lambda q, k, v: jnp.sum(jnp.sin(T.attention(cfg, q, k, v, mask)))  # noqa: E731
        return T.attention(cfg, q, k, v, mask), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    whole = run(1 << 40)
    assert T._query_chunk(t, t) is None
    chunked = run(t * t - 1)
    assert T._query_chunk(t, t) == 256 and T._query_chunk(64, 64) is None
    for got, want in zip(jax.tree.leaves(chunked), jax.tree.leaves(whole)):
        assert_close_scaled(got, want, eps_multiple=64, what="chunked vs one piece")
    assert float(jnp.abs(whole[0][1, 300:]).max()) == 0.0  # padding queries: zeros, as before
