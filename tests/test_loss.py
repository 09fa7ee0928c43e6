"""The chunked next-token loss equals the plain one (values and gradients), in fp32 and bf16."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seal_jax import loss
from seal_jax.model import transformer
from seal_jax.model.config import LoraConfig
from seal_jax.model.presets import get_preset
from random_lora import random_lora
from tolerances import assert_close_scaled

LC = LoraConfig(rank=4, alpha=8.0, targets=("q", "v", "down"))


def _setup(dtype):
    cfg = get_preset("tiny-llama").replace(param_dtype=dtype, compute_dtype=dtype)
    params = transformer.init_params(cfg, jax.random.PRNGKey(0))
    # Larger embeddings: peaked logits, so the loss and its gradient are not near-uniform noise.
    params = {**params, "embed": {"embedding": params["embed"]["embedding"] * 10}}
    lora = jax.tree.map(lambda a: a[0] * 0.1, random_lora(cfg, LC, 1, seed=3))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (3, 24), 3, cfg.vocab_size)
    segments = (jnp.arange(24)[None] < jnp.array([24, 17, 9])[:, None]).astype(jnp.int32)
    weights = segments[:, 1:].astype(jnp.float32)
    return cfg, params, lora, tokens, segments, weights


# bf16: the head matmul's output is rounded to bf16 before the upcast in both paths, and a matmul of
# another shape may round a logit the other way: one bf16 ulp is 2**15 float32 eps.
@pytest.mark.parametrize("dtype,eps_multiple", [
    ("float32", 64), pytest.param("bfloat16", 2 ** 16, marks=pytest.mark.slow)])
def test_chunked_loss_matches_plain_values_and_gradients(dtype, eps_multiple):
    cfg, params, lora, tokens, segments, weights = _setup(dtype)

    def objective(lora, params, chunk):
        nll = loss.next_token_nll(params, tokens, cfg=cfg, lora=lora, lora_cfg=LC,
                                  segment_ids_BxT=segments, chunk_tokens=chunk)
        return jnp.sum(weights * nll), nll

    # 7 does not divide the 3 * 23 target positions: the padded last chunk is exercised too.
    grad = jax.jit(jax.grad(objective, argnums=(0, 1), has_aux=True), static_argnums=2)
    (g_lora_plain, g_params_plain), nll_plain = grad(lora, params, None)
    (g_lora, g_params), nll = grad(lora, params, 7)
    assert nll.shape == (3, 23)
    assert_close_scaled(nll, nll_plain, eps_multiple=eps_multiple, what="nll")
    for got, want in zip(jax.tree.leaves(g_lora), jax.tree.leaves(g_lora_plain)):
        assert_close_scaled(np.asarray(got, np.float32), np.asarray(want, np.float32),
                            eps_multiple=eps_multiple * 4, what="lora grad")
    # The head / embedding gradient is accumulated over chunks (full fine-tuning path).
    for got, want in zip(jax.tree.leaves(g_params), jax.tree.leaves(g_params_plain)):
        assert_close_scaled(np.asarray(got, np.float32), np.asarray(want, np.float32),
                            eps_multiple=eps_multiple * 4, what="param grad")


def test_hidden_states_times_head_are_the_logits():
    cfg, params, lora, tokens, segments, _ = _setup("float32")
    logits = transformer.forward(params, tokens, cfg=cfg, lora=lora, lora_cfg=LC,
                                 segment_ids_BxT=segments)
    hidden = transformer.forward_hidden(params, tokens, cfg=cfg, lora=lora, lora_cfg=LC,
                                        segment_ids_BxT=segments)
    assert hidden.shape == (*tokens.shape, cfg.hidden_size)
    assert_close_scaled(jnp.einsum("btd,dv->btv", hidden, transformer.lm_head(params, cfg)), logits,
                        eps_multiple=16, what="logits")
