"""The solver's text (chat messages) and the TTT dataset a self-edit config asks for.

Solver text (reference §2.2): the system turn holds the instruction and every demonstration as
`[[..]] -> [[..]]#`, the user turn the query input followed by " -> ", the assistant turn the
answer grid followed by "#". Rendered with the tokenizer's chat template. Two reference bugs are
fixed (§7.1-7.3): the training text is the conversation *without* an extra trailing generation
prompt, and prompt and answer are encoded separately (no second BOS), so the prompt tokens of a
training sample are exactly the tokens an evaluation query starts with. A template whose rendering
of the full conversation does not start with the rendered prompt is an error.

TTT dataset (reference §2.4, made deterministic): for each n in `leave_n`, the leave-n-out episodes
of the demonstrations; every augmenter of the chosen families applied to each (results with a side
over `max_side` dropped and counted); ordered dedup; for each episode `permute_n` copies with a
random colour permutation (when any family is on) and a random demonstration order; ordered dedup;
the leave-n lists concatenated; a seeded shuffle and cut to `max_samples` when longer. A sample
longer than `max_tokens` is dropped and counted, never cut (its answer carries the loss).
Loss mask: "output" = the answer tokens (grid, "#", end of turn); "all" = every token. Padding is
never a target (the inner loop's clean mode).
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np

from seal_jax.tasks.arc import augment as A
from seal_jax.tasks.arc.grids import MAX_SIDE, format_solver

SOLVER_SYSTEM = (
    "Figure out the underlying transformation in the following examples and apply it to the test "
    "case. Here are some examples from this transformation, your answer must follow the format.\n"
    "The input-output grids are provided as python arrays:\n")


def solver_messages(ep: A.Episode, with_answer: bool) -> list[dict]:
    system = SOLVER_SYSTEM + "".join(f"{format_solver(i)} -> {format_solver(o)}#\n"
                                     for i, o in ep.demos)
    messages = [{"role": "system", "content": system},
                {"role": "user", "content": format_solver(ep.query_in) + " -> "}]
    if with_answer:
        if ep.query_out is None:
            raise ValueError("an episode without a query output has no answer to train on")
        messages.append({"role": "assistant", "content": format_solver(ep.query_out) + "#"})
    return messages


def encode_episode(ep: A.Episode, tokenizer, with_answer: bool = True) -> tuple[list[int], list[int]]:
    """(prompt_ids, answer_ids): the generation prompt and, if asked, the rest of the conversation."""
    prompt = tokenizer.apply_chat_template(solver_messages(ep, False), add_generation_prompt=True)
    prompt_ids = tokenizer.encode(prompt, add_special=False)
    if not with_answer:
        return prompt_ids, []
    full = tokenizer.apply_chat_template(solver_messages(ep, True), add_generation_prompt=False)
    if not full.startswith(prompt):
        raise ValueError("the chat template renders the conversation with a different prefix than "
                         "the generation prompt; cannot separate the answer tokens")
    return prompt_ids, tokenizer.encode(full[len(prompt):], add_special=False)


# ------------------------------------------------------------------------------------------------
# Dataset


@dataclasses.dataclass(frozen=True)
class DatasetSettings:
    leave_n: tuple = (1, 2)
    permute_n: int = 1
    max_samples: int = 250  # the reference's Nmax
    max_side: int = MAX_SIDE
    max_tokens: int = 8192  # samples longer than this are dropped and counted
    min_demos: int = 1  # the reference keeps 0-demo episodes (leave-2 of 2 demos); we drop them
    seed: int = 0


@dataclasses.dataclass
class DatasetStats:
    initial: int = 0
    augmented: int = 0
    dropped_too_large: int = 0  # an augmented grid over max_side
    dropped_too_few_demos: int = 0
    after_permutation: int = 0
    dropped_over_cap: int = 0
    dropped_too_long: int = 0  # over max_tokens (counted in `encode_dataset`)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def ttt_episodes(demos: Sequence[tuple[np.ndarray, np.ndarray]], toggles: dict[str, bool],
                 settings: DatasetSettings = DatasetSettings()) -> tuple[list[A.Episode], DatasetStats]:
    """The episodes of one config's TTT dataset (depends only on the toggles and the settings)."""
    stats = DatasetStats()
    transforms = A.augmenters(toggles)
    out: list[A.Episode] = []
    for n in settings.leave_n:
        rng = np.random.default_rng([settings.seed, n])
        initial = []
        for ep in A.leave_n_out(demos, n):
            if len(ep.demos) < settings.min_demos:
                stats.dropped_too_few_demos += 1
            else:
                initial.append(ep)
        stats.initial += len(initial)
        augmented = []
        for t in transforms:
            for ep in initial:
                transform = A.random_translate(rng) if t is A.TRANSLATE else t
                new = transform.apply(ep)
                if new.fits(settings.max_side):
                    augmented.append(new)
                else:
                    stats.dropped_too_large += 1
        stats.augmented += len(augmented)
        pool = A.ordered_unique(initial + augmented)
        permuted = []
        for ep in pool:
            for _ in range(settings.permute_n):
                new = A.colour_permutation(rng).apply(ep) if transforms else ep
                permuted.append(A.permute_examples(new, rng))
        pool = A.ordered_unique(pool + permuted)
        stats.after_permutation += len(pool)
        out.extend(pool)
    if len(out) > settings.max_samples:
        keep = np.random.default_rng([settings.seed, 1 << 20]).permutation(len(out))
        stats.dropped_over_cap = len(out) - settings.max_samples
        out = [out[i] for i in keep[: settings.max_samples]]
    return out, stats


@dataclasses.dataclass
class EncodedDataset:
    """Token ids of a dataset's samples (prompt and answer parts); masks are chosen per strategy."""

    prompts: list[list[int]]
    answers: list[list[int]]
    stats: DatasetStats

    def __len__(self) -> int:
        return len(self.prompts)

    def sequences_and_masks(self, output_only: bool) -> tuple[list[np.ndarray], list[np.ndarray]]:
        seqs, masks = [], []
        for p, a in zip(self.prompts, self.answers):
            seqs.append(np.asarray(p + a, np.int32))
            mask = np.ones(len(p) + len(a), np.float32)
            if output_only:
                mask[: len(p)] = 0.0
            masks.append(mask)
        return seqs, masks

    def token_stats(self) -> dict:
        lengths = [len(p) + len(a) for p, a in zip(self.prompts, self.answers)]
        return {"num_samples": len(lengths), "max_tokens": max(lengths, default=0),
                "mean_tokens": float(np.mean(lengths)) if lengths else 0.0}


def encode_dataset(episodes: Sequence[A.Episode], tokenizer, stats: Optional[DatasetStats] = None,
                   max_tokens: int = 8192) -> EncodedDataset:
    stats = stats or DatasetStats()
    prompts, answers = [], []
    for ep in episodes:
        p, a = encode_episode(ep, tokenizer, with_answer=True)
        if len(p) + len(a) > max_tokens:
            stats.dropped_too_long += 1
            continue
        prompts.append(p)
        answers.append(a)
    return EncodedDataset(prompts, answers, stats)
