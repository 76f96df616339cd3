/* A bitsandbytes 4-bit (NF4 or FP4) linear layer for a pass's few tokens on the CPU.
 *
 * Where bitsandbytes has no fused CPU kernel (CPUs without AVX512-BF16), its layer dequantizes the
 * whole weight to float32 and then multiplies: every decode step rebuilds every weight of the model in
 * memory (~5 ms a layer of the embedded model at batch 16 on a 2-core AMD Zen 3). This kernel decodes
 * one weight row at a time into a buffer that stays in cache and multiplies it with every token there,
 * so the weights are read in their 4 bits and never written out whole.
 *
 * The decoded values are bitsandbytes' own: the code's entry for each 4-bit index times its block's
 * absmax, in float32. Each (token, output) sum runs over the inputs in fixed-width lanes in a fixed
 * order (no -ffast-math), so a token's result never depends on the tokens beside it.
 *
 * Compiled when a worker starts, for the host it runs on (worker/cpu_nf4.py).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "lanes.h"

/* A tile: ROWS decoded weight rows times TOKENS tokens, their ROWS x TOKENS sums in registers (13 of the
 * 16 an AVX2 core has, with the rows' lanes and one token's). At batch 16 on a 2-core AMD Zen 3, the
 * embedded model's gate projection took 0.78 ms a call with 2 rows x 4 tokens and 0.56 ms with 4 x 2:
 * each token's inputs are read again for every tile of rows, from L2 once they outgrow L1. */
#define ROWS 4
#define TOKENS 2

/* Each byte's two values (high 4 bits first, as bitsandbytes packs them) before their block's scale. */
static void pair_table(const float code[16], float pairs[256][2])
{
    for (int byte = 0; byte < 256; byte++) {
        pairs[byte][0] = code[byte >> 4];
        pairs[byte][1] = code[byte & 15];
    }
}

/* Weight row `row` (in values from element row * in of the flattened weight) decoded into w: its values
 * two a byte through the pair table, then each block's run times the block's absmax. */
static void decode_row(const uint8_t *packed, const float *absmax, const float pairs[256][2], int64_t blocksize,
                       int64_t row, int64_t in, float *w)
{
    const int64_t first = row * in; /* even: `in` is */
    const uint8_t *bytes = packed + first / 2;
    for (int64_t k = 0; k < in / 2; k++)
        memcpy(w + 2 * k, pairs[bytes[k]], 2 * sizeof(float));
    int64_t block = first / blocksize, k = 0;
    int64_t run = blocksize - first % blocksize;
    while (k < in) {
        const int64_t end = k + run < in ? k + run : in;
        const float scale = absmax[block];
        for (int64_t i = k; i < end; i++)
            w[i] *= scale;
        k = end;
        block++;
        run = blocksize;
    }
}

/* The sums of `tokens` (1 to TOKENS) tokens' inputs with each of `rows` (1 to ROWS) decoded weight rows
 * (w, `in` apart): each (token, row) with LANES partial sums over the inputs in order, added by halves,
 * then the inputs past the last whole lane group one by one. A token's arithmetic for a row is the same
 * whatever the tile around it; the tile only saves loads (each weight lane serves `tokens` tokens and each
 * input lane `rows` rows, where a row a token at a time read every token's inputs again for each row). */
static inline __attribute__((always_inline)) void tile_dots(const float *w, int64_t rows, const float *x,
                                                            int64_t x_stride, int64_t tokens, int64_t in,
                                                            float sums[ROWS][TOKENS])
{
    lanes_t acc[ROWS][TOKENS] = {{0}};
    const int64_t whole = in - in % LANES;
    for (int64_t k = 0; k < whole; k += LANES) {
        lanes_t wv[ROWS];
        for (int64_t r = 0; r < ROWS; r++)
            if (r < rows)
                wv[r] = load(w + r * in + k);
        for (int64_t t = 0; t < TOKENS; t++)
            if (t < tokens) {
                const lanes_t xv = load(x + t * x_stride + k);
                for (int64_t r = 0; r < ROWS; r++)
                    if (r < rows)
                        acc[r][t] += wv[r] * xv;
            }
    }
    for (int64_t r = 0; r < rows; r++)
        for (int64_t t = 0; t < tokens; t++) {
            float sum = lanes_sum(acc[r][t]);
            for (int64_t k = whole; k < in; k++)
                sum += w[r * in + k] * x[t * x_stride + k];
            sums[r][t] = sum;
        }
}

/* y[t, o] = sum over i of x[t, i] * W[o, i] (+ bias[o]) for `tokens` tokens, W [out, in] packed 4 bits a
 * value (two a byte, row-major) with one absmax a `blocksize` run of the flattened weight, and `code`
 * the 16 values the indices stand for. x [tokens, in] and y [tokens, out] float32, last dim dense; `in`
 * and `blocksize` even. The output rows are spread over `threads` threads.
 *
 * Returns 0, or -1 if a thread had no memory for its decoded row (y is then incomplete). */
int nf4_linear(const float *x, int64_t x_stride, int64_t tokens, const uint8_t *packed, const float *absmax,
               const float *code, int64_t blocksize, int64_t in, int64_t out, const float *bias, float *y,
               int64_t y_stride, int threads)
{
    float pairs[256][2];
    pair_table(code, pairs);
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        float *w = malloc((size_t)(ROWS * in) * sizeof(float));
        if (w == NULL)
            failed = 1;
#pragma omp for schedule(static)
        for (int64_t first = 0; first < out; first += ROWS) {
            if (w == NULL)
                continue;
            const int64_t rows = out - first < ROWS ? out - first : ROWS;
            for (int64_t r = 0; r < rows; r++)
                decode_row(packed, absmax, (const float(*)[2])pairs, blocksize, first + r, in, w + r * in);
            for (int64_t t = 0; t < tokens; t += TOKENS) {
                const int64_t count = tokens - t < TOKENS ? tokens - t : TOKENS;
                float sums[ROWS][TOKENS];
                if (rows == ROWS && count == TOKENS) /* constant sizes: the tile's loops unrolled, no branches */
                    tile_dots(w, ROWS, x + t * x_stride, x_stride, TOKENS, in, sums);
                else
                    tile_dots(w, rows, x + t * x_stride, x_stride, count, in, sums);
                for (int64_t r = 0; r < rows; r++) {
                    const float add = bias != NULL ? bias[first + r] : 0.0f;
                    for (int64_t i = 0; i < count; i++)
                        y[(t + i) * y_stride + first + r] = sums[r][i] + add;
                }
            }
        }
        free(w);
    }
    return failed ? -1 : 0;
}
