"""Text <-> token ids and chat prompts, on the `tokenizers` library (no transformers, no torch).

`Tokenizer` is built either from an HF directory (tokenizer.json + tokenizer_config.json) or from GGUF
metadata. For GGUF we construct the byte-level BPE ourselves and copy llama.cpp's pre-tokenizer
regexes (keyed by `tokenizer.ggml.pre`), so that ids match what llama.cpp produces for the same file.
(transformers' own GGUF tokenizer needs torch, and for SmolLM2 it does not split digits individually,
so e.g. " 2024" tokenizes differently from llama.cpp and from the model's original tokenizer.json.)

Special tokens (`<|im_start|>`, `<|im_end|>`, ...) are recognised inside raw text, which is what chat
templates rely on. Untrusted text (passages, model outputs) must therefore go through `escape` before
it is spliced into a prompt: escape wraps every special-token string in two Unicode noncharacters,
and `encode` encodes the wrapped span as ordinary text. Noncharacters never occur in real text, and
escape removes any that do, so a stray marker cannot flip the meaning of the rest of the prompt.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional, Sequence

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

_OPEN, _CLOSE = "\ufdd0", "\ufdd1"  # Unicode noncharacters: reserved for internal use
_ESCAPED_SPAN = re.compile(f"{_OPEN}(.*?){_CLOSE}", re.S)
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|endoftext|>", "<|end_of_text|>")

# llama.cpp's pre-tokenizer regexes (src/llama-vocab.cpp), applied one after the other.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
           r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
          r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_TOKENIZERS = {
    "smollm": (r"\p{N}", _GPT2), "starcoder": (r"\p{N}", _GPT2), "refact": (r"\p{N}", _GPT2),
    "gpt-2": (_GPT2,), "gpt2": (_GPT2,), "llama-bpe": (_LLAMA3,), "llama3": (_LLAMA3,),
    "qwen2": (_QWEN2,),
}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


class Tokenizer:
    """Thin wrapper over `tokenizers.Tokenizer` with the ids and chat template the engine needs."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, *, eos_id: int, pad_id: Optional[int] = None,
                 bos_id: Optional[int] = None, add_bos: Optional[bool] = None,
                 chat_template: Optional[str] = None, name: str = ""):
        self._tok = tokenizer
        self._literal = tokenizers.Tokenizer.from_str(tokenizer.to_str())
        self._literal.encode_special_tokens = True  # specials in escaped spans are plain text
        self.eos_id = int(eos_id)
        self.pad_id = self.eos_id if pad_id is None else int(pad_id)
        self.bos_id = bos_id
        self.chat_template = chat_template
        self.name = name
        self.special_tokens = tuple(sorted({t.content for t in tokenizer.get_added_tokens_decoder()
                                            .values()}, key=len, reverse=True))
        # What encode(add_special=True) adds around the text: the post-processor's choice for HF
        # tokenizers (e.g. Llama-3 prepends <|begin_of_text|>), or the GGUF add_bos flag.
        if add_bos is None:
            with_special = tokenizer.encode("a", add_special_tokens=True).ids
            plain = tokenizer.encode("a", add_special_tokens=False).ids
            at = next(i for i in range(len(with_special)) if with_special[i:i + len(plain)] == plain)
            self._prefix, self._suffix = with_special[:at], with_special[at + len(plain):]
        else:
            self._prefix, self._suffix = ([bos_id] if add_bos and bos_id is not None else []), []
        ids = {t: tokenizer.token_to_id(t) for t in _END_OF_TURN}
        self.stop_ids = tuple(sorted({self.eos_id} | {i for i in ids.values() if i is not None}))
        # A space before a special string goes inside the escaped span: byte-level pre-tokenizers
        # attach it to the following punctuation ("Ġ<"), as they would for the unescaped text.
        self._special_pattern = (
            re.compile(" ?(?:" + "|".join(map(re.escape, self.special_tokens)) + ")")
            if self.special_tokens else None)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def escape(self, text: str) -> str:
        """Make special-token strings in untrusted text encode as ordinary text."""
        text = text.replace(_OPEN, "").replace(_CLOSE, "")
        if self._special_pattern is None:
            return text
        return self._special_pattern.sub(lambda m: f"{_OPEN}{m.group(0)}{_CLOSE}", text)

    def encode(self, text: str, add_special: bool = False) -> list[int]:
        ids = list(self._prefix) if add_special else []
        pieces = _ESCAPED_SPAN.split(text)  # even: normal text, odd: escaped special strings
        for i, piece in enumerate(pieces):
            if i % 2 == 0:
                piece = piece.replace(_OPEN, "").replace(_CLOSE, "")  # unbalanced markers
            if piece:
                ids += (self._literal if i % 2 else self._tok).encode(
                    piece, add_special_tokens=False).ids
        return ids + (list(self._suffix) if add_special else [])

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def id_to_token(self, token_id: int) -> Optional[str]:
        return self._tok.id_to_token(int(token_id))

    def token_to_id(self, token: str) -> Optional[int]:
        return self._tok.token_to_id(token)

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """Render messages [{"role", "content"}] with the model's Jinja chat template (sandboxed)."""
        if not self.chat_template:
            raise ValueError(f"tokenizer {self.name!r} has no chat template")
        return _compile_template(self.chat_template).render(
            messages=list(messages), add_generation_prompt=add_generation_prompt,
            bos_token=self._token_str(self.bos_id), eos_token=self._token_str(self.eos_id))

    def _token_str(self, token_id):
        return "" if token_id is None else (self._tok.id_to_token(int(token_id)) or "")

    # ------------------------------------------------------------------------------------------------
    # Constructors

    @classmethod
    def from_hf_dir(cls, path) -> "Tokenizer":
        path = Path(path)
        if not (path / "tokenizer.json").exists():
            raise FileNotFoundError(f"{path / 'tokenizer.json'} does not exist")
        tok = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
        config = _read_json(path / "tokenizer_config.json")
        model_config = _read_json(path / "config.json")
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if template is None and (path / "chat_template.jinja").exists():
            template = (path / "chat_template.jinja").read_text()

        def token_id(key):
            value = config.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                return tok.token_to_id(value)
            model_value = model_config.get(f"{key}_id")
            return model_value[0] if isinstance(model_value, list) else model_value

        eos = token_id("eos_token")
        if eos is None:
            raise ValueError(f"cannot determine the EOS token of the tokenizer in {path}")
        return cls(tok, eos_id=eos, pad_id=token_id("pad_token"), bos_id=token_id("bos_token"),
                   chat_template=template, name=str(path))

    @classmethod
    def from_gguf_metadata(cls, meta) -> "Tokenizer":
        """Byte-level BPE from tokenizer.ggml.{tokens,merges,token_type}, llama.cpp pre-tokenizer."""
        kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "default")
        if kind != "gpt2":
            raise ValueError(f"GGUF {meta.path}: tokenizer model {kind!r} is not supported (only "
                             f"byte-level BPE, 'gpt2')")
        if pre not in _PRE_TOKENIZERS:
            raise ValueError(f"GGUF {meta.path}: pre-tokenizer {pre!r} is not supported; known: "
                             f"{sorted(_PRE_TOKENIZERS)}")
        vocab = {token: i for i, token in enumerate(meta.tokens)}
        merges = [tuple(m.split(" ", 1)) for m in meta.merges]
        bpe = models.BPE(vocab=vocab, merges=merges, ignore_merges=pre in ("llama-bpe", "llama3"))
        tok = tokenizers.Tokenizer(bpe)
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in _PRE_TOKENIZERS[pre]]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        types = list(meta.token_types) or [1] * len(meta.tokens)
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, ty in zip(meta.tokens, types) if ty == _CONTROL])
        tok.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, ty in zip(meta.tokens, types) if ty == _USER_DEFINED])
        eos = meta.get("tokenizer.ggml.eos_token_id")
        if eos is None:
            raise ValueError(f"GGUF {meta.path}: tokenizer.ggml.eos_token_id is missing")
        bos = meta.get("tokenizer.ggml.bos_token_id")
        return cls(tok, eos_id=eos, pad_id=meta.get("tokenizer.ggml.padding_token_id"), bos_id=bos,
                   add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
                   chat_template=meta.get("tokenizer.chat_template"), name=str(meta.path))


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


_TEMPLATE_CACHE: dict = {}


def _compile_template(source: str):
    if source not in _TEMPLATE_CACHE:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        # Same environment options as transformers' apply_chat_template.
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
        _TEMPLATE_CACHE[source] = env.from_string(source)
    return _TEMPLATE_CACHE[source]


def resolve_pad_id(tokenizer: Optional["Tokenizer"], cfg) -> int:
    """The one pad id of the engine (training buffers, decode rows, scoring rows): the tokenizer's
    pad (its EOS unless it defines one, as the reference sets pad = EOS), else the model config's
    pad, else its EOS, else 0. Padding is masked everywhere except in reference-faithful training,
    where pad positions are EOS targets, which is why the tokenizer's choice comes first."""
    for pad in (getattr(tokenizer, "pad_id", None), getattr(cfg, "pad_token_id", None),
                getattr(cfg, "eos_token_id", None)):
        if pad is not None:
            return int(pad)
    return 0
