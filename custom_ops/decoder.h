/*
 * The oppass weight decoder, without onnxruntime: the weight formats and word sizes of
 * docs/FORMAT.md, the rules a decode node's attributes must follow ("Validation"), and the
 * decoding of packed words (conversion, parity scan or SEC-DED syndrome decode, masking,
 * range check).
 *
 * The packed input holds the weights' little-endian bit stream cut into W-bit words; on a
 * little-endian host its raw bytes are exactly that stream, so weight k is the k-th b-bit element
 * of the stream and word i is bytes [i*W/8, (i+1)*W/8). A word that fails its check (odd parity:
 * the XOR of its W bits is 1) is masked: all its weights decode to zero. With SEC-DED, a word's
 * syndrome corrects one flipped bit or masks the word, and the code's check bits (the lowest bits
 * of the weights, "stolen bits") are cleared in every decoded weight. The range check zeroes each
 * decoded weight whose magnitude is not at most range_max.
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
  unsigned stolen_bit_budget; /* SEC-DED fits a word when no weight loses more bits than this */
} WeightFormat;

extern const WeightFormat WEIGHT_FORMATS[];
extern const size_t WEIGHT_FORMAT_COUNT;

/* The largest W; word sizes are b or a power of two from 16 to this. */
#define MAX_WORD_BITS 512
/* uint64 lanes of the largest word. */
#define MAX_LANES (MAX_WORD_BITS / 64)
/* SEC-DED check bits r of the largest word: 2^(r-1) = W. */
#define MAX_CHECK_BITS 10

/* A tensor holds fewer weights than this, so every bit and byte count of it fits an int64_t. */
#define WEIGHT_COUNT_LIMIT ((uint64_t)1 << 58)

/* The format named exactly by these `length` bytes, or NULL. */
const WeightFormat *find_weight_format(const char *name, size_t length);

/* True when W = word_bits is allowed for the format: b, or one of 16..512 not below b. */
bool word_bits_allowed(const WeightFormat *format, int64_t word_bits);

/* True when output_type is the format's own type, or FLOAT for a format that widens to it. */
bool output_type_allowed(const WeightFormat *format, int64_t output_type);

/* SEC-DED's check bits r for a W-bit word (2^(r-1) = W; W a power of two from 8 to 512). */
unsigned secded_check_bits(unsigned word_bits);

/* True when SEC-DED fits W = word_bits (already allowed for the format): no weight of a word loses
 * more than the format's budget of bits, ceil(r / (W / b)). */
bool secded_fits(const WeightFormat *format, unsigned word_bits);

/* True when range_max is a valid bound: finite and >= 0 (-0.0 included). */
bool range_max_allowed(float range_max);

typedef enum { SHAPE_VALID, SHAPE_NEGATIVE_DIM, SHAPE_TOO_LARGE } ShapeVerdict;

/* Checks a decoded tensor's dims: every dim >= 0 and their product below WEIGHT_COUNT_LIMIT (a
 * zero dim makes it 0, whatever the others). Sets *n_weights when valid and *axis to the first
 * negative dim. */
ShapeVerdict count_weights(const int64_t *dims, size_t rank, size_t *n_weights, size_t *axis);

/* How each word is checked. The seam for further codes: each gets a value here and its own
 * branch in decode_words. */
typedef enum {
  WORD_CHECK_NONE,   /* plain unpack, no word is masked (SEC-DED's stolen bits still cleared) */
  WORD_CHECK_PARITY, /* a word of odd parity is masked */
  WORD_CHECK_SECDED, /* a single flip is corrected, a double flip masks the word */
} WordCheck;

/* The SEC-DED code of one word size and format (docs/FORMAT.md, "SEC-DED"). A word's syndrome
 * sigma has bit i (i < r - 1) = parity of the word's bits under syndrome_masks[i] (the bits whose
 * Hamming index has bit i set) and bit r - 1 = the word's parity (syndrome_masks[r - 1] is every
 * bit): sigma = s + P * W. */
typedef struct {
  bool on;                                        /* the words carry SEC-DED check bits */
  unsigned check_bits;                            /* r */
  /* Lane l of mask i, and of the word bits that are not check bits. W < 64: lane 0 holds the
   * W-bit pattern repeated 64 / W times, for the 64 / W words of 8 stream bytes. */
  uint64_t syndrome_masks[MAX_CHECK_BITS][MAX_LANES];
  uint64_t kept_bits[MAX_LANES];
  uint16_t position_of_index[MAX_WORD_BITS];      /* word bit position of each Hamming index */
  bool vector_popcount;                           /* the CPU has vector popcounts (x86-64 AVX-512) */
} SecdedCode;

/* How the one-pass SEC-DED decode (secded_avx512.c) makes an output element from a stored weight. */
typedef enum {
  SECDED_OUT_32,         /* fp32 as stored */
  SECDED_OUT_16,         /* bf16 or fp16 as stored */
  SECDED_OUT_INT8,       /* int8 as stored */
  SECDED_OUT_UINT8,      /* uint8 as stored */
  SECDED_OUT_BF16_TO_32, /* bf16 widened to binary32 */
} SecdedVectorOutput;

/* The tables of the one-pass SEC-DED decode of one word size (W >= 64), built at plan time. A
 * group is 8 words: V = W / 64 vectors of 64 bytes. The transpose takes a group to V vectors in
 * which qword j of vector f holds byte position 8 * f + j of words 0..7 (byte w: word w), so that
 * one GF2P8AFFINEQB with matrices[f][0] (qword j: the 8x8 bit matrix of that byte position) gives
 * each byte's share of syndrome bits 0..7, and one with matrices[f][1] its share of bits 8 and 9. */
typedef struct {
  bool on;                     /* decode through secded_avx512_decode */
  SecdedVectorOutput output;
  bool stream;                 /* the output is large: non-temporal stores */
  unsigned stages;             /* log2(V) VPERMT2B stages of the transpose; 0 (V = 1): one VPERMB */
  uint8_t transpose[3][2][64]; /* stage s: index vectors of its low and high outputs (V = 1: [0][0]) */
  uint64_t matrices[8][2][8];  /* final vector f: syndrome bits 0..7, 8..9 */
  uint64_t kept[8];            /* the word bits that are not check bits, over 64 bytes */
} SecdedVectorPlan;

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
  OnnxType output_type;
  SecdedCode secded;       /* on: the words carry SEC-DED check bits (whatever `check`) */
  SecdedVectorPlan secded_vector; /* on: check = SECDED decodes in one AVX-512 pass */
  bool range_check;        /* zero each decoded weight whose magnitude code exceeds range_limit */
  uint32_t range_limit;    /* largest magnitude (floats: code without sign; integers: |value|) kept */
} DecodePlan;

/* The code the words carry (node attribute `code`). */
typedef enum { CODE_PARITY, CODE_SECDED } WordCode;

/* The plan for n_weights (< WEIGHT_COUNT_LIMIT) weights of `format` in W-bit words carrying
 * `code`, decoded to output_type; word_bits and output_type must be allowed for the format, and
 * secded_fits must hold for CODE_SECDED. `checked` (check = runtime or load): the code's check
 * runs, and the range check when range_check is set (range_max_allowed(range_max) must hold);
 * unchecked (check = none): a plain unpack that still clears SEC-DED's stolen bits. */
DecodePlan plan_decode(const WeightFormat *format, unsigned word_bits, OnnxType output_type, WordCode code,
                       bool checked, bool range_check, float range_max, size_t n_weights);

typedef struct {
  size_t masked;    /* words zeroed by the code's detection */
  size_t corrected; /* words with a corrected flip (SEC-DED) */
} DecodeCounts;

/* Decodes words [first_word, end_word) of `stream` (plan->n_words * plan->word_bytes bytes) into
 * `out` (plan->n_weights * plan->output_bytes bytes, indexed from weight 0); returns how many of
 * those words were masked and corrected. Disjoint word ranges may be decoded concurrently into one
 * `out`. */
DecodeCounts decode_words(const DecodePlan *plan, const uint8_t *stream, uint8_t *out, size_t first_word,
                          size_t end_word);

/* Zeroes, in `words` itself, the odd-parity words among [first_word, end_word) of a parity plan
 * whose output elements are the stored weights (output_type = the format's own type, no range
 * check); returns how many it zeroed. A clean word is read, never written. */
size_t mask_words_in_place(const DecodePlan *plan, uint8_t *words, size_t first_word, size_t end_word);

#endif
