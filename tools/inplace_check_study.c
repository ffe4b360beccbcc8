/*
 * Study kernel for tools/inplace_check_study.py (not part of the package): WordParityCheck, domain
 * "oppass.study", a parity check of a weight initializer in place, beside its consumer.
 *
 *   inputs:  0 weights (float, float16 or int8: the stored bytes are the weights, docs/FORMAT.md
 *              Layout, with the parity adjustment in them), 1 pass (float, the consumer's bias),
 *            2 after (optional, any type, never read: the consumer's activation input, so that the
 *              node runs only once that exists, right before the consumer)
 *   outputs: 0 a copy of `pass` (the data dependency that orders this node before the consumer)
 *   attribute: word_bits (int: a word size docs/FORMAT.md allows for the format, wider than one weight)
 *
 * Each run scans every word of input 0 with the decoder's parity scan (custom_ops/decoder.c,
 * mask_words_in_place); a word with odd parity is zeroed in input 0's own buffer (the consumer
 * reads that buffer next). Clean words are never written. At kernel creation the
 * weight must be a constant initializer, and its buffer must lie in a writable mapping of this
 * process (/proc/self/maps): a read-only one (a memory-mapped external-data file) is refused, as a
 * write there would fault. onnxruntime hands a kernel its inputs as const: the write casts that away,
 * which is sound only because the buffer is the session's own initializer and nothing else runs on
 * it during this node.
 */

#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "decoder.h"
#include "onnxruntime_c_api.h"

#define API_VERSION 17
#define DOMAIN "oppass.study"
#define TASK_BYTES ((size_t)256 * 1024)

typedef struct {
  const OrtApi *api;
  DecodePlan plan;
} Kernel;

typedef struct {
  const DecodePlan *plan;
  uint8_t *words;
  size_t words_per_task;
} Job;

static const OrtApi *global_api;

static void check_task(void *opaque, size_t task) {
  const Job *job = opaque;
  size_t first = task * job->words_per_task;
  size_t end = first + job->words_per_task < job->plan->n_words ? first + job->words_per_task : job->plan->n_words;
  mask_words_in_place(job->plan, job->words, first, end);
}

/* The weight format whose packed bits an initializer of this element type is (fp32, fp16, int8), or NULL. */
static const WeightFormat *format_of(ONNXTensorElementDataType type) {
  switch (type) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT:
      return find_weight_format("fp32", 4);
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16:
      return find_weight_format("fp16", 4);
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8:
      return find_weight_format("int8", 4);
    default:
      return NULL;
  }
}

/* The tensor's data and size in bytes; an error for an element type other than float, float16, int8. */
static OrtStatus *tensor_bytes(const OrtApi *api, const OrtValue *value, uint8_t **data, size_t *count_out,
                               const WeightFormat **format) {
  OrtTensorTypeAndShapeInfo *info = NULL;
  OrtStatus *status = api->GetTensorTypeAndShape(value, &info);
  if (status != NULL) {
    return status;
  }
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  size_t count = 0;
  status = api->GetTensorElementType(info, &type);
  if (status == NULL) {
    status = api->GetTensorShapeElementCount(info, &count);
  }
  api->ReleaseTensorTypeAndShapeInfo(info);
  if (status != NULL) {
    return status;
  }
  *format = format_of(type);
  if (*format == NULL) {
    return api->CreateStatus(ORT_INVALID_ARGUMENT, "WordParityCheck: weights must be float, float16 or int8");
  }
  void *pointer = NULL;
  status = api->GetTensorMutableData((OrtValue *)value, &pointer);
  if (status != NULL) {
    return status;
  }
  *data = pointer;
  *count_out = count;
  return NULL;
}

/* Whether [address, address + size) lies in writable mappings of this process. */
static int writable(const void *address, size_t size) {
  FILE *maps = fopen("/proc/self/maps", "r");
  if (maps == NULL) {
    return 0;
  }
  uintptr_t begin = (uintptr_t)address;
  uintptr_t end = begin + size;
  char line[512];
  while (begin < end && fgets(line, sizeof line, maps) != NULL) {
    uintptr_t low = 0;
    uintptr_t high = 0;
    char permissions[5] = {0};
    if (sscanf(line, "%" SCNxPTR "-%" SCNxPTR " %4s", &low, &high, permissions) != 3) {
      continue;
    }
    if (low <= begin && begin < high) {
      if (permissions[1] != 'w') {
        break;
      }
      begin = high; /* the maps are sorted: continue with the next mapping */
    }
  }
  fclose(maps);
  return begin >= end;
}

static void ORT_API_CALL destroy_kernel(void *opaque) { free(opaque); }

static OrtStatus *ORT_API_CALL create_kernel(const OrtCustomOp *op, const OrtApi *api, const OrtKernelInfo *info,
                                             void **out) {
  (void)op;
  int64_t word_bits = 0;
  OrtStatus *status = api->KernelInfoGetAttribute_int64(info, "word_bits", &word_bits);
  if (status != NULL) {
    return status;
  }
  int is_constant = 0;
  const OrtValue *weights = NULL;
  status = api->KernelInfoGetConstantInput_tensor(info, 0, &is_constant, &weights);
  if (status != NULL) {
    return status;
  }
  if (!is_constant || weights == NULL) {
    return api->CreateStatus(ORT_INVALID_GRAPH, "WordParityCheck: the weights must be a constant initializer");
  }
  uint8_t *data = NULL;
  size_t count = 0;
  const WeightFormat *format = NULL;
  status = tensor_bytes(api, weights, &data, &count, &format);
  if (status != NULL) {
    return status;
  }
  if (!word_bits_allowed(format, word_bits) || word_bits == format->bits) {
    return api->CreateStatus(ORT_INVALID_ARGUMENT, "WordParityCheck: word_bits not allowed for the weights' format");
  }
  if (count != 0 && !writable(data, count * format->bits / 8)) {
    return api->CreateStatus(ORT_FAIL, "WordParityCheck: the weights lie in read-only memory (a mapped file): "
                                       "they cannot be masked in place");
  }
  Kernel *kernel = calloc(1, sizeof *kernel);
  if (kernel == NULL) {
    return api->CreateStatus(ORT_FAIL, "WordParityCheck: out of memory");
  }
  kernel->api = api;
  kernel->plan = plan_decode(format, (unsigned)word_bits, format->own_type, CODE_PARITY, true, false, 0.0f, count);
  *out = kernel;
  return NULL;
}

static OrtStatus *ORT_API_CALL compute_kernel(void *opaque, OrtKernelContext *context) {
  const Kernel *kernel = opaque;
  const OrtApi *api = kernel->api;
  const OrtValue *weights = NULL;
  const OrtValue *pass = NULL;
  OrtStatus *status = api->KernelContext_GetInput(context, 0, &weights);
  if (status == NULL) {
    status = api->KernelContext_GetInput(context, 1, &pass);
  }
  if (status != NULL) {
    return status;
  }
  uint8_t *data = NULL;
  size_t count = 0;
  const WeightFormat *format = NULL;
  status = tensor_bytes(api, weights, &data, &count, &format);
  if (status != NULL) {
    return status;
  }
  if (count != kernel->plan.n_weights || format->own_type != kernel->plan.output_type) {
    return api->CreateStatus(ORT_FAIL, "WordParityCheck: the weights changed since kernel creation");
  }
  Job job = {&kernel->plan, data, TASK_BYTES / kernel->plan.word_bytes};
  size_t tasks = (kernel->plan.n_words + job.words_per_task - 1) / job.words_per_task;
  if (tasks > 1) {
    status = api->KernelContext_ParallelFor(context, check_task, tasks, 0, &job);
    if (status != NULL) {
      return status;
    }
  } else if (tasks == 1) {
    mask_words_in_place(&kernel->plan, data, 0, kernel->plan.n_words);
  }
  OrtTensorTypeAndShapeInfo *info = NULL;
  status = api->GetTensorTypeAndShape(pass, &info);
  if (status != NULL) {
    return status;
  }
  size_t rank = 0;
  size_t passed = 0;
  int64_t dims[8];
  status = api->GetDimensionsCount(info, &rank);
  if (status == NULL && rank > 8) {
    status = api->CreateStatus(ORT_INVALID_ARGUMENT, "WordParityCheck: pass has rank > 8");
  }
  if (status == NULL) {
    status = api->GetDimensions(info, dims, rank);
  }
  if (status == NULL) {
    status = api->GetTensorShapeElementCount(info, &passed);
  }
  api->ReleaseTensorTypeAndShapeInfo(info);
  if (status != NULL) {
    return status;
  }
  OrtValue *output = NULL;
  const void *source = NULL;
  void *target = NULL;
  status = api->KernelContext_GetOutput(context, 0, dims, rank, &output);
  if (status == NULL) {
    status = api->GetTensorData(pass, &source);
  }
  if (status == NULL) {
    status = api->GetTensorMutableData(output, &target);
  }
  if (status == NULL && passed != 0) {
    memcpy(target, source, passed * sizeof(float));
  }
  return status;
}

static const char *ORT_API_CALL op_name(const OrtCustomOp *op) {
  (void)op;
  return "WordParityCheck";
}
static const char *ORT_API_CALL op_provider(const OrtCustomOp *op) {
  (void)op;
  return NULL;
}
static ONNXTensorElementDataType ORT_API_CALL op_input_type(const OrtCustomOp *op, size_t index) {
  (void)op;
  return index == 1 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
}
static size_t ORT_API_CALL op_input_count(const OrtCustomOp *op) {
  (void)op;
  return 3;
}
static OrtCustomOpInputOutputCharacteristic ORT_API_CALL op_input_characteristic(const OrtCustomOp *op,
                                                                                 size_t index) {
  (void)op;
  return index == 2 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
}
static ONNXTensorElementDataType ORT_API_CALL op_output_type(const OrtCustomOp *op, size_t index) {
  (void)op;
  (void)index;
  return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}
static size_t ORT_API_CALL op_output_count(const OrtCustomOp *op) {
  (void)op;
  return 1;
}
static OrtCustomOpInputOutputCharacteristic ORT_API_CALL op_characteristic(const OrtCustomOp *op, size_t index) {
  (void)op;
  (void)index;
  return INPUT_OUTPUT_REQUIRED;
}
static OrtMemType ORT_API_CALL op_memory_type(const OrtCustomOp *op, size_t index) {
  (void)op;
  (void)index;
  return OrtMemTypeDefault;
}

static OrtCustomOp word_parity_check = {
    .version = API_VERSION,
    .GetName = op_name,
    .GetExecutionProviderType = op_provider,
    .GetInputType = op_input_type,
    .GetInputTypeCount = op_input_count,
    .GetOutputType = op_output_type,
    .GetOutputTypeCount = op_output_count,
    .KernelDestroy = destroy_kernel,
    .GetInputCharacteristic = op_input_characteristic,
    .GetOutputCharacteristic = op_characteristic,
    .GetInputMemoryType = op_memory_type,
    .CreateKernelV2 = create_kernel,
    .KernelComputeV2 = compute_kernel,
};

static OrtCustomOpDomain *domain;

__attribute__((destructor)) static void release_domain(void) {
  if (domain != NULL && global_api != NULL) {
    global_api->ReleaseCustomOpDomain(domain);
  }
}

ORT_EXPORT OrtStatus *ORT_API_CALL RegisterCustomOps(OrtSessionOptions *options, const OrtApiBase *base);

ORT_EXPORT OrtStatus *ORT_API_CALL RegisterCustomOps(OrtSessionOptions *options, const OrtApiBase *base) {
  const OrtApi *api = base->GetApi(API_VERSION);
  if (api == NULL) {
    return NULL;
  }
  if (domain == NULL) {
    OrtStatus *status = api->CreateCustomOpDomain(DOMAIN, &domain);
    if (status == NULL) {
      status = api->CustomOpDomain_Add(domain, &word_parity_check);
    }
    if (status != NULL) {
      return status;
    }
    global_api = api;
  }
  return api->AddCustomOpDomain(options, domain);
}
