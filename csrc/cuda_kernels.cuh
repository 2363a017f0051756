// CUDA row kernels of grpo_kernels (torch-free: raw pointers and templates, so that this header compiles with
// nvcc alone -- see cuda_check.cu -- and is used by the torch extension in cuda_ops.cu).
//
// One block per (S, T) row (1-D grid-stride loop over rows, int64 offsets), kBlock threads. Each thread owns a
// fixed set of elements of the row (the same in every pass), loaded 128 bits at a time where the row is
// aligned (a scalar head brings it to alignment; a scalar tail finishes it). Accumulation in fp32 (fp64 for
// fp64 logits). The row arithmetic lives in cuda_rowmath.cuh (host+device, tested on the CPU): per thread a
// running (max, sum of the non-max terms, entropy sum) updated once per loaded vector (its max first, one
// rescale only when that grows, then one FFMA + one ex2 per element, with K = log2(e)/tau folded in), the sum of
// the designated max's term kept out of every float sum (so a confident target keeps log p_y = -log1p(rest)
// and 1 - p_y to fp32 relative accuracy). Reductions: warp shuffles, then one value per warp through shared
// memory -- a fixed tree, so results are bitwise deterministic.
//   fwd:      one read of the row;
//   bwd:      one read of the row, one write of the gradient (g_v from the forward's lse and H), summing
//             rest = sum_{v != y} p_v on the way (block_sum); the target entry is then written by one thread with
//             1 - p_y = rest (rowmath::bwd_target), never 1 - exp(z_y/tau - lse) of the fp32 lse;
//   fwd_grad: the fwd pass, then the row is read again (from L2 for rows of tens of kB) and the gradient
//             g_v = -coef it p_v (with ent_coef: -(coef + ent_coef (t_v - mu)) it p_v, t_v = (z_v - m) it,
//             mu = sum_v p_v t_v) is written; the target entry (coef (1 - p_y) - ent_coef p_y (t_y - mu)) it,
//             1 - p_y = -expm1(logp), is computed by one thread after the block has written its row.
// Masked rows are never read: outputs 0 and a zero gradient row. `out` may alias the logits: every element is
// read and written by the same thread in the same iteration, and z_y is read before the first write.
// An out-of-range token id on an unmasked row (the launchers' callers check ids beforehand) is never used as
// an index: that row's outputs are NaN.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda_rowmath.cuh"
#include "grpo_kernels.h"

namespace grpo {
namespace cuda {

constexpr int kBlock = 256;
constexpr int kWarps = kBlock / 32;

// ---------------------------------------------------------------------------------------------------------
// Element types: conversion to/from the accumulation type A and 128-bit vector loads/stores.
// ---------------------------------------------------------------------------------------------------------
template <typename T>
struct Elem;

template <>
struct Elem<float> {
  using A = float;
  static constexpr int kVec = 4;
  __device__ static inline A to(float x) { return x; }
  __device__ static inline float from(A x) { return x; }
};
template <>
struct Elem<double> {
  using A = double;
  static constexpr int kVec = 2;
  __device__ static inline A to(double x) { return x; }
  __device__ static inline double from(A x) { return x; }
};
template <>
struct Elem<__nv_bfloat16> {
  using A = float;
  static constexpr int kVec = 8;
  __device__ static inline A to(__nv_bfloat16 x) { return __bfloat162float(x); }
  __device__ static inline __nv_bfloat16 from(A x) { return __float2bfloat16_rn(x); }
};
template <>
struct Elem<__half> {
  using A = float;
  static constexpr int kVec = 8;
  __device__ static inline A to(__half x) { return __half2float(x); }
  __device__ static inline __half from(A x) { return __float2half_rn(x); }
};

// kVec elements through one 16-byte transaction (p must be 16-byte aligned).
template <typename T>
__device__ inline void load_vec(const T* p, typename Elem<T>::A* out) {
  constexpr int n = Elem<T>::kVec;
  union {
    uint4 u;
    T e[n];
  } v;
  v.u = *reinterpret_cast<const uint4*>(p);
#pragma unroll
  for (int k = 0; k < n; ++k) out[k] = Elem<T>::to(v.e[k]);
}

// bf16 -> fp32 is the 16 bits moved up: one shift or one mask per element (the generic conversion extracts the
// upper half first).
template <>
__device__ inline void load_vec<__nv_bfloat16>(const __nv_bfloat16* p, float* out) {
  const uint4 u = *reinterpret_cast<const uint4*>(p);
  const unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    out[2 * k] = __uint_as_float(w[k] << 16);
    out[2 * k + 1] = __uint_as_float(w[k] & 0xffff0000u);
  }
}

template <typename T>
__device__ inline void store_vec(T* p, const typename Elem<T>::A* in) {
  constexpr int n = Elem<T>::kVec;
  union {
    uint4 u;
    T e[n];
  } v;
#pragma unroll
  for (int k = 0; k < n; ++k) v.e[k] = Elem<T>::from(in[k]);
  *reinterpret_cast<uint4*>(p) = v.u;
}

template <typename A>
__device__ inline A neg_inf() {
  return -static_cast<A>(INFINITY);
}

// Elements a row splits into: a scalar head up to 16-byte alignment, whole vectors, a scalar tail.
struct RowSplit {
  int64_t head, nvec, tail_start;
};

template <typename T>
__device__ inline RowSplit split_row(const T* z, int64_t V) {
  constexpr int n = Elem<T>::kVec;
  const uintptr_t addr = reinterpret_cast<uintptr_t>(z);
  RowSplit r;
  if (addr % sizeof(T) != 0) {  // cannot happen for a valid tensor; stay scalar
    r.head = V;
  } else {
    r.head = static_cast<int64_t>(((16 - addr % 16) % 16) / sizeof(T));
    if (r.head > V) r.head = V;
  }
  r.nvec = (V - r.head) / n;
  r.tail_start = r.head + r.nvec * n;
  return r;
}

// g[i] = f(i, z[i]) for the elements this thread owns (the ones cuda_rowmath's thread_acc gives it in the
// statistics pass; z and g may be the same row). Vector stores when z and g share their alignment (always true
// when they alias), scalar stores otherwise.
template <typename T, typename F>
__device__ inline void map_row(const T* z, T* g, int64_t V, const RowSplit& sp, F&& f) {
  using A = typename Elem<T>::A;
  constexpr int n = Elem<T>::kVec;
  const int tid = threadIdx.x;
  const bool same = (reinterpret_cast<uintptr_t>(z) % 16) == (reinterpret_cast<uintptr_t>(g) % 16);
  for (int64_t i = tid; i < sp.head; i += kBlock) g[i] = Elem<T>::from(f(i, Elem<T>::to(z[i])));
  if (same) {  // (two loops: the test is not repeated per vector)
    for (int64_t j = tid; j < sp.nvec; j += kBlock) {
      const int64_t i0 = sp.head + j * n;
      A x[n];
      load_vec<T>(z + i0, x);
#pragma unroll
      for (int k = 0; k < n; ++k) x[k] = f(i0 + k, x[k]);
      store_vec<T>(g + i0, x);
    }
  } else {
    for (int64_t j = tid; j < sp.nvec; j += kBlock) {
      const int64_t i0 = sp.head + j * n;
      A x[n];
      load_vec<T>(z + i0, x);
#pragma unroll
      for (int k = 0; k < n; ++k) g[i0 + k] = Elem<T>::from(f(i0 + k, x[k]));
    }
  }
  for (int64_t i = sp.tail_start + tid; i < V; i += kBlock) g[i] = Elem<T>::from(f(i, Elem<T>::to(z[i])));
}

template <typename T>
__device__ inline void zero_row(T* g, int64_t V) {
  using A = typename Elem<T>::A;
  const RowSplit sp = split_row(g, V);
  constexpr int n = Elem<T>::kVec;
  A zero[n];
#pragma unroll
  for (int k = 0; k < n; ++k) zero[k] = A(0);
  const int tid = threadIdx.x;
  for (int64_t i = tid; i < sp.head; i += kBlock) g[i] = Elem<T>::from(A(0));
  for (int64_t j = tid; j < sp.nvec; j += kBlock) store_vec<T>(g + sp.head + j * n, zero);
  for (int64_t i = sp.tail_start + tid; i < V; i += kBlock) g[i] = Elem<T>::from(A(0));
}

// ---------------------------------------------------------------------------------------------------------
// Row statistics (cuda_rowmath.cuh): per thread, then merged across the block.
// ---------------------------------------------------------------------------------------------------------
using rowmath::Stat;

// Block-wide merge; every thread gets the result. `smem` holds kWarps entries.
template <typename A>
__device__ inline Stat<A> block_stats(Stat<A> a, A K, Stat<A>* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    Stat<A> b;
    b.m = __shfl_xor_sync(0xffffffffu, a.m, off);
    b.r = __shfl_xor_sync(0xffffffffu, a.r, off);
    b.h = __shfl_xor_sync(0xffffffffu, a.h, off);
    a = rowmath::stat_merge(a, b, K);
  }
  if (lane == 0) smem[warp] = a;
  __syncthreads();
  if (warp == 0) {
    Stat<A> w = lane < kWarps ? smem[lane] : Stat<A>{neg_inf<A>(), A(0), A(0)};
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      Stat<A> b;
      b.m = __shfl_xor_sync(0xffffffffu, w.m, off);
      b.r = __shfl_xor_sync(0xffffffffu, w.r, off);
      b.h = __shfl_xor_sync(0xffffffffu, w.h, off);
      w = rowmath::stat_merge(w, b, K);
    }
    if (lane == 0) smem[0] = w;
  }
  __syncthreads();
  const Stat<A> r = smem[0];
  __syncthreads();  // smem may be reused by the caller
  return r;
}

// The elements of a row as cuda_rowmath's thread_acc reads them.
template <typename T>
struct RowSrc {
  using A = typename Elem<T>::A;
  const T* z;
  __device__ A one(int64_t i) const { return Elem<T>::to(z[i]); }
  __device__ void vec(int64_t i, A* out) const { load_vec<T>(z + i, out); }
};

template <typename T>
__device__ inline const T* logits_row(const RowProblem& p, int64_t r) {
  return static_cast<const T*>(p.logits) + (r / p.T) * p.ls_s + (r % p.T) * p.ls_t;
}
template <typename T>
__device__ inline T* grad_row(const RowProblem& p, int64_t r) {
  return static_cast<T*>(p.grad) + (r / p.T) * p.gs_s + (r % p.T) * p.gs_t;
}

// Row statistics of an unmasked row: one read. Returns them (exact frame of the row max) in every thread.
template <typename T, bool ENT>
__device__ inline Stat<typename Elem<T>::A> row_stats(const T* z, int64_t V, const RowSplit& sp,
                                                     typename Elem<T>::A K, Stat<typename Elem<T>::A>* smem) {
  using A = typename Elem<T>::A;
  const rowmath::Acc<A> acc = rowmath::thread_acc<A, Elem<T>::kVec, ENT>(RowSrc<T>{z}, sp.head, sp.nvec,
                                                                         sp.tail_start, V, threadIdx.x, kBlock, K);
  return block_stats<A>(rowmath::acc_finish(acc, K), K, smem);
}

// K = log2(e) / tau in A (the hot loop's exponent scale).
template <typename A>
__device__ inline A exp2_scale(const RowProblem& p) {
  return static_cast<A>(p.inv_temp * rowmath::kLog2e);
}

// ---------------------------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------------------------
template <typename T, bool ENT>
__global__ void __launch_bounds__(kBlock) fwd_kernel(RowProblem p) {
  using A = typename Elem<T>::A;
  __shared__ Stat<A> smem[kWarps];
  const int64_t rows = p.S * p.T;
  const A it = static_cast<A>(p.inv_temp);
  const A K = exp2_scale<A>(p);
  A* logp = static_cast<A*>(p.logp);
  A* lse = static_cast<A*>(p.lse);
  A* ent = static_cast<A*>(p.ent);
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    if (!p.mask[r]) {
      if (threadIdx.x == 0) logp[r] = lse[r] = ent[r] = A(0);
      continue;
    }
    const T* z = logits_row<T>(p, r);
    const RowSplit sp = split_row(z, p.V);
    const Stat<A> st = row_stats<T, ENT>(z, p.V, sp, K, smem);
    if (threadIdx.x == 0) {
      const int64_t y = p.tokens[r];
      const bool ok = y >= 0 && y < p.V;
      const A zy = ok ? Elem<T>::to(z[y]) : static_cast<A>(NAN);
      const rowmath::RowOut<A> o = rowmath::row_out(st, zy, it);
      lse[r] = ok ? o.lse : static_cast<A>(NAN);
      logp[r] = o.logp;
      ent[r] = ENT ? o.ent : A(0);
    }
  }
}

// Block-wide sum in a fixed tree (xor shuffles, then one value per warp through shared memory); the result in every
// thread. `smem` holds kWarps entries.
template <typename A>
__device__ inline A block_sum(A v, A* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  if (warp == 0) {
    A w = lane < kWarps ? smem[lane] : A(0);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) w += __shfl_xor_sync(0xffffffffu, w, off);
    if (lane == 0) smem[0] = w;
  }
  __syncthreads();
  const A r = smem[0];
  __syncthreads();  // smem may be reused by the caller
  return r;
}

// Where thread_bwd (cuda_rowmath.cuh) writes the gradient: 128-bit vector stores when the gradient row shares the
// logits row's alignment (always when they alias), scalar stores otherwise.
template <typename T>
struct VecDst {
  using A = typename Elem<T>::A;
  T* g;
  __device__ void one(int64_t i, A v) const { g[i] = Elem<T>::from(v); }
  __device__ void vec(int64_t i, const A* x) const { store_vec<T>(g + i, x); }
};
template <typename T>
struct ScalarDst {
  using A = typename Elem<T>::A;
  T* g;
  __device__ void one(int64_t i, A v) const { g[i] = Elem<T>::from(v); }
  __device__ void vec(int64_t i, const A* x) const {
#pragma unroll
    for (int k = 0; k < Elem<T>::kVec; ++k) g[i + k] = Elem<T>::from(x[k]);
  }
};

template <typename T, bool HAS_GH>
__global__ void __launch_bounds__(kBlock) bwd_kernel(RowProblem p) {
  using A = typename Elem<T>::A;
  constexpr int n = Elem<T>::kVec;
  __shared__ A smem[kWarps];
  const int64_t rows = p.S * p.T;
  const A it = static_cast<A>(p.inv_temp);
  const A* gl_ = static_cast<const A*>(p.grad_logp);
  const A* gh_ = static_cast<const A*>(p.grad_ent);
  const A* lse_ = static_cast<const A*>(p.lse_in);
  const A* ent_ = static_cast<const A*>(p.ent_in);
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    T* g = grad_row<T>(p, r);
    if (!p.mask[r]) {
      zero_row<T>(g, p.V);
      continue;
    }
    const T* z = logits_row<T>(p, r);
    const int64_t y = p.tokens[r];
    const bool ok = y >= 0 && y < p.V;
    const A zy = ok ? Elem<T>::to(z[y]) : A(0);  // read by every thread before any write (z may alias g)
    const rowmath::BwdConsts<A> bc = rowmath::bwd_consts<A>(it, lse_[r], ent_[r], gl_[r], HAS_GH ? gh_[r] : A(0));
    __syncthreads();
    const RowSplit sp = split_row(z, p.V);
    const bool same = (reinterpret_cast<uintptr_t>(z) % 16) == (reinterpret_cast<uintptr_t>(g) % 16);
    const A part = same ? rowmath::thread_bwd<A, n, HAS_GH>(RowSrc<T>{z}, VecDst<T>{g}, sp.head, sp.nvec,
                                                            sp.tail_start, p.V, y, threadIdx.x, kBlock, bc)
                        : rowmath::thread_bwd<A, n, HAS_GH>(RowSrc<T>{z}, ScalarDst<T>{g}, sp.head, sp.nvec,
                                                            sp.tail_start, p.V, y, threadIdx.x, kBlock, bc);
    const A rest = block_sum<A>(part, smem);  // (its __syncthreads() order every write of the row before g[y])
    if (threadIdx.x == 0 && ok) g[y] = Elem<T>::from(rowmath::bwd_target(bc, zy, rest, HAS_GH));
    __syncthreads();
  }
}

// HAS_EC: ent_coef given (the entropy term in the gradient; ENT is then true).
template <typename T, bool ENT, bool HAS_EC>
__global__ void __launch_bounds__(kBlock) fwd_grad_kernel(RowProblem p) {
  using A = typename Elem<T>::A;
  static_assert(ENT || !HAS_EC, "the entropy term needs the entropy");
  __shared__ Stat<A> smem[kWarps];
  const int64_t rows = p.S * p.T;
  const A it = static_cast<A>(p.inv_temp);
  const A K = exp2_scale<A>(p);
  A* logp = static_cast<A*>(p.logp);
  A* lse = static_cast<A*>(p.lse);
  A* ent = static_cast<A*>(p.ent);
  const A* coef = static_cast<const A*>(p.coef);
  const A* ecoef = static_cast<const A*>(p.ent_coef);
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    T* g = grad_row<T>(p, r);
    if (!p.mask[r]) {
      if (threadIdx.x == 0) logp[r] = lse[r] = ent[r] = A(0);
      zero_row<T>(g, p.V);
      continue;
    }
    const T* z = logits_row<T>(p, r);
    const int64_t y = p.tokens[r];
    const bool ok = y >= 0 && y < p.V;
    const A zy = ok ? Elem<T>::to(z[y]) : static_cast<A>(NAN);  // before any write (z may alias g)
    const RowSplit sp = split_row(z, p.V);
    const Stat<A> st = row_stats<T, ENT>(z, p.V, sp, K, smem);  // ends with __syncthreads()
    const rowmath::RowOut<A> o = rowmath::row_out(st, zy, it);
    const A cf = coef[r], ec = HAS_EC ? ecoef[r] : A(0);
    const rowmath::GradConsts<A> gc = rowmath::grad_consts(st, o, K, it, cf, ec, HAS_EC);
    map_row<T>(z, g, p.V, sp, [&](int64_t, A x) -> A { return rowmath::grad_elem<A, HAS_EC>(gc, x, K); });
    __syncthreads();
    if (threadIdx.x == 0) {
      lse[r] = ok ? o.lse : static_cast<A>(NAN);
      logp[r] = o.logp;
      ent[r] = ENT ? o.ent : A(0);
      if (ok) g[y] = Elem<T>::from(rowmath::grad_target(st, o, zy, it, cf, ec, HAS_EC));
    }
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------------------------------------
// Host launchers (the caller has checked the arguments; p describes device memory).
// ---------------------------------------------------------------------------------------------------------
inline unsigned grid_for(const RowProblem& p) {
  const int64_t rows = p.S * p.T;
  const int64_t cap = 2147483647;
  return static_cast<unsigned>(rows < cap ? rows : cap);
}

template <typename T>
cudaError_t launch_fwd(const RowProblem& p, cudaStream_t stream) {
  if (p.S * p.T == 0) return cudaSuccess;
  if (p.with_entropy)
    fwd_kernel<T, true><<<grid_for(p), kBlock, 0, stream>>>(p);
  else
    fwd_kernel<T, false><<<grid_for(p), kBlock, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_bwd(const RowProblem& p, cudaStream_t stream) {
  if (p.S * p.T == 0) return cudaSuccess;
  if (p.grad_ent != nullptr)
    bwd_kernel<T, true><<<grid_for(p), kBlock, 0, stream>>>(p);
  else
    bwd_kernel<T, false><<<grid_for(p), kBlock, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_fwd_grad(const RowProblem& p, cudaStream_t stream) {
  if (p.S * p.T == 0) return cudaSuccess;
  if (p.ent_coef != nullptr)
    fwd_grad_kernel<T, true, true><<<grid_for(p), kBlock, 0, stream>>>(p);
  else if (p.with_entropy)
    fwd_grad_kernel<T, true, false><<<grid_for(p), kBlock, 0, stream>>>(p);
  else
    fwd_grad_kernel<T, false, false><<<grid_for(p), kBlock, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace grpo
