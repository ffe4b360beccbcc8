/*
 * The oppass weight decoder, without onnxruntime: the weight formats and word sizes of
 * docs/FORMAT.md, the rules a decode node's attributes must follow ("Validation"), and the
 * decoding of packed words (conversion, parity scan, masking).
 *
 * The packed input holds the weights' little-endian bit stream cut into W-bit words; on a
 * little-endian host its raw bytes are exactly that stream, so weight k is the k-th b-bit element
 * of the stream and word i is bytes [i*W/8, (i+1)*W/8). A word that fails its check (odd parity:
 * the XOR of its W bits is 1) is masked: all its weights decode to zero.
 *
 * The ParityCheckUnpack kernel (parity_check_unpack.c) validates nodes and decodes through this
 * file; the fuzz harness (fuzz/) drives it directly.
 */

#ifndef OPPASS_DECODER_H
#define OPPASS_DECODER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the packed stream is read as raw little-endian bytes: a little-endian target is required"
#endif

/* The ONNX element types (TensorProto.DataType values) the operator reads or writes. */
typedef enum {
  ONNX_TYPE_FLOAT = 1,
  ONNX_TYPE_UINT8 = 2,
  ONNX_TYPE_INT8 = 3,
  ONNX_TYPE_UINT16 = 4,
  ONNX_TYPE_FLOAT16 = 10,
  ONNX_TYPE_UINT32 = 12,
  ONNX_TYPE_UINT64 = 13,
  ONNX_TYPE_BFLOAT16 = 16,
} OnnxType;

typedef struct {
  const char *name;
  unsigned bits;         /* b */
  OnnxType own_type;     /* output type with no conversion */
  bool widens_to_float;  /* FLOAT is an allowed output type too (bf16, fp16) */
} WeightFormat;

extern const WeightFormat WEIGHT_FORMATS[];
extern const size_t WEIGHT_FORMAT_COUNT;

/* The largest W; word sizes are b or a power of two from 16 to this. */
#define MAX_WORD_BITS 512

/* A tensor holds fewer weights than this, so every bit and byte count of it fits an int64_t. */
#define WEIGHT_COUNT_LIMIT ((uint64_t)1 << 58)

/* The format named exactly by these `length` bytes, or NULL. */
const WeightFormat *find_weight_format(const char *name, size_t length);

/* True when W = word_bits is allowed for the format: b, or one of 16..512 not below b. */
bool word_bits_allowed(const WeightFormat *format, int64_t word_bits);

/* True when output_type is the format's own type, or FLOAT for a format that widens to it. */
bool output_type_allowed(const WeightFormat *format, int64_t output_type);

typedef enum { SHAPE_VALID, SHAPE_NEGATIVE_DIM, SHAPE_TOO_LARGE } ShapeVerdict;

/* Checks a decoded tensor's dims: every dim >= 0 and their product below WEIGHT_COUNT_LIMIT (a
 * zero dim makes it 0, whatever the others). Sets *n_weights when valid and *axis to the first
 * negative dim. */
ShapeVerdict count_weights(const int64_t *dims, size_t rank, size_t *n_weights, size_t *axis);

/* How each word is checked. The seam for further codes: each gets a value here and its own
 * branch in decode_words. */
typedef enum {
  WORD_CHECK_NONE,   /* plain unpack, no word is masked */
  WORD_CHECK_PARITY, /* a word of odd parity is masked */
} WordCheck;

/* Converts `count` stored weights to output elements (both unaligned byte buffers). */
typedef void (*WidenFn)(const uint8_t *in, uint8_t *out, size_t count);

/* Everything the decoding loops need, fixed once per node. */
typedef struct {
  size_t weight_bytes;     /* b / 8 */
  size_t output_bytes;     /* bytes of one output element */
  size_t word_bytes;       /* W / 8 */
  size_t weights_per_word; /* N = W / b */
  size_t lanes;            /* L = max(1, W / 64): uint64 elements per word when W >= 64 */
  size_t n_weights;
  size_t n_words;          /* ceil(n_weights / N) */
  WidenFn widen;           /* NULL: an output element is the stored weight's bytes */
  WordCheck check;
  OnnxType packed_type;    /* element type of the packed input */
} DecodePlan;

/* The plan for n_weights (< WEIGHT_COUNT_LIMIT) weights of `format` in W-bit words, decoded to
 * output_type; word_bits and output_type must be allowed for the format. */
DecodePlan plan_decode(const WeightFormat *format, unsigned word_bits, OnnxType output_type, WordCheck check,
                       size_t n_weights);

/* Decodes words [first_word, end_word) of `stream` (plan->n_words * plan->word_bytes bytes) into
 * `out` (plan->n_weights * plan->output_bytes bytes, indexed from weight 0); returns how many of
 * those words were masked. Disjoint word ranges may be decoded concurrently into one `out`. */
size_t decode_words(const DecodePlan *plan, const uint8_t *stream, uint8_t *out, size_t first_word, size_t end_word);

#endif
