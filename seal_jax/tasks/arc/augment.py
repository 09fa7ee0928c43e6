"""Augmentations of ARC episodes as pure numpy, with inverses, driven by a seeded Generator.

An `Episode` is what one training sample or one query shows the solver: demonstrations and a query
(input, output-or-None). A `Transform` maps every grid of an episode (inputs with `fn_in`, outputs
with `fn_out`), which conjugates the task's rule, so the result is again a consistent task;
`invert` undoes `fn_out` on a predicted output. Transforms are built from module-level functions
and `functools.partial`, so they are deterministic, comparable and have stable names.

Families of the reference (`get_augmenters`, spec §2.3), in its list order:
  basic (11)  rot90, rot270, rot180, flip rows (ud), flip columns (lr), reflect x4 (grid and its
              mirror concatenated, along rows/columns, mirror first or second), a cyclic translation,
              transpose
  size (3)    2x resolution, 2x height, 2x width
  chain (6)   one of rot90/rot270/rot180/flip ud/flip lr/transpose, then 2x resolution
  repeat (3)  tile 2x along rows, along columns, 2x2
plus, for every synthetic episode when any family is on, a colour permutation (0 fixed) and always
an example permutation.

Deviations from the reference (each deliberate, see reference-fewshot §7.1/§7.9): randomness comes
only from the np.random.Generator passed in (never from Python's hash order); the translation draws
one shift in 0..3 per axis for inputs and one for outputs per episode (np.roll wraps, so a shift
larger than a side wraps around) instead of per-grid ranges; the colour permutation is a uniformly
random bijection of 1..9 (0 fixed) instead of the reference's "used colours to unused ones" rule.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Callable, Optional, Sequence

import numpy as np

from seal_jax.tasks.arc.grids import MAX_SIDE, grid_key

Pair = tuple[np.ndarray, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Episode:
    """Demonstrations and one query; `query_out` is None when unknown (a real test query)."""

    demos: tuple[Pair, ...]
    query_in: np.ndarray
    query_out: Optional[np.ndarray]

    def grids(self) -> list[np.ndarray]:
        out = [g for pair in self.demos for g in pair] + [self.query_in]
        return out + ([self.query_out] if self.query_out is not None else [])

    def key(self) -> bytes:
        """Deterministic identity (grids and demo order) for ordered dedup."""
        parts = [grid_key(g) for g in self.grids()]
        return b"|".join([len(self.demos).to_bytes(2, "little")] + parts)

    def fits(self, max_side: int = MAX_SIDE) -> bool:
        return all(max(g.shape) <= max_side for g in self.grids())


# ------------------------------------------------------------------------------------------------
# Grid functions (module level: partials of these compare equal and print stable names)


def _rot90(g, k):
    return np.rot90(g, k)


def _flip(g, axis):
    return np.flip(g, axis)


def _transpose(g):
    return g.T


def _reflect(g, axis, reverse):
    mirrored = np.flip(g, axis)
    return np.concatenate([mirrored, g] if reverse else [g, mirrored], axis=axis)


def _unreflect(g, axis, reverse):
    half = _half(g, axis)
    return np.take(g, range(half, 2 * half) if reverse else range(half), axis=axis)


def _half(g, axis):
    if g.shape[axis] % 2:
        raise ValueError(f"cannot invert: side {g.shape[axis]} along axis {axis} is odd")
    return g.shape[axis] // 2


def _scale(g, rows, cols):
    return np.repeat(np.repeat(g, rows, axis=0), cols, axis=1)


def _unscale(g, rows, cols):
    if g.shape[0] % rows or g.shape[1] % cols:
        raise ValueError(f"cannot invert a x({rows},{cols}) scaling of shape {g.shape}")
    return g[::rows, ::cols]


def _tile(g, rows, cols):
    return np.tile(g, (rows, cols))


def _untile(g, rows, cols):
    if g.shape[0] % rows or g.shape[1] % cols:
        raise ValueError(f"cannot invert a ({rows},{cols}) tiling of shape {g.shape}")
    return g[: g.shape[0] // rows, : g.shape[1] // cols]


def _roll(g, dy, dx):
    return np.roll(g, (dy, dx), axis=(0, 1))


def _recolour(g, table):
    return np.asarray(table, np.int8)[g]


def _compose(g, fns):
    for f in fns:
        g = f(g)
    return g


@dataclasses.dataclass(frozen=True)
class Transform:
    """A conjugation of the task's rule: grids map by `fn_in` / `fn_out`, outputs back by `inv_out`."""

    name: str
    fn_in: Callable
    fn_out: Callable
    inv_out: Callable

    def apply(self, ep: Episode) -> Episode:
        demos = tuple((np.ascontiguousarray(self.fn_in(i)), np.ascontiguousarray(self.fn_out(o)))
                      for i, o in ep.demos)
        out = None if ep.query_out is None else np.ascontiguousarray(self.fn_out(ep.query_out))
        return Episode(demos, np.ascontiguousarray(self.fn_in(ep.query_in)), out)

    def invert(self, grid: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(self.inv_out(grid))


def _same(name, fn, inv) -> Transform:
    return Transform(name, fn, fn, inv)


def rotate(k: int) -> Transform:
    return _same(f"rot{90 * k}", functools.partial(_rot90, k=k), functools.partial(_rot90, k=-k))


def flip(axis: int) -> Transform:
    f = functools.partial(_flip, axis=axis)
    return _same(f"flip{axis}", f, f)


def transpose() -> Transform:
    return _same("transpose", _transpose, _transpose)


def reflect(axis: int, reverse: bool) -> Transform:
    return _same(f"reflect{axis}{'r' if reverse else ''}",
                 functools.partial(_reflect, axis=axis, reverse=reverse),
                 functools.partial(_unreflect, axis=axis, reverse=reverse))


def scale(rows: int, cols: int) -> Transform:
    return _same(f"scale{rows}x{cols}", functools.partial(_scale, rows=rows, cols=cols),
                 functools.partial(_unscale, rows=rows, cols=cols))


def tile(rows: int, cols: int) -> Transform:
    return _same(f"tile{rows}x{cols}", functools.partial(_tile, rows=rows, cols=cols),
                 functools.partial(_untile, rows=rows, cols=cols))


def chain(first: Transform, then: Transform) -> Transform:
    return Transform(f"{first.name}+{then.name}",
                     functools.partial(_compose, fns=(first.fn_in, then.fn_in)),
                     functools.partial(_compose, fns=(first.fn_out, then.fn_out)),
                     functools.partial(_compose, fns=(then.inv_out, first.inv_out)))


def translate(dy_in: int, dx_in: int, dy_out: int, dx_out: int) -> Transform:
    return Transform(f"translate({dy_in},{dx_in};{dy_out},{dx_out})",
                     functools.partial(_roll, dy=dy_in, dx=dx_in),
                     functools.partial(_roll, dy=dy_out, dx=dx_out),
                     functools.partial(_roll, dy=-dy_out, dx=-dx_out))


def random_translate(rng: np.random.Generator) -> Transform:
    dy_in, dx_in, dy_out, dx_out = (int(v) for v in rng.integers(0, 4, size=4))
    return translate(dy_in, dx_in, dy_out, dx_out)


def colour_permutation(rng: np.random.Generator) -> Transform:
    """A random bijection of colours 1..9; 0 (background) stays 0."""
    table = np.concatenate([[0], 1 + rng.permutation(9)]).astype(np.int8)
    inverse = np.argsort(table).astype(np.int8)
    return _same("colours" + "".join(map(str, table)), functools.partial(_recolour, table=tuple(table)),
                 functools.partial(_recolour, table=tuple(inverse)))


def permute_examples(ep: Episode, rng: np.random.Generator) -> Episode:
    order = rng.permutation(len(ep.demos))
    return Episode(tuple(ep.demos[i] for i in order), ep.query_in, ep.query_out)


# ------------------------------------------------------------------------------------------------
# Families


FAMILIES = ("basic", "size", "chain", "repeat")
TRANSLATE = "translate"  # placeholder in the basic list: drawn per episode from the generator


def family(name: str) -> list:
    """The family's transforms in the reference's order (`TRANSLATE` marks the random one)."""
    if name == "basic":
        return [rotate(1), rotate(3), rotate(2), flip(0), flip(1), reflect(0, True),
                reflect(0, False), reflect(1, True), reflect(1, False), TRANSLATE, transpose()]
    if name == "size":
        return [scale(2, 2), scale(2, 1), scale(1, 2)]
    if name == "chain":
        return [chain(t, scale(2, 2)) for t in (rotate(1), rotate(3), rotate(2), flip(0), flip(1),
                                                transpose())]
    if name == "repeat":
        return [tile(2, 1), tile(1, 2), tile(2, 2)]
    raise ValueError(f"unknown augmentation family {name!r}; choose from {FAMILIES}")


def augmenters(toggles: dict[str, bool]) -> list:
    """Transforms of the families switched on, in the reference's family order."""
    unknown = set(toggles) - set(FAMILIES)
    if unknown:
        raise ValueError(f"unknown augmentation families {sorted(unknown)}; known {FAMILIES}")
    return [t for name in FAMILIES if toggles.get(name, False) for t in family(name)]


# The eval-time query augmentations of the reference (§3.2), each with its exact inverse.
QUERY_TRANSFORMS = (transpose(), flip(0), flip(1), rotate(1), rotate(2))


# ------------------------------------------------------------------------------------------------
# Leave-n-out episodes


def leave_n_out(demos: Sequence[Pair], n: int) -> list[Episode]:
    """Each demo in turn as the query; n-1 more demos dropped in every combination (reference order:
    query index, then the dropped combination). n=1: N episodes of N-1 demos; n=2: N(N-1) of N-2."""
    if n < 1:
        raise ValueError(f"leave-n-out needs n >= 1, got {n}")
    out = []
    for i, (qi, qo) in enumerate(demos):
        others = [d for j, d in enumerate(demos) if j != i]
        for dropped in itertools.combinations(range(len(others)), n - 1):
            kept = tuple(d for j, d in enumerate(others) if j not in dropped)
            out.append(Episode(kept, qi, qo))
    return out


def leave_one_out_queries(demos: Sequence[Pair], query_in: np.ndarray) -> list[Episode]:
    """The real test input with every demo but one (N episodes of N-1 demos); with one demo, the
    demo itself is kept (there is nothing to leave out)."""
    if len(demos) == 1:
        return [Episode(tuple(demos), query_in, None)]
    return [Episode(tuple(d for j, d in enumerate(demos) if j != i), query_in, None)
            for i in range(len(demos))]


def ordered_unique(episodes: Sequence[Episode]) -> list[Episode]:
    """Dedup keeping first occurrences (the reference's set() made the order hash-dependent)."""
    seen, out = set(), []
    for ep in episodes:
        k = ep.key()
        if k not in seen:
            seen.add(k)
            out.append(ep)
    return out
