/* The fuzz targets' reference (reference.h): docs/FORMAT.md read bit by bit. */

#include "reference.h"

#include <math.h>
#include <string.h>

enum { FLOAT = 1, UINT8 = 2, INT8 = 3, UINT16 = 4, FLOAT16 = 10, UINT32 = 12, UINT64 = 13, BFLOAT16 = 16 };

static bool named(const char *name, size_t length, const char *expected) {
  return length == strlen(expected) && memcmp(name, expected, length) == 0;
}

ReferenceFormat reference_format(const char *name, size_t length) {
  ReferenceFormat format = {0, 0, false, false};
  if (named(name, length, "fp32")) {
    format = (ReferenceFormat){32, FLOAT, false, false};
  } else if (named(name, length, "bf16")) {
    format = (ReferenceFormat){16, BFLOAT16, true, true};
  } else if (named(name, length, "fp16")) {
    format = (ReferenceFormat){16, FLOAT16, true, false};
  } else if (named(name, length, "int8")) {
    format = (ReferenceFormat){8, INT8, false, false};
  } else if (named(name, length, "uint8")) {
    format = (ReferenceFormat){8, UINT8, false, false};
  }
  return format;
}

int reference_check_mode(const char *name, size_t length) {
  return named(name, length, "runtime") ? 0 : named(name, length, "load") ? 1 : named(name, length, "none") ? 2 : -1;
}

bool reference_word_bits_valid(ReferenceFormat format, int64_t word_bits) {
  if (format.bits == 0) {
    return false;
  }
  if (word_bits == (int64_t)format.bits) {
    return true;
  }
  for (int64_t w = 16; w <= 512; w *= 2) {
    if (word_bits == w && w >= (int64_t)format.bits) {
      return true;
    }
  }
  return false;
}

bool reference_output_type_valid(ReferenceFormat format, int64_t output_type) {
  return format.bits != 0 && (output_type == format.own_type || (format.floating_half && output_type == FLOAT));
}

bool reference_shape_valid(const int64_t *dims, size_t rank, uint64_t *n_weights) {
  unsigned __int128 product = 1;
  bool saturated = false;
  for (size_t i = 0; i < rank; i++) {
    if (dims[i] < 0) {
      return false;
    }
  }
  for (size_t i = 0; i < rank; i++) {
    if (dims[i] == 0) {
      *n_weights = 0;
      return true;
    }
  }
  for (size_t i = 0; i < rank && !saturated; i++) {
    product *= (unsigned __int128)dims[i]; /* both factors < 2^64 before saturation: no wrap */
    saturated = product >= ((unsigned __int128)1 << 64);
  }
  if (saturated || product >= ((unsigned __int128)1 << 58)) {
    return false;
  }
  *n_weights = (uint64_t)product;
  return true;
}

int64_t reference_packed_type(unsigned word_bits) {
  return word_bits == 8 ? UINT8 : word_bits == 16 ? UINT16 : word_bits == 32 ? UINT32 : UINT64;
}

void reference_escape(const char *bytes, size_t length, char *out) {
  size_t written = 0;
  for (size_t i = 0; i < length && i < 200; i++) {
    unsigned char byte = (unsigned char)bytes[i];
    if (byte == 0x5C) {
      out[written++] = 0x5C; /* a backslash is doubled */
      out[written++] = 0x5C;
    } else if (byte < 0x20 || byte > 0x7E) {
      static const char digits[] = "0123456789abcdef";
      out[written++] = 0x5C;
      out[written++] = 'x';
      out[written++] = digits[byte / 16];
      out[written++] = digits[byte % 16];
    } else {
      out[written++] = (char)byte;
    }
  }
  if (length > 200) {
    out[written++] = '.';
    out[written++] = '.';
    out[written++] = '.';
  }
  out[written] = 0;
}

/* Stream bit s is bit s % 8 of byte s / 8. */
static unsigned stream_bit(const uint8_t *stream, uint64_t s) {
  return (stream[s / 8] >> (s % 8)) & 1u;
}

static uint32_t fp16_to_fp32(uint32_t half) {
  uint32_t sign = (half >> 15) << 31;
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

size_t reference_decode(unsigned weight_bits, unsigned word_bits, bool is_bf16, bool widen, bool check,
                        size_t n_weights, const uint8_t *stream, uint8_t *out) {
  uint64_t n_words = ((uint64_t)n_weights * weight_bits + word_bits - 1) / word_bits;
  size_t masked = 0;
  size_t out_bytes = widen ? 4 : weight_bits / 8;
  for (uint64_t word = 0; word < n_words; word++) {
    unsigned ones = 0;
    for (uint64_t s = word * word_bits; s < (word + 1) * word_bits; s++) {
      ones += stream_bit(stream, s);
    }
    bool odd = check && ones % 2 == 1;
    masked += odd;
    for (uint64_t k = word * (word_bits / weight_bits); k < (word + 1) * (word_bits / weight_bits) && k < n_weights;
         k++) {
      uint32_t code = 0;
      for (unsigned bit = 0; bit < weight_bits; bit++) {
        code |= (uint32_t)stream_bit(stream, k * weight_bits + bit) << bit;
      }
      uint32_t value = odd ? 0 : !widen ? code : is_bf16 ? code << 16 : fp16_to_fp32(code);
      for (size_t byte = 0; byte < out_bytes; byte++) {
        out[k * out_bytes + byte] = (uint8_t)(value >> (8 * byte));
      }
    }
  }
  return masked;
}
