"""A persistent XLA compilation cache, so a resumed or repeated run does not compile again.

`enable(run_root / "xla_cache")` points JAX's compilation cache at a directory and lowers the
thresholds that would otherwise skip small or quickly compiled programs (by default JAX only caches
programs that took over a second to compile), so every chunk, decode and scoring program of a round
is written once and read back by the next process with the same shapes, settings and JAX version.
Call it once per process, before the first compile; calling it again with the same directory is a
no-op.

XLA's cache saves the compile, not the work before it: each program is still traced and lowered to
find its cache key, in Python, holding the GIL. For the E-step's training programs that was most of a
warm start (the paper E-step's ~20-30 programs, ~0.9 s each on an H200 host, one after another).
`executable(name, static, args, lower)` therefore also keeps the compiled executable itself under
`directory/executables/`, keyed by what decides the program without tracing it: a name, the static
settings' repr, the arguments' tree, shapes, dtypes and placements, and a fingerprint of the
environment (seal_jax's source, the JAX/Flax/optax versions, the backend and its devices, XLA_FLAGS
and the JAX options that change tracing). A later process loads it in ~0.15 s instead. An
unreadable entry is removed and the program compiled again; one that cannot be serialized is only
compiled. `CachedJit` is a jax.jit that does the same (the decode and scoring functions).
The key does not see code changed at run time (a monkeypatched function inside a traced program, as
tests and fault injection do): `SEAL_JAX_EXECUTABLE_CACHE=0` turns this part off, leaving XLA's cache,
whose key is the lowered program itself.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import logging
import os
import pathlib
import pickle
import threading
from typing import Any, Callable, Optional

import jax

from seal_jax.errors import brief

log = logging.getLogger(__name__)


EXECUTABLES_DIR = "executables"
EXECUTABLES_ENV = "SEAL_JAX_EXECUTABLE_CACHE"  # "0": XLA's cache only
_counts = {"loaded": 0, "stored": 0, "unreadable": 0}
_counts_lock = threading.Lock()


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


def executable_counts() -> dict:
    """Executables this process loaded from / stored to the cache, and unreadable entries removed."""
    with _counts_lock:
        return dict(_counts)


def _count(what: str) -> None:
    with _counts_lock:
        _counts[what] += 1


def _executables_directory() -> Optional[pathlib.Path]:
    root = directory()
    if root is None or os.environ.get(EXECUTABLES_ENV, "1").strip() == "0":
        return None
    if jax.process_count() > 1:
        return None  # programs over several processes compile in lockstep, each process its own
    return pathlib.Path(root) / EXECUTABLES_DIR


@functools.lru_cache(maxsize=None)
def _source_digest() -> str:
    """seal_jax's own source: a program traced from other code is another program."""
    package = pathlib.Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


@functools.lru_cache(maxsize=None)
def _library_versions() -> tuple:
    versions = []
    for package in ("jax", "jaxlib", "flax", "optax", "chex"):
        try:
            versions.append(f"{package}={importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{package}=-")
    return tuple(versions)


def environment_fingerprint() -> str:
    """What, besides a program's own key, decides its executable (not cached: devices and flags may
    change between calls in tests)."""
    versions = _library_versions()
    devices = jax.devices()
    options = {name: getattr(jax.config, name, None) for name in (
        "jax_enable_x64", "jax_default_matmul_precision", "jax_default_prng_impl",
        "jax_threefry_partitionable", "jax_numpy_rank_promotion")}
    parts = [_source_digest(), *versions, jax.default_backend(), devices[0].client.platform_version,
             devices[0].device_kind, str(len(devices)), str(jax.process_count()),
             os.environ.get("XLA_FLAGS", ""), os.environ.get("LIBTPU_INIT_ARGS", ""), repr(sorted(options.items()))]
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()


def _placement(leaf) -> str:
    sharding = getattr(leaf, "sharding", None)
    if sharding is None:
        return "default"
    if isinstance(sharding, jax.sharding.SingleDeviceSharding):
        (device,) = sharding.device_set
        if device == jax.devices()[0]:
            return "default"  # where an uncommitted or abstract argument goes too
    return repr(sharding)


def signature(args: Any) -> str:
    """The arguments as a compiled program sees them: tree, shapes, dtypes, weak types, placements."""
    leaves, treedef = jax.tree.flatten(args)
    described = [(tuple(getattr(x, "shape", ())), str(getattr(x, "dtype", type(x).__name__)),
                  bool(getattr(x, "weak_type", False)), _placement(x)) for x in leaves]
    return f"{treedef}|{described!r}"


def executable_key(name: str, static: Any, args: Any) -> str:
    text = "\x1e".join([name, repr(static), signature(args), environment_fingerprint()])
    return f"{name}-{hashlib.sha256(text.encode()).hexdigest()[:40]}"


def _load(path: pathlib.Path):
    from jax.experimental import serialize_executable  # noqa: PLC0415

    with open(path, "rb") as f:
        payload, in_tree, out_tree = pickle.load(f)
    return serialize_executable.deserialize_and_load(payload, in_tree, out_tree)


def _store(path: pathlib.Path, compiled) -> None:
    from jax.experimental import serialize_executable  # noqa: PLC0415

    blob = pickle.dumps(serialize_executable.serialize(compiled))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}.{threading.get_ident()}")
    try:
        tmp.write_bytes(blob)
        os.replace(tmp, path)  # readers see a whole entry or none
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()  # left only by a failed write


# Whether the compile running on this thread was read from XLA's cache (a jax.monitoring event, recorded
# on the compiling thread). Such an executable is not stored again: on XLA:CPU (jax 0.10) one that XLA's
# cache had loaded serialized without all its code, and the copy failed when it ran ("Function ... not
# found"). A program XLA's cache already holds is then compiled from that cache, as before.
_compile_reads = threading.local()


def _note_cache_hit(event: str, **_kwargs) -> None:
    if event == "/jax/compilation_cache/cache_hits":
        _compile_reads.hit = True


jax.monitoring.register_event_listener(_note_cache_hit)


def _compile_fresh(lower: Callable[[], Any]):
    """(compiled, whether it was compiled here rather than read from XLA's cache)."""
    _compile_reads.hit = False
    compiled = lower().compile()
    return compiled, not _compile_reads.hit


def executable(name: str, static: Any, args: Any, lower: Callable[[], Any]):
    """The compiled program for `args`: loaded from the cache when an earlier process stored it, else
    `lower()` (a jax.stages.Lowered) compiled, and stored when a cache is enabled and XLA compiled it
    (rather than reading it from its own cache).

    `static` holds every setting the traced function depends on besides `args` (hashable configs;
    its repr is part of the key). With several processes nothing is loaded or stored: their programs
    compile in lockstep, each process its own (`_executables_directory`)."""
    folder = _executables_directory()
    path = None if folder is None else folder / f"{executable_key(name, static, args)}.jaxexe"
    if path is not None and path.exists():
        try:
            compiled = _load(path)
            _count("loaded")
            return compiled
        except Exception as e:  # noqa: BLE001 - a damaged or foreign entry costs one compile
            _count("unreadable")
            log.warning("compile cache: recompiling %s: its cached executable could not be loaded (%s)",
                        path.name, brief(e, 200))
            with contextlib.suppress(OSError):
                path.unlink()  # replaced below when XLA compiles it; never read again either way
    compiled, fresh = _compile_fresh(lower)
    if path is not None and fresh:
        try:
            _store(path, compiled)
            _count("stored")
        except Exception as e:  # noqa: BLE001 - not every executable serializes; it still runs
            log.warning("compile cache: %s not kept (%s)", path.name, brief(e, 200))
    return compiled


_CACHED_JITS: list = []  # every CachedJit, for `clear_programs`


def clear_programs() -> None:
    """Drop the executables CachedJit functions hold in this process (jax.clear_caches does not see
    them); the next call loads or compiles again."""
    for function in list(_CACHED_JITS):
        function._programs.clear()


class CachedJit:
    """`jax.jit(fun, static_argnames=..., donate_argnums=...)` whose compiled programs go through
    `executable` (kept across processes) while an executable cache is enabled, and plain jit
    otherwise. Dynamic arguments are positional, static ones keywords (as the decode functions
    take them); each distinct signature is compiled or loaded once per process."""

    def __init__(self, fun: Callable, *, name: str, static_argnames: tuple = (), donate_argnums: tuple = ()):
        self.name = name
        self._static_argnames = tuple(static_argnames)
        self._jitted = jax.jit(fun, static_argnames=self._static_argnames, donate_argnums=donate_argnums)
        self._programs: dict = {}
        self._locks: dict = {}
        self._lock = threading.Lock()
        functools.update_wrapper(self, fun)
        _CACHED_JITS.append(self)

    def lower(self, *args, **kwargs):
        return self._jitted.lower(*args, **kwargs)

    def _cache_size(self) -> int:
        """Distinct programs compiled or loaded in this process (as jax.jit's `_cache_size`)."""
        return self._jitted._cache_size() + len(self._programs)  # noqa: SLF001

    def __call__(self, *args, **static):
        if _executables_directory() is None:
            return self._jitted(*args, **static)
        unknown = set(static) - set(self._static_argnames)
        if unknown:
            raise TypeError(f"{self.name}: dynamic arguments are positional; got keywords {sorted(unknown)}")
        static_items = tuple(sorted(static.items()))
        leaves, treedef = jax.tree.flatten(args)
        if any(isinstance(x, jax.core.Tracer) for x in leaves):
            return self._jitted(*args, **static)  # called inside another traced function
        memo = (static_items, treedef, tuple(
            (getattr(x, "shape", ()), getattr(x, "dtype", type(x)), getattr(x, "weak_type", False),
             getattr(x, "sharding", None)) for x in leaves))
        compiled = self._programs.get(memo)
        if compiled is None:
            with self._lock:
                signature_lock = self._locks.setdefault(memo, threading.Lock())
            with signature_lock:  # one compile or load per signature, also with several threads calling
                compiled = self._programs.get(memo)
                if compiled is None:
                    compiled = executable(self.name, static_items, args,
                                          lambda: self._jitted.lower(*args, **static))
                    self._programs[memo] = compiled
        return compiled(*args)


def cached_jit(*, name: str, static_argnames: tuple = (), donate_argnums: tuple = ()):
    """Decorator form of `CachedJit`."""
    return lambda fun: CachedJit(fun, name=name, static_argnames=static_argnames,
                                 donate_argnums=donate_argnums)
