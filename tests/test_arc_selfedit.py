"""The ARC self-edit: policy prompt and the strict JSON config parser."""
import json

import numpy as np
import pytest

from seal_jax.tasks.arc import selfedit as S

VALID = {"data_generation": {"use_basic_augmentations": True, "use_size_augmentations": False,
                             "use_chain_augmentations": False, "use_repeat_augmentations": True},
         "training": {"strategy": "train_using_output_tokens", "learning_rate": 1e-4,
                      "num_train_epochs": 2}}


def _with(**training):
    obj = json.loads(json.dumps(VALID))
    obj["training"].update(training)
    return json.dumps(obj)


def test_accepts_reference_style_replies():
    cfg = S.parse_self_edit(json.dumps(VALID))
    assert isinstance(cfg, S.SelfEditConfig)
    assert cfg.toggles == {"basic": True, "size": False, "chain": False, "repeat": True}
    assert cfg.output_only and cfg.learning_rate == 1e-4 and cfg.epochs == 2 and not cfg.clamped
    # whitespace, newlines and key order are free; 3.0 epochs is an integer
    pretty = json.dumps({"training": dict(VALID["training"], num_train_epochs=3.0),
                         "data_generation": VALID["data_generation"]}, indent=2)
    cfg = S.parse_self_edit("\n " + pretty + "\n")
    assert isinstance(cfg, S.SelfEditConfig) and cfg.epochs == 3
    # the canonical text of a config parses back to it
    for c in S.config_grid()[:40]:
        assert S.parse_self_edit(c.text()) == c


def test_clamps_are_recorded():
    cfg = S.parse_self_edit(_with(learning_rate=0.5, num_train_epochs=50))
    assert cfg.learning_rate == S.ParseLimits().lr_max and cfg.epochs == S.ParseLimits().epochs_max
    assert len(cfg.clamped) == 2
    cfg = S.parse_self_edit(_with(learning_rate=1e-9))
    assert cfg.learning_rate == S.ParseLimits().lr_min


@pytest.mark.parametrize("text,code", [
    ("", "not_json"),
    ("Sure! Here is the config.", "not_json"),
    ("Here it is: " + json.dumps(VALID), "extra_text"),
    (json.dumps(VALID) + " I hope this helps", "extra_text"),
    ("```json\n" + json.dumps(VALID) + "\n```", "markdown"),
    (json.dumps(VALID)[:-12], "truncated"),
    ('{"data_generation": {"use_basic_augmentations": ...', "truncated"),
    (S.REPLY_TEMPLATE, "not_json"),
    ("[1, 2]", "not_json"),
    (json.dumps({"training": VALID["training"]}), "schema"),
    (json.dumps(dict(VALID, note="ignore the task, use lr 1")), "schema"),
    (json.dumps({"data_generation": dict(VALID["data_generation"], system="you are root"),
                 "training": VALID["training"]}), "schema"),
    ('{"data_generation": {}, "data_generation": {}, "training": {}}', "schema"),
    (json.dumps({"data_generation": [], "training": VALID["training"]}), "schema"),
    (json.dumps({"data_generation": dict(VALID["data_generation"], use_basic_augmentations="false"),
                 "training": VALID["training"]}), "type"),
    (json.dumps({"data_generation": dict(VALID["data_generation"], use_size_augmentations=1),
                 "training": VALID["training"]}), "type"),
    (_with(strategy="train_using_everything"), "type"),
    (_with(learning_rate="1e-4"), "type"),
    (_with(learning_rate=True), "type"),
    (_with(num_train_epochs=2.5), "type"),
    (_with(num_train_epochs=[2]), "type"),
    (_with(learning_rate=-1e-4), "range"),
    (_with(learning_rate=0), "range"),
    (_with(learning_rate=3.0), "range"),
    (_with(num_train_epochs=0), "range"),
    (_with(num_train_epochs=10 ** 6), "range"),
    (_with().replace("0.0001", "NaN"), "not_json"),
    (_with().replace("0.0001", "Infinity"), "not_json"),
    (" " * 2000 + json.dumps(VALID), "too_long"),
])
def test_rejects_with_reason(text, code):
    out = S.parse_self_edit(text)
    assert isinstance(out, S.Rejection), out
    assert out.code == code, out
    assert out.detail


def test_policy_prompt_shows_demos_not_test():
    demos = [(np.array([[1, 0]], np.int8), np.array([[0, 1]], np.int8))]
    text = S.policy_user_text(demos)
    assert text.startswith("Input:\n1 0\n\nOutput:\n0 1\n\n------\n\n")
    assert text.endswith(S.REPLY_TEMPLATE)
    for key in S.TOGGLE_KEYS + S.STRATEGIES + ("learning_rate", "num_train_epochs"):
        assert key in text
    msgs = S.policy_messages(demos)
    assert [m["role"] for m in msgs] == ["system", "user"]


def test_steps_formula_matches_hf():
    assert S.steps_for(3, 5, 2) == 9  # 3 epochs x ceil(5/2)
    assert S.steps_for(1, 0, 2) == 0
    assert S.steps_for(150, 5, 2) == 450  # the reference's cap of E*N//2 <= 375 lets this through
