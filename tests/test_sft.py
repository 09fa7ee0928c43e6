"""ReST-EM M-step: completion-only weighted SFT through the inner-loop machinery, merged or full."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seal_jax import sft
from seal_jax.model import transformer
from seal_jax.model.config import LORA_TARGETS, LoraConfig
from seal_jax.model.presets import get_preset

CFG = get_preset("tiny-llama")
EOS = 2
SFT = sft.SFTConfig.from_fields(lora=LoraConfig(rank=4, alpha=8.0, targets=LORA_TARGETS),
                                learning_rate=1e-2, epochs=3, batch_size=2, microbatches=2,
                                length_buckets=(64,), steps_per_chunk=8)


@pytest.fixture(scope="module")
def params():
    p = transformer.init_params(CFG, jax.random.PRNGKey(0))
    # Random tiny weights give near-uniform logits; larger embeddings let a few steps move them.
    return {**p, "embed": {"embedding": p["embed"]["embedding"] * 10}}


def _examples(seed=0, n=4):
    rng = np.random.default_rng(seed)
    return [(rng.integers(3, 256, size=int(rng.integers(5, 15))),
             rng.integers(3, 256, size=int(rng.integers(5, 20))), 1.0) for _ in range(n)]


@jax.jit
def _completion_logprob(params, tokens_64, target_64):
    tokens = tokens_64[None]
    logits = transformer.forward(params, tokens, cfg=CFG)[0, :-1]
    logp = jax.nn.log_softmax(logits, -1)
    picked = jnp.take_along_axis(logp, tokens[0, 1:, None], -1)[:, 0]
    return jnp.sum(picked * target_64[1:])


def _mean_logprob(params, examples):
    total = 0.0
    for prompt, completion, _ in examples:
        seq = np.r_[prompt, completion, EOS]
        tokens = np.full(64, EOS, np.int32)
        tokens[: len(seq)] = seq
        target = np.zeros(64, np.float32)
        target[len(prompt): len(seq)] = 1
        total += float(_completion_logprob(params, tokens, target))
    return total / len(examples)


def test_config_holds_inner_config_and_names_unknown_fields():
    assert SFT.inner.batch_size == 2 and SFT.inner.learning_rate == 1e-2
    assert sft.SFTConfig().inner == sft.SFT_INNER and sft.SFT_INNER.learning_rate == 3e-4
    with pytest.raises(ValueError, match="learning_rat"):
        sft.SFTConfig.from_fields(learning_rat=1e-3)


def test_candidate_masks_prompt_and_appends_eos():
    examples = [([5, 6, 7], [8, 9], 1.0), ([5], [10], 0.0), ([4, 4], [11, 12, 13], 0.5)]
    cand, kept = sft.build_sft_candidate(examples, eos_id=EOS)
    assert kept == [0, 2]
    np.testing.assert_array_equal(cand.sequences[0], [5, 6, 7, 8, 9, EOS])
    np.testing.assert_array_equal(cand.loss_masks[0], [0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(cand.loss_masks[1], [0, 0, 0.5, 0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="example 0: weight"):
        sft.build_sft_candidate([([1], [2], -1.0)], eos_id=EOS)
    with pytest.raises(ValueError, match="longer than the largest length bucket"):
        sft.build_sft_candidate([(np.ones(100), [2], 1.0)], eos_id=EOS, max_length=64)
    with pytest.raises(ValueError, match="3 fields|fields"):
        sft.build_sft_candidate([([1], [2])], eos_id=EOS)


def test_lora_sft_raises_completion_likelihood_and_ignores_weight_zero(params):
    examples = _examples(0)
    before = _mean_logprob(params, examples)
    new_params, metrics = sft.sft_update(params, examples, cfg=CFG, sft_cfg=SFT, eos_id=EOS)
    after = _mean_logprob(new_params, examples)
    assert metrics["steps"] == 3 * 2 and not metrics["failed"] and metrics["examples_used"] == 4
    assert after > before + 1.0, (before, after)
    assert metrics["losses"][-1] < metrics["losses"][0]
    # Only the LoRA targets changed (merged), embeddings and norms untouched; input not mutated.
    np.testing.assert_array_equal(new_params["embed"]["embedding"], params["embed"]["embedding"])
    assert not np.array_equal(new_params["layers"]["mlp"]["up"]["kernel"],
                              params["layers"]["mlp"]["up"]["kernel"])
    # Weight-0 examples (here: unrelated data interleaved) change nothing at all.
    noise = [(p, c, 0.0) for p, c, _ in _examples(1, 3)]
    mixed = [noise[0], examples[0], examples[1], noise[1], examples[2], examples[3], noise[2]]
    mixed_params, mixed_metrics = sft.sft_update(params, mixed, cfg=CFG, sft_cfg=SFT, eos_id=EOS)
    assert mixed_metrics["examples_used"] == 4
    jax.tree.map(np.testing.assert_array_equal, mixed_params, new_params)
    # Only weight-0 examples: nothing to train on, the params come back unchanged.
    same, m = sft.sft_update(params, noise, cfg=CFG, sft_cfg=SFT, eos_id=EOS)
    assert same is params and m["steps"] == 0


def test_full_finetune_option(params):
    examples = _examples(2)
    cfg = sft.SFTConfig(lora=None, inner=SFT.inner.replace(learning_rate=3e-3), seed=SFT.seed)
    before = _mean_logprob(params, examples)
    new_params, metrics = sft.sft_update(params, examples, cfg=CFG, sft_cfg=cfg, eos_id=EOS)
    assert metrics["steps"] == 6 and not metrics["failed"]
    assert _mean_logprob(new_params, examples) > before + 1.0
    assert jax.tree.structure(new_params) == jax.tree.structure(params)
    for new, old in zip(jax.tree.leaves(new_params), jax.tree.leaves(params)):
        assert new.shape == old.shape and new.dtype == old.dtype
    # Full fine-tuning also moves the embeddings (LoRA never does).
    assert not np.array_equal(new_params["embed"]["embedding"], params["embed"]["embedding"])
