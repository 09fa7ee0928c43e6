"""Config validation reports every bad value at once by key; data files fail naming file and item."""
import math

import pytest

from seal_jax import validation as V
from seal_jax.config import ConfigError, load_config
from seal_jax.errors import DataError
from seal_jax.tasks.knowledge.config_rules import validate_knowledge_config

from tiny_world import REPO

KNOWLEDGE = str(REPO / "configs" / "knowledge.py")


def _problems(variant="demo", env=None, **overrides):
    from seal_jax.tasks.knowledge.config_rules import _combinations, knowledge_rules

    # A plain dict, so values of the wrong type can be set (ConfigDict itself refuses most of them;
    # validation must not rely on that, as configs also come from JSON and code).
    cfg = load_config(f"{KNOWLEDGE}:{variant}").to_dict()
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = cfg
        for name in parents:
            node = node[name]
        node[leaf] = value
    return dict(V.config_problems(cfg, knowledge_rules(), [_combinations], env=env or {}))


@pytest.mark.parametrize("variant", ["demo", "cpt", "continual", "single_passage"])
def test_shipped_variants_are_valid_and_every_key_has_a_rule(variant):
    assert _problems(variant) == {}  # also: no key lacks a rule


def test_study_variant_needs_its_files(tmp_path):
    assert "must name one or more" in _problems("study")["study.files"]
    f = tmp_path / "edits.json"
    f.write_text("[]")
    assert _problems("study", **{"study.files": f"qwen={f}"}) == {}
    assert "no such file: /nonexistent.json" in _problems("study", **{"study.files": f"{f},b=/nonexistent.json"})[
        "study.files"]


def test_paper_variant_names_what_the_user_must_supply(tmp_path):
    problems = _problems("paper")
    assert set(problems) == {"data.path", "data.train_path", "grader.http_api_key_env", "tokenizer"}
    assert "$OPENAI_API_KEY, which is not set" in problems["grader.http_api_key_env"]
    assert "--config.grader.http_api_key_env=NAME" in problems["grader.http_api_key_env"]
    data = tmp_path / "squad.json"
    data.write_text("{}")
    tok = tmp_path / "tok"
    tok.mkdir()
    assert _problems("paper", env={"OPENAI_API_KEY": "sk-x"}, **{"data.path": str(data), "data.train_path": str(data),
                                                                 "tokenizer": str(tok)}) == {}


def test_paper_embedded_variants_need_only_their_data_files(tmp_path):
    """No API key, tokenizer or model path: the embedded model and the offline grader."""
    assert set(_problems("paper_embedded")) == {"data.path", "data.train_path"}
    assert set(_problems("paper_embedded_cpt")) == {"data.path"}
    data = tmp_path / "squad.json"
    data.write_text("[]")
    assert _problems("paper_embedded", **{"data.path": str(data), "data.train_path": str(data)}) == {}
    assert _problems("paper_embedded_cpt", **{"data.path": str(data)}) == {}


@pytest.mark.parametrize("key, value, expect", [
    ("inner.learning_rate", -1.0, "must be > 0"),
    ("inner.learning_rate", math.nan, "must be finite"),
    ("inner.learning_rate", math.inf, "must be finite"),
    ("inner.epochs", -1, "must be >= 0"),
    ("self_edit.top_p", 0.0, "must be > 0"),
    ("self_edit.top_p", 1.5, "must be <= 1"),
    ("self_edit.temperature", -0.1, "must be >= 0"),
    ("candidates_per_call", -1, "must be >= 0"),
    ("lora.rank", 0, "must be > 0"),
    ("lora.targets", ("q", "x"), "unknown ['x']"),
    ("lora.dropout", 1.0, "must be < 1"),
    ("rest_em.sft.targets", (), "must not be empty"),
    ("grader.kind", "oracle", "must be one of 'em_f1', 'llm_judge', 'http'"),
    ("grader.f1_threshold", 2.0, "must be <= 1"),
    ("grader.http_base_url", "ftp://x", "http:// or https://"),
    ("self_edit.prompt", "poem", "must be one of"),
    ("self_edit.k", "2", "must be an integer, got str"),
    ("self_edit.k", True, "must be an integer, got bool"),
    ("progress", 1, "must be true or false"),
    ("data.path", "/nonexistent/squad.json", "no such file or folder"),
    ("model", "/nonexistent/model", "no such model file or folder"),
    ("model", "preset:gpt-5", "unknown preset 'gpt-5'"),
    ("param_dtype", "float8", "must be one of"),
    ("inner.length_buckets", (64, 32), "strictly increasing"),
    ("inner.schedule", "step", "must be one of"),
    ("mesh.axes", {"candidate": -1, "fsdp": -1}, "at most one axis may be -1"),
    ("mesh.axes", {"candidate": 0}, "sizes must be integers >= 1 or -1"),
    ("table.conditions", ("base", "oracle"), "unknown ['oracle']"),
    ("resume", "/nonexistent/run", "no such file or folder"),
    ("data.train_order", "sorted", "must be one of"),
    ("self_edit.batch_size", 0, "must be >= 1"),
])
def test_each_bad_value_is_named_with_its_key_and_value(key, value, expect):
    problems = _problems(**{key: value})
    assert key in problems, problems
    assert expect in problems[key] and repr(value) in problems[key], problems[key]


def test_combinations():
    assert "needs self_edit.from_file" in _problems(**{"table.conditions": ("base", "file")})["table.conditions"]
    assert "must be set when data.source='json'" in _problems(**{"data.source": "json"})["data.path"]
    assert "must divide" in _problems(**{"rest_em.sft.batch_size": 3, "rest_em.sft.microbatches": 2})[
        "rest_em.sft.microbatches"]
    assert "random weights" in _problems(model="preset:tiny-llama")["tokenizer"]
    assert "data.n_train" in _problems(**{"data.n_train": 0})
    assert "needs data.train_source=json or datasets" in _problems(**{"data.train_order": "file"})[
        "data.train_order"]
    assert _problems(**{"grader.kind": "http"}, env={"OPENAI_API_KEY": "k"}) == {}
    assert "must name" in _problems(**{"grader.kind": "http", "grader.http_api_key_env": ""})[
        "grader.http_api_key_env"]


def test_all_errors_at_once_in_one_line_and_unknown_keys_are_reported(monkeypatch):
    cfg = load_config(f"{KNOWLEDGE}:demo", {"inner.learning_rate": -1.0, "self_edit.top_p": 0.0,
                                            "lora.rank": 0})
    with pytest.raises(ConfigError) as e:
        validate_knowledge_config(cfg, env={})
    msg = str(e.value)
    assert msg.startswith("invalid config (3 problems): ") and "\n" not in msg
    assert "inner.learning_rate = -1.0 must be > 0" in msg and "self_edit.top_p = 0.0" in msg and "lora.rank" in msg
    assert [k for k, _ in e.value.problems] == ["inner.learning_rate", "lora.rank", "self_edit.top_p"]
    with cfg.unlocked():
        cfg.inner.learning_rate = 1e-3
        cfg.self_edit.top_p = 0.9
        cfg.lora.rank = 4
        cfg.new_knob = 3
    with pytest.raises(ConfigError, match="new_knob has no validation rule"):
        validate_knowledge_config(cfg, env={})


def test_read_json_file_names_the_file_and_the_fault(tmp_path):
    f = tmp_path / "passages.json"
    f.write_bytes(b'[{"title": "caf\xe9"}]')  # latin-1, not UTF-8
    with pytest.raises(DataError, match=r"passages.json: not UTF-8 text \(byte 15") as e:
        V.read_json_file(f)
    assert e.value.hint
    f.write_text('[{"title": 1,}]')
    with pytest.raises(DataError, match="passages.json: not valid JSON at line 1 column 14"):
        V.read_json_file(f)
    f.write_text("  \n")
    with pytest.raises(DataError, match="passages.json: file is empty"):
        V.read_json_file(f)
    with pytest.raises(DataError, match="nope.json: file not found"):
        V.read_json_file(tmp_path / "nope.json")
    with pytest.raises(DataError, match="is a folder"):
        V.read_json_file(tmp_path)
    f.write_bytes(b'\xef\xbb\xbf[{"title": "ok"}]')  # a UTF-8 BOM is fine
    assert V.read_json_file(f) == [{"title": "ok"}]


def test_require_list_of_objects_names_the_item():
    where = "self_edits.json"
    with pytest.raises(DataError, match="expected a JSON list, got dict"):
        V.require_list_of_objects({}, where)
    with pytest.raises(DataError, match="the list is empty"):
        V.require_list_of_objects([], where)
    with pytest.raises(DataError, match="item 1 is a str"):
        V.require_list_of_objects([{}, "x"], where)
    with pytest.raises(DataError, match="item 0 has no 'completions' field"):
        V.require_list_of_objects([{}], where, required={"completions": list})
    with pytest.raises(DataError, match="item 0 field 'completions' must be list, got str"):
        V.require_list_of_objects([{"completions": "x"}], where, required={"completions": list})
    assert V.require_list_of_objects([{"completions": []}], where, required={"completions": list})
