"""Per-run output directories, JSON results, markdown tables and plots.

A run never overwrites another: each gets `<root>/<name>/<UTC timestamp>-<random suffix>/`, created
with `exist_ok=False`. Inside: `config.json` (resolved config), `results.json`, `records.jsonl`
(per-candidate records, appended as they are produced), `results.md`, plots, and `checkpoints/`.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import pathlib
import secrets
from typing import Any, Mapping, Sequence

import numpy as np


def new_run_dir(root: str | os.PathLike, name: str) -> pathlib.Path:
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    parent = pathlib.Path(root) / name
    parent.mkdir(parents=True, exist_ok=True)
    for _ in range(100):
        path = parent / f"{stamp}-{secrets.token_hex(3)}"
        try:
            path.mkdir(exist_ok=False)
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a fresh run directory under {parent}")


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def json_safe(obj: Any) -> Any:
    """`obj` as plain JSON values (numpy scalars/arrays converted, non-finite floats -> None)."""
    return json.loads(json.dumps(_jsonable(obj)))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write atomically (tmp file + rename) so an interrupted run never leaves half a file."""
    path = pathlib.Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(_jsonable(obj), indent=2, sort_keys=False))
        f.flush()
        os.fsync(f.fileno())  # the rename must not reach the disk before the data (power loss)
    os.replace(tmp, path)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return "—" if not math.isfinite(v) else f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


CI95_LABEL = "±95% CI (t)"  # table header for `mean_ci95` half-widths


def mean_ci95(values: Sequence[float]) -> tuple[float, float]:
    """Mean and half-width of a two-sided 95% Student-t interval for the mean (nan below 2 values).

    half-width = t_{0.975, n-1} * s / sqrt(n), s the sample standard deviation. At the few passages
    of a CPU run the normal 1.96 is far too narrow (t is 2.57 at n=6, 12.7 at n=2); at n=200 the two
    differ by 1%. None and non-finite values (ungraded passages) are left out before counting n.
    """
    from scipy import stats

    arr = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if arr.size == 0:
        return float("nan"), float("nan")
    if arr.size < 2:
        return float(arr.mean()), float("nan")
    t = float(stats.t.ppf(0.975, df=arr.size - 1))
    return float(arr.mean()), float(t * arr.std(ddof=1) / math.sqrt(arr.size))


def plot_rewards_per_round(path: str | os.PathLike, rounds: Sequence[int],
                           series: Mapping[str, Sequence[float]], ylabel: str = "accuracy") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label, values in series.items():
        ax.plot(list(rounds), list(values), marker="o", label=label)
    ax.set_xlabel("ReST-EM round")
    ax.set_ylabel(ylabel)
    ax.set_xticks(list(rounds))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_forgetting_heatmap(path: str | os.PathLike, matrix: np.ndarray) -> None:
    """Rows: after k edits (row 0 = before any edit); columns: passage d_i. NaN = not yet edited."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = np.asarray(matrix, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * m.shape[1], 1.0 + 0.5 * m.shape[0]))
    im = ax.imshow(np.ma.masked_invalid(m), cmap="viridis", vmin=0.0, vmax=1.0)
    for (r, c), v in np.ndenumerate(m):
        if math.isfinite(v):
            ax.text(c, r, f"{100 * v:.0f}", ha="center", va="center", fontsize=7, color="w")
    ax.set_xlabel("passage d_i")
    ax.set_ylabel("after k self-edits")
    ax.set_xticks(range(m.shape[1]))
    ax.set_yticks(range(m.shape[0]))
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
