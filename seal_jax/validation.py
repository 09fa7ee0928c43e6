"""Config and data validation at the boundary: every error at once, each naming its field or file.

A run that starts with a bad value fails late or, worse, finishes with a wrong number
(`inner.learning_rate=-1` trained to loss 40 and reported 0% with exit 0). So every config value is
checked before a run folder is created, declaratively:

    RULES = {"inner.learning_rate": number(gt=0), "self_edit.top_p": number(gt=0, le=1), ...}
    COMBINATIONS = [lambda flat, env: [("grader.http_api_key_env", "...")] if ... else []]
    check_config(config, RULES, COMBINATIONS)   # raises ConfigError listing every problem

A check is a function `value -> problem text | None`; a combination sees the whole flattened config
(and the environment) and returns `(key, problem)` pairs. `check_config` also reports config keys no
rule covers, so a new config field cannot skip validation. This module holds the checks and the rules
for engine sections (model, LoRA, inner loop, policy SFT, mesh, checkpoints); a domain composes them
with its own (`seal_jax/tasks/knowledge/config_rules.py`).

Data files: `read_json_file` turns "not UTF-8", "not JSON" and "empty" into a one-line `DataError`
naming the file (and line/column or byte offset); `require_list_of_objects` names the item at fault.
"""
from __future__ import annotations

import math
import os
import pathlib
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

from seal_jax.errors import DataError
from seal_jax.config import ConfigError

Check = Callable[[Any], Optional[str]]
Combination = Callable[[Mapping[str, Any], Mapping[str, str]], list[tuple[str, str]]]


# ------------------------------------------------------------------------------------------------
# Checks: each returns None when the value is fine, else what is wrong with it


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _bounds_problem(v, ge=None, gt=None, le=None, lt=None) -> Optional[str]:
    if ge is not None and not v >= ge:
        return f"must be >= {ge}"
    if gt is not None and not v > gt:
        return f"must be > {gt}"
    if le is not None and not v <= le:
        return f"must be <= {le}"
    if lt is not None and not v < lt:
        return f"must be < {lt}"
    return None


def integer(*, ge=None, gt=None, le=None, lt=None) -> Check:
    def check(v):
        if not _is_int(v):
            return f"must be an integer, got {type(v).__name__}"
        return _bounds_problem(v, ge, gt, le, lt)
    return check


def number(*, ge=None, gt=None, le=None, lt=None) -> Check:
    """A finite int or float within the bounds (NaN and inf are always rejected)."""
    def check(v):
        if not _is_number(v):
            return f"must be a number, got {type(v).__name__}"
        if not math.isfinite(v):
            return "must be finite"
        return _bounds_problem(v, ge, gt, le, lt)
    return check


def boolean() -> Check:
    return lambda v: None if isinstance(v, bool) else f"must be true or false, got {type(v).__name__}"


def string(*, choices: Optional[Sequence[str]] = None, nonempty: bool = False) -> Check:
    def check(v):
        if not isinstance(v, str):
            return f"must be a string, got {type(v).__name__}"
        if nonempty and not v:
            return "must not be empty"
        if choices is not None and v not in choices:
            return f"must be one of {', '.join(map(repr, choices))}"
        return None
    return check


def strings(*, choices: Optional[Sequence[str]] = None, nonempty: bool = True) -> Check:
    """A list/tuple of strings, optionally each from `choices`, without duplicates."""
    def check(v):
        if not isinstance(v, (list, tuple)) or not all(isinstance(x, str) for x in v):
            return "must be a list of strings"
        if nonempty and not v:
            return "must not be empty"
        bad = [x for x in v if choices is not None and x not in choices]
        if bad:
            return f"unknown {bad}; choose from {list(choices)}"
        if len(set(v)) != len(v):
            return "has duplicates"
        return None
    return check


def increasing_ints(*, ge: int = 1) -> Check:
    def check(v):
        if not isinstance(v, (list, tuple)) or not v or not all(_is_int(x) for x in v):
            return "must be a non-empty list of integers"
        if list(v) != sorted(set(v)):
            return "must be strictly increasing"
        if min(v) < ge:
            return f"must all be >= {ge}"
        return None
    return check


def existing_path(*, kind: str = "any", optional: bool = True) -> Check:
    """A path that exists ('' allowed when optional); kind: 'file', 'dir' or 'any'."""
    def check(v):
        if not isinstance(v, str):
            return f"must be a path string, got {type(v).__name__}"
        if not v:
            return None if optional else "must be set"
        p = pathlib.Path(v).expanduser()
        if not p.exists():
            return f"no such file or folder: {v}"
        if kind == "file" and not p.is_file():
            return f"must be a file: {v}"
        if kind == "dir" and not p.is_dir():
            return f"must be a folder: {v}"
        return None
    return check


def tokenizer_spec() -> Check:
    """'' (the model's own), 'embedded', an HF folder with tokenizer.json, or a .gguf file."""
    def check(v):
        if not isinstance(v, str):
            return f"must be a string, got {type(v).__name__}"
        if v in ("", "embedded"):
            return None
        p = pathlib.Path(v).expanduser()
        if not p.exists():
            return f"no such tokenizer file or folder: {v}"
        if p.is_file() and p.suffix != ".gguf":
            return f"{v} is a file but not .gguf"
        return None  # a folder: the loader names what is missing in it
    return check


def model_spec() -> Check:
    """'embedded', 'preset:<name>', an HF checkpoint folder or a .gguf file."""
    def check(v):
        if not isinstance(v, str) or not v:
            return "must be 'embedded', 'preset:<name>', an HF folder or a .gguf file"
        if v == "embedded":
            return None
        if v.startswith("preset:"):
            from seal_jax.model.presets import PRESETS

            name = v.split(":", 1)[1]
            return None if name in PRESETS else f"unknown preset {name!r}; choose from {sorted(PRESETS)}"
        p = pathlib.Path(v).expanduser()
        if not p.exists():
            return f"no such model file or folder: {v}"
        if p.is_dir() and not (p / "config.json").exists():
            return f"{v} has no config.json (not an HF checkpoint folder)"
        if p.is_file() and p.suffix != ".gguf":
            return f"{v} is a file but not .gguf"
        return None
    return check


def dtype_name(*, allow_empty: bool = True) -> Check:
    names = ("float32", "bfloat16", "float16")
    return string(choices=(("",) if allow_empty else ()) + names)


def anything() -> Check:
    """For values another check validates as a whole (e.g. via a combination)."""
    return lambda v: None


# ------------------------------------------------------------------------------------------------
# Engine rule sets (a domain prefixes and composes them)


def lora_rules(prefix: str) -> dict[str, Check]:
    from seal_jax.model.config import LORA_TARGETS

    return {f"{prefix}.rank": integer(gt=0), f"{prefix}.alpha": number(gt=0),
            f"{prefix}.targets": strings(choices=LORA_TARGETS), f"{prefix}.dropout": number(ge=0, lt=1)}


def optimizer_rules(prefix: str) -> dict[str, Check]:
    """Keys shared by the inner loop and the policy SFT (whichever of them a section has)."""
    return {f"{prefix}.batch_size": integer(ge=1), f"{prefix}.epochs": number(ge=0),
            f"{prefix}.learning_rate": number(gt=0), f"{prefix}.warmup_steps": integer(ge=0),
            f"{prefix}.max_grad_norm": number(ge=0), f"{prefix}.weight_decay": number(ge=0),
            f"{prefix}.adam_b1": number(ge=0, lt=1), f"{prefix}.adam_b2": number(ge=0, lt=1),
            f"{prefix}.adam_eps": number(gt=0), f"{prefix}.steps_per_chunk": integer(ge=1),
            f"{prefix}.microbatches": integer(ge=1), f"{prefix}.length_buckets": increasing_ints(ge=2),
            f"{prefix}.seed": integer(ge=0)}


def inner_rules(prefix: str = "inner") -> dict[str, Check]:
    from seal_jax.inner import SCHEDULES, SHUFFLES

    return {**optimizer_rules(prefix), f"{prefix}.schedule": string(choices=SCHEDULES),
            f"{prefix}.shuffle": string(choices=SHUFFLES), f"{prefix}.shuffle_seed": integer(ge=0),
            f"{prefix}.append_eos": boolean(), f"{prefix}.reference_faithful": boolean(),
            f"{prefix}.faithful_length": integer(ge=2), f"{prefix}.candidate_buckets": anything(),
            f"{prefix}.packing": boolean(), f"{prefix}.pack_merge_share": number(ge=0, le=1)}


def mesh_rules(prefix: str = "mesh") -> dict[str, Check]:
    def axes(v):
        if not isinstance(v, Mapping) or not v:
            return "must be a dict {axis name: size}"
        sizes = list(v.values())
        if not all(_is_int(s) and (s >= 1 or s == -1) for s in sizes):
            return "sizes must be integers >= 1 or -1 (= all remaining devices)"
        if sizes.count(-1) > 1:
            return "at most one axis may be -1"
        return None

    def rules(v):
        ok = isinstance(v, (list, tuple)) and all(
            isinstance(r, (list, tuple)) and len(r) == 2 and isinstance(r[0], str)
            and (r[1] is None or isinstance(r[1], (str, list, tuple))) for r in v)
        return None if ok else "must be a list of [logical axis, mesh axis or None] pairs"

    return {f"{prefix}.axes": axes, f"{prefix}.logical_axis_rules": rules,
            f"{prefix}.num_processes": integer(ge=1), f"{prefix}.coordinator_address": string(),
            f"{prefix}.process_id": integer(ge=-1)}


def checkpoint_rules(prefix: str = "checkpoint") -> dict[str, Check]:
    return {f"{prefix}.keep_last": integer(ge=0)}  # 0 keeps every round's checkpoint


def sft_batch_divides(prefix: str) -> Combination:
    def check(flat, _env):
        bs, mb = flat.get(f"{prefix}.batch_size"), flat.get(f"{prefix}.microbatches")
        if _is_int(bs) and _is_int(mb) and bs >= 1 and mb >= 1 and bs % mb:
            return [(f"{prefix}.microbatches", f"= {mb} must divide {prefix}.batch_size = {bs}")]
        return []
    return check


# ------------------------------------------------------------------------------------------------
# Running the rules


def flatten(config: Any) -> dict[str, Any]:
    """{dotted key: value}; dict-valued fields the rules name as a whole (mesh.axes) stay whole."""
    tree = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    flat: dict[str, Any] = {}

    def walk(node, prefix):
        for key, value in node.items():
            if isinstance(value, Mapping) and value and not prefix + key in _WHOLE:
                walk(value, prefix + key + ".")
            else:
                flat[prefix + key] = value

    walk(tree, "")
    return flat


_WHOLE = {"mesh.axes"}


def config_problems(config: Any, rules: Mapping[str, Check], combinations: Iterable[Combination] = (),
                    *, env: Optional[Mapping[str, str]] = None,
                    require_rules: bool = True) -> list[tuple[str, str]]:
    """Every (key, problem) of the config, in key order, combinations after single values."""
    env = os.environ if env is None else env
    flat = flatten(config)
    problems = []
    for key in sorted(flat):
        value = flat[key]
        check = rules.get(key)
        if check is None:
            if require_rules:
                problems.append((key, "has no validation rule (add one where the domain's rules are)"))
            continue
        problem = check(value)
        if problem:
            problems.append((key, f"= {value!r} {problem}" if not problem.startswith("=") else problem))
    for combination in combinations:
        problems.extend(combination(flat, env))
    return problems


def check_config(config: Any, rules: Mapping[str, Check], combinations: Iterable[Combination] = (),
                 *, env: Optional[Mapping[str, str]] = None, require_rules: bool = True) -> None:
    """Raise one ConfigError naming every problem (`key = value must ...; key ...`), or return."""
    problems = config_problems(config, rules, combinations, env=env, require_rules=require_rules)
    if problems:
        shown = "; ".join(f"{key} {problem}" for key, problem in problems)
        error = ConfigError(f"invalid config ({len(problems)} problem{'s' * (len(problems) > 1)}): {shown}",
                            hint="override a value with --config.<key>=<value>")
        error.problems = problems
        raise error


# ------------------------------------------------------------------------------------------------
# Data files


def read_json_file(path: str | os.PathLike, *, what: str = "data file",
                   error: type[DataError] = DataError) -> Any:
    """Parse a JSON file; not found / not UTF-8 / not JSON / empty raise `error` naming the file."""
    import json

    DataError = error  # noqa: N806 (a domain may raise its own subclass)
    path = pathlib.Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{what} {path}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{what} {path}: is a folder, not a file") from None
    except OSError as e:
        raise DataError(f"{what} {path}: cannot read ({e.strerror or e})") from None
    if not raw.strip():
        raise DataError(f"{what} {path}: file is empty")
    try:
        text = raw.decode("utf-8-sig")  # tolerate a BOM, as editors on Windows write one
    except UnicodeDecodeError as e:
        raise DataError(f"{what} {path}: not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 1]!r})",
                        hint="re-save the file as UTF-8") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{what} {path}: not valid JSON at line {e.lineno} column {e.colno} ({e.msg})") from None


def require_list_of_objects(data: Any, where: str, *, required: Mapping[str, type] = {},
                            nonempty: bool = True) -> list[dict]:
    """`data` must be a non-empty list of dicts, each with the `required` keys of the given types."""
    if not isinstance(data, list):
        raise DataError(f"{where}: expected a JSON list, got {type(data).__name__}")
    if nonempty and not data:
        raise DataError(f"{where}: the list is empty")
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise DataError(f"{where}: item {i} is a {type(item).__name__}, not an object")
        for key, typ in required.items():
            if key not in item:
                raise DataError(f"{where}: item {i} has no {key!r} field")
            if not isinstance(item[key], typ):
                raise DataError(f"{where}: item {i} field {key!r} must be {typ.__name__}, "
                                f"got {type(item[key]).__name__}")
    return data
