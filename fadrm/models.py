"""Model registry: teachers and students by name, over timm (torchvision where timm lacks one).

Each entry knows how to build the ImageNet-style network and, for inputs of at most
``SMALL_INPUT_MAX`` pixels, how to swap in the CIFAR-style stem (3x3 stride-1 first conv, no
max-pool), which keeps small images from being downsampled 4x before the first block::

    model = create_model("resnet18", num_classes=100, resolution=32)

Adding an architecture is one ``register(...)`` call; nothing branches on names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from fadrm.errors import ConfigError, WeightsError

SMALL_INPUT_MAX = 64


@dataclass(frozen=True)
class ArchSpec:
    """How to build one architecture."""

    build: Callable[[int, bool], nn.Module]  # (num_classes, pretrained) -> module
    small_stem: Callable[[nn.Module], None] | None  # adapts the stem in place for small inputs
    source: str  # where the implementation comes from: "timm", "torchvision" or "fadrm"


ARCHS: dict[str, ArchSpec] = {}


def register(name: str, build: Callable[[int, bool], nn.Module], small_stem=None, source="timm") -> None:
    ARCHS[name] = ArchSpec(build=build, small_stem=small_stem, source=source)


def check_arch(name: str) -> None:
    if name not in ARCHS:
        raise ValueError(f"unknown architecture '{name}'; registered: {', '.join(sorted(ARCHS))}")


def create_model(arch: str, num_classes: int, resolution: int, pretrained: bool = False) -> nn.Module:
    """Build ``arch`` for ``num_classes`` outputs and inputs of ``resolution`` pixels."""
    try:
        check_arch(arch)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    spec = ARCHS[arch]
    small = resolution <= SMALL_INPUT_MAX and spec.small_stem is not None
    if pretrained and small:
        raise ConfigError(
            f"pretrained '{arch}' weights fit its ImageNet stem, but {resolution}px inputs use the "
            "CIFAR-style stem; train the teacher (weights: null) or give a weights file"
        )
    try:
        model = spec.build(num_classes, pretrained)
    except (OSError, RuntimeError) as exc:
        if pretrained:
            raise WeightsError(
                f"could not fetch pretrained weights for '{arch}' ({exc}); without a network, point "
                "squeeze.teachers[i].weights at a local .safetensors file"
            ) from None
        raise
    if small:
        spec.small_stem(model)
    return model


# ----------------------------------------------------------------------------- ConvNet


class ConvNet(nn.Module):
    """The dataset-distillation ConvNet: ``depth`` x (conv3x3-BN-ReLU-avgpool2), linear head.

    With BatchNorm (not instance norm) so that BN-statistics matching applies to it. At 32 px
    and depth 3 the features are 4x4; other resolutions are pooled to 4x4 before the head.
    """

    def __init__(self, num_classes: int, width: int = 64, depth: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for _ in range(depth):
            layers += [
                nn.Conv2d(channels, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.AvgPool2d(2),
            ]
            channels = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.classifier = nn.Linear(width * 16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def _convnet(width: int, depth: int):
    def build(num_classes: int, pretrained: bool) -> nn.Module:
        if pretrained:
            raise ConfigError("ConvNet has no pretrained weights; train it or give a weights file")
        return ConvNet(num_classes, width, depth)

    return build


# ----------------------------------------------------------------------------- timm / torchvision


def _timm(name: str):
    def build(num_classes: int, pretrained: bool) -> nn.Module:
        import timm  # imported lazily: slow to import and only needed for these entries

        return timm.create_model(name, pretrained=pretrained, num_classes=num_classes)

    return build


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """He et al.'s CIFAR ResNet (6n+2 layers, 16/32/64 channels): ResNet-20 is ~0.27 M parameters and
    41 M multiply-adds at 32 px, a second teacher architecture a CPU can train (FADRM+)."""

    def __init__(self, num_classes: int, blocks: int = 3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True))
        layers, cin = [], 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(blocks):
                layers.append(_BasicBlock(cin, cout, stride if i == 0 else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(self.layers(self.stem(x)), 1), 1))


def _cifar_resnet(blocks: int):
    def build(num_classes: int, pretrained: bool) -> nn.Module:
        if pretrained:
            raise ConfigError("the CIFAR ResNets have no pretrained weights; train one or give a weights file")
        return CifarResNet(num_classes, blocks)

    return build


def _small_conv(conv: nn.Conv2d) -> nn.Conv2d:
    """A 3x3 stride-1 replacement with the same channels."""
    return nn.Conv2d(conv.in_channels, conv.out_channels, 3, 1, 1, bias=conv.bias is not None)


def _resnet_stem(model: nn.Module) -> None:
    model.conv1 = _small_conv(model.conv1)
    model.maxpool = nn.Identity()


def _densenet_stem(model: nn.Module) -> None:
    model.features.conv0 = _small_conv(model.features.conv0)
    model.features.pool0 = nn.Identity()


def _mobilenet_stem(model: nn.Module) -> None:
    model.conv_stem = _small_conv(model.conv_stem)


def _shufflenet_build(num_classes: int, pretrained: bool) -> nn.Module:
    from torchvision.models import ShuffleNet_V2_X1_0_Weights, shufflenet_v2_x1_0

    if not pretrained:
        return shufflenet_v2_x1_0(num_classes=num_classes)
    model = shufflenet_v2_x1_0(weights=ShuffleNet_V2_X1_0_Weights.DEFAULT)
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    return model


def _shufflenet_stem(model: nn.Module) -> None:
    model.conv1[0] = _small_conv(model.conv1[0])
    model.maxpool = nn.Identity()


register("convnet", _convnet(64, 3), source="fadrm")
register("convnet_w128", _convnet(128, 3), source="fadrm")
register("convnet_d4", _convnet(64, 4), source="fadrm")
register("resnet20", _cifar_resnet(3), source="fadrm")
register("resnet18", _timm("resnet18"), _resnet_stem)
register("resnet50", _timm("resnet50"), _resnet_stem)
register("resnet101", _timm("resnet101"), _resnet_stem)
register("densenet121", _timm("densenet121"), _densenet_stem)
register("mobilenetv2", _timm("mobilenetv2_100"), _mobilenet_stem)
register("shufflenetv2", _shufflenet_build, _shufflenet_stem, source="torchvision")


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
