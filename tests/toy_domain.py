"""A toy SEAL domain for engine tests: not knowledge, reward computable from the answer text.

Context = a word. Self-edit prompt = "Notes on <word>:". Candidate = one sequence "<word>: <edit>".
Evaluation = one greedy answer to "<word>?". Reward = (sum of the answer's bytes mod 5) / 4, so
different adapters get different rewards in {0, .25, .5, .75, 1}; contexts named in `ungraded` get
`Score(None)` (their grader "fails"). Runs on the tiny world's byte tokenizer and random tiny Llama.
"""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Sequence

import numpy as np

from seal_jax import inner, sft
from seal_jax.checkpoints import RecordLog, RunCheckpointer
from seal_jax.domain import CandidateFailure, CandidateSpec, EvalJob, EvalRequest, Score
from seal_jax.engine import Engine, EngineSettings
from seal_jax.experiment import Experiment
from seal_jax.model.config import LoraConfig
from seal_jax.rest_em import RoundConfig

from tiny_world import byte_tokenizer, tiny_model


@dataclasses.dataclass(frozen=True)
class Word:
    word: str


class ToyDomain:
    name = "toy"

    def __init__(self, tokenizer, ungraded: Sequence[str] = ()):
        self.tokenizer, self.ungraded = tokenizer, set(ungraded)

    def context_id(self, ctx: Word) -> str:
        return ctx.word

    def self_edit_prompt(self, ctx: Word) -> list[int]:
        return self.tokenizer.encode(f"Notes on {ctx.word}:")

    def build_candidate(self, ctx: Word, self_edit: str):
        if not self_edit.strip():
            return CandidateFailure("empty self-edit")
        ids = np.asarray(self.tokenizer.encode(f"{ctx.word}: {self_edit}")[:48], np.int32)
        return CandidateSpec(sequences=[ids], loss_masks=[np.ones(len(ids), np.float32)],
                             info={"num_tokens": len(ids)})

    def eval_requests(self, ctx: Word) -> list[EvalRequest]:
        return [EvalRequest(prompt_ids=self.tokenizer.encode(f"{ctx.word}?"), max_new_tokens=4)]

    def score(self, jobs: Sequence[EvalJob]) -> list[Score]:
        out = []
        for job in jobs:
            if job.context.word in self.ungraded:
                out.append(Score(None, {"answers": [{"answer": job.texts[0], "grader_error": "offline"}]}))
            else:
                reward = (sum(job.texts[0].encode()) % 5) / 4
                out.append(Score(reward, {"answers": [{"answer": job.texts[0]}]}))
        return out

    def sft_example(self, ctx: Word, self_edit: str) -> tuple[list[int], list[int]]:
        return self.self_edit_prompt(ctx), self.tokenizer.encode(self_edit.strip())


WORDS = ("apple", "river", "stone")


def toy_engine(candidates_per_call: int = 4) -> Engine:
    cfg, params = tiny_model()
    settings = EngineSettings(
        lora=LoraConfig(rank=4, alpha=8.0),
        inner=inner.InnerConfig(epochs=1, append_eos=True, length_buckets=(64, 128), steps_per_chunk=8),
        candidates_per_call=candidates_per_call, eval_batch_size=16)
    return Engine(cfg, params, byte_tokenizer(), settings)


def toy_experiment(run_dir: pathlib.Path, *, rounds: int = 2, selection: str = "best_of_k",
                   ungraded: Sequence[str] = (), success_threshold: float = 0.5,
                   engine: Engine | None = None, save_adapters: bool = False) -> Experiment:
    engine = engine or toy_engine()
    sft_cfg = sft.SFTConfig.from_fields(lora=LoraConfig(rank=4, alpha=8.0, targets=("q", "v")),
                                        batch_size=2, microbatches=1, epochs=1, learning_rate=1e-2,
                                        length_buckets=(64, 128))

    def m_step(params, examples):
        return sft.train_policy(params, examples, cfg=engine.cfg, sft_cfg=sft_cfg, eos_id=engine.eos_id)

    run_dir.mkdir(parents=True, exist_ok=True)
    rc = RoundConfig(rounds=rounds, contexts_per_round=2, k=2, reps=1, selection=selection,
                     success_threshold=success_threshold, temperature=1.0, top_p=1.0,
                     max_new_tokens=10, seed=3, save_adapters=save_adapters)
    return Experiment(config=None, engine=engine, domain=ToyDomain(engine.tokenizer, ungraded),
                      train_contexts=[Word(w) for w in WORDS], eval_contexts=[Word(w) for w in WORDS],
                      run_dir=run_dir, records=RecordLog(run_dir / "records.jsonl"),
                      checkpointer=RunCheckpointer(run_dir / "checkpoints", max_to_keep=None),
                      round=rc, m_step=m_step, progress=False)
