"""PyTorch twins of the benchmark models of ``make gpu-check`` (imported only there: torch
is not a dependency). Each is exported to ONNX with :func:`export` so our engine builds the very
same network (weights included) that PyTorch eager and ``torch.compile`` run.

* :func:`resnet50`: the ResNet-50 architecture (bottleneck blocks 3-4-6-3, widths 64..2048,
  batch norm, 1000 classes), random weights.
* :func:`bert_encoder`: a BERT-base-shaped encoder (12 layers, hidden 768, 12 heads, GELU MLP
  3072, post-LayerNorm, additive attention mask), from plain Linear / softmax / LayerNorm ops.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn


class Bottleneck(nn.Module):
    def __init__(self, inputs: int, width: int, stride: int) -> None:
        super().__init__()
        outputs = width * 4
        self.conv1 = nn.Conv2d(inputs, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, outputs, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(outputs)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or inputs != outputs:
            self.shortcut = nn.Sequential(
                nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.BatchNorm2d(outputs)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        return torch.relu(self.bn3(self.conv3(y)) + self.shortcut(x))


class ResNet50(nn.Module):
    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
            nn.MaxPool2d(3, 2, 1),
        )  # fmt: skip
        layers: list[nn.Module] = []
        inputs = 64
        for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            for index in range(blocks):
                layers.append(Bottleneck(inputs, width, stride if index == 0 else 1))
                inputs = width * 4
        self.blocks = nn.Sequential(*layers)
        self.fc = nn.Linear(inputs, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.blocks(self.stem(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))


class EncoderLayer(nn.Module):
    def __init__(self, hidden: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)
        self.norm1 = nn.LayerNorm(hidden)
        self.up = nn.Linear(hidden, mlp)
        self.down = nn.Linear(mlp, hidden)
        self.norm2 = nn.LayerNorm(hidden)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch, seq, hidden = x.shape
        head = hidden // self.heads
        q, k, v = self.qkv(x).split(hidden, dim=-1)

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(batch, seq, self.heads, head).transpose(1, 2)

        scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(head) + mask
        context = (torch.softmax(scores, dim=-1) @ split(v)).transpose(1, 2)
        x = self.norm1(x + self.out(context.reshape(batch, seq, hidden)))
        return self.norm2(x + self.down(nn.functional.gelu(self.up(x))))


class BertEncoder(nn.Module):
    def __init__(self, layers: int = 12, hidden: int = 768, heads: int = 12) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(hidden, heads, 4 * hidden) for _ in range(layers))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, mask)
        return x


def resnet50() -> nn.Module:
    torch.manual_seed(0)
    return ResNet50().eval()


def bert_encoder() -> nn.Module:
    torch.manual_seed(0)
    return BertEncoder().eval()


def export(
    model: nn.Module, example: tuple[torch.Tensor, ...], names: list[str], path: Path
) -> Any:
    """ONNX (opset 17, fp32, fixed shapes) of ``model`` on ``example``: the TorchScript exporter
    (``dynamo=False``, plain ONNX ops our optimizer fuses) where this PyTorch still has it, else
    the dynamo exporter."""
    import onnx

    options = dict(input_names=names, output_names=["output"], opset_version=17)
    with torch.no_grad():
        try:
            torch.onnx.export(model, example, str(path), dynamo=False, **options)
        except Exception:  # noqa: BLE001 - a PyTorch without the TorchScript exporter
            torch.onnx.export(model, example, str(path), dynamo=True, **options)
    return onnx.load(str(path))


__all__ = ["bert_encoder", "export", "resnet50"]
