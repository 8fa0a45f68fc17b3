/* ndsnn sparse spiking kernels: portable C99, no heap, no libc: only the freestanding <stdint.h>/<stddef.h>.
 * Generated alongside ndsnn_model.c by `ndsnn export --format c`; the same file for every model. */
#ifndef NDSNN_KERNELS_H
#define NDSNN_KERNELS_H

#include <stddef.h>
#include <stdint.h>

/* One sparse weight as CSR over its 2-D view [rows, in*kh*kw]: row r's weights are entries
 * row_ptr[r] .. row_ptr[r+1]-1. Column indices are one of: int16 (col16) when every column fits, int32
 * (col32), or a uint8 gap stream (gaps) where it is smaller, read sequentially row after row: per weight,
 * n bytes 255 then one byte b < 255, gap = 255 n + b, col = prev + 1 + gap, prev = -1 at each row start.
 * Values are fp32 (values) or int8 (qvalues) with one symmetric scale per row (scales). */
typedef struct {
    int32_t rows;
    const int32_t *row_ptr;
    const int16_t *col16;
    const int32_t *col32;
    const uint8_t *gaps;
    const float *values;
    const int8_t *qvalues;
    const float *scales;
    const float *bias; /* NULL: no bias */
} ndsnn_csr;

/* A convolution's geometry (per sample, CHW). */
typedef struct {
    int32_t in_c, in_h, in_w, out_c, out_h, out_w;
    int32_t kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w;
} ndsnn_conv_geometry;

/* A pooling window's geometry (channels, input and output maps). */
typedef struct {
    int32_t channels, in_h, in_w, out_h, out_w, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w;
} ndsnn_pool_geometry;

/* x[0 .. count-1] = 0 (no <string.h>: the code builds without a C library, e.g. bare arm-none-eabi-gcc). */
void ndsnn_zero(float *x, int32_t count);

/* (x - mean[c]) / std[c] over a CHW image. */
void ndsnn_normalize(const float *image, const float *mean, const float *std, int32_t channels,
                     int32_t plane, float *out);
void ndsnn_normalize_u8(const uint8_t *image, const float *mean, const float *std, int32_t channels,
                        int32_t plane, float *out);

/* Convolution / linear on an analog input (the encoder, or after average pooling): multiply-accumulate. */
void ndsnn_conv_analog(const ndsnn_csr *w, const ndsnn_conv_geometry *g, const float *in, float *out);
void ndsnn_linear_analog(const ndsnn_csr *w, const float *in, float *out);

/* Convolution / linear on a spike map (one byte per neuron, 0 or 1): only the weights of inputs that
 * fired are added, no multiplies. `acc` is an int32 scratch of out_h*out_w entries (int8 weights only). */
void ndsnn_conv_spikes(const ndsnn_csr *w, const ndsnn_conv_geometry *g, const uint8_t *in, float *out,
                       int32_t *acc);
void ndsnn_linear_spikes(const ndsnn_csr *w, const uint8_t *in, float *out);

/* Multi-step LIF, one time step: h = v + (x - v) / tau; spike = h >= v_threshold; v = spike ? 0 : h.
 * x, v and spikes do not overlap. */
void ndsnn_lif(const float *x, float *v, uint8_t *spikes, int32_t count, float tau, float v_threshold);

void ndsnn_maxpool_analog(const ndsnn_pool_geometry *g, const float *in, float *out);
void ndsnn_maxpool_spikes(const ndsnn_pool_geometry *g, const uint8_t *in, uint8_t *out);
void ndsnn_avgpool_analog(const float *in, int32_t channels, int32_t plane, float *out);
void ndsnn_avgpool_spikes(const uint8_t *in, int32_t channels, int32_t plane, float *out);

/* out = a + b (b analog or spikes); out may be a. */
void ndsnn_add_analog(const float *a, const float *b, float *out, int32_t count);
void ndsnn_add_spikes(const float *a, const uint8_t *b, float *out, int32_t count);

void ndsnn_accumulate(const float *x, float *sum, int32_t count);
int ndsnn_argmax(const float *x, int32_t count);

#endif /* NDSNN_KERNELS_H */
