"""Reference torch models for tests and experiments, written here without timm or torchvision.

Every model exports with both torch ONNX exporters (``dynamo=False`` and ``dynamo=True``), and
``tests/test_train_export.py`` compares each export with torch. Asked for opset 17, the dynamo
exporter writes opset 18 for the conv models (see ``export.export_onnx``). The models are
inference-only versions of the published architectures, without dropout or stochastic depth.

Input sizes: ``LeNet300`` and ``MLP`` take ``[N, features]``. ``ResNet``, ``SENet`` and
``MobileNetV2`` are sized for ``[N, 1, 28, 28]`` (Fashion-MNIST) but accept any spatial size
that survives their strides. ``ConvNeXt`` downsamples by 32, so it needs at least 32x32.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

# Mean and standard deviation of the MNIST training pixels on the [0, 1] scale.
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,
    "leaky_relu": nn.LeakyReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "elu": nn.ELU,
    "softplus": nn.Softplus,
}


def make_activation(act: str | Callable[[], nn.Module]) -> nn.Module:
    """Build an activation module from a name in ``ACTIVATIONS`` or a module factory."""
    if callable(act):
        return act()
    try:
        return ACTIVATIONS[act]()
    except KeyError:
        raise ValueError(f"unknown activation {act!r}; expected one of {sorted(ACTIVATIONS)} or a module class") from None


# ---------------------------------------------------------------------------------------------
# Fully connected


class MLP(nn.Module):
    """Linear layers ``fc1`` ... ``fcK`` of widths ``dims``, with ``act`` between them.

    ``MLP((784, 300, 100, 10), "relu")`` has three Linear layers and no activation after the
    last one.
    """

    def __init__(self, dims: Sequence[int], act: str | Callable[[], nn.Module] = "relu") -> None:
        super().__init__()
        if len(dims) < 2:
            raise ValueError(f"dims={tuple(dims)} needs at least an input and an output width")
        self.dims = tuple(dims)
        for number, (n_in, n_out) in enumerate(zip(dims[:-1], dims[1:]), start=1):
            self.add_module(f"fc{number}", nn.Linear(n_in, n_out))
        self.act = make_activation(act)

    @property
    def layers(self) -> list[nn.Linear]:
        return [getattr(self, f"fc{number}") for number in range(1, len(self.dims))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layers = self.layers
        for layer in layers[:-1]:
            x = self.act(layer(x))
        return layers[-1](x)


class LeNet300(nn.Module):
    """LeNet-300-100: a 784-300-100-10 fully connected network with ReLU.

    Takes float32 pixels in [0, 1] with shape ``[N, 784]`` and returns logits ``[N, 10]``. The
    input normalization is part of forward, so the exported graph has scalar Sub and Div nodes.
    """

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(784, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, 10)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = (pixels - MNIST_MEAN) / MNIST_STD
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


# ---------------------------------------------------------------------------------------------
# ResNet and SENet


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation gate: ``x * sigmoid(fc2(relu(fc1(mean_hw(x)))))``.

    ``fc1`` and ``fc2`` are 1x1 convs, so the gate is ``[N, C, 1, 1]`` and multiplies the
    feature map by broadcasting. The hidden width is ``max(1, channels // reduction)``.
    """

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = x.mean((2, 3), keepdim=True)
        gate = torch.sigmoid(self.fc2(F.relu(self.fc1(gate))))
        return x * gate


class BasicBlock(nn.Module):
    """ResNet basic block: conv3x3-BN-ReLU-conv3x3-BN (optionally SE), plus shortcut, then ReLU.

    The shortcut is a 1x1 conv with BN when the stride or the width changes, otherwise the
    identity.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, se_reduction: int | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.se = SqueezeExcite(out_channels, se_reduction) if se_reduction else None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.se is not None:
            out = self.se(out)
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """A small ResNet of basic blocks for ``[N, in_channels, 28, 28]`` inputs.

    Stem: conv3x3-BN-ReLU at stride 1 to ``widths[0]``. Stage i has ``blocks_per_stage[i]``
    blocks of width ``widths[i]``, and every stage after the first starts with stride 2.
    Head: global average pool, flatten, Linear.
    """

    def __init__(
        self,
        widths: Sequence[int] = (16, 32, 64),
        blocks_per_stage: Sequence[int] = (1, 1, 1),
        num_classes: int = 10,
        in_channels: int = 1,
        se_reduction: int | None = None,
    ) -> None:
        super().__init__()
        if len(widths) != len(blocks_per_stage):
            raise ValueError(f"widths {tuple(widths)} and blocks_per_stage {tuple(blocks_per_stage)} differ in length")
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(),
        )
        stages = []
        current = widths[0]
        for stage, (width, count) in enumerate(zip(widths, blocks_per_stage)):
            blocks = []
            for block in range(count):
                stride = 2 if stage > 0 and block == 0 else 1
                blocks.append(BasicBlock(current, width, stride, se_reduction))
                current = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(current, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


class SENet(ResNet):
    """A ``ResNet`` whose basic blocks end with a ``SqueezeExcite`` gate before the residual add."""

    def __init__(
        self,
        widths: Sequence[int] = (16, 32),
        blocks_per_stage: Sequence[int] = (1, 1),
        num_classes: int = 10,
        in_channels: int = 1,
        reduction: int = 4,
    ) -> None:
        super().__init__(widths, blocks_per_stage, num_classes, in_channels, se_reduction=reduction)


# ---------------------------------------------------------------------------------------------
# MobileNetV2


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand conv-BN-ReLU6, 3x3 depthwise conv-BN-ReLU6, 1x1 project conv-BN.

    With ``expand_ratio == 1`` the expand conv is left out. The input is added to the output
    when the stride is 1 and the widths match.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = in_channels * expand_ratio
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers += [nn.Conv2d(in_channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


# Rows of (expand ratio t, output width c, block count n, stride of the first block s), with
# widths and depth cut down for 28x28 inputs.
MOBILENET_V2_SMALL = ((1, 8, 1, 1), (4, 12, 2, 2), (4, 16, 2, 2))


class MobileNetV2(nn.Module):
    """A small MobileNetV2: conv3x3-BN-ReLU6 stem, inverted residual blocks, 1x1 conv-BN-ReLU6, pool, Linear.

    ``settings`` rows are ``(t, c, n, s)``: expand ratio, width, block count and the stride of
    the first block of the row. The default fits ``[N, 1, 28, 28]`` inputs.
    """

    def __init__(
        self,
        settings: Sequence[tuple[int, int, int, int]] = MOBILENET_V2_SMALL,
        num_classes: int = 10,
        in_channels: int = 1,
        stem_width: int = 8,
        last_width: int = 32,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, stem_width, 3, padding=1, bias=False),
            nn.BatchNorm2d(stem_width),
            nn.ReLU6(),
        )
        blocks = []
        current = stem_width
        for expand_ratio, width, count, stride in settings:
            for block in range(count):
                blocks.append(InvertedResidual(current, width, stride if block == 0 else 1, expand_ratio))
                current = width
        self.blocks = nn.Sequential(*blocks)
        self.last = nn.Sequential(nn.Conv2d(current, last_width, 1, bias=False), nn.BatchNorm2d(last_width), nn.ReLU6())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last_width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.last(self.blocks(self.stem(x)))
        return self.classifier(torch.flatten(self.pool(x), 1))


# ---------------------------------------------------------------------------------------------
# ConvNeXt


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an ``[N, C, H, W]`` tensor: permute, ``nn.LayerNorm``, permute back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """ConvNeXt block: 7x7 depthwise conv, channels-last LayerNorm, Linear(C, 4C), GELU,
    Linear(4C, C), per-channel layer scale ``gamma``, residual add.

    ``layer_scale_init`` sets every element of ``gamma``. A value of 0 or less leaves the
    layer scale out.
    """

    def __init__(self, dim: int, layer_scale_init: float = 1e-6) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale_init)) if layer_scale_init > 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dwconv(x).permute(0, 2, 3, 1)
        out = self.pwconv2(self.act(self.pwconv1(self.norm(out))))
        if self.gamma is not None:
            out = self.gamma * out
        return x + out.permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    """ConvNeXt in inference form.

    Stem: Conv2d(k=4, s=4) and a channels-first LayerNorm. Stage i > 0 starts with a
    downsampling layer (channels-first LayerNorm, Conv2d(k=2, s=2)). Head: global average pool,
    LayerNorm, Linear. The input side must be at least 32 pixels.
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 1000,
        depths: Sequence[int] = (3, 3, 9, 3),
        dims: Sequence[int] = (96, 192, 384, 768),
        layer_scale_init: float = 1e-6,
    ) -> None:
        super().__init__()
        if len(depths) != len(dims):
            raise ValueError(f"depths {tuple(depths)} and dims {tuple(dims)} differ in length")
        self.downsample_layers = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(in_channels, dims[0], 4, stride=4), LayerNorm2d(dims[0], eps=1e-6))]
        )
        for previous, dim in zip(dims[:-1], dims[1:]):
            self.downsample_layers.append(nn.Sequential(LayerNorm2d(previous, eps=1e-6), nn.Conv2d(previous, dim, 2, stride=2)))
        self.stages = nn.ModuleList(
            nn.Sequential(*(ConvNeXtBlock(dim, layer_scale_init) for _ in range(depth))) for dim, depth in zip(dims, depths)
        )
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for downsample, stage in zip(self.downsample_layers, self.stages):
            x = stage(downsample(x))
        return self.head(self.norm(x.mean((2, 3))))


def convnext_tiny(num_classes: int = 1000, **kwargs) -> ConvNeXt:
    """Build ConvNeXt-T: depths (3, 3, 9, 3), dims (96, 192, 384, 768), 28,589,128 parameters at 1000 classes."""
    return ConvNeXt(num_classes=num_classes, depths=(3, 3, 9, 3), dims=(96, 192, 384, 768), **kwargs)


def convnext_small_test(num_classes: int = 10, **kwargs) -> ConvNeXt:
    """Build a ConvNeXt small enough for unit tests: depths (1, 1, 1, 1), dims (8, 16, 32, 64).

    This is not the published ConvNeXt-S. It takes ``[N, 3, 32, 32]`` by default.
    """
    return ConvNeXt(num_classes=num_classes, depths=(1, 1, 1, 1), dims=(8, 16, 32, 64), **kwargs)
