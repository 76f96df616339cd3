/* A bitsandbytes 4-bit (NF4 or FP4) linear layer on the CPU.
 *
 * Without AVX512-BF16 bitsandbytes' layer dequantizes the whole weight to float32 and then multiplies:
 * every decode step rebuilds every weight of the model in memory (~5 ms a layer of the embedded model at
 * batch 16 on a 2-core AMD Zen 3); with it, its fused kernel rounds the inputs to bfloat16, and was
 * slower than this one on a 2-core Sapphire Rapids Xeon. Served on every CPU. Where a layer's rows are
 * whole blocks, `nf4_linear_panels` reads a copy of the weight laid out in panels of LANES rows side by
 * side and decodes it as it multiplies (below). Otherwise `nf4_linear` decodes ROWS weight rows at a
 * time into a buffer that stays in cache and multiplies them with every token of the pass there (a pass
 * of up to FEW tokens keeps each decoded row in registers alone). Either way the weights are read in
 * their 4 bits and never written out whole. For a pass of many tokens (a prompt chunk) `nf4_dequantize`
 * writes the whole weight out for torch's matrix product.
 *
 * The decoded values are bitsandbytes' own: the code's entry for each 4-bit index times its block's
 * absmax, in float32. Each (token, output) sum runs over the inputs in a fixed order (the panels' one
 * input after another; the rows' in fixed-width lanes; no -ffast-math; multiply and add contracted), so
 * a token's result never depends on the tokens beside it.
 *
 * Compiled when a worker starts, for the host it runs on (worker/cpu_nf4.py).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "lanes.h"
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

/* Multiply and add contracted into one FMA where the host has it (one rounding fewer than bitsandbytes'
 * float32 matmul would make in its own order anyway). Still one fixed sequence a (token, output). */
#if defined(__clang__)
#pragma clang fp contract(fast)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=fast")
#endif

/* A tile: ROWS decoded weight rows times TOKENS tokens, their ROWS x TOKENS sums in registers. An AVX2 core
 * has 16: 2 x 4 sums with the rows' lanes and one token's. The embedded model's 210 projections on a 2-core
 * AMD Zen 3, ms at 1 / 16 / 32 tokens: 2 x 4 19.0 / 62.8 / 84.2, 3 x 4 19.0 / 60.0 / 80.4, 4 x 2 17.4 / 76.7 /
 * 112.9, 2 x 6 20.1 / 75.1 / 97.6, 1 x 4 26.8 / 77.4 / 108.9. An AVX-512 core has 32: 3 x 8 sums with 3 rows'
 * lanes and a token's. The same projections on a 2-core Intel Xeon (Ice Lake, AVX-512 without BF16), the
 * median of 25 interleaved rounds, ms at 1 / 8 / 16 / 32 tokens: 2 x 4 12.2 / 22.6 / 34.3 / 62.4, 3 x 8 14.5 /
 * 17.8 / 29.0 / 51.3, 6 x 4 13.4 / 19.8 / 31.9 / 53.8, 4 x 6 13.9 / 26.7 / 41.9 / 59.1, 4 x 8 (spilling) 14.2 /
 * 22.0 / 36.0 / 61.4; 3 x 8's slower single token went when a tail of fewer than TOKENS tokens got its own
 * unrolled tile too (then 2 x 4 and 3 x 8 15.6 and 15.8 ms at 1 token, 27.9 and 23.7 at 8). The tile
 * changes which sums share a load, never a sum's own order: the results are the same bits whatever it is. */
#ifndef ROWS
#define ROWS (LANES == 16 ? 3 : 2)
#endif
#ifndef TOKENS
#define TOKENS (LANES == 16 ? 8 : 4)
#endif
#if TOKENS > 8
#error "TOKENS above 8: the tail's switch in nf4_linear has cases for 1 to 7 tokens only"
#endif

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

#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12 && LANES >= 8
/* 2 x LANES values at once, where every such run lies in one block (`in` and `blocksize` multiples of
 * 2 x LANES): LANES bytes widened to 32-bit lanes in one instruction, their high and low 4 bits
 * interleaved (high first) into two index vectors, each looked up in the code held in registers (one
 * permute of 16 lanes; with 8, two and a blend), times the block's absmax. The same products as
 * `decode_row`'s. GCC alone takes a shuffle mask that is not a constant. */
#define DECODE_LANES 1
typedef uint8_t bytes_at __attribute__((vector_size(LANES), aligned(1), may_alias));
typedef int32_t index_t __attribute__((vector_size(LANES * sizeof(int32_t))));

static inline __attribute__((always_inline)) lanes_t lookup(index_t index, const lanes_t low_table,
                                                            const lanes_t high_table)
{
#if LANES == 16
    (void)high_table;
    return __builtin_shuffle(low_table, index);
#else
    return __builtin_shuffle(low_table, high_table, index);
#endif
}

/* LANES bytes as LANES 32-bit lanes. GCC builds the generic conversion a byte at a time (a load and an
 * insert each); the AVX2 and AVX-512 instructions take them from memory in one. */
static inline __attribute__((always_inline)) index_t widen(const uint8_t *p)
{
#if LANES == 16 && defined(__AVX512F__)
    return (index_t)_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
#elif LANES == 8 && defined(__AVX2__)
    return (index_t)_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
#else
    return __builtin_convertvector(*(const bytes_at *)p, index_t);
#endif
}

/* The 2 x LANES values of LANES packed bytes, in order, all in one block of absmax `scale`. */
static inline __attribute__((always_inline)) void decode_lanes(const uint8_t *bytes, const lanes_t low_table,
                                                               const lanes_t high_table, float scale, lanes_t v[2])
{
    const index_t pairs = widen(bytes);
    const index_t high = pairs >> 4, low = pairs & 15;
#if LANES == 16
    const index_t first_half = __builtin_shufflevector(high, low, 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7,
                                                       23);
    const index_t second_half = __builtin_shufflevector(high, low, 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14,
                                                        30, 15, 31);
#else
    const index_t first_half = __builtin_shufflevector(high, low, 0, 8, 1, 9, 2, 10, 3, 11);
    const index_t second_half = __builtin_shufflevector(high, low, 4, 12, 5, 13, 6, 14, 7, 15);
#endif
    v[0] = lookup(first_half, low_table, high_table) * scale;
    v[1] = lookup(second_half, low_table, high_table) * scale;
}

static void decode_row_lanes(const uint8_t *packed, const float *absmax, const float code[16], int64_t blocksize,
                             int64_t row, int64_t in, float *w)
{
    const int64_t first = row * in;
    const uint8_t *bytes = packed + first / 2;
    const lanes_t low_table = load(code), high_table = LANES == 16 ? low_table : load(code + 8);
    int64_t block = first / blocksize, k = 0;
    int64_t run = blocksize - first % blocksize; /* a multiple of 2 x LANES, as `first` (row * in) is */
    for (; k < in; k += run, run = blocksize, block++) {
        const int64_t end = k + run < in ? k + run : in;
        for (int64_t i = k; i < end; i += 2 * LANES) {
            lanes_t v[2];
            decode_lanes(bytes + i / 2, low_table, high_table, absmax[block], v);
            *(lanes_at *)(w + i) = v[0];
            *(lanes_at *)(w + i + LANES) = v[1];
        }
    }
}

/* A pass of at most FEW tokens decodes each weight row into registers and sums it with the tokens there,
 * never storing it. The 210 projections on a 2-core Intel Xeon (Ice Lake), 15 interleaved rounds, ms at
 * 1 / 2 / 3 / 4 tokens, row tiles then this: 16.5 / 16.9 / 17.1 / 20.0 -> 10.3 / 11.7 / 13.9 / 15.4; an AVX2
 * build there 30.9 / 32.5 / 37.2 / 37.4 -> 26.8 / 27.5 / 31.0 / 33.3. Beyond 4 tokens the tiles catch up
 * (they share each token's loads across rows): this way up to 8 on AVX-512 took 0.80 / 0.94 / 1.04x the
 * tiles' time at 5 / 6 / 8 tokens. */
#define FEW 4

/* y[t][row] for T tokens: row `row`'s values as decode_row_lanes decodes them, each token's sum in
 * tile_dots' lanes and order (no inputs past the last lane group: `in` is a multiple of 2 x LANES), so the
 * same bits as decoding the row and summing it. */
static inline __attribute__((always_inline)) void dot_row_lanes(const uint8_t *packed, const float *absmax,
                                                                const float code[16], int64_t blocksize, int64_t row,
                                                                int64_t in, const float *x, int64_t x_stride,
                                                                const int T, float *y, int64_t y_stride, float add)
{
    const int64_t first = row * in;
    const uint8_t *bytes = packed + first / 2;
    const lanes_t low_table = load(code), high_table = LANES == 16 ? low_table : load(code + 8);
    lanes_t acc[FEW] = {0};
    int64_t block = first / blocksize, k = 0;
    int64_t run = blocksize - first % blocksize;
    for (; k < in; k += run, run = blocksize, block++) {
        const int64_t end = k + run < in ? k + run : in;
        for (int64_t i = k; i < end; i += 2 * LANES) {
            lanes_t v[2];
            decode_lanes(bytes + i / 2, low_table, high_table, absmax[block], v);
            for (int t = 0; t < T; t++) {
                acc[t] += v[0] * load(x + t * x_stride + i);
                acc[t] += v[1] * load(x + t * x_stride + i + LANES);
            }
        }
    }
    for (int t = 0; t < T; t++)
        y[t * y_stride + row] = lanes_sum(acc[t]) + add;
}
/* Panels: a layer whose rows are whole blocks (`in` a multiple of `blocksize`) is read from its own copy of
 * the weight, LANES rows side by side (worker/cpu_nf4.py lays it out): panel p's bytes [in / 2][LANES], byte
 * (k, r) row p * LANES + r's byte k (its inputs 2k and 2k + 1, high 4 bits first), and its scales
 * [in / blocksize][LANES]. A vector of LANES bytes decodes into two vectors of LANES rows' weights, one input
 * each, which multiply each token's input broadcast: lanes over output rows, as a GEMM microkernel's, so a
 * weight is decoded once per PTOKENS tokens and no sum ends in a horizontal add. Each (token, output) sum runs
 * over the inputs one after another (one FMA each, the decoded value times the input), so it is the same
 * whatever the tile, the token count, the panel beside it or the host's vector width.
 *
 * Against the row tiles and the few-token path above, the embedded model's 210 projections on a 2-core AMD
 * EPYC (Zen 4, AVX-512), ms, 7 interleaved rounds, rows then panels: 1 token 8.3 -> 4.8, 4 9.9 -> 7.5, 8
 * 21.2 -> 11.3, 16 29.1 -> 21.7, 32 62.8 -> 39.6, 64 99.7 -> 78.3, 96 158.7 -> 117.3 (the decoded weight in
 * torch's matmul: 21.9, 34.5, 49.3, 54.0, 72.7, 108.5, 154.0). Two accumulators a sum (even and odd inputs)
 * halved the error against the float64 product (~7e-7 -> ~4e-7 of the largest output) but took half the
 * tokens a tile and was slower from 8 tokens (13.4 ms at 8, 134.4 at 96). An AVX2 build on the same host
 * (8 lanes: half the rows a decode, two permutes a lookup), 7 rounds, rows then panels of 1 x 8: 1 token
 * 9.9 -> 9.2, 4 11.9 -> 10.9, 8 22.1 -> 15.0, 16 33.7 -> 28.4, 32 59.1 -> 54.6, 64 106.8 -> 108.5, 96
 * 161.1 -> 184.8 (another run 188.9 -> 175.8); 1 x 6 was slower from 32 tokens (62.6 at 32, 227.2 at 96),
 * 2 x 4 and 1 x 4 from 16, 1 x 10 and 1 x 12 no better than 1 x 8. On a real Zen 3 (AVX2 only; nf4_bench, the
 * model's weights from memory), rows then 1 x 8 panels: 1 token 18.7 -> 14.2, 4 20.8 -> 19.1, 16 59.4 -> 54.0,
 * 32 102.2 -> 95.3, 64 173.0 -> 187.6. */
#ifndef PANELS
#define PANELS (LANES == 16 ? 2 : 1) /* panels a tile: 2 x 12 sums + 2 scales, 4 weights, a table in 32 zmm */
#endif
#ifndef PTOKENS
#define PTOKENS (LANES == 16 ? 12 : 8) /* 8 sums + a scale, 2 weights, 2 tables in 16 ymm */
#endif
#if PTOKENS > 16
#error "PTOKENS above 16: nf4_linear_panels' switch has cases for 1 to 15 tokens only"
#endif

/* The rows a panel holds in this build (LANES); a build without the vector lookup has no panels, nor this. */
int nf4_panel_lanes(void) { return LANES; }

/* acc[p][t]: panel p's LANES outputs for token t, over all `in` inputs (x, `x_stride` apart a token). */
static inline __attribute__((always_inline)) void panel_tile(const uint8_t *bytes, const float *scales,
                                                             int64_t panel_bytes, int64_t panel_scales,
                                                             const lanes_t low_table, const lanes_t high_table,
                                                             int64_t blocksize, int64_t in, const float *x,
                                                             int64_t x_stride, const int P, const int T,
                                                             lanes_t acc[PANELS][PTOKENS])
{
    for (int p = 0; p < P; p++)
        for (int t = 0; t < T; t++)
            acc[p][t] = (lanes_t){0};
    const int64_t run = blocksize / 2; /* a block's bytes a row */
    for (int64_t block = 0; block < in / blocksize; block++) {
        lanes_t scale[PANELS];
        for (int p = 0; p < P; p++)
            scale[p] = load(scales + p * panel_scales + block * LANES);
        for (int64_t k = block * run; k < (block + 1) * run; k++) {
            lanes_t first[PANELS], second[PANELS]; /* inputs 2k and 2k + 1, LANES rows each */
            for (int p = 0; p < P; p++) {
                const index_t pair = widen(bytes + p * panel_bytes + k * LANES);
                first[p] = lookup(pair >> 4, low_table, high_table) * scale[p];
                second[p] = lookup(pair & 15, low_table, high_table) * scale[p];
            }
            for (int t = 0; t < T; t++) {
                const float x0 = x[t * x_stride + 2 * k], x1 = x[t * x_stride + 2 * k + 1];
                for (int p = 0; p < P; p++) {
                    acc[p][t] += first[p] * x0;
                    acc[p][t] += second[p] * x1;
                }
            }
        }
    }
}

/* A pass of DECODED_FROM tokens or more decodes each tile of panels once into `w` ([P][in][LANES] floats, the
 * values panel_tile computes) and every token tile reads them there, where panel_tile decodes them again for
 * each tile of PTOKENS tokens. The same values summed in the same order, one FMA each: the same bits. The 210
 * projections of random NF4 weights of the embedded model's shapes, 7 interleaved rounds, ms, decoded in each
 * tile -> once. A 2-core AMD Zen 3 (AVX2, 1 x 8 tiles: the decode is a third of a tile's vector work): 24 tokens
 * 78.9 -> 63.8, 32 103.5 -> 83.3, 64 196.2 -> 136.4, 96 300.2 -> 193.6; from 9 tokens (a first try) 9 43.5 ->
 * 47.0 and 16 53.3 -> 53.0. A 2-core AMD Zen 4 (AVX-512, 2 x 12 tiles, whose decode is shared by 24 sums), two
 * runs: 12 tokens 18.9 -> 22.6, 16 24.0 -> 29.7, 24 35.1 -> 35.3, 25 33.8 -> 32.7, 32 40.6 -> 38.3, 36 44.1 ->
 * 41.7 and 47.4 -> 45.3, 48 59.3 -> 54.2 and 63.2 -> 56.0, 64 80.8 -> 77.9 and 80.0 -> 75.2, 96 114.7 -> 102.8
 * and 115.0 -> 101.2, 128 162.8 -> 142.6, 256 316.2 -> 273.4: at 96 tokens 201 GFLOP/s, 86% of the 234 a loop
 * of nothing but FMAs reaches there. Hence from 3 tiles on both. */
#ifndef DECODED_FROM
#define DECODED_FROM (3 * PTOKENS) /* 0: never */
#endif

static inline __attribute__((always_inline)) void decode_panels(const uint8_t *bytes, const float *scales,
                                                                int64_t panel_bytes, int64_t panel_scales,
                                                                const lanes_t low_table, const lanes_t high_table,
                                                                int64_t blocksize, int64_t in, const int P, float *w)
{
    const int64_t run = blocksize / 2;
    for (int p = 0; p < P; p++)
        for (int64_t block = 0; block < in / blocksize; block++) {
            const lanes_t scale = load(scales + p * panel_scales + block * LANES);
            for (int64_t k = block * run; k < (block + 1) * run; k++) {
                const index_t pair = widen(bytes + p * panel_bytes + k * LANES);
                *(lanes_at *)(w + (p * in + 2 * k) * LANES) = lookup(pair >> 4, low_table, high_table) * scale;
                *(lanes_at *)(w + (p * in + 2 * k + 1) * LANES) = lookup(pair & 15, low_table, high_table) * scale;
            }
        }
}

/* panel_tile's sums over weights `decode_panels` wrote. Its FMAs are written out (fmadd, lanes.h): a tile of one
 * token here is a loop of one multiply and add, which GCC's tuning for AMD Zen builds as a multiply and an add
 * rounded apart (it avoids chains of FMAs), other bits than every other tile's. */
static inline __attribute__((always_inline)) void decoded_tile(const float *w, int64_t in, const float *x,
                                                               int64_t x_stride, const int P, const int T,
                                                               lanes_t acc[PANELS][PTOKENS])
{
    for (int p = 0; p < P; p++)
        for (int t = 0; t < T; t++)
            acc[p][t] = (lanes_t){0};
    for (int64_t i = 0; i < in; i++) {
        lanes_t wi[PANELS];
        for (int p = 0; p < P; p++)
            wi[p] = load(w + (p * in + i) * LANES);
        for (int t = 0; t < T; t++) {
            const float xi = x[t * x_stride + i];
            for (int p = 0; p < P; p++)
                acc[p][t] = fmadd(wi[p], xi, acc[p][t]);
        }
    }
}

/* nf4_linear's result for a weight laid out in panels (above; `out` rows rounded up to whole panels, the rows
 * past `out` never written), `in` a multiple of `blocksize`. The panels are spread over `threads` threads. */
void nf4_linear_panels(const float *x, int64_t x_stride, int64_t tokens, const uint8_t *bytes, const float *scales,
                       const float *code, int64_t blocksize, int64_t in, int64_t out, const float *bias, float *y,
                       int64_t y_stride, int threads)
{
    const int64_t panels = (out + LANES - 1) / LANES;
    const int64_t panel_bytes = in / 2 * LANES, panel_scales = in / blocksize * LANES;
    const lanes_t low_table = load(code), high_table = LANES == 16 ? low_table : load(code + 8);
#pragma omp parallel num_threads(threads)
    {
    /* a tile of panels decoded once (decode_panels; NULL: decoded in each tile, and where malloc fails) */
    float *decoded = DECODED_FROM && tokens >= DECODED_FROM ? malloc((size_t)(PANELS * in * LANES) * sizeof(float)) : NULL;
#pragma omp for schedule(static)
    for (int64_t first = 0; first < panels; first += PANELS) {
        const int P = panels - first < PANELS ? (int)(panels - first) : PANELS;
        const uint8_t *b = bytes + first * panel_bytes;
        const float *s = scales + first * panel_scales;
        if (decoded != NULL) {
            if (P == PANELS)
                decode_panels(b, s, panel_bytes, panel_scales, low_table, high_table, blocksize, in, PANELS, decoded);
            else
                decode_panels(b, s, panel_bytes, panel_scales, low_table, high_table, blocksize, in, 1, decoded);
        }
        for (int64_t t0 = 0; t0 < tokens; t0 += PTOKENS) {
            const int T = tokens - t0 < PTOKENS ? (int)(tokens - t0) : PTOKENS;
            const float *xt = x + t0 * x_stride;
            lanes_t acc[PANELS][PTOKENS];
            /* constant sizes: each tile's loops unrolled, the last panels and a pass's last tile too */
#define PANEL_TILE(p, n)                                                                                             \
    do {                                                                                                             \
        if (decoded != NULL)                                                                                         \
            decoded_tile(decoded, in, xt, x_stride, p, n, acc);                                                      \
        else                                                                                                         \
            panel_tile(b, s, panel_bytes, panel_scales, low_table, high_table, blocksize, in, xt, x_stride, p, n,    \
                       acc);                                                                                         \
    } while (0)
/* cases past PTOKENS never run (T is PTOKENS at most): built with PTOKENS tokens, so within acc */
#define PANEL_CASE(p, n) case n: PANEL_TILE(p, n < PTOKENS ? n : PTOKENS); break;
#define PANEL_SWITCH(p)                                                                                              \
    switch (T) {                                                                                                     \
        PANEL_CASE(p, 1) PANEL_CASE(p, 2) PANEL_CASE(p, 3) PANEL_CASE(p, 4) PANEL_CASE(p, 5) PANEL_CASE(p, 6)         \
        PANEL_CASE(p, 7) PANEL_CASE(p, 8) PANEL_CASE(p, 9) PANEL_CASE(p, 10) PANEL_CASE(p, 11) PANEL_CASE(p, 12)      \
        PANEL_CASE(p, 13) PANEL_CASE(p, 14) PANEL_CASE(p, 15)                                                         \
    default: PANEL_TILE(p, PTOKENS); break;                                                                          \
    }
            if (P == PANELS) {
                PANEL_SWITCH(PANELS)
            } else {
                PANEL_SWITCH(1) /* PANELS is 2 at most */
            }
#undef PANEL_SWITCH
#undef PANEL_CASE
#undef PANEL_TILE
            for (int p = 0; p < P; p++) {
                const int64_t row = (first + p) * LANES;
                for (int t = 0; t < T; t++) {
                    float *yt = y + (t0 + t) * y_stride + row;
                    for (int r = 0; r < LANES && row + r < out; r++)
                        yt[r] = acc[p][t][r] + (bias != NULL ? bias[row + r] : 0.0f);
                }
            }
        }
    }
    free(decoded);
    }
}

/* nf4_linear_panels of a worker's layer: its fixed arguments in a table the layer keeps, x and y dense. ctypes
 * converted the 13 separate arguments in a few microseconds a call, 210 calls a step.
 * layer: [bytes, scales, code, blocksize, in, out, bias (0: none)] */
void nf4_panels_layer(const int64_t *layer, const float *x, int64_t tokens, float *y, int threads)
{
    nf4_linear_panels(x, layer[4], tokens, (const uint8_t *)(intptr_t)layer[0], (const float *)(intptr_t)layer[1],
                      (const float *)(intptr_t)layer[2], layer[3], layer[4], layer[5],
                      (const float *)(intptr_t)layer[6], y, layer[5], threads);
}
#endif

/* The sums of `tokens` (1 to TOKENS) tokens' inputs with each of `rows` (1 to ROWS) decoded weight rows
 * (w, `in` apart): each (token, row) with LANES partial sums over the inputs in order, added by halves,
 * then the inputs past the last whole lane group one by one. A token's arithmetic for a row is the same
 * whatever the tile around it; the tile only saves loads (each weight lane serves `tokens` tokens and each
 * input lane `rows` rows, where a row a token at a time read every token's inputs again for each row). */
static inline __attribute__((always_inline)) void tile_dots(const float *w, int64_t rows, const float *x,
                                                            int64_t x_stride, int64_t tokens, int64_t in,
                                                            float sums[ROWS][TOKENS])
{
    lanes_t acc[ROWS][TOKENS] = {0};
    const int64_t whole = in - in % LANES;
    for (int64_t k = 0; k < whole; k += LANES) {
        lanes_t wv[ROWS] = {0};
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
    const int lanes_decode = in % (2 * LANES) == 0 && blocksize % (2 * LANES) == 0; /* runs in one block */
    (void)lanes_decode;
#ifdef DECODE_LANES
    if (tokens <= FEW && lanes_decode) {
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t o = 0; o < out; o++) {
            const float add = bias != NULL ? bias[o] : 0.0f;
            switch (tokens) { /* one unrolled copy a token count */
#define FEW_CASE(n) case n: dot_row_lanes(packed, absmax, code, blocksize, o, in, x, x_stride, n, y, y_stride, add); break;
            FEW_CASE(1) FEW_CASE(2) FEW_CASE(3) FEW_CASE(4)
#undef FEW_CASE
            }
        }
        return 0;
    }
#endif
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
            for (int64_t r = 0; r < rows; r++) {
#ifdef DECODE_LANES
                if (lanes_decode) {
                    decode_row_lanes(packed, absmax, code, blocksize, first + r, in, w + r * in);
                    continue;
                }
#endif
                decode_row(packed, absmax, (const float(*)[2])pairs, blocksize, first + r, in, w + r * in);
            }
            for (int64_t t = 0; t < tokens; t += TOKENS) {
                const int64_t count = tokens - t < TOKENS ? tokens - t : TOKENS;
                float sums[ROWS][TOKENS];
                const float *xt = x + t * x_stride;
                if (rows == ROWS) /* constant sizes: the tile's loops unrolled, no branches */
                    switch (count) { /* a pass's last, shorter tile (9 tokens: 8 and 1) unrolled too */
#define TILE_CASE(n) case n: tile_dots(w, ROWS, xt, x_stride, n, in, sums); break;
                    TILE_CASE(1)
#if TOKENS > 2
                    TILE_CASE(2)
#endif
#if TOKENS > 3
                    TILE_CASE(3)
#endif
#if TOKENS > 4
                    TILE_CASE(4)
#endif
#if TOKENS > 5
                    TILE_CASE(5)
#endif
#if TOKENS > 6
                    TILE_CASE(6)
#endif
#if TOKENS > 7
                    TILE_CASE(7)
#endif
#undef TILE_CASE
                    default: tile_dots(w, ROWS, xt, x_stride, TOKENS, in, sums); break;
                    }
                else
                    tile_dots(w, rows, xt, x_stride, count, in, sums);
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

/* The whole weight decoded into w [out, in] float32: bitsandbytes' dequantization, value for value, for a
 * pass of many tokens (a prompt chunk), which then multiplies in torch's matrix product as bitsandbytes
 * would. The rows are spread over `threads` threads. */
void nf4_dequantize(const uint8_t *packed, const float *absmax, const float *code, int64_t blocksize, int64_t in,
                    int64_t out, float *w, int threads)
{
    float pairs[256][2];
    pair_table(code, pairs);
    const int lanes_decode = in % (2 * LANES) == 0 && blocksize % (2 * LANES) == 0;
    (void)lanes_decode;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t o = 0; o < out; o++) {
#ifdef DECODE_LANES
        if (lanes_decode) {
            decode_row_lanes(packed, absmax, code, blocksize, o, in, w + o * in);
            continue;
        }
#endif
        decode_row(packed, absmax, (const float(*)[2])pairs, blocksize, o, in, w + o * in);
    }
}
