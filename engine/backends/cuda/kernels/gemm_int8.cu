// int8 x int8 -> int32 tensor-core GEMM (IMMA, mma.sync m16n8k32 s8) with the int8 layers'
// requantizing epilogue, bit-exact with engine/ops/gie_quant.py:
//   acc[m, n]  = sum_k A[m, k] * B[k, n]                      (exact int32)
//   acc        = saturate_int32(acc + bias[n])                 (bias int32, nullable)
//   real       = float32(acc) * float32(x_scale * w_scale[n])  (float32, no FMA contraction)
//   real       = act(real + residual) or act(real) + residual  (residual float32, nullable)
//   output     = int8 saturate(rintf(real / y_scale)) (gie_gemm_int8_s8), real (_f32) or
//                float16(real) (_f16).
// This is gie::QGemm (kind MatMul: A [..., K] flattened to M rows; kind Gemm with transB via
// B's strides) and, with bias = residual = null, activation none, w_scale_stride 0 and the
// batch strides, gie::QMatMul (attention's int8 Q@K^T and P@V; grid z = batch).
//
// Layouts: A [M, K] row-major (lda bytes per row); B element (k, n) at B[k * b_stride_k +
// n * b_stride_n] (B [K, N] row-major: (N, 1); B^T stored [N, K]: (1, K)); C and residual
// [M, N] row-major (ldc). w_scale[n * w_scale_stride] (1 per channel, 0 per tensor). Batch z
// adds z * batch_a / batch_b / batch_c (elements) to A, B, C and residual.
// Work split: one warp per 16 x 8 tile of C, K in steps of 32, fragments gathered straight from
// global memory (a 32-bit load when 4 bytes along K are in bounds and aligned, bytes
// otherwise; zero outside). Correct at any M, N, K (K <= 131071, qparams.MAX_INT32_DEPTH);
// not fast yet (no shared-memory staging, no register tiling).
// Launch: grid (ceil(N / 8), ceil(M / 16), batch), block 32.
#include "gie_prelude.cuh"

// Four int8 values along one K run (index first .. first + 3 of `limit`, element stride
// `stride`) packed low to high into one fragment register; zero beyond `limit`.
__device__ __forceinline__ unsigned gie_s8x4(const signed char* base, long long stride, int first,
                                             int limit) {
    if (stride == 1 && first + 4 <= limit && (((unsigned long long)(base + first)) & 3) == 0)
        return *reinterpret_cast<const unsigned*>(base + first);
    unsigned word = 0;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
        const int index = first + e;
        const unsigned byte =
            index < limit ? (unsigned)(unsigned char)base[(long long)index * stride] : 0u;
        word |= byte << (8 * e);
    }
    return word;
}

template <typename Out>
__device__ void gemm_int8(const signed char* __restrict__ A, const signed char* __restrict__ B,
                          const int* __restrict__ bias, const float* __restrict__ w_scale,
                          const float* __restrict__ residual, Out* __restrict__ C, int M, int N,
                          int K, int lda, long long b_stride_k, long long b_stride_n, int ldc,
                          long long batch_a, long long batch_b, long long batch_c, float x_scale,
                          int w_scale_stride, float y_scale, int activation, float alpha,
                          float beta, int residual_first) {
    const int lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
    const int row0 = blockIdx.y * 16, col0 = blockIdx.x * 8;
    A += blockIdx.z * batch_a;
    B += blockIdx.z * batch_b;
    C += blockIdx.z * batch_c;
    if (residual != nullptr) residual += blockIdx.z * batch_c;

    const int row_lo = row0 + g, row_hi = row0 + g + 8, col = col0 + g;
    const signed char* a_lo = A + (long long)min(row_lo, M - 1) * lda;
    const signed char* a_hi = A + (long long)min(row_hi, M - 1) * lda;
    const signed char* b_col = B + (long long)min(col, N - 1) * b_stride_n;
    const int k_lo = row_lo < M ? K : 0, k_hi = row_hi < M ? K : 0, k_b = col < N ? K : 0;
    int acc[4] = {0, 0, 0, 0};
    for (int k0 = 0; k0 < K; k0 += 32) {
        unsigned a[4], b[2];
        a[0] = gie_s8x4(a_lo, 1, k0 + 4 * t, k_lo);
        a[1] = gie_s8x4(a_hi, 1, k0 + 4 * t, k_hi);
        a[2] = gie_s8x4(a_lo, 1, k0 + 16 + 4 * t, k_lo);
        a[3] = gie_s8x4(a_hi, 1, k0 + 16 + 4 * t, k_hi);
        b[0] = gie_s8x4(b_col, b_stride_k, k0 + 4 * t, k_b);
        b[1] = gie_s8x4(b_col, b_stride_k, k0 + 16 + 4 * t, k_b);
        gie_mma_m16n8k32_s8_s32(acc, a, b, acc);
    }

#pragma unroll
    for (int e = 0; e < 4; ++e) {
        const int r = row0 + g + (e >> 1) * 8, c = col0 + 2 * t + (e & 1);
        if (r >= M || c >= N) continue;
        const int total = bias != nullptr ? gie_add_sat_s32(acc[e], bias[c]) : acc[e];
        float real = gie_dequant_acc(total, x_scale, w_scale[c * w_scale_stride]);
        const long long at = (long long)r * ldc + c;
        if (residual == nullptr) {
            real = gie_activate(real, activation, alpha, beta);
        } else {
            real = residual_first ? gie_activate(real + residual[at], activation, alpha, beta)
                                  : gie_activate(real, activation, alpha, beta) + residual[at];
        }
        gie_store_q(C + at, real, y_scale);
    }
}

extern "C" __global__ void __launch_bounds__(32)
gie_gemm_int8_s8(const signed char* A, const signed char* B, const int* bias, const float* w_scale,
                 const float* residual, signed char* C, int M, int N, int K, int lda,
                 long long b_stride_k, long long b_stride_n, int ldc, long long batch_a,
                 long long batch_b, long long batch_c, float x_scale, int w_scale_stride,
                 float y_scale, int activation, float alpha, float beta, int residual_first) {
    gemm_int8(A, B, bias, w_scale, residual, C, M, N, K, lda, b_stride_k, b_stride_n, ldc, batch_a,
              batch_b, batch_c, x_scale, w_scale_stride, y_scale, activation, alpha, beta,
              residual_first);
}

extern "C" __global__ void __launch_bounds__(32)
gie_gemm_int8_f32(const signed char* A, const signed char* B, const int* bias, const float* w_scale,
                  const float* residual, float* C, int M, int N, int K, int lda,
                  long long b_stride_k, long long b_stride_n, int ldc, long long batch_a,
                  long long batch_b, long long batch_c, float x_scale, int w_scale_stride,
                  float y_scale, int activation, float alpha, float beta, int residual_first) {
    gemm_int8(A, B, bias, w_scale, residual, C, M, N, K, lda, b_stride_k, b_stride_n, ldc, batch_a,
              batch_b, batch_c, x_scale, w_scale_stride, y_scale, activation, alpha, beta,
              residual_first);
}

extern "C" __global__ void __launch_bounds__(32)
gie_gemm_int8_f16(const signed char* A, const signed char* B, const int* bias, const float* w_scale,
                  const float* residual, gie_half* C, int M, int N, int K, int lda,
                  long long b_stride_k, long long b_stride_n, int ldc, long long batch_a,
                  long long batch_b, long long batch_c, float x_scale, int w_scale_stride,
                  float y_scale, int activation, float alpha, float beta, int residual_first) {
    gemm_int8(A, B, bias, w_scale, residual, C, M, N, K, lda, b_stride_k, b_stride_n, ldc, batch_a,
              batch_b, batch_c, x_scale, w_scale_stride, y_scale, activation, alpha, beta,
              residual_first);
}
