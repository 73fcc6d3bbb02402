"""``imgrec export-samples`` (some images of a dataset split as PNG files) and the ``imgrec data`` group:
``data check`` (corrupt files, sizes, class balance, duplicates and leakage) and ``data audit`` (likely label
errors by cross-fitting and confident learning)."""
from __future__ import annotations

import sys

from imgrec.cli.common import add_bad_image_option, add_json_option, print_json

EXIT_CHECK_FAILED = 1  # --strict found leakage or conflicting duplicates (bad input exits 2)


def add_parsers(sub) -> None:
    p = sub.add_parser("export-samples", help="write some dataset images as PNG files")
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--data-dir")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--count", type=int, default=8)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_export_samples)

    data = sub.add_parser("data", help="check a dataset (duplicates, leakage, bad files) or audit its labels")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")

    c = dsub.add_parser("check", help="bad files, sizes, class counts, exact/near duplicates and train/test leakage",
                        description="Check a dataset before training: unreadable files, sizes and modes, class "
                                    "counts, exact and near duplicates within and across splits (leakage), and "
                                    "duplicates whose labels disagree.")
    c.add_argument("source", help="fashion-mnist, mnist, an image folder or a CSV list (path,label[,split])")
    c.add_argument("--data-dir", help="folder holding the named dataset's IDX files")
    add_json_option(c, "print the full report as JSON")
    c.add_argument("--html", metavar="FILE", help="write a self-contained HTML report with thumbnails")
    c.add_argument("--strict", action="store_true",
                   help=f"exit {EXIT_CHECK_FAILED} when evaluation images leak into training or duplicates "
                        f"have conflicting labels")
    c.add_argument("--near-threshold", type=float, default=None,
                   help="minimum thumbnail correlation of near duplicates (default 0.995)")
    c.add_argument("--hash-radius", type=int, default=None,
                   help="pHash Hamming distance within which pairs are compared (default 10)")
    c.add_argument("--workers", type=int, default=None, help="decoding threads (default: the cores)")
    c.add_argument("--limit", type=int, default=500, help="findings shown per section of the HTML report")
    c.set_defaults(func=cmd_data_check)

    a = dsub.add_parser("audit", help="rank likely label errors (cross-fitting + confident learning)",
                        description="Score every image with a model that never saw it (K-fold cross-fitting with a "
                                    "training recipe), then rank likely label errors by confident learning "
                                    "(Northcutt et al., JAIR 2021) with a suggested label.")
    a.add_argument("source", help="fashion-mnist, mnist, an image folder or a CSV list (path,label[,split])")
    a.add_argument("--data-dir", help="folder holding the named dataset's IDX files")
    a.add_argument("--folds", type=int, default=5, help="K of the cross-fitting (default 5)")
    a.add_argument("--recipe", help="training recipe of each fold (default: chosen for this machine and the data, "
                                    "as imgrec train chooses it)")
    a.add_argument("--force", action="store_true",
                   help="rank even when the fold models are too weak to judge labels (default: refuse)")
    a.add_argument("--model", dest="name", help="architecture (default: the recipe's)")
    a.add_argument("--epochs", type=int, help="epochs per fold (default: the recipe's)")
    a.add_argument("--batch-size", type=int)
    a.add_argument("--lr", type=float)
    a.add_argument("--device", help="auto, cpu, cuda, cuda:N, mps")
    a.add_argument("--threads", type=int)
    a.add_argument("--image-size", type=int, help="training size (default 28 for named datasets, 32 for files)")
    a.add_argument("--channels", type=int, choices=(1, 3))
    a.add_argument("--splits", default="train", help="comma-separated splits to audit (default train)")
    a.add_argument("--method", default="prune_by_noise_rate",
                   choices=("prune_by_noise_rate", "prune_by_class", "both", "confident_joint", "argmax"),
                   help="how suspects are flagged (default prune_by_noise_rate)")
    a.add_argument("--rank-by", default="self_confidence", choices=("self_confidence", "normalized_margin"))
    a.add_argument("--seed", type=int, default=0, help="fixes the folds")
    add_json_option(a, "print the result (all suspects) as JSON")
    a.add_argument("--csv", metavar="FILE", help="write the suspects as CSV")
    a.add_argument("--json-out", metavar="FILE", help="write the result as JSON to a file")
    a.add_argument("--html", metavar="FILE", help="write an HTML gallery of the suspects")
    a.add_argument("--write-clean", metavar="FILE.csv",
                   help="write a cleaned CSV list that `imgrec train --data FILE.csv` reads")
    a.add_argument("--clean", default="remove", choices=("remove", "relabel"),
                   help="what the cleaned list does with suspects (default remove)")
    a.add_argument("--limit", type=int, default=500, help="suspects shown in the HTML gallery")
    a.set_defaults(func=cmd_data_audit)

    k = dsub.add_parser("pack", help="decode a dataset once into streamable shards (LitData)",
                        description="Decode a dataset once, through the safe decoder, into LitData shards (raw "
                                    "uint8 pixels at the packed size) that `imgrec train --data DIR` streams from "
                                    "local disk or object storage (copy DIR to s3:// or gs://).")
    k.add_argument("source", help="fashion-mnist, mnist, an image folder or a CSV list (path,label[,split])")
    k.add_argument("--out", required=True, help="the pack's folder (must not exist, or be empty)")
    k.add_argument("--image-size", type=int, help="square side in pixels (default 28 for named datasets, 32 for files)")
    k.add_argument("--channels", type=int, choices=(1, 3), help="default: the data's own")
    k.add_argument("--val-split", type=float, help="fraction (<1) or count carved from training data")
    k.add_argument("--split-seed", type=int, default=0)
    k.add_argument("--train-limit", type=int, help="pack only the first N training images")
    k.add_argument("--data-dir", help="folder holding the named dataset's IDX files")
    add_bad_image_option(k)
    add_json_option(k, "print the pack's metadata as JSON")
    k.set_defaults(func=cmd_data_pack)


def cmd_export_samples(args) -> int:
    from imgrec.data.dataset import export_samples

    n = export_samples(args.data, args.split, args.count, args.out, data_dir=args.data_dir)
    print(f"wrote {n} images to {args.out}")
    return 0


def cmd_data_check(args) -> int:
    from imgrec.data.datacheck import HASH_RADIUS, NEAR_MIN_CORR, check
    from imgrec.errors import ConfigError

    near = NEAR_MIN_CORR if args.near_threshold is None else args.near_threshold
    radius = HASH_RADIUS if args.hash_radius is None else args.hash_radius
    if not 0 < near <= 1:
        raise ConfigError(f"--near-threshold must be in (0, 1], not {near}")
    if not 0 <= radius <= 64:
        raise ConfigError(f"--hash-radius must be in 0..64, not {radius}")
    if args.workers is not None and args.workers < 1:
        raise ConfigError("--workers must be at least 1")
    report = check(args.source, data_dir=args.data_dir, near_threshold=near, hash_radius=radius,
                   workers=args.workers, progress=not args.json)
    if args.html:
        report.write_html(args.html, limit=max(1, args.limit))
    if args.json:
        print_json(report.to_dict())
    else:
        print(report.summary())
        if args.html:
            print(f"wrote {args.html}")
    if args.strict and report.problems:
        print("imgrec: data check failed: " + "; ".join(report.problems), file=sys.stderr)
        return EXIT_CHECK_FAILED
    return 0


def cmd_data_audit(args) -> int:
    from imgrec.engine.audit import audit
    from imgrec.errors import ConfigError

    if args.write_clean and not args.write_clean.lower().endswith(".csv"):
        raise ConfigError(f"--write-clean {args.write_clean}: the cleaned list must be a .csv file")
    overrides = {k: getattr(args, k) for k in ("name", "epochs", "batch_size", "lr", "device", "threads")
                 if getattr(args, k) is not None}
    if args.epochs is not None and args.epochs < 1:
        raise ConfigError("--epochs must be at least 1")
    splits = tuple(s.strip() for s in args.splits.split(",") if s.strip())
    result = audit(args.source, folds=args.folds, recipe=args.recipe, overrides=overrides, data_dir=args.data_dir,
                   image_size=args.image_size, channels=args.channels, splits=splits, method=args.method,
                   rank_by=args.rank_by, seed=args.seed, progress=not args.json, force=args.force)
    written = []
    if args.csv:
        written.append(str(result.write_csv(args.csv)))
    if args.json_out:
        written.append(str(result.write_json(args.json_out)))
    if args.html:
        written.append(str(result.write_html(args.html, limit=max(1, args.limit))))
    clean = result.write_clean_csv(args.write_clean, mode=args.clean) if args.write_clean else None
    if args.json:
        d = result.to_dict()
        if clean:
            d["cleaned"] = clean
        print_json(d)
        return 0
    print(result.summary())
    for w in written:
        print(f"wrote {w}")
    if clean:
        print(f"wrote {clean['path']}: {clean['rows']} rows ({clean['removed']} removed, "
              f"{clean['relabelled']} relabelled); train on it with: imgrec train --data {clean['path']}")
    return 0


def cmd_data_pack(args) -> int:
    from imgrec.data.pack import pack

    meta = pack(args.source, args.out, image_size=args.image_size, channels=args.channels, val_split=args.val_split,
                split_seed=args.split_seed, data_dir=args.data_dir, on_bad_image=args.on_bad_image,
                train_limit=args.train_limit, progress=not args.json)
    if args.json:
        print_json(meta)
        return 0
    parts = ", ".join(f"{s} {v['images']:,}" for s, v in meta["splits"].items())
    size = sum(v["bytes"] for v in meta["splits"].values()) / 1e6
    skipped = f"; skipped {len(meta['skipped'])} unreadable file(s)" if meta["skipped"] else ""
    print(f"packed {args.source} → {args.out}: {parts} images, {meta['channels']}×{meta['image_size']}×"
          f"{meta['image_size']}, {size:,.1f} MB{skipped}; train with: imgrec train --data {args.out}")
    return 0
