// Shared definitions of the loco compression kernels (CPU and CUDA).
//
// The bit-level contract (codec ids, payload layout, rounding, hash) is written down in
// docs/wire-format.md and mirrored by the pure-torch reference in loco/compress/reference.py.
// Every change here must be made there too; tests compare the two bitwise.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define LOCO_HD __host__ __device__ __forceinline__
#else
#define LOCO_HD inline
#endif

namespace loco {

// Codec ids as written in the wire header.
enum CodecId : int64_t {
  kNone = 0, kBf16 = 1, kInt8 = 2, kInt4 = 3, kFp4 = 4, kTopk = 5, kSparse = 6, kSign = 7,
  kTernary = 8
};

// sparse: the k argument (and header field) carries k | bits << kSparseBitsShift.
constexpr int kSparseBitsShift = 24;
constexpr int64_t kSparseKMask = (int64_t{1} << kSparseBitsShift) - 1;

// Status codes returned by the ops (0 = ok). Python maps them to ValueError / PayloadError.
enum Status : int64_t {
  kOk = 0,
  kNonFinite = 1,   // encode: input (x + residual) has NaN or Inf
  kOverflow = 2,    // encode: a value or scale does not fit the target format
  kBadScale = 3,    // decode: a scale is negative, NaN or Inf
  kBadIndex = 4,    // decode: top-k / sparse indices not strictly increasing or out of the block
  kBadPadding = 5,  // decode: the unused low nibble of the last 4-bit byte (sparse: a padding
                    // bit of an index or code region; sign / ternary: a bit / trit past the
                    // last value) is not zero
  kBadValue = 6,    // decode: a none/bf16 value is NaN or Inf
  kBadTrit = 7,     // decode: a ternary byte is above 242 (five trits of at most 2)
};

// Seeded counter-based uniform in [0, 1) with 24 random bits: u = hash(seed, i) / 2^24.
LOCO_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x21f0aaadu;
  x ^= x >> 15;
  x *= 0x735a2d97u;
  x ^= x >> 15;
  return x;
}

LOCO_HD uint32_t hash_index(uint32_t seed, int64_t i) {
  const uint32_t lo = static_cast<uint32_t>(static_cast<uint64_t>(i));
  const uint32_t hi = static_cast<uint32_t>(static_cast<uint64_t>(i) >> 32);
  return mix32(lo ^ mix32(seed + hi * 0x61C88647u));
}

LOCO_HD float uniform24(uint32_t seed, int64_t i) {
  return static_cast<float>(hash_index(seed, i) >> 8) * (1.0f / 16777216.0f);
}

// Round to nearest, ties to even, for |y| < 2^22 (callers clamp first). Exact, and it vectorizes
// with plain SSE2, unlike nearbyintf.
LOCO_HD float rne_small(float y) {
  const float magic = 12582912.0f;  // 1.5 * 2^23
  return (y + magic) - magic;
}

LOCO_HD float floor_small(float y) {
  const float r = rne_small(y);
  return r > y ? r - 1.0f : r;
}

LOCO_HD float clampf(float y, float lo, float hi) { return y < lo ? lo : (y > hi ? hi : y); }

// E2M1 magnitudes indexed by the 3 low bits of an fp4 code; bit 3 is the sign.
LOCO_HD float fp4_mag(int m) {
  return m <= 4 ? 0.5f * static_cast<float>(m) : (m == 5 ? 3.0f : (m == 6 ? 4.0f : 6.0f));
}

// Nearest E2M1 magnitude index for a >= 0, ties to the even index.
LOCO_HD int fp4_nearest(float a) {
  return (a > 0.25f) + (a >= 0.75f) + (a > 1.25f) + (a >= 1.75f) + (a > 2.5f) + (a >= 3.5f) +
         (a > 5.0f);
}

// Stochastic E2M1: lower grid point, then up with probability (a - lo) / step.
LOCO_HD int fp4_stochastic(float a, float u) {
  const int j = (a >= 0.5f) + (a >= 1.0f) + (a >= 1.5f) + (a >= 2.0f) + (a >= 3.0f) +
                (a >= 4.0f) + (a >= 6.0f);
  const float lo = fp4_mag(j);
  const float step = j < 4 ? 0.5f : (j < 6 ? 1.0f : (j == 6 ? 2.0f : 0.0f));
  const int m = j + (u * step < a - lo ? 1 : 0);
  return m > 7 ? 7 : m;
}

// Byte layout of a payload (docs/wire-format.md): scales first, then codes (top-k: indices,
// then values; sparse: one record per chunk, see SparseRec). Mirrored by
// reference.payload_nbytes.
struct Layout {
  int64_t n = 0, block = 1, k = 0, nb = 0, ss = 4, isz = 1, ktot = 0;
  int64_t codes_off = 0, vals_off = 0, total = 0;
  int64_t bits = 0, ib = 0, rec = 0;  // sparse: value bits, index bits, full-chunk record bytes
};

// A sparse chunk's record: lo and hi scales (ss bytes each), kb indices of ib bits, kb codes of
// `bits` bits, each region LSB-first and padded to a byte. Records follow in chunk order; only
// the last chunk's may be shorter (kb = min(k, its length)).
struct SparseRec {
  int64_t len = 0, kb = 0, ibytes = 0, cbytes = 0, size = 0;
};

LOCO_HD SparseRec sparse_rec(int64_t len, int64_t k, int64_t ib, int64_t bits, int64_t ss) {
  SparseRec R;
  R.len = len;
  R.kb = k < len ? k : len;
  R.ibytes = (R.kb * ib + 7) / 8;
  R.cbytes = (R.kb * bits + 7) / 8;
  R.size = 2 * ss + R.ibytes + R.cbytes;
  return R;
}

// ceil(log2(block)), at least 1: bits of a chunk-relative index.
LOCO_HD int64_t sparse_index_bits(int64_t block) {
  int64_t b = 1;
  while ((int64_t{1} << b) < block) ++b;
  return b;
}

inline Layout make_layout(int64_t n, int64_t codec, int64_t block, int64_t k, bool fp16) {
  Layout L;
  L.n = n;
  L.block = block;
  L.k = k;
  L.ss = fp16 ? 2 : 4;
  L.nb = block > 0 ? (n + block - 1) / block : 0;
  L.codes_off = L.nb * L.ss;
  switch (codec) {
    case kNone:
      L.codes_off = 0;
      L.total = 4 * n;
      break;
    case kBf16:
      L.codes_off = 0;
      L.total = 2 * n;
      break;
    case kInt8:
      L.total = L.codes_off + n;
      break;
    case kInt4:
    case kFp4:
      L.total = L.codes_off + (n + 1) / 2;
      break;
    case kTopk: {
      L.isz = block <= 256 ? 1 : 2;
      const int64_t tail = n - (L.nb - 1) * block;
      L.ktot = L.nb == 0 ? 0 : (L.nb - 1) * k + (k < tail ? k : tail);
      L.vals_off = L.codes_off + L.ktot * L.isz;
      L.total = L.vals_off + L.ktot;
      break;
    }
    case kSparse: {
      L.k = k & kSparseKMask;
      L.bits = k >> kSparseBitsShift;
      L.ib = sparse_index_bits(block);
      L.codes_off = 0;
      L.rec = sparse_rec(block, L.k, L.ib, L.bits, L.ss).size;
      L.total = L.nb == 0 ? 0
                          : (L.nb - 1) * L.rec +
                                sparse_rec(n - (L.nb - 1) * block, L.k, L.ib, L.bits, L.ss).size;
      break;
    }
    case kSign:  // scales, then one bit per value (LSB first)
      L.total = L.codes_off + (n + 7) / 8;
      break;
    case kTernary:  // scales, then five trits per byte (base 3, the first value lowest)
      L.total = L.codes_off + (n + 4) / 5;
      break;
    default:
      L.total = -1;  // unknown codec: callers check the codec id first
  }
  return L;
}

// sparse: decoded magnitude of index m, lo + m * w with w = (hi - lo) / (L - 0.5); with one level
// (1 bit) the midpoint, so the largest value of a chunk always shrinks and error feedback stays
// bounded even when lo is 0. Callers compile without FMA contraction (m * w, then + lo).
LOCO_HD float sparse_level(float lo, float hi, float w, float m, int64_t levels) {
  return levels == 1 ? lo + (hi - lo) * 0.5f : lo + m * w;
}

// Largest code magnitude the encoder emits.
LOCO_HD float qmax_of(int64_t codec) {
  return codec == kInt4 ? 7.0f : (codec == kFp4 ? 6.0f : 127.0f);
}

// Largest code magnitude a payload can hold (int8 -128, int4 -8). A valid scale s has
// cmax * s finite, so no decoded value is ever Inf.
LOCO_HD float cmax_of(int64_t codec) {
  return codec == kInt4 ? 8.0f : (codec == kFp4 ? 6.0f : 128.0f);
}

}  // namespace loco
