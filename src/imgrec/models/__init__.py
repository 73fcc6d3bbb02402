"""The model registry and the architectures in it.

Importing this package imports every model module, so that their ``@register_model`` decorators fill the
registry (``imgrec.models.registry`` itself imports none of them). torchvision is imported only when a
torchvision-based architecture is built (``zoo.py``), timm only when a ``timm:`` model is used (``timm_models.py``).
"""
from imgrec.models import fast, small, timm_models, zoo  # noqa: F401  (imported to register their models)
from imgrec.models.registry import ModelInfo, create_model, list_models, model_info, register_model

__all__ = ["ModelInfo", "create_model", "list_models", "model_info", "register_model"]
