// gie_prelude.cuh: what every GIE kernel includes.
//
// * gie_half and its conversions (cuda_fp16.h on the GPU, a _Float16 stand-in in the CPU shim);
// * the epilogue activations shared by every fused kernel (codes below, mirrored in
//   engine/backends/cuda/activations.py);
// * warp reductions;
// * tensor-core PTX behind small device functions (mma.sync, ldmatrix, cp.async, int8 mma,
//   mma.sp). Kernels never write inline PTX themselves: the CPU shim
//   (engine/backends/cuda/shim/gie_cpu_shim.h) defines GIE_CPU_SHIM and supplies its own
//   versions of exactly these functions, emulated per the PTX fragment layouts.
#pragma once

#ifndef GIE_CPU_SHIM
#include <cuda_fp16.h>
typedef __half gie_half;
#define GIE_DEVICE __device__ __forceinline__
GIE_DEVICE float gie_h2f(gie_half value) { return __half2float(value); }
GIE_DEVICE gie_half gie_f2h(float value) { return __float2half_rn(value); }
// Two halves as one 32-bit fragment register (lo in bits 0..15), as mma.sync operands hold them.
GIE_DEVICE unsigned gie_pack_half2(gie_half lo, gie_half hi) {
    return unsigned(__half_as_ushort(lo)) | (unsigned(__half_as_ushort(hi)) << 16);
}
#endif

// --------------------------------------------------------------------------- loads/stores
// Kernels templated on the storage type read and write through these (math is fp32).
GIE_DEVICE float gie_load(const float* pointer) { return *pointer; }
GIE_DEVICE float gie_load(const gie_half* pointer) { return gie_h2f(*pointer); }
GIE_DEVICE void gie_store(float* pointer, float value) { *pointer = value; }
GIE_DEVICE void gie_store(gie_half* pointer, float value) { *pointer = gie_f2h(value); }

// --------------------------------------------------------------------------- activations
// Codes shared with Python (engine/backends/cuda/activations.py).
#define GIE_ACT_NONE 0
#define GIE_ACT_RELU 1
#define GIE_ACT_GELU_ERF 2
#define GIE_ACT_GELU_TANH 3
#define GIE_ACT_SIGMOID 4
#define GIE_ACT_TANH 5
#define GIE_ACT_SILU 6
#define GIE_ACT_LEAKY_RELU 7  // alpha = slope
#define GIE_ACT_CLIP 8        // [alpha, beta]
#define GIE_ACT_HARD_SWISH 9

GIE_DEVICE float gie_activate(float x, int activation, float alpha, float beta) {
    switch (activation) {
        case GIE_ACT_RELU: return x > 0.0f ? x : 0.0f;
        case GIE_ACT_GELU_ERF: return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));
        case GIE_ACT_GELU_TANH: {
            float inner = 0.7978845608028654f * (x + 0.044715f * x * x * x);
            return 0.5f * x * (1.0f + tanhf(inner));
        }
        case GIE_ACT_SIGMOID: return 1.0f / (1.0f + expf(-x));
        case GIE_ACT_TANH: return tanhf(x);
        case GIE_ACT_SILU: return x / (1.0f + expf(-x));
        case GIE_ACT_LEAKY_RELU: return x >= 0.0f ? x : alpha * x;
        case GIE_ACT_CLIP: return fminf(fmaxf(x, alpha), beta);
        case GIE_ACT_HARD_SWISH: return x * fminf(fmaxf(x / 6.0f + 0.5f, 0.0f), 1.0f);
        default: return x;
    }
}

// --------------------------------------------------------------------------- int8 epilogue
// The int8 layers' requantization, bit-exact with engine/ops/gie_quant.py (gie::QConv/QGemm/
// QMatMul): int32 saturating bias add, float32 real value, int8 output rintf + saturate.
// __fmul_rn / __fdiv_rn keep every step a rounded float32 operation (no FMA contraction with
// a later residual add), as the NumPy reference rounds each one.

// saturate_int32(acc + bias), the sum formed exactly in 64 bits.
GIE_DEVICE int gie_add_sat_s32(int acc, int bias) {
    const long long total = (long long)acc + (long long)bias;
    return total > 2147483647LL ? 2147483647 : (total < -2147483648LL ? (int)(-2147483647 - 1)
                                                                       : (int)total);
}

// float32(acc) * float32(x_scale * w_scale): the real value of an int32 accumulator.
GIE_DEVICE float gie_dequant_acc(int acc, float x_scale, float w_scale) {
    return __fmul_rn((float)acc, __fmul_rn(x_scale, w_scale));
}

// saturate_int8(rint(real / y_scale)): float32 division, ties to even, NaN gives 0.
GIE_DEVICE signed char gie_quant_s8(float real, float y_scale) {
    const float q = rintf(__fdiv_rn(real, y_scale));
    if (!(q == q)) return 0;
    return (signed char)(q > 127.0f ? 127.0f : (q < -128.0f ? -128.0f : q));
}

// An int8 layer's output store: int8 (requantized with y_scale), float32, or float16.
GIE_DEVICE void gie_store_q(signed char* pointer, float real, float y_scale) {
    *pointer = gie_quant_s8(real, y_scale);
}
GIE_DEVICE void gie_store_q(float* pointer, float real, float) { *pointer = real; }
GIE_DEVICE void gie_store_q(gie_half* pointer, float real, float) { *pointer = gie_f2h(real); }

// --------------------------------------------------------------------------- warp reductions

GIE_DEVICE float gie_warp_sum(float value) {
    for (int offset = 16; offset > 0; offset >>= 1)
        value += __shfl_xor_sync(0xffffffffu, value, offset);
    return value;
}

GIE_DEVICE float gie_warp_max(float value) {
    for (int offset = 16; offset > 0; offset >>= 1)
        value = fmaxf(value, __shfl_xor_sync(0xffffffffu, value, offset));
    return value;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the total.
// scratch: 32 floats of shared memory owned by the caller.
GIE_DEVICE float gie_block_sum(float value, float* scratch) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int warps = (blockDim.x + 31) >> 5;
    value = gie_warp_sum(value);
    __syncthreads();  // scratch may still be read by a previous reduction
    if (lane == 0) scratch[warp] = value;
    __syncthreads();
    return gie_warp_sum(lane < warps ? scratch[lane] : 0.0f);
}

GIE_DEVICE float gie_block_max(float value, float* scratch) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int warps = (blockDim.x + 31) >> 5;
    value = gie_warp_max(value);
    __syncthreads();
    if (lane == 0) scratch[warp] = value;
    __syncthreads();
    return gie_warp_max(lane < warps ? scratch[lane] : -3.402823466e+38f);
}

// --------------------------------------------------------------------------- tensor cores
// Fragment layouts (PTX ISA, "Matrix fragments for mma.m16n8k16"): groupID = lane / 4,
// tig = lane % 4.  A (16x16, row): a[0] = A[g][2t..2t+1], a[1] = A[g+8][2t..], a[2] =
// A[g][2t+8..], a[3] = A[g+8][2t+8..].  B (16x8, col): b[0] = B[2t..2t+1][g], b[1] =
// B[2t+8..][g].  C/D (16x8 f32): c[0..1] = C[g][2t..2t+1], c[2..3] = C[g+8][2t..2t+1].

#ifndef GIE_CPU_SHIM

GIE_DEVICE unsigned gie_shared_address(const void* pointer) {
    unsigned address;
    asm volatile("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }"
                 : "=r"(address) : "l"(pointer));
    return address;
}

// D = A * B + C, f16 inputs, f32 accumulate.
GIE_DEVICE void gie_mma_m16n8k16_f16_f32(float d[4], const unsigned a[4], const unsigned b[2],
                                         const float c[4]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]),
          "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
}

// D = A * B + C, s8 inputs, s32 accumulate (m16n8k32). Used by gemm_int8.cu.
GIE_DEVICE void gie_mma_m16n8k32_s8_s32(int d[4], const unsigned a[4], const unsigned b[2],
                                        const int c[4]) {
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};\n"
        : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]),
          "r"(c[0]), "r"(c[1]), "r"(c[2]), "r"(c[3]));
}

// 2:4 sparse D = A * B + C, f16 (A compressed to 16x16 of a logical 16x32, metadata per
// thread pair, selector 0). Used by gemm_sparse.cu; the shim emulates it.
GIE_DEVICE void gie_mma_sp_m16n8k32_f16_f32(float d[4], const unsigned a[4], const unsigned b[4],
                                            const float c[4], unsigned metadata) {
    asm volatile(
        "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.f16.f16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9,%10,%11}, {%12,%13,%14,%15}, %16, 0x0;\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]),
          "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]),
          "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]), "r"(metadata));
}

// 2:4 sparse D = A * B + C, s8 inputs, s32 accumulate (m16n8k64): A compressed to 16x32 s8 of
// a logical 16x64 (fragment as the dense m16n8k32 s8 A), B 64x8 in 4 registers (b[j] holds
// k = 16 j + 4 tig .. +3 of column groupID), metadata from all four threads of a group.
GIE_DEVICE void gie_mma_sp_m16n8k64_s8_s32(int d[4], const unsigned a[4], const unsigned b[4],
                                           const int c[4], unsigned metadata) {
    asm volatile(
        "mma.sp::ordered_metadata.sync.aligned.m16n8k64.row.col.s32.s8.s8.s32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9,%10,%11}, {%12,%13,%14,%15}, %16, 0x0;\n"
        : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]),
          "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]),
          "r"(c[0]), "r"(c[1]), "r"(c[2]), "r"(c[3]), "r"(metadata));
}

// Four 8x8 b16 matrices from shared memory; lane l gives the address of row l % 8 of
// matrix l / 8, and receives row (l / 4), columns 2 (l % 4) .. +1 of each matrix.
GIE_DEVICE void gie_ldmatrix_x4(unsigned r[4], const void* shared_row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(gie_shared_address(shared_row)));
}

// Two 8x8 b16 matrices (lanes 0..15 give the row addresses), transposed on the way.
GIE_DEVICE void gie_ldmatrix_x2_trans(unsigned r[2], const void* shared_row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(gie_shared_address(shared_row)));
}

// Four 8x8 b16 matrices, transposed on the way (lanes 8 j .. 8 j + 7 give the rows of matrix
// j; r[j] as gie_ldmatrix_x2_trans's): two k16 x n8 B fragments of a row-major [k][n] tile.
GIE_DEVICE void gie_ldmatrix_x4_trans(unsigned r[4], const void* shared_row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(gie_shared_address(shared_row)));
}

// 16-byte asynchronous copy global -> shared (both 16-byte aligned).
GIE_DEVICE void gie_cp_async_16(void* shared_destination, const void* global_source) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n"
                 :: "r"(gie_shared_address(shared_destination)), "l"(global_source));
}

GIE_DEVICE void gie_cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

GIE_DEVICE void gie_cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::); }

// Wait until at most `Pending` of this thread's committed cp.async groups are still in flight
// (the newest ones): the multi-stage pipelines' wait.
template <int Pending>
GIE_DEVICE void gie_cp_async_wait_group() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(Pending));
}

#endif  // GIE_CPU_SHIM
