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

// Backward of attend<D, LP>: recomputes P per (sequence, head) instead of storing it, then
//   dV = P^T dO,  dP = dO V^T,  dS = P * (dP - rowsum(P * dP)),  dQ = scale dS K,  dK = scale dS^T Q.
// The bias is a constant table (no gradient).
template <int D, int LP>
void attend_backward(const float* qp, const float* kp, const float* vp, const float* bp, const float* gp, float* dqp,
                     float* dkp, float* dvp, float sc, int64_t S, int64_t H, int64_t L, at::IntArrayRef qs,
                     at::IntArrayRef ks, at::IntArrayRef vs, at::IntArrayRef gs, at::IntArrayRef dqs,
                     at::IntArrayRef dks, at::IntArrayRef dvs) {
  at::parallel_for(0, S * H, 8, [&](int64_t begin, int64_t end) {
    alignas(64) float kt[D * LP];
    alignas(64) float vt[D * LP];
    alignas(64) float p[LP * LP];
    alignas(64) float ds[LP * LP];
    alignas(64) float dk[LP * D];
    alignas(64) float dv[LP * D];
    alignas(64) float acc[D];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t s = item / H, h = item % H;
      const float* qb = qp + s * qs[0] + h * qs[1];
      const float* kb = kp + s * ks[0] + h * ks[1];
      const float* vb = vp + s * vs[0] + h * vs[1];
      const float* gb = gp + s * gs[0] + h * gs[1];
      const float* bb = bp + h * L * L;
      for (int64_t j0 = 0; j0 < LP; j0 += 16) {  // kt = (scale K)^T, vt = V^T, zero-padded
        alignas(64) float tk[16][D];
        alignas(64) float tv[16][D];
        for (int64_t j = 0; j < 16; ++j) {
          if (j0 + j < L) {
            const float* kj = kb + (j0 + j) * ks[2];
            const float* vj = vb + (j0 + j) * vs[2];
            for (int d = 0; d < D; ++d) tk[j][d] = kj[d] * sc;
            for (int d = 0; d < D; ++d) tv[j][d] = vj[d];
          } else {
            for (int d = 0; d < D; ++d) tk[j][d] = 0.0f;
            for (int d = 0; d < D; ++d) tv[j][d] = 0.0f;
          }
        }
        for (int d = 0; d < D; ++d)
          for (int j = 0; j < 16; ++j) {
            kt[d * LP + j0 + j] = tk[j][d];
            vt[d * LP + j0 + j] = tv[j][d];
          }
      }
      for (int j = 0; j < LP * D; ++j) dk[j] = 0.0f;
      for (int j = 0; j < LP * D; ++j) dv[j] = 0.0f;
      for (int64_t i = 0; i < L; ++i) {
        const float* qi = qb + i * qs[2];
        const float* gi = gb + i * gs[2];
        const float* bi = bb + i * L;
        float* pi = p + i * LP;
        float* dsi = ds + i * LP;
        for (int j = 0; j < LP; ++j) pi[j] = j < L ? bi[j] : -1e30f;
        for (int j = 0; j < LP; ++j) dsi[j] = 0.0f;
        for (int d = 0; d < D; ++d) {
          const float qd = qi[d], gd = gi[d];
          const float* kd = kt + d * LP;
          const float* vd = vt + d * LP;
          for (int j = 0; j < LP; ++j) {
            pi[j] += qd * kd[j];   // scores
            dsi[j] += gd * vd[j];  // dP = dO V^T
          }
        }
        float mx = pi[0];
        for (int j = 1; j < LP; ++j) mx = pi[j] > mx ? pi[j] : mx;
        float sum = 0.0f;
        for (int j = 0; j < LP; ++j) {
          pi[j] = exp_nonpositive(pi[j] - mx);
          sum += pi[j];
        }
        const float inv = 1.0f / sum;
        float delta = 0.0f;
        for (int j = 0; j < LP; ++j) {
          pi[j] *= inv;
          delta += pi[j] * dsi[j];
        }
        for (int j = 0; j < LP; ++j) dsi[j] = pi[j] * (dsi[j] - delta);
        for (int64_t j = 0; j < L; ++j) {  // dV += P^T dO, dK += dS^T Q (scaled at the end)
          const float pij = pi[j], dsij = dsi[j];
          float* dvj = dv + j * D;
          float* dkj = dk + j * D;
          for (int d = 0; d < D; ++d) {
            dvj[d] += pij * gi[d];
            dkj[d] += dsij * qi[d];
          }
        }
        for (int d = 0; d < D; ++d) acc[d] = 0.0f;  // dQ = scale dS K = dS (scale K)
        for (int64_t j = 0; j < L; ++j) {
          const float dsij = dsi[j];
          const float* kj = kb + j * ks[2];
          for (int d = 0; d < D; ++d) acc[d] += dsij * kj[d];
        }
        float* dqi = dqp + s * dqs[0] + h * dqs[1] + i * dqs[2];
        for (int d = 0; d < D; ++d) dqi[d] = acc[d] * sc;
      }
      for (int64_t j = 0; j < L; ++j) {
        float* dkj = dkp + s * dks[0] + h * dks[1] + j * dks[2];
        float* dvj = dvp + s * dvs[0] + h * dvs[1] + j * dvs[2];
        for (int d = 0; d < D; ++d) dkj[d] = dk[j * D + d] * sc;
        for (int d = 0; d < D; ++d) dvj[d] = dv[j * D + d];
      }
    }
  });
}

// Gradients of short_attention_forward with respect to q, k and v, written into grad_q/grad_k/grad_v
// (views of the same shape and unit stride in D). Returns false for a shape without a compiled kernel.
bool short_attention_backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& bias,
                              double scale, const at::Tensor& grad_out, at::Tensor grad_q, at::Tensor grad_k,
                              at::Tensor grad_v) {
  check(q, "q"); check(k, "k"); check(v, "v"); check(grad_out, "grad_out");
  check(grad_q, "grad_q"); check(grad_k, "grad_k"); check(grad_v, "grad_v");
  const int64_t S = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3);
  for (const at::Tensor* t : {&k, &v, &grad_out, static_cast<const at::Tensor*>(&grad_q),
                              static_cast<const at::Tensor*>(&grad_k), static_cast<const at::Tensor*>(&grad_v)})
    TORCH_CHECK(t->sizes() == q.sizes(), "shape mismatch");
  TORCH_CHECK(bias.is_contiguous() && bias.scalar_type() == at::kFloat && bias.dim() == 4 && bias.size(1) == H &&
              bias.size(2) == L && bias.size(3) == L, "bias must be a contiguous float32 (1, H, L, L) tensor");
  const int64_t LP = (L + 15) / 16 * 16;
  const float sc = static_cast<float>(scale);
#define RMT_CASE(d, lp) \
  if (D == d && LP == lp) { \
    attend_backward<d, lp>(q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), bias.data_ptr<float>(), \
                           grad_out.data_ptr<float>(), grad_q.data_ptr<float>(), grad_k.data_ptr<float>(), \
                           grad_v.data_ptr<float>(), sc, S, H, L, q.strides(), k.strides(), v.strides(), \
                           grad_out.strides(), grad_q.strides(), grad_k.strides(), grad_v.strides()); \
    return true; \
  }
#define RMT_LENGTHS(d) RMT_CASE(d, 16) RMT_CASE(d, 32)
  RMT_LENGTHS(16) RMT_LENGTHS(32) RMT_LENGTHS(64)
#undef RMT_LENGTHS
#undef RMT_CASE
  return false;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &short_attention_forward, "softmax attention over short sequences (CPU, float32)");
  m.def("backward", &short_attention_backward, "its gradients with respect to q, k and v");
}
