"""``imgrec export-samples`` (some images of a dataset split as PNG files) and the ``imgrec data`` group:
``data check`` (corrupt files, sizes, class balance, duplicates and leakage) and ``data audit`` (likely label
errors by cross-fitting and confident learning)."""
from __future__ import annotations

import sys

from imgrec.cli.common import (DATA_DIR_HELP, SOURCE_HELP, VAL_SPLIT_HELP, add_command, bad_image_option,
                               existing_folder, json_option, print_json, val_split_value)

EXIT_CHECK_FAILED = 1  # --strict found leakage or conflicting duplicates (bad input exits 2)


SOURCE = ("source", {"help": SOURCE_HELP})
DATA_DIR = ("--data-dir", {"type": existing_folder, "help": DATA_DIR_HELP})
CHANNELS = ("--channels", {"type": int, "choices": (1, 3)})

EXPORT_SAMPLES_OPTIONS = (
    ("--data", {"default": "fashion-mnist"}),
    DATA_DIR,
    ("--split", {"default": "test", "choices": ("train", "val", "test")}),
    ("--count", {"type": int, "default": 8}),
    ("--out", {"required": True}),
)

CHECK_OPTIONS = (
    SOURCE,
    DATA_DIR,
    json_option("print the full report as JSON"),
    ("--html", {"metavar": "FILE", "help": "write a self-contained HTML report with thumbnails"}),
    ("--strict", {"action": "store_true", "help": f"exit {EXIT_CHECK_FAILED} when evaluation images leak into "
                                                  f"training or duplicates have conflicting labels"}),
    ("--near-threshold", {"type": float, "default": None,
                          "help": "minimum thumbnail correlation of near duplicates (default 0.995)"}),
    ("--hash-radius", {"type": int, "default": None,
                       "help": "pHash Hamming distance within which pairs are compared (default 10)"}),
    ("--workers", {"type": int, "default": None, "help": "decoding threads (default: the cores)"}),
    ("--limit", {"type": int, "default": 500, "help": "findings shown per section of the HTML report"}),
)

AUDIT_OPTIONS = (
    SOURCE,
    DATA_DIR,
    ("--folds", {"type": int, "default": 5, "help": "K of the cross-fitting (default 5)"}),
    ("--recipe", {"help": "training recipe of each fold (default: chosen for this machine and the data, as imgrec "
                          "train chooses it)"}),
    ("--force", {"action": "store_true",
                 "help": "rank even when the fold models are too weak to judge labels (default: refuse)"}),
    ("--model", {"dest": "name", "help": "architecture (default: the recipe's)"}),
    ("--epochs", {"type": int, "help": "epochs per fold (default: the recipe's)"}),
    ("--batch-size", {"type": int}),
    ("--lr", {"type": float}),
    ("--device", {"help": "auto, cpu, cuda, cuda:N, mps"}),
    ("--threads", {"type": int}),
    ("--image-size", {"type": int, "help": "training size (default 28 for named datasets, 32 for files)"}),
    CHANNELS,
    ("--splits", {"default": "train", "help": "comma-separated splits to audit (default train)"}),
    ("--method", {"default": "prune_by_noise_rate",
                  "choices": ("prune_by_noise_rate", "prune_by_class", "both", "confident_joint", "argmax"),
                  "help": "how suspects are flagged (default prune_by_noise_rate)"}),
    ("--rank-by", {"default": "self_confidence", "choices": ("self_confidence", "normalized_margin")}),
    ("--seed", {"type": int, "default": 0, "help": "fixes the folds"}),
    json_option("print the result (all suspects) as JSON"),
    ("--csv", {"metavar": "FILE", "help": "write the suspects as CSV"}),
    ("--json-out", {"metavar": "FILE", "help": "write the result as JSON to a file"}),
    ("--html", {"metavar": "FILE", "help": "write an HTML gallery of the suspects"}),
    ("--write-clean", {"metavar": "FILE.csv",
                       "help": "write a cleaned CSV list that `imgrec train --data FILE.csv` reads"}),
    ("--clean", {"default": "remove", "choices": ("remove", "relabel"),
                 "help": "what the cleaned list does with suspects (default remove)"}),
    ("--limit", {"type": int, "default": 500, "help": "suspects shown in the HTML gallery"}),
)

PACK_OPTIONS = (
    SOURCE,
    ("--out", {"required": True, "help": "the pack's folder (must not exist, or be empty)"}),
    ("--image-size", {"type": int, "help": "square side in pixels (default 28 for named datasets, 32 for files)"}),
    ("--channels", {"type": int, "choices": (1, 3), "help": "default: the data's own"}),
    ("--val-split", {"type": val_split_value, "help": VAL_SPLIT_HELP}),
    ("--split-seed", {"type": int, "default": 0}),
    ("--train-limit", {"type": int, "help": "pack only the first N training images"}),
    DATA_DIR,
    bad_image_option(),
    json_option("print the pack's metadata as JSON"),
)


def add_parsers(sub) -> None:
    add_command(sub, "export-samples", cmd_export_samples, EXPORT_SAMPLES_OPTIONS,
                help="write some dataset images as PNG files")
    data = sub.add_parser("data", help="check a dataset (duplicates, leakage, bad files) or audit its labels")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    for name, func, options, help, description in (
        ("check", cmd_data_check, CHECK_OPTIONS,
         "bad files, sizes, class counts, exact/near duplicates and train/test leakage",
         "Check a dataset before training: unreadable files, sizes and modes, class counts, exact and near duplicates "
         "within and across splits (leakage), and duplicates whose labels disagree."),
        ("audit", cmd_data_audit, AUDIT_OPTIONS, "rank likely label errors (cross-fitting + confident learning)",
         "Score every image with a model that never saw it (K-fold cross-fitting with a training recipe), then rank "
         "likely label errors by confident learning (Northcutt et al., JAIR 2021) with a suggested label."),
        ("pack", cmd_data_pack, PACK_OPTIONS, "decode a dataset once into streamable shards (LitData)",
         "Decode a dataset once, through the safe decoder, into LitData shards (raw uint8 pixels at the packed size) "
         "that `imgrec train --data DIR` streams from local disk or object storage (copy DIR to s3:// or gs://)."),
    ):
        add_command(dsub, name, func, options, help=help, description=description)


def cmd_export_samples(args) -> int:
    from imgrec.data.dataset import export_samples

    n = export_samples(args.data, args.split, args.count, args.out, data_dir=args.data_dir)
    print(f"wrote {n} images to {args.out}")
    return 0


def cmd_data_check(args) -> int:
    from imgrec.data.datacheck import HASH_RADIUS, NEAR_MIN_CORR, check, check_settings
    from imgrec.errors import ConfigError

    near = NEAR_MIN_CORR if args.near_threshold is None else args.near_threshold
    radius = HASH_RADIUS if args.hash_radius is None else args.hash_radius
    check_settings(near, radius, ConfigError, ("--near-threshold", "--hash-radius"))
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
    if clean:
        written.append(f"{clean['path']}: {clean['rows']} rows ({clean['removed']} removed, {clean['relabelled']} "
                       f"relabelled); train on it with: imgrec train --data {clean['path']}")
    print(result.summary())
    for w in written:
        print(f"wrote {w}")
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
