"""Errors that more than one layer raises; imports nothing, so every layer may use them."""

from __future__ import annotations


class AttncomposeError(Exception):
    """The base of every error the library raises for a user's mistake or a missing piece:
    ``except AttncomposeError`` catches them all (the CLI prints each as one line)."""


class AttentionInputError(AttncomposeError, ValueError):
    """Inputs that the attention call cannot take, with what is wrong."""
