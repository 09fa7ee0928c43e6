"""Few-shot ARC as a SEAL domain (the `seal_jax.tasks.base.Domain` protocol).

Context = an `ArcTask`. Self-edit = the policy's JSON config (selfedit.py). Candidate = the TTT
dataset that config asks for (dataset.py), with the config's learning rate and epochs as
per-candidate hyper-parameters and its loss strategy as the loss masks, so configs of one task and
of many tasks train together in one vmapped inner-loop call. Evaluation = the leave-one-out and
augmented queries of every test input (evaluate.py); reward 1 if the task is solved (every test
output among its two voted attempts), else 0.

Invalid self-edits are recorded failures (reward 0) with the parser's reason, as are configs whose
dataset is empty or whose optimizer steps exceed `step_cap` (the reference trains a zero-step
"dummy" adapter for those, which can still be rewarded: §1.4, §7.5). Datasets depend only on the
task and the four toggles, queries only on the task: both are cached.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

from seal_jax.tasks.arc import dataset as D
from seal_jax.tasks.arc import evaluate as E
from seal_jax.tasks.arc import selfedit as S
from seal_jax.tasks.arc.data import ArcTask
from seal_jax.tasks.base import CandidateFailure, CandidateSpec, EvalJob, EvalRequest, Score


@dataclasses.dataclass(frozen=True)
class ArcSettings:
    dataset: D.DatasetSettings = D.DatasetSettings()
    queries: E.QuerySettings = E.QuerySettings()
    limits: S.ParseLimits = S.ParseLimits()
    batch_size: int = 2  # TTT batch (only for the step count; the engine's inner config trains)
    step_cap: int = 375  # optimizer steps above this: the self-edit is invalid
    warmup_steps: int = 11  # reference; capped at warmup_fraction of a run's steps (below)
    warmup_fraction: float = 0.1  # the reference never leaves warmup in runs of <= 11 steps
    attempts: int = 2


class ArcDomain:
    name = "arc"

    def __init__(self, tokenizer, settings: ArcSettings = ArcSettings()):
        self.tokenizer, self.settings = tokenizer, settings
        self._datasets: dict[tuple, D.EncodedDataset] = {}
        self._queries: dict[str, tuple[list[E.Query], dict]] = {}

    def context_id(self, task: ArcTask) -> str:
        return task.id

    # -- the policy's prompt --------------------------------------------------------------------
    def self_edit_prompt_text(self, task: ArcTask) -> str:
        return self.tokenizer.apply_chat_template(S.policy_messages(task.train),
                                                  add_generation_prompt=True)

    def self_edit_prompt(self, task: ArcTask) -> list[int]:
        # The rendered template carries its own BOS (if the model has one): no second BOS.
        return self.tokenizer.encode(self.self_edit_prompt_text(task), add_special=False)

    def parse(self, text: str) -> S.SelfEditConfig | S.Rejection:
        return S.parse_self_edit(text, self.settings.limits)

    # -- self-edit -> candidate -----------------------------------------------------------------
    def dataset(self, task: ArcTask, toggles: dict[str, bool]) -> D.EncodedDataset:
        key = (task.id, tuple(sorted(toggles.items())))
        if key not in self._datasets:
            episodes, stats = D.ttt_episodes(task.train, toggles, self.settings.dataset)
            self._datasets[key] = D.encode_dataset(episodes, self.tokenizer, stats,
                                                   self.settings.dataset.max_tokens)
        return self._datasets[key]

    def build_candidate(self, task: ArcTask, self_edit: str) -> CandidateSpec | CandidateFailure:
        parsed = self.parse(self_edit)
        if isinstance(parsed, S.Rejection):
            return CandidateFailure(f"invalid self-edit: {parsed}", {"parse_error": parsed.code})
        return self.candidate_for_config(task, parsed)

    def candidate_for_config(self, task: ArcTask, config: S.SelfEditConfig
                             ) -> CandidateSpec | CandidateFailure:
        data = self.dataset(task, config.toggles)
        steps = S.steps_for(config.epochs, len(data), self.settings.batch_size)
        info = {"config": config.to_json(), "clamped": list(config.clamped),
                "dataset": data.stats.as_dict(), **data.token_stats(), "planned_steps": steps}
        if not len(data):
            return CandidateFailure("empty TTT dataset (every sample dropped)", info)
        if steps > self.settings.step_cap:
            return CandidateFailure(f"{steps} optimizer steps exceed the step cap "
                                    f"{self.settings.step_cap}", info)
        sequences, masks = data.sequences_and_masks(config.output_only)
        warmup = min(self.settings.warmup_steps, int(math.floor(self.settings.warmup_fraction * steps)))
        hparams = {"learning_rate": float(config.learning_rate), "epochs": int(config.epochs),
                   "schedule": "cosine", "warmup_steps": warmup}
        return CandidateSpec(sequences=sequences, loss_masks=masks, hparams=hparams, info=info)

    # -- evaluation -----------------------------------------------------------------------------
    def queries(self, task: ArcTask) -> tuple[list[E.Query], dict]:
        if task.id not in self._queries:
            self._queries[task.id] = E.build_queries(task, self.tokenizer, self.settings.queries)
        return self._queries[task.id]

    def eval_requests(self, task: ArcTask) -> list[EvalRequest]:
        queries, _ = self.queries(task)
        return [EvalRequest(prompt_ids=q.prompt_ids, max_new_tokens=q.max_new_tokens,
                            meta={"query": i, "test_index": q.test_index,
                                  "transform": q.transform_name})
                for i, q in enumerate(queries)]

    def score(self, jobs: Sequence[EvalJob]) -> list[Score]:
        scores = []
        for job in jobs:
            queries, stats = self.queries(job.context)
            mine = [queries[r.meta["query"]] for r in job.requests]
            reward, details = E.score_answers(job.context, mine, job.texts, self.settings.attempts)
            details["query_stats"] = stats
            details["answers"] = list(job.texts[:3])  # a sample of raw answers for the record
            scores.append(Score(reward=reward, details=details))
        return scores

    # -- ReST-EM M-step -------------------------------------------------------------------------
    def sft_example(self, task: ArcTask, self_edit: str) -> tuple[list[int], list[int]]:
        prompt_ids = self.self_edit_prompt(task)
        completion = self.tokenizer.encode(self.tokenizer.escape(self_edit.strip()), add_special=False)
        return prompt_ids, completion
