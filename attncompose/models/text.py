"""The built-in evaluation text: Python's own ``pydoc_data.topics`` (~113k tokens of English)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

from attncompose.models.card import ModelInputError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase


def builtin_text() -> str:
    """The pydoc topics, sorted by key and joined by blank lines."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def load_text(path: str | Path | None = None) -> str:
    """The text of a UTF-8 file, or the built-in text when ``path`` is None."""
    if path is None:
        return builtin_text()
    try:
        text = Path(path).read_text(encoding="utf-8")
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


def token_ids(tokenizer: PreTrainedTokenizerBase, n: int, text: str | None = None) -> torch.Tensor:
    """The first ``n`` token ids of ``text`` (default: the built-in text) as a [1, n] int64 tensor.

    Tokenised as the tokenizer does by default (special tokens included, e.g. a BOS token).
    """
    import torch

    ids = tokenizer(builtin_text() if text is None else text)["input_ids"]
    if len(ids) < n:
        raise ModelInputError(f"the text has {len(ids)} tokens, fewer than the {n} requested")
    return torch.tensor(ids[:n], dtype=torch.long).unsqueeze(0)
