/* The gate's output product on channels-last float32 rows, for the `cpu` backend:
 *
 *   out[r, o] = act(bias[o] + sum_h alpha[r, h] * sum_k x[r, k] * Wt[h, k, o])
 *
 * one head: W's product with the gate's epilogue (alpha * (W0 x) + b); several heads with a ReLU:
 * the folded multi-head block. One pass over x instead of a product that writes every head's
 * output and epilogues that read it back.
 *
 * Built on first use by attention_gates/ops/native.py with the machine's C compiler
 * (-O3 -march=native -fopenmp, run on PyTorch's own OpenMP runtime) and called through ctypes.
 * GCC vector extensions: VL floats per vector (16 with AVX-512, else 8), lowered to the
 * machine's SIMD. A tile of R rows x 2 vectors of outputs stays in registers, so every weight
 * vector loaded serves R rows.
 */
#include <stddef.h>
#include <omp.h>

#if defined(__AVX512F__)
#define VL 16
#define R 6
#else
#define VL 8
#define R 3
#endif
#define TW (2 * VL)

typedef float vec __attribute__((vector_size(VL * 4)));
typedef float vec_u __attribute__((vector_size(VL * 4), aligned(4)));
typedef int ivec __attribute__((vector_size(VL * 4)));

static inline vec load(const float* p) { return *(const vec_u*)p; }
static inline void store(float* p, vec v) { *(vec_u*)p = v; }
static inline vec splat(float a) { return (vec){0} + a; }
static inline vec relu_v(vec v) { return (vec)((ivec)v & (v > 0.0f)); }

int gate_vector_width(void) { return VL; }

/* alpha of global row r (sample r / S) for head h: alpha is Tensor[N, H, S] */
static inline float alpha_at(const float* alpha, long r, long S, int H, int h) {
    return alpha[(r / S) * H * S + (long)h * S + r % S];
}

/* One tile: NR rows from r0, outputs o0 .. o0 + NV * VL - 1 (NR, NV compile-time constants, so
 * the accumulators live in registers). One head: alpha scales the sums at the end. Several:
 * each head's x values are scaled by its alpha before the product, so all heads add into the
 * same accumulators. */
#define ROWS_TILE(NR, NV)                                                                            \
    static void rows_tile_##NR##_##NV(const float* x, long xs, int CI, const float* Wt, int H, int CO, \
                                      const float* alpha, long S, const float* bias, int relu,       \
                                      float* out, long os, long r0, int o0) {                        \
        vec acc[NR][2];                                                                              \
        float a[NR];                                                                                 \
        for (int i = 0; i < NR; i++) acc[i][0] = acc[i][1] = splat(0.0f);                           \
        const float* xr = x + r0 * xs;                                                               \
        for (int h = 0; h < H; h++) {                                                                \
            for (int i = 0; i < NR; i++) a[i] = H > 1 ? alpha_at(alpha, r0 + i, S, H, h) : 1.0f;     \
            const float* w = Wt + (long)h * CI * CO + o0;                                            \
            for (int k = 0; k < CI; k++, w += CO) {                                                  \
                vec w0 = load(w), w1 = NV == 2 ? load(w + VL) : splat(0.0f);                         \
                for (int i = 0; i < NR; i++) {                                                       \
                    vec xv = splat(H > 1 ? a[i] * xr[i * xs + k] : xr[i * xs + k]);                  \
                    acc[i][0] += xv * w0;                                                            \
                    if (NV == 2) acc[i][1] += xv * w1;                                               \
                }                                                                                    \
            }                                                                                        \
        }                                                                                            \
        vec b0 = bias ? load(bias + o0) : splat(0.0f);                                               \
        vec b1 = bias && NV == 2 ? load(bias + o0 + VL) : splat(0.0f);                               \
        for (int i = 0; i < NR; i++) {                                                               \
            vec s = splat(H == 1 && alpha ? alpha_at(alpha, r0 + i, S, 1, 0) : 1.0f);                \
            vec y0 = s * acc[i][0] + b0, y1 = s * acc[i][1] + b1;                                    \
            if (relu) { y0 = relu_v(y0); y1 = relu_v(y1); }                                          \
            float* o = out + (r0 + i) * os + o0;                                                     \
            store(o, y0);                                                                            \
            if (NV == 2) store(o + VL, y1);                                                          \
        }                                                                                            \
    }
ROWS_TILE(R, 2)
ROWS_TILE(R, 1)
ROWS_TILE(1, 2)
ROWS_TILE(1, 1)

/* x: `rows` rows of CI floats, row stride xs; Wt: Tensor[H, CI, CO]; alpha: Tensor[N, H, S] with
 * S rows per sample, or NULL when H == 1 (no scaling); bias: Tensor[CO] or NULL; out: rows of CO
 * floats, row stride os. CO must be a multiple of VL. */
void gate_rows(const float* x, long xs, int CI, const float* Wt, int H, int CO, const float* alpha, long S,
               const float* bias, int relu, float* out, long os, long rows, int threads) {
    long tiles = (rows + R - 1) / R;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long t = 0; t < tiles; t++) {
        long r0 = t * R;
        int nr = rows - r0 < R ? (int)(rows - r0) : R;
        for (int o0 = 0; o0 < CO; o0 += TW) {
            int two = CO - o0 >= TW;
            if (nr == R)
                (two ? rows_tile_R_2 : rows_tile_R_1)(x, xs, CI, Wt, H, CO, alpha, S, bias, relu, out, os, r0, o0);
            else
                for (int i = 0; i < nr; i++)
                    (two ? rows_tile_1_2 : rows_tile_1_1)(x, xs, CI, Wt, H, CO, alpha, S, bias, relu, out, os, r0 + i, o0);
        }
    }
}

/* The same on contiguous (planar) tensors: x = Tensor[N, CI, S], out = Tensor[N, CO, S],
 *
 *   out[n, o, s] = act(bias[o] + sum_h alpha[n, h, s] * sum_k A[h, o, k] * x[n, k, s])
 *
 * vectorised along s. A tile of NO output channels x NV vectors of voxels stays in registers;
 * every x vector loaded (scaled by its head's alpha when H > 1) serves NO channels, and the
 * tile's x block (CI x NV vectors) stays in L1 while the channel tiles pass over it. */
#if defined(__AVX512F__)
#define NO_P 8
#else
#define NO_P 4
#endif

#define PLANES_TILE(NO, NV)                                                                          \
    static void planes_tile_##NO##_##NV(const float* x, int CI, const float* A, int H, int CO,       \
                                        const float* alpha, long S, const float* bias, int relu,     \
                                        float* out, long s0, int o0) {                               \
        vec acc[NO][NV];                                                                             \
        for (int i = 0; i < NO; i++)                                                                 \
            for (int j = 0; j < NV; j++) acc[i][j] = splat(0.0f);                                    \
        for (int h = 0; h < H; h++) {                                                                \
            vec a[NV];                                                                               \
            for (int j = 0; j < NV; j++) a[j] = H > 1 ? load(alpha + (long)h * S + s0 + j * VL) : splat(1.0f); \
            const float* w = A + ((long)h * CO + o0) * CI;                                           \
            for (int k = 0; k < CI; k++) {                                                           \
                vec xv[NV];                                                                          \
                for (int j = 0; j < NV; j++) {                                                       \
                    xv[j] = load(x + (long)k * S + s0 + j * VL);                                     \
                    if (H > 1) xv[j] *= a[j];                                                        \
                }                                                                                    \
                for (int i = 0; i < NO; i++) {                                                       \
                    vec wv = splat(w[(long)i * CI + k]);                                             \
                    for (int j = 0; j < NV; j++) acc[i][j] += wv * xv[j];                            \
                }                                                                                    \
            }                                                                                        \
        }                                                                                            \
        for (int i = 0; i < NO; i++) {                                                               \
            vec b = splat(bias ? bias[o0 + i] : 0.0f);                                               \
            for (int j = 0; j < NV; j++) {                                                           \
                vec y = acc[i][j];                                                                   \
                if (H == 1 && alpha) y *= load(alpha + s0 + j * VL);                                 \
                y += b;                                                                              \
                if (relu) y = relu_v(y);                                                             \
                store(out + (long)(o0 + i) * S + s0 + j * VL, y);                                    \
            }                                                                                        \
        }                                                                                            \
    }
PLANES_TILE(NO_P, 2)
PLANES_TILE(1, 2)
PLANES_TILE(NO_P, 1)
PLANES_TILE(1, 1)

/* The voxels after the last whole vector, one at a time. */
static void planes_tail(const float* x, int CI, const float* A, int H, int CO, const float* alpha, long S,
                        const float* bias, int relu, float* out, long s) {
    for (int o = 0; o < CO; o++) {
        float y = 0.0f;
        for (int h = 0; h < H; h++) {
            float sum = 0.0f;
            const float* w = A + ((long)h * CO + o) * CI;
            for (int k = 0; k < CI; k++) sum += w[k] * x[(long)k * S + s];
            y += (alpha ? alpha[(long)h * S + s] : 1.0f) * sum;
        }
        y += bias ? bias[o] : 0.0f;
        out[(long)o * S + s] = relu && y < 0.0f ? 0.0f : y;
    }
}

/* x: N samples of Tensor[CI, S] (sample stride xn); A: Tensor[H, CO, CI]; alpha: Tensor[N, H, S] or
 * NULL when H == 1; bias: Tensor[CO] or NULL; out: N samples of Tensor[CO, S] (sample stride on). */
void gate_planes(const float* x, long xn, int CI, const float* A, int H, int CO, const float* alpha, long S,
                 const float* bias, int relu, float* out, long on, long N, int threads) {
    long blocks = (S + TW - 1) / TW;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long t = 0; t < N * blocks; t++) {
        long n = t / blocks, s0 = (t % blocks) * TW;
        const float* xs = x + n * xn;
        const float* as = alpha ? alpha + n * (long)H * S : 0;
        float* os = out + n * on;
        int nv = S - s0 >= TW ? 2 : S - s0 >= VL ? 1 : 0;
        for (int o0 = 0; o0 < CO; o0 += NO_P) {
            int full = CO - o0 >= NO_P;
            for (int i = 0; i < (full ? 1 : CO - o0); i++) {
                if (nv == 2)
                    (full ? planes_tile_NO_P_2 : planes_tile_1_2)(xs, CI, A, H, CO, as, S, bias, relu, os, s0, o0 + i);
                else if (nv == 1)
                    (full ? planes_tile_NO_P_1 : planes_tile_1_1)(xs, CI, A, H, CO, as, S, bias, relu, os, s0, o0 + i);
            }
        }
        for (long s = s0 + (long)nv * VL; s < s0 + TW && s < S; s++) planes_tail(xs, CI, A, H, CO, as, S, bias, relu, os, s);
    }
}

/* The backward through the output transform with batch statistics, on channels-last rows:
 *
 *   h[r] = A1 dy[r] + alpha[r] * (A2 x[r]) + bias,        hx[r] = h[r] . x[r]
 *
 * (h = d(alpha x), hx its part of d alpha) in one pass over dy and x, where products, an
 * accumulation, a bias pass and a product with x and its sum each went over the voxels.
 * A1t, A2t: Tensor[C, C], the matrices transposed ([k, o]). */
#define BACKWARD_TILE(NR, NV)                                                                        \
    static void backward_tile_##NR##_##NV(const float* dy, long ds, const float* x, long xs, int C,  \
                                          const float* A1t, const float* A2t, const float* alpha,    \
                                          const float* bias, float* h, float* hx, long r0, int o0) { \
        vec a1[NR][2], a2[NR][2];                                                                    \
        for (int i = 0; i < NR; i++) a1[i][0] = a1[i][1] = a2[i][0] = a2[i][1] = splat(0.0f);       \
        for (int k = 0; k < C; k++) {                                                                \
            const float *w1 = A1t + (long)k * C + o0, *w2 = A2t + (long)k * C + o0;                  \
            vec w10 = load(w1), w11 = NV == 2 ? load(w1 + VL) : splat(0.0f);                         \
            vec w20 = load(w2), w21 = NV == 2 ? load(w2 + VL) : splat(0.0f);                         \
            for (int i = 0; i < NR; i++) {                                                           \
                vec d = splat(dy[(r0 + i) * ds + k]), xv = splat(x[(r0 + i) * xs + k]);              \
                a1[i][0] += d * w10;                                                                 \
                a2[i][0] += xv * w20;                                                                \
                if (NV == 2) {                                                                       \
                    a1[i][1] += d * w11;                                                             \
                    a2[i][1] += xv * w21;                                                            \
                }                                                                                    \
            }                                                                                        \
        }                                                                                            \
        for (int i = 0; i < NR; i++) {                                                               \
            vec s = splat(alpha[r0 + i]);                                                            \
            const float* xr = x + (r0 + i) * xs + o0;                                                \
            float* o = h + (r0 + i) * C + o0;                                                        \
            float sum = 0.0f;                                                                        \
            for (int j = 0; j < NV; j++) {                                                           \
                vec y = a1[i][j] + s * a2[i][j] + load(bias + o0 + j * VL);                          \
                store(o + j * VL, y);                                                                \
                vec p = y * load(xr + j * VL);                                                       \
                for (int l = 0; l < VL; l++) sum += p[l];                                            \
            }                                                                                        \
            hx[r0 + i] += sum;                                                                       \
        }                                                                                            \
    }
BACKWARD_TILE(R, 2)
BACKWARD_TILE(R, 1)
BACKWARD_TILE(1, 2)
BACKWARD_TILE(1, 1)

/* dy, x: `rows` rows of C floats (row strides ds, xs); A1t, A2t: Tensor[C, C]; alpha: Tensor[rows];
 * bias: Tensor[C]; h: rows x C, dense; hx: Tensor[rows]. C must be a multiple of VL. */
void gate_backward_rows(const float* dy, long ds, const float* x, long xs, int C, const float* A1t, const float* A2t,
                        const float* alpha, const float* bias, float* h, float* hx, long rows, int threads) {
    long tiles = (rows + R - 1) / R;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long t = 0; t < tiles; t++) {
        long r0 = t * R;
        int nr = rows - r0 < R ? (int)(rows - r0) : R;
        for (int i = 0; i < nr; i++) hx[r0 + i] = 0.0f;
        for (int o0 = 0; o0 < C; o0 += TW) {
            int two = C - o0 >= TW;
            if (nr == R)
                (two ? backward_tile_R_2 : backward_tile_R_1)(dy, ds, x, xs, C, A1t, A2t, alpha, bias, h, hx, r0, o0);
            else
                for (int i = 0; i < nr; i++)
                    (two ? backward_tile_1_2 : backward_tile_1_1)(dy, ds, x, xs, C, A1t, A2t, alpha, bias, h, hx, r0 + i, o0);
        }
    }
}

/* The batch statistics of the gate's output transform in training, on channels-last rows:
 * per output channel o, sum_r v[r, o] and sum_r v[r, o]^2 with v[r] = alpha[r] * (W0 x[r]),
 * accumulated in double (per tile of rows, then per thread: part[thread][2][CO]), without
 * writing v. The normalised output is then one more pass of gate_rows. */
#define STATS_TILE(NR, NV)                                                                           \
    static void stats_tile_##NR##_##NV(const float* x, long xs, int CI, const float* Wt, int CO,      \
                                       const float* alpha, double* part, long r0, int o0) {          \
        vec acc[NR][2];                                                                              \
        for (int i = 0; i < NR; i++) acc[i][0] = acc[i][1] = splat(0.0f);                           \
        const float* xr = x + r0 * xs;                                                               \
        const float* w = Wt + o0;                                                                    \
        for (int k = 0; k < CI; k++, w += CO) {                                                      \
            vec w0 = load(w), w1 = NV == 2 ? load(w + VL) : splat(0.0f);                             \
            for (int i = 0; i < NR; i++) {                                                           \
                vec xv = splat(xr[i * xs + k]);                                                      \
                acc[i][0] += xv * w0;                                                                \
                if (NV == 2) acc[i][1] += xv * w1;                                                   \
            }                                                                                        \
        }                                                                                            \
        for (int j = 0; j < NV; j++) {                                                               \
            vec s1 = splat(0.0f), s2 = splat(0.0f);                                                  \
            for (int i = 0; i < NR; i++) {                                                           \
                vec v = splat(alpha[r0 + i]) * acc[i][j];                                            \
                s1 += v;                                                                             \
                s2 += v * v;                                                                         \
            }                                                                                        \
            double* p1 = part + o0 + j * VL;                                                         \
            double* p2 = p1 + CO;                                                                    \
            for (int l = 0; l < VL; l++) {                                                           \
                p1[l] += s1[l];                                                                      \
                p2[l] += s2[l];                                                                      \
            }                                                                                        \
        }                                                                                            \
    }
STATS_TILE(R, 2)
STATS_TILE(R, 1)
STATS_TILE(1, 2)
STATS_TILE(1, 1)

/* x: `rows` rows of CI floats (row stride xs); Wt: Tensor[CI, CO]; alpha: Tensor[rows]; part:
 * Tensor[threads, 2, CO] of doubles, zeroed by the caller. CO must be a multiple of VL. */
void gate_rows_stats(const float* x, long xs, int CI, const float* Wt, int CO, const float* alpha, double* part,
                     long rows, int threads) {
    long tiles = (rows + R - 1) / R;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long t = 0; t < tiles; t++) {
        double* mine = part + (long)omp_get_thread_num() * 2 * CO;
        long r0 = t * R;
        int nr = rows - r0 < R ? (int)(rows - r0) : R;
        for (int o0 = 0; o0 < CO; o0 += TW) {
            int two = CO - o0 >= TW;
            if (nr == R)
                (two ? stats_tile_R_2 : stats_tile_R_1)(x, xs, CI, Wt, CO, alpha, mine, r0, o0);
            else
                for (int i = 0; i < nr; i++)
                    (two ? stats_tile_1_2 : stats_tile_1_1)(x, xs, CI, Wt, CO, alpha, mine, r0 + i, o0);
        }
    }
}
