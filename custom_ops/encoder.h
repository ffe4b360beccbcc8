/*
 * The oppass weight encoder, the inverse of decoder.h for the parity code, and the conversions and
 * counts the graph pass needs while it encodes: no onnxruntime here. It shares decoder.c's format
 * table and word-size rules (docs/FORMAT.md), and is called from Python through ctypes
 * (oppass/native.py), chunk by chunk of a tensor; the numpy codec (oppass/codec.py) is its
 * reference, and tests/test_native.py checks that both give the same bytes and figures.
 *
 * A chunk is a little-endian stream of n weights of one format (b bits each) cut into W-bit words
 * from its first weight; a chunk of a tensor starts on a word boundary (its first weight's index is
 * a multiple of N = W / b), and only the tensor's last chunk may end inside a word, whose missing
 * weights count as zero padding (as in the packed tensor).
 *
 * Every function returns 0, or -1 when a name or size is not one docs/FORMAT.md defines (nothing is
 * written then). The seam for further codes: each gets its own oppass_encode_<code> beside
 * oppass_encode_parity, using the same format table.
 */

#ifndef OPPASS_ENCODER_H
#define OPPASS_ENCODER_H

#include <stddef.h>
#include <stdint.h>

#define OPPASS_EXPORT __attribute__((visibility("default")))

/* What oppass_encode_parity did to a chunk. */
typedef struct {
  uint64_t changed_words;    /* odd words made even: one weight changed in each */
  uint64_t stuck_words;      /* odd words whose real weights are all infinite: left as they are (an error) */
  uint64_t first_stuck_word; /* the first of those, counted from the chunk's first word (if any) */
  float max_relative_change; /* max |after - before| / |before| in binary32 over changed finite nonzero weights */
} OppassParitySummary;

/* Makes every word of the chunk `weights` (n_weights weights of `format`, in place) even, flipping one
 * bit of one weight per odd word as docs/FORMAT.md ("Opportunistic parity") says for the strategy
 * `flip` ("word-lsb", "largest", "min-error"). When `changed` is not NULL it receives the chunk index
 * of each changed weight, ascending (room for one per word). */
OPPASS_EXPORT int oppass_encode_parity(uint8_t *weights, uint64_t n_weights, const char *format, uint64_t word_bits,
                                       const char *flip, int64_t *changed, OppassParitySummary *summary);

/* Weights of a chunk that are subnormal as judged against `subnormal_threshold` (the magnitude bits, sign
 * cleared, of the smallest normal value of the judging format, rounded into this one: 0 < magnitude <
 * threshold), and non-finite weights. Integer formats have neither. */
typedef struct {
  uint64_t subnormals;
  uint64_t nonfinite;
} OppassWeightCounts;

OPPASS_EXPORT int oppass_count_weights(const uint8_t *weights, uint64_t n_weights, const char *format,
                                       uint64_t subnormal_threshold, OppassWeightCounts *counts);

/* What oppass_convert_fp32 met. Weights it did not convert the way the numpy codec does are counted
 * in `nonfinite_inputs` (NaN and infinities: their bits are left to the caller's reference
 * conversion) and `overflows` (finite weights that round to infinity: an error). The differences are
 * over the finite inputs, exact in binary64. */
typedef struct {
  uint64_t nonfinite_inputs;
  uint64_t overflows;
  double max_difference; /* max |converted - input| */
  double max_magnitude;  /* max |input| */
} OppassConversionSummary;

/* Rounds n_weights binary32 weights to `format` ("bf16" or "fp16"), to nearest, ties to even. */
OPPASS_EXPORT int oppass_convert_fp32(const uint8_t *input, uint8_t *output, uint64_t n_weights, const char *format,
                                      OppassConversionSummary *summary);

#endif
