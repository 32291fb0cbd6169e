/* Few-row int8 products for ARM64 with the dot-product extension (ARMv8.2 `sdot`): q8rows's numbers
 * (csrc/q8rows.c) on 128-bit NEON registers.
 *
 * Same weights (int8 in [-127, 127], one fp32 scale per row, blocks of 16 rows) stored for 4-row passes,
 * as q8avx2 has them: each block as four quarters of 4 rows, each quarter chunk by chunk ([block][4]
 * [K / 64][4 rows][64 bytes]), so a pass reads one sequential run. Same input quantization (each row on
 * its own, amax / 127, nearest even, clamped to [-127, 127]), same exact int32 sums and the same float scaling, so
 * every output is bit for bit the one q8rows computes. `sdot` multiplies signed bytes by signed bytes into
 * int32 lanes, so the input needs no offset and `qsum` is not read.
 *
 * One input row at a time meets 4 weight rows in 4 accumulators (one output vector); the passes for more
 * input rows read a quarter again from cache. Threads (OpenMP) split the blocks.
 */
#include <arm_neon.h>
#include <stddef.h>
#include <stdint.h>

#define ROWS 4  /* weight rows per pass: one float32x4 of outputs */

/* Row i of x (K floats, K a multiple of 16) -> xq[i] (K bytes), xs[i] = amax / 127. */
static void quantize_rows(const float *x, int M, int K, int8_t *xq, float *xs) {
    const int32x4_t lo = vdupq_n_s32(-127), hi = vdupq_n_s32(127);
    for (int i = 0; i < M; i++) {
        const float *row = x + (size_t)i * K;
        float32x4_t vmax = vdupq_n_f32(0.0f);
        for (int k = 0; k < K; k += 4) vmax = vmaxq_f32(vmax, vabsq_f32(vld1q_f32(row + k)));
        float amax = vmaxvq_f32(vmax);
        xs[i] = amax / 127.0f;
        float32x4_t inv = vdupq_n_f32(amax > 0.0f ? 127.0f / amax : 0.0f);
        for (int k = 0; k < K; k += 16) {
            int16x8_t half[2];
            for (int j = 0; j < 2; j++) {
                int32x4_t a = vcvtnq_s32_f32(vmulq_f32(vld1q_f32(row + k + 8 * j), inv));  /* nearest even */
                int32x4_t b = vcvtnq_s32_f32(vmulq_f32(vld1q_f32(row + k + 8 * j + 4), inv));
                a = vminq_s32(vmaxq_s32(a, lo), hi);
                b = vminq_s32(vmaxq_s32(b, lo), hi);
                half[j] = vcombine_s16(vmovn_s32(a), vmovn_s32(b));
            }
            vst1q_s8(xq + (size_t)i * K + k, vcombine_s8(vmovn_s16(half[0]), vmovn_s16(half[1])));
        }
    }
}

/* Weight rows r0 .. r0 + 3 of the block at `w` times input row `x`: their exact int32 sums. */
static inline int32x4_t rows4(const int8_t *w, int r0, const int8_t *x, int K) {
    int32x4_t acc[ROWS];
    for (int r = 0; r < ROWS; r++) acc[r] = vdupq_n_s32(0);
    for (int k = 0; k < K; k += 64) {
        for (int h = 0; h < 64; h += 16) {
            int8x16_t xv = vld1q_s8(x + k + h);
            for (int r = 0; r < ROWS; r++)
                acc[r] = vdotq_s32(acc[r], xv, vld1q_s8(w + (size_t)r0 * K + (size_t)k * ROWS + r * 64 + h));
        }
    }
    return vpaddq_s32(vpaddq_s32(acc[0], acc[1]), vpaddq_s32(acc[2], acc[3]));  /* lane r: sum of acc[r] */
}

/* Block b (weight rows 16b .. 16b + 15) times every input row: 4 outputs at a time. */
static void block16(const int8_t *q, const float *scale, const float *bias, const int8_t *xq, const float *xs,
                    int M, int N, int K, float *out, int b) {
    const int8_t *w = q + (size_t)b * 16 * K;
    for (int r0 = 0; r0 < 16; r0 += ROWS) {
        int n0 = 16 * b + r0;
        float32x4_t wscale = vld1q_f32(scale + n0);
        for (int m = 0; m < M; m++) {
            float32x4_t v = vmulq_f32(vcvtq_f32_s32(rows4(w, r0, xq + (size_t)m * K, K)),
                                      vmulq_f32(vdupq_n_f32(xs[m]), wscale));
            if (bias) v = vaddq_f32(v, vld1q_f32(bias + n0));
            vst1q_f32(out + (size_t)m * N + n0, v);
        }
    }
}

/* q8rows_linear's contract: out (M, N) = x (M, K) @ (q * scale[:, None]).T (+ bias); `qsum` (unread
 * here) = row sums of q; `xq` (M * K bytes) and `xs` (M floats) are scratch. */
void q8neon_linear(const float *x, int M, int K, const int8_t *q, const float *scale, const int32_t *qsum,
                   const float *bias, int N, float *out, int8_t *xq, float *xs) {
    (void)qsum;
    quantize_rows(x, M, K, xq, xs);
#pragma omp parallel for schedule(static)
    for (int b = 0; b < N / 16; b++) block16(q, scale, bias, xq, xs, M, N, K, out, b);
}
