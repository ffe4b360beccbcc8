/*
 * Exhaustive SEC-DED check of the decoder (decoder.h) against the reference (reference.h): for
 * every format and word size where SEC-DED fits, a stream of one scan block (256 bytes; 512 for the
 * one-pass AVX-512 decode of W >= 64) and one padded word more, made codewords by reference_secded_encode (random data, and all-zero and
 * all-one data), is decoded with every single flip (each must be corrected: the decode equals the
 * fault-free one bit for bit, one corrected word) and, for the random data, every double flip in
 * its first and last words (each must mask its word: zeros, one masked word, the other words kept), in every
 * output type, with and without the range check; each decode with a single flip, and every 7th
 * with a double flip, must also equal reference_decode's. All of it twice: with the one-pass
 * AVX-512 decode where the CPU has it, and with it turned off (OPPASS_DECODER_AVX512=0). Exits 1
 * on the first disagreement, naming it; prints what it checked otherwise.
 *
 * Built with the fuzz targets (build.sh); run by tests/test_fuzz.py.
 */

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../decoder.h"
#include "../secded_avx512.h"
#include "reference.h"

#define FAIL(...)                             \
  do {                                        \
    fprintf(stderr, "mismatch: " __VA_ARGS__); \
    fprintf(stderr, "\n");                    \
    exit(1);                                  \
  } while (0)

/* Words of a stream: a block of the decoder's block scan (256 bytes, or SECDED_BLOCK_BYTES for the
 * one-pass decode) and one word more, which ends in padding; single flips go everywhere, double
 * flips into the first and the last word. */
#define SCAN_BLOCK_BYTES 256
#define STREAM_BYTES (SECDED_BLOCK_BYTES + MAX_WORD_BITS / 8)

static uint64_t splitmix(uint64_t *state) {
  uint64_t z = (*state += 0x9E3779B97F4A7C15u);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9u;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBu;
  return z ^ (z >> 31);
}

typedef struct {
  const WeightFormat *format;
  unsigned word_bits;
  OnnxType output_type;
  bool range;
  float range_max;
  size_t block_bytes; /* of the scan the stream is made for */
  size_t n_weights;
  DecodePlan plan;
  ReferenceFormat reference;
  size_t out_bytes;
} Setup;

/* Decodes `stream` with the decoder and the reference; they must agree. Returns the decoder's counts. */
static DecodeCounts decode_both(const Setup *setup, const uint8_t *stream, uint8_t *out, uint8_t *expected,
                                const char *what, unsigned first, unsigned second) {
  memset(out, 0xA5, setup->out_bytes);
  DecodeCounts counts = decode_words(&setup->plan, stream, out, 0, setup->plan.n_words);
  ReferenceCounts wanted = reference_decode(setup->reference, setup->word_bits, setup->plan.widen != NULL, 1, true,
                                            setup->range, setup->range_max, setup->n_weights, stream, expected);
  if (counts.masked != wanted.masked || counts.corrected != wanted.corrected ||
      memcmp(out, expected, setup->out_bytes) != 0) {
    FAIL("%s %s W=%u output %d range %d: flips at %u and %u disagree with the reference", what, setup->format->name,
         setup->word_bits, (int)setup->output_type, setup->range, first, second);
  }
  return counts;
}

static void check_layout(Setup *setup, uint64_t *seed, size_t *decodes) {
  size_t word_bytes = setup->word_bits / 8;
  size_t words = setup->block_bytes / word_bytes + 1;
  size_t stream_bytes = words * word_bytes;
  uint8_t stream[STREAM_BYTES];
  uint8_t faulty[STREAM_BYTES];
  size_t per_word = setup->word_bits / setup->format->bits;
  setup->n_weights = words * per_word - (per_word > 1); /* the last word has a padding weight when it can */
  setup->plan = plan_decode(setup->format, setup->word_bits, setup->output_type, CODE_SECDED, true, setup->range,
                            setup->range_max, setup->n_weights);
  setup->reference = reference_format(setup->format->name, strlen(setup->format->name));
  setup->out_bytes = setup->n_weights * setup->plan.output_bytes;
  uint8_t *clean = malloc(setup->out_bytes);
  uint8_t *out = malloc(setup->out_bytes);
  uint8_t *expected = malloc(setup->out_bytes);
  for (int pattern = 0; pattern < 3; pattern++) {
    for (size_t i = 0; i < stream_bytes; i++) {
      stream[i] = pattern == 0 ? 0 : pattern == 1 ? 0xFF : (uint8_t)splitmix(seed);
    }
    /* padding weights are zero codes */
    size_t real_bytes = setup->n_weights * setup->format->bits / 8;
    memset(stream + real_bytes, 0, stream_bytes - real_bytes);
    reference_secded_encode(setup->format->bits, setup->word_bits, stream, words);
    DecodeCounts counts = decode_both(setup, stream, clean, expected, "clean", 0, 0);
    (*decodes)++;
    if (counts.masked != 0 || counts.corrected != 0) {
      FAIL("a codeword is not clean (%s W=%u)", setup->format->name, setup->word_bits);
    }
    memcpy(clean, expected, setup->out_bytes);
    for (unsigned first = 0; first < setup->word_bits * words; first++) {
      memcpy(faulty, stream, stream_bytes);
      faulty[first / 8] ^= (uint8_t)(1u << (first % 8));
      counts = decode_both(setup, faulty, out, expected, "single", first, first);
      (*decodes)++;
      if (counts.corrected != 1 || counts.masked != 0 || memcmp(out, clean, setup->out_bytes) != 0) {
        FAIL("single flip at %u not corrected (%s W=%u)", first, setup->format->name, setup->word_bits);
      }
      unsigned word = first / setup->word_bits;
      if ((word != 0 && word != words - 1) || pattern != 2) { /* doubles: random data only */
        continue;
      }
      for (unsigned second = first + 1; second < (word + 1) * setup->word_bits; second++) {
        faulty[second / 8] ^= (uint8_t)(1u << (second % 8));
        if ((first + second) % 7 == 0) { /* the reference is slow: every 7th pair */
          counts = decode_both(setup, faulty, out, expected, "double", first, second);
        } else {
          memset(out, 0xA5, setup->out_bytes);
          counts = decode_words(&setup->plan, faulty, out, 0, setup->plan.n_words);
        }
        (*decodes)++;
        faulty[second / 8] ^= (uint8_t)(1u << (second % 8));
        size_t first_weight = word * per_word;
        size_t weights = setup->n_weights - first_weight < per_word ? setup->n_weights - first_weight : per_word;
        size_t element = setup->plan.output_bytes;
        bool zeroed = true;
        for (size_t i = first_weight * element; i < (first_weight + weights) * element; i++) {
          zeroed &= out[i] == 0;
        }
        size_t end = (first_weight + weights) * element;
        bool others_kept = memcmp(out, clean, first_weight * element) == 0 &&
                           memcmp(out + end, clean + end, setup->out_bytes - end) == 0;
        if (counts.masked != 1 || counts.corrected != 0 || !zeroed || !others_kept) {
          FAIL("double flip at %u and %u not masked (%s W=%u)", first, second, setup->format->name, setup->word_bits);
        }
      }
    }
  }
  free(clean);
  free(out);
  free(expected);
}

int main(void) {
  uint64_t seed = 12;
  size_t decodes = 0;
  size_t layouts = 0;
  size_t one_pass = 0;
  for (int path = 0; path < 2; path++) {
    setenv("OPPASS_DECODER_AVX512", path == 0 ? "1" : "0", 1); /* read by plan_decode */
    for (size_t f = 0; f < WEIGHT_FORMAT_COUNT; f++) {
      const WeightFormat *format = &WEIGHT_FORMATS[f];
      for (unsigned width = 8; width <= MAX_WORD_BITS; width *= 2) {
        if (!word_bits_allowed(format, width) || !secded_fits(format, width)) {
          continue;
        }
        OnnxType output_types[2] = {format->own_type, ONNX_TYPE_FLOAT};
        for (int widened = 0; widened <= (int)format->widens_to_float; widened++) {
          for (int range = 0; range < 2; range++) {
            size_t block_bytes = path == 0 && width >= 64 ? SECDED_BLOCK_BYTES : SCAN_BLOCK_BYTES;
            Setup setup = {format, width, output_types[widened], range == 1, 0.75f, block_bytes, 0, {0}, {0}, 0};
            check_layout(&setup, &seed, &decodes);
            layouts++;
            one_pass += setup.plan.secded_vector.on;
          }
        }
      }
    }
  }
  printf("exhaustive SEC-DED: %zu layouts (%zu through the one-pass AVX-512 decode), %zu decodes agree (every "
         "single flip corrected, every double masked)\n",
         layouts, one_pass, decodes);
  return 0;
}
