"""``imgrec export-samples``: some images of a dataset split as PNG files (for trying predict, serve, explain)."""
from __future__ import annotations


def add_parsers(sub) -> None:
    p = sub.add_parser("export-samples", help="write some dataset images as PNG files")
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--data-dir")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--count", type=int, default=8)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_export_samples)


def cmd_export_samples(args) -> int:
    from imgrec.data.dataset import export_samples

    n = export_samples(args.data, args.split, args.count, args.out, data_dir=args.data_dir)
    print(f"wrote {n} images to {args.out}")
    return 0
