"""The recipe model and its loader.

A recipe is a named DAG of steps (a mapping ``id -> step``) with one output::

    name: hyperattention
    steps:
      hash: {op: lsh, num_projections: 7}
      diag: {op: block, select: [hash], block_size: 256}
      residual: {op: uniform_sample, exclude: [diag], sample_size: 256}
      merged: {op: merge, inputs: [diag, residual]}
      out: {op: causal_split, body: merged, min_seq_len: 4096}

The structure (dangling names, cycles, kinds of inputs, one output) is checked by
:mod:`attncompose.spec.graph` when the model is validated, so a ``Recipe`` that exists is
usable; the recipe keeps the graph it built (:attr:`RecipeBase.graph`).

``Recipe`` is the model whose ``steps`` accept every step type registered so far
(:func:`recipe_model`): the set of ops is open, filled by ``attncompose.primitives``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Union

import networkx as nx
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from attncompose.spec.errors import RecipeError, plain_error
from attncompose.spec.graph import check_structure
from attncompose.spec.knobs import is_tunable
from attncompose.spec.steps import STEP_TYPES, StepSpec


class RecipeBase(BaseModel):
    """Fields common to every recipe; ``steps`` is added with the union of registered steps."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    description: str = ""
    output: str | None = Field(None, description="id of the output step (default: the sink)")

    @model_validator(mode="after")
    def _check_graph(self) -> RecipeBase:
        _ = self.graph  # built and checked now, once: RecipeError if the steps do not fit
        return self

    @cached_property
    def graph(self) -> nx.DiGraph:
        """The steps as a checked networkx DAG (:mod:`attncompose.spec.graph`), built when the
        recipe is validated and kept (not a field: recipes compare and dump without it)."""
        return check_structure(self)

    @property
    def output_id(self) -> str:
        """The id of the step whose result is the attention output."""
        return self.graph.graph["output"]

    def knob_values(self) -> dict[str, Any]:
        """'step.knob' -> value in effect, for every knob of every step."""
        return {f"{sid}.{k}": v for sid, st in self.steps.items() for k, v in st.knobs().items()}

    def tunables(self) -> dict[str, Any]:
        """'step.knob' -> tunable declaration, for every knob the recipe lets the tuner search."""
        return {f"{sid}.{k}": v for sid, st in self.steps.items() for k, v in st.tunables().items()}

    def with_knobs(self, values: dict[str, Any]) -> RecipeBase:
        """A copy with the given 'step.knob' values fixed (tunable declarations replaced)."""
        if not isinstance(values, Mapping):
            raise RecipeError(
                f"knobs must be a mapping of 'step.knob' to values, not {type(values).__name__}"
            )
        data = self.model_dump(mode="python", exclude_none=True)
        for dotted, value in values.items():
            sid, _, knob = dotted.partition(".")
            if sid not in data["steps"] or knob not in type(self.steps[sid]).model_fields:
                raise RecipeError(f"no knob {dotted!r} in recipe {self.name!r}")
            data["steps"][sid][knob] = value
        try:
            return validate_recipe(data, source=f"<{self.name} with knobs>")
        except RecipeError as err:  # a value given: say which (knobs[step.knob])
            given = {f"steps.{dotted}": dotted for dotted in values}
            loc = f"knobs[{given[err.loc]}]" if err.loc in given else err.loc
            raise RecipeError(err.reason, source=err.source, loc=loc) from None

    def dump_yaml(self) -> str:
        """The recipe as YAML text that :func:`load_recipe` reads back unchanged."""
        return yaml.safe_dump(self.model_dump(mode="json", exclude_none=True), sort_keys=False)


_MODELS: dict[tuple[type[StepSpec], ...], type[RecipeBase]] = {}


def recipe_model() -> type[RecipeBase]:
    """The ``Recipe`` model: its ``steps`` accept every registered step type (built again
    when a step type has been registered since)."""
    types = tuple(STEP_TYPES.values())
    if types not in _MODELS:
        if not types:
            raise RecipeError("no step types are registered (import attncompose.primitives)")
        union = Union[types]  # built from the registry at runtime
        step = types[0] if len(types) == 1 else Annotated[union, Field(discriminator="op")]
        _MODELS.clear()
        _MODELS[types] = create_model(
            "Recipe",
            __base__=RecipeBase,
            __module__=__name__,
            steps=(dict[str, step], Field(min_length=1)),
        )
    return _MODELS[types]


def __getattr__(name: str) -> Any:
    if name == "Recipe":  # the current model, as the registry stands
        return recipe_model()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def builtin_recipe_dir() -> Path:
    """The folder holding the recipes shipped with the package."""
    return Path(str(resources.files("attncompose") / "recipes"))


def builtin_recipes() -> list[str]:
    """Names of the built-in recipes."""
    return sorted(p.stem for p in builtin_recipe_dir().glob("*.yaml"))


def validate_recipe(data: Any, source: str | None = None) -> RecipeBase:
    """Validate a parsed recipe mapping; errors name the source and the field path."""
    if not isinstance(data, dict):
        raise RecipeError(f"a recipe is a mapping, got {type(data).__name__}", source=source)
    if str(data.get("format", "")).startswith("attncompose-tuned"):
        raise RecipeError(
            "this is a tuned file, not a recipe: load it with attncompose.load(PATH), or give "
            "it to a command that takes RECIPE_OR_TUNED (bench, eval)",
            source=source,
        )
    if str(data.get("format", "")).startswith("attncompose-model-tuned"):
        raise RecipeError(
            "this is a model-level tuned file (a choice per layer), not a recipe: load it with "
            "attncompose.load(PATH) (a ModelTuning, for attncompose.integrations.hf.register), "
            "or give it to `attncompose eval`",
            source=source,
        )
    try:
        return recipe_model().model_validate(copy.deepcopy(data))
    except ValidationError as err:
        errors = [_recipe_wording(dict(e, loc=_strip_tags(e["loc"]))) for e in err.errors()]
        loc, msg = plain_error(errors)
        raise RecipeError(msg, source=source, loc=loc or None) from None
    except RecipeError as err:
        raise RecipeError(err.reason, source=source, loc=err.loc) from None


def _recipe_wording(error: dict) -> dict:
    """Say what a step's ``op`` may be where pydantic speaks of discriminators and tags."""
    ops = ", ".join(STEP_TYPES)
    if error["type"] == "union_tag_not_found":
        return dict(error, type="step_op", msg=f"a step needs `op:`, one of {ops}")
    if error["type"] == "union_tag_invalid":
        tag = error.get("ctx", {}).get("tag")
        return dict(error, type="step_op", msg=f"unknown op {tag!r}; known ops: {ops}")
    return error


def _strip_tags(loc: tuple) -> tuple:
    """Drop the discriminator tag pydantic inserts after a step id."""
    if len(loc) >= 3 and loc[0] == "steps" and loc[2] in STEP_TYPES:
        return (*loc[:2], *loc[3:])
    return tuple(loc)


def load_recipe(recipe: str | Path | dict | RecipeBase) -> RecipeBase:
    """A validated recipe from a built-in name, a YAML path, a mapping or a Recipe."""
    if isinstance(recipe, RecipeBase):
        return recipe
    if isinstance(recipe, dict):
        return validate_recipe(recipe, source="<dict>")
    if not isinstance(recipe, (str, Path)):
        raise RecipeError(
            "a recipe is a built-in name, a YAML path, a mapping or a Recipe, "
            f"not {type(recipe).__name__}"
        )
    if recipe == "":  # Path("") is the current folder
        raise RecipeError("the recipe name or path is empty")
    path = Path(recipe)
    if not path.exists() and path.suffix not in (".yaml", ".yml") and "/" not in str(recipe):
        path = builtin_recipe_dir() / f"{recipe}.yaml"
        if not path.exists():
            names = ", ".join(builtin_recipes())
            raise RecipeError(
                f"no recipe file or built-in recipe named {recipe!r} (built-in: {names})"
            )
    return validate_recipe(read_yaml(path), source=str(recipe))


def read_yaml(path: Path) -> Any:
    """Parse a YAML file; syntax errors name the file, line and column."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise RecipeError("file not found", source=str(path)) from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as err:
        raise RecipeError(f"cannot read: {err}", source=str(path)) from None
    try:
        return yaml.safe_load(text)
    except RecursionError:
        raise RecipeError("YAML nested too deeply to read", source=str(path)) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(err, "problem", None) or str(err)
        raise RecipeError(f"YAML syntax error: {problem}", source=where) from None


def recipe_json_schema() -> dict:
    """JSON Schema of recipe files (for editor completion)."""
    return recipe_model().model_json_schema()


__all__ = [
    "RecipeBase",
    "builtin_recipes",
    "is_tunable",
    "load_recipe",
    "read_yaml",
    "recipe_json_schema",
    "recipe_model",
    "validate_recipe",
]
