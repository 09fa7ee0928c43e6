"""Graders: is a free-form answer correct, given the question and the gold SQuAD span?

Every grader implements `Grader.grade(items) -> verdicts`, one `Verdict` per `GradeItem`, in order.
`Verdict.correct` is True/False when the item was graded and None when it could not be (an HTTP
failure, a prompt too long for the judge): the reference silently counted such failures as wrong,
which biases accuracy down; here they are recorded with `error` and left for the caller to exclude.
Empty answers are False without asking any grader (reference behaviour, and an empty answer is never
right).

* `LexicalGrader`: SQuAD normalisation, exact match, token F1; correct = EM, or the normalised gold
  appears in the answer as whole words, or F1 >= threshold (optionally: or the share of gold tokens
  found in the answer >= `recall_threshold`, which forgives verbose answers that F1 penalises).
  Fast, but it under-calls "yes" against GPT-4.1 (see bench/results/grader_calibration.md).
* `LocalJudgeGrader`: any local causal LM (cfg, params, tokenizer) as a judge with the reference's
  rubric (our wording by default; `prompt="reference"`: its Qwen-instruct judge verbatim), batched; the verdict is the sign of logsumexp(yes-token logits) minus
  logsumexp(no-token logits) at the first reply position: deterministic, no sampling.
* `HttpGrader`: an OpenAI-compatible `/chat/completions` or `/responses` endpoint (urllib only),
  retries with backoff, the reference's text rule `parse_yes_no` on the reply. With
  `prompt="reference"` it sends the reference's grading prompt (verbatim, `REFERENCE_GRADE_TEMPLATE`)
  as one user message; with "ours" our reworded rubric (`JUDGE_SYSTEM`) as system + user messages.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import json
import os
import re
import string
import time
import urllib.error
import urllib.request
from typing import Any, Callable, Protocol, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class GradeItem:
    question_with_topic: str  # "Topic: {title}\n{question}", as the reference's grader saw it
    gold: str
    answer: str


@dataclasses.dataclass(frozen=True)
class Verdict:
    correct: bool | None  # None = ungraded (see `error`), never a silent False
    raw: str = ""  # the grader's reply (judge: "yes"/"no"; lexical: the scores)
    error: str | None = None
    score: float | None = None  # judge: yes-minus-no logit margin; lexical: token F1


class Grader(Protocol):
    name: str

    def grade(self, items: Sequence[GradeItem]) -> list[Verdict]: ...


EMPTY_ANSWER = Verdict(correct=False, raw="", error=None)


def summarize(verdicts: Sequence[Verdict]) -> dict[str, Any]:
    """Counts and accuracy over graded items (ungraded ones are reported, not counted wrong)."""
    graded = [v.correct for v in verdicts if v.correct is not None]
    return {
        "n": len(verdicts),
        "graded": len(graded),
        "ungraded": len(verdicts) - len(graded),
        "correct": int(sum(graded)),
        "accuracy": float(np.mean(graded)) if graded else None,
    }


def passage_reward(verdicts: Sequence[Verdict]) -> tuple[float | None, dict[str, int]]:
    """A passage's reward: accuracy over its graded answers, with the counts behind it.

    None when the passage has answers and not one of them could be graded: a reward of 0.0 would be
    selected against as a real zero, so the caller must treat the passage as ungraded (excluded from
    rewards and selection, and counted). With some answers ungraded the accuracy is over the graded
    ones only (the reference counted a failed grading as wrong). A passage without questions keeps
    reward 0.0; it is reported by the caller with its reason.
    """
    graded = [v.correct for v in verdicts if v.correct is not None]
    counts = {"n_questions": len(verdicts), "n_graded": len(graded),
              "n_ungraded": len(verdicts) - len(graded)}
    if not verdicts:
        return 0.0, counts
    if not graded:
        return None, counts
    return float(np.mean(graded)), counts


def _grade_nonempty_unique(items: Sequence[GradeItem],
                           grade_fn: Callable[[list[GradeItem]], list[Verdict]]) -> list[Verdict]:
    """Empty answers -> False; identical items are graded once (baselines repeat across candidates)."""
    unique: dict[GradeItem, int] = {}
    for item in items:
        if item.answer.strip():
            key = dataclasses.replace(item, answer=item.answer.strip())
            unique.setdefault(key, len(unique))
    verdicts = grade_fn(list(unique)) if unique else []
    if len(verdicts) != len(unique):
        raise RuntimeError(f"grader returned {len(verdicts)} verdicts for {len(unique)} items")
    out = []
    for item in items:
        if not item.answer.strip():
            out.append(EMPTY_ANSWER)
        else:
            out.append(verdicts[unique[dataclasses.replace(item, answer=item.answer.strip())]])
    return out


# ---------------------------------------------------------------------------------------------------
# Lexical: SQuAD normalisation, EM, F1

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD v1.1 evaluation normalisation: lowercase, drop punctuation and articles, squash spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(answer: str, gold: str) -> bool:
    return normalize_answer(answer) == normalize_answer(gold)


def token_f1(answer: str, gold: str) -> float:
    pred, ref = normalize_answer(answer).split(), normalize_answer(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    overlap = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred), overlap / len(ref)
    return 2 * precision * recall / (precision + recall)


def gold_recall(answer: str, gold: str) -> float:
    """Share of the normalised gold tokens (with multiplicity) that the answer contains."""
    pred, ref = normalize_answer(answer).split(), normalize_answer(gold).split()
    if not ref:
        return 0.0
    return sum((collections.Counter(pred) & collections.Counter(ref)).values()) / len(ref)


def gold_in_answer(answer: str, gold: str) -> bool:
    """Normalised gold occurs in the normalised answer as whole words ("1" does not match "1990")."""
    g = normalize_answer(gold)
    return bool(g) and f" {g} " in f" {normalize_answer(answer)} "


@dataclasses.dataclass(frozen=True)
class LexicalGrader:
    f1_threshold: float = 0.5  # > 1 disables the F1 rule
    use_containment: bool = True
    recall_threshold: float | None = None  # None: no gold-recall rule (the brief's EM/contains/F1)
    name: str = "em_f1"

    def grade(self, items: Sequence[GradeItem]) -> list[Verdict]:
        return _grade_nonempty_unique(items, lambda unique: [self._one(i) for i in unique])

    def _one(self, item: GradeItem) -> Verdict:
        em = exact_match(item.answer, item.gold)
        contained = self.use_containment and gold_in_answer(item.answer, item.gold)
        f1 = token_f1(item.answer, item.gold)
        raw = f"em={int(em)} contains={int(contained)} f1={f1:.3f}"
        correct = em or contained or f1 >= self.f1_threshold
        if self.recall_threshold is not None:
            recall = gold_recall(item.answer, item.gold)
            correct = correct or recall >= self.recall_threshold
            raw += f" recall={recall:.3f}"
        return Verdict(correct=correct, raw=raw, score=f1)


# ---------------------------------------------------------------------------------------------------
# Judge prompt (shared by the local judge and the HTTP grader) and the reference's reply rule

JUDGE_SYSTEM = (
    "You are a grading assistant. Decide whether a student's answer to a question is correct. Judge it "
    "only against the gold answer given to you; do not use any outside knowledge. The student answer "
    "may add extra information, but it has to convey the whole gold answer and must not contradict it. "
    "Ignore style, wording and phrasing. Reply with one word only: yes or no."
)
JUDGE_QUESTION = "Is the student answer correct according to the gold answer? Reply yes or no."

_YES = re.compile(r"\byes\b", re.IGNORECASE)
_NO = re.compile(r"\bno\b", re.IGNORECASE)


def parse_yes_no(reply: str) -> bool:
    """Reference rule: correct iff the reply has the word "yes" and not the word "no"."""
    return bool(_YES.search(reply)) and not _NO.search(reply)


# The reference's grading prompts, verbatim (knowledge-incorporation/src/utils.py at 4cb1e7d).
# SQUAD_GRADE_TEMPLATE is what it sent to GPT-4.1 as the whole input (one user message, default
# temperature); question = "Topic: {title}\n{question}", gold as stored, pred = the stripped answer.
REFERENCE_GRADE_TEMPLATE = (
    "You are a grading assistant. Your job is to determine whether a student's answer correctly answers the question based solely on the provided gold answer. "
    "Do not use any outside knowledge. The student answer can include additional information, but it must at least fully convey the gold answer and must not contradict it. "
    "Ignore style, phrasing, or extra details that do not affect correctness. Respond ONLY with 'yes' or 'no'.\n\n"
    "Question: {question}\nGold answer: {gold}\nStudent answer: {pred}\n"
    "Is the student answer correct based solely on the gold answer? Respond 'yes' or 'no'."
)
# Its (unused) Qwen-instruct judge, SQUAD_GRADE_TEMPLATE_QWEN_INSTRUCT, as a system and a user message.
REFERENCE_JUDGE_SYSTEM = (
    "You are a grading assistant. Your job is to determine whether a student's answer "
    "correctly answers the question based solely on the provided gold answer. Do not use any outside knowledge. "
    "The student answer can include additional information, but it must at least fully convey the gold answer and must not contradict it. "
    "Ignore style, phrasing, or extra details that do not affect correctness. Respond ONLY with 'yes' or 'no'."
)
REFERENCE_JUDGE_USER = (
    "{question}\n"
    "Gold answer: {gold}\nStudent answer: {pred}\n"
    "Is the student answer correct based solely on the gold answer? Respond 'yes' or 'no'."
)
GRADER_PROMPTS = ("reference", "ours")


def reference_grade_prompt(item: GradeItem, escape: Callable[[str], str] = lambda s: s) -> str:
    return REFERENCE_GRADE_TEMPLATE.format(question=escape(item.question_with_topic),
                                           gold=escape(item.gold), pred=escape(item.answer.strip()))


def grader_messages(item: GradeItem, prompt: str = "reference",
                    escape: Callable[[str], str] = lambda s: s) -> list[dict]:
    """The chat messages of one grading request.

    "reference": the reference's single user message (its OpenAI grader). "ours": our reworded
    rubric as a system message and the item as the user message (kept for the calibration runs made
    with it).
    """
    if prompt == "reference":
        return [{"role": "user", "content": reference_grade_prompt(item, escape)}]
    if prompt == "ours":
        return judge_messages(item, escape)
    raise ValueError(f"unknown grader prompt {prompt!r}; choose from {GRADER_PROMPTS}")


def judge_user_message(item: GradeItem, escape: Callable[[str], str] = lambda s: s) -> str:
    return (f"Question: {escape(item.question_with_topic)}\n"
            f"Gold answer: {escape(item.gold.strip())}\n"
            f"Student answer: {escape(item.answer.strip())}\n\n"
            f"{JUDGE_QUESTION}")


def judge_messages(item: GradeItem, escape: Callable[[str], str] = lambda s: s) -> list[dict]:
    return [{"role": "system", "content": JUDGE_SYSTEM},
            {"role": "user", "content": judge_user_message(item, escape)}]


def judge_plain_prompt(item: GradeItem, escape: Callable[[str], str] = lambda s: s) -> str:
    """For base (non-chat) judges: the same text as one continuation prompt ending at the verdict."""
    return f"{JUDGE_SYSTEM}\n\n{judge_user_message(item, escape)}\nReply:"


# ---------------------------------------------------------------------------------------------------
# Local LLM judge

YES_VARIANTS = ("yes", " yes", "Yes", " Yes", "YES", " YES")
NO_VARIANTS = ("no", " no", "No", " No", "NO", " NO")


def verdict_token_ids(tokenizer) -> tuple[list[int], list[int]]:
    """Token ids that start a "yes" and a "no" reply.

    Single-token spellings are preferred; when a tokenizer has none (e.g. byte-level toy vocabularies)
    the first token of each spelling is used. Ids that start both a yes and a no spelling (a bare
    space) carry no verdict and are dropped.
    """
    def ids_for(variants):
        encoded = [tokenizer.encode(v, add_special=False) for v in variants]
        single = {e[0] for e in encoded if len(e) == 1}
        return single or {e[0] for e in encoded if e}

    yes, no = ids_for(YES_VARIANTS), ids_for(NO_VARIANTS)
    shared = yes & no
    yes, no = sorted(yes - shared), sorted(no - shared)
    if not yes or not no:
        raise ValueError("tokenizer has no token that distinguishes a 'yes' reply from a 'no' reply")
    return yes, no


def _yes_no_margin(params, tokens_BxT, segment_ids_BxT, last_B, yes_ids_Y, no_ids_N, *, cfg):
    import jax
    import jax.numpy as jnp

    from seal_jax.model.transformer import forward

    logits_BxTxV = forward(params, tokens_BxT, cfg=cfg, segment_ids_BxT=segment_ids_BxT)
    last_BxV = jnp.take_along_axis(logits_BxTxV, last_B[:, None, None], axis=1)[:, 0]
    yes_B = jax.nn.logsumexp(last_BxV[:, yes_ids_Y], axis=-1)
    no_B = jax.nn.logsumexp(last_BxV[:, no_ids_N], axis=-1)
    return yes_B - no_B


@functools.lru_cache(maxsize=None)
def _jitted_margin():
    import jax

    return jax.jit(_yes_no_margin, static_argnames=("cfg",))


class LocalJudgeGrader:
    """A local causal LM as a yes/no judge, one forward pass per batch of items.

    `threshold` shifts the decision (correct iff margin > threshold); 0 is the plain argmax between
    the two replies. Prompts are right-padded to a multiple of `length_bucket` and batches to
    `batch_size` rows, so a calibration run compiles a few shapes only.
    """

    name = "llm_judge"

    def __init__(self, cfg, params, tokenizer, *, batch_size: int = 8, use_chat_template: bool = True,
                 threshold: float = 0.0, length_bucket: int = 64, max_prompt_tokens: int | None = None,
                 prompt: str = "ours"):
        if prompt not in GRADER_PROMPTS:
            raise ValueError(f"unknown grader prompt {prompt!r}; choose from {GRADER_PROMPTS}")
        self.cfg, self.params, self.tokenizer, self.prompt_style = cfg, params, tokenizer, prompt
        self.batch_size, self.use_chat_template = batch_size, use_chat_template
        self.threshold, self.length_bucket = threshold, length_bucket
        self.max_prompt_tokens = min(max_prompt_tokens or cfg.max_position_embeddings,
                                     cfg.max_position_embeddings)
        yes, no = verdict_token_ids(tokenizer)
        if max(yes + no) >= cfg.vocab_size:
            raise ValueError(f"judge tokenizer's yes/no ids {yes + no} exceed vocab_size={cfg.vocab_size}")
        self.yes_ids, self.no_ids = np.asarray(yes, np.int32), np.asarray(no, np.int32)
        self.pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0

    def prompt(self, item: GradeItem) -> str:
        """"reference": the reference's Qwen-instruct judge messages (for a base judge, its OpenAI
        prompt followed by "\nReply:"; the reference has no base-model judge)."""
        escape = self.tokenizer.escape
        if self.prompt_style == "reference":
            if not self.use_chat_template:
                return f"{reference_grade_prompt(item, escape)}\nReply:"
            user = REFERENCE_JUDGE_USER.format(question=escape(item.question_with_topic),
                                               gold=escape(item.gold), pred=escape(item.answer.strip()))
            messages = [{"role": "system", "content": REFERENCE_JUDGE_SYSTEM},
                        {"role": "user", "content": user}]
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        if self.use_chat_template:
            return self.tokenizer.apply_chat_template(judge_messages(item, escape),
                                                      add_generation_prompt=True)
        return judge_plain_prompt(item, escape)

    def prompt_ids(self, item: GradeItem) -> list[int]:
        # The template's own special tokens are parsed; the item text was escaped in `prompt`.
        return self.tokenizer.encode(self.prompt(item), add_special=True)

    def margins(self, items: Sequence[GradeItem]) -> list[float | None]:
        """Yes-minus-no logit margin per item (None when the prompt does not fit the model)."""
        encoded = [self.prompt_ids(i) for i in items]
        out: list[float | None] = [None] * len(items)
        fits = [j for j, ids in enumerate(encoded) if 0 < len(ids) <= self.max_prompt_tokens]
        fits.sort(key=lambda j: len(encoded[j]))  # similar lengths share a padded shape
        fn = _jitted_margin()
        for start in range(0, len(fits), self.batch_size):
            chunk = fits[start:start + self.batch_size]
            longest = max(len(encoded[j]) for j in chunk)
            t = min(-(-longest // self.length_bucket) * self.length_bucket, self.max_prompt_tokens)
            tokens = np.full((self.batch_size, t), self.pad_id, np.int32)
            segments = np.zeros((self.batch_size, t), np.int32)
            last = np.zeros(self.batch_size, np.int32)
            segments[:, 0] = 1  # filler rows: one real token, so no row attends to nothing
            for row, j in enumerate(chunk):
                ids = encoded[j]
                tokens[row, :len(ids)] = ids
                segments[row, :len(ids)] = 1
                last[row] = len(ids) - 1
            margin_B = np.asarray(fn(self.params, tokens, segments, last, self.yes_ids, self.no_ids,
                                     cfg=self.cfg))
            for row, j in enumerate(chunk):
                out[j] = float(margin_B[row])
        return out

    def grade(self, items: Sequence[GradeItem]) -> list[Verdict]:
        return _grade_nonempty_unique(items, self._grade_unique)

    def _grade_unique(self, items: list[GradeItem]) -> list[Verdict]:
        verdicts = []
        for margin in self.margins(items):
            if margin is None:
                verdicts.append(Verdict(None, "", f"prompt does not fit the judge "
                                                  f"(max {self.max_prompt_tokens} tokens)"))
            elif not np.isfinite(margin):
                verdicts.append(Verdict(None, "", f"non-finite judge margin {margin}"))
            else:
                yes = margin > self.threshold
                verdicts.append(Verdict(yes, "yes" if yes else "no", score=margin))
        return verdicts


# ---------------------------------------------------------------------------------------------------
# OpenAI-compatible HTTP grader


class HttpGradingError(RuntimeError):
    def __init__(self, message: str, retryable: bool):
        super().__init__(message)
        self.retryable = retryable


HTTP_APIS = ("chat", "responses")


class HttpGrader:
    """One POST per item to an OpenAI-compatible endpoint, `max_concurrency` in flight, `parse_yes_no`.

    `api="chat"`: `{base_url}/chat/completions` with `messages`; `api="responses"`: `{base_url}/responses`
    with `input` (the reference's primary call, `client.responses.create(model, input=prompt)`; it fell
    back to chat completions after 3 failures). `prompt="reference"` sends the reference's grading
    prompt as one user message; "ours" our rubric as system + user. `temperature` and `max_tokens`
    are sent only when not None: the reference set neither (the server's default temperature, so its
    verdicts were stochastic).

    `retries` extra attempts follow a failed one (connection errors, timeouts, HTTP 429 and 5xx, a
    malformed body), sleeping `backoff_s * attempt` in between; other 4xx fail at once. An item that
    still fails is ungraded (correct=None, error=...), never counted wrong (the reference: False).
    """

    name = "http"

    def __init__(self, base_url: str, model: str, *, api_key_env: str | None = "OPENAI_API_KEY",
                 retries: int = 3, backoff_s: float = 1.5, timeout_s: float = 60.0,
                 max_concurrency: int = 8, temperature: float | None = 0.0, max_tokens: int | None = 8,
                 prompt: str = "ours", api: str = "chat"):
        if not base_url:
            raise ValueError("HttpGrader: base_url is empty")
        if retries < 0:
            raise ValueError(f"HttpGrader: retries must be >= 0, got {retries}")
        if prompt not in GRADER_PROMPTS:
            raise ValueError(f"HttpGrader: unknown prompt {prompt!r}; choose from {GRADER_PROMPTS}")
        if api not in HTTP_APIS:
            raise ValueError(f"HttpGrader: unknown api {api!r}; choose from {HTTP_APIS}")
        self.prompt, self.api = prompt, api
        self.url = base_url.rstrip("/") + ("/chat/completions" if api == "chat" else "/responses")
        self.model, self.retries, self.backoff_s, self.timeout_s = model, retries, backoff_s, timeout_s
        self.max_concurrency, self.temperature, self.max_tokens = max_concurrency, temperature, max_tokens
        self._api_key = None
        if api_key_env:
            self._api_key = os.environ.get(api_key_env)
            if not self._api_key:
                raise ValueError(f"HttpGrader: environment variable {api_key_env} (the API key) is not "
                                 "set; set it, or pass api_key_env=None for a server without keys")

    def grade(self, items: Sequence[GradeItem]) -> list[Verdict]:
        return _grade_nonempty_unique(items, self._grade_unique)

    def _grade_unique(self, items: list[GradeItem]) -> list[Verdict]:
        workers = max(1, min(self.max_concurrency, len(items)))
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            return list(pool.map(self._grade_one, items))

    def _grade_one(self, item: GradeItem) -> Verdict:
        errors = []
        for attempt in range(1, self.retries + 2):
            try:
                reply = self._request(item)
                return Verdict(parse_yes_no(reply), reply)
            except HttpGradingError as e:
                errors.append(str(e))
                if not e.retryable or attempt > self.retries:
                    break
                time.sleep(self.backoff_s * attempt)
        return Verdict(None, "", f"grading failed after {len(errors)} attempt(s): {errors[-1]}")

    def request_body(self, item: GradeItem) -> dict[str, Any]:
        messages = grader_messages(item, self.prompt)
        body: dict[str, Any] = {"model": self.model}
        if self.api == "chat":
            body["messages"] = messages
        else:  # Responses API: a lone user message goes as the plain input string, as the reference
            single = len(messages) == 1 and messages[0]["role"] == "user"
            body["input"] = messages[0]["content"] if single else messages
        if self.max_tokens is not None and self.api == "chat":
            body["max_tokens"] = self.max_tokens
        elif self.max_tokens is not None:  # the Responses API rejects max_output_tokens below 16
            body["max_output_tokens"] = max(16, self.max_tokens)
        if self.temperature is not None:
            body["temperature"] = self.temperature
        return body

    def _request(self, item: GradeItem) -> str:
        body = self.request_body(item)
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        request = urllib.request.Request(self.url, data=json.dumps(body).encode("utf-8"),
                                         headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                payload = response.read()
        except urllib.error.HTTPError as e:
            retryable = e.code == 429 or e.code >= 500
            raise HttpGradingError(f"HTTP {e.code} from {self.url}", retryable) from None
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
            raise HttpGradingError(f"cannot reach {self.url}: {e}", retryable=True) from None
        try:
            content = _reply_text(json.loads(payload), self.api)
        except (ValueError, KeyError, IndexError, TypeError):
            raise HttpGradingError(f"malformed response from {self.url}: {payload[:200]!r}",
                                   retryable=True) from None
        if not isinstance(content, str):
            raise HttpGradingError(f"response content is not text: {content!r}", retryable=True)
        return content


def _reply_text(response: dict, api: str) -> str:
    if api == "chat":
        return response["choices"][0]["message"]["content"]
    if isinstance(response.get("output_text"), str):
        return response["output_text"]
    # What the OpenAI SDK's `output_text` joins: the output_text parts of the message items.
    parts = [part["text"] for out in response["output"] if out.get("type") == "message"
             for part in out["content"] if part.get("type") == "output_text"]
    if not parts:
        raise KeyError("no output_text in the response")
    return "".join(parts)


# ---------------------------------------------------------------------------------------------------
# From config


def make_grader(section, *, load_model: Callable[[str], tuple] | None = None) -> Grader:
    """A grader from a config section (`configs/knowledge.py` `grader`: kind em_f1 | llm_judge | http).

    `load_model(spec) -> (cfg, params, tokenizer)` loads the judge; it defaults to
    `seal_jax.model.loading.load_model`.
    """
    kind = section.kind
    prompt = section.get("prompt", "ours")
    if prompt not in GRADER_PROMPTS:
        raise ValueError(f"grader.prompt must be one of {GRADER_PROMPTS}, got {prompt!r}")
    if kind == "http" and section.get("http_api", "chat") not in HTTP_APIS:
        raise ValueError(f"grader.http_api must be one of {HTTP_APIS}, got {section.http_api!r}")
    if kind == "em_f1":
        recall = section.get("recall_threshold", None)
        return LexicalGrader(f1_threshold=float(section.f1_threshold),
                             recall_threshold=None if recall is None or recall < 0 else float(recall))
    if kind == "llm_judge":
        if load_model is None:
            from seal_jax.model.loading import load_model
        dtype = section.get("judge_dtype", "")  # e.g. "float32": bf16 matmuls are slow on CPU
        cfg, params, tokenizer = (load_model(section.judge_model, param_dtype=dtype) if dtype
                                  else load_model(section.judge_model))
        if tokenizer is None:
            raise ValueError(f"judge model {section.judge_model!r} has no tokenizer")
        return LocalJudgeGrader(cfg, params, tokenizer,
                                batch_size=int(section.get("judge_batch_size", 8)),
                                threshold=float(section.get("judge_threshold", 0.0)),
                                prompt=prompt)
    if kind == "http":
        temperature = float(section.get("http_temperature", 0.0))
        max_tokens = int(section.get("http_max_tokens", 8))
        return HttpGrader(section.http_base_url, section.http_model,
                          api_key_env=section.http_api_key_env or None,
                          retries=int(section.http_retries),
                          prompt=prompt, api=section.get("http_api", "chat"),
                          temperature=None if temperature < 0 else temperature,
                          max_tokens=None if max_tokens <= 0 else max_tokens)
    raise ValueError(f"unknown grader kind {kind!r}; choose em_f1, llm_judge or http")
