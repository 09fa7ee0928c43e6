"""`python -m seal_jax --config configs/<domain>.py[:variant] [--config.a.b=value ...]`

Runs the experiment a config names and prints the run directory. The domain is chosen by the config
file's `domain` field (default: knowledge).
"""
from __future__ import annotations

import logging


def main(config) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    domain = config.get("domain", "knowledge")
    if domain != "knowledge":
        raise SystemExit(f"unknown domain {domain!r}; available: knowledge")
    from seal_jax.tasks.knowledge import experiments
    from seal_jax.tasks.knowledge.setup import build_experiment

    exp = build_experiment(config)
    run = {"rest_em": experiments.rest_em, "single_passage": _table_only, "cpt": experiments.cpt,
           "continual": experiments.continual}[config.experiment]
    run(exp)
    exp.checkpointer.close()
    print(f"results: {exp.run_dir}")
    md = exp.run_dir / "results.md"
    if md.exists():
        print(md.read_text())


def _table_only(exp):
    from seal_jax.tasks.knowledge import experiments

    state = {"round": 0, "rounds": [], "table": experiments.single_passage_table(exp, "model", exp.config.seed)}
    experiments._write_rest_em_results(exp, state)
    return state


if __name__ == "__main__":
    from seal_jax.config import cli_main

    cli_main(main)
