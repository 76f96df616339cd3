/* LoRA deltas of the few-token rows of a pass (decode rows), each token on its own adapter slot.
 *
 * One call per adapted layer adds B[slot] . (A[slot] . x) to every such token's output, reading
 * the slot stacks in place: no activations gathered, no per-slot views, no index_add. torch did the
 * same in ~6 operator calls a layer (a shrink, a reshape, an expand, an add and their gathers),
 * ~40 us each on the CPU before any arithmetic, 210 layers a step on the embedded model.
 *
 * The caller hands the tokens in tiles: up to TILE tokens on one slot (`lora_tile`), so that each
 * weight the tile reads from memory serves all of its tokens (with one adapter on every row the
 * shrink otherwise loaded as many weights as it multiplied).
 *
 * The layers that read one input (q/k/v, gate/up) keep their A stacks interleaved; the first of
 * them shrinks the input for all (`shrink` set), the others only expand their share of `h`.
 *
 * B stacks are kept in column blocks (`lora_chunk`): a slot's B is [out / CHUNK, max_rank, CHUNK], so
 * the expand of one CHUNK of outputs reads one contiguous block and a slot's B is one run in memory.
 * Transposed plainly ([max_rank, out]) each CHUNK read a short piece of every rank's row, out weights
 * apart: 16 streams at once, which the memory system served at ~70% of its bandwidth. The blocks took
 * the kernel calls of a decode pass, 16 distinct adapters, from 8.0 to 6.7 ms (bfloat16) and 12.1 to
 * 11.1 ms (float32) on a 2-core AMD Zen 4; blocking A the same way ([members, max_rank, in]) was slower.
 *
 * The slot stacks hold float32, bfloat16 or int8 weights (`wt`); a bfloat16 weight is the upper half of
 * a float32 and is widened exactly in registers, so both run the same float32 arithmetic, and bfloat16
 * stacks read half the bytes: with many adapters in a pass the weights are what the time goes to. int8
 * stacks read half of that again: each rank's row of A and of B (transposed) is its own int8 values
 * times one float32 scale (`a_scale`, `b_scale`), applied to that rank's sum after the shrink and to
 * its h before the expand, so the loops widen int8 lanes to float32 as they widen bfloat16 ones.
 *
 * Where it pays (`prefetches`), each thread prefetches the weights it sums next: a few rank blocks or
 * CHUNKs ahead within a slot's rows, and across into the next tile's slot, which the hardware's own
 * prefetchers do not foresee (a tile's rows are short runs, ~1-3 kB, each in another place).
 *
 * Every sum runs in a fixed order in fixed-width lanes (no -ffast-math, no reassociation), and a
 * token's sums are the same arithmetic whichever tile it is in, so its delta depends only on its
 * own input and slot, never on the tokens beside it.
 *
 * Compiled when a worker starts, for the host it runs on (worker/cpu_lora.py).
 */
#include <stdint.h>

#include "lanes.h"

#define CHUNK 64 /* output columns a thread expands at once, their sums held in registers */
#define AHEAD_RANKS 4 /* rows of A the shrink prefetches ahead of the block it sums */
#define AHEAD_CHUNKS 4 /* CHUNKs of B the expand prefetches ahead of the one it sums */
#define TILE 4 /* tokens of one slot computed together: each weight read serves all of them */
#define BLOCK 4 /* at most, ranks shrunk together: independent sums keep the multiply-add units busy */

/* Ranks a tile of T tokens shrinks together: BLOCK x T sums in registers. With AVX-512's 32 registers
 * always BLOCK (16 sums for 4 tokens). With 16 (AVX2), at most 8: BLOCK ranks for 1-2 tokens, 2 for 3-4. TILE was
 * 2 there before (BLOCK ranks x 2 tokens); 4 tokens of 2 ranks read each weight half as often: the 210 layers
 * of a decode pass from cache, 16 rows on one adapter, bfloat16 slots, 0.86-0.91x the time in three runs of
 * interleaved rounds on a 2-core AMD Zen 3 (16 distinct adapters, one token a tile: unchanged). In a whole
 * engine step the difference stayed inside the host's noise (+-4%). The sums are the same whichever the
 * block: each rank's dot runs alone in its own lanes. */
#if TILE > 4
#error "the tiles' switches have cases for 1 to 4 tokens"
#endif
#ifdef __AVX512F__
#define BLOCK_OF(T) BLOCK
#else
#define BLOCK_OF(T) ((T) > 2 ? 2 : BLOCK)
#endif

int lora_tile(void) { return TILE; }

int lora_chunk(void) { return CHUNK; }

/* Whether to prefetch the weights ahead of the sums (each thread's next rows, across tiles and slots).
 * bfloat16 and int8 stacks: yes. Their arithmetic per byte is twice float32's, and without prefetching the kernel
 * waited on memory at about half the bandwidth: 16 adapters in a decode pass (156 MB) took 16.2 ms of an
 * engine step, 10.3 ms with it (Xeon, 2 cores). float32 stacks: no. They read at the bandwidth already, and
 * prefetching only added traffic: 13 ms -> 17 ms a step. */
static inline __attribute__((always_inline)) int prefetches(const int wt) { return wt != 0; }

/* Bytes a weight: float32 (0), bfloat16 (1), int8 (2). */
#define WSIZE(wt) ((wt) == 0 ? 4 : (wt) == 1 ? 2 : 1)

/* Weights: float32, bfloat16 widened to float32 (a shift: exact) or int8 converted to float32 (exact;
 * the scale comes after). Offsets count weights. */

static inline __attribute__((always_inline)) const void *at(const void *w, int64_t i, const int wt)
{
    return (const char *)w + i * WSIZE(wt);
}

static inline __attribute__((always_inline)) lanes_t load_w(const void *w, int64_t i, const int wt)
{
    if (wt == 0)
        return load((const float *)w + i);
    if (wt == 2)
        return widen_int8((const int8_t *)w + i);
    return load_bf16((const uint16_t *)w + i);
}

static inline __attribute__((always_inline)) float weight(const void *w, int64_t i, const int wt)
{
    if (wt == 0)
        return ((const float *)w)[i];
    if (wt == 2)
        return (float)((const int8_t *)w)[i];
    const uint32_t wide = (uint32_t)((const uint16_t *)w)[i] << 16;
    float value;
    __builtin_memcpy(&value, &wide, sizeof value);
    return value;
}

/* The dot of weights `w` with x in LANES partial sums, added up in lane order. */
static inline __attribute__((always_inline)) float dot_w(const void *w, const float *x, int64_t n, const int wt)
{
    const int64_t whole = n - n % LANES;
    lanes_t part = {0};
    for (int64_t d = 0; d < whole; d += LANES)
        part += load_w(w, d, wt) * load(x + d);
    float sum = 0.0f;
    for (int i = 0; i < LANES; i++)
        sum += part[i];
    for (int64_t d = whole; d < n; d++)
        sum += weight(w, d, wt) * x[d];
    return sum;
}

/* out[t][j] = a_j . xs[t] for the J rows a_j = a + j * a_stride (weights) and the T tokens xs[t];
 * each sum in the same lane order as one dot. T and wt are constants where it is inlined.
 * pf: J rows (a_stride apart) prefetched at the offsets summed, or none (NULL). */
static inline __attribute__((always_inline)) void tile_dots(const void *restrict a, int64_t a_stride,
                                                            const float *const *xs, const int J, const int T,
                                                            int64_t n,
                                                            float *const *outs, const void *pf, const int wt)
{
    const int64_t whole = n - n % LANES;
    lanes_t part[BLOCK][TILE];
    for (int j = 0; j < J; j++)
        for (int t = 0; t < T; t++)
            part[j][t] = (lanes_t){0};
    for (int64_t d = 0; d < whole; d += LANES) {
        lanes_t xv[TILE];
        for (int t = 0; t < T; t++)
            xv[t] = load(xs[t] + d);
        if (pf && (d * WSIZE(wt)) % 64 == 0) /* once a cache line */
            for (int j = 0; j < J; j++)
                __builtin_prefetch(at(pf, j * a_stride + d, wt));
        for (int j = 0; j < J; j++) {
            const lanes_t av = load_w(a, j * a_stride + d, wt);
            for (int t = 0; t < T; t++)
                part[j][t] += av * xv[t];
        }
    }
    for (int j = 0; j < J; j++)
        for (int t = 0; t < T; t++) {
            float sum = 0.0f;
            for (int i = 0; i < LANES; i++)
                sum += part[j][t][i];
            for (int64_t d = whole; d < n; d++)
                sum += weight(a, j * a_stride + d, wt) * xs[t][d];
            outs[t][j] = sum;
        }
}

static inline __attribute__((always_inline)) void shrink_tile(const void *as, int64_t a_stride,
                                                              const float *const *xs, const int T, int64_t n,
                                                              int64_t rank, float *const *hs, const void *next,
                                                              const int wt)
{
    int64_t r = 0;
    const int J = BLOCK_OF(T);
    const int64_t blocked = rank - rank % J;
    for (; r + J <= rank; r += J) {
        const void *block = at(as, r * a_stride, wt);
        const int64_t ahead = r + AHEAD_RANKS; /* these rows, then the next item's */
        const void *pf = !prefetches(wt) ? 0
                         : ahead < blocked ? at(as, ahead * a_stride, wt)
                         : next ? at(next, (ahead - blocked) * a_stride, wt)
                                : 0;
        float *outs[TILE];
        for (int t = 0; t < T; t++)
            outs[t] = hs[t] + r;
        switch (T) { /* one specialized copy per tile size */
        case 1: tile_dots(block, a_stride, xs, BLOCK_OF(1), 1, n, outs, pf, wt); break;
        case 2: tile_dots(block, a_stride, xs, BLOCK_OF(2), 2, n, outs, pf, wt); break;
        case 3: tile_dots(block, a_stride, xs, BLOCK_OF(3), 3, n, outs, pf, wt); break;
        case 4: tile_dots(block, a_stride, xs, BLOCK_OF(4), 4, n, outs, pf, wt); break;
        }
    }
    for (; r < rank; r++)
        for (int t = 0; t < T; t++)
            hs[t][r] = dot_w(at(as, r * a_stride, wt), xs[t], n, wt);
}

/* ys[t][0..n) += sum over r of hs[t][r] * sb[r] * b[r * b_stride + (0..n)], the sum over r in order;
 * sb: the ranks' scales (int8 weights), or none (NULL: 1). */
static inline __attribute__((always_inline)) void expand_tile(const float *const *hs, const void *restrict b,
                                                              int64_t b_stride, int64_t rank, const int T,
                                                              const int64_t n, float *const *ys, const float *sb,
                                                              const int wt)
{
    float acc[TILE][CHUNK];
    for (int t = 0; t < T; t++)
        for (int64_t c = 0; c < n; c++)
            acc[t][c] = 0.0f;
    for (int64_t r = 0; r < rank; r++) {
        const void *br = at(b, r * b_stride, wt);
        for (int t = 0; t < T; t++) {
            const float hr = sb ? hs[t][r] * sb[r] : hs[t][r];
            for (int64_t c = 0; c < n; c++)
                acc[t][c] += hr * weight(br, c, wt);
        }
    }
    for (int t = 0; t < T; t++)
        for (int64_t c = 0; c < n; c++)
            ys[t][c] += acc[t][c];
}

/* expand_tile of a whole CHUNK, its sums in registers; pf: CHUNK columns of `rank` rows (b_stride apart)
 * to prefetch, or none (NULL). */
static inline __attribute__((always_inline)) void expand_full(const float *const *hs, const void *restrict b,
                                                              int64_t b_stride, int64_t rank, const int T,
                                                              float *const *ys, const void *pf, const float *sb,
                                                              const int wt)
{
    lanes_t acc[TILE][CHUNK / LANES];
    for (int t = 0; t < T; t++)
        for (int k = 0; k < CHUNK / LANES; k++)
            acc[t][k] = (lanes_t){0};
    for (int64_t r = 0; r < rank; r++) {
        const void *br = at(b, r * b_stride, wt);
        if (pf)
            for (int l = 0; l < CHUNK * WSIZE(wt); l += 64)
                __builtin_prefetch((const char *)at(pf, r * b_stride, wt) + l);
        lanes_t bv[CHUNK / LANES];
        for (int k = 0; k < CHUNK / LANES; k++)
            bv[k] = load_w(br, k * LANES, wt);
        for (int t = 0; t < T; t++) {
            const float hr = sb ? hs[t][r] * sb[r] : hs[t][r];
            for (int k = 0; k < CHUNK / LANES; k++)
                acc[t][k] += hr * bv[k];
        }
    }
    for (int t = 0; t < T; t++)
        for (int k = 0; k < CHUNK / LANES; k++)
            *(lanes_at *)(ys[t] + k * LANES) = load(ys[t] + k * LANES) + acc[t][k];
}

static inline __attribute__((always_inline)) void expand_chunk(const float *const *hs, const void *b,
                                                               int64_t b_stride, int64_t rank, const int T,
                                                               int64_t n, float *const *ys, const void *pf,
                                                               const float *sb, const int wt)
{
    if (n == CHUNK) {
        switch (T) {
        case 1: expand_full(hs, b, b_stride, rank, 1, ys, pf, sb, wt); break;
        case 2: expand_full(hs, b, b_stride, rank, 2, ys, pf, sb, wt); break;
        case 3: expand_full(hs, b, b_stride, rank, 3, ys, pf, sb, wt); break;
        case 4: expand_full(hs, b, b_stride, rank, 4, ys, pf, sb, wt); break;
        }
    } else {
        expand_tile(hs, b, b_stride, rank, T, n, ys, sb, wt);
    }
}

/* One copy of each for float32, bfloat16 and int8 stacks. */
static void shrink_f32(const void *as, int64_t a_stride, const float *const *xs, int T, int64_t n, int64_t rank,
                       float *const *hs, const void *next)
{
    shrink_tile(as, a_stride, xs, T, n, rank, hs, next, 0);
}

static void shrink_bf16(const void *as, int64_t a_stride, const float *const *xs, int T, int64_t n, int64_t rank,
                        float *const *hs, const void *next)
{
    shrink_tile(as, a_stride, xs, T, n, rank, hs, next, 1);
}

static void shrink_i8(const void *as, int64_t a_stride, const float *const *xs, int T, int64_t n, int64_t rank,
                      float *const *hs, const void *next)
{
    shrink_tile(as, a_stride, xs, T, n, rank, hs, next, 2);
}

static void expand_f32(const float *const *hs, const void *b, int64_t b_stride, int64_t rank, int T, int64_t n,
                       float *const *ys, const void *pf, const float *sb)
{
    (void)sb;
    expand_chunk(hs, b, b_stride, rank, T, n, ys, pf, 0, 0);
}

static void expand_bf16(const float *const *hs, const void *b, int64_t b_stride, int64_t rank, int T, int64_t n,
                        float *const *ys, const void *pf, const float *sb)
{
    (void)sb;
    expand_chunk(hs, b, b_stride, rank, T, n, ys, pf, 0, 1);
}

static void expand_i8(const float *const *hs, const void *b, int64_t b_stride, int64_t rank, int T, int64_t n,
                      float *const *ys, const void *pf, const float *sb)
{
    expand_chunk(hs, b, b_stride, rank, T, n, ys, pf, sb, 2);
}

/* x: [tokens, in], rows x_stride apart
 * order: the routed tokens' indices, tile after tile; start[g]..start[g + 1]: tile g's share of
 *   `order`, at most TILE tokens, all on slot tile_slot[g]
 * a: [slots + 1, max_rank, members, in], contiguous: the A stacks of the layers sharing x
 * h: [tokens, members, rank], contiguous: written for every member when `shrink`, else read
 * b: [slots + 1, chunks, max_rank, CHUNK], contiguous: this layer's (the `member`-th) B stack, transposed,
 *   in column blocks: [s, c, r, i] is column c * CHUNK + i of rank r (zero past `out`)
 * wt: a and b hold float32 (0), bfloat16 (1) or int8 (2) weights
 * a_scale: [slots + 1, max_rank, members], b_scale: [slots + 1, max_rank], contiguous float32: the ranks'
 *   scales of int8 weights (unused, may be NULL, for the others)
 * y: [tokens, out], rows y_stride apart: y[t] += h[t, member] . b[slot of t, :rank]; tokens not in
 *   `order` are not touched */
void lora_delta(const float *x, int64_t x_stride, const int64_t *order, int64_t tiles, const int64_t *start,
                const int64_t *tile_slot, const void *a, int64_t max_rank, int64_t members, int64_t in,
                int64_t rank, float *h, int shrink, int64_t member, const void *b, int64_t out, int wt, float *y,
                int64_t y_stride, int threads, const float *a_scale, const float *b_scale)
{
    const int64_t chunks = (out + CHUNK - 1) / CHUNK;
#define block_at(slot, chunk) (((slot) * chunks + (chunk)) * max_rank * CHUNK) /* a B block's first weight */
    void (*const shrink_of)(const void *, int64_t, const float *const *, int, int64_t, int64_t, float *const *,
                            const void *) =
        wt == 2 ? shrink_i8 : wt ? shrink_bf16 : shrink_f32;
    void (*const expand_of)(const float *const *, const void *, int64_t, int64_t, int, int64_t, float *const *,
                            const void *, const float *) =
        wt == 2 ? expand_i8 : wt ? expand_bf16 : expand_f32;
#pragma omp parallel num_threads(threads)
    {
        if (shrink) {
#pragma omp for schedule(static)
            for (int64_t item = 0; item < tiles * members; item++) {
                const int64_t g = item / members, m = item % members, s = tile_slot[g];
                const int T = (int)(start[g + 1] - start[g]);
                const float *xs[TILE];
                float *hs[TILE];
                for (int t = 0; t < T; t++) {
                    const int64_t token = order[start[g] + t];
                    xs[t] = x + token * x_stride;
                    hs[t] = h + (token * members + m) * rank;
                }
                /* rank r of member m at as + r * members * in */
                /* the next item's rows: this thread's next (schedule(static) gives each a run of items) */
                const int64_t after = item + 1, next_slot = after < tiles * members ? tile_slot[after / members] : -1;
                const void *next =
                    next_slot < 0 ? 0 : at(a, (next_slot * max_rank * members + after % members) * in, wt);
                shrink_of(at(a, (s * max_rank * members + m) * in, wt), members * in, xs, T, in, rank, hs, next);
                if (wt == 2) /* each rank's sum times its row's scale */
                    for (int t = 0; t < T; t++)
                        for (int64_t r = 0; r < rank; r++)
                            hs[t][r] *= a_scale[(s * max_rank + r) * members + m];
            }
        }
#pragma omp for schedule(static)
        for (int64_t item = 0; item < tiles * chunks; item++) {
            const int64_t g = item / chunks, c0 = (item % chunks) * CHUNK, s = tile_slot[g];
            const int T = (int)(start[g + 1] - start[g]);
            const float *hs[TILE];
            float *ys[TILE];
            for (int t = 0; t < T; t++) {
                const int64_t token = order[start[g] + t];
                hs[t] = h + (token * members + member) * rank;
                ys[t] = y + token * y_stride + c0;
            }
            const int64_t n = out - c0 >= CHUNK ? CHUNK : out - c0;
            /* the block this thread sums AHEAD_CHUNKS items on: further in this slot's, or the next tile's */
            const int64_t ahead = item + AHEAD_CHUNKS;
            const void *pf = !prefetches(wt) || ahead >= tiles * chunks ? 0
                             : at(b, block_at(tile_slot[ahead / chunks], ahead % chunks), wt);
            expand_of(hs, at(b, block_at(s, item % chunks), wt), CHUNK, rank, T, n, ys, pf,
                      wt == 2 ? b_scale + s * max_rank : 0);
        }
    }
#undef block_at
}

/* lora_delta of the engine's layers: a layer's fixed arguments and a pass's tiles in tables the caller
 * keeps, x and y dense. ctypes converted the ~20 separate arguments in ~2.5 us a call, 210 calls a step.
 * layer: [a, max_rank, members, in, b, out, wt, member, a_scale, b_scale]; tiles: [order, count, start, slot] */
void lora_delta_layer(const int64_t *layer, const int64_t *tiles, const float *x, float *h, int shrink, float *y,
                      int64_t rank, int threads)
{
    const int64_t in = layer[3], out = layer[5];
    lora_delta(x, in, (const int64_t *)(intptr_t)tiles[0], tiles[1], (const int64_t *)(intptr_t)tiles[2],
               (const int64_t *)(intptr_t)tiles[3], (const void *)(intptr_t)layer[0], layer[1], layer[2], in, rank, h,
               shrink, layer[7], (const void *)(intptr_t)layer[4], out, (int)layer[6], y, out, threads,
               (const float *)(intptr_t)layer[8], (const float *)(intptr_t)layer[9]);
}

/* -- slot fills -------------------------------------------------------------------------------------
 * An adapter's A [rank, in] and B [out, rank] from its file's bytes into one slot of a layer's stacks: A
 * as it is, B transposed and scaled, each weight converted to the stacks' dtype and checked to be finite
 * there. torch took ~6 operator calls a layer for the copies, the scale and the sums that checked them,
 * ~20 ms an adapter on the embedded model's 210 layers (on the engine thread, which every running row
 * waits for); this is one call a layer. Each value is the one torch computes: B times the scale in
 * float32, rounded to the slot's dtype once, to nearest even. int8 slots (`lora_fill_int8`) take each
 * rank's row (of A, and of B transposed and scaled) as its largest magnitude / 127 (the row's scale) and
 * every value / that scale rounded to nearest even, as `worker.cpu_lora.quantize_rows` does with torch.
 * Weights in files: 0 float32, 1 bfloat16, 2 float16; slots: float32 or bfloat16 (`slot_bf16`). */

static inline __attribute__((always_inline)) uint32_t bits_of(float value)
{
    uint32_t bits;
    __builtin_memcpy(&bits, &value, sizeof bits);
    return bits;
}

static inline __attribute__((always_inline)) float float_of(uint32_t bits)
{
    float value;
    __builtin_memcpy(&value, &bits, sizeof value);
    return value;
}

/* A float16 widened exactly (infinities and NaN stay so; subnormals are mantissa x 2^-24). */
static inline __attribute__((always_inline)) float from_half(uint16_t half)
{
    const uint32_t sign = (uint32_t)(half & 0x8000) << 16, exponent = (half >> 10) & 0x1f, mantissa = half & 0x3ff;
    if (exponent == 0x1f)
        return float_of(sign | 0x7f800000 | mantissa << 13);
    if (exponent == 0)
        return float_of(sign | bits_of((float)mantissa * 0x1p-24f));
    return float_of(sign | (exponent + 112) << 23 | mantissa << 13);
}

static inline __attribute__((always_inline)) float file_weight(const void *w, int64_t i, int dtype)
{
    uint16_t half;
    float value;
    switch (dtype) {
    case 0: __builtin_memcpy(&value, (const char *)w + 4 * i, 4); return value; /* unaligned in a file */
    case 1: __builtin_memcpy(&half, (const char *)w + 2 * i, 2); return float_of((uint32_t)half << 16);
    default: __builtin_memcpy(&half, (const char *)w + 2 * i, 2); return from_half(half);
    }
}

/* Store `value` at slot[i] in the slot's dtype; 1 if it is not finite there (bits: the build assumes
 * finite math, so no floating-point test would be kept). */
static inline __attribute__((always_inline)) int64_t put(void *slot, int64_t i, float value, int slot_bf16)
{
    const uint32_t bits = bits_of(value);
    if (!slot_bf16) {
        ((float *)slot)[i] = value;
        return (bits & 0x7f800000) == 0x7f800000;
    }
    /* c10::BFloat16's rounding: to nearest even; NaN stays NaN (its rounding could carry into Inf) */
    const uint16_t half = (bits & 0x7fffffff) > 0x7f800000 ? 0x7fc0 : (uint16_t)((bits + 0x7fff + (bits >> 16 & 1)) >> 16);
    ((uint16_t *)slot)[i] = half;
    return (half & 0x7f80) == 0x7f80;
}

/* n weights, `step` apart in the file, times `scale`, into dst[0..n) in the slot's dtype: how many are not
 * finite there. The dtypes are constants where it is inlined (one loop each, vectorized). */
static inline __attribute__((always_inline)) int64_t convert(const void *src, int src_dtype, int64_t step, void *dst,
                                                             int64_t n, float scale, int slot_bf16)
{
    int64_t bad = 0;
    for (int64_t i = 0; i < n; i++)
        bad += put(dst, i, file_weight(src, i * step, src_dtype) * scale, slot_bf16);
    return bad;
}

static int64_t convert_any(const void *src, int src_dtype, int64_t step, void *dst, int64_t n, float scale,
                           int slot_bf16)
{
    switch (src_dtype * 2 + !!slot_bf16) {
    case 0: return convert(src, 0, step, dst, n, scale, 0);
    case 1: return convert(src, 0, step, dst, n, scale, 1);
    case 2: return convert(src, 1, step, dst, n, scale, 0);
    case 3: return convert(src, 1, step, dst, n, scale, 1);
    case 4: return convert(src, 2, step, dst, n, scale, 0);
    default: return convert(src, 2, step, dst, n, scale, 1);
    }
}

/* Returns how many weights are not finite in the slot's dtype (0: all are). a_slot: rows a_stride apart
 * (the stacks interleave the A of layers sharing an input); b_slot: [chunks, max_rank, CHUNK], dense, as
 * lora_delta reads it (columns past `out` are left as they are). */
int64_t lora_fill(const void *a, int a_dtype, int64_t rank, int64_t in, void *a_slot, int64_t a_stride, const void *b,
                  int b_dtype, int64_t out, int64_t max_rank, void *b_slot, float scale, int slot_bf16)
{
    const int64_t size = slot_bf16 ? 2 : 4, a_size = a_dtype ? 2 : 4, b_size = b_dtype ? 2 : 4;
    int64_t bad = 0;
    for (int64_t r = 0; r < rank; r++) {
        bad += convert_any((const char *)a + r * in * a_size, a_dtype, 1, (char *)a_slot + r * a_stride * size, in,
                           1.0f, slot_bf16);
        /* row r of B transposed, a block's row at a time: column r of the file's [out, rank] */
        for (int64_t c0 = 0; c0 < out; c0 += CHUNK)
            bad += convert_any((const char *)b + (c0 * rank + r) * b_size, b_dtype, rank,
                               (char *)b_slot + ((c0 / CHUNK * max_rank + r) * CHUNK) * size,
                               out - c0 < CHUNK ? out - c0 : CHUNK, scale, slot_bf16);
    }
    return bad;
}

/* The largest magnitude of n weights, `step` apart in the file, times `mul`; *bad += how many of those
 * products are not finite. */
static inline __attribute__((always_inline)) float absmax(const void *src, int src_dtype, int64_t step, int64_t n,
                                                          float mul, int64_t *bad)
{
    float top = 0.0f;
    int64_t not_finite = 0;
    for (int64_t i = 0; i < n; i++) {
        const uint32_t bits = bits_of(file_weight(src, i * step, src_dtype) * mul) & 0x7fffffff;
        not_finite += bits >= 0x7f800000;
        const float magnitude = float_of(bits);
        top = magnitude > top ? magnitude : top;
    }
    *bad += not_finite;
    return top;
}

/* n weights, `step` apart in the file, times `mul`, as int8 multiples of `scale` (rounded to nearest even;
 * all zero where the scale is); *squares += the sum of the products' squares, *errors += the sum of the
 * squares of what the rounding lost. The sums count in steps of `scale` (a product / scale is within
 * +-127, its error within +-0.5: float32 holds their squares' sums), in whatever order the vectorized
 * loop takes (`omp simd`): a rounding measure, not a result. Summed in order, one running sum, a chain
 * of dependent adds, made the fill of an adapter (210 layers) 7.3 -> 13.7 ms on a 2-core AMD host. */
static inline __attribute__((always_inline)) void quantize(const void *src, int src_dtype, int64_t step,
                                                           int8_t *dst, int64_t n, float mul, float scale,
                                                           double *squares, double *errors)
{
    float sum = 0.0f, lost = 0.0f;
#pragma omp simd reduction(+ : sum, lost)
    for (int64_t i = 0; i < n; i++) {
        const float r = scale > 0.0f ? file_weight(src, i * step, src_dtype) * mul / scale : 0.0f;
        float q = __builtin_rintf(r);
        q = q > 127.0f ? 127.0f : q < -127.0f ? -127.0f : q;
        dst[i] = (int8_t)q;
        sum += r * r;
        lost += (r - q) * (r - q);
    }
    *squares += (double)sum * scale * scale;
    *errors += (double)lost * scale * scale;
}

/* One rank's row into an int8 slot: `n` weights `step` apart in the file, times `mul`, in pieces of `piece`
 * weights `gap` apart in the slot; its scale to *scale, its sums of squares to `squares` and `errors`
 * (`quantize`). Returns how many products are not finite. */
static int64_t quantize_row(const void *src, int src_dtype, int64_t step, int64_t n, float mul, int8_t *dst,
                            int64_t piece, int64_t gap, float *scale, double *squares, double *errors)
{
    int64_t bad = 0;
    float top;
    switch (src_dtype) { /* one loop each */
    case 0: top = absmax(src, 0, step, n, mul, &bad); break;
    case 1: top = absmax(src, 1, step, n, mul, &bad); break;
    default: top = absmax(src, 2, step, n, mul, &bad); break;
    }
    /* A row with weights that are not finite: zeros, and a NaN scale, so that checking the slot's scales
     * (worker.lora's slot_is_finite) finds it as checking the weights of other dtypes does. */
    const float row_scale = bad ? 0.0f : top / 127.0f;
    *scale = bad ? float_of(0x7fc00000) : row_scale;
    const int64_t size = src_dtype ? 2 : 4;
    for (int64_t i0 = 0, p = 0; i0 < n; i0 += piece, p++) {
        const void *from = (const char *)src + i0 * step * size;
        const int64_t count = n - i0 < piece ? n - i0 : piece;
        switch (src_dtype) {
        case 0: quantize(from, 0, step, dst + p * gap, count, mul, row_scale, squares, errors); break;
        case 1: quantize(from, 1, step, dst + p * gap, count, mul, row_scale, squares, errors); break;
        default: quantize(from, 2, step, dst + p * gap, count, mul, row_scale, squares, errors); break;
        }
    }
    return bad;
}

/* lora_fill into int8 slots: the ranks' scales to a_scale[r * a_scale_stride] and b_scale[r]; to *rounding
 * (unless NULL) what the rounding lost, relative: the larger of A's and B's (scaled) sqrt(sum of squared
 * errors / sum of squares), 0 for a factor that is all zeros (`worker.cpu_lora.rounding_error`). */
int64_t lora_fill_int8(const void *a, int a_dtype, int64_t rank, int64_t in, int8_t *a_slot, int64_t a_stride,
                       float *a_scale, int64_t a_scale_stride, const void *b, int b_dtype, int64_t out,
                       int64_t max_rank, int8_t *b_slot, float *b_scale, float scale, float *rounding)
{
    const int64_t a_size = a_dtype ? 2 : 4, b_size = b_dtype ? 2 : 4;
    int64_t bad = 0;
    double a_squares = 0.0, a_errors = 0.0, b_squares = 0.0, b_errors = 0.0;
    for (int64_t r = 0; r < rank; r++) {
        bad += quantize_row((const char *)a + r * in * a_size, a_dtype, 1, in, 1.0f, a_slot + r * a_stride, in, 0,
                            a_scale + r * a_scale_stride, &a_squares, &a_errors);
        /* row r of B transposed: column r of the file's [out, rank], a block's row (CHUNK) at a time */
        bad += quantize_row((const char *)b + r * b_size, b_dtype, rank, out, scale, b_slot + r * CHUNK, CHUNK,
                            max_rank * CHUNK, b_scale + r, &b_squares, &b_errors);
    }
    if (rounding) {
        const double a_lost = a_squares > 0.0 ? __builtin_sqrt(a_errors / a_squares) : 0.0;
        const double b_lost = b_squares > 0.0 ? __builtin_sqrt(b_errors / b_squares) : 0.0;
        *rounding = (float)(a_lost > b_lost ? a_lost : b_lost);
    }
    return bad;
}
