// CPU kernels of the loco codecs, registered as torch.ops.loco.*.
//
// Ops (schemas in TORCH_LIBRARY below; status codes in compress.h):
//   quantize(x, residual?, payload, codec, block, k, fp16_scale, seed) -> status
//       ONE pass: v = x (+ residual); payload <- codes and scales of v; residual <- v - decode.
//       seed < 0: round to nearest even; seed >= 0: seeded stochastic rounding.
//   dequantize(payload, out, codec, block, k, fp16_scale, accumulate) -> status
//       Validates every scale / index / padding first and touches `out` only if all are valid;
//       then out = decode(payload), or out += decode(payload) (no full-size temporary).
//   crc32c(data, crc) -> crc   (Castagnoli, zlib-style chaining: crc32c(b, crc32c(a)) = crc(a+b))
//   set_simd(level) -> previous level   (1: AVX2 loops when the CPU has them, 0: baseline)
//
// Bitwise contract: identical results to loco/compress/reference.py. Compiled with
// -ffp-contract=off so no multiply-add is fused. The loops (compress_kernels.inc) are built
// twice, for baseline x86-64 (SSE2) and AVX2, and chosen at run time; both give the same bits.
// On a non-zero quantize status the payload and residual are unspecified (callers reset).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#include <nmmintrin.h>
#define LOCO_X86 1
#endif

#include "compress.h"

namespace loco {
namespace {

inline uint32_t f2u(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float u2f(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// ----------------------------------------------------------------------------- layout

void check_args(int64_t codec, int64_t block, int64_t k) {
  TORCH_CHECK(codec >= kNone && codec <= kTernary, "loco: unknown codec id ", codec);
  if (codec == kNone || codec == kBf16) return;
  TORCH_CHECK(block >= 1, "loco: block must be >= 1");
  if (codec == kInt4 || codec == kFp4) TORCH_CHECK(block % 2 == 0, "loco: 4-bit block must be even");
  if (codec == kTopk) {
    TORCH_CHECK(block <= 65536, "loco: top-k block must be <= 65536");
    TORCH_CHECK(k >= 1 && k <= block, "loco: top-k k must be in [1, block]");
  }
  if (codec == kSparse) {
    const int64_t kk = k & kSparseKMask, bits = k >> kSparseBitsShift;
    TORCH_CHECK(block <= 65536, "loco: sparse block must be <= 65536");
    TORCH_CHECK(k >= 0 && kk >= 1 && kk <= block, "loco: sparse k must be in [1, block]");
    TORCH_CHECK(bits >= 1 && bits <= 4, "loco: sparse bits must be in [1, 4]");
  }
}

// ----------------------------------------------------------------------------- scales

// fp16 bits -> float, exact (the caller has rejected Inf/NaN encodings).
inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
  if (e == 0) {
    const float v = static_cast<float>(m) * (1.0f / 16777216.0f);  // m * 2^-24
    return sign ? -v : v;
  }
  return u2f(sign | ((e + 112u) << 23) | (m << 13));
}

// Smallest fp16 value >= s, for finite s >= 0 (0x7C00 = Inf when s > 65504).
inline uint16_t half_ceil(float s) {
  const uint32_t u = f2u(s);
  const int32_t e = static_cast<int32_t>(u >> 23) - 127 + 15;
  if (e >= 31) return 0x7C00u;
  if (e <= 0) {  // fp16 subnormal range: multiples of 2^-24
    const float t = s * 16777216.0f;
    uint32_t h = static_cast<uint32_t>(t);
    if (static_cast<float>(h) < t) ++h;
    return static_cast<uint16_t>(h);  // h <= 1024 = smallest normal, encoded correctly
  }
  const uint32_t mant = u & 0x7FFFFFu;
  const uint32_t h = ((static_cast<uint32_t>(e) << 10) | (mant >> 13)) + ((mant & 0x1FFFu) ? 1u : 0u);
  return static_cast<uint16_t>(h > 0x7C00u ? 0x7C00u : h);
}

// s = amax / qmax, at least FLT_MIN when amax > 0 (so 1 / s is finite); with fp16 scales,
// rounded UP to the next fp16 value so |v| / s never exceeds qmax. Sets *overflow on fp16
// overflow. s = 0 only for an all-zero block.
inline float make_scale(float amax, float qmax, bool fp16, uint16_t* bits16, bool* overflow) {
  float s = amax / qmax;
  if (amax > 0.0f && s < std::numeric_limits<float>::min()) s = std::numeric_limits<float>::min();
  if (fp16) {
    const uint16_t b = half_ceil(s);
    if ((b & 0x7C00u) == 0x7C00u) *overflow = true;
    *bits16 = b;
    s = half_to_float(b);
  }
  return s;
}

// Largest fp16 value <= s, for finite s >= 0 (at most 65504).
inline uint16_t half_floor(float s) {
  uint16_t h = half_ceil(s);
  if (h > 0x7BFFu || half_to_float(h) > s) --h;
  return h;
}

inline void store_scale(uint8_t* scales, int64_t b, float s, uint16_t bits16, bool fp16) {
  if (fp16) {
    std::memcpy(scales + 2 * b, &bits16, 2);
  } else {
    std::memcpy(scales + 4 * b, &s, 4);
  }
}

inline float load_scale(const uint8_t* scales, int64_t b, bool fp16) {
  if (fp16) {
    uint16_t h;
    std::memcpy(&h, scales + 2 * b, 2);
    return half_to_float(h);
  }
  float s;
  std::memcpy(&s, scales + 4 * b, 4);
  return s;
}

inline bool scale_ok(const uint8_t* scales, int64_t b, bool fp16) {
  if (fp16) {
    uint16_t h;
    std::memcpy(&h, scales + 2 * b, 2);
    return (h & 0x8000u) == 0 && (h & 0x7C00u) != 0x7C00u;
  }
  uint32_t u;
  std::memcpy(&u, scales + 4 * b, 4);
  return (u & 0x80000000u) == 0 && (u & 0x7F800000u) != 0x7F800000u;
}

// ----------------------------------------------------------------------------- bit fields

// LSB-first fields of up to 16 bits: field e of width w is bits [e*w, (e+1)*w) of the region,
// bit i of the region is bit (i % 8) of byte i / 8 (sparse indices and codes).
struct BitWriter {
  uint8_t* p;
  uint64_t acc = 0;
  int n = 0;
  explicit BitWriter(uint8_t* q) : p(q) {}
  void put(uint32_t v, int64_t w) {
    acc |= static_cast<uint64_t>(v) << n;
    n += static_cast<int>(w);
    while (n >= 8) {
      *p++ = static_cast<uint8_t>(acc);
      acc >>= 8;
      n -= 8;
    }
  }
  void flush() {  // the last byte's unused high bits are zero
    if (n > 0) *p++ = static_cast<uint8_t>(acc);
    acc = 0;
    n = 0;
  }
};

// Reads fields in order; never reads a byte past the last field's.
struct BitReader {
  const uint8_t* p;
  uint64_t acc = 0;
  int n = 0;
  explicit BitReader(const uint8_t* q) : p(q) {}
  uint32_t get(int64_t w) {
    while (n < w) {
      acc |= static_cast<uint64_t>(*p++) << n;
      n += 8;
    }
    const uint32_t v = static_cast<uint32_t>(acc) & ((1u << w) - 1u);
    acc >>= w;
    n -= static_cast<int>(w);
    return v;
  }
};

// sign decoding: byte value -> the 8 signs (+1 / -1) it stands for, LSB first
struct SignTable {
  alignas(32) float v[256][8];
  SignTable() {
    for (int b = 0; b < 256; ++b)
      for (int t = 0; t < 8; ++t) v[b][t] = ((b >> t) & 1) ? -1.0f : 1.0f;
  }
};
const SignTable kSignTable;

// ternary decoding: byte value -> the factors (0, +1, -1) of its five trits, the first value in
// the lowest base-3 digit (rows of bytes above 242 are never read: validation rejects them)
struct TernaryTable {
  alignas(32) float v[256][8];
  TernaryTable() {
    for (int b = 0; b < 256; ++b) {
      int q = b;
      for (int t = 0; t < 8; ++t) {
        const int d = t < 5 ? q % 3 : 0;
        q /= t < 5 ? 3 : 1;
        v[b][t] = d == 1 ? 1.0f : (d == 2 ? -1.0f : 0.0f);
      }
    }
  }
};
const TernaryTable kTernaryTable;

// ----------------------------------------------------------------------------- kernels

namespace base {
#include "compress_kernels.inc"
}  // namespace base

#if defined(LOCO_X86) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("avx2")
#define LOCO_KERNELS_AVX2 1
namespace avx2 {
#include "compress_kernels.inc"
}  // namespace avx2
#undef LOCO_KERNELS_AVX2
#pragma GCC pop_options
#define LOCO_HAVE_AVX2 1
#endif

// 1: use the AVX2 build of the loops when the CPU has it (default); 0: baseline build only.
std::atomic<int64_t> g_simd{-1};

bool use_avx2() {
#if defined(LOCO_HAVE_AVX2)
  int64_t s = g_simd.load();
  if (s < 0) {
    s = __builtin_cpu_supports("avx2") ? 1 : 0;
    g_simd.store(s);
  }
  return s == 1;
#else
  return false;
#endif
}

int64_t set_simd(int64_t level) {
  const int64_t prev = use_avx2() ? 1 : 0;
#if defined(LOCO_HAVE_AVX2)
  g_simd.store(level >= 1 && __builtin_cpu_supports("avx2") ? 1 : 0);
#endif
  return prev;
}

#if defined(LOCO_HAVE_AVX2)
#define LOCO_DISPATCH(fn, ...) (use_avx2() ? avx2::fn(__VA_ARGS__) : base::fn(__VA_ARGS__))
#else
#define LOCO_DISPATCH(fn, ...) (base::fn(__VA_ARGS__))
#endif

// ----------------------------------------------------------------------------- sign

int64_t validate_sign(const uint8_t* pay, const Layout& L, bool fp16) {
  for (int64_t b = 0; b < L.nb; ++b)
    if (!scale_ok(pay, b, fp16)) return kBadScale;
  if ((L.n & 7) && (pay[L.total - 1] >> (L.n & 7))) return kBadPadding;
  return kOk;
}

// ----------------------------------------------------------------------------- ternary

// Precedence: a bad scale, a byte above 242, a non-zero trit past the last value.
int64_t validate_ternary(const uint8_t* pay, const Layout& L, bool fp16) {
  for (int64_t b = 0; b < L.nb; ++b)
    if (!scale_ok(pay, b, fp16)) return kBadScale;
  const uint8_t* bytes = pay + L.codes_off;
  const int64_t nbytes = L.total - L.codes_off;
  uint32_t high = 0;
  for (int64_t q = 0; q < nbytes; ++q) high |= bytes[q] > 242 ? 1u : 0u;
  if (high) return kBadTrit;
  static constexpr int kPow3[5] = {1, 3, 9, 27, 81};
  if (L.n % 5 && bytes[nbytes - 1] >= kPow3[L.n % 5]) return kBadPadding;
  return kOk;
}

// ----------------------------------------------------------------------------- quantize


int64_t quantize_cpu(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                     at::Tensor& payload, int64_t codec, int64_t block, int64_t k, bool fp16,
                     int64_t seed) {
  check_args(codec, block, k);
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous(), "loco: x must be contiguous fp32");
  TORCH_CHECK(payload.scalar_type() == at::kByte && payload.is_contiguous(),
              "loco: payload must be contiguous uint8");
  const int64_t n = x.numel();
  const Layout L = make_layout(n, codec, block, k, fp16);
  TORCH_CHECK(payload.numel() == L.total, "loco: payload has ", payload.numel(), " bytes, needs ",
              L.total);
  float* r = nullptr;
  if (residual.has_value() && residual->defined()) {
    TORCH_CHECK(residual->scalar_type() == at::kFloat && residual->is_contiguous() &&
                    residual->numel() == n,
                "loco: residual must be contiguous fp32 with x.numel() elements");
    r = residual->data_ptr<float>();
  }
  uint8_t* pay = payload.data_ptr<uint8_t>();
  if (n == 0) return kOk;
  const float* xp = x.data_ptr<float>();
  if (codec == kSparse) return LOCO_DISPATCH(quantize_sparse, xp, r, pay, L, fp16, seed);
  if (codec == kSign) return LOCO_DISPATCH(quantize_sign, xp, r, pay, L, fp16);
  if (codec == kTernary) return LOCO_DISPATCH(quantize_ternary, xp, r, pay, L, fp16);
  if (codec == kNone || codec == kBf16) {
    TORCH_CHECK(reinterpret_cast<uintptr_t>(pay) % (codec == kNone ? 4 : 2) == 0,
                "loco: payload must be aligned");
    return LOCO_DISPATCH(quantize_elementwise, xp, r, pay, n, codec, seed);
  }
  return LOCO_DISPATCH(quantize_blocks, xp, r, pay, L, codec, fp16, seed);
}

// ----------------------------------------------------------------------------- dequantize

// Every record of a sparse payload: both scales valid and lo <= hi, zero padding bits, indices
// strictly increasing and inside the chunk. Precedence: bad scale, bad padding, bad index.
int64_t validate_sparse(const uint8_t* pay, const Layout& L, bool fp16) {
  std::atomic<int> flags{0};  // bit 0: scale, bit 1: padding, bit 2: index
  at::parallel_for(0, L.nb, std::max<int64_t>(1, 65536 / L.block), [&](int64_t b0, int64_t b1) {
    int f = 0;
    for (int64_t b = b0; b < b1; ++b) {
      const SparseRec R = sparse_rec(std::min(L.block, L.n - b * L.block), L.k, L.ib, L.bits, L.ss);
      const uint8_t* rec = pay + b * L.rec;
      if (!scale_ok(rec, 0, fp16) || !scale_ok(rec, 1, fp16) ||
          !(load_scale(rec, 0, fp16) <= load_scale(rec, 1, fp16))) {
        f |= 1;
        continue;
      }
      const uint8_t* idx = rec + 2 * L.ss;
      const int64_t ui = (R.kb * L.ib) & 7, uc = (R.kb * L.bits) & 7;  // bits used, last byte
      if ((ui && (idx[R.ibytes - 1] >> ui)) || (uc && (idx[R.ibytes + R.cbytes - 1] >> uc))) f |= 2;
      BitReader rd(idx);
      int64_t prev = -1;
      for (int64_t c = 0; c < R.kb; ++c) {
        const int64_t j = rd.get(L.ib);
        if (j <= prev || j >= R.len) {
          f |= 4;
          break;
        }
        prev = j;
      }
    }
    if (f) flags.fetch_or(f);
  });
  const int f = flags.load();
  return (f & 1) ? kBadScale : ((f & 2) ? kBadPadding : ((f & 4) ? kBadIndex : kOk));
}

int64_t validate(const uint8_t* pay, const Layout& L, int64_t codec, bool fp16) {
  if (codec == kSparse) return validate_sparse(pay, L, fp16);
  if (codec == kSign) return validate_sign(pay, L, fp16);
  if (codec == kTernary) return validate_ternary(pay, L, fp16);
  if (codec == kNone) {
    uint32_t bad = 0;
    for (int64_t i = 0; i < L.n; ++i) {
      uint32_t u;
      std::memcpy(&u, pay + 4 * i, 4);
      bad |= (u & 0x7F800000u) == 0x7F800000u;
    }
    return bad ? kBadValue : kOk;
  }
  if (codec == kBf16) {
    uint32_t bad = 0;
    for (int64_t i = 0; i < L.n; ++i) {
      uint16_t h;
      std::memcpy(&h, pay + 2 * i, 2);
      bad |= (h & 0x7F80u) == 0x7F80u;
    }
    return bad ? kBadValue : kOk;
  }
  const float cmax = cmax_of(codec);
  for (int64_t b = 0; b < L.nb; ++b) {
    if (!scale_ok(pay, b, fp16)) return kBadScale;
    if (!(load_scale(pay, b, fp16) * cmax <= std::numeric_limits<float>::max())) return kBadScale;
  }
  if ((codec == kInt4 || codec == kFp4) && (L.n & 1)) {
    if ((pay[L.total - 1] & 0xF) != 0) return kBadPadding;
  }
  if (codec == kTopk) {
    for (int64_t b = 0; b < L.nb; ++b) {
      const int64_t len = std::min(L.block, L.n - b * L.block);
      const int64_t kb = std::min(L.k, len);
      const uint8_t* idx = pay + L.codes_off + b * L.k * L.isz;
      int64_t prev = -1;
      for (int64_t c = 0; c < kb; ++c) {
        int64_t j;
        if (L.isz == 1) {
          j = idx[c];
        } else {
          uint16_t jj;
          std::memcpy(&jj, idx + 2 * c, 2);
          j = jj;
        }
        if (j <= prev || j >= len) return kBadIndex;
        prev = j;
      }
    }
  }
  return kOk;
}


int64_t dequantize_cpu(const at::Tensor& payload, at::Tensor& out, int64_t codec, int64_t block,
                       int64_t k, bool fp16, bool accumulate) {
  check_args(codec, block, k);
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous(),
              "loco: out must be contiguous fp32");
  TORCH_CHECK(payload.scalar_type() == at::kByte && payload.is_contiguous(),
              "loco: payload must be contiguous uint8");
  const Layout L = make_layout(out.numel(), codec, block, k, fp16);
  TORCH_CHECK(payload.numel() == L.total, "loco: payload has ", payload.numel(), " bytes, needs ",
              L.total);
  const uint8_t* pay = payload.data_ptr<uint8_t>();
  const int64_t st = validate(pay, L, codec, fp16);
  if (st != kOk || L.n == 0) return st;
  float* o = out.data_ptr<float>();
  if (codec == kSign) {
    if (accumulate) {
      LOCO_DISPATCH(dequantize_sign<true>, pay, o, L, fp16);
    } else {
      LOCO_DISPATCH(dequantize_sign<false>, pay, o, L, fp16);
    }
    return kOk;
  }
  if (codec == kTernary) {
    if (accumulate) {
      LOCO_DISPATCH(dequantize_ternary<true>, pay, o, L, fp16);
    } else {
      LOCO_DISPATCH(dequantize_ternary<false>, pay, o, L, fp16);
    }
    return kOk;
  }
  if (codec == kSparse) {
    if (accumulate) {
      LOCO_DISPATCH(dequantize_sparse<true>, pay, o, L, fp16);
    } else {
      LOCO_DISPATCH(dequantize_sparse<false>, pay, o, L, fp16);
    }
    return kOk;
  }
  if (accumulate) {
    LOCO_DISPATCH(dequantize_impl<true>, pay, o, L, codec, fp16);
  } else {
    LOCO_DISPATCH(dequantize_impl<false>, pay, o, L, codec, fp16);
  }
  return kOk;
}

// ----------------------------------------------------------------------------- crc32c

constexpr uint32_t kPoly = 0x82F63B78u;  // reflected Castagnoli polynomial

struct CrcTables {
  uint32_t t[8][256];
  CrcTables() {
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int j = 0; j < 8; ++j) c = (c >> 1) ^ ((c & 1u) ? kPoly : 0u);
      t[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; ++i)
      for (int s = 1; s < 8; ++s) t[s][i] = (t[s - 1][i] >> 8) ^ t[0][t[s - 1][i] & 0xFFu];
  }
};

const CrcTables& tables() {
  static const CrcTables T;
  return T;
}

// Slicing-by-8 on the raw register (no pre/post inversion).
uint32_t crc_sw(uint32_t c, const uint8_t* p, size_t n) {
  const auto& T = tables().t;
  while (n >= 8) {
    uint32_t a, b;
    std::memcpy(&a, p, 4);
    std::memcpy(&b, p + 4, 4);
    a ^= c;
    c = T[7][a & 0xFF] ^ T[6][(a >> 8) & 0xFF] ^ T[5][(a >> 16) & 0xFF] ^ T[4][a >> 24] ^
        T[3][b & 0xFF] ^ T[2][(b >> 8) & 0xFF] ^ T[1][(b >> 16) & 0xFF] ^ T[0][b >> 24];
    p += 8;
    n -= 8;
  }
  while (n--) c = (c >> 8) ^ T[0][(c ^ *p++) & 0xFFu];
  return c;
}

uint32_t multmodp(uint32_t a, uint32_t b);
uint32_t x2nmodp(uint64_t n, unsigned k);

#if defined(LOCO_X86)
__attribute__((target("sse4.2"))) uint32_t crc_hw_serial(uint32_t c, const uint8_t* p, size_t n) {
  uint64_t c0 = c;
  while (n >= 8) {
    uint64_t w;
    std::memcpy(&w, p, 8);
    c0 = _mm_crc32_u64(c0, w);
    p += 8;
    n -= 8;
  }
  uint32_t r = static_cast<uint32_t>(c0);
  while (n--) r = _mm_crc32_u8(r, *p++);
  return r;
}

// The crc32 instruction has a latency of ~3 cycles and a throughput of 1 a cycle: three
// independent streams over the three thirds of the buffer, then combined as in crc32c_cpu
// (reg(A || B) = reg(A) shifted over |B| zero bytes ^ reg(B) from 0): ~2-3x one stream.
__attribute__((target("sse4.2"))) uint32_t crc_hw(uint32_t c, const uint8_t* p, size_t n) {
  if (n < 3 * 4096) return crc_hw_serial(c, p, n);
  const size_t third = (n / 3) & ~static_cast<size_t>(7);
  uint64_t a = c, b = 0, d = 0;
  const uint8_t* pb = p + third;
  const uint8_t* pd = p + 2 * third;
  for (size_t i = 0; i < third; i += 8) {
    uint64_t wa, wb, wd;
    std::memcpy(&wa, p + i, 8);
    std::memcpy(&wb, pb + i, 8);
    std::memcpy(&wd, pd + i, 8);
    a = _mm_crc32_u64(a, wa);
    b = _mm_crc32_u64(b, wb);
    d = _mm_crc32_u64(d, wd);
  }
  const uint32_t k = x2nmodp(third, 3);  // x^(8 * third) mod P
  uint32_t r = multmodp(k, static_cast<uint32_t>(a)) ^ static_cast<uint32_t>(b);
  r = multmodp(k, r) ^ static_cast<uint32_t>(d);
  return crc_hw_serial(r, p + 3 * third, n - 3 * third);
}
bool have_sse42() {
  static const bool ok = __builtin_cpu_supports("sse4.2");
  return ok;
}
#endif

uint32_t crc_raw(uint32_t c, const uint8_t* p, size_t n) {
#if defined(LOCO_X86)
  if (have_sse42()) return crc_hw(c, p, n);
#endif
  return crc_sw(c, p, n);
}

// Shifting a raw register over n zero bytes multiplies it by x^(8n) modulo the polynomial
// (reflected bit order): multmodp / x2nmodp as in zlib's crc32_combine, written anew here.
uint32_t multmodp(uint32_t a, uint32_t b) {
  uint32_t m = 1u << 31, p = 0;
  for (;;) {
    if (a & m) {
      p ^= b;
      if ((a & (m - 1)) == 0) break;
    }
    m >>= 1;
    b = (b & 1u) ? (b >> 1) ^ kPoly : b >> 1;
  }
  return p;
}

struct X2nTable {
  uint32_t t[32];
  X2nTable() {
    uint32_t p = 1u << 30;  // x^1
    for (int k = 0; k < 32; ++k) {
      t[k] = p;
      p = multmodp(p, p);
    }
  }
};

// x^(n * 2^k) mod P
uint32_t x2nmodp(uint64_t n, unsigned k) {
  static const X2nTable T;
  uint32_t p = 1u << 31;  // x^0
  while (n) {
    if (n & 1u) p = multmodp(T.t[k & 31], p);
    n >>= 1;
    ++k;
  }
  return p;
}

uint32_t shift_zeros(uint32_t reg, uint64_t nbytes) { return multmodp(x2nmodp(nbytes, 3), reg); }

int64_t crc32c_cpu(const at::Tensor& data, int64_t crc) {
  TORCH_CHECK(data.scalar_type() == at::kByte && data.is_contiguous() && data.device().is_cpu(),
              "loco: crc32c needs a contiguous CPU uint8 tensor");
  const uint8_t* p = data.data_ptr<uint8_t>();
  const int64_t n = data.numel();
  const uint32_t init = ~static_cast<uint32_t>(crc);
  const int64_t chunk = int64_t{1} << 20;
  const int64_t nchunks = (n + chunk - 1) / chunk;
  if (n < (int64_t{16} << 20) || at::get_num_threads() <= 1) {  // threads pay off above ~16 MB
    return static_cast<int64_t>(~crc_raw(init, p, static_cast<size_t>(n)) & 0xFFFFFFFFu);
  }
  // Raw CRC of each chunk from 0, in parallel; then fold: reg = shift(reg, len) ^ raw(chunk).
  std::vector<uint32_t> part(static_cast<size_t>(nchunks));
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t len = std::min(chunk, n - c * chunk);
      part[c] = crc_raw(0u, p + c * chunk, static_cast<size_t>(len));
    }
  });
  uint32_t reg = init;
  for (int64_t c = 0; c < nchunks; ++c) {
    const int64_t len = std::min(chunk, n - c * chunk);
    reg = shift_zeros(reg, static_cast<uint64_t>(len)) ^ part[c];
  }
  return static_cast<int64_t>(~reg & 0xFFFFFFFFu);
}

}  // namespace

TORCH_LIBRARY(loco, m) {
  m.def(
      "quantize(Tensor x, Tensor(a!)? residual, Tensor(b!) payload, int codec, int block, int k, "
      "bool fp16_scale, int seed) -> int");
  m.def(
      "dequantize(Tensor payload, Tensor(a!) out, int codec, int block, int k, bool fp16_scale, "
      "bool accumulate) -> int");
  m.def("crc32c(Tensor data, int crc) -> int");
  // Catch-all (no tensor arguments): choose the loop build; returns the previous level.
  m.def("set_simd(int level) -> int", &set_simd);
}

TORCH_LIBRARY_IMPL(loco, CPU, m) {
  m.impl("quantize", &quantize_cpu);
  m.impl("dequantize", &dequantize_cpu);
  m.impl("crc32c", &crc32c_cpu);
}

}  // namespace loco
