// 2-D transposed convolution (ONNX ConvTranspose), NHWC, fp32 accumulation, in gather form:
// every output element sums the input taps that scatter into it, so no atomics are needed.
//   x    [N, H, W, C]          input, NHWC
//   w    [C, Mg, KH, KW]       the ONNX weight as given (Mg = M / groups output channels per group)
//   bias [M]                   nullable
//   y    [N, OH, OW, M]        output, NHWC
//   y[n, oh, ow, m] = bias[m] + sum_{c in group(m), r, s} x[n, ih, iw, c] * w[c, m % Mg, r, s]
//   where oh + pad_top - r * dil_h = ih * stride_h and ow + pad_left - s * dil_w = iw * stride_w
//   (exact multiples, 0 <= ih < H, 0 <= iw < W). OH, OW and the begin pads come from the host
//   (engine.ops.conv._transpose_geometry: pads, auto_pad, output_padding, output_shape).
// One thread per output element, channel fastest; grid-stride loop (any launch is correct,
// 256 threads x min(ceil(total / 256), 4096) blocks usual). Not fast: the simple first version.
#include "gie_prelude.cuh"

template <typename T>
__device__ void conv_transpose(const T* __restrict__ x, const T* __restrict__ w,
                               const T* __restrict__ bias, T* __restrict__ y, int N, int H,
                               int W, int C, int M, int OH, int OW, int KH, int KW, int stride_h,
                               int stride_w, int pad_top, int pad_left, int dil_h, int dil_w,
                               int groups) {
    const int Cg = C / groups, Mg = M / groups;
    const long long total = (long long)N * OH * OW * M;
    const long long step = (long long)blockDim.x * gridDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += step) {
        const int m = (int)(i % M);
        long long rest = i / M;
        const int ow = (int)(rest % OW);
        rest /= OW;
        const int oh = (int)(rest % OH);
        const int n = (int)(rest / OH);
        const int g = m / Mg, ml = m % Mg;
        float acc = bias != nullptr ? gie_load(bias + m) : 0.0f;
        for (int r = 0; r < KH; ++r) {
            const int th = oh + pad_top - r * dil_h;
            if (th < 0 || th % stride_h) continue;
            const int ih = th / stride_h;
            if (ih >= H) continue;
            for (int s = 0; s < KW; ++s) {
                const int tw = ow + pad_left - s * dil_w;
                if (tw < 0 || tw % stride_w) continue;
                const int iw = tw / stride_w;
                if (iw >= W) continue;
                const T* xp = x + (((long long)n * H + ih) * W + iw) * C + (long long)g * Cg;
                const T* wp = w + (((long long)g * Cg * Mg + ml) * KH + r) * KW + s;
                const long long w_step = (long long)Mg * KH * KW;
                for (int c = 0; c < Cg; ++c) acc += gie_load(xp + c) * gie_load(wp + c * w_step);
            }
        }
        gie_store(y + i, acc);
    }
}

extern "C" __global__ void gie_conv_transpose_f32(const float* x, const float* w,
                                                  const float* bias, float* y, int N, int H,
                                                  int W, int C, int M, int OH, int OW, int KH,
                                                  int KW, int stride_h, int stride_w,
                                                  int pad_top, int pad_left, int dil_h, int dil_w,
                                                  int groups) {
    conv_transpose(x, w, bias, y, N, H, W, C, M, OH, OW, KH, KW, stride_h, stride_w, pad_top,
                   pad_left, dil_h, dil_w, groups);
}

extern "C" __global__ void gie_conv_transpose_f16(const gie_half* x, const gie_half* w,
                                                  const gie_half* bias, gie_half* y, int N,
                                                  int H, int W, int C, int M, int OH, int OW,
                                                  int KH, int KW, int stride_h, int stride_w,
                                                  int pad_top, int pad_left, int dil_h,
                                                  int dil_w, int groups) {
    conv_transpose(x, w, bias, y, N, H, W, C, M, OH, OW, KH, KW, stride_h, stride_w, pad_top,
                   pad_left, dil_h, dil_w, groups);
}
