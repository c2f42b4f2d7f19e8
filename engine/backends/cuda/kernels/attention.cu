// Fused flash-style attention for gie::Attention (engine/ops/gie_transformer.py):
//   out[b, i, h*Dv + e] = sum_j softmax_j(scale * <Q[b, i, h*D:], K[b', j, h*D:]> + mask[b, h, i, j]
//                                         (causal: -inf where j > i + seq_k - seq_q))
//                         * V[b', j, h*Dv + e]
// The [seq_q, seq_k] scores never reach global memory: K/V tiles of GIE_ATTN_BK keys are
// streamed through shared memory and the softmax is online (running max m and sum l per query
// row; the accumulator is rescaled by exp(m_old - m_new) whenever the max grows). fp32 math;
// the _f16 entries keep Q/K/V/mask/out in fp16 (gie_half).
//
// Layouts (all element counts, strides as long long so a packed [b, s, 3*hidden] QKV works):
//   Q row (b, i) at q + b*q_sb + i*q_sr, head h columns h*D .. h*D+D-1 (D = head_dim)
//   K row (b, j) at k + b*k_sb + j*k_sr, head h columns h*D ..       (k_sb = 0: K batch 1)
//   V row (b, j) at v + b*v_sb + j*v_sr, head h columns h*Dv ..      (Dv = head_dim_v)
//   out row (b, i) at out + b*o_sb + i*o_sr, head h columns h*Dv .. (contiguous [B, Sq, H*Dv]:
//     o_sb = Sq*H*Dv, o_sr = H*Dv)
//   mask (nullable) element (b, h, i, j) at mask + b*m_sb + h*m_sh + i*m_sq + j*m_sk: a mask
//     broadcastable to [B, H, Sq, Sk] (numpy rules) gets stride 0 on its broadcast axes, e.g.
//     [B,1,1,Sk]: (Sk, 0, 0, 1); [B,1,Sq,Sk]: (Sq*Sk, 0, Sk, 1); [Sq,Sk]: (0, 0, Sk, 1).
//   The mask has the storage type of the entry (fp16 for _f16).
// Rows whose every score is -inf (a causal mask with seq_q > seq_k, or -inf in the mask) come
// out NaN, exactly like the reference (softmax of all -inf).
//
// gie_attention_f32 / gie_attention_f16: SIMT. Block GIE_ATTN_WARPS warps; warp w owns query
//   rows q0 + w*GIE_ATTN_ROWS .. +GIE_ATTN_ROWS-1 of the tile (BQ = WARPS*ROWS rows); lane =
//   key column of the 32-key tile for the scores, lane + 32 j = output column for P@V.
//   Launch: grid (ceil(seq_q / BQ), num_heads, batch), block exactly GIE_ATTN_WARPS*32.
// gie_attention_mma_f16: tensor cores (gie_mma_m16n8k16_f16_f32, fp32 accumulation); one warp
//   per 16 query rows, GIE_ATTN_MMA_WARPS warps per block (BQ = 16*WARPS rows), 32-key K/V
//   tiles in shared fp16, S and P kept in registers (the score accumulator fragments are reused
//   as the A operand of P@V). Same arguments; launch: grid (ceil(seq_q / (16*WARPS)),
//   num_heads, batch), block exactly GIE_ATTN_MMA_WARPS*32. P is rounded to fp16 for the
//   second product (as FlashAttention does), so it matches the reference to ~1e-2.
//
// Constraints: head_dim, head_dim_v <= GIE_ATTN_MAX_D (compile-time, a multiple of 32, default
// 128); any seq_q, seq_k >= 1 (bounds-checked); K/V batch 1 or B (set k_sb/v_sb to 0).
// -D macros: GIE_ATTN_MAX_D (128), GIE_ATTN_WARPS (4), GIE_ATTN_ROWS (4), GIE_ATTN_MMA_WARPS (4).
// Static shared memory (f32 or f16 SIMT, fp32 tiles): 4*(BQ*MAX_D + 32*(2*MAX_D+1) + BQ*32)
// bytes = 42.6 KB at the defaults; it must stay under 48 KB (BQ*MAX_D <= 2048 at MAX_D 128).
#include "gie_prelude.cuh"

#ifndef GIE_ATTN_MAX_D
#define GIE_ATTN_MAX_D 128
#endif
#ifndef GIE_ATTN_WARPS
#define GIE_ATTN_WARPS 4
#endif
#ifndef GIE_ATTN_ROWS
#define GIE_ATTN_ROWS 4
#endif
#ifndef GIE_ATTN_MMA_WARPS
#define GIE_ATTN_MMA_WARPS 4
#endif
#define GIE_ATTN_BQ (GIE_ATTN_WARPS * GIE_ATTN_ROWS)
#define GIE_ATTN_BK 32
#define GIE_ATTN_DJ (GIE_ATTN_MAX_D / 32)

static_assert(GIE_ATTN_MAX_D % 32 == 0 && GIE_ATTN_MAX_D > 0, "GIE_ATTN_MAX_D: a multiple of 32");
static_assert(GIE_ATTN_WARPS >= 1 && GIE_ATTN_ROWS >= 1, "GIE_ATTN_WARPS/ROWS >= 1");

#ifdef GIE_CPU_SHIM
#define GIE_ATTN_NEG_INF (-HUGE_VALF)
#else
#define GIE_ATTN_NEG_INF __int_as_float(0xff800000)
#endif

// The last key (exclusive) any row of [q0, q0 + rows) may see: seq_k, or the causal limit.
__device__ __forceinline__ int gie_attn_key_end(int q0, int rows, int seq_q, int seq_k,
                                                int causal) {
    if (!causal) return seq_k;
    const int last_row = min(q0 + rows, seq_q) - 1;
    return max(0, min(seq_k, last_row + seq_k - seq_q + 1));
}

// One running-softmax step for one query row held across a warp (or a thread group): the new
// running max from the tile max, the rescale factor of the old state, exp(x - m_new) of a score.
// A row that has seen only -inf keeps m = -inf, l = 0, acc = 0 (alpha 1, p 0).
__device__ __forceinline__ float gie_attn_alpha(float m_old, float m_new) {
    return m_new == GIE_ATTN_NEG_INF ? 1.0f : expf(m_old - m_new);
}
__device__ __forceinline__ float gie_attn_p(float x, float m_new) {
    return m_new == GIE_ATTN_NEG_INF ? 0.0f : expf(x - m_new);
}

template <typename T>
__device__ __forceinline__ void attention_simt(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
    const T* __restrict__ mask, T* __restrict__ out, int seq_q, int seq_k, int head_dim,
    int head_dim_v, long long q_sb, long long q_sr, long long k_sb, long long k_sr, long long v_sb,
    long long v_sr, long long o_sb, long long o_sr, long long m_sb, long long m_sh, long long m_sq,
    long long m_sk, float scale, int causal) {
    __shared__ float q_s[GIE_ATTN_BQ][GIE_ATTN_MAX_D];
    __shared__ float k_s[GIE_ATTN_BK][GIE_ATTN_MAX_D + 1];  // +1: lane = key reads column d
    __shared__ float v_s[GIE_ATTN_BK][GIE_ATTN_MAX_D];
    __shared__ float p_s[GIE_ATTN_BQ][GIE_ATTN_BK];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int head = blockIdx.y, batch = blockIdx.z;
    const int q0 = blockIdx.x * GIE_ATTN_BQ;
    const int r0 = warp * GIE_ATTN_ROWS;  // this warp's first row in the tile
    q += batch * q_sb + (long long)head * head_dim;
    k += batch * k_sb + (long long)head * head_dim;
    v += batch * v_sb + (long long)head * head_dim_v;
    out += batch * o_sb + (long long)head * head_dim_v;
    if (mask) mask += batch * m_sb + head * m_sh;
    const int shift = seq_k - seq_q;  // causal: key j allowed for row i when j <= i + shift

    // This warp's Q rows (zero beyond seq_q); only this warp reads them.
#pragma unroll
    for (int i = 0; i < GIE_ATTN_ROWS; ++i) {
        const int row = q0 + r0 + i;
        for (int d = lane; d < head_dim; d += 32)
            q_s[r0 + i][d] = row < seq_q ? gie_load(q + row * q_sr + d) : 0.0f;
    }

    float m[GIE_ATTN_ROWS], l[GIE_ATTN_ROWS], acc[GIE_ATTN_ROWS][GIE_ATTN_DJ];
#pragma unroll
    for (int i = 0; i < GIE_ATTN_ROWS; ++i) {
        m[i] = GIE_ATTN_NEG_INF;
        l[i] = 0.0f;
#pragma unroll
        for (int j = 0; j < GIE_ATTN_DJ; ++j) acc[i][j] = 0.0f;
    }

    const int key_end = gie_attn_key_end(q0, GIE_ATTN_BQ, seq_q, seq_k, causal);
    for (int k0 = 0; k0 < key_end; k0 += GIE_ATTN_BK) {
        __syncthreads();  // the previous tile's K/V are read by every warp
        for (int c = warp; c < GIE_ATTN_BK; c += GIE_ATTN_WARPS) {
            const int key = k0 + c;
            const bool inside = key < seq_k;
            for (int d = lane; d < head_dim; d += 32)
                k_s[c][d] = inside ? gie_load(k + key * k_sr + d) : 0.0f;
            for (int d = lane; d < head_dim_v; d += 32)
                v_s[c][d] = inside ? gie_load(v + key * v_sr + d) : 0.0f;
        }
        __syncthreads();

        // Scores: lane = key column, one per owned row.
        float s[GIE_ATTN_ROWS];
#pragma unroll
        for (int i = 0; i < GIE_ATTN_ROWS; ++i) s[i] = 0.0f;
#pragma unroll 4
        for (int d = 0; d < head_dim; ++d) {
            const float kd = k_s[lane][d];
#pragma unroll
            for (int i = 0; i < GIE_ATTN_ROWS; ++i) s[i] = fmaf(q_s[r0 + i][d], kd, s[i]);
        }
        const int key = k0 + lane;
#pragma unroll
        for (int i = 0; i < GIE_ATTN_ROWS; ++i) {
            const int row = q0 + r0 + i;
            const bool allowed = key < seq_k && (!causal || key <= row + shift);
            float x = s[i] * scale;
            if (allowed && mask && row < seq_q) x += gie_load(mask + row * m_sq + key * m_sk);
            x = allowed ? x : GIE_ATTN_NEG_INF;
            const float m_new = fmaxf(m[i], gie_warp_max(x));
            const float p = gie_attn_p(x, m_new);
            const float alpha = gie_attn_alpha(m[i], m_new);
            l[i] = l[i] * alpha + gie_warp_sum(p);
            m[i] = m_new;
            p_s[r0 + i][lane] = p;
#pragma unroll
            for (int j = 0; j < GIE_ATTN_DJ; ++j) acc[i][j] *= alpha;
        }
        __syncwarp();  // p_s rows are this warp's own

        // acc += P @ V: lane + 32 j = output column.
        const int count = min(GIE_ATTN_BK, seq_k - k0);
        for (int c = 0; c < count; ++c) {
            float vc[GIE_ATTN_DJ];
#pragma unroll
            for (int j = 0; j < GIE_ATTN_DJ; ++j)
                vc[j] = 32 * j < head_dim_v ? v_s[c][lane + 32 * j] : 0.0f;
#pragma unroll
            for (int i = 0; i < GIE_ATTN_ROWS; ++i) {
                const float p = p_s[r0 + i][c];
#pragma unroll
                for (int j = 0; j < GIE_ATTN_DJ; ++j) acc[i][j] = fmaf(p, vc[j], acc[i][j]);
            }
        }
    }

#pragma unroll
    for (int i = 0; i < GIE_ATTN_ROWS; ++i) {
        const int row = q0 + r0 + i;
        if (row >= seq_q) continue;
        const float inverse = 1.0f / l[i];  // l = 0 (all -inf): 0 * inf = NaN, as the reference
#pragma unroll
        for (int j = 0; j < GIE_ATTN_DJ; ++j) {
            const int col = lane + 32 * j;
            if (col < head_dim_v) gie_store(out + row * o_sr + col, acc[i][j] * inverse);
        }
    }
}

extern "C" __global__ void __launch_bounds__(GIE_ATTN_WARPS * 32, 1)
gie_attention_f32(const float* q, const float* k, const float* v, const float* mask,
                  float* out, int seq_q, int seq_k, int head_dim, int head_dim_v,
                  long long q_sb, long long q_sr, long long k_sb, long long k_sr,
                  long long v_sb, long long v_sr, long long o_sb, long long o_sr,
                  long long m_sb, long long m_sh, long long m_sq, long long m_sk,
                  float scale, int causal) {
    attention_simt<float>(q, k, v, mask, out, seq_q, seq_k, head_dim, head_dim_v, q_sb, q_sr, k_sb,
                   k_sr, v_sb, v_sr, o_sb, o_sr, m_sb, m_sh, m_sq, m_sk, scale, causal);
}

extern "C" __global__ void __launch_bounds__(GIE_ATTN_WARPS * 32, 1)
gie_attention_f16(const gie_half* q, const gie_half* k, const gie_half* v, const gie_half* mask,
                  gie_half* out, int seq_q, int seq_k, int head_dim, int head_dim_v,
                  long long q_sb, long long q_sr, long long k_sb, long long k_sr,
                  long long v_sb, long long v_sr, long long o_sb, long long o_sr,
                  long long m_sb, long long m_sh, long long m_sq, long long m_sk,
                  float scale, int causal) {
    attention_simt<gie_half>(q, k, v, mask, out, seq_q, seq_k, head_dim, head_dim_v, q_sb, q_sr, k_sb,
                   k_sr, v_sb, v_sr, o_sb, o_sr, m_sb, m_sh, m_sq, m_sk, scale, causal);
}

// --------------------------------------------------------------------------- tensor cores
#define GIE_ATTN_MMA_BQ (16 * GIE_ATTN_MMA_WARPS)
#define GIE_ATTN_HPITCH (GIE_ATTN_MAX_D + 8)  // halves per K/V row: 16-byte rows, no conflicts
#define GIE_ATTN_KC (GIE_ATTN_MAX_D / 16)      // k16 chunks of head_dim
#define GIE_ATTN_NV (GIE_ATTN_MAX_D / 8)       // n8 tiles of head_dim_v

// Two fp16 values of a row (columns d, d + 1), zero outside [0, limit) or when !inside.
__device__ __forceinline__ unsigned gie_attn_pair(const gie_half* row, int d, int limit,
                                                  bool inside) {
    const gie_half zero = gie_f2h(0.0f);
    return gie_pack_half2(inside && d < limit ? row[d] : zero,
                          inside && d + 1 < limit ? row[d + 1] : zero);
}

extern "C" __global__ void __launch_bounds__(GIE_ATTN_MMA_WARPS * 32, 1)
gie_attention_mma_f16(const gie_half* q, const gie_half* k, const gie_half* v,
                      const gie_half* mask, gie_half* out, int seq_q, int seq_k, int head_dim,
                      int head_dim_v, long long q_sb, long long q_sr, long long k_sb,
                      long long k_sr, long long v_sb, long long v_sr, long long o_sb,
                      long long o_sr, long long m_sb, long long m_sh, long long m_sq,
                      long long m_sk, float scale, int causal) {
    __shared__ __align__(16) gie_half k_h[GIE_ATTN_BK][GIE_ATTN_HPITCH];
    __shared__ __align__(16) gie_half v_h[GIE_ATTN_BK][GIE_ATTN_HPITCH];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;  // mma groupID, thread in group
    const int head = blockIdx.y, batch = blockIdx.z;
    const int q0 = blockIdx.x * GIE_ATTN_MMA_BQ;
    const int row_a = q0 + warp * 16 + g, row_b = row_a + 8;  // this thread's two rows
    q += batch * q_sb + (long long)head * head_dim;
    k += batch * k_sb + (long long)head * head_dim;
    v += batch * v_sb + (long long)head * head_dim_v;
    out += batch * o_sb + (long long)head * head_dim_v;
    if (mask) mask += batch * m_sb + head * m_sh;
    const int shift = seq_k - seq_q;
    const int dk_fill = min(GIE_ATTN_MAX_D, (head_dim + 31) & ~31);   // K columns zero-filled
    const int dv_fill = min(GIE_ATTN_MAX_D, (head_dim_v + 7) & ~7);   // V columns zero-filled

    // Q as mma A fragments (16 rows of this warp x head_dim), zero beyond seq_q / head_dim.
    unsigned qf[GIE_ATTN_KC][4];
    {
        const gie_half* qa = q + (long long)row_a * q_sr;
        const gie_half* qb = q + (long long)row_b * q_sr;
        const bool in_a = row_a < seq_q, in_b = row_b < seq_q;
#pragma unroll
        for (int kc = 0; kc < GIE_ATTN_KC; ++kc) {
            const int d = kc * 16 + 2 * t;
            qf[kc][0] = gie_attn_pair(qa, d, head_dim, in_a);
            qf[kc][1] = gie_attn_pair(qb, d, head_dim, in_b);
            qf[kc][2] = gie_attn_pair(qa, d + 8, head_dim, in_a);
            qf[kc][3] = gie_attn_pair(qb, d + 8, head_dim, in_b);
        }
    }

    float m[2] = {GIE_ATTN_NEG_INF, GIE_ATTN_NEG_INF};  // running max of rows a, b
    float l[2] = {0.0f, 0.0f};  // this thread's part of the running sums (group-reduced at the end)
    float o[GIE_ATTN_NV][4];
#pragma unroll
    for (int nv = 0; nv < GIE_ATTN_NV; ++nv) o[nv][0] = o[nv][1] = o[nv][2] = o[nv][3] = 0.0f;

    const int key_end = gie_attn_key_end(q0, GIE_ATTN_MMA_BQ, seq_q, seq_k, causal);
    for (int k0 = 0; k0 < key_end; k0 += GIE_ATTN_BK) {
        __syncthreads();
        for (int c = warp; c < GIE_ATTN_BK; c += GIE_ATTN_MMA_WARPS) {
            const int key = k0 + c;
            const bool inside = key < seq_k;
            const gie_half zero = gie_f2h(0.0f);
            for (int d = lane; d < dk_fill; d += 32)
                k_h[c][d] = inside && d < head_dim ? k[key * k_sr + d] : zero;
            for (int d = lane; d < dv_fill; d += 32)
                v_h[c][d] = inside && d < head_dim_v ? v[key * v_sr + d] : zero;
        }
        __syncthreads();

        // S = Q K^T: four n8 tiles of keys; ldmatrix x4 gives the B fragments of two k16 chunks.
        float s[4][4];
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
            s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
#pragma unroll
            for (int kc = 0; kc < GIE_ATTN_KC; kc += 2) {
                if (kc * 16 >= head_dim) break;
                unsigned b[4];
                gie_ldmatrix_x4(b, &k_h[nt * 8 + (lane & 7)][kc * 16 + (lane >> 3) * 8]);
                gie_mma_m16n8k16_f16_f32(s[nt], qf[kc], b, s[nt]);
                gie_mma_m16n8k16_f16_f32(s[nt], qf[kc + 1], b + 2, s[nt]);
            }
        }

        // Scale, mask, causal; the online softmax of rows a (elements 0, 1) and b (2, 3).
        float tile_max[2] = {GIE_ATTN_NEG_INF, GIE_ATTN_NEG_INF};
#pragma unroll
        for (int nt = 0; nt < 4; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int row = e < 2 ? row_a : row_b;
                const int key = k0 + nt * 8 + 2 * t + (e & 1);
                const bool allowed = key < seq_k && (!causal || key <= row + shift);
                float x = s[nt][e] * scale;
                if (allowed && mask && row < seq_q)
                    x += gie_h2f(mask[row * m_sq + key * m_sk]);
                s[nt][e] = allowed ? x : GIE_ATTN_NEG_INF;
                tile_max[e >> 1] = fmaxf(tile_max[e >> 1], s[nt][e]);
            }
        float alpha[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float mx = tile_max[r];
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            const float m_new = fmaxf(m[r], mx);
            alpha[r] = gie_attn_alpha(m[r], m_new);
            m[r] = m_new;
            l[r] *= alpha[r];
        }
#pragma unroll
        for (int nt = 0; nt < 4; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                s[nt][e] = gie_attn_p(s[nt][e], m[e >> 1]);
                l[e >> 1] += s[nt][e];
            }
#pragma unroll
        for (int nv = 0; nv < GIE_ATTN_NV; ++nv) {
            o[nv][0] *= alpha[0];
            o[nv][1] *= alpha[0];
            o[nv][2] *= alpha[1];
            o[nv][3] *= alpha[1];
        }

        // O += P V: the score fragments of n8 tiles 2 kk, 2 kk + 1 are the A fragment of keys
        // kk*16 .. +15 (rounded to fp16); ldmatrix x2.trans gives V's B fragments.
#pragma unroll
        for (int kk = 0; kk < 2; ++kk) {
            unsigned a[4];
            a[0] = gie_pack_half2(gie_f2h(s[2 * kk][0]), gie_f2h(s[2 * kk][1]));
            a[1] = gie_pack_half2(gie_f2h(s[2 * kk][2]), gie_f2h(s[2 * kk][3]));
            a[2] = gie_pack_half2(gie_f2h(s[2 * kk + 1][0]), gie_f2h(s[2 * kk + 1][1]));
            a[3] = gie_pack_half2(gie_f2h(s[2 * kk + 1][2]), gie_f2h(s[2 * kk + 1][3]));
#pragma unroll
            for (int nv = 0; nv < GIE_ATTN_NV; ++nv) {
                if (nv * 8 >= head_dim_v) break;
                unsigned b[2];
                gie_ldmatrix_x2_trans(b, &v_h[kk * 16 + (lane & 15)][nv * 8]);
                gie_mma_m16n8k16_f16_f32(o[nv], a, b, o[nv]);
            }
        }
    }

#pragma unroll
    for (int r = 0; r < 2; ++r) {
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    }
    const float inverse_a = 1.0f / l[0], inverse_b = 1.0f / l[1];  // l = 0: NaN, as the reference
#pragma unroll
    for (int nv = 0; nv < GIE_ATTN_NV; ++nv) {
        const int col = nv * 8 + 2 * t;
        if (row_a < seq_q) {
            if (col < head_dim_v) gie_store(out + row_a * o_sr + col, o[nv][0] * inverse_a);
            if (col + 1 < head_dim_v) gie_store(out + row_a * o_sr + col + 1, o[nv][1] * inverse_a);
        }
        if (row_b < seq_q) {
            if (col < head_dim_v) gie_store(out + row_b * o_sr + col, o[nv][2] * inverse_b);
            if (col + 1 < head_dim_v) gie_store(out + row_b * o_sr + col + 1, o[nv][3] * inverse_b);
        }
    }
}
