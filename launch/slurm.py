"""SLURM (multi-node GPU clusters): one seal_jax process per task, joined through the allocation.

Inside a batch script (see launch/slurm.sbatch), one task per node, each seeing all its node's GPUs:

    srun python launch/slurm.py -- --config configs/knowledge.py:paper --config.model=/path/to/hf_dir

Every task runs the same `python -m seal_jax ...` with the process fields taken from the allocation:
num_processes = SLURM_NTASKS, process_id = SLURM_PROCID, and the coordinator on the first host of
SLURM_JOB_NODELIST (process 0 runs there under srun's default block distribution) at a port derived
from SLURM_JOB_ID, so two jobs sharing a node do not collide. `--dry-run` prints the command of every
task of the allocation described by the environment, without running anything.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import re
import sys
from typing import Mapping, Optional, Sequence

if __package__ in (None, ""):  # `python launch/slurm.py`: make `launch` importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from launch import common  # noqa: E402


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets: "a[1-2,5],b" -> ["a[1-2,5]", "b"]."""
    parts, depth, current = [], 0, ""
    for ch in text:
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
            continue
        depth += (ch == "[") - (ch == "]")
        current += ch
    if current:
        parts.append(current)
    return parts


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list ("gpu[01-03,07],login1") as host names, in order
    (what `scontrol show hostnames` prints; zero padding kept)."""
    hosts = []
    for part in _split_top_level(nodelist.strip()):
        match = re.fullmatch(r"([^\[\]]*)\[([^\]]+)\](.*)", part)
        if not match:
            hosts.append(part)
            continue
        prefix, ranges, suffix = match.groups()
        for item in ranges.split(","):
            lo, _, hi = item.partition("-")
            for n in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{str(n).zfill(len(lo))}{suffix}")
    return hosts


def expand_tasks_per_node(spec: str, num_nodes: int) -> list[int]:
    """SLURM_TASKS_PER_NODE ("2(x3),1") as one count per node."""
    counts = []
    for item in spec.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item.strip())
        if not match:
            raise SystemExit(f"cannot parse SLURM_TASKS_PER_NODE={spec!r}")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    if len(counts) != num_nodes:
        raise SystemExit(f"SLURM_TASKS_PER_NODE={spec!r} lists {len(counts)} nodes, the node list "
                         f"{num_nodes}")
    return counts


class Allocation:
    """The parts of a SLURM allocation the launcher needs, from the environment."""

    def __init__(self, env: Mapping[str, str], port: Optional[int] = None):
        def need(name):
            if not env.get(name):
                raise SystemExit(f"{name} is not set: run inside a SLURM allocation (sbatch/salloc "
                                 f"+ srun), or set it for a dry run")
            return env[name]

        self.hosts = expand_nodelist(need("SLURM_JOB_NODELIST"))
        self.num_tasks = int(need("SLURM_NTASKS"))
        per_node = env.get("SLURM_TASKS_PER_NODE")
        self.tasks_per_node = (expand_tasks_per_node(per_node, len(self.hosts)) if per_node else
                               [self.num_tasks // len(self.hosts)] * len(self.hosts))
        self.process_id = int(env["SLURM_PROCID"]) if env.get("SLURM_PROCID") else None
        job_id = int(env.get("SLURM_JOB_ID", "0") or 0)
        self.port = port if port else 12000 + job_id % 20000
        self.coordinator = f"{self.hosts[0]}:{self.port}"

    def task_hosts(self) -> list[str]:
        """Host of each task under srun's default block distribution."""
        out = []
        for host, count in zip(self.hosts, self.tasks_per_node):
            out += [host] * count
        return out[: self.num_tasks]


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, default=0,
                    help="coordinator port (0: 12000 + SLURM_JOB_ID mod 20000)")
    common.add_common_args(ap)
    return ap


def main(argv: Optional[Sequence[str]] = None, env: Optional[Mapping[str, str]] = None) -> int:
    ns = parser().parse_args(argv)
    env = os.environ if env is None else env
    alloc = Allocation(env, ns.port or None)
    if ns.dry_run:
        print(f"# {alloc.num_tasks} tasks on {len(alloc.hosts)} nodes; coordinator "
              f"{alloc.coordinator}")
        for task, host in enumerate(alloc.task_hosts()):
            cmd = common.process_command(ns, num_processes=alloc.num_tasks, process_id=task,
                                         coordinator=alloc.coordinator)
            print(f"{host}: {common.shell_line(cmd)}")
        return 0
    if alloc.process_id is None:
        raise SystemExit("SLURM_PROCID is not set: start this launcher with `srun` (one per task)")
    cmd = common.process_command(ns, num_processes=alloc.num_tasks, process_id=alloc.process_id,
                                 coordinator=alloc.coordinator)
    sys.stdout.flush()
    os.execvp(cmd[0], cmd)  # the task *is* the seal_jax process: srun's signals reach it directly


if __name__ == "__main__":
    sys.exit(main())
