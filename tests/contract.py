"""The primitive contract every primitive's tests subclass, and the checks they share.

:class:`ReducesToExact`: a recipe whose knobs make it exact (one bucket covering everything,
a sample of every key, ...) must equal exact attention everywhere: odd lengths, causal and
not, decode, grouped-query attention.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import attncompose as ac
from attncompose.primitives.base import Partial, Problem

TIGHT = 1e-5  # relative error of float32 against the float64 reference
FLOAT_ROUNDING = 1e-6  # relative error of two float32 computations summing in other orders


def recipe(steps, **extra):
    return ac.load_recipe({"name": "case", "steps": steps, **extra})


class ReducesToExact:
    """A recipe whose knobs make it exact: it must equal exact attention everywhere."""

    steps: dict

    def attn(self):
        return ac.compile(recipe(self.steps))

    @pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
    @pytest.mark.parametrize(
        ("lq", "lk"),
        [(63, 63), (130, 130), (1, 97), (17, 130)],
        ids=["T63", "T130", "decode1", "decode17"],
    )
    def test_equals_exact(self, make_qkv, reference, causal, lq, lk):
        if not causal and lq != lk and lq == 1:
            pytest.skip("covered by the causal case")
        q, k, v = make_qkv(b=2, hq=4, hkv=2, lq=lq, lk=lk, d=16)
        out, lse = self.attn()(q, k, v, is_causal=causal, return_lse=True)
        ref, ref_lse = reference(q, k, v, is_causal=causal)
        assert ac.relative_error(out, ref) < TIGHT
        assert torch.allclose(lse.double(), ref_lse, atol=1e-4)

    def test_gqa_equals_repeated_kv(self, make_qkv):
        q, k, v = make_qkv(b=1, hq=6, hkv=2, lq=70, d=16)
        attn = self.attn()
        grouped = attn(q, k, v, is_causal=True)
        repeated = attn(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), is_causal=True)
        # equal to float rounding: a group's heads may run stacked as the rows of one call
        # (base.stack_heads), which the CPU kernel's matrix products block differently
        assert ac.relative_error(grouped, repeated) < FLOAT_ROUNDING

    def test_decode_equals_last_rows_of_full_causal(self, make_qkv):
        q, k, v = make_qkv(b=1, hq=2, hkv=2, lq=90, d=16)
        attn = self.attn()
        full = attn(q, k, v, is_causal=True)
        last = attn(q[:, :, -5:], k, v, is_causal=True)
        assert ac.relative_error(last, full[:, :, -5:]) < TIGHT


class WatchWrites(TorchDispatchMode):
    """``with WatchWrites() as sizes:`` the element counts of the tensors the ops inside
    make (every op's output that is not a view: copies, gathers, fresh buffers)."""

    def __enter__(self) -> list[int]:
        self.sizes: list[int] = []
        super().__enter__()
        return self.sizes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view and isinstance(out, torch.Tensor):
            self.sizes.append(out.numel())
        return out


def watch_expansions(monkeypatch) -> list[tuple[int, ...]]:
    """The key shapes of the grouped-query problems a call copies per query head
    (:meth:`Problem.expanded` of a problem with kv_group > 1), appended as they happen."""
    copies: list[tuple[int, ...]] = []
    expanded = Problem.expanded

    def watch(problem: Problem) -> Problem:
        if problem.kv_group > 1:
            copies.append(tuple(problem.k.shape))
        return expanded(problem)

    monkeypatch.setattr(Problem, "expanded", watch)
    return copies


def assert_partial_equal(got: Partial, want: Partial) -> None:
    """A kernel's (out, lse) against the float64 dense oracle's, on the rows that see keys."""
    finite = torch.isfinite(want.lse)
    assert torch.equal(torch.isfinite(got.lse), finite)
    assert torch.allclose(got.out.double()[finite], want.out[finite], atol=1e-5)
    assert torch.allclose(got.lse.double()[finite], want.lse[finite], atol=1e-5)


def assert_reads_no_later_key(attn, q, k, v, cuts, label=None) -> None:
    """Causal calls of ``attn`` (SDPA layout, grouped heads allowed): changing the values of
    the keys from each position c in ``cuts`` on leaves every output before c as it was."""
    before = attn(q, k, v, is_causal=True, enable_gqa=True)
    for cut in cuts:
        later = v.clone()
        later[:, :, cut:] += 100.0
        after = attn(q, k, later, is_causal=True, enable_gqa=True)
        assert torch.equal(after[:, :, :cut], before[:, :, :cut]), (label, cut)


# q, k, v that every SDPA-compatible module refuses with ac.compile's AttentionInputError
# (the modules ac.load gives read shapes to choose: they must check first)
BAD_QKV = pytest.mark.parametrize(
    "qkv",
    [
        (None, None, None),
        (torch.ones(64, 16),) * 3,
        (torch.ones(1, 4, 64, 16), torch.ones(1, 2, 64, 16), torch.ones(1, 1, 64, 16)),
    ],
    ids=["none", "2-D", "k-v-heads"],
)
