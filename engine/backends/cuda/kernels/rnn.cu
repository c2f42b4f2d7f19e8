// LSTM and GRU as ONE persistent kernel launch over all time steps (TensorRT's temporal fusion
// of recurrent layers), ONNX semantics as engine/ops/rnn.py implements them; fp32 math, fp32 or
// fp16 storage.
//
// Launch: grid (batch, dirs), block of 1 to GIE_RNN_THREADS threads (the __launch_bounds__,
// -D, default 512; min(512, H rounded up to 32) usual). Block (b, d) runs batch entry b in
// direction d through all its time steps in one launch: the hidden state lives in shared memory (fp32, double-buffered so one __syncthreads per step
// suffices), thread k owns hidden units k, k + blockDim.x, ... and computes their gate dot
// products over x_t and h_{t-1}; the LSTM cell state of a unit stays in shared memory owned by
// its thread. GRU with linear_before_reset = 0 needs (r (.) h_{t-1}) of every unit before the
// candidate gate: two __syncthreads per step.
//
// Tensors (layout = 0 / layout = 1, as ONNX's `layout` attribute):
//   X    [seq, batch, input]     / [batch, seq, input]
//   W    [dirs, G*H, input]  (weights_transposed = 0, the ONNX layout) or [dirs, input, G*H]
//        (weights_transposed = 1: consecutive threads read consecutive units, coalesced)
//   R    [dirs, G*H, H]          or [dirs, H, G*H] (same flag)
//   B    [dirs, 2*G*H] (Wb then Rb), nullable (zeros)
//   sequence_lens [batch] int32, nullable (all = seq); clamped to [0, seq]
//   initial_h, initial_c, Y_h, Y_c  [dirs, batch, H] / [batch, dirs, H]; inputs nullable (zeros)
//   P    [dirs, 3*H] LSTM peepholes (i, o, f), nullable (zeros)
//   Y    [seq, dirs, batch, H]   / [batch, seq, dirs, H]; outputs nullable (not written)
//   xw   nullable: a pre-pass's X @ W^T WITHOUT the bias, one row per X row (row t*batch + b for
//        layout 0, b*seq + t for layout 1) of dirs*G*H values (direction d at columns
//        d*G*H ..). E.g. gie_gemm_simt(A = X as [seq*batch, input], B = W transposed to
//        [input, dirs*G*H]). When given, X and W are not read.
// Gates: LSTM i, o, f, c (G = 4); GRU z, r, h (G = 3). Activations are the ONNX defaults
// (sigmoid, tanh, tanh); clip >= 0 clamps every gate pre-activation to [-clip, clip] (before
// the peepholes, as the reference), clip < 0 turns it off. direction: 0 forward, 1 reverse,
// 2 bidirectional (d = 1 runs reversed). A reversed batch entry of length L runs t = L-1 .. 0.
// Steps t >= L of an entry emit zeros and leave its state alone (Y_h/Y_c = state after L steps).
// The state is carried in fp32 between steps (fp16 storage rounds only what is stored).
//
// -D macros: GIE_RNN_THREADS (launch bound, default 512), GIE_RNN_MAX_HIDDEN (shared state size).
// Constraints: H <= GIE_RNN_MAX_HIDDEN (default 1024; the block returns without writing
// otherwise, the tactic check refuses it); static shared memory 4 * (2 + 1) * MAX bytes for
// LSTM (12 KiB), 4 * (2 + 3) * MAX for GRU (20 KiB).
#include "gie_prelude.cuh"

#ifndef GIE_RNN_THREADS
#define GIE_RNN_THREADS 512
#endif
#ifndef GIE_RNN_MAX_HIDDEN
#define GIE_RNN_MAX_HIDDEN 1024
#endif

GIE_DEVICE float rnn_sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

GIE_DEVICE float rnn_clip(float x, float clip) {
    return clip >= 0.0f ? fminf(fmaxf(x, -clip), clip) : x;
}

// acc[g] += sum_k v[k] * M[row0 + g * hidden, k] for one direction's matrix M of `rows` rows
// and K columns, stored [rows, K] (transposed = 0) or [K, rows] (transposed = 1).
template <int G, typename T, typename V>
GIE_DEVICE void rnn_gemv(float (&acc)[G], const T* __restrict__ m, const V* __restrict__ v,
                         int K, int rows, int hidden, int row0, int transposed) {
    const int row_step = transposed ? 1 : K;
    const int k_step = transposed ? rows : 1;
    const T* column = m + row0 * row_step;
#pragma unroll 2
    for (int k = 0; k < K; ++k) {
        const float vk = gie_load(v + k);
        const T* mk = column + k * k_step;
#pragma unroll
        for (int g = 0; g < G; ++g) acc[g] += vk * gie_load(mk + g * hidden * row_step);
    }
}

// Where things are for one (batch entry, direction) block.
struct RnnGeometry {
    int seq, batch, dirs, hidden, layout, b, d;
    int length;    // valid steps of this batch entry
    bool reverse;  // runs t = length-1 .. 0

    GIE_DEVICE int time_of(int step) const { return reverse ? length - 1 - step : step; }
    // Row of X (and of xw) holding x_t of this batch entry.
    GIE_DEVICE long long x_row(int t) const {
        return layout ? (long long)b * seq + t : (long long)t * batch + b;
    }
    GIE_DEVICE long long y_offset(int t, int j) const {
        return layout ? (((long long)b * seq + t) * dirs + d) * hidden + j
                      : (((long long)t * dirs + d) * batch + b) * hidden + j;
    }
    GIE_DEVICE long long state_offset(int j) const {
        return layout ? ((long long)b * dirs + d) * hidden + j
                      : ((long long)d * batch + b) * hidden + j;
    }
};

GIE_DEVICE bool rnn_geometry(RnnGeometry& g, const int* sequence_lens, int seq, int batch,
                             int hidden, int direction, int layout) {
    g.seq = seq;
    g.batch = batch;
    g.dirs = direction == 2 ? 2 : 1;
    g.hidden = hidden;
    g.layout = layout;
    g.b = blockIdx.x;
    g.d = blockIdx.y;
    if (g.b >= batch || g.d >= g.dirs || hidden > GIE_RNN_MAX_HIDDEN || hidden <= 0) return false;
    g.reverse = direction == 1 || g.d == 1;
    int length = sequence_lens != nullptr ? sequence_lens[g.b] : seq;
    g.length = length < 0 ? 0 : (length > seq ? seq : length);
    return true;
}

// Y rows of the steps past this entry's length are zeros.
template <typename T>
GIE_DEVICE void rnn_zero_tail(const RnnGeometry& g, T* Y) {
    if (Y == nullptr) return;
    for (int t = g.length; t < g.seq; ++t)
        for (int j = threadIdx.x; j < g.hidden; j += blockDim.x) gie_store(Y + g.y_offset(t, j), 0.0f);
}

// Bias of gate `gate` of unit j: Wb + Rb (with_recurrent) or Wb only.
template <typename T>
GIE_DEVICE float rnn_bias(const T* Bd, int rows, int index, bool with_recurrent) {
    if (Bd == nullptr) return 0.0f;
    return gie_load(Bd + index) + (with_recurrent ? gie_load(Bd + rows + index) : 0.0f);
}

// The input projection of gates first .. first+G-1 of unit j at time t: from xw or X @ W^T.
template <int G, typename T>
GIE_DEVICE void rnn_input_part(float (&acc)[G], const RnnGeometry& g, const T* X, const T* Wd,
                               const T* xw, int input, int rows, int j, int t, int transposed) {
    if (xw != nullptr) {
        const T* row = xw + g.x_row(t) * g.dirs * rows + (long long)g.d * rows + j;
#pragma unroll
        for (int k = 0; k < G; ++k) acc[k] += gie_load(row + k * g.hidden);
    } else {
        rnn_gemv<G>(acc, Wd, X + g.x_row(t) * input, input, rows, g.hidden, j, transposed);
    }
}

template <typename T>
__device__ void lstm_persistent(const T* __restrict__ X, const T* __restrict__ W,
                                const T* __restrict__ R, const T* __restrict__ B,
                                const int* __restrict__ sequence_lens,
                                const T* __restrict__ initial_h, const T* __restrict__ initial_c,
                                const T* __restrict__ P, const T* __restrict__ xw, T* Y, T* Y_h,
                                T* Y_c, int seq, int batch, int input, int hidden,
                                int direction, int layout, int transposed, float clip,
                                int input_forget) {
    __shared__ float h_buffer[2][GIE_RNN_MAX_HIDDEN];
    __shared__ float c_state[GIE_RNN_MAX_HIDDEN];
    RnnGeometry g;
    if (!rnn_geometry(g, sequence_lens, seq, batch, hidden, direction, layout)) return;
    const int rows = 4 * hidden;
    const T* Wd = W + (long long)g.d * rows * input;
    const T* Rd = R + (long long)g.d * rows * hidden;
    const T* Bd = B != nullptr ? B + (long long)g.d * 2 * rows : nullptr;
    const T* Pd = P != nullptr ? P + (long long)g.d * 3 * hidden : nullptr;
    for (int j = threadIdx.x; j < hidden; j += blockDim.x) {
        const long long at = g.state_offset(j);
        h_buffer[0][j] = initial_h != nullptr ? gie_load(initial_h + at) : 0.0f;
        c_state[j] = initial_c != nullptr ? gie_load(initial_c + at) : 0.0f;
    }
    __syncthreads();
    for (int step = 0; step < g.length; ++step) {
        const int t = g.time_of(step);
        const float* h_prev = h_buffer[step & 1];
        float* h_next = h_buffer[(step & 1) ^ 1];
        for (int j = threadIdx.x; j < hidden; j += blockDim.x) {
            float acc[4];
#pragma unroll
            for (int k = 0; k < 4; ++k) acc[k] = rnn_bias(Bd, rows, k * hidden + j, true);
            rnn_input_part<4>(acc, g, X, Wd, xw, input, rows, j, t, transposed);
            rnn_gemv<4>(acc, Rd, h_prev, hidden, rows, hidden, j, transposed);
#pragma unroll
            for (int k = 0; k < 4; ++k) acc[k] = rnn_clip(acc[k], clip);
            const float c = c_state[j];
            const float pi = Pd != nullptr ? gie_load(Pd + j) : 0.0f;
            const float po = Pd != nullptr ? gie_load(Pd + hidden + j) : 0.0f;
            const float pf = Pd != nullptr ? gie_load(Pd + 2 * hidden + j) : 0.0f;
            const float i = rnn_sigmoid(acc[0] + pi * c);
            const float f = input_forget ? 1.0f - i : rnn_sigmoid(acc[2] + pf * c);
            const float c_new = f * c + i * tanhf(acc[3]);
            const float o = rnn_sigmoid(acc[1] + po * c_new);
            const float h_new = o * tanhf(c_new);
            c_state[j] = c_new;
            h_next[j] = h_new;
            if (Y != nullptr) gie_store(Y + g.y_offset(t, j), h_new);
        }
        __syncthreads();
    }
    const float* h_final = h_buffer[g.length & 1];
    for (int j = threadIdx.x; j < hidden; j += blockDim.x) {
        const long long at = g.state_offset(j);
        if (Y_h != nullptr) gie_store(Y_h + at, h_final[j]);
        if (Y_c != nullptr) gie_store(Y_c + at, c_state[j]);
    }
    rnn_zero_tail(g, Y);
}

template <typename T>
__device__ void gru_persistent(const T* __restrict__ X, const T* __restrict__ W,
                               const T* __restrict__ R, const T* __restrict__ B,
                               const int* __restrict__ sequence_lens,
                               const T* __restrict__ initial_h, const T* __restrict__ xw, T* Y,
                               T* Y_h, int seq, int batch, int input, int hidden, int direction,
                               int layout, int transposed, float clip,
                               int linear_before_reset) {
    __shared__ float h_buffer[2][GIE_RNN_MAX_HIDDEN];
    __shared__ float z_gate[GIE_RNN_MAX_HIDDEN];
    __shared__ float reset_h[GIE_RNN_MAX_HIDDEN];  // r (.) h_{t-1}
    __shared__ float x_part[GIE_RNN_MAX_HIDDEN];   // x_t . W_h + Wb_h + Rb_h
    RnnGeometry g;
    if (!rnn_geometry(g, sequence_lens, seq, batch, hidden, direction, layout)) return;
    const int rows = 3 * hidden;
    const T* Wd = W + (long long)g.d * rows * input;
    const T* Rd = R + (long long)g.d * rows * hidden;
    const T* Bd = B != nullptr ? B + (long long)g.d * 2 * rows : nullptr;
    for (int j = threadIdx.x; j < hidden; j += blockDim.x)
        h_buffer[0][j] = initial_h != nullptr ? gie_load(initial_h + g.state_offset(j)) : 0.0f;
    __syncthreads();
    for (int step = 0; step < g.length; ++step) {
        const int t = g.time_of(step);
        const float* h_prev = h_buffer[step & 1];
        float* h_next = h_buffer[(step & 1) ^ 1];
        for (int j = threadIdx.x; j < hidden; j += blockDim.x) {
            float ax[3];
            ax[0] = rnn_bias(Bd, rows, j, true);
            ax[1] = rnn_bias(Bd, rows, hidden + j, true);
            ax[2] = rnn_bias(Bd, rows, 2 * hidden + j, false);
            rnn_input_part<3>(ax, g, X, Wd, xw, input, rows, j, t, transposed);
            if (linear_before_reset) {
                float ah[3] = {0.0f, 0.0f, 0.0f};
                rnn_gemv<3>(ah, Rd, h_prev, hidden, rows, hidden, j, transposed);
                const float rb_h = Bd != nullptr ? gie_load(Bd + rows + 2 * hidden + j) : 0.0f;
                const float z = rnn_sigmoid(rnn_clip(ax[0] + ah[0], clip));
                const float r = rnn_sigmoid(rnn_clip(ax[1] + ah[1], clip));
                const float candidate = tanhf(rnn_clip(ax[2] + r * (ah[2] + rb_h), clip));
                const float h_new = (1.0f - z) * candidate + z * h_prev[j];
                h_next[j] = h_new;
                if (Y != nullptr) gie_store(Y + g.y_offset(t, j), h_new);
            } else {
                float ah[2] = {0.0f, 0.0f};
                rnn_gemv<2>(ah, Rd, h_prev, hidden, rows, hidden, j, transposed);
                z_gate[j] = rnn_sigmoid(rnn_clip(ax[0] + ah[0], clip));
                reset_h[j] = rnn_sigmoid(rnn_clip(ax[1] + ah[1], clip)) * h_prev[j];
                x_part[j] = ax[2] + (Bd != nullptr ? gie_load(Bd + rows + 2 * hidden + j) : 0.0f);
            }
        }
        if (!linear_before_reset) {
            __syncthreads();  // every unit's r (.) h_{t-1} is in reset_h
            for (int j = threadIdx.x; j < hidden; j += blockDim.x) {
                float acc[1] = {x_part[j]};
                rnn_gemv<1>(acc, Rd, reset_h, hidden, rows, hidden, 2 * hidden + j, transposed);
                const float candidate = tanhf(rnn_clip(acc[0], clip));
                const float z = z_gate[j];
                const float h_new = (1.0f - z) * candidate + z * h_prev[j];
                h_next[j] = h_new;
                if (Y != nullptr) gie_store(Y + g.y_offset(t, j), h_new);
            }
        }
        __syncthreads();
    }
    const float* h_final = h_buffer[g.length & 1];
    if (Y_h != nullptr)
        for (int j = threadIdx.x; j < hidden; j += blockDim.x)
            gie_store(Y_h + g.state_offset(j), h_final[j]);
    rnn_zero_tail(g, Y);
}

extern "C" __global__ void __launch_bounds__(GIE_RNN_THREADS, 1) gie_lstm_persistent_f32(
    const float* X, const float* W, const float* R, const float* B, const int* sequence_lens,
    const float* initial_h, const float* initial_c, const float* P, const float* xw, float* Y,
    float* Y_h, float* Y_c, int seq, int batch, int input, int hidden, int direction, int layout,
    int weights_transposed, float clip, int input_forget) {
    lstm_persistent(X, W, R, B, sequence_lens, initial_h, initial_c, P, xw, Y, Y_h, Y_c, seq,
                    batch, input, hidden, direction, layout, weights_transposed, clip,
                    input_forget);
}

extern "C" __global__ void __launch_bounds__(GIE_RNN_THREADS, 1) gie_lstm_persistent_f16(
    const gie_half* X, const gie_half* W, const gie_half* R, const gie_half* B,
    const int* sequence_lens, const gie_half* initial_h, const gie_half* initial_c,
    const gie_half* P, const gie_half* xw, gie_half* Y, gie_half* Y_h, gie_half* Y_c, int seq,
    int batch, int input, int hidden, int direction, int layout, int weights_transposed,
    float clip, int input_forget) {
    lstm_persistent(X, W, R, B, sequence_lens, initial_h, initial_c, P, xw, Y, Y_h, Y_c, seq,
                    batch, input, hidden, direction, layout, weights_transposed, clip,
                    input_forget);
}

extern "C" __global__ void __launch_bounds__(GIE_RNN_THREADS, 1) gie_gru_persistent_f32(
    const float* X, const float* W, const float* R, const float* B, const int* sequence_lens,
    const float* initial_h, const float* xw, float* Y, float* Y_h, int seq, int batch, int input,
    int hidden, int direction, int layout, int weights_transposed, float clip,
    int linear_before_reset) {
    gru_persistent(X, W, R, B, sequence_lens, initial_h, xw, Y, Y_h, seq, batch, input, hidden,
                   direction, layout, weights_transposed, clip, linear_before_reset);
}

extern "C" __global__ void __launch_bounds__(GIE_RNN_THREADS, 1) gie_gru_persistent_f16(
    const gie_half* X, const gie_half* W, const gie_half* R, const gie_half* B,
    const int* sequence_lens, const gie_half* initial_h, const gie_half* xw, gie_half* Y,
    gie_half* Y_h, int seq, int batch, int input, int hidden, int direction, int layout,
    int weights_transposed, float clip, int linear_before_reset) {
    gru_persistent(X, W, R, B, sequence_lens, initial_h, xw, Y, Y_h, seq, batch, input, hidden,
                   direction, layout, weights_transposed, clip, linear_before_reset);
}
