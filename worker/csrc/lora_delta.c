/* LoRA deltas of the few-token rows of a pass (decode rows), each token on its own adapter slot.
 *
 * One call per adapted layer adds B[slot] . (A[slot] . x) to every such token's output, reading
 * the slot stacks in place: no activations gathered, no per-slot views, no index_add. torch did the
 * same in ~6 operator calls a layer (a shrink, a reshape, an expand, an add and their gathers),
 * ~40 us each on the CPU before any arithmetic, 210 layers a step on the embedded model.
 *
 * The layers that read one input (q/k/v, gate/up) keep their A stacks interleaved; the first of
 * them shrinks the input for all (`shrink` set), the others only expand their share of `h`.
 *
 * Every sum runs in a fixed order in fixed-width lanes (no -ffast-math, no reassociation), so a
 * token's delta depends only on its own input and slot, never on the tokens beside it.
 *
 * Compiled when a worker starts, for the host it runs on (worker/cpu_lora.py).
 */
#include <stdint.h>

#include "lanes.h"

#define BLOCK 4 /* ranks shrunk together: independent sums keep the multiply-add units busy */
#define CHUNK 64 /* output columns a thread expands at once, their sums held in registers */

/* out[j] = a_j . x for the BLOCK rows a_j = a + j * a_stride; each sum in the same lane order as one dot. */
static void dots(const float *restrict a, int64_t a_stride, const float *restrict x, int64_t n, float *out)
{
    const int64_t whole = n - n % LANES;
    float part[BLOCK][LANES] = {{0}};
    for (int64_t d = 0; d < whole; d += LANES)
        for (int j = 0; j < BLOCK; j++)
            for (int i = 0; i < LANES; i++)
                part[j][i] += a[j * a_stride + d + i] * x[d + i];
    for (int j = 0; j < BLOCK; j++) {
        float sum = 0.0f;
        for (int i = 0; i < LANES; i++)
            sum += part[j][i];
        for (int64_t d = whole; d < n; d++)
            sum += a[j * a_stride + d] * x[d];
        out[j] = sum;
    }
}

/* y[0..n) += sum over r of h[r] * b[r * b_stride + (0..n)], the sum over r in order. */
static inline void expand(const float *restrict h, const float *restrict b, int64_t b_stride, int64_t rank,
                          const int64_t n, float *restrict y)
{
    float acc[CHUNK];
    for (int64_t c = 0; c < n; c++)
        acc[c] = 0.0f;
    for (int64_t r = 0; r < rank; r++) {
        const float hr = h[r];
        const float *br = b + r * b_stride;
        for (int64_t c = 0; c < n; c++)
            acc[c] += hr * br[c];
    }
    for (int64_t c = 0; c < n; c++)
        y[c] += acc[c];
}

/* x: [tokens, in], rows x_stride apart; slot[t]: the token's slot, or `skip` (nothing added)
 * a: [slots + 1, max_rank, members, in], contiguous: the A stacks of the layers sharing x
 * h: [tokens, members, rank], contiguous: written for every member when `shrink`, else read
 * b: [slots + 1, max_rank, out], contiguous: this layer's (the `member`-th) B stack, transposed
 * y: [tokens, out], rows y_stride apart: y[t] += h[t, member] . b[slot[t], :rank] */
void lora_delta(const float *x, int64_t x_stride, int64_t tokens, const int64_t *slot, int64_t skip,
                const float *a, int64_t max_rank, int64_t members, int64_t in, int64_t rank,
                float *h, int shrink, int64_t member, const float *b, int64_t out, float *y, int64_t y_stride,
                int threads)
{
    const int64_t chunks = (out + CHUNK - 1) / CHUNK;
#pragma omp parallel num_threads(threads)
    {
        if (shrink) {
#pragma omp for schedule(static)
            for (int64_t item = 0; item < tokens * members; item++) {
                const int64_t t = item / members, m = item % members, s = slot[t];
                if (s == skip)
                    continue;
                const float *xt = x + t * x_stride;
                const float *as = a + (s * max_rank * members + m) * in; /* rank r at as + r * members * in */
                float *ht = h + (t * members + m) * rank;
                int64_t r = 0;
                for (; r + BLOCK <= rank; r += BLOCK)
                    dots(as + r * members * in, members * in, xt, in, ht + r);
                for (; r < rank; r++)
                    ht[r] = dot(as + r * members * in, xt, in);
            }
        }
#pragma omp for schedule(static)
        for (int64_t item = 0; item < tokens * chunks; item++) {
            const int64_t t = item / chunks, c0 = (item % chunks) * CHUNK, s = slot[t];
            if (s == skip)
                continue;
            const float *ht = h + (t * members + member) * rank;
            const float *bs = b + s * max_rank * out + c0;
            float *yt = y + t * y_stride + c0;
            if (out - c0 >= CHUNK)
                expand(ht, bs, out, rank, CHUNK, yt);
            else
                expand(ht, bs, out, rank, out - c0, yt);
        }
    }
}
