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

// One linear / fp4 code of value v with scale s > 0; returns the code (int8 value or fp4 bits)
// and writes the dequantized value to *deq.
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

// One thread block per codec block: pass 1 absmax (block reduce), pass 2 codes + residual.
__global__ void quantize_blocks_kernel(const float* __restrict__ x, float* __restrict__ r,
                                       uint8_t* __restrict__ pay, int64_t n, int64_t block,
                                       int64_t nb, int64_t codes_off, int64_t codec, bool fp16,
                                       int64_t seed, int* __restrict__ flags) {
  __shared__ uint32_t red[kThreads];
  __shared__ float s_shared;
  __shared__ int skip;
  const float qmax = qmax_of(codec);
  const float cmax = cmax_of(codec);
  for (int64_t b = blockIdx.x; b < nb; b += gridDim.x) {
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
        const float amax = u2f(mb);
        float s = amax / qmax;
        if (amax > 0.0f && s < FLT_MIN) s = FLT_MIN;  // so that 1 / s is finite
        if (fp16) {
          const uint16_t h = half_ceil(s);
          if ((h & 0x7C00u) == 0x7C00u) skip = 1;
          s = half_to_float(h);
          pay[2 * b] = static_cast<uint8_t>(h & 0xFF);
          pay[2 * b + 1] = static_cast<uint8_t>(h >> 8);
        } else {
          const uint32_t u = f2u(s);
          for (int c = 0; c < 4; ++c) pay[4 * b + c] = static_cast<uint8_t>(u >> (8 * c));
        }
        if (skip || !(s * cmax <= FLT_MAX)) {
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

__global__ void quantize_elementwise_kernel(const float* __restrict__ x, float* __restrict__ r,
                                            uint8_t* __restrict__ pay, int64_t n, int64_t codec,
                                            int64_t seed, int* __restrict__ flags) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float v = r != nullptr ? x[i] + r[i] : x[i];
    const uint32_t u = f2u(v);
    if ((u & 0x7F800000u) == 0x7F800000u) {
      atomicOr(&flags[0], 1);
      continue;
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
        continue;
      }
      reinterpret_cast<uint16_t*>(pay)[i] = static_cast<uint16_t>(hb);
      if (r != nullptr) r[i] = v - u2f(hb << 16);
    }
  }
}

// ----------------------------------------------------------------------------- decode

__global__ void validate_kernel(const uint8_t* __restrict__ pay, int64_t n, int64_t nb,
                                int64_t codec, bool fp16, int* __restrict__ flags) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t t0 = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (codec == kNone || codec == kBf16) {
    for (int64_t i = t0; i < n; i += stride) {
      bool bad;
      if (codec == kNone) {
        bad = (f2u(reinterpret_cast<const float*>(pay)[i]) & 0x7F800000u) == 0x7F800000u;
      } else {
        bad = (reinterpret_cast<const uint16_t*>(pay)[i] & 0x7F80u) == 0x7F80u;
      }
      if (bad) atomicOr(&flags[0], kBadValue);
    }
    return;
  }
  const float cmax = cmax_of(codec);
  for (int64_t b = t0; b < nb; b += stride) {
    bool bad;
    if (fp16) {
      const uint16_t h = static_cast<uint16_t>(pay[2 * b] | (pay[2 * b + 1] << 8));
      bad = (h & 0x8000u) || (h & 0x7C00u) == 0x7C00u;
    } else {
      const float s = load_scale(pay, b, false);
      const uint32_t u = f2u(s);
      bad = (u & 0x80000000u) || (u & 0x7F800000u) == 0x7F800000u;
    }
    if (!bad && !(load_scale(pay, b, fp16) * cmax <= FLT_MAX)) bad = true;
    if (bad) atomicOr(&flags[0], kBadScale);
  }
}

template <bool ACC>
__global__ void dequantize_kernel(const uint8_t* __restrict__ pay, float* __restrict__ out,
                                  int64_t n, int64_t block, int64_t codes_off, int64_t codec,
                                  bool fp16) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float d;
    if (codec == kNone) {
      d = reinterpret_cast<const float*>(pay)[i];
    } else if (codec == kBf16) {
      d = u2f(static_cast<uint32_t>(reinterpret_cast<const uint16_t*>(pay)[i]) << 16);
    } else {
      const float s = load_scale(pay, i / block, fp16);
      if (codec == kInt8) {
        d = static_cast<float>(static_cast<int8_t>(pay[codes_off + i])) * s;
      } else {
        const uint8_t byte = pay[codes_off + i / 2];
        const int c = (i & 1) ? (byte & 0xF) : (byte >> 4);
        if (codec == kInt4) {
          d = static_cast<float>(c >= 8 ? c - 16 : c) * s;
        } else {
          const float g = fp4_mag(c & 7);
          d = ((c & 8) ? -g : g) * s;
        }
      }
    }
    if (ACC) {
      out[i] += d;
    } else {
      out[i] = d;
    }
  }
}

int grid_for(int64_t work) {
  const int64_t blocks = (work + kThreads - 1) / kThreads;
  return static_cast<int>(blocks < 65535 * 8 ? (blocks > 0 ? blocks : 1) : 65535 * 8);
}

// ----------------------------------------------------------------------------- ops

int64_t quantize_cuda(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                      at::Tensor& payload, int64_t codec, int64_t block, int64_t k, bool fp16,
                      int64_t seed) {
  TORCH_CHECK(codec >= kNone && codec <= kFp4,
              "loco: codec id ", codec, " has no CUDA kernel (top-k runs the reference)");
  TORCH_CHECK(x.is_cuda() && payload.is_cuda() && x.device() == payload.device(),
              "loco: x and payload must be on the same CUDA device");
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous(), "loco: x must be contiguous fp32");
  TORCH_CHECK(payload.scalar_type() == at::kByte && payload.is_contiguous(),
              "loco: payload must be contiguous uint8");
  if (codec != kNone && codec != kBf16) {
    TORCH_CHECK(block >= 1, "loco: block must be >= 1");
    if (codec == kInt4 || codec == kFp4) TORCH_CHECK(block % 2 == 0, "loco: 4-bit block must be even");
  }
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
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (codec == kNone || codec == kBf16) {
    quantize_elementwise_kernel<<<grid_for(n), kThreads, 0, stream>>>(
        x.data_ptr<float>(), r, payload.data_ptr<uint8_t>(), n, codec, seed,
        flags.data_ptr<int>());
  } else {
    const int grid = static_cast<int>(L.nb < 65535 * 16 ? L.nb : 65535 * 16);
    quantize_blocks_kernel<<<grid, kThreads, 0, stream>>>(
        x.data_ptr<float>(), r, payload.data_ptr<uint8_t>(), n, block, L.nb, L.codes_off, codec,
        fp16, seed, flags.data_ptr<int>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const auto h = flags.cpu();
  const int* f = h.data_ptr<int>();
  return f[0] ? kNonFinite : (f[1] ? kOverflow : kOk);
}

int64_t dequantize_cuda(const at::Tensor& payload, at::Tensor& out, int64_t codec, int64_t block,
                        int64_t k, bool fp16, bool accumulate) {
  TORCH_CHECK(codec >= kNone && codec <= kFp4,
              "loco: codec id ", codec, " has no CUDA kernel (top-k runs the reference)");
  TORCH_CHECK(out.is_cuda() && payload.is_cuda() && out.device() == payload.device(),
              "loco: out and payload must be on the same CUDA device");
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous(),
              "loco: out must be contiguous fp32");
  TORCH_CHECK(payload.scalar_type() == at::kByte && payload.is_contiguous(),
              "loco: payload must be contiguous uint8");
  if (codec != kNone && codec != kBf16) {
    TORCH_CHECK(block >= 1, "loco: block must be >= 1");
    if (codec == kInt4 || codec == kFp4) TORCH_CHECK(block % 2 == 0, "loco: 4-bit block must be even");
  }
  const c10::cuda::CUDAGuard guard(out.device());
  const int64_t n = out.numel();
  const Layout L = make_layout(n, codec, block, k, fp16);
  TORCH_CHECK(payload.numel() == L.total, "loco: payload has ", payload.numel(), " bytes, needs ",
              L.total);
  if (n == 0) return kOk;
  auto stream = c10::cuda::getCurrentCUDAStream();
  auto flags = at::zeros({1}, out.options().dtype(at::kInt));
  const int64_t work = (codec == kNone || codec == kBf16) ? n : L.nb;
  validate_kernel<<<grid_for(work), kThreads, 0, stream>>>(payload.data_ptr<uint8_t>(), n, L.nb,
                                                          codec, fp16, flags.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  int status = flags.cpu().data_ptr<int>()[0];
  if (status == 0 && (codec == kInt4 || codec == kFp4) && (n & 1)) {
    const uint8_t last = payload[L.total - 1].item<uint8_t>();
    if (last & 0xF) status = kBadPadding;
  }
  if (status != 0) return status;
  if (accumulate) {
    dequantize_kernel<true><<<grid_for(n), kThreads, 0, stream>>>(
        payload.data_ptr<uint8_t>(), out.data_ptr<float>(), n, block, L.codes_off, codec, fp16);
  } else {
    dequantize_kernel<false><<<grid_for(n), kThreads, 0, stream>>>(
        payload.data_ptr<uint8_t>(), out.data_ptr<float>(), n, block, L.codes_off, codec, fp16);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return kOk;
}

}  // namespace

TORCH_LIBRARY_IMPL(loco, CUDA, m) {
  m.impl("quantize", &quantize_cuda);
  m.impl("dequantize", &dequantize_cuda);
}

}  // namespace loco
