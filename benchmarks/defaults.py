"""imgrec's defaults on the data people bring, against a small sweep of hand settings.

    python benchmarks/defaults.py [--datasets fm200-grey,fm2cls] [--sweep small|full|none] [--repeats 1]
                                  [--work /tmp/imgrec-defaults] [--rebuild] [--set fm2cls.n_train=600]
                                  [--out benchmarks/results/defaults.md]
    python benchmarks/defaults.py --quick        # tiny folders, 2 one-epoch configs: checks the script

The suite: user-like ImageFolder trees built on this machine from Fashion-MNIST by ``userlike.make_user_folder``
(PNG and JPEG at varied sizes, some non-square, grey and/or colour: the garment tinted, its hue following the class
for half of the images, composited on coloured, noisy or gradient backgrounds; junk files in some). Training
images come from Fashion-MNIST's train split, test images from its test split (disjoint); every tree has
``train/`` and ``test/`` only, so imgrec carves validation from train and the test split is never used for a choice.
No scikit-image or scikit-learn sample data (those are kept aside for acceptance checks).

For every dataset:

1. **the default**: ``imgrec train --data DIR --out RUN`` and nothing else, the whole command timed
   (``time.perf_counter`` around the subprocess: interpreter start, imports, decoding, training, the final test
   evaluation); its accuracy is ``metrics.test_acc`` of the run's ``model.json``. When it stops (a junk ``._`` file
   is an unreadable image), that is reported, and the same command with ``--on-bad-image skip`` is run as well so
   the gap can still be measured.
2. **the sweep**: 6 (``small``) or 10 (``full``) hand settings (model, batch, optimizer, lr, epochs, image size), all
   with ``--val-last 0`` (validate every epoch, keep the best epoch) and ``--on-bad-image skip``. The best is chosen
   on **validation** accuracy (``metrics.val_acc``; a tie goes to the faster run); its test accuracy and time are
   reported. The test accuracy of the other settings is listed for reference only.
3. **the gap**: best's test accuracy − default's, in points, and the default's time against the best's.

``--repeats N`` runs the default and the chosen setting N times each (same command; means reported, all runs in the
JSON). Built folders are reused while their stamp (``STAMP.json``: the dataset's spec) matches; ``--rebuild``
rebuilds them. Results are appended as one section to ``--out`` (default ``benchmarks/results/defaults.md``;
``--quick``: ``WORK/quick/defaults.md``) and the raw numbers to the ``.json`` beside it.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _machine import cpuinfo  # noqa: E402
from userlike import make_user_folder, spec_hash  # noqa: E402

BUILDER_VERSION = 1

# name -> make_user_folder arguments
SUITE: dict[str, dict] = {
    "fm200-grey": dict(n_train=200, n_test=500, classes=None, colour="grey", sizes=[28, 64], junk=False, seed=200),
    "fm1000-colour": dict(n_train=1000, n_test=1000, classes=None, colour="colour", sizes=[40, 160], junk=True,
                          seed=1000),
    "fm5000-mixed": dict(n_train=5000, n_test=2000, classes=None, colour="mixed", sizes=[40, 200], junk=False,
                         seed=5000),
    "fm2cls": dict(n_train=300, n_test=500, classes=["Pullover", "Coat"], colour="colour", sizes=[64, 200],
                   junk=True, seed=2),
    "fm20cls": dict(n_train=1000, n_test=1000, classes=None, colour="mixed", sizes=[40, 120], junk=False, seed=20,
                    variants=2),
}
DESCRIPTION = {
    "fm200-grey": "10 classes, grey, 28–64 px",
    "fm1000-colour": "10 classes, all colour, 40–160 px, junk files",
    "fm5000-mixed": "10 classes, half grey half colour, 40–200 px",
    "fm2cls": "2 classes (Pullover, Coat), colour, 64–200 px, junk files",
    "fm20cls": "20 classes (each garment upright and turned 90°), mixed, 40–120 px",
}
QUICK = dict(n_train=60, n_test=40, sizes=[28, 48])


def _cfg(model: str, batch: int, opt: str, lr: float, epochs: int, size: int | None = None) -> tuple[str, list[str]]:
    name = f"{model}-b{batch}-{opt}{lr:g}-e{epochs}" + (f"-{size}px" if size else "")
    args = ["--model", model, "--batch-size", str(batch), "--optimizer", opt, "--lr", f"{lr:g}", "--epochs", str(epochs)]
    return name, args + (["--image-size", str(size)] if size else [])


SWEEP_SMALL = [
    _cfg("fastnet", 32, "sgd", 0.05, 30),
    _cfg("fastnet", 16, "sgd", 0.03, 40),
    _cfg("fastnet", 32, "sgd", 0.05, 30, 64),
    _cfg("fastnet_small", 32, "sgd", 0.05, 30),
    _cfg("simple_cnn", 32, "adam", 1e-3, 20),
    _cfg("fastnet", 64, "adamw", 3e-3, 30),
]
SWEEP_FULL = SWEEP_SMALL + [
    _cfg("fastnet", 64, "sgd", 0.1, 40),
    _cfg("fastnet", 16, "sgd", 0.03, 40, 64),
    _cfg("simple_cnn", 16, "adam", 1e-3, 30, 64),
    _cfg("resnet18", 64, "sgd", 0.05, 15),
]
SWEEP_QUICK = [_cfg("fastnet", 16, "sgd", 0.05, 1), _cfg("simple_cnn", 16, "adam", 1e-3, 1)]
SWEEP_COMMON = ["--val-last", "0", "--on-bad-image", "skip"]


# ---------------------------------------------------------------------------------------------------- machine
def cpu_facts() -> dict:
    info = cpuinfo("model name", "cpu family", "flags")
    have = set(info.get("flags", "").split())
    facts = {"model_name": info.get("model name") or platform.processor() or "unknown",
             "cpu_family": info.get("cpu family"),
             "flags": [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in have]}
    facts["cores"] = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return facts


def load_avg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def torch_version() -> str:
    r = subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__)"], capture_output=True, text=True)
    return r.stdout.strip() or "unknown"


# ---------------------------------------------------------------------------------------------------- datasets
def dataset_spec(name: str, quick: bool, overrides: dict) -> dict:
    if name not in SUITE:
        raise SystemExit(f"unknown dataset {name!r} (the suite: {', '.join(SUITE)})")
    spec = dict(SUITE[name])
    if quick:
        spec.update(QUICK)
    spec.update(overrides.get(name, {}))
    return spec


def build(name: str, spec: dict, root: Path, rebuild: bool) -> tuple[Path, bool]:
    """The dataset's folder, built unless its stamp matches ``spec``; returns (folder, built now)."""
    stamp = root / "STAMP.json"
    want = {"name": name, "spec": spec, "builder": BUILDER_VERSION, "hash": spec_hash({**spec, "v": BUILDER_VERSION})}
    if not rebuild and stamp.exists():
        try:
            if json.loads(stamp.read_text()).get("hash") == want["hash"]:
                return root, False
        except (OSError, ValueError):
            pass
    t0 = time.perf_counter()
    kw = dict(spec)
    summary = make_user_folder(root, kw.pop("n_train"), kw.pop("n_test"), kw.pop("classes"), kw.pop("colour"),
                               tuple(kw.pop("sizes")), kw.pop("junk"), kw.pop("seed"), **kw)
    want["build_s"] = round(time.perf_counter() - t0, 2)
    want["counts"] = summary["counts"]
    stamp.write_text(json.dumps(want, indent=2) + "\n")  # last: a half-built folder has no stamp
    print(f"built {name} in {want['build_s']:.1f} s: {summary['counts']}", flush=True)
    return root, True


# ---------------------------------------------------------------------------------------------------- runs
def imgrec_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "imgrec"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "imgrec.cli"]


def run_train(data: Path, out: Path, extra: list[str], log: Path) -> dict:
    """One whole ``imgrec train`` command, timed; its numbers from the run's model.json."""
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = imgrec_cmd() + ["train", "--data", str(data), "--out", str(out), *extra]
    load = load_avg()
    t0 = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - t0
    text = log.read_text(errors="replace")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    res = {"cmd": " ".join(["imgrec"] + cmd[len(imgrec_cmd()):]), "rc": p.returncode, "wall_s": round(wall, 2),
           "load_1min": load[0] if load else None, "first_line": lines[0] if lines else "", "log": str(log)}
    meta_path = out / "model.json"
    if p.returncode != 0 or not meta_path.exists():
        res["error"] = (lines[-1] if lines else f"exit {p.returncode}").replace(str(data), "DIR")
        return res
    meta = json.loads(meta_path.read_text())
    m = meta.get("metrics") or {}
    cfg = meta.get("config") or {}
    tr = cfg.get("train") or {}
    model = meta.get("model")
    res.update(val_acc=m.get("val_acc"), test_acc=m.get("test_acc"), best_epoch=m.get("best_epoch"),
               epochs_run=m.get("epochs_run"), train_time_s=meta.get("train_time_s"),
               model=model.get("name") if isinstance(model, dict) else model,
               image_size=meta.get("image_size"), channels=meta.get("channels"),
               recipe=(meta.get("training") or {}).get("recipe") or cfg.get("recipe"),
               data_recipe=((meta.get("training") or {}).get("data_recipe") or {}).get("reason"),
               batch_size=tr.get("batch_size"), lr=tr.get("lr"), optimizer=tr.get("optimizer"),
               epochs=tr.get("epochs"), n_train=_total(((meta.get("data") or {}).get("counts") or {}).get("train")))
    epoch_s = _epoch_times(out / "metrics.csv")
    if epoch_s:
        res.update(epoch_s_median=round(statistics.median(epoch_s), 3), epoch_s_sum=round(sum(epoch_s), 2))
    if res["test_acc"] is None:
        res["error"] = "no metrics.test_acc in model.json"
    return res


def _total(counts) -> int | None:
    return sum(counts) if isinstance(counts, list) else counts


def _epoch_times(path: Path) -> list[float]:
    import csv
    try:
        with open(path) as f:
            return [float(r["epoch_time_s"]) for r in csv.DictReader(f) if r.get("epoch_time_s")]
    except (OSError, ValueError, KeyError):
        return []


def _mean(runs: list[dict], key: str) -> float | None:
    vals = [r[key] for r in runs if r.get(key) is not None]
    return statistics.fmean(vals) if vals else None


def bench_dataset(name: str, data: Path, runs_dir: Path, sweep: list[tuple[str, list[str]]], repeats: int) -> dict:
    out: dict = {"dataset": name}
    print(f"[{name}] default: imgrec train --data {data}", flush=True)
    default = [run_train(data, runs_dir / f"default-r{k}", [], runs_dir / f"default-r{k}.log") for k in range(repeats)]
    out["default"] = default
    _say(name, "default", default)
    if any("error" in r for r in default):
        # the default stopped (a junk ._ file is an unreadable image): measure it as a user's next try would be
        print(f"[{name}] default stopped: {default[0].get('error')}; again with --on-bad-image skip", flush=True)
        skip = [run_train(data, runs_dir / f"default-skip-r{k}", ["--on-bad-image", "skip"],
                          runs_dir / f"default-skip-r{k}.log") for k in range(repeats)]
        out["default_skip"] = skip
        _say(name, "default --on-bad-image skip", skip)
    out["sweep"] = []
    for cname, args in sweep:
        r = run_train(data, runs_dir / cname, args + SWEEP_COMMON, runs_dir / f"{cname}.log")
        r["config"] = cname
        out["sweep"].append(r)
        _say(name, cname, [r])
    ok = [r for r in out["sweep"] if r.get("val_acc") is not None and "error" not in r]
    if ok:
        best = max(ok, key=lambda r: (r["val_acc"], -r["wall_s"]))
        args = dict(sweep)[best["config"]]
        again = [run_train(data, runs_dir / f"{best['config']}-r{k}", args + SWEEP_COMMON,
                           runs_dir / f"{best['config']}-r{k}.log") for k in range(1, repeats)]
        out["best"] = {"config": best["config"], "args": args + SWEEP_COMMON, "runs": [best] + again}
        if again:
            _say(name, f"{best['config']} (repeats)", again)
    return out


def _say(ds: str, what: str, runs: list[dict]) -> None:
    for r in runs:
        if "error" in r:
            print(f"[{ds}] {what}: FAILED in {r['wall_s']:.1f} s: {r['error']}", flush=True)
        else:
            print(f"[{ds}] {what}: val {_pct(r['val_acc'])} test {_pct(r['test_acc'])} in {r['wall_s']:.1f} s "
                  f"({r.get('model')}, {r.get('epochs_run')} epochs, {r.get('image_size')} px)", flush=True)


# ---------------------------------------------------------------------------------------------------- report
def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def summarize(res: dict) -> dict:
    """The numbers of one dataset's row."""
    default = res["default"]
    d_ok = [r for r in default if "error" not in r]
    row = {"default_failed": len(d_ok) < len(default), "default_error": next((r["error"] for r in default
                                                                               if "error" in r), None)}
    ref = default if d_ok else res.get("default_skip", [])
    ref_ok = [r for r in ref if "error" not in r]
    row.update(default_test=_mean(ref_ok, "test_acc"), default_val=_mean(ref_ok, "val_acc"),
               default_s=_mean(ref_ok, "wall_s"), default_skip=not d_ok and bool(ref_ok),
               default_what=(f"{ref_ok[0].get('model')}, {ref_ok[0].get('epochs_run')} ep, b{ref_ok[0].get('batch_size')}"
                             f", {ref_ok[0].get('image_size')} px") if ref_ok else "")
    best = res.get("best")
    if best:
        bo = [r for r in best["runs"] if "error" not in r]
        row.update(best_config=best["config"], best_val=_mean(bo, "val_acc"), best_test=_mean(bo, "test_acc"),
                   best_s=_mean(bo, "wall_s"))
        if row["default_test"] is not None and row["best_test"] is not None:
            row["gap_points"] = 100 * (row["best_test"] - row["default_test"])
            row["time_ratio"] = row["default_s"] / row["best_s"] if row["best_s"] else None
    return row


def markdown(results: list[dict], env: dict, args: argparse.Namespace) -> str:
    cpu = env["cpu"]
    la, lb = env["load_start"], env["load_end"]
    lines = [
        f"## {env['date']}{' (quick check, not a measurement)' if args.quick else ''}",
        "",
        f"- CPU: {cpu['model_name']} (cpu family {cpu['cpu_family']}; {cpu['cores']} cores available; flags: "
        + ", ".join(f"{f} {'yes' if f in cpu['flags'] else 'no'}" for f in ("avx2", "avx512_bf16", "amx_bf16"))
        + ")",
        f"- load average (1/5/15 min) at the start: {' / '.join(map(str, la))}; at the end: {' / '.join(map(str, lb))}",
        f"- torch {env['torch']}, Python {env['python']}, imgrec at commit {env['commit']}",
        f"- `{env['command']}`: sweep `{'quick' if args.quick else args.sweep}` ({env['n_configs']} settings), {args.repeats} repeat(s); "
        f"whole {env['total_s'] / 60:.1f} min",
        "",
        "| dataset | train / test images | default (no options) | default test acc | default time | sweep best "
        "(chosen on val) | best val acc | best test acc | best time | gap (points) | default time / best time |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for res in results:
        s = summarize(res)
        counts = res.get("counts", {})
        n = f"{counts.get('train', {}).get('images', '?')} / {counts.get('test', {}).get('images', '?')}"
        acc = _pct(s["default_test"])
        if s["default_failed"]:
            acc = (f"**stopped** ({'with `--on-bad-image skip`: ' + acc if s['default_skip'] else 'no number'})")
            notes.append(f"- {res['dataset']}: the default stopped: `{s['default_error']}`")
        t = "–" if s["default_s"] is None else f"{s['default_s']:.1f} s"
        if "best_config" in s:
            gap = "–" if s.get("gap_points") is None else f"{s['gap_points']:+.1f}"
            ratio = "–" if s.get("time_ratio") is None else f"{s['time_ratio']:.2f}×"
            lines.append(f"| {res['dataset']} | {n} | {s['default_what']} | {acc} | {t} | `{s['best_config']}` | "
                         f"{_pct(s['best_val'])} | {_pct(s['best_test'])} | {s['best_s']:.1f} s | {gap} | {ratio} |")
        else:
            lines.append(f"| {res['dataset']} | {n} | {s['default_what']} | {acc} | {t} | – | – | – | – | – | – |")
    lines += ["", "Datasets: " + "; ".join(f"**{r['dataset']}**: {r.get('description', '')}" for r in results) + "."]
    if notes:
        lines += [""] + notes
    lines += ["", "<details><summary>every run (test accuracy of the settings not chosen: reference only)</summary>", ""]
    for res in results:
        first = next((r["first_line"] for r in res["default"] + res.get("default_skip", [])
                      if r.get("first_line") and "error" not in r), res["default"][0].get("first_line", ""))
        lines += [f"**{res['dataset']}**: the default's first line: `{first[:200]}`", "",
                  "| run | val acc | test acc | epochs | median epoch | time |", "|---|---|---|---|---|---|"]
        for label, runs in (("default", res["default"]), ("default --on-bad-image skip", res.get("default_skip", []))):
            for r in runs:
                lines.append(_detail_row(label, r))
        for r in res["sweep"]:
            mark = " ← chosen" if res.get("best", {}).get("config") == r["config"] else ""
            lines.append(_detail_row(f"`{r['config']}`{mark}", r))
        lines.append("")
    lines += ["</details>", ""]
    return "\n".join(lines)


def _detail_row(label: str, r: dict) -> str:
    if "error" in r:
        return f"| {label} | failed: {r['error'][:120]} | | | | {r['wall_s']:.1f} s |"
    ep = "–" if r.get("epoch_s_median") is None else f"{r['epoch_s_median']:.2f} s"
    return (f"| {label} | {_pct(r.get('val_acc'))} | {_pct(r.get('test_acc'))} | {r.get('epochs_run')} | {ep} | "
            f"{r['wall_s']:.1f} s |")


HEADER = """# imgrec's defaults on user-like folders, against a small hand sweep

`python benchmarks/defaults.py`. Folders built from Fashion-MNIST on the machine
(`benchmarks/userlike.py`: PNG/JPEG, varied and non-square sizes, grey and tinted colour on coloured/noisy
backgrounds, junk files in some; train images from Fashion-MNIST's train split, test from its test split). The
default is `imgrec train --data DIR` with no other option, timed as a whole command; the sweep's best is chosen on
validation accuracy; the gap is the best's test accuracy minus the default's. One section per invocation, newest last.

"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default=",".join(SUITE), help=f"comma-separated, from: {', '.join(SUITE)}")
    ap.add_argument("--work", default="/tmp/imgrec-defaults", help="where folders and runs go")
    ap.add_argument("--sweep", choices=("small", "full", "none"), default="small")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="tiny folders and two 1-epoch settings: checks the script")
    ap.add_argument("--rebuild", action="store_true", help="rebuild the folders even when their stamp matches")
    ap.add_argument("--set", action="append", default=[], metavar="NAME.KEY=VALUE",
                    help="change a dataset's spec, e.g. fm2cls.n_train=600 or fm200-grey.sizes=[40,80] (JSON values)")
    ap.add_argument("--build-only", action="store_true", help="build the folders and stop")
    ap.add_argument("--out", default=None, help="Markdown results (the raw JSON goes beside it)")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats: at least 1")

    overrides: dict[str, dict] = {}
    for item in args.set:
        try:
            key, value = item.split("=", 1)
            ds, field = key.split(".", 1)
        except ValueError:
            ap.error(f"--set {item!r}: NAME.KEY=VALUE")
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = value
        overrides.setdefault(ds, {})[field] = parsed

    names = [n.strip() for n in args.datasets.split(",") if n.strip()]
    for n in list(overrides) + names:
        if n not in SUITE:
            ap.error(f"unknown dataset {n!r} (the suite: {', '.join(SUITE)})")
    work = Path(args.work) / ("quick" if args.quick else "")
    sweep = SWEEP_QUICK if args.quick else {"small": SWEEP_SMALL, "full": SWEEP_FULL, "none": []}[args.sweep]
    if args.quick and args.sweep == "none":
        sweep = []
    out_md = Path(args.out) if args.out else (work / "defaults.md" if args.quick else HERE / "results" / "defaults.md")
    out_json = out_md.with_suffix(".json")

    env = {"date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "cpu": cpu_facts(), "load_start": load_avg(),
           "torch": torch_version(), "python": platform.python_version(), "commit": git_commit(),
           "command": "python benchmarks/defaults.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "n_configs": len(sweep)}
    t_all = time.perf_counter()
    results = []
    for name in names:
        spec = dataset_spec(name, args.quick, overrides)
        data, _ = build(name, spec, work / "data" / name, args.rebuild)
        stamp = json.loads((data / "STAMP.json").read_text())
        if args.build_only:
            continue
        res = bench_dataset(name, data, work / "runs" / name, sweep, args.repeats)
        res.update(spec=spec, counts=stamp.get("counts", {}), description=DESCRIPTION.get(name, ""), folder=str(data))
        results.append(res)
    if args.build_only:
        return 0
    env["total_s"] = time.perf_counter() - t_all
    env["load_end"] = load_avg()

    section = markdown(results, env, args)
    out_md.parent.mkdir(parents=True, exist_ok=True)
    with open(out_md, "a") as f:
        if out_md.stat().st_size == 0:
            f.write(HEADER)
        f.write(section + "\n")
    raw = []
    if out_json.exists():
        try:
            raw = json.loads(out_json.read_text())
        except ValueError:
            raw = []
    raw.append({"env": env, "quick": args.quick, "sweep": args.sweep, "repeats": args.repeats,
                "results": [{**r, "summary": summarize(r)} for r in results]})
    out_json.write_text(json.dumps(raw, indent=1) + "\n")
    print("\n" + section)
    print(f"written: {out_md} and {out_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
