"""Texts for capture, tuning and evaluation: built-in texts that ship with Python, or a file.

Built-in texts (by name, so every machine has them; their content follows the Python version,
so results record the text's SHA-256):

- ``pydoc-topics`` (the default): Python's ``pydoc_data.topics``, the language reference
  sections behind ``help()``, sorted by key and joined by blank lines (~113k tokens).
- ``stdlib-docs``: the docstrings of a fixed list of pure-Python standard-library modules
  (the module's, then its public classes' and functions' in name order); library
  documentation, a different text from the topics (~65k tokens), e.g. for evaluating a
  tuning made on ``pydoc-topics``.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from attncompose.models.card import ModelInputError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

DEFAULT_TEXT = "pydoc-topics"
STDLIB_DOC_MODULES = (
    "argparse", "ast", "asyncio", "base64", "bisect", "calendar", "collections", "configparser",
    "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "doctest",
    "email", "enum", "fractions", "functools", "gettext", "glob", "gzip", "heapq", "hmac",
    "http.client", "imaplib", "inspect", "ipaddress", "json", "logging", "mailbox", "numbers",
    "optparse", "pathlib", "pdb", "pickle", "pprint", "queue", "random", "shlex", "shutil",
    "smtplib", "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap",
    "threading", "timeit", "tokenize", "trace", "typing", "unittest", "urllib.parse", "uuid",
    "warnings", "weakref", "zipfile",
)  # fmt: skip
MIN_DOC_CHARS = 80  # shorter docstrings are one-line summaries, not prose


def builtin_text() -> str:
    """The pydoc topics, sorted by key and joined by blank lines."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def stdlib_docs_text() -> str:
    """Docstrings of :data:`STDLIB_DOC_MODULES`: each module's, then those of the public
    classes and functions it defines (name order, at least ``MIN_DOC_CHARS`` long)."""
    parts = []
    with warnings.catch_warnings():  # reading deprecated names (typing.io) warns
        warnings.simplefilter("ignore", DeprecationWarning)
        for name in sorted(STDLIB_DOC_MODULES):
            module = importlib.import_module(name)
            parts.append(inspect.getdoc(module) or "")
            for attr, obj in sorted(vars(module).items()):
                if attr.startswith("_") or not (inspect.isclass(obj) or inspect.isfunction(obj)):
                    continue
                doc = inspect.getdoc(obj) if getattr(obj, "__module__", None) == name else None
                if doc and len(doc) >= MIN_DOC_CHARS:
                    parts.append(doc)
    return "\n\n".join(p for p in parts if p)


BUILTIN_TEXTS: dict[str, Callable[[], str]] = {
    DEFAULT_TEXT: builtin_text,
    "stdlib-docs": stdlib_docs_text,
}


def text_name(spec: str | Path | None) -> str:
    """How a text is named in results: the built-in name, or the file's path."""
    if spec is None:
        return DEFAULT_TEXT
    return str(spec)


def load_text(spec: str | Path | None = None) -> str:
    """The text of a UTF-8 file, or a built-in text by name (:data:`BUILTIN_TEXTS`); the
    default text when ``spec`` is None. An existing file wins over a built-in name."""
    if spec is None:
        return builtin_text()
    path = Path(spec)
    if not path.exists() and str(spec) in BUILTIN_TEXTS:
        return BUILTIN_TEXTS[str(spec)]()
    if not path.exists():
        raise ModelInputError(
            f"text {spec!r}: no such file, nor a built-in text ({', '.join(sorted(BUILTIN_TEXTS))})"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ModelInputError(
            f"{path}: not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start})"
        ) from None
    except OSError as err:
        raise ModelInputError(f"{path}: cannot read ({err.strerror or err})") from None
    if not text.strip():
        raise ModelInputError(f"{path}: the file is empty")
    return text


def text_sha256(text: str) -> str:
    """Hex SHA-256 of the UTF-8 text, to identify it in capture files and results."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def all_token_ids(tokenizer: PreTrainedTokenizerBase, text: str | None = None) -> torch.Tensor:
    """Every token id of ``text`` (default: the built-in text) as a [1, T] int64 tensor.

    Tokenised as the tokenizer does by default (special tokens included, e.g. a BOS token).
    """
    import torch

    ids = tokenizer(builtin_text() if text is None else text)["input_ids"]
    return torch.tensor(ids, dtype=torch.long).unsqueeze(0)


def token_ids(tokenizer: PreTrainedTokenizerBase, n: int, text: str | None = None) -> torch.Tensor:
    """The first ``n`` token ids of ``text`` (default: the built-in text) as a [1, n] tensor."""
    ids = all_token_ids(tokenizer, text)
    if ids.shape[1] < n:
        raise ModelInputError(f"the text has {ids.shape[1]} tokens, fewer than the {n} requested")
    return ids[:, :n]
