"""The generic half of building a SEAL run from a config: run directory, engine, M-step.

A domain's setup (e.g. `seal_jax/tasks/knowledge/setup.py`) validates its own fields, loads its
contexts and builds its domain object; everything else comes from here, so every domain reads the
same config fields the same way:

    model, tokenizer, param_dtype, compute_dtype    the policy (`seal_jax.model.loading.load_model`)
    mesh.{axes, logical_axis_rules, num_processes, ...}   devices and sharding rules
    lora, inner, candidates_per_call, eval.batch_size,
    self_edit.batch_size (when the config has it)          the engine (`seal_jax.engine`)
    rest_em.sft.{rank, alpha, targets, ...}                the M-step (`seal_jax.sft`)
    checkpoint.keep_last                                   round checkpoints kept (`seal_jax.rest_em`)
    run_root, run_name, resume, progress, seed             the run directory

`Experiment` is what the round (`seal_jax.rest_em`) and a domain's experiments run on.
"""
from __future__ import annotations

import dataclasses
import logging
import pathlib
from typing import Any, Callable, Optional

from seal_jax import compile_cache, inner, sharding, sft
from seal_jax.checkpoints import PolicyHistory, RecordLog, RunCheckpointer
from seal_jax.config import ConfigError, to_dataclass
from seal_jax.domain import Domain
from seal_jax.engine import Engine, EngineSettings
from seal_jax.estep import done_records
from seal_jax.model.config import SAVED_RESIDUALS, LoraConfig
from seal_jax.model.transformer import ATTENTION_IMPLS
from seal_jax.rest_em import RoundConfig

log = logging.getLogger(__name__)

MStep = Callable[[Any, list], sft.PolicyUpdate]  # (params, [(prompt, completion, weight)]) -> update


@dataclasses.dataclass
class Experiment:
    """Everything a run needs, built once from the config."""

    config: Any  # ml_collections.ConfigDict
    engine: Engine
    domain: Domain
    train_contexts: list
    eval_contexts: list
    run_dir: pathlib.Path
    records: RecordLog
    checkpointer: RunCheckpointer
    round: RoundConfig
    m_step: MStep
    progress: bool = True
    # What `engine.params` hold, as the adapters merged into the base model: empty while they are the
    # base, None once they are not base + adapters (a full fine-tune, a checkpoint of whole params).
    # The round keeps it in step with the params and checkpoints it instead of them.
    policy_history: Optional[PolicyHistory] = dataclasses.field(default_factory=PolicyHistory)

    def done_records(self) -> dict[tuple, dict]:
        """Candidate records already written (resume), keyed like `estep.score_self_edits` expects."""
        return done_records(self.records.read())


def open_run_dir(c) -> pathlib.Path:
    """A fresh, marked run directory, or the one `c.resume` names after checking it may be resumed;
    returns the directory this process writes into.

    The one place that creates or reopens a run directory (`seal_jax.rundir`): resume refuses a folder
    that is not a seal_jax run of this kind and a config that changed in a key not declared
    resume-safe. Call it as late as possible (after the model loaded), so a failed setup leaves no
    folder; the CLI removes a fresh one that holds nothing when the run fails. With several processes
    (`jax.distributed`) process 0 creates it and writes the run's files; every other process writes
    into a private mirror inside it (`distributed.process_run_dirs`), so records and results are
    written once.
    """
    from seal_jax import distributed, interrupt, rundir

    def create() -> pathlib.Path:
        run = rundir.create_or_resume(c, kind=f"{c.get('domain', 'knowledge')}/{c.experiment}")
        for key, (old, new) in run.changed_safe.items():
            if key != "resume":
                log.info("resume: %s changed %r -> %r (safe)", key, old, new)
        interrupt.set_resume_hint(run.resume_hint())
        log.info("run directory: %s", run.path)
        return run.path

    _run_dir, own = distributed.process_run_dirs(create)
    return own


def run_files(run_dir: pathlib.Path) -> tuple[RecordLog, RunCheckpointer]:
    """The record log in this process's directory; checkpoints in the run directory itself, which
    every process writes (orbax writes each array shard once). The checkpointer keeps every step; the
    round prunes old ones after each save (`checkpoint.keep_last`)."""
    from seal_jax import distributed

    checkpoints = distributed.shared_run_dir(run_dir) / "checkpoints"
    return RecordLog(run_dir / "records.jsonl"), RunCheckpointer(checkpoints, max_to_keep=None)


def initialize_distributed(c) -> None:
    """Multi-host: must run before anything touches the devices."""
    sharding.maybe_initialize_distributed({
        "num_processes": int(c.mesh.num_processes),
        "coordinator_address": c.mesh.coordinator_address or None,
        "process_id": int(c.mesh.process_id) if int(c.mesh.process_id) >= 0 else None})


def sft_config(c) -> sft.SFTConfig:
    section = c.rest_em.sft.to_dict()
    sft_lora = to_dataclass(LoraConfig, {k: section.pop(k) for k in ("rank", "alpha", "targets")},
                            "rest_em.sft")
    try:
        return sft.SFTConfig.from_fields(lora=sft_lora, **section)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"rest_em.sft: {e}") from e


def engine_configs(c) -> tuple[LoraConfig, inner.InnerConfig]:
    """The candidates' LoRA and inner-loop settings (parsed before any run directory exists).

    Length buckets left at their default become the backend's preferred ones (multiples of 128 on
    TPU, `seal_jax.backends`); buckets set in the config are kept as they are."""
    from seal_jax import backends

    inner_cfg = to_dataclass(inner.InnerConfig, c.inner, "inner")
    default = inner.InnerConfig().length_buckets
    if tuple(inner_cfg.length_buckets) == tuple(default):
        inner_cfg = inner_cfg.replace(length_buckets=backends.length_buckets(default=default))
    return to_dataclass(LoraConfig, c.lora, "lora"), inner_cfg


def build_engine(c, engine_cls: type = Engine) -> Engine:
    """Load the policy, build the mesh and place the base params on it (as `engine_cls`, an Engine
    or a domain's subclass of it)."""
    from seal_jax.model.loading import load_model

    lora_cfg, inner_cfg = engine_configs(c)
    if c.get("compile_cache", False):
        compile_cache.enable(pathlib.Path(c.run_root) / "xla_cache")
    cfg, params, tokenizer = load_model(c.model, tokenizer=c.tokenizer or None,
                                        param_dtype=c.param_dtype or None, seed=int(c.seed))
    if c.compute_dtype:
        cfg = cfg.replace(compute_dtype=c.compute_dtype)
    unroll = int(c.get("scan_unroll", 1))
    if unroll < 0:
        raise ConfigError(f"scan_unroll must be >= 0 (0: every layer), got {unroll}")
    cfg = cfg.replace(scan_unroll=unroll or cfg.num_layers)
    attention = c.get("attention_impl", "") or cfg.attention_impl
    if attention not in ATTENTION_IMPLS:
        raise ConfigError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {attention!r}")
    cfg = cfg.replace(attention_impl=attention)
    residuals = c.get("saved_residuals", cfg.saved_residuals)
    if residuals not in SAVED_RESIDUALS:
        raise ConfigError(f"saved_residuals must be one of {SAVED_RESIDUALS}, got {residuals!r}")
    cfg = cfg.replace(saved_residuals=residuals)
    if tokenizer is None:
        raise ConfigError(f"model {c.model!r} has no tokenizer; set tokenizer='embedded', a .gguf or an "
                          "HF dir with tokenizer.json")
    settings = EngineSettings(lora=lora_cfg, inner=inner_cfg, candidates_per_call=int(c.candidates_per_call),
                              eval_batch_size=int(c.eval.batch_size),
                              sample_batch_size=int(c.self_edit.get("batch_size", EngineSettings.sample_batch_size)),
                              mesh=sharding.make_mesh(c.mesh),
                              rules=sharding.rules_from_config(c.mesh))
    return engine_cls(cfg, params, tokenizer, settings)


def make_m_step(engine: Engine, sft_cfg: sft.SFTConfig) -> MStep:
    """The ReST-EM M-step on the engine's model, mesh and tokenizer: new params and the merged adapter."""

    def m_step(params, examples):
        return sft.train_policy(params, examples, cfg=engine.cfg, sft_cfg=sft_cfg, eos_id=engine.eos_id,
                                pad_id=engine.pad_id, mesh=engine.settings.mesh,
                                rules=engine.settings.rules)

    return m_step
