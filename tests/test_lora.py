"""LoRA pytree: PEFT-style init, merging into the base, candidate stacking, logical axes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seal_jax import lora as lora_lib
from seal_jax.model import transformer
from seal_jax.model.config import LORA_TARGETS, LoraConfig
from seal_jax.model.presets import get_preset

ALL = LoraConfig(rank=4, alpha=8.0, targets=LORA_TARGETS)


@pytest.fixture(scope="module")
def qwen():
    cfg = get_preset("tiny-qwen2")
    return cfg, transformer.init_params(cfg, jax.random.PRNGKey(0))


def test_init_matches_peft_kaiming_uniform_bounds():
    cfg = get_preset("tiny-llama")
    lora = lora_lib.init_lora(cfg, ALL, jax.random.PRNGKey(1))
    for target in ALL.targets:
        fan_in, fan_out = cfg.projection_shape(target)
        a, b = lora[target]["a"], lora[target]["b"]
        assert a.shape == (cfg.num_layers, fan_in, ALL.rank) and a.dtype == jnp.float32
        assert b.shape == (cfg.num_layers, ALL.rank, fan_out) and b.dtype == jnp.float32
        assert not np.any(np.asarray(b))
        bound = 1.0 / np.sqrt(fan_in)
        a = np.asarray(a)
        assert np.abs(a).max() <= bound
        assert np.abs(a).max() > 0.9 * bound  # uniform over the whole interval, not a narrower one
        assert abs(a.mean()) < 0.1 * bound


@pytest.mark.torch
def test_init_bound_equals_torch_kaiming_uniform_a_sqrt5():
    torch = pytest.importorskip("torch")
    fan_in = 64
    w = torch.empty(4, fan_in)  # PEFT's lora_A.weight is [r, in]
    torch.nn.init.kaiming_uniform_(w, a=np.sqrt(5))
    torch_bound = np.sqrt(6.0 / ((1 + 5) * fan_in))  # gain * sqrt(3 / fan_in), gain = sqrt(2/(1+a^2))
    assert np.isclose(torch_bound, 1 / np.sqrt(fan_in))
    assert w.abs().max().item() <= torch_bound


def test_candidate_axis_uses_independent_split_keys():
    cfg = get_preset("tiny-llama")
    lc = LoraConfig(rank=4, alpha=8.0)
    rng = jax.random.PRNGKey(3)
    stacked = lora_lib.init_lora(cfg, lc, rng, num_candidates=3)
    keys = jax.random.split(rng, 3)
    for k in range(3):
        single = lora_lib.init_lora(cfg, lc, keys[k])
        jax.tree.map(np.testing.assert_array_equal, lora_lib.candidate(stacked, k), single)
    assert not np.allclose(stacked["q"]["a"][0], stacked["q"]["a"][1])
    by_seed = lora_lib.init_lora_from_seeds(cfg, lc, [5, 9])
    jax.tree.map(np.testing.assert_array_equal, lora_lib.candidate(by_seed, 1),
                 lora_lib.init_lora(cfg, lc, jax.random.PRNGKey(9)))


def test_stack_unstack_roundtrip():
    cfg = get_preset("tiny-llama")
    lc = LoraConfig(rank=2, alpha=4.0)
    loras = [lora_lib.init_lora(cfg, lc, jax.random.PRNGKey(i)) for i in range(3)]
    stacked = lora_lib.stack_candidates(loras)
    assert lora_lib.num_candidates(stacked) == 3
    lora_lib.check_lora(stacked, cfg, lc, candidate_axis=True)
    for a, b in zip(lora_lib.unstack_candidates(stacked), loras):
        jax.tree.map(np.testing.assert_array_equal, a, b)


def _nonzero_lora(cfg, lc, seed):
    lora = lora_lib.init_lora(cfg, lc, jax.random.PRNGKey(seed))
    rng = np.random.default_rng(seed)
    return {t: {"a": ab["a"], "b": jnp.asarray(0.05 * rng.standard_normal(ab["b"].shape), jnp.float32)}
            for t, ab in lora.items()}


def test_merge_equals_forward_with_adapter(qwen):
    cfg, params = qwen
    lora = _nonzero_lora(cfg, ALL, 0)
    tokens = jax.random.randint(jax.random.PRNGKey(5), (2, 12), 0, cfg.vocab_size)
    fwd = jax.jit(lambda p, lora: transformer.forward(p, tokens, cfg=cfg, lora=lora,
                                                      lora_cfg=None if lora is None else ALL))
    with_adapter = fwd(params, lora)
    merged = lora_lib.merge_lora(params, lora, cfg, ALL)
    from_merged = fwd(merged, None)
    base = fwd(params, None)
    assert float(jnp.abs(with_adapter - base).max()) > 1e-2  # the adapter really changes the output
    np.testing.assert_allclose(from_merged, with_adapter, atol=2e-5, rtol=1e-5)
    # Untargeted leaves are untouched and the input tree is not mutated.
    np.testing.assert_array_equal(merged["embed"]["embedding"], params["embed"]["embedding"])
    assert float(jnp.abs(merged["layers"]["attn"]["q"]["kernel"]
                         - params["layers"]["attn"]["q"]["kernel"]).max()) > 0


def test_merge_math_and_dtype_in_bf16(qwen):
    cfg, params = qwen
    params16 = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
    lc = LoraConfig(rank=4, alpha=16.0, targets=("v", "down"))
    lora = _nonzero_lora(cfg, lc, 1)
    merged = lora_lib.merge_lora(params16, lora, cfg, lc)
    w = params16["layers"]["mlp"]["down"]["kernel"]
    got = merged["layers"]["mlp"]["down"]["kernel"]
    assert got.dtype == jnp.bfloat16
    want = (np.asarray(w, np.float32) + 4.0 * np.einsum(
        "lir,lro->lio", np.asarray(lora["down"]["a"]), np.asarray(lora["down"]["b"])))
    # Exactly one rounding to bf16 of the fp32 sum (up to fp32 summation order: 1 bf16 ulp).
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=2 ** -8, atol=1e-8)
    assert np.mean(np.asarray(got) == want.astype(jnp.bfloat16)) > 0.999


def test_bad_shapes_are_named():
    cfg = get_preset("tiny-llama")
    lc = LoraConfig(rank=4, alpha=8.0)
    lora = lora_lib.init_lora(cfg, lc, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="targets"):
        lora_lib.check_lora({"q": lora["q"]}, cfg, lc, candidate_axis=False)
    bad = {**lora, "v": {"a": lora["v"]["a"][:, :3], "b": lora["v"]["b"]}}
    with pytest.raises(ValueError, match="v.a"):
        lora_lib.merge_lora({"layers": {}}, bad, cfg, lc)
    with pytest.raises(ValueError, match=r"\[K\]"):
        lora_lib.check_lora(lora, cfg, lc, candidate_axis=True)


def test_logical_axes_mirror_the_tree():
    cfg = get_preset("tiny-llama")
    lora = lora_lib.init_lora(cfg, ALL, jax.random.PRNGKey(0), num_candidates=2)
    axes = lora_lib.lora_logical_axes(cfg, ALL)
    leaves = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))
    assert jax.tree.structure(lora) == jax.tree.structure(
        jax.tree.map(lambda _: 0, axes, is_leaf=lambda x: isinstance(x, tuple)))
    for x, ax in zip(jax.tree.leaves(lora), leaves):
        assert len(ax) == x.ndim and ax[0] == "candidate"
    assert lora_lib.lora_num_params(cfg, ALL) == sum(x[0].size for x in jax.tree.leaves(lora))
