/* The fuzz targets' reference (reference.h): docs/FORMAT.md read bit by bit. */

#include "reference.h"

#include <math.h>
#include <string.h>

enum { FLOAT = 1, UINT8 = 2, INT8 = 3, UINT16 = 4, FLOAT16 = 10, UINT32 = 12, UINT64 = 13, BFLOAT16 = 16 };

static bool named(const char *name, size_t length, const char *expected) {
  return length == strlen(expected) && memcmp(name, expected, length) == 0;
}

ReferenceFormat reference_format(const char *name, size_t length) {
  ReferenceFormat format = {0, 0, false, false, false, 0};
  /* budget: half the stored mantissa bits (23, 7, 10), rounded down; 3 for integers */
  if (named(name, length, "fp32")) {
    format = (ReferenceFormat){32, FLOAT, false, false, true, 23 / 2};
  } else if (named(name, length, "bf16")) {
    format = (ReferenceFormat){16, BFLOAT16, true, true, true, 7 / 2};
  } else if (named(name, length, "fp16")) {
    format = (ReferenceFormat){16, FLOAT16, true, false, true, 10 / 2};
  } else if (named(name, length, "int8")) {
    format = (ReferenceFormat){8, INT8, false, false, false, 3};
  } else if (named(name, length, "uint8")) {
    format = (ReferenceFormat){8, UINT8, false, false, false, 3};
  }
  return format;
}

int reference_code(const char *name, size_t length) {
  return named(name, length, "parity") ? 0 : named(name, length, "secded") ? 1 : -1;
}

/* r with 2^(r-1) = W */
static unsigned check_bit_count(unsigned word_bits) {
  unsigned r = 1;
  while ((1u << (r - 1)) < word_bits) {
    r++;
  }
  return r;
}

bool reference_secded_fits(ReferenceFormat format, int64_t word_bits) {
  unsigned r = check_bit_count((unsigned)word_bits);
  unsigned k = (unsigned)word_bits / format.bits;
  unsigned most = 0; /* the most check bits one weight holds */
  for (unsigned weight = 0; weight < k; weight++) {
    unsigned held = 0;
    for (unsigned j = 0; j < r; j++) {
      held += j % k == weight;
    }
    most = held > most ? held : most;
  }
  return most <= format.budget;
}

bool reference_range_max_valid(float range_max) {
  return !isnan(range_max) && !isinf(range_max) && range_max >= 0;
}

/* The Hamming index of every bit position of a W-bit word; is_check marks the check bits. */
static void hamming_indices(unsigned weight_bits, unsigned word_bits, unsigned *index, bool *is_check) {
  unsigned r = check_bit_count(word_bits);
  unsigned k = word_bits / weight_bits;
  unsigned checks[16];
  for (unsigned j = 0; j < r; j++) {
    checks[j] = (j % k) * weight_bits + j / k;
  }
  for (unsigned a = 0; a < r; a++) { /* sort ascending */
    for (unsigned b = a + 1; b < r; b++) {
      if (checks[b] < checks[a]) {
        unsigned t = checks[a];
        checks[a] = checks[b];
        checks[b] = t;
      }
    }
  }
  memset(is_check, 0, word_bits * sizeof *is_check);
  for (unsigned i = 0; i < r; i++) {
    is_check[checks[i]] = true;
    index[checks[i]] = i == 0 ? 0 : 1u << (i - 1);
  }
  unsigned next = 1;
  for (unsigned position = 0; position < word_bits; position++) {
    if (is_check[position]) {
      continue;
    }
    do {
      next++;
    } while ((next & (next - 1)) == 0);
    index[position] = next;
  }
}

static unsigned get_bit(const uint8_t *bytes, uint64_t s) {
  return (bytes[s / 8] >> (s % 8)) & 1u;
}

static void set_bit(uint8_t *bytes, uint64_t s, unsigned value) {
  bytes[s / 8] = (uint8_t)((bytes[s / 8] & ~(1u << (s % 8))) | (value << (s % 8)));
}

void reference_secded_encode(unsigned weight_bits, unsigned word_bits, uint8_t *stream, size_t n_words) {
  unsigned index[512];
  bool is_check[512];
  hamming_indices(weight_bits, word_bits, index, is_check);
  for (size_t word = 0; word < n_words; word++) {
    uint64_t base = (uint64_t)word * word_bits;
    unsigned syndrome = 0;
    for (unsigned position = 0; position < word_bits; position++) {
      if (is_check[position]) {
        set_bit(stream, base + position, 0);
      } else if (get_bit(stream, base + position)) {
        syndrome ^= index[position];
      }
    }
    for (unsigned position = 0; position < word_bits; position++) {
      if (is_check[position] && index[position] != 0) {
        set_bit(stream, base + position, (syndrome & index[position]) != 0);
      }
    }
    unsigned ones = 0;
    for (unsigned position = 0; position < word_bits; position++) {
      ones += get_bit(stream, base + position);
    }
    for (unsigned position = 0; position < word_bits; position++) {
      if (is_check[position] && index[position] == 0) {
        set_bit(stream, base + position, ones % 2);
      }
    }
  }
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

/* The number a weight code stands for. */
static double weight_value(ReferenceFormat format, uint32_t code) {
  if (format.own_type == INT8) {
    return (double)(int8_t)(uint8_t)code;
  }
  if (format.own_type == UINT8) {
    return (double)code;
  }
  uint32_t bits = format.bits == 32 ? code : format.is_bf16 ? code << 16 : fp16_to_fp32(code);
  float value;
  memcpy(&value, &bits, sizeof value);
  return (double)value;
}

ReferenceCounts reference_decode(ReferenceFormat format, unsigned word_bits, bool widen, int code, bool check,
                                 bool range, float range_max, size_t n_weights, const uint8_t *stream, uint8_t *out) {
  unsigned weight_bits = format.bits;
  uint64_t n_words = ((uint64_t)n_weights * weight_bits + word_bits - 1) / word_bits;
  ReferenceCounts counts = {0, 0};
  size_t out_bytes = widen ? 4 : weight_bits / 8;
  unsigned index[512];
  bool is_check[512];
  if (code == 1) {
    hamming_indices(weight_bits, word_bits, index, is_check);
  }
  uint8_t word_copy[64];
  for (uint64_t word = 0; word < n_words; word++) {
    for (unsigned position = 0; position < word_bits; position++) {
      set_bit(word_copy, position, stream_bit(stream, word * word_bits + position));
    }
    unsigned ones = 0;
    unsigned syndrome = 0;
    for (unsigned position = 0; position < word_bits; position++) {
      ones += get_bit(word_copy, position);
      if (code == 1 && get_bit(word_copy, position)) {
        syndrome ^= index[position];
      }
    }
    bool zeroed = false;
    if (check && code == 0) {
      zeroed = ones % 2 == 1;
    } else if (check && code == 1 && ones % 2 == 1) {
      for (unsigned position = 0; position < word_bits; position++) {
        if (index[position] == syndrome) {
          set_bit(word_copy, position, !get_bit(word_copy, position));
        }
      }
      counts.corrected++;
    } else if (check && code == 1) {
      zeroed = syndrome != 0;
    }
    counts.masked += zeroed;
    for (unsigned slot = 0; slot < word_bits / weight_bits; slot++) {
      uint64_t k = word * (word_bits / weight_bits) + slot;
      if (k >= n_weights) {
        break;
      }
      uint32_t weight = 0;
      for (unsigned bit = 0; bit < weight_bits; bit++) {
        unsigned position = slot * weight_bits + bit;
        bool stolen = code == 1 && is_check[position];
        weight |= (uint32_t)(get_bit(word_copy, position) && !stolen) << bit;
      }
      if (zeroed || (check && range && !(fabs(weight_value(format, weight)) <= (double)range_max))) {
        weight = 0;
      }
      uint32_t value = !widen ? weight : format.is_bf16 ? weight << 16 : fp16_to_fp32(weight);
      for (size_t byte = 0; byte < out_bytes; byte++) {
        out[k * out_bytes + byte] = (uint8_t)(value >> (8 * byte));
      }
    }
  }
  return counts;
}
