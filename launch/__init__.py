"""Launchers: the same `python -m seal_jax --config ...` command on one host, a SLURM allocation or
a TPU-VM pod, with the mesh/process fields filled in (see launch/README.md)."""
