"""Knob values that may carry a tunable range.

A knob in a recipe is either a plain value (``block_size: 256``) or a tunable declaration
that keeps the value used when untuned and the space the tuner may search::

    block_size: {default: 256, choices: [64, 128, 256, 512]}
    sample_size: {default: 256, low: 0, high: 2048, step: 64}
    p: {default: 0.9, low: 0.5, high: 0.99}
    num_projections: {default: 7, low: 2, high: 12, log: false}

Each primitive declares its knobs with ``int_knob``/``float_knob`` and the bounds every value
must respect; defaults, range ends and choices are all checked against those bounds.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    ValidationError,
    model_validator,
)

from attncompose.spec.errors import plain_error


class _Tunable(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    def values_to_check(self) -> list[Any]:
        raise NotImplementedError


class IntRange(_Tunable):
    """An integer knob searched over ``[low, high]`` (optionally log-scaled or stepped)."""

    default: int
    low: int
    high: int
    step: int = Field(1, ge=1)
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> IntRange:
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must not exceed high ({self.high})")
        if not self.low <= self.default <= self.high:
            raise ValueError(f"default {self.default} lies outside [{self.low}, {self.high}]")
        if self.log and (self.low < 1 or self.step != 1):
            raise ValueError("log ranges need low >= 1 and step 1")
        return self

    def values_to_check(self) -> list[Any]:
        return [self.default, self.low, self.high]


class FloatRange(_Tunable):
    """A float knob searched over ``[low, high]``."""

    default: float
    low: float
    high: float
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> FloatRange:
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must not exceed high ({self.high})")
        if not self.low <= self.default <= self.high:
            raise ValueError(f"default {self.default} lies outside [{self.low}, {self.high}]")
        if self.log and self.low <= 0:
            raise ValueError("log ranges need low > 0")
        return self

    def values_to_check(self) -> list[Any]:
        return [self.default, self.low, self.high]


class _Choices(_Tunable):
    """A knob searched over a list of values (subclasses type ``default`` and ``choices``)."""

    @model_validator(mode="after")
    def _default_is_a_choice(self) -> _Choices:
        if self.default not in self.choices:
            raise ValueError(f"default {self.default!r} is not one of the choices {self.choices}")
        return self

    def values_to_check(self) -> list[Any]:
        return [self.default, *self.choices]


class IntChoices(_Choices):
    """An integer knob searched over a list of values."""

    default: int
    choices: list[int] = Field(min_length=1)


class FloatChoices(_Choices):
    """A float knob searched over a list of values."""

    default: float
    choices: list[float] = Field(min_length=1)


class StrChoices(_Choices):
    """A named-variant knob (e.g. a scoring method) searched over a list of names."""

    default: str
    choices: list[str] = Field(min_length=1)


Tunable = Union[IntRange, FloatRange, IntChoices, FloatChoices, StrChoices]


def _check_bounds(values: list[Any], ge: float | None, le: float | None) -> None:
    for x in values:
        if not math.isfinite(x):  # NaN passes every comparison: it would slip through below
            raise ValueError(f"expected a finite number, got {x}")
        if ge is not None and x < ge:
            raise ValueError(f"{x} is below the minimum {ge}")
        if le is not None and x > le:
            raise ValueError(f"{x} is above the maximum {le}")


def _parser(scalar: type, ranged: type[_Tunable], choices: type[_Tunable], ge, le):
    kind = "an integer" if scalar is int else "a number"

    def parse(value: Any) -> Any:
        if isinstance(value, _Tunable):
            parsed = value
        elif isinstance(value, dict):
            cls = choices if "choices" in value else ranged
            try:
                parsed = cls.model_validate(value)
            except ValidationError as err:
                raise ValueError(_first_message(err)) from None
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(
                f"expected {kind} or a tunable mapping ({{default, low, high}} or "
                f"{{default, choices}}), got {value!r}"
            )
        elif scalar is int and not float(value).is_integer():
            raise ValueError(f"expected an integer, got {value!r}")
        else:
            parsed = scalar(value)
        _check_bounds(
            parsed.values_to_check() if isinstance(parsed, _Tunable) else [parsed], ge, le
        )
        return parsed

    return parse


def _first_message(err: ValidationError) -> str:
    loc, msg = plain_error(err)
    return f"{loc}: {msg}" if loc else msg


def _serialize(value: Any) -> Any:
    return value.model_dump() if isinstance(value, _Tunable) else value


_SERIALIZER = PlainSerializer(_serialize)


def int_knob(ge: int | None = None, le: int | None = None) -> Any:
    """Type of an integer knob: a plain int, or a tunable int range/choice list."""
    return Annotated[
        int | IntRange | IntChoices,
        PlainValidator(
            _parser(int, IntRange, IntChoices, ge, le),
            json_schema_input_type=Union[int, IntRange, IntChoices],
        ),
        _SERIALIZER,
    ]


def float_knob(ge: float | None = None, le: float | None = None) -> Any:
    """Type of a float knob: a plain float, or a tunable float range/choice list."""
    return Annotated[
        float | FloatRange | FloatChoices,
        PlainValidator(
            _parser(float, FloatRange, FloatChoices, ge, le),
            json_schema_input_type=Union[float, FloatRange, FloatChoices],
        ),
        _SERIALIZER,
    ]


def str_knob(*names: str) -> Any:
    """Type of a knob naming one of ``names``: a plain name, or a tunable choice among them
    (``{default: means, choices: [means, keys]}``)."""

    def parse(value: Any) -> Any:
        if isinstance(value, StrChoices):
            parsed = value
        elif isinstance(value, dict):
            try:
                parsed = StrChoices.model_validate(value)
            except ValidationError as err:
                raise ValueError(_first_message(err)) from None
        elif isinstance(value, str):
            parsed = value
        else:
            raise ValueError(
                f"expected one of {list(names)} or a tunable mapping ({{default, choices}}), "
                f"got {value!r}"
            )
        for name in parsed.values_to_check() if isinstance(parsed, StrChoices) else [parsed]:
            if name not in names:
                raise ValueError(f"{name!r} is not one of {list(names)}")
        return parsed

    return Annotated[
        str | StrChoices,
        PlainValidator(parse, json_schema_input_type=Union[str, StrChoices]),
        _SERIALIZER,
    ]


def format_knob(value: Any) -> str:
    """A knob's value as reports print it: numbers in ``g`` format, names as they are."""
    return value if isinstance(value, str) else f"{value:g}"


def knob_value(value: Any) -> Any:
    """The value a knob takes when it is not tuned (its default for a tunable)."""
    return value.default if isinstance(value, _Tunable) else value


def is_tunable(value: Any) -> bool:
    """Whether a knob value declares a search space."""
    return isinstance(value, _Tunable)
