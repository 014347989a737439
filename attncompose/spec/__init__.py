"""Recipe specification: the vocabulary of steps, the recipe model, its graph. Imports no torch.

The step models of the built-in primitives live in their folders
(``attncompose/primitives/<op>/schema.py``) and are registered with them.
"""

from __future__ import annotations

from typing import Any

from attncompose.spec import recipe as _recipe
from attncompose.spec.errors import RecipeError
from attncompose.spec.knobs import is_tunable, knob_value
from attncompose.spec.recipe import (
    RecipeBase,
    builtin_recipes,
    load_recipe,
    read_yaml,
    recipe_json_schema,
    recipe_model,
    validate_recipe,
)
from attncompose.spec.steps import (
    EXCLUDE,
    PARTIAL,
    SEED,
    SELECTION,
    STEP_TYPES,
    Port,
    StepSpec,
    register_step,
)


def __getattr__(name: str) -> Any:
    if name == "Recipe":  # the model of the step types registered so far
        return _recipe.recipe_model()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "EXCLUDE",
    "PARTIAL",
    "SEED",
    "SELECTION",
    "STEP_TYPES",
    "Port",
    "RecipeBase",
    "RecipeError",
    "StepSpec",
    "builtin_recipes",
    "is_tunable",
    "knob_value",
    "load_recipe",
    "read_yaml",
    "recipe_json_schema",
    "recipe_model",
    "register_step",
    "validate_recipe",
]
