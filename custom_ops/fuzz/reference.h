/*
 * A plain reading of docs/FORMAT.md for the fuzz targets: the node rules ("Validation") and the
 * decoding, written bit by bit and without decoder.h, so that the decoder and the kernel are
 * checked against an independent implementation.
 */

#ifndef OPPASS_FUZZ_REFERENCE_H
#define OPPASS_FUZZ_REFERENCE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* A weight format as the reference knows it. */
typedef struct {
  unsigned bits;        /* b: 0 when the name is no format */
  int64_t own_type;     /* ONNX TensorProto.DataType of the format */
  bool floating_half;   /* bf16 or fp16: FLOAT output allowed too */
  bool is_bf16;
  bool is_float;
  unsigned budget;      /* SEC-DED: most stolen bits a weight may lose */
} ReferenceFormat;

/* The format named exactly by these bytes (bits 0 when there is none). */
ReferenceFormat reference_format(const char *name, size_t length);

/* Index of the check mode named exactly by these bytes in {runtime, load, none}, or -1. */
int reference_check_mode(const char *name, size_t length);

/* Index of the code named exactly by these bytes in {parity, secded}, or -1. */
int reference_code(const char *name, size_t length);

/* True when SEC-DED fits the format in W-bit words (W already valid for it). */
bool reference_secded_fits(ReferenceFormat format, int64_t word_bits);

/* True when range_max is finite and >= 0. */
bool reference_range_max_valid(float range_max);

/* Makes each of the n_words W-bit words of `stream` a SEC-DED codeword: its check bits are replaced
 * by those that its other bits call for (b = weight_bits). */
void reference_secded_encode(unsigned weight_bits, unsigned word_bits, uint8_t *stream, size_t n_words);

bool reference_word_bits_valid(ReferenceFormat format, int64_t word_bits);
bool reference_output_type_valid(ReferenceFormat format, int64_t output_type);

/* True when every dim is >= 0 and their product is below 2**58; *n_weights gets the product. */
bool reference_shape_valid(const int64_t *dims, size_t rank, uint64_t *n_weights);

/* ONNX element type of the packed input for W-bit words. */
int64_t reference_packed_type(unsigned word_bits);

/* Rule 9's escaping of untrusted bytes into `out` (room for 4 * 200 + 4 bytes). */
void reference_escape(const char *bytes, size_t length, char *out);

typedef struct {
  size_t masked;
  size_t corrected;
} ReferenceCounts;

/* Decodes n_weights weights of `format` in W = word_bits words carrying `code` (0 parity, 1 secded)
 * from `stream` (ceil(n_weights * b / W) words) into `out` (4-byte elements when `widen`, else
 * b/8-byte ones). With `check`: parity, a word with an odd number of set bits decodes to zeros;
 * secded, a single flip is corrected and a double one zeroes the word; then with `range`, a weight
 * whose magnitude is not <= range_max is zeroed. SEC-DED's check bits are cleared in every weight. */
ReferenceCounts reference_decode(ReferenceFormat format, unsigned word_bits, bool widen, int code, bool check,
                                 bool range, float range_max, size_t n_weights, const uint8_t *stream, uint8_t *out);

#endif
