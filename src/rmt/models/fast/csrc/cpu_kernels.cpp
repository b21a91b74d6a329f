// RMT's compiled CPU kernels: softmax attention over many short sequences (length <= 64), the shape
// of MaSA's decomposed passes; the rotation of queries and keys (rmt::rotate); the depthwise
// convolutions (of GELU), forward and backward (rmt::depthwise_forward, rmt::depthwise_backward); the
// blocks' layer norm in inference (rmt::layer_norm).
//
// out[s, h, i, :] = sum_j softmax_j(scale * q[s, h, i, :] . k[s, h, j, :] + bias[0, h, i, j]) v[s, h, j, :]
//
// Generic kernels (flash or matmul + softmax) pay a fixed cost per sequence and leave most of a
// vector register empty when a row holds 14 or 28 scores. Here one sequence is handled at a time
// with everything in L1/L2: the keys are transposed into a padded (d, Lp) block so that a row of
// scores accumulates as broadcast FMAs over j, the softmax runs across the row, and the output
// accumulates as FMAs over d. Several query rows go together (independent FMA chains hide the FMA
// latency). The loops have padded, fixed trip counts so the compiler vectorises them.
//
// Element types: float32, and bfloat16 (its bits in a uint16_t) with float32 arithmetic inside: a
// bfloat16 value is widened when it is loaded (a shift), every product and sum is float32, and
// outputs and gradients are rounded to nearest-even once, when they are stored (vcvtneps2bf16 on
// CPUs with AVX512-BF16). On such CPUs the bfloat16 forward pass multiplies with vdpbf16ps (pairs of
// bfloat16 products summed into float32 lanes), see attend_bf16; elsewhere it takes the float32 loops.
//
// Built with -DRMT_STANDALONE, the kernels compile without PyTorch (serial loops), for benchmarks.
#ifndef RMT_STANDALONE
#include <torch/extension.h>
#include <ATen/Parallel.h>
#endif

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#ifdef __AVX512F__
#include <immintrin.h>
#if defined(__AVX512BF16__) && !defined(RMT_PORTABLE_BF16)
#define RMT_AVX512_BF16 1
#endif
#endif
#include <cstdlib>
#include <vector>

namespace rmt {

using bf16_t = uint16_t;  // bfloat16 bits (at::BFloat16's storage)

// Element strides of the first three dims of an (S, H, L, D) view (D has unit stride).
struct Strides {
  int64_t s, h, l;
};

// MaSA's rotation of q and k, applied while they are packed (and, transposed, to their gradients
// when those are stored), so that the attention reads the projections directly: row i of sequence
// (s, h) is the token at position (s % mod) * step_s + i * step_i + (h / heads) * step_h of the
// (P, D) cos/sin tables (rows of a decomposed pass: mod = image height, step_s = width, step_i = 1;
// columns: step_i = width, heads = heads per token, step_h = 1). out = x cos + swap(x) sin.
template <typename T>
struct Rotation {
  const T* cos = nullptr;  // null: no rotation
  const T* sin = nullptr;
  int64_t D = 0, mod = 1, step_s = 0, step_i = 0, heads = 1, step_h = 0;
  const T* table(const T* t, int64_t s, int64_t h, int64_t i) const {
    return t + ((s % mod) * step_s + i * step_i + (h / heads) * step_h) * D;
  }
};

template <class F>
void parallel_over(int64_t n, int64_t grain, const F& f) {
#ifdef RMT_STANDALONE
  (void)grain;
  f(0, n);
#else
  at::parallel_for(0, n, grain, f);
#endif
}

inline float widen(float x) { return x; }
inline float widen(bf16_t x) {
  const uint32_t bits = static_cast<uint32_t>(x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline void narrow(float x, float* out) { *out = x; }
inline void narrow(float x, bf16_t* out) {  // round to nearest even (values are finite)
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  bits += 0x7fffu + ((bits >> 16) & 1u);
  *out = static_cast<bf16_t>(bits >> 16);
}

// 16 float32 lanes (GCC/Clang vector extension): one AVX-512 register, two AVX2 ones, ... The FMA
// loops below are written with it so that the compiler keeps their accumulators in registers.
typedef float vec16 __attribute__((vector_size(64)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));

inline vec16 load16(const float* p) {
  vec16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline vec16 load16(const bf16_t* p) {  // widened: the bfloat16 bits become a float32's high half
  u16x16 h;
  std::memcpy(&h, p, sizeof(h));
  const u32x16 w = __builtin_convertvector(h, u32x16) << 16;
  vec16 v;
  std::memcpy(&v, &w, sizeof(v));
  return v;
}
inline void store16(float* p, vec16 v) { std::memcpy(p, &v, sizeof(v)); }
inline void store16(bf16_t* p, vec16 v) {  // rounded to nearest even
  u32x16 bits;
  std::memcpy(&bits, &v, sizeof(bits));
  bits += 0x7fffu + ((bits >> 16) & 1u);
  const u16x16 h = __builtin_convertvector(bits >> 16, u16x16);
  std::memcpy(p, &h, sizeof(h));
}
inline vec16 splat(float x) { return vec16{} + x; }

typedef int32_t i32x16 __attribute__((vector_size(64)));
// (v[1], v[0], v[3], v[2], ...): the other member of each channel pair
inline vec16 swap_pairs(vec16 v) {
#if defined(__clang__)
  return __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
#else
  return __builtin_shuffle(v, i32x16{1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14});
#endif
}

// exp(x) for x <= ~0 in 16 lanes (exp_nonpositive's reduction and polynomial; rounding to the
// nearest integer as truncation of x * log2(e) - 0.5)
inline vec16 exp16v(vec16 x) {
  x = x < -87.0f ? splat(-87.0f) : x;
  const i32x16 ni = __builtin_convertvector(x * 1.44269504088896341f - 0.5f, i32x16);
  const vec16 n = __builtin_convertvector(ni, vec16);
  const vec16 r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  vec16 p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const i32x16 bits = (ni + 127) << 23;
  vec16 scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// |erf(x / sqrt(2))| in 16 lanes by Abramowitz & Stegun 7.1.26 (absolute error < 1.5e-7); `gauss`
// gets exp(-x^2 / 2), which it computes on the way
inline vec16 erf_abs16(vec16 x, vec16& gauss) {
  const vec16 z = (x < 0.0f ? -x : x) * 0.70710678118654752f;
  const vec16 t = 1.0f / (1.0f + 0.3275911f * z);
  const vec16 poly = t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f + t * (-1.453152027f + t * 1.061405429f))));
  gauss = exp16v(-(z * z));
  return 1.0f - poly * gauss;
}

// GELU (exact, erf form) in 16 lanes
inline vec16 gelu16(vec16 x) {
  vec16 gauss;
  const vec16 erf_abs = erf_abs16(x, gauss);
  return 0.5f * x * (1.0f + (x < 0.0f ? -erf_abs : erf_abs));
}

// GELU'(x) = Phi(x) + x phi(x) in 16 lanes
inline vec16 gelu_grad16(vec16 x) {
  vec16 gauss;
  const vec16 erf_abs = erf_abs16(x, gauss);
  return 0.5f * (1.0f + (x < 0.0f ? -erf_abs : erf_abs)) + x * gauss * 0.39894228040143268f;
}

// out[0:D] = src[0:D] * sc in T (D a multiple of 16)
template <int D>
inline void store_row(const float* src, float sc, float* out) {
  for (int d = 0; d < D; ++d) out[d] = src[d] * sc;
}
template <int D>
inline void store_row(const float* src, float sc, bf16_t* out) {
#ifdef RMT_AVX512_BF16
  const __m512 scale = _mm512_set1_ps(sc);
  for (int d = 0; d < D; d += 16) {
    const __m256bh packed = _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(src + d), scale));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + d), (__m256i)packed);
  }
#else
  for (int d = 0; d < D; ++d) narrow(src[d] * sc, out + d);
#endif
}

// exp(x) for x <= 0 (scores minus the row maximum): Cody-Waite reduction and a degree-6 polynomial,
// branch-free so that loops calling it vectorise; about 1 ulp in float32.
inline float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float n = std::nearbyint(x * 1.44269504088896341f);
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// Softmax of row[0:LP] in place (padding holds -1e30, so it gets probability ~0).
template <int LP>
inline void softmax_row(float* row) {
  float mx = row[0];
  for (int j = 1; j < LP; ++j) mx = row[j] > mx ? row[j] : mx;
  float sum = 0.0f;
  for (int j = 0; j < LP; ++j) {
    row[j] = exp_nonpositive(row[j] - mx);
    sum += row[j];
  }
  const float inv = 1.0f / sum;
  for (int j = 0; j < LP; ++j) row[j] *= inv;
}

// kt[d * LP + j] = widen(k[j][d]) * sc for j < L, 0 for L <= j < LP: 16 keys at a time through a tile.
template <typename T, int D, int LP>
inline void transpose_keys(const T* kb, int64_t stride, int64_t L, float sc, float* kt) {
  for (int64_t j0 = 0; j0 < LP; j0 += 16) {
    alignas(64) float tile[16][D];
    for (int64_t j = 0; j < 16; ++j) {
      if (j0 + j < L) {
        const T* kj = kb + (j0 + j) * stride;
        for (int d = 0; d < D; ++d) tile[j][d] = widen(kj[d]) * sc;
      } else {
        for (int d = 0; d < D; ++d) tile[j][d] = 0.0f;
      }
    }
    for (int d = 0; d < D; ++d)
      for (int j = 0; j < 16; ++j) kt[d * LP + j0 + j] = tile[j][d];
  }
}

// Forward: one (sequence, head) pair per iteration, kRows query rows at a time.
template <typename T, int D, int LP, int kRows>
void attend(const T* qp, const T* kp, const T* vp, const T* bp, T* op, float sc, int64_t S, int64_t H, int64_t Hb,
            int64_t L, Strides qs, Strides ks, Strides vs, Strides os) {
  constexpr int kBlocks = LP / 16, kVecD = D / 16;
  parallel_over(S * H, 16, [&](int64_t begin, int64_t end) {
    alignas(64) float kt[D * LP];
    alignas(64) float row[kRows][LP];
    alignas(64) float out[D];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t s = item / H, h = item % H;
      const T* qb = qp + s * qs.s + h * qs.h;
      const T* vb = vp + s * vs.s + h * vs.h;
      T* ob = op + s * os.s + h * os.h;
      const T* bb = bp + (h % Hb) * L * L;
      transpose_keys<T, D, LP>(kp + s * ks.s + h * ks.h, ks.l, L, sc, kt);
      for (int64_t i0 = 0; i0 < L; i0 += kRows) {
        const T* qi[kRows];
        const T* bi[kRows];
        for (int r = 0; r < kRows; ++r) {
          const int64_t i = i0 + r < L ? i0 + r : L - 1;  // past the end: recompute the last row, not stored
          qi[r] = qb + i * qs.l;
          bi[r] = bb + i * L;
        }
        vec16 scores[kRows][kBlocks] = {};
        for (int d = 0; d < D; ++d) {
          vec16 keys[kBlocks];
          for (int b = 0; b < kBlocks; ++b) keys[b] = load16(kt + d * LP + 16 * b);
          for (int r = 0; r < kRows; ++r) {
            const vec16 qd = splat(widen(qi[r][d]));
            for (int b = 0; b < kBlocks; ++b) scores[r][b] += qd * keys[b];
          }
        }
        for (int r = 0; r < kRows; ++r) {
          for (int b = 0; b < kBlocks; ++b) store16(row[r] + 16 * b, scores[r][b]);
          for (int j = 0; j < LP; ++j) row[r][j] = j < L ? row[r][j] + widen(bi[r][j]) : -1e30f;
          softmax_row<LP>(row[r]);
        }
        vec16 acc[kRows][kVecD] = {};
        for (int64_t j = 0; j < L; ++j) {
          vec16 values[kVecD];
          for (int c = 0; c < kVecD; ++c) values[c] = load16(vb + j * vs.l + 16 * c);
          for (int r = 0; r < kRows; ++r) {
            const vec16 pj = splat(row[r][j]);
            for (int c = 0; c < kVecD; ++c) acc[r][c] += pj * values[c];
          }
        }
        for (int r = 0; r < kRows && i0 + r < L; ++r) {
          for (int c = 0; c < kVecD; ++c) store16(out + 16 * c, acc[r][c]);
          store_row<D>(out, 1.0f, ob + (i0 + r) * os.l);
        }
      }
    }
  });
}

#ifdef __AVX512F__
// ---------------------------------------------------------------------------------------------------
// Lane-parallel kernels (AVX-512). A short sequence fills a vector badly (14 scores in 16 lanes,
// horizontal max and sum for every softmax row, one probability at a time broadcast into the P V
// product). Here the 16 lanes of a vector hold 16 *sequences* that share one bias table instead:
// each sequence's rows are transposed into lane order when they are loaded ("packed", one 16x16
// transpose per 16 channels), and then every score, exponential and product is a full-width
// vector operation, with no padding of the length and no horizontal reductions. The bias is
// broadcast (all lanes read the same table). Outputs are transposed back when they are stored.
// In bfloat16 on CPUs with AVX512-BF16, q k^T multiplies with vdpbf16ps: a sequence's row of D
// bfloat16 values is D/2 32-bit (d, d+1) pairs, so the packed q and k are already in the layout
// vdpbf16ps reads, and each instruction adds two products per lane into float32. P V runs in
// float32 (P is not rounded).
#define RMT_LANES 1

// 16x16 transpose of 32-bit elements held in r[0..15] (row i -> column i).
inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  __m512i u[16];
  for (int m = 0; m < 4; ++m) {
    u[4 * m + 0] = _mm512_unpacklo_epi64(t[4 * m], t[4 * m + 2]);
    u[4 * m + 1] = _mm512_unpackhi_epi64(t[4 * m], t[4 * m + 2]);
    u[4 * m + 2] = _mm512_unpacklo_epi64(t[4 * m + 1], t[4 * m + 3]);
    u[4 * m + 3] = _mm512_unpackhi_epi64(t[4 * m + 1], t[4 * m + 3]);
  }
  for (int e = 0; e < 4; ++e) {
    const __m512i x0 = _mm512_shuffle_i32x4(u[e], u[4 + e], 0x44);
    const __m512i x1 = _mm512_shuffle_i32x4(u[e], u[4 + e], 0xEE);
    const __m512i x2 = _mm512_shuffle_i32x4(u[8 + e], u[12 + e], 0x44);
    const __m512i x3 = _mm512_shuffle_i32x4(u[8 + e], u[12 + e], 0xEE);
    r[e] = _mm512_shuffle_i32x4(x0, x2, 0x88);
    r[4 + e] = _mm512_shuffle_i32x4(x0, x2, 0xDD);
    r[8 + e] = _mm512_shuffle_i32x4(x1, x3, 0x88);
    r[12 + e] = _mm512_shuffle_i32x4(x1, x3, 0xDD);
  }
}

// 16 consecutive values of a row as float32 lanes
inline __m512i load_widened(const float* p) { return _mm512_loadu_si512(p); }
inline __m512i load_widened(const bf16_t* p) {
  return _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16);
}
inline void store_narrowed(__m512 v, float* p) { _mm512_storeu_ps(p, v); }
inline void store_narrowed(__m512 v, bf16_t* p) {
#ifdef RMT_AVX512_BF16
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(v));
#else  // round to nearest even, then the high halves
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16)));
#endif
}

// exp(x) for x <= 0 in 16 lanes, the same reduction and polynomial as exp_nonpositive
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x));
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);  // p * 2^n
}

// The 16 sequences of a group: lane l reads rows at base[l] + i * row_stride (a zero row for lanes
// without a sequence, with row stride 0).
template <typename T>
struct Lanes {
  const T* base[16];
  int64_t row_stride[16];
  int64_t seq[16], head[16];  // (s, h) of each lane's sequence
  bool valid[16];
  const T* row(int l, int64_t i) const { return base[l] + i * row_stride[l]; }
};

// x cos + sign * swap(x) sin for 16 channels c0.. of lane l's row i
template <typename T>
inline __m512 rotated(__m512 x, const Rotation<T>& rot, const Lanes<T>& lanes, int l, int64_t i, int c0, float sign) {
  const __m512 c = _mm512_castsi512_ps(load_widened(rot.table(rot.cos, lanes.seq[l], lanes.head[l], i) + c0));
  const __m512 sn = _mm512_castsi512_ps(load_widened(rot.table(rot.sin, lanes.seq[l], lanes.head[l], i) + c0));
  return _mm512_fmadd_ps(_mm512_mul_ps(_mm512_permute_ps(x, 0xB1), _mm512_set1_ps(sign)), sn, _mm512_mul_ps(x, c));
}

// dst[i][c][0:16] = lane rows i, channels c (float32), for i < L; zero rows up to Lr.
template <typename T, int D>
inline void pack_widened(const Lanes<T>& lanes, int64_t L, int64_t Lr, __m512* dst, const Rotation<T>& rot = {}) {
  for (int64_t i = 0; i < L; ++i) {
    for (int c0 = 0; c0 < D; c0 += 16) {
      __m512i r[16];
      for (int l = 0; l < 16; ++l) {
        r[l] = load_widened(lanes.row(l, i) + c0);
        if (rot.cos && lanes.valid[l])
          r[l] = _mm512_castps_si512(rotated(_mm512_castsi512_ps(r[l]), rot, lanes, l, i, c0, 1.0f));
      }
      transpose16(r);
      for (int c = 0; c < 16; ++c) dst[i * D + c0 + c] = _mm512_castsi512_ps(r[c]);
    }
  }
  for (int64_t i = L; i < Lr; ++i)
    for (int c = 0; c < D; ++c) dst[i * D + c] = _mm512_setzero_ps();
}

#ifdef RMT_AVX512_BF16
// dst[i][w][0:16] = the (2w, 2w+1) bfloat16 pair of lane rows i, as 32-bit words; zero rows up to Lr.
// (Rotated rows are rounded back to bfloat16, as a separate rotation pass would store them.)
template <int D>
inline void pack_pairs(const Lanes<bf16_t>& lanes, int64_t L, int64_t Lr, __m512i* dst,
                       const Rotation<bf16_t>& rot = {}) {
  constexpr int W = D / 2;  // words per row
  for (int64_t i = 0; i < L; ++i) {
    for (int w0 = 0; w0 < W; w0 += 16) {
      __m512i r[16];
      for (int l = 0; l < 16; ++l) {
        const bf16_t* src = lanes.row(l, i) + 2 * w0;
        if (rot.cos && lanes.valid[l]) {  // channels 2 w0 .. 2 w0 + 31 (or + 15)
          const __m512 lo = rotated(_mm512_castsi512_ps(load_widened(src)), rot, lanes, l, i, 2 * w0, 1.0f);
          if (W - w0 >= 16) {
            const __m512 hi = rotated(_mm512_castsi512_ps(load_widened(src + 16)), rot, lanes, l, i, 2 * w0 + 16, 1.0f);
            r[l] = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
          } else {
            r[l] = _mm512_zextsi256_si512((__m256i)_mm512_cvtneps_pbh(lo));
          }
          continue;
        }
        r[l] = W - w0 >= 16 ? _mm512_loadu_si512(src)
                            : _mm512_zextsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)));
      }
      transpose16(r);
      for (int w = 0; w < 16 && w0 + w < W; ++w) dst[i * W + w0 + w] = r[w];
    }
  }
  for (int64_t i = L; i < Lr; ++i)
    for (int w = 0; w < W; ++w) dst[i * W + w] = _mm512_setzero_si512();
}
#endif

// Scratch space of one thread: packed q, k, v, scores of a block of rows and their outputs.
struct LaneScratch {
  explicit LaneScratch(size_t vectors) : data(static_cast<__m512*>(std::aligned_alloc(64, vectors * 64))) {}
  ~LaneScratch() { std::free(data); }
  __m512* data;
};

constexpr int kLaneRows = 4;  // query rows per block
constexpr int kLaneKeys = 4;  // keys per block of the score product

// The groups of 16 sequences: sequences (s, h) with the same bias table (h % Hb) go together.
struct LaneGroups {
  int64_t S, H, Hb, per_class, groups_per_class;
  LaneGroups(int64_t S_, int64_t H_, int64_t Hb_) : S(S_), H(H_), Hb(Hb_) {
    per_class = S * (H / Hb);
    groups_per_class = (per_class + 15) / 16;
  }
  int64_t count() const { return Hb * groups_per_class; }
  // lane l of group g: sequence (s, h), or false past the end of its class
  bool sequence(int64_t g, int l, int64_t& s, int64_t& h, int64_t& cls) const {
    cls = g / groups_per_class;
    const int64_t k = (g % groups_per_class) * 16 + l;
    if (k >= per_class) return false;
    const int64_t per_s = H / Hb;
    s = k / per_s;
    h = cls + (k % per_s) * Hb;
    return true;
  }
};

template <typename T>
Lanes<T> lanes_of(const LaneGroups& groups, int64_t g, const T* p, Strides st, const T* zero) {
  Lanes<T> lanes;
  for (int l = 0; l < 16; ++l) {
    int64_t s, h, cls;
    if (groups.sequence(g, l, s, h, cls)) {
      lanes.base[l] = p + s * st.s + h * st.h;
      lanes.row_stride[l] = st.l;
      lanes.valid[l] = true;
    } else {
      lanes.base[l] = zero;
      lanes.row_stride[l] = 0;
      lanes.valid[l] = false;
      s = h = 0;
    }
    lanes.seq[l] = s;
    lanes.head[l] = h;
  }
  return lanes;
}

template <typename T, int D>
void attend_lanes(const T* qp, const T* kp, const T* vp, const T* bp, T* op, float sc, int64_t S, int64_t H,
                  int64_t Hb, int64_t L, Strides qs, Strides ks, Strides vs, Strides os, const Rotation<T>& rot) {
  constexpr bool kPairs =
#ifdef RMT_AVX512_BF16
      std::is_same_v<T, bf16_t>;
#else
      false;
#endif
  constexpr int QK = kPairs ? D / 2 : D;  // vectors per packed q/k row (pairs or channels)
  const LaneGroups groups(S, H, Hb);
  const int64_t Lr = (L + kLaneRows - 1) / kLaneRows * kLaneRows;  // rows padded to whole blocks
  const int64_t Lk = (L + kLaneKeys - 1) / kLaneKeys * kLaneKeys;  // keys padded to whole blocks
  const int64_t Lmax = Lr > Lk ? Lr : Lk;
  alignas(64) static const T zero[64] = {};
  parallel_over(groups.count(), 1, [&](int64_t begin, int64_t end) {
    LaneScratch scratch(2 * Lmax * QK + Lmax * D + kLaneRows * Lk + kLaneRows * D);
    __m512* q = scratch.data;            // (Lr, QK)
    __m512* k = q + Lmax * QK;           // (Lk, QK)
    __m512* v = k + Lmax * QK;           // (Lk, D)
    __m512* prob = v + Lmax * D;         // (kLaneRows, Lk)
    __m512* out = prob + kLaneRows * Lk; // (kLaneRows, D)
    const __m512 scale = _mm512_set1_ps(sc);
    for (int64_t g = begin; g < end; ++g) {
      int64_t s0, h0, cls;
      groups.sequence(g, 0, s0, h0, cls);
      const T* bb = bp + cls * L * L;
      const Lanes<T> ql = lanes_of(groups, g, qp, qs, zero), kl = lanes_of(groups, g, kp, ks, zero);
      const Lanes<T> vl = lanes_of(groups, g, vp, vs, zero), ol = lanes_of(groups, g, static_cast<const T*>(op), os, zero);
#ifdef RMT_AVX512_BF16
      if constexpr (kPairs) {
        pack_pairs<D>(ql, L, Lr, reinterpret_cast<__m512i*>(q), rot);
        pack_pairs<D>(kl, L, Lk, reinterpret_cast<__m512i*>(k), rot);
      } else
#endif
      {
        pack_widened<T, D>(ql, L, Lr, q, rot);
        pack_widened<T, D>(kl, L, Lk, k, rot);
      }
      pack_widened<T, D>(vl, L, Lk, v);
      for (int64_t i0 = 0; i0 < L; i0 += kLaneRows) {
        // scores of kLaneRows x kLaneKeys blocks, scaled, plus the (broadcast) bias
        for (int64_t j0 = 0; j0 < Lk; j0 += kLaneKeys) {
          __m512 acc[kLaneRows][kLaneKeys];
          for (int r = 0; r < kLaneRows; ++r)
            for (int c = 0; c < kLaneKeys; ++c) acc[r][c] = _mm512_setzero_ps();
          for (int w = 0; w < QK; ++w) {
            __m512 kv[kLaneKeys];
            for (int c = 0; c < kLaneKeys; ++c) kv[c] = k[(j0 + c) * QK + w];
            for (int r = 0; r < kLaneRows; ++r) {
              const __m512 qv = q[(i0 + r) * QK + w];
              for (int c = 0; c < kLaneKeys; ++c) {
#ifdef RMT_AVX512_BF16
                if constexpr (kPairs)
                  acc[r][c] = _mm512_dpbf16_ps(acc[r][c], (__m512bh)qv, (__m512bh)kv[c]);
                else
#endif
                  acc[r][c] = _mm512_fmadd_ps(qv, kv[c], acc[r][c]);
              }
            }
          }
          for (int r = 0; r < kLaneRows; ++r) {
            const T* bi = bb + (i0 + r < L ? i0 + r : L - 1) * L;
            for (int c = 0; c < kLaneKeys; ++c) {
              const float bias = j0 + c < L ? widen(bi[j0 + c]) : 0.0f;
              prob[r * Lk + j0 + c] = _mm512_fmadd_ps(acc[r][c], scale, _mm512_set1_ps(bias));
            }
          }
        }
        // softmax over the L keys of each row, lane by lane
        for (int r = 0; r < kLaneRows; ++r) {
          __m512* pr = prob + r * Lk;
          __m512 mx = pr[0];
          for (int64_t j = 1; j < L; ++j) mx = _mm512_max_ps(mx, pr[j]);
          __m512 sum = _mm512_setzero_ps();
          for (int64_t j = 0; j < L; ++j) {
            pr[j] = exp16(_mm512_sub_ps(pr[j], mx));
            sum = _mm512_add_ps(sum, pr[j]);
          }
          const __m512 inv = _mm512_div_ps(_mm512_set1_ps(1.0f), sum);
          for (int64_t j = 0; j < L; ++j) pr[j] = _mm512_mul_ps(pr[j], inv);
        }
        // out = P V, 16 channels at a time
        constexpr int kC = 16 / kLaneRows;  // channels per pass: kLaneRows x kC accumulators
        for (int c0 = 0; c0 < D; c0 += kC) {
          __m512 acc[kLaneRows][kC];
          for (int r = 0; r < kLaneRows; ++r)
            for (int c = 0; c < kC; ++c) acc[r][c] = _mm512_setzero_ps();
          for (int64_t j = 0; j < L; ++j) {
            __m512 vv[kC];
            for (int c = 0; c < kC; ++c) vv[c] = v[j * D + c0 + c];
            for (int r = 0; r < kLaneRows; ++r) {
              const __m512 pj = prob[r * Lk + j];
              for (int c = 0; c < kC; ++c) acc[r][c] = _mm512_fmadd_ps(pj, vv[c], acc[r][c]);
            }
          }
          for (int r = 0; r < kLaneRows; ++r)
            for (int c = 0; c < kC; ++c) out[r * D + c0 + c] = acc[r][c];
        }
        // back to sequence order: one 16x16 transpose per row and 16 channels
        for (int r = 0; r < kLaneRows && i0 + r < L; ++r) {
          for (int c0 = 0; c0 < D; c0 += 16) {
            __m512i t[16];
            for (int c = 0; c < 16; ++c) t[c] = _mm512_castps_si512(out[r * D + c0 + c]);
            transpose16(t);
            for (int l = 0; l < 16; ++l)
              if (ol.valid[l])
                store_narrowed(_mm512_castsi512_ps(t[l]), const_cast<T*>(ol.row(l, i0 + r)) + c0);
          }
        }
      }
    }
  });
}
// Unpacks src[c][0:16] (c < D, one row of a group) into the lanes' rows i (c0..c0+15 per transpose),
// each multiplied by sc.
// With rot, the rows are rotated back (the gradient of a rotated input is the inverse rotation of the
// gradient of the rotated one).
template <typename T, int D>
inline void unpack_row(const __m512* src, float sc, const Lanes<T>& lanes, int64_t i, const Rotation<T>& rot = {}) {
  const __m512 scale = _mm512_set1_ps(sc);
  for (int c0 = 0; c0 < D; c0 += 16) {
    __m512i t[16];
    for (int c = 0; c < 16; ++c) t[c] = _mm512_castps_si512(_mm512_mul_ps(src[c0 + c], scale));
    transpose16(t);
    for (int l = 0; l < 16; ++l) {
      if (!lanes.valid[l]) continue;
      __m512 row = _mm512_castsi512_ps(t[l]);
      if (rot.cos) row = rotated(row, rot, lanes, l, i, c0, -1.0f);
      store_narrowed(row, const_cast<T*>(lanes.row(l, i)) + c0);
    }
  }
}

// The backward pass of attend_lanes, 16 sequences per vector, all products in float32:
//   P = softmax(scale q k^T + bias),  dP = dO v^T,  dS = P * (dP - rowsum(P * dP)),
//   dq = scale dS k,  dk = scale dS^T q,  dv = P^T dO.
// Pass 1 goes over query rows (kLaneRows at a time): S and dP rows, then P and dS, then dq. P and dS
// of the whole group are kept (L x L vectors each). Pass 2 goes over keys: dk and dv.
template <typename T, int D>
void attend_lanes_backward(const T* qp, const T* kp, const T* vp, const T* bp, const T* gp, T* dqp, T* dkp, T* dvp,
                           float sc, int64_t S, int64_t H, int64_t Hb, int64_t L, Strides qs, Strides ks, Strides vs,
                           Strides gs, Strides dqs, Strides dks, Strides dvs, const Rotation<T>& rot) {
  const LaneGroups groups(S, H, Hb);
  const int64_t Lr = (L + kLaneRows - 1) / kLaneRows * kLaneRows;
  const int64_t Lk = (L + kLaneKeys - 1) / kLaneKeys * kLaneKeys;
  const int64_t Lmax = Lr > Lk ? Lr : Lk;
  alignas(64) static const T zero[64] = {};
  parallel_over(groups.count(), 1, [&](int64_t begin, int64_t end) {
    LaneScratch scratch(4 * Lmax * D + 2 * Lmax * Lk + kLaneRows * D);
    __m512* q = scratch.data;          // (Lmax, D)
    __m512* k = q + Lmax * D;          // (Lmax, D)
    __m512* v = k + Lmax * D;          // (Lmax, D)
    __m512* g = v + Lmax * D;          // (Lmax, D): dO
    __m512* prob = g + Lmax * D;       // (Lmax, Lk): P
    __m512* dsc = prob + Lmax * Lk;    // (Lmax, Lk): dP, then dS
    __m512* out = dsc + Lmax * Lk;     // (kLaneRows, D)
    const __m512 scale = _mm512_set1_ps(sc);
    for (int64_t grp = begin; grp < end; ++grp) {
      int64_t s0, h0, cls;
      groups.sequence(grp, 0, s0, h0, cls);
      const T* bb = bp + cls * L * L;
      pack_widened<T, D>(lanes_of(groups, grp, qp, qs, zero), L, Lmax, q, rot);
      pack_widened<T, D>(lanes_of(groups, grp, kp, ks, zero), L, Lmax, k, rot);
      pack_widened<T, D>(lanes_of(groups, grp, vp, vs, zero), L, Lmax, v);
      pack_widened<T, D>(lanes_of(groups, grp, gp, gs, zero), L, Lmax, g);
      const Lanes<T> dql = lanes_of(groups, grp, static_cast<const T*>(dqp), dqs, zero);
      const Lanes<T> dkl = lanes_of(groups, grp, static_cast<const T*>(dkp), dks, zero);
      const Lanes<T> dvl = lanes_of(groups, grp, static_cast<const T*>(dvp), dvs, zero);
      // pass 1: rows of P and dS, and dq
      for (int64_t i0 = 0; i0 < L; i0 += kLaneRows) {
        for (int64_t j0 = 0; j0 < Lk; j0 += kLaneKeys) {
          __m512 as[kLaneRows][kLaneKeys], ad[kLaneRows][kLaneKeys];
          for (int r = 0; r < kLaneRows; ++r)
            for (int c = 0; c < kLaneKeys; ++c) as[r][c] = ad[r][c] = _mm512_setzero_ps();
          for (int d = 0; d < D; ++d) {
            __m512 kv[kLaneKeys], vv[kLaneKeys];
            for (int c = 0; c < kLaneKeys; ++c) {
              kv[c] = k[(j0 + c) * D + d];
              vv[c] = v[(j0 + c) * D + d];
            }
            for (int r = 0; r < kLaneRows; ++r) {
              const __m512 qv = q[(i0 + r) * D + d], gv = g[(i0 + r) * D + d];
              for (int c = 0; c < kLaneKeys; ++c) {
                as[r][c] = _mm512_fmadd_ps(qv, kv[c], as[r][c]);
                ad[r][c] = _mm512_fmadd_ps(gv, vv[c], ad[r][c]);
              }
            }
          }
          for (int r = 0; r < kLaneRows; ++r) {
            const T* bi = bb + (i0 + r < L ? i0 + r : L - 1) * L;
            for (int c = 0; c < kLaneKeys; ++c) {
              const float bias = j0 + c < L ? widen(bi[j0 + c]) : 0.0f;
              prob[(i0 + r) * Lk + j0 + c] = _mm512_fmadd_ps(as[r][c], scale, _mm512_set1_ps(bias));
              dsc[(i0 + r) * Lk + j0 + c] = ad[r][c];
            }
          }
        }
        for (int r = 0; r < kLaneRows; ++r) {
          __m512* pr = prob + (i0 + r) * Lk;
          __m512* dr = dsc + (i0 + r) * Lk;
          __m512 mx = pr[0];
          for (int64_t j = 1; j < L; ++j) mx = _mm512_max_ps(mx, pr[j]);
          __m512 sum = _mm512_setzero_ps();
          for (int64_t j = 0; j < L; ++j) {
            pr[j] = exp16(_mm512_sub_ps(pr[j], mx));
            sum = _mm512_add_ps(sum, pr[j]);
          }
          const __m512 inv = _mm512_div_ps(_mm512_set1_ps(1.0f), sum);
          __m512 delta = _mm512_setzero_ps();
          for (int64_t j = 0; j < L; ++j) {
            pr[j] = _mm512_mul_ps(pr[j], inv);
            delta = _mm512_fmadd_ps(pr[j], dr[j], delta);
          }
          for (int64_t j = 0; j < L; ++j) dr[j] = _mm512_mul_ps(pr[j], _mm512_sub_ps(dr[j], delta));
          for (int64_t j = L; j < Lk; ++j) pr[j] = dr[j] = _mm512_setzero_ps();  // padding keys: no gradient
        }
        // dq = scale dS k
        constexpr int kC = 16 / kLaneRows;
        for (int c0 = 0; c0 < D; c0 += kC) {
          __m512 acc[kLaneRows][kC];
          for (int r = 0; r < kLaneRows; ++r)
            for (int c = 0; c < kC; ++c) acc[r][c] = _mm512_setzero_ps();
          for (int64_t j = 0; j < L; ++j) {
            __m512 kv[kC];
            for (int c = 0; c < kC; ++c) kv[c] = k[j * D + c0 + c];
            for (int r = 0; r < kLaneRows; ++r) {
              const __m512 ds = dsc[(i0 + r) * Lk + j];
              for (int c = 0; c < kC; ++c) acc[r][c] = _mm512_fmadd_ps(ds, kv[c], acc[r][c]);
            }
          }
          for (int r = 0; r < kLaneRows; ++r)
            for (int c = 0; c < kC; ++c) out[r * D + c0 + c] = acc[r][c];
        }
        for (int r = 0; r < kLaneRows && i0 + r < L; ++r) unpack_row<T, D>(out + r * D, sc, dql, i0 + r, rot);
      }
      // pass 2: dv = P^T dO and dk = scale dS^T q, kLaneKeys keys and 2 channels at a time
      for (int64_t j0 = 0; j0 < L; j0 += kLaneKeys) {
        __m512 dv[kLaneKeys][D], dk[kLaneKeys][D];  // spilled to the stack: written once per key block
        for (int c0 = 0; c0 < D; c0 += 2) {
          __m512 av[kLaneKeys][2], ak[kLaneKeys][2];
          for (int c = 0; c < kLaneKeys; ++c)
            for (int e = 0; e < 2; ++e) av[c][e] = ak[c][e] = _mm512_setzero_ps();
          for (int64_t i = 0; i < L; ++i) {
            const __m512 g0 = g[i * D + c0], g1 = g[i * D + c0 + 1];
            const __m512 q0 = q[i * D + c0], q1 = q[i * D + c0 + 1];
            for (int c = 0; c < kLaneKeys; ++c) {
              const __m512 p = prob[i * Lk + j0 + c], ds = dsc[i * Lk + j0 + c];
              av[c][0] = _mm512_fmadd_ps(p, g0, av[c][0]);
              av[c][1] = _mm512_fmadd_ps(p, g1, av[c][1]);
              ak[c][0] = _mm512_fmadd_ps(ds, q0, ak[c][0]);
              ak[c][1] = _mm512_fmadd_ps(ds, q1, ak[c][1]);
            }
          }
          for (int c = 0; c < kLaneKeys; ++c)
            for (int e = 0; e < 2; ++e) {
              dv[c][c0 + e] = av[c][e];
              dk[c][c0 + e] = ak[c][e];
            }
        }
        for (int c = 0; c < kLaneKeys && j0 + c < L; ++c) {
          unpack_row<T, D>(dk[c], sc, dkl, j0 + c, rot);
          unpack_row<T, D>(dv[c], 1.0f, dvl, j0 + c);
        }
      }
    }
  });
}

#endif  // __AVX512F__


// Backward: recomputes P per (sequence, head) instead of storing it, then
//   dV = P^T dO,  dP = dO V^T,  dS = P * (dP - rowsum(P * dP)),  dQ = scale dS K,  dK = scale dS^T Q.
// Pass 1 goes over query rows (kRows at a time): P and dS rows, and dQ. Pass 2 goes over key rows
// (kCols at a time): dV and dK accumulate in registers over all query rows. The bias is a constant
// table (no gradient). All arithmetic is float32, whatever T is.
template <typename T, int D, int LP>
void attend_backward(const T* qp, const T* kp, const T* vp, const T* bp, const T* gp, T* dqp, T* dkp, T* dvp,
                     float sc, int64_t S, int64_t H, int64_t Hb, int64_t L, Strides qs, Strides ks, Strides vs, Strides gs,
                     Strides dqs, Strides dks, Strides dvs) {
  constexpr int kBlocks = LP / 16, kVecD = D / 16;
  constexpr int kRows = LP >= 48 ? 2 : 4;  // pass 1 keeps 2 * kRows * kBlocks accumulators
  constexpr int kCols = D >= 64 ? 2 : 4;   // pass 2 keeps 2 * kCols * kVecD accumulators
  // Scratch buffers in one block, each followed by 16 floats of padding: buffers whose sizes are
  // multiples of 4 KiB would otherwise sit 4 KiB apart, and a load from one then waits on stores to
  // the other (4K aliasing).
  constexpr int kPad = 16;
  constexpr int kT = D * LP + kPad, kMat = LP * LP + kPad;
  parallel_over(S * H, 8, [&](int64_t begin, int64_t end) {
    alignas(64) float scratch[5 * kT + 2 * kMat];
    float* kt = scratch;    // (D, LP): (scale K)^T
    float* vt = kt + kT;    // (D, LP): V^T
    float* kr = vt + kT;    // (LP, D): K rows
    float* qf = kr + kT;    // (LP, D): Q rows
    float* gf = qf + kT;    // (LP, D): dO rows
    float* p = gf + kT;     // (LP, LP): P
    float* ds = p + kMat;   // (LP, LP): dS
    alignas(64) float out[D];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t s = item / H, h = item % H;
      const T* qb = qp + s * qs.s + h * qs.h;
      const T* kb = kp + s * ks.s + h * ks.h;
      const T* vb = vp + s * vs.s + h * vs.h;
      const T* gb = gp + s * gs.s + h * gs.h;
      const T* bb = bp + (h % Hb) * L * L;
      transpose_keys<T, D, LP>(kb, ks.l, L, sc, kt);
      transpose_keys<T, D, LP>(vb, vs.l, L, 1.0f, vt);
      for (int64_t j = 0; j < L; ++j)
        for (int c = 0; c < kVecD; ++c) {
          store16(kr + j * D + 16 * c, load16(kb + j * ks.l + 16 * c));
          store16(qf + j * D + 16 * c, load16(qb + j * qs.l + 16 * c));
          store16(gf + j * D + 16 * c, load16(gb + j * gs.l + 16 * c));
        }
      // pass 1: P, dS and dQ, kRows query rows at a time
      for (int64_t i0 = 0; i0 < L; i0 += kRows) {
        alignas(64) float pr[kRows][LP];
        alignas(64) float dr[kRows][LP];
        const float* qi[kRows];
        const float* gi[kRows];
        const T* bi[kRows];
        for (int r = 0; r < kRows; ++r) {
          const int64_t i = i0 + r < L ? i0 + r : L - 1;  // past the end: recompute the last row, not stored
          qi[r] = qf + i * D;
          gi[r] = gf + i * D;
          bi[r] = bb + i * L;
        }
        vec16 scores[kRows][kBlocks] = {};
        vec16 dprob[kRows][kBlocks] = {};
        for (int d = 0; d < D; ++d) {
          vec16 keys[kBlocks], values[kBlocks];
          for (int b = 0; b < kBlocks; ++b) {
            keys[b] = load16(kt + d * LP + 16 * b);
            values[b] = load16(vt + d * LP + 16 * b);
          }
          for (int r = 0; r < kRows; ++r) {
            const vec16 qd = splat(qi[r][d]), gd = splat(gi[r][d]);
            for (int b = 0; b < kBlocks; ++b) {
              scores[r][b] += qd * keys[b];    // scores
              dprob[r][b] += gd * values[b];  // dP = dO V^T
            }
          }
        }
        for (int r = 0; r < kRows; ++r) {
          for (int b = 0; b < kBlocks; ++b) {
            store16(pr[r] + 16 * b, scores[r][b]);
            store16(dr[r] + 16 * b, dprob[r][b]);
          }
          for (int j = 0; j < LP; ++j) pr[r][j] = j < L ? pr[r][j] + widen(bi[r][j]) : -1e30f;
          softmax_row<LP>(pr[r]);
          float delta = 0.0f;
          for (int j = 0; j < LP; ++j) delta += pr[r][j] * dr[r][j];
          for (int j = 0; j < LP; ++j) dr[r][j] = pr[r][j] * (dr[r][j] - delta);
        }
        vec16 acc[kRows][kVecD] = {};  // dQ = scale dS K
        for (int64_t j = 0; j < L; ++j) {
          vec16 keys[kVecD];
          for (int c = 0; c < kVecD; ++c) keys[c] = load16(kr + j * D + 16 * c);
          for (int r = 0; r < kRows; ++r) {
            const vec16 dsij = splat(dr[r][j]);
            for (int c = 0; c < kVecD; ++c) acc[r][c] += dsij * keys[c];
          }
        }
        for (int r = 0; r < kRows && i0 + r < L; ++r) {
          const int64_t i = i0 + r;
          std::memcpy(p + i * LP, pr[r], sizeof(float) * LP);
          std::memcpy(ds + i * LP, dr[r], sizeof(float) * LP);
          for (int c = 0; c < kVecD; ++c) store16(out + 16 * c, acc[r][c]);
          store_row<D>(out, sc, dqp + s * dqs.s + h * dqs.h + i * dqs.l);
        }
      }
      // pass 2: dV = P^T dO and dK = scale dS^T Q, kCols key rows at a time (columns past L are
      // computed from P's ~0 padding and not stored; LP is a multiple of kCols)
      for (int64_t j0 = 0; j0 < L; j0 += kCols) {
        vec16 av[kCols][kVecD] = {};
        vec16 ak[kCols][kVecD] = {};
        for (int64_t i = 0; i < L; ++i) {
          vec16 gi[kVecD], qi[kVecD];
          for (int c = 0; c < kVecD; ++c) {
            gi[c] = load16(gf + i * D + 16 * c);
            qi[c] = load16(qf + i * D + 16 * c);
          }
          for (int col = 0; col < kCols; ++col) {
            const vec16 pij = splat(p[i * LP + j0 + col]), dsij = splat(ds[i * LP + j0 + col]);
            for (int c = 0; c < kVecD; ++c) {
              av[col][c] += pij * gi[c];
              ak[col][c] += dsij * qi[c];
            }
          }
        }
        for (int col = 0; col < kCols && j0 + col < L; ++col) {
          const int64_t j = j0 + col;
          for (int c = 0; c < kVecD; ++c) store16(out + 16 * c, ak[col][c]);
          store_row<D>(out, sc, dkp + s * dks.s + h * dks.h + j * dks.l);
          for (int c = 0; c < kVecD; ++c) store16(out + 16 * c, av[col][c]);
          store_row<D>(out, 1.0f, dvp + s * dvs.s + h * dvs.h + j * dvs.l);
        }
      }
    }
  });
}

// Calls f.template operator()<D, LP>() for the compiled (D, LP) case of a shape; false if none.
template <class F>
bool dispatch_shape(int64_t D, int64_t L, const F& f) {
  const int64_t LP = (L + 15) / 16 * 16;
#define RMT_CASE(d, lp)                   \
  if (D == d && LP == lp) {               \
    f.template operator()<d, lp>();       \
    return true;                          \
  }
#define RMT_LENGTHS(d) RMT_CASE(d, 16) RMT_CASE(d, 32) RMT_CASE(d, 48) RMT_CASE(d, 64)
  RMT_LENGTHS(16) RMT_LENGTHS(32) RMT_LENGTHS(64)
#undef RMT_LENGTHS
#undef RMT_CASE
  return false;
}

// The lane-parallel kernels where AVX-512 is compiled in (the per-sequence ones are then not built),
// else the per-sequence kernels. False for a shape without a compiled case.
// The lane-parallel kernels where AVX-512 is compiled in (the per-sequence ones are then not built),
// else the per-sequence kernels, which do not rotate (rot.cos must be null). False for a shape (or
// rotation) without a compiled case.
template <typename T>
bool forward(const T* qp, const T* kp, const T* vp, const T* bp, T* op, float sc, int64_t S, int64_t H, int64_t Hb,
             int64_t L, int64_t D, Strides qs, Strides ks, Strides vs, Strides os, const Rotation<T>& rot) {
#ifdef RMT_LANES
  if (L > 64 || (D != 16 && D != 32 && D != 64)) return false;
  if (D == 16) attend_lanes<T, 16>(qp, kp, vp, bp, op, sc, S, H, Hb, L, qs, ks, vs, os, rot);
  if (D == 32) attend_lanes<T, 32>(qp, kp, vp, bp, op, sc, S, H, Hb, L, qs, ks, vs, os, rot);
  if (D == 64) attend_lanes<T, 64>(qp, kp, vp, bp, op, sc, S, H, Hb, L, qs, ks, vs, os, rot);
  return true;
#else
  if (rot.cos) return false;
  return dispatch_shape(D, L, [&]<int d, int lp>() {
    attend<T, d, lp, 4>(qp, kp, vp, bp, op, sc, S, H, Hb, L, qs, ks, vs, os);
  });
#endif
}

template <typename T>
bool backward(const T* qp, const T* kp, const T* vp, const T* bp, const T* gp, T* dqp, T* dkp, T* dvp, float sc,
              int64_t S, int64_t H, int64_t Hb, int64_t L, int64_t D, Strides qs, Strides ks, Strides vs, Strides gs,
              Strides dqs, Strides dks, Strides dvs, const Rotation<T>& rot) {
#ifdef RMT_LANES
  if (L > 64 || (D != 16 && D != 32 && D != 64)) return false;
  if (D == 16)
    attend_lanes_backward<T, 16>(qp, kp, vp, bp, gp, dqp, dkp, dvp, sc, S, H, Hb, L, qs, ks, vs, gs, dqs, dks, dvs, rot);
  if (D == 32)
    attend_lanes_backward<T, 32>(qp, kp, vp, bp, gp, dqp, dkp, dvp, sc, S, H, Hb, L, qs, ks, vs, gs, dqs, dks, dvs, rot);
  if (D == 64)
    attend_lanes_backward<T, 64>(qp, kp, vp, bp, gp, dqp, dkp, dvp, sc, S, H, Hb, L, qs, ks, vs, gs, dqs, dks, dvs, rot);
  return true;
#else
  if (rot.cos) return false;
  return dispatch_shape(D, L, [&]<int d, int lp>() {
    attend_backward<T, d, lp>(qp, kp, vp, bp, gp, dqp, dkp, dvp, sc, S, H, Hb, L, qs, ks, vs, gs, dqs, dks, dvs);
  });
#endif
}

// Rotation (MaSA's rotary shift of queries and keys), one pass over x:
//   out[b, p, n, 2i]   = x[b, p, n, 2i] cos[p, 2i]     + sign * x[b, p, n, 2i+1] sin[p, 2i]
//   out[b, p, n, 2i+1] = x[b, p, n, 2i+1] cos[p, 2i+1] + sign * x[b, p, n, 2i] sin[p, 2i+1]
// (sin carries the pair signs; sign = -1 rotates back, which is the backward pass). x: (B, P, N, D)
// with unit stride in D; cos/sin: (P, D) contiguous; out: (B, P, N, D) contiguous. Float32 arithmetic.
template <typename T>
void rotate(const T* xp, const T* cp, const T* sp, T* op, float sign, int64_t B, int64_t P, int64_t N, int64_t D,
            Strides xs) {
  const int64_t Dv = D / 16 * 16;  // whole vectors; the rest pair by pair
  parallel_over(B * P, 64, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / P, pos = item % P;
      const T* c = cp + pos * D;
      const T* sn = sp + pos * D;
      for (int64_t n = 0; n < N; ++n) {
        const T* x = xp + b * xs.s + pos * xs.h + n * xs.l;
        T* o = op + (item * N + n) * D;
        for (int64_t d = 0; d < Dv; d += 16) {
          const vec16 xv = load16(x + d);
          store16(o + d, xv * load16(c + d) + sign * swap_pairs(xv) * load16(sn + d));
        }
        for (int64_t d = Dv; d < D; d += 2) {
          const float x0 = widen(x[d]), x1 = widen(x[d + 1]);
          narrow(x0 * widen(c[d]) + sign * x1 * widen(sn[d]), o + d);
          narrow(x1 * widen(c[d + 1]) + sign * x0 * widen(sn[d + 1]), o + d + 1);
        }
      }
    }
  });
}

// Depthwise, stride-1 convolutions with a K x K kernel and padding K/2 (MaSA's LePE, the blocks' 3x3
// convolutions, the FFN's GELU + 3x3) over channels-last tensors: forward, and the input, weight and
// bias gradients in one backward sweep. oneDNN's weight gradient for these shapes is 5-25x slower
// than its forward pass, and a conv of gelu(h) would otherwise write gelu(h) (and its gradient) to
// memory. A task takes one image and G blocks of 16 channels (G * 16 contiguous values per pixel,
// read in order) and walks down the rows, keeping the K input rows it needs widened to float32 (and
// passed through GELU, for conv(gelu(h))) in a ring of zero-padded rows: each input is converted
// once, and the inner loops run over one block's columns with no bounds and the K*K taps (or sums)
// in registers.
struct Strides4 {
  int64_t b, h, w;
};

// Channel blocks per task: up to 8 (128 channels), fewer where that leaves too few tasks to share.
inline int64_t channel_groups(int64_t B, int64_t blocks) {
  int64_t G = 8;
#ifdef RMT_STANDALONE
  const int64_t threads = 1;
#else
  const int64_t threads = at::get_num_threads();
#endif
  while (G > 1 && (blocks % G != 0 || B * (blocks / G) < 4 * threads)) G /= 2;
  return G;
}

// The K rows around output row y of one image and G channel blocks: float32 (passed through GELU for
// a conv of gelu(h)), zero-padded by K/2 columns on both sides; rows outside the image are zero.
// Element (x, g) of a padded row is at row[x * G + g], column x being input column x - K/2.
template <typename T, int K, bool kGelu>
class RowRing {
 public:
  RowRing(int64_t W, int64_t G)
      : W_(W), Wp_(W + 2 * (K / 2)), G_(G), data_(static_cast<vec16*>(std::aligned_alloc(64, K * Wp_ * G * 64))) {}
  ~RowRing() { std::free(data_); }
  RowRing(const RowRing&) = delete;
  RowRing& operator=(const RowRing&) = delete;

  void reset() { first_ = true; }
  // Loads rows y - K/2 .. y + K/2 of src (rows at src + yy * row_stride, columns col_stride apart),
  // reusing those already loaded for y - 1.
  void advance(const T* src, int64_t y, int64_t H, int64_t row_stride, int64_t col_stride) {
    constexpr int P = K / 2;
    for (int64_t yy = first_ ? y - P : y + P; yy <= y + P; ++yy) {
      vec16* row = slot(yy);
      for (int64_t i = 0; i < P * G_; ++i) row[i] = row[(Wp_ - P) * G_ + i] = vec16{};
      vec16* body = row + P * G_;
      if (yy < 0 || yy >= H) {
        for (int64_t i = 0; i < W_ * G_; ++i) body[i] = vec16{};
      } else {
        const T* line = src + yy * row_stride;
        for (int64_t x = 0; x < W_; ++x)
          for (int64_t g = 0; g < G_; ++g) {
            const vec16 value = load16(line + x * col_stride + g * 16);
            body[x * G_ + g] = kGelu ? gelu16(value) : value;
          }
      }
    }
    first_ = false;
  }
  // padded row for output row y and tap ky
  const vec16* row(int64_t y, int ky) const { return slot(y + ky - K / 2); }

 private:
  vec16* slot(int64_t yy) const { return data_ + ((yy + K) % K) * Wp_ * G_; }
  int64_t W_, Wp_, G_;
  vec16* data_;
  bool first_ = true;
};

// A row of G * 16 channels per column, computed block by block into `buffer` (x * G + g), stored in
// column order: the stores run through memory in order, like the loads.
template <typename T>
inline void store_row_blocks(const vec16* buffer, T* out, int64_t W, int64_t G, int64_t col_stride) {
  for (int64_t x = 0; x < W; ++x)
    for (int64_t g = 0; g < G; ++g) store16(out + x * col_stride + g * 16, buffer[x * G + g]);
}

// out = conv2d(act(in), w) + bias. w: (K*K, C) float32 taps; bias: (C) float32 or null.
template <typename T, int K, bool kGelu>
void depthwise_forward(const T* in, const float* w, const float* bias, T* out, int64_t B, int64_t H, int64_t W,
                       int64_t C, Strides4 is, Strides4 os) {
  const int64_t G = channel_groups(B, C / 16), groups = C / 16 / G;
  parallel_over(B * groups, 1, [&](int64_t begin, int64_t end) {
    RowRing<T, K, kGelu> ring(W, G);
    std::vector<vec16> buffer(W * G);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / groups, c0 = (item % groups) * G * 16;
      ring.reset();
      for (int64_t y = 0; y < H; ++y) {
        ring.advance(in + b * is.b + c0, y, H, is.h, is.w);
        for (int64_t g = 0; g < G; ++g) {
          const int64_t c = c0 + g * 16;
          vec16 taps[K][K];
          for (int ky = 0; ky < K; ++ky)
            for (int kx = 0; kx < K; ++kx) taps[ky][kx] = load16(w + (ky * K + kx) * C + c);
          const vec16 shift = bias ? load16(bias + c) : vec16{};
          const vec16* rows[K];
          for (int ky = 0; ky < K; ++ky) rows[ky] = ring.row(y, ky) + g;
          for (int64_t x = 0; x < W; ++x) {
            vec16 acc = shift;
            for (int ky = 0; ky < K; ++ky)
              for (int kx = 0; kx < K; ++kx) acc += taps[ky][kx] * rows[ky][(x + kx) * G];
            buffer[x * G + g] = acc;
          }
        }
        store_row_blocks(buffer.data(), out + b * os.b + y * os.h + c0, W, G, os.w);
      }
    }
  });
}

// Gradients of out = conv2d(act(in), w) + bias given g (the output gradient), in one sweep:
//   grad_in[y, x] = act'(in[y, x]) * sum_{ky, kx} w[K-1-ky, K-1-kx] g[y + ky - K/2, x + kx - K/2]
//   dw[c, ky, kx] = sum_{y, x} g[y, x, c] act(in)[y + ky - K/2, x + kx - K/2, c],  db[c] = sum g[y, x, c]
// with act(in) rows in one ring (for dw) and g rows in another (for grad_in); partial: (B, K*K + 1, C)
// float32 sums per image (the bias's last), summed by the caller.
template <typename T, int K, bool kGelu>
void depthwise_backward(const T* in, const T* g, const float* w, T* grad_in, float* partial, int64_t B, int64_t H,
                        int64_t W, int64_t C, Strides4 is, Strides4 gs, Strides4 os) {
  const int64_t G = channel_groups(B, C / 16), groups = C / 16 / G;
  parallel_over(B * groups, 1, [&](int64_t begin, int64_t end) {
    RowRing<T, K, kGelu> act_ring(W, G);
    RowRing<T, K, false> grad_ring(W, G);
    std::vector<vec16> buffer(W * G);
    std::vector<vec16> sums(G * (K * K + 1));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / groups, c0 = (item % groups) * G * 16;
      std::fill(sums.begin(), sums.end(), vec16{});
      act_ring.reset();
      grad_ring.reset();
      for (int64_t y = 0; y < H; ++y) {
        act_ring.advance(in + b * is.b + c0, y, H, is.h, is.w);
        grad_ring.advance(g + b * gs.b + c0, y, H, gs.h, gs.w);
        const T* irow = in + b * is.b + y * is.h + c0;
        for (int64_t gi = 0; gi < G; ++gi) {
          const int64_t c = c0 + gi * 16;
          const vec16* act_rows[K];
          const vec16* grad_rows[K];
          for (int ky = 0; ky < K; ++ky) {
            act_rows[ky] = act_ring.row(y, ky) + gi;
            grad_rows[ky] = grad_ring.row(y, ky) + gi;
          }
          const vec16* grad_y = grad_rows[K / 2] + (K / 2) * G;  // g[y, x] at grad_y[x * G]
          vec16* held = sums.data() + gi * (K * K + 1);
          vec16 acc[K][K];
          for (int ky = 0; ky < K; ++ky)
            for (int kx = 0; kx < K; ++kx) acc[ky][kx] = held[ky * K + kx];
          vec16 acc_bias = held[K * K];
          for (int64_t x = 0; x < W; ++x) {
            const vec16 gv = grad_y[x * G];
            acc_bias += gv;
            for (int ky = 0; ky < K; ++ky)
              for (int kx = 0; kx < K; ++kx) acc[ky][kx] += gv * act_rows[ky][(x + kx) * G];
          }
          for (int ky = 0; ky < K; ++ky)
            for (int kx = 0; kx < K; ++kx) held[ky * K + kx] = acc[ky][kx];
          held[K * K] = acc_bias;
          vec16 flipped[K][K];
          for (int ky = 0; ky < K; ++ky)
            for (int kx = 0; kx < K; ++kx) flipped[ky][kx] = load16(w + ((K - 1 - ky) * K + (K - 1 - kx)) * C + c);
          for (int64_t x = 0; x < W; ++x) {
            vec16 sum = {};
            for (int ky = 0; ky < K; ++ky)
              for (int kx = 0; kx < K; ++kx) sum += flipped[ky][kx] * grad_rows[ky][(x + kx) * G];
            if (kGelu) sum *= gelu_grad16(load16(irow + x * is.w + gi * 16));
            buffer[x * G + gi] = sum;
          }
        }
        store_row_blocks(buffer.data(), grad_in + b * os.b + y * os.h + c0, W, G, os.w);
      }
      float* out = partial + b * (K * K + 1) * C + c0;
      for (int64_t gi = 0; gi < G; ++gi)
        for (int j = 0; j < K * K + 1; ++j) store16(out + j * C + gi * 16, sums[gi * (K * K + 1) + j]);
    }
  });
}

// Layer norm over the last dimension of N rows of C channels (C a multiple of 16), float32 statistics
// (two passes over the row, in cache), for inference: ATen's CPU kernel runs at a third of the
// memory speed in bfloat16. in, out: rows row_stride elements apart, unit stride in C.
template <typename T>
void layer_norm(const T* in, const float* weight, const float* bias, T* out, int64_t N, int64_t C, int64_t in_stride,
                int64_t out_stride, float eps) {
  const int64_t V = C / 16;
  parallel_over(N, 64, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const T* x = in + n * in_stride;
      vec16 sum = {};
      for (int64_t v = 0; v < V; ++v) sum += load16(x + 16 * v);
      float mean = 0.0f;
      for (int l = 0; l < 16; ++l) mean += sum[l];
      mean /= static_cast<float>(C);
      vec16 sq = {};
      for (int64_t v = 0; v < V; ++v) {
        const vec16 d = load16(x + 16 * v) - mean;
        sq += d * d;
      }
      float var = 0.0f;
      for (int l = 0; l < 16; ++l) var += sq[l];
      const float rstd = 1.0f / std::sqrt(var / static_cast<float>(C) + eps);
      T* y = out + n * out_stride;
      for (int64_t v = 0; v < V; ++v)
        store16(y + 16 * v, (load16(x + 16 * v) - mean) * rstd * load16(weight + 16 * v) + load16(bias + 16 * v));
    }
  });
}

}  // namespace rmt

#ifndef RMT_STANDALONE
namespace {

void check(const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == q.scalar_type(), name, ": a CPU tensor of q's dtype is required");
  TORCH_CHECK(t.dim() == 4 && t.stride(3) == 1, name, ": a 4-D tensor with contiguous last dimension is required");
  TORCH_CHECK(t.sizes() == q.sizes(), name, ": shape mismatch with q");
}

void check_bias(const at::Tensor& bias, const at::Tensor& q) {
  TORCH_CHECK(bias.is_contiguous() && bias.scalar_type() == q.scalar_type() && bias.dim() == 4 &&
              bias.size(0) == 1 && bias.size(1) > 0 && q.size(1) % bias.size(1) == 0 && bias.size(2) == q.size(2) &&
              bias.size(3) == q.size(2), "bias must be a contiguous (1, Hb, L, L) tensor of q's dtype, Hb dividing H");
}

rmt::Strides strides(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

template <typename T>
const T* data(const at::Tensor& t) {
  if constexpr (std::is_same_v<T, float>) return t.data_ptr<float>();
  else return reinterpret_cast<const rmt::bf16_t*>(t.data_ptr<at::BFloat16>());
}

template <typename T>
T* mutable_data(at::Tensor& t) {
  if constexpr (std::is_same_v<T, float>) return t.data_ptr<float>();
  else return reinterpret_cast<rmt::bf16_t*>(t.data_ptr<at::BFloat16>());
}

// The rotation to fuse: cos, sin (P, D) tables of q's dtype and (mod, step_s, step_i, heads, step_h), or none.
template <typename T>
rmt::Rotation<T> rotation(const at::Tensor& q, const c10::optional<at::Tensor>& cos,
                          const c10::optional<at::Tensor>& sin, const std::vector<int64_t>& steps) {
  rmt::Rotation<T> rot;
  if (!cos.has_value() || !cos->defined()) return rot;
  TORCH_CHECK(sin.has_value() && sin->defined() && steps.size() == 5, "rotation: cos, sin and 5 steps");
  for (const at::Tensor* t : {&*cos, &*sin})
    TORCH_CHECK(t->is_contiguous() && t->scalar_type() == q.scalar_type() && t->dim() == 2 && t->size(1) == q.size(3),
                "rotation tables: contiguous (P, D) tensors of q's dtype");
  TORCH_CHECK(steps[0] > 0 && steps[3] > 0, "rotation: positive mod and heads");
  rot.cos = data<T>(*cos);
  rot.sin = data<T>(*sin);
  rot.D = q.size(3);
  rot.mod = steps[0];
  rot.step_s = steps[1];
  rot.step_i = steps[2];
  rot.heads = steps[3];
  rot.step_h = steps[4];
  return rot;
}

template <typename T>
bool forward_typed(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& bias, float sc,
                   at::Tensor& out, const rmt::Rotation<T>& rot) {
  return rmt::forward<T>(data<T>(q), data<T>(k), data<T>(v), data<T>(bias), mutable_data<T>(out), sc, q.size(0),
                         q.size(1), bias.size(1), q.size(2), q.size(3), strides(q), strides(k), strides(v),
                         strides(out), rot);
}

template <typename T>
bool backward_typed(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& bias, float sc,
                    const at::Tensor& grad_out, at::Tensor& grad_q, at::Tensor& grad_k, at::Tensor& grad_v,
                    const rmt::Rotation<T>& rot) {
  return rmt::backward<T>(data<T>(q), data<T>(k), data<T>(v), data<T>(bias), data<T>(grad_out),
                          mutable_data<T>(grad_q), mutable_data<T>(grad_k), mutable_data<T>(grad_v), sc, q.size(0),
                          q.size(1), bias.size(1), q.size(2), q.size(3), strides(q), strides(k), strides(v),
                          strides(grad_out), strides(grad_q), strides(grad_k), strides(grad_v), rot);
}

void check_dtype(const at::Tensor& q) {
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16, "q: float32 or bfloat16 is required");
}

}  // namespace

// q, k, v, out: (S, H, L, D) strided views with unit stride in D, float32 or bfloat16 alike; bias:
// (1, Hb, L, L) contiguous, same dtype, Hb dividing H: head h adds table h % Hb (MaSA's column pass
// has one table per head, shared by all columns). With rot_cos/rot_sin (P, D) and rot_steps (see
// rmt::Rotation), q and k are rotated as they are read (lane-parallel kernels only: see
// "fused_rotation"); without, they are used as they are. Writes out and returns true; returns false (nothing written)
// for a shape without a compiled kernel.
bool short_attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& bias,
                             double scale, at::Tensor out, const c10::optional<at::Tensor>& rot_cos,
                             const c10::optional<at::Tensor>& rot_sin, const std::vector<int64_t>& rot_steps) {
  check_dtype(q);
  check(q, "q", q); check(k, "k", q); check(v, "v", q); check(out, "out", q);
  check_bias(bias, q);
  const float sc = static_cast<float>(scale);
  return q.scalar_type() == at::kFloat
             ? forward_typed<float>(q, k, v, bias, sc, out, rotation<float>(q, rot_cos, rot_sin, rot_steps))
             : forward_typed<rmt::bf16_t>(q, k, v, bias, sc, out, rotation<rmt::bf16_t>(q, rot_cos, rot_sin, rot_steps));
}

// Gradients of short_attention_forward with respect to q, k and v (the unrotated q and k where the
// rotation is fused), written into grad_q/grad_k/grad_v (same shape and dtype, unit stride in D).
// Returns false for a shape without a compiled kernel.
bool short_attention_backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& bias,
                              double scale, const at::Tensor& grad_out, at::Tensor grad_q, at::Tensor grad_k,
                              at::Tensor grad_v, const c10::optional<at::Tensor>& rot_cos,
                              const c10::optional<at::Tensor>& rot_sin, const std::vector<int64_t>& rot_steps) {
  check_dtype(q);
  check(q, "q", q); check(k, "k", q); check(v, "v", q); check(grad_out, "grad_out", q);
  check(grad_q, "grad_q", q); check(grad_k, "grad_k", q); check(grad_v, "grad_v", q);
  check_bias(bias, q);
  const float sc = static_cast<float>(scale);
  return q.scalar_type() == at::kFloat
             ? backward_typed<float>(q, k, v, bias, sc, grad_out, grad_q, grad_k, grad_v,
                                     rotation<float>(q, rot_cos, rot_sin, rot_steps))
             : backward_typed<rmt::bf16_t>(q, k, v, bias, sc, grad_out, grad_q, grad_k, grad_v,
                                           rotation<rmt::bf16_t>(q, rot_cos, rot_sin, rot_steps));
}

// out = x cos + sign * swap(x) sin (see rmt::rotate); x: (B, P, N, D), unit stride in D; cos, sin: (P, D)
// contiguous; out: (B, P, N, D) contiguous; one dtype, float32 or bfloat16; D even.
void rotate(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, double sign, at::Tensor out) {
  check_dtype(x);
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 4 && x.stride(3) == 1 && x.size(3) % 2 == 0,
              "x: a CPU (B, P, N, D) tensor with contiguous, even last dimension is required");
  for (const at::Tensor* t : {&cos, &sin})
    TORCH_CHECK(t->is_contiguous() && t->scalar_type() == x.scalar_type() && t->dim() == 2 &&
                t->size(0) == x.size(1) && t->size(1) == x.size(3), "cos/sin: contiguous (P, D) tables of x's dtype");
  TORCH_CHECK(out.is_contiguous() && out.scalar_type() == x.scalar_type() && out.sizes() == x.sizes(),
              "out: a contiguous tensor like x");
  const rmt::Strides xs{x.stride(0), x.stride(1), x.stride(2)};
  const float sg = static_cast<float>(sign);
  if (x.scalar_type() == at::kFloat)
    rmt::rotate<float>(data<float>(x), data<float>(cos), data<float>(sin), mutable_data<float>(out), sg, x.size(0),
                       x.size(1), x.size(2), x.size(3), xs);
  else
    rmt::rotate<rmt::bf16_t>(data<rmt::bf16_t>(x), data<rmt::bf16_t>(cos), data<rmt::bf16_t>(sin),
                             mutable_data<rmt::bf16_t>(out), sg, x.size(0), x.size(1), x.size(2), x.size(3), xs);
}

void check_depthwise(const at::Tensor& input, const at::Tensor& other, const char* name) {
  check_dtype(input);
  TORCH_CHECK(other.scalar_type() == input.scalar_type() && input.dim() == 4 && other.sizes() == input.sizes() &&
              input.stride(1) == 1 && other.stride(1) == 1 && input.size(1) % 16 == 0 && input.device().is_cpu(),
              "input, ", name, ": CPU (B, C, H, W) tensors alike with unit stride in C, C a multiple of 16");
}

template <typename F>
bool with_kernel(const at::Tensor& input, int64_t K, bool gelu, const F& f) {
  auto typed = [&]<typename T>() {
    auto sized = [&]<int k>() { gelu ? f.template operator()<T, k, true>() : f.template operator()<T, k, false>(); };
    if (K == 3) sized.template operator()<3>();
    if (K == 5) sized.template operator()<5>();
    if (K == 7) sized.template operator()<7>();
  };
  if (K != 3 && K != 5 && K != 7) return false;
  if (input.scalar_type() == at::kFloat) typed.template operator()<float>();
  else typed.template operator()<rmt::bf16_t>();
  return true;
}

// taps: (C, 1, K, K) weights as the kernels read them, (K*K, C) float32
at::Tensor depthwise_taps(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 4 && weight.size(1) == 1 && weight.size(2) == weight.size(3), "weight: (C, 1, K, K)");
  return weight.to(at::kFloat).reshape({weight.size(0), -1}).t().contiguous();
}

// conv2d(act(input), weight, bias) (depthwise, stride 1, padding K/2; act = GELU when gelu) of a
// (B, C, H, W) channels-last input (see rmt::depthwise_forward); bias: (C) or None. Returns a new
// channels-last tensor like input; an undefined tensor for a kernel size without a compiled case.
at::Tensor depthwise_forward(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                             bool gelu) {
  check_depthwise(input, input, "input");
  const int64_t B = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3), K = weight.size(-1);
  TORCH_CHECK(weight.size(0) == C, "weight: one (1, K, K) kernel per channel");
  const at::Tensor taps = depthwise_taps(weight);
  at::Tensor shift;
  if (bias.has_value() && bias->defined()) shift = bias->to(at::kFloat).contiguous();
  at::Tensor out = at::empty_like(input, at::MemoryFormat::ChannelsLast);
  const rmt::Strides4 is{input.stride(0), input.stride(2), input.stride(3)};
  const rmt::Strides4 os{out.stride(0), out.stride(2), out.stride(3)};
  const bool compiled = with_kernel(input, K, gelu, [&]<typename T, int k, bool g>() {
    rmt::depthwise_forward<T, k, g>(data<T>(input), taps.data_ptr<float>(),
                                    shift.defined() ? shift.data_ptr<float>() : nullptr, mutable_data<T>(out), B, H, W,
                                    C, is, os);
  });
  return compiled ? out : at::Tensor();
}

// Gradients of depthwise_forward given grad_out (input's shape and dtype, channels-last): returns
// grad_input (like input) and the (C, K*K + 1) float32 sums of each channel (its K*K weight
// gradients, then its bias gradient); undefined tensors for a kernel size without a compiled case.
std::tuple<at::Tensor, at::Tensor> depthwise_backward(const at::Tensor& input, const at::Tensor& grad_out,
                                                      const at::Tensor& weight, bool gelu) {
  check_depthwise(input, grad_out, "grad_out");
  const int64_t B = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3), K = weight.size(-1);
  TORCH_CHECK(weight.size(0) == C, "weight: one (1, K, K) kernel per channel");
  const at::Tensor taps = depthwise_taps(weight);
  at::Tensor grad_in = at::empty_like(input, at::MemoryFormat::ChannelsLast);
  at::Tensor partial = at::empty({B, K * K + 1, C}, input.options().dtype(at::kFloat));
  const rmt::Strides4 is{input.stride(0), input.stride(2), input.stride(3)};
  const rmt::Strides4 gs{grad_out.stride(0), grad_out.stride(2), grad_out.stride(3)};
  const rmt::Strides4 os{grad_in.stride(0), grad_in.stride(2), grad_in.stride(3)};
  const bool compiled = with_kernel(input, K, gelu, [&]<typename T, int k, bool g>() {
    rmt::depthwise_backward<T, k, g>(data<T>(input), data<T>(grad_out), taps.data_ptr<float>(), mutable_data<T>(grad_in),
                                     partial.data_ptr<float>(), B, H, W, C, is, gs, os);
  });
  if (!compiled) return {at::Tensor(), at::Tensor()};
  return {grad_in, partial.sum(0).t().contiguous()};
}

// Layer norm of (..., C) rows (see rmt::layer_norm): input contiguous, float32 or bfloat16, C a multiple
// of 16; weight, bias: (C) float32. Returns a new tensor like input.
at::Tensor layer_norm(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias, double eps) {
  check_dtype(input);
  const int64_t C = input.size(-1);
  TORCH_CHECK(input.device().is_cpu() && input.is_contiguous() && C % 16 == 0, "input: contiguous CPU (..., C), C % 16 == 0");
  for (const at::Tensor* t : {&weight, &bias})
    TORCH_CHECK(t->is_contiguous() && t->scalar_type() == at::kFloat && t->numel() == C, "weight/bias: float32 (C)");
  at::Tensor out = at::empty_like(input);
  const int64_t N = input.numel() / C;
  if (input.scalar_type() == at::kFloat)
    rmt::layer_norm<float>(data<float>(input), weight.data_ptr<float>(), bias.data_ptr<float>(),
                           mutable_data<float>(out), N, C, C, C, static_cast<float>(eps));
  else
    rmt::layer_norm<rmt::bf16_t>(data<rmt::bf16_t>(input), weight.data_ptr<float>(), bias.data_ptr<float>(),
                                 mutable_data<rmt::bf16_t>(out), N, C, C, C, static_cast<float>(eps));
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
#ifdef RMT_LANES
  m.attr("fused_rotation") = true;
#else
  m.attr("fused_rotation") = false;
#endif
  m.def("layer_norm", &layer_norm, "layer norm over the last dimension, for inference (CPU)");
  m.def("depthwise_forward", &depthwise_forward,
        "depthwise stride-1 conv2d (of GELU) over channels-last tensors (CPU)");
  m.def("depthwise_backward", &depthwise_backward,
        "its input gradient and weight and bias sums, in one sweep (CPU)");
  m.def("rotate", &rotate, "MaSA's rotary shift of (B, P, N, D) tokens by (P, D) tables (CPU, float32 or bfloat16)");
  m.def("forward", &short_attention_forward, "softmax attention over short sequences (CPU, float32 or bfloat16)");
  m.def("backward", &short_attention_backward, "its gradients with respect to q, k and v");
}
#endif
