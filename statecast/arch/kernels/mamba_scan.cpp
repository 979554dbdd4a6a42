// Compiled CPU kernels for statecast's Mamba mixer (statecast/arch/mamba.py): the
// selective scan fused with the D skip and the silu gate, and the causal depthwise conv
// fused with its silu. float32, CPU, no autograd; optional (the pure-PyTorch path in
// mamba.py is the default and the reference).
//
// The scan is the reference recurrence of the selective SSM (Gu & Dao 2023, "Mamba:
// Linear-Time Sequence Modeling with Selective State Spaces", Algorithm 2; transformers'
// recurrent loop in models/mamba/modeling_mamba.py), per channel e and state index n,
// started from a given state h_0:
//
//     h_t[e, n] = exp(dt_t[e] A[e, n]) h_(t-1)[e, n] + dt_t[e] x_t[e] B_t[n]
//     y_t[e]    = (sum_n h_t[e, n] C_t[n] + D[e] x_t[e]) * silu(z_t[e])
//
// token by token (no chunking, no rescaling), so it differs from mamba.py's
// selective_scan / selective_scan_sequential only by float32 rounding and by exp(dt A)
// being evaluated as 2^(dt A log2 e) with a polynomial (the caller passes A2 = A log2 e).
//
// Built on first use by statecast.arch.mamba.load_compiled_scan
// (torch.utils.cpp_extension.load), which defines STATECAST_OP_NAMESPACE as the build's
// unique name; the ops are then torch.ops.<that name>.selective_scan / .causal_conv_silu.

#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

namespace {
constexpr int W = 16;  // channels per block (one AVX-512 / two AVX2 vectors of float32)

// 2^x for x <= 0 (clamped at -126: 2^-126 ~ 1e-38 stands for anything smaller).
// Round-to-nearest splits x = n + g, |g| <= 1/2; 2^g from Cephes' exp2f polynomial
// (about 1 ulp); 2^n by writing the exponent bits. Plain code that compilers vectorise.
static inline float exp2_neg(float x) {
  x = std::max(x, -126.0f);
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  float t = x + magic;
  float n = t - magic;
  float g = x - n;
  float p = 1.535336188319500e-4f;
  p = p * g + 1.339887440266574e-3f;
  p = p * g + 9.618437357674640e-3f;
  p = p * g + 5.550332471162809e-2f;
  p = p * g + 2.402264791363012e-1f;
  p = p * g + 6.931472028550421e-1f;
  p = p * g + 1.0f;
  int32_t ti;
  std::memcpy(&ti, &t, 4);
  int32_t bits = (ti << 23) + (127 << 23);  // the low mantissa bits of t hold n
  float scale;
  std::memcpy(&scale, &bits, 4);
  return p * scale;
}

// silu(v) = v * sigmoid(v), sigmoid from e = exp(-|v|) <= 1 (no overflow either side)
static inline float silu(float v) {
  const float e = exp2_neg(-std::abs(v) * 1.4426950408889634f);
  const float s = (v >= 0.0f ? 1.0f : e) / (1.0f + e);
  return v * s;
}

struct Rows {  // a [B, T, X] float tensor with unit stride in X
  const float* p;
  int64_t sb, st;
  const float* row(int64_t b, int64_t t) const { return p + b * sb + t * st; }
};

Rows rows(const at::Tensor& t) { return {t.data_ptr<float>(), t.stride(0), t.stride(1)}; }

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.device().is_cpu() && t.dim() == 3 && t.stride(2) == 1, name,
              ": expected a float32 CPU [B, T, X] tensor with unit stride in X");
}

void check_dense(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.device().is_cpu() && t.is_contiguous(), name,
              ": expected a contiguous float32 CPU tensor");
}
}  // namespace

// y = (scan(x, dt, A, B, C; h0) + D x) * silu(z), per batch row and block of 16 channels.
// x, dt, z: [B, T, E]; Bm, Cm: [B, T, N]; A2 = A log2(e): [N, E]; h0: [B, E, N]; D: [E].
std::tuple<at::Tensor, at::Tensor> selective_scan(const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A2,
                                                 const at::Tensor& Bm, const at::Tensor& Cm, const at::Tensor& h0,
                                                 const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                                                 const std::optional<at::Tensor>& out) {
  check_rows(x, "x");
  check_rows(dt, "dt");
  check_rows(Bm, "B");
  check_rows(Cm, "C");
  check_dense(A2, "A2");
  check_dense(h0, "h0");
  const int64_t Bsz = x.size(0), T = x.size(1), E = x.size(2), N = A2.size(0);
  TORCH_CHECK(A2.size(1) == E && h0.size(0) == Bsz && h0.size(1) == E && h0.size(2) == N, "selective_scan: shapes");
  const float* pD = nullptr;
  if (D.has_value()) {
    check_dense(*D, "D");
    pD = D->data_ptr<float>();
  }
  Rows rz{nullptr, 0, 0};
  if (z.has_value()) {
    check_rows(*z, "z");
    rz = rows(*z);
  }
  // y may be written over dt (out = dt): each (t, block) reads its dt before writing its y
  at::Tensor y = out.has_value() ? *out : at::empty({Bsz, T, E}, x.options());
  if (out.has_value()) {
    check_dense(y, "out");
    TORCH_CHECK(y.size(0) == Bsz && y.size(1) == T && y.size(2) == E, "selective_scan: out shape");
  }
  auto hT = at::empty({Bsz, E, N}, x.options());
  const Rows rx = rows(x), rdt = rows(dt), rb = rows(Bm), rc = rows(Cm);
  const float *pa = A2.data_ptr<float>(), *ph0 = h0.data_ptr<float>();
  float* py = y.data_ptr<float>();
  float* phT = hT.data_ptr<float>();
  const int64_t nblk = (E + W - 1) / W;
  at::parallel_for(0, Bsz * nblk, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> hbuf(N * W), abuf(N * W);
    float* h = hbuf.data();
    float* a2 = abuf.data();
    float dtv[W], dtx[W], acc[W], skip[W], gate[W];
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t b = i / nblk, d0 = (i % nblk) * W;
      const int w = (int)std::min<int64_t>(W, E - d0);
      std::fill(hbuf.begin(), hbuf.end(), 0.0f);
      std::fill(abuf.begin(), abuf.end(), 0.0f);
      for (int64_t n = 0; n < N; ++n)
        for (int j = 0; j < w; ++j) {
          a2[n * W + j] = pa[n * E + d0 + j];
          h[n * W + j] = ph0[(b * E + d0 + j) * N + n];
        }
      for (int j = 0; j < W; ++j) skip[j] = (pD != nullptr && j < w) ? pD[d0 + j] : 0.0f;
      for (int64_t t = 0; t < T; ++t) {
        const float* dtr = rdt.row(b, t) + d0;
        const float* xr = rx.row(b, t) + d0;
        for (int j = 0; j < W; ++j) {
          const float a = j < w ? dtr[j] : 0.0f, v = j < w ? xr[j] : 0.0f;
          dtv[j] = a;
          dtx[j] = a * v;
          acc[j] = skip[j] * v;
        }
        const float* br = rb.row(b, t);
        const float* cr = rc.row(b, t);
        for (int64_t n = 0; n < N; ++n) {
          const float bn = br[n], cn = cr[n];
          const float* an = a2 + n * W;
          float* hn = h + n * W;
#pragma GCC ivdep
          for (int j = 0; j < W; ++j) {
            const float hv = exp2_neg(dtv[j] * an[j]) * hn[j] + dtx[j] * bn;
            hn[j] = hv;
            acc[j] += hv * cn;
          }
        }
        float* yr = py + (b * T + t) * E + d0;
        if (rz.p != nullptr) {
          const float* zr = rz.row(b, t) + d0;
          for (int j = 0; j < W; ++j) gate[j] = silu(j < w ? zr[j] : 0.0f);
          for (int j = 0; j < w; ++j) yr[j] = acc[j] * gate[j];
        } else {
          for (int j = 0; j < w; ++j) yr[j] = acc[j];
        }
      }
      for (int64_t n = 0; n < N; ++n)
        for (int j = 0; j < w; ++j) phT[(b * E + d0 + j) * N + n] = h[n * W + j];
    }
  });
  return {y, hT};
}

// out[b, t] = silu(bias + sum_k wT[k] * in[b, t - (W-1) + k]), in[b, j < 0] = prev[b, W-1 + j].
// x: [B, T, E] (unit stride in E); prev: [B, W-1, E]; wT: [W, E]; bias: [E].
at::Tensor causal_conv_silu(const at::Tensor& x, const at::Tensor& prev, const at::Tensor& wT,
                            const std::optional<at::Tensor>& bias) {
  check_rows(x, "x");
  check_dense(prev, "prev");
  check_dense(wT, "wT");
  const int64_t Bsz = x.size(0), T = x.size(1), E = x.size(2), K = wT.size(0);
  TORCH_CHECK(wT.size(1) == E && prev.size(0) == Bsz && prev.size(1) == K - 1 && prev.size(2) == E,
              "causal_conv_silu: shapes");
  const float* pb = nullptr;
  if (bias.has_value()) {
    check_dense(*bias, "bias");
    pb = bias->data_ptr<float>();
  }
  auto out = at::empty({Bsz, T, E}, x.options());
  const Rows rx = rows(x);
  const float *pp = prev.data_ptr<float>(), *pw = wT.data_ptr<float>();
  float* po = out.data_ptr<float>();
  at::parallel_for(0, Bsz * T, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t b = i / T, t = i % T;
      float* o = po + i * E;
      for (int64_t e = 0; e < E; ++e) o[e] = pb != nullptr ? pb[e] : 0.0f;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t j = t - (K - 1) + k;
        const float* src = j >= 0 ? rx.row(b, j) : pp + (b * (K - 1) + (K - 1) + j) * E;
        const float* wk = pw + k * E;
#pragma GCC ivdep
        for (int64_t e = 0; e < E; ++e) o[e] += wk[e] * src[e];
      }
#pragma GCC ivdep
      for (int64_t e = 0; e < E; ++e) o[e] = silu(o[e]);
    }
  });
  return out;
}

// The op namespace must be unique per build: a process can hold two builds (another
// source, flags or torch version), and TORCH_LIBRARY refuses a namespace registered
// twice. The default only lets this file compile on its own (editors, syntax checks).
#ifndef STATECAST_OP_NAMESPACE
#define STATECAST_OP_NAMESPACE statecast_mamba_scan
#endif
// TORCH_LIBRARY pastes its namespace argument into identifiers (##), and a pasted
// argument is not macro-expanded: one level of indirection expands it first.
#define SCAN_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define SCAN_LIBRARY_IMPL(ns, k, m) TORCH_LIBRARY_IMPL(ns, k, m)

SCAN_LIBRARY(STATECAST_OP_NAMESPACE, m) {
  m.def("selective_scan(Tensor x, Tensor dt, Tensor A2, Tensor B, Tensor C, Tensor h0, Tensor? D, Tensor? z, Tensor(a!)? out) -> (Tensor, Tensor)");
  m.def("causal_conv_silu(Tensor x, Tensor prev, Tensor wT, Tensor? bias) -> Tensor");
}
SCAN_LIBRARY_IMPL(STATECAST_OP_NAMESPACE, CPU, m) {
  m.impl("selective_scan", &selective_scan);
  m.impl("causal_conv_silu", &causal_conv_silu);
}
