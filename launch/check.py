"""A seconds-long job that checks a (multi-)process launch before a long one: same flags as seal_jax.

    python launch/local.py --num-processes 2 --cpu-devices 4 --module launch.check -- \\
        --config configs/knowledge.py:demo
    srun python launch/slurm.py --module launch.check -- --config configs/knowledge.py:paper

Each process joins the process group from the config's `mesh` section, builds the configured mesh over
all processes' devices, feeds its share of a candidate-sharded array, runs one program whose result
needs every shard (a sum), gathers it back and prints one JSON line per process: the layout, which
candidates it fed, and whether the gathered values are right.
"""
from __future__ import annotations

import json
import os
import sys


def main(config) -> None:
    from seal_jax import sharding

    sharding.maybe_initialize_distributed({
        "num_processes": int(config.mesh.num_processes),
        "coordinator_address": config.mesh.coordinator_address or None,
        "process_id": int(config.mesh.process_id)})
    import jax
    import jax.numpy as jnp
    import numpy as np

    from seal_jax import distributed

    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.rules_from_config(config.mesh)
    k = 2 * sharding.candidate_shards(mesh, rules)
    values = np.arange(k * 3, dtype=np.float32).reshape(k, 3)
    spec = sharding.candidate_sharding(mesh, 2, 0, rules)
    placed = distributed.put_global(values, spec)
    row_sums = distributed.to_host(jax.jit(lambda x: jnp.sum(x, axis=1))(placed))
    total = distributed.to_host(jax.jit(jnp.sum, out_shardings=sharding.replicated(mesh))(placed))
    share = distributed.candidate_share(k, spec)
    shares = distributed.allgather_objects(share.tolist())
    fed = sorted(i for s in shares for i in s)
    out = {**distributed.describe(mesh), "candidates": k, "fed": share.tolist(),
           "every_candidate_fed_once": fed == list(range(k)) or (
               # a replicated candidate axis: every process holds every candidate
               all(s == list(range(k)) for s in shares)),
           "row_sums_ok": bool(np.array_equal(row_sums, values.sum(1))),
           "total_ok": bool(float(total) == float(values.sum()))}
    # One write() of the whole line: the processes share the launcher's stdout, and a print() (text,
    # then newline, as separate writes when unbuffered) can interleave with another process's line.
    # A single write of less than PIPE_BUF bytes to a pipe is atomic.
    os.write(sys.stdout.fileno(), ("CHECK " + json.dumps(out) + "\n").encode())
    distributed.barrier("launch.check")


if __name__ == "__main__":
    from seal_jax.config import cli_main

    cli_main(main, sys.argv)
