/* One GLM-5 decoder layer for one new token per row (the decode step), float32, in a single call.

   The arithmetic of glm5/engine/fused.py (itself checked against GLM5ForCausalLM.forward): packed projections
   with the RMSNorm weights folded in, weight-absorbed MLA over the DSA top-k latent entries of a paged cache,
   the lightning indexer, RoPE, the sigmoid router with bias-corrected (group-limited) top-k, routed and shared
   experts. A step of a small model is a few hundred tiny tensor operations; here a layer is one C call whose
   cost is the bytes it reads (weights, the indexer keys of the context, the selected latents).

   Built at run time by glm5/kernels/native.py with the system C compiler (cc -O3 -march=native -fopenmp); no
   Python headers, loaded with ctypes. Plain C99 plus GCC/Clang vector extensions (8 floats); OpenMP (optional)
   splits the indexer's scan of long contexts over threads. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef float v8 __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4)));  /* unaligned loads */

typedef struct {
    /* sizes */
    int64_t B, D, q_lora, rank, R, H, nope, v, Hi, Di, topk;
    int64_t n_in, n_q;     /* rows of w_in and w_q */
    int64_t has_indexer, dsa, rope_interleave, idx_rope_interleave;
    float in_eps, q_eps, kv_eps, idx_ln_eps, ffn_eps, softmax_scale;
    /* attention weights (packed ones with norms and scales folded in) */
    const float *w_in, *b_in, *w_q, *kv_norm_w, *w_uk, *w_uv_t, *o_w, *o_b, *idx_ln_w, *idx_ln_b;
    /* feed-forward: ffn_in = [router; shared gate; shared up] (MoE) or [gate; up] (dense) */
    const float *ffn_in, *post_norm_w, *down_w;
    int64_t ffn_inter;     /* dense intermediate, or the shared expert's (0: none) */
    int64_t is_moe, E, top_k, n_group, topk_group, Fe, norm_topk;
    float route_scale;
    const float *e_bias, *gate_up, *down_e;   /* [E], [E, 2Fe, D], [E, D, Fe] */
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

static void axpy(float *y, float a, const float *x, int64_t n) {   /* y += a x */
    for (int64_t i = 0; i < n; i++) y[i] += a * x[i];
}

/* Y[b, n] = W[n, :] . X[b, :] for all rows b: each weight row is read once for the whole batch. */
static void linear(const float *W, int64_t N, int64_t K, const float *X, int64_t ldx, int64_t B, float *Y, int64_t ldy) {
    for (int64_t n = 0; n < N; n++) {
        const float *w = W + n * K;
        for (int64_t b = 0; b < B; b++) Y[b * ldy + n] = dot(w, X + b * ldx, K);
    }
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
            acc += w[j] * fmaxf(d, 0.0f);
        }
        score[s] = acc;
    }
}

static void indexer_scores(const float *q, const float *w, int64_t Hi, int64_t Di, const float *store,
                           const int64_t *slots, int64_t n, float *score) {
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

/* Row b's keys (DSA top-k of the indexer scores, the previous layer's, or every key) and its absorbed attention
   over their latents (values = c_kv): q_lat [H, r+R] -> o_row [H * v]. Returns a nonzero code on error. */
static inline __attribute__((always_inline)) int attend_row(
    const LayerArgs *a, int64_t b, const float *q_lat, const float *idx_q, const float *idx_w, float *scores,
    float *att, int64_t *all_keys, float *o_lat, float *o_row) {  /* inlined: measured ~10% faster at 8K */
    const int64_t H = a->H, rank = a->rank, W = a->rank + a->R, len = a->lengths[b];
    const int64_t *slots = a->gather + b * a->gather_stride, *keys = all_keys;
    int64_t nk = len;
    if (a->dsa && len > a->topk) {
        int64_t *sel = a->topk_idx + b * a->topk;
        if (a->has_indexer) {
            indexer_scores(idx_q, idx_w, a->Hi, a->Di, a->idx_store, slots, len, scores);
            top_k(scores, len, a->topk, sel, att);
            a->topk_count[b] = a->topk;
        } else if (a->topk_count[b] != a->topk) {
            return 3;  /* a shared layer with no selection before it */
        }
        keys = sel;
        nk = a->topk;
    } else {
        for (int64_t s = 0; s < len; s++) all_keys[s] = s;
        if (a->has_indexer) a->topk_count[b] = 0;
    }
    for (int64_t j = 0; j < nk; j++) {
        const float *lat = a->kv_store + slots[keys[j]] * W;
        for (int64_t hh = 0; hh < H; hh++) att[hh * nk + j] = dot(q_lat + hh * W, lat, W);
    }
    for (int64_t hh = 0; hh < H; hh++) {
        float *row = att + hh * nk, mx = -INFINITY, sum = 0.0f;
        for (int64_t j = 0; j < nk; j++) mx = row[j] > mx ? row[j] : mx;
        for (int64_t j = 0; j < nk; j++) { row[j] = expf(row[j] - mx); sum += row[j]; }
        for (int64_t j = 0; j < nk; j++) row[j] /= sum;
    }
    memset(o_lat, 0, H * rank * sizeof(float));
    for (int64_t j = 0; j < nk; j++) {
        const float *lat = a->kv_store + slots[keys[j]] * W;
        for (int64_t hh = 0; hh < H; hh++) axpy(o_lat + hh * rank, att[hh * nk + j], lat, rank);
    }
    for (int64_t hh = 0; hh < H; hh++) {  /* o_h = o_lat_h W_UV^T */
        float *oh = o_row + hh * a->v;
        memset(oh, 0, a->v * sizeof(float));
        for (int64_t i = 0; i < rank; i++) axpy(oh, o_lat[hh * rank + i], a->w_uv_t + (hh * rank + i) * a->v, a->v);
    }
    return 0;
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
    float *r = malloc(sizeof(float) * B);
    int64_t *all_keys = malloc(sizeof(int64_t) * sel_cap);
    if (!proj || !qq || !o || !out || !scores || !att || !q_lat || !o_lat || !idx_q || !scratch || !r || !all_keys)
        goto done;

    /* projections of the layer input: [c_q | kv | indexer k | indexer head weights], then the query latent's */
    linear(a->w_in, a->n_in, D, a->h, D, B, proj, a->n_in);
    for (int64_t b = 0; b < B; b++) {
        float f = rms_factor(a->h + b * D, D, a->in_eps);
        float *p = proj + b * a->n_in;
        for (int64_t i = 0; i < a->n_in; i++) p[i] = p[i] * f + (a->b_in ? a->b_in[i] : 0.0f);
        r[b] = rms_factor(p, q_lora, a->q_eps);
    }
    linear(a->w_q, a->n_q, q_lora, proj, a->n_in, B, qq, a->n_q);

    for (int64_t b = 0; b < B; b++) {
        const float *p = proj + b * a->n_in, *cs = a->cos + b * a->rope_stride, *sn = a->sin + b * a->rope_stride;
        float *q = qq + b * a->n_q;
        for (int64_t i = 0; i < a->n_q; i++) q[i] *= r[b];
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
        /* absorbed query per head: [q_nope W_UK (softmax scale folded) ; rope(q_pe) * scale] */
        for (int64_t hh = 0; hh < H; hh++) {
            float *ql = q_lat + hh * W;
            const float *qn = q + hh * qk, *wuk = a->w_uk + hh * nope * rank;
            memset(ql, 0, rank * sizeof(float));
            for (int64_t n = 0; n < nope; n++) axpy(ql, qn[n], wuk + n * rank, rank);
            memcpy(ql + rank, qn + nope, R * sizeof(float));
            rope(ql + rank, cs, sn, R, a->rope_interleave, a->softmax_scale, scratch);
        }
        rc = attend_row(a, b, q_lat, idx_q, idx_w, scores, att, all_keys, o_lat, o + b * H * a->v);
        if (rc) goto done;
    }
    linear(a->o_w, D, H * a->v, o, H * a->v, B, out, D);
    for (int64_t b = 0; b < B; b++)
        for (int64_t i = 0; i < D; i++) a->h[b * D + i] += out[b * D + i] + (a->o_b ? a->o_b[i] : 0.0f);
    rc = 0;
done:
    free(proj); free(qq); free(o); free(out); free(scores); free(att);
    free(q_lat); free(o_lat); free(idx_q); free(scratch); free(r); free(all_keys);
    return rc;
}

/* h += FFN(post_attention_layernorm(h)) for every row: the router and the routed experts, the shared expert (or
   the dense MLP). ffn_in = [router; shared gate; shared up] (MoE) or [gate; up] (dense), norm folded in. */
static int feed_forward(const LayerArgs *a) {
    const int64_t B = a->B, D = a->D, F = a->ffn_inter, Fe = a->Fe, K = a->is_moe ? a->top_k : 0;
    const int64_t n_ffn = a->is_moe ? a->E + 2 * F : 2 * F;
    int rc = 1;
    float *m = malloc(sizeof(float) * B * (n_ffn > D ? n_ffn : D)), *y = malloc(sizeof(float) * B * D);
    float *act = malloc(sizeof(float) * (B * F + 1)), *wts = malloc(sizeof(float) * (B * K + 1));
    float *xn = malloc(sizeof(float) * B * D), *xe = malloc(sizeof(float) * B * D), *ye = malloc(sizeof(float) * B * D);
    float *gu = malloc(sizeof(float) * (B * 2 * Fe + 1));
    int64_t *ids = malloc(sizeof(int64_t) * (B * K + 1)), *rows = malloc(sizeof(int64_t) * (B * K + 1));
    if (!m || !y || !act || !wts || !xn || !xe || !ye || !gu || !ids || !rows) goto done;

    linear(a->ffn_in, n_ffn, D, a->h, D, B, m, n_ffn);
    for (int64_t b = 0; b < B; b++) {
        float f = rms_factor(a->h + b * D, D, a->ffn_eps);
        float *mb = m + b * n_ffn, *x = a->h + b * D;
        for (int64_t i = 0; i < n_ffn; i++) mb[i] *= f;
        memset(y + b * D, 0, D * sizeof(float));
        const float *gate_up = mb;  /* the shared expert's (or dense MLP's) gate and up */
        if (a->is_moe) {
            float sc[256], choice[256];
            for (int64_t e = 0; e < a->E; e++) sc[e] = 1.0f / (1.0f + expf(-mb[e]));
            route(a, sc, ids + b * K, wts + b * K, choice);
            for (int64_t i = 0; i < D; i++) xn[b * D + i] = x[i] * f * a->post_norm_w[i];  /* what experts read */
            gate_up = mb + a->E;
        }
        for (int64_t i = 0; i < F; i++) act[b * F + i] = silu(gate_up[i]) * gate_up[F + i];
    }
    /* routed experts, one at a time over every row that chose it: each expert's weights are read once per
       step, not once per row (a batch, or the k + 1 tokens of a speculative verification) */
    for (int64_t e = 0; e < (a->is_moe ? a->E : 0); e++) {
        int64_t n = 0;
        for (int64_t t = 0; t < B * K; t++)
            if (ids[t] == e) {
                rows[n] = t;
                memcpy(xe + n * D, xn + (t / K) * D, D * sizeof(float));
                n++;
            }
        if (n == 0) continue;
        linear(a->gate_up + e * 2 * Fe * D, 2 * Fe, D, xe, D, n, gu, 2 * Fe);
        for (int64_t i = 0; i < n; i++)
            for (int64_t c = 0; c < Fe; c++) gu[i * 2 * Fe + c] = silu(gu[i * 2 * Fe + c]) * gu[i * 2 * Fe + Fe + c];
        linear(a->down_e + e * D * Fe, D, Fe, gu, 2 * Fe, n, ye, D);
        for (int64_t i = 0; i < n; i++) axpy(y + (rows[i] / K) * D, wts[rows[i]], ye + i * D, D);
    }
    if (F > 0) {  /* the shared expert's / dense MLP's down projection, for all rows at once (into m, now free) */
        linear(a->down_w, D, F, act, F, B, m, D);
        for (int64_t b = 0; b < B; b++) axpy(y + b * D, 1.0f, m + b * D, D);
    }
    for (int64_t b = 0; b < B; b++) axpy(a->h + b * D, 1.0f, y + b * D, D);
    rc = 0;
done:
    free(m); free(y); free(act); free(wts); free(xn); free(xe); free(ye); free(gu); free(ids); free(rows);
    return rc;
}

/* The argument struct's size as this compiler lays it out: the loader refuses the library unless it equals the
   ctypes mirror's (glm5/kernels/native.py LayerArgs), so the two declarations cannot drift apart silently. */
int64_t glm5_layer_args_size(void) { return (int64_t)sizeof(LayerArgs); }

int glm5_decode_layer(const LayerArgs *a) {
    if (a->E > 256 || a->n_group > 64 || a->top_k > 256) return 2;
    int rc = attention(a);
    return rc ? rc : feed_forward(a);
}

/* out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * w for rows r (the final and the MTP norms). */
void glm5_rms_norm(const float *x, const float *w, int64_t rows, int64_t D, float eps, float *out) {
    for (int64_t r = 0; r < rows; r++) {
        float f = rms_factor(x + r * D, D, eps);
        for (int64_t i = 0; i < D; i++) out[r * D + i] = x[r * D + i] * f * w[i];
    }
}
