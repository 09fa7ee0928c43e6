"""llama.cpp GGUF files -> (ModelConfig, Params, GGUFMetadata), via the `gguf` package (no llama.cpp).

Every tensor is dequantized to float32 with `gguf.quants.dequantize` (Q4_1, Q8_0, F32, ... whatever
the file holds) and mapped from llama.cpp names (`token_embd`, `blk.N.attn_q`, ...) to our params
through the format-independent builder in hf.py.

One trap: llama.cpp's HF->GGUF converter permutes the rows of the q and k projections of *llama*
models (it uses the interleaved "normal" RoPE, HF the rotate-half "neox" layout). We undo that
permutation, so the weights work with our rotate-half RoPE. Without it only about half of the
next-token predictions match. Qwen2 GGUFs use neox RoPE and are not permuted.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional

import numpy as np

from seal_jax.model.config import ModelConfig
from seal_jax.model.hf import CheckpointError, params_from_tensors

_ARCHITECTURES = ("llama", "qwen2")
# Big array fields kept out of GGUFMetadata.fields (they get their own attributes).
_TOKENIZER_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                     "tokenizer.ggml.scores")


@dataclasses.dataclass(frozen=True)
class GGUFMetadata:
    """Key/value metadata of a GGUF file; tokenizer arrays are split out for tokenizer.py."""

    path: Path
    fields: dict  # scalar and small list values, e.g. "llama.block_count", "tokenizer.chat_template"
    tokens: tuple = ()
    token_types: tuple = ()
    merges: tuple = ()

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)


def _field_value(field):
    value = field.contents()
    return value


def read_metadata(reader, path: Path) -> GGUFMetadata:
    fields, arrays = {}, {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            value = _field_value(field)
        except Exception as e:
            raise CheckpointError(f"GGUF file {path}: cannot decode metadata field {key!r}: {e}") from e
        (arrays if key in _TOKENIZER_ARRAYS else fields)[key] = value
    return GGUFMetadata(path=path, fields=fields,
                        tokens=tuple(arrays.get("tokenizer.ggml.tokens", ())),
                        token_types=tuple(arrays.get("tokenizer.ggml.token_type", ())),
                        merges=tuple(arrays.get("tokenizer.ggml.merges", ())))


def config_from_gguf(meta: GGUFMetadata, *, has_output_tensor: bool,
                     param_dtype: str = "float32") -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch not in _ARCHITECTURES:
        raise CheckpointError(f"GGUF file {meta.path}: unsupported architecture {arch!r}; "
                              f"supported: {_ARCHITECTURES}")

    def key(name, default=None):
        value = meta.get(f"{arch}.{name}", default)
        if value is None:
            raise CheckpointError(f"GGUF file {meta.path}: metadata key {arch}.{name} is missing")
        return value

    hidden, heads = int(key("embedding_length")), int(key("attention.head_count"))
    head_dim = int(meta.get(f"{arch}.attention.key_length") or hidden // heads)
    if meta.get(f"{arch}.rope.scaling.type") not in (None, "none"):
        raise CheckpointError(f"GGUF file {meta.path}: rope scaling "
                              f"{meta.get(f'{arch}.rope.scaling.type')!r} is not supported")
    vocab = meta.get(f"{arch}.vocab_size") or len(meta.tokens)
    return ModelConfig(
        architecture=arch, vocab_size=int(vocab), hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length")), num_layers=int(key("block_count")),
        num_heads=heads, num_kv_heads=int(meta.get(f"{arch}.attention.head_count_kv") or heads),
        head_dim=head_dim, rope_theta=float(key("rope.freq_base", 10000.0)),
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon")),
        tie_word_embeddings=not has_output_tensor, attention_bias=arch == "qwen2",
        max_position_embeddings=int(key("context_length", 8192)),
        param_dtype=param_dtype, compute_dtype=param_dtype,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"))


_GGUF_NAMES = {
    "attn_norm": "attn_norm.weight", "mlp_norm": "ffn_norm.weight",
    "q": "attn_q.weight", "k": "attn_k.weight", "v": "attn_v.weight", "o": "attn_output.weight",
    "gate": "ffn_gate.weight", "up": "ffn_up.weight", "down": "ffn_down.weight",
    "q_bias": "attn_q.bias", "k_bias": "attn_k.bias", "v_bias": "attn_v.bias",
}


def _gguf_name(name: str) -> str:
    if name == "embed":
        return "token_embd.weight"
    if name == "final_norm":
        return "output_norm.weight"
    if name == "lm_head":
        return "output.weight"
    _, i, part = name.split(".")
    return f"blk.{i}.{_GGUF_NAMES[part]}"


def unpermute_rows(w_OxI: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved RoPE pairs -> HF rotate-half halves)."""
    out = w_OxI.shape[0]
    head_dim = out // n_heads
    rest = w_OxI.shape[1:]
    return w_OxI.reshape(n_heads, head_dim // 2, 2, *rest).swapaxes(1, 2).reshape(out, *rest)


def load_gguf(path, *, param_dtype: str = "float32"):
    """(ModelConfig, Params, GGUFMetadata) from a .gguf file; params are host numpy arrays."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"GGUF file {path} does not exist")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # truncated/corrupt files raise ValueError, IndexError, struct errors...
        raise CheckpointError(f"cannot read GGUF file {path} (corrupt or truncated?): {e}") from e
    meta = read_metadata(reader, path)
    tensors = {t.name: t for t in reader.tensors}
    cfg = config_from_gguf(meta, has_output_tensor="output.weight" in tensors,
                           param_dtype=param_dtype)
    if "rope_freqs.weight" in tensors:
        raise CheckpointError(f"GGUF file {path}: per-frequency rope factors (rope_freqs) are not "
                              f"supported; load the HF checkpoint instead")

    def fetch(name):
        source = _gguf_name(name)
        if source not in tensors:
            raise CheckpointError(f"GGUF file {path}: tensor {source!r} is missing")
        tensor = tensors[source]
        logical_shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists dims inner-first
        try:
            array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
            array = np.asarray(array, np.float32).reshape(logical_shape)
        except Exception as e:
            raise CheckpointError(f"GGUF file {path}: cannot dequantize tensor {source!r} "
                                  f"({tensor.tensor_type.name}): {e}") from e
        if cfg.architecture == "llama" and name.split(".")[-1] in ("q", "k"):
            heads = cfg.num_heads if name.endswith(".q") else cfg.num_kv_heads
            if logical_shape[0] % (2 * heads) == 0:  # else the shape check below reports it
                array = unpermute_rows(array, heads)
        return f"{source!r} in {path}", array

    return cfg, params_from_tensors(cfg, fetch, param_dtype), meta
