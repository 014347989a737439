"""Every kind of user mistake, in one table: a bad recipe, bad tensors, a bad tuned file, a
bad storage URL, bad command-line arguments. Each must be refused with one clear line naming
what is wrong: the library's error class, or exit status 2 and one ``error: ...`` line on the
command line; never a traceback, an out-of-memory kill, a hang or a silently wrong result.

A new mistake class lands here as one row: (what is given, a fragment of the expected line).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from test_tuned import entry

import attncompose as ac
from attncompose import AttentionInputError
from attncompose.cli import main
from attncompose.runtime.checks import non_finite
from attncompose.spec import RecipeError
from attncompose.spec.recipe import validate_recipe


def one_line_error(result, *fragments: str) -> str:
    """The CLI's answer to a user mistake: exit 2, one ``error:`` line, no traceback."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def cli(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line(err: BaseException, *fragments: str) -> None:
    text = str(err)
    assert "\n" not in text, text
    for fragment in fragments:
        assert fragment in text, text


# --------------------------------------------------------------------------------- recipes


def steps(**given) -> dict:
    return {"name": "t", "steps": given}


def with_block(detector: dict, **block) -> dict:
    """A detector feeding a block step (the smallest recipe around one selection knob)."""
    return steps(h=detector, out={"op": "block", "select": ["h"], **block})


LSH = {"op": "lsh"}

RECIPES = [
    # what each step is
    pytest.param(steps(a={"op": "nope"}), "steps.a: unknown op 'nope'; known ops: lsh", id="op"),
    pytest.param(steps(a={"colour": 1}), "steps.a: a step needs `op:`, one of lsh", id="no-op"),
    pytest.param(steps(a="exact"), "steps.a: expected a mapping, got 'exact'", id="step-text"),
    pytest.param(steps(a={"op": "exact", "colour": 1}), "steps.a.colour: unknown field", id="x"),
    pytest.param({"steps": {"a": {"op": "exact"}}}, "name: field required", id="no-name"),
    pytest.param({"name": 5, "steps": {"a": {"op": "exact"}}}, "name: expected text", id="name"),
    pytest.param({"name": "t", "steps": {}}, "steps: needs at least 1 item", id="no-steps"),
    pytest.param({"name": "t", "steps": [1]}, "steps: expected a mapping", id="steps-list"),
    pytest.param(
        {"format": "attncompose-tuned/1", "causal": True, "recipe": {}, "table": {}},
        "this is a tuned file, not a recipe: load it with attncompose.load",
        id="tuned-file",
    ),
    pytest.param(
        {"format": "attncompose-model-tuned/1", "model": {}, "lengths": {}},
        "this is a model-level tuned file (a choice per layer), not a recipe: load it with "
        "attncompose.load(PATH)",
        id="model-tuned-file",
    ),
    # knob values
    pytest.param(
        with_block(LSH, block_size="big"), "steps.out.block_size: expected an integer", id="int"
    ),
    pytest.param(
        with_block(LSH, block_size=2.5),
        "steps.out.block_size: expected an integer, got 2.5",
        id="int-float",
    ),
    pytest.param(
        with_block({"op": "lsh", "num_projections": 40}),
        "steps.h.num_projections: 40 is above the maximum 30",
        id="above",
    ),
    pytest.param(
        with_block(LSH, block_size={"default": 8, "low": 16, "high": 32}),
        "steps.out.block_size: default 8 lies outside [16, 32]",
        id="range-default",
    ),
    pytest.param(
        with_block(LSH, block_size={"default": 8, "choices": [0, 8]}),
        "steps.out.block_size: 0 is below the minimum 1",
        id="choice-below",
    ),
    pytest.param(
        with_block({"op": "lsh", "num_projections": {"default": 3, "lo": 1, "high": 4}}),
        "steps.h.num_projections: low: field required",
        id="range-field",
    ),
    pytest.param(
        with_block({"op": "topk", "p": {"default": 0.5, "choices": ["a"]}}),
        "steps.h.p: choices.0: expected a number, got 'a'",
        id="choice-text",
    ),
    pytest.param(
        with_block({"op": "lsh", "pairing": "x"}),
        "steps.h.pairing: expected 'rank' or 'code', got 'x'",
        id="literal",
    ),
    pytest.param(
        with_block({"op": "lsh", "seed": "x"}), "steps.h.seed: expected an integer", id="seed"
    ),
    pytest.param(
        with_block({"op": "lsh", "seed": 10**20}),
        "steps.h.seed: must be at most 9223372036854775807, got 100000000000000000000",
        id="seed-int64",
    ),
    pytest.param(
        with_block({"op": "topk", "p": float("nan")}),
        "steps.h.p: expected a finite number, got nan",
        id="nan",
    ),
    pytest.param(
        with_block({"op": "topk", "p": float("-inf")}),
        "steps.h.p: expected a finite number, got -inf",
        id="inf",
    ),
    pytest.param(
        with_block({"op": "topk", "p": {"default": 0.9, "choices": [0.9, float("nan")]}}),
        "steps.h.p: choices.1: expected a finite number, got nan",
        id="nan-choice",
    ),
    pytest.param(
        with_block({"op": "topk", "p": {"default": float("nan"), "low": 0.5, "high": 0.9}}),
        "steps.h.p: default: expected a finite number, got nan",
        id="nan-default",
    ),
    pytest.param(
        with_block({"op": "topk", "block_size": {"default": 8, "low": 1, "high": float("inf")}}),
        "steps.h.block_size: high: expected a finite number, got inf",
        id="inf-high",
    ),
    # the graph
    pytest.param(
        steps(a={"op": "block", "select": ["ghost"]}),
        "steps.a.select: names unknown step 'ghost'",
        id="dangling",
    ),
    pytest.param(
        with_block(LSH, select="h"), "steps.out.select: expected a list, got 'h'", id="port"
    ),
    pytest.param(
        steps(
            a={"op": "merge", "inputs": ["b", "c"]},
            b={"op": "merge", "inputs": ["a", "c"]},
            c={"op": "exact"},
        ),
        "steps: the steps form a cycle",
        id="cycle",
    ),
    pytest.param(
        steps(a={"op": "exact"}, b={"op": "exact"}), "steps: the recipe has 2 outputs", id="2"
    ),
    pytest.param(steps(a=LSH), "steps: the output step 'a' produces a selection", id="out-kind"),
    pytest.param(
        steps(e={"op": "exact"}, a={"op": "block", "select": ["e"]}),
        "steps.a.select: step 'e' (exact) produces a partial, but this port takes a selection",
        id="port-kind",
    ),
    pytest.param(
        steps(
            h=LSH,
            b={"op": "block", "select": ["h"]},
            e={"op": "exact"},
            s={"op": "uniform_sample", "exclude": ["e"]},
            m={"op": "merge", "inputs": ["b", "s"]},
        ),
        "steps.s.exclude: step 'e' does not record the pairs it covered",
        id="coverage",
    ),
    pytest.param(steps(a={"op": "merge", "inputs": ["a"]}), "steps.a.inputs", id="merge-one"),
]


@pytest.mark.parametrize(("given", "message"), RECIPES)
def test_bad_recipe(given, message, tmp_path):
    with pytest.raises(RecipeError) as err:
        validate_recipe(given, source="bad.yaml")
    one_line(err.value, f"bad.yaml: {message}")
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(given))
    one_line_error(cli("validate", path), message)


RECIPE_FILES = [
    pytest.param(
        "name: x\nsteps:\n  a: {op: exact\n", "bad.yaml:4:1: YAML syntax error", id="yaml"
    ),
    pytest.param("- 1\n- 2\n", "a recipe is a mapping, got list", id="list"),
    pytest.param("", "a recipe is a mapping, got NoneType", id="empty"),
    pytest.param("name: " + "[" * 2000 + "]" * 2000, "bad.yaml: YAML nested too deeply", id="deep"),
]


@pytest.mark.parametrize(("text", "message"), RECIPE_FILES)
def test_bad_recipe_file(text, message, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError) as err:
        ac.load_recipe(path)
    one_line(err.value, message.replace("bad.yaml", str(path)))
    one_line_error(cli("validate", path), message.replace("bad.yaml", str(path)))


def test_missing_recipe_file_and_unknown_name():
    with pytest.raises(RecipeError, match="file not found"):
        ac.load_recipe("does/not/exist.yaml")
    with pytest.raises(RecipeError, match=r"built-in: .*hyperattention"):
        ac.load_recipe("no-such-recipe")
    with pytest.raises(RecipeError, match="the recipe name or path is empty"):
        ac.load_recipe("")  # not the current folder


def test_a_recipe_or_knobs_of_another_type():
    with pytest.raises(RecipeError, match=r"a recipe is a built-in name, .* not int"):
        ac.load_recipe(123)
    with pytest.raises(RecipeError, match=r"knobs must be a mapping .* not NoneType"):
        ac.load_recipe("streaming").with_knobs(None)


# --------------------------------------------------------------------------------- tensors


def qkv(b=1, hq=4, hkv=2, lq=8, lk=8, d=16):
    q = torch.randn(b, hq, lq, d)
    k = torch.randn(b, hkv, lk, d)
    return q, k, k.clone()


def poisoned(name: str, bad: float):
    q, k, v = qkv()
    {"q": q, "k": k, "v": v}[name][0, 0, 3, 1] = bad
    return (q, k, v), {}


TENSORS = [
    pytest.param(lambda: (qkv(hq=5, hkv=2), {}), r"query heads (5) must be a multiple", id="heads"),
    pytest.param(
        lambda: ((qkv()[0][0], *qkv()[1:]), {}),
        "q must be 4-D [batch, heads, length, head_dim], got shape (4, 8, 16)",
        id="rank",
    ),
    pytest.param(
        lambda: ((qkv()[0][..., :8], *qkv()[1:]), {}),
        "head_dim of q (8) and k (16) differ",
        id="head-dim",
    ),
    pytest.param(
        lambda: ((*qkv()[:2], qkv()[2][:, :, :5]), {}),
        "must agree on heads and length",
        id="kv-length",
    ),
    pytest.param(
        lambda: ((qkv()[0].expand(2, -1, -1, -1), *qkv()[1:]), {}),
        "batch sizes differ",
        id="batch",
    ),
    pytest.param(lambda: ((qkv()[0].half(), *qkv()[1:]), {}), "dtypes differ", id="mixed-dtype"),
    pytest.param(
        lambda: (tuple(t.double() for t in qkv()), {}), "q has dtype torch.float64", id="dtype"
    ),
    pytest.param(
        lambda: ((qkv()[0], qkv()[1].to("meta"), qkv()[2]), {}),
        "different devices: cpu, meta",
        id="mixed-device",
    ),
    pytest.param(
        lambda: (qkv(lq=9, lk=8), {"is_causal": True}),
        "causal attention needs Lq <= Lk",
        id="causal-lq",
    ),
    pytest.param(
        lambda: (qkv(), {"is_causal": "false"}),
        "is_causal must be True or False, got 'false'",  # it ran causal (bool('false'))
        id="causal-text",
    ),
    pytest.param(
        lambda: (qkv(), {"is_causal": torch.ones(8, 8, dtype=torch.bool)}),
        "is_causal must be True or False, got a tensor of shape (8, 8)",  # a raw RuntimeError
        id="causal-mask",
    ),
    pytest.param(
        lambda: (qkv(), {"attn_mask": torch.ones(8, 8, dtype=torch.bool)}),
        "attn_mask is not supported",
        id="mask",
    ),
    pytest.param(lambda: (qkv(), {"dropout_p": 0.1}), "dropout_p must be 0", id="dropout"),
    pytest.param(
        lambda: (qkv(), {"scale": float("nan")}),
        "scale must be None or a finite number, got nan",
        id="scale-nan",
    ),
    pytest.param(
        lambda: (qkv(), {"scale": "0.25"}),
        "scale must be None or a finite number, got '0.25'",
        id="scale-text",
    ),
    pytest.param(
        lambda: (qkv(), {"scale": torch.tensor(0.25)}),
        "scale must be None or a finite number, got tensor(0.2500) (a tensor: pass float(scale))",
        id="scale-tensor",
    ),
    pytest.param(lambda: (qkv(b=0), {}), "empty batch: q has shape (0, 4, 8, 16)", id="batch-0"),
    pytest.param(lambda: (qkv(hq=0), {}), "no query heads: q has shape (1, 0, 8, 16)", id="hq-0"),
    pytest.param(lambda: (qkv(d=0), {}), "head_dim is 0: q has shape (1, 4, 8, 0)", id="d-0"),
    pytest.param(
        lambda: (tuple(t.to("meta") for t in qkv()), {}),
        "q, k, v are meta tensors (shapes without values)",
        id="meta",
    ),
    pytest.param(  # a reshape deep inside raised for it
        lambda: ((qkv()[0].to_sparse(), *qkv()[1:]), {}),
        "q must be a dense tensor, got layout torch.sparse_coo",
        id="sparse",
    ),
    *(
        pytest.param(
            lambda name=name, bad=bad: poisoned(name, bad),
            f"{name} contains NaN or Inf",
            id=f"{name}-{bad}",
        )
        for name in "qkv"
        for bad in (float("nan"), float("inf"), float("-inf"))
    ),
    pytest.param(
        lambda: both_infinities(torch.float32), "v contains NaN or Inf", id="v-inf-and-minus-inf"
    ),
    pytest.param(
        lambda: both_infinities(torch.float16), "v contains NaN or Inf", id="v-infinities-fp16"
    ),
]


def both_infinities(dtype: torch.dtype):
    """v holds +inf and -inf (a sum of them is NaN, not inf)."""
    q, k, v = (t.to(dtype) for t in qkv())
    v[0, 1, 2, 3], v[0, 0, 5, 0] = float("inf"), float("-inf")
    return (q, k, v), {}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_finite_inputs_whose_sum_overflows_are_accepted(dtype):
    """Values near the largest float add up past float32's range: every element is finite,
    so the call runs (the check's float32 sum overflows; min and max then decide). What
    attention makes of such values is the arithmetic's, as in SDPA."""
    q, k, v = (t.to(dtype) for t in qkv(lk=64))
    v = torch.full_like(v, torch.finfo(dtype).max * 0.9)
    assert not v.float().sum().isfinite() and non_finite(q, k, v) is None
    assert ac.compile("exact")(q, k, v).shape == q.shape
    v[0, 1, 2, 3] = float("nan")
    assert non_finite(q, k, v) == "v"


@pytest.mark.parametrize("scale", [np.float32(0.25), np.float16(0.25), np.int64(1)])
def test_numpy_scalar_scales_are_numbers(scale):
    """SDPA takes a NumPy scalar scale (a head dim's root taken in NumPy); the call refused it
    as no finite number."""
    q, k, v = qkv()
    attn = ac.compile("exact")
    assert torch.equal(attn(q, k, v, scale=scale), attn(q, k, v, scale=float(scale)))


@pytest.fixture(scope="module")
def attn():
    return ac.compile("hyperattention")


def test_unknown_backend():
    with pytest.raises(ac.AttncomposeError, match="unknown backend 'cuda'"):
        ac.compile("exact", backend="cuda")


@pytest.mark.parametrize(("make", "message"), TENSORS)
def test_bad_tensors(attn, make, message):
    args, kwargs = make()
    with pytest.raises(AttentionInputError) as err:
        attn(*args, **kwargs)
    one_line(err.value, message)


# ------------------------------------------------------------------------------ tuned files


@pytest.fixture
def tuned_path(tmp_path):
    from attncompose.runtime.tuned import TunedFile, write_tuned

    recipes = {"hyperattention": ac.load_recipe("hyperattention").model_dump(mode="json")}
    path = tmp_path / "tuned.yaml"
    write_tuned(path, TunedFile(causal=True, recipes=recipes, table={"cpu": {128: entry()}}))
    return path


def set_knob(value):
    return lambda d: d["table"]["cpu"][128]["knobs"].update({"diag.block_size": value})


TUNED = [
    pytest.param(
        set_knob("big"),
        "table.cpu.128.knobs[diag.block_size]: expected an integer or a tunable mapping "
        "({default, low, high} or {default, choices}), got 'big'",
        id="knob-text",
    ),
    pytest.param(
        set_knob(2.5),
        "table.cpu.128.knobs[diag.block_size]: expected an integer, got 2.5",
        id="knob-float",
    ),
    pytest.param(
        set_knob(float("nan")),
        "table.cpu.128.knobs[diag.block_size]: expected an integer, got nan",
        id="nan",
    ),
]


@pytest.mark.parametrize(("edit", "message"), TUNED)
def test_bad_tuned_file(tuned_path, edit, message):
    data = yaml.safe_load(tuned_path.read_text())
    edit(data)
    tuned_path.write_text(yaml.safe_dump(data))
    with pytest.raises(RecipeError) as err:
        ac.load(tuned_path)
    one_line(err.value, f"{tuned_path}: {message}")
    one_line_error(cli("bench", tuned_path, "--seq-lens", "16"), message)


@pytest.mark.parametrize(
    ("given", "message"),
    [
        pytest.param(None, "takes a tuned file's path (str or Path), not NoneType", id="none"),
        pytest.param({"format": "attncompose-tuned/2"}, "(str or Path), not dict", id="dict"),
        pytest.param(torch.zeros(1), "(str or Path), not Tensor", id="tensor"),
        pytest.param("", "the path of the tuned file is empty", id="empty"),
        pytest.param(
            "streaming",
            "streaming: file not found; 'streaming' is a built-in recipe, not a tuned file: "
            "compile it with attncompose.compile('streaming')",
            id="recipe-name",
        ),
    ],
)
def test_load_of_no_tuned_file_path(given, message):
    with pytest.raises(RecipeError) as err:
        ac.load(given)
    one_line(err.value, message)


def test_tuned_file_given_as_a_recipe_says_to_load_it(tuned_path):
    with pytest.raises(RecipeError) as err:
        ac.compile(tuned_path)
    one_line(err.value, "this is a tuned file, not a recipe: load it with attncompose.load(PATH)")


# ------------------------------------------------------------------- merges of disjoint keys

SINK_BLOCK = {"op": "block", "select": ["s"]}
MERGES = [
    pytest.param(
        steps(
            s={"op": "sink"},
            w={"op": "window"},
            a=SINK_BLOCK,
            b={"op": "block", "select": ["w"]},
            m={"op": "merge", "inputs": ["a", "b"]},
        ),
        "steps.m.inputs: 'a' and 'b' may attend to the same keys, whose mass would be counted "
        "twice; add `exclude: [a]` to 'b'",
        id="sinks-and-window",
    ),
    pytest.param(
        steps(a={"op": "exact"}, b={"op": "exact"}, m={"op": "merge", "inputs": ["a", "b"]}),
        "steps.m.inputs: 'a' and 'b' may attend to the same keys, whose mass would be counted "
        "twice; merge only partials that skip each other's pairs",
        id="exact-twice",
    ),
    pytest.param(
        steps(
            s={"op": "sink"},
            w={"op": "window"},
            a=SINK_BLOCK,
            b={"op": "block", "select": ["w"], "exclude": ["a"]},
            r={"op": "uniform_sample", "exclude": ["b"]},  # also needs to exclude a
            inner={"op": "merge", "inputs": ["b", "r"]},
            m={"op": "merge", "inputs": ["a", "inner"]},
        ),
        "steps.m.inputs: 'a' and 'r' may attend to the same keys, whose mass would be counted "
        "twice; add `exclude: [a]` to 'r'",
        id="nested",
    ),
]


@pytest.mark.parametrize(("given", "message"), MERGES)
def test_merge_of_overlapping_keys(given, message, tmp_path):
    """Merging partials whose keys may overlap counts their mass twice (sinks seen by both a
    sink block and a window block; exact twice shifts lse by ln 2): refused by the graph."""
    test_bad_recipe(given, message, tmp_path)


def test_merges_of_disjoint_keys_run_exact_attention_when_nothing_is_left_out(make_qkv, reference):
    """Each input excludes the ones before it: keys are disjoint, and with a residual that
    samples every key, the merge is exact attention."""
    recipe = steps(
        s={"op": "sink", "count": 3},
        w={"op": "window", "width": 5},
        a=SINK_BLOCK,
        b={"op": "block", "select": ["w"], "exclude": ["a"]},
        r={"op": "uniform_sample", "exclude": ["a", "b"], "sample_size": 64},
        inner={"op": "merge", "inputs": ["b", "r"]},
        m={"op": "merge", "inputs": ["a", "inner"]},
    )
    q, k, v = make_qkv(lq=40)
    for causal in (False, True):
        got = ac.compile(recipe)(q, k, v, is_causal=causal)
        assert ac.relative_error(got, reference(q, k, v, causal)[0].float()) < 1e-5


# ------------------------------------------------------- knobs larger than the problem can use

L = 100  # tokens of the calls below; odd block counts for every block size used


def block_of(detector: dict, **block) -> dict:
    return with_block(detector, block_size=block.pop("block_size", 16), **block)


def split(body: dict, **knobs) -> dict:
    """``body``'s steps inside a causal splitter (its output step renamed ``body``)."""
    inner = dict(body["steps"])
    inner["body"] = inner.pop("out")
    return steps(**inner, out={"op": "causal_split", "body": "body", "min_seq_len": 16, **knobs})


SIZE_KNOBS = [  # recipe at a knob value -> the value from which larger ones change nothing
    pytest.param(lambda n: block_of({"op": "sink", "count": n}), id="sink.count"),
    pytest.param(lambda n: block_of({"op": "window", "width": n}), id="window.width"),
    pytest.param(lambda n: split(block_of({"op": "sink", "count": n})), id="sink.count-split"),
    pytest.param(lambda n: split(block_of({"op": "window", "width": n})), id="window.width-split"),
    pytest.param(lambda n: block_of({"op": "topk", "block_size": n}), id="topk.block_size"),
    pytest.param(lambda n: block_of({"op": "topk", "block_size": 8, "k": n}), id="topk.k"),
    pytest.param(
        lambda n: block_of({"op": "topk", "block_size": 8, "p": 0.99, "max_k": n}),
        id="topk.max_k",
    ),
    pytest.param(lambda n: block_of({"op": "power", "block_size": n}), id="power.block_size"),
    pytest.param(
        lambda n: split(block_of({"op": "power", "block_size": n})), id="power.block_size-split"
    ),
    pytest.param(
        lambda n: block_of({"op": "power", "block_size": 8, "max_distance": n}),
        id="power.max_distance",
    ),
    pytest.param(lambda n: block_of(LSH, block_size=n), id="block.block_size"),
    pytest.param(
        lambda n: block_of({"op": "window", "width": 8}, block_size=n), id="block.block_size-window"
    ),
    pytest.param(lambda n: steps(out={"op": "uniform_sample", "sample_size": n}), id="sample_size"),
    pytest.param(
        lambda n: steps(
            h=LSH,
            d={"op": "block", "select": ["h"], "block_size": 64},
            r={"op": "uniform_sample", "exclude": ["d"], "sample_size": n},
            out={"op": "merge", "inputs": ["d", "r"]},
        ),
        id="sample_size-fused",
    ),
    pytest.param(
        lambda n: split(steps(out={"op": "exact"}), min_seq_len=n), id="causal_split.min_seq_len"
    ),
]


@pytest.mark.parametrize("huge", [10**12, 10**30])
@pytest.mark.parametrize("recipe", SIZE_KNOBS)
def test_knob_larger_than_the_problem_acts_as_its_largest_useful_value(recipe, huge, make_qkv):
    """Sizes allocated memory by the knob, not the sequence: a window of 10^7 at 512 tokens
    had the process killed for memory, 10^12 failed to allocate, 10^30 overflowed. Any value
    from the sequence length up gives the same attention."""
    q, k, v = make_qkv(b=1, lq=L)
    for causal in (False, True):
        want = ac.compile(recipe(L))(q, k, v, is_causal=causal)
        got = ac.compile(recipe(huge))(q, k, v, is_causal=causal)
        assert ac.relative_error(got, want) < 1e-6


# ------------------------------------------------------------------ command-line arguments

TINY = """\
name: tiny
steps:
  hash: {op: lsh, num_projections: {default: 3, low: 1, high: 4}}
  diag: {op: block, select: [hash], block_size: {default: 16, choices: [8, 16]}}
  residual: {op: uniform_sample, exclude: [diag], sample_size: {default: 8, choices: [0, 8]}}
  merged: {op: merge, inputs: [diag, residual]}
  out: {op: causal_split, body: merged, min_seq_len: {default: 32, choices: [32, 64]}}
"""
TUNE = ["tune", "{tiny}", "--target-err", "0.5", "--seq-lens", "64", "--out", "{tmp}/t.yaml"]
CAPTURE = ["capture", "--seq-len", "16", "--out", "{tmp}/qkv.safetensors"]
DEVICES = [("banana", "not a torch device: 'banana'")] + (
    [] if torch.cuda.is_available() else [("cuda", "CUDA is not available here")]
)


@pytest.fixture
def files(tmp_path) -> dict[str, str]:
    """Placeholders of the argument lists: {tmp} and files of every kind."""
    (tmp_path / "tiny.yaml").write_text(TINY)
    (tmp_path / "binary.txt").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "folder").mkdir()
    (tmp_path / "not-a-journal.log").write_text("hello\n")
    tuned = {"format": "attncompose-tuned/1", "causal": True, "recipe": {}, "table": {}}
    (tmp_path / "some.tuned.yaml").write_text(yaml.safe_dump(tuned))
    model_tuned = {"format": "attncompose-model-tuned/1", "model": {}, "lengths": {}}
    (tmp_path / "model.tuned.yaml").write_text(yaml.safe_dump(model_tuned))
    return {
        "tmp": str(tmp_path),
        "tiny": str(tmp_path / "tiny.yaml"),
        "binary": str(tmp_path / "binary.txt"),
        "empty": str(tmp_path / "empty.txt"),
        "folder": str(tmp_path / "folder"),
        "not_journal": str(tmp_path / "not-a-journal.log"),
        "tuned": str(tmp_path / "some.tuned.yaml"),
        "model_tuned": str(tmp_path / "model.tuned.yaml"),
    }


CLI_ARGS = [
    # recipes and tuned files where the other is expected
    pytest.param(["show", "nope"], "no recipe file or built-in recipe named 'nope'", id="show"),
    pytest.param(["eval", "nope", "--seq-len", "8"], "no recipe file or built-in", id="eval"),
    pytest.param(["show", "{tuned}"], "this is a tuned file, not a recipe", id="show-tuned"),
    pytest.param(
        ["run", "{tuned}", "--seq-len", "16"], "this is a tuned file, not a recipe", id="run-tuned"
    ),
    *(
        pytest.param(args, message, id=f"{args[0]}-model-tuned")
        for args, message in (
            (["show", "{model_tuned}"], "model-level tuned file (a choice per layer), not a"),
            (["run", "{model_tuned}", "--seq-len", "16"], "give it to `attncompose eval`"),
            (["bench", "{model_tuned}", "--seq-lens", "16"], "which bench does not take: give"),
        )
    ),
    # usage errors (click) are one line too
    pytest.param(["run", "exact", "--seq-len", "0"], "--seq-len", id="run-length"),
    pytest.param(["run", "exact"], "Missing option '--seq-len'", id="run-missing"),
    pytest.param(["nope"], "No such command 'nope'", id="command"),
    pytest.param(
        ["run", "exact", "--seq-len", "16", "--data", "{tmp}/no.st"], "no.st", id="run-data"
    ),
    *(
        pytest.param([*args, "--device", device], message, id=f"{args[0]}-{device}")
        for args in (["bench", "exact"], TUNE)
        for device, message in DEVICES
    ),
    # tune
    pytest.param([*TUNE, "--target-err", "0"], "--target-err", id="target"),
    pytest.param([*TUNE, "--seq-lens", "12x"], "comma-separated integers", id="lengths"),
    pytest.param([*TUNE, "--study", "s"], "give --storage too", id="study"),
    pytest.param([*TUNE, "--plot", "{tmp}/p.txt"], "no figure format .txt", id="plot-format"),
    pytest.param([*TUNE, "--data", "missing.safetensors"], "missing.safetensors", id="tune-data"),
    # models: checked before the model loads (that takes a minute on a busy CPU)
    pytest.param([*CAPTURE, "--model", "nope"], "unknown model 'nope'", id="model"),
    pytest.param([*CAPTURE, "--layers", "a,b"], "comma-separated integers", id="layers-text"),
    pytest.param(
        [*CAPTURE, "--layers", "99"], "layers [99] are outside 0..29 (smollm2)", id="layers"
    ),
    pytest.param(
        ["eval", "exact", "--seq-len", "16", "--layers", "40"],
        "layers [40] are outside 0..29 (smollm2)",
        id="eval-layers",
    ),
    pytest.param(
        [*CAPTURE, "--kv-heads", "3"], "no key/value heads [3]: smollm2 has 3", id="kv-heads"
    ),
    pytest.param([*CAPTURE, "--kv-heads", "0,0"], "heads [0] more than once", id="kv-heads-twice"),
    pytest.param(
        [*CAPTURE, "--seq-len", "9000"],
        "--seq-len 9000 exceeds the 8192 positions of smollm2",
        id="positions",
    ),
    pytest.param(
        ["eval", "exact", "--seq-len", "8193"],
        "--seq-len 8193 exceeds the 8192 positions of smollm2",
        id="eval-positions",
    ),
    pytest.param([*CAPTURE, "--text", "{binary}"], "binary.txt: not UTF-8 text", id="binary"),
    pytest.param([*CAPTURE, "--text", "{empty}"], "empty.txt: the file is empty", id="empty"),
    pytest.param(["eval", "exact", "--seq-len", "8", "--text", "{empty}"], "empty", id="eval-text"),
]


@pytest.mark.parametrize(("args", "message"), CLI_ARGS)
def test_bad_arguments(args, message, files):
    one_line_error(cli(*(a.format(**files) for a in args)), message)


def test_out_of_memory_is_one_line():
    """An allocation failure (asking for a length the machine cannot hold) is a user error."""
    import click

    from attncompose.cli.options import user_errors

    @click.command()
    @user_errors
    def greedy():
        raise RuntimeError("[enforce fail] DefaultCPUAllocator: can't allocate memory: 1e11 bytes")

    @click.command()
    @user_errors
    def buggy():
        raise RuntimeError("shape mismatch")

    runner = CliRunner()
    one_line_error(runner.invoke(greedy, []), "out of memory", "can't allocate memory")
    with pytest.raises(RuntimeError, match="shape mismatch"):  # bugs still surface
        runner.invoke(buggy, [], catch_exceptions=False)


STORAGES = [
    pytest.param("nonsense", "expected an SQLAlchemy URL", id="not-a-url"),
    pytest.param("postgresql://nobody@127.0.0.1:1/none", "cannot open", id="refused"),
    pytest.param("journal:{folder}", "is a folder", id="journal-folder"),
    pytest.param("journal:{not_journal}", "not an Optuna journal", id="journal-other"),
    pytest.param("journal:{tmp}/missing/j.log", "does not exist", id="journal-no-folder"),
    pytest.param("sqlite://", "in-memory", id="sqlite-memory"),
    pytest.param("sqlite:///:memory:", "in-memory", id="sqlite-memory-2"),
    pytest.param("sqlite:///{folder}", "cannot open", id="sqlite-folder"),
]


@pytest.mark.parametrize(("url", "message"), STORAGES)
def test_bad_storage(url, message, files):
    one_line_error(
        cli(*(a.format(**files) for a in TUNE), "--storage", url.format(**files)), message
    )


# ----------------------------------------------------------------- data beyond the built-in


@pytest.mark.parametrize(
    "args",
    [
        ["run", "exact", "--seq-len", "4100"],
        ["tune", "{tiny}", "--target-err", "0.5", "--seq-lens", "4100", "--out", "{tmp}/t.yaml"],
    ],
    ids=["run", "tune"],
)
def test_lengths_beyond_the_builtin_capture_need_data_or_an_explicit_synthetic(args, files):
    """Above the built-in capture's 4096 tokens, run and tune calibrated on random tensors
    without a word (knobs tuned on them mean nothing): refused, saying how to get real data;
    ``--data synthetic`` asks for the random tensors explicitly."""
    line = one_line_error(
        cli(*(a.format(**files) for a in args)),
        "the built-in capture holds 4096 tokens, fewer than the 4100 asked",
        "attncompose capture --seq-len 4100",
        "--data synthetic",
    )
    assert "Traceback" not in line


def test_synthetic_data_only_by_name_and_said():
    done = cli("run", "exact", "--seq-len", "64", "--data", "synthetic", "--repeats", "1")
    assert done.exit_code == 0, done.output
    assert "data: synthetic, structured random tensors (not real attention)" in done.output
