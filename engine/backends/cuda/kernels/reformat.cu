// Reformat kernels: the conversion layers of engine/build/reformat.py plus the layout changes
// around NHWC kernels. Every result is exact (bit for bit against NumPy / engine.quantize).
//
// Layout (fp32 and fp16; bits are copied, never converted):
//   gie_nchw_to_nhwc_*(x [N, C, HW], y [N, HW, C], N, C, HW)
//   gie_nhwc_to_nchw_*(x [N, HW, C], y [N, C, HW], N, C, HW)      (HW = H * W, or any inner size)
//   32 x 32 tiles through shared memory (one padding column), loads and stores both coalesced.
//   Launch: grid (ceil(HW / 32), ceil(C / 32), N), block (32, 8).
// Casts (Cast between float32 and float16): round to nearest even, overflow to +-inf, NaN kept,
//   as ndarray.astype:  gie_cast_f32_to_f16(x, y, n), gie_cast_f16_to_f32(x, y, n).
// int8 at a per-tensor scale (QuantizeLinear / DequantizeLinear with zero point 0, exactly
//   engine.quantize.qparams.quantize / dequantize):
//   gie_quantize_f32_s8 / _f16_s8(x, q, n, scale): q = saturate(rint(float32(x) / scale)) in
//     [-128, 127], ties to even (rintf), an IEEE division (not a multiply by 1 / scale), NaN -> 0,
//     +-inf -> 127 / -128.
//   gie_dequantize_s8_f32(q, y, n, scale): y = float32(q) * scale;
//   gie_dequantize_s8_f16(q, y, n, scale): float16(float32(q) * scale), i.e. DequantizeLinear
//     then Cast, the int8 -> fp16 path of reformat.py, in one pass.
// Elementwise kernels use a grid-stride loop: any grid is correct, 256 threads x
// ceil(n / 256) blocks (capped at a few per SM) usual. Not vectorized yet (float4 / half2).
#include "gie_prelude.cuh"

#define GIE_TILE 32
#define GIE_TILE_ROWS 8

// kToNhwc: x is [N, C, HW] and y [N, HW, C]; else x is [N, HW, C] and y [N, C, HW]. The tile is
// [c][hw] either way; the load runs along x's fastest axis, the store along y's.
template <bool kToNhwc, typename T>
__device__ void nchw_nhwc(const T* __restrict__ x, T* __restrict__ y, int C, int HW) {
    __shared__ T tile[GIE_TILE][GIE_TILE + 1];
    const int hw0 = blockIdx.x * GIE_TILE;
    const int c0 = blockIdx.y * GIE_TILE;
    const long long image = (long long)blockIdx.z * C * HW;
    const int tx = threadIdx.x;
    const int ty = threadIdx.y;
    if (kToNhwc) {
        for (int j = ty; j < GIE_TILE; j += GIE_TILE_ROWS) {
            const int c = c0 + j, hw = hw0 + tx;
            if (c < C && hw < HW) tile[j][tx] = x[image + (long long)c * HW + hw];
        }
        __syncthreads();
        for (int j = ty; j < GIE_TILE; j += GIE_TILE_ROWS) {
            const int hw = hw0 + j, c = c0 + tx;
            if (c < C && hw < HW) y[image + (long long)hw * C + c] = tile[tx][j];
        }
    } else {
        for (int j = ty; j < GIE_TILE; j += GIE_TILE_ROWS) {
            const int hw = hw0 + j, c = c0 + tx;
            if (c < C && hw < HW) tile[tx][j] = x[image + (long long)hw * C + c];
        }
        __syncthreads();
        for (int j = ty; j < GIE_TILE; j += GIE_TILE_ROWS) {
            const int c = c0 + j, hw = hw0 + tx;
            if (c < C && hw < HW) y[image + (long long)c * HW + hw] = tile[j][tx];
        }
    }
}

extern "C" __global__ void __launch_bounds__(GIE_TILE * GIE_TILE_ROWS)
gie_nchw_to_nhwc_f32(const float* x, float* y, int N, int C, int HW) {
    nchw_nhwc<true>(x, y, C, HW);
}

extern "C" __global__ void __launch_bounds__(GIE_TILE * GIE_TILE_ROWS)
gie_nchw_to_nhwc_f16(const gie_half* x, gie_half* y, int N, int C, int HW) {
    nchw_nhwc<true>(x, y, C, HW);
}

extern "C" __global__ void __launch_bounds__(GIE_TILE * GIE_TILE_ROWS)
gie_nhwc_to_nchw_f32(const float* x, float* y, int N, int C, int HW) {
    nchw_nhwc<false>(x, y, C, HW);
}

extern "C" __global__ void __launch_bounds__(GIE_TILE * GIE_TILE_ROWS)
gie_nhwc_to_nchw_f16(const gie_half* x, gie_half* y, int N, int C, int HW) {
    nchw_nhwc<false>(x, y, C, HW);
}

// --------------------------------------------------------------------------- casts

#define GIE_GRID_STRIDE(i, n)                                                              \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n);          \
         i += (long long)blockDim.x * gridDim.x)

extern "C" __global__ void gie_cast_f32_to_f16(const float* x, gie_half* y, long long n) {
    GIE_GRID_STRIDE(i, n) y[i] = gie_f2h(x[i]);
}

extern "C" __global__ void gie_cast_f16_to_f32(const gie_half* x, float* y, long long n) {
    GIE_GRID_STRIDE(i, n) y[i] = gie_h2f(x[i]);
}

// --------------------------------------------------------------------------- int8

// saturate(rint(value / scale)); NaN -> 0 (fminf/fmaxf would also give a number, but -128).
GIE_DEVICE signed char gie_quantize_s8(float value, float scale) {
    const float scaled = value / scale;
    if (scaled != scaled) return 0;
    return (signed char)fminf(fmaxf(rintf(scaled), -128.0f), 127.0f);
}

extern "C" __global__ void gie_quantize_f32_s8(const float* x, signed char* q, long long n,
                                               float scale) {
    GIE_GRID_STRIDE(i, n) q[i] = gie_quantize_s8(x[i], scale);
}

extern "C" __global__ void gie_quantize_f16_s8(const gie_half* x, signed char* q, long long n,
                                               float scale) {
    GIE_GRID_STRIDE(i, n) q[i] = gie_quantize_s8(gie_h2f(x[i]), scale);
}

extern "C" __global__ void gie_dequantize_s8_f32(const signed char* q, float* y, long long n,
                                                 float scale) {
    GIE_GRID_STRIDE(i, n) y[i] = (float)q[i] * scale;
}

extern "C" __global__ void gie_dequantize_s8_f16(const signed char* q, gie_half* y, long long n,
                                                 float scale) {
    GIE_GRID_STRIDE(i, n) y[i] = gie_f2h((float)q[i] * scale);
}
