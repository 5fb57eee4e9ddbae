/* One GLM-5 decoder layer for the new tokens of a decode step, in a single call; weights in fp32, bf16,
   block FP8 or int8, activations and accumulation in fp32.

   THE CONTRACT (twin: glm5/engine/fused.py builds the arguments, glm5/kernels/native.py mirrors the structs;
   the library exports sizeof(LayerArgs) and sizeof(Mat), and the loader refuses a mismatch):

   Mat       one weight matrix [rows, cols] as the model stores it, never copied or re-quantised:
             fmt 0 fp32; 1 bf16 (uint16 bits); 2 FP8 e4m3 with `scale` = weight_scale_inv [ceil(rows'/128),
             ceil(cols/128)] fp32 multipliers (rows before `split` and from `split` on are two separately
             quantised matrices, as the stacked experts' gate and up are: their scale rows follow each other);
             3 int8 with `scale` [rows, ceil(cols/32)] fp32 (one multiplier per group of 32 inputs). y = out_scale
             * (W x) + bias (bias fp32 [rows] or NULL). Owned by the model (Python keeps it alive).
   LayerArgs sizes and eps (set once per layer), the layer's matrices (`in` = [q_a; kv_a (; indexer wk; indexer
             weights_proj x its scales)] read by the input-normed row, `q` = [q_b (; indexer wq_b)] read by the
             normed query latent, kv_b, o, `ffn` = [router (; shared gate; shared up)] or [gate; up], `down`, the
             expert banks `gate_up` [E, 2Fe, D] and `down_e` [E, D, Fe] described by expert 0), the fp32 norm
             vectors; then per-call fields set by fused.py before each call: B rows, the residual stream `h`
             [B, D] (updated in place, owned by the caller), rope cos/sin, the paged cache stores (owned by the
             cache; the kernel writes each row's new latent and indexer key into `write_slot`), gather tables,
             lengths, and the DSA top-k scratch `topk_idx`/`topk_count` (caller-owned, shared by the layers of
             one call sequence so IndexCache layers reuse the previous selection). Scratch buffers are the
             kernel's own (malloc per call).
   Rows of one sequence (speculative verification: T tokens) come in order, each writes its cache entry and
   attends up to it. The arithmetic is GLM5ForCausalLM.forward's (tests/test_engine_fused.py and
   tests/test_engine_formats.py hold it to the model on the same dequantised weights).

   SIMD: chosen by the build's target (glm5/kernels/native.py compiles with -march=native by default, so the
   path matches the CPU it loads on; GLM5_NATIVE_MARCH builds another): AVX-512, AVX2 + F16C + FMA, or portable
   C. FP8 e4m3 -> fp32 is exact in registers: the byte b, sign-extended to 16 bits, shifted left by 7 and with
   bit 14 cleared, is the IEEE half of (e4m3 value x 2^-8), normals and subnormals alike (vcvtph2ps makes it
   fp32); the 2^8 goes into the block scale. NaN codes (0x7f / 0xff, never produced by quantize) are not kept.
   bf16 is widened by a shift. int8 by a sign extension. Large products are split over OpenMP threads by
   output row (each output is summed by one thread in a fixed order: deterministic). */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
static inline int64_t max_threads(void) { return omp_get_max_threads(); }
#else
static inline int64_t max_threads(void) { return 1; }
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define GLM5_ISA "avx512"
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define GLM5_ISA "avx2"
#else
#define GLM5_ISA "portable"
#endif

typedef float v8 __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4)));  /* unaligned loads */

enum { FMT_F32 = 0, FMT_BF16 = 1, FMT_FP8 = 2, FMT_I8 = 3 };
#define FP8_BLOCK 128
#define I8_GROUP 32

typedef struct {
    const void *w;          /* [rows, cols] elements of fmt */
    const float *scale;     /* FP8: block multipliers; int8: group multipliers; NULL otherwise */
    const float *bias;      /* [rows] or NULL */
    int64_t fmt, rows, cols;
    int64_t split;          /* FP8: first row of the second separately quantised part (rows: none) */
    float out_scale;
    int32_t pad_;
} Mat;

typedef struct {
    /* sizes */
    int64_t B, D, q_lora, rank, R, H, nope, v, Hi, Di, topk;
    int64_t n_in, n_q;     /* rows of the `in` and `q` products (sum over their matrices) */
    int64_t has_indexer, dsa, rope_interleave, idx_rope_interleave;
    float in_eps, q_eps, kv_eps, idx_ln_eps, ffn_eps, softmax_scale;
    /* attention weights */
    Mat in[4], q[2], kv_b, o;
    int64_t n_in_mats, n_q_mats;
    const float *in_norm_w, *q_norm_w, *kv_norm_w, *idx_ln_w, *idx_ln_b;
    /* feed-forward: ffn = [router; shared gate; shared up] (MoE) or [gate; up] (dense) */
    Mat ffn[3], down;
    int64_t n_ffn_mats;
    const float *post_norm_w;
    int64_t ffn_inter;     /* dense intermediate, or the shared expert's (0: none) */
    int64_t is_moe, E, top_k, n_group, topk_group, Fe, norm_topk;
    float route_scale;
    const float *e_bias;
    Mat gate_up, down_e;   /* the banks [E, 2Fe, D], [E, D, Fe], as expert 0 */
    /* per step */
    float *h;                           /* [B, D] residual stream, updated in place */
    const float *cos, *sin;             /* [P, R/2] */
    int64_t rope_stride;                /* 0 when every row shares the position, else R/2 */
    float *kv_store, *idx_store;        /* [slots, rank+R], [slots, Di] (idx_store NULL: shared layer) */
    const int64_t *write_slot;          /* [B] */
    const int64_t *gather;              /* [B, gather_stride] slots of key positions 0..len-1 */
    int64_t gather_stride;
    const int64_t *lengths;             /* [B] keys per row, the new one included */
    int64_t *topk_idx;                  /* [B, topk]: written by indexer layers, read by shared ones */
    int64_t *topk_count;                /* [B]: keys selected (0: none, the row attends to all its keys) */
} LayerArgs;

static inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

/* e4m3 code -> its value x 2^-8 (the same scaling as the SIMD conversion), for tails and the portable path */
static float E4M3[256];
__attribute__((constructor)) static void init_e4m3(void) {
    for (int b = 0; b < 256; b++) {
        int e = (b >> 3) & 15, m = b & 7;
        float mag = e ? ldexpf(1.0f + m / 8.0f, e - 7) : ldexpf(m / 8.0f, -6);
        E4M3[b] = ((b & 0x80) ? -mag : mag) * (1.0f / 256.0f);
    }
}
static inline float bf16f(uint16_t u) {
    uint32_t bits = (uint32_t)u << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* --- vectors of VW floats: loads that widen each format ------------------------------------------------- */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define VW 16
typedef __m512 VF;
#define VZERO _mm512_setzero_ps()
#define VSET1(s) _mm512_set1_ps(s)
#define VFMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define VADD(a, b) _mm512_add_ps(a, b)
#define VMUL(a, b) _mm512_mul_ps(a, b)
#define VHSUM(a) _mm512_reduce_add_ps(a)
#define VSTORE(p, a) _mm512_storeu_ps(p, a)
#define LD_F32(p) _mm512_loadu_ps(p)
#define LD_BF16(p) \
    _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(p))), 16))
#define LD_FP8(p)                                                                                     \
    _mm512_cvtph_ps(_mm256_and_si256(                                                                 \
        _mm256_slli_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(p))), 7),           \
        _mm256_set1_epi16((short)0xBF80)))
#define LD_I8(p) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p))))
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define VW 8
typedef __m256 VF;
#define VZERO _mm256_setzero_ps()
#define VSET1(s) _mm256_set1_ps(s)
#define VFMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define VADD(a, b) _mm256_add_ps(a, b)
#define VMUL(a, b) _mm256_mul_ps(a, b)
static inline float VHSUM(__m256 a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#define VSTORE(p, a) _mm256_storeu_ps(p, a)
#define LD_F32(p) _mm256_loadu_ps(p)
#define LD_BF16(p) \
    _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(p))), 16))
#define LD_FP8(p)                                                                                   \
    _mm256_cvtph_ps(_mm_and_si128(_mm_slli_epi16(_mm_cvtepi8_epi16(_mm_loadl_epi64((const __m128i *)(p))), 7), \
                                  _mm_set1_epi16((short)0xBF80)))
#define LD_I8(p) _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p))))
#else
#define VW 1
typedef float VF;
#define VZERO 0.0f
#define VSET1(s) (s)
#define VFMA(a, b, c) ((a) * (b) + (c))
#define VADD(a, b) ((a) + (b))
#define VMUL(a, b) ((a) * (b))
#define VHSUM(a) (a)
#define VSTORE(p, a) (*(p) = (a))
#define LD_F32(p) (*(const float *)(p))
#define LD_BF16(p) bf16f(*(const uint16_t *)(p))
#define LD_FP8(p) E4M3[*(const uint8_t *)(p)]
#define LD_I8(p) ((float)*(const int8_t *)(p))
#endif
/* scalar twins of the loads (tails) */
#define SC_F32(p, i) (((const float *)(p))[i])
#define SC_BF16(p, i) bf16f(((const uint16_t *)(p))[i])
#define SC_FP8(p, i) E4M3[((const uint8_t *)(p))[i]]
#define SC_I8(p, i) ((float)((const int8_t *)(p))[i])

/* sum_i w[i] x[i] over n, w in one format (FP8: the e4m3 values x 2^-8) */
#define DEF_DOT(name, T, LD, SC)                                                              \
    static inline float name(const T *w, const float *x, int64_t n) {                        \
        VF a0 = VZERO, a1 = VZERO;                                                            \
        int64_t i = 0;                                                                        \
        for (; i + 2 * VW <= n; i += 2 * VW) {                                                \
            a0 = VFMA(LD(w + i), LD_F32(x + i), a0);                                          \
            a1 = VFMA(LD(w + i + VW), LD_F32(x + i + VW), a1);                                \
        }                                                                                     \
        for (; i + VW <= n; i += VW) a0 = VFMA(LD(w + i), LD_F32(x + i), a0);                 \
        float s = VHSUM(VADD(a0, a1));                                                        \
        for (; i < n; i++) s += SC(w, i) * x[i];                                              \
        return s;                                                                             \
    }
DEF_DOT(dot_bf16, uint16_t, LD_BF16, SC_BF16)
#if VW > 1
DEF_DOT(dot_f32v, float, LD_F32, SC_F32)
#endif

/* out[i] = w[i] * s (w widened from its format) */
#define DEF_CVT(name, T, LD, SC)                                                              \
    static inline void name(const T *w, float s, float *out, int64_t n) {                    \
        int64_t i = 0;                                                                        \
        VF sv = VSET1(s);                                                                     \
        for (; i + VW <= n; i += VW) VSTORE(out + i, VMUL(LD(w + i), sv));                    \
        for (; i < n; i++) out[i] = SC(w, i) * s;                                             \
    }
DEF_CVT(cvt_bf16, uint16_t, LD_BF16, SC_BF16)
DEF_CVT(cvt_fp8, uint8_t, LD_FP8, SC_FP8)
DEF_CVT(cvt_i8, int8_t, LD_I8, SC_I8)

static float dot(const float *a, const float *b, int64_t n) {
    v8 acc0 = {0}, acc1 = {0};
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        v8 a0, a1, b0, b1;
        memcpy(&a0, a + i, 32); memcpy(&b0, b + i, 32);
        memcpy(&a1, a + i + 8, 32); memcpy(&b1, b + i + 8, 32);
        acc0 += a0 * b0;
        acc1 += a1 * b1;
    }
    for (; i + 8 <= n; i += 8) {
        v8 a0, b0;
        memcpy(&a0, a + i, 32); memcpy(&b0, b + i, 32);
        acc0 += a0 * b0;
    }
    acc0 += acc1;
    float s = 0.0f;
    for (int j = 0; j < 8; j++) s += acc0[j];
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}
#if VW > 1
#define dot_f32 dot_f32v
#else
#define dot_f32 dot
#endif

static void axpy(float *y, float a, const float *x, int64_t n) {   /* y += a x */
    for (int64_t i = 0; i < n; i++) y[i] += a * x[i];
}

/* --- weight matrices in any format -------------------------------------------------------------------- */
static inline size_t elem_size(int64_t fmt) { return fmt == FMT_F32 ? 4 : fmt == FMT_BF16 ? 2 : 1; }

/* the scale row of matrix row r (FP8 blocks of 128 rows, restarting at `split`; int8 one row each) */
static inline const float *scale_row(const Mat *m, int64_t r) {
    if (m->fmt == FMT_FP8) {
        int64_t sr = r < m->split ? r / FP8_BLOCK : cdiv(m->split, FP8_BLOCK) + (r - m->split) / FP8_BLOCK;
        return m->scale + sr * cdiv(m->cols, FP8_BLOCK);
    }
    return m->scale + r * cdiv(m->cols, I8_GROUP);
}

/* expert e of a bank described by expert 0 (the banks are [E, rows, cols] with their scales stacked alike) */
static Mat expert_mat(const Mat *bank, int64_t e) {
    Mat m = *bank;
    m.w = (const char *)bank->w + (size_t)(e * bank->rows * bank->cols) * elem_size(bank->fmt);
    if (bank->fmt == FMT_FP8)
        m.scale += e * (cdiv(bank->split, FP8_BLOCK) + cdiv(bank->rows - bank->split, FP8_BLOCK)) *
                   cdiv(bank->cols, FP8_BLOCK);
    else if (bank->fmt == FMT_I8)
        m.scale += e * bank->rows * cdiv(bank->cols, I8_GROUP);
    return m;
}

/* sum_j s[j / G] * (W[j] . x[j]) over the K inputs of one FP8 (G = 128, codes x 2^-8: the scale carries 2^8) or int8
   (G = 32) row: per group a vector sum, scaled into one of two vector accumulators (no horizontal sum per group) */
#define DEF_SCALED_DOT(name, T, LD, SC, G, MUL)                                                              \
    static float name(const T *q, const float *s, const float *x, int64_t K) {                               \
        VF acc0 = VZERO, acc1 = VZERO;                                                                       \
        float tail = 0.0f;                                                                                   \
        for (int64_t j = 0, g = 0; j < K; j += G, g++) {                                                     \
            const int64_t n = K - j < G ? K - j : G;                                                         \
            const float sc = s[g] * (MUL);                                                                   \
            VF t0 = VZERO, t1 = VZERO;                                                                       \
            int64_t i = 0;                                                                                   \
            for (; i + 2 * VW <= n; i += 2 * VW) {                                                           \
                t0 = VFMA(LD(q + j + i), LD_F32(x + j + i), t0);                                             \
                t1 = VFMA(LD(q + j + i + VW), LD_F32(x + j + i + VW), t1);                                   \
            }                                                                                                \
            for (; i + VW <= n; i += VW) t0 = VFMA(LD(q + j + i), LD_F32(x + j + i), t0);                    \
            if (g & 1) acc1 = VFMA(VADD(t0, t1), VSET1(sc), acc1);                                           \
            else acc0 = VFMA(VADD(t0, t1), VSET1(sc), acc0);                                                 \
            float st = 0.0f;                                                                                 \
            for (; i < n; i++) st += SC(q + j, i) * x[j + i];                                                \
            tail += st * sc;                                                                                 \
        }                                                                                                    \
        return VHSUM(VADD(acc0, acc1)) + tail;                                                               \
    }
DEF_SCALED_DOT(dot_fp8_row, uint8_t, LD_FP8, SC_FP8, FP8_BLOCK, 256.0f)
DEF_SCALED_DOT(dot_i8_row, int8_t, LD_I8, SC_I8, I8_GROUP, 1.0f)

/* out[b] = w . X[b] for B <= 4 inputs in one pass over w (fp32) */
static void dot_multi(const float *w, const float *X, int64_t ldx, int64_t B, int64_t n, float *out) {
    VF a0 = VZERO, a1 = VZERO, a2 = VZERO, a3 = VZERO;
    const float *x0 = X, *x1 = X + (B > 1 ? ldx : 0), *x2 = X + (B > 2 ? 2 * ldx : 0), *x3 = X + (B > 3 ? 3 * ldx : 0);
    int64_t i = 0;
    for (; i + VW <= n; i += VW) {
        VF wv = LD_F32(w + i);
        a0 = VFMA(wv, LD_F32(x0 + i), a0);
        a1 = VFMA(wv, LD_F32(x1 + i), a1);
        a2 = VFMA(wv, LD_F32(x2 + i), a2);
        a3 = VFMA(wv, LD_F32(x3 + i), a3);
    }
    float r[4] = {VHSUM(a0), VHSUM(a1), VHSUM(a2), VHSUM(a3)};
    for (; i < n; i++) {
        r[0] += w[i] * x0[i]; r[1] += w[i] * x1[i]; r[2] += w[i] * x2[i]; r[3] += w[i] * x3[i];
    }
    for (int64_t b = 0; b < B; b++) out[b] = r[b];
}

/* W[r, :] . x, without the out_scale and bias */
static float row_dot(const Mat *m, int64_t r, const float *x) {
    const int64_t K = m->cols;
    switch (m->fmt) {
        case FMT_F32: return dot_f32((const float *)m->w + r * K, x, K);
        case FMT_BF16: return dot_bf16((const uint16_t *)m->w + r * K, x, K);
        case FMT_FP8: return dot_fp8_row((const uint8_t *)m->w + r * K, scale_row(m, r), x, K);
        default: return dot_i8_row((const int8_t *)m->w + r * K, scale_row(m, r), x, K);
    }
}

/* AVX-512, 8-bit rows of a multiple of 64 inputs: the codes are widened in 128-bit lanes without cross-lane
   shuffles (vpmovsx* on 512-bit registers is the slow part of the loads above), which takes the inputs in another
   order per chunk of 64, so x is reordered once per product (`permute_x`, K floats) and every row reads it so.
   FP8: a 16-bit lane holds codes 2i and 2i+1; arithmetic shifts and the 0xBF80 mask make the IEEE halves of both
   (as LD_FP8): the chunk's order is [even codes 0..30 | 32..62 | odd codes 1..31 | 33..63]. int8: a 32-bit lane
   holds codes 4i..4i+3, sign-extended by two shifts: the order is [codes 4i | 4i+1 | 4i+2 | 4i+3] (i < 16), and
   lanes i < 8 belong to the chunk's first group of 32. */
#if VW == 16
#define PERMUTED(m) (((m)->fmt == FMT_FP8 || (m)->fmt == FMT_I8) && (m)->cols % 64 == 0)
static void permute_x(int64_t fmt, const float *x, float *xp, int64_t K) {
    for (int64_t c = 0; c < K; c += 64) {
        if (fmt == FMT_FP8)
            for (int i = 0; i < 32; i++) { xp[c + i] = x[c + 2 * i]; xp[c + 32 + i] = x[c + 2 * i + 1]; }
        else
            for (int k = 0; k < 4; k++)
                for (int i = 0; i < 16; i++) xp[c + 16 * k + i] = x[c + 4 * i + k];
    }
}
static float dot_fp8_perm(const uint8_t *q, const float *s, const float *xp, int64_t K) {
    __m512 acc0 = _mm512_setzero_ps(), acc1 = acc0;
    const __m512i mask = _mm512_set1_epi16((short)0xBF80);
    for (int64_t j = 0, g = 0; j < K; j += FP8_BLOCK, g++) {
        const int64_t n = K - j < FP8_BLOCK ? K - j : FP8_BLOCK;
        __m512 t0 = _mm512_setzero_ps(), t1 = t0;
        for (int64_t i = 0; i < n; i += 64) {
            const __m512i v = _mm512_loadu_si512(q + j + i);
            const __m512i odd = _mm512_and_si512(_mm512_srai_epi16(v, 1), mask);
            const __m512i even = _mm512_and_si512(_mm512_srai_epi16(_mm512_slli_epi16(v, 8), 1), mask);
            const float *x = xp + j + i;
            t0 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm512_castsi512_si256(even)), _mm512_loadu_ps(x), t0);
            t1 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm512_extracti64x4_epi64(even, 1)), _mm512_loadu_ps(x + 16), t1);
            t0 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm512_castsi512_si256(odd)), _mm512_loadu_ps(x + 32), t0);
            t1 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm512_extracti64x4_epi64(odd, 1)), _mm512_loadu_ps(x + 48), t1);
        }
        const __m512 sc = _mm512_set1_ps(s[g] * 256.0f);
        if (g & 1) acc1 = _mm512_fmadd_ps(_mm512_add_ps(t0, t1), sc, acc1);
        else acc0 = _mm512_fmadd_ps(_mm512_add_ps(t0, t1), sc, acc0);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}
static float dot_i8_perm(const int8_t *q, const float *s, const float *xp, int64_t K) {
    __m512 acc0 = _mm512_setzero_ps(), acc1 = acc0;
    for (int64_t j = 0, g = 0; j < K; j += 64, g += 2) {
        const __m512i v = _mm512_loadu_si512(q + j);
        const float *x = xp + j;
        const __m512 sc = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(s[g]), _mm512_set1_ps(s[g + 1]));
        __m512 t = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(v, 24), 24)), _mm512_loadu_ps(x));
        t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(v, 16), 24)), _mm512_loadu_ps(x + 16), t);
        t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(v, 8), 24)), _mm512_loadu_ps(x + 32), t);
        t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srai_epi32(v, 24)), _mm512_loadu_ps(x + 48), t);
        if (g & 2) acc1 = _mm512_fmadd_ps(t, sc, acc1);
        else acc0 = _mm512_fmadd_ps(t, sc, acc0);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}
/* W[r, :] . x for a PERMUTED matrix, xp = permute_x(x) */
static float row_dot_perm(const Mat *m, int64_t r, const float *xp) {
    const int64_t K = m->cols;
    if (m->fmt == FMT_FP8) return dot_fp8_perm((const uint8_t *)m->w + r * K, scale_row(m, r), xp, K);
    return dot_i8_perm((const int8_t *)m->w + r * K, scale_row(m, r), xp, K);
}
#else
#define PERMUTED(m) 0
static void permute_x(int64_t fmt, const float *x, float *xp, int64_t K) { (void)fmt; memcpy(xp, x, K * sizeof(float)); }
static float row_dot_perm(const Mat *m, int64_t r, const float *xp) { return row_dot(m, r, xp); }
#endif

/* out = W[r, :] as fp32 (the dequantised row: code x its scale, one rounding, as glm5.checkpoint.fp8.dequantize) */
static void row_get(const Mat *m, int64_t r, float *out) {
    const int64_t K = m->cols;
    switch (m->fmt) {
        case FMT_F32: memcpy(out, (const float *)m->w + r * K, K * sizeof(float)); return;
        case FMT_BF16: cvt_bf16((const uint16_t *)m->w + r * K, 1.0f, out, K); return;
        case FMT_FP8: {
            const uint8_t *q = (const uint8_t *)m->w + r * K;
            const float *s = scale_row(m, r);
            for (int64_t j = 0, kb = 0; j < K; j += FP8_BLOCK, kb++)
                cvt_fp8(q + j, s[kb] * 256.0f, out + j, K - j < FP8_BLOCK ? K - j : FP8_BLOCK);
            return;
        }
        default: {
            const int8_t *q = (const int8_t *)m->w + r * K;
            const float *s = scale_row(m, r);
            for (int64_t j = 0, g = 0; j < K; j += I8_GROUP, g++)
                cvt_i8(q + j, s[g], out + j, K - j < I8_GROUP ? K - j : I8_GROUP);
            return;
        }
    }
}

/* y += a * W[r, :] */
static void row_axpy(const Mat *m, int64_t r, float a, float *y, float *tmp) {
    if (m->fmt == FMT_F32) {
        axpy(y, a, (const float *)m->w + r * m->cols, m->cols);
        return;
    }
    row_get(m, r, tmp);
    axpy(y, a, tmp, m->cols);
}

#define ROW_TMP 16384  /* widest row the several-inputs path widens on the stack (wider: one dot per input) */

/* One product of a batch of them: Y[b, i] = out_scale * (W[i, :] . X[b, :]) + bias[i] for the B inputs. */
typedef struct {
    Mat m;
    const float *X;
    int64_t ldx, B;
    float *Y;
    int64_t ldy;
} Job;

/* One output row of a job: each weight row is read once for all of the job's inputs (xp: the one input reordered
   for a PERMUTED matrix, or NULL) */
static void job_row(const Job *j, int64_t r, const float *xp) {
    const Mat *m = &j->m;
    const float add = m->bias ? m->bias[r] : 0.0f;
    const int64_t B = j->B;
    if (xp) {
        j->Y[r] = m->out_scale * row_dot_perm(m, r, xp) + add;
    } else if (B == 1) {
        j->Y[r] = m->out_scale * row_dot(m, r, j->X) + add;
    } else if (m->cols > ROW_TMP) {
        for (int64_t b = 0; b < B; b++) j->Y[b * j->ldy + r] = m->out_scale * row_dot(m, r, j->X + b * j->ldx) + add;
    } else {  /* the row widened once (in place for fp32), then dotted with up to 4 inputs per pass */
        float tmp[ROW_TMP], d[4];
        const float *w = (const float *)m->w + r * m->cols;
        if (m->fmt != FMT_F32) {
            row_get(m, r, tmp);
            w = tmp;
        }
        for (int64_t b0 = 0; b0 < B; b0 += 4) {
            const int64_t nb = B - b0 < 4 ? B - b0 : 4;
            dot_multi(w, j->X + b0 * j->ldx, j->ldx, nb, m->cols, d);
            for (int64_t b = 0; b < nb; b++) j->Y[(b0 + b) * j->ldy + r] = m->out_scale * d[b] + add;
        }
    }
}

/* Rows [lo, hi) of the jobs laid end to end (start[k]: job k's first row; start[n_jobs] = the total) */
static void job_rows(const Job *jobs, const int64_t *start, const float *const *xps, int64_t lo, int64_t hi) {
    int64_t k = 0;
    for (int64_t g = lo; g < hi; g++) {
        while (start[k + 1] <= g) k++;
        job_row(jobs + k, g - start[k], xps[k]);
    }
}

/* Several independent products in one pass: their rows (all jobs' together) are split over the threads, so a
   layer's projections, or all its routed experts, cost one fork-join, not one each. Each output is summed by one
   thread in a fixed order: the result does not depend on the thread count. */
#define MAX_JOBS 260  /* 256 experts + the shared one */
#define CHUNK_BYTES (64 << 10)
#define CHUNKS_PER_THREAD 8
static void run_jobs(const Job *jobs, int64_t n_jobs) {
    int64_t start[MAX_JOBS + 1], total = 0, work = 0, bytes = 0;
    for (int64_t k = 0; k < n_jobs; k++) {
        start[k] = total;
        total += jobs[k].m.rows;
        work += jobs[k].m.rows * jobs[k].m.cols * jobs[k].B;
        bytes += jobs[k].m.rows * jobs[k].m.cols * (int64_t)elem_size(jobs[k].m.fmt);
    }
    start[n_jobs] = total;
    /* the single inputs of the PERMUTED matrices, reordered once (without memory: the plain loads) */
    const float *xps[MAX_JOBS];
    int64_t n_perm = 0;
    for (int64_t k = 0; k < n_jobs; k++) n_perm += (jobs[k].B == 1 && PERMUTED(&jobs[k].m)) ? jobs[k].m.cols : 0;
    float *perm = n_perm ? malloc(sizeof(float) * n_perm) : NULL;
    for (int64_t k = 0, off = 0; k < n_jobs; k++) {
        xps[k] = NULL;
        if (perm && jobs[k].B == 1 && PERMUTED(&jobs[k].m)) {
            permute_x(jobs[k].m.fmt, jobs[k].X, perm + off, jobs[k].m.cols);
            xps[k] = perm + off;
            off += jobs[k].m.cols;
        }
    }
#ifdef _OPENMP
    if (work >= (1 << 17)) {
        /* contiguous ranges of rows handed out as threads come free (a thread woken late or slowed by another
           tenant does fewer), each at least CHUNK_BYTES of weights and at most CHUNKS_PER_THREAD per thread */
        const int64_t nt = max_threads();
        int64_t n_chunks = bytes / CHUNK_BYTES;
        n_chunks = n_chunks < nt ? nt : n_chunks > CHUNKS_PER_THREAD * nt ? CHUNKS_PER_THREAD * nt : n_chunks;
        n_chunks = n_chunks > total ? total : n_chunks;
        #pragma omp parallel for schedule(dynamic, 1)
        for (int64_t c = 0; c < n_chunks; c++)
            job_rows(jobs, start, xps, total * c / n_chunks, total * (c + 1) / n_chunks);
    } else
#endif
        job_rows(jobs, start, xps, 0, total);
    free(perm);
}

/* Y[b, :] = the outputs of n_mats matrices reading the same X, side by side from column 0 of Y */
static void linear_cat(const Mat *mats, int64_t n_mats, const float *X, int64_t ldx, int64_t B, float *Y, int64_t ldy) {
    Job jobs[4];
    memset(jobs, 0, sizeof jobs);
    for (int64_t k = 0, off = 0; k < n_mats; off += mats[k].rows, k++)
        jobs[k] = (Job){mats[k], X, ldx, B, Y + off, ldy};
    run_jobs(jobs, n_mats);
}

static void linear(const Mat *m, const float *X, int64_t ldx, int64_t B, float *Y, int64_t ldy) {
    linear_cat(m, 1, X, ldx, B, Y, ldy);
}
static float rms_factor(const float *x, int64_t n, float eps) {
    return 1.0f / sqrtf(dot(x, x, n) / (float)n + eps);
}

static float silu(float x) { return x / (1.0f + expf(-x)); }

/* RoPE on x[0:R] in place (rotated pairs written as [x1 cos - x2 sin ; x2 cos + x1 sin]), times `scale`. */
static void rope(float *x, const float *cos, const float *sin, int64_t R, int64_t interleave, float scale, float *tmp) {
    int64_t half = R / 2;
    for (int64_t i = 0; i < half; i++) {
        float x1 = interleave ? x[2 * i] : x[i];
        float x2 = interleave ? x[2 * i + 1] : x[half + i];
        tmp[i] = (x1 * cos[i] - x2 * sin[i]) * scale;
        tmp[half + i] = (x2 * cos[i] + x1 * sin[i]) * scale;
    }
    memcpy(x, tmp, R * sizeof(float));
}

/* score[s] = sum_j w_j relu(q_j . k_s) for the keys at slots[0:n]: the lightning indexer over the context,
   the part of a decode step that grows with it. `nv` = Di / 8 is a compile-time constant in each call below,
   so the per-key loops unroll (4x faster than with a run-time width); ReLU is branchless. */
static inline __attribute__((always_inline)) void indexer_scores_nv(
    const float *q, const float *w, int64_t Hi, const int64_t nv, const float *store, const int64_t *slots,
    int64_t n, float *score) {
    const int64_t Di = 8 * nv;
    v8 qv[512];  /* the queries, loaded once (Hi * Di <= 4096 floats: GLM-5's 32 heads x 128) */
    for (int64_t i = 0; i < Hi * nv; i++) memcpy(&qv[i], q + 8 * i, 32);
    /* long contexts: the keys are split over the OpenMP threads (torch's pool: torch.set_num_threads) */
    #pragma omp parallel for schedule(static) if (n * Hi * Di >= (1 << 18))
    for (int64_t s = 0; s < n; s++) {
        const float *k = store + slots[s] * Di;
        v8 kv[16];
        for (int64_t i = 0; i < nv; i++) kv[i] = *(const v8u *)(k + 8 * i);
        float acc = 0.0f;
        for (int64_t j = 0; j < Hi; j++) {
            v8 sum = qv[j * nv] * kv[0];
            for (int64_t i = 1; i < nv; i++) sum += qv[j * nv + i] * kv[i];
            float d = ((sum[0] + sum[4]) + (sum[1] + sum[5])) + ((sum[2] + sum[6]) + (sum[3] + sum[7]));
            acc += w[j] * (d > 0.0f ? d : 0.0f);  /* branchless ReLU (fmaxf is a libm call without -ffast-math) */
        }
        score[s] = acc;
    }
}

#if VW > 1
/* The same scores with 8 heads per 256-bit vector (AVX2 and AVX-512): q transposed once per call to qt [Di][HG x 8]
   (heads padded to HG groups of 8 with zero queries and weights), then for KEYS keys at a time every head's dot
   product grows by k[i] (broadcast) x qt[i] -- no horizontal sum per (key, head), each qt row serves KEYS keys.
   Each head's dot is summed over i in order; HG <= 4 (Hi <= 32, GLM-5's 32 heads). */
static inline float hsum8f(__m256 a) {
    __m128 r = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_movehdup_ps(r));
    return _mm_cvtss_f32(r);
}
/* keys per pass (KEYS, at most 8): enough accumulators in flight to cover an FMA's latency on both FMA ports */
#define IDX_KEYS_MAX 8
static inline __attribute__((always_inline)) void indexer_keys_qt_hg(
    const float *qt, const float *wv, int64_t Di, const int HG, const int KEYS, const float *store,
    const int64_t *slots, int64_t n, int64_t s, float *score) {
    const float *k[IDX_KEYS_MAX];
    for (int r = 0; r < KEYS; r++) k[r] = store + slots[s + r < n ? s + r : s] * Di;
    __m256 acc[IDX_KEYS_MAX][4];
    for (int r = 0; r < KEYS; r++)
        for (int g = 0; g < HG; g++) acc[r][g] = _mm256_setzero_ps();
    for (int64_t i = 0; i < Di; i++) {
        const float *qi = qt + i * HG * 8;
        for (int g = 0; g < HG; g++) {
            const __m256 qv = _mm256_loadu_ps(qi + 8 * g);
            for (int r = 0; r < KEYS; r++) acc[r][g] = _mm256_fmadd_ps(_mm256_broadcast_ss(k[r] + i), qv, acc[r][g]);
        }
    }
    for (int r = 0; r < KEYS && s + r < n; r++) {  /* sum_h w_h relu(dot_h) */
        __m256 t = _mm256_mul_ps(_mm256_max_ps(acc[r][0], _mm256_setzero_ps()), _mm256_loadu_ps(wv));
        for (int g = 1; g < HG; g++)
            t = _mm256_fmadd_ps(_mm256_max_ps(acc[r][g], _mm256_setzero_ps()), _mm256_loadu_ps(wv + 8 * g), t);
        score[s + r] = hsum8f(t);
    }
}
/* One OpenMP loop per (HG, KEYS): the region is outlined before inlining, so a loop inside the inlined function
   would be one outlined copy with HG and KEYS as run-time values (its accumulators then live in memory: 2-3x
   slower); here each case's outlined loop inlines indexer_keys_qt_hg with constants. */
#define INDEXER_QT_HG(HG, KEYS)                                                                   \
    do {                                                                                          \
        _Pragma("omp parallel for schedule(static) if (n * Hi * Di >= (1 << 18))")                \
        for (int64_t s = 0; s < n; s += (KEYS))                                                   \
            indexer_keys_qt_hg(qt, wv, Di, (HG), (KEYS), store, slots, n, s, score);              \
    } while (0)
#endif

static void indexer_scores(const float *q, const float *w, int64_t Hi, int64_t Di, const float *store,
                           const int64_t *slots, int64_t n, float *score) {
#if VW > 1
    if (Hi <= 32) {
        const int HG = (int)((Hi + 7) / 8);
        float wv[32];
        float *qt = malloc(sizeof(float) * Di * HG * 8);
        if (qt) {
            for (int64_t i = 0; i < Di; i++)
                for (int64_t h = 0; h < HG * 8; h++) qt[i * HG * 8 + h] = h < Hi ? q[h * Di + i] : 0.0f;
            for (int64_t h = 0; h < HG * 8; h++) wv[h] = h < Hi ? w[h] : 0.0f;
            switch (HG) {
                /* keys per pass measured best on Zen 4 for each target: AVX-512 has 32 vector registers, AVX2 16 */
                case 1: INDEXER_QT_HG(1, 8); break;
                case 2: INDEXER_QT_HG(2, VW == 16 ? 8 : 4); break;
                case 3: INDEXER_QT_HG(3, VW == 16 ? 8 : 2); break;
                default: INDEXER_QT_HG(4, VW == 16 ? 8 : 2); break;
            }
            free(qt);
            return;
        }
    }
#endif
    if (Hi * Di <= 4096) {
        switch (Di) {
            case 8: indexer_scores_nv(q, w, Hi, 1, store, slots, n, score); return;
            case 16: indexer_scores_nv(q, w, Hi, 2, store, slots, n, score); return;
            case 32: indexer_scores_nv(q, w, Hi, 4, store, slots, n, score); return;
            case 64: indexer_scores_nv(q, w, Hi, 8, store, slots, n, score); return;
            case 128: indexer_scores_nv(q, w, Hi, 16, store, slots, n, score); return;
        }
    }
    for (int64_t s = 0; s < n; s++) {  /* any other width */
        const float *k = store + slots[s] * Di;
        float acc = 0.0f;
        for (int64_t j = 0; j < Hi; j++) acc += w[j] * fmaxf(dot(q + j * Di, k, Di), 0.0f);
        score[s] = acc;
    }
}

/* Indices of the k largest of score[0:n] (any order), by a min-heap of size k. Exactly equal scores at the
   boundary are broken by heap order, not as torch.topk breaks them (only toy models with few indexer heads
   have such ties; either choice is a valid top-k). */
static void top_k(const float *score, int64_t n, int64_t k, int64_t *out, float *heap_v) {
    int64_t size = 0;
    for (int64_t s = 0; s < n; s++) {
        float v = score[s];
        if (size < k) {                       /* sift up */
            int64_t i = size++;
            while (i > 0) {
                int64_t p = (i - 1) / 2;
                if (heap_v[p] <= v) break;
                heap_v[i] = heap_v[p]; out[i] = out[p]; i = p;
            }
            heap_v[i] = v; out[i] = s;
        } else if (v > heap_v[0]) {           /* replace the minimum, sift down */
            int64_t i = 0;
            for (;;) {
                int64_t c = 2 * i + 1;
                if (c >= k) break;
                if (c + 1 < k && heap_v[c + 1] < heap_v[c]) c++;
                if (heap_v[c] >= v) break;
                heap_v[i] = heap_v[c]; out[i] = out[c]; i = c;
            }
            heap_v[i] = v; out[i] = s;
        }
    }
}

/* The same set for a long list (the indexer's scores over the context, k << n) without a heap pass over all n:
   a threshold t from an evenly spaced sample (its r-th largest, r set so that about 2k scores reach t), the
   scores >= t gathered in one pass, the heap on those. When k to 4k scores reach t, every score of the true top k
   does, so the set is the heap's over all n (ties at the boundary aside, as there); otherwise the plain heap runs.
   Costs ~n compares + the heaps of ~2k and a sample, where the plain heap replaces its minimum ~k ln(n/k) times
   for random scores and up to n times when later keys score higher (GLM-5 at 200K tokens: k = 2048, n/k ~ 100). */
static void top_k_long(const float *score, int64_t n, int64_t k, int64_t *out, float *heap_v) {
    const int64_t hits = 32;                     /* samples expected among the top k */
    const int64_t m = hits * n / (k > 0 ? k : 1);
    const int64_t r = hits + hits / 4 + 3 * 6 + 4; /* + a quarter, + ~3 standard deviations (sqrt(32) ~ 6) */
    const int64_t cap = 4 * k;                  /* candidates beyond it: the plain heap */
    if (k < 16 || m > n / 4) {
        top_k(score, n, k, out, heap_v);
        return;
    }
    float *sample = malloc(sizeof(float) * (m + r + cap)), *cand_v = sample + m + r;
    int64_t *idx = malloc(sizeof(int64_t) * (r + cap)), *cand = idx + r;
    int64_t c = 0;
    if (sample && idx) {
        for (int64_t i = 0; i < m; i++) sample[i] = score[i * n / m];
        top_k(sample, m, r, idx, sample + m);
        const float t = sample[m];  /* the heap's root: the r-th largest sample */
        int64_t s = 0;
#if VW == 16
        const __m512 tv = _mm512_set1_ps(t);
        for (; s + 16 <= n && c + 16 <= cap; s += 16)
            for (__mmask16 hit = _mm512_cmp_ps_mask(_mm512_loadu_ps(score + s), tv, _CMP_GE_OQ); hit; hit &= hit - 1) {
                const int64_t j = s + __builtin_ctz(hit);
                cand[c] = j;
                cand_v[c++] = score[j];
            }
#endif
        for (; s < n && c <= cap - 1; s++)
            if (score[s] >= t) {
                cand[c] = s;
                cand_v[c++] = score[s];
            }
        if (s < n) c = 0;  /* more than cap reach t */
    }
    if (c < k) {
        top_k(score, n, k, out, heap_v);
    } else {
        top_k(cand_v, c, k, out, heap_v);
        for (int64_t j = 0; j < k; j++) out[j] = cand[out[j]];
    }
    free(sample);
    free(idx);
}

/* Experts chosen for one row from its sigmoid scores: bias-corrected (group-limited) top-k, weights from the
   uncorrected scores, normalised and scaled. Returns the number chosen (top_k). */
static void route(const LayerArgs *a, const float *scores, int64_t *ids, float *weights, float *choice) {
    int64_t E = a->E, G = a->n_group, per = E / (G > 0 ? G : 1);
    for (int64_t e = 0; e < E; e++) choice[e] = scores[e] + a->e_bias[e];
    if (G > 1) {
        float gscore[64];
        int64_t keep[64];
        for (int64_t g = 0; g < G; g++) {      /* a group's score: the sum of its two best */
            float m1 = -INFINITY, m2 = -INFINITY;
            for (int64_t e = g * per; e < (g + 1) * per; e++) {
                float c = choice[e];
                if (c > m1) { m2 = m1; m1 = c; } else if (c > m2) m2 = c;
            }
            gscore[g] = m1 + (per > 1 ? m2 : 0.0f);
        }
        float hv[64];
        top_k(gscore, G, a->topk_group, keep, hv);
        for (int64_t g = 0; g < G; g++) {
            int kept = 0;
            for (int64_t j = 0; j < a->topk_group; j++) kept |= keep[j] == g;
            if (!kept)
                for (int64_t e = g * per; e < (g + 1) * per; e++) choice[e] = -INFINITY;
        }
    }
    float hv[256];
    top_k(choice, E, a->top_k, ids, hv);
    float sum = 0.0f;
    for (int64_t j = 0; j < a->top_k; j++) { weights[j] = scores[ids[j]]; sum += weights[j]; }
    for (int64_t j = 0; j < a->top_k; j++)
        weights[j] = (a->norm_topk ? weights[j] / (sum + 1e-20f) : weights[j]) * a->route_scale;
}

/* Row b's keys: the DSA top-k of the indexer scores, the previous layer's, or every key. Sets *keys (indices
   into the row's slots) and returns their number, or -3 (a shared layer with no selection before it). */
static int64_t select_keys(const LayerArgs *a, int64_t b, const float *idx_q, const float *idx_w, float *scores,
                           float *heap_v, int64_t *all_keys, const int64_t **keys) {
    const int64_t len = a->lengths[b];
    const int64_t *slots = a->gather + b * a->gather_stride;
    if (a->dsa && len > a->topk) {
        int64_t *sel = a->topk_idx + b * a->topk;
        if (a->has_indexer) {
            indexer_scores(idx_q, idx_w, a->Hi, a->Di, a->idx_store, slots, len, scores);
            top_k_long(scores, len, a->topk, sel, heap_v);
            a->topk_count[b] = a->topk;
        } else if (a->topk_count[b] != a->topk) {
            return -3;
        }
        *keys = sel;
        return a->topk;
    }
    for (int64_t s = 0; s < len; s++) all_keys[s] = s;
    if (a->has_indexer) a->topk_count[b] = 0;
    *keys = all_keys;
    return len;
}

/* Heads h0..h1 of row b (at most ATT_GROUP): each head's absorbed query [q_nope W_UK ; rope(q_pe)] x softmax scale
   (W_UK_h: rows 0..nope of head h's kv_b rows), its attention over the nk selected latents (values = c_kv), and
   o_h = o_lat_h W_UV^T (W_UV_h: rows nope.. of the same rows) -> o_row[hh * v ...]. The group's heads take each
   selected latent row in turn while it is in L1 (one read per group, not per head: GLM-5's 64 heads x 2,048 rows
   of 2.3 KB); each head's sums run in the same order as alone. `att` holds nk floats per head (stride
   sel_cap), `ql` W, `o_lat` rank and `tmp` rank + 16 + R per head. */
#define ATT_GROUP 4     /* heads per group: 4 queries and outputs of GLM-5's widths (~17 KB) stay in L1 with a row */
#define ATT_PREFETCH 2  /* the value sums request the row this many ahead (the scores: the next tile's rows) */
#define ATT_KEYS (VW == 16 ? 4 : 2)  /* rows per score tile: 4 x 4 accumulators in AVX-512's 32 registers */
static inline __attribute__((always_inline)) void attend_heads(
    const LayerArgs *a, int64_t b, int64_t h0, int64_t h1, const float *q, const int64_t *keys, int64_t nk,
    int64_t sel_cap, float *att, float *q_lat, float *o_lat, float *tmp, float *o_row) {
    const int64_t rank = a->rank, R = a->R, W = rank + R, nope = a->nope, qk = nope + R, G = h1 - h0;
    const int64_t *slots = a->gather + b * a->gather_stride;
    const float *cs = a->cos + b * a->rope_stride, *sn = a->sin + b * a->rope_stride;
    float mx[ATT_GROUP], sum[ATT_GROUP], inv[ATT_GROUP];
    for (int64_t g = 0; g < G; g++) {
        const int64_t hh = h0 + g;
        const float *qn = q + hh * qk;
        float *ql = q_lat + hh * W, *t = tmp + hh * (rank + 16 + R);
        memset(ql, 0, rank * sizeof(float));
        for (int64_t n = 0; n < nope; n++) row_axpy(&a->kv_b, hh * (nope + a->v) + n, qn[n], ql, t);
        for (int64_t i = 0; i < rank; i++) ql[i] *= a->softmax_scale;
        memcpy(ql + rank, qn + nope, R * sizeof(float));
        rope(ql + rank, cs, sn, R, a->rope_interleave, a->softmax_scale, t + rank + 16);
        mx[g] = -INFINITY;
        sum[g] = 0.0f;
    }
    /* scores, a tile of the group's heads (missing ones repeat the first, their results dropped) x ATT_KEYS rows at
       a time: each row chunk and query chunk loaded once per tile, the products summed in registers */
    const float *qs[ATT_GROUP];
    for (int64_t g = 0; g < ATT_GROUP; g++) qs[g] = q_lat + (h0 + (g < G ? g : 0)) * W;
    for (int64_t j0 = 0; j0 < nk; j0 += ATT_KEYS) {
        const float *rows[ATT_KEYS];
        for (int64_t r = 0; r < ATT_KEYS; r++) rows[r] = a->kv_store + slots[keys[j0 + r < nk ? j0 + r : j0]] * W;
        for (int64_t r = 0; r < ATT_KEYS && j0 + ATT_KEYS + r < nk; r++) {  /* the rows lie anywhere: ask early */
            const char *next = (const char *)(a->kv_store + slots[keys[j0 + ATT_KEYS + r]] * W);
            for (int64_t off = 0; off < W * (int64_t)sizeof(float); off += 64) __builtin_prefetch(next + off);
        }
        VF acc[ATT_GROUP][ATT_KEYS];
        for (int64_t g = 0; g < ATT_GROUP; g++)
            for (int64_t r = 0; r < ATT_KEYS; r++) acc[g][r] = VZERO;
        int64_t i = 0;
        for (; i + VW <= W; i += VW) {
            VF rv[ATT_KEYS];
            for (int64_t r = 0; r < ATT_KEYS; r++) rv[r] = LD_F32(rows[r] + i);
            for (int64_t g = 0; g < ATT_GROUP; g++) {
                const VF qv = LD_F32(qs[g] + i);
                for (int64_t r = 0; r < ATT_KEYS; r++) acc[g][r] = VFMA(qv, rv[r], acc[g][r]);
            }
        }
        for (int64_t g = 0; g < G; g++)
            for (int64_t r = 0; r < ATT_KEYS && j0 + r < nk; r++) {
                float d = VHSUM(acc[g][r]);
                for (int64_t t = i; t < W; t++) d += qs[g][t] * rows[r][t];
                att[(h0 + g) * sel_cap + j0 + r] = d;
                mx[g] = d > mx[g] ? d : mx[g];
            }
    }
    for (int64_t g = 0; g < G; g++) {
        float *at = att + (h0 + g) * sel_cap;
        for (int64_t j = 0; j < nk; j++) { at[j] = expf(at[j] - mx[g]); sum[g] += at[j]; }
        inv[g] = 1.0f / sum[g];
        memset(o_lat + (h0 + g) * rank, 0, rank * sizeof(float));
    }
    for (int64_t j = 0; j < nk; j++) {
        const float *row = a->kv_store + slots[keys[j]] * W;
        if (j + ATT_PREFETCH < nk) {
            const char *next = (const char *)(a->kv_store + slots[keys[j + ATT_PREFETCH]] * W);
            for (int64_t off = 0; off < rank * (int64_t)sizeof(float); off += 64) __builtin_prefetch(next + off);
        }
        float p[ATT_GROUP];
        for (int64_t g = 0; g < G; g++) p[g] = att[(h0 + g) * sel_cap + j] * inv[g];
        int64_t c = 0;
        for (; c + VW <= rank; c += VW) {  /* each chunk of the row loaded once for the group's heads */
            const VF rv = LD_F32(row + c);
            for (int64_t g = 0; g < G; g++) {
                float *o = o_lat + (h0 + g) * rank + c;
                VSTORE(o, VFMA(VSET1(p[g]), rv, LD_F32(o)));
            }
        }
        for (; c < rank; c++)
            for (int64_t g = 0; g < G; g++) o_lat[(h0 + g) * rank + c] += p[g] * row[c];
    }
    for (int64_t g = 0; g < G; g++) {
        const int64_t hh = h0 + g;
        const float *ol = o_lat + hh * rank;
        float *t = tmp + hh * (rank + 16 + R);
        if (PERMUTED(&a->kv_b)) {  /* t's first `rank` floats are free again */
            permute_x(a->kv_b.fmt, ol, t, rank);
            for (int64_t i = 0; i < a->v; i++)
                o_row[hh * a->v + i] = row_dot_perm(&a->kv_b, hh * (nope + a->v) + nope + i, t);
        } else {
            for (int64_t i = 0; i < a->v; i++)
                o_row[hh * a->v + i] = row_dot(&a->kv_b, hh * (nope + a->v) + nope + i, ol);
        }
    }
}

/* h += Attention(input_layernorm(h)) for every row; each row's new latent entry and indexer key are written to
   the cache before it attends, so the rows of one sequence (speculative verification) see each other in order. */
static int attention(const LayerArgs *a) {
    const int64_t B = a->B, D = a->D, rank = a->rank, R = a->R, H = a->H, nope = a->nope, Hi = a->Hi, Di = a->Di;
    const int64_t W = rank + R, q_lora = a->q_lora, qk = nope + R;
    int64_t max_len = 0;
    for (int64_t b = 0; b < B; b++) max_len = a->lengths[b] > max_len ? a->lengths[b] : max_len;
    const int64_t keys_cap = max_len > a->topk ? max_len : a->topk;
    const int64_t sel_cap = a->dsa ? a->topk : keys_cap;  /* keys one row attends to: top-k, or all up to index_topk */
    int rc = 1;
    float *proj = malloc(sizeof(float) * B * a->n_in), *qq = malloc(sizeof(float) * B * a->n_q);
    float *o = malloc(sizeof(float) * B * H * a->v), *out = malloc(sizeof(float) * B * D);
    float *scores = malloc(sizeof(float) * keys_cap), *att = malloc(sizeof(float) * H * sel_cap);
    float *q_lat = malloc(sizeof(float) * H * W), *o_lat = malloc(sizeof(float) * H * rank);
    float *idx_q = malloc(sizeof(float) * (Hi * Di + 1)), *scratch = malloc(sizeof(float) * (W + Di + 512));
    float *xn = malloc(sizeof(float) * B * D), *cq = malloc(sizeof(float) * B * q_lora);
    float *tmp = malloc(sizeof(float) * H * (rank + 16 + R));
    int64_t *all_keys = malloc(sizeof(int64_t) * sel_cap);
    if (!proj || !qq || !o || !out || !scores || !att || !q_lat || !o_lat || !idx_q || !scratch || !xn || !cq ||
        !tmp || !all_keys)
        goto done;

    /* projections of the normed layer input: [c_q | kv | indexer k | indexer head weights], then the normed query
       latent's [q | indexer q] */
    for (int64_t b = 0; b < B; b++) {
        const float *x = a->h + b * D;
        float f = rms_factor(x, D, a->in_eps);
        for (int64_t i = 0; i < D; i++) xn[b * D + i] = x[i] * f * a->in_norm_w[i];
    }
    linear_cat(a->in, a->n_in_mats, xn, D, B, proj, a->n_in);
    for (int64_t b = 0; b < B; b++) {
        const float *p = proj + b * a->n_in;
        float f = rms_factor(p, q_lora, a->q_eps);
        for (int64_t i = 0; i < q_lora; i++) cq[b * q_lora + i] = p[i] * f * a->q_norm_w[i];
    }
    linear_cat(a->q, a->n_q_mats, cq, q_lora, B, qq, a->n_q);

    for (int64_t b = 0; b < B; b++) {
        const float *p = proj + b * a->n_in, *cs = a->cos + b * a->rope_stride, *sn = a->sin + b * a->rope_stride;
        const float *q = qq + b * a->n_q;
        /* the new latent entry [rmsnorm(c_kv) ; rope(k_pe)] and indexer key, written to the cache */
        float *kv_new = a->kv_store + a->write_slot[b] * W;
        float f = rms_factor(p + q_lora, rank, a->kv_eps);
        for (int64_t i = 0; i < rank; i++) kv_new[i] = p[q_lora + i] * f * a->kv_norm_w[i];
        memcpy(kv_new + rank, p + q_lora + rank, R * sizeof(float));
        rope(kv_new + rank, cs, sn, R, a->rope_interleave, 1.0f, scratch);
        const float *idx_w = p + q_lora + W + Di;   /* [Hi], scales folded in */
        if (a->has_indexer) {
            float *k_new = a->idx_store + a->write_slot[b] * Di;
            const float *k = p + q_lora + W;
            float mean = 0.0f, var = 0.0f;
            for (int64_t i = 0; i < Di; i++) mean += k[i];
            mean /= (float)Di;
            for (int64_t i = 0; i < Di; i++) var += (k[i] - mean) * (k[i] - mean);
            float inv = 1.0f / sqrtf(var / (float)Di + a->idx_ln_eps);
            for (int64_t i = 0; i < Di; i++) k_new[i] = (k[i] - mean) * inv * a->idx_ln_w[i] + a->idx_ln_b[i];
            rope(k_new, cs, sn, R, a->idx_rope_interleave, 1.0f, scratch);
            memcpy(idx_q, q + H * qk, Hi * Di * sizeof(float));
            for (int64_t j = 0; j < Hi; j++) rope(idx_q + j * Di, cs, sn, R, a->idx_rope_interleave, 1.0f, scratch);
        }
        /* the row's keys, then its heads (split over the threads when there is enough work: each head is summed
           by one thread in a fixed order, so the result does not depend on the thread count) */
        const int64_t *keys;
        const int64_t nk = select_keys(a, b, idx_q, idx_w, scores, att, all_keys, &keys);
        if (nk < 0) {
            rc = (int)-nk;
            goto done;
        }
        /* groups of up to ATT_GROUP heads, as many groups as threads where the heads allow */
        const int64_t work = H * (nk * W + (nope + a->v) * rank), nt = work >= (1 << 16) ? max_threads() : 1;
        const int64_t per = cdiv(H, nt) < ATT_GROUP ? cdiv(H, nt) : ATT_GROUP, n_groups = cdiv(H, per);
        #pragma omp parallel for schedule(static) if (nt > 1)
        for (int64_t g = 0; g < n_groups; g++)
            attend_heads(a, b, g * per, (g + 1) * per < H ? (g + 1) * per : H, q, keys, nk, sel_cap, att, q_lat,
                         o_lat, tmp, o + b * H * a->v);
    }
    linear(&a->o, o, H * a->v, B, out, D);
    for (int64_t b = 0; b < B; b++)
        for (int64_t i = 0; i < D; i++) a->h[b * D + i] += out[b * D + i];
    rc = 0;
done:
    free(proj); free(qq); free(o); free(out); free(scores); free(att);
    free(q_lat); free(o_lat); free(idx_q); free(scratch); free(xn); free(cq); free(tmp); free(all_keys);
    return rc;
}

/* h += FFN(post_attention_layernorm(h)) for every row: the router and the routed experts, the shared expert (or
   the dense MLP). ffn = [router; shared gate; shared up] (MoE) or [gate; up] (dense), read by the normed row. */
static int feed_forward(const LayerArgs *a) {
    const int64_t B = a->B, D = a->D, F = a->ffn_inter, Fe = a->Fe, K = a->is_moe ? a->top_k : 0;
    const int64_t n_ffn = a->is_moe ? a->E + 2 * F : 2 * F;
    int rc = 1;
    float *m = malloc(sizeof(float) * B * (n_ffn > D ? n_ffn : D)), *y = malloc(sizeof(float) * B * D);
    float *act = malloc(sizeof(float) * (B * F + 1)), *wts = malloc(sizeof(float) * (B * K + 1));
    float *xn = malloc(sizeof(float) * B * D), *xe = malloc(sizeof(float) * (B * K * D + 1));
    float *ye = malloc(sizeof(float) * (B * K * D + 1)), *gu = malloc(sizeof(float) * (B * K * 2 * Fe + 1));
    int64_t *ids = malloc(sizeof(int64_t) * (B * K + 1)), *rows = malloc(sizeof(int64_t) * (B * K + 1));
    int64_t used_rows = 0;
    Job *jobs = malloc(sizeof(Job) * (a->E + 1)), *downs = malloc(sizeof(Job) * (a->E + 2));
    if (!m || !y || !act || !wts || !xn || !xe || !ye || !gu || !ids || !rows || !jobs || !downs) goto done;

    for (int64_t b = 0; b < B; b++) {
        const float *x = a->h + b * D;
        float f = rms_factor(x, D, a->ffn_eps);
        for (int64_t i = 0; i < D; i++) xn[b * D + i] = x[i] * f * a->post_norm_w[i];
    }
    linear_cat(a->ffn, a->n_ffn_mats, xn, D, B, m, n_ffn);
    for (int64_t b = 0; b < B; b++) {
        float *mb = m + b * n_ffn;
        memset(y + b * D, 0, D * sizeof(float));
        const float *gate_up = mb;  /* the shared expert's (or dense MLP's) gate and up */
        if (a->is_moe) {
            float sc[256], choice[256];
            for (int64_t e = 0; e < a->E; e++) sc[e] = 1.0f / (1.0f + expf(-mb[e]));
            route(a, sc, ids + b * K, wts + b * K, choice);
            gate_up = mb + a->E;
        }
        for (int64_t i = 0; i < F; i++) act[b * F + i] = silu(gate_up[i]) * gate_up[F + i];
    }
    /* routed experts: the rows that chose each one gathered, then every used expert's gate_up in one pass over
       the threads and every down projection (with the shared expert's / dense MLP's) in another; each expert's
       weights are read once per step, not once per row (a batch, or the k + 1 tokens of a verification) */
    int64_t n_used = 0;
    for (int64_t e = 0; e < (a->is_moe ? a->E : 0); e++) {
        int64_t n = 0;
        for (int64_t t = 0; t < B * K; t++)
            if (ids[t] == e) {
                rows[used_rows + n] = t;
                memcpy(xe + (used_rows + n) * D, xn + (t / K) * D, D * sizeof(float));
                n++;
            }
        if (n == 0) continue;
        jobs[n_used] = (Job){expert_mat(&a->gate_up, e), xe + used_rows * D, D, n, gu + used_rows * 2 * Fe, 2 * Fe};
        downs[n_used] = (Job){expert_mat(&a->down_e, e), gu + used_rows * 2 * Fe, 2 * Fe, n, ye + used_rows * D, D};
        used_rows += n;
        n_used++;
    }
    run_jobs(jobs, n_used);
    for (int64_t i = 0; i < used_rows; i++)
        for (int64_t c = 0; c < Fe; c++) gu[i * 2 * Fe + c] = silu(gu[i * 2 * Fe + c]) * gu[i * 2 * Fe + Fe + c];
    if (F > 0)  /* the shared expert's / dense MLP's down projection, for all rows at once (into m, now free) */
        downs[n_used] = (Job){a->down, act, F, B, m, D};
    run_jobs(downs, n_used + (F > 0));
    for (int64_t i = 0; i < used_rows; i++) axpy(y + (rows[i] / K) * D, wts[rows[i]], ye + i * D, D);
    if (F > 0)
        for (int64_t b = 0; b < B; b++) axpy(y + b * D, 1.0f, m + b * D, D);
    for (int64_t b = 0; b < B; b++) axpy(a->h + b * D, 1.0f, y + b * D, D);
    rc = 0;
done:
    free(m); free(y); free(act); free(wts); free(xn); free(xe); free(ye); free(gu); free(ids); free(rows);
    free(jobs); free(downs);
    return rc;
}

/* The structs' sizes as this compiler lays them out: the loader refuses the library unless they equal the ctypes
   mirrors' (glm5/kernels/native.py LayerArgs, Mat), so the declarations cannot drift apart silently. */
int64_t glm5_layer_args_size(void) { return (int64_t)sizeof(LayerArgs); }
int64_t glm5_mat_size(void) { return (int64_t)sizeof(Mat); }

/* The SIMD path this build runs ("avx512", "avx2" or "portable"). */
const char *glm5_isa(void) { return GLM5_ISA; }

int glm5_decode_layer(const LayerArgs *a) {
    if (a->E > 256 || a->n_group > 64 || a->top_k > 256) return 2;
    int rc = attention(a);
    return rc ? rc : feed_forward(a);
}

/* out[b] = the index of the first maximum of logits[b, :V] (as torch.argmax), for B rows */
static void argmax_rows(const float *logits, int64_t B, int64_t V, int64_t *out) {
    for (int64_t b = 0; b < B; b++) {
        const float *l = logits + b * V;
        int64_t best = 0;
        for (int64_t v = 1; v < V; v++) best = l[v] > l[best] ? v : best;
        out[b] = best;
    }
}

/* A whole decode step of `n_layers` layers in one call, then (hidden non-NULL) the final RMSNorm and (logits
   non-NULL) the head: the per-step fields below are copied into every layer's LayerArgs (kv_stores[l] /
   idx_stores[l] are layer l's cache stores), so Python sets them once per step instead of once per layer (the
   top-k scratch may be reused between calls: topk_count is zeroed here). On
   failure returns the layer's error code and sets failed_layer to its position in `layers`. */
typedef struct {
    int64_t n_layers;
    LayerArgs *const *layers;
    float *const *kv_stores, *const *idx_stores;
    int64_t B;
    float *h;
    const float *cos, *sin;
    int64_t rope_stride;
    const int64_t *write_slot, *gather;
    int64_t gather_stride;
    const int64_t *lengths;
    int64_t *topk_idx, *topk_count;
    int64_t dsa, failed_layer;
    const float *norm_w;                             /* the final norm (head) */
    float norm_eps;
    int32_t pad_;
    Mat lm_head;
    float *hidden, *logits;                          /* [B, D], [B, V] outputs, or NULL */
} StepArgs;

void glm5_rms_norm(const float *x, const float *w, int64_t rows, int64_t D, float eps, float *out);

int glm5_decode_step(StepArgs *s) {
    memset(s->topk_count, 0, sizeof(int64_t) * s->B);  /* no selection yet */
    for (int64_t l = 0; l < s->n_layers; l++) {
        LayerArgs *a = s->layers[l];
        a->B = s->B; a->h = s->h; a->cos = s->cos; a->sin = s->sin; a->rope_stride = s->rope_stride;
        a->kv_store = s->kv_stores[l]; a->idx_store = s->idx_stores[l];
        a->write_slot = s->write_slot; a->gather = s->gather; a->gather_stride = s->gather_stride;
        a->lengths = s->lengths; a->topk_idx = s->topk_idx; a->topk_count = s->topk_count; a->dsa = s->dsa;
        int rc = glm5_decode_layer(a);
        if (rc) {
            s->failed_layer = l;
            return rc;
        }
    }
    if (s->hidden) {
        const int64_t D = s->layers[0]->D;
        glm5_rms_norm(s->h, s->norm_w, s->B, D, s->norm_eps, s->hidden);
        if (s->logits) linear(&s->lm_head, s->hidden, D, s->B, s->logits, s->lm_head.rows);
    }
    return 0;
}

int64_t glm5_step_args_size(void) { return (int64_t)sizeof(StepArgs); }

/* `steps` greedy decode steps in one call: for every row b, h = embed[id] (first: first_ids[b], then the
   previous step's token), the step (glm5_decode_step with the head), the token = argmax of the logits (the
   first maximum, as torch.argmax). `s` carries the layers, stores, scratch, norm and lm_head; the per-step tables
   are step-major: step i's rows i*B + b of write_slot, gather [row * s->gather_stride], lengths and cos / sin
   [row, R/2]. Outputs ids [steps, B]. The arithmetic of `steps` calls of FusedDecoder's step + argmax. */
typedef struct {
    int64_t steps, B;
    const float *embed;                              /* [V, D] */
    const int64_t *first_ids;                        /* [B] */
    int64_t *ids;                                    /* [steps, B] */
    const int64_t *write_slot, *gather, *lengths;    /* step-major tables, see above */
    const float *cos, *sin;
} GreedyArgs;

int glm5_decode_greedy(StepArgs *s, const GreedyArgs *g) {
    const int64_t B = g->B, D = s->layers[0]->D, V = s->lm_head.rows, half = s->layers[0]->R / 2;
    const int64_t stride = s->gather_stride;
    float *h = malloc(sizeof(float) * B * D), *hidden = malloc(sizeof(float) * B * D);
    float *logits = malloc(sizeof(float) * B * V);
    int rc = 1;
    if (!h || !hidden || !logits) goto done;
    for (int64_t i = 0; i < g->steps; i++) {
        for (int64_t b = 0; b < B; b++) {
            const int64_t id = i ? g->ids[(i - 1) * B + b] : g->first_ids[b];
            memcpy(h + b * D, g->embed + id * D, sizeof(float) * D);
        }
        s->B = B; s->h = h; s->rope_stride = half;
        s->cos = g->cos + i * B * half; s->sin = g->sin + i * B * half;
        s->write_slot = g->write_slot + i * B; s->gather = g->gather + i * B * stride; s->lengths = g->lengths + i * B;
        s->hidden = hidden; s->logits = logits;
        rc = glm5_decode_step(s);
        if (rc) goto done;
        argmax_rows(logits, B, V, g->ids + i * B);
    }
    rc = 0;
done:
    free(h); free(hidden); free(logits);
    return rc;
}

int64_t glm5_greedy_args_size(void) { return (int64_t)sizeof(GreedyArgs); }

/* Greedy MTP drafting in one call: `steps` times, for every row b, u = eh_proj([enorm(embed[id]) ; hnorm(h)]),
   h[b] = the MTP layer `layer` on u (writing its cache entry at the step's slot and attending up to it), the draft
   = argmax lm_head(head_norm(h[b])) (the first maximum, as torch.argmax). Step 0 takes T0 >= 1 positions per row
   (the catch-up: first_ids / first_h [B, T0(, D)] row-major, the main model's hidden states and the tokens that
   followed them; its draft comes from each row's last position); every later step one position per row, from
   the previous draft and MTP output. The per-step
   tables are step-major: step 0's B*T0 rows [b][t], then step i's B rows (i >= 1) from row B*T0 + (i-1)*B:
   write_slot, gather [row * gather_stride], lengths, cos / sin [row, R/2]. Outputs ids [steps, B]; h [B, D] ends
   as the last step's MTP output. The arithmetic of FusedDecoder.mtp_forward + argmax, call for call (the same C
   functions): the drafts are the same tokens. */
typedef struct {
    int64_t steps, B, D, V;
    const float *embed;                              /* [V, D] */
    const float *enorm_w, *hnorm_w, *head_norm_w;
    float enorm_eps, hnorm_eps, head_norm_eps;
    int32_t pad_;
    Mat eh_proj, lm_head;
    float *h;                                        /* [B, D] out: each step's MTP output (of its last row) */
    int64_t *ids;                                    /* [steps, B] the drafts */
    const int64_t *write_slot, *gather, *lengths;    /* step-major tables, see above */
    const float *cos, *sin;
    int64_t T0;                                      /* step 0's positions per row */
    const float *first_h;                            /* [B, T0, D] step 0's hidden states */
    const int64_t *first_ids;                        /* [B, T0] the tokens step 0 embeds */
} DraftArgs;

int glm5_mtp_draft(LayerArgs *layer, const DraftArgs *d) {
    const int64_t B = d->B, D = d->D, V = d->V, half = layer->R / 2, T0 = d->T0;
    float *cat = malloc(sizeof(float) * B * T0 * 2 * D), *u = malloc(sizeof(float) * B * T0 * D);
    float *hn = malloc(sizeof(float) * B * D), *logits = malloc(sizeof(float) * B * V);
    int rc = 1;
    if (!cat || !u || !hn || !logits) goto done;
    for (int64_t i = 0; i < d->steps; i++) {
        const int64_t T = i ? 1 : T0, rows = B * T, off = i ? B * T0 + (i - 1) * B : 0;
        for (int64_t r = 0; r < rows; r++) {
            const int64_t id = i ? d->ids[(i - 1) * B + r] : d->first_ids[r];
            const float *hr = i ? d->h + r * D : d->first_h + r * D;
            glm5_rms_norm(d->embed + id * D, d->enorm_w, 1, D, d->enorm_eps, cat + r * 2 * D);
            glm5_rms_norm(hr, d->hnorm_w, 1, D, d->hnorm_eps, cat + r * 2 * D + D);
        }
        linear(&d->eh_proj, cat, 2 * D, rows, u, D);
        layer->B = rows;
        layer->h = u;
        layer->cos = d->cos + off * half;
        layer->sin = d->sin + off * half;
        layer->rope_stride = half;
        layer->write_slot = d->write_slot + off;
        layer->gather = d->gather + off * layer->gather_stride;
        layer->lengths = d->lengths + off;
        memset(layer->topk_count, 0, sizeof(int64_t) * rows);
        rc = glm5_decode_layer(layer);
        if (rc) goto done;
        for (int64_t b = 0; b < B; b++) memcpy(d->h + b * D, u + (b * T + T - 1) * D, sizeof(float) * D);
        glm5_rms_norm(d->h, d->head_norm_w, B, D, d->head_norm_eps, hn);
        linear(&d->lm_head, hn, D, B, logits, V);
        argmax_rows(logits, B, V, d->ids + i * B);
    }
    rc = 0;
done:
    free(cat); free(u); free(hn); free(logits);
    return rc;
}

int64_t glm5_draft_args_size(void) { return (int64_t)sizeof(DraftArgs); }

/* Y [B, rows] = X [B, cols] W^T x out_scale + bias (lm_head, eh_proj: any format, rows over threads). */
void glm5_linear(const Mat *m, const float *X, int64_t B, float *Y) { linear(m, X, m->cols, B, Y, m->rows); }

/* int8 with one scale per group of I8_GROUP inputs along each row, as glm5.kernels.formats.int8_quantize's torch
   ops compute it (the same bits): scale = group amax / 127 (1 for an all-zero group), code = round half to even
   of value / scale, clamped to +-127. src: [rows, cols] fp32 (src_bf16 = 0) or bf16 bits (1); codes [rows, cols],
   scales [rows, ceil(cols / I8_GROUP)]. No temporaries (the torch ops make several float copies of each chunk). */
void glm5_int8_quantize(const void *src, int64_t src_bf16, int64_t rows, int64_t cols, int8_t *codes, float *scales) {
    const int64_t groups = cdiv(cols, I8_GROUP);
    #pragma omp parallel for schedule(static) if (rows * cols >= (1 << 20))
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t g = 0; g < groups; g++) {
            const int64_t j0 = g * I8_GROUP, n = cols - j0 < I8_GROUP ? cols - j0 : I8_GROUP, at = r * cols + j0;
            float v[I8_GROUP], amax = 0.0f;
            for (int64_t i = 0; i < n; i++) {
                v[i] = src_bf16 ? bf16f(((const uint16_t *)src)[at + i]) : ((const float *)src)[at + i];
                const float a = fabsf(v[i]);
                amax = a > amax ? a : amax;
            }
            const float sc = amax > 0.0f ? amax / 127.0f : 1.0f;
            scales[r * groups + g] = sc;
            for (int64_t i = 0; i < n; i++) {
                float q = rintf(v[i] / sc);
                q = q > 127.0f ? 127.0f : q < -127.0f ? -127.0f : q;
                codes[at + i] = (int8_t)q;
            }
        }
    }
}

/* out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * w for rows r (the final and the MTP norms). */
void glm5_rms_norm(const float *x, const float *w, int64_t rows, int64_t D, float eps, float *out) {
    for (int64_t r = 0; r < rows; r++) {
        float f = rms_factor(x + r * D, D, eps);
        for (int64_t i = 0; i < D; i++) out[r * D + i] = x[r * D + i] * f * w[i];
    }
}
