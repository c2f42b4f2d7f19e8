// Pooling over NHWC tensors: max pool, average pool (count_include_pad 0/1) and global average
// pool; fp32 and fp16 storage, fp32 math.
//
// Windowed pools: x [N, H, W, C] -> y [N, OH, OW, C]. Output (oh, ow) reads the taps
//   ih = oh * stride_h - pad_top + r * dil_h,  iw = ow * stride_w - pad_left + s * dil_w
// for r < KH, s < KW. OH, OW come from the host (ceil_mode, auto_pad and the end pads grown by
// ceil mode are resolved there, engine.ops.conv.window_geometry); taps outside the input are
// skipped. MaxPool: the max of the taps inside the input (-inf when none; NaN propagates like
// np.maximum). AveragePool: the sum of the taps inside the input divided by max(count, 1), count
// = the taps inside the input (count_include_pad = 0) or inside the input grown by the declared
// pads pad_top/pad_left/pad_bottom/pad_right (count_include_pad = 1; extra end padding from
// ceil mode is not counted), exactly as engine/ops/pool.py. The sum runs filter column by filter
// column (rows within a column first) like the reference, so fp32 results match it bit for bit.
// One thread per output element, channel fastest (coalesced along C). Launch: any grid
// (grid-stride loop), 256 threads usual.
//
// Global average pool: x [N, H, W, C] -> y [N, C] (= [N, 1, 1, C]), mean over H * W in fp32.
// Block (32, 8): threadIdx.x picks the channel (blockIdx.x * 32 + threadIdx.x, coalesced),
// threadIdx.y strides over the H * W pixels, a shared-memory reduction adds the 8 partial sums.
// Launch: grid (ceil(C / 32), N), block exactly (32, 8) (the partial sums are 8 x 32).
#include "gie_prelude.cuh"

#ifdef GIE_CPU_SHIM
#define GIE_POOL_NEG_INF (-HUGE_VALF)
#else
#define GIE_POOL_NEG_INF __int_as_float(0xff800000)
#endif

// (n, oh, ow, c) of output element i of [N, OH, OW, C]; returns the input image offset of n.
struct PoolIndex {
    long long image;
    int ih0, iw0, c;
};

GIE_DEVICE PoolIndex pool_index(long long i, int H, int W, int C, int OH, int OW, int stride_h,
                                int stride_w, int pad_top, int pad_left) {
    PoolIndex at;
    at.c = (int)(i % C);
    long long rest = i / C;
    const int ow = (int)(rest % OW);
    rest /= OW;
    const int oh = (int)(rest % OH);
    const long long n = rest / OH;
    at.image = n * H * W * C;
    at.ih0 = oh * stride_h - pad_top;
    at.iw0 = ow * stride_w - pad_left;
    return at;
}

template <typename T>
__device__ void max_pool(const T* __restrict__ x, T* __restrict__ y, int N, int H, int W, int C,
                         int OH, int OW, int KH, int KW, int stride_h, int stride_w, int pad_top,
                         int pad_left, int dil_h, int dil_w) {
    const long long total = (long long)N * OH * OW * C;
    const long long step = (long long)blockDim.x * gridDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += step) {
        const PoolIndex at =
            pool_index(i, H, W, C, OH, OW, stride_h, stride_w, pad_top, pad_left);
        float best = GIE_POOL_NEG_INF;
        for (int r = 0; r < KH; ++r) {
            const int ih = at.ih0 + r * dil_h;
            if (ih < 0 || ih >= H) continue;
            for (int s = 0; s < KW; ++s) {
                const int iw = at.iw0 + s * dil_w;
                if (iw < 0 || iw >= W) continue;
                const float value = gie_load(x + at.image + ((long long)ih * W + iw) * C + at.c);
                // value != value: NaN wins (and stays), as np.maximum.
                if (value > best || value != value) best = value;
            }
        }
        gie_store(y + i, best);
    }
}

// Taps of a window starting at `start` (stride dil) inside [low, high).
GIE_DEVICE int pool_taps_inside(int start, int taps, int dil, int low, int high) {
    int count = 0;
    for (int t = 0; t < taps; ++t) {
        const int at = start + t * dil;
        count += (at >= low && at < high) ? 1 : 0;
    }
    return count;
}

template <typename T>
__device__ void average_pool(const T* __restrict__ x, T* __restrict__ y, int N, int H, int W,
                             int C, int OH, int OW, int KH, int KW, int stride_h, int stride_w,
                             int pad_top, int pad_left, int pad_bottom, int pad_right,
                             int dil_h, int dil_w, int count_include_pad) {
    const long long total = (long long)N * OH * OW * C;
    const long long step = (long long)blockDim.x * gridDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += step) {
        const PoolIndex at =
            pool_index(i, H, W, C, OH, OW, stride_h, stride_w, pad_top, pad_left);
        float sum = 0.0f;
        for (int s = 0; s < KW; ++s) {
            const int iw = at.iw0 + s * dil_w;
            if (iw < 0 || iw >= W) continue;
            float column = 0.0f;
            for (int r = 0; r < KH; ++r) {
                const int ih = at.ih0 + r * dil_h;
                if (ih < 0 || ih >= H) continue;
                column += gie_load(x + at.image + ((long long)ih * W + iw) * C + at.c);
            }
            sum += column;
        }
        const int rows = count_include_pad
                             ? pool_taps_inside(at.ih0, KH, dil_h, -pad_top, H + pad_bottom)
                             : pool_taps_inside(at.ih0, KH, dil_h, 0, H);
        const int cols = count_include_pad
                             ? pool_taps_inside(at.iw0, KW, dil_w, -pad_left, W + pad_right)
                             : pool_taps_inside(at.iw0, KW, dil_w, 0, W);
        const int count = rows * cols;
        gie_store(y + i, sum / (float)(count > 1 ? count : 1));
    }
}

template <typename T>
__device__ void global_average_pool(const T* __restrict__ x, T* __restrict__ y, int H, int W,
                                    int C) {
    __shared__ float partial[8][33];
    const int c = blockIdx.x * 32 + threadIdx.x;
    const long long n = blockIdx.y;
    const int pixels = H * W;
    float sum = 0.0f;
    if (c < C)
        for (int p = threadIdx.y; p < pixels; p += blockDim.y)
            sum += gie_load(x + (n * pixels + p) * C + c);
    partial[threadIdx.y][threadIdx.x] = sum;
    __syncthreads();
    if (threadIdx.y == 0 && c < C) {
        float total = 0.0f;
        for (int j = 0; j < (int)blockDim.y; ++j) total += partial[j][threadIdx.x];
        gie_store(y + n * C + c, total / (float)pixels);
    }
}

extern "C" __global__ void gie_max_pool_f32(const float* x, float* y, int N, int H, int W, int C,
                                            int OH, int OW, int KH, int KW, int stride_h,
                                            int stride_w, int pad_top, int pad_left, int dil_h,
                                            int dil_w) {
    max_pool(x, y, N, H, W, C, OH, OW, KH, KW, stride_h, stride_w, pad_top, pad_left, dil_h,
             dil_w);
}

extern "C" __global__ void gie_max_pool_f16(const gie_half* x, gie_half* y, int N, int H, int W,
                                            int C, int OH, int OW, int KH, int KW, int stride_h,
                                            int stride_w, int pad_top, int pad_left, int dil_h,
                                            int dil_w) {
    max_pool(x, y, N, H, W, C, OH, OW, KH, KW, stride_h, stride_w, pad_top, pad_left, dil_h,
             dil_w);
}

extern "C" __global__ void gie_average_pool_f32(const float* x, float* y, int N, int H, int W,
                                                int C, int OH, int OW, int KH, int KW,
                                                int stride_h, int stride_w, int pad_top,
                                                int pad_left, int pad_bottom, int pad_right,
                                                int dil_h, int dil_w, int count_include_pad) {
    average_pool(x, y, N, H, W, C, OH, OW, KH, KW, stride_h, stride_w, pad_top, pad_left,
                 pad_bottom, pad_right, dil_h, dil_w, count_include_pad);
}

extern "C" __global__ void gie_average_pool_f16(const gie_half* x, gie_half* y, int N, int H,
                                                int W, int C, int OH, int OW, int KH, int KW,
                                                int stride_h, int stride_w, int pad_top,
                                                int pad_left, int pad_bottom, int pad_right,
                                                int dil_h, int dil_w, int count_include_pad) {
    average_pool(x, y, N, H, W, C, OH, OW, KH, KW, stride_h, stride_w, pad_top, pad_left,
                 pad_bottom, pad_right, dil_h, dil_w, count_include_pad);
}

extern "C" __global__ void __launch_bounds__(256)
gie_global_average_pool_f32(const float* x, float* y, int H, int W, int C) {
    global_average_pool(x, y, H, W, C);
}

extern "C" __global__ void __launch_bounds__(256)
gie_global_average_pool_f16(const gie_half* x, gie_half* y, int H, int W, int C) {
    global_average_pool(x, y, H, W, C);
}
