/* Few-row int8 products for AVX2 CPUs: q8rows's numbers (csrc/q8rows.c) on 256-bit registers.
 *
 * Same weights (int8 in [-127, 127], one fp32 scale per row, blocks of 16 rows) stored for 4-row passes:
 * each block as four quarters of 4 rows, each quarter chunk by chunk ([block][4][K / 64][4 rows][64
 * bytes]), so a pass reads one sequential run. Same input quantization (each row on its own,
 * amax / 127, nearest even, clamped to [-127, 127]), same exact int32 sums and the same float scaling, so
 * every output is bit for bit the one q8rows computes.
 *
 * The multiply, by what the CPU has:
 * - AVX2 (`vpmaddubsw`): it multiplies unsigned by signed bytes and adds pairs into int16 with
 *   saturation. Fed |x| (0..127) and w with x's sign (`vpsignb`; w is never -128, so the negation is
 *   exact), a pair is at most 2 * 127 * 127 = 32258 < 32767: it never saturates. `vpmaddwd` by ones then
 *   widens the pairs into int32.
 * - AVX-VNNI (built with -mavxvnni: `vpdpbusd` on ymm, VEX-encoded): u8 x s8 straight into int32, no
 *   int16 step; the input is stored as x + 128 and 128 * sum(w) taken off per output, as q8rows does.
 *
 * Two input rows at a time meet 4 weight rows in 8 accumulators, each weight vector loaded once for both
 * (AVX2 has 16 ymm registers: 8 chains, the two inputs, their magnitudes and a weight); a quarter's
 * passes for more input rows read it again from cache. Each pass asks for its weights PREFETCH_BYTES
 * ahead (measured on an AVX2-only AMD EPYC: with the sequential quarters, 2 input rows went from 20 to 25
 * GB/s of weights; from the 16-row chunk order, 16 GB/s). Threads (OpenMP, torch's runtime) split the
 * blocks.
 */
#include <immintrin.h>
#include <stdint.h>

#define ROWS 4  /* weight rows per pass */
#define PREFETCH_BYTES 2048  /* how far ahead of a pass its weights are asked for */
#ifdef __AVXVNNI__
#define OFFSET 128  /* int8 -> uint8 for vpdpbusd */
#endif

static float hmax8(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

/* Row i of x (K floats, K a multiple of 32) -> xq[i] (K bytes), xs[i] = amax / 127. */
static void quantize_rows(const float *x, int M, int K, int8_t *xq, float *xs) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256i lo = _mm256_set1_epi32(-127), hi = _mm256_set1_epi32(127);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  /* undoes the packs' lane interleave */
    for (int i = 0; i < M; i++) {
        const float *row = x + (size_t)i * K;
        __m256 vmax = _mm256_setzero_ps();
        for (int k = 0; k < K; k += 8) vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign, _mm256_loadu_ps(row + k)));
        float amax = hmax8(vmax);
        xs[i] = amax / 127.0f;
        __m256 inv = _mm256_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
        for (int k = 0; k < K; k += 32) {
            __m256i q[4];
            for (int j = 0; j < 4; j++) {
                q[j] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(row + k + 8 * j), inv)); /* nearest even */
                q[j] = _mm256_min_epi32(_mm256_max_epi32(q[j], lo), hi);
            }
            __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
            bytes = _mm256_permutevar8x32_epi32(bytes, order);
#ifdef OFFSET
            bytes = _mm256_xor_si256(bytes, _mm256_set1_epi8((char)0x80));  /* q + 128 as an unsigned byte */
#endif
            _mm256_storeu_si256((__m256i *)(xq + (size_t)i * K + k), bytes);
        }
    }
}

/* 4 vectors of int32 partial sums -> one vector whose lane i is the sum of v[i]. */
static inline __attribute__((always_inline)) __m128i sum4(__m256i v0, __m256i v1, __m256i v2, __m256i v3) {
    __m256i s = _mm256_hadd_epi32(_mm256_hadd_epi32(v0, v1), _mm256_hadd_epi32(v2, v3));
    return _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
}

/* acc += the products of 32 input bytes `xv` (|xv| in `xabs`) and 32 weight bytes `w`. */
static inline __attribute__((always_inline)) __m256i dot32(__m256i acc, __m256i xv, __m256i xabs, __m256i w) {
#ifdef OFFSET
    (void)xabs;
    return _mm256_dpbusd_avx_epi32(acc, xv, w);
#else
    __m256i pairs = _mm256_maddubs_epi16(xabs, _mm256_sign_epi8(w, xv));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
#endif
}

/* The 4 weight rows of the quarter at `w` times `inputs` (1 or 2) input rows from `x` (`K` bytes apart):
 * their exact int32 sums in sums[i]. Each weight vector is loaded once for both input rows. */
static inline __attribute__((always_inline)) void rows4(const int8_t *w, const int8_t *x, int K,
                                                        int inputs, __m128i sums[2]) {
    __m256i acc[2][ROWS];
    for (int i = 0; i < 2; i++)
        for (int r = 0; r < ROWS; r++) acc[i][r] = _mm256_setzero_si256();
    for (int k = 0; k < K; k += 64) {
        const int8_t *chunk = w + (size_t)k * ROWS;
        for (int line = 0; line < ROWS * 64; line += 64)
            _mm_prefetch((const char *)(chunk + PREFETCH_BYTES + line), _MM_HINT_T0);
        for (int h = 0; h < 64; h += 32) {
            __m256i xv[2], xabs[2];
            for (int i = 0; i < inputs; i++) {
                xv[i] = _mm256_loadu_si256((const __m256i *)(x + (size_t)i * K + k + h));
                xabs[i] = _mm256_abs_epi8(xv[i]);
            }
            for (int r = 0; r < ROWS; r++) {
                __m256i wv = _mm256_load_si256((const __m256i *)(chunk + r * 64 + h));
                for (int i = 0; i < inputs; i++) acc[i][r] = dot32(acc[i][r], xv[i], xabs[i], wv);
            }
        }
    }
    for (int i = 0; i < inputs; i++) sums[i] = sum4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]);
}

/* Block b (weight rows 16b .. 16b + 15) times every input row: 4 outputs of 2 input rows at a time. */
static void block16(const int8_t *q, const float *scale, const int32_t *qsum, const float *bias,
                    const int8_t *xq, const float *xs, int M, int N, int K, float *out, int b) {
    const int8_t *w = q + (size_t)b * 16 * K;
    for (int r0 = 0; r0 < 16; r0 += ROWS) {
        int n0 = 16 * b + r0;
        __m128 wscale = _mm_loadu_ps(scale + n0);
#ifdef OFFSET
        __m128i offset = _mm_mullo_epi32(_mm_loadu_si128((const __m128i *)(qsum + n0)), _mm_set1_epi32(OFFSET));
#else
        (void)qsum;  /* signed inputs: no offset to take off */
        __m128i offset = _mm_setzero_si128();
#endif
        for (int m = 0; m < M; m += 2) {
            int inputs = m + 1 < M ? 2 : 1;
            __m128i sums[2];
            const int8_t *quarter = w + (size_t)r0 * K;
            if (inputs == 2) rows4(quarter, xq + (size_t)m * K, K, 2, sums);
            else rows4(quarter, xq + (size_t)m * K, K, 1, sums);
            for (int i = 0; i < inputs; i++) {
                __m128 v = _mm_mul_ps(_mm_cvtepi32_ps(_mm_sub_epi32(sums[i], offset)),
                                      _mm_mul_ps(_mm_set1_ps(xs[m + i]), wscale));
                if (bias) v = _mm_add_ps(v, _mm_loadu_ps(bias + n0));
                _mm_storeu_ps(out + (size_t)(m + i) * N + n0, v);
            }
        }
    }
}

/* q8rows_linear's contract: out (M, N) = x (M, K) @ (q * scale[:, None]).T (+ bias); `qsum[n]` =
 * sum_k q[n, k]; `xq` (M * K bytes) and `xs` (M floats) are scratch. */
void q8avx2_linear(const float *x, int M, int K, const int8_t *q, const float *scale, const int32_t *qsum,
                   const float *bias, int N, float *out, int8_t *xq, float *xs) {
    quantize_rows(x, M, K, xq, xs);
#pragma omp parallel for schedule(static)
    for (int b = 0; b < N / 16; b++) block16(q, scale, qsum, bias, xq, xs, M, N, K, out, b);
}
