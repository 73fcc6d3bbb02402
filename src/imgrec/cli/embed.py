"""``imgrec embed``: feature vectors of images (files, folders, or a labelled split) for search, deduplication
and clustering (imgrec.infer.embed)."""
from __future__ import annotations

import sys

from imgrec.cli.common import DEVICE_HELP, add_command, json_option, print_json


EMBED_OPTIONS = (
    ("--model", {"help": "model directory (or --backbone)"}),
    ("--backbone", {"help": "a pretrained ImageNet backbone instead of a model, no training: a name of `imgrec "
                            "weights` (short or timm's, e.g. efficientnet_lite0); weights from the Hugging Face "
                            "cache, else downloaded"}),
    ("--image-size", {"type": int, "help": "with --backbone: the input size (default: the backbone's own, e.g. 224)"}),
    ("inputs", {"nargs": "*", "help": "image files and folders (searched recursively)"}),
    ("--data", {"help": "embed a labelled split of this data instead (default: the run's own, with --split)"}),
    ("--split", {"choices": ("train", "val", "test"), "help": "the split of --data (or the run's data)"}),
    ("--out", {"required": True, "help": "output file: .npy or .safetensors"}),
    ("--raw", {"action": "store_true", "help": "the features as they are, not L2-normalised"}),
    ("--batch-size", {"type": int, "default": 64}),
    ("--device", {"default": "auto", "help": DEVICE_HELP}),
    ("--on-bad-image", {"default": "skip", "choices": ("skip", "fail"),
                        "help": "an unreadable file: skip it with a warning (default) or stop (exit 2, nothing "
                                "written)"}),
    json_option("print a summary as JSON"),
)


def add_parsers(sub) -> None:
    add_command(sub, "embed", cmd_embed, EMBED_OPTIONS,
                help="write feature vectors of images for search, dedup or clustering",
                description="Write the model's penultimate features (the vector its classifier reads), one row per "
                            "image, to a .npy or .safetensors file, with <name>.index.csv listing the file (and "
                            "label) of each row. Rows are L2-normalised unless --raw: a dot product is then a cosine "
                            "similarity. --backbone NAME embeds with a pretrained ImageNet backbone as it is, without "
                            "a trained model.")


def cmd_embed(args) -> int:
    from imgrec.infer.embed import embed_files, write_embeddings

    clf = _embedder(args)
    if args.inputs:
        emb = embed_files(clf, args.inputs, normalize=not args.raw, batch_size=args.batch_size,
                          on_bad_image=args.on_bad_image)
    else:
        emb = _embed_split(clf, args)
    out, index = write_embeddings(emb, args.out)
    summary = {"out": str(out), "index": str(index), "rows": int(emb.features.shape[0]),
               "dim": int(emb.features.shape[1]), "normalized": not args.raw, "skipped": len(emb.skipped)}
    if args.backbone:
        summary["backbone"] = clf.meta.training["backbone"]
        summary["image_size"] = clf.image_size
    if args.json:
        print_json(summary)
    else:
        print(f"wrote {summary['rows']} × {summary['dim']} features to {out} (index: {index})")
    if emb.skipped:
        print(f"imgrec: warning: {len(emb.skipped)} unreadable file(s) skipped", file=sys.stderr)
    return 0


def _embedder(args):
    """The Classifier whose features are written: a model directory's, or a pretrained backbone's as it is."""
    from imgrec.errors import ConfigError
    from imgrec.infer.embed import backbone_classifier, index_path
    from imgrec.infer.predictor import Classifier

    if bool(args.inputs) == bool(args.data or args.split):
        raise ConfigError("give image files/folders, or --split (and --data) for a labelled split; not both")
    if bool(args.model) == bool(args.backbone):
        raise ConfigError("give --model DIR (a trained model) or --backbone NAME (a pretrained one); one of them")
    if args.backbone and (args.data or args.split):
        raise ConfigError("--backbone embeds image files and folders; --split and --data need a trained --model")
    if args.image_size is not None and not args.backbone:
        raise ConfigError("--image-size goes with --backbone; a model directory has its own size")
    if args.backbone:
        return backbone_classifier(args.backbone, image_size=args.image_size, device=args.device)
    from imgrec.modeldir import refuse_model_file
    refuse_model_file(args.out, args.model)  # embed --out runs/x/neighbours.safetensors overwrote the model's bank
    refuse_model_file(index_path(args.out), args.model)
    return Classifier.load(args.model, device=args.device)


def _embed_split(clf, args):
    """The features of a labelled split of the run's data (or of --data), with the file names and labels."""
    from imgrec.data.dataset import load_run_split
    from imgrec.data.transforms import convert_channels, resize_uint8
    from imgrec.infer.embed import Embeddings, embed_images

    s = load_run_split(clf.meta, data=args.data, split=args.split or "test")
    images = s.data.images
    if images.shape[-1] != clf.image_size or images.shape[-2] != clf.image_size:
        images = resize_uint8(images, clf.image_size)
    images = convert_channels(images, clf.channels)
    names = [f"{s.split}[{i}]" for i in range(len(images))]
    files = getattr(s.data, "paths", None)
    if files is not None and len(files) == len(images):
        names = [str(f) for f in files]
    labels = [s.bundle.classes[int(i)] for i in s.data.labels] if s.data.labels.ndim == 1 else None
    return Embeddings(embed_images(clf, images, normalize=not args.raw, batch_size=args.batch_size), names, labels,
                      classes=list(s.bundle.classes))
