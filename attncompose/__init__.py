"""attncompose: approximate attention composed from primitives, declared in YAML."""

from __future__ import annotations

from attncompose.errors import AttncomposeError
from attncompose.eval.metrics import relative_error
from attncompose.runtime.attention import Attention, compile
from attncompose.runtime.checks import AttentionInputError
from attncompose.runtime.loading import load
from attncompose.runtime.model_tuned import ModelTuning
from attncompose.runtime.tuned import TunedAttention
from attncompose.spec import RecipeError
from attncompose.spec.recipe import builtin_recipes, load_recipe
from attncompose.version import __version__

__all__ = [
    "Attention",
    "AttentionInputError",
    "AttncomposeError",
    "ModelTuning",
    "RecipeError",
    "TunedAttention",
    "__version__",
    "builtin_recipes",
    "compile",
    "load",
    "load_recipe",
    "relative_error",
]
