// Bias + activation epilogue over a row-major [rows, cols] tensor (bias broadcast on the
// last axis, nullable): y = act(x + bias). With bias == nullptr it is a plain activation.
// Grid-stride loop; any launch shape is correct, 256 threads x ceil(n / 256) blocks is usual.
#include "gie_prelude.cuh"

template <typename T>
__device__ void bias_activation(const T* __restrict__ x, const T* __restrict__ bias,
                                T* __restrict__ y, long long rows, int cols, int activation,
                                float alpha, float beta) {
    const long long total = rows * (long long)cols;
    const long long stride = (long long)blockDim.x * gridDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) {
        float value = gie_load(x + i);
        if (bias != nullptr) value += gie_load(bias + i % cols);
        gie_store(y + i, gie_activate(value, activation, alpha, beta));
    }
}

extern "C" __global__ void gie_bias_act_f32(const float* x, const float* bias, float* y,
                                            long long rows, int cols, int activation,
                                            float alpha, float beta) {
    bias_activation(x, bias, y, rows, cols, activation, alpha, beta);
}

extern "C" __global__ void gie_bias_act_f16(const gie_half* x, const gie_half* bias, gie_half* y,
                                            long long rows, int cols, int activation,
                                            float alpha, float beta) {
    bias_activation(x, bias, y, rows, cols, activation, alpha, beta);
}
