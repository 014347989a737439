"""One entry point for "a recipe or a tuned recipe" given on the command line or in code."""

from __future__ import annotations

from pathlib import Path

from torch import nn


def load_attention(spec: str | Path, backend: str = "auto") -> nn.Module:
    """An attention module from a tuned recipe file, a recipe file or a built-in recipe name.

    Tuned files (``format: attncompose-tuned/...``) dispatch by length and device
    (:func:`attncompose.tuned.load`); recipes compile to one pipeline (:func:`compile`).
    """
    from attncompose.runtime.attention import compile as compile_recipe
    from attncompose.spec.recipe import read_yaml

    path = Path(spec)
    if path.is_file():
        data = read_yaml(path)
        if isinstance(data, dict) and str(data.get("format", "")).startswith("attncompose-tuned"):
            from attncompose.tuned import load

            return load(path, backend=backend)
    return compile_recipe(spec, backend=backend)


def attention_name(attn: nn.Module) -> str:
    """How commands name what :func:`load_attention` returned: the recipe's name, or a tuned
    file's recipes joined by '+' and marked "(tuned)"."""
    from attncompose.tuned import TunedAttention

    if isinstance(attn, TunedAttention):
        return f"{attn.tuned.name} (tuned)"
    return attn.recipe.name
