/* Few-row fp32 products for CPUs with AVX-512: out = x @ w.T (+ bias), as a decode step needs them.
 *
 * Weights: fp32 `w`, N rows of K (N a multiple of 16, K of 4), stored in blocks of 16 rows, each block
 * transposed: [block][k][16 rows], so a block streams from memory as one sequential run and one vector
 * load gives weight k of 16 output rows. Each output sums its K products in 4 partial sums (k mod 4),
 * each in k order, added as (p0 + p1) + (p2 + p3); every output is computed this way whatever else is in
 * the call, so a row's numbers never depend on which or how many other rows share it.
 *
 * Up to ROW_TILE input rows meet each loaded weight vector (4 x ROW_TILE accumulators in registers);
 * the block stays in cache for the next rows. Threads (OpenMP: the runtime torch has already loaded,
 * one thread pool) split the blocks.
 */
#include <immintrin.h>
#include <stdint.h>

#define ROW_TILE 6  /* 4 partial sums x 6 rows = 24 accumulators */

static inline __attribute__((always_inline)) void tile(const float *w, const float *x, int MT, int K, int N,
                                                      const float *bias, float *out) {
    __m512 acc[4][ROW_TILE];
    for (int p = 0; p < 4; p++)
        for (int m = 0; m < MT; m++) acc[p][m] = _mm512_setzero_ps();
    for (int k = 0; k < K; k += 4)
        for (int p = 0; p < 4; p++) {
            __m512 wv = _mm512_loadu_ps(w + (size_t)(k + p) * 16);
            for (int m = 0; m < MT; m++)
                acc[p][m] = _mm512_fmadd_ps(wv, _mm512_set1_ps(x[(size_t)m * K + k + p]), acc[p][m]);
        }
    for (int m = 0; m < MT; m++) {
        __m512 v = _mm512_add_ps(_mm512_add_ps(acc[0][m], acc[1][m]), _mm512_add_ps(acc[2][m], acc[3][m]));
        if (bias) v = _mm512_add_ps(v, _mm512_loadu_ps(bias));
        _mm512_storeu_ps(out + (size_t)m * N, v);
    }
}

/* The row-tile size as a constant, so the accumulators stay in registers. */
#define TILE_CASE(MT) case MT: tile(w, x + (size_t)m * K, MT, K, N, b, o); break;

/* out (M, N) = x (M, K) @ w.T (+ bias), w in the blocked layout above. */
void f32rows_linear(const float *x, int M, int K, const float *blocks, const float *bias, int N, float *out) {
#pragma omp parallel for schedule(static)
    for (int blk = 0; blk < N / 16; blk++) {
        const float *w = blocks + (size_t)blk * 16 * K;
        const float *b = bias ? bias + 16 * blk : 0;
        for (int m = 0; m < M; m += ROW_TILE) {
            float *o = out + (size_t)m * N + 16 * blk;
            switch (M - m < ROW_TILE ? M - m : ROW_TILE) {
                TILE_CASE(1) TILE_CASE(2) TILE_CASE(3) TILE_CASE(4) TILE_CASE(5) TILE_CASE(6)
            }
        }
    }
}
