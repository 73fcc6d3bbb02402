"""Load a model directory and predict: ``Classifier.load("runs/x").predict("shoe.jpg")``."""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from imgrec.data.decode import decode_image
from imgrec.data.transforms import Preprocess, convert_channels, resize_uint8
from imgrec.device import pick_device
from imgrec.errors import ConfigError, ImageDecodeError
from imgrec.infer.files import (FilePredictions, add_results, check_file_options, cpu_pass_size, cpu_streams,
                                decode_with_notes, decoded_batches, expand_inputs, run_batches)
from imgrec.infer.multilabel import parse_thresholds, select_labels
from imgrec.infer.runtime import forward_logits, load_model, resolve_amp
from imgrec.modeldir import ModelMeta

__all__ = ["Classifier", "FilePredictions", "expand_inputs"]

ImageLike = Any  # path, bytes, PIL.Image, numpy H×W(×C) uint8, or torch uint8 C×H×W


class Classifier:
    """A trained model with everything prediction needs (classes, input size, channels, mean/std).

    Args:
        model: the network (moved to ``device``, put in eval mode).
        meta: its :class:`~imgrec.modeldir.ModelMeta`.
        device: "auto" (CUDA, then MPS, then CPU), "cpu", "cuda", … or a torch.device.
        amp: "auto" (bf16 where it is fast), "bf16", "fp16" (GPU) or "none".
    """

    def __init__(self, model: torch.nn.Module, meta: ModelMeta, device: str | torch.device = "auto",
                 amp: str = "auto"):
        self.meta = meta
        self.device = pick_device(device) if isinstance(device, str) else device
        # CNNs run in channels_last, as they were trained: an NCHW model fed the channels_last input that
        # Preprocess makes was measured 2.2x slower per batch on a CPU (layout conversions in every conv)
        self.model = model.to(self.device).eval()
        if _is_cnn(meta.name):
            self.model = self.model.to(memory_format=torch.channels_last)
        self.classes: list[str] = list(meta.classes)
        self.image_size = int(meta.image_size)
        self.channels = int(meta.channels)
        self.tta_flip = meta.tta_flip
        # post-hoc logit adjustment recorded in model.json (None: none); every prediction path adds it
        bias = meta.logit_bias
        self.logit_bias = None if bias is None else torch.tensor(bias, dtype=torch.float32, device=self.device)
        # temperature scaling recorded in model.json (1.0: none): probabilities are softmax(logits / T), so
        # predict, serve, explain and eval's calibrated numbers all get the same scores; logits() stays raw
        self.temperature = meta.temperature
        # multilabel: one sigmoid per label and a decision threshold per label (model.json, or set_thresholds)
        self.multilabel = meta.task == "multilabel"
        self.thresholds: list[float] | None = parse_thresholds(None, self.classes, meta.thresholds) \
            if self.multilabel else None
        self.amp = resolve_amp(amp, self.device, meta.name)
        self.preprocess = Preprocess(meta.mean, meta.std, self.device, channels_last=True)

    @classmethod
    def load(cls, model_dir: str | os.PathLike, which: str = "best", device: str = "auto",
             amp: str = "auto"):
        """Load a model directory (``best`` or ``last`` weights).

        An exported ``.onnx`` file (``imgrec export``) gives an :class:`imgrec.infer.ort.OnnxClassifier`
        instead: the same ``predict``/``predict_files``/``probabilities``, run by ONNX Runtime.
        """
        if Path(model_dir).suffix.lower() == ".onnx" and not Path(model_dir).is_dir():
            from imgrec.infer.ort import OnnxClassifier
            return OnnxClassifier.load(model_dir, device=device)
        model, meta = load_model(model_dir, which)
        return cls(model, meta, device=device, amp=amp)

    @property
    def name(self) -> str:
        return self.meta.name

    # -- inputs --------------------------------------------------------------------------------
    def load_image(self, image: ImageLike) -> torch.Tensor:
        """One image → C×H×W uint8 at the model's size and channels, through the safe decoder."""
        if isinstance(image, torch.Tensor):
            return self._from_uint8(image)
        if isinstance(image, np.ndarray):
            return self._from_uint8(torch.from_numpy(np.ascontiguousarray(image)))
        if hasattr(image, "save") and hasattr(image, "mode"):  # a PIL image: re-encode losslessly, decode safely
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            image = buf.getvalue()
        arr = decode_image(image, channels=self.channels, size=self.image_size)
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous()

    def _from_uint8(self, t: torch.Tensor) -> torch.Tensor:
        if t.dtype != torch.uint8:
            raise ImageDecodeError("array images must be uint8")
        if t.ndim == 2:
            t = t[None]
        elif t.ndim == 3 and t.shape[-1] in (1, 3, 4) and t.shape[0] not in (1, 3):
            t = t.permute(2, 0, 1)  # H×W×C
        if t.ndim != 3 or t.shape[0] not in (1, 3, 4):
            raise ImageDecodeError(f"expected an H×W, H×W×C or C×H×W image, got shape {tuple(t.shape)}")
        t = t[:3]
        return convert_channels(resize_uint8(t[None], self.image_size), self.channels)[0]

    def normalize(self, batch_uint8: torch.Tensor) -> torch.Tensor:
        """N×C×H×W uint8 at the model's size → the model's input (``imgrec.data.transforms.Preprocess``)."""
        return self.preprocess(batch_uint8)

    # -- outputs -------------------------------------------------------------------------------
    def logits(self, batch_uint8: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Logits for an N×C×H×W uint8 batch already at the model's size (what eval and serve use)."""
        outs = [forward_logits(self.model, self.preprocess(chunk), tta_flip=self.tta_flip, amp=self.amp,
                               logit_bias=self.logit_bias).cpu()
                for chunk in batch_uint8.split(batch_size)]
        return torch.cat(outs) if outs else torch.empty(0, len(self.classes))

    def probabilities(self, batch_uint8: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Softmax over the classes of the logits divided by the model's temperature (``self.temperature``);
        for a multi-label model one independent sigmoid per label."""
        logits = self.logits(batch_uint8, batch_size)
        if self.multilabel:
            return torch.sigmoid(logits)
        return torch.softmax(logits / self.temperature if self.temperature != 1.0 else logits, dim=1)

    def set_thresholds(self, spec) -> list[float]:
        """Override a multi-label model's decision thresholds: a number for every label, ``{label: number}``,
        or ``"label=number"`` strings (imgrec.infer.multilabel.parse_thresholds); returns the new ones."""
        if not self.multilabel:
            raise ConfigError(f"{self.name} is a single-label model: thresholds apply to multi-label models")
        self.thresholds = parse_thresholds(spec, self.classes, self.thresholds)
        return self.thresholds

    def topk(self, probs: torch.Tensor, top_k: int = 5) -> list[list[dict]]:
        """``[{"label", "score"}]`` per row, highest score first. A multi-label model gives every label at or
        above its threshold instead (``top_k`` does not apply)."""
        if self.multilabel:
            return select_labels(probs.numpy(), self.classes, self.thresholds)
        k = max(1, min(int(top_k), len(self.classes)))
        scores, idx = probs.topk(k, dim=1)
        return [[{"label": self.classes[j], "score": float(s)} for s, j in zip(srow.tolist(), irow.tolist())]
                for srow, irow in zip(scores, idx)]

    def predict(self, images: ImageLike | Iterable[ImageLike], top_k: int = 5, batch_size: int = 64):
        """Top-k ``[{"label", "score"}]`` sorted by score; a list of such lists when given a list of images."""
        single = not isinstance(images, (list, tuple))
        items = [images] if single else list(images)
        if top_k < 1:
            raise ConfigError("top_k must be at least 1")
        batch = torch.stack([self.load_image(im) for im in items]) if items else \
            torch.empty(0, self.channels, self.image_size, self.image_size, dtype=torch.uint8)
        out = self.topk(self.probabilities(batch, batch_size), top_k)
        return out[0] if single else out

    def predict_files(self, paths: Iterable[str | os.PathLike], top_k: int = 5, batch_size: int = 64,
                      on_bad_image: str = "fail", warn: bool = True,
                      decode_threads: int | None = None) -> FilePredictions:
        """Predict image files and folders (searched recursively), ``batch_size`` images per forward pass.

        Files are decoded by ``decode_threads`` threads (None: one per core; 0: one after the other in this
        thread) while the model runs on the batches before (imgrec.infer.files). On a CPU several batches run
        at once, one per PyTorch thread (up to 4), each single-threaded: PyTorch's intra-op thread count is
        lowered for the call and restored after (``imgrec.infer.files.cpu_streams``); and large images go
        through in passes of fewer than ``batch_size`` (``cpu_pass_size``: 8 at 224 px). ``on_bad_image="fail"``
        raises ImageDecodeError naming the first unreadable file; ``"skip"`` leaves it out (listed in
        ``.skipped``, and warned about on stderr when ``warn``) and goes on with the rest. Each result has
        ``input_notes``: how that image differs much from the training images (imgrec.infer.inputs).
        """
        files = check_file_options(paths, top_k, batch_size, on_bad_image)
        out = FilePredictions()
        streams, per_stream = 1, 0
        if self.device.type == "cpu":
            streams, per_stream = cpu_streams(torch.get_num_threads())
            batch_size = cpu_pass_size(self.image_size, batch_size)

        def run(items: list[tuple[torch.Tensor, list[str]]]) -> tuple[list[list[dict]], list[list[str]]]:
            return self.topk(self.probabilities(torch.stack([t for t, _ in items])), top_k), [n for _, n in items]

        before = torch.get_num_threads()
        if per_stream:
            torch.set_num_threads(per_stream)
        try:
            batches = decoded_batches(files, decode_with_notes(self.load_image, self.meta), batch_size, on_bad_image,
                                      out, warn, decode_threads, ahead=streams + 1)
            for kept, (preds, notes) in run_batches(batches, run, streams):
                add_results(out, kept, preds, notes)
        finally:
            torch.set_num_threads(before)
        return out


def _is_cnn(name: str) -> bool:
    from imgrec.models import model_info
    try:
        return model_info(name).family != "vit"
    except ConfigError:  # a model that is not in the registry (built by hand): assume a CNN
        return True
