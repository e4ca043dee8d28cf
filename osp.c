/*
osp.c: Outlier-Safe Pre-Training (OSP) in one C file.

Trains a small Llama from raw text with hand-written forward and backward passes, as a
readable reference for "Outlier-Safe Pre-Training for Robust 4-Bit Quantization of Large
Language Models" (Park et al., ACL 2025, arXiv:2506.19697). Adam-trained models grow activation
outliers that break 4-bit quantization; OSP prevents them with three changes to training.

Part I is the method, top to bottom; Part II is the machinery (fast kernels, files, the
command line). Part I, in reading order (grep -n "OSP:" osp.c walks through every line where
OSP differs from a plain Llama trainer):
  layers                 each op's forward then its backward: embedding, rmsnorm, the linear
                         layer (matmul), RoPE, causal attention, SwiGLU, residual, cross-entropy
  Single-Scale RMSNorm   rmsnorm_forward with gain step 0: one gain for all channels
  quantizers             quantize_weight_row (RTN with clip search), quantize_asymmetric,
                         hadamard_transform, FakeQuant
  the model              Config, param_layout, Activations, model_init, model_forward,
                         model_backward
  EmbProj                param_layout, model_init (P_in, P_out random orthogonal), model_forward
                         (x = P_in·e, logits = W_head·P_out·h), model_backward
  Muon                   uses_muon (which tensors), newton_schulz, muon_update, optimizer_step;
                         adamw_update for the rest; lr_factor (the schedule), clip_grad_norm
  the ablation's presets presets[]: adam, muon-only, muon, muon-ssnorm, muon-embproj, osp
  merging                model_merge: EmbProj and SSNorm folded away, a plain Llama remains
  measuring outliers     kurtosis_excess, KurtosisReport (the paper's and the in-context report)
  the 4-bit evaluation   evaluate_model: evaluate_loss under fake quantization, RTN rows
                         (quantize_weights), the FFN Hadamard (rotate_ffn_down), GPTQ rows
  the training step      train_step: a batch, model_forward, model_backward, clipping,
                         optimizer_step

Build: make            Test: make test            Train and sample: make run
*/

// Strict C11 headers leave out M_PI and the POSIX calls used here (realpath, mkdtemp, kill).
#define _DEFAULT_SOURCE 1

#include <ctype.h>
#include <errno.h>
#include <float.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <signal.h>
#include <dirent.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* ############################################################################
 * PART I: THE METHOD
 *
 * The model, its training and its measurement, top to bottom: utilities, the products taken
 * from Part II, layers, quantizers, the model, the optimizers, the presets, merging, kurtosis
 * and the 4-bit evaluation, the training step.
 * ############################################################################ */

/* ============================================================================
 * Utilities: errors, memory, random numbers, a clock
 * ========================================================================== */

// Fatal error: one line naming the problem, exit status 1.
static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fflush(stdout);   // progress lines first, then the error
    fprintf(stderr, "osp: error: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    exit(1);
}

// Recoverable errors (bad files) are reported through this buffer so tests can provoke them
// without the process exiting: a loader returns false after calling fail().
static char osp_error[512];
static bool fail(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(osp_error, sizeof osp_error, fmt, ap);
    va_end(ap);
    return false;
}

static void *xmalloc(size_t n) {
    void *p = malloc(n ? n : 1);
    if (!p) die("out of memory allocating %zu bytes", n);
    return p;
}

static void *xcalloc(size_t count, size_t size) {
    void *p = calloc(count ? count : 1, size ? size : 1);
    if (!p) die("out of memory allocating %zu x %zu bytes", count, size);
    return p;
}

static void *xrealloc(void *p, size_t n) {
    void *bigger = realloc(p, n ? n : 1);
    if (!bigger) die("out of memory allocating %zu bytes", n);
    return bigger;
}

// splitmix64: a tiny, high-quality generator whose whole state is one uint64 (easy to save).
static uint64_t rng_next(uint64_t *state) {
    uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// Uniform float in [0, 1).
static float rng_uniform(uint64_t *state) {
    return (float)(rng_next(state) >> 40) * (1.0f / 16777216.0f);
}

// Standard normal sample (Box-Muller).
static float rng_normal(uint64_t *state) {
    double u1 = ((double)(rng_next(state) >> 11) + 1.0) * (1.0 / 9007199254740993.0);
    double u2 = (double)(rng_next(state) >> 11) * (1.0 / 9007199254740992.0);
    return (float)(sqrt(-2.0 * log(u1)) * cos(2.0 * M_PI * u2));
}

// max(a, b) and min(a, b) for a that is not NaN (a NaN b gives a, as fmaxf and fminf do). Plain
// comparisons inline in the hot loops, where fmaxf and fminf are calls into libm.
static inline float max_float(float a, float b) { return b > a ? b : a; }
static inline float min_float(float a, float b) { return b < a ? b : a; }

static double now_seconds(void) {
    struct timespec ts;
    timespec_get(&ts, TIME_UTC);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

// out [cols, rows] = inᵀ, in [rows, cols].
static void transpose(float *out, const float *in, int rows, int cols) {
    for (int i = 0; i < rows; i++)
        for (int j = 0; j < cols; j++) out[(size_t)j * rows + i] = in[(size_t)i * cols + j];
}

/* ============================================================================
 * What Part I takes from Part II
 *
 * The products, written there as fast kernels. Each computes exactly the sums its comment
 * writes out, in float (the order of the additions aside); test_osp.c checks each against its
 * plain loop. Matrices are row-major; where a row stride is given (a_row: floats from one row
 * to the next), a matrix may be one head's columns of a [tokens, heads·head_dim] tensor.
 * ========================================================================== */

// out [N, OC] = x [N, C]·W [OC, C]ᵀ: out[n][o] = Σ_c x[n][c]·W[o][c] (matmul_reference).
static void matmul(float *out, const float *x, const float *w, int N, int C, int OC);
// dx [N, C] += dout [N, OC]·W and dW [OC, C] += doutᵀ·x: the backward of matmul.
static void matmul_backward(float *dx, float *dw, const float *dout, const float *x, const float *w, int N,
                            int C, int OC);
// out[p] = x·W[p]ᵀ for n <= 8 weights W[p] [OC[p], C] that read the same x (Q, K, V; gate, up).
static void matmuls_same_input(int n, float *const *out, const float *x, const float *const *w, int N, int C,
                               const int *OC);
// Their backward: dW[p] += dout[p]ᵀ·x for each p, and dx += dout[0]·W[0] + dout[1]·W[1] + ...
static void matmuls_same_input_backward(int n, float *dx, float *const *dw, const float *const *dout,
                                        const float *x, const float *const *w, int N, int C, const int *OC);

// The products below run on the calling thread: their callers split the work over threads.
// s [T, T] = a·bᵀ on and below the diagonal, for a, b [T, n]: s[t][u] = Σ_i a[t][i]·b[u][i] for
// u <= t, and s[t][u] = 0 for u > t (up to where causal_mix reads; s is not written beyond).
static void causal_scores(float *s, const float *a, size_t a_row, const float *b, size_t b_row, int T, int n);
// out [T, n] = p·v for p [T, T] as causal_scores leaves it: out[t][i] = Σ_{u <= t} p[t][u]·v[u][i].
static void causal_mix(float *out, size_t out_row, const float *p, const float *v, size_t v_row, int T,
                       int n);
// out [T, n] += p·v, for p as above.
static void causal_mix_add(float *out, size_t out_row, const float *p, const float *v, size_t v_row, int T,
                           int n);
// out [T, n] += pᵀ·v, for p as above: out[u][i] += Σ_{t >= u} p[t][u]·v[t][i].
static void causal_mix_transposed_add(float *out, size_t out_row, const float *p, const float *v,
                                      size_t v_row, int T, int n);
// g [r, r] = x·xᵀ for x [r, c]: g[i][j] = Σ_k x[i][k]·x[j][k].
static void gram_matrix(float *g, const float *x, int r, int c);
// out [M, N] = a [M, K]·b [K, N]: out[i][j] = Σ_k a[i][k]·b[k][j].
static void matrix_product(float *out, const float *a, const float *b, int M, int K, int N);

// A scratch buffer of `floats` floats for the calling thread, one per use, kept for the next call.
// Uses: attention's scores, Muon, the kernel's panel, gemm_parallel's packed B.
enum { WORKSPACE_SCORES, WORKSPACE_MUON, WORKSPACE_PANEL, WORKSPACE_PACKED, N_WORKSPACES };
static float *workspace(int which, size_t floats);

// The 4-bit evaluation's two steps beyond round-to-nearest (Part II: GPTQ and the rotation).
typedef struct Model Model;
// GPTQ of every block matrix of m in place, calibrated on `windows` windows calib [windows, seq_len].
static void gptq_quantize_model(Model *m, const int *calib, int windows, int bits, bool clip_search,
                                bool ffn_hadamard);
// QuaRot's rotation of the residual stream by a random-sign Hadamard: the same function, new weights.
static void rotate_residual(Model *m, uint64_t seed);

/* ============================================================================
 * Layers. Each forward is followed by its backward. Conventions:
 * - N = B*T rows (tokens); matrices are [out][in] row-major, as PyTorch stores them.
 * - Forward functions write their outputs; backward functions ADD into the gradients of their
 *   inputs (a tensor used twice receives both contributions), so gradients start zeroed.
 * - Parallel loops split over outputs, and every sum runs in a fixed order, so results are
 *   bit-identical for any thread count. Loops hand out their work in chunks as threads come
 *   free (schedule(dynamic)): a thread whose core the OS shares with another program then takes
 *   fewer chunks, instead of every loop's end waiting for its fixed share.
 * ========================================================================== */

#define RMSNORM_EPS 1e-5f
#define ROPE_THETA 10000.0f

// Dot product of two length-n vectors (the compiler vectorizes the reduction).
static inline float dot(const float *a, const float *b, int n) {
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int i = 0; i < n; i++) sum += a[i] * b[i];
    return sum;
}

// Embedding lookup: out[n,:] = table[tokens[n],:]. out [N,d], table [V,d].
static void embedding_forward(float *out, const int *tokens, const float *table, int N, int d) {
    for (int n = 0; n < N; n++)
        memcpy(out + (size_t)n * d, table + (size_t)tokens[n] * d, sizeof(float) * (size_t)d);
}

// dtable[tokens[n],:] += dout[n,:]. Serial: two rows may share a token.
static void embedding_backward(float *dtable, const float *dout, const int *tokens, int N, int d) {
    for (int n = 0; n < N; n++) {
        float *row = dtable + (size_t)tokens[n] * d;
        const float *g = dout + (size_t)n * d;
        for (int i = 0; i < d; i++) row[i] += g[i];
    }
}

// RMSNorm: out = gain * x / sqrt(mean(x^2) + eps). inp, out [N,d]; rstd [N] saved.
// gain_step 1: a gain per channel, gain [d] (Llama). gain_step 0: one scalar gain [1] for all
// channels, so no channel can be singled out by its own scale. OSP: Single-Scale RMSNorm.
static void rmsnorm_forward(float *out, float *rstd, const float *inp, const float *gain, int gain_step,
                            int N, int d) {
#pragma omp parallel for schedule(dynamic, 16)
    for (int n = 0; n < N; n++) {
        const float *x = inp + (size_t)n * d;
        float r = 1.0f / sqrtf(dot(x, x, d) / (float)d + RMSNORM_EPS);
        rstd[n] = r;
        float *y = out + (size_t)n * d;
        for (int i = 0; i < d; i++) y[i] = gain[i * gain_step] * x[i] * r;
    }
}

// dx = r*(g*dy) - r^3/d * x * sum(g*dy*x);  dgain += sum over rows (and, for the single
// scale, over channels) of dy * x * r.
static void rmsnorm_backward(float *dinp, float *dgain, const float *dout, const float *inp,
                             const float *gain, int gain_step, const float *rstd, int N, int d) {
#pragma omp parallel for schedule(dynamic, 16)
    for (int n = 0; n < N; n++) {
        const float *x = inp + (size_t)n * d, *dy = dout + (size_t)n * d;
        float r = rstd[n], proj = 0.0f;
        for (int i = 0; i < d; i++) proj += gain[i * gain_step] * dy[i] * x[i];
        float c = proj * r * r * r / (float)d;
        float *dx = dinp + (size_t)n * d;
        for (int i = 0; i < d; i++) dx[i] += r * gain[i * gain_step] * dy[i] - c * x[i];
    }
    for (int n = 0; n < N; n++) {
        const float *x = inp + (size_t)n * d, *dy = dout + (size_t)n * d;
        float r = rstd[n];
        for (int i = 0; i < d; i++) dgain[i * gain_step] += dy[i] * x[i] * r;
    }
}

// Linear layer: out [N, OC] = x [N, C]·Wᵀ for W [OC, C]; backward dx += dout·W, dW += doutᵀ·x.
// These plain loops say what the model computes; it calls matmul and matmul_backward, Part II's
// fast kernels for the same sums, which test_osp.c checks against these loops. (Not static, so
// that a build without the tests does not warn that nothing calls them.)
void matmul_reference(float *out, const float *x, const float *w, int N, int C, int OC);
void matmul_reference(float *out, const float *x, const float *w, int N, int C, int OC) {
    for (int n = 0; n < N; n++)
        for (int o = 0; o < OC; o++) out[(size_t)n * OC + o] = dot(x + (size_t)n * C, w + (size_t)o * C, C);
}

void matmul_backward_reference(float *dx, float *dw, const float *dout, const float *x, const float *w,
                               int N, int C, int OC);
void matmul_backward_reference(float *dx, float *dw, const float *dout, const float *x, const float *w,
                               int N, int C, int OC) {
    for (int n = 0; n < N; n++)
        for (int o = 0; o < OC; o++)
            for (int c = 0; c < C; c++) {
                dx[(size_t)n * C + c] += dout[(size_t)n * OC + o] * w[(size_t)o * C + c];
                dw[(size_t)o * C + c] += dout[(size_t)n * OC + o] * x[(size_t)n * C + c];
            }
}

// Rotary position embedding tables: cos/sin [T_max, head_dim/2] of pos * theta^(-2i/head_dim).
static void rope_tables(float *cos_table, float *sin_table, int T_max, int head_dim) {
    int half = head_dim / 2;
    for (int t = 0; t < T_max; t++)
        for (int i = 0; i < half; i++) {
            double angle = t * pow(ROPE_THETA, -2.0 * i / head_dim);
            cos_table[t * half + i] = (float)cos(angle);
            sin_table[t * half + i] = (float)sin(angle);
        }
}

// RoPE in place on q [B,T,H,head_dim] and k [B,T,KVH,head_dim] (k may be NULL with KVH = 0),
// in one pass: rotates ADJACENT pairs (2i, 2i+1) of each head by angle t * theta^(-2i/head_dim)
// (the Meta / llama2.c layout). sign = +1 applies the rotation; sign = -1 applies its inverse,
// which is exactly the backward pass, because the rotation is orthogonal: dx = Rᵀ dy.
static void rope_rotate(float *q, float *k, const float *cos_table, const float *sin_table, int B, int T,
                        int H, int KVH, int head_dim, float sign) {
    int half = head_dim / 2;
#pragma omp parallel for collapse(2) schedule(dynamic, 16)
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++)
            for (int h = 0; h < H + KVH; h++) {
                size_t row = (size_t)b * T + t;
                float *v = h < H ? q + (row * H + h) * head_dim : k + (row * KVH + h - H) * head_dim;
                for (int i = 0; i < half; i++) {
                    float c = cos_table[t * half + i], s = sign * sin_table[t * half + i];
                    float x0 = v[2 * i], x1 = v[2 * i + 1];
                    v[2 * i] = x0 * c - x1 * s;
                    v[2 * i + 1] = x0 * s + x1 * c;
                }
            }
}

static void rope_forward(float *q, float *k, const float *cos_table, const float *sin_table,
                         int B, int T, int H, int KVH, int head_dim) {
    rope_rotate(q, k, cos_table, sin_table, B, T, H, KVH, head_dim, 1.0f);
}

// In place on dq and dk, unlike the other backwards (which add): when it runs they hold exactly
// the gradient of the rotated q and k, from attention alone.
static void rope_backward(float *dq, float *dk, const float *cos_table, const float *sin_table,
                          int B, int T, int H, int KVH, int head_dim) {
    rope_rotate(dq, dk, cos_table, sin_table, B, T, H, KVH, head_dim, -1.0f);
}

// Offset of head `head`'s first row in batch b of a [B, T, row] tensor of heads of hd values.
static size_t head_offset(int b, int T, size_t row, int head, int hd) {
    return (size_t)b * T * row + (size_t)head * hd;
}

// Causal attention with grouped KV heads: query head h reads KV head h / (H / KVH).
// q [B,T,H,hd], k and v [B,T,KVH,hd], out [B,T,H,hd], att [B,H,T,T] softmax probabilities
// (zero right of the diagonal as far as causal_mix reads; unused values beyond).
// Per (b, h), on one thread: scores S = Q·Kᵀ, each row t becomes P[t] = softmax(scale·S[t][0..t]),
// then out = P·V.
static void attention_forward(float *out, float *att, const float *q, const float *k, const float *v,
                              int B, int T, int H, int KVH, int hd) {
    float scale = 1.0f / sqrtf((float)hd);
    int group = H / KVH;
    size_t q_row = (size_t)H * hd, kv_row = (size_t)KVH * hd;
#pragma omp parallel for collapse(2) schedule(dynamic)
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++) {
            size_t qo = head_offset(b, T, q_row, h, hd), kvo = head_offset(b, T, kv_row, h / group, hd);
            float *p = att + ((size_t)b * H + h) * T * T;
            causal_scores(p, q + qo, q_row, k + kvo, kv_row, T, hd);   // p[t][u] = q[t]·k[u], u <= t
            for (int t = 0; t < T; t++) {
                float *row = p + (size_t)t * T, maxval = -FLT_MAX, sum = 0.0f;
                for (int u = 0; u <= t; u++) { row[u] *= scale; maxval = max_float(maxval, row[u]); }
                for (int u = 0; u <= t; u++) { row[u] = expf(row[u] - maxval); sum += row[u]; }
                float inv = 1.0f / sum;
                for (int u = 0; u <= t; u++) row[u] *= inv;
            }
            causal_mix(out + qo, q_row, p, v + kvo, kv_row, T, hd);   // out[t] = Σ_{u <= t} p[t][u]·v[u]
        }
}

// Backward of attention. With s = scaled scores and p = softmax(s), for each row t:
// dv[u] += p[u]·dout;  dp[u] = dout·v[u];  ds[u] = p[u]·(dp[u] - Σ p·dp), and
// Σ p·dp = dout·out (since out = Σ p·v), so no scratch row is needed.
// dq += scale·Σ ds·k;  dk[u] += scale·ds[u]·q. As matrices, per (b, h): dP = dO·Vᵀ (lower
// triangle), dS from it row by row, dQ += dS·K, dK += dSᵀ·Q, dV += Pᵀ·dO. Parallel over
// (b, KV head), each KV head's query heads in order, so dk and dv rows have one writer.
static void attention_backward(float *dq, float *dk, float *dv, const float *dout, const float *out,
                               const float *att, const float *q, const float *k, const float *v,
                               int B, int T, int H, int KVH, int hd) {
    float scale = 1.0f / sqrtf((float)hd);
    int group = H / KVH;
    size_t q_row = (size_t)H * hd, kv_row = (size_t)KVH * hd;
#pragma omp parallel for collapse(2) schedule(dynamic)
    for (int b = 0; b < B; b++)
        for (int kh = 0; kh < KVH; kh++) {
            size_t kvo = head_offset(b, T, kv_row, kh, hd);
            float *ds = workspace(WORKSPACE_SCORES, (size_t)T * T);
            for (int h = kh * group; h < (kh + 1) * group; h++) {
                size_t qo = head_offset(b, T, q_row, h, hd);
                const float *p = att + ((size_t)b * H + h) * T * T;
                causal_scores(ds, dout + qo, q_row, v + kvo, kv_row, T, hd);   // dP = dO·Vᵀ
                for (int t = 0; t < T; t++) {                                  // dS, in place
                    const float *pt = p + (size_t)t * T;
                    float *dst = ds + (size_t)t * T;
                    float p_dot_dp = dot(dout + qo + t * q_row, out + qo + t * q_row, hd);
                    for (int u = 0; u <= t; u++) dst[u] = pt[u] * (dst[u] - p_dot_dp) * scale;
                }
                causal_mix_add(dq + qo, q_row, ds, k + kvo, kv_row, T, hd);              // dQ += dS·K
                causal_mix_transposed_add(dk + kvo, kv_row, ds, q + qo, q_row, T, hd);   // dK += dSᵀ·Q
                causal_mix_transposed_add(dv + kvo, kv_row, p, dout + qo, q_row, T, hd); // dV += Pᵀ·dO
            }
        }
}

// SwiGLU: out = silu(gate) * up, silu(x) = x * sigmoid(x). All [n].
static void swiglu_forward(float *out, const float *gate, const float *up, size_t n) {
#pragma omp parallel for schedule(dynamic, 8192)
    for (size_t i = 0; i < n; i++) {
        float g = gate[i];
        out[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

// dgate += dout·up·silu'(gate), silu'(x) = s(x)·(1 + x·(1 - s(x)));  dup += dout·silu(gate).
static void swiglu_backward(float *dgate, float *dup, const float *dout, const float *gate, const float *up,
                            size_t n) {
#pragma omp parallel for schedule(dynamic, 8192)
    for (size_t i = 0; i < n; i++) {
        float g = gate[i], s = 1.0f / (1.0f + expf(-g));
        dgate[i] += dout[i] * up[i] * s * (1.0f + g * (1.0f - s));
        dup[i] += dout[i] * g * s;
    }
}

// Residual connection: out = a + b. All [n].
static void residual_forward(float *out, const float *a, const float *b, size_t n) {
#pragma omp parallel for schedule(dynamic, 8192)
    for (size_t i = 0; i < n; i++) out[i] = a[i] + b[i];
}

// da += dout; db += dout.
static void residual_backward(float *da, float *db, const float *dout, size_t n) {
#pragma omp parallel for schedule(dynamic, 8192)
    for (size_t i = 0; i < n; i++) { da[i] += dout[i]; db[i] += dout[i]; }
}

// Softmax cross-entropy: probs [N,V] = softmax(logits), losses [N] = -log probs[target].
static void crossentropy_forward(float *losses, float *probs, const float *logits, const int *targets, int N,
                                 int V) {
#pragma omp parallel for schedule(dynamic, 16)
    for (int n = 0; n < N; n++) {
        const float *z = logits + (size_t)n * V;
        float *p = probs + (size_t)n * V;
        float maxval = -FLT_MAX;
        for (int i = 0; i < V; i++) if (z[i] > maxval) maxval = z[i];
        double sum = 0.0;
        for (int i = 0; i < V; i++) { p[i] = expf(z[i] - maxval); sum += p[i]; }
        float inv = (float)(1.0 / sum);
        for (int i = 0; i < V; i++) p[i] *= inv;
        losses[n] = (float)(log(sum) + maxval - z[targets[n]]);
    }
}

// dlogits += dlosses[n] * (probs - onehot(target)).
static void crossentropy_backward(float *dlogits, const float *dlosses, const float *probs,
                                  const int *targets, int N, int V) {
#pragma omp parallel for schedule(dynamic, 16)
    for (int n = 0; n < N; n++) {
        const float *p = probs + (size_t)n * V;
        float *dz = dlogits + (size_t)n * V;
        for (int i = 0; i < V; i++) dz[i] += dlosses[n] * (p[i] - (i == targets[n] ? 1.0f : 0.0f));
    }
}

/* ============================================================================
 * Quantization primitives (evaluation only): RTN fake quantizers and the Walsh-Hadamard
 * transform, as the paper evaluates. "Fake" quantization rounds a tensor to the values a
 * b-bit integer grid can represent and keeps computing in float, which measures exactly the
 * damage of quantization. Rounding is to nearest, ties to even (rintf), as torch.round does.
 * ========================================================================== */

#define QUANT_OFF 16   // bits >= 16 means full precision

// The symmetric b-bit grid of a weight row: qmax = 2^(bits-1) - 1 steps of s on each side.
static float symmetric_qmax(int bits) { return (float)((1 << (bits - 1)) - 1); }

// w rounded to the grid of step s: clamp(round(w/s), -qmax-1, qmax)·s (w itself if s is 0).
static float round_to_grid(float w, float scale, float qmax) {
    return scale > 0.0f ? min_float(qmax, max_float(-qmax - 1.0f, rintf(w / scale))) * scale : w;
}

static float max_abs(const float *w, int n) {
    float m = 0.0f;
    for (int i = 0; i < n; i++) m = max_float(m, fabsf(w[i]));
    return m;
}

// Symmetric RTN of one weight row w [n] with clip ratio p: s = p·max|w| / qmax, each value
// rounded to that grid. Writes out [n] (may be w); returns Σ |ŵ - w|^2.4, the error the clip
// search minimises.
static double quantize_row_symmetric(float *out, const float *w, int n, int bits, float p) {
    float qmax = symmetric_qmax(bits);
    float scale = p * max_abs(w, n) / qmax;
    double err = 0.0;
    for (int i = 0; i < n; i++) {
        float q = round_to_grid(w[i], scale, qmax);
        err += pow(fabs((double)q - w[i]), 2.4);
        out[i] = q;
    }
    return err;
}

// The clip search of the authors' release for one weight row [n]: try p = 1 - i/100 for
// i = 0..79 and keep the p with the smallest Σ |ŵ - w|^2.4 (the first on ties); 1 without the
// search. scratch holds n floats.
static float clip_ratio(const float *row, int n, int bits, bool clip_search, float *scratch) {
    float best_p = 1.0f;
    if (clip_search) {
        double best_err = INFINITY;
        for (int i = 0; i < 80; i++) {
            float p = 1.0f - (float)i / 100.0f;
            double err = quantize_row_symmetric(scratch, row, n, bits, p);
            if (err < best_err) { best_err = err; best_p = p; }
        }
    }
    return best_p;
}

// Weight quantization of one output row [n] in place, on the grid clip_ratio chooses; scratch
// holds n floats. Returns the chosen p.
static float quantize_weight_row(float *row, int n, int bits, bool clip_search, float *scratch) {
    float p = clip_ratio(row, n, bits, clip_search, scratch);
    quantize_row_symmetric(row, row, n, bits, p);
    return p;
}

// Asymmetric RTN in place over each group of `group` consecutive values of x [n]:
// xmax = max(max x, 0), xmin = min(min x, 0), s = (xmax - xmin) / (2^bits - 1),
// z = round(-xmin / s), q = clamp(round(x/s) + z, 0, 2^bits - 1), x̂ = (q - z)·s.
// Zero is always on the grid, so zeros stay exactly zero. At QUANT_OFF bits, x is left as it is.
static void quantize_asymmetric(float *x, size_t n, int group, int bits) {
    if (bits >= QUANT_OFF) return;
    float levels = (float)((1 << bits) - 1);
    size_t groups = n / (size_t)group;
#pragma omp parallel for schedule(static)
    for (size_t g = 0; g < groups; g++) {
        float *v = x + g * (size_t)group;
        float xmax = 0.0f, xmin = 0.0f;
        for (int i = 0; i < group; i++) { xmax = max_float(xmax, v[i]); xmin = min_float(xmin, v[i]); }
        float scale = (xmax - xmin) / levels;
        if (scale == 0.0f) continue;   // all zeros
        float zero = rintf(-xmin / scale);
        for (int i = 0; i < group; i++)
            v[i] = (min_float(levels, max_float(0.0f, rintf(v[i] / scale) + zero)) - zero) * scale;
    }
}

static bool is_power_of_two(int n) { return n > 0 && (n & (n - 1)) == 0; }

// For a Hadamard matrix of order n = m·2^k: m = 1 when n is a power of two, else the smallest
// m = q + 1 with q a prime ≡ 3 (mod 4), for which Paley's construction gives one (as QuaRot
// uses orders 12·2^k, 20·2^k, ...: 12 = 11 + 1, 20 = 19 + 1), up to 64; 0 if there is none.
#define HADAMARD_FACTOR_MAX 64
static int hadamard_factor(int n) {
    if (is_power_of_two(n)) return 1;
    for (int m = 4; m <= n && m <= HADAMARD_FACTOR_MAX; m += 4) {
        int q = m - 1, prime = 1;
        for (int f = 3; f * f <= q && prime; f += 2) prime = q % f != 0;
        if (prime && n % m == 0 && is_power_of_two(n / m)) return m;
    }
    return 0;
}

// Paley's Hadamard matrix h [m, m] of ±1 (m = q + 1, q a prime ≡ 3 mod 4): I + S with
// S = [[0, 1ᵀ], [-1, Q]] and Q[i][j] = χ(j - i), χ the quadratic character mod q (1 for a
// nonzero square, -1 for a non-square, 0 for 0). Then H·Hᵀ = m·I.
static void paley_matrix(float *h, int m) {
    int q = m - 1;
    for (int i = 0; i < m; i++)
        for (int j = 0; j < m; j++) {
            float v = i == j || i == 0 ? 1.0f : -1.0f;   // I + S on the diagonal, row 0, column 0
            if (i > 0 && j > 0 && i != j) {
                int r = ((j - i) % q + q) % q;
                bool square = false;
                for (int x = 1; x < q && !square; x++) square = x * x % q == r;
                v = square ? 1.0f : -1.0f;
            }
            h[i * m + j] = v;
        }
}

// Normalised Hadamard transform in place of each of the `rows` vectors x [rows, n]: x = H·x
// with H = (P_m ⊗ W_p) / sqrt(n), n = m·p, m = hadamard_factor(n) (which must not be 0), P_m
// Paley's matrix (P_1 = [1]) and W_p the Sylvester matrix of order p = 2^k (W_1 = [1],
// W_2k = [[W_k, W_k], [W_k, -W_k]]). H is orthogonal, H·Hᵀ = I, and symmetric when n is a power
// of two. Seeing x as [m][p]: the butterfly on each row of p (p·log2(p) additions), then P_m
// on each column. hadamard_matrix below is the plain reference.
static void hadamard_transform(float *x, size_t rows, int n) {
    int m = hadamard_factor(n), p = n / m;
    float norm = 1.0f / sqrtf((float)n), paley[HADAMARD_FACTOR_MAX * HADAMARD_FACTOR_MAX];
    if (m == 0) die("internal: no Hadamard transform of order %d", n);
    if (m > 1) paley_matrix(paley, m);
#pragma omp parallel for schedule(static)
    for (size_t r = 0; r < rows; r++) {
        float *v = x + r * (size_t)n;
        for (int seg = 0; seg < m; seg++)
            for (int len = 1; len < p; len <<= 1)
                for (int i = seg * p; i < (seg + 1) * p; i += 2 * len)
                    for (int j = i; j < i + len; j++) {
                        float a = v[j], b = v[j + len];
                        v[j] = a + b;
                        v[j + len] = a - b;
                    }
        for (int b = 0; m > 1 && b < p; b++) {
            float col[HADAMARD_FACTOR_MAX];
            for (int a = 0; a < m; a++) col[a] = v[a * p + b];
            for (int a = 0; a < m; a++) {
                float sum = 0.0f;
                for (int c = 0; c < m; c++) sum += paley[a * m + c] * col[c];
                v[a * p + b] = sum;
            }
        }
        for (int i = 0; i < n; i++) v[i] *= norm;
    }
}

// The normalised Hadamard matrix h [n, n] written out: H[i][j] = P_m[i/p][j/p]·W_p[i%p][j%p] /
// sqrt(n), with W_p[i][j] = (-1)^popcount(i & j). The plain reference for hadamard_transform
// (test_osp.c compares the two); not static, so that a build without the tests does not warn
// that nothing calls it.
void hadamard_matrix(float *h, int n);
void hadamard_matrix(float *h, int n) {
    int m = hadamard_factor(n), p = n / m;
    float *paley = xmalloc(sizeof(float) * (size_t)m * m);
    paley_matrix(paley, m);
    for (int i = 0; i < n; i++)
        for (int j = 0; j < n; j++) {
            int bits = (i % p) & (j % p), parity = 0;
            while (bits) { parity ^= bits & 1; bits >>= 1; }
            h[(size_t)i * n + j] = paley[i / p * m + j / p] * (parity ? -1.0f : 1.0f) / sqrtf((float)n);
        }
    free(paley);
}

// The fake quantization of the activations inside the forward pass (the weights are quantized
// offline, before it). QUANT_OFF bits = full precision.
typedef struct {
    int abits;           // inputs of every block matrix, per token (the Wo input per head)
    int kvbits;          // K after RoPE and V, per (token, head); Q and K get a head_dim Hadamard first
    bool ffn_hadamard;   // rotate the W2 input online, h -> H·h (W2 was rotated to W2·Hᵀ)
} FakeQuant;
static const FakeQuant NO_FAKE_QUANT = {QUANT_OFF, QUANT_OFF, false};

/* ============================================================================
 * Model: configuration, parameters and activations (each one contiguous block)
 * ========================================================================== */

typedef struct {
    int vocab_size;  // V
    int dim;         // d, the residual stream width
    int n_layers;    // L
    int n_heads;     // H query heads
    int n_kv_heads;  // KVH key/value heads (divides H)
    int ffn_dim;     // f, SwiGLU hidden width
    int seq_len;     // T_max, context length
    int ssnorm;      // 1: Single-Scale RMSNorm, one scalar gain per norm (OSP); 0: a gain per channel
    int embproj;     // 1: learnable d x d projections P_in after the embedding, P_out before the head (OSP)
} Config;

// Parameter tensors, in storage order. Per-layer tensors hold all L layers back to back.
// Without EmbProj, embproj_in and embproj_out hold nothing (count 0).
enum {
    PARAM_EMBED,
    PARAM_EMBPROJ_IN,
    PARAM_ATTN_NORM,
    PARAM_ATTN_Q,
    PARAM_ATTN_K,
    PARAM_ATTN_V,
    PARAM_ATTN_OUT,
    PARAM_FFN_NORM,
    PARAM_FFN_GATE,
    PARAM_FFN_UP,
    PARAM_FFN_DOWN,
    PARAM_FINAL_NORM,
    PARAM_EMBPROJ_OUT,
    PARAM_HEAD,
    N_PARAM_TENSORS
};
static const char *param_names[N_PARAM_TENSORS] = {
    "embed", "embproj_in", "attn_norm", "attn_q", "attn_k", "attn_v", "attn_out",
    "ffn_norm", "ffn_gate", "ffn_up", "ffn_down", "final_norm", "embproj_out", "head",
};

// One parameter tensor: `count` matrices of rows x cols (count = L for per-layer tensors;
// a norm gain has rows = 1, and cols = 1 under SSNorm).
typedef struct { int count, rows, cols; size_t offset; } ParamShape;

// Activations of one forward pass, all views into one block, laid out for the current B x T
// tokens (activation_layout) inside the block allocated for max_batch x seq_len. N = B·T.
typedef struct {
    float *embed;       // [N, d]         embedding rows, input of P_in (EmbProj only)
    float *x;           // [L+1, N, d] residual stream entering block l; x[L] leaves the last block
    float *attn_norm;   // [L, N, d]
    float *attn_rstd;   // [L, N]
    float *q;           // [L, N, d]      after RoPE
    float *k;           // [L, N, kv_dim] after RoPE
    float *v;           // [L, N, kv_dim]
    float *att;         // [L, B, H, T, T] attention probabilities
    float *attn_out;    // [L, N, d]      attention output, input of Wo
    float *attn_proj;   // [L, N, d]      Wo · attn_out
    float *x_mid;       // [L, N, d]      residual stream after attention
    float *ffn_norm;    // [L, N, d]
    float *ffn_rstd;    // [L, N]
    float *ffn_gate;    // [L, N, f]      W1 · n
    float *ffn_up;      // [L, N, f]      W3 · n
    float *ffn_hidden;  // [L, N, f]      silu(gate) * up, input of W2
    float *ffn_proj;    // [L, N, d]      W2 · hidden
    float *final_norm;  // [N, d]
    float *final_rstd;  // [N]
    float *final_proj;  // [N, d]         P_out · final_norm, input of the head (EmbProj only)
    float *logits;      // [N, V]
    float *probs;       // [N, V]
    float *losses;      // [N]
} Activations;

struct Model {   // (typedef Model: in the prototypes above)
    Config cfg;
    ParamShape shape[N_PARAM_TENSORS];
    size_t n_params;
    float *params;                       // all parameters, one block
    float *grads;                        // same layout as params
    int max_batch;                       // activations are allocated for [max_batch, seq_len]
    size_t act_floats;
    float *act_block, *dact_block;
    Activations act, dact;               // values and their gradients, same layout
    float *rope_cos, *rope_sin;          // [seq_len, head_dim/2]
    int *inputs, *targets;               // [max_batch, seq_len]
    int B, T;                            // shape of the last forward pass
};

static int head_dim(const Config *c) { return c->dim / c->n_heads; }
static int kv_dim(const Config *c) { return c->n_kv_heads * head_dim(c); }

// Fills the parameter shapes and offsets for a config; returns the total parameter count.
static size_t param_layout(ParamShape *shape, const Config *c) {
    int L = c->n_layers, d = c->dim, f = c->ffn_dim, kvd = kv_dim(c);
    int gain = c->ssnorm ? 1 : d, proj = c->embproj ? 1 : 0;   // OSP: one gain per norm; P_in, P_out
    ParamShape s[N_PARAM_TENSORS] = {
        [PARAM_EMBED] = {1, c->vocab_size, d, 0},
        [PARAM_EMBPROJ_IN] = {proj, d, d, 0},
        [PARAM_ATTN_NORM] = {L, 1, gain, 0},
        [PARAM_ATTN_Q] = {L, d, d, 0},
        [PARAM_ATTN_K] = {L, kvd, d, 0},
        [PARAM_ATTN_V] = {L, kvd, d, 0},
        [PARAM_ATTN_OUT] = {L, d, d, 0},
        [PARAM_FFN_NORM] = {L, 1, gain, 0},
        [PARAM_FFN_GATE] = {L, f, d, 0},
        [PARAM_FFN_UP] = {L, f, d, 0},
        [PARAM_FFN_DOWN] = {L, d, f, 0},
        [PARAM_FINAL_NORM] = {1, 1, gain, 0},
        [PARAM_EMBPROJ_OUT] = {proj, d, d, 0},
        [PARAM_HEAD] = {1, c->vocab_size, d, 0},
    };
    size_t offset = 0;
    for (int i = 0; i < N_PARAM_TENSORS; i++) {
        s[i].offset = offset;
        offset += (size_t)s[i].count * s[i].rows * s[i].cols;
        shape[i] = s[i];
    }
    return offset;
}

static size_t param_size(const Model *m, int i) {
    return (size_t)m->shape[i].count * m->shape[i].rows * m->shape[i].cols;
}

static bool is_norm_gain(int i) {
    return i == PARAM_ATTN_NORM || i == PARAM_FFN_NORM || i == PARAM_FINAL_NORM;
}

// Pointer to layer `layer` of parameter tensor i inside block (params or grads).
static float *param_at(const Model *m, float *block, int i, int layer) {
    return block + m->shape[i].offset + (size_t)layer * m->shape[i].rows * m->shape[i].cols;
}

// Lays out the activation views over block (NULL: sizes only) for batch B and context T, one
// tensor after the other; returns the float count.
static size_t activation_layout(Activations *a, float *block, const Config *c, int B, int T) {
    size_t N = (size_t)B * T, L = (size_t)c->n_layers, d = (size_t)c->dim, f = (size_t)c->ffn_dim;
    size_t kvd = (size_t)kv_dim(c), V = (size_t)c->vocab_size, H = (size_t)c->n_heads;
    size_t proj = c->embproj ? N * d : 0;
    const struct { float **view; size_t size; } tensors[] = {
        {&a->embed, proj},
        {&a->x, (L + 1) * N * d},
        {&a->attn_norm, L * N * d},
        {&a->attn_rstd, L * N},
        {&a->q, L * N * d},
        {&a->k, L * N * kvd},
        {&a->v, L * N * kvd},
        {&a->att, L * B * H * T * T},
        {&a->attn_out, L * N * d},
        {&a->attn_proj, L * N * d},
        {&a->x_mid, L * N * d},
        {&a->ffn_norm, L * N * d},
        {&a->ffn_rstd, L * N},
        {&a->ffn_gate, L * N * f},
        {&a->ffn_up, L * N * f},
        {&a->ffn_hidden, L * N * f},
        {&a->ffn_proj, L * N * d},
        {&a->final_norm, N * d},
        {&a->final_rstd, N},
        {&a->final_proj, proj},
        {&a->logits, N * V},
        {&a->probs, N * V},
        {&a->losses, N},
    };
    size_t total = 0;
    for (size_t i = 0; i < sizeof tensors / sizeof tensors[0]; i++) {
        *tensors[i].view = block ? block + total : NULL;
        total += tensors[i].size;
    }
    return total;
}

static void model_alloc(Model *m, const Config *c, int max_batch) {
    memset(m, 0, sizeof *m);
    m->cfg = *c;
    m->n_params = param_layout(m->shape, c);
    m->params = xcalloc(m->n_params, sizeof(float));
    m->grads = xcalloc(m->n_params, sizeof(float));
    m->max_batch = max_batch;
    m->act_floats = activation_layout(&m->act, NULL, c, max_batch, c->seq_len);
    m->act_block = xcalloc(m->act_floats, sizeof(float));
    m->dact_block = xcalloc(m->act_floats, sizeof(float));
    int half = head_dim(c) / 2;
    m->rope_cos = xmalloc(sizeof(float) * (size_t)c->seq_len * half);
    m->rope_sin = xmalloc(sizeof(float) * (size_t)c->seq_len * half);
    rope_tables(m->rope_cos, m->rope_sin, c->seq_len, head_dim(c));
    m->inputs = xcalloc((size_t)max_batch * c->seq_len, sizeof(int));
    m->targets = xcalloc((size_t)max_batch * c->seq_len, sizeof(int));
}

static void model_free(Model *m) {
    free(m->params); free(m->grads); free(m->act_block); free(m->dact_block);
    free(m->rope_cos); free(m->rope_sin); free(m->inputs); free(m->targets);
    memset(m, 0, sizeof *m);
}

// Random orthogonal d x d matrix: Gram-Schmidt (modified, in double) on the rows of a
// Gaussian matrix.
static void random_orthogonal(float *q, int d, uint64_t *rng) {
    double *a = xmalloc(sizeof(double) * (size_t)d * d);
    for (size_t i = 0; i < (size_t)d * d; i++) a[i] = rng_normal(rng);
    for (int i = 0; i < d; i++) {
        double *row = a + (size_t)i * d;
        for (int j = 0; j < i; j++) {
            const double *prev = a + (size_t)j * d;
            double proj = 0.0;
            for (int k = 0; k < d; k++) proj += row[k] * prev[k];
            for (int k = 0; k < d; k++) row[k] -= proj * prev[k];
        }
        double norm = 0.0;
        for (int k = 0; k < d; k++) norm += row[k] * row[k];
        norm = sqrt(norm);
        for (int k = 0; k < d; k++) row[k] /= norm;
    }
    for (size_t i = 0; i < (size_t)d * d; i++) q[i] = (float)a[i];
    free(a);
}

// Initialization: normal with std 0.02 for all matrices, Wo and W2 further
// scaled by 1/sqrt(2L) (their outputs add into the residual stream L times each); norm gains 1;
// EmbProj's P_in and P_out random orthogonal.
static void model_init(Model *m, uint64_t seed) {
    uint64_t rng = seed ^ 0x5EEDBA5Eull;   // init and batch sampling draw from different streams
    float out_scale = 1.0f / sqrtf(2.0f * (float)m->cfg.n_layers);
    for (int i = 0; i < N_PARAM_TENSORS; i++) {
        float *p = m->params + m->shape[i].offset;
        size_t n = param_size(m, i);
        if (n == 0) continue;
        if (i == PARAM_EMBPROJ_IN || i == PARAM_EMBPROJ_OUT) {   // OSP: EmbProj starts orthogonal
            random_orthogonal(p, m->cfg.dim, &rng);
            continue;
        }
        float std = 0.02f * ((i == PARAM_ATTN_OUT || i == PARAM_FFN_DOWN) ? out_scale : 1.0f);
        for (size_t j = 0; j < n; j++) p[j] = is_norm_gain(i) ? 1.0f : std * rng_normal(&rng);
    }
}

// Layer l's slices of an activation block (the values, or their gradients): the per-layer
// tensors of Activations for the current B x T tokens, and x_next, the stream leaving the layer.
typedef struct {
    float *x, *attn_norm, *attn_rstd, *q, *k, *v, *att, *attn_out, *attn_proj, *x_mid;
    float *ffn_norm, *ffn_rstd, *ffn_gate, *ffn_up, *ffn_hidden, *ffn_proj, *x_next;
} LayerActs;

static LayerActs layer_acts(const Activations *a, const Config *c, int l, int B, int T) {
    size_t N = (size_t)B * T, Nd = N * c->dim, Nkv = N * kv_dim(c), Nf = N * c->ffn_dim;
    return (LayerActs){ a->x + l * Nd,
                        a->attn_norm + l * Nd,
                        a->attn_rstd + l * N,
                        a->q + l * Nd,
                        a->k + l * Nkv,
                        a->v + l * Nkv,
                        a->att + l * N * c->n_heads * T,
                        a->attn_out + l * Nd,
                        a->attn_proj + l * Nd,
                        a->x_mid + l * Nd,
                        a->ffn_norm + l * Nd,
                        a->ffn_rstd + l * N,
                        a->ffn_gate + l * Nf,
                        a->ffn_up + l * Nf,
                        a->ffn_hidden + l * Nf,
                        a->ffn_proj + l * Nd,
                        a->x + (l + 1) * Nd };
}

// Layer l's weights in a parameter block (the parameters, or their gradients).
typedef struct { float *attn_norm, *wq, *wk, *wv, *wo, *ffn_norm, *w_gate, *w_up, *w_down; } LayerWeights;

static LayerWeights layer_weights(const Model *m, float *block, int l) {
    return (LayerWeights){param_at(m, block, PARAM_ATTN_NORM, l), param_at(m, block, PARAM_ATTN_Q, l),
                          param_at(m, block, PARAM_ATTN_K, l), param_at(m, block, PARAM_ATTN_V, l),
                          param_at(m, block, PARAM_ATTN_OUT, l), param_at(m, block, PARAM_FFN_NORM, l),
                          param_at(m, block, PARAM_FFN_GATE, l), param_at(m, block, PARAM_FFN_UP, l),
                          param_at(m, block, PARAM_FFN_DOWN, l)};
}

// Forward pass over inputs [B,T] (copied into m->inputs). With targets, returns the mean
// cross-entropy loss; without, computes logits only and returns 0. Any B, T whose activations
// fit the allocation may be used (T = 1 with B up to max_batch·seq_len, for example).
// fq: the evaluation's fake quantization of the activations; NULL in training (none).
static float model_forward(Model *m, const int *inputs, const int *targets, int B, int T,
                           const FakeQuant *fq) {
    const Config *c = &m->cfg;
    int d = c->dim, f = c->ffn_dim, H = c->n_heads, KVH = c->n_kv_heads, hd = head_dim(c), kvd = kv_dim(c);
    int N = B * T;
    m->B = B; m->T = T;
    if (activation_layout(&m->act, m->act_block, c, B, T) > m->act_floats || N > m->max_batch * c->seq_len)
        die("internal: forward of %d x %d does not fit the activations allocated for %d x %d", B, T,
            m->max_batch, c->seq_len);
    memcpy(m->inputs, inputs, sizeof(int) * (size_t)N);
    if (targets) memcpy(m->targets, targets, sizeof(int) * (size_t)N);
    Activations *a = &m->act;
    size_t Nd = (size_t)N * d, Nkv = (size_t)N * kvd, Nf = (size_t)N * f;
    float *P = m->params;
    int gs = c->ssnorm ? 0 : 1;   // OSP: SSNorm reads one gain for all channels (gain step 0)
    if (!fq) fq = &NO_FAKE_QUANT;

    // embedding rows, then (OSP: EmbProj) their projection P_in: the residual stream x[0]
    if (c->embproj) {
        embedding_forward(a->embed, m->inputs, param_at(m, P, PARAM_EMBED, 0), N, d);
        matmul(a->x, a->embed, param_at(m, P, PARAM_EMBPROJ_IN, 0), N, d, d);   // each row x = P_in·e
    } else {
        embedding_forward(a->x, m->inputs, param_at(m, P, PARAM_EMBED, 0), N, d);
    }
    for (int l = 0; l < c->n_layers; l++) {
        LayerActs s = layer_acts(a, c, l, B, T);
        LayerWeights w = layer_weights(m, P, l);
        // attention: norm, Q K V projections, RoPE, causal softmax attention, output projection
        rmsnorm_forward(s.attn_norm, s.attn_rstd, s.x, w.attn_norm, gs, N, d);
        quantize_asymmetric(s.attn_norm, Nd, d, fq->abits);
        // q, k, v = n·Wqᵀ, n·Wkᵀ, n·Wvᵀ
        matmuls_same_input(3, (float *[]){ s.q, s.k, s.v }, s.attn_norm,
                           (const float *[]){ w.wq, w.wk, w.wv }, N, d, (int[]){ d, kvd, kvd });
        rope_forward(s.q, s.k, m->rope_cos, m->rope_sin, B, T, H, KVH, hd);
        if (fq->kvbits < QUANT_OFF) {   // rotating both q and k by H leaves every q·k unchanged
            hadamard_transform(s.q, (size_t)N * H, hd);
            hadamard_transform(s.k, (size_t)N * KVH, hd);
            quantize_asymmetric(s.k, Nkv, hd, fq->kvbits);
            quantize_asymmetric(s.v, Nkv, hd, fq->kvbits);
        }
        attention_forward(s.attn_out, s.att, s.q, s.k, s.v, B, T, H, KVH, hd);
        quantize_asymmetric(s.attn_out, Nd, hd, fq->abits);
        matmul(s.attn_proj, s.attn_out, w.wo, N, d, d);
        residual_forward(s.x_mid, s.x, s.attn_proj, Nd);
        // feed-forward: norm, gate and up projections, SwiGLU, down projection
        rmsnorm_forward(s.ffn_norm, s.ffn_rstd, s.x_mid, w.ffn_norm, gs, N, d);
        quantize_asymmetric(s.ffn_norm, Nd, d, fq->abits);
        matmuls_same_input(2, (float *[]){ s.ffn_gate, s.ffn_up }, s.ffn_norm,
                           (const float *[]){ w.w_gate, w.w_up }, N, d, (int[]){ f, f });
        swiglu_forward(s.ffn_hidden, s.ffn_gate, s.ffn_up, Nf);
        if (fq->ffn_hadamard) hadamard_transform(s.ffn_hidden, (size_t)N, f);
        quantize_asymmetric(s.ffn_hidden, Nf, f, fq->abits);
        matmul(s.ffn_proj, s.ffn_hidden, w.w_down, N, f, d);
        residual_forward(s.x_next, s.x_mid, s.ffn_proj, Nd);
    }
    // final norm, then (OSP: EmbProj) P_out, then the head: logits, and the loss
    rmsnorm_forward(a->final_norm, a->final_rstd, a->x + c->n_layers * Nd,
                    param_at(m, P, PARAM_FINAL_NORM, 0), gs, N, d);
    float *head_in = a->final_norm;
    if (c->embproj) {
        matmul(a->final_proj, a->final_norm, param_at(m, P, PARAM_EMBPROJ_OUT, 0), N, d, d);
        head_in = a->final_proj;
    }
    matmul(a->logits, head_in, param_at(m, P, PARAM_HEAD, 0), N, d, c->vocab_size);
    if (!targets) return 0.0f;
    crossentropy_forward(a->losses, a->probs, a->logits, m->targets, N, c->vocab_size);
    double sum = 0.0;
    for (int n = 0; n < N; n++) sum += a->losses[n];
    return (float)(sum / N);
}

// Backward pass of the mean loss of the last forward (which must have had targets): fills
// m->grads. The forward's steps in reverse, each with the gradients (g, dw) of the same
// tensors (a, w); a tensor read by two steps (the residual stream) sums both gradients.
static void model_backward(Model *m) {
    const Config *c = &m->cfg;
    int B = m->B, T = m->T, N = B * T;
    int d = c->dim, f = c->ffn_dim, H = c->n_heads, KVH = c->n_kv_heads, hd = head_dim(c), kvd = kv_dim(c);
    size_t Nd = (size_t)N * d, Nf = (size_t)N * f;
    memset(m->grads, 0, sizeof(float) * m->n_params);
    size_t used = activation_layout(&m->dact, m->dact_block, c, B, T);
    memset(m->dact_block, 0, sizeof(float) * used);
    Activations *a = &m->act, *g = &m->dact;
    float *P = m->params, *G = m->grads;
    int gs = c->ssnorm ? 0 : 1;   // OSP: SSNorm's one gain gathers the gradient of every channel

    // loss -> logits -> head (-> P_out, OSP: EmbProj) -> final norm -> x[L]
    for (int n = 0; n < N; n++) g->losses[n] = 1.0f / (float)N;
    crossentropy_backward(g->logits, g->losses, a->probs, m->targets, N, c->vocab_size);
    float *head_in = c->embproj ? a->final_proj : a->final_norm,
          *dhead_in = c->embproj ? g->final_proj : g->final_norm;
    matmul_backward(dhead_in, param_at(m, G, PARAM_HEAD, 0), g->logits, head_in,
                    param_at(m, P, PARAM_HEAD, 0), N, d, c->vocab_size);
    if (c->embproj)
        matmul_backward(g->final_norm, param_at(m, G, PARAM_EMBPROJ_OUT, 0), g->final_proj, a->final_norm,
                        param_at(m, P, PARAM_EMBPROJ_OUT, 0), N, d, d);
    rmsnorm_backward(g->x + c->n_layers * Nd, param_at(m, G, PARAM_FINAL_NORM, 0), g->final_norm,
                     a->x + c->n_layers * Nd, param_at(m, P, PARAM_FINAL_NORM, 0), gs, a->final_rstd, N, d);
    for (int l = c->n_layers - 1; l >= 0; l--) {
        LayerActs s = layer_acts(a, c, l, B, T), ds = layer_acts(g, c, l, B, T);
        LayerWeights w = layer_weights(m, P, l), dw = layer_weights(m, G, l);
        // feed-forward, from x_next = x_mid + ffn_proj back to x_mid
        residual_backward(ds.x_mid, ds.ffn_proj, ds.x_next, Nd);
        matmul_backward(ds.ffn_hidden, dw.w_down, ds.ffn_proj, s.ffn_hidden, w.w_down, N, f, d);
        swiglu_backward(ds.ffn_gate, ds.ffn_up, ds.ffn_hidden, s.ffn_gate, s.ffn_up, Nf);
        matmuls_same_input_backward(2, ds.ffn_norm, (float *[]){ dw.w_gate, dw.w_up },
                                    (const float *[]){ ds.ffn_gate, ds.ffn_up }, s.ffn_norm,
                                    (const float *[]){ w.w_gate, w.w_up }, N, d, (int[]){ f, f });
        rmsnorm_backward(ds.x_mid, dw.ffn_norm, ds.ffn_norm, s.x_mid, w.ffn_norm, gs, s.ffn_rstd, N, d);
        // attention, from x_mid = x + attn_proj back to x
        residual_backward(ds.x, ds.attn_proj, ds.x_mid, Nd);
        matmul_backward(ds.attn_out, dw.wo, ds.attn_proj, s.attn_out, w.wo, N, d, d);
        attention_backward(ds.q, ds.k, ds.v, ds.attn_out, s.attn_out, s.att, s.q, s.k, s.v, B, T, H, KVH, hd);
        rope_backward(ds.q, ds.k, m->rope_cos, m->rope_sin, B, T, H, KVH, hd);
        matmuls_same_input_backward(3, ds.attn_norm, (float *[]){ dw.wq, dw.wk, dw.wv },
                                    (const float *[]){ ds.q, ds.k, ds.v }, s.attn_norm,
                                    (const float *[]){ w.wq, w.wk, w.wv }, N, d, (int[]){ d, kvd, kvd });
        rmsnorm_backward(ds.x, dw.attn_norm, ds.attn_norm, s.x, w.attn_norm, gs, s.attn_rstd, N, d);
    }
    // x[0] (-> P_in, OSP: EmbProj) -> the embedding rows
    if (c->embproj) {
        matmul_backward(g->embed, param_at(m, G, PARAM_EMBPROJ_IN, 0), g->x, a->embed,
                        param_at(m, P, PARAM_EMBPROJ_IN, 0), N, d, d);
        embedding_backward(param_at(m, G, PARAM_EMBED, 0), g->embed, m->inputs, N, d);
    } else {
        embedding_backward(param_at(m, G, PARAM_EMBED, 0), g->x, m->inputs, N, d);
    }
}

/* ============================================================================
 * Optimizers: AdamW (the baseline) and Muon (OSP), global-norm clipping, the OSP schedule
 * ========================================================================== */

enum { OPTIMIZER_ADAM, OPTIMIZER_MUON, OPTIMIZER_MUON_ONLY, N_OPTIMIZERS };
static const char *optimizer_names[N_OPTIMIZERS] = {"adam", "muon", "muon-only"};

typedef struct {
    int optimizer;       // OPTIMIZER_*: which tensors Muon updates (see uses_muon)
    float lr_adam;       // peak learning rate of the AdamW-updated tensors
    float lr_muon;       // peak learning rate of the Muon-updated tensors
    float weight_decay;  // decoupled: w -= lr * wd * w
    float beta1, beta2, eps;  // AdamW
    float muon_momentum; // mu, Nesterov momentum of Muon
    int ns_steps;        // Newton-Schulz iterations of Muon
    float grad_clip;     // clip the global gradient norm to this; 0 = off
    int warmup;          // linear warmup steps
    int steps;           // total steps (the schedule decays over the last 20%)
} OptimConfig;

// Muon updates every tensor under muon-only; under muon every tensor but the embedding and
// the head, which keep AdamW ("decoupled embedding optimization"); under adam none.
// OSP: Muon for the network, AdamW for the embedding and the head only. The norm gains are
// Muon's too (muon_update's vector rule): the paper gives AdamW those two tensors alone, and a
// per-channel gain under AdamW's per-coordinate steps is the privileged basis OSP removes.
// (KellerJordan's muon.py leaves gains and biases to AdamW.)
static bool uses_muon(int optimizer, int tensor) {
    if (optimizer == OPTIMIZER_ADAM) return false;
    if (optimizer == OPTIMIZER_MUON_ONLY) return true;
    return tensor != PARAM_EMBED && tensor != PARAM_HEAD;
}

// One AdamW step (t = 1-based step count) on n parameters with moments m, v:
// m = b1·m + (1-b1)·g;  v = b2·v + (1-b2)·g²;  w -= lr·(m̂ / (sqrt(v̂) + eps) + wd·w),
// with bias-corrected m̂ = m / (1 - b1^t), v̂ = v / (1 - b2^t). Weight decay applies to every
// parameter, norm gains included (one rule for every tensor). Called inside a parallel
// region, the elements are split over its threads (an orphaned `omp for`); outside, one does all.
static void adamw_update(float *params, const float *grads, float *m, float *v, size_t n,
                         const OptimConfig *o, float lr, int t) {
    float c1 = 1.0f - powf(o->beta1, (float)t), c2 = 1.0f - powf(o->beta2, (float)t);
#pragma omp for schedule(dynamic, 8192) nowait
    for (size_t i = 0; i < n; i++) {
        float g = grads[i];
        m[i] = o->beta1 * m[i] + (1.0f - o->beta1) * g;
        v[i] = o->beta2 * v[i] + (1.0f - o->beta2) * g * g;
        float mhat = m[i] / c1, vhat = v[i] / c2;
        params[i] -= lr * (mhat / (sqrtf(vhat) + o->eps) + o->weight_decay * params[i]);
    }
}

#define NS_A 3.4445f
#define NS_B (-4.7750f)
#define NS_C 2.0315f

// Floats of work space newton_schulz needs for a rows x cols matrix.
static size_t newton_schulz_scratch(int rows, int cols) {
    size_t n = (size_t)rows * cols, r = (size_t)(rows < cols ? rows : cols);
    return 2 * n + 2 * r * r;
}

// OSP: Newton-Schulz orthogonalization, the heart of Muon: out [rows, cols] has U's singular
// vectors with its singular values pushed into about [0.5, 1.2]. X = U / (|U|_F + 1e-7), then
// `steps` times X = a·X + (b·A + c·A²)·X with A = X·Xᵀ. It works on the wide orientation
// (rows <= cols), so a tall U is transposed first and the result transposed back.
// scratch: newton_schulz_scratch(rows, cols) floats.
static void newton_schulz(float *out, const float *u, int rows, int cols, int steps, float *scratch) {
    bool tall = rows > cols;
    int r = tall ? cols : rows, c = tall ? rows : cols;
    size_t n = (size_t)r * c;
    float *x = scratch, *x_next = x + n, *gram = x_next + n, *poly = gram + (size_t)r * r;
    double sq = 0.0;
    for (size_t i = 0; i < n; i++) sq += (double)u[i] * u[i];
    float inv_norm = (float)(1.0 / (sqrt(sq) + 1e-7));
    if (tall) transpose(x, u, rows, cols);
    else memcpy(x, u, sizeof(float) * n);
    for (size_t i = 0; i < n; i++) x[i] *= inv_norm;
    for (int step = 0; step < steps; step++) {
        gram_matrix(gram, x, r, c);                  // A = X·Xᵀ
        matrix_product(poly, gram, gram, r, r, r);   // A²
        for (size_t i = 0; i < (size_t)r * r; i++) poly[i] = NS_B * gram[i] + NS_C * poly[i];
        matrix_product(x_next, poly, x, r, r, c);    // (b·A + c·A²)·X
        for (size_t i = 0; i < n; i++) x[i] = NS_A * x[i] + x_next[i];
    }
    if (tall) transpose(out, x, r, c);
    else memcpy(out, x, sizeof(float) * n);
}

// OSP: one Muon step on a rows x cols matrix w with gradient g and momentum buffer mom:
//   mom = g + mu·mom;  U = g + mu·mom with the new mom (Nesterov);  O = NS(U);
//   w -= lr·(0.2·sqrt(max(rows, cols))·O + wd·w).
// The momentum has the SGD form (PyTorch's SGD with nesterov=True, the first Muon of
// modded-nanogpt). KellerJordan's muon.py averages instead, M = β·M + (1-β)·G and
// U = (1-β)·G + β·M, which is (1-β) times our U; NS divides U by its norm first, so both give
// the same O. The scale differs: muon.py multiplies O by sqrt(max(1, rows/cols)), while
// 0.2·sqrt(max(rows, cols)) is Moonlight's rule (Liu et al. 2025, "Muon is Scalable for LLM
// Training"): it gives a full-rank update an RMS of about 0.2·lr, like AdamW's, so AdamW's
// learning rate and weight decay carry over. A norm gain (rows = 1: a vector, or SSNorm's
// scalar) has no singular vectors to align: a single row orthogonalized is the row divided by
// its norm, so O = U / (|U|₂ + 1e-7). scratch: 2·rows·cols + newton_schulz_scratch floats.
static void muon_update(float *w, const float *g, float *mom, int rows, int cols, const OptimConfig *o,
                        float lr, float *scratch) {
    size_t n = (size_t)rows * cols;
    float *u = scratch, *orth = scratch + n;
    float mu = o->muon_momentum;
    for (size_t i = 0; i < n; i++) {
        mom[i] = g[i] + mu * mom[i];
        u[i] = g[i] + mu * mom[i];
    }
    if (rows == 1) {
        double sq = 0.0;
        for (size_t i = 0; i < n; i++) sq += (double)u[i] * u[i];
        float inv_norm = (float)(1.0 / (sqrt(sq) + 1e-7));
        for (size_t i = 0; i < n; i++) orth[i] = u[i] * inv_norm;
    } else {
        newton_schulz(orth, u, rows, cols, o->ns_steps, scratch + 2 * n);
    }
    float scale = 0.2f * sqrtf((float)(rows > cols ? rows : cols));
    for (size_t i = 0; i < n; i++) w[i] -= lr * (scale * orth[i] + o->weight_decay * w[i]);
}

// Optimizer state, one block: for each tensor in order, AdamW's m then v (2 floats per
// parameter) or Muon's momentum buffer (1 float per parameter). Fills offset[] (floats into
// the block) and returns the block's size in floats.
static size_t optimizer_layout(const Model *m, int optimizer, size_t *offset) {
    size_t total = 0;
    for (int i = 0; i < N_PARAM_TENSORS; i++) {
        offset[i] = total;
        total += param_size(m, i) * (uses_muon(optimizer, i) ? 1 : 2);
    }
    return total;
}

// Floats of scratch the Muon updates of this model need (0 under adam).
static size_t optimizer_scratch(const Model *m, int optimizer) {
    size_t most = 0;
    for (int i = 0; i < N_PARAM_TENSORS; i++) {
        if (!uses_muon(optimizer, i) || param_size(m, i) == 0) continue;
        size_t n = (size_t)m->shape[i].rows * m->shape[i].cols;
        size_t need = 2 * n + newton_schulz_scratch(m->shape[i].rows, m->shape[i].cols);
        if (need > most) most = need;
    }
    return most;
}

// Applies one optimizer step (t = 1-based step count, factor = schedule multiplier) to every
// tensor: AdamW on the whole tensor, or Muon on each of its matrices (each layer separately).
// One parallel region: the AdamW tensors are split elementwise, then each Muon matrix goes whole
// to one thread (its Newton-Schulz products are too small to split well), handed out one at a
// time so a thread slowed by another program takes fewer.
static void optimizer_step(Model *m, const OptimConfig *o, float *state, float factor, int t) {
    size_t offset[N_PARAM_TENSORS];
    optimizer_layout(m, o->optimizer, offset);
    int first_matrix[N_PARAM_TENSORS + 1] = {0};   // Muon matrices numbered across tensors
    for (int i = 0; i < N_PARAM_TENSORS; i++)
        first_matrix[i + 1] = first_matrix[i] + (uses_muon(o->optimizer, i) ? m->shape[i].count : 0);
    size_t scratch_floats = optimizer_scratch(m, o->optimizer);
#pragma omp parallel
    {
        for (int i = 0; i < N_PARAM_TENSORS; i++) {
            size_t n = param_size(m, i);
            if (n == 0 || uses_muon(o->optimizer, i)) continue;
            float *st = state + offset[i];
            size_t at = m->shape[i].offset;
            adamw_update(m->params + at, m->grads + at, st, st + n, n, o, factor * o->lr_adam, t);
        }
#pragma omp for schedule(dynamic)
        for (int j = 0; j < first_matrix[N_PARAM_TENSORS]; j++) {
            int i = 0;
            while (j >= first_matrix[i + 1]) i++;
            size_t within = (size_t)(j - first_matrix[i]) * m->shape[i].rows * m->shape[i].cols;
            size_t at = m->shape[i].offset + within;
            muon_update(m->params + at, m->grads + at, state + offset[i] + within, m->shape[i].rows,
                        m->shape[i].cols, o, factor * o->lr_muon, workspace(WORKSPACE_MUON, scratch_floats));
        }
    }
}

// Learning-rate multiplier at step s (0-based): linear warmup to 1, constant, then linear
// decay to 0 over the last 20% of steps (the paper's schedule).
static float lr_factor(const OptimConfig *o, int s) {
    int decay_start = o->steps - o->steps / 5;
    if (s < o->warmup) return (float)(s + 1) / (float)o->warmup;
    if (s >= decay_start) return (float)(o->steps - s) / (float)(o->steps - decay_start);
    return 1.0f;
}

// Scales grads so that their global L2 norm is at most max_norm; returns the norm before.
static float clip_grad_norm(float *grads, size_t n, float max_norm) {
    double sum = 0.0;
    for (size_t i = 0; i < n; i++) sum += (double)grads[i] * grads[i];
    float norm = (float)sqrt(sum);
    if (max_norm > 0.0f && norm > max_norm) {
        float scale = max_norm / norm;
        for (size_t i = 0; i < n; i++) grads[i] *= scale;
    }
    return norm;
}

/* ============================================================================
 * Presets: the six rows of the paper's ablation
 * ========================================================================== */

// OSP: the recipe is the last row; the others take parts of it away (the paper's ablation).
typedef struct { const char *name; int optimizer, ssnorm, embproj; const char *what; } Preset;
static const Preset presets[] = {
    {"adam", OPTIMIZER_ADAM, 0, 0, "AdamW on everything, RMSNorm (the baseline)"},
    {"muon-only", OPTIMIZER_MUON_ONLY, 0, 0, "Muon on every matrix, embedding and head included"},
    {"muon", OPTIMIZER_MUON, 0, 0, "Muon on the network, AdamW on embedding and head"},
    {"muon-ssnorm", OPTIMIZER_MUON, 1, 0, "muon + Single-Scale RMSNorm"},
    {"muon-embproj", OPTIMIZER_MUON, 0, 1, "muon + embedding projection"},
    {"osp", OPTIMIZER_MUON, 1, 1, "muon + SSNorm + EmbProj: the paper's recipe"},
};
#define N_PRESETS ((int)(sizeof presets / sizeof presets[0]))

// Index of the preset with these switches, or -1 (a custom combination).
static int preset_of(int optimizer, int ssnorm, int embproj) {
    for (int i = 0; i < N_PRESETS; i++)
        if (presets[i].optimizer == optimizer && presets[i].ssnorm == ssnorm && presets[i].embproj == embproj)
            return i;
    return -1;
}

static const char *preset_name(int preset) {
    return preset >= 0 && preset < N_PRESETS ? presets[preset].name : "custom";
}

// Sets the optimizer, SSNorm and EmbProj switches of a run to those of preset p.
static void apply_preset(Config *cfg, OptimConfig *opt, int p) {
    opt->optimizer = presets[p].optimizer;
    cfg->ssnorm = presets[p].ssnorm;
    cfg->embproj = presets[p].embproj;
}

/* ============================================================================
 * Merging for inference
 *
 * With x0 = P_in·e and logits = W_head·(P_out·h): E' = E·P_inᵀ (each row e becomes P_in·e)
 * and W_head' = W_head·P_out; an SSNorm scalar g becomes a per-channel vector filled with g.
 * The result is a plain Llama with the same outputs (up to float rounding).
 * ========================================================================== */

// OSP: dst (allocated here, max_batch rows) = src with EmbProj and SSNorm folded away.
static void model_merge(Model *dst, const Model *src, int max_batch) {
    Config plain = src->cfg;
    plain.ssnorm = 0;
    plain.embproj = 0;
    model_alloc(dst, &plain, max_batch);
    int d = plain.dim, V = plain.vocab_size;
    float *P = src->params;
    for (int i = 0; i < N_PARAM_TENSORS; i++) {
        size_t n = param_size(dst, i);
        float *out = dst->params + dst->shape[i].offset;
        const float *in = src->params + src->shape[i].offset;
        if (n == 0) continue;
        if (i == PARAM_EMBED && src->cfg.embproj) {
            matmul(out, in, param_at(src, P, PARAM_EMBPROJ_IN, 0), V, d, d);   // E' = E·P_inᵀ
        } else if (i == PARAM_HEAD && src->cfg.embproj) {
            matrix_product(out, in, param_at(src, P, PARAM_EMBPROJ_OUT, 0), V, d, d);   // W' = W·P_out
        } else if (is_norm_gain(i) && src->cfg.ssnorm) {   // OSP: the scalar g becomes [g, g, ...]
            for (size_t j = 0; j < n; j++) out[j] = in[j / (size_t)d];
        } else {
            memcpy(out, in, sizeof(float) * n);
        }
    }
}

/* ============================================================================
 * Measuring outliers: excess kurtosis of the hidden states
 *
 * Two reports, for two purposes. The paper's figure (STATES_PAPER, kurtosis_without_context)
 * repeats the authors' script: every token fed alone, as a sequence of length 1, averaged over
 * the L + 1 states of Hugging Face's hidden_states (after the embedding, blocks 1..L-1, the
 * final norm; the raw output of block L is not among them). It is the number to set beside the
 * paper's tables. The in-context report (STATES_ALL) feeds whole windows, as the model runs,
 * over all L + 2 states: the activations that the 4-bit quantizers meet, and the source of the
 * top-channel share, the largest |activation| and the activation picture.
 * ========================================================================== */

// OSP: the measure of outliers. Excess kurtosis of one token's hidden state x [d], as the
// authors' release computes it: mean(x⁴) / std(x)⁴ - 3, the fourth moment not centred, the
// standard deviation unbiased (divided by d - 1), negative values clamped to 0. Gaussian
// channels give about 0; one channel carrying nearly all the energy gives about d (exactly
// d - 3 for a one-hot vector).
static double kurtosis_excess(const float *x, int d) {
    double mean = 0.0, m4 = 0.0, var = 0.0;
    for (int i = 0; i < d; i++) { mean += x[i]; m4 += (double)x[i] * x[i] * x[i] * x[i]; }
    mean /= d;
    m4 /= d;
    for (int i = 0; i < d; i++) var += (x[i] - mean) * (x[i] - mean);
    var /= d - 1;
    if (var <= 0.0) return 0.0;
    double k = m4 / (var * var) - 3.0;
    return k > 0.0 ? k : 0.0;
}

// Which hidden states a KurtosisReport averages: all L + 2, or the paper's L + 1 (see above).
enum { STATES_ALL, STATES_PAPER };

// Per hidden state (after the embedding and P_in, after each block, after the final norm):
// excess kurtosis per token, largest |activation|, and the per-channel view: the share of the
// state's energy (sum over tokens of x²) that its largest channel carries. A channel that is
// large in every token (what breaks per-token 4-bit activations) gives a large share; Gaussian
// channels give about 1/d; a few massive tokens raise the kurtosis but hardly the share.
// In context, two views of the attention sink (a first token that every later one attends to,
// carrying massive activations): the first token's peak |x| against the median token's peak,
// per state, and per layer the attention that positions 1..T-1 pay to position 0 (uniform
// attention pays it 1/(t+1) at position t: about 0.04 at T = 128).
typedef struct {
    int n_states, dim, which;   // which: STATES_ALL or STATES_PAPER, for the means
    double *kurtosis;           // [n_states] sums over tokens, means after kurtosis_finish
    double *max_abs;            // [n_states] largest |x|, after kurtosis_finish
    double *channel_max;        // [n_states][dim] largest |x| per channel
    double *energy;             // [n_states][dim] sum over tokens of x² per channel
    double *top_channel;        // [n_states] largest channel's share of energy, after kurtosis_finish
    double *first_peak;         // [n_states] largest |x| at position 0
    float *peaks;               // [tokens][n_states] each token's largest |x|
    double *median_peak;        // [n_states] the median of peaks, after kurtosis_finish
    double *sink;               // [n_states - 2 = L] attention on position 0 from later positions:
    long sink_rows;             //   sums over sink_rows (batch, head, position) rows, then means
    double mean, top_channel_mean;   // means over the states counted by `which`
    long tokens;
} KurtosisReport;

static void kurtosis_init(KurtosisReport *r, int n_layers, int dim, int which) {
    r->n_states = n_layers + 2;
    r->dim = dim;
    r->which = which;
    r->kurtosis = xcalloc((size_t)r->n_states, sizeof(double));
    r->max_abs = xcalloc((size_t)r->n_states, sizeof(double));
    r->channel_max = xcalloc((size_t)r->n_states * dim, sizeof(double));
    r->energy = xcalloc((size_t)r->n_states * dim, sizeof(double));
    r->top_channel = xcalloc((size_t)r->n_states, sizeof(double));
    r->first_peak = xcalloc((size_t)r->n_states, sizeof(double));
    r->peaks = NULL;
    r->median_peak = xcalloc((size_t)r->n_states, sizeof(double));
    r->sink = xcalloc((size_t)n_layers, sizeof(double));
    r->sink_rows = 0;
    r->mean = r->top_channel_mean = 0.0;
    r->tokens = 0;
}

static void kurtosis_free(KurtosisReport *r) {
    free(r->kurtosis); free(r->max_abs); free(r->channel_max); free(r->energy); free(r->top_channel);
    free(r->first_peak); free(r->peaks); free(r->median_peak); free(r->sink);
}

// Adds the hidden states of the model's last forward pass, and its attention, to the sums.
static void kurtosis_accumulate(KurtosisReport *r, const Model *m) {
    int N = m->B * m->T, T = m->T, d = m->cfg.dim, H = m->cfg.n_heads, L = m->cfg.n_layers;
    size_t Nd = (size_t)N * d;
    r->peaks = xrealloc(r->peaks, sizeof(float) * (size_t)(r->tokens + N) * r->n_states);
    for (int s = 0; s < r->n_states; s++) {
        const float *h = s < r->n_states - 1 ? m->act.x + s * Nd : m->act.final_norm;
        double sum = 0.0, *energy = r->energy + (size_t)s * d, *channel_max = r->channel_max + (size_t)s * d;
#pragma omp parallel for reduction(+ : sum) schedule(static)
        for (int n = 0; n < N; n++) sum += kurtosis_excess(h + (size_t)n * d, d);
#pragma omp parallel for schedule(static)
        for (int i = 0; i < d; i++)
            for (int n = 0; n < N; n++) {
                double x = h[(size_t)n * d + i];
                energy[i] += x * x;
                channel_max[i] = fmax(channel_max[i], fabs(x));
            }
        for (int n = 0; n < N; n++) {
            float peak = 0.0f;
            for (int i = 0; i < d; i++) peak = max_float(peak, fabsf(h[(size_t)n * d + i]));
            r->peaks[(size_t)(r->tokens + n) * r->n_states + s] = peak;
            if (n % T == 0) r->first_peak[s] = fmax(r->first_peak[s], peak);
        }
        r->kurtosis[s] += sum;
    }
    for (int l = 0; l < L; l++)   // att [L, B, H, T, T]: row t of one head is att[((l·B + b)·H + h)·T + t]
        for (size_t row = (size_t)l * m->B * H; row < (size_t)(l + 1) * m->B * H; row++)
            for (int t = 1; t < T; t++) r->sink[l] += m->act.att[(row * T + t) * T];
    r->sink_rows += (long)m->B * H * (T - 1);
    r->tokens += N;
}

static int compare_floats(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

// Whether state s counts in the report's means: all of them, or all but block L's raw output.
static bool kurtosis_counts(const KurtosisReport *r, int s) {
    return r->which == STATES_ALL || s != r->n_states - 2;
}

static void kurtosis_finish(KurtosisReport *r) {
    int counted = 0;
    r->mean = r->top_channel_mean = 0.0;
    for (int s = 0; s < r->n_states; s++) {
        const double *energy = r->energy + (size_t)s * r->dim;
        double total = 0.0, top = 0.0;
        r->max_abs[s] = 0.0;
        for (int i = 0; i < r->dim; i++) {
            total += energy[i];
            top = fmax(top, energy[i]);
            r->max_abs[s] = fmax(r->max_abs[s], r->channel_max[(size_t)s * r->dim + i]);
        }
        r->kurtosis[s] /= (double)(r->tokens ? r->tokens : 1);
        r->top_channel[s] = total > 0.0 ? top / total : 0.0;
        float *column = xmalloc(sizeof(float) * (size_t)(r->tokens ? r->tokens : 1));
        for (long n = 0; n < r->tokens; n++) column[n] = r->peaks[(size_t)n * r->n_states + s];
        qsort(column, (size_t)r->tokens, sizeof(float), compare_floats);
        long half = r->tokens / 2;
        r->median_peak[s] = r->tokens == 0 ? 0.0 : r->tokens % 2 ? column[half]
                                                 : 0.5 * ((double)column[half - 1] + column[half]);
        free(column);
        if (!kurtosis_counts(r, s)) continue;
        r->mean += r->kurtosis[s];
        r->top_channel_mean += r->top_channel[s];
        counted++;
    }
    r->mean /= counted;
    r->top_channel_mean /= counted;
    for (int l = 0; l < r->n_states - 2; l++) r->sink[l] /= (double)(r->sink_rows ? r->sink_rows : 1);
}

static double kurtosis_max_abs(const KurtosisReport *r) {
    double mx = 0.0;
    for (int s = 0; s < r->n_states; s++) mx = fmax(mx, r->max_abs[s]);
    return mx;
}

// The sink's two views, each at its strongest: the largest first-token peak / median peak over
// the states, and the most attention any layer pays position 0.
static double kurtosis_first_peak_ratio(const KurtosisReport *r) {
    double mx = 0.0;
    for (int s = 0; s < r->n_states; s++)
        if (r->median_peak[s] > 0.0) mx = fmax(mx, r->first_peak[s] / r->median_peak[s]);
    return mx;
}

static double kurtosis_sink(const KurtosisReport *r) {
    double mx = 0.0;
    for (int l = 0; l < r->n_states - 2; l++) mx = fmax(mx, r->sink[l]);
    return mx;
}

/* ============================================================================
 * Evaluation: perplexity, the kurtosis reports on the validation split, and perplexity under
 * 4-bit fake quantization as the paper measures them. A model is merged first (model_merge): a
 * merged model computes the same function, and P_in, P_out would stay full precision anyway.
 * ========================================================================== */

// Token ids of a text: the training or validation split (Part II reads and writes their files).
typedef struct { int vocab_size; size_t n; uint16_t *tokens; } TokenData;

// Draws B random windows of T+1 tokens: inputs [B,T] and targets [B,T] (shifted by one).
static void data_next_batch(const TokenData *d, uint64_t *rng, int B, int T, int *inputs, int *targets) {
    size_t range = d->n - (size_t)T;   // valid starts: 0 .. n-T-1
    for (int b = 0; b < B; b++) {
        size_t start = (size_t)(rng_next(rng) % range);
        for (int t = 0; t < T; t++) {
            inputs[b * T + t] = d->tokens[start + (size_t)t];
            targets[b * T + t] = d->tokens[start + (size_t)t + 1];
        }
    }
}

// Number of validation windows of seq_len tokens evaluated (max_windows 0 = all).
static long validation_windows(const Model *m, const TokenData *val, int max_windows) {
    long windows = (long)((val->n - 1) / (size_t)m->cfg.seq_len);
    return max_windows > 0 && windows > max_windows ? max_windows : windows;
}

// Mean loss over the validation tokens in non-overlapping windows of seq_len (up to
// max_windows windows; 0 = all), evaluated max_batch windows at a time. With kurt, also adds
// every window's hidden states to the kurtosis sums (full context).
static float evaluate_loss(Model *m, const TokenData *val, int max_windows, const FakeQuant *fq,
                           KurtosisReport *kurt) {
    int T = m->cfg.seq_len;
    long windows = validation_windows(m, val, max_windows);
    if (windows < 1) return NAN;
    int *inputs = xmalloc(sizeof(int) * (size_t)m->max_batch * T);
    int *targets = xmalloc(sizeof(int) * (size_t)m->max_batch * T);
    double total = 0.0;
    for (long w0 = 0; w0 < windows; w0 += m->max_batch) {
        int B = (int)(windows - w0 < m->max_batch ? windows - w0 : m->max_batch);
        for (int b = 0; b < B; b++)
            for (int t = 0; t < T; t++) {
                size_t pos = (size_t)(w0 + b) * T + (size_t)t;
                inputs[b * T + t] = val->tokens[pos];
                targets[b * T + t] = val->tokens[pos + 1];
            }
        total += (double)model_forward(m, inputs, targets, B, T, fq) * B;
        if (kurt) kurtosis_accumulate(kurt, m);
    }
    free(inputs); free(targets);
    return (float)(total / (double)windows);
}

// The paper's kurtosis: every token of the same windows fed as its own sequence of length 1.
static void kurtosis_without_context(Model *m, const TokenData *val, int max_windows, KurtosisReport *kurt) {
    size_t n = (size_t)validation_windows(m, val, max_windows) * m->cfg.seq_len;
    int chunk = m->max_batch * m->cfg.seq_len;
    int *inputs = xmalloc(sizeof(int) * (size_t)chunk);
    for (size_t start = 0; start < n; start += (size_t)chunk) {
        int B = (int)(n - start < (size_t)chunk ? n - start : (size_t)chunk);
        for (int b = 0; b < B; b++) inputs[b] = val->tokens[start + (size_t)b];
        model_forward(m, inputs, NULL, B, 1, NULL);
        kurtosis_accumulate(kurt, m);
    }
    free(inputs);
}

// Both kurtosis reports of the first `windows` validation windows (0 = all), started and
// finished here: `paper` (may be NULL) and `context`. Returns the windows' mean loss.
static float measure_hidden_states(Model *m, const TokenData *val, int windows, KurtosisReport *paper,
                                   KurtosisReport *context) {
    kurtosis_init(context, m->cfg.n_layers, m->cfg.dim, STATES_ALL);
    float loss = evaluate_loss(m, val, windows, NULL, context);
    kurtosis_finish(context);
    if (paper) {   // NULL: the in-context report only
        kurtosis_init(paper, m->cfg.n_layers, m->cfg.dim, STATES_PAPER);
        kurtosis_without_context(m, val, windows, paper);
        kurtosis_finish(paper);
    }
    return loss;
}

// The weight matrices quantized to 4 bits: those of the blocks. The embedding and the head
// stay full precision.
static bool is_block_matrix(int i) {
    return i == PARAM_ATTN_Q || i == PARAM_ATTN_K || i == PARAM_ATTN_V || i == PARAM_ATTN_OUT ||
           i == PARAM_FFN_GATE || i == PARAM_FFN_UP || i == PARAM_FFN_DOWN;
}

// RTN-quantizes every block matrix in place, one output row at a time (with the clip search
// if asked).
static void quantize_weights(Model *m, int bits, bool clip_search) {
    for (int i = 0; i < N_PARAM_TENSORS; i++) {
        if (!is_block_matrix(i)) continue;
        int rows = m->shape[i].count * m->shape[i].rows, cols = m->shape[i].cols;
        float *w = m->params + m->shape[i].offset;
#pragma omp parallel
        {
            float *scratch = xmalloc(sizeof(float) * (size_t)cols);
#pragma omp for schedule(static)
            for (int r = 0; r < rows; r++)
                quantize_weight_row(w + (size_t)r * cols, cols, bits, clip_search, scratch);
            free(scratch);
        }
    }
}

// The offline half of the FFN rotation: W2 -> W2·Hᵀ, i.e. H applied to every row of W2
// [d, f]. With the online half (h -> H·h in the forward pass) the product is unchanged:
// W2·Hᵀ·H·h = W2·h. Needs ffn_dim a power of two.
static void rotate_ffn_down(Model *m) {
    hadamard_transform(m->params + m->shape[PARAM_FFN_DOWN].offset, (size_t)m->cfg.n_layers * m->cfg.dim,
                       m->cfg.ffn_dim);
}

// Why the 4-bit evaluation cannot run on a model of config c, or NULL: the KV rows rotate each
// head (head_dim), the Had. rows the FFN's hidden state (ffn_dim) and `rotate` the residual
// stream (dim), each by a Hadamard matrix, which must exist (hadamard_factor).
static const char *hadamard_problem(const Config *c, bool rotate) {
    static char msg[160];
    const struct { const char *what; int n; } sizes[3] = {
        {"head dim", head_dim(c)}, {"ffn-dim", c->ffn_dim}, {"dim (for --rotate)", rotate ? c->dim : 1}};
    for (int i = 0; i < 3; i++)
        if (hadamard_factor(sizes[i].n) == 0) {
            snprintf(msg, sizeof msg,
                     "%s %d has no Hadamard matrix for the 4-bit evaluation: use a power of two, or "
                     "12, 20, 44 or 60 times one",
                     sizes[i].what, sizes[i].n);
            return msg;
        }
    return NULL;
}

// The rows of the 4-bit table: what is quantized, and whether the weights get GPTQ instead
// of RTN (the GPTQ rows are evaluated only when asked, --gptq).
enum { QROW_W, QROW_A, QROW_KV, QROW_WAKV, QROW_W_GPTQ, QROW_WAKV_GPTQ, N_QUANT_ROWS };

// One fake-quantization setting: one row of the table, without or with the FFN Hadamard.
typedef struct {
    int wbits;       // weight bits
    bool gptq;       // weights quantized by GPTQ instead of RTN
    FakeQuant act;   // activations, KV cache, FFN Hadamard
} QuantSetting;

typedef struct {
    int wbits, abits, kvbits;   // the bits of the table's rows (16 = off)
    bool clip_search;           // weight clip search (default on)
    bool rotate;                // full residual rotation before quantizing
    int max_windows;            // validation windows, 0 = all
    bool gptq;                  // also the GPTQ rows
    int calib_windows;          // GPTQ's calibration: windows of seq_len training tokens,
    uint64_t calib_seed;        // drawn at random with this seed
} EvalOptions;

typedef struct {
    long windows;
    float fp_loss;
    KurtosisReport paper, context;       // the two kurtosis reports (Measuring outliers)
    float quant_loss[N_QUANT_ROWS][2];   // [row][no Had., Had.]; NAN if not evaluated or not applicable
    double seconds;
} EvalResult;

static void eval_result_free(EvalResult *r) { kurtosis_free(&r->paper); kurtosis_free(&r->context); }

// Validation loss of the plain model `base` under one quantization setting, evaluated on
// `work` (same config), whose parameters are overwritten. calib: GPTQ's calibration windows.
// The GPTQ weights of one Hadamard setting serve two rows: the first keeps them in *gptq_cache
// (NULL until then), the second copies them from there.
static float evaluate_quantized(Model *work, const Model *base, const QuantSetting *q, const EvalOptions *o,
                                const TokenData *val, const int *calib, float **gptq_cache) {
    size_t bytes = sizeof(float) * base->n_params;
    if (q->gptq && *gptq_cache) {
        memcpy(work->params, *gptq_cache, bytes);
    } else {
        memcpy(work->params, base->params, bytes);
        if (q->act.ffn_hadamard) rotate_ffn_down(work);
        if (q->wbits < QUANT_OFF && q->gptq)
            gptq_quantize_model(work, calib, o->calib_windows, q->wbits, o->clip_search, q->act.ffn_hadamard);
        else if (q->wbits < QUANT_OFF) quantize_weights(work, q->wbits, o->clip_search);
        if (q->gptq) *gptq_cache = memcpy(xmalloc(bytes), work->params, bytes);
    }
    return evaluate_loss(work, val, o->max_windows, &q->act, NULL);
}

// The 4-bit damage as a curve over training: the W4A4KV4 RTN row of the table on the first
// `windows` validation windows, as the perplexity's relative increase over full precision,
// without [0] and with [1] the FFN Hadamard.
static void w4a4kv4_increase(const Model *m, const TokenData *val, int windows, double increase[2]) {
    const EvalOptions o = {.wbits = 4, .abits = 4, .kvbits = 4, .clip_search = true, .max_windows = windows};
    Model base, work;
    model_merge(&base, m, m->max_batch);
    model_alloc(&work, &base.cfg, m->max_batch);
    memcpy(work.params, base.params, sizeof(float) * base.n_params);
    float fp_loss = evaluate_loss(&work, val, windows, NULL, NULL);
    for (int had = 0; had < 2; had++) {
        const QuantSetting q = {o.wbits, false, {o.abits, o.kvbits, had}};
        increase[had] = exp(evaluate_quantized(&work, &base, &q, &o, val, NULL, NULL) - fp_loss) - 1.0;
    }
    model_free(&base); model_free(&work);
}

// Full evaluation of a model (merged here if it has EmbProj or SSNorm): full-precision loss,
// the hidden states' kurtosis (each token alone, and in context), and the 4-bit table without
// and with the FFN Hadamard. train: the calibration tokens of the GPTQ rows (with o->gptq).
// With o->rotate every figure is the rotated model's, its kurtosis included.
static void evaluate_model(EvalResult *r, const Model *m, const TokenData *val, const TokenData *train,
                           const EvalOptions *o) {
    double t0 = now_seconds();
    const char *problem = hadamard_problem(&m->cfg, o->rotate);
    if (problem) die("internal: %s", problem);   // the commands refuse such a model before any work
    Model base, work;
    model_merge(&base, m, m->max_batch);
    if (o->rotate) rotate_residual(&base, 0x0505ull);
    model_alloc(&work, &base.cfg, m->max_batch);
    memcpy(work.params, base.params, sizeof(float) * base.n_params);
    r->windows = validation_windows(&work, val, o->max_windows);
    r->fp_loss = measure_hidden_states(&work, val, o->max_windows, &r->paper, &r->context);
    int *calib = NULL;
    if (o->gptq) {
        int T = base.cfg.seq_len, *targets = xmalloc(sizeof(int) * (size_t)o->calib_windows * T);
        calib = xmalloc(sizeof(int) * (size_t)o->calib_windows * T);
        uint64_t rng = o->calib_seed;
        data_next_batch(train, &rng, o->calib_windows, T, calib, targets);
        free(targets);
    }
    const QuantSetting rows[N_QUANT_ROWS] = {
        [QROW_W] = {o->wbits, false, {QUANT_OFF, QUANT_OFF, false}},
        [QROW_A] = {QUANT_OFF, false, {o->abits, QUANT_OFF, false}},
        [QROW_KV] = {QUANT_OFF, false, {QUANT_OFF, o->kvbits, false}},
        [QROW_WAKV] = {o->wbits, false, {o->abits, o->kvbits, false}},
        [QROW_W_GPTQ] = {o->wbits, true, {QUANT_OFF, QUANT_OFF, false}},
        [QROW_WAKV_GPTQ] = {o->wbits, true, {o->abits, o->kvbits, false}},
    };
    for (int had = 0; had < 2; had++) {
        float *gptq_weights = NULL;
        for (int i = 0; i < N_QUANT_ROWS; i++) {
            QuantSetting q = rows[i];
            q.act.ffn_hadamard = had;
            bool skip = q.gptq && !o->gptq;
            r->quant_loss[i][had] = skip ? NAN
                                         : evaluate_quantized(&work, &base, &q, o, val, calib, &gptq_weights);
        }
        free(gptq_weights);
    }
    free(calib);
    model_free(&base); model_free(&work);
    r->seconds = now_seconds() - t0;
}

/* ============================================================================
 * The training step
 * ========================================================================== */

// A training run: its settings and how far it has come (a checkpoint holds this and the
// weights, and the optimizer state to resume from).
typedef struct {
    Config cfg;
    OptimConfig opt;
    int preset;           // presets[] index the run was trained as, -1 custom
    int merged;           // 1: EmbProj and SSNorm folded away by ./osp merge
    int batch;
    int step;             // completed steps
    uint64_t seed, rng;   // rng: the batch sampler's state
} TrainState;

// A run in memory: its state, the model, the optimizer's buffers and a batch.
typedef struct {
    TrainState state;
    Model model;
    float *opt_state;        // optimizer buffers (optimizer_layout)
    const TokenData *train, *val;   // borrowed: the caller loads and frees the data
    int *inputs, *targets;   // [batch, seq_len]
} Trainer;

// One optimizer step on the next training batch; returns the loss before the update (NaN or
// Inf is returned as is, before any parameter changes).
static float train_step(Trainer *tr, float *grad_norm) {
    TrainState *s = &tr->state;
    Model *m = &tr->model;
    int B = s->batch, T = s->cfg.seq_len;
    data_next_batch(tr->train, &s->rng, B, T, tr->inputs, tr->targets);
    float loss = model_forward(m, tr->inputs, tr->targets, B, T, NULL);
    if (!isfinite(loss)) return loss;
    model_backward(m);
    *grad_norm = clip_grad_norm(m->grads, m->n_params, s->opt.grad_clip);
    optimizer_step(m, &s->opt, tr->opt_state, lr_factor(&s->opt, s->step), s->step + 1);
    s->step++;
    return loss;
}

static void trainer_alloc_buffers(Trainer *tr) {
    tr->inputs = xmalloc(sizeof(int) * (size_t)tr->state.batch * tr->state.cfg.seq_len);
    tr->targets = xmalloc(sizeof(int) * (size_t)tr->state.batch * tr->state.cfg.seq_len);
}

// Sets up a fresh run: model and batch sampler seeded from s->seed, zero optimizer state.
static void trainer_init(Trainer *tr, const TrainState *s) {
    tr->state = *s;
    tr->state.step = 0;
    tr->state.rng = s->seed;
    model_alloc(&tr->model, &s->cfg, s->batch);
    model_init(&tr->model, s->seed);
    size_t offset[N_PARAM_TENSORS];
    tr->opt_state = xcalloc(optimizer_layout(&tr->model, s->opt.optimizer, offset), sizeof(float));
    trainer_alloc_buffers(tr);
}

static void trainer_free(Trainer *tr) {
    model_free(&tr->model);
    free(tr->opt_state); free(tr->inputs); free(tr->targets);
    memset(tr, 0, sizeof *tr);
}

/* ############################################################################
 * END OF PART I. The method ends here: everything above is what OSP is and how it is measured.
 *
 * PART II: THE MACHINERY
 *
 * What makes it fast, and what makes it a tool: utilities for files and threads, the fast
 * kernels and their scheduling, the tokenizer and its trainer, data files, checkpoints, GPTQ
 * and the rotation, the exporters, the training run loop and its logs, sampling, CSV and SVG,
 * and the command line (the ablation and the bench among its commands).
 * ############################################################################ */

/* ============================================================================
 * Utilities: files, parsing, threads
 * ========================================================================== */

// Reads a whole file into memory; *len gets its size. Returns NULL (and sets osp_error).
// The largest file read_file reads: far above any checkpoint or corpus osp.c can use.
#define READ_FILE_MAX ((size_t)16 << 30)

static unsigned char *read_file(const char *path, size_t *len) {
    struct stat st;   // refused before opening: a FIFO would block, /dev/zero never end
    if (stat(path, &st) != 0) { fail("cannot open '%s': %s", path, strerror(errno)); return NULL; }
    if (!S_ISREG(st.st_mode)) { fail("'%s' is not a regular file", path); return NULL; }
    if ((size_t)st.st_size > READ_FILE_MAX) {
        fail("'%s' is %.1f GB, more than osp reads (%zu GB)", path, st.st_size / 1e9, READ_FILE_MAX >> 30);
        return NULL;
    }
    FILE *f = fopen(path, "rb");
    if (!f) { fail("cannot open '%s': %s", path, strerror(errno)); return NULL; }
    // exactly the file's size, so that a read past its end is the sanitizers' to see
    size_t n = (size_t)st.st_size;
    unsigned char *buf = xmalloc(n ? n : 1);
    bool short_read = fread(buf, 1, n, f) != n, err = ferror(f);
    fclose(f);
    if (short_read || err) {
        free(buf);
        fail("error reading '%s': %s", path, err ? strerror(errno) : "it changed while being read");
        return NULL;
    }
    *len = n;
    return buf;
}

// path made absolute without following its last component: realpath of the longest leading
// directory that exists, then the rest with empty and "." components dropped and ".." taking
// away the one before, so that outputs in a directory not yet made compare as the files they
// will be. out needs PATH_MAX bytes or more; "" if path cannot be resolved or is too long.
static void resolved_path(const char *path, char *out, size_t size) {
    char head[PATH_MAX];
    out[0] = '\0';
    if (size < PATH_MAX || snprintf(head, sizeof head, "%s", path) >= (int)sizeof head) return;
    const char *rest = NULL;   // the part of path after the directory that resolved
    for (size_t end = strlen(head); !rest;) {   // head[0..end): what is left to resolve
        char *slash = NULL;
        for (size_t i = end; i > 0 && !slash; i--) if (head[i - 1] == '/') slash = head + i - 1;
        if (slash && slash != head) *slash = '\0';
        if (realpath(!slash ? "." : slash == head ? "/" : head, out))
            rest = path + (slash ? slash - head + 1 : 0);
        else if (!slash || slash == head) { out[0] = '\0'; return; }
        else end = (size_t)(slash - head);
    }
    size_t n = strlen(out);
    for (const char *c = rest; *c; c += strspn(c, "/")) {
        size_t len = strcspn(c, "/");
        if (len == 2 && c[0] == '.' && c[1] == '.') {
            n = (size_t)(strrchr(out, '/') - out);
            n += n == 0;   // "/" stays
        } else if (len && !(len == 1 && c[0] == '.')) {
            if (n + 1 + len >= size) { out[0] = '\0'; return; }
            if (out[n - 1] != '/') out[n++] = '/';
            memcpy(out + n, c, len);
            n += len;
        }
        out[n] = '\0';
        c += len;
    }
}

// Whether paths a and b name the same file: the same device and inode when both exist (hard
// and symbolic links included), else the same resolved path (an output not yet written).
static bool same_file(const char *a, const char *b) {
    struct stat sa, sb;
    if (stat(a, &sa) == 0 && stat(b, &sb) == 0) return sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
    char ra[PATH_MAX + 256], rb[PATH_MAX + 256];
    resolved_path(a, ra, sizeof ra);
    resolved_path(b, rb, sizeof rb);
    return ra[0] && !strcmp(ra, rb);
}

// Why a command cannot run, or NULL: one of its outputs, paths[0..n_out), is the same file as
// another output or as one of its inputs, paths[n_out..n) (named by roles[], NULL paths
// skipped). So no command overwrites what it reads or writes two outputs into one file.
static const char *same_files_problem(int n_out, int n, const char *const *paths, const char *const *roles) {
    static char msg[PATH_MAX + 128];
    for (int i = 0; i < n_out; i++)
        for (int j = i + 1; j < n; j++)
            if (paths[i] && paths[j] && same_file(paths[i], paths[j])) {
                snprintf(msg, sizeof msg, "'%s' (%s) and '%s' (%s) are the same file", paths[i], roles[i],
                         paths[j], roles[j]);
                return msg;
            }
    return NULL;
}

static bool file_exists(const char *path) {
    FILE *f = fopen(path, "rb");
    if (f) fclose(f);
    return f != NULL;
}

// Reads a text file as lines, split in place in *buffer (the caller frees it). A missing file
// reads as no lines; a last line without its newline (a file cut short) is an error.
static bool read_lines(const char *path, char **buffer, char ***lines, int *n_lines) {
    *buffer = NULL; *lines = NULL; *n_lines = 0;
    if (!file_exists(path)) return true;
    size_t len;
    char *text = (char *)read_file(path, &len);
    if (!text) return false;
    int n = 0;
    for (size_t i = 0; i < len; i++) n += text[i] == '\n';
    *buffer = text;
    *lines = xmalloc(sizeof(char *) * (size_t)(n ? n : 1));
    for (char *line = text, *end = text + len; line < end; ) {
        char *eol = memchr(line, '\n', (size_t)(end - line));
        if (!eol) return fail("'%s' line %d is incomplete", path, *n_lines + 1);
        *eol = '\0';
        (*lines)[(*n_lines)++] = line;
        line = eol + 1;
    }
    return true;
}

// Parses a decimal integer at *p (digits, optionally after '-') into *out if it lies in
// [lo, hi]; advances *p. Nothing else (spaces, "1e3", "nan") is an integer.
static bool parse_int_at(char **p, long lo, long hi, long *out) {
    char *next;
    if (!(isdigit((unsigned char)**p) || (**p == '-' && isdigit((unsigned char)(*p)[1])))) return false;
    errno = 0;
    *out = strtol(*p, &next, 10);
    if (errno || *out < lo || *out > hi) return false;
    *p = next;
    return true;
}

// Parses ",<integer>" at *p as parse_int_at does.
static bool parse_csv_int(char **p, long lo, long hi, long *out) {
    if (**p != ',') return false;
    char *q = *p + 1;
    if (!parse_int_at(&q, lo, hi, out)) return false;
    *p = q;
    return true;
}

// Parses n numbers from *p, each after a comma, and advances *p; false if one is missing.
static bool parse_csv_numbers(char **p, double *out, int n) {
    for (int i = 0; i < n; i++) {
        char *next;
        if (**p != ',') return false;
        out[i] = strtod(*p + 1, &next);
        if (next == *p + 1) return false;
        *p = next;
    }
    return true;
}

// Files are written to "<path>.tmp" and renamed into place only when complete, so a crash
// or a full disk never leaves a half-written file under the real name.
typedef struct { FILE *f; char tmp_path[4096]; const char *path; bool ok; int error; } AtomicFile;

// Several files written as one (an export's): while file_batch is set, atomic_close leaves each
// finished file at its temporary name; batch_commit renames them all into place only after
// every write succeeded, and batch_discard removes them, so a failed write (a full disk) leaves
// the files of an earlier run as they were.
#define BATCH_MAX 8
typedef struct { char tmp_path[BATCH_MAX][4096], path[BATCH_MAX][4096]; int n; } FileBatch;
static FileBatch *file_batch;

static bool atomic_open(AtomicFile *af, const char *path) {
    af->path = path;
    af->ok = true;
    af->error = 0;
    if (snprintf(af->tmp_path, sizeof af->tmp_path, "%s.tmp", path) >= (int)sizeof af->tmp_path)
        return fail("path too long: '%s'", path);
    af->f = fopen(af->tmp_path, "wb");
    if (!af->f) return fail("cannot create '%s': %s", af->tmp_path, strerror(errno));
    return true;
}

static void atomic_write(AtomicFile *af, const void *data, size_t size) {
    if (af->ok && size > 0 && fwrite(data, 1, size, af->f) != size) {
        af->ok = false;
        af->error = errno ? errno : EIO;
    }
}

static bool atomic_close(AtomicFile *af) {
    int err = af->ok ? 0 : af->error;   // the first failure's reason
    if (!err && (ferror(af->f) || fflush(af->f) != 0)) err = errno ? errno : EIO;
    if (fclose(af->f) != 0 && !err) err = errno ? errno : EIO;
    if (err) {
        remove(af->tmp_path);
        return fail("error writing '%s': %s", af->tmp_path, strerror(err));
    }
    if (file_batch) {
        if (file_batch->n == BATCH_MAX) die("internal: more than %d files in one batch", BATCH_MAX);
        memcpy(file_batch->tmp_path[file_batch->n], af->tmp_path, sizeof af->tmp_path);
        snprintf(file_batch->path[file_batch->n++], sizeof file_batch->path[0], "%s", af->path);
        return true;
    }
    if (rename(af->tmp_path, af->path) != 0) {
        remove(af->tmp_path);
        return fail("cannot rename '%s' to '%s': %s", af->tmp_path, af->path, strerror(errno));
    }
    return true;
}

// Removes the batch's files still at their temporary names, from index `from` on.
static void batch_discard(FileBatch *b, int from) {
    for (int k = from; k < b->n; k++) remove(b->tmp_path[k]);
    b->n = 0;
}

// Renames the batch's files into place. If a rename fails (a directory in the way), the files
// renamed before it are removed too, so none of the batch is left.
static bool batch_commit(FileBatch *b) {
    for (int k = 0; k < b->n; k++)
        if (rename(b->tmp_path[k], b->path[k]) != 0) {
            fail("cannot rename '%s' to '%s': %s", b->tmp_path[k], b->path[k], strerror(errno));
            for (int j = 0; j < k; j++) remove(b->path[j]);
            batch_discard(b, k);
            return false;
        }
    b->n = 0;
    return true;
}

// Sequential reader over a byte buffer that records the first short read.
typedef struct { const unsigned char *p; size_t len, pos; bool short_read; } Reader;

static void reader_get(Reader *r, void *out, size_t size) {
    if (r->pos + size > r->len) { r->short_read = true; memset(out, 0, size); return; }
    memcpy(out, r->p + r->pos, size);
    r->pos += size;
}

static int num_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

static void set_num_threads(int n) {
#ifdef _OPENMP
    if (n > 0) omp_set_num_threads(n);
#else
    (void)n;
#endif
}

// Formats a duration like "4m05s" for progress lines.
static const char *format_duration(double seconds, char *buf, size_t size) {
    if (seconds < 0 || !isfinite(seconds)) seconds = 0;
    long s = (long)(seconds + 0.5);
    if (s >= 3600) snprintf(buf, size, "%ldh%02ldm", s / 3600, (s / 60) % 60);
    else snprintf(buf, size, "%ldm%02lds", s / 60, s % 60);
    return buf;
}

/* ============================================================================
 * Fast kernels: the products of Part I on one register-tiled kernel
 * ========================================================================== */

// A product C[M, N] = A·B (or C += A·B) is given by strides: A[i][k] = a[i·a_row + k·a_col] and
// B[k][j] = b[k·b_row + j·b_col], so either may be the transpose of a row-major array. One kernel
// thus serves the forward product, both backward products, attention and Newton-Schulz.
//
// C is cut into tiles of GEMM_MR x GEMM_NR. A tile keeps its sums in vectors of 8 floats, two
// per row, and for each k does 2·MR vector multiply-adds on one row of B (two vectors) and MR
// broadcast values of A. MR is as large as the registers allow: 6 rows (12 accumulators + 2 B
// vectors + 1 broadcast) on AVX2's 16 registers or NEON's 32 (two per vector), 12 on AVX-512's
// 32. The vectors are GCC/Clang vector extensions, so the layout is fixed in the source rather
// than left to the auto-vectorizer (which made a 30x slower kernel of the plain loop for
// AVX-512), and it stays portable C.
// A row of B must be 16 floats in a row: B is read in place when it is row-major and the panel
// full; otherwise the panel is first copied ("packed") into a K x 16 buffer, zero-padded. A is
// read in place, one value per tile row and k, whatever its strides.
//
// Every element of C is summed over k in order by one tile, so results do not depend on the
// number of threads nor on how the work is split.

typedef float vec8 __attribute__((vector_size(32)));   // 8 floats, one AVX register or two NEON

#if defined(__AVX512F__)
#define GEMM_MR 12
#else
#define GEMM_MR 6
#endif
#define GEMM_NR 16
#define GEMM_ITEM_ROWS 96   // rows of C per work item of gemm_parallel, a multiple of GEMM_MR

// Causal attention needs only a triangle of some products (see attention_forward):
enum {
    GEMM_FULL,
    GEMM_LOWER,     // only C[i][j] with j <= i is needed: tiles right of the diagonal are skipped
    GEMM_A_LOWER,   // A[i][k] = 0 for k > i: a tile sums k up to its last row only
    GEMM_A_UPPER,   // A[i][k] = 0 for k < i: a tile sums k from its first row only
};

typedef struct {
    float *c; size_t ldc;              // C [M, N], row stride ldc
    const float *a; size_t a_row, a_col;
    const float *b; size_t b_row, b_col;
    int M, N, K;
    bool accumulate;                   // C += A·B instead of C = A·B
    int shape;                         // GEMM_FULL or a triangle
    const float *packed;               // B already packed, panel after panel (gemm_parallel), or NULL
} Gemm;

// Per-thread work space, grown as needed and never freed, so that allocation stays out of the
// training loop after the first step. One buffer per use, so that users can nest.
static _Thread_local float *workspace_buffer[N_WORKSPACES];
static _Thread_local size_t workspace_floats[N_WORKSPACES];

static float *workspace(int which, size_t floats) {
    if (floats > workspace_floats[which]) {
        free(workspace_buffer[which]);
        workspace_buffer[which] = xmalloc(sizeof(float) * floats);
        workspace_floats[which] = floats;
    }
    return workspace_buffer[which];
}

// One tile: c[i][j] (+)= Σ_{k0 <= k < k1} A[i][k]·panel[k][j] for i < mr, j < nr, where a points
// at the tile's first row of A and panel rows are panel_row floats apart. A short tile
// (mr < MR) repeats its last row of A, so the loop is always the full MR x 16.
static inline void gemm_tile(float *restrict c, size_t ldc, const float *a, size_t a_row, size_t a_col,
                             const float *panel, size_t panel_row, int k0, int k1, bool accumulate,
                             int mr, int nr) {
    const float *row[GEMM_MR];
    for (int i = 0; i < GEMM_MR; i++) row[i] = a + (size_t)(i < mr ? i : mr - 1) * a_row;
    vec8 acc[GEMM_MR][2];
    for (int i = 0; i < GEMM_MR; i++) acc[i][0] = acc[i][1] = (vec8){0};
    for (int k = k0; k < k1; k++) {
        vec8 b0, b1;   // memcpy: an unaligned vector load (no vector-typed function calls: their ABI varies)
        memcpy(&b0, panel + (size_t)k * panel_row, sizeof b0);
        memcpy(&b1, panel + (size_t)k * panel_row + 8, sizeof b1);
#pragma GCC unroll 12
        for (int i = 0; i < GEMM_MR; i++) {
            float aik = row[i][(size_t)k * a_col];
            acc[i][0] += aik * b0;
            acc[i][1] += aik * b1;
        }
    }
    for (int i = 0; i < mr; i++) {
        float *ci = c + (size_t)i * ldc, sums[GEMM_NR];
        memcpy(sums, acc[i], sizeof sums);
        for (int j = 0; j < nr; j++) ci[j] = (accumulate ? ci[j] : 0.0f) + sums[j];
    }
}

static int gemm_panels(const Gemm *g) { return (g->N + GEMM_NR - 1) / GEMM_NR; }   // column panels of C
static bool gemm_needs_packing(const Gemm *g) { return g->b_col != 1 || g->N % GEMM_NR != 0; }

// Packs column panel `panel` of B: buf[k][j] = B[k][16·panel + j] for k < K, j < 16, zero beyond N.
static void gemm_pack_panel(float *buf, const Gemm *g, int panel) {
    int j0 = panel * GEMM_NR, nr = g->N - j0 < GEMM_NR ? g->N - j0 : GEMM_NR;
    const float *p = g->b + (size_t)j0 * g->b_col;
    for (int k = 0; k < g->K; k++)
        for (int j = 0; j < GEMM_NR; j++)
            buf[(size_t)k * GEMM_NR + j] = j < nr ? p[(size_t)k * g->b_row + (size_t)j * g->b_col] : 0.0f;
}

// Rows [i_begin, i_end) of column panel `panel` (columns 16·panel ...) of a product, on the
// calling thread. i_begin is a multiple of GEMM_MR, so tiles sit at the same rows however the
// rows are split (the triangles rely on that).
static void gemm_block(const Gemm *g, int panel, int i_begin, int i_end) {
    int j0 = panel * GEMM_NR, nr = g->N - j0 < GEMM_NR ? g->N - j0 : GEMM_NR;
    if (g->shape == GEMM_LOWER && j0 > i_end - 1) return;
    const float *p = g->b + (size_t)j0 * g->b_col;
    size_t p_row = g->b_row;
    if (g->packed) {
        p = g->packed + (size_t)panel * g->K * GEMM_NR;
        p_row = GEMM_NR;
    } else if (gemm_needs_packing(g)) {
        float *buf = workspace(WORKSPACE_PANEL, (size_t)g->K * GEMM_NR);
        gemm_pack_panel(buf, g, panel);
        p = buf;
        p_row = GEMM_NR;
    }
    for (int i0 = i_begin; i0 < i_end; i0 += GEMM_MR) {
        int mr = i_end - i0 < GEMM_MR ? i_end - i0 : GEMM_MR;
        if (g->shape == GEMM_LOWER && j0 > i0 + mr - 1) continue;
        int k0 = g->shape == GEMM_A_UPPER ? i0 : 0;
        int k1 = g->shape == GEMM_A_LOWER && i0 + mr < g->K ? i0 + mr : g->K;
        gemm_tile(g->c + (size_t)i0 * g->ldc + j0, g->ldc, g->a + (size_t)i0 * g->a_row, g->a_row, g->a_col,
                  p, p_row, k0, k1, g->accumulate, mr, nr);
    }
}

// A whole product on the calling thread (for callers that are themselves split over threads).
static void gemm_serial(const Gemm *g) {
    for (int panel = 0; panel < gemm_panels(g); panel++) gemm_block(g, panel, 0, g->M);
}

#define GEMM_MAX_BATCH 8

// n products split over the threads in one parallel region. Work items (a panel of
// GEMM_ITEM_ROWS rows) are handed out one at a time, so a thread that the OS shares with another
// program simply takes fewer. Products that write the same C must be consecutive in g (a
// "chain", same M and N): each item runs the chain in order, so every element of C still
// receives the products' sums in a fixed order.
static void gemm_parallel(const Gemm *products, int n) {
    int chain[GEMM_MAX_BATCH], first_item[GEMM_MAX_BATCH + 1] = {0}, chains = 0;
    if (n > GEMM_MAX_BATCH) die("internal: gemm_parallel of %d products", n);
    // A B that needs packing is packed once here, all its panels, not once per work item.
    Gemm g[GEMM_MAX_BATCH];
    size_t packed_floats = 0;
    for (int p = 0; p < n; p++)
        if (gemm_needs_packing(&products[p]))
            packed_floats += (size_t)products[p].K * GEMM_NR * gemm_panels(&products[p]);
    float *packed = packed_floats ? workspace(WORKSPACE_PACKED, packed_floats) : NULL;
    for (int p = 0; p < n; p++) {
        g[p] = products[p];
        if (!gemm_needs_packing(&g[p])) continue;
        g[p].packed = packed;
        for (int panel = 0; panel < gemm_panels(&g[p]); panel++, packed += (size_t)g[p].K * GEMM_NR)
            gemm_pack_panel(packed, &g[p], panel);
    }
    for (int p = 0; p < n; p++) {
        if (p > 0 && g[p].c == g[p - 1].c) continue;
        int panels = gemm_panels(&g[p]);
        int blocks = (g[p].M + GEMM_ITEM_ROWS - 1) / GEMM_ITEM_ROWS;
        chain[chains] = p;
        first_item[chains + 1] = first_item[chains] + panels * blocks;
        chains++;
    }
#pragma omp parallel for schedule(dynamic)
    for (int item = 0; item < first_item[chains]; item++) {
        int ch = 0;
        while (item >= first_item[ch + 1]) ch++;
        const Gemm *first = &g[chain[ch]];
        int blocks = (first->M + GEMM_ITEM_ROWS - 1) / GEMM_ITEM_ROWS, local = item - first_item[ch];
        int i0 = local % blocks * GEMM_ITEM_ROWS;
        int i1 = i0 + GEMM_ITEM_ROWS < first->M ? i0 + GEMM_ITEM_ROWS : first->M;
        for (const Gemm *p = first; p < g + n && p->c == first->c; p++) gemm_block(p, local / blocks, i0, i1);
    }
}

// Seconds spent in the forward and backward matmuls, for ./osp bench's breakdown: counted by
// the matmul kernels while `profiling` is on (bench times the other parts at its own call sites).
static double matmul_seconds[2];   // [0] forward, [1] backward
static bool profiling;

static void matmuls_same_input(int n, float *const *out, const float *x, const float *const *w, int N, int C,
                               const int *OC) {
    double t0 = profiling ? now_seconds() : 0.0;
    Gemm g[GEMM_MAX_BATCH];   // B[k][j] = w[j][k]
    for (int p = 0; p < n; p++)
        g[p] = (Gemm){out[p], (size_t)OC[p], x, (size_t)C, 1, w[p], 1, (size_t)C, N, OC[p], C, false,
                      GEMM_FULL, NULL};
    gemm_parallel(g, n);
    if (profiling) matmul_seconds[0] += now_seconds() - t0;
}

static void matmul(float *out, const float *x, const float *w, int N, int C, int OC) {
    matmuls_same_input(1, &out, x, &w, N, C, &OC);
}

// The dW products come first (A[o][n] = dout[p][n][o]), then the dx products, a chain in order.
// The dW items are the larger (k runs over all N tokens), and large items first balance best.
static void matmuls_same_input_backward(int n, float *dx, float *const *dw, const float *const *dout,
                                        const float *x, const float *const *w, int N, int C, const int *OC) {
    double t0 = profiling ? now_seconds() : 0.0;
    Gemm g[GEMM_MAX_BATCH];
    for (int p = 0; p < n; p++) {
        g[p] = (Gemm){dw[p], (size_t)C, dout[p], 1, (size_t)OC[p], x, (size_t)C, 1, OC[p], C, N, true,
                      GEMM_FULL, NULL};
        g[n + p] = (Gemm){dx, (size_t)C, dout[p], (size_t)OC[p], 1, w[p], (size_t)C, 1, N, C, OC[p], true,
                          GEMM_FULL, NULL};
    }
    gemm_parallel(g, 2 * n);
    if (profiling) matmul_seconds[1] += now_seconds() - t0;
}

static void matmul_backward(float *dx, float *dw, const float *dout, const float *x, const float *w, int N,
                            int C, int OC) {
    matmuls_same_input_backward(1, dx, &dw, &dout, x, &w, N, C, &OC);
}

// The causal products: only the triangle on and below the diagonal is computed or read.
static void causal_scores(float *s, const float *a, size_t a_row, const float *b, size_t b_row, int T,
                          int n) {
    gemm_serial(&(Gemm){s, (size_t)T, a, a_row, 1, b, 1, b_row, T, T, n, false, GEMM_LOWER, NULL});
    for (int t = 0; t < T; t++) {   // zeros right of the diagonal up to the end of row t's tile,
        int tile_end = (t / GEMM_MR + 1) * GEMM_MR;   // as far as GEMM_A_LOWER and _UPPER read
        for (int u = t + 1; u < tile_end && u < T; u++) s[(size_t)t * T + u] = 0.0f;
    }
}

static void causal_mix(float *out, size_t out_row, const float *p, const float *v, size_t v_row, int T,
                       int n) {
    gemm_serial(&(Gemm){out, out_row, p, (size_t)T, 1, v, v_row, 1, T, n, T, false, GEMM_A_LOWER, NULL});
}

static void causal_mix_add(float *out, size_t out_row, const float *p, const float *v, size_t v_row, int T,
                           int n) {
    gemm_serial(&(Gemm){out, out_row, p, (size_t)T, 1, v, v_row, 1, T, n, T, true, GEMM_A_LOWER, NULL});
}

static void causal_mix_transposed_add(float *out, size_t out_row, const float *p, const float *v,
                                      size_t v_row, int T, int n) {   // A[i][k] = p[k][i]
    gemm_serial(&(Gemm){out, out_row, p, 1, (size_t)T, v, v_row, 1, T, n, T, true, GEMM_A_UPPER, NULL});
}

static void gram_matrix(float *g, const float *x, int r, int c) {   // B[k][j] = x[j][k]
    gemm_serial(&(Gemm){g, (size_t)r, x, (size_t)c, 1, x, 1, (size_t)c, r, r, c, false, GEMM_FULL, NULL});
}

static void matrix_product(float *out, const float *a, const float *b, int M, int K, int N) {
    gemm_serial(&(Gemm){out, (size_t)N, a, (size_t)K, 1, b, (size_t)N, 1, M, N, K, false, GEMM_FULL, NULL});
}

// The plain loops of attention, forward and backward: the reference for attention_forward and
// attention_backward, Part I's attention on the causal products above (test_osp.c: odd shapes,
// T = 1, causal tiles cut mid-tile). They write att only for t2 <= t.
void attention_forward_reference(float *out, float *att, const float *q, const float *k, const float *v,
                                 int B, int T, int H, int KVH, int hd);
void attention_forward_reference(float *out, float *att, const float *q, const float *k, const float *v,
                                 int B, int T, int H, int KVH, int hd) {
    float scale = 1.0f / sqrtf((float)hd);
    int group = H / KVH;
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++)
            for (int t = 0; t < T; t++) {
                const float *qt = q + (((size_t)b * T + t) * H + h) * hd;
                float *p = att + (((size_t)b * H + h) * T + t) * T;
                int kh = h / group;
                float maxval = -FLT_MAX;
                for (int t2 = 0; t2 <= t; t2++) {
                    p[t2] = dot(qt, k + (((size_t)b * T + t2) * KVH + kh) * hd, hd) * scale;
                    if (p[t2] > maxval) maxval = p[t2];
                }
                float sum = 0.0f;
                for (int t2 = 0; t2 <= t; t2++) { p[t2] = expf(p[t2] - maxval); sum += p[t2]; }
                float inv = 1.0f / sum;
                float *o = out + (((size_t)b * T + t) * H + h) * hd;
                for (int i = 0; i < hd; i++) o[i] = 0.0f;
                for (int t2 = 0; t2 <= t; t2++) {
                    p[t2] *= inv;
                    const float *vt = v + (((size_t)b * T + t2) * KVH + kh) * hd;
                    for (int i = 0; i < hd; i++) o[i] += p[t2] * vt[i];
                }
            }
}

void attention_backward_reference(float *dq, float *dk, float *dv, const float *dout, const float *out,
                                  const float *att, const float *q, const float *k, const float *v,
                                  int B, int T, int H, int KVH, int hd);
void attention_backward_reference(float *dq, float *dk, float *dv, const float *dout, const float *out,
                                  const float *att, const float *q, const float *k, const float *v,
                                  int B, int T, int H, int KVH, int hd) {
    float scale = 1.0f / sqrtf((float)hd);
    int group = H / KVH;
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++)
            for (int t = 0; t < T; t++) {
                size_t row = ((size_t)b * T + t) * H + h;
                const float *p = att + (((size_t)b * H + h) * T + t) * T;
                const float *go = dout + row * hd, *qt = q + row * hd;
                float *dqt = dq + row * hd;
                float p_dot_dp = dot(go, out + row * hd, hd);
                for (int t2 = 0; t2 <= t; t2++) {
                    size_t kv_row = ((size_t)b * T + t2) * KVH + h / group;
                    const float *kt = k + kv_row * hd, *vt = v + kv_row * hd;
                    float *dkt = dk + kv_row * hd, *dvt = dv + kv_row * hd;
                    float ds = p[t2] * (dot(go, vt, hd) - p_dot_dp) * scale;
                    for (int i = 0; i < hd; i++) {
                        dvt[i] += p[t2] * go[i];
                        dqt[i] += ds * kt[i];
                        dkt[i] += ds * qt[i];
                    }
                }
            }
}

/* ============================================================================
 * Tokenizer: byte-fallback BPE in llama2.c's tokenizer.bin format
 *
 * File: uint32 max_token_length, then per token: float32 score, int32 length, bytes.
 * Layout: 0 <unk>, 1 <s>, 2 </s>; 3..258 the byte tokens "<0x00>".."<0xFF>"; then one token
 * per UTF-8 character seen in the training text; then the merges, earlier merges scoring
 * higher. Spaces are stored as plain spaces, as llama2.c's export does.
 * ========================================================================== */

#define TOKEN_UNK 0
#define TOKEN_BOS 1
#define TOKEN_EOS 2
#define TOKEN_BYTE0 3            // id of the byte token <0x00>
#define TOKEN_FIRST_PIECE 259    // first id after the byte tokens
#define VOCAB_MAX 4096           // token files store uint16 ids; training uses a V*V pair table
static const char *special_pieces[TOKEN_BYTE0] = {"<unk>", "<s>", "</s>"};

typedef struct {
    int vocab_size;
    unsigned max_token_length;
    char **pieces;      // [vocab_size] token bytes (NUL-terminated for printing)
    int *lengths;       // [vocab_size]
    float *scores;      // [vocab_size]
    int *sorted_ids;    // [vocab_size] ids sorted by bytes, for binary-search lookup
} Tokenizer;

static int compare_bytes(const char *a, int alen, const char *b, int blen) {
    int n = alen < blen ? alen : blen;
    int c = memcmp(a, b, (size_t)n);
    return c ? c : (alen > blen) - (alen < blen);
}

static const Tokenizer *sort_context;
static int compare_token_ids(const void *a, const void *b) {
    int x = *(const int *)a, y = *(const int *)b;
    int c = compare_bytes(sort_context->pieces[x], sort_context->lengths[x],
                          sort_context->pieces[y], sort_context->lengths[y]);
    return c ? c : (x > y) - (x < y);
}

// Builds the sorted index used by tokenizer_lookup.
static void tokenizer_index(Tokenizer *t) {
    t->sorted_ids = xmalloc(sizeof(int) * (size_t)t->vocab_size);
    for (int i = 0; i < t->vocab_size; i++) t->sorted_ids[i] = i;
    sort_context = t;
    qsort(t->sorted_ids, (size_t)t->vocab_size, sizeof(int), compare_token_ids);
    t->max_token_length = 0;
    for (int i = 0; i < t->vocab_size; i++)
        if ((unsigned)t->lengths[i] > t->max_token_length) t->max_token_length = (unsigned)t->lengths[i];
}

// Id of the token whose bytes are exactly s[0..len), or -1.
static int tokenizer_lookup(const Tokenizer *t, const char *s, int len) {
    int lo = 0, hi = t->vocab_size - 1;
    while (lo <= hi) {
        int mid = (lo + hi) / 2, id = t->sorted_ids[mid];
        int c = compare_bytes(t->pieces[id], t->lengths[id], s, len);
        if (c == 0) return id;
        if (c < 0) lo = mid + 1; else hi = mid - 1;
    }
    return -1;
}

static void tokenizer_add(Tokenizer *t, const char *s, int len, float score) {
    int id = t->vocab_size++;
    t->pieces[id] = xmalloc((size_t)len + 1);
    memcpy(t->pieces[id], s, (size_t)len);
    t->pieces[id][len] = 0;
    t->lengths[id] = len;
    t->scores[id] = score;
}

static void tokenizer_free(Tokenizer *t) {
    for (int i = 0; i < t->vocab_size; i++) free(t->pieces[i]);
    free(t->pieces); free(t->lengths); free(t->scores); free(t->sorted_ids);
    memset(t, 0, sizeof *t);
}

// Allocates an empty tokenizer with room for `capacity` tokens.
static void tokenizer_alloc(Tokenizer *t, int capacity) {
    memset(t, 0, sizeof *t);
    t->pieces = xcalloc((size_t)capacity, sizeof(char *));
    t->lengths = xcalloc((size_t)capacity, sizeof(int));
    t->scores = xcalloc((size_t)capacity, sizeof(float));
}

// Allocates a tokenizer and adds the three specials and the 256 byte tokens.
static void tokenizer_init_base(Tokenizer *t, int capacity) {
    tokenizer_alloc(t, capacity);
    for (int i = 0; i < TOKEN_BYTE0; i++)
        tokenizer_add(t, special_pieces[i], (int)strlen(special_pieces[i]), 0.0f);
    for (int b = 0; b < 256; b++) {
        char name[8];
        snprintf(name, sizeof name, "<0x%02X>", b);
        tokenizer_add(t, name, 6, 0.0f);
    }
}

static bool is_space_byte(unsigned char c) {
    return c == ' ' || c == '\n' || c == '\t' || c == '\r' || c == '\v' || c == '\f';
}

// Length of the run.c "codepoint" starting at text[i]: one byte plus up to three following
// continuation bytes (10xxxxxx), exactly as llama2.c's encode() groups bytes.
static int utf8_unit_length(const unsigned char *text, size_t n, size_t i) {
    int len = 1;
    while (i + (size_t)len < n && len < 4 && (text[i + (size_t)len] & 0xC0) == 0x80) len++;
    return len;
}

// True if s[0..len) is one well-formed UTF-8 character other than NUL (run.c cannot look
// up NUL, so NUL always takes the byte fallback).
static bool is_utf8_char(const unsigned char *s, int len) {
    int need = s[0] < 0x80          ? 1
            : (s[0] & 0xE0) == 0xC0 ? 2
            : (s[0] & 0xF0) == 0xE0 ? 3
            : (s[0] & 0xF8) == 0xF0 ? 4
                                    : 0;
    if (need != len || s[0] == 0) return false;
    for (int k = 1; k < len; k++) if ((s[k] & 0xC0) != 0x80) return false;
    return true;
}

// Maps text to initial tokens (one per character, byte tokens for characters not in the
// vocab); returns the count. tokens must hold n entries.
static int tokenizer_split(const Tokenizer *t, const unsigned char *text, size_t n, int *tokens) {
    int count = 0;
    for (size_t i = 0; i < n;) {
        int len = utf8_unit_length(text, n, i);
        int id = tokenizer_lookup(t, (const char *)text + i, len);
        if (id >= TOKEN_FIRST_PIECE) tokens[count++] = id;
        else for (int k = 0; k < len; k++) tokens[count++] = TOKEN_BYTE0 + text[i + (size_t)k];
        i += (size_t)len;
    }
    return count;
}

// run.c's merge loop: repeatedly merge the adjacent pair whose concatenation is the
// highest-scored token (leftmost on ties) until no pair merges. O(n^2): the reference.
#define MERGE_SCORE_FLOOR -1e10f   // run.c's start value: a token scored at or below it never merges
static int bpe_merge(const Tokenizer *t, int *tokens, int n) {
    char *buf = xmalloc(2 * (size_t)t->max_token_length + 1);
    for (;;) {
        float best_score = MERGE_SCORE_FLOOR;
        int best_id = -1, best_pos = -1;
        for (int i = 0; i + 1 < n; i++) {
            int a = tokens[i], b = tokens[i + 1];
            memcpy(buf, t->pieces[a], (size_t)t->lengths[a]);
            memcpy(buf + t->lengths[a], t->pieces[b], (size_t)t->lengths[b]);
            int id = tokenizer_lookup(t, buf, t->lengths[a] + t->lengths[b]);
            if (id != -1 && t->scores[id] > best_score) {
                best_score = t->scores[id];
                best_id = id;
                best_pos = i;
            }
        }
        if (best_id == -1) break;
        tokens[best_pos] = best_id;
        memmove(tokens + best_pos + 1, tokens + best_pos + 2, sizeof(int) * (size_t)(n - best_pos - 2));
        n--;
    }
    free(buf);
    return n;
}

// Encodes text to token ids (no BOS, no dummy prefix); returns the count. tokens must hold
// n entries. Equals bpe_merge over the whole text: trained tokens never contain whitespace
// after their first byte, so no merge crosses the start of a whitespace byte, and the text
// can be merged piece by piece (each piece: one whitespace byte and the bytes up to the next).
static int tokenizer_encode(const Tokenizer *t, const unsigned char *text, size_t n, int *tokens) {
    int count = 0;
    for (size_t start = 0; start < n;) {
        size_t end = start + 1;
        while (end < n && !is_space_byte(text[end])) end++;
        int piece = tokenizer_split(t, text + start, end - start, tokens + count);
        count += bpe_merge(t, tokens + count, piece);
        start = end;
    }
    return count;
}

// Bytes of one token for output: byte tokens give their byte, specials give nothing.
static const char *tokenizer_decode(const Tokenizer *t, int id, int *len, char *byte_buf) {
    if (id >= TOKEN_BYTE0 && id < TOKEN_FIRST_PIECE) {
        byte_buf[0] = (char)(id - TOKEN_BYTE0);
        *len = 1;
        return byte_buf;
    }
    if (id < TOKEN_BYTE0) { *len = 0; return ""; }
    *len = t->lengths[id];
    return t->pieces[id];
}

// Trains the tokenizer on text: base tokens, every character that occurs, then BPE merges
// until vocab_size tokens (or until no pair occurs twice); returns the number of character
// tokens. A merge may only take a right token with no whitespace, so whitespace only ever
// begins a token (like SentencePiece's "▁word" pieces) and encoding can work piece by piece.
static int tokenizer_train(Tokenizer *t, const unsigned char *text, size_t n, int vocab_size) {
    // Characters, collected in a scratch vocab, are added in byte order so the result does
    // not depend on where they first occur.
    Tokenizer chars;
    tokenizer_init_base(&chars, vocab_size);
    tokenizer_index(&chars);
    for (size_t i = 0; i < n;) {
        int len = utf8_unit_length(text, n, i);
        if (is_utf8_char(text + i, len) && tokenizer_lookup(&chars, (const char *)text + i, len) == -1) {
            if (chars.vocab_size == vocab_size)
                die("vocab size %d is too small: the text has more than %d distinct characters", vocab_size,
                    vocab_size - TOKEN_FIRST_PIECE);
            tokenizer_add(&chars, (const char *)text + i, len, 0.0f);
            free(chars.sorted_ids);
            tokenizer_index(&chars);
        }
        i += (size_t)len;
    }
    tokenizer_init_base(t, vocab_size);
    for (int k = 0; k < chars.vocab_size; k++) {
        int id = chars.sorted_ids[k];
        if (id >= TOKEN_FIRST_PIECE) tokenizer_add(t, chars.pieces[id], chars.lengths[id], 0.0f);
    }
    int n_chars = chars.vocab_size - TOKEN_FIRST_PIECE;
    tokenizer_free(&chars);
    tokenizer_index(t);

    int *seq = xmalloc(sizeof(int) * (n ? n : 1));
    int len = tokenizer_split(t, text, n, seq);
    uint32_t *pair_count = xcalloc((size_t)vocab_size * (size_t)vocab_size, sizeof(uint32_t));
    bool *has_space = xcalloc((size_t)vocab_size, sizeof(bool));
    for (int id = 0; id < t->vocab_size; id++)
        for (int k = 0; k < t->lengths[id]; k++)
            has_space[id] |= is_space_byte((unsigned char)t->pieces[id][k]);
    int merges = 0;
    while (t->vocab_size < vocab_size) {
        uint32_t best = 0;
        int best_a = -1, best_b = -1;
        for (int i = 0; i + 1 < len; i++) {
            int a = seq[i], b = seq[i + 1];
            if (a < TOKEN_FIRST_PIECE || b < TOKEN_FIRST_PIECE || has_space[b]) continue;
            uint32_t c = ++pair_count[(size_t)a * (size_t)vocab_size + (size_t)b];
            if (c > best || (c == best && (a < best_a || (a == best_a && b < best_b)))) {
                best = c;
                best_a = a;
                best_b = b;
            }
        }
        for (int i = 0; i + 1 < len; i++)
            pair_count[(size_t)seq[i] * (size_t)vocab_size + (size_t)seq[i + 1]] = 0;
        if (best < 2) break;
        int la = t->lengths[best_a], lb = t->lengths[best_b];
        char *joined = xmalloc((size_t)(la + lb));
        memcpy(joined, t->pieces[best_a], (size_t)la);
        memcpy(joined + la, t->pieces[best_b], (size_t)lb);
        int id = tokenizer_lookup(t, joined, la + lb);
        if (id == -1) {
            id = t->vocab_size;
            tokenizer_add(t, joined, la + lb, -(float)(++merges));
            has_space[id] = has_space[best_a];
            free(t->sorted_ids);
            tokenizer_index(t);
        }
        free(joined);
        int out = 0;
        for (int i = 0; i < len; i++) {
            if (i + 1 < len && seq[i] == best_a && seq[i + 1] == best_b) { seq[out++] = id; i++; }
            else seq[out++] = seq[i];
        }
        len = out;
    }
    free(pair_count); free(has_space); free(seq);
    return n_chars;
}

static bool tokenizer_save(const Tokenizer *t, const char *path) {
    AtomicFile af;
    if (!atomic_open(&af, path)) return false;
    uint32_t max_len = t->max_token_length;
    atomic_write(&af, &max_len, 4);
    for (int i = 0; i < t->vocab_size; i++) {
        int32_t len = t->lengths[i];
        atomic_write(&af, &t->scores[i], 4);
        atomic_write(&af, &len, 4);
        atomic_write(&af, t->pieces[i], (size_t)len);
    }
    return atomic_close(&af);
}

static bool tokenizer_load(Tokenizer *t, const char *path) {
    size_t size;
    unsigned char *data = read_file(path, &size);
    if (!data) return false;
    Reader r = {data, size, 0, false};
    uint32_t max_len;
    reader_get(&r, &max_len, 4);
    if (r.short_read || max_len == 0 || max_len > 1024) {
        free(data);
        return fail("'%s' is not a tokenizer.bin (bad max_token_length)", path);
    }
    int capacity = VOCAB_MAX;
    tokenizer_alloc(t, capacity);
    while (r.pos < r.len) {
        float score;
        int32_t len;
        reader_get(&r, &score, 4);
        reader_get(&r, &len, 4);
        if (r.short_read || len < 0 || (uint32_t)len > max_len || r.pos + (size_t)len > r.len) {
            int at = t->vocab_size;
            tokenizer_free(t); free(data);
            return fail("'%s' is truncated or corrupt at token %d", path, at);
        }
        if (t->vocab_size == capacity) {
            tokenizer_free(t);
            free(data);
            return fail("'%s' has more than %d tokens", path, VOCAB_MAX);
        }
        tokenizer_add(t, (const char *)r.p + r.pos, len, score);
        r.pos += (size_t)len;
    }
    free(data);
    if (t->vocab_size < TOKEN_FIRST_PIECE) {
        int v = t->vocab_size;
        tokenizer_free(t);
        return fail("'%s' has %d tokens; need at least %d (specials and byte tokens)", path, v,
                    TOKEN_FIRST_PIECE);
    }
    for (int b = 0; b < 256; b++) {
        char name[8];
        snprintf(name, sizeof name, "<0x%02X>", b);
        if (t->lengths[TOKEN_BYTE0 + b] != 6 || memcmp(t->pieces[TOKEN_BYTE0 + b], name, 6) != 0) {
            tokenizer_free(t);
            return fail("'%s': token %d should be the byte token %s", path, TOKEN_BYTE0 + b, name);
        }
    }
    tokenizer_index(t);
    return true;
}

/* ============================================================================
 * Data: token files (data_next_batch, in Part I, draws the batches)
 *
 * Token file: 16-byte header (char magic[4] "OSPD", uint32 version 1, uint32 vocab_size,
 * uint32 reserved 0), uint64 n_tokens, then n_tokens uint16 token ids. Little-endian.
 * ========================================================================== */

#define DATA_MAGIC "OSPD"
#define DATA_VERSION 1u

static bool tokens_save(const char *path, const int *tokens, size_t n, int vocab_size) {
    AtomicFile af;
    if (!atomic_open(&af, path)) return false;
    uint32_t header[3] = {DATA_VERSION, (uint32_t)vocab_size, 0};
    uint64_t count = n;
    atomic_write(&af, DATA_MAGIC, 4);
    atomic_write(&af, header, sizeof header);
    atomic_write(&af, &count, 8);
    uint16_t *ids = xmalloc(sizeof(uint16_t) * (n ? n : 1));
    for (size_t i = 0; i < n; i++) ids[i] = (uint16_t)tokens[i];
    atomic_write(&af, ids, sizeof(uint16_t) * n);
    free(ids);
    return atomic_close(&af);
}

static bool tokens_load(TokenData *d, const char *path) {
    size_t size;
    unsigned char *data = read_file(path, &size);
    if (!data) return false;
    Reader r = {data, size, 0, false};
    char magic[4];
    uint32_t header[3];
    uint64_t count;
    reader_get(&r, magic, 4);
    reader_get(&r, header, sizeof header);
    reader_get(&r, &count, 8);
    bool ok = true;
    if (r.short_read || memcmp(magic, DATA_MAGIC, 4) != 0)
        ok = fail("'%s' is not an osp token file (bad magic; run 'make data')", path);
    else if (header[0] != DATA_VERSION)
        ok = fail("'%s' has token file version %u; this osp reads version %u", path, header[0], DATA_VERSION);
    else if (header[1] < TOKEN_FIRST_PIECE || header[1] > VOCAB_MAX)
        ok = fail("'%s' has a bad vocab size %u", path, header[1]);
    else if (count != (size - r.pos) / 2 || (size - r.pos) % 2 != 0)
        ok = fail("'%s' is truncated: header says %llu tokens, file holds %zu", path,
                  (unsigned long long)count, (size - r.pos) / 2);
    if (!ok) { free(data); return false; }
    d->vocab_size = (int)header[1];
    d->n = (size_t)count;
    d->tokens = xmalloc(sizeof(uint16_t) * (d->n ? d->n : 1));
    memcpy(d->tokens, data + r.pos, sizeof(uint16_t) * d->n);
    free(data);
    for (size_t i = 0; i < d->n; i++)
        if (d->tokens[i] >= d->vocab_size) {
            unsigned id = d->tokens[i];
            free(d->tokens);
            return fail("'%s': token id %u at position %zu is out of range for vocab %d", path, id, i,
                        d->vocab_size);
        }
    return true;
}

/* ============================================================================
 * Checkpoints
 *
 * Little-endian binary, version 2:
 *   char magic[4] "OSPC"; uint32 version
 *   int32 vocab_size, dim, n_layers, n_heads, n_kv_heads, ffn_dim, seq_len, ssnorm, embproj
 *   int32 preset (index into presets[], -1 custom), merged (0/1), optimizer (0 adam, 1 muon,
 *         2 muon-only), ns_steps, batch, steps, warmup, step (steps completed),
 *         has_optimizer_state (0/1)
 *   float32 lr_adam, lr_muon, weight_decay, beta1, beta2, eps, muon_momentum, grad_clip
 *   uint64 seed, rng_state (the batch sampler's generator after `step` steps)
 *   float32 params[n_params]        (tensors in the order of param_names, layers back to back)
 *   float32 state[n_state]          (if has_optimizer_state; layout of optimizer_layout)
 * ========================================================================== */

#define CKPT_MAGIC "OSPC"
#define CKPT_VERSION 2u
#define CKPT_INTS 18
#define CKPT_FLOATS 8

// The accepted range of each setting, for the command line and for a checkpoint's header
// alike (the model's own consistency is config_problem's).
typedef struct { const char *name; double lo, hi; } Bound;
enum { B_DIM, B_LAYERS, B_HEADS, B_KV_HEADS, B_FFN_DIM, B_SEQ_LEN, B_BATCH, B_STEPS, B_NS_STEPS, B_LR,
       B_WD, B_GRAD_CLIP, B_MOMENTUM, N_BOUNDS };
static const Bound bounds[N_BOUNDS] = {
    [B_DIM] = { "dim", 2, 8192 },
    [B_LAYERS] = { "layers", 1, 256 },
    [B_HEADS] = { "heads", 1, 1024 },
    [B_KV_HEADS] = { "kv-heads", 1, 1024 },
    [B_FFN_DIM] = { "ffn-dim", 1, 65536 },
    [B_SEQ_LEN] = { "seq-len", 2, 65536 },
    [B_BATCH] = { "batch", 1, 65536 },
    [B_STEPS] = { "steps", 1, 1e8 },
    [B_NS_STEPS] = { "ns-steps", 1, 100 },
    [B_LR] = { "lr", 1e-8, 10 },
    [B_WD] = { "wd", 0, 10 },
    [B_GRAD_CLIP] = { "grad-clip", 0, 1e6 },
    [B_MOMENTUM] = { "muon-momentum", 0, 0.9999 },
};

static bool in_bounds(double v, int b) { return v >= bounds[b].lo && v <= bounds[b].hi; }   // false for NaN

// Why a config is unusable, or NULL.
static const char *config_problem(const Config *c) {
    static char msg[256];
    if (c->vocab_size < TOKEN_FIRST_PIECE || c->vocab_size > VOCAB_MAX)
        snprintf(msg, sizeof msg, "vocab size %d out of range [%d, %d]", c->vocab_size, TOKEN_FIRST_PIECE,
                 VOCAB_MAX);
    else if (c->dim < 2 || c->n_layers < 1 || c->n_heads < 1 || c->n_kv_heads < 1 || c->ffn_dim < 1 ||
             c->seq_len < 2)
        snprintf(msg, sizeof msg,
                 "dim, layers, heads, kv-heads, ffn-dim must be positive and seq-len at least 2");
    else if (c->dim % c->n_heads != 0)
        snprintf(msg, sizeof msg, "dim %d is not divisible by heads %d", c->dim, c->n_heads);
    else if (c->n_heads % c->n_kv_heads != 0)
        snprintf(msg, sizeof msg, "heads %d is not divisible by kv-heads %d", c->n_heads, c->n_kv_heads);
    else if (head_dim(c) % 2 != 0)
        snprintf(msg, sizeof msg, "head dim %d (dim / heads) must be even for RoPE", head_dim(c));
    else if ((double)c->dim * c->ffn_dim * c->n_layers > 4e9 || (double)c->vocab_size * c->dim > 4e9 ||
             c->seq_len > 65536)
        snprintf(msg, sizeof msg, "model too large");
    else return NULL;
    return msg;
}

// Why a checkpoint's training state cannot be right, naming the field, or NULL.
static const char *train_state_problem(const TrainState *s) {
    static char msg[160];
    const Config *c = &s->cfg;
    const OptimConfig *o = &s->opt;
    const struct { int bound; double v; } checks[] = {
        {B_DIM, c->dim}, {B_LAYERS, c->n_layers}, {B_HEADS, c->n_heads}, {B_KV_HEADS, c->n_kv_heads},
        {B_FFN_DIM, c->ffn_dim}, {B_SEQ_LEN, c->seq_len}, {B_BATCH, s->batch}, {B_STEPS, o->steps},
        {B_NS_STEPS, o->ns_steps}, {B_LR, o->lr_adam}, {B_LR, o->lr_muon}, {B_WD, o->weight_decay},
        {B_GRAD_CLIP, o->grad_clip}, {B_MOMENTUM, o->muon_momentum},
    };
    for (size_t i = 0; i < sizeof checks / sizeof checks[0]; i++)
        if (!in_bounds(checks[i].v, checks[i].bound)) {
            snprintf(msg, sizeof msg, "%s %g is outside [%g, %g]", bounds[checks[i].bound].name, checks[i].v,
                     bounds[checks[i].bound].lo, bounds[checks[i].bound].hi);
            return msg;
        }
    if ((c->ssnorm | c->embproj | s->merged) & ~1)
        snprintf(msg, sizeof msg, "ssnorm, embproj and merged must be 0 or 1");
    else if (!(o->beta1 >= 0 && o->beta1 < 1) || !(o->beta2 >= 0 && o->beta2 < 1))
        snprintf(msg, sizeof msg, "betas %g, %g are outside [0, 1)", o->beta1, o->beta2);
    else if (!(o->eps > 0 && o->eps <= 1)) snprintf(msg, sizeof msg, "eps %g is outside (0, 1]", o->eps);
    else if (o->optimizer < 0 || o->optimizer >= N_OPTIMIZERS || s->preset < -1 || s->preset >= N_PRESETS)
        snprintf(msg, sizeof msg, "optimizer %d or preset %d is unknown", o->optimizer, s->preset);
    else if (o->warmup < 0 || o->warmup > o->steps || s->step < 0 || s->step > o->steps)
        snprintf(msg, sizeof msg, "warmup %d or step %d is outside [0, steps %d]", o->warmup, s->step,
                 o->steps);
    else return config_problem(c);
    return msg;
}

// The activations a checkpoint may ask for (values and gradients): beyond, loading refuses.
#define ACTIVATIONS_MAX_BYTES 16e9

// The first tensor of the parameters, then of the optimizer state (layout of optimizer_layout;
// state may be NULL), that holds NaN or Inf, named; NULL if all are finite.
static const char *nonfinite_tensor(const Model *m, const float *params, const float *state, int optimizer) {
    static char name[64];
    for (int i = 0; i < N_PARAM_TENSORS; i++)
        for (size_t j = 0; j < param_size(m, i); j++)
            if (!isfinite(params[m->shape[i].offset + j])) return param_names[i];
    size_t offset[N_PARAM_TENSORS + 1];
    offset[N_PARAM_TENSORS] = optimizer_layout(m, optimizer, offset);
    for (int i = 0; state && i < N_PARAM_TENSORS; i++)
        for (size_t j = offset[i]; j < offset[i + 1]; j++)
            if (!isfinite(state[j])) {
                snprintf(name, sizeof name, "the optimizer state of %s", param_names[i]);
                return name;
            }
    return NULL;
}

// The optimizer state's size in bytes (as saved in a checkpoint).
static size_t optimizer_state_bytes(const Model *m, int optimizer) {
    size_t offset[N_PARAM_TENSORS];
    return sizeof(float) * optimizer_layout(m, optimizer, offset);
}

// Writes a checkpoint; state (optimizer buffers) may be NULL, as for a merged model.
static bool checkpoint_save(const char *path, const TrainState *s, const Model *m, const float *state) {
    const char *bad = nonfinite_tensor(m, m->params, state, s->opt.optimizer);
    if (bad) return fail("not writing '%s': %s holds NaN or Inf (a file already there is kept)", path, bad);
    AtomicFile af;
    if (!atomic_open(&af, path)) return false;
    uint32_t version = CKPT_VERSION;
    const Config *c = &s->cfg;
    const OptimConfig *o = &s->opt;
    int32_t ints[CKPT_INTS] = { c->vocab_size, c->dim,       c->n_layers,  c->n_heads, c->n_kv_heads,
                                c->ffn_dim,    c->seq_len,   c->ssnorm,    c->embproj, s->preset,
                                s->merged,     o->optimizer, o->ns_steps,  s->batch,   o->steps,
                                o->warmup,     s->step,      state != NULL };
    float floats[CKPT_FLOATS] = { o->lr_adam, o->lr_muon, o->weight_decay,  o->beta1,
                                  o->beta2,   o->eps,     o->muon_momentum, o->grad_clip };
    uint64_t u64[2] = {s->seed, s->rng};
    atomic_write(&af, CKPT_MAGIC, 4);
    atomic_write(&af, &version, 4);
    atomic_write(&af, ints, sizeof ints);
    atomic_write(&af, floats, sizeof floats);
    atomic_write(&af, u64, sizeof u64);
    atomic_write(&af, m->params, sizeof(float) * m->n_params);
    if (state) atomic_write(&af, state, optimizer_state_bytes(m, o->optimizer));
    return atomic_close(&af);
}

// Loads a checkpoint: fills s, allocates m for max_batch (0: the checkpoint's batch), and if
// state is not NULL returns the optimizer buffers in *state (NULL if the file has none).
static bool checkpoint_load(const char *path, TrainState *s, Model *m, int max_batch, float **state) {
    size_t size;
    unsigned char *data = read_file(path, &size);
    if (!data) return false;
    Reader r = {data, size, 0, false};
    char magic[4];
    uint32_t version;
    int32_t ints[CKPT_INTS];
    float floats[CKPT_FLOATS];
    uint64_t u64[2];
    reader_get(&r, magic, 4);
    reader_get(&r, &version, 4);
    reader_get(&r, ints, sizeof ints);
    reader_get(&r, floats, sizeof floats);
    reader_get(&r, u64, sizeof u64);
    memset(s, 0, sizeof *s);
    s->cfg = (Config){ints[0], ints[1], ints[2], ints[3], ints[4], ints[5], ints[6], ints[7], ints[8]};
    s->preset = ints[9];
    s->merged = ints[10];
    s->opt = (OptimConfig){ .optimizer = ints[11],
                            .ns_steps = ints[12],
                            .steps = ints[14],
                            .warmup = ints[15],
                            .lr_adam = floats[0],
                            .lr_muon = floats[1],
                            .weight_decay = floats[2],
                            .beta1 = floats[3],
                            .beta2 = floats[4],
                            .eps = floats[5],
                            .muon_momentum = floats[6],
                            .grad_clip = floats[7] };
    s->batch = ints[13];
    s->step = ints[16];
    s->seed = u64[0]; s->rng = u64[1];
    bool has_state = ints[17] == 1, ok = true;
    const char *problem = NULL;
    if (r.short_read && size < 4) ok = fail("'%s' is truncated (%zu bytes)", path, size);
    else if (memcmp(magic, CKPT_MAGIC, 4) != 0) ok = fail("'%s' is not an osp checkpoint (bad magic)", path);
    else if (r.short_read && size < 8) ok = fail("'%s' is truncated: the header is incomplete", path);
    else if (version != CKPT_VERSION)
        ok = fail("'%s' has checkpoint version %u; this osp reads version %u", path, version, CKPT_VERSION);
    else if (r.short_read) ok = fail("'%s' is truncated: the header is incomplete", path);
    else if ((problem = train_state_problem(s))) ok = fail("'%s' has a bad header: %s", path, problem);
    else if (ints[17] != 0 && ints[17] != 1)
        ok = fail("'%s' has a bad header: has_optimizer_state %d", path, ints[17]);
    if (!ok) { free(data); return false; }
    // The sizes the header implies, checked before anything proportional to them is allocated.
    Model shell = {.cfg = s->cfg};
    shell.n_params = param_layout(shell.shape, &s->cfg);
    size_t offset[N_PARAM_TENSORS], n_state = optimizer_layout(&shell, s->opt.optimizer, offset);
    size_t expected = r.pos + sizeof(float) * (shell.n_params + (has_state ? n_state : 0));
    int B = max_batch > 0 ? max_batch : s->batch;
    Activations views;
    double act_bytes = 2.0 * sizeof(float) *
            (double)activation_layout(&views, NULL, &s->cfg, B, s->cfg.seq_len);
    if (size != expected) ok = fail("'%s' is %s: expected %zu bytes for this config, found %zu", path,
                                    size < expected ? "truncated" : "corrupt", expected, size);
    else if (act_bytes > ACTIVATIONS_MAX_BYTES)
        ok = fail("'%s': batch %d x seq-len %d would need %.0f GB of activations", path, B, s->cfg.seq_len,
                  act_bytes / 1e9);
    if (!ok) { free(data); return false; }
    model_alloc(m, &s->cfg, B);
    reader_get(&r, m->params, sizeof(float) * m->n_params);
    float *st = has_state ? xmalloc(sizeof(float) * n_state) : NULL;
    if (st) reader_get(&r, st, sizeof(float) * n_state);
    free(data);
    const char *bad = nonfinite_tensor(m, m->params, st, s->opt.optimizer);
    if (bad) {
        fail("'%s' holds NaN or Inf in %s", path, bad);
        free(st);
        model_free(m);
        return false;
    }
    if (state) *state = st;
    else free(st);
    return true;
}

// Continues a run from a checkpoint (which must hold optimizer state).
static bool trainer_resume(Trainer *tr, const char *path) {
    if (!checkpoint_load(path, &tr->state, &tr->model, 0, &tr->opt_state)) return false;
    if (!tr->opt_state) {
        model_free(&tr->model);
        return fail("'%s' has no optimizer state to resume from", path);
    }
    trainer_alloc_buffers(tr);
    return true;
}

/* ============================================================================
 * GPTQ and the rotation: the 4-bit evaluation's steps beyond round-to-nearest
 * ========================================================================== */

// Cholesky factorisation in place of a symmetric positive definite a [n, n]: a = L·Lᵀ with L
// lower triangular, written over the lower half (the upper half is not read or changed).
// Returns false if a is not positive definite.
static bool cholesky(double *a, int n) {
    for (int j = 0; j < n; j++) {
        double d = a[(size_t)j * n + j];
        for (int k = 0; k < j; k++) d -= a[(size_t)j * n + k] * a[(size_t)j * n + k];
        if (!(d > 0.0)) return false;
        d = sqrt(d);
        a[(size_t)j * n + j] = d;
        for (int i = j + 1; i < n; i++) {
            double v = a[(size_t)i * n + j];
            for (int k = 0; k < j; k++) v -= a[(size_t)i * n + k] * a[(size_t)j * n + k];
            a[(size_t)i * n + j] = v / d;
        }
    }
    return true;
}

// inv [n, n] = H⁻¹ = L⁻ᵀ·L⁻¹ from the Cholesky factor L of H (the lower half of l).
static void inverse_from_cholesky(double *inv, const double *l, int n) {
    double *yt = xcalloc((size_t)n * n, sizeof(double)); // Yᵀ for Y = L⁻¹: row c of yt solves L·y = e_c
#pragma omp parallel for schedule(dynamic)
    for (int c = 0; c < n; c++) {
        double *y = yt + (size_t)c * n;
        for (int i = c; i < n; i++) {
            double v = i == c ? 1.0 : 0.0;
            for (int k = c; k < i; k++) v -= l[(size_t)i * n + k] * y[k];
            y[i] = v / l[(size_t)i * n + i];
        }
    }
#pragma omp parallel for schedule(dynamic)
    for (int i = 0; i < n; i++)
        for (int j = 0; j <= i; j++) {   // (YᵀY)[i][j] = [j][i]: Y[k][i] = 0 for k < i
            double v = 0.0;
            for (int k = i; k < n; k++) v += yt[(size_t)i * n + k] * yt[(size_t)j * n + k];
            inv[(size_t)i * n + j] = inv[(size_t)j * n + i] = v;
        }
    free(yt);
}

// GPTQ (Frantar et al. 2022) of one weight matrix w [rows, cols], in place. Each row keeps
// RTN's grid (the step chosen by the clip search on the unquantized row); GPTQ chooses the
// rounding column by column so as to keep ||W·X - Ŵ·X||² small, where h [cols, cols] =
// 2·XᵀX (overwritten) comes from the matrix's inputs X [tokens, cols]. Steps:
//   1. an input that is always 0 gets h_ii = 1 and its weights 0; then the diagonal is
//      dampened by 1% of its mean, so that H is safely invertible;
//   2. U, the upper Cholesky factor of H⁻¹ (H⁻¹ = Uᵀ·U);
//   3. for each column i in order: ŵ_i = round(w_i), and the columns not yet quantized absorb
//      the error: w_j -= (w_i - ŵ_i)·U[i][j] / U[i][i] for j > i (each row on its own).
// A matrix with one column is plain RTN. Returns false if H is not positive definite.
static bool gptq_quantize(float *w, int rows, int cols, double *h, int bits, bool clip_search) {
    for (int i = 0; i < cols; i++)
        if (h[(size_t)i * cols + i] == 0.0) {
            h[(size_t)i * cols + i] = 1.0;
            for (int r = 0; r < rows; r++) w[(size_t)r * cols + i] = 0.0f;
        }
    double mean_diag = 0.0;
    for (int i = 0; i < cols; i++) mean_diag += h[(size_t)i * cols + i] / cols;
    for (int i = 0; i < cols; i++) h[(size_t)i * cols + i] += 0.01 * mean_diag;
    double *inv = xmalloc(sizeof(double) * (size_t)cols * cols);
    bool ok = cholesky(h, cols);
    if (ok) {
        inverse_from_cholesky(inv, h, cols);
        ok = cholesky(inv, cols);   // H⁻¹ = L·Lᵀ, so U = Lᵀ
    }
    if (!ok) { free(inv); return false; }
    double *u = h;   // H is no longer needed: U[i][j] = L[j][i] for j >= i, rows contiguous for step 3
    for (int i = 0; i < cols; i++)
        for (int j = i; j < cols; j++) u[(size_t)i * cols + j] = inv[(size_t)j * cols + i];
    free(inv);
    float qmax = symmetric_qmax(bits);
#pragma omp parallel
    {
        float *scratch = xmalloc(sizeof(float) * (size_t)cols);
#pragma omp for schedule(dynamic)
        for (int r = 0; r < rows; r++) {
            float *row = w + (size_t)r * cols;
            float p = clip_ratio(row, cols, bits, clip_search, scratch);
            float scale = p * max_abs(row, cols) / qmax;   // RTN's step for this row
            for (int i = 0; i < cols; i++) {
                float q = round_to_grid(row[i], scale, qmax);
                const double *u_i = u + (size_t)i * cols;
                double err = (row[i] - q) / u_i[i];
                row[i] = q;
                for (int j = i + 1; j < cols; j++) row[j] -= (float)(err * u_i[j]);
            }
        }
        free(scratch);
    }
    return true;
}

// H [n, n] += 2·XᵀX for one batch of a matrix's inputs x [tokens, n] (the product in float,
// summed in double across batches). scratch holds n·n floats.
static void hessian_accumulate(double *h, float *scratch, const float *x, int tokens, int n) {
    Gemm g = {scratch, (size_t)n, x, 1, (size_t)n, x, (size_t)n, 1, n, n, tokens, false, GEMM_FULL, NULL};
    gemm_parallel(&g, 1);
    for (size_t i = 0; i < (size_t)n * n; i++) h[i] += 2.0 * scratch[i];
}

// GPTQ of every block matrix of m in place, layer by layer as the release does: the inputs of
// layer l's matrices are collected on the calibration windows `calib` [windows, T] with layers
// 0..l-1 already quantized and the activations in full precision (with the online FFN
// Hadamard if ffn_hadamard: W2 is then already rotated), then its seven matrices are quantized,
// each with the Hessian of its input: Q, K, V share attn_norm's, gate and up share ffn_norm's.
static void gptq_quantize_model(Model *m, const int *calib, int windows, int bits, bool clip_search,
                                bool ffn_hadamard) {
    const FakeQuant calibration = {QUANT_OFF, QUANT_OFF, ffn_hadamard};
    const Config *c = &m->cfg;
    int T = c->seq_len, d = c->dim, f = c->ffn_dim;
    const struct { int width, matrices[3]; } inputs[4] = {
        {d, {PARAM_ATTN_Q, PARAM_ATTN_K, PARAM_ATTN_V}}, {d, {PARAM_ATTN_OUT, -1, -1}},
        {d, {PARAM_FFN_GATE, PARAM_FFN_UP, -1}}, {f, {PARAM_FFN_DOWN, -1, -1}}};
    size_t widest = (size_t)(f > d ? f : d);
    double *h[4], *h_work = xmalloc(sizeof(double) * widest * widest);
    for (int i = 0; i < 4; i++) h[i] = xmalloc(sizeof(double) * (size_t)inputs[i].width * inputs[i].width);
    float *scratch = xmalloc(sizeof(float) * widest * widest);
    for (int l = 0; l < c->n_layers; l++) {
        for (int i = 0; i < 4; i++)
            memset(h[i], 0, sizeof(double) * (size_t)inputs[i].width * inputs[i].width);
        for (int w0 = 0; w0 < windows; w0 += m->max_batch) {
            int B = windows - w0 < m->max_batch ? windows - w0 : m->max_batch, N = B * T;
            model_forward(m, calib + (size_t)w0 * T, NULL, B, T, &calibration);
            const float *x[4] = {m->act.attn_norm + (size_t)l * N * d, m->act.attn_out + (size_t)l * N * d,
                                 m->act.ffn_norm + (size_t)l * N * d, m->act.ffn_hidden + (size_t)l * N * f};
            for (int i = 0; i < 4; i++) hessian_accumulate(h[i], scratch, x[i], N, inputs[i].width);
        }
        for (int i = 0; i < 4; i++) {
            int n = inputs[i].width;
            for (int j = 0; j < 3 && inputs[i].matrices[j] >= 0; j++) {
                int t = inputs[i].matrices[j];
                memcpy(h_work, h[i], sizeof(double) * (size_t)n * n);   // gptq_quantize overwrites it
                if (!gptq_quantize(param_at(m, m->params, t, l), m->shape[t].rows, n, h_work, bits,
                                   clip_search))
                    die("GPTQ: the Hessian of %s in layer %d is not positive definite", param_names[t], l);
            }
        }
    }
    for (int i = 0; i < 4; i++) free(h[i]);
    free(h_work); free(scratch);
}

// Folds every norm's per-channel gain into the matrices that read the normed vector
// (W -> W·diag(g): column j of W scaled by g[j]) and sets the gains to 1, which leaves the
// model's function unchanged and makes its norms commute with rotations.
static void fold_norm_gains(Model *m) {
    const int readers[3][4] = {{PARAM_ATTN_NORM, PARAM_ATTN_Q, PARAM_ATTN_K, PARAM_ATTN_V},
                               {PARAM_FFN_NORM, PARAM_FFN_GATE, PARAM_FFN_UP, -1},
                               {PARAM_FINAL_NORM, PARAM_HEAD, -1, -1}};
    int d = m->cfg.dim;
    for (int k = 0; k < 3; k++) {
        int norm = readers[k][0];
        for (int layer = 0; layer < m->shape[norm].count; layer++) {
            float *g = param_at(m, m->params, norm, layer);
            for (int j = 1; j < 4 && readers[k][j] >= 0; j++) {
                int t = readers[k][j];
                float *w = param_at(m, m->params, t, layer);
                for (int r = 0; r < m->shape[t].rows; r++)
                    for (int c = 0; c < d; c++) w[(size_t)r * d + c] *= g[c];
            }
            for (int c = 0; c < d; c++) g[c] = 1.0f;
        }
    }
}

// v -> R·v for each of the rows vectors v [rows, d], R = H·diag(signs) (orthogonal).
static void apply_rotation(float *v, size_t rows, int d, const float *signs) {
    for (size_t r = 0; r < rows; r++)
        for (int i = 0; i < d; i++) v[r * d + i] *= signs[i];
    hadamard_transform(v, rows, d);
}

// Full residual rotation (QuaRot-style; beyond the paper's RTN columns): the residual stream
// x becomes R·x with R = H·diag(random signs). Gains are folded first so that RMSNorm(R·x) =
// R·RMSNorm(x). Then every matrix reading the stream gets W -> W·Rᵀ (each row w -> R·w: the
// embedding rows, Wq, Wk, Wv, W1, W3, the head), and every matrix writing it gets W -> R·W
// (each column: Wo, W2). The function is unchanged; the weights and activations that get
// quantized are rotated, which spreads outlier channels over all channels. Needs dim a
// power of two.
static void rotate_residual(Model *m, uint64_t seed) {
    int d = m->cfg.dim;
    fold_norm_gains(m);
    float *signs = xmalloc(sizeof(float) * (size_t)d);
    uint64_t rng = seed;
    for (int i = 0; i < d; i++) signs[i] = (rng_next(&rng) & 1) ? 1.0f : -1.0f;
    const int readers[] = { PARAM_EMBED,    PARAM_ATTN_Q, PARAM_ATTN_K, PARAM_ATTN_V,
                            PARAM_FFN_GATE, PARAM_FFN_UP, PARAM_HEAD };
    for (size_t k = 0; k < sizeof readers / sizeof readers[0]; k++) {
        int t = readers[k];
        apply_rotation(m->params + m->shape[t].offset, (size_t)m->shape[t].count * m->shape[t].rows, d,
                       signs);
    }
    const int writers[] = {PARAM_ATTN_OUT, PARAM_FFN_DOWN};
    for (size_t k = 0; k < 2; k++) {
        int t = writers[k], rows = m->shape[t].rows, cols = m->shape[t].cols;
        float *wt = xmalloc(sizeof(float) * (size_t)rows * cols);
        for (int layer = 0; layer < m->shape[t].count; layer++) {
            float *w = param_at(m, m->params, t, layer);
            transpose(wt, w, rows, cols);                 // columns of W as rows
            apply_rotation(wt, (size_t)cols, d, signs);
            transpose(w, wt, cols, rows);
        }
        free(wt);
    }
    free(signs);
}

/* ============================================================================
 * Export: the merged model in the files of three inference runtimes
 *
 * The writers take a merged model (model_merge: no EmbProj, a gain per channel), which is a
 * plain Llama, and the tokenizer it was trained with. Little-endian, as the checkpoints.
 *
 * GGUF version 3, read by llama.cpp. A string is a uint64 byte count and the bytes (UTF-8, no
 * NUL). The file holds, in order:
 *   header    char magic[4] "GGUF", uint32 version 3, uint64 tensor_count, uint64 kv_count
 *   metadata  kv_count times: string key, uint32 value type, value; an array value is a
 *             uint32 element type, a uint64 count and the elements
 *   tensors   tensor_count times: string name, uint32 n_dims, uint64 ne[n_dims] (fastest-
 *             varying first, so a [rows][cols] matrix has ne = {cols, rows}), uint32 type
 *             (0 F32, 1 F16), uint64 offset from the start of the data section
 *   data      after zero padding to a multiple of general.alignment (32); each tensor starts
 *             at a multiple of it, with zero padding after each one
 * The names and keys are those of llama.cpp's "llama" architecture. osp.c's RoPE rotates
 * adjacent pairs (2i, 2i+1) of each head (rope_forward), which is the rotation
 * llama.cpp applies for this architecture, so Wq and Wk are written as they are: they need
 * none of the row permutation that converting Hugging Face checkpoints needs.
 *
 * llama2.c's legacy format (version 0, read by run.c): int32 dim, hidden_dim, n_layers,
 * n_heads, n_kv_heads, vocab_size (negative: the head follows, not shared with the
 * embedding), seq_len; then float32 token_embedding [V,d], rms_att [L,d], wq [L,d,d],
 * wk [L,kv_dim,d], wv [L,kv_dim,d], wo [L,d,d], rms_ffn [L,d], w1 [L,f,d] (gate),
 * w2 [L,d,f] (down), w3 [L,f,d] (up), rms_final [d], freq_cis_real and freq_cis_imag
 * [seq_len, head_dim/2] each (cos and sin of the RoPE angles; current run.c skips them and
 * computes its own), wcls [V,d]. run.c's constants are ours: RMSNorm eps 1e-5, RoPE theta
 * 10000. Its tokenizer file is tokenizer.bin as it is.
 *
 * The Hugging Face layout, read by transformers' LlamaForCausalLM and LlamaTokenizer (and so by
 * vLLM), is a directory: config.json (the sizes and constants), model.safetensors (the tensors
 * under transformers' names, q_proj and k_proj with their rows permuted for rotate_half RoPE),
 * tokenizer.model (a sentencepiece BPE model in protobuf), tokenizer_config.json and
 * special_tokens_map.json.
 * ========================================================================== */

#define GGUF_VERSION 3u
#define GGUF_ALIGNMENT 32
enum {
    GGUF_TYPE_UINT32 = 4,
    GGUF_TYPE_INT32 = 5,
    GGUF_TYPE_FLOAT32 = 6,
    GGUF_TYPE_BOOL = 7,
    GGUF_TYPE_STRING = 8,
    GGUF_TYPE_ARRAY = 9
};
enum { GGML_TYPE_F32 = 0, GGML_TYPE_F16 = 1 };
enum { TOKEN_TYPE_NORMAL = 1, TOKEN_TYPE_UNKNOWN = 2, TOKEN_TYPE_CONTROL = 3, TOKEN_TYPE_BYTE = 6 };
#define F16_MAX 65504.0f
#define SPIECE_SPACE "\xE2\x96\x81"   // U+2581, SentencePiece's visible space

// llama.cpp's name of each parameter tensor (EmbProj is merged away; per-layer tensors get
// the prefix "blk.N.", all get the suffix ".weight").
static const char *gguf_names[N_PARAM_TENSORS] = {
    [PARAM_EMBED] = "token_embd",  [PARAM_ATTN_NORM] = "attn_norm",    [PARAM_ATTN_Q] = "attn_q",
    [PARAM_ATTN_K] = "attn_k",     [PARAM_ATTN_V] = "attn_v",          [PARAM_ATTN_OUT] = "attn_output",
    [PARAM_FFN_NORM] = "ffn_norm", [PARAM_FFN_GATE] = "ffn_gate",      [PARAM_FFN_UP] = "ffn_up",
    [PARAM_FFN_DOWN] = "ffn_down", [PARAM_FINAL_NORM] = "output_norm", [PARAM_HEAD] = "output",
};

// float32 -> IEEE half, rounding to nearest even; beyond the half range gives infinity.
static uint16_t float_to_half(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000);
    uint32_t mag = x & 0x7FFFFFFFu;
    if (mag > 0x7F800000u) return sign | 0x7E00;                      // NaN
    if (mag >= 0x477FF000u) return sign | 0x7C00;                     // rounds to 65536 or more
    if (mag < 0x38800000u)
        return sign | (uint16_t)lrintf(fabsf(f) * 16777216.0f); // subnormal: units of 2^-24
    uint32_t h = (mag - 0x38000000u) >> 13, rest = mag & 0x1FFFu;   // exponent bias 127 -> 15
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) h++;
    return sign | (uint16_t)h;
}

// A growing byte buffer that counts the entries put into it (metadata keys, tensor infos).
typedef struct { unsigned char *data; size_t len, cap; uint64_t entries; } ByteList;

static void put_bytes(ByteList *b, const void *p, size_t n) {
    if (b->len + n > b->cap) {
        b->cap = 2 * (b->len + n) + 256;
        b->data = xrealloc(b->data, b->cap);
    }
    memcpy(b->data + b->len, p, n);
    b->len += n;
}
static void put_u32(ByteList *b, uint32_t v) { put_bytes(b, &v, 4); }
static void put_u64(ByteList *b, uint64_t v) { put_bytes(b, &v, 8); }
static void put_string(ByteList *b, const char *s, size_t n) { put_u64(b, n); put_bytes(b, s, n); }

// Starts metadata entry `key` of value type `type` (the value is put next).
static void gguf_key(ByteList *kv, const char *key, uint32_t type) {
    put_string(kv, key, strlen(key));
    put_u32(kv, type);
    kv->entries++;
}
static void gguf_kv_u32(ByteList *kv, const char *key, uint32_t v) {
    gguf_key(kv, key, GGUF_TYPE_UINT32);
    put_u32(kv, v);
}
static void gguf_kv_f32(ByteList *kv, const char *key, float v) {
    gguf_key(kv, key, GGUF_TYPE_FLOAT32);
    put_bytes(kv, &v, 4);
}
static void gguf_kv_bool(ByteList *kv, const char *key, bool v) {
    uint8_t b = v;
    gguf_key(kv, key, GGUF_TYPE_BOOL);
    put_bytes(kv, &b, 1);
}
static void gguf_kv_string(ByteList *kv, const char *key, const char *s) {
    gguf_key(kv, key, GGUF_TYPE_STRING);
    put_string(kv, s, strlen(s));
}
static void gguf_array(ByteList *kv, const char *key, uint32_t elem_type, uint64_t count) {
    gguf_key(kv, key, GGUF_TYPE_ARRAY);
    put_u32(kv, elem_type);
    put_u64(kv, count);
}

// True if s[0..len) is UTF-8 text: whole characters, no NUL.
static bool is_utf8_text(const unsigned char *s, int len) {
    for (int i = 0; i < len;) {
        int n = utf8_unit_length(s, (size_t)len, (size_t)i);
        if (!is_utf8_char(s + i, n)) return false;
        i += n;
    }
    return true;
}

// SentencePiece's text of token `id`, every space written as U+2581: sentencepiece, and
// llama.cpp's "llama" tokenizer after it, turn each space of the input into U+2581 before
// looking pieces up, and back when printing. out needs room for 3 * length bytes; returns the
// byte count.
static int spiece_text(const Tokenizer *t, int id, char *out) {
    int n = 0;
    for (int k = 0; k < t->lengths[id]; k++) {
        if (t->pieces[id][k] == ' ') { memcpy(out + n, SPIECE_SPACE, 3); n += 3; }
        else out[n++] = t->pieces[id][k];
    }
    return n;
}

// The type of token `id` as sentencepiece numbers them, and GGUF after it.
static int token_type(int id) {
    return id == TOKEN_UNK ? TOKEN_TYPE_UNKNOWN : id < TOKEN_BYTE0 ? TOKEN_TYPE_CONTROL
         : id < TOKEN_FIRST_PIECE ? TOKEN_TYPE_BYTE : TOKEN_TYPE_NORMAL;
}

typedef enum { EXPORT_GGUF, EXPORT_GGUF_F16, EXPORT_LLAMA2C, EXPORT_HF, EXPORT_HF_F16 } ExportFormat;

// Why sentencepiece would not load tokenizer t, or would encode some valid UTF-8 text without
// U+2581 differently from osp.c's encoder, or NULL; msg holds the reason. Both merge the
// highest-scored adjacent pair first, the leftmost on ties, so what must hold is where they
// differ: sentencepiece refuses specials it does not expect, two pieces of one text and an
// empty piece; it never merges into a special or byte piece (osp.c looks up any text, byte
// names included: "<0xE9>"), but does merge across whitespace (osp.c encodes the text between
// whitespace bytes apart), characters that are not pieces (osp.c falls back to bytes at once)
// and pieces scored too low for osp.c's encoder (bpe_merge's MERGE_SCORE_FLOOR).
static const char *sentencepiece_problem(const Tokenizer *t, char *msg, size_t size) {
    for (int i = 0; i < TOKEN_BYTE0; i++)
        if (strcmp(t->pieces[i], special_pieces[i])) {
            snprintf(msg, size, "token %d is not %s, as the exported tokenizer files name it", i,
                     special_pieces[i]);
            return msg;
        }
    for (int k = 0; k + 1 < t->vocab_size; k++) {
        int a = t->sorted_ids[k], b = t->sorted_ids[k + 1];
        if (!compare_bytes(t->pieces[a], t->lengths[a], t->pieces[b], t->lengths[b])) {
            snprintf(msg, size, "tokens %d and %d have the same text", a, b);
            return msg;
        }
    }
    for (int id = 0; id < TOKEN_FIRST_PIECE; id++)
        for (int cut = 1; cut < t->lengths[id]; cut++) {
            int a = tokenizer_lookup(t, t->pieces[id], cut);
            int b = tokenizer_lookup(t, t->pieces[id] + cut, t->lengths[id] - cut);
            if (a >= 0 && b >= 0) {
                snprintf(msg, size, "tokens %d and %d merge into the text %s, which osp.c then encodes as "
                         "token %d and sentencepiece as text: train the tokenizer on text without it",
                         a, b, t->pieces[id], id);
                return msg;
            }
        }
    for (int id = TOKEN_FIRST_PIECE; id < t->vocab_size; id++) {
        const unsigned char *s = (const unsigned char *)t->pieces[id];
        int len = t->lengths[id];
        if (len == 0) {
            snprintf(msg, size, "token %d is empty", id);
            return msg;
        }
        for (int end = 0; end < 2 && len > 6; end++) {
            int at = tokenizer_lookup(t, (const char *)s + (end ? len - 6 : 0), 6);
            if (at >= TOKEN_BYTE0 && at < TOKEN_FIRST_PIECE) {
                snprintf(msg, size, "token %d %s with the byte token %s", id, end ? "ends" : "begins",
                         t->pieces[at]);
                return msg;
            }
        }
        bool merged = utf8_unit_length(s, (size_t)len, 0) < len;   // more than one character
        for (int i = 0, n; merged && i < len; i += n) {
            n = utf8_unit_length(s, (size_t)len, (size_t)i);
            if (i > 0 && is_space_byte(s[i])) {
                snprintf(msg, size, "token %d has whitespace after its first character", id);
                return msg;
            }
            if (tokenizer_lookup(t, (const char *)s + i, n) < TOKEN_FIRST_PIECE) {
                snprintf(msg, size, "token %d contains a character that is not a token", id);
                return msg;
            }
        }
        if (merged && !(t->scores[id] > MERGE_SCORE_FLOOR)) {
            snprintf(msg, size, "token %d scores %g, which osp.c's encoder never merges", id, t->scores[id]);
            return msg;
        }
    }
    return NULL;
}

// Why the merged model m with tokenizer t cannot be written in `format`, or NULL.
static const char *export_problem(const Model *m, const Tokenizer *t, ExportFormat format) {
    static char msg[320];
    if (m->cfg.embproj || m->cfg.ssnorm) return "internal: export needs a merged model";
    if (t->vocab_size != m->cfg.vocab_size) {
        snprintf(msg, sizeof msg, "vocab mismatch: the model has %d tokens, the tokenizer %d",
                 m->cfg.vocab_size, t->vocab_size);
        return msg;
    }
    const char *bad = nonfinite_tensor(m, m->params, NULL, OPTIMIZER_ADAM);
    if (bad) {
        snprintf(msg, sizeof msg, "parameter tensor %s holds NaN or Inf", bad);
        return msg;
    }
    for (int i = 0; i < N_PARAM_TENSORS; i++) {
        const float *p = m->params + m->shape[i].offset;
        bool half = (format == EXPORT_GGUF_F16 && !is_norm_gain(i)) || format == EXPORT_HF_F16;
        for (size_t j = 0; half && j < param_size(m, i); j++) {
            if (fabsf(p[j]) > F16_MAX) {
                snprintf(msg, sizeof msg,
                         "%s holds %g, beyond float16's largest value %g: export without --f16",
                         param_names[i], p[j], F16_MAX);
                return msg;
            }
        }
    }
    if (format == EXPORT_LLAMA2C && tokenizer_lookup(t, " ", 1) == -1)
        return "run.c starts every prompt with the token \" \" (SentencePiece's dummy prefix), and this "
               "tokenizer has none";
    if (format != EXPORT_LLAMA2C)
        for (int id = 0; id < t->vocab_size; id++) {
            const unsigned char *s = (const unsigned char *)t->pieces[id];
            if (!is_utf8_text(s, t->lengths[id])) {
                snprintf(msg, sizeof msg, "token %d is not UTF-8 text, which GGUF and sentencepiece need",
                         id);
                return msg;
            }
            if (strstr(t->pieces[id], SPIECE_SPACE)) {
                snprintf(msg, sizeof msg,
                         "token %d contains U+2581, which a SentencePiece tokenizer reads as a space", id);
                return msg;
            }
        }
    if (format == EXPORT_HF || format == EXPORT_HF_F16) return sentencepiece_problem(t, msg, sizeof msg);
    return NULL;
}

typedef struct { int param, layer; } ExportTensor;

static bool is_block_tensor(int i) { return i >= PARAM_ATTN_NORM && i <= PARAM_FFN_DOWN; }

// The GGUF tensors in file order: token_embd, each block's nine tensors, output_norm, output.
// Returns the list (the caller frees it) and its length in *count.
static ExportTensor *export_tensors(const Model *m, int *count) {
    ExportTensor *list = xmalloc(sizeof(ExportTensor) * (size_t)N_PARAM_TENSORS * (size_t)m->cfg.n_layers);
    int n = 0;
    list[n++] = (ExportTensor){PARAM_EMBED, 0};
    for (int l = 0; l < m->cfg.n_layers; l++)
        for (int i = 0; i < N_PARAM_TENSORS; i++)
            if (is_block_tensor(i)) list[n++] = (ExportTensor){i, l};
    list[n++] = (ExportTensor){PARAM_FINAL_NORM, 0};
    list[n++] = (ExportTensor){PARAM_HEAD, 0};
    *count = n;
    return list;
}

// The name of tensor e in a format whose per-layer names are "<block_prefix>N.<name>.weight"
// and the others "<name>.weight".
static void export_tensor_name(char *out, size_t size, ExportTensor e, const char *const *names,
                               const char *block_prefix) {
    if (is_block_tensor(e.param))
        snprintf(out, size, "%s%d.%s.weight", block_prefix, e.layer, names[e.param]);
    else snprintf(out, size, "%s.weight", names[e.param]);
}

static size_t align_up(size_t n, size_t a) { return (n + a - 1) / a * a; }

// Writes the merged model m and tokenizer t as GGUF: F32 throughout, or with --f16 every
// matrix in F16 (norm gains stay F32, as llama.cpp's own converter keeps them). The number
// of tensors written goes to *n_tensors.
static bool export_gguf(const char *path, const Model *m, const Tokenizer *t, bool f16,
                        const char *model_name, int *n_tensors) {
    const Config *c = &m->cfg;
    ByteList kv = {0}, info = {0};
    gguf_kv_string(&kv, "general.architecture", "llama");
    gguf_kv_string(&kv, "general.name", model_name);
    gguf_kv_u32(&kv, "general.alignment", GGUF_ALIGNMENT);
    gguf_kv_u32(&kv, "general.file_type", f16 ? 1 : 0);   // llama.cpp's ftype: all F32 / mostly F16
    gguf_kv_u32(&kv, "llama.vocab_size", (uint32_t)c->vocab_size);
    gguf_kv_u32(&kv, "llama.context_length", (uint32_t)c->seq_len);
    gguf_kv_u32(&kv, "llama.embedding_length", (uint32_t)c->dim);
    gguf_kv_u32(&kv, "llama.block_count", (uint32_t)c->n_layers);
    gguf_kv_u32(&kv, "llama.feed_forward_length", (uint32_t)c->ffn_dim);
    gguf_kv_u32(&kv, "llama.attention.head_count", (uint32_t)c->n_heads);
    gguf_kv_u32(&kv, "llama.attention.head_count_kv", (uint32_t)c->n_kv_heads);
    gguf_kv_u32(&kv, "llama.rope.dimension_count", (uint32_t)head_dim(c));
    gguf_kv_f32(&kv, "llama.attention.layer_norm_rms_epsilon", RMSNORM_EPS);
    gguf_kv_f32(&kv, "llama.rope.freq_base", ROPE_THETA);
    gguf_kv_string(&kv, "tokenizer.ggml.model", "llama");
    gguf_array(&kv, "tokenizer.ggml.tokens", GGUF_TYPE_STRING, (uint64_t)t->vocab_size);
    char *text = xmalloc(3 * (size_t)t->max_token_length + 1);
    for (int id = 0; id < t->vocab_size; id++) put_string(&kv, text, (size_t)spiece_text(t, id, text));
    free(text);
    gguf_array(&kv, "tokenizer.ggml.scores", GGUF_TYPE_FLOAT32, (uint64_t)t->vocab_size);
    put_bytes(&kv, t->scores, sizeof(float) * (size_t)t->vocab_size);
    gguf_array(&kv, "tokenizer.ggml.token_type", GGUF_TYPE_INT32, (uint64_t)t->vocab_size);
    for (int id = 0; id < t->vocab_size; id++) put_u32(&kv, (uint32_t)token_type(id));
    gguf_kv_u32(&kv, "tokenizer.ggml.bos_token_id", TOKEN_BOS);
    gguf_kv_u32(&kv, "tokenizer.ggml.eos_token_id", TOKEN_EOS);
    gguf_kv_u32(&kv, "tokenizer.ggml.unknown_token_id", TOKEN_UNK);
    // osp.c trains on text encoded without BOS and without SentencePiece's dummy space prefix.
    gguf_kv_bool(&kv, "tokenizer.ggml.add_bos_token", false);
    gguf_kv_bool(&kv, "tokenizer.ggml.add_eos_token", false);
    gguf_kv_bool(&kv, "tokenizer.ggml.add_space_prefix", false);

    ExportTensor *list = export_tensors(m, n_tensors);
    uint64_t offset = 0;
    size_t largest = 0;
    for (int k = 0; k < *n_tensors; k++) {
        const ParamShape *s = &m->shape[list[k].param];
        bool half = f16 && !is_norm_gain(list[k].param);
        char name[64];
        export_tensor_name(name, sizeof name, list[k], gguf_names, "blk.");
        put_string(&info, name, strlen(name));
        bool vector = s->rows == 1;
        put_u32(&info, vector ? 1 : 2);
        put_u64(&info, (uint64_t)s->cols);
        if (!vector) put_u64(&info, (uint64_t)s->rows);
        put_u32(&info, half ? GGML_TYPE_F16 : GGML_TYPE_F32);
        put_u64(&info, offset);
        offset += align_up((size_t)s->rows * s->cols * (half ? 2 : 4), GGUF_ALIGNMENT);
        if ((size_t)s->rows * s->cols > largest) largest = (size_t)s->rows * s->cols;
    }

    static const unsigned char zeros[GGUF_ALIGNMENT];
    AtomicFile af;
    bool ok = atomic_open(&af, path);
    if (ok) {
        uint32_t version = GGUF_VERSION;
        uint64_t counts[2] = {(uint64_t)*n_tensors, kv.entries};
        atomic_write(&af, "GGUF", 4);
        atomic_write(&af, &version, 4);
        atomic_write(&af, counts, sizeof counts);
        atomic_write(&af, kv.data, kv.len);
        atomic_write(&af, info.data, info.len);
        size_t meta = 24 + kv.len + info.len;
        atomic_write(&af, zeros, align_up(meta, GGUF_ALIGNMENT) - meta);
        uint16_t *halves = xmalloc(sizeof(uint16_t) * largest);
        for (int k = 0; k < *n_tensors; k++) {
            const ParamShape *s = &m->shape[list[k].param];
            const float *p = param_at(m, m->params, list[k].param, list[k].layer);
            size_t n = (size_t)s->rows * s->cols, bytes = n * 4;
            if (f16 && !is_norm_gain(list[k].param)) {
                for (size_t j = 0; j < n; j++) halves[j] = float_to_half(p[j]);
                bytes = n * 2;
                atomic_write(&af, halves, bytes);
            } else {
                atomic_write(&af, p, bytes);
            }
            atomic_write(&af, zeros, align_up(bytes, GGUF_ALIGNMENT) - bytes);
        }
        free(halves);
        ok = atomic_close(&af);
    }
    free(kv.data); free(info.data); free(list);
    return ok;
}

// Writes the merged model m in llama2.c's legacy format (run.c's tensor order).
static bool export_llama2c(const char *path, const Model *m) {
    const Config *c = &m->cfg;
    static const int order[] = { PARAM_EMBED,    PARAM_ATTN_NORM, PARAM_ATTN_Q,    PARAM_ATTN_K,
                                 PARAM_ATTN_V,   PARAM_ATTN_OUT,  PARAM_FFN_NORM,  PARAM_FFN_GATE,
                                 PARAM_FFN_DOWN, PARAM_FFN_UP,    PARAM_FINAL_NORM };
    AtomicFile af;
    if (!atomic_open(&af, path)) return false;
    int32_t header[7] = { c->dim,        c->ffn_dim,     c->n_layers, c->n_heads,
                          c->n_kv_heads, -c->vocab_size, c->seq_len };
    atomic_write(&af, header, sizeof header);
    for (size_t k = 0; k < sizeof order / sizeof order[0]; k++)
        atomic_write(&af, m->params + m->shape[order[k]].offset, sizeof(float) * param_size(m, order[k]));
    size_t table = sizeof(float) * (size_t)c->seq_len * (size_t)(head_dim(c) / 2);
    atomic_write(&af, m->rope_cos, table);
    atomic_write(&af, m->rope_sin, table);
    atomic_write(&af, m->params + m->shape[PARAM_HEAD].offset, sizeof(float) * param_size(m, PARAM_HEAD));
    return atomic_close(&af);
}

// transformers' name of each parameter tensor in LlamaForCausalLM: per-layer tensors get the
// prefix "model.layers.N.", all get the suffix ".weight".
static const char *hf_names[N_PARAM_TENSORS] = {
    [PARAM_EMBED] = "model.embed_tokens",      [PARAM_ATTN_NORM] = "input_layernorm",
    [PARAM_ATTN_Q] = "self_attn.q_proj",       [PARAM_ATTN_K] = "self_attn.k_proj",
    [PARAM_ATTN_V] = "self_attn.v_proj",       [PARAM_ATTN_OUT] = "self_attn.o_proj",
    [PARAM_FFN_NORM] = "post_attention_layernorm", [PARAM_FFN_GATE] = "mlp.gate_proj",
    [PARAM_FFN_UP] = "mlp.up_proj",            [PARAM_FFN_DOWN] = "mlp.down_proj",
    [PARAM_FINAL_NORM] = "model.norm",         [PARAM_HEAD] = "lm_head",
};

// The files of a Hugging Face model directory, the largest (most likely to fail) first.
enum { HF_WEIGHTS, HF_CONFIG, HF_TOKENIZER, HF_TOKENIZER_CONFIG, HF_SPECIAL_TOKENS, N_HF_FILES };
static const char *hf_files[N_HF_FILES] = {
    "model.safetensors", "config.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
};

// Row of Wq or Wk (per head of hd rows) that goes to row r of q_proj or k_proj. transformers'
// Llama rotates the two halves of each head (rotate_half: pairs (i, i + hd/2)), osp.c adjacent
// pairs (2i, 2i+1), both by t * theta^(-2i/hd). Row 2i going to row i and row 2i+1 to row
// i + hd/2 puts each pair where rotate_half looks for it; q and k are permuted alike, so q.k,
// and with it the whole function, is unchanged.
static int hf_rope_source_row(int r, int hd) {
    int j = r % hd, half = hd / 2;
    return r - j + (j < half ? 2 * j : 2 * (j - half) + 1);
}

// Appends printf-style text (one short entry of a JSON file) to b.
static void put_format(ByteList *b, const char *fmt, ...) {
    char text[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(text, sizeof text, fmt, ap);
    va_end(ap);
    if (n < 0 || n >= (int)sizeof text) die("internal: a JSON entry of more than %zu bytes", sizeof text);
    put_bytes(b, text, (size_t)n);
}

// Writes the merged model m as safetensors: a uint64 header length, a JSON header naming each
// tensor's dtype, shape and [begin, end) byte offsets in the data that follows (contiguous, no
// gaps), padded with spaces so the data starts at a multiple of 8. float32, or float16 for every
// tensor with f16 (a transformers checkpoint holds one dtype, its config's torch_dtype).
static bool export_safetensors(const char *path, const Model *m, bool f16) {
    int n_tensors, hd = head_dim(&m->cfg);
    ExportTensor *list = export_tensors(m, &n_tensors);
    ByteList header = {0};
    put_format(&header, "{\"__metadata__\":{\"format\":\"pt\"}");
    size_t offset = 0, width = f16 ? 2 : 4;
    for (int k = 0; k < n_tensors; k++) {
        const ParamShape *s = &m->shape[list[k].param];
        char name[96], shape[48];
        export_tensor_name(name, sizeof name, list[k], hf_names, "model.layers.");
        if (s->rows == 1) snprintf(shape, sizeof shape, "%d", s->cols);
        else snprintf(shape, sizeof shape, "%d,%d", s->rows, s->cols);
        size_t bytes = (size_t)s->rows * s->cols * width;
        put_format(&header, ",\"%s\":{\"dtype\":\"%s\",\"shape\":[%s],\"data_offsets\":[%zu,%zu]}", name,
                   f16 ? "F16" : "F32", shape, offset, offset + bytes);
        offset += bytes;
    }
    put_format(&header, "}");
    while (header.len % 8) put_format(&header, " ");
    AtomicFile af;
    bool ok = atomic_open(&af, path);
    if (ok) {
        uint64_t header_len = header.len;
        atomic_write(&af, &header_len, 8);
        atomic_write(&af, header.data, header.len);
        int widest = 0;
        for (int k = 0; k < n_tensors; k++)
            if (m->shape[list[k].param].cols > widest) widest = m->shape[list[k].param].cols;
        uint16_t *halves = xmalloc(sizeof(uint16_t) * (size_t)widest);
        for (int k = 0; k < n_tensors; k++) {
            const ParamShape *s = &m->shape[list[k].param];
            const float *p = param_at(m, m->params, list[k].param, list[k].layer);
            bool permute = list[k].param == PARAM_ATTN_Q || list[k].param == PARAM_ATTN_K;
            for (int r = 0; r < s->rows; r++) {
                const float *row = p + (size_t)(permute ? hf_rope_source_row(r, hd) : r) * s->cols;
                if (!f16) { atomic_write(&af, row, sizeof(float) * (size_t)s->cols); continue; }
                for (int j = 0; j < s->cols; j++) halves[j] = float_to_half(row[j]);
                atomic_write(&af, halves, sizeof(uint16_t) * (size_t)s->cols);
            }
        }
        free(halves);
        ok = atomic_close(&af);
    }
    free(header.data); free(list);
    return ok;
}

// Protobuf's wire format, as much as tokenizer.model needs: a key is (field << 3 | wire type),
// then a varint (type 0: 7 bits a byte, low first; a negative int32 as its 64-bit two's
// complement), 4 little-endian bytes (type 5: float) or a varint length and the bytes (type 2:
// strings and nested messages).
static void pb_varint(ByteList *b, uint64_t v) {
    do {
        uint8_t byte = (uint8_t)(v & 0x7F);
        v >>= 7;
        if (v) byte |= 0x80;
        put_bytes(b, &byte, 1);
    } while (v);
}
// An integer field (wire type 0).
static void pb_int(ByteList *b, int field, int64_t v) {
    pb_varint(b, (uint64_t)field << 3);
    pb_varint(b, (uint64_t)v);
}
// A float field (wire type 5).
static void pb_float(ByteList *b, int field, float v) {
    pb_varint(b, (uint64_t)field << 3 | 5);
    put_bytes(b, &v, 4);
}
// A string or nested message field (wire type 2).
static void pb_bytes(ByteList *b, int field, const void *p, size_t n) {
    pb_varint(b, (uint64_t)field << 3 | 2);
    pb_varint(b, n);
    put_bytes(b, p, n);
}

// sentencepiece's ModelProto for tokenizer t (sentencepiece_model.proto): pieces (1) of piece
// text (1), score (2) and type (3, the numbering GGUF shares); trainer_spec (2): model_type
// BPE, vocab_size, byte_fallback (unknown characters become byte pieces), the special ids;
// normalizer_spec (3): no normalization, no dummy prefix, spaces kept, a space read as U+2581.
// sentencepiece's BPE then merges as osp.c's encoder does: the highest-scored pair first,
// the leftmost on ties.
static void sentencepiece_model(ByteList *out, const Tokenizer *t) {
    enum { SP_BPE = 2 };
    ByteList msg = {0};
    char *text = xmalloc(3 * (size_t)t->max_token_length + 1);
    for (int id = 0; id < t->vocab_size; id++) {
        msg.len = 0;
        pb_bytes(&msg, 1, text, (size_t)spiece_text(t, id, text));
        pb_float(&msg, 2, t->scores[id]);
        pb_int(&msg, 3, token_type(id));
        pb_bytes(out, 1, msg.data, msg.len);
    }
    free(text);
    msg.len = 0;
    pb_int(&msg, 3, SP_BPE);
    pb_int(&msg, 4, t->vocab_size);
    pb_int(&msg, 35, 1);            // byte_fallback
    pb_int(&msg, 40, TOKEN_UNK);
    pb_int(&msg, 41, TOKEN_BOS);
    pb_int(&msg, 42, TOKEN_EOS);
    pb_int(&msg, 43, -1);           // no pad piece
    pb_bytes(out, 2, msg.data, msg.len);
    msg.len = 0;
    pb_bytes(&msg, 1, "identity", 8);
    pb_int(&msg, 3, 0);             // add_dummy_prefix
    pb_int(&msg, 4, 0);             // remove_extra_whitespaces
    pb_int(&msg, 5, 1);             // escape_whitespaces
    pb_bytes(out, 3, msg.data, msg.len);
    free(msg.data);
}

// config.json: the Llama configuration transformers builds LlamaForCausalLM from.
static void hf_config(ByteList *b, const Config *c, bool f16) {
    put_format(b, "{\n  \"architectures\": [\"LlamaForCausalLM\"],\n  \"model_type\": \"llama\",\n");
    put_format(b, "  \"vocab_size\": %d,\n  \"hidden_size\": %d,\n  \"intermediate_size\": %d,\n",
               c->vocab_size, c->dim, c->ffn_dim);
    put_format(b, "  \"num_hidden_layers\": %d,\n  \"num_attention_heads\": %d,\n", c->n_layers, c->n_heads);
    put_format(b, "  \"num_key_value_heads\": %d,\n  \"head_dim\": %d,\n", c->n_kv_heads, head_dim(c));
    put_format(b, "  \"hidden_act\": \"silu\",\n  \"rms_norm_eps\": %g,\n  \"rope_theta\": %.1f,\n",
               RMSNORM_EPS, ROPE_THETA);
    put_format(b, "  \"max_position_embeddings\": %d,\n  \"tie_word_embeddings\": false,\n", c->seq_len);
    put_format(b, "  \"attention_bias\": false,\n  \"mlp_bias\": false,\n");
    put_format(b, "  \"bos_token_id\": %d,\n  \"eos_token_id\": %d,\n  \"torch_dtype\": \"%s\"\n}\n",
               TOKEN_BOS, TOKEN_EOS, f16 ? "float16" : "float32");
}

// special_tokens_map.json, and the same three entries opening tokenizer_config.json.
static void hf_special_tokens(ByteList *b) {
    put_format(b, "{\n  \"bos_token\": \"%s\",\n  \"eos_token\": \"%s\",\n  \"unk_token\": \"%s\"",
               special_pieces[TOKEN_BOS], special_pieces[TOKEN_EOS], special_pieces[TOKEN_UNK]);
}

// tokenizer_config.json: legacy, so transformers hands the text to sentencepiece as it is;
// special tokens written in the text stay text; no BOS, and no "▁" prefix, which transformers'
// Llama tokenizers would otherwise add, as osp.c trains.
static void hf_tokenizer_config(ByteList *b, int seq_len) {
    hf_special_tokens(b);
    put_format(b, ",\n  \"tokenizer_class\": \"LlamaTokenizer\",\n  \"legacy\": true,\n");
    put_format(b, "  \"split_special_tokens\": true,\n");
    put_format(b, "  \"add_bos_token\": false,\n  \"add_eos_token\": false,\n");
    put_format(b, "  \"add_prefix_space\": false,\n  \"clean_up_tokenization_spaces\": false,\n");
    put_format(b, "  \"model_max_length\": %d\n}\n", seq_len);
}

// Writes b to path, whole or not at all.
static bool write_bytes_file(const char *path, const ByteList *b) {
    AtomicFile af;
    if (!atomic_open(&af, path)) return false;
    atomic_write(&af, b->data, b->len);
    return atomic_close(&af);
}

// Path of Hugging Face file k in directory dir.
static void hf_path(char *out, size_t size, const char *dir, int k) {
    snprintf(out, size, "%s/%s", dir, hf_files[k]);
}

// Makes directory path unless it is one; *made says whether it was made here.
static bool make_directory(const char *path, bool *made) {
    struct stat st;
    *made = mkdir(path, 0777) == 0;
    int err = errno;
    if (*made || (err == EEXIST && stat(path, &st) == 0 && S_ISDIR(st.st_mode))) return true;
    return fail("cannot make directory '%s': %s", path, strerror(err));
}

// Writes the merged model m and tokenizer t into directory dir (which exists) in the Hugging
// Face layout, each file whole or not at all (cmd_export writes them as one FileBatch).
static bool export_hf(const char *dir, const Model *m, const Tokenizer *t, bool f16) {
    bool ok = true;
    for (int k = 0; ok && k < N_HF_FILES; k++) {
        char path[PATH_MAX];
        hf_path(path, sizeof path, dir, k);
        if (k == HF_WEIGHTS) { ok = export_safetensors(path, m, f16); continue; }
        ByteList b = {0};
        if (k == HF_CONFIG) hf_config(&b, &m->cfg, f16);
        else if (k == HF_TOKENIZER) sentencepiece_model(&b, t);
        else if (k == HF_TOKENIZER_CONFIG) hf_tokenizer_config(&b, m->cfg.seq_len);
        else { hf_special_tokens(&b); put_format(&b, "\n}\n"); }
        ok = write_bytes_file(path, &b);
        free(b.data);
    }
    return ok;
}

/* ============================================================================
 * The training run: the loop around train_step, its log lines, the kurtosis CSV, FLOP counts
 * ========================================================================== */

// FLOPs of one training step on B x T tokens: 6 per matmul weight per token (forward 2,
// backward 4; every parameter but the embedding table sits in a matmul) plus attention's
// QKᵀ and PV products over the causal half (2 products x 2 FLOPs x 3 for fwd+bwd).
static double model_flops_per_step(const Model *m, int B, int T) {
    double matmul_params = (double)(m->n_params - param_size(m, PARAM_EMBED));
    for (int i = 0; i < N_PARAM_TENSORS; i++) if (is_norm_gain(i)) matmul_params -= (double)param_size(m, i);
    double attention = 12.0 * m->cfg.n_layers * m->cfg.n_heads * head_dim(&m->cfg) * (T * (T + 1) / 2.0);
    return (double)B * (6.0 * matmul_params * T + attention);
}

// FLOPs of Muon's Newton-Schulz in one optimizer step: per matrix, with r its shorter and c its
// longer side, every iteration does X·Xᵀ (2r²c), A·A (2r³) and poly·X (2r²c).
static double newton_schulz_flops(const Model *m, const OptimConfig *o) {
    double flops = 0.0;
    for (int i = 0; i < N_PARAM_TENSORS; i++) {
        if (!uses_muon(o->optimizer, i) || m->shape[i].rows == 1 || param_size(m, i) == 0) continue;
        double r = fmin(m->shape[i].rows, m->shape[i].cols), c = fmax(m->shape[i].rows, m->shape[i].cols);
        flops += (double)m->shape[i].count * o->ns_steps * (4.0 * r * r * c + 2.0 * r * r * r);
    }
    return flops;
}

// Name of hidden state s of a KurtosisReport: the embedding, a block's output, the final norm.
static const char *state_label(int s, int n_states, char *buf, size_t size) {
    if (s == 0) snprintf(buf, size, "embedding");
    else if (s == n_states - 1) snprintf(buf, size, "final norm");
    else snprintf(buf, size, "block %d", s);
    return buf;
}

// What a run measures on its fixed held-out batch, one row per measured step: the paper's
// kurtosis (each token alone); in context the mean kurtosis, the largest |x|, the top channel's
// share, the first token's peak against the median token's, the sink's attention (the largest
// of each over states or layers); the W4A4KV4 RTN perplexity increase without and with the FFN
// Hadamard; then each hidden state's kurtosis in context. Kept in memory and rewritten whole
// at every row (through a temporary file), so an interrupted run never leaves half a CSV.
enum { LOG_KURTOSIS_PAPER, LOG_KURTOSIS, LOG_MAX_ABS, LOG_TOP_CHANNEL, LOG_FIRST_PEAK, LOG_SINK, LOG_W4A4KV4,
       LOG_W4A4KV4_HAD, N_LOG_SCALARS };
static const char *log_columns[N_LOG_SCALARS] = {
    "kurtosis_paper", "kurtosis", "max_abs", "top_channel", "first_peak_ratio", "sink", "w4a4kv4_increase",
    "w4a4kv4_had_increase"};

typedef struct {
    int n_states, n, cap;
    int *step;
    double *values;   // [n][N_LOG_SCALARS + n_states]
} KurtosisLog;

static int kurtosis_log_cols(const KurtosisLog *l) { return N_LOG_SCALARS + l->n_states; }

// Appends a row: scalars [N_LOG_SCALARS], per_state [n_states].
static void kurtosis_log_add(KurtosisLog *l, int step, const double *scalars, const double *per_state) {
    int cols = kurtosis_log_cols(l);
    if (l->n == l->cap) {
        l->cap = l->cap ? 2 * l->cap : 64;
        l->step = xrealloc(l->step, sizeof(int) * (size_t)l->cap);
        l->values = xrealloc(l->values, sizeof(double) * (size_t)l->cap * cols);
    }
    double *v = l->values + (size_t)l->n * cols;
    memcpy(v, scalars, sizeof(double) * N_LOG_SCALARS);
    memcpy(v + N_LOG_SCALARS, per_state, sizeof(double) * (size_t)l->n_states);
    l->step[l->n++] = step;
}

static void kurtosis_log_free(KurtosisLog *l) { free(l->step); free(l->values); memset(l, 0, sizeof *l); }

// CSV of the log: `columns` (leading columns, e.g. "preset,seed," or ""), then step, tokens,
// log_columns, one column per state.
// The header is written when `header` is set; each row starts with `prefix`, the values of the
// leading columns.
static void kurtosis_log_write(FILE *f, const KurtosisLog *l, bool header, const char *columns,
                               const char *prefix, size_t tokens_per_step) {
    char label[32];
    if (header) {
        fprintf(f, "%sstep,tokens", columns);
        for (int c = 0; c < N_LOG_SCALARS; c++) fprintf(f, ",%s", log_columns[c]);
        for (int s = 0; s < l->n_states; s++)
            fprintf(f, ",%s", state_label(s, l->n_states, label, sizeof label));
        fprintf(f, "\n");
    }
    for (int i = 0; i < l->n; i++) {
        fprintf(f, "%s%d,%zu", prefix, l->step[i], (size_t)l->step[i] * tokens_per_step);
        for (int c = 0; c < kurtosis_log_cols(l); c++)
            fprintf(f, ",%.6g", l->values[(size_t)i * kurtosis_log_cols(l) + c]);
        fprintf(f, "\n");
    }
}

static bool kurtosis_log_save(const KurtosisLog *l, const char *path, size_t tokens_per_step) {
    AtomicFile af;
    if (!atomic_open(&af, path)) return false;
    kurtosis_log_write(af.f, l, true, "", "", tokens_per_step);
    return atomic_close(&af);
}

// Reads a CSV written by kurtosis_log_save, keeping the rows up to max_step (a resumed run
// measures the later steps again). l->n_states must be set; a missing file reads as empty.
static bool kurtosis_log_load(KurtosisLog *l, const char *path, int max_step) {
    char *text, **lines;
    int n_lines;
    bool ok = read_lines(path, &text, &lines, &n_lines);
    double *v = xmalloc(sizeof(double) * (size_t)(1 + kurtosis_log_cols(l)));   // tokens, then the values
    for (int i = 1; ok && i < n_lines; i++) {   // line 0: the header
        char *p = lines[i];
        long step;
        if (!parse_int_at(&p, 0, INT_MAX, &step) || !parse_csv_numbers(&p, v, 1 + kurtosis_log_cols(l)) ||
            *p != '\0')
            ok = fail("'%s' line %d is not a row of %d values", path, i + 1, kurtosis_log_cols(l));
        else if (step <= max_step) kurtosis_log_add(l, (int)step, v + 1, v + 1 + N_LOG_SCALARS);
    }
    free(v); free(lines); free(text);
    return ok;
}

// How a run reports and saves; ./osp train and ./osp ablation both drive train_run.
typedef struct {
    const char *out;            // checkpoint, written every eval_every steps and at the end
    int eval_every;             // 0 = only at the end
    int val_windows;            // windows of the periodic validation loss, 0 = all
    int log_every;
    int kurtosis_every;         // 0 = off
    const char *kurtosis_csv;   // NULL, or where the kurtosis rows go (kept through a resume)
    FILE *log;                  // the step lines
    // Called after every logged step with the mean seconds per step since the last call.
    void (*on_log)(void *ctx, const TrainState *s, float loss, double seconds_per_step);
    void *ctx;
} RunOptions;

typedef struct {
    bool diverged;
    double tokens_per_second;
} RunResult; // tokens/s of the training steps alone

// The run's description: model, parameters, recipe, learning rates, optimizer state, data.
static void print_run_header(FILE *log, const Trainer *tr) {
    const TrainState *st = &tr->state;
    const Config *c = &st->cfg;
    const Model *m = &tr->model;
    fprintf(log, "model: dim %d, layers %d, heads %d (kv %d), ffn %d, seq %d, vocab %d: %.2fM parameters\n",
            c->dim, c->n_layers, c->n_heads, c->n_kv_heads, c->ffn_dim, c->seq_len, c->vocab_size,
            m->n_params / 1e6);
    fprintf(log, "parameters:");
    for (int i = 0; i < N_PARAM_TENSORS; i++)
        if (param_size(m, i) > 0)
            fprintf(log, " %s %s%dx%d%s", param_names[i], m->shape[i].count > 1 ? "[" : "", m->shape[i].rows,
                    m->shape[i].cols, m->shape[i].count > 1 ? "]xL" : "");
    fprintf(log, "\n");
    size_t state_bytes = optimizer_state_bytes(m, st->opt.optimizer);
    fprintf(log, "recipe: preset %s: optimizer %s, %s, %s\n", preset_name(st->preset),
            optimizer_names[st->opt.optimizer], c->ssnorm ? "SSNorm" : "RMSNorm",
            c->embproj ? "EmbProj" : "no EmbProj");
    char lrs[96];
    if (st->opt.optimizer == OPTIMIZER_ADAM) snprintf(lrs, sizeof lrs, "lr %g", st->opt.lr_adam);
    else if (st->opt.optimizer == OPTIMIZER_MUON_ONLY)
        snprintf(lrs, sizeof lrs, "lr muon %g", st->opt.lr_muon);
    else
        snprintf(lrs, sizeof lrs, "lr muon %g (network), lr adam %g (embedding, head)", st->opt.lr_muon,
                 st->opt.lr_adam);
    fprintf(log,
            "training: %s, warmup %d, steps %d, batch %d (%zu tokens/step), wd %g, clip %g, seed %llu, %d "
            "thread%s\n",
            lrs, st->opt.warmup, st->opt.steps, st->batch, (size_t)st->batch * c->seq_len,
            st->opt.weight_decay, st->opt.grad_clip, (unsigned long long)st->seed, num_threads(),
            num_threads() == 1 ? "" : "s");
    fprintf(log, "optimizer state: %zu bytes (%.2f per parameter: AdamW keeps 2 buffers, Muon 1)\n",
            state_bytes, (double)state_bytes / sizeof(float) / m->n_params);
    fprintf(log, "data: %zu train tokens, %zu val tokens\n", tr->train->n, tr->val->n);
}

// Measures the outliers on a fixed batch (the first `batch` validation windows): both kurtosis
// reports, the sink, and the W4A4KV4 perplexity increase; logs them, and adds them to klog.
static void log_kurtosis(Trainer *tr, const RunOptions *ro, KurtosisLog *klog) {
    const TrainState *st = &tr->state;
    KurtosisReport paper, kr;
    measure_hidden_states(&tr->model, tr->val, st->batch, &paper, &kr);
    double v[N_LOG_SCALARS] = {
        [LOG_KURTOSIS_PAPER] = paper.mean, [LOG_KURTOSIS] = kr.mean, [LOG_MAX_ABS] = kurtosis_max_abs(&kr),
        [LOG_TOP_CHANNEL] = kr.top_channel_mean, [LOG_FIRST_PEAK] = kurtosis_first_peak_ratio(&kr),
        [LOG_SINK] = kurtosis_sink(&kr)};
    w4a4kv4_increase(&tr->model, tr->val, st->batch, v + LOG_W4A4KV4);
    fprintf(ro->log,
            "step %6d/%d | kurtosis %.4f (paper's) | in context %.4f, max |act| %.3f, top channel %.1f%%, "
            "first token %.1fx the median peak, sink %.3f | W4A4KV4 %+.1f%%, Had. %+.1f%% | per state",
            st->step, st->opt.steps, v[LOG_KURTOSIS_PAPER], v[LOG_KURTOSIS], v[LOG_MAX_ABS],
            100 * v[LOG_TOP_CHANNEL], v[LOG_FIRST_PEAK], v[LOG_SINK], 100 * v[LOG_W4A4KV4],
            100 * v[LOG_W4A4KV4_HAD]);
    for (int i = 0; i < kr.n_states; i++) fprintf(ro->log, " %.3f", kr.kurtosis[i]);
    fprintf(ro->log, "\n");
    kurtosis_log_add(klog, st->step, v, kr.kurtosis);
    kurtosis_free(&paper); kurtosis_free(&kr);
}

// Trains from the trainer's current step to opt.steps: logs, measures kurtosis, validates and
// checkpoints as ro says. Returns false (osp_error set) on a NaN or Inf loss, leaving the last
// checkpoint intact, or when a file cannot be written.
static bool train_run(Trainer *tr, const RunOptions *ro, RunResult *res) {
    TrainState *st = &tr->state;
    Model *m = &tr->model;
    size_t tokens_per_step = (size_t)st->batch * st->cfg.seq_len;
    double flops_per_step = model_flops_per_step(m, st->batch, st->cfg.seq_len);
    print_run_header(ro->log, tr);
    if (st->step > 0) fprintf(ro->log, "resumed at step %d\n", st->step);
    KurtosisLog klog = {.n_states = st->cfg.n_layers + 2};
    bool ok = true, diverged = false;
    if (ro->kurtosis_every > 0) {
        if (ro->kurtosis_csv && st->step > 0) ok = kurtosis_log_load(&klog, ro->kurtosis_csv, st->step);
        if (ok && st->step == 0) {   // the starting point (a resumed run has its row already)
            log_kurtosis(tr, ro, &klog);
            if (ro->kurtosis_csv) ok = kurtosis_log_save(&klog, ro->kurtosis_csv, tokens_per_step);
        }
    }
    double t_start = now_seconds(), t_window = t_start, t_aside_total = 0.0;
    int window_steps = 0, start_step = st->step;
    float loss = 0.0f, grad_norm = 0.0f, val_loss = NAN;
    while (ok && st->step < st->opt.steps) {
        // The lr shown is the network's: Muon's, or AdamW's under the adam preset.
        float lr = lr_factor(&st->opt, st->step) *
                (st->opt.optimizer == OPTIMIZER_ADAM ? st->opt.lr_adam : st->opt.lr_muon);
        loss = train_step(tr, &grad_norm);
        if (!isfinite(loss)) {
            diverged = true;
            ok = fail("loss is %s at step %d; stopping (the last checkpoint in '%s', if any, is intact)",
                      isnan(loss) ? "NaN" : "Inf", st->step + 1, ro->out);
            break;
        }
        window_steps++;
        bool last = st->step == st->opt.steps;
        if (st->step % ro->log_every == 0 || last || st->step == start_step + 1) {
            double now = now_seconds(), dt = (now - t_window) / window_steps;
            char eta[32];
            fprintf(ro->log,
                    "step %6d/%d | loss %.4f | lr %.2e | norm %6.3f | %7.1f ms/step | %7.0f tok/s | %5.2f "
                    "GFLOP/s | left %s\n",
                    st->step, st->opt.steps, loss, lr, grad_norm, 1e3 * dt, tokens_per_step / dt,
                    flops_per_step / dt / 1e9,
                    format_duration(dt * (st->opt.steps - st->step), eta, sizeof eta));
            fflush(ro->log);
            if (ro->on_log) ro->on_log(ro->ctx, st, loss, dt);
            t_window = now;
            window_steps = 0;
        }
        double t_aside = now_seconds();   // kurtosis and evaluation stay out of the step timing
        if (ro->kurtosis_every > 0 && (st->step % ro->kurtosis_every == 0 || last)) {
            log_kurtosis(tr, ro, &klog);
            if (ro->kurtosis_csv) ok = kurtosis_log_save(&klog, ro->kurtosis_csv, tokens_per_step);
        }
        if (ok && (last || (ro->eval_every > 0 && st->step % ro->eval_every == 0))) {
            double t0 = now_seconds();
            val_loss = evaluate_loss(m, tr->val, ro->val_windows, NULL, NULL);
            ok = checkpoint_save(ro->out, st, m, tr->opt_state);
            if (ok)
                fprintf(ro->log, "step %6d/%d | val loss %.4f | val ppl %.2f | saved %s (%.1f s)\n", st->step,
                        st->opt.steps, val_loss, exp(val_loss), ro->out, now_seconds() - t0);
        }
        fflush(ro->log);
        double aside = now_seconds() - t_aside;
        t_window += aside;
        t_aside_total += aside;
    }
    double elapsed = now_seconds() - t_start;
    int done = st->step - start_step;
    *res = (RunResult){ .diverged = diverged,
                        .tokens_per_second = done > 0 ? tokens_per_step * done / (elapsed - t_aside_total)
                                                      : NAN };
    if (ok && done > 0)
        fprintf(ro->log,
                "done: %d steps in %.1f s (%.1f ms/step, %.0f tok/s, %.2f GFLOP/s incl. evaluation); final "
                "train loss %.4f, val loss %.4f\n",
                done, elapsed, 1e3 * elapsed / done, tokens_per_step * done / elapsed,
                flops_per_step * done / elapsed / 1e9, loss, val_loss);
    fflush(ro->log);
    kurtosis_log_free(&klog);
    return ok;
}

/* ============================================================================
 * Sampling
 * ========================================================================== */

typedef struct { float prob; int id; } ProbId;

static int compare_prob_desc(const void *a, const void *b) {
    float x = ((const ProbId *)a)->prob, y = ((const ProbId *)b)->prob;
    return (x < y) - (x > y);
}

// Samples a token from logits [V] at a temperature (0 = greedy) with nucleus (top-p) cutoff.
static int sample_token(const float *logits, int V, float temperature, float top_p, uint64_t *rng,
                        ProbId *scratch) {
    int best = 0;
    for (int i = 1; i < V; i++) if (logits[i] > logits[best]) best = i;
    if (temperature <= 0.0f) return best;
    double sum = 0.0;
    for (int i = 0; i < V; i++) {
        scratch[i].prob = expf((logits[i] - logits[best]) / temperature);
        scratch[i].id = i;
        sum += scratch[i].prob;
    }
    qsort(scratch, (size_t)V, sizeof(ProbId), compare_prob_desc);
    double kept = 0.0;
    int n = 0;
    while (n < V && (n == 0 || kept < top_p * sum)) kept += scratch[n++].prob;
    double r = rng_uniform(rng) * kept;
    for (int i = 0; i < n; i++) {
        r -= scratch[i].prob;
        if (r <= 0.0) return scratch[i].id;
    }
    return scratch[n - 1].id;
}

// Writes the prompt and n_new sampled tokens to out. The context is the last seq_len tokens;
// each step recomputes the whole window (simple, and fast enough at these sizes).
static void generate(Model *m, const Tokenizer *tok, const char *prompt, int n_new, float temperature,
                     float top_p, uint64_t seed, FILE *out) {
    size_t plen = strlen(prompt);
    int *tokens = xmalloc(sizeof(int) * (plen + (size_t)n_new + 1));
    int n = tokenizer_encode(tok, (const unsigned char *)prompt, plen, tokens);
    if (n == 0)
        n = tokenizer_encode(tok, (const unsigned char *)"\n", 1,
                             tokens); // training text has no <s>: start a line
    fputs(prompt, out);
    ProbId *scratch = xmalloc(sizeof(ProbId) * (size_t)m->cfg.vocab_size);
    uint64_t rng = seed;
    char byte_buf[1];
    for (int i = 0; i < n_new; i++) {
        int T = n < m->cfg.seq_len ? n : m->cfg.seq_len;
        model_forward(m, tokens + n - T, NULL, 1, T, NULL);
        int next = sample_token(m->act.logits + (size_t)(T - 1) * m->cfg.vocab_size, m->cfg.vocab_size,
                                temperature, top_p, &rng, scratch);
        tokens[n++] = next;
        int len;
        const char *piece = tokenizer_decode(tok, next, &len, byte_buf);
        fwrite(piece, 1, (size_t)len, out);
        fflush(out);
    }
    fputc('\n', out);
    free(scratch); free(tokens);
}

// Each row of the 4-bit table's key in eval --json and its column in results.csv (+ "_ppl", and
// "_had").
static const struct { const char *json, *csv;
} quant_row_keys[N_QUANT_ROWS] = {
    { "w", "w4" },         { "a", "a4" },           { "kv", "kv4" },
    { "wakv", "w4a4kv4" }, { "w_gptq", "w4_gptq" }, { "wakv_gptq", "w4a4kv4_gptq" },
};

/* ============================================================================
 * Ablation results: results.csv, one row per run of ./osp ablation
 * ========================================================================== */

// One run of the ablation and what is known of it (from this invocation or results.csv).
typedef struct {
    int preset;
    uint64_t seed;
    bool chosen;                // its preset is in this invocation's --presets
    int diverged_step;          // 0: no divergence
    bool evaluated;
    double tokens_per_second;   // measured while training, NAN if unknown
    double state_bytes;
    double windows;
    double kurtosis, kurtosis_paper;   // in context (all L + 2 states); each token alone (the paper's)
    double top_channel, max_abs;       // in context
    double fp_ppl, quant_ppl[N_QUANT_ROWS][2];
} AblationRun;

// What the paper claims of adam against osp, as figures of one run (or seed means).
typedef struct { double kurtosis_paper, fp_ppl, ppl_444, ppl_444_had; } ClaimFigures;

// The paper's effect at laptop scale, each claim met or missed: Adam's outliers far above OSP's
// and a large share of the kurtosis ceiling d - 3 (one channel holding all the energy; the
// paper's Adam reaches 89%), Adam's 4-bit model (W4A4KV4 RTN) breaking where OSP's holds, OSP
// ahead with the FFN Hadamard, and nothing lost in full precision.
static void print_paper_claims(FILE *f, ClaimFigures adam, ClaimFigures osp, int dim) {
    const char *verdict[2] = {"missed", "met"};
    double ceiling = dim - 3;
    double rtn[2] = {100 * (adam.ppl_444 / adam.fp_ppl - 1), 100 * (osp.ppl_444 / osp.fp_ppl - 1)};
    fprintf(f, "\nthe paper's effect, adam against osp, as this project states it:\n");
    fprintf(f, "  kurtosis     %-6s adam %.2f: %.0fx osp's, %.0f%% of its ceiling %.0f "
               "(claim: >= 100x and >= 25%%)\n",
            verdict[adam.kurtosis_paper >= 100 * osp.kurtosis_paper
                    && adam.kurtosis_paper >= 0.25 * ceiling],
            adam.kurtosis_paper, adam.kurtosis_paper / osp.kurtosis_paper,
            100 * adam.kurtosis_paper / ceiling, ceiling);
    fprintf(f, "  4-4-4 RTN    %-6s adam %+.1f%%, osp %+.1f%% (claim: adam's perplexity at least doubles, "
               "osp's rises <= 20%%)\n", verdict[rtn[0] >= 100 && rtn[1] <= 20], rtn[0], rtn[1]);
    fprintf(f, "  4-4-4 +Had.  %-6s osp %.2f, adam %.2f (claim: osp's perplexity below adam's)\n",
            verdict[osp.ppl_444_had < adam.ppl_444_had], osp.ppl_444_had, adam.ppl_444_had);
    fprintf(f, "  fp ppl       %-6s osp %.2f, adam %.2f (claim: osp's within 5%% of adam's)\n",
            verdict[osp.fp_ppl <= 1.05 * adam.fp_ppl], osp.fp_ppl, adam.fp_ppl);
}

// results.csv's columns after preset, seed and diverged_step: these, then a perplexity per row
// of the 4-bit table without and then with Had. (quant_row_keys); and where each lives in a run.
#define ABLATION_SCALARS 8
#define ABLATION_VALUES (ABLATION_SCALARS + 2 * N_QUANT_ROWS)
static const char *ablation_columns[ABLATION_SCALARS] = {
    "tokens_per_s", "optimizer_state_bytes", "val_windows", "kurtosis", "kurtosis_paper", "top_channel_share",
    "max_abs_activation", "fp_ppl"};

static void ablation_values(AblationRun *r, double **v) {
    double *fields[ABLATION_VALUES] = {&r->tokens_per_second, &r->state_bytes, &r->windows, &r->kurtosis,
                                       &r->kurtosis_paper, &r->top_channel, &r->max_abs, &r->fp_ppl};
    for (int q = 0; q < N_QUANT_ROWS; q++) {
        fields[ABLATION_SCALARS + q] = &r->quant_ppl[q][0];
        fields[ABLATION_SCALARS + N_QUANT_ROWS + q] = &r->quant_ppl[q][1];
    }
    memcpy(v, fields, sizeof fields);
}

// The first line of results.csv.
static void ablation_header(char *buf, size_t size) {
    int n = snprintf(buf, size, "preset,seed,diverged_step");
    for (int c = 0; c < ABLATION_SCALARS; c++)
        n += snprintf(buf + n, size - (size_t)n, ",%s", ablation_columns[c]);
    for (int had = 0; had < 2; had++)
        for (int q = 0; q < N_QUANT_ROWS; q++)
            n += snprintf(buf + n, size - (size_t)n, ",%s_ppl%s", quant_row_keys[q].csv, had ? "_had" : "");
}

// results.csv: a header, then per run: preset, seed, diverged_step, then ABLATION_VALUES numbers.
static bool ablation_save_results(const char *path, AblationRun *runs, int n_runs) {
    AtomicFile af;
    if (!atomic_open(&af, path)) return false;
    char header[1024];
    ablation_header(header, sizeof header);
    fprintf(af.f, "%s\n", header);
    for (int i = 0; i < n_runs; i++) {
        double *v[ABLATION_VALUES];
        ablation_values(&runs[i], v);
        fprintf(af.f, "%s,%llu,%d", presets[runs[i].preset].name, (unsigned long long)runs[i].seed,
                runs[i].diverged_step);
        for (int c = 0; c < ABLATION_VALUES; c++) fprintf(af.f, ",%.10g", *v[c]);
        fprintf(af.f, "\n");
    }
    return atomic_close(&af);
}

// Fills runs[] from an earlier results.csv (missing: nothing known yet).
static bool ablation_load_results(const char *path, AblationRun *runs, int n_runs) {
    char *text, **lines;
    int n_lines;
    bool ok = read_lines(path, &text, &lines, &n_lines);
    char header[1024];
    ablation_header(header, sizeof header);
    if (ok && n_lines > 0 && strncmp(lines[0], "preset,seed,", 12) != 0)
        ok = fail("'%s' is not a results file", path);
    else if (ok && n_lines > 0 && strcmp(lines[0], header) != 0)
        ok = fail("'%s' has other columns than this osp writes; use another --dir or delete it", path);
    for (int i = 1; ok && i < n_lines; i++) {
        char *comma = strchr(lines[i], ','), *p = comma;
        unsigned long long seed = comma && isdigit((unsigned char)comma[1]) ? strtoull(comma + 1, &p, 10) : 0;
        long diverged_step = 0;
        double values[ABLATION_VALUES];
        if (!comma || p == comma + 1 || !parse_csv_int(&p, 0, INT_MAX, &diverged_step) ||
            !parse_csv_numbers(&p, values, ABLATION_VALUES) || *p) {
            ok = fail("'%s' line %d is not a results row", path, i + 1);
            break;
        }
        *comma = '\0';
        for (int r = 0; r < n_runs; r++) {
            if (strcmp(presets[runs[r].preset].name, lines[i]) || runs[r].seed != seed) continue;
            double *v[ABLATION_VALUES];
            ablation_values(&runs[r], v);
            for (int k = 0; k < ABLATION_VALUES; k++) *v[k] = values[k];
            runs[r].diverged_step = (int)diverged_step;
            runs[r].evaluated = isfinite(runs[r].fp_ppl);
        }
    }
    free(lines); free(text);
    return ok;
}

/* ============================================================================
 * Plots as SVG: a line chart (kurtosis over training, the analogue of the paper's Figure 3) and
 * the largest activation per channel (the analogue of its Figure 1)
 * ========================================================================== */

typedef struct { const char *label; int n; const double *x, *y; } PlotLine;

// A "nice" tick step (1, 2 or 5 times a power of ten) giving about `ticks` intervals over span.
static double nice_step(double span, int ticks) {
    double raw = span / ticks, p = pow(10.0, floor(log10(raw))), f = raw / p;
    return p * (f <= 1.0 ? 1.0 : f <= 2.0 ? 2.0 : f <= 5.0 ? 5.0 : 10.0);
}

// Geometry of a chart: the plot frame in pixels, x from 0 to x_max, y over decades dec_lo..dec_hi.
typedef struct { double left, top, width, height, x_max; int dec_lo, dec_hi; } PlotFrame;

static double plot_x(const PlotFrame *f, double x) { return f->left + f->width * x / f->x_max; }
static double plot_y(const PlotFrame *f, double log10_y) {
    return f->top + f->height * (1.0 - (log10_y - f->dec_lo) / (f->dec_hi - f->dec_lo));
}

// Opens an SVG of W x H pixels for writing (atomically): the svg element and a white ground.
static bool svg_open(AtomicFile *af, const char *path, double W, double H) {
    if (!atomic_open(af, path)) return false;
    fprintf(af->f, "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%.0f\" height=\"%.0f\" "
                   "viewBox=\"0 0 %.0f %.0f\" font-family=\"sans-serif\" font-size=\"13\">\n", W, H, W, H);
    fprintf(af->f, "<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n");
    return true;
}

// Writes lines[] as an SVG chart: linear x from 0, logarithmic y over whole decades (values
// below y_floor are drawn at y_floor, since log(0) has no place), labelled axes, a legend.
static bool write_svg_plot(const char *path, const char *title, const char *x_label, const char *y_label,
                           const PlotLine *lines, int n_lines, double y_floor) {
    static const char *colors[] = { "#d62728", "#ff7f0e", "#9467bd", "#2ca02c",
                                    "#8c564b", "#1f77b4", "#e377c2", "#7f7f7f" };
    const double W = 760, H = 480, left = 80, right = 190, top = 50, bottom = 60;
    double x_max = 0.0, y_lo = INFINITY, y_hi = -INFINITY;
    for (int l = 0; l < n_lines; l++)
        for (int i = 0; i < lines[l].n; i++) {
            double y = fmax(lines[l].y[i], y_floor);
            x_max = fmax(x_max, lines[l].x[i]);
            y_lo = fmin(y_lo, y);
            y_hi = fmax(y_hi, y);
        }
    if (!(x_max > 0.0)) x_max = 1.0;
    if (!isfinite(y_lo)) y_lo = y_hi = 1.0;
    PlotFrame fr = {
        left, top, W - left - right, H - top - bottom, x_max, (int)floor(log10(y_lo)), (int)ceil(log10(y_hi))
    };
    if (fr.dec_hi == fr.dec_lo) fr.dec_hi++;
    AtomicFile af;
    if (!svg_open(&af, path, W, H)) return false;
    FILE *f = af.f;
    fprintf(f, "<text x=\"%.1f\" y=\"28\" text-anchor=\"middle\" font-size=\"16\">%s</text>\n", W / 2, title);
    // y: a grid line and label per decade, minor ticks at 2..9.
    for (int d = fr.dec_lo; d <= fr.dec_hi; d++) {
        double py = plot_y(&fr, d);
        fprintf(f, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#ddd\"/>\n", left, py,
                left + fr.width, py);
        fprintf(f, "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"end\">%g</text>\n", left - 8, py + 4,
                pow(10.0, d));
        for (int m = 2; d < fr.dec_hi && m < 10; m++) {
            double my = plot_y(&fr, d + log10((double)m));
            fprintf(f, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#888\"/>\n", left - 4,
                    my, left, my);
        }
    }
    // x: ticks at a nice step.
    double step = nice_step(x_max, 6);
    for (double x = 0.0; x <= x_max * (1.0 + 1e-9); x += step) {
        double px = plot_x(&fr, x);
        fprintf(f, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#ddd\"/>\n", px, top, px,
                top + fr.height);
        fprintf(f, "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">%g</text>\n", px, top + fr.height + 18,
                x);
    }
    fprintf(f,
            "<rect x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.1f\" fill=\"none\" stroke=\"black\"/>\n",
            left, top, fr.width, fr.height);
    fprintf(f, "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">%s</text>\n", left + fr.width / 2, H - 15,
            x_label);
    fprintf(f, "<text transform=\"translate(22 %.1f) rotate(-90)\" text-anchor=\"middle\">%s</text>\n",
            top + fr.height / 2, y_label);
    for (int l = 0; l < n_lines; l++) {
        const char *color = colors[l % (int)(sizeof colors / sizeof colors[0])];
        fprintf(f, "<polyline fill=\"none\" stroke=\"%s\" stroke-width=\"2\" points=\"", color);
        for (int i = 0; i < lines[l].n; i++)
            fprintf(f, "%s%.1f,%.1f", i ? " " : "", plot_x(&fr, lines[l].x[i]),
                    plot_y(&fr, log10(fmax(lines[l].y[i], y_floor))));
        fprintf(f, "\"/>\n");
        double ly = top + 12 + 22 * l, lx = left + fr.width;
        fprintf(f,
                "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"%s\" stroke-width=\"3\"/>\n",
                lx + 14, ly, lx + 40, ly, color);
        fprintf(f, "<text x=\"%.1f\" y=\"%.1f\">%s</text>\n", lx + 48, ly + 4, lines[l].label);
    }
    fprintf(f, "</svg>\n");
    return atomic_close(&af);
}

// One panel of the activation picture: a model's largest |activation| per channel of each
// hidden state, channel_max [n_states][dim] (a KurtosisReport's).
typedef struct { const char *label; int n_states, dim; const double *channel_max; } ChannelPanel;

// Colour of a heat-strip cell at t in [0, 1]: light yellow through orange to dark red.
static void heat_color(char *buf, size_t size, double t) {
    static const int stops[5][3] = {
        { 255, 255, 204 }, { 254, 217, 118 }, { 253, 141, 60 }, { 227, 26, 28 }, { 128, 0, 38 }
    };
    double u = fmin(fmax(t, 0.0), 1.0) * 4.0;
    int k = u >= 4.0 ? 3 : (int)u;
    double w = u - k;
    int rgb[3];
    for (int i = 0; i < 3; i++) rgb[i] = (int)lround(stops[k][i] + w * (stops[k + 1][i] - stops[k][i]));
    snprintf(buf, size, "#%02x%02x%02x", rgb[0], rgb[1], rgb[2]);
}

// The paper's Figure 1 in two dimensions, as SVG: a panel per model, side by side on one
// scale. Top: a bar per channel, its largest |activation| at hidden state `state` (linear,
// or log over whole decades). Below: a strip per hidden state, each cell coloured by the
// channel's largest |activation| on a log scale shared by all strips (the legend at right).
// The bar chart of panel i has its frame at x = CH_LEFT + i·CH_PANEL_W, y = CH_TOP.
enum { CH_LEFT = 80, CH_PANEL_W = 470, CH_FRAME_W = 380, CH_TOP = 78, CH_FRAME_H = 240, CH_STRIP_H = 14 };
static bool write_svg_channels(const char *path, const char *title, const ChannelPanel *panels, int n,
                               int state, bool log_scale) {
    double hi = 0.0, lo = INFINITY;   // over every panel and state: the strips' range
    double bar_hi = 0.0, bar_lo = INFINITY;   // over the bars of every panel
    int max_states = 0;
    for (int p = 0; p < n; p++) {
        max_states = panels[p].n_states > max_states ? panels[p].n_states : max_states;
        for (size_t i = 0; i < (size_t)panels[p].n_states * panels[p].dim; i++) {
            double v = panels[p].channel_max[i];
            bool bar = i / (size_t)panels[p].dim == (size_t)state;
            hi = fmax(hi, v);
            bar_hi = bar ? fmax(bar_hi, v) : bar_hi;
            if (v > 0.0) lo = fmin(lo, v);
            if (v > 0.0 && bar) bar_lo = fmin(bar_lo, v);
        }
    }
    if (!(hi > 0.0)) hi = lo = 1.0;
    if (!(bar_hi > 0.0)) bar_hi = bar_lo = 1.0;
    int dec_lo = (int)floor(log10(lo)), dec_hi = (int)ceil(log10(hi));
    if (dec_hi == dec_lo) dec_hi++;
    double step = nice_step(bar_hi, 5);
    double y_min = log_scale ? floor(log10(bar_lo)) : 0.0;
    double y_max = log_scale ? fmax(ceil(log10(bar_hi)), y_min + 1.0) : ceil(bar_hi / step) * step;
    double strips_top = CH_TOP + CH_FRAME_H + 62, W = CH_LEFT + n * CH_PANEL_W + 90;
    double H = strips_top + max_states * CH_STRIP_H + 50;
    AtomicFile af;
    if (!svg_open(&af, path, W, H)) return false;
    FILE *f = af.f;
    fprintf(f, "<text x=\"%.1f\" y=\"26\" text-anchor=\"middle\" font-size=\"16\">%s</text>\n", W / 2, title);
    char label[64], color[16];
    for (int p = 0; p < n; p++) {
        const ChannelPanel *c = &panels[p];
        double left = CH_LEFT + p * CH_PANEL_W, bar_w = (double)CH_FRAME_W / c->dim;
        fprintf(f, "<text x=\"%.1f\" y=\"%d\" text-anchor=\"middle\" font-size=\"14\">%s, %s</text>\n",
                left + CH_FRAME_W / 2.0, CH_TOP - 12, c->label,
                state_label(state, c->n_states, label, sizeof label));
        // y axis: gridlines and labels (each decade on a log scale)
        for (double y = y_min; y <= y_max + 1e-9; y += log_scale ? 1.0 : step) {
            double py = CH_TOP + CH_FRAME_H * (1.0 - (y - y_min) / (y_max - y_min));
            fprintf(f, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#ddd\"/>\n", left, py,
                    left + CH_FRAME_W, py);
            fprintf(f, "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"end\">%g</text>\n", left - 6, py + 4,
                    log_scale ? pow(10.0, y) : y);
        }
        for (int i = 0; i < c->dim; i++) {
            double v = c->channel_max[(size_t)state * c->dim + i];
            double y = log_scale ? log10(fmax(v, pow(10.0, y_min))) : v;
            double h = CH_FRAME_H * (y - y_min) / (y_max - y_min);
            fprintf(f,
                    "<rect class=\"bar\" x=\"%.2f\" y=\"%.2f\" width=\"%.2f\" height=\"%.2f\" "
                    "fill=\"#1f77b4\"/>\n",
                    left + i * bar_w, CH_TOP + CH_FRAME_H - h, bar_w, h);
        }
        fprintf(f, "<rect x=\"%.1f\" y=\"%d\" width=\"%d\" height=\"%d\" fill=\"none\" stroke=\"black\"/>\n",
                left, CH_TOP, CH_FRAME_W, CH_FRAME_H);
        int tick = nice_step(c->dim, 4) > 1 ? (int)nice_step(c->dim, 4) : 1;
        for (int i = 0; i < c->dim; i += tick)
            fprintf(f, "<text x=\"%.1f\" y=\"%d\" text-anchor=\"middle\" font-size=\"11\">%d</text>\n",
                    left + (i + 0.5) * bar_w, CH_TOP + CH_FRAME_H + 14, i);
        fprintf(f, "<text x=\"%.1f\" y=\"%d\" text-anchor=\"middle\">channel</text>\n",
                left + CH_FRAME_W / 2.0, CH_TOP + CH_FRAME_H + 30);
        // strips: one row per hidden state, named at the left; the plotted state marked
        for (int s = 0; s < c->n_states; s++) {
            double y = strips_top + s * CH_STRIP_H;
            for (int i = 0; i < c->dim; i++) {
                double v = c->channel_max[(size_t)s * c->dim + i];
                heat_color(color, sizeof color, v > 0.0 ? (log10(v) - dec_lo) / (dec_hi - dec_lo) : 0.0);
                fprintf(f,
                        "<rect class=\"cell\" x=\"%.2f\" y=\"%.1f\" width=\"%.2f\" height=\"%d\" "
                        "fill=\"%s\"/>\n",
                        left + i * bar_w, y, bar_w, CH_STRIP_H, color);
            }
            fprintf(f, "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"end\" font-size=\"11\"%s>%s</text>\n",
                    left - 6, y + CH_STRIP_H - 3, s == state ? " font-weight=\"bold\"" : "",
                    state_label(s, c->n_states, label, sizeof label));
        }
        fprintf(f,
                "<rect x=\"%.1f\" y=\"%.1f\" width=\"%d\" height=\"%d\" fill=\"none\" stroke=\"black\"/>\n",
                left, strips_top, CH_FRAME_W, c->n_states * CH_STRIP_H);
    }
    fprintf(f,
            "<text transform=\"translate(20 %.1f) rotate(-90)\" text-anchor=\"middle\">largest "
            "|activation|%s</text>\n",
            CH_TOP + CH_FRAME_H / 2.0, log_scale ? " (log scale)" : "");
    fprintf(f,
            "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">largest |activation| per channel at every "
            "hidden "
            "state (colour, log scale)</text>\n",
            W / 2, strips_top - 10);
    // the strips' legend: a colour bar over the decades, at the right
    double lx = CH_LEFT + n * CH_PANEL_W - 30, lh = max_states * CH_STRIP_H;
    for (int k = 0; k < 20; k++) {
        heat_color(color, sizeof color, (k + 0.5) / 20.0);
        fprintf(f, "<rect x=\"%.1f\" y=\"%.1f\" width=\"14\" height=\"%.2f\" fill=\"%s\"/>\n", lx,
                strips_top + lh * (1.0 - (k + 1) / 20.0), lh / 20.0, color);
    }
    for (int d = dec_lo; d <= dec_hi; d++)
        fprintf(f, "<text x=\"%.1f\" y=\"%.1f\" font-size=\"11\">%g</text>\n", lx + 18,
                strips_top + lh * (1.0 - (double)(d - dec_lo) / (dec_hi - dec_lo)) + 4, pow(10.0, d));
    fprintf(f, "</svg>\n");
    return atomic_close(&af);
}

/* ============================================================================
 * Command line
 * ========================================================================== */
#ifndef TESTING

// Dies with same_files_problem's reason, if any.
static void refuse_same_files(int n_out, int n, const char *const *paths, const char *const *roles) {
    const char *problem = same_files_problem(n_out, n, paths, roles);
    if (problem) die("%s", problem);
}

// The files the commands read and write unless told otherwise (make data writes the first three).
#define DEFAULT_TOKENIZER "tokenizer.bin"
#define DEFAULT_TRAIN "data/train.bin"
#define DEFAULT_VAL "data/val.bin"

// Strict number parsing: the whole string must be a number within [lo, hi].
static long parse_int(const char *flag, const char *s, long lo, long hi) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end) die("%s expects an integer, got '%s'", flag, s);
    if (v < lo || v > hi) die("%s must be in [%ld, %ld], got %ld", flag, lo, hi, v);
    return v;
}

static float parse_float(const char *flag, const char *s, double lo, double hi) {
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end || !isfinite(v)) die("%s expects a number, got '%s'", flag, s);
    if (v < lo || v > hi) die("%s must be in [%g, %g], got %g", flag, lo, hi, v);
    return (float)v;
}

static uint64_t parse_u64(const char *flag, const char *s) {
    char *end;
    errno = 0;
    if (*s == '-') die("%s expects a non-negative integer, got '%s'", flag, s);
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || end == s || *end) die("%s expects a non-negative integer, got '%s'", flag, s);
    return (uint64_t)v;
}

// A flag whose range is in bounds[] (shared with the checkpoint loader).
static long parse_bounded_int(const char *flag, const char *s, int b) {
    return parse_int(flag, s, (long)bounds[b].lo, (long)bounds[b].hi);
}
static float parse_bounded_float(const char *flag, const char *s, int b) {
    return parse_float(flag, s, bounds[b].lo, bounds[b].hi);
}

// Argument cursor: flags come as "--name value" pairs, positionals as bare words.
typedef struct { int argc, i; char **argv; const char *command; } Args;

static bool wants_help(int argc, char **argv) {
    for (int i = 0; i < argc; i++) if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) return true;
    return false;
}

static const char *flag_value(Args *a) {
    if (a->i + 1 >= a->argc) die("%s needs a value (see ./osp %s --help)", a->argv[a->i], a->command);
    return a->argv[++a->i];
}

static void unknown_flag(const Args *a) {
    die("unknown argument '%s' for 'osp %s' (see ./osp %s --help)", a->argv[a->i], a->command, a->command);
}

static void load_tokenizer_or_die(Tokenizer *t, const char *path) {
    if (!tokenizer_load(t, path)) die("%s", osp_error);
}

// Index of the preset called name; dies naming the choices if there is none.
static int find_preset(const char *name) {
    for (int p = 0; p < N_PRESETS; p++)
        if (!strcmp(presets[p].name, name)) return p;
    die("unknown preset '%s' (adam, muon-only, muon, muon-ssnorm, muon-embproj, osp)", name);
    return -1;
}

// Consumes one model-shape or batch flag at a->i if it is one; shared by train and bench.
static bool parse_shape_flag(Args *a, TrainState *s) {
    const char *f = a->argv[a->i];
    if (!strcmp(f, "--dim")) s->cfg.dim = (int)parse_bounded_int(f, flag_value(a), B_DIM);
    else if (!strcmp(f, "--layers")) s->cfg.n_layers = (int)parse_bounded_int(f, flag_value(a), B_LAYERS);
    else if (!strcmp(f, "--heads")) s->cfg.n_heads = (int)parse_bounded_int(f, flag_value(a), B_HEADS);
    else if (!strcmp(f, "--kv-heads"))
        s->cfg.n_kv_heads = (int)parse_bounded_int(f, flag_value(a), B_KV_HEADS);
    else if (!strcmp(f, "--ffn-dim")) s->cfg.ffn_dim = (int)parse_bounded_int(f, flag_value(a), B_FFN_DIM);
    else if (!strcmp(f, "--seq-len")) s->cfg.seq_len = (int)parse_bounded_int(f, flag_value(a), B_SEQ_LEN);
    else if (!strcmp(f, "--batch")) s->batch = (int)parse_bounded_int(f, flag_value(a), B_BATCH);
    else return false;
    return true;
}

// Reads a text file and encodes it: returns the ids (*count of them) and the file's size.
static int *encode_text_file(const Tokenizer *t, const char *path, size_t *bytes, int *count) {
    unsigned char *text = read_file(path, bytes);
    if (!text) die("%s", osp_error);
    int *ids = xmalloc(sizeof(int) * (*bytes ? *bytes : 1));
    *count = tokenizer_encode(t, text, *bytes, ids);
    free(text);
    return ids;
}

// ---------------------------------------------------------------- osp tokenizer
static const char *tokenizer_help =
    "usage: ./osp tokenizer --input TEXT [--vocab N] [--out FILE]\n"
    "Trains the byte-fallback BPE tokenizer on a text file and writes it in llama2.c's\n"
    "tokenizer.bin format.\n"
    "  --input FILE   text to train on (required)\n"
    "  --vocab N      vocabulary size, %d..%d (default 512)\n"
    "  --out FILE     output (default " DEFAULT_TOKENIZER ")\n";

static int cmd_tokenizer(int argc, char **argv) {
    Args a = {argc, 0, argv, "tokenizer"};
    const char *input = NULL, *out = DEFAULT_TOKENIZER;
    int vocab = 512;
    for (a.i = 0; a.i < argc; a.i++) {
        const char *f = argv[a.i];
        if (!strcmp(f, "--input")) input = flag_value(&a);
        else if (!strcmp(f, "--vocab"))
            vocab = (int)parse_int(f, flag_value(&a), TOKEN_FIRST_PIECE + 1, VOCAB_MAX);
        else if (!strcmp(f, "--out")) out = flag_value(&a);
        else unknown_flag(&a);
    }
    if (!input) die("--input is required (see ./osp tokenizer --help)");
    refuse_same_files(1, 2, (const char *[]){out, input}, (const char *[]){"--out", "--input"});
    size_t n;
    unsigned char *text = read_file(input, &n);
    if (!text) die("%s", osp_error);
    double t0 = now_seconds();
    Tokenizer t;
    int n_chars = tokenizer_train(&t, text, n, vocab);
    free(text);
    if (!tokenizer_save(&t, out)) die("%s", osp_error);
    int count;
    int *ids = encode_text_file(&t, input, &n, &count);
    printf("wrote %s: %d tokens (%d characters, %d merges); %zu bytes of text -> %d tokens (%.2f "
           "bytes/token) in %.1f s\n",
           out, t.vocab_size, n_chars, t.vocab_size - TOKEN_FIRST_PIECE - n_chars, n, count,
           count ? (double)n / count : 0.0, now_seconds() - t0);
    free(ids);
    tokenizer_free(&t);
    return 0;
}

// ---------------------------------------------------------------- osp prepare
static const char *prepare_help =
    "usage: ./osp prepare --input TEXT [--val-input TEXT] [--tokenizer FILE] [--train FILE]\n"
    "                     [--val FILE]\n"
    "Encodes a text file and writes the first 90%% of its tokens as the training split and\n"
    "the last 10%% as the validation split; with --val-input, all of TEXT is the training split\n"
    "and the second text the validation split (a corpus held out by documents).\n"
    "  --input FILE      text (required)\n"
    "  --val-input FILE  held-out text\n"
    "  --tokenizer FILE  default " DEFAULT_TOKENIZER "\n"
    "  --train FILE      default " DEFAULT_TRAIN "\n"
    "  --val FILE        default " DEFAULT_VAL "\n";

static int cmd_prepare(int argc, char **argv) {
    Args a = {argc, 0, argv, "prepare"};
    const char *input = NULL, *val_input = NULL, *tok_path = DEFAULT_TOKENIZER, *train = DEFAULT_TRAIN,
               *val = DEFAULT_VAL;
    for (a.i = 0; a.i < argc; a.i++) {
        const char *f = argv[a.i];
        if (!strcmp(f, "--input")) input = flag_value(&a);
        else if (!strcmp(f, "--val-input")) val_input = flag_value(&a);
        else if (!strcmp(f, "--tokenizer")) tok_path = flag_value(&a);
        else if (!strcmp(f, "--train")) train = flag_value(&a);
        else if (!strcmp(f, "--val")) val = flag_value(&a);
        else unknown_flag(&a);
    }
    if (!input) die("--input is required (see ./osp prepare --help)");
    refuse_same_files(2, 5, (const char *[]){train, val, input, tok_path, val_input},
                      (const char *[]){"--train", "--val", "--input", "--tokenizer", "--val-input"});
    Tokenizer t;
    load_tokenizer_or_die(&t, tok_path);
    size_t n, n_val = 0;
    int count, count_val = 0;
    int *ids = encode_text_file(&t, input, &n, &count), *val_ids = ids, n_train = count;
    if (val_input) val_ids = encode_text_file(&t, val_input, &n_val, &count_val);
    else {
        n_train = (int)((long long)count * 9 / 10);
        val_ids = ids + n_train;
        count_val = count - n_train;
    }
    if (!val_input && (n_train < 2 || count_val < 2))
        die("'%s' is too short to split (%d tokens)", input, count);
    if (n_train < 2 || count_val < 2)
        die("'%s' is too short (%d tokens)", n_train < 2 ? input : val_input,
            n_train < 2 ? count : count_val);
    if (!tokens_save(train, ids, (size_t)n_train, t.vocab_size)) die("%s", osp_error);
    if (!tokens_save(val, val_ids, (size_t)count_val, t.vocab_size)) {
        remove(train);   // no half-made pair of splits
        die("%s", osp_error);
    }
    if (val_input)
        printf("%s: %zu bytes -> %d tokens (%s); %s: %zu bytes -> %d tokens (%s)\n", input, n, count, train,
               val_input, n_val, count_val, val);
    else
        printf("%s: %zu bytes -> %d tokens; wrote %s (%d tokens) and %s (%d tokens)\n", input, n, count,
               train, n_train, val, count_val);
    if (val_input) free(val_ids);
    free(ids);
    tokenizer_free(&t);
    return 0;
}

// ---------------------------------------------------------------- osp train
static const char *train_help =
    "usage: ./osp train [flags]\n"
    "Trains a Llama on token files made by 'make data'. Prints step, loss, lr, ms/step,\n"
    "tokens/s, GFLOP/s and time left; evaluates and checkpoints every --eval-every steps.\n"
    "recipe (a preset sets --optimizer, --ssnorm, --embproj; later flags override it):\n"
    "  --preset NAME    adam (default) | muon-only | muon | muon-ssnorm | muon-embproj | osp\n"
    "  --optimizer O    adam: AdamW on everything; muon: Muon on the network, AdamW on embedding\n"
    "                   and head; muon-only: Muon on everything\n"
    "  --ssnorm         Single-Scale RMSNorm: one scalar gain per norm\n"
    "  --embproj        learnable projections after the embedding and before the head\n"
    "model (fixed by the checkpoint when resuming, like the recipe):\n"
    "  --dim N          residual width (default 128)\n"
    "  --layers N       blocks (default 4)\n"
    "  --heads N        query heads (default 4)\n"
    "  --kv-heads N     key/value heads, divides --heads (default 4)\n"
    "  --ffn-dim N      SwiGLU hidden width (default 512)\n"
    "  --seq-len N      context length (default 128)\n"
    "optimization (fixed by the checkpoint when resuming, except --steps):\n"
    "  --batch N        sequences per step (default 16)\n"
    "  --steps N        total steps (default 500)\n"
    "  --lr-adam F      peak lr of AdamW-updated tensors (default 3e-3); --lr is the same flag\n"
    "  --lr-muon F      peak lr of Muon-updated tensors (default 1e-2)\n"
    "  --muon-momentum F  Muon's Nesterov momentum (default 0.95)\n"
    "  --ns-steps N     Muon's Newton-Schulz iterations (default 5)\n"
    "  --warmup N       linear warmup steps (default 50, or steps / 10 if that is fewer)\n"
    "  --beta1 F, --beta2 F, --adam-eps F   AdamW's betas and epsilon (default 0.9, 0.95, 1e-8)\n"
    "  --wd F           decoupled weight decay (default 0.01)\n"
    "  --grad-clip F    global gradient-norm clip, 0 = off (default 1.0)\n"
    "  --seed N         initialization and batch-sampling seed (default 1337)\n"
    "run:\n"
    "  --train FILE     training tokens (default " DEFAULT_TRAIN ")\n"
    "  --val FILE       validation tokens (default " DEFAULT_VAL ")\n"
    "  --tokenizer FILE checked against the data's vocab (default " DEFAULT_TOKENIZER ")\n"
    "  --out FILE       checkpoint to write (default model.ckpt; with --resume, the resumed file)\n"
    "  --resume FILE    continue from a checkpoint; the losses match an uninterrupted run\n"
    "                   (unless --steps changes the total, which reshapes the lr schedule)\n"
    "  --eval-every N   validate and checkpoint every N steps, 0 = only at the end (default 100)\n"
    "  --val-windows N  validation windows of seq-len tokens, 0 = all (default 128)\n"
    "  --kurtosis-every N  log excess kurtosis and max |activation| of the hidden states every N\n"
    "                   steps, on a fixed batch (the first --batch validation windows); 0 = off\n"
    "  --kurtosis-csv FILE  also write those measurements as CSV (kept through --resume)\n"
    "  --log-every N    print every N steps (default 10)\n"
    "  --threads N      OpenMP threads, 0 = all cores (default 0)\n";

// The default warmup: 50 steps, or a tenth of a shorter run.
static int default_warmup(int steps) { return steps / 10 < 50 ? steps / 10 : 50; }

// The defaults of ./osp train (and of each run of ./osp ablation); warmup -1 = default_warmup.
static TrainState default_train_state(void) {
    return (TrainState){
        .cfg = {.dim = 128, .n_layers = 4, .n_heads = 4, .n_kv_heads = 4, .ffn_dim = 512, .seq_len = 128},
        .opt = {.optimizer = OPTIMIZER_ADAM, .lr_adam = 3e-3f, .lr_muon = 1e-2f, .weight_decay = 0.01f,
                .beta1 = 0.9f, .beta2 = 0.95f, .eps = 1e-8f, .muon_momentum = 0.95f, .ns_steps = 5,
                .grad_clip = 1.0f, .warmup = -1, .steps = 500},
        .batch = 16, .seed = 1337,
    };
}

// Consumes one optimization flag at a->i if it is one; shared by train and ablation.
static bool parse_optim_flag(Args *a, TrainState *s) {
    const char *f = a->argv[a->i];
    if (!strcmp(f, "--lr") || !strcmp(f, "--lr-adam"))
        s->opt.lr_adam = parse_bounded_float(f, flag_value(a), B_LR);
    else if (!strcmp(f, "--lr-muon")) s->opt.lr_muon = parse_bounded_float(f, flag_value(a), B_LR);
    else if (!strcmp(f, "--muon-momentum"))
        s->opt.muon_momentum = parse_bounded_float(f, flag_value(a), B_MOMENTUM);
    else if (!strcmp(f, "--ns-steps")) s->opt.ns_steps = (int)parse_bounded_int(f, flag_value(a), B_NS_STEPS);
    else if (!strcmp(f, "--warmup")) s->opt.warmup = (int)parse_int(f, flag_value(a), 0, 100000000);
    else if (!strcmp(f, "--beta1")) s->opt.beta1 = parse_float(f, flag_value(a), 0.0, 0.9999);
    else if (!strcmp(f, "--beta2")) s->opt.beta2 = parse_float(f, flag_value(a), 0.0, 0.9999);
    else if (!strcmp(f, "--adam-eps")) s->opt.eps = parse_float(f, flag_value(a), 1e-12, 1.0);
    else if (!strcmp(f, "--wd")) s->opt.weight_decay = parse_bounded_float(f, flag_value(a), B_WD);
    else if (!strcmp(f, "--grad-clip")) s->opt.grad_clip = parse_bounded_float(f, flag_value(a), B_GRAD_CLIP);
    else if (!strcmp(f, "--seed")) s->seed = parse_u64(f, flag_value(a));
    else return false;
    return true;
}

// Loads the training and validation tokens and checks them against the tokenizer.
static void load_training_data(TokenData *train, TokenData *val, const char *train_path, const char *val_path,
                               const Tokenizer *tok, const char *tok_path) {
    if (!tokens_load(train, train_path) || !tokens_load(val, val_path)) die("%s", osp_error);
    const TokenData *data[2] = {train, val};
    const char *paths[2] = {train_path, val_path};
    for (int i = 0; i < 2; i++)
        if (data[i]->vocab_size != tok->vocab_size)
            die("vocab mismatch: %s has %d tokens but %s was made with vocab %d (run 'make data' again)",
                tok_path, tok->vocab_size, paths[i], data[i]->vocab_size);
}

// Checks the settings of a new run (steps set) and the data against its context length.
// quantized: the run measures 4-bit perplexity (the ablation, train's --kurtosis-every).
static void check_run(const TrainState *s, const TokenData *train, const TokenData *val,
                      const char *train_path, const char *val_path, bool quantized) {
    if (s->opt.warmup > s->opt.steps) die("--warmup %d exceeds --steps %d", s->opt.warmup, s->opt.steps);
    const char *problem = config_problem(&s->cfg);
    if (!problem && quantized) problem = hadamard_problem(&s->cfg, false);
    if (problem) die("%s", problem);
    if (train->n < (size_t)s->cfg.seq_len + 1)
        die("'%s' has %zu tokens, fewer than seq-len + 1 = %d", train_path, train->n, s->cfg.seq_len + 1);
    if (val->n < (size_t)s->cfg.seq_len + 1)
        die("'%s' has %zu tokens, fewer than seq-len + 1 = %d", val_path, val->n, s->cfg.seq_len + 1);
}

static int cmd_train(int argc, char **argv) {
    Args a = {argc, 0, argv, "train"};
    TrainState s = default_train_state();
    const char *train_path = DEFAULT_TRAIN, *val_path = DEFAULT_VAL, *tok_path = DEFAULT_TOKENIZER;
    const char *out = NULL, *resume = NULL, *fixed_flag = NULL, *kurtosis_csv = NULL;
    int eval_every = 100, log_every = 10, threads = 0, val_windows = 128, steps = -1, kurtosis_every = 0;
    for (a.i = 0; a.i < argc; a.i++) {
        const char *f = argv[a.i];
        bool fixed = true;   // fixed by the checkpoint when resuming
        if (!strcmp(f, "--preset")) apply_preset(&s.cfg, &s.opt, find_preset(flag_value(&a)));
        else if (!strcmp(f, "--optimizer")) {
            const char *name = flag_value(&a);
            int o = 0;
            while (o < N_OPTIMIZERS && strcmp(optimizer_names[o], name) != 0) o++;
            if (o == N_OPTIMIZERS) die("unknown optimizer '%s' (adam, muon, muon-only)", name);
            s.opt.optimizer = o;
        }
        else if (!strcmp(f, "--ssnorm")) s.cfg.ssnorm = 1;
        else if (!strcmp(f, "--embproj")) s.cfg.embproj = 1;
        else if (parse_shape_flag(&a, &s) || parse_optim_flag(&a, &s)) {}
        else {
            fixed = false;
            if (!strcmp(f, "--steps")) steps = (int)parse_bounded_int(f, flag_value(&a), B_STEPS);
            else if (!strcmp(f, "--train")) train_path = flag_value(&a);
            else if (!strcmp(f, "--val")) val_path = flag_value(&a);
            else if (!strcmp(f, "--tokenizer")) tok_path = flag_value(&a);
            else if (!strcmp(f, "--out")) out = flag_value(&a);
            else if (!strcmp(f, "--resume")) resume = flag_value(&a);
            else if (!strcmp(f, "--eval-every")) eval_every = (int)parse_int(f, flag_value(&a), 0, 100000000);
            else if (!strcmp(f, "--val-windows"))
                val_windows = (int)parse_int(f, flag_value(&a), 0, 100000000);
            else if (!strcmp(f, "--kurtosis-every"))
                kurtosis_every = (int)parse_int(f, flag_value(&a), 0, 100000000);
            else if (!strcmp(f, "--kurtosis-csv")) kurtosis_csv = flag_value(&a);
            else if (!strcmp(f, "--log-every")) log_every = (int)parse_int(f, flag_value(&a), 1, 100000000);
            else if (!strcmp(f, "--threads")) threads = (int)parse_int(f, flag_value(&a), 0, 1024);
            else unknown_flag(&a);
        }
        if (fixed && !fixed_flag) fixed_flag = f;
    }
    set_num_threads(threads);
    if (!out) out = resume ? resume : "model.ckpt";
    if (kurtosis_csv && kurtosis_every == 0) die("--kurtosis-csv needs --kurtosis-every N");
    refuse_same_files(2, 5, (const char *[]){out, kurtosis_csv, train_path, val_path, tok_path},
                      (const char *[]){"--out", "--kurtosis-csv", "--train", "--val", "--tokenizer"});

    Trainer tr = {0};
    if (resume) {
        if (fixed_flag)
            die("%s cannot be combined with --resume: the checkpoint fixes the recipe, model and optimizer "
                "settings",
                fixed_flag);
        if (!trainer_resume(&tr, resume)) die("%s", osp_error);
        if (steps > 0) {
            if (steps < tr.state.step)
                die("--steps %d is less than the %d steps already done in '%s'", steps, tr.state.step,
                    resume);
            tr.state.opt.steps = steps;
        }
    }
    Tokenizer tok;
    load_tokenizer_or_die(&tok, tok_path);
    TokenData train, val;
    load_training_data(&train, &val, train_path, val_path, &tok, tok_path);
    if (!resume) {
        s.cfg.vocab_size = tok.vocab_size;
        s.preset = preset_of(s.opt.optimizer, s.cfg.ssnorm, s.cfg.embproj);
        if (steps > 0) s.opt.steps = steps;
        if (s.opt.warmup < 0) s.opt.warmup = default_warmup(s.opt.steps);
        check_run(&s, &train, &val, train_path, val_path, kurtosis_every > 0);
        trainer_init(&tr, &s);
    } else if (tr.state.cfg.vocab_size != tok.vocab_size) {
        die("vocab mismatch: checkpoint '%s' has vocab %d but %s has %d", resume, tr.state.cfg.vocab_size,
            tok_path, tok.vocab_size);
    } else {
        check_run(&tr.state, &train, &val, train_path, val_path, kurtosis_every > 0);
    }
    tr.train = &train;
    tr.val = &val;
    RunOptions ro = {.out = out, .eval_every = eval_every, .val_windows = val_windows, .log_every = log_every,
                     .kurtosis_every = kurtosis_every, .kurtosis_csv = kurtosis_csv, .log = stdout};
    RunResult res;
    if (tr.state.step == tr.state.opt.steps)
        printf("nothing to do: '%s' has already completed %d of %d steps\n", resume, tr.state.step,
               tr.state.opt.steps);
    else if (!train_run(&tr, &ro, &res)) die("%s", osp_error);
    trainer_free(&tr);
    free(train.tokens); free(val.tokens);
    tokenizer_free(&tok);
    return 0;
}

// ---------------------------------------------------------------- osp sample
static const char *sample_help =
    "usage: ./osp sample CKPT [flags]\n"
    "Generates text from a checkpoint.\n"
    "  --prompt TEXT     text to continue (default: none, start at a new line)\n"
    "  --tokens N        tokens to generate (default 256)\n"
    "  --temperature F   0 = greedy (default 0.8)\n"
    "  --top-p F         nucleus sampling cutoff in (0, 1] (default 0.9)\n"
    "  --seed N          sampling seed (default 1)\n"
    "  --tokenizer FILE  default " DEFAULT_TOKENIZER "\n"
    "  --threads N       OpenMP threads, 0 = all cores (default 0)\n";

static int cmd_sample(int argc, char **argv) {
    Args a = {argc, 0, argv, "sample"};
    const char *ckpt = NULL, *prompt = "", *tok_path = DEFAULT_TOKENIZER;
    int n_tokens = 256, threads = 0;
    float temperature = 0.8f, top_p = 0.9f;
    uint64_t seed = 1;
    for (a.i = 0; a.i < argc; a.i++) {
        const char *f = argv[a.i];
        if (!strcmp(f, "--prompt")) prompt = flag_value(&a);
        else if (!strcmp(f, "--tokens")) n_tokens = (int)parse_int(f, flag_value(&a), 0, 1000000);
        else if (!strcmp(f, "--temperature")) temperature = parse_float(f, flag_value(&a), 0.0, 100.0);
        else if (!strcmp(f, "--top-p")) top_p = parse_float(f, flag_value(&a), 1e-6, 1.0);
        else if (!strcmp(f, "--seed")) seed = parse_u64(f, flag_value(&a));
        else if (!strcmp(f, "--tokenizer")) tok_path = flag_value(&a);
        else if (!strcmp(f, "--threads")) threads = (int)parse_int(f, flag_value(&a), 0, 1024);
        else if (f[0] == '-' || ckpt) unknown_flag(&a);
        else ckpt = f;
    }
    if (!ckpt) die("no checkpoint given (see ./osp sample --help)");
    set_num_threads(threads);
    Tokenizer tok;
    load_tokenizer_or_die(&tok, tok_path);
    TrainState s;
    Model m;
    if (!checkpoint_load(ckpt, &s, &m, 1, NULL)) die("%s", osp_error);
    if (s.cfg.vocab_size != tok.vocab_size)
        die("vocab mismatch: checkpoint '%s' has vocab %d but %s has %d", ckpt, s.cfg.vocab_size, tok_path,
            tok.vocab_size);
    generate(&m, &tok, prompt, n_tokens, temperature, top_p, seed, stdout);
    model_free(&m);
    tokenizer_free(&tok);
    return 0;
}

// ---------------------------------------------------------------- osp merge
static const char *merge_help =
    "usage: ./osp merge IN.ckpt OUT.ckpt\n"
    "Folds EmbProj into the embedding and the head and turns SSNorm scalars into per-channel\n"
    "gains: OUT is a plain Llama with the same outputs (no optimizer state, so it cannot resume).\n";

static int cmd_merge(int argc, char **argv) {
    Args a = {argc, 0, argv, "merge"};
    const char *paths[2] = {NULL, NULL};
    int n = 0;
    for (a.i = 0; a.i < argc; a.i++) {
        if (argv[a.i][0] == '-' || n == 2) unknown_flag(&a);
        paths[n++] = argv[a.i];
    }
    if (n != 2) die("merge needs an input and an output checkpoint (see ./osp merge --help)");
    refuse_same_files(1, 2, (const char *[]){ paths[1], paths[0] },
                      (const char *[]){ "the output", "the input" });
    TrainState s;
    Model in, out;
    if (!checkpoint_load(paths[0], &s, &in, 1, NULL)) die("%s", osp_error);
    model_merge(&out, &in, 1);
    TrainState merged = s;
    merged.cfg = out.cfg;
    merged.merged = 1;
    if (!checkpoint_save(paths[1], &merged, &out, NULL)) die("%s", osp_error);
    printf("merged %s (preset %s%s%s) into %s: a plain Llama, %zu -> %zu parameters\n", paths[0],
           preset_name(s.preset), s.cfg.embproj ? ", EmbProj folded into embed and head" : "",
           s.cfg.ssnorm ? ", SSNorm scalars expanded" : "", paths[1], in.n_params, out.n_params);
    model_free(&in); model_free(&out);
    return 0;
}

// ---------------------------------------------------------------- osp export
static const char *export_help =
    "usage: ./osp export CKPT [--gguf OUT.gguf] [--llama2c OUT.bin] [--hf DIR] [--f16] [--tokenizer FILE]\n"
    "Merges the checkpoint (EmbProj folded into the embedding and head, SSNorm scalars expanded to\n"
    "per-channel gains) and writes the resulting plain Llama for inference runtimes.\n"
    "  --gguf FILE             GGUF v3 for llama.cpp (architecture llama, tokenizer included)\n"
    "  --llama2c FILE          llama2.c's legacy format for run.c (float32; run.c reads the\n"
    "                          tokenizer from tokenizer.bin: ./run FILE -z tokenizer.bin)\n"
    "  --hf DIR                the Hugging Face layout (transformers' LlamaForCausalLM and\n"
    "                          LlamaTokenizer, vLLM): config.json, model.safetensors,\n"
    "                          tokenizer.model (sentencepiece), tokenizer_config.json,\n"
    "                          special_tokens_map.json; DIR is new, empty or an earlier export\n"
    "  --f16                   float16: GGUF's matrices (its norm gains stay float32) and every\n"
    "                          tensor of --hf; default float32\n"
    "  --tokenizer FILE        the tokenizer the model was trained with (default " DEFAULT_TOKENIZER ")\n";

// Dies unless --hf's dir is not there yet, or a directory holding nothing but the exported files
// (an earlier export): transformers and vLLM read other files in preference to these
// (tokenizer.json, model.safetensors.index.json) or beside them (generation_config.json).
static void hf_dir_check(const char *dir) {
    struct stat st;
    if (stat(dir, &st) != 0) return;
    if (!S_ISDIR(st.st_mode)) die("--hf '%s' exists and is not a directory", dir);
    DIR *d = opendir(dir);
    if (!d) die("cannot read directory '%s': %s", dir, strerror(errno));
    for (struct dirent *e; (e = readdir(d));) {
        bool ours = !strcmp(e->d_name, ".") || !strcmp(e->d_name, "..");
        for (int k = 0; k < N_HF_FILES; k++) {   // a file, or one left at its temporary name
            size_t n = strlen(hf_files[k]);
            ours = ours || (!strncmp(e->d_name, hf_files[k], n)
                            && (!e->d_name[n] || !strcmp(e->d_name + n, ".tmp")));
        }
        if (!ours) {
            closedir(d);
            die("--hf '%s' holds '%s', which is not a file of the export: give a new or empty directory",
                dir, e->d_name);
        }
    }
    closedir(d);
}

static int cmd_export(int argc, char **argv) {
    Args a = {argc, 0, argv, "export"};
    const char *ckpt = NULL, *gguf_path = NULL, *llama2c_path = NULL, *hf_dir = NULL;
    const char *tok_path = DEFAULT_TOKENIZER;
    bool f16 = false;
    for (a.i = 0; a.i < argc; a.i++) {
        const char *f = argv[a.i];
        if (!strcmp(f, "--gguf")) gguf_path = flag_value(&a);
        else if (!strcmp(f, "--llama2c")) llama2c_path = flag_value(&a);
        else if (!strcmp(f, "--hf")) hf_dir = flag_value(&a);
        else if (!strcmp(f, "--f16")) f16 = true;
        else if (!strcmp(f, "--tokenizer")) tok_path = flag_value(&a);
        else if (f[0] == '-' || ckpt) unknown_flag(&a);
        else ckpt = f;
    }
    if (!ckpt) die("no checkpoint given (see ./osp export --help)");
    if (!gguf_path && !llama2c_path && !hf_dir)
        die("nothing to write: give --gguf FILE, --llama2c FILE or --hf DIR");
    if (f16 && !gguf_path && !hf_dir)
        die("--f16 applies to --gguf and --hf; the llama2.c format holds float32 only");
    // The outputs (the two files, the directory's files), then the inputs.
    enum { N_OUT = 2 + N_HF_FILES };
    char hf_paths[N_HF_FILES][PATH_MAX];
    const char *paths[N_OUT + 2] = {gguf_path, llama2c_path}, *roles[N_OUT + 2] = {"--gguf", "--llama2c"};
    if (hf_dir && strlen(hf_dir) + 32 > PATH_MAX) die("--hf: path too long");
    for (int k = 0; k < N_HF_FILES; k++) {
        if (hf_dir) hf_path(hf_paths[k], sizeof hf_paths[k], hf_dir, k);
        paths[2 + k] = hf_dir ? hf_paths[k] : NULL;
        roles[2 + k] = "--hf";
    }
    paths[N_OUT] = ckpt; roles[N_OUT] = "the checkpoint";
    paths[N_OUT + 1] = tok_path; roles[N_OUT + 1] = "--tokenizer";
    refuse_same_files(N_OUT, N_OUT + 2, paths, roles);
    if (hf_dir) hf_dir_check(hf_dir);
    Tokenizer tok;
    load_tokenizer_or_die(&tok, tok_path);
    TrainState s;
    Model in, m;
    if (!checkpoint_load(ckpt, &s, &in, 1, NULL)) die("%s", osp_error);
    model_merge(&m, &in, 1);
    const char *outs[3] = {gguf_path, llama2c_path, hf_dir};
    ExportFormat formats[3] = {f16 ? EXPORT_GGUF_F16 : EXPORT_GGUF, EXPORT_LLAMA2C,
                               f16 ? EXPORT_HF_F16 : EXPORT_HF};
    for (int k = 0; k < 3; k++) {
        const char *problem = outs[k] ? export_problem(&m, &tok, formats[k]) : NULL;
        if (problem) die("cannot export '%s' to %s: %s", ckpt, outs[k], problem);
    }
    printf("%s: preset %s, merged%s%s: a plain Llama, %zu parameters\n", ckpt, preset_name(s.preset),
           in.cfg.embproj ? ", EmbProj folded into the embedding and head" : "",
           in.cfg.ssnorm ? ", SSNorm scalars expanded to per-channel gains" : "", m.n_params);
    // All the outputs form one FileBatch, renamed into place once every one is written: an
    // export lands entirely or not at all.
    char name[64];
    snprintf(name, sizeof name, "osp.c %s", preset_name(s.preset));
    int n_tensors = 0;
    bool made_dir = false;
    FileBatch batch = {.n = 0};
    file_batch = &batch;
    bool ok = !hf_dir || make_directory(hf_dir, &made_dir);
    if (ok && gguf_path) ok = export_gguf(gguf_path, &m, &tok, f16, name, &n_tensors);
    if (ok && llama2c_path) ok = export_llama2c(llama2c_path, &m);
    if (ok && hf_dir) ok = export_hf(hf_dir, &m, &tok, f16);
    file_batch = NULL;
    if (ok) ok = batch_commit(&batch);
    else batch_discard(&batch, 0);
    if (!ok) {
        if (made_dir) rmdir(hf_dir);
        die("%s", osp_error);
    }
    if (gguf_path)
        printf("wrote %s: GGUF v3, llama, %s, %d tensors, vocab %d\n", gguf_path,
               f16 ? "F16 matrices" : "F32", n_tensors, tok.vocab_size);
    if (llama2c_path)
        printf("wrote %s: llama2.c legacy (version 0), float32; run it with tokenizer %s\n", llama2c_path,
               tok_path);
    if (hf_dir)
        printf("wrote %s/: Hugging Face Llama, %s safetensors, sentencepiece BPE tokenizer, vocab %d\n",
               hf_dir, f16 ? "float16" : "float32", tok.vocab_size);
    model_free(&in); model_free(&m);
    tokenizer_free(&tok);
    return 0;
}

// ---------------------------------------------------------------- osp eval, osp compare
static const char *eval_flags_help =
    "  --val FILE              validation tokens (default " DEFAULT_VAL ")\n"
    "  --val-windows N         windows of seq-len tokens, 0 = the whole split (default 0)\n"
    "  --wbits N               weight bits of the table, 2..8, 16 = off (default 4)\n"
    "  --abits N               activation bits (default 4)\n"
    "  --kvbits N              KV-cache bits (default 4)\n"
    "  --no-clip-search        weights: plain absmax scale instead of the clip search\n"
    "  --rotate                rotate the residual stream by a random-sign Hadamard first (QuaRot-style)\n"
    "  --gptq                  also the rows with GPTQ weights (with --rotate: QuaRot)\n"
    "  --train FILE            GPTQ's calibration tokens (default " DEFAULT_TRAIN ")\n"
    "  --calib-windows N       GPTQ's calibration windows of seq-len tokens (default 128)\n"
    "  --calib-seed N          seed of their random positions (default 1)\n"
    "  --threads N             OpenMP threads, 0 = all cores (default 0)\n";

static const char *eval_help_head =
    "usage: ./osp eval CKPT [flags]\n"
    "Evaluates a checkpoint on the validation split: full-precision perplexity; for each hidden\n"
    "state (after the embedding, after each block, after the final norm) the excess kurtosis per\n"
    "token, the largest channel's share of the energy and the largest |activation|, with each\n"
    "token fed alone (the paper's measurement) and in context; perplexity under RTN fake\n"
    "quantization of the weights (W), activations (A) and KV cache, without and with the online\n"
    "FFN Hadamard (Had.); with --gptq, also with the weights quantized by GPTQ.\n"
    "  --json                  print one JSON object instead of the tables\n";

static const char *compare_help_head =
    "usage: ./osp compare CKPT [CKPT...] [flags]\n"
    "Runs ./osp eval on each checkpoint and prints the results side by side in one table.\n";

typedef struct { EvalOptions opt; const char *val_path, *train_path; int threads; bool json; } EvalArgs;

// Consumes one eval flag at a->i if it is one; shared by eval and compare.
static bool parse_eval_flag(Args *a, EvalArgs *e) {
    const char *f = a->argv[a->i];
    if (!strcmp(f, "--val")) e->val_path = flag_value(a);
    else if (!strcmp(f, "--val-windows")) e->opt.max_windows = (int)parse_int(f, flag_value(a), 0, 100000000);
    else if (!strcmp(f, "--wbits") || !strcmp(f, "--abits") || !strcmp(f, "--kvbits")) {
        int bits = (int)parse_int(f, flag_value(a), 2, 16);
        if (bits > 8 && bits < 16) die("%s must be 2..8, or 16 for full precision; got %d", f, bits);
        *(f[2] == 'w' ? &e->opt.wbits : f[2] == 'a' ? &e->opt.abits : &e->opt.kvbits) = bits;
    }
    else if (!strcmp(f, "--no-clip-search")) e->opt.clip_search = false;
    else if (!strcmp(f, "--rotate")) e->opt.rotate = true;
    else if (!strcmp(f, "--gptq")) e->opt.gptq = true;
    else if (!strcmp(f, "--train")) e->train_path = flag_value(a);
    else if (!strcmp(f, "--calib-windows"))
        e->opt.calib_windows = (int)parse_int(f, flag_value(a), 1, 100000);
    else if (!strcmp(f, "--calib-seed"))
        e->opt.calib_seed = parse_u64(f, flag_value(a));
    else if (!strcmp(f, "--threads")) e->threads = (int)parse_int(f, flag_value(a), 0, 1024);
    else return false;
    return true;
}

static EvalArgs eval_defaults(void) {
    return (EvalArgs){.opt = {.wbits = 4, .abits = 4, .kvbits = 4, .clip_search = true, .calib_windows = 128,
                              .calib_seed = 1},
                      .val_path = DEFAULT_VAL, .train_path = DEFAULT_TRAIN};
}

// Loads the validation tokens, and the calibration tokens if GPTQ is asked for.
static void load_eval_tokens(const EvalArgs *e, TokenData *val, TokenData *train) {
    if (!tokens_load(val, e->val_path)) die("%s", osp_error);
    *train = (TokenData){0};
    if (e->opt.gptq && !tokens_load(train, e->train_path)) die("%s", osp_error);
}

// Loads a checkpoint for evaluation against the validation tokens and, with --gptq, the
// calibration tokens (checks vocab, length, and the shapes that --rotate needs).
static void load_for_eval(const char *path, TrainState *s, Model *m, const TokenData *val,
                          const TokenData *train, const EvalArgs *e) {
    if (!checkpoint_load(path, s, m, 16, NULL)) die("%s", osp_error);
    const TokenData *data[2] = {val, train};
    const char *names[2] = {e->val_path, e->train_path};
    for (int i = 0; i < (e->opt.gptq ? 2 : 1); i++) {
        if (s->cfg.vocab_size != data[i]->vocab_size)
            die("vocab mismatch: '%s' has vocab %d but %s has %d", path, s->cfg.vocab_size, names[i],
                data[i]->vocab_size);
        if (data[i]->n < (size_t)s->cfg.seq_len + 1)
            die("'%s' has fewer than seq-len + 1 = %d tokens", names[i], s->cfg.seq_len + 1);
    }
    const char *problem = hadamard_problem(&s->cfg, e->opt.rotate);
    if (problem) die("'%s': %s", path, problem);
}

// A row's name in the tables: "W4 only", "A4 only", "KV4 only", "W4A4KV4", and those with GPTQ.
static void bits_label(char *buf, size_t size, int row, const EvalOptions *o) {
    bool gptq = row == QROW_W_GPTQ || row == QROW_WAKV_GPTQ;
    if (row == QROW_WAKV || row == QROW_WAKV_GPTQ)
        snprintf(buf, size, "W%dA%dKV%d%s", o->wbits, o->abits, o->kvbits, gptq ? " GPTQ" : "");
    else if (row == QROW_W || row == QROW_W_GPTQ)
        snprintf(buf, size, "W%d %s", o->wbits, gptq ? "GPTQ" : "only");
    else snprintf(buf, size, "%s%d only", row == QROW_A ? "A" : "KV", row == QROW_A ? o->abits : o->kvbits);
}

// Whether the tables show row: the GPTQ rows only when evaluated.
static bool row_shown(int row, const EvalOptions *o) {
    return o->gptq || (row != QROW_W_GPTQ && row != QROW_WAKV_GPTQ);
}

static void print_eval_text(const char *path, const TrainState *s, const EvalResult *r,
                            const EvalOptions *o) {
    char label[64];
    printf("%s: preset %s%s, dim %d, %d layers, %d steps (%.2fM tokens)\n", path, preset_name(s->preset),
           s->merged ? " (merged)" : "", s->cfg.dim, s->cfg.n_layers, s->step,
           (double)s->step * s->batch * s->cfg.seq_len / 1e6);
    printf("validation: %ld windows x %d tokens%s\n", r->windows, s->cfg.seq_len,
           o->rotate ? "; residual stream rotated (--rotate)" : "");
    printf("full precision: loss %.4f, perplexity %.2f\n\n", r->fp_loss, exp(r->fp_loss));
    const KurtosisReport *k[2] = {&r->paper, &r->context};
    printf("hidden states of %ld tokens: excess kurtosis per token across %d channels, the largest\n"
           "channel's share of the energy, the largest |activation|\n", r->paper.tokens, s->cfg.dim);
    printf("  %-14s %30s | %30s\n", "", "each token alone (the paper's)", "in context");
    printf("  %-14s", "hidden state");
    for (int j = 0; j < 2; j++)
        printf(" %10s %9s %9s%s", "kurtosis", "top ch.", "max |act|", j ? "\n" : " |");
    for (int i = 0; i <= r->paper.n_states; i++) {   // the states, then their means
        bool mean = i == r->paper.n_states;
        if (mean) snprintf(label, sizeof label, "mean");
        else state_label(i, r->paper.n_states, label, sizeof label);
        printf("  %-14s", strcat(label, mean || kurtosis_counts(&r->paper, i) ? "" : " (*)"));
        for (int j = 0; j < 2; j++)
            printf(" %10.3f %8.1f%% %9.2f%s", mean ? k[j]->mean : k[j]->kurtosis[i],
                   100.0 * (mean ? k[j]->top_channel_mean : k[j]->top_channel[i]),
                   mean ? kurtosis_max_abs(k[j]) : k[j]->max_abs[i], j ? "\n" : " |");
    }
    printf("  (*) not in the paper's mean, which follows the release: the embedding, blocks 1..%d and the\n"
           "      final norm's output (%d states); the in-context mean is over all %d\n",
           s->cfg.n_layers - 1, s->cfg.n_layers + 1, s->cfg.n_layers + 2);
    printf("attention sink, in context: the first token's largest |activation| %.1fx the median token's;\n"
           "position 0 receives %.3f of the attention of later positions (the most of any layer)\n\n",
           kurtosis_first_peak_ratio(&r->context), kurtosis_sink(&r->context));
    printf("perplexity under RTN fake quantization (weights per row, symmetric%s; activations per token\n"
           "and KV per head, asymmetric; Had. = online Hadamard on the W2 input)\n",
           o->clip_search ? ", clip search" : ", no clip search");
    if (o->gptq)
        printf("GPTQ rows: the weights quantized by GPTQ on the same grid, calibrated on %d windows of the\n"
               "training split (seed %llu)\n", o->calib_windows, (unsigned long long)o->calib_seed);
    printf("  %-14s %10s %10s\n", "setting", "no Had.", "Had.");
    for (int i = 0; i < N_QUANT_ROWS; i++) {
        if (!row_shown(i, o)) continue;
        bits_label(label, sizeof label, i, o);
        printf("  %-14s %10.2f %10.2f\n", label, exp(r->quant_loss[i][0]), exp(r->quant_loss[i][1]));
    }
    printf("\nevaluation took %.1f s\n", r->seconds);
}

static void print_json_number(double v) {
    if (isfinite(v)) printf("%.6g", v); else printf("null");
}

static void print_eval_json(const char *path, const TrainState *s, const EvalResult *r,
                            const EvalOptions *o) {
    printf("{\"checkpoint\": \"");
    for (const char *p = path; *p; p++) printf(*p == '"' || *p == '\\' ? "\\%c" : "%c", *p);
    printf("\", \"preset\": \"%s\", \"merged\": %s, \"steps\": %d, \"tokens\": %lld, \"windows\": %ld, "
           "\"seq_len\": %d,\n",
           preset_name(s->preset), s->merged ? "true" : "false", s->step,
           (long long)s->step * s->batch * s->cfg.seq_len, r->windows, s->cfg.seq_len);
    printf(" \"rotate\": %s, \"clip_search\": %s, \"gptq\": %s,\n", o->rotate ? "true" : "false",
           o->clip_search ? "true" : "false", o->gptq ? "true" : "false");
    printf(" \"fp_loss\": "); print_json_number(r->fp_loss);
    printf(", \"fp_ppl\": "); print_json_number(exp(r->fp_loss));
    const KurtosisReport *k[2] = {&r->paper, &r->context};
    for (int j = 0; j < 2; j++) {   // keys without a suffix: the paper's measurement (each token alone)
        const char *suffix = j ? "_context" : "";
        printf(",\n \"kurtosis%s\": ", suffix); print_json_number(k[j]->mean);
        printf(", \"top_channel_share%s\": ", suffix); print_json_number(k[j]->top_channel_mean);
        printf(", \"max_abs_activation%s\": ", suffix); print_json_number(kurtosis_max_abs(k[j]));
        if (j) {
            printf(", \"first_peak_ratio_context\": "); print_json_number(kurtosis_first_peak_ratio(k[j]));
            printf(", \"sink_context\": "); print_json_number(kurtosis_sink(k[j]));
        }
        const double *per_state[3] = {k[j]->kurtosis, k[j]->top_channel, k[j]->max_abs};
        const char *names[3] = {"kurtosis", "top_channel_share", "max_abs"};
        for (int q = 0; q < 3; q++) {
            printf(",\n \"%s_per_state%s\": [", names[q], suffix);
            for (int i = 0; i < k[j]->n_states; i++) {
                printf(i ? ", " : "");
                print_json_number(per_state[q][i]);
            }
            printf("]");
        }
    }
    printf(",\n \"bits\": {\"w\": %d, \"a\": %d, \"kv\": %d},\n \"quantized_ppl\": {",
           o->wbits, o->abits, o->kvbits);
    for (int i = 0; i < N_QUANT_ROWS; i++) {
        printf("%s\"%s\": ", i ? ", " : "", quant_row_keys[i].json);
        print_json_number(exp(r->quant_loss[i][0]));
        printf(", \"%s_had\": ", quant_row_keys[i].json);
        print_json_number(exp(r->quant_loss[i][1]));
    }
    printf("},\n \"seconds\": %.3f}\n", r->seconds);
}

static int cmd_eval(int argc, char **argv) {
    Args a = {argc, 0, argv, "eval"};
    EvalArgs e = eval_defaults();
    const char *ckpt = NULL;
    for (a.i = 0; a.i < argc; a.i++) {
        if (parse_eval_flag(&a, &e)) continue;
        if (!strcmp(argv[a.i], "--json")) e.json = true;
        else if (argv[a.i][0] == '-' || ckpt) unknown_flag(&a);
        else ckpt = argv[a.i];
    }
    if (!ckpt) die("no checkpoint given (see ./osp eval --help)");
    set_num_threads(e.threads);
    TokenData val, train;
    load_eval_tokens(&e, &val, &train);
    TrainState s;
    Model m;
    load_for_eval(ckpt, &s, &m, &val, &train, &e);
    EvalResult r;
    evaluate_model(&r, &m, &val, &train, &e.opt);
    (e.json ? print_eval_json : print_eval_text)(ckpt, &s, &r, &e.opt);
    eval_result_free(&r);
    model_free(&m);
    free(val.tokens); free(train.tokens);
    return 0;
}

static int cmd_compare(int argc, char **argv) {
    Args a = {argc, 0, argv, "compare"};
    EvalArgs e = eval_defaults();
    const char **ckpts = xmalloc(sizeof(char *) * (size_t)(argc ? argc : 1));
    int n = 0;
    for (a.i = 0; a.i < argc; a.i++) {
        if (parse_eval_flag(&a, &e)) continue;
        if (argv[a.i][0] == '-') unknown_flag(&a);
        ckpts[n++] = argv[a.i];
    }
    if (n == 0) die("no checkpoint given (see ./osp compare --help)");
    set_num_threads(e.threads);
    TokenData val, train;
    load_eval_tokens(&e, &val, &train);
    TrainState *states = xmalloc(sizeof(TrainState) * (size_t)n);
    EvalResult *results = xmalloc(sizeof(EvalResult) * (size_t)n);
    size_t *state_bytes = xmalloc(sizeof(size_t) * (size_t)n);
    double total = 0.0;
    Model *models = xmalloc(sizeof(Model) * (size_t)n);
    for (int i = 0; i < n; i++) {   // every checkpoint checked before any is evaluated
        load_for_eval(ckpts[i], &states[i], &models[i], &val, &train, &e);
        state_bytes[i] = states[i].merged ? 0 : optimizer_state_bytes(&models[i], states[i].opt.optimizer);
    }
    for (int i = 0; i < n; i++) {
        fprintf(stderr, "evaluating %s (%d of %d)...\n", ckpts[i], i + 1, n);
        evaluate_model(&results[i], &models[i], &val, &train, &e.opt);
        total += results[i].seconds;
        model_free(&models[i]);
    }
    free(models);
    char label[64], cell[96];
    printf("%-26s", "");
    for (int i = 0; i < n; i++) {   // the file name without its directory, as much as fits
        const char *slash = strrchr(ckpts[i], '/');
        printf(" %14.14s", slash ? slash + 1 : ckpts[i]);
    }
    printf("\n%-26s", "preset");
    for (int i = 0; i < n; i++) {
        snprintf(cell, sizeof cell, "%s%s", preset_name(states[i].preset), states[i].merged ? "+merged" : "");
        printf(" %14s", cell);
    }
    printf("\n%-26s", "training tokens");
    for (int i = 0; i < n; i++)
        printf(" %13.2fM", (double)states[i].step * states[i].batch * states[i].cfg.seq_len / 1e6);
    printf("\n%-26s", "optimizer state bytes");
    for (int i = 0; i < n; i++) {
        snprintf(cell, sizeof cell, "%zu", state_bytes[i]);
        printf(" %14s", states[i].merged ? "-" : cell);
    }
    printf("\n%-26s", "val loss");
    for (int i = 0; i < n; i++) printf(" %14.4f", results[i].fp_loss);
    printf("\n%-26s", "val ppl");
    for (int i = 0; i < n; i++) printf(" %14.2f", exp(results[i].fp_loss));
    printf("\n%-26s", "kurtosis (paper's)");
    for (int i = 0; i < n; i++) printf(" %14.3f", results[i].paper.mean);
    printf("\n%-26s", "kurtosis in context");
    for (int i = 0; i < n; i++) printf(" %14.3f", results[i].context.mean);
    printf("\n%-26s", "top channel in context");
    for (int i = 0; i < n; i++) printf(" %13.1f%%", 100.0 * results[i].context.top_channel_mean);
    printf("\n%-26s", "max |activation| in ctx.");
    for (int i = 0; i < n; i++) printf(" %14.2f", kurtosis_max_abs(&results[i].context));
    for (int row = 0; row < N_QUANT_ROWS; row++)
        for (int had = 0; had < 2 && row_shown(row, &e.opt); had++) {
            bits_label(label, sizeof label, row, &e.opt);
            snprintf(cell, sizeof cell, "%s ppl%s", label, had ? " (Had.)" : "");
            printf("\n%-26s", cell);
            for (int i = 0; i < n; i++) printf(" %14.2f", exp(results[i].quant_loss[row][had]));
        }
    printf("\n\n%ld validation windows of %d tokens each; weights %s; %s", results[0].windows,
           states[0].cfg.seq_len, e.opt.clip_search ? "with clip search" : "without clip search",
           e.opt.rotate ? "residual rotated" : "no residual rotation");
    if (e.opt.gptq) printf("; GPTQ calibrated on %d training windows", e.opt.calib_windows);
    printf("; evaluation took %.1f s\n", total);
    for (int i = 0; i < n; i++) eval_result_free(&results[i]);
    free(states); free(results); free(state_bytes); free(ckpts); free(val.tokens); free(train.tokens);
    return 0;
}

// Model FLOPs of one training step and Newton-Schulz FLOPs of one optimizer step, for preset p.
static void preset_flops(const TrainState *proto, int p, double *model_flops, double *ns_flops) {
    TrainState s = *proto;
    apply_preset(&s.cfg, &s.opt, p);
    Model shape;
    model_alloc(&shape, &s.cfg, 1);
    *model_flops = model_flops_per_step(&shape, s.batch, s.cfg.seq_len);
    *ns_flops = newton_schulz_flops(&shape, &s.opt);
    model_free(&shape);
}

// ---------------------------------------------------------------- osp plot-activations
static const char *plot_help =
    "usage: ./osp plot-activations CKPT [CKPT...] [flags]\n"
    "Draws, for each checkpoint side by side on one scale, the largest |activation| of each\n"
    "channel of the residual stream over the validation tokens (in context): bars at one hidden\n"
    "state, and a colour strip for every hidden state (after the embedding, each block, the\n"
    "final norm). Outlier channels stand out as tall bars and dark columns.\n"
    "  --out FILE          the SVG to write (default activations.svg)\n"
    "  --state N           hidden state of the bars: 0 = embedding, 1..L = blocks, L+1 = final\n"
    "                      norm (default: where the first checkpoint's kurtosis is largest)\n"
    "  --log               bars on a log scale\n"
    "  --val FILE          validation tokens (default " DEFAULT_VAL ")\n"
    "  --val-windows N     windows of seq-len tokens, 0 = the whole split (default 0)\n"
    "  --threads N         OpenMP threads, 0 = all cores (default 0)\n";

// Writes the activation picture of checkpoints ckpts[n] to out (state -1: the hidden state
// where the first checkpoint's in-context kurtosis is largest).
static void plot_activations(const char *const *ckpts, int n, const EvalArgs *e, const TokenData *val,
                             int state, bool log_scale, const char *out) {
    KurtosisReport *reports = xmalloc(sizeof(KurtosisReport) * (size_t)n);
    ChannelPanel *panels = xmalloc(sizeof(ChannelPanel) * (size_t)n);
    char (*labels)[96] = xmalloc(sizeof *labels * (size_t)n);
    long tokens = 0;
    for (int i = 0; i < n; i++) {
        TrainState s;
        Model m, merged;
        load_for_eval(ckpts[i], &s, &m, val, NULL, e);
        if (state >= s.cfg.n_layers + 2)
            die("--state %d: '%s' has hidden states 0..%d", state, ckpts[i], s.cfg.n_layers + 1);
        model_merge(&merged, &m, m.max_batch);
        measure_hidden_states(&merged, val, e->opt.max_windows, NULL, &reports[i]);
        tokens = reports[i].tokens;
        if (state < 0)
            for (int k = state = 0; k < reports[i].n_states; k++)
                if (reports[i].kurtosis[k] > reports[i].kurtosis[state]) state = k;
        const char *slash = strrchr(ckpts[i], '/');
        snprintf(labels[i], sizeof labels[i], "%s (%s)", slash ? slash + 1 : ckpts[i], preset_name(s.preset));
        panels[i] = (ChannelPanel){labels[i], reports[i].n_states, reports[i].dim, reports[i].channel_max};
        model_free(&m); model_free(&merged);
    }
    char title[160];
    snprintf(title, sizeof title,
             "Largest |activation| per channel of the residual stream, %ld validation tokens", tokens);
    if (!write_svg_channels(out, title, panels, n, state, log_scale)) die("%s", osp_error);
    for (int i = 0; i < n; i++) kurtosis_free(&reports[i]);
    free(reports); free(panels); free(labels);
}

static int cmd_plot_activations(int argc, char **argv) {
    Args a = {argc, 0, argv, "plot-activations"};
    EvalArgs e = eval_defaults();
    const char **ckpts = xmalloc(sizeof(char *) * (size_t)(argc ? argc : 1)), *out = "activations.svg";
    int n = 0, state = -1;
    bool log_scale = false;
    for (a.i = 0; a.i < argc; a.i++) {
        const char *f = argv[a.i];
        if (!strcmp(f, "--out")) out = flag_value(&a);
        else if (!strcmp(f, "--state")) state = (int)parse_int(f, flag_value(&a), 0, 100000);
        else if (!strcmp(f, "--log")) log_scale = true;
        else if (!strcmp(f, "--val")) e.val_path = flag_value(&a);
        else if (!strcmp(f, "--val-windows"))
            e.opt.max_windows = (int)parse_int(f, flag_value(&a), 0, 100000000);
        else if (!strcmp(f, "--threads")) e.threads = (int)parse_int(f, flag_value(&a), 0, 1024);
        else if (f[0] == '-') unknown_flag(&a);
        else ckpts[n++] = f;
    }
    if (n == 0) die("no checkpoint given (see ./osp plot-activations --help)");
    const char **paths = xmalloc(sizeof(char *) * (size_t)(n + 2));
    const char **roles = xmalloc(sizeof(char *) * (size_t)(n + 2));
    paths[0] = out, roles[0] = "--out";
    paths[1] = e.val_path, roles[1] = "--val";
    for (int i = 0; i < n; i++) paths[2 + i] = ckpts[i], roles[2 + i] = "a checkpoint";
    refuse_same_files(1, n + 2, paths, roles);
    free(paths); free(roles);
    set_num_threads(e.threads);
    TokenData val;
    if (!tokens_load(&val, e.val_path)) die("%s", osp_error);
    plot_activations(ckpts, n, &e, &val, state, log_scale, out);
    printf("wrote %s\n", out);
    free(ckpts); free(val.tokens);
    return 0;
}

// ---------------------------------------------------------------- osp ablation
static const char *ablation_help =
    "usage: ./osp ablation [flags]\n"
    "The paper's ablation on a laptop: trains the six presets (adam, muon-only, muon, muon-ssnorm,\n"
    "muon-embproj, osp) on the same data and token budget for each seed, evaluates each run,\n"
    "prints the paper-style table beside the paper's numbers, and writes to --dir:\n"
    "  PRESET-sSEED.ckpt, .log, .kurtosis.csv   each run's checkpoint, training log, kurtosis\n"
    "  results.csv     one row per run: tokens/s, optimizer state, kurtosis, fp and 4-bit ppl\n"
    "  kurtosis.csv    kurtosis over training of every run, in one file\n"
    "  kurtosis.svg    the paper's kurtosis over training, log scale, one line per preset (seed mean)\n"
    "  w4a4kv4.svg, w4a4kv4-had.svg   the W4A4KV4 RTN perplexity increase over training, without\n"
    "                  and with the FFN Hadamard, likewise\n"
    "  activations.svg the largest |activation| per channel, adam and osp of the first seed, as\n"
    "                  ./osp plot-activations draws it\n"
    "  table.txt       the printed table\n"
    "Run it again with the same flags after an interruption: finished runs are skipped and an\n"
    "unfinished one resumes from its last checkpoint (every --kurtosis-every steps).\n"
    "  --dir DIR          output directory (default runs/ablation)\n"
    "  --seeds N          seeds per preset: --seed, --seed + 1, ... (default 2)\n"
    "  --presets LIST     comma-separated presets to train now (default: all six); the others\n"
    "                     keep what results.csv holds, so a long ablation can run in parts\n"
    "  --seed N           first seed (default 1337)\n"
    "  --steps N          steps per run (default 1000)\n"
    "  --lr-adam F        AdamW's lr: every tensor under adam, embedding and head otherwise\n"
    "                     (default 1e-2)\n"
    "  --lr-muon F        Muon's lr (default 1e-2)\n"
    "  --kurtosis-every N measure kurtosis and checkpoint every N steps (default 100)\n"
    "  --eval-windows N   validation windows of the final evaluation, 0 = all (default 0)\n"
    "  --threads N        OpenMP threads, 0 = all cores (default 0)\n"
    "  --train, --val, --tokenizer FILE   as for ./osp train\n"
    "  other model, batch and optimization flags as for ./osp train (same defaults):\n"
    "  --dim --ffn-dim --layers --heads --kv-heads --seq-len --batch --warmup --wd --grad-clip\n"
    "  --beta1 --beta2 --adam-eps --muon-momentum --ns-steps\n";

// The paper's ablation table, in presets[] order: excess kurtosis and 4-4-4
// perplexity without and with the FFN Hadamard, 1.4B parameters after 100B tokens.
static const struct { double kurtosis, ppl_444, ppl_444_had; } paper_ablation[N_PRESETS] = {
    {1818.56, 8e4, 3e4}, {361.35, 8e5, 24.8}, {1575.12, 1e4, 15.8},
    {66.69, 44.2, 34.1}, {703.23, 114.6, 22.3}, {0.04, 19.6, 13.5},
};

// dir/PRESET-sSEED<suffix>: where a run keeps its checkpoint, log and kurtosis CSV.
static void ablation_path(char *buf, size_t size, const char *dir, const AblationRun *r, const char *suffix) {
    if (snprintf(buf, size, "%s/%s-s%llu%s", dir, presets[r->preset].name, (unsigned long long)r->seed,
                 suffix) >= (int)size)
        die("path too long in '%s'", dir);
}

// Starts a progress line about run i, numbered among the chosen runs:
// "run  3/12 muon         seed 1337  | ".
static void print_run_prefix(const AblationRun *runs, int n_runs, int i) {
    int k = 0, n = 0;
    for (int j = 0; j < n_runs; j++) {
        n += runs[j].chosen;
        k += runs[j].chosen && j <= i;
    }
    printf("run %2d/%d %-12s seed %-5llu | ", k, n, presets[runs[i].preset].name,
           (unsigned long long)runs[i].seed);
}

// Evaluates a finished run as ./osp eval does and records the results; returns the seconds taken.
static double ablation_evaluate(AblationRun *r, const Model *m, const TokenData *val, const TokenData *train,
                                const EvalOptions *o) {
    EvalResult er;
    evaluate_model(&er, m, val, train, o);
    r->evaluated = true;
    r->windows = (double)er.windows;
    r->kurtosis = er.context.mean;
    r->kurtosis_paper = er.paper.mean;
    r->top_channel = er.context.top_channel_mean;
    r->max_abs = kurtosis_max_abs(&er.context);
    r->fp_ppl = exp(er.fp_loss);
    for (int q = 0; q < N_QUANT_ROWS; q++)
        for (int had = 0; had < 2; had++) r->quant_ppl[q][had] = exp(er.quant_loss[q][had]);
    eval_result_free(&er);
    return er.seconds;
}

// Dies if a checkpoint found in the ablation directory was trained with other settings.
static void ablation_check_settings(const char *path, const TrainState *have, const TrainState *want) {
    const char *what = memcmp(&have->cfg, &want->cfg, sizeof(Config)) ? "model shape"
                     : have->opt.steps != want->opt.steps ? "--steps"
                     : have->opt.lr_adam != want->opt.lr_adam ? "--lr-adam"
                     : have->opt.lr_muon != want->opt.lr_muon ? "--lr-muon"
                     : have->batch != want->batch ? "--batch"
                     : memcmp(&have->opt, &want->opt, sizeof(OptimConfig)) ? "optimization settings"
                     : have->preset != want->preset || have->seed != want->seed ? "preset or seed" : NULL;
    if (what)
        die("'%s' was trained with other settings (%s) than asked now; use another --dir or delete the old "
            "runs",
            path, what);
}

// Live progress: which run, its step and loss, and the time left for it and for all runs.
typedef struct {
    int run, n_runs;                 // run: 0-based index of the one training now
    const AblationRun *runs;
    const double *step_flops;        // [N_PRESETS] FLOPs of one training step
    int *steps_left;                 // [n_runs] steps still to train
    bool *eval_left;                 // [n_runs] evaluation still to do
    double eval_flops, eval_seconds; // one evaluation: its FLOPs (estimate), its time once measured
} AblationProgress;

static void ablation_on_log(void *ctx, const TrainState *s, float loss, double seconds_per_step) {
    AblationProgress *p = ctx;
    int preset = p->runs[p->run].preset;
    p->steps_left[p->run] = s->opt.steps - s->step;
    double seconds_per_flop = seconds_per_step / p->step_flops[preset], all = 0.0;
    for (int i = p->run; i < p->n_runs; i++) {
        all += p->steps_left[i] * p->step_flops[p->runs[i].preset] * seconds_per_flop;
        if (p->eval_left[i]) all += p->eval_seconds > 0 ? p->eval_seconds : p->eval_flops * seconds_per_flop;
    }
    char run_left[32], all_left[32];
    print_run_prefix(p->runs, p->n_runs, p->run);
    printf("step %5d/%d | loss %.4f | %6.0f tok/s | run left %s | all left %s\n", s->step, s->opt.steps, loss,
           s->batch * s->cfg.seq_len / seconds_per_step,
           format_duration(seconds_per_step * (s->opt.steps - s->step), run_left, sizeof run_left),
           format_duration(all, all_left, sizeof all_left));
    fflush(stdout);
}

// The table's columns. Quantized ones name a row of quant_ppl; their increases are percent
// over full precision. The first table shows the columns up to COL_TOKENS_PER_S, the second
// the increases of the quantized ones. "+GPTQ" is 4-4-4 with the Hadamard and GPTQ weights.
enum { COL_KURTOSIS_PAPER, COL_KURTOSIS, COL_TOP_CHANNEL, COL_MAX_ABS, COL_FP, COL_444, COL_444_HAD,
       COL_444_GPTQ, COL_TOKENS_PER_S, COL_W4, COL_A4, COL_KV4, N_COLS };
static const struct { const char *name; int width, decimals, quant_row, had;
} ablation_cols[N_COLS] = {
    [COL_KURTOSIS_PAPER] = { "kurtosis", 14, 2, -1, 0 },
    [COL_KURTOSIS] = { "in context", 13, 3, -1, 0 },
    [COL_TOP_CHANNEL] = { "top ch. %", 11, 1, -1, 0 },
    [COL_MAX_ABS] = { "max |act|", 13, 1, -1, 0 },
    [COL_FP] = { "fp ppl", 13, 2, -1, 0 },
    [COL_444] = { "4-4-4 ppl", 13, 2, QROW_WAKV, 0 },
    [COL_444_HAD] = { "+Had. ppl", 13, 2, QROW_WAKV, 1 },
    [COL_444_GPTQ] = { "+GPTQ ppl", 13, 2, QROW_WAKV_GPTQ, 1 },
    [COL_TOKENS_PER_S] = { "tok/s", 11, 0, -1, 0 },
    [COL_W4] = { "W4", 13, 2, QROW_W, 0 },
    [COL_A4] = { "A4", 13, 2, QROW_A, 0 },
    [COL_KV4] = { "KV4", 13, 2, QROW_KV, 0 },
};
static const int increase_cols[] = {COL_W4, COL_A4, COL_KV4, COL_444, COL_444_HAD, COL_444_GPTQ};

static double ablation_value(const AblationRun *r, int col, bool increase) {
    int q = ablation_cols[col].quant_row;
    if (q >= 0)
        return increase ? 100.0 * (r->quant_ppl[q][ablation_cols[col].had] / r->fp_ppl - 1.0)
                        : r->quant_ppl[q][ablation_cols[col].had];
    switch (col) {
    case COL_KURTOSIS_PAPER: return r->kurtosis_paper;
    case COL_KURTOSIS: return r->kurtosis;
    case COL_TOP_CHANNEL: return 100.0 * r->top_channel;
    case COL_MAX_ABS: return r->max_abs;
    case COL_FP: return r->fp_ppl;
    default: return r->tokens_per_second;
    }
}

// Mean, lowest and highest of one column over a preset's evaluated runs with a finite value;
// returns how many there are (the mean is NAN if none).
static int preset_stats(const AblationRun *runs, int n_runs, int preset, int col, bool increase,
                        double *mean, double *lo, double *hi) {
    double sum = 0.0;
    int n = 0;
    *lo = INFINITY; *hi = -INFINITY;
    for (int i = 0; i < n_runs; i++) {
        if (runs[i].preset != preset || !runs[i].evaluated) continue;
        double v = ablation_value(&runs[i], col, increase);
        if (!isfinite(v)) continue;
        *lo = fmin(*lo, v); *hi = fmax(*hi, v); sum += v; n++;
    }
    *mean = n ? sum / n : NAN;
    return n;
}

// Prints "mean ±half-range" of one column over a preset's evaluated runs (one seed: the value).
static void print_spread(FILE *f, const AblationRun *runs, int n_runs, int preset, int col, bool increase,
                         int width, int decimals) {
    double mean, lo, hi;
    int n = preset_stats(runs, n_runs, preset, col, increase, &mean, &lo, &hi);
    char cell[64];
    if (n == 0) snprintf(cell, sizeof cell, "-");
    else if (n == 1) snprintf(cell, sizeof cell, "%.*f", decimals, mean);
    else snprintf(cell, sizeof cell, "%.*f ±%.*f", decimals, mean, decimals, (hi - lo) / 2);
    fprintf(f, " %*s", width + (n > 1 ? 1 : 0), cell);   // "±" is two bytes in UTF-8, one column
}

// The mean of one column over a preset's evaluated runs (NAN if none).
static double preset_mean(const AblationRun *runs, int n_runs, int preset, int col, bool increase) {
    double mean, lo, hi;
    preset_stats(runs, n_runs, preset, col, increase, &mean, &lo, &hi);
    return mean;
}

// Whether any run of preset p has been evaluated or has diverged (its row has something to show).
static bool preset_has_results(const AblationRun *runs, int n_runs, int p) {
    for (int i = 0; i < n_runs; i++)
        if (runs[i].preset == p && (runs[i].evaluated || runs[i].diverged_step)) return true;
    return false;
}

// The paper-style table: a row per preset, this run's numbers beside the paper's; then the
// 4-bit perplexity increases over full precision.
static void print_ablation_table(FILE *f, const AblationRun *runs, int n_runs, const TrainState *proto,
                                 int n_seeds) {
    size_t tokens = (size_t)proto->opt.steps * proto->batch * proto->cfg.seq_len;
    double windows = 0;
    for (int i = 0; i < n_runs; i++) if (runs[i].evaluated) windows = runs[i].windows;
    fprintf(f, "ablation: %d seed%s per preset, %d steps x %d tokens = %.2fM tokens each;\n"
               "dim %d, %d layers, ffn %d, seq %d; lr adam %g, lr muon %g; perplexity on %.0f validation\n"
               "windows. Cells: mean ±half the range over seeds. kurtosis: each token fed alone, mean over\n"
               "the embedding, blocks 1..L-1 and the final norm (the paper's measurement); in context:\n"
               "tokens in their windows, all L + 2 states; top ch. %%: the largest channel's share of the\n"
               "energy, in context.\n\n",
           n_seeds, n_seeds == 1 ? "" : "s", proto->opt.steps, proto->batch * proto->cfg.seq_len,
           tokens / 1e6, proto->cfg.dim, proto->cfg.n_layers, proto->cfg.ffn_dim, proto->cfg.seq_len,
           proto->opt.lr_adam, proto->opt.lr_muon, windows);
    fprintf(f, "%-13s", "");
    for (int c = 0; c <= COL_TOKENS_PER_S; c++)
        fprintf(f, " %*s", ablation_cols[c].width, c == COL_KURTOSIS ? "kurtosis" : "");
    fprintf(f, " %9s | %9s %9s %9s\n%-13s", "", "paper", "paper", "paper", "preset");
    for (int c = 0; c <= COL_TOKENS_PER_S; c++)
        fprintf(f, " %*s", ablation_cols[c].width, ablation_cols[c].name);
    fprintf(f, " %9s | %9s %9s %9s\n", "state MB", "kurtosis", "4-4-4 ppl", "+Had. ppl");
    for (int p = 0; p < N_PRESETS; p++) {
        if (!preset_has_results(runs, n_runs, p)) continue;
        fprintf(f, "%-13s", presets[p].name);
        for (int c = 0; c <= COL_TOKENS_PER_S; c++)
            print_spread(f, runs, n_runs, p, c, false, ablation_cols[c].width, ablation_cols[c].decimals);
        double bytes = NAN;
        int diverged = 0;
        for (int i = 0; i < n_runs; i++)
            if (runs[i].preset == p) {
                bytes = runs[i].state_bytes;
                if (runs[i].diverged_step) diverged = runs[i].diverged_step;
            }
        char ppl[2][32];   // the paper's perplexities run from 13.5 to 8e5
        for (int had = 0; had < 2; had++) {
            double v = had ? paper_ablation[p].ppl_444_had : paper_ablation[p].ppl_444;
            snprintf(ppl[had], sizeof ppl[had], v < 1e3 ? "%.1f" : "%.0e", v);
        }
        fprintf(f, " %9.2f | %9.2f %9s %9s", bytes / 1e6, paper_ablation[p].kurtosis, ppl[0], ppl[1]);
        if (diverged) fprintf(f, "  (a seed diverged at step %d)", diverged);
        fprintf(f, "\n");
    }
    int n_increases = (int)(sizeof increase_cols / sizeof increase_cols[0]);
    fprintf(f, "\nperplexity increase over full precision, %% (mean ±half the range over seeds)\n%-13s",
            "preset");
    for (int c = 0; c < n_increases; c++) fprintf(f, " %13s", ablation_cols[increase_cols[c]].name);
    fprintf(f, "\n");
    for (int p = 0; p < N_PRESETS; p++) {
        if (!preset_has_results(runs, n_runs, p)) continue;
        fprintf(f, "%-13s", presets[p].name);
        for (int c = 0; c < n_increases; c++) print_spread(f, runs, n_runs, p, increase_cols[c], true, 13, 1);
        fprintf(f, "\n");
    }
    ClaimFigures fig[2];
    for (int m = 0; m < 2; m++) {
        int p = find_preset(m ? "osp" : "adam");
        fig[m] = (ClaimFigures){preset_mean(runs, n_runs, p, COL_KURTOSIS_PAPER, false),
                                preset_mean(runs, n_runs, p, COL_FP, false),
                                preset_mean(runs, n_runs, p, COL_444, false),
                                preset_mean(runs, n_runs, p, COL_444_HAD, false)};
    }
    if (!isnan(fig[0].fp_ppl) && !isnan(fig[1].fp_ppl)) print_paper_claims(f, fig[0], fig[1], proto->cfg.dim);
}

// Creates a directory and its parents (mkdir -p).
static void make_directories(const char *dir) {
    char path[4096];
    if (snprintf(path, sizeof path, "%s", dir) >= (int)sizeof path) die("path too long: '%s'", dir);
    for (char *p = path + 1; ; p++) {
        if (*p != '/' && *p != '\0') continue;
        char c = *p;
        *p = '\0';
        if (mkdir(path, 0777) != 0 && errno != EEXIST)
            die("cannot create directory '%s': %s", path, strerror(errno));
        if (c == '\0') break;
        *p = c;
    }
}

// Joins every run's kurtosis CSV into dir/kurtosis.csv and plots the mean over seeds of each
// preset in dir/kurtosis.svg.
static void ablation_write_curves(const char *dir, const AblationRun *runs, int n_runs,
                                  const TrainState *proto) {
    char path[4200];
    int n_states = proto->cfg.n_layers + 2;
    size_t tokens_per_step = (size_t)proto->batch * proto->cfg.seq_len;
    KurtosisLog *logs = xcalloc((size_t)n_runs, sizeof(KurtosisLog));
    for (int i = 0; i < n_runs; i++) {
        logs[i].n_states = n_states;
        ablation_path(path, sizeof path, dir, &runs[i], ".kurtosis.csv");
        if (!kurtosis_log_load(&logs[i], path, INT_MAX)) die("%s", osp_error);
    }
    snprintf(path, sizeof path, "%s/kurtosis.csv", dir);
    AtomicFile af;
    if (!atomic_open(&af, path)) die("%s", osp_error);
    for (int i = 0; i < n_runs; i++) {
        char prefix[64];
        snprintf(prefix, sizeof prefix, "%s,%llu,", presets[runs[i].preset].name,
                 (unsigned long long)runs[i].seed);
        kurtosis_log_write(af.f, &logs[i], i == 0, "preset,seed,", prefix, tokens_per_step);
    }
    if (!atomic_close(&af)) die("%s", osp_error);
    // Three pictures of column `column` of the logs over training, one line per preset: at each
    // step every seed has measured, the mean of the seeds (y scaled by `scale`).
    const struct { const char *file, *title, *y_label; int column; double scale, floor; } plots[3] = {
        {"kurtosis.svg", "Excess kurtosis of the residual stream (each token alone",
         "excess kurtosis (log scale)", LOG_KURTOSIS_PAPER, 1.0, 1e-3},
        {"w4a4kv4.svg", "W4A4KV4 RTN perplexity increase (no Hadamard",
         "perplexity increase, % (log scale)", LOG_W4A4KV4, 100.0, 0.1},
        {"w4a4kv4-had.svg", "W4A4KV4 RTN perplexity increase (FFN Hadamard",
         "perplexity increase, % (log scale)", LOG_W4A4KV4_HAD, 100.0, 0.1}};
    PlotLine lines[N_PRESETS];
    double *xy = xcalloc((size_t)2 * N_PRESETS * (proto->opt.steps + 2), sizeof(double));
    for (int k = 0; k < 3; k++) {
        int n_lines = 0;
        for (int p = 0; p < N_PRESETS; p++) {
            double *x = xy + (size_t)2 * n_lines * (proto->opt.steps + 2), *y = x + proto->opt.steps + 2;
            int n = 0, first = -1, n_seeds = 0;
            for (int i = 0; i < n_runs; i++)
                if (runs[i].preset == p) { n_seeds++; if (first < 0) first = i; }
            for (int r = 0; first >= 0 && r < logs[first].n && n < proto->opt.steps + 2; r++) {
                int step = logs[first].step[r], seeds = 0;
                double sum = 0.0;
                for (int i = 0; i < n_runs; i++) {
                    if (runs[i].preset != p) continue;
                    for (int j = 0; j < logs[i].n; j++)
                        if (logs[i].step[j] == step) {
                            sum += logs[i].values[(size_t)j * kurtosis_log_cols(&logs[i]) + plots[k].column];
                            seeds++;
                            break;
                        }
                }
                if (seeds < n_seeds) continue;
                x[n] = step * (double)tokens_per_step / 1e6;
                y[n++] = plots[k].scale * sum / seeds;
            }
            if (n > 0) lines[n_lines++] = (PlotLine){presets[p].name, n, x, y};
        }
        char title[160];
        int seeds = n_runs / N_PRESETS;
        snprintf(path, sizeof path, "%s/%s", dir, plots[k].file);
        snprintf(title, sizeof title, "%s, mean of %d seed%s)", plots[k].title, seeds, seeds == 1 ? "" : "s");
        if (!write_svg_plot(path, title, "training tokens (millions)", plots[k].y_label, lines, n_lines,
                            plots[k].floor))
            die("%s", osp_error);
    }
    free(xy);
    for (int i = 0; i < n_runs; i++) kurtosis_log_free(&logs[i]);
    free(logs);
}

static int cmd_ablation(int argc, char **argv) {
    Args a = {argc, 0, argv, "ablation"};
    // The laptop configuration chosen by measurement (README, "Reproduction"): ./osp train's
    // model, trained longer at a learning rate where Adam grows outliers.
    TrainState proto = default_train_state();
    proto.opt.steps = 1000;
    proto.opt.lr_adam = 1e-2f;
    const char *dir = "runs/ablation", *train_path = DEFAULT_TRAIN, *val_path = DEFAULT_VAL,
               *tok_path = DEFAULT_TOKENIZER;
    int n_seeds = 2, kurtosis_every = 100, threads = 0;
    bool chosen[N_PRESETS];
    for (int p = 0; p < N_PRESETS; p++) chosen[p] = true;
    EvalOptions eopt = eval_defaults().opt;   // as ./osp eval --gptq
    eopt.gptq = true;
    for (a.i = 0; a.i < argc; a.i++) {
        const char *f = argv[a.i];
        if (parse_shape_flag(&a, &proto) || parse_optim_flag(&a, &proto)) {}
        else if (!strcmp(f, "--dir")) dir = flag_value(&a);
        else if (!strcmp(f, "--seeds")) n_seeds = (int)parse_int(f, flag_value(&a), 1, 100);
        else if (!strcmp(f, "--presets")) {
            char list[256];
            if (snprintf(list, sizeof list, "%s", flag_value(&a)) >= (int)sizeof list)
                die("--presets: too long");
            for (int p = 0; p < N_PRESETS; p++) chosen[p] = false;
            for (char *name = strtok(list, ","); name; name = strtok(NULL, ","))
                chosen[find_preset(name)] = true;
        }
        else if (!strcmp(f, "--steps")) proto.opt.steps = (int)parse_bounded_int(f, flag_value(&a), B_STEPS);
        else if (!strcmp(f, "--kurtosis-every"))
            kurtosis_every = (int)parse_int(f, flag_value(&a), 1, 100000000);
        else if (!strcmp(f, "--eval-windows"))
            eopt.max_windows = (int)parse_int(f, flag_value(&a), 0, 100000000);
        else if (!strcmp(f, "--train")) train_path = flag_value(&a);
        else if (!strcmp(f, "--val")) val_path = flag_value(&a);
        else if (!strcmp(f, "--tokenizer")) tok_path = flag_value(&a);
        else if (!strcmp(f, "--threads")) threads = (int)parse_int(f, flag_value(&a), 0, 1024);
        else unknown_flag(&a);
    }
    set_num_threads(threads);
    Tokenizer tok;
    load_tokenizer_or_die(&tok, tok_path);
    TokenData train, val;
    load_training_data(&train, &val, train_path, val_path, &tok, tok_path);
    proto.cfg.vocab_size = tok.vocab_size;
    if (proto.opt.warmup < 0) proto.opt.warmup = default_warmup(proto.opt.steps);
    check_run(&proto, &train, &val, train_path, val_path, true);
    make_directories(dir);

    int n_runs = n_seeds * N_PRESETS;
    AblationRun *runs = xcalloc((size_t)n_runs, sizeof(AblationRun));
    int *steps_left = xcalloc((size_t)n_runs, sizeof(int));
    bool *eval_left = xcalloc((size_t)n_runs, sizeof(bool));
    double step_flops[N_PRESETS], ns_flops;
    for (int p = 0; p < N_PRESETS; p++) preset_flops(&proto, p, &step_flops[p], &ns_flops);
    for (int i = 0; i < n_runs; i++) {
        double *v[ABLATION_VALUES];
        runs[i] = (AblationRun){.preset = i % N_PRESETS, .seed = proto.seed + (uint64_t)(i / N_PRESETS)};
        ablation_values(&runs[i], v);
        for (int k = 0; k < ABLATION_VALUES; k++) *v[k] = NAN;
    }
    char results_path[4200], path[4200], log_path[4200], csv_path[4200];
    snprintf(results_path, sizeof results_path, "%s/results.csv", dir);
    if (!ablation_load_results(results_path, runs, n_runs)) die("%s", osp_error);
    for (int i = 0; i < n_runs; i++) {
        runs[i].chosen = chosen[runs[i].preset];
        bool now = runs[i].chosen && !runs[i].diverged_step;
        steps_left[i] = now && !runs[i].evaluated ? proto.opt.steps : 0;
        eval_left[i] = now && !runs[i].evaluated;
    }
    // One evaluation is 10 forward passes over the windows (fp, each token alone, 4 rows x 2): ~1/3 of a
    // step's FLOPs each.
    long windows = (long)((val.n - 1) / proto.cfg.seq_len);
    if (eopt.max_windows > 0 && eopt.max_windows < windows) windows = eopt.max_windows;
    AblationProgress prog = { .n_runs = n_runs,
                              .runs = runs,
                              .step_flops = step_flops,
                              .steps_left = steps_left,
                              .eval_left = eval_left,
                              .eval_flops = 10.0 * windows / proto.batch * step_flops[0] / 3.0 };
    int n_chosen = 0;
    for (int p = 0; p < N_PRESETS; p++) n_chosen += chosen[p];
    if (n_chosen == 0) die("--presets names no preset");
    printf("ablation: %d run%s (%d preset%s x %d seed%s), %d steps each, in %s; progress every 25 steps, "
           "details in the logs\n", n_chosen * n_seeds, n_chosen * n_seeds == 1 ? "" : "s", n_chosen,
           n_chosen == 1 ? "" : "s", n_seeds, n_seeds == 1 ? "" : "s", proto.opt.steps, dir);
    for (int i = 0; i < n_runs; i++) {
        AblationRun *r = &runs[i];
        if (!r->chosen) continue;
        if (r->diverged_step) {
            print_run_prefix(runs, n_runs, i);
            printf("diverged at step %d earlier; skipped (delete its row in %s to retry)\n", r->diverged_step,
                   results_path);
            continue;
        }
        ablation_path(path, sizeof path, dir, r, ".ckpt");
        ablation_path(log_path, sizeof log_path, dir, r, ".log");
        ablation_path(csv_path, sizeof csv_path, dir, r, ".kurtosis.csv");
        TrainState want = proto;
        want.seed = r->seed;
        want.preset = r->preset;
        apply_preset(&want.cfg, &want.opt, r->preset);
        Trainer tr = {0};
        if (file_exists(path)) {
            if (!trainer_resume(&tr, path)) die("%s", osp_error);
            ablation_check_settings(path, &tr.state, &want);
        } else {
            trainer_init(&tr, &want);
            eval_left[i] = true;
        }
        tr.train = &train;
        tr.val = &val;
        r->state_bytes = (double)optimizer_state_bytes(&tr.model, tr.state.opt.optimizer);
        if (tr.state.step < tr.state.opt.steps) {
            print_run_prefix(runs, n_runs, i);
            printf("%s %d; log %s\n", tr.state.step ? "resuming at step" : "training from step",
                   tr.state.step, log_path);
            FILE *log = fopen(log_path, tr.state.step ? "a" : "w");
            if (!log) die("cannot open '%s': %s", log_path, strerror(errno));
            prog.run = i;
            RunOptions ro = { .out = path,
                              .eval_every = kurtosis_every,
                              .val_windows = 64,
                              .log_every = 25,
                              .kurtosis_every = kurtosis_every,
                              .kurtosis_csv = csv_path,
                              .log = log,
                              .on_log = ablation_on_log,
                              .ctx = &prog };
            RunResult res;
            bool ok = train_run(&tr, &ro, &res);
            if (!ok) fprintf(log, "osp: error: %s\n", osp_error);
            fclose(log);
            steps_left[i] = 0;
            if (!ok && !res.diverged) die("%s", osp_error);
            r->tokens_per_second = res.tokens_per_second;
            r->evaluated = false;
            if (res.diverged) {
                r->diverged_step = tr.state.step + 1;
                eval_left[i] = false;
                print_run_prefix(runs, n_runs, i);
                printf("%s\n", osp_error);
            }
            if (!ablation_save_results(results_path, runs, n_runs)) die("%s", osp_error);
        }
        print_run_prefix(runs, n_runs, i);
        if (!r->evaluated && !r->diverged_step) {
            printf("evaluating: fp, kurtosis, W4, A4, KV4, 4-4-4, with RTN and GPTQ, without and with "
                   "Had.\n");
            fflush(stdout);
            prog.eval_seconds = ablation_evaluate(r, &tr.model, &val, &train, &eopt);
            eval_left[i] = false;
            if (!ablation_save_results(results_path, runs, n_runs)) die("%s", osp_error);
            print_run_prefix(runs, n_runs, i);
            printf("kurtosis %.3f | fp ppl %.2f | 4-4-4 ppl %.2f | +Had. %.2f | +GPTQ %.2f | evaluated in "
                   "%.0f s\n",
                   r->kurtosis_paper, r->fp_ppl, r->quant_ppl[QROW_WAKV][0], r->quant_ppl[QROW_WAKV][1],
                   r->quant_ppl[QROW_WAKV_GPTQ][1], prog.eval_seconds);
        } else if (!r->diverged_step) {
            printf("done earlier\n");
        }
        fflush(stdout);
        trainer_free(&tr);
    }
    ablation_write_curves(dir, runs, n_runs, &proto);
    const AblationRun *ends[2] = { &runs[find_preset("adam")],
                                   &runs[find_preset("osp")] }; // the first seed's
    if (ends[0]->evaluated && ends[1]->evaluated) {
        char ckpts[2][4200];
        for (int k = 0; k < 2; k++) ablation_path(ckpts[k], sizeof ckpts[k], dir, ends[k], ".ckpt");
        EvalArgs e = eval_defaults();
        e.val_path = val_path;
        e.opt.max_windows = eopt.max_windows;
        snprintf(path, sizeof path, "%s/activations.svg", dir);
        plot_activations((const char *[]){ckpts[0], ckpts[1]}, 2, &e, &val, -1, false, path);
    }
    snprintf(path, sizeof path, "%s/table.txt", dir);
    AtomicFile af;
    if (!atomic_open(&af, path)) die("%s", osp_error);
    print_ablation_table(af.f, runs, n_runs, &proto, n_seeds);
    if (!atomic_close(&af)) die("%s", osp_error);
    printf("\n");
    print_ablation_table(stdout, runs, n_runs, &proto, n_seeds);
    printf("\nwrote %s/{results.csv, kurtosis.csv, kurtosis.svg, w4a4kv4.svg, w4a4kv4-had.svg, "
           "activations.svg, table.txt}\n", dir);
    free(runs); free(steps_left); free(eval_left);
    free(train.tokens); free(val.tokens);
    tokenizer_free(&tok);
    return 0;
}

// ---------------------------------------------------------------- osp bench
static const char *bench_help =
    "usage: ./osp bench [flags]\n"
    "Measures this machine's fp32 peak, then times training steps on synthetic tokens: ms/step,\n"
    "tokens/s, GFLOP/s and its share of the peak, a breakdown by part, 1 vs all threads, Muon's\n"
    "overhead (osp vs adam) against what its FLOPs predict, the step with one core kept busy by\n"
    "a spinning child process (what a laptop running something else sees), the matmul kernel\n"
    "alone, and memory. The README's Speed section compares it with PyTorch at its best and\n"
    "says how that was run.\n"
    "  --preset NAME    preset of the breakdown (default adam); adam and osp are always timed\n"
    "  --dim, --layers, --heads, --kv-heads, --ffn-dim, --seq-len, --batch   as for train\n"
    "  --steps N        timed steps per run, after 2 warm-up steps (default 10)\n"
    "  --threads N      threads of the main runs, 0 = all cores (default 0)\n";

// Width in floats of the widest vector unit the compiler targets (a predefined macro, not an
// intrinsic): the peak loop needs that many lanes per chain.
#if defined(__AVX512F__)
#define VECTOR_FLOATS 16
#elif defined(__AVX__)
#define VECTOR_FLOATS 8
#else
#define VECTOR_FLOATS 4
#endif
#define PEAK_CHAINS (12 * VECTOR_FLOATS)

// Measured fp32 peak in GFLOP/s with `threads` threads. Each thread runs 12 independent
// vector-wide multiply-add chains (a plain loop the compiler turns into FMAs): enough to cover
// the FMA latency of two units (4 cycles x 2), few enough to stay in 16 registers.
static double measure_peak_gflops(int threads) {
    long iterations = 20000000;
    double t0 = now_seconds(), sink = 0.0;
#pragma omp parallel num_threads(threads) reduction(+ : sink)
    {
        float acc[PEAK_CHAINS], mul = 0.999999f + 1e-9f * (float)sink, add = 1e-6f;
        for (int i = 0; i < PEAK_CHAINS; i++) acc[i] = (float)i;
        for (long it = 0; it < iterations; it++) {
#pragma GCC unroll 192
            for (int i = 0; i < PEAK_CHAINS; i++) acc[i] = acc[i] * mul + add;
        }
        for (int i = 0; i < PEAK_CHAINS; i++) sink += acc[i];
    }
    double seconds = now_seconds() - t0;
    if (sink == 42.0) printf(" ");   // keeps the loop from being optimized away
    return 2.0 * PEAK_CHAINS * (double)iterations * threads / seconds / 1e9;
}

// The clock in MHz that Linux reports for the first CPU, or 0 if unknown.
static double cpu_mhz(void) {
    FILE *f = fopen("/proc/cpuinfo", "r");
    if (!f) return 0.0;
    char line[256];
    double mhz = 0.0;
    while (mhz == 0.0 && fgets(line, sizeof line, f))
        if (!strncmp(line, "cpu MHz", 7)) {
            const char *colon = strchr(line, ':');
            if (colon) mhz = atof(colon + 1);
        }
    fclose(f);
    return mhz;
}

// A child process that keeps one core busy until killed: a laptop always runs something else.
// It also stops by itself once its parent is gone, so a bench killed midway leaves no spinner.
// Returns its pid, or -1 if it could not be started.
static pid_t start_spinner(void) {
    fflush(stdout);   // the child must not print the parent's buffered output again
    pid_t parent = getpid(), pid = fork();
    if (pid == 0) {
        while (getppid() == parent) {}
        _exit(0);
    }
    return pid;
}

// The parts of a step that bench reports.
enum { PART_MATMUL_FORWARD, PART_MATMUL_BACKWARD, PART_ATTENTION, PART_OPTIMIZER, N_PARTS };

typedef struct {
    double ms_per_step, parts_ms[N_PARTS], forward_backward_ms;
    size_t allocated_bytes;
} StepTiming;

// Seconds of attention, forward and backward through every layer, on the activations of the
// model's last step (its shapes and values); the gradients it adds are not used after.
static double time_attention(Model *m) {
    const Config *c = &m->cfg;
    int B = m->B, T = m->T, H = c->n_heads, KVH = c->n_kv_heads, hd = head_dim(c);
    double t0 = now_seconds();
    for (int l = 0; l < c->n_layers; l++) {
        LayerActs s = layer_acts(&m->act, c, l, B, T), ds = layer_acts(&m->dact, c, l, B, T);
        attention_forward(s.attn_out, s.att, s.q, s.k, s.v, B, T, H, KVH, hd);
        attention_backward(ds.q, ds.k, ds.v, ds.attn_out, s.attn_out, s.att, s.q, s.k, s.v, B, T, H, KVH, hd);
    }
    return now_seconds() - t0;
}

// Times `steps` training steps (after 2 warm-up steps) of a preset on synthetic tokens.
static StepTiming time_training(const TrainState *proto, int preset, int steps, int threads) {
    TrainState s = *proto;
    s.preset = preset;
    apply_preset(&s.cfg, &s.opt, preset);
    set_num_threads(threads);
    Trainer tr = {0};
    trainer_init(&tr, &s);
    TokenData train = {.vocab_size = s.cfg.vocab_size, .n = (size_t)s.batch * s.cfg.seq_len * 4 + 1};
    train.tokens = xmalloc(sizeof(uint16_t) * train.n);
    uint64_t rng = 7;
    for (size_t i = 0; i < train.n; i++)
        train.tokens[i] = (uint16_t)(rng_next(&rng) % (uint64_t)s.cfg.vocab_size);
    tr.train = &train;
    float norm;
    for (int i = 0; i < 2; i++) train_step(&tr, &norm);
    StepTiming r = {0};
    r.allocated_bytes = sizeof(float) * (2 * tr.model.n_params + 2 * tr.model.act_floats +
                                         optimizer_scratch(&tr.model, s.opt.optimizer) * (size_t)threads) +
                        optimizer_state_bytes(&tr.model, s.opt.optimizer);
    memset(matmul_seconds, 0, sizeof matmul_seconds);
    profiling = true;
    double t0 = now_seconds(), fb = 0.0, optimizer = 0.0, attention = 0.0;
    for (int i = 0; i < steps; i++) {
        data_next_batch(tr.train, &tr.state.rng, s.batch, s.cfg.seq_len, tr.inputs, tr.targets);
        double f0 = now_seconds();
        model_forward(&tr.model, tr.inputs, tr.targets, s.batch, s.cfg.seq_len, NULL);
        model_backward(&tr.model);
        fb += now_seconds() - f0;
        clip_grad_norm(tr.model.grads, tr.model.n_params, s.opt.grad_clip);
        double o0 = now_seconds();
        optimizer_step(&tr.model, &s.opt, tr.opt_state, 1.0f, i + 3);
        optimizer += now_seconds() - o0;
    }
    r.ms_per_step = 1e3 * (now_seconds() - t0) / steps;
    profiling = false;
    for (int i = 0; i < steps; i++) attention += time_attention(&tr.model);   // apart: not in ms_per_step
    r.parts_ms[PART_MATMUL_FORWARD] = 1e3 * matmul_seconds[0] / steps;
    r.parts_ms[PART_MATMUL_BACKWARD] = 1e3 * matmul_seconds[1] / steps;
    r.parts_ms[PART_ATTENTION] = 1e3 * attention / steps;
    r.parts_ms[PART_OPTIMIZER] = 1e3 * optimizer / steps;
    r.forward_backward_ms = 1e3 * fb / steps;
    trainer_free(&tr);
    free(train.tokens);
    return r;
}

// GFLOP/s of the matmul kernel alone, forward and backward, on N x C by OC x C.
static void time_matmul(int N, int C, int OC, int threads, double *forward, double *backward) {
    set_num_threads(threads);
    uint64_t rng = 3;
    float *x = xmalloc(sizeof(float) * N * C), *w = xmalloc(sizeof(float) * OC * C),
          *y = xmalloc(sizeof(float) * N * OC);
    float *dx = xcalloc((size_t)N * C, sizeof(float)), *dw = xcalloc((size_t)OC * C, sizeof(float));
    for (size_t i = 0; i < (size_t)N * C; i++) x[i] = rng_normal(&rng);
    for (size_t i = 0; i < (size_t)OC * C; i++) w[i] = rng_normal(&rng);
    double flops = 2.0 * N * C * OC;
    matmul(y, x, w, N, C, OC);
    double t0 = now_seconds();
    for (int r = 0; r < 10; r++) matmul(y, x, w, N, C, OC);
    *forward = 10 * flops / (now_seconds() - t0) / 1e9;
    t0 = now_seconds();
    for (int r = 0; r < 5; r++) matmul_backward(dx, dw, y, x, w, N, C, OC);
    *backward = 5 * 2 * flops / (now_seconds() - t0) / 1e9;
    free(x); free(w); free(y); free(dx); free(dw);
}

static int cmd_bench(int argc, char **argv) {
    Args a = {argc, 0, argv, "bench"};
    TrainState s = default_train_state();   // on synthetic tokens of a 512-token vocabulary,
    s.cfg.vocab_size = 512;                  // at the peak learning rates (warmup 1 of 1000 steps)
    s.opt.warmup = 1;
    s.opt.steps = 1000;
    s.seed = 1;
    int preset = 0, steps = 10, threads = 0;
    for (a.i = 0; a.i < argc; a.i++) {
        const char *f = argv[a.i];
        if (!strcmp(f, "--preset")) preset = find_preset(flag_value(&a));
        else if (parse_shape_flag(&a, &s)) {}
        else if (!strcmp(f, "--steps")) steps = (int)parse_int(f, flag_value(&a), 1, 100000);
        else if (!strcmp(f, "--threads")) threads = (int)parse_int(f, flag_value(&a), 0, 1024);
        else unknown_flag(&a);
    }
    const char *problem = config_problem(&s.cfg);
    if (problem) die("%s", problem);
    set_num_threads(threads);
    int all = num_threads();
    int N = s.batch * s.cfg.seq_len;
    double peak1 = measure_peak_gflops(1), peak = measure_peak_gflops(all), mhz = cpu_mhz();
    printf("machine: %d thread%s; measured fp32 peak %.1f GFLOP/s on 1 thread, %.1f on %d", all,
           all == 1 ? "" : "s", peak1, peak, all);
    if (mhz > 0)
        printf(" (%.1f FLOP/cycle/core at the %.0f MHz /proc/cpuinfo reports; vector width %d floats)",
               peak1 * 1e3 / mhz, mhz, VECTOR_FLOATS);
    printf("\nmodel: dim %d, layers %d, heads %d (kv %d), ffn %d, seq %d, vocab %d, batch %d: %d "
           "tokens/step\n\n",
           s.cfg.dim, s.cfg.n_layers, s.cfg.n_heads, s.cfg.n_kv_heads, s.cfg.ffn_dim, s.cfg.seq_len,
           s.cfg.vocab_size, s.batch, N);

    int adam_preset = find_preset("adam"), osp_preset = find_preset("osp");
    int shown[2] = {preset, osp_preset};
    int n_shown = preset == osp_preset ? 1 : 2;
    StepTiming adam = {0}, osp = {0};
    for (int k = 0; k < n_shown; k++) {
        int p = shown[k];
        StepTiming t = time_training(&s, p, steps, all);
        double model_flops, ns_flops;
        preset_flops(&s, p, &model_flops, &ns_flops);
        double gflops = model_flops / (t.ms_per_step * 1e-3) / 1e9;
        printf("training step, preset %s, %d threads: %.1f ms/step, %.0f tokens/s, %.2f GFLOP/s = %.1f%% of "
               "peak\n",
               presets[p].name, all, t.ms_per_step, N / (t.ms_per_step * 1e-3), gflops, 100 * gflops / peak);
        double matmul = t.parts_ms[PART_MATMUL_FORWARD] + t.parts_ms[PART_MATMUL_BACKWARD];
        double rest = t.forward_backward_ms - matmul - t.parts_ms[PART_ATTENTION];
        double other = t.ms_per_step - t.forward_backward_ms - t.parts_ms[PART_OPTIMIZER];
        const char *names[] = {"matmul forward", "matmul backward", "attention (timed apart)",
                               "norms, elementwise, loss",
                               p == osp_preset ? "optimizer (Muon, AdamW)" : "optimizer", "batch, clipping"};
        double ms[] = { t.parts_ms[PART_MATMUL_FORWARD], t.parts_ms[PART_MATMUL_BACKWARD],
                        t.parts_ms[PART_ATTENTION],      rest,
                        t.parts_ms[PART_OPTIMIZER],      other };
        printf("  %-26s %9s %7s\n", "part", "ms/step", "share");
        for (int i = 0; i < 6; i++)
            printf("  %-26s %9.1f %6.1f%%\n", names[i], ms[i], 100 * ms[i] / t.ms_per_step);
        if (ns_flops > 0)
            printf("  Newton-Schulz: %.2f GFLOP per step; the optimizer at %.1f GFLOP/s\n", ns_flops / 1e9,
                   ns_flops / (t.parts_ms[PART_OPTIMIZER] * 1e-3) / 1e9);
        printf("\n");
        if (p == adam_preset) adam = t;
        if (p == osp_preset) osp = t;
    }
    if (preset != adam_preset) adam = time_training(&s, adam_preset, steps, all);
    {
        double adam_flops, osp_flops, ns_flops, unused;
        preset_flops(&s, adam_preset, &adam_flops, &unused);
        preset_flops(&s, osp_preset, &osp_flops, &ns_flops);
        double flops_adam_per_token = adam_flops / N;
        double measured = osp.ms_per_step / adam.ms_per_step, predicted = (osp_flops + ns_flops) / adam_flops;
        double muon_share_2pct = osp.parts_ms[PART_OPTIMIZER] / (0.02 * adam.ms_per_step / N);
        printf("Muon overhead: osp step / adam step = %.3f measured; FLOPs predict %.3f (measured/predicted "
               "%.2f)\n",
               measured, predicted, measured / predicted);
        printf("  Muon's step costs %.1f ms whatever the batch; it falls to 2%% of the step at about %.0f\n"
               "  tokens/step (%.0f by FLOPs: %.2f GFLOP of Newton-Schulz vs 6 x params x tokens)\n",
               osp.parts_ms[PART_OPTIMIZER], muon_share_2pct, ns_flops / (0.02 * flops_adam_per_token),
               ns_flops / 1e9);
    }
    StepTiming one_thread = time_training(&s, adam_preset, steps, 1);
    printf("threads: adam step %.1f ms on 1 thread, %.1f ms on %d: %.2fx\n", one_thread.ms_per_step,
           adam.ms_per_step, all, one_thread.ms_per_step / adam.ms_per_step);
    if (all > 1) {
        pid_t spinner = start_spinner();
        if (spinner > 0) {
            StepTiming busy = time_training(&s, adam_preset, steps, all);
            kill(spinner, SIGKILL);
            waitpid(spinner, NULL, 0);
            printf("busy core: adam step %.1f ms on %d threads while another process spins on one core,\n"
                   "  %.1f ms idle: %.2fx\n", busy.ms_per_step, all, adam.ms_per_step,
                   busy.ms_per_step / adam.ms_per_step);
        }
    }
    double fwd1, bwd1, fwd, bwd;
    int biggest = s.cfg.ffn_dim > s.cfg.vocab_size ? s.cfg.ffn_dim : s.cfg.vocab_size;
    time_matmul(N, s.cfg.dim, biggest, 1, &fwd1, &bwd1);
    time_matmul(N, s.cfg.dim, biggest, all, &fwd, &bwd);
    printf("matmul kernel alone, [%d x %d] x [%d x %d]^T: forward %.1f GFLOP/s (%.0f%% of peak), backward "
           "%.1f (%.0f%%) on %d threads;\n"
           "  1 thread: forward %.1f (%.0f%% of the 1-thread peak), backward %.1f (%.0f%%)\n",
           N, s.cfg.dim, biggest, s.cfg.dim, fwd, 100 * fwd / peak, bwd, 100 * bwd / peak, all, fwd1,
           100 * fwd1 / peak1, bwd1, 100 * bwd1 / peak1);
    printf("memory allocated (parameters, gradients, activations and their gradients, optimizer state and "
           "scratch):\n"
           "  adam %.1f MB, osp %.1f MB\n",
           adam.allocated_bytes / 1e6, osp.allocated_bytes / 1e6);
    set_num_threads(threads);
    return 0;
}

// ---------------------------------------------------------------- main
static const char *main_help =
    "osp: Outlier-Safe Pre-Training reference implementation\n"
    "usage: ./osp COMMAND [flags]    (./osp COMMAND --help for each)\n"
    "  tokenizer   train the BPE tokenizer on a text file -> tokenizer.bin\n"
    "  prepare     encode a text file into data/train.bin and data/val.bin\n"
    "  train       train a model (AdamW baseline or an OSP preset), write a checkpoint\n"
    "  sample      generate text from a checkpoint\n"
    "  merge       fold EmbProj and SSNorm away: a plain Llama checkpoint\n"
    "  export      merge, then write GGUF (llama.cpp) and/or llama2.c (run.c) model files\n"
    "  eval        perplexity, excess kurtosis, and perplexity under 4-bit fake quantization\n"
    "  compare     eval several checkpoints, side by side\n"
    "  plot-activations  the largest |activation| per channel of checkpoints, as SVG\n"
    "  ablation    the paper's ablation: six presets x seeds, kurtosis curves, 4-bit table\n"
    "  bench       speed: this machine's peak, ms/step, GFLOP/s, breakdown, Muon overhead\n";

int main(int argc, char **argv) {
    if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") || !strcmp(argv[1], "help")) {
        fputs(main_help, stdout);
        return argc < 2 ? 1 : 0;
    }
    struct { const char *name; int (*run)(int, char **); const char *help; } commands[] = {
        {"tokenizer", cmd_tokenizer, tokenizer_help},
        {"prepare", cmd_prepare, prepare_help},
        {"train", cmd_train, train_help},
        {"sample", cmd_sample, sample_help},
        {"merge", cmd_merge, merge_help},
        {"export", cmd_export, export_help},
        {"eval", cmd_eval, eval_help_head},
        {"compare", cmd_compare, compare_help_head},
        {"plot-activations", cmd_plot_activations, plot_help},
        {"ablation", cmd_ablation, ablation_help},
        {"bench", cmd_bench, bench_help},
    };
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++) {
        if (strcmp(argv[1], commands[i].name) != 0) continue;
        if (wants_help(argc - 2, argv + 2)) {
            printf(commands[i].help, TOKEN_FIRST_PIECE + 1, VOCAB_MAX);
            if (commands[i].run == cmd_eval || commands[i].run == cmd_compare) fputs(eval_flags_help, stdout);
            return 0;
        }
        return commands[i].run(argc - 2, argv + 2);
    }
    die("unknown command '%s' (see ./osp --help)", argv[1]);
    return 1;
}
#endif
