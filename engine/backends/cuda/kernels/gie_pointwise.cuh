// gie_pointwise.cuh: helpers of the kernels generated from gie::Pointwise expressions
// (engine/backends/cuda/pointwise_codegen.py). Overloaded for float and double math; max/min
// propagate NaN like np.maximum/np.minimum; loads widen fp16 to float, stores round once.
#pragma once
#include "gie_prelude.cuh"

#define GIE_PW __device__ __forceinline__

template <typename F>
GIE_PW F gie_pw_max(F a, F b) { return (a != a || a > b) ? a : b; }
template <typename F>
GIE_PW F gie_pw_min(F a, F b) { return (a != a || a < b) ? a : b; }
GIE_PW float gie_pw_sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }
GIE_PW double gie_pw_sigmoid(double x) { return 1.0 / (1.0 + exp(-x)); }
template <typename F>
GIE_PW F gie_pw_relu(F x) { return x > F(0) ? x : (x != x ? x : F(0)); }
GIE_PW float gie_pw_softplus(float x) { return fmaxf(x, 0.0f) + log1pf(expf(-fabsf(x))); }
GIE_PW double gie_pw_softplus(double x) { return fmax(x, 0.0) + log1p(exp(-fabs(x))); }
template <typename F>
GIE_PW F gie_pw_clip(F x, F lo, F hi) { return gie_pw_min(gie_pw_max(x, lo), hi); }
template <typename F>
GIE_PW F gie_pw_hard_swish(F x) { return x * gie_pw_clip(x / F(6) + F(0.5), F(0), F(1)); }
template <typename F>
GIE_PW F gie_pw_leaky_relu(F x, F alpha) { return x >= F(0) ? x : x * alpha; }
template <typename F>
GIE_PW F gie_pw_hard_sigmoid(F x, F alpha, F beta) {
    return gie_pw_clip(x * alpha + beta, F(0), F(1));
}

GIE_PW float gie_pw_load(const float* p) { return *p; }
GIE_PW float gie_pw_load(const gie_half* p) { return gie_h2f(*p); }
GIE_PW double gie_pw_load(const double* p) { return *p; }
// Integer storage (Cast to float): converted once, rounding to nearest like ndarray.astype.
GIE_PW float gie_pw_load(const long long* p) { return (float)*p; }
GIE_PW float gie_pw_load(const int* p) { return (float)*p; }
GIE_PW float gie_pw_load(const signed char* p) { return (float)*p; }
GIE_PW float gie_pw_load(const unsigned char* p) { return (float)*p; }
GIE_PW void gie_pw_store(float* p, double v) { *p = (float)v; }
GIE_PW void gie_pw_store(float* p, float v) { *p = v; }
GIE_PW void gie_pw_store(gie_half* p, float v) { *p = gie_f2h(v); }
GIE_PW void gie_pw_store(gie_half* p, double v) { *p = gie_f2h((float)v); }
GIE_PW void gie_pw_store(double* p, double v) { *p = v; }
GIE_PW void gie_pw_store(double* p, float v) { *p = v; }
