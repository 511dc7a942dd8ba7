"""driftscope: where, how much and why SageAttention's 8-bit attention drifts from FP16 attention.

    import driftscope as ds
    run = ds.open_run("runs/smollm2-135m.h5")
    df = run.metrics()
"""
__version__ = "0.1.0"
