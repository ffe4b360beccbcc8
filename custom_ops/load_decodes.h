/*
 * Weights decoded at kernel creation (check = load), shared within the process: every node whose
 * packed input is the same buffer, holding the same bytes, decoded under the same plan, gets the
 * one decoded copy, counted by reference. N nodes naming one packed tensor cost one decoded copy,
 * not N (a small file cannot ask for N times its weights).
 */

#ifndef OPPASS_LOAD_DECODES_H
#define OPPASS_LOAD_DECODES_H

#include <stddef.h>
#include <stdint.h>

#include "decoder.h"

typedef struct LoadDecode LoadDecode;

/* The decoded weights (plan->n_weights * plan->output_bytes bytes; read-only, shared) and the
 * counts of words masked and corrected when they were decoded. */
typedef struct {
  const uint8_t *weights;
  int64_t masked;
  int64_t corrected;
} LoadedWeights;

/* The shared decode of `stream` (plan->n_words * plan->word_bytes bytes) under `plan`, decoded now
 * when no live one matches; NULL when out of memory. Each non-NULL result is released once. */
LoadDecode *load_decode_acquire(const DecodePlan *plan, const uint8_t *stream);

LoadedWeights load_decode_weights(const LoadDecode *decode);

/* Drops one reference; the last one frees the decoded weights. NULL is ignored. */
void load_decode_release(LoadDecode *decode);

#endif
