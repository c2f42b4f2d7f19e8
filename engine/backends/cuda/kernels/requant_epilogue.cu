// The int8 layers' requantizing epilogue on an int32 accumulator computed elsewhere (cuBLAS
// gemmEx with int8 inputs and int32 output): exactly gemm_int8.cu's epilogue, so cuBLAS int8
// tactics stay bit-exact with engine/ops/gie_quant.py:
//   total = saturate_int32(acc[m, n] + bias[n])           (bias nullable)
//   real  = float32(total) * float32(x_scale * w_scale[n * w_scale_stride])
//   real  = act(real + residual) or act(real) + residual  (residual float32 [M, N], nullable)
//   C     = int8 saturate(rintf(real / y_scale)) (_s8), real (_f32) or float16(real) (_f16).
// acc, residual and C are row-major [M, N] (contiguous). Grid-stride loop: any launch shape is
// correct; 256 threads x min(ceil(M * N / 256), 4096) blocks usual.
#include "gie_prelude.cuh"

template <typename Out>
__device__ void requant(const int* __restrict__ acc, const int* __restrict__ bias,
                        const float* __restrict__ w_scale, const float* __restrict__ residual,
                        Out* __restrict__ C, int M, int N, float x_scale, int w_scale_stride,
                        float y_scale, int activation, float alpha, float beta,
                        int residual_first) {
    const long long total = (long long)M * N;
    const long long stride = (long long)blockDim.x * gridDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) {
        const int c = (int)(i % N);
        const int sum = bias != nullptr ? gie_add_sat_s32(acc[i], bias[c]) : acc[i];
        float real = gie_dequant_acc(sum, x_scale, w_scale[c * w_scale_stride]);
        if (residual == nullptr) {
            real = gie_activate(real, activation, alpha, beta);
        } else {
            real = residual_first ? gie_activate(real + residual[i], activation, alpha, beta)
                                  : gie_activate(real, activation, alpha, beta) + residual[i];
        }
        gie_store_q(C + i, real, y_scale);
    }
}

extern "C" __global__ void gie_requant_s8(const int* acc, const int* bias, const float* w_scale,
                                          const float* residual, signed char* C, int M, int N,
                                          float x_scale, int w_scale_stride, float y_scale,
                                          int activation, float alpha, float beta,
                                          int residual_first) {
    requant(acc, bias, w_scale, residual, C, M, N, x_scale, w_scale_stride, y_scale, activation,
            alpha, beta, residual_first);
}

extern "C" __global__ void gie_requant_f32(const int* acc, const int* bias, const float* w_scale,
                                           const float* residual, float* C, int M, int N,
                                           float x_scale, int w_scale_stride, float y_scale,
                                           int activation, float alpha, float beta,
                                           int residual_first) {
    requant(acc, bias, w_scale, residual, C, M, N, x_scale, w_scale_stride, y_scale, activation,
            alpha, beta, residual_first);
}

extern "C" __global__ void gie_requant_f16(const int* acc, const int* bias, const float* w_scale,
                                           const float* residual, gie_half* C, int M, int N,
                                           float x_scale, int w_scale_stride, float y_scale,
                                           int activation, float alpha, float beta,
                                           int residual_first) {
    requant(acc, bias, w_scale, residual, C, M, N, x_scale, w_scale_stride, y_scale, activation,
            alpha, beta, residual_first);
}
