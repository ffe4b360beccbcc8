/*
 * SEC-DED decode in one pass with AVX-512 (F, BW, VL, VBMI and GFNI), for words of 64 to 512 bits
 * (secded_avx512.c). Per block of SECDED_BLOCK_BYTES packed bytes it writes the converted weights
 * (stolen bits cleared, bf16 widened to binary32, range check applied) and, from the same
 * registers, tests every word's syndrome; only a block with a word of syndrome != 0, and the words
 * after the last whole block, go to the word-by-word decode that the caller passes in.
 */

#ifndef OPPASS_SECDED_AVX512_H
#define OPPASS_SECDED_AVX512_H

#include "decoder.h"

/* Packed bytes whose syndromes are tested at once: whole groups of 8 words of up to 512 bits. */
#define SECDED_BLOCK_BYTES 512

/* Outputs of at least this many bytes are written with non-temporal stores. */
#define SECDED_STREAM_BYTES ((size_t)16 << 20)

/* True when this build has the one-pass decode, the CPU runs it and the environment does not turn
 * it off (OPPASS_DECODER_AVX512=0, read on each call: at plan time). */
bool secded_avx512_usable(void);

/* The tables of W = word_bits (64..512) of `code`, writing `output_bytes` bytes of `output`. */
SecdedVectorPlan secded_avx512_plan(const SecdedCode *code, unsigned word_bits, SecdedVectorOutput output,
                                    size_t output_bytes);

/* Decodes the words [first_word, end_word) of a plan whose secded_vector is on, as decode_words
 * does; `fallback` decodes the unclean blocks and the words past the last whole block. */
typedef DecodeCounts (*WordRangeDecoder)(const DecodePlan *plan, const uint8_t *stream, uint8_t *out,
                                         size_t first_word, size_t end_word);
DecodeCounts secded_avx512_decode(const DecodePlan *plan, const uint8_t *stream, uint8_t *out, size_t first_word,
                                  size_t end_word, WordRangeDecoder fallback);

#endif
