"""The paper's three ImageNet CNNs in plain torch: ResNet50, MobileNetV2 and SqueezeNet 1.0.

    build("resnet50" | "mobilenet_v2" | "squeezenet1_0", seed=0) -> eval-mode nn.Module

Input float32 [N, 3, 224, 224], output the [N, 1000] logits. The networks are the papers'
(He et al. 2016 with the stride of each downsampling bottleneck on its 3x3 convolution, the
"v1.5" variant torchvision and most ONNX model zoos ship; Sandler et al. 2018 at width 1.0;
Iandola et al. 2016, version 1.0), with torchvision's module names, layer order and
parameter counts for 1000 classes: 25,557,032, 3,504,872 and 1,248,424.

Random initialisation, after `torch.manual_seed(seed)`: every layer first takes torch's
default initialisation as it is constructed, then
- ResNet50: each convolution `kaiming_normal_(mode="fan_out", nonlinearity="relu")`, each
  batch norm weight 1 and bias 0; the classifier keeps torch's default;
- MobileNetV2: each convolution `kaiming_normal_(mode="fan_out")`, batch norms 1 and 0, the
  classifier `normal_(0, 0.01)` with bias 0;
- SqueezeNet 1.0: each convolution `kaiming_uniform_()` with bias 0, except the final 1x1
  classifier convolution, `normal_(0, 0.01)`.
This is torchvision's scheme, applied in the same order, so a model holds the weights that
`torchvision.models.get_model(name, weights=None)` gets after the same seed (checked once,
parameter by parameter, against torchvision 0.29.1 on torch 2.14.1). Batch-norm running
statistics stay at mean 0 and variance 1.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

NUM_CLASSES = 1000


# ------------------------------------------------------------------ ResNet50


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride), 1x1 expand by 4, plus the (projected) input."""

    expansion = 4

    def __init__(self, inputs: int, width: int, stride: int, downsample: nn.Module | None) -> None:
        super().__init__()
        outputs = width * self.expansion
        self.conv1 = nn.Conv2d(inputs, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, outputs, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(outputs)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, inputs, H, W] -> [N, 4 width, H / stride, W / stride]."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


def bottleneck_stage(inputs: int, width: int, blocks: int, stride: int) -> nn.Sequential:
    """`blocks` bottlenecks; the first projects the input (1x1 conv + BN) when its shape changes."""
    outputs = width * Bottleneck.expansion
    downsample = None
    if stride != 1 or inputs != outputs:  # built before the block: it draws its default init first
        downsample = nn.Sequential(nn.Conv2d(inputs, outputs, 1, stride=stride, bias=False), nn.BatchNorm2d(outputs))
    layers = [Bottleneck(inputs, width, stride, downsample)]
    layers += [Bottleneck(outputs, width, 1, None) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


class ResNet50(nn.Module):
    """7x7/2 stem, 3x3/2 max pool, bottleneck stages of 3, 4, 6 and 3 blocks, global average pool, fc."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = bottleneck_stage(64, 64, 3, stride=1)
        self.layer2 = bottleneck_stage(256, 128, 4, stride=2)
        self.layer3 = bottleneck_stage(512, 256, 6, stride=2)
        self.layer4 = bottleneck_stage(1024, 512, 3, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * Bottleneck.expansion, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images [N, 3, 224, 224] -> logits [N, classes]."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# ------------------------------------------------------------------ MobileNetV2

# (expansion t, output channels c, repeats n, first stride s), Table 2 of the paper.
INVERTED_RESIDUAL_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                            (6, 160, 3, 2), (6, 320, 1, 1))


def conv_bn_relu6(inputs: int, outputs: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """Convolution ("same" padding, no bias), batch norm, ReLU6."""
    return nn.Sequential(
        nn.Conv2d(inputs, outputs, kernel, stride=stride, padding=(kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(outputs),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    """1x1 expansion (unless t = 1), 3x3 depthwise, linear 1x1 projection; residual when shapes agree."""

    def __init__(self, inputs: int, outputs: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = inputs * expansion
        expand = [conv_bn_relu6(inputs, hidden, 1)] if expansion != 1 else []
        self.conv = nn.Sequential(
            *expand,
            conv_bn_relu6(hidden, hidden, 3, stride=stride, groups=hidden),
            nn.Conv2d(hidden, outputs, 1, bias=False),
            nn.BatchNorm2d(outputs),
        )
        self.residual = stride == 1 and inputs == outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, inputs, H, W] -> [N, outputs, H / stride, W / stride]."""
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(nn.Module):
    """3x3/2 stem to 32 channels, the inverted-residual stages, 1x1 to 1280, global average pool, dropout, fc."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        layers: list[nn.Module] = [conv_bn_relu6(3, 32, 3, stride=2)]
        channels = 32
        for expansion, outputs, repeats, stride in INVERTED_RESIDUAL_STAGES:
            for index in range(repeats):
                layers.append(InvertedResidual(channels, outputs, stride if index == 0 else 1, expansion))
                channels = outputs
        layers.append(conv_bn_relu6(channels, 1280, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(p=0.2), nn.Linear(1280, num_classes))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0, 0.01)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images [N, 3, 224, 224] -> logits [N, classes]."""
        x = nn.functional.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


# ------------------------------------------------------------------ SqueezeNet 1.0


class Fire(nn.Module):
    """1x1 squeeze + ReLU, then 1x1 and 3x3 expansions (each + ReLU) concatenated along channels."""

    def __init__(self, inputs: int, squeeze: int, expand1x1: int, expand3x3: int) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(inputs, squeeze, 1)
        self.squeeze_activation = nn.ReLU(inplace=True)
        self.expand1x1 = nn.Conv2d(squeeze, expand1x1, 1)
        self.expand1x1_activation = nn.ReLU(inplace=True)
        self.expand3x3 = nn.Conv2d(squeeze, expand3x3, 3, padding=1)
        self.expand3x3_activation = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, inputs, H, W] -> [N, expand1x1 + expand3x3, H, W]."""
        x = self.squeeze_activation(self.squeeze(x))
        return torch.cat([self.expand1x1_activation(self.expand1x1(x)),
                          self.expand3x3_activation(self.expand3x3(x))], 1)


class SqueezeNet10(nn.Module):
    """7x7/2 conv to 96 channels, eight Fire modules between 3x3/2 max pools, 1x1 conv classifier, average pool."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 96, 7, stride=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, ceil_mode=True),
            Fire(96, 16, 64, 64),
            Fire(128, 16, 64, 64),
            Fire(128, 32, 128, 128),
            nn.MaxPool2d(3, stride=2, ceil_mode=True),
            Fire(256, 32, 128, 128),
            Fire(256, 48, 192, 192),
            Fire(384, 48, 192, 192),
            Fire(384, 64, 256, 256),
            nn.MaxPool2d(3, stride=2, ceil_mode=True),
            Fire(512, 64, 256, 256),
        )
        final_conv = nn.Conv2d(512, num_classes, 1)
        self.classifier = nn.Sequential(nn.Dropout(p=0.5), final_conv, nn.ReLU(inplace=True),
                                        nn.AdaptiveAvgPool2d((1, 1)))
        for module in self.modules():
            if isinstance(module, nn.Conv2d) and module.bias is not None:  # every convolution here has a bias
                if module is final_conv:
                    nn.init.normal_(module.weight, 0, 0.01)
                else:
                    nn.init.kaiming_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images [N, 3, 224, 224] -> logits [N, classes]."""
        return torch.flatten(self.classifier(self.features(x)), 1)


ARCHITECTURES: dict[str, Callable[[], nn.Module]] = {
    "resnet50": ResNet50,
    "mobilenet_v2": MobileNetV2,
    "squeezenet1_0": SqueezeNet10,
}
PARAMETER_COUNTS = {"resnet50": 25_557_032, "mobilenet_v2": 3_504_872, "squeezenet1_0": 1_248_424}


def build(name: str, seed: int) -> nn.Module:
    """Architecture `name` with weights drawn after `torch.manual_seed(seed)`, in eval mode."""
    torch.manual_seed(seed)
    return ARCHITECTURES[name]().eval()


def parameter_count(model: nn.Module) -> int:
    """Number of trainable parameters (batch-norm running statistics excluded)."""
    return sum(parameter.numel() for parameter in model.parameters())
