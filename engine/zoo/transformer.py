"""Transformer zoo models: BERT (opset 13 and 17), a ViT and a GPT-2 style causal LM.

Token models take ``input_ids`` ``[batch, sequence]`` int64 (and BERT an int64
``attention_mask``); :func:`engine.zoo.builder.make_inputs` uses batch 1, sequence 32 and ids
below the vocabulary size recorded in the model's metadata. Reshape targets are built from
Shape -> Gather -> Unsqueeze -> Concat chains, as torch.onnx emits them for dynamic axes.
"""

from __future__ import annotations

import numpy as np
import onnx

from engine.zoo.builder import (
    FLOAT,
    INT64,
    VOCAB_KEY,
    GraphBuilder,
    dim_of,
    gelu_erf,
    gelu_tanh,
    gemm,
    layer_norm,
    linear,
    set_dims,
    shape_concat,
)

VOCAB = 512
MAX_POSITIONS = 64
SEQUENCE = 32
HIDDEN = 64
HEADS = 4
HEAD_DIM = HIDDEN // HEADS
LAYERS = 2
#: ``torch.finfo(torch.float32).min``, the mask value HF models use.
MASK_VALUE = float(np.finfo(np.float32).min)


def _token_builder(name: str, seed: int, opset: int, doc: str) -> tuple[GraphBuilder, str]:
    b = GraphBuilder(name, seed, opset, doc)
    set_dims(b, batch=1, sequence=SEQUENCE)
    b.metadata[VOCAB_KEY] = str(VOCAB)
    return b, b.input("input_ids", INT64, ["batch", "sequence"])


def _split_heads(b: GraphBuilder, x: str, scope: str, perm: list[int]) -> str:
    """``x.view(x.size()[:-1] + (heads, head_dim)).permute(perm)``."""
    shaped = b.op("Reshape", [x, shape_concat(b, x, scope, [0, 1], [HEADS, HEAD_DIM])], scope)
    return b.op("Transpose", [shaped], scope, perm=perm)


def _merge_heads(b: GraphBuilder, x: str, scope: str) -> str:
    """``x.permute(0, 2, 1, 3).view(x.size()[:-2] + (hidden,))``."""
    moved = b.op("Transpose", [x], scope, perm=[0, 2, 1, 3])
    return b.op("Reshape", [moved, shape_concat(b, moved, scope, [0, 1], [HIDDEN])], scope)


def _slice(b: GraphBuilder, x: str, scope: str, end: str, axis: int) -> str:
    """``x[..., :end]`` along ``axis`` with a dynamic end (Slice with Constant starts/axes)."""
    inputs = [x, b.const(scope, [0]), end, b.const(scope, [axis]), b.const(scope, [1])]
    return b.op("Slice", inputs, scope)


# ---------------------------------------------------------------------- BERT


def _bert_layer(b: GraphBuilder, h: str, mask: str, i: int, fused: bool) -> str:
    scope, pname = f"/encoder/layer.{i}", f"encoder.layer.{i}"
    att = f"{scope}/attention/self"
    q, k, v = (
        linear(b, h, f"{att}/{n}", f"{pname}.attention.self.{n}", HIDDEN, HIDDEN)
        for n in ("query", "key", "value")
    )
    q = _split_heads(b, q, att, [0, 2, 1, 3])
    k = _split_heads(b, k, att, [0, 2, 3, 1])
    v = _split_heads(b, v, att, [0, 2, 1, 3])
    scores = b.op("MatMul", [q, k], att)
    scores = b.op("Div", [scores, b.const(att, float(HEAD_DIM) ** 0.5)], att)
    scores = b.op("Add", [scores, mask], att)
    probs = b.op("Softmax", [scores], att, axis=-1)
    context = _merge_heads(b, b.op("MatMul", [probs, v], att), att)
    out_scope = f"{scope}/attention/output"
    y = linear(b, context, f"{out_scope}/dense", f"{pname}.attention.output.dense", HIDDEN, HIDDEN)
    y = b.op("Add", [y, h], out_scope)
    h = layer_norm(
        b, y, f"{out_scope}/LayerNorm", f"{pname}.attention.output.LayerNorm", HIDDEN, 1e-12, fused
    )
    y = linear(
        b, h, f"{scope}/intermediate/dense", f"{pname}.intermediate.dense", HIDDEN, 4 * HIDDEN
    )
    y = gelu_erf(b, y, f"{scope}/intermediate/intermediate_act_fn")
    y = linear(b, y, f"{scope}/output/dense", f"{pname}.output.dense", 4 * HIDDEN, HIDDEN)
    y = b.op("Add", [y, h], f"{scope}/output")
    return layer_norm(
        b, y, f"{scope}/output/LayerNorm", f"{pname}.output.LayerNorm", HIDDEN, 1e-12, fused
    )


def _bert(name: str, seed: int, opset: int, fused: bool, doc: str) -> onnx.ModelProto:
    b, ids = _token_builder(name, seed, opset, doc)
    attention_mask = b.input("attention_mask", INT64, ["batch", "sequence"])
    # extended mask: (1.0 - mask[:, None, None, :].to(float)) * finfo.min
    mask = b.op("Unsqueeze", [attention_mask, b.const("", [1])])
    mask = b.op("Unsqueeze", [mask, b.const("", [2])])
    mask = b.op("Cast", [mask], to=FLOAT)
    mask = b.op("Sub", [b.const("", 1.0), mask])
    mask = b.op("Mul", [mask, b.const("", MASK_VALUE)])
    emb = "/embeddings"
    words = b.normal("embeddings.word_embeddings.weight", (VOCAB, HIDDEN), 1.0)
    words = b.op("Gather", [words, ids], f"{emb}/word_embeddings", axis=0)
    seq = dim_of(b, ids, emb, 1)
    positions = np.arange(MAX_POSITIONS, dtype=np.int64)[None]
    token_types = _slice(
        b, b.param("embeddings.token_type_ids", np.zeros_like(positions)), emb, seq, 1
    )
    token_types = b.op("Expand", [token_types, shape_concat(b, ids, emb, [0, 1], [])], emb)
    table = b.normal("embeddings.token_type_embeddings.weight", (2, HIDDEN), 0.5)
    types = b.op("Gather", [table, token_types], f"{emb}/token_type_embeddings", axis=0)
    h = b.op("Add", [words, types], emb)
    position_ids = _slice(b, b.param("embeddings.position_ids", positions), emb, seq, 1)
    table = b.normal("embeddings.position_embeddings.weight", (MAX_POSITIONS, HIDDEN), 0.5)
    h = b.op("Add", [h, b.op("Gather", [table, position_ids], f"{emb}/position_embeddings")], emb)
    h = layer_norm(b, h, f"{emb}/LayerNorm", "embeddings.LayerNorm", HIDDEN, 1e-12, fused)
    for i in range(LAYERS):
        h = _bert_layer(b, h, mask, i, fused)
    first = b.op("Gather", [h, b.const("/pooler", 0)], "/pooler", axis=1)
    pooled = gemm(b, first, "/pooler/dense", "pooler.dense", HIDDEN, HIDDEN)
    pooled = b.op("Tanh", [pooled], "/pooler/activation")
    b.output(h, "last_hidden_state", FLOAT, ["batch", "sequence", HIDDEN])
    b.output(pooled, "pooler_output", FLOAT, ["batch", HIDDEN])
    return b.model()


def build_bert_opset13(seed: int = 0) -> onnx.ModelProto:
    """HF ``BertModel`` (2 layers, hidden 64, 4 heads) as torch.onnx exports it at opset 13.

    Word/token-type/position embedding Gathers (position and token-type ids Sliced from
    buffers to the dynamic sequence length), LayerNorm decomposed into
    ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div/Mul/Add, Q/K/V as MatMul + Add, head
    split/merge Reshapes whose targets come from Shape->Gather->Unsqueeze->Concat chains,
    scores Div by sqrt(head_dim), the additive mask (1 - Cast(Unsqueeze(attention_mask))) *
    finfo.min, Softmax, Erf-form GELU (Div 1.4142, Erf, Add 1, Mul, Mul 0.5), and the pooler
    (Gather token 0, Gemm, Tanh). Outputs ``last_hidden_state`` and ``pooler_output``.
    """
    return _bert("bert_opset13", seed, 13, False, build_bert_opset13.__doc__ or "")


def build_bert_opset17(seed: int = 0) -> onnx.ModelProto:
    """The same BERT encoder exported at opset 17: every LayerNorm is one LayerNormalization
    node (epsilon 1e-12); GELU stays in Erf form, everything else as in ``bert_opset13``."""
    return _bert("bert_opset17", seed, 17, True, build_bert_opset17.__doc__ or "")


# ---------------------------------------------------------------------- ViT


def _vit_block(b: GraphBuilder, x: str, i: int) -> str:
    scope, pname = f"/blocks/blocks.{i}", f"blocks.{i}"
    y = layer_norm(b, x, f"{scope}/norm1", f"{pname}.norm1", HIDDEN, 1e-6, True)
    att = f"{scope}/attn"
    qkv = linear(b, y, f"{att}/qkv", f"{pname}.attn.qkv", HIDDEN, 3 * HIDDEN)
    target = shape_concat(b, y, att, [0, 1], [3, HEADS, HEAD_DIM])
    qkv = b.op("Reshape", [qkv, target], att)
    qkv = b.op("Transpose", [qkv], att, perm=[2, 0, 3, 1, 4])
    parts = b.ops("Split", [qkv, b.const(att, [1, 1, 1])], att, outputs=3, axis=0)
    q, k, v = (b.op("Squeeze", [p, b.const(att, [0])], att) for p in parts)
    q = b.op("Mul", [q, b.const(att, float(HEAD_DIM) ** -0.5)], att)
    k = b.op("Transpose", [k], att, perm=[0, 1, 3, 2])
    probs = b.op("Softmax", [b.op("MatMul", [q, k], att)], att, axis=-1)
    y = _merge_heads(b, b.op("MatMul", [probs, v], att), att)
    y = linear(b, y, f"{att}/proj", f"{pname}.attn.proj", HIDDEN, HIDDEN)
    x = b.op("Add", [x, y], scope)
    y = layer_norm(b, x, f"{scope}/norm2", f"{pname}.norm2", HIDDEN, 1e-6, True)
    y = linear(b, y, f"{scope}/mlp/fc1", f"{pname}.mlp.fc1", HIDDEN, 2 * HIDDEN)
    y = gelu_erf(b, y, f"{scope}/mlp/act")
    y = linear(b, y, f"{scope}/mlp/fc2", f"{pname}.mlp.fc2", 2 * HIDDEN, HIDDEN)
    return b.op("Add", [x, y], scope)


def build_vit_block(seed: int = 0) -> onnx.ModelProto:
    """timm-style ViT (patch 8 on 64x64 -> 64 patches + cls, hidden 64, 2 blocks), opset 17.

    Patch embedding Conv(kernel = stride = 8), ``flatten(2)`` as Reshape and Transpose, cls
    token Expand (batch from a Shape chain) + Concat, position-embedding Add, pre-norm
    LayerNormalization, fused qkv MatMul reshaped to [B, N, 3, heads, hd], Transposed and
    unbound with Split + Squeeze, q * scale, Softmax, MLP with Erf GELU, residual Adds, final
    LayerNormalization, cls token Gather and a Gemm head: ``logits`` [N, 10].
    """
    b = GraphBuilder("vit_block", seed, 17, build_vit_block.__doc__ or "")
    set_dims(b, batch=1)
    pixels = b.input("pixel_values", FLOAT, ["batch", 3, 64, 64])
    patches = b.op(
        "Conv",
        [
            pixels,
            b.normal("patch_embed.proj.weight", (HIDDEN, 3, 8, 8), 192**-0.5),
            b.normal("patch_embed.proj.bias", (HIDDEN,), 0.05),
        ],
        "/patch_embed/proj",
        dilations=[1, 1],
        group=1,
        kernel_shape=[8, 8],
        pads=[0, 0, 0, 0],
        strides=[8, 8],
    )
    target = shape_concat(b, patches, "/patch_embed", [0, 1], [-1])
    tokens = b.op("Reshape", [patches, target], "/patch_embed")
    tokens = b.op("Transpose", [tokens], "/patch_embed", perm=[0, 2, 1])
    cls = b.normal("cls_token", (1, 1, HIDDEN), 0.5)
    cls = b.op("Expand", [cls, shape_concat(b, tokens, "", [0], [1, 1])])
    x = b.op("Concat", [cls, tokens], axis=1)
    x = b.op("Add", [x, b.normal("pos_embed", (1, 65, HIDDEN), 0.5)])
    for i in range(LAYERS):
        x = _vit_block(b, x, i)
    x = layer_norm(b, x, "/norm", "norm", HIDDEN, 1e-6, True)
    first = b.op("Gather", [x, b.const("", 0)], axis=1)
    logits = gemm(b, first, "/head", "head", HIDDEN, 10)
    b.output(logits, "logits", FLOAT, ["batch", 10])
    return b.model()


# ---------------------------------------------------------------------- GPT-2


def _conv1d(b: GraphBuilder, x: str, scope: str, pname: str, fin: int, fout: int) -> str:
    """HF GPT-2 ``Conv1D`` (addmm on a flattened view): Reshape [-1, fin] -> Gemm ->
    Reshape back to ``x.size()[:-1] + (fout,)``."""
    flat = b.op("Reshape", [x, b.const(scope, [-1, fin])], scope)
    weight = b.normal(f"{pname}.weight", (fin, fout), fin**-0.5)
    y = b.op(
        "Gemm", [flat, weight, b.normal(f"{pname}.bias", (fout,), 0.05)], scope, alpha=1.0, beta=1.0
    )
    return b.op("Reshape", [y, shape_concat(b, x, scope, [0, 1], [fout])], scope)


def _gpt_layer(b: GraphBuilder, h: str, causal: str, i: int) -> str:
    scope, pname = f"/transformer/h.{i}", f"transformer.h.{i}"
    att = f"{scope}/attn"
    y = layer_norm(b, h, f"{scope}/ln_1", f"{pname}.ln_1", HIDDEN, 1e-5, True)
    qkv = _conv1d(b, y, f"{att}/c_attn", f"{pname}.attn.c_attn", HIDDEN, 3 * HIDDEN)
    split = b.const(att, [HIDDEN] * 3)
    q, k, v = b.ops("Split", [qkv, split], att, outputs=3, axis=2)
    q = _split_heads(b, q, att, [0, 2, 1, 3])
    k = _split_heads(b, k, att, [0, 2, 3, 1])
    v = _split_heads(b, v, att, [0, 2, 1, 3])
    scores = b.op("MatMul", [q, k], att)
    scores = b.op("Div", [scores, b.const(att, float(HEAD_DIM) ** 0.5)], att)
    seq = dim_of(b, y, att, 1)
    mask = _slice(b, _slice(b, causal, att, seq, 2), att, seq, 3)
    scores = b.op("Where", [mask, scores, b.const(att, MASK_VALUE)], att)
    probs = b.op("Softmax", [scores], att, axis=-1)
    y = _merge_heads(b, b.op("MatMul", [probs, v], att), att)
    y = _conv1d(b, y, f"{att}/c_proj", f"{pname}.attn.c_proj", HIDDEN, HIDDEN)
    h = b.op("Add", [y, h], scope)
    y = layer_norm(b, h, f"{scope}/ln_2", f"{pname}.ln_2", HIDDEN, 1e-5, True)
    y = _conv1d(b, y, f"{scope}/mlp/c_fc", f"{pname}.mlp.c_fc", HIDDEN, 4 * HIDDEN)
    y = gelu_tanh(b, y, f"{scope}/mlp/act")
    y = _conv1d(b, y, f"{scope}/mlp/c_proj", f"{pname}.mlp.c_proj", 4 * HIDDEN, HIDDEN)
    return b.op("Add", [h, y], scope)


def build_gpt_block(seed: int = 0) -> onnx.ModelProto:
    """HF ``GPT2LMHeadModel`` (2 layers, hidden 64, 4 heads, vocab 512), opset 17.

    wte/wpe Gathers with position ids from Range(0, seq) + Unsqueeze, pre-norm
    LayerNormalization, ``Conv1D`` layers as Reshape -> Gemm -> Reshape, qkv Split, causal
    mask Sliced from a constant lower-triangular bool buffer [1, 1, 64, 64] and applied with
    Where(mask, scores, finfo.min), Softmax, tanh-form GELU (Mul 0.5, Pow 3, Mul 0.044715, Add,
    Mul sqrt(2/pi), Tanh, Add 1, Mul), final LayerNormalization and a tied lm_head MatMul:
    ``logits`` [N, sequence, 512].
    """
    b, ids = _token_builder("gpt_block", seed, 17, build_gpt_block.__doc__ or "")
    wte = b.rng.normal(0.0, 0.3, size=(VOCAB, HIDDEN)).astype(np.float32)
    top = "/transformer"
    tokens = b.op("Gather", [b.param("transformer.wte.weight", wte), ids], f"{top}/wte", axis=0)
    length = b.op("Gather", [b.op("Shape", [ids], top), b.const(top, 1)], top, axis=0)
    positions = b.op("Range", [b.const(top, 0), length, b.const(top, 1)], top)
    positions = b.op("Unsqueeze", [positions, b.const(top, [0])], top)
    wpe = b.normal("transformer.wpe.weight", (MAX_POSITIONS, HIDDEN), 0.5)
    h = b.op("Add", [tokens, b.op("Gather", [wpe, positions], f"{top}/wpe", axis=0)], top)
    causal = np.tril(np.ones((MAX_POSITIONS, MAX_POSITIONS), dtype=bool))[None, None]
    causal_name = b.param("transformer.h.0.attn.bias", causal)
    for i in range(LAYERS):
        h = _gpt_layer(b, h, causal_name, i)
    h = layer_norm(b, h, f"{top}/ln_f", "transformer.ln_f", HIDDEN, 1e-5, True)
    lm_head = b.param(b.anonymous("MatMul"), np.ascontiguousarray(wte.T))
    logits = b.op("MatMul", [h, lm_head], "/lm_head")
    b.output(logits, "logits", FLOAT, ["batch", "sequence", VOCAB])
    return b.model()
