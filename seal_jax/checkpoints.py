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

Checkpoints are sized to what resuming needs. The base model is reloaded from its own file, so the
policy is best stored as its update: `PolicyHistory` is the ordered list of adapters the M-steps
merged into the base (tens of MB for a rank-64 adapter of a 135M model, instead of the 457 MB of its
float32 params), and `restore_policy` re-merges them — bit-identical on the same machine, since the
merge is one deterministic XLA program. For state that must be stored whole, `save(compact=True)`
keeps every float leaf in the narrowest dtype that holds its values exactly (a bf16 model loaded as
float32 is stored as bf16), recording the dtype to restore. `prune(keep_last)` drops older steps
(0: all) once a run is finished.

Multi-host: every process must call `RunCheckpointer.save/restore` (orbax coordinates the writes);
`RecordLog` is plain file I/O and should be written by one process only.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any, Iterable, Mapping, Optional, Sequence, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp

_STATE = "state"
_METADATA = "metadata"
_STORED_DTYPES = "_stored_dtypes"  # reserved metadata key: {leaf path: dtype to restore}
_POLICY = "_policy_adapters"  # reserved metadata key: the LoRA configs of a PolicyHistory


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
             wait: bool = True, compact: bool = False) -> None:
        """Write `state` (any pytree of arrays / scalars) and a JSON-serialisable `metadata` dict.

        With `wait=True` (default) the call returns once the checkpoint is finalised on disk. With an
        `async_save` checkpointer and `wait=False` it returns after the device-to-host copy; call
        `wait_until_finished()` (or the next `save`/`close`) before relying on it. `compact=True`
        stores float leaves in the narrowest dtype that holds them exactly (see `compact_tree`).
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
        if _STORED_DTYPES in metadata:
            raise ValueError(f"metadata key {_STORED_DTYPES!r} is reserved")
        if compact:
            state, restore_dtypes = compact_tree(state)
            metadata[_STORED_DTYPES] = restore_dtypes
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
        restore_dtypes = self._raw_metadata(step).get(_STORED_DTYPES)
        if restore_dtypes and target is not None:
            target = _stored_target(target, restore_dtypes)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(**{
                _STATE: ocp.args.StandardRestore(target),
                _METADATA: ocp.args.JsonRestore(),
            }),
        )
        metadata = dict(restored[_METADATA] or {})
        state = restored[_STATE]
        if metadata.pop(_STORED_DTYPES, None):
            state = expand_tree(state, restore_dtypes)
        return state, metadata

    def restore_metadata(self, step: Optional[int] = None) -> dict:
        """Read only the metadata of `step` (default: latest) — cheap, no arrays are loaded."""
        metadata = self._raw_metadata(step)
        metadata.pop(_STORED_DTYPES, None)
        return metadata

    def _raw_metadata(self, step: Optional[int] = None) -> dict:
        step = self._resolve_step(step)
        restored = self._manager.restore(
            step, args=ocp.args.Composite(**{_METADATA: ocp.args.JsonRestore()})
        )
        return dict(restored[_METADATA] or {})

    # -- the policy as its update ------------------------------------------------------------------
    def save_policy(self, step: int, history: "PolicyHistory",
                    metadata: Optional[Mapping[str, Any]] = None, *, wait: bool = True) -> None:
        """Save the policy as the adapters merged into the base so far (plus `metadata`)."""
        metadata = dict(metadata or {})
        if _POLICY in metadata:
            raise ValueError(f"metadata key {_POLICY!r} is reserved")
        metadata[_POLICY] = history.configs_json()
        self.save(step, history.state(), metadata, wait=wait)

    def restore_policy(self, base_params: Any, cfg: Any, step: Optional[int] = None
                       ) -> Tuple[Any, "PolicyHistory", dict]:
        """`(policy params, history, metadata)`: the base with the saved adapters merged in order."""
        step = self._resolve_step(step)
        metadata = self.restore_metadata(step)
        if _POLICY not in metadata:
            raise ValueError(f"checkpoint step {step} in {self.directory} holds no policy history")
        state, metadata = self.restore(step)
        history = PolicyHistory.from_saved(state, metadata.pop(_POLICY))
        return history.apply(base_params, cfg), history, metadata

    # -- retention ---------------------------------------------------------------------------------
    def prune(self, keep_last: int) -> list[int]:
        """Delete all but the newest `keep_last` steps (0 deletes every step); returns those deleted."""
        if keep_last < 0:
            raise ValueError(f"keep_last must be >= 0, got {keep_last}")
        self._manager.wait_until_finished()
        steps = self.all_steps()
        doomed = steps[:len(steps) - keep_last] if keep_last else steps
        for step in doomed:
            self._manager.delete(step)
        return doomed

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


# ------------------------------------------------------------------------------------------------
# Sizing: exact narrow storage and the policy as its merged adapters


def _narrowest_exact(x: np.ndarray) -> Optional[np.dtype]:
    """bfloat16 or float16 if every value of the float32/64 array `x` survives the round trip."""
    import ml_dtypes

    for dtype in (np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16)):
        with np.errstate(over="ignore", invalid="ignore"):
            narrow = x.astype(dtype)
        if np.array_equal(narrow.astype(x.dtype), x, equal_nan=True):
            return dtype
    return None


def compact_tree(tree: Any) -> Tuple[Any, dict[str, dict]]:
    """Float leaves cast to the narrowest exact dtype; returns (tree, {leaf path: stored/restore dtype})."""
    restore: dict[str, dict] = {}

    def visit(path, leaf):
        if not hasattr(leaf, "dtype") or jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            return leaf
        if np.dtype(leaf.dtype) not in (np.dtype(np.float32), np.dtype(np.float64)):
            return leaf
        host = np.asarray(leaf)
        dtype = _narrowest_exact(host)
        if dtype is None:
            return leaf
        restore[jax.tree_util.keystr(path)] = {"stored": str(dtype), "restore": str(host.dtype)}
        return host.astype(dtype)

    return jax.tree_util.tree_map_with_path(visit, tree), restore


def expand_tree(tree: Any, restore_dtypes: Mapping[str, Mapping[str, str]]) -> Any:
    """Undo `compact_tree`: cast the compacted leaves back to their original dtype."""
    def visit(path, leaf):
        entry = restore_dtypes.get(jax.tree_util.keystr(path))
        return leaf if entry is None else leaf.astype(entry["restore"])

    return jax.tree_util.tree_map_with_path(visit, tree)


def _stored_target(target: Any, restore_dtypes: Mapping[str, Mapping[str, str]]) -> Any:
    """The restore target with compacted leaves asking for their stored dtype (same shape, placement)."""
    def visit(path, leaf):
        entry = restore_dtypes.get(jax.tree_util.keystr(path))
        if entry is None:
            return leaf
        return jax.ShapeDtypeStruct(leaf.shape, jax.numpy.dtype(entry["stored"]),
                                    sharding=getattr(leaf, "sharding", None))

    return jax.tree_util.tree_map_with_path(visit, target)


@dataclasses.dataclass
class PolicyHistory:
    """The policy as `base + adapter_0 + adapter_1 + ...`, each merged with `seal_jax.lora.merge_lora`.

    An M-step that trains a LoRA and merges it (`seal_jax.sft.sft_update`) appends its adapter; a
    checkpoint of the history is all a resumed run needs besides the base model file.
    """

    adapters: list = dataclasses.field(default_factory=list)  # LoRA pytrees, no candidate axis
    lora_cfgs: list = dataclasses.field(default_factory=list)  # their LoraConfigs

    def append(self, lora: Any, lora_cfg: Any) -> None:
        self.adapters.append(jax.tree.map(np.asarray, lora))
        self.lora_cfgs.append(lora_cfg)

    def state(self) -> dict:
        return {"adapters": {f"{i:04d}": a for i, a in enumerate(self.adapters)}}

    def configs_json(self) -> list[dict]:
        return [{k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(c).items()}
                for c in self.lora_cfgs]

    @classmethod
    def from_saved(cls, state: Mapping[str, Any], configs: Sequence[Mapping[str, Any]]) -> "PolicyHistory":
        from seal_jax.model.config import LoraConfig

        saved = (state or {}).get("adapters", {}) or {}
        adapters = [saved[k] for k in sorted(saved)]
        if len(adapters) != len(configs):
            raise ValueError(f"policy checkpoint holds {len(adapters)} adapters but {len(configs)} configs")
        cfgs = [LoraConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in c.items()})
                for c in configs]
        return cls(adapters, cfgs)

    def apply(self, base_params: Any, cfg: Any) -> Any:
        from seal_jax.lora import merge_lora

        params = base_params
        for lora, lora_cfg in zip(self.adapters, self.lora_cfgs):
            params = merge_lora(params, lora, cfg, lora_cfg)
        return params


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
