/* Sums in fixed-width lanes, shared by the CPU kernels.
 *
 * The compiler vectorizes a loop over LANES independent partial sums without reordering any
 * floating-point addition (the kernels are built without -ffast-math), so a sum's value depends
 * only on its inputs and their length: a row's result never depends on the rows beside it.
 *
 * LANES is the width of the host's vector registers in floats (the kernels are built for the host
 * they run on): 16 with AVX-512, 8 with AVX, else 4. A wider value compiles, but GCC lowers vectors
 * wider than the hardware's through the stack: with 16 lanes on an AVX2 host (AMD Zen 3) the LoRA
 * kernel's decode pass took 22 ms where 8 lanes take 8 ms. The sums' order follows the width, so a
 * value can differ in its last bits between hosts of different widths, never between rows or runs
 * on one host.
 */
#ifndef LORAPLEX_LANES_H
#define LORAPLEX_LANES_H

#include <stdint.h>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h> /* widen_int8, load_bf16 */
#endif

#if defined(__AVX512F__)
#define LANES 16
#elif defined(__AVX__)
#define LANES 8
#else
#define LANES 4
#endif

/* LANES floats as one value the compiler keeps in one register (a plain float array of sums it kept on
 * the stack, each add a load and a store); lane i's arithmetic is the scalar loop's, in its order. */
typedef float lanes_t __attribute__((vector_size(LANES * sizeof(float))));
typedef float lanes_at __attribute__((vector_size(LANES * sizeof(float)), aligned(sizeof(float)), may_alias));

static inline lanes_t load(const float *p) { return *(const lanes_at *)p; }

/* LANES bfloat16 values widened to float32: each one's 16 bits above 16 zero bits (exact). GCC 12 builds
 * the portable conversion for 8 lanes from two 4-lane widenings and an insert; the intrinsics are one. */
typedef uint16_t halves_at __attribute__((vector_size(LANES * sizeof(uint16_t)), aligned(sizeof(uint16_t)), may_alias));
typedef uint32_t words_t __attribute__((vector_size(LANES * sizeof(uint32_t))));

static inline __attribute__((always_inline)) lanes_t load_bf16(const uint16_t *p)
{
#if LANES == 16
    return (lanes_t)_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16);
#elif LANES == 8 && defined(__AVX2__)
    return (lanes_t)_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16);
#else
    return (lanes_t)(__builtin_convertvector(*(const halves_at *)p, words_t) << 16);
#endif
}

/* The sum of a value's lanes, by halves: the upper half added to the lower, then the same again, down to
 * one lane; a fixed order, log2(LANES) dependent adds. Adding the lanes one after another, through the
 * stack, was the cost of the decode kernel's scores (LANES - 1 dependent scalar adds a key and head):
 * the same 30 layers' attention, 8 rows at ~1,000 positions, 13.9 -> 8.7 ms a pass from cache and
 * 18.4 -> 16.7 ms from memory on an AMD host with AVX-512 (bfloat16 keys: 15.1 -> 10.0, 17.3 -> 12.6). */
static inline __attribute__((always_inline)) float lanes_sum(lanes_t v)
{
#if defined(__clang__) || __GNUC__ >= 12 /* __builtin_shufflevector */
#if LANES == 16
    typedef float half_t __attribute__((vector_size(8 * sizeof(float))));
    const half_t h8 = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                      __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
#elif LANES == 8
    const lanes_t h8 = v;
#endif
#if LANES >= 8
    typedef float quarter_t __attribute__((vector_size(4 * sizeof(float))));
    const quarter_t h4 = __builtin_shufflevector(h8, h8, 0, 1, 2, 3) + __builtin_shufflevector(h8, h8, 4, 5, 6, 7);
#else
    const lanes_t h4 = v;
#endif
    typedef float pair_t __attribute__((vector_size(2 * sizeof(float))));
    const pair_t h2 = __builtin_shufflevector(h4, h4, 0, 1) + __builtin_shufflevector(h4, h4, 2, 3);
    return h2[0] + h2[1];
#else /* older GCC: the same adds in the same order, a lane at a time */
    float h[LANES];
    for (int i = 0; i < LANES; i++)
        h[i] = v[i];
    for (int width = LANES / 2; width >= 1; width /= 2)
        for (int i = 0; i < width; i++)
            h[i] += h[i + width];
    return h[0];
#endif
}

/* a * b + c in one FMA, whatever the compiler's tuning: GCC's for AMD Zen builds a loop whose only work is a
 * chain of multiply-adds into one sum as a multiply and an add rounded apart, where the kernels' other loops get
 * FMAs (fp-contract=fast), and a sum must be the same bits in every loop that computes it. */
static inline __attribute__((always_inline)) lanes_t fmadd(lanes_t a, float b, lanes_t c)
{
#if LANES == 16 && defined(__AVX512F__)
    return (lanes_t)_mm512_fmadd_ps((__m512)a, _mm512_set1_ps(b), (__m512)c);
#elif LANES == 8 && defined(__FMA__)
    return (lanes_t)_mm256_fmadd_ps((__m256)a, _mm256_set1_ps(b), (__m256)c);
#else
    return a * b + c; /* contracted where the host has FMA, as the kernels' own sums */
#endif
}

/* LANES int8 weights as floats (exact). GCC 12 converts int8 vectors one lane at a time (__builtin_convertvector
 * to int32 or float lanes: a movsbl and a vpinsrd each), so the widening is the instructions themselves. */
static inline __attribute__((always_inline)) lanes_t widen_int8(const int8_t *p)
{
#if LANES == 16
    return (lanes_t)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
#elif LANES == 8 && defined(__AVX2__)
    return (lanes_t)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
#else
    lanes_t v;
    for (int i = 0; i < LANES; i++)
        v[i] = (float)p[i];
    return v;
#endif
}

#endif
