/* Attention of decode rows (one new token each) over their regions of the engine's KV pool.
 *
 * One call per layer for every decode row of a pass, instead of one scaled_dot_product_attention
 * call per row: on the CPU torch's attention for a single query token costs ~40 us a call before
 * any work and runs general matrix-multiply code sized for larger problems (~200 us a row at
 * 1,100 positions on one core of the AMD host this was measured on; this kernel ~100 us).
 *
 * Each (row, KV head) is an independent item: the scores of the query heads sharing the KV head,
 * a softmax, and the weighted sum of the values, each key read once. The arithmetic is written in
 * fixed-width lanes so that the compiler vectorizes it without reordering any floating-point sum
 * (no -ffast-math): a row's result depends only on its own data, never on the rows beside it.
 *
 * Keys and values are float32, or bfloat16 (`KV_CACHE_DTYPE=bfloat16`: half the bytes a long row's step
 * reads) widened exactly to float32 as they are read; the arithmetic is float32 either way.
 *
 * Compiled when a worker starts, for the host it runs on (worker/cpu_attention.py).
 */
#include <stdint.h>
#include <stdlib.h>

#include "lanes.h"

/* exp(x) for x <= 0 (Cephes' expf polynomial after reducing by a multiple of ln 2), elementwise
 * so that it vectorizes; below -87 it returns exp(-87), which is 0 next to the maximum's exp(0). */
static inline float exp_nonpositive(float x)
{
    x = x < -87.0f ? -87.0f : x;
    int32_t n = (int32_t)(x * 1.44269504088896341f - 0.5f); /* x <= 0: rounds x / ln 2 to nearest */
    float fn = (float)n;
    float r = x - fn * 0.693359375f;
    r = r - fn * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union { int32_t i; float f; } two_n = { .i = (n + 127) << 23 };
    return p * two_n.f;
}

/* Element i of a key or value vector: float32, or bfloat16 widened (its 16 bits above 16 zero bits: exact).
 * `bf16` is a constant wherever this is inlined, so each kind compiles to its own loops. */
static inline __attribute__((always_inline)) float kv(const void *p, int64_t i, const int bf16)
{
    if (!bf16)
        return ((const float *)p)[i];
    const uint32_t wide = (uint32_t)((const uint16_t *)p)[i] << 16;
    float value;
    __builtin_memcpy(&value, &wide, sizeof value);
    return value;
}

/* LANES elements of a key or value vector from element i, widened as `kv` widens each. */
static inline __attribute__((always_inline)) lanes_t kv_lanes(const void *p, int64_t i, const int bf16)
{
    return bf16 ? load_bf16((const uint16_t *)p + i) : load((const float *)p + i);
}

/* q's dot with a key in LANES partial sums, added up by halves (`lanes_sum`): a fixed order, whatever the
 * batch. */
static inline __attribute__((always_inline)) float dot_kv(const float *restrict q, const void *restrict k, int64_t n,
                                                           const int bf16)
{
    const int64_t whole = n - n % LANES;
    lanes_t part = {0};
    for (int64_t d = 0; d < whole; d += LANES)
        part += load(q + d) * kv_lanes(k, d, bf16);
    float sum = lanes_sum(part);
    for (int64_t d = whole; d < n; d++)
        sum += q[d] * kv(k, d, bf16);
    return sum;
}

/* scores[0..n) := exp(scores - max(scores)); returns 1 / their sum. */
static float softmax_unnormalized(float *scores, int64_t n)
{
    float top[LANES];
    for (int i = 0; i < LANES; i++)
        top[i] = scores[0];
    int64_t l = 0;
    for (; l + LANES <= n; l += LANES)
        for (int i = 0; i < LANES; i++)
            top[i] = scores[l + i] > top[i] ? scores[l + i] : top[i];
    float m = top[0];
    for (int i = 1; i < LANES; i++)
        m = top[i] > m ? top[i] : m;
    for (int64_t k = l; k < n; k++)
        m = scores[k] > m ? scores[k] : m;

    float part[LANES] = {0};
    for (l = 0; l + LANES <= n; l += LANES)
        for (int i = 0; i < LANES; i++) {
            scores[l + i] = exp_nonpositive(scores[l + i] - m);
            part[i] += scores[l + i];
        }
    float sum = 0.0f;
    for (int i = 0; i < LANES; i++)
        sum += part[i];
    for (; l < n; l++) {
        scores[l] = exp_nonpositive(scores[l] - m);
        sum += scores[l];
    }
    return 1.0f / sum;
}

/* One (row, KV head): the `group` query heads at q (q_head_stride apart) attend over the n keys
 * and values at k, v; their outputs go to o, dim apart. scores holds group * n floats. Inlined
 * with dim a constant for the common head sizes, so that a head's accumulator stays in registers. */
static inline __attribute__((always_inline)) void attend(const float *restrict q, int64_t q_head_stride,
                                                         const void *restrict k, const void *restrict v, int64_t n,
                                                         int64_t group, const int64_t dim, float scale,
                                                         float *restrict scores, float *restrict o, const int bf16)
{
    const int64_t size = bf16 ? 2 : 4;
    for (int64_t l = 0; l < n; l++) /* each key read once, for every query head of the group */
        for (int64_t j = 0; j < group; j++)
            scores[j * n + l] = dot_kv(q + j * q_head_stride, (const char *)k + l * dim * size, dim, bf16) * scale;
    for (int64_t j = 0; j < group; j++) {
        const float inverse = softmax_unnormalized(scores + j * n, n);
        const float *p = scores + j * n;
        float acc[dim];
        for (int64_t d = 0; d < dim; d++)
            acc[d] = 0.0f;
        for (int64_t l = 0; l < n; l++)
            for (int64_t d = 0; d < dim; d++)
                acc[d] += p[l] * kv(v, l * dim + d, bf16);
        for (int64_t d = 0; d < dim; d++)
            o[j * dim + d] = acc[d] * inverse;
    }
}

/* One (row, KV head) with keys and values of either kind, `dim` a constant for the common head sizes. */
static void attend_item(const float *q, int64_t q_head_stride, const void *k, const void *v, int64_t n,
                        int64_t group, int64_t dim, float scale, float *scores, float *o, int bf16)
{
#define ATTEND(DIM, BF16) attend(q, q_head_stride, k, v, n, group, DIM, scale, scores, o, BF16)
    if (bf16)
        switch (dim) {
        case 64: ATTEND(64, 1); return;
        case 128: ATTEND(128, 1); return;
        default: ATTEND(dim, 1); return;
        }
    switch (dim) {
    case 64: ATTEND(64, 0); return;
    case 128: ATTEND(128, 0); return;
    default: ATTEND(dim, 0); return;
    }
#undef ATTEND
}

/* query: head h of the row whose token is t at query[h * q_head_stride + t * q_token_stride]
 * keys, values: [kv_heads, positions, dim], contiguous, float32 or (kv_bf16) bfloat16; a row's region
 * starts at region[r]
 * out: [tokens, heads, dim], contiguous
 * Returns 0, or -1 if scratch memory could not be had (out is then incomplete). */
int decode_attention(const float *query, int64_t q_head_stride, int64_t q_token_stride,
                     const void *keys, const void *values, int64_t positions,
                     const int64_t *token, const int64_t *region, const int64_t *length, int64_t rows,
                     int64_t heads, int64_t kv_heads, int64_t dim, float scale, float *out, int threads, int kv_bf16)
{
    const int64_t size = kv_bf16 ? 2 : 4;
    const int64_t group = heads / kv_heads;
    const int64_t items = rows * kv_heads;
    int failed = 0;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) reduction(| : failed)
    for (int64_t item = 0; item < items; item++) {
        const int64_t r = item / kv_heads, h = item % kv_heads, n = length[r];
        const void *k = (const char *)keys + (h * positions + region[r]) * dim * size;
        const void *v = (const char *)values + (h * positions + region[r]) * dim * size;
        const float *q = query + h * group * q_head_stride + token[r] * q_token_stride;
        float *o = out + (token[r] * heads + h * group) * dim;
        float *scores = malloc(sizeof(float) * (size_t)(group * n));
        if (scores == NULL) {
            failed = 1;
            continue;
        }
        attend_item(q, q_head_stride, k, v, n, group, dim, scale, scores, o, kv_bf16);
        free(scores);
    }
    return failed ? -1 : 0;
}
