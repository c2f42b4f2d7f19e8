// Data-movement kernels: Transpose, Slice, Concat, Gather and the im2col of an im2col + GEMM
// convolution. Every copy moves bits and never looks at the values, so the copies are generic
// over the element WIDTH, not the dtype:
//
//   suffix  element type          NumPy buffer the shim / launcher expects (pass x.view(...))
//   _b1     unsigned char         uint8   (int8, uint8, bool)
//   _b2     unsigned short        uint16  (float16, bfloat16, int16)
//   _b4     unsigned              uint32  (float32, int32)
//   _b8     unsigned long long    uint64  (float64, int64)
//
// The lowering re-types a buffer to that unsigned dtype (lower_data_movement.as_bits, same
// bytes); NumPy / CuPy callers pass x.view(np.uint32) etc.; a raw DevicePointer needs nothing.
// im2col (values, zero padding) is typed: _f32 / _f16 (gie_half; zeros are +0.0).
//
// Ranks up to 6 are passed as scalars (no device-side metadata): the host pads the dims to 6
// with leading 1s (and may first merge axes that are contiguous in both tensors).
//
//   gie_transpose_bW(x, y, n, d1..d5, s0..s5)
//   gie_slice_bW(x, y, n, offset, d1..d5, s0..s5)
//       y is contiguous with dims [d0, d1, ..., d5] (d0 = n / (d1 * ... * d5), so it is not
//       passed) and y[c0, ..., c5] = x[offset + c0 * s0 + ... + c5 * s5]. Element strides, any
//       sign:
//       * Transpose(perm): output dim k = in_dim[perm[k]], s_k = in_stride[perm[k]], offset 0;
//       * Slice(starts, ends, axes, steps): output dim k = len(range(start_k, end_k, step_k))
//         after ONNX clamping, s_k = step_k * in_stride[k], offset = sum start_k * in_stride[k]
//         (steps may be negative; then offset points at the first, i.e. highest, element);
//       * the same kernel with zero strides is Expand / a broadcast copy.
//   gie_concat_bW(x, y, outer, slab, row, offset)
//       one launch per Concat input: x viewed as [outer, slab] (slab = extent_in * inner) goes to
//       y viewed as [outer, row] (row = extent_out * inner) at column offset (= the input's
//       start along the axis * inner): y[o * row + offset + r] = x[o * slab + r].
//   gie_gather_bW(x, indices, y, outer, axis_dim, count, inner)
//       ONNX Gather(axis): x is [outer, axis_dim, inner], indices int64 [count] (any shape,
//       flattened), y is [outer, count, inner], y[o, j, k] = x[o, idx_j, k] with idx_j =
//       indices[j] + axis_dim when negative. Indices still outside [0, axis_dim) (an error in
//       ONNX, where the reference raises) are clamped so the kernel never reads out of bounds.
//   gie_im2col_nhwc_f32 / _f16(x, col, N, H, W, C, KH, KW, OH, OW, stride_h, stride_w, pad_h,
//                              pad_w, dil_h, dil_w, c_begin, c_count, ld)
//       x NHWC [N, H, W, C]; col row-major [N * OH * OW, ld], row (n, oh, ow), column
//       (r * KW + s) * c_count + c, i.e. (r, s, c) with c the fastest, K = KH * KW * c_count:
//       col[row, (r, s, c)] = x[n, oh * stride_h - pad_h + r * dil_h,
//                                  ow * stride_w - pad_w + s * dil_w, c_begin + c]
//       or 0 outside the image; columns K <= k < ld (ld >= K, e.g. K rounded up to 8 for a
//       16-byte aligned cuBLAS leading dimension) are written as 0. Channel window
//       [c_begin, c_begin + c_count) is one group of a grouped convolution (0, C otherwise).
//       The GEMM is then col [M, K] x W^T with W as KRSC [K_out, KH, KW, c_count].
//
// Launch (all kernels): a grid-stride loop over the output elements (memory order), 1-D grid
// and block, any grid is correct; at most GIE_DM_THREADS (256) threads per block
// (__launch_bounds__), 256 x min(ceil(n / 256), 4096) usual (lower_data_movement.blocks_for),
// grid x block <= 2^31. Index math runs in 32 bits when the element count fits (< 2^31), else in
// 64 bits. Stores are coalesced; transpose loads are gathers (for the NCHW <-> NHWC case the
// tiled kernels in reformat.cu are faster). Not vectorized yet.
#include "gie_prelude.cuh"

#define GIE_DM_THREADS 256  // the most threads per block a launch may use (__launch_bounds__)

// --------------------------------------------------------------------------- strided copy

// One coordinate step: peel the fastest remaining axis off r and add its stride (skipped for
// dims of 1, the padding, so a low-rank copy does no divisions for them).
template <typename I>
GIE_DEVICE long long gie_dm_axis(I& r, I dim, long long stride) {
    if (dim == 1) return 0;
    const I q = r / dim;
    const I c = r - q * dim;
    r = q;
    return (long long)c * stride;
}

template <typename I, typename T>
__device__ void gie_dm_strided(const T* __restrict__ x, T* __restrict__ y, long long n,
                               long long offset, I d1, I d2, I d3, I d4, I d5, long long s0,
                               long long s1, long long s2, long long s3, long long s4,
                               long long s5) {
    const I total = (I)n;
    const I step = (I)blockDim.x * (I)gridDim.x;
    for (I i = (I)blockIdx.x * (I)blockDim.x + (I)threadIdx.x; i < total; i += step) {
        I r = i;
        long long source = offset;
        source += gie_dm_axis<I>(r, d5, s5);
        source += gie_dm_axis<I>(r, d4, s4);
        source += gie_dm_axis<I>(r, d3, s3);
        source += gie_dm_axis<I>(r, d2, s2);
        source += gie_dm_axis<I>(r, d1, s1);
        source += (long long)r * s0;
        y[i] = x[source];
    }
}

template <typename T>
__device__ void gie_dm_strided_copy(const T* x, T* y, long long n, long long offset,
                                    long long d1, long long d2, long long d3, long long d4,
                                    long long d5, long long s0, long long s1, long long s2,
                                    long long s3, long long s4, long long s5) {
    if (n <= 0x7fffffffLL)
        gie_dm_strided<unsigned>(x, y, n, offset, (unsigned)d1, (unsigned)d2, (unsigned)d3,
                                 (unsigned)d4, (unsigned)d5, s0, s1, s2, s3, s4, s5);
    else
        gie_dm_strided<long long>(x, y, n, offset, d1, d2, d3, d4, d5, s0, s1, s2, s3, s4, s5);
}

// --------------------------------------------------------------------------- concat

template <typename I, typename T>
__device__ void gie_dm_concat(const T* __restrict__ x, T* __restrict__ y, long long outer,
                              I slab, long long row, long long offset) {
    const I total = (I)(outer * (long long)slab);
    const I step = (I)blockDim.x * (I)gridDim.x;
    for (I i = (I)blockIdx.x * (I)blockDim.x + (I)threadIdx.x; i < total; i += step) {
        const I o = i / slab;
        const I r = i - o * slab;
        y[(long long)o * row + offset + (long long)r] = x[i];
    }
}

template <typename T>
__device__ void gie_dm_concat_any(const T* x, T* y, long long outer, long long slab,
                                  long long row, long long offset) {
    if (outer * slab <= 0x7fffffffLL)
        gie_dm_concat<unsigned>(x, y, outer, (unsigned)slab, row, offset);
    else
        gie_dm_concat<long long>(x, y, outer, slab, row, offset);
}

// --------------------------------------------------------------------------- gather

template <typename I, typename T>
__device__ void gie_dm_gather(const T* __restrict__ x, const long long* __restrict__ indices,
                              T* __restrict__ y, long long outer, long long axis_dim, I count,
                              I inner) {
    const I total = (I)(outer * (long long)count * (long long)inner);
    if (axis_dim <= 0) return;  // no valid index at all (an ONNX error): write nothing
    const I step = (I)blockDim.x * (I)gridDim.x;
    for (I i = (I)blockIdx.x * (I)blockDim.x + (I)threadIdx.x; i < total; i += step) {
        const I oj = i / inner;
        const I k = i - oj * inner;
        const I o = oj / count;
        const I j = oj - o * count;
        long long index = indices[j];
        if (index < 0) index += axis_dim;
        index = index < 0 ? 0 : (index >= axis_dim ? axis_dim - 1 : index);
        y[i] = x[((long long)o * axis_dim + index) * (long long)inner + (long long)k];
    }
}

template <typename T>
__device__ void gie_dm_gather_any(const T* x, const long long* indices, T* y, long long outer,
                                  long long axis_dim, long long count, long long inner) {
    if (outer * count * inner <= 0x7fffffffLL)
        gie_dm_gather<unsigned>(x, indices, y, outer, axis_dim, (unsigned)count,
                                (unsigned)inner);
    else
        gie_dm_gather<long long>(x, indices, y, outer, axis_dim, count, inner);
}

// --------------------------------------------------------------------------- entries

// ---- b1: unsigned char
extern "C" __global__ void __launch_bounds__(GIE_DM_THREADS)
gie_transpose_b1(const unsigned char* x, unsigned char* y, long long n, long long d1, long long d2, long long d3,
    long long d4, long long d5, long long s0, long long s1, long long s2, long long s3,
    long long s4, long long s5) {
    gie_dm_strided_copy(x, y, n, 0LL, d1, d2, d3, d4, d5, s0, s1, s2, s3, s4, s5);
}

extern "C" __global__ void __launch_bounds__(GIE_DM_THREADS)
gie_slice_b1(const unsigned char* x, unsigned char* y, long long n, long long offset, long long d1, long long d2,
    long long d3, long long d4, long long d5, long long s0, long long s1, long long s2,
    long long s3, long long s4, long long s5) {
    gie_dm_strided_copy(x, y, n, offset, d1, d2, d3, d4, d5, s0, s1, s2, s3, s4, s5);
}

extern "C" __global__ void __launch_bounds__(GIE_DM_THREADS)
gie_concat_b1(const unsigned char* x, unsigned char* y, long long outer, long long slab, long long row,
    long long offset) {
    gie_dm_concat_any(x, y, outer, slab, row, offset);
}

extern "C" __global__ void __launch_bounds__(GIE_DM_THREADS)
gie_gather_b1(const unsigned char* x, const long long* indices, unsigned char* y, long long outer,
    long long axis_dim, long long count, long long inner) {
    gie_dm_gather_any(x, indices, y, outer, axis_dim, count, inner);
}

// ---- b2: unsigned short
extern "C" __global__ void __launch_bounds__(GIE_DM_THREADS)
gie_transpose_b2(const unsigned short* x, unsigned short* y, long long n, long long d1, long long d2, long long d3,
    long long d4, long long d5, long long s0, long long s1, long long s2, long long s3,
    long long s4, long long s5) {
    gie_dm_strided_copy(x, y, n, 0LL, d1, d2, d3, d4, d5, s0, s1, s2, s3, s4, s5);
}

extern "C" __global__ void __launch_bounds__(GIE_DM_THREADS)
gie_slice_b2(const unsigned short* x, unsigned short* y, long long n, long long offset, long long d1, long long d2,
    long long d3, long long d4, long long d5, long long s0, long long s1, long long s2,
    long long s3, long long s4, long long s5) {
    gie_dm_strided_copy(x, y, n, offset, d1, d2, d3, d4, d5, s0, s1, s2, s3, s4, s5);
}

extern "C" __global__ void __launch_bounds__(GIE_DM_THREADS)
gie_concat_b2(const unsigned short* x, unsigned short* y, long long outer, long long slab, long long row,
    long long offset) {
    gie_dm_concat_any(x, y, outer, slab, row, offset);
}

extern "C" __global__ void __launch_bounds__(GIE_DM_THREADS)
gie_gather_b2(const unsigned short* x, const long long* indices, unsigned short* y, long long outer,
    long long axis_dim, long long count, long long inner) {
    gie_dm_gather_any(x, indices, y, outer, axis_dim, count, inner);
}

// ---- b4: unsigned
extern "C" __global__ void __launch_bounds__(GIE_DM_THREADS)
gie_transpose_b4(const unsigned* x, unsigned* y, long long n, long long d1, long long d2, long long d3,
    long long d4, long long d5, long long s0, long long s1, long long s2, long long s3,
    long long s4, long long s5) {
    gie_dm_strided_copy(x, y, n, 0LL, d1, d2, d3, d4, d5, s0, s1, s2, s3, s4, s5);
}

extern "C" __global__ void __launch_bounds__(GIE_DM_THREADS)
gie_slice_b4(const unsigned* x, unsigned* y, long long n, long long offset, long long d1, long long d2,
    long long d3, long long d4, long long d5, long long s0, long long s1, long long s2,
    long long s3, long long s4, long long s5) {
    gie_dm_strided_copy(x, y, n, offset, d1, d2, d3, d4, d5, s0, s1, s2, s3, s4, s5);
}

extern "C" __global__ void __launch_bounds__(GIE_DM_THREADS)
gie_concat_b4(const unsigned* x, unsigned* y, long long outer, long long slab, long long row,
    long long offset) {
    gie_dm_concat_any(x, y, outer, slab, row, offset);
}

extern "C" __global__ void __launch_bounds__(GIE_DM_THREADS)
gie_gather_b4(const unsigned* x, const long long* indices, unsigned* y, long long outer,
    long long axis_dim, long long count, long long inner) {
    gie_dm_gather_any(x, indices, y, outer, axis_dim, count, inner);
}

// ---- b8: unsigned long long
extern "C" __global__ void __launch_bounds__(GIE_DM_THREADS)
gie_transpose_b8(const unsigned long long* x, unsigned long long* y, long long n, long long d1, long long d2, long long d3,
    long long d4, long long d5, long long s0, long long s1, long long s2, long long s3,
    long long s4, long long s5) {
    gie_dm_strided_copy(x, y, n, 0LL, d1, d2, d3, d4, d5, s0, s1, s2, s3, s4, s5);
}

extern "C" __global__ void __launch_bounds__(GIE_DM_THREADS)
gie_slice_b8(const unsigned long long* x, unsigned long long* y, long long n, long long offset, long long d1, long long d2,
    long long d3, long long d4, long long d5, long long s0, long long s1, long long s2,
    long long s3, long long s4, long long s5) {
    gie_dm_strided_copy(x, y, n, offset, d1, d2, d3, d4, d5, s0, s1, s2, s3, s4, s5);
}

extern "C" __global__ void __launch_bounds__(GIE_DM_THREADS)
gie_concat_b8(const unsigned long long* x, unsigned long long* y, long long outer, long long slab, long long row,
    long long offset) {
    gie_dm_concat_any(x, y, outer, slab, row, offset);
}

extern "C" __global__ void __launch_bounds__(GIE_DM_THREADS)
gie_gather_b8(const unsigned long long* x, const long long* indices, unsigned long long* y, long long outer,
    long long axis_dim, long long count, long long inner) {
    gie_dm_gather_any(x, indices, y, outer, axis_dim, count, inner);
}

// --------------------------------------------------------------------------- im2col (NHWC)

GIE_DEVICE float gie_dm_zero(const float*) { return 0.0f; }
GIE_DEVICE gie_half gie_dm_zero(const gie_half*) { return gie_f2h(0.0f); }

template <typename I, typename T>
__device__ void gie_dm_im2col(const T* __restrict__ x, T* __restrict__ col, int N, int H, int W,
                              int C, int KH, int KW, int OH, int OW, int stride_h,
                              int stride_w, int pad_h, int pad_w, int dil_h, int dil_w,
                              int c_begin, int c_count, I ld) {
    const I K = (I)KH * (I)KW * (I)c_count;
    const I total = (I)((long long)N * OH * OW * (long long)ld);
    const I step = (I)blockDim.x * (I)gridDim.x;
    for (I i = (I)blockIdx.x * (I)blockDim.x + (I)threadIdx.x; i < total; i += step) {
        const I row = i / ld;
        const I k = i - row * ld;
        T value = gie_dm_zero(col);
        if (k < K) {
            const int c = (int)(k % (I)c_count);
            const int rs = (int)(k / (I)c_count);
            const int r = rs / KW;
            const int s = rs - r * KW;
            const int ow = (int)(row % (I)OW);
            const I nh = row / (I)OW;
            const int oh = (int)(nh % (I)OH);
            const int n = (int)(nh / (I)OH);
            const int h = oh * stride_h - pad_h + r * dil_h;
            const int w = ow * stride_w - pad_w + s * dil_w;
            if (h >= 0 && h < H && w >= 0 && w < W)
                value = x[(((long long)n * H + h) * W + w) * C + c_begin + c];
        }
        col[i] = value;
    }
}

template <typename T>
__device__ void gie_dm_im2col_any(const T* x, T* col, int N, int H, int W, int C, int KH,
                                  int KW, int OH, int OW, int stride_h, int stride_w, int pad_h,
                                  int pad_w, int dil_h, int dil_w, int c_begin, int c_count,
                                  long long ld) {
    if ((long long)N * OH * OW * ld <= 0x7fffffffLL)
        gie_dm_im2col<unsigned>(x, col, N, H, W, C, KH, KW, OH, OW, stride_h, stride_w, pad_h,
                                pad_w, dil_h, dil_w, c_begin, c_count, (unsigned)ld);
    else
        gie_dm_im2col<long long>(x, col, N, H, W, C, KH, KW, OH, OW, stride_h, stride_w, pad_h,
                                 pad_w, dil_h, dil_w, c_begin, c_count, ld);
}

extern "C" __global__ void __launch_bounds__(GIE_DM_THREADS)
gie_im2col_nhwc_f32(const float* x, float* col, int N, int H, int W, int C, int KH, int KW, int OH,
    int OW, int stride_h, int stride_w, int pad_h, int pad_w, int dil_h, int dil_w,
    int c_begin, int c_count, long long ld) {
    gie_dm_im2col_any(x, col, N, H, W, C, KH, KW, OH, OW, stride_h, stride_w, pad_h, pad_w,
                      dil_h, dil_w, c_begin, c_count, ld);
}

extern "C" __global__ void __launch_bounds__(GIE_DM_THREADS)
gie_im2col_nhwc_f16(const gie_half* x, gie_half* col, int N, int H, int W, int C, int KH, int KW, int OH,
    int OW, int stride_h, int stride_w, int pad_h, int pad_w, int dil_h, int dil_w,
    int c_begin, int c_count, long long ld) {
    gie_dm_im2col_any(x, col, N, H, W, C, KH, KW, OH, OW, stride_h, stride_w, pad_h, pad_w,
                      dil_h, dil_w, c_begin, c_count, ld);
}
