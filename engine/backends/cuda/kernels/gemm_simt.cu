// SIMT GEMM with a fused epilogue, fp32 accumulation:
//   C[M, N] = epilogue(A[M, K] @ B[K, N] + bias[N]),  epilogue = act(y + residual) when
//   residual_first, else act(y) + residual.   bias and residual (row-major, ldc) are nullable.
// A, B and C are row-major with leading dimensions lda, ldb, ldc (elements). Tiles: a block of
// 256 threads computes a GIE_GEMM_BM x GIE_GEMM_BN tile (default 64 x 64) in steps of
// GIE_GEMM_BK (16) along K; thread (ty, tx) owns rows ty + 16 i and columns tx + 16 j.
// Launch: grid (ceil(N / BN), ceil(M / BM)), block 256. Tactics override the tile with -D.
#include "gie_prelude.cuh"

#ifndef GIE_GEMM_BM
#define GIE_GEMM_BM 64
#endif
#ifndef GIE_GEMM_BN
#define GIE_GEMM_BN 64
#endif
#ifndef GIE_GEMM_BK
#define GIE_GEMM_BK 16
#endif
#define GIE_GEMM_THREADS 256
#define GIE_GEMM_TM (GIE_GEMM_BM / 16)
#define GIE_GEMM_TN (GIE_GEMM_BN / 16)

template <typename T>
__device__ void gemm_simt(const T* __restrict__ A, const T* __restrict__ B,
                          const T* __restrict__ bias, const T* __restrict__ residual,
                          T* __restrict__ C, int M, int N, int K, int lda, int ldb, int ldc,
                          int activation, float alpha, float beta, int residual_first) {
    __shared__ float a_tile[GIE_GEMM_BK][GIE_GEMM_BM];
    __shared__ float b_tile[GIE_GEMM_BK][GIE_GEMM_BN];
    const int tid = threadIdx.x;
    const int tx = tid % 16;
    const int ty = tid / 16;
    const int row0 = blockIdx.y * GIE_GEMM_BM;
    const int col0 = blockIdx.x * GIE_GEMM_BN;
    float acc[GIE_GEMM_TM][GIE_GEMM_TN];
#pragma unroll
    for (int i = 0; i < GIE_GEMM_TM; ++i)
#pragma unroll
        for (int j = 0; j < GIE_GEMM_TN; ++j) acc[i][j] = 0.0f;

    for (int k0 = 0; k0 < K; k0 += GIE_GEMM_BK) {
        for (int e = tid; e < GIE_GEMM_BM * GIE_GEMM_BK; e += GIE_GEMM_THREADS) {
            const int r = e / GIE_GEMM_BK, k = e % GIE_GEMM_BK;
            const int gr = row0 + r, gk = k0 + k;
            a_tile[k][r] = (gr < M && gk < K) ? gie_load(A + (long long)gr * lda + gk) : 0.0f;
        }
        for (int e = tid; e < GIE_GEMM_BK * GIE_GEMM_BN; e += GIE_GEMM_THREADS) {
            const int k = e / GIE_GEMM_BN, c = e % GIE_GEMM_BN;
            const int gk = k0 + k, gc = col0 + c;
            b_tile[k][c] = (gk < K && gc < N) ? gie_load(B + (long long)gk * ldb + gc) : 0.0f;
        }
        __syncthreads();
#pragma unroll
        for (int k = 0; k < GIE_GEMM_BK; ++k) {
            float a[GIE_GEMM_TM], b[GIE_GEMM_TN];
#pragma unroll
            for (int i = 0; i < GIE_GEMM_TM; ++i) a[i] = a_tile[k][ty + 16 * i];
#pragma unroll
            for (int j = 0; j < GIE_GEMM_TN; ++j) b[j] = b_tile[k][tx + 16 * j];
#pragma unroll
            for (int i = 0; i < GIE_GEMM_TM; ++i)
#pragma unroll
                for (int j = 0; j < GIE_GEMM_TN; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
        }
        __syncthreads();
    }

#pragma unroll
    for (int i = 0; i < GIE_GEMM_TM; ++i) {
        const int r = row0 + ty + 16 * i;
#pragma unroll
        for (int j = 0; j < GIE_GEMM_TN; ++j) {
            const int c = col0 + tx + 16 * j;
            if (r >= M || c >= N) continue;
            float value = acc[i][j];
            if (bias != nullptr) value += gie_load(bias + c);
            const float extra =
                residual != nullptr ? gie_load(residual + (long long)r * ldc + c) : 0.0f;
            value = residual_first ? gie_activate(value + extra, activation, alpha, beta)
                                   : gie_activate(value, activation, alpha, beta) + extra;
            gie_store(C + (long long)r * ldc + c, value);
        }
    }
}

extern "C" __global__ void __launch_bounds__(GIE_GEMM_THREADS)
gie_gemm_simt_f32(const float* A, const float* B, const float* bias, const float* residual,
                  float* C, int M, int N, int K, int lda, int ldb, int ldc, int activation,
                  float alpha, float beta, int residual_first) {
    gemm_simt(A, B, bias, residual, C, M, N, K, lda, ldb, ldc, activation, alpha, beta,
              residual_first);
}

extern "C" __global__ void __launch_bounds__(GIE_GEMM_THREADS)
gie_gemm_simt_f16(const gie_half* A, const gie_half* B, const gie_half* bias,
                  const gie_half* residual, gie_half* C, int M, int N, int K, int lda, int ldb,
                  int ldc, int activation, float alpha, float beta, int residual_first) {
    gemm_simt(A, B, bias, residual, C, M, N, K, lda, ldb, ldc, activation, alpha, beta,
              residual_first);
}
