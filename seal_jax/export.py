"""Take a round's policy out of seal_jax: an HF checkpoint directory and PEFT adapters.

    python -m seal_jax.export --run runs/knowledge-demo/<id> [--round N] [--model M] --out exported/

writes `exported/` as an HF model directory (`model.safetensors`, `config.json`, `tokenizer.json`,
`tokenizer_config.json`) that `transformers.AutoModelForCausalLM.from_pretrained` and
`AutoTokenizer.from_pretrained` load, holding the policy after round N (default: the last finished
round). When the run kept candidate adapters (`rest_em.save_adapters=True`), the adapters of the
self-edits selected in round N - 1 (the ones the policy was fine-tuned on to get round N) are copied
to `exported/adapters/<context>/edit<i>_rep<r>/` as PEFT directories for that round's *starting* policy.

A round's checkpoint holds the policy as the adapters merged into the base model
(`seal_jax.checkpoints.PolicyHistory`), so the export loads the base model the run started from (its
config's `model`, `param_dtype` and `seed`, as recorded in the run's `seal_run.json`; `--model` when
the model has moved) and merges them in; the checkpoint's fingerprint of the base refuses another
model. A checkpoint of whole params (a full fine-tune, or a run from before adapters were
checkpointed) needs no base. What else the export needs is written by the round into the run
directory before round 0 (`policy/`: the model's HF config.json and the tokenizer files).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys
from typing import Optional, Sequence

from seal_jax.model.hf import config_from_hf, config_to_hf, save_hf_checkpoint

POLICY_SPEC = "policy"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


class ExportError(ValueError):
    """The run directory cannot be exported as asked; the message names what is missing."""


def tokenizer_files(tokenizer) -> dict[str, str]:
    """tokenizer.json and tokenizer_config.json contents for a `seal_jax.model.tokenizer.Tokenizer`.

    The tokenizer.json gets a post-processor adding the same BOS/EOS around a text as
    `Tokenizer.encode(add_special=True)` (GGUF tokenizers add their BOS outside the `tokenizers` object).
    """
    import tokenizers
    from tokenizers import processors

    backend = tokenizers.Tokenizer.from_str(tokenizer._tok.to_str())  # a copy; the engine's is untouched
    prefix, suffix = list(tokenizer._prefix), list(tokenizer._suffix)
    probe = tokenizer.encode("a")
    if backend.encode("a", add_special_tokens=True).ids != prefix + probe + suffix:
        def piece(ids):
            return [backend.id_to_token(i) for i in ids]

        backend.post_processor = processors.TemplateProcessing(
            single=" ".join(piece(prefix) + ["$A"] + piece(suffix)),
            special_tokens=[(backend.id_to_token(i), i) for i in prefix + suffix])

    def token(token_id):
        return None if token_id is None else backend.id_to_token(int(token_id))

    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": token(tokenizer.eos_id),
              "pad_token": token(tokenizer.pad_id), "bos_token": token(tokenizer.bos_id),
              "add_bos_token": bool(prefix), "clean_up_tokenization_spaces": False,
              "model_max_length": 1 << 30}
    if tokenizer.chat_template:
        config["chat_template"] = tokenizer.chat_template
    return {"tokenizer.json": backend.to_str(), "tokenizer_config.json": json.dumps(config, indent=2)}


def write_policy_spec(run_dir: pathlib.Path, engine) -> pathlib.Path:
    """Once per run: the model's HF config.json and the tokenizer files under `run_dir/policy/`."""
    spec = pathlib.Path(run_dir) / POLICY_SPEC
    if (spec / "config.json").exists():
        return spec
    tmp = spec.with_name(spec.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "config.json").write_text(json.dumps(config_to_hf(engine.cfg), indent=2))
    for name, text in tokenizer_files(engine.tokenizer).items():
        (tmp / name).write_text(text)
    tmp.rename(spec)  # complete or absent, never half written
    return spec


def export_run(run_dir: str | pathlib.Path, out: str | pathlib.Path, round_index: Optional[int] = None,
               *, model: Optional[str] = None) -> dict:
    """Write round `round_index`'s policy (default: the last) as an HF checkpoint directory at `out`.

    `model`: the base model's spec (see `load_model`) when it is not where the run loaded it from.
    """
    from seal_jax.checkpoints import PolicyCheckpointError, RunCheckpointer

    run_dir, out = pathlib.Path(run_dir), pathlib.Path(out)
    spec = run_dir / POLICY_SPEC
    if not (spec / "config.json").exists():
        raise ExportError(f"{run_dir} has no {POLICY_SPEC}/config.json: not a seal_jax run directory "
                          "with finished rounds")
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"--out {out} exists and is not empty; choose a new directory")
    cfg = config_from_hf(json.loads((spec / "config.json").read_text()))
    ckpt = RunCheckpointer(run_dir / "checkpoints")
    try:
        steps = ckpt.all_steps()
        if not steps:
            raise ExportError(f"{run_dir}: no finished round to export (no checkpoint)")
        step = steps[-1] if round_index is None else int(round_index)
        if step not in steps:
            raise ExportError(f"--round {step}: no checkpoint of that round in {run_dir}; available: {steps}")
        if ckpt.holds_policy_history(step):
            params, _, _ = ckpt.restore_policy(load_base_params(run_dir, model), cfg, step)
        else:
            params, _ = ckpt.restore(step)
    except PolicyCheckpointError as e:
        raise ExportError(f"{e} (pass it with --model)") from None
    finally:
        ckpt.close()
    save_hf_checkpoint(out, cfg, params)
    for name in TOKENIZER_FILES:
        shutil.copyfile(spec / name, out / name)
    adapters = _copy_selected_adapters(run_dir, step, out / "adapters")
    return {"round": step, "out": str(out), "adapters": [str(a) for a in adapters]}


def load_base_params(run_dir: pathlib.Path, model: Optional[str] = None):
    """The params of the base model the run started from, loaded as the run loaded them.

    `model` overrides the run's `model`; `param_dtype` and `seed` (random presets) come from the
    run's recorded config.
    """
    from seal_jax.errors import UserError
    from seal_jax.model.loading import load_model
    from seal_jax.rundir import MARKER

    marker = run_dir / MARKER
    config = json.loads(marker.read_text())["config"] if marker.exists() else {}
    spec = model or config.get("model")
    if not spec:
        raise ExportError(f"{run_dir}: its checkpoints hold the policy as adapters on a base model "
                          f"the run does not record; pass the base model with --model")
    try:
        _, params, _ = load_model(spec, param_dtype=config.get("param_dtype") or None,
                                  seed=int(config.get("seed", 0)))
    except UserError as e:
        raise ExportError(f"base model: {e.one_line()} (pass the model the run started from with "
                          f"--model)") from None
    return params


def _copy_selected_adapters(run_dir: pathlib.Path, step: int, dest: pathlib.Path) -> list[pathlib.Path]:
    """The PEFT adapters of the self-edits selected in round step-1, when the run kept them."""
    from seal_jax.estep import adapter_path
    from seal_jax.rest_em import ADAPTERS

    selected = run_dir / f"sft_round{step - 1}.json"
    root = run_dir / ADAPTERS
    if not root.exists() or not selected.exists():
        return []
    copied = []
    phase = f"round{step - 1}/score"
    for choice in json.loads(selected.read_text()):
        rep = 0
        while (src := adapter_path(root, phase, choice["context_id"], choice["edit_index"], rep)).exists():
            target = dest / src.relative_to(root / src.parent.parent.name)
            shutil.copytree(src, target)
            copied.append(target)
            rep += 1
    return copied


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m seal_jax.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="a seal_jax run directory")
    parser.add_argument("--round", type=int, default=None, help="policy after this round (default: last)")
    parser.add_argument("--model", default=None,
                        help="the run's base model, when it is no longer where the run loaded it from")
    parser.add_argument("--out", required=True, help="new directory for the HF checkpoint")
    args = parser.parse_args(argv)
    try:
        info = export_run(args.run, args.out, args.round, model=args.model)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported the policy after round {info['round']} to {info['out']}"
          + (f" with {len(info['adapters'])} selected adapters" if info["adapters"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
