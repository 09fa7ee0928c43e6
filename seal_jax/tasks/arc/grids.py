"""ARC grids and their two text formats.

A grid is a 2-D integer numpy array with colours 0..9 (ARC grids are at most 30x30; augmented
grids may be larger before the dataset's size filter drops them).

* policy format (the self-edit prompt of the reference): one line per row, digits joined by single
  spaces, each row ending in "\\n".                                  e.g. "0 7 7\\n7 7 7\\n"
* solver format (TTT training and answers; the reference's `str(np.ndarray)` of a grid): rows in
  brackets, the first prefixed "[[", the others " [", the last closed "]]".
                                                                     e.g. "[[0 7 7]\\n [7 7 7]]"
  We write it ourselves instead of calling `str(array)` so numpy print options (global state, line
  width) can never change the text; for single digits the two are identical.

Both parsers are strict (ragged rows, stray characters or an empty grid are errors naming what is
wrong), so parse(format(g)) == g and anything else is rejected, never silently reshaped (the
reference's decoder reshapes ragged output to len//rows columns).
"""
from __future__ import annotations

import re

import numpy as np

MAX_SIDE = 30  # ARC's largest grid side
NUM_COLOURS = 10


class GridError(ValueError):
    """A grid or grid text that is not valid; the message names the problem."""


def as_grid(value, what: str = "grid", max_side: int | None = MAX_SIDE) -> np.ndarray:
    """Validate and copy `value` (nested lists or array) to an int8 grid; errors name `what`."""
    try:
        arr = np.asarray(value)
    except Exception as e:  # ragged nested lists
        raise GridError(f"{what}: not a rectangular grid ({e})") from None
    if arr.dtype == object or arr.ndim != 2:
        raise GridError(f"{what}: expected a rectangular 2-D grid, got shape {arr.shape}")
    if arr.size == 0:
        raise GridError(f"{what}: empty grid {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
        if not np.issubdtype(arr.dtype, np.floating) or not np.all(np.mod(arr, 1) == 0):
            raise GridError(f"{what}: cells must be integers, got dtype {arr.dtype}")
    if arr.min() < 0 or arr.max() >= NUM_COLOURS:
        raise GridError(f"{what}: colours must be in 0..{NUM_COLOURS - 1}, got "
                        f"{int(arr.min())}..{int(arr.max())}")
    if max_side is not None and max(arr.shape) > max_side:
        raise GridError(f"{what}: shape {arr.shape} exceeds the {max_side}-cell limit")
    return arr.astype(np.int8)


def fits(grid: np.ndarray, max_side: int = MAX_SIDE) -> bool:
    return max(grid.shape) <= max_side


def grid_key(grid: np.ndarray) -> bytes:
    """Canonical bytes of a grid (shape included): a deterministic identity for dedup."""
    return np.asarray(grid.shape, np.int32).tobytes() + np.asarray(grid, np.int8).tobytes()


# ------------------------------------------------------------------------------------------------
# Policy format


def format_policy(grid: np.ndarray) -> str:
    return "".join(" ".join(str(int(v)) for v in row) + "\n" for row in grid)


_POLICY_ROW = re.compile(r"[0-9]( [0-9])*")


def parse_policy(text: str) -> np.ndarray:
    if not text.endswith("\n"):
        raise GridError("policy grid text must end with a newline")
    lines = text[:-1].split("\n")
    rows = []
    for i, line in enumerate(lines):
        if not _POLICY_ROW.fullmatch(line):
            raise GridError(f"policy grid row {i}: {line!r} is not digits separated by single spaces")
        rows.append([int(c) for c in line.split(" ")])
    return _rectangular(rows, "policy grid")


# ------------------------------------------------------------------------------------------------
# Solver format


def format_solver(grid: np.ndarray) -> str:
    rows = [" ".join(str(int(v)) for v in row) for row in grid]
    return "[[" + "]\n [".join(rows) + "]]"


_SOLVER_ROW = re.compile(r"[0-9]( [0-9])*")


def parse_solver(text: str) -> np.ndarray:
    """Strict inverse of `format_solver` (surrounding whitespace is allowed)."""
    text = text.strip()
    if not (text.startswith("[[") and text.endswith("]]")):
        raise GridError(f"solver grid must start with '[[' and end with ']]': {text[:40]!r}")
    body = text[2:-2]
    rows = []
    for i, line in enumerate(body.split("]\n [")):
        if not _SOLVER_ROW.fullmatch(line):
            raise GridError(f"solver grid row {i}: {line[:40]!r} is not digits separated by "
                            f"single spaces")
        rows.append([int(c) for c in line.split(" ")])
    return _rectangular(rows, "solver grid")


def _rectangular(rows: list[list[int]], what: str) -> np.ndarray:
    widths = {len(r) for r in rows}
    if len(widths) != 1:
        raise GridError(f"{what}: ragged rows (widths {sorted(widths)})")
    return np.asarray(rows, np.int8)
