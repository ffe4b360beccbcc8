/*
 * The oppass weight encoder (encoder.h): parity adjustment, fp32 -> bf16/fp16 rounding, weight
 * counts. Formats and word sizes are decoder.c's table and rules.
 */

#include "encoder.h"

#include <math.h>
#include <stdbool.h>
#include <string.h>

#include "decoder.h"

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
#define TARGET_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define TARGET_CLONES
#endif
#define ALWAYS_INLINE inline __attribute__((always_inline))

/* The flip strategies of docs/FORMAT.md, in oppass.formats.FLIP_STRATEGIES order. */
typedef enum { FLIP_WORD_LSB, FLIP_LARGEST, FLIP_MIN_ERROR } FlipStrategy;
static const char *const FLIP_NAMES[] = {"word-lsb", "largest", "min-error"};

/* A format's code fields: what the parity rules look at in a weight's bits. */
typedef struct {
  unsigned bytes;
  bool is_float;
  bool is_signed;          /* int8 (integer formats only) */
  unsigned mantissa_bits;  /* floats only, and the masks below */
  uint32_t magnitude_mask; /* every bit but the sign */
  uint32_t infinity;       /* magnitude bits of infinity */
  uint32_t sign_bit;
  uint32_t mantissa_mask;
} CodeFields;

static const WeightFormat *format_named(const char *name) {
  return name == NULL ? NULL : find_weight_format(name, strlen(name));
}

static CodeFields code_fields(const WeightFormat *format) {
  CodeFields fields = {.bytes = format->bits / 8};
  unsigned exponent_bits = 0;
  switch (format->own_type) {
    case ONNX_TYPE_FLOAT: fields.mantissa_bits = 23; exponent_bits = 8; break;
    case ONNX_TYPE_BFLOAT16: fields.mantissa_bits = 7; exponent_bits = 8; break;
    case ONNX_TYPE_FLOAT16: fields.mantissa_bits = 10; exponent_bits = 5; break;
    case ONNX_TYPE_INT8: fields.is_signed = true; break;
    default: break;
  }
  fields.is_float = exponent_bits != 0;
  if (fields.is_float) {
    fields.sign_bit = UINT32_C(1) << (format->bits - 1);
    fields.magnitude_mask = fields.sign_bit - 1;
    fields.mantissa_mask = (UINT32_C(1) << fields.mantissa_bits) - 1;
    fields.infinity = ((UINT32_C(1) << exponent_bits) - 1) << fields.mantissa_bits;
  }
  return fields;
}

static ALWAYS_INLINE uint32_t load_code(const uint8_t *at, unsigned bytes) {
  if (bytes == 1) {
    return at[0];
  }
  if (bytes == 2) {
    uint16_t code;
    memcpy(&code, at, sizeof code);
    return code;
  }
  uint32_t code;
  memcpy(&code, at, sizeof code);
  return code;
}

static ALWAYS_INLINE void store_code(uint8_t *at, unsigned bytes, uint32_t code) {
  if (bytes == 1) {
    at[0] = (uint8_t)code;
  } else if (bytes == 2) {
    uint16_t half = (uint16_t)code;
    memcpy(at, &half, sizeof half);
  } else {
    memcpy(at, &code, sizeof code);
  }
}

/* The binary32 bits of a finite fp16 code's value, exactly. */
static ALWAYS_INLINE uint32_t fp16_bits(uint32_t code) {
  uint32_t exponent = (code >> 10) & 0x1Fu;
  float subnormal = (float)(code & 0x3FFu) * 0x1p-24f; /* exact */
  uint32_t subnormal_bits;
  memcpy(&subnormal_bits, &subnormal, sizeof subnormal_bits);
  uint32_t normal_bits = ((exponent + 112) << 23) | ((code & 0x3FFu) << 13);
  return (exponent != 0 ? normal_bits : subnormal_bits) | (code & 0x8000u) << 16;
}

/* The value of a finite fp16 code, exactly, as binary32. */
static ALWAYS_INLINE float fp16_value(uint32_t code) {
  uint32_t single = fp16_bits(code);
  float value;
  memcpy(&value, &single, sizeof value);
  return value;
}

/* The value of a finite code, exactly, as binary32 (every format's values are binary32 values). */
static float code_value(uint32_t code, const CodeFields *fields) {
  if (!fields->is_float) {
    return fields->is_signed ? (float)(int8_t)code : (float)code;
  }
  float value;
  if (fields->bytes == 4) {
    memcpy(&value, &code, sizeof value);
    return value;
  }
  if (fields->mantissa_bits == 7) { /* bf16: the high half of a binary32 */
    uint32_t single = code << 16;
    memcpy(&value, &single, sizeof value);
    return value;
  }
  return fp16_value(code);
}

/* The strategy's rank of a candidate weight, where a larger rank is preferred (ties: lowest column). */
static ALWAYS_INLINE int64_t preference(uint32_t code, const CodeFields *fields, FlipStrategy flip) {
  if (flip == FLIP_WORD_LSB) {
    return 0;
  }
  if (!fields->is_float) { /* an integer's LSB flip changes it by 1 whatever it is: min-error ties */
    if (flip == FLIP_MIN_ERROR) {
      return 0;
    }
    int64_t value = fields->is_signed ? (int64_t)(int8_t)code : (int64_t)code;
    return value < 0 ? -value : value;
  }
  uint32_t magnitude = code & fields->magnitude_mask;
  if (flip == FLIP_LARGEST) { /* the magnitude bits order like |value|; every NaN ranks just above infinity */
    return magnitude < fields->infinity + 1 ? magnitude : fields->infinity + 1;
  }
  /* min-error: an LSB flip changes a float by 2^(max(exponent field, 1) - bias - mantissa bits) */
  uint32_t exponent = magnitude >> fields->mantissa_bits;
  return -(int64_t)(exponent > 1 ? exponent : 1);
}

typedef struct {
  CodeFields fields;
  FlipStrategy flip;
  int64_t *changed;
  OppassParitySummary *summary;
} ParityEncoding;

/* Whether a word of `word_bytes` bytes has odd parity (the XOR of all its bits is 1). */
static ALWAYS_INLINE bool word_is_odd(const uint8_t *word, size_t word_bytes) {
  if (word_bytes < 8) {
    return __builtin_parity(load_code(word, (unsigned)word_bytes));
  }
  uint64_t folded = 0;
  for (size_t lane = 0; lane < word_bytes / 8; lane++) {
    uint64_t bits;
    memcpy(&bits, word + 8 * lane, sizeof bits);
    folded ^= bits;
  }
  return __builtin_parityll(folded);
}

/* The column of the weight an odd word changes and the bit to flip in it; false when there is none (a
 * word of only infinities). `count` real weights, the rest of the word is zero padding. Branch-free
 * but for the rare cases (a zero, an infinity, a NaN). */
static ALWAYS_INLINE bool choose_flip(const ParityEncoding *encoding, const uint8_t *word, size_t count,
                                      unsigned bytes, size_t *column, uint32_t *bit) {
  const CodeFields *fields = &encoding->fields;
  size_t chosen = SIZE_MAX;
  int64_t best = INT64_MIN;
  *bit = 1;
  for (size_t i = 0; i < count; i++) {
    uint32_t code = load_code(word + i * bytes, bytes);
    if (fields->is_float) {
      uint32_t magnitude = code & fields->magnitude_mask;
      if (__builtin_expect(magnitude == 0, 0)) { /* a zero's sign bit first: it stays a zero */
        *column = i;
        *bit = fields->sign_bit;
        return true;
      }
      code = magnitude;
    }
    /* never an infinity: it ranks below every candidate, and is never chosen */
    int64_t rank = fields->is_float && code == fields->infinity ? INT64_MIN : preference(code, fields, encoding->flip);
    bool better = rank > best;
    chosen = better ? i : chosen;
    best = better ? rank : best;
    if (encoding->flip == FLIP_WORD_LSB && !fields->is_float) {
      break; /* an integer's first weight */
    }
  }
  if (__builtin_expect(chosen == SIZE_MAX, 0)) {
    return false;
  }
  *column = chosen;
  uint32_t code = load_code(word + chosen * bytes, bytes);
  if (fields->is_float && __builtin_expect((code & fields->magnitude_mask) > fields->infinity, 0) &&
      (code & fields->mantissa_mask) == 1) {
    *bit = 2; /* a NaN whose LSB flip would make it infinite */
  }
  return true;
}

/* Makes the odd word `word_index` even. */
static ALWAYS_INLINE void adjust_word(ParityEncoding *encoding, uint8_t *word, uint64_t word_index, size_t per_word,
                                      size_t count, unsigned bytes) {
  OppassParitySummary *summary = encoding->summary;
  size_t column;
  uint32_t bit;
  if (!choose_flip(encoding, word, count, bytes, &column, &bit)) {
    if (summary->stuck_words++ == 0) {
      summary->first_stuck_word = word_index;
    }
    return;
  }
  const CodeFields *fields = &encoding->fields;
  uint8_t *at = word + column * bytes;
  uint32_t before = load_code(at, bytes);
  uint32_t after = before ^ bit;
  store_code(at, bytes, after);
  if (encoding->changed != NULL) {
    encoding->changed[summary->changed_words] = (int64_t)(word_index * per_word + column);
  }
  summary->changed_words++;
  uint32_t magnitude = before & fields->magnitude_mask;
  bool considered = fields->is_float ? magnitude != 0 && magnitude < fields->infinity : before != 0;
  if (__builtin_expect(considered, 1)) {
    float old_value = code_value(before, fields);
    float change = fabsf(code_value(after, fields) - old_value) / fabsf(old_value);
    summary->max_relative_change = change > summary->max_relative_change ? change : summary->max_relative_change;
  }
}

/* Every word of the chunk; inlined per (bytes, per_word) so that the word loops unroll. The parities of
 * 64 words are taken at once, then only the odd ones are visited. */
static ALWAYS_INLINE void encode_chunk_with(ParityEncoding *encoding, uint8_t *weights, uint64_t n_weights,
                                            unsigned bytes, size_t per_word) {
  uint64_t whole_words = n_weights / per_word;
  size_t word_bytes = per_word * bytes;
  for (uint64_t block = 0; block < whole_words; block += 64) {
    size_t count = whole_words - block < 64 ? (size_t)(whole_words - block) : 64;
    uint8_t *base = weights + block * word_bytes;
    uint64_t odd = 0;
    for (size_t i = 0; i < count; i++) {
      odd |= (uint64_t)word_is_odd(base + i * word_bytes, word_bytes) << i;
    }
    for (; odd != 0; odd &= odd - 1) {
      size_t i = (size_t)__builtin_ctzll(odd);
      adjust_word(encoding, base + i * word_bytes, block + i, per_word, per_word, bytes);
    }
  }
  size_t tail = (size_t)(n_weights - whole_words * per_word);
  if (tail != 0) {
    uint8_t *word = weights + whole_words * word_bytes;
    uint32_t folded = 0;
    for (size_t i = 0; i < tail; i++) {
      folded ^= load_code(word + i * bytes, bytes);
    }
    if (__builtin_parity(folded)) {
      adjust_word(encoding, word, whole_words, per_word, tail, bytes);
    }
  }
}

#define ENCODE_CASE(bytes, per_word)                                            \
  case (bytes) * 1000 + (per_word):                                             \
    encode_chunk_with(encoding, weights, n_weights, (bytes), (per_word));       \
    return

TARGET_CLONES static void encode_chunk(ParityEncoding *encoding, uint8_t *weights, uint64_t n_weights,
                                       size_t per_word) {
  switch (encoding->fields.bytes * 1000 + per_word) {
    ENCODE_CASE(4, 1); ENCODE_CASE(4, 2); ENCODE_CASE(4, 4); ENCODE_CASE(4, 8); ENCODE_CASE(4, 16);
    ENCODE_CASE(2, 1); ENCODE_CASE(2, 2); ENCODE_CASE(2, 4); ENCODE_CASE(2, 8); ENCODE_CASE(2, 16);
    ENCODE_CASE(2, 32);
    ENCODE_CASE(1, 1); ENCODE_CASE(1, 2); ENCODE_CASE(1, 4); ENCODE_CASE(1, 8); ENCODE_CASE(1, 16);
    ENCODE_CASE(1, 32); ENCODE_CASE(1, 64);
    default: return; /* no other (b, N) pair passes word_bits_allowed */
  }
}

int oppass_encode_parity(uint8_t *weights, uint64_t n_weights, const char *format, uint64_t word_bits,
                         const char *flip, int64_t *changed, OppassParitySummary *summary) {
  const WeightFormat *weight_format = format_named(format);
  if (weight_format == NULL || word_bits > MAX_WORD_BITS || !word_bits_allowed(weight_format, (int64_t)word_bits) ||
      flip == NULL || summary == NULL || n_weights >= WEIGHT_COUNT_LIMIT || (n_weights != 0 && weights == NULL)) {
    return -1;
  }
  ParityEncoding encoding = {.fields = code_fields(weight_format), .changed = changed, .summary = summary};
  size_t strategies = sizeof FLIP_NAMES / sizeof FLIP_NAMES[0];
  size_t strategy = 0;
  while (strategy < strategies && strcmp(FLIP_NAMES[strategy], flip) != 0) {
    strategy++;
  }
  if (strategy == strategies) {
    return -1;
  }
  encoding.flip = (FlipStrategy)strategy;
  memset(summary, 0, sizeof *summary);
  encode_chunk(&encoding, weights, n_weights, (size_t)(word_bits / weight_format->bits));
  return 0;
}

/* ---------------------------------------------------------------- counts */

static ALWAYS_INLINE void count_codes_with(const uint8_t *weights, uint64_t n_weights, const CodeFields *fields,
                                           uint32_t threshold, OppassWeightCounts *counts, unsigned bytes) {
  uint64_t subnormals = 0;
  uint64_t nonfinite = 0;
  for (uint64_t i = 0; i < n_weights; i++) {
    uint32_t magnitude = load_code(weights + i * bytes, bytes) & fields->magnitude_mask;
    subnormals += magnitude != 0 && magnitude < threshold;
    nonfinite += magnitude >= fields->infinity;
  }
  counts->subnormals = subnormals;
  counts->nonfinite = nonfinite;
}

/* Float formats only: constant widths, so that each loop vectorises. */
TARGET_CLONES static void count_codes(const uint8_t *weights, uint64_t n_weights, const CodeFields *fields,
                                      uint32_t threshold, OppassWeightCounts *counts) {
  if (fields->bytes == 4) {
    count_codes_with(weights, n_weights, fields, threshold, counts, 4);
  } else {
    count_codes_with(weights, n_weights, fields, threshold, counts, 2);
  }
}

int oppass_count_weights(const uint8_t *weights, uint64_t n_weights, const char *format, uint64_t subnormal_threshold,
                         OppassWeightCounts *counts) {
  const WeightFormat *weight_format = format_named(format);
  if (weight_format == NULL || counts == NULL || (n_weights != 0 && weights == NULL)) {
    return -1;
  }
  CodeFields fields = code_fields(weight_format);
  counts->subnormals = 0;
  counts->nonfinite = 0;
  if (!fields.is_float) {
    return 0;
  }
  if (subnormal_threshold > fields.infinity) {
    return -1;
  }
  count_codes(weights, n_weights, &fields, (uint32_t)subnormal_threshold, counts);
  return 0;
}

/* ---------------------------------------------------------------- conversion */

/* Binary32 bits -> bf16 bits, to nearest, ties to even (a finite input). */
static ALWAYS_INLINE uint32_t round_to_bf16(uint32_t single) {
  return (single + 0x7FFFu + ((single >> 16) & 1u)) >> 16;
}

/* Binary32 bits -> fp16 bits, to nearest, ties to even (a finite input); 0x7C00 (infinity) on overflow.
 * Both roundings are computed and one is chosen, so that the loop vectorises. */
static ALWAYS_INLINE uint32_t round_to_fp16(uint32_t single) {
  uint32_t sign = (single >> 16) & 0x8000u;
  uint32_t magnitude = single & 0x7FFFFFFFu;
  uint32_t exponent = magnitude >> 23;
  bool normal = exponent >= 113; /* normal in fp16, or too large */
  uint32_t rounded = ((exponent - 112) << 10) | ((magnitude >> 13) & 0x3FFu);
  uint32_t rest = magnitude & 0x1FFFu;
  /* bitwise, not logical, operators: no branch, so that the loop vectorises; a carry moves to the next binade */
  rounded += (uint32_t)(rest > 0x1000u) | ((uint32_t)(rest == 0x1000u) & rounded & 1u);
  rounded = rounded > 0x7C00u ? 0x7C00u : rounded;
  /* an fp16 subnormal (or the smallest normal after rounding), in units of 2^-24; 0 below half of one */
  uint32_t significand = (magnitude & 0x7FFFFFu) | 0x800000u;
  uint32_t shift = normal ? 25 : (126 - exponent < 25 ? 126 - exponent : 25);
  uint32_t small = significand >> shift;
  uint32_t small_rest = significand & ((UINT32_C(1) << shift) - 1);
  uint32_t halfway = UINT32_C(1) << (shift - 1);
  small += (uint32_t)(small_rest > halfway) | ((uint32_t)(small_rest == halfway) & small & 1u);
  return sign | (normal ? rounded : small);
}

/* One conversion loop per target (to_bf16 constant once inlined), integer reductions only, so that each
 * vectorises. A finite weight and its rounding lie within a factor of two of each other, so their difference
 * is exact in binary32 (Sterbenz), and the magnitude bits of finite binary32 values order like the values:
 * both maxima are kept as bits and widened to binary64 once, exactly. */
static ALWAYS_INLINE void convert_with(const uint8_t *input, uint8_t *output, uint64_t n_weights, bool to_bf16,
                                       OppassConversionSummary *summary) {
  uint64_t nonfinite = 0;
  uint64_t overflows = 0;
  uint32_t max_difference = 0;
  uint32_t max_magnitude = 0;
  uint32_t infinity = to_bf16 ? 0x7F80u : 0x7C00u;
  for (uint64_t i = 0; i < n_weights; i++) {
    uint32_t single;
    memcpy(&single, input + 4 * i, sizeof single);
    uint32_t half = to_bf16 ? round_to_bf16(single) : round_to_fp16(single);
    uint16_t stored = (uint16_t)half;
    memcpy(output + 2 * i, &stored, sizeof stored);
    uint32_t magnitude = single & 0x7FFFFFFFu;
    bool finite = magnitude < 0x7F800000u;
    bool overflow = finite & ((half & 0x7FFFu) == infinity);
    nonfinite += !finite;
    overflows += overflow;
    float value;
    memcpy(&value, &single, sizeof value);
    uint32_t converted_bits = to_bf16 ? half << 16 : fp16_bits(half);
    float converted;
    memcpy(&converted, &converted_bits, sizeof converted);
    float difference = converted - value;
    uint32_t difference_bits;
    memcpy(&difference_bits, &difference, sizeof difference_bits);
    difference_bits = finite & !overflow ? difference_bits & 0x7FFFFFFFu : 0;
    magnitude = finite ? magnitude : 0;
    max_magnitude = magnitude > max_magnitude ? magnitude : max_magnitude;
    max_difference = difference_bits > max_difference ? difference_bits : max_difference;
  }
  float largest_difference, largest_magnitude;
  memcpy(&largest_difference, &max_difference, sizeof largest_difference);
  memcpy(&largest_magnitude, &max_magnitude, sizeof largest_magnitude);
  summary->nonfinite_inputs = nonfinite;
  summary->overflows = overflows;
  summary->max_difference = (double)largest_difference;
  summary->max_magnitude = (double)largest_magnitude;
}

TARGET_CLONES static void convert_to(const uint8_t *input, uint8_t *output, uint64_t n_weights, bool to_bf16,
                                     OppassConversionSummary *summary) {
  if (to_bf16) {
    convert_with(input, output, n_weights, true, summary);
  } else {
    convert_with(input, output, n_weights, false, summary);
  }
}

int oppass_convert_fp32(const uint8_t *input, uint8_t *output, uint64_t n_weights, const char *format,
                        OppassConversionSummary *summary) {
  const WeightFormat *weight_format = format_named(format);
  if (weight_format == NULL || summary == NULL || (n_weights != 0 && (input == NULL || output == NULL)) ||
      (weight_format->own_type != ONNX_TYPE_BFLOAT16 && weight_format->own_type != ONNX_TYPE_FLOAT16)) {
    return -1;
  }
  convert_to(input, output, n_weights, weight_format->own_type == ONNX_TYPE_BFLOAT16, summary);
  return 0;
}
