/* Sums in fixed-width lanes, shared by the CPU kernels.
 *
 * The compiler vectorizes a loop over LANES independent partial sums without reordering any
 * floating-point addition (the kernels are built without -ffast-math), so a sum's value depends
 * only on its inputs and their length: a row's result never depends on the rows beside it.
 */
#ifndef LORAPLEX_LANES_H
#define LORAPLEX_LANES_H

#include <stdint.h>

#define LANES 16

static inline float dot(const float *restrict a, const float *restrict b, int64_t n)
{
    const int64_t whole = n - n % LANES;
    float part[LANES] = {0};
    for (int64_t d = 0; d < whole; d += LANES)
        for (int i = 0; i < LANES; i++)
            part[i] += a[d + i] * b[d + i];
    float sum = 0.0f;
    for (int i = 0; i < LANES; i++)
        sum += part[i];
    for (int64_t d = whole; d < n; d++)
        sum += a[d] * b[d];
    return sum;
}

#endif
