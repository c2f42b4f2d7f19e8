// Strided batched GEMM for attention (Q@K^T and P@V): for every batch z (grid z),
//   C[z][M, N] = scale * A[z][M, K] @ op(B[z])
// A row-major (lda elements per row); B element (k, n) at B[k * b_stride_k + n * b_stride_n]
// (B [K, N] row-major: (N, 1); K^T from K stored [N, K]: (1, K)); C row-major (ldc). Batch z
// adds z * batch_a / batch_b / batch_c elements. The int8 batched variant (gie::QMatMul) is
// gemm_int8.cu with its batch strides.
//
// gie_gemm_batched_f32: SIMT, fp32; a block of 256 threads computes a 32 x 32 tile of C in
//   steps of 16 along K (thread (ty, tx) owns rows ty + 16 i, columns tx + 16 j, i, j < 2).
//   Launch: grid (ceil(N / 32), ceil(M / 32), batch), block 256.
// gie_gemm_batched_mma_f16: fp16 in and out, fp32 accumulation through mma.sync m16n8k16; one
//   warp per 16 x 8 tile, fragments gathered from global memory with bounds checks (zero
//   outside), so any strides and shapes work; scale applied to the fp32 sum, rounded once.
//   Launch: grid (ceil(N / 8), ceil(M / 16), batch), block 32. Not fast yet.
#include "gie_prelude.cuh"

#define GIE_BATCHED_TILE 32
#define GIE_BATCHED_BK 16

extern "C" __global__ void __launch_bounds__(256)
gie_gemm_batched_f32(const float* A, const float* B, float* C, int M, int N, int K, int lda,
                     long long b_stride_k, long long b_stride_n, int ldc, long long batch_a,
                     long long batch_b, long long batch_c, float scale) {
    __shared__ float a_tile[GIE_BATCHED_BK][GIE_BATCHED_TILE];
    __shared__ float b_tile[GIE_BATCHED_BK][GIE_BATCHED_TILE];
    const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
    const int row0 = blockIdx.y * GIE_BATCHED_TILE, col0 = blockIdx.x * GIE_BATCHED_TILE;
    A += blockIdx.z * batch_a;
    B += blockIdx.z * batch_b;
    C += blockIdx.z * batch_c;
    float acc[2][2] = {{0.0f, 0.0f}, {0.0f, 0.0f}};
    for (int k0 = 0; k0 < K; k0 += GIE_BATCHED_BK) {
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const int e = tid + 256 * i;
            {   // A: 32 rows x 16 k
                const int r = e / GIE_BATCHED_BK, k = e % GIE_BATCHED_BK;
                const int gr = row0 + r, gk = k0 + k;
                a_tile[k][r] = (gr < M && gk < K) ? A[(long long)gr * lda + gk] : 0.0f;
            }
            {   // B: 16 k x 32 columns
                const int k = e / GIE_BATCHED_TILE, c = e % GIE_BATCHED_TILE;
                const int gk = k0 + k, gc = col0 + c;
                b_tile[k][c] = (gk < K && gc < N)
                                   ? B[(long long)gk * b_stride_k + (long long)gc * b_stride_n]
                                   : 0.0f;
            }
        }
        __syncthreads();
#pragma unroll
        for (int k = 0; k < GIE_BATCHED_BK; ++k) {
            const float a0 = a_tile[k][ty], a1 = a_tile[k][ty + 16];
            const float b0 = b_tile[k][tx], b1 = b_tile[k][tx + 16];
            acc[0][0] = fmaf(a0, b0, acc[0][0]);
            acc[0][1] = fmaf(a0, b1, acc[0][1]);
            acc[1][0] = fmaf(a1, b0, acc[1][0]);
            acc[1][1] = fmaf(a1, b1, acc[1][1]);
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            const int r = row0 + ty + 16 * i, c = col0 + tx + 16 * j;
            if (r < M && c < N) C[(long long)r * ldc + c] = scale * acc[i][j];
        }
}

// Two fp16 values along K (first, first + 1 of `limit`, element stride `stride`) as one
// fragment register; zero beyond `limit`.
__device__ __forceinline__ unsigned gie_batched_h2(const gie_half* base, long long stride,
                                                   int first, int limit) {
    const gie_half zero = gie_f2h(0.0f);
    return gie_pack_half2(first < limit ? base[(long long)first * stride] : zero,
                          first + 1 < limit ? base[(long long)(first + 1) * stride] : zero);
}

extern "C" __global__ void __launch_bounds__(32)
gie_gemm_batched_mma_f16(const gie_half* A, const gie_half* B, gie_half* C, int M, int N, int K,
                         int lda, long long b_stride_k, long long b_stride_n, int ldc,
                         long long batch_a, long long batch_b, long long batch_c, float scale) {
    const int lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
    const int row0 = blockIdx.y * 16, col0 = blockIdx.x * 8;
    A += blockIdx.z * batch_a;
    B += blockIdx.z * batch_b;
    C += blockIdx.z * batch_c;
    const int row_lo = row0 + g, row_hi = row0 + g + 8, col = col0 + g;
    const gie_half* a_lo = A + (long long)min(row_lo, M - 1) * lda;
    const gie_half* a_hi = A + (long long)min(row_hi, M - 1) * lda;
    const gie_half* b_col = B + (long long)min(col, N - 1) * b_stride_n;
    const int k_lo = row_lo < M ? K : 0, k_hi = row_hi < M ? K : 0, k_b = col < N ? K : 0;
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int k0 = 0; k0 < K; k0 += 16) {
        unsigned a[4], b[2];
        a[0] = gie_batched_h2(a_lo, 1, k0 + 2 * t, k_lo);
        a[1] = gie_batched_h2(a_hi, 1, k0 + 2 * t, k_hi);
        a[2] = gie_batched_h2(a_lo, 1, k0 + 8 + 2 * t, k_lo);
        a[3] = gie_batched_h2(a_hi, 1, k0 + 8 + 2 * t, k_hi);
        b[0] = gie_batched_h2(b_col, b_stride_k, k0 + 2 * t, k_b);
        b[1] = gie_batched_h2(b_col, b_stride_k, k0 + 8 + 2 * t, k_b);
        gie_mma_m16n8k16_f16_f32(acc, a, b, acc);
    }
#pragma unroll
    for (int e = 0; e < 4; ++e) {
        const int r = row0 + g + (e >> 1) * 8, c = col0 + 2 * t + (e & 1);
        if (r < M && c < N) C[(long long)r * ldc + c] = gie_f2h(scale * acc[e]);
    }
}
