// The CUDA kernels' row arithmetic (csrc/cuda_rowmath.cuh) run on the CPU: one "block" of kThreads threads per row,
// each thread reading the elements the kernel gives it (cuda_rowmath's thread_acc: a scalar head, vectors of NV,
// a scalar tail), then the kernel's reduction tree (xor shuffles within each warp of 32, then across the warps),
// then the per-row outputs and the gradient of fwd_grad; and bwd's gradient rows (thread_bwd, the block sum of
// rest = sum_{v != y} p_v, the target's entry). Built by tests/test_cuda_rowmath.py with the host
// compiler (no CUDA, no torch) and called through ctypes. The hot-loop exp2 is std::exp2 here and ex2.approx on
// the device; everything else is the same code.
#include <cstdint>
#include <vector>

#include "cuda_rowmath.cuh"

namespace {

using namespace grpo::rowmath;

constexpr int kThreads = 256;  // cuda_kernels.cuh kBlock
constexpr int kWarp = 32;

template <typename A, int NV>
struct HostSrc {
  const A* z;
  A one(int64_t i) const { return z[i]; }
  void vec(int64_t i, A* out) const {
    for (int k = 0; k < NV; ++k) out[k] = z[i + k];
  }
};

// The kernel's block reductions (block_stats, block_sum): xor-shuffle rounds within each warp (every lane merges
// with lane ^ off), lane 0 of each warp to shared memory, then the same rounds over those in warp 0 (lanes past
// the warp count hold `empty`).
template <typename V, class Merge>
V block_reduce(std::vector<V> v, const V& empty, Merge merge) {
  const int n = static_cast<int>(v.size());
  for (int w0 = 0; w0 < n; w0 += kWarp) {
    for (int off = kWarp / 2; off > 0; off >>= 1) {
      std::vector<V> nv(v.begin() + w0, v.begin() + w0 + kWarp);
      for (int l = 0; l < kWarp; ++l) nv[l] = merge(v[w0 + l], v[w0 + (l ^ off)]);
      for (int l = 0; l < kWarp; ++l) v[w0 + l] = nv[l];
    }
  }
  std::vector<V> w(kWarp, empty);
  for (int i = 0; i < n / kWarp; ++i) w[i] = v[i * kWarp];
  for (int off = kWarp / 2; off > 0; off >>= 1) {
    std::vector<V> nw(w);
    for (int l = 0; l < kWarp; ++l) nw[l] = merge(w[l], w[l ^ off]);
    w = nw;
  }
  return w[0];
}

template <typename A>
Stat<A> block_reduce(const std::vector<Stat<A>>& v, A K) {
  return block_reduce(v, Stat<A>{neg_inf<A>(), A(0), A(0)},
                      [K](const Stat<A>& a, const Stat<A>& b) { return stat_merge(a, b, K); });
}

template <typename A, int NV, bool ENT>
Stat<A> row_stat(const A* z, int64_t V, int64_t head, A K) {
  if (head > V) head = V;
  const int64_t nvec = (V - head) / NV, tail = head + nvec * NV;
  std::vector<Stat<A>> per(kThreads);
  const HostSrc<A, NV> src{z};
  for (int tid = 0; tid < kThreads; ++tid)
    per[tid] = acc_finish(thread_acc<A, NV, ENT>(src, head, nvec, tail, V, tid, kThreads, K), K);
  return block_reduce(per, K);
}

template <typename A, int NV>
Stat<A> row_stat_ent(const A* z, int64_t V, int64_t head, A K, bool ent) {
  return ent ? row_stat<A, NV, true>(z, V, head, K) : row_stat<A, NV, false>(z, V, head, K);
}

// fwd_grad's outputs for R rows of V (contiguous z, grad), as fwd_grad_kernel computes them (ent_coef may be null;
// with_entropy is forced on by it). Returns 0, or -1 for an unsupported vector width.
template <typename A>
int rows(const A* z, int64_t R, int64_t V, const int64_t* tok, const A* coef, const A* ecoef, double inv_temp,
         int vec, int64_t head, int with_entropy, A* logp, A* lse, A* ent, A* grad) {
  const A it = static_cast<A>(inv_temp);
  const A K = static_cast<A>(inv_temp * kLog2e);  // cuda_kernels.cuh exp2_scale
  const bool has_ec = ecoef != nullptr, ENT = with_entropy || has_ec;
  for (int64_t r = 0; r < R; ++r) {
    const A* zr = z + r * V;
    Stat<A> st;
    switch (vec) {
      case 1: st = row_stat_ent<A, 1>(zr, V, head, K, ENT); break;
      case 2: st = row_stat_ent<A, 2>(zr, V, head, K, ENT); break;
      case 4: st = row_stat_ent<A, 4>(zr, V, head, K, ENT); break;
      case 8: st = row_stat_ent<A, 8>(zr, V, head, K, ENT); break;
      default: return -1;
    }
    const int64_t y = tok[r];
    const A zy = zr[y];
    const RowOut<A> o = row_out(st, zy, it);
    lse[r] = o.lse;
    logp[r] = o.logp;
    ent[r] = ENT ? o.ent : A(0);
    const A cf = coef[r], ec = has_ec ? ecoef[r] : A(0);
    const GradConsts<A> gc = grad_consts(st, o, K, it, cf, ec, has_ec);
    A* g = grad + r * V;
    for (int64_t i = 0; i < V; ++i) g[i] = has_ec ? grad_elem<A, true>(gc, zr[i], K) : grad_elem<A, false>(gc, zr[i], K);
    g[y] = grad_target(st, o, zy, it, cf, ec, has_ec);
  }
  return 0;
}

// bwd_kernel's gradient rows: map_row's element-to-thread assignment (cuda_rowmath's thread_bwd: a scalar head,
// vectors of NV, one per iteration, a scalar tail), the block_sum of the threads' rest, then the target's entry.
template <typename A>
struct HostDst {
  A* g;
  int nv;
  void one(int64_t i, A v) const { g[i] = v; }
  void vec(int64_t i, const A* x) const {
    for (int k = 0; k < nv; ++k) g[i + k] = x[k];
  }
};

template <typename A, int NV, bool HAS_GH>
A bwd_row(const A* z, A* g, int64_t V, int64_t head, int64_t y, const BwdConsts<A>& b) {
  if (head > V) head = V;
  const int64_t nvec = (V - head) / NV, tail = head + nvec * NV;
  std::vector<A> part(kThreads);
  const HostSrc<A, NV> src{z};
  const HostDst<A> dst{g, NV};
  for (int tid = 0; tid < kThreads; ++tid)
    part[tid] = thread_bwd<A, NV, HAS_GH>(src, dst, head, nvec, tail, V, y, tid, kThreads, b);
  return block_reduce(part, A(0), [](A a, A c) { return a + c; });
}

template <typename A, int NV>
A bwd_row_gh(const A* z, A* g, int64_t V, int64_t head, int64_t y, const BwdConsts<A>& b, bool has_gh) {
  return has_gh ? bwd_row<A, NV, true>(z, g, V, head, y, b) : bwd_row<A, NV, false>(z, g, V, head, y, b);
}

// bwd for R rows of V (contiguous z, grad; z may be grad itself): grad_ent may be null. Returns 0, or -1 for an
// unsupported vector width.
template <typename A>
int bwd_rows(const A* z, int64_t R, int64_t V, const int64_t* tok, const A* gl, const A* gh, const A* lse,
             const A* ent, double inv_temp, int vec, int64_t head, A* grad) {
  const A it = static_cast<A>(inv_temp);
  const bool has_gh = gh != nullptr;
  for (int64_t r = 0; r < R; ++r) {
    const A* zr = z + r * V;
    A* g = grad + r * V;
    const int64_t y = tok[r];
    const A zy = zr[y];  // before any write (z may be grad)
    const BwdConsts<A> b = bwd_consts<A>(it, lse[r], ent[r], gl[r], has_gh ? gh[r] : A(0));
    A rest;
    switch (vec) {
      case 1: rest = bwd_row_gh<A, 1>(zr, g, V, head, y, b, has_gh); break;
      case 2: rest = bwd_row_gh<A, 2>(zr, g, V, head, y, b, has_gh); break;
      case 4: rest = bwd_row_gh<A, 4>(zr, g, V, head, y, b, has_gh); break;
      case 8: rest = bwd_row_gh<A, 8>(zr, g, V, head, y, b, has_gh); break;
      default: return -1;
    }
    g[y] = bwd_target(b, zy, rest, has_gh);
  }
  return 0;
}

}  // namespace

extern "C" {
int grpo_rowmath_bwd_f32(const float* z, int64_t R, int64_t V, const int64_t* tok, const float* gl, const float* gh,
                         const float* lse, const float* ent, double inv_temp, int vec, int64_t head, float* grad) {
  return bwd_rows<float>(z, R, V, tok, gl, gh, lse, ent, inv_temp, vec, head, grad);
}
int grpo_rowmath_bwd_f64(const double* z, int64_t R, int64_t V, const int64_t* tok, const double* gl,
                         const double* gh, const double* lse, const double* ent, double inv_temp, int vec,
                         int64_t head, double* grad) {
  return bwd_rows<double>(z, R, V, tok, gl, gh, lse, ent, inv_temp, vec, head, grad);
}
int grpo_rowmath_f32(const float* z, int64_t R, int64_t V, const int64_t* tok, const float* coef, const float* ecoef,
                     double inv_temp, int vec, int64_t head, int with_entropy, float* logp, float* lse, float* ent,
                     float* grad) {
  return rows<float>(z, R, V, tok, coef, ecoef, inv_temp, vec, head, with_entropy, logp, lse, ent, grad);
}
int grpo_rowmath_f64(const double* z, int64_t R, int64_t V, const int64_t* tok, const double* coef,
                     const double* ecoef, double inv_temp, int vec, int64_t head, int with_entropy, double* logp,
                     double* lse, double* ent, double* grad) {
  return rows<double>(z, R, V, tok, coef, ecoef, inv_temp, vec, head, with_entropy, logp, lse, ent, grad);
}
}
