"""Tuned recipe files and the attention module that dispatches on them.

A tuned file holds the recipes it came from (one or several, compared by one tuning run) and
a table keyed by device name (``torch.cuda.get_device_name()`` or ``cpu``) and sequence
length. Each entry names the recipe and knobs chosen for that length (or none: exact
attention, with the reason), the measured error (mean and max over seeds), latency, frac and
exact latency, and what every recipe reached there (its cheapest feasible point, its least
error, why it was not chosen), with trials, target, library versions and date::

    format: attncompose-tuned/2
    causal: true
    recipes: {topp: {name: topp, steps: {...}}, streaming: {...}}
    table:
      cpu:
        4096:
          recipe: streaming
          knobs: {sinks.count: 4, local.width: 1024}
          error_mean: 0.031, ..., latency_ms: 30.2, frac: 0.44, exact_latency_ms: 51.5
          recipes:
            streaming: {best: {...}, least_error: 0.02, trials: 8}
            topp: {best: {...}, least_error: 0.01, trials: 8, lost: slower than exact ...}

Files of the first format (``attncompose-tuned/1``: one ``recipe``, each entry with its
``best``) are read as a one-recipe file of this format.

Dispatch policy of :class:`TunedAttention` for a call with key length ``Lk`` on a device:
1. entries of this device; with none, those of another device in the file (said once);
2. the entry of length ``Lk``; else the nearest tuned length above ``Lk`` (at fixed knobs an
   approximation's error grows with length, so a longer length's choice stays safe); else,
   above every tuned length, exact attention;
3. a call in the other masking mode than the one tuned (causal vs non-causal) runs exact
   attention;
4. a decode step (one query after the keys, causal) runs exact attention where the entry
   measured the choice's decode step no faster than exact attention's (``decode_latency_ms``
   and ``exact_decode_latency_ms``, timed by the tuner; files without them: the choice), so a
   choice that wins at prefill does not slow generation down; ``decode_fallback=False``
   keeps the choice at every step (e.g. to measure the approximation's effect on generated
   text).
Each kind of note is said once (a warning at the caller's line, and logging): once per
entry used for untuned lengths, not once per length (a decode loop changes length at every
step).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    model_validator,
)
from torch import Tensor, nn

from attncompose.runtime.attention import compile as compile_recipe
from attncompose.runtime.checks import check_inputs, check_sdpa_options
from attncompose.runtime.compiler import BACKENDS
from attncompose.runtime.files import write_text_atomic
from attncompose.runtime.naming import device_name, format_ms  # device_name: the table key
from attncompose.spec.errors import RecipeError, format_loc, knobs_loc, plain_error
from attncompose.spec.recipe import read_yaml, validate_recipe

FORMAT = "attncompose-tuned/2"
LossKind = Literal["target", "budget", "frac 1", "exact faster", "beaten"]
FORMAT_V1 = "attncompose-tuned/1"
log = logging.getLogger(__name__)


BACKEND_KNOB = "backend"  # tune --backends: the trial parameter naming the implementation
COSTS = ("latency", "products")  # what a tuning minimises (tune --cost)
Cost = Literal[COSTS]
Backend = Literal[BACKENDS]


def no_bool(expected: str) -> BeforeValidator:
    """Refuse a boolean where ``expected`` goes: pydantic reads YAML's true as the integer 1
    (a knob set to true ran as 1; a choice's kv_heads [true, false] as [1, 0])."""

    def check(value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError(f"expected {expected}, got {value!r}")
        return value

    return BeforeValidator(check)


Int = Annotated[int, no_bool("an integer")]  # a file's integer ("64" as a JSON key too)
Float = Annotated[float, no_bool("a number")]  # a file's number (true read as 1.0)
_INT_KEY = TypeAdapter(Int)
KnobValue = Annotated[int | float | str, no_bool("a number or a name")]
SeqLen = Annotated[Int, Field(ge=1, description="a tuned sequence length")]


def split_backend(params: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """(the recipe's knobs, the backend or None) of a trial's parameters: with ``tune
    --backends`` the implementation is a tunable choice beside the recipe's knobs."""
    rest = {k: v for k, v in params.items() if k != BACKEND_KNOB}
    return rest, params.get(BACKEND_KNOB)


# a decode step (the last query after the tuned length's keys) of a choice, and exact
# attention's, timed by the tuner: decode steps run exact attention where the choice's is no
# faster (:func:`decode_slower`); None in both where not measured (exact attention chosen, a
# non-causal tuning, a file from before)
DecodeMs = Annotated[Float | None, Field(ge=0, description="ms of one decode step")]


def check_decode_pair(decode_ms: float | None, exact_ms: float | None) -> None:
    """Raise ValueError unless both decode timings are given, or neither."""
    if (decode_ms is None) != (exact_ms is None):
        raise ValueError("give decode_latency_ms with exact_decode_latency_ms, or neither")


def decode_slower(is_exact: bool, decode_ms: float | None, exact_ms: float | None) -> bool:
    """Whether an approximate choice's decode step measured no faster than exact attention's
    (its decode steps then run exact attention: as fast or faster, and exact)."""
    return not is_exact and decode_ms is not None and decode_ms >= exact_ms


class TunedFileError(RecipeError):
    """A tuned file that cannot be used: names the file, the field and the problem."""


class Candidate(BaseModel):
    """An approximation measured by the tuner: knobs, error over seeds, latency, frac."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    knobs: dict[str, KnobValue]
    backend: Backend | None = Field(
        None, description="the implementation tuned with tune --backends"
    )
    error_mean: Float = Field(ge=0)
    error_max: Float = Field(ge=0)
    latency_ms: Float = Field(ge=0)
    frac: Float | None = Field(None, ge=0, description="share of exact attention's products")

    @property
    def params(self) -> dict[str, Any]:
        """The trial parameters of this point: its knobs, and its backend if one was tuned."""
        return self.knobs if self.backend is None else {**self.knobs, BACKEND_KNOB: self.backend}


class RecipeOutcome(BaseModel):
    """What one recipe reached at one (device, length).

    ``best``: its cheapest point that meets the target (and the latency budget) while
    computing fewer products than exact attention, or None; ``least_error``: the least mean
    error its trials computing fewer products reached; ``lost``: why it was not chosen (None:
    it was), ``lost_as`` the kind: error target not met, over the latency budget, only
    frac-1 knobs met it, exact attention faster, beaten by another recipe.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    best: Candidate | None = None
    least_error: Float | None = Field(None, ge=0)
    trials: Int = Field(ge=0)
    seeds: Int = Field(1, ge=1)
    lost: str | None = None
    lost_as: LossKind | None = Field(None, description="the kind of ``lost``, for tables")


class TunedEntry(BaseModel):
    """The choice for one (device, length): ``recipe`` and ``knobs`` to apply, or None for
    exact attention (``fallback`` says why).

    ``error_*``, ``latency_ms`` and ``frac`` describe what is chosen (0 error and frac 1 for
    exact attention); ``note`` says what a user of the choice should know (e.g. chosen for
    its products but slower than exact attention on this device); ``recipes`` holds what
    each recipe of the run reached, kept whether or not it was chosen.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    recipe: str | None = None
    knobs: dict[str, KnobValue] | None = None
    backend: Backend | None = Field(
        None, description="the implementation tuned with tune --backends"
    )
    fallback: str | None = Field(None, description="why exact attention is used")
    note: str | None = None
    error_mean: Float = Field(ge=0)
    error_max: Float = Field(ge=0)
    latency_ms: Float = Field(ge=0)
    frac: Float | None = Field(None, ge=0, description="share of exact attention's products")
    exact_latency_ms: Float = Field(ge=0)
    decode_latency_ms: DecodeMs = None  # see DecodeMs
    exact_decode_latency_ms: DecodeMs = None
    recipes: dict[str, RecipeOutcome] = {}
    trials: Int = Field(ge=0)
    target_err: Float = Field(gt=0)
    latency_budget_ms: Float | None = Field(None, gt=0)
    cost: Cost = Field("latency", description="what the tuner minimised: latency or products")
    seeds: Int = Field(ge=1)
    data: str
    date: str
    versions: dict[str, str]

    @model_validator(mode="after")
    def _knobs_or_reason(self) -> TunedEntry:
        if (self.knobs is None) != (self.fallback is not None):
            raise ValueError("give either knobs or a fallback reason (exact attention), not both")
        if (self.knobs is None) != (self.recipe is None):
            raise ValueError("knobs need the recipe they apply to (and exact attention none)")
        check_decode_pair(self.decode_latency_ms, self.exact_decode_latency_ms)
        return self

    @property
    def is_exact(self) -> bool:
        return self.knobs is None

    @property
    def slower_than_exact(self) -> bool:
        """Whether the chosen approximation measured slower than exact attention."""
        return not self.is_exact and self.latency_ms > self.exact_latency_ms

    @property
    def decode_slower_than_exact(self) -> bool:
        """:func:`decode_slower` of this entry."""
        return decode_slower(self.is_exact, self.decode_latency_ms, self.exact_decode_latency_ms)


class TunedFile(BaseModel):
    """Tuned recipes: the recipes by name, the masking mode tuned, the (device, length)
    table, and how each recipe was named when tuned (``sources``: built-in name or path)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["attncompose-tuned/2"] = FORMAT
    causal: bool
    recipes: dict[str, dict[str, Any]]
    sources: dict[str, str] = {}
    table: dict[str, dict[SeqLen, TunedEntry]] = {}

    def recipe_model(self, name: str | None = None):
        """The validated recipe ``name`` (default: the only one; errors name the field)."""
        if name is None:
            if len(self.recipes) != 1:
                raise TunedFileError(f"holds {len(self.recipes)} recipes; name one")
            name = next(iter(self.recipes))
        return validate_recipe(self.recipes[name], source=f"recipes.{name}")

    @property
    def name(self) -> str:
        """The recipes' names joined by '+' (one recipe: its name)."""
        return "+".join(self.recipes)

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
    """Parse and check a tuned file (either format); every problem is a :class:`TunedFileError`."""
    path = Path(path)
    try:
        data = read_yaml(path)
    except RecipeError as err:
        raise TunedFileError(err.reason, source=err.source or str(path)) from None
    if not isinstance(data, dict):
        raise TunedFileError(
            f"a tuned file is a mapping, got {type(data).__name__}", source=str(path)
        )
    check_unique_keys(path, TunedFileError, int_keys=(("table", "*"),))
    if "table" not in data and "steps" in data:
        raise TunedFileError(
            "this is a recipe, not a tuned file (run `attncompose tune`)", source=str(path)
        )
    fmt = data.get("format", FORMAT)
    if fmt == FORMAT_V1:
        data = migrate_v1(data)
    elif fmt != FORMAT:
        raise TunedFileError(
            f"unknown tuned-file format {fmt!r}: this attncompose reads {FORMAT} and {FORMAT_V1}",
            source=str(path),
            loc="format",
        )
    try:
        tuned = TunedFile.model_validate(data)
    except ValidationError as err:
        loc, msg = validation_error(err)
        raise TunedFileError(msg, source=str(path), loc=loc or None) from None
    _check_recipes(tuned, path)
    return tuned


def validation_error(err: ValidationError) -> tuple[str, str]:
    """:func:`plain_error` of a tuned file's validation: a bad length names its row
    (``table.cpu.-5``), not pydantic's ``table.cpu.-5.[key]``."""
    loc, msg = plain_error(err)
    return loc.removesuffix(".[key]"), msg


def check_unique_keys(
    path: Path, error: type[TunedFileError], int_keys: tuple[tuple[str, ...], ...] = ()
) -> None:
    """Raise ``error`` naming the field if a mapping of the (readable, parsed) YAML file
    lists a key twice: as YAML reads keys (64 and 0x40: it keeps the last silently), and in
    the mappings ``int_keys`` places (``"*"``: any key) as the schema reads them (64, '64'
    and 64.0 are one length: one entry was lost silently)."""
    stack = [((), yaml.compose(path.read_text(), Loader=yaml.SafeLoader))]
    seen = set()  # aliases share nodes (and may loop)
    while stack:
        loc, node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            stack.extend(((*loc, i), item) for i, item in enumerate(node.value))
        elif isinstance(node, yaml.MappingNode):
            as_int = any(_place_matches(loc, place) for place in int_keys)
            keys: dict[Any, yaml.ScalarNode] = {}
            for key, value in node.value:
                if not isinstance(key, yaml.ScalarNode):
                    continue  # not a key the schema takes (validation says so)
                read = _read_key(key, as_int)
                if read in keys:
                    name = read if as_int else key.value  # 64 for '64' and 64.0
                    raise error(
                        _twice(keys[read], key), source=str(path), loc=format_loc((*loc, name))
                    )
                keys[read] = key
                stack.append(((*loc, key.value), value))


def _place_matches(loc: tuple, place: tuple[str, ...]) -> bool:
    if len(loc) != len(place):
        return False
    return all(p in ("*", str(part)) for part, p in zip(loc, place, strict=True))


def _read_key(key: yaml.ScalarNode, as_int: bool) -> Any:
    """A key as YAML reads it and, ``as_int``, as the schema's integer keys do ('64' -> 64)."""
    read = yaml.constructor.SafeConstructor().construct_object(key)
    if as_int:
        with contextlib.suppress(ValidationError):
            return _INT_KEY.validate_python(read)
    return read


def _twice(first: yaml.ScalarNode, second: yaml.ScalarNode) -> str:
    written = [_written(first), _written(second)]
    if written[0] == written[1]:
        return "listed twice (YAML would keep the last silently)"
    return f"listed twice, as {written[0]} and {written[1]} (one entry would be lost silently)"


def _written(key: yaml.ScalarNode) -> str:
    quote = key.style if key.style in ("'", '"') else ""
    return f"{quote}{key.value}{quote}"


def migrate_v1(data: dict[str, Any]) -> dict[str, Any]:
    """A parsed ``attncompose-tuned/1`` mapping as the current format: its one recipe, each
    entry's ``best`` as that recipe's outcome. Malformed parts are left for validation."""
    recipe = data.get("recipe")
    name = recipe.get("name") if isinstance(recipe, dict) else None
    if not isinstance(name, str):
        raise TunedFileError(f"field required (a {FORMAT_V1} file names its recipe)", loc="recipe")
    out = {k: v for k, v in data.items() if k not in ("recipe", "source", "format")}
    out.update(format=FORMAT, recipes={name: recipe})
    if isinstance(data.get("source"), str):
        out["sources"] = {name: data["source"]}
    table = data.get("table")
    if isinstance(table, dict):
        out["table"] = {
            device: {n: _migrate_entry(e, name) for n, e in rows.items()}
            if isinstance(rows, dict)
            else rows
            for device, rows in table.items()
        }
    return out


def _migrate_entry(entry: Any, name: str) -> Any:
    if not isinstance(entry, dict):
        return entry
    entry = dict(entry)
    best = entry.pop("best", None)
    outcome = {"best": best, "trials": entry.get("trials", 0), "lost": entry.get("fallback")}
    entry["recipes"] = {name: {k: v for k, v in outcome.items() if v is not None}}
    if entry.get("knobs") is not None:
        entry["recipe"] = name
    return entry


def _check_recipes(tuned: TunedFile, path: Path) -> None:
    recipes = {}
    for name in tuned.recipes:
        try:
            recipes[name] = tuned.recipe_model(name)
        except RecipeError as err:
            raise TunedFileError(
                err.reason, source=str(path), loc=f"{err.source}.{err.loc or ''}".rstrip(".")
            ) from None
    for device, rows in tuned.table.items():
        for n, entry in rows.items():
            where = f"table.{device}.{n}"
            if entry.knobs is None:
                continue
            if entry.recipe not in recipes:
                raise TunedFileError(
                    f"names recipe {entry.recipe!r}; the file holds {sorted(recipes)}",
                    source=str(path),
                    loc=f"{where}.recipe",
                )
            try:
                recipes[entry.recipe].with_knobs(entry.knobs)
            except RecipeError as err:
                loc = knobs_loc(where, err)
                raise TunedFileError(err.reason, source=str(path), loc=loc) from None


def write_tuned(path: str | Path, tuned: TunedFile) -> None:
    """Write atomically (a killed run never leaves half a file), with the permissions of any
    new file."""
    write_text_atomic(path, tuned.dump_yaml())


@dataclass(frozen=True)
class Choice:
    """What a call runs: ``recipe`` and ``knobs`` (None: exact attention), the entry's
    (device, length) if one was used, and notes to say once each, keyed by kind."""

    recipe: str | None
    knobs: dict | None
    entry: tuple[str, int] | None = None
    notes: tuple[tuple[tuple, str], ...] = ()
    backend: str | None = None  # the implementation the tuner chose (tune --backends)


class TunedAttention(nn.Module):
    """SDPA-compatible attention that runs, per call, the entry tuned for its device and length.

    Called like :class:`attncompose.Attention` (SDPA's signature, plus ``return_lse``):
    q [B, Hq, Lq, D], k/v [B, Hkv, Lk, D] -> [B, Hq, Lq, D]; the dispatch policy is in this
    module's docstring. ``release_memory()`` drops the buffers and graphs its compiled entries
    hold between calls.
    """

    def __init__(
        self,
        tuned: TunedFile,
        backend: str = "auto",
        source: str | None = None,
        cuda_graphs: bool = False,
        decode_fallback: bool = True,
        check_finite: bool = True,
    ):
        super().__init__()
        self.tuned = tuned
        self.backend = backend
        self.cuda_graphs = cuda_graphs  # each compiled entry captures a graph per call shape
        self.check_finite = check_finite  # a call's NaN/Inf pass, made here: not again per entry
        self.decode_fallback = decode_fallback  # policy 4 of the module docstring
        self.source = source or "<tuned>"
        self.recipes = {name: tuned.recipe_model(name) for name in tuned.recipes}
        self._modules_by_key: dict[tuple, nn.Module] = {}
        self._said: set[tuple] = set()

    @property
    def recipe(self):
        """The recipe of a one-recipe file (several: the first; see ``recipes``)."""
        return next(iter(self.recipes.values()))

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
        check_sdpa_options(attn_mask, dropout_p, scale)
        check_inputs(q, k, v, is_causal, self.check_finite)  # before the shapes choose
        decode = bool(is_causal) and q.shape[2] == 1 and k.shape[2] > 1
        attn = self.select(device_name(q.device), k.shape[2], bool(is_causal), decode)
        return attn(q, k, v, is_causal=is_causal, scale=scale, return_lse=return_lse)

    def choose(self, device: str, seq_len: int, causal: bool, decode: bool = False) -> Choice:
        """The recipe and knobs (None: exact) for a call's device and key length, with notes;
        ``decode``: the call is a decode step (one query after the keys)."""
        if causal != self.tuned.causal:
            mode = "causal" if self.tuned.causal else "non-causal"
            note = f"tuned for {mode} attention only; other calls run exact attention"
            return Choice(None, None, notes=((("mode",), note),))
        rows, notes = self._rows(device)
        if not rows:
            note = "no tuned entries; running exact attention"
            return Choice(None, None, notes=(*notes, (("empty",), note)))
        if seq_len in rows:
            n = seq_len
        else:
            above = [n for n in rows if n >= seq_len]
            if not above:
                note = (
                    f"length {seq_len} is above every tuned length ({max(rows)}); running "
                    "exact attention for such lengths"
                )
                return Choice(None, None, notes=(*notes, (("above", device), note)))
            n = min(above)
            note = (
                f"length {seq_len} is not tuned; using the entry of {n} "
                f"(for every untuned length it covers, said once)"
            )
            notes = (*notes, (("nearest", device, n), note))
        entry = rows[n]
        if entry.slower_than_exact:
            frac = "" if entry.frac is None else f", frac {entry.frac:.3g}"
            note = (
                f"the entry of {n} ({entry.recipe}) measured slower than exact attention "
                f"({format_ms(entry.latency_ms)} ms vs {format_ms(entry.exact_latency_ms)} ms): "
                f"it was tuned to minimise {entry.cost}{frac}"
            )
            notes = (*notes, (("slower", device, n), note))
        if decode and self.decode_fallback and entry.decode_slower_than_exact:
            note = (
                f"decode steps at the entry of {n} run exact attention: {entry.recipe}'s decode "
                f"step measured {format_ms(entry.decode_latency_ms)} ms vs exact attention's "
                f"{format_ms(entry.exact_decode_latency_ms)} ms where tuned"
            )
            return Choice(None, None, (device, n), (*notes, (("decode", device, n), note)))
        # the implementation an entry chose is its device's: elsewhere, the module's backend
        # (a GPU tuning's triton refused every call of a CPU; found by fuzzing)
        backend = entry.backend if device in self.tuned.table else None
        return Choice(entry.recipe, entry.knobs, (device, n), notes, backend)

    def _rows(self, device: str) -> tuple[dict[int, TunedEntry], tuple]:
        if device in self.tuned.table:
            return self.tuned.table[device], ()
        if not self.tuned.table:
            return {}, ()
        other = next(iter(self.tuned.table))
        note = f"not tuned on {device}; using the entries of {other}"
        return self.tuned.table[other], ((("device", device), note),)

    def select(self, device: str, seq_len: int, causal: bool, decode: bool = False) -> nn.Module:
        """The compiled attention for a call (cached), saying once each note on its choice;
        it makes no NaN/Inf pass (:meth:`forward` makes the call's one)."""
        choice = self.choose(device, seq_len, causal, decode)
        for key, note in choice.notes:
            self._say(key, note)
        key = (choice.recipe, tuple(sorted((choice.knobs or {}).items())), choice.backend)
        if key not in self._modules_by_key:
            recipe = (
                "exact"
                if choice.knobs is None
                else self.recipes[choice.recipe].with_knobs(choice.knobs)
            )
            backend = choice.backend or self.backend
            self._modules_by_key[key] = compile_recipe(
                recipe, backend=backend, cuda_graphs=self.cuda_graphs, check_finite=False
            )
        return self._modules_by_key[key]

    def release_memory(self) -> None:
        """Drop what every compiled entry holds between calls (its reused buffers and CUDA
        graphs: :meth:`~attncompose.runtime.attention.Attention.release_memory`); later calls
        make them again."""
        for module in self._modules_by_key.values():
            module.release_memory()

    def _say(self, key: tuple, note: str) -> None:
        if key in self._said:
            return
        self._said.add(key)
        message = f"{self.source}: {note}"
        log.info(message)
        warnings.warn(message, stacklevel=caller_stacklevel())

    def extra_repr(self) -> str:
        lengths = {d: sorted(rows) for d, rows in self.tuned.table.items()}
        return f"recipes={list(self.recipes)}, causal={self.tuned.causal}, tuned={lengths}"


def caller_stacklevel() -> int:
    """``stacklevel`` for a warning raised by the caller that points at the first frame outside
    torch, transformers and attncompose: the user's line, not ``torch/nn/modules/module.py``."""
    skip = tuple(
        os.path.dirname(sys.modules[name].__file__) + os.sep
        for name in ("torch", "transformers", "attncompose")
        if getattr(sys.modules.get(name), "__file__", None)
    )
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(skip):
        frame, level = frame.f_back, level + 1
    return level


def load(
    path: str | Path,
    backend: str = "auto",
    cuda_graphs: bool = False,
    decode_fallback: bool = True,
    check_finite: bool = True,
) -> TunedAttention:
    """Load a tuned recipe file as an SDPA-compatible :class:`TunedAttention` module
    (``cuda_graphs``: its compiled entries capture a CUDA graph per call shape;
    ``decode_fallback=False``: decode steps run the choice even where the tuner measured
    exact attention's faster, see the module docstring; ``check_finite=False``: no NaN/Inf
    pass over the inputs, as :class:`~attncompose.runtime.attention.Attention`)."""
    return TunedAttention(
        read_tuned(path),
        backend=backend,
        source=str(path),
        cuda_graphs=cuda_graphs,
        decode_fallback=decode_fallback,
        check_finite=check_finite,
    )
