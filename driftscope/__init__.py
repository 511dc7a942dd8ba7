"""driftscope: where, how much and why SageAttention's 8-bit attention drifts from FP16 attention.

    import driftscope as ds
    path = ds.capture(model="smollm2-135m", paths=("fp16", "sage8"), lengths=(256,), out="runs/a.h5")
    run = ds.open_run(path)
    df = run.metrics()                       # tidy long-form DataFrame
    ds.plots.drift_heatmap(df, save_to="figures/heatmap")
    ds.register()                            # attn_implementation="sage8" for any transformers model
"""
__version__ = "0.1.0"

# setup.cfg installs the top-level hooks/ as driftscope.hooks. Run from a source checkout that is not installed
# (PYTHONPATH=.), hooks/ sits beside this package: let the submodule import find it there too.
import os as _os

_checkout = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_checkout, "hooks", "__init__.py")):
    __path__.append(_checkout)

_LAZY = {
    "capture": ("driftscope.engine", "capture"),
    "CaptureConfig": ("driftscope.config", "CaptureConfig"),
    "open_run": ("driftscope.store", "open_run"),
    "register": ("driftscope.hooks.attention", "register"),
    "evaluate": ("driftscope.evaluation", "evaluate"),
    "plots": ("driftscope.plots", None),
    "paths": ("driftscope.paths", None),
}


def __getattr__(name):
    # Lazy, so that `import driftscope` stays cheap and never imports transformers by itself.
    if name not in _LAZY:
        raise AttributeError(f"module 'driftscope' has no attribute {name!r}")
    import importlib

    module, attr = _LAZY[name]
    mod = importlib.import_module(module)
    return mod if attr is None else getattr(mod, attr)


__all__ = ["__version__", *_LAZY]
