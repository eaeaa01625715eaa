/* One projection's adapter delta for the short segments of a step, float32, on the CPU: for the rows t of each
   segment with slot w >= 0 and r = ranks[w] > 0 (a [S, R, in], b [S, out, R]),
       y[t] += scales[w] * (act(x[t] . a[w, :r]ᵀ + a_bias[w, :r]) . b[w, :, :r]ᵀ) + b_bias[w]
   LoRA (ops.LoraApply) has no biases and no non-linearity; a bottleneck adapter (lora_shrink then lora_expand
   with their biases) has both, x being the layer's output before any delta. Segments of more than max_rows rows
   are left to the caller; segments are shared by `threads` of the calling thread's OpenMP team. Built with the
   other CPU kernels by native.py. Each row's down-projection stays on the
   stack for its up-projection; the adapters' weights are read where they lie, the next segments' prefetched. */

#include <math.h>
#include <stddef.h>
#include <stdint.h>

enum { ACT_NONE, ACT_RELU, ACT_GELU, ACT_SILU, ACT_TANH }; /* native.py's ACTIVATION_CODES */
enum { PREFETCH_MAX_BYTES = 16384 }; /* a segment's weights prefetched ahead at most (see quiver_adapter_apply) */

static void activate(float *h, int64_t r, int act) {
    for (int64_t k = 0; k < r; k++) {
        const float v = h[k];
        switch (act) {
            case ACT_RELU: h[k] = v > 0.0f ? v : 0.0f; break;
            case ACT_GELU: h[k] = 0.5f * v * (1.0f + erff(v * 0.70710678118654752f)); break;
            case ACT_SILU: h[k] = v / (1.0f + expf(-v)); break;
            case ACT_TANH: h[k] = tanhf(v); break;
            default: break;
        }
    }
}

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

static void adapter_row(float *y, const float *x, const float *a, const float *b, int64_t R, int64_t in, int64_t out,
                        int64_t r, float scale, const float *a_bias, int act, const float *b_bias) {
    float h[1024]; /* the row's down-projection: r <= R <= 1024 (native.py checks) */
    __m512 parts[16];
    for (int64_t k0 = 0; k0 < r; k0 += 16) { /* 16 ranks at a time */
        for (int64_t k = 0; k < 16; k++)
            parts[k] = k0 + k < r ? dot_parts(x, a + (k0 + k) * in, in) : _mm512_setzero_ps();
        _mm512_mask_storeu_ps(h + k0, first(r - k0), sum16(parts));
    }
    if (a_bias != NULL)
        for (int64_t k = 0; k < r; k++) h[k] += a_bias[k];
    activate(h, r, act);
    for (int64_t k = 0; k < r; k++) h[k] *= scale;
    for (int64_t o0 = 0; o0 < out; o0 += 16) { /* 16 outputs at a time */
        const int64_t m = out - o0 < 16 ? out - o0 : 16;
        for (int64_t i = 0; i < 16; i++) parts[i] = i < m ? dot_parts(h, b + (o0 + i) * R, r) : _mm512_setzero_ps();
        const __mmask16 valid = first(m);
        __m512 delta = sum16(parts);
        if (b_bias != NULL) delta = _mm512_add_ps(delta, _mm512_maskz_loadu_ps(valid, b_bias + o0));
        _mm512_mask_storeu_ps(y + o0, valid, _mm512_add_ps(_mm512_maskz_loadu_ps(valid, y + o0), delta));
    }
}
#else
static void adapter_row(float *y, const float *x, const float *a, const float *b, int64_t R, int64_t in, int64_t out,
                        int64_t r, float scale, const float *a_bias, int act, const float *b_bias) {
    float h[1024];
    for (int64_t k = 0; k < r; k++) {
        float s = 0.0f;
#pragma omp simd reduction(+ : s)
        for (int64_t i = 0; i < in; i++) s += x[i] * a[k * in + i];
        h[k] = a_bias != NULL ? s + a_bias[k] : s;
    }
    activate(h, r, act);
    for (int64_t k = 0; k < r; k++) h[k] *= scale;
    for (int64_t o = 0; o < out; o++) {
        float s = 0.0f;
#pragma omp simd reduction(+ : s)
        for (int64_t k = 0; k < r; k++) s += h[k] * b[o * R + k];
        y[o] += b_bias != NULL ? s + b_bias[o] : s;
    }
}
#endif

void quiver_adapter_apply(float *y, int64_t y_stride, const float *x, int64_t x_stride, const float *a, const float *b,
                          int64_t R, int64_t in, int64_t out, const int32_t *ranks, const float *scales,
                          const float *a_bias, int act, const float *b_bias, const int32_t *seg_starts,
                          const int32_t *seg_slots, int64_t segments, int64_t max_rows, int64_t threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (int64_t i = 0; i < segments; i++) {
        const int64_t w = seg_slots[i], start = seg_starts[i], end = seg_starts[i + 1];
        if (w < 0 || end - start > max_rows || ranks[w] <= 0) continue;
        /* the next segments' weights on their way, when they are a few KB (the skeleton's: 0.93 -> 0.89 ms for 44
           calls); larger ones stream better by the hardware's prefetcher alone (the default model's r=16 on every
           projection, 4.7 MB a call: 45.5 -> 25.2 ms for 210 calls without these prefetches) */
        for (int64_t j = i + 1; j < segments && j <= i + 2; j++) {
            const int64_t v = seg_slots[j];
            if (v < 0 || v == w || ranks[v] <= 0 || ranks[v] * (in + out) * 4 > PREFETCH_MAX_BYTES) continue;
            const char *pa = (const char *)(a + v * R * in), *pb = (const char *)(b + v * out * R);
            for (int64_t k = 0; k < ranks[v]; k++)
                for (int64_t c = 0; c < in * 4; c += 64) __builtin_prefetch(pa + k * in * 4 + c);
            for (int64_t c = 0; c < out * R * 4; c += 64) __builtin_prefetch(pb + c);
        }
        for (int64_t t = start; t < end; t++)
            adapter_row(y + t * y_stride, x + t * x_stride, a + w * R * in, b + w * out * R, R, in, out, ranks[w],
                        scales[w], a_bias != NULL ? a_bias + w * R : NULL, act, b_bias != NULL ? b_bias + w * out : NULL);
    }
}
