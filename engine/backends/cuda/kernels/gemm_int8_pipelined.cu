// Pipelined int8 tensor-core GEMM (IMMA, mma.sync m16n8k32 s8 -> s32): the fast form of
// gemm_int8.cu for gie::QGemm with a constant weight, with its requantizing epilogue (bit-exact
// with engine/ops/gie_quant.py):
//   acc[m, n]  = sum_k A[m, k] * Bt[n, k]                     (exact int32)
//   acc        = saturate_int32(acc + bias[n])                 (bias int32, nullable)
//   real       = float32(acc) * float32(x_scale * w_scale[n])  (float32, no FMA contraction)
//   real       = act(real + residual) or act(real) + residual  (residual float32, nullable;
//                residual_first = 1: before the activation)
//   output     = int8 saturate(rintf(real / y_scale)) (_s8), real (_f32) or float16(real) (_f16).
//
// Layouts: A [M, K] int8 row-major (lda bytes per row); B given TRANSPOSED as Bt [N, K] int8
// row-major (ldb bytes per row; the lowering uploads the constant weight that way), so both
// operands are K-contiguous. C and residual [M, N] row-major (ldc elements). w_scale[n *
// w_scale_stride] (1: per channel, 0: per tensor).
//
// Tiles (-D macros): a block computes GIE_I8P_BM x GIE_I8P_BN of C (default 128 x 128) in K
// steps of GIE_I8P_BK bytes (default 64) with GIE_I8P_WARPS_M x GIE_I8P_WARPS_N warps (default
// 2 x 4 = 8 warps of 64 x 32). -D GIE_I8P_SMALL=1 selects 64 x 64 x 64 with 4 warps (2 x 2 of
// 32 x 32). Each warp holds (WM / 16) x (WN / 8) m16n8k32 int32 accumulators.
// Pipeline: GIE_I8P_STAGES (default 3) shared-memory stages filled by cp.async (16-byte chunks,
// one commit group per K tile, gie_cp_async_wait_group<STAGES - 2> before a tile is read, one
// __syncthreads per K tile). Fragments by plain ldmatrix.x4 (an 8 x 8 b16 matrix is 8 rows of
// 16 int8 along K; lane l receives 4 bytes k = 4 (l % 4) .. +3 of row l / 4, i.e. exactly the
// m16n8k32 s8 A / B register layout): A x4 = (rows 0-7, k 0-15), (rows 8-15, k 0-15),
// (rows 0-7, k 16-31), (rows 8-15, k 16-31); B x4 over two n8 tiles = (n 0-7, k 0-15),
// (n 0-7, k 16-31), (n 8-15, k 0-15), (n 8-15, k 16-31). Shared tiles are [rows][BK] bytes,
// XOR-swizzled per 16-byte chunk: chunk c of row r is stored at chunk c ^ f(r % 8) (f(r) = r for
// rows of >= 8 chunks; r / (8 / chunks) for narrower rows, e.g. BK = 64: 4 chunks, f = r / 2),
// so the 8 rows an ldmatrix phase reads fall in different bank groups. Block order is grouped by
// GIE_I8P_GROUP_M (default 8) tile rows for L2 reuse of Bt (1: plain row-major order).
// GIE_I8P_MIN_BLOCKS is the __launch_bounds__ blocks-per-SM hint (default 2 at BK <= 64: at
// most 128 registers at 256 threads, no spills; 1 at larger BK).
//
// Launch: grid (ceil(N / BN), ceil(M / BM)), block GIE_I8P_THREADS = 32 * WARPS_M * WARPS_N
// (256 by default, 128 with GIE_I8P_SMALL), dynamic shared memory
//     shared_bytes = STAGES * (BM + BN) * BK
// (default 3 * (128 + 128) * 64 = 49152 = 48 KB; GIE_I8P_SMALL: 3 * 128 * 64 = 24576). The host
// passes it as the launch's shared_bytes (above 48 KB, e.g. STAGES = 4 at the default tile:
// 64 KB, it must first raise cudaFuncAttributeMaxDynamicSharedMemorySize). No static shared
// memory.
//
// Constraints: K % 16 == 0, lda and ldb multiples of 16, A and Bt 16-byte aligned (every
// cp.async chunk is 16 bytes of one row); K <= 131071 (exact int32 accumulation). M and N need
// not be multiples of the tile (out-of-range rows are zero-filled in shared memory, never read
// from global, and out-of-range outputs are not stored); K need not be a multiple of BK (the K
// tail is zero-filled). Outputs are stored element by element (any N, ldc). Correct on the CPU
// shim; not timed on silicon yet.
#include "gie_prelude.cuh"

#ifdef GIE_I8P_SMALL
#ifndef GIE_I8P_BM
#define GIE_I8P_BM 64
#endif
#ifndef GIE_I8P_BN
#define GIE_I8P_BN 64
#endif
#endif
#ifndef GIE_I8P_BM
#define GIE_I8P_BM 128
#endif
#ifndef GIE_I8P_BN
#define GIE_I8P_BN 128
#endif
#ifndef GIE_I8P_BK
#define GIE_I8P_BK 64
#endif
#ifndef GIE_I8P_STAGES
#define GIE_I8P_STAGES 3
#endif
#ifndef GIE_I8P_WARPS_M
#define GIE_I8P_WARPS_M 2
#endif
#ifndef GIE_I8P_WARPS_N
#if GIE_I8P_BM * GIE_I8P_BN >= 128 * 128
#define GIE_I8P_WARPS_N 4
#else
#define GIE_I8P_WARPS_N 2
#endif
#endif
#ifndef GIE_I8P_GROUP_M
#define GIE_I8P_GROUP_M 8
#endif
#ifndef GIE_I8P_MIN_BLOCKS
#if GIE_I8P_BK <= 64
#define GIE_I8P_MIN_BLOCKS 2  // __launch_bounds__ occupancy: <= 128 registers at 256 threads
#else
#define GIE_I8P_MIN_BLOCKS 1  // BK = 128 fragments need more registers
#endif
#endif
#define GIE_I8P_THREADS (32 * GIE_I8P_WARPS_M * GIE_I8P_WARPS_N)

namespace gie_i8p {
constexpr int BM = GIE_I8P_BM, BN = GIE_I8P_BN, BK = GIE_I8P_BK, STAGES = GIE_I8P_STAGES;
constexpr int WARPS_M = GIE_I8P_WARPS_M, WARPS_N = GIE_I8P_WARPS_N;
constexpr int THREADS = GIE_I8P_THREADS;
constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;  // warp tile
constexpr int MI = WM / 16, NI = WN / 8;             // m16n8 accumulators per warp
constexpr int CHUNKS = BK / 16;                      // 16-byte chunks per shared row (A and Bt)
constexpr int A_STAGE = BM * BK, B_STAGE = BN * BK;  // bytes per stage
constexpr int ROW_STEP = THREADS / CHUNKS;           // rows between one thread's chunks
constexpr int A_LOADS = BM / ROW_STEP, B_LOADS = BN / ROW_STEP;  // chunks per thread

static_assert(STAGES >= 2, "the pipeline needs at least 2 stages");
static_assert(BK % 32 == 0 && WM % 16 == 0 && WN % 16 == 0, "mma m16n8k32 tiling (NI even)");
static_assert(BM % WARPS_M == 0 && BN % WARPS_N == 0, "warps must tile the block");
static_assert(THREADS % CHUNKS == 0, "one chunk column per thread");
static_assert(ROW_STEP % 8 == 0, "one swizzle term per thread");
static_assert(BM % ROW_STEP == 0 && BN % ROW_STEP == 0, "whole loads per thread");
static_assert(A_LOADS <= 32 && B_LOADS <= 32, "row-validity bit masks");
static_assert(CHUNKS <= 8 || CHUNKS % 8 == 0, "swizzle within groups of 8 chunks");

// The XOR term of a shared row: rows of >= 8 chunks (>= 128 bytes) use row % 8; narrower rows
// share a 128-byte line among 8 / CHUNKS rows, so the term is (row % 8) / (8 / CHUNKS).
GIE_DEVICE int swizzle_term(int row) {
    return CHUNKS >= 8 ? (row & 7) : ((row & 7) / (CHUNKS >= 8 ? 1 : 8 / CHUNKS)) % CHUNKS;
}

// Byte offset of chunk `chunk` of row `row` in a [rows][BK] swizzled tile.
GIE_DEVICE int swizzled(int row, int chunk) {
    return (row * CHUNKS + (chunk ^ swizzle_term(row))) * 16;
}

struct __align__(16) Zero16 {
    unsigned words[4];
};

GIE_DEVICE void zero_16(signed char* shared) {
    const Zero16 zero = {{0u, 0u, 0u, 0u}};
    *reinterpret_cast<Zero16*>(shared) = zero;
}

template <typename Out>
GIE_DEVICE void gemm(const signed char* __restrict__ A, const signed char* __restrict__ Bt,
                     const int* __restrict__ bias, const float* __restrict__ w_scale,
                     const float* __restrict__ residual, Out* __restrict__ C, int M, int N, int K,
                     int lda, int ldb, int ldc, float x_scale, int w_scale_stride, float y_scale,
                     int activation, float alpha, float beta, int residual_first,
                     signed char* shared) {
    signed char* a_shared = shared;                   // STAGES x [BM][BK]
    signed char* b_shared = shared + STAGES * A_STAGE;  // STAGES x [BN][BK]

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int warp_m = warp / WARPS_N, warp_n = warp % WARPS_N;

    // Grouped block order: GROUP_M tile rows sweep the tile columns together (L2 reuse of Bt).
    int tile_m = blockIdx.y, tile_n = blockIdx.x;
    if (GIE_I8P_GROUP_M > 1) {
        const int tiles_n = gridDim.x, tiles_m = gridDim.y;
        const int linear = blockIdx.y * tiles_n + blockIdx.x;
        const int per_group = GIE_I8P_GROUP_M * tiles_n;
        const int first_m = (linear / per_group) * GIE_I8P_GROUP_M;
        const int rows = min(tiles_m - first_m, GIE_I8P_GROUP_M);
        tile_m = first_m + (linear % per_group) % rows;
        tile_n = (linear % per_group) / rows;
    }
    const int row0 = tile_m * BM, col0 = tile_n * BN;

    // ---- global -> shared: this thread's chunks (one chunk column, rows ROW_STEP apart)
    const int load_row = tid / CHUNKS, load_chunk = tid % CHUNKS;
    const signed char* a_global = A + (long long)(row0 + load_row) * lda + load_chunk * 16;
    const signed char* b_global = Bt + (long long)(col0 + load_row) * ldb + load_chunk * 16;
    unsigned a_rows_ok = 0, b_rows_ok = 0;
#pragma unroll
    for (int i = 0; i < A_LOADS; ++i)
        if (row0 + load_row + i * ROW_STEP < M) a_rows_ok |= 1u << i;
#pragma unroll
    for (int i = 0; i < B_LOADS; ++i)
        if (col0 + load_row + i * ROW_STEP < N) b_rows_ok |= 1u << i;
    const int store = swizzled(load_row, load_chunk);  // same term for every i

    auto load_tile = [&](int stage, int k_tile) {
        const int k0 = k_tile * BK;
        const bool k_ok = k0 + load_chunk * 16 < K;  // K % 16 == 0: the chunk is whole
        signed char* a_stage = a_shared + stage * A_STAGE + store;
#pragma unroll
        for (int i = 0; i < A_LOADS; ++i) {
            signed char* destination = a_stage + i * ROW_STEP * BK;
            if (k_ok && ((a_rows_ok >> i) & 1u))
                gie_cp_async_16(destination, a_global + (long long)i * ROW_STEP * lda + k0);
            else
                zero_16(destination);
        }
        signed char* b_stage = b_shared + stage * B_STAGE + store;
#pragma unroll
        for (int i = 0; i < B_LOADS; ++i) {
            signed char* destination = b_stage + i * ROW_STEP * BK;
            if (k_ok && ((b_rows_ok >> i) & 1u))
                gie_cp_async_16(destination, b_global + (long long)i * ROW_STEP * ldb + k0);
            else
                zero_16(destination);
        }
    };

    // ---- shared -> fragments (lane l gives row l % 8 of matrix l / 8). A x4: row l % 16,
    // chunk 2 kk + l / 16. B x4: n row (l / 16) * 8 + l % 8, chunk 2 kk + (l / 8) % 2. Every row
    // a lane names is congruent to lane % 8 mod 8, so its swizzle term is fixed.
    const int a_read = (warp_m * WM + (lane & 15)) * BK;
    const int b_read = (warp_n * WN + (lane >> 4) * 8 + (lane & 7)) * BK;
    int a_column[BK / 32], b_column[BK / 32];
#pragma unroll
    for (int kk = 0; kk < BK / 32; ++kk) {
        a_column[kk] = ((2 * kk + (lane >> 4)) ^ swizzle_term(lane)) * 16;
        b_column[kk] = ((2 * kk + ((lane >> 3) & 1)) ^ swizzle_term(lane)) * 16;
    }

    int acc[MI][NI][4];
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < NI; ++ni)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[mi][ni][e] = 0;

    const int k_tiles = (K + BK - 1) / BK;
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {  // prologue: tiles 0 .. STAGES - 2 in flight
        if (s < k_tiles) load_tile(s, s);
        gie_cp_async_commit();  // one group per tile, empty or not: the wait counts stay exact
    }

    int read_stage = 0, write_stage = STAGES - 1;
    for (int kt = 0; kt < k_tiles; ++kt) {
        // Groups committed so far: STAGES - 1 + kt; at most STAGES - 2 pending = tile kt landed.
        gie_cp_async_wait_group<STAGES - 2>();
        // Tile kt visible to every warp, and every warp is done with tile kt - 1, whose stage
        // (write_stage) the next load overwrites.
        __syncthreads();
        if (kt + STAGES - 1 < k_tiles) load_tile(write_stage, kt + STAGES - 1);
        gie_cp_async_commit();

        const signed char* a_stage = a_shared + read_stage * A_STAGE + a_read;
        const signed char* b_stage = b_shared + read_stage * B_STAGE + b_read;
#pragma unroll
        for (int kk = 0; kk < BK / 32; ++kk) {
            unsigned a_fragment[MI][4], b_fragment[NI][2];
#pragma unroll
            for (int mi = 0; mi < MI; ++mi)
                gie_ldmatrix_x4(a_fragment[mi], a_stage + mi * 16 * BK + a_column[kk]);
#pragma unroll
            for (int nj = 0; nj < NI / 2; ++nj) {
                unsigned four[4];
                gie_ldmatrix_x4(four, b_stage + nj * 16 * BK + b_column[kk]);
                b_fragment[2 * nj][0] = four[0];
                b_fragment[2 * nj][1] = four[1];
                b_fragment[2 * nj + 1][0] = four[2];
                b_fragment[2 * nj + 1][1] = four[3];
            }
#pragma unroll
            for (int mi = 0; mi < MI; ++mi)
#pragma unroll
                for (int ni = 0; ni < NI; ++ni)
                    gie_mma_m16n8k32_s8_s32(acc[mi][ni], a_fragment[mi], b_fragment[ni],
                                            acc[mi][ni]);
        }
        read_stage = read_stage + 1 == STAGES ? 0 : read_stage + 1;
        write_stage = write_stage + 1 == STAGES ? 0 : write_stage + 1;
    }
    gie_cp_async_wait_group<0>();  // only empty groups remain; leave nothing in flight

    // ---- epilogue (gemm_int8.cu's, element by element): c[0..1] = C[g][2t..2t+1],
    // c[2..3] = C[g+8][2t..2t+1] of each m16n8 tile.
    const int group = lane >> 2, pair = (lane & 3) * 2;
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < NI; ++ni)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int r = row0 + warp_m * WM + mi * 16 + (e >> 1) * 8 + group;
                const int c = col0 + warp_n * WN + ni * 8 + pair + (e & 1);
                if (r >= M || c >= N) continue;
                const int total =
                    bias != nullptr ? gie_add_sat_s32(acc[mi][ni][e], bias[c]) : acc[mi][ni][e];
                float real = gie_dequant_acc(total, x_scale, w_scale[c * w_scale_stride]);
                const long long at = (long long)r * ldc + c;
                if (residual == nullptr) {
                    real = gie_activate(real, activation, alpha, beta);
                } else {
                    real = residual_first
                               ? gie_activate(real + residual[at], activation, alpha, beta)
                               : gie_activate(real, activation, alpha, beta) + residual[at];
                }
                gie_store_q(C + at, real, y_scale);
            }
}
}  // namespace gie_i8p

extern "C" __global__ void __launch_bounds__(GIE_I8P_THREADS, GIE_I8P_MIN_BLOCKS)
gie_gemm_int8_pipelined_s8(const signed char* A, const signed char* Bt, const int* bias,
                           const float* w_scale, const float* residual, signed char* C, int M,
                           int N, int K, int lda, int ldb, int ldc, float x_scale,
                           int w_scale_stride, float y_scale, int activation, float alpha,
                           float beta, int residual_first) {
    extern __shared__ __align__(16) signed char gie_i8p_shared_s8[];
    gie_i8p::gemm(A, Bt, bias, w_scale, residual, C, M, N, K, lda, ldb, ldc, x_scale,
                  w_scale_stride, y_scale, activation, alpha, beta, residual_first,
                  gie_i8p_shared_s8);
}

extern "C" __global__ void __launch_bounds__(GIE_I8P_THREADS, GIE_I8P_MIN_BLOCKS)
gie_gemm_int8_pipelined_f32(const signed char* A, const signed char* Bt, const int* bias,
                            const float* w_scale, const float* residual, float* C, int M, int N,
                            int K, int lda, int ldb, int ldc, float x_scale, int w_scale_stride,
                            float y_scale, int activation, float alpha, float beta,
                            int residual_first) {
    extern __shared__ __align__(16) signed char gie_i8p_shared_f32[];
    gie_i8p::gemm(A, Bt, bias, w_scale, residual, C, M, N, K, lda, ldb, ldc, x_scale,
                  w_scale_stride, y_scale, activation, alpha, beta, residual_first,
                  gie_i8p_shared_f32);
}

extern "C" __global__ void __launch_bounds__(GIE_I8P_THREADS, GIE_I8P_MIN_BLOCKS)
gie_gemm_int8_pipelined_f16(const signed char* A, const signed char* Bt, const int* bias,
                            const float* w_scale, const float* residual, gie_half* C, int M,
                            int N, int K, int lda, int ldb, int ldc, float x_scale,
                            int w_scale_stride, float y_scale, int activation, float alpha,
                            float beta, int residual_first) {
    extern __shared__ __align__(16) signed char gie_i8p_shared_f16[];
    gie_i8p::gemm(A, Bt, bias, w_scale, residual, C, M, N, K, lda, ldb, ldc, x_scale,
                  w_scale_stride, y_scale, activation, alpha, beta, residual_first,
                  gie_i8p_shared_f16);
}
