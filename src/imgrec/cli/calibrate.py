"""``imgrec calibrate``: fit the temperature of a trained model on a labelled split and store it in its
``model.json`` (imgrec.eval.calibration, imgrec.eval.evaluate.calibrate_model_dir), for runs trained with ``--no-calibrate`` or on other data."""
from __future__ import annotations

import sys
from pathlib import Path

from imgrec.cli.common import add_json_option, existing_folder, print_json
from imgrec.modeldir import RunDir


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "calibrate", help="fit a temperature so that the model's scores say how sure it is",
        description="Temperature scaling: find the T > 0 that minimises the negative log-likelihood of "
                    "softmax(logits / T) on a labelled split (default: the run's validation split), with a prior "
                    "on log T that keeps a fit on a few dozen images near the T imgrec's recipes need (on "
                    "thousands it moves T by about 1%), and store it in the model directory's model.json; "
                    "predict, serve, eval, report and export then use it. The predicted labels do not change, "
                    "only their scores. The data options default to the run's own.")
    p.add_argument("--model", required=True, help="model directory (a run directory)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N, mps")
    p.add_argument("--data", help="dataset (default: the one it was trained on)")
    p.add_argument("--data-dir", type=existing_folder, help="folder holding the named dataset's IDX files (default: the run's)")
    p.add_argument("--split", default="val", choices=("val", "test", "train"),
                   help="split to fit on (default val; test only when asked, and then the test numbers no longer "
                        "measure the calibration honestly)")
    p.add_argument("--on-bad-image", default=None, choices=("fail", "skip"),
                   help="an unreadable image stops the command (fail) or is reported and left out (skip); "
                        "default: what the run was trained with")
    add_json_option(p)
    p.set_defaults(func=cmd_calibrate)


def cmd_calibrate(args) -> int:
    from imgrec.eval.evaluate import calibrate_model_dir

    if args.split == "test":
        print("imgrec: warning: fitting the temperature on the test split: ECE, NLL and Brier measured on it "
              "afterwards are optimistic", file=sys.stderr)
    elif args.split == "train":
        print("imgrec: warning: fitting the temperature on the training split: a network is over-confident on "
              "images it was trained on, so T comes out too small for new images", file=sys.stderr)
    entry = calibrate_model_dir(args.model, data=args.data, data_dir=args.data_dir, split=args.split,
                                on_bad_image=args.on_bad_image, device=args.device)
    exported = [p.name for p in sorted(Path(args.model).glob("*.onnx"))]
    if exported:
        print(f"imgrec: note: {', '.join(exported)} still hold{'s' if len(exported) == 1 else ''} the previous "
              f"temperature: run `imgrec export --model {args.model}` again", file=sys.stderr)
    if args.json:
        print_json({"model": str(args.model), "temperature": entry})
        return 0
    nll_only = f" (the NLL alone: {entry['T_nll']:.4f})" if "T_nll" in entry else ""
    print(f"T = {entry['T']:.4f}{nll_only} fitted on the {entry['split']} split (n={entry['n']}): "
          f"ECE {entry['ece_before']:.4f} → {entry['ece_after']:.4f}   NLL {entry['nll_before']:.4f} → "
          f"{entry['nll_after']:.4f}   Brier {entry['brier_before']:.4f} → {entry['brier_after']:.4f}")
    print(f"wrote {RunDir(args.model).meta}")
    return 0
