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
//
// Bitwise contract: identical results to loco/compress/reference.py. Compiled with
// -ffp-contract=off so no multiply-add is fused; loops are written to vectorize with SSE2.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <functional>
#include <limits>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
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

struct Layout {
  int64_t n = 0, block = 1, k = 0, nb = 0, ss = 4, isz = 1, ktot = 0;
  int64_t codes_off = 0, vals_off = 0, total = 0;
};

Layout make_layout(int64_t n, int64_t codec, int64_t block, int64_t k, bool fp16) {
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
      L.ktot = L.nb == 0 ? 0 : (L.nb - 1) * k + std::min(k, tail);
      L.vals_off = L.codes_off + L.ktot * L.isz;
      L.total = L.vals_off + L.ktot;
      break;
    }
    default:
      TORCH_CHECK(false, "loco: unknown codec id ", codec);
  }
  return L;
}

void check_args(int64_t codec, int64_t block, int64_t k) {
  TORCH_CHECK(codec >= kNone && codec <= kTopk, "loco: unknown codec id ", codec);
  if (codec == kNone || codec == kBf16) return;
  TORCH_CHECK(block >= 1, "loco: block must be >= 1");
  if (codec == kInt4 || codec == kFp4) TORCH_CHECK(block % 2 == 0, "loco: 4-bit block must be even");
  if (codec == kTopk) {
    TORCH_CHECK(block <= 65536, "loco: top-k block must be <= 65536");
    TORCH_CHECK(k >= 1 && k <= block, "loco: top-k k must be in [1, block]");
  }
}

// ----------------------------------------------------------------------------- scales

// s = amax / qmax (at least the smallest denormal when amax > 0); with fp16 scales, rounded UP
// to the next fp16 value so |v| / s never exceeds qmax. Sets *overflow on fp16 overflow.
inline float make_scale(float amax, float qmax, bool fp16, uint16_t* bits16, bool* overflow) {
  float s = amax / qmax;
  if (s == 0.0f && amax > 0.0f) s = std::numeric_limits<float>::denorm_min();
  if (fp16) {
    c10::Half h(s);
    uint16_t b = h.x;
    if (static_cast<float>(h) < s) b = static_cast<uint16_t>(b + 1);
    const float r = static_cast<float>(c10::Half(b, c10::Half::from_bits()));
    if ((b & 0x7C00u) == 0x7C00u) *overflow = true;
    *bits16 = b;
    s = r;
  }
  return s;
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
    return static_cast<float>(c10::Half(h, c10::Half::from_bits()));
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

// v = x (+ r) into v; returns the bit pattern of max |v| (>= 0x7F800000 means NaN/Inf present).
inline int32_t load_block(const float* x, const float* r, float* v, int64_t len) {
  int32_t m = 0;
  if (r != nullptr) {
    for (int64_t j = 0; j < len; ++j) {
      const float t = x[j] + r[j];
      v[j] = t;
      const int32_t a = static_cast<int32_t>(f2u(t) & 0x7FFFFFFFu);
      m = a > m ? a : m;
    }
  } else {
    for (int64_t j = 0; j < len; ++j) {
      const float t = x[j];
      v[j] = t;
      const int32_t a = static_cast<int32_t>(f2u(t) & 0x7FFFFFFFu);
      m = a > m ? a : m;
    }
  }
  return m;
}

// ----------------------------------------------------------------------------- quantize

// Linear codes (int8 / int4) of one block into q[0, len); residual update when r != nullptr.
void linear_codes(const float* v, float* r, int8_t* q, int64_t len, float s, float qmax,
                  int64_t seed, int64_t base) {
  if (s == 0.0f) {
    for (int64_t j = 0; j < len; ++j) q[j] = 0;
    if (r != nullptr)
      for (int64_t j = 0; j < len; ++j) r[j] = v[j] - 0.0f;
    return;
  }
  if (seed < 0) {
    for (int64_t j = 0; j < len; ++j) {
      const float y = rne_small(clampf(v[j] / s, -qmax, qmax));
      q[j] = static_cast<int8_t>(static_cast<int32_t>(y));
    }
  } else {
    const uint32_t sd = static_cast<uint32_t>(seed);
    for (int64_t j = 0; j < len; ++j) {
      const float y = clampf(v[j] / s, -qmax, qmax);
      const float t = clampf(floor_small(y + uniform24(sd, base + j)), -qmax, qmax);
      q[j] = static_cast<int8_t>(static_cast<int32_t>(t));
    }
  }
  if (r != nullptr)
    for (int64_t j = 0; j < len; ++j) r[j] = v[j] - static_cast<float>(q[j]) * s;
}

// fp4 (E2M1) codes of one block: bit 3 = sign (v < 0), bits 0-2 = magnitude index.
void fp4_codes(const float* v, float* r, int8_t* q, int64_t len, float s, int64_t seed,
               int64_t base) {
  if (s == 0.0f) {
    for (int64_t j = 0; j < len; ++j) q[j] = 0;
    if (r != nullptr)
      for (int64_t j = 0; j < len; ++j) r[j] = v[j] - 0.0f;
    return;
  }
  if (seed < 0) {
    for (int64_t j = 0; j < len; ++j) {
      const float y = v[j] / s;
      const int m = fp4_nearest(y < 0.0f ? -y : y);
      q[j] = static_cast<int8_t>(m | (v[j] < 0.0f ? 8 : 0));
    }
  } else {
    const uint32_t sd = static_cast<uint32_t>(seed);
    for (int64_t j = 0; j < len; ++j) {
      const float y = v[j] / s;
      const int m = fp4_stochastic(y < 0.0f ? -y : y, uniform24(sd, base + j));
      q[j] = static_cast<int8_t>(m | (v[j] < 0.0f ? 8 : 0));
    }
  }
  if (r != nullptr) {
    for (int64_t j = 0; j < len; ++j) {
      const int c = q[j];
      const float g = fp4_mag(c & 7);
      r[j] = v[j] - ((c & 8) ? -g : g) * s;
    }
  }
}

void pack_nibbles(const int8_t* q, uint8_t* out, int64_t len) {
  const int64_t half = len / 2;
  for (int64_t j = 0; j < half; ++j) {
    out[j] = static_cast<uint8_t>(((q[2 * j] & 0xF) << 4) | (q[2 * j + 1] & 0xF));
  }
  if (len & 1) out[half] = static_cast<uint8_t>((q[len - 1] & 0xF) << 4);
}

int64_t quantize_blocks(const float* x, float* r, uint8_t* pay, const Layout& L, int64_t codec,
                        bool fp16, int64_t seed) {
  const float qmax = qmax_of(codec);
  std::atomic<bool> nonfinite{false}, overflow{false};
  // Grain: enough blocks per task to amortize scheduling (~64k elements).
  const int64_t grain = std::max<int64_t>(1, 65536 / L.block);
  at::parallel_for(0, L.nb, grain, [&](int64_t b0, int64_t b1) {
    std::vector<float> v(static_cast<size_t>(L.block));
    std::vector<int8_t> q(static_cast<size_t>(L.block));
    std::vector<uint64_t> keys(codec == kTopk ? static_cast<size_t>(L.block) : 0);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t base = b * L.block;
      const int64_t len = std::min(L.block, L.n - base);
      float* rb = r != nullptr ? r + base : nullptr;
      const int32_t mbits = load_block(x + base, rb, v.data(), len);
      if (mbits >= 0x7F800000) {
        nonfinite = true;
        continue;  // leave this block's residual as it was; caller resets on error
      }
      uint16_t h = 0;
      bool ovf = false;
      const float s = make_scale(u2f(static_cast<uint32_t>(mbits)), qmax, fp16, &h, &ovf);
      if (ovf) {
        overflow = true;
        continue;
      }
      store_scale(pay, b, s, h, fp16);
      if (codec == kInt8) {
        linear_codes(v.data(), rb, reinterpret_cast<int8_t*>(pay + L.codes_off + base), len, s,
                     qmax, seed, base);
      } else if (codec == kInt4) {
        linear_codes(v.data(), rb, q.data(), len, s, qmax, seed, base);
        pack_nibbles(q.data(), pay + L.codes_off + base / 2, len);
      } else if (codec == kFp4) {
        fp4_codes(v.data(), rb, q.data(), len, s, seed, base);
        pack_nibbles(q.data(), pay + L.codes_off + base / 2, len);
      } else {  // top-k
        const int64_t kb = std::min(L.k, len);
        for (int64_t j = 0; j < len; ++j) {
          keys[j] = (static_cast<uint64_t>(f2u(v[j]) & 0x7FFFFFFFu) << 32) |
                    static_cast<uint64_t>(0xFFFFFFFFu - static_cast<uint32_t>(j));
        }
        uint64_t thr = 0;
        if (kb < len) {
          std::vector<uint64_t> tmp(keys.begin(), keys.begin() + len);
          std::nth_element(tmp.begin(), tmp.begin() + (kb - 1), tmp.end(),
                           std::greater<uint64_t>());
          thr = tmp[kb - 1];
        }
        uint8_t* idx = pay + L.codes_off + b * L.k * L.isz;
        int8_t* val = reinterpret_cast<int8_t*>(pay + L.vals_off + b * L.k);
        const uint32_t sd = static_cast<uint32_t>(seed);
        int64_t c = 0;
        for (int64_t j = 0; j < len; ++j) {
          if (keys[j] < thr) continue;
          float t;
          if (s == 0.0f) {
            t = 0.0f;
          } else if (seed < 0) {
            t = rne_small(clampf(v[j] / s, -127.0f, 127.0f));
          } else {
            const float y = clampf(v[j] / s, -127.0f, 127.0f);
            t = clampf(floor_small(y + uniform24(sd, base + j)), -127.0f, 127.0f);
          }
          const int8_t qq = static_cast<int8_t>(static_cast<int32_t>(t));
          val[c] = qq;
          if (L.isz == 1) {
            idx[c] = static_cast<uint8_t>(j);
          } else {
            const uint16_t jj = static_cast<uint16_t>(j);
            std::memcpy(idx + 2 * c, &jj, 2);
          }
          if (rb != nullptr) rb[j] = v[j] - static_cast<float>(qq) * s;
          ++c;
        }
        // Non-selected residual entries keep v (already x + r); write them back.
        if (rb != nullptr) {
          for (int64_t j = 0; j < len; ++j)
            if (keys[j] < thr) rb[j] = v[j];
        }
      }
    }
  });
  return nonfinite ? kNonFinite : (overflow ? kOverflow : kOk);
}

int64_t quantize_elementwise(const float* x, float* r, uint8_t* pay, int64_t n, int64_t codec,
                             int64_t seed) {
  std::atomic<bool> nonfinite{false}, overflow{false};
  at::parallel_for(0, n, 65536, [&](int64_t i0, int64_t i1) {
    uint32_t fin = 0, ovf = 0;
    if (codec == kNone) {
      float* out = reinterpret_cast<float*>(pay);  // payload is 4-byte aligned (checked)
      for (int64_t i = i0; i < i1; ++i) {
        const float v = r != nullptr ? x[i] + r[i] : x[i];
        fin |= (f2u(v) & 0x7F800000u) == 0x7F800000u;
        out[i] = v;
      }
      if (r != nullptr && !fin)
        for (int64_t i = i0; i < i1; ++i) r[i] = out[i] - out[i];
    } else {  // bf16
      uint16_t* out = reinterpret_cast<uint16_t*>(pay);
      const uint32_t sd = static_cast<uint32_t>(seed);
      for (int64_t i = i0; i < i1; ++i) {
        const float v = r != nullptr ? x[i] + r[i] : x[i];
        const uint32_t u = f2u(v);
        fin |= (u & 0x7F800000u) == 0x7F800000u;
        const uint32_t add = seed < 0 ? 0x7FFFu + ((u >> 16) & 1u) : (hash_index(sd, i) & 0xFFFFu);
        const uint32_t hb = (u + add) >> 16;
        ovf |= (hb & 0x7F80u) == 0x7F80u;
        out[i] = static_cast<uint16_t>(hb);
      }
      if (r != nullptr && !fin && !ovf) {
        for (int64_t i = i0; i < i1; ++i) {
          const float v = x[i] + r[i];
          r[i] = v - u2f(static_cast<uint32_t>(out[i]) << 16);
        }
      }
    }
    if (fin) nonfinite = true;
    if (ovf) overflow = true;
  });
  return nonfinite ? kNonFinite : (overflow ? kOverflow : kOk);
}

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
  if (codec == kNone || codec == kBf16) {
    TORCH_CHECK(reinterpret_cast<uintptr_t>(pay) % (codec == kNone ? 4 : 2) == 0,
                "loco: payload must be aligned");
    return quantize_elementwise(xp, r, pay, n, codec, seed);
  }
  return quantize_blocks(xp, r, pay, L, codec, fp16, seed);
}

// ----------------------------------------------------------------------------- dequantize

int64_t validate(const uint8_t* pay, const Layout& L, int64_t codec, bool fp16) {
  if (codec == kNone) {
    for (int64_t i = 0; i < L.n; ++i) {
      uint32_t u;
      std::memcpy(&u, pay + 4 * i, 4);
      if ((u & 0x7F800000u) == 0x7F800000u) return kBadValue;
    }
    return kOk;
  }
  if (codec == kBf16) {
    for (int64_t i = 0; i < L.n; ++i) {
      uint16_t h;
      std::memcpy(&h, pay + 2 * i, 2);
      if ((h & 0x7F80u) == 0x7F80u) return kBadValue;
    }
    return kOk;
  }
  for (int64_t b = 0; b < L.nb; ++b)
    if (!scale_ok(pay, b, fp16)) return kBadScale;
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

template <bool ACC>
inline void put(float* o, float d) {
  if (ACC) {
    *o += d;
  } else {
    *o = d;
  }
}

template <bool ACC>
void dequantize_impl(const uint8_t* pay, float* out, const Layout& L, int64_t codec, bool fp16) {
  if (codec == kNone || codec == kBf16) {
    at::parallel_for(0, L.n, 65536, [&](int64_t i0, int64_t i1) {
      if (codec == kNone) {
        for (int64_t i = i0; i < i1; ++i) {
          float d;
          std::memcpy(&d, pay + 4 * i, 4);
          put<ACC>(out + i, d);
        }
      } else {
        for (int64_t i = i0; i < i1; ++i) {
          uint16_t h;
          std::memcpy(&h, pay + 2 * i, 2);
          put<ACC>(out + i, u2f(static_cast<uint32_t>(h) << 16));
        }
      }
    });
    return;
  }
  const int64_t grain = std::max<int64_t>(1, 65536 / L.block);
  at::parallel_for(0, L.nb, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t base = b * L.block;
      const int64_t len = std::min(L.block, L.n - base);
      const float s = load_scale(pay, b, fp16);
      float* o = out + base;
      if (codec == kInt8) {
        const int8_t* q = reinterpret_cast<const int8_t*>(pay + L.codes_off + base);
        for (int64_t j = 0; j < len; ++j) put<ACC>(o + j, static_cast<float>(q[j]) * s);
      } else if (codec == kInt4) {
        const uint8_t* p = pay + L.codes_off + base / 2;
        const int64_t half = len / 2;
        for (int64_t j = 0; j < half; ++j) {
          const int8_t byte = static_cast<int8_t>(p[j]);
          const int8_t lo = static_cast<int8_t>(static_cast<int8_t>(p[j] << 4) >> 4);
          put<ACC>(o + 2 * j, static_cast<float>(static_cast<int8_t>(byte >> 4)) * s);
          put<ACC>(o + 2 * j + 1, static_cast<float>(lo) * s);
        }
        if (len & 1)
          put<ACC>(o + len - 1, static_cast<float>(static_cast<int8_t>(p[half]) >> 4) * s);
      } else if (codec == kFp4) {
        float table[16];
        for (int c = 0; c < 16; ++c) {
          const float g = fp4_mag(c & 7);
          table[c] = ((c & 8) ? -g : g) * s;
        }
        const uint8_t* p = pay + L.codes_off + base / 2;
        const int64_t half = len / 2;
        for (int64_t j = 0; j < half; ++j) {
          put<ACC>(o + 2 * j, table[p[j] >> 4]);
          put<ACC>(o + 2 * j + 1, table[p[j] & 0xF]);
        }
        if (len & 1) put<ACC>(o + len - 1, table[p[half] >> 4]);
      } else {  // top-k
        if (!ACC)
          for (int64_t j = 0; j < len; ++j) o[j] = 0.0f;
        const int64_t kb = std::min(L.k, len);
        const uint8_t* idx = pay + L.codes_off + b * L.k * L.isz;
        const int8_t* val = reinterpret_cast<const int8_t*>(pay + L.vals_off + b * L.k);
        for (int64_t c = 0; c < kb; ++c) {
          int64_t j;
          if (L.isz == 1) {
            j = idx[c];
          } else {
            uint16_t jj;
            std::memcpy(&jj, idx + 2 * c, 2);
            j = jj;
          }
          put<ACC>(o + j, static_cast<float>(val[c]) * s);
        }
      }
    }
  });
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
  if (accumulate) {
    dequantize_impl<true>(pay, o, L, codec, fp16);
  } else {
    dequantize_impl<false>(pay, o, L, codec, fp16);
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

#if defined(LOCO_X86)
__attribute__((target("sse4.2"))) uint32_t crc_hw(uint32_t c, const uint8_t* p, size_t n) {
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

// GF(2) 32x32 operator that advances a raw register over `n` zero bytes (columns = images of bits).
struct ZeroOp {
  uint32_t col[32];
};

uint32_t apply(const ZeroOp& op, uint32_t v) {
  uint32_t r = 0;
  for (int i = 0; i < 32; ++i)
    if ((v >> i) & 1u) r ^= op.col[i];
  return r;
}

ZeroOp compose(const ZeroOp& a, const ZeroOp& b) {  // a after b
  ZeroOp r;
  for (int i = 0; i < 32; ++i) r.col[i] = apply(a, b.col[i]);
  return r;
}

ZeroOp zeros_op(uint64_t n) {
  ZeroOp one;  // one zero byte
  for (int i = 0; i < 32; ++i) one.col[i] = crc_sw(1u << i, reinterpret_cast<const uint8_t*>("\0"), 1);
  ZeroOp r;
  for (int i = 0; i < 32; ++i) r.col[i] = 1u << i;
  while (n) {
    if (n & 1u) r = compose(one, r);
    one = compose(one, one);
    n >>= 1;
  }
  return r;
}

int64_t crc32c_cpu(const at::Tensor& data, int64_t crc) {
  TORCH_CHECK(data.scalar_type() == at::kByte && data.is_contiguous() && data.device().is_cpu(),
              "loco: crc32c needs a contiguous CPU uint8 tensor");
  const uint8_t* p = data.data_ptr<uint8_t>();
  const int64_t n = data.numel();
  const uint32_t init = ~static_cast<uint32_t>(crc);
  const int64_t chunk = int64_t{1} << 22;
  const int64_t nchunks = (n + chunk - 1) / chunk;
  if (nchunks <= 1 || at::get_num_threads() <= 1) {
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
  const ZeroOp full = zeros_op(static_cast<uint64_t>(chunk));
  uint32_t reg = init;
  for (int64_t c = 0; c < nchunks; ++c) {
    const int64_t len = std::min(chunk, n - c * chunk);
    reg = (len == chunk ? apply(full, reg) : apply(zeros_op(static_cast<uint64_t>(len)), reg)) ^
          part[c];
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
}

TORCH_LIBRARY_IMPL(loco, CPU, m) {
  m.impl("quantize", &quantize_cpu);
  m.impl("dequantize", &dequantize_cpu);
  m.impl("crc32c", &crc32c_cpu);
}

}  // namespace loco
