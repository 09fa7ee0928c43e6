"""Few-shot ARC (SEAL paper §4.1) as a registered domain: a self-edit is a JSON config choosing
augmentations and TTT hyper-parameters. The flow, module by module:

data.py (tasks) -> grids.py (text formats) -> augment.py -> dataset.py (TTT data for a config)
selfedit.py (policy prompt, strict parser) -> evaluate.py (queries, inversion, voting, reward)
domain.py (the Domain protocol) -> experiment.py (baselines, oracle, ReST-EM rounds, the table)
synthetic.py (easy generated tasks), plot.py (PNG of a task).

Heavy modules (jax, the engine) load only when an experiment is built or run.
"""


def build_experiment(config):
    from seal_jax.tasks.arc.experiment import build_experiment as build

    return build(config)


def _rest_em(exp):
    from seal_jax.tasks.arc.experiment import run

    return run(exp)


EXPERIMENT_RUNNERS = {"rest_em": _rest_em}
