/* Few-row int8 products for CPUs with AVX512-VNNI: out = x @ (q * scale).T, as a decode step needs them.
 *
 * Weights: int8 `q`, N rows of K (N a multiple of 16, K of 64), one fp32 scale per row (output channel),
 * stored in blocks of 16 rows, each block chunk by chunk: [block][K / 64 chunks][16 rows][64 bytes], so a
 * block streams from memory as one sequential run. Each input row is quantized on its own (symmetric,
 * amax / 127) and stored as unsigned bytes (q + 128) for vpdpbusd; the 128 * sum(q) that the offset adds
 * is taken off per output. The sums are exact int32 and each output is computed the same way whatever
 * else is in the call, so a row's result never depends on which or how many other rows share it.
 *
 * One input row at a time meets a block of 16 weight rows in 16 accumulators (16 independent chains);
 * the block stays in cache for the call's other rows. Threads (OpenMP: the runtime torch has already
 * loaded, one thread pool) split the blocks.
 */
#include <immintrin.h>
#include <stdint.h>

#define OFFSET 128  /* int8 -> uint8 */

/* Row i of x (K floats, K a multiple of 16) -> xq[i] (K bytes, q + 128), xs[i] = amax / 127. */
static void quantize_rows(const float *x, int M, int K, uint8_t *xq, float *xs) {
    const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127), off = _mm512_set1_epi32(OFFSET);
    for (int i = 0; i < M; i++) {
        const float *row = x + (size_t)i * K;
        __m512 vmax = _mm512_setzero_ps();
        for (int k = 0; k < K; k += 16) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_loadu_ps(row + k)));
        float amax = _mm512_reduce_max_ps(vmax);
        xs[i] = amax / 127.0f;
        __m512 inv = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
        for (int k = 0; k < K; k += 16) {
            __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(row + k), inv)); /* nearest even */
            q = _mm512_add_epi32(_mm512_min_epi32(_mm512_max_epi32(q, lo), hi), off);
            _mm_storeu_si128((__m128i *)(xq + (size_t)i * K + k), _mm512_cvtepi32_epi8(q));
        }
    }
}

/* 16 vectors of int32 partial sums -> one vector whose lane i is the sum of v[i]: three rounds of
 * interleave-and-add (32-bit, 64-bit, 128-bit lanes), 45 instructions for 16 sums. */
static inline __attribute__((always_inline)) __m512i sum16(const __m512i v[16]) {
    __m512i t[8], u[4], w[2];
    for (int i = 0; i < 8; i++)
        t[i] = _mm512_add_epi32(_mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]),
                                _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++)  /* each 128-bit lane: partial sums of v[4i .. 4i+3] */
        u[i] = _mm512_add_epi32(_mm512_unpacklo_epi64(t[2 * i], t[2 * i + 1]),
                                _mm512_unpackhi_epi64(t[2 * i], t[2 * i + 1]));
    for (int i = 0; i < 2; i++)
        w[i] = _mm512_add_epi32(_mm512_shuffle_i64x2(u[2 * i], u[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                                _mm512_shuffle_i64x2(u[2 * i], u[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_epi32(_mm512_shuffle_i64x2(w[0], w[1], _MM_SHUFFLE(2, 0, 2, 0)),
                            _mm512_shuffle_i64x2(w[0], w[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

/* Block b (weight rows 16b .. 16b + 15) times every input row: 16 outputs per row, stored at once. */
static void block16(const int8_t *q, const float *scale, const int32_t *qsum, const float *bias,
                    const uint8_t *xq, const float *xs, int M, int N, int K, float *out, int b) {
    const int8_t *w = q + (size_t)b * 16 * K;
    int n0 = 16 * b;
    __m512i offset = _mm512_mullo_epi32(_mm512_loadu_si512(qsum + n0), _mm512_set1_epi32(OFFSET));
    __m512 wscale = _mm512_loadu_ps(scale + n0);
    for (int m = 0; m < M; m++) {
        const uint8_t *x = xq + (size_t)m * K;
        __m512i acc[16];
        for (int r = 0; r < 16; r++) acc[r] = _mm512_setzero_si512();
        for (int k = 0; k < K; k += 64) {
            __m512i xv = _mm512_loadu_si512(x + k);
            for (int r = 0; r < 16; r++)
                acc[r] = _mm512_dpbusd_epi32(acc[r], xv, _mm512_load_si512(w + (size_t)k * 16 + r * 64));
        }
        __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(sum16(acc), offset)),
                                 _mm512_mul_ps(_mm512_set1_ps(xs[m]), wscale));
        if (bias) v = _mm512_add_ps(v, _mm512_loadu_ps(bias + n0));
        _mm512_storeu_ps(out + (size_t)m * N + n0, v);
    }
}

/* out (M, N) = x (M, K) @ (q * scale[:, None]).T (+ bias); `qsum[n]` = sum_k q[n, k];
 * `xq` (M * K bytes) and `xs` (M floats) are scratch. */
void q8rows_linear(const float *x, int M, int K, const int8_t *q, const float *scale, const int32_t *qsum,
                   const float *bias, int N, float *out, uint8_t *xq, float *xs) {
    quantize_rows(x, M, K, xq, xs);
#pragma omp parallel for schedule(static)
    for (int b = 0; b < N / 16; b++) block16(q, scale, qsum, bias, xq, xs, M, N, K, out, b);
}
