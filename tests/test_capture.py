"""Capture on the embedded model: null drift, real drift, hooks that leave nothing behind, the KV cache."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import assert_one_line_error, save_tiny_llama
from transformers import AttentionInterface

from driftscope import paths, store
from driftscope.config import CaptureConfig
from driftscope.hooks import decode
from driftscope.hooks.attention import attention_implementation, registered
from driftscope.hooks.layers import decoder_layers
from driftscope.run.capture import run_capture
from driftscope.run.tap import Tap, run_prompt
from driftscope.measure.drift import DRIFT_METRICS
from driftscope.measure.records import Context, Records

SITES = {"q", "k", "v", "attn_out", "resid", "logits"}


def _capture(tmp_path, name, **kw):
    config = CaptureConfig(**{"lengths": (48,), "prompts": 1, "decode": 2, **kw})
    out = run_capture(config, out=tmp_path / f"{name}.h5", progress=False, argv=["test"])
    with store.open_run(out) as run:
        return run.metrics(), run


@pytest.fixture(scope="module")
def null_run(tmp_path_factory, smol):
    return _capture(tmp_path_factory.mktemp("null"), "null", paths=("fp16", "fp16"))[0]


@pytest.fixture(scope="module")
def sage_run(tmp_path_factory, smol):
    return _capture(tmp_path_factory.mktemp("sage"), "sage", paths=("fp16", "sage8"))[0]


def test_null_drift_is_exactly_zero(null_run):
    d = null_run[null_run["metric"].isin(DRIFT_METRICS)]
    # every site, both modes, prefill and decode are present ...
    assert set(d[d["mode"] == "propagated"]["site"]) == SITES
    assert set(d[d["mode"] == "isolated"]["site"]) == {"attn_out"}
    assert set(d["phase"]) == {"prefill", "decode"}
    # ... and every drift is exactly nothing
    cos = d[d["metric"] == "cosine"]["value"]
    assert (cos == 1.0).all(), cos[cos != 1.0].head()
    others = d[d["metric"] != "cosine"]["value"]
    assert (others == 0.0).all(), d[(d["metric"] != "cosine") & (d["value"] != 0)].head()


def test_sage8_drifts_at_every_layer(sage_run, smol):
    n_layers = smol[2].n_layers
    a = sage_run[(sage_run["site"] == "attn_out") & (sage_run["metric"] == "rel_l2") & (sage_run["head"] == -1)]
    for (mode, phase), g in a.groupby(["mode", "phase"]):
        per_layer = g.groupby("layer")["value"].min()
        assert list(per_layer.index) == list(range(n_layers)), (mode, phase)
        assert (per_layer > 1e-4).all(), (mode, phase, per_layer[per_layer <= 1e-4])
        assert np.isfinite(per_layer).all()
    # The 8-bit path is far from the fp16 path, but not broken: cosine stays near 1 in prefill.
    cos = sage_run[(sage_run["site"] == "attn_out") & (sage_run["metric"] == "cosine") & (sage_run["phase"] == "prefill")]
    assert cos["value"].min() > 0.9


def test_smoothing_statistics_are_recorded(sage_run, smol):
    k = sage_run[sage_run["site"] == "k"]
    bias = k[k["metric"] == "channel_bias"]
    assert len(bias) == smol[2].n_layers * smol[2].n_kv_heads
    assert ((bias["value"] > 0) & (bias["value"] < 1)).all()
    err = k[k["metric"] == "k_quant_err"].pivot_table(index=["layer", "head"], columns="path", values="value")
    # Smoothing removes the shared offset, so K's INT8 error is smaller in most layers.
    assert (err["sage8"] < err["sage8-nosmooth"]).mean() > 0.5


def test_exception_inside_capture_leaves_nothing_behind(smol):
    model, _tok, _info = smol
    original = model.config._attn_implementation
    before = dict(AttentionInterface._global_mapping)

    class Boom(RuntimeError):
        pass

    def explode(*a, **k):
        raise Boom("raised inside the capture")

    tap = Tap([paths.get_path("fp16"), paths.get_path("sage8")], "propagated", Records())
    tap.attention = explode  # the first attention call raises
    for exc in (Boom, KeyboardInterrupt):
        if exc is KeyboardInterrupt:
            def interrupt(*a, **k):
                raise KeyboardInterrupt
            tap.attention = interrupt
        with pytest.raises(exc):
            run_prompt(model, torch.arange(8), tap, decode_steps=0)
        assert model.config._attn_implementation == original
        assert dict(AttentionInterface._global_mapping) == before
        assert all(not m._forward_hooks for m in model.modules())
        assert all(not layer._forward_hooks for layer in decoder_layers(model))


def test_sage_forward_never_touches_the_kv_cache(smol):
    """Layer 0's cached keys do not depend on the attention path: the kernel's in-place smoothing must not reach them."""
    model, _tok, _info = smol
    ids = torch.arange(100, 164)[None]
    with torch.inference_mode():
        _, ref = decode.forward(model, ids)
        with registered(), attention_implementation(model, "sage8"):
            logits, sage = decode.forward(model, ids)
            # a decode step too: the cache it appends to must stay exact
            _, sage = decode.forward(model, logits[:, -1].argmax(-1, keepdim=True), sage)
    k_ref, k_sage = ref.layers[0].keys, sage.layers[0].keys
    assert torch.equal(k_sage[:, :, : k_ref.shape[2]], k_ref)


def test_run_file_round_trip_gives_the_same_metrics(tmp_path, smol):
    model, _tok, info = smol
    records = Records(context=Context(prompt=0, length=40))
    tap = Tap([paths.get_path("fp16"), paths.get_path("sage8")], "propagated", records)
    run_prompt(model, torch.arange(200, 240), tap, decode_steps=1)
    columns = records.columns()
    with store.RunWriter(tmp_path / "rt.h5", kind="capture", argv=["test"], config={}, environment={}) as w:
        w.set_model(info.as_dict())
        w.add_prompt(0, np.arange(200, 240), "test")
        w.append("metrics", columns)
        w.commit_prompt(0)
    with store.open_run(tmp_path / "rt.h5") as run:
        back = run.metrics()
        assert run.model["head_dim"] == info.head_dim
    expected = pd.DataFrame(columns)
    back = back[list(expected.columns)]
    for col in expected.columns:
        assert back[col].tolist() == expected[col].tolist(), col


@pytest.mark.slow
def test_cli_end_to_end(tmp_path, run_cli, smol_folder):
    out = tmp_path / "cli.h5"
    proc = run_cli("capture", "--lengths", "32", "--prompts", "1", "--decode", "1", "--quiet", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "run file:" in proc.stdout and str(out) in proc.stdout
    assert "Worst head per layer" in proc.stdout
    with store.open_run(out) as run:
        assert run.status == "complete"
        assert run.argv[:3] == ["python", "-m", "driftscope.capture"]
        assert run.environment["sage_impl"]["sage8"] == "emulate"
        assert set(run.metrics()["layer"]) >= set(range(30))


def test_bad_input_exits_2_with_one_line(tmp_path, run_cli, smol_folder):
    assert_one_line_error(run_cli("capture", "--model", "no-such-model"), "unknown model", "no-such-model")
    assert_one_line_error(run_cli("capture", "--paths", "fp16,fp8"), "unknown path", "fp8", "sage8")
    assert_one_line_error(run_cli("capture", "--lengths", "9000"), "9000", "8192")
    assert_one_line_error(run_cli("capture", "--lengths", "0"), "lengths", "0")
    tiny = save_tiny_llama(tmp_path / "tiny32", smol_folder, head_dim=32)
    assert_one_line_error(run_cli("capture", "--model", str(tiny)), "head_dim", "32", "64, 96, 128")
    existing = tmp_path / "exists.h5"
    existing.write_bytes(b"not empty")
    assert_one_line_error(run_cli("capture", "--out", str(existing)), str(existing), "--overwrite")
    assert existing.read_bytes() == b"not empty"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU and the compiled sageattention kernel")
def test_null_drift_is_exact_with_the_compiled_kernel_in_place(tmp_path):
    """Rows 0 and 1 run fp16 while row 2 runs the compiled kernel in the same lockstep batch."""
    df, run = _capture(tmp_path, "cuda-null", paths=("fp16", "fp16", "sage8"), device="cuda", lengths=(300,))
    assert run.environment["sage_impl"]["sage8"] == "kernel"
    d = df[df["metric"].isin(DRIFT_METRICS)]
    null = d[d["path"] == "fp16"]
    assert set(null["site"]) == SITES and set(null["phase"]) == {"prefill", "decode"}
    assert (null[null["metric"] == "cosine"]["value"] == 1.0).all()
    assert (null[null["metric"] != "cosine"]["value"] == 0.0).all()
    sage = d[(d["path"] == "sage8") & (d["site"] == "attn_out") & (d["metric"] == "rel_l2") & (d["head"] == -1)]
    assert (sage["value"] > 1e-4).all()
