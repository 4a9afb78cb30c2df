/* 4-bit weight x int8 activation matrix products for the CPU (hf_compress_prompt.kernels.cpu).
 *
 * Weights stay in the stored layout (hf_compress_prompt/formats): row o holds in/2 bytes, byte k the codes of
 * inputs 2k (low nibble) and 2k+1 (high nibble). Activations are quantized per block of 64 inputs to int8 with one
 * float scale (as llama.cpp's Q8 does), and reordered inside each block as [evens | odds] so that a block's 32
 * weight bytes split into [low nibbles | high nibbles] line up with them for one VNNI dpbusd (u8 x s8 -> s32).
 *
 *   y[t, o] = sum_g scale[o,g] * sum_{b in g} sx[t,b] * sum_{i in b} q[o,i] xq[t,i]  -  sum_g zs[o,g] * XS[t,g]
 *   with zs = scale * zero and XS[t,g] = sum_{b in g} sx[t,b] * sum_{i in b} xq[t,i].
 *
 * Built at first use with the system C compiler (no torch headers); the AVX-512 path is compiled with target
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
/* x (T, K) float -> xq (T, K) int8 (in [evens | odds] order per block when ``permute``, else natural order),
 * sx (T, K/64) block scales, xs (T, G) = sum over each weight group of sx * sum(xq). */
void hcp_quantize_activations(const float *x, int64_t T, int64_t K, int64_t group_size, int8_t *xq, float *sx,
                              float *xs, int permute) {
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
            for (int i = 0; i < BLOCK / 2; i++) {
                const int even = (int)lrintf(v[2 * i] * inv), odd = (int)lrintf(v[2 * i + 1] * inv);
                q[permute ? i : 2 * i] = (int8_t)even;
                q[permute ? BLOCK / 2 + i : 2 * i + 1] = (int8_t)odd;
                sum += even + odd;
            }
            sx[t * nb + b] = s;
            xs[t * G + b / per_group] += s * (float)sum;
        }
    }
}

/* ---- dense integer codes: int4 and int8 -----------------------------------------------------------------------
 * One body serves both widths (``bits`` is a compile-time constant in each caller, so it folds away):
 *   int4: row o holds K/2 bytes, a 64-input block 32 bytes, unpacked to [low nibbles | high nibbles] to meet the
 *         activations' [evens | odds] order;
 *   int8: row o holds K bytes, byte k the code of input k (the 8-bit bit stream of the stored format), activations
 *         in natural order, a block loaded as is. */
#define ISA_VNNI "avx512f,avx512bw,avx512vl,avx512vnni"

static inline int64_t row_bytes(int64_t K, int bits) { return bits == 4 ? K / 2 : K; }

/* ---- portable path ------------------------------------------------------------------------------------------- */
static inline void dense_scalar(const uint8_t *w, const float *scale, const float *zs, int64_t N, int64_t K,
                                int64_t group_size, const int8_t *xq, const float *sx, const float *xs, int64_t T,
                                float *y, int64_t r0, int64_t r1, int bits) {
    const int64_t nb = K / BLOCK, per_group = group_size / BLOCK, G = K / group_size;
    for (int64_t o = r0; o < r1; o++) {
        const uint8_t *wr = w + o * row_bytes(K, bits);
        for (int64_t t = 0; t < T; t++) {
            float acc = 0.0f;
            for (int64_t b = 0; b < nb; b++) {
                const int8_t *qb = xq + t * K + b * BLOCK;
                int32_t dot = 0;
                if (bits == 4) {
                    const uint8_t *wb = wr + b * (BLOCK / 2);
                    for (int i = 0; i < BLOCK / 2; i++) dot += (wb[i] & 15) * qb[i] + (wb[i] >> 4) * qb[BLOCK / 2 + i];
                } else {
                    const uint8_t *wb = wr + b * BLOCK;
                    for (int i = 0; i < BLOCK; i++) dot += wb[i] * qb[i];
                }
                acc += scale[o * G + b / per_group] * sx[t * nb + b] * (float)dot;
            }
            for (int64_t g = 0; g < G; g++) acc -= zs[o * G + g] * xs[t * G + g];
            y[t * N + o] = acc;
        }
    }
}

/* ---- AVX-512 VNNI path --------------------------------------------------------------------------------------- */
#define TILE 8 /* tokens whose accumulators stay in registers while one weight row streams by */

/* 32 bytes = 64 codes -> [low nibbles (inputs 0, 2, .., 62) | high nibbles (1, 3, .., 63)] as 64 bytes. The bytes
 * are broadcast to both 256-bit halves straight from memory (a load, no shuffle port), and only the upper half's
 * 16-bit words are shifted right by 4 before the mask. */
__attribute__((target(ISA_VNNI), always_inline))
static inline __m512i unpack_block(const uint8_t *src) {
    const __m512i both = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)src));
    const __m512i shifted = _mm512_mask_srli_epi16(both, (__mmask32)0xFFFF0000u, both, 4);
    return _mm512_and_si512(shifted, _mm512_set1_epi8(0x0F));
}

/* Block b of a row's codes as 64 unsigned bytes in the activations' order. */
__attribute__((target(ISA_VNNI), always_inline))
static inline __m512i block_codes(const uint8_t *row, int64_t b, int bits) {
    return bits == 4 ? unpack_block(row + b * (BLOCK / 2)) : _mm512_loadu_si512((const void *)(row + b * BLOCK));
}

/* One token (decoding): four rows at a time, each with its own accumulator (independent dependency chains), sharing
 * every activation load; the next four rows are prefetched one cache line per 64 bytes of codes. */
__attribute__((target(ISA_VNNI), always_inline))
static inline void dense_gemv(const uint8_t *w, const float *scale, const float *zs, int64_t N, int64_t K,
                              int64_t group_size, const int8_t *xq, const float *sx, const float *xs, float *y,
                              int64_t r0, int64_t r1, int bits) {
    const int64_t nb = K / BLOCK, per_group = group_size / BLOCK, G = K / group_size, row = row_bytes(K, bits);
    const int64_t block_bytes = bits == 4 ? BLOCK / 2 : BLOCK;
    int64_t o = r0;
    for (; o + 3 < r1; o += 4) {
        const uint8_t *w0 = w + o * row, *w1 = w0 + row, *w2 = w1 + row, *w3 = w2 + row;
        const float *s0 = scale + o * G;
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
        const uint8_t *next = w0 + 4 * row;  /* the next four rows stream in while these four are used */
        const int prefetch = o + 7 < r1;
        for (int64_t b = 0; b < nb; b++) {
            if (prefetch && (bits == 8 || !(b & 1))) {
                const uint8_t *p = next + b * block_bytes;
                _mm_prefetch((const char *)p, _MM_HINT_T0);
                _mm_prefetch((const char *)(p + row), _MM_HINT_T0);
                _mm_prefetch((const char *)(p + 2 * row), _MM_HINT_T0);
                _mm_prefetch((const char *)(p + 3 * row), _MM_HINT_T0);
            }
            const __m512i a = _mm512_loadu_si512((const void *)(xq + b * BLOCK));
            const int64_t g = b / per_group;
            const float s = sx[b];
            const __m512i z = _mm512_setzero_si512();
            const __m512i d0 = _mm512_dpbusd_epi32(z, block_codes(w0, b, bits), a);
            const __m512i d1 = _mm512_dpbusd_epi32(z, block_codes(w1, b, bits), a);
            const __m512i d2 = _mm512_dpbusd_epi32(z, block_codes(w2, b, bits), a);
            const __m512i d3 = _mm512_dpbusd_epi32(z, block_codes(w3, b, bits), a);
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
    if (o < r1) dense_scalar(w, scale, zs, N, K, group_size, xq, sx, xs, 1, y, o, r1, bits);
}

/* One row at a time: its blocks are unpacked once and reused for a tile of tokens whose accumulators stay in
 * registers; per block and token one dpbusd (64 products into 16 int32 lanes), one convert, one fma. */
__attribute__((target(ISA_VNNI), always_inline))
static inline void dense_gemm(const uint8_t *w, const float *scale, const float *zs, int64_t N, int64_t K,
                              int64_t group_size, const int8_t *xq, const float *sx, const float *xs, int64_t T,
                              float *y, int64_t r0, int64_t r1, int bits) {
    const int64_t nb = K / BLOCK, per_group = group_size / BLOCK, G = K / group_size;
    for (int64_t o = r0; o < r1; o++) {
        const uint8_t *wr = w + o * row_bytes(K, bits);
        const float *sr = scale + o * G;
        for (int64_t t0 = 0; t0 < T; t0 += TILE) {
            const int64_t nt = T - t0 < TILE ? T - t0 : TILE;
            __m512 acc[TILE];
            for (int j = 0; j < TILE; j++) acc[j] = _mm512_setzero_ps();
            for (int64_t b = 0; b < nb; b++) {
                const __m512i codes = block_codes(wr, b, bits);
                const float sg = sr[b / per_group];
                for (int j = 0; j < nt; j++) {
                    const int64_t t = t0 + j;
                    const __m512i a = _mm512_loadu_si512((const void *)(xq + t * K + b * BLOCK));
                    const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), codes, a);  /* 16 x 4 products */
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

#define DENSE_ARGS w, scale, zs, N, K, group_size, xq, sx, xs
#define DENSE_PARAMS                                                                                                 \
    const uint8_t *w, const float *scale, const float *zs, int64_t N, int64_t K, int64_t group_size,                \
        const int8_t *xq, const float *sx, const float *xs, int64_t T, float *y, int64_t r0, int64_t r1
__attribute__((target(ISA_VNNI))) static void int4_vnni(DENSE_PARAMS) {
    if (T == 1) dense_gemv(DENSE_ARGS, y, r0, r1, 4);
    else dense_gemm(DENSE_ARGS, T, y, r0, r1, 4);
}
__attribute__((target(ISA_VNNI))) static void int8_vnni(DENSE_PARAMS) {
    if (T == 1) dense_gemv(DENSE_ARGS, y, r0, r1, 8);
    else dense_gemm(DENSE_ARGS, T, y, r0, r1, 8);
}

int hcp_has_vnni(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
}

/* y (T, N) for rows [r0, r1): callers split rows across threads. use_vnni: 1 = AVX-512 VNNI, 0 = portable. */
void hcp_int4_gemm(DENSE_PARAMS, int use_vnni) {
    if (use_vnni) int4_vnni(DENSE_ARGS, T, y, r0, r1);
    else dense_scalar(DENSE_ARGS, T, y, r0, r1, 4);
}

void hcp_int8_gemm(DENSE_PARAMS, int use_vnni) {
    if (use_vnni) int8_vnni(DENSE_ARGS, T, y, r0, r1);
    else dense_scalar(DENSE_ARGS, T, y, r0, r1, 8);
}
#undef DENSE_ARGS
#undef DENSE_PARAMS

/* ---- unstructured bitmask + int4 ------------------------------------------------------------------------------
 * Kernel layout (built at load time from the stored format): for row o, block b (64 inputs), a 64-bit keep mask
 * masks[o, b] and the block's n = popcount kept codes nibble-packed from a byte boundary (byte k: codes 2k | 2k+1),
 * rows concatenated, row_off[o] the byte offset of row o. Activations come in natural order: each block's kept
 * activations are compressed to the front (VBMI2 vpcompressb) and split [evens | odds] (VBMI vpermb) to line up
 * with the unpacked nibbles. The zero point only applies to kept weights: y -= zs * sx * sum(kept xq). */
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,avx512vbmi2,popcnt"), always_inline))
static inline __m512 bitmask_block(const uint8_t *cp, uint64_t m, __m512i a, __m512i even_odd,
                                   __m512i ones, const float *s_code, const float *s_zero, __m512 s_act, __m512 acc) {
    const __m512i kept = _mm512_maskz_compress_epi8((__mmask64)m, a);       /* kept activations first */
    const __m512i split = _mm512_permutexvar_epi8(even_odd, kept);          /* [evens | odds] */
    const __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), unpack_block(cp), split);
    const __m512i z = _mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, kept); /* sum of kept xq */
    /* scale * code-dot - zero*scale * kept-sum, then times the activation scale (broadcasts come from memory) */
    const __m512 v = _mm512_fmsub_ps(_mm512_cvtepi32_ps(d), _mm512_set1_ps(*s_code),
                                     _mm512_mul_ps(_mm512_cvtepi32_ps(z), _mm512_set1_ps(*s_zero)));
    return _mm512_fmadd_ps(v, s_act, acc);
}

/* Two rows at a time (independent chains, one activation load per block for both). */
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,avx512vbmi2,popcnt")))
static void bitmask_vnni(const uint8_t *codes, const int64_t *row_off, const uint64_t *masks, const float *scale,
                         const float *zs, int64_t N, int64_t K, int64_t group_size, const int8_t *xq, const float *sx,
                         int64_t T, float *y, int64_t r0, int64_t r1) {
    const int64_t nb = K / BLOCK, per_group = group_size / BLOCK, G = K / group_size;
    const __m512i ones = _mm512_set1_epi8(1);
    uint8_t order[64];
    for (int i = 0; i < 32; i++) { order[i] = (uint8_t)(2 * i); order[32 + i] = (uint8_t)(2 * i + 1); }
    const __m512i even_odd = _mm512_loadu_si512((const void *)order);
    int64_t o = r0;
    for (; o < r1; o += 2) {
        const int two = o + 1 < r1;
        const uint64_t *m0 = masks + o * nb, *m1 = two ? m0 + nb : m0;
        const float *s0 = scale + o * G, *z0 = zs + o * G;
        const float *s1 = two ? s0 + G : s0, *z1 = two ? z0 + G : z0;
        for (int64_t t = 0; t < T; t++) {
            const uint8_t *c0 = codes + row_off[o], *c1 = codes + row_off[two ? o + 1 : o];
            /* the next two rows (codes and masks) stream in while these two are used */
            const int ahead = t == 0 && o + 3 < r1;
            const int64_t ahead_shift = ahead ? row_off[o + 2] - row_off[o] : 0;
            const uint64_t *m_next = m0 + 2 * nb;
            const int8_t *xt = xq + t * K;
            const float *st = sx + t * nb;
            __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
            for (int64_t b = 0; b < nb; b++) {
                if (ahead && !(b & 1)) {
                    _mm_prefetch((const char *)(c0 + ahead_shift), _MM_HINT_T0);
                    _mm_prefetch((const char *)(c1 + ahead_shift), _MM_HINT_T0);
                    if (!(b & 7)) {
                        _mm_prefetch((const char *)(m_next + b), _MM_HINT_T0);
                        _mm_prefetch((const char *)(m_next + nb + b), _MM_HINT_T0);
                    }
                }
                const __m512i a = _mm512_loadu_si512((const void *)(xt + b * BLOCK));
                const __m512 s_act = _mm512_set1_ps(st[b]);
                const int64_t g = b / per_group;
                const uint64_t k0 = m0[b], k1 = m1[b];
                acc0 = bitmask_block(c0, k0, a, even_odd, ones, s0 + g, z0 + g, s_act, acc0);
                acc1 = bitmask_block(c1, k1, a, even_odd, ones, s1 + g, z1 + g, s_act, acc1);
                c0 += (__builtin_popcountll(k0) + 1) / 2;
                c1 += (__builtin_popcountll(k1) + 1) / 2;
            }
            y[t * N + o] = _mm512_reduce_add_ps(acc0);
            if (two) y[t * N + o + 1] = _mm512_reduce_add_ps(acc1);
        }
    }
}

static void bitmask_scalar(const uint8_t *codes, const int64_t *row_off, const uint64_t *masks, const float *scale,
                           const float *zs, int64_t N, int64_t K, int64_t group_size, const int8_t *xq, const float *sx,
                           int64_t T, float *y, int64_t r0, int64_t r1) {
    const int64_t nb = K / BLOCK, per_group = group_size / BLOCK, G = K / group_size;
    for (int64_t o = r0; o < r1; o++) {
        for (int64_t t = 0; t < T; t++) {
            const uint8_t *cp = codes + row_off[o];
            float acc = 0.0f;
            for (int64_t b = 0; b < nb; b++) {
                const uint64_t m = masks[o * nb + b];
                int32_t dot = 0, sum = 0, j = 0;
                for (int i = 0; i < BLOCK; i++) {
                    if (!((m >> i) & 1)) continue;
                    const int code = (cp[j / 2] >> (4 * (j & 1))) & 15;
                    const int v = xq[t * K + b * BLOCK + i];
                    dot += code * v;
                    sum += v;
                    j++;
                }
                const int64_t g = b / per_group;
                acc += sx[t * nb + b] * (scale[o * G + g] * (float)dot - zs[o * G + g] * (float)sum);
                cp += (j + 1) / 2;
            }
            y[t * N + o] = acc;
        }
    }
}

int hcp_has_vbmi2(void) {
    __builtin_cpu_init();
    return hcp_has_vnni() && __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("avx512vbmi2");
}

void hcp_bitmask_int4_gemm(const uint8_t *codes, const int64_t *row_off, const uint64_t *masks, const float *scale,
                           const float *zs, int64_t N, int64_t K, int64_t group_size, const int8_t *xq, const float *sx,
                           int64_t T, float *y, int64_t r0, int64_t r1, int use_simd) {
    if (use_simd)
        bitmask_vnni(codes, row_off, masks, scale, zs, N, K, group_size, xq, sx, T, y, r0, r1);
    else
        bitmask_scalar(codes, row_off, masks, scale, zs, N, K, group_size, xq, sx, T, y, r0, r1);
}

/* ---- one call per layer: convert + quantize the activations, multiply, add the bias, write the output ---------
 * x: (T, K) in float32 (x_bf16 = 0) or bfloat16 (1); y: (T, N) float32 or bfloat16 (y_bf16); bias: float32 or NULL.
 * kind: 0 = dense int4 (w, scale, zs), 1 = bitmask + int4 (w = codes, row_off, masks, scale, zs). Rows [r0, r1). */
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
int hcp_prepare_activations(const void *x, int x_bf16, int64_t T, int64_t K, int64_t group_size, int permute,
                            int8_t *xq, float *sx, float *xs) {
    if (!x_bf16) {
        hcp_quantize_activations((const float *)x, T, K, group_size, xq, sx, xs, permute);
        return 0;
    }
    float *x32 = (float *)scratch_for((size_t)(T * K) * sizeof(float));
    if (!x32) return 1;
    const uint16_t *xb = (const uint16_t *)x;
    for (int64_t i = 0; i < T * K; i++) x32[i] = bf16_to_f32(xb[i]);
    hcp_quantize_activations(x32, T, K, group_size, xq, sx, xs, permute);
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
    return hcp_has_vbmi2() && __builtin_cpu_supports("avx512bf16");
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
    int64_t kind; /* 0 = dense int4, 1 = bitmask + int4, 2 = sparse bf16 values, 3 = dense int8 */
    int64_t N, K, group_size, simd;
    const void *w;          /* int4 codes (kinds 0, 1), bf16 values (kind 2) or int8 codes (kind 3) */
    const int64_t *offsets; /* per-row byte (kind 1) or value (kind 2) offsets */
    const uint64_t *masks;  /* per 64-input block keep masks (kinds 1, 2) */
    const float *scale, *zs;
} hcp_plan;

static _Thread_local void *arena = NULL;
static _Thread_local size_t arena_size = 0;

#define ALIGN64(n) (((n) + 63) & ~(size_t)63)

/* Rows [r0, r1) of the product for the plan's kind (activations already prepared unless kind 2). */
static void plan_rows(const hcp_plan *p, const void *x, const int8_t *xq, const float *sx, const float *xs, int64_t T,
                      float *y32, int64_t r0, int64_t r1) {
    const int64_t N = p->N, K = p->K, gs = p->group_size;
    const int simd = (int)p->simd;
    switch (p->kind) {
    case 0: hcp_int4_gemm((const uint8_t *)p->w, p->scale, p->zs, N, K, gs, xq, sx, xs, T, y32, r0, r1, simd); break;
    case 1: hcp_bitmask_int4_gemm((const uint8_t *)p->w, p->offsets, p->masks, p->scale, p->zs, N, K, gs, xq, sx, T,
                                  y32, r0, r1, simd); break;
    case 2: hcp_sparse_bf16_gemm((const uint16_t *)p->w, p->offsets, p->masks, N, K, (const uint16_t *)x, T, y32, r0,
                                 r1, simd); break;
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
    } else if (hcp_prepare_activations(x, x_bf16, T, K, gs, p->kind == 0, xq, sx, xs)) {
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
            const int64_t step = ((N + n - 1) / n + 3) & ~(int64_t)3; /* whole groups of four rows */
            const int64_t r0 = id * step, r1 = r0 + step < N ? r0 + step : N;
            if (r0 < r1) plan_rows(p, x, xq, sx, xs, T, y32, r0, r1);
        }
#endif
    }
    hcp_finish_output(y32, T, N, bias, y, x_bf16, 0, N);
    return 0;
}
