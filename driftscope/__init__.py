"""driftscope: where, how much and why SageAttention's 8-bit attention drifts from FP16 attention.

    import driftscope as ds
    model, tokenizer, info = ds.load_model("smollm2-135m")
    path = ds.run_capture(model="smollm2-135m", paths=("fp16", "sage8"), lengths=(256,), out="runs/a.h5")
    run = ds.open_run(path)
    df = run.metrics()                       # tidy long-form DataFrame
    ds.plots.drift_heatmap(df, save_to="figures/heatmap")
    with ds.registered():                    # attn_implementation="sage8" for any transformers model
        ...

The API names never equal a submodule's name (`python -m driftscope.capture` is the CLI module
`driftscope.capture`; the function is `ds.run_capture`), so they stay functions whatever was imported first.
"""
__version__ = "0.2.0"

_API = {
    "run_capture": ("driftscope.run.capture", "run_capture"),
    "run_evaluate": ("driftscope.run.evaluate", "run_evaluate"),
    "run_throughput": ("driftscope.run.throughput", "run_throughput"),
    "regenerate_figures": ("driftscope.report.figures", "regenerate"),
    "CaptureConfig": ("driftscope.config", "CaptureConfig"),
    "EvaluateConfig": ("driftscope.config", "EvaluateConfig"),
    "load_model": ("driftscope.models", "load_model"),
    "open_run": ("driftscope.store", "open_run"),
    "register": ("driftscope.hooks.attention", "register"),
    "registered": ("driftscope.hooks.attention", "registered"),
    "attention_implementation": ("driftscope.hooks.attention", "attention_implementation"),
    "DriftscopeError": ("driftscope.errors", "DriftscopeError"),
    "plots": ("driftscope.report.plots", None),
    "tables": ("driftscope.report.tables", None),
}


def __getattr__(name):
    # Lazy, so that `import driftscope` stays cheap and never imports transformers by itself.
    if name not in _API:
        raise AttributeError(f"module 'driftscope' has no attribute {name!r}")
    import importlib

    module, attr = _API[name]
    value = importlib.import_module(module)
    value = value if attr is None else getattr(value, attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted([*globals(), *_API])


__all__ = ["__version__", *_API]
