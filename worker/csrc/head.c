/* The output projection (the head: [vocab, hidden]) on the CPU from a narrower form of its float32 weight
 * that gives back every value exactly (worker/cpu_head.py checks it value for value at start):
 * - int8 values times one float32 scale a run of 32 (`q8_head`): the embedded model's head, converted from
 *   a GGUF that stores it so; ~1.1 bytes a value;
 * - bfloat16 values (`bf16_head`): the head of a bfloat16 checkpoint loaded in float32; 2 bytes a value.
 * The float32 head is the largest read of a decode step at small batches (113 MB on the embedded model
 * against ~60 MB of 4-bit layers); these forms are under a third and half of it.
 *
 * Laid out as the 4-bit kernel's panels (nf4_linear.c): LANES rows side by side, value k of each row next
 * to the others ([panels][in][LANES]) and each row's int8 scales likewise ([panels][in / 32][LANES]). A
 * vector of LANES values widens to LANES rows' float32 weights for one input (exact: int8 to float times
 * the block's scales, or bfloat16's bits above 16 zero bits), which multiply each token's input broadcast;
 * a tile of PANELS panels x PTOKENS tokens in registers. Each (token, output) sum runs over the inputs in
 * order, one FMA each: a token's logits never depend on the tokens beside it.
 *
 * Compiled when a worker starts, for the host it runs on.
 */
#include <stdint.h>

#include "lanes.h" /* widen_int8, load_bf16 */

#if defined(__clang__)
#pragma clang fp contract(fast)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=fast")
#endif

#define BLOCK 32 /* int8 values a scale */
/* A tile of 2 panels x 12 tokens in 32 zmm registers (the 4-bit kernel's), 2 x 6 in 16 ymm: 12 sums, 2
 * weights and a token's input. The embedded model's head on a 2-core AMD Zen 3 (AVX2), from memory, ms at
 * 1 / 8 / 16 / 32 / 64 tokens, int8: 1 x 8 (the 4-bit kernel's AVX2 tile, whose lookup tables take two more
 * registers) 3.0 / 5.9 / 9.5 / 20.6 / 39.7, 2 x 6 2.5 / 4.6 / 9.0 / 17.1 / 32.9, 2 x 4 2.5 / 4.8 / 10.9 /
 * 20.7 / 39.4, 1 x 12 2.7 / 5.3 / 10.8 / 19.9 / 41.2; bfloat16 alike. The same bits whatever the tile. */
#ifndef PANELS
#define PANELS 2
#endif
#ifndef PTOKENS
#define PTOKENS (LANES == 16 ? 12 : 6)
#endif
#if PANELS > 2
#error "PANELS above 2: the head's driver takes a whole tile of panels or one panel only"
#endif
#if PTOKENS > 16
#error "PTOKENS above 16: the head's switch has cases for 1 to 15 tokens only"
#endif

enum form { Q8, BF16 };

/* The rows a panel holds in this build. */
int head_lanes(void) { return LANES; }

/* acc[p][t]: panel p's LANES outputs for token t over all `in` inputs; `values` int8 or bfloat16 bits by
 * `form` (a constant where it is inlined), `scales` int8's only. */
static inline __attribute__((always_inline)) void head_tile(const enum form form, const void *values,
                                                            const float *scales, int64_t panel_values,
                                                            int64_t panel_scales, int64_t in, const float *x,
                                                            int64_t x_stride, const int P, const int T,
                                                            lanes_t acc[PANELS][PTOKENS])
{
    for (int p = 0; p < P; p++)
        for (int t = 0; t < T; t++)
            acc[p][t] = (lanes_t){0};
    const int64_t run = form == Q8 ? BLOCK : in; /* inputs a scale (bfloat16: none, one run) */
    for (int64_t block = 0; block < in / run; block++) {
        lanes_t scale[PANELS];
        if (form == Q8)
            for (int p = 0; p < P; p++)
                scale[p] = load(scales + p * panel_scales + block * LANES);
        for (int64_t k = block * run; k < (block + 1) * run; k++) {
            lanes_t w[PANELS];
            for (int p = 0; p < P; p++)
                w[p] = form == Q8 ? widen_int8((const int8_t *)values + p * panel_values + k * LANES) * scale[p]
                                  : load_bf16((const uint16_t *)values + p * panel_values + k * LANES);
            for (int t = 0; t < T; t++) {
                const float xk = x[t * x_stride + k];
                for (int p = 0; p < P; p++)
                    acc[p][t] += w[p] * xk;
            }
        }
    }
}

/* y [tokens, out] (`y_stride` apart) = x [tokens, in] (`x_stride` apart) times the weight transposed, the
 * weight in panels as above (`out` rounded up to whole panels; the rows past it never written). The panels
 * are spread over `threads` threads. */
static inline __attribute__((always_inline)) void head(const enum form form, const float *x, int64_t x_stride,
                                                       int64_t tokens, const void *values, const float *scales,
                                                       int64_t in, int64_t out, float *y, int64_t y_stride,
                                                       int threads)
{
    const int64_t panels = (out + LANES - 1) / LANES, panel_values = in * LANES, panel_scales = in / BLOCK * LANES;
    const int64_t value_bytes = form == Q8 ? 1 : 2;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t first = 0; first < panels; first += PANELS) {
        const int P = panels - first < PANELS ? (int)(panels - first) : PANELS;
        const void *v = (const char *)values + first * panel_values * value_bytes;
        const float *s = form == Q8 ? scales + first * panel_scales : scales;
        for (int64_t t0 = 0; t0 < tokens; t0 += PTOKENS) {
            const int T = tokens - t0 < PTOKENS ? (int)(tokens - t0) : PTOKENS;
            const float *xt = x + t0 * x_stride;
            lanes_t acc[PANELS][PTOKENS];
            /* constant sizes, each tile unrolled; cases past PTOKENS never run, built with PTOKENS tokens */
#define HEAD_TILE(p, n) head_tile(form, v, s, panel_values, panel_scales, in, xt, x_stride, p, n, acc)
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

/* The int8 form: `values` int8 [panels][in][LANES], `scales` float32 [panels][in / 32][LANES], `in` a
 * multiple of 32. */
void q8_head(const float *x, int64_t x_stride, int64_t tokens, const int8_t *values, const float *scales, int64_t in,
             int64_t out, float *y, int64_t y_stride, int threads)
{
    head(Q8, x, x_stride, tokens, values, scales, in, out, y, y_stride, threads);
}

/* The bfloat16 form: `values` bfloat16 bits [panels][in][LANES]. */
void bf16_head(const float *x, int64_t x_stride, int64_t tokens, const uint16_t *values, int64_t in, int64_t out,
               float *y, int64_t y_stride, int threads)
{
    head(BF16, x, x_stride, tokens, values, (const float *)0, in, out, y, y_stride, threads);
}
