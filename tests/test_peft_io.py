"""PEFT adapter import/export: round trips, key variants, rejected features, and (marked torch)
logit parity with transformers + peft on tiny random Llama and Qwen2 models."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from seal_jax.lora import init_lora, stack_candidates
from seal_jax.model.config import LoraConfig
from seal_jax.model.presets import get_preset
from seal_jax.peft_io import (PeftFormatError, from_peft_tensors, load_peft_adapter, peft_config_dict,
                              save_peft_adapter, save_peft_candidate, save_peft_candidates,
                              to_peft_tensors)

from tolerances import assert_close_scaled, scaled_max_diff

ALL = ("q", "k", "v", "o", "gate", "up", "down")


def _random_lora(cfg, lora_cfg, seed):
    """An adapter with non-zero A and B (a fresh init_lora has B = 0, which would hide B bugs)."""
    lora = init_lora(cfg, lora_cfg, jax.random.PRNGKey(seed))
    rng = np.random.default_rng(seed)
    return {t: {"a": ab["a"], "b": jnp.asarray(rng.normal(0, 0.1, ab["b"].shape), jnp.float32)}
            for t, ab in lora.items()}


def _assert_lora_equal(got, want):
    assert set(got) == set(want)
    for t in want:
        for ab in ("a", "b"):
            assert got[t][ab].dtype == jnp.float32
            np.testing.assert_array_equal(np.asarray(got[t][ab]), np.asarray(want[t][ab]))


@pytest.mark.parametrize("preset,targets", [("tiny-llama", ("q", "v")), ("tiny-qwen2", ALL)])
def test_roundtrip_and_file_layout(tmp_path, preset, targets):
    cfg = get_preset(preset)
    lora_cfg = LoraConfig(rank=4, alpha=8.0, targets=targets, dropout=0.05)
    lora = _random_lora(cfg, lora_cfg, 0)
    save_peft_adapter(tmp_path, lora, cfg, lora_cfg, base_model_name_or_path="org/base")

    conf = json.loads((tmp_path / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and conf["task_type"] == "CAUSAL_LM"
    assert conf["r"] == 4 and conf["lora_alpha"] == 8 and conf["lora_dropout"] == 0.05
    assert conf["bias"] == "none" and conf["fan_in_fan_out"] is False
    assert conf["base_model_name_or_path"] == "org/base"
    hf = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj",
          "up": "up_proj", "down": "down_proj"}
    assert conf["target_modules"] == sorted(hf[t] for t in targets)

    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert len(tensors) == 2 * len(targets) * cfg.num_layers
    fan_in, fan_out = cfg.projection_shape(targets[-1])
    group = "mlp" if targets[-1] in ("gate", "up", "down") else "self_attn"
    stem = f"base_model.model.model.layers.1.{group}.{hf[targets[-1]]}"
    a = tensors[f"{stem}.lora_A.weight"]
    b = tensors[f"{stem}.lora_B.weight"]
    assert a.shape == (4, fan_in) and b.shape == (fan_out, 4)
    np.testing.assert_array_equal(a, np.asarray(lora[targets[-1]]["a"][1]).T)
    np.testing.assert_array_equal(b, np.asarray(lora[targets[-1]]["b"][1]).T)

    loaded, loaded_cfg = load_peft_adapter(tmp_path, cfg)
    assert loaded_cfg == lora_cfg
    _assert_lora_equal(loaded, lora)


def test_candidate_export(tmp_path):
    cfg = get_preset("tiny-llama")
    lora_cfg = LoraConfig(rank=2, alpha=4.0, targets=("q", "down"))
    loras = [_random_lora(cfg, lora_cfg, s) for s in (1, 2, 3)]
    stacked = stack_candidates(loras)
    with pytest.raises(ValueError, match="leading candidate axis"):
        save_peft_adapter(tmp_path / "x", stacked, cfg, lora_cfg)
    with pytest.raises(IndexError, match="K=3"):
        save_peft_candidate(tmp_path / "x", stacked, 3, cfg, lora_cfg)
    d = save_peft_candidate(tmp_path / "best", stacked, 1, cfg, lora_cfg)
    _assert_lora_equal(load_peft_adapter(d, cfg)[0], loras[1])
    dirs = save_peft_candidates(tmp_path / "all", stacked, cfg, lora_cfg, indices=[2, 0])
    assert [p.name for p in dirs] == ["candidate_2", "candidate_0"]
    _assert_lora_equal(load_peft_adapter(dirs[0], cfg)[0], loras[2])
    _assert_lora_equal(load_peft_adapter(dirs[1], cfg)[0], loras[0])


def test_key_variants_and_dtypes(tmp_path):
    """A live model's state_dict carries `.default`; PEFT may store bf16; other prefixes occur."""
    cfg = get_preset("tiny-qwen2")
    lora_cfg = LoraConfig(rank=4, alpha=16.0, targets=("k", "up"))
    lora = _random_lora(cfg, lora_cfg, 5)
    tensors = to_peft_tensors(lora, cfg, lora_cfg)
    conf = peft_config_dict(lora_cfg)

    with_default = {k.replace(".weight", ".default.weight"): v for k, v in tensors.items()}
    _assert_lora_equal(from_peft_tensors(with_default, cfg, conf)[0], lora)
    short = {k.replace("base_model.model.", ""): v for k, v in tensors.items()}
    _assert_lora_equal(from_peft_tensors(short, cfg, conf)[0], lora)

    # bf16 on disk (written through jax, since numpy has no bfloat16) loads as float32.
    from safetensors.flax import save_file as save_flax
    save_flax({k: jnp.asarray(v, jnp.bfloat16) for k, v in tensors.items()},
              str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps(conf))
    got, _ = load_peft_adapter(tmp_path, cfg)
    for t in lora_cfg.targets:
        want = np.asarray(jnp.asarray(lora[t]["b"], jnp.bfloat16).astype(jnp.float32))
        assert got[t]["b"].dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(got[t]["b"]), want)


def test_rslora_and_layers_to_transform():
    cfg = get_preset("tiny-llama")
    lora_cfg = LoraConfig(rank=4, alpha=8.0, targets=("v",))
    lora = _random_lora(cfg, lora_cfg, 7)
    tensors = to_peft_tensors(lora, cfg, lora_cfg)

    conf = dict(peft_config_dict(lora_cfg), use_rslora=True)
    _, rs_cfg = from_peft_tensors(tensors, cfg, conf)
    assert math.isclose(rs_cfg.scale, 8.0 / math.sqrt(4))

    # Only layer 1 adapted: layer 0 must come back as an exact no-op (B = 0).
    only1 = {k: v for k, v in tensors.items() if ".layers.1." in k}
    got, _ = from_peft_tensors(only1, cfg, dict(peft_config_dict(lora_cfg), layers_to_transform=[1]))
    np.testing.assert_array_equal(np.asarray(got["v"]["b"][0]), 0.0)
    np.testing.assert_array_equal(np.asarray(got["v"]["b"][1]), np.asarray(lora["v"]["b"][1]))
    with pytest.raises(PeftFormatError, match=r"missing tensor .*layers\.0\.self_attn\.v_proj\.lora_A"):
        from_peft_tensors(only1, cfg, peft_config_dict(lora_cfg))


@pytest.mark.parametrize("change,match", [
    ({"use_dora": True}, "use_dora"),
    ({"rank_pattern": {"q_proj": 8}}, "rank_pattern"),
    ({"alpha_pattern": {"q_proj": 8}}, "alpha_pattern"),
    ({"bias": "lora_only"}, "bias='lora_only'"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"peft_type": "IA3"}, "not LORA"),
    ({"task_type": "SEQ_CLS"}, "SEQ_CLS"),
    ({"target_modules": ["q_proj", "lm_head"]}, "'lm_head' is not supported"),
    ({"target_modules": ["q_proj", "v_proj", "k_proj"]}, "declares"),
])
def test_rejects_unsupported_configs(change, match):
    cfg = get_preset("tiny-llama")
    lora_cfg = LoraConfig(rank=2, alpha=2.0, targets=("q", "v"))
    tensors = to_peft_tensors(_random_lora(cfg, lora_cfg, 0), cfg, lora_cfg)
    with pytest.raises(PeftFormatError, match=match):
        from_peft_tensors(tensors, cfg, dict(peft_config_dict(lora_cfg), **change))


def test_rejects_bad_tensors(tmp_path):
    cfg = get_preset("tiny-llama")
    lora_cfg = LoraConfig(rank=2, alpha=2.0, targets=("q",))
    lora = _random_lora(cfg, lora_cfg, 0)
    tensors = to_peft_tensors(lora, cfg, lora_cfg)
    conf = peft_config_dict(lora_cfg)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"

    wrong_shape = dict(tensors, **{key: np.zeros((64, 3), np.float32)})
    with pytest.raises(PeftFormatError, match=r"layers\.0\.self_attn\.q_proj\.lora_B\.weight.*\[64, 3\]"):
        from_peft_tensors(wrong_shape, cfg, conf)
    extra = dict(tensors, **{"base_model.model.lm_head.lora_A.weight": np.zeros((2, 64), np.float32)})
    with pytest.raises(PeftFormatError, match="unsupported tensor 'base_model.model.lm_head"):
        from_peft_tensors(extra, cfg, conf)
    deeper = dict(tensors, **{key.replace("layers.0", "layers.5"): np.zeros((64, 2), np.float32)})
    with pytest.raises(PeftFormatError, match="layer 5"):
        from_peft_tensors(deeper, cfg, conf)
    dup = dict(tensors, **{key.replace(".weight", ".default.weight"): tensors[key]})
    with pytest.raises(PeftFormatError, match="same weight"):
        from_peft_tensors(dup, cfg, conf)

    bad = {t: {"a": ab["a"], "b": ab["b"].at[0, 0, 0].set(jnp.nan)} for t, ab in lora.items()}
    with pytest.raises(ValueError, match="non-finite"):
        save_peft_adapter(tmp_path / "nan", bad, cfg, lora_cfg)
    with pytest.raises(ValueError, match="q.a has shape"):
        save_peft_adapter(tmp_path / "shape", {"q": {"a": lora["q"]["a"][:, :5], "b": lora["q"]["b"]}},
                          cfg, lora_cfg)

    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "adapter_config.json").write_text(json.dumps(conf))
    (tmp_path / "bin" / "adapter_model.bin").write_bytes(b"")
    with pytest.raises(PeftFormatError, match="safe_serialization"):
        load_peft_adapter(tmp_path / "bin", cfg)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_peft_adapter(tmp_path / "nothing", cfg)


# --- parity with transformers + peft ----------------------------------------------------------------

HF_TARGETS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj",
              "up": "up_proj", "down": "down_proj"}


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-qwen2"])
def hf_checkpoint(request, tmp_path_factory):
    """(dir, cfg, params): a tiny random fp32 transformers model saved with save_pretrained and read
    back through seal_jax.model.hf."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from seal_jax.model.hf import load_hf_checkpoint

    preset = get_preset(request.param)
    common = dict(
        vocab_size=preset.vocab_size, hidden_size=preset.hidden_size,
        intermediate_size=preset.intermediate_size, num_hidden_layers=preset.num_layers,
        num_attention_heads=preset.num_heads, num_key_value_heads=preset.num_kv_heads,
        head_dim=preset.head_dim, rope_theta=preset.rope_theta, rms_norm_eps=preset.rms_norm_eps,
        tie_word_embeddings=preset.tie_word_embeddings,
        max_position_embeddings=preset.max_position_embeddings,
    )
    if preset.architecture == "llama":
        hf_cfg, cls = transformers.LlamaConfig(**common), transformers.LlamaForCausalLM
    else:
        hf_cfg, cls = transformers.Qwen2Config(**common), transformers.Qwen2ForCausalLM
    torch.manual_seed(0)
    model = cls(hf_cfg).float().eval()
    with torch.no_grad():  # HF initialises biases and norms to constants; make them informative
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    cfg, params = load_hf_checkpoint(path)
    cfg = cfg.replace(param_dtype="float32", compute_dtype="float32")
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    return path, cfg, params


def _fresh_hf_model(path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype="float32").eval()


def _tokens(cfg):
    return np.random.default_rng(0).integers(0, cfg.vocab_size, size=(2, 11)).astype(np.int64)


def _assert_logits_close(got, want):
    # ~1e-5 of the largest logit: torch and XLA sum in different orders
    assert_close_scaled(got, want, eps_multiple=84, what="logits vs PEFT")


@pytest.mark.torch
@pytest.mark.parametrize("targets,use_rslora", [(("q", "v"), False), (ALL, True)])
def test_import_matches_peft_forward(hf_checkpoint, tmp_path, targets, use_rslora):
    import peft
    import torch

    from seal_jax.model.transformer import forward

    path, cfg, params = hf_checkpoint
    peft_model = peft.get_peft_model(_fresh_hf_model(path), peft.LoraConfig(
        r=4, lora_alpha=12, lora_dropout=0.0, use_rslora=use_rslora, task_type="CAUSAL_LM",
        target_modules=[HF_TARGETS[t] for t in targets], init_lora_weights=True)).eval()
    torch.manual_seed(1)
    with torch.no_grad():  # PEFT initialises B = 0: make the adapter actually change the output
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2)
    peft_model.save_pretrained(tmp_path)

    lora, lora_cfg = load_peft_adapter(tmp_path, cfg)
    assert lora_cfg.targets == targets and lora_cfg.rank == 4
    assert math.isclose(lora_cfg.scale, 12 / (math.sqrt(4) if use_rslora else 4))
    tokens = _tokens(cfg)
    with torch.no_grad():
        want = peft_model(torch.from_numpy(tokens)).logits.numpy()
        base = peft_model.get_base_model()
        with peft_model.disable_adapter():
            base_logits = base(torch.from_numpy(tokens)).logits.numpy()
    assert scaled_max_diff(want, base_logits) > 1e-2, "test adapter must change the logits"
    got = forward(params, jnp.asarray(tokens, jnp.int32), cfg=cfg, lora=lora, lora_cfg=lora_cfg)
    _assert_logits_close(got, want)


@pytest.mark.torch
def test_export_loads_in_peft(hf_checkpoint, tmp_path):
    import peft
    import torch

    from seal_jax.model.transformer import forward

    path, cfg, params = hf_checkpoint
    lora_cfg = LoraConfig(rank=4, alpha=8.0, targets=("q", "k", "o", "up", "down"))
    lora = _random_lora(cfg, lora_cfg, 3)
    save_peft_adapter(tmp_path, lora, cfg, lora_cfg, base_model_name_or_path=str(path))

    peft_model = peft.PeftModel.from_pretrained(_fresh_hf_model(path), tmp_path).eval()
    tokens = _tokens(cfg)
    with torch.no_grad():
        want = peft_model(torch.from_numpy(tokens)).logits.numpy()
    got = forward(params, jnp.asarray(tokens, jnp.int32), cfg=cfg, lora=lora, lora_cfg=lora_cfg)
    no_lora = forward(params, jnp.asarray(tokens, jnp.int32), cfg=cfg)
    assert scaled_max_diff(got, no_lora) > 1e-2, "adapter must matter"
    _assert_logits_close(got, want)
