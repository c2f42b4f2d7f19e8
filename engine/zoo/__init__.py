"""A zoo of small, realistic ONNX models built in code (seeded, no downloads).

Every builder is ``build_<name>(seed: int = 0) -> onnx.ModelProto`` and reproduces the node
patterns an exporter really emits (torch.onnx scope names such as ``/layer1/layer1.0/conv1/Conv``,
``Constant`` nodes for shapes and scalars, Shape->Gather->Unsqueeze->Concat reshape targets),
with float32 weights as initializers scaled so activations stay O(1), a symbolic batch dim,
and a model that passes ``onnx.checker.check_model(full_check=True)``. The same seed gives a
byte-identical model. :func:`make_inputs` gives seeded feeds for any zoo model.

Models (see each builder's docstring for the exact pattern):

* ``resnet`` - torchvision ResNet at opset 13 with unfolded BatchNormalization, basic and
  bottleneck blocks, strided 1x1-conv downsample shortcuts, GlobalAveragePool/Flatten/Gemm.
* ``mobilenetv2_block`` - MobileNetV2 inverted residuals: 1x1 expand, depthwise 3x3
  (group = channels), ReLU6 as Clip(0, 6) with Constant bounds, linear projection, residual Add.
* ``detector_head`` - YOLOv5-style FPN + Detect head: Resize(nearest, scales) upsampling,
  Concat, per-scale Conv heads, Reshape/Transpose/Sigmoid, grid/anchor decode, Concat.
* ``bert_opset13`` - HF BERT via torch.onnx at opset 13: Gather embeddings, LayerNorm
  decomposed (ReduceMean/Sub/Pow/.../Add), Shape-chain Reshapes, additive int64 mask,
  Erf-form GELU.
* ``bert_opset17`` - the same encoder at opset 17 with LayerNormalization nodes.
* ``vit_block`` - timm ViT: strided patch Conv, cls-token Concat, position Add, pre-norm
  LayerNormalization, qkv Split/Squeeze attention, Erf GELU MLP.
* ``gpt_block`` - HF GPT-2: Range position ids, Conv1D as Reshape/Gemm/Reshape, causal
  mask Slice + Where(finfo.min), tanh-form GELU, tied lm_head MatMul.
* ``unet_block`` - UNet: Conv+Relu/MaxPool down path, ConvTranspose(stride 2) and
  Resize(linear, align_corners) up paths, skip Concats, 1x1 output Conv.
"""

from __future__ import annotations

from collections.abc import Callable

import onnx

from engine.zoo.builder import make_inputs
from engine.zoo.cnn import (
    build_detector_head,
    build_mobilenetv2_block,
    build_resnet,
    build_unet_block,
)
from engine.zoo.transformer import (
    build_bert_opset13,
    build_bert_opset17,
    build_gpt_block,
    build_vit_block,
)

ZOO: dict[str, Callable[[int], onnx.ModelProto]] = {
    "resnet": build_resnet,
    "mobilenetv2_block": build_mobilenetv2_block,
    "detector_head": build_detector_head,
    "bert_opset13": build_bert_opset13,
    "bert_opset17": build_bert_opset17,
    "vit_block": build_vit_block,
    "gpt_block": build_gpt_block,
    "unet_block": build_unet_block,
}


def build(name: str, seed: int = 0) -> onnx.ModelProto:
    """Build the zoo model ``name`` with weights drawn from ``seed``."""
    try:
        builder = ZOO[name]
    except KeyError:
        raise KeyError(f"unknown zoo model {name!r}; known: {', '.join(sorted(ZOO))}") from None
    return builder(seed)


__all__ = [
    "ZOO",
    "build",
    "build_bert_opset13",
    "build_bert_opset17",
    "build_detector_head",
    "build_gpt_block",
    "build_mobilenetv2_block",
    "build_resnet",
    "build_unet_block",
    "build_vit_block",
    "make_inputs",
]
