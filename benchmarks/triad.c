/* In-place triad b[i] += s * c[i] (12 bytes of traffic per element), the
 * memory roofline the benchmark compares against. Built by bench.py with the
 * system C compiler and OpenMP when available. */
#include <stddef.h>

void triad(float* restrict b, const float* restrict c, float s, size_t n) {
#pragma omp parallel for simd schedule(static)
  for (size_t i = 0; i < n; ++i) {
    b[i] += s * c[i];
  }
}
