/* Greedy picks over a step's logits on the CPU, float32, one pass: for each row, the index of its largest value
   (the first such index, as torch.argmax gives) and whether every value in it is finite. Built with the other CPU
   kernels by native.py; rows are shared by `threads` of the calling thread's OpenMP team. */

#include <math.h>
#include <stdint.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

static void pick_row(const float *x, int64_t n, int64_t *best, uint8_t *finite) {
    int64_t i = 0, top_index = 0;
    float top = -INFINITY;
    int bad = 0;
#if defined(__AVX512F__)
    if (n >= 16) {
        __m512 tops = _mm512_loadu_ps(x);
        __m512i index = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        __m512i tops_at = index;
        __mmask16 odd = _mm512_fpclass_ps_mask(tops, 0x99); /* NaN, +inf, -inf */
        const __m512i step = _mm512_set1_epi32(16);
        for (i = 16; i + 16 <= n; i += 16) {
            index = _mm512_add_epi32(index, step);
            const __m512 v = _mm512_loadu_ps(x + i);
            odd |= _mm512_fpclass_ps_mask(v, 0x99);
            const __mmask16 above = _mm512_cmp_ps_mask(v, tops, _CMP_GT_OQ); /* strictly: a lane keeps its first */
            tops = _mm512_mask_blend_ps(above, tops, v);
            tops_at = _mm512_mask_blend_epi32(above, tops_at, index);
        }
        bad = odd != 0;
        top = _mm512_reduce_max_ps(tops);
        /* the first index among the lanes holding the top value */
        const __mmask16 at_top = _mm512_cmp_ps_mask(tops, _mm512_set1_ps(top), _CMP_EQ_OQ);
        top_index = _mm512_mask_reduce_min_epi32(at_top, tops_at);
    }
#endif
    for (; i < n; i++) { /* what is left (all of a row shorter than 16, or without AVX-512) */
        if (!isfinite(x[i])) bad = 1;
        if (x[i] > top) top = x[i], top_index = i; /* a row with no finite value is not picked from: its index is moot */
    }
    *best = top_index;
    *finite = !bad;
}

void quiver_greedy_rows(const float *logits, int64_t rows, int64_t n, int64_t stride, int64_t *best, uint8_t *finite,
                        int64_t threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (int64_t r = 0; r < rows; r++) pick_row(logits + r * stride, n, best + r, finite + r);
}
