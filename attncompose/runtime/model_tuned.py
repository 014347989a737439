"""Model-level tuned files: a recipe and knobs per layer (and per KV-head group) of one model.

``attncompose tune-model`` writes them; :func:`load_model_tuning` (``ac.load``) reads them as a
:class:`ModelTuning`, whose ``.layer(i)`` is an SDPA-compatible attention module for layer i,
and which :func:`attncompose.integrations.hf.register` dispatches per layer::

    format: attncompose-model-tuned/1
    model: {name: smollm2, num_layers: 30, num_q_heads: 9, num_kv_heads: 3, head_dim: 64}
    recipes: {topp: {name: topp, steps: {...}}, ...}     # every recipe a choice names
    lengths:
      4096:
        device: cpu
        cost: products
        target_err: 0.05                                # or ppl_budget: 0.02
        text: pydoc-topics
        text_sha256: ...
        segments: [{role: fit, offset: 0, exact_ppl: 10.83, ppl: 10.95, frac: 0.31}, ...]
        layers:
          0:
            errors: {fit: 0.031, check: 0.034, test: 0.036}
            frac: 0.42
            choices:                                    # one, or one per KV-head group
              - {kv_heads: [0, 1, 2], recipe: topp, knobs: {...}, errors: {...}, frac: 0.42}

Segments are parts of the calibration text (``offset`` = first token): ``fit`` is where the
trials measured error and cost, ``check`` where choices must hold too (``--target-err``) and
the perplexity budget is verified with ``fit``, ``test`` is measured only, never used to
choose. Each layer's ``errors`` are its relative output error on each segment (all heads).

Dispatch policy of a layer's attention for a call with key length ``Lk``: the entry of
``Lk``; else the nearest tuned length above (its choices stay safe: errors grow with length
at fixed knobs); else, above every tuned length, exact attention; non-causal calls run exact
attention (the model was tuned causal). Each such note is said once (per tuned length it
uses, not per length: a decode loop's key length grows at every step), as a warning at the
caller's line and in logging. A layer without choices, and a choice without a recipe, run
exact attention.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import Tensor, nn

from attncompose.primitives.base import Workspace
from attncompose.runtime.attention import compile as compile_recipe
from attncompose.runtime.checks import check_inputs, check_sdpa_options
from attncompose.runtime.files import write_text_atomic
from attncompose.runtime.tuned import (
    Cost,
    DecodeMs,
    Float,
    Int,
    KnobValue,
    SeqLen,
    TunedFileError,
    caller_stacklevel,
    check_decode_pair,
    check_unique_keys,
    decode_slower,
    validation_error,
)
from attncompose.spec.errors import RecipeError, knobs_loc
from attncompose.spec.recipe import read_yaml, validate_recipe

MODEL_FORMAT = "attncompose-model-tuned/1"
FORMAT_PREFIX = "attncompose-model-tuned/"
ROLES = ("fit", "check", "test")
INT_KEYS = (("lengths",), ("lengths", "*", "layers"))  # the integer-keyed mappings
log = logging.getLogger(__name__)


class ModelTuningError(TunedFileError):
    """A model-level tuned file that cannot be used (bad file, or a model it was not made for)."""


class ModelShape(BaseModel):
    """The model a file was tuned for; another model (layers, heads) is refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    num_layers: Int = Field(ge=1)
    num_q_heads: Int = Field(ge=1)
    num_kv_heads: Int = Field(ge=1)
    head_dim: Int = Field(ge=1)

    @classmethod
    def of(cls, config: Any, name: str) -> ModelShape:
        """The shape of a transformers model's ``config``, named ``name``."""
        heads = config.num_attention_heads
        return cls(
            name=name,
            num_layers=config.num_hidden_layers,
            num_q_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        )

    def describe(self) -> str:
        return (
            f"{self.num_layers} layers, {self.num_q_heads} query / {self.num_kv_heads} "
            f"key-value heads of dim {self.head_dim}"
        )


class Choice(BaseModel):
    """What runs for some key/value heads of a layer (each with its group of query heads):
    ``recipe`` (a key of the file's ``recipes``) with ``knobs``, or exact attention (None)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kv_heads: list[Int] = Field(min_length=1)
    recipe: str | None = None
    knobs: dict[str, KnobValue] | None = None
    errors: dict[str, Float] = Field(default_factory=dict, description="error per segment role")
    frac: Float = Field(ge=0, description="share of exact attention's products (fit segment)")
    latency_ms: Float | None = Field(None, ge=0)
    exact_latency_ms: Float | None = Field(None, ge=0)
    decode_latency_ms: DecodeMs = None  # on its heads, after the fit segment's keys
    exact_decode_latency_ms: DecodeMs = None
    trial: Int | None = Field(None, description="number of the trial in its study")

    @model_validator(mode="after")
    def _recipe_and_knobs(self) -> Choice:
        if (self.recipe is None) != (self.knobs is None):
            raise ValueError("give a recipe with its knobs, or neither (exact attention)")
        check_decode_pair(self.decode_latency_ms, self.exact_decode_latency_ms)
        return self

    @property
    def is_exact(self) -> bool:
        return self.recipe is None

    @property
    def decode_slower_than_exact(self) -> bool:
        """:func:`~attncompose.runtime.tuned.decode_slower` of this choice (decode steps
        then run exact attention on its heads)."""
        return decode_slower(self.is_exact, self.decode_latency_ms, self.exact_decode_latency_ms)

    def for_decode(self) -> Choice:
        """What a decode step runs: this choice, or exact attention on its heads where its
        decode step measured no faster."""
        if not self.decode_slower_than_exact:
            return self
        return Choice(kv_heads=self.kv_heads, frac=1.0)


class LayerTuning(BaseModel):
    """A layer's choices (one for all heads, or one per KV-head group) and what they measure."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    choices: list[Choice] = Field(min_length=1)
    errors: dict[str, Float] = Field(default_factory=dict, description="error per segment role")
    frac: Float = Field(ge=0)
    sensitivity: list[tuple[Float, Float, Float] | tuple[Float, Float]] | None = Field(
        None,
        description="measured (layer error, growth of log perplexity, its standard error over "
        "blocks of tokens) with this layer alone approximated (perplexity budget; "
        "files written before the standard error was measured hold pairs)",
    )


class Segment(BaseModel):
    """A part of the calibration text and the perplexities measured on it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Literal["fit", "check", "test"]
    offset: Int = Field(ge=0, description="first token of the segment in the text")
    exact_ppl: Float = Field(gt=0)
    ppl: Float | None = Field(None, gt=0, description="with the tuned layers (final forward)")
    frac: Float | None = Field(None, ge=0, description="share of products in that forward")


class LengthTuning(BaseModel):
    """Everything tuned for one sequence length."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    device: str
    cost: Cost
    per_head: bool
    target_err: Float | None = Field(None, gt=0)
    ppl_budget: Float | None = Field(None, gt=0)
    recipes_tried: list[str]
    trials: Int = Field(
        ge=0, description="trials per layer (x head group) x recipe, besides the model-wide ones"
    )
    shared_trials: Int = Field(
        default=0, ge=0, description="model-wide trials per recipe, each run on every layer"
    )
    text: str
    text_sha256: str
    segments: list[Segment] = Field(min_length=1)
    layers: dict[Int, LayerTuning]
    error_mean: dict[str, Float] = Field(
        default_factory=dict, description="mean per-layer error on each segment role"
    )
    frac: Float = Field(ge=0, description="share of exact attention's products, all layers")
    notes: list[str] = Field(default_factory=list)
    seconds: dict[str, Float] = Field(default_factory=dict, description="wall time per phase")
    date: str
    versions: dict[str, str]

    @model_validator(mode="after")
    def _one_goal(self) -> LengthTuning:
        if (self.target_err is None) == (self.ppl_budget is None):
            raise ValueError("give either target_err or ppl_budget")
        return self

    def segment(self, role: str) -> Segment | None:
        return next((s for s in self.segments if s.role == role), None)


class ModelTunedFile(BaseModel):
    """A model-level tuned file: the model's shape, the recipes used, per length the layers."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["attncompose-model-tuned/1"] = MODEL_FORMAT
    model: ModelShape
    recipes: dict[str, dict[str, Any]] = Field(default_factory=dict)
    lengths: dict[SeqLen, LengthTuning] = Field(default_factory=dict)

    def with_length(
        self, seq_len: int, entry: LengthTuning, recipes: dict[str, dict]
    ) -> ModelTunedFile:
        """A copy with ``entry`` for ``seq_len`` and ``recipes`` added."""
        return self.model_copy(
            update={
                "lengths": {**self.lengths, seq_len: entry},
                "recipes": {**self.recipes, **recipes},
            }
        )

    def dump_yaml(self) -> str:
        """The file's YAML text."""
        data = self.model_dump(mode="json", exclude_none=True)
        data["lengths"] = {  # integer keys, as written by hand
            int(n): {**e, "layers": {int(i): lt for i, lt in e["layers"].items()}}
            for n, e in data["lengths"].items()
        }
        return yaml.safe_dump(data, sort_keys=False)


def is_model_tuned(data: Any) -> bool:
    """Whether parsed YAML claims to be a model-level tuned file."""
    return isinstance(data, dict) and str(data.get("format", "")).startswith(FORMAT_PREFIX)


def read_model_tuned(path: str | Path) -> ModelTunedFile:
    """Parse and check a model-level tuned file; every problem is a :class:`ModelTuningError`."""
    path = Path(path)
    try:
        data = read_yaml(path)
    except RecipeError as err:
        raise ModelTuningError(err.reason, source=err.source or str(path)) from None
    if not is_model_tuned(data):
        raise ModelTuningError(f"not a model-level tuned file ({MODEL_FORMAT})", source=str(path))
    check_unique_keys(path, ModelTuningError, int_keys=INT_KEYS)
    try:
        tuned = ModelTunedFile.model_validate(data)
    except ValidationError as err:
        loc, msg = validation_error(err)
        raise ModelTuningError(msg, source=str(path), loc=loc or None) from None
    _check_consistent(tuned, str(path))
    return tuned


def _check_consistent(tuned: ModelTunedFile, source: str) -> None:
    """Recipes valid, every choice's recipe and knobs known, layers and heads in range."""
    recipes = {}
    for name, data in tuned.recipes.items():
        try:
            recipes[name] = validate_recipe(data, source=f"recipes.{name}")
        except RecipeError as err:
            raise ModelTuningError(err.reason, source=source, loc=f"recipes.{name}") from None
    shape = tuned.model
    for n, entry in tuned.lengths.items():
        for i, layer in entry.layers.items():
            where = f"lengths.{n}.layers.{i}"
            if not 0 <= i < shape.num_layers:
                raise ModelTuningError(
                    f"layer {i} is outside the model's {shape.num_layers} layers",
                    source=source,
                    loc=where,
                )
            heads = sorted(h for c in layer.choices for h in c.kv_heads)
            if heads != list(range(shape.num_kv_heads)):
                raise ModelTuningError(
                    f"choices must cover key/value heads 0..{shape.num_kv_heads - 1} once each, "
                    f"got {heads}",
                    source=source,
                    loc=where,
                )
            for j, choice in enumerate(layer.choices):
                if choice.is_exact:
                    continue
                if choice.recipe not in recipes:
                    raise ModelTuningError(
                        f"recipe {choice.recipe!r} is not in the file's recipes",
                        source=source,
                        loc=f"{where}.choices.{j}.recipe",
                    )
                try:
                    recipes[choice.recipe].with_knobs(choice.knobs)
                except RecipeError as err:
                    raise ModelTuningError(
                        err.reason, source=source, loc=knobs_loc(f"{where}.choices.{j}", err)
                    ) from None


def write_model_tuned(path: str | Path, tuned: ModelTunedFile) -> None:
    """Write atomically (a killed run never leaves half a file), with the permissions of any
    new file (the temporary file's were private: 0600)."""
    write_text_atomic(path, tuned.dump_yaml())


class ModelTuning:
    """The attention of every layer of one model, as a model-level tuned file chose it.

    ``layer(i)`` is layer i's SDPA-compatible module (:class:`LayerAttention`; exact attention
    where nothing was tuned); ``check_model(config)`` refuses a model of another shape. The
    compiled modules share one :class:`~attncompose.primitives.base.Workspace` (a model runs
    its layers one after another): the buffers held between calls are one module's, not one
    set per distinct choice (with those, tune-model's verify phase at 8192 tokens held 17.8 GB
    of memory; shared, 4.6 GB). ``release_memory()`` drops them, and any CUDA graphs.
    """

    def __init__(
        self,
        tuned: ModelTunedFile,
        backend: str = "auto",
        source: str | None = None,
        cuda_graphs: bool = False,
        decode_fallback: bool = True,
        check_finite: bool = True,
    ):
        self.tuned = tuned
        self.backend = backend
        self.cuda_graphs = cuda_graphs  # each compiled choice captures a graph per call shape
        # a call's NaN/Inf pass, made by LayerAttention over all heads: not again per choice
        self.check_finite = check_finite
        # a decode step runs exact attention on the heads whose choice's measured no faster
        self.decode_fallback = decode_fallback
        self.source = source or "<model tuning>"
        self.recipes = {
            name: validate_recipe(data, source=name) for name, data in tuned.recipes.items()
        }
        self._layers: dict[int, LayerAttention] = {}
        self._modules: dict[tuple, nn.Module] = {}
        self.workspace = Workspace()
        self._said: set[tuple] = set()
        self._checked: set[int] = set()

    @property
    def name(self) -> str:
        """How reports name it: the model and the file."""
        return f"per-layer tuning of {self.tuned.model.name} ({Path(self.source).name})"

    @property
    def num_layers(self) -> int:
        return self.tuned.model.num_layers

    def layer(self, index: int) -> LayerAttention:
        """The attention module of layer ``index`` (cached)."""
        if not 0 <= index < self.num_layers:
            raise ModelTuningError(
                f"no layer {index}: tuned for {self.tuned.model.name} with "
                f"{self.num_layers} layers",
                source=self.source,
            )
        if index not in self._layers:
            self._layers[index] = LayerAttention(self, index)
        return self._layers[index]

    def check_model(self, config: Any) -> None:
        """Raise :class:`ModelTuningError` unless a transformers ``config`` has this file's
        layers and heads."""
        if id(config) in self._checked:
            return
        shape = self.tuned.model
        have = ModelShape.of(config, getattr(config, "model_type", "?"))
        if have.model_dump(exclude={"name"}) != shape.model_dump(exclude={"name"}):
            raise ModelTuningError(
                f"tuned for {shape.name} ({shape.describe()}); this model has {have.describe()}",
                source=self.source,
            )
        self._checked.add(id(config))

    def check_card(self, card: Any) -> None:
        """Refuse, before the model is loaded, a model card (:class:`~attncompose.models.card.
        ModelCard`) whose layer or key/value head counts differ from this file's."""
        shape = self.tuned.model
        if (card.layers, card.kv_heads) != (shape.num_layers, shape.num_kv_heads):
            raise ModelTuningError(
                f"tuned for {shape.name} ({shape.describe()}); {card.name} has {card.layers} "
                f"layers, {card.kv_heads} key-value heads",
                source=self.source,
            )

    def choose(
        self, index: int, seq_len: int, causal: bool, decode: bool = False
    ) -> tuple[list[Choice], tuple[tuple[tuple, str], ...]]:
        """Layer ``index``'s choices for a call with ``seq_len`` keys ([] = exact attention),
        and the notes on how they were chosen, each (key, words): said once per key, so a
        decode loop, whose key length grows at every step, hears each once. ``decode``: the
        call is a decode step (one query after the keys): with ``decode_fallback``, choices
        whose decode step measured no faster than exact attention's run exact attention."""
        if not causal:
            note = "tuned for causal attention only; non-causal calls run exact attention"
            return [], ((("mode",), note),)
        lengths = self.tuned.lengths
        if not lengths:
            return [], ((("empty",), "no tuned lengths; running exact attention"),)
        notes: tuple[tuple[tuple, str], ...] = ()
        n = seq_len
        if n not in lengths:
            above = [m for m in lengths if m >= seq_len]
            if not above:
                note = (
                    f"length {seq_len} is above every tuned length ({max(lengths)}); running "
                    "exact attention for such lengths"
                )
                return [], ((("above",), note),)
            n = min(above)
            note = (
                f"length {seq_len} not tuned; using the choices of {n} (for every untuned "
                "length it covers, said once)"
            )
            notes = ((("nearest", n), note),)
        layer = lengths[n].layers.get(index)
        choices = [] if layer is None else layer.choices
        if decode and self.decode_fallback and any(c.decode_slower_than_exact for c in choices):
            choices = [c.for_decode() for c in choices]
            if all(c.is_exact for c in choices):
                choices = []
            note = (
                f"decode steps run exact attention on the heads whose choice's decode step "
                f"measured no faster than exact attention's where tuned ({n} tokens)"
            )
            notes = (*notes, (("decode", n), note))
        return choices, notes

    def module(self, choice: Choice | None) -> nn.Module:
        """The compiled attention of a choice (cached); exact attention for None or exact. It
        makes no NaN/Inf pass (:class:`LayerAttention` makes the call's one)."""
        key = None if choice is None or choice.is_exact else (choice.recipe, _key(choice.knobs))
        if key not in self._modules:
            recipe = (
                "exact" if key is None else self.recipes[choice.recipe].with_knobs(choice.knobs)
            )
            module = compile_recipe(
                recipe, backend=self.backend, cuda_graphs=self.cuda_graphs, check_finite=False
            )
            if module.workspace is not None and module.graphs is None:  # graphs keep addresses
                module.workspace = self.workspace
            self._modules[key] = module
        return self._modules[key]

    def release_memory(self) -> None:
        """Drop what the compiled choices of every layer hold between calls (the shared
        workspace's buffers, CUDA graphs); later calls make them again."""
        self.workspace.clear()
        for module in self._modules.values():
            module.release_memory()

    def say(self, key: tuple, note: str) -> None:
        """Say ``note`` once per ``key`` (a warning at the caller's line, and logging)."""
        if key in self._said:
            return
        self._said.add(key)
        message = f"{self.source}: {note}"
        log.info(message)
        warnings.warn(message, stacklevel=caller_stacklevel())

    def __repr__(self) -> str:
        lengths = sorted(self.tuned.lengths)
        return f"ModelTuning({self.source!r}, model={self.tuned.model.name!r}, lengths={lengths})"


def _key(knobs: dict[str, Any]) -> tuple:
    return tuple(sorted(knobs.items()))


class LayerAttention(nn.Module):
    """One layer's tuned attention: SDPA's signature (plus ``return_lse``), q [B, Hq, Lq, D],
    k/v [B, Hkv, Lk, D]. Each choice runs on its key/value heads and their query heads."""

    def __init__(self, tuning: ModelTuning, index: int):
        super().__init__()
        self.tuning = tuning
        self.index = index

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
        # before the shapes choose; one NaN/Inf pass over all heads, not one per head group
        check_inputs(q, k, v, is_causal, self.tuning.check_finite)
        decode = bool(is_causal) and q.shape[2] == 1 and k.shape[2] > 1
        choices, notes = self.tuning.choose(self.index, k.shape[2], bool(is_causal), decode)
        for key, note in notes:
            self.tuning.say(key, note)
        kwargs = {"is_causal": is_causal, "scale": scale, "return_lse": return_lse}
        if len(choices) <= 1:
            return self.tuning.module(choices[0] if choices else None)(q, k, v, **kwargs)
        self._check_heads(q, k)
        group = q.shape[1] // k.shape[1]
        parts = [None] * k.shape[1]
        for choice in choices:
            kv = choice.kv_heads
            qh = [h * group + i for h in kv for i in range(group)]
            out = self.tuning.module(choice)(q[:, qh], k[:, kv], v[:, kv], **kwargs)
            for j, h in enumerate(kv):
                parts[h] = _heads(out, j * group, group, return_lse)
        if return_lse:
            return tuple(torch.cat([p[i] for p in parts], dim=1) for i in range(2))
        return torch.cat(parts, dim=1)

    def _check_heads(self, q: Tensor, k: Tensor) -> None:
        shape = self.tuning.tuned.model
        if (q.shape[1], k.shape[1]) != (shape.num_q_heads, shape.num_kv_heads):
            raise ModelTuningError(
                f"layer {self.index} is tuned per head group for {shape.num_q_heads} query / "
                f"{shape.num_kv_heads} key-value heads, got {q.shape[1]} / {k.shape[1]}",
                source=self.tuning.source,
            )

    def release_memory(self) -> None:
        """:meth:`ModelTuning.release_memory`: the layers share their tuning's modules."""
        self.tuning.release_memory()

    def extra_repr(self) -> str:
        return f"layer={self.index}, source={self.tuning.source!r}"


def _heads(out: Any, start: int, count: int, with_lse: bool) -> Any:
    """Query heads ``start:start+count`` of an output (and its lse)."""
    if with_lse:
        o, lse = out
        return o[:, start : start + count], lse[:, start : start + count]
    return out[:, start : start + count]


def load_model_tuning(
    path: str | Path,
    backend: str = "auto",
    cuda_graphs: bool = False,
    decode_fallback: bool = True,
    check_finite: bool = True,
) -> ModelTuning:
    """Load a model-level tuned file as a :class:`ModelTuning` (``cuda_graphs``: its compiled
    choices capture a CUDA graph per call shape; ``decode_fallback``: see
    :meth:`ModelTuning.choose`; ``check_finite=False``: no NaN/Inf pass over the inputs)."""
    return ModelTuning(
        read_model_tuned(path),
        backend=backend,
        source=str(path),
        cuda_graphs=cuda_graphs,
        decode_fallback=decode_fallback,
        check_finite=check_finite,
    )
