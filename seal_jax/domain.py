"""The one protocol a SEAL domain implements; the engine drives any object that satisfies it.

A domain knows its contexts (passages, ARC tasks), how to prompt the policy for a self-edit, how to turn
a self-edit into training data for the inner loop, what to ask an adapted model, how to grade the
answers, and what the policy is fine-tuned on in the M-step. It knows nothing about vmap, sharding or
optimizers: the E-step (`seal_jax.estep`) batches every candidate of every context into the engine's
K-candidate calls and the round (`seal_jax.rest_em`) does selection and the M-step.

Domains import this module; nothing under `seal_jax/` outside `seal_jax/tasks/` imports a domain.

Outcomes are data, not exceptions:
* `build_candidate` returns a `CandidateFailure` for a self-edit that cannot be trained on (empty,
  junk, too long, ...); the E-step records it with reward 0 and the reason.
* `Score.reward` is a float in the domain's reward scale, or None = *ungraded*: the grader could not
  judge (an unreachable API, a judge that answered nothing usable). Ungraded is neither right nor
  wrong: the engine leaves it out of every reward mean and out of selection, and counts it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Protocol, Sequence, runtime_checkable

import numpy as np


@dataclasses.dataclass
class CandidateSpec:
    """Training data and per-candidate hyper-parameters for one self-edit.

    `sequences[i]` are token ids, `loss_masks[i]` float weights of the same length (1 = train on the
    token). `hparams` overrides the inner-loop defaults for this candidate only (e.g. learning_rate,
    epochs: the ARC self-edit chooses them). `info` is copied into the candidate's record.
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
    """Reward of one model on one context; `details` holds per-request records (answers, verdicts).

    `reward=None` means ungraded (grading failed); `details` should say why.
    """

    reward: Optional[float]
    details: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def graded(self) -> bool:
        return self.reward is not None


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
        """(prompt_ids, completion_ids) the policy is fine-tuned on when this self-edit is selected."""
