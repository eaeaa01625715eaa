/* The decoder layer's elementwise steps on the CPU, one pass each (float32): the residual add with RMSNorm,
   rope with the new keys' and values' store into the paged cache, and SiLU(gate) * up. Built with
   cpu_decode.c by native.py, with -ffp-contract=off: every product and sum is rounded as torch's separate ops
   round them (no fused multiply-add), so rope gives torch's results bit for bit; the norm's sum of squares
   is added in another order than torch's, a last-bit difference at most. */

#include <math.h>
#include <stddef.h>
#include <stdint.h>

/* residual_out[t] = residual[t] + delta[t] (residual NULL: delta[t]);
   out[t] = weight * (residual_out[t] * (1 / sqrt(mean(residual_out[t]^2) + eps))), as transformers' RMSNorm */
void quiver_add_rms_norm(const float *delta, int64_t delta_stride, const float *residual, float *residual_out,
                         const float *weight, float eps, float *out, int64_t rows, int64_t n) {
    for (int64_t t = 0; t < rows; t++) {
        const float *d = delta + t * delta_stride;
        float *r = residual_out + t * n;
        float *o = out + t * n;
        if (residual != NULL) {
            const float *old = residual + t * n;
#pragma omp simd
            for (int64_t i = 0; i < n; i++) r[i] = old[i] + d[i];
        } else {
#pragma omp simd
            for (int64_t i = 0; i < n; i++) r[i] = d[i];
        }
        float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
        for (int64_t i = 0; i < n; i++) squares += r[i] * r[i];
        const float inv = 1.0f / sqrtf(squares / (float)n + eps);
#pragma omp simd
        for (int64_t i = 0; i < n; i++) o[i] = weight[i] * (r[i] * inv);
    }
}

/* Row t of qkv holds H query heads, KVH key heads and KVH value heads of D values. Query and key heads are
   rotated: y = x * cos[t] + roll(x, D / 2) * sin[t] (sin's first half negated, see forward.py); queries go to
   q_out [T, H, D], keys and values to their slot in the cache ([NB * BS, KVH, D] flat: slot s at s * KVH * D). */
void quiver_rope_store(const float *qkv, int64_t row_stride, const float *cos, const float *sin, const int64_t *slots,
                       float *q_out, float *k_cache, float *v_cache, int64_t rows, int64_t heads, int64_t kv_heads,
                       int64_t dim) {
    const int64_t half = dim / 2, entry = kv_heads * dim;
    enum { AHEAD = 8 };
    for (int64_t t = 0; t < rows; t++) {
        if (t + AHEAD < rows) { /* the slots a later row writes, fetched for writing: cold lines of the cache (at
                                   128 rows scattered over a 22-layer cache, 41 -> 31 us a call) */
            const char *k_next = (const char *)(k_cache + slots[t + AHEAD] * entry);
            const char *v_next = (const char *)(v_cache + slots[t + AHEAD] * entry);
            for (int64_t c = 0; c < entry * 4; c += 64) {
                __builtin_prefetch(k_next + c, 1);
                __builtin_prefetch(v_next + c, 1);
            }
        }
        const float *x = qkv + t * row_stride;
        const float *c = cos + t * dim, *s = sin + t * dim;
        float *k_dst = k_cache + slots[t] * kv_heads * dim;
        float *v_dst = v_cache + slots[t] * kv_heads * dim;
        for (int64_t h = 0; h < heads + kv_heads; h++) {
            const float *xh = x + h * dim;
            float *y = h < heads ? q_out + (t * heads + h) * dim : k_dst + (h - heads) * dim;
#pragma omp simd
            for (int64_t i = 0; i < half; i++) y[i] = xh[i] * c[i] + xh[i + half] * s[i];
#pragma omp simd
            for (int64_t i = half; i < dim; i++) y[i] = xh[i] * c[i] + xh[i - half] * s[i];
        }
        const float *v = x + (heads + kv_heads) * dim;
#pragma omp simd
        for (int64_t i = 0; i < kv_heads * dim; i++) v_dst[i] = v[i];
    }
}

#include "cpu_simd.h"

/* out[t, i] = silu(x[t, i]) * x[t, n + i] = x / (1 + e^-x) * up, for the n gate columns of each row */
void quiver_silu_mul(const float *x, int64_t x_stride, float *out, int64_t rows, int64_t n) {
    for (int64_t t = 0; t < rows; t++) {
        const float *gate = x + t * x_stride, *up = gate + n;
        float *o = out + t * n;
        int64_t i = 0;
#if defined(__AVX512F__)
        const __m512 one = _mm512_set1_ps(1.0f);
        for (; i + 16 <= n; i += 16) {
            const __m512 g = _mm512_loadu_ps(gate + i);
            const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), g));
            const __m512 silu = _mm512_div_ps(g, _mm512_add_ps(one, e));
            _mm512_storeu_ps(o + i, _mm512_mul_ps(silu, _mm512_loadu_ps(up + i)));
        }
#endif
        for (; i < n; i++) o[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
    }
}
