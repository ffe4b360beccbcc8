/*
 * The oppass weight decoder (decoder.h): format table, attribute rules, decode plan, conversion,
 * parity scan, SEC-DED syndrome decode, masking and range check. No onnxruntime here.
 */

#include "decoder.h"

#include "secded_avx512.h"

#include <string.h>
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#endif

#define LANE_BYTES 8
/* x86-64 builds carry a second copy of the decoding loops for AVX2/POPCNT CPUs, picked at load time. */
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
#define TARGET_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
/* SEC-DED's syndrome scan has a third copy for CPUs with vector popcounts (AVX-512 VPOPCNTDQ and
 * BITALG), picked by the plan: target_clones can name that ISA only through a CPU model. */
#define VECTOR_POPCOUNT_TARGET \
  __attribute__((target("avx2,bmi,bmi2,popcnt,avx512f,avx512vl,avx512bw,avx512vpopcntdq,avx512bitalg")))
#define HAS_VECTOR_POPCOUNT 1
#else
#define TARGET_CLONES
#define HAS_VECTOR_POPCOUNT 0
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
    /* budget: floor(mantissa bits / 2) for floats, 3 for integers (docs/FORMAT.md, "SEC-DED") */
    {"fp32", 32, ONNX_TYPE_FLOAT, false, 11},
    {"bf16", 16, ONNX_TYPE_BFLOAT16, true, 3},
    {"fp16", 16, ONNX_TYPE_FLOAT16, true, 5},
    {"int8", 8, ONNX_TYPE_INT8, false, 3},
    {"uint8", 8, ONNX_TYPE_UINT8, false, 3},
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

unsigned secded_check_bits(unsigned word_bits) {
  return (unsigned)__builtin_ctz(word_bits) + 1;
}

bool secded_fits(const WeightFormat *format, unsigned word_bits) {
  unsigned r = secded_check_bits(word_bits);
  unsigned per_word = word_bits / format->bits;
  return (r + per_word - 1) / per_word <= format->stolen_bit_budget;
}

bool range_max_allowed(float range_max) {
  return __builtin_isfinite(range_max) && range_max >= 0.0f;
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

static float fp16_value(uint32_t half) {
  uint32_t single = fp16_to_fp32_bits((uint16_t)half);
  float value;
  memcpy(&value, &single, sizeof value);
  return value;
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

/* Repeats the low `bits` bits of x over 64 bits (bits a power of two up to 64). */
static uint64_t repeated(uint64_t x, unsigned bits) {
  for (; bits < 64; bits *= 2) {
    x |= x << bits;
  }
  return x;
}

/* docs/FORMAT.md, "SEC-DED": check bit j is bit j div k of weight j mod k; the check positions in
 * ascending order get Hamming indices 0, 1, 2, 4, ..., the data positions the others ascending. */
static SecdedCode build_secded(unsigned word_bits, unsigned weight_bits) {
  SecdedCode code;
  memset(&code, 0, sizeof code);
  code.on = true;
  unsigned r = secded_check_bits(word_bits);
  unsigned per_word = word_bits / weight_bits;
  code.check_bits = r;
  bool is_check[MAX_WORD_BITS] = {false};
  for (unsigned j = 0; j < r; j++) {
    is_check[(j % per_word) * weight_bits + j / per_word] = true;
  }
  unsigned checks_seen = 0;
  unsigned next_data_index = 3;
  uint64_t masks[MAX_CHECK_BITS][MAX_LANES] = {{0}};
  uint64_t kept[MAX_LANES] = {0};
  for (unsigned position = 0; position < word_bits; position++) {
    unsigned index;
    if (is_check[position]) {
      index = checks_seen == 0 ? 0 : 1u << (checks_seen - 1);
      checks_seen++;
    } else {
      index = next_data_index++;
      while ((index & (index - 1)) == 0) { /* skip powers of two */
        index = next_data_index++;
      }
      kept[position / 64] |= UINT64_C(1) << (position % 64);
    }
    code.position_of_index[index] = (uint16_t)position;
    for (unsigned bit = 0; bit + 1 < r; bit++) {
      if (index >> bit & 1) {
        masks[bit][position / 64] |= UINT64_C(1) << (position % 64);
      }
    }
    masks[r - 1][position / 64] |= UINT64_C(1) << (position % 64); /* the overall parity: every bit */
  }
  unsigned lane_bits = word_bits < 64 ? word_bits : 64;
  for (unsigned lane = 0; lane < (word_bits + 63) / 64; lane++) {
    for (unsigned i = 0; i < r; i++) {
      code.syndrome_masks[i][lane] = repeated(masks[i][lane], lane_bits);
    }
    code.kept_bits[lane] = repeated(kept[lane], lane_bits);
  }
  return code;
}

static uint32_t float_bits(float value) {
  uint32_t bits;
  memcpy(&bits, &value, sizeof bits);
  return bits;
}

static float fp16_value(uint32_t half);

/* The largest magnitude an output element of `type` may have and be kept by the range check:
 * floats, the largest magnitude code (sign cleared) whose value is <= range_max (finite, >= 0), so
 * that NaN and infinity codes lie above it; integers, the largest |value| <= range_max. */
static uint32_t range_limit(OnnxType type, float range_max) {
  float bound = range_max == 0.0f ? 0.0f : range_max; /* -0.0 bounds like +0.0 */
  switch (type) {
    case ONNX_TYPE_FLOAT:
      return float_bits(bound);
    case ONNX_TYPE_BFLOAT16:
      return float_bits(bound) >> 16; /* truncation: the largest bfloat16 not above it */
    case ONNX_TYPE_FLOAT16: {
      uint32_t low = 0;       /* fp16_value(low) <= bound always (0) */
      uint32_t high = 0x7BFF; /* the largest finite binary16 */
      while (low < high) {
        uint32_t middle = (low + high + 1) / 2;
        if (fp16_value(middle) <= bound) {
          low = middle;
        } else {
          high = middle - 1;
        }
      }
      return low;
    }
    case ONNX_TYPE_INT8:
      return bound >= 128.0f ? 128u : (uint32_t)bound;
    default: /* UINT8 */
      return bound >= 255.0f ? 255u : (uint32_t)bound;
  }
}

DecodePlan plan_decode(const WeightFormat *format, unsigned word_bits, OnnxType output_type, WordCode code,
                       bool checked, bool range_check, float range_max, size_t n_weights) {
  DecodePlan plan;
  memset(&plan, 0, sizeof plan);
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
  plan.check = !checked ? WORD_CHECK_NONE : code == CODE_SECDED ? WORD_CHECK_SECDED : WORD_CHECK_PARITY;
  plan.packed_type = packed_element_type(word_bits);
  plan.output_type = output_type;
  if (code == CODE_SECDED) {
    plan.secded = build_secded(word_bits, format->bits);
  }
#if HAS_VECTOR_POPCOUNT
  __builtin_cpu_init();
  plan.secded.vector_popcount = __builtin_cpu_supports("avx512vpopcntdq") && __builtin_cpu_supports("avx512bitalg") &&
                                __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw");
#endif
  plan.range_check = checked && range_check;
  plan.range_limit = plan.range_check ? range_limit(output_type, range_max) : 0;
  /* one pass with AVX-512 for checked SEC-DED words of 64 bits and more, but fp16 -> fp32 */
  if (plan.check == WORD_CHECK_SECDED && word_bits >= 64 && plan.widen != widen_fp16 && secded_avx512_usable()) {
    SecdedVectorOutput output = plan.widen == widen_bf16            ? SECDED_OUT_BF16_TO_32
                                : plan.weight_bytes == 4            ? SECDED_OUT_32
                                : plan.weight_bytes == 2            ? SECDED_OUT_16
                                : output_type == ONNX_TYPE_INT8     ? SECDED_OUT_INT8
                                                                    : SECDED_OUT_UINT8;
    plan.secded_vector = secded_avx512_plan(&plan.secded, word_bits, output, n_weights * plan.output_bytes);
  }
  return plan;
}

/* ---------------------------------------------------------------- decoding */

static inline uint64_t load_lane(const uint8_t *bytes) {
  uint64_t lane;
  memcpy(&lane, bytes, sizeof lane);
  return lane;
}

static inline void store_lane(uint8_t *bytes, uint64_t lane) {
  memcpy(bytes, &lane, sizeof lane);
}

/* Copies `bytes` stream bytes that start at a word boundary into `dst`, SEC-DED's check bits
 * cleared. Inlined with constant `lanes` so that the loop vectorises. */
static inline __attribute__((always_inline)) void clear_stolen_bits_with(const uint64_t *kept, const uint8_t *in,
                                                                        uint8_t *dst, size_t bytes, size_t lanes) {
  size_t groups = bytes / LANE_BYTES;
  for (size_t group = 0; group < groups; group++) {
    store_lane(dst + LANE_BYTES * group, load_lane(in + LANE_BYTES * group) & kept[group % lanes]);
  }
  size_t tail = bytes % LANE_BYTES;
  if (tail != 0) {
    uint64_t last = 0;
    memcpy(&last, in + LANE_BYTES * groups, tail);
    last &= kept[groups % lanes];
    memcpy(dst + LANE_BYTES * groups, &last, tail);
  }
}

/* Widens `count` bf16 weights that start at a word boundary to binary32 with SEC-DED's check
 * bits cleared, in one pass: 8 bytes (4 weights) at a time, each ANDed with its lane of the kept
 * bits. Inlined with constant `lanes` so that the loop vectorises. */
static inline __attribute__((always_inline)) void widen_bf16_cleared_with(const uint64_t *kept, const uint8_t *in,
                                                                         uint8_t *out, size_t count, size_t lanes) {
  size_t groups = count / 4;
  for (size_t group = 0; group < groups; group++) {
    uint64_t x = load_lane(in + LANE_BYTES * group) & kept[group % lanes];
    uint32_t singles[4];
    for (unsigned i = 0; i < 4; i++) {
      uint16_t half = (uint16_t)(x >> (16 * i));
      singles[i] = (uint32_t)half << 16;
    }
    memcpy(out + 16 * group, singles, sizeof singles);
  }
  size_t tail = count % 4;
  if (tail != 0) {
    uint64_t x = 0;
    memcpy(&x, in + LANE_BYTES * groups, 2 * tail);
    x &= kept[groups % lanes];
    for (unsigned i = 0; i < tail; i++) {
      uint16_t half = (uint16_t)(x >> (16 * i));
      uint32_t single = (uint32_t)half << 16;
      memcpy(out + 16 * groups + 4 * i, &single, sizeof single);
    }
  }
}

TARGET_CLONES static void widen_bf16_cleared(const DecodePlan *plan, const uint8_t *in, uint8_t *out, size_t count) {
  const uint64_t *kept = plan->secded.kept_bits;
  switch (plan->lanes) {
    case 1:
      widen_bf16_cleared_with(kept, in, out, count, 1);
      break;
    case 2:
      widen_bf16_cleared_with(kept, in, out, count, 2);
      break;
    case 4:
      widen_bf16_cleared_with(kept, in, out, count, 4);
      break;
    default:
      widen_bf16_cleared_with(kept, in, out, count, MAX_LANES);
      break;
  }
}

static void clear_stolen_bits(const DecodePlan *plan, const uint8_t *in, uint8_t *dst, size_t bytes) {
  const uint64_t *kept = plan->secded.kept_bits;
  switch (plan->lanes) {
    case 1:
      clear_stolen_bits_with(kept, in, dst, bytes, 1);
      break;
    case 2:
      clear_stolen_bits_with(kept, in, dst, bytes, 2);
      break;
    case 4:
      clear_stolen_bits_with(kept, in, dst, bytes, 4);
      break;
    default:
      clear_stolen_bits_with(kept, in, dst, bytes, MAX_LANES);
      break;
  }
}

/* Writes `count` (<= CHUNK_BYTES / b * 8) weights, the first of them at the start of a word, to
 * their output elements: SEC-DED's check bits cleared, then widened. */
static void write_weights(const DecodePlan *plan, const uint8_t *in, uint8_t *dst, size_t count) {
  size_t bytes = count * plan->weight_bytes;
  if (!plan->secded.on) {
    if (plan->widen != NULL) {
      plan->widen(in, dst, count);
    } else {
      memcpy(dst, in, bytes);
    }
  } else if (plan->widen == NULL) {
    clear_stolen_bits(plan, in, dst, bytes);
  } else if (plan->widen == widen_bf16) {
    widen_bf16_cleared(plan, in, dst, count);
  } else {
    uint8_t cleared[CHUNK_BYTES];
    clear_stolen_bits(plan, in, cleared, bytes);
    plan->widen(cleared, dst, count);
  }
}

/* Weights of `word` that are real (not the last word's padding). */
static size_t real_weights(const DecodePlan *plan, size_t word) {
  size_t first = word * plan->weights_per_word;
  return plan->n_weights - first < plan->weights_per_word ? plan->n_weights - first : plan->weights_per_word;
}

static void convert_weights(const DecodePlan *plan, const uint8_t *stream, uint8_t *out, size_t first, size_t count) {
  write_weights(plan, stream + first * plan->weight_bytes, out + first * plan->output_bytes, count);
}

static void zero_word(const DecodePlan *plan, uint8_t *out, size_t word) {
  memset(out + word * plan->weights_per_word * plan->output_bytes, 0, real_weights(plan, word) * plan->output_bytes);
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

/* ---------------------------------------------------------------- SEC-DED */

/* The syndrome sigma = s + P * W of one word (decoder.h, SecdedCode). Inlined with constant
 * word_bytes and lanes, so r = log2(W) + 1 is constant too. */
static inline __attribute__((always_inline)) unsigned word_syndrome(const SecdedCode *code, const uint8_t *word,
                                                                    size_t word_bytes, size_t lanes) {
  unsigned r = (unsigned)__builtin_ctzll(word_bytes * 8) + 1;
  unsigned sigma = 0;
  if (word_bytes < LANE_BYTES) {
    uint64_t x = 0;
    memcpy(&x, word, word_bytes);
    for (unsigned i = 0; i < r; i++) {
      sigma |= (unsigned)(__builtin_popcountll(x & code->syndrome_masks[i][0]) & 1) << i;
    }
    return sigma;
  }
  uint64_t x[MAX_LANES];
  for (size_t lane = 0; lane < lanes; lane++) {
    x[lane] = load_lane(word + LANE_BYTES * lane);
  }
  for (unsigned i = 0; i < r; i++) {
    uint64_t folded = 0;
    for (size_t lane = 0; lane < lanes; lane++) {
      folded ^= x[lane] & code->syndrome_masks[i][lane];
    }
    sigma |= (unsigned)(__builtin_popcountll(folded) & 1) << i;
  }
  return sigma;
}

/* True when every one of the `count` words at `words` has syndrome 0: bit 0 of the OR of all
 * their masked popcounts is clear. Branch-free, so that it vectorises where popcounts do. */
static inline __attribute__((always_inline)) bool words_clean(const SecdedCode *code, const uint8_t *words,
                                                              size_t count, size_t word_bytes, size_t lanes) {
  unsigned r = (unsigned)__builtin_ctzll(word_bytes * 8) + 1;
  if (word_bytes == 2 || word_bytes == 4) {
    uint32_t masks[MAX_CHECK_BITS];
    for (unsigned i = 0; i < r; i++) {
      masks[i] = (uint32_t)code->syndrome_masks[i][0];
    }
    uint32_t any = 0;
    for (size_t w = 0; w < count; w++) {
      uint32_t x = 0;
      memcpy(&x, words + w * word_bytes, word_bytes);
      for (unsigned i = 0; i < r; i++) {
        any |= (uint32_t)__builtin_popcount(x & masks[i]);
      }
    }
    return (any & 1) == 0;
  }
  uint64_t any = 0;
  for (size_t w = 0; w < count; w++) {
    for (unsigned i = 0; i < r; i++) {
      uint64_t folded = 0;
      for (size_t lane = 0; lane < lanes; lane++) {
        folded ^= load_lane(words + w * word_bytes + LANE_BYTES * lane) & code->syndrome_masks[i][lane];
      }
      any |= (uint64_t)__builtin_popcountll(folded);
    }
  }
  return (any & 1) == 0;
}

#if HAS_VECTOR_POPCOUNT
/* words_clean with AVX-512: 64 bytes at a time, each mask i tiled over 512 bits. W <= 64: a
 * 16/32/64-bit element popcount per word, ORed (bit 0 set when some parity is odd); W >= 128: the
 * per-lane parities go to bit i of a lane, and the lanes of one word are XORed together. `count`
 * words fill whole 64-byte vectors (the caller scans the rest with words_clean). */
VECTOR_POPCOUNT_TARGET static bool vectors_clean(const SecdedCode *code, const uint8_t *words, size_t vectors,
                                                 size_t word_bytes) {
  unsigned r = (unsigned)__builtin_ctzll(word_bytes * 8) + 1;
  size_t lanes = word_bytes / LANE_BYTES;
  __m512i masks[MAX_CHECK_BITS];
  for (unsigned i = 0; i < r; i++) {
    uint64_t tiled[8];
    for (size_t lane = 0; lane < 8; lane++) {
      tiled[lane] = code->syndrome_masks[i][lanes > 1 ? lane % lanes : 0];
    }
    masks[i] = _mm512_loadu_si512(tiled);
  }
  __m512i any = _mm512_setzero_si512();
  for (size_t v = 0; v < vectors; v++) {
    __m512i x = _mm512_loadu_si512(words + 64 * v);
    if (word_bytes <= LANE_BYTES) {
      for (unsigned i = 0; i < r; i++) {
        __m512i masked = _mm512_and_si512(x, masks[i]);
        __m512i count = word_bytes == 2   ? _mm512_popcnt_epi16(masked)
                        : word_bytes == 4 ? _mm512_popcnt_epi32(masked)
                                          : _mm512_popcnt_epi64(masked);
        any = _mm512_or_si512(any, count);
      }
    } else {
      __m512i parities = _mm512_setzero_si512();
      for (unsigned i = 0; i < r; i++) {
        __m512i count = _mm512_popcnt_epi64(_mm512_and_si512(x, masks[i]));
        /* parities |= (count & 1) << i */
        parities = _mm512_ternarylogic_epi64(parities, _mm512_slli_epi64(count, i),
                                             _mm512_set1_epi64((long long)1 << i), 0xF8);
      }
      if (lanes >= 2) { /* XOR the lanes of each word: pairs, then quads, then octets */
        parities = _mm512_xor_si512(parities, _mm512_permutex_epi64(parities, 0xB1));
      }
      if (lanes >= 4) {
        parities = _mm512_xor_si512(parities, _mm512_permutex_epi64(parities, 0x4E));
      }
      if (lanes >= 8) {
        parities = _mm512_xor_si512(parities, _mm512_shuffle_i64x2(parities, parities, 0x4E));
      }
      any = _mm512_or_si512(any, parities);
    }
  }
  if (word_bytes <= LANE_BYTES) {
    any = _mm512_and_si512(any, _mm512_set1_epi64(0x0001000100010001));
  }
  return _mm512_test_epi64_mask(any, any) == 0;
}
#endif

/* Acts on a word of syndrome sigma != 0 whose weights `out` already holds as stored: odd parity
 * (P = 1), the bit of index s is flipped back and the word rewritten; even parity, s != 0, the
 * word is zeroed. */
static void repair_word(const DecodePlan *plan, const uint8_t *stream, uint8_t *out, size_t word, unsigned sigma,
                        DecodeCounts *counts) {
  unsigned word_bits = (unsigned)plan->word_bytes * 8;
  if ((sigma & word_bits) == 0) {
    zero_word(plan, out, word);
    counts->masked++;
    return;
  }
  uint8_t repaired[MAX_WORD_BITS / 8];
  memcpy(repaired, stream + word * plan->word_bytes, plan->word_bytes);
  unsigned position = plan->secded.position_of_index[sigma & (word_bits - 1)];
  repaired[position / 8] ^= (uint8_t)(1u << (position % 8));
  size_t first = word * plan->weights_per_word;
  write_weights(plan, repaired, out + first * plan->output_bytes, real_weights(plan, word));
  counts->corrected++;
}

/* Blocks of BLOCK_BYTES (whole words) are scanned at once; only a block with a word of syndrome
 * != 0 is searched word by word. */
static inline __attribute__((always_inline)) void repair_words_with(const DecodePlan *plan, const uint8_t *stream,
                                                                    uint8_t *out, size_t first_word, size_t end_word,
                                                                    size_t word_bytes, size_t lanes,
                                                                    DecodeCounts *counts, bool vector) {
  const SecdedCode *code = &plan->secded;
  size_t words_per_block = BLOCK_BYTES / word_bytes;
  for (size_t block = first_word; block < end_word; block += words_per_block) {
    size_t block_end = end_word - block < words_per_block ? end_word : block + words_per_block;
    const uint8_t *words = stream + block * word_bytes;
#if HAS_VECTOR_POPCOUNT
    if (vector && block_end - block == words_per_block && vectors_clean(code, words, BLOCK_BYTES / 64, word_bytes)) {
      continue;
    }
#else
    (void)vector;
#endif
    if (!vector && words_clean(code, words, block_end - block, word_bytes, lanes)) {
      continue;
    }
    for (size_t word = block; word < block_end; word++) {
      unsigned sigma = word_syndrome(code, stream + word * word_bytes, word_bytes, lanes);
      if (sigma != 0) {
        repair_word(plan, stream, out, word, sigma, counts);
      }
    }
  }
}

/* One copy of the SEC-DED scan per word size, each with constant word_bytes and lanes. */
#define REPAIR_WORDS_BY_SIZE(plan, stream, out, first_word, end_word, counts, vector)     \
  switch ((plan)->word_bytes) {                                                     \
    case 2:                                                                         \
      repair_words_with(plan, stream, out, first_word, end_word, 2, 1, counts, vector);     \
      break;                                                                        \
    case 4:                                                                         \
      repair_words_with(plan, stream, out, first_word, end_word, 4, 1, counts, vector);     \
      break;                                                                        \
    case 8:                                                                         \
      repair_words_with(plan, stream, out, first_word, end_word, 8, 1, counts, vector);     \
      break;                                                                        \
    case 16:                                                                        \
      repair_words_with(plan, stream, out, first_word, end_word, 16, 2, counts, vector);    \
      break;                                                                        \
    case 32:                                                                        \
      repair_words_with(plan, stream, out, first_word, end_word, 32, 4, counts, vector);    \
      break;                                                                        \
    default: /* 64; SEC-DED never fits W = 8 */                                     \
      repair_words_with(plan, stream, out, first_word, end_word, 64, MAX_LANES, counts, vector); \
      break;                                                                        \
  }

TARGET_CLONES static void repair_words_scalar(const DecodePlan *plan, const uint8_t *stream, uint8_t *out,
                                              size_t first_word, size_t end_word, DecodeCounts *counts) {
  REPAIR_WORDS_BY_SIZE(plan, stream, out, first_word, end_word, counts, false)
}

#if HAS_VECTOR_POPCOUNT
VECTOR_POPCOUNT_TARGET static void repair_words_vector(const DecodePlan *plan, const uint8_t *stream, uint8_t *out,
                                                       size_t first_word, size_t end_word, DecodeCounts *counts) {
  REPAIR_WORDS_BY_SIZE(plan, stream, out, first_word, end_word, counts, true)
}
#endif

/* Corrects or masks the words among [first_word, end_word) of the already converted `out` whose
 * syndrome is not 0. */
static void repair_words(const DecodePlan *plan, const uint8_t *stream, uint8_t *out, size_t first_word,
                         size_t end_word, DecodeCounts *counts) {
#if HAS_VECTOR_POPCOUNT
  if (plan->secded.vector_popcount) {
    repair_words_vector(plan, stream, out, first_word, end_word, counts);
    return;
  }
#endif
  repair_words_scalar(plan, stream, out, first_word, end_word, counts);
}

/* ---------------------------------------------------------------- range check */

/* Zeroes the `count` output elements at `out` whose magnitude exceeds plan->range_limit. */
TARGET_CLONES static void apply_range_check(const DecodePlan *plan, uint8_t *out, size_t count) {
  uint32_t limit = plan->range_limit;
  switch (plan->output_type) {
    case ONNX_TYPE_FLOAT:
      for (size_t i = 0; i < count; i++) {
        uint32_t bits;
        memcpy(&bits, out + 4 * i, sizeof bits);
        bits = (bits & 0x7FFFFFFFu) > limit ? 0 : bits;
        memcpy(out + 4 * i, &bits, sizeof bits);
      }
      break;
    case ONNX_TYPE_BFLOAT16:
    case ONNX_TYPE_FLOAT16:
      for (size_t i = 0; i < count; i++) {
        uint16_t bits;
        memcpy(&bits, out + 2 * i, sizeof bits);
        bits = (uint32_t)(bits & 0x7FFFu) > limit ? 0 : bits;
        memcpy(out + 2 * i, &bits, sizeof bits);
      }
      break;
    case ONNX_TYPE_INT8:
      for (size_t i = 0; i < count; i++) {
        int value = (int8_t)out[i];
        out[i] = (uint32_t)(value < 0 ? -value : value) > limit ? 0 : out[i];
      }
      break;
    default: /* UINT8 */
      for (size_t i = 0; i < count; i++) {
        out[i] = out[i] > limit ? 0 : out[i];
      }
      break;
  }
}

/* ---------------------------------------------------------------- decode */

/* Cloned as a static function: GCC exports the ifunc of a cloned global function from the shared
 * library whatever its visibility, so decode_words below is a plain call into it. */
TARGET_CLONES static DecodeCounts decode_range(const DecodePlan *plan, const uint8_t *stream, uint8_t *out,
                                               size_t first_word, size_t end_word) {
  size_t words_per_chunk = CHUNK_BYTES / plan->word_bytes;
  DecodeCounts counts = {0, 0};
  for (size_t chunk = first_word; chunk < end_word; chunk += words_per_chunk) {
    size_t chunk_end = end_word - chunk < words_per_chunk ? end_word : chunk + words_per_chunk;
    size_t first = chunk * plan->weights_per_word;
    size_t end = chunk_end * plan->weights_per_word;
    size_t count = (end < plan->n_weights ? end : plan->n_weights) - first;
    convert_weights(plan, stream, out, first, count);
    switch (plan->check) {
      case WORD_CHECK_PARITY:
        counts.masked += mask_odd_words(plan, stream, out, chunk, chunk_end);
        break;
      case WORD_CHECK_SECDED:
        repair_words(plan, stream, out, chunk, chunk_end, &counts);
        break;
      case WORD_CHECK_NONE:
        break;
    }
    if (plan->range_check) {
      apply_range_check(plan, out + first * plan->output_bytes, count);
    }
  }
  return counts;
}

DecodeCounts decode_words(const DecodePlan *plan, const uint8_t *stream, uint8_t *out, size_t first_word,
                          size_t end_word) {
  if (plan->secded_vector.on) {
    return secded_avx512_decode(plan, stream, out, first_word, end_word, decode_range);
  }
  return decode_range(plan, stream, out, first_word, end_word);
}

size_t mask_words_in_place(const DecodePlan *plan, uint8_t *words, size_t first_word, size_t end_word) {
  return mask_odd_words(plan, words, words, first_word, end_word);
}
