"""Recipes: loading, knobs, schema (bad recipes: tests/test_bad_inputs.py)."""

from __future__ import annotations

import json

import pytest

import attncompose as ac
from attncompose.spec import RecipeError
from attncompose.spec.graph import build_graph, describe, to_dot

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
    with pytest.raises(RecipeError, match=r"knobs\[diag\.block_size\]: 0 is below the minimum 1"):
        recipe.with_knobs({"diag.block_size": 0})


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
