"""Recipes: loading, validation errors that name file/field/problem, knobs, schema."""

from __future__ import annotations

import json

import pytest

import attncompose as ac
from attncompose.graph import build_graph, describe, to_dot
from attncompose.spec import RecipeError
from attncompose.spec.recipe import validate_recipe

BUILTIN = ["exact", "hyperattention", "hyperattention-topk", "lsh-only", "sampling-only"]


def test_builtin_recipes_load_and_name_themselves():
    assert set(BUILTIN) <= set(ac.builtin_recipes())
    for name in ac.builtin_recipes():
        recipe = ac.load_recipe(name)
        assert recipe.name == name
        assert build_graph(recipe).number_of_nodes() == len(recipe.steps)


def test_recipe_files_state_what_they_reproduce():
    from attncompose.spec.recipe import builtin_recipe_dir

    for path in builtin_recipe_dir().glob("*.yaml"):
        assert path.read_text().startswith("#"), f"{path.name} lacks its leading comment"


def test_hyperattention_has_the_paper_defaults():
    knobs = ac.load_recipe("hyperattention").knob_values()
    assert knobs["hash.num_projections"] == 7
    assert knobs["diag.block_size"] == 256
    assert knobs["residual.sample_size"] == 256
    assert knobs["out.min_seq_len"] == 4096


def test_load_by_path_and_round_trip(tmp_path):
    recipe = ac.load_recipe("hyperattention")
    path = tmp_path / "copy.yaml"
    path.write_text(recipe.dump_yaml())
    assert ac.load_recipe(path) == recipe


def test_tunables_come_from_the_recipe():
    tunables = ac.load_recipe("hyperattention").tunables()
    assert set(tunables) == {
        "hash.num_projections",
        "diag.block_size",
        "residual.sample_size",
        "out.min_seq_len",
    }
    fixed = ac.load_recipe("hyperattention").with_knobs({"diag.block_size": 64})
    assert fixed.knob_values()["diag.block_size"] == 64
    assert "diag.block_size" not in fixed.tunables()


def test_with_knobs_rejects_unknown_and_out_of_range():
    recipe = ac.load_recipe("hyperattention")
    with pytest.raises(RecipeError, match=r"no knob 'diag\.nope'"):
        recipe.with_knobs({"diag.nope": 1})
    with pytest.raises(RecipeError, match=r"steps\.diag\.block_size: 0 is below the minimum 1"):
        recipe.with_knobs({"diag.block_size": 0})


def _steps(**steps):
    return {"name": "t", "steps": steps}


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (_steps(a={"op": "nope"}), r"steps\.a: .*'nope'.*expected tags"),
        (_steps(a={"op": "exact", "colour": 1}), r"steps\.a\.colour: unknown field"),
        (
            _steps(h={"op": "lsh"}, a={"op": "block", "select": ["h"], "block_size": "big"}),
            r"steps\.a\.block_size: expected an integer",
        ),
        (
            _steps(h={"op": "lsh"}, a={"op": "block", "select": ["h"], "block_size": 2.5}),
            r"steps\.a\.block_size: expected an integer",
        ),
        (
            _steps(h={"op": "lsh", "num_projections": 40}, a={"op": "block", "select": ["h"]}),
            r"steps\.h\.num_projections: 40 is above the maximum 30",
        ),
        (
            _steps(
                h={"op": "lsh"},
                a={
                    "op": "block",
                    "select": ["h"],
                    "block_size": {"default": 8, "low": 16, "high": 32},
                },
            ),
            r"steps\.a\.block_size: default 8 lies outside \[16, 32\]",
        ),
        (
            _steps(
                h={"op": "lsh"},
                a={"op": "block", "select": ["h"], "block_size": {"default": 8, "choices": [0, 8]}},
            ),
            r"steps\.a\.block_size: 0 is below the minimum 1",
        ),
        (
            _steps(a={"op": "block", "select": ["ghost"]}),
            r"steps\.a\.select: names unknown step 'ghost'",
        ),
        (
            _steps(
                a={"op": "merge", "inputs": ["b", "c"]},
                b={"op": "merge", "inputs": ["a", "c"]},
                c={"op": "exact"},
            ),
            r"steps: the steps form a cycle",
        ),
        (_steps(a={"op": "exact"}, b={"op": "exact"}), r"steps: the recipe has 2 outputs"),
        (_steps(a={"op": "lsh"}), r"output step 'a' produces a selection"),
        (
            _steps(e={"op": "exact"}, a={"op": "block", "select": ["e"]}),
            r"steps\.a\.select: step 'e' \(exact\) produces a partial, but this port takes a "
            r"selection",
        ),
        (
            _steps(
                h={"op": "lsh"},
                b={"op": "block", "select": ["h"]},
                e={"op": "exact"},
                s={"op": "uniform_sample", "exclude": ["e"]},
                m={"op": "merge", "inputs": ["b", "s"]},
            ),
            r"steps\.s\.exclude: step 'e' does not record the pairs it covered",
        ),
        (_steps(a={"op": "merge", "inputs": ["a"]}), r"steps\.a\.inputs"),
        ({"steps": {"a": {"op": "exact"}}}, r"name: field required"),
        ({"name": "t", "steps": {}}, r"steps"),
    ],
)
def test_bad_recipes_name_field_and_problem(data, match):
    with pytest.raises(RecipeError, match=match) as err:
        validate_recipe(data, source="bad.yaml")
    assert str(err.value).startswith("bad.yaml: ")


def test_malformed_yaml_names_file_line_and_column(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nsteps:\n  a: {op: exact\n")
    with pytest.raises(RecipeError, match=r"broken\.yaml:\d+:\d+: YAML syntax error"):
        ac.load_recipe(path)


def test_missing_file_and_unknown_name():
    with pytest.raises(RecipeError, match="file not found"):
        ac.load_recipe("does/not/exist.yaml")
    with pytest.raises(RecipeError, match=r"built-in: .*hyperattention"):
        ac.load_recipe("no-such-recipe")


def test_non_mapping_recipe(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(RecipeError, match="a recipe is a mapping, got list"):
        ac.load_recipe(path)


def test_schema_covers_every_step():
    from attncompose.spec import STEP_TYPES

    text = json.dumps(ac.load_recipe("exact").model_json_schema())
    for op in STEP_TYPES:
        assert f'"{op}"' in text


def test_describe_and_dot_show_nodes_edges_knobs():
    recipe = ac.load_recipe("hyperattention")
    text = describe(recipe)
    assert "diag: block(block_size=256 in [64, 128, 256, 512])" in text
    assert "select<-hash" in text
    dot = to_dot(recipe)
    assert dot.startswith('digraph "hyperattention"')
    assert '"hash" -> "diag" [label="select"]' in dot
    assert '"merged" -> "out" [label="body"]' in dot
