"""`python -m seal_jax --config configs/<domain>.py[:variant] [--config.a.b=value ...]`

Runs the experiment a config names and prints the run directory. The domain is chosen by the config's
`domain` field through the registry in `seal_jax.tasks` (this CLI is the one engine-side module that
imports it: it composes an engine and a domain).
"""
from __future__ import annotations

import logging


def main(config) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    from seal_jax import tasks

    exp = tasks.run(config)
    print(f"results: {exp.run_dir}")
    md = exp.run_dir / "results.md"
    if md.exists():
        print(md.read_text())


if __name__ == "__main__":
    from seal_jax.config import cli_main

    cli_main(main)
