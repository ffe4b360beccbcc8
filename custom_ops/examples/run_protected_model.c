/* Runs an oppass-protected model through onnxruntime's C API: the documented path for C and C++.
 *
 *   run_protected_model LIBONNXRUNTIME LIBOPPASS_OPS MODEL INPUT.f32 OUTPUT.f32
 *
 * onnxruntime is opened with dlopen (the libonnxruntime.so of any install, e.g. the Python wheel's
 * onnxruntime/capi/libonnxruntime.so.*), so only onnxruntime_c_api.h is needed to compile:
 *   cc -I ORT_INCLUDE_DIR run_protected_model.c -o run_protected_model -ldl
 * The ParityCheckUnpack library is registered with RegisterCustomOpsLibrary_V2 (pass "-" for a model
 * protected with --check load, which needs none). The model's one float input is read from INPUT.f32
 * (raw little-endian floats, dynamic dimensions taken as 1); output 0 is written to OUTPUT.f32, and the
 * output oppass_masked_words, when the model has it, is printed as "masked_words N". Every status is
 * checked; an error prints one line and exits 1.
 */
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "onnxruntime_c_api.h"

static const OrtApi *api;

static void check(OrtStatus *status, const char *what) {
  if (status != NULL) {
    fprintf(stderr, "run_protected_model: %s: %s\n", what, api->GetErrorMessage(status));
    api->ReleaseStatus(status);
    exit(1);
  }
}

static void fail(const char *message, const char *detail) {
  fprintf(stderr, "run_protected_model: %s%s\n", message, detail);
  exit(1);
}

static void *read_file(const char *path, size_t *size) {
  FILE *file = fopen(path, "rb");
  if (file == NULL) fail("cannot open ", path);
  if (fseek(file, 0, SEEK_END) != 0) fail("cannot seek ", path);
  long length = ftell(file);
  if (length < 0 || fseek(file, 0, SEEK_SET) != 0) fail("cannot size ", path);
  void *data = malloc(length > 0 ? (size_t)length : 1);
  if (data == NULL || fread(data, 1, (size_t)length, file) != (size_t)length) fail("cannot read ", path);
  fclose(file);
  *size = (size_t)length;
  return data;
}

int main(int argc, char **argv) {
  if (argc != 6) fail("usage: run_protected_model LIBONNXRUNTIME LIBOPPASS_OPS|- MODEL INPUT.f32 OUTPUT.f32", "");
  void *runtime = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
  if (runtime == NULL) fail("cannot open onnxruntime: ", dlerror());
  const OrtApiBase *(*get_api_base)(void) = (const OrtApiBase *(*)(void))dlsym(runtime, "OrtGetApiBase");
  if (get_api_base == NULL) fail("no OrtGetApiBase in ", argv[1]);
  api = get_api_base()->GetApi(ORT_API_VERSION);
  if (api == NULL) fail("this onnxruntime lacks the C API version of the header, at ", argv[1]);

  OrtEnv *env;
  OrtSessionOptions *options;
  OrtSession *session;
  OrtAllocator *allocator;
  check(api->CreateEnv(ORT_LOGGING_LEVEL_WARNING, "oppass", &env), "CreateEnv");
  check(api->CreateSessionOptions(&options), "CreateSessionOptions");
  if (strcmp(argv[2], "-") != 0) {
    check(api->RegisterCustomOpsLibrary_V2(options, argv[2]), "RegisterCustomOpsLibrary_V2");
  }
  check(api->CreateSession(env, argv[3], options, &session), "CreateSession");
  check(api->GetAllocatorWithDefaultOptions(&allocator), "GetAllocatorWithDefaultOptions");

  char *input_name;
  OrtTypeInfo *type_info;
  const OrtTensorTypeAndShapeInfo *tensor_info;
  size_t rank;
  check(api->SessionGetInputName(session, 0, allocator, &input_name), "SessionGetInputName");
  check(api->SessionGetInputTypeInfo(session, 0, &type_info), "SessionGetInputTypeInfo");
  check(api->CastTypeInfoToTensorInfo(type_info, &tensor_info), "CastTypeInfoToTensorInfo");
  check(api->GetDimensionsCount(tensor_info, &rank), "GetDimensionsCount");
  int64_t dims[16];
  if (rank > 16) fail("input rank above 16", "");
  check(api->GetDimensions(tensor_info, dims, rank), "GetDimensions");
  size_t elements = 1;
  for (size_t i = 0; i < rank; i++) {
    if (dims[i] <= 0) dims[i] = 1;
    elements *= (size_t)dims[i];
  }
  size_t input_bytes;
  float *input = read_file(argv[4], &input_bytes);
  if (input_bytes != elements * sizeof(float)) fail("input file size does not match the model's input: ", argv[4]);

  OrtMemoryInfo *memory;
  OrtValue *input_value = NULL;
  check(api->CreateCpuMemoryInfo(OrtArenaAllocator, OrtMemTypeDefault, &memory), "CreateCpuMemoryInfo");
  check(api->CreateTensorWithDataAsOrtValue(memory, input, input_bytes, dims, rank,
                                            ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, &input_value),
        "CreateTensorWithDataAsOrtValue");

  size_t n_outputs;
  check(api->SessionGetOutputCount(session, &n_outputs), "SessionGetOutputCount");
  if (n_outputs == 0 || n_outputs > 64) fail("unsupported number of outputs", "");
  char *output_names[64];
  OrtValue *outputs[64] = {NULL};
  for (size_t i = 0; i < n_outputs; i++) {
    check(api->SessionGetOutputName(session, i, allocator, &output_names[i]), "SessionGetOutputName");
  }
  const char *input_names[] = {input_name};
  const OrtValue *inputs[] = {input_value};
  check(api->Run(session, NULL, input_names, inputs, 1, (const char *const *)output_names, n_outputs, outputs),
        "Run");

  OrtTensorTypeAndShapeInfo *output_info;
  size_t output_elements;
  float *output_data;
  check(api->GetTensorTypeAndShape(outputs[0], &output_info), "GetTensorTypeAndShape");
  check(api->GetTensorShapeElementCount(output_info, &output_elements), "GetTensorShapeElementCount");
  api->ReleaseTensorTypeAndShapeInfo(output_info);
  check(api->GetTensorMutableData(outputs[0], (void **)&output_data), "GetTensorMutableData");
  FILE *out = fopen(argv[5], "wb");
  if (out == NULL || fwrite(output_data, sizeof(float), output_elements, out) != output_elements || fclose(out))
    fail("cannot write ", argv[5]);
  for (size_t i = 0; i < n_outputs; i++) {
    if (strcmp(output_names[i], "oppass_masked_words") == 0) {
      int64_t *masked;
      check(api->GetTensorMutableData(outputs[i], (void **)&masked), "GetTensorMutableData");
      printf("masked_words %lld\n", (long long)*masked);
    }
  }

  for (size_t i = 0; i < n_outputs; i++) {
    api->ReleaseValue(outputs[i]);
    check(api->AllocatorFree(allocator, output_names[i]), "AllocatorFree");
  }
  check(api->AllocatorFree(allocator, input_name), "AllocatorFree");
  api->ReleaseValue(input_value);
  api->ReleaseMemoryInfo(memory);
  api->ReleaseTypeInfo(type_info);
  api->ReleaseSession(session);
  api->ReleaseSessionOptions(options);
  api->ReleaseEnv(env);
  free(input);
  return 0;
}
