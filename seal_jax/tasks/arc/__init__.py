"""Few-shot ARC as a SEAL domain (paper §4.1): a self-edit is a JSON config choosing augmentations
and TTT hyper-parameters. See docs in each module; the flow is

data.py (tasks) -> grids.py (text formats) -> augment.py -> dataset.py (TTT data for a config)
selfedit.py (policy prompt, strict parser) -> evaluate.py (queries, inversion, voting, reward)
synthetic.py (easy generated tasks), plot.py (PNG of a task), domain.py, experiment.py.
"""
