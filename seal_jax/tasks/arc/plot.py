"""A PNG picture of an ARC task: demonstrations, the test inputs, the attempts and the truth."""
from __future__ import annotations

import pathlib
from typing import Optional, Sequence

import numpy as np

from seal_jax.tasks.arc.data import ArcTask

# ARC's usual palette (0 black, 1 blue, 2 red, 3 green, 4 yellow, 5 grey, 6 magenta, 7 orange,
# 8 light blue, 9 maroon).
PALETTE = ("#000000", "#0074D9", "#FF4136", "#2ECC40", "#FFDC00", "#AAAAAA", "#F012BE", "#FF851B",
           "#7FDBFF", "#870C25")


def plot_task(task: ArcTask, path, attempts: Optional[Sequence[Sequence[np.ndarray]]] = None,
              title: str = "") -> pathlib.Path:
    """Row 1-2: demonstration inputs and outputs; then one row per test: input, attempts, truth.

    attempts[j] are the voted attempts for test j (may be empty)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    attempts = attempts or [[] for _ in range(task.num_tests)]
    width = max(len(task.train), max(2 + len(a) for a in attempts))
    rows = 2 + task.num_tests
    fig, axes = plt.subplots(rows, width, figsize=(2.0 * width, 2.1 * rows), squeeze=False)
    cmap = ListedColormap(PALETTE)

    def show(ax, grid, label, colour="black"):
        ax.imshow(np.asarray(grid), cmap=cmap, vmin=0, vmax=9, interpolation="nearest")
        ax.set_title(label, fontsize=8, color=colour)
        h, w = np.asarray(grid).shape
        ax.set_xticks(np.arange(-0.5, w, 1), minor=True)
        ax.set_yticks(np.arange(-0.5, h, 1), minor=True)
        ax.grid(which="minor", color="#555555", linewidth=0.5)

    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_frame_on(False)
    for i, (gi, go) in enumerate(task.train):
        show(axes[0, i], gi, f"demo {i} input")
        show(axes[1, i], go, f"demo {i} output")
    for j in range(task.num_tests):
        row = axes[2 + j]
        show(row[0], task.test_inputs[j], f"test {j} input")
        truth = task.test_outputs[j]
        for a, grid in enumerate(attempts[j]):
            ok = truth is not None and np.array_equal(np.asarray(grid), truth)
            show(row[1 + a], grid, f"attempt {a + 1}" + (" (correct)" if ok else ""),
                 "green" if ok else "red")
        if truth is not None:
            show(row[1 + len(attempts[j])], truth, "truth")
    fig.suptitle(title or task.id, fontsize=10)
    fig.tight_layout()
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
