/*
 * The ParityCheckUnpack custom operator (parity_check_unpack.c), as register.c adds it to the
 * "ai.oppass" domain.
 */

#ifndef OPPASS_PARITY_CHECK_UNPACK_H
#define OPPASS_PARITY_CHECK_UNPACK_H

#include "onnxruntime_c_api.h"

/* Oldest OrtApi with everything used here: KernelContext_ParallelFor, InferOutputShapeFn,
 * ShapeInferContext_*, ReadOpAttr and OrtCustomOp's GetStartVersion/GetEndVersion appeared in API 17
 * (onnxruntime 1.17); CreateKernelV2 and KernelComputeV2 in 16, KernelInfo_GetNodeName and
 * KernelInfoGetConstantInput_tensor in 15, KernelInfo_GetInputCount/GetOutputCount/GetInputName/
 * GetOutputName/GetOutputTypeInfo in 14. */
#define REQUIRED_API_VERSION 17
#define REQUIRED_ORT_RELEASE "1.17"

#define DOMAIN_NAME "ai.oppass"

/* The operator; `api` (at REQUIRED_API_VERSION) serves its shape inference, which gets none. The
 * first call's `api` is kept; callers serialise the calls. */
OrtCustomOp *parity_check_unpack_op(const OrtApi *api);

#endif
