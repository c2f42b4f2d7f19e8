// gie_conv.cuh: what the implicit-GEMM convolutions share (conv_implicit_gemm.cu,
// conv_mma_f16.cu, conv_int8.cu): the per-block decode of output rows p = (n, oh, ow).
#pragma once
#include "gie_prelude.cuh"

// An input row/column that no tap reaches: far below 0, so every tap test fails.
#define GIE_CONV_NO_ROW (-(1 << 29))

// For the `rows` output pixels row0 .. row0 + rows - 1 of this block, the shared tables
//   row_pixel[r] = n * H * W            (pixel (n, 0, 0) of x)
//   row_ih[r]    = oh * stride_h - pad_top,  row_iw[r] = ow * stride_w - pad_left
// (GIE_CONV_NO_ROW past the P = N * OH * OW pixels), filled by `threads` threads. The caller
// synchronizes before reading them.
__device__ __forceinline__ void gie_conv_decode_rows(int* row_pixel, int* row_ih, int* row_iw,
                                                     int rows, int threads, int row0, int P,
                                                     int OH, int OW, int H, int W,
                                                     int stride_h, int stride_w, int pad_top,
                                                     int pad_left) {
    for (int r = threadIdx.x; r < rows; r += threads) {
        const int p = row0 + r;
        if (p < P) {
            const int ow = p % OW;
            const int rest = p / OW;
            const int oh = rest % OH;
            const int n = rest / OH;
            row_pixel[r] = n * H * W;
            row_ih[r] = oh * stride_h - pad_top;
            row_iw[r] = ow * stride_w - pad_left;
        } else {
            row_pixel[r] = 0;
            row_ih[r] = GIE_CONV_NO_ROW;
            row_iw[r] = GIE_CONV_NO_ROW;
        }
    }
}
