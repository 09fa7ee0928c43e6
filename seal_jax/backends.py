"""What each accelerator prefers, in one place: defaults that depend on the backend, not the model.

seal_jax's code paths are the same on every backend (XLA compiles them); only a few defaults differ:

* Attention: `ModelConfig.attention_impl="auto"` uses cuDNN's fused kernel on CUDA GPUs when the
  shapes allow it and the plain-XLA einsum elsewhere; an explicit "cudnn" falls back to XLA off CUDA
  (`seal_jax.model.transformer.select_attention_impl`). There are no Pallas kernels (kernels/README.md).
* Length buckets: a TPU computes on (8 x 128) tiles, and an attention score matrix [T, S] puts the
  key length on the 128-wide lane axis, so a 48- or 192-token bucket costs what 128 or 256 cost. On
  TPU the inner loop's buckets are therefore multiples of 128: the same compute, fewer compiled
  programs (TPU compiles are slow). GPUs keep the finer default buckets (less padding per step).
* dtypes: bf16 storage and compute (the presets' and HF checkpoints' default) is what TPU MXUs and GPU
  tensor cores run at full rate; LoRA params, optimizer state, softmax and losses stay float32.
* Vocabulary / hidden sizes are the checkpoint's. Every preset's vocabulary is a multiple of 128, and
  Llama-3.2-1B's and Qwen2.5-7B's matmul dims all are; SmolLM2-135M's hidden size (576 = 4.5 tiles)
  is not, and XLA pads it internally. Padding weights ourselves would change checkpoint shapes and
  buy nothing on the models that matter on a pod; `model_shape_report` lists the dims that miss.
"""
from __future__ import annotations

from typing import Optional

import jax

from seal_jax.model.config import ModelConfig

TPU_TILE = 128
TPU_LENGTH_BUCKETS = (128, 256, 384, 512, 768, 1024, 1536, 2048)


def current_backend() -> str:
    return jax.default_backend()


def length_buckets(backend: Optional[str] = None, default: tuple = ()) -> tuple:
    """Inner-loop length buckets for `backend` (default: the current one).

    `default` is returned off TPU (pass `InnerConfig.length_buckets`); on TPU, multiples of 128 up to
    the largest default bucket (which stays the largest bucket).
    """
    backend = backend or current_backend()
    if backend != "tpu":
        return tuple(default)
    top = max(default) if default else TPU_LENGTH_BUCKETS[-1]
    buckets = [b for b in TPU_LENGTH_BUCKETS if b < top]
    return tuple(buckets + [top])


def model_shape_report(cfg: ModelConfig) -> dict:
    """Which of a model's matmul dimensions are not multiples of the TPU tile (empty: all are)."""
    dims = {"vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size, "q_dim": cfg.q_dim, "kv_dim": cfg.kv_dim}
    return {name: size for name, size in dims.items() if size % TPU_TILE}
