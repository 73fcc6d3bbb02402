from imgrec.infer.predictor import Classifier

__all__ = ["Classifier"]
