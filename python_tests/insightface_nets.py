"""Test fixture: insightface arcface_torch's ``get_model`` networks, re-typed from its ``backbones/``
(iresnet.py, mobilefacenet.py) as an independent oracle for :mod:`mdkernels.models.backbones`: same module
tree, names and forward order, no fp16 branch, no weight init (the tests load random weights anyway).
It is never imported by the package."""

from __future__ import annotations

import torch
from torch import nn


# ---- iresnet.py ----------------------------------------------------------------------------------------
class IBasicBlock(nn.Module):
    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-05)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-05)
        self.prelu = nn.PReLU(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-05)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + identity


class IResNet(nn.Module):
    def __init__(self, layers, num_features=512):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64, eps=1e-05)
        self.prelu = nn.PReLU(64)
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1])
        self.layer3 = self._make_layer(256, layers[2])
        self.layer4 = self._make_layer(512, layers[3])
        self.bn2 = nn.BatchNorm2d(512, eps=1e-05)
        self.dropout = nn.Dropout(p=0.0, inplace=True)
        self.fc = nn.Linear(512 * 7 * 7, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=1e-05)

    def _make_layer(self, planes, blocks):
        down = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, 2, bias=False), nn.BatchNorm2d(planes, eps=1e-05))
        mods = [IBasicBlock(self.inplanes, planes, 2, down)]
        self.inplanes = planes
        mods += [IBasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*mods)

    def forward(self, x):
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(torch.flatten(self.bn2(x), 1))
        return self.features(self.fc(x))


# ---- mobilefacenet.py ------------------------------------------------------------------------------------
class Flatten(nn.Module):
    def forward(self, x):
        return x.view(x.size(0), -1)


class ConvBlock(nn.Module):
    def __init__(self, in_c, out_c, kernel=(1, 1), stride=(1, 1), padding=(0, 0), groups=1):
        super().__init__()
        self.layers = nn.Sequential(nn.Conv2d(in_c, out_c, kernel, groups=groups, stride=stride, padding=padding,
                                              bias=False), nn.BatchNorm2d(out_c), nn.PReLU(out_c))  # fmt: skip

    def forward(self, x):
        return self.layers(x)


class LinearBlock(nn.Module):
    def __init__(self, in_c, out_c, kernel=(1, 1), stride=(1, 1), padding=(0, 0), groups=1):
        super().__init__()
        self.layers = nn.Sequential(nn.Conv2d(in_c, out_c, kernel, stride, padding, groups=groups, bias=False),
                                    nn.BatchNorm2d(out_c))  # fmt: skip

    def forward(self, x):
        return self.layers(x)


class DepthWise(nn.Module):
    def __init__(self, in_c, out_c, residual=False, kernel=(3, 3), stride=(2, 2), padding=(1, 1), groups=1):
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(ConvBlock(in_c, groups), ConvBlock(groups, groups, kernel, stride, padding, groups),
                                    LinearBlock(groups, out_c))  # fmt: skip

    def forward(self, x):
        return x + self.layers(x) if self.residual else self.layers(x)


class Residual(nn.Module):
    def __init__(self, c, num_block, groups, kernel=(3, 3), stride=(1, 1), padding=(1, 1)):
        super().__init__()
        self.layers = nn.Sequential(*[DepthWise(c, c, True, kernel, stride, padding, groups) for _ in range(num_block)])

    def forward(self, x):
        return self.layers(x)


class GDC(nn.Module):
    def __init__(self, embedding_size):
        super().__init__()
        head = LinearBlock(512, 512, (7, 7), groups=512)
        self.layers = nn.Sequential(head, Flatten(), nn.Linear(512, embedding_size, bias=False),
                                    nn.BatchNorm1d(embedding_size))  # fmt: skip

    def forward(self, x):
        return self.layers(x)


class MobileFaceNet(nn.Module):
    def __init__(self, num_features=512, blocks=(1, 4, 6, 2), scale=2):
        super().__init__()
        c1, c2 = 64 * scale, 128 * scale
        self.layers = nn.ModuleList([ConvBlock(3, c1, (3, 3), (2, 2), (1, 1))])
        if blocks[0] == 1:
            self.layers.append(ConvBlock(c1, c1, (3, 3), (1, 1), (1, 1), groups=64))
        else:
            self.layers.append(Residual(c1, blocks[0], 128))
        self.layers.extend([DepthWise(c1, c1, groups=128), Residual(c1, blocks[1], 128),
                            DepthWise(c1, c2, groups=256), Residual(c2, blocks[2], 256),
                            DepthWise(c2, c2, groups=512), Residual(c2, blocks[3], 256)])  # fmt: skip
        self.conv_sep = ConvBlock(c2, 512)
        self.features = GDC(num_features)

    def forward(self, x):
        for f in self.layers:
            x = f(x)
        return self.features(self.conv_sep(x))


def get_model(name: str, num_features: int = 512) -> nn.Module:
    depth = {"r18": [2, 2, 2, 2], "r34": [3, 4, 6, 3], "r50": [3, 4, 14, 3], "r100": [3, 13, 30, 3],
             "r200": [6, 26, 60, 6]}  # fmt: skip
    if name in depth:
        return IResNet(depth[name], num_features)
    if name == "mbf":
        return MobileFaceNet(num_features, (1, 4, 6, 2), 2)
    if name == "mbf_large":
        return MobileFaceNet(num_features, (2, 8, 12, 4), 4)
    raise ValueError(name)


def randomize(model: nn.Module, seed: int = 0, size: int = 112) -> nn.Module:
    """Random weights (He-scaled) and BN statistics calibrated on random images, so that eval-mode
    embeddings differ from image to image as a trained network's do; returned in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.01)
            elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.5 + 0.75)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.reset_running_stats()
                m.momentum = None  # a cumulative average over the calibration batches
            elif isinstance(m, nn.PReLU):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.3)
        model.train()
        for _ in range(2):
            model(torch.randn(8, 3, size, size, generator=g))
    return model.eval()
