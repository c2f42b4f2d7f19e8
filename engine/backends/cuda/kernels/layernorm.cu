// LayerNorm over the last axis of a row-major [rows, cols] tensor, fp32 accumulation, as
// gie::LayerNorm(X, Scale, [Bias], [Residual]) -> Y, [S]:
//   s = x (+ residual, added in fp32); y = (s - mean(s)) / sqrt(var(s) + epsilon) * gamma + beta
// residual, gamma, beta and sum_out (S, the residual stream) are nullable (gamma = 1, beta = 0).
// One block per row (blockDim.x a multiple of 32); variance is the mean of squared deviations
// (two passes over the row).
#include "gie_prelude.cuh"

template <typename T>
__device__ float layernorm_input(const T* x, const T* residual, long long i) {
    return residual != nullptr ? gie_load(x + i) + gie_load(residual + i) : gie_load(x + i);
}

template <typename T>
__device__ void layernorm_rows(const T* __restrict__ x, const T* __restrict__ residual,
                               const T* __restrict__ gamma, const T* __restrict__ beta,
                               T* __restrict__ y, T* __restrict__ sum_out, int rows, int cols,
                               float epsilon) {
    __shared__ float scratch[32];
    for (int row = blockIdx.x; row < rows; row += gridDim.x) {
        const long long base = (long long)row * cols;
        float local = 0.0f;
        for (int c = threadIdx.x; c < cols; c += blockDim.x)
            local += layernorm_input(x, residual, base + c);
        const float mean = gie_block_sum(local, scratch) / cols;
        local = 0.0f;
        for (int c = threadIdx.x; c < cols; c += blockDim.x) {
            const float centered = layernorm_input(x, residual, base + c) - mean;
            local += centered * centered;
        }
        const float inverse_std = rsqrtf(gie_block_sum(local, scratch) / cols + epsilon);
        for (int c = threadIdx.x; c < cols; c += blockDim.x) {
            const float sum = layernorm_input(x, residual, base + c);
            if (sum_out != nullptr) gie_store(sum_out + base + c, sum);
            float value = (sum - mean) * inverse_std;
            if (gamma != nullptr) value *= gie_load(gamma + c);
            if (beta != nullptr) value += gie_load(beta + c);
            gie_store(y + base + c, value);
        }
    }
}

extern "C" __global__ void gie_layernorm_f32(const float* x, const float* residual,
                                             const float* gamma, const float* beta, float* y,
                                             float* sum_out, int rows, int cols, float epsilon) {
    layernorm_rows(x, residual, gamma, beta, y, sum_out, rows, cols, epsilon);
}

extern "C" __global__ void gie_layernorm_f16(const gie_half* x, const gie_half* residual,
                                             const gie_half* gamma, const gie_half* beta,
                                             gie_half* y, gie_half* sum_out, int rows, int cols,
                                             float epsilon) {
    layernorm_rows(x, residual, gamma, beta, y, sum_out, rows, cols, epsilon);
}
