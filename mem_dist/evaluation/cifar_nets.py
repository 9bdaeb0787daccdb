"""Classifier victims that keep a small image's resolution: the CIFAR-style networks of the
unlearnable-examples literature (``classifier.model: cifar_resnet18 | cifar_vgg11``).

torchvision's ImageNet networks reduce a 32-px image to 8x8 before their first block (a 7x7
stride-2 convolution and a max-pool), which averages away the per-pixel and small-block
codes the literature's numbers are made of (../shared/reference/literature-efficacy.md).
These keep it: a 3x3 stride-1 first convolution and no max-pool, as Huang et al. (ICLR
2021), Yu et al. (KDD 2022) and Sandoval-Segura et al. (NeurIPS 2022) train them.

- ``cifar_resnet18``: the CIFAR ResNet-18 (He et al.'s BasicBlock, [2, 2, 2, 2] blocks,
  stages of width w, 2w, 4w, 8w with strides 1, 2, 2, 2, global average pool).
- ``cifar_vgg11``: VGG-11 with batch norm as the CIFAR papers use it (eight 3x3
  convolutions of w..8w channels, five 2x2 max-pools down to 1x1 at 32 px, one linear layer).

``classifier.width`` is w; 64 is the papers' (11.2M parameters for ResNet-18); 16 costs about
as much as torchvision's ResNet-18 at 32 px. Shapes: B batch, C channels, H/W side.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x_BCHW)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x_BCHW))


class CifarResNet18(nn.Module):
    def __init__(self, num_classes: int, width: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)  # the stem that keeps the resolution
        self.bn1 = nn.BatchNorm2d(width)
        stages, c_in = [], width
        for i, stride in enumerate((1, 2, 2, 2)):
            c_out = width * 2 ** i
            stages += [BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out, 1)]
            c_in = c_out
        self.layers = nn.Sequential(*stages)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        out = self.layers(F.relu(self.bn1(self.conv1(x_BCHW))))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


class CifarVGG11(nn.Module):
    PLAN = (1, "M", 2, "M", 4, 4, "M", 8, 8, "M", 8, 8, "M")  # channels in units of width / 64 * 64

    def __init__(self, num_classes: int, width: int = 64):
        super().__init__()
        layers, c_in = [], 3
        for item in self.PLAN:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                c_out = width * item
                layers += [nn.Conv2d(c_in, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
                c_in = c_out
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(self.features(x_BCHW), 1).flatten(1))


MODELS = {"cifar_resnet18": CifarResNet18, "cifar_vgg11": CifarVGG11}
"""The CIFAR-style victims by ``classifier.model`` name."""


def build(name: str, num_classes: int, width: int) -> nn.Module:
    return MODELS[name](num_classes, width)
