"""Recipe specification: pydantic models of recipes and steps. Imports no torch."""

from __future__ import annotations

from attncompose.spec import recipe as _recipe
from attncompose.spec import steps as _steps  # registers the built-in steps
from attncompose.spec.errors import RecipeError
from attncompose.spec.knobs import is_tunable, knob_value
from attncompose.spec.steps import PARTIAL, SELECTION, STEP_TYPES, Port, StepSpec, register_step


def __getattr__(name: str):
    # Recipe is rebuilt whenever a step type is registered; always hand out the current one.
    if name in (
        "Recipe",
        "recipe_model",
        "load_recipe",
        "validate_recipe",
        "builtin_recipes",
        "recipe_json_schema",
        "RecipeBase",
        "read_yaml",
    ):
        return getattr(_recipe, name)
    raise AttributeError(name)


__all__ = [
    "PARTIAL",
    "SELECTION",
    "STEP_TYPES",
    "Port",
    "RecipeError",
    "StepSpec",
    "is_tunable",
    "knob_value",
    "register_step",
]
del _steps
