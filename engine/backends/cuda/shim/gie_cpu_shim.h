// gie_cpu_shim.h: compile a GIE .cu kernel with g++ and run it on the CPU at tiny shapes.
//
// Force-included (g++ -include gie_cpu_shim.h) before the kernel source. Blocks run one after
// another; inside a block every CUDA thread is a std::thread, so __syncthreads is a real
// barrier (gie_shim::Barrier, which aborts with a message instead of hanging when a barrier is
// never completed), and warp shuffles exchange values through a per-warp slot array with a
// per-warp barrier. The prelude's tensor-core wrappers (gie_prelude.cuh, skipped under
// GIE_CPU_SHIM) are re-implemented here from the PTX fragment layouts: mma.sync m16n8k16 f16,
// m16n8k32 s8, mma.sp m16n8k32 f16 and m16n8k64 s8 (2:4 sparse, selector 0), ldmatrix x4 /
// x2.trans / x4.trans, cp.async (a synchronous copy, or deferred to its wait_group when
// gie_shim_set_deferred_cp_async is on), dynamic shared memory (extern __shared__, bytes per
// launch). What this cannot check: performance, races the barrier hides, exact tensor-core
// rounding (products are summed in fp32 in k order).
//
// A thread that returns early leaves its block and warp barriers (arrive_and_drop), as an
// exited thread does not block bar.sync on Volta and later.
#pragma once
#define GIE_CPU_SHIM 1

#include <math.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

using std::max;
using std::min;

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define GIE_DEVICE inline

typedef _Float16 gie_half;
inline float gie_h2f(gie_half value) { return static_cast<float>(value); }
inline gie_half gie_f2h(float value) { return static_cast<gie_half>(value); }
inline float __half2float(gie_half value) { return static_cast<float>(value); }
inline gie_half __float2half_rn(float value) { return static_cast<gie_half>(value); }
inline float rsqrtf(float value) { return 1.0f / std::sqrt(value); }
// Rounded float32 operations (g++ for the default x86-64 target emits no FMA to contract into).
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline unsigned gie_pack_half2(gie_half lo, gie_half hi) {
    uint16_t bits[2];
    std::memcpy(&bits[0], &lo, 2);
    std::memcpy(&bits[1], &hi, 2);
    return unsigned(bits[0]) | (unsigned(bits[1]) << 16);
}

namespace gie_shim {

// How long a thread waits at a barrier before the shim declares a deadlock (a __syncthreads
// that not every thread of the block reaches) and aborts with a message; set per library by
// gie_shim_set_barrier_timeout_ms (ShimLibrary.set_barrier_timeout).
inline std::atomic<unsigned> barrier_timeout_ms{20000};

// Dynamic shared memory (`extern __shared__ T name[];`, which shim_runner rewrites to
// `T* name = reinterpret_cast<T*>(gie_shim::dynamic_shared());`): dynamic_shared_bytes per
// block, set per launch (ShimLibrary.launch(..., shared_bytes=)). Each block gets a fresh
// 128-byte-aligned buffer filled with 0xFF (fp16 NaN, so a read of a never-written byte shows)
// and a guard after it; a write past the end aborts when the block finishes.
inline std::atomic<unsigned> dynamic_shared_bytes{0};
inline unsigned char* dynamic_shared_base = nullptr;

inline void* dynamic_shared() {
    if (dynamic_shared_base == nullptr) {
        std::fprintf(stderr, "gie_cpu_shim: the kernel uses extern __shared__ memory but the "
                             "launch passed shared_bytes=0\n");
        std::fflush(stderr);
        std::abort();
    }
    return dynamic_shared_base;
}

// cp.async as the GPU orders it (opt-in, gie_shim_set_deferred_cp_async): a copy lands only when
// a gie_cp_async_wait_group / wait_all covering its commit group runs in the issuing thread, so
// a pipeline that reads a stage before waiting for it reads stale data. Off: copies are
// synchronous (the default, as before).
inline std::atomic<bool> deferred_cp_async{false};
struct AsyncCopy {
    void* destination;
    const void* source;
};
inline thread_local std::vector<AsyncCopy> open_copies;                   // not yet committed
inline thread_local std::vector<std::vector<AsyncCopy>> committed_copies;  // oldest first

inline void land(const std::vector<AsyncCopy>& copies) {
    for (const AsyncCopy& copy : copies) std::memcpy(copy.destination, copy.source, 16);
}

// std::barrier without the hang: arrive_and_wait aborts after barrier_timeout_ms.
class Barrier {
   public:
    explicit Barrier(int count) : expected_(count) {}

    void arrive_and_wait() {
        std::unique_lock<std::mutex> lock(mutex_);
        const unsigned long phase = phase_;
        if (++arrived_ >= expected_) {
            next_phase();
            return;
        }
        const auto timeout = std::chrono::milliseconds(barrier_timeout_ms.load());
        if (!changed_.wait_for(lock, timeout, [&] { return phase_ != phase; })) {
            std::fprintf(stderr,
                         "gie_cpu_shim: a barrier waited %u ms for %d of %d threads: a "
                         "__syncthreads or warp collective not reached by every thread?\n",
                         barrier_timeout_ms.load(), expected_ - arrived_, expected_);
            std::fflush(stderr);
            std::abort();
        }
    }

    // The calling thread has exited: later phases no longer wait for it.
    void arrive_and_drop() {
        std::unique_lock<std::mutex> lock(mutex_);
        --expected_;
        if (arrived_ > 0 && arrived_ >= expected_) next_phase();
    }

   private:
    void next_phase() {
        arrived_ = 0;
        ++phase_;
        changed_.notify_all();
    }

    std::mutex mutex_;
    std::condition_variable changed_;
    int expected_;
    int arrived_ = 0;
    unsigned long phase_ = 0;
};

struct Warp {
    explicit Warp(int threads) : barrier(threads), size(threads) {}
    Barrier barrier;
    int size;
    alignas(16) uint64_t slots[32][8];  // per lane: up to 64 bytes (fragments, pointers)
};

struct Block {
    explicit Block(int threads) : barrier(threads) {
        for (int first = 0; first < threads; first += 32)
            warps.emplace_back(std::make_unique<Warp>(std::min(32, threads - first)));
    }
    Barrier barrier;
    std::vector<std::unique_ptr<Warp>> warps;
};

inline dim3 grid_dim, block_dim;
inline thread_local dim3 thread_idx, block_idx;
inline thread_local Block* block = nullptr;
inline thread_local int lane = 0, warp_index = 0;

inline Warp& warp() { return *block->warps[warp_index]; }

// Run body() as every thread of every block of the launch.
template <typename Body>
void launch(dim3 grid, dim3 threads_per_block, Body body) {
    grid_dim = grid;
    block_dim = threads_per_block;
    const int threads = int(threads_per_block.x * threads_per_block.y * threads_per_block.z);
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                const size_t dynamic_bytes = dynamic_shared_bytes.load();
                constexpr size_t guard = 64;
                unsigned char* dynamic = nullptr;
                if (dynamic_bytes > 0) {
                    const size_t total = (dynamic_bytes + guard + 127) / 128 * 128;
                    dynamic = static_cast<unsigned char*>(std::aligned_alloc(128, total));
                    std::memset(dynamic, 0xFF, dynamic_bytes);
                    std::memset(dynamic + dynamic_bytes, 0xA5, guard);
                }
                dynamic_shared_base = dynamic;
                Block shared_block(threads);
                std::vector<std::thread> pool;
                pool.reserve(threads);
                for (int t = 0; t < threads; ++t) {
                    pool.emplace_back([&, t] {
                        block = &shared_block;
                        block_idx = dim3{bx, by, bz};
                        thread_idx = dim3{t % threads_per_block.x,
                                          (t / threads_per_block.x) % threads_per_block.y,
                                          t / (threads_per_block.x * threads_per_block.y)};
                        lane = t % 32;
                        warp_index = t / 32;
                        body();
                        warp().barrier.arrive_and_drop();
                        shared_block.barrier.arrive_and_drop();
                    });
                }
                for (auto& thread : pool) thread.join();
                if (dynamic != nullptr) {
                    for (size_t i = 0; i < guard; ++i)
                        if (dynamic[dynamic_bytes + i] != 0xA5) {
                            std::fprintf(stderr, "gie_cpu_shim: a write past the %zu bytes of "
                                                 "dynamic shared memory\n", dynamic_bytes);
                            std::fflush(stderr);
                            std::abort();
                        }
                    std::free(dynamic);
                    dynamic_shared_base = nullptr;
                }
            }
}

// Every lane of the warp publishes `bytes` of its own; read(lane) sees any lane's.
inline void publish(const void* data, size_t bytes) {
    std::memcpy(warp().slots[lane], data, bytes);
    warp().barrier.arrive_and_wait();
}
inline const void* published(int source_lane) { return warp().slots[source_lane]; }
// 32-bit word `index` of what lane `owner` published (the fragment registers it passed).
inline uint32_t published_word(int owner, int index) {
    uint32_t value;
    std::memcpy(&value, static_cast<const char*>(published(owner)) + 4 * index, 4);
    return value;
}
inline void done_reading() { warp().barrier.arrive_and_wait(); }

template <typename T>
T shuffle(T value, int source_lane) {
    static_assert(sizeof(T) <= 64, "shuffle of a type over 64 bytes");
    publish(&value, sizeof(T));
    T result = value;
    if (source_lane >= 0 && source_lane < warp().size)
        std::memcpy(&result, published(source_lane), sizeof(T));
    done_reading();
    return result;
}

inline float half_at(uint32_t word, int which) {
    uint16_t bits = uint16_t(which ? word >> 16 : word & 0xffffu);
    gie_half value;
    std::memcpy(&value, &bits, 2);
    return static_cast<float>(value);
}

inline int s8_at(uint32_t word, int which) { return int(int8_t((word >> (8 * which)) & 0xffu)); }

}  // namespace gie_shim

#define threadIdx (gie_shim::thread_idx)
#define blockIdx (gie_shim::block_idx)
#define blockDim (gie_shim::block_dim)
#define gridDim (gie_shim::grid_dim)

inline void __syncthreads() { gie_shim::block->barrier.arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { gie_shim::warp().barrier.arrive_and_wait(); }

template <typename T>
T __shfl_sync(unsigned, T value, int source_lane, int = 32) {
    return gie_shim::shuffle(value, source_lane);
}
template <typename T>
T __shfl_xor_sync(unsigned, T value, int lane_mask, int = 32) {
    return gie_shim::shuffle(value, gie_shim::lane ^ lane_mask);
}
template <typename T>
T __shfl_down_sync(unsigned, T value, unsigned delta, int = 32) {
    const int source = gie_shim::lane + int(delta);
    return gie_shim::shuffle(value, source < gie_shim::warp().size ? source : gie_shim::lane);
}
template <typename T>
T __shfl_up_sync(unsigned, T value, unsigned delta, int = 32) {
    const int source = gie_shim::lane - int(delta);
    return gie_shim::shuffle(value, source >= 0 ? source : gie_shim::lane);
}

template <typename T>
T atomicAdd(T* address, T value) {
    return std::atomic_ref<T>(*address).fetch_add(value);
}
template <typename T>
T atomicMax(T* address, T value) {
    std::atomic_ref<T> target(*address);
    T old = target.load();
    while (old < value && !target.compare_exchange_weak(old, value)) {
    }
    return old;
}
template <typename T>
T atomicExch(T* address, T value) {
    return std::atomic_ref<T>(*address).exchange(value);
}
template <typename T>
T atomicCAS(T* address, T compare, T value) {
    std::atomic_ref<T>(*address).compare_exchange_strong(compare, value);
    return compare;
}

// --------------------------------------------------------------------------- tensor cores
// The prelude's wrappers, per the PTX fragment layouts (see gie_prelude.cuh); g = lane / 4,
// t = lane % 4. Each is a warp-collective: all 32 lanes must call it together.

inline void gie_mma_m16n8k16_f16_f32(float d[4], const unsigned a[4], const unsigned b[2],
                                     const float c[4]) {
    using namespace gie_shim;
    if (warp().size != 32) { std::fprintf(stderr, "mma needs a full warp\n"); std::abort(); }
    uint32_t mine[6] = {a[0], a[1], a[2], a[3], b[0], b[1]};
    publish(mine, sizeof(mine));
    const auto word = published_word;
    auto a_at = [&](int row, int k) {  // A[row][k]
        const int reg = (row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0);
        return half_at(word((row % 8) * 4 + (k % 8) / 2, reg), k % 2);
    };
    auto b_at = [&](int k, int col) {  // B[k][col]
        return half_at(word(col * 4 + (k % 8) / 2, 4 + (k >= 8 ? 1 : 0)), k % 2);
    };
    const int g = lane / 4, t = lane % 4;
    float result[4];
    for (int e = 0; e < 4; ++e) {
        const int row = g + (e / 2) * 8, col = t * 2 + e % 2;
        float sum = 0.0f;
        for (int k = 0; k < 16; ++k) sum += a_at(row, k) * b_at(k, col);
        result[e] = sum + c[e];
    }
    done_reading();
    for (int e = 0; e < 4; ++e) d[e] = result[e];
}

inline void gie_mma_m16n8k32_s8_s32(int d[4], const unsigned a[4], const unsigned b[2],
                                    const int c[4]) {
    using namespace gie_shim;
    uint32_t mine[6] = {a[0], a[1], a[2], a[3], b[0], b[1]};
    publish(mine, sizeof(mine));
    const auto word = published_word;
    auto a_at = [&](int row, int k) {  // a0: row g, k 4t..4t+3; a1: row g+8; a2/a3: k + 16
        const int reg = (row >= 8 ? 1 : 0) + (k >= 16 ? 2 : 0);
        return s8_at(word((row % 8) * 4 + (k % 16) / 4, reg), k % 4);
    };
    auto b_at = [&](int k, int col) {  // b0: k 4t..4t+3, col g; b1: k + 16
        return s8_at(word(col * 4 + (k % 16) / 4, 4 + (k >= 16 ? 1 : 0)), k % 4);
    };
    const int g = lane / 4, t = lane % 4;
    int result[4];
    for (int e = 0; e < 4; ++e) {
        const int row = g + (e / 2) * 8, col = t * 2 + e % 2;
        int sum = 0;
        for (int k = 0; k < 32; ++k) sum += a_at(row, k) * b_at(k, col);
        result[e] = sum + c[e];
    }
    done_reading();
    for (int e = 0; e < 4; ++e) d[e] = result[e];
}

// 2:4 sparse mma (mma.sp::ordered_metadata, sparsity selector 0), per the PTX ISA sparse
// fragment layouts. Metadata: a 4-bit nibble i0 | i1 << 2 per group of 4 logical columns, the
// in-group columns of the group's two kept values (compressed columns 2j, 2j + 1 of group j).
//   f16 m16n8k32: A is the compressed 16x16 (fragment as dense m16n8k16 A), B 32x8 with
//     b[j] = B[2t + 8j .. +1][g]; thread 4g + 0 holds the nibbles of columns 0..15 and thread
//     4g + 1 those of columns 16..31, rows g (bits 0..15) and g + 8 (bits 16..31); threads
//     4g + 2 and 4g + 3 are not read.
//   s8 m16n8k64: A is the compressed 16x32 s8 (fragment as dense m16n8k32 s8 A), B 64x8 with
//     b[j] = B[16j + 4t .. +3][g]; thread 4g + 0: row g, columns 0..31; 4g + 1: row g + 8,
//     columns 0..31; 4g + 2: row g, columns 32..63; 4g + 3: row g + 8, columns 32..63.
// Products are summed in k order (fp32 for f16, exact int32 for s8).
inline void gie_mma_sp_m16n8k32_f16_f32(float d[4], const unsigned a[4], const unsigned b[4],
                                        const float c[4], unsigned metadata) {
    using namespace gie_shim;
    if (warp().size != 32) { std::fprintf(stderr, "mma.sp needs a full warp\n"); std::abort(); }
    uint32_t mine[9] = {a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], metadata};
    publish(mine, sizeof(mine));
    const auto word = published_word;
    auto a_at = [&](int row, int kc) {  // compressed A[row][kc], kc in 0..15
        const int reg = (row >= 8 ? 1 : 0) + (kc >= 8 ? 2 : 0);
        return half_at(word((row % 8) * 4 + (kc % 8) / 2, reg), kc % 2);
    };
    auto b_at = [&](int k, int col) {  // B[k][col], k in 0..31
        return half_at(word(col * 4 + (k % 8) / 2, 4 + k / 8), k % 2);
    };
    auto nibble = [&](int row, int group) {  // group in 0..7
        const uint32_t meta = word((row % 8) * 4 + group / 4, 8);
        return int((meta >> ((row >= 8 ? 16 : 0) + 4 * (group % 4))) & 0xfu);
    };
    const int g = lane / 4, t = lane % 4;
    float result[4];
    for (int e = 0; e < 4; ++e) {
        const int row = g + (e / 2) * 8, col = t * 2 + e % 2;
        float sum = 0.0f;
        for (int group = 0; group < 8; ++group) {
            const int bits = nibble(row, group);
            sum += a_at(row, 2 * group) * b_at(4 * group + (bits & 3), col);
            sum += a_at(row, 2 * group + 1) * b_at(4 * group + (bits >> 2), col);
        }
        result[e] = sum + c[e];
    }
    done_reading();
    for (int e = 0; e < 4; ++e) d[e] = result[e];
}

inline void gie_mma_sp_m16n8k64_s8_s32(int d[4], const unsigned a[4], const unsigned b[4],
                                       const int c[4], unsigned metadata) {
    using namespace gie_shim;
    if (warp().size != 32) { std::fprintf(stderr, "mma.sp needs a full warp\n"); std::abort(); }
    uint32_t mine[9] = {a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], metadata};
    publish(mine, sizeof(mine));
    const auto word = published_word;
    auto a_at = [&](int row, int kc) {  // compressed A[row][kc], kc in 0..31
        const int reg = (row >= 8 ? 1 : 0) + (kc >= 16 ? 2 : 0);
        return s8_at(word((row % 8) * 4 + (kc % 16) / 4, reg), kc % 4);
    };
    auto b_at = [&](int k, int col) {  // B[k][col], k in 0..63
        return s8_at(word(col * 4 + (k % 16) / 4, 4 + k / 16), k % 4);
    };
    auto nibble = [&](int row, int group) {  // group in 0..15
        const int owner = (row % 8) * 4 + (row >= 8 ? 1 : 0) + (group >= 8 ? 2 : 0);
        return int((word(owner, 8) >> (4 * (group % 8))) & 0xfu);
    };
    const int g = lane / 4, t = lane % 4;
    int result[4];
    for (int e = 0; e < 4; ++e) {
        const int row = g + (e / 2) * 8, col = t * 2 + e % 2;
        int sum = 0;
        for (int group = 0; group < 16; ++group) {
            const int bits = nibble(row, group);
            sum += a_at(row, 2 * group) * b_at(4 * group + (bits & 3), col);
            sum += a_at(row, 2 * group + 1) * b_at(4 * group + (bits >> 2), col);
        }
        result[e] = sum + c[e];
    }
    done_reading();
    for (int e = 0; e < 4; ++e) d[e] = result[e];
}

inline void gie_ldmatrix_x4(unsigned r[4], const void* shared_row) {
    using namespace gie_shim;
    publish(&shared_row, sizeof(shared_row));
    for (int j = 0; j < 4; ++j) {
        const char* row;
        std::memcpy(&row, published(j * 8 + lane / 4), sizeof(row));
        std::memcpy(&r[j], row + (lane % 4) * 4, 4);
    }
    done_reading();
}

inline void gie_ldmatrix_x2_trans(unsigned r[2], const void* shared_row) {
    using namespace gie_shim;
    publish(&shared_row, sizeof(shared_row));
    for (int j = 0; j < 2; ++j) {
        uint16_t halves[2];
        for (int h = 0; h < 2; ++h) {
            const char* row;
            std::memcpy(&row, published(j * 8 + (lane % 4) * 2 + h), sizeof(row));
            std::memcpy(&halves[h], row + (lane / 4) * 2, 2);
        }
        r[j] = uint32_t(halves[0]) | (uint32_t(halves[1]) << 16);
    }
    done_reading();
}

// x4.trans: lanes 8 j .. 8 j + 7 give the rows of matrix j; r[j] as gie_ldmatrix_x2_trans's.
inline void gie_ldmatrix_x4_trans(unsigned r[4], const void* shared_row) {
    using namespace gie_shim;
    publish(&shared_row, sizeof(shared_row));
    for (int j = 0; j < 4; ++j) {
        uint16_t halves[2];
        for (int h = 0; h < 2; ++h) {
            const char* row;
            std::memcpy(&row, published(j * 8 + (lane % 4) * 2 + h), sizeof(row));
            std::memcpy(&halves[h], row + (lane / 4) * 2, 2);
        }
        r[j] = uint32_t(halves[0]) | (uint32_t(halves[1]) << 16);
    }
    done_reading();
}

inline void gie_cp_async_16(void* shared_destination, const void* global_source) {
    if (gie_shim::deferred_cp_async.load()) {
        gie_shim::open_copies.push_back({shared_destination, global_source});
        return;
    }
    std::memcpy(shared_destination, global_source, 16);
}
inline void gie_cp_async_commit() {
    if (!gie_shim::deferred_cp_async.load()) return;
    gie_shim::committed_copies.push_back(std::move(gie_shim::open_copies));
    gie_shim::open_copies.clear();
}
inline void gie_cp_async_wait_all() {  // = commit_group; wait_group 0
    using namespace gie_shim;
    for (const auto& group : committed_copies) land(group);
    land(open_copies);
    committed_copies.clear();
    open_copies.clear();
}
template <int Pending>
inline void gie_cp_async_wait_group() {
    using namespace gie_shim;
    const size_t keep = Pending < 0 ? 0 : size_t(Pending);
    if (committed_copies.size() <= keep) return;
    const size_t landing = committed_copies.size() - keep;
    for (size_t i = 0; i < landing; ++i) land(committed_copies[i]);
    committed_copies.erase(committed_copies.begin(), committed_copies.begin() + landing);
}
