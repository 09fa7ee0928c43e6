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
policy is stored as its update: `PolicyHistory` is the ordered list of LoRA adapters the M-steps
merged into the base (a rank-64 adapter on all seven projections of the 135M model is 78 MB of
float32, 72 MB on disk, against 457 MB for a checkpoint of its float32 params), and `restore_policy`
re-merges them in order with the same function the M-step used (`seal_jax.lora.merge_lora` on the
same host arrays), so the policy comes back bit-identical. A checkpoint holds every adapter merged
so far, so any one step is enough to resume and older steps can be pruned (`prune(keep_last)`). The
history records a fingerprint of the base params it was merged into (`params_fingerprint`):
restoring onto a different base model is refused instead of silently building another policy. A
checkpoint of whole params (a full fine-tune, or one written before policies were stored as
adapters) restores as it was saved. For state that must be stored whole, `save(compact=True)` keeps
every float leaf in the narrowest dtype that holds its values exactly (a bf16 model loaded as
float32 is stored as bf16), recording the dtype to restore.

Multi-host: every process must call `RunCheckpointer.save/restore` (orbax coordinates the writes);
`RecordLog` is plain file I/O and should be written by one process only.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
from typing import Any, Iterable, Mapping, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from seal_jax.errors import UserError

_STATE = "state"
_METADATA = "metadata"
_STORED_DTYPES = "_stored_dtypes"  # reserved metadata key: {leaf path: dtype to restore}
_POLICY = "_policy_adapters"  # reserved metadata key: a PolicyHistory's LoRA configs and base fingerprint


class PolicyCheckpointError(UserError, ValueError):
    """A policy checkpoint does not fit the params it is to be restored onto (another base model)."""


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
        self._write(step, state, _unreserved(metadata), wait=wait, compact=compact)

    def _write(self, step: int, state: Any, metadata: dict, *, wait: bool, compact: bool) -> None:
        step = int(step)
        if step < 0:
            raise ValueError(f"checkpoint step must be non-negative, got {step}")
        latest = self.latest_step()
        if latest is not None and step <= latest:
            raise ValueError(
                f"checkpoint step {step} is not after the latest saved step {latest} in {self.directory}; "
                "steps must increase (resume from latest_step() and continue counting)"
            )
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
        metadata.pop(_POLICY, None)
        return state, metadata

    def restore_metadata(self, step: Optional[int] = None) -> dict:
        """Read only the metadata of `step` (default: latest) — cheap, no arrays are loaded."""
        metadata = self._raw_metadata(step)
        for key in (_STORED_DTYPES, _POLICY):
            metadata.pop(key, None)
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
        metadata = _unreserved(metadata)
        metadata[_POLICY] = history.metadata()
        self._write(step, history.state(), metadata, wait=wait, compact=False)

    def holds_policy_history(self, step: Optional[int] = None) -> bool:
        """True when `step` (default: latest) stores the policy as adapters, False for whole params."""
        return _POLICY in self._raw_metadata(step)

    def restore_policy(self, params: Any, cfg: Any, step: Optional[int] = None, *,
                       merged: Optional["PolicyHistory"] = None
                       ) -> Tuple[Any, Optional["PolicyHistory"], dict]:
        """`(policy params, history, metadata)` of `step` (default: the latest).

        `params` are the base model with `merged`'s adapters already merged into them (`merged=None`:
        the bare base). For a checkpoint of adapters, the ones `merged` lacks are merged on in order,
        which gives the same bits as merging the whole history into the base; `merged` must be an
        earlier state of the saved history. A checkpoint of whole params is restored into `params`'
        structure and placement, and its history is None.
        """
        step = self._resolve_step(step)
        policy = self._raw_metadata(step).get(_POLICY)
        if policy is None:
            whole, metadata = self.restore(step, target=params)
            return whole, None, metadata
        state, metadata = self.restore(step)
        saved = PolicyHistory.from_saved(state, policy)
        if merged is None:  # the bare base: fingerprint it, to check it is the one the history grew on
            merged = PolicyHistory(
                base_fingerprint=params_fingerprint(params) if saved.base_fingerprint else None)
        where = f"checkpoint step {step} in {self.directory}"
        if None not in (saved.base_fingerprint, merged.base_fingerprint) and \
                saved.base_fingerprint != merged.base_fingerprint:
            raise PolicyCheckpointError(
                f"{where} holds adapters of a policy trained from another base model than the one "
                f"loaded now (params fingerprint {saved.base_fingerprint[:12]} vs "
                f"{merged.base_fingerprint[:12]}); load the model the run started from")
        if not merged.is_prefix_of(saved):
            raise PolicyCheckpointError(
                f"{where}: the params to restore onto already hold adapters that are not the first "
                f"{len(merged)} of its {len(saved)}; restore onto the base model")
        return saved.after(len(merged)).apply(params, cfg), saved, metadata

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


def _unreserved(metadata: Optional[Mapping[str, Any]]) -> dict:
    """A copy of a caller's metadata, refused when it uses a key the checkpointer writes itself."""
    metadata = dict(metadata or {})
    for key in (_STORED_DTYPES, _POLICY):
        if key in metadata:
            raise ValueError(f"metadata key {key!r} is reserved")
    return metadata


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


def params_fingerprint(params: Any, samples_per_leaf: int = 1024) -> str:
    """A hash of every leaf's path, shape, dtype and about `samples_per_leaf` evenly strided values.

    Exact (values are copied, not summed), so it is the same for the same params on any mesh or
    machine, and cheap: a few thousand numbers per leaf leave the device. Any two different models
    differ in the sampled values of nearly every leaf.
    """
    from seal_jax import distributed

    def sample(x):
        flat = jax.numpy.ravel(x)
        return flat[:: max(1, flat.size // samples_per_leaf)]

    sampled = distributed.to_host(jax.jit(lambda tree: jax.tree.map(sample, tree))(params))
    digest = hashlib.sha256()
    for (path, leaf), values in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                    jax.tree.leaves(sampled)):
        digest.update(f"{jax.tree_util.keystr(path)}|{tuple(leaf.shape)}|{np.dtype(leaf.dtype)}|".encode())
        digest.update(np.ascontiguousarray(values).tobytes())
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class PolicyHistory:
    """The policy as `base + adapter_0 + adapter_1 + ...`, each merged with `seal_jax.lora.merge_lora`.

    An M-step that trains a LoRA and merges it (`seal_jax.sft.train_policy`) adds its adapter; a
    checkpoint of the history is all a resumed run needs besides the base model file. Adapters are
    kept as host arrays: the M-step merges exactly these arrays, and a restore merges them again.
    """

    adapters: list = dataclasses.field(default_factory=list)  # LoRA pytrees, no candidate axis
    lora_cfgs: list = dataclasses.field(default_factory=list)  # their LoraConfigs
    base_fingerprint: Optional[str] = None  # `params_fingerprint` of the base; None: not checked

    def __len__(self) -> int:
        return len(self.adapters)

    def extended(self, lora: Any, lora_cfg: Any) -> "PolicyHistory":
        """This history with one more adapter merged after the others (a new history)."""
        from seal_jax import distributed

        return PolicyHistory([*self.adapters, distributed.to_host(lora)], [*self.lora_cfgs, lora_cfg],
                             self.base_fingerprint)

    def after(self, n: int) -> "PolicyHistory":
        """The adapters merged after the first n (what turns base + n adapters into this policy)."""
        return PolicyHistory(self.adapters[n:], self.lora_cfgs[n:], self.base_fingerprint)

    def is_prefix_of(self, other: "PolicyHistory") -> bool:
        """True when `other` starts with exactly these adapters and configs (bit for bit)."""
        if len(self) > len(other) or self.lora_cfgs != other.lora_cfgs[:len(self)]:
            return False
        for mine, theirs in zip(self.adapters, other.adapters):
            if jax.tree.structure(mine) != jax.tree.structure(theirs):
                return False
            if not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(mine), jax.tree.leaves(theirs))):
                return False
        return True

    def state(self) -> dict:
        return {"adapters": {f"{i:04d}": a for i, a in enumerate(self.adapters)}}

    def metadata(self) -> dict:
        configs = [{k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(c).items()}
                   for c in self.lora_cfgs]
        return {"lora_configs": configs, "base_fingerprint": self.base_fingerprint}

    @classmethod
    def from_saved(cls, state: Mapping[str, Any], metadata: Mapping[str, Any]) -> "PolicyHistory":
        from seal_jax.model.config import LoraConfig

        saved = (state or {}).get("adapters", {}) or {}
        adapters = [jax.tree.map(np.asarray, saved[k]) for k in sorted(saved)]
        configs = metadata["lora_configs"]
        if len(adapters) != len(configs):
            raise ValueError(f"policy checkpoint holds {len(adapters)} adapters but {len(configs)} configs")
        cfgs = [LoraConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in c.items()})
                for c in configs]
        return cls(adapters, cfgs, metadata.get("base_fingerprint"))

    def apply(self, params: Any, cfg: Any) -> Any:
        """`params` with every adapter merged in, in order (as the M-steps merged them)."""
        from seal_jax.lora import merge_lora

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
