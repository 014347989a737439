"""Tuned recipe files and the attention module that dispatches on them.

A tuned file holds the recipe it came from and a table keyed by device name
(``torch.cuda.get_device_name()`` or ``cpu``) and sequence length. Each entry gives the knobs
chosen for that length (or none: exact attention, with the reason), the measured error (mean
and max over seeds), latency and exact latency, trials, target, library versions and date::

    format: attncompose-tuned/1
    causal: true
    recipe: {name: hyperattention, steps: {...}}
    table:
      cpu:
        4096: {knobs: {diag.block_size: 128, ...}, error_mean: 0.031, error_max: 0.04, ...}

Dispatch policy of :class:`TunedAttention` for a call with key length ``Lk`` on a device:
1. entries of this device; with none, those of another device in the file (said once);
2. the entry of length ``Lk``; else the nearest tuned length above ``Lk`` (at fixed knobs an
   approximation's error grows with length, so a longer length's choice stays safe); else,
   above every tuned length, exact attention (said once);
3. a call in the other masking mode than the one tuned (causal vs non-causal) runs exact
   attention (said once).
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import Tensor, nn

from attncompose.runtime.checks import check_sdpa_options
from attncompose.spec.errors import RecipeError, plain_error
from attncompose.spec.recipe import read_yaml, validate_recipe
from attncompose.timing import device_name  # the table key of a device

FORMAT = "attncompose-tuned/1"
log = logging.getLogger(__name__)


class TunedFileError(RecipeError):
    """A tuned file that cannot be used: names the file, the field and the problem."""


class Candidate(BaseModel):
    """An approximation measured by the tuner: knobs, error over seeds, latency."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    knobs: dict[str, int | float]
    error_mean: float = Field(ge=0)
    error_max: float = Field(ge=0)
    latency_ms: float = Field(ge=0)
    frac: float | None = Field(None, ge=0, description="share of exact attention's products")


class TunedEntry(BaseModel):
    """The choice for one (device, length): ``knobs`` to apply, or None for exact attention.

    ``error_*`` and ``latency_ms`` describe what is chosen (0 error for exact attention);
    ``best`` is the best feasible approximation found, kept even when it is not used.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    knobs: dict[str, int | float] | None = None
    fallback: str | None = Field(None, description="why exact attention is used")
    error_mean: float = Field(ge=0)
    error_max: float = Field(ge=0)
    latency_ms: float = Field(ge=0)
    frac: float | None = Field(None, ge=0, description="share of exact attention's products")
    exact_latency_ms: float = Field(ge=0)
    best: Candidate | None = None
    trials: int = Field(ge=0)
    target_err: float = Field(gt=0)
    latency_budget_ms: float | None = Field(None, gt=0)
    cost: str = Field("latency", description="what the tuner minimised: latency or products")
    seeds: int = Field(ge=1)
    data: str
    date: str
    versions: dict[str, str]

    @model_validator(mode="after")
    def _knobs_or_reason(self) -> TunedEntry:
        if (self.knobs is None) != (self.fallback is not None):
            raise ValueError("give either knobs or a fallback reason (exact attention), not both")
        return self

    @property
    def is_exact(self) -> bool:
        return self.knobs is None


class TunedFile(BaseModel):
    """A tuned recipe: the recipe, the masking mode tuned, and the (device, length) table."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["attncompose-tuned/1"] = FORMAT
    causal: bool
    recipe: dict[str, Any]
    source: str | None = None
    table: dict[str, dict[int, TunedEntry]] = {}

    def recipe_model(self):
        """The validated recipe (errors name the ``recipe`` field)."""
        return validate_recipe(self.recipe, source="recipe")

    def with_entry(self, device: str, seq_len: int, entry: TunedEntry) -> TunedFile:
        """A copy with ``entry`` set for (device, seq_len)."""
        table = {d: dict(rows) for d, rows in self.table.items()}
        table.setdefault(device, {})[seq_len] = entry
        return self.model_copy(update={"table": table})

    def dump_yaml(self) -> str:
        """The file's YAML text."""
        data = self.model_dump(mode="json", exclude_none=True)
        data["table"] = {
            d: {int(n): e for n, e in rows.items()} for d, rows in data["table"].items()
        }
        return yaml.safe_dump(data, sort_keys=False)


def read_tuned(path: str | Path) -> TunedFile:
    """Parse and check a tuned file; every problem is a :class:`TunedFileError`."""
    path = Path(path)
    try:
        data = read_yaml(path)
    except RecipeError as err:
        raise TunedFileError(err.reason, source=err.source or str(path)) from None
    if not isinstance(data, dict):
        raise TunedFileError(
            f"a tuned file is a mapping, got {type(data).__name__}", source=str(path)
        )
    if "table" not in data and "steps" in data:
        raise TunedFileError(
            "this is a recipe, not a tuned file (run `attncompose tune`)", source=str(path)
        )
    try:
        tuned = TunedFile.model_validate(data)
    except ValidationError as err:
        loc, msg = plain_error(err)
        raise TunedFileError(msg, source=str(path), loc=loc or None) from None
    _check_recipe(tuned, path)
    return tuned


def _check_recipe(tuned: TunedFile, path: Path) -> None:
    try:
        recipe = tuned.recipe_model()
    except RecipeError as err:
        raise TunedFileError(
            err.reason, source=str(path), loc=f"recipe.{err.loc or ''}".rstrip(".")
        ) from None
    for device, rows in tuned.table.items():
        for n, entry in rows.items():
            if entry.knobs is None:
                continue
            try:
                recipe.with_knobs(entry.knobs)
            except RecipeError as err:
                raise TunedFileError(
                    err.reason, source=str(path), loc=f"table.{device}.{n}.knobs"
                ) from None


def write_tuned(path: str | Path, tuned: TunedFile) -> None:
    """Write atomically (a killed run never leaves half a file)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent or ".")
    with os.fdopen(fd, "w") as f:
        f.write(tuned.dump_yaml())
    os.replace(tmp, path)


class TunedAttention(nn.Module):
    """SDPA-compatible attention that runs, per call, the entry tuned for its device and length.

    Called like :class:`attncompose.Attention` (SDPA's signature, plus ``return_lse``); the
    dispatch policy is in this module's docstring.
    """

    def __init__(self, tuned: TunedFile, backend: str = "auto", source: str | None = None):
        super().__init__()
        self.tuned = tuned
        self.backend = backend
        self.source = source or "<tuned>"
        self.recipe = tuned.recipe_model()
        self._modules_by_key: dict[tuple, nn.Module] = {}
        self._said: set[str] = set()

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        attn_mask: Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        *,
        scale: float | None = None,
        enable_gqa: bool = False,
        return_lse: bool = False,
    ):
        check_sdpa_options(attn_mask, dropout_p)
        attn = self.select(device_name(q.device), k.shape[2], bool(is_causal))
        return attn(q, k, v, is_causal=is_causal, scale=scale, return_lse=return_lse)

    def choose(self, device: str, seq_len: int, causal: bool) -> tuple[dict | None, str | None]:
        """(knobs or None for exact, note to say once or None) for a call's device and Lk."""
        if causal != self.tuned.causal:
            mode = "causal" if self.tuned.causal else "non-causal"
            return None, f"tuned for {mode} attention only; other calls run exact attention"
        rows, note = self._rows(device)
        if not rows:
            return None, "no tuned entries; running exact attention"
        if seq_len in rows:
            return rows[seq_len].knobs, note
        above = [n for n in rows if n >= seq_len]
        if not above:
            return None, _join(
                note,
                f"length {seq_len} is above every tuned length "
                f"({max(rows)}); running exact attention",
            )
        n = min(above)
        return rows[n].knobs, _join(note, f"length {seq_len} not tuned; using the entry of {n}")

    def _rows(self, device: str) -> tuple[dict[int, TunedEntry], str | None]:
        if device in self.tuned.table:
            return self.tuned.table[device], None
        if not self.tuned.table:
            return {}, None
        other = next(iter(self.tuned.table))
        return self.tuned.table[other], f"not tuned on {device}; using the entries of {other}"

    def select(self, device: str, seq_len: int, causal: bool) -> nn.Module:
        """The compiled attention for a call (cached), saying once how it was chosen."""
        knobs, note = self.choose(device, seq_len, causal)
        if note:
            self._say(note)
        key = tuple(sorted(knobs.items())) if knobs is not None else None
        if key not in self._modules_by_key:
            from attncompose.runtime.attention import compile as compile_recipe

            recipe = "exact" if knobs is None else self.recipe.with_knobs(knobs)
            self._modules_by_key[key] = compile_recipe(recipe, backend=self.backend)
        return self._modules_by_key[key]

    def _say(self, note: str) -> None:
        message = f"{self.source}: {note}"
        if message not in self._said:
            self._said.add(message)
            log.info(message)
            warnings.warn(message, stacklevel=4)

    def extra_repr(self) -> str:
        lengths = {d: sorted(rows) for d, rows in self.tuned.table.items()}
        return f"recipe={self.recipe.name!r}, causal={self.tuned.causal}, tuned={lengths}"


def _join(*notes: str | None) -> str:
    return "; ".join(n for n in notes if n)


def load(path: str | Path, backend: str = "auto") -> TunedAttention:
    """Load a tuned recipe file as an SDPA-compatible :class:`TunedAttention` module."""
    return TunedAttention(read_tuned(path), backend=backend, source=str(path))
