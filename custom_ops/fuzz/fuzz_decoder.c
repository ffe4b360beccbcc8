/*
 * libFuzzer target on the decoder alone (decoder.h), no onnxruntime: the fuzz input picks a
 * format, word size, code (parity, or secded where it fits), output widening, check, range check
 * and its bound, and weight count, a packed stream (raw fuzz bytes, or clean words, even-parity
 * ones or SEC-DED codewords, with a few flipped bits so that the scan's clean-block fast path and
 * its slow path, SEC-DED's corrections and maskings are all reached), and how the words are split
 * into ranges decoded in any order. Every range goes through decode_words into one exactly sized
 * output, which must equal reference_decode's bit for bit, with the same masked and corrected
 * counts. The attribute rules (format names, word sizes, output types, shapes, where SEC-DED fits,
 * range_max values) are checked against the reference too. Parity plans that output the stored
 * weights as they are (no widening, no range check) are also scanned in place
 * (mask_words_in_place) on a copy of the stream, which must end up equal to the decode, a stream
 * with no odd word in read-only memory. A mismatch aborts.
 *
 * Build and run: custom_ops/fuzz/build.sh, then build/fuzz/fuzz_decoder (see README.md).
 */

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "../decoder.h"
#include "reference.h"

typedef struct {
  const uint8_t *data;
  size_t size;
} Bytes;

static uint8_t take(Bytes *bytes) {
  if (bytes->size == 0) {
    return 0;
  }
  bytes->size--;
  return *bytes->data++;
}

static uint64_t take_u64(Bytes *bytes, unsigned count) {
  uint64_t value = 0;
  for (unsigned i = 0; i < count; i++) {
    value |= (uint64_t)take(bytes) << (8 * i);
  }
  return value;
}

#define REQUIRE(condition, ...)                                   \
  do {                                                            \
    if (!(condition)) {                                           \
      fprintf(stderr, "mismatch: " __VA_ARGS__);                  \
      fprintf(stderr, " (%s:%d: %s)\n", __FILE__, __LINE__, #condition); \
      abort();                                                    \
    }                                                             \
  } while (0)

static uint64_t splitmix(uint64_t *state) {
  uint64_t z = (*state += 0x9E3779B97F4A7C15u);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9u;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBu;
  return z ^ (z >> 31);
}

/* ---------------------------------------------------------------- rules */

static const char *const NAME_CHOICES[] = {"fp32", "bf16", "fp16", "int8", "uint8", "FP32", "fp32 ", "fp3", "uint", ""};
static const int64_t INT_CHOICES[] = {0, 1, 2, 3, 8, 10, 16, 24, 32, 64, 128, 256, 512, 1024, -64, INT64_MAX, INT64_MIN};
static const int64_t DIM_CHOICES[] = {0, 1, 2, 3, 7, 64, 1 << 20, (int64_t)1 << 29, (int64_t)1 << 31,
                                      ((int64_t)1 << 58) - 1, (int64_t)1 << 58, (int64_t)1 << 62, INT64_MAX, -1,
                                      INT64_MIN};
static const float RANGE_CHOICES[] = {0.0f, -0.0f, 1.0f, 0.5f, 3.0f, 127.0f, 127.5f, 128.0f, 254.9f, 255.0f, 256.0f,
                                      65504.0f, 65519.0f, 65520.0f, 1e-7f, 6e-8f, 1e-40f, 3.4028235e38f, 1e30f,
                                      -1.0f, -1e-40f, INFINITY, -INFINITY, NAN};
#define CHOOSE(array, byte) (array)[(byte) % (sizeof(array) / sizeof((array)[0]))]

static float take_float(Bytes *bytes) {
  if (take(bytes) & 1) {
    return CHOOSE(RANGE_CHOICES, take(bytes));
  }
  uint32_t bits = (uint32_t)take_u64(bytes, 4);
  float value;
  memcpy(&value, &bits, sizeof value);
  return value;
}

/* find_weight_format, word_bits_allowed, output_type_allowed and count_weights against the reference. */
static void check_rules(Bytes *bytes) {
  char name[16];
  size_t length = take(bytes) % sizeof name;
  if (take(bytes) & 1) {
    const char *choice = CHOOSE(NAME_CHOICES, take(bytes));
    length = strlen(choice) + (take(bytes) & 1); /* sometimes with a trailing NUL byte */
    memset(name, 0, sizeof name);
    memcpy(name, choice, strlen(choice));
  } else {
    for (size_t i = 0; i < length; i++) {
      name[i] = (char)take(bytes);
    }
  }
  const WeightFormat *format = find_weight_format(name, length);
  ReferenceFormat expected = reference_format(name, length);
  REQUIRE((format != NULL) == (expected.bits != 0), "format name of %zu bytes", length);
  if (format != NULL) {
    REQUIRE(format->bits == expected.bits && format->own_type == expected.own_type &&
                format->widens_to_float == expected.floating_half,
            "format %s", format->name);
    int64_t value = take(bytes) & 1 ? CHOOSE(INT_CHOICES, take(bytes)) : (int64_t)take_u64(bytes, 8);
    REQUIRE(word_bits_allowed(format, value) == reference_word_bits_valid(expected, value), "word_bits %lld",
            (long long)value);
    REQUIRE(output_type_allowed(format, value) == reference_output_type_valid(expected, value), "output_type %lld",
            (long long)value);
    for (int64_t type = -2; type < 20; type++) {
      REQUIRE(output_type_allowed(format, type) == reference_output_type_valid(expected, type), "output_type %lld",
              (long long)type);
    }
    for (unsigned width = 8; width <= MAX_WORD_BITS; width *= 2) {
      if (word_bits_allowed(format, width)) {
        REQUIRE(secded_fits(format, width) == reference_secded_fits(expected, width), "secded fits %s W=%u",
                format->name, width);
      }
    }
  }
  float range_max = take_float(bytes);
  REQUIRE(range_max_allowed(range_max) == reference_range_max_valid(range_max), "range_max %g", (double)range_max);
  int64_t dims[6];
  size_t rank = take(bytes) % 7;
  for (size_t i = 0; i < rank; i++) {
    dims[i] = take(bytes) & 1 ? CHOOSE(DIM_CHOICES, take(bytes)) : (int64_t)take(bytes);
  }
  size_t n_weights = 0;
  size_t axis = 0;
  uint64_t expected_weights = 0;
  ShapeVerdict verdict = count_weights(dims, rank, &n_weights, &axis);
  bool valid = reference_shape_valid(dims, rank, &expected_weights);
  REQUIRE((verdict == SHAPE_VALID) == valid, "shape of rank %zu", rank);
  if (valid) {
    REQUIRE(n_weights == expected_weights, "weight count %zu", n_weights);
  } else if (verdict == SHAPE_NEGATIVE_DIM) {
    REQUIRE(axis < rank && dims[axis] < 0, "negative axis %zu", axis);
    for (size_t i = 0; i < axis; i++) {
      REQUIRE(dims[i] >= 0, "first negative axis %zu", axis);
    }
  } else {
    for (size_t i = 0; i < rank; i++) {
      REQUIRE(dims[i] >= 0, "a negative dim is reported as too large");
    }
  }
}

/* ---------------------------------------------------------------- decoding */

/* Fills a stream of n_words words: raw fuzz bytes, or clean words (SEC-DED codewords with
 * `secded`, else words of even parity) with some bits flipped: one by one, or two in one word. */
static void fill_stream(Bytes *bytes, uint8_t *stream, size_t n_words, size_t word_bytes, unsigned weight_bits,
                        bool secded) {
  size_t total = n_words * word_bytes;
  if (take(bytes) & 1) {
    for (size_t i = 0; i < total; i++) {
      stream[i] = bytes->size != 0 ? take(bytes) : (uint8_t)(i * 131);
    }
    return;
  }
  uint64_t state = take_u64(bytes, 8);
  for (size_t i = 0; i < total; i++) {
    stream[i] = (uint8_t)splitmix(&state);
  }
  if (secded) {
    reference_secded_encode(weight_bits, (unsigned)word_bytes * 8, stream, n_words);
  } else {
    for (size_t word = 0; word < n_words; word++) {
      unsigned ones = 0;
      for (size_t i = word * word_bytes; i < (word + 1) * word_bytes; i++) {
        ones += (unsigned)__builtin_popcount(stream[i]);
      }
      stream[word * word_bytes] ^= (uint8_t)(ones & 1);
    }
  }
  size_t pairs = take(bytes) % 4;
  for (size_t i = 0; i < pairs && total != 0; i++) { /* two flips in one word */
    size_t word = (size_t)take_u64(bytes, 3) % n_words;
    uint64_t first = take_u64(bytes, 2) % (word_bytes * 8);
    uint64_t second = (first + 1 + take_u64(bytes, 2) % (word_bytes * 8 - 1)) % (word_bytes * 8);
    stream[word * word_bytes + first / 8] ^= (uint8_t)(1u << (first % 8));
    stream[word * word_bytes + second / 8] ^= (uint8_t)(1u << (second % 8));
  }
  size_t flips = take(bytes) % 16;
  for (size_t i = 0; i < flips && total != 0; i++) {
    uint64_t bit = take_u64(bytes, 3) % (total * 8);
    stream[bit / 8] ^= (uint8_t)(1u << (bit % 8));
  }
}

static int compare_words(const void *a, const void *b) {
  size_t x = *(const size_t *)a;
  size_t y = *(const size_t *)b;
  return (x > y) - (x < y);
}

/* mask_words_in_place over the same ranges, on a page-aligned copy of the stream: its weights must
 * equal the decode's, with the same masked count; a stream with no odd word is scanned read-only
 * (PROT_READ), so that a write to a clean word faults. */
static void check_in_place(const DecodePlan *plan, const uint8_t *stream, size_t stream_bytes, const uint8_t *expected,
                           size_t out_bytes, size_t wanted_masked, const size_t *cuts, size_t n_cuts, bool backwards) {
  size_t page = (size_t)sysconf(_SC_PAGESIZE);
  size_t mapped = (stream_bytes + page - 1) / page * page + page;
  uint8_t *words = mmap(NULL, mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  REQUIRE(words != MAP_FAILED, "mmap of %zu bytes", mapped);
  if (stream_bytes != 0) {
    memcpy(words, stream, stream_bytes);
  }
  bool read_only = wanted_masked == 0;
  REQUIRE(!read_only || mprotect(words, mapped, PROT_READ) == 0, "mprotect");
  size_t masked = 0;
  for (size_t i = 0; i <= n_cuts; i++) {
    size_t part = backwards ? n_cuts - i : i;
    masked += mask_words_in_place(plan, words, cuts[part], cuts[part + 1]);
  }
  REQUIRE(masked == wanted_masked, "in place: masked %zu, expected %zu", masked, wanted_masked);
  REQUIRE(out_bytes == 0 || memcmp(words, expected, out_bytes) == 0, "in place: the weights differ from the decode");
  munmap(words, mapped);
}

static void check_decoding(Bytes *bytes) {
  const WeightFormat *format = &WEIGHT_FORMATS[take(bytes) % WEIGHT_FORMAT_COUNT];
  unsigned allowed[8];
  size_t n_allowed = 0;
  for (unsigned w = 8; w <= MAX_WORD_BITS; w *= 2) {
    if (word_bits_allowed(format, w)) {
      allowed[n_allowed++] = w;
    }
  }
  unsigned word_bits = allowed[take(bytes) % n_allowed];
  uint8_t flags = take(bytes);
  bool widen = format->widens_to_float && (flags & 1);
  bool check = flags & 2;
  bool secded = (flags & 8) && secded_fits(format, word_bits);
  bool range = flags & 16;
  float range_max = fabsf(take_float(bytes));
  if (!range_max_allowed(range_max)) {
    range_max = 3.0f;
  }
  OnnxType output_type = widen ? ONNX_TYPE_FLOAT : format->own_type;
  size_t n_weights = (size_t)take_u64(bytes, 2) % (flags & 4 ? 20000 : 300);
  DecodePlan plan = plan_decode(format, word_bits, output_type, secded ? CODE_SECDED : CODE_PARITY, check, range,
                                range_max, n_weights);
  size_t per_word = word_bits / format->bits;
  REQUIRE(plan.n_words == (n_weights + per_word - 1) / per_word, "n_words %zu", plan.n_words);
  REQUIRE(plan.word_bytes == word_bits / 8 && plan.weights_per_word == per_word, "word layout");
  REQUIRE(plan.lanes == (word_bits >= 64 ? word_bits / 64 : 1), "lanes %zu", plan.lanes);
  REQUIRE((int64_t)plan.packed_type == reference_packed_type(word_bits), "packed type %d", (int)plan.packed_type);
  REQUIRE(plan.output_bytes == (widen ? 4 : format->bits / 8), "output bytes %zu", plan.output_bytes);

  size_t stream_bytes = plan.n_words * plan.word_bytes;
  size_t out_bytes = n_weights * plan.output_bytes;
  uint8_t *stream = malloc(stream_bytes != 0 ? stream_bytes : 1);
  uint8_t *out = malloc(out_bytes != 0 ? out_bytes : 1);
  uint8_t *expected = malloc(out_bytes != 0 ? out_bytes : 1);
  fill_stream(bytes, stream, plan.n_words, plan.word_bytes, format->bits, secded);
  memset(out, 0xA5, out_bytes); /* every byte must be written */

  /* Cut [0, n_words) at up to 8 points; decode the ranges forwards or backwards. */
  size_t cuts[10];
  size_t n_cuts = take(bytes) % 9;
  cuts[0] = 0;
  for (size_t i = 1; i <= n_cuts; i++) {
    cuts[i] = plan.n_words != 0 ? (size_t)take_u64(bytes, 3) % (plan.n_words + 1) : 0;
  }
  cuts[n_cuts + 1] = plan.n_words;
  qsort(cuts, n_cuts + 2, sizeof cuts[0], compare_words);
  bool backwards = take(bytes) & 1;
  size_t masked = 0;
  size_t corrected = 0;
  for (size_t i = 0; i <= n_cuts; i++) {
    size_t part = backwards ? n_cuts - i : i;
    DecodeCounts counts = decode_words(&plan, stream, out, cuts[part], cuts[part + 1]);
    masked += counts.masked;
    corrected += counts.corrected;
  }
  ReferenceCounts wanted = reference_decode(reference_format(format->name, strlen(format->name)), word_bits, widen,
                                            secded, check, range, range_max, n_weights, stream, expected);
  REQUIRE(masked == wanted.masked && corrected == wanted.corrected,
          "masked %zu corrected %zu, expected %zu and %zu (%s, W=%u, secded %d)", masked, corrected, wanted.masked,
          wanted.corrected, format->name, word_bits, secded);
  for (size_t i = 0; i < out_bytes; i++) {
    REQUIRE(out[i] == expected[i], "output byte %zu (%s, W=%u, widen %d, check %d, secded %d, range %d <= %g)", i,
            format->name, word_bits, widen, check, secded, range, (double)range_max);
  }
  if (check && !secded && !range && !widen) {
    check_in_place(&plan, stream, stream_bytes, expected, out_bytes, wanted.masked, cuts, n_cuts, backwards);
  }
  free(stream);
  free(out);
  free(expected);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  Bytes bytes = {data, size};
  check_rules(&bytes);
  check_decoding(&bytes);
  return 0;
}
