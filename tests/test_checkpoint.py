"""Checkpoint import/export: HF safetensors (parity with transformers), GGUF, load_model, bad input."""
import json
import shutil

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seal_jax.model import transformer as T
from seal_jax.model.gguf import load_gguf
from seal_jax.model.hf import CheckpointError, load_hf_checkpoint, save_hf_checkpoint
from seal_jax.model.loading import load_model
from seal_jax.model.presets import get_preset

from tolerances import assert_close_scaled

fwd = jax.jit(T.forward, static_argnames=("cfg", "lora_cfg"))


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    cfg = get_preset("tiny-qwen2")
    params = T.init_params(cfg, jax.random.key(0))
    path = save_hf_checkpoint(tmp_path_factory.mktemp("qwen") / "ckpt", cfg, params)
    return cfg, params, path


# ----------------------------------------------------------------------------------------------------
# Fast: our own save/load, GGUF written with the gguf package, bad input


def test_hf_save_load_round_trip(qwen_dir):
    cfg, params, path = qwen_dir
    cfg2, params2 = load_hf_checkpoint(path)
    assert cfg2 == cfg
    assert_trees_equal(params, params2)
    cfg3, params3, tok = load_model(str(path), param_dtype="bfloat16")
    assert tok is None and cfg3.param_dtype == "bfloat16"
    assert params3["layers"]["attn"]["q"]["kernel"].dtype == jnp.bfloat16


def _permute_like_llama_cpp(w_OxI, n_heads):
    return (w_OxI.reshape(n_heads, 2, w_OxI.shape[0] // n_heads // 2, *w_OxI.shape[1:])
            .swapaxes(1, 2).reshape(w_OxI.shape))


def write_tiny_gguf(path, cfg, params):
    """A llama GGUF as llama.cpp's converter writes it: permuted q/k, a Q8_0 embedding, Q4_1 q in
    layer 0, F32 for the rest. Returns the params the file should load as (quantization applied)."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(cfg.num_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_heads)
    writer.add_head_count_kv(cfg.num_kv_heads)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    expected = jax.tree.map(np.array, params)

    def quantized(w, qtype):
        raw = gguf.quants.quantize(w, qtype)
        return raw, gguf.quants.dequantize(raw, qtype).reshape(w.shape)

    raw, deq = quantized(np.asarray(params["embed"]["embedding"]), gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("token_embd.weight", raw, raw_shape=raw.shape,
                      raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    expected["embed"]["embedding"] = deq
    writer.add_tensor("output_norm.weight", np.asarray(params["final_norm"]["scale"]))
    names = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output", "gate": "ffn_gate",
             "up": "ffn_up", "down": "ffn_down"}
    layers = params["layers"]
    for i in range(cfg.num_layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.asarray(layers["attn_norm"]["scale"][i]))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.asarray(layers["mlp_norm"]["scale"][i]))
        for target, (group, name) in T.PROJECTION_PATHS.items():
            w_OxI = np.asarray(layers[group][name]["kernel"][i]).T.copy()
            if target in ("q", "k"):
                heads = cfg.num_heads if target == "q" else cfg.num_kv_heads
                w_OxI = _permute_like_llama_cpp(w_OxI, heads)
            if target == "q" and i == 0:
                raw, deq = quantized(w_OxI, gguf.GGMLQuantizationType.Q4_1)
                writer.add_tensor(f"blk.{i}.{names[target]}.weight", raw, raw_shape=raw.shape,
                                  raw_dtype=gguf.GGMLQuantizationType.Q4_1)
                # Quantization blocks run along rows, so un-permuting commutes with it.
                expected["layers"][group][name]["kernel"][i] = _unpermute(deq, heads).T
            else:
                writer.add_tensor(f"blk.{i}.{names[target]}.weight", w_OxI)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


def _unpermute(w, heads):
    out = w.shape[0]
    return w.reshape(heads, out // heads // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    cfg = get_preset("tiny-llama")
    params = T.init_params(cfg, jax.random.key(1))
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    expected = write_tiny_gguf(path, cfg, params)
    return cfg, params, expected, path


def test_gguf_load_unpermutes_and_dequantizes(tiny_gguf):
    cfg, params, expected, path = tiny_gguf
    cfg2, loaded, meta = load_gguf(path)
    assert cfg2.replace(max_position_embeddings=cfg.max_position_embeddings, eos_token_id=2,
                        pad_token_id=2, rms_norm_eps=cfg.rms_norm_eps) == cfg
    assert meta.get("general.architecture") == "llama"
    for x, y in zip(jax.tree.leaves(loaded), jax.tree.leaves(expected)):
        assert_close_scaled(x, y, eps_multiple=8, what="dequantized")
    # Unquantized q/k of layer 1 came back exactly: the permutation was undone, not just reshaped.
    np.testing.assert_array_equal(loaded["layers"]["attn"]["k"]["kernel"][1],
                                  params["layers"]["attn"]["k"]["kernel"][1])
    tokens = jnp.arange(12)[None] % cfg.vocab_size
    rel = (jnp.linalg.norm(fwd(loaded, tokens, cfg=cfg) - fwd(params, tokens, cfg=cfg))
           / jnp.linalg.norm(fwd(params, tokens, cfg=cfg)))
    assert rel < 0.05  # only quantization noise


def test_missing_paths_are_named(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(CheckpointError, match="nope"):
        load_model(str(missing))
    with pytest.raises(CheckpointError, match="nope.gguf"):
        load_model(str(tmp_path / "nope.gguf"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(str(empty))


def test_unsupported_architecture_is_named(qwen_dir, tmp_path):
    _, _, path = qwen_dir
    bad = shutil.copytree(path, tmp_path / "gpt2")
    config = json.loads((bad / "config.json").read_text())
    config.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="GPT2LMHeadModel"):
        load_model(str(bad))


def test_config_weight_shape_mismatch_names_tensor_and_shapes(qwen_dir, tmp_path):
    cfg, _, path = qwen_dir
    bad = shutil.copytree(path, tmp_path / "edited")
    config = json.loads((bad / "config.json").read_text())
    config["hidden_size"] = 80
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as err:
        load_model(str(bad))
    message = str(err.value)
    assert "model.embed_tokens.weight" in message
    assert f"({cfg.vocab_size}, 64)" in message and f"({cfg.vocab_size}, 80)" in message


def test_missing_tensor_is_named(qwen_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

    _, _, path = qwen_dir
    bad = shutil.copytree(path, tmp_path / "missing")
    tensors = load_file(str(bad / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(str(bad))


@pytest.mark.parametrize("keep_fraction", [0.0, 0.05, 0.6])
def test_corrupt_or_truncated_gguf_is_named(tiny_gguf, tmp_path, keep_fraction):
    _, _, _, path = tiny_gguf
    data = path.read_bytes()
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(data[:int(len(data) * keep_fraction)] if keep_fraction else b"not a gguf file")
    with pytest.raises(CheckpointError, match="broken.gguf"):
        load_model(str(bad))


# ----------------------------------------------------------------------------------------------------
# Parity with transformers


def _hf_model(kind):
    import torch
    import transformers

    torch.manual_seed(0)
    common = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    if kind == "llama-tied":
        config = transformers.LlamaConfig(**common, tie_word_embeddings=True, rope_theta=10000.0)
        model = transformers.LlamaForCausalLM(config)
    elif kind == "llama3-rope-untied":
        config = transformers.LlamaConfig(
            **common, tie_word_embeddings=False, rope_theta=500000.0,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.Qwen2Config(**common, tie_word_embeddings=False, rope_theta=1e6)
        model = transformers.Qwen2ForCausalLM(config)
        with torch.no_grad():  # zero-initialised biases would leave the bias path untested
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0.0, 0.2)
    with torch.no_grad():  # random norm scales, so a swapped norm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model.float().eval()


def _hf_logits(model, tokens, mask):
    import torch

    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask.astype(np.int64)),
                    position_ids=torch.tensor(positions))
    return out.logits.numpy(), positions


@pytest.mark.torch
@pytest.mark.parametrize("kind", ["llama-tied", "llama3-rope-untied", "qwen2"])
def test_logits_match_transformers(kind, tmp_path):
    model = _hf_model(kind)
    model.save_pretrained(tmp_path / "hf", max_shard_size="60KB")  # sharded: exercises the index
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    cfg, params = load_hf_checkpoint(tmp_path / "hf")
    assert cfg.tie_word_embeddings == (kind == "llama-tied")
    assert (cfg.rope_scaling is not None) == (kind == "llama3-rope-untied")

    rng = np.random.default_rng(0)
    lengths = [48, 30, 11]  # row 0 unpadded; rows 1-2 left-padded
    tokens = np.full((3, 48), 0, np.int64)
    mask = np.zeros((3, 48), bool)
    for i, n in enumerate(lengths):
        tokens[i, 48 - n:] = rng.integers(0, cfg.vocab_size, n)
        mask[i, 48 - n:] = True
    ref, positions = _hf_logits(model, tokens, mask)
    ours = np.asarray(fwd(params, jnp.asarray(tokens, jnp.int32), cfg=cfg,
                          segment_ids_BxT=jnp.asarray(mask, jnp.int32),
                          positions_BxT=jnp.asarray(positions, jnp.int32)))
    rel = np.linalg.norm(ours[mask] - ref[mask]) / np.linalg.norm(ref[mask])
    assert rel <= 1e-5, rel
    if cfg.rope_scaling is not None:  # the scaling must matter at these positions
        plain = fwd(params, jnp.asarray(tokens[:1], jnp.int32), cfg=cfg.replace(rope_scaling=None))
        assert np.linalg.norm(plain[0] - ref[0]) / np.linalg.norm(ref[0]) > 1e-3

    # Export: what we save, transformers loads and computes the same logits with.
    import transformers

    save_hf_checkpoint(tmp_path / "ours", cfg, params)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").float().eval()
    ref2, _ = _hf_logits(reloaded, tokens, mask)
    assert_close_scaled(ref2[mask], ref[mask], eps_multiple=128, what="exported")


# ----------------------------------------------------------------------------------------------------
# The real embedded model against transformers reading the same GGUF


@pytest.mark.slow
@pytest.mark.torch
def test_embedded_greedy_matches_transformers_gguf(embedded_model):
    import torch
    import transformers

    from seal_jax.model.embedded import embedded_gguf_path

    cfg, params, tok = embedded_model
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == (30, 576, 9, 3)
    assert cfg.tie_word_embeddings and cfg.vocab_size == 49152 and cfg.rope_theta == 1e5
    path = embedded_gguf_path()
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    prompts = ["The capital of France is",
               tok.apply_chat_template([{"role": "user", "content": "Name three colors."}]),
               "def fibonacci(n):\n    "]
    new_tokens = 16
    encoded = [tok.encode(p) for p in prompts]
    width = max(map(len, encoded)) + new_tokens
    compared = 0
    for ids in encoded:
        with torch.no_grad():
            ref = ref_model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False,
                                     pad_token_id=tok.pad_id)
        ref_new = ref[0, len(ids):].tolist()  # may end early, at EOS
        # Full recompute each step on a fixed-width, right-padded row: one compilation for all.
        seq = list(ids)
        for _ in range(len(ref_new)):
            row = np.full((1, width), tok.pad_id, np.int32)
            row[0, :len(seq)] = seq
            logits = fwd(params, jnp.asarray(row), cfg=cfg,
                         segment_ids_BxT=jnp.asarray(row * 0 + (np.arange(width) < len(seq))))
            seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
        assert seq[len(ids):] == ref_new, (tok.decode(ids), tok.decode(seq[len(ids):]),
                                           tok.decode(ref_new))
        compared += len(ref_new)
    assert compared >= 2 * new_tokens  # not vacuous: most prompts ran to the full length
