// Implicit-GEMM 2-D convolution, NHWC, with a fused epilogue (gie::ConvAct), fp32 accumulation.
//
// Layouts (all dense, row-major):
//   x        [N, H, W, C]            input, NHWC
//   w        [M, KH, KW, C / groups] weight, KRSC (output channel, filter row, filter col, channel)
//   bias     [M]                     nullable
//   residual [N, OH, OW, M]          nullable, the output's layout
//   y        [N, OH, OW, M]          output, NHWC
// Geometry: OH = (H + pad_top + pad_bottom - ((KH - 1) * dil_h + 1)) / stride_h + 1 (the host
// passes OH, OW, so ceil-mode or SAME pads resolved by the builder need nothing here); only the
// begin pads (pad_top, pad_left) enter the index math. Input taps outside [0, H) x [0, W) read 0.
// Epilogue: y = act(conv + bias + residual) when residual_first, else act(conv + bias) + residual
// (the ConvAct reference, engine/ops/gie_fused.py); activation codes are the prelude's GIE_ACT_*,
// alpha/beta their parameters (engine/backends/cuda/activations.py: activation_arguments).
//
// The GEMM view, per group g (Cg = C / groups input channels, Mg = M / groups output channels):
//   rows    p = (n, oh, ow)   P = N * OH * OW     (the output pixels; NHWC makes row p of the
//                                                   output the M contiguous values at y + p * M)
//   columns m                 Mg                  (output channels g * Mg + m)
//   depth   k = (r, s, c)     K = KH * KW * Cg    (the KRSC order: row k of the weight of channel
//                                                   m is contiguous)
//   A[p][k] = x[n, oh * stride_h - pad_top + r * dil_h, ow * stride_w - pad_left + s * dil_w,
//               g * Cg + c]      (gathered on the fly: "implicit", no im2col buffer)
//   B[k][m] = w[g * Mg + m][k]
// A block of GIE_CONV_THREADS (256) threads computes a GIE_CONV_BM x GIE_CONV_BN tile of (p, m)
// (default 64 x 64) in steps of GIE_CONV_BK (16) along k, fp32 in shared memory (fp16 storage is
// widened on load), thread (ty, tx) owns rows ty + 16 i and columns tx + 16 j, like gemm_simt.cu.
// Every thread loads the same k column (tid % BK) of the A and B tiles at every step, so the
// (r, s, c) decode of k costs three divisions per thread per step, not per element; the loads of
// one warp read consecutive channels of one pixel (coalesced along C). Per-row (n, oh, ow) is
// decoded once per block into shared memory.
// Launch: grid (ceil(P / BM), ceil(Mg / BN), groups), block GIE_CONV_THREADS. Tactics override
// the tile with -D GIE_CONV_BM / GIE_CONV_BN / GIE_CONV_BK (BM and BN multiples of 16, BK a
// divisor of 256).
//
// 1x1 stride-1 unpadded group-1 convolutions are plain GEMMs in NHWC: y[P, M] = x[P, C] @ W^T.
// The builder maps them to gie_gemm_simt_f32/_f16 (gemm_simt.cu, same epilogue: bias, activation,
// residual as gie::GemmAct) with A = x viewed as [N * H * W, C] (lda = C), B = the weight
// transposed once at build time from [M, C] to [C, M] (ldb = M), C = y viewed as [P, M]
// (ldc = M), the residual likewise; this kernel still computes them correctly.
//
// Limits: N * H * W and N * OH * OW below 2^31 pixels (element offsets are 64-bit).
// Not fast yet: SIMT only (no tensor cores), no vectorized or asynchronous loads, no
// double buffering, int32 index math with runtime division. int8 (IMMA) is a future kernel.
#include "gie_conv.cuh"

#ifndef GIE_CONV_BM
#define GIE_CONV_BM 64
#endif
#ifndef GIE_CONV_BN
#define GIE_CONV_BN 64
#endif
#ifndef GIE_CONV_BK
#define GIE_CONV_BK 16
#endif
#define GIE_CONV_THREADS 256
#define GIE_CONV_TM (GIE_CONV_BM / 16)
#define GIE_CONV_TN (GIE_CONV_BN / 16)
// Rows of a tile one pass of the block loads (every thread loads k column tid % BK).
#define GIE_CONV_ROWS_PER_PASS (GIE_CONV_THREADS / GIE_CONV_BK)

static_assert(GIE_CONV_BM % 16 == 0 && GIE_CONV_BN % 16 == 0, "tiles are multiples of 16");
static_assert(GIE_CONV_THREADS % GIE_CONV_BK == 0, "BK divides the block");

// A row that is past the last output pixel: every tap of it lands outside the input.

template <typename T>
__device__ void conv_implicit_gemm(const T* __restrict__ x, const T* __restrict__ w,
                                   const T* __restrict__ bias, const T* __restrict__ residual,
                                   T* __restrict__ y, int N, int H, int W, int C, int M, int OH,
                                   int OW, int KH, int KW, int stride_h, int stride_w,
                                   int pad_top, int pad_left, int dil_h, int dil_w, int groups,
                                   int activation, float alpha, float beta, int residual_first) {
    // +1 column: the loads write a column (fixed k, consecutive rows) per warp.
    __shared__ float a_tile[GIE_CONV_BK][GIE_CONV_BM + 1];
    __shared__ float b_tile[GIE_CONV_BK][GIE_CONV_BN + 1];
    __shared__ int row_pixel[GIE_CONV_BM];       // n * H * W: pixel (n, 0, 0) of x
    __shared__ int row_ih[GIE_CONV_BM];          // oh * stride_h - pad_top
    __shared__ int row_iw[GIE_CONV_BM];          // ow * stride_w - pad_left

    const int tid = threadIdx.x;
    const int tx = tid % 16;
    const int ty = tid / 16;
    const int Cg = C / groups;
    const int Mg = M / groups;
    const int K = KH * KW * Cg;
    const int P = N * OH * OW;
    const int g = blockIdx.z;
    const int row0 = blockIdx.x * GIE_CONV_BM;
    const int col0 = blockIdx.y * GIE_CONV_BN;

    gie_conv_decode_rows(row_pixel, row_ih, row_iw, GIE_CONV_BM, GIE_CONV_THREADS, row0, P,
                         OH, OW, H, W, stride_h, stride_w, pad_top, pad_left);

    float acc[GIE_CONV_TM][GIE_CONV_TN];
#pragma unroll
    for (int i = 0; i < GIE_CONV_TM; ++i)
#pragma unroll
        for (int j = 0; j < GIE_CONV_TN; ++j) acc[i][j] = 0.0f;

    const int load_k = tid % GIE_CONV_BK;
    const int load_row = tid / GIE_CONV_BK;
    const T* w_group = w + (long long)g * Mg * K;
    __syncthreads();

    for (int k0 = 0; k0 < K; k0 += GIE_CONV_BK) {
        const int gk = k0 + load_k;
        const bool k_ok = gk < K;
        const int c = g * Cg + gk % Cg;  // input channel
        const int rs = gk / Cg;
        const int dy = (rs / KW) * dil_h;
        const int dx = (rs % KW) * dil_w;
        // Not unrolled: unrolled loads keep every row's address live and spill at 64 registers.
#pragma unroll 1
        for (int r = load_row; r < GIE_CONV_BM; r += GIE_CONV_ROWS_PER_PASS) {
            const int ih = row_ih[r] + dy;
            const int iw = row_iw[r] + dx;
            const bool ok = k_ok && ih >= 0 && ih < H && iw >= 0 && iw < W;
            a_tile[load_k][r] =
                ok ? gie_load(x + (long long)(row_pixel[r] + ih * W + iw) * C + c) : 0.0f;
        }
#pragma unroll 1
        for (int m = load_row; m < GIE_CONV_BN; m += GIE_CONV_ROWS_PER_PASS) {
            const int gm = col0 + m;
            b_tile[load_k][m] =
                (k_ok && gm < Mg) ? gie_load(w_group + (long long)gm * K + gk) : 0.0f;
        }
        __syncthreads();
#pragma unroll
        for (int k = 0; k < GIE_CONV_BK; ++k) {
            float a[GIE_CONV_TM], b[GIE_CONV_TN];
#pragma unroll
            for (int i = 0; i < GIE_CONV_TM; ++i) a[i] = a_tile[k][ty + 16 * i];
#pragma unroll
            for (int j = 0; j < GIE_CONV_TN; ++j) b[j] = b_tile[k][tx + 16 * j];
#pragma unroll
            for (int i = 0; i < GIE_CONV_TM; ++i)
#pragma unroll
                for (int j = 0; j < GIE_CONV_TN; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
        }
        __syncthreads();
    }

#pragma unroll
    for (int i = 0; i < GIE_CONV_TM; ++i) {
        const int p = row0 + ty + 16 * i;
#pragma unroll
        for (int j = 0; j < GIE_CONV_TN; ++j) {
            const int m = col0 + tx + 16 * j;
            if (p >= P || m >= Mg) continue;
            const int channel = g * Mg + m;
            const long long at = (long long)p * M + channel;
            float value = acc[i][j];
            if (bias != nullptr) value += gie_load(bias + channel);
            const float extra = residual != nullptr ? gie_load(residual + at) : 0.0f;
            value = residual_first ? gie_activate(value + extra, activation, alpha, beta)
                                   : gie_activate(value, activation, alpha, beta) + extra;
            gie_store(y + at, value);
        }
    }
}

extern "C" __global__ void __launch_bounds__(GIE_CONV_THREADS)
gie_conv_implicit_gemm_f32(const float* x, const float* w, const float* bias,
                           const float* residual, float* y, int N, int H, int W, int C, int M,
                           int OH, int OW, int KH, int KW, int stride_h, int stride_w,
                           int pad_top, int pad_left, int dil_h, int dil_w, int groups,
                           int activation, float alpha, float beta, int residual_first) {
    conv_implicit_gemm(x, w, bias, residual, y, N, H, W, C, M, OH, OW, KH, KW, stride_h,
                       stride_w, pad_top, pad_left, dil_h, dil_w, groups, activation, alpha, beta,
                       residual_first);
}

extern "C" __global__ void __launch_bounds__(GIE_CONV_THREADS)
gie_conv_implicit_gemm_f16(const gie_half* x, const gie_half* w, const gie_half* bias,
                           const gie_half* residual, gie_half* y, int N, int H, int W, int C,
                           int M, int OH, int OW, int KH, int KW, int stride_h, int stride_w,
                           int pad_top, int pad_left, int dil_h, int dil_w, int groups,
                           int activation, float alpha, float beta, int residual_first) {
    conv_implicit_gemm(x, w, bias, residual, y, N, H, W, C, M, OH, OW, KH, KW, stride_h,
                       stride_w, pad_top, pad_left, dil_h, dil_w, groups, activation, alpha, beta,
                       residual_first);
}
