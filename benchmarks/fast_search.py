"""Recipe search for the fast recipes, on imgrec's own engine (loader, models, Trainer, ``train()``).

Every run is ``imgrec.engine.train.train(cfg, ...)`` — the code ``imgrec train`` runs — with a recipe plus
overrides; model selection looks at the 5,000-image validation split only (split_seed 0), the test split is
evaluated only with ``--test`` (for the final confirmation of a chosen recipe). Three engine features that do
not exist yet are prototyped here by wrapping the engine (see benchmarks/results/fast_search.md for what they
bought and what integrating them would take):

* ``--val-last N``: validate only in the last N epochs (the best epoch is then chosen among those).
* ``--sizes 20,24,28,...``: progressive resizing, the training batches of epoch i resized to sizes[i].
* ``--whiten``: an airbench-style frozen PCA patch-whitening stem computed from the training images.

Examples::

    .venv/bin/python benchmarks/fast_search.py --recipe fast-bf16 --val-last 2
    .venv/bin/python benchmarks/fast_search.py --recipe fast-bf16 --set '{"epochs": 5, "kwargs": {"act": "relu"}}'
    .venv/bin/python benchmarks/fast_search.py --recipe fast-fp32 --seed 1 --set '{"threads": 1}'
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 .venv/bin/python benchmarks/fast_search.py --recipe fast-fp32

Each run prints ``RESULT {json}`` (validation accuracy per validated epoch, training/eval/wall seconds, process
CPU seconds, load average) and appends it to ``--log`` (JSON lines). On a shared machine compare runs by
``cpu_s`` at ``"threads": 1``: 2 OpenMP threads on an oversubscribed machine lose far more than 1 thread does.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import tempfile
import time

T0 = time.perf_counter()
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

try:  # the training entry point (imgrec.engine.train; imgrec.engine.run before the package was restructured)
    import imgrec.engine.train as run_mod  # noqa: E402
except ImportError:  # pragma: no cover
    import imgrec.engine.run as run_mod  # noqa: E402
import imgrec.engine.trainer as trainer_mod  # noqa: E402
import imgrec.engine.run as pipe_mod  # noqa: E402  (the run pipeline: where train() looks its helpers up)

T_IMPORT = time.perf_counter() - T0


class ResizingLoader:
    """Progressive resizing prototype: the train loader's batches resized to sizes[epoch] (bilinear, antialias)."""

    def __init__(self, inner, sizes):
        self.inner, self.sizes = inner, sizes

    def __len__(self):
        return len(self.inner)

    def set_epoch(self, epoch):
        self.inner.set_epoch(epoch)
        self.epoch = epoch

    def __iter__(self):
        return self.iterate(0)

    def iterate(self, start_step=0):
        size = self.sizes[min(self.epoch, len(self.sizes) - 1)]
        for x, y in self.inner.iterate(start_step):
            if size and size != x.shape[-1]:
                x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y

    def __getattr__(self, k):
        return getattr(self.inner, k)


def whiten_stem(model, bundle, n=10000, eps=5e-3):
    """Set the stem conv to +/- PCA-whitening filters of its patches (from training images) and freeze it."""
    conv = model.stem[0]
    k, st, pd = conv.kernel_size[0], conv.stride[0], conv.padding[0]
    x = bundle.train.images[:n].float() / 255
    mean = torch.tensor(bundle.mean).view(1, -1, 1, 1)
    std = torch.tensor(bundle.std).view(1, -1, 1, 1)
    x = (x - mean) / std
    patches = F.unfold(x, k, padding=pd, stride=st).transpose(1, 2).reshape(-1, x.shape[1] * k * k).double()
    patches = patches - patches.mean(0)
    cov = patches.T @ patches / len(patches)
    evals, evecs = torch.linalg.eigh(cov)
    evals, evecs = evals.flip(0), evecs.flip(1)
    w = (evecs / torch.sqrt(evals + eps)).T  # d x d, rows = filters
    d = w.shape[0]
    out = conv.out_channels
    filt = torch.cat([w, -w])[:out] if out <= 2 * d else torch.cat([w, -w, torch.randn(out - 2 * d, d) * 0.1])
    with torch.no_grad():
        conv.weight.copy_(filt.view(out, x.shape[1], k, k).float())
    conv.weight.requires_grad_(False)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default="fast-bf16")
    ap.add_argument("--set", default="{}", help="JSON overrides (RunConfig keys; model kwargs under 'kwargs')")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sizes", default=None, help="comma list of per-epoch train image sizes (progressive resizing)")
    ap.add_argument("--val-last", type=int, default=0, help="validate only the last N epochs (0 = every epoch)")
    ap.add_argument("--test", action="store_true")
    ap.add_argument("--tag", default="")
    ap.add_argument("--whiten", action="store_true", help="PCA patch-whitening stem, frozen (airbench)")
    ap.add_argument("--log", default=os.path.join(tempfile.gettempdir(), "fast_search.jsonl"))
    a = ap.parse_args()
    over = json.loads(a.set)
    over["seed"] = a.seed
    cfg = run_mod.resolve_config(a.recipe, None, over)
    sizes = [int(s) for s in a.sizes.split(",")] if a.sizes else None

    if sizes:
        orig = pipe_mod.build_loaders

        def build_loaders(*args, **kw):
            tr, va = orig(*args, **kw)
            return ResizingLoader(tr, sizes), va
        pipe_mod.build_loaders = build_loaders

    if a.whiten:
        import imgrec.models as models_mod
        captured = {}
        orig_load, orig_create = pipe_mod.load_data, models_mod.create_model

        def load_data(*args, **kw):
            captured["b"] = b = orig_load(*args, **kw)
            return b

        def create_model(name, **kw):
            m = orig_create(name, **kw)
            whiten_stem(m, captured["b"])
            return m
        pipe_mod.load_data, models_mod.create_model = load_data, create_model

    eval_time = [0.0]
    # the per-epoch validation: Trainer.validate (Trainer.evaluate before the package was restructured)
    val_name = "validate" if hasattr(trainer_mod.Trainer, "validate") else "evaluate"
    orig_eval = getattr(trainer_mod.Trainer, val_name)
    epochs = cfg.train.epochs

    def evaluate(self, loader, model=None):
        if a.val_last and self.epoch < epochs - a.val_last:
            return {"loss": float("inf"), "acc": -1.0}
        t = time.perf_counter()
        r = orig_eval(self, loader, model)
        eval_time[0] += time.perf_counter() - t
        return r
    setattr(trainer_mod.Trainer, val_name, evaluate)

    c0 = time.process_time()
    out = os.path.join(tempfile.gettempdir(), f"fast-search-{os.getpid()}")
    s = run_mod.train(cfg, out, overwrite=True, progress=False, evaluate_test=a.test)
    cpu = time.process_time() - c0
    hist = list(csv.DictReader(open(f"{out}/metrics.csv")))
    res = dict(tag=a.tag, recipe=a.recipe, set=over, sizes=sizes, val_last=a.val_last, seed=a.seed,
               val_acc=round(s["val_acc"], 4), best_epoch=s["best_epoch"], test_acc=s.get("test_acc"),
               train_s=round(s["train_time_s"], 1), eval_s=round(eval_time[0], 2), wall_s=round(s["wall_time_s"], 1),
               cpu_s=round(cpu, 1), import_s=round(T_IMPORT, 2), load=round(os.getloadavg()[0], 2),
               rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
               # epochs the recipe does not validate (val_last) have an empty val_acc
               vals=[round(float(h["val_acc"]), 4) if h["val_acc"] else None for h in hist],
               ep_s=[round(float(h["epoch_time_s"]), 1) for h in hist])
    print("RESULT " + json.dumps(res))
    import shutil
    shutil.rmtree(out, ignore_errors=True)
    with open(a.log, "a") as f:
        f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
