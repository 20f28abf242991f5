"""Character-level tokenizer: one token per character, explicit errors for unknown characters."""
from __future__ import annotations


class TokenizerError(ValueError):
    """A prompt cannot be tokenized; the message names the character and its position."""


class CharTokenizer:
    """Maps each character of ``chars`` (no duplicates) to its index."""

    def __init__(self, chars: str):
        if len(set(chars)) != len(chars):
            raise ValueError("tokenizer characters must be unique")
        if not chars:
            raise ValueError("tokenizer needs at least one character")
        self.chars = chars
        self.index = {c: i for i, c in enumerate(chars)}

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        """Text -> token ids. Raises TokenizerError naming the first character not in the vocabulary."""
        ids = []
        for pos, ch in enumerate(text):
            i = self.index.get(ch)
            if i is None:
                shown = repr(ch) if ch.isprintable() else f"U+{ord(ch):04X}"
                allowed = self.chars if len(self.chars) <= 60 else f"{len(self.chars)} characters"
                raise TokenizerError(
                    f"character {shown} at position {pos} is not in this model's vocabulary "
                    f"(it knows: {allowed!r})" if len(self.chars) <= 60 else
                    f"character {shown} at position {pos} is not in this model's vocabulary of {allowed}")
            ids.append(i)
        return ids

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def token_labels(self, text: str) -> list[str]:
        """Readable per-token labels for axes: the character, with whitespace made visible."""
        visible = {" ": "␣", "\n": "⏎", "\t": "⇥"}
        return [visible.get(c, c) for c in text]

    def to_dict(self) -> dict:
        return {"type": "char", "chars": self.chars}

    @classmethod
    def from_dict(cls, d: dict) -> "CharTokenizer":
        if d.get("type") != "char" or not isinstance(d.get("chars"), str):
            raise ValueError("tokenizer entry must be {'type': 'char', 'chars': <string>}")
        return cls(d["chars"])
