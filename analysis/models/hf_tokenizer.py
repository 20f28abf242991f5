"""Tokenizers of real checkpoints: ``tokenizer.json`` read with the ``tokenizers`` library
(no Python from the folder, no network).

Readable labels: byte-level BPE pieces (``Ġ`` for a space, ``Ċ`` for a newline, any byte as
one of 256 printable stand-ins) and SentencePiece pieces (``▁`` for a space, ``<0x0A>`` byte
tokens) are shown as the text they stand for, with newlines and tabs made visible (``⏎``, ``⇥``)
and a token of spaces only shown as ``␣``.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from .folder import ModelFolderError, describe_contents

VISIBLE = {"\n": "⏎", "\t": "⇥", "\r": "␍"}

# chat formats per family: (turn template, assistant prefix)
CHAT_FORMATS = {
    "ouro": ("<|im_start|>{role}\n{content}<|im_end|>\n", "<|im_start|>assistant\n"),
    "huginn": ("<|begin_header|>{role}<|end_header|>\n\n{content}<|end_turn|>", "<|begin_header|>Huginn<|end_header|>\n\n"),
}


def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: printable stand-in character -> byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_BYTES = _byte_decoder()
_SP_BYTE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` with loopscope's tokenizer interface.

    encode(text) -> ids (with the file's post-processor, e.g. a BOS, unless add_special_tokens=False);
    decode(ids) -> text; token_labels(text) -> one readable label per token of encode(text);
    label(id) -> readable label; answer_token(text) -> the first token id of an answer.
    """

    def __init__(self, tokenizer, path: str = "", chat_format: str | None = None):
        self._tok = tokenizer
        self.path = path
        self.chat_format = chat_format
        model = json.loads(tokenizer.to_str()).get("pre_tokenizer") or {}
        self.byte_level = "ByteLevel" in json.dumps(model)

    @classmethod
    def from_folder(cls, folder, chat_format: str | None = None) -> "HFTokenizer":
        """Read ``folder/tokenizer.json``; ModelFolderError when it is missing or unreadable."""
        from tokenizers import Tokenizer

        path = Path(folder) / "tokenizer.json"
        if not path.is_file():
            raise ModelFolderError(f"{folder}: no tokenizer.json (found: {describe_contents(folder)}); "
                                   "loopscope reads tokenizers from tokenizer.json only")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a plain Exception subclass
            raise ModelFolderError(f"{path} cannot be read by the tokenizers library: {exc}") from None
        return cls(tok, str(path), chat_format)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Text -> token ids. ValueError for an empty text."""
        if not isinstance(text, str) or not text:
            raise ValueError("the text to tokenize is empty")
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def label(self, token_id: int) -> str:
        """A readable label of one token: the text it stands for, whitespace made visible."""
        piece = self._tok.id_to_token(int(token_id))
        if piece is None:
            return f"<{int(token_id)}>"
        if self._tok.token_to_id(piece) is not None and piece in self._special_pieces():
            return piece
        m = _SP_BYTE.match(piece)
        if m:
            text = bytes([int(m.group(1), 16)]).decode("latin-1")
        elif self.byte_level and all(ch in _BYTES for ch in piece):
            raw = bytes(_BYTES[ch] for ch in piece)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:  # part of a multi-byte character: its bytes, not "�"
                text = "".join(chr(b) if b < 0x80 else f"<0x{b:02X}>" for b in raw)
        else:
            text = piece.replace("▁", " ")
        if text and not text.strip(" "):
            return "␣" * len(text)
        for ch, shown in VISIBLE.items():
            text = text.replace(ch, shown)
        return text

    def _special_pieces(self) -> set:
        if not hasattr(self, "_specials"):
            raw = json.loads(self._tok.to_str())
            self._specials = {t["content"] for t in raw.get("added_tokens", []) if t.get("special")}
        return self._specials

    def token_labels(self, text_or_ids) -> list[str]:
        """One readable label per token: of ``encode(text)`` for a string, else of the given ids."""
        ids = self.encode(text_or_ids) if isinstance(text_or_ids, str) else text_or_ids
        return [self.label(i) for i in ids]

    def answer_token(self, answer: str) -> int:
        """The first token of ``answer`` as the model would continue a prompt: the answer text is
        encoded without special tokens; ValueError for an empty answer."""
        ids = self.encode(answer, add_special_tokens=False)
        if not ids:
            raise ValueError(f"answer {answer!r} encodes to no token")
        return ids[0]

    def chat(self, messages: list[dict], family: str | None = None) -> str:
        """Wrap ``[{"role", "content"}, ...]`` in the family's chat format ("ouro": ChatML,
        "huginn": Huginn's headers) and open the assistant turn. ValueError for other families."""
        fam = family or self.chat_format
        if fam not in CHAT_FORMATS:
            raise ValueError(f"no chat format for {fam!r} (known: {sorted(CHAT_FORMATS)})")
        turn, prefix = CHAT_FORMATS[fam]
        head = "<|begin_text|>" if fam == "huginn" else ""
        return head + "".join(turn.format(role=m["role"], content=m["content"]) for m in messages) + prefix
