"""Config -> a ready `Experiment`: model, mesh, engine, grader, passages, run directory.

Validation happens here, before any model work: unknown fields, bad values and missing files fail with
an error that names the config field.
"""
from __future__ import annotations

import json
import logging
import pathlib

from seal_jax import inner, results as R, sharding, sft
from seal_jax.checkpoints import RecordLog, RunCheckpointer
from seal_jax.config import ConfigError, config_to_json, to_dataclass
from seal_jax.model.config import LoraConfig
from seal_jax.model.loading import load_model
from seal_jax.runner import Engine, EngineSettings
from seal_jax.tasks.knowledge import data as D
from seal_jax.tasks.knowledge.domain import KnowledgeDomain, KnowledgeSettings
from seal_jax.tasks.knowledge.experiments import Experiment
from seal_jax.tasks.knowledge.graders import make_grader
from seal_jax.tasks.knowledge.prompts import PROMPT_KEYS

log = logging.getLogger(__name__)


def load_all_passages(c) -> list[D.Passage]:
    source = c.data.source
    if source == "embedded":
        return D.load_embedded_corpus()
    if source == "json":
        if not c.data.path:
            raise ConfigError("data.source=json needs data.path (a SQuAD-format JSON file)")
        path = pathlib.Path(c.data.path)
        if not path.exists():
            raise ConfigError(f"data.path: file not found: {path}")
        return D.load_squad_json(path)
    if source == "datasets":
        return D.load_hf_squad(c.data.hf_split, name=c.data.hf_name)
    raise ConfigError(f"data.source must be embedded, json or datasets, got {source!r}")


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
    if c.experiment not in ("rest_em", "single_passage", "cpt", "continual"):
        raise ConfigError(f"experiment must be rest_em, single_passage, cpt or continual, got {c.experiment!r}")
    if c.self_edit.prompt not in PROMPT_KEYS:
        raise ConfigError(f"self_edit.prompt must be one of {PROMPT_KEYS}, got {c.self_edit.prompt!r}")
    for field, value in (("self_edit.k", c.self_edit.k), ("rest_em.reps", c.rest_em.reps),
                         ("eval.reps", c.eval.reps), ("candidates_per_call", c.candidates_per_call),
                         ("rest_em.passages_per_round", c.rest_em.passages_per_round)):
        if int(value) < 1:
            raise ConfigError(f"{field} must be >= 1, got {value}")
    if int(c.rest_em.rounds) < 0:
        raise ConfigError(f"rest_em.rounds must be >= 0, got {c.rest_em.rounds}")
    if not 0.0 < float(c.self_edit.top_p) <= 1.0:
        raise ConfigError(f"self_edit.top_p must be in (0, 1], got {c.self_edit.top_p}")
    if float(c.self_edit.temperature) < 0:
        raise ConfigError(f"self_edit.temperature must be >= 0, got {c.self_edit.temperature}")


def build_experiment(c) -> Experiment:
    validate(c)
    # Multi-host: must run before anything touches the devices.
    sharding.maybe_initialize_distributed({
        "num_processes": int(c.mesh.num_processes),
        "coordinator_address": c.mesh.coordinator_address or None,
        "process_id": int(c.mesh.process_id) if int(c.mesh.process_id) >= 0 else None})
    lora_cfg = to_dataclass(LoraConfig, c.lora, "lora")
    inner_cfg = to_dataclass(inner.InnerConfig, c.inner, "inner")
    sft_section = c.rest_em.sft.to_dict()
    sft_lora = to_dataclass(LoraConfig, {k: sft_section.pop(k) for k in ("rank", "alpha", "targets")},
                            "rest_em.sft")
    try:
        sft_cfg = sft.SFTConfig.from_fields(lora=sft_lora, **sft_section)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"rest_em.sft: {e}") from e

    if c.resume:
        run_dir = pathlib.Path(c.resume)
        if not (run_dir / "config.json").exists():
            raise ConfigError(f"resume: {run_dir} is not a seal_jax run directory (no config.json)")
    else:
        run_dir = R.new_run_dir(c.run_root, c.run_name)
        (run_dir / "config.json").write_text(config_to_json(c))
    log.info("run directory: %s", run_dir)

    passages = load_all_passages(c)
    train, evaluation = D.split_passages(passages, int(c.data.n_train), int(c.data.n_eval),
                                         int(c.data.split_seed),
                                         shuffle="reference" if c.data.reference_shuffle else "numpy")
    R.write_json(run_dir / "split.json", {"train": [p.id for p in train], "eval": [p.id for p in evaluation]})

    cfg, params, tokenizer = load_model(c.model, tokenizer=c.tokenizer or None,
                                        param_dtype=c.param_dtype or None, seed=int(c.seed))
    if c.compute_dtype:
        cfg = cfg.replace(compute_dtype=c.compute_dtype)
    if tokenizer is None:
        raise ConfigError(f"model {c.model!r} has no tokenizer; set tokenizer=<HF dir with tokenizer.json>")
    mesh = sharding.make_mesh(c.mesh)
    rules = sharding.rules_from_config(c.mesh)

    settings = EngineSettings(lora=lora_cfg, inner=inner_cfg, candidates_per_call=int(c.candidates_per_call),
                              eval_batch_size=int(c.eval.batch_size), mesh=mesh, rules=rules)
    engine = Engine(cfg, params, tokenizer, settings)
    grader = make_grader(c.grader)
    domain = KnowledgeDomain(tokenizer, grader, KnowledgeSettings(
        prompt_key=c.self_edit.prompt, chat=bool(c.chat), split_newlines=bool(c.self_edit.split_newlines),
        max_sequence_tokens=int(c.self_edit.max_sequence_tokens),
        answer_max_new_tokens=int(c.eval.max_new_tokens)))
    file_edits = load_file_self_edits(c.self_edit.from_file, passages) if c.self_edit.from_file else {}

    def policy_sft(eng: Engine, examples):
        new_params, metrics = sft.sft_update(eng.params, examples, cfg=eng.cfg, sft_cfg=sft_cfg,
                                             eos_id=eng.tokenizer.eos_id, pad_id=eng.pad_id,
                                             mesh=mesh, rules=rules)
        eng.params = new_params
        return metrics

    return Experiment(config=c, engine=engine, domain=domain, train_passages=train,
                      eval_passages=evaluation, run_dir=run_dir, records=RecordLog(run_dir / "records.jsonl"),
                      checkpointer=RunCheckpointer(run_dir / "checkpoints", max_to_keep=2),
                      file_self_edits=file_edits, policy_sft=policy_sft)
