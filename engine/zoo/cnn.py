"""Convolutional zoo models: ResNet, MobileNetV2 blocks, a YOLO/FPN detector head, a UNet.

Each builder returns a checked ``ModelProto`` with a symbolic ``batch`` dim on the image input
(``[batch, 3, 64, 64]``; :func:`engine.zoo.builder.make_inputs` uses batch 1).
"""

from __future__ import annotations

import numpy as np
import onnx

from engine.zoo.builder import (
    FLOAT,
    GraphBuilder,
    batch_norm,
    conv,
    gemm,
    set_dims,
    shape_concat,
)

IMAGE = 64
CLASSES = 10


def _image_builder(name: str, seed: int, opset: int, doc: str) -> tuple[GraphBuilder, str]:
    b = GraphBuilder(name, seed, opset, doc)
    set_dims(b, batch=1)
    return b, b.input("input", FLOAT, ["batch", 3, IMAGE, IMAGE])


def _classifier(b: GraphBuilder, x: str, channels: int, pname: str = "fc") -> None:
    """GlobalAveragePool -> Flatten -> Gemm, the torchvision classifier tail."""
    pooled = b.op("GlobalAveragePool", [x], "/avgpool")
    flat = b.op("Flatten", [pooled], "", axis=1)
    logits = gemm(b, flat, f"/{pname}", pname, channels, CLASSES)
    b.output(logits, "output", FLOAT, ["batch", CLASSES])


# ---------------------------------------------------------------------- ResNet


def _conv_bn(
    b: GraphBuilder, x: str, scope: str, pname: str, conv_name: str, bn_name: str, **kw: int
) -> str:
    prefix = f"{pname}." if pname else ""
    y = conv(b, x, f"{scope}/{conv_name}", f"{prefix}{conv_name}", bias=False, **kw)
    return batch_norm(b, y, f"{scope}/{bn_name}", f"{prefix}{bn_name}", kw["cout"])


def _downsample(
    b: GraphBuilder, x: str, scope: str, pname: str, cin: int, cout: int, stride: int
) -> str:
    where, pname = f"{scope}/downsample/downsample", f"{pname}.downsample"
    y = conv(b, x, f"{where}.0", f"{pname}.0", cin, cout, 1, stride, pad=0, bias=False)
    return batch_norm(b, y, f"{where}.1", f"{pname}.1", cout)


def _basic_block(b: GraphBuilder, x: str, layer: str, cin: int, cout: int, stride: int) -> str:
    scope, pname = f"/{layer}/{layer}.0", f"{layer}.0"
    y = _conv_bn(b, x, scope, pname, "conv1", "bn1", cin=cin, cout=cout, kernel=3, stride=stride)
    y = b.op("Relu", [y], f"{scope}/relu")
    y = _conv_bn(b, y, scope, pname, "conv2", "bn2", cin=cout, cout=cout, kernel=3)
    identity = x
    if stride != 1 or cin != cout:
        identity = _downsample(b, x, scope, pname, cin, cout, stride)
    y = b.op("Add", [y, identity], scope)
    return b.op("Relu", [y], f"{scope}/relu_1")


def _bottleneck(
    b: GraphBuilder, x: str, layer: str, cin: int, width: int, cout: int, stride: int
) -> str:
    scope, pname = f"/{layer}/{layer}.0", f"{layer}.0"
    y = _conv_bn(b, x, scope, pname, "conv1", "bn1", cin=cin, cout=width, kernel=1, pad=0)
    y = b.op("Relu", [y], f"{scope}/relu")
    y = _conv_bn(b, y, scope, pname, "conv2", "bn2", cin=width, cout=width, kernel=3, stride=stride)
    y = b.op("Relu", [y], f"{scope}/relu_1")
    y = _conv_bn(b, y, scope, pname, "conv3", "bn3", cin=width, cout=cout, kernel=1, pad=0)
    identity = _downsample(b, x, scope, pname, cin, cout, stride)
    y = b.op("Add", [y, identity], scope)
    return b.op("Relu", [y], f"{scope}/relu_2")


def build_resnet(seed: int = 0) -> onnx.ModelProto:
    """ResNet-style classifier, opset 13, BatchNormalization kept (not folded into Conv).

    Stem Conv7x7/2 + BN + Relu + MaxPool3x3/2, a BasicBlock, a strided BasicBlock with a 1x1
    conv + BN downsample shortcut, a strided Bottleneck block, GlobalAveragePool, Flatten and
    a Gemm classifier (torchvision naming: ``/layer2/layer2.0/downsample/downsample.0/Conv``).
    """
    b, x = _image_builder("resnet", seed, 13, build_resnet.__doc__ or "")
    y = _conv_bn(b, x, "", "", "conv1", "bn1", cin=3, cout=16, kernel=7, stride=2)
    y = b.op("Relu", [y], "/relu")
    y = b.op(
        "MaxPool",
        [y],
        "/maxpool",
        ceil_mode=0,
        dilations=[1, 1],
        kernel_shape=[3, 3],
        pads=[1, 1, 1, 1],
        strides=[2, 2],
    )
    y = _basic_block(b, y, "layer1", 16, 16, 1)
    y = _basic_block(b, y, "layer2", 16, 32, 2)
    y = _bottleneck(b, y, "layer3", 32, 16, 64, 2)
    _classifier(b, y, 64)
    return b.model()


# ---------------------------------------------------------------------- MobileNetV2


def _conv_bn_relu6(
    b: GraphBuilder,
    x: str,
    scope: str,
    pname: str,
    cin: int,
    cout: int,
    kernel: int,
    stride: int = 1,
    group: int = 1,
) -> str:
    """torchvision ``Conv2dNormActivation``: ``<scope>/<last>.0`` Conv, ``.1`` BN and ``.2``
    Clip(0, 6) (ReLU6), e.g. ``/features/features.0/features.0.2/Clip``."""
    inner = f"{scope}/{scope.rsplit('/', 1)[-1]}"
    y = conv(b, x, f"{inner}.0", f"{pname}.0", cin, cout, kernel, stride, group=group, bias=False)
    y = batch_norm(b, y, f"{inner}.1", f"{pname}.1", cout)
    clip_scope = f"{inner}.2"
    low, high = b.const(clip_scope, 0.0), b.const(clip_scope, 6.0)
    return b.op("Clip", [y, low, high], clip_scope)


def _inverted_residual(
    b: GraphBuilder, x: str, index: int, cin: int, cout: int, stride: int, expand: int
) -> str:
    scope, pname = f"/features/features.{index}/conv", f"features.{index}.conv"
    hidden = cin * expand
    y = _conv_bn_relu6(b, x, f"{scope}/conv.0", f"{pname}.0", cin, hidden, 1)
    y = _conv_bn_relu6(b, y, f"{scope}/conv.1", f"{pname}.1", hidden, hidden, 3, stride, hidden)
    y = conv(b, y, f"{scope}/conv.2", f"{pname}.2", hidden, cout, 1, bias=False, gain=1.0)
    y = batch_norm(b, y, f"{scope}/conv.3", f"{pname}.3", cout)
    if stride == 1 and cin == cout:
        y = b.op("Add", [x, y], f"/features/features.{index}")
    return y


def build_mobilenetv2_block(seed: int = 0) -> onnx.ModelProto:
    """MobileNetV2 inverted-residual stack, opset 13, BN unfolded.

    Stem Conv3x3/2 + BN + Clip(0, 6) (ReLU6 exports as Clip with min/max Constant inputs),
    then three inverted residuals: 1x1 expand Conv + BN + Clip, 3x3 depthwise Conv
    (group = channels) + BN + Clip, 1x1 linear projection + BN, and a residual Add when the
    stride is 1 and channels match (the middle block is strided and has none); classifier tail.
    """
    b, x = _image_builder("mobilenetv2_block", seed, 13, build_mobilenetv2_block.__doc__ or "")
    y = _conv_bn_relu6(b, x, "/features/features.0", "features.0", 3, 16, 3, 2)
    y = _inverted_residual(b, y, 1, 16, 16, 1, 4)
    y = _inverted_residual(b, y, 2, 16, 24, 2, 4)
    y = _inverted_residual(b, y, 3, 24, 24, 1, 4)
    y = _conv_bn_relu6(b, y, "/features/features.4", "features.4", 24, 64, 1)
    _classifier(b, y, 64, "classifier")
    return b.model()


# ---------------------------------------------------------------------- YOLO / FPN head


def _conv_silu(b: GraphBuilder, x: str, index: int, cin: int, cout: int, k: int, s: int) -> str:
    """YOLOv5 ``Conv``: Conv (BN folded into its bias) then SiLU as Sigmoid + Mul."""
    scope = f"/model.{index}"
    y = conv(b, x, f"{scope}/conv", f"model.{index}.conv", cin, cout, k, s, gain=1.0)
    gate = b.op("Sigmoid", [y], f"{scope}/act")
    return b.op("Mul", [y, gate], f"{scope}/act")


def _upsample_nearest(b: GraphBuilder, x: str, scope: str) -> str:
    """``nn.Upsample(scale_factor=2, mode='nearest')`` at opset 13: Resize with scales."""
    scales = b.const(scope, np.array([1.0, 1.0, 2.0, 2.0], dtype=np.float32))
    return b.op(
        "Resize",
        [x, "", scales],
        scope,
        coordinate_transformation_mode="asymmetric",
        cubic_coeff_a=-0.75,
        mode="nearest",
        nearest_mode="floor",
    )


ANCHORS = ((10, 13, 16, 30, 33, 23), (30, 61, 62, 45, 59, 119), (116, 90, 156, 198, 373, 326))
DETECT_CLASSES = 4


def _detect_level(b: GraphBuilder, x: str, level: int, cin: int, size: int) -> str:
    """One ``Detect`` level: Conv -> view(bs, na, no, ny, nx) -> permute -> sigmoid -> decode
    xy/wh with grid and anchor constants -> view(bs, -1, no)."""
    scope, no, na = "/model.24", 5 + DETECT_CLASSES, 3
    stride = IMAGE // size
    y = conv(b, x, f"{scope}/m.{level}", f"model.24.m.{level}", cin, na * no, 1, gain=1.0)
    y = b.op("Reshape", [y, shape_concat(b, y, scope, [0], [na, no, size, size])], scope)
    y = b.op("Transpose", [y], scope, perm=[0, 1, 3, 4, 2])
    y = b.op("Sigmoid", [y], scope)
    split = b.const(scope, [2, 2, no - 4])
    xy, wh, conf = b.ops("Split", [y, split], scope, outputs=3, axis=4)
    gy, gx = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    grid = np.broadcast_to(np.stack([gx, gy], -1) - 0.5, (1, na, size, size, 2))
    anchors = np.array(ANCHORS[level], dtype=np.float32).reshape(1, na, 1, 1, 2)
    xy = b.op("Mul", [xy, b.const(scope, 2.0)], scope)
    xy = b.op("Add", [xy, b.const(scope, grid.astype(np.float32))], scope)
    xy = b.op("Mul", [xy, b.const(scope, float(stride))], scope)
    wh = b.op("Mul", [wh, b.const(scope, 2.0)], scope)
    wh = b.op("Pow", [wh, b.const(scope, 2.0)], scope)
    wh = b.op("Mul", [wh, b.const(scope, anchors)], scope)
    y = b.op("Concat", [xy, wh, conf], scope, axis=4)
    return b.op("Reshape", [y, shape_concat(b, y, scope, [0], [-1, no])], scope)


def build_detector_head(seed: int = 0) -> onnx.ModelProto:
    """YOLOv5-style detector, opset 13: strided Conv+SiLU backbone giving P3/P4/P5 (16, 8, 4),
    an FPN top-down path with Resize(nearest, scales=[1,1,2,2]) + Concat, and a Detect head per
    scale (Conv, Reshape/Transpose to [N, anchors, ny, nx, 5+classes], Sigmoid, grid/anchor
    decode with Split/Mul/Add/Pow, Reshape to [N, anchors*ny*nx, 5+classes]), then a Concat
    across scales giving ``output`` [N, 1008, 9]. Reshape targets use Shape->Gather chains.
    """
    b, x = _image_builder("detector_head", seed, 13, build_detector_head.__doc__ or "")
    y = _conv_silu(b, x, 0, 3, 16, 3, 2)  # 32x32
    p3 = _conv_silu(b, y, 1, 16, 32, 3, 2)  # 16x16
    p4 = _conv_silu(b, p3, 2, 32, 48, 3, 2)  # 8x8
    p5 = _conv_silu(b, p4, 3, 48, 64, 3, 2)  # 4x4
    lateral5 = _conv_silu(b, p5, 10, 64, 48, 1, 1)
    up = _upsample_nearest(b, lateral5, "/model.11")
    merged4 = b.op("Concat", [up, p4], "/model.12", axis=1)
    head4 = _conv_silu(b, merged4, 13, 96, 32, 3, 1)
    up = _upsample_nearest(b, head4, "/model.14")
    merged3 = b.op("Concat", [up, p3], "/model.15", axis=1)
    head3 = _conv_silu(b, merged3, 17, 64, 32, 3, 1)
    outputs = [
        _detect_level(b, head3, 0, 32, 16),
        _detect_level(b, head4, 1, 32, 8),
        _detect_level(b, lateral5, 2, 48, 4),
    ]
    y = b.op("Concat", outputs, "/model.24", axis=1)
    boxes = 3 * (16 * 16 + 8 * 8 + 4 * 4)
    b.output(y, "output", FLOAT, ["batch", boxes, 5 + DETECT_CLASSES])
    return b.model()


# ---------------------------------------------------------------------- UNet


def _double_conv(b: GraphBuilder, x: str, scope: str, pname: str, cin: int, cout: int) -> str:
    """Milesial UNet ``DoubleConv``: (Conv3x3 + Relu) twice inside an ``nn.Sequential``."""
    where, pname = f"{scope}/double_conv/double_conv", f"{pname}.double_conv"
    for i, (a, c) in enumerate(((cin, cout), (cout, cout))):
        x = conv(b, x, f"{where}.{2 * i}", f"{pname}.{2 * i}", a, c, 3)
        x = b.op("Relu", [x], f"{where}.{2 * i + 1}")
    return x


def build_unet_block(seed: int = 0) -> onnx.ModelProto:
    """UNet-style segmenter, opset 13: two down steps (double Conv3x3+Relu, MaxPool 2x2), a
    bottleneck, an up step by ConvTranspose(k=2, stride=2) and one by Resize(linear,
    align_corners, scales) + 1x1 Conv, each followed by a skip Concat and a double conv, then a
    1x1 Conv to 2 classes: ``output`` [N, 2, 64, 64].
    """
    b, x = _image_builder("unet_block", seed, 13, build_unet_block.__doc__ or "")
    pool = {"kernel_shape": [2, 2], "strides": [2, 2], "pads": [0, 0, 0, 0], "ceil_mode": 0}
    skip1 = _double_conv(b, x, "/inc", "inc", 3, 8)  # 64x64
    y = b.op("MaxPool", [skip1], "/down1/maxpool_conv/maxpool_conv.0", **pool)
    skip2 = _double_conv(
        b, y, "/down1/maxpool_conv/maxpool_conv.1", "down1.maxpool_conv.1", 8, 16
    )  # 32x32
    y = b.op("MaxPool", [skip2], "/down2/maxpool_conv/maxpool_conv.0", **pool)
    y = _double_conv(
        b, y, "/down2/maxpool_conv/maxpool_conv.1", "down2.maxpool_conv.1", 16, 32
    )  # 16x16
    weight = b.normal("up1.up.weight", (32, 16, 2, 2), (1.0 / 32) ** 0.5)
    bias = b.normal("up1.up.bias", (16,), 0.05)
    y = b.op(
        "ConvTranspose",
        [y, weight, bias],
        "/up1/up",
        dilations=[1, 1],
        group=1,
        kernel_shape=[2, 2],
        pads=[0, 0, 0, 0],
        strides=[2, 2],
    )
    y = b.op("Concat", [skip2, y], "/up1", axis=1)
    y = _double_conv(b, y, "/up1/conv", "up1.conv", 32, 16)  # 32x32
    scales = b.const("/up2/up", np.array([1.0, 1.0, 2.0, 2.0], dtype=np.float32))
    y = b.op(
        "Resize",
        [y, "", scales],
        "/up2/up",
        coordinate_transformation_mode="align_corners",
        cubic_coeff_a=-0.75,
        mode="linear",
        nearest_mode="floor",
    )
    y = conv(b, y, "/up2/reduce", "up2.reduce", 16, 8, 1, gain=1.0)
    y = b.op("Concat", [skip1, y], "/up2", axis=1)
    y = _double_conv(b, y, "/up2/conv", "up2.conv", 16, 8)  # 64x64
    y = conv(b, y, "/outc/conv", "outc.conv", 8, 2, 1, gain=1.0)
    b.output(y, "output", FLOAT, ["batch", 2, IMAGE, IMAGE])
    return b.model()
