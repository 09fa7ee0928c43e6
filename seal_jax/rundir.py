"""Run directories as marked seal_jax runs, safe resume, and content-keyed candidate records.

A run directory holds a marker file, `seal_run.json`: the run's kind (e.g. "knowledge/rest_em"), the
seal_jax version, the creation time, the resolved config (flattened to dotted keys) and its
fingerprint — a hash of the config without the keys declared resume-safe. The marker is what makes a
folder a run:

* `create(root, name, config)` claims a fresh `<root>/<name>/<UTC time>-<random>/` (never an existing
  folder) and writes the marker atomically (temp file + fsync + rename). Used as a context manager, it
  removes the folder again when the run fails before producing anything, so failed runs leave no empty
  folders behind.
* `open_for_resume(path, config)` refuses a folder without a marker (a model folder with a
  `config.json` is not a run), and refuses a config that differs from the run's in any key not declared
  resume-safe, naming each differing key with both values. Resuming a k=2 run with k=1 would otherwise
  re-sample edits and score them with the old records.

Content keys (`record_key`): a candidate's record is keyed by a hash of everything that determines its
result — the self-edit text, phase, context id, edit index, rep, seed and a hash of the
training-relevant config (`training_config_hash`) — so a stale record can never score a different
self-edit, even if positions (edit index, rep) coincide.
"""
from __future__ import annotations

import datetime as _dt
import fnmatch
import hashlib
import json
import os
import pathlib
import secrets
import shutil
from typing import Any, Iterable, Mapping, Optional, Sequence

from seal_jax.errors import RunDirError

MARKER = "seal_run.json"
MARKER_FORMAT = 1
# Files written while a run is set up, before any result: a folder holding only these (and empty
# folders) has produced nothing and is removed when the run fails.
SETUP_FILES = frozenset({MARKER, "config.json", "split.json", "timings.jsonl"})  # seal_jax.timings
_fresh_runs: list["RunDir"] = []  # created by this process (see discard_unproductive_runs)

# Keys that choose how fast the same computation runs (the same function to float rounding). They
# are safe to change on resume also for runs created before they existed, whatever the run's marker
# lists: a run from before `attention_impl` resumes under a config that now sets it.
SPEED_ONLY_KEYS: tuple[str, ...] = ("attention_impl", "inner.pack_merge_share", "saved_residuals")

# Keys whose change does not alter any result already on disk: more (or fewer) rounds continue the
# same sequence of rounds; the rest are cosmetic or say where the run is. fnmatch patterns.
DEFAULT_RESUME_SAFE: tuple[str, ...] = (
    "rest_em.rounds", "progress", "resume", "run_root", "run_name", "debug",
    "checkpoint.keep_last", "compile_cache",
    # How many candidates train per call: grouping pins each candidate's seed, so no result changes.
    "candidates_per_call",
    # How a step's sequences are laid out (packed rows or a row per candidate): the same training,
    # summed in another order.
    "inner.packing",
    *SPEED_ONLY_KEYS,
)

# Training keys that lay a step out without changing what it computes (beyond float rounding): a
# record trained either way stays valid, and runs from before the key existed keep their records.
LAYOUT_KEYS: tuple[str, ...] = ("inner.packing", *SPEED_ONLY_KEYS)

# Config keys that determine a candidate's training and score (prefixes of dotted keys). Changing any
# of them makes every earlier candidate record stale.
TRAINING_KEYS: tuple[str, ...] = (
    "model", "tokenizer", "param_dtype", "compute_dtype", "chat", "lora", "inner", "eval", "grader",
    "self_edit.prompt", "self_edit.split_newlines", "self_edit.max_sequence_tokens",
)


def seal_jax_version() -> str:
    try:
        from importlib.metadata import version

        return version("seal_jax")
    except Exception:  # not installed as a distribution (a plain checkout on PYTHONPATH)
        return "unknown"


# ------------------------------------------------------------------------------------------------
# Config flattening and hashing


def flatten_config(config: Any) -> dict[str, Any]:
    """Nested config (ConfigDict or dict) -> {dotted key: JSON-normal value} (tuples become lists)."""
    tree = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    flat: dict[str, Any] = {}

    def walk(node: Mapping, prefix: str) -> None:
        for key, value in node.items():
            dotted = f"{prefix}{key}"
            if isinstance(value, Mapping) and value:
                walk(value, dotted + ".")
            else:
                flat[dotted] = value

    walk(tree, "")
    # A JSON round trip normalises tuples to lists and numpy scalars/paths to plain values, so a config
    # read back from the marker compares equal to the live one.
    return json.loads(json.dumps(flat, sort_keys=True, default=str))


def _matches(key: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, p) or key.startswith(p + ".") for p in patterns)


def _hash(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def config_fingerprint(config: Any, resume_safe: Sequence[str] = DEFAULT_RESUME_SAFE) -> str:
    """Hash of the resolved config without the resume-safe keys."""
    flat = flatten_config(config)
    return _hash({k: v for k, v in flat.items() if not _matches(k, resume_safe)})


def training_config_hash(config: Any, keys: Sequence[str] = TRAINING_KEYS) -> str:
    """Hash of the config keys that determine a candidate's training and evaluation."""
    flat = flatten_config(config)
    return _hash({k: v for k, v in flat.items() if _matches(k, keys) and not _matches(k, LAYOUT_KEYS)})[:16]


def record_key(*, self_edit: str, phase: str, context_id: str, edit_index: int, rep: int, seed: int,
               config_hash: str) -> str:
    """Content key of one candidate record: equal keys <=> same self-edit trained and scored alike."""
    text_hash = hashlib.sha256(self_edit.encode("utf-8", "surrogatepass")).hexdigest()
    return _hash({"self_edit_sha256": text_hash, "phase": phase, "context_id": str(context_id),
                  "edit_index": int(edit_index), "rep": int(rep), "seed": int(seed),
                  "config": config_hash})[:32]


# ------------------------------------------------------------------------------------------------
# Run directories


class RunDir:
    """An opened run directory. As a context manager it discards itself if the body fails early."""

    def __init__(self, path: pathlib.Path, marker: dict, *, fresh: bool,
                 changed_safe: Optional[dict[str, tuple[Any, Any]]] = None):
        self.path = path
        self.marker = marker
        self.fresh = fresh  # created by this process (may be discarded when the run fails early)
        self.changed_safe = changed_safe or {}  # resume-safe keys changed since the run was created

    def __fspath__(self) -> str:
        return str(self.path)

    def __truediv__(self, other) -> pathlib.Path:
        return self.path / other

    def produced_anything(self) -> bool:
        """True once any file besides the marker and config.json exists under the folder."""
        for _dirpath, _dirnames, filenames in os.walk(self.path):
            rel = pathlib.Path(_dirpath).relative_to(self.path)
            for name in filenames:
                if rel != pathlib.Path(".") or (name not in SETUP_FILES and not name.endswith(".tmp")):
                    return True
        return False

    def discard_if_empty(self) -> bool:
        """Remove a fresh folder that holds nothing but what `create` wrote; True if removed."""
        if not self.fresh or not self.path.exists() or self.produced_anything():
            return False
        shutil.rmtree(self.path)
        parent = self.path.parent
        try:  # the <root>/<name> folder too, when this run was its only child
            parent.rmdir()
        except OSError:
            pass
        return True

    def resume_hint(self, argv: Optional[Sequence[str]] = None) -> str:
        return f"resume with: {resume_command(self.path, argv)}"

    def __enter__(self) -> "RunDir":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            self.discard_if_empty()
        return False


def _write_json_atomic(path: pathlib.Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fresh_name() -> str:
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{secrets.token_hex(3)}"


def create(root: str | os.PathLike, name: str, config: Any, *, kind: str,
           resume_safe: Sequence[str] = DEFAULT_RESUME_SAFE) -> RunDir:
    """Claim a new run folder `<root>/<name>/<time>-<random>/` and mark it; never reuses a folder."""
    parent = pathlib.Path(root) / name
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"cannot create run folder under {parent}: {e.strerror or e}",
                          hint="set --config.run_root to a writable folder") from None
    for _ in range(100):
        path = parent / _fresh_name()
        try:
            path.mkdir(exist_ok=False)  # atomic claim: two runs can never share a folder
            break
        except FileExistsError:
            continue
    else:
        raise RunDirError(f"could not create a fresh run folder under {parent}")
    flat = flatten_config(config)
    marker = {
        "format": MARKER_FORMAT,
        "kind": kind,
        "seal_jax_version": seal_jax_version(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "resume_safe": list(resume_safe),
        "fingerprint": config_fingerprint(config, resume_safe),
        "config": flat,
        "resumed": [],
    }
    run = RunDir(path, marker, fresh=True)
    _fresh_runs.append(run)
    with run:  # a failure while marking leaves no folder
        _write_json_atomic(path / "config.json", config.to_dict() if hasattr(config, "to_dict")
                           else dict(config))
        _write_json_atomic(path / MARKER, marker)
    return run


def discard_unproductive_runs() -> list[pathlib.Path]:
    """Remove the run folders this process created that hold nothing yet (call when a run fails)."""
    removed = [run.path for run in _fresh_runs if run.discard_if_empty()]
    _fresh_runs.clear()
    return removed


def resume_command(run_path: pathlib.Path, argv: Optional[Sequence[str]] = None) -> str:
    """The command line that resumes this run: the original arguments plus --config.resume=<path>."""
    import shlex
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    args = [a for a in args if not a.startswith("--config.resume")]
    return " ".join(["python -m seal_jax", *map(shlex.quote, args), f"--config.resume={run_path}"])


def read_marker(path: str | os.PathLike) -> dict:
    """The marker of a run folder; a one-line `RunDirError` for anything that is not a seal_jax run."""
    path = pathlib.Path(path)
    if not path.exists():
        raise RunDirError(f"resume: {path} does not exist")
    if not path.is_dir():
        raise RunDirError(f"resume: {path} is a file, not a run folder")
    marker_path = path / MARKER
    if not marker_path.exists():
        what = ("it has a config.json but no seal_run.json marker (a model folder?)"
                if (path / "config.json").exists() else "it has no seal_run.json marker")
        raise RunDirError(f"resume: {path} is not a seal_jax run folder: {what}",
                          hint="pass a folder printed as 'results: ...' by an earlier run")
    try:
        marker = json.loads(marker_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunDirError(f"resume: {marker_path} is corrupt ({e})") from None
    if not isinstance(marker, dict) or not {"kind", "fingerprint", "config"} <= set(marker):
        raise RunDirError(f"resume: {marker_path} is not a seal_jax run marker")
    if int(marker.get("format", 0)) > MARKER_FORMAT:
        raise RunDirError(f"resume: {path} was written by a newer seal_jax "
                          f"({marker.get('seal_jax_version')}); this is {seal_jax_version()}")
    return marker


def config_changes(old_flat: Mapping[str, Any], new_flat: Mapping[str, Any]) -> dict[str, tuple]:
    """{key: (old, new)} for every key whose value differs (missing keys show as '<absent>')."""
    absent = "<absent>"
    return {k: (old_flat.get(k, absent), new_flat.get(k, absent))
            for k in sorted(set(old_flat) | set(new_flat))
            if old_flat.get(k, absent) != new_flat.get(k, absent)}


def open_for_resume(path: str | os.PathLike, config: Any, *, kind: Optional[str] = None,
                    resume_safe: Optional[Sequence[str]] = None) -> RunDir:
    """Open an existing run for resuming with `config`; refuses other folders and unsafe changes.

    `resume_safe` defaults to the list stored in the run's marker (the one it was created with).
    The resume (time, safe changes) is appended to the marker.
    """
    path = pathlib.Path(path)
    marker = read_marker(path)
    if kind is not None and marker["kind"] != kind:
        raise RunDirError(f"resume: {path} is a {marker['kind']!r} run, not {kind!r}")
    safe = list(resume_safe if resume_safe is not None else marker.get("resume_safe", DEFAULT_RESUME_SAFE))
    safe += [k for k in SPEED_ONLY_KEYS if k not in safe]
    changes = config_changes(marker["config"], flatten_config(config))
    unsafe = {k: v for k, v in changes.items() if not _matches(k, safe)}
    if unsafe:
        shown = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in unsafe.items())
        raise RunDirError(
            f"resume: the config differs from the run's in {len(unsafe)} key(s) that change results: "
            f"{shown}",
            hint=f"resume with the run's own config ({path / 'config.json'}) or start a new run; "
                 f"keys safe to change on resume: {', '.join(safe)}")
    safe_changes = {k: v for k, v in changes.items() if k not in unsafe}
    marker.setdefault("resumed", []).append({
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "seal_jax_version": seal_jax_version(),
        "changed": {k: list(v) for k, v in safe_changes.items()},
    })
    _write_json_atomic(path / MARKER, marker)
    return RunDir(path, marker, fresh=False, changed_safe=safe_changes)


def create_or_resume(config: Any, *, kind: str,
                     resume_safe: Sequence[str] = DEFAULT_RESUME_SAFE) -> RunDir:
    """`config.resume` set: open that run for resuming; else create `<run_root>/<run_name>/...`."""
    if config.get("resume", ""):
        return open_for_resume(config.resume, config, kind=kind)
    return create(config.get("run_root", "runs"), config.get("run_name", "run"), config, kind=kind,
                  resume_safe=resume_safe)
