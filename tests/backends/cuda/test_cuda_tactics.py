"""The CUDA tactic catalogue on zoo plans with a fake device: candidates and refusal reasons.

Most tests pretend every catalogued kernel is written (``kernel_missing`` patched to None) so
they check the shape/dtype/precision/compute-capability rules; one test checks the real
kernel folder. The SIMT tile variants compile for sm_80 without spills.
"""

from __future__ import annotations

import onnx_ir as ir
import pytest

from engine import zoo
from engine.backends.cuda import nvrtc, tactics
from engine.backends.cuda.device_info import fake_device
from engine.backends.cuda.tactics import (
    CATALOGUE,
    CUDA_TACTIC_FAMILIES,
    cuda_candidates,
    cuda_refusals,
    cuda_why_not,
)
from engine.build.plan import Plan, lower
from engine.build.timing import FakeTimer
from engine.builder import build
from engine.config import BuilderConfig, Precision, SparsityMode
from engine.ops.registry import TensorSpec
from engine.passes import optimize

H100 = fake_device()
CONFIG = BuilderConfig()
#: Kernel files the catalogue refers to that other work items will add.
PLANNED = {"cublasGemmEx"}


def _plan(name: str, level: str = "O2") -> Plan:
    model = ir.serde.deserialize_model(zoo.build(name))
    return lower(optimize(model, level, estimate_costs=False).model)


def _built(name: str, precisions: set[Precision], calibrate: bool = False) -> Plan:
    proto = zoo.build(name)
    data = [zoo.make_inputs(proto, seed=s) for s in range(2)] if calibrate else None
    config = BuilderConfig(precisions=frozenset(precisions | {Precision.FP32}))
    model = ir.serde.deserialize_model(proto)
    return build(model, config, timer=FakeTimer({}), calibration_data=data).plan


@pytest.fixture(scope="module")
def resnet() -> Plan:
    return _plan("resnet")


@pytest.fixture(scope="module")
def resnet_fp16() -> Plan:
    return _built("resnet", {Precision.FP16})


@pytest.fixture
def all_written(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tactics, "kernel_missing", lambda tactic: None)


def _layer(plan: Plan, suffix: str):
    return next(layer for layer in plan.layers if layer.name.endswith(suffix))


def test_catalogue_names_are_unique_and_families_known() -> None:
    full = tactics.full_catalogue()
    names = [t.name for t in full]
    assert len(names) == len(set(names))
    assert {t.family for t in full} <= set(CUDA_TACTIC_FAMILIES)
    assert len(full) > len(CATALOGUE)  # the lowering modules add theirs


def test_every_written_tactic_has_a_lowering() -> None:
    from engine.backends.cuda.lowerings import all_lowerings

    lowered = all_lowerings()
    missing = [
        t.name
        for t in tactics.full_catalogue()
        if tactics.kernel_missing(t) is None and t.name not in lowered
    ]
    assert missing == []


def test_every_kernel_file_exists_with_its_entry_or_is_planned() -> None:
    for tactic in CATALOGUE:
        if tactic.kernel_file is None:
            continue
        path = nvrtc.KERNEL_DIR / tactic.kernel_file
        written = path.is_file() and (tactic.library or tactic.entry in path.read_text())
        assert written or tactic.entry in PLANNED, tactic.name
        reason = tactics.kernel_missing(tactic)
        assert (reason is None) == bool(written), tactic.name
        if reason:
            assert "not written yet" in reason


def test_resnet_fp32_candidates(resnet, all_written) -> None:
    stem = _layer(resnet, "/relu/Relu/ConvAct")  # 7x7 stride 2, C = 3
    assert cuda_candidates(stem, resnet, CONFIG, H100) == [
        "conv_igemm_f32_64x64",
        "conv_igemm_f32_128x64",
        "im2col_cublas_fp32",
    ]
    reasons = cuda_refusals(stem, resnet, CONFIG, H100)
    assert reasons["conv1x1_gemm_simt_f32"] == "not a 1x1, stride-1, unpadded convolution"
    assert reasons["conv_depthwise_f32"] == "not depthwise (group 1, C 3, M 16)"
    assert "handles FLOAT16 data, got FLOAT" in reasons["conv_mma_f16_64x64"]
    pointwise_1x1 = _layer(resnet, "layer3.0/relu/Relu/ConvAct")  # 1x1 stride 1
    assert "conv1x1_gemm_simt_f32" in cuda_candidates(pointwise_1x1, resnet, CONFIG, H100)
    fc = _layer(resnet, "/fc/Gemm")  # 1 x 10 output, transB = 1 with a constant B
    assert cuda_candidates(fc, resnet, CONFIG, H100) == ["gemm_simt_f32_32x32x16", "cublas_fp32"]
    refused = cuda_why_not(fc, resnet, "gemm_simt_f32_64x64x16", H100)
    assert refused == (
        "a 64x64 tile is over twice the 1x10 output in both dimensions (a smaller tile covers it)"
    )
    assert cuda_why_not(fc, resnet, "cublas_tf32", H100) == (
        "cublas_tf32 computes in tf32, the layer is fp32"
    )


def test_resnet_fp16_candidates_and_channel_alignment(resnet_fp16, all_written) -> None:
    stem = _layer(resnet_fp16, "/relu/Relu/ConvAct")
    assert stem.precision == Precision.FP16
    assert cuda_candidates(stem, resnet_fp16, CONFIG, H100) == [
        "conv_igemm_f16_64x64",
        "conv_igemm_f16_128x64",
        "im2col_cublas_fp16",
    ]
    assert cuda_why_not(stem, resnet_fp16, "conv_mma_f16_64x64", H100) == (
        "C = 3 is not a multiple of 8 (16-byte NHWC channel vectors)"
    )
    block = _layer(resnet_fp16, "layer3.0/relu/Relu/ConvAct")  # 1x1, C = 32
    assert cuda_candidates(block, resnet_fp16, CONFIG, H100) == [
        "conv_igemm_f16_64x64",
        "conv_igemm_f16_128x64",
        "conv1x1_gemm_mma_f16",
        "im2col_cublas_fp16",
        "conv_mma_f16_64x64",
    ]
    fc = _layer(resnet_fp16, "/fc/Gemm")
    assert cuda_candidates(fc, resnet_fp16, CONFIG, H100) == [
        "gemm_simt_f16_64x64x16",
        "gemm_mma_f16",
        "cublas_fp16",
    ]


def test_compute_capability_filters_tensor_core_tactics(resnet_fp16, all_written) -> None:
    turing = fake_device(name="Tesla T4", compute_capability=(7, 5))
    fc = _layer(resnet_fp16, "/fc/Gemm")
    assert cuda_candidates(fc, resnet_fp16, CONFIG, turing) == [
        "gemm_simt_f16_64x64x16",
        "cublas_fp16",
    ]
    assert cuda_why_not(fc, resnet_fp16, "gemm_mma_f16", turing) == (
        "gemm_mma_f16 needs compute capability 8.0+, Tesla T4 is 7.5"
    )


def test_missing_cupy_refuses_library_tactics(resnet, all_written) -> None:
    fc = _layer(resnet, "/fc/Gemm")
    no_cupy = fake_device(cupy_version="")
    assert cuda_candidates(fc, resnet, CONFIG, no_cupy) == ["gemm_simt_f32_32x32x16"]
    assert "through CuPy, which is missing" in cuda_why_not(fc, resnet, "cublas_fp32", no_cupy)


def test_depthwise_layers_of_mobilenet(all_written) -> None:
    plan = _plan("mobilenetv2_block")
    depthwise = _layer(plan, "features.1/conv/conv.1/conv.1.2/Clip/ConvAct")
    assert cuda_candidates(depthwise, plan, CONFIG, H100) == [
        "conv_igemm_f32_64x64",  # grouped implicit GEMM runs depthwise too
        "conv_igemm_f32_128x64",
        "conv_depthwise_f32",
    ]
    assert cuda_why_not(depthwise, plan, "im2col_cublas_fp32", H100) == (
        "group = 64: this kernel runs ungrouped convolutions"
    )


def test_bert_layers(all_written) -> None:
    plan = _plan("bert_opset17", "O3")
    scores = _layer(plan, "layer.0/attention/self/MatMul")  # Q @ K^T, both batched
    assert cuda_candidates(scores, plan, CONFIG, H100) == ["gemm_batched_f32", "cublas_fp32"]
    assert cuda_why_not(scores, plan, "gemm_simt_f32_32x32x16", H100) == (
        "both operands batched (attention): needs the batched GEMM (cuBLAS batched has it)"
    )
    query = _layer(plan, "layer.0/attention/self/query/MatMul")  # [1, 1, 64] @ [64, 64]
    assert cuda_candidates(query, plan, CONFIG, H100) == [
        "gemm_simt_f32_32x32x16",
        "gemm_simt_f32_64x64x16",
        "gemm_simt_f32_128x64x8",
        "gemm_batched_f32",  # batch 1, weight broadcast through a zero batch stride
        "cublas_fp32",
    ]
    softmax = _layer(plan, "layer.0/attention/self/Softmax")
    assert cuda_candidates(softmax, plan, CONFIG, H100) == ["softmax_f32"]
    norm = next(layer for layer in plan.layers if layer.op_type == "LayerNorm")
    assert cuda_candidates(norm, plan, CONFIG, H100) == ["layernorm_f32"]
    gelu = next(layer for layer in plan.layers if layer.op_type == "Gelu")
    assert cuda_candidates(gelu, plan, CONFIG, H100) == ["bias_act_f32", "elementwise_generated"]


def test_int8_layers_need_int8_activations_and_aligned_channels(all_written) -> None:
    plan = _built("resnet", {Precision.INT8}, calibrate=True)
    stem = _layer(plan, "/relu/Relu/ConvAct")
    assert stem.qualified_op == "gie::QConv"
    assert cuda_why_not(stem, plan, "conv_imma_s8_64x64", H100) == (
        "C = 3 is not a multiple of 16 (16-byte NHWC channel vectors)"
    )
    block = _layer(plan, "layer1.0/relu/Relu/ConvAct")
    # The plan's spec of its input (what the kernel would read) decides.
    plan.specs[block.inputs[0]] = TensorSpec((1, 16, 16, 16), ir.DataType.FLOAT)
    assert cuda_why_not(block, plan, "conv_imma_s8_64x64", H100) == (
        "the activation input is FLOAT in the plan; int8 kernels read int8"
    )
    plan.specs[block.inputs[0]] = TensorSpec((1, 16, 16, 16), ir.DataType.INT8)
    assert cuda_candidates(block, plan, CONFIG, H100) == [
        "conv_imma_s8_64x64",
        "conv_imma_s8_128x128",
    ]


def test_config_filters_sources_and_sparsity(resnet_fp16, all_written) -> None:
    fc = _layer(resnet_fp16, "/fc/Gemm")
    only_cublas = CONFIG.with_changes(tactic_sources=frozenset({"cublas"}))
    assert cuda_candidates(fc, resnet_fp16, only_cublas, H100) == ["cublas_fp16"]
    assert cuda_refusals(fc, resnet_fp16, CONFIG, H100)["gemm_sparse_f16"] == "sparsity is off"
    sparse = CONFIG.with_changes(sparsity=SparsityMode.ON)
    reason = cuda_refusals(fc, resnet_fp16, sparse, H100)["gemm_sparse_f16"]
    assert reason == "the weight is not 2:4 sparse (prune it, or build with sparsity 'force')"


def test_real_kernel_folder_offers_only_written_kernels(resnet) -> None:
    stem = _layer(resnet, "/relu/Relu/ConvAct")
    reasons = cuda_refusals(stem, resnet, CONFIG, H100)
    assert "handles FLOAT16 data, got FLOAT" in reasons["conv_mma_f16_64x64"]
    assert all("not written yet" not in (r or "") for r in reasons.values())
    fc = _layer(resnet, "/fc/Gemm")
    assert cuda_candidates(fc, resnet, CONFIG, H100) == ["gemm_simt_f32_32x32x16", "cublas_fp32"]


def test_simt_tile_variants_compile_without_spills(nvrtc_cache) -> None:
    for tactic in CATALOGUE:
        if not tactic.defines or tactics.kernel_missing(tactic) is not None:
            continue
        result = nvrtc.compile_file(
            nvrtc.KERNEL_DIR / tactic.kernel_file,  # type: ignore[operator]
            "sm_80",
            extra_options=tactic.options(),
            cache=nvrtc_cache,
        )
        resources = result.resources[tactic.entry]
        assert not resources.spills, (tactic.name, resources)
        assert resources.registers <= 255


def test_pools_and_reformat_layers(resnet, resnet_fp16, all_written) -> None:
    pool = _layer(resnet, "/maxpool/MaxPool")
    assert cuda_candidates(pool, resnet, CONFIG, H100) == ["max_pool_f32"]
    gap = _layer(resnet, "/avgpool/GlobalAveragePool")
    assert cuda_candidates(gap, resnet, CONFIG, H100) == ["global_average_pool_f32"]
    cast_in = next(layer for layer in resnet_fp16.layers if layer.role == "reformat")
    assert cuda_candidates(cast_in, resnet_fp16, CONFIG, H100) == [
        "cast_f32_to_f16",
        "cast_generated",
    ]
    assert cuda_why_not(cast_in, resnet_fp16, "cast_f16_to_f32", H100) == (
        "cast_f16_to_f32 handles FLOAT16 data, got FLOAT"
    )


def test_int8_gemm_entry_follows_the_output_dtype(all_written) -> None:
    plan = _built("resnet", {Precision.INT8}, calibrate=True)
    quantize = next(layer for layer in plan.layers if layer.op_type == "QuantizeLinear")
    assert cuda_candidates(quantize, plan, CONFIG, H100) == ["quantize_f32_s8"]
    fc = _layer(plan, "/fc/Gemm")
    assert fc.qualified_op == "gie::QGemm"
    plan.specs[fc.inputs[0]] = TensorSpec((1, 64), ir.DataType.INT8)
    plan.specs[fc.outputs[0]] = TensorSpec((1, 10), ir.DataType.FLOAT)
    assert cuda_candidates(fc, plan, CONFIG, H100) == [
        "gemm_imma_f32",
        "cublas_int8_f32",
        "gemm_imma_pipelined_f32_64x64",
    ]
    assert cuda_why_not(fc, plan, "gemm_imma_s8", H100) == (
        "the layer produces FLOAT, this entry writes INT8"
    )
