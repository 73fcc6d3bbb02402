"""Load a model directory and predict: ``Classifier.load("runs/x").predict("shoe.jpg")``."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from imgrec.data.decode import decode_image
from imgrec.engine.checkpoint import load_model_dir
from imgrec.engine.device import amp_dtype, pick_device
from imgrec.engine.inference import predict_logits
from imgrec.errors import ConfigError, ImageDecodeError

EVAL_BATCH_SIZE = 1024  # evaluate() and the report use the same batches, so their logits are bit-for-bit equal

ImageLike = Any  # path, bytes, PIL.Image, numpy H×W(×C) uint8, or torch uint8 C×H×W


class Classifier:
    """A trained model with everything prediction needs (classes, input size, channels, mean/std)."""

    def __init__(self, model: torch.nn.Module, meta: dict, device: str | torch.device = "auto",
                 amp: str = "auto"):
        self.meta = meta
        self.device = pick_device(device) if isinstance(device, str) else device
        self.model = model.to(self.device).eval()
        self.classes: list[str] = list(meta["classes"])
        self.image_size = int(meta["image_size"])
        self.channels = int(meta["channels"])
        self.tta_flip = bool((meta.get("inference") or {}).get("tta_flip", False))
        self.amp = amp_dtype(amp, self.device, str(meta["model"]["name"]))
        c = self.channels
        self._mean = torch.tensor(meta["mean"], device=self.device).view(1, c, 1, 1) * 255
        self._std = torch.tensor(meta["std"], device=self.device).view(1, c, 1, 1) * 255

    @classmethod
    def load(cls, model_dir: str | os.PathLike, which: str = "best", device: str = "auto",
             amp: str = "auto") -> "Classifier":
        model, meta = load_model_dir(model_dir, which)
        return cls(model, meta, device=device, amp=amp)

    @property
    def name(self) -> str:
        return str(self.meta["model"]["name"])

    # -- inputs --------------------------------------------------------------------------------
    def load_image(self, image: ImageLike) -> torch.Tensor:
        """One image → C×H×W uint8 at the model's size and channels, through the safe decoder."""
        if isinstance(image, torch.Tensor):
            return self._from_uint8(image)
        if isinstance(image, np.ndarray):
            return self._from_uint8(torch.from_numpy(np.ascontiguousarray(image)))
        if hasattr(image, "save") and hasattr(image, "mode"):  # a PIL image: re-encode losslessly, decode safely
            import io
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            image = buf.getvalue()
        arr = decode_image(image, channels=self.channels, size=self.image_size)
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous()

    def _from_uint8(self, t: torch.Tensor) -> torch.Tensor:
        from imgrec.data.loader import convert_channels, resize_uint8
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
        x = (batch_uint8.to(self.device, torch.float32) - self._mean) / self._std
        return x.contiguous(memory_format=torch.channels_last)

    # -- outputs -------------------------------------------------------------------------------
    def logits(self, batch_uint8: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Logits for an N×C×H×W uint8 batch already at the model's size (what eval and serve use)."""
        outs = [predict_logits(self.model, self.normalize(chunk), tta_flip=self.tta_flip, amp=self.amp).cpu()
                for chunk in batch_uint8.split(batch_size)]
        return torch.cat(outs) if outs else torch.empty(0, len(self.classes))

    def probabilities(self, batch_uint8: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        return torch.softmax(self.logits(batch_uint8, batch_size), dim=1)

    def topk(self, probs: torch.Tensor, top_k: int = 5) -> list[list[dict]]:
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

    def evaluate(self, images_uint8: torch.Tensor, labels: torch.Tensor, top_k: int = 5) -> dict:
        """Metrics on a labelled uint8 set (same forward pass as predict)."""
        from imgrec.eval.metrics import summarize
        return summarize(self.logits(images_uint8, EVAL_BATCH_SIZE), labels.long(), self.classes, top_k)

    def explain(self, image: ImageLike, target: str | None = None) -> dict:
        from imgrec.eval.explain import explain as _explain
        return _explain(self, image, target=target)


def expand_inputs(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Files as given, folders expanded recursively to their image files (sorted)."""
    from imgrec.data.files import scan_images
    out: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            out += scan_images(p)
        else:
            out.append(p)
    return out
