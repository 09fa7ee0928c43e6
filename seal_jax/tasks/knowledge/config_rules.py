"""Validation rules for every key of `configs/knowledge.py`, checked before a run folder exists.

`validate_knowledge_config(config)` raises one `ConfigError` listing every bad value by its dotted key
(ranges, signs, types, choices, files that must exist, and combinations such as "the HTTP grader needs
its API key variable set"). A key without a rule is itself reported, so adding a config field means
adding its rule here (see seal_jax/validation.py for the checks).
"""
from __future__ import annotations

from typing import Mapping, Optional

from seal_jax import validation as V

EXPERIMENTS = ("rest_em", "single_passage", "cpt", "continual", "study")
DATA_SOURCES = ("embedded", "json", "datasets")
GRADERS = ("em_f1", "llm_judge", "http")
TABLE_CONDITIONS = ("base", "passage_only", "self_edits", "file")


def knowledge_rules() -> dict[str, V.Check]:
    from seal_jax.model.config import SAVED_RESIDUALS
    from seal_jax.model.transformer import ATTENTION_IMPLS
    from seal_jax.rest_em import SELECTIONS
    from seal_jax.tasks.knowledge.data import TRAIN_ORDERS
    from seal_jax.tasks.knowledge.graders import GRADER_PROMPTS, HTTP_APIS
    from seal_jax.tasks.knowledge.prompts import PROMPT_KEYS
    from seal_jax.tasks.knowledge.sequences import FALLBACK_RULES

    rules: dict[str, V.Check] = {
        "experiment": V.string(choices=EXPERIMENTS), "seed": V.integer(ge=0),
        "run_root": V.string(nonempty=True), "run_name": V.string(nonempty=True),
        "resume": V.existing_path(kind="dir"), "progress": V.boolean(), "compile_cache": V.boolean(), "domain": V.string(choices=("knowledge",)),
        "model": V.model_spec(), "tokenizer": V.tokenizer_spec(),
        "param_dtype": V.dtype_name(), "compute_dtype": V.dtype_name(), "scan_unroll": V.integer(ge=0),
        "attention_impl": V.string(choices=("",) + ATTENTION_IMPLS),
        "saved_residuals": V.string(choices=SAVED_RESIDUALS),
        "chat": V.boolean(),
        "data.source": V.string(choices=DATA_SOURCES), "data.path": V.existing_path(kind="file"),
        "data.hf_name": V.string(), "data.hf_split": V.string(), "data.split_seed": V.integer(ge=0),
        "data.n_train": V.integer(ge=0), "data.n_eval": V.integer(ge=0), "data.reference_shuffle": V.boolean(),
        "data.train_source": V.string(choices=("split",) + DATA_SOURCES[1:]),
        "data.train_path": V.existing_path(kind="file"), "data.hf_train_split": V.string(),
        "data.train_order": V.string(choices=TRAIN_ORDERS),
        "self_edit.prompt": V.string(choices=PROMPT_KEYS), "self_edit.k": V.integer(ge=1),
        "self_edit.temperature": V.number(ge=0), "self_edit.top_p": V.number(gt=0, le=1),
        "self_edit.max_new_tokens": V.integer(ge=1), "self_edit.split_newlines": V.boolean(),
        "self_edit.max_sequence_tokens": V.integer(ge=2), "self_edit.batch_size": V.integer(ge=1), "self_edit.from_file": V.existing_path(kind="file"),
        "candidates_per_call": V.integer(ge=0),  # 0: fitted to the device
        "eval.max_new_tokens": V.integer(ge=1), "eval.batch_size": V.integer(ge=1), "eval.reps": V.integer(ge=1),
        "grader.kind": V.string(choices=GRADERS), "grader.f1_threshold": V.number(ge=0, le=1),
        "grader.recall_threshold": V.number(le=1),  # < 0 disables it
        "grader.judge_model": V.model_spec(), "grader.judge_dtype": V.dtype_name(),
        "grader.judge_batch_size": V.integer(ge=1), "grader.judge_threshold": V.number(),
        "grader.http_base_url": _url, "grader.http_model": V.string(nonempty=True),
        "grader.http_api_key_env": V.string(), "grader.http_retries": V.integer(ge=0),
        "grader.prompt": V.string(choices=GRADER_PROMPTS), "grader.http_api": V.string(choices=HTTP_APIS),
        "grader.http_temperature": V.number(le=2),  # < 0: not sent
        "grader.http_max_tokens": V.integer(),  # <= 0: not sent
        "rest_em.rounds": V.integer(ge=0), "rest_em.passages_per_round": V.integer(ge=1),
        "rest_em.reps": V.integer(ge=1), "rest_em.require_improvement": V.boolean(),
        "rest_em.save_adapters": V.boolean(),
        "rest_em.selection": V.string(choices=SELECTIONS), "rest_em.success_threshold": V.number(),
        "table.conditions": V.strings(choices=TABLE_CONDITIONS),
        "table.round_conditions": V.strings(choices=TABLE_CONDITIONS, nonempty=False),
        "table.self_edit_samples": V.integer(ge=1), "table.fallback_rule": V.string(choices=FALLBACK_RULES),
        "table.sample_all": V.boolean(),
        "cpt.n_passages": V.integer(ge=1), "cpt.k_completions": V.integer(ge=1), "cpt.epochs": V.number(ge=0),
        "cpt.learning_rate": V.number(gt=0), "cpt.batch_size": V.integer(ge=1),
        "continual.n_sequences": V.integer(ge=1), "continual.n_datapoints": V.integer(ge=1),
        "study.files": V.string(), "study.max_contexts": V.integer(ge=0),
        "study.max_edits_per_context": V.integer(ge=0), "study.reps": V.integer(ge=1),
        "study.style_field": V.string(nonempty=True),
    }
    rules.update(V.lora_rules("lora"))
    rules.update(V.inner_rules("inner"))
    rules.update(V.optimizer_rules("rest_em.sft"))
    rules.update(V.lora_rules("rest_em.sft"))
    rules.update({"rest_em.sft.schedule": V.string(choices=("linear", "cosine", "constant"))})
    rules.update(V.mesh_rules("mesh"))
    rules.update(V.checkpoint_rules("checkpoint"))
    return rules


def _url(v) -> Optional[str]:
    if not isinstance(v, str) or not v.startswith(("http://", "https://")):
        return "must be an http:// or https:// URL"
    return None


def _needs(flat, key) -> bool:
    return bool(flat.get(key))


def _combinations(flat: Mapping, env: Mapping[str, str]) -> list[tuple[str, str]]:
    problems = []
    if flat.get("data.source") == "json" and not _needs(flat, "data.path"):
        problems.append(("data.path", "must be set when data.source='json' (a SQuAD-format JSON file)"))
    if flat.get("data.train_source") == "json" and not _needs(flat, "data.train_path"):
        problems.append(("data.train_path", "must be set when data.train_source='json' (a SQuAD training "
                         "file), or set data.train_source=split"))
    if flat.get("data.train_order") == "file" and flat.get("data.train_source", "split") == "split":
        problems.append(("data.train_order", "='file' orders a separate training file: it needs "
                         "data.train_source=json or datasets (with split the training passages follow "
                         "the evaluation file's shuffle)"))
    if flat.get("experiment") == "study":
        if "study.files" not in flat:
            problems.append(("experiment", "='study' needs a study section: use configs/knowledge.py:study"))
        elif not _needs(flat, "study.files"):
            problems.append(("study.files", "must name one or more self-edit files (path or name=path, "
                             "comma-separated)"))
        else:
            for part in str(flat["study.files"]).split(","):
                path = part.split("=", 1)[1] if "=" in part else part
                if path.strip() and V.existing_path(kind="file")(path.strip()):
                    problems.append(("study.files", f"no such file: {path.strip()}"))
    if flat.get("grader.kind") == "http":
        var = flat.get("grader.http_api_key_env") or ""
        if not var:
            problems.append(("grader.http_api_key_env", "must name the environment variable holding the "
                             "API key when grader.kind='http'"))
        elif not env.get(var):
            problems.append(("grader.http_api_key_env", f"grader.kind='http' reads the API key from ${var}, "
                             f"which is not set: export {var}=... or name another variable with "
                             "--config.grader.http_api_key_env=NAME"))
    conditions = list(flat.get("table.conditions") or ()) + list(flat.get("table.round_conditions") or ())
    if "file" in conditions and not _needs(flat, "self_edit.from_file"):
        problems.append(("table.conditions", "the 'file' condition needs self_edit.from_file"))
    model = flat.get("model")
    if isinstance(model, str) and model.startswith("preset:") and not _needs(flat, "tokenizer"):
        problems.append(("tokenizer", f"must be set: model {model!r} has random weights and no tokenizer"))
    if (flat.get("experiment") == "rest_em" and isinstance(flat.get("rest_em.rounds"), int)
            and flat["rest_em.rounds"] > 0 and flat.get("data.n_train") == 0):
        problems.append(("data.n_train", "must be >= 1 for ReST-EM rounds (rest_em.rounds > 0)"))
    if flat.get("experiment") == "single_passage" and flat.get("data.n_eval") == 0:
        problems.append(("data.n_eval", "must be >= 1: the single-passage table needs held-out passages"))
    problems += V.sft_batch_divides("rest_em.sft")(flat, env)
    return problems


def validate_knowledge_config(config, *, env: Optional[Mapping[str, str]] = None) -> None:
    """Raise a ConfigError naming every invalid value of a knowledge config; return if all are fine."""
    V.check_config(config, knowledge_rules(), [_combinations], env=env)
