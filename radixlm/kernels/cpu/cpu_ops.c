/* The engine's CPU kernels: paged decode and extend attention, and the memory-bound ops between the GEMMs.
 *
 * Plain C with no torch headers, so it builds in about a second with the system compiler (see cpu/__init__.py);
 * it is loaded after torch and so shares torch's OpenMP runtime (same soname) and thread count.
 * Tensors arrive as raw pointers with element strides; activations are float32 or bfloat16 (DT_F32 / DT_BF16).
 *
 * Rounding follows the torch code of radixlm.layers op for op (every bf16 result rounded to nearest-even where
 * torch rounds it, no FMA contraction: built with -ffp-contract=off), so the fused ops agree with the torch code
 * bit for bit except where a float32 reduction (a norm's sum of squares) or exp() differs in its last bits.
 */
#include <float.h>
#include <stdlib.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

enum { DT_F32 = 0, DT_BF16 = 1 };

/* Attention reads keys in chunks of this many positions between online-softmax rescales. */
#define ATTN_CHUNK 128
#define LANES 16

/* ------------------------------------------------------------------ scalar helpers */

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even; NaN stays NaN (a select: vectorises) */
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? (u >> 16) | 0x40u : rounded);
}

/* The float value ``x`` takes when stored in ``dtype``. */
static inline float round_to(float x, int dtype) { return dtype == DT_BF16 ? bf16_to_f32(f32_to_bf16(x)) : x; }

static inline void load_row(const void *src, int dtype, float *dst, int64_t n) {
    if (dtype == DT_BF16) {
        const uint16_t *s = (const uint16_t *)src;
        for (int64_t i = 0; i < n; i++) dst[i] = bf16_to_f32(s[i]);
    } else {
        memcpy(dst, src, (size_t)n * sizeof(float));
    }
}

static inline void store_row(const float *src, void *dst, int dtype, int64_t n) {
    if (dtype == DT_BF16) {
        uint16_t *d = (uint16_t *)dst;
        for (int64_t i = 0; i < n; i++) d[i] = f32_to_bf16(src[i]);
    } else {
        memcpy(dst, src, (size_t)n * sizeof(float));
    }
}

static inline size_t elem_size(int dtype) { return dtype == DT_BF16 ? 2 : 4; }

static inline const char *at(const void *base, int64_t offset, int dtype) {
    return (const char *)base + offset * (int64_t)elem_size(dtype);
}

/* exp(x) for x <= 88 to about 2 ulp (Cody-Waite reduction, Cephes' degree-6 polynomial), written with plain
 * arithmetic so that loops over it vectorise; inputs below -87 give 0-ish values, never NaN. */
static inline float exp_f32(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    float n = floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    float y = p * r * r + r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    return y * scale;
}

/* ------------------------------------------------------------------ RMSNorm */

/* out = weight * round(h * rsqrt(mean(h^2) + eps)), h = x (+ residual, rounded to dtype and written to
 * new_residual).  Rows of x / residual have strides x_stride / res_stride; out and new_residual are
 * contiguous [rows, hidden]. */
void rms_norm(const void *x, int64_t x_stride, const void *residual, int64_t res_stride, const void *weight,
              void *out, void *new_residual, int64_t rows, int64_t hidden, float eps, int dtype, int nthreads) {
#pragma omp parallel for num_threads(nthreads) if (rows * hidden > 65536) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        float h[hidden], w[hidden], tmp[hidden];
        load_row(at(x, r * x_stride, dtype), dtype, h, hidden);
        if (residual) {
            load_row(at(residual, r * res_stride, dtype), dtype, tmp, hidden);
            for (int64_t i = 0; i < hidden; i++) h[i] = round_to(h[i] + tmp[i], dtype);
            store_row(h, (char *)new_residual + r * hidden * (int64_t)elem_size(dtype), dtype, hidden);
        }
        float sq[LANES] = {0};
        int64_t i = 0;
        for (; i + LANES <= hidden; i += LANES)
            for (int l = 0; l < LANES; l++) sq[l] += h[i + l] * h[i + l];
        float sum = 0.0f;
        for (; i < hidden; i++) sum += h[i] * h[i];
        for (int l = 0; l < LANES; l++) sum += sq[l];
        float inv = 1.0f / sqrtf(sum / (float)hidden + eps);
        load_row(weight, dtype, w, hidden);
        for (int64_t j = 0; j < hidden; j++) tmp[j] = round_to(w[j] * round_to(h[j] * inv, dtype), dtype);
        store_row(tmp, (char *)out + r * hidden * (int64_t)elem_size(dtype), dtype, hidden);
    }
}

/* ------------------------------------------------------------------ SiLU and mul */

/* out[r] = round(round(silu(gate)) * up) for x[r] = gate || up (each d wide, row stride x_stride); out is
 * contiguous [rows, d]. */
void silu_and_mul(const void *x, int64_t x_stride, void *out, int64_t rows, int64_t d, int dtype, int nthreads) {
    /* exp and a division per element: worth a second thread from a few thousand elements on */
#pragma omp parallel for num_threads(nthreads) if (rows * d > 8192) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        float g[d], u[d];
        load_row(at(x, r * x_stride, dtype), dtype, g, d);
        load_row(at(x, r * x_stride + d, dtype), dtype, u, d);
        for (int64_t i = 0; i < d; i++) {
            float s = round_to(g[i] / (1.0f + exp_f32(-g[i])), dtype);
            g[i] = round_to(s * u[i], dtype);
        }
        store_row(g, (char *)out + r * d * (int64_t)elem_size(dtype), dtype, d);
    }
}

/* ------------------------------------------------------------------ rotary (NeoX) */

static void rotate_heads(const void *src, int64_t head_stride, int64_t heads, void *dst, int64_t head_dim,
                         int64_t rot_dim, const float *cos, const float *sin, int dtype) {
    int64_t half = rot_dim / 2;
    float x[head_dim], y[head_dim];
    for (int64_t h = 0; h < heads; h++) {
        load_row(at(src, h * head_stride, dtype), dtype, x, head_dim);
        for (int64_t i = 0; i < half; i++) {
            /* torch: rot * cos + cat(-x2, x1) * sin, each product and the sum rounded to dtype */
            float x1 = x[i], x2 = x[i + half];
            y[i] = round_to(round_to(x1 * cos[i], dtype) + round_to(-x2 * sin[i], dtype), dtype);
            y[i + half] = round_to(round_to(x2 * cos[i], dtype) + round_to(x1 * sin[i], dtype), dtype);
        }
        for (int64_t i = rot_dim; i < head_dim; i++) y[i] = x[i];
        store_row(y, (char *)dst + h * head_dim * (int64_t)elem_size(dtype), dtype, head_dim);
    }
}

/* q [tokens, q_heads, head_dim] (token stride q_stride, heads contiguous) and k likewise, rotated by the angles
 * of positions[t] in cos_sin [max_pos, rot_dim] (cos of each frequency, then sin; float32), into contiguous
 * q_out / k_out.  The angles are rounded to dtype first, as torch's ``cos.to(x.dtype)``. */
void rotary_neox(const void *q, int64_t q_stride, int64_t q_heads, const void *k, int64_t k_stride, int64_t k_heads,
                 const int64_t *positions, const float *cos_sin, int64_t rot_dim, int64_t head_dim, void *q_out,
                 void *k_out, int64_t tokens, int dtype, int nthreads) {
    int64_t half = rot_dim / 2;
#pragma omp parallel for num_threads(nthreads) if (tokens * (q_heads + k_heads) * head_dim > 65536) schedule(static)
    for (int64_t t = 0; t < tokens; t++) {
        float cos[half], sin[half];
        const float *angles = cos_sin + positions[t] * rot_dim;
        for (int64_t i = 0; i < half; i++) {
            cos[i] = round_to(angles[i], dtype);
            sin[i] = round_to(angles[half + i], dtype);
        }
        size_t es = elem_size(dtype);
        rotate_heads(at(q, t * q_stride, dtype), head_dim, q_heads, (char *)q_out + t * q_heads * head_dim * es,
                     head_dim, rot_dim, cos, sin, dtype);
        rotate_heads(at(k, t * k_stride, dtype), head_dim, k_heads, (char *)k_out + t * k_heads * head_dim * es,
                     head_dim, rot_dim, cos, sin, dtype);
    }
}

/* ------------------------------------------------------------------ paged decode attention */

/* Sixteen floats: GCC's vector extension, lowered to whatever SIMD -march=native has.  Head dims are multiples of
 * 16 (checked by the caller), so a K/V row is head_dim / 16 of them. */
typedef float v16f __attribute__((vector_size(64)));
typedef uint32_t v16u __attribute__((vector_size(64)));
typedef uint16_t v16h __attribute__((vector_size(32)));
typedef float v8f __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));

static inline v16f load16(const void *p, int dtype) {
    if (dtype == DT_BF16) {
        v16h h;
        memcpy(&h, p, sizeof h);
        return (v16f)(__builtin_convertvector(h, v16u) << 16);
    }
    v16f v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline float sum16(v16f v) { /* a tree of halvings: 4 dependent adds instead of 15 */
    v8f a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
            __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    v4f b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
    return (b[0] + b[2]) + (b[1] + b[3]);
}

/* One chunk of an online softmax: scores s[begin, end) become exp(s - m') in place, where m' is the running
 * maximum *m raised by the chunk; *l (the running sum) is rescaled and extended.  Returns exp(m - m'), the
 * factor for what was accumulated before (about 0 on the first chunk, where *m = -FLT_MAX). */
static inline float online_softmax(float *s, int64_t begin, int64_t end, float *m, float *l) {
    float chunk_max = *m;
    for (int64_t t = begin; t < end; t++) chunk_max = s[t] > chunk_max ? s[t] : chunk_max;
    const float alpha = exp_f32(*m - chunk_max);
    float sum = 0.0f;
    for (int64_t t = begin; t < end; t++) {
        s[t] = exp_f32(s[t] - chunk_max);
        sum += s[t];
    }
    *l = *l * alpha + sum;
    *m = chunk_max;
    return alpha;
}

/* Prefetch bytes [0, n) of p into the caches, one line at a time. */
static inline void prefetch_bytes(const char *p, int64_t n) {
    for (int64_t off = 0; off < n; off += 64) __builtin_prefetch(p + off, 0, 3);
}

/* How far ahead (in positions) K/V rows are prefetched: a request's rows are scattered over pages, which the
 * hardware prefetchers do not follow across 4 KiB boundaries. */
#define PREFETCH_AHEAD 8

/* Attention of request b's new query heads [kv_first * group, kv_end * group) over its positions
 * [first, len): one work item of decode_attention. */
static inline __attribute__((always_inline)) void decode_attention_item(
    const char *q_row, int q_dtype, const char *k_buf, const char *v_buf, const int kv_dtype, const int32_t *slots,
    int64_t first, int64_t len, int64_t kv_first, int64_t kv_end, int64_t group, const int64_t head_dim,
    int64_t slot_stride, float scale, char *out_row) {
    const int64_t nv = head_dim / 16, heads = (kv_end - kv_first) * group;
    const size_t kv_es = elem_size(kv_dtype), q_es = elem_size(q_dtype);
    const int64_t row_bytes = slot_stride * (int64_t)kv_es, head_bytes = head_dim * (int64_t)kv_es;
    const int64_t part_offset = kv_first * head_bytes, part_bytes = (kv_end - kv_first) * head_bytes;
    v16f qs[heads][nv], acc[heads][nv];
    float scores[heads][ATTN_CHUNK], m[heads], l[heads], row[head_dim];
    for (int64_t h = 0; h < heads; h++) {
        load_row(q_row + (kv_first * group + h) * head_dim * q_es, q_dtype, row, head_dim);
        for (int64_t j = 0; j < nv; j++) {
            memcpy(&qs[h][j], row + 16 * j, sizeof(v16f));
            qs[h][j] *= scale;
            acc[h][j] = (v16f){0};
        }
        m[h] = -FLT_MAX;
        l[h] = 0.0f;
    }
    for (int64_t c = first; c < len; c += ATTN_CHUNK) {
        const int64_t n = len - c < ATTN_CHUNK ? len - c : ATTN_CHUNK;
        for (int64_t t = 0; t < n; t++) {
            if (c + t + PREFETCH_AHEAD < len) {
                const int64_t ahead = (int64_t)slots[c + t + PREFETCH_AHEAD] * row_bytes + part_offset;
                prefetch_bytes(k_buf + ahead, part_bytes);
                prefetch_bytes(v_buf + ahead, part_bytes);
            }
            const char *k_row = k_buf + (int64_t)slots[c + t] * row_bytes + part_offset;
            for (int64_t kvh = 0; kvh < kv_end - kv_first; kvh++) {
                v16f k[nv];
                for (int64_t j = 0; j < nv; j++) k[j] = load16(k_row + kvh * head_bytes + 16 * j * kv_es, kv_dtype);
                for (int64_t g = 0; g < group; g++) {
                    const int64_t h = kvh * group + g;
                    v16f d = qs[h][0] * k[0];
                    for (int64_t j = 1; j < nv; j++) d += qs[h][j] * k[j];
                    scores[h][t] = sum16(d);
                }
            }
        }
        for (int64_t h = 0; h < heads; h++) {
            const float alpha = online_softmax(scores[h], 0, n, &m[h], &l[h]);
            for (int64_t j = 0; j < nv; j++) acc[h][j] *= alpha;
        }
        for (int64_t t = 0; t < n; t++) {
            const char *v_row = v_buf + (int64_t)slots[c + t] * row_bytes + part_offset;
            for (int64_t kvh = 0; kvh < kv_end - kv_first; kvh++) {
                for (int64_t j = 0; j < nv; j++) {
                    const v16f v = load16(v_row + kvh * head_bytes + 16 * j * kv_es, kv_dtype);
                    for (int64_t g = 0; g < group; g++) acc[kvh * group + g][j] += scores[kvh * group + g][t] * v;
                }
            }
        }
    }
    for (int64_t h = 0; h < heads; h++) {
        for (int64_t j = 0; j < nv; j++) memcpy(row + 16 * j, &acc[h][j], sizeof(v16f));
        const float inv = 1.0f / l[h];
        for (int64_t i = 0; i < head_dim; i++) row[i] *= inv;
        store_row(row, out_row + h * head_dim * q_es, q_dtype, head_dim);
    }
}

/* One new token per request attends to its whole sequence, read in place from the paged KV buffers.
 *
 * q [bs, num_heads, head_dim] (token stride q_stride); k_buf / v_buf [num_slots, num_kv_heads, head_dim];
 * req_to_token [rows, table_stride] int32 maps (request row, position) to a KV slot; request b is row
 * req_rows[b] with seq_lens[b] tokens; with window > 0 only the last ``window`` positions are attended.
 * out [bs, num_heads, head_dim] contiguous, in q's dtype; head_dim a multiple of 16.  Scores and the softmax
 * are float32 (online over chunks of ATTN_CHUNK positions).  A work item is one request, or a block of its KV
 * heads when there are fewer requests than threads; it reads each K/V row once, whole. */
void decode_attention(const void *q, int64_t q_stride, const void *k_buf, const void *v_buf,
                      const int32_t *req_to_token, int64_t table_stride, const int64_t *req_rows,
                      const int64_t *seq_lens, void *out, int64_t bs, int64_t num_heads, int64_t num_kv_heads,
                      int64_t head_dim, float scale, int64_t window, int q_dtype, int kv_dtype, int nthreads) {
    const int64_t group = num_heads / num_kv_heads;
    const int64_t splits = bs >= nthreads ? 1 : (nthreads + bs - 1) / bs < num_kv_heads ? (nthreads + bs - 1) / bs
                                                                                       : num_kv_heads;
    const int64_t per_split = (num_kv_heads + splits - 1) / splits;
    const size_t q_es = elem_size(q_dtype);
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1)
    for (int64_t item = 0; item < bs * splits; item++) {
        const int64_t b = item / splits, kv_first = (item % splits) * per_split;
        const int64_t kv_end = kv_first + per_split < num_kv_heads ? kv_first + per_split : num_kv_heads;
        if (kv_first >= kv_end) continue;
        const int64_t len = seq_lens[b];
        const int64_t first = (window > 0 && len > window) ? len - window : 0;
        const char *q_row = (const char *)q + b * q_stride * q_es;
        const int32_t *slots = req_to_token + req_rows[b] * table_stride;
        char *out_row = (char *)out + (b * num_heads + kv_first * group) * head_dim * q_es;
        /* Constant head dims and K/V dtypes for the common shapes: their loops unroll and stay in registers
         * (measured 10 % faster than the generic code at SmolLM2's shapes). */
#define ITEM(HEAD_DIM, KV_DTYPE)                                                                                  \
    decode_attention_item(q_row, q_dtype, (const char *)k_buf, (const char *)v_buf, KV_DTYPE, slots, first, len,   \
                          kv_first, kv_end, group, HEAD_DIM, num_kv_heads * head_dim, scale, out_row)
        if (head_dim == 64 && kv_dtype == DT_BF16) ITEM(64, DT_BF16);
        else if (head_dim == 128 && kv_dtype == DT_BF16) ITEM(128, DT_BF16);
        else if (head_dim == 64) ITEM(64, DT_F32);
        else if (head_dim == 128) ITEM(128, DT_F32);
        else ITEM(head_dim, kv_dtype);
#undef ITEM
    }
}

/* ------------------------------------------------------------------ paged extend attention */

#define EXT_QUERY_BLOCK 32 /* new positions of one request per work item */
#define EXT_KEY_CHUNK 64   /* keys loaded (as float32, K transposed) between online-softmax rescales */

/* Rows of one work item: positions [i0, i1) of request b's new tokens, the query heads of KV head kvh. */
static void extend_attention_item(const char *q, int64_t q_stride, int q_dtype, const char *k_buf,
                                  const char *v_buf, int kv_dtype, const int32_t *slots, int64_t prefix,
                                  int64_t i0, int64_t i1, int64_t kvh, int64_t group, int64_t num_heads,
                                  int64_t num_kv_heads, int64_t head_dim, float scale, int64_t window, char *out,
                                  float *qs, float *acc) {
    const int64_t rows = (i1 - i0) * group, q_es = elem_size(q_dtype), kv_es = elem_size(kv_dtype);
    const int64_t row_bytes = num_kv_heads * head_dim * kv_es;
    float kt[head_dim][EXT_KEY_CHUNK], v[EXT_KEY_CHUNK][head_dim], s[EXT_KEY_CHUNK], m[rows], l[rows];
    for (int64_t r = 0; r < rows; r++) {
        const int64_t i = i0 + r / group, h = kvh * group + r % group;
        load_row(q + (i * q_stride + h * head_dim) * q_es, q_dtype, qs + r * head_dim, head_dim);
        for (int64_t d = 0; d < head_dim; d++) {
            qs[r * head_dim + d] *= scale;
            acc[r * head_dim + d] = 0.0f;
        }
        m[r] = -FLT_MAX;
        l[r] = 0.0f;
    }
    const int64_t last = prefix + i1 - 1; /* the last key any row of the item may see */
    const int64_t first = window > 0 && prefix + i0 - window + 1 > 0 ? prefix + i0 - window + 1 : 0;
    for (int64_t c = first; c <= last; c += EXT_KEY_CHUNK) {
        const int64_t n = last + 1 - c < EXT_KEY_CHUNK ? last + 1 - c : EXT_KEY_CHUNK;
        for (int64_t t = 0; t < n; t++) {
            const char *k_row = k_buf + (int64_t)slots[c + t] * row_bytes + kvh * head_dim * kv_es;
            float row[head_dim];
            load_row(k_row, kv_dtype, row, head_dim);
            for (int64_t d = 0; d < head_dim; d++) kt[d][t] = row[d];
            load_row(v_buf + (k_row - k_buf), kv_dtype, v[t], head_dim);
        }
        for (int64_t t = n; t < EXT_KEY_CHUNK; t++)
            for (int64_t d = 0; d < head_dim; d++) kt[d][t] = 0.0f;
        for (int64_t r = 0; r < rows; r++) {
            const int64_t pos = prefix + i0 + r / group;
            const int64_t lo = window > 0 ? pos - window + 1 : 0;
            const int64_t t_begin = lo > c ? lo - c : 0, t_end = pos + 1 - c < n ? pos + 1 - c : n;
            if (t_end <= t_begin) continue;
            /* Scores of 16 keys at a time: q_r broadcast against a row of the transposed chunk. */
            const float *qr = qs + r * head_dim;
            for (int64_t t0 = 0; t0 < t_end; t0 += 16) {
                v16f dots = {0};
                for (int64_t d = 0; d < head_dim; d++) {
                    v16f k;
                    memcpy(&k, &kt[d][t0], sizeof k);
                    dots += qr[d] * k;
                }
                memcpy(s + t0, &dots, sizeof dots);
            }
            const float alpha = online_softmax(s, t_begin, t_end, &m[r], &l[r]);
            float *ar = acc + r * head_dim;
            for (int64_t d = 0; d < head_dim; d++) ar[d] *= alpha;
            for (int64_t t = t_begin; t < t_end; t++) {
                const float p = s[t];
                for (int64_t d = 0; d < head_dim; d++) ar[d] += p * v[t][d];
            }
        }
    }
    for (int64_t r = 0; r < rows; r++) {
        const int64_t i = i0 + r / group, h = kvh * group + r % group;
        float *ar = acc + r * head_dim;
        const float inv = 1.0f / l[r];
        for (int64_t d = 0; d < head_dim; d++) ar[d] *= inv;
        store_row(ar, out + (i * num_heads + h) * head_dim * q_es, q_dtype, head_dim);
    }
}

/* New tokens attend to their request's cached prefix and causally to each other, K/V read in place.
 *
 * Request b (row req_rows[b] of req_to_token) has prefix_lens[b] cached positions and extend_lens[b] new ones,
 * whose queries are rows q_starts[b] .. of q [tokens, num_heads, head_dim] (token stride q_stride); new token i
 * sits at position prefix + i and sees positions 0 .. prefix + i (the last ``window`` of them if window > 0).
 * Its K/V must already be in the cache.  out [tokens, num_heads, head_dim] contiguous, q's dtype.
 * Work items: (request, block of EXT_QUERY_BLOCK new tokens, KV head); block_starts[b] is the first block of b
 * (block_starts[num_reqs] the total). */
void extend_attention(const void *q, int64_t q_stride, const void *k_buf, const void *v_buf,
                      const int32_t *req_to_token, int64_t table_stride, const int64_t *req_rows,
                      const int64_t *prefix_lens, const int64_t *extend_lens, const int64_t *q_starts,
                      const int64_t *block_starts, int64_t num_reqs, void *out, int64_t num_heads,
                      int64_t num_kv_heads, int64_t head_dim, float scale, int64_t window, int q_dtype,
                      int kv_dtype, int nthreads) {
    const int64_t group = num_heads / num_kv_heads, q_es = elem_size(q_dtype);
    const int64_t items = block_starts[num_reqs] * num_kv_heads;
#pragma omp parallel num_threads(nthreads)
    {
        float *qs = malloc(sizeof(float) * EXT_QUERY_BLOCK * group * head_dim);
        float *acc = malloc(sizeof(float) * EXT_QUERY_BLOCK * group * head_dim);
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < items; item++) {
            const int64_t block = item / num_kv_heads, kvh = item % num_kv_heads;
            int64_t b = 0;
            while (block_starts[b + 1] <= block) b++;
            const int64_t i0 = (block - block_starts[b]) * EXT_QUERY_BLOCK;
            const int64_t i1 = i0 + EXT_QUERY_BLOCK < extend_lens[b] ? i0 + EXT_QUERY_BLOCK : extend_lens[b];
            extend_attention_item((const char *)q + q_starts[b] * q_stride * q_es, q_stride, q_dtype,
                                  (const char *)k_buf, (const char *)v_buf, kv_dtype,
                                  req_to_token + req_rows[b] * table_stride, prefix_lens[b], i0, i1, kvh, group,
                                  num_heads, num_kv_heads, head_dim, scale, window,
                                  (char *)out + q_starts[b] * num_heads * head_dim * q_es, qs, acc);
        }
        free(qs);
        free(acc);
    }
}
