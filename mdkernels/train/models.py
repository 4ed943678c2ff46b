"""Face-recognition backbones in plain torch (no torchvision): insightface's IResNet and MobileFaceNet.

``iresnet(depth, ...)``: IResNet-18/34/50/100 as in insightface's ``arcface_torch/backbones/iresnet.py``
(BN-conv-BN-PReLU-conv-BN basic blocks, stride on the second conv, BN-dropout-FC-BN embedding head),
for 112x112 inputs by default. ``mobilefacenet(...)``: MobileFaceNet with the global depthwise
convolution (GDC) head. Both take ``width`` (channel multiplier) and ``input_size`` (any multiple of
16), so the same layouts train on small generated images on a CPU.
"""

from __future__ import annotations

from torch import nn

IRESNET_LAYERS = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 14, 3], 100: [3, 13, 30, 3]}


def _ch(c: int, width: float) -> int:
    return max(8, int(round(c * width / 8)) * 8)


class IBasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, downsample: nn.Module | None) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, eps=1e-5)
        self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, eps=1e-5)
        self.prelu = nn.PReLU(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout, eps=1e-5)
        self.downsample = downsample

    def forward(self, x):
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (self.downsample(x) if self.downsample is not None else x)


class IResNet(nn.Module):
    """IResNet backbone: ``forward(images: (B, 3, S, S)) -> (B, embedding_size)`` (not normalised).

    ``forward_features`` also returns the last feature map, for feature-map distillation.
    """

    def __init__(self, layers: list[int], embedding_size: int = 512, width: float = 1.0, input_size: int = 112,
                 dropout: float = 0.0) -> None:  # fmt: skip
        super().__init__()
        if input_size % 16:
            raise ValueError(f"input_size must be a multiple of 16, got {input_size}")
        chans = [_ch(c, width) for c in (64, 64, 128, 256, 512)]
        self.conv1 = nn.Conv2d(3, chans[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(chans[0], eps=1e-5)
        self.prelu = nn.PReLU(chans[0])
        stages, cin = [], chans[0]
        for n, cout in zip(layers, chans[1:], strict=True):
            down = nn.Sequential(nn.Conv2d(cin, cout, 1, 2, bias=False), nn.BatchNorm2d(cout, eps=1e-5))
            blocks = [IBasicBlock(cin, cout, 2, down)] + [IBasicBlock(cout, cout, 1, None) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn2 = nn.BatchNorm2d(cin, eps=1e-5)
        self.dropout = nn.Dropout(dropout)
        spatial = input_size // 16
        self.fc = nn.Linear(cin * spatial * spatial, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=1e-5)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False  # insightface freezes the embedding BN's scale
        self.feature_channels = cin

    def forward_features(self, x):
        x = self.prelu(self.bn1(self.conv1(x)))
        fmap = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(self.bn2(fmap).flatten(1))
        return self.features(self.fc(x)), fmap

    def forward(self, x):
        return self.forward_features(x)[0]


def iresnet(depth: int = 50, **kw) -> IResNet:
    if depth not in IRESNET_LAYERS:
        raise ValueError(f"IResNet depth must be one of {sorted(IRESNET_LAYERS)}, got {depth}")
    return IResNet(IRESNET_LAYERS[depth], **kw)


class ConvBN(nn.Sequential):
    def __init__(self, cin, cout, k=1, s=1, p=0, groups=1, act=True) -> None:
        layers = [nn.Conv2d(cin, cout, k, s, p, groups=groups, bias=False), nn.BatchNorm2d(cout)]
        if act:
            layers.append(nn.PReLU(cout))
        super().__init__(*layers)


class DepthWise(nn.Module):
    """MobileFaceNet bottleneck: 1x1 expand, 3x3 depthwise (stride s), 1x1 linear project."""

    def __init__(self, cin, cout, stride, groups, residual) -> None:
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(
            ConvBN(cin, groups), ConvBN(groups, groups, 3, stride, 1, groups=groups), ConvBN(groups, cout, act=False)
        )

    def forward(self, x):
        out = self.layers(x)
        return x + out if self.residual else out


class MobileFaceNet(nn.Module):
    """MobileFaceNet (Chen et al. 2018) with the GDC head, in insightface's layout:
    ``(B, 3, S, S) -> (B, embedding_size)``.

    Stem conv 3x3/2, depthwise 3x3 (``blocks[0] == 1``), then three stages that each start with a strided
    bottleneck followed by ``blocks[1..3]`` residual ones (expansion groups 128, 256, 256 x width).
    """

    def __init__(self, embedding_size: int = 512, width: float = 1.0, input_size: int = 112, blocks=(1, 4, 6, 2)):
        super().__init__()
        if input_size % 16:
            raise ValueError(f"input_size must be a multiple of 16, got {input_size}")
        c64, c128 = _ch(64, width), _ch(128, width)
        layers = [ConvBN(3, c64, 3, 2, 1)]
        if blocks[0] == 1:
            layers.append(ConvBN(c64, c64, 3, 1, 1, groups=c64))
        else:
            layers += [DepthWise(c64, c64, 1, c64, residual=True) for _ in range(blocks[0])]
        plan = [(c64, c64, _ch(128, width), blocks[1]), (c64, c128, _ch(256, width), blocks[2]),
                (c128, c128, _ch(256, width), blocks[3])]  # fmt: skip
        for cin, cout, groups, n in plan:
            layers.append(DepthWise(cin, cout, 2, groups, residual=False))
            layers += [DepthWise(cout, cout, 1, groups, residual=True) for _ in range(n)]
        self.body = nn.Sequential(*layers)
        cfinal = _ch(512, width)
        self.conv_sep = ConvBN(c128, cfinal)
        spatial = input_size // 16
        self.gdc = ConvBN(cfinal, cfinal, spatial, 1, 0, groups=cfinal, act=False)  # global depthwise conv
        self.linear = nn.Conv2d(cfinal, embedding_size, 1, bias=False)
        self.features = nn.BatchNorm1d(embedding_size)
        self.feature_channels = cfinal

    def forward_features(self, x):
        fmap = self.conv_sep(self.body(x))
        return self.features(self.linear(self.gdc(fmap)).flatten(1)), fmap

    def forward(self, x):
        return self.forward_features(x)[0]


def mobilefacenet(**kw) -> MobileFaceNet:
    return MobileFaceNet(**kw)


def build_backbone(name: str, **kw) -> nn.Module:
    """``"iresnet18"|"iresnet34"|"iresnet50"|"iresnet100"|"mobilefacenet"`` with width/input_size/embedding_size."""
    if name.startswith("iresnet"):
        return iresnet(int(name[len("iresnet") :]), **kw)
    if name == "mobilefacenet":
        return mobilefacenet(**kw)
    raise ValueError(f"unknown backbone {name!r}: iresnet18/34/50/100 or mobilefacenet")
