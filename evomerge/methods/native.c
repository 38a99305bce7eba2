/*
 * evomerge native CPU merge kernel (built and loaded by evomerge/methods/native.py).
 *
 * Each build is one *variant*, fixed at compile time by the EM_* macros below (number of sources,
 * trim mode, sign election, rescale, normalize, input and output dtypes), so that the per-entry loop
 * is a single vectorized pass with every branch resolved. native.py compiles the variants a search
 * needs on first use and caches them. Every build also exports the driver em_run, which merges a list
 * of jobs (one output tensor each, each naming its variant's em_block) on a pool of threads that take
 * work items of ITEM entries from a shared counter.
 *
 * Per entry j of a job with n sources x_i and base b, all arithmetic in float32, in the order of the
 * reference kernels (evomerge/methods/kernels.py task_vector_kernel, evaluated eagerly; the job is
 * built from a TensorPlan by evomerge/methods/native.py task_vector_job):
 *
 *   d_i = x_i - b
 *   trim:  THR   keep |d_i| >= t_i(j)
 *          BAND  keep |d_i| >= hi_i(j) and not |d_i| >= lo_i(j)
 *          HASH  keep (mix32((start + j + key_i) mod 2^32) >> 8) < cutoff_i    (the DARE masks)
 *          a magnitude threshold is t before the tie cut (j <= cut) and t_up after it; blocks are
 *          cut into sub-ranges at the tie cuts, so the thresholds are scalars in the vector loop
 *   d_i = keep ? d_i : 0;  rescale: d_i = d_i / div_i
 *   elect (TIES):  wd_i = d_i * w_i; total = sum_i wd_i; agree_i = total >= 0 ? wd_i > 0 : wd_i < 0
 *                  (computed as wd_i * (total >= 0 ? 1 : -1) > 0, the same predicate)
 *                  m = sum_i (agree_i ? wd_i : 0); normalize: m = m / (D == 0 ? 1 : D) with
 *                  D = sum_i (agree_i ? w_i : 0)
 *   no election:   m = fma(d_i, w_i, m) from m = 0 (as torch.add(alpha=)), then m = m / norm_div
 *   res = m * lambda + b, rounded to the output dtype (round to nearest even)
 *
 * The linear variant (EM_LINEAR, no base, no trim): res = x_0 * w_0, then res = fma(x_i, w_i, res)
 * for i >= 1, as evomerge/methods/linear.py (acc = x_0 * w_0; acc.add_(x_i, alpha=w_i)).
 *
 * A job's `nonfinite` is set when a rounded output value is inf or nan.
 *
 * Also exported by every build: em_all_finite (one pass over an array's bits), em_count (the
 * counting pass of top-k cuts: per chunk, how many |x - b| are > v and == v; evomerge/methods/plan.py) and
 * em_rank_order (the resident TIES statistics: a stable descending radix argsort of |x - b|;
 * evomerge/resident/stats.py). Built with -ffp-contract=off
 * (no fused multiply-add but the explicit fmaf) and -fno-strict-aliasing (bit casts through pointers).
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#define EM_MAX 8      /* sources per job */
#define BLK 256       /* entries per inner block (L1-resident float32 buffers) */
#define ITEM 32768    /* entries per work item, a multiple of BLK */

/* macros, not enums: the preprocessor compares them */
#define DT_F32 0
#define DT_BF16 1
#define DT_F16 2
#define TRIM_NONE 0
#define TRIM_THR 1
#define TRIM_BAND 2
#define TRIM_HASH 3

/* the variant: defaults make a driver-only build compile */
#ifndef EM_N
#define EM_N 1
#endif
#ifndef EM_MODE
#define EM_MODE TRIM_NONE
#endif
#ifndef EM_ELECT
#define EM_ELECT 0
#endif
#ifndef EM_RESCALE
#define EM_RESCALE 0
#endif
#ifndef EM_NORMALIZE
#define EM_NORMALIZE 0
#endif
#ifndef EM_LINEAR       /* the linear method: no base (J->base unused), EM_MODE must be TRIM_NONE */
#define EM_LINEAR 0
#endif
#ifndef EM_XDT          /* dtype of the base and every source, or -1 when they differ or are float16 */
#define EM_XDT (-1)
#endif
#ifndef EM_ODT
#define EM_ODT DT_F32
#endif

typedef struct em_job em_job;
typedef int (*em_block_fn)(const em_job *, int64_t, int);

struct em_job {
    em_block_fn fn;
    void *out;
    const void *base;
    const void *xs[EM_MAX];
    int64_t numel;
    int64_t hash_start;
    int64_t hi_cut[EM_MAX];
    int64_t lo_cut[EM_MAX];
    float w[EM_MAX];
    float div[EM_MAX];
    float hi[EM_MAX];
    float hi_up[EM_MAX];
    float lo[EM_MAX];
    float lo_up[EM_MAX];
    uint32_t key[EM_MAX];
    uint32_t cutoff[EM_MAX];
    float lam;
    float norm_div;
    int32_t n;
    int32_t base_dtype;
    int32_t x_dtype[EM_MAX];
    int32_t nonfinite;
};

int em_abi(void) { return (int)sizeof(em_job) * 100 + EM_MAX; }

static inline float bf16_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint32_t f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static void load(float *restrict dst, const void *src, int dt, int64_t off, int len) {
    if (dt == DT_F32) {
        memcpy(dst, (const float *)src + off, (size_t)len * sizeof(float));
    } else if (dt == DT_BF16) {
        const uint16_t *restrict s = (const uint16_t *)src + off;
        for (int k = 0; k < len; k++) dst[k] = bf16_f32(s[k]);
    } else {
        const uint16_t *restrict s = (const uint16_t *)src + off;
        int k = 0;
#if defined(__AVX512F__)
        for (; k + 16 <= len; k += 16)
            _mm512_storeu_ps(dst + k, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(s + k))));
#endif
        for (; k < len; k++) {
            _Float16 h;
            memcpy(&h, s + k, sizeof h);
            dst[k] = (float)h;
        }
    }
}

/* float32 -> float16 (round to nearest even) into dst; returns nonzero when a value is inf or nan */
static int store_f16(uint16_t *restrict dst, const float *restrict src, int len) {
    uint32_t bad = 0;
    int k = 0;
#if defined(__AVX512F__)
    for (; k + 16 <= len; k += 16)
        _mm256_storeu_si256((__m256i *)(dst + k),
                            _mm512_cvtps_ph(_mm512_loadu_ps(src + k), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
    for (; k < len; k++) {
        _Float16 h = (_Float16)src[k];
        memcpy(dst + k, &h, sizeof h);
    }
    for (k = 0; k < len; k++) bad |= (dst[k] & 0x7C00u) == 0x7C00u;
    return bad != 0;
}

static inline uint32_t mix32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x21F0AAADu;
    x ^= x >> 15;
    x *= 0x735A2D97u;
    return x ^ (x >> 15);
}

#if EM_XDT >= 0
#define IN(p, j) (EM_XDT == DT_BF16 ? bf16_f32(((const uint16_t *)(p))[j]) : ((const float *)(p))[j])
#endif

/* entries o .. o + len - 1 of job J; returns nonzero when an output value is inf or nan */
int em_block(const em_job *restrict J, int64_t o, int len) {
    enum { n = EM_N };
    float w[EM_MAX], q[EM_MAX], t0[EM_MAX], t1[EM_MAX], l0[EM_MAX], l1[EM_MAX];
    int32_t hc[EM_MAX], lc[EM_MAX];
    uint32_t c0[EM_MAX], cut[EM_MAX];
    const void *xp[EM_MAX];
    for (int i = 0; i < n; i++) {
        xp[i] = J->xs[i];
        w[i] = J->w[i], q[i] = J->div[i];
        t0[i] = J->hi[i], t1[i] = J->hi_up[i], l0[i] = J->lo[i], l1[i] = J->lo_up[i];
        /* tie cuts relative to this block, clamped to [-1, len]: entry k uses t0 when k <= hc */
        int64_t h = J->hi_cut[i] - o, l = J->lo_cut[i] - o;
        hc[i] = (int32_t)(h < -1 ? -1 : h > len ? len : h);
        lc[i] = (int32_t)(l < -1 ? -1 : l > len ? len : l);
        c0[i] = (uint32_t)(J->hash_start + o) + J->key[i];
        cut[i] = J->cutoff[i];
    }
    const float lam = J->lam, nd = J->norm_div;
#if EM_XDT < 0
    float b[BLK], x[EM_MAX][BLK];
    if (!EM_LINEAR) load(b, J->base, J->base_dtype, o, len);
    for (int i = 0; i < n; i++) load(x[i], xp[i], J->x_dtype[i], o, len);
#define BASE(k) b[k]
#define SRC(i, k) x[i][k]
#else
#define BASE(k) IN(J->base, o + (k))
#define SRC(i, k) IN(xp[i], o + (k))
#endif
#if EM_ODT == DT_F16
    float res[BLK];
#endif
    uint32_t bad = 0;
    /* sub-ranges [s, e) of the block that no tie cut splits: thresholds are scalars within one */
    for (int s = 0, e; s < len; s = e) {
        float th[EM_MAX], tl[EM_MAX];
        e = len;
        for (int i = 0; i < n; i++) {
            if (EM_MODE == TRIM_THR || EM_MODE == TRIM_BAND) {
                if (hc[i] >= s && hc[i] + 1 < e) e = hc[i] + 1;
                if (EM_MODE == TRIM_BAND && lc[i] >= s && lc[i] + 1 < e) e = lc[i] + 1;
            }
            th[i] = s <= hc[i] ? t0[i] : t1[i];
            tl[i] = s <= lc[i] ? l0[i] : l1[i];
        }
        for (int k = s; k < e; k++) {
#if EM_LINEAR
            float r = SRC(0, k) * w[0];
            for (int i = 1; i < n; i++) r = fmaf(SRC(i, k), w[i], r);
#else
            const float bk = BASE(k);
            float wd[EM_MAX];
            float m = 0.0f;
            for (int i = 0; i < n; i++) {
                float d = SRC(i, k) - bk;
                if (EM_MODE == TRIM_THR) {
                    d = fabsf(d) >= th[i] ? d : 0.0f;
                } else if (EM_MODE == TRIM_BAND) {
                    const float a = fabsf(d);
                    d = (a >= th[i]) & !(a >= tl[i]) ? d : 0.0f;
                } else if (EM_MODE == TRIM_HASH) {
                    d = (mix32(c0[i] + (uint32_t)k) >> 8) < cut[i] ? d : 0.0f;
                }
                if (EM_RESCALE) d = d / q[i];
                if (EM_ELECT) wd[i] = d * w[i];
                else m = fmaf(d, w[i], m);
            }
            if (EM_ELECT) {
                float total = wd[0];
                for (int i = 1; i < n; i++) total = total + wd[i];
                const float sg = total >= 0.0f ? 1.0f : -1.0f;
                float dd = 0.0f;
                for (int i = 0; i < n; i++) {
                    const int agree = wd[i] * sg > 0.0f;
                    m = m + (agree ? wd[i] : 0.0f);
                    dd = dd + (agree ? w[i] : 0.0f);
                }
                if (EM_NORMALIZE) m = m / (dd == 0.0f ? 1.0f : dd);
            } else {
                m = m / nd;
            }
            const float r = m * lam + bk;
#endif
#if EM_ODT == DT_BF16
            const uint32_t xb = f32_bits(r);
            ((uint16_t *)J->out)[o + k] = (uint16_t)((xb + 0x7FFFu + ((xb >> 16) & 1u)) >> 16);
            bad |= (xb & 0x7FFFFFFFu) > 0x7F7F7FFFu; /* inf or nan, or rounds to inf */
#elif EM_ODT == DT_F32
            ((float *)J->out)[o + k] = r;
            bad |= (f32_bits(r) & 0x7F800000u) == 0x7F800000u;
#else
            res[k] = r;
#endif
        }
    }
#if EM_ODT == DT_F16
    bad |= store_f16((uint16_t *)J->out + o, res, len);
#endif
    return bad != 0;
}

/* 1 when every entry of the n-entry array p (dtype dt) is finite, else 0 */
int em_all_finite(const void *p, int dt, int64_t n) {
    uint32_t bad = 0;
    if (dt == DT_F32) {
        const uint32_t *restrict u = (const uint32_t *)p;
        for (int64_t k = 0; k < n; k++) bad |= (u[k] & 0x7F800000u) == 0x7F800000u;
    } else {
        const uint16_t *restrict u = (const uint16_t *)p;
        const uint16_t e = dt == DT_BF16 ? 0x7F80u : 0x7C00u; /* exponent bits */
        for (int64_t k = 0; k < n; k++) bad |= (u[k] & e) == e;
    }
    return !bad;
}

#define RMAX 64 /* threads per call */

/* fn(arg) on `nthreads` threads, the caller's included (clamped to 1..RMAX). fn takes work from a
 * shared counter in arg, so a thread that cannot be started leaves its share to the others. */
static void pool(void *(*fn)(void *), void *arg, int nthreads) {
    pthread_t tid[RMAX];
    int started = 0;
    if (nthreads > RMAX) nthreads = RMAX;
    for (int t = 1; t < nthreads; t++) {
        if (pthread_create(&tid[started], NULL, fn, arg) != 0) break;
        started++;
    }
    fn(arg);
    for (int t = 0; t < started; t++) pthread_join(tid[t], NULL);
}

/* entry i of an array of dtype dt, as float32 */
static inline float ld(const void *p, int dt, int64_t i) {
    if (dt == DT_F32) return ((const float *)p)[i];
    if (dt == DT_BF16) return bf16_f32(((const uint16_t *)p)[i]);
    _Float16 h;
    memcpy(&h, (const uint16_t *)p + i, sizeof h);
    return (float)h;
}

/* ---- TIES counting pass: per chunk, how many |x - b| (float32) are > v and == v ---- */

typedef struct {
    const void *x, *b;
    int xdt, bdt;
    int64_t n, chunk, nchunks;
    float v;
    int64_t *gt, *eq;
    int64_t next;             /* shared chunk counter */
    int nan;
} em_counting;

#define COUNT_LOOP(LX, LB)                                                        \
    for (int64_t i = lo; i < hi; i++) {                                           \
        const float d = fabsf((LX) - (LB));                                       \
        g += d > v;                                                               \
        q += d == v;                                                              \
        bad |= d != d;                                                            \
    }

static void *count_worker(void *arg) {
    em_counting *C = (em_counting *)arg;
    const float v = C->v;
    for (;;) {
        const int64_t c = __atomic_fetch_add(&C->next, 1, __ATOMIC_RELAXED);
        if (c >= C->nchunks) break;
        const int64_t lo = c * C->chunk, hi = lo + C->chunk < C->n ? lo + C->chunk : C->n;
        int64_t g = 0, q = 0;
        int bad = 0;
        if (C->xdt == DT_BF16 && C->bdt == DT_BF16) {
            const uint16_t *x = (const uint16_t *)C->x, *b = (const uint16_t *)C->b;
            COUNT_LOOP(bf16_f32(x[i]), bf16_f32(b[i]))
        } else if (C->xdt == DT_F32 && C->bdt == DT_F32) {
            const float *x = (const float *)C->x, *b = (const float *)C->b;
            COUNT_LOOP(x[i], b[i])
        } else {
            COUNT_LOOP(ld(C->x, C->xdt, i), ld(C->b, C->bdt, i))
        }
        C->gt[c] = g;
        C->eq[c] = q;
        if (bad) __atomic_store_n(&C->nan, 1, __ATOMIC_RELAXED);
    }
    return NULL;
}

/* gt[c], eq[c] = entries of chunk c (entries c*chunk .. (c+1)*chunk - 1) with |x - b| > v and == v,
 * float32 arithmetic as torch's (float32(x) - float32(b)). Returns 1 when some |x - b| is nan,
 * 0 otherwise, -1 for bad sizes. */
int em_count(const void *x, int xdt, const void *b, int bdt, int64_t n, float v, int64_t chunk,
             int64_t *gt, int64_t *eq, int nthreads) {
    if (n < 0 || chunk < 1) return -1;
    em_counting C = {x, b, xdt, bdt, n, chunk, (n + chunk - 1) / chunk, v, gt, eq, 0, 0};
    pool(count_worker, &C, nthreads < C.nchunks ? nthreads : (int)C.nchunks);
    return C.nan;
}

/* ---- rank orders: stable descending argsort of |x - b| (float32), for the TIES statistics ---- */

#define RB 8                   /* bits per radix digit: 4 passes over 32-bit keys */
#define RN (1 << RB)

typedef struct {
    const void *x, *b;
    int xdt, bdt;
    int64_t n;
    uint32_t *key[2];
    int32_t *idx[2];
    int nthreads, src, shift;
    int64_t (*hist)[RN];       /* [thread][digit]: counts, then scatter offsets */
} em_rank;

typedef struct {
    em_rank *R;
    int t;
    void (*fn)(em_rank *, int);
} em_part;

#define PART_LO(R, t) ((R)->n * (t) / (R)->nthreads)
#define PART_HI(R, t) ((R)->n * ((t) + 1) / (R)->nthreads)

/* keys: ~bits of |x - b| sort descending magnitudes ascending (non-negative floats order as their
 * bits); indices start in flat order and every LSD radix pass is stable, so ties keep index order */
static void rank_keys(em_rank *R, int t) {
    for (int64_t i = PART_LO(R, t); i < PART_HI(R, t); i++) {
        const float d = fabsf(ld(R->x, R->xdt, i) - ld(R->b, R->bdt, i));
        R->key[0][i] = d != d ? ~0x7FC00000u : ~f32_bits(d); /* every nan alike, first (torch's order) */
        R->idx[0][i] = (int32_t)i;
    }
}

static void rank_count(em_rank *R, int t) {
    int64_t *h = R->hist[t];
    const uint32_t *k = R->key[R->src];
    memset(h, 0, sizeof(int64_t) * RN);
    for (int64_t i = PART_LO(R, t); i < PART_HI(R, t); i++) h[(k[i] >> R->shift) & (RN - 1)]++;
}

static void rank_scatter(em_rank *R, int t) {
    int64_t *h = R->hist[t];
    const int src = R->src, shift = R->shift;
    const uint32_t *k = R->key[src];
    const int32_t *ix = R->idx[src];
    uint32_t *ko = R->key[src ^ 1];
    int32_t *io = R->idx[src ^ 1];
    for (int64_t i = PART_LO(R, t); i < PART_HI(R, t); i++) {
        const int64_t o = h[(k[i] >> shift) & (RN - 1)]++;
        ko[o] = k[i];
        io[o] = ix[i];
    }
}

static void *part_main(void *arg) {
    em_part *P = (em_part *)arg;
    P->fn(P->R, P->t);
    return NULL;
}

/* fn(R, t) for every part t on its own thread (the caller's included); a part whose thread
 * cannot be started runs on the caller */
static void parallel(em_rank *R, void (*fn)(em_rank *, int)) {
    pthread_t tid[RMAX];
    em_part parts[RMAX];
    int started[RMAX] = {0};
    for (int t = 1; t < R->nthreads; t++) {
        parts[t] = (em_part){R, t, fn};
        started[t] = pthread_create(&tid[t], NULL, part_main, &parts[t]) == 0;
    }
    fn(R, 0);
    for (int t = 1; t < R->nthreads; t++) {
        if (started[t]) pthread_join(tid[t], NULL);
        else fn(R, t);
    }
}

/* order[0..n) = flat indices of |x - b| (float32 arithmetic, as torch computes it) sorted by
 * magnitude descending, ties by ascending index: torch.sort(descending=True, stable=True).
 * Scratch: key0, key1 (n uint32 each), idx1 (n int32). Returns 0, or -1 for a bad size. */
int em_rank_order(const void *x, int xdt, const void *b, int bdt, int64_t n, int32_t *order,
                  uint32_t *key0, uint32_t *key1, int32_t *idx1, int nthreads) {
    if (n < 0 || n > INT32_MAX) return -1;
    if (nthreads < 1 || n < 65536) nthreads = 1;
    if (nthreads > RMAX) nthreads = RMAX;
    int64_t(*hist)[RN] = (int64_t(*)[RN])malloc(sizeof(int64_t) * RN * (size_t)nthreads);
    if (!hist) return -1;
    em_rank R = {x, b, xdt, bdt, n, {key0, key1}, {order, idx1}, nthreads, 0, 0, hist};
    parallel(&R, rank_keys);
    for (int pass = 0; pass < 32 / RB; pass++) {
        R.shift = pass * RB;
        parallel(&R, rank_count);
        /* offsets, digit-major then thread order (stable across threads); a digit shared by every
         * key makes the pass a plain copy: skip it */
        int64_t total = 0;
        int same = 0;
        for (int d = 0; d < RN; d++) {
            int64_t sum = 0;
            for (int u = 0; u < nthreads; u++) sum += hist[u][d];
            same |= sum == n;
            for (int u = 0; u < nthreads; u++) {
                const int64_t c = hist[u][d];
                hist[u][d] = total;
                total += c;
            }
        }
        if (same) continue;
        parallel(&R, rank_scatter);
        R.src ^= 1;
    }
    free(hist);
    if (R.src == 1) memcpy(order, idx1, sizeof(int32_t) * (size_t)n);
    return 0;
}

typedef struct {
    em_job *jobs;
    const int64_t *first; /* first[j] = index of job j's first work item; first[njobs] = total */
    int njobs;
    int64_t next;         /* shared work-item counter */
} em_ctx;

static void *worker(void *arg) {
    em_ctx *C = (em_ctx *)arg;
    int j = 0;
    for (;;) {
        int64_t item = __atomic_fetch_add(&C->next, 1, __ATOMIC_RELAXED);
        if (item >= C->first[C->njobs]) break;
        while (C->first[j + 1] <= item) j++; /* a thread's items come in increasing order */
        em_job *J = &C->jobs[j];
        int64_t lo = (item - C->first[j]) * ITEM;
        int64_t hi = lo + ITEM < J->numel ? lo + ITEM : J->numel;
        int bad = 0;
        for (int64_t o = lo; o < hi; o += BLK) bad |= J->fn(J, o, (int)(hi - o < BLK ? hi - o : BLK));
        if (bad) __atomic_store_n(&J->nonfinite, 1, __ATOMIC_RELAXED);
    }
    return NULL;
}

/* Run every job on `nthreads` threads (the caller's included; if a thread cannot be started the
 * others take its share). Returns 0, or -1 for a malformed job list (nothing is written then). */
int em_run(em_job *jobs, int njobs, int nthreads) {
    for (int j = 0; j < njobs; j++)
        if (!jobs[j].fn || jobs[j].n < 1 || jobs[j].n > EM_MAX || jobs[j].numel < 0) return -1;
    int64_t *first = (int64_t *)malloc(sizeof(int64_t) * (size_t)(njobs + 1));
    if (!first) return -1;
    first[0] = 0;
    for (int j = 0; j < njobs; j++) {
        jobs[j].nonfinite = 0;
        first[j + 1] = first[j] + (jobs[j].numel + ITEM - 1) / ITEM;
    }
    em_ctx C = {jobs, first, njobs, 0};
    pool(worker, &C, nthreads);
    free(first);
    return 0;
}
