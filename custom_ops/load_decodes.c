/*
 * The process's live load-time decodes (load_decodes.h): a list under one lock, each entry keyed by
 * the packed buffer's address and size, a 64-bit hash of its bytes (a buffer changed between two
 * kernel creations is decoded anew) and the whole decode plan, compared byte for byte: equal keys
 * decode to equal weights, since decode_words reads nothing else. A decode runs outside the lock;
 * when two creations race on one key, the later one drops its copy and takes the published one.
 */

#include "load_decodes.h"

#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

struct LoadDecode {
  struct LoadDecode *next;
  size_t references;
  const uint8_t *stream;
  size_t stream_bytes;
  uint64_t stream_hash;
  DecodePlan plan;
  uint8_t *weights;
  DecodeCounts counts;
};

static pthread_mutex_t live_lock = PTHREAD_MUTEX_INITIALIZER;
static LoadDecode *live; /* guarded by live_lock */

static uint64_t rotate_left(uint64_t value, unsigned bits) { return (value << bits) | (value >> (64 - bits)); }

/* Four independent multiply-rotate lanes over 8-byte words (to run at memory speed), then the tail
 * and the length, mixed so that any change of the bytes changes the result with near certainty. */
static uint64_t stream_hash(const uint8_t *bytes, size_t length) {
  static const uint64_t PRIME_A = 0x9E3779B185EBCA87ULL;
  static const uint64_t PRIME_B = 0xC2B2AE3D27D4EB4FULL;
  uint64_t lanes[4] = {PRIME_A, PRIME_B, ~PRIME_A, ~PRIME_B};
  size_t i = 0;
  for (; i + 32 <= length; i += 32) {
    for (size_t lane = 0; lane < 4; lane++) {
      uint64_t word;
      memcpy(&word, bytes + i + 8 * lane, sizeof word);
      lanes[lane] = rotate_left(lanes[lane] + word * PRIME_B, 31) * PRIME_A;
    }
  }
  uint64_t hash = (uint64_t)length * PRIME_A;
  for (size_t lane = 0; lane < 4; lane++) {
    hash = rotate_left(hash ^ (rotate_left(lanes[lane] * PRIME_B, 31) * PRIME_A), 27) * PRIME_A + PRIME_B;
  }
  for (; i < length; i++) {
    hash = rotate_left(hash ^ (bytes[i] * PRIME_A), 11) * PRIME_B;
  }
  hash ^= hash >> 33;
  hash *= PRIME_B;
  hash ^= hash >> 29;
  return hash;
}

static bool same_key(const LoadDecode *entry, const LoadDecode *key) {
  return entry->stream == key->stream && entry->stream_bytes == key->stream_bytes &&
         entry->stream_hash == key->stream_hash && memcmp(&entry->plan, &key->plan, sizeof key->plan) == 0;
}

/* The live entry with `key`'s key, one more reference taken; NULL if none. Called under live_lock. */
static LoadDecode *take_live(const LoadDecode *key) {
  for (LoadDecode *entry = live; entry != NULL; entry = entry->next) {
    if (same_key(entry, key)) {
      entry->references++;
      return entry;
    }
  }
  return NULL;
}

static void free_decode(LoadDecode *decode) {
  free(decode->weights);
  free(decode);
}

LoadDecode *load_decode_acquire(const DecodePlan *plan, const uint8_t *stream) {
  LoadDecode *decode = calloc(1, sizeof *decode);
  if (decode == NULL) {
    return NULL;
  }
  decode->references = 1;
  decode->stream = stream;
  decode->stream_bytes = plan->n_words * plan->word_bytes;
  decode->stream_hash = stream_hash(stream, decode->stream_bytes);
  decode->plan = *plan;
  pthread_mutex_lock(&live_lock);
  LoadDecode *shared = take_live(decode);
  pthread_mutex_unlock(&live_lock);
  if (shared != NULL) {
    free(decode);
    return shared;
  }
  size_t bytes = plan->n_weights * plan->output_bytes;
  decode->weights = malloc(bytes != 0 ? bytes : 1);
  if (decode->weights == NULL) {
    free(decode);
    return NULL;
  }
  if (plan->n_words != 0) {
    decode->counts = decode_words(plan, stream, decode->weights, 0, plan->n_words);
  }
  pthread_mutex_lock(&live_lock);
  shared = take_live(decode);
  if (shared == NULL) {
    decode->next = live;
    live = decode;
  }
  pthread_mutex_unlock(&live_lock);
  if (shared != NULL) {
    free_decode(decode);
    return shared;
  }
  return decode;
}

LoadedWeights load_decode_weights(const LoadDecode *decode) {
  return (LoadedWeights){decode->weights, (int64_t)decode->counts.masked, (int64_t)decode->counts.corrected};
}

void load_decode_release(LoadDecode *decode) {
  if (decode == NULL) {
    return;
  }
  pthread_mutex_lock(&live_lock);
  bool last = --decode->references == 0;
  if (last) {
    LoadDecode **link = &live;
    while (*link != decode) {
      link = &(*link)->next;
    }
    *link = decode->next;
  }
  pthread_mutex_unlock(&live_lock);
  if (last) {
    free_decode(decode);
  }
}
