/*
 * ParityCheckUnpack: the onnxruntime kernel that decodes oppass packed weights.
 *
 * The contract is docs/FORMAT.md ("The ParityCheckUnpack operator", "Validation"). Kernel creation
 * reads the node's attributes once and refuses every node that the rules refuse, naming the node;
 * compute checks the packed input (at creation for check=load) and decodes it with decoder.h, over
 * onnxruntime's intra-op threads. Output 0 gets the decoded weights, optional output 1 the number
 * of masked words, optional output 2 (code=secded only) the number of corrected words.
 * Registration is in register.c.
 */

#include "parity_check_unpack.h"

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "decoder.h"
#include "load_decodes.h"

#define OP_NAME "ParityCheckUnpack"
/* The operator's only version, declared as its start and end version. onnxruntime (seen with 1.32)
 * matches a custom kernel against the schema's since-version, which is the start version whatever
 * the model imports, so this does not refuse nodes whose model imports DOMAIN_NAME at another
 * version from 2 to 1000, or not at all: the model's opset_import must be checked before the
 * session is created. Versions below 1 or above 1000 onnxruntime refuses itself. */
#define OP_VERSION 1
/* Packed bytes per parallel task; a tensor of at most this many bytes is decoded on the calling thread. */
#define TASK_BYTES ((size_t)256 * 1024)
/* Untrusted bytes quoted in a message are escaped to plain ASCII and cut: a node name or attribute
 * value after QUOTED_BYTES (docs/FORMAT.md, Validation, rule 9), onnxruntime's text after
 * QUOTED_ORT_BYTES. */
#define QUOTED_BYTES 200
#define QUOTED_ORT_BYTES 500
#define ESCAPED_CAPACITY(bytes) (4 * (bytes) + sizeof "...")
#define DETAIL_CAPACITY 2560

#define SAME_TYPE(onnx, ort) _Static_assert((int)(onnx) == (int)(ort), #onnx " is " #ort)
SAME_TYPE(ONNX_TYPE_FLOAT, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
SAME_TYPE(ONNX_TYPE_UINT8, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8);
SAME_TYPE(ONNX_TYPE_INT8, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8);
SAME_TYPE(ONNX_TYPE_UINT16, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT16);
SAME_TYPE(ONNX_TYPE_FLOAT16, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16);
SAME_TYPE(ONNX_TYPE_UINT32, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT32);
SAME_TYPE(ONNX_TYPE_UINT64, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT64);
SAME_TYPE(ONNX_TYPE_BFLOAT16, ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16);

typedef enum { CHECK_RUNTIME, CHECK_LOAD, CHECK_NONE } CheckMode;
static const char *const CHECK_NAMES[] = {"runtime", "load", "none"}; /* indexed by CheckMode */
static const char *const CODE_NAMES[] = {"parity", "secded"};         /* indexed by WordCode */
/* The outputs: weights, and the optional counts. */
#define MAX_OUTPUTS 3

typedef struct {
  const OrtApi *api;
  char node_name[ESCAPED_CAPACITY(QUOTED_BYTES)]; /* escaped: ready for messages */
  const WeightFormat *format;
  unsigned word_bits;
  CheckMode check;
  WordCode code;
  bool range_check;
  float range_max;
  size_t outputs;
  OnnxType output_type;
  int64_t *shape; /* decoded tensor dims (NULL for a scalar) */
  size_t rank;
  DecodePlan plan;
  LoadDecode *loaded; /* check = load: the weights decoded at kernel creation, shared with equal nodes */
} Kernel;

typedef struct {
  OrtCustomOp base;
  const OrtApi *api; /* for InferOutputShapeFn, which gets no api argument */
} OppassOp;

/* ---------------------------------------------------------------- errors */

/* Writes `length` untrusted bytes as plain ASCII into `out` (ESCAPED_CAPACITY(limit) bytes):
 * 0x20..0x7E are kept except backslash, written "\\"; every other byte is "\xNN" (lowercase hex);
 * more than `limit` bytes are cut to the first `limit`, followed by "...". */
static void escape_bytes(const char *bytes, size_t length, size_t limit, char *out) {
  static const char HEX[] = "0123456789abcdef";
  size_t kept = length > limit ? limit : length;
  char *next = out;
  for (size_t i = 0; i < kept; i++) {
    unsigned char byte = (unsigned char)bytes[i];
    if (byte == '\\') {
      *next++ = '\\';
      *next++ = '\\';
    } else if (byte >= 0x20 && byte <= 0x7E) {
      *next++ = (char)byte;
    } else {
      *next++ = '\\';
      *next++ = 'x';
      *next++ = HEX[byte >> 4];
      *next++ = HEX[byte & 0xF];
    }
  }
  if (kept < length) {
    memcpy(next, "...", 3);
    next += 3;
  }
  *next = '\0';
}

static OrtStatus *node_error(const Kernel *kernel, OrtErrorCode code, const char *format, ...)
    __attribute__((format(printf, 3, 4)));

static OrtStatus *node_error(const Kernel *kernel, OrtErrorCode code, const char *format, ...) {
  char detail[DETAIL_CAPACITY];
  va_list arguments;
  va_start(arguments, format);
  vsnprintf(detail, sizeof detail, format, arguments);
  va_end(arguments);
  char message[DETAIL_CAPACITY + ESCAPED_CAPACITY(QUOTED_BYTES) + sizeof OP_NAME + 16];
  snprintf(message, sizeof message, OP_NAME " node '%s': %s", kernel->node_name, detail);
  return kernel->api->CreateStatus(code, message);
}

/* Replaces a failed onnxruntime call's status by one naming the node and what was being done. */
static OrtStatus *node_api_error(const Kernel *kernel, OrtStatus *status, const char *doing) {
  if (status == NULL) {
    return NULL;
  }
  const char *text = kernel->api->GetErrorMessage(status);
  char escaped[ESCAPED_CAPACITY(QUOTED_ORT_BYTES)];
  escape_bytes(text, strlen(text), QUOTED_ORT_BYTES, escaped);
  OrtStatus *named = node_error(kernel, kernel->api->GetErrorCode(status), "%s: %s", doing, escaped);
  kernel->api->ReleaseStatus(status);
  return named;
}

/* Releases a status; true when there was none. For calls whose failure is an answer. */
static bool succeeded(const OrtApi *api, OrtStatus *status) {
  if (status == NULL) {
    return true;
  }
  api->ReleaseStatus(status);
  return false;
}

#define RETURN_IF_ERROR(expression)              \
  do {                                           \
    OrtStatus *returned_status = (expression);   \
    if (returned_status != NULL) {               \
      return returned_status;                    \
    }                                            \
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

/* ---------------------------------------------------------------- node */

static OrtStatus *read_node_name(Kernel *kernel, const OrtKernelInfo *info) {
  const OrtApi *api = kernel->api;
  size_t size = 0;
  RETURN_IF_ERROR(node_api_error(kernel, api->KernelInfo_GetNodeName(info, NULL, &size), "reading the node name"));
  char *name = malloc(size + 1);
  if (name == NULL) {
    return node_error(kernel, ORT_FAIL, "out of memory for the node name");
  }
  OrtStatus *status = api->KernelInfo_GetNodeName(info, name, &size);
  if (status == NULL) {
    escape_bytes(name, size > 0 ? size - 1 : 0, QUOTED_BYTES, kernel->node_name); /* size counts the NUL */
  }
  free(name);
  return node_api_error(kernel, status, "reading the node name");
}

/* One input with a name; one to three outputs, output 0 with a name (outputs 1 and 2 may be
 * omitted, ""; three only with code=secded, checked with the attributes). */
static OrtStatus *check_inputs_and_outputs(Kernel *kernel, const OrtKernelInfo *info) {
  const OrtApi *api = kernel->api;
  size_t inputs = 0;
  size_t outputs = 0;
  size_t name_size = 0;
  RETURN_IF_ERROR(node_api_error(kernel, api->KernelInfo_GetInputCount(info, &inputs), "counting inputs"));
  if (inputs != 1) {
    return node_error(kernel, ORT_INVALID_GRAPH, "%zu inputs, expected exactly 1 (packed)", inputs);
  }
  RETURN_IF_ERROR(node_api_error(kernel, api->KernelInfo_GetInputName(info, 0, NULL, &name_size),
                                 "reading input 0's name"));
  if (name_size <= 1) {
    return node_error(kernel, ORT_INVALID_GRAPH, "input 0 (packed) has an empty name");
  }
  RETURN_IF_ERROR(node_api_error(kernel, api->KernelInfo_GetOutputCount(info, &outputs), "counting outputs"));
  if (outputs < 1 || outputs > MAX_OUTPUTS) {
    return node_error(kernel, ORT_INVALID_GRAPH,
                      "%zu outputs, expected 1, 2 or 3 (weights, masked_words, corrected_words)", outputs);
  }
  kernel->outputs = outputs;
  name_size = 0;
  RETURN_IF_ERROR(node_api_error(kernel, api->KernelInfo_GetOutputName(info, 0, NULL, &name_size),
                                 "reading output 0's name"));
  if (name_size <= 1) {
    return node_error(kernel, ORT_INVALID_GRAPH, "output 0 (weights) has an empty name");
  }
  return NULL;
}

/* ---------------------------------------------------------------- attributes */

static OrtStatus *attribute_error(const Kernel *kernel, OrtStatus *status, const char *name, const char *type) {
  char doing[96];
  snprintf(doing, sizeof doing, "attribute '%s' is missing or not of type %s", name, type);
  return node_api_error(kernel, status, doing);
}

/* Reads a STRING attribute's bytes, all of them (a NUL byte is data), into a buffer the caller frees. */
static OrtStatus *read_string_attribute(const Kernel *kernel, const OrtKernelInfo *info, const char *name,
                                        char **value, size_t *length) {
  size_t size = 0;
  RETURN_IF_ERROR(
      attribute_error(kernel, kernel->api->KernelInfoGetAttribute_string(info, name, NULL, &size), name, "STRING"));
  *value = malloc(size + 1);
  if (*value == NULL) {
    return node_error(kernel, ORT_FAIL, "out of memory for attribute '%s'", name);
  }
  RETURN_IF_ERROR(
      attribute_error(kernel, kernel->api->KernelInfoGetAttribute_string(info, name, *value, &size), name, "STRING"));
  *length = size > 0 ? size - 1 : 0; /* size counts the terminating NUL */
  return NULL;
}

static OrtStatus *unknown_value(const Kernel *kernel, const char *name, const char *value, size_t length,
                                const char *expected) {
  char escaped[ESCAPED_CAPACITY(QUOTED_BYTES)];
  escape_bytes(value, length, QUOTED_BYTES, escaped);
  return node_error(kernel, ORT_INVALID_GRAPH, "unknown %s '%s': expected %s", name, escaped, expected);
}

static OrtStatus *read_format(Kernel *kernel, const OrtKernelInfo *info) {
  char *value = NULL;
  size_t length = 0;
  OrtStatus *status = read_string_attribute(kernel, info, "format", &value, &length);
  if (status == NULL) {
    kernel->format = find_weight_format(value, length);
    if (kernel->format == NULL) {
      status = unknown_value(kernel, "format", value, length, "fp32, bf16, fp16, int8 or uint8");
    }
  }
  free(value);
  return status;
}

static OrtStatus *read_check(Kernel *kernel, const OrtKernelInfo *info) {
  char *value = NULL;
  size_t length = 0;
  OrtStatus *status = read_string_attribute(kernel, info, "check", &value, &length);
  bool known = false;
  for (size_t i = 0; status == NULL && i < sizeof CHECK_NAMES / sizeof CHECK_NAMES[0]; i++) {
    if (strlen(CHECK_NAMES[i]) == length && memcmp(value, CHECK_NAMES[i], length) == 0) {
      kernel->check = (CheckMode)i;
      known = true;
    }
  }
  if (status == NULL && !known) {
    status = unknown_value(kernel, "check", value, length, "runtime, load or none");
  }
  free(value);
  return status;
}

static OrtStatus *read_word_bits(Kernel *kernel, const OrtKernelInfo *info) {
  int64_t word_bits = 0;
  RETURN_IF_ERROR(attribute_error(kernel, kernel->api->KernelInfoGetAttribute_int64(info, "word_bits", &word_bits),
                                  "word_bits", "INT"));
  unsigned bits = kernel->format->bits;
  if (!word_bits_allowed(kernel->format, word_bits)) {
    return node_error(kernel, ORT_INVALID_GRAPH,
                      "word_bits %lld is not valid for %s: expected %u (one weight per word) or one of 16, 32, 64, "
                      "128, 256, 512 not below %u",
                      (long long)word_bits, kernel->format->name, bits, bits);
  }
  kernel->word_bits = (unsigned)word_bits;
  return NULL;
}

static OrtStatus *read_output_type(Kernel *kernel, const OrtKernelInfo *info) {
  int64_t output_type = 0;
  RETURN_IF_ERROR(attribute_error(
      kernel, kernel->api->KernelInfoGetAttribute_int64(info, "output_type", &output_type), "output_type", "INT"));
  const WeightFormat *format = kernel->format;
  if (!output_type_allowed(format, output_type)) {
    return node_error(kernel, ORT_INVALID_GRAPH, "output_type %lld is not allowed for %s: expected %d (%s)%s",
                      (long long)output_type, format->name, (int)format->own_type,
                      element_type_name((ONNXTensorElementDataType)format->own_type),
                      format->widens_to_float ? " or 1 (FLOAT)" : "");
  }
  kernel->output_type = (OnnxType)output_type;
  return NULL;
}

/* Whether the node has an attribute of this name, of any type: the list getter reads the ints of
 * an attribute of any type and fails only when there is none. */
static bool has_attribute(const Kernel *kernel, const OrtKernelInfo *info, const char *name) {
  size_t size = 0;
  return succeeded(kernel->api, kernel->api->KernelInfoGetAttributeArray_int64(info, name, NULL, &size));
}

static OrtStatus *optional_attribute_error(const Kernel *kernel, OrtStatus *status, const char *name,
                                           const char *type) {
  char doing[96];
  snprintf(doing, sizeof doing, "attribute '%s' is not of type %s", name, type);
  return node_api_error(kernel, status, doing);
}

/* `code`, optional: parity when absent. */
static OrtStatus *read_code(Kernel *kernel, const OrtKernelInfo *info) {
  kernel->code = CODE_PARITY;
  if (!has_attribute(kernel, info, "code")) {
    return NULL;
  }
  size_t size = 0;
  RETURN_IF_ERROR(optional_attribute_error(
      kernel, kernel->api->KernelInfoGetAttribute_string(info, "code", NULL, &size), "code", "STRING"));
  char *value = NULL;
  size_t length = 0;
  OrtStatus *status = read_string_attribute(kernel, info, "code", &value, &length);
  bool known = false;
  for (size_t i = 0; status == NULL && i < sizeof CODE_NAMES / sizeof CODE_NAMES[0]; i++) {
    if (strlen(CODE_NAMES[i]) == length && memcmp(value, CODE_NAMES[i], length) == 0) {
      kernel->code = (WordCode)i;
      known = true;
    }
  }
  if (status == NULL && !known) {
    status = unknown_value(kernel, "code", value, length, "parity or secded");
  }
  free(value);
  return status;
}

/* With code=secded, word_bits must be one where the code fits the format. */
static OrtStatus *check_code_fits(const Kernel *kernel) {
  if (kernel->code != CODE_SECDED || secded_fits(kernel->format, kernel->word_bits)) {
    return NULL;
  }
  char fitting[64] = "";
  size_t used = 0;
  for (unsigned width = 8; width <= MAX_WORD_BITS; width *= 2) {
    if (word_bits_allowed(kernel->format, width) && secded_fits(kernel->format, width)) {
      used += (size_t)snprintf(fitting + used, sizeof fitting - used, "%s%u", used == 0 ? "" : ", ", width);
    }
  }
  return node_error(kernel, ORT_INVALID_GRAPH,
                    "code secded does not fit %s in %u-bit words (a weight would lose more than %u bits): "
                    "expected word_bits %s",
                    kernel->format->name, kernel->word_bits, kernel->format->stolen_bit_budget, fitting);
}

/* `range_max`, optional: when present the range check is on; finite and >= 0. */
static OrtStatus *read_range_max(Kernel *kernel, const OrtKernelInfo *info) {
  kernel->range_check = has_attribute(kernel, info, "range_max");
  if (!kernel->range_check) {
    return NULL;
  }
  RETURN_IF_ERROR(optional_attribute_error(
      kernel, kernel->api->KernelInfoGetAttribute_float(info, "range_max", &kernel->range_max), "range_max", "FLOAT"));
  if (!range_max_allowed(kernel->range_max)) {
    return node_error(kernel, ORT_INVALID_GRAPH, "range_max %g is not valid: expected a finite value >= 0",
                      (double)kernel->range_max);
  }
  return NULL;
}

/* Output 2 (corrected_words) exists only with code=secded. */
static OrtStatus *check_outputs_for_code(const Kernel *kernel) {
  if (kernel->outputs == MAX_OUTPUTS && kernel->code != CODE_SECDED) {
    return node_error(kernel, ORT_INVALID_GRAPH,
                      "3 outputs with code %s: output 2 (corrected_words) needs code secded", CODE_NAMES[kernel->code]);
  }
  return NULL;
}

/* True when the attribute is a TENSOR (its getter checks the type). */
static OrtStatus *is_tensor_attribute(const Kernel *kernel, const OrtKernelInfo *info, const char *name,
                                      bool *is_tensor) {
  const OrtApi *api = kernel->api;
  OrtAllocator *allocator = NULL;
  RETURN_IF_ERROR(node_api_error(kernel, api->GetAllocatorWithDefaultOptions(&allocator), "getting an allocator"));
  OrtValue *tensor = NULL;
  *is_tensor = succeeded(api, api->KernelInfoGetAttribute_tensor(info, name, allocator, &tensor));
  if (tensor != NULL) {
    api->ReleaseValue(tensor);
  }
  return NULL;
}

/* KernelInfoGetAttributeArray_int64 reads the ints of an attribute of any type (none, for most), so
 * `shape` is refused here when the C API shows it has another type: INT, FLOAT, STRING or TENSOR
 * (their getters check the AttributeProto type) or FLOATS holding values. The C API (version 17)
 * shows nothing of the other types: a `shape` of type UNDEFINED, STRINGS, TENSORS, GRAPHS,
 * SPARSE_TENSOR(S) or TYPE_PROTO(S), or an empty FLOATS, reads as an empty INTS (a scalar). */
static OrtStatus *check_shape_is_ints(const Kernel *kernel, const OrtKernelInfo *info) {
  const OrtApi *api = kernel->api;
  int64_t int_value = 0;
  float float_value = 0;
  size_t size = 0;
  bool is_tensor = false;
  const char *other = NULL;
  if (succeeded(api, api->KernelInfoGetAttribute_int64(info, "shape", &int_value))) {
    other = "INT";
  } else if (succeeded(api, api->KernelInfoGetAttribute_float(info, "shape", &float_value))) {
    other = "FLOAT";
  } else if (succeeded(api, api->KernelInfoGetAttribute_string(info, "shape", NULL, &size))) {
    other = "STRING";
  } else if (succeeded(api, api->KernelInfoGetAttributeArray_float(info, "shape", NULL, &size)) && size > 0) {
    other = "FLOATS";
  } else {
    RETURN_IF_ERROR(is_tensor_attribute(kernel, info, "shape", &is_tensor));
    other = is_tensor ? "TENSOR" : NULL;
  }
  if (other != NULL) {
    return node_error(kernel, ORT_INVALID_GRAPH, "attribute 'shape' is of type %s, expected INTS", other);
  }
  return NULL;
}

/* Reads `shape` into kernel->rank and kernel->shape and counts its weights. */
static OrtStatus *read_shape(Kernel *kernel, const OrtKernelInfo *info, size_t *n_weights) {
  size_t rank = 0;
  RETURN_IF_ERROR(attribute_error(
      kernel, kernel->api->KernelInfoGetAttributeArray_int64(info, "shape", NULL, &rank), "shape", "INTS"));
  if (rank != 0) {
    kernel->shape = calloc(rank, sizeof *kernel->shape);
    if (kernel->shape == NULL) {
      return node_error(kernel, ORT_FAIL, "out of memory for a shape of rank %zu", rank);
    }
    RETURN_IF_ERROR(attribute_error(
        kernel, kernel->api->KernelInfoGetAttributeArray_int64(info, "shape", kernel->shape, &rank), "shape", "INTS"));
  }
  kernel->rank = rank;
  RETURN_IF_ERROR(check_shape_is_ints(kernel, info));
  size_t axis = 0;
  switch (count_weights(kernel->shape, rank, n_weights, &axis)) {
    case SHAPE_VALID:
      return NULL;
    case SHAPE_NEGATIVE_DIM:
      return node_error(kernel, ORT_INVALID_GRAPH, "shape has a negative dimension %lld at axis %zu",
                        (long long)kernel->shape[axis], axis);
    case SHAPE_TOO_LARGE:
      break;
  }
  return node_error(kernel, ORT_INVALID_GRAPH, "shape holds 2**58 weights or more (the limit of docs/FORMAT.md)");
}

static OrtStatus *read_attributes(Kernel *kernel, const OrtKernelInfo *info) {
  size_t n_weights = 0;
  RETURN_IF_ERROR(read_format(kernel, info));
  RETURN_IF_ERROR(read_word_bits(kernel, info));
  RETURN_IF_ERROR(read_check(kernel, info));
  RETURN_IF_ERROR(read_output_type(kernel, info));
  RETURN_IF_ERROR(read_shape(kernel, info, &n_weights));
  RETURN_IF_ERROR(read_code(kernel, info));
  RETURN_IF_ERROR(check_code_fits(kernel));
  RETURN_IF_ERROR(check_outputs_for_code(kernel));
  RETURN_IF_ERROR(read_range_max(kernel, info));
  kernel->plan = plan_decode(kernel->format, kernel->word_bits, kernel->output_type, kernel->code,
                             kernel->check != CHECK_NONE, kernel->range_check, kernel->range_max, n_weights);
  return NULL;
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
  if ((int)graph_type != (int)kernel->output_type) {
    return node_error(kernel, ORT_INVALID_GRAPH,
                      "output 0 has element type %d (%s) in the graph but output_type is %d (%s); declare the "
                      "output's type in the model if this onnxruntime does not infer it from output_type",
                      (int)graph_type, element_type_name(graph_type), (int)kernel->output_type,
                      element_type_name((ONNXTensorElementDataType)kernel->output_type));
  }
  return NULL;
}

/* ---------------------------------------------------------------- packed input */

/* Checks the packed tensor's element type and dims against the plan; returns its bytes. */
static OrtStatus *packed_stream(const Kernel *kernel, const OrtValue *packed, const uint8_t **stream) {
  const OrtApi *api = kernel->api;
  const DecodePlan *plan = &kernel->plan;
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
  ONNXTensorElementDataType expected = (ONNXTensorElementDataType)plan->packed_type;
  long long n_words = (long long)plan->n_words;
  long long lanes = (long long)plan->lanes;
  if (type != expected) {
    return node_error(kernel, ORT_INVALID_ARGUMENT, "packed input has element type %s, expected %s for %u-bit words",
                      element_type_name(type), element_type_name(expected), kernel->word_bits);
  }
  if (rank != 2) {
    return node_error(kernel, ORT_INVALID_ARGUMENT,
                      "packed input has rank %zu, expected 2 ([n_words, lanes] = [%lld, %lld])", rank, n_words, lanes);
  }
  if (dims[0] != n_words || dims[1] != lanes) {
    return node_error(kernel, ORT_INVALID_ARGUMENT,
                      "packed input has dims [%lld, %lld], expected [%lld, %lld] for %zu %s weights in %u-bit words",
                      (long long)dims[0], (long long)dims[1], n_words, lanes, plan->n_weights, kernel->format->name,
                      kernel->word_bits);
  }
  void *data = NULL;
  RETURN_IF_ERROR(node_api_error(kernel, api->GetTensorMutableData((OrtValue *)packed, &data),
                                 "reading the packed input"));
  *stream = data;
  return NULL;
}

/* ---------------------------------------------------------------- decoding */

typedef struct {
  const DecodePlan *plan;
  const uint8_t *stream;
  uint8_t *out;
  size_t words_per_task;
  DecodeCounts *counts_per_task;
} ParallelDecode;

static void decode_task(void *data, size_t task) {
  const ParallelDecode *job = data;
  size_t first = task * job->words_per_task;
  size_t remaining = job->plan->n_words - first;
  size_t end = first + (remaining < job->words_per_task ? remaining : job->words_per_task);
  job->counts_per_task[task] = decode_words(job->plan, job->stream, job->out, first, end);
}

/* Decodes the whole tensor, over onnxruntime's intra-op threads when `context` is given and it pays. */
static OrtStatus *decode_all(const Kernel *kernel, OrtKernelContext *context, const uint8_t *stream, uint8_t *out,
                             int64_t *masked, int64_t *corrected) {
  const DecodePlan *plan = &kernel->plan;
  size_t words_per_task = TASK_BYTES / plan->word_bytes;
  size_t tasks = plan->n_words / words_per_task + (plan->n_words % words_per_task != 0);
  if (context == NULL || tasks < 2) {
    DecodeCounts counts = {0, 0};
    if (plan->n_words != 0) {
      counts = decode_words(plan, stream, out, 0, plan->n_words);
    }
    *masked = (int64_t)counts.masked;
    *corrected = (int64_t)counts.corrected;
    return NULL;
  }
  DecodeCounts *counts_per_task = calloc(tasks, sizeof *counts_per_task);
  if (counts_per_task == NULL) {
    return node_error(kernel, ORT_FAIL, "out of memory for %zu decode tasks", tasks);
  }
  ParallelDecode job = {plan, stream, out, words_per_task, counts_per_task};
  OrtStatus *status = kernel->api->KernelContext_ParallelFor(context, decode_task, tasks, 0, &job);
  size_t total_masked = 0;
  size_t total_corrected = 0;
  for (size_t task = 0; task < tasks; task++) {
    total_masked += counts_per_task[task].masked;
    total_corrected += counts_per_task[task].corrected;
  }
  free(counts_per_task);
  *masked = (int64_t)total_masked;
  *corrected = (int64_t)total_corrected;
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
  kernel->loaded = load_decode_acquire(&kernel->plan, stream);
  if (kernel->loaded == NULL) {
    return node_error(kernel, ORT_FAIL, "out of memory for %zu decoded bytes",
                      kernel->plan.n_weights * kernel->plan.output_bytes);
  }
  return NULL;
}

/* ---------------------------------------------------------------- kernel callbacks */

static void ORT_API_CALL destroy_kernel(void *opaque) {
  Kernel *kernel = opaque;
  if (kernel == NULL) {
    return;
  }
  free(kernel->shape);
  load_decode_release(kernel->loaded);
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
    status = check_inputs_and_outputs(kernel, info);
  }
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

/* Writes a count to optional output `index` when the node has it (not omitted with ""). */
static OrtStatus *write_count(const Kernel *kernel, OrtKernelContext *context, size_t outputs, size_t index,
                              const char *name, int64_t value) {
  if (outputs <= index) {
    return NULL;
  }
  char doing[64];
  snprintf(doing, sizeof doing, "allocating %s", name);
  OrtValue *count = NULL;
  RETURN_IF_ERROR(node_api_error(kernel, kernel->api->KernelContext_GetOutput(context, index, NULL, 0, &count), doing));
  if (count == NULL) { /* the output is named "" in the node */
    return NULL;
  }
  snprintf(doing, sizeof doing, "writing %s", name);
  void *data = NULL;
  RETURN_IF_ERROR(node_api_error(kernel, kernel->api->GetTensorMutableData(count, &data), doing));
  memcpy(data, &value, sizeof value);
  return NULL;
}

static OrtStatus *write_counts(const Kernel *kernel, OrtKernelContext *context, int64_t masked, int64_t corrected) {
  size_t outputs = 0;
  RETURN_IF_ERROR(node_api_error(kernel, kernel->api->KernelContext_GetOutputCount(context, &outputs),
                                 "counting outputs"));
  RETURN_IF_ERROR(write_count(kernel, context, outputs, 1, "masked_words", masked));
  return write_count(kernel, context, outputs, 2, "corrected_words", corrected);
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
  int64_t corrected = 0;
  if (kernel->check == CHECK_LOAD) {
    LoadedWeights loaded = load_decode_weights(kernel->loaded);
    size_t bytes = kernel->plan.n_weights * kernel->plan.output_bytes;
    if (bytes != 0) {
      memcpy(out, loaded.weights, bytes);
    }
    masked = loaded.masked;
    corrected = loaded.corrected;
  } else {
    RETURN_IF_ERROR(decode_all(kernel, context, stream, out, &masked, &corrected));
  }
  return write_counts(kernel, context, masked, corrected);
}

/* ---------------------------------------------------------------- type and shape inference */

static bool is_output_type(int64_t type) {
  for (size_t i = 0; i < WEIGHT_FORMAT_COUNT; i++) {
    if (type == WEIGHT_FORMATS[i].own_type) {
      return true;
    }
  }
  return false;
}

/* Reads `shape`; returns false (nothing to free) when it is missing or not a valid shape. */
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
  size_t n_weights = 0;
  size_t axis = 0;
  if (count_weights(*dims, *rank, &n_weights, &axis) != SHAPE_VALID) {
    free(*dims);
    return false;
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
  return MAX_OUTPUTS;
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

static int ORT_API_CALL op_version(const OrtCustomOp *op) {
  (void)op;
  return OP_VERSION;
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
            .GetStartVersion = op_version,
            .GetEndVersion = op_version,
        },
    .api = NULL,
};

OrtCustomOp *parity_check_unpack_op(const OrtApi *api) {
  if (parity_check_unpack.api == NULL) {
    parity_check_unpack.api = api;
  }
  return &parity_check_unpack.base;
}
