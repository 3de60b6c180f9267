"""CIFAR ResNet-20 (He et al. 2016, section 4.2): 3 stages x 3 BasicBlocks on 32x32 inputs.

``conv3x3(3 -> w)`` + BN + ReLU, stages of widths ``w, 2w, 4w`` (the second and third start with
stride 2), global average pooling and a linear classifier: 19 convolutions + 1 fc = 20 layers.
``width=16`` is the original network (0.27M parameters); the paper's DSF experiments use
``width=32``.

Shortcuts: identity when the shape is kept, otherwise a 1x1 conv (stride 2) + BN projection --
option B of He et al. (the original CIFAR model used option A, zero-padding). Option B gives the
pruner two more (small, 1x1) convolutions and is what most CIFAR ResNet-20 checkpoints in
torchvision-style code use.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["BasicBlock", "ResNet20", "resnet20"]


class BasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``; 1x1 conv + BN shortcut on shape change."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet20(nn.Module):
    """CIFAR ResNet-20: ``(N, 3, 32, 32)`` images -> ``(N, num_classes)`` logits.

    Layer names: ``conv1``/``bn1``, ``layer{1,2,3}.{0,1,2}.{conv1,bn1,conv2,bn2}``,
    ``layer{2,3}.0.shortcut.{0,1}`` (projection conv/BN), ``fc``.
    """

    def __init__(self, num_classes: int = 10, width: int = 16, blocks_per_stage: int = 3) -> None:
        super().__init__()
        self.width = width
        self.conv1 = nn.Conv2d(3, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        in_planes = width
        stages = []
        for i, planes in enumerate((width, 2 * width, 4 * width)):
            blocks = []
            for j in range(blocks_per_stage):
                blocks.append(BasicBlock(in_planes, planes, stride=2 if (i > 0 and j == 0) else 1))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(4 * width, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


def resnet20(num_classes: int = 10, width: int = 16) -> ResNet20:
    """CIFAR ResNet-20 with stage widths ``width, 2*width, 4*width`` (16: original; 32: the paper's)."""
    return ResNet20(num_classes=num_classes, width=width)
