/* 16-row tiles: int4 weights (dense, or sparse with the kept codes expanded in registers) x int8 activations.
 *
 * A row-major kernel (as the dense int8 one in linear.c) gives each output row its own accumulator, so every 64 inputs
 * cost a convert, a multiply-add and a horizontal sum per row and token. Here sixteen rows share one register: lane r
 * holds row r's sum, and one VNNI dpbusd multiplies four inputs of all sixteen rows by the same four activations
 * (broadcast from memory). Per 64 inputs and token the float work (convert, scale, add) is done once for sixteen rows,
 * and a tile's codes are one sequential stream (the hardware prefetcher follows it).
 *
 * Dense layout, built at load time from the stored format (hf_compress_prompt/formats): tiles of 16 rows (the
 * last padded with zero codes), per tile and 64-input block eight 64-byte chunks; chunk p holds inputs 8p..8p+7,
 * byte 4r + i of it has the code of input 8p + i of row r in its low nibble and input 8p + 4 + i in its high nibble.
 * Per tile and group: 16 float scales and 16 zero points (uint8).
 *
 * Sparse layout (unstructured bitmask or N:M): the same positions, but each chunk keeps only its kept codes; per
 * chunk two 64-bit keep masks (low-nibble positions, high-nibble positions), and byte j of the chunk's code stream
 * holds the j-th kept low-position code (low nibble) and the j-th kept high-position code (high nibble), so a chunk
 * takes max(kept low, kept high) bytes. VBMI2 vpexpandb puts the codes back in their lanes and fills the pruned
 * ones with the row's zero point, so a pruned weight is scale * (zero - zero) = 0 and the dense formula holds:
 *
 *   y[t, o] = sum_g scale[o,g] * (sum_{b in g} sx[t,b] * sum_{i in b} q[o,i] xq[t,i]  -  zero[o,g] * XS[t,g])
 *   XS[t,g] = sum_{b in g} sx[t,b] * sum_{i in b} xq[t,i]   (activations quantized per 64 inputs, natural order). */
#include <stdint.h>
#include <string.h>
#include <immintrin.h>

#define TBLOCK 64
#define ROWS 16
#define CHUNK 64 /* bytes of codes per 16 rows x 8 inputs (dense) */
#define ISA_TILED "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,avx512vbmi2,popcnt"

/* ---- portable path (and the definition of both layouts) -------------------------------------------------------- */
static void tiled_scalar(const uint8_t *codes, const int64_t *tile_off, const uint64_t *masks, const float *scale,
                         const uint8_t *zero, int64_t N, int64_t K, int64_t group_size, const int8_t *xq,
                         const float *sx, const float *xs, int64_t T, float *y, int64_t tile0, int64_t tile1) {
    const int64_t nb = K / TBLOCK, per_group = group_size / TBLOCK, G = K / group_size;
    for (int64_t tile = tile0; tile < tile1; tile++) {
        const float *st = scale + tile * G * ROWS;
        const uint8_t *zt = zero + tile * G * ROWS;
        for (int64_t t = 0; t < T; t++) {
            const uint8_t *cp = codes + (tile_off ? tile_off[tile] : tile * nb * 8 * CHUNK);
            const uint64_t *mp = masks ? masks + tile * nb * 16 : NULL;
            float acc[ROWS] = {0};
            for (int64_t b = 0; b < nb; b++) {
                const int64_t g = b / per_group;
                int32_t dot[ROWS] = {0};
                for (int p = 0; p < 8; p++) {
                    const int8_t *xp = xq + t * K + b * TBLOCK + 8 * p;
                    uint8_t q[2][64];
                    if (!mp) {
                        for (int j = 0; j < 64; j++) { q[0][j] = cp[j] & 15; q[1][j] = cp[j] >> 4; }
                        cp += CHUNK;
                    } else {
                        int n[2] = {0, 0};
                        for (int h = 0; h < 2; h++)
                            for (int j = 0; j < 64; j++)
                                q[h][j] = (mp[h] >> j) & 1 ? (cp[n[h]++] >> (4 * h)) & 15 : zt[g * ROWS + j / 4];
                        cp += n[0] > n[1] ? n[0] : n[1];
                        mp += 2;
                    }
                    for (int r = 0; r < ROWS; r++)
                        for (int i = 0; i < 4; i++) dot[r] += q[0][4 * r + i] * xp[i] + q[1][4 * r + i] * xp[4 + i];
                }
                for (int r = 0; r < ROWS; r++) acc[r] += st[g * ROWS + r] * sx[t * nb + b] * (float)dot[r];
            }
            for (int r = 0; r < ROWS; r++) {
                const int64_t o = tile * ROWS + r;
                if (o >= N) break;
                float v = acc[r];
                for (int64_t g = 0; g < G; g++) v -= st[g * ROWS + r] * (float)zt[g * ROWS + r] * xs[t * G + g];
                y[t * N + o] = v;
            }
        }
    }
}

/* ---- AVX-512 VNNI (+ VBMI2 for the sparse layout) ------------------------------------------------------------ */
/* One chunk's codes as two 64-byte registers (inputs 8p..8p+3 and 8p+4..8p+7 of all 16 rows). */
__attribute__((target(ISA_TILED), always_inline))
static inline void chunk_codes(const uint8_t **cp, const uint64_t **mp, __m512i fill, int sparse, __m512i *lo,
                               __m512i *hi) {
    const __m512i nib = _mm512_set1_epi8(0x0F);
    const __m512i c = _mm512_loadu_si512((const void *)*cp);
    const __m512i l = _mm512_and_si512(c, nib), h = _mm512_and_si512(_mm512_srli_epi16(c, 4), nib);
    if (!sparse) {
        *lo = l;
        *hi = h;
        *cp += CHUNK;
        return;
    }
    const uint64_t m0 = (*mp)[0], m1 = (*mp)[1];
    *lo = _mm512_mask_expand_epi8(fill, (__mmask64)m0, l);
    *hi = _mm512_mask_expand_epi8(fill, (__mmask64)m1, h);
    const int n0 = __builtin_popcountll(m0), n1 = __builtin_popcountll(m1);
    *cp += n0 > n1 ? n0 : n1;
    *mp += 2;
}

/* The tile's 16 zero points (uint8) widened to 4 bytes each (the pruned codes' fill). */
__attribute__((target(ISA_TILED), always_inline))
static inline __m512i zero_fill(const uint8_t *z) {
    const __m128i z16 = _mm_loadu_si128((const __m128i *)z);
    return _mm512_permutexvar_epi8(_mm512_set_epi8(15, 15, 15, 15, 14, 14, 14, 14, 13, 13, 13, 13, 12, 12, 12, 12,
                                                   11, 11, 11, 11, 10, 10, 10, 10, 9, 9, 9, 9, 8, 8, 8, 8, 7, 7, 7, 7,
                                                   6, 6, 6, 6, 5, 5, 5, 5, 4, 4, 4, 4, 3, 3, 3, 3, 2, 2, 2, 2, 1, 1,
                                                   1, 1, 0, 0, 0, 0),
                                   _mm512_castsi128_si512(z16));
}

__attribute__((target(ISA_TILED), always_inline))
static inline __m512 zero_points(const uint8_t *z) {
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)z)));
}

/* NT tokens (a compile-time constant in each caller) against one tile: the codes of each chunk are unpacked once
 * and used by every token; per token two (NT > 2) or four int32 accumulators and one float accumulator stay in
 * registers. */
__attribute__((target(ISA_TILED), always_inline))
static inline void tile_tokens(const uint8_t *cp, const uint64_t *mp, const float *st, const uint8_t *zt, int64_t N,
                               int64_t K, int64_t group_size, const int8_t *xq, const float *sx, const float *xs,
                               float *y, int64_t tile, int64_t t0, const int NT, int sparse) {
    const int64_t nb = K / TBLOCK, per_group = group_size / TBLOCK, G = K / group_size;
    __m512 acc[8];
    for (int j = 0; j < NT; j++) acc[j] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const int64_t g = b / per_group;
        const __m512i fill = sparse ? zero_fill(zt + g * ROWS) : _mm512_setzero_si512();
        /* two independent dpbusd chains per token, four when few tokens leave registers free (one token: the
         * chains' latency, not the throughput, would otherwise bound a block) */
        __m512i dot[8], dot2[8], dot3[2], dot4[2];
        for (int j = 0; j < NT; j++) dot[j] = dot2[j] = _mm512_setzero_si512();
        for (int j = 0; j < 2; j++) dot3[j] = dot4[j] = _mm512_setzero_si512();
        const int8_t *xb = xq + t0 * K + b * TBLOCK;
        for (int p = 0; p < 8; p += 2) { /* two chunks per step */
            __m512i lo, hi, lo2, hi2;
            chunk_codes(&cp, &mp, fill, sparse, &lo, &hi);
            chunk_codes(&cp, &mp, fill, sparse, &lo2, &hi2);
            for (int j = 0; j < NT; j++) {
                const int8_t *xp = xb + j * K + 8 * p;
                int32_t a0, a1, a2, a3;
                memcpy(&a0, xp, 4); memcpy(&a1, xp + 4, 4); memcpy(&a2, xp + 8, 4); memcpy(&a3, xp + 12, 4);
                dot[j] = _mm512_dpbusd_epi32(dot[j], lo, _mm512_set1_epi32(a0));
                dot2[j] = _mm512_dpbusd_epi32(dot2[j], lo2, _mm512_set1_epi32(a2));
                if (NT <= 2) {
                    dot3[j] = _mm512_dpbusd_epi32(dot3[j], hi, _mm512_set1_epi32(a1));
                    dot4[j] = _mm512_dpbusd_epi32(dot4[j], hi2, _mm512_set1_epi32(a3));
                } else {
                    dot[j] = _mm512_dpbusd_epi32(dot[j], hi, _mm512_set1_epi32(a1));
                    dot2[j] = _mm512_dpbusd_epi32(dot2[j], hi2, _mm512_set1_epi32(a3));
                }
            }
        }
        if (NT <= 2)
            for (int j = 0; j < NT; j++) {
                dot[j] = _mm512_add_epi32(dot[j], dot3[j]);
                dot2[j] = _mm512_add_epi32(dot2[j], dot4[j]);
            }
        const __m512 s = _mm512_loadu_ps(st + g * ROWS);
        for (int j = 0; j < NT; j++) {
            const __m512 d = _mm512_cvtepi32_ps(_mm512_add_epi32(dot[j], dot2[j]));
            acc[j] = _mm512_fmadd_ps(d, _mm512_mul_ps(s, _mm512_set1_ps(sx[(t0 + j) * nb + b])), acc[j]);
        }
    }
    const int64_t rows = N - tile * ROWS < ROWS ? N - tile * ROWS : ROWS;
    const __mmask16 keep = (__mmask16)((1u << rows) - 1);
    for (int j = 0; j < NT; j++) {
        __m512 v = acc[j];
        for (int64_t g = 0; g < G; g++) {
            const __m512 zs = _mm512_mul_ps(_mm512_loadu_ps(st + g * ROWS), zero_points(zt + g * ROWS));
            v = _mm512_fnmadd_ps(zs, _mm512_set1_ps(xs[(t0 + j) * G + g]), v);
        }
        _mm512_mask_storeu_ps(y + (t0 + j) * N + tile * ROWS, keep, v);
    }
}

__attribute__((target(ISA_TILED)))
static void tiled_simd(const uint8_t *codes, const int64_t *tile_off, const uint64_t *masks, const float *scale,
                       const uint8_t *zero, int64_t N, int64_t K, int64_t group_size, const int8_t *xq,
                       const float *sx, const float *xs, int64_t T, float *y, int64_t tile0, int64_t tile1) {
    const int64_t nb = K / TBLOCK, G = K / group_size;
    const int sparse = masks != NULL;
    for (int64_t tile = tile0; tile < tile1; tile++) {
        const uint8_t *cp = codes + (sparse ? tile_off[tile] : tile * nb * 8 * CHUNK);
        const uint64_t *mp = sparse ? masks + tile * nb * 16 : NULL;
        const float *st = scale + tile * G * ROWS;
        const uint8_t *zt = zero + tile * G * ROWS;
        int64_t t0 = 0;
#define TOKENS(NT)                                                                                                   \
    for (; T - t0 >= NT; t0 += NT) {                                                                                  \
        if (sparse) tile_tokens(cp, mp, st, zt, N, K, group_size, xq, sx, xs, y, tile, t0, NT, 1);                   \
        else tile_tokens(cp, mp, st, zt, N, K, group_size, xq, sx, xs, y, tile, t0, NT, 0);                          \
    }
        TOKENS(8)
        TOKENS(4)
        TOKENS(2)
        TOKENS(1)
#undef TOKENS
    }
}

int hcp_has_tiled(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") &&
           __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("avx512vbmi2");
}

/* y (T, N) for rows [r0, r1) (r0 a multiple of 16). masks == NULL: the dense layout (tile_off unused). */
void hcp_tiled_int4_gemm(const uint8_t *codes, const int64_t *tile_off, const uint64_t *masks, const float *scale,
                         const uint8_t *zero, int64_t N, int64_t K, int64_t group_size, const int8_t *xq,
                         const float *sx, const float *xs, int64_t T, float *y, int64_t r0, int64_t r1,
                         int use_simd) {
    const int64_t tile0 = r0 / ROWS, tile1 = (r1 + ROWS - 1) / ROWS;
    if (use_simd)
        tiled_simd(codes, tile_off, masks, scale, zero, N, K, group_size, xq, sx, xs, T, y, tile0, tile1);
    else
        tiled_scalar(codes, tile_off, masks, scale, zero, N, K, group_size, xq, sx, xs, T, y, tile0, tile1);
}
