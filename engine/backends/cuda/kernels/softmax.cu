// Row softmax over a row-major [rows, cols] tensor, fp32 accumulation: one block per row
// (blockDim.x a multiple of 32, 128 or 256 usual), three passes over the row (max, sum of
// exp, write), each thread striding over the columns.
#include "gie_prelude.cuh"

template <typename T>
__device__ void softmax_rows(const T* __restrict__ x, T* __restrict__ y, int rows, int cols) {
    __shared__ float scratch[32];
    for (int row = blockIdx.x; row < rows; row += gridDim.x) {
        const T* in = x + (long long)row * cols;
        T* out = y + (long long)row * cols;
        float local_max = -3.402823466e+38f;
        for (int c = threadIdx.x; c < cols; c += blockDim.x)
            local_max = fmaxf(local_max, gie_load(in + c));
        const float row_max = gie_block_max(local_max, scratch);
        float local_sum = 0.0f;
        for (int c = threadIdx.x; c < cols; c += blockDim.x)
            local_sum += expf(gie_load(in + c) - row_max);
        const float inverse = 1.0f / gie_block_sum(local_sum, scratch);
        for (int c = threadIdx.x; c < cols; c += blockDim.x)
            gie_store(out + c, expf(gie_load(in + c) - row_max) * inverse);
    }
}

extern "C" __global__ void gie_softmax_f32(const float* x, float* y, int rows, int cols) {
    softmax_rows(x, y, rows, cols);
}

extern "C" __global__ void gie_softmax_f16(const gie_half* x, gie_half* y, int rows, int cols) {
    softmax_rows(x, y, rows, cols);
}
