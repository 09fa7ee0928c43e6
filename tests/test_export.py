"""`python -m seal_jax.export`: a finished tiny run's policy (its base model with the checkpointed
adapters merged in) is the run's policy bit for bit and loads in transformers with equal logits and an
equal tokenizer; the selected candidates' adapters come out as PEFT directories."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seal_jax import export, rest_em
from seal_jax.model.transformer import forward
from seal_jax.peft_io import load_peft_adapter

from tiny_world import write_tiny_model_dir
from tolerances import assert_close_scaled
from toy_domain import toy_experiment


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    exp = toy_experiment(tmp_path_factory.mktemp("run"), rounds=1, save_adapters=True)
    rest_em.run_rounds(exp)
    exp.checkpointer.close()
    return exp


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    """The toy run's base model as an HF folder: the toy run records no model of its own."""
    return str(write_tiny_model_dir(tmp_path_factory.mktemp("base")))


def test_exported_policy_is_the_runs_policy_bit_for_bit(finished_run, base_model, tmp_path):
    from seal_jax.model.hf import load_hf_checkpoint

    exp = finished_run
    export.export_run(exp.run_dir, tmp_path / "hf", model=base_model)
    _, params = load_hf_checkpoint(tmp_path / "hf")
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(exp.engine.params), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.slow
@pytest.mark.torch
def test_exported_policy_loads_in_transformers_with_equal_logits(finished_run, base_model, tmp_path):
    import torch
    import transformers

    exp = finished_run
    out = tmp_path / "hf"
    assert export.main(["--run", str(exp.run_dir), "--model", base_model, "--out", str(out)]) == 0
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in out.iterdir()}

    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype="float32").eval()
    tokens = np.random.default_rng(0).integers(0, exp.engine.cfg.vocab_size, size=(2, 9))
    with torch.no_grad():
        want = model(torch.from_numpy(tokens)).logits.numpy()
    got = forward(exp.engine.params, jnp.asarray(tokens, jnp.int32), cfg=exp.engine.cfg)
    assert_close_scaled(np.asarray(got), want, eps_multiple=200, what="exported policy logits")

    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "Notes on apple: <|im_end|> 17 km"
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == exp.engine.tokenizer.encode(text)
    assert hf_tok.eos_token_id == exp.engine.tokenizer.eos_id


@pytest.mark.slow
def test_selected_adapters_are_exported_as_peft_directories(finished_run, base_model, tmp_path):
    exp = finished_run
    info = export.export_run(exp.run_dir, tmp_path / "out", round_index=1, model=base_model)
    chosen = json.loads((exp.run_dir / "sft_round0.json").read_text())
    assert chosen, "the tiny run must have selected something to export"
    assert len(info["adapters"]) == len(chosen)  # reps=1: one adapter per selected self-edit
    for path in info["adapters"]:
        lora, lora_cfg = load_peft_adapter(path, exp.engine.cfg)
        assert lora_cfg == exp.engine.settings.lora
        assert any(np.abs(np.asarray(t["b"])).max() > 0 for t in lora.values())  # trained, not init


def test_export_errors_name_what_is_missing(finished_run, tmp_path):
    with pytest.raises(export.ExportError, match="available: \\[1\\]"):
        export.export_run(finished_run.run_dir, tmp_path / "a", round_index=3)
    with pytest.raises(export.ExportError, match="not a seal_jax run directory"):
        export.export_run(tmp_path, tmp_path / "b")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(export.ExportError, match="not empty"):
        export.export_run(finished_run.run_dir, tmp_path / "full")
    assert export.main(["--run", str(tmp_path), "--out", str(tmp_path / "c")]) == 2
    # The checkpoint holds adapters: the base model is needed, and must be the run's.
    with pytest.raises(export.ExportError, match="does not record; pass the base model with --model"):
        export.export_run(finished_run.run_dir, tmp_path / "d")
    with pytest.raises(export.ExportError, match="another base model .* --model"):
        export.export_run(finished_run.run_dir, tmp_path / "e", model="preset:tiny-llama")
