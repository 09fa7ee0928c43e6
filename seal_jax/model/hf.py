"""Hugging Face checkpoints (config.json + safetensors) <-> seal_jax params, without torch.

Reads `LlamaForCausalLM` and `Qwen2ForCausalLM` directories: config.json (transformers v4 keys
`rope_theta`/`rope_scaling` or v5 `rope_parameters`), and `model.safetensors` or a sharded
`model.safetensors.index.json`, through the safetensors numpy API (bfloat16 via ml_dtypes).

Also home of what every checkpoint format shares: `CheckpointError`, the canonical tensor layout
(`expected_source_shapes`) and `params_from_tensors`, which validates shapes, transposes HF/llama.cpp
[out, in] matrices to our [in, out] kernels and stacks layers on the leading L axis. gguf.py reuses it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from seal_jax.errors import UserError
from seal_jax.model.config import ModelConfig, RopeScaling

SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
_MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2"}
_PROJ_KERNELS = ("q", "k", "v", "o", "gate", "up", "down")


class CheckpointError(UserError, ValueError):  # a user error: the CLI prints one line
    """A checkpoint cannot be read; the message names the offending file or tensor."""


# ----------------------------------------------------------------------------------------------------
# Format-independent layout


def expected_source_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Canonical per-layer tensor names -> shape as stored by HF / llama.cpp ([out, in] matrices)."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    shapes = {"attn_norm": (d,), "mlp_norm": (d,)}
    for target in _PROJ_KERNELS:
        d_in, d_out = cfg.projection_shape(target)
        shapes[target] = (d_out, d_in)
    if cfg.attention_bias:
        shapes.update(q_bias=(cfg.q_dim,), k_bias=(cfg.kv_dim,), v_bias=(cfg.kv_dim,))
    return shapes


def params_from_tensors(cfg: ModelConfig, fetch: Callable[[str], tuple[str, np.ndarray]],
                        param_dtype: str) -> dict:
    """Assemble Params from canonical tensors.

    `fetch(name)` returns `(description naming tensor and file, array)` for canonical names "embed", "final_norm",
    "lm_head" (untied only) and "layers.{i}.{attn_norm|mlp_norm|q|k|v|o|gate|up|down|q_bias|...}";
    arrays in the file's [out, in] orientation. Each tensor is cast to `param_dtype` as soon as it is
    read, so peak host memory stays near one copy of the model.
    """
    dtype = np.dtype(param_dtype) if param_dtype != "bfloat16" else _bf16()

    def get(name, shape):
        source, array = fetch(name)
        if tuple(array.shape) != tuple(shape):
            raise CheckpointError(f"tensor {source} has shape {tuple(array.shape)} but the model "
                                  f"config implies {tuple(shape)}")
        return array

    embedding = get("embed", (cfg.vocab_size, cfg.hidden_size)).astype(dtype)
    layer_shapes = expected_source_shapes(cfg)
    stacked = {}
    for name, shape in layer_shapes.items():
        is_matrix = len(shape) == 2
        out_shape = (cfg.num_layers, *(shape[::-1] if is_matrix else shape))
        buffer = np.empty(out_shape, dtype)
        for i in range(cfg.num_layers):
            array = get(f"layers.{i}.{name}", shape)
            buffer[i] = (array.T if is_matrix else array).astype(dtype)
        stacked[name] = buffer

    def proj(target):
        entry = {"kernel": stacked[target]}
        if f"{target}_bias" in stacked:
            entry["bias"] = stacked[f"{target}_bias"]
        return entry

    params = {
        "embed": {"embedding": embedding},
        "layers": {
            "attn_norm": {"scale": stacked["attn_norm"]},
            "attn": {t: proj(t) for t in ("q", "k", "v", "o")},
            "mlp_norm": {"scale": stacked["mlp_norm"]},
            "mlp": {t: proj(t) for t in ("gate", "up", "down")},
        },
        "final_norm": {"scale": get("final_norm", (cfg.hidden_size,)).astype(dtype)},
    }
    if not cfg.tie_word_embeddings:
        params["lm_head"] = get("lm_head", (cfg.vocab_size, cfg.hidden_size)).T.astype(dtype)
    return params


def tensors_from_params(cfg: ModelConfig, params: dict) -> dict[str, np.ndarray]:
    """Inverse of params_from_tensors: canonical name -> array in [out, in] orientation."""
    layers = params["layers"]
    flat = {"embed": params["embed"]["embedding"], "final_norm": params["final_norm"]["scale"]}
    if not cfg.tie_word_embeddings:
        flat["lm_head"] = np.asarray(params["lm_head"]).T
    for name, shape in expected_source_shapes(cfg).items():
        if name.endswith("_norm"):
            stacked = layers[name]["scale"]
        elif name.endswith("_bias"):
            stacked = layers["attn"][name[0]]["bias"]
        else:
            group = "attn" if name in ("q", "k", "v", "o") else "mlp"
            stacked = layers[group][name]["kernel"]
        stacked = np.asarray(stacked)
        for i in range(cfg.num_layers):
            flat[f"layers.{i}.{name}"] = stacked[i].T if len(shape) == 2 else stacked[i]
    return {k: np.asarray(v) for k, v in flat.items()}


def _bf16():
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)


# ----------------------------------------------------------------------------------------------------
# config.json


def _rope_from_hf(hf: dict) -> tuple[float, Optional[RopeScaling]]:
    params = hf.get("rope_parameters") or {}  # transformers v5
    scaling = hf.get("rope_scaling") or params  # transformers v4 (or the v5 dict, which holds both)
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise CheckpointError(f"unsupported rope scaling {rope_type!r} (supported: default, llama3)")
    return theta, RopeScaling(
        factor=float(scaling["factor"]), low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_position_embeddings=int(scaling["original_max_position_embeddings"]))


def _first_id(value):
    return value[0] if isinstance(value, (list, tuple)) and value else value


def _hf_dtype(hf: dict) -> str:
    name = str(hf.get("dtype") or hf.get("torch_dtype") or "bfloat16").replace("torch.", "")
    return name if name in ("float32", "bfloat16") else "bfloat16"


def config_from_hf(hf: dict, *, param_dtype: Optional[str] = None) -> ModelConfig:
    """ModelConfig from a parsed config.json; unsupported architectures/features raise CheckpointError."""
    archs = hf.get("architectures") or []
    if archs:
        unknown = [a for a in archs if a not in SUPPORTED_ARCHITECTURES]
        if unknown:
            raise CheckpointError(f"unsupported architecture {unknown[0]!r} in config.json; supported: "
                                  f"{sorted(SUPPORTED_ARCHITECTURES)}")
        architecture = SUPPORTED_ARCHITECTURES[archs[0]]
    elif hf.get("model_type") in _MODEL_TYPES:
        architecture = _MODEL_TYPES[hf["model_type"]]
    else:
        raise CheckpointError(f"unsupported model_type {hf.get('model_type')!r} in config.json "
                              f"(and no supported 'architectures' entry)")
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"unsupported hidden_act {hf['hidden_act']!r} (only silu)")
    if hf.get("mlp_bias") or (architecture == "qwen2" and hf.get("use_sliding_window")):
        raise CheckpointError("unsupported config.json feature: mlp_bias or use_sliding_window")
    theta, scaling = _rope_from_hf(hf)
    heads = int(hf["num_attention_heads"])
    dtype = param_dtype or _hf_dtype(hf)
    try:
        return ModelConfig(
            architecture=architecture, vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_size"]), intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]), num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or int(hf["hidden_size"]) // heads),
            rope_theta=theta, rope_scaling=scaling, rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=architecture == "qwen2" or bool(hf.get("attention_bias", False)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 8192)),
            param_dtype=dtype, compute_dtype=dtype,
            bos_token_id=_first_id(hf.get("bos_token_id")),
            eos_token_id=_first_id(hf.get("eos_token_id")),
            pad_token_id=_first_id(hf.get("pad_token_id")))
    except KeyError as e:
        raise CheckpointError(f"config.json lacks required key {e.args[0]!r}") from None


def config_to_hf(cfg: ModelConfig) -> dict:
    """config.json contents readable by transformers v4 and v5 (legacy rope keys)."""
    arch = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}[cfg.architecture]
    hf = {
        "architectures": [arch], "model_type": cfg.architecture, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
        "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_word_embeddings, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings, "torch_dtype": cfg.param_dtype,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
    }
    if cfg.architecture == "llama":
        hf["attention_bias"] = cfg.attention_bias
    elif not cfg.attention_bias:
        raise ValueError("qwen2 checkpoints always carry q/k/v biases; cfg.attention_bias is False")
    if cfg.rope_scaling is not None:
        rs = cfg.rope_scaling
        hf["rope_scaling"] = {"rope_type": "llama3", "factor": rs.factor,
                              "low_freq_factor": rs.low_freq_factor,
                              "high_freq_factor": rs.high_freq_factor,
                              "original_max_position_embeddings": rs.original_max_position_embeddings}
    return hf


# ----------------------------------------------------------------------------------------------------
# Tensor names


def _hf_name(name: str) -> str:
    if name == "embed":
        return "model.embed_tokens.weight"
    if name == "final_norm":
        return "model.norm.weight"
    if name == "lm_head":
        return "lm_head.weight"
    _, i, part = name.split(".")
    prefix = f"model.layers.{i}."
    if part == "attn_norm":
        return prefix + "input_layernorm.weight"
    if part == "mlp_norm":
        return prefix + "post_attention_layernorm.weight"
    if part.endswith("_bias"):
        return prefix + f"self_attn.{part[0]}_proj.bias"
    group = "self_attn" if part in ("q", "k", "v", "o") else "mlp"
    return prefix + f"{group}.{part}_proj.weight"


def _open_safetensors(path: Path):
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="numpy")
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"cannot read safetensors file {path}: {e}") from e


def _weight_files(path: Path) -> dict[str, Path]:
    """Tensor name -> file holding it (single file or sharded index)."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"malformed safetensors index {index}: {e}") from e
        return {name: path / file for name, file in weight_map.items()}
    single = path / "model.safetensors"
    if not single.exists():
        raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {path}")
    with _open_safetensors(single) as f:
        return {name: single for name in f.keys()}


def load_hf_checkpoint(path, *, param_dtype: Optional[str] = None):
    """(ModelConfig, Params) from an HF model directory. param_dtype defaults to the checkpoint's."""
    path = Path(path)
    config_path = path / "config.json"
    if not path.is_dir():
        raise CheckpointError(f"HF model directory {path} does not exist")
    if not config_path.exists():
        raise CheckpointError(f"{config_path} does not exist")
    try:
        hf = json.loads(config_path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{config_path} is not valid JSON: {e}") from e
    try:
        cfg = config_from_hf(hf, param_dtype=param_dtype)
    except KeyError as e:  # a field every HF config of a supported architecture has
        raise CheckpointError(f"{config_path}: missing field {e.args[0]!r}") from None
    files = _weight_files(path)
    handles = {}

    def fetch(name):
        source = _hf_name(name)
        if source not in files:
            raise CheckpointError(f"tensor {source!r} is missing from the checkpoint in {path}")
        file = files[source]
        if file not in handles:
            if not file.exists():
                raise CheckpointError(f"safetensors shard {file} (listed in the index) does not exist")
            handles[file] = _open_safetensors(file).__enter__()
        try:
            return f"{source!r} in {file}", handles[file].get_tensor(source)
        except Exception as e:
            raise CheckpointError(f"cannot read tensor {source!r} from {file}: {e}") from e

    try:
        params = params_from_tensors(cfg, fetch, cfg.param_dtype)
    finally:
        for handle in handles.values():
            handle.__exit__(None, None, None)
    return cfg, params


def save_hf_checkpoint(path, cfg: ModelConfig, params: dict) -> Path:
    """Write config.json + model.safetensors (params in their own dtype) readable by transformers."""
    from safetensors.numpy import save_file

    import jax

    path = Path(path)
    os.makedirs(path, exist_ok=True)
    host = jax.tree.map(np.asarray, jax.device_get(params))
    tensors = {_hf_name(k): np.ascontiguousarray(v) for k, v in tensors_from_params(cfg, host).items()}
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config_to_hf(cfg), indent=2))
    return path
