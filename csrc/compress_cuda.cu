// CUDA kernels of the loco codecs (none, bf16, int8, int4, fp4, sparse, ternary), registered for
// the CUDA dispatch key of torch.ops.loco.quantize / dequantize. Same bits as the CPU kernels and the
// pure-torch reference (built with --fmad=false; IEEE division). top-k and sign have no CUDA
// kernel: loco/compress routes them to the host (codecs._OnHost).
//
// Built only when torch has CUDA and nvcc exists (loco/compress/_ext.py).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <cfloat>
#include <cstdint>

#include "compress.h"

namespace loco {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ uint32_t f2u(float f) { return __float_as_uint(f); }
__device__ __forceinline__ float u2f(uint32_t u) { return __uint_as_float(u); }

// Smallest fp16 value >= s for finite s >= 0 (0x7C00 = Inf); same as half_ceil in compress.cpp.
__device__ __forceinline__ uint16_t half_ceil(float s) {
  const uint32_t u = f2u(s);
  const int32_t e = static_cast<int32_t>(u >> 23) - 127 + 15;
  if (e >= 31) return 0x7C00u;
  if (e <= 0) {
    const float t = s * 16777216.0f;
    uint32_t h = static_cast<uint32_t>(t);
    if (static_cast<float>(h) < t) ++h;
    return static_cast<uint16_t>(h);
  }
  const uint32_t mant = u & 0x7FFFFFu;
  const uint32_t h =
      ((static_cast<uint32_t>(e) << 10) | (mant >> 13)) + ((mant & 0x1FFFu) ? 1u : 0u);
  return static_cast<uint16_t>(h > 0x7C00u ? 0x7C00u : h);
}

__device__ __forceinline__ float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
  if (e == 0) {
    const float v = static_cast<float>(m) * (1.0f / 16777216.0f);
    return sign ? -v : v;
  }
  return u2f(sign | ((e + 112u) << 23) | (m << 13));
}

__device__ __forceinline__ float load_scale(const uint8_t* pay, int64_t b, bool fp16) {
  if (fp16) {
    const uint16_t h = static_cast<uint16_t>(pay[2 * b] | (pay[2 * b + 1] << 8));
    return half_to_float(h);
  }
  const uint32_t u = static_cast<uint32_t>(pay[4 * b]) | (static_cast<uint32_t>(pay[4 * b + 1]) << 8) |
                     (static_cast<uint32_t>(pay[4 * b + 2]) << 16) |
                     (static_cast<uint32_t>(pay[4 * b + 3]) << 24);
  return u2f(u);
}

// ----------------------------------------------------------------------------- encode

// One linear / fp4 code of value v with scale s (s == 0 only for an all-zero block); returns the
// code (int8 value, or the 4-bit pattern) and writes the dequantized value to *deq.
__device__ __forceinline__ int encode_one(int64_t codec, float v, float s, float inv,
                                          float qmax, int64_t seed, int64_t i, float* deq) {
  if (s == 0.0f) {
    *deq = 0.0f;
    return 0;
  }
  if (codec == kFp4) {
    const float a = fabsf(v * inv);
    int m;
    if (seed < 0) {
      m = fp4_nearest(a);
    } else {
      m = fp4_stochastic(a, uniform24(static_cast<uint32_t>(seed), i));
    }
    const bool neg = v < 0.0f;
    const float g = fp4_mag(m);
    *deq = (neg ? -g : g) * s;
    return m | (neg ? 8 : 0);
  }
  float t;
  if (seed < 0) {
    t = rne_small(clampf(v * inv, -qmax, qmax));
  } else {
    const float y = clampf(v * inv, -qmax, qmax);
    t = clampf(floor_small(y + uniform24(static_cast<uint32_t>(seed), i)), -qmax, qmax);
  }
  *deq = t * s;
  return static_cast<int>(t);
}

// The scale of a block with max |v| bits `mbits` (< Inf); false on overflow. Writes the scale's
// wire bytes when `write` (the caller picks one thread). Same arithmetic as compress.cpp.
__device__ __forceinline__ bool block_scale(uint32_t mbits, int64_t codec, bool fp16, uint8_t* pay,
                                            int64_t b, bool write, float* s_out) {
  const float amax = u2f(mbits);
  float s = amax / qmax_of(codec);
  if (amax > 0.0f && s < FLT_MIN) s = FLT_MIN;  // so that 1 / s is finite
  bool ok = true;
  if (fp16) {
    const uint16_t h = half_ceil(s);
    if ((h & 0x7C00u) == 0x7C00u) ok = false;
    s = half_to_float(h);
    if (write) {
      pay[2 * b] = static_cast<uint8_t>(h & 0xFF);
      pay[2 * b + 1] = static_cast<uint8_t>(h >> 8);
    }
  } else if (write) {
    const uint32_t u = f2u(s);
    for (int c = 0; c < 4; ++c) pay[4 * b + c] = static_cast<uint8_t>(u >> (8 * c));
  }
  if (!(s * cmax_of(codec) <= FLT_MAX)) ok = false;
  *s_out = s;
  return ok;
}

template <int V>
struct Vec;
template <>
struct Vec<2> {
  __device__ static void load(const float* p, float* v) {
    const float2 t = *reinterpret_cast<const float2*>(p);
    v[0] = t.x;
    v[1] = t.y;
  }
  __device__ static void store(float* p, const float* v) {
    *reinterpret_cast<float2*>(p) = make_float2(v[0], v[1]);
  }
};
template <>
struct Vec<4> {
  __device__ static void load(const float* p, float* v) {
    const float4 t = *reinterpret_cast<const float4*>(p);
    v[0] = t.x;
    v[1] = t.y;
    v[2] = t.z;
    v[3] = t.w;
  }
  __device__ static void store(float* p, const float* v) {
    *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
  }
};

// Codes of V consecutive values (V = 2 or 4) starting at element i (a multiple of V), stored
// with one aligned store: int8 -> V bytes; int4 / fp4 -> V / 2 bytes, first value high nibble.
template <int V>
__device__ __forceinline__ void store_codes(uint8_t* codes, int64_t i, int64_t codec,
                                            const int* c) {
  if (codec == kInt8) {
    if (V == 4) {
      const uint32_t w = (c[0] & 0xFFu) | ((c[1] & 0xFFu) << 8) | ((c[2] & 0xFFu) << 16) |
                         ((c[3] & 0xFFu) << 24);
      *reinterpret_cast<uint32_t*>(codes + i) = w;
    } else {
      const uint16_t w = static_cast<uint16_t>((c[0] & 0xFF) | ((c[1] & 0xFF) << 8));
      *reinterpret_cast<uint16_t*>(codes + i) = w;
    }
  } else {
    const uint32_t b0 = ((c[0] & 0xFu) << 4) | (c[1] & 0xFu);
    if (V == 4) {
      const uint32_t b1 = ((c[2] & 0xFu) << 4) | (c[3] & 0xFu);
      *reinterpret_cast<uint16_t*>(codes + i / 2) = static_cast<uint16_t>(b0 | (b1 << 8));
    } else {
      codes[i / 2] = static_cast<uint8_t>(b0);
    }
  }
}

// Fast path: ONE warp per codec block of 32 * VPT values (block 64..1024). Each lane loads its
// values once (coalesced float2/float4: a warp reads consecutive 256/512-byte rows), the block's
// absmax is a warp shuffle reduction, then codes and residual come from the registers: x and r
// are read once and r written once, as on the CPU. Needs x / r aligned to the vector and the
// codes aligned to their store (checked by the host). Blocks [0, nfull) only.
template <int VPT>
__global__ void __launch_bounds__(256)
    quantize_warp_kernel(const float* __restrict__ x, float* __restrict__ r,
                         uint8_t* __restrict__ pay, int64_t nfull, int64_t codes_off,
                         int64_t codec, bool fp16, int64_t seed, int* __restrict__ flags) {
  constexpr int V = VPT >= 4 ? 4 : 2;
  constexpr int NV = VPT / V;
  constexpr int64_t B = 32 * VPT;
  const int lane = threadIdx.x & 31;
  const int64_t wpb = blockDim.x / 32;
  const float qmax = qmax_of(codec);
  uint8_t* codes = pay + codes_off;
  for (int64_t b = blockIdx.x * wpb + threadIdx.x / 32; b < nfull;
       b += static_cast<int64_t>(gridDim.x) * wpb) {
    const int64_t base = b * B;
    float v[VPT];
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int64_t off = base + static_cast<int64_t>(k * 32 + lane) * V;
      Vec<V>::load(x + off, v + k * V);
      if (r != nullptr) {
        float t[V];
        Vec<V>::load(r + off, t);
#pragma unroll
        for (int e = 0; e < V; ++e) v[k * V + e] = v[k * V + e] + t[e];
      }
    }
    uint32_t m = 0;
#pragma unroll
    for (int e = 0; e < VPT; ++e) m = max(m, f2u(v[e]) & 0x7FFFFFFFu);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m = max(m, __shfl_xor_sync(0xFFFFFFFFu, m, o));
    if (m >= 0x7F800000u) {  // NaN or Inf: this block's residual stays; the caller resets
      if (lane == 0) atomicOr(&flags[0], 1);
      continue;
    }
    float s;
    if (!block_scale(m, codec, fp16, pay, b, lane == 0, &s)) {
      if (lane == 0) atomicOr(&flags[1], 1);
      continue;
    }
    const float inv = s > 0.0f ? 1.0f / s : 0.0f;
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int64_t off = base + static_cast<int64_t>(k * 32 + lane) * V;
      int c[V];
      float res[V];
#pragma unroll
      for (int e = 0; e < V; ++e) {
        float deq;
        c[e] = encode_one(codec, v[k * V + e], s, inv, qmax, seed, off + e, &deq);
        res[e] = v[k * V + e] - deq;
      }
      if (r != nullptr) Vec<V>::store(r + off, res);
      store_codes<V>(codes, off, codec, c);
    }
  }
}

// General path (any block size, any alignment; also the last, partial block of the fast path):
// one thread block per codec block, blocks [b_begin, nb). Pass 1 absmax (block reduction),
// pass 2 codes + residual (the second read of x and r mostly hits L2).
__global__ void quantize_blocks_kernel(const float* __restrict__ x, float* __restrict__ r,
                                       uint8_t* __restrict__ pay, int64_t n, int64_t block,
                                       int64_t b_begin, int64_t nb, int64_t codes_off,
                                       int64_t codec, bool fp16, int64_t seed,
                                       int* __restrict__ flags) {
  __shared__ uint32_t red[kThreads];
  __shared__ float s_shared;
  __shared__ int skip;
  const float qmax = qmax_of(codec);
  for (int64_t b = b_begin + blockIdx.x; b < nb; b += gridDim.x) {
    const int64_t base = b * block;
    const int64_t len = min(block, n - base);
    uint32_t m = 0;
    for (int64_t j = threadIdx.x; j < len; j += blockDim.x) {
      const float v = r != nullptr ? x[base + j] + r[base + j] : x[base + j];
      m = max(m, f2u(v) & 0x7FFFFFFFu);
    }
    red[threadIdx.x] = m;
    __syncthreads();
    for (int w = blockDim.x / 2; w > 0; w >>= 1) {
      if (threadIdx.x < w) red[threadIdx.x] = max(red[threadIdx.x], red[threadIdx.x + w]);
      __syncthreads();
    }
    if (threadIdx.x == 0) {
      const uint32_t mb = red[0];
      skip = 0;
      if (mb >= 0x7F800000u) {
        atomicOr(&flags[0], 1);
        skip = 1;
      } else {
        float s;
        if (!block_scale(mb, codec, fp16, pay, b, true, &s)) {
          atomicOr(&flags[1], 1);
          skip = 1;
        }
        s_shared = s;
      }
    }
    __syncthreads();
    if (!skip) {
      const float s = s_shared;
      const float inv = s > 0.0f ? 1.0f / s : 0.0f;
      if (codec == kInt8) {
        for (int64_t j = threadIdx.x; j < len; j += blockDim.x) {
          const int64_t i = base + j;
          const float v = r != nullptr ? x[i] + r[i] : x[i];
          float deq;
          const int q = encode_one(codec, v, s, inv, qmax, seed, i, &deq);
          pay[codes_off + i] = static_cast<uint8_t>(static_cast<int8_t>(q));
          if (r != nullptr) r[i] = v - deq;
        }
      } else {  // int4 / fp4: one thread per byte (pair of values); block is even
        const int64_t pairs = (len + 1) / 2;
        for (int64_t p = threadIdx.x; p < pairs; p += blockDim.x) {
          int code[2] = {0, 0};
          for (int h = 0; h < 2; ++h) {
            const int64_t j = 2 * p + h;
            if (j >= len) break;
            const int64_t i = base + j;
            const float v = r != nullptr ? x[i] + r[i] : x[i];
            float deq;
            code[h] = encode_one(codec, v, s, inv, qmax, seed, i, &deq) & 0xF;
            if (r != nullptr) r[i] = v - deq;
          }
          pay[codes_off + base / 2 + p] = static_cast<uint8_t>((code[0] << 4) | code[1]);
        }
      }
    }
    __syncthreads();
  }
}

// none / bf16 of one value; sets flags[0] on NaN/Inf input, flags[1] on bf16 overflow.
__device__ __forceinline__ void elementwise_one(const float* __restrict__ x, float* __restrict__ r,
                                                uint8_t* __restrict__ pay, int64_t i,
                                                int64_t codec, int64_t seed, int* flags) {
  const float v = r != nullptr ? x[i] + r[i] : x[i];
  const uint32_t u = f2u(v);
  if ((u & 0x7F800000u) == 0x7F800000u) {
    atomicOr(&flags[0], 1);
    return;
  }
  if (codec == kNone) {
    reinterpret_cast<float*>(pay)[i] = v;
    if (r != nullptr) r[i] = v - v;
  } else {
    const uint32_t add = seed < 0 ? 0x7FFFu + ((u >> 16) & 1u)
                                  : (hash_index(static_cast<uint32_t>(seed), i) & 0xFFFFu);
    const uint32_t hb = (u + add) >> 16;
    if ((hb & 0x7F80u) == 0x7F80u) {
      atomicOr(&flags[1], 1);
      return;
    }
    reinterpret_cast<uint16_t*>(pay)[i] = static_cast<uint16_t>(hb);
    if (r != nullptr) r[i] = v - u2f(hb << 16);
  }
}

// none / bf16: each thread takes chunks of 4 values; float4 loads and stores when `vec` (all
// pointers aligned) and the chunk is full, else one value at a time.
__global__ void quantize_elementwise_kernel(const float* __restrict__ x, float* __restrict__ r,
                                            uint8_t* __restrict__ pay, int64_t n, int64_t codec,
                                            int64_t seed, bool vec, int* __restrict__ flags) {
  const int64_t chunks = (n + 3) / 4;
  for (int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; c < chunks;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i0 = 4 * c;
    if (!vec || i0 + 4 > n) {
      for (int64_t i = i0; i < min(i0 + 4, n); ++i) elementwise_one(x, r, pay, i, codec, seed, flags);
      continue;
    }
    float v[4];
    Vec<4>::load(x + i0, v);
    if (r != nullptr) {
      float t[4];
      Vec<4>::load(r + i0, t);
      for (int e = 0; e < 4; ++e) v[e] = v[e] + t[e];
    }
    uint32_t bad = 0, ovf = 0;
    uint32_t hb[4];
    float res[4];
    for (int e = 0; e < 4; ++e) {
      const uint32_t u = f2u(v[e]);
      bad |= (u & 0x7F800000u) == 0x7F800000u;
      if (codec == kNone) {
        res[e] = v[e] - v[e];
      } else {
        const uint32_t add = seed < 0 ? 0x7FFFu + ((u >> 16) & 1u)
                                      : (hash_index(static_cast<uint32_t>(seed), i0 + e) & 0xFFFFu);
        hb[e] = (u + add) >> 16;
        ovf |= (hb[e] & 0x7F80u) == 0x7F80u;
        res[e] = v[e] - u2f(hb[e] << 16);
      }
    }
    if (bad) {
      atomicOr(&flags[0], 1);
      continue;
    }
    if (ovf) {
      atomicOr(&flags[1], 1);
      continue;
    }
    if (codec == kNone) {
      Vec<4>::store(reinterpret_cast<float*>(pay) + i0, v);
    } else {
      const uint2 w = make_uint2(hb[0] | (hb[1] << 16), hb[2] | (hb[3] << 16));
      *reinterpret_cast<uint2*>(pay + 2 * i0) = w;
    }
    if (r != nullptr) Vec<4>::store(r + i0, res);
  }
}

// ----------------------------------------------------------------------------- decode

// flags[0]: kBadValue / kBadScale; flags[1]: bad padding nibble. The decode kernel reads them
// and leaves `out` untouched when any is set, so the host waits only once.
__global__ void validate_kernel(const uint8_t* __restrict__ pay, int64_t n, int64_t nb,
                                int64_t total, int64_t codec, bool fp16, bool pay_aligned,
                                bool pay_vec, int* __restrict__ flags) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t t0 = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (codec == kNone || codec == kBf16) {
    int64_t i_begin = 0;  // first value for the loop below
    if (pay_vec) {  // 16-byte aligned payload: 16 bytes (4 fp32 or 8 bf16 values) a thread
      const int64_t nvec = n * (codec == kNone ? 4 : 2) / 16;
      const uint4* p4 = reinterpret_cast<const uint4*>(pay);
      for (int64_t v = t0; v < nvec; v += stride) {
        const uint4 w = p4[v];
        const uint32_t e = codec == kNone ? 0x7F800000u : 0x7F807F80u;
        bool bad = false;
        if (codec == kNone) {
          bad = (w.x & e) == e || (w.y & e) == e || (w.z & e) == e || (w.w & e) == e;
        } else {
          const uint32_t ws[4] = {w.x, w.y, w.z, w.w};
          for (int c = 0; c < 4; ++c)
            bad = bad || (ws[c] & 0x7F80u) == 0x7F80u || (ws[c] & 0x7F800000u) == 0x7F800000u;
        }
        if (bad) atomicOr(&flags[0], kBadValue);
      }
      i_begin = nvec * (codec == kNone ? 4 : 8);
    }
    for (int64_t i = i_begin + t0; i < n; i += stride) {
      bool bad;
      if (pay_aligned && codec == kNone) {
        bad = (f2u(reinterpret_cast<const float*>(pay)[i]) & 0x7F800000u) == 0x7F800000u;
      } else if (pay_aligned) {
        bad = (reinterpret_cast<const uint16_t*>(pay)[i] & 0x7F80u) == 0x7F80u;
      } else {  // a payload view at any byte offset: byte loads (little-endian)
        const int w = codec == kNone ? 4 : 2;
        uint32_t u = 0;
        for (int c = 0; c < w; ++c) u |= static_cast<uint32_t>(pay[w * i + c]) << (8 * c);
        bad = codec == kNone ? (u & 0x7F800000u) == 0x7F800000u : (u & 0x7F80u) == 0x7F80u;
      }
      if (bad) atomicOr(&flags[0], kBadValue);
    }
    return;
  }
  if (t0 == 0 && (codec == kInt4 || codec == kFp4) && (n & 1) && (pay[total - 1] & 0xF))
    atomicOr(&flags[1], 1);
  const float cmax = cmax_of(codec);
  for (int64_t b = t0; b < nb; b += stride) {
    bool bad;
    if (fp16) {
      const uint16_t h = static_cast<uint16_t>(pay[2 * b] | (pay[2 * b + 1] << 8));
      bad = (h & 0x8000u) || (h & 0x7C00u) == 0x7C00u;
    } else {
      const uint32_t u = f2u(load_scale(pay, b, false));
      bad = (u & 0x80000000u) || (u & 0x7F800000u) == 0x7F800000u;
    }
    if (!bad && !(load_scale(pay, b, fp16) * cmax <= FLT_MAX)) bad = true;
    if (bad) atomicOr(&flags[0], kBadScale);
  }
}

__device__ __forceinline__ float decode_one(const uint8_t* __restrict__ pay, int64_t i,
                                            int64_t block, int64_t codes_off, int64_t codec,
                                            bool fp16) {
  if (codec == kNone || codec == kBf16) {  // byte loads: the payload may be unaligned here
    const int w = codec == kNone ? 4 : 2;
    uint32_t u = 0;
    for (int c = 0; c < w; ++c) u |= static_cast<uint32_t>(pay[w * i + c]) << (8 * c);
    return u2f(codec == kNone ? u : u << 16);
  }
  const float s = load_scale(pay, i / block, fp16);
  if (codec == kInt8) return static_cast<float>(static_cast<int8_t>(pay[codes_off + i])) * s;
  const uint8_t byte = pay[codes_off + i / 2];
  const int c = (i & 1) ? (byte & 0xF) : (byte >> 4);
  if (codec == kInt4) return static_cast<float>(c >= 8 ? c - 16 : c) * s;
  const float g = fp4_mag(c & 7);
  return ((c & 8) ? -g : g) * s;
}

// out (+)= decode(payload). Each thread takes chunks of 4 values: with `vec` (block % 4 == 0,
// out 16-byte aligned, codes aligned to their load) one scale, one code load and one float4
// load/store per chunk; else one value at a time. Returns at once when validation failed.
template <bool ACC>
__global__ void dequantize_kernel(const uint8_t* __restrict__ pay, float* __restrict__ out,
                                  int64_t n, int64_t block, int64_t codes_off, int64_t codec,
                                  bool fp16, bool vec, const int* __restrict__ flags) {
  if (flags[0] != 0 || flags[1] != 0) return;
  const int64_t chunks = (n + 3) / 4;
  for (int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; c < chunks;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i0 = 4 * c;
    if (!vec || i0 + 4 > n) {
      for (int64_t i = i0; i < min(i0 + 4, n); ++i) {
        const float d = decode_one(pay, i, block, codes_off, codec, fp16);
        out[i] = ACC ? out[i] + d : d;
      }
      continue;
    }
    float d[4];
    if (codec == kNone) {
      Vec<4>::load(reinterpret_cast<const float*>(pay) + i0, d);
    } else if (codec == kBf16) {
      const uint2 w = *reinterpret_cast<const uint2*>(pay + 2 * i0);
      d[0] = u2f(w.x << 16);
      d[1] = u2f(w.x & 0xFFFF0000u);
      d[2] = u2f(w.y << 16);
      d[3] = u2f(w.y & 0xFFFF0000u);
    } else {
      const float s = load_scale(pay, i0 / block, fp16);
      if (codec == kInt8) {
        const uint32_t w = *reinterpret_cast<const uint32_t*>(pay + codes_off + i0);
        for (int e = 0; e < 4; ++e)
          d[e] = static_cast<float>(static_cast<int8_t>((w >> (8 * e)) & 0xFFu)) * s;
      } else {
        const uint16_t w = *reinterpret_cast<const uint16_t*>(pay + codes_off + i0 / 2);
        const int cs[4] = {(w >> 4) & 0xF, w & 0xF, (w >> 12) & 0xF, (w >> 8) & 0xF};
        for (int e = 0; e < 4; ++e) {
          if (codec == kInt4) {
            d[e] = static_cast<float>(cs[e] >= 8 ? cs[e] - 16 : cs[e]) * s;
          } else {
            const float g = fp4_mag(cs[e] & 7);
            d[e] = ((cs[e] & 8) ? -g : g) * s;
          }
        }
      }
    }
    if (ACC) {
      float o[4];
      Vec<4>::load(out + i0, o);
      for (int e = 0; e < 4; ++e) d[e] = o[e] + d[e];
    }
    Vec<4>::store(out + i0, d);
  }
}

// ----------------------------------------------------------------------------- sparse
// One thread block per chunk (grid-stride over chunks): (1) v = x (+ r), written back to r,
// and max |v|; (2) the kb-th largest |v| bits T by a 4-pass radix select (8-bit digits, a shared
// histogram, the digit found by one warp's scan); (3) the selected indices in ascending order:
// every |v| > T and the first (lowest-index) ties == T, by an ordered compaction over contiguous
// per-thread segments; (4) scales, codes and residual; (5) the record's bit fields, one byte a
// thread. Same selection, rounding and layout as sparse_* in compress_kernels.inc.

constexpr int kSparseThreads = 256;

// Largest fp16 value <= s for finite s >= 0 (at most 65504); same as half_floor in compress.cpp.
__device__ __forceinline__ uint16_t half_floor(float s) {
  uint16_t h = half_ceil(s);
  if (h > 0x7BFFu || half_to_float(h) > s) --h;
  return h;
}

// Max over the thread block (blockDim.x a multiple of 32); every thread gets it. red: >= 32.
__device__ __forceinline__ uint32_t block_max(uint32_t v, uint32_t* red) {
  for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xFFFFFFFFu, v, o));
  __syncthreads();  // red may still be read by a previous call
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
  __syncthreads();
  uint32_t out = 0;
  for (int w = 0; w < static_cast<int>(blockDim.x >> 5); ++w) out = max(out, red[w]);
  return out;
}

// Exclusive prefix sum of v in thread order; *total = the block's sum. red: >= 32.
__device__ __forceinline__ int32_t block_exclusive_scan(int32_t v, int32_t* red, int32_t* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int32_t incl = v;
  for (int o = 1; o < 32; o <<= 1) {
    const int32_t t = __shfl_up_sync(0xFFFFFFFFu, incl, o);
    if (lane >= o) incl += t;
  }
  __syncthreads();  // red may still be read by a previous call
  if (lane == 31) red[warp] = incl;
  __syncthreads();
  int32_t before = 0, sum = 0;
  for (int w = 0; w < static_cast<int>(blockDim.x >> 5); ++w) {
    before += w < warp ? red[w] : 0;
    sum += red[w];
  }
  *total = sum;
  return before + incl - v;
}

// The kb-th largest of the chunk's |v| bits; *want = how many values equal to it are selected
// (the lowest-index ones). Called by the whole block.
__device__ uint32_t sparse_radix_select(const float* v, int64_t len, int64_t kb, uint32_t* hist,
                                        uint32_t* s_digit, uint32_t* s_above, int32_t* want) {
  uint32_t prefix = 0, pmask = 0;
  uint32_t need = static_cast<uint32_t>(kb);  // <= the count of values matching prefix
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0;
    __syncthreads();
    for (int64_t j = threadIdx.x; j < len; j += blockDim.x) {
      const uint32_t a = f2u(v[j]) & 0x7FFFFFFFu;
      if ((a & pmask) == prefix) atomicAdd(&hist[(a >> shift) & 0xFFu], 1u);
    }
    __syncthreads();
    if (threadIdx.x < 32) {  // lane l: bins 255 - 8l down to 248 - 8l
      const int lane = threadIdx.x;
      uint32_t c[8], sum = 0;
      for (int i = 0; i < 8; ++i) {
        c[i] = hist[255 - 8 * lane - i];
        sum += c[i];
      }
      uint32_t incl = sum;
      for (int o = 1; o < 32; o <<= 1) {
        const uint32_t t = __shfl_up_sync(0xFFFFFFFFu, incl, o);
        if (lane >= o) incl += t;
      }
      uint32_t acc = incl - sum;  // values in higher bins
      if (acc < need && need <= incl) {  // exactly one lane
        for (int i = 0; i < 8; ++i) {
          if (acc + c[i] >= need) {
            *s_digit = static_cast<uint32_t>(255 - 8 * lane - i);
            *s_above = acc;
            break;
          }
          acc += c[i];
        }
      }
    }
    __syncthreads();
    prefix |= *s_digit << shift;
    pmask |= 0xFFu << shift;
    need -= *s_above;
  }
  *want = static_cast<int32_t>(need);
  return prefix;
}

// The selected indices of a chunk, ascending, into sel[0, kb): |v| > T, then the first `want`
// values equal to T. Threads own contiguous segments so that the order is the index order.
__device__ void sparse_compact(const float* v, int64_t len, uint32_t T, int32_t want,
                               int32_t* red, int32_t* sel) {
  const int64_t seg = (len + blockDim.x - 1) / blockDim.x;
  const int64_t j0 = min(static_cast<int64_t>(threadIdx.x) * seg, len), j1 = min(j0 + seg, len);
  int32_t gt = 0, eq = 0;
  for (int64_t j = j0; j < j1; ++j) {
    const uint32_t a = f2u(v[j]) & 0x7FFFFFFFu;
    gt += a > T ? 1 : 0;
    eq += a == T ? 1 : 0;
  }
  int32_t total;
  const int32_t eq_before = block_exclusive_scan(eq, red, &total);
  const int32_t take = min(max(want - eq_before, 0), eq);
  int32_t pos = block_exclusive_scan(gt + take, red, &total);
  int32_t eq_seen = eq_before;
  for (int64_t j = j0; j < j1; ++j) {
    const uint32_t a = f2u(v[j]) & 0x7FFFFFFFu;
    bool s = a > T;
    if (a == T) s = eq_seen++ < want;
    if (s) sel[pos++] = static_cast<int32_t>(j);
  }
}

// Byte t of a region of kb fields of w bits (LSB first), the fields being (sel[e] >> sh) & mask.
__device__ __forceinline__ uint8_t field_byte(const int32_t* sel, int64_t kb, int64_t w, int sh,
                                              int64_t t) {
  const uint32_t mask = (1u << w) - 1u;
  uint32_t byte = 0;
  const int64_t e1 = min((8 * t + 7) / w, kb - 1);
  for (int64_t e = (8 * t) / w; e <= e1; ++e) {
    const uint32_t f = (static_cast<uint32_t>(sel[e]) >> sh) & mask;
    const int64_t d = e * w - 8 * t;  // the field's first bit, relative to the byte's
    byte |= d >= 0 ? f << d : f >> -d;
  }
  return static_cast<uint8_t>(byte & 0xFFu);
}

// Field e (w <= 16 bits, LSB first) of a region; reads only the bytes that hold it.
__device__ __forceinline__ uint32_t get_field(const uint8_t* p, int64_t e, int64_t w) {
  const int64_t bit = e * w;
  const int sh = static_cast<int>(bit & 7);
  const int nbytes = (sh + static_cast<int>(w) + 7) >> 3;
  uint32_t word = 0;
  for (int i = 0; i < nbytes; ++i) word |= static_cast<uint32_t>(p[(bit >> 3) + i]) << (8 * i);
  return (word >> sh) & ((1u << w) - 1u);
}

// Writes the chunk's scales (thread 0); returns the fp32 values used for coding, or false when
// hi overflows fp16 (flags[1] set, nothing written).
__device__ __forceinline__ bool sparse_scales(uint32_t lo_bits, uint32_t hi_bits, bool fp16,
                                              uint8_t* rec, float* lo, float* hi) {
  *lo = u2f(lo_bits);
  *hi = u2f(hi_bits);
  uint32_t w[2] = {lo_bits, hi_bits};
  int nb = 4;
  if (fp16) {
    const uint16_t l16 = half_floor(*lo), h16 = half_ceil(*hi);
    if ((h16 & 0x7C00u) == 0x7C00u) return false;
    *lo = half_to_float(l16);
    *hi = half_to_float(h16);
    w[0] = l16;
    w[1] = h16;
    nb = 2;
  }
  for (int s = 0; s < 2; ++s)
    for (int c = 0; c < nb; ++c) rec[s * nb + c] = static_cast<uint8_t>(w[s] >> (8 * c));
  return true;
}

// Codes and residual of the selected values; sel[c] becomes j | code << 16.
__device__ void sparse_codes(const float* v, float* r, int32_t* sel, int64_t kb, float lo,
                             float hi, int64_t bits, int64_t seed, int64_t base) {
  const int64_t levels = int64_t{1} << (bits - 1);
  const float top = static_cast<float>(levels - 1);
  const float w = (hi - lo) / (static_cast<float>(levels) - 0.5f);
  for (int64_t c = threadIdx.x; c < kb; c += blockDim.x) {
    const int32_t j = sel[c];
    const float x = v[j];
    const float y = clampf(w > 0.0f ? (fabsf(x) - lo) / w : 0.0f, 0.0f, top);
    float m;
    if (seed < 0) {
      m = rne_small(y);
    } else {
      m = floor_small(y + uniform24(static_cast<uint32_t>(seed), base + j));
      m = m > top ? top : m;
    }
    const float mag = sparse_level(lo, hi, w, m, levels);
    const bool neg = x < 0.0f;
    if (r != nullptr) r[j] = x - (neg ? -mag : mag);
    const int32_t code = (neg ? 1 << (bits - 1) : 0) | static_cast<int32_t>(m);
    sel[c] = j | (code << 16);
  }
}

// flags[0]: a non-finite chunk, flags[1]: an fp16 overflow. sel: kb ints per thread block.
__global__ void __launch_bounds__(kSparseThreads)
    sparse_quantize_kernel(const float* __restrict__ x, float* __restrict__ r,
                           uint8_t* __restrict__ pay, Layout L, bool fp16, int64_t seed,
                           int32_t* __restrict__ scratch, int* __restrict__ flags) {
  __shared__ uint32_t hist[256];
  __shared__ uint32_t red[32];
  __shared__ uint32_t s_digit, s_above;
  __shared__ float s_lo, s_hi;
  __shared__ int s_ok;
  int32_t* sel = scratch + static_cast<int64_t>(blockIdx.x) * L.k;
  for (int64_t b = blockIdx.x; b < L.nb; b += gridDim.x) {
    const int64_t base = b * L.block;
    const SparseRec R = sparse_rec(min(L.block, L.n - base), L.k, L.ib, L.bits, L.ss);
    uint32_t m = 0;
    for (int64_t j = threadIdx.x; j < R.len; j += blockDim.x) {
      float t = x[base + j];
      if (r != nullptr) {
        t = t + r[base + j];
        r[base + j] = t;  // the residual of every value not sent
      }
      m = max(m, f2u(t) & 0x7FFFFFFFu);
    }
    const uint32_t amax = block_max(m, red);  // syncs: r's new values are visible to the block
    if (amax >= 0x7F800000u) {  // NaN or Inf; the caller resets the residual
      if (threadIdx.x == 0) atomicOr(&flags[0], 1);
      continue;
    }
    const float* v = r != nullptr ? r + base : x + base;
    int32_t want;
    const uint32_t T = sparse_radix_select(v, R.len, R.kb, hist, &s_digit, &s_above, &want);
    sparse_compact(v, R.len, T, want, reinterpret_cast<int32_t*>(red), sel);
    uint8_t* rec = pay + b * L.rec;
    if (threadIdx.x == 0) {
      float lo, hi;
      s_ok = sparse_scales(T, amax, fp16, rec, &lo, &hi) ? 1 : 0;
      if (!s_ok) atomicOr(&flags[1], 1);
      s_lo = lo;
      s_hi = hi;
    }
    __syncthreads();  // sel complete, scales known
    if (!s_ok) continue;
    sparse_codes(v, r != nullptr ? r + base : nullptr, sel, R.kb, s_lo, s_hi, L.bits, seed, base);
    __syncthreads();
    uint8_t* idx = rec + 2 * L.ss;
    for (int64_t t = threadIdx.x; t < R.ibytes; t += blockDim.x)
      idx[t] = field_byte(sel, R.kb, L.ib, 0, t);
    for (int64_t t = threadIdx.x; t < R.cbytes; t += blockDim.x)
      idx[R.ibytes + t] = field_byte(sel, R.kb, L.bits, 16, t);
    __syncthreads();  // sel and the shared values are reused by the next chunk
  }
}

// One thread per chunk: flags[0] |= 1 bad scale, 2 bad padding, 4 bad index (the host applies
// the precedence of validate_sparse in compress.cpp).
__global__ void sparse_validate_kernel(const uint8_t* __restrict__ pay, Layout L, bool fp16,
                                       int* __restrict__ flags) {
  for (int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; b < L.nb;
       b += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const SparseRec R =
        sparse_rec(min(L.block, L.n - b * L.block), L.k, L.ib, L.bits, L.ss);
    const uint8_t* rec = pay + b * L.rec;
    bool bad_scale = false;
    for (int s = 0; s < 2; ++s) {
      uint32_t u;
      if (fp16) {
        u = static_cast<uint32_t>(rec[2 * s] | (rec[2 * s + 1] << 8));
        bad_scale = bad_scale || (u & 0x8000u) || (u & 0x7C00u) == 0x7C00u;
      } else {
        u = f2u(load_scale(rec, s, false));
        bad_scale = bad_scale || (u & 0x80000000u) || (u & 0x7F800000u) == 0x7F800000u;
      }
    }
    if (bad_scale || !(load_scale(rec, 0, fp16) <= load_scale(rec, 1, fp16))) {
      atomicOr(&flags[0], 1);
      continue;
    }
    const uint8_t* idx = rec + 2 * L.ss;
    const int64_t ui = (R.kb * L.ib) & 7, uc = (R.kb * L.bits) & 7;
    if ((ui && (idx[R.ibytes - 1] >> ui)) || (uc && (idx[R.ibytes + R.cbytes - 1] >> uc)))
      atomicOr(&flags[0], 2);
    int64_t prev = -1;
    for (int64_t c = 0; c < R.kb; ++c) {
      const int64_t j = get_field(idx, c, L.ib);
      if (j <= prev || j >= R.len) {
        atomicOr(&flags[0], 4);
        break;
      }
      prev = j;
    }
  }
}

// out (+)= decode, one thread block per chunk; returns at once when validation failed.
template <bool ACC>
__global__ void sparse_dequantize_kernel(const uint8_t* __restrict__ pay, float* __restrict__ out,
                                         Layout L, bool fp16, const int* __restrict__ flags) {
  if (flags[0] != 0) return;
  const int64_t levels = int64_t{1} << (L.bits - 1);
  for (int64_t b = blockIdx.x; b < L.nb; b += gridDim.x) {
    const int64_t base = b * L.block;
    const SparseRec R = sparse_rec(min(L.block, L.n - base), L.k, L.ib, L.bits, L.ss);
    const uint8_t* rec = pay + b * L.rec;
    const float lo = load_scale(rec, 0, fp16), hi = load_scale(rec, 1, fp16);
    const float w = (hi - lo) / (static_cast<float>(levels) - 0.5f);
    if (!ACC) {
      for (int64_t j = threadIdx.x; j < R.len; j += blockDim.x) out[base + j] = 0.0f;
      __syncthreads();
    }
    const uint8_t* idx = rec + 2 * L.ss;
    for (int64_t c = threadIdx.x; c < R.kb; c += blockDim.x) {
      const int64_t j = get_field(idx, c, L.ib);
      const uint32_t code = get_field(idx + R.ibytes, c, L.bits);
      const float m = static_cast<float>(code & static_cast<uint32_t>(levels - 1));
      const float mag = sparse_level(lo, hi, w, m, levels);
      const float d = (code >> (L.bits - 1)) ? -mag : mag;
      out[base + j] = ACC ? out[base + j] + d : d;
    }
  }
}

// ----------------------------------------------------------------------------- ternary
// Encode in two kernels: (1) one thread block per codec block (grid-stride): amax, then
// S = sum of u_j = floor(|v_j| / amax * 2^24) (int64, exact in any order), the threshold
// T = floor(7 S / (10 len)) (kept iff u_j > T, i.e. 10 u_j len > 7 S), the kept count K and their
// sum S_k, the scale fp32(S_k * 2^-24 * amax / K) (IEEE double), written by thread 0 with amax,
// T and the coding scale into scratch; (2) one thread per payload byte: its five values' trits
// and residual. Same arithmetic as quantize_ternary in compress_kernels.inc.

// Sum over the thread block (blockDim.x a multiple of 32); every thread gets it. red: >= 32.
__device__ __forceinline__ long long block_sum64(long long v, long long* red) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
  __syncthreads();  // red may still be read by a previous call
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
  __syncthreads();
  long long out = 0;
  for (int w = 0; w < static_cast<int>(blockDim.x >> 5); ++w) out += red[w];
  return out;
}

// u of value v in a block of max |v| amax > 0 (truncation is floor for u >= 0).
__device__ __forceinline__ int32_t ternary_u(float v, float amax) {
  return static_cast<int32_t>((fabsf(v) / amax) * 16777216.0f);
}

// Scratch per codec block: amax (float bits), T (INT32_MAX: nothing kept), coding scale (bits).
__global__ void __launch_bounds__(kThreads)
    ternary_scale_kernel(const float* __restrict__ x, const float* __restrict__ r,
                         uint8_t* __restrict__ pay, Layout L, bool fp16,
                         int32_t* __restrict__ scratch, int* __restrict__ flags) {
  __shared__ uint32_t red[32];
  __shared__ long long red64[32];
  for (int64_t b = blockIdx.x; b < L.nb; b += gridDim.x) {
    const int64_t base = b * L.block, len = min(L.block, L.n - base);
    uint32_t m = 0;
    for (int64_t j = threadIdx.x; j < len; j += blockDim.x) {
      const float v = r != nullptr ? x[base + j] + r[base + j] : x[base + j];
      m = max(m, f2u(v) & 0x7FFFFFFFu);
    }
    m = block_max(m, red);
    if (m >= 0x7F800000u) {  // NaN or Inf; the caller resets the residual
      if (threadIdx.x == 0) atomicOr(&flags[0], 1);
      continue;
    }
    const float amax = u2f(m);
    long long total = 0, kept = 0, sum = 0;
    int32_t t = INT32_MAX;
    if (amax > 0.0f) {
      for (int64_t j = threadIdx.x; j < len; j += blockDim.x)
        total += ternary_u(r != nullptr ? x[base + j] + r[base + j] : x[base + j], amax);
      total = block_sum64(total, red64);
      t = static_cast<int32_t>(7 * total / (10 * len));  // < 2^24
      for (int64_t j = threadIdx.x; j < len; j += blockDim.x) {
        const int32_t u =
            ternary_u(r != nullptr ? x[base + j] + r[base + j] : x[base + j], amax);
        kept += u > t ? 1 : 0;
        sum += u > t ? u : 0;
      }
      kept = block_sum64(kept, red64);
      sum = block_sum64(sum, red64);
    }
    if (threadIdx.x == 0) {
      float s = 0.0f;
      if (amax > 0.0f)  // kept >= 1: u = 2^24 at amax
        s = static_cast<float>(static_cast<double>(sum) * 0x1p-24 * static_cast<double>(amax) /
                               static_cast<double>(kept));
      if (fp16) {
        const uint16_t h = __half_as_ushort(__float2half_rn(s));
        if ((h & 0x7C00u) == 0x7C00u) atomicOr(&flags[1], 1);
        s = half_to_float(h);
        pay[2 * b] = static_cast<uint8_t>(h & 0xFF);
        pay[2 * b + 1] = static_cast<uint8_t>(h >> 8);
      } else {
        const uint32_t w = f2u(s);
        for (int c = 0; c < 4; ++c) pay[4 * b + c] = static_cast<uint8_t>(w >> (8 * c));
      }
      scratch[3 * b] = static_cast<int32_t>(f2u(amax));
      scratch[3 * b + 1] = t;
      scratch[3 * b + 2] = static_cast<int32_t>(f2u(s));
    }
  }
}

// One thread per payload byte; returns at once when the first kernel set a flag.
__global__ void ternary_codes_kernel(const float* __restrict__ x, float* __restrict__ r,
                                     uint8_t* __restrict__ pay, Layout L,
                                     const int32_t* __restrict__ scratch,
                                     const int* __restrict__ flags) {
  if (flags[0] != 0 || flags[1] != 0) return;
  const int64_t nbytes = L.total - L.codes_off;
  for (int64_t q = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; q < nbytes;
       q += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    uint32_t byte = 0, w = 1;
    for (int e = 0; e < 5; ++e, w *= 3) {
      const int64_t i = 5 * q + e;
      if (i >= L.n) break;
      const int64_t b = i / L.block;
      const float amax = u2f(static_cast<uint32_t>(scratch[3 * b]));
      const int32_t t = scratch[3 * b + 1];
      const float s = u2f(static_cast<uint32_t>(scratch[3 * b + 2]));
      const float v = r != nullptr ? x[i] + r[i] : x[i];
      const bool keep = amax > 0.0f && ternary_u(v, amax) > t;
      const bool neg = v < 0.0f;
      byte += keep ? (neg ? 2u : 1u) * w : 0u;
      if (r != nullptr) r[i] = v - (keep ? (neg ? -s : s) : 0.0f);
    }
    pay[L.codes_off + q] = static_cast<uint8_t>(byte);
  }
}

// flags[0] |= 1 a bad scale, 2 a byte above 242, 4 a non-zero trit past the last value.
__global__ void ternary_validate_kernel(const uint8_t* __restrict__ pay, Layout L, bool fp16,
                                        int* __restrict__ flags) {
  const int64_t nbytes = L.total - L.codes_off;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t t0 = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  for (int64_t b = t0; b < L.nb; b += stride) {
    bool bad;
    if (fp16) {
      const uint16_t h = static_cast<uint16_t>(pay[2 * b] | (pay[2 * b + 1] << 8));
      bad = (h & 0x8000u) || (h & 0x7C00u) == 0x7C00u;
    } else {
      const uint32_t u = f2u(load_scale(pay, b, false));
      bad = (u & 0x80000000u) || (u & 0x7F800000u) == 0x7F800000u;
    }
    if (bad) atomicOr(&flags[0], 1);
  }
  for (int64_t q = t0; q < nbytes; q += stride)
    if (pay[L.codes_off + q] > 242) atomicOr(&flags[0], 2);
  if (t0 == 0 && L.n % 5) {
    const int pow3[5] = {1, 3, 9, 27, 81};
    if (pay[L.total - 1] >= pow3[L.n % 5]) atomicOr(&flags[0], 4);
  }
}

// out (+)= decode, one thread per payload byte; returns at once when validation failed.
template <bool ACC>
__global__ void ternary_dequantize_kernel(const uint8_t* __restrict__ pay, float* __restrict__ out,
                                          Layout L, bool fp16, const int* __restrict__ flags) {
  if (flags[0] != 0) return;
  const int64_t nbytes = L.total - L.codes_off;
  for (int64_t q = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; q < nbytes;
       q += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    uint32_t byte = pay[L.codes_off + q];
    for (int e = 0; e < 5; ++e, byte /= 3) {
      const int64_t i = 5 * q + e;
      if (i >= L.n) break;
      const uint32_t d3 = byte % 3;
      const float s = load_scale(pay, i / L.block, fp16);
      const float d = d3 == 1 ? s : (d3 == 2 ? -s : 0.0f);
      out[i] = ACC ? out[i] + d : d;
    }
  }
}

int grid_for(int64_t work) {
  const int64_t blocks = (work + kThreads - 1) / kThreads;
  return static_cast<int>(blocks < 65535 * 8 ? (blocks > 0 ? blocks : 1) : 65535 * 8);
}

bool aligned(const void* p, int64_t a) { return reinterpret_cast<uintptr_t>(p) % a == 0; }

// ----------------------------------------------------------------------------- ops

void check_codec(int64_t codec, int64_t block, int64_t k) {
  TORCH_CHECK((codec >= kNone && codec <= kFp4) || codec == kSparse || codec == kTernary,
              "loco: codec id ", codec, " has no CUDA kernel (top-k and sign run on the host)");
  if (codec != kNone && codec != kBf16) {
    TORCH_CHECK(block >= 1, "loco: block must be >= 1");
    if (codec == kInt4 || codec == kFp4) TORCH_CHECK(block % 2 == 0, "loco: 4-bit block must be even");
  }
  if (codec == kSparse) {
    const int64_t kk = k & kSparseKMask, bits = k >> kSparseBitsShift;
    TORCH_CHECK(block <= 65536, "loco: sparse block must be <= 65536");
    TORCH_CHECK(k >= 0 && kk >= 1 && kk <= block, "loco: sparse k must be in [1, block]");
    TORCH_CHECK(bits >= 1 && bits <= 4, "loco: sparse bits must be in [1, 4]");
  }
}

// Sparse encode: one thread block per chunk, each with kb ints of scratch (at most 64 MiB).
void launch_sparse_quantize(const float* x, float* r, uint8_t* pay, const Layout& L, bool fp16,
                            int64_t seed, int* flags, const at::Tensor& like,
                            cudaStream_t stream) {
  const int64_t grid = std::min<int64_t>({L.nb, 8192, std::max<int64_t>(1, (int64_t{1} << 24) / L.k)});
  auto scratch = at::empty({grid * L.k}, like.options().dtype(at::kInt));
  sparse_quantize_kernel<<<static_cast<int>(grid), kSparseThreads, 0, stream>>>(
      x, r, pay, L, fp16, seed, scratch.data_ptr<int32_t>(), flags);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Sparse decode: validate every record, then decode (the second kernel returns at once on a
// flag, leaving out untouched). Returns the status, with validate_sparse's precedence.
int64_t sparse_dequantize(const uint8_t* pay, float* o, const Layout& L, bool fp16,
                          bool accumulate, const at::Tensor& like, cudaStream_t stream) {
  auto flags = at::zeros({2}, like.options().dtype(at::kInt));
  int* fl = flags.data_ptr<int>();
  sparse_validate_kernel<<<grid_for(L.nb), kThreads, 0, stream>>>(pay, L, fp16, fl);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int grid = static_cast<int>(std::min<int64_t>(L.nb, 65535 * 16));
  if (accumulate) {
    sparse_dequantize_kernel<true><<<grid, kSparseThreads, 0, stream>>>(pay, o, L, fp16, fl);
  } else {
    sparse_dequantize_kernel<false><<<grid, kSparseThreads, 0, stream>>>(pay, o, L, fp16, fl);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int f = flags.cpu().data_ptr<int>()[0];
  return (f & 1) ? kBadScale : ((f & 2) ? kBadPadding : ((f & 4) ? kBadIndex : kOk));
}

// Ternary encode: scales (one thread block per codec block), then bytes and residual.
void launch_ternary_quantize(const float* x, float* r, uint8_t* pay, const Layout& L, bool fp16,
                             int* flags, const at::Tensor& like, cudaStream_t stream) {
  auto scratch = at::empty({3 * L.nb}, like.options().dtype(at::kInt));
  int32_t* sc = scratch.data_ptr<int32_t>();
  const int grid = static_cast<int>(std::min<int64_t>(L.nb, 65535 * 16));
  ternary_scale_kernel<<<grid, kThreads, 0, stream>>>(x, r, pay, L, fp16, sc, flags);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  ternary_codes_kernel<<<grid_for(L.total - L.codes_off), kThreads, 0, stream>>>(x, r, pay, L, sc,
                                                                                flags);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Ternary decode: validate, then decode (returns at once on a flag, leaving out untouched).
// Returns the status, with validate_ternary's precedence.
int64_t ternary_dequantize(const uint8_t* pay, float* o, const Layout& L, bool fp16,
                           bool accumulate, const at::Tensor& like, cudaStream_t stream) {
  auto flags = at::zeros({2}, like.options().dtype(at::kInt));
  int* fl = flags.data_ptr<int>();
  const int64_t nbytes = L.total - L.codes_off;
  ternary_validate_kernel<<<grid_for(std::max(L.nb, nbytes)), kThreads, 0, stream>>>(pay, L, fp16,
                                                                                     fl);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (accumulate) {
    ternary_dequantize_kernel<true><<<grid_for(nbytes), kThreads, 0, stream>>>(pay, o, L, fp16, fl);
  } else {
    ternary_dequantize_kernel<false><<<grid_for(nbytes), kThreads, 0, stream>>>(pay, o, L, fp16, fl);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int f = flags.cpu().data_ptr<int>()[0];
  return (f & 1) ? kBadScale : ((f & 2) ? kBadTrit : ((f & 4) ? kBadPadding : kOk));
}

// Launches the warp-per-block kernel for blocks [0, nfull) when the block size and alignment
// allow it; returns false (nothing launched) otherwise.
bool launch_warp_quantize(const float* x, float* r, uint8_t* pay, const Layout& L, int64_t codec,
                          bool fp16, int64_t seed, int* flags, cudaStream_t stream) {
  const int64_t nfull = L.n / L.block;
  const int64_t vpt = L.block / 32;
  if (L.block % 32 != 0 || (vpt != 2 && vpt != 4 && vpt != 8 && vpt != 16 && vpt != 32))
    return false;
  const int64_t V = vpt >= 4 ? 4 : 2;
  const int64_t code_align = codec == kInt8 ? V : V / 2;
  if (!aligned(x, 4 * V) || (r != nullptr && !aligned(r, 4 * V)) ||
      !aligned(pay + L.codes_off, code_align))
    return false;
  if (nfull == 0) return true;
  const int64_t wpb = kThreads / 32;
  const int grid = static_cast<int>(std::min<int64_t>((nfull + wpb - 1) / wpb, 1 << 20));
#define LOCO_WARP_LAUNCH(VPT)                                                        \
  quantize_warp_kernel<VPT><<<grid, kThreads, 0, stream>>>(x, r, pay, nfull, L.codes_off, \
                                                           codec, fp16, seed, flags)
  switch (vpt) {
    case 2: LOCO_WARP_LAUNCH(2); break;
    case 4: LOCO_WARP_LAUNCH(4); break;
    case 8: LOCO_WARP_LAUNCH(8); break;
    case 16: LOCO_WARP_LAUNCH(16); break;
    default: LOCO_WARP_LAUNCH(32); break;
  }
#undef LOCO_WARP_LAUNCH
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

int64_t quantize_cuda(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                      at::Tensor& payload, int64_t codec, int64_t block, int64_t k, bool fp16,
                      int64_t seed) {
  check_codec(codec, block, k);
  TORCH_CHECK(x.is_cuda() && payload.is_cuda() && x.device() == payload.device(),
              "loco: x and payload must be on the same CUDA device");
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous(), "loco: x must be contiguous fp32");
  TORCH_CHECK(payload.scalar_type() == at::kByte && payload.is_contiguous(),
              "loco: payload must be contiguous uint8");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.numel();
  const Layout L = make_layout(n, codec, block, k, fp16);
  TORCH_CHECK(payload.numel() == L.total, "loco: payload has ", payload.numel(), " bytes, needs ",
              L.total);
  float* r = nullptr;
  if (residual.has_value() && residual->defined()) {
    TORCH_CHECK(residual->is_cuda() && residual->device() == x.device() &&
                    residual->scalar_type() == at::kFloat && residual->is_contiguous() &&
                    residual->numel() == n,
                "loco: residual must be contiguous fp32 on x's device with x.numel() elements");
    r = residual->data_ptr<float>();
  }
  if (n == 0) return kOk;
  auto flags = at::zeros({2}, x.options().dtype(at::kInt));
  int* fl = flags.data_ptr<int>();
  auto stream = c10::cuda::getCurrentCUDAStream();
  const float* xp = x.data_ptr<float>();
  uint8_t* pay = payload.data_ptr<uint8_t>();
  if (codec == kSparse) {
    launch_sparse_quantize(xp, r, pay, L, fp16, seed, fl, x, stream);
  } else if (codec == kTernary) {
    launch_ternary_quantize(xp, r, pay, L, fp16, fl, x, stream);
  } else if (codec == kNone || codec == kBf16) {
    TORCH_CHECK(aligned(pay, codec == kNone ? 4 : 2), "loco: payload must be aligned");
    const bool vec = aligned(xp, 16) && (r == nullptr || aligned(r, 16)) &&
                     aligned(pay, codec == kNone ? 16 : 8);
    quantize_elementwise_kernel<<<grid_for((n + 3) / 4), kThreads, 0, stream>>>(
        xp, r, pay, n, codec, seed, vec, fl);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    int64_t b_begin = 0;
    if (launch_warp_quantize(xp, r, pay, L, codec, fp16, seed, fl, stream)) b_begin = n / block;
    if (b_begin < L.nb) {  // every block (general path) or the last, partial one
      const int64_t todo = L.nb - b_begin;
      const int grid = static_cast<int>(todo < 65535 * 16 ? todo : 65535 * 16);
      quantize_blocks_kernel<<<grid, kThreads, 0, stream>>>(xp, r, pay, n, block, b_begin, L.nb,
                                                            L.codes_off, codec, fp16, seed, fl);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
  const auto h = flags.cpu();
  const int* f = h.data_ptr<int>();
  return f[0] ? kNonFinite : (f[1] ? kOverflow : kOk);
}

int64_t dequantize_cuda(const at::Tensor& payload, at::Tensor& out, int64_t codec, int64_t block,
                        int64_t k, bool fp16, bool accumulate) {
  check_codec(codec, block, k);
  TORCH_CHECK(out.is_cuda() && payload.is_cuda() && out.device() == payload.device(),
              "loco: out and payload must be on the same CUDA device");
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous(),
              "loco: out must be contiguous fp32");
  TORCH_CHECK(payload.scalar_type() == at::kByte && payload.is_contiguous(),
              "loco: payload must be contiguous uint8");
  const c10::cuda::CUDAGuard guard(out.device());
  const int64_t n = out.numel();
  const Layout L = make_layout(n, codec, block, k, fp16);
  TORCH_CHECK(payload.numel() == L.total, "loco: payload has ", payload.numel(), " bytes, needs ",
              L.total);
  if (n == 0) return kOk;
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (codec == kSparse)
    return sparse_dequantize(payload.data_ptr<uint8_t>(), out.data_ptr<float>(), L, fp16,
                             accumulate, out, stream);
  if (codec == kTernary)
    return ternary_dequantize(payload.data_ptr<uint8_t>(), out.data_ptr<float>(), L, fp16,
                              accumulate, out, stream);
  auto flags = at::zeros({2}, out.options().dtype(at::kInt));
  int* fl = flags.data_ptr<int>();
  const uint8_t* pay = payload.data_ptr<uint8_t>();
  float* o = out.data_ptr<float>();
  const bool pay_aligned = aligned(pay, codec == kNone ? 4 : 2);
  const bool pay_vec = aligned(pay, 16);
  int64_t work = L.nb;
  if (codec == kNone || codec == kBf16) work = pay_vec ? (n + 3) / 4 : n;
  validate_kernel<<<grid_for(work), kThreads, 0, stream>>>(pay, n, L.nb, L.total, codec, fp16,
                                                           pay_aligned, pay_vec, fl);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  bool vec = aligned(o, 16);
  if (codec == kNone) vec = vec && aligned(pay, 16);
  if (codec == kBf16) vec = vec && aligned(pay, 8);
  if (codec == kInt8) vec = vec && block % 4 == 0 && aligned(pay + L.codes_off, 4);
  if (codec == kInt4 || codec == kFp4) vec = vec && block % 4 == 0 && aligned(pay + L.codes_off, 2);
  const int grid = grid_for((n + 3) / 4);
  if (accumulate) {
    dequantize_kernel<true><<<grid, kThreads, 0, stream>>>(pay, o, n, block, L.codes_off, codec,
                                                           fp16, vec, fl);
  } else {
    dequantize_kernel<false><<<grid, kThreads, 0, stream>>>(pay, o, n, block, L.codes_off, codec,
                                                            fp16, vec, fl);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const auto h = flags.cpu();
  const int* f = h.data_ptr<int>();
  return f[0] ? f[0] : (f[1] ? kBadPadding : kOk);
}

}  // namespace

TORCH_LIBRARY_IMPL(loco, CUDA, m) {
  m.impl("quantize", &quantize_cuda);
  m.impl("dequantize", &dequantize_cuda);
}

}  // namespace loco
