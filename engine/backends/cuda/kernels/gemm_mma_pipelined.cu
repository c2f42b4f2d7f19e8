// Pipelined tensor-core fp16 GEMM (fp32 accumulate): the fast form of gemm_mma_f16.cu, with the
// same arguments and epilogue (a drop-in tactic). C = epilogue(A @ B): row-major A [M, K],
// B [K, N], C [M, N] (lda, ldb, ldc in elements), bias [N] (nullable), residual [M, N] with
// ldc (nullable) added before (residual_first = 1) or after the activation (gie::GemmAct).
//
// Tiles (-D macros): a block computes GIE_PIPE_BM x GIE_PIPE_BN of C (default 128 x 128) in K
// steps of GIE_PIPE_BK (default 32) with GIE_PIPE_WARPS_M x GIE_PIPE_WARPS_N warps (default
// 2 x 4 = 8 warps of 64 x 32 each; 2 x 2 below 128 x 128). -D GIE_PIPE_SMALL=1 selects the
// small-problem variant 64 x 64 x 32 with 4 warps (32 x 32 each). Each warp holds
// (WM / 16) x (WN / 8) m16n8k16 accumulators (gie_mma_m16n8k16_f16_f32).
// Pipeline: GIE_PIPE_STAGES (default 3) shared-memory stages filled by cp.async (16-byte
// chunks, one commit group per K tile, gie_cp_async_wait_group<STAGES - 2> before a tile is
// read, one __syncthreads per K tile), fragments by ldmatrix.x4 (A) and ldmatrix.x4.trans (B,
// two n8 tiles per load) from an XOR-swizzled layout: 16-byte chunk c of tile row r is stored
// at chunk c ^ f(r % 8) of that row (f(r) = r for rows of >= 8 chunks; r / (8 / chunks) for
// narrower rows), so the 8 rows an ldmatrix phase reads, and the chunks a warp's cp.async
// writes, fall in 8 different bank groups. Block order is grouped by GIE_PIPE_GROUP_M (default
// 8) tile rows for L2 reuse (1: plain row-major order). GIE_PIPE_MIN_BLOCKS is the
// __launch_bounds__ blocks-per-SM hint (default 2 at BK <= 32: at most 128 registers at 256
// threads, no spills; 1 at larger BK).
//
// Launch: grid (ceil(N / BN), ceil(M / BM)), block GIE_PIPE_THREADS = 32 * WARPS_M * WARPS_N
// (256 by default, 128 with GIE_PIPE_SMALL), dynamic shared memory
//     shared_bytes = STAGES * (BM * BK + BK * BN) * 2
// (default 3 * (128 * 32 + 32 * 128) * 2 = 49152 = 48 KB; GIE_PIPE_SMALL: 24576). The host
// passes it as the launch's shared_bytes and, above 48 KB (e.g. STAGES = 4: 64 KB), must first
// set cudaFuncAttributeMaxDynamicSharedMemorySize on the function (up to 227 KB on H100,
// 163 KB on A100). No static shared memory.
//
// Constraints: K % 8 == 0 and N % 8 == 0, lda, ldb and ldc multiples of 8, A, B, C, bias and
// residual 16-byte aligned (every cp.async chunk is 16 bytes of one row; the epilogue stores
// column pairs as 32-bit words). M, N and K need not be multiples of the tile: out-of-range
// chunks are zero-filled in shared memory (never read from global) and out-of-range outputs are
// not stored. Correct on the CPU shim; not timed on silicon yet.
#include "gie_prelude.cuh"

#ifdef GIE_PIPE_SMALL
#ifndef GIE_PIPE_BM
#define GIE_PIPE_BM 64
#endif
#ifndef GIE_PIPE_BN
#define GIE_PIPE_BN 64
#endif
#endif
#ifndef GIE_PIPE_BM
#define GIE_PIPE_BM 128
#endif
#ifndef GIE_PIPE_BN
#define GIE_PIPE_BN 128
#endif
#ifndef GIE_PIPE_BK
#define GIE_PIPE_BK 32
#endif
#ifndef GIE_PIPE_STAGES
#define GIE_PIPE_STAGES 3
#endif
#ifndef GIE_PIPE_WARPS_M
#define GIE_PIPE_WARPS_M 2
#endif
#ifndef GIE_PIPE_WARPS_N
#if GIE_PIPE_BM * GIE_PIPE_BN >= 128 * 128
#define GIE_PIPE_WARPS_N 4
#else
#define GIE_PIPE_WARPS_N 2
#endif
#endif
#ifndef GIE_PIPE_GROUP_M
#define GIE_PIPE_GROUP_M 8
#endif
#ifndef GIE_PIPE_MIN_BLOCKS
#if GIE_PIPE_BK <= 32
#define GIE_PIPE_MIN_BLOCKS 2  // __launch_bounds__ occupancy: <= 128 registers at 256 threads
#else
#define GIE_PIPE_MIN_BLOCKS 1  // BK = 64 fragments need more registers (and 2x shared memory)
#endif
#endif
#define GIE_PIPE_THREADS (32 * GIE_PIPE_WARPS_M * GIE_PIPE_WARPS_N)

namespace gie_pipe {
constexpr int BM = GIE_PIPE_BM, BN = GIE_PIPE_BN, BK = GIE_PIPE_BK, STAGES = GIE_PIPE_STAGES;
constexpr int WARPS_M = GIE_PIPE_WARPS_M, WARPS_N = GIE_PIPE_WARPS_N;
constexpr int THREADS = GIE_PIPE_THREADS;
constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;  // warp tile
constexpr int MI = WM / 16, NI = WN / 8;             // m16n8 accumulators per warp
constexpr int A_CHUNKS = BK / 8, B_CHUNKS = BN / 8;  // 16-byte chunks per shared row
constexpr int A_STAGE = BM * BK, B_STAGE = BK * BN;  // halves per stage
constexpr int A_ROW_STEP = THREADS / A_CHUNKS;       // rows between one thread's chunks
constexpr int B_ROW_STEP = THREADS / B_CHUNKS;
constexpr int A_LOADS = BM / A_ROW_STEP, B_LOADS = BK / B_ROW_STEP;  // chunks per thread

static_assert(STAGES >= 2, "the pipeline needs at least 2 stages");
static_assert(BK % 16 == 0 && WM % 16 == 0 && WN % 16 == 0, "mma m16n8k16 tiling (NI even)");
static_assert(BM % WARPS_M == 0 && BN % WARPS_N == 0, "warps must tile the block");
static_assert(THREADS % A_CHUNKS == 0 && THREADS % B_CHUNKS == 0, "chunk column per thread");
static_assert(A_ROW_STEP % 8 == 0 && B_ROW_STEP % 8 == 0, "one swizzle term per thread");
static_assert(BM % A_ROW_STEP == 0 && BK % B_ROW_STEP == 0, "whole loads per thread");
static_assert(A_LOADS <= 32, "row-validity bit mask");
static_assert(B_CHUNKS <= 8 || B_CHUNKS % 8 == 0, "swizzle within groups of 8 chunks");

// The XOR term of a shared row: rows of >= 8 chunks (>= 128 bytes) use row % 8; narrower rows
// share a 128-byte line among 8 / CHUNKS rows, so the term is (row % 8) / (8 / CHUNKS).
template <int CHUNKS>
GIE_DEVICE int swizzle_term(int row) {
    return CHUNKS >= 8 ? (row & 7) : ((row & 7) / (CHUNKS >= 8 ? 1 : 8 / CHUNKS)) % CHUNKS;
}

// Half offset of chunk `chunk` of row `row` in a [rows][CHUNKS * 8] swizzled tile.
template <int CHUNKS>
GIE_DEVICE int swizzled(int row, int chunk) {
    return (row * CHUNKS + (chunk ^ swizzle_term<CHUNKS>(row))) * 8;
}

struct __align__(16) Zero16 {
    unsigned words[4];
};
struct __align__(4) Half2 {
    gie_half lo, hi;
};

GIE_DEVICE void zero_16(gie_half* shared) {
    const Zero16 zero = {{0u, 0u, 0u, 0u}};
    *reinterpret_cast<Zero16*>(shared) = zero;
}
}  // namespace gie_pipe

extern "C" __global__ void __launch_bounds__(GIE_PIPE_THREADS, GIE_PIPE_MIN_BLOCKS)
gie_gemm_mma_pipelined_f16(const gie_half* A, const gie_half* B, const gie_half* bias,
                           const gie_half* residual, gie_half* C, int M, int N, int K, int lda,
                           int ldb, int ldc, int activation, float alpha, float beta,
                           int residual_first) {
    using namespace gie_pipe;
    extern __shared__ __align__(16) gie_half gie_pipe_shared[];
    gie_half* a_shared = gie_pipe_shared;                    // STAGES x [BM][BK]
    gie_half* b_shared = gie_pipe_shared + STAGES * A_STAGE;  // STAGES x [BK][BN]

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int warp_m = warp / WARPS_N, warp_n = warp % WARPS_N;

    // Grouped block order: GROUP_M tile rows sweep the tile columns together (L2 reuse of B).
    int tile_m = blockIdx.y, tile_n = blockIdx.x;
    if (GIE_PIPE_GROUP_M > 1) {
        const int tiles_n = gridDim.x, tiles_m = gridDim.y;
        const int linear = blockIdx.y * tiles_n + blockIdx.x;
        const int per_group = GIE_PIPE_GROUP_M * tiles_n;
        const int first_m = (linear / per_group) * GIE_PIPE_GROUP_M;
        const int rows = min(tiles_m - first_m, GIE_PIPE_GROUP_M);
        tile_m = first_m + (linear % per_group) % rows;
        tile_n = (linear % per_group) / rows;
    }
    const int row0 = tile_m * BM, col0 = tile_n * BN;

    // ---- global -> shared: this thread's chunks (one chunk column, rows ROW_STEP apart)
    const int a_row = tid / A_CHUNKS, a_chunk = tid % A_CHUNKS;
    const int b_row = tid / B_CHUNKS, b_chunk = tid % B_CHUNKS;
    const gie_half* a_global = A + (long long)(row0 + a_row) * lda + a_chunk * 8;
    const gie_half* b_global = B + (long long)b_row * ldb + col0 + b_chunk * 8;
    const bool b_col_ok = col0 + b_chunk * 8 < N;
    unsigned a_rows_ok = 0;
#pragma unroll
    for (int i = 0; i < A_LOADS; ++i)
        if (row0 + a_row + i * A_ROW_STEP < M) a_rows_ok |= 1u << i;
    const int a_store = swizzled<A_CHUNKS>(a_row, a_chunk);  // same term for every i
    const int b_store = swizzled<B_CHUNKS>(b_row, b_chunk);

    auto load_tile = [&](int stage, int k_tile) {
        const int k0 = k_tile * BK;
        gie_half* a_stage = a_shared + stage * A_STAGE + a_store;
        const bool a_k_ok = k0 + a_chunk * 8 < K;
#pragma unroll
        for (int i = 0; i < A_LOADS; ++i) {
            gie_half* destination = a_stage + i * A_ROW_STEP * BK;
            if (a_k_ok && ((a_rows_ok >> i) & 1u))
                gie_cp_async_16(destination, a_global + (long long)i * A_ROW_STEP * lda + k0);
            else
                zero_16(destination);
        }
        gie_half* b_stage = b_shared + stage * B_STAGE + b_store;
#pragma unroll
        for (int i = 0; i < B_LOADS; ++i) {
            gie_half* destination = b_stage + i * B_ROW_STEP * BN;
            const int k = k0 + i * B_ROW_STEP;
            if (b_col_ok && k + b_row < K)
                gie_cp_async_16(destination, b_global + (long long)k * ldb);
            else
                zero_16(destination);
        }
    };

    // ---- shared -> fragments. A x4: lane l gives row l % 16, chunk 2 kk + l / 16 of a 16 x 16
    // tile (matrices: rows 0-7 / 8-15 x k 0-7 / 8-15 = a[0..3]). B x4.trans: lane l gives k row
    // l % 16 of n chunk (warp's chunk + nj + l / 16): r[0..1] = b of n tile nj, r[2..3] of nj + 1.
    // Every row a lane names is congruent to lane % 8 mod 8, so its swizzle term is fixed.
    const int a_read = (warp_m * WM + (lane & 15)) * BK;
    const int b_read = (lane & 15) * BN;
    int a_column[BK / 16], b_column[NI / 2];
#pragma unroll
    for (int kk = 0; kk < BK / 16; ++kk)
        a_column[kk] = ((2 * kk + (lane >> 4)) ^ swizzle_term<A_CHUNKS>(lane)) * 8;
#pragma unroll
    for (int nj = 0; nj < NI / 2; ++nj)
        b_column[nj] =
            ((warp_n * (WN / 8) + 2 * nj + (lane >> 4)) ^ swizzle_term<B_CHUNKS>(lane)) * 8;

    float acc[MI][NI][4];
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < NI; ++ni)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[mi][ni][e] = 0.0f;

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

        const gie_half* a_stage = a_shared + read_stage * A_STAGE + a_read;
        const gie_half* b_stage = b_shared + read_stage * B_STAGE + b_read;
#pragma unroll
        for (int kk = 0; kk < BK / 16; ++kk) {
            unsigned a_fragment[MI][4], b_fragment[NI][2];
#pragma unroll
            for (int mi = 0; mi < MI; ++mi)
                gie_ldmatrix_x4(a_fragment[mi], a_stage + mi * 16 * BK + a_column[kk]);
#pragma unroll
            for (int nj = 0; nj < NI / 2; ++nj) {
                unsigned four[4];
                gie_ldmatrix_x4_trans(four, b_stage + kk * 16 * BN + b_column[nj]);
                b_fragment[2 * nj][0] = four[0];
                b_fragment[2 * nj][1] = four[1];
                b_fragment[2 * nj + 1][0] = four[2];
                b_fragment[2 * nj + 1][1] = four[3];
            }
#pragma unroll
            for (int mi = 0; mi < MI; ++mi)
#pragma unroll
                for (int ni = 0; ni < NI; ++ni)
                    gie_mma_m16n8k16_f16_f32(acc[mi][ni], a_fragment[mi], b_fragment[ni],
                                             acc[mi][ni]);
        }
        read_stage = read_stage + 1 == STAGES ? 0 : read_stage + 1;
        write_stage = write_stage + 1 == STAGES ? 0 : write_stage + 1;
    }
    gie_cp_async_wait_group<0>();  // only empty groups remain; leave nothing in flight

    // ---- epilogue from the fragments: c[0..1] = C[g][2t..2t+1], c[2..3] = C[g+8][2t..2t+1].
    // N % 8 == 0: a column pair is wholly in or out of range; pairs are 32-bit words.
    const int group = lane >> 2, pair = (lane & 3) * 2;
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int r = row0 + warp_m * WM + mi * 16 + half * 8 + group;
            if (r >= M) continue;
#pragma unroll
            for (int ni = 0; ni < NI; ++ni) {
                const int c = col0 + warp_n * WN + ni * 8 + pair;
                if (c >= N) continue;
                float v0 = acc[mi][ni][2 * half], v1 = acc[mi][ni][2 * half + 1];
                if (bias != nullptr) {
                    const Half2 b = *reinterpret_cast<const Half2*>(bias + c);
                    v0 += gie_h2f(b.lo);
                    v1 += gie_h2f(b.hi);
                }
                const long long offset = (long long)r * ldc + c;
                float e0 = 0.0f, e1 = 0.0f;
                if (residual != nullptr) {
                    const Half2 extra = *reinterpret_cast<const Half2*>(residual + offset);
                    e0 = gie_h2f(extra.lo);
                    e1 = gie_h2f(extra.hi);
                }
                if (residual_first) {
                    v0 = gie_activate(v0 + e0, activation, alpha, beta);
                    v1 = gie_activate(v1 + e1, activation, alpha, beta);
                } else {
                    v0 = gie_activate(v0, activation, alpha, beta) + e0;
                    v1 = gie_activate(v1, activation, alpha, beta) + e1;
                }
                Half2 out;
                out.lo = gie_f2h(v0);
                out.hi = gie_f2h(v1);
                *reinterpret_cast<Half2*>(C + offset) = out;
            }
        }
}
