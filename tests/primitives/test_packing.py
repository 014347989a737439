"""Packed problems (independent non-causal problems end to end along each row, as the causal
splitter packs the rectangles of every level): packable steps run them as they would run the
parts one by one; steps that cannot are never handed one."""

from __future__ import annotations

import math

import pytest
import torch
from contract import TIGHT, recipe
from oracle import make_problem

import attncompose as ac
from attncompose.primitives.base import Packing, Problem, count_products
from attncompose.primitives.lsh.naive import mips_augment
from attncompose.primitives.uniform_sample.naive import draw_uniforms, natural_tiles, sample_tiles
from attncompose.runtime.compiler import Pipeline

LENGTHS = (128, 256, 128)  # multiples of every tile below (block 16, the sampler's 128)


def pack(parts: list[Problem]) -> Problem:
    """The parts as one packed problem."""
    cat = lambda name: torch.cat([getattr(p, name) for p in parts], 1)
    lengths = tuple(p.lq for p in parts)
    return Problem(
        cat("q"),
        cat("k"),
        cat("v"),
        scale=parts[0].scale,
        causal=False,
        heads=parts[0].heads,
        kv_group=1,
        packed=Packing.of(lengths, "cpu"),
    )


def parts(seed: int = 0) -> list[Problem]:
    return [make_problem(2, n, d=16, seed=seed + i) for i, n in enumerate(LENGTHS)]


LSH = {"hash": {"op": "lsh", "num_projections": 3}}
DIAG = {"diag": {"op": "block", "select": ["hash"], "block_size": 16}}
BODIES = {  # bodies whose result does not depend on random draws
    "lsh-block": {**LSH, **DIAG},
    "lsh-code-mips": {
        "hash": {"op": "lsh", "num_projections": 3, "pairing": "code", "align": "mips"},
        **DIAG,
    },
    "sinks+lsh": {  # each part's own first keys (a part's positions start at 0)
        "sinks": {"op": "sink", "count": 4},
        **LSH,
        "diag": {"op": "block", "select": ["sinks", "hash"], "block_size": 16},
    },
    "window+lsh": {
        "window": {"op": "window", "width": 24},
        **LSH,
        "diag": {"op": "block", "select": ["window", "hash"], "block_size": 16},
    },
    "sample-everything": {"sampled": {"op": "uniform_sample", "sample_size": 4096}},
    "lsh+sample-everything": {
        **LSH,
        **DIAG,
        "residual": {"op": "uniform_sample", "exclude": ["diag"], "sample_size": 4096},
        "merged": {"op": "merge", "inputs": ["diag", "residual"]},
    },
}


@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("name", sorted(BODIES))
def test_a_packed_body_equals_its_parts_one_by_one(name, fuse):
    """Same pairs (the products counted), same result, as each part run on its own."""
    pipeline = Pipeline(recipe(BODIES[name]), fuse=fuse)
    assert pipeline.pack_quantum[pipeline.output] in (16, 128)
    each = parts()
    with count_products() as alone:
        want = [pipeline(p) for p in each]
    with count_products() as packed:
        got = pipeline(pack(each))
    assert packed[0] == alone[0]
    out = torch.cat([w.out for w in want], 1)
    assert ac.relative_error(got.out, out) < TIGHT
    assert torch.allclose(got.lse, torch.cat([w.lse for w in want], 1), atol=1e-5)


def test_every_draw_stays_in_its_part_with_its_parts_weight():
    """Natural tiles and detector tiles: each sampled key lies in its tile's part, and the
    reweighting is log(part length / m)."""
    p = pack(parts())
    part = p.packed.part
    m = 32
    g = torch.Generator().manual_seed(0)
    starts = (0, 128, 384)
    each = zip(starts, LENGTHS, strict=True)
    shuffled = torch.cat([torch.randperm(n, generator=g) + s for s, n in each])
    detector_like = shuffled.view(1, -1, 64).expand(2, -1, -1)  # each tile in one part
    for q_idx in (natural_tiles(2, p.lq, 128, "cpu"), detector_like):
        tiles = sample_tiles(p, draw_uniforms(p, m, 0, q_idx.shape[1]), q_idx)
        tile_part = part[q_idx[..., 0]]  # [N, T]
        assert (tiles.k_idx >= 0).all()
        assert torch.equal(part[tiles.k_idx], tile_part.unsqueeze(-1).expand_as(tiles.k_idx))
        length = torch.tensor(LENGTHS, dtype=torch.float32)[tile_part]
        assert torch.allclose(tiles.lse_shift, torch.log(length / m))


def test_mips_augmentation_per_part_equals_each_part_alone():
    each = parts(seed=3)
    for p in each:
        p.k.mul_(torch.rand(1) * 4)  # parts with different largest key norms
    packed = pack(each)
    q, k = mips_augment(packed.q, packed.k, packed.packed.part)
    alone = [mips_augment(p.q, p.k) for p in each]
    assert torch.allclose(q, torch.cat([a[0] for a in alone], 1))
    assert torch.allclose(k, torch.cat([a[1] for a in alone], 1))


def test_only_bodies_of_packable_steps_are_packed():
    """A body with a step that is not packable (top-k scores every key of a row; a block
    plan spans the whole row) has no pack quantum; a block plan refuses a packed problem."""
    q = lambda name: Pipeline(ac.load_recipe(name)).pack_quantum
    assert q("hyperattention")["merged"] == math.lcm(256, 128)
    assert q("lsh-only")["diag"] == 256
    assert q("sampling-only")["sampled"] == 128
    assert q("hyperattention-sinks")["merged"] == 256
    assert q("hyperattention-aligned")["merged"] == 128
    assert q("hyperattention-topk")["merged"] is None
    steps = {"s": {"op": "sink", "count": 4}, "b": {"op": "block", "select": ["s"]}}
    sinks = Pipeline(recipe(steps))
    assert sinks.pack_quantum["b"] is None
    with pytest.raises(ValueError, match="packed"):
        sinks.nodes["b"](pack(parts()), select=[sinks.nodes["s"](pack(parts()))])


def test_a_window_covers_no_pair_across_parts():
    """Every pair of a packed problem: covered iff both sit in one part and the part alone
    covers them (its queries and keys at the part's positions)."""
    each = parts()
    steps = {"w": {"op": "window", "width": 24}, "b": {"op": "block", "select": ["w"]}}
    window = Pipeline(recipe(steps)).nodes["w"]
    every = lambda p: window(p).covers(
        p, torch.arange(p.lq).view(1, -1, 1), torch.arange(p.lk).view(1, 1, -1)
    )[0]
    assert torch.equal(every(pack(each)), torch.block_diag(*(every(p) for p in each)))


def test_a_packed_problem_has_no_sub_ranges():
    with pytest.raises(ValueError, match="packed"):
        pack(parts()).sub(slice(0, 8), slice(0, 8), causal=False)
