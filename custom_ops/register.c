/*
 * RegisterCustomOps: the library's entry point, which onnxruntime calls when a SessionOptions
 * loads it. It adds the "ai.oppass" domain, holding ParityCheckUnpack, to those options.
 */

#include <pthread.h>
#include <stdio.h>

#include "onnxruntime_c_api.h"
#include "parity_check_unpack.h"

/* One domain shared by every SessionOptions that loads the library; released when it is unloaded. */
static pthread_mutex_t domain_lock = PTHREAD_MUTEX_INITIALIZER;
static OrtCustomOpDomain *shared_domain;
static const OrtApi *domain_api; /* the OrtApi that created shared_domain */

static OrtStatus *oppass_domain(const OrtApi *api, OrtCustomOpDomain **domain) {
  pthread_mutex_lock(&domain_lock);
  OrtStatus *status = NULL;
  if (shared_domain == NULL) {
    OrtCustomOpDomain *created = NULL;
    status = api->CreateCustomOpDomain(DOMAIN_NAME, &created);
    if (status == NULL) {
      status = api->CustomOpDomain_Add(created, parity_check_unpack_op(api));
      if (status == NULL) {
        shared_domain = created;
        domain_api = api;
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
    domain_api->ReleaseCustomOpDomain(shared_domain);
    shared_domain = NULL;
  }
}

/* Without OrtApi version REQUIRED_API_VERSION no status can be made from it: make one from API 1,
 * which every onnxruntime provides; if even that fails, print the message and let model loading fail. */
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
  OrtStatus *status = oppass_domain(api, &domain);
  if (status != NULL) {
    return status;
  }
  return api->AddCustomOpDomain(options, domain);
}
