/*
 * ParityCheckUnpack: the onnxruntime custom operator that decodes oppass packed weights.
 *
 * The contract is docs/FORMAT.md ("The ParityCheckUnpack operator"). This file uses the
 * plain onnxruntime C API: one OrtCustomOp in domain "ai.oppass", registered by
 * RegisterCustomOps().
 *
 * Input 0 holds the weights' little-endian bit stream cut into W-bit words; on a
 * little-endian host its raw bytes are exactly that stream, so weight k is the k-th
 * b-bit element of the input's bytes and word i is bytes [i*W/8, (i+1)*W/8). A word with
 * odd parity (XOR of its W bits) is masked: all its weights decode to zero. Output 0 gets
 * the decoded weights, optional output 1 the number of masked words.
 */

#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "onnxruntime_c_api.h"

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the packed stream is read as raw little-endian bytes: a little-endian target is required"
#endif

/* Oldest OrtApi with everything used here: KernelContext_ParallelFor, InferOutputShapeFn,
 * ShapeInferContext_* and ReadOpAttr appeared in API 17 (onnxruntime 1.17); CreateKernelV2 and
 * KernelComputeV2 in 16, KernelInfo_GetNodeName and KernelInfoGetConstantInput_tensor in 15,
 * KernelInfo_GetOutputTypeInfo in 14. */
#define REQUIRED_API_VERSION 17
#define REQUIRED_ORT_RELEASE "1.17"

#define DOMAIN_NAME "ai.oppass"
#define OP_NAME "ParityCheckUnpack"
#define LANE_BYTES 8
#define MESSAGE_CAPACITY 768
/* x86-64 builds carry a second copy of the decoding loops for AVX2/POPCNT CPUs, picked at load time. */
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
#define TARGET_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define TARGET_CLONES
#endif
/* Packed bytes per parallel task; a tensor of at most this many bytes is decoded on the calling thread. */
#define TASK_BYTES ((size_t)256 * 1024)
/* The parity scan tests blocks of BLOCK_BYTES (whole words: W <= 512 bits) for an odd word at once,
 * as BLOCK_VECTORS vectors of BLOCK_VECTOR_BYTES. */
#define BLOCK_VECTOR_BYTES 32
#define BLOCK_VECTORS 8
#define BLOCK_BYTES (BLOCK_VECTOR_BYTES * BLOCK_VECTORS)
/* Packed bytes converted before their parity is scanned, so that the scan reads them from L1. */
#define CHUNK_BYTES ((size_t)8 * 1024)

typedef enum { CHECK_RUNTIME, CHECK_LOAD, CHECK_NONE } CheckMode;

typedef struct {
  const char *name;
  unsigned bits;
  ONNXTensorElementDataType own_type; /* output type with no conversion */
  bool widens_to_float;               /* FLOAT is allowed too (bf16, fp16) */
} WeightFormat;

static const WeightFormat WEIGHT_FORMATS[] = {
    {"fp32", 32, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, false},
    {"bf16", 16, ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16, true},
    {"fp16", 16, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16, true},
    {"int8", 8, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8, false},
    {"uint8", 8, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, false},
};
#define FORMAT_COUNT (sizeof WEIGHT_FORMATS / sizeof WEIGHT_FORMATS[0])

static const unsigned WORD_BITS[] = {8, 16, 32, 64, 128, 256, 512};
#define WORD_BITS_COUNT (sizeof WORD_BITS / sizeof WORD_BITS[0])

/* Converts `count` stored weights to output elements (both unaligned byte buffers). */
typedef void (*WidenFn)(const uint8_t *in, uint8_t *out, size_t count);

/* Everything the decoding loops need, fixed at kernel creation. */
typedef struct {
  size_t weight_bytes;     /* b / 8 */
  size_t output_bytes;     /* bytes of one output element */
  size_t word_bytes;       /* W / 8 */
  size_t weights_per_word; /* N = W / b */
  size_t n_weights;
  size_t n_words;
  WidenFn widen; /* NULL: an output element is the stored weight's bytes */
  bool check;    /* false for check = none */
} DecodePlan;

typedef struct {
  const OrtApi *api;
  char *node_name;
  const WeightFormat *format;
  unsigned word_bits;
  CheckMode check;
  ONNXTensorElementDataType output_type;
  ONNXTensorElementDataType packed_type;
  int64_t *shape; /* decoded tensor dims (NULL for a scalar) */
  size_t rank;
  int64_t packed_dims[2];
  DecodePlan plan;
  uint8_t *load_decoded; /* check = load: the weights decoded at kernel creation */
  int64_t load_masked;
} Kernel;

typedef struct {
  OrtCustomOp base;
  const OrtApi *api; /* for InferOutputShapeFn, which gets no api argument */
} OppassOp;

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

/* Decodes words [first_word, end_word) into `out`, a chunk at a time; returns how many were masked. */
TARGET_CLONES static size_t decode_words(const DecodePlan *plan, const uint8_t *stream, uint8_t *out,
                                         size_t first_word, size_t end_word) {
  size_t words_per_chunk = CHUNK_BYTES / plan->word_bytes;
  size_t masked = 0;
  for (size_t chunk = first_word; chunk < end_word; chunk += words_per_chunk) {
    size_t chunk_end = end_word - chunk < words_per_chunk ? end_word : chunk + words_per_chunk;
    size_t first = chunk * plan->weights_per_word;
    size_t end = chunk_end * plan->weights_per_word;
    convert_weights(plan, stream, out, first, (end < plan->n_weights ? end : plan->n_weights) - first);
    if (plan->check) {
      masked += mask_odd_words(plan, stream, out, chunk, chunk_end);
    }
  }
  return masked;
}

typedef struct {
  const DecodePlan *plan;
  const uint8_t *stream;
  uint8_t *out;
  size_t words_per_task;
  size_t *masked_per_task;
} ParallelDecode;

static void decode_task(void *data, size_t task) {
  const ParallelDecode *job = data;
  size_t first = task * job->words_per_task;
  size_t remaining = job->plan->n_words - first;
  size_t end = first + (remaining < job->words_per_task ? remaining : job->words_per_task);
  job->masked_per_task[task] = decode_words(job->plan, job->stream, job->out, first, end);
}

/* ---------------------------------------------------------------- errors */

static OrtStatus *node_error(const Kernel *kernel, OrtErrorCode code, const char *format, ...)
    __attribute__((format(printf, 3, 4)));

static OrtStatus *node_error(const Kernel *kernel, OrtErrorCode code, const char *format, ...) {
  char detail[MESSAGE_CAPACITY];
  va_list arguments;
  va_start(arguments, format);
  vsnprintf(detail, sizeof detail, format, arguments);
  va_end(arguments);
  char message[MESSAGE_CAPACITY + 128];
  snprintf(message, sizeof message, OP_NAME " node '%s': %s", kernel->node_name ? kernel->node_name : "", detail);
  return kernel->api->CreateStatus(code, message);
}

/* Replaces a failed onnxruntime call's status by one naming the node and what was being done. */
static OrtStatus *node_api_error(const Kernel *kernel, OrtStatus *status, const char *doing) {
  if (status == NULL) {
    return NULL;
  }
  OrtStatus *named = node_error(kernel, kernel->api->GetErrorCode(status), "%s: %s", doing,
                                kernel->api->GetErrorMessage(status));
  kernel->api->ReleaseStatus(status);
  return named;
}

#define RETURN_IF_ERROR(expression)        \
  do {                                     \
    OrtStatus *returned_status = (expression); \
    if (returned_status != NULL) {         \
      return returned_status;              \
    }                                      \
  } while (0)

static const char *element_type_name(ONNXTensorElementDataType type) {
  switch (type) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return "FLOAT";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: return "BFLOAT16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return "FLOAT16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8: return "INT8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8: return "UINT8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT16: return "UINT16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT32: return "UINT32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT64: return "UINT64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: return "INT64";
    default: return "another type";
  }
}

/* ---------------------------------------------------------------- attributes */

static OrtStatus *read_node_name(Kernel *kernel, const OrtKernelInfo *info) {
  size_t size = 0;
  RETURN_IF_ERROR(kernel->api->KernelInfo_GetNodeName(info, NULL, &size));
  kernel->node_name = calloc(size + 1, 1);
  if (kernel->node_name == NULL) {
    return kernel->api->CreateStatus(ORT_FAIL, OP_NAME ": out of memory");
  }
  return kernel->api->KernelInfo_GetNodeName(info, kernel->node_name, &size);
}

static OrtStatus *missing_attribute(const Kernel *kernel, OrtStatus *status, const char *name, const char *kind) {
  char doing[96];
  snprintf(doing, sizeof doing, "attribute '%s' (%s) is missing or has the wrong type", name, kind);
  return node_api_error(kernel, status, doing);
}

/* Reads a string attribute into a malloc'ed buffer the caller frees. */
static OrtStatus *read_string_attribute(const Kernel *kernel, const OrtKernelInfo *info, const char *name,
                                        char **value) {
  size_t size = 0;
  RETURN_IF_ERROR(missing_attribute(kernel, kernel->api->KernelInfoGetAttribute_string(info, name, NULL, &size), name,
                                    "string"));
  *value = calloc(size + 1, 1);
  if (*value == NULL) {
    return kernel->api->CreateStatus(ORT_FAIL, OP_NAME ": out of memory");
  }
  return missing_attribute(kernel, kernel->api->KernelInfoGetAttribute_string(info, name, *value, &size), name,
                           "string");
}

static OrtStatus *read_format(Kernel *kernel, const OrtKernelInfo *info) {
  char *name = NULL;
  OrtStatus *status = read_string_attribute(kernel, info, "format", &name);
  for (size_t i = 0; status == NULL && i < FORMAT_COUNT; i++) {
    if (strcmp(name, WEIGHT_FORMATS[i].name) == 0) {
      kernel->format = &WEIGHT_FORMATS[i];
    }
  }
  if (status == NULL && kernel->format == NULL) {
    status = node_error(kernel, ORT_INVALID_GRAPH, "unknown format '%s': expected fp32, bf16, fp16, int8 or uint8",
                        name);
  }
  free(name);
  return status;
}

static OrtStatus *read_check(Kernel *kernel, const OrtKernelInfo *info) {
  static const char *const CHECK_NAMES[] = {"runtime", "load", "none"};
  char *name = NULL;
  OrtStatus *status = read_string_attribute(kernel, info, "check", &name);
  bool known = false;
  for (size_t i = 0; status == NULL && i < sizeof CHECK_NAMES / sizeof CHECK_NAMES[0]; i++) {
    if (strcmp(name, CHECK_NAMES[i]) == 0) {
      kernel->check = (CheckMode)i;
      known = true;
    }
  }
  if (status == NULL && !known) {
    status = node_error(kernel, ORT_INVALID_GRAPH, "unknown check '%s': expected runtime, load or none", name);
  }
  free(name);
  return status;
}

static OrtStatus *read_word_bits(Kernel *kernel, const OrtKernelInfo *info) {
  int64_t word_bits = 0;
  RETURN_IF_ERROR(missing_attribute(kernel, kernel->api->KernelInfoGetAttribute_int64(info, "word_bits", &word_bits),
                                    "word_bits", "int"));
  unsigned bits = kernel->format->bits;
  for (size_t i = 0; i < WORD_BITS_COUNT; i++) {
    if (word_bits == WORD_BITS[i] && word_bits >= bits) {
      kernel->word_bits = WORD_BITS[i];
      return NULL;
    }
  }
  return node_error(kernel, ORT_INVALID_GRAPH,
                    "word_bits %lld is not valid for %s: expected %u (one weight per word) or one of 16, 32, 64, "
                    "128, 256, 512 not below %u",
                    (long long)word_bits, kernel->format->name, bits, bits);
}

static OrtStatus *read_output_type(Kernel *kernel, const OrtKernelInfo *info) {
  int64_t output_type = 0;
  RETURN_IF_ERROR(missing_attribute(
      kernel, kernel->api->KernelInfoGetAttribute_int64(info, "output_type", &output_type), "output_type", "int"));
  const WeightFormat *format = kernel->format;
  if (output_type == format->own_type ||
      (format->widens_to_float && output_type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)) {
    kernel->output_type = (ONNXTensorElementDataType)output_type;
    return NULL;
  }
  return node_error(kernel, ORT_INVALID_GRAPH, "output_type %lld is not allowed for %s: expected %d (%s)%s",
                    (long long)output_type, format->name, (int)format->own_type, element_type_name(format->own_type),
                    format->widens_to_float ? " or 1 (FLOAT)" : "");
}

/* Reads `shape` and sets kernel->rank, kernel->shape and the element count (overflow-checked). */
static OrtStatus *read_shape(Kernel *kernel, const OrtKernelInfo *info, size_t *n_weights) {
  size_t rank = 0;
  RETURN_IF_ERROR(missing_attribute(kernel, kernel->api->KernelInfoGetAttributeArray_int64(info, "shape", NULL, &rank),
                                    "shape", "ints"));
  if (rank != 0) {
    kernel->shape = calloc(rank, sizeof *kernel->shape);
    if (kernel->shape == NULL) {
      return kernel->api->CreateStatus(ORT_FAIL, OP_NAME ": out of memory");
    }
    RETURN_IF_ERROR(missing_attribute(
        kernel, kernel->api->KernelInfoGetAttributeArray_int64(info, "shape", kernel->shape, &rank), "shape", "ints"));
  }
  kernel->rank = rank;
  size_t count = 1;
  for (size_t axis = 0; axis < rank; axis++) {
    int64_t dim = kernel->shape[axis];
    if (dim < 0) {
      return node_error(kernel, ORT_INVALID_GRAPH, "shape has a negative dimension %lld at axis %zu", (long long)dim,
                        axis);
    }
    if ((uint64_t)dim > SIZE_MAX || __builtin_mul_overflow(count, (size_t)dim, &count)) {
      return node_error(kernel, ORT_INVALID_GRAPH, "shape's element count overflows");
    }
  }
  *n_weights = count;
  return NULL;
}

static ONNXTensorElementDataType storage_type(unsigned word_bits) {
  switch (word_bits) {
    case 8: return ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
    case 16: return ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT16;
    case 32: return ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT32;
    default: return ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT64;
  }
}

static WidenFn widen_function(const Kernel *kernel) {
  if (kernel->output_type == kernel->format->own_type) {
    return NULL;
  }
  return kernel->format->own_type == ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16 ? widen_bf16 : widen_fp16;
}

/* Fills the decode plan and the packed input's expected type and dims from the attributes. */
static OrtStatus *plan_decoding(Kernel *kernel, size_t n_weights) {
  DecodePlan *plan = &kernel->plan;
  plan->weight_bytes = kernel->format->bits / 8;
  plan->output_bytes = widen_function(kernel) != NULL ? sizeof(float) : plan->weight_bytes;
  plan->word_bytes = kernel->word_bits / 8;
  plan->weights_per_word = kernel->word_bits / kernel->format->bits;
  plan->n_weights = n_weights;
  plan->n_words = n_weights / plan->weights_per_word + (n_weights % plan->weights_per_word != 0);
  plan->widen = widen_function(kernel);
  plan->check = kernel->check != CHECK_NONE;
  size_t output_size = 0;
  if (__builtin_mul_overflow(n_weights, plan->output_bytes, &output_size) || output_size > (size_t)INT64_MAX) {
    return node_error(kernel, ORT_INVALID_GRAPH, "shape's %zu elements overflow the addressable size", n_weights);
  }
  size_t lanes = kernel->word_bits >= 64 ? kernel->word_bits / 64 : 1;
  kernel->packed_type = storage_type(kernel->word_bits);
  kernel->packed_dims[0] = (int64_t)plan->n_words;
  kernel->packed_dims[1] = (int64_t)lanes;
  return NULL;
}

static OrtStatus *read_attributes(Kernel *kernel, const OrtKernelInfo *info) {
  size_t n_weights = 0;
  RETURN_IF_ERROR(read_format(kernel, info));
  RETURN_IF_ERROR(read_word_bits(kernel, info));
  RETURN_IF_ERROR(read_check(kernel, info));
  RETURN_IF_ERROR(read_output_type(kernel, info));
  RETURN_IF_ERROR(read_shape(kernel, info, &n_weights));
  return plan_decoding(kernel, n_weights);
}

/* Output 0's element type in the graph must be output_type: onnxruntime allocates it with that type. */
static OrtStatus *check_graph_output_type(const Kernel *kernel, const OrtKernelInfo *info) {
  const OrtApi *api = kernel->api;
  OrtTypeInfo *type_info = NULL;
  RETURN_IF_ERROR(node_api_error(kernel, api->KernelInfo_GetOutputTypeInfo(info, 0, &type_info),
                                 "reading output 0's type"));
  const OrtTensorTypeAndShapeInfo *tensor_info = NULL;
  ONNXTensorElementDataType graph_type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  OrtStatus *status = api->CastTypeInfoToTensorInfo(type_info, &tensor_info);
  if (status == NULL && tensor_info != NULL) {
    status = api->GetTensorElementType(tensor_info, &graph_type);
  }
  api->ReleaseTypeInfo(type_info);
  RETURN_IF_ERROR(node_api_error(kernel, status, "reading output 0's type"));
  if (graph_type != kernel->output_type) {
    return node_error(kernel, ORT_INVALID_GRAPH,
                      "output 0 has element type %d (%s) in the graph but output_type is %d (%s); declare the "
                      "output's type in the model if this onnxruntime does not infer it from output_type",
                      (int)graph_type, element_type_name(graph_type), (int)kernel->output_type,
                      element_type_name(kernel->output_type));
  }
  return NULL;
}

/* ---------------------------------------------------------------- packed input */

/* Checks the packed tensor's element type and dims against the attributes; returns its bytes. */
static OrtStatus *packed_stream(const Kernel *kernel, const OrtValue *packed, const uint8_t **stream) {
  const OrtApi *api = kernel->api;
  OrtTensorTypeAndShapeInfo *info = NULL;
  RETURN_IF_ERROR(node_api_error(kernel, api->GetTensorTypeAndShape(packed, &info), "reading the packed input"));
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  size_t rank = 0;
  int64_t dims[2] = {0, 0};
  OrtStatus *status = api->GetTensorElementType(info, &type);
  if (status == NULL) {
    status = api->GetDimensionsCount(info, &rank);
  }
  if (status == NULL && rank == 2) {
    status = api->GetDimensions(info, dims, 2);
  }
  api->ReleaseTensorTypeAndShapeInfo(info);
  RETURN_IF_ERROR(node_api_error(kernel, status, "reading the packed input"));
  if (type != kernel->packed_type) {
    return node_error(kernel, ORT_INVALID_ARGUMENT, "packed input has element type %s, expected %s for %u-bit words",
                      element_type_name(type), element_type_name(kernel->packed_type), kernel->word_bits);
  }
  if (rank != 2) {
    return node_error(kernel, ORT_INVALID_ARGUMENT, "packed input has rank %zu, expected 2 ([n_words, lanes] = [%lld, %lld])",
                      rank, (long long)kernel->packed_dims[0], (long long)kernel->packed_dims[1]);
  }
  if (dims[0] != kernel->packed_dims[0] || dims[1] != kernel->packed_dims[1]) {
    return node_error(kernel, ORT_INVALID_ARGUMENT,
                      "packed input has dims [%lld, %lld], expected [%lld, %lld] for %zu %s weights in %u-bit words",
                      (long long)dims[0], (long long)dims[1], (long long)kernel->packed_dims[0],
                      (long long)kernel->packed_dims[1], kernel->plan.n_weights, kernel->format->name,
                      kernel->word_bits);
  }
  void *data = NULL;
  RETURN_IF_ERROR(node_api_error(kernel, api->GetTensorMutableData((OrtValue *)packed, &data),
                                 "reading the packed input"));
  *stream = data;
  return NULL;
}

/* Decodes the whole tensor, over onnxruntime's intra-op threads when `context` is given and it pays. */
static OrtStatus *decode_all(const Kernel *kernel, OrtKernelContext *context, const uint8_t *stream, uint8_t *out,
                             int64_t *masked) {
  const DecodePlan *plan = &kernel->plan;
  size_t words_per_task = TASK_BYTES / plan->word_bytes;
  size_t tasks = plan->n_words / words_per_task + (plan->n_words % words_per_task != 0);
  if (context == NULL || tasks < 2) {
    *masked = plan->n_words == 0 ? 0 : (int64_t)decode_words(plan, stream, out, 0, plan->n_words);
    return NULL;
  }
  size_t *masked_per_task = calloc(tasks, sizeof *masked_per_task);
  if (masked_per_task == NULL) {
    return node_error(kernel, ORT_FAIL, "out of memory for %zu decode tasks", tasks);
  }
  ParallelDecode job = {plan, stream, out, words_per_task, masked_per_task};
  OrtStatus *status = kernel->api->KernelContext_ParallelFor(context, decode_task, tasks, 0, &job);
  size_t total = 0;
  for (size_t task = 0; task < tasks; task++) {
    total += masked_per_task[task];
  }
  free(masked_per_task);
  *masked = (int64_t)total;
  return node_api_error(kernel, status, "running the parallel decode");
}

static OrtStatus *decode_at_load(Kernel *kernel, const OrtKernelInfo *info) {
  int is_constant = 0;
  const OrtValue *packed = NULL;
  RETURN_IF_ERROR(node_api_error(kernel, kernel->api->KernelInfoGetConstantInput_tensor(info, 0, &is_constant, &packed),
                                 "reading the constant packed input"));
  if (!is_constant || packed == NULL) {
    return node_error(kernel, ORT_INVALID_GRAPH,
                      "check=load needs the packed input to be a constant initializer, but it is computed or fed");
  }
  const uint8_t *stream = NULL;
  RETURN_IF_ERROR(packed_stream(kernel, packed, &stream));
  size_t bytes = kernel->plan.n_weights * kernel->plan.output_bytes;
  kernel->load_decoded = malloc(bytes != 0 ? bytes : 1);
  if (kernel->load_decoded == NULL) {
    return node_error(kernel, ORT_FAIL, "out of memory for %zu decoded bytes", bytes);
  }
  return decode_all(kernel, NULL, stream, kernel->load_decoded, &kernel->load_masked);
}

/* ---------------------------------------------------------------- kernel callbacks */

static void ORT_API_CALL destroy_kernel(void *opaque) {
  Kernel *kernel = opaque;
  if (kernel == NULL) {
    return;
  }
  free(kernel->node_name);
  free(kernel->shape);
  free(kernel->load_decoded);
  free(kernel);
}

static OrtStatus *ORT_API_CALL create_kernel(const OrtCustomOp *op, const OrtApi *api, const OrtKernelInfo *info,
                                             void **kernel_out) {
  (void)op;
  Kernel *kernel = calloc(1, sizeof *kernel);
  if (kernel == NULL) {
    return api->CreateStatus(ORT_FAIL, OP_NAME ": out of memory");
  }
  kernel->api = api;
  OrtStatus *status = read_node_name(kernel, info);
  if (status == NULL) {
    status = read_attributes(kernel, info);
  }
  if (status == NULL) {
    status = check_graph_output_type(kernel, info);
  }
  if (status == NULL && kernel->check == CHECK_LOAD) {
    status = decode_at_load(kernel, info);
  }
  if (status != NULL) {
    destroy_kernel(kernel);
    return status;
  }
  *kernel_out = kernel;
  return NULL;
}

static OrtStatus *write_masked_count(const Kernel *kernel, OrtKernelContext *context, int64_t masked) {
  size_t outputs = 0;
  RETURN_IF_ERROR(node_api_error(kernel, kernel->api->KernelContext_GetOutputCount(context, &outputs),
                                 "counting outputs"));
  if (outputs < 2) {
    return NULL;
  }
  OrtValue *count = NULL;
  RETURN_IF_ERROR(node_api_error(kernel, kernel->api->KernelContext_GetOutput(context, 1, NULL, 0, &count),
                                 "allocating masked_words"));
  if (count == NULL) { /* output 1 named "" in the node */
    return NULL;
  }
  void *data = NULL;
  RETURN_IF_ERROR(node_api_error(kernel, kernel->api->GetTensorMutableData(count, &data), "writing masked_words"));
  memcpy(data, &masked, sizeof masked);
  return NULL;
}

static OrtStatus *ORT_API_CALL compute_kernel(void *opaque, OrtKernelContext *context) {
  const Kernel *kernel = opaque;
  const OrtApi *api = kernel->api;
  const uint8_t *stream = NULL;
  if (kernel->check != CHECK_LOAD) {
    const OrtValue *packed = NULL;
    RETURN_IF_ERROR(node_api_error(kernel, api->KernelContext_GetInput(context, 0, &packed), "reading input 0"));
    RETURN_IF_ERROR(packed_stream(kernel, packed, &stream));
  }
  OrtValue *weights = NULL;
  void *out = NULL;
  RETURN_IF_ERROR(node_api_error(kernel, api->KernelContext_GetOutput(context, 0, kernel->shape, kernel->rank, &weights),
                                 "allocating the weights output"));
  RETURN_IF_ERROR(node_api_error(kernel, api->GetTensorMutableData(weights, &out), "allocating the weights output"));
  int64_t masked = 0;
  if (kernel->check == CHECK_LOAD) {
    size_t bytes = kernel->plan.n_weights * kernel->plan.output_bytes;
    if (bytes != 0) {
      memcpy(out, kernel->load_decoded, bytes);
    }
    masked = kernel->load_masked;
  } else {
    RETURN_IF_ERROR(decode_all(kernel, context, stream, out, &masked));
  }
  return write_masked_count(kernel, context, masked);
}

/* ---------------------------------------------------------------- type and shape inference */

/* Releases a status; true when there was none. */
static bool succeeded(const OrtApi *api, OrtStatus *status) {
  if (status == NULL) {
    return true;
  }
  api->ReleaseStatus(status);
  return false;
}

static bool is_output_type(int64_t type) {
  for (size_t i = 0; i < FORMAT_COUNT; i++) {
    if (type == WEIGHT_FORMATS[i].own_type) {
      return true;
    }
  }
  return false;
}

/* Reads `shape`; returns false (nothing to free) when it is missing or has a negative dim. */
static bool read_inferred_shape(const OrtApi *api, OrtShapeInferContext *context, int64_t **dims, size_t *rank) {
  const OrtOpAttr *attribute = NULL;
  size_t bytes = 0;
  if (!succeeded(api, api->ShapeInferContext_GetAttribute(context, "shape", &attribute))) {
    return false;
  }
  succeeded(api, api->ReadOpAttr(attribute, ORT_OP_ATTR_INTS, NULL, 0, &bytes)); /* only asks for the size */
  *rank = bytes / sizeof(int64_t);
  *dims = calloc(*rank + 1, sizeof(int64_t));
  if (*dims == NULL || !succeeded(api, api->ReadOpAttr(attribute, ORT_OP_ATTR_INTS, *dims, bytes, &bytes))) {
    free(*dims);
    return false;
  }
  for (size_t axis = 0; axis < *rank; axis++) {
    if ((*dims)[axis] < 0) {
      free(*dims);
      return false;
    }
  }
  return true;
}

/* Sets output 0's element type (output_type) and shape (shape). onnxruntime ignores, and leaks, a
 * status returned from here, so a bad attribute leaves the output alone and kernel creation
 * reports it with the node's name. */
static OrtStatus *ORT_API_CALL infer_output_type_and_shape(const OrtCustomOp *op, OrtShapeInferContext *context) {
  const OrtApi *api = ((const OppassOp *)op)->api;
  const OrtOpAttr *attribute = NULL;
  int64_t output_type = 0;
  size_t size = 0;
  if (!succeeded(api, api->ShapeInferContext_GetAttribute(context, "output_type", &attribute)) ||
      !succeeded(api, api->ReadOpAttr(attribute, ORT_OP_ATTR_INT, &output_type, sizeof output_type, &size)) ||
      !is_output_type(output_type)) {
    return NULL;
  }
  int64_t *dims = NULL;
  size_t rank = 0;
  if (!read_inferred_shape(api, context, &dims, &rank)) {
    return NULL;
  }
  OrtTensorTypeAndShapeInfo *info = NULL;
  if (succeeded(api, api->CreateTensorTypeAndShapeInfo(&info))) {
    if (succeeded(api, api->SetTensorElementType(info, (ONNXTensorElementDataType)output_type)) &&
        succeeded(api, api->SetDimensions(info, dims, rank))) {
      succeeded(api, api->ShapeInferContext_SetOutputTypeShape(context, 0, info));
    }
    api->ReleaseTensorTypeAndShapeInfo(info);
  }
  free(dims);
  return NULL;
}

/* ---------------------------------------------------------------- schema */

static const char *ORT_API_CALL op_name(const OrtCustomOp *op) {
  (void)op;
  return OP_NAME;
}

static const char *ORT_API_CALL op_execution_provider(const OrtCustomOp *op) {
  (void)op;
  return NULL; /* CPU */
}

static ONNXTensorElementDataType ORT_API_CALL op_input_type(const OrtCustomOp *op, size_t index) {
  (void)op;
  (void)index;
  return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED; /* uint8/16/32/64, checked against word_bits */
}

static size_t ORT_API_CALL op_input_count(const OrtCustomOp *op) {
  (void)op;
  return 1;
}

static ONNXTensorElementDataType ORT_API_CALL op_output_type(const OrtCustomOp *op, size_t index) {
  (void)op;
  return index == 0 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED : ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
}

static size_t ORT_API_CALL op_output_count(const OrtCustomOp *op) {
  (void)op;
  return 2;
}

static OrtCustomOpInputOutputCharacteristic ORT_API_CALL op_input_characteristic(const OrtCustomOp *op,
                                                                                 size_t index) {
  (void)op;
  (void)index;
  return INPUT_OUTPUT_REQUIRED;
}

static OrtCustomOpInputOutputCharacteristic ORT_API_CALL op_output_characteristic(const OrtCustomOp *op,
                                                                                  size_t index) {
  (void)op;
  return index == 0 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
}

static OrtMemType ORT_API_CALL op_input_memory_type(const OrtCustomOp *op, size_t index) {
  (void)op;
  (void)index;
  return OrtMemTypeDefault;
}

/* version = REQUIRED_API_VERSION: onnxruntime hands CreateKernelV2 that OrtApi and reads only the
 * OrtCustomOp fields of that version, so the library loads on any runtime from 1.17 on. */
static OppassOp parity_check_unpack = {
    .base =
        {
            .version = REQUIRED_API_VERSION,
            .GetName = op_name,
            .GetExecutionProviderType = op_execution_provider,
            .GetInputType = op_input_type,
            .GetInputTypeCount = op_input_count,
            .GetOutputType = op_output_type,
            .GetOutputTypeCount = op_output_count,
            .KernelDestroy = destroy_kernel,
            .GetInputCharacteristic = op_input_characteristic,
            .GetOutputCharacteristic = op_output_characteristic,
            .GetInputMemoryType = op_input_memory_type,
            .CreateKernelV2 = create_kernel,
            .KernelComputeV2 = compute_kernel,
            .InferOutputShapeFn = infer_output_type_and_shape,
        },
    .api = NULL,
};

/* ---------------------------------------------------------------- registration */

/* One domain shared by every SessionOptions that loads the library; released when it is unloaded. */
static pthread_mutex_t domain_lock = PTHREAD_MUTEX_INITIALIZER;
static OrtCustomOpDomain *shared_domain;

static OrtStatus *oppass_domain(const OrtApi *api, OrtCustomOpDomain **domain) {
  pthread_mutex_lock(&domain_lock);
  OrtStatus *status = NULL;
  if (shared_domain == NULL) {
    parity_check_unpack.api = api;
    OrtCustomOpDomain *created = NULL;
    status = api->CreateCustomOpDomain(DOMAIN_NAME, &created);
    if (status == NULL) {
      status = api->CustomOpDomain_Add(created, &parity_check_unpack.base);
      if (status == NULL) {
        shared_domain = created;
      } else {
        api->ReleaseCustomOpDomain(created);
      }
    }
  }
  *domain = shared_domain;
  pthread_mutex_unlock(&domain_lock);
  return status;
}

__attribute__((destructor)) static void release_oppass_domain(void) {
  if (shared_domain != NULL) {
    parity_check_unpack.api->ReleaseCustomOpDomain(shared_domain);
    shared_domain = NULL;
  }
}

/* Without OrtApi version 17 no status can be made from it: make one from API 1, which every
 * onnxruntime provides; if even that fails, print the message and let model loading fail. */
static OrtStatus *unsupported_runtime(const OrtApiBase *api_base) {
  char message[256];
  snprintf(message, sizeof message,
           "the oppass custom-op library needs onnxruntime >= " REQUIRED_ORT_RELEASE
           " (C API version %d); this process runs onnxruntime %s",
           REQUIRED_API_VERSION, api_base->GetVersionString());
  const OrtApi *oldest = api_base->GetApi(1);
  if (oldest == NULL) {
    fprintf(stderr, "%s\n", message);
    return NULL;
  }
  return oldest->CreateStatus(ORT_FAIL, message);
}

ORT_EXPORT OrtStatus *ORT_API_CALL RegisterCustomOps(OrtSessionOptions *options, const OrtApiBase *api_base);

ORT_EXPORT OrtStatus *ORT_API_CALL RegisterCustomOps(OrtSessionOptions *options, const OrtApiBase *api_base) {
  const OrtApi *api = api_base->GetApi(REQUIRED_API_VERSION);
  if (api == NULL) {
    return unsupported_runtime(api_base);
  }
  OrtCustomOpDomain *domain = NULL;
  RETURN_IF_ERROR(oppass_domain(api, &domain));
  return api->AddCustomOpDomain(options, domain);
}
