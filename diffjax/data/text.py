"""An offline character-level text corpus: the docstrings of Python's standard library.

Source: every module, class and function docstring (read with `ast`, nothing is imported) of the
`.py` files directly in the running interpreter's standard-library directory (`sysconfig`'s "stdlib"),
in file-name order. Licence: the Python Software Foundation License (PSF-2.0), which permits copying
and redistribution. The text depends on the Python version; `corpus_fingerprint` names it.

Characters are printable ASCII plus newline (96 symbols; anything else becomes "?"). Split by file:
a file goes to "validation" when its CRC-32 is 0 mod 10, else to "train". `char_sequences` cuts a
split's text into non-overlapping windows of `length` characters.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import os
import sysconfig
import zlib

import numpy as np

from diffjax.validation import check_choice, check_count

__all__ = ["CHARS", "stdlib_docstrings", "encode_text", "decode_tokens", "char_sequences", "corpus_fingerprint"]

CHARS = "\n" + "".join(chr(c) for c in range(32, 127))  # 96 symbols; id = index
_INDEX = {c: i for i, c in enumerate(CHARS)}
_UNKNOWN = _INDEX["?"]
SPLITS = ("train", "validation")


def _docstrings(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    return [d for d in (ast.get_docstring(n) for n in nodes) if d]


@functools.lru_cache(maxsize=2)
def stdlib_docstrings(split: str = "train") -> str:
    """The split's text: its files' docstrings, each followed by a blank line."""
    check_choice("split", split, SPLITS)
    root = sysconfig.get_paths()["stdlib"]
    parts = []
    for name in sorted(os.listdir(root)):
        if not name.endswith(".py"):
            continue
        validation = zlib.crc32(name.encode()) % 10 == 0
        if validation == (split == "validation"):
            parts.extend(d + "\n\n" for d in _docstrings(os.path.join(root, name)))
    return "".join(parts)


def encode_text(text: str) -> np.ndarray:
    """Character ids (int32); characters outside CHARS become "?"."""
    return np.fromiter((_INDEX.get(c, _UNKNOWN) for c in text), np.int32, len(text))


def decode_tokens(tokens) -> str:
    """The text of ids in [0, 96); other ids (e.g. a mask) are shown as "_"."""
    return "".join(CHARS[int(t)] if 0 <= int(t) < len(CHARS) else "_" for t in np.asarray(tokens).reshape(-1))


def char_sequences(split: str, length: int) -> np.ndarray:
    """(n, length) int32 non-overlapping windows of the split's text."""
    check_count("length", length)
    ids = encode_text(stdlib_docstrings(split))
    n = len(ids) // length
    return ids[: n * length].reshape(n, length)


def corpus_fingerprint() -> str:
    """Python version and the first 12 hex digits of the SHA-256 of both splits' text."""
    digest = hashlib.sha256((stdlib_docstrings("train") + stdlib_docstrings("validation")).encode()).hexdigest()
    return f"python {sysconfig.get_python_version()} stdlib docstrings sha256:{digest[:12]}"
