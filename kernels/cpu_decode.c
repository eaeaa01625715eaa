/* Decode attention over the paged KV cache, read in place: the CPU serving path's attention for decode rows.

   Built and loaded by native.py (cc -O3 -march=native -fopenmp: a large call is shared by the calling thread's
   OpenMP team, torch's own). Semantics: ops.PagedAttention restricted to
   sequences with one new token (query_starts[b + 1] - query_starts[b] == 1); other sequences are left alone.
   For such a sequence b, n = seq_lens[b], and query head h (kv head g = h / G, G = H / KVH):
       out[row, h] = softmax(scale * q[row, h] . K[j, g] for j < n) . V[:n, g]
   where entry j lives in block block_tables[b, j / BS] at offset j % BS. Float32 throughout; the G query heads
   of a kv head are computed one after the other, its entries in cache for all but the first. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>

typedef struct {
    const float *q;           /* [T, H, D], rows q_row_stride apart, heads D apart */
    int64_t q_row_stride;
    const float *k_cache;     /* [NB, BS, KVH, D] contiguous */
    const float *v_cache;
    const int32_t *block_tables; /* [B, max_blocks] */
    int64_t max_blocks;
    const int32_t *seq_lens;  /* [B] */
    const int32_t *query_starts; /* [B + 1] */
    float *out;               /* [T, H, D] contiguous */
    int64_t heads, kv_heads, dim, block_size;
    float scale;
    int64_t first, last;      /* this worker's share: tasks first..last-1, a task = (sequence, kv head) */
} job_t;

/* One (sequence, kv head): its G query heads' scores over the n entries, softmax, then the weighted sum of
   values. Inlined into one copy per common head size so that the dot products and sums unroll and vectorise. */
static inline __attribute__((always_inline)) void attend_one(const job_t *job, int64_t b, int64_t g,
                                                             float *scores, float *acc, const int64_t D) {
    const int64_t row = job->query_starts[b];
    const int64_t n = job->seq_lens[b];
    const int64_t G = job->heads / job->kv_heads, KVH = job->kv_heads, BS = job->block_size;
    const int64_t entry = KVH * D; /* floats from one entry to the next inside a block */
    const int32_t *table = job->block_tables + b * job->max_blocks;
    const float *q = job->q + row * job->q_row_stride + g * G * D; /* this kv head's G query heads */
    for (int64_t j0 = 0, blk = 0; j0 < n; j0 += BS, blk++) {
        const int64_t m = n - j0 < BS ? n - j0 : BS;
        const float *k = job->k_cache + ((int64_t)table[blk] * BS * KVH + g) * D;
        for (int64_t i = 0; i < m; i++, k += entry) {
            for (int64_t h = 0; h < G; h++) {
                const float *qh = q + h * D;
                float s = 0.0f;
#pragma omp simd reduction(+ : s)
                for (int64_t d = 0; d < D; d++) s += qh[d] * k[d];
                scores[h * n + j0 + i] = s * job->scale;
            }
        }
    }
    for (int64_t h = 0; h < G; h++) {
        float *sh = scores + h * n;
        float top = -INFINITY, total = 0.0f;
        for (int64_t j = 0; j < n; j++) top = sh[j] > top ? sh[j] : top;
        for (int64_t j = 0; j < n; j++) {
            sh[j] = expf(sh[j] - top);
            total += sh[j];
        }
        const float inv = 1.0f / total;
        for (int64_t j = 0; j < n; j++) sh[j] *= inv;
    }
    for (int64_t i = 0; i < G * D; i++) acc[i] = 0.0f;
    for (int64_t j0 = 0, blk = 0; j0 < n; j0 += BS, blk++) {
        const int64_t m = n - j0 < BS ? n - j0 : BS;
        const float *v = job->v_cache + ((int64_t)table[blk] * BS * KVH + g) * D;
        for (int64_t i = 0; i < m; i++, v += entry) {
            for (int64_t h = 0; h < G; h++) {
                const float p = scores[h * n + j0 + i];
                float *a = acc + h * D;
#pragma omp simd
                for (int64_t d = 0; d < D; d++) a[d] += p * v[d];
            }
        }
    }
    float *o = job->out + (row * job->heads + g * G) * D;
    for (int64_t i = 0; i < G * D; i++) o[i] = acc[i];
}

#if defined(__AVX512F__)
#include "cpu_simd.h"

/* q . k as 16 partial sums (sum16 adds them): q is C vectors of 16, k the C * 16 floats of one key */
static inline __m512 products(const __m512 *q, const float *k, const int64_t C) {
    __m512 acc = _mm512_mul_ps(q[0], _mm512_loadu_ps(k));
    for (int64_t c = 1; c < C; c++) acc = _mm512_fmadd_ps(q[c], _mm512_loadu_ps(k + c * 16), acc);
    return acc;
}

/* attend_one for D a multiple of 16, one query head at a time with its q and its output in registers: scores 16
   entries at a time (products summed by sum16), softmax 16 at a time, then the values' weighted sum. */
static inline __attribute__((always_inline)) void attend_wide(const job_t *job, int64_t b, int64_t g,
                                                              float *scores, const int64_t D) {
    enum { W = 16 };
    const int64_t C = D / W; /* vectors per head */
    const int64_t row = job->query_starts[b];
    const int64_t n = job->seq_lens[b];
    const int64_t G = job->heads / job->kv_heads, KVH = job->kv_heads, BS = job->block_size;
    const int64_t entry = KVH * D;
    const int32_t *table = job->block_tables + b * job->max_blocks;
    const __m512 scale = _mm512_set1_ps(job->scale);
    for (int64_t h = 0; h < G; h++) {
        const float *qh = job->q + row * job->q_row_stride + (g * G + h) * D;
        __m512 q[C];
        for (int64_t c = 0; c < C; c++) q[c] = _mm512_loadu_ps(qh + c * W);
        __m512 top = _mm512_set1_ps(-INFINITY);
        int64_t blk = 0, off = 0; /* entry j0 + i's place: block table[blk], offset off */
        for (int64_t j0 = 0; j0 < n; j0 += W) { /* entries j0..j0+15 (fewer at the end) */
            __m512 prod[W];
            const int64_t m = n - j0 < W ? n - j0 : W;
            if (h == 0 && off == 0) { /* this block's values and the next block's keys on their way */
                /* (only the entries it holds: a partly filled last block's other lines are never read) */
                const int64_t held = n - j0 < BS ? n - j0 : BS, next = n - j0 - BS < BS ? n - j0 - BS : BS;
                const float *vb = job->v_cache + ((int64_t)table[blk] * BS * KVH + g) * D;
                const float *kb = next > 0 ? job->k_cache + ((int64_t)table[blk + 1] * BS * KVH + g) * D : NULL;
                for (int64_t i = 0; i < held; i++)
                    for (int64_t c = 0; c < D; c += 16) _mm_prefetch((const char *)(vb + i * entry + c), _MM_HINT_T0);
                for (int64_t i = 0; i < next; i++)
                    for (int64_t c = 0; c < D; c += 16) _mm_prefetch((const char *)(kb + i * entry + c), _MM_HINT_T0);
            }
            if (m == W && off == 0 && BS % W == 0) { /* 16 entries in one block: one address */
                const float *k = job->k_cache + (((int64_t)table[blk] * BS + off) * KVH + g) * D;
                for (int64_t i = 0; i < W; i++, k += entry) prod[i] = products(q, k, C);
                off += W;
                if (off == BS) blk++, off = 0;
            } else for (int64_t i = 0; i < W; i++) {
                if (i >= m) { prod[i] = _mm512_setzero_ps(); continue; }
                const float *k = job->k_cache + (((int64_t)table[blk] * BS + off) * KVH + g) * D;
                if (++off == BS) blk++, off = 0;
                prod[i] = products(q, k, C);
            }
            const __m512 s = _mm512_mul_ps(sum16(prod), scale);
            const __mmask16 valid = (__mmask16)((1u << m) - 1);
            _mm512_mask_storeu_ps(scores + j0, valid, s);
            top = _mm512_mask_max_ps(top, valid, top, s);
        }
        const __m512 vmax = _mm512_set1_ps(_mm512_reduce_max_ps(top));
        __m512 total = _mm512_setzero_ps();
        for (int64_t j0 = 0; j0 < n; j0 += W) {
            const int64_t m = n - j0 < W ? n - j0 : W;
            const __mmask16 valid = (__mmask16)((1u << m) - 1);
            const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(valid, scores + j0), vmax));
            _mm512_mask_storeu_ps(scores + j0, valid, e);
            total = _mm512_mask_add_ps(total, valid, total, e);
        }
        const float inv = 1.0f / _mm512_reduce_add_ps(total);
        /* U sets of accumulators, entry i into set i % U, so that at least four multiply-adds are in flight
           (one set of C vectors would chain every entry's on the previous one's when C is small) */
        enum { U = 4 };
        const int64_t sets = C >= U ? 1 : U / C;
        __m512 o[U][C];
        for (int64_t u = 0; u < sets; u++)
            for (int64_t c = 0; c < C; c++) o[u][c] = _mm512_setzero_ps();
        for (int64_t j0 = 0, blk = 0; j0 < n; j0 += BS, blk++) {
            const int64_t m = n - j0 < BS ? n - j0 : BS;
            const float *v = job->v_cache + ((int64_t)table[blk] * BS * KVH + g) * D;
            const float *p = scores + j0;
            int64_t i = 0;
            for (; i + sets <= m; i += sets)
                for (int64_t u = 0; u < sets; u++) {
                    const __m512 pu = _mm512_set1_ps(p[i + u]);
                    const float *vu = v + (i + u) * entry;
                    for (int64_t c = 0; c < C; c++) o[u][c] = _mm512_fmadd_ps(pu, _mm512_loadu_ps(vu + c * W), o[u][c]);
                }
            for (; i < m; i++) {
                const __m512 pi = _mm512_set1_ps(p[i]);
                for (int64_t c = 0; c < C; c++) o[0][c] = _mm512_fmadd_ps(pi, _mm512_loadu_ps(v + i * entry + c * W), o[0][c]);
            }
        }
        for (int64_t u = 1; u < sets; u++)
            for (int64_t c = 0; c < C; c++) o[0][c] = _mm512_add_ps(o[0][c], o[u][c]);
        float *out = job->out + (row * job->heads + g * G + h) * D;
        for (int64_t c = 0; c < C; c++) _mm512_storeu_ps(out + c * W, _mm512_mul_ps(o[0][c], _mm512_set1_ps(inv)));
    }
}

#define ATTEND_D(DIM) \
    static void attend_##DIM(const job_t *job, int64_t b, int64_t g, float *s, float *a) { (void)a; attend_wide(job, b, g, s, DIM); }
#else
#define ATTEND_D(DIM) \
    static void attend_##DIM(const job_t *job, int64_t b, int64_t g, float *s, float *a) { attend_one(job, b, g, s, a, DIM); }
#endif

ATTEND_D(16)
ATTEND_D(32)
ATTEND_D(64)
ATTEND_D(80)
ATTEND_D(96)
ATTEND_D(128)
ATTEND_D(256)
static void attend_any(const job_t *job, int64_t b, int64_t g, float *s, float *a) { attend_one(job, b, g, s, a, job->dim); }

typedef void (*attend_fn)(const job_t *, int64_t, int64_t, float *, float *);

static attend_fn pick(int64_t dim) {
    switch (dim) {
        case 16: return attend_16;
        case 32: return attend_32;
        case 64: return attend_64;
        case 80: return attend_80;
        case 96: return attend_96;
        case 128: return attend_128;
        case 256: return attend_256;
        default: return attend_any;
    }
}

/* Sequence b's first keys and values (up to PREFETCH_BYTES of each) on their way into cache, the entries it holds
   in its blocks with every kv head's: the tasks of all its kv heads follow one another. Measured at 128 sequences
   of 26 entries, 16 blocks scattered over a 22-layer cache (out of L2): 101 -> 69 us a call with this, the
   per-block prefetches kept. Inlined by force: GCC 12 judges a function that only prefetches free of effects and
   drops its calls. */
enum { PREFETCH_BYTES = 8192 };
static inline __attribute__((always_inline)) void prefetch_sequence(const job_t *job, int64_t b) {
    const int64_t BS = job->block_size, entry = job->kv_heads * job->dim, n = job->seq_lens[b];
    const int64_t most = PREFETCH_BYTES / (BS * entry * 4) > 1 ? PREFETCH_BYTES / (BS * entry * 4) : 1;
    for (int64_t i = 0; i < most && i * BS < n; i++) {
        const int64_t at = (int64_t)job->block_tables[b * job->max_blocks + i] * BS * entry;
        const int64_t bytes = (n - i * BS < BS ? n - i * BS : BS) * entry * 4;
        const char *k = (const char *)(job->k_cache + at), *v = (const char *)(job->v_cache + at);
        for (int64_t c = 0; c < bytes; c += 64) {
            __builtin_prefetch(k + c);
            __builtin_prefetch(v + c);
        }
    }
}

/* This share's tasks; 1 if its scratch memory could not be had, else 0. */
static int run_job(const job_t *job) {
    const int64_t KVH = job->kv_heads, G = job->heads / job->kv_heads;
    int64_t longest = 0;
    for (int64_t t = job->first; t < job->last; t++) {
        const int64_t n = job->seq_lens[t / KVH];
        longest = n > longest ? n : longest;
    }
    float *scores = malloc(sizeof(float) * (size_t)(G * (longest + 1) + G * job->dim));
    if (scores == NULL) return 1;
    float *acc = scores + G * (longest + 1);
    const attend_fn attend = pick(job->dim);
    for (int64_t t = job->first; t < job->last; t++) {
        const int64_t b = t / KVH;
        if (t % KVH == 0 && t + KVH < job->last) prefetch_sequence(job, b + 1);
        if (job->query_starts[b + 1] - job->query_starts[b] == 1 && job->seq_lens[b] > 0)
            attend(job, b, t % KVH, scores, acc);
    }
    free(scores);
    return 0;
}

/* Returns 0 on success, nonzero if scratch memory could not be had (out is then incomplete). `threads`: how many
   of the calling thread's OpenMP team (torch's: native.py links the same libgomp) share the work. */
int quiver_decode_attention(const float *q, int64_t q_row_stride, const float *k_cache, const float *v_cache,
                            const int32_t *block_tables, int64_t max_blocks, const int32_t *seq_lens,
                            const int32_t *query_starts, int64_t batch, float *out, int64_t heads,
                            int64_t kv_heads, int64_t dim, int64_t block_size, float scale, int64_t threads) {
    job_t base = {q, q_row_stride, k_cache, v_cache, block_tables, max_blocks, seq_lens, query_starts, out,
                  heads, kv_heads, dim, block_size, scale, 0, batch * kv_heads};
    const int64_t tasks = batch * kv_heads;
    if (threads > tasks) threads = tasks;
    if (threads <= 1) return run_job(&base);
    enum { MAX_THREADS = 256 };
    job_t jobs[MAX_THREADS];
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    /* shares of equal KV entries, not equal tasks: sequences differ in length */
    int64_t total = 0;
    for (int64_t b = 0; b < batch; b++) total += seq_lens[b];
    int64_t t = 0, done = 0;
    for (int64_t w = 0; w < threads; w++) {
        jobs[w] = base;
        jobs[w].first = t;
        const int64_t goal = total * (w + 1) / threads;
        while (t < tasks && (done < goal || w == threads - 1)) {
            if (t % kv_heads == kv_heads - 1) done += seq_lens[t / kv_heads];
            t++;
        }
        jobs[w].last = t;
    }
    int failed = 0;
#pragma omp parallel for num_threads(threads) schedule(static, 1) reduction(| : failed)
    for (int64_t w = 0; w < threads; w++) failed |= run_job(&jobs[w]);
    return failed;
}
