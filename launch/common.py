"""What every launcher shares: the command line of one process, and how to print it.

A launcher never changes the experiment: it runs `python -m seal_jax <args>` with the user's own
`--config ... --config.x=y` arguments unchanged and appends only the process-group fields of the
config's `mesh` section (num_processes, process_id, coordinator_address). `--raw` runs any command
instead, substituting `{process_id}`, `{num_processes}` and `{coordinator}` in its arguments.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from typing import Optional, Sequence

DEFAULT_PORT = 8476


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dry-run", action="store_true",
                        help="print the commands for this allocation instead of running them")
    parser.add_argument("--python", default=sys.executable, help="interpreter on the hosts")
    parser.add_argument("--module", default="seal_jax", help="entry point run as `python -m MODULE`")
    parser.add_argument("--raw", action="store_true",
                        help="ARGS is a whole command; {process_id} {num_processes} {coordinator} "
                             "are substituted, no --config.mesh fields are appended")
    parser.add_argument("args", nargs=argparse.REMAINDER,
                        help="-- then the arguments of the entry point (--config ... --config.x=y)")


def user_args(args: Sequence[str]) -> list[str]:
    args = list(args)
    if args and args[0] == "--":
        args = args[1:]
    if not args:
        raise SystemExit("nothing to run: give the entry point's arguments after `--`")
    return args


def process_command(ns: argparse.Namespace, *, num_processes: int, process_id: Optional[int],
                    coordinator: Optional[str]) -> list[str]:
    """argv of one process. process_id / coordinator None: left to JAX's cluster auto-detection."""
    args = user_args(ns.args)
    if ns.raw:
        fields = {"process_id": "" if process_id is None else process_id,
                  "num_processes": num_processes, "coordinator": coordinator or ""}
        return [a.format(**fields) for a in args]
    cmd = [ns.python, "-m", ns.module, *args]
    if num_processes > 1:
        cmd.append(f"--config.mesh.num_processes={num_processes}")
        if process_id is not None:
            cmd.append(f"--config.mesh.process_id={process_id}")
        if coordinator:
            cmd.append(f"--config.mesh.coordinator_address={coordinator}")
    return cmd


def shell_line(argv: Sequence[str], env: Optional[dict] = None) -> str:
    """One copy-pasteable shell line (env assignments first)."""
    prefix = [f"{k}={shlex.quote(str(v))}" for k, v in sorted((env or {}).items())]
    return " ".join(prefix + [shlex.quote(str(a)) for a in argv])
