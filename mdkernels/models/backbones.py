"""Face-recognition backbones in plain torch (no torchvision): insightface's IResNet and MobileFaceNet.

Both build state dicts with exactly the keys and shapes of insightface's ``arcface_torch/backbones`` at
``width=1, input_size=112`` (so its checkpoints load with ``strict=True``), under its ``get_model`` names
(:data:`INSIGHTFACE_NETWORKS`): ``r18``/``r34``/``r50``/``r100``/``r200``, IResNet (BN-conv-BN-PReLU-conv-BN
basic blocks, stride on the second conv, BN-dropout-FC-BN embedding head), and ``mbf``/``mbf_large``,
MobileFaceNet with the global depthwise convolution (GDC) head (``scale=2, blocks=(1, 4, 6, 2)`` and
``scale=4, blocks=(2, 8, 12, 4)``). ``width`` (a channel multiplier) and ``input_size`` (a multiple of
16) scale both down for the small demo models; ``iresnetNN`` and ``mobilefacenet`` are aliases.
"""

from __future__ import annotations

from torch import nn

IRESNET_LAYERS = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 14, 3], 100: [3, 13, 30, 3], 200: [6, 26, 60, 6]}
MBF = {"mbf": dict(scale=2, blocks=(1, 4, 6, 2)), "mbf_large": dict(scale=4, blocks=(2, 8, 12, 4))}
INSIGHTFACE_NETWORKS = ("r18", "r34", "r50", "r100", "r200", "mbf", "mbf_large")


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
        self.embedding_size = embedding_size
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


class _Block(nn.Module):
    """insightface's ConvBlock (conv, BN, PReLU) and LinearBlock (``act=False``: conv, BN), keys
    ``layers.{0,1,2}``."""

    def __init__(self, cin: int, cout: int, k: int = 1, s: int = 1, p: int = 0, groups: int = 1,
                 act: bool = True) -> None:  # fmt: skip
        super().__init__()
        mods = [nn.Conv2d(cin, cout, k, s, p, groups=groups, bias=False), nn.BatchNorm2d(cout)]
        self.layers = nn.Sequential(*mods, *([nn.PReLU(cout)] if act else []))

    def forward(self, x):
        return self.layers(x)


class DepthWise(nn.Module):
    """MobileFaceNet bottleneck: 1x1 expand to ``groups``, 3x3 depthwise (stride s), 1x1 linear project."""

    def __init__(self, cin: int, cout: int, stride: int, groups: int, residual: bool) -> None:
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(_Block(cin, groups), _Block(groups, groups, 3, stride, 1, groups=groups),
                                    _Block(groups, cout, act=False))  # fmt: skip

    def forward(self, x):
        out = self.layers(x)
        return x + out if self.residual else out


class Residual(nn.Module):
    def __init__(self, c: int, n: int, groups: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(*[DepthWise(c, c, 1, groups, residual=True) for _ in range(n)])

    def forward(self, x):
        return self.layers(x)


class GDC(nn.Module):
    """The global depthwise conv head: ``features.layers`` = (LinearBlock k x k depthwise, flatten, Linear
    without bias, BatchNorm1d)."""

    def __init__(self, channels: int, spatial: int, embedding_size: int) -> None:
        super().__init__()
        gdc = _Block(channels, channels, spatial, groups=channels, act=False)
        fc = nn.Linear(channels, embedding_size, bias=False)
        self.layers = nn.Sequential(gdc, nn.Flatten(), fc, nn.BatchNorm1d(embedding_size))

    def forward(self, x):
        return self.layers(x)


class MobileFaceNet(nn.Module):
    """MobileFaceNet (Chen et al. 2018) with the GDC head, in insightface's layout and key names
    (``layers.*``, ``conv_sep.*``, ``features.layers.*``): ``(B, 3, S, S) -> (B, embedding_size)``.

    Stem conv 3x3/2 of ``64 scale`` channels, then a grouped 3x3 conv (``blocks[0] == 1``) or
    ``blocks[0]`` residual bottlenecks, three stages that each start with a strided bottleneck followed by
    ``blocks[1..3]`` residual ones (expansion groups 128, 256, 256), a 1x1 conv to 512 and the GDC head.
    ``width`` multiplies every channel count (1.0: insightface's network)."""

    def __init__(self, embedding_size: int = 512, width: float = 1.0, input_size: int = 112, blocks=(1, 4, 6, 2),
                 scale: int = 2) -> None:  # fmt: skip
        super().__init__()
        if input_size % 16:
            raise ValueError(f"input_size must be a multiple of 16, got {input_size}")
        c = lambda n: _ch(n, width)  # noqa: E731
        c1, c2 = c(64 * scale), c(128 * scale)
        self.layers = nn.ModuleList([_Block(3, c1, 3, 2, 1)])
        if blocks[0] == 1:
            self.layers.append(_Block(c1, c1, 3, 1, 1, groups=c(64)))
        else:
            self.layers.append(Residual(c1, blocks[0], c(128)))
        self.layers.extend([DepthWise(c1, c1, 2, c(128), False), Residual(c1, blocks[1], c(128)),
                            DepthWise(c1, c2, 2, c(256), False), Residual(c2, blocks[2], c(256)),
                            DepthWise(c2, c2, 2, c(512), False), Residual(c2, blocks[3], c(256))])  # fmt: skip
        self.conv_sep = _Block(c2, c(512))
        self.features = GDC(c(512), input_size // 16, embedding_size)
        self.feature_channels, self.embedding_size = c(512), embedding_size

    def forward_features(self, x):
        for layer in self.layers:
            x = layer(x)
        fmap = self.conv_sep(x)
        return self.features(fmap), fmap

    def forward(self, x):
        return self.forward_features(x)[0]


def mobilefacenet(**kw) -> MobileFaceNet:
    return MobileFaceNet(**kw)


_ALIASES = {**{f"iresnet{d}": f"r{d}" for d in IRESNET_LAYERS}, "mobilefacenet": "mbf"}


def build_backbone(name: str, **kw) -> nn.Module:
    """An insightface ``get_model`` name (:data:`INSIGHTFACE_NETWORKS`) or an alias (``iresnet50``,
    ``mobilefacenet``), with ``width``/``input_size``/``embedding_size``."""
    name = _ALIASES.get(name, name)
    if name in MBF:
        return MobileFaceNet(**MBF[name], **kw)
    if name.startswith("r") and name[1:].isdigit() and int(name[1:]) in IRESNET_LAYERS:
        return iresnet(int(name[1:]), **kw)
    raise ValueError(f"unknown backbone {name!r}: one of {INSIGHTFACE_NETWORKS} (or iresnet18..200, mobilefacenet)")
