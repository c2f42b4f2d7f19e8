// int8 tensor-core (IMMA, mma.sync m16n8k32 s8) implicit-GEMM 2-D convolution, NHWC, for
// gie::QConv: exact int32 accumulation and the int8 layers' requantizing epilogue, bit-exact
// with engine/ops/gie_quant.py (the arithmetic of kernels/gemm_int8.cu):
//   acc      = sum_k x_q * w_q                                  (exact int32)
//   acc      = saturate_int32(acc + bias[m])                    (bias int32, nullable)
//   real     = float32(acc) * float32(x_scale * w_scale[m])     (float32, no FMA contraction)
//   real     = act(real + residual) or act(real) + residual     (residual float32, nullable)
//   output   = saturate_int8(rintf(real / y_scale)) (gie_conv_int8_s8), real (_f32) or
//              float16(real) (_f16).
//
// Layouts (dense, row-major), as conv_implicit_gemm.cu:
//   x        [N, H, W, C]            int8 input, NHWC (zero padding is the int8 value 0)
//   w        [M, KH, KW, C / groups] int8 weight, KRSC
//   bias     [M]                     int32, nullable
//   w_scale  [M] (w_scale_stride 1) or [1] (w_scale_stride 0)  float32
//   residual [N, OH, OW, M]          float32, nullable, the output's layout
//   y        [N, OH, OW, M]          int8 / float32 / float16
// Geometry: the host passes OH, OW; only the begin pads enter the index math.
//
// GEMM view per group g (Cg = C / groups, Mg = M / groups): rows p = (n, oh, ow), columns
// m < Mg, depth k = (r, s, c) < K = KH * KW * Cg (KRSC order), as conv_mma_f16.cu.
// Constraint: Cg % 16 == 0 (so C % 16 and K % 16 == 0): every 16-channel run of k is one
// 16-byte vector inside one filter tap, copied with cp.async (or zero-filled in shared memory
// for padding taps and k past K). K <= 131071 (qparams.MAX_INT32_DEPTH, no int32 overflow).
// M, Mg and the pixel count are free (bounds-checked). x and w 16-byte aligned.
//
// Work split: a block of GIE_CONVI8_WARPS_M x GIE_CONVI8_WARPS_N warps computes a GIE_CONVI8_BM
// (pixels) x GIE_CONVI8_BN (output channels) tile of one group, in steps of GIE_CONVI8_BK int8
// along k, double-buffered in shared memory (copies of step k + 1 in flight during step k; one
// __syncthreads per step). Fragments come from ldmatrix.x4 (an 8 x 8 b16 matrix is 8 rows of
// 16 int8: lane l receives row l / 4, bytes 4 (l % 4) .. + 3, exactly the s8 fragment layout),
// then mma.sync m16n8k32. Shared rows are padded by 16 bytes against bank conflicts.
// Defaults BM 64, BN 64, BK 64, 2 x 2 warps (128 threads). Tactics override with
// -D GIE_CONVI8_BM / BN / BK / WARPS_M / WARPS_N: BK a multiple of 32, BM / WARPS_M and
// BN / WARPS_N multiples of 16.
// Launch: grid (ceil(P / BM), ceil(Mg / BN), groups), block 32 * WARPS_M * WARPS_N.
// Limits: N * H * W and N * OH * OW below 2^31 pixels (element offsets are 64-bit).
#include "gie_conv.cuh"

#ifndef GIE_CONVI8_BM
#define GIE_CONVI8_BM 64
#endif
#ifndef GIE_CONVI8_BN
#define GIE_CONVI8_BN 64
#endif
#ifndef GIE_CONVI8_BK
#define GIE_CONVI8_BK 64
#endif
#ifndef GIE_CONVI8_WARPS_M
#define GIE_CONVI8_WARPS_M 2
#endif
#ifndef GIE_CONVI8_WARPS_N
#define GIE_CONVI8_WARPS_N 2
#endif
#define GIE_CONVI8_THREADS (32 * GIE_CONVI8_WARPS_M * GIE_CONVI8_WARPS_N)
#define GIE_CONVI8_WM (GIE_CONVI8_BM / GIE_CONVI8_WARPS_M)  // rows of a warp's sub-tile
#define GIE_CONVI8_WN (GIE_CONVI8_BN / GIE_CONVI8_WARPS_N)  // columns of a warp's sub-tile
#define GIE_CONVI8_MT (GIE_CONVI8_WM / 16)                  // m16 tiles per warp
#define GIE_CONVI8_NT (GIE_CONVI8_WN / 8)                   // n8 tiles per warp
#define GIE_CONVI8_STRIDE (GIE_CONVI8_BK + 16)              // bytes per shared row
#define GIE_CONVI8_CHUNKS (GIE_CONVI8_BK / 16)              // 16-byte vectors per row
#define GIE_CONVI8_ROWS_PER_PASS (GIE_CONVI8_THREADS / GIE_CONVI8_CHUNKS)
#define GIE_CONVI8_A_PASSES \
    ((GIE_CONVI8_BM + GIE_CONVI8_ROWS_PER_PASS - 1) / GIE_CONVI8_ROWS_PER_PASS)
#define GIE_CONVI8_B_PASSES \
    ((GIE_CONVI8_BN + GIE_CONVI8_ROWS_PER_PASS - 1) / GIE_CONVI8_ROWS_PER_PASS)

static_assert(GIE_CONVI8_BK % 32 == 0, "BK is a multiple of the mma depth 32");
static_assert(GIE_CONVI8_WM % 16 == 0 && GIE_CONVI8_WN % 16 == 0,
              "warp sub-tiles are multiples of 16 x 16");
static_assert(GIE_CONVI8_THREADS % GIE_CONVI8_CHUNKS == 0, "BK / 16 divides the block");

// A row past the last output pixel: every tap of it lands outside the input.
#define GIE_CONVI8_NO_ROW GIE_CONV_NO_ROW

__device__ __forceinline__ void gie_conv_i8_zero16(signed char* shared) {
    unsigned* words = reinterpret_cast<unsigned*>(shared);
#pragma unroll
    for (int e = 0; e < 4; ++e) words[e] = 0u;
}

template <typename Out>
__device__ void conv_int8(const signed char* __restrict__ x, const signed char* __restrict__ w,
                          const int* __restrict__ bias, const float* __restrict__ w_scale,
                          const float* __restrict__ residual, Out* __restrict__ y, int N, int H,
                          int W, int C, int M, int OH, int OW, int KH, int KW, int stride_h,
                          int stride_w, int pad_top, int pad_left, int dil_h, int dil_w,
                          int groups, float x_scale, int w_scale_stride, float y_scale,
                          int activation, float alpha, float beta, int residual_first) {
    __shared__ __align__(16) signed char a_tile[2][GIE_CONVI8_BM * GIE_CONVI8_STRIDE];
    __shared__ __align__(16) signed char b_tile[2][GIE_CONVI8_BN * GIE_CONVI8_STRIDE];
    __shared__ int row_pixel[GIE_CONVI8_BM];  // n * H * W: pixel (n, 0, 0) of x
    __shared__ int row_ih[GIE_CONVI8_BM];     // oh * stride_h - pad_top
    __shared__ int row_iw[GIE_CONVI8_BM];     // ow * stride_w - pad_left

    const int tid = threadIdx.x;
    const int lane = tid & 31, warp = tid >> 5;
    const int warp_m = warp % GIE_CONVI8_WARPS_M, warp_n = warp / GIE_CONVI8_WARPS_M;
    const int Cg = C / groups;
    const int Mg = M / groups;
    const int K = KH * KW * Cg;
    const int P = N * OH * OW;
    const int g = blockIdx.z;
    const int row0 = blockIdx.x * GIE_CONVI8_BM;
    const int col0 = blockIdx.y * GIE_CONVI8_BN;

    gie_conv_decode_rows(row_pixel, row_ih, row_iw, GIE_CONVI8_BM, GIE_CONVI8_THREADS, row0, P,
                         OH, OW, H, W, stride_h, stride_w, pad_top, pad_left);

    // This thread copies the 16-channel vector `chunk` of k for rows load_row + i *
    // ROWS_PER_PASS of both tiles; its tap (r, s) and channel c advance by BK a step.
    const int chunk = tid % GIE_CONVI8_CHUNKS;
    const int load_row = tid / GIE_CONVI8_CHUNKS;
    int tap_c = chunk * 16, tap_r = 0, tap_s = 0;
    while (tap_c >= Cg) {  // BK may exceed Cg: normalize the first position
        tap_c -= Cg;
        if (++tap_s == KW) tap_s = 0, ++tap_r;
    }
    int k_next = chunk * 16;  // k of this thread's vector in the step being loaded
    const signed char* x_group = x + g * Cg;
    const signed char* w_group = w + (long long)g * Mg * K;

    auto load_step = [&](int stage) {
        const bool k_ok = k_next < K;
        const int dy = tap_r * dil_h, dx = tap_s * dil_w;
#pragma unroll
        for (int i = 0; i < GIE_CONVI8_A_PASSES; ++i) {
            const int r = load_row + i * GIE_CONVI8_ROWS_PER_PASS;
            if (GIE_CONVI8_BM % GIE_CONVI8_ROWS_PER_PASS != 0 && r >= GIE_CONVI8_BM) break;
            signed char* dst = &a_tile[stage][r * GIE_CONVI8_STRIDE + chunk * 16];
            const int ih = row_ih[r] + dy, iw = row_iw[r] + dx;
            if (k_ok && ih >= 0 && ih < H && iw >= 0 && iw < W)
                gie_cp_async_16(dst, x_group + (long long)(row_pixel[r] + ih * W + iw) * C + tap_c);
            else
                gie_conv_i8_zero16(dst);
        }
#pragma unroll
        for (int i = 0; i < GIE_CONVI8_B_PASSES; ++i) {
            const int m = load_row + i * GIE_CONVI8_ROWS_PER_PASS;
            if (GIE_CONVI8_BN % GIE_CONVI8_ROWS_PER_PASS != 0 && m >= GIE_CONVI8_BN) break;
            signed char* dst = &b_tile[stage][m * GIE_CONVI8_STRIDE + chunk * 16];
            if (k_ok && col0 + m < Mg)
                gie_cp_async_16(dst, w_group + (long long)(col0 + m) * K + k_next);
            else
                gie_conv_i8_zero16(dst);
        }
        gie_cp_async_commit();
        k_next += GIE_CONVI8_BK;
        tap_c += GIE_CONVI8_BK;
        while (tap_c >= Cg) {
            tap_c -= Cg;
            if (++tap_s == KW) tap_s = 0, ++tap_r;
        }
    };

    int acc[GIE_CONVI8_MT][GIE_CONVI8_NT][4];
#pragma unroll
    for (int i = 0; i < GIE_CONVI8_MT; ++i)
#pragma unroll
        for (int j = 0; j < GIE_CONVI8_NT; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0;

    __syncthreads();  // the row decode
    load_step(0);
    const int steps = (K + GIE_CONVI8_BK - 1) / GIE_CONVI8_BK;
    // ldmatrix addresses (lane l: row l % 8 of matrix l / 8). A x4: (rows 0-7, k 0-15),
    // (rows 8-15, k 0-15), (rows 0-7, k 16-31), (rows 8-15, k 16-31) = a[0..3]. B x4 over two
    // n8 tiles: (n 0-7, k 0-15), (n 0-7, k 16-31), (n 8-15, k 0-15), (n 8-15, k 16-31).
    const int matrix = lane >> 3, within = lane & 7;
    const int a_offset = (GIE_CONVI8_WM * warp_m + (matrix & 1) * 8 + within) * GIE_CONVI8_STRIDE +
                         (matrix >> 1) * 16;
    const int b_offset = (GIE_CONVI8_WN * warp_n + (matrix >> 1) * 8 + within) * GIE_CONVI8_STRIDE +
                         (matrix & 1) * 16;

    for (int step = 0; step < steps; ++step) {
        const int stage = step & 1;
        gie_cp_async_wait_all();
        // Step `step` is in shared memory for every thread, and every warp is done with the
        // other stage (step - 1), which the next copies overwrite.
        __syncthreads();
        if (step + 1 < steps) load_step(stage ^ 1);
        const signed char* a_stage = a_tile[stage];
        const signed char* b_stage = b_tile[stage];
#pragma unroll
        for (int kk = 0; kk < GIE_CONVI8_BK; kk += 32) {
            unsigned a[GIE_CONVI8_MT][4], b[GIE_CONVI8_NT][2];
#pragma unroll
            for (int i = 0; i < GIE_CONVI8_MT; ++i)
                gie_ldmatrix_x4(a[i], a_stage + a_offset + i * 16 * GIE_CONVI8_STRIDE + kk);
#pragma unroll
            for (int j = 0; j < GIE_CONVI8_NT; j += 2) {
                unsigned four[4];
                gie_ldmatrix_x4(four, b_stage + b_offset + j * 8 * GIE_CONVI8_STRIDE + kk);
                b[j][0] = four[0];
                b[j][1] = four[1];
                b[j + 1][0] = four[2];
                b[j + 1][1] = four[3];
            }
#pragma unroll
            for (int i = 0; i < GIE_CONVI8_MT; ++i)
#pragma unroll
                for (int j = 0; j < GIE_CONVI8_NT; ++j)
                    gie_mma_m16n8k32_s8_s32(acc[i][j], a[i], b[j], acc[i][j]);
        }
    }

    // Epilogue (gemm_int8.cu's arithmetic): c[e] of tile (i, j) is row g + 8 (e / 2), column
    // 2 t + e % 2 of that tile.
    const int group_row = lane >> 2, pair = (lane & 3) * 2;
#pragma unroll
    for (int i = 0; i < GIE_CONVI8_MT; ++i) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int p = row0 + GIE_CONVI8_WM * warp_m + 16 * i + group_row + 8 * half;
            if (p >= P) continue;
#pragma unroll
            for (int j = 0; j < GIE_CONVI8_NT; ++j) {
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int m = col0 + GIE_CONVI8_WN * warp_n + 8 * j + pair + e;
                    if (m >= Mg) continue;
                    const int c = g * Mg + m;
                    const int sum = acc[i][j][2 * half + e];
                    const int total = bias != nullptr ? gie_add_sat_s32(sum, bias[c]) : sum;
                    float real = gie_dequant_acc(total, x_scale, w_scale[c * w_scale_stride]);
                    const long long at = (long long)p * M + c;
                    if (residual == nullptr) {
                        real = gie_activate(real, activation, alpha, beta);
                    } else {
                        real = residual_first
                                   ? gie_activate(real + residual[at], activation, alpha, beta)
                                   : gie_activate(real, activation, alpha, beta) + residual[at];
                    }
                    gie_store_q(y + at, real, y_scale);
                }
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(GIE_CONVI8_THREADS)
gie_conv_int8_s8(const signed char* x, const signed char* w, const int* bias,
                  const float* w_scale, const float* residual, signed char* y, int N, int H, int W,
                  int C, int M, int OH, int OW, int KH, int KW, int stride_h, int stride_w,
                  int pad_top, int pad_left, int dil_h, int dil_w, int groups, float x_scale,
                  int w_scale_stride, float y_scale, int activation, float alpha, float beta,
                  int residual_first) {
    conv_int8(x, w, bias, w_scale, residual, y, N, H, W, C, M, OH, OW, KH, KW, stride_h,
              stride_w, pad_top, pad_left, dil_h, dil_w, groups, x_scale, w_scale_stride,
              y_scale, activation, alpha, beta, residual_first);
}

extern "C" __global__ void __launch_bounds__(GIE_CONVI8_THREADS)
gie_conv_int8_f32(const signed char* x, const signed char* w, const int* bias,
                  const float* w_scale, const float* residual, float* y, int N, int H, int W,
                  int C, int M, int OH, int OW, int KH, int KW, int stride_h, int stride_w,
                  int pad_top, int pad_left, int dil_h, int dil_w, int groups, float x_scale,
                  int w_scale_stride, float y_scale, int activation, float alpha, float beta,
                  int residual_first) {
    conv_int8(x, w, bias, w_scale, residual, y, N, H, W, C, M, OH, OW, KH, KW, stride_h,
              stride_w, pad_top, pad_left, dil_h, dil_w, groups, x_scale, w_scale_stride,
              y_scale, activation, alpha, beta, residual_first);
}

extern "C" __global__ void __launch_bounds__(GIE_CONVI8_THREADS)
gie_conv_int8_f16(const signed char* x, const signed char* w, const int* bias,
                  const float* w_scale, const float* residual, gie_half* y, int N, int H, int W,
                  int C, int M, int OH, int OW, int KH, int KW, int stride_h, int stride_w,
                  int pad_top, int pad_left, int dil_h, int dil_w, int groups, float x_scale,
                  int w_scale_stride, float y_scale, int activation, float alpha, float beta,
                  int residual_first) {
    conv_int8(x, w, bias, w_scale, residual, y, N, H, W, C, M, OH, OW, KH, KW, stride_h,
              stride_w, pad_top, pad_left, dil_h, dil_w, groups, x_scale, w_scale_stride,
              y_scale, activation, alpha, beta, residual_first);
}
