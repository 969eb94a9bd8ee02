"""Plain PyTorch image classifiers used by the vision SWA recipes.

They are plain ``torch.nn.Module`` s; hf_models.py puts any of them behind transformers'
image-classification interface, which is what the recipe trains and exports.

All models take ``forward(pixel_values)`` with ``pixel_values`` of shape
``(B, C, H, W)`` and return logits of shape ``(B, num_classes)``. They use global
average pooling, so any input size that survives the strided stages works.
"""

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PreResNet", "WideResNet", "SmallCNN", "MODEL_CLASSES", "build_model"]

def _check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: must be a positive integer, got {value!r}")


# --------------------------------------------------------------------------------------
# PreResNet (pre-activation ResNet, CIFAR variant of the SWA reference code)
# --------------------------------------------------------------------------------------


class _PreActBasicBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3 with an identity (or 1x1 conv) shortcut."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # As in the reference design the shortcut projection sees the raw input,
        # not the pre-activated one.
        residual = x if self.downsample is None else self.downsample(x)
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return out + residual


class _PreActBottleneck(nn.Module):
    """Pre-activation bottleneck: 1x1 reduce, 3x3 (strided), 1x1 expand (x4)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, kernel_size=1, bias=False)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        out = self.conv3(F.relu(self.bn3(out)))
        return out + residual


def _three_stage_logits(net: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """The forward pass PreResNet and WideResNet share: stem, three stages, BN-ReLU, pool, linear."""
    x = net.conv1(pixel_values)
    x = net.layer3(net.layer2(net.layer1(x)))
    x = F.relu(net.bn(x))
    x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
    return net.fc(x)


class PreResNet(nn.Module):
    """Pre-activation ResNet for 32x32 inputs (PreResNet-164 in the SWA paper).

    Depth >= 44 uses bottleneck blocks with ``(depth - 2) // 9`` blocks per stage;
    shallower nets use basic blocks with ``(depth - 2) // 6`` blocks per stage.
    Three stages of 16/32/64 planes (x4 for bottlenecks), strides 1/2/2, then a
    final BN-ReLU, global average pooling and a linear classifier.

    Args:
        depth: Network depth; ``(depth - 2) % 9 == 0`` for bottleneck nets
            (depth >= 44), ``(depth - 2) % 6 == 0`` for basic-block nets.
        num_classes: Number of output logits.
        in_channels: Number of input image channels.

    Raises:
        ValueError: If ``depth`` (or another argument) is invalid.
    """

    def __init__(self, depth: int = 164, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        _check_positive_int("depth", depth)
        _check_positive_int("num_classes", num_classes)
        _check_positive_int("in_channels", in_channels)
        if depth >= 44:
            if (depth - 2) % 9 != 0:
                raise ValueError(
                    f"depth: PreResNet with bottleneck blocks (depth >= 44) needs (depth - 2) % 9 == 0 "
                    f"(e.g. 47, 110, 164), got {depth}"
                )
            block, n = _PreActBottleneck, (depth - 2) // 9
        else:
            if depth < 8 or (depth - 2) % 6 != 0:
                raise ValueError(
                    f"depth: PreResNet with basic blocks (depth < 44) needs depth >= 8 and "
                    f"(depth - 2) % 6 == 0 (e.g. 20, 32), got {depth}"
                )
            block, n = _PreActBasicBlock, (depth - 2) // 6

        self.depth = depth
        self.num_classes = num_classes
        self.in_channels = in_channels
        self._inplanes = 16
        self.conv1 = nn.Conv2d(in_channels, 16, kernel_size=3, padding=1, bias=False)
        self.layer1 = self._make_layer(block, 16, n, stride=1)
        self.layer2 = self._make_layer(block, 32, n, stride=2)
        self.layer3 = self._make_layer(block, 64, n, stride=2)
        self.bn = nn.BatchNorm2d(64 * block.expansion)
        self.fc = nn.Linear(64 * block.expansion, num_classes)

        # Reference init: He-normal over fan-out for convs, BN at identity; the
        # linear layer keeps PyTorch's default init as in the reference code.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, mean=0.0, std=math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block: type, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self._inplanes != planes * block.expansion:
            # Projection shortcut only (no BN), matching the pre-activation design.
            downsample = nn.Conv2d(self._inplanes, planes * block.expansion, kernel_size=1, stride=stride, bias=False)
        layers = [block(self._inplanes, planes, stride, downsample)]
        self._inplanes = planes * block.expansion
        layers.extend(block(self._inplanes, planes) for _ in range(1, blocks))
        return nn.Sequential(*layers)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Class logits of shape ``(B, num_classes)`` for ``(B, in_channels, H, W)`` images."""
        return _three_stage_logits(self, pixel_values)


# --------------------------------------------------------------------------------------
# WideResNet (WRN-d-k)
# --------------------------------------------------------------------------------------


class _WideBasicBlock(nn.Module):
    """Pre-activation wide block: BN-ReLU-conv3x3(stride)-dropout-BN-ReLU-conv3x3."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.dropout = nn.Dropout(p=dropout) if dropout > 0 else nn.Identity()
        self.shortcut: Optional[nn.Module] = None
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Like the SWA reference code, the shortcut (identity or 1x1 projection)
        # reads the raw block input.
        residual = x if self.shortcut is None else self.shortcut(x)
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(self.dropout(out))))
        return out + residual


class WideResNet(nn.Module):
    """Wide residual network WRN-depth-widen_factor (WRN-28-10 in the SWA paper).

    Three stages of ``(depth - 4) // 6`` wide blocks with 16k/32k/64k channels
    (k = ``widen_factor``), strides 1/2/2, final BN-ReLU, global average pooling
    and a linear classifier.

    Args:
        depth: Network depth; must satisfy ``(depth - 4) % 6 == 0`` and be >= 10.
        widen_factor: Channel multiplier k.
        num_classes: Number of output logits.
        dropout: Dropout probability between the two convs of each block.
        in_channels: Number of input image channels.

    Raises:
        ValueError: If ``depth`` or another argument is invalid.
    """

    def __init__(
        self,
        depth: int = 28,
        widen_factor: int = 10,
        num_classes: int = 10,
        dropout: float = 0.0,
        in_channels: int = 3,
    ):
        super().__init__()
        _check_positive_int("depth", depth)
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"depth: WideResNet needs depth >= 10 and (depth - 4) % 6 == 0 (e.g. 16, 28), got {depth}")
        _check_positive_int("widen_factor", widen_factor)
        _check_positive_int("num_classes", num_classes)
        _check_positive_int("in_channels", in_channels)
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout: must be in [0, 1), got {dropout!r}")

        self.depth = depth
        self.widen_factor = widen_factor
        self.num_classes = num_classes
        self.in_channels = in_channels
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, widths[0], kernel_size=3, padding=1, bias=False)
        stages = []
        in_planes = widths[0]
        for out_planes, stride in zip(widths[1:], (1, 2, 2)):
            blocks = []
            for i in range(n):
                blocks.append(_WideBasicBlock(in_planes, out_planes, stride if i == 0 else 1, float(dropout)))
                in_planes = out_planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.bn = nn.BatchNorm2d(widths[-1])
        self.fc = nn.Linear(widths[-1], num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Class logits of shape ``(B, num_classes)`` for ``(B, in_channels, H, W)`` images."""
        return _three_stage_logits(self, pixel_values)


# --------------------------------------------------------------------------------------
# SmallCNN (fast CPU model for 8x8 digits)
# --------------------------------------------------------------------------------------


class SmallCNN(nn.Module):
    """Four conv3x3-BN-ReLU blocks for tiny images (e.g. 8x8 digits).

    Block widths are ``width, width, 2*width, 2*width`` with a 2x2 max-pool after
    the second block, then global average pooling and a linear classifier.

    Args:
        num_classes: Number of output logits.
        in_channels: Number of input image channels.
        width: Channel count of the first two blocks.

    Raises:
        ValueError: If an argument is not a positive integer.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32):
        super().__init__()
        _check_positive_int("num_classes", num_classes)
        _check_positive_int("in_channels", in_channels)
        _check_positive_int("width", width)
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.width = width

        def block(cin: int, cout: int) -> nn.Sequential:
            # No conv bias: the following BN has its own shift.
            return nn.Sequential(
                nn.Conv2d(cin, cout, kernel_size=3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            )

        self.features = nn.Sequential(
            block(in_channels, width),
            block(width, width),
            nn.MaxPool2d(2),
            block(width, 2 * width),
            block(2 * width, 2 * width),
        )
        self.fc = nn.Linear(2 * width, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Compute class logits.

        Args:
            pixel_values: Float tensor of shape ``(B, in_channels, H, W)``, H, W >= 2.

        Returns:
            Logits of shape ``(B, num_classes)``.
        """
        x = self.features(pixel_values)
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)


# --------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------

MODEL_CLASSES: dict[str, type[nn.Module]] = {
    "preresnet": PreResNet,
    "wideresnet": WideResNet,
    "small_cnn": SmallCNN,
}


def build_model(name: str, num_classes: int, in_channels: int, **kwargs) -> nn.Module:
    """Instantiate a model from ``MODEL_CLASSES`` by name.

    Args:
        name: One of ``"preresnet"``, ``"wideresnet"``, ``"small_cnn"``
            (case-insensitive; ``-`` is treated as ``_``).
        num_classes: Number of output logits.
        in_channels: Number of input image channels.
        **kwargs: Extra architecture arguments, e.g. ``depth=164`` or
            ``widen_factor=10``.

    Returns:
        The freshly initialised model.

    Raises:
        ValueError: If ``name`` is unknown or an architecture argument is invalid.
    """
    key = str(name).strip().lower().replace("-", "_")
    if key not in MODEL_CLASSES:
        raise ValueError(f"model_name: unknown model {name!r}; choose one of {', '.join(sorted(MODEL_CLASSES))}")
    return MODEL_CLASSES[key](num_classes=num_classes, in_channels=in_channels, **kwargs)
