/* The reductions of WTI (docs/reference.md §1.4) over one block of token-frame similarities.
 *
 * The PyTorch path (models/similarity.py, _block_scores) reduces the (A, L, B, T) score block in
 * separate passes: the max over frames, the max over tokens, two weighted sums, the zero floors,
 * each reading the block again from the shared last-level cache. Here one caption's rows are read
 * once: each row updates the caption's per-frame running max over tokens (B T floats, in L1) and
 * adds its weighted max over each video's frames; the caption's scores follow from the running max.
 * The rows are ragged (only the caption's real tokens, no padding): the zero floor that a padded
 * position would have supplied is applied as max(., 0) where the caption or the video had padding.
 *
 * For caption i (rows offsets[i] .. offsets[i+1]) and video b (columns b T .. b T + T - 1):
 *   t2v = sum_r text_w[r] floor_v(max_t s[r, b T + t])
 *   v2t = sum_t video_w[b, t] floor_t(max_r s[r, b T + t])
 *   out[out_rows[i], out_cols[b]] = (t2v + v2t) / 2
 * where floor_v (floor_t) is max(., 0) when video_floor[b] (text_floor[i]) is set.
 * Exact up to float rounding (summation order) against the PyTorch path.
 *
 * Products and sums are rounded separately (no fused multiply-add): the PyTorch reductions round
 * them so, and with them a search query's scores are bit-identical to the PyTorch path's (the demo's
 * pinned query results compare exact floats; contracted, 16-20 % of scores moved by ~1 ulp).
 *
 * Plain C (no torch headers): compiles in about a second.
 */
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

/* Returns 0, 1 when scratch memory cannot be had, 2 when an offset or output index is out of range
 * (checked before anything is written: the caller raises). */
int diffusionret_wti_reduce(int64_t n_text, int64_t n_video, int64_t frames, const float *s, int64_t ld_s,
                            int64_t n_rows, const int64_t *offsets, const float *text_w, const uint8_t *text_floor,
                            const float *video_w, const uint8_t *video_floor, float *out, int64_t ld_out,
                            int64_t n_out_rows, int64_t n_out_cols, const int64_t *out_rows,
                            const int64_t *out_cols) {
    for (int64_t i = 0; i < n_text; ++i)
        if (offsets[i] < 0 || offsets[i] > offsets[i + 1] || offsets[i + 1] > n_rows || out_rows[i] < 0 ||
            out_rows[i] >= n_out_rows)
            return 2;
    for (int64_t b = 0; b < n_video; ++b)
        if (out_cols[b] < 0 || out_cols[b] >= n_out_cols) return 2;
    const int64_t width = n_video * frames;
    float *colmax = malloc((size_t)(width > 0 ? width : 1) * sizeof(float));
    float *t2v = malloc((size_t)(n_video > 0 ? n_video : 1) * sizeof(float));
    if (!colmax || !t2v) {
        free(colmax);
        free(t2v);
        return 1;
    }
    for (int64_t i = 0; i < n_text; ++i) {
        for (int64_t c = 0; c < width; ++c) colmax[c] = -INFINITY;
        for (int64_t b = 0; b < n_video; ++b) t2v[b] = 0.0f;
        for (int64_t r = offsets[i]; r < offsets[i + 1]; ++r) {
            const float *row = s + r * ld_s;
            const float w = text_w[r];
            for (int64_t c = 0; c < width; ++c) colmax[c] = row[c] > colmax[c] ? row[c] : colmax[c];
            for (int64_t b = 0; b < n_video; ++b) {
                const float *cell = row + b * frames;
                float m = cell[0];
                for (int64_t t = 1; t < frames; ++t) m = cell[t] > m ? cell[t] : m;
                if (video_floor[b] && m < 0.0f) m = 0.0f;
                t2v[b] += w * m;
            }
        }
        /* A caption with no real token scores as its one padded position would: 0. */
        const int floor = text_floor[i] != 0 || offsets[i + 1] == offsets[i];
        float *dst = out + out_rows[i] * ld_out;
        for (int64_t b = 0; b < n_video; ++b) {
            float v2t = 0.0f;
            for (int64_t t = 0; t < frames; ++t) {
                float m = colmax[b * frames + t];
                if (floor && m < 0.0f) m = 0.0f;
                v2t += video_w[b * frames + t] * m;
            }
            dst[out_cols[b]] = (t2v[b] + v2t) / 2.0f;
        }
    }
    free(colmax);
    free(t2v);
    return 0;
}
