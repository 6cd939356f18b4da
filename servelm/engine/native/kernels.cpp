// GGUF block kernels for the CPU: dequantization and matrix products on the blocks exactly as a GGUF
// file stores them, behind a plain C ABI (loaded through ctypes, so the library does not depend on
// torch's C++ ABI and one build serves every torch version).
//
// Matrix products follow llama.cpp's scheme: each activation row is quantized once to 8-bit blocks
// (Q8_0 for Q4_0/Q5_0/Q8_0 weights, the same plus the block sum for Q4_1/Q5_1, Q8_K with 16-element sums
// for the K-quants), then every block is an integer dot product scaled in float. The result of output
// (i, j) is computed by one thread with one fixed sequence of operations whatever the number of rows
// or threads, so a row of a batched product equals the same row computed alone, bitwise.
//
// The file is compiled twice: with -mavx2 -mfma -mf16c (the fast paths under __AVX2__) and without
// (portable scalar code); the Python side picks the variant the CPU runs. It is compiled with
// -ffp-contract=off so that dequantization rounds as numpy does (gguf.quants.dequantize), one operation
// at a time; the fast paths call fused multiply-adds explicitly.
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

// ggml type ids (gguf.GGMLQuantizationType)
enum : int {
  T_F32 = 0, T_F16 = 1, T_Q4_0 = 2, T_Q4_1 = 3, T_Q5_0 = 6, T_Q5_1 = 7, T_Q8_0 = 8,
  T_Q4_K = 12, T_Q5_K = 13, T_Q6_K = 14, T_BF16 = 30,
};

constexpr int QK = 32;
constexpr int QKK = 256;

// ---------------------------------------------------------------------------------------------- fp16
inline float fp16_to_fp32(uint16_t h) {
#if defined(__F16C__)
  return _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h)));
#else
  const uint32_t sign = (uint32_t)(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      exp = 127 - 15 + 1;
      while (!(man & 0x400)) { man <<= 1; exp--; }
      man &= 0x3ff;
      bits = sign | (exp << 23) | (man << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000 | (man << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
#endif
}

inline uint16_t rd16(const uint8_t* p) { uint16_t v; std::memcpy(&v, p, 2); return v; }
inline float rdh(const uint8_t* p) { return fp16_to_fp32(rd16(p)); }
inline float bf16_to_fp32(uint16_t b) { uint32_t u = (uint32_t)b << 16; float f; std::memcpy(&f, &u, 4); return f; }

// ---------------------------------------------------------------------------------------- type table
struct TypeInfo { int block; int bytes; };
inline bool type_info(int t, TypeInfo* ti) {
  switch (t) {
    case T_F32: *ti = {1, 4}; return true;
    case T_F16: *ti = {1, 2}; return true;
    case T_BF16: *ti = {1, 2}; return true;
    case T_Q4_0: *ti = {32, 18}; return true;
    case T_Q4_1: *ti = {32, 20}; return true;
    case T_Q5_0: *ti = {32, 22}; return true;
    case T_Q5_1: *ti = {32, 24}; return true;
    case T_Q8_0: *ti = {32, 34}; return true;
    case T_Q4_K: *ti = {256, 144}; return true;
    case T_Q5_K: *ti = {256, 176}; return true;
    case T_Q6_K: *ti = {256, 210}; return true;
    default: return false;
  }
}

// Q4_K / Q5_K: the 12 scale bytes hold 8 six-bit scales and 8 six-bit mins.
inline void k_scale_min(const uint8_t* s, uint8_t* sc, uint8_t* mn) {
  for (int j = 0; j < 4; j++) {
    sc[j] = s[j] & 63;
    mn[j] = s[j + 4] & 63;
    sc[j + 4] = (s[j + 8] & 0x0f) | ((s[j] >> 6) << 4);
    mn[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4);
  }
}

// ------------------------------------------------------------------------------------ dequantization
// Each formula is the one gguf-py's numpy code evaluates, in the same order, in float32.
void dequant_row(int t, const uint8_t* src, float* y, int64_t k) {
  switch (t) {
    case T_F32: std::memcpy(y, src, k * 4); return;
    case T_F16: for (int64_t i = 0; i < k; i++) y[i] = rdh(src + 2 * i); return;
    case T_BF16: for (int64_t i = 0; i < k; i++) y[i] = bf16_to_fp32(rd16(src + 2 * i)); return;
    default: break;
  }
  TypeInfo ti;
  type_info(t, &ti);
  const int64_t nb = k / ti.block;
  for (int64_t b = 0; b < nb; b++) {
    const uint8_t* p = src + b * ti.bytes;
    float* o = y + b * ti.block;
    switch (t) {
      case T_Q4_0: {
        const float d = rdh(p);
        for (int j = 0; j < 16; j++) {
          o[j] = d * (float)((p[2 + j] & 0x0f) - 8);
          o[j + 16] = d * (float)((p[2 + j] >> 4) - 8);
        }
      } break;
      case T_Q4_1: {
        const float d = rdh(p), m = rdh(p + 2);
        for (int j = 0; j < 16; j++) {
          o[j] = d * (float)(p[4 + j] & 0x0f) + m;
          o[j + 16] = d * (float)(p[4 + j] >> 4) + m;
        }
      } break;
      case T_Q5_0: {
        const float d = rdh(p);
        uint32_t qh; std::memcpy(&qh, p + 2, 4);
        for (int j = 0; j < 16; j++) {
          o[j] = d * (float)((int)((p[6 + j] & 0x0f) | (((qh >> j) & 1) << 4)) - 16);
          o[j + 16] = d * (float)((int)((p[6 + j] >> 4) | (((qh >> (j + 16)) & 1) << 4)) - 16);
        }
      } break;
      case T_Q5_1: {
        const float d = rdh(p), m = rdh(p + 2);
        uint32_t qh; std::memcpy(&qh, p + 4, 4);
        for (int j = 0; j < 16; j++) {
          o[j] = d * (float)((p[8 + j] & 0x0f) | (((qh >> j) & 1) << 4)) + m;
          o[j + 16] = d * (float)((p[8 + j] >> 4) | (((qh >> (j + 16)) & 1) << 4)) + m;
        }
      } break;
      case T_Q8_0: {
        const float d = rdh(p);
        for (int j = 0; j < 32; j++) o[j] = (float)(int8_t)p[2 + j] * d;
      } break;
      case T_Q4_K: {
        const float d = rdh(p), dmin = rdh(p + 2);
        uint8_t sc[8], mn[8];
        k_scale_min(p + 4, sc, mn);
        const uint8_t* qs = p + 16;
        for (int s = 0; s < 8; s++) {
          const float ds = d * (float)sc[s], dm = dmin * (float)mn[s];
          const uint8_t* q = qs + 32 * (s / 2);
          const int sh = (s & 1) * 4;
          for (int l = 0; l < 32; l++) o[32 * s + l] = ds * (float)((q[l] >> sh) & 0x0f) - dm;
        }
      } break;
      case T_Q5_K: {
        const float d = rdh(p), dmin = rdh(p + 2);
        uint8_t sc[8], mn[8];
        k_scale_min(p + 4, sc, mn);
        const uint8_t* qh = p + 16;
        const uint8_t* qs = p + 48;
        for (int s = 0; s < 8; s++) {
          const float ds = d * (float)sc[s], dm = dmin * (float)mn[s];
          const uint8_t* q = qs + 32 * (s / 2);
          const int sh = (s & 1) * 4;
          for (int l = 0; l < 32; l++)
            o[32 * s + l] = ds * (float)(((q[l] >> sh) & 0x0f) | (((qh[l] >> s) & 1) << 4)) - dm;
        }
      } break;
      case T_Q6_K: {
        const uint8_t* ql = p;
        const uint8_t* qh = p + 128;
        const int8_t* sc = (const int8_t*)(p + 192);
        const float d = rdh(p + 208);
        for (int h = 0; h < 2; h++) {
          for (int s = 0; s < 4; s++) {
            const uint8_t* lq = ql + 64 * h + 32 * (s & 1);
            const int lsh = (s >> 1) * 4;
            for (int l = 0; l < 32; l++) {
              const int e = 128 * h + 32 * s + l;
              const int q = (((lq[l] >> lsh) & 0x0f) | (((qh[32 * h + l] >> (2 * s)) & 3) << 4)) - 32;
              o[e] = (d * (float)sc[e / 16]) * (float)q;
            }
          }
        }
      } break;
    }
  }
}

// ---------------------------------------------------------------------------- activation blocks
struct BlockQ8 {  // 32 activations: scale, scale * sum of the quants (for Q4_1/Q5_1), the quants
  float d;
  float s;
  int8_t qs[32];
};
struct BlockQ8K {  // 256 activations, with the sums of each 16
  float d;
  int8_t qs[256];
  int16_t bsums[16];
};

inline float round_half_away(float v) { return std::round(v); }

void quantize_q8(const float* x, BlockQ8* y, int64_t k) {
  for (int64_t b = 0; b < k / QK; b++) {
    const float* v = x + b * QK;
    float amax = 0.f;
    for (int j = 0; j < QK; j++) amax = std::max(amax, std::fabs(v[j]));
    const float d = amax / 127.f, id = d != 0.f ? 1.f / d : 0.f;
    int sum = 0;
    for (int j = 0; j < QK; j++) {
      const int q = (int)round_half_away(v[j] * id);
      y[b].qs[j] = (int8_t)q;
      sum += q;
    }
    y[b].d = d;
    y[b].s = d * (float)sum;
  }
}

void quantize_q8k(const float* x, BlockQ8K* y, int64_t k) {
  for (int64_t b = 0; b < k / QKK; b++) {
    const float* v = x + b * QKK;
    float amax = 0.f;
    for (int j = 0; j < QKK; j++) amax = std::max(amax, std::fabs(v[j]));
    const float d = amax / 127.f, id = d != 0.f ? 1.f / d : 0.f;
    for (int g = 0; g < 16; g++) {
      int sum = 0;
      for (int j = 0; j < 16; j++) {
        const int q = (int)round_half_away(v[16 * g + j] * id);
        y[b].qs[16 * g + j] = (int8_t)q;
        sum += q;
      }
      y[b].bsums[g] = (int16_t)sum;
    }
    y[b].d = d;
  }
}

// ---------------------------------------------------------------------------- AVX2 helpers
#if defined(__AVX2__)
inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline int hsum8i(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 1));
  return _mm_cvtsi128_si32(s);
}
// 32 nibbles of 16 bytes: low nibbles in bytes 0..15, high nibbles in bytes 16..31
inline __m256i nibbles32(const uint8_t* p) {
  const __m128i v = _mm_loadu_si128((const __m128i*)p);
  const __m128i m = _mm_set1_epi8(0x0f);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), m), _mm_and_si128(v, m));
}
// 32 bits -> 32 bytes, 0x10 where the bit is set
inline __m256i bits32_x16(const uint8_t* p) {
  uint32_t x; std::memcpy(&x, p, 4);
  const __m256i shuf = _mm256_setr_epi64x(0x0000000000000000, 0x0101010101010101, 0x0202020202020202,
                                          0x0303030303030303);
  __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32((int)x), shuf);
  v = _mm256_or_si256(v, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
  v = _mm256_cmpeq_epi8(v, _mm256_set1_epi64x(-1));
  return _mm256_and_si256(v, _mm256_set1_epi8(0x10));
}
// signed int8 x signed int8, pairs summed to 8 int32
inline __m256i dot_i8(__m256i a, __m256i b) {
  const __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(a, a), _mm256_sign_epi8(b, a));
  return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
}
// unsigned int8 x signed int8
inline __m256i dot_u8(__m256i u, __m256i s) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}
#endif

// ---------------------------------------------------------------------------- row dot products
// One weight row (nb blocks) against one quantized activation row.
float dot_q4_0(const uint8_t* w, const BlockQ8* a, int64_t nb) {
#if defined(__AVX2__)
  __m256 acc = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; b++) {
    const uint8_t* p = w + b * 18;
    const __m256i q = _mm256_sub_epi8(nibbles32(p + 2), _mm256_set1_epi8(8));
    const __m256i qa = _mm256_loadu_si256((const __m256i*)a[b].qs);
    const __m256 d = _mm256_set1_ps(rdh(p) * a[b].d);
    acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(dot_i8(q, qa)), acc);
  }
  return hsum8(acc);
#else
  float acc = 0.f;
  for (int64_t b = 0; b < nb; b++) {
    const uint8_t* p = w + b * 18;
    int s = 0;
    for (int j = 0; j < 16; j++)
      s += ((p[2 + j] & 0x0f) - 8) * a[b].qs[j] + ((p[2 + j] >> 4) - 8) * a[b].qs[j + 16];
    acc += rdh(p) * a[b].d * (float)s;
  }
  return acc;
#endif
}

float dot_q4_1(const uint8_t* w, const BlockQ8* a, int64_t nb) {
#if defined(__AVX2__)
  __m256 acc = _mm256_setzero_ps();
  float accm = 0.f;
  for (int64_t b = 0; b < nb; b++) {
    const uint8_t* p = w + b * 20;
    const __m256i q = nibbles32(p + 4);
    const __m256i qa = _mm256_loadu_si256((const __m256i*)a[b].qs);
    const __m256 d = _mm256_set1_ps(rdh(p) * a[b].d);
    acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(dot_u8(q, qa)), acc);
    accm += rdh(p + 2) * a[b].s;
  }
  return hsum8(acc) + accm;
#else
  float acc = 0.f, accm = 0.f;
  for (int64_t b = 0; b < nb; b++) {
    const uint8_t* p = w + b * 20;
    int s = 0;
    for (int j = 0; j < 16; j++) s += (p[4 + j] & 0x0f) * a[b].qs[j] + (p[4 + j] >> 4) * a[b].qs[j + 16];
    acc += rdh(p) * a[b].d * (float)s;
    accm += rdh(p + 2) * a[b].s;
  }
  return acc + accm;
#endif
}

float dot_q5_0(const uint8_t* w, const BlockQ8* a, int64_t nb) {
#if defined(__AVX2__)
  __m256 acc = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; b++) {
    const uint8_t* p = w + b * 22;
    const __m256i q = _mm256_sub_epi8(_mm256_or_si256(nibbles32(p + 6), bits32_x16(p + 2)), _mm256_set1_epi8(16));
    const __m256i qa = _mm256_loadu_si256((const __m256i*)a[b].qs);
    const __m256 d = _mm256_set1_ps(rdh(p) * a[b].d);
    acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(dot_i8(q, qa)), acc);
  }
  return hsum8(acc);
#else
  float acc = 0.f;
  for (int64_t b = 0; b < nb; b++) {
    const uint8_t* p = w + b * 22;
    uint32_t qh; std::memcpy(&qh, p + 2, 4);
    int s = 0;
    for (int j = 0; j < 16; j++) {
      s += ((int)((p[6 + j] & 0x0f) | (((qh >> j) & 1) << 4)) - 16) * a[b].qs[j];
      s += ((int)((p[6 + j] >> 4) | (((qh >> (j + 16)) & 1) << 4)) - 16) * a[b].qs[j + 16];
    }
    acc += rdh(p) * a[b].d * (float)s;
  }
  return acc;
#endif
}

float dot_q5_1(const uint8_t* w, const BlockQ8* a, int64_t nb) {
#if defined(__AVX2__)
  __m256 acc = _mm256_setzero_ps();
  float accm = 0.f;
  for (int64_t b = 0; b < nb; b++) {
    const uint8_t* p = w + b * 24;
    const __m256i q = _mm256_or_si256(nibbles32(p + 8), bits32_x16(p + 4));
    const __m256i qa = _mm256_loadu_si256((const __m256i*)a[b].qs);
    const __m256 d = _mm256_set1_ps(rdh(p) * a[b].d);
    acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(dot_u8(q, qa)), acc);
    accm += rdh(p + 2) * a[b].s;
  }
  return hsum8(acc) + accm;
#else
  float acc = 0.f, accm = 0.f;
  for (int64_t b = 0; b < nb; b++) {
    const uint8_t* p = w + b * 24;
    uint32_t qh; std::memcpy(&qh, p + 4, 4);
    int s = 0;
    for (int j = 0; j < 16; j++) {
      s += (int)((p[8 + j] & 0x0f) | (((qh >> j) & 1) << 4)) * a[b].qs[j];
      s += (int)((p[8 + j] >> 4) | (((qh >> (j + 16)) & 1) << 4)) * a[b].qs[j + 16];
    }
    acc += rdh(p) * a[b].d * (float)s;
    accm += rdh(p + 2) * a[b].s;
  }
  return acc + accm;
#endif
}

float dot_q8_0(const uint8_t* w, const BlockQ8* a, int64_t nb) {
#if defined(__AVX2__)
  __m256 acc = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; b++) {
    const uint8_t* p = w + b * 34;
    const __m256i q = _mm256_loadu_si256((const __m256i*)(p + 2));
    const __m256i qa = _mm256_loadu_si256((const __m256i*)a[b].qs);
    const __m256 d = _mm256_set1_ps(rdh(p) * a[b].d);
    acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(dot_i8(q, qa)), acc);
  }
  return hsum8(acc);
#else
  float acc = 0.f;
  for (int64_t b = 0; b < nb; b++) {
    const uint8_t* p = w + b * 34;
    int s = 0;
    for (int j = 0; j < 32; j++) s += (int8_t)p[2 + j] * a[b].qs[j];
    acc += rdh(p) * a[b].d * (float)s;
  }
  return acc;
#endif
}

float dot_q4_k(const uint8_t* w, const BlockQ8K* a, int64_t nb) {
  float acc = 0.f;
  for (int64_t b = 0; b < nb; b++) {
    const uint8_t* p = w + b * 144;
    uint8_t sc[8], mn[8];
    k_scale_min(p + 4, sc, mn);
    const uint8_t* qs = p + 16;
    int summ = 0;
    for (int s = 0; s < 8; s++) summ += mn[s] * (a[b].bsums[2 * s] + a[b].bsums[2 * s + 1]);
#if defined(__AVX2__)
    __m256i sumi = _mm256_setzero_si256();
    for (int c = 0; c < 4; c++) {
      const __m256i v = _mm256_loadu_si256((const __m256i*)(qs + 32 * c));
      const __m256i lo = _mm256_and_si256(v, _mm256_set1_epi8(0x0f));
      const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), _mm256_set1_epi8(0x0f));
      const __m256i a0 = _mm256_loadu_si256((const __m256i*)(a[b].qs + 64 * c));
      const __m256i a1 = _mm256_loadu_si256((const __m256i*)(a[b].qs + 64 * c + 32));
      sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(_mm256_maddubs_epi16(lo, a0), _mm256_set1_epi16(sc[2 * c])));
      sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(_mm256_maddubs_epi16(hi, a1), _mm256_set1_epi16(sc[2 * c + 1])));
    }
    const int isum = hsum8i(sumi);
#else
    int isum = 0;
    for (int s = 0; s < 8; s++) {
      const uint8_t* q = qs + 32 * (s / 2);
      const int sh = (s & 1) * 4;
      int t = 0;
      for (int l = 0; l < 32; l++) t += ((q[l] >> sh) & 0x0f) * a[b].qs[32 * s + l];
      isum += sc[s] * t;
    }
#endif
    acc += a[b].d * (rdh(p) * (float)isum - rdh(p + 2) * (float)summ);
  }
  return acc;
}

float dot_q5_k(const uint8_t* w, const BlockQ8K* a, int64_t nb) {
  float acc = 0.f;
  for (int64_t b = 0; b < nb; b++) {
    const uint8_t* p = w + b * 176;
    uint8_t sc[8], mn[8];
    k_scale_min(p + 4, sc, mn);
    const uint8_t* qh = p + 16;
    const uint8_t* qs = p + 48;
    int summ = 0;
    for (int s = 0; s < 8; s++) summ += mn[s] * (a[b].bsums[2 * s] + a[b].bsums[2 * s + 1]);
#if defined(__AVX2__)
    __m256i sumi = _mm256_setzero_si256();
    const __m256i hv = _mm256_loadu_si256((const __m256i*)qh);
    const __m256i one = _mm256_set1_epi8(1);
    for (int c = 0; c < 4; c++) {
      const __m256i v = _mm256_loadu_si256((const __m256i*)(qs + 32 * c));
      const __m256i h0 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srl_epi16(hv, _mm_cvtsi32_si128(2 * c)), one), 4);
      const __m256i h1 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srl_epi16(hv, _mm_cvtsi32_si128(2 * c + 1)), one), 4);
      const __m256i lo = _mm256_or_si256(_mm256_and_si256(v, _mm256_set1_epi8(0x0f)), h0);
      const __m256i hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(v, 4), _mm256_set1_epi8(0x0f)), h1);
      const __m256i a0 = _mm256_loadu_si256((const __m256i*)(a[b].qs + 64 * c));
      const __m256i a1 = _mm256_loadu_si256((const __m256i*)(a[b].qs + 64 * c + 32));
      sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(_mm256_maddubs_epi16(lo, a0), _mm256_set1_epi16(sc[2 * c])));
      sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(_mm256_maddubs_epi16(hi, a1), _mm256_set1_epi16(sc[2 * c + 1])));
    }
    const int isum = hsum8i(sumi);
#else
    int isum = 0;
    for (int s = 0; s < 8; s++) {
      const uint8_t* q = qs + 32 * (s / 2);
      const int sh = (s & 1) * 4;
      int t = 0;
      for (int l = 0; l < 32; l++)
        t += (((q[l] >> sh) & 0x0f) | (((qh[l] >> s) & 1) << 4)) * a[b].qs[32 * s + l];
      isum += sc[s] * t;
    }
#endif
    acc += a[b].d * (rdh(p) * (float)isum - rdh(p + 2) * (float)summ);
  }
  return acc;
}

float dot_q6_k(const uint8_t* w, const BlockQ8K* a, int64_t nb) {
  float acc = 0.f;
  for (int64_t b = 0; b < nb; b++) {
    const uint8_t* p = w + b * 210;
    const uint8_t* ql = p;
    const uint8_t* qh = p + 128;
    const int8_t* sc = (const int8_t*)(p + 192);
    int corr = 0;  // the -32 offset, through the activation sums
    for (int g = 0; g < 16; g++) corr += sc[g] * a[b].bsums[g];
#if defined(__AVX2__)
    __m256i sumi = _mm256_setzero_si256();
    const __m256i m4 = _mm256_set1_epi8(0x0f), m2 = _mm256_set1_epi8(3);
    for (int h = 0; h < 2; h++) {
      const __m256i l0 = _mm256_loadu_si256((const __m256i*)(ql + 64 * h));
      const __m256i l1 = _mm256_loadu_si256((const __m256i*)(ql + 64 * h + 32));
      const __m256i hb = _mm256_loadu_si256((const __m256i*)(qh + 32 * h));
      __m256i q[4];
      q[0] = _mm256_or_si256(_mm256_and_si256(l0, m4), _mm256_slli_epi16(_mm256_and_si256(hb, m2), 4));
      q[1] = _mm256_or_si256(_mm256_and_si256(l1, m4), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 2), m2), 4));
      q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4),
                             _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 4), m2), 4));
      q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4),
                             _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 6), m2), 4));
      for (int s = 0; s < 4; s++) {
        const int e = 128 * h + 32 * s;
        const __m256i qa = _mm256_loadu_si256((const __m256i*)(a[b].qs + e));
        const __m256i scv = _mm256_set_m128i(_mm_set1_epi16(sc[e / 16 + 1]), _mm_set1_epi16(sc[e / 16]));
        sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(_mm256_maddubs_epi16(q[s], qa), scv));
      }
    }
    const int isum = hsum8i(sumi) - 32 * corr;
#else
    int isum = 0;
    for (int h = 0; h < 2; h++) {
      for (int s = 0; s < 4; s++) {
        const uint8_t* lq = ql + 64 * h + 32 * (s & 1);
        const int lsh = (s >> 1) * 4;
        for (int half = 0; half < 2; half++) {
          int t = 0;
          for (int l = 16 * half; l < 16 * half + 16; l++) {
            const int q = ((lq[l] >> lsh) & 0x0f) | (((qh[32 * h + l] >> (2 * s)) & 3) << 4);
            t += q * a[b].qs[128 * h + 32 * s + l];
          }
          isum += sc[(128 * h + 32 * s) / 16 + half] * t;
        }
      }
    }
    isum -= 32 * corr;
#endif
    acc += a[b].d * rdh(p + 208) * (float)isum;
  }
  return acc;
}

// float weights: F32 / F16 / BF16 rows against float activations
float dot_f32(const uint8_t* w, const float* x, int64_t k) {
  const float* v = (const float*)w;
#if defined(__AVX2__)
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= k; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(v + i), _mm256_loadu_ps(x + i), acc);
  float s = hsum8(acc);
  for (; i < k; i++) s += v[i] * x[i];
  return s;
#else
  float s = 0.f;
  for (int64_t i = 0; i < k; i++) s += v[i] * x[i];
  return s;
#endif
}

float dot_f16(const uint8_t* w, const float* x, int64_t k) {
#if defined(__AVX2__)
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= k; i += 8)
    acc = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(w + 2 * i))), _mm256_loadu_ps(x + i), acc);
  float s = hsum8(acc);
  for (; i < k; i++) s += rdh(w + 2 * i) * x[i];
  return s;
#else
  float s = 0.f;
  for (int64_t i = 0; i < k; i++) s += rdh(w + 2 * i) * x[i];
  return s;
#endif
}

float dot_bf16(const uint8_t* w, const float* x, int64_t k) {
#if defined(__AVX2__)
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= k; i += 8) {
    const __m256i b = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(w + 2 * i))), 16);
    acc = _mm256_fmadd_ps(_mm256_castsi256_ps(b), _mm256_loadu_ps(x + i), acc);
  }
  float s = hsum8(acc);
  for (; i < k; i++) s += bf16_to_fp32(rd16(w + 2 * i)) * x[i];
  return s;
#else
  float s = 0.f;
  for (int64_t i = 0; i < k; i++) s += bf16_to_fp32(rd16(w + 2 * i)) * x[i];
  return s;
#endif
}

// ---------------------------------------------------------------------------- tiled products (AVX2)
// A tile is R activation rows x C weight rows over the whole of k. Each weight block is unpacked once per
// tile and used for the R activation rows; each activation block is loaded once and used for the C weight
// rows. Output (i, j) is computed with exactly the operations of the R = C = 1 tile, in the same order
// (per-lane fused multiply-adds over the blocks in order, then one horizontal sum; integer parts are
// exact), so the tile shape, and with it the batch size and the thread split, never changes a result.
// The single-row functions above are the portable build's; on AVX2 every product goes through tiles.
#if defined(__AVX2__)
// The 32 weights of one 32-block as bytes: signed (Q4_0, Q5_0, Q8_0) or unsigned with a min (Q4_1, Q5_1).
template <int TY>
inline __m256i q8w_quants(const uint8_t* p) {
  if constexpr (TY == T_Q4_0) return _mm256_sub_epi8(nibbles32(p + 2), _mm256_set1_epi8(8));
  if constexpr (TY == T_Q4_1) return nibbles32(p + 4);
  if constexpr (TY == T_Q5_0)
    return _mm256_sub_epi8(_mm256_or_si256(nibbles32(p + 6), bits32_x16(p + 2)), _mm256_set1_epi8(16));
  if constexpr (TY == T_Q5_1) return _mm256_or_si256(nibbles32(p + 8), bits32_x16(p + 4));
  return _mm256_loadu_si256((const __m256i*)(p + 2));  // Q8_0
}
template <int TY> constexpr int q8w_bytes() {
  return TY == T_Q4_0 ? 18 : TY == T_Q4_1 ? 20 : TY == T_Q5_0 ? 22 : TY == T_Q5_1 ? 24 : 34;
}
template <int TY> constexpr bool q8w_has_min() { return TY == T_Q4_1 || TY == T_Q5_1; }

template <int TY, int R, int C>
void tile_q8(const uint8_t* w, int64_t wrb, const BlockQ8* a, int64_t nb, float* out, int64_t ldo) {
  constexpr int BB = q8w_bytes<TY>();
  constexpr bool MIN = q8w_has_min<TY>();
  static_assert(R <= 4 && C <= 4, "tiles are at most 4 x 4");
  // Q4_1 / Q5_1: the min term m_c * s_r of all R x C outputs in one vector, output (r, c) in lane
  // (r * C + c) % 8: one multiply and one add per block for the tile instead of 2 R C scalar operations
  // (which also spilled the accumulators). Each lane performs the scalar sequence accm += m * s, so a
  // result does not depend on the tile shape. Tiles of more than 8 outputs (never used) share lanes and
  // keep the scalar sums.
  constexpr bool VMIN = MIN && R * C <= 8;
  __m256 acc[R][C];
  float accm[R][C];
  __m256 accmv = _mm256_setzero_ps();
  for (int r = 0; r < R; r++)
    for (int c = 0; c < C; c++) { acc[r][c] = _mm256_setzero_ps(); accm[r][c] = 0.f; }
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i idx_m = _mm256_setr_epi32(0 % C, 1 % C, 2 % C, 3 % C, 4 % C, 5 % C, 6 % C, 7 % C);
  const __m256i idx_s = _mm256_setr_epi32(std::min(0 / C, R - 1), std::min(1 / C, R - 1), std::min(2 / C, R - 1),
                                          std::min(3 / C, R - 1), std::min(4 / C, R - 1), std::min(5 / C, R - 1),
                                          std::min(6 / C, R - 1), std::min(7 / C, R - 1));
  for (int64_t b = 0; b < nb; b++) {
    __m256i q[C], qs[C];
    __m256 dw[C];
    float mw[C];
    for (int c = 0; c < C; c++) {
      const uint8_t* p = w + c * wrb + b * BB;
      q[c] = q8w_quants<TY>(p);
      // signed weights: |w| x (a with w's sign), the same pairs maddubs sums in dot_i8
      qs[c] = MIN ? q[c] : _mm256_sign_epi8(q[c], q[c]);
      dw[c] = _mm256_set1_ps(rdh(p));
      if constexpr (MIN && !VMIN) mw[c] = rdh(p + 2);
    }
    if constexpr (VMIN) {
      const uint8_t* p = w + b * BB + 2;
      const __m128i mh = _mm_setr_epi16((short)rd16(p), C > 1 ? (short)rd16(p + wrb) : 0,
                                        C > 2 ? (short)rd16(p + 2 * wrb) : 0, C > 3 ? (short)rd16(p + 3 * wrb) : 0,
                                        0, 0, 0, 0);
      const __m128 s4 = _mm_setr_ps(a[b].s, R > 1 ? a[nb + b].s : 0.f, R > 2 ? a[2 * nb + b].s : 0.f,
                                    R > 3 ? a[3 * nb + b].s : 0.f);
      const __m256 mv = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_cvtph_ps(mh)), idx_m);
      const __m256 sv = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(s4), idx_s);
      accmv = _mm256_add_ps(accmv, _mm256_mul_ps(mv, sv));
    }
    for (int r = 0; r < R; r++) {
      const BlockQ8& ab = a[r * nb + b];
      const __m256i qa = _mm256_loadu_si256((const __m256i*)ab.qs);
      const __m256 da = _mm256_set1_ps(ab.d);
      for (int c = 0; c < C; c++) {
        const __m256i s = MIN ? qa : _mm256_sign_epi8(qa, q[c]);
        const __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(qs[c], s), ones);
        acc[r][c] = _mm256_fmadd_ps(_mm256_mul_ps(dw[c], da), _mm256_cvtepi32_ps(dot), acc[r][c]);
        if constexpr (MIN && !VMIN) accm[r][c] += mw[c] * ab.s;
      }
    }
  }
  if constexpr (VMIN) {
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, accmv);
    for (int r = 0; r < R; r++)
      for (int c = 0; c < C; c++) accm[r][c] = lanes[r * C + c];
  }
  for (int r = 0; r < R; r++)
    for (int c = 0; c < C; c++) out[r * ldo + c] = MIN ? hsum8(acc[r][c]) + accm[r][c] : hsum8(acc[r][c]);
}

// K-quants: per super-block an exact integer sum for each (row, column) pair, then the float step of the
// single-row kernels: acc += d_a * (d * isum - dmin * summ) (Q4_K, Q5_K) or acc += d_a * d * isum (Q6_K).
inline int hsum4i(__m128i s) {
  s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 1));
  return _mm_cvtsi128_si32(s);
}

template <int TY> constexpr int kw_bytes() { return TY == T_Q4_K ? 144 : TY == T_Q5_K ? 176 : 210; }

template <int TY, int R, int C>
void tile_k(const uint8_t* w, int64_t wrb, const BlockQ8K* a, int64_t nb, float* out, int64_t ldo) {
  constexpr int BB = kw_bytes<TY>();
  float acc[R][C];
  for (int r = 0; r < R; r++)
    for (int c = 0; c < C; c++) acc[r][c] = 0.f;
  const __m256i m4 = _mm256_set1_epi8(0x0f);
  for (int64_t b = 0; b < nb; b++) {
    __m256i sumi[R][C];
    for (int r = 0; r < R; r++)
      for (int c = 0; c < C; c++) sumi[r][c] = _mm256_setzero_si256();
    int summ[R][C];  // Q4_K/Q5_K: the mins through the activation sums; Q6_K: the -32 offset likewise
    if constexpr (TY == T_Q6_K) {
      for (int c = 0; c < C; c++) {
        const uint8_t* p = w + c * wrb + b * BB;
        const __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(p + 192)));
        for (int r = 0; r < R; r++) {
          const __m256i bs = _mm256_loadu_si256((const __m256i*)a[r * nb + b].bsums);
          summ[r][c] = hsum8i(_mm256_madd_epi16(sc16, bs));
        }
      }
      for (int h = 0; h < 2; h++) {
        for (int s = 0; s < 4; s++) {
          __m256i q[C], scv[C];
          for (int c = 0; c < C; c++) {
            const uint8_t* p = w + c * wrb + b * BB;
            const __m256i l = _mm256_loadu_si256((const __m256i*)(p + 64 * h + 32 * (s & 1)));
            const __m256i hb = _mm256_loadu_si256((const __m256i*)(p + 128 + 32 * h));
            const __m256i lo = (s >> 1) ? _mm256_and_si256(_mm256_srli_epi16(l, 4), m4) : _mm256_and_si256(l, m4);
            const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(hb, 2 * s), _mm256_set1_epi8(3));
            q[c] = _mm256_or_si256(lo, _mm256_slli_epi16(hi, 4));
            const int8_t* sc = (const int8_t*)(p + 192);
            const int e = (128 * h + 32 * s) / 16;
            scv[c] = _mm256_set_m128i(_mm_set1_epi16(sc[e + 1]), _mm_set1_epi16(sc[e]));
          }
          for (int r = 0; r < R; r++) {
            const __m256i qa = _mm256_loadu_si256((const __m256i*)(a[r * nb + b].qs + 128 * h + 32 * s));
            for (int c = 0; c < C; c++)
              sumi[r][c] = _mm256_add_epi32(sumi[r][c], _mm256_madd_epi16(_mm256_maddubs_epi16(q[c], qa), scv[c]));
          }
        }
      }
      for (int r = 0; r < R; r++) {
        const BlockQ8K& ab = a[r * nb + b];
        for (int c = 0; c < C; c++) {
          const uint8_t* p = w + c * wrb + b * BB;
          const int isum = hsum8i(sumi[r][c]) - 32 * summ[r][c];
          acc[r][c] += ab.d * rdh(p + 208) * (float)isum;
        }
      }
    } else {
      uint8_t sc[C][8];
      for (int c = 0; c < C; c++) {
        const uint8_t* p = w + c * wrb + b * BB;
        uint8_t mn[8];
        k_scale_min(p + 4, sc[c], mn);
        const __m128i mins = _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i*)mn));
        for (int r = 0; r < R; r++) {
          const __m128i* bs = (const __m128i*)a[r * nb + b].bsums;
          const __m128i pairs = _mm_hadd_epi16(_mm_loadu_si128(bs), _mm_loadu_si128(bs + 1));
          summ[r][c] = hsum4i(_mm_madd_epi16(mins, pairs));
        }
      }
      for (int ch = 0; ch < 4; ch++) {
        __m256i lo[C], hi[C], s0[C], s1[C];
        for (int c = 0; c < C; c++) {
          const uint8_t* p = w + c * wrb + b * BB;
          const __m256i v = _mm256_loadu_si256((const __m256i*)(p + (TY == T_Q4_K ? 16 : 48) + 32 * ch));
          lo[c] = _mm256_and_si256(v, m4);
          hi[c] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
          if constexpr (TY == T_Q5_K) {
            const __m256i hv = _mm256_loadu_si256((const __m256i*)(p + 16));
            const __m256i one = _mm256_set1_epi8(1);
            lo[c] = _mm256_or_si256(lo[c], _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hv, 2 * ch), one), 4));
            hi[c] = _mm256_or_si256(hi[c], _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hv, 2 * ch + 1), one), 4));
          }
          s0[c] = _mm256_set1_epi16(sc[c][2 * ch]);
          s1[c] = _mm256_set1_epi16(sc[c][2 * ch + 1]);
        }
        for (int r = 0; r < R; r++) {
          const int8_t* qa = a[r * nb + b].qs + 64 * ch;
          const __m256i a0 = _mm256_loadu_si256((const __m256i*)qa);
          const __m256i a1 = _mm256_loadu_si256((const __m256i*)(qa + 32));
          for (int c = 0; c < C; c++) {
            const __m256i t = _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(lo[c], a0), s0[c]),
                                               _mm256_madd_epi16(_mm256_maddubs_epi16(hi[c], a1), s1[c]));
            sumi[r][c] = _mm256_add_epi32(sumi[r][c], t);
          }
        }
      }
      for (int r = 0; r < R; r++) {
        const BlockQ8K& ab = a[r * nb + b];
        for (int c = 0; c < C; c++) {
          const uint8_t* p = w + c * wrb + b * BB;
          acc[r][c] += ab.d * (rdh(p) * (float)hsum8i(sumi[r][c]) - rdh(p + 2) * (float)summ[r][c]);
        }
      }
    }
  }
  for (int r = 0; r < R; r++)
    for (int c = 0; c < C; c++) out[r * ldo + c] = acc[r][c];
}

// Float weights: each 8 weights converted once per tile; per output the fused multiply-adds of dot_f32.
template <int TY>
inline __m256 fw8(const uint8_t* w, int64_t i) {
  if constexpr (TY == T_F16) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(w + 2 * i)));
  if constexpr (TY == T_BF16)
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(w + 2 * i))), 16));
  return _mm256_loadu_ps((const float*)w + i);
}
template <int TY>
inline float fw1(const uint8_t* w, int64_t i) {
  if constexpr (TY == T_F16) return rdh(w + 2 * i);
  if constexpr (TY == T_BF16) return bf16_to_fp32(rd16(w + 2 * i));
  return ((const float*)w)[i];
}

template <int TY, int R, int C>
void tile_f(const uint8_t* w, int64_t wrb, const float* x, int64_t k, float* out, int64_t ldo) {
  __m256 acc[R][C];
  for (int r = 0; r < R; r++)
    for (int c = 0; c < C; c++) acc[r][c] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= k; i += 8) {
    __m256 wv[C];
    for (int c = 0; c < C; c++) wv[c] = fw8<TY>(w + c * wrb, i);
    for (int r = 0; r < R; r++) {
      const __m256 xv = _mm256_loadu_ps(x + r * k + i);
      for (int c = 0; c < C; c++) acc[r][c] = _mm256_fmadd_ps(wv[c], xv, acc[r][c]);
    }
  }
  for (int r = 0; r < R; r++)
    for (int c = 0; c < C; c++) {
      float s = hsum8(acc[r][c]);
      for (int64_t t = i; t < k; t++) s += fw1<TY>(w + c * wrb, t) * x[r * k + t];
      out[r * ldo + c] = s;
    }
}

// One tile of r <= 4 activation rows x c <= 4 weight rows: the instantiation for (type, r, c).
template <int TY, int R, int C>
void tile_one(const uint8_t* w, int64_t wrb, const float* x, const uint8_t* qa, int64_t k, float* out, int64_t ldo) {
  if constexpr (TY == T_Q4_0 || TY == T_Q4_1 || TY == T_Q5_0 || TY == T_Q5_1 || TY == T_Q8_0)
    tile_q8<TY, R, C>(w, wrb, (const BlockQ8*)qa, k / QK, out, ldo);
  else if constexpr (TY == T_Q4_K || TY == T_Q5_K || TY == T_Q6_K)
    tile_k<TY, R, C>(w, wrb, (const BlockQ8K*)qa, k / QKK, out, ldo);
  else
    tile_f<TY, R, C>(w, wrb, x, k, out, ldo);
}

template <int TY, int R>
void tile_rc(int c, const uint8_t* w, int64_t wrb, const float* x, const uint8_t* qa, int64_t k, float* out,
             int64_t ldo) {
  switch (c) {
    case 1: tile_one<TY, R, 1>(w, wrb, x, qa, k, out, ldo); break;
    case 2: tile_one<TY, R, 2>(w, wrb, x, qa, k, out, ldo); break;
    case 3: tile_one<TY, R, 3>(w, wrb, x, qa, k, out, ldo); break;
    default: tile_one<TY, R, 4>(w, wrb, x, qa, k, out, ldo); break;
  }
}

template <int TY>
void tile_t(int r, int c, const uint8_t* w, int64_t wrb, const float* x, const uint8_t* qa, int64_t k, float* out,
            int64_t ldo) {
  switch (r) {
    case 1: tile_rc<TY, 1>(c, w, wrb, x, qa, k, out, ldo); break;
    case 2: tile_rc<TY, 2>(c, w, wrb, x, qa, k, out, ldo); break;
    case 3: tile_rc<TY, 3>(c, w, wrb, x, qa, k, out, ldo); break;
    default: tile_rc<TY, 4>(c, w, wrb, x, qa, k, out, ldo); break;
  }
}

// out[r * ldo + c] for r < nr <= 4 activation rows (x or qa at row 0) and c < nc <= 4 weight rows (w at row 0).
void tile(int t, int nr, int nc, const uint8_t* w, int64_t wrb, const float* x, const uint8_t* qa, int64_t k,
          float* out, int64_t ldo) {
  switch (t) {
    case T_Q4_0: tile_t<T_Q4_0>(nr, nc, w, wrb, x, qa, k, out, ldo); break;
    case T_Q4_1: tile_t<T_Q4_1>(nr, nc, w, wrb, x, qa, k, out, ldo); break;
    case T_Q5_0: tile_t<T_Q5_0>(nr, nc, w, wrb, x, qa, k, out, ldo); break;
    case T_Q5_1: tile_t<T_Q5_1>(nr, nc, w, wrb, x, qa, k, out, ldo); break;
    case T_Q8_0: tile_t<T_Q8_0>(nr, nc, w, wrb, x, qa, k, out, ldo); break;
    case T_Q4_K: tile_t<T_Q4_K>(nr, nc, w, wrb, x, qa, k, out, ldo); break;
    case T_Q5_K: tile_t<T_Q5_K>(nr, nc, w, wrb, x, qa, k, out, ldo); break;
    case T_Q6_K: tile_t<T_Q6_K>(nr, nc, w, wrb, x, qa, k, out, ldo); break;
    case T_F16: tile_t<T_F16>(nr, nc, w, wrb, x, qa, k, out, ldo); break;
    case T_BF16: tile_t<T_BF16>(nr, nc, w, wrb, x, qa, k, out, ldo); break;
    default: tile_t<T_F32>(nr, nc, w, wrb, x, qa, k, out, ldo); break;
  }
}
#endif

// ---------------------------------------------------------------------------- thread pool
// A small persistent pool. A job is a number of chunks; the calling thread and the workers claim chunks
// through one atomic word holding (job generation, next chunk), and the caller returns once every chunk
// is finished, without waiting for workers that have not woken up yet: on a machine shared by more
// threads than cores a sleeping worker may wait milliseconds for a time slice, and a barrier on it would
// cost that at every product. Workers spin briefly between jobs (the engine calls kernels back to back),
// then sleep on a condition variable. Not OpenMP: torch bundles its own OpenMP runtime, and two
// runtimes in one process fight over the cores.
class Pool {
 public:
  ~Pool() { resize(1); }

  int size() const { return nthreads_; }

  void resize(int n) {
    if (n < 1) n = 1;
    if (n == nthreads_) return;
    {
      std::lock_guard<std::mutex> g(mu_);
      stop_ = true;
      gen_.fetch_add(1);
    }
    cv_.notify_all();
    for (auto& t : threads_) t.join();
    threads_.clear();
    stop_ = false;
    nthreads_ = n;
    const uint64_t g0 = gen_.load();  // a worker starts from the generation of now
    for (int i = 1; i < n; i++) threads_.emplace_back([this, g0] { worker(g0); });
  }

  // Runs fn(c) for every chunk c in [0, nchunks), each exactly once, on the pool and the calling thread.
  void run(int64_t nchunks, const std::function<void(int64_t)>& fn) {
    if (nthreads_ == 1 || nchunks <= 1) {
      for (int64_t c = 0; c < nchunks; c++) fn(c);
      return;
    }
    const uint64_t g = (gen_.load() + 1) & 0xffffffffu;
    fn_ = &fn;
    nchunks_ = nchunks;
    finished_.store(0, std::memory_order_relaxed);
    state_.store(g << 32, std::memory_order_release);
    {
      std::lock_guard<std::mutex> lk(mu_);
      gen_.store(g, std::memory_order_release);
    }
    cv_.notify_all();
    work(g);
    int spins = 0;
    while (finished_.load(std::memory_order_acquire) != nchunks) {
      if (++spins > 2048) std::this_thread::yield();
      else pause();
    }
  }

 private:
  static inline void pause() {
#if defined(__x86_64__) || defined(_M_X64)
    __builtin_ia32_pause();
#endif
  }

  // Claims and runs chunks of job g until none is left (or job g is over).
  void work(uint64_t g) {
    for (;;) {
      uint64_t s = state_.load(std::memory_order_acquire);
      if ((s >> 32) != g) return;
      const int64_t c = (int64_t)(s & 0xffffffffu);
      if (c >= nchunks_) return;
      if (!state_.compare_exchange_weak(s, s + 1, std::memory_order_acq_rel)) continue;
      (*fn_)(c);  // job g cannot end before this chunk is counted, so fn_ is still job g's
      finished_.fetch_add(1, std::memory_order_acq_rel);
    }
  }

  void worker(uint64_t seen) {
    for (;;) {
      int spins = 0;
      while (gen_.load(std::memory_order_acquire) == seen && spins < 20000) { pause(); spins++; }
      if (gen_.load(std::memory_order_acquire) == seen) {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return gen_.load() != seen || stop_; });
      }
      if (stop_) return;
      seen = gen_.load(std::memory_order_acquire);
      work(seen);
    }
  }

  int nthreads_ = 1;
  std::vector<std::thread> threads_;
  std::atomic<uint64_t> gen_{0};
  std::atomic<uint64_t> state_{0};
  std::atomic<int64_t> finished_{0};
  int64_t nchunks_ = 0;
  const std::function<void(int64_t)>* fn_ = nullptr;
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
};

Pool& pool() {
  static Pool p;
  return p;
}

// Splits [0, n) into chunks of ``chunk``; each index is processed by exactly one thread.
template <class F>
void parallel_chunks(int64_t n, int64_t chunk, F&& f) {
  const int64_t nchunks = (n + chunk - 1) / chunk;
  if (pool().size() == 1 || nchunks <= 1) {
    if (n > 0) f(0, n);
    return;
  }
  pool().run(nchunks, [&](int64_t c) { f(c * chunk, std::min(n, c * chunk + chunk)); });
}

std::vector<uint8_t>& scratch() {
  static std::vector<uint8_t> s;
  return s;
}

enum ActKind { ACT_F32, ACT_Q8, ACT_Q8K };

ActKind act_kind(int t) {
  switch (t) {
    case T_Q4_0: case T_Q4_1: case T_Q5_0: case T_Q5_1: case T_Q8_0: return ACT_Q8;
    case T_Q4_K: case T_Q5_K: case T_Q6_K: return ACT_Q8K;
    default: return ACT_F32;
  }
}

// Activation row bytes for a weight type (0: activations stay float).
int64_t act_row_bytes(int t, int64_t k) {
  switch (act_kind(t)) {
    case ACT_Q8: return (k / QK) * (int64_t)sizeof(BlockQ8);
    case ACT_Q8K: return (k / QKK) * (int64_t)sizeof(BlockQ8K);
    default: return 0;
  }
}

void quantize_rows(int t, const float* x, int64_t m, int64_t k, uint8_t* qa) {
  const int64_t rb = act_row_bytes(t, k);
  const ActKind kind = act_kind(t);
  // a few rows quantize faster on this thread than the pool wakes up (each hand-off is a barrier)
  parallel_chunks(m, m < 16 ? m : 4, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; i++) {
      if (kind == ACT_Q8) quantize_q8(x + i * k, (BlockQ8*)(qa + i * rb), k);
      else quantize_q8k(x + i * k, (BlockQ8K*)(qa + i * rb), k);
    }
  });
}

// out[i, j] for activation rows [r0, r1), weight rows [lo, hi): activations prepared (qa) or float (x).
void matmul_block(int t, const float* x, const uint8_t* qa, int64_t r0, int64_t r1, const uint8_t* w, int64_t wrb,
                  int64_t k, int64_t lo, int64_t hi, float* out, int64_t ldo) {
  const int64_t arb = act_row_bytes(t, k);
#if defined(__AVX2__)
  // weight columns outer: their blocks stay in L1 while the activation rows pass over them
  // 4 x 2 tiles keep their 8 accumulators in the 16 vector registers; a single row (decode) takes 1 x 4,
  // reading one activation block for four weight rows.
  constexpr int TR = 4;
  const int tc = r1 - r0 == 1 ? 4 : 2;
  for (int64_t j = lo; j < hi; j += tc) {
    const int nc = (int)std::min<int64_t>(tc, hi - j);
    for (int64_t i = r0; i < r1; i += TR) {
      const int nr = (int)std::min<int64_t>(TR, r1 - i);
      tile(t, nr, nc, w + j * wrb, wrb, x + i * k, qa + i * arb, k, out + i * ldo + j, ldo);
    }
  }
#else
  for (int64_t j = lo; j < hi; j++) {
    const uint8_t* wr = w + j * wrb;
    for (int64_t i = r0; i < r1; i++) {
      float v;
      const uint8_t* ar = qa + i * arb;
      switch (t) {
        case T_Q4_0: v = dot_q4_0(wr, (const BlockQ8*)ar, k / QK); break;
        case T_Q4_1: v = dot_q4_1(wr, (const BlockQ8*)ar, k / QK); break;
        case T_Q5_0: v = dot_q5_0(wr, (const BlockQ8*)ar, k / QK); break;
        case T_Q5_1: v = dot_q5_1(wr, (const BlockQ8*)ar, k / QK); break;
        case T_Q8_0: v = dot_q8_0(wr, (const BlockQ8*)ar, k / QK); break;
        case T_Q4_K: v = dot_q4_k(wr, (const BlockQ8K*)ar, k / QKK); break;
        case T_Q5_K: v = dot_q5_k(wr, (const BlockQ8K*)ar, k / QKK); break;
        case T_Q6_K: v = dot_q6_k(wr, (const BlockQ8K*)ar, k / QKK); break;
        case T_F16: v = dot_f16(wr, x + i * k, k); break;
        case T_BF16: v = dot_bf16(wr, x + i * k, k); break;
        default: v = dot_f32(wr, x + i * k, k); break;
      }
      out[i * ldo + j] = v;
    }
  }
#endif
}

}  // namespace

// ====================================================================================== C ABI
extern "C" {

int slk_abi_version() { return 1; }

int slk_has_avx2() {
#if defined(__AVX2__)
  return 1;
#else
  return 0;
#endif
}

int slk_supported(int t) {
  TypeInfo ti;
  return type_info(t, &ti) ? 1 : 0;
}

// Bytes of one row of k inputs, or -1 if the type is unknown or k is not a multiple of its block.
int64_t slk_row_bytes(int t, int64_t k) {
  TypeInfo ti;
  if (!type_info(t, &ti) || k % ti.block != 0) return -1;
  return k / ti.block * ti.bytes;
}

void slk_set_num_threads(int n) { pool().resize(n); }
int slk_get_num_threads() { return pool().size(); }

// out[r, :] = dequantize(blocks[rows[r]]) (rows may be null: all n rows). Returns 0, or -1 on a bad type.
int slk_dequantize(const uint8_t* blocks, int t, int64_t n, int64_t k, const int64_t* rows, int64_t nrows,
                   float* out) {
  const int64_t rb = slk_row_bytes(t, k);
  if (rb < 0) return -1;
  const int64_t cnt = rows ? nrows : n;
  parallel_chunks(cnt, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; r++) {
      const int64_t src = rows ? rows[r] : r;
      dequant_row(t, blocks + src * rb, out + r * k, k);
    }
  });
  return 0;
}

// out[i * ldo + j] = sum_k x[i, k] * W[j, k] for i < m, j < n, W the n rows of GGUF blocks.
// Returns 0, or -1 on a bad type / shape.
int slk_matmul(const float* x, int64_t m, const uint8_t* w, int t, int64_t n, int64_t k, float* out, int64_t ldo) {
  const int64_t wrb = slk_row_bytes(t, k);
  if (wrb < 0) return -1;
  const int64_t arb = act_row_bytes(t, k);
  uint8_t* qa = nullptr;
  if (arb > 0) {
    auto& s = scratch();
    if ((int64_t)s.size() < m * arb) s.resize(m * arb);
    qa = s.data();
    quantize_rows(t, x, m, k, qa);
  }
  // Tasks: column chunks (a multiple of the 4-column tile, a few KiB of weights, several per thread for
  // balance) times row blocks of up to 64 rows (their activations stay in L2 while a chunk's weights pass).
  const int64_t rblock = 64;
  const int64_t nrb = (m + rblock - 1) / rblock;
  const int64_t threads = pool().size();
  int64_t chunk = std::max<int64_t>(4, (32768 / std::max<int64_t>(1, wrb)) & ~int64_t(3));
  const int64_t want_tasks = 4 * threads;
  if (nrb * ((n + chunk - 1) / chunk) < want_tasks)
    chunk = std::max<int64_t>(4, ((n * nrb + want_tasks - 1) / want_tasks + 3) & ~int64_t(3));
  const int64_t ncb = (n + chunk - 1) / chunk;
  auto task = [&](int64_t c) {
    const int64_t cb = c % ncb, rb = c / ncb;
    matmul_block(t, x, qa, rb * rblock, std::min(m, rb * rblock + rblock), w, wrb, k, cb * chunk,
                 std::min(n, cb * chunk + chunk), out, ldo);
  };
  if (threads == 1 || ncb * nrb <= 1) {
    for (int64_t c = 0; c < ncb * nrb; c++) task(c);
  } else {
    pool().run(ncb * nrb, task);
  }
  return 0;
}

}  // extern "C"
