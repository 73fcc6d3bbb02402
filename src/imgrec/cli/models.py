"""``imgrec models``: the registry."""
from __future__ import annotations

from imgrec.cli.common import add_json_option, fmt_table, print_json


def add_parsers(sub) -> None:
    p = sub.add_parser("models", help="list the registered architectures")
    add_json_option(p)
    p.set_defaults(func=cmd_models)


def cmd_models(args) -> int:
    from imgrec.catalog import model_catalog

    rows = model_catalog()
    if args.json:
        print_json(rows)
    else:
        print(fmt_table([[r["name"], f"{r['params'] / 1e6:.2f}M", r["default_image_size"], r["pretrained"] or "-",
                          r["description"][:60]] for r in rows],
                        ["model", "params (10 classes, RGB)", "input", "pretrained weights", "description"]))
    return 0
