// Fused NF4 / FP4 dequantisation for CPU tensors: one pass from bitsandbytes' packed bytes to
// the compute dtype. The generic tensor-op path (shift, stack, index_select, pad, multiply,
// cast) makes about ten full-size temporaries per weight, which made a 7B QLoRA step on CPU
// ~36x slower than bf16 LoRA; here each output value costs one table load and a store (the
// block's 16 possible values are scaled and rounded once per block), with nothing allocated
// but the output.
//
// Numerics equal the generic path bit for bit: `code[q] * absmax[block]` in fp32 (the same
// IEEE product), then one round-to-nearest-even cast through c10's own BFloat16 / Half
// constructors, which are what `Tensor::to` uses.
//
// Threads: `at::parallel_for`, i.e. the OpenMP pool ATen's own kernels use. This file is
// built with `-fopenmp` and linked against the wheel's `libgomp.so.1` (the one libtorch
// loads), so there is one OpenMP runtime: a thread pool of our own would compete with
// OpenMP workers that spin-wait after every ATen kernel, which took a third of the CPU.

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>

namespace {

#if defined(__x86_64__)
// 16-bit outputs (bf16 / fp16) with SSSE3: a block's 16 possible values are split into a
// table of low bytes and one of high bytes, and `pshufb` looks up 16 codes at a time in each,
// so 32 values cost about a dozen instructions instead of 32 scalar loads and stores.
// Full 16-byte groups only; the caller finishes any remainder with the scalar loop.
__attribute__((target("ssse3"))) void lookup16_ssse3(const uint16_t *lut, const uint8_t *packed,
                                                     int64_t bytes, uint16_t *out) {
  alignas(16) uint8_t lo_bytes[16];
  alignas(16) uint8_t hi_bytes[16];
  for (int k = 0; k < 16; ++k) {
    lo_bytes[k] = static_cast<uint8_t>(lut[k] & 0xFF);
    hi_bytes[k] = static_cast<uint8_t>(lut[k] >> 8);
  }
  const __m128i lut_lo = _mm_load_si128(reinterpret_cast<const __m128i *>(lo_bytes));
  const __m128i lut_hi = _mm_load_si128(reinterpret_cast<const __m128i *>(hi_bytes));
  const __m128i nibble = _mm_set1_epi8(0x0F);
  for (int64_t j = 0; j + 16 <= bytes; j += 16) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i *>(packed + j));
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), nibble);
    const __m128i lo = _mm_and_si128(b, nibble);
    // Element order: the high nibble of each byte comes first.
    const __m128i idx0 = _mm_unpacklo_epi8(hi, lo);
    const __m128i idx1 = _mm_unpackhi_epi8(hi, lo);
    const __m128i l0 = _mm_shuffle_epi8(lut_lo, idx0);
    const __m128i h0 = _mm_shuffle_epi8(lut_hi, idx0);
    const __m128i l1 = _mm_shuffle_epi8(lut_lo, idx1);
    const __m128i h1 = _mm_shuffle_epi8(lut_hi, idx1);
    __m128i *dst = reinterpret_cast<__m128i *>(out + 2 * j);
    _mm_storeu_si128(dst, _mm_unpacklo_epi8(l0, h0));
    _mm_storeu_si128(dst + 1, _mm_unpackhi_epi8(l0, h0));
    _mm_storeu_si128(dst + 2, _mm_unpacklo_epi8(l1, h1));
    _mm_storeu_si128(dst + 3, _mm_unpackhi_epi8(l1, h1));
  }
}

const bool kHaveSsse3 = __builtin_cpu_supports("ssse3");
#endif

template <typename T>
void dequant_blocks(const uint8_t *packed, const float *absmax, const float *code, int64_t n,
                    int64_t blocksize, T *out, int64_t b0, int64_t b1) {
  // The 16 values a block can take, already rounded to T: per element only a copy is left.
  T lut[16];
  for (int64_t b = b0; b < b1; ++b) {
    const float scale = absmax[b];
    for (int k = 0; k < 16; ++k) {
      lut[k] = static_cast<T>(code[k] * scale);
    }
    // Block sizes are even, so every block starts on a byte boundary.
    const int64_t start = b * blocksize;
    const int64_t end = std::min(n, start + blocksize);
    int64_t i = start;
#if defined(__x86_64__)
    if constexpr (sizeof(T) == 2) {
      if (kHaveSsse3) {
        const int64_t groups = (end - start) / 32;
        lookup16_ssse3(reinterpret_cast<const uint16_t *>(lut), packed + (start >> 1), groups * 16,
                       reinterpret_cast<uint16_t *>(out + start));
        i = start + groups * 32;
      }
    }
#endif
    for (; i + 1 < end; i += 2) {
      const uint8_t byte = packed[i >> 1];
      out[i] = lut[byte >> 4];
      out[i + 1] = lut[byte & 15];
    }
    if (i < end) {
      out[i] = lut[packed[i >> 1] >> 4];
    }
  }
}

template <typename T>
void dequant(const uint8_t *packed, const float *absmax, const float *code, int64_t n,
             int64_t blocksize, T *out) {
  const int64_t blocks = (n + blocksize - 1) / blocksize;
  // At least 2^16 values per task, so small weights stay on the calling thread.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / blocksize);
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    dequant_blocks<T>(packed, absmax, code, n, blocksize, out, b0, b1);
  });
}

} // namespace

extern "C" {
// `out_kind`: 0 = fp32, 1 = bf16, 2 = fp16. Pointers are to contiguous CPU buffers the caller
// validated: `packed` holds ceil(n/2) bytes, `absmax` ceil(n/blocksize) floats, `code` 16
// floats, `out` n values of `out_kind`. Returns 0, or 1 for an unknown kind or block size.
int lmms_dequant_4bit_cpu(const uint8_t *packed, const float *absmax, const float *code,
                          int64_t n, int64_t blocksize, int32_t out_kind, void *out) {
  if (blocksize <= 0 || blocksize % 2 != 0 || n < 0) {
    return 1;
  }
  switch (out_kind) {
  case 0:
    dequant(packed, absmax, code, n, blocksize, static_cast<float *>(out));
    return 0;
  case 1:
    dequant(packed, absmax, code, n, blocksize, static_cast<c10::BFloat16 *>(out));
    return 0;
  case 2:
    dequant(packed, absmax, code, n, blocksize, static_cast<c10::Half *>(out));
    return 0;
  default:
    return 1;
  }
}
}
