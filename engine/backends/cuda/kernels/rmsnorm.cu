// RMSNorm over the last axis of a row-major [rows, cols] tensor, fp32 accumulation, as
// gie::RMSNorm(X, Scale): y = x / sqrt(mean(x^2) + epsilon) * gamma (gamma nullable = 1).
// One block per row (blockDim.x a multiple of 32), two passes over the row.
#include "gie_prelude.cuh"

template <typename T>
__device__ void rmsnorm_rows(const T* __restrict__ x, const T* __restrict__ gamma,
                             T* __restrict__ y, int rows, int cols, float epsilon) {
    __shared__ float scratch[32];
    for (int row = blockIdx.x; row < rows; row += gridDim.x) {
        const long long base = (long long)row * cols;
        float local = 0.0f;
        for (int c = threadIdx.x; c < cols; c += blockDim.x) {
            const float value = gie_load(x + base + c);
            local += value * value;
        }
        const float inverse_rms = rsqrtf(gie_block_sum(local, scratch) / cols + epsilon);
        for (int c = threadIdx.x; c < cols; c += blockDim.x) {
            float value = gie_load(x + base + c) * inverse_rms;
            if (gamma != nullptr) value *= gie_load(gamma + c);
            gie_store(y + base + c, value);
        }
    }
}

extern "C" __global__ void gie_rmsnorm_f32(const float* x, const float* gamma, float* y, int rows,
                                           int cols, float epsilon) {
    rmsnorm_rows(x, gamma, y, rows, cols, epsilon);
}

extern "C" __global__ void gie_rmsnorm_f16(const gie_half* x, const gie_half* gamma, gie_half* y,
                                           int rows, int cols, float epsilon) {
    rmsnorm_rows(x, gamma, y, rows, cols, epsilon);
}
