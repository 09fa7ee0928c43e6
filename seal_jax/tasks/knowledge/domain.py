"""Knowledge incorporation as a SEAL domain (paper §4.2).

Context = a passage with questions. Self-edit = the policy's completion of an implications (or rewrite,
self-QA, ...) prompt. Candidate = the reference's training sequences (title-prefixed lines of the edit,
plus the passage itself), loss on every token. Evaluation = greedy answers to "Topic: title\\nquestion"
with no passage in context, graded against the gold span; reward = fraction correct.

Bad self-edits and passages without questions are recorded failures (reward 0, a reason), never
exceptions: see `build_candidate`. Answers the grader could not judge are left out of the reward; a
passage none of whose answers could be judged is ungraded (`Score.reward=None`).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from seal_jax.domain import CandidateFailure, CandidateSpec, EvalJob, EvalRequest, Score
from seal_jax.tasks.knowledge import prompts
from seal_jax.tasks.knowledge.data import Passage
from seal_jax.tasks.knowledge.graders import GradeItem, passage_reward
from seal_jax.tasks.knowledge.sequences import build_train_sequences, clean_self_edit, is_rejected


@dataclasses.dataclass(frozen=True)
class KnowledgeSettings:
    prompt_key: str = prompts.DEFAULT_PROMPT_KEY
    chat: bool = True  # instruct policy: chat-template prompts for self-edits and answers
    split_newlines: bool = True
    max_sequence_tokens: int = 512  # a training sequence longer than this is truncated (recorded)
    max_self_edit_tokens: int = 8192  # a longer self-edit is truncated (recorded); the reference cap
    answer_max_new_tokens: int = 64


class KnowledgeDomain:
    name = "knowledge"

    def __init__(self, tokenizer, grader, settings: KnowledgeSettings = KnowledgeSettings()):
        self.tokenizer, self.grader, self.settings = tokenizer, grader, settings

    def context_id(self, passage: Passage) -> str:
        return passage.id

    # -- the policy's prompt ------------------------------------------------------------------
    def self_edit_prompt_text(self, passage: Passage) -> str:
        if self.settings.chat:
            return prompts.self_edit_chat_prompt(passage.title, passage.context, self.tokenizer,
                                                 self.settings.prompt_key)
        return prompts.self_edit_prompt(passage.title, passage.context, self.settings.prompt_key,
                                        tokenizer=self.tokenizer)

    def _encode_prompt(self, text: str) -> list[int]:
        # Special-token strings in `text` come from the chat template only (untrusted text was escaped
        # by the prompt builder). A rendered chat template already carries its BOS, so the tokenizer
        # adds one only to plain prompts (avoiding the reference's double BOS).
        return self.tokenizer.encode(text, add_special=not self.settings.chat)

    def self_edit_prompt(self, passage: Passage) -> list[int]:
        return self._encode_prompt(self.self_edit_prompt_text(passage))

    # -- self-edit -> candidate ---------------------------------------------------------------
    def build_candidate(self, passage: Passage, self_edit: str) -> CandidateSpec | CandidateFailure:
        if not passage.has_questions:
            return CandidateFailure("passage has no questions: the adapted model cannot be scored")
        text, issues = clean_self_edit(self_edit, tokenizer=self.tokenizer,
                                       max_tokens=self.settings.max_self_edit_tokens)
        info = {"issues": [dataclasses.asdict(i) for i in issues]}
        if is_rejected(issues):
            return CandidateFailure("; ".join(i.detail for i in issues if i.fatal), info)
        return self._candidate(passage, text, info)

    def passage_only_candidate(self, passage: Passage) -> CandidateSpec | CandidateFailure:
        """The 'train on passage' baseline: the reference's empty completion (one sequence)."""
        if not passage.has_questions:
            return CandidateFailure("passage has no questions: the adapted model cannot be scored")
        return self._candidate(passage, "", {"issues": []})

    def sequences_for(self, passage: Passage, text: str) -> list[str]:
        return build_train_sequences(text, passage.title, passage.context,
                                     split_newlines=self.settings.split_newlines)

    def _candidate(self, passage: Passage, text: str, info: dict) -> CandidateSpec:
        texts = self.sequences_for(passage, text)
        limit = self.settings.max_sequence_tokens
        sequences, truncated = [], 0
        for t in texts:
            # Training text is untrusted model output: special-token spellings become plain text.
            # add_special=True: the tokenizer's BOS where it adds one to prompts, as the reference's
            # `tokenizer(seq)` (none for Qwen2.5 and SmolLM2; <|begin_of_text|> for Llama 3).
            ids = self.tokenizer.encode(self.tokenizer.escape(t), add_special=True)
            if len(ids) > limit:
                ids, truncated = ids[:limit], truncated + 1
            sequences.append(np.asarray(ids, dtype=np.int32))
        info = dict(info, sequences=texts, num_sequences=len(texts),
                    num_tokens=int(sum(len(s) for s in sequences)), truncated_sequences=truncated)
        masks = [np.ones(len(s), dtype=np.float32) for s in sequences]  # the reference trains on all
        return CandidateSpec(sequences=sequences, loss_masks=masks, info=info)

    # -- evaluation ---------------------------------------------------------------------------
    def answer_prompt_text(self, passage: Passage, question: str) -> str:
        if self.settings.chat:
            return prompts.answer_chat_prompt(passage.title, question, self.tokenizer)
        return prompts.answer_prompt(passage.title, question, tokenizer=self.tokenizer)

    def eval_requests(self, passage: Passage) -> list[EvalRequest]:
        return [EvalRequest(prompt_ids=self._encode_prompt(self.answer_prompt_text(passage, q.question)),
                            max_new_tokens=self.settings.answer_max_new_tokens,
                            meta={"question": q.question, "gold": q.answer})
                for q in passage.questions]

    def score(self, jobs: Sequence[EvalJob]) -> list[Score]:
        items = [GradeItem(prompts.question_with_topic(job.context.title, r.meta["question"]),
                           r.meta["gold"], text)
                 for job in jobs for r, text in zip(job.requests, job.texts)]
        verdicts = self.grader.grade(items) if items else []
        scores, pos = [], 0
        for job in jobs:
            mine = verdicts[pos:pos + len(job.requests)]
            pos += len(job.requests)
            reward, counts = passage_reward(mine)  # None: no answer could be graded
            answers = [{"question": r.meta["question"], "gold": r.meta["gold"], "answer": text,
                        "correct": v.correct, "grader_raw": v.raw, "grader_error": v.error}
                       for r, text, v in zip(job.requests, job.texts, mine)]
            details = {"answers": answers, **counts}
            if not job.requests:
                details["reason"] = "passage has no questions"
            scores.append(Score(reward=reward, details=details))
        return scores

    # -- ReST-EM M-step -----------------------------------------------------------------------
    def sft_example(self, passage: Passage, self_edit: str) -> tuple[list[int], list[int]]:
        prompt_ids = self.self_edit_prompt(passage)
        completion_ids = self.tokenizer.encode(self.tokenizer.escape(self_edit.strip()), add_special=False)
        return prompt_ids, completion_ids
