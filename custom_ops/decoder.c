/*
 * The oppass weight decoder (decoder.h): format table, attribute rules, decode plan, conversion,
 * parity scan and masking. No onnxruntime here.
 */

#include "decoder.h"

#include <string.h>

#define LANE_BYTES 8
/* x86-64 builds carry a second copy of the decoding loops for AVX2/POPCNT CPUs, picked at load time. */
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
#define TARGET_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define TARGET_CLONES
#endif
/* The parity scan tests blocks of BLOCK_BYTES (whole words: W <= 512 bits) for an odd word at once,
 * as BLOCK_VECTORS vectors of BLOCK_VECTOR_BYTES. */
#define BLOCK_VECTOR_BYTES 32
#define BLOCK_VECTORS 8
#define BLOCK_BYTES (BLOCK_VECTOR_BYTES * BLOCK_VECTORS)
/* Packed bytes converted before their parity is scanned, so that the scan reads them from L1. */
#define CHUNK_BYTES ((size_t)8 * 1024)

_Static_assert(BLOCK_BYTES * 8 >= MAX_WORD_BITS, "a scan block holds whole words");

const WeightFormat WEIGHT_FORMATS[] = {
    {"fp32", 32, ONNX_TYPE_FLOAT, false},
    {"bf16", 16, ONNX_TYPE_BFLOAT16, true},
    {"fp16", 16, ONNX_TYPE_FLOAT16, true},
    {"int8", 8, ONNX_TYPE_INT8, false},
    {"uint8", 8, ONNX_TYPE_UINT8, false},
};
const size_t WEIGHT_FORMAT_COUNT = sizeof WEIGHT_FORMATS / sizeof WEIGHT_FORMATS[0];

/* Word sizes beyond one weight per word. */
static const unsigned SHARED_WORD_BITS[] = {16, 32, 64, 128, 256, MAX_WORD_BITS};

/* ---------------------------------------------------------------- attribute rules */

const WeightFormat *find_weight_format(const char *name, size_t length) {
  for (size_t i = 0; i < WEIGHT_FORMAT_COUNT; i++) {
    if (strlen(WEIGHT_FORMATS[i].name) == length && memcmp(WEIGHT_FORMATS[i].name, name, length) == 0) {
      return &WEIGHT_FORMATS[i];
    }
  }
  return NULL;
}

bool word_bits_allowed(const WeightFormat *format, int64_t word_bits) {
  if (word_bits == format->bits) {
    return true;
  }
  for (size_t i = 0; i < sizeof SHARED_WORD_BITS / sizeof SHARED_WORD_BITS[0]; i++) {
    if (word_bits == SHARED_WORD_BITS[i] && word_bits >= format->bits) {
      return true;
    }
  }
  return false;
}

bool output_type_allowed(const WeightFormat *format, int64_t output_type) {
  return output_type == format->own_type || (format->widens_to_float && output_type == ONNX_TYPE_FLOAT);
}

ShapeVerdict count_weights(const int64_t *dims, size_t rank, size_t *n_weights, size_t *axis) {
  bool empty = false;
  for (size_t i = 0; i < rank; i++) {
    if (dims[i] < 0) {
      *axis = i;
      return SHAPE_NEGATIVE_DIM;
    }
    empty |= dims[i] == 0;
  }
  uint64_t count = 1;
  for (size_t i = 0; !empty && i < rank; i++) {
    /* every dim >= 1 here, so the product only grows: stop at the first partial product over the limit */
    if (__builtin_mul_overflow(count, (uint64_t)dims[i], &count) || count >= WEIGHT_COUNT_LIMIT) {
      return SHAPE_TOO_LARGE;
    }
  }
  if (count > SIZE_MAX / sizeof(float)) { /* only in a 32-bit process: its output bytes would not fit size_t */
    return SHAPE_TOO_LARGE;
  }
  *n_weights = empty ? 0 : (size_t)count;
  return SHAPE_VALID;
}

/* ---------------------------------------------------------------- conversions */

TARGET_CLONES static void widen_bf16(const uint8_t *in, uint8_t *out, size_t count) {
  for (size_t i = 0; i < count; i++) {
    uint16_t half;
    memcpy(&half, in + 2 * i, sizeof half);
    uint32_t single = (uint32_t)half << 16;
    memcpy(out + 4 * i, &single, sizeof single);
  }
}

/* Exact binary16 -> binary32 bits: infinities and NaN payloads kept. Branch-free (masks, not
 * conditions) so that it vectorises; a subnormal is mantissa * 2^-24, computed exactly in binary32,
 * where it is normal. */
static inline uint32_t fp16_to_fp32_bits(uint16_t half) {
  uint32_t sign = (uint32_t)(half & 0x8000u) << 16;
  uint32_t exponent = half & 0x7C00u;
  uint32_t shifted = (uint32_t)(half & 0x7FFFu) << 13;
  float subnormal_value = (float)(half & 0x3FFu) * 0x1p-24f;
  uint32_t subnormal;
  memcpy(&subnormal, &subnormal_value, sizeof subnormal);
  uint32_t is_subnormal = 0u - (uint32_t)(exponent == 0);
  uint32_t is_special = 0u - (uint32_t)(exponent == 0x7C00u);
  uint32_t normal = shifted + (112u << 23);
  return sign | (subnormal & is_subnormal) | ((shifted | 0x7F800000u) & is_special) |
         (normal & ~(is_subnormal | is_special));
}

TARGET_CLONES static void widen_fp16(const uint8_t *in, uint8_t *out, size_t count) {
  for (size_t i = 0; i < count; i++) {
    uint16_t half;
    memcpy(&half, in + 2 * i, sizeof half);
    uint32_t single = fp16_to_fp32_bits(half);
    memcpy(out + 4 * i, &single, sizeof single);
  }
}

/* ---------------------------------------------------------------- plan */

static OnnxType packed_element_type(unsigned word_bits) {
  switch (word_bits) {
    case 8: return ONNX_TYPE_UINT8;
    case 16: return ONNX_TYPE_UINT16;
    case 32: return ONNX_TYPE_UINT32;
    default: return ONNX_TYPE_UINT64;
  }
}

DecodePlan plan_decode(const WeightFormat *format, unsigned word_bits, OnnxType output_type, WordCheck check,
                       size_t n_weights) {
  DecodePlan plan;
  plan.weight_bytes = format->bits / 8;
  plan.widen = output_type == format->own_type ? NULL
               : format->own_type == ONNX_TYPE_BFLOAT16 ? widen_bf16
                                                         : widen_fp16;
  plan.output_bytes = plan.widen != NULL ? sizeof(float) : plan.weight_bytes;
  plan.word_bytes = word_bits / 8;
  plan.weights_per_word = word_bits / format->bits;
  plan.lanes = word_bits >= 64 ? word_bits / 64 : 1;
  plan.n_weights = n_weights;
  plan.n_words = n_weights / plan.weights_per_word + (n_weights % plan.weights_per_word != 0);
  plan.check = check;
  plan.packed_type = packed_element_type(word_bits);
  return plan;
}

/* ---------------------------------------------------------------- decoding */

static void convert_weights(const DecodePlan *plan, const uint8_t *stream, uint8_t *out, size_t first, size_t count) {
  const uint8_t *in = stream + first * plan->weight_bytes;
  uint8_t *dst = out + first * plan->output_bytes;
  if (plan->widen != NULL) {
    plan->widen(in, dst, count);
  } else {
    memcpy(dst, in, count * plan->weight_bytes);
  }
}

static void zero_word(const DecodePlan *plan, uint8_t *out, size_t word) {
  size_t first = word * plan->weights_per_word;
  size_t count = plan->n_weights - first < plan->weights_per_word ? plan->n_weights - first : plan->weights_per_word;
  memset(out + first * plan->output_bytes, 0, count * plan->output_bytes);
}

static inline uint64_t load_lane(const uint8_t *bytes) {
  uint64_t lane;
  memcpy(&lane, bytes, sizeof lane);
  return lane;
}

/* Bit 0 of every field_bits-wide field of the result is the parity of that field of x. */
static inline uint64_t field_parities(uint64_t x, unsigned field_bits) {
  if (field_bits == 64) {
    return (uint64_t)__builtin_parityll(x);
  }
  for (unsigned shift = field_bits / 2; shift > 0; shift /= 2) {
    x ^= x >> shift;
  }
  uint64_t field_mask = (UINT64_C(1) << field_bits) - 1;
  return x & (UINT64_MAX / field_mask);
}

/* Parities of the words in one group: 8 bytes holding 64/W words, or one word of W >= 64 bits. */
static inline uint64_t group_parities(const uint8_t *group, size_t lanes, unsigned field_bits) {
  uint64_t folded = load_lane(group);
  for (size_t lane = 1; lane < lanes; lane++) {
    folded ^= load_lane(group + LANE_BYTES * lane);
  }
  return field_parities(folded, field_bits);
}

/* Zeroes the words whose parity bit is set in `odd` (field `f` is word first_word + f). */
static size_t mask_group(const DecodePlan *plan, uint8_t *out, uint64_t odd, size_t first_word, unsigned field_bits) {
  size_t masked = 0;
  for (; odd != 0; odd &= odd - 1) {
    zero_word(plan, out, first_word + (size_t)__builtin_ctzll(odd) / field_bits);
    masked++;
  }
  return masked;
}

/* Four 64-bit lanes; GCC and clang lower it to one AVX2 register or two SSE2 registers. */
typedef uint64_t Lanes __attribute__((vector_size(BLOCK_VECTOR_BYTES)));
typedef uint64_t UnalignedLanes __attribute__((vector_size(BLOCK_VECTOR_BYTES), aligned(1), may_alias));

/* Bit i of the result is set when bit i lies in the low half of its 2 * half_bits field (half_bits <= 32). */
static inline uint64_t low_halves(unsigned half_bits) {
  uint64_t half = (UINT64_C(1) << half_bits) - 1;
  return UINT64_MAX / ((half << half_bits) | half) * half;
}

/* Two vectors of 2h-bit fields, each field holding some bits whose parity is wanted, become one
 * vector of h-bit fields with the same parities: x's fields fold into the low halves, y's into the
 * high halves. One level of the tree that reduces a block to its word parities. */
static inline __attribute__((always_inline)) void pair_fields(Lanes *into, const Lanes *x, const Lanes *y,
                                                              unsigned half_bits) {
  if (half_bits == 128) {
    *into = __builtin_shufflevector(*x, *y, 0, 1, 6, 7) ^ __builtin_shufflevector(*x, *y, 2, 3, 4, 5);
  } else if (half_bits == 64) {
    *into = __builtin_shufflevector(*x, *y, 0, 5, 2, 7) ^ __builtin_shufflevector(*x, *y, 1, 4, 3, 6);
  } else {
    Lanes low = (Lanes){0, 0, 0, 0} + low_halves(half_bits);
    Lanes kept = (*x & low) | (*y & ~low);
    Lanes moved = ((*x >> half_bits) & low) | ((*y << half_bits) & ~low);
    *into = kept ^ moved;
  }
}

/* Folds every `width`-bit field (width <= 64) of v to its parity, in the field's bit 0; clears the other bits. */
static inline __attribute__((always_inline)) void fold_fields(Lanes *v, unsigned width) {
  for (unsigned shift = 32; shift > 0; shift /= 2) {
    if (shift < width) {
      *v ^= *v >> shift;
    }
  }
  *v &= (Lanes){0, 0, 0, 0} + (width == 64 ? 1 : UINT64_MAX / ((UINT64_C(1) << width) - 1));
}

/* ORs into `odd` a vector that is non-zero when one of the words in the BLOCK_BYTES at `block` has
 * odd parity. The block's vectors are paired down to one (8 -> 4 -> 2 -> 1; a 512-bit word's two
 * halves are XOR-ed first), fields halving at each level, and the last vector's fields are folded
 * to their bit 0: about one vector operation per 8 bytes, where a popcount per word costs several
 * scalar ones. */
static inline __attribute__((always_inline)) void accumulate_block(Lanes *odd, const uint8_t *block,
                                                                   unsigned word_bits) {
  Lanes v[BLOCK_VECTORS];
  for (size_t i = 0; i < BLOCK_VECTORS; i++) {
    v[i] = *(const UnalignedLanes *)(block + i * BLOCK_VECTOR_BYTES);
  }
  size_t count = BLOCK_VECTORS;
  unsigned width = word_bits;
  if (word_bits == 512) {
    for (size_t i = 0; i < BLOCK_VECTORS / 2; i++) {
      v[i] = v[2 * i] ^ v[2 * i + 1];
    }
    count /= 2;
    width /= 2;
  }
  for (; count > 1; count /= 2) {
    width /= 2;
    for (size_t i = 0; i < count / 2; i++) {
      pair_fields(&v[i], &v[2 * i], &v[2 * i + 1], width);
    }
  }
  fold_fields(&v[0], width);
  *odd |= v[0];
}

static inline bool any_lane(Lanes v) {
  return (v[0] | v[1] | v[2] | v[3]) != 0;
}

/* Zeroes the odd words of groups [first_group, end_group) of the stream starting at word first_word. */
static inline __attribute__((always_inline)) size_t mask_groups(const DecodePlan *plan, const uint8_t *base,
                                                                uint8_t *out, size_t first_word, size_t first_group,
                                                                size_t end_group, unsigned field_bits, size_t lanes) {
  size_t masked = 0;
  for (size_t group = first_group; group < end_group; group++) {
    uint64_t odd = group_parities(base + group * LANE_BYTES * lanes, lanes, field_bits);
    masked += mask_group(plan, out, odd, first_word + group * (64 / field_bits), field_bits);
  }
  return masked;
}

/* Zeroes the odd-parity words among [first_word, end_word) of the already converted `out`. Each
 * inlined copy gets constant field_bits = min(W, 64) and lanes, so its loops unroll: all whole
 * blocks are tested at once, and only when one holds an odd word are they tested one by one and
 * the odd ones searched word by word. */
static inline __attribute__((always_inline)) size_t mask_odd_words_with(const DecodePlan *plan, const uint8_t *stream,
                                                                        uint8_t *out, size_t first_word,
                                                                        size_t end_word, unsigned field_bits,
                                                                        size_t lanes) {
  unsigned word_bits = lanes > 1 ? 64 * (unsigned)lanes : field_bits;
  size_t group_bytes = LANE_BYTES * lanes;
  size_t groups_per_block = BLOCK_BYTES / group_bytes;
  size_t stream_bytes = (end_word - first_word) * plan->word_bytes;
  size_t groups = stream_bytes / group_bytes;
  size_t whole_blocks_end = groups - groups % groups_per_block;
  const uint8_t *base = stream + first_word * plan->word_bytes;
  size_t masked = 0;
  Lanes odd = {0, 0, 0, 0};
  for (size_t group = 0; group < whole_blocks_end; group += groups_per_block) {
    accumulate_block(&odd, base + group * group_bytes, word_bits);
  }
  for (size_t group = 0; any_lane(odd) && group < whole_blocks_end; group += groups_per_block) {
    Lanes block_odd = {0, 0, 0, 0};
    accumulate_block(&block_odd, base + group * group_bytes, word_bits);
    if (any_lane(block_odd)) {
      masked += mask_groups(plan, base, out, first_word, group, group + groups_per_block, field_bits, lanes);
    }
  }
  masked += mask_groups(plan, base, out, first_word, whole_blocks_end, groups, field_bits, lanes);
  size_t tail_bytes = stream_bytes - groups * group_bytes; /* only when W < 64 */
  if (tail_bytes != 0) {
    uint64_t tail = 0;
    memcpy(&tail, base + groups * group_bytes, tail_bytes);
    masked += mask_group(plan, out, field_parities(tail, field_bits), first_word + groups * (64 / field_bits),
                         field_bits);
  }
  return masked;
}

TARGET_CLONES static size_t mask_odd_words(const DecodePlan *plan, const uint8_t *stream, uint8_t *out, size_t first_word,
                             size_t end_word) {
  switch (plan->word_bytes) {
    case 1:
      return mask_odd_words_with(plan, stream, out, first_word, end_word, 8, 1);
    case 2:
      return mask_odd_words_with(plan, stream, out, first_word, end_word, 16, 1);
    case 4:
      return mask_odd_words_with(plan, stream, out, first_word, end_word, 32, 1);
    case 8:
      return mask_odd_words_with(plan, stream, out, first_word, end_word, 64, 1);
    case 16:
      return mask_odd_words_with(plan, stream, out, first_word, end_word, 64, 2);
    case 32:
      return mask_odd_words_with(plan, stream, out, first_word, end_word, 64, 4);
    default:
      return mask_odd_words_with(plan, stream, out, first_word, end_word, 64, 8);
  }
}

/* Cloned as a static function: GCC exports the ifunc of a cloned global function from the shared
 * library whatever its visibility, so decode_words below is a plain call into it. */
TARGET_CLONES static size_t decode_range(const DecodePlan *plan, const uint8_t *stream, uint8_t *out,
                                         size_t first_word, size_t end_word) {
  size_t words_per_chunk = CHUNK_BYTES / plan->word_bytes;
  size_t masked = 0;
  for (size_t chunk = first_word; chunk < end_word; chunk += words_per_chunk) {
    size_t chunk_end = end_word - chunk < words_per_chunk ? end_word : chunk + words_per_chunk;
    size_t first = chunk * plan->weights_per_word;
    size_t end = chunk_end * plan->weights_per_word;
    convert_weights(plan, stream, out, first, (end < plan->n_weights ? end : plan->n_weights) - first);
    switch (plan->check) {
      case WORD_CHECK_PARITY:
        masked += mask_odd_words(plan, stream, out, chunk, chunk_end);
        break;
      case WORD_CHECK_NONE:
        break;
    }
  }
  return masked;
}

size_t decode_words(const DecodePlan *plan, const uint8_t *stream, uint8_t *out, size_t first_word, size_t end_word) {
  return decode_range(plan, stream, out, first_word, end_word);
}
