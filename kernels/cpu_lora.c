/* One projection's LoRA delta for the short segments of a step (decode: one row each), float32, on the CPU:
   ops.LoraApply's semantics,
       y[t] += (scales[w] * (x[t] . a[w, :r]ᵀ)) . b[w, :, :r]ᵀ      for the rows t of each segment with slot w >= 0
   (r = ranks[w]; a [S, R, in], b [S, out, R]), for segments of at most max_rows rows; longer ones are left to the
   caller. Built with the other CPU kernels by native.py. Each row's down-projection stays in registers for its
   up-projection; the adapter's weights are read where they lie. */

#include <stdint.h>

#if defined(__AVX512F__)
#include "cpu_simd.h"

static inline __mmask16 first(int64_t n) { return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1); }

/* the sum of v[i] * w[i] for i < n, as 16 partial sums (sum16 adds them) */
static inline __m512 dot_parts(const float *v, const float *w, int64_t n) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 m = first(n - i);
        acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, v + i), _mm512_maskz_loadu_ps(m, w + i), acc);
    }
    return acc;
}

static void lora_row(float *y, const float *x, const float *a, const float *b, int64_t R, int64_t in, int64_t out,
                     int64_t r, float scale) {
    float h[1024]; /* the row's down-projection, scaled: r <= R <= 1024 (native.py checks) */
    __m512 parts[16];
    for (int64_t k0 = 0; k0 < r; k0 += 16) { /* 16 ranks at a time */
        for (int64_t k = 0; k < 16; k++)
            parts[k] = k0 + k < r ? dot_parts(x, a + (k0 + k) * in, in) : _mm512_setzero_ps();
        _mm512_mask_storeu_ps(h + k0, first(r - k0), _mm512_mul_ps(sum16(parts), _mm512_set1_ps(scale)));
    }
    for (int64_t o0 = 0; o0 < out; o0 += 16) { /* 16 outputs at a time */
        const int64_t m = out - o0 < 16 ? out - o0 : 16;
        for (int64_t i = 0; i < 16; i++) parts[i] = i < m ? dot_parts(h, b + (o0 + i) * R, r) : _mm512_setzero_ps();
        const __mmask16 valid = first(m);
        const __m512 sum = _mm512_add_ps(_mm512_maskz_loadu_ps(valid, y + o0), sum16(parts));
        _mm512_mask_storeu_ps(y + o0, valid, sum);
    }
}
#else
static void lora_row(float *y, const float *x, const float *a, const float *b, int64_t R, int64_t in, int64_t out,
                     int64_t r, float scale) {
    float h[1024];
    for (int64_t k = 0; k < r; k++) {
        float s = 0.0f;
#pragma omp simd reduction(+ : s)
        for (int64_t i = 0; i < in; i++) s += x[i] * a[k * in + i];
        h[k] = s * scale;
    }
    for (int64_t o = 0; o < out; o++) {
        float s = 0.0f;
#pragma omp simd reduction(+ : s)
        for (int64_t k = 0; k < r; k++) s += h[k] * b[o * R + k];
        y[o] += s;
    }
}
#endif

void quiver_lora_apply(float *y, int64_t y_stride, const float *x, int64_t x_stride, const float *a, const float *b,
                       int64_t R, int64_t in, int64_t out, const int32_t *ranks, const float *scales,
                       const int32_t *seg_starts, const int32_t *seg_slots, int64_t segments, int64_t max_rows) {
    for (int64_t i = 0; i < segments; i++) {
        const int64_t w = seg_slots[i], start = seg_starts[i], end = seg_starts[i + 1];
        if (w < 0 || end - start > max_rows || ranks[w] <= 0) continue;
        for (int64_t j = i + 1; j < segments && j <= i + 2; j++) { /* the next segments' weights on their way */
            const int64_t v = seg_slots[j];
            if (v < 0 || v == w || ranks[v] <= 0) continue;
            const char *pa = (const char *)(a + v * R * in), *pb = (const char *)(b + v * out * R);
            for (int64_t k = 0; k < ranks[v]; k++)
                for (int64_t c = 0; c < in * 4; c += 64) __builtin_prefetch(pa + k * in * 4 + c);
            for (int64_t c = 0; c < out * R * 4; c += 64) __builtin_prefetch(pb + c);
        }
        for (int64_t t = start; t < end; t++)
            lora_row(y + t * y_stride, x + t * x_stride, a + w * R * in, b + w * out * R, R, in, out, ranks[w], scales[w]);
    }
}
