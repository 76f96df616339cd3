/* RMS normalization of rows, as Llama-style models compute it in float32: each row x of n values becomes
 * w * (x * (1 / sqrt(mean(x * x) + eps))), w the layer's weight.
 *
 * transformers' RMSNorm layer is five or six tensor operations (a square, a mean, an add, a reciprocal square
 * root and two products), each a few microseconds on the CPU before any arithmetic; the embedded model has 61
 * such layers, two a decoder layer and one last, on every forward pass. This is one call a layer.
 *
 * A row's sum of squares runs over its values in LANES partial sums in order, added by halves (`lanes_sum`),
 * then the values past the last whole lane group one by one: a row's result depends only on that row, never
 * on the rows beside it, and a pass of many rows (a prompt chunk) spreads them over the threads.
 *
 * Compiled when a worker starts, for the host it runs on (worker/cpu_norm.py).
 */
#include <math.h>
#include <stdint.h>

#include "lanes.h"

#define PARALLEL_FROM 65536 /* values in a call from which its rows are spread over the threads */

/* x: [tokens, n], rows x_stride apart; w: [n]; y: [tokens, n], rows y_stride apart (may be x) */
void rms_norm(const float *x, int64_t x_stride, int64_t tokens, int64_t n, const float *w, float eps, float *y,
              int64_t y_stride, int threads)
{
#pragma omp parallel for num_threads(threads) schedule(static) if (tokens * n >= PARALLEL_FROM)
    for (int64_t t = 0; t < tokens; t++) {
        const float *xt = x + t * x_stride;
        float *yt = y + t * y_stride;
        const int64_t whole = n - n % LANES;
        lanes_t part = {0};
        for (int64_t d = 0; d < whole; d += LANES) {
            const lanes_t v = load(xt + d);
            part += v * v; /* one loop computes every row's sum: the same arithmetic for each */
        }
        float sum = lanes_sum(part);
        for (int64_t d = whole; d < n; d++)
            sum += xt[d] * xt[d];
        const float r = 1.0f / sqrtf(sum / (float)n + eps);
        for (int64_t d = 0; d < n; d++)
            yt[d] = w[d] * (xt[d] * r);
    }
}

/* rms_norm of a worker's layer: its fixed arguments in a table the layer keeps, x and y dense. ctypes converted
 * the nine separate arguments in ~2 us a call, 61 calls a step on the embedded model.
 * layer: [weight, n, eps (a float32's bits)] */
void rms_norm_layer(const int64_t *layer, const float *x, int64_t tokens, float *y, int threads)
{
    const int32_t bits = (int32_t)layer[2];
    float eps;
    __builtin_memcpy(&eps, &bits, sizeof eps);
    rms_norm(x, layer[1], tokens, layer[1], (const float *)(intptr_t)layer[0], eps, y, layer[1], threads);
}
