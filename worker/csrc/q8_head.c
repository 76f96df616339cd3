/* The output projection (the head: [vocab, hidden]) on the CPU from int8 values, for a weight that is
 * exactly an int8 times one float32 scale a run of 32 values (worker/cpu_head.py checks it value for
 * value: the embedded model's head, converted from a GGUF that stores it so, is). The float32 head is
 * the largest read of a decode step at small batches (113 MB on the embedded model against ~60 MB of
 * 4-bit layers); its int8 values and scales are under a third of that, and decode to the same floats.
 *
 * Laid out as the 4-bit kernel's panels (nf4_linear.c): LANES rows side by side, value k of each row next
 * to the others ([panels][in][LANES] int8) and each row's scales likewise ([panels][in / 32][LANES]). A
 * vector of LANES bytes widens to LANES rows' weights for one input (int8 to float32, exact, times the
 * block's scales: the stored float32 values), which multiply each token's input broadcast; a tile of
 * PANELS panels x PTOKENS tokens in registers. Each (token, output) sum runs over the inputs in order, one
 * FMA each: a token's logits never depend on the tokens beside it.
 *
 * Compiled when a worker starts, for the host it runs on.
 */
#include <stdint.h>

#include "lanes.h" /* widen_int8 */

#if defined(__clang__)
#pragma clang fp contract(fast)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=fast")
#endif

#define BLOCK 32 /* values a scale */
#ifndef PANELS
#define PANELS (LANES == 16 ? 2 : 1)
#endif
#ifndef PTOKENS
#define PTOKENS (LANES == 16 ? 12 : 8)
#endif
#if PTOKENS > 16
#error "PTOKENS above 16: q8_head's switch has cases for 1 to 15 tokens only"
#endif

/* The rows a panel holds in this build. */
int q8_head_lanes(void) { return LANES; }

/* acc[p][t]: panel p's LANES outputs for token t over all `in` inputs. */
static inline __attribute__((always_inline)) void head_tile(const int8_t *values, const float *scales,
                                                            int64_t panel_values, int64_t panel_scales, int64_t in,
                                                            const float *x, int64_t x_stride, const int P,
                                                            const int T, lanes_t acc[PANELS][PTOKENS])
{
    for (int p = 0; p < P; p++)
        for (int t = 0; t < T; t++)
            acc[p][t] = (lanes_t){0};
    for (int64_t block = 0; block < in / BLOCK; block++) {
        lanes_t scale[PANELS];
        for (int p = 0; p < P; p++)
            scale[p] = load(scales + p * panel_scales + block * LANES);
        for (int64_t k = block * BLOCK; k < (block + 1) * BLOCK; k++) {
            lanes_t w[PANELS];
            for (int p = 0; p < P; p++)
                w[p] = widen_int8(values + p * panel_values + k * LANES) * scale[p];
            for (int t = 0; t < T; t++) {
                const float xk = x[t * x_stride + k];
                for (int p = 0; p < P; p++)
                    acc[p][t] += w[p] * xk;
            }
        }
    }
}

/* y [tokens, out] (`y_stride` apart) = x [tokens, in] (`x_stride` apart) times the weight transposed, the
 * weight in panels as above (`out` rounded up to whole panels; the rows past it never written), `in` a
 * multiple of 32. The panels are spread over `threads` threads. */
void q8_head(const float *x, int64_t x_stride, int64_t tokens, const int8_t *values, const float *scales, int64_t in,
             int64_t out, float *y, int64_t y_stride, int threads)
{
    const int64_t panels = (out + LANES - 1) / LANES, panel_values = in * LANES, panel_scales = in / BLOCK * LANES;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t first = 0; first < panels; first += PANELS) {
        const int P = panels - first < PANELS ? (int)(panels - first) : PANELS;
        const int8_t *v = values + first * panel_values;
        const float *s = scales + first * panel_scales;
        for (int64_t t0 = 0; t0 < tokens; t0 += PTOKENS) {
            const int T = tokens - t0 < PTOKENS ? (int)(tokens - t0) : PTOKENS;
            const float *xt = x + t0 * x_stride;
            lanes_t acc[PANELS][PTOKENS];
            /* constant sizes, each tile unrolled; cases past PTOKENS never run, built with PTOKENS tokens */
#define HEAD_TILE(p, n) head_tile(v, s, panel_values, panel_scales, in, xt, x_stride, p, n, acc)
#define HEAD_CASE(p, n) case n: HEAD_TILE(p, n < PTOKENS ? n : PTOKENS); break;
#define HEAD_SWITCH(p)                                                                                               \
    switch (T) {                                                                                                     \
        HEAD_CASE(p, 1) HEAD_CASE(p, 2) HEAD_CASE(p, 3) HEAD_CASE(p, 4) HEAD_CASE(p, 5) HEAD_CASE(p, 6)               \
        HEAD_CASE(p, 7) HEAD_CASE(p, 8) HEAD_CASE(p, 9) HEAD_CASE(p, 10) HEAD_CASE(p, 11) HEAD_CASE(p, 12)            \
        HEAD_CASE(p, 13) HEAD_CASE(p, 14) HEAD_CASE(p, 15)                                                            \
    default: HEAD_TILE(p, PTOKENS); break;                                                                           \
    }
            if (P == PANELS) {
                HEAD_SWITCH(PANELS)
            } else {
                HEAD_SWITCH(1) /* PANELS is 2 at most */
            }
#undef HEAD_SWITCH
#undef HEAD_CASE
#undef HEAD_TILE
            for (int p = 0; p < P; p++) {
                const int64_t row = (first + p) * LANES;
                for (int t = 0; t < T; t++) {
                    float *yt = y + (t0 + t) * y_stride + row;
                    for (int r = 0; r < LANES && row + r < out; r++)
                        yt[r] = acc[p][t][r];
                }
            }
        }
    }
}
