"""Export a model directory to one file that takes uint8 pixels: ONNX (fp32 or int8) or TorchScript.

The exported graph does everything between a decoded image and the class probabilities, so a deployment
cannot re-implement the preprocessing differently (the usual reason an exported model scores worse):

    pixels  uint8 N×H×W×C, any N/H/W, C = the model's channels (RGB order for 3, gray for 1)
      → float, N×C×H×W
      → resize to image_size × image_size: squashed, bilinear with antialiasing, rounded to whole pixel
        values — imgrec's resize policy ("squash-bilinear-antialias"; imgrec.data.transforms.resize_uint8)
      → (x - 255·mean) / (255·std)                       (imgrec.data.transforms.Preprocess)
      → the network; with flip-TTA (model.json inference.tta_flip) the logits of the image and its mirror
        are averaged                                     (imgrec.infer.runtime.forward_logits)
      → plus the post-hoc logit adjustment −τ·log(prior) when model.json has one (inference.logit_adjust)
      → outputs "probabilities" (softmax of the logits divided by the temperature T when model.json has
        one, inference.temperature) and "logits" (not divided), float32 N×K

The class names, input size, channels, mean/std, resize policy and the export format version go into the ONNX
file's ``metadata_props`` (imgrec.infer.ort reads them back; see INPUT_SPEC there).

**Exporter.** ``torch.onnx.export(..., dynamo=True)`` — the exporter PyTorch recommends — exports every
registered model (tests/test_export.py walks the registry) with a dynamic batch, height and width, and
turns the antialiased resize into ONNX ``Resize(antialias=1)`` (opset 18), which ONNX Runtime computes like
PyTorch (max |Δprobability| about 1e-7 to 1e-5 here). The TorchScript-based exporter (``dynamo=False``) is
deprecated and has no symbolic for ``_upsample_bilinear2d_aa``, so it cannot export the in-graph resize at all.
``--format torchscript`` is ``torch.jit.trace`` of the same module, for C++ libtorch users (it costs a few
lines; PyTorch has deprecated TorchScript, so ONNX is the format to ship).

**Check.** Every export ends by running PyTorch (fp32) and the written file over the model's validation split
(or the images given with ``check_data``) and comparing; the file is written to a temporary name in the target
folder and renamed over the target only when the check passes, so a failed or interrupted export never
replaces a good file and never leaves a partial one (imgrec.safeio.atomic_path). Tolerances (``Tolerance``):

* fp32: top-1 agreement ≥ 99.9% and max |Δprobability| ≤ 1e-3. Both sides compute in fp32 and differ only
  in kernel algorithms and summation order: measured ≤ 4e-5 for every registered model (random weights,
  inputs from 7×9 to 100×70 px). A real mistake moves them far more (measured on fastnet trained on
  Fashion-MNIST, 500 validation images): dropping the flip-TTA 0.29, mean 2% off 0.06, every pixel one grey
  level brighter 0.05, a one-pixel shift 0.68. So 1e-3 sits 25× above the noise and 50× below the smallest
  of those mistakes.
* int8: quantisation changes probabilities by design (a few percent), so the gate is what users lose:
  top-1 accuracy on the validation labels at most 0.5 points below fp32 PyTorch (and agreement ≥ 98%,
  which also holds the check when the data has no labels). max |Δprobability| is reported.

**int8.** ONNX Runtime's ``quantize_static``: QDQ format, per-channel int8 weights, uint8 activations,
calibrated (MinMax) on images from the model's *training* split (never the test split), only the
convolutions, matrix products and ``Gemm`` quantised (the pixel preprocessing stays exact), with the ``Clip``
(ReLU6) and ``Relu`` after them named too: ONNX Runtime then folds each such activation into the range of the
convolution's output (its ``QDQRemovableActivation``). Without that, a convolution's output was quantised over
its whole pre-activation range and clipped afterwards: a MobileNet/EfficientNet-Lite block's BatchNorm-folded
output spans tens of units of which ReLU6 keeps [0, 6], so most of the 256 levels were spent on values the clip
throws away. Measured on EfficientNet-Lite0 with a linear probe (6 photo classes, 51 validation images):
top-1 agreement with PyTorch 92.2% → 98.0% (test split 89.4% → 98.9%), accuracy drop 3.9 → 0 points; pooled
features' cosine to fp32 0.76 before. Keeping the probe's classifier ``Gemm`` or the "unknown" score's
Mahalanobis ``MatMul``s in float changed neither the classes nor (beyond noise) the "unknown" answers there,
so nothing is excluded; the scheme records the quantised op types and the (empty) exclusion list. On x86 CPUs
without VNNI, u8×s8 products go through ``VPMADDUBSW``, whose 16-bit intermediate sums can saturate; there
the weights are quantised to 7 bits (``reduce_range``), as ONNX Runtime's documentation advises. Which
scheme was used is recorded in the file's metadata.

**int8 "unknown" threshold.** Quantisation noise shifts the early layers' channel statistics that the
multi-layer "unknown" score reads, so the int8 graph's ``ood_score`` runs lower than fp32's: on the
EfficientNet-Lite0 probe above, fp32's threshold rejected ~41% of the validation images instead of 5%. So an
int8 export checked on the model's validation split refits the threshold and the quantile table on the int8
graph's own scores of those images (the check's pass, at the model's accept rate) and writes them into the
int8 file's metadata "unknown" entry (the fp32 file keeps its own); the scheme's ``unknown_threshold`` says
whether it was refit, on how many images, and the acceptance at both thresholds. Under ``MIN_REFIT_VAL``
images (or when checked on other data) the fp32 threshold is kept and the scheme says so. The check compares
the "unknown" answers of PyTorch and of the file, each at its own threshold.

**Formats.** ``FORMATS`` at the end of this module: one ``ExportFormat`` per format (file names, suffixes, the
function that writes the file and the one that runs it for the check). Adding a format is one entry there and
those two functions.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import platform
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from imgrec.errors import ConfigError, ModelFileError, require_modules
from imgrec.infer.ort import (INPUT_NAME, INPUT_SPEC, LOGITS_NAME, ONNX_FORMAT, ONNX_FORMAT_VERSION, OOD_NAME,
                              PROBS_NAME)
from imgrec.infer.runtime import load_model
from imgrec.modeldir import ModelMeta, RunDir
from imgrec.safeio import atomic_path, check_writable

__all__ = ["DEFAULT_FORMAT", "FORMATS", "CheckResult", "ExportFormat", "ExportGraph", "ExportResult", "Tolerance",
           "check_export", "check_exported", "export_model", "has_vnni"]

DEFAULT_FORMAT = "onnx"
OPSET = 18  # the first opset whose Resize has `antialias`

Runner = Callable[[torch.Tensor, int], torch.Tensor]  # N×H×W×C uint8 pixels, batch size → probabilities


@dataclass(frozen=True)
class ExportFormat:
    """What export_model, check_export and check_exported need to know of one format (the table: FORMATS)."""
    name: str                     # the --format value
    default_name: str             # written into the model directory when no --out is given
    int8_name: str | None         # the same with --int8; None: the format has no int8 export
    suffixes: tuple[str, ...]     # file endings that `imgrec export --check` reads as this format
    # (graph, meta, path, model_dir, calibration) → the quantisation record ({} for fp32); calibration is None
    # for fp32, else a function that returns the calibration images
    write: Callable[..., dict]
    run: Callable[[str | os.PathLike], Runner]  # the written file, ready for the check
    needs: Callable[[], None] | None = None     # raises a ConfigError naming a missing package
    # an existing file (`--check`): (path, meta, model_dir) → whether it is int8, refusing another model's file;
    # None: fp32, nothing to read before the check
    inspect: Callable[..., bool] | None = None
    # compares the graph's "ood_score" output with PyTorch's; only formats with one get that third output
    check_unknown: Callable[..., None] | None = None


@dataclass(frozen=True)
class Tolerance:
    """What ``check_export`` accepts (see the module docstring for why)."""
    min_agreement: float
    max_dprob: float | None  # None: reported, not gated
    max_accuracy_drop: float | None = None  # points of top-1 accuracy, when labels are known


FP32_TOLERANCE = Tolerance(min_agreement=0.999, max_dprob=1e-3)
INT8_TOLERANCE = Tolerance(min_agreement=0.98, max_dprob=None, max_accuracy_drop=0.5)


class ExportGraph(nn.Module):
    """uint8 N×H×W×C pixels → (probabilities, logits): imgrec's preprocessing, the network, flip-TTA, softmax
    (a sigmoid per label for a multi-label model)."""

    def __init__(self, model: nn.Module, meta: ModelMeta, model_dir: str | os.PathLike | None = None):
        super().__init__()
        self.model = model.eval()
        self.size = int(meta.image_size)
        self.tta_flip = bool(meta.tta_flip)
        # multilabel: the "probabilities" output is one sigmoid per label (thresholds are in the metadata)
        self.multilabel = meta.task == "multilabel"
        c = int(meta.channels)
        # the same folding of 1/255 into mean and std as imgrec.data.transforms.Preprocess
        self.register_buffer("mean255", torch.tensor(meta.mean, dtype=torch.float32).view(1, c, 1, 1) * 255)
        self.register_buffer("std255", torch.tensor(meta.std, dtype=torch.float32).view(1, c, 1, 1) * 255)
        # post-hoc logit adjustment (model.json inference.logit_adjust) inside the graph, as forward_logits adds
        # it: an exported file predicts like `imgrec predict` without any runtime knowing about the adjustment
        bias = meta.logit_bias
        self.register_buffer("logit_bias", None if bias is None else torch.tensor(bias, dtype=torch.float32))
        # temperature scaling inside the graph, as Classifier.probabilities divides: an exported file gives the
        # calibrated probabilities with no runtime knowing about T; the "logits" output stays undivided
        self.temperature = float(meta.temperature)
        # the "unknown" answer's score inside the graph (imgrec.infer.unknown), a third output "ood_score";
        # the threshold and the validation quantiles go into the metadata
        self.unknown = None
        if meta.unknown and model_dir is not None:
            from imgrec.infer.unknown import load_unknown_score
            self.unknown = load_unknown_score(model_dir, meta.unknown, self.temperature)
        self.unknown_layers = list((meta.unknown or {}).get("layers") or [])

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = pixels.permute(0, 3, 1, 2).to(torch.float32)
        # resize_uint8: antialiased bilinear, then rounded and clamped to whole pixel values
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        x = x.round().clamp(0, 255)
        x = (x - self.mean255) / self.std255
        logits, feats, layers = self._network(x)
        if self.tta_flip:
            logits2, feats2, layers2 = self._network(x.flip(3))
            logits = (logits + logits2) / 2
            feats = None if feats is None else (feats + feats2) / 2
            layers = [(a + b) / 2 for a, b in zip(layers, layers2)]
        if self.logit_bias is not None:
            logits = logits + self.logit_bias
        if self.multilabel:
            return torch.sigmoid(logits), logits
        scaled = logits / self.temperature if self.temperature != 1.0 else logits
        if self.unknown is not None:
            return torch.softmax(scaled, dim=1), logits, self.unknown(logits, feats, layers)
        return torch.softmax(scaled, dim=1), logits

    def _network(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor]]:
        """Logits, and the penultimate features and tapped layers' statistics when the "unknown" score needs
        them (forward hooks, which the exporter traces like the rest of the call)."""
        if self.unknown is None:
            return self.model(x), None, []
        from imgrec.infer.unknown import LayerTaps
        with LayerTaps(self.model, self.unknown_layers) as taps:
            fmap = self.model.forward_features(x)
        return (self.model.forward_head(fmap), self.model.forward_head(fmap, pre_logits=True).flatten(1),
                taps.stats())

    @property
    def output_names(self) -> list[str]:
        return [PROBS_NAME, LOGITS_NAME] + ([OOD_NAME] if self.unknown is not None else [])


@dataclass
class CheckResult:
    """PyTorch fp32 against the exported file on ``n`` images."""
    n: int
    agreement: float            # share of images with the same top-1 class
    max_dprob: float            # max |Δprobability| over all images and classes
    mean_dprob: float
    data: str                   # what was compared ("fashion-mnist val split", a folder …)
    tolerance: dict = field(default_factory=dict)
    accuracy_reference: float | None = None  # top-1 of PyTorch fp32 when labels are known
    accuracy_exported: float | None = None
    resize_agreement: float | None = None    # folder data: exported graph on the original-size pixels
    resize_n: int = 0
    max_dood: float | None = None            # max |Δ ood_score| / max(1, |score|), when the graph has the score
    unknown_agreement: float | None = None   # share of images with the same "unknown" answer (each side at its
    #                                          own threshold: the int8 file's is refit on its own scores)
    unknown_accept: float | None = None      # share of the images the exported score accepts at its own threshold
    unknown_accept_reference_t: float | None = None  # ... at PyTorch's (fp32) threshold
    # int8 export on the validation split: {"refit", "images", "fp32_threshold", "threshold"?, "why"?, "entry"?}
    unknown_refit: dict | None = None
    passed: bool = True
    failures: list[str] = field(default_factory=list)

    def summary(self) -> str:
        s = (f"check on {self.n} images ({self.data}): top-1 agreement {self.agreement * 100:.2f}%, "
             f"max |Δprob| {self.max_dprob:.2e}")
        if self.accuracy_reference is not None:
            s += (f", accuracy {self.accuracy_reference * 100:.2f}% (PyTorch) vs "
                  f"{self.accuracy_exported * 100:.2f}% (exported)")
        if self.resize_agreement is not None:
            s += f", in-graph resize agreement {self.resize_agreement * 100:.2f}% on {self.resize_n} originals"
        if self.max_dood is not None:
            s += (f", ood_score max relative |Δ| {self.max_dood:.1e}, same \"unknown\" answer on "
                  f"{self.unknown_agreement * 100:.2f}%, exported accepts {self.unknown_accept * 100:.1f}%")
        if self.unknown_refit is not None:
            r = self.unknown_refit
            s += (f" at its threshold refit on {r['images']} validation images ({r['threshold']:.4g}; "
                  f"{self.unknown_accept_reference_t * 100:.1f}% at fp32's {r['fp32_threshold']:.4g})"
                  if r["refit"] else f" ({r['why']})")
        return s


@dataclass
class ExportResult:
    path: Path
    format: str
    precision: str
    bytes: int
    seconds: float
    check: CheckResult | None = None
    quantization: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


def has_vnni() -> bool:
    """Whether this x86 CPU has VNNI (AVX512-VNNI or AVX-VNNI) int8 dot products; False when unknown."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})
    except OSError:
        pass
    return False


def _is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")


# ------------------------------------------------------------------------------------------------
# export
def export_model(model_dir: str | os.PathLike, out: str | os.PathLike | None = None, fmt: str = DEFAULT_FORMAT, *,
                 which: str = "best", int8: bool = False, check_data: str | list[str] | None = None,
                 data_dir: str | None = None, check_limit: int | None = None, calib_size: int = 512,
                 log: Callable[[str], None] | None = None, source: str | None = None, split: str | None = None,
                 on_bad_image: str | None = None) -> ExportResult:
    """Export ``model_dir`` to ``out`` (default ``<model_dir>/model.onnx``, ``model.int8.onnx`` or
    ``model.torchscript.pt``) and check it against PyTorch; the file replaces ``out`` only if the check passes.

    Args:
        fmt: a name in ``FORMATS``: "onnx" or "torchscript".
        int8: ONNX only: post-training static quantisation calibrated on ``calib_size`` training images.
        check_data: image files/folders to check on (default: the model's validation split).
        data_dir: where the named dataset's files are (as ``imgrec eval --data-dir``).
        check_limit: check on at most this many images (default: all).
        source, split, on_bad_image: the labelled data to check on (and calibrate on) when ``check_data`` is
            None, as ``imgrec eval`` takes them; each defaults to the run's own (model.json), the split to
            "val".
        log: called with progress lines.

    Raises:
        ModelFileError: missing/corrupt model directory, unwritable output, export or check failure.
        ConfigError: unknown format, int8 with TorchScript, missing onnx/onnxruntime.
    """
    log = log or (lambda s: None)
    spec = _format(fmt)
    if int8 and spec.int8_name is None:
        with_int8 = " or ".join(f.name for f in FORMATS.values() if f.int8_name is not None)
        raise ConfigError(f"--int8 needs --format {with_int8} (int8 is ONNX Runtime's static quantisation)")
    if calib_size < 1:
        raise ConfigError("the calibration set needs at least 1 image")
    if spec.needs is not None:
        spec.needs()
    model, meta = load_model(model_dir, which)
    out = Path(out) if out is not None else Path(model_dir) / (spec.int8_name if int8 else spec.default_name)
    if out.is_dir():
        raise ModelFileError(f"{out}: is a directory; give a file name with --out")
    check_writable(out.parent)
    # the "unknown" score goes into graphs whose format checks it (ONNX: a third output); the others keep two
    graph = ExportGraph(model, meta, model_dir if spec.check_unknown is not None else None).eval()

    def calibration() -> np.ndarray:
        log(f"calibrating int8 on {calib_size} training images")
        return _calibration_images(meta, data_dir, calib_size, source, on_bad_image)

    t0 = time.perf_counter()
    with atomic_path(out) as tmp:
        quant: dict[str, Any] = spec.write(graph, meta, tmp, model_dir, calibration if int8 else None)
        seconds = time.perf_counter() - t0
        log(f"exported {meta.name} to {fmt}{' int8' if int8 else ''} in {seconds:.1f} s; checking against PyTorch")
        result = check_export(model, meta, tmp, fmt=fmt, int8=int8, data=check_data, data_dir=data_dir, model_dir=model_dir,
                              limit=check_limit, source=source, split=split, on_bad_image=on_bad_image, refit_unknown=int8)
        if not result.passed:
            raise ModelFileError(f"{out}: not written: the export does not match PyTorch: {'; '.join(result.failures)}"
                                 f" ({result.summary()})")
        _write_unknown_refit(tmp, result, quant, log)
        size = tmp.stat().st_size
    return ExportResult(out, fmt, "int8" if int8 else "fp32", size, seconds, result, quant)


def check_exported(model_dir: str | os.PathLike, path: str | os.PathLike | None = None, *, which: str = "best",
                   data=None, data_dir: str | None = None, limit: int | None = None, source: str | None = None,
                   split: str | None = None, on_bad_image: str | None = None) -> CheckResult:
    """Check an exported file that already exists (``imgrec export --check``) against its model directory.

    The format comes from the file name (``ExportFormat.suffixes``), int8 from the file itself (an ONNX file's
    metadata). An existing TorchScript file is refused, never loaded (see _TRACED_HERE).
    """
    model, meta = load_model(model_dir, which)
    path = Path(path) if path is not None else Path(model_dir) / FORMATS[DEFAULT_FORMAT].default_name
    if not path.is_file():
        raise ModelFileError(f"{path}: no exported model to check (run `imgrec export --model {model_dir}` first)")
    spec = _format_of_file(path)
    if spec.needs is not None:
        spec.needs()
    int8 = spec.inspect(path, meta, model_dir) if spec.inspect is not None else False
    return check_export(model, meta, path, fmt=spec.name, int8=int8, data=data, data_dir=data_dir, limit=limit, model_dir=model_dir,
                        source=source, split=split, on_bad_image=on_bad_image)


def _format(name: str) -> ExportFormat:
    if name not in FORMATS:
        raise ConfigError(f"unknown export format {name!r}; choose one of: {', '.join(FORMATS)}")
    return FORMATS[name]


def _format_of_file(path: Path) -> ExportFormat:
    for spec in FORMATS.values():
        if path.name.lower().endswith(spec.suffixes):
            return spec
    known = ", ".join(s for spec in FORMATS.values() for s in spec.suffixes)
    raise ConfigError(f"{path}: cannot tell the export format from the file name (known endings: {known})")


def _need_onnx() -> None:
    require_modules(("onnx", "onnxscript", "onnxruntime"), "ONNX export", "export")


def _metadata(meta: ModelMeta, precision: str, extra: dict | None = None) -> dict[str, str]:
    from imgrec import __version__
    # what eval of the exported file reuses (the split, the bad-image policy) and what predict compares
    # inputs with (the training images' sizes)
    data = {k: meta.data.get(k) for k in ("source", "val_split", "split_seed", "on_bad_image", "image_sizes")
            if k in meta.data}
    metrics = {k: v for k, v in meta.metrics.items() if isinstance(v, (int, float, bool)) or v is None}
    return {
        "imgrec_format": ONNX_FORMAT, "imgrec_format_version": str(ONNX_FORMAT_VERSION),
        "imgrec_version": __version__, "model_name": meta.name, "classes": json.dumps(list(meta.classes)),
        "image_size": str(meta.image_size), "channels": str(meta.channels),
        "mean": json.dumps(list(meta.mean)), "std": json.dumps(list(meta.std)), "resize": meta.resize,
        "tta_flip": "true" if meta.tta_flip else "false", "precision": precision, "input_spec": INPUT_SPEC,
        "metrics": json.dumps(metrics), "data": json.dumps(data), "export": json.dumps(extra or {}),
        # older readers ignore these keys; imgrec.infer.ort reads them (a multilabel file then returns every
        # label at or above its threshold)
        "task": meta.task, "thresholds": json.dumps(meta.thresholds),
        # informational: the adjustment is already inside the graph's logits
        "logit_adjust": json.dumps(meta.inference.get("logit_adjust")),
        # the graph's probabilities are already divided by it; imgrec.infer.ort reads it so that eval of the
        # file computes its calibrated numbers from the "logits" output as eval of the model directory does
        "temperature": repr(float(meta.temperature)),
        # a model trained from pretrained weights inherits their licence: it travels with every export
        **({"backbone": json.dumps(meta.training.get("backbone"))} if (meta.training or {}).get("backbone") else {}),
        # the "unknown" answer: the graph's ood_score output is compared with this threshold (any accept rate:
        # the validation quantiles); absent when the model has none
        **({"unknown": json.dumps({k: v for k, v in meta.unknown.items() if k != "file"})} if meta.unknown else {}),
    }


def _example(meta: ModelMeta) -> torch.Tensor:
    # not the model's size, so the exporter cannot specialise the resize away
    s = int(meta.image_size)
    return torch.randint(0, 256, (2, s + 3, s + 5, int(meta.channels)), dtype=torch.uint8)


def _write_onnx(graph: ExportGraph, meta: ModelMeta, path: Path, model_dir, calibration) -> dict:
    """fp32: the exported graph. int8: the fp32 graph next to ``path``, quantised into ``path``, then removed."""
    if calibration is None:
        _export_onnx(graph, meta, path, model_dir)
        return {}
    fp32 = path.with_name(path.name + ".fp32")
    try:
        _export_onnx(graph, meta, fp32, model_dir)
        return _quantize(fp32, path, calibration(), meta)
    finally:
        for leftover in (fp32, fp32.with_name(fp32.name + ".pre")):
            if leftover.exists():
                leftover.unlink()


def _export_onnx(graph: ExportGraph, meta: ModelMeta, path: Path, model_dir) -> None:
    import onnx

    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("height"), 2: torch.export.Dim("width")}
    noise = io.StringIO()
    try:
        # the exporter prints its progress to stdout and warns about internals: keep the CLI's output ours
        with warnings.catch_warnings(), contextlib.redirect_stdout(noise), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(graph, (_example(meta),), dynamo=True, opset_version=OPSET,
                                        input_names=[INPUT_NAME], output_names=graph.output_names,
                                        dynamic_shapes={"pixels": dims}, optimize=True, verbose=False)
            program.save(str(path), external_data=False)
    except Exception as e:  # noqa: BLE001 - torch.export/onnx raise many types; one line for the user
        msg = str(e).strip().splitlines()
        raise ModelFileError(f"{model_dir}: ONNX export of {meta.name} failed ({msg[0][:300] if msg else type(e).__name__})") \
            from None
    proto = onnx.load(str(path))
    _set_metadata(proto, _metadata(meta, "fp32"))
    proto.doc_string = f"imgrec {meta.name}: {INPUT_SPEC}"
    onnx.save(proto, str(path))


def _set_metadata(proto, props: dict[str, str]) -> None:
    kept = [p for p in proto.metadata_props if p.key not in props]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    for k, v in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v


# TorchScript files are programs: torch.jit.load runs whatever operators the file holds (aten::from_file reads
# and writes files). So imgrec never loads one. The export check runs the traced module that was just saved,
# from memory; it is kept here, keyed by the file it was saved to, only between the save and the check.
_TRACED_HERE: dict[str, torch.jit.ScriptModule] = {}


def _write_torchscript(graph: ExportGraph, meta: ModelMeta, path: Path, model_dir, calibration) -> dict:
    _export_torchscript(graph, meta, path)  # fp32 only: the table gives TorchScript no int8 file name
    return {}


def _export_torchscript(graph: ExportGraph, meta: ModelMeta, path: Path) -> None:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(graph, (_example(meta),), check_trace=False)
        torch.jit.save(traced, str(path), _extra_files={"imgrec.json": json.dumps(_metadata(meta, "fp32"))})
    _TRACED_HERE.clear()  # at most one export in flight per process: nothing older is kept alive
    _TRACED_HERE[os.path.realpath(path)] = traced


def _refuse_torchscript(path: str | os.PathLike) -> ModelFileError:
    return ModelFileError(f"{path}: imgrec does not load TorchScript files (loading one runs the code it holds); "
                          f"`imgrec export --format torchscript` checks the model while it writes the file")


# ------------------------------------------------------------------------------------------------
# int8
def _calibration_images(meta: ModelMeta, data_dir: str | None, n: int, source: str | None = None,
                        on_bad_image: str | None = None) -> np.ndarray:
    """``n`` images of the model's training split (a fixed, class-mixed sample), N×H×W×C uint8.

    The split is loaded at the source's own size and only the chosen images are brought to the model's size:
    the whole training split at the model's size can be far bigger than memory (Fashion-MNIST for a 224 px
    model: 60,000 × 3×224×224 bytes = 9 GB, more with the float copies of the resize)."""
    from imgrec.data.dataset import at_model_size, load_eval_split

    _, train = load_eval_split(meta, source, data_dir, "train", on_bad_image, at_model_size=False)
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(train), generator=g)[:n]
    return at_model_size(train.subset(idx), meta).permute(0, 2, 3, 1).contiguous().numpy()


QUANT_OPS = ("Conv", "MatMul", "Gemm")  # the products: where int8 saves time
# activations ONNX Runtime folds into the range of the product before them (see the module docstring); named
# alone they are not quantised
FUSED_ACTIVATIONS = ("Clip", "Relu")


def _quantize(fp32: Path, out: Path, calib: np.ndarray, meta: ModelMeta) -> dict:
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self, images: np.ndarray, batch: int = 32):
            self.batches = [images[i:i + batch] for i in range(0, len(images), batch)]
            self.i = 0

        def get_next(self):
            if self.i >= len(self.batches):
                return None
            self.i += 1
            return {INPUT_NAME: self.batches[self.i - 1]}

    reduce_range = _is_x86() and not has_vnni()
    scheme = {"format": "QDQ", "weights": "int8 per-channel", "activations": "uint8", "calibration": "MinMax",
              "op_types": list(QUANT_OPS), "fused_activations": list(FUSED_ACTIVATIONS), "excluded_nodes": [],
              "calibration_images": int(len(calib)), "calibration_split": "train", "reduce_range": reduce_range,
              "why_reduce_range": "x86 without VNNI: 7-bit weights avoid VPMADDUBSW saturation" if reduce_range
              else "VNNI (or not x86): full 8-bit weights"}
    pre = fp32.with_name(fp32.name + ".pre")
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
            src = pre
        except Exception:  # noqa: BLE001 - pre-processing only helps; quantise the plain graph without it
            src = fp32
        quantize_static(str(src), str(out), Reader(calib), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=[*QUANT_OPS, *FUSED_ACTIVATIONS], per_channel=True,
                        reduce_range=reduce_range, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
    proto = onnx.load(str(out))
    _set_metadata(proto, _metadata(meta, "int8", {"quantization": scheme}))
    onnx.save(proto, str(out))
    return scheme


# ------------------------------------------------------------------------------------------------
# check
def _check_images(meta: ModelMeta, data, data_dir: str | None, limit: int | None, source: str | None = None,
                  split: str | None = None, on_bad_image: str | None = None):
    """(images N×C×S×S uint8, labels or None, description, original-size arrays or None)."""
    if data is None:
        from imgrec.data.dataset import load_run_split
        # the run's own data settings unless given: a run trained with on_bad_image=skip skips the same files
        r = load_run_split(meta, source, data_dir, split or "val", on_bad_image)
        images, labels = r.data.images, r.data.labels
        if limit:
            images, labels = images[:limit], labels[:limit]
        name = source or meta.data.get("source", "training data")
        return images, labels, f"{name} {'validation' if r.split == 'val' else r.split} split", None
    from imgrec.data.decode import decode_image
    from imgrec.errors import ImageDecodeError
    from imgrec.infer.files import expand_inputs

    paths = [data] if isinstance(data, (str, os.PathLike)) else list(data)
    files = expand_inputs(paths)[:limit or None]
    images, originals = [], []
    for f in files:
        try:
            images.append(torch.from_numpy(decode_image(f, channels=meta.channels, size=meta.image_size))
                          .permute(2, 0, 1))
            originals.append(decode_image(f, channels=meta.channels))
        except ImageDecodeError:
            continue  # a check runs on the readable images; the count says how many that was
    if not images:
        raise ConfigError(f"no readable images to check on in {', '.join(map(str, paths))}")
    return torch.stack(images), None, ", ".join(map(str, paths)), originals


def check_export(model: nn.Module, meta: ModelMeta, path: str | os.PathLike, *, fmt: str = "onnx",
                 int8: bool = False, data=None, data_dir: str | None = None, limit: int | None = None,
                 batch_size: int = 256, source: str | None = None, split: str | None = None,
                 on_bad_image: str | None = None, model_dir: str | os.PathLike | None = None,
                 refit_unknown: bool = False) -> CheckResult:
    """Run PyTorch (fp32, the model directory's own forward pass) and the exported file at ``path`` over the
    validation split (or the files in ``data``) and compare top-1 classes and probabilities, and the
    out-of-distribution scores and "unknown" answers when the graph computes them. ``refit_unknown`` (int8
    export): when the images are the validation split, the exported file's "unknown" threshold is refit on
    its own scores of them (``res.unknown_refit``; the caller writes it into the file)."""
    from imgrec.infer.predictor import Classifier

    spec = _format(fmt)
    # the exported side first: a file that cannot be run (a TorchScript file imgrec did not just write) is
    # refused before any data is loaded
    run = spec.run(path)
    images, labels, what, originals = _check_images(meta, data, data_dir, limit, source, split, on_bad_image)
    reference = Classifier(model, meta, device="cpu", amp="none", model_dir=model_dir)
    p_ref = reference.probabilities(images, batch_size)
    p_exp = run(images.permute(0, 2, 3, 1).contiguous(), batch_size)
    tol = INT8_TOLERANCE if int8 else FP32_TOLERANCE
    top_ref, top_exp = p_ref.argmax(1), p_exp.argmax(1)
    diff = (p_ref - p_exp).abs()
    res = CheckResult(n=int(images.shape[0]), agreement=float((top_ref == top_exp).float().mean()),
                      max_dprob=float(diff.max()), mean_dprob=float(diff.mean()), data=what, tolerance=asdict(tol))
    if labels is not None and labels.ndim == 1:  # multi-label data has no single true class to compare with
        res.accuracy_reference = float((top_ref == labels).float().mean())
        res.accuracy_exported = float((top_exp == labels).float().mean())
    if originals:
        # what another runtime sees: the original pixels, resized inside the graph
        same = [int(run(torch.from_numpy(o)[None], 1).argmax(1)) == int(t) for o, t in zip(originals, top_ref)]
        res.resize_agreement, res.resize_n = float(np.mean(same)), len(same)
    if spec.check_unknown is not None and reference.unknown_score is not None:
        refit = refit_unknown and data is None and what.endswith(" validation split")
        spec.check_unknown(res, reference, path, images, batch_size, int8, refit)
    if res.agreement < tol.min_agreement:
        res.failures.append(f"top-1 agreement {res.agreement * 100:.2f}% < {tol.min_agreement * 100:.1f}%")
    if tol.max_dprob is not None and res.max_dprob > tol.max_dprob:
        res.failures.append(f"max |Δprob| {res.max_dprob:.2e} > {tol.max_dprob:.0e}")
    if tol.max_accuracy_drop is not None and res.accuracy_reference is not None:
        drop = (res.accuracy_reference - res.accuracy_exported) * 100
        if drop > tol.max_accuracy_drop:
            res.failures.append(f"accuracy drop {drop:.2f} points > {tol.max_accuracy_drop} points")
    res.passed = not res.failures
    return res


def _check_unknown(res: CheckResult, reference, path, images: torch.Tensor, batch_size: int, int8: bool,
                   refit: bool = False) -> None:
    """Compare the graph's ood_score with PyTorch's (relative to the score's size: Mahalanobis distances run
    into the hundreds) and the "unknown" answers, each side at its own threshold: PyTorch's from model.json,
    the file's from its metadata, or (``refit``: int8 export on the validation split) refit on the file's own
    scores of these images (see ``_refit_unknown``)."""
    from imgrec.infer.ort import OnnxClassifier
    exported = OnnxClassifier(path, device="cpu")
    if exported.unknown_threshold is None:
        res.failures.append("the exported graph lacks the ood_score output")
        return
    _, ref = reference.scored(images, batch_size)
    _, exp = exported.scored(images.numpy(), batch_size)
    res.max_dood = float((np.abs(ref - exp) / np.maximum(1.0, np.abs(ref))).max()) if len(ref) else 0.0
    t_ref, t_exp = reference.unknown_threshold, exported.unknown_threshold
    if refit:
        res.unknown_refit = _refit_unknown(exported.unknown, exp)
        t_exp = res.unknown_refit.get("threshold", t_exp)
    accept = (lambda s, t: float((s >= t).mean()) if len(s) else 1.0)  # mark_unknown: "unknown" below t
    res.unknown_accept, res.unknown_accept_reference_t = accept(exp, t_exp), accept(exp, t_ref)
    res.unknown_agreement = float(((ref < t_ref) == (exp < t_exp)).mean()) if len(ref) else 1.0
    if not int8 and res.max_dood > FP32_TOLERANCE.max_dprob:
        res.failures.append(f"max relative |Δ ood_score| {res.max_dood:.2e} > {FP32_TOLERANCE.max_dprob:.0e}")


# validation images below which no "unknown" threshold is refit: its quantile would be noise (as
# imgrec.engine.choices.MIN_UNKNOWN_VAL, below which training chooses none)
MIN_REFIT_VAL = 20


def _refit_unknown(entry: dict, scores: np.ndarray) -> dict:
    """The int8 graph's "unknown" threshold and quantile table refit on its own validation scores, at the
    model's accept rate (as imgrec.infer.ood.unknown_entry chose the fp32 ones): quantisation noise shifts the
    early layers' channel statistics the multi-layer score reads, so the int8 score runs lower than fp32's and
    at fp32's threshold a transferred EfficientNet-Lite0 rejected ~41% of its validation images, not 5%.
    Returns what the export scheme records, with the new metadata entry under "entry" when refit."""
    from imgrec.infer.ood import quantile_table, threshold_from_table
    n, t32 = int(len(scores)), float(entry["threshold"])
    if n < MIN_REFIT_VAL:
        return {"refit": False, "images": n, "fp32_threshold": t32,
                "why": f"{n} validation images < {MIN_REFIT_VAL}: kept the fp32 threshold, not refit for int8"}
    table = quantile_table(scores)
    t = threshold_from_table(table, float(entry["accept_rate"]))
    new = {**entry, "threshold": t, "val_quantiles": table, "chosen_on": f"val ({n} images, int8 graph)",
           "fp32_threshold": t32}
    return {"refit": True, "images": n, "fp32_threshold": t32, "threshold": t, "entry": new}


def _write_unknown_refit(path: Path, result: CheckResult, scheme: dict, log: Callable[[str], None]) -> None:
    """Record the check's "unknown" refit (if any) in the int8 file: the refit entry as its metadata "unknown"
    (what OnnxClassifier answers with, and its accept-rate table) and what was done in the export scheme."""
    refit = result.unknown_refit
    if refit is None:
        return
    import onnx
    record = {k: v for k, v in refit.items() if k != "entry"}
    record.update(accept_at_fp32_threshold=result.unknown_accept_reference_t, accept=result.unknown_accept,
                  agreement_with_pytorch=result.unknown_agreement)
    scheme["unknown_threshold"] = record
    props = {"export": json.dumps({"quantization": scheme})}
    if refit["refit"]:
        props["unknown"] = json.dumps({k: v for k, v in refit["entry"].items() if k != "file"})
        log(f"int8 \"unknown\" threshold refit on {refit['images']} validation images: {refit['threshold']:.4g} "
            f"(fp32 {refit['fp32_threshold']:.4g}); accepts {result.unknown_accept * 100:.1f}% of them "
            f"({result.unknown_accept_reference_t * 100:.1f}% at fp32's)")
    else:
        log(f"int8 \"unknown\" threshold: {refit['why']}")
    proto = onnx.load(str(path))
    _set_metadata(proto, props)
    onnx.save(proto, str(path))


def _run_torchscript(path: str | os.PathLike) -> Runner:
    module = _TRACED_HERE.pop(os.path.realpath(path), None)  # the module imgrec just saved there, or none
    if module is None:
        raise _refuse_torchscript(path)
    module = module.eval()

    @torch.inference_mode()
    def run_ts(x: torch.Tensor, bs: int) -> torch.Tensor:
        return torch.cat([module(chunk)[0] for chunk in x.split(bs)]) if len(x) else torch.empty(0)
    return run_ts


def _run_onnx(path: str | os.PathLike) -> Runner:
    from imgrec.infer.ort import OnnxClassifier

    clf = OnnxClassifier(path, device="cpu")

    def run_onnx(x: torch.Tensor, bs: int) -> torch.Tensor:
        return clf.probabilities(x.permute(0, 3, 1, 2), bs)
    return run_onnx


def _inspect_onnx(path: Path, meta: ModelMeta, model_dir) -> bool:
    from imgrec.infer.ort import OnnxClassifier
    exported = OnnxClassifier(path, device="cpu")
    if list(exported.classes) != list(meta.classes) or exported.image_size != meta.image_size:
        raise ModelFileError(f"{path}: exported from another model (classes or input size differ from {model_dir})")
    return exported.meta.precision == "int8"


# ------------------------------------------------------------------------------------------------
# the formats (here, below the functions the entries name)
FORMATS: dict[str, ExportFormat] = {spec.name: spec for spec in (
    ExportFormat("onnx", RunDir.ONNX, RunDir.ONNX_INT8, (".onnx",), _write_onnx, _run_onnx,
                 needs=_need_onnx, inspect=_inspect_onnx, check_unknown=_check_unknown),
    ExportFormat("torchscript", RunDir.TORCHSCRIPT, None, (".pt", ".pth"), _write_torchscript, _run_torchscript),
)}
