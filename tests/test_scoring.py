"""Completion log-likelihoods: batched/grouped scoring against a per-row direct computation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seal_jax.model import transformer
from seal_jax.model.config import LoraConfig
from seal_jax.model.presets import get_preset
from seal_jax.sampling import SamplingParams, generate
from seal_jax.scoring import score_sequences, sequence_logprobs
from random_lora import random_lora

LORA_CFG = LoraConfig(rank=4, alpha=8.0, targets=("q", "k", "o", "up"))
forward = jax.jit(transformer.forward, static_argnames=("cfg", "lora_cfg"))


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-qwen2"])
def model(request):
    cfg = get_preset(request.param)
    return cfg, transformer.init_params(cfg, jax.random.key(2))


def random_rows(cfg, prompt_lengths, completion_lengths, seed):
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, cfg.vocab_size, size=n).tolist() for n in prompt_lengths]
    completions = [rng.integers(0, cfg.vocab_size, size=n).tolist() for n in completion_lengths]
    return prompts, completions


def direct_logprob(params, prompt, completion, cfg, lora=None, lora_cfg=None):
    """Reference: one unpadded row through `forward`, float64 log-softmax on the host."""
    tokens = list(prompt) + list(completion)
    logits = np.asarray(forward(params, jnp.asarray([tokens], jnp.int32), cfg=cfg,
                                            lora=lora, lora_cfg=lora_cfg)[0], np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    return sum(logp[len(prompt) + i - 1, t] for i, t in enumerate(completion))


def test_matches_direct_computation(model):
    cfg, params = model
    # Row totals 11 and 6 (few reference compiles), split at different points.
    prompts, completions = random_rows(cfg, [3, 10, 1, 11, 2], [8, 1, 10, 0, 4], seed=0)
    scores = score_sequences(params, prompts, completions, cfg=cfg, batch_size=4)
    expected = [direct_logprob(params, p, c, cfg) for p, c in zip(prompts, completions)]
    np.testing.assert_allclose(scores.sum_logprob, expected, rtol=1e-5, atol=1e-4)
    assert scores.num_tokens.tolist() == [8, 1, 10, 0, 4]
    np.testing.assert_allclose(scores.mean_logprob[[0, 1, 2, 4]],
                               scores.sum_logprob[[0, 1, 2, 4]] / np.array([8, 1, 10, 4]))
    assert np.isnan(scores.mean_logprob[3]) and scores.sum_logprob[3] == 0.0
    np.testing.assert_array_equal(
        sequence_logprobs(params, prompts, completions, cfg=cfg, batch_size=4), scores.sum_logprob)


def test_per_row_lora_matches_single_adapter():
    cfg = get_preset("tiny-qwen2")
    params = transformer.init_params(cfg, jax.random.key(5))
    k = 3
    lora = random_lora(cfg, LORA_CFG, k, seed=5)
    prompts, completions = random_rows(cfg, [4, 6, 2, 9, 5, 3], [5, 3, 7, 2, 4, 6], seed=1)
    adapter_index = [1, 2, 0, 1, 0, 2]
    got = sequence_logprobs(params, prompts, completions, cfg=cfg, lora=lora, lora_cfg=LORA_CFG,
                            adapter_index=adapter_index, batch_size=8)
    base = sequence_logprobs(params, prompts, completions, cfg=cfg, batch_size=8)
    assert np.all(np.abs(got - base) > 1e-3), "LoRA changed nothing"
    expected = [
        direct_logprob(params, p, c, cfg, jax.tree.map(lambda x: x[a], lora), LORA_CFG)
        for p, c, a in zip(prompts, completions, adapter_index)
    ]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)


def test_greedy_completion_is_the_most_likely_step_by_step():
    """Tie scoring to sampling: a greedy generation's log-prob equals the sum of per-step maxima."""
    cfg = get_preset("tiny-llama")
    params = transformer.init_params(cfg, jax.random.key(3))
    prompt = [5, 17, 99, 4]
    [gen] = generate(params, [prompt], cfg=cfg,
                     sampling=SamplingParams(max_new_tokens=6, stop_ids=()))
    tokens = prompt + gen.token_ids
    logits = np.asarray(forward(params, jnp.asarray([tokens]), cfg=cfg)[0], np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))  # tiny random model: no overflow
    best = logp[len(prompt) - 1 : -1].max(-1).sum()
    [got] = sequence_logprobs(params, [prompt], [gen.token_ids], cfg=cfg)
    np.testing.assert_allclose(got, best, rtol=1e-5)


def test_bad_input_raises():
    cfg = get_preset("tiny-llama")
    params = transformer.init_params(cfg, jax.random.key(4))
    with pytest.raises(ValueError, match="completions for"):
        sequence_logprobs(params, [[1, 2]], [[3], [4]], cfg=cfg)
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        sequence_logprobs(params, [[]], [[3]], cfg=cfg)
    with pytest.raises(ValueError, match="completion 0 has token id"):
        sequence_logprobs(params, [[1]], [[cfg.vocab_size + 3]], cfg=cfg)


@pytest.mark.slow
def test_embedded_model_prefers_the_right_answer(embedded_model):
    cfg, params, tokenizer = embedded_model
    prompt = tokenizer.encode("The capital of France is")
    answers = [tokenizer.encode(" Paris"), tokenizer.encode(" a banana")]
    scores = score_sequences(params, [prompt, prompt], answers, cfg=cfg)
    assert scores.sum_logprob[0] > scores.sum_logprob[1]
    # Scored in a batch or alone, a row's log-prob is the same.
    [alone] = sequence_logprobs(params, [prompt], [answers[0]], cfg=cfg)
    np.testing.assert_allclose(alone, scores.sum_logprob[0], rtol=1e-4)
