"""Load a model directory and predict: ``Classifier.load("runs/x").predict("shoe.jpg")``.

``Classifier`` is the PyTorch backend of :class:`imgrec.infer.base.BasePredictor`: the input checks,
answers, thresholds, ``predict`` and ``predict_files`` are shared with the ONNX Runtime backend; this module
holds the forward pass and the parts that are PyTorch's (tensors, the device, autocast, intra-op threads).
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from imgrec.data.transforms import Preprocess, convert_channels, resize_uint8
from imgrec.device import pick_device
from imgrec.errors import ConfigError
from imgrec.infer.base import BasePredictor, FileRun, ImageLike, as_chw
from imgrec.infer.files import FilePredictions, cpu_pass_size, cpu_streams, expand_inputs
from imgrec.infer.runtime import forward_logits, load_model, resolve_amp
from imgrec.modeldir import FEATURE_SCORES, ModelMeta

__all__ = ["Classifier", "FilePredictions", "ImageLike", "expand_inputs"]


class Classifier(BasePredictor):
    """A trained model with everything prediction needs (classes, input size, channels, mean/std).

    Args:
        model: the network (moved to ``device``, put in eval mode).
        meta: its :class:`~imgrec.modeldir.ModelMeta`.
        device: "auto" (CUDA, then MPS, then CPU), "cpu", "cuda", … or a torch.device.
        amp: "auto" (bf16 where it is fast), "bf16", "fp16" (GPU) or "none".
        model_dir: where the out-of-distribution statistics are (``inference.unknown.file``); without it a
            model whose score needs them predicts without "unknown".
    """
    backend = "torch"

    def __init__(self, model: torch.nn.Module, meta: ModelMeta, device: str | torch.device = "auto",
                 amp: str = "auto", model_dir: str | os.PathLike | None = None):
        self._read_meta(meta)
        self.device = pick_device(device) if isinstance(device, str) else device
        # CNNs run in channels_last, as they were trained: an NCHW model fed the channels_last input that
        # Preprocess makes was measured 2.2x slower per batch on a CPU (layout conversions in every conv)
        self.model = model.to(self.device).eval()
        if _is_cnn(meta.name):
            self.model = self.model.to(memory_format=torch.channels_last)
        # post-hoc logit adjustment recorded in model.json (None: none); every prediction path adds it
        bias = meta.logit_bias
        self.logit_bias = None if bias is None else torch.tensor(bias, dtype=torch.float32, device=self.device)
        self.amp = resolve_amp(amp, self.device, meta.name)
        self.preprocess = Preprocess(meta.mean, meta.std, self.device, channels_last=True)
        self.unknown_score = None  # imgrec.infer.unknown.UnknownScore: the OOD score beside the network
        if self.unknown and (model_dir is not None or self.unknown["score"] not in FEATURE_SCORES):
            from imgrec.infer.unknown import check_unknown_fits, load_unknown_score
            self.unknown_score = load_unknown_score(model_dir, self.unknown, self.temperature).to(self.device)
            check_unknown_fits(self, model_dir)
        elif self.unknown:
            self.unknown, self.unknown_threshold = None, None

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
        return cls(model, meta, device=device, amp=amp, model_dir=model_dir)

    # -- inputs: C×H×W uint8 tensors at the model's size -----------------------------------------
    def _is_array(self, image: Any) -> bool:
        return isinstance(image, (torch.Tensor, np.ndarray))

    def _from_array(self, image: Any) -> torch.Tensor:
        t = image if isinstance(image, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(image))
        t = as_chw(t, t.dtype == torch.uint8, lambda x: x.permute(2, 0, 1))
        return convert_channels(resize_uint8(t[None], self.image_size), self.channels)[0]

    def _from_decoded(self, hwc: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(hwc).permute(2, 0, 1).contiguous()

    def _stack(self, images: list) -> torch.Tensor:
        return torch.stack(images)

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
        return self._probs(self.logits(batch_uint8, batch_size))

    def _probs(self, logits: torch.Tensor) -> torch.Tensor:
        if self.multilabel:
            return torch.sigmoid(logits)
        return torch.softmax(logits / self.temperature if self.temperature != 1.0 else logits, dim=1)

    def logits_and_features(self, batch_uint8: torch.Tensor, batch_size: int = 256, layers: list[str] | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Logits (as :meth:`logits`), penultimate features (``forward_head(..., pre_logits=True)``) and the
        channel statistics of the named ``layers`` (imgrec.infer.unknown.layer_names), on the CPU, from one
        forward pass per chunk."""
        from imgrec.infer.unknown import forward_with_features
        parts = [forward_with_features(self.model, self.preprocess(chunk), tta_flip=self.tta_flip, amp=self.amp,
                                       logit_bias=self.logit_bias, layers=layers)
                 for chunk in batch_uint8.split(batch_size)]
        if not parts:
            return torch.empty(0, len(self.classes)), torch.empty(0, 0), [torch.empty(0, 0) for _ in layers or []]
        return (torch.cat([p[0].cpu() for p in parts]), torch.cat([p[1].cpu() for p in parts]),
                [torch.cat([p[2][i].cpu() for p in parts]) for i in range(len(layers or []))])

    def scored(self, batch_uint8: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, np.ndarray | None]:
        if self.unknown_score is None or self.unknown_threshold is None:
            return self.probabilities(batch_uint8, batch_size), None
        probs, ood, _ = self.scored_with_features(batch_uint8, batch_size)
        return probs, ood

    def scored_with_features(self, batch_uint8: torch.Tensor, batch_size: int = 256
                             ) -> tuple[torch.Tensor, np.ndarray | None, torch.Tensor]:
        """:meth:`scored` and the penultimate features (on the CPU), from the same forward pass: what the
        server's nearest-training-images lookup takes (imgrec.infer.neighbours)."""
        scoring = self.unknown_score is not None and self.unknown_threshold is not None
        logits, feats, layers = self.logits_and_features(batch_uint8, batch_size,
                                                         self.unknown.get("layers") if scoring else None)
        ood = None
        if scoring:
            with torch.inference_mode():
                ood = self.unknown_score(logits.to(self.device), feats.to(self.device),
                                         [f.to(self.device) for f in layers]).cpu().numpy()
        return self._probs(logits), ood, feats

    def _top(self, probs: Any, k: int) -> tuple[list[list[float]], list[list[int]]]:
        probs = probs if isinstance(probs, torch.Tensor) else torch.from_numpy(np.asarray(probs))
        scores, idx = probs.topk(k, dim=1)
        return scores.tolist(), idx.tolist()

    def _file_run(self, batch_size: int):
        return _torch_streams(self, batch_size)


@contextlib.contextmanager
def _torch_streams(clf: Classifier, batch_size: int) -> Iterator[FileRun]:
    """On a CPU, one batch at a time per PyTorch thread (up to 4), each single-threaded: PyTorch's intra-op
    thread count is lowered for the call and restored after (``imgrec.infer.files.cpu_streams``)."""
    streams, per_stream = 1, 0
    if clf.device.type == "cpu":
        streams, per_stream = cpu_streams(torch.get_num_threads())
        batch_size = cpu_pass_size(clf.image_size, batch_size)
    before = torch.get_num_threads()
    if per_stream:
        torch.set_num_threads(per_stream)
    try:
        yield clf.scored, streams, batch_size
    finally:
        torch.set_num_threads(before)


def _is_cnn(name: str) -> bool:
    from imgrec.models import model_info
    try:
        return model_info(name).family != "vit"
    except ConfigError:  # a model that is not in the registry (built by hand): assume a CNN
        return True
