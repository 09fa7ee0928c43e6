"""The policy / base model: config, Flax transformer, checkpoint import (HF, GGUF), tokenizer."""
from seal_jax.model.config import LORA_TARGETS, LoraConfig, ModelConfig, RopeScaling
from seal_jax.model.hf import CheckpointError, load_hf_checkpoint, save_hf_checkpoint
from seal_jax.model.loading import load_model, load_tokenizer
from seal_jax.model.presets import PRESETS, get_preset
from seal_jax.model.tokenizer import Tokenizer
from seal_jax.model.transformer import (
    PROJECTION_PATHS,
    KVCache,
    forward,
    forward_with_cache,
    init_cache,
    init_params,
    param_logical_axes,
    positions_from_segments,
)
