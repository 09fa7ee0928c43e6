"""The one protocol a SEAL domain implements.

A domain knows its contexts (passages, ARC tasks), how to prompt the policy for a self-edit, how to turn
a self-edit into training data for the inner loop, what to ask an adapted model, and how to score the
answers. It knows nothing about vmap, sharding or optimizers: the round driver (`seal_jax.runner`)
batches every candidate of every context into the engine's K-candidate calls.

Failures are data, not exceptions: `build_candidate` returns a `CandidateFailure` for a self-edit that
cannot be trained on (empty, junk, too long, ...), and the driver records it with reward 0.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np


@dataclasses.dataclass
class CandidateSpec:
    """Training data and per-candidate hyper-parameters for one self-edit.

    `sequences[i]` are token ids, `loss_masks[i]` float weights of the same length (1 = train on the
    token). `hparams` overrides the inner-loop defaults for this candidate only (e.g. learning_rate,
    epochs: the ARC self-edit chooses them).
    """

    sequences: list[np.ndarray]
    loss_masks: list[np.ndarray]
    hparams: dict[str, Any] = dataclasses.field(default_factory=dict)
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class CandidateFailure:
    """A self-edit that produced no trainable candidate; recorded with reward 0 and this reason."""

    reason: str
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class EvalRequest:
    """One prompt to put to an adapted (or base) model. `meta` travels back to `score`."""

    prompt_ids: list[int]
    max_new_tokens: int
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class EvalJob:
    """The answers of one model (one adapter, or the base) to one context's requests."""

    context: Any
    requests: list[EvalRequest]
    texts: list[str]


@dataclasses.dataclass
class Score:
    """Reward of one model on one context; `details` holds per-request records (answers, verdicts)."""

    reward: float
    details: dict[str, Any] = dataclasses.field(default_factory=dict)


@runtime_checkable
class Domain(Protocol):
    name: str

    def context_id(self, context: Any) -> str:
        """A stable, unique id (used for records, caching and resume)."""

    def self_edit_prompt(self, context: Any) -> list[int]:
        """Token ids of the prompt the policy completes with a self-edit."""

    def build_candidate(self, context: Any, self_edit: str) -> CandidateSpec | CandidateFailure:
        """Self-edit text -> inner-loop training data, or a recorded failure."""

    def eval_requests(self, context: Any) -> list[EvalRequest]:
        """What to ask a model (base or adapted) about this context. May be empty."""

    def score(self, jobs: Sequence[EvalJob]) -> list[Score]:
        """Grade many jobs at once (graders batch across contexts and candidates)."""

    def sft_example(self, context: Any, self_edit: str) -> tuple[list[int], list[int]]:
        """(prompt_ids, completion_ids) for the ReST-EM M-step."""
