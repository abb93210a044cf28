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
