// Keeps the prelude's not-yet-used tensor-core wrappers (int8 mma m16n8k32, 2:4 sparse
// mma.sp m16n8k32 f16) compiled for every architecture: one warp applies each to fragments
// read straight from global memory (32 lanes x 4 words in, 32 x 4 out). Not a real kernel;
// the int8 and sparse GEMM families (issue 9) replace it.
#include "gie_prelude.cuh"

extern "C" __global__ void gie_probe_mma_s8(const unsigned* fragments, int* out) {
    const int lane = threadIdx.x & 31;
    unsigned a[4], b[2];
    int c[4] = {0, 0, 0, 0}, d[4];
    for (int i = 0; i < 4; ++i) a[i] = fragments[lane * 4 + i];
    b[0] = fragments[128 + lane * 2];
    b[1] = fragments[128 + lane * 2 + 1];
    gie_mma_m16n8k32_s8_s32(d, a, b, c);
    for (int i = 0; i < 4; ++i) out[lane * 4 + i] = d[i];
}

extern "C" __global__ void gie_probe_mma_sp_f16(const unsigned* fragments, float* out) {
    const int lane = threadIdx.x & 31;
    unsigned a[4], b[4];
    float c[4] = {0.0f, 0.0f, 0.0f, 0.0f}, d[4];
    for (int i = 0; i < 4; ++i) a[i] = fragments[lane * 4 + i];
    for (int i = 0; i < 4; ++i) b[i] = fragments[128 + lane * 4 + i];
    gie_mma_sp_m16n8k32_f16_f32(d, a, b, c, fragments[256 + lane]);
    for (int i = 0; i < 4; ++i) out[lane * 4 + i] = d[i];
}
