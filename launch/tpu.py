"""TPU-VM pods: the same seal_jax command on every worker of a pod slice, over `gcloud ... ssh`.

    python launch/tpu.py --tpu my-v5p-64 --zone us-east5-a --num-workers 8 \\
        -- --config configs/knowledge.py:paper --config.model=/mnt/disks/qwen7b

runs, from a workstation,

    gcloud compute tpus tpu-vm ssh my-v5p-64 --zone=us-east5-a --worker=all \\
        --command='cd ~/seal_jax && python3 -m seal_jax --config ... --config.mesh.num_processes=8'

On TPU VMs JAX finds each worker's process id and the coordinator (worker 0) from the TPU metadata,
so only `num_processes` is passed (one process per worker, each driving its local chips). The code
and the model must already be on every worker (e.g. `--worker=all --command='git clone ...'`).
`--dry-run` prints the gcloud command line without running it.
"""
from __future__ import annotations

import argparse
import pathlib
import shlex
import subprocess
import sys
from typing import Optional, Sequence

if __package__ in (None, ""):  # `python launch/tpu.py`: make `launch` importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from launch import common  # noqa: E402


def gcloud_command(ns: argparse.Namespace) -> list[str]:
    remote = common.process_command(ns, num_processes=ns.num_workers, process_id=None,
                                    coordinator=None)
    remote_line = f"cd {ns.repo_dir} && {common.shell_line(remote)}"
    cmd = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", ns.tpu, f"--zone={ns.zone}",
           f"--worker={ns.worker}", f"--command={remote_line}"]
    if ns.project:
        cmd.insert(6, f"--project={ns.project}")
    return cmd


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tpu", required=True, help="TPU VM (pod slice) name")
    ap.add_argument("--zone", required=True)
    ap.add_argument("--project", default="")
    ap.add_argument("--num-workers", type=int, required=True,
                    help="hosts in the slice (e.g. 8 for a v5p-64, 4 chips each)")
    ap.add_argument("--worker", default="all", help="gcloud --worker (all: the whole slice)")
    ap.add_argument("--repo-dir", default="~/seal_jax", help="checkout on the workers")
    common.add_common_args(ap)
    ap.set_defaults(python="python3")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    ns = parser().parse_args(argv)
    if ns.num_workers < 1:
        raise SystemExit(f"--num-workers must be >= 1, got {ns.num_workers}")
    cmd = gcloud_command(ns)
    if ns.dry_run:
        print(shlex.join(cmd))
        return 0
    return subprocess.call(cmd)


if __name__ == "__main__":
    sys.exit(main())
