"""One CLI convention for every entry point, and config -> typed object conversion.

Every command is `python -m seal_jax.<cmd> --config configs/x.py --config.a.b=value`: the config file is
a Python module with `get_config()` returning an `ml_collections.ConfigDict`, and any field can be
overridden from the command line (ml_collections.config_flags does the parsing and type checking).
A config string may carry an argument after a colon (`configs/knowledge.py:demo`), passed to
`get_config(arg)`.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from typing import Any, Callable, Mapping, Sequence

import ml_collections


class ConfigError(ValueError):
    """A config value is missing, unknown or out of range; the message names the field."""


def cli_main(main: Callable[[ml_collections.ConfigDict], Any], argv: Sequence[str] | None = None):
    """Parse `--config path.py[:arg] --config.x=y` and call `main(config)`.

    Uses absl flags so overrides are typed by the config's own fields (a typo fails loudly).
    """
    from absl import app, flags
    from ml_collections import config_flags

    flag = config_flags.DEFINE_config_file("config", None, "configs/<name>.py[:arg]", lock_config=True)
    flags.mark_flag_as_required("config")

    def _run(_argv):
        if len(_argv) > 1:
            raise app.UsageError(f"unexpected positional arguments: {_argv[1:]}")
        return main(flag.value)

    app.run(_run, argv=list(argv) if argv is not None else sys.argv)


def load_config(path: str, overrides: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
    """Load a config file without absl (for tests and notebooks); `overrides` are dotted keys."""
    import importlib.util

    module_path, _, arg = path.partition(":")
    spec = importlib.util.spec_from_file_location("_seal_config", module_path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot load config file {module_path!r}")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {module_path}") from None
    cfg = module.get_config(arg) if arg else module.get_config()
    for key, value in (overrides or {}).items():
        set_dotted(cfg, key, value)
    return cfg


def set_dotted(cfg: ml_collections.ConfigDict, dotted_key: str, value: Any) -> None:
    *parents, leaf = dotted_key.split(".")
    node = cfg
    for name in parents:
        if name not in node:
            raise ConfigError(f"unknown config field {dotted_key!r}")
        node = node[name]
    if leaf not in node:
        raise ConfigError(f"unknown config field {dotted_key!r}")
    with node.unlocked() if hasattr(node, "unlocked") else _nullcontext():
        node[leaf] = value


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def to_dataclass(cls, section: Mapping[str, Any] | None, where: str, **extra):
    """Build a frozen dataclass from a config section, rejecting unknown keys by name."""
    values = dict(section.to_dict() if hasattr(section, "to_dict") else (section or {}))
    values.update(extra)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; known: {sorted(fields)}")
    for key, value in list(values.items()):
        if isinstance(value, list):
            values[key] = tuple(value)
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from e


def config_to_json(cfg: ml_collections.ConfigDict) -> str:
    return json.dumps(cfg.to_dict(), indent=2, sort_keys=True, default=str)
