/* Deterministic DDIM (eta = 0) through a prepared DiffusionRet denoiser, one query at a time.
 *
 * The PyTorch path (models/denoiser.py, PreparedDenoiser) runs each step over a chunk of queries:
 * its (chunk, K, 2D) tensors are re-read from the shared last-level cache by several ops per step.
 * Here all S steps of one query run back to back, so that query's two (K, 2D) tables (256 KiB at
 * K = 32, D = 512) stay in the core's L2 cache, and the decoder's hidden layer is reduced in the same
 * pass that forms it (out_w . relu(c_n + h)): one read of each table per step, no intermediate.
 *
 * Per query b and step s = S-1 .. 0 (x starts at noise[b]):
 *   w   = softmax(logits[b, s, :] + x)                       (K)
 *   h   = he[s] + sum_n w_n g_n                              (2D)
 *   x0n = clamp(out_w . relu(c_n + h) + out_b + w_n, -1, 1)  (when clip)
 *   x   = x0 at s = 0, else x0 sqrt_prev[s] + dir[s] (sqrt_recip[s] x - x0) / sqrt_recipm1[s]
 * Exact up to float rounding (summation order) against the PyTorch path.
 *
 * Plain C with GCC/Clang vector extensions (no torch headers): compiles in about a second.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef float vf __attribute__((vector_size(32)));
typedef int32_t vi __attribute__((vector_size(32)));
#define VW 8

static inline vf vload(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void vstore(float *p, vf v) { memcpy(p, &v, sizeof v); }
/* max(v, 0) lane-wise: keep the bits of the positive lanes (C has no vector ?:). */
static inline vf vrelu(vf v) { const vf zero = {0}; return (vf)((vi)v & (v > zero)); }
static inline float vsum(vf v) {
    float s = 0.0f;
    for (int i = 0; i < VW; ++i) s += v[i];
    return s;
}

/* h += sum_n w[n] * rows[n], rows given as pointers (candidates gathered from a bank or not). */
static void weighted_rows(float *h, const float *w, const float *const *rows, int64_t k, int64_t d2) {
    int64_t n = 0;
    for (; n + 4 <= k; n += 4) {
        const float *r0 = rows[n], *r1 = rows[n + 1], *r2 = rows[n + 2], *r3 = rows[n + 3];
        const float w0 = w[n], w1 = w[n + 1], w2 = w[n + 2], w3 = w[n + 3];
        int64_t j = 0;
        for (; j + VW <= d2; j += VW) {
            vf acc = vload(h + j);
            acc += w0 * vload(r0 + j);
            acc += w1 * vload(r1 + j);
            acc += w2 * vload(r2 + j);
            acc += w3 * vload(r3 + j);
            vstore(h + j, acc);
        }
        for (; j < d2; ++j) h[j] += w0 * r0[j] + w1 * r1[j] + w2 * r2[j] + w3 * r3[j];
    }
    for (; n < k; ++n) {
        const float *r = rows[n];
        const float wn = w[n];
        for (int64_t j = 0; j < d2; ++j) h[j] += wn * r[j];
    }
}

/* out[n] = out_w . relu(rows[n] + h) for every candidate n. */
static void relu_dots(float *out, const float *h, const float *out_w, const float *const *rows, int64_t k, int64_t d2) {
    const vf zero = {0};
    int64_t n = 0;
    for (; n + 4 <= k; n += 4) {
        const float *r0 = rows[n], *r1 = rows[n + 1], *r2 = rows[n + 2], *r3 = rows[n + 3];
        vf a0 = zero, a1 = zero, a2 = zero, a3 = zero;
        int64_t j = 0;
        for (; j + VW <= d2; j += VW) {
            const vf hv = vload(h + j), wv = vload(out_w + j);
            vf t0 = vload(r0 + j) + hv, t1 = vload(r1 + j) + hv, t2 = vload(r2 + j) + hv, t3 = vload(r3 + j) + hv;
            t0 = vrelu(t0);
            t1 = vrelu(t1);
            t2 = vrelu(t2);
            t3 = vrelu(t3);
            a0 += wv * t0;
            a1 += wv * t1;
            a2 += wv * t2;
            a3 += wv * t3;
        }
        float s0 = vsum(a0), s1 = vsum(a1), s2 = vsum(a2), s3 = vsum(a3);
        for (; j < d2; ++j) {
            const float hv = h[j], wv = out_w[j];
            float t;
            t = r0[j] + hv; s0 += wv * (t > 0.0f ? t : 0.0f);
            t = r1[j] + hv; s1 += wv * (t > 0.0f ? t : 0.0f);
            t = r2[j] + hv; s2 += wv * (t > 0.0f ? t : 0.0f);
            t = r3[j] + hv; s3 += wv * (t > 0.0f ? t : 0.0f);
        }
        out[n] = s0; out[n + 1] = s1; out[n + 2] = s2; out[n + 3] = s3;
    }
    for (; n < k; ++n) {
        const float *r = rows[n];
        float s = 0.0f;
        for (int64_t j = 0; j < d2; ++j) {
            const float t = r[j] + h[j];
            s += out_w[j] * (t > 0.0f ? t : 0.0f);
        }
        out[n] = s;
    }
}

/* rows[n] = bias + sum_t mix[n, t] bank[idx[n], t] for the K candidates of one query, into scratch. */
static void mix_frames(float *scratch, const float **rows, const float *bank, const int64_t *idx, const float *mix,
                       const float *bias, int64_t k, int64_t t_frames, int64_t d2) {
    for (int64_t n = 0; n < k; ++n) {
        float *dst = scratch + n * d2;
        if (bias) memcpy(dst, bias, sizeof(float) * (size_t)d2);
        else memset(dst, 0, sizeof(float) * (size_t)d2);
        const float *src = bank + idx[n] * t_frames * d2;
        for (int64_t t = 0; t < t_frames; ++t) {
            const float p = mix[n * t_frames + t];
            if (p == 0.0f) continue; /* masked frames: their weight is exactly 0 */
            const float *row = src + t * d2;
            int64_t j = 0;
            for (; j + VW <= d2; j += VW) vstore(dst + j, vload(dst + j) + p * vload(row + j));
            for (; j < d2; ++j) dst[j] += p * row[j];
        }
        rows[n] = dst;
    }
}

/* Returns 0, or -1 when memory for the per-query scratch could not be allocated.
 *
 * logits (B, S, K); noise, out (B, K); he (S, D2); out_w (D2,); the four DDIM tables (S,).
 * The candidates' decoder terms g and c come from banks g_bank, c_bank (M, T, D2):
 *   idx NULL:           T = 1 and candidate n of query b is bank row b K + n;
 *   idx (B, K), no mix: T = 1 and it is bank row idx[b, n];
 *   idx and mix (B, K, T): it is sum_t mix[b, n, t] bank[idx[b, n], t] (+ c_bias for c), the
 *     frame-pooled form (the value path and the decoder are linear in the pooled feature).
 * All float32 (indices int64), C-contiguous.
 */
int diffusionret_ddim_rerank(int64_t b_rows, int64_t k, int64_t s_steps, int64_t d2, int64_t t_frames,
                             const float *logits, const float *g_bank, const float *c_bank, const int64_t *idx,
                             const float *mix, const float *c_bias, const float *he, const float *out_w, float out_b,
                             const float *sqrt_recip, const float *sqrt_recipm1, const float *sqrt_prev,
                             const float *dir, int clip, const float *noise, float *out) {
    float *h = malloc(sizeof(float) * (size_t)d2);
    float *w = malloc(sizeof(float) * (size_t)k * 3);
    const float **rows = malloc(sizeof(float *) * (size_t)k * 2);
    float *scratch = mix ? malloc(sizeof(float) * (size_t)(2 * k * d2)) : NULL;
    if (h == NULL || w == NULL || rows == NULL || (mix && scratch == NULL)) {
        free(h); free(w); free(rows); free(scratch);
        return -1;
    }
    float *x = w + k, *dot = w + 2 * k;
    const float **g_rows = rows, **c_rows = rows + k;
    for (int64_t b = 0; b < b_rows; ++b) {
        if (mix) {
            mix_frames(scratch, g_rows, g_bank, idx + b * k, mix + b * k * t_frames, NULL, k, t_frames, d2);
            mix_frames(scratch + k * d2, c_rows, c_bank, idx + b * k, mix + b * k * t_frames, c_bias, k, t_frames, d2);
        } else {
            for (int64_t n = 0; n < k; ++n) {
                const int64_t row = idx ? idx[b * k + n] : b * k + n;
                g_rows[n] = g_bank + d2 * row;
                c_rows[n] = c_bank + d2 * row;
            }
        }
        memcpy(x, noise + b * k, sizeof(float) * (size_t)k);
        for (int64_t s = s_steps - 1; s >= 0; --s) {
            const float *lg = logits + (b * s_steps + s) * k;
            float top = -INFINITY, total = 0.0f;
            for (int64_t n = 0; n < k; ++n) {
                w[n] = lg[n] + x[n];
                top = w[n] > top ? w[n] : top;
            }
            for (int64_t n = 0; n < k; ++n) {
                w[n] = expf(w[n] - top);
                total += w[n];
            }
            for (int64_t n = 0; n < k; ++n) w[n] /= total;
            memcpy(h, he + s * d2, sizeof(float) * (size_t)d2);
            weighted_rows(h, w, g_rows, k, d2);
            relu_dots(dot, h, out_w, c_rows, k, d2);
            for (int64_t n = 0; n < k; ++n) {
                float x0 = dot[n] + out_b + w[n];
                if (clip) x0 = x0 < -1.0f ? -1.0f : (x0 > 1.0f ? 1.0f : x0);
                if (s == 0) {
                    x[n] = x0;
                } else {
                    const float eps = (sqrt_recip[s] * x[n] - x0) / sqrt_recipm1[s];
                    x[n] = x0 * sqrt_prev[s] + dir[s] * eps;
                }
            }
        }
        memcpy(out + b * k, x, sizeof(float) * (size_t)k);
    }
    free(h); free(w); free(rows); free(scratch);
    return 0;
}
