"""`python -m seal_jax.tasks.arc --config configs/arc.py[:demo|paper|reference] [--config.x=y]`"""
from __future__ import annotations

import logging


def main(config) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    from seal_jax.tasks.arc import experiment

    exp = experiment.build(config)
    experiment.run(exp)
    print(f"results: {exp.run_dir}")
    print((exp.run_dir / "results.md").read_text())


if __name__ == "__main__":
    from seal_jax.config import cli_main

    cli_main(main)
