/*
 * libFuzzer target on the ParityCheckUnpack kernel: drives the real OrtCustomOp (shape inference,
 * CreateKernelV2, KernelComputeV2, KernelDestroy) through a fake OrtApi that answers like
 * onnxruntime's, with the node (name bytes, inputs, outputs, attributes of any type and value,
 * graph output type, packed tensor) taken from the fuzz input. Buffers have exactly the size
 * onnxruntime would allocate, so AddressSanitizer sees every stray access.
 *
 * The oracle is reference.h, written apart from the kernel: the kernel must accept a node exactly
 * when the rules of docs/FORMAT.md ("Validation") accept it, its errors must start with the
 * node's escaped name, shape inference must set exactly output_type and shape, and accepted
 * nodes must decode as reference_decode does, with its masked and corrected counts. The optional
 * attributes `code` and `range_max` are often absent, else of their type or another, with valid,
 * near-miss or raw values; with code=secded the packed words are often codewords with a few
 * flips, so that corrections and maskings run. A disagreement aborts.
 *
 * `shape` is never generated with an attribute type that the C API cannot tell apart from an
 * empty INTS (see check_shape_is_ints in parity_check_unpack.c).
 *
 * Build and run: custom_ops/fuzz/build.sh, then build/fuzz/fuzz_parity_check_unpack (README.md).
 */

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../parity_check_unpack.h"
#include "reference.h"

#define REQUIRE(condition, ...)                                          \
  do {                                                                   \
    if (!(condition)) {                                                  \
      fprintf(stderr, "mismatch: " __VA_ARGS__);                         \
      fprintf(stderr, " (%s:%d: %s)\n", __FILE__, __LINE__, #condition); \
      abort();                                                           \
    }                                                                    \
  } while (0)

/* ---------------------------------------------------------------- the fake node */

typedef enum { ATTR_ABSENT, ATTR_INT, ATTR_FLOAT, ATTR_STRING, ATTR_INTS, ATTR_FLOATS, ATTR_TENSOR, ATTR_KINDS } AttrKind;

#define MAX_STRING 24
#define MAX_INTS 5

typedef struct {
  AttrKind kind;
  int64_t i;
  float f;
  char s[MAX_STRING];
  size_t s_length;
  int64_t ints[MAX_INTS];
  size_t n_ints;
  size_t n_floats;
} FuzzAttribute;

enum { FORMAT, WORD_BITS, SHAPE, CHECK, OUTPUT_TYPE, CODE, RANGE_MAX, ATTRIBUTES };
/* The first REQUIRED_ATTRIBUTES are required, the others optional. */
#define REQUIRED_ATTRIBUTES 5
static const char *const ATTRIBUTE_NAMES[ATTRIBUTES] = {"format", "word_bits", "shape", "check", "output_type",
                                                        "code", "range_max"};
static const AttrKind ATTRIBUTE_KINDS[ATTRIBUTES] = {ATTR_STRING, ATTR_INT, ATTR_INTS, ATTR_STRING, ATTR_INT,
                                                     ATTR_STRING, ATTR_FLOAT};

struct OrtValue {
  ONNXTensorElementDataType type;
  size_t rank;
  int64_t dims[8];
  uint8_t *data;
  size_t bytes;
};

typedef struct {
  char name[256];
  size_t name_length;
  size_t inputs;
  bool input_named;
  size_t outputs;
  bool output0_named;
  bool output1_named;
  bool output2_named;
  FuzzAttribute attributes[ATTRIBUTES];
  ONNXTensorElementDataType graph_output_type;
  bool packed_is_constant;
  OrtValue packed;
} FuzzNode;

struct OrtStatus {
  OrtErrorCode code;
  char message[4096];
};

struct OrtTensorTypeAndShapeInfo {
  ONNXTensorElementDataType type;
  size_t rank;
  int64_t dims[8];
};

struct OrtTypeInfo {
  struct OrtTensorTypeAndShapeInfo tensor;
};

struct OrtKernelInfo {
  const FuzzNode *node;
};

struct OrtKernelContext {
  const FuzzNode *node;
  OrtValue outputs[3];
};

struct OrtShapeInferContext {
  const FuzzNode *node;
  bool output_set;
  struct OrtTensorTypeAndShapeInfo output;
};

/* ---------------------------------------------------------------- the fake OrtApi */

static OrtStatus *fake_status(OrtErrorCode code, const char *message) {
  OrtStatus *status = calloc(1, sizeof *status);
  status->code = code;
  snprintf(status->message, sizeof status->message, "%s", message);
  return status;
}

static OrtStatus *ORT_API_CALL fake_create_status(OrtErrorCode code, const char *message) {
  return fake_status(code, message);
}
static OrtErrorCode ORT_API_CALL fake_get_error_code(const OrtStatus *status) { return status->code; }
static const char *ORT_API_CALL fake_get_error_message(const OrtStatus *status) { return status->message; }
static void ORT_API_CALL fake_release_status(OrtStatus *status) { free(status); }

/* onnxruntime's string protocol: size counts a terminating NUL; a NULL `out` asks for the size. */
static OrtStatus *copy_bytes(const char *value, size_t length, char *out, size_t *size) {
  if (out == NULL) {
    *size = length + 1;
    return NULL;
  }
  if (*size < length + 1) {
    *size = length + 1;
    return fake_status(ORT_INVALID_ARGUMENT, "Result buffer is not large enough");
  }
  memcpy(out, value, length);
  out[length] = '\0';
  *size = length + 1;
  return NULL;
}

static const FuzzAttribute *find_attribute(const FuzzNode *node, const char *name) {
  for (size_t i = 0; i < ATTRIBUTES; i++) {
    if (strcmp(name, ATTRIBUTE_NAMES[i]) == 0 && node->attributes[i].kind != ATTR_ABSENT) {
      return &node->attributes[i];
    }
  }
  return NULL;
}

static OrtStatus *ORT_API_CALL fake_node_name(const OrtKernelInfo *info, char *out, size_t *size) {
  return copy_bytes(info->node->name, info->node->name_length, out, size);
}

static OrtStatus *ORT_API_CALL fake_input_count(const OrtKernelInfo *info, size_t *out) {
  *out = info->node->inputs;
  return NULL;
}

static OrtStatus *ORT_API_CALL fake_output_count(const OrtKernelInfo *info, size_t *out) {
  *out = info->node->outputs;
  return NULL;
}

static OrtStatus *ORT_API_CALL fake_input_name(const OrtKernelInfo *info, size_t index, char *out, size_t *size) {
  if (index >= info->node->inputs) {
    return fake_status(ORT_INVALID_ARGUMENT, "input index out of bounds");
  }
  return info->node->input_named ? copy_bytes("packed", 6, out, size) : copy_bytes("", 0, out, size);
}

static OrtStatus *ORT_API_CALL fake_output_name(const OrtKernelInfo *info, size_t index, char *out, size_t *size) {
  if (index >= info->node->outputs) {
    return fake_status(ORT_INVALID_ARGUMENT, "output index out of bounds");
  }
  bool named = index == 0 ? info->node->output0_named : index == 1 ? info->node->output1_named
                                                                    : info->node->output2_named;
  return named ? copy_bytes("weights", 7, out, size) : copy_bytes("", 0, out, size);
}

/* The typed getters check the AttributeProto type, as onnxruntime's GetAttr<T> does. */
static OrtStatus *typed_attribute(const OrtKernelInfo *info, const char *name, AttrKind kind,
                                  const FuzzAttribute **attribute) {
  *attribute = find_attribute(info->node, name);
  if (*attribute == NULL) {
    return fake_status(ORT_FAIL, "No attribute with name:'...'is defined.");
  }
  if ((*attribute)->kind != kind) {
    return fake_status(ORT_FAIL, "Attribute name and type don't match");
  }
  return NULL;
}

static OrtStatus *ORT_API_CALL fake_attribute_string(const OrtKernelInfo *info, const char *name, char *out,
                                                     size_t *size) {
  const FuzzAttribute *attribute = NULL;
  OrtStatus *status = typed_attribute(info, name, ATTR_STRING, &attribute);
  return status != NULL ? status : copy_bytes(attribute->s, attribute->s_length, out, size);
}

static OrtStatus *ORT_API_CALL fake_attribute_int(const OrtKernelInfo *info, const char *name, int64_t *out) {
  const FuzzAttribute *attribute = NULL;
  OrtStatus *status = typed_attribute(info, name, ATTR_INT, &attribute);
  if (status == NULL) {
    *out = attribute->i;
  }
  return status;
}

static OrtStatus *ORT_API_CALL fake_attribute_float(const OrtKernelInfo *info, const char *name, float *out) {
  const FuzzAttribute *attribute = NULL;
  OrtStatus *status = typed_attribute(info, name, ATTR_FLOAT, &attribute);
  if (status == NULL) {
    *out = attribute->f;
  }
  return status;
}

/* The list getters read the list of an attribute of any type, as onnxruntime's GetAttrs<T> does. */
static OrtStatus *ORT_API_CALL fake_attribute_ints(const OrtKernelInfo *info, const char *name, int64_t *out,
                                                   size_t *size) {
  const FuzzAttribute *attribute = find_attribute(info->node, name);
  if (attribute == NULL) {
    return fake_status(ORT_FAIL, "No attribute with this name is defined.");
  }
  size_t count = attribute->kind == ATTR_INTS ? attribute->n_ints : 0;
  if (out != NULL && *size < count) {
    *size = count;
    return fake_status(ORT_INVALID_ARGUMENT, "Result buffer is not large enough");
  }
  if (out != NULL) {
    memcpy(out, attribute->ints, count * sizeof *out);
  }
  *size = count;
  return NULL;
}

static OrtStatus *ORT_API_CALL fake_attribute_floats(const OrtKernelInfo *info, const char *name, float *out,
                                                     size_t *size) {
  const FuzzAttribute *attribute = find_attribute(info->node, name);
  if (attribute == NULL) {
    return fake_status(ORT_FAIL, "No attribute with this name is defined.");
  }
  size_t count = attribute->kind == ATTR_FLOATS ? attribute->n_floats : 0;
  if (out != NULL && *size < count) {
    *size = count;
    return fake_status(ORT_INVALID_ARGUMENT, "Result buffer is not large enough");
  }
  for (size_t i = 0; out != NULL && i < count; i++) {
    out[i] = 1.0f;
  }
  *size = count;
  return NULL;
}

static int fake_allocator_object;

static OrtStatus *ORT_API_CALL fake_default_allocator(OrtAllocator **out) {
  *out = (OrtAllocator *)&fake_allocator_object;
  return NULL;
}

static OrtStatus *ORT_API_CALL fake_attribute_tensor(const OrtKernelInfo *info, const char *name,
                                                     OrtAllocator *allocator, OrtValue **out) {
  REQUIRE(allocator == (OrtAllocator *)&fake_allocator_object, "tensor attribute read with another allocator");
  const FuzzAttribute *attribute = NULL;
  OrtStatus *status = typed_attribute(info, name, ATTR_TENSOR, &attribute);
  if (status == NULL) {
    *out = calloc(1, sizeof **out);
  }
  return status;
}

static void ORT_API_CALL fake_release_value(OrtValue *value) { free(value); }

static OrtStatus *ORT_API_CALL fake_output_type_info(const OrtKernelInfo *info, size_t index, OrtTypeInfo **out) {
  REQUIRE(index == 0, "type info of output %zu", index);
  *out = calloc(1, sizeof **out);
  (*out)->tensor.type = info->node->graph_output_type;
  return NULL;
}

static OrtStatus *ORT_API_CALL fake_cast_type_info(const OrtTypeInfo *type_info,
                                                   const OrtTensorTypeAndShapeInfo **out) {
  *out = &type_info->tensor;
  return NULL;
}

static void ORT_API_CALL fake_release_type_info(OrtTypeInfo *type_info) { free(type_info); }

static OrtStatus *ORT_API_CALL fake_constant_input(const OrtKernelInfo *info, size_t index, int *is_constant,
                                                   const OrtValue **out) {
  REQUIRE(index == 0, "constant input %zu", index);
  *is_constant = info->node->packed_is_constant;
  *out = info->node->packed_is_constant ? &info->node->packed : NULL;
  return NULL;
}

static OrtStatus *ORT_API_CALL fake_type_and_shape(const OrtValue *value, OrtTensorTypeAndShapeInfo **out) {
  *out = calloc(1, sizeof **out);
  (*out)->type = value->type;
  (*out)->rank = value->rank;
  memcpy((*out)->dims, value->dims, sizeof value->dims);
  return NULL;
}

static OrtStatus *ORT_API_CALL fake_create_tensor_info(OrtTensorTypeAndShapeInfo **out) {
  *out = calloc(1, sizeof **out);
  return NULL;
}

static OrtStatus *ORT_API_CALL fake_set_element_type(OrtTensorTypeAndShapeInfo *info, ONNXTensorElementDataType type) {
  info->type = type;
  return NULL;
}

static OrtStatus *ORT_API_CALL fake_set_dimensions(OrtTensorTypeAndShapeInfo *info, const int64_t *dims, size_t rank) {
  REQUIRE(rank <= 8, "rank %zu", rank);
  info->rank = rank;
  memcpy(info->dims, dims, rank * sizeof *dims);
  return NULL;
}

static OrtStatus *ORT_API_CALL fake_element_type(const OrtTensorTypeAndShapeInfo *info, ONNXTensorElementDataType *out) {
  *out = info->type;
  return NULL;
}

static OrtStatus *ORT_API_CALL fake_dimensions_count(const OrtTensorTypeAndShapeInfo *info, size_t *out) {
  *out = info->rank;
  return NULL;
}

static OrtStatus *ORT_API_CALL fake_dimensions(const OrtTensorTypeAndShapeInfo *info, int64_t *dims, size_t length) {
  REQUIRE(length <= info->rank, "%zu dims asked of rank %zu", length, info->rank);
  memcpy(dims, info->dims, length * sizeof *dims);
  return NULL;
}

static void ORT_API_CALL fake_release_tensor_info(OrtTensorTypeAndShapeInfo *info) { free(info); }

static OrtStatus *ORT_API_CALL fake_mutable_data(OrtValue *value, void **out) {
  *out = value->data;
  return NULL;
}

static OrtStatus *ORT_API_CALL fake_get_input(const OrtKernelContext *context, size_t index, const OrtValue **out) {
  REQUIRE(index == 0, "input %zu", index);
  *out = &context->node->packed;
  return NULL;
}

static OrtStatus *ORT_API_CALL fake_context_output_count(const OrtKernelContext *context, size_t *out) {
  *out = context->node->outputs;
  return NULL;
}

static size_t element_size(ONNXTensorElementDataType type) {
  switch (type) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return 4;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16:
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: return 2;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8:
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8: return 1;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: return 8;
    default: abort(); /* onnxruntime would never allocate an output of another type here */
  }
}

/* Allocates an output exactly as large as onnxruntime would for these dims and the graph's type;
 * an output 1 named "" is not allocated (NULL), as in onnxruntime. */
static OrtStatus *ORT_API_CALL fake_get_output(OrtKernelContext *context, size_t index, const int64_t *dims,
                                               size_t rank, OrtValue **out) {
  REQUIRE(index < context->node->outputs && rank <= 8, "output %zu of rank %zu", index, rank);
  if ((index == 1 && !context->node->output1_named) || (index == 2 && !context->node->output2_named)) {
    *out = NULL;
    return NULL;
  }
  OrtValue *value = &context->outputs[index];
  value->type = index == 0 ? context->node->graph_output_type : ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
  value->rank = rank;
  size_t count = 1;
  for (size_t axis = 0; axis < rank; axis++) {
    REQUIRE(dims[axis] >= 0, "negative output dim");
    value->dims[axis] = dims[axis];
    if (__builtin_mul_overflow(count, (size_t)dims[axis], &count) || count > ((size_t)1 << 20)) {
      return fake_status(ORT_FAIL, "output too large for the fuzzer");
    }
  }
  value->bytes = count * element_size(value->type);
  free(value->data);
  value->data = malloc(value->bytes != 0 ? value->bytes : 1);
  *out = value;
  return NULL;
}

/* Runs the tasks serially, last first, as any thread schedule may. */
static OrtStatus *ORT_API_CALL fake_parallel_for(const OrtKernelContext *context, void (*fn)(void *, size_t),
                                                 size_t total, size_t batch, void *data) {
  (void)context;
  (void)batch;
  for (size_t task = total; task-- > 0;) {
    fn(data, task);
  }
  return NULL;
}

static OrtStatus *ORT_API_CALL fake_infer_attribute(const OrtShapeInferContext *context, const char *name,
                                                    const OrtOpAttr **out) {
  const FuzzAttribute *attribute = find_attribute(context->node, name);
  *out = (const OrtOpAttr *)attribute;
  return attribute != NULL ? NULL : fake_status(ORT_INVALID_ARGUMENT, "Attribute does not exist.");
}

/* onnxruntime's ReadOpAttr: INT needs a value of type INT; INTS reads the ints of any type. */
static OrtStatus *ORT_API_CALL fake_read_attribute(const OrtOpAttr *opaque, OrtOpAttrType type, void *data, size_t len,
                                                   size_t *out) {
  const FuzzAttribute *attribute = (const FuzzAttribute *)opaque;
  if (type == ORT_OP_ATTR_INT) {
    *out = sizeof(int64_t);
    if (len < sizeof(int64_t)) {
      return fake_status(ORT_INVALID_ARGUMENT, "Size of data not large enough to hold an int64.");
    }
    if (attribute->kind != ATTR_INT) {
      return fake_status(ORT_INVALID_ARGUMENT, "Attribute has no int64 value.");
    }
    memcpy(data, &attribute->i, sizeof attribute->i);
    return NULL;
  }
  REQUIRE(type == ORT_OP_ATTR_INTS, "ReadOpAttr of type %d", (int)type);
  size_t count = attribute->kind == ATTR_INTS ? attribute->n_ints : 0;
  *out = count * sizeof(int64_t);
  if (len < count * sizeof(int64_t)) {
    return fake_status(ORT_INVALID_ARGUMENT, "Size of data not large enough to hold the array of int64.");
  }
  if (count != 0) {
    memcpy(data, attribute->ints, count * sizeof(int64_t));
  }
  return NULL;
}

static OrtStatus *ORT_API_CALL fake_set_output_type_shape(const OrtShapeInferContext *context, size_t index,
                                                          const OrtTensorTypeAndShapeInfo *info) {
  REQUIRE(index == 0, "inferred output %zu", index);
  struct OrtShapeInferContext *mutable_context = (struct OrtShapeInferContext *)context;
  mutable_context->output_set = true;
  mutable_context->output = *info;
  return NULL;
}

static OrtApi fake_api(void) {
  OrtApi api;
  memset(&api, 0, sizeof api); /* a call to anything not faked here crashes the run */
  api.CreateStatus = fake_create_status;
  api.GetErrorCode = fake_get_error_code;
  api.GetErrorMessage = fake_get_error_message;
  api.ReleaseStatus = fake_release_status;
  api.KernelInfo_GetNodeName = fake_node_name;
  api.KernelInfo_GetInputCount = fake_input_count;
  api.KernelInfo_GetOutputCount = fake_output_count;
  api.KernelInfo_GetInputName = fake_input_name;
  api.KernelInfo_GetOutputName = fake_output_name;
  api.KernelInfoGetAttribute_string = fake_attribute_string;
  api.KernelInfoGetAttribute_int64 = fake_attribute_int;
  api.KernelInfoGetAttribute_float = fake_attribute_float;
  api.KernelInfoGetAttributeArray_int64 = fake_attribute_ints;
  api.KernelInfoGetAttributeArray_float = fake_attribute_floats;
  api.GetAllocatorWithDefaultOptions = fake_default_allocator;
  api.KernelInfoGetAttribute_tensor = fake_attribute_tensor;
  api.ReleaseValue = fake_release_value;
  api.KernelInfo_GetOutputTypeInfo = fake_output_type_info;
  api.CastTypeInfoToTensorInfo = fake_cast_type_info;
  api.ReleaseTypeInfo = fake_release_type_info;
  api.KernelInfoGetConstantInput_tensor = fake_constant_input;
  api.GetTensorTypeAndShape = fake_type_and_shape;
  api.CreateTensorTypeAndShapeInfo = fake_create_tensor_info;
  api.SetTensorElementType = fake_set_element_type;
  api.SetDimensions = fake_set_dimensions;
  api.GetTensorElementType = fake_element_type;
  api.GetDimensionsCount = fake_dimensions_count;
  api.GetDimensions = fake_dimensions;
  api.ReleaseTensorTypeAndShapeInfo = fake_release_tensor_info;
  api.GetTensorMutableData = fake_mutable_data;
  api.KernelContext_GetInput = fake_get_input;
  api.KernelContext_GetOutputCount = fake_context_output_count;
  api.KernelContext_GetOutput = fake_get_output;
  api.KernelContext_ParallelFor = fake_parallel_for;
  api.ShapeInferContext_GetAttribute = fake_infer_attribute;
  api.ReadOpAttr = fake_read_attribute;
  api.ShapeInferContext_SetOutputTypeShape = fake_set_output_type_shape;
  return api;
}

/* ---------------------------------------------------------------- fuzz input */

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

static int64_t take_i64(Bytes *bytes) {
  uint64_t value = 0;
  for (unsigned i = 0; i < 8; i++) {
    value |= (uint64_t)take(bytes) << (8 * i);
  }
  return (int64_t)value;
}

#define CHOOSE(array, byte) (array)[(byte) % (sizeof(array) / sizeof((array)[0]))]

static const char *const STRING_CHOICES[] = {
    "fp32", "bf16", "fp16", "int8", "uint8", "runtime", "load", "none",
    "fp32\0junk", "fp32 ", " fp32", "FP32", "Runtime", "load\0", "fp64", "", "sometimes", "uint8\n",
    "parity", "secded", "secded", "SECDED", "secded\0", "parity ", "hamming",
};
static const float FLOAT_CHOICES[] = {0.0f, -0.0f, 1.0f, 0.5f, 3.0f, 127.0f, 128.0f, 255.0f, 65504.0f, 65520.0f,
                                      1e-40f, 3.4028235e38f, -1.0f, -1e-40f, INFINITY, -INFINITY, NAN};
static const int64_t INT_CHOICES[] = {8, 16, 32, 64, 128, 256, 512, 1, 2, 3, 10, 16, 0, -64, 24, 1024, 7, INT64_MAX, INT64_MIN};
static const int64_t DIM_CHOICES[] = {0, 1, 2, 3, 5, 7, 8, 9, 16, 33, 63, 64, 65, 255,
                                      (int64_t)1 << 31, ((int64_t)1 << 58) - 1, (int64_t)1 << 58,
                                      (int64_t)1 << 62, INT64_MAX, -1, -64, INT64_MIN};
static const ONNXTensorElementDataType PACKED_TYPES[] = {
    ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT16, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT32,
    ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT64, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT};
static const size_t PACKED_ELEMENT_BYTES[] = {1, 2, 4, 8, 8, 4};
static const ONNXTensorElementDataType OUTPUT_TYPES[] = {
    ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16, ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16,
    ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8};

/* An attribute, usually of its own type (an optional one absent half the time); `shape` never of
 * a type the C API cannot see (see above). */
static void parse_attribute(Bytes *bytes, size_t index, FuzzAttribute *attribute) {
  uint8_t kind_byte = take(bytes);
  attribute->kind = kind_byte < 240 ? ATTRIBUTE_KINDS[index] : (AttrKind)(kind_byte % ATTR_KINDS);
  if (index >= REQUIRED_ATTRIBUTES && kind_byte < 120) {
    attribute->kind = ATTR_ABSENT;
  }
  if (index == SHAPE && attribute->kind == ATTR_FLOATS) {
    attribute->n_floats = 1 + take(bytes) % 3; /* an empty FLOATS is indistinguishable from an empty INTS */
  }
  uint8_t value_byte = take(bytes);
  if (value_byte & 1) {
    const char *choice = CHOOSE(STRING_CHOICES, take(bytes));
    attribute->s_length = strlen(choice);
    memcpy(attribute->s, choice, attribute->s_length);
    if (strcmp(choice, "fp32") == 0 && (value_byte & 2)) { /* "fp32\0junk" as the model holds it */
      memcpy(attribute->s, "fp32\0junk", 9);
      attribute->s_length = 9;
    }
  } else {
    attribute->s_length = take(bytes) % MAX_STRING;
    for (size_t i = 0; i < attribute->s_length; i++) {
      attribute->s[i] = (char)take(bytes);
    }
  }
  attribute->i = value_byte & 4 ? take_i64(bytes) : CHOOSE(INT_CHOICES, take(bytes));
  uint8_t float_byte = take(bytes);
  if (float_byte & 1) {
    attribute->f = CHOOSE(FLOAT_CHOICES, float_byte >> 1);
  } else {
    uint32_t bits = (uint32_t)take_i64(bytes);
    memcpy(&attribute->f, &bits, sizeof bits);
  }
  attribute->n_ints = take(bytes) % (MAX_INTS + 1);
  for (size_t axis = 0; axis < attribute->n_ints; axis++) {
    uint8_t dim = take(bytes);
    attribute->ints[axis] = dim & 1 ? CHOOSE(DIM_CHOICES, dim >> 1) : dim >> 1;
  }
}

static void parse_node(Bytes *bytes, FuzzNode *node) {
  uint8_t shape_byte = take(bytes);
  node->inputs = shape_byte < 240 ? 1 : shape_byte % 3;
  node->input_named = shape_byte != 239;
  node->outputs = shape_byte < 230 ? 1 + shape_byte % 3 : shape_byte % 5;
  node->output0_named = shape_byte != 229;
  node->output1_named = !(shape_byte & 8);
  node->output2_named = !(shape_byte & 16);
  node->packed_is_constant = shape_byte != 228;
  uint8_t name_byte = take(bytes);
  node->name_length = name_byte < 128 ? name_byte % 24 : name_byte < 250 ? 190 + name_byte % 20 : 255;
  for (size_t i = 0; i < node->name_length; i++) {
    node->name[i] = (char)take(bytes);
  }
  for (size_t i = 0; i < ATTRIBUTES; i++) {
    parse_attribute(bytes, i, &node->attributes[i]);
  }
  uint8_t type_byte = take(bytes);
  node->graph_output_type = type_byte & 1 ? (ONNXTensorElementDataType)node->attributes[OUTPUT_TYPE].i
                                          : CHOOSE(OUTPUT_TYPES, type_byte >> 1);
  uint8_t packed_choice = take(bytes);
  size_t type_index = packed_choice % (sizeof PACKED_TYPES / sizeof PACKED_TYPES[0]);
  node->packed.type = PACKED_TYPES[type_index];
  node->packed.rank = 2 + (packed_choice >> 6 == 3) - (packed_choice >> 6 == 2);
  size_t elements = 1;
  for (size_t axis = 0; axis < node->packed.rank; axis++) {
    node->packed.dims[axis] = take(bytes) % 64;
    elements *= (size_t)node->packed.dims[axis];
  }
  node->packed.bytes = elements * PACKED_ELEMENT_BYTES[type_index];
  node->packed.data = malloc(node->packed.bytes != 0 ? node->packed.bytes : 1);
  for (size_t i = 0; i < node->packed.bytes; i++) {
    node->packed.data[i] = take(bytes);
  }
}

/* ---------------------------------------------------------------- oracle */

/* What the rules say of the node's attributes, from reference.h alone. */
typedef struct {
  bool valid;
  ReferenceFormat format;
  unsigned word_bits;
  int check_mode;
  int code;
  bool range;
  float range_max;
  uint64_t n_weights;
  int64_t n_words;
  int64_t lanes;
} Expected;

static Expected expect(const FuzzNode *node) {
  Expected e;
  memset(&e, 0, sizeof e);
  const FuzzAttribute *a = node->attributes;
  bool typed = true;
  for (size_t i = 0; i < ATTRIBUTES; i++) {
    typed &= a[i].kind == ATTRIBUTE_KINDS[i] || (i >= REQUIRED_ATTRIBUTES && a[i].kind == ATTR_ABSENT);
  }
  if (!typed) {
    return e;
  }
  e.format = reference_format(a[FORMAT].s, a[FORMAT].s_length);
  e.check_mode = reference_check_mode(a[CHECK].s, a[CHECK].s_length);
  e.code = a[CODE].kind == ATTR_ABSENT ? 0 : reference_code(a[CODE].s, a[CODE].s_length);
  e.range = a[RANGE_MAX].kind != ATTR_ABSENT;
  e.range_max = a[RANGE_MAX].f;
  bool shape_valid = reference_shape_valid(a[SHAPE].ints, a[SHAPE].n_ints, &e.n_weights);
  bool word_bits_valid = e.format.bits != 0 && reference_word_bits_valid(e.format, a[WORD_BITS].i);
  e.valid = node->inputs == 1 && node->input_named && node->outputs >= 1 && node->outputs <= 2 + (e.code == 1) &&
            node->output0_named && word_bits_valid && e.check_mode >= 0 && e.code >= 0 &&
            (e.code == 0 || reference_secded_fits(e.format, a[WORD_BITS].i)) &&
            (!e.range || reference_range_max_valid(e.range_max)) &&
            reference_output_type_valid(e.format, a[OUTPUT_TYPE].i) && shape_valid &&
            node->graph_output_type == a[OUTPUT_TYPE].i;
  if (e.valid) {
    e.word_bits = (unsigned)a[WORD_BITS].i;
    e.n_words = (int64_t)((e.n_weights * e.format.bits + e.word_bits - 1) / e.word_bits);
    e.lanes = e.word_bits >= 64 ? e.word_bits / 64 : 1;
  }
  return e;
}

static bool packed_matches(const Expected *e, const OrtValue *packed) {
  return packed->type == reference_packed_type(e->word_bits) && packed->rank == 2 && packed->dims[0] == e->n_words &&
         packed->dims[1] == e->lanes;
}

/* Makes the packed tensor agree with the attributes when asked, so that decoding is reached often;
 * with code=secded and `codewords`, its words are SEC-DED codewords with `flips` bits flipped. */
static void fit_packed(const Expected *e, FuzzNode *node, bool codewords, uint8_t flips) {
  size_t element_bytes = e->word_bits >= 64 ? 8 : e->word_bits / 8;
  size_t bytes = (size_t)e->n_words * (size_t)e->lanes * element_bytes;
  if (bytes > ((size_t)1 << 16)) {
    return;
  }
  uint8_t *data = malloc(bytes != 0 ? bytes : 1);
  for (size_t i = 0; i < bytes; i++) {
    data[i] = node->packed.bytes != 0 ? node->packed.data[i % node->packed.bytes] ^ (uint8_t)(i * 131) : (uint8_t)i;
  }
  free(node->packed.data);
  node->packed.data = data;
  node->packed.bytes = bytes;
  node->packed.type = (ONNXTensorElementDataType)reference_packed_type(e->word_bits);
  node->packed.rank = 2;
  node->packed.dims[0] = e->n_words;
  node->packed.dims[1] = e->lanes;
  if (e->code == 1 && codewords) {
    reference_secded_encode(e->format.bits, e->word_bits, data, (size_t)e->n_words);
    for (unsigned i = 0; i < flips % 8 && bytes != 0; i++) {
      size_t bit = ((size_t)flips * 2654435761u + i * 40503u) % (bytes * 8);
      data[bit / 8] ^= (uint8_t)(1u << (bit % 8));
    }
  }
}

/* Shape inference sets output 0 exactly when output_type is an INT naming an output type and shape
 * reads (ints of whatever type) as a valid shape. */
static void check_inference(OrtCustomOp *op, const FuzzNode *node) {
  struct OrtShapeInferContext context;
  memset(&context, 0, sizeof context);
  context.node = node;
  OrtStatus *status = op->InferOutputShapeFn(op, &context);
  REQUIRE(status == NULL, "shape inference returned a status (onnxruntime ignores them)");
  const FuzzAttribute *output_type = &node->attributes[OUTPUT_TYPE];
  const FuzzAttribute *shape = &node->attributes[SHAPE];
  int64_t type = output_type->i;
  bool known_type = output_type->kind == ATTR_INT && (type == 1 || type == 16 || type == 10 || type == 3 || type == 2);
  size_t rank = shape->kind == ATTR_INTS ? shape->n_ints : 0;
  uint64_t n_weights = 0;
  bool expected = known_type && shape->kind != ATTR_ABSENT && reference_shape_valid(shape->ints, rank, &n_weights);
  REQUIRE(context.output_set == expected, "inference set an output: %d, expected %d", context.output_set, expected);
  if (expected) {
    REQUIRE(context.output.type == type && context.output.rank == rank &&
                memcmp(context.output.dims, shape->ints, rank * sizeof(int64_t)) == 0,
            "inferred type %d rank %zu", (int)context.output.type, context.output.rank);
  }
}

static void check_decoded(const Expected *e, const FuzzNode *node, const OrtKernelContext *context) {
  const OrtValue *out = &context->outputs[0];
  bool widen = node->attributes[OUTPUT_TYPE].i != e->format.own_type;
  size_t out_bytes = widen ? 4 : e->format.bits / 8;
  REQUIRE(out->bytes == e->n_weights * out_bytes, "output of %zu bytes", out->bytes);
  uint8_t *expected = malloc(out->bytes != 0 ? out->bytes : 1);
  ReferenceCounts counts = reference_decode(e->format, e->word_bits, widen, e->code, e->check_mode != 2, e->range,
                                            e->range_max, (size_t)e->n_weights, node->packed.data, expected);
  REQUIRE(memcmp(out->data, expected, out->bytes) == 0, "weights decoded wrongly (W=%u, code %d, range %d)",
          e->word_bits, e->code, e->range);
  free(expected);
  if (node->outputs >= 2 && node->output1_named) {
    int64_t reported;
    memcpy(&reported, context->outputs[1].data, sizeof reported);
    REQUIRE(reported == (int64_t)counts.masked, "masked_words %lld, expected %zu", (long long)reported, counts.masked);
  }
  if (node->outputs == 3 && node->output2_named) {
    int64_t reported;
    memcpy(&reported, context->outputs[2].data, sizeof reported);
    REQUIRE(reported == (int64_t)counts.corrected, "corrected_words %lld, expected %zu", (long long)reported,
            counts.corrected);
  }
}

/* A refusal names the node, escaped, unless a resource of the fuzzer ran out. */
static bool is_resource_failure(const OrtStatus *status) {
  return strstr(status->message, "too large for the fuzzer") != NULL || strstr(status->message, "out of memory") != NULL;
}

static void check_refusal(const FuzzNode *node, const OrtStatus *status) {
  char escaped[4 * 200 + 4];
  char prefix[sizeof escaped + 64];
  reference_escape(node->name, node->name_length, escaped);
  snprintf(prefix, sizeof prefix, "ParityCheckUnpack node '%s': ", escaped);
  REQUIRE(strncmp(status->message, prefix, strlen(prefix)) == 0, "message %s", status->message);
  for (const char *c = status->message; *c != '\0'; c++) {
    REQUIRE(*c >= 0x20 && *c <= 0x7E, "a byte 0x%02x in the message", (unsigned)(unsigned char)*c);
  }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  static OrtApi api;
  static OrtCustomOp *op;
  if (op == NULL) {
    api = fake_api();
    op = parity_check_unpack_op(&api);
    /* the schema of docs/FORMAT.md: one input of a type checked at run time; weights and an optional int64 */
    REQUIRE(strcmp(op->GetName(op), "ParityCheckUnpack") == 0 && op->GetExecutionProviderType(op) == NULL, "name");
    REQUIRE(op->GetStartVersion(op) == 1 && op->GetEndVersion(op) == 1, "versions");
    REQUIRE(op->GetInputTypeCount(op) == 1 && op->GetInputType(op, 0) == ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED &&
                op->GetInputCharacteristic(op, 0) == INPUT_OUTPUT_REQUIRED &&
                op->GetInputMemoryType(op, 0) == OrtMemTypeDefault,
            "input");
    REQUIRE(op->GetOutputTypeCount(op) == 3 && op->GetOutputType(op, 0) == ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED &&
                op->GetOutputType(op, 1) == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 &&
                op->GetOutputType(op, 2) == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 &&
                op->GetOutputCharacteristic(op, 0) == INPUT_OUTPUT_REQUIRED &&
                op->GetOutputCharacteristic(op, 1) == INPUT_OUTPUT_OPTIONAL &&
                op->GetOutputCharacteristic(op, 2) == INPUT_OUTPUT_OPTIONAL,
            "outputs");
  }
  Bytes bytes = {data, size};
  uint8_t fit_byte = take(&bytes);
  bool fit = fit_byte & 1;
  FuzzNode node;
  memset(&node, 0, sizeof node);
  parse_node(&bytes, &node);
  Expected e = expect(&node);
  if (e.valid && fit) {
    fit_packed(&e, &node, fit_byte & 2, (uint8_t)(fit_byte >> 2));
  }
  bool packed_ok = e.valid && packed_matches(&e, &node.packed) && (e.check_mode != 1 || node.packed_is_constant);
  check_inference(op, &node);

  OrtKernelInfo info = {&node};
  void *kernel = NULL;
  OrtStatus *status = op->CreateKernelV2(op, &api, &info, &kernel);
  OrtKernelContext context;
  memset(&context, 0, sizeof context);
  context.node = &node;
  if (status == NULL) {
    REQUIRE(e.valid, "created a kernel for a node the rules refuse");
    status = op->KernelComputeV2(kernel, &context);
    if (status == NULL) {
      REQUIRE(packed_ok, "decoded a packed input the rules refuse");
      check_decoded(&e, &node, &context);
    }
    op->KernelDestroy(kernel);
  }
  if (status != NULL) {
    check_refusal(&node, status);
    REQUIRE(!(e.valid && packed_ok) || is_resource_failure(status), "refused a valid node: %s", status->message);
    fake_release_status(status);
  }
  free(context.outputs[0].data);
  free(context.outputs[1].data);
  free(context.outputs[2].data);
  free(node.packed.data);
  return 0;
}
