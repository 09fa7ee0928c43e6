"""Batched KV-cache sampler: agreement with a full-recompute reference, per-row controls, LoRA groups."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seal_jax import decode
from seal_jax import sampling as sampling_module
from seal_jax.model import transformer
from seal_jax.model.config import LoraConfig
from seal_jax.model.presets import get_preset
from seal_jax.sampling import (Generation, SamplingParams, _resolve_stop_ids, generate,
                               plan_row_groups)

from random_lora import random_lora

NO_STOP = SamplingParams(max_new_tokens=12, stop_ids=())
LORA_CFG = LoraConfig(rank=4, alpha=8.0, targets=("q", "k", "v", "up", "down"))  # both fused groups of a decode step


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-qwen2"])
def model(request):
    cfg = get_preset(request.param)
    return cfg, transformer.init_params(cfg, jax.random.key(0))


@pytest.fixture(scope="module")
def llama():
    cfg = get_preset("tiny-llama")
    return cfg, transformer.init_params(cfg, jax.random.key(1))


def random_prompts(cfg, lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, cfg.vocab_size, size=n).tolist() for n in lengths]


@functools.partial(jax.jit, static_argnames=("cfg", "lora_cfg"))
def _last_logits(params, tokens_1xT, length, lora, *, cfg, lora_cfg):
    segment_ids_1xT = (jnp.arange(tokens_1xT.shape[1]) < length).astype(jnp.int32)[None]
    logits = transformer.forward(params, tokens_1xT, cfg=cfg, lora=lora, lora_cfg=lora_cfg,
                                 segment_ids_BxT=segment_ids_1xT)
    return logits[0, length - 1]


def full_recompute_greedy(params, prompt, steps, cfg, lora=None, lora_cfg=None, width=64):
    """Reference: re-run the whole sequence through `forward` for every new token (right-padded
    to a fixed width so it compiles once)."""
    tokens = list(prompt)
    for _ in range(steps):
        padded = jnp.asarray([tokens + [0] * (width - len(tokens))], jnp.int32)
        tokens.append(int(jnp.argmax(_last_logits(params, padded, len(tokens), lora,
                                                  cfg=cfg, lora_cfg=lora_cfg))))
    return tokens[len(prompt):]


def test_greedy_matches_full_recompute(model):
    cfg, params = model
    prompt = random_prompts(cfg, [7])[0]
    [gen] = generate(params, [prompt], cfg=cfg, sampling=NO_STOP)
    assert isinstance(gen, Generation)
    assert gen.token_ids == full_recompute_greedy(params, prompt, 12, cfg)
    assert gen.finish_reason == "length" and gen.stop_token is None and gen.text is None


def test_ragged_batch_matches_each_alone(model):
    cfg, params = model
    prompts = random_prompts(cfg, [3, 16, 1, 9, 13], seed=1)
    batched = generate(params, prompts, cfg=cfg, sampling=NO_STOP, batch_size=8)
    for prompt, gen in zip(prompts, batched):
        [alone] = generate(params, [prompt], cfg=cfg, sampling=NO_STOP)
        assert gen.token_ids == alone.token_ids


def test_chunked_prefill_matches_one_chunk(llama):
    cfg, params = llama
    prompts = random_prompts(cfg, [12, 3, 16, 7], seed=9)  # 16 prefix columns: 4 chunks of 4
    whole = generate(params, prompts, cfg=cfg, sampling=NO_STOP)
    chunked = generate(params, prompts, cfg=cfg, sampling=NO_STOP, prefill_chunk=4)
    assert [g.token_ids for g in chunked] == [g.token_ids for g in whole]
    with pytest.raises(ValueError, match="power of two"):
        generate(params, prompts, cfg=cfg, prefill_chunk=6)


def test_per_row_stop_and_max_new_tokens(llama):
    cfg, params = llama
    prompts = random_prompts(cfg, [5, 8, 6, 4], seed=2)
    free = generate(params, prompts, cfg=cfg, sampling=NO_STOP)
    # Row 0 stops at the token it would emit at step 3 (first occurrence), row 1 at a token it
    # never emits, row 2 is cut by its own max_new_tokens, row 3 asks for nothing.
    stop_tok = free[0].token_ids[3]
    first = free[0].token_ids.index(stop_tok)
    absent = next(t for t in range(cfg.vocab_size) if t not in free[1].token_ids)
    sampling = [
        SamplingParams(max_new_tokens=12, stop_ids=(absent, stop_tok)),
        SamplingParams(max_new_tokens=12, stop_ids=(absent,)),
        SamplingParams(max_new_tokens=5, stop_ids=()),
        SamplingParams(max_new_tokens=0),
    ]
    got = generate(params, prompts, cfg=cfg, sampling=sampling)
    assert got[0].token_ids == free[0].token_ids[:first]
    assert (got[0].finish_reason, got[0].stop_token) == ("stop", stop_tok)
    assert got[1].token_ids == free[1].token_ids and got[1].finish_reason == "length"
    assert got[2].token_ids == free[2].token_ids[:5] and got[2].finish_reason == "length"
    assert got[3].token_ids == [] and got[3].finish_reason == "length"


def test_default_stop_ids():
    cfg = get_preset("tiny-llama")

    class Tok:
        stop_ids = (7, 9)

    assert _resolve_stop_ids(SamplingParams(), cfg, None) == (cfg.eos_token_id,)
    assert _resolve_stop_ids(SamplingParams(), cfg, Tok()) == (7, 9)
    assert _resolve_stop_ids(SamplingParams(stop_ids=[4]), cfg, Tok()) == (4,)
    assert _resolve_stop_ids(SamplingParams(), cfg.replace(eos_token_id=None), None) == ()


def test_seeded_sampling_is_reproducible(llama):
    cfg, params = llama
    prompts = random_prompts(cfg, [4, 4, 9, 12], seed=4)
    prompts[1] = prompts[0]  # same prompt twice must still give independent samples
    hot = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=12, stop_ids=(), seed=7)
    a = generate(params, prompts, cfg=cfg, sampling=hot)
    b = generate(params, prompts, cfg=cfg, sampling=hot)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert a[0].token_ids != a[1].token_ids
    other = generate(params, prompts, cfg=cfg, sampling=dataclasses.replace(hot, seed=8))
    assert all(x.token_ids != y.token_ids for x, y in zip(a, other))
    # A row's stream depends on its seed and its index, not on how requests are batched.
    one_by_one = generate(params, prompts, cfg=cfg, sampling=hot, batch_size=1)
    assert [g.token_ids for g in a] == [g.token_ids for g in one_by_one]
    # A subset asked for later, each request with its position in the whole list: the same samples.
    subset = [3, 1]
    again = generate(params, [prompts[i] for i in subset], cfg=cfg,
                     sampling=[dataclasses.replace(hot, stream=i) for i in subset])
    assert [g.token_ids for g in again] == [a[i].token_ids for i in subset]
    assert generate(params, [prompts[3]], cfg=cfg, sampling=hot)[0].token_ids != a[3].token_ids
    with pytest.raises(ValueError, match="stream"):
        SamplingParams(stream=-1)


def test_tiny_top_p_is_greedy_and_rows_mix_modes(llama):
    cfg, params = llama
    prompts = random_prompts(cfg, [5, 11, 2, 7], seed=5)
    greedy = generate(params, prompts, cfg=cfg, sampling=NO_STOP)
    nucleus = SamplingParams(temperature=1.5, top_p=1e-6, max_new_tokens=12, stop_ids=(), seed=3)
    hot = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=12, stop_ids=(), seed=3)
    got = generate(params, prompts, cfg=cfg, sampling=[nucleus, NO_STOP, nucleus, NO_STOP])
    assert [g.token_ids for g in got] == [g.token_ids for g in greedy]
    mixed = generate(params, prompts, cfg=cfg, sampling=[hot, NO_STOP, hot, NO_STOP])
    assert mixed[1].token_ids == greedy[1].token_ids and mixed[3].token_ids == greedy[3].token_ids
    assert mixed[0].token_ids != greedy[0].token_ids and mixed[2].token_ids != greedy[2].token_ids


def test_per_row_lora_matches_single_adapter_runs_in_prompt_order(llama):
    cfg, params = llama
    k = 3
    lora = random_lora(cfg, LORA_CFG, k, seed=11)
    prompts = random_prompts(cfg, [4, 9, 6, 3, 12, 7], seed=6)
    adapter_index = [2, 0, 1, 2, 0, 1]
    got = generate(params, prompts, cfg=cfg, sampling=NO_STOP, lora=lora, lora_cfg=LORA_CFG,
                   adapter_index=adapter_index, batch_size=8)
    base = generate(params, prompts, cfg=cfg, sampling=NO_STOP, batch_size=8)
    assert all(g.token_ids != b.token_ids for g, b in zip(got, base)), "LoRA changed nothing"
    for cand in range(k):
        single = jax.tree.map(lambda x: x[cand], lora)
        rows = [i for i, a in enumerate(adapter_index) if a == cand]
        alone = generate(params, [prompts[i] for i in rows], cfg=cfg, sampling=NO_STOP,
                         lora=single, lora_cfg=LORA_CFG)
        assert [got[i].token_ids for i in rows] == [g.token_ids for g in alone]
    # The grouped decode agrees with recomputing the full sequence through `forward`.
    single = jax.tree.map(lambda x: x[adapter_index[1]], lora)
    assert got[1].token_ids == full_recompute_greedy(params, prompts[1], 12, cfg, single, LORA_CFG)
    # Requests in any order come back in their own order.
    perm = [3, 0, 5, 4, 2, 1]
    shuffled = generate(params, [prompts[i] for i in perm], cfg=cfg, sampling=NO_STOP, lora=lora,
                        lora_cfg=LORA_CFG, adapter_index=[adapter_index[i] for i in perm],
                        batch_size=8)
    assert [g.token_ids for g in shuffled] == [got[i].token_ids for i in perm]


def test_adapter_stacks_of_k_up_to_the_same_power_of_two_share_decode_programs(llama):
    cfg, params = llama
    three = random_lora(cfg, LORA_CFG, 3, seed=5)
    lora_LxK, index = sampling_module.prepare_lora(three, LORA_CFG, cfg, [2, 0, 1], 3)
    for padded, given in zip(jax.tree.leaves(lora_LxK), jax.tree.leaves(three)):
        assert padded.shape[1] == 4  # K=3 padded with a zero adapter, never indexed
        np.testing.assert_array_equal(np.asarray(padded[:, :3]), np.swapaxes(np.asarray(given), 0, 1))
        assert not np.asarray(padded[:, 3]).any()
    assert index.tolist() == [2, 0, 1]
    # An E-step's last call with fewer candidates than the others decodes with their programs.
    prompts = random_prompts(cfg, [5, 7, 6, 4], seed=8)
    four = random_lora(cfg, LORA_CFG, 4, seed=6)
    generate(params, prompts, cfg=cfg, sampling=NO_STOP, lora=four, lora_cfg=LORA_CFG,
             adapter_index=[0, 1, 2, 3], batch_size=4)
    compiled = decode.decode_segment._cache_size()
    generate(params, prompts[:3], cfg=cfg, sampling=NO_STOP, lora=three, lora_cfg=LORA_CFG,
             adapter_index=[0, 1, 2], batch_size=4)
    assert decode.decode_segment._cache_size() == compiled


def test_adapter_groups_fit_the_request_counts_not_the_largest():
    # A paper E-step call: 128 candidates with 2-5 questions each, one passage with 10.
    counts = np.array([5] * 70 + [4] * 33 + [3] * 18 + [2] * 4 + [10] * 3)
    fill = lambda r: counts.sum() / (r * -(-counts // r)).sum()  # noqa: E731  busy share of row-slots
    assert sampling_module.bucket(int(counts.max())) == 16 and fill(16) < 0.3  # the old rule
    for share in (7.4e6 / 270e6, 40e6 / 15.2e9):  # a q,v rank-32 adapter over the 135M / 7B base
        size = sampling_module.adapter_group_size(counts, 256, share)
        assert size in (2, 3, 4, 6) and fill(size) > 0.7
    # Reading an adapter per group costs more as groups multiply: at a share this large, fewer groups.
    assert sampling_module.adapter_group_size(counts, 256, 1.0) >= 6
    # One adapter (or none): one group as wide as its requests, as before.
    assert sampling_module.adapter_group_size([20], 16, 0.0) == 16
    assert sampling_module.adapter_group_size([0, 5, 0], 16, 0.3) == 8


def test_groups_of_three_rows_decode_like_each_adapter_alone(llama, monkeypatch):
    cfg, params = llama
    adapter_index = [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 4, 4, 4, 4, 4, 4]
    lora = random_lora(cfg, LORA_CFG, 5, seed=12)
    prompts = random_prompts(cfg, [3 + (5 * i) % 9 for i in range(len(adapter_index))], seed=9)
    sizes = []
    init = sampling_module._Rows.__init__

    def recording_init(self, *a, **kw):
        init(self, *a, **kw)
        sizes.append(self.group_size)

    monkeypatch.setattr(sampling_module._Rows, "__init__", recording_init)
    got = generate(params, prompts, cfg=cfg, sampling=NO_STOP, lora=lora, lora_cfg=LORA_CFG,
                   adapter_index=adapter_index, batch_size=12)
    assert sizes == [3]  # not a power of two; adapter 4's six requests span two groups
    for cand in range(5):
        rows = [i for i, a in enumerate(adapter_index) if a == cand]
        alone = generate(params, [prompts[i] for i in rows], cfg=cfg, sampling=NO_STOP,
                         lora=jax.tree.map(lambda x: x[cand], lora), lora_cfg=LORA_CFG)
        assert [got[i].token_ids for i in rows] == [g.token_ids for g in alone]


def test_plan_row_groups_covers_every_row_once():
    rng = np.random.default_rng(0)
    adapters = rng.integers(0, 5, size=37)
    lengths = rng.integers(1, 50, size=37)
    plans = plan_row_groups(adapters, lengths, batch_size=8)
    seen = np.concatenate([p.rows[p.real] for p in plans])
    assert sorted(seen.tolist()) == list(range(37))
    for p in plans:
        assert len(p.rows) <= 8 and len(p.rows) == p.num_groups * p.group_size
        assert p.group_size & (p.group_size - 1) == 0
        for g, adapter in enumerate(p.adapters):
            members = p.rows[g * p.group_size:(g + 1) * p.group_size]
            assert np.all(adapters[members[members >= 0]] == adapter)


def test_text_is_decoded_without_the_stop_token(llama):
    cfg, params = llama

    prompt = random_prompts(cfg, [6], seed=8)[0]
    [free] = generate(params, [prompt], cfg=cfg, sampling=NO_STOP)
    stop = free.token_ids[2]

    class ByteTokenizer:  # ids 0-2 are "special"; every other id is one character
        stop_ids = (stop,)  # the default when SamplingParams.stop_ids is None
        pad_id = 0

        def decode(self, ids, skip_special=True):
            return "".join(chr(0x100 + i) for i in ids if not (skip_special and i < 3))

    [got] = generate(params, [prompt], cfg=cfg, tokenizer=ByteTokenizer(),
                     sampling=SamplingParams(max_new_tokens=12))
    cut = free.token_ids[: free.token_ids.index(stop)]
    assert got.finish_reason == "stop" and got.token_ids == cut
    assert got.text == ByteTokenizer().decode(cut)


def test_bad_requests_raise_clear_errors(llama):
    cfg, params = llama
    lora = random_lora(cfg, LORA_CFG, 2, seed=13)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(params, [[5], []], cfg=cfg)
    with pytest.raises(ValueError, match="outside"):
        generate(params, [[5, cfg.vocab_size]], cfg=cfg)
    with pytest.raises(ValueError, match="adapter_index"):
        generate(params, [[5]], cfg=cfg, lora=lora, lora_cfg=LORA_CFG)
    with pytest.raises(ValueError, match="out of range"):
        generate(params, [[5]], cfg=cfg, lora=lora, lora_cfg=LORA_CFG, adapter_index=[2])
    with pytest.raises(ValueError, match="LoRA q.a has shape"):
        generate(params, [[5]], cfg=cfg, lora=lora, adapter_index=[0],
                 lora_cfg=dataclasses.replace(LORA_CFG, rank=8))
    with pytest.raises(ValueError, match="SamplingParams"):
        generate(params, [[5], [6]], cfg=cfg, sampling=[SamplingParams()])
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        generate(params, [[5]], cfg=cfg, sampling=SamplingParams(max_new_tokens=1000))


@pytest.mark.slow
def test_embedded_model_generates_text(embedded_model):
    cfg, params, tokenizer = embedded_model
    cfg = cfg.replace(compute_dtype="float32")  # so cached and recomputed logits agree closely
    prompt = tokenizer.encode("The capital of France is")
    [gen] = generate(params, [prompt], cfg=cfg, tokenizer=tokenizer,
                     sampling=SamplingParams(max_new_tokens=8))
    assert gen.token_ids == full_recompute_greedy(params, prompt, len(gen.token_ids), cfg)
    assert gen.text == tokenizer.decode(gen.token_ids, skip_special=True)
    assert len(gen.token_ids) == 8 or gen.finish_reason == "stop"


def sorted_nucleus_mask(logits_BxV, top_p_B):
    """Reference: a full stable descending sort; keep while the mass before a token is < top_p."""
    logits = np.asarray(logits_BxV, np.float64)
    keep = np.zeros(logits.shape, bool)
    for b, (row, top_p) in enumerate(zip(logits, top_p_B)):
        order = np.argsort(-row, kind="stable")
        probs = np.exp(row[order] - row.max())
        probs /= probs.sum()
        before = np.cumsum(probs) - probs
        keep[b, order] = (before < top_p) | (np.arange(len(row)) == 0) | (top_p >= 1.0)
    return keep


def test_nucleus_mask_equals_full_sort_including_ties():
    rng = np.random.default_rng(0)
    rows = []
    # Continuous logits, and logits from a few values (large tie groups cut by top_p).
    rows += [rng.normal(0, 2, 64) for _ in range(6)]
    rows += [rng.integers(0, 3, 64).astype(np.float64) for _ in range(6)]
    top_p = list(rng.uniform(0.05, 0.99, len(rows)))
    # Exact by construction: 64 equal probabilities of 1/64; one dominant token; top_p extremes.
    rows += [np.zeros(64), np.r_[5.0, np.zeros(63)], rows[0], rows[6]]
    top_p = np.array(top_p + [0.5, 0.5, 1e-6, 1.0])
    logits = np.stack(rows).astype(np.float32)
    want = sorted_nucleus_mask(logits, top_p)
    # A random boundary within float32 rounding of top_p could go either way in either
    # implementation.
    for row, p in zip(logits[:12], top_p[:12]):
        probs = np.sort(np.exp(row - row.max()) / np.exp(row - row.max()).sum())[::-1]
        assert np.min(np.abs(np.cumsum(probs) - p)) > 1e-5, "test data sits on a boundary"
    got = np.asarray(decode.nucleus_mask(jnp.asarray(logits), jnp.asarray(top_p, jnp.float32)))
    np.testing.assert_array_equal(got, want)
    assert want[12].sum() == 32 and want[13].sum() == 1 and want[14].sum() == 1 and want[15].all()


def test_nucleus_sampling_draws_the_same_token_as_the_sorted_definition():
    rng = np.random.default_rng(1)
    batch, vocab = 16, 97
    logits = jnp.asarray(rng.normal(0, 3, (batch, vocab)), jnp.float32)
    temperature = jnp.asarray(rng.uniform(0.5, 1.5, batch), jnp.float32)
    top_p = jnp.asarray(rng.uniform(0.2, 0.95, batch), jnp.float32)
    seed = jnp.arange(batch, dtype=jnp.uint32) * 7
    request, step = jnp.arange(batch, dtype=jnp.uint32), jnp.full(batch, 3, jnp.uint32)
    scaled = np.asarray(logits / temperature[:, None])
    keep = sorted_nucleus_mask(scaled, np.asarray(top_p))
    for draw in range(5):  # five independent draws per row
        got = decode.pick_tokens(logits, seed + draw, request, step, temperature, top_p,
                                 stochastic=True, nucleus=True)
        keys = [jax.random.fold_in(jax.random.fold_in(jax.random.key(int(s) + draw), int(r)), 3)
                for s, r in zip(seed, request)]
        want = [int(jax.random.categorical(k, jnp.where(keep[b], scaled[b], -jnp.inf)))
                for b, k in enumerate(keys)]
        assert np.asarray(got).tolist() == want
        assert all(keep[b, t] for b, t in enumerate(want))


def ragged_requests(cfg, n=11, seed=12):
    rng = np.random.default_rng(seed)
    prompts = random_prompts(cfg, rng.integers(1, 20, n).tolist(), seed=seed)
    max_new = rng.integers(1, 40, n).tolist()
    return prompts, max_new


def test_refill_gives_the_same_outputs_as_whole_batches(llama):
    cfg, params = llama
    prompts, max_new = ragged_requests(cfg)
    # Even rows greedy, odd rows nucleus-sampled: both must be independent of batching.
    sampling = [SamplingParams(temperature=float(i % 2), top_p=0.9, max_new_tokens=m, stop_ids=(),
                               seed=5) for i, m in enumerate(max_new)]
    refilled = generate(params, prompts, cfg=cfg, sampling=sampling, batch_size=4)
    batches = generate(params, prompts, cfg=cfg, sampling=sampling, batch_size=4, refill=False)
    assert [len(g.token_ids) for g in refilled] == max_new  # each row's own max_new_tokens
    assert [g.token_ids for g in refilled] == [g.token_ids for g in batches]
    for i in (0, 6):
        assert refilled[i].token_ids == full_recompute_greedy(params, prompts[i], max_new[i], cfg)
    hot = [dataclasses.replace(sp, seed=6) for sp in sampling]
    other = generate(params, prompts, cfg=cfg, sampling=hot, batch_size=4)
    assert all(a.token_ids != b.token_ids for a, b in zip(refilled[1::2], other[1::2]) if len(a.token_ids) > 3)


def test_refill_with_stops_and_adapter_groups_switching(llama):
    cfg, params = llama
    prompts, max_new = ragged_requests(cfg, n=9, seed=3)
    lora = random_lora(cfg, LORA_CFG, 3, seed=4)
    adapter_index = [0, 0, 0, 0, 0, 1, 2, 2, 1]
    free = generate(params, prompts, cfg=cfg, sampling=NO_STOP, lora=lora, lora_cfg=LORA_CFG,
                    adapter_index=adapter_index, batch_size=16)
    # Each row stops at the token it emits at step 2 (or never, for rows stopped by max_new).
    stop_at = [g.token_ids[2] for g in free]
    sampling = [SamplingParams(max_new_tokens=m, stop_ids=(s,)) for m, s in zip(max_new, stop_at)]
    # batch_size 2: groups of two rows; a group moves to another adapter once its queue is empty.
    got = generate(params, prompts, cfg=cfg, sampling=sampling, lora=lora, lora_cfg=LORA_CFG,
                   adapter_index=adapter_index, batch_size=2)
    for g, f, m, s in zip(got, free, max_new, stop_at):
        cut = f.token_ids[: f.token_ids.index(s)]
        if len(cut) < m:
            assert (g.token_ids, g.finish_reason, g.stop_token) == (cut, "stop", s)
        else:
            assert (g.token_ids, g.finish_reason) == (f.token_ids[:m], "length")


@pytest.mark.slow
def test_cache_grows_and_shrinks_between_segments(llama, monkeypatch):
    cfg, params = llama
    monkeypatch.setattr(sampling_module, "CAPACITY_HORIZON", 8)
    # Admitted in prompt-length order on two rows: row A runs the 150-token request while row B
    # runs 100 tokens and then short requests, which outlive A (the cache then shrinks).
    prompts = random_prompts(cfg, [2, 3, 4, 5, 6, 7, 8], seed=7)
    max_new = [150, 100, 20, 20, 20, 20, 20]
    sampling = [SamplingParams(max_new_tokens=m, stop_ids=()) for m in max_new]
    resized = []
    real_resize = decode.resize
    monkeypatch.setattr(decode, "resize", lambda state, capacity: resized.append(capacity)
                        or real_resize(state, capacity=capacity))
    got = generate(params, prompts, cfg=cfg, sampling=sampling, batch_size=2)
    assert max(resized) >= 152 and resized[-1] <= 64, resized
    monkeypatch.undo()
    assert [len(g.token_ids) for g in got] == max_new
    want = generate(params, prompts, cfg=cfg, sampling=sampling, batch_size=2, refill=False)
    assert [g.token_ids for g in got] == [g.token_ids for g in want]
    assert got[0].token_ids == full_recompute_greedy(params, prompts[0], 150, cfg, width=160)


def test_gpu_only_attention_falls_back_off_gpu(llama):
    cfg, params = llama
    if jax.default_backend() == "gpu":
        pytest.skip("cuDNN attention is the real path on GPU")
    prompts = random_prompts(cfg, [5, 9], seed=10)
    want = generate(params, prompts, cfg=cfg, sampling=NO_STOP)
    got = generate(params, prompts, cfg=cfg.replace(attention_impl="cudnn"), sampling=NO_STOP)
    assert [g.token_ids for g in got] == [g.token_ids for g in want]
