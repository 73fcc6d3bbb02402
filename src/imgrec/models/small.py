"""Small textbook networks: ``simple_cnn`` and ``lenet5``.

Both return raw logits: softmax is applied by the loss (``CrossEntropyLoss`` includes log-softmax)
and by the predictor, never inside the model. Both take any input size: an adaptive average pool
before the first fully connected layer gives it the same number of inputs at every size (at their
default 28 px the pool changes nothing).
"""
from __future__ import annotations

import torch.nn as nn

from imgrec.models.base import ImageClassifier, flatten_pool
from imgrec.models.registry import register_model

__all__ = ["simple_cnn", "lenet5"]


@register_model("simple_cnn", default_image_size=28,
                description="Textbook CNN: (conv3x3-ReLU-maxpool) x2, FC-128, FC (about 0.4 M parameters)")
def simple_cnn(num_classes: int = 10, in_chans: int = 1, image_size: int = 28,
               drop_rate: float = 0.0) -> ImageClassifier:
    """Textbook CNN: (conv 3x3 -> ReLU -> 2x2 max pool) x 2, then fully connected layers -> logits.

    Args:
        drop_rate: dropout before the last layer (0 = the plain textbook net).
    """
    features = nn.Sequential(
        nn.Conv2d(in_chans, 32, kernel_size=3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, kernel_size=3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
    )
    # 28 px -> 7 x 7 after the two pools; other sizes are pooled to 7 x 7 so FC-128 keeps 3136 inputs.
    neck = nn.Sequential(nn.Linear(64 * 7 * 7, 128), nn.ReLU(inplace=True))
    return ImageClassifier(features, flatten_pool(7), 128, num_classes, neck=neck, drop_rate=drop_rate)


@register_model("lenet5", default_image_size=28,
                description="LeCun et al. 1998 LeNet-5: conv6-pool-conv16-pool-FC120-FC84 (about 62 k parameters)")
def lenet5(num_classes: int = 10, in_chans: int = 1, image_size: int = 28, act: str = "relu",
           drop_rate: float = 0.0) -> ImageClassifier:
    """LeNet-5 (LeCun et al. 1998): conv5x5 6 -> pool -> conv5x5 16 -> pool -> FC 120 -> FC 84 -> logits.

    The first convolution pads by 2, so a 28 px MNIST digit gives the 28 x 28 C1 maps the original
    got from its 32 x 32 padded input; 5 x 5 x 16 = 400 values then enter C5/FC-120 as in the paper.
    Differences from the paper, as in most modern re-implementations: ReLU by default (``act="tanh"``
    for the original's squashing function; ReLU trains faster), max pooling instead of trainable
    average subsampling, full C3 connectivity instead of the hand-made partial table, and a plain
    linear output instead of Euclidean RBF units.

    Args:
        act: ``"relu"`` (default) or ``"tanh"``.
        drop_rate: dropout before the last layer.
    """
    if act not in ("relu", "tanh"):
        raise ValueError(f"act must be 'relu' or 'tanh', got {act!r}")

    def activation() -> nn.Module:
        return nn.ReLU(inplace=True) if act == "relu" else nn.Tanh()

    features = nn.Sequential(
        nn.Conv2d(in_chans, 6, kernel_size=5, padding=2), activation(), nn.MaxPool2d(2),  # C1, S2
        nn.Conv2d(6, 16, kernel_size=5), activation(), nn.MaxPool2d(2),                  # C3, S4
    )
    neck = nn.Sequential(
        nn.Linear(16 * 5 * 5, 120), activation(),  # C5 (a 5x5 conv over a 5x5 map = fully connected)
        nn.Linear(120, 84), activation(),          # F6
    )
    return ImageClassifier(features, flatten_pool(5), 84, num_classes, neck=neck, drop_rate=drop_rate)
