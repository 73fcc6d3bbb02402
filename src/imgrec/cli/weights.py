"""``imgrec weights``: the pretrained backbones and whether their weights are on this machine;
``imgrec weights fetch NAME`` downloads them now; ``imgrec weights add FILE --as NAME`` takes a local file
(air-gapped machines) into the Hugging Face cache, where timm and imgrec find it."""
from __future__ import annotations

from imgrec.cli.common import add_command, fmt_table, json_option, print_json

# The short names, for --help without importing the library (tests/test_weights.py keeps them in step).
NAMES = ("efficientnet_lite0", "mobilenetv3_large_100", "efficientnet_b0", "resnet18", "convnext_atto",
         "efficientnet_lite1", "resnet50")
NAME_HELP = f"backbone: {', '.join(NAMES)} (or its timm model name)"

ADD_OPTIONS = (
    ("file", {"metavar": "FILE", "help": "weights file: .safetensors or a weights-only .pt/.pth (timm's key names, "
                                         "or lukemelas' EfficientNet-PyTorch layout)"}),
    ("--as", {"dest": "as_name", "metavar": "NAME", "required": True, "help": NAME_HELP}),
    json_option("print the result as JSON"),
)
FETCH_OPTIONS = (
    ("name", {"metavar": "NAME", "help": NAME_HELP}),
    json_option("print the result as JSON (no progress bar)"),
)


def add_parsers(sub) -> None:
    p = add_command(sub, "weights", cmd_weights, (json_option(),),
                    help="pretrained backbones on this machine (add a local file, fetch one)",
                    description="List the pretrained ImageNet backbones imgrec knows and whether their weights are "
                                "in the Hugging Face cache ($HF_HUB_CACHE or $HF_HOME/hub), with size and licence.")
    wsub = p.add_subparsers(dest="weights_command", metavar="SUBCOMMAND")
    add_command(wsub, "add", cmd_weights_add, ADD_OPTIONS, help="take a local weights file into the cache",
                description="Check a local weights file by key names and shapes against the backbone's architecture "
                            "and write it into the Hugging Face cache, where the defaults find it (offline too).")
    add_command(wsub, "fetch", cmd_weights_fetch, FETCH_OPTIONS, help="download a backbone's weights now",
                description="Download a backbone's weights from the Hugging Face Hub ($HF_ENDPOINT for a mirror) "
                            "into the cache and verify them; nothing is downloaded when HF_HUB_OFFLINE is set.")


def cmd_weights(args) -> int:
    from imgrec.models.weights import list_weights

    rows = list_weights()
    if args.json:
        print_json(rows)
        return 0
    where = {"hf-cache": "yes", "torch-cache": "yes (torch's cache)", "absent": "no"}
    print(fmt_table([[r["name"], r["model"], where[r["source"]], f"{r['size_mb']:.1f} MB", r["licence"],
                      r["path"] or "-"] for r in rows],
                    ["name", "model", "on this machine", "size", "licence", "path"]))
    return 0


def cmd_weights_add(args) -> int:
    from imgrec.models.weights import add_weights, backbone

    path = add_weights(args.file, args.as_name)
    b = backbone(args.as_name)
    if args.json:
        print_json({"name": b.name, "model": b.model, "licence": b.licence, "path": str(path)})
    else:
        print(f"added {args.file} as {b.name} ({b.model}, licence {b.licence}): {path}")
    return 0


def cmd_weights_fetch(args) -> int:
    from imgrec.models.weights import backbone, fetch_weights

    path = fetch_weights(args.name, progress=not args.json)
    b = backbone(args.name)
    if args.json:
        print_json({"name": b.name, "model": b.model, "licence": b.licence, "path": str(path)})
    else:
        print(f"{b.name} ({b.model}, licence {b.licence}): {path}")
    return 0
