"""The text task: a corpus that ships with Python (``pydoc_data.topics``) for the character-level
text model. Free text has no known answer."""
from __future__ import annotations

import string


def text_corpus() -> str:
    """Python's own help text (``pydoc_data.topics``, ~465 KB), restricted to printable ASCII
    and newlines; ships with every CPython, so nothing is downloaded."""
    from pydoc_data.topics import topics

    allowed = set(string.printable) - set("\r\x0b\x0c")
    text = "\n\n".join(topics[k] for k in sorted(topics))
    return "".join(c if c in allowed else " " for c in text.replace("\t", "    "))


def text_chars() -> str:
    """The text model's vocabulary: every character that occurs in ``text_corpus()``, sorted."""
    return "".join(sorted(set(text_corpus())))
