"""Durable run state: orbax checkpoints per round and an append-only record log per candidate.

A SEAL run is long (rounds of sample -> fine-tune K candidates -> evaluate -> SFT the policy) and may be
interrupted at any point. Two kinds of state must survive:

* `RunCheckpointer` — the *round-level* state: policy params (or a policy delta), rng keys, counters,
  any arrays, plus a JSON metadata dict (round index, completed phases, config snapshot). It wraps
  `orbax.checkpoint.CheckpointManager` with the stable Composite API (`args.StandardSave` for the pytree,
  `args.JsonSave` for the metadata). Orbax writes each step into a temporary directory and renames it
  only once everything is on disk, so a crash mid-save leaves the previous step as the latest usable
  one; leftover temporary directories are removed when the checkpointer is reopened.
* `RecordLog` — the *candidate-level* results finished between two checkpoints (one JSON object per
  line, fsynced on append), so a resumed round can skip work already done. A crash mid-append leaves at
  most one truncated last line, which is ignored when reading and cut off before the next append.

Multi-host: every process must call `RunCheckpointer.save/restore` (orbax coordinates the writes);
`RecordLog` is plain file I/O and should be written by one process only.
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Iterable, Mapping, Optional, Tuple

import orbax.checkpoint as ocp

_STATE = "state"
_METADATA = "metadata"


class RunCheckpointer:
    """Save/restore `(state pytree, metadata dict)` pairs indexed by an increasing integer step.

    `step` is whatever the driver counts (a round, or round*phases + phase); it must increase across
    saves. Only the newest `max_to_keep` steps are kept on disk.
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: Optional[int] = 3,
                 async_save: bool = False):
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1 or None (keep all), got {max_to_keep}")
        self.directory = pathlib.Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=True,
            # A crash between orbax's write and its atomic rename leaves `<step>.orbax-checkpoint-tmp-*`
            # directories behind; they are never read, only removed here so they do not accumulate.
            cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    # -- queries ---------------------------------------------------------------------------------
    def latest_step(self) -> Optional[int]:
        """Newest finalised step, or None when the directory holds no complete checkpoint."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    # -- save / restore --------------------------------------------------------------------------
    def save(self, step: int, state: Any, metadata: Optional[Mapping[str, Any]] = None, *,
             wait: bool = True) -> None:
        """Write `state` (any pytree of arrays / scalars) and a JSON-serialisable `metadata` dict.

        With `wait=True` (default) the call returns once the checkpoint is finalised on disk. With an
        `async_save` checkpointer and `wait=False` it returns after the device-to-host copy; call
        `wait_until_finished()` (or the next `save`/`close`) before relying on it.
        """
        step = int(step)
        if step < 0:
            raise ValueError(f"checkpoint step must be non-negative, got {step}")
        latest = self.latest_step()
        if latest is not None and step <= latest:
            raise ValueError(
                f"checkpoint step {step} is not after the latest saved step {latest} in {self.directory}; "
                "steps must increase (resume from latest_step() and continue counting)"
            )
        metadata = dict(metadata or {})
        try:
            json.dumps(metadata, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ValueError(f"checkpoint metadata for step {step} is not JSON-serialisable: {e}") from e
        saved = self._manager.save(
            step,
            args=ocp.args.Composite(**{
                _STATE: ocp.args.StandardSave(state),
                _METADATA: ocp.args.JsonSave(metadata),
            }),
            force=True,  # our own monotonicity check above replaces orbax's save-interval policy
        )
        if not saved:
            raise RuntimeError(f"orbax declined to save step {step} in {self.directory}")
        if wait:
            self._manager.wait_until_finished()

    def restore(self, step: Optional[int] = None, target: Any = None) -> Tuple[Any, dict]:
        """Return `(state, metadata)` of `step` (default: the latest).

        `target` is an abstract tree (e.g. `jax.ShapeDtypeStruct`s with shardings, or concrete arrays)
        giving the structure, dtypes and placement to restore into; without it the saved structure is
        restored as saved.
        """
        step = self._resolve_step(step)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(**{
                _STATE: ocp.args.StandardRestore(target),
                _METADATA: ocp.args.JsonRestore(),
            }),
        )
        return restored[_STATE], dict(restored[_METADATA] or {})

    def restore_metadata(self, step: Optional[int] = None) -> dict:
        """Read only the metadata of `step` (default: latest) — cheap, no arrays are loaded."""
        step = self._resolve_step(step)
        restored = self._manager.restore(
            step, args=ocp.args.Composite(**{_METADATA: ocp.args.JsonRestore()})
        )
        return dict(restored[_METADATA] or {})

    def _resolve_step(self, step: Optional[int]) -> int:
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
            return steps[-1]
        if int(step) not in steps:
            raise FileNotFoundError(
                f"no complete checkpoint for step {step} in {self.directory}; available: {steps}"
            )
        return int(step)

    # -- lifecycle -------------------------------------------------------------------------------
    def wait_until_finished(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> "RunCheckpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RecordLog:
    """Append-only JSON-lines file of per-candidate records that survives crashes.

    Each `append` writes one line and fsyncs it before returning, so a record that was acknowledged is
    on disk. A crash mid-write can leave only the *last* line incomplete; `read` skips it and the next
    `append` truncates it away first (it was never acknowledged). A malformed line anywhere else means
    the file was edited or corrupted, and is an error.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        self._repaired = False

    def append(self, record: Mapping[str, Any]) -> None:
        self.extend([record])

    def extend(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Append several records with a single fsync."""
        lines = []
        for record in records:
            if not isinstance(record, Mapping):
                raise TypeError(f"records must be dicts, got {type(record).__name__}")
            try:
                # One physical line per record: json.dumps escapes newlines inside strings.
                lines.append(json.dumps(dict(record), allow_nan=False, separators=(",", ":")) + "\n")
            except (TypeError, ValueError) as e:
                raise ValueError(f"record is not JSON-serialisable: {e}") from e
        if not lines:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self._repaired:
            self._drop_truncated_tail()
            self._repaired = True
        with open(self.path, "ab") as f:
            f.write("".join(lines).encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())

    def read(self) -> list[dict]:
        """All complete records, in append order ([] when the file does not exist yet)."""
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        # After the final "\n" comes either nothing (clean file) or an unterminated, unacknowledged line.
        complete, _tail = lines[:-1], lines[-1]
        records = []
        for lineno, line in enumerate(complete, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{self.path}: line {lineno} is not valid JSON ({e}); the log is corrupt") from e
            if not isinstance(record, dict):
                raise ValueError(f"{self.path}: line {lineno} is not a JSON object")
            records.append(record)
        return records

    def __iter__(self):
        return iter(self.read())

    def __len__(self) -> int:
        return len(self.read())

    def _drop_truncated_tail(self) -> None:
        if not self.path.exists():
            return
        with open(self.path, "rb+") as f:
            data = f.read()
            keep = data.rfind(b"\n") + 1  # 0 when no complete line exists
            if keep != len(data):
                f.truncate(keep)
                f.flush()
                os.fsync(f.fileno())
