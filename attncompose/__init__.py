"""attncompose: approximate attention composed from primitives, declared in YAML."""

from __future__ import annotations

from attncompose.errors import AttncomposeError
from attncompose.eval.metrics import relative_error
from attncompose.loading import load
from attncompose.model_tuned import ModelTuning
from attncompose.runtime.attention import Attention, compile
from attncompose.runtime.checks import AttentionInputError
from attncompose.spec import RecipeError
from attncompose.spec.recipe import builtin_recipes, load_recipe
from attncompose.tuned import TunedAttention

__version__ = "0.1.0"

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
