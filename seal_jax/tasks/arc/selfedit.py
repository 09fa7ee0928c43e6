"""The ARC self-edit: the policy's prompt and a strict parser of its JSON config.

The policy reads the task's demonstrations (policy grid format, no test input) and a request for a
JSON config choosing four augmentation families, a loss strategy, a learning rate and a number of
epochs (reference §1.1/§1.3; the request is worded here in our own words, with the reference's exact
keys, values and reply template).

The reference parses with `json.loads` and then trusts the structure: it resamples forever on bad
JSON, crashes on missing keys or strings where numbers belong, counts the string "false" as true and
trains a zero-epoch "dummy" adapter that can still be rewarded. `parse_self_edit` instead accepts
exactly one JSON object with exactly the schema's keys and types and returns either a
`SelfEditConfig` or a `Rejection(code, detail)`; the domain records a rejection as an invalid
self-edit with reward 0 after the configured number of resamples.

Accepted values and clamps (`ParseLimits`, from config):
* the four toggles: JSON true/false only (no strings, no 0/1);
* strategy: "train_using_all_tokens" or "train_using_output_tokens";
* learning_rate: a finite JSON number in (0, lr_reject_above]; values outside
  [lr_min, lr_max] are clamped into it (recorded in `clamped`);
* num_train_epochs: a JSON integer (3.0 is accepted as 3) in [1, epochs_reject_above]; values above
  epochs_max are clamped to epochs_max (recorded).
The step cap (optimizer steps = epochs * ceil(N / batch) > step_cap) needs the dataset size and is
applied when the candidate is built (dataset.py / domain.py).
Duplicate keys, extra keys (an injected "note" or "system" field), text around the object, markdown
fences, NaN/Infinity, and replies longer than `max_chars` are rejected with their reason.
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Optional, Sequence

import numpy as np

from seal_jax.tasks.arc.grids import format_policy

SYSTEM_PROMPT = ("You are a helpful assistant that provide the correct output for the given task "
                 "immediately.")  # the reference's system line (its typo kept: the policy read it)

TOGGLE_KEYS = ("use_basic_augmentations", "use_size_augmentations", "use_chain_augmentations",
               "use_repeat_augmentations")
FAMILY_OF_TOGGLE = dict(zip(TOGGLE_KEYS, ("basic", "size", "chain", "repeat")))
STRATEGIES = ("train_using_all_tokens", "train_using_output_tokens")
TRAINING_KEYS = ("strategy", "learning_rate", "num_train_epochs")

REPLY_TEMPLATE = (
    '{"data_generation": {"use_basic_augmentations": ..., "use_size_augmentations": ..., '
    '"use_chain_augmentations": ..., "use_repeat_augmentations": ...}, '
    '"training": {"strategy": ..., "learning_rate": ..., "num_train_epochs": ...}}')

SELF_EDIT_REQUEST = (
    "The examples above show one transformation of grids. A model will be fine-tuned on these "
    "examples before it answers a new input, and you choose how.\n\n"
    "Data generation: answer true or false for each family of extra training examples.\n"
    "- use_basic_augmentations: rotations, flips, mirrored copies, shifts and transposition\n"
    "- use_size_augmentations: grids enlarged twice in height, width or both\n"
    "- use_chain_augmentations: a rotation, flip or transposition followed by doubling the size\n"
    "- use_repeat_augmentations: grids repeated twice vertically, horizontally or both ways\n\n"
    "Training: choose the strategy \"train_using_all_tokens\" (learn the whole text) or "
    "\"train_using_output_tokens\" (learn only the answers), a learning_rate (a float) and "
    "num_train_epochs (an integer).\n\n"
    "Respond with a valid JSON object only, with no markdown and no other text, in this form:\n"
    + REPLY_TEMPLATE)


def policy_user_text(demos: Sequence[tuple[np.ndarray, np.ndarray]]) -> str:
    """The user turn: every demonstration in the policy format, a rule, then the request."""
    parts = [f"Input:\n{format_policy(i)}\nOutput:\n{format_policy(o)}\n" for i, o in demos]
    return "".join(parts) + "------\n\n" + SELF_EDIT_REQUEST


def policy_messages(demos) -> list[dict]:
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": policy_user_text(demos)}]


# ------------------------------------------------------------------------------------------------
# Parsing


@dataclasses.dataclass(frozen=True)
class ParseLimits:
    lr_min: float = 1e-6
    lr_max: float = 1e-3
    lr_reject_above: float = 1.0
    epochs_max: int = 10
    epochs_reject_above: int = 1000
    max_chars: int = 1024


@dataclasses.dataclass(frozen=True)
class SelfEditConfig:
    basic: bool
    size: bool
    chain: bool
    repeat: bool
    strategy: str
    learning_rate: float
    epochs: int
    clamped: tuple[str, ...] = ()

    @property
    def toggles(self) -> dict[str, bool]:
        return {"basic": self.basic, "size": self.size, "chain": self.chain, "repeat": self.repeat}

    @property
    def output_only(self) -> bool:
        return self.strategy == "train_using_output_tokens"

    def to_json(self) -> dict:
        return {"data_generation": {k: getattr(self, FAMILY_OF_TOGGLE[k]) for k in TOGGLE_KEYS},
                "training": {"strategy": self.strategy, "learning_rate": self.learning_rate,
                             "num_train_epochs": self.epochs}}

    def text(self) -> str:
        """The canonical reply text of this config (what a perfect policy would write)."""
        return json.dumps(self.to_json())

    def key(self) -> tuple:
        return (self.basic, self.size, self.chain, self.repeat, self.strategy,
                float(self.learning_rate), int(self.epochs))


@dataclasses.dataclass(frozen=True)
class Rejection:
    code: str  # not_json | truncated | markdown | extra_text | schema | type | range | too_long
    detail: str

    def __str__(self) -> str:
        return f"{self.code}: {self.detail}"


class _Duplicate(ValueError):
    pass


def _no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise _Duplicate(f"duplicate keys {dup}")
    return dict(pairs)


def _no_constants(name):
    raise ValueError(f"{name} is not a JSON number")


def parse_self_edit(text: str, limits: ParseLimits = ParseLimits()) -> SelfEditConfig | Rejection:
    """Strictly parse a policy reply; see the module docstring for what is accepted."""
    if len(text) > limits.max_chars:
        return Rejection("too_long", f"{len(text)} characters > {limits.max_chars}")
    body = text.strip()
    if body.startswith("```"):
        return Rejection("markdown", "reply is wrapped in a markdown code fence")
    if not body.startswith("{"):
        return Rejection("extra_text" if "{" in body else "not_json",
                         f"reply does not start with a JSON object: {body[:40]!r}")
    decoder = json.JSONDecoder(object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    try:
        obj, end = decoder.raw_decode(body)
    except _Duplicate as e:
        return Rejection("schema", str(e))
    except json.JSONDecodeError as e:
        code = "truncated" if e.pos >= len(body) - 1 or body.count("{") > body.count("}") else "not_json"
        return Rejection(code, f"{e.msg} at character {e.pos}")
    except ValueError as e:
        return Rejection("not_json", str(e))
    if body[end:].strip():
        return Rejection("extra_text", f"text after the JSON object: {body[end:end + 40]!r}")
    return _validate(obj, limits)


def _exact_keys(obj, keys, where) -> Optional[Rejection]:
    if not isinstance(obj, dict):
        return Rejection("schema", f"{where} must be an object, got {type(obj).__name__}")
    missing = [k for k in keys if k not in obj]
    extra = sorted(set(obj) - set(keys))
    if missing or extra:
        return Rejection("schema", f"{where}: missing keys {missing}, unexpected keys {extra}")
    return None


def _validate(obj, limits: ParseLimits) -> SelfEditConfig | Rejection:
    bad = _exact_keys(obj, ("data_generation", "training"), "reply")
    bad = bad or _exact_keys(obj["data_generation"], TOGGLE_KEYS, "data_generation")
    bad = bad or _exact_keys(obj["training"], TRAINING_KEYS, "training")
    if bad:
        return bad
    gen, train = obj["data_generation"], obj["training"]
    for k in TOGGLE_KEYS:
        if not isinstance(gen[k], bool):
            return Rejection("type", f"{k} must be true or false, got {gen[k]!r}")
    strategy = train["strategy"]
    if strategy not in STRATEGIES:
        return Rejection("type", f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    lr, epochs = train["learning_rate"], train["num_train_epochs"]
    if isinstance(lr, bool) or not isinstance(lr, (int, float)):
        return Rejection("type", f"learning_rate must be a number, got {lr!r}")
    if isinstance(epochs, bool) or not isinstance(epochs, (int, float)) or (
            isinstance(epochs, float) and not (math.isfinite(epochs) and epochs.is_integer())):
        return Rejection("type", f"num_train_epochs must be an integer, got {epochs!r}")
    lr, epochs = float(lr), int(epochs)
    if not (math.isfinite(lr) and 0 < lr <= limits.lr_reject_above):
        return Rejection("range", f"learning_rate {lr!r} outside (0, {limits.lr_reject_above}]")
    if not 1 <= epochs <= limits.epochs_reject_above:
        return Rejection("range", f"num_train_epochs {epochs} outside [1, {limits.epochs_reject_above}]")
    clamped = []
    if not limits.lr_min <= lr <= limits.lr_max:
        clamped.append(f"learning_rate {lr:g} -> clamped into [{limits.lr_min:g}, {limits.lr_max:g}]")
        lr = min(max(lr, limits.lr_min), limits.lr_max)
    if epochs > limits.epochs_max:
        clamped.append(f"num_train_epochs {epochs} -> {limits.epochs_max}")
        epochs = limits.epochs_max
    return SelfEditConfig(gen[TOGGLE_KEYS[0]], gen[TOGGLE_KEYS[1]], gen[TOGGLE_KEYS[2]],
                          gen[TOGGLE_KEYS[3]], strategy, lr, epochs, tuple(clamped))


def steps_for(epochs: float, num_samples: int, batch_size: int) -> int:
    """Optimizer steps of a TTT run (HF max_steps: ceil(epochs * ceil(N / bs)))."""
    return int(math.ceil(epochs * math.ceil(num_samples / batch_size))) if num_samples else 0


# A few fixed configs: the reference's "oracle" TTT config (ttt.py) and a small grid used by the
# fixed-config baseline and the oracle-in-hindsight rows of the results table.
REFERENCE_TTT_CONFIG = SelfEditConfig(True, True, True, True, "train_using_output_tokens", 1e-4, 2)


def config_grid(learning_rates=(1e-4, 1e-3), epochs=(1, 3)) -> list[SelfEditConfig]:
    """Every toggle combination x strategy x lr x epochs (the policy's discrete action space when
    lr/epochs are restricted to the given values)."""
    out = []
    for bits in range(16):
        t = [bool(bits >> i & 1) for i in range(4)]
        for s in STRATEGIES:
            for lr in learning_rates:
                for e in epochs:
                    out.append(SelfEditConfig(*t, s, float(lr), int(e)))
    return out

