"""A byte-level stand-in tokenizer for fast ARC tests (the real one takes seconds to load)."""
from __future__ import annotations


class ByteTokenizer:
    """encode = UTF-8 bytes; a ChatML-like template; ids >= 256 are the two specials."""

    START, END = 256, 257
    eos_id = pad_id = END
    stop_ids = (END,)

    def apply_chat_template(self, messages, add_generation_prompt=True) -> str:
        text = "".join(f"<s>{m['role']}\n{m['content']}<e>\n" for m in messages)
        return text + ("<s>assistant\n" if add_generation_prompt else "")

    def encode(self, text: str, add_special: bool = False) -> list[int]:
        ids, i = [], 0
        while i < len(text):
            if text.startswith("<s>", i):
                ids.append(self.START)
                i += 3
            elif text.startswith("<e>", i):
                ids.append(self.END)
                i += 3
            else:
                ids.extend(text[i].encode())
                i += 1
        return ids

    def decode(self, ids, skip_special: bool = True) -> str:
        out = bytearray()
        for t in ids:
            if t < 256:
                out.append(t)
            elif not skip_special:
                out.extend(b"<s>" if t == self.START else b"<e>")
        return out.decode(errors="replace")

    def escape(self, text: str) -> str:
        return text.replace("<s>", "< s>").replace("<e>", "< e>")
