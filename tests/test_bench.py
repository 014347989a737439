"""``attncompose bench``: sizes that suit the device, and each row shown as it is measured."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

import attncompose as ac
from attncompose.cli import bench as bench_command
from attncompose.cli import main
from attncompose.errors import AttncomposeError
from attncompose.eval import bench
from attncompose.runtime.model_tuned import ModelShape, ModelTunedFile, write_model_tuned


def test_defaults_suit_the_device():
    """32 heads of 128 in bf16 at 4096 and 8192 tokens ran 401 s on a 2-core CPU without a
    word while memory grew to 18.5 GB: on CPU the defaults are a size it measures in seconds."""
    cpu = bench.default_shape(torch.device("cpu"))
    assert (cpu.heads, cpu.head_dim, cpu.dtype, cpu.seq_lens) == (4, 64, "float32", (1024, 4096))
    gpu = bench.default_shape(torch.device("cuda"))
    assert (gpu.heads, gpu.head_dim, gpu.dtype, gpu.seq_lens) == (32, 128, "bfloat16", (4096, 8192))


def test_rows_are_shown_as_they_are_measured(monkeypatch):
    events: list[str] = []
    measure = bench.measure

    def timed(*args, **kwargs):
        events.append("measure")
        return measure(*args, **kwargs)

    show = bench_command.show_row
    monkeypatch.setattr(bench, "measure", timed)
    monkeypatch.setattr(bench_command, "show_row", lambda *a: (events.append("row"), show(*a)))
    done = CliRunner().invoke(main, ["bench", "exact", "--seq-lens", "32,64", "--device", "cpu"])
    assert done.exit_code == 0, done.output
    assert "exact on cpu, B=1 H=4 d=64 float32" in done.output  # the CPU defaults
    rows = [line for line in done.output.splitlines() if line.lstrip().startswith(("32", "64"))]
    names = ["exact", *(f"sdpa-{n}" for n in bench.sdpa_backends(torch.device("cpu")))]
    assert [line.split()[1] for line in rows] == names * 2
    assert events == ["measure", "row"] * len(rows)  # each row right after its measurement


def test_a_math_backend_that_would_not_fit_in_memory_is_skipped(monkeypatch):
    monkeypatch.setattr(bench, "memory_budget", lambda device: 1000)
    q, k, v = bench.random_qkv(1, 2, 64, 16, torch.float32, torch.device("cpu"))
    rows = {r.name: r for r in bench.bench_length(lambda *a, **kw: a[0], q, k, v, False, "id")}
    assert rows["sdpa-math"].median_ms is None
    assert rows["sdpa-math"].note.startswith("skipped: its score matrix needs")


def test_an_attention_per_layer_is_refused_naming_what_bench_takes(tmp_path):
    """A ModelTuning (a choice per layer) given to the library's bench was a raw TypeError from
    inside ('ModelTuning' object is not callable); the CLI refused it, the library did not."""
    shape = ModelShape(name="tiny", num_layers=1, num_q_heads=2, num_kv_heads=1, head_dim=16)
    path = tmp_path / "model.tuned.yaml"
    write_model_tuned(path, ModelTunedFile(model=shape))
    q, k, v = bench.random_qkv(1, 2, 32, 16, torch.float32, torch.device("cpu"))
    for function in (bench.bench_length, bench.iter_bench_length):
        with pytest.raises(AttncomposeError, match=r"not ModelTuning.*attn\.layer\(i\)"):
            function(ac.load(path), q, k, v, True, "tuned")
    with pytest.raises(AttncomposeError, match=r"not str 'streaming'.*ac\.compile\('streaming'\)"):
        bench.bench_length("streaming", q, k, v, True, "streaming")
