"""imgrec: image recognition in PyTorch — train, evaluate, explain, predict, serve and export classifiers.

    from imgrec import Classifier
    clf = Classifier.load("runs/fm-fastnet")
    clf.predict("shoe.jpg")   # [{"label": "Sneaker", "score": 0.97}, ...]
"""
__version__ = "0.1.0"

from imgrec.errors import ConfigError, DatasetError, ImageDecodeError, ImgrecError, ModelFileError  # noqa: E402
from imgrec.infer.predictor import Classifier  # noqa: E402
from imgrec.models.registry import create_model, list_models, model_info, register_model  # noqa: E402
from imgrec.data.loader import load_data  # noqa: E402
from imgrec.config import RunConfig  # noqa: E402
from imgrec.engine.run import resolve_config, train  # noqa: E402

__all__ = ["Classifier", "ConfigError", "DatasetError", "ImageDecodeError", "ImgrecError", "ModelFileError",
           "RunConfig", "create_model", "list_models", "load_data", "model_info", "register_model",
           "resolve_config", "train", "__version__"]
