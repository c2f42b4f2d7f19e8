// Tensor-core fp16 GEMM (fp32 accumulate) through the prelude wrappers: cp.async into shared
// memory, ldmatrix, mma.sync m16n8k16. The first, simplest form: one warp per block, each
// block one 16 x 8 tile of C, K in steps of 16 (no multi-stage pipeline, no register tiling
// yet: correct at any M, N, K, not fast). Same epilogue as gemm_simt.cu; fp16 in and out.
// A [M, K] and B [K, N] row-major (lda, ldb, ldc in elements). Launch: grid
// (ceil(N / 8), ceil(M / 16)), block 32. A 16-byte chunk is copied with cp.async when it is in
// bounds and 16-byte aligned, element by element (zero-filled) otherwise.
#include "gie_prelude.cuh"

#define GIE_MMA_A_STRIDE 24  // halves per A row in shared memory (48 bytes: rows stay 16-aligned)

__device__ void load_chunk(gie_half* shared, const gie_half* global, int valid, bool aligned) {
    if (valid == 8 && aligned) {
        gie_cp_async_16(shared, global);
        return;
    }
    for (int e = 0; e < 8; ++e) shared[e] = e < valid ? global[e] : gie_f2h(0.0f);
}

extern "C" __global__ void __launch_bounds__(32)
gie_gemm_mma_f16(const gie_half* A, const gie_half* B, const gie_half* bias,
                 const gie_half* residual, gie_half* C, int M, int N, int K, int lda, int ldb,
                 int ldc, int activation, float alpha, float beta, int residual_first) {
    __shared__ __align__(16) gie_half a_tile[16 * GIE_MMA_A_STRIDE];
    __shared__ __align__(16) gie_half b_tile[16 * 8];
    const int lane = threadIdx.x;
    const int row0 = blockIdx.y * 16;
    const int col0 = blockIdx.x * 8;
    const bool a_aligned = lda % 8 == 0 && ((unsigned long long)A & 15) == 0;
    const bool b_aligned = ldb % 8 == 0 && ((unsigned long long)B & 15) == 0;
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};

    for (int k0 = 0; k0 < K; k0 += 16) {
        {   // A: 16 rows x 2 chunks of 8 halves, one chunk per lane
            const int r = lane / 2, k = k0 + (lane % 2) * 8;
            const int valid = (row0 + r < M) ? max(0, min(8, K - k)) : 0;
            load_chunk(a_tile + r * GIE_MMA_A_STRIDE + (lane % 2) * 8,
                       A + (long long)(row0 + r) * lda + k, valid, a_aligned);
        }
        if (lane < 16) {  // B: 16 rows (k) x 1 chunk of 8 columns
            const int k = k0 + lane;
            const int valid = (k < K) ? max(0, min(8, N - col0)) : 0;
            load_chunk(b_tile + lane * 8, B + (long long)k * ldb + col0, valid, b_aligned);
        }
        gie_cp_async_commit();
        gie_cp_async_wait_all();
        __syncthreads();
        unsigned a[4], b[2];
        const int matrix = lane / 8, row = lane % 8;
        gie_ldmatrix_x4(a, a_tile + ((matrix % 2) * 8 + row) * GIE_MMA_A_STRIDE + (matrix / 2) * 8);
        gie_ldmatrix_x2_trans(b, b_tile + (lane % 16) * 8);
        gie_mma_m16n8k16_f16_f32(acc, a, b, acc);
        __syncthreads();
    }

    const int group = lane / 4, pair = (lane % 4) * 2;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
        const int r = row0 + group + (e / 2) * 8, c = col0 + pair + e % 2;
        if (r >= M || c >= N) continue;
        float value = acc[e];
        if (bias != nullptr) value += gie_h2f(bias[c]);
        const float extra = residual != nullptr ? gie_h2f(residual[(long long)r * ldc + c]) : 0.0f;
        value = residual_first ? gie_activate(value + extra, activation, alpha, beta)
                               : gie_activate(value, activation, alpha, beta) + extra;
        C[(long long)r * ldc + c] = gie_f2h(value);
    }
}
