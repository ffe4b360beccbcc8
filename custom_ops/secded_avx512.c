/*
 * One-pass SEC-DED decode with AVX-512 (secded_avx512.h).
 *
 * The syndrome is linear: sigma(word) = XOR over the word's bytes of sigma_q(byte q), where bit i
 * of sigma_q(b) is the parity of b AND byte q of syndrome mask i (decoder.h, SecdedCode). That is
 * an 8x8 bit matrix per byte position q times the byte, which GF2P8AFFINEQB computes for 64 bytes
 * at once, with one matrix per qword. So a group of 8 words is first transposed with VPERMB /
 * VPERMT2B until each qword holds one byte position of the 8 words (byte w: word w); one affine
 * per vector (two for r > 8) then gives each byte's share of the syndrome, the vectors of the group
 * are XORed, and the 8 qwords folded: byte w is word w's syndrome (bits 0..7; bits 8..9 from the
 * second affine). A block is clean when all of them are 0. The weights are written from the same
 * loads: check bits cleared (AND), bf16 widened (a zero-masked VPERMW), range check (a compare and a
 * zero-masked move).
 */

#include "secded_avx512.h"

#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define HAS_AVX512_DECODE 1
#define AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi,gfni")))
#else
#define HAS_AVX512_DECODE 0
#endif

#define GROUP_WORDS 8

bool secded_avx512_usable(void) {
  const char *setting = getenv("OPPASS_DECODER_AVX512");
  if (setting != NULL && strcmp(setting, "0") == 0) {
    return false;
  }
#if HAS_AVX512_DECODE
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("gfni");
#else
  return false;
#endif
}

/* ---------------------------------------------------------------- plan */

/* A byte of a vector during the transpose: word << 6 | byte position in the word. */
typedef uint16_t ByteLabel;

/* Index (0..127) of `label` among a's 64 bytes then b's. */
static uint8_t index_of(const ByteLabel *a, const ByteLabel *b, ByteLabel label) {
  for (unsigned s = 0; s < 64; s++) {
    if (a[s] == label) {
      return (uint8_t)s;
    }
    if (b != NULL && b[s] == label) {
      return (uint8_t)(64 + s);
    }
  }
  abort(); /* unreachable: every wanted byte is in one of the two vectors */
}

/* The transpose, simulated on labels. V = 1: one VPERMB to position-major order (slot = 8 * position
 * + word). V >= 2: each stage pairs vectors 2i and 2i + 1 (the same positions, disjoint words) into
 * the low and the high half of their positions over the words of both (position-major), stored as
 * vectors i and V/2 + i, so that the next stage pairs vectors again; the index vectors are the same
 * for every pair of a stage. */
static void build_transpose(SecdedVectorPlan *vp, ByteLabel labels[8][64], unsigned vectors) {
  if (vectors == 1) {
    ByteLabel wanted[64];
    for (unsigned s = 0; s < 64; s++) {
      wanted[s] = (ByteLabel)((s % GROUP_WORDS) << 6 | s / GROUP_WORDS);
      vp->transpose[0][0][s] = index_of(labels[0], NULL, wanted[s]);
    }
    memcpy(labels[0], wanted, sizeof wanted);
    return;
  }
  for (unsigned stage = 0; (1u << stage) < vectors; stage++) {
    ByteLabel next[8][64];
    for (unsigned pair = 0; pair < vectors / 2; pair++) {
      const ByteLabel *a = labels[2 * pair];
      const ByteLabel *b = labels[2 * pair + 1];
      unsigned words[GROUP_WORDS];
      unsigned word_count = 0;
      uint64_t positions_seen = 0;
      unsigned words_seen = 0;
      for (unsigned s = 0; s < 64; s++) {
        words_seen |= 1u << (a[s] >> 6) | 1u << (b[s] >> 6);
        positions_seen |= UINT64_C(1) << (a[s] & 63);
      }
      for (unsigned w = 0; w < GROUP_WORDS; w++) {
        if (words_seen >> w & 1) {
          words[word_count++] = w;
        }
      }
      unsigned positions[64];
      unsigned position_count = 0;
      for (unsigned q = 0; q < 64; q++) {
        if (positions_seen >> q & 1) {
          positions[position_count++] = q;
        }
      }
      for (unsigned half = 0; half < 2; half++) {
        ByteLabel *into = next[half * (vectors / 2) + pair];
        for (unsigned s = 0; s < 64; s++) {
          unsigned position = positions[half * position_count / 2 + s / word_count];
          into[s] = (ByteLabel)(words[s % word_count] << 6 | position);
          vp->transpose[stage][half][s] = index_of(a, b, into[s]);
        }
      }
    }
    memcpy(labels, next, sizeof next);
    vp->stages = stage + 1;
  }
}

SecdedVectorPlan secded_avx512_plan(const SecdedCode *code, unsigned word_bits, SecdedVectorOutput output,
                                    size_t output_bytes) {
  SecdedVectorPlan vp;
  memset(&vp, 0, sizeof vp);
  vp.on = true;
  vp.output = output;
  vp.stream = output_bytes >= SECDED_STREAM_BYTES;
  unsigned vectors = word_bits / 64;
  unsigned word_bytes = word_bits / 8;
  ByteLabel labels[8][64];
  for (unsigned v = 0; v < vectors; v++) {
    for (unsigned s = 0; s < 64; s++) {
      unsigned byte = 64 * v + s;
      labels[v][s] = (ByteLabel)((byte / word_bytes) << 6 | byte % word_bytes);
    }
  }
  build_transpose(&vp, labels, vectors);
  /* Row i of a GF2P8AFFINEQB matrix (its output bit i) is byte 7 - i of the qword. */
  for (unsigned f = 0; f < vectors; f++) {
    for (unsigned j = 0; j < 8; j++) {
      unsigned position = labels[f][8 * j] & 63;
      for (unsigned bit = 0; bit < code->check_bits; bit++) {
        uint64_t row = code->syndrome_masks[bit][position / 8] >> (8 * (position % 8)) & 0xFF;
        vp.matrices[f][bit / 8][j] |= row << (8 * (7 - bit % 8));
      }
    }
  }
  for (unsigned lane = 0; lane < 8; lane++) {
    vp.kept[lane] = code->kept_bits[lane % vectors];
  }
  return vp;
}

/* ---------------------------------------------------------------- decode */

#if HAS_AVX512_DECODE

#define ALWAYS_INLINE inline __attribute__((always_inline))

/* Stores v at out: a non-temporal store (out 64-byte aligned) when `stream`. */
AVX512_TARGET static ALWAYS_INLINE void store(uint8_t *out, __m512i v, bool stream) {
  if (stream) {
    _mm512_stream_si512((void *)out, v);
  } else {
    _mm512_storeu_si512(out, v);
  }
}

/* Writes the output elements of the 64 packed bytes x (check bits cleared by `kept`) at out. */
AVX512_TARGET static ALWAYS_INLINE void write_vector(__m512i x, uint8_t *out, SecdedVectorOutput output, __m512i kept,
                                                     bool range, __m512i limit, bool stream) {
  __m512i y = _mm512_and_si512(x, kept);
  switch (output) {
    case SECDED_OUT_32:
      if (range) { /* magnitude <= limit, or 0 */
        __m512i magnitude = _mm512_and_si512(y, _mm512_set1_epi32(0x7FFFFFFF));
        y = _mm512_maskz_mov_epi32(_mm512_cmple_epu32_mask(magnitude, limit), y);
      }
      break;
    case SECDED_OUT_16:
      if (range) {
        __m512i magnitude = _mm512_and_si512(y, _mm512_set1_epi16(0x7FFF));
        y = _mm512_maskz_mov_epi16(_mm512_cmple_epu16_mask(magnitude, limit), y);
      }
      break;
    case SECDED_OUT_INT8:
      if (range) { /* |-128| is 0x80: 128 as unsigned */
        y = _mm512_maskz_mov_epi8(_mm512_cmple_epu8_mask(_mm512_abs_epi8(y), limit), y);
      }
      break;
    case SECDED_OUT_UINT8:
      if (range) {
        y = _mm512_maskz_mov_epi8(_mm512_cmple_epu8_mask(y, limit), y);
      }
      break;
    case SECDED_OUT_BF16_TO_32: {
      /* bf16 k of y goes to the high half of binary32 k: 16-bit element 2k + 1, the low half zeroed */
      const __m512i low_index = _mm512_set_epi16(15, 0, 14, 0, 13, 0, 12, 0, 11, 0, 10, 0, 9, 0, 8, 0, 7, 0, 6, 0,
                                                 5, 0, 4, 0, 3, 0, 2, 0, 1, 0, 0, 0);
      const __m512i high_index = _mm512_add_epi16(low_index, _mm512_set1_epi16(16));
      const __mmask32 odd = 0xAAAAAAAAu;
      __m512i singles[2] = {_mm512_maskz_permutexvar_epi16(odd, low_index, y),
                            _mm512_maskz_permutexvar_epi16(odd, high_index, y)};
      for (unsigned i = 0; i < 2; i++) {
        if (range) {
          __m512i magnitude = _mm512_and_si512(singles[i], _mm512_set1_epi32(0x7FFFFFFF));
          singles[i] = _mm512_maskz_mov_epi32(_mm512_cmple_epu32_mask(magnitude, limit), singles[i]);
        }
        store(out + 64 * i, singles[i], stream);
      }
      return;
    }
  }
  store(out, y, stream);
}

/* Writes the weights of the SECDED_BLOCK_BYTES of words at `in` to `out` and returns true when
 * every word's syndrome is 0. Inlined with constant `vectors` (V) and `output`. */
AVX512_TARGET static ALWAYS_INLINE bool decode_block(const SecdedVectorPlan *vp, const uint8_t *in, uint8_t *out,
                                                     unsigned vectors, SecdedVectorOutput output, bool range,
                                                     __m512i limit, bool stream) {
  const __m512i kept = _mm512_loadu_si512(vp->kept);
  unsigned widening = output == SECDED_OUT_BF16_TO_32 ? 2 : 1;
  __m512i dirty = _mm512_setzero_si512();
  for (unsigned group = 0; group < SECDED_BLOCK_BYTES / 64 / vectors; group++) {
    __m512i x[8];
    for (unsigned v = 0; v < vectors; v++) {
      size_t offset = 64 * ((size_t)group * vectors + v);
      x[v] = _mm512_loadu_si512(in + offset);
      write_vector(x[v], out + widening * offset, output, kept, range, limit, stream);
    }
    /* transpose (build_transpose): qword j of vector f = byte position 8 f + j of the 8 words */
    if (vectors == 1) {
      x[0] = _mm512_permutexvar_epi8(_mm512_loadu_si512(vp->transpose[0][0]), x[0]);
    }
    for (unsigned stage = 0; vectors > 1 && (1u << stage) < vectors; stage++) {
      const __m512i low_index = _mm512_loadu_si512(vp->transpose[stage][0]);
      const __m512i high_index = _mm512_loadu_si512(vp->transpose[stage][1]);
      __m512i next[8];
      for (unsigned pair = 0; pair < vectors / 2; pair++) {
        next[pair] = _mm512_permutex2var_epi8(x[2 * pair], low_index, x[2 * pair + 1]);
        next[vectors / 2 + pair] = _mm512_permutex2var_epi8(x[2 * pair], high_index, x[2 * pair + 1]);
      }
      for (unsigned v = 0; v < vectors; v++) {
        x[v] = next[v];
      }
    }
    /* each byte's share of the syndrome, XORed over the group's vectors: bits 0..7 (and 8..9) */
    __m512i low = _mm512_setzero_si512();
    __m512i high = _mm512_setzero_si512();
    for (unsigned f = 0; f < vectors; f++) {
      low = _mm512_xor_si512(low, _mm512_gf2p8affine_epi64_epi8(x[f], _mm512_loadu_si512(vp->matrices[f][0]), 0));
      if (vectors >= 4) { /* r = 9, 10 */
        high =
            _mm512_xor_si512(high, _mm512_gf2p8affine_epi64_epi8(x[f], _mm512_loadu_si512(vp->matrices[f][1]), 0));
      }
    }
    /* fold the 8 qwords: first their halves (of low, and of high beside it when it is used) */
    __m512i folded = vectors >= 4 ? _mm512_xor_si512(_mm512_shuffle_i64x2(low, high, 0x44),
                                                     _mm512_shuffle_i64x2(low, high, 0xEE))
                                  : _mm512_xor_si512(low, _mm512_shuffle_i64x2(low, low, 0x4E));
    folded = _mm512_xor_si512(folded, _mm512_shuffle_i64x2(folded, folded, 0xB1));
    folded = _mm512_xor_si512(folded, _mm512_shuffle_epi32(folded, 0x4E));
    dirty = _mm512_or_si512(dirty, folded);
  }
  return _mm512_test_epi64_mask(dirty, dirty) == 0;
}

AVX512_TARGET static ALWAYS_INLINE DecodeCounts decode_with(const DecodePlan *plan, const uint8_t *stream,
                                                            uint8_t *out, size_t first_word, size_t end_word,
                                                            WordRangeDecoder fallback, unsigned vectors,
                                                            SecdedVectorOutput output) {
  const SecdedVectorPlan *vp = &plan->secded_vector;
  size_t word_bytes = plan->word_bytes;
  size_t words_per_block = SECDED_BLOCK_BYTES / word_bytes;
  size_t word_out_bytes = plan->weights_per_word * plan->output_bytes;
  size_t whole_words = plan->n_weights / plan->weights_per_word; /* the last word may have padding */
  size_t vector_end = end_word < whole_words ? end_word : whole_words;
  bool range = plan->range_check;
  __m512i limit = output == SECDED_OUT_16                                ? _mm512_set1_epi16((short)plan->range_limit)
                  : output == SECDED_OUT_INT8 || output == SECDED_OUT_UINT8 ? _mm512_set1_epi8((char)plan->range_limit)
                                                                          : _mm512_set1_epi32((int)plan->range_limit);
  /* large outputs bypass the caches (no read for ownership), where the blocks' stores are aligned */
  bool streaming = vp->stream && ((uintptr_t)(out + first_word * word_out_bytes) & 63) == 0;
  DecodeCounts counts = {0, 0};
  size_t word = first_word;
  for (; word < vector_end && vector_end - word >= words_per_block; word += words_per_block) {
    if (!decode_block(vp, stream + word * word_bytes, out + word * word_out_bytes, vectors, output, range, limit,
                      streaming)) {
      DecodeCounts block = fallback(plan, stream, out, word, word + words_per_block);
      counts.masked += block.masked;
      counts.corrected += block.corrected;
    }
  }
  if (streaming) {
    _mm_sfence(); /* the non-temporal stores are seen before whatever follows */
  }
  if (word < end_word) {
    DecodeCounts rest = fallback(plan, stream, out, word, end_word);
    counts.masked += rest.masked;
    counts.corrected += rest.corrected;
  }
  return counts;
}

/* One copy per output kind, with constant V. */
#define DECODE_BY_OUTPUT(vectors)                                                                        \
  switch (plan->secded_vector.output) {                                                                  \
    case SECDED_OUT_32:                                                                                  \
      return decode_with(plan, stream, out, first_word, end_word, fallback, vectors, SECDED_OUT_32);     \
    case SECDED_OUT_16:                                                                                  \
      return decode_with(plan, stream, out, first_word, end_word, fallback, vectors, SECDED_OUT_16);     \
    case SECDED_OUT_INT8:                                                                                \
      return decode_with(plan, stream, out, first_word, end_word, fallback, vectors, SECDED_OUT_INT8);   \
    case SECDED_OUT_UINT8:                                                                               \
      return decode_with(plan, stream, out, first_word, end_word, fallback, vectors, SECDED_OUT_UINT8);  \
    default:                                                                                             \
      return decode_with(plan, stream, out, first_word, end_word, fallback, vectors, SECDED_OUT_BF16_TO_32); \
  }

AVX512_TARGET DecodeCounts secded_avx512_decode(const DecodePlan *plan, const uint8_t *stream, uint8_t *out,
                                                size_t first_word, size_t end_word, WordRangeDecoder fallback) {
  switch (plan->word_bytes) {
    case 8:
      DECODE_BY_OUTPUT(1)
    case 16:
      DECODE_BY_OUTPUT(2)
    case 32:
      DECODE_BY_OUTPUT(4)
    default: /* 64 */
      DECODE_BY_OUTPUT(8)
  }
}

#else

DecodeCounts secded_avx512_decode(const DecodePlan *plan, const uint8_t *stream, uint8_t *out, size_t first_word,
                                  size_t end_word, WordRangeDecoder fallback) {
  return fallback(plan, stream, out, first_word, end_word); /* never planned: secded_avx512_usable() is false */
}

#endif
