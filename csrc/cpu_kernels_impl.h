// The CPU row kernels, written once over at::vec::Vectorized and compiled once per SIMD level:
// cpu_kernels_default.cpp, cpu_kernels_avx2.cpp and cpu_kernels_avx512.cpp define CPU_CAPABILITY (and the
// target ISA) and include this file. Only raw pointers cross the boundary (grpo::RowProblem); threading
// (at::parallel_for) and all tensor checks live in cpu_ops.cpp.
//
// Per row r = s*T + t (logits row z = logits[s, t, :], vocabulary stride 1, y = tokens[s, t], it = 1/tau):
//   fwd:      m = max z (a max pass), i* = the first index with z = m;  e_v = exp(t_v), t_v = (z_v - m) it;
//             rest = sum_{v != i*} e_v (the sum of the row is 1 + rest: the designated max's term e = 1 is kept out
//             of the sum, so the small terms of a confident row are never rounded against it);
//             log sum = log1p(rest);  lse = m it + log1p(rest);  logp = (z_y - m) it - log1p(rest);
//             H = log1p(rest) - sum_v e_v t_v / (1 + rest)  (= lse - sum_v p_v z_v it; -inf logits give 0).
//             The sums run in blocks of 64 vectors, compensated (Kahan) per vector for rest and per kSub = 8
//             vectors for h (plain fma inside: exp itself is ~20 ulp, the compensation is for the long row).
//             h runs first without a floor on t_v; a row whose h came out NaN (a -inf or NaN logit) is summed
//             again with the floor, and the next kStickyRows rows take it from the start (Rows::kStickyRows).
//   bwd:      g_v = -p_v (gl + gh (z_v it - (lse - H))) it, p_v = exp(z_v it - lse) from the forward's lse, while
//             the same pass sums rest = sum_{v != y} p_v (the target's term left out); then the target entry
//             g_y = (gl (1 - p_y) - gh p_y (z_y it - (lse - H))) it with 1 - p_y = rest and, for rest < 1/2,
//             z_y it - (lse - H) = log1p(-rest) + H: no 1 - exp(z_y it - lse), which loses all of a 1 - p_y below
//             ~|lse| 6e-8 in fp32 (the fp32 lse itself is that coarse)
//   fwd_grad: one read of the row from memory: a max pass, then e_v = exp(t_v) written into the gradient row
//             itself (into an fp32 scratch row for bf16/fp16, or with ent_coef when z is the gradient row: z is reread
//             in the last pass), then rescaled in place
//             from L2: g_v = -coef it e_v / sum;  g_y = -coef expm1(logp) it.  With ent_coef (g_H = ent_coef, the
//             entropy always computed): g_v = -(it / sum) e_v (coef + ent_coef (t_v - mu)), mu = sum_v p_v t_v,
//             where t_v comes from a cache-hot reread of z_v (z_v/tau - (lse - H) = t_v - mu), and
//             g_y = (coef (1 - p_y) - ent_coef p_y (t_y - mu)) it.  That last pass floors t_v at kFloor only
//             where it has to (a row with a -inf logit, or an affine map that could overflow).
// Masked rows are never read: outputs 0 and a zero gradient row. Reductions run in a fixed order inside
// each row, so results do not depend on the thread count (bitwise deterministic).
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>

#include "grpo_kernels.h"

#ifndef CPU_CAPABILITY
#error "define CPU_CAPABILITY before including cpu_kernels_impl.h"
#endif

namespace grpo {
namespace CPU_CAPABILITY {

using at::vec::Vectorized;

// Io<T>: how a chunk of W elements of type T is loaded as N vectors of the accumulation type A and stored back.
template <typename T>
struct Io;

template <>
struct Io<float> {
  using A = float;
  static constexpr int N = 1;
  static constexpr int64_t W = Vectorized<float>::size();
  static inline void load(const float* p, Vectorized<float>* x) { x[0] = Vectorized<float>::loadu(p); }
  static inline void store(float* p, const Vectorized<float>* x) { x[0].store(p); }
};

template <>
struct Io<double> {
  using A = double;
  static constexpr int N = 1;
  static constexpr int64_t W = Vectorized<double>::size();
  static inline void load(const double* p, Vectorized<double>* x) { x[0] = Vectorized<double>::loadu(p); }
  static inline void store(double* p, const Vectorized<double>* x) { x[0].store(p); }
};

template <typename R>  // c10::BFloat16 or c10::Half
struct IoReduced {
  using A = float;
  static constexpr int N = 2;
  static constexpr int64_t W = Vectorized<R>::size();
  static_assert(Vectorized<R>::size() == 2 * Vectorized<float>::size(), "unexpected vector widths");
  static inline void load(const R* p, Vectorized<float>* x) { at::vec::load_to_float<R>(p, x[0], x[1]); }
  static inline void store(R* p, const Vectorized<float>* x) { at::vec::convert_from_float<R>(x[0], x[1]).store(p); }
};
template <>
struct Io<c10::BFloat16> : IoReduced<c10::BFloat16> {};
template <>
struct Io<c10::Half> : IoReduced<c10::Half> {};

inline Vectorized<float> vexp(const Vectorized<float>& x) { return x.exp_u20(); }
inline Vectorized<double> vexp(const Vectorized<double>& x) { return x.exp(); }

template <typename A>
inline A smax(A a, A b) {  // NaN-propagating max
  return (std::isnan(a) || a > b) ? a : b;
}

template <typename A>
inline A hsum(const Vectorized<A>& v) {  // fixed-order horizontal sum
  alignas(64) A buf[Vectorized<A>::size()];
  v.store(buf);
  A r = 0;
  for (int64_t j = 0; j < Vectorized<A>::size(); ++j) r += buf[j];
  return r;
}

// s + x with the rounding error carried in c (Kahan); the true sum is s - c.
template <typename A>
inline void kahan_add(Vectorized<A>& s, Vectorized<A>& c, const Vectorized<A>& x) {
  const Vectorized<A> y = x - c;
  const Vectorized<A> t = s + y;
  c = (t - s) - y;
  s = t;
}

template <typename A>
inline A hmax(const Vectorized<A>& v) {
  alignas(64) A buf[Vectorized<A>::size()];
  v.store(buf);
  A r = -std::numeric_limits<A>::infinity();
  for (int64_t j = 0; j < Vectorized<A>::size(); ++j) r = smax(r, buf[j]);
  return r;
}

template <typename T>
struct Rows {
  using A = typename Io<T>::A;
  using VA = Vectorized<A>;
  static constexpr int N = Io<T>::N;
  static constexpr int64_t W = Io<T>::W;
  static constexpr int64_t L = VA::size();

  static inline const T* zrow(const RowProblem& p, int64_t r) {
    const int64_t s = r / p.T, t = r % p.T;
    return static_cast<const T*>(p.logits) + s * p.ls_s + t * p.ls_t;
  }
  static inline T* grow(const RowProblem& p, int64_t r) {
    const int64_t s = r / p.T, t = r % p.T;
    return static_cast<T*>(p.grad) + s * p.gs_s + t * p.gs_t;
  }

  // Max of the row; a row of -inf gives 0 (then sum = 0, lse = -inf, like torch.logsumexp).
  static A row_max(const T* z, int64_t V) {
    VA vm(-std::numeric_limits<A>::infinity());
    int64_t i = 0;
    for (; i + W <= V; i += W) {
      VA x[N];
      Io<T>::load(z + i, x);
      for (int k = 0; k < N; ++k) vm = at::vec::maximum(vm, x[k]);
    }
    A m = hmax(vm);
    for (; i < V; ++i) m = smax(m, static_cast<A>(z[i]));
    if (std::isinf(m) && m < 0) m = 0;
    return m;
  }

  // The entropy terms need t_v = (z_v - m) it with e_v = exp(t_v) = 0 at a -inf logit: 0 * -inf would be NaN.
  // The loops first run without floors on t_v (exact for finite t_v: the same bits as with them); a row where that
  // made the entropy sum h NaN (a -inf logit, or a NaN) is summed again with the floors, which keep such a t_v
  // finite (the lowest finite value in exp_pass, kFloor in the last pass of fwd_grad). Rows in a batch tend to be
  // alike, so after a row that needed them the next kStickyRows rows take the floors from the start.
  static constexpr int kStickyRows = 16;
  static constexpr A kFloor = sizeof(A) == 4 ? A(-200) : A(-1000);  // exp(kFloor) is 0 in A

  // rest = sum_{v != i*} e_v and (ENT) h = sum_v e_v t_v with t_v = (z_v - m) it, e_v = exp(t_v), where i* is the
  // first index with z_v = m (the designated max, e = 1: `found` tells whether there is one -- not in a row of -inf,
  // whose m is 0, or a NaN row); (STORE) e_v -> e_out[v] for every v (i* included). e_out may alias z (same
  // element type): each chunk is loaded before it is overwritten.
  // Accurate summation: compensated (Kahan) vector partial sums over blocks of kBlock elements, each block's
  // total added to a double. The designated max is left out of the sum, so the sum is of the small terms alone:
  // 1 - p_y of a confident target, what its log-prob and gradient are made of, keeps its relative accuracy (with
  // the 1 in a lane, the fp32 horizontal sum of the lanes would round the other terms against it). The search for
  // i* runs inside the pass, on the values already loaded, until it is found.
  static constexpr int64_t kBlock = 64 * W;
  static constexpr int64_t kSub = 8;  // (ENT) terms per lane summed plainly (fma) before the compensated sum
  // FLOOR (ENT): floor t_v in the entropy sum (see kStickyRows).
  template <bool ENT, bool STORE, bool FLOOR = true>
  static void exp_pass(const T* z, int64_t V, A m, A it, A* e_out, bool& found, double& sum_out, double& h_out) {
    const VA vm(m), vit(it), vlow(std::numeric_limits<A>::lowest());
    const int64_t vend = V - V % W;
    constexpr int64_t kAll = (int64_t(1) << L) - 1;
    bool hit = false;
    double s = 0, h = 0;
    int64_t i = 0;
    while (i < vend) {
      const int64_t stop = std::min(vend, i + kBlock);
      VA vs(0), cs(0), vh(0), ch(0);
      while (i < stop) {
        const int64_t sub = std::min(stop, i + kSub * L);
        VA sh(0);
        for (; i < sub; i += W) {
        VA x[N];
        Io<T>::load(z + i, x);
        for (int k = 0; k < N; ++k) {
          const VA t = (x[k] - vm) * vit;
          VA e = vexp(t);
          if (STORE) e.store(e_out + i + k * L);
          if (ENT) sh = at::vec::fmadd(e, FLOOR ? at::vec::maximum(t, vlow) : t, sh);  // -inf: e = 0, not 0 * -inf
          if (!hit) {
            // zero_mask() of the comparison: bit j set where lane j is *not* equal to m
            const int64_t ne = static_cast<int64_t>((x[k] == vm).zero_mask()) & kAll;
            if (ne != kAll) {  // once per row: drop the designated max's lane from the sum
              int64_t j = 0;
              while ((ne >> j) & 1) ++j;
              alignas(64) A buf[L];
              e.store(buf);
              buf[j] = A(0);
              e = VA::loadu(buf);
              hit = true;
            }
          }
          kahan_add(vs, cs, e);
        }
        }
        if (ENT) kahan_add(vh, ch, sh);
      }
      s += static_cast<double>(hsum(vs)) - static_cast<double>(hsum(cs));
      if (ENT) h += static_cast<double>(hsum(vh)) - static_cast<double>(hsum(ch));
    }
    for (; i < V; ++i) {
      const A x = static_cast<A>(z[i]);
      const A t = (x - m) * it;
      const A e = std::exp(t);
      if (!hit && x == m)
        hit = true;
      else
        s += e;
      if (ENT) h += static_cast<double>(e * smax(t, std::numeric_limits<A>::lowest()));
      if (STORE) e_out[i] = e;
    }
    found = hit;
    sum_out = s;
    h_out = h;
  }

  // The row's statistics from rest (and h) of exp_pass: the sum 1 + rest (rest alone when there is no designated
  // max), log of the sum, and the entropy.
  struct RowSums {
    double sum, log_sum, ent;
  };
  // lse = m it + log sum and logp = (z_y - m) it - log sum (no cancellation when the target is the max, p_y ≈ 1),
  // with explicit fma: fwd and fwd_grad must give the same bits, whatever contraction the compiler would choose.
  static inline A row_lse(A m, A it, A ls) { return std::fma(m, it, ls); }
  static inline A row_logp(A zy, A m, A it, A ls) { return std::fma(zy - m, it, -ls); }

  static inline RowSums finish(bool found, double rest, double h) {
    RowSums r;
    r.sum = found ? 1.0 + rest : rest;
    r.log_sum = found ? std::log1p(rest) : std::log(rest);
    r.ent = r.log_sum - h / r.sum;
    return r;
  }

  static inline void zero_row(T* g, int64_t V) { std::memset(static_cast<void*>(g), 0, sizeof(T) * V); }

  // ---------------------------------------------------------------------------------------------------
  static void fwd(const RowProblem& p, int64_t begin, int64_t end) {
    const int64_t V = p.V;
    const A it = static_cast<A>(p.inv_temp);
    A* logp = static_cast<A*>(p.logp);
    A* lse = static_cast<A*>(p.lse);
    A* ent = static_cast<A*>(p.ent);
    int floored = 0;  // rows left that take the floors from the start (kStickyRows)
    for (int64_t r = begin; r < end; ++r) {
      if (!p.mask[r]) {
        logp[r] = lse[r] = ent[r] = 0;
        continue;
      }
      const T* z = zrow(p, r);
      const A zy = static_cast<A>(z[p.tokens[r]]);
      const A m = row_max(z, V);
      bool found;
      double s, h;
      if (!p.with_entropy) {
        exp_pass<false, false>(z, V, m, it, nullptr, found, s, h);
      } else {
        if (floored == 0) exp_pass<true, false, false>(z, V, m, it, nullptr, found, s, h);
        if (floored > 0 || std::isnan(h)) {  // a -inf (or NaN) logit: again with the floors
          exp_pass<true, false>(z, V, m, it, nullptr, found, s, h);
          floored = floored > 0 ? floored - 1 : kStickyRows;
        }
      }
      const RowSums rs = finish(found, s, h);
      const A ls = static_cast<A>(rs.log_sum);
      lse[r] = row_lse(m, it, ls);
      logp[r] = row_logp(zy, m, it, ls);
      ent[r] = p.with_entropy ? static_cast<A>(rs.ent) : A(0);
    }
  }

  // ---------------------------------------------------------------------------------------------------
  // The gradient row of bwd from the forward's lse (and H): g_v = -p_v (gl + gh (s_v - c)) it, s_v = z_v it (floored
  // where HAS_GH: see bwd), c = lse - H, p_v = exp(s_v - lse); the target's lane gets the same formula here and is
  // overwritten by the caller. Returns rest = sum_{v != y} p_v (= 1 - p_y, what the target's entry is made of:
  // summed like exp_pass, Kahan vector partial sums over blocks of kBlock elements, block totals in double, with the
  // target's own term left out instead of subtracted, so that rest keeps its relative accuracy at p_y ≈ 1).
  template <bool HAS_GH>
  static double bwd_pass(const T* z, T* g, int64_t V, int64_t y, A it, A lz, A gl, A gh, A c, A floor) {
    const VA vit(it), vL(lz), vk(-gl * it), vgl(gl), vgh(gh), vc(c), vnit(-it), vfloor(floor);
    const int64_t vend = V - V % W;
    double s = 0;
    int64_t i = 0;
    while (i < vend) {
      const int64_t stop = std::min(vend, i + kBlock);
      VA vs(0), cs(0);
      for (; i < stop; i += W) {
        VA x[N];
        Io<T>::load(z + i, x);  // z may be g: the chunk is read before it is written
        const bool has_y = static_cast<uint64_t>(y - i) < static_cast<uint64_t>(W);
        for (int q = 0; q < N; ++q) {
          VA e;
          if (HAS_GH) {
            const VA sv = at::vec::maximum(x[q] * vit, vfloor);
            e = vexp(sv - vL);
            x[q] = e * (vgl + vgh * (sv - vc)) * vnit;
          } else {
            e = vexp(x[q] * vit - vL);
            x[q] = vk * e;
          }
          const int64_t j = y - i - q * L;
          if (has_y && j >= 0 && j < L) {  // once per row: the target's lane is not part of rest
            alignas(64) A buf[L];
            e.store(buf);
            buf[j] = A(0);
            e = VA::loadu(buf);
          }
          kahan_add(vs, cs, e);
        }
        Io<T>::store(g + i, x);
      }
      s += static_cast<double>(hsum(vs)) - static_cast<double>(hsum(cs));
    }
    for (; i < V; ++i) {
      A e, gv;
      if (HAS_GH) {
        const A sv = smax(static_cast<A>(z[i]) * it, floor);
        e = std::exp(sv - lz);
        gv = -e * (gl + gh * (sv - c)) * it;
      } else {
        e = std::exp(static_cast<A>(z[i]) * it - lz);
        gv = -gl * it * e;
      }
      g[i] = static_cast<T>(gv);
      if (i != y) s += static_cast<double>(e);
    }
    return s;
  }

  static void bwd(const RowProblem& p, int64_t begin, int64_t end) {
    const int64_t V = p.V;
    const A it = static_cast<A>(p.inv_temp);
    const A* gl_ = static_cast<const A*>(p.grad_logp);
    const A* gh_ = static_cast<const A*>(p.grad_ent);
    const A* lse_ = static_cast<const A*>(p.lse_in);
    const A* ent_ = static_cast<const A*>(p.ent_in);
    for (int64_t r = begin; r < end; ++r) {
      T* g = grow(p, r);
      if (!p.mask[r]) {
        zero_row(g, V);
        continue;
      }
      const T* z = zrow(p, r);  // may alias g: each chunk is read before it is written
      const int64_t y = p.tokens[r];
      const A zy = static_cast<A>(z[y]);
      const A gl = gl_[r], gh = gh_ ? gh_[r] : A(0), lz = lse_[r], h = ent_[r];
      const A c = lz - h;
      // z = -inf gives p = 0; the floor keeps gh * (s - c) finite there (0 * inf would be NaN) and is low enough
      // that exp(floor - lse) underflows to 0 in A.
      const A floor = lz - (sizeof(A) == 4 ? A(200) : A(1000));
      const bool has_gh = gh != A(0);
      const double rest_d = has_gh ? bwd_pass<true>(z, g, V, y, it, lz, gl, gh, c, floor)
                                   : bwd_pass<false>(z, g, V, y, it, lz, gl, gh, c, floor);
      // The target's entry (gl (1 - p_y) - gh p_y (z_y it - (lse - H))) it with 1 - p_y = rest, never 1 - exp(.) of
      // the fp32 lse. z_y it - (lse - H) = log p_y + H: with log p_y = log1p(-rest) while rest < 1/2 (a confident
      // target: no cancellation), the plain difference otherwise (log1p(-rest) would lose p_y when it is small).
      const A rest = static_cast<A>(rest_d);
      A gy = gl * rest;
      if (has_gh) {
        const A sy = smax(zy * it, floor), py = std::exp(sy - lz);
        const A ty = rest < A(0.5) ? std::log1p(-rest) + h : sy - c;
        gy -= gh * py * ty;
      }
      g[y] = static_cast<T>(gy * it);
    }
  }

  // ---------------------------------------------------------------------------------------------------
  static void fwd_grad(const RowProblem& p, int64_t begin, int64_t end) {
    const int64_t V = p.V;
    const A it = static_cast<A>(p.inv_temp);
    A* logp = static_cast<A*>(p.logp);
    A* lse = static_cast<A*>(p.lse);
    A* ent = static_cast<A*>(p.ent);
    const A* coef = static_cast<const A*>(p.coef);
    const A* ecoef = static_cast<const A*>(p.ent_coef);  // null: no entropy term
    const bool with_ent = p.with_entropy || ecoef != nullptr;
    // e_v goes into the gradient row itself, unless that cannot hold it in A (bf16/fp16) or z is needed again
    // and overlaps it (ent_coef: z_v is reread in the last pass, and z may be the gradient row)
    constexpr bool kSameType = std::is_same<T, A>::value;
    std::unique_ptr<A[]> scratch;
    if (!kSameType) scratch.reset(new A[V]);
    int floored = 0;  // rows left that take the floors from the start (kStickyRows)
    for (int64_t r = begin; r < end; ++r) {
      T* g = grow(p, r);
      if (!p.mask[r]) {
        logp[r] = lse[r] = ent[r] = 0;
        zero_row(g, V);
        continue;
      }
      const T* z = zrow(p, r);  // may alias g
      const int64_t y = p.tokens[r];
      const A zy = static_cast<A>(z[y]);
      const A m = row_max(z, V);
      A* e = reinterpret_cast<A*>(g);
      bool z_kept = true;  // z is still there after the exp pass (not overwritten by e_v)
      if (!kSameType) {
        e = scratch.get();
      } else {
        const uintptr_t zb = reinterpret_cast<uintptr_t>(z), gb = reinterpret_cast<uintptr_t>(g);
        const uintptr_t nb = static_cast<uintptr_t>(V) * sizeof(T);
        if (zb < gb + nb && gb < zb + nb) {  // z is (overlaps) the gradient row
          if (ecoef != nullptr) {  // z is reread in the last pass: keep it, e_v into scratch
            if (!scratch) scratch.reset(new A[V]);
            e = scratch.get();
          } else {
            z_kept = false;
          }
        }
      }
      bool found;
      double s, h;
      bool unfloored = false;  // (with_ent) h came without floors: every t_v is finite
      if (!with_ent) {
        exp_pass<false, true>(z, V, m, it, e, found, s, h);
      } else if (floored > 0 || !z_kept) {  // (no second look at an overwritten z: the floors from the start)
        exp_pass<true, true>(z, V, m, it, e, found, s, h);
        if (floored > 0) --floored;
      } else {
        exp_pass<true, true, false>(z, V, m, it, e, found, s, h);
        unfloored = !std::isnan(h);
        if (!unfloored) {  // a -inf (or NaN) logit: h again with the floors (e_v is already stored, and the same)
          exp_pass<true, false>(z, V, m, it, nullptr, found, s, h);
          floored = kStickyRows;
        }
      }
      const RowSums rs = finish(found, s, h);
      const A ls = static_cast<A>(rs.log_sum);
      const A lp = row_logp(zy, m, it, ls);
      lse[r] = row_lse(m, it, ls);
      logp[r] = lp;
      ent[r] = with_ent ? static_cast<A>(rs.ent) : A(0);
      const A cf = coef[r];
      int64_t i = 0;
      if (ecoef == nullptr) {
        const A scale = static_cast<A>(-cf * it / rs.sum);
        const VA k(scale);
        for (; i + W <= V; i += W) {
          VA x[N];
          for (int q = 0; q < N; ++q) x[q] = VA::loadu(e + i + q * L) * k;
          Io<T>::store(g + i, x);
        }
        for (; i < V; ++i) g[i] = static_cast<T>(e[i] * scale);
        g[y] = static_cast<T>(-cf * std::expm1(lp) * it);  // coef (1 - p_y) / tau, exact for p_y ≈ 1
      } else {
        // g_v = e_v (b + a t_v): a = -(it / sum) ent_coef, b = -(it / sum) (coef - ent_coef mu), mu = h / sum
        // (<= 0). t_v is floored where z_v = -inf (e_v = 0 there; the floor keeps a t_v finite) and far enough
        // down that exp(floor) is 0 in A.
        const A ec = ecoef[r];
        const double mu = h / rs.sum, kk = -static_cast<double>(it) / rs.sum;
        const A a = static_cast<A>(kk * ec), b = static_cast<A>(kk * (cf - ec * mu));
        const A floor = kFloor;
        // the vector loop folds it into a: a t_v = (a it) d_v, d_v = z_v - m floored at floor / it (the same bits
        // at it = 1). Without the floor where h says every t_v is finite: then d_v is a finite A, and with
        // |a it| <= 1/2, |b| <= max/4 the factor (a it) d_v + b is finite, so an e_v = 0 gives 0 (as floored);
        // elsewhere a floor that binds has t_v <= floor, e_v = 0, 0 either way.
        const A ai = a * it;
        const VA vai(ai), vb(b), vm(m), vdfloor(floor / it);
        if (unfloored && std::abs(ai) <= A(0.5) && std::abs(b) <= std::numeric_limits<A>::max() / 4) {
          for (; i + W <= V; i += W) {
            VA x[N];
            Io<T>::load(z + i, x);  // the cache-hot reread; g may be z or e: the chunk is read before it is written
            for (int q = 0; q < N; ++q) x[q] = VA::loadu(e + i + q * L) * at::vec::fmadd(vai, x[q] - vm, vb);
            Io<T>::store(g + i, x);
          }
        } else {
          for (; i + W <= V; i += W) {
            VA x[N];
            Io<T>::load(z + i, x);
            for (int q = 0; q < N; ++q) {
              const VA d = at::vec::maximum(x[q] - vm, vdfloor);
              x[q] = VA::loadu(e + i + q * L) * at::vec::fmadd(vai, d, vb);
            }
            Io<T>::store(g + i, x);
          }
        }
        for (; i < V; ++i) {
          const A t = smax((static_cast<A>(z[i]) - m) * it, floor);
          g[i] = static_cast<T>(e[i] * (a * t + b));
        }
        const A ty = smax((zy - m) * it, floor), py = std::exp(lp);  // (floored: z_y = -inf has py = 0)
        g[y] = static_cast<T>((-cf * std::expm1(lp) - ec * py * (ty - static_cast<A>(mu))) * it);
      }
    }
  }
};

inline const CpuKernelTable& make_table(const char* isa) {
  static const CpuKernelTable table = {
      isa,
      {&Rows<float>::fwd, &Rows<double>::fwd, &Rows<c10::BFloat16>::fwd, &Rows<c10::Half>::fwd},
      {&Rows<float>::bwd, &Rows<double>::bwd, &Rows<c10::BFloat16>::bwd, &Rows<c10::Half>::bwd},
      {&Rows<float>::fwd_grad, &Rows<double>::fwd_grad, &Rows<c10::BFloat16>::fwd_grad,
       &Rows<c10::Half>::fwd_grad},
  };
  return table;
}

}  // namespace CPU_CAPABILITY
}  // namespace grpo
