"""Device meshes and logical-axis sharding rules, as data.

Model and adapter code name *logical* axes only ("embed", "mlp", "heads", "candidate", ...; see
`param_logical_axes` in the model and `lora_logical_axes` in `seal_jax.lora`). Which mesh axis a
logical axis is split over is decided here by a rules table, so moving from one GPU to eight, or from
replicated base weights to FSDP or tensor parallelism, is a config change:

    mesh:  {"axes": {"candidate": -1}}                          K candidates split over all devices
           {"axes": {"candidate": 4, "fsdp": 2}}                 base weights sharded 2 ways as well
           {"axes": {"candidate": 2, "tensor": 4}}               Megatron-style split of heads / MLP
    rules: [(logical_name, mesh_axis | (mesh_axis, ...) | None), ...]

Rule semantics (as in MaxText): for each logical axis of an array, the first rule naming it whose mesh
axes are all present in the mesh, not already used by another dim of the same array, and (when the
shape is known) divide the dim's size, wins; mesh axes of size 1 are dropped. A logical axis with no
usable rule is replicated. Candidates are independent, so the candidate axis is split over the
"candidate" *and* "fsdp" mesh axes (FSDP = data parallel over candidates + sharded weights).
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MeshAxes = str | tuple[str, ...] | None
Rules = Sequence[tuple[str, MeshAxes]]

DEFAULT_RULES: tuple[tuple[str, MeshAxes], ...] = (
    ("candidate", ("candidate", "fsdp")),
    ("candidate", "candidate"),
    ("batch", ("candidate", "fsdp")),
    ("batch", "candidate"),
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("mlp", "fsdp"),
    ("head_dim", None),
    ("norm", None),
    # Adapters are small: keep each candidate's adapter whole on its devices.
    ("lora_in", None),
    ("lora_out", None),
    ("lora_rank", None),
)


def _cfg_get(cfg: Any, key: str, default=None):
    if cfg is None:
        return default
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def make_mesh(mesh_cfg: Any = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Mesh from `{"axes": {name: size, ...}}` (dict or ConfigDict); one size may be -1 (= the rest).

    `None` or no axes gives a 1-D "candidate" mesh over all devices. The product of sizes must equal
    the number of devices used; axis order is the order given (put the fastest-communicating axis,
    usually "tensor", last).
    """
    devices = list(jax.devices() if devices is None else devices)
    axes = _cfg_get(mesh_cfg, "axes") or {"candidate": -1}
    names = [str(n) for n in axes.keys()]
    sizes = [int(axes[n]) for n in axes.keys()]
    if len(set(names)) != len(names):
        raise ValueError(f"mesh axis names repeat: {names}")
    if sum(s == -1 for s in sizes) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(names, sizes))}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh axis sizes must be positive or -1, got {dict(zip(names, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices cannot be split into mesh "
                             f"{dict(zip(names, sizes))}")
        sizes[sizes.index(-1)] = len(devices) // known
    total = math.prod(sizes)
    if total > len(devices):
        raise ValueError(f"mesh {dict(zip(names, sizes))} needs {total} devices, "
                         f"only {len(devices)} available")
    device_grid = np.asarray(devices[:total], dtype=object).reshape(sizes)
    return Mesh(device_grid, tuple(names), axis_types=(jax.sharding.AxisType.Auto,) * len(names))


def rules_from_config(cfg: Any) -> tuple[tuple[str, MeshAxes], ...]:
    """`cfg.logical_axis_rules` as a tuple of (logical, mesh axes) pairs; DEFAULT_RULES if absent."""
    rules = _cfg_get(cfg, "logical_axis_rules")
    if rules is None:
        return DEFAULT_RULES
    out = []
    for rule in rules:
        if len(rule) != 2:
            raise ValueError(f"logical_axis_rules entries are (logical, mesh_axes) pairs, got {rule!r}")
        logical, mesh_axes = rule
        if isinstance(mesh_axes, list):
            mesh_axes = tuple(mesh_axes)
        out.append((str(logical), mesh_axes))
    return tuple(out)


def logical_to_spec(logical_axes: Sequence[str | None], mesh: Mesh, rules: Rules = DEFAULT_RULES,
                    shape: Sequence[int] | None = None) -> PartitionSpec:
    """PartitionSpec for one array whose dims carry the given logical names."""
    if shape is not None and len(shape) != len(logical_axes):
        raise ValueError(f"logical axes {tuple(logical_axes)} do not match shape {tuple(shape)}")
    used: set[str] = set()
    spec = []
    for dim, logical in enumerate(logical_axes):
        chosen = None
        for name, mesh_axes in rules:
            if name != logical or logical is None:
                continue
            if mesh_axes is None:
                break  # explicitly replicated
            axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
            if not all(a in mesh.shape for a in axes) or used.intersection(axes):
                continue
            axes = tuple(a for a in axes if mesh.shape[a] > 1)
            if not axes:
                continue
            if shape is not None and shape[dim] % math.prod(mesh.shape[a] for a in axes):
                continue
            chosen = axes
            break
        if chosen:
            used.update(chosen)
            spec.append(chosen[0] if len(chosen) == 1 else chosen)
        else:
            spec.append(None)
    return PartitionSpec(*spec)


def _is_axes_leaf(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(a, (str, type(None))) for a in x)


def logical_to_sharding(logical_axes_tree: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES,
                        shapes: Any = None) -> Any:
    """Tree of NamedSharding from a tree of logical-axis tuples (leaves are tuples of names).

    `shapes` (optional): a matching tree of arrays or ShapeDtypeStructs; dims a rule's mesh axes do
    not divide are then left replicated instead of failing at placement time.
    """
    if shapes is None:
        return jax.tree.map(lambda axes: NamedSharding(mesh, logical_to_spec(axes, mesh, rules)),
                            logical_axes_tree, is_leaf=_is_axes_leaf)
    return jax.tree.map(
        lambda axes, x: NamedSharding(mesh, logical_to_spec(axes, mesh, rules, np.shape(x))),
        logical_axes_tree, shapes, is_leaf=_is_axes_leaf)


def candidate_mesh_axes(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> tuple[str, ...]:
    """The mesh axes the logical "candidate" axis is split over (empty: not split)."""
    spec = logical_to_spec(("candidate",), mesh, rules)[0]
    if spec is None:
        return ()
    return (spec,) if isinstance(spec, str) else tuple(spec)


def candidate_shards(mesh: Mesh | None, rules: Rules = DEFAULT_RULES) -> int:
    """How many ways the candidate axis is split: K must be a multiple of this."""
    if mesh is None:
        return 1
    return math.prod(mesh.shape[a] for a in candidate_mesh_axes(mesh, rules))


def candidate_sharding(mesh: Mesh, ndim: int, axis: int = 0,
                       rules: Rules = DEFAULT_RULES) -> NamedSharding:
    """Sharding of an array whose dim `axis` is the candidate axis and all other dims replicated."""
    axes = candidate_mesh_axes(mesh, rules)
    spec = [None] * ndim
    if axes:
        spec[axis] = axes[0] if len(axes) == 1 else axes
    return NamedSharding(mesh, PartitionSpec(*spec))


def shard_candidates(tree: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES, axis: int = 0) -> Any:
    """Place every leaf of `tree` (leading candidate axis at `axis`) split over the candidate axes."""
    shards = candidate_shards(mesh, rules)

    def put(x):
        if x.shape[axis] % shards:
            raise ValueError(f"candidate axis of size {x.shape[axis]} does not divide into "
                             f"{shards} shards (mesh {dict(mesh.shape)})")
        return jax.device_put(x, candidate_sharding(mesh, x.ndim, axis, rules))

    return jax.tree.map(put, tree)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def maybe_initialize_distributed(cfg: Any = None) -> bool:
    """Call `jax.distributed.initialize` for a multi-process run; a no-op for one process.

    Multi-process is requested by `cfg.num_processes > 1` (with `coordinator_address` and
    `process_id`, or left to JAX's cluster auto-detection (SLURM, TPU VMs) when those are empty / < 0).
    Returns True if it initialised. Must run before any other JAX call touches the devices. The
    launchers in launch/ set these fields; see seal_jax/distributed.py for what changes in the run.
    """
    from seal_jax import distributed

    return distributed.initialize(_cfg_get(cfg, "num_processes"),
                                  _cfg_get(cfg, "coordinator_address") or None,
                                  _cfg_get(cfg, "process_id"))
