"""One host: one process seeing every local device, or N local processes joined on 127.0.0.1.

    python launch/local.py -- --config configs/knowledge.py:demo            # 1 process, all GPUs
    python launch/local.py --num-processes 2 --gpus-per-process 4 -- --config ...
    python launch/local.py --num-processes 2 --cpu-devices 4 -- --config ...  # CPU rehearsal
    python launch/local.py ... --dry-run                                      # print, do not run

One process per host is how JAX prefers to drive GPUs (a mesh over all local devices needs no
coordinator); several local processes rehearse a multi-host run on one machine: each gets its share of
the GPUs (CUDA_VISIBLE_DEVICES) or its own virtual CPU devices, and all join the coordinator on
127.0.0.1. If one process fails, the others would wait at their next collective until the
coordinator times out, so the launcher stops them all and returns the failure's exit code; `--timeout`
bounds the whole run (exit code 124).
"""
from __future__ import annotations

import argparse
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
from typing import Optional, Sequence

if __package__ in (None, ""):  # `python launch/local.py`: make `launch` importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from launch import common  # noqa: E402


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def plan(ns: argparse.Namespace) -> list[tuple[list[str], dict]]:
    """(argv, extra environment) of every process."""
    n = ns.num_processes
    if n < 1:
        raise SystemExit(f"--num-processes must be >= 1, got {n}")
    coordinator = f"127.0.0.1:{ns.port}" if n > 1 else None
    out = []
    for i in range(n):
        env = {}
        if ns.gpus_per_process:
            first = i * ns.gpus_per_process
            env["CUDA_VISIBLE_DEVICES"] = ",".join(
                str(g) for g in range(first, first + ns.gpus_per_process))
        if ns.cpu_devices:
            # Virtual CPU devices must be requested before jax starts, hence the environment.
            env["JAX_PLATFORMS"] = "cpu"
            env["XLA_FLAGS"] = " ".join(
                [f for f in os.environ.get("XLA_FLAGS", "").split()
                 if not f.startswith("--xla_force_host_platform_device_count")]
                + [f"--xla_force_host_platform_device_count={ns.cpu_devices}"])
        argv = common.process_command(ns, num_processes=n, process_id=i if n > 1 else None,
                                      coordinator=coordinator)
        out.append((argv, env))
    return out


def _stop(procs: Sequence[subprocess.Popen]) -> None:
    """SIGTERM every still-running process, then SIGKILL what is left after a grace period."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + 5
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def run(processes: Sequence[tuple[list[str], dict]], *, timeout: Optional[float] = None,
        log_dir: Optional[str] = None, cwd: Optional[str] = None) -> int:
    """Start every process, wait for all; 0 if all succeed, else the first failure's code (124 on
    timeout). No process outlives this call."""
    procs, logs = [], []
    start = time.monotonic()
    try:
        for i, (argv, extra_env) in enumerate(processes):
            out = None
            if log_dir:
                pathlib.Path(log_dir).mkdir(parents=True, exist_ok=True)
                out = open(pathlib.Path(log_dir) / f"process_{i}.log", "w")
                logs.append(out)
            # Children stay in the launcher's process group: Ctrl-C, or a supervisor killing the
            # group, reaches them too.
            procs.append(subprocess.Popen(argv, env={**os.environ, **extra_env}, cwd=cwd, stdout=out,
                                          stderr=subprocess.STDOUT if out else None))
        while True:
            codes = [p.poll() for p in procs]
            failed = [c for c in codes if c not in (None, 0)]
            if failed:
                print(f"launch: a process exited with {failed[0]}; stopping the others",
                      file=sys.stderr, flush=True)
                return failed[0]
            if all(c == 0 for c in codes):
                return 0
            if timeout is not None and time.monotonic() - start > timeout:
                print(f"launch: timed out after {timeout:g} s; stopping all processes",
                      file=sys.stderr, flush=True)
                return 124
            time.sleep(0.2)
    finally:
        _stop(procs)
        for f in logs:
            f.close()


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-processes", type=int, default=1)
    ap.add_argument("--gpus-per-process", type=int, default=0,
                    help="give process i GPUs [i*G, (i+1)*G) via CUDA_VISIBLE_DEVICES (0: all)")
    ap.add_argument("--cpu-devices", type=int, default=0,
                    help="run on CPU with this many virtual devices per process (rehearsal/tests)")
    ap.add_argument("--port", type=int, default=0, help="coordinator port (0: a free one)")
    ap.add_argument("--timeout", type=float, default=None, help="seconds before all are stopped")
    ap.add_argument("--log-dir", default=None, help="write process_<i>.log here instead of stdout")
    common.add_common_args(ap)
    return ap


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through run()'s `finally`, which stops the children


def main(argv: Optional[Sequence[str]] = None) -> int:
    ns = parser().parse_args(argv)
    if ns.port == 0:
        ns.port = common.DEFAULT_PORT if ns.dry_run else free_port()
    processes = plan(ns)
    if ns.dry_run:
        for argv_i, env in processes:
            print(common.shell_line(argv_i, env))
        return 0
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    return run(processes, timeout=ns.timeout, log_dir=ns.log_dir)


if __name__ == "__main__":
    sys.exit(main())
