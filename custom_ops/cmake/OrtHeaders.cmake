# Locates the official onnxruntime C API header (ORT 1.29, API version 29).
#
# Order: -DORT_INCLUDE_DIR / $ENV{ORT_INCLUDE_DIR}; else a per-user cache; else
# `npm pack` of com.github.asus4.onnxruntime@0.4.9 (which carries the official
# headers) into that cache. The header is never part of the source tree.
# Sets ORT_INCLUDE_DIR to a folder that holds onnxruntime_c_api.h.

set(ORT_HEADERS_NPM_PACKAGE "com.github.asus4.onnxruntime@0.4.9")
set(ORT_HEADERS_IN_TARBALL
    "package/Plugins/iOS~/onnxruntime.xcframework/ios-arm64_x86_64-simulator/onnxruntime.framework/Headers")
set(ORT_HEADERS_NEEDED onnxruntime_c_api.h onnxruntime_error_code.h onnxruntime_ep_c_api.h)
set(ORT_C_API_SHA256 "acc0cf4b3f28d39339c76770d76164bb7a0637dc89f5fde764b4017b632f6743")

if(NOT ORT_INCLUDE_DIR AND DEFINED ENV{ORT_INCLUDE_DIR})
  set(ORT_INCLUDE_DIR "$ENV{ORT_INCLUDE_DIR}")
endif()

if(ORT_INCLUDE_DIR)
  if(NOT EXISTS "${ORT_INCLUDE_DIR}/onnxruntime_c_api.h")
    message(FATAL_ERROR "ORT_INCLUDE_DIR=${ORT_INCLUDE_DIR} has no onnxruntime_c_api.h")
  endif()
  message(STATUS "onnxruntime headers: ${ORT_INCLUDE_DIR} (ORT_INCLUDE_DIR)")
  return()
endif()

if(DEFINED ENV{OPPASS_CACHE_DIR})
  set(_cache_root "$ENV{OPPASS_CACHE_DIR}")
elseif(DEFINED ENV{XDG_CACHE_HOME})
  set(_cache_root "$ENV{XDG_CACHE_HOME}/oppass")
else()
  set(_cache_root "$ENV{HOME}/.cache/oppass")
endif()
set(_cached "${_cache_root}/ort-headers-1.29")

function(_ort_header_is_official dir out)
  set(${out} FALSE PARENT_SCOPE)
  if(EXISTS "${dir}/onnxruntime_c_api.h")
    file(SHA256 "${dir}/onnxruntime_c_api.h" _sum)
    if(_sum STREQUAL ORT_C_API_SHA256)
      set(${out} TRUE PARENT_SCOPE)
    endif()
  endif()
endfunction()

_ort_header_is_official("${_cached}" _have)
if(NOT _have)
  find_program(NPM_EXECUTABLE npm)
  if(NOT NPM_EXECUTABLE)
    message(FATAL_ERROR
      "The onnxruntime C header is needed: install npm (it fetches ${ORT_HEADERS_NPM_PACKAGE}) "
      "or set ORT_INCLUDE_DIR to a folder holding onnxruntime_c_api.h of ORT >= 1.16")
  endif()
  set(_work "${CMAKE_BINARY_DIR}/ort-headers-download")
  file(REMOVE_RECURSE "${_work}")
  file(MAKE_DIRECTORY "${_work}")
  message(STATUS "Fetching onnxruntime headers: npm pack ${ORT_HEADERS_NPM_PACKAGE}")
  execute_process(
    COMMAND "${NPM_EXECUTABLE}" pack "${ORT_HEADERS_NPM_PACKAGE}" --silent
    WORKING_DIRECTORY "${_work}" RESULT_VARIABLE _rc OUTPUT_VARIABLE _tgz ERROR_VARIABLE _err
    OUTPUT_STRIP_TRAILING_WHITESPACE)
  if(NOT _rc EQUAL 0)
    message(FATAL_ERROR "npm pack ${ORT_HEADERS_NPM_PACKAGE} failed (${_rc}): ${_err}")
  endif()
  set(_members "")
  foreach(_h IN LISTS ORT_HEADERS_NEEDED)
    list(APPEND _members "${ORT_HEADERS_IN_TARBALL}/${_h}")
  endforeach()
  execute_process(
    COMMAND "${CMAKE_COMMAND}" -E tar xzf "${_work}/${_tgz}" -- ${_members}
    WORKING_DIRECTORY "${_work}" RESULT_VARIABLE _rc)
  if(NOT _rc EQUAL 0)
    message(FATAL_ERROR "could not extract the onnxruntime headers from ${_tgz}")
  endif()
  _ort_header_is_official("${_work}/${ORT_HEADERS_IN_TARBALL}" _ok)
  if(NOT _ok)
    message(FATAL_ERROR "onnxruntime_c_api.h from ${ORT_HEADERS_NPM_PACKAGE} does not match its pinned SHA-256")
  endif()
  file(MAKE_DIRECTORY "${_cached}.tmp")
  foreach(_h IN LISTS ORT_HEADERS_NEEDED)
    file(COPY "${_work}/${ORT_HEADERS_IN_TARBALL}/${_h}" DESTINATION "${_cached}.tmp")
  endforeach()
  file(REMOVE_RECURSE "${_cached}")
  file(RENAME "${_cached}.tmp" "${_cached}")
  file(REMOVE_RECURSE "${_work}")
endif()
set(ORT_INCLUDE_DIR "${_cached}")
message(STATUS "onnxruntime headers: ${ORT_INCLUDE_DIR} (cached)")
