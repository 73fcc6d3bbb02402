"""imgrec: image recognition in PyTorch — train, evaluate, explain, predict and serve classifiers.

    from imgrec import Classifier
    clf = Classifier.load("runs/fm-fastnet")
    clf.predict("shoe.jpg")   # [{"label": "Sneaker", "score": 0.97}, ...]

The public names below are imported on first use, so that ``import imgrec.data.decode`` (the fuzzer, the
server's workers) does not pay for importing the whole package.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "Classifier": "imgrec.infer.predictor",
    "ConfigError": "imgrec.errors", "DatasetError": "imgrec.errors", "ImageDecodeError": "imgrec.errors",
    "ImgrecError": "imgrec.errors", "ModelFileError": "imgrec.errors",
    "RunConfig": "imgrec.config",
    "create_model": "imgrec.models.registry", "list_models": "imgrec.models.registry",
    "model_info": "imgrec.models.registry", "register_model": "imgrec.models.registry",
    "load_data": "imgrec.data.dataset",
    "ModelMeta": "imgrec.modeldir", "RunDir": "imgrec.modeldir",
    "evaluate": "imgrec.eval.evaluate",
    "audit": "imgrec.engine.audit",
    "resolve_config": "imgrec.engine.train", "train": "imgrec.engine.train",
}
__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'imgrec' has no attribute {name!r}")


def __dir__():
    return __all__
