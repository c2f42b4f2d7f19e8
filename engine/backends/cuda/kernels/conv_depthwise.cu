// Depthwise 2-D convolution, NHWC, with the fused gie::ConvAct epilogue, fp32 accumulation.
//
// groups == C and one output channel per input channel (M == C):
//   x        [N, H, W, C]     input, NHWC
//   w        [C, KH, KW]      weight (the KRSC weight [C, KH, KW, 1] of a depthwise Conv)
//   bias     [C]              nullable
//   residual [N, OH, OW, C]   nullable
//   y        [N, OH, OW, C]   output, NHWC
//   y[n, oh, ow, c] = sum_{r, s} x[n, oh * stride_h - pad_top + r * dil_h,
//                                  ow * stride_w - pad_left + s * dil_w, c] * w[c, r, s]
// (taps outside the input read 0), then y = act(y + bias + residual) when residual_first, else
// act(y + bias) + residual (engine/ops/gie_fused.py; GIE_ACT_* codes of the prelude). OH, OW
// come from the host. One thread per output element, channel fastest (consecutive threads read
// consecutive channels of a pixel: coalesced along C); 3x3 and 5x5 filters run fully unrolled
// loops, any other KH x KW the generic loop (the branch is uniform over the launch).
// Launch: any grid (grid-stride loop); 256 threads x min(ceil(total / 256), a few per SM) usual.
// A channel multiplier (M = k C) goes through conv_implicit_gemm.cu with groups = C.
//
// Not fast yet: no half2 vectorization and no reuse of input rows between neighbouring outputs.
#include "gie_prelude.cuh"

// KH, KW > 0: compile-time filter (unrolled); 0: the run-time kh, kw.
template <int KH, int KW, typename T>
__device__ void conv_depthwise(const T* __restrict__ x, const T* __restrict__ w,
                               const T* __restrict__ bias, const T* __restrict__ residual,
                               T* __restrict__ y, int N, int H, int W, int C, int OH, int OW,
                               int kh, int kw, int stride_h, int stride_w, int pad_top,
                               int pad_left, int dil_h, int dil_w, int activation, float alpha,
                               float beta, int residual_first) {
    const int filter_h = KH > 0 ? KH : kh;
    const int filter_w = KW > 0 ? KW : kw;
    const long long total = (long long)N * OH * OW * C;
    const long long step = (long long)blockDim.x * gridDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += step) {
        const int c = (int)(i % C);
        long long rest = i / C;
        const int ow = (int)(rest % OW);
        rest /= OW;
        const int oh = (int)(rest % OH);
        const long long n = rest / OH;
        const int ih0 = oh * stride_h - pad_top;
        const int iw0 = ow * stride_w - pad_left;
        const T* image = x + n * H * W * C + c;
        const T* filter = w + (long long)c * filter_h * filter_w;
        float acc = 0.0f;
#pragma unroll
        for (int r = 0; r < filter_h; ++r) {  // constant trip count (unrolled) when KH > 0
            const int ih = ih0 + r * dil_h;
            if (ih < 0 || ih >= H) continue;
#pragma unroll
            for (int s = 0; s < filter_w; ++s) {
                const int iw = iw0 + s * dil_w;
                if (iw < 0 || iw >= W) continue;
                acc = fmaf(gie_load(image + ((long long)ih * W + iw) * C),
                           gie_load(filter + r * filter_w + s), acc);
            }
        }
        if (bias != nullptr) acc += gie_load(bias + c);
        const float extra = residual != nullptr ? gie_load(residual + i) : 0.0f;
        acc = residual_first ? gie_activate(acc + extra, activation, alpha, beta)
                             : gie_activate(acc, activation, alpha, beta) + extra;
        gie_store(y + i, acc);
    }
}

template <typename T>
__device__ void conv_depthwise_dispatch(const T* x, const T* w, const T* bias, const T* residual,
                                        T* y, int N, int H, int W, int C, int OH, int OW, int kh,
                                        int kw, int stride_h, int stride_w, int pad_top,
                                        int pad_left, int dil_h, int dil_w, int activation,
                                        float alpha, float beta, int residual_first) {
    if (kh == 3 && kw == 3)
        conv_depthwise<3, 3>(x, w, bias, residual, y, N, H, W, C, OH, OW, kh, kw, stride_h,
                             stride_w, pad_top, pad_left, dil_h, dil_w, activation, alpha, beta,
                             residual_first);
    else if (kh == 5 && kw == 5)
        conv_depthwise<5, 5>(x, w, bias, residual, y, N, H, W, C, OH, OW, kh, kw, stride_h,
                             stride_w, pad_top, pad_left, dil_h, dil_w, activation, alpha, beta,
                             residual_first);
    else
        conv_depthwise<0, 0>(x, w, bias, residual, y, N, H, W, C, OH, OW, kh, kw, stride_h,
                             stride_w, pad_top, pad_left, dil_h, dil_w, activation, alpha, beta,
                             residual_first);
}

extern "C" __global__ void gie_conv_depthwise_f32(const float* x, const float* w,
                                                  const float* bias, const float* residual,
                                                  float* y, int N, int H, int W, int C, int OH,
                                                  int OW, int kh, int kw, int stride_h,
                                                  int stride_w, int pad_top, int pad_left,
                                                  int dil_h, int dil_w, int activation,
                                                  float alpha, float beta, int residual_first) {
    conv_depthwise_dispatch(x, w, bias, residual, y, N, H, W, C, OH, OW, kh, kw, stride_h,
                            stride_w, pad_top, pad_left, dil_h, dil_w, activation, alpha, beta,
                            residual_first);
}

extern "C" __global__ void gie_conv_depthwise_f16(const gie_half* x, const gie_half* w,
                                                  const gie_half* bias, const gie_half* residual,
                                                  gie_half* y, int N, int H, int W, int C, int OH,
                                                  int OW, int kh, int kw, int stride_h,
                                                  int stride_w, int pad_top, int pad_left,
                                                  int dil_h, int dil_w, int activation,
                                                  float alpha, float beta, int residual_first) {
    conv_depthwise_dispatch(x, w, bias, residual, y, N, H, W, C, OH, OW, kh, kw, stride_h,
                            stride_w, pad_top, pad_left, dil_h, dil_w, activation, alpha, beta,
                            residual_first);
}
