"""One entry point for "a recipe or a tuned recipe" given on the command line or in code."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from attncompose.runtime.attention import compile as compile_recipe
from attncompose.runtime.model_tuned import ModelTuning, is_model_tuned, load_model_tuning
from attncompose.runtime.tuned import TunedAttention, TunedFileError
from attncompose.runtime.tuned import load as load_tuned
from attncompose.spec.errors import RecipeError
from attncompose.spec.recipe import builtin_recipes, read_yaml


def load(
    path: str | Path,
    backend: str = "auto",
    cuda_graphs: bool = False,
    decode_fallback: bool = True,
    check_finite: bool = True,
) -> nn.Module | ModelTuning:
    """A tuned file: a tuned recipe as an SDPA-compatible module
    (:func:`attncompose.runtime.tuned.load`), or a model-level tuned file
    (``format: attncompose-model-tuned/...``) as a
    :class:`~attncompose.runtime.model_tuned.ModelTuning` (``.layer(i)`` per layer).
    ``cuda_graphs``: the modules it compiles capture a CUDA graph per call shape and replay
    it (:class:`~attncompose.runtime.attention.Attention`). ``decode_fallback``: a decode
    step runs exact attention where the tuner measured the choice's decode step no faster
    (False: the choice at every step). ``check_finite=False``: the modules it compiles make
    no NaN/Inf pass over their inputs (a host synchronisation, and in a decode step a read
    of every cached key and value; :class:`~attncompose.runtime.attention.Attention`).
    Anything but a non-empty path is a :class:`~attncompose.runtime.tuned.TunedFileError`
    naming what it got (a built-in recipe's name: pointing to :func:`compile`)."""
    _check_tuned_path(path)
    options = dict(
        backend=backend,
        cuda_graphs=cuda_graphs,
        decode_fallback=decode_fallback,
        check_finite=check_finite,
    )
    if _is_model_tuned(path):
        return load_model_tuning(path, **options)
    return load_tuned(path, **options)


def _check_tuned_path(path: Any) -> None:
    """Refuse what :func:`load` cannot read as a file's path, saying what it takes."""
    if not isinstance(path, (str, os.PathLike)):
        raise TunedFileError(
            f"attncompose.load takes a tuned file's path (str or Path), not {type(path).__name__}"
        )
    if path == "":
        raise TunedFileError("the path of the tuned file is empty")
    name = str(path)
    if name in builtin_recipes() and not Path(path).exists():
        raise TunedFileError(
            f"file not found; {name!r} is a built-in recipe, not a tuned file: "
            f"compile it with attncompose.compile({name!r})",
            source=name,
        )


def is_model_tuned_file(spec: str | Path) -> bool:
    """Whether ``spec`` (a command's RECIPE_OR_TUNED) names a model-level tuned file."""
    path = Path(spec)
    return path.is_file() and _is_model_tuned(path)


def load_attention(
    spec: str | Path, backend: str = "auto", cuda_graphs: bool = False, check_finite: bool = True
) -> nn.Module | ModelTuning:
    """An attention module from a tuned recipe file, a recipe file or a built-in recipe name,
    or a :class:`~attncompose.runtime.model_tuned.ModelTuning` from a model-level tuned file.

    Tuned files (``format: attncompose-tuned/...``) dispatch by length and device
    (:func:`attncompose.runtime.tuned.load`); recipes compile to one pipeline (:func:`compile`).
    ``cuda_graphs`` and ``check_finite`` as in :func:`load`.
    """
    options = dict(backend=backend, cuda_graphs=cuda_graphs, check_finite=check_finite)
    path = Path(spec)
    if path.is_file():
        data = read_yaml(path)
        if isinstance(data, dict) and str(data.get("format", "")).startswith("attncompose-tuned"):
            return load_tuned(path, **options)
        if _is_model_tuned(path, data):
            return load_model_tuning(path, **options)
    return compile_recipe(spec, **options)


def attention_name(attn: nn.Module | ModelTuning) -> str:
    """How commands name what :func:`load_attention` returned: the recipe's name, a tuned
    file's recipes joined by '+' and marked "(tuned)", or a model-level tuning's name."""
    if isinstance(attn, TunedAttention):
        return f"{attn.tuned.name} (tuned)"
    if isinstance(attn, ModelTuning):
        return attn.name
    return attn.recipe.name


def _is_model_tuned(path: str | Path, data: Any = None) -> bool:
    """Whether ``path`` (parsed as ``data`` if given) is a model-level tuned file."""
    if data is None:
        try:
            data = read_yaml(Path(path))
        except RecipeError:
            return False  # the tuned-file reader says what is wrong
    return is_model_tuned(data)
