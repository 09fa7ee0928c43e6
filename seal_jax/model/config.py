"""Static description of a Llama/Qwen2-family decoder and of a LoRA adapter.

Both are frozen dataclasses: hashable, so they can be passed as static arguments to `jax.jit`, and
cheap to compare. Everything that changes the *shape* of a computation lives here; everything that
changes only its *values* (weights, learning rates, masks) lives in pytrees of arrays.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import jax.numpy as jnp

ARCHITECTURES = ("llama", "qwen2")
SAVED_RESIDUALS = ("dots", "all")  # ModelConfig.saved_residuals
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency scaling ("rope_type": "llama3" in HF config.json)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    architecture: str  # "llama" | "qwen2"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScaling] = None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: biases on q/k/v projections
    max_position_embeddings: int = 8192
    param_dtype: str = "bfloat16"  # storage dtype of the frozen base
    compute_dtype: str = "bfloat16"  # activations / matmul inputs
    remat: bool = False  # rematerialise each layer in the backward pass (saves activation memory)
    # What a layer keeps for its backward pass when `remat` is off. "dots": the matmul outputs only;
    # the elementwise values (norms, float32 copies, rotary, softmax, SiLU) are recomputed inside the
    # backward's fusions, which read the saved matmul outputs anyway. "all": whatever JAX's autodiff
    # keeps. On a 7B LoRA step "all" keeps ~2.7x the bytes (five MLP-wide tensors a layer instead of
    # two), and writing and reading them back was ~10% of the step (bench/results/round_h200.md,
    # 2026-12-04, ninth session). Both compute the same values.
    saved_residuals: str = "dots"
    # Layers per iteration of the layer scan. 1 keeps compile time flat in depth; larger values let
    # XLA address each layer's weights directly instead of slicing them out of the stacked arrays.
    scan_unroll: int = 1
    # Attention implementation: "xla" (plain einsum softmax, runs everywhere), "cudnn"
    # (jax.nn.dot_product_attention's fused kernel on CUDA; XLA on other backends) or "auto" (cuDNN
    # on CUDA where its shape constraints hold, else XLA); see transformer.select_attention_impl.
    attention_impl: str = "xla"
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None
    pad_token_id: Optional[int] = None

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {self.architecture!r}; seal_jax supports {ARCHITECTURES}"
            )
        if self.saved_residuals not in SAVED_RESIDUALS:
            raise ValueError(f"saved_residuals must be one of {SAVED_RESIDUALS}, got {self.saved_residuals!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def dtype(self):
        return jnp.dtype(self.compute_dtype)

    def projection_shape(self, target: str) -> Tuple[int, int]:
        """(in_features, out_features) of a projection; LoRA A is [in, r], B is [r, out]."""
        d, f = self.hidden_size, self.intermediate_size
        return {
            "q": (d, self.q_dim),
            "k": (d, self.kv_dim),
            "v": (d, self.kv_dim),
            "o": (self.q_dim, d),
            "gate": (d, f),
            "up": (d, f),
            "down": (f, d),
        }[target]

    def num_params(self) -> int:
        """Parameters of the base model (embeddings counted once when tied)."""
        per_layer = sum(i * o for i, o in map(self.projection_shape, LORA_TARGETS))
        per_layer += 2 * self.hidden_size
        if self.attention_bias:
            per_layer += self.q_dim + 2 * self.kv_dim
        total = self.num_layers * per_layer + self.vocab_size * self.hidden_size + self.hidden_size
        if not self.tie_word_embeddings:
            total += self.vocab_size * self.hidden_size
        return total

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """PEFT-compatible LoRA hyper-parameters. Scale applied to B·A is alpha / rank."""

    rank: int = 32
    alpha: float = 64.0
    targets: Tuple[str, ...] = ("q", "v")  # PEFT's default for llama/qwen2
    dropout: float = 0.0

    def __post_init__(self):
        bad = [t for t in self.targets if t not in LORA_TARGETS]
        if bad:
            raise ValueError(f"unknown LoRA targets {bad}; choose from {LORA_TARGETS}")
        if self.rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank
