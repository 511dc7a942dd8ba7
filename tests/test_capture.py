"""Capture on the embedded model: null drift, real drift, hooks that leave nothing behind, the KV cache."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REPO, assert_one_line_error, run_in_process, save_tiny_llama, write_capture_run
from transformers import AttentionInterface

from driftscope import paths, store
from driftscope.config import CaptureConfig
from driftscope.hooks import decode
from driftscope.hooks.attention import attention_implementation, registered
from driftscope.hooks.layers import decoder_layers
from driftscope.run.capture import run_capture
from driftscope.run.tap import Tap, run_prompt
from driftscope.measure.fused import DRIFT_METRICS
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
    a = sage_run[(sage_run["site"] == "attn_out") & (sage_run["metric"] == "rel_l2") & (sage_run["head_index"] == -1)]
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
    err = k[k["metric"] == "k_quant_err"].pivot_table(index=["layer", "head_index"], columns="path", values="value")
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
    sage = d[(d["path"] == "sage8") & (d["site"] == "attn_out") & (d["metric"] == "rel_l2") & (d["head_index"] == -1)]
    assert (sage["value"] > 1e-4).all()


# -- every input checked before anything is written (issue 12) ----------------------------------------------------

def _cli(tiny, *args):
    """`python -m driftscope.capture` in this process on the tiny model: 16-token prompts, one decode step."""
    from driftscope import capture

    model, corpus = tiny
    return run_in_process(capture, "--model", str(model), "--corpus", str(corpus), "--lengths", "16", "--prompts",
                          "1", "--decode", "1", "--quiet", *args)


def _snapshot(folder):
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal of the compiled kernel")
def test_a_refused_option_leaves_a_finished_run_untouched(tmp_path, tiny):
    done = tmp_path / "done.h5"
    code, out, err = _cli(tiny, "--out", str(done))
    assert code == 0, err
    before = _snapshot(tmp_path)
    assert done in before and (tmp_path / "done" / "heatmap.png") in before
    assert_one_line_error(_cli(tiny, "--sage-impl", "kernel", "--overwrite", "--out", str(done)),
                          "--sage-impl kernel", "emulate")
    assert _snapshot(tmp_path) == before
    with store.open_run(done) as run:
        assert run.status == "complete" and len(run.metrics())


def test_interpret_without_the_variable_in_this_process_is_one_clear_error(tmp_path, tiny, monkeypatch):
    """A command or library call in a process that imported triton before TRITON_INTERPRET=1 cannot switch it."""
    import triton  # noqa: F401  (what torch's profiler or inductor may already have done)
    from driftscope.errors import DriftscopeError

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    out = tmp_path / "i.h5"
    assert_one_line_error(_cli(tiny, "--sage-impl", "interpret", "--out", str(out)), "TRITON_INTERPRET=1")
    model, corpus = tiny
    with pytest.raises(DriftscopeError, match="TRITON_INTERPRET=1"):
        run_capture(CaptureConfig(model=str(model), corpus=str(corpus), lengths=(16,), prompts=1, decode=1,
                                  sage_impl="interpret"), out=out, progress=False)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("args, fragments", [
    (["--device", "tpu"], ["unknown device 'tpu'", "cuda:N"]),
    (["--device", "cuda:x"], ["unknown device", "cuda:N"]),
    (["--device-map", "bogus"], ["bogus", "balanced_low_0", "sequential"]),
    (["--store", "q", "--layers", "99"], ["--layers 99", "0 to 1"]),
    (["--store", "q", "--heads", "99"], ["--heads 99", "0 to 2"]),
    (["--store", "k", "--heads", "1"], ["--heads 1", "k, v: 0 to 0"]),
    (["--store", "q", "--tokens", "100:200"], ["100:200", "0:16"]),
    (["--store", "q", "--tokens", "0:99999"], ["0:99999", "0:16"]),
    (["--layers", "0"], ["--store"]),
    (["--store", "resid", "--heads", "0"], ["--heads", "resid"]),
    (["--paths", "fp16,sage8,sage8"], ["sage8 twice"]),
    (["--paths", "fp16,fp16,fp16"], ["fp16 twice"]),
    (["--paths", "bogus"], ["unknown path 'bogus'", "fp16", "sage8-nosmooth"]),
    (["--corpus", "DIR"], ["is a directory"]),
    (["--out", "DIR"], ["is a directory"]),
    (["--out", "DIR/"], ["is a directory"]),
    (["--out", "/proc/driftscope-sub/x.h5"], ["/proc"]),
    (["--out", "/sys/driftscope-sub/x.h5"], ["/sys", "Permission denied"]),  # a place even root cannot write
    (["--out", "FILE/x.h5"], ["not a directory"]),
])
def test_bad_input_is_refused_before_any_file(tmp_path, tiny, monkeypatch, args, fragments):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "DIR").mkdir()
    (tmp_path / "FILE").write_text("a file")
    before = _snapshot(tmp_path)
    extra = [] if "--out" in args else ["--out", "new/run.h5"]
    assert_one_line_error(_cli(tiny, *args, *extra), *fragments)
    assert _snapshot(tmp_path) == before and sorted(tmp_path.iterdir()) == [tmp_path / "DIR", tmp_path / "FILE"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
@pytest.mark.parametrize("module", ["capture", "evaluate"])
def test_cuda_on_a_cpu_only_machine_is_one_line(tmp_path, module, monkeypatch):
    import importlib

    monkeypatch.chdir(tmp_path)
    code = run_in_process(importlib.import_module(f"driftscope.{module}"), "--device", "cuda")
    assert_one_line_error(code, "'cuda'", "no CUDA GPU", "--device cpu")
    assert not list(tmp_path.iterdir())


def test_the_accepted_paths_are_read_when_checked(monkeypatch):
    """Another path added to driftscope.paths (the Sage 2.x family) is accepted and listed without other edits."""
    from driftscope.errors import ConfigError

    monkeypatch.setattr(paths, "PATH_NAMES", (*paths.PATH_NAMES, "sage2-test"))
    assert CaptureConfig(paths=("fp16", "sage2-test")).paths[1] == "sage2-test"
    assert CaptureConfig(paths=("fp16", "fp16", "sage8")).paths == ("fp16", "fp16", "sage8")  # null check + path
    with pytest.raises(ConfigError, match="sage2-test"):
        CaptureConfig(paths=("fp16", "bogus"))


def test_a_run_that_never_starts_leaves_no_file(tmp_path, tiny, monkeypatch):
    import driftscope.run.capture as library

    model, corpus = tiny
    out = tmp_path / "runs" / "never.h5"
    config = CaptureConfig(model=str(model), corpus=str(corpus), lengths=(16,), prompts=2, decode=1)
    for exc in (RuntimeError("the first forward failed"), KeyboardInterrupt()):
        def fail(*a, **k):
            raise exc
        monkeypatch.setattr(library, "run_prompt", fail)
        with pytest.raises(type(exc)):
            run_capture(config, out=out, progress=False)
        assert not list(tmp_path.iterdir())  # no run file, no journal, no runs/ folder
    monkeypatch.undo()
    # so the same command simply runs again, no --overwrite needed
    assert run_capture(config, out=out, progress=False) == out
    calls = []

    def fail_second(model_, ids, tap, steps):  # a prompt committed, then a failure: the file stays
        if len(calls) == len(config.modes):
            raise RuntimeError("the second prompt failed")
        calls.append(1)
        return real(model_, ids, tap, steps)

    real = library.run_prompt
    monkeypatch.setattr(library, "run_prompt", fail_second)
    part = tmp_path / "part.h5"
    with pytest.raises(RuntimeError):
        run_capture(config, out=part, progress=False)
    with store.open_run(part) as run:
        assert run.status == "interrupted" and run.prompts()["complete"].tolist() == [True]


def test_summary_and_figures_refuse_a_run_without_prompts_in_one_line(tmp_path):
    from driftscope import figures, summary

    empty = write_capture_run(tmp_path / "empty.h5", prompts=0)
    with store.open_run(empty) as run:
        assert run.status == "interrupted" and run.metrics().empty
    assert_one_line_error(run_in_process(summary, str(empty)), "empty.h5", "finished no prompt", "--resume")
    assert_one_line_error(run_in_process(figures, str(empty), "--out", str(tmp_path / "f")), "finished no prompt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.h5"]


def test_figures_of_a_run_file_without_extension_go_beside_it(tmp_path, tiny):
    out = tmp_path / "runs" / "noext"
    code, stdout, err = _cli(tiny, "--out", str(out))
    assert code == 0, err
    assert (tmp_path / "runs" / "noext-figures" / "heatmap.png").is_file()
    assert f"figures: {out}-figures/" in stdout
    from driftscope import capture

    assert "FILE-figures/ when FILE has no extension" in " ".join(capture.build_parser().format_help().split())


def test_figures_already_beside_the_run_file_need_overwrite(tmp_path, tiny):
    out = tmp_path / "a.h5"
    assert _cli(tiny, "--out", str(out))[0] == 0
    out.unlink()  # the run file is gone, its figures are not
    before = _snapshot(tmp_path)
    assert_one_line_error(_cli(tiny, "--out", str(out)), "already holds figures", "--overwrite", "--no-figures")
    assert _snapshot(tmp_path) == before
    assert _cli(tiny, "--out", str(out), "--no-figures")[0] == 0


def test_summary_table_fits_120_columns():
    from driftscope.report import text

    rows = [dict(site="attn_out", head_index=h, layer=layer, mode=mode, phase=phase, path=path, metric=metric,
                 value=0.5 + 1e-3 * layer)
            for layer in range(30) for mode in ("propagated", "isolated") for phase in ("prefill", "decode")
            for path in ("fp16", "sage8", "sage8-nosmooth", "sage2-triton") for metric in ("cosine", "rel_l2")
            for h in range(3)]
    table = text.layer_summary(pd.DataFrame(rows))
    printed = text.format_layer_summary(table)
    assert max(len(line) for line in printed.splitlines()) <= 120, printed
    for path in ("fp16", "sage8", "sage8-nosmooth", "sage2-triton"):
        assert f"{path}:" in printed.splitlines()


def test_summary_markdown_is_the_table_the_readme_quotes():
    from driftscope import summary

    readme = (REPO / "README.md").read_text().splitlines()
    code, out, err = run_in_process(summary, str(REPO / "experiments/results/smollm2-135m-h100-2048.h5"),
                                    "--markdown", "sage8")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0] in readme and lines[1] in readme and lines[2] in readme


@pytest.mark.parametrize("choice, fragments", [
    ("bogus", ["'bogus' was not captured", "compared paths are: sage8"]),
    ("fp16", ["'fp16' is this run's reference", "sage8"]),
    ("sage8-nosmooth", ["not captured", "sage8"]),
])
def test_summary_markdown_names_the_compared_paths(tmp_path, choice, fragments):
    from driftscope import summary

    run = write_capture_run(tmp_path / "s.h5")
    assert_one_line_error(run_in_process(summary, str(run), "--markdown", choice), *fragments)


def test_summary_and_figures_warn_of_non_finite_attention_outputs(tmp_path):
    from driftscope import figures, summary

    clean = write_capture_run(tmp_path / "clean.h5", layers=6)
    code, _, err = run_in_process(summary, str(clean))
    assert code == 0 and "non-finite" not in err, err
    bad = {("sage8", "decode", layer): 3 for layer in (0, 1, 2, 3)} | {("sage8", "prefill", 5): 2}
    run = write_capture_run(tmp_path / "bad.h5", layers=6, nonfinite=bad)
    code, out, err = run_in_process(summary, str(run), "--markdown", "sage8")
    assert code == 0 and "non-finite" not in out and err.splitlines() == [
        "warning: sage8 returned 12 non-finite attention outputs (decode, layers 0-3)",
        "warning: sage8 returned 2 non-finite attention outputs (prefill, layer 5)"], err
    code, out, err = run_in_process(figures, str(run), "--out", str(tmp_path / "f"))
    assert code == 0 and "  warning: sage8 returned 12 non-finite attention outputs (decode, layers 0-3)" in out


def test_evaluate_non_finite_logits_are_one_line_per_side_and_stage():
    from driftscope.report import text

    table = pd.DataFrame({"prompt": [0, 0, 1, 1, 2], "side": ["base", "sage8", "base", "sage8", "sage8"],
                          "stage": ["perplexity"] * 4 + ["decode"], "values": 100, "nonfinite": [0, 4, 0, 1, 7]})
    assert text.evaluate_nonfinite_warnings(table) == [
        "warning: sage8 returned 7 non-finite logits (decode, 1 prompt)",
        "warning: sage8 returned 5 non-finite logits (perplexity, 2 prompts)"]
    assert text.evaluate_nonfinite_warnings(table.assign(nonfinite=0)) == []


def test_summary_of_an_evaluate_run_says_what_it_reads():
    from driftscope import summary

    path = REPO / "experiments/results/smollm2-135m-h100-evaluate.h5"
    assert_one_line_error(run_in_process(summary, str(path)), "is an evaluate run", "capture runs",
                          "driftscope.figures")
