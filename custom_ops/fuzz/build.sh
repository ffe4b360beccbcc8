#!/usr/bin/env bash
# Builds the two libFuzzer targets with AddressSanitizer and UndefinedBehaviorSanitizer into build/fuzz/:
# fuzz_parity_check_unpack (the kernel through a fake OrtApi) and fuzz_decoder (the decoder alone), and
# exhaustive_secded (every single and double flip of SEC-DED words, decoder against reference), built with
# the host compiler (HOST_CC, default cc: GCC, like the kernel library, so that its target copies, the
# AVX-512 syndrome scan included, are the ones checked) at -O2 without sanitizers, for speed.
# Needs clang with its runtimes (Debian: apt-get install clang libclang-rt-14-dev) and the ORT header
# that the CMake build caches (ORT_INCLUDE_DIR overrides). Prints the three executables' paths.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
include="${ORT_INCLUDE_DIR:-${OPPASS_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/oppass}/ort-headers-1.29}"
if [ ! -f "$include/onnxruntime_c_api.h" ]; then
  cmake -S "$root/custom_ops" -B "$root/build/fuzz-headers" > /dev/null
fi
mkdir -p "$root/build/fuzz"
flags=(-g -O1 -fno-omit-frame-pointer -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined)
"${CC:-clang}" "${flags[@]}" -I "$include" "$here/fuzz_parity_check_unpack.c" "$here/reference.c" \
  "$here/../parity_check_unpack.c" "$here/../load_decodes.c" "$here/../decoder.c" "$here/../secded_avx512.c" -lm -o "$root/build/fuzz/fuzz_parity_check_unpack"
"${CC:-clang}" "${flags[@]}" "$here/fuzz_decoder.c" "$here/reference.c" "$here/../decoder.c" "$here/../secded_avx512.c" -lm \
  -o "$root/build/fuzz/fuzz_decoder"
"${HOST_CC:-cc}" -O2 "$here/exhaustive_secded.c" "$here/reference.c" "$here/../decoder.c" "$here/../secded_avx512.c" -lm \
  -o "$root/build/fuzz/exhaustive_secded"
echo "$root/build/fuzz/exhaustive_secded"
echo "$root/build/fuzz/fuzz_parity_check_unpack"
echo "$root/build/fuzz/fuzz_decoder"
