// Tensor-core implicit-GEMM 2-D convolution, NHWC fp16, fp32 accumulation, with the fused
// gie::ConvAct epilogue (bias, activation, residual before or after the activation).
//
// Layouts (dense, row-major), as conv_implicit_gemm.cu:
//   x        [N, H, W, C]            input, NHWC, fp16
//   w        [M, KH, KW, C / groups] weight, KRSC, fp16
//   bias     [M]                     nullable
//   residual [N, OH, OW, M]          nullable, the output's layout
//   y        [N, OH, OW, M]          output, NHWC
// Geometry: the host passes OH, OW; only the begin pads (pad_top, pad_left) enter the index
// math; input taps outside [0, H) x [0, W) read 0. Epilogue: y = act(conv + bias + residual)
// when residual_first, else act(conv + bias) + residual; activation codes GIE_ACT_* with their
// alpha / beta (engine/backends/cuda/activations.py: activation_arguments).
//
// GEMM view per group g (Cg = C / groups, Mg = M / groups): rows p = (n, oh, ow) (P = N*OH*OW),
// columns m < Mg, depth k = (r, s, c) < K = KH * KW * Cg (KRSC order);
// A[p][k] = x[n, oh*stride_h - pad_top + r*dil_h, ow*stride_w - pad_left + s*dil_w, g*Cg + c],
// B[k][m] = w[g*Mg + m][k].
//
// Constraint: Cg % 8 == 0 (so C % 8 == 0 and K % 8 == 0): every 8-channel run of k is one
// 16-byte vector inside one filter tap, copied global -> shared with cp.async (or zero-filled in
// shared memory when the tap is in the padding or past K). M, Mg and the pixel count are free
// (bounds-checked); the lowering asks Mg % 8 == 0 when groups > 1 (full 8-wide mma columns per
// group). Pointers 16-byte aligned (x, w).
//
// Work split: a block of GIE_CONVMMA_WARPS_M x GIE_CONVMMA_WARPS_N warps computes a
// GIE_CONVMMA_BM (pixels) x GIE_CONVMMA_BN (output channels) tile of one group, in steps of
// GIE_CONVMMA_BK along k, double-buffered in shared memory (the copies of step k + 1 are in
// flight while step k runs on the tensor cores; one __syncthreads per step). Each warp owns a
// (BM / WARPS_M) x (BN / WARPS_N) sub-tile: ldmatrix.x4 fragments of A (16 x 16) and B (two
// n8 tiles, the weight rows being k-contiguous "col" operands), mma.sync m16n8k16. Shared rows
// are padded by 8 halves (16 bytes) so ldmatrix rows fall in different banks.
// Each thread copies the same 8-channel column of k for all its rows, so the (r, s, c) decode is
// once per thread per step (incremental, no division in the loop); per-row (n, oh, ow) is
// decoded once per block.
// Defaults BM 64, BN 64, BK 32, 2 x 2 warps (128 threads). Tactics override with
// -D GIE_CONVMMA_BM / BN / BK / WARPS_M / WARPS_N: BK a multiple of 16, BM / WARPS_M and
// BN / WARPS_N multiples of 16.
// Launch: grid (ceil(P / BM), ceil(Mg / BN), groups), block 32 * WARPS_M * WARPS_N.
// Limits: N * H * W and N * OH * OW below 2^31 pixels (element offsets are 64-bit).
#include "gie_conv.cuh"

#ifndef GIE_CONVMMA_BM
#define GIE_CONVMMA_BM 64
#endif
#ifndef GIE_CONVMMA_BN
#define GIE_CONVMMA_BN 64
#endif
#ifndef GIE_CONVMMA_BK
#define GIE_CONVMMA_BK 32
#endif
#ifndef GIE_CONVMMA_WARPS_M
#define GIE_CONVMMA_WARPS_M 2
#endif
#ifndef GIE_CONVMMA_WARPS_N
#define GIE_CONVMMA_WARPS_N 2
#endif
#define GIE_CONVMMA_THREADS (32 * GIE_CONVMMA_WARPS_M * GIE_CONVMMA_WARPS_N)
#define GIE_CONVMMA_WM (GIE_CONVMMA_BM / GIE_CONVMMA_WARPS_M)  // rows of a warp's sub-tile
#define GIE_CONVMMA_WN (GIE_CONVMMA_BN / GIE_CONVMMA_WARPS_N)  // columns of a warp's sub-tile
#define GIE_CONVMMA_MT (GIE_CONVMMA_WM / 16)                   // m16 tiles per warp
#define GIE_CONVMMA_NT (GIE_CONVMMA_WN / 8)                    // n8 tiles per warp
#define GIE_CONVMMA_STRIDE (GIE_CONVMMA_BK + 8)                // halves per shared row
#define GIE_CONVMMA_CHUNKS (GIE_CONVMMA_BK / 8)                // 16-byte vectors per row
#define GIE_CONVMMA_ROWS_PER_PASS (GIE_CONVMMA_THREADS / GIE_CONVMMA_CHUNKS)
#define GIE_CONVMMA_A_PASSES \
    ((GIE_CONVMMA_BM + GIE_CONVMMA_ROWS_PER_PASS - 1) / GIE_CONVMMA_ROWS_PER_PASS)
#define GIE_CONVMMA_B_PASSES \
    ((GIE_CONVMMA_BN + GIE_CONVMMA_ROWS_PER_PASS - 1) / GIE_CONVMMA_ROWS_PER_PASS)

static_assert(GIE_CONVMMA_BK % 16 == 0, "BK is a multiple of the mma depth 16");
static_assert(GIE_CONVMMA_WM % 16 == 0 && GIE_CONVMMA_WN % 16 == 0,
              "warp sub-tiles are multiples of 16 x 16");
static_assert(GIE_CONVMMA_THREADS % GIE_CONVMMA_CHUNKS == 0, "BK / 8 divides the block");

// A row past the last output pixel: every tap of it lands outside the input.
#define GIE_CONVMMA_NO_ROW GIE_CONV_NO_ROW

extern "C" __global__ void __launch_bounds__(GIE_CONVMMA_THREADS)
gie_conv_mma_f16(const gie_half* __restrict__ x, const gie_half* __restrict__ w,
                 const gie_half* __restrict__ bias, const gie_half* __restrict__ residual,
                 gie_half* __restrict__ y, int N, int H, int W, int C, int M, int OH, int OW,
                 int KH, int KW, int stride_h, int stride_w, int pad_top, int pad_left, int dil_h,
                 int dil_w, int groups, int activation, float alpha, float beta,
                 int residual_first) {
    __shared__ __align__(16) gie_half a_tile[2][GIE_CONVMMA_BM * GIE_CONVMMA_STRIDE];
    __shared__ __align__(16) gie_half b_tile[2][GIE_CONVMMA_BN * GIE_CONVMMA_STRIDE];
    __shared__ int row_pixel[GIE_CONVMMA_BM];  // n * H * W: pixel (n, 0, 0) of x
    __shared__ int row_ih[GIE_CONVMMA_BM];     // oh * stride_h - pad_top
    __shared__ int row_iw[GIE_CONVMMA_BM];     // ow * stride_w - pad_left

    const int tid = threadIdx.x;
    const int lane = tid & 31, warp = tid >> 5;
    const int warp_m = warp % GIE_CONVMMA_WARPS_M, warp_n = warp / GIE_CONVMMA_WARPS_M;
    const int Cg = C / groups;
    const int Mg = M / groups;
    const int K = KH * KW * Cg;
    const int P = N * OH * OW;
    const int g = blockIdx.z;
    const int row0 = blockIdx.x * GIE_CONVMMA_BM;
    const int col0 = blockIdx.y * GIE_CONVMMA_BN;

    gie_conv_decode_rows(row_pixel, row_ih, row_iw, GIE_CONVMMA_BM, GIE_CONVMMA_THREADS, row0, P,
                         OH, OW, H, W, stride_h, stride_w, pad_top, pad_left);

    // This thread copies the 8-channel vector `chunk` of k for rows load_row + i * ROWS_PER_PASS
    // of both tiles. Its k position (tap r, s and channel c of the vector) advances by BK a step.
    const int chunk = tid % GIE_CONVMMA_CHUNKS;
    const int load_row = tid / GIE_CONVMMA_CHUNKS;
    int tap_c = chunk * 8, tap_r = 0, tap_s = 0;
    while (tap_c >= Cg) {  // BK may exceed Cg: normalize the first position
        tap_c -= Cg;
        if (++tap_s == KW) tap_s = 0, ++tap_r;
    }
    int k_next = chunk * 8;  // k of this thread's vector in the step being loaded
    const gie_half* x_group = x + g * Cg;
    const gie_half* w_group = w + (long long)g * Mg * K;
    const gie_half zero = gie_f2h(0.0f);

    auto load_step = [&](int stage) {
        const bool k_ok = k_next < K;
        const int dy = tap_r * dil_h, dx = tap_s * dil_w;
#pragma unroll
        for (int i = 0; i < GIE_CONVMMA_A_PASSES; ++i) {
            const int r = load_row + i * GIE_CONVMMA_ROWS_PER_PASS;
            if (GIE_CONVMMA_BM % GIE_CONVMMA_ROWS_PER_PASS != 0 && r >= GIE_CONVMMA_BM) break;
            gie_half* dst = &a_tile[stage][r * GIE_CONVMMA_STRIDE + chunk * 8];
            const int ih = row_ih[r] + dy, iw = row_iw[r] + dx;
            if (k_ok && ih >= 0 && ih < H && iw >= 0 && iw < W) {
                gie_cp_async_16(dst, x_group + (long long)(row_pixel[r] + ih * W + iw) * C + tap_c);
            } else {
#pragma unroll
                for (int e = 0; e < 8; ++e) dst[e] = zero;
            }
        }
#pragma unroll
        for (int i = 0; i < GIE_CONVMMA_B_PASSES; ++i) {
            const int m = load_row + i * GIE_CONVMMA_ROWS_PER_PASS;
            if (GIE_CONVMMA_BN % GIE_CONVMMA_ROWS_PER_PASS != 0 && m >= GIE_CONVMMA_BN) break;
            gie_half* dst = &b_tile[stage][m * GIE_CONVMMA_STRIDE + chunk * 8];
            if (k_ok && col0 + m < Mg) {
                gie_cp_async_16(dst, w_group + (long long)(col0 + m) * K + k_next);
            } else {
#pragma unroll
                for (int e = 0; e < 8; ++e) dst[e] = zero;
            }
        }
        gie_cp_async_commit();
        // Advance to the next step's k: BK channels further, across taps.
        k_next += GIE_CONVMMA_BK;
        tap_c += GIE_CONVMMA_BK;
        while (tap_c >= Cg) {
            tap_c -= Cg;
            if (++tap_s == KW) tap_s = 0, ++tap_r;
        }
    };

    float acc[GIE_CONVMMA_MT][GIE_CONVMMA_NT][4];
#pragma unroll
    for (int i = 0; i < GIE_CONVMMA_MT; ++i)
#pragma unroll
        for (int j = 0; j < GIE_CONVMMA_NT; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

    __syncthreads();  // the row decode
    load_step(0);
    const int steps = (K + GIE_CONVMMA_BK - 1) / GIE_CONVMMA_BK;
    // ldmatrix addresses: lane l gives row l % 8 of matrix l / 8. A x4: matrices (rows 0-7,
    // k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15) = a[0..3]. B x4 over
    // two n8 tiles: (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15) =
    // b[0..1] of tile j and b[0..1] of tile j + 1.
    const int matrix = lane >> 3, within = lane & 7;
    const int a_offset = (GIE_CONVMMA_WM * warp_m + (matrix & 1) * 8 + within) * GIE_CONVMMA_STRIDE +
                         (matrix >> 1) * 8;
    const int b_offset = (GIE_CONVMMA_WN * warp_n + (matrix >> 1) * 8 + within) * GIE_CONVMMA_STRIDE +
                         (matrix & 1) * 8;

    for (int step = 0; step < steps; ++step) {
        const int stage = step & 1;
        gie_cp_async_wait_all();
        // Step `step` is in shared memory for every thread, and every warp is done with the
        // other stage (step - 1), which the next copies overwrite.
        __syncthreads();
        if (step + 1 < steps) load_step(stage ^ 1);
        const gie_half* a_stage = a_tile[stage];
        const gie_half* b_stage = b_tile[stage];
#pragma unroll
        for (int kk = 0; kk < GIE_CONVMMA_BK; kk += 16) {
            unsigned a[GIE_CONVMMA_MT][4], b[GIE_CONVMMA_NT][2];
#pragma unroll
            for (int i = 0; i < GIE_CONVMMA_MT; ++i)
                gie_ldmatrix_x4(a[i], a_stage + a_offset + i * 16 * GIE_CONVMMA_STRIDE + kk);
#pragma unroll
            for (int j = 0; j < GIE_CONVMMA_NT; j += 2) {
                unsigned four[4];
                gie_ldmatrix_x4(four, b_stage + b_offset + j * 8 * GIE_CONVMMA_STRIDE + kk);
                b[j][0] = four[0];
                b[j][1] = four[1];
                b[j + 1][0] = four[2];
                b[j + 1][1] = four[3];
            }
#pragma unroll
            for (int i = 0; i < GIE_CONVMMA_MT; ++i)
#pragma unroll
                for (int j = 0; j < GIE_CONVMMA_NT; ++j)
                    gie_mma_m16n8k16_f16_f32(acc[i][j], a[i], b[j], acc[i][j]);
        }
    }

    // Epilogue: c[e] of tile (i, j) is row g + 8 (e / 2), column 2 t + e % 2 of that tile.
    const int group_row = lane >> 2, pair = (lane & 3) * 2;
#pragma unroll
    for (int i = 0; i < GIE_CONVMMA_MT; ++i) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int p = row0 + GIE_CONVMMA_WM * warp_m + 16 * i + group_row + 8 * half;
            if (p >= P) continue;
#pragma unroll
            for (int j = 0; j < GIE_CONVMMA_NT; ++j) {
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int m = col0 + GIE_CONVMMA_WN * warp_n + 8 * j + pair + e;
                    if (m >= Mg) continue;
                    const int channel = g * Mg + m;
                    const long long at = (long long)p * M + channel;
                    float value = acc[i][j][2 * half + e];
                    if (bias != nullptr) value += gie_h2f(bias[channel]);
                    const float extra = residual != nullptr ? gie_h2f(residual[at]) : 0.0f;
                    value = residual_first ? gie_activate(value + extra, activation, alpha, beta)
                                           : gie_activate(value, activation, alpha, beta) + extra;
                    y[at] = gie_f2h(value);
                }
            }
        }
    }
}
