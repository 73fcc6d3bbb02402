"""``imgrec models``: the registry; ``imgrec models --timm PATTERN``: timm's architectures (``--model timm:NAME``)."""
from __future__ import annotations

from imgrec.cli.common import add_command, fmt_table, json_option, print_json


MODELS_OPTIONS = (
    ("--timm", {"nargs": "?", "const": "*", "metavar": "PATTERN",
                "help": "list timm architectures matching PATTERN (e.g. 'resnet1*'; no wildcard: names containing "
                        "it; default all), usable as --model timm:NAME "}),
    json_option(),
)


def add_parsers(sub) -> None:
    add_command(sub, "models", cmd_models, MODELS_OPTIONS, help="list the registered architectures (--timm: timm's)")


def cmd_models(args) -> int:
    if args.timm is not None:
        return _timm_models(args)
    from imgrec.catalog import model_catalog

    rows = model_catalog()
    if args.json:
        print_json(rows)
    else:
        print(fmt_table([[r["name"], f"{r['params'] / 1e6:.2f}M", r["default_image_size"], r["pretrained"] or "-",
                          r["description"][:60]] for r in rows],
                        ["model", "params (10 classes, RGB)", "input", "pretrained weights", "description"]))
    return 0


def _timm_models(args) -> int:
    from imgrec.catalog import timm_catalog

    rows = timm_catalog(args.timm)
    if args.json:
        print_json(rows)
        return 0
    if not rows:
        print(f"no timm architecture matches {args.timm!r}")
        return 0

    def tags(t: list[str]) -> str:
        return "-" if not t else ", ".join(t[:3]) + (f" (+{len(t) - 3} more)" if len(t) > 3 else "")
    print(fmt_table([[r["name"], r["default_image_size"], r["family"], tags(r["pretrained"])] for r in rows],
                    ["model", "input", "family", "pretrained tags (timm:NAME.TAG; --pretrained takes the first)"]))
    return 0
