// ONNX Resize of the two spatial axes of a 4-D tensor (N and C not resized), fp32 and fp16
// storage, fp32 math, as engine/ops/resize.py computes it:
//
//   gie_resize_nchw_f32 / _f16(x [N, C, H, W], y [N, C, OH, OW], ...)
//   gie_resize_nhwc_f32 / _f16(x [N, H, W, C], y [N, OH, OW, C], ...)
//   arguments after x, y: int N, int C, int H, int W, int OH, int OW, float scale_h,
//       float scale_w, int mode, int coordinate_mode, int nearest_mode
//
// The host resolves scales or sizes (engine.ops.resize._resize_plan) into the output size and
// the per-axis scale factor: the float32 scale when the scales input gives it (exact), or 0 when
// the factor is out / in (sizes given): the kernel then forms out / in in fp64 itself, exactly
// the reference's factor. Codes (mirrored in lower_data_movement.py):
//   mode: GIE_RESIZE_NEAREST 0, GIE_RESIZE_LINEAR 1 (bilinear, indices clamped to the edge);
//   coordinate_mode, x_in for output index o along an axis of input length L, scale s:
//     GIE_RESIZE_HALF_PIXEL 0          (o + 0.5) / s - 0.5
//     GIE_RESIZE_ASYMMETRIC 1          o / s
//     GIE_RESIZE_ALIGN_CORNERS 2       o * (L - 1) / (s * L - 1), 0 when s * L == 1
//     GIE_RESIZE_PYTORCH_HALF_PIXEL 3  (o + 0.5) / s - 0.5, -0.5 when s * L == 1
//     GIE_RESIZE_TF_HALF_PIXEL_FOR_NN 4  (o + 0.5) / s   (opsets 11-12)
//   nearest_mode: GIE_RESIZE_ROUND_PREFER_FLOOR 0, ROUND_PREFER_CEIL 1, FLOOR 2, CEIL 3,
//     SIMPLE 4 (opsets < 11: ceil when s < 1, else floor); the index is clamped to [0, L - 1].
// An axis whose scale is 1 (np.isclose) and whose length is unchanged is copied, as the
// reference skips it.
// Not covered (the lowering refuses them): cubic, antialias, exclude_outside,
// tf_crop_and_resize / roi, half_pixel_symmetric, resized N or C axes.
//
// Coordinates, indices and weights are fp64 as in the reference (identical operations, no FMA
// contraction), so nearest picks the reference's pixels exactly and linear differs only by the
// fp32 interpolation sums (a few fp64 operations per output element: cheap on H100 / A100).
//
// Launch: grid-stride loop over the output elements (ow fastest in NCHW, c in NHWC), 1-D grid
// and block, any grid is correct; at most GIE_RESIZE_THREADS (256) threads per block, 256 x
// min(ceil(count / 256), 4096) usual. 32-bit index math when the output has fewer than 2^31
// elements. One thread per output element, taps recomputed per element (no per-row tables).
#include "gie_prelude.cuh"

#define GIE_RESIZE_THREADS 256  // the most threads per block a launch may use

#define GIE_RESIZE_NEAREST 0
#define GIE_RESIZE_LINEAR 1

#define GIE_RESIZE_HALF_PIXEL 0
#define GIE_RESIZE_ASYMMETRIC 1
#define GIE_RESIZE_ALIGN_CORNERS 2
#define GIE_RESIZE_PYTORCH_HALF_PIXEL 3
#define GIE_RESIZE_TF_HALF_PIXEL_FOR_NN 4

#define GIE_RESIZE_ROUND_PREFER_FLOOR 0
#define GIE_RESIZE_ROUND_PREFER_CEIL 1
#define GIE_RESIZE_FLOOR 2
#define GIE_RESIZE_CEIL 3
#define GIE_RESIZE_SIMPLE 4

// Coordinates are fp64, operation for operation as the reference computes them (so nearest
// indices and linear weights are the reference's); only the interpolation itself is fp32.
// A multiply that an add follows goes through gie_resize_dmul so that nvcc cannot contract the
// pair into an FMA the reference does not do.
GIE_DEVICE double gie_resize_dmul(double a, double b) {
#ifdef GIE_CPU_SHIM
    return a * b;
#else
    return __dmul_rn(a, b);
#endif
}

// The axis' scale factor: the float argument, or out / in when it is <= 0 (sizes given).
GIE_DEVICE double gie_resize_factor(float scale, int L, int out_len) {
    return scale > 0.0f ? (double)scale : (double)out_len / (double)L;
}

// Input coordinate of output index o along an axis of input length L (see the table above).
GIE_DEVICE double gie_resize_coord(int o, int L, double scale, int coordinate_mode) {
    const double out = (double)o;
    switch (coordinate_mode) {
        case GIE_RESIZE_ASYMMETRIC: return out / scale;
        case GIE_RESIZE_ALIGN_CORNERS: {
            const double width = gie_resize_dmul(scale, (double)L);
            return width == 1.0 ? 0.0 : gie_resize_dmul(out, (double)(L - 1)) / (width - 1.0);
        }
        case GIE_RESIZE_PYTORCH_HALF_PIXEL:
            return gie_resize_dmul(scale, (double)L) == 1.0 ? -0.5 : (out + 0.5) / scale - 0.5;
        case GIE_RESIZE_TF_HALF_PIXEL_FOR_NN: return (out + 0.5) / scale;
        default: return (out + 0.5) / scale - 0.5;
    }
}

GIE_DEVICE int gie_resize_clamp(int index, int L) {
    return index < 0 ? 0 : (index >= L ? L - 1 : index);
}

GIE_DEVICE int gie_resize_nearest(double x, int L, double scale, int nearest_mode) {
    const double down = floor(x);
    const double frac = x - down;
    double index;
    switch (nearest_mode) {
        case GIE_RESIZE_FLOOR: index = down; break;
        case GIE_RESIZE_CEIL: index = ceil(x); break;
        case GIE_RESIZE_ROUND_PREFER_CEIL: index = frac >= 0.5 ? down + 1.0 : down; break;
        case GIE_RESIZE_SIMPLE: index = scale < 1.0 ? ceil(x) : down; break;
        default: index = frac > 0.5 ? down + 1.0 : down; break;
    }
    // Clamp before the conversion: a huge coordinate must not overflow the int.
    index = fmin(fmax(index, 0.0), (double)(L - 1));
    return (int)index;
}

// One axis' taps: x = w0 * in[i0] + w1 * in[i1]. Nearest: i0 == i1, w1 = 0. An identity axis
// (scale 1 as np.isclose says, same length) is o itself, as the reference skips it.
struct GieResizeTaps {
    int i0, i1;
    float w0, w1;
};

GIE_DEVICE GieResizeTaps gie_resize_taps(int o, int L, int out_len, float scale_argument,
                                         int mode, int coordinate_mode, int nearest_mode) {
    GieResizeTaps taps;
    taps.w0 = 1.0f;
    taps.w1 = 0.0f;
    const double scale = gie_resize_factor(scale_argument, L, out_len);
    if (fabs(scale - 1.0) <= 1.001e-5 && out_len == L) {
        taps.i0 = o;
        taps.i1 = o;
        return taps;
    }
    const double x = gie_resize_coord(o, L, scale, coordinate_mode);
    if (mode == GIE_RESIZE_NEAREST) {
        taps.i0 = gie_resize_nearest(x, L, scale, nearest_mode);
        taps.i1 = taps.i0;
        return taps;
    }
    const double base = floor(x);
    const double ratio = x - base;
    taps.w0 = (float)(1.0 - ratio);
    taps.w1 = (float)ratio;
    const double lo = fmin(fmax(base, -1.0), (double)L);  // keep the int conversion in range
    taps.i0 = gie_resize_clamp((int)lo, L);
    taps.i1 = gie_resize_clamp((int)lo + 1, L);
    return taps;
}

template <typename I, bool kNhwc, typename T>
__device__ void gie_resize(const T* __restrict__ x, T* __restrict__ y, int N, int C, int H,
                           int W, int OH, int OW, float scale_h, float scale_w, int mode,
                           int coordinate_mode, int nearest_mode) {
    const I total = (I)((long long)N * C * OH * OW);
    const I step = (I)blockDim.x * (I)gridDim.x;
    for (I i = (I)blockIdx.x * (I)blockDim.x + (I)threadIdx.x; i < total; i += step) {
        int n, c, oh, ow;
        if (kNhwc) {
            const I pixel = i / (I)C;
            c = (int)(i - pixel * (I)C);
            const I row = pixel / (I)OW;
            ow = (int)(pixel - row * (I)OW);
            n = (int)(row / (I)OH);
            oh = (int)(row - (I)n * (I)OH);
        } else {
            const I row = i / (I)OW;
            ow = (int)(i - row * (I)OW);
            const I plane = row / (I)OH;
            oh = (int)(row - plane * (I)OH);
            n = (int)(plane / (I)C);
            c = (int)(plane - (I)n * (I)C);
        }
        const GieResizeTaps th =
            gie_resize_taps(oh, H, OH, scale_h, mode, coordinate_mode, nearest_mode);
        const GieResizeTaps tw =
            gie_resize_taps(ow, W, OW, scale_w, mode, coordinate_mode, nearest_mode);
        // Element (h, w) of image n, channel c.
        long long base, row_stride, col_stride;
        if (kNhwc) {
            base = (long long)n * H * W * C + c;
            row_stride = (long long)W * C;
            col_stride = C;
        } else {
            base = ((long long)n * C + c) * H * W;
            row_stride = W;
            col_stride = 1;
        }
        const T* top = x + base + th.i0 * row_stride;
        float value;
        if (mode == GIE_RESIZE_NEAREST) {
            value = gie_load(top + tw.i0 * col_stride);
        } else {
            // Along H first, then W, as the reference contracts the axes in order.
            const T* bottom = x + base + th.i1 * row_stride;
            const float left = th.w0 * gie_load(top + tw.i0 * col_stride) +
                               th.w1 * gie_load(bottom + tw.i0 * col_stride);
            const float right = th.w0 * gie_load(top + tw.i1 * col_stride) +
                                th.w1 * gie_load(bottom + tw.i1 * col_stride);
            value = tw.w0 * left + tw.w1 * right;
        }
        gie_store(y + i, value);
    }
}

template <bool kNhwc, typename T>
__device__ void gie_resize_any(const T* x, T* y, int N, int C, int H, int W, int OH, int OW,
                               float scale_h, float scale_w, int mode, int coordinate_mode,
                               int nearest_mode) {
    if ((long long)N * C * OH * OW <= 0x7fffffffLL)
        gie_resize<unsigned, kNhwc>(x, y, N, C, H, W, OH, OW, scale_h, scale_w, mode,
                                    coordinate_mode, nearest_mode);
    else
        gie_resize<long long, kNhwc>(x, y, N, C, H, W, OH, OW, scale_h, scale_w, mode,
                                     coordinate_mode, nearest_mode);
}

extern "C" __global__ void __launch_bounds__(GIE_RESIZE_THREADS)
gie_resize_nchw_f32(const float* x, float* y, int N, int C, int H, int W, int OH, int OW,
                    float scale_h, float scale_w, int mode, int coordinate_mode,
                    int nearest_mode) {
    gie_resize_any<false>(x, y, N, C, H, W, OH, OW, scale_h, scale_w, mode, coordinate_mode,
                          nearest_mode);
}

extern "C" __global__ void __launch_bounds__(GIE_RESIZE_THREADS)
gie_resize_nchw_f16(const gie_half* x, gie_half* y, int N, int C, int H, int W, int OH, int OW,
                    float scale_h, float scale_w, int mode, int coordinate_mode,
                    int nearest_mode) {
    gie_resize_any<false>(x, y, N, C, H, W, OH, OW, scale_h, scale_w, mode, coordinate_mode,
                          nearest_mode);
}

extern "C" __global__ void __launch_bounds__(GIE_RESIZE_THREADS)
gie_resize_nhwc_f32(const float* x, float* y, int N, int C, int H, int W, int OH, int OW,
                    float scale_h, float scale_w, int mode, int coordinate_mode,
                    int nearest_mode) {
    gie_resize_any<true>(x, y, N, C, H, W, OH, OW, scale_h, scale_w, mode, coordinate_mode,
                         nearest_mode);
}

extern "C" __global__ void __launch_bounds__(GIE_RESIZE_THREADS)
gie_resize_nhwc_f16(const gie_half* x, gie_half* y, int N, int C, int H, int W, int OH, int OW,
                    float scale_h, float scale_w, int mode, int coordinate_mode,
                    int nearest_mode) {
    gie_resize_any<true>(x, y, N, C, H, W, OH, OW, scale_h, scale_w, mode, coordinate_mode,
                         nearest_mode);
}
