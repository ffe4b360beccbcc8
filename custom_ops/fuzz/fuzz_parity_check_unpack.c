/*
 * libFuzzer harness for ParityCheckUnpack: drives the kernel's real attribute validation
 * (CreateKernelV2) and decode (KernelComputeV2) with attributes, packed tensors and graph
 * types taken from the fuzz input, through a fake OrtApi, so that AddressSanitizer and
 * UndefinedBehaviorSanitizer see every access. Buffers have exactly the size onnxruntime
 * would allocate. When the kernel accepts an input, its output is checked against a plain
 * reference decoder written here from docs/FORMAT.md; a mismatch aborts.
 *
 * Build and run: custom_ops/fuzz/build.sh, then build/fuzz/fuzz_parity_check_unpack corpus/.
 */

#include "../parity_check_unpack.c"

#include <assert.h>
#include <math.h>

struct OrtStatus {
  OrtErrorCode code;
  char message[1024];
};

struct OrtValue {
  ONNXTensorElementDataType type;
  size_t rank;
  int64_t dims[8];
  uint8_t *data;
  size_t bytes;
};

struct OrtTensorTypeAndShapeInfo {
  ONNXTensorElementDataType type;
  size_t rank;
  int64_t dims[8];
};

struct OrtTypeInfo {
  struct OrtTensorTypeAndShapeInfo tensor;
};

/* The node as the fuzz input describes it. */
typedef struct {
  const char *format;       /* NULL: attribute missing */
  int64_t word_bits;
  bool has_word_bits;
  const char *check;
  int64_t output_type;
  bool has_output_type;
  int64_t shape[4];
  size_t shape_rank;
  bool has_shape;
  ONNXTensorElementDataType graph_output_type;
  OrtValue packed;
  bool has_count_output;
} FuzzNode;

struct OrtKernelInfo {
  const FuzzNode *node;
};

struct OrtKernelContext {
  const FuzzNode *node;
  OrtValue outputs[2];
  int64_t count;
};

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

static OrtStatus *copy_string(const char *value, char *out, size_t *size) {
  if (value == NULL) {
    return fake_status(ORT_FAIL, "no such attribute");
  }
  size_t needed = strlen(value) + 1;
  if (out == NULL) {
    *size = needed;
    return NULL;
  }
  if (*size < needed) {
    return fake_status(ORT_INVALID_ARGUMENT, "buffer too small");
  }
  memcpy(out, value, needed);
  *size = needed;
  return NULL;
}

static OrtStatus *ORT_API_CALL fake_node_name(const OrtKernelInfo *info, char *out, size_t *size) {
  (void)info;
  return copy_string("fuzzed_node", out, size);
}

static OrtStatus *ORT_API_CALL fake_attribute_string(const OrtKernelInfo *info, const char *name, char *out,
                                                     size_t *size) {
  const FuzzNode *node = info->node;
  const char *value = strcmp(name, "format") == 0 ? node->format : strcmp(name, "check") == 0 ? node->check : NULL;
  return copy_string(value, out, size);
}

static OrtStatus *ORT_API_CALL fake_attribute_int(const OrtKernelInfo *info, const char *name, int64_t *out) {
  const FuzzNode *node = info->node;
  if (strcmp(name, "word_bits") == 0 && node->has_word_bits) {
    *out = node->word_bits;
    return NULL;
  }
  if (strcmp(name, "output_type") == 0 && node->has_output_type) {
    *out = node->output_type;
    return NULL;
  }
  return fake_status(ORT_FAIL, "no such attribute");
}

static OrtStatus *ORT_API_CALL fake_attribute_ints(const OrtKernelInfo *info, const char *name, int64_t *out,
                                                   size_t *size) {
  const FuzzNode *node = info->node;
  if (strcmp(name, "shape") != 0 || !node->has_shape) {
    return fake_status(ORT_FAIL, "no such attribute");
  }
  if (out == NULL) {
    *size = node->shape_rank;
    return NULL;
  }
  if (*size < node->shape_rank) {
    return fake_status(ORT_INVALID_ARGUMENT, "buffer too small");
  }
  memcpy(out, node->shape, node->shape_rank * sizeof *out);
  *size = node->shape_rank;
  return NULL;
}

static OrtStatus *ORT_API_CALL fake_output_type_info(const OrtKernelInfo *info, size_t index, OrtTypeInfo **out) {
  assert(index == 0);
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
  assert(index == 0);
  *is_constant = 1;
  *out = &info->node->packed;
  return NULL;
}

static OrtStatus *ORT_API_CALL fake_type_and_shape(const OrtValue *value, OrtTensorTypeAndShapeInfo **out) {
  *out = calloc(1, sizeof **out);
  (*out)->type = value->type;
  (*out)->rank = value->rank;
  memcpy((*out)->dims, value->dims, sizeof value->dims);
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
  assert(length <= info->rank);
  memcpy(dims, info->dims, length * sizeof *dims);
  return NULL;
}

static void ORT_API_CALL fake_release_tensor_info(OrtTensorTypeAndShapeInfo *info) { free(info); }

static OrtStatus *ORT_API_CALL fake_mutable_data(OrtValue *value, void **out) {
  *out = value->data;
  return NULL;
}

static OrtStatus *ORT_API_CALL fake_get_input(const OrtKernelContext *context, size_t index, const OrtValue **out) {
  assert(index == 0);
  *out = &context->node->packed;
  return NULL;
}

static OrtStatus *ORT_API_CALL fake_output_count(const OrtKernelContext *context, size_t *out) {
  *out = context->node->has_count_output ? 2 : 1;
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

/* Allocates an output exactly as large as onnxruntime would for these dims and the graph's type. */
static OrtStatus *ORT_API_CALL fake_get_output(OrtKernelContext *context, size_t index, const int64_t *dims,
                                               size_t rank, OrtValue **out) {
  assert(index < 2 && rank <= 8);
  OrtValue *value = &context->outputs[index];
  value->type = index == 0 ? context->node->graph_output_type : ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
  value->rank = rank;
  size_t count = 1;
  for (size_t axis = 0; axis < rank; axis++) {
    assert(dims[axis] >= 0);
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

static OrtApi fake_api(void) {
  OrtApi api;
  memset(&api, 0, sizeof api);
  api.CreateStatus = fake_create_status;
  api.GetErrorCode = fake_get_error_code;
  api.GetErrorMessage = fake_get_error_message;
  api.ReleaseStatus = fake_release_status;
  api.KernelInfo_GetNodeName = fake_node_name;
  api.KernelInfoGetAttribute_string = fake_attribute_string;
  api.KernelInfoGetAttribute_int64 = fake_attribute_int;
  api.KernelInfoGetAttributeArray_int64 = fake_attribute_ints;
  api.KernelInfo_GetOutputTypeInfo = fake_output_type_info;
  api.CastTypeInfoToTensorInfo = fake_cast_type_info;
  api.ReleaseTypeInfo = fake_release_type_info;
  api.KernelInfoGetConstantInput_tensor = fake_constant_input;
  api.GetTensorTypeAndShape = fake_type_and_shape;
  api.GetTensorElementType = fake_element_type;
  api.GetDimensionsCount = fake_dimensions_count;
  api.GetDimensions = fake_dimensions;
  api.ReleaseTensorTypeAndShapeInfo = fake_release_tensor_info;
  api.GetTensorMutableData = fake_mutable_data;
  api.KernelContext_GetInput = fake_get_input;
  api.KernelContext_GetOutputCount = fake_output_count;
  api.KernelContext_GetOutput = fake_get_output;
  api.KernelContext_ParallelFor = fake_parallel_for;
  return api;
}

/* ---------------------------------------------------------------- reference decoder (docs/FORMAT.md) */

static uint32_t reference_fp16_to_fp32(uint16_t half) {
  uint32_t sign = (uint32_t)(half >> 15) << 31;
  uint32_t exponent = (half >> 10) & 0x1F;
  uint32_t mantissa = half & 0x3FF;
  if (exponent == 0x1F) {
    return sign | 0x7F800000u | (mantissa << 13);
  }
  if (exponent != 0) {
    return sign | ((exponent + 112) << 23) | (mantissa << 13);
  }
  float value = ldexpf((float)mantissa, -24);
  uint32_t bits;
  memcpy(&bits, &value, sizeof bits);
  return sign | bits;
}

static bool word_is_odd(const uint8_t *stream, size_t word, size_t word_bytes) {
  unsigned parity = 0;
  for (size_t byte = word * word_bytes; byte < (word + 1) * word_bytes; byte++) {
    parity ^= (unsigned)__builtin_popcount(stream[byte]);
  }
  return parity & 1;
}

/* Checks a successful run: every output weight and the masked count, from the packed bytes. */
static void check_against_reference(const Kernel *kernel, const FuzzNode *node, const OrtKernelContext *context) {
  size_t weight_bytes = kernel->format->bits / 8;
  size_t word_bytes = kernel->word_bits / 8;
  size_t per_word = kernel->word_bits / kernel->format->bits;
  bool check = kernel->check != CHECK_NONE;
  const OrtValue *out = &context->outputs[0];
  size_t out_bytes = element_size(out->type);
  int64_t masked = 0;
  for (size_t word = 0; word < kernel->plan.n_words; word++) {
    masked += check && word_is_odd(node->packed.data, word, word_bytes);
  }
  for (size_t k = 0; k < kernel->plan.n_weights; k++) {
    const uint8_t *in = node->packed.data + k * weight_bytes;
    uint8_t expected[4] = {0, 0, 0, 0};
    if (!(check && word_is_odd(node->packed.data, k / per_word, word_bytes))) {
      if (out_bytes == weight_bytes) {
        memcpy(expected, in, weight_bytes);
      } else {
        uint16_t half;
        memcpy(&half, in, 2);
        uint32_t single = strcmp(kernel->format->name, "bf16") == 0 ? (uint32_t)half << 16 : reference_fp16_to_fp32(half);
        memcpy(expected, &single, 4);
      }
    }
    if (memcmp(out->data + k * out_bytes, expected, out_bytes) != 0) {
      fprintf(stderr, "weight %zu decoded wrongly (%s, W=%u)\n", k, kernel->format->name, kernel->word_bits);
      abort();
    }
  }
  if (node->has_count_output) {
    int64_t reported;
    memcpy(&reported, context->outputs[1].data, sizeof reported);
    if (reported != masked) {
      fprintf(stderr, "masked_words %lld, expected %lld\n", (long long)reported, (long long)masked);
      abort();
    }
  }
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

static const char *const FORMAT_NAMES[] = {"fp32", "bf16", "fp16", "int8", "uint8", "fp64", "", NULL};
static const char *const CHECK_NAMES[] = {"runtime", "load", "none", "sometimes", NULL};
static const int64_t WORD_CHOICES[] = {8, 16, 32, 64, 128, 256, 512, 0, -64, 24, 1024, INT64_MAX};
static const ONNXTensorElementDataType PACKED_TYPES[] = {
    ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT16, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT32,
    ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT64, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT};
static const ONNXTensorElementDataType OUTPUT_TYPES[] = {
    ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16, ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16,
    ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8};
static const size_t PACKED_ELEMENT_BYTES[] = {1, 2, 4, 8, 8, 4};

#define CHOOSE(array, byte) (array)[(byte) % (sizeof(array) / sizeof((array)[0]))]

/* Decodes the fuzz input into a node: attributes (some missing or invalid), graph type, packed tensor. */
static void parse_node(Bytes *bytes, FuzzNode *node) {
  uint8_t missing = take(bytes);
  node->format = missing & 1 ? NULL : CHOOSE(FORMAT_NAMES, take(bytes));
  node->has_word_bits = !(missing & 2);
  node->word_bits = CHOOSE(WORD_CHOICES, take(bytes));
  node->check = missing & 4 ? NULL : CHOOSE(CHECK_NAMES, take(bytes));
  node->has_output_type = !(missing & 8);
  uint8_t type_byte = take(bytes);
  node->output_type = type_byte < 200 ? CHOOSE(OUTPUT_TYPES, type_byte) : (int64_t)type_byte - 230;
  node->graph_output_type = take(bytes) & 1 ? (ONNXTensorElementDataType)node->output_type : CHOOSE(OUTPUT_TYPES, take(bytes));
  node->has_shape = !(missing & 16);
  node->shape_rank = take(bytes) % 5;
  for (size_t axis = 0; axis < node->shape_rank; axis++) {
    uint8_t dim = take(bytes);
    node->shape[axis] = dim >= 250 ? (dim == 255 ? INT64_MAX / 3 : -(int64_t)dim) : dim;
  }
  node->has_count_output = missing & 32;
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

/* Makes the packed dims agree with the attributes when the input asks for it, so decoding is reached often. */
static void fit_packed_to_attributes(const Kernel *kernel, FuzzNode *node) {
  size_t elements = (size_t)kernel->packed_dims[0] * (size_t)kernel->packed_dims[1];
  size_t element_bytes = kernel->word_bits >= 64 ? 8 : kernel->word_bits / 8;
  if (elements * element_bytes > ((size_t)1 << 16)) {
    return;
  }
  uint8_t *data = malloc(elements * element_bytes != 0 ? elements * element_bytes : 1);
  for (size_t i = 0; i < elements * element_bytes; i++) {
    data[i] = node->packed.bytes != 0 ? node->packed.data[i % node->packed.bytes] ^ (uint8_t)(i * 131) : (uint8_t)i;
  }
  free(node->packed.data);
  node->packed.data = data;
  node->packed.bytes = elements * element_bytes;
  node->packed.type = kernel->packed_type;
  node->packed.rank = 2;
  node->packed.dims[0] = kernel->packed_dims[0];
  node->packed.dims[1] = kernel->packed_dims[1];
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  static OrtApi api;
  static OppassOp *op;
  if (op == NULL) {
    api = fake_api();
    op = calloc(1, sizeof *op);
    op->api = &api;
  }
  Bytes bytes = {data, size};
  bool fit = take(&bytes) & 1;
  FuzzNode node;
  memset(&node, 0, sizeof node);
  parse_node(&bytes, &node);
  OrtKernelInfo info = {&node};
  Kernel *kernel = NULL;
  /* With `fit`, a first pass learns the packed dims the attributes imply (load mode reads the packed
   * tensor at creation, so those kernels are created again after fitting). */
  OrtStatus *status = create_kernel(&op->base, &api, &info, (void **)&kernel);
  if (status == NULL && fit) {
    fit_packed_to_attributes(kernel, &node);
    destroy_kernel(kernel);
    kernel = NULL;
    status = create_kernel(&op->base, &api, &info, (void **)&kernel);
  }
  if (status == NULL) {
    OrtKernelContext context;
    memset(&context, 0, sizeof context);
    context.node = &node;
    status = compute_kernel(kernel, &context);
    if (status == NULL) {
      check_against_reference(kernel, &node, &context);
    }
    free(context.outputs[0].data);
    free(context.outputs[1].data);
    destroy_kernel(kernel);
  }
  if (status != NULL) {
    assert(strstr(status->message, "fuzzed_node") != NULL || strstr(status->message, "out of memory") != NULL ||
           strstr(status->message, "too large for the fuzzer") != NULL);
    fake_release_status(status);
  }
  free(node.packed.data);
  return 0;
}
