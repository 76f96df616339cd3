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

#if defined(__AVX512F__)
#define LANES 16
#elif defined(__AVX__)
#define LANES 8
#else
#define LANES 4
#endif

#endif
