"""Errors that more than one layer raises; imports nothing, so every layer may use them."""

from __future__ import annotations


class AttentionInputError(ValueError):
    """Inputs that the attention call cannot take, with what is wrong."""
