"""TPU safety: GPU-only paths (cuDNN attention) fall back to plain JAX off CUDA; backend defaults.

A config tuned on GPUs (`attention_impl="cudnn"` or `"auto"`) must run unchanged on TPU/CPU. On this
CPU machine both resolve to the XLA einsum path, so the model, the inner loop and the sampler run
with them and must give exactly what `attention_impl="xla"` gives: the same program is compiled
(had cuDNN been tried, jax would raise on a non-GPU backend instead).
"""
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seal_jax import backends, inner, sampling
from seal_jax.model import transformer
from seal_jax.model.config import LoraConfig
from seal_jax.model.presets import PRESETS, get_preset

REPO = pathlib.Path(__file__).resolve().parents[1]
LORA_CFG = LoraConfig(rank=4, alpha=8.0, targets=("q", "v"))
GPU_TUNED = ("cudnn", "auto")


@pytest.fixture(scope="module")
def llama():
    cfg = get_preset("tiny-llama")
    return cfg, transformer.init_params(cfg, jax.random.PRNGKey(0))


def test_attention_selection_rules(monkeypatch):
    select = transformer.select_attention_impl
    shapes = dict(dtype=jnp.bfloat16, head_dim=64, q_len=32, kv_len=32)
    # Off CUDA every request resolves to the portable path.
    for impl in ("auto", "xla", "cudnn"):
        assert select(impl, **shapes) == "xla"
    with pytest.raises(ValueError, match="attention_impl"):
        select("flash", **shapes)
    # On a CUDA GPU "auto" takes cuDNN only where its constraints hold.
    monkeypatch.setattr(transformer, "_is_cuda_backend", lambda: True)
    assert select("auto", **shapes) == "cudnn"
    assert select("cudnn", **{**shapes, "q_len": 1}) == "cudnn"  # explicit: the user's choice
    assert select("xla", **shapes) == "xla"
    for bad in ({"dtype": jnp.float32}, {"head_dim": 256}, {"head_dim": 36}, {"q_len": 1},
                {"kv_len": 33}):
        assert select("auto", **{**shapes, **bad}) == "xla", bad


@pytest.mark.slow
def test_model_forward_and_cache_with_gpu_tuned_configs(llama):
    cfg, params = llama
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(3, cfg.vocab_size, size=(2, 10)), jnp.int32)
    segments = jnp.asarray([[1] * 10, [1] * 6 + [0] * 4], jnp.int32)
    want = transformer.forward(params, tokens, cfg=cfg, segment_ids_BxT=segments)
    cache = transformer.init_cache(cfg, 2, 16)
    positions = jnp.broadcast_to(jnp.arange(10), (2, 10))
    mask = segments > 0
    want_cached, _ = transformer.forward_with_cache(params, tokens, cache, cfg=cfg,
                                                    positions_BxT=positions, token_mask_BxT=mask)
    for impl in GPU_TUNED:
        c = cfg.replace(attention_impl=impl)
        got = transformer.forward(params, tokens, cfg=c, segment_ids_BxT=segments)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        got_cached, _ = transformer.forward_with_cache(params, tokens, cache, cfg=c,
                                                       positions_BxT=positions, token_mask_BxT=mask)
        np.testing.assert_array_equal(np.asarray(got_cached), np.asarray(want_cached))
    assert np.isfinite(np.asarray(want)).all() and np.abs(np.asarray(want)).max() > 0


@pytest.mark.slow
def test_inner_loop_with_gpu_tuned_attention(llama):
    cfg, params = llama
    rng = np.random.default_rng(1)
    cands = [inner.CandidateData([rng.integers(3, 250, size=n).astype(np.int32) for n in (9, 14)])
             for _ in range(2)]
    ic = inner.InnerConfig(epochs=2, steps_per_chunk=4, length_buckets=(16,))
    plan = inner.build_plan(cands, None, ic, pad_id=2)
    want = inner.train_candidates(params, plan, cfg=cfg, lora_cfg=LORA_CFG, inner_cfg=ic)
    got = inner.train_candidates(params, plan, cfg=cfg.replace(attention_impl="cudnn"),
                                 lora_cfg=LORA_CFG, inner_cfg=ic)
    np.testing.assert_array_equal(got.losses, want.losses)
    for a, b in zip(jax.tree.leaves(got.lora), jax.tree.leaves(want.lora)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not want.failed.any() and (want.steps == 4).all()


@pytest.mark.slow
def test_sampler_with_gpu_tuned_attention(llama):
    cfg, params = llama
    rng = np.random.default_rng(2)
    prompts = [rng.integers(3, cfg.vocab_size, size=n).tolist() for n in (5, 9, 3)]
    sp = sampling.SamplingParams(max_new_tokens=6, stop_ids=())
    want = sampling.generate(params, prompts, cfg=cfg, sampling=sp)
    got = sampling.generate(params, prompts, cfg=cfg.replace(attention_impl="auto"), sampling=sp)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert all(len(w.token_ids) == 6 for w in want)


def test_tpu_defaults_are_tile_multiples():
    default = inner.InnerConfig.length_buckets
    tpu = backends.length_buckets("tpu", default)
    assert all(b % backends.TPU_TILE == 0 for b in tpu) and list(tpu) == sorted(set(tpu))
    assert tpu[-1] == default[-1]  # the longest sequence trained is unchanged
    inner.InnerConfig(length_buckets=tpu)  # a valid inner-loop config
    assert backends.length_buckets("gpu", default) == default
    assert backends.length_buckets("tpu", (16, 64, 1000)) == (128, 256, 384, 512, 768, 1000)
    # Real models are stored and computed in bf16, and their vocabularies are tile multiples.
    for name in ("smollm2-135m", "llama-3.2-1b", "qwen2.5-7b"):
        cfg = PRESETS[name]
        assert cfg.param_dtype == cfg.compute_dtype == "bfloat16"
        assert "vocab_size" not in backends.model_shape_report(cfg)
    assert backends.model_shape_report(PRESETS["qwen2.5-7b"]) == {}


def test_default_length_buckets_follow_the_backend_and_set_ones_are_kept(monkeypatch):
    from seal_jax import backends, experiment
    from seal_jax.config import load_config

    c = load_config(str(REPO / "configs" / "knowledge.py") + ":demo")
    _, on_this = experiment.engine_configs(c)
    assert on_this.length_buckets == inner.InnerConfig().length_buckets  # CPU: the fine default
    monkeypatch.setattr(backends, "current_backend", lambda: "tpu")
    _, on_tpu = experiment.engine_configs(c)
    assert all(b % 128 == 0 for b in on_tpu.length_buckets)
    assert max(on_tpu.length_buckets) == max(inner.InnerConfig().length_buckets)
    c.inner.length_buckets = (64, 4096)
    _, chosen = experiment.engine_configs(c)
    assert chosen.length_buckets == (64, 4096)
