"""One CLI convention for every entry point, and config -> typed object conversion.

Every command is `python -m seal_jax.<cmd> --config configs/x.py --config.a.b=value`: the config file is
a Python module with `get_config()` returning an `ml_collections.ConfigDict`, and any field can be
overridden from the command line (ml_collections.config_flags does the parsing and type checking).
A config string may carry an argument after a colon (`configs/knowledge.py:demo`), passed to
`get_config(arg)`.

`cli_main` is also where user errors end: a misspelled key, a bad value, an unreadable file print one
line (naming the key and the closest valid ones, the field or the file) and exit 2, never a traceback
unless `--debug` or SEAL_DEBUG=1 asks for it; SIGINT/SIGTERM exit 130 after the current call.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any, Callable, Mapping, Sequence

import ml_collections

from seal_jax.errors import EXIT_INTERRUPTED, EXIT_USER_ERROR, Interrupted, UserError


class ConfigError(UserError, ValueError):
    """A config value is missing, unknown or out of range; the message names the field."""


def debug_requested(argv: Sequence[str] = ()) -> bool:
    """`--debug` on the command line or SEAL_DEBUG=1 in the environment: show full tracebacks."""
    env = os.environ.get("SEAL_DEBUG", "").strip().lower()
    return "--debug" in argv or env not in ("", "0", "false", "no")


_config_flag = None  # absl flags are process-global: define --config once, however often cli_main runs


def _define_flags():
    global _config_flag
    from absl import flags
    from ml_collections import config_flags

    if _config_flag is None:
        _config_flag = config_flags.DEFINE_config_file("config", None, "configs/<name>.py[:arg]",
                                                       lock_config=True)
        flags.mark_flag_as_required("config")
    return _config_flag


def cli_main(main: Callable[[ml_collections.ConfigDict], Any], argv: Sequence[str] | None = None, *,
             validate: Callable[[ml_collections.ConfigDict], None] | None = None):
    """Parse `--config path.py[:arg] --config.x=y`, run `validate(config)` then `main(config)`.

    Uses absl flags so overrides are typed by the config's own fields. A `UserError` (bad config
    value, misspelled key, unreadable data or model file, wrong resume folder) prints one line plus a
    hint and exits with status 2; `--debug` or SEAL_DEBUG=1 adds the traceback. SIGINT/SIGTERM stop
    the run at its next `interrupt.check()` (see seal_jax/interrupt.py) and exit with status 130.
    """
    from absl import app

    from seal_jax import interrupt, rundir

    discarded: list = []
    argv = list(argv) if argv is not None else list(sys.argv)
    debug = debug_requested(argv)
    argv = [a for a in argv if a != "--debug"]
    flag = _define_flags()

    def _run(_argv):
        if len(_argv) > 1:
            raise app.UsageError(f"unexpected positional arguments: {_argv[1:]}")
        config = flag.value
        if not isinstance(config, ml_collections.ConfigDict):
            # ml_collections defers a config file's load failure to the first attribute access.
            try:
                config.to_dict()
            except Exception as e:
                raise _as_config_error(e) from e
        if validate is not None:
            validate(config)
        try:
            return main(config)
        except BaseException:
            # A failed run leaves no empty folder behind (seal_jax.rundir: only folders it created
            # that hold nothing beyond their setup files).
            discarded.extend(rundir.discard_unproductive_runs())
            raise

    try:
        with interrupt.deferred_signals():
            app.run(_run, argv=argv, flags_parser=_parse_flags)
    except Interrupted as e:
        hint = e.hint if not discarded else f"nothing was produced yet; removed {discarded[0]}"
        _report("interrupted", str(e), hint, debug)
        sys.exit(EXIT_INTERRUPTED)
    except UserError as e:
        _report("error", e.one_line(), e.hint, debug)
        sys.exit(EXIT_USER_ERROR)
    except OSError as e:
        if e.filename is None:  # an OSError naming no file is not about the user's input
            raise
        _report("error", f"{e.strerror or e}: {e.filename}", None, debug)
        sys.exit(EXIT_USER_ERROR)


def _report(kind: str, message: str, hint: str | None, debug: bool) -> None:
    import traceback

    if debug:
        traceback.print_exc()
    print(f"{kind}: {message}", file=sys.stderr)
    if hint:
        print(f"hint: {hint}", file=sys.stderr)
    elif not debug and kind == "error":
        print("hint: --debug (or SEAL_DEBUG=1) shows the traceback", file=sys.stderr)


def _parse_flags(argv: Sequence[str]):
    """absl's parse, with every failure turned into a one-line ConfigError naming the flag."""
    from absl import flags

    try:
        return flags.FLAGS(list(argv))
    except Exception as e:
        typo = unknown_override(argv)
        if typo is not None:
            raise typo from e
        raise _as_config_error(e) from e


def _as_config_error(e: Exception) -> ConfigError:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    # ml_collections wraps a failing config file in a multi-line text (a traceback, or the paths it
    # tried): its last line is the error itself.
    detail = lines[-1] if lines else type(e).__name__
    first = lines[0] if lines else ""
    message = detail if len(lines) <= 1 else f"{first.split(':')[0]}: {detail}"
    return ConfigError(message, hint="check the --config flags; --helpfull lists absl flags")


def config_keys(cfg: Mapping[str, Any], *, leaves_only: bool = False) -> list[str]:
    """Every dotted key of a config, nodes included (`inner`, `inner.epochs`, ...) unless leaves_only."""
    keys = []

    def walk(node, prefix):
        for key, value in node.items():
            if isinstance(value, Mapping):
                if not leaves_only:
                    keys.append(prefix + key)
                walk(value, prefix + key + ".")
            else:
                keys.append(prefix + key)

    walk(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg, "")
    return keys


def closest_keys(key: str, known: Sequence[str], n: int = 3) -> list[str]:
    """Known keys a misspelled `key` most likely meant: close full paths, then close leaf names."""
    import difflib

    found = difflib.get_close_matches(key, known, n=n, cutoff=0.8)
    leaf = key.rsplit(".", 1)[-1]
    leaves: dict[str, list[str]] = {}
    for k in known:
        leaves.setdefault(k.rsplit(".", 1)[-1], []).append(k)
    for close_leaf in difflib.get_close_matches(leaf, list(leaves), n=n, cutoff=0.75):
        found += [k for k in leaves[close_leaf] if k not in found]
    return found[:n]


def unknown_override(argv: Sequence[str]) -> ConfigError | None:
    """A ConfigError for the first `--config.<key>` override naming no key of the config, if any."""
    path, overrides = None, []
    args = list(argv)
    for i, arg in enumerate(args):
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        elif arg == "--config" and i + 1 < len(args):
            path = args[i + 1]
        elif arg.startswith("--config."):
            overrides.append(arg[len("--config."):].split("=", 1)[0])
    if path is None or not overrides:
        return None
    try:
        known = config_keys(load_config(path))
    except Exception:  # the config file itself is broken: the caller reports that instead
        return None
    for key in overrides:
        if key not in known:
            close = closest_keys(key, config_keys(load_config(path), leaves_only=True))
            suggestion = f"; did you mean {' or '.join(close)}?" if close else ""
            return ConfigError(f"unknown config key {key!r}{suggestion}",
                               hint=f"the keys are the fields of {path.split(':')[0]}")
    return None


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
            raise _unknown(cfg, dotted_key)
        node = node[name]
    if leaf not in node:
        raise _unknown(cfg, dotted_key)
    with node.unlocked() if hasattr(node, "unlocked") else _nullcontext():
        node[leaf] = value


def _unknown(cfg, dotted_key: str) -> ConfigError:
    close = closest_keys(dotted_key, config_keys(cfg, leaves_only=True))
    return ConfigError(f"unknown config key {dotted_key!r}"
                       + (f"; did you mean {' or '.join(close)}?" if close else ""))


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
        hints = {k: closest_keys(k, sorted(fields), n=1) for k in unknown}
        shown = ", ".join(f"{k!r}" + (f" (did you mean {hints[k][0]!r}?)" if hints[k] else "")
                          for k in unknown)
        raise ConfigError(f"{where}: unknown field(s) {shown}; known: {sorted(fields)}")
    for key, value in list(values.items()):
        if isinstance(value, list):
            values[key] = tuple(value)
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from e


def config_to_json(cfg: ml_collections.ConfigDict) -> str:
    return json.dumps(cfg.to_dict(), indent=2, sort_keys=True, default=str)
