"""The `paper` setting against the reference (SEAL knowledge-incorporation, commit 4cb1e7d), issue 12.

The reference's texts are stored here once, as constants copied verbatim from its source files, and
its sequence-building rules are re-implemented here as an independent oracle written from its
`utils.build_train_sequences` (character by character, no regex split), so these tests do not
compare the product with itself.
"""
import json
import math
import pathlib
import random

import numpy as np
import pytest
from tolerances import assert_close_scaled

from seal_jax import results as R
from seal_jax.config import ConfigError, load_config
from seal_jax.tasks.base import EvalJob, EvalRequest
from seal_jax.tasks.knowledge import graders as G
from seal_jax.tasks.knowledge import data, prompts, setup
from seal_jax.tasks.knowledge.data import Passage, Question
from seal_jax.tasks.knowledge.domain import KnowledgeDomain, KnowledgeSettings
from seal_jax.tasks.knowledge.sequences import build_train_sequences

REPO = pathlib.Path(__file__).resolve().parents[1]


def get_config(variant):
    return load_config(f"{REPO / 'configs' / 'knowledge.py'}:{variant}")


# ---------------------------------------------------------------------------------------------------
# The reference's texts, verbatim.

# knowledge-incorporation/src/data_generation/make_squad_data.py: MAKE_SQUAD_DATA_TEMPLATES_BASE
REF_SELF_EDIT_TEMPLATES = {
    "implications": (
        "Let's read the following passage and produce a list of implications "
        "derived directly or indirectly from the content.\n\n"
        "Passage:\n{title}\n{context}\n\n"
        "Implications:\n"
    ),
    "implications-long": (
        "Let's read the following passage and produce a long list of implications "
        "derived directly or indirectly from the content.\n\n"
        "Passage:\n{title}\n{context}\n\n"
        "Implications:\n"
    ),
    "implications-very-long": (
        "Let's read the following passage and produce a very long list of implications "
        "derived directly or indirectly from the content.\n\n"
        "Passage:\n{title}\n{context}\n\n"
        "Implications:\n"
    ),
    "rewrite": (
        "Let's read the following passage and rewrite it in a few different ways, each one separated by a newline.\n\n"
        "Passage:\n{title}\n{context}\n\n"
        "Rewritten passages:\n"
    ),
    "self-qa": (
        "Let's read the following passage and rewrite it in a question-answer format.\n\n"
        "Passage:\n{title}\n{context}\n\n"
        "Question 1: "
    ),
}
# make_squad_data.py: MAKE_SQUAD_DATA_TEMPLATE_INSTRUCT
REF_SELF_EDIT_TEMPLATE_INSTRUCT = (
    "<|im_start|>system\nYou are an assistant tasked with analyzing the provided passage and producing a list of implications derived directly or indirectly from the content. <|im_end|>\n"
    "<|im_start|>user\n{title}\n{context}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
# knowledge-incorporation/src/utils.py: SQUAD_ANSWER_TEMPLATE_BASE, SQUAD_ANSWER_TEMPLATE_QWEN_INSTRUCT
REF_ANSWER_TEMPLATE_BASE = (
    "Let's answer a question directly and concisely.\n"
    "Question: {question}\n"
    "Answer:\n"
)
REF_ANSWER_TEMPLATE_QWEN_INSTRUCT = (
    "<|im_start|>system\nYou are an assistant to answer a question directly and concisely."
    "<|im_end|>\n"
    "<|im_start|>user\n{question}"
    "<|im_end|>\n"
    "<|im_start|>assistant\n"
)
# utils.py: SQUAD_GRADE_TEMPLATE (sent to GPT-4.1) and SQUAD_GRADE_TEMPLATE_QWEN_INSTRUCT (unused)
REF_GRADE_TEMPLATE = (
    "You are a grading assistant. Your job is to determine whether a student's answer correctly answers the question based solely on the provided gold answer. "
    "Do not use any outside knowledge. The student answer can include additional information, but it must at least fully convey the gold answer and must not contradict it. "
    "Ignore style, phrasing, or extra details that do not affect correctness. Respond ONLY with 'yes' or 'no'.\n\n"
    "Question: {question}\nGold answer: {gold}\nStudent answer: {pred}\n"
    "Is the student answer correct based solely on the gold answer? Respond 'yes' or 'no'."
)
REF_GRADE_TEMPLATE_QWEN_INSTRUCT = (
    "<|im_start|>system\nYou are a grading assistant. Your job is to determine whether a student's answer "
    "correctly answers the question based solely on the provided gold answer. Do not use any outside knowledge. "
    "The student answer can include additional information, but it must at least fully convey the gold answer and must not contradict it. "
    "Ignore style, phrasing, or extra details that do not affect correctness. Respond ONLY with 'yes' or 'no'.<|im_end|>\n"
    "<|im_start|>user\n{question}\n"
    "Gold answer: {gold}\nStudent answer: {pred}\n"
    "Is the student answer correct based solely on the gold answer? Respond 'yes' or 'no'.<|im_end|>\n"
    "<|im_start|>assistant\n"
)


class ChatML:
    """Qwen-style ChatML rendering without a default system turn, escape breaking <|...|>."""

    def escape(self, text):
        return text.replace("<|", "<\u200b|")

    def apply_chat_template(self, messages, add_generation_prompt=True):
        out = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return out + ("<|im_start|>assistant\n" if add_generation_prompt else "")


TITLE, CONTEXT = "Super Bowl 50", "Super Bowl 50 was an American football game {not a field}."


def test_self_edit_prompts_are_the_reference_texts():
    assert prompts.REFERENCE_SELF_EDIT_TEMPLATES == REF_SELF_EDIT_TEMPLATES
    for key, template in REF_SELF_EDIT_TEMPLATES.items():
        assert prompts.self_edit_prompt(TITLE, CONTEXT, key) == template.format(title=TITLE, context=CONTEXT)
    assert prompts.self_edit_prompt(TITLE, CONTEXT) == REF_SELF_EDIT_TEMPLATES["implications"].format(
        title=TITLE, context=CONTEXT)
    # The instruct variant rendered with a ChatML template is the reference's hard-coded string.
    expected = REF_SELF_EDIT_TEMPLATE_INSTRUCT.format(title=TITLE, context=CONTEXT)
    for key in REF_SELF_EDIT_TEMPLATES:
        assert prompts.self_edit_chat_prompt(TITLE, CONTEXT, ChatML(), key) == expected
    assert get_config("paper").self_edit.prompt == "implications"


def test_answer_prompts_are_the_reference_texts():
    question = f"Topic: {TITLE}\nWho won?"
    assert prompts.answer_prompt(TITLE, "Who won?") == REF_ANSWER_TEMPLATE_BASE.format(question=question)
    assert prompts.answer_chat_prompt(TITLE, "Who won?", ChatML()) == \
        REF_ANSWER_TEMPLATE_QWEN_INSTRUCT.format(question=question)


def test_grader_prompts_and_message_layout_are_the_reference():
    item = G.GradeItem(f"Topic: {TITLE}\nWho won?", "Denver Broncos ", "  The Broncos.\n")
    ref = REF_GRADE_TEMPLATE.format(question=item.question_with_topic, gold=item.gold,
                                    pred=item.answer.strip())
    assert G.REFERENCE_GRADE_TEMPLATE == REF_GRADE_TEMPLATE
    assert G.grader_messages(item, "reference") == [{"role": "user", "content": ref}]
    paper = get_config("paper").grader
    grader = G.HttpGrader(paper.http_base_url, paper.http_model, api_key_env=None,
                          prompt=paper.prompt, api=paper.http_api,
                          temperature=None if paper.http_temperature < 0 else paper.http_temperature,
                          max_tokens=None if paper.http_max_tokens <= 0 else paper.http_max_tokens)
    # client.responses.create(model="gpt-4.1", input=prompt): no temperature, no token limit.
    assert grader.request_body(item) == {"model": "gpt-4.1", "input": ref}
    # The unused Qwen-instruct judge, as our local judge renders it with a ChatML template.
    chat = ChatML().apply_chat_template([
        {"role": "system", "content": G.REFERENCE_JUDGE_SYSTEM},
        {"role": "user", "content": G.REFERENCE_JUDGE_USER.format(
            question=item.question_with_topic, gold=item.gold, pred=item.answer.strip())}])
    assert chat == REF_GRADE_TEMPLATE_QWEN_INSTRUCT.format(question=item.question_with_topic,
                                                           gold=item.gold, pred=item.answer.strip())
    assert G.parse_yes_no("Yes.") and not G.parse_yes_no("yes or no") and not G.parse_yes_no("Yess")


# ---------------------------------------------------------------------------------------------------
# Sequence building: an oracle written from the reference's utils.build_train_sequences


def _starts_question_header(text, i):
    """Does `Question\\s+\\d+:` match at text[i:]? (\\s and \\d as Python's re on str: Unicode.)"""
    if not text.startswith("Question", i):
        return False
    j = i + len("Question")
    k = j
    while k < len(text) and text[k].isspace():
        k += 1
    if k == j:
        return False
    d = k
    while d < len(text) and text[d].isdecimal():
        d += 1
    return d > k and d < len(text) and text[d] == ":"


def _has_answer_header(text):
    """`Answer\\s*:` anywhere."""
    i = text.find("Answer")
    while i >= 0:
        k = i + len("Answer")
        while k < len(text) and text[k].isspace():
            k += 1
        if k < len(text) and text[k] == ":":
            return True
        i = text.find("Answer", i + 1)
    return False


def oracle_sequences(completion_raw, context, title, split_newlines):
    segs = []
    for piece in completion_raw.split("---"):
        if piece.strip():
            segs.append(piece.strip())
    if not segs:
        segs = [completion_raw.strip()]
    if split_newlines:
        qa = (any(_starts_question_header(completion_raw, i) for i in range(len(completion_raw)))
              and _has_answer_header(completion_raw))
        if qa:
            text = completion_raw.strip()
            parts, start = [], 0
            for i, ch in enumerate(text):
                if ch == "\n" and _starts_question_header(text, i + 1):
                    parts.append(text[start:i])
                    start = i + 1
            parts.append(text[start:])
            if not parts[0].lstrip().startswith("Question"):
                parts[0] = "Question 1: " + parts[0].strip()
            segs = parts
        else:
            lines = []
            for seg in segs:
                for line in seg.splitlines():
                    if line.strip():
                        lines.append(line.strip())
            if len(lines) > 1 and lines[1].startswith("1."):
                lines = lines[1:]
            segs = lines
    return [title + "\n" + s for s in segs] + [title + "\n" + context.strip()]


def _shared_self_edits(shared_dir):
    """(title, context, completion) for every recorded self-edit in ../shared/data/squad/."""
    out = []
    for record in json.load((shared_dir / "data/squad/self_edits_qwen7b_train_iter0.json").open()):
        out += [(record["title"], record["context"], c) for c in record["completions"]]
    head = REF_SELF_EDIT_TEMPLATES["implications"].split("{title}")[0]
    tail = "\n\nImplications:\n"
    for line in (shared_dir / "data/squad/rest_em_sft_qwen7b_iter0.jsonl").open():
        row = json.loads(line)
        assert row["prompt"].startswith(head) and row["prompt"].endswith(tail)
        title, context = row["prompt"][len(head):-len(tail)].split("\n", 1)
        out.append((title, context, row["completion"]))
    return out


def test_sequences_match_the_reference_on_all_recorded_self_edits(shared_dir):
    edits = _shared_self_edits(shared_dir)
    assert len(edits) == 1050
    for title, context, completion in edits:
        for split in (True, False):
            assert build_train_sequences(completion, title, context, split_newlines=split) == \
                oracle_sequences(completion, context, title, split), (title, completion[:80])


_PIECES = ["Question 1:", "Question 2: ", "Question\n3:", "Question:", "Question 12 :", "Question \u0663:",
           "Answer:", "Answer :", "Answer", "1.", "1. A fact.", "2. Another.", "10.", "---", "--", "\n",
           "\n\n", "\r\n", "\r", "\u2028", "\x0c", "\x1c", " ", "\t", "Here are the implications:",
           "Sure!", "text", "Who?", "{title}", "\u00a0"]


def test_sequences_match_the_reference_on_generated_edge_cases():
    rng = random.Random(0)
    for _ in range(3000):
        completion = "".join(rng.choice(_PIECES) for _ in range(rng.randint(0, 14)))
        title = rng.choice(["T", " T ", "Title\u2028x"])
        context = rng.choice(["ctx", "  ctx\n", "a\nb"])
        for split in (True, False):
            assert build_train_sequences(completion, title, context, split_newlines=split) == \
                oracle_sequences(completion, context, title, split), repr(completion)


# ---------------------------------------------------------------------------------------------------
# Evaluation and training passages


def _squad_file(path, prefix, n, rng):
    records = [{"title": f"{prefix} title {i % 7}", "context": f"{prefix} passage {i}: {rng.random()}",
                "questions": [{"question": f"q{i}?", "answer": f"a{i}"}]} for i in range(n)]
    path.write_text(json.dumps(records))
    return records


def test_paper_variant_selects_the_reference_evaluation_passages(tmp_path):
    rng = random.Random(1)
    val = _squad_file(tmp_path / "squad_val.json", "val", 260, rng)
    train = _squad_file(tmp_path / "squad_train.json", "train", 130, rng)
    c = get_config("paper")
    c.data.path, c.data.train_path = str(tmp_path / "squad_val.json"), str(tmp_path / "squad_train.json")
    training, evaluation = setup.split_from_config(c, setup.load_all_passages(c))

    # make_squad_data: random.seed(42); random.shuffle(raw); the eval set is raw[0:200].
    expected_val, expected_train = list(val), list(train)
    state = random.getstate()
    try:
        random.seed(42)
        random.shuffle(expected_val)
        random.seed(42)
        random.shuffle(expected_train)
    finally:
        random.setstate(state)
    assert [(p.title, p.context) for p in evaluation] == \
        [(r["title"], r["context"]) for r in expected_val[:200]]
    assert [(p.title, p.context) for p in training] == \
        [(r["title"], r["context"]) for r in expected_train[:100]]

    c.data.train_path = str(tmp_path / "missing_train.json")
    with pytest.raises(ConfigError, match="data.train_path: file not found.*squad_train.json"):
        setup.split_from_config(c, setup.load_all_passages(c))
    c.data.train_path = ""
    with pytest.raises(ConfigError, match="data.train_source=json needs data.train_path"):
        setup.split_from_config(c, setup.load_all_passages(c))
    c.data.train_source, c.data.n_train = "split", 50  # the old behaviour, by name
    training, evaluation = setup.split_from_config(c, setup.load_all_passages(c))
    assert [p.title for p in evaluation] == [r["title"] for r in expected_val[:200]]
    assert [(p.title, p.context) for p in training] == \
        [(r["title"], r["context"]) for r in expected_val[200:250]]


def test_paper_embedded_variant_trains_on_the_reference_rounds_and_evaluates_its_passages(shared_dir):
    """Round 1 = the first 50 passages of iter0_train.json in file order (the reference's round 1: its
    SFT file's 50 prompts are those passages in that order); evaluation = the first 200 of the seed-42
    shuffle of the dev file; the embedded model's prompt plus the generation cap fit its positions."""
    from seal_jax.rest_em import round_contexts

    squad = shared_dir / "data" / "squad"
    c = get_config("paper_embedded")
    c.data.path, c.data.train_path = str(squad / "squad_dev_public.json"), str(
        squad / "self_edits_qwen7b_train_iter0.json")
    training, evaluation = setup.split_from_config(c, setup.load_all_passages(c))
    train_file = json.loads((squad / "self_edits_qwen7b_train_iter0.json").read_text())
    assert [(p.title, p.context) for p in training] == [(r["title"], r["context"]) for r in train_file]
    sft_prompts = [json.loads(line)["prompt"] for line in
                   (squad / "rest_em_sft_qwen7b_iter0.jsonl").read_text().splitlines()]
    round1 = round_contexts(training, 0, int(c.rest_em.passages_per_round))
    assert len(round1) == 50 and all(p.context in prompt for p, prompt in zip(round1, sft_prompts))
    assert sum(len(p.questions) for p in round1) == 225  # reference-knowledge §1.6
    round2 = round_contexts(training, 1, int(c.rest_em.passages_per_round))
    assert not {p.id for p in round1} & {p.id for p in round2}
    dev = data.load_squad_json(squad / "squad_dev_public.json")
    assert evaluation == data.shuffled(dev, 42, shuffle="reference")[:200]
    setup.validate(c)
    assert (c.model, c.chat, c.grader.kind, c.self_edit.max_new_tokens) == ("embedded", True, "em_f1", 1024)
    # The 135M recipe (the reference's q,v at lr 1e-3 leaves a 135M model where it was; docstring).
    assert (len(c.lora.targets), c.inner.learning_rate) == (7, 3e-3)
    assert 842 + c.self_edit.max_new_tokens <= 8192  # the longest dev prompt (chat template) + the cap


def test_paper_variant_length_caps_and_table_fallback():
    c = get_config("paper")
    assert c.self_edit.max_new_tokens == 8192 and c.self_edit.max_sequence_tokens == 2048
    assert (c.self_edit.k, c.rest_em.reps, c.rest_em.passages_per_round, c.rest_em.rounds) == (5, 3, 50, 2)
    assert c.table.self_edit_samples == 5 and c.table.fallback_rule == "nonempty"
    assert (c.param_dtype, c.compute_dtype) == ("bfloat16", "bfloat16")  # the reference's bf16 base
    setup.validate(c)


def test_table_scores_the_first_non_empty_sample(monkeypatch, tmp_path):
    """The reference's eval driver: `[c for c in completions if c.strip()][:1]`."""
    import types

    from seal_jax.estep import EditOutcome
    from seal_jax.tasks.knowledge import experiments as E

    passages = [Passage(f"T{i}", f"C{i}", (Question("q?", "a"),), f"p{i}") for i in range(3)]
    samples = {"p0": ["A fact.", "Later."], "p1": ["", "  \n", "Third.", "Fourth."], "p2": ["", ""]}
    scored = []

    def fake_score(engine, domain, items, **kwargs):
        scored.extend(items)
        return [EditOutcome(p.id, i, e, 0.5, [0.5], None if e else "empty") for p, i, e in items]

    monkeypatch.setattr(E, "score_self_edits", fake_score)
    monkeypatch.setattr(E, "sample_self_edits",
                        lambda exp, ps, k, tag, seed, until=None: [samples[p.id][:k] for p in ps])
    c = get_config("paper")
    exp = types.SimpleNamespace(config=c, eval_contexts=passages, engine=None, domain=None,
                                file_self_edits=samples, done_records=dict, run_dir=tmp_path,
                                records=types.SimpleNamespace(append=None), progress=False)
    for condition in ("self_edits", "file"):
        scored.clear()
        row = E.table_condition(exp, condition, "base", seed=0)
        assert [(p.id, i, e) for p, i, e in scored] == [("p0", 0, "A fact."), ("p1", 2, "Third."),
                                                       ("p2", 0, "")]
        assert row["failed_candidates"] == 1  # no non-empty sample: a recorded failure
    c.table.self_edit_samples = 1  # no fallback: the first sample, empty or not
    scored.clear()
    E.table_condition(exp, "self_edits", "base", seed=0)
    assert [(p.id, i, e) for p, i, e in scored] == [("p0", 0, "A fact."), ("p1", 0, ""), ("p2", 0, "")]


# ---------------------------------------------------------------------------------------------------
# The domain: BOS on training sequences, ungraded passages


class BosTokenizer:
    """Bytes + 256 as ids; add_special prepends BOS id 1, as e.g. a Llama-3 tokenizer does."""

    BOS = 1

    def encode(self, text, add_special=False):
        return ([self.BOS] if add_special else []) + [256 + b for b in text.encode("utf-8")]

    def decode(self, ids, skip_special=True):
        return bytes(i - 256 for i in ids if i >= 256).decode("utf-8", errors="replace")

    def escape(self, text):
        return text


PASSAGE = Passage("T", "The sky is blue.", (Question("What colour?", "blue"), Question("Sky?", "blue")), "p0")


def test_training_sequences_get_the_bos_prompts_get():
    tok = BosTokenizer()
    domain = KnowledgeDomain(tok, None, KnowledgeSettings(chat=False))
    assert domain.self_edit_prompt(PASSAGE)[0] == tok.BOS
    assert domain.eval_requests(PASSAGE)[0].prompt_ids[0] == tok.BOS
    spec = domain.build_candidate(PASSAGE, "1. It is blue.\n2. Skies vary.")
    texts = build_train_sequences("1. It is blue.\n2. Skies vary.", PASSAGE.title, PASSAGE.context)
    assert [list(s) for s in spec.sequences] == [tok.encode(t, add_special=True) for t in texts]
    # Truncation counts the BOS, as the reference tokenizer's max_length does.
    short = KnowledgeDomain(tok, None, KnowledgeSettings(chat=False, max_sequence_tokens=5))
    assert all(len(s) == 5 and s[0] == tok.BOS for s in short.build_candidate(PASSAGE, "A fact.").sequences)


class ScriptedGrader:
    name = "scripted"

    def __init__(self, verdicts):
        self.verdicts = verdicts

    def grade(self, items):
        assert len(items) == len(self.verdicts)
        return self.verdicts


def test_all_ungraded_passage_has_no_reward_and_partial_is_over_graded():
    tok = BosTokenizer()
    requests = KnowledgeDomain(tok, None, KnowledgeSettings(chat=False)).eval_requests(PASSAGE)
    jobs = [EvalJob(PASSAGE, requests, ["blue", "Blue."]), EvalJob(PASSAGE, requests, ["blue", "red"])]
    failed = G.Verdict(None, "", "HTTP 503")
    domain = KnowledgeDomain(tok, ScriptedGrader([failed, failed, G.Verdict(True), failed]),
                             KnowledgeSettings(chat=False))
    ungraded, partial = domain.score(jobs)
    assert ungraded.reward is None and ungraded.details["n_ungraded"] == 2
    assert ungraded.details["n_graded"] == 0 and ungraded.details["n_questions"] == 2
    assert partial.reward == 1.0 and partial.details["n_graded"] == 1 and partial.details["n_ungraded"] == 1


# ---------------------------------------------------------------------------------------------------
# Intervals


def test_mean_ci95_is_a_student_t_interval():
    from scipy import stats

    for values in ([0.2, 0.4], [0.5, 0.25, 0.75, 0.0, 1.0, 0.6], list(np.linspace(0, 1, 200))):
        mean, half = R.mean_ci95(values + [None, float("nan")])  # ungraded passages are left out
        low, high = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
        assert_close_scaled([mean, mean - half, mean + half], [np.mean(values), low, high],
                            eps_multiple=64, what=f"n={len(values)}")
    # At n=6 the t interval is ~1.3x the normal one the table used to print.
    _, half6 = R.mean_ci95([0.5, 0.25, 0.75, 0.0, 1.0, 0.6])
    normal6 = 1.96 * np.std([0.5, 0.25, 0.75, 0.0, 1.0, 0.6], ddof=1) / math.sqrt(6)
    assert 1.3 < half6 / normal6 < 1.32
    assert math.isnan(R.mean_ci95([0.3])[1]) and math.isnan(R.mean_ci95([])[0])
