"""Knowledge incorporation (SEAL paper §4.2) as a registered domain: `build_experiment` and the runners
of its experiments (ReST-EM rounds, the single-passage table, CPT, continual, edit studies)."""
from seal_jax.tasks.knowledge import experiments as _experiments
from seal_jax.tasks.knowledge.setup import build_experiment  # noqa: F401

EXPERIMENT_RUNNERS = {
    "rest_em": _experiments.rest_em,
    "single_passage": _experiments.table_only,
    "cpt": _experiments.cpt,
    "continual": _experiments.continual,
    "study": _experiments.study,
}
