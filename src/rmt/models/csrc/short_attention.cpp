// Softmax attention over many short sequences (length <= 32), the shape of MaSA's decomposed passes.
//
// out[s, h, i, :] = sum_j softmax_j(scale * q[s, h, i, :] . k[s, h, j, :] + bias[0, h, i, j]) v[s, h, j, :]
//
// Generic kernels (flash or matmul + softmax) pay a fixed cost per sequence and leave most of a
// vector register empty when a row holds 14 or 28 scores. Here one sequence is handled at a time
// with everything in L1: the keys are transposed into a padded (d, Lp) block so that a row of scores
// accumulates as broadcast FMAs over j, the softmax runs across the row, and the output
// accumulates as FMAs over d. The loops have padded, fixed trip counts so the compiler vectorises them.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

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

void check(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, name, ": a float32 CPU tensor is required");
  TORCH_CHECK(t.dim() == 4 && t.stride(3) == 1, name, ": a 4-D tensor with contiguous last dimension is required");
}

}  // namespace

// One (sequence, head) pair per iteration; D, LP (L padded to 16) and kRows (query rows per block)
// are compile-time constants so that every inner loop has a fixed trip count and vectorises fully.
template <int D, int LP, int kRows>
void attend(const float* qp, const float* kp, const float* vp, const float* bp, float* op, float sc, int64_t S,
            int64_t H, int64_t L, at::IntArrayRef qs, at::IntArrayRef ks, at::IntArrayRef vs, at::IntArrayRef os) {
  at::parallel_for(0, S * H, 16, [&](int64_t begin, int64_t end) {
    alignas(64) float kt[D * LP];
    alignas(64) float row[kRows][LP];
    alignas(64) float acc[kRows][D];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t s = item / H, h = item % H;
      const float* qb = qp + s * qs[0] + h * qs[1];
      const float* kb = kp + s * ks[0] + h * ks[1];
      const float* vb = vp + s * vs[0] + h * vs[1];
      float* ob = op + s * os[0] + h * os[1];
      const float* bb = bp + h * L * L;
      // keys transposed into kt[d][j] (scaled, zero-padded), one 16x16 tile at a time through registers
      for (int64_t j0 = 0; j0 < LP; j0 += 16) {
        alignas(64) float tile[16][D];
        for (int64_t j = 0; j < 16; ++j) {
          if (j0 + j < L) {
            const float* kj = kb + (j0 + j) * ks[2];
            for (int d = 0; d < D; ++d) tile[j][d] = kj[d] * sc;
          } else {
            for (int d = 0; d < D; ++d) tile[j][d] = 0.0f;
          }
        }
        for (int d = 0; d < D; ++d)
          for (int j = 0; j < 16; ++j) kt[d * LP + j0 + j] = tile[j][d];
      }
      // kRows query rows at a time: independent FMA chains hide the FMA latency (rows of 28 and more)
      for (int64_t i0 = 0; i0 < L; i0 += kRows) {
        const float* qi[kRows];
        const float* bi[kRows];
        for (int r = 0; r < kRows; ++r) {
          const int64_t i = i0 + r < L ? i0 + r : L - 1;  // past the end: recompute the last row, not stored
          qi[r] = qb + i * qs[2];
          bi[r] = bb + i * L;
        }
        for (int r = 0; r < kRows; ++r)
          for (int j = 0; j < LP; ++j) row[r][j] = j < L ? bi[r][j] : -1e30f;
        for (int d = 0; d < D; ++d) {
          const float* kd = kt + d * LP;
          for (int r = 0; r < kRows; ++r) {
            const float qd = qi[r][d];
            for (int j = 0; j < LP; ++j) row[r][j] += qd * kd[j];
          }
        }
        for (int r = 0; r < kRows; ++r) {
          float mx = row[r][0];
          for (int j = 1; j < LP; ++j) mx = row[r][j] > mx ? row[r][j] : mx;
          float sum = 0.0f;
          for (int j = 0; j < LP; ++j) {
            row[r][j] = exp_nonpositive(row[r][j] - mx);
            sum += row[r][j];
          }
          const float inv = 1.0f / sum;
          for (int j = 0; j < LP; ++j) row[r][j] *= inv;
        }
        for (int r = 0; r < kRows; ++r)
          for (int d = 0; d < D; ++d) acc[r][d] = 0.0f;
        for (int64_t j = 0; j < L; ++j) {
          const float* vj = vb + j * vs[2];
          for (int r = 0; r < kRows; ++r) {
            const float pj = row[r][j];
            for (int d = 0; d < D; ++d) acc[r][d] += pj * vj[d];
          }
        }
        for (int r = 0; r < kRows && i0 + r < L; ++r) {
          float* oi = ob + (i0 + r) * os[2];
          for (int d = 0; d < D; ++d) oi[d] = acc[r][d];
        }
      }
    }
  });
}

// q, k, v, out: (S, H, L, D) strided views; bias: (1, H, L, L) contiguous. Writes out and returns
// true; returns false (nothing written) for a shape without a compiled kernel.
bool short_attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& bias,
                             double scale, at::Tensor out) {
  check(q, "q"); check(k, "k"); check(v, "v"); check(out, "out");
  const int64_t S = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3);
  TORCH_CHECK(k.sizes() == q.sizes() && v.sizes() == q.sizes() && out.sizes() == q.sizes(), "shape mismatch");
  TORCH_CHECK(bias.is_contiguous() && bias.scalar_type() == at::kFloat && bias.dim() == 4 && bias.size(1) == H &&
              bias.size(2) == L && bias.size(3) == L, "bias must be a contiguous float32 (1, H, L, L) tensor");
  const int64_t LP = (L + 15) / 16 * 16;
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const float* bp = bias.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float sc = static_cast<float>(scale);
#define RMT_CASE(d, lp) \
  if (D == d && LP == lp) { \
    attend<d, lp, (lp == 16 ? 1 : 4)>(qp, kp, vp, bp, op, sc, S, H, L, q.strides(), k.strides(), v.strides(), out.strides()); \
    return true; \
  }
#define RMT_LENGTHS(d) RMT_CASE(d, 16) RMT_CASE(d, 32)  // longer rows: the flash kernel is as fast
  RMT_LENGTHS(16) RMT_LENGTHS(32) RMT_LENGTHS(64)
#undef RMT_LENGTHS
#undef RMT_CASE
  return false;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &short_attention_forward, "softmax attention over short sequences (CPU, float32)");
}
