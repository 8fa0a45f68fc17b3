/* ndsnn sparse spiking kernels (see ndsnn_kernels.h). Freestanding C99: <stdint.h> and <stddef.h> only. */
#include "ndsnn_kernels.h"

/* The column indices of a weight, read in storage order (rows in order, weights in order within a row):
 * plain ones at k, gap-coded ones decoded from a moving pointer (see ndsnn_csr). */
typedef struct {
    const ndsnn_csr *w;
    const uint8_t *next; /* the gap stream's next byte */
    int32_t col;         /* the row's last column so far; -1 at a row start */
} column_cursor;

static column_cursor columns_of(const ndsnn_csr *w)
{
    column_cursor cursor;
    cursor.w = w;
    cursor.next = w->gaps;
    cursor.col = -1;
    return cursor;
}

static inline int32_t next_column(column_cursor *c, int32_t k)
{
    int32_t gap = 0;
    if (c->w->gaps == NULL) {
        return c->w->col16 != NULL ? (int32_t)c->w->col16[k] : c->w->col32[k];
    }
    while (*c->next == 255u) { /* escape: 255 more, read on */
        gap += 255;
        ++c->next;
    }
    gap += *c->next++;
    c->col += gap + 1;
    return c->col;
}

static float bias_at(const ndsnn_csr *w, int32_t row)
{
    return w->bias != NULL ? w->bias[row] : 0.0f;
}

/* Output rows [*lo, *hi) whose input row (o * stride - pad + offset) lies inside [0, size). */
static void valid_range(int32_t size, int32_t out_size, int32_t stride, int32_t pad, int32_t offset,
                        int32_t *lo, int32_t *hi)
{
    int32_t first = pad - offset; /* o * stride >= first */
    int32_t last = size - 1 + pad - offset; /* o * stride <= last */
    *lo = first > 0 ? (first + stride - 1) / stride : 0;
    *hi = last < 0 ? 0 : last / stride + 1;
    if (*hi > out_size) {
        *hi = out_size;
    }
    if (*lo > *hi) {
        *lo = *hi;
    }
}

/* A kernel tap's dilated offsets and the output window [y0, y1) x [x0, x1) whose inputs lie inside the map. */
typedef struct {
    int32_t dy, dx, y0, y1, x0, x1;
} tap_window;

#define MAX_TAPS 9 /* taps whose windows are computed once per layer call (3x3 and smaller kernels) */

/* The windows of every tap of a layer's kernel, computed once per call instead of once per weight (the
 * same for every weight of a tap; on the stack: 9 x 24 bytes). count 0: a kernel over MAX_TAPS taps. */
typedef struct {
    int32_t count;
    tap_window window[MAX_TAPS];
} tap_windows;

static void tap_window_of(const ndsnn_conv_geometry *g, int32_t tap, tap_window *win)
{
    win->dy = (tap / g->kernel_w) * g->dilation_h;
    win->dx = (tap % g->kernel_w) * g->dilation_w;
    valid_range(g->in_h, g->out_h, g->stride_h, g->pad_h, win->dy, &win->y0, &win->y1);
    valid_range(g->in_w, g->out_w, g->stride_w, g->pad_w, win->dx, &win->x0, &win->x1);
}

static void tap_windows_of(const ndsnn_conv_geometry *g, tap_windows *all)
{
    int32_t tap;
    all->count = g->kernel_h * g->kernel_w <= MAX_TAPS ? g->kernel_h * g->kernel_w : 0;
    for (tap = 0; tap < all->count; ++tap) {
        tap_window_of(g, tap, &all->window[tap]);
    }
}

/* Where column `col` of a conv row reads: its input channel and its tap's window (from the table, or
 * computed into `scratch` for a large kernel). 3x3 kernels divide by a constant: a multiply, not a divide. */
static const tap_window *window_of(const ndsnn_conv_geometry *g, const tap_windows *all, int32_t col,
                                   int32_t *channel, tap_window *scratch)
{
    int32_t taps = g->kernel_h * g->kernel_w;
    int32_t tap = taps == 9 ? col % 9 : col % taps;
    *channel = taps == 9 ? col / 9 : col / taps;
    if (all->count) {
        return &all->window[tap];
    }
    tap_window_of(g, tap, scratch);
    return scratch;
}

/* Row kernels: dst[i] += w * src[i * stride] over n outputs. For stride 1, blocks of ROW_BLOCK have a
 * constant trip count, which compilers vectorise at -O2 (GCC's cheap cost model); the same operations in
 * the same order as the scalar loop, so the same rounding. A spike is 0 or 1: w * spike adds w or 0,
 * without a branch. */
#define ROW_BLOCK 8
#define NDSNN_DEFINE_ROW(NAME, ACC_T, SRC_T)                                                            \
    static void NAME##_block(ACC_T *restrict dst, const SRC_T *restrict src, ACC_T w)                   \
    {                                                                                                   \
        int32_t i;                                                                                      \
        for (i = 0; i < ROW_BLOCK; ++i) {                                                               \
            dst[i] += w * (ACC_T)src[i];                                                                \
        }                                                                                               \
    }                                                                                                   \
    static void NAME(ACC_T *restrict dst, const SRC_T *restrict src, int32_t n, int32_t stride, ACC_T w) \
    {                                                                                                   \
        int32_t i = 0;                                                                                  \
        if (stride == 1) {                                                                              \
            for (; i + ROW_BLOCK <= n; i += ROW_BLOCK) {                                                \
                NAME##_block(dst + i, src + i, w);                                                      \
            }                                                                                           \
        }                                                                                               \
        for (; i < n; ++i) {                                                                            \
            dst[i] += w * (ACC_T)src[i * stride];                                                       \
        }                                                                                               \
    }

NDSNN_DEFINE_ROW(row_analog, float, float)
NDSNN_DEFINE_ROW(row_spikes_fp32, float, uint8_t)
NDSNN_DEFINE_ROW(row_spikes_int8, int32_t, uint8_t)

/* y[i] = y[i] * scale + bias (scale 1 when there is none: exactly y[i] + bias) and y[i] = acc[i] * scale +
 * bias over a plane, in blocks of ROW_BLOCK like the row kernels. */
static void affine_block(float *restrict y, float scale, float bias)
{
    int32_t i;
    for (i = 0; i < ROW_BLOCK; ++i) {
        y[i] = y[i] * scale + bias;
    }
}

static void affine(float *restrict y, int32_t n, float scale, float bias)
{
    int32_t i = 0;
    for (; i + ROW_BLOCK <= n; i += ROW_BLOCK) {
        affine_block(y + i, scale, bias);
    }
    for (; i < n; ++i) {
        y[i] = y[i] * scale + bias;
    }
}

static void dequantise_block(float *restrict y, const int32_t *restrict acc, float scale, float bias)
{
    int32_t i;
    for (i = 0; i < ROW_BLOCK; ++i) {
        y[i] = (float)acc[i] * scale + bias;
    }
}

static void dequantise(float *restrict y, const int32_t *restrict acc, int32_t n, float scale, float bias)
{
    int32_t i = 0;
    for (; i + ROW_BLOCK <= n; i += ROW_BLOCK) {
        dequantise_block(y + i, acc + i, scale, bias);
    }
    for (; i < n; ++i) {
        y[i] = (float)acc[i] * scale + bias;
    }
}

void ndsnn_zero(float *x, int32_t count)
{
    int32_t i;
    for (i = 0; i < count; ++i) {
        x[i] = 0.0f;
    }
}

void ndsnn_normalize(const float *image, const float *mean, const float *std, int32_t channels,
                     int32_t plane, float *out)
{
    int32_t c, i;
    for (c = 0; c < channels; ++c) {
        for (i = 0; i < plane; ++i) {
            out[c * plane + i] = (image[c * plane + i] - mean[c]) / std[c];
        }
    }
}

void ndsnn_normalize_u8(const uint8_t *image, const float *mean, const float *std, int32_t channels,
                        int32_t plane, float *out)
{
    int32_t c, i;
    for (c = 0; c < channels; ++c) {
        for (i = 0; i < plane; ++i) {
            out[c * plane + i] = ((float)image[c * plane + i] / 255.0f - mean[c]) / std[c];
        }
    }
}

void ndsnn_conv_analog(const ndsnn_csr *w, const ndsnn_conv_geometry *g, const float *in, float *out)
{
    int32_t plane = g->out_h * g->out_w;
    int32_t o, k, i, oy;
    column_cursor cursor = columns_of(w);
    tap_windows windows;
    tap_windows_of(g, &windows);
    for (o = 0; o < g->out_c; ++o) {
        float *dst = out + o * plane;
        for (i = 0; i < plane; ++i) {
            dst[i] = 0.0f;
        }
        cursor.col = -1;
        for (k = w->row_ptr[o]; k < w->row_ptr[o + 1]; ++k) {
            int32_t channel;
            tap_window scratch;
            float weight = w->qvalues != NULL ? (float)w->qvalues[k] : w->values[k];
            const tap_window *win = window_of(g, &windows, next_column(&cursor, k), &channel, &scratch);
            /* an index, not a pointer: the window's corner may lie outside the map (padding) */
            int32_t base = channel * g->in_h * g->in_w + (win->dy - g->pad_h) * g->in_w + win->dx - g->pad_w;
            for (oy = win->y0; oy < win->y1; ++oy) {
                row_analog(dst + oy * g->out_w + win->x0, in + base + oy * g->stride_h * g->in_w + win->x0 * g->stride_w,
                           win->x1 - win->x0, g->stride_w, weight);
            }
        }
        affine(dst, plane, w->scales != NULL ? w->scales[o] : 1.0f, bias_at(w, o));
    }
}

void ndsnn_linear_analog(const ndsnn_csr *w, const float *in, float *out)
{
    int32_t o, k;
    column_cursor cursor = columns_of(w);
    for (o = 0; o < w->rows; ++o) {
        float sum = 0.0f;
        cursor.col = -1;
        for (k = w->row_ptr[o]; k < w->row_ptr[o + 1]; ++k) {
            float weight = w->qvalues != NULL ? (float)w->qvalues[k] : w->values[k];
            sum += weight * in[next_column(&cursor, k)];
        }
        out[o] = (w->scales != NULL ? sum * w->scales[o] : sum) + bias_at(w, o);
    }
}

/* One spike-fed output channel: for every active weight (tap) of channel o, add the weight wherever its
 * shifted input fired -- no multiplies. fp32 weights add into the output plane itself; int8 weights add
 * into an int32 accumulator per output position, scaled once per position by the caller. The cursor
 * stands at row o's first column. C99 has no templates, so the two variants are one macro (ACC_T:
 * accumulator type; WEIGHT: the tap's value). */
#define NDSNN_DEFINE_CONV_SPIKES(NAME, ACC_T, WEIGHT, ROW)                                                     \
    static void NAME(const ndsnn_csr *w, const ndsnn_conv_geometry *g, const tap_windows *windows,      \
                     int32_t o, const uint8_t *in, ACC_T *acc, column_cursor *cursor)                   \
    {                                                                                                   \
        int32_t k, oy;                                                                                  \
        cursor->col = -1;                                                                               \
        for (k = w->row_ptr[o]; k < w->row_ptr[o + 1]; ++k) {                                           \
            int32_t channel;                                                                            \
            tap_window scratch;                                                                         \
            const ACC_T weight = (ACC_T)(WEIGHT);                                                       \
            const tap_window *win = window_of(g, windows, next_column(cursor, k), &channel, &scratch);  \
            /* an index, not a pointer: the window's corner may lie outside the map (padding) */        \
            int32_t base = channel * g->in_h * g->in_w + (win->dy - g->pad_h) * g->in_w + win->dx - g->pad_w; \
            for (oy = win->y0; oy < win->y1; ++oy) {                                                    \
                ROW(acc + oy * g->out_w + win->x0, in + base + oy * g->stride_h * g->in_w + win->x0 * g->stride_w, \
                    win->x1 - win->x0, g->stride_w, weight);                                            \
            }                                                                                           \
        }                                                                                               \
    }

NDSNN_DEFINE_CONV_SPIKES(conv_spikes_fp32, float, w->values[k], row_spikes_fp32)
NDSNN_DEFINE_CONV_SPIKES(conv_spikes_int8, int32_t, w->qvalues[k], row_spikes_int8)

void ndsnn_conv_spikes(const ndsnn_csr *w, const ndsnn_conv_geometry *g, const uint8_t *in, float *out,
                       int32_t *acc)
{
    int32_t plane = g->out_h * g->out_w;
    int32_t o, i;
    column_cursor cursor = columns_of(w);
    tap_windows windows;
    tap_windows_of(g, &windows);
    for (o = 0; o < g->out_c; ++o) {
        float *dst = out + o * plane;
        float bias = bias_at(w, o);
        if (w->qvalues != NULL) {
            for (i = 0; i < plane; ++i) {
                acc[i] = 0;
            }
            conv_spikes_int8(w, g, &windows, o, in, acc, &cursor);
            dequantise(dst, acc, plane, w->scales[o], bias);
        } else {
            ndsnn_zero(dst, plane);
            conv_spikes_fp32(w, g, &windows, o, in, dst, &cursor);
            affine(dst, plane, 1.0f, bias);
        }
    }
}

void ndsnn_linear_spikes(const ndsnn_csr *w, const uint8_t *in, float *out)
{
    int32_t o, k;
    column_cursor cursor = columns_of(w);
    for (o = 0; o < w->rows; ++o) {
        cursor.col = -1;
        if (w->qvalues != NULL) {
            int32_t sum = 0;
            for (k = w->row_ptr[o]; k < w->row_ptr[o + 1]; ++k) { /* branchless: a spike is 0 or 1 */
                sum += w->qvalues[k] * (int32_t)in[next_column(&cursor, k)];
            }
            out[o] = (float)sum * w->scales[o] + bias_at(w, o);
        } else {
            float sum = 0.0f;
            for (k = w->row_ptr[o]; k < w->row_ptr[o + 1]; ++k) {
                sum += w->values[k] * (float)in[next_column(&cursor, k)];
            }
            out[o] = sum + bias_at(w, o);
        }
    }
}

/* LIF over `count` neurons, in blocks of a constant length: a loop of known trip count that compilers
 * vectorise at -O2 (GCC's cheap cost model), with the division kept (vector division rounds as scalar). */
#define LIF_BLOCK 16

static void lif_block(const float *restrict x, float *restrict v, uint8_t *restrict spikes, int32_t count,
                      float tau, float v_threshold)
{
    int32_t i;
    for (i = 0; i < count; ++i) {
        float h = v[i] + (x[i] - v[i]) / tau; /* a division, as the reference: same rounding */
        int fired = h >= v_threshold;
        spikes[i] = (uint8_t)fired;
        v[i] = fired ? 0.0f : h;
    }
}

void ndsnn_lif(const float *x, float *v, uint8_t *spikes, int32_t count, float tau, float v_threshold)
{
    int32_t i;
    for (i = 0; i + LIF_BLOCK <= count; i += LIF_BLOCK) {
        lif_block(x + i, v + i, spikes + i, LIF_BLOCK, tau, v_threshold);
    }
    lif_block(x + i, v + i, spikes + i, count - i, tau, v_threshold);
}

/* Input rows [*lo, *hi) of output row o's window, clipped to the map (padding never wins a max). */
static void window(int32_t o, int32_t size, int32_t kernel, int32_t stride, int32_t pad, int32_t *lo, int32_t *hi)
{
    *lo = o * stride - pad;
    *hi = *lo + kernel;
    if (*lo < 0) {
        *lo = 0;
    }
    if (*hi > size) {
        *hi = size;
    }
}

/* Max-pooling of a [C, H, W] map of ELEM_T. On spike bytes (0/1) the maximum is the OR of the window.
 * Windows that tile the map (kernel = stride, no padding: every max-pool of the registry's models) take
 * a direct path without clipping. */
#define MAX2(a, b) ((a) > (b) ? (a) : (b))
#define NDSNN_DEFINE_MAXPOOL(NAME, ELEM_T)                                                             \
    static void NAME##_2x2_block(const ELEM_T *restrict top, const ELEM_T *restrict bottom,           \
                                 ELEM_T *restrict out)                                                 \
    {                                                                                                  \
        int32_t i;                                                                                     \
        for (i = 0; i < ROW_BLOCK; ++i) {                                                              \
            out[i] = MAX2(MAX2(top[2 * i], top[2 * i + 1]), MAX2(bottom[2 * i], bottom[2 * i + 1]));   \
        }                                                                                              \
    }                                                                                                  \
    static void NAME##_2x2(const ELEM_T *restrict top, const ELEM_T *restrict bottom,                 \
                           ELEM_T *restrict out, int32_t n)                                            \
    {                                                                                                  \
        int32_t i = 0;                                                                                 \
        for (; i + ROW_BLOCK <= n; i += ROW_BLOCK) {                                                   \
            NAME##_2x2_block(top + 2 * i, bottom + 2 * i, out + i);                                    \
        }                                                                                              \
        for (; i < n; ++i) {                                                                           \
            out[i] = MAX2(MAX2(top[2 * i], top[2 * i + 1]), MAX2(bottom[2 * i], bottom[2 * i + 1]));   \
        }                                                                                              \
    }                                                                                                  \
    static void NAME##_tiled(const ndsnn_pool_geometry *g, const ELEM_T *in, ELEM_T *out)              \
    {                                                                                                  \
        int32_t c, oy, ox, ky, kx;                                                                     \
        for (c = 0; c < g->channels; ++c) {                                                            \
            const ELEM_T *src = in + c * g->in_h * g->in_w;                                            \
            for (oy = 0; oy < g->out_h; ++oy) {                                                        \
                const ELEM_T *top = src + oy * g->stride_h * g->in_w;                                  \
                if (g->kernel_h == 2 && g->kernel_w == 2) { /* 2x2: the common case, in blocks */       \
                    NAME##_2x2(top, top + g->in_w, out, g->out_w);                                     \
                    out += g->out_w;                                                                   \
                    continue;                                                                          \
                }                                                                                      \
                for (ox = 0; ox < g->out_w; ++ox) {                                                    \
                    const ELEM_T *corner = top + ox * g->stride_w;                                     \
                    ELEM_T best = corner[0];                                                           \
                    for (ky = 0; ky < g->kernel_h; ++ky) {                                             \
                        for (kx = 0; kx < g->kernel_w; ++kx) {                                         \
                            ELEM_T value = corner[ky * g->in_w + kx];                                  \
                            best = value > best ? value : best;                                        \
                        }                                                                              \
                    }                                                                                  \
                    *out++ = best;                                                                     \
                }                                                                                      \
            }                                                                                          \
        }                                                                                              \
    }                                                                                                  \
                                                                                                       \
    void NAME(const ndsnn_pool_geometry *g, const ELEM_T *in, ELEM_T *out)                             \
    {                                                                                                  \
        int32_t c, oy, ox, iy, ix, y0, y1, x0, x1;                                                     \
        if (g->pad_h == 0 && g->pad_w == 0 && g->kernel_h == g->stride_h && g->kernel_w == g->stride_w && \
            g->out_h * g->stride_h <= g->in_h && g->out_w * g->stride_w <= g->in_w) {                  \
            NAME##_tiled(g, in, out);                                                                  \
            return;                                                                                    \
        }                                                                                              \
        for (c = 0; c < g->channels; ++c) {                                                            \
            const ELEM_T *src = in + c * g->in_h * g->in_w;                                            \
            for (oy = 0; oy < g->out_h; ++oy) {                                                        \
                window(oy, g->in_h, g->kernel_h, g->stride_h, g->pad_h, &y0, &y1);                     \
                for (ox = 0; ox < g->out_w; ++ox) {                                                    \
                    ELEM_T best;                                                                       \
                    window(ox, g->in_w, g->kernel_w, g->stride_w, g->pad_w, &x0, &x1);                 \
                    best = src[y0 * g->in_w + x0];                                                     \
                    for (iy = y0; iy < y1; ++iy) {                                                     \
                        for (ix = x0; ix < x1; ++ix) {                                                 \
                            best = src[iy * g->in_w + ix] > best ? src[iy * g->in_w + ix] : best;      \
                        }                                                                              \
                    }                                                                                  \
                    out[(c * g->out_h + oy) * g->out_w + ox] = best;                                   \
                }                                                                                      \
            }                                                                                          \
        }                                                                                              \
    }

NDSNN_DEFINE_MAXPOOL(ndsnn_maxpool_analog, float)
NDSNN_DEFINE_MAXPOOL(ndsnn_maxpool_spikes, uint8_t)

/* Global average pooling of a [C, plane] map of ELEM_T, summed in SUM_T (spikes: an exact int32 count). */
#define NDSNN_DEFINE_AVGPOOL(NAME, ELEM_T, SUM_T)                                                      \
    void NAME(const ELEM_T *in, int32_t channels, int32_t plane, float *out)                           \
    {                                                                                                  \
        int32_t c, i;                                                                                  \
        for (c = 0; c < channels; ++c) {                                                               \
            SUM_T sum = 0;                                                                             \
            for (i = 0; i < plane; ++i) {                                                              \
                sum += in[c * plane + i];                                                              \
            }                                                                                          \
            out[c] = (float)sum / (float)plane;                                                        \
        }                                                                                              \
    }

NDSNN_DEFINE_AVGPOOL(ndsnn_avgpool_analog, float, float)
NDSNN_DEFINE_AVGPOOL(ndsnn_avgpool_spikes, uint8_t, int32_t)

void ndsnn_add_analog(const float *a, const float *b, float *out, int32_t count)
{
    int32_t i;
    for (i = 0; i < count; ++i) {
        out[i] = a[i] + b[i];
    }
}

void ndsnn_add_spikes(const float *a, const uint8_t *b, float *out, int32_t count)
{
    int32_t i;
    for (i = 0; i < count; ++i) {
        out[i] = b[i] ? a[i] + 1.0f : a[i];
    }
}

void ndsnn_accumulate(const float *x, float *sum, int32_t count)
{
    int32_t i;
    for (i = 0; i < count; ++i) {
        sum[i] += x[i];
    }
}

int ndsnn_argmax(const float *x, int32_t count)
{
    int32_t i, best = 0;
    for (i = 1; i < count; ++i) {
        if (x[i] > x[best]) {
            best = i;
        }
    }
    return (int)best;
}
