/* The CPU kernels' entry point and the layouts not in 16-row tiles (hf_compress_prompt.kernels.cpu).
 *
 * One call per layer (hcp_plan_linear): activations are quantized per block of 64 inputs to int8 with one float
 * scale (as llama.cpp's Q8 does), the plan's kernel multiplies, the bias is added and the output written in the
 * activations' dtype. int4 layers (dense, bitmask or N:M sparse) run in tiled.c; here: dense int8 codes row by row
 * (VNNI dpbusd, u8 codes x s8 activations) and sparse bf16 values (VBMI2 compress + AVX512-BF16 dot products).
 *
 *   y[t, o] = sum_g scale[o,g] * sum_{b in g} sx[t,b] * sum_{i in b} q[o,i] xq[t,i]  -  sum_g zs[o,g] * XS[t,g]
 *   with zs = scale * zero and XS[t,g] = sum_{b in g} sx[t,b] * sum_{i in b} xq[t,i].
 *
 * Built at first use with the system C compiler (no torch headers); the AVX-512 paths are compiled with target
 * attributes and chosen at run time, never with -march=native. */
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <immintrin.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define BLOCK 64

/* ---- activations -------------------------------------------------------------------------------------------- */
/* x (T, K) float -> xq (T, K) int8, sx (T, K/64) block scales, xs (T, G) = sum over each weight group of
 * sx * sum(xq). */
void hcp_quantize_activations(const float *x, int64_t T, int64_t K, int64_t group_size, int8_t *xq, float *sx,
                              float *xs) {
    const int64_t nb = K / BLOCK, per_group = group_size / BLOCK, G = K / group_size;
    for (int64_t t = 0; t < T; t++) {
        const float *xr = x + t * K;
        for (int64_t g = 0; g < G; g++) xs[t * G + g] = 0.0f;
        for (int64_t b = 0; b < nb; b++) {
            const float *v = xr + b * BLOCK;
            float amax = 0.0f;
            for (int i = 0; i < BLOCK; i++) amax = fmaxf(amax, fabsf(v[i]));
            const float s = amax / 127.0f, inv = s > 0.0f ? 1.0f / s : 0.0f;
            int8_t *q = xq + t * K + b * BLOCK;
            int32_t sum = 0;
            for (int i = 0; i < BLOCK; i++) {
                const int c = (int)lrintf(v[i] * inv);
                q[i] = (int8_t)c;
                sum += c;
            }
            sx[t * nb + b] = s;
            xs[t * G + b / per_group] += s * (float)sum;
        }
    }
}

/* ---- dense int8 codes: row o holds K bytes, byte k the code of input k (the 8-bit bit stream of the stored
 * format), activations in natural order. */
#define ISA_VNNI "avx512f,avx512bw,avx512vl,avx512vnni"

static void int8_scalar(const uint8_t *w, const float *scale, const float *zs, int64_t N, int64_t K,
                        int64_t group_size, const int8_t *xq, const float *sx, const float *xs, int64_t T, float *y,
                        int64_t r0, int64_t r1) {
    const int64_t nb = K / BLOCK, per_group = group_size / BLOCK, G = K / group_size;
    for (int64_t o = r0; o < r1; o++) {
        const uint8_t *wr = w + o * K;
        for (int64_t t = 0; t < T; t++) {
            float acc = 0.0f;
            for (int64_t b = 0; b < nb; b++) {
                const int8_t *qb = xq + t * K + b * BLOCK;
                const uint8_t *wb = wr + b * BLOCK;
                int32_t dot = 0;
                for (int i = 0; i < BLOCK; i++) dot += wb[i] * qb[i];
                acc += scale[o * G + b / per_group] * sx[t * nb + b] * (float)dot;
            }
            for (int64_t g = 0; g < G; g++) acc -= zs[o * G + g] * xs[t * G + g];
            y[t * N + o] = acc;
        }
    }
}

#define TILE 8 /* tokens whose accumulators stay in registers while one weight row streams by */

/* One token (decoding): four rows at a time, each with its own accumulator (independent dependency chains), sharing
 * every activation load; the next four rows are prefetched one cache line per 64 bytes of codes. */
__attribute__((target(ISA_VNNI)))
static void int8_gemv(const uint8_t *w, const float *scale, const float *zs, int64_t N, int64_t K, int64_t group_size,
                      const int8_t *xq, const float *sx, const float *xs, float *y, int64_t r0, int64_t r1) {
    const int64_t nb = K / BLOCK, per_group = group_size / BLOCK, G = K / group_size;
    int64_t o = r0;
    for (; o + 3 < r1; o += 4) {
        const uint8_t *w0 = w + o * K, *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;
        const float *s0 = scale + o * G;
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
        const uint8_t *next = w0 + 4 * K; /* the next four rows stream in while these four are used */
        const int prefetch = o + 7 < r1;
        for (int64_t b = 0; b < nb; b++) {
            if (prefetch) {
                const uint8_t *p = next + b * BLOCK;
                _mm_prefetch((const char *)p, _MM_HINT_T0);
                _mm_prefetch((const char *)(p + K), _MM_HINT_T0);
                _mm_prefetch((const char *)(p + 2 * K), _MM_HINT_T0);
                _mm_prefetch((const char *)(p + 3 * K), _MM_HINT_T0);
            }
            const __m512i a = _mm512_loadu_si512((const void *)(xq + b * BLOCK));
            const int64_t g = b / per_group, off = b * BLOCK;
            const float s = sx[b];
            const __m512i z = _mm512_setzero_si512();
            const __m512i d0 = _mm512_dpbusd_epi32(z, _mm512_loadu_si512((const void *)(w0 + off)), a);
            const __m512i d1 = _mm512_dpbusd_epi32(z, _mm512_loadu_si512((const void *)(w1 + off)), a);
            const __m512i d2 = _mm512_dpbusd_epi32(z, _mm512_loadu_si512((const void *)(w2 + off)), a);
            const __m512i d3 = _mm512_dpbusd_epi32(z, _mm512_loadu_si512((const void *)(w3 + off)), a);
            a0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d0), _mm512_set1_ps(s * s0[g]), a0);
            a1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d1), _mm512_set1_ps(s * s0[G + g]), a1);
            a2 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d2), _mm512_set1_ps(s * s0[2 * G + g]), a2);
            a3 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d3), _mm512_set1_ps(s * s0[3 * G + g]), a3);
        }
        float v[4] = {_mm512_reduce_add_ps(a0), _mm512_reduce_add_ps(a1), _mm512_reduce_add_ps(a2),
                      _mm512_reduce_add_ps(a3)};
        for (int r = 0; r < 4; r++) {
            for (int64_t g = 0; g < G; g++) v[r] -= zs[(o + r) * G + g] * xs[g];
            y[o + r] = v[r];
        }
    }
    if (o < r1) int8_scalar(w, scale, zs, N, K, group_size, xq, sx, xs, 1, y, o, r1);
}

/* One row at a time: its blocks are loaded once and reused for a tile of tokens whose accumulators stay in
 * registers; per block and token one dpbusd (64 products into 16 int32 lanes), one convert, one fma. */
__attribute__((target(ISA_VNNI)))
static void int8_gemm(const uint8_t *w, const float *scale, const float *zs, int64_t N, int64_t K, int64_t group_size,
                      const int8_t *xq, const float *sx, const float *xs, int64_t T, float *y, int64_t r0,
                      int64_t r1) {
    const int64_t nb = K / BLOCK, per_group = group_size / BLOCK, G = K / group_size;
    for (int64_t o = r0; o < r1; o++) {
        const uint8_t *wr = w + o * K;
        const float *sr = scale + o * G;
        for (int64_t t0 = 0; t0 < T; t0 += TILE) {
            const int64_t nt = T - t0 < TILE ? T - t0 : TILE;
            __m512 acc[TILE];
            for (int j = 0; j < TILE; j++) acc[j] = _mm512_setzero_ps();
            for (int64_t b = 0; b < nb; b++) {
                const __m512i codes = _mm512_loadu_si512((const void *)(wr + b * BLOCK));
                const float sg = sr[b / per_group];
                for (int j = 0; j < nt; j++) {
                    const int64_t t = t0 + j;
                    const __m512i a = _mm512_loadu_si512((const void *)(xq + t * K + b * BLOCK));
                    const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), codes, a); /* 16 x 4 products */
                    acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(sg * sx[t * nb + b]), acc[j]);
                }
            }
            for (int j = 0; j < nt; j++) {
                const int64_t t = t0 + j;
                float v = _mm512_reduce_add_ps(acc[j]);
                for (int64_t g = 0; g < G; g++) v -= zs[o * G + g] * xs[t * G + g];
                y[t * N + o] = v;
            }
        }
    }
}

int hcp_has_vnni(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
}

/* y (T, N) for rows [r0, r1): callers split rows across threads. use_vnni: 1 = AVX-512 VNNI, 0 = portable. */
void hcp_int8_gemm(const uint8_t *w, const float *scale, const float *zs, int64_t N, int64_t K, int64_t group_size,
                   const int8_t *xq, const float *sx, const float *xs, int64_t T, float *y, int64_t r0, int64_t r1,
                   int use_vnni) {
    if (!use_vnni) int8_scalar(w, scale, zs, N, K, group_size, xq, sx, xs, T, y, r0, r1);
    else if (T == 1) int8_gemv(w, scale, zs, N, K, group_size, xq, sx, xs, y, r0, r1);
    else int8_gemm(w, scale, zs, N, K, group_size, xq, sx, xs, T, y, r0, r1);
}

/* ---- one call per layer: convert + quantize the activations, multiply, add the bias, write the output ---------
 * x: (T, K) in float32 (x_bf16 = 0) or bfloat16 (1); y: (T, N) float32 or bfloat16 (y_bf16); bias: float32 or NULL.
 * Rows [r0, r1). */
#include <stdlib.h>

static inline float bf16_to_f32(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffff) > 0x7f800000) return (uint16_t)((u >> 16) | 0x40); /* NaN stays NaN */
    return (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);               /* round to nearest even */
}

static _Thread_local void *scratch = NULL;
static _Thread_local size_t scratch_size = 0;

static void *scratch_for(size_t bytes) {
    if (bytes > scratch_size) {
        free(scratch);
        scratch = malloc(bytes);
        scratch_size = scratch ? bytes : 0;
    }
    return scratch;
}

/* Quantizes the activations of (T, K) ``x`` into the caller's scratch: returns 0 on success. */
int hcp_prepare_activations(const void *x, int x_bf16, int64_t T, int64_t K, int64_t group_size, int8_t *xq, float *sx,
                            float *xs) {
    if (!x_bf16) {
        hcp_quantize_activations((const float *)x, T, K, group_size, xq, sx, xs);
        return 0;
    }
    float *x32 = (float *)scratch_for((size_t)(T * K) * sizeof(float));
    if (!x32) return 1;
    const uint16_t *xb = (const uint16_t *)x;
    for (int64_t i = 0; i < T * K; i++) x32[i] = bf16_to_f32(xb[i]);
    hcp_quantize_activations(x32, T, K, group_size, xq, sx, xs);
    return 0;
}

void hcp_finish_output(const float *y32, int64_t T, int64_t N, const float *bias, void *y, int y_bf16, int64_t r0,
                       int64_t r1) {
    for (int64_t t = 0; t < T; t++)
        for (int64_t o = r0; o < r1; o++) {
            const float v = y32[t * N + o] + (bias ? bias[o] : 0.0f);
            if (y_bf16)
                ((uint16_t *)y)[t * N + o] = f32_to_bf16(v);
            else
                ((float *)y)[t * N + o] = v;
        }
}

/* ---- sparse bf16 values (bitmask or N:M pruned, not quantized) -------------------------------------------------
 * Layout: per row the kept bf16 values in row-major order from val_off[o]; per 64-input block a 64-bit keep mask.
 * Each block's 64 bf16 activations are compressed by the mask (VBMI2 vpcompressw, 32 at a time) to line up with the
 * kept values, then multiplied pairwise with AVX512-BF16 vdpbf16ps into fp32. */
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi2,avx512bf16,popcnt")))
static void sparse_bf16_simd(const uint16_t *values, const int64_t *val_off, const uint64_t *masks, int64_t N,
                             int64_t K, const uint16_t *x, int64_t T, float *y, int64_t r0, int64_t r1) {
    const int64_t nb = K / BLOCK;
    for (int64_t o = r0; o < r1; o++) {
        const uint64_t *mr = masks + o * nb;
        for (int64_t t = 0; t < T; t++) {
            const uint16_t *vp = values + val_off[o];
            const uint16_t *xt = x + t * K;
            __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
            for (int64_t b = 0; b < nb; b++) {
                const uint64_t m = mr[b];
                const __mmask32 lo = (__mmask32)(m & 0xffffffffu), hi = (__mmask32)(m >> 32);
                const int nlo = __builtin_popcount(lo), nhi = __builtin_popcount(hi);
                const __m512i xlo = _mm512_maskz_compress_epi16(lo, _mm512_loadu_si512((const void *)(xt + b * BLOCK)));
                const __m512i xhi = _mm512_maskz_compress_epi16(hi, _mm512_loadu_si512((const void *)(xt + b * BLOCK + 32)));
                const __m512i vlo = _mm512_maskz_loadu_epi16((__mmask32)(nlo == 32 ? 0xffffffffu : (1u << nlo) - 1), vp);
                const __m512i vhi = _mm512_maskz_loadu_epi16((__mmask32)(nhi == 32 ? 0xffffffffu : (1u << nhi) - 1), vp + nlo);
                acc0 = _mm512_dpbf16_ps(acc0, (__m512bh)vlo, (__m512bh)xlo);
                acc1 = _mm512_dpbf16_ps(acc1, (__m512bh)vhi, (__m512bh)xhi);
                vp += nlo + nhi;
            }
            y[t * N + o] = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
        }
    }
}

static void sparse_bf16_scalar(const uint16_t *values, const int64_t *val_off, const uint64_t *masks, int64_t N,
                               int64_t K, const uint16_t *x, int64_t T, float *y, int64_t r0, int64_t r1) {
    const int64_t nb = K / BLOCK;
    for (int64_t o = r0; o < r1; o++)
        for (int64_t t = 0; t < T; t++) {
            const uint16_t *vp = values + val_off[o];
            float acc = 0.0f;
            for (int64_t b = 0; b < nb; b++) {
                const uint64_t m = masks[o * nb + b];
                for (int i = 0; i < BLOCK; i++)
                    if ((m >> i) & 1) acc += bf16_to_f32(*vp++) * bf16_to_f32(x[t * K + b * BLOCK + i]);
            }
            y[t * N + o] = acc;
        }
}

int hcp_has_bf16(void) {
    __builtin_cpu_init();
    return hcp_has_vnni() && __builtin_cpu_supports("avx512vbmi2") && __builtin_cpu_supports("avx512bf16");
}

void hcp_sparse_bf16_gemm(const uint16_t *values, const int64_t *val_off, const uint64_t *masks, int64_t N, int64_t K,
                          const uint16_t *x, int64_t T, float *y, int64_t r0, int64_t r1, int use_simd) {
    if (use_simd)
        sparse_bf16_simd(values, val_off, masks, N, K, x, T, y, r0, r1);
    else
        sparse_bf16_scalar(values, val_off, masks, N, K, x, T, y, r0, r1);
}

/* ---- a layer's plan: everything but the activations, built once at load time; scratch owned here -------------- */
typedef struct {
    int64_t kind; /* 2 = sparse bf16 values, 3 = dense int8, 4 / 5 = int4 in 16-row tiles, dense / sparse (tiled.c;
                     zs then points at the tiles' uint8 zero points) */
    int64_t N, K, group_size, simd;
    const void *w;          /* bf16 values (kind 2), int8 codes (kind 3) or tiled int4 codes (kinds 4, 5) */
    const int64_t *offsets; /* per-row value (kind 2) or per-tile byte (kind 5) offsets */
    const uint64_t *masks;  /* keep masks: per 64-input block (kind 2), per tile chunk half (kind 5) */
    const float *scale, *zs;
} hcp_plan;

static _Thread_local void *arena = NULL;
static _Thread_local size_t arena_size = 0;

#define ALIGN64(n) (((n) + 63) & ~(size_t)63)

void hcp_tiled_int4_gemm(const uint8_t *codes, const int64_t *tile_off, const uint64_t *masks, const float *scale,
                         const uint8_t *zero, int64_t N, int64_t K, int64_t group_size, const int8_t *xq,
                         const float *sx, const float *xs, int64_t T, float *y, int64_t r0, int64_t r1,
                         int use_simd); /* tiled.c */

/* Rows [r0, r1) of the product for the plan's kind (activations already prepared unless kind 2). */
static void plan_rows(const hcp_plan *p, const void *x, const int8_t *xq, const float *sx, const float *xs, int64_t T,
                      float *y32, int64_t r0, int64_t r1) {
    const int64_t N = p->N, K = p->K, gs = p->group_size;
    const int simd = (int)p->simd;
    switch (p->kind) {
    case 2: hcp_sparse_bf16_gemm((const uint16_t *)p->w, p->offsets, p->masks, N, K, (const uint16_t *)x, T, y32, r0,
                                 r1, simd); break;
    case 4:
    case 5: hcp_tiled_int4_gemm((const uint8_t *)p->w, p->offsets, p->masks, p->scale, (const uint8_t *)p->zs, N, K,
                                gs, xq, sx, xs, T, y32, r0, r1, simd); break;
    default: hcp_int8_gemm((const uint8_t *)p->w, p->scale, p->zs, N, K, gs, xq, sx, xs, T, y32, r0, r1, simd); break;
    }
}

int hcp_has_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* Threads for one layer: small work stays on the calling thread (a hand-off costs more than it saves, and on a
 * busy 2-core box it can stall for milliseconds); larger work uses the OpenMP team, which is torch's own
 * (libgomp is loaded once per process) so its size follows torch.set_num_threads. */
static int plan_threads(const hcp_plan *p, int64_t T) {
#ifdef _OPENMP
    const int64_t work = p->N * p->K * (T > 0 ? T : 1);
    return work >= 2000000 ? omp_get_max_threads() : 1;
#else
    (void)p; (void)T;
    return 1;
#endif
}

/* y (T, N) = x (T, K) W^T (+ bias), x and y float32 or bfloat16 (x_bf16). Returns 0, 1 when out of memory, 2 for
 * float32 activations into a bf16-values layer. */
int hcp_plan_linear(const hcp_plan *p, const void *x, int x_bf16, int64_t T, void *y, const float *bias) {
    const int64_t N = p->N, K = p->K, gs = p->group_size;
    const size_t q_bytes = ALIGN64((size_t)(T * K)), sx_bytes = ALIGN64((size_t)(T * (K / BLOCK)) * sizeof(float));
    const size_t xs_bytes = ALIGN64((size_t)(T * (K / gs)) * sizeof(float)), y_bytes = (size_t)(T * N) * sizeof(float);
    const size_t need = q_bytes + sx_bytes + xs_bytes + y_bytes;
    if (need > arena_size) {
        free(arena);
        arena = aligned_alloc(64, ALIGN64(need));
        arena_size = arena ? ALIGN64(need) : 0;
        if (!arena) return 1;
    }
    int8_t *xq = (int8_t *)arena;
    float *sx = (float *)((char *)arena + q_bytes), *xs = (float *)((char *)sx + sx_bytes);
    float *y32 = (float *)((char *)xs + xs_bytes);
    if (p->kind == 2) {
        if (!x_bf16) return 2;
    } else if (hcp_prepare_activations(x, x_bf16, T, K, gs, xq, sx, xs)) {
        return 1;
    }
    const int threads = plan_threads(p, T);
    if (threads <= 1) {
        plan_rows(p, x, xq, sx, xs, T, y32, 0, N);
    } else {
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
        {
            const int n = omp_get_num_threads(), id = omp_get_thread_num();
            const int64_t step = ((N + n - 1) / n + 15) & ~(int64_t)15; /* whole tiles of sixteen rows */
            const int64_t r0 = id * step, r1 = r0 + step < N ? r0 + step : N;
            if (r0 < r1) plan_rows(p, x, xq, sx, xs, T, y32, r0, r1);
        }
#endif
    }
    hcp_finish_output(y32, T, N, bias, y, x_bf16, 0, N);
    return 0;
}
