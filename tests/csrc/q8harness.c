/* Runs one int8 kernel (its source compiled in with this file) on a problem read from a file and writes
 * its output: the way tests run a kernel for another CPU under qemu-user, or one not loaded by ctypes.
 *
 * Usage: q8harness IN OUT. IN: int32 M, K, N, has_bias; float x[M * K]; int8 blocks[N * K] (the
 * kernel's layout, q8_layout); float scale[N]; int32 qsum[N]; float bias[N] if has_bias. OUT: float out[M * N].
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

void KERNEL_ENTRY(const float *x, int M, int K, const int8_t *q, const float *scale, const int32_t *qsum,
                  const float *bias, int N, float *out, int8_t *xq, float *xs);

static void *read_n(FILE *f, size_t bytes) {
    void *p = aligned_alloc(64, (bytes + 63) / 64 * 64);
    if (!p || fread(p, 1, bytes, f) != bytes) {
        fprintf(stderr, "short input\n");
        exit(2);
    }
    return p;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s IN OUT\n", argv[0]);
        return 2;
    }
    FILE *in = fopen(argv[1], "rb");
    if (!in) return 2;
    int32_t *head = read_n(in, 4 * sizeof(int32_t));
    int M = head[0], K = head[1], N = head[2];
    float *x = read_n(in, (size_t)M * K * sizeof(float));
    int8_t *q = read_n(in, (size_t)N * K);
    float *scale = read_n(in, (size_t)N * sizeof(float));
    int32_t *qsum = read_n(in, (size_t)N * sizeof(int32_t));
    float *bias = head[3] ? read_n(in, (size_t)N * sizeof(float)) : NULL;
    fclose(in);
    float *out = malloc((size_t)M * N * sizeof(float)), *xs = malloc((size_t)M * sizeof(float));
    int8_t *xq = malloc((size_t)M * K);
    KERNEL_ENTRY(x, M, K, q, scale, qsum, bias, N, out, xq, xs);
    FILE *f = fopen(argv[2], "wb");
    if (!f || fwrite(out, sizeof(float), (size_t)M * N, f) != (size_t)M * N) return 2;
    return fclose(f) != 0;
}
