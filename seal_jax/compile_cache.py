"""A persistent XLA compilation cache, so a resumed or repeated run does not compile again.

`enable(run_root / "xla_cache")` points JAX's compilation cache at a directory and lowers the
thresholds that would otherwise skip small or quickly compiled programs (by default JAX only caches
programs that took over a second to compile), so every chunk, decode and scoring program of a round
is written once and read back by the next process with the same shapes, settings and JAX version.
Call it once per process, before the first compile; calling it again with the same directory is a
no-op.
"""
from __future__ import annotations

import logging
import os
from typing import Optional

import jax

log = logging.getLogger(__name__)


def enable(directory: str | os.PathLike, *, min_compile_time_s: float = 0.0,
           min_entry_size_bytes: int = -1) -> str:
    """Cache compiled programs under `directory` (created if missing); returns its absolute path.

    min_entry_size_bytes=-1: no size threshold, and none imposed by JAX for the file system."""
    path = os.path.abspath(os.fspath(directory))
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_s))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", int(min_entry_size_bytes))
    log.info("XLA compilation cache: %s", path)
    return path


def directory() -> Optional[str]:
    """The active cache directory, or None."""
    return jax.config.jax_compilation_cache_dir or None
