// CUDA kernels of the loco codecs (none, bf16, int8, int4, fp4), registered for the CUDA
// dispatch key of torch.ops.loco.quantize / dequantize. Same bits as the CPU kernels and the
// pure-torch reference (built with --fmad=false; IEEE division for 1 / s). top-k has no CUDA
// kernel: loco/compress routes it to the reference, which runs on the GPU with torch ops.
//
// Built only when torch has CUDA and nvcc exists (loco/compress/_ext.py).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
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

int grid_for(int64_t work) {
  const int64_t blocks = (work + kThreads - 1) / kThreads;
  return static_cast<int>(blocks < 65535 * 8 ? (blocks > 0 ? blocks : 1) : 65535 * 8);
}

bool aligned(const void* p, int64_t a) { return reinterpret_cast<uintptr_t>(p) % a == 0; }

// ----------------------------------------------------------------------------- ops

void check_codec(int64_t codec, int64_t block) {
  TORCH_CHECK(codec >= kNone && codec <= kFp4,
              "loco: codec id ", codec, " has no CUDA kernel (top-k runs the reference)");
  if (codec != kNone && codec != kBf16) {
    TORCH_CHECK(block >= 1, "loco: block must be >= 1");
    if (codec == kInt4 || codec == kFp4) TORCH_CHECK(block % 2 == 0, "loco: 4-bit block must be even");
  }
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
  check_codec(codec, block);
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
  if (codec == kNone || codec == kBf16) {
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
  check_codec(codec, block);
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
