"""Config -> a ready `KnowledgeExperiment`: passages, split, grader, domain; the rest is generic.

The generic half (run directory, engine on the mesh, M-step) is `seal_jax.experiment`. Validation
happens before any model work: unknown fields, bad values and missing files fail with an error that
names the config field.
"""
from __future__ import annotations

import json
import logging
import pathlib
import time

from seal_jax import experiment as X
from seal_jax import results as R
from seal_jax import timings
from seal_jax.config import ConfigError
from seal_jax.rest_em import round_config
from seal_jax.tasks.knowledge import data as D
from seal_jax.tasks.knowledge.config_rules import validate_knowledge_config
from seal_jax.tasks.knowledge.domain import KnowledgeDomain, KnowledgeSettings
from seal_jax.tasks.knowledge.experiments import KnowledgeExperiment
from seal_jax.tasks.knowledge.graders import make_grader
from seal_jax.tasks.knowledge.prompts import PROMPT_KEYS

EXPERIMENTS = ("rest_em", "single_passage", "cpt", "continual", "study")

log = logging.getLogger(__name__)


def _load_source(source: str, path: str, hf_name: str, hf_split: str, *, source_field: str,
                 path_field: str, purpose: str) -> list[D.Passage]:
    if source == "embedded":
        return D.load_embedded_corpus()
    if source == "json":
        if not path:
            raise ConfigError(f"{source_field}=json needs {path_field} ({purpose})")
        file = pathlib.Path(path)
        if not file.exists():
            raise ConfigError(f"{path_field}: file not found: {file} ({purpose})")
        return D.load_squad_json(file)
    if source == "datasets":
        return D.load_hf_squad(hf_split, name=hf_name)
    raise ConfigError(f"{source_field} must be embedded, json or datasets, got {source!r}")


def load_all_passages(c) -> list[D.Passage]:
    """The evaluation file (`data.source`): evaluation passages, and training too for train_source=split."""
    return _load_source(c.data.source, c.data.path, c.data.hf_name, c.data.hf_split,
                        source_field="data.source", path_field="data.path",
                        purpose="a SQuAD-format JSON file")


def load_train_passages(c) -> list[D.Passage] | None:
    """The separate training file (`data.train_source`), or None for train_source=split."""
    source = c.data.get("train_source", "split")
    if source == "split":
        return None
    return _load_source(source, c.data.get("train_path", ""), c.data.hf_name,
                        c.data.get("hf_train_split", "train"), source_field="data.train_source",
                        path_field="data.train_path",
                        purpose="the ReST-EM training passages come from a SQuAD training file, the "
                                "reference's squad_train.json; or set data.train_source=split to take "
                                "them from data.path")


def split_from_config(c, passages: list[D.Passage]) -> tuple[list[D.Passage], list[D.Passage]]:
    train_pool = load_train_passages(c)
    try:
        return D.split_passages(passages, int(c.data.n_train), int(c.data.n_eval), int(c.data.split_seed),
                                shuffle="reference" if c.data.reference_shuffle else "numpy",
                                train_pool=train_pool,
                                train_order=str(c.data.get("train_order", "shuffled")))
    except ValueError as e:
        raise ConfigError(f"data (n_train={c.data.n_train}, n_eval={c.data.n_eval}): {e}") from None


def load_file_self_edits(path: str, passages) -> dict[str, list[str]]:
    """Self-edits produced elsewhere (e.g. a stronger model): records with title, context, completions."""
    p = pathlib.Path(path)
    if not p.exists():
        raise ConfigError(f"self_edit.from_file: file not found: {p}")
    records = json.loads(p.read_text())
    if not isinstance(records, list):
        raise ConfigError(f"self_edit.from_file: expected a JSON list of records, got {type(records).__name__}")
    by_text = {(q.title, q.context): q.id for q in passages}
    out = {}
    for i, rec in enumerate(records):
        comps = rec.get("completions") if isinstance(rec, dict) else None
        if not isinstance(comps, list) or not all(isinstance(x, str) for x in comps):
            raise ConfigError(f"self_edit.from_file: record {i} has no list of string 'completions'")
        pid = by_text.get((rec.get("title"), rec.get("context")))
        if pid is not None:
            out[pid] = comps
    if not out:
        raise ConfigError(f"self_edit.from_file: none of the {len(records)} records matches a loaded "
                          "passage (title and context must be identical)")
    return out


def validate(c) -> None:
    if c.experiment not in EXPERIMENTS:
        raise ConfigError(f"experiment must be one of {', '.join(EXPERIMENTS)}, got {c.experiment!r}")
    if c.self_edit.prompt not in PROMPT_KEYS:
        raise ConfigError(f"self_edit.prompt must be one of {PROMPT_KEYS}, got {c.self_edit.prompt!r}")
    for field, value in (("self_edit.k", c.self_edit.k), ("rest_em.reps", c.rest_em.reps),
                         ("eval.reps", c.eval.reps),
                         ("rest_em.passages_per_round", c.rest_em.passages_per_round)):
        if int(value) < 1:
            raise ConfigError(f"{field} must be >= 1, got {value}")
    if int(c.candidates_per_call) < 0:
        raise ConfigError(f"candidates_per_call must be >= 0 (0: fitted to the device), got "
                          f"{c.candidates_per_call}")
    if int(c.rest_em.rounds) < 0:
        raise ConfigError(f"rest_em.rounds must be >= 0, got {c.rest_em.rounds}")
    if not 0.0 < float(c.self_edit.top_p) <= 1.0:
        raise ConfigError(f"self_edit.top_p must be in (0, 1], got {c.self_edit.top_p}")
    if float(c.self_edit.temperature) < 0:
        raise ConfigError(f"self_edit.temperature must be >= 0, got {c.self_edit.temperature}")
    if c.experiment == "study" and "study" not in c:
        raise ConfigError("experiment=study needs a study section: use configs/knowledge.py:study")


def knowledge_domain(c, tokenizer) -> KnowledgeDomain:
    return KnowledgeDomain(tokenizer, make_grader(c.grader), KnowledgeSettings(
        prompt_key=c.self_edit.prompt, chat=bool(c.chat), split_newlines=bool(c.self_edit.split_newlines),
        max_sequence_tokens=int(c.self_edit.max_sequence_tokens),
        answer_max_new_tokens=int(c.eval.max_new_tokens)))


def build_experiment(c) -> KnowledgeExperiment:
    started_utc = timings.utc_now()
    start = time.perf_counter()
    # Every value checked at once, before anything is loaded or created.
    validate_knowledge_config(c)
    validate(c)
    X.initialize_distributed(c)
    X.engine_configs(c)  # config errors before a run directory exists
    sft_cfg = X.sft_config(c)
    rc = round_config(c, contexts_per_round=int(c.rest_em.passages_per_round))

    passages = load_all_passages(c)
    train, evaluation = split_from_config(c, passages)
    file_edits = load_file_self_edits(c.self_edit.from_file, passages) if c.self_edit.from_file else {}
    engine = X.build_engine(c)
    domain = knowledge_domain(c, engine.tokenizer)
    # Only now, with data and model loaded, does the run get (or reopen) its folder.
    run_dir = X.open_run_dir(c)
    # validation, data, the model onto the devices (the run directory only exists from here on)
    timings.record(run_dir, "setup", time.perf_counter() - start, started_utc=started_utc)
    R.write_json(run_dir / "split.json", {"train": [p.id for p in train], "eval": [p.id for p in evaluation]})
    records, checkpointer = X.run_files(run_dir)
    return KnowledgeExperiment(config=c, engine=engine, domain=domain, train_contexts=train,
                               eval_contexts=evaluation, run_dir=run_dir, records=records,
                               checkpointer=checkpointer, round=rc, m_step=X.make_m_step(engine, sft_cfg),
                               progress=bool(c.progress), file_self_edits=file_edits)
