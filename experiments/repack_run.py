"""Copy a run file with every large dataset gzip-compressed (the committed GPU captures were made smaller this way).

The copy holds the same groups, datasets, values and attributes; only the storage layout differs, so
`driftscope.open_run` reads the same tables from it. Metrics-only capture files shrink by about a fifth (most of
their bytes are float64 values, which compress poorly).

    python experiments/repack_run.py RUN.h5 PACKED.h5
"""
import argparse

import h5py


def repack(src: str, dst: str) -> None:
    with h5py.File(src, "r") as a, h5py.File(dst, "w-") as b:
        b.attrs.update(a.attrs)

        def copy(name, obj):
            if isinstance(obj, h5py.Group):
                b.require_group(name).attrs.update(obj.attrs)
                return
            packed = obj.size > 1000 and obj.dtype.kind != "O"
            kw = dict(compression="gzip", compression_opts=6, shuffle=True) if packed else {}
            d = b.create_dataset(name, data=obj[()], maxshape=obj.maxshape,
                                 chunks=True if packed or obj.chunks else None, **kw)
            d.attrs.update(obj.attrs)

        a.visititems(copy)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src")
    ap.add_argument("dst", help="must not exist")
    args = ap.parse_args()
    repack(args.src, args.dst)
