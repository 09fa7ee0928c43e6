"""Multi-process runs: one controller process per host, one global mesh over every host's devices.

JAX runs multi-host programs "multi-controller": the same Python program is started once per host
(or, for testing, N times on one machine), `jax.distributed.initialize` connects the processes, and
`jax.devices()` then lists every process's devices while `jax.local_devices()` lists only this
process's. A mesh built from `jax.devices()` spans all processes; a jitted function over it runs as one
SPMD program whose collectives cross hosts. What this changes for seal_jax, and where it is handled:

* Inputs. Host values (numpy tables of a `TrainPlan`, base params loaded from disk) must become
  *global* arrays before a jitted function sharded over a multi-process mesh accepts them. Every
  process holds the same host value here (the round is deterministic and runs on every process), so
  `put_global` builds each global array with `jax.make_array_from_callback`: a process transfers only
  the shards its own devices hold, i.e. its share of the candidates. `put_local_share` is the other
  way in, for data only this process built (`jax.make_array_from_process_local_data`).
* Outputs. `np.asarray` of an array with shards on other hosts fails; `to_host` gathers it
  (`process_allgather`) so every process sees the whole result.
* Side effects. Records, checkpoints and result files are written by process 0 only (`is_main`);
  host work that is worth splitting (e.g. an HTTP grader) takes `candidate_share` / `share_of` rows
  on each process and `allgather_objects` reassembles them in order.

Collectives (`to_host`, `allgather_objects`, `barrier`, jitted programs over a multi-process mesh) must
be called by every process in the same order: keep them out of `if is_main():` branches.

On one process every helper degrades to the single-process behaviour at no cost.
"""
from __future__ import annotations

import json
import logging
import math
import pathlib
import shutil
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, Sharding

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------
# Process group


def initialize(num_processes: int | None, coordinator_address: str | None = None,
               process_id: int | None = None, *, initialization_timeout: int | None = None) -> bool:
    """`jax.distributed.initialize` for a run of `num_processes` > 1 processes; a no-op otherwise.

    `coordinator_address` ("host:port") and `process_id` may be left None where JAX detects the
    cluster itself (SLURM, TPU VMs, Kubernetes). Must run before anything touches the devices.
    Returns True when it initialised (or the runtime already was initialised).
    """
    if num_processes is None or int(num_processes) <= 1:
        return False
    if _is_initialized():
        return True
    # CPU processes need a collectives backend to run cross-process programs; jax versions that
    # default to none would otherwise fail at the first collective. GPU/TPU clients ignore it.
    if "jax_cpu_collectives_implementation" in jax.config.values and \
            jax.config.values["jax_cpu_collectives_implementation"] in (None, "none", ""):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs: dict[str, Any] = {"num_processes": int(num_processes)}
    if coordinator_address:
        kwargs["coordinator_address"] = str(coordinator_address)
    if process_id is not None and int(process_id) >= 0:
        kwargs["process_id"] = int(process_id)
    if initialization_timeout is not None:
        kwargs["initialization_timeout"] = int(initialization_timeout)
    jax.distributed.initialize(**kwargs)
    log.info("process %d of %d: %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return True


def _is_initialized() -> bool:
    is_initialized = getattr(jax.distributed, "is_initialized", None)
    return bool(is_initialized()) if is_initialized is not None else False


def process_index() -> int:
    return jax.process_index()


def process_count() -> int:
    return jax.process_count()


def is_main() -> bool:
    """True on the process that writes records, checkpoints and results (process 0)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier called `name` (a no-op on one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


# ----------------------------------------------------------------------------------------------------
# Host values <-> global arrays


def spans_processes(x: Mesh | Sharding) -> bool:
    """True when a mesh or sharding has devices owned by other processes."""
    devices = x.devices.flat if isinstance(x, Mesh) else x.device_set
    me = jax.process_index()
    return any(d.process_index != me for d in devices)


def _put_leaf(x, sharding: Sharding):
    if sharding is None or x is None:
        return x
    if isinstance(x, jax.Array):
        if x.sharding == sharding:
            return x
        if not x.is_fully_addressable:
            return jax.device_put(x, sharding)  # global -> global: XLA reshards across processes
        x = np.asarray(x)  # a process-local copy (e.g. loaded or initialised on local device 0)
    x = np.asarray(x)
    if not spans_processes(sharding):
        return jax.device_put(x, sharding)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def put_global(tree: Any, shardings: Any) -> Any:
    """Global arrays from host values that are identical on every process.

    `shardings` is a tree matching `tree`, or one Sharding for all its leaves. Each process transfers
    only the shards its own devices hold; leaves that already carry their sharding pass through.
    """
    if shardings is None:
        return tree
    if isinstance(shardings, Sharding):
        return jax.tree.map(lambda x: _put_leaf(x, shardings), tree)
    return jax.tree.map(_put_leaf, tree, shardings, is_leaf=lambda x: x is None)


def put_local_share(tree: Any, sharding: Sharding, axis: int = 0) -> Any:
    """Global arrays from this process's *own* rows along `axis` (its `candidate_share`).

    Every leaf's global size along `axis` is the sum of all processes' shares.
    """
    def put(x):
        x = np.asarray(x)
        if not spans_processes(sharding):
            return jax.device_put(x, sharding)
        global_shape = list(x.shape)
        global_shape[axis] = x.shape[axis] * jax.process_count()
        return jax.make_array_from_process_local_data(sharding, x, tuple(global_shape))

    return jax.tree.map(put, tree)


def to_host(tree: Any) -> Any:
    """numpy copies of every leaf; arrays with shards on other processes are gathered first.

    A collective when any leaf spans processes: every process must call it at the same point.
    """
    from jax.experimental import multihost_utils

    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(get, tree)


def global_inputs(fn: Callable, in_shardings: Sequence[Any]) -> Callable:
    """Wrap a jitted `fn` so host / process-local arguments become global arrays first.

    Returns `fn` itself unless some sharding spans processes, so single-process runs pay nothing.
    Arguments already placed with their sharding (e.g. base params put once with `put_global`) pass
    through untouched; anything else is re-placed on every call.
    """
    leaves = [s for s in jax.tree.leaves(in_shardings) if isinstance(s, Sharding)]
    if not any(spans_processes(s) for s in leaves):
        return fn

    def call(*args):
        placed = tuple(put_global(a, s) for a, s in zip(args, in_shardings))
        return fn(*placed, *args[len(placed):])

    call.__wrapped__ = fn
    return call


# ----------------------------------------------------------------------------------------------------
# Splitting host work, gathering host results


def candidate_share(num_candidates: int, sharding: Sharding) -> np.ndarray:
    """Sorted indices along axis 0 of a [num_candidates, ...] array held by this process's devices.

    `sharding` is the candidate sharding (e.g. `sharding.candidate_sharding(mesh, 1)`). With the
    candidate axis replicated every process holds every candidate.
    """
    held: set[int] = set()
    for index in sharding.addressable_devices_indices_map((num_candidates,)).values():
        held.update(range(num_candidates)[index[0]])
    return np.array(sorted(held), np.int64)


def share_of(num_items: int, index: int | None = None, count: int | None = None) -> range:
    """Contiguous block of `num_items` rows for process `index` of `count` (sizes differ by <= 1)."""
    index = jax.process_index() if index is None else index
    count = jax.process_count() if count is None else count
    base, extra = divmod(num_items, count)
    start = index * base + min(index, extra)
    return range(start, start + base + (index < extra))


def allgather_objects(obj: Any) -> list:
    """`[obj of process 0, obj of process 1, ...]` for a JSON-serialisable `obj` (a collective)."""
    if jax.process_count() == 1:
        return [obj]
    from jax.experimental import multihost_utils

    payload = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.int32(payload.size)))
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: payload.size] = payload
    rows = np.asarray(multihost_utils.process_allgather(padded))
    return [json.loads(bytes(row[: int(n)]).decode()) for row, n in zip(rows, sizes)]


def gather_shares(local_items: list, num_items: int) -> list:
    """Reassemble per-process `share_of(num_items)` results into one ordered list on every process."""
    parts = allgather_objects(local_items)
    out = [item for part in parts for item in part]
    if len(out) != num_items:
        raise ValueError(f"gathered {len(out)} items from {len(parts)} processes, expected {num_items}")
    return out


def broadcast_from_main(obj: Any) -> Any:
    """Process 0's value of a JSON-serialisable `obj`, on every process (a collective)."""
    return allgather_objects(obj)[0]


# ----------------------------------------------------------------------------------------------------
# Run directories: one set of results, written by process 0


def process_run_dirs(make_run_dir: Callable[[], pathlib.Path]) -> tuple[pathlib.Path, pathlib.Path]:
    """(the run directory, the directory this process writes its files into). A collective.

    Process 0 calls `make_run_dir()` (creates a fresh directory, or returns the one being resumed)
    and every process learns its path. Process 0 writes into it. Every other process writes into a
    private mirror `<run_dir>/.process<i>/`, seeded with copies of the run directory's files (the
    records and cached self-edits of a resumed run): all processes then read the same state and skip
    the same finished work, so they stay in lockstep through every collective, while whatever the
    others write stays out of the run's results. Resuming needs a filesystem shared by the hosts
    (as multi-host orbax checkpoints do); checkpoints go to the run directory itself from every
    process (orbax writes each array shard once).
    """
    path = str(make_run_dir()) if is_main() else None
    run_dir = pathlib.Path(broadcast_from_main(path))
    own = run_dir
    if not is_main():
        own = run_dir / f".process{jax.process_index()}"
        own.mkdir(parents=True, exist_ok=True)
        for item in run_dir.iterdir():
            if item.is_file():
                shutil.copy2(item, own / item.name)
    barrier("seal_jax.process_run_dirs")  # process 0 writes nothing until every mirror is seeded
    return run_dir, own


def num_hosts_in(mesh: Mesh) -> int:
    return len({d.process_index for d in mesh.devices.flat})


def describe(mesh: Mesh | None = None) -> dict:
    """Process / device layout (logged at start-up, printed by the launch check)."""
    out = {"process_index": jax.process_index(), "process_count": jax.process_count(),
           "local_devices": jax.local_device_count(), "global_devices": jax.device_count(),
           "backend": jax.default_backend()}
    if mesh is not None:
        out["mesh"] = {str(k): int(v) for k, v in mesh.shape.items()}
        out["mesh_processes"] = num_hosts_in(mesh)
        out["mesh_devices"] = math.prod(mesh.shape.values())
    return out
