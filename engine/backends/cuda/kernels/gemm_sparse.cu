// 2:4 sparse tensor-core GEMM (mma.sp): C[M, N] = epilogue(A[M, K] @ B[K, N]) with A the
// compressed 2:4 weight of engine/sparsity/compress.py (``values [rows_p, K_p/2]`` plus the
// reordered metadata) and B dense. The row m of A is the output channel (a linear layer
// Y = X @ W^T is C = W @ X^T: B = X^T through B's strides, C^T through C's strides).
//
// gie_gemm_sparse_f16: layout sm80_f16, mma.sp m16n8k32 f16 with fp32 accumulation; epilogue
//   as gemm_simt.cu (bias[m], activation, residual before or after it), fp16 out.
// gie_gemm_sparse_s8: layout sm80_s8, mma.sp m16n8k64 s8 with exact int32 accumulation; the
//   int8 layers' epilogue of gemm_int8.cu with the channel on m (bias[m] int32, w_scale[m]),
//   int8 out (y_scale); bit-exact with gie::QGemm on the decompressed weight.
//
// Arguments: values (rows_p = padded rows, row pitch K_p/2 elements), metadata as 32-bit words
// (the uint16 sm80_f16 buffer viewed as uint32: K_p / 32 words of 2 uint16 per row pair),
// M, K the logical shape, N the columns of B; B element (k, n) at B[k * b_stride_k + n *
// b_stride_n]; C and residual element (m, n) at [m * c_stride_m + n * c_stride_n].
// Metadata per lane (derived from compress.reorder_offsets, CUTLASS's ColumnMajorInterleaved<2>):
//   f16, K step s (32 columns), 32-row block b: words s * rows_p + 32 b .. +31; word 4 g + h
//   holds rows g, g + 8 of the block's half h = 0 (rows 0..15) columns 0..15, word 4 g + 1
//   columns 16..31, words 4 g + 2 / + 3 the same for half 1 (rows 16..31). With selector 0
//   lanes 4 g + 0 / + 1 supply it, so a warp on half h loads word 4 g + 2 h + (tig & 1).
//   s8, K step s (64 columns), 16-row block b: lane l loads word s * 2 rows_p + 32 b + l.
// One warp per 16 x 8 tile of C; fragments gathered from global memory (values and metadata
// are padded to the tiles; B is read with bounds checks, zero beyond K and N). Not fast yet.
// Launch: grid (ceil(N / 8), ceil(M / 16)), block 32.
#include "gie_prelude.cuh"

__device__ __forceinline__ gie_half gie_sparse_b_half(const gie_half* column, long long stride,
                                                      int k, int limit) {
    return k < limit ? column[(long long)k * stride] : gie_f2h(0.0f);
}

__device__ __forceinline__ unsigned gie_sparse_b_s8x4(const signed char* column, long long stride,
                                                      int first, int limit) {
    unsigned word = 0;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
        const int k = first + e;
        const unsigned byte =
            k < limit ? (unsigned)(unsigned char)column[(long long)k * stride] : 0u;
        word |= byte << (8 * e);
    }
    return word;
}

extern "C" __global__ void __launch_bounds__(32)
gie_gemm_sparse_f16(const gie_half* values, const unsigned* metadata, const gie_half* B,
                    const gie_half* bias, const gie_half* residual, gie_half* C, int M, int N,
                    int K, int rows_p, long long b_stride_k, long long b_stride_n,
                    long long c_stride_m, long long c_stride_n, int activation, float alpha,
                    float beta, int residual_first) {
    const int lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
    const int row0 = blockIdx.y * 16, col0 = blockIdx.x * 8;
    const int k_padded = (K + 31) / 32 * 32;
    // values rows as 32-bit words (2 halves); the pitch K_p/2 halves is a multiple of 16.
    const unsigned* words = reinterpret_cast<const unsigned*>(values);
    const long long pitch = k_padded / 4;
    const unsigned* a_lo = words + (long long)(row0 + g) * pitch;
    const unsigned* a_hi = words + (long long)(row0 + g + 8) * pitch;
    const int col = col0 + g;
    const gie_half* b_col = B + (long long)min(col, N - 1) * b_stride_n;
    const int k_b = col < N ? K : 0;
    const unsigned* meta = metadata + (row0 / 32) * 32 + 4 * g + ((row0 / 16) & 1) * 2 + (t & 1);
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int k0 = 0, step = 0; k0 < K; k0 += 32, ++step) {
        const int w = k0 / 4 + t;  // compressed column k0/2 + 2t, as a word index
        unsigned a[4], b[4];
        a[0] = a_lo[w];
        a[1] = a_hi[w];
        a[2] = a_lo[w + 4];
        a[3] = a_hi[w + 4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int k = k0 + 8 * j + 2 * t;
            b[j] = gie_pack_half2(gie_sparse_b_half(b_col, b_stride_k, k, k_b),
                                  gie_sparse_b_half(b_col, b_stride_k, k + 1, k_b));
        }
        gie_mma_sp_m16n8k32_f16_f32(acc, a, b, acc, meta[(long long)step * rows_p]);
    }

#pragma unroll
    for (int e = 0; e < 4; ++e) {
        const int r = row0 + g + (e >> 1) * 8, c = col0 + 2 * t + (e & 1);
        if (r >= M || c >= N) continue;
        const long long at = (long long)r * c_stride_m + (long long)c * c_stride_n;
        float value = acc[e];
        if (bias != nullptr) value += gie_h2f(bias[r]);
        const float extra = residual != nullptr ? gie_h2f(residual[at]) : 0.0f;
        value = residual_first ? gie_activate(value + extra, activation, alpha, beta)
                               : gie_activate(value, activation, alpha, beta) + extra;
        C[at] = gie_f2h(value);
    }
}

extern "C" __global__ void __launch_bounds__(32)
gie_gemm_sparse_s8(const signed char* values, const unsigned* metadata, const signed char* B,
                   const int* bias, const float* w_scale, const float* residual, signed char* C,
                   int M, int N, int K, int rows_p, long long b_stride_k, long long b_stride_n,
                   long long c_stride_m, long long c_stride_n, float x_scale,
                   int w_scale_stride, float y_scale, int activation, float alpha, float beta,
                   int residual_first) {
    const int lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
    const int row0 = blockIdx.y * 16, col0 = blockIdx.x * 8;
    const int k_padded = (K + 63) / 64 * 64;
    // values rows as 32-bit words (4 int8); the pitch K_p/2 bytes is a multiple of 32.
    const unsigned* words = reinterpret_cast<const unsigned*>(values);
    const long long pitch = k_padded / 8;
    const unsigned* a_lo = words + (long long)(row0 + g) * pitch;
    const unsigned* a_hi = words + (long long)(row0 + g + 8) * pitch;
    const int col = col0 + g;
    const signed char* b_col = B + (long long)min(col, N - 1) * b_stride_n;
    const int k_b = col < N ? K : 0;
    const unsigned* meta = metadata + (row0 / 16) * 32 + lane;
    int acc[4] = {0, 0, 0, 0};
    for (int k0 = 0, step = 0; k0 < K; k0 += 64, ++step) {
        const int w = k0 / 8 + t;  // compressed column k0/2 + 4t, as a word index
        unsigned a[4], b[4];
        a[0] = a_lo[w];
        a[1] = a_hi[w];
        a[2] = a_lo[w + 4];
        a[3] = a_hi[w + 4];
#pragma unroll
        for (int j = 0; j < 4; ++j)
            b[j] = gie_sparse_b_s8x4(b_col, b_stride_k, k0 + 16 * j + 4 * t, k_b);
        gie_mma_sp_m16n8k64_s8_s32(acc, a, b, acc, meta[(long long)step * 2 * rows_p]);
    }

#pragma unroll
    for (int e = 0; e < 4; ++e) {
        const int r = row0 + g + (e >> 1) * 8, c = col0 + 2 * t + (e & 1);
        if (r >= M || c >= N) continue;
        const long long at = (long long)r * c_stride_m + (long long)c * c_stride_n;
        const int total = bias != nullptr ? gie_add_sat_s32(acc[e], bias[r]) : acc[e];
        float real = gie_dequant_acc(total, x_scale, w_scale[r * w_scale_stride]);
        if (residual == nullptr) {
            real = gie_activate(real, activation, alpha, beta);
        } else {
            real = residual_first ? gie_activate(real + residual[at], activation, alpha, beta)
                                  : gie_activate(real, activation, alpha, beta) + residual[at];
        }
        C[at] = gie_quant_s8(real, y_scale);
    }
}
