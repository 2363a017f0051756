// The row arithmetic of the CUDA kernels (cuda_kernels.cuh) as host+device inline functions: the per-thread
// accumulation of a row's softmax statistics, their merge, the per-row outputs and gradient constants, and the
// two-pass backward's per-thread gradient and rest sum (thread_bwd) and target entry (bwd_target). No
// CUDA runtime or torch is needed, so the same code also compiles as plain C++ (tests/cuda_rowmath_host.cpp, built
// by tests/test_cuda_rowmath.py with the host compiler, emulates a block's reduction on the CPU with it).
//
// Representation. A thread's part of the row is (m, r, h): m = its max logit, and, with u_v = (z_v - m) K in
// log2 units (K = log2(e) / tau), the sum of its terms 2^u_v is 1 + r, where the 1 is one designated element equal
// to m (the first one seen) and r sums every other element. The designated max never enters a floating-point
// sum: for a confident target (p_y = 1 / (1 + r) ≈ 1) the small terms keep their relative accuracy, and so do
// log p_y = -log1p(r) and 1 - p_y = -expm1(log p_y) (1 + r summed in one float would drop every term below
// 6e-8 of it, and a float Kahan compensation folded back into the sum loses them all the same).
// h = sum_v 2^u_v u_v (entropy; the designated max has u = 0).
//
// Hot loop (acc_add, per vector of NV loaded values): the vector's max first; if it does not exceed m (the common
// case) every element is a term 2^(fma(z, K, -F)) with F = RN(m K) -- one FFMA and one MUFU.EX2 per element,
// summed as a tree per vector into r (h: one more FFMA). Only a vector whose max exceeds m rescales (once per
// vector, not per element) and picks its designated max. Terms are relative to F, not to m K exactly: the
// designated max's own term would be 2^d, d = m K - F = fma(m, K, -F) (exact, |d| <= ulp(F) / 2), so the running
// (r, h) are "F-frame" sums, converted to the exact frame (factor 2^-d, see to_exact) whenever m changes and at the
// end. The rare paths (rescale, conversion, merges, per-row constants) use the accurate libm functions; the hot
// loop uses ex2.approx.ftz (about 2 ulps, the MUFU.EX2 that exp2f is built on, without exp2f's denormal fix-up:
// terms below 2^-126 of the max are 0).
//
// Accuracy: every rest term carries the rounding of its exponent argument (|u| 2^-24, i.e. ~|t| ulps for a term
// t = (z_v - z_max)/tau natural-log units below the max: inherent to an fp32 argument, the CPU kernels' (z - m) it
// has it too), then a tree of positive additions: log p_y and expm1(log p_y) of a confident row are accurate to
// a few ulps plus that argument rounding, at any 1 - p_y down to the underflow of fp32 (CPU: tests/
// test_cuda_rowmath.py).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define GRPO_HD __host__ __device__ __forceinline__
#define GRPO_HD_COLD __host__ __device__ __noinline__
#define GRPO_UNROLL _Pragma("unroll")
#else
#define GRPO_HD inline
#define GRPO_HD_COLD inline
#define GRPO_UNROLL
#endif

namespace grpo {
namespace rowmath {

constexpr double kLog2e = 1.4426950408889634074;
constexpr double kLn2 = 0.69314718055994530942;

// ---------------------------------------------------------------------------------------------------------
// Math primitives, the same on host and device (device: CUDA's libdevice functions; the hot-loop exp2 is
// ex2.approx.ftz on the device, std::exp2 on the host).
// ---------------------------------------------------------------------------------------------------------
GRPO_HD float hot_exp2(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return std::exp2(x);
#endif
}
GRPO_HD double hot_exp2(double x) {
#if defined(__CUDA_ARCH__)
  return ::exp2(x);
#else
  return std::exp2(x);
#endif
}

#if defined(__CUDA_ARCH__)
GRPO_HD float m_exp2(float x) { return ::exp2f(x); }
GRPO_HD double m_exp2(double x) { return ::exp2(x); }
GRPO_HD float m_exp(float x) { return ::expf(x); }
GRPO_HD double m_exp(double x) { return ::exp(x); }
GRPO_HD float m_expm1(float x) { return ::expm1f(x); }
GRPO_HD double m_expm1(double x) { return ::expm1(x); }
GRPO_HD float m_log1p(float x) { return ::log1pf(x); }
GRPO_HD double m_log1p(double x) { return ::log1p(x); }
GRPO_HD float m_fma(float a, float b, float c) { return ::fmaf(a, b, c); }
GRPO_HD double m_fma(double a, double b, double c) { return ::fma(a, b, c); }
GRPO_HD float m_fmax(float a, float b) { return ::fmaxf(a, b); }
GRPO_HD double m_fmax(double a, double b) { return ::fmax(a, b); }
#else
GRPO_HD float m_exp2(float x) { return std::exp2(x); }
GRPO_HD double m_exp2(double x) { return std::exp2(x); }
GRPO_HD float m_exp(float x) { return std::exp(x); }
GRPO_HD double m_exp(double x) { return std::exp(x); }
GRPO_HD float m_expm1(float x) { return std::expm1(x); }
GRPO_HD double m_expm1(double x) { return std::expm1(x); }
GRPO_HD float m_log1p(float x) { return std::log1p(x); }
GRPO_HD double m_log1p(double x) { return std::log1p(x); }
GRPO_HD float m_fma(float a, float b, float c) { return std::fma(a, b, c); }
GRPO_HD double m_fma(double a, double b, double c) { return std::fma(a, b, c); }
GRPO_HD float m_fmax(float a, float b) { return std::fmax(a, b); }
GRPO_HD double m_fmax(double a, double b) { return std::fmax(a, b); }
#endif

template <typename A>
GRPO_HD A neg_inf() {
  return -static_cast<A>(INFINITY);
}

// Floor of an exponent u (log2 units) in the entropy sums, where z = -inf: 2^floor is 0 in A, and e u stays
// 0 instead of 0 * -inf.
template <typename A>
GRPO_HD A u_floor() {
  return sizeof(A) == 4 ? A(-256) : A(-2048);
}

// ---------------------------------------------------------------------------------------------------------
// Per-thread accumulation
// ---------------------------------------------------------------------------------------------------------
// A thread's running state: m = max seen (-inf: nothing yet), F = RN(m K) (0 while m = -inf), r and h the
// F-frame sums of the non-designated terms 2^u and 2^u u, u = RN(z K - F).
template <typename A>
struct Acc {
  A m, F, r, h;
};

// Statistics in the exact frame of m: the sum of 2^((z_v - m) K) is 1 + r (0 terms: m = -inf, r = 0) and
// h = sum of 2^u u, u = (z_v - m) K. What threads exchange and merge.
template <typename A>
struct Stat {
  A m, r, h;
};

template <typename A>
GRPO_HD Acc<A> acc_empty() {
  return Acc<A>{neg_inf<A>(), A(0), A(0), A(0)};
}

// F-frame sums (r, h) of max m to the exact frame: each term times 2^-d and its exponent minus d,
// d = m K - F, so r' = r 2^-d and h' = 2^-d (h - d r). 2^-d - 1 = expm1(-d ln 2) keeps the tiny correction exact.
template <typename A>
GRPO_HD void to_exact(A m, A F, A K, A& r, A& h) {
  const A d = m_fma(m, K, -F);
  const A c = m_expm1(-d * static_cast<A>(kLn2));
  h = m_fma(h - d * r, c, h - d * r);
  r = m_fma(r, c, r);
}

// The inverse: exact-frame (r, h) of max m to the F frame (r 2^d, 2^d h + d r 2^d).
template <typename A>
GRPO_HD void to_frame(A m, A F, A K, A& r, A& h) {
  const A d = m_fma(m, K, -F);
  const A c = m_expm1(d * static_cast<A>(kLn2));
  r = m_fma(r, c, r);
  h = m_fma(h, c, h) + d * r;
}

// The state moved to a new max vmax > m (or kept NaN): the old designated max becomes a term
// c = 2^((m_old - vmax) K), every old term is multiplied by c and its exponent shifted by (m_old - vmax) K. Out of
// line (rare: a few times per thread and row), so that the hot loop stays small.
template <typename A>
GRPO_HD_COLD Acc<A> acc_rescale(Acc<A> a, A vmax, A K) {
  A r = A(0), h = A(0);
  if (!(a.m == neg_inf<A>())) {  // (a NaN m takes this branch and stays NaN)
    r = a.r;
    h = a.h;
    to_exact(a.m, a.F, K, r, h);
    const A ud = (a.m - vmax) * K;
    const A c = m_exp2(ud);
    h = c * (h + ud * (A(1) + r));
    r = m_fma(c, r, c);
  }
  a.m = vmax;
  a.F = vmax * K;
  to_frame(a.m, a.F, K, r, h);
  a.r = r;
  a.h = h;
  return a;
}

// Adds NV values (a loaded vector, or NV = 1 for a scalar) to the thread's state.
template <typename A, int NV, bool ENT>
GRPO_HD void acc_add(Acc<A>& a, const A* x, A K) {
  A vmax = x[0];
GRPO_UNROLL
  for (int k = 1; k < NV; ++k) vmax = m_fmax(vmax, x[k]);  // (fmax drops a NaN: its term below is NaN anyway)
  A e[NV];
  if (vmax <= a.m) {
    // Hot path: no new max. Every element is a non-designated term (ties with m included).
GRPO_UNROLL
    for (int k = 0; k < NV; ++k) {
      const A u = m_fma(x[k], K, -a.F);
      e[k] = hot_exp2(u);
      if (ENT) a.h = m_fma(e[k], m_fmax(u, u_floor<A>()), a.h);
    }
  } else {
    a = acc_rescale(a, vmax, K);
    bool designated = false;  // this vector's first element equal to vmax is the new designated max: term 0 here
GRPO_UNROLL
    for (int k = 0; k < NV; ++k) {
      const A u = m_fma(x[k], K, -a.F);
      const bool skip = !designated && x[k] == vmax;
      designated = designated || skip;
      e[k] = skip ? A(0) : hot_exp2(u);
      if (ENT) a.h = m_fma(e[k], m_fmax(u, u_floor<A>()), a.h);
    }
  }
  // a tree per vector, then one add into r
GRPO_UNROLL
  for (int w = 1; w < NV; w *= 2) {
GRPO_UNROLL
    for (int k = 0; k + w < NV; k += 2 * w) e[k] += e[k + w];
  }
  a.r += e[0];
}

template <typename A>
GRPO_HD Stat<A> acc_finish(const Acc<A>& a, A K) {
  Stat<A> s{a.m, a.r, a.h};
  if (!(a.m == neg_inf<A>())) to_exact(a.m, a.F, K, s.r, s.h);
  return s;
}

// Merge of two threads' statistics (exact frames). The larger max keeps the designated element (a's on ties);
// the other's designated max becomes a term c = 2^((m_small - m_big) K). A NaN anywhere gives NaN.
template <typename A>
GRPO_HD Stat<A> stat_merge(const Stat<A>& a, const Stat<A>& b, A K) {
  if (b.m == neg_inf<A>()) return a;
  if (a.m == neg_inf<A>()) return b;
  const bool a_big = !(b.m > a.m);
  const Stat<A>& big = a_big ? a : b;
  const Stat<A>& small = a_big ? b : a;
  const A ud = (small.m - big.m) * K;
  const A c = m_exp2(ud);
  Stat<A> o;
  o.m = big.m;
  o.r = big.r + m_fma(c, small.r, c);
  o.h = big.h + c * (small.h + ud * (A(1) + small.r));
  return o;
}

// ---------------------------------------------------------------------------------------------------------
// Per-row outputs and the constants of the gradient pass
// ---------------------------------------------------------------------------------------------------------
template <typename A>
struct RowOut {
  A ls;    // log of the row's sum, log1p(r) (-inf for an empty row: every logit -inf)
  A lse;   // m it + ls
  A logp;  // (z_y - m) it - ls: -log1p(r) when the target is the designated max
  A mu;    // sum_v p_v t_v, t_v = (z_v - m) it (<= 0)
  A ent;   // ls - mu
};

template <typename A>
GRPO_HD RowOut<A> row_out(const Stat<A>& st, A zy, A it) {
  RowOut<A> o;
  o.ls = st.m == neg_inf<A>() ? neg_inf<A>() : m_log1p(st.r);
  o.lse = m_fma(st.m, it, o.ls);
  o.logp = m_fma(zy - st.m, it, -o.ls);
  o.mu = st.h * static_cast<A>(kLn2) / (A(1) + st.r);
  o.ent = o.ls - o.mu;
  return o;
}

// The gradient pass: with u_v = RN(z_v K - F) (F = RN(m K)), g_v = kc 2^u_v (no ent_coef) or
// kc 2^u_v fma(a, max(u_v, floor), b) (ent_coef) -- every factor of a row folded into kc, a, b:
//   g_v = -(it / sum) p-term (coef + ent_coef (t_v - mu)), with 2^u_v 2^-d the exact term and t_v = (u_v - d) ln 2.
template <typename A>
struct GradConsts {
  A F, kc, a, b;
};

template <typename A>
GRPO_HD GradConsts<A> grad_consts(const Stat<A>& st, const RowOut<A>& o, A K, A it, A cf, A ec, bool has_ec) {
  GradConsts<A> g;
  g.F = st.m * K;
  const A d = m_fma(st.m, K, -g.F);
  const A k0 = -it / (A(1) + st.r);
  const A k = m_fma(k0, m_expm1(-d * static_cast<A>(kLn2)), k0);  // k0 2^-d
  if (has_ec) {
    g.kc = k;
    g.a = ec * static_cast<A>(kLn2);
    g.b = cf - ec * m_fma(d, static_cast<A>(kLn2), o.mu);
  } else {
    g.kc = k * cf;
    g.a = A(0);
    g.b = A(1);
  }
  return g;
}

template <typename A, bool HAS_EC>
GRPO_HD A grad_elem(const GradConsts<A>& g, A x, A K) {
  const A u = m_fma(x, K, -g.F);
  const A e = hot_exp2(u);
  if (HAS_EC) return g.kc * e * m_fma(g.a, m_fmax(u, u_floor<A>()), g.b);
  return g.kc * e;
}

// The target's entry, recomputed in full: (coef (1 - p_y) - ent_coef p_y (t_y - mu)) it, 1 - p_y = -expm1(logp).
template <typename A>
GRPO_HD A grad_target(const Stat<A>& st, const RowOut<A>& o, A zy, A it, A cf, A ec, bool has_ec) {
  const A omp = -m_expm1(o.logp);
  if (!has_ec) return cf * omp * it;
  A ty = (zy - st.m) * it;
  ty = ty < u_floor<A>() ? u_floor<A>() : ty;  // z_y = -inf: p_y = 0, and no 0 * -inf (a NaN stays NaN)
  return (cf * omp - ec * m_exp(o.logp) * (ty - o.mu)) * it;
}

// ---------------------------------------------------------------------------------------------------------
// The two-pass backward (bwd_kernel): the gradient from the forward's lse and H (it = 1/tau, s_v = z_v it),
//   g_v = -p_v (gl + gh (s_v - c)) it,  p_v = exp(s_v - lse),  c = lse - H,
// where s_v is floored at lse - 200 (fp32; fp64: lse - 1000) when gh is given: z = -inf has p = 0 and the floor
// keeps gh (s - c) finite there. The same pass sums rest = sum_{v != y} p_v (the target's own term left out, not
// subtracted), and the target's entry is made of it: 1 - exp(s_y - lse) of an fp32 lse keeps nothing of a
// 1 - p_y below ~|lse| 6e-8 (the fp32 lse is that coarse), rest keeps its relative accuracy at p_y ≈ 1.
// ---------------------------------------------------------------------------------------------------------
template <typename A>
struct BwdConsts {
  A it, lz, h, c, floor, gl, gh, k;  // k = -gl it
};

template <typename A>
GRPO_HD BwdConsts<A> bwd_consts(A it, A lz, A h, A gl, A gh) {
  BwdConsts<A> b;
  b.it = it;
  b.lz = lz;
  b.h = h;
  b.c = lz - h;
  b.floor = lz - (sizeof(A) == 4 ? A(200) : A(1000));
  b.gl = gl;
  b.gh = gh;
  b.k = -gl * it;
  return b;
}

// g_v of one element x = z_v; p = p_v.
template <typename A, bool HAS_GH>
GRPO_HD A bwd_elem(const BwdConsts<A>& b, A x, A& p) {
  if (HAS_GH) {
    A sv = x * b.it;
    sv = sv > b.floor ? sv : b.floor;
    p = m_exp(sv - b.lz);
    return -p * (b.gl + b.gh * (sv - b.c)) * b.it;
  }
  p = m_exp(m_fma(x, b.it, -b.lz));
  return b.k * p;
}

// The target's entry (gl (1 - p_y) - gh p_y (s_y - c)) it with 1 - p_y = rest and, while rest < 1/2 (p_y > 1/2),
// s_y - c = log p_y + H = log1p(-rest) + H: both small for a confident target, where s_y - c itself would cancel
// (for a small p_y log1p(-rest) would lose it: the plain difference is used there).
template <typename A>
GRPO_HD A bwd_target(const BwdConsts<A>& b, A zy, A rest, bool has_gh) {
  A gy = b.gl * rest;
  if (has_gh) {
    A sy = zy * b.it;
    sy = sy < b.floor ? b.floor : sy;  // (a NaN stays NaN)
    const A py = m_exp(sy - b.lz);
    const A ty = rest < A(0.5) ? m_log1p(-rest) + b.h : sy - b.c;
    gy = m_fma(-(b.gh * py), ty, gy);
  }
  return gy * b.it;
}

// One thread's share of the bwd row, in map_row's (cuda_kernels.cuh) element-to-thread assignment: a scalar head
// [0, head), vectors of NV from head (vector j at head + j NV, j = tid, tid + nthreads, ...), a scalar tail
// [tail_start, V). Writes g_v through dst (void one(int64_t i, A g), void vec(int64_t i, const A* g): NV values
// from i; it may write into the row src reads: each element is read before it is written) and returns the
// thread's part of rest: a tree per vector (the target's lane zeroed), added into one running sum.
#if defined(__CUDACC__)
#pragma nv_exec_check_disable
#endif
template <typename A, int NV, bool HAS_GH, class Src, class Dst>
GRPO_HD A thread_bwd(const Src& src, const Dst& dst, int64_t head, int64_t nvec, int64_t tail_start, int64_t V,
                     int64_t y, int tid, int nthreads, const BwdConsts<A>& b) {
  A rest = A(0);
  for (int64_t i = tid; i < head; i += nthreads) {
    A p;
    dst.one(i, bwd_elem<A, HAS_GH>(b, src.one(i), p));
    if (i != y) rest += p;
  }
  for (int64_t j = tid; j < nvec; j += nthreads) {
    const int64_t i0 = head + j * NV;
    A x[NV], e[NV];
    src.vec(i0, x);
GRPO_UNROLL
    for (int k = 0; k < NV; ++k) x[k] = bwd_elem<A, HAS_GH>(b, x[k], e[k]);
    if (static_cast<uint64_t>(y - i0) < static_cast<uint64_t>(NV)) {  // once per row (one thread)
GRPO_UNROLL
      for (int k = 0; k < NV; ++k) e[k] = i0 + k == y ? A(0) : e[k];
    }
GRPO_UNROLL
    for (int w = 1; w < NV; w *= 2) {
GRPO_UNROLL
      for (int k = 0; k + w < NV; k += 2 * w) e[k] += e[k + w];
    }
    rest += e[0];
    dst.vec(i0, x);
  }
  for (int64_t i = tail_start + tid; i < V; i += nthreads) {
    A p;
    dst.one(i, bwd_elem<A, HAS_GH>(b, src.one(i), p));
    if (i != y) rest += p;
  }
  return rest;
}

// ---------------------------------------------------------------------------------------------------------
// One thread's share of a row: a scalar head [0, head), vectors of NV from head (vector j at head + j NV,
// for j = tid, tid + nthreads, ...: two per iteration, in that order), a scalar tail [tail_start, V).
// Src: A one(int64_t i) and void vec(int64_t i, A* out) (NV values from i).
// ---------------------------------------------------------------------------------------------------------
#if defined(__CUDACC__)
#pragma nv_exec_check_disable
#endif
template <typename A, int NV, bool ENT, class Src>
GRPO_HD Acc<A> thread_acc(const Src& src, int64_t head, int64_t nvec, int64_t tail_start, int64_t V, int tid,
                          int nthreads, A K) {
  Acc<A> a = acc_empty<A>();
  for (int64_t i = tid; i < head; i += nthreads) {
    const A x = src.one(i);
    acc_add<A, 1, ENT>(a, &x, K);
  }
  int64_t j = tid;
  for (; j + nthreads < nvec; j += 2 * static_cast<int64_t>(nthreads)) {  // two loads in flight
    A x0[NV], x1[NV];
    src.vec(head + j * NV, x0);
    src.vec(head + (j + nthreads) * NV, x1);
    acc_add<A, NV, ENT>(a, x0, K);
    acc_add<A, NV, ENT>(a, x1, K);
  }
  if (j < nvec) {
    A x0[NV];
    src.vec(head + j * NV, x0);
    acc_add<A, NV, ENT>(a, x0, K);
  }
  for (int64_t i = tail_start + tid; i < V; i += nthreads) {
    const A x = src.one(i);
    acc_add<A, 1, ENT>(a, &x, K);
  }
  return a;
}

}  // namespace rowmath
}  // namespace grpo
