"""Hugging Face PEFT LoRA adapters <-> seal_jax LoRA pytrees.

seal_jax keeps an adapter as `{target: {"a": A [L, in, r], "b": B [L, r, out]}}` (kernels are `x @ W`).
PEFT stores one pair of torch `nn.Linear` weights per layer and projection:

    base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight   [r, in]   (= A[i].T)
    base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight   [out, r]  (= B[i].T)
    (gate/up/down under `.mlp.`), plus adapter_config.json (r, lora_alpha, target_modules, ...).

Both compute `y = x W + (alpha / r) * x A B`, so conversion is a per-layer transpose. Exported
directories load with `PeftModel.from_pretrained` and vLLM's LoRA loader; imported adapters may come
from PEFT's `save_pretrained` (keys without the adapter name) or a raw `state_dict()` (keys with
`.default`). PEFT features that change the math beyond plain LoRA (DoRA, per-module rank/alpha
patterns, biases, extra trained modules) are rejected with an error naming the field; rsLoRA
(scale alpha / sqrt(r)) is folded into an equivalent `LoraConfig.alpha`.
"""
from __future__ import annotations

import json
import math
import os
import pathlib
import re
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from seal_jax.lora import Lora, candidate, check_lora, num_candidates
from seal_jax.model.config import LORA_TARGETS, LoraConfig, ModelConfig

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

# seal_jax target -> module path inside a Llama/Qwen2 decoder layer.
HF_MODULES = {
    "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
    "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj",
}
_TARGET_OF_HF_NAME = {path.split(".")[-1]: t for t, path in HF_MODULES.items()}  # "q_proj" -> "q"
_PREFIX = "base_model.model.model.layers"

# A LoRA weight key as PEFT writes it, with optional variations: the wrapper prefixes
# (`base_model.model.` / `model.`) and the adapter name (`.default` in a live model's state_dict).
_KEY_RE = re.compile(
    r"^(?:base_model\.model\.)?(?:model\.)?layers\.(?P<layer>\d+)\."
    r"(?P<module>self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)\."
    r"lora_(?P<ab>[AB])(?:\.(?P<adapter>[A-Za-z0-9_\-]+))?\.weight$"
)

# adapter_config.json fields whose non-default values change the computation in ways seal_jax's
# plain `x W + scale * x A B` does not model. Value: why it is rejected.
_UNSUPPORTED_FIELDS = {
    "use_dora": "DoRA (weight-decomposed LoRA)",
    "rank_pattern": "per-module ranks",
    "alpha_pattern": "per-module alphas",
    "fan_in_fan_out": "Conv1D-style transposed base weights",
    "lora_bias": "trainable LoRA biases",
    "modules_to_save": "fully trained extra modules",
    "trainable_token_indices": "trainable token embeddings",
    "layer_replication": "layer replication",
    "target_parameters": "LoRA on nn.Parameter targets",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "use_qalora": "QA-LoRA",
    "use_bdlora": "block-diagonal LoRA",
}


class PeftFormatError(ValueError):
    """An adapter directory or tensor set that seal_jax cannot represent exactly."""


# ---------------------------------------------------------------------------------------------------
# in-memory conversion
# ---------------------------------------------------------------------------------------------------

def to_peft_tensors(lora: Lora, cfg: ModelConfig, lora_cfg: LoraConfig) -> dict[str, np.ndarray]:
    """PEFT state dict (float32 numpy, save_pretrained key names) of an adapter without a K axis."""
    _check_single(lora, cfg, lora_cfg)
    tensors = {}
    for target in lora_cfg.targets:
        a_LxIxR = np.asarray(jax.device_get(lora[target]["a"]), np.float32)
        b_LxRxO = np.asarray(jax.device_get(lora[target]["b"]), np.float32)
        for name, arr in (("a", a_LxIxR), ("b", b_LxRxO)):
            if not np.all(np.isfinite(arr)):
                raise ValueError(f"LoRA {target}.{name} has non-finite values; refusing to export")
        for i in range(cfg.num_layers):
            stem = f"{_PREFIX}.{i}.{HF_MODULES[target]}"
            tensors[f"{stem}.lora_A.weight"] = np.ascontiguousarray(a_LxIxR[i].T)  # [r, in]
            tensors[f"{stem}.lora_B.weight"] = np.ascontiguousarray(b_LxRxO[i].T)  # [out, r]
    return tensors


def peft_config_dict(lora_cfg: LoraConfig, base_model_name_or_path: str = "") -> dict[str, Any]:
    """adapter_config.json contents for `lora_cfg` (plain LoRA, CAUSAL_LM)."""
    alpha = float(lora_cfg.alpha)
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path or None,
        "r": lora_cfg.rank,
        "lora_alpha": int(alpha) if alpha.is_integer() else alpha,
        "lora_dropout": float(lora_cfg.dropout),
        "target_modules": sorted(HF_MODULES[t].split(".")[-1] for t in lora_cfg.targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": False,
        "use_rslora": False,
        "revision": None,
    }


def _scalar_lora_config(peft_cfg: Mapping[str, Any], source: str) -> tuple[int, float, float]:
    """Validate a PEFT adapter config; return (rank, alpha, dropout) with rsLoRA folded into alpha."""
    peft_type = str(peft_cfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise PeftFormatError(f"{source}: peft_type {peft_type!r} is not LORA")
    task_type = peft_cfg.get("task_type")
    if task_type not in (None, "CAUSAL_LM"):
        raise PeftFormatError(f"{source}: task_type {task_type!r} is not supported (only CAUSAL_LM)")
    bias = peft_cfg.get("bias", "none")
    if bias != "none":
        raise PeftFormatError(f"{source}: bias={bias!r} is not supported (only 'none')")
    for field, what in _UNSUPPORTED_FIELDS.items():
        if peft_cfg.get(field):
            raise PeftFormatError(f"{source}: {field}={peft_cfg[field]!r} ({what}) is not supported")
    rank = int(peft_cfg.get("r", 8))
    alpha = float(peft_cfg.get("lora_alpha", 8))
    if peft_cfg.get("use_rslora"):
        # rsLoRA scales by alpha / sqrt(r); LoraConfig.scale is alpha / r.
        alpha = alpha * math.sqrt(rank)
    return rank, alpha, float(peft_cfg.get("lora_dropout", 0.0))


def from_peft_tensors(tensors: Mapping[str, Any], cfg: ModelConfig, peft_cfg: Mapping[str, Any],
                      *, source: str = "adapter") -> tuple[Lora, LoraConfig]:
    """seal_jax adapter (float32, no K axis) from a PEFT state dict and its adapter config."""
    rank, alpha, dropout = _scalar_lora_config(peft_cfg, source)
    declared = _targets_from_modules(peft_cfg.get("target_modules"), source)

    found: dict[tuple[str, int, str], tuple[str, Any]] = {}
    adapter_names = set()
    for key, value in tensors.items():
        m = _KEY_RE.match(key)
        if m is None:
            raise PeftFormatError(
                f"{source}: unsupported tensor {key!r}; seal_jax adapters hold only lora_A/lora_B "
                "weights of the decoder layers' q/k/v/o/gate/up/down projections"
            )
        adapter_names.add(m["adapter"])
        target = _TARGET_OF_HF_NAME[m["module"].split(".")[-1]]
        slot = (target, int(m["layer"]), m["ab"])
        if slot in found:
            raise PeftFormatError(f"{source}: tensors {found[slot][0]!r} and {key!r} are the same weight")
        found[slot] = (key, value)
    if len(adapter_names) > 1:
        raise PeftFormatError(f"{source}: tensors of several adapters {sorted(map(str, adapter_names))}; "
                              "export one adapter at a time")

    present = {t for t, _, _ in found}
    if declared is not None and present != set(declared):
        raise PeftFormatError(
            f"{source}: target_modules declares {sorted(HF_MODULES[t] for t in declared)} but the weights "
            f"cover {sorted(HF_MODULES[t] for t in present)}"
        )
    if not present:
        raise PeftFormatError(f"{source}: no LoRA weights found")
    targets = tuple(t for t in LORA_TARGETS if t in present)
    lora_cfg = LoraConfig(rank=rank, alpha=alpha, targets=targets, dropout=dropout)

    layers = _transformed_layers(peft_cfg.get("layers_to_transform"), cfg.num_layers, source)
    for (_, i, _), (key, _) in found.items():
        if i not in layers:
            raise PeftFormatError(f"{source}: tensor {key!r} is for layer {i}, outside the model's "
                                  f"{cfg.num_layers} layers / layers_to_transform")
    r = rank
    lora: Lora = {}
    for target in targets:
        fan_in, fan_out = cfg.projection_shape(target)
        a_LxIxR = np.zeros((cfg.num_layers, fan_in, r), np.float32)
        b_LxRxO = np.zeros((cfg.num_layers, r, fan_out), np.float32)  # untransformed layers: B = 0
        for i in sorted(layers):
            for ab, want, dst in (("A", (r, fan_in), a_LxIxR), ("B", (fan_out, r), b_LxRxO)):
                if (target, i, ab) not in found:
                    raise PeftFormatError(
                        f"{source}: missing tensor {_PREFIX}.{i}.{HF_MODULES[target]}.lora_{ab}.weight"
                    )
                key, value = found[(target, i, ab)]
                arr = np.asarray(value, np.float32)
                if arr.shape != want:
                    raise PeftFormatError(
                        f"{source}: tensor {key!r} has shape {list(arr.shape)}, expected {list(want)} "
                        f"(r={r}, {HF_MODULES[target]} is {fan_in}->{fan_out})"
                    )
                dst[i] = arr.T
        lora[target] = {"a": jnp.asarray(a_LxIxR), "b": jnp.asarray(b_LxRxO)}
    return lora, lora_cfg


# ---------------------------------------------------------------------------------------------------
# directories
# ---------------------------------------------------------------------------------------------------

def save_peft_adapter(out_dir: str | os.PathLike, lora: Lora, cfg: ModelConfig, lora_cfg: LoraConfig,
                      base_model_name_or_path: str = "") -> pathlib.Path:
    """Write `adapter_config.json` + `adapter_model.safetensors` for one adapter (no K axis)."""
    out = pathlib.Path(out_dir)
    tensors = to_peft_tensors(lora, cfg, lora_cfg)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    with open(out / ADAPTER_CONFIG, "w") as f:
        json.dump(peft_config_dict(lora_cfg, base_model_name_or_path), f, indent=2, sort_keys=True)
        f.write("\n")
    return out


def save_peft_candidate(out_dir: str | os.PathLike, lora_K: Lora, k: int, cfg: ModelConfig,
                        lora_cfg: LoraConfig, base_model_name_or_path: str = "") -> pathlib.Path:
    """Export candidate `k` of a candidate-stacked adapter `[K, L, ...]` to its own directory."""
    check_lora(lora_K, cfg, lora_cfg, candidate_axis=True)
    num = num_candidates(lora_K)
    if not 0 <= k < num:
        raise IndexError(f"candidate {k} out of range for an adapter stack of K={num}")
    return save_peft_adapter(out_dir, candidate(lora_K, k), cfg, lora_cfg, base_model_name_or_path)


def save_peft_candidates(root: str | os.PathLike, lora_K: Lora, cfg: ModelConfig,
                         lora_cfg: LoraConfig, indices: Optional[Sequence[int]] = None,
                         base_model_name_or_path: str = "") -> list[pathlib.Path]:
    """Export candidates `indices` (default: all) to `root/candidate_{k}`; returns the directories."""
    check_lora(lora_K, cfg, lora_cfg, candidate_axis=True)
    indices = range(num_candidates(lora_K)) if indices is None else indices
    root = pathlib.Path(root)
    return [save_peft_candidate(root / f"candidate_{k}", lora_K, int(k), cfg, lora_cfg,
                                base_model_name_or_path) for k in indices]


def load_peft_adapter(adapter_dir: str | os.PathLike, cfg: ModelConfig) -> tuple[Lora, LoraConfig]:
    """Read a PEFT LoRA directory into a float32 seal_jax adapter (no K axis) and its LoraConfig."""
    d = pathlib.Path(adapter_dir)
    config_path, weights_path = d / ADAPTER_CONFIG, d / ADAPTER_WEIGHTS
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found (not a PEFT adapter directory)")
    if not weights_path.is_file():
        if (d / "adapter_model.bin").is_file():
            raise PeftFormatError(
                f"{d}: only adapter_model.bin (PyTorch pickle) present; re-save the adapter with "
                "safe_serialization=True to get adapter_model.safetensors"
            )
        raise FileNotFoundError(f"{weights_path} not found")
    try:
        peft_cfg = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise PeftFormatError(f"{config_path} is not valid JSON: {e}") from e
    if not isinstance(peft_cfg, dict):
        raise PeftFormatError(f"{config_path} does not hold a JSON object")
    # framework="flax" reads bf16/fp16 adapters too (numpy has no bfloat16); adapters are small.
    with safe_open(str(weights_path), framework="flax") as f:
        tensors = {key: np.asarray(f.get_tensor(key).astype(jnp.float32)) for key in f.keys()}
    return from_peft_tensors(tensors, cfg, peft_cfg, source=str(weights_path))


# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------

def _check_single(lora: Lora, cfg: ModelConfig, lora_cfg: LoraConfig) -> None:
    leaves = jax.tree.leaves(lora)
    if leaves and leaves[0].ndim == 4:
        raise ValueError(
            f"this adapter has a leading candidate axis (K={leaves[0].shape[0]}); export one candidate "
            "with save_peft_candidate / save_peft_candidates"
        )
    check_lora(lora, cfg, lora_cfg, candidate_axis=False)


def _targets_from_modules(modules: Any, source: str) -> Optional[tuple[str, ...]]:
    """seal_jax targets named by PEFT `target_modules`, or None when it is a regex we do not resolve."""
    if modules is None:
        return None
    if isinstance(modules, str):
        if modules == "all-linear":  # PEFT: every linear layer except the output head
            return LORA_TARGETS
        if modules in _TARGET_OF_HF_NAME:
            return (_TARGET_OF_HF_NAME[modules],)
        return None  # a regex over module paths; the tensor names decide
    targets = set()
    for name in modules:
        leaf = str(name).split(".")[-1]  # PEFT matches list entries as module-path suffixes
        if leaf not in _TARGET_OF_HF_NAME:
            raise PeftFormatError(
                f"{source}: target module {name!r} is not supported; seal_jax adapts only "
                f"{sorted(_TARGET_OF_HF_NAME)}"
            )
        targets.add(_TARGET_OF_HF_NAME[leaf])
    return tuple(t for t in LORA_TARGETS if t in targets)


def _transformed_layers(layers_to_transform: Any, num_layers: int, source: str) -> set[int]:
    if layers_to_transform is None:
        return set(range(num_layers))
    layers = {int(layers_to_transform)} if isinstance(layers_to_transform, int) else set(
        map(int, layers_to_transform))
    bad = sorted(i for i in layers if not 0 <= i < num_layers)
    if bad:
        raise PeftFormatError(f"{source}: layers_to_transform {bad} outside the model's {num_layers} layers")
    return layers
