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
#define TARGET_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
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

/* The code fields of the format whose own type is `own_type`: constants once inlined with a constant type. */
static ALWAYS_INLINE CodeFields fields_of_type(unsigned own_type) {
  CodeFields fields = {.bytes = own_type == ONNX_TYPE_FLOAT ? 4
                                : own_type == ONNX_TYPE_BFLOAT16 || own_type == ONNX_TYPE_FLOAT16 ? 2 : 1};
  unsigned exponent_bits = 0;
  switch (own_type) {
    case ONNX_TYPE_FLOAT: fields.mantissa_bits = 23; exponent_bits = 8; break;
    case ONNX_TYPE_BFLOAT16: fields.mantissa_bits = 7; exponent_bits = 8; break;
    case ONNX_TYPE_FLOAT16: fields.mantissa_bits = 10; exponent_bits = 5; break;
    case ONNX_TYPE_INT8: fields.is_signed = true; break;
    default: break;
  }
  fields.is_float = exponent_bits != 0;
  if (fields.is_float) {
    fields.sign_bit = UINT32_C(1) << (8 * fields.bytes - 1);
    fields.magnitude_mask = fields.sign_bit - 1;
    fields.mantissa_mask = (UINT32_C(1) << fields.mantissa_bits) - 1;
    fields.infinity = ((UINT32_C(1) << exponent_bits) - 1) << fields.mantissa_bits;
  }
  return fields;
}

static CodeFields code_fields(const WeightFormat *format) {
  return fields_of_type(format->own_type);
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

/* All ones where `condition`, else 0: selects written as masks, so that the loops have no control flow. */
static ALWAYS_INLINE uint32_t mask_if(bool condition) {
  return -(uint32_t)condition;
}

/* The binary32 bits of a finite fp16 code's value, exactly. */
static ALWAYS_INLINE uint32_t fp16_bits(uint32_t code) {
  uint32_t exponent = (code >> 10) & 0x1Fu;
  float subnormal = (float)(int32_t)(code & 0x3FFu) * 0x1p-24f; /* exact; a signed conversion vectorises */
  uint32_t subnormal_bits;
  memcpy(&subnormal_bits, &subnormal, sizeof subnormal_bits);
  uint32_t normal_bits = ((exponent + 112) << 23) | ((code & 0x3FFu) << 13);
  uint32_t normal = mask_if(exponent != 0);
  return (normal_bits & normal) | (subnormal_bits & ~normal) | (code & 0x8000u) << 16;
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

/* The last word of a chunk that ends inside a word (a tensor's last: the rest of it is zero padding). */
static ALWAYS_INLINE void encode_partial_word(ParityEncoding *encoding, uint8_t *weights, uint64_t n_weights,
                                              unsigned bytes, size_t per_word) {
  uint64_t whole_words = n_weights / per_word;
  size_t tail = (size_t)(n_weights - whole_words * per_word);
  if (tail != 0) {
    uint8_t *word = weights + whole_words * per_word * bytes;
    uint32_t folded = 0;
    for (size_t i = 0; i < tail; i++) {
      folded ^= load_code(word + i * bytes, bytes);
    }
    if (__builtin_parity(folded)) {
      adjust_word(encoding, word, whole_words, per_word, tail, bytes);
    }
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
  encode_partial_word(encoding, weights, n_weights, bytes, per_word);
}

/* ---------------------------------------------------------------- word-lsb without the changed indices
 *
 * The default strategy changes an odd word's first weight's LSB unless the word holds a zero (whose sign
 * bit is flipped instead) or its first weight is not finite. The words without those cases are done in
 * one loop of 64-bit lane operations and masks, no branch, so that it vectorises: the parity is a tree
 * of XOR folds, a zero is found by adding the magnitude mask to each field (bit b - 1 of a field is set
 * iff its magnitude is not 0), and the flip is an XOR with the word's parity. The odd words with those
 * cases, and a tensor's last word when it is partial, go through adjust_word as in encode_chunk_with. */

/* Words per block of the word-lsb loop: its flags of words left to adjust_word fit one array. */
#define LSB_BLOCK 64u

/* `field` repeated in every field of `bytes` bytes of a 64-bit lane. */
static ALWAYS_INLINE uint64_t repeated(uint64_t field, unsigned bytes) {
  return field * (bytes == 4 ? UINT64_C(0x0000000100000001) : bytes == 2 ? UINT64_C(0x0001000100010001)
                                                                         : UINT64_C(0x0101010101010101));
}

/* The XOR of a lane's bits, in bit 0. */
static ALWAYS_INLINE uint64_t lane_parity(uint64_t lane) {
  lane ^= lane >> 32;
  lane ^= lane >> 16;
  lane ^= lane >> 8;
  lane ^= lane >> 4;
  lane ^= lane >> 2;
  lane ^= lane >> 1;
  return lane & 1u;
}

/* |value(code ^ 1) - value(code)| / |value(code)| as binary32 bits, as adjust_word computes it (the binary32
 * value of a finite code of `bytes` bytes: code_value, with the format fixed for the loop). */
static ALWAYS_INLINE uint32_t lsb_change_bits(uint32_t code, const CodeFields *fields, unsigned bytes) {
  float before, after;
  if (!fields->is_float) {
    before = fields->is_signed ? (float)(int8_t)code : (float)(int32_t)code;
    after = fields->is_signed ? (float)(int8_t)(code ^ 1u) : (float)(int32_t)(code ^ 1u);
  } else if (bytes == 4) {
    uint32_t flipped = code ^ 1u;
    memcpy(&before, &code, sizeof before);
    memcpy(&after, &flipped, sizeof after);
  } else if (fields->mantissa_bits == 7) {
    uint32_t single = code << 16, flipped = (code ^ 1u) << 16;
    memcpy(&before, &single, sizeof before);
    memcpy(&after, &flipped, sizeof after);
  } else {
    before = fp16_value(code);
    after = fp16_value(code ^ 1u);
  }
  float change = fabsf(after - before) / fabsf(before);
  uint32_t bits;
  memcpy(&bits, &change, sizeof bits);
  return bits;
}

/* One block of `count` whole words: the simple odd words made even in place, the others flagged in
 * `others`; returns the words changed, and raises *max_change (binary32 bits) to their largest change. */
static ALWAYS_INLINE uint32_t lsb_block(uint8_t *base, uint32_t count, unsigned own_type, size_t per_word,
                                        uint8_t *others, uint32_t *max_change) {
  const CodeFields constant_fields = fields_of_type(own_type);
  const CodeFields *fields = &constant_fields;
  unsigned bytes = fields->bytes;
  size_t word_bytes = per_word * bytes;
  size_t lanes = word_bytes < 8 ? 1 : word_bytes / 8;
  uint64_t magnitudes = fields->is_float ? repeated(fields->magnitude_mask, bytes) : 0;
  uint64_t signs = fields->is_float ? repeated(fields->sign_bit, bytes) : 0;
  if (word_bytes < 8) { /* the fields past the word's */
    uint64_t word_mask = (UINT64_C(1) << (8 * word_bytes)) - 1;
    magnitudes &= word_mask;
    signs &= word_mask;
  }
  uint32_t code_mask = bytes == 4 ? UINT32_MAX : (UINT32_C(1) << (8 * bytes)) - 1;
  uint32_t changed = 0;
  uint32_t largest = *max_change;
  for (uint32_t i = 0; i < count; i++) {
    uint8_t *word = base + (size_t)i * word_bytes;
    uint64_t first_lane = word_bytes < 8 ? load_code(word, (unsigned)word_bytes) : 0;
    uint64_t folded = 0;
    uint64_t nonzero = signs;
    for (size_t lane = 0; lane < lanes; lane++) {
      uint64_t bits = first_lane;
      if (word_bytes >= 8) {
        memcpy(&bits, word + 8 * lane, sizeof bits);
      }
      first_lane = lane == 0 ? bits : first_lane;
      folded ^= bits;
      nonzero &= ((bits & magnitudes) + magnitudes) & signs;
    }
    uint32_t code = (uint32_t)first_lane & code_mask;
    uint64_t odd = lane_parity(folded);
    uint64_t simple = 1;
    uint32_t considered = mask_if(code != 0);
    if (fields->is_float) { /* no zero in the word, and a finite first weight */
      simple = (uint64_t)(nonzero == signs) & (uint64_t)((code & fields->magnitude_mask) < fields->infinity);
      considered = UINT32_MAX;
    }
    uint64_t flip = odd & simple;
    first_lane ^= flip;
    if (word_bytes < 8) {
      store_code(word, (unsigned)word_bytes, (uint32_t)first_lane);
    } else {
      memcpy(word, &first_lane, sizeof first_lane);
    }
    others[i] = (uint8_t)(odd & ~simple);
    changed += (uint32_t)flip;
    uint32_t change = lsb_change_bits(code, fields, bytes) & considered & -(uint32_t)flip;
    largest = change > largest ? change : largest;
  }
  *max_change = largest;
  return changed;
}

/* encode_chunk_with for word-lsb when the changed indices are not asked for. */
static ALWAYS_INLINE void encode_lsb_with(ParityEncoding *encoding, uint8_t *weights, uint64_t n_weights,
                                          unsigned own_type, size_t per_word) {
  unsigned bytes = fields_of_type(own_type).bytes;
  uint64_t whole_words = n_weights / per_word;
  size_t word_bytes = per_word * bytes;
  OppassParitySummary *summary = encoding->summary;
  uint32_t max_change = 0;
  uint8_t others[LSB_BLOCK];
  for (uint64_t block = 0; block < whole_words; block += LSB_BLOCK) {
    uint32_t count = whole_words - block < LSB_BLOCK ? (uint32_t)(whole_words - block) : LSB_BLOCK;
    uint8_t *base = weights + block * word_bytes;
    summary->changed_words += lsb_block(base, count, own_type, per_word, others, &max_change);
    uint64_t any = 0;
    for (uint32_t i = 0; i < count; i++) {
      any |= others[i];
    }
    for (uint32_t i = 0; any != 0 && i < count; i++) {
      if (others[i]) {
        adjust_word(encoding, base + (size_t)i * word_bytes, block + i, per_word, per_word, bytes);
      }
    }
  }
  float fast_change;
  memcpy(&fast_change, &max_change, sizeof fast_change);
  summary->max_relative_change = fast_change > summary->max_relative_change ? fast_change
                                                                            : summary->max_relative_change;
  encode_partial_word(encoding, weights, n_weights, bytes, per_word);
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

#define LSB_CASE(own_type, per_word)                                            \
  case (own_type) * 1000 + (per_word):                                          \
    encode_lsb_with(encoding, weights, n_weights, (own_type), (per_word));      \
    return
#define LSB_CASES(own_type)                                                     \
  LSB_CASE(own_type, 1); LSB_CASE(own_type, 2); LSB_CASE(own_type, 4); LSB_CASE(own_type, 8); \
  LSB_CASE(own_type, 16)

/* encode_chunk for word-lsb without the changed indices, inlined per (format, N). */
TARGET_CLONES static void encode_lsb_chunk(ParityEncoding *encoding, uint8_t *weights, uint64_t n_weights,
                                           unsigned own_type, size_t per_word) {
  switch (own_type * 1000 + per_word) {
    LSB_CASES(ONNX_TYPE_FLOAT);
    LSB_CASES(ONNX_TYPE_BFLOAT16); LSB_CASE(ONNX_TYPE_BFLOAT16, 32);
    LSB_CASES(ONNX_TYPE_FLOAT16); LSB_CASE(ONNX_TYPE_FLOAT16, 32);
    LSB_CASES(ONNX_TYPE_INT8); LSB_CASE(ONNX_TYPE_INT8, 32); LSB_CASE(ONNX_TYPE_INT8, 64);
    LSB_CASES(ONNX_TYPE_UINT8); LSB_CASE(ONNX_TYPE_UINT8, 32); LSB_CASE(ONNX_TYPE_UINT8, 64);
    default: encode_chunk(encoding, weights, n_weights, per_word); return;
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
  size_t per_word = (size_t)(word_bits / weight_format->bits);
  if (encoding.flip == FLIP_WORD_LSB && changed == NULL) {
    encode_lsb_chunk(&encoding, weights, n_weights, weight_format->own_type, per_word);
  } else {
    encode_chunk(&encoding, weights, n_weights, per_word);
  }
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
 * Both roundings (normal: the bf16 rounding's add-and-shift one binade down; subnormal: the same with the
 * shift the exponent asks for) are computed and one is chosen by a mask, so that the loop vectorises. */
static ALWAYS_INLINE uint32_t round_to_fp16(uint32_t single) {
  uint32_t sign = (single >> 16) & 0x8000u;
  uint32_t magnitude = single & 0x7FFFFFFFu;
  uint32_t exponent = magnitude >> 23;
  uint32_t normal = mask_if(exponent >= 113); /* normal in fp16, or too large */
  /* rebiased by 127 - 15 = 112 binades; a carry moves to the next binade, and past the largest to infinity */
  uint32_t rounded = (magnitude - (UINT32_C(112) << 23) + 0xFFFu + ((magnitude >> 13) & 1u)) >> 13;
  uint32_t overflow = mask_if(rounded > 0x7C00u);
  rounded = (rounded & ~overflow) | (0x7C00u & overflow);
  /* an fp16 subnormal (or the smallest normal after rounding), in units of 2^-24; 0 below half of one.
   * The shift is clamped to [14, 25] (14 for the normal inputs, whose result this one is not) */
  uint32_t significand = (magnitude & 0x7FFFFFu) | 0x800000u;
  uint32_t below = 126u - (exponent < 112u ? exponent : 112u);
  uint32_t shift = below < 25u ? below : 25u;
  uint32_t small = (significand + (UINT32_C(1) << (shift - 1u)) - 1u + ((significand >> shift) & 1u)) >> shift;
  return sign | (rounded & normal) | (small & ~normal);
}

/* Weights per block of the conversion loop: its counters are 32-bit, added to the summary's per block. */
#define CONVERSION_BLOCK 4096u

/* One block of the conversion loop per target (to_bf16 constant once inlined): 32-bit integer operations,
 * selects written as masks and integer reductions only, so that it vectorises. A finite weight and its
 * rounding lie within a factor of two of each other, so their difference is exact in binary32
 * (Sterbenz), and the magnitude bits of finite binary32 values order like the values: both maxima are
 * kept as bits. */
static ALWAYS_INLINE void convert_block(const uint8_t *input, uint8_t *output, uint32_t count, bool to_bf16,
                                        uint32_t *nonfinite_count, uint32_t *overflow_count,
                                        uint32_t *max_difference, uint32_t *max_magnitude) {
  uint32_t nonfinite = 0;
  uint32_t overflows = 0;
  uint32_t largest_difference = *max_difference;
  uint32_t largest_magnitude = *max_magnitude;
  uint32_t infinity = to_bf16 ? 0x7F80u : 0x7C00u;
  for (uint32_t i = 0; i < count; i++) {
    uint32_t single;
    memcpy(&single, input + 4 * (size_t)i, sizeof single);
    uint32_t half = to_bf16 ? round_to_bf16(single) : round_to_fp16(single);
    uint16_t stored = (uint16_t)half;
    memcpy(output + 2 * (size_t)i, &stored, sizeof stored);
    uint32_t magnitude = single & 0x7FFFFFFFu;
    uint32_t finite = mask_if(magnitude < 0x7F800000u);
    uint32_t overflow = finite & mask_if((half & 0x7FFFu) == infinity);
    nonfinite += ~finite & 1u;
    overflows += overflow & 1u;
    float value;
    memcpy(&value, &single, sizeof value);
    uint32_t converted_bits = to_bf16 ? half << 16 : fp16_bits(half);
    float converted;
    memcpy(&converted, &converted_bits, sizeof converted);
    float difference = converted - value;
    uint32_t difference_bits;
    memcpy(&difference_bits, &difference, sizeof difference_bits);
    difference_bits &= 0x7FFFFFFFu & finite & ~overflow;
    magnitude &= finite;
    largest_magnitude = magnitude > largest_magnitude ? magnitude : largest_magnitude;
    largest_difference = difference_bits > largest_difference ? difference_bits : largest_difference;
  }
  *nonfinite_count = nonfinite;
  *overflow_count = overflows;
  *max_difference = largest_difference;
  *max_magnitude = largest_magnitude;
}

static ALWAYS_INLINE void convert_with(const uint8_t *input, uint8_t *output, uint64_t n_weights, bool to_bf16,
                                       OppassConversionSummary *summary) {
  uint64_t nonfinite = 0;
  uint64_t overflows = 0;
  uint32_t max_difference = 0;
  uint32_t max_magnitude = 0;
  for (uint64_t start = 0; start < n_weights; start += CONVERSION_BLOCK) {
    uint32_t count = n_weights - start < CONVERSION_BLOCK ? (uint32_t)(n_weights - start) : CONVERSION_BLOCK;
    uint32_t block_nonfinite, block_overflows;
    convert_block(input + 4 * start, output + 2 * start, count, to_bf16, &block_nonfinite, &block_overflows,
                  &max_difference, &max_magnitude);
    nonfinite += block_nonfinite;
    overflows += block_overflows;
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
