"""The domain registry: a config's `domain` field -> the package that builds and runs its experiments.

Each registered package exposes `build_experiment(config) -> Experiment` and
`EXPERIMENT_RUNNERS: dict[name, callable(experiment) -> state]`, keyed by the config's `experiment`
field. Domains are imported lazily, by name, so a run loads only its own domain and the engine never
imports one. A new domain adds one line here.
"""
from __future__ import annotations

import importlib
from typing import Any

DOMAINS = {
    "knowledge": "seal_jax.tasks.knowledge",
    "arc": "seal_jax.tasks.arc",
}


def domain_package(name: str):
    if name not in DOMAINS:
        from seal_jax.config import ConfigError

        raise ConfigError(f"domain must be one of {sorted(DOMAINS)}, got {name!r}")
    return importlib.import_module(DOMAINS[name])


def run(config) -> Any:
    """Build the experiment the config names and run it; returns the experiment (run_dir etc.)."""
    package = domain_package(config.get("domain", "knowledge"))
    runners = package.EXPERIMENT_RUNNERS
    if config.experiment not in runners:
        from seal_jax.config import ConfigError

        raise ConfigError(f"experiment must be one of {sorted(runners)} for domain "
                          f"{config.get('domain', 'knowledge')!r}, got {config.experiment!r}")
    exp = package.build_experiment(config)
    try:
        runners[config.experiment](exp)
    finally:
        exp.checkpointer.close()
    return exp
