// What the C++ loops share: ATen's SIMD types and the activations, argument checks, rnnkit's
// matrix-vector and blocked matmuls, the packed weights (Blocked), and the loops over time every
// cell runs (forward_in_time, backward_in_time). Included by native.cpp (the built-in cells'
// loops, the workspace, the matmul ops) and by pointwise.cpp (a user's compiled cell), the two
// files native.py compiles into one library. Everything here is internal to each file (an
// unnamed namespace) but the workspace, which native.cpp defines once.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <sys/mman.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <cstdlib>
#include <list>
#include <mutex>
#include <optional>
#include <type_traits>
#include <vector>


namespace rnnkit {
// An uninitialised CPU tensor of this shape and dtype in a workspace block (native.cpp).
at::Tensor workspace(at::IntArrayRef size, at::ScalarType dtype);
}  // namespace rnnkit

namespace {


using at::Tensor;
template <typename T>
using Vec = at::vec::Vectorized<T>;

// The activations. float: exp is ATen's fast exp_u20 (the one its softmax uses, within 20 ulp),
// and tanh(x) = sign(x) (1 - e) / (1 + e) with e = exp(-2|x|): one exp instead of Sleef's tanh,
// which costs several times as much and would dominate every step; the absolute error stays
// below about 2e-7 (tests hold the layers to torch.nn at 1e-6). double: Sleef's exp and tanh,
// within 1 ulp, as torch's own kernels.
template <typename T>
inline Vec<T> exp_(const Vec<T>& x) {
  if constexpr (std::is_same_v<T, float>) return x.exp_u20();
  else return x.exp();
}

// exp_u20 clamps its input, which turns a NaN into a number: NaN is put back, so a diverging
// run shows NaN as torch's own kernels would.
template <typename T>
inline Vec<T> keep_nan(const Vec<T>& y, const Vec<T>& x) {
  if constexpr (std::is_same_v<T, float>) return Vec<T>::blendv(y, x, x != x);
  else return y;
}

template <typename T>
inline Vec<T> sigmoid(const Vec<T>& x) {  // 1 / (1 + exp(-x))
  return keep_nan((Vec<T>(T(1)) + exp_(Vec<T>(T(0)) - x)).reciprocal(), x);
}

template <typename T>
inline Vec<T> tanh_(const Vec<T>& x) {
  if constexpr (std::is_same_v<T, float>) {
    const Vec<T> one(T(1)), zero(T(0));
    const Vec<T> e = exp_(Vec<T>(T(-2)) * x.abs());
    const Vec<T> y = (one - e) / (one + e);
    return keep_nan(Vec<T>::blendv(y, zero - y, x < zero), x);
  } else {
    return x.tanh();
  }
}

template <typename T>
inline Vec<T> load(const T* p, int64_t n) {
  return n == Vec<T>::size() ? Vec<T>::loadu(p) : Vec<T>::loadu(p, n);
}

template <typename T>
inline T* ptr(const std::optional<Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

inline std::optional<Tensor> contiguous(const std::optional<Tensor>& t) {  // a bias is read as an array
  return t.has_value() ? std::optional<Tensor>(t->contiguous()) : std::nullopt;
}

// Error messages in this file hold strings only: on one machine (gcc 13, torch 2.11) a TORCH_CHECK
// whose message formatted an integer crashed the process instead of raising; strings raised.
void check(const Tensor& t, const char* name) {
  TORCH_CHECK(t.is_contiguous(), "rnnkit native: ", name, " must be contiguous");
  TORCH_CHECK(t.device().is_cpu(), "rnnkit native: ", name, " must be on the CPU");
}

template <typename... Ts>
void check_all(const char* name, const Ts&... tensors) {
  (check(tensors, name), ...);
}

// Where row (b, t) of a per-step tensor (B, T, W) starts, in elements: batch-major (contiguous) or
// time-major (the transpose of a contiguous (T, B, W), as a layer fed torch.nn's default (T, B, I)
// input makes them), so the loops read and write either without a copy.
struct Rows {
  int64_t sb = 0, st = 0;
  Rows() = default;
  Rows(int64_t sb_, int64_t st_) : sb(sb_), st(st_) {}
  explicit Rows(const Tensor& t) : sb(t.stride(0)), st(t.stride(1)) {}
  int64_t operator()(int64_t b, int64_t t) const { return b * sb + t * st; }
};

// A per-step tensor (B, T, W) on the CPU, batch-major or time-major (Rows).
void check_rows(const Tensor& t, const char* name) {
  TORCH_CHECK(t.is_contiguous() || (t.dim() == 3 && t.transpose(0, 1).is_contiguous()),
              "rnnkit native: ", name, " must be (B, T, .), batch-major or time-major, with dense rows");
  TORCH_CHECK(t.device().is_cpu(), "rnnkit native: ", name, " must be on the CPU");
}

template <typename... Ts>
void check_all_rows(const char* name, const Ts&... tensors) {
  (check_rows(tensors, name), ...);
}

// A forward op's xz (B, T, G*H) and packed recurrent weight (pack_linear(W_hh, G): K = H).
void check_recurrent(const Tensor& xz, const Tensor& packed, int64_t G, int64_t H) {
  TORCH_CHECK(xz.dim() == 3 && xz.size(2) == G * H && packed.dim() == 4 && packed.size(1) == H,
              "rnnkit native: xz, the packed weight and the states disagree on the hidden size");
}

// The output gradient (B, T, H) with any row strides; absent means zero.
struct Gout {
  const void* data = nullptr;
  int64_t sb = 0, st = 0;
  explicit Gout(const std::optional<Tensor>& g) {
    if (!g.has_value()) return;
    TORCH_CHECK(g->size(2) == 1 || g->stride(2) == 1, "rnnkit native: gout's last dimension must be contiguous");
    data = g->data_ptr(), sb = g->stride(0), st = g->stride(1);
  }
  template <typename T>
  const T* row(int64_t b, int64_t t) const {
    return data == nullptr ? nullptr : static_cast<const T*>(data) + b * sb + t * st;
  }
};

// dh_total = dh (+ gout), the gradient reaching h_t
template <typename T>
inline Vec<T> with_gout(const T* dh, const T* go, int64_t j, int64_t n) {
  return go == nullptr ? load(dh + j, n) : load(dh + j, n) + load(go + j, n);
}

// ---------------------------------------------------------------------------------------------

// The lean stepping path's matmuls at batch 1 (core/step.py, through linear_rows and rows_times
// at the end): a matrix times a vector, where a BLAS call's fixed cost is most of the step; the
// two kernels below stream the weight matrix once, in memory order.
//
// matvec: y (N) = init + W (N, K) x (K), W row-major: 4 rows at a time, each a dot product
// accumulated in a register and summed across lanes at the end.
template <typename T>
inline T lane_sum(const Vec<T>& v) {
  T buf[Vec<T>::size()];
  v.store(buf);
  T s = T(0);
  for (int64_t i = 0; i < Vec<T>::size(); ++i) s += buf[i];
  return s;
}

template <typename T>
void matvec(const T* Wm, const T* x, const T* init, T* y, int64_t N, int64_t K) {
  constexpr int64_t L = Vec<T>::size();
  const int64_t blocks = (N + 3) / 4;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 17) / std::max<int64_t>(1, 4 * K));
  at::parallel_for(0, blocks, grain, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t n0 = 4 * q, rows = std::min<int64_t>(4, N - n0);
      const T* r0 = Wm + n0 * K;
      const T* r1 = rows > 1 ? r0 + K : r0;
      const T* r2 = rows > 2 ? r0 + 2 * K : r0;
      const T* r3 = rows > 3 ? r0 + 3 * K : r0;
      Vec<T> a0(T(0)), a1(T(0)), a2(T(0)), a3(T(0));
      for (int64_t k = 0; k < K; k += L) {
        const int64_t n = std::min<int64_t>(L, K - k);
        if (k % 16 == 0) {  // one cache line of each row, 1 KiB ahead: four streams for the prefetcher
          constexpr int64_t ahead = 1024 / sizeof(T);
          __builtin_prefetch(r0 + k + ahead), __builtin_prefetch(r1 + k + ahead);
          __builtin_prefetch(r2 + k + ahead), __builtin_prefetch(r3 + k + ahead);
        }
        const Vec<T> xv = load(x + k, n);
        a0 = at::vec::fmadd(load(r0 + k, n), xv, a0);
        a1 = at::vec::fmadd(load(r1 + k, n), xv, a1);
        a2 = at::vec::fmadd(load(r2 + k, n), xv, a2);
        a3 = at::vec::fmadd(load(r3 + k, n), xv, a3);
      }
      const Vec<T> acc[4] = {a0, a1, a2, a3};
      for (int64_t r = 0; r < rows; ++r) y[n0 + r] = (init ? init[n0 + r] : T(0)) + lane_sum(acc[r]);
    }
  });
}

// vecmat: y (M) = init + x (K) A (K, M), A row-major: 8 vectors of y at a time held in registers
// while the rows stream past (no sums across lanes); split over threads by column blocks. Full
// blocks run with the accumulators unrolled (so they stay in registers); the last, partial block
// lane by lane.
template <typename T>
inline void vecmat_block(const T* x, const T* A, const T* init, T* y, int64_t K, int64_t M) {
  constexpr int64_t L = Vec<T>::size();
  auto start = [&](int64_t v) { return init != nullptr ? Vec<T>::loadu(init + v * L) : Vec<T>(T(0)); };
  Vec<T> a0 = start(0), a1 = start(1), a2 = start(2), a3 = start(3);
  Vec<T> a4 = start(4), a5 = start(5), a6 = start(6), a7 = start(7);
  for (int64_t k = 0; k < K; ++k) {
    const Vec<T> xk(x[k]);
    const T* row = A + k * M;
    a0 = at::vec::fmadd(xk, Vec<T>::loadu(row), a0);
    a1 = at::vec::fmadd(xk, Vec<T>::loadu(row + L), a1);
    a2 = at::vec::fmadd(xk, Vec<T>::loadu(row + 2 * L), a2);
    a3 = at::vec::fmadd(xk, Vec<T>::loadu(row + 3 * L), a3);
    a4 = at::vec::fmadd(xk, Vec<T>::loadu(row + 4 * L), a4);
    a5 = at::vec::fmadd(xk, Vec<T>::loadu(row + 5 * L), a5);
    a6 = at::vec::fmadd(xk, Vec<T>::loadu(row + 6 * L), a6);
    a7 = at::vec::fmadd(xk, Vec<T>::loadu(row + 7 * L), a7);
  }
  a0.store(y), a1.store(y + L), a2.store(y + 2 * L), a3.store(y + 3 * L);
  a4.store(y + 4 * L), a5.store(y + 5 * L), a6.store(y + 6 * L), a7.store(y + 7 * L);
}

template <typename T>
void vecmat(const T* x, const T* A, const T* init, T* y, int64_t K, int64_t M) {
  constexpr int64_t L = Vec<T>::size(), W = 8 * L;
  const int64_t blocks = (M + W - 1) / W;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 17) / std::max<int64_t>(1, K * W));
  at::parallel_for(0, blocks, grain, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t m0 = q * W;
      if (m0 + W <= M) {
        vecmat_block(x, A + m0, init != nullptr ? init + m0 : nullptr, y + m0, K, M);
        continue;
      }
      for (int64_t m = m0; m < M; m += L) {  // the partial block: one vector of y at a time
        const int64_t n = std::min<int64_t>(L, M - m);
        Vec<T> acc = init != nullptr ? load(init + m, n) : Vec<T>(T(0));
        for (int64_t k = 0; k < K; ++k) acc = at::vec::fmadd(Vec<T>(x[k]), load(A + k * M + m, n), acc);
        acc.store(y + m, n);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// The recurrent matmul, rnnkit's own. The weight is packed once per call into blocks of L hidden
// units (L: one SIMD vector), each holding, for every k, its L columns of all G gates side by
// side: P (nq, K, G, L). A block's product for MR rows at a time keeps MR x G vectors in registers
// while k runs (one broadcast of x[r, k] and G loads of P feed MR x G fused multiply-adds). The
// threads split the blocks, so each keeps the same share of the weight in its own cache from step
// to step, and a block's gate math runs right after its product, while the numbers are in L1.
// On the development machine (2 threads, AVX-512) one step's product ran at 95-98% of the large-
// matmul peak at batch 32-64 and hidden 512 (oneDNN's matmul: 83-94%), and 1.3-3.6x faster than
// oneDNN's at hidden 128, where a call's fixed cost dominates.

#if defined(CPU_CAPABILITY_AVX512)
constexpr int kAccumulators = 16;  // vector registers for sums, of 32
#else
constexpr int kAccumulators = 12;  // of 16
#endif

// y[r, g*H + j + l] (=|+=) bias[g*H + j + l] + sum_k x[r, k] P[k, g, l], r < MR, l < n
template <typename T, int G, int MR>
inline void block_rows(const T* P, const T* x, int64_t ldx, int64_t K, T* y, int64_t ldy, int64_t H, int64_t j,
                       int64_t n, const T* bias, bool accumulate) {
  constexpr int64_t L = Vec<T>::size();
  Vec<T> acc[MR][G];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int g = 0; g < G; ++g) acc[r][g] = accumulate ? load(y + r * ldy + g * H + j, n) : Vec<T>(T(0));
  }
  int64_t k0 = 0;
  if constexpr (MR == 1 && G < 4) {
    // one row (batch 1): G sums, each a chain of dependent multiply-adds; KS partial sums per gate
    // over interleaved k keep KS * G of them in flight (measured: the backward's dh += dz W_hh at
    // batch 1, G = 1, was bound by one chain's latency)
    constexpr int KS = G == 1 ? 4 : 2;
    Vec<T> part[KS][G];
#pragma GCC unroll 4
    for (int s = 0; s < KS; ++s) {
#pragma GCC unroll 4
      for (int g = 0; g < G; ++g) part[s][g] = Vec<T>(T(0));
    }
    for (; k0 + KS <= K; k0 += KS) {
#pragma GCC unroll 4
      for (int s = 0; s < KS; ++s) {
        const Vec<T> xs(x[k0 + s]);
#pragma GCC unroll 4
        for (int g = 0; g < G; ++g) part[s][g] = at::vec::fmadd(xs, Vec<T>::loadu(P + ((k0 + s) * G + g) * L), part[s][g]);
      }
    }
#pragma GCC unroll 4
    for (int g = 0; g < G; ++g) {
#pragma GCC unroll 4
      for (int s = 0; s < KS; ++s) acc[0][g] = acc[0][g] + part[s][g];
    }
  }
  for (int64_t k = k0; k < K; ++k) {
    Vec<T> w[G];
#pragma GCC unroll 4
    for (int g = 0; g < G; ++g) w[g] = Vec<T>::loadu(P + (k * G + g) * L);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const Vec<T> xr(x[r * ldx + k]);
#pragma GCC unroll 4
      for (int g = 0; g < G; ++g) acc[r][g] = at::vec::fmadd(xr, w[g], acc[r][g]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int g = 0; g < G; ++g) {
      const Vec<T> v = bias != nullptr ? acc[r][g] + load(bias + g * H + j, n) : acc[r][g];
      v.store(y + r * ldy + g * H + j, n);
    }
  }
}

// block_rows over all B rows: MR at a time, then the rest with fewer
template <typename T, int G, int MR>
void block_all_rows(const T* P, const T* x, int64_t ldx, int64_t B, int64_t K, T* y, int64_t ldy, int64_t H,
                    int64_t j, int64_t n, const T* bias, bool accumulate) {
  int64_t b = 0;
  for (; b + MR <= B; b += MR) block_rows<T, G, MR>(P, x + b * ldx, ldx, K, y + b * ldy, ldy, H, j, n, bias, accumulate);
  if constexpr (MR > 1) {
    if (b < B) {
      block_all_rows<T, G, MR / 2>(P, x + b * ldx, ldx, B - b, K, y + b * ldy, ldy, H, j, n, bias, accumulate);
    }
  }
}

using rnnkit::workspace;  // native.cpp

// A packed weight's buffer: from the workspace from 1 MiB up, like the kernels' large buffers (native.buffer). Packed
// on every call, a fresh buffer of that size was faulted in again each time (at batch 1 and H=512,
// the LSTM's two packings then cost about 0.4 ms of a 2.4 ms inference call, 0.16 ms without).
Tensor packed_buffer(at::IntArrayRef size, const at::TensorOptions& options) {
  const int64_t bytes = c10::multiply_integers(size) * static_cast<int64_t>(options.dtype().itemsize());
  return bytes >= (int64_t(1) << 20) ? workspace(size, options.dtype().toScalarType()) : at::empty(size, options);
}

// The packed weight of x W^T for W (G*H, K): (nq, K, G, L), hidden units past H zero, written
// block by block in parallel. From W's rows (W contiguous): block q, gate g gathers its L rows, k
// by k; from its columns (G = 1 and W the transpose of a row-major matrix, as the backward's
// W_hh^T): each (q, k) is L consecutive numbers of that matrix's row k.
template <typename T>
Tensor pack_blocks(const Tensor& w, int64_t G) {
  constexpr int64_t L = Vec<T>::size();
  const int64_t H = w.size(0) / G, K = w.size(1), nq = (H + L - 1) / L;
  const bool columns = G == 1 && !w.is_contiguous() && w.t().is_contiguous();
  const Tensor src = columns ? w.t() : w.contiguous();
  const T* W = src.data_ptr<T>();
  Tensor packed = packed_buffer({nq, K, G, L}, w.options());
  T* P = packed.data_ptr<T>();
  at::parallel_for(0, nq, 1, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t j = q * L, n = std::min<int64_t>(L, H - j);
      T* Pq = P + q * K * G * L;
      if (columns) {  // W^T = src (K, H) row-major
        for (int64_t k = 0; k < K; ++k) load(W + k * H + j, n).store(Pq + k * L);  // zeros past n
        continue;
      }
      T tile[L][L];  // L rows x L columns of W, read row by row, written column by column
      for (int64_t g = 0; g < G; ++g) {
        const T* rows = W + (g * H + j) * K;
        for (int64_t k0 = 0; k0 < K; k0 += L) {
          const int64_t m = std::min<int64_t>(L, K - k0);
          for (int64_t l = 0; l < L; ++l) {
            if (l < n) load(rows + l * K + k0, m).store(tile[l]);
            else Vec<T>(T(0)).store(tile[l]);
          }
          for (int64_t kk = 0; kk < m; ++kk) {
            T* dst = Pq + ((k0 + kk) * G + g) * L;
            for (int64_t l = 0; l < L; ++l) dst[l] = tile[l][kk];
          }
        }
      }
    }
  });
  return packed;
}

// x (B rows, stride ldx, K) -> y (B rows, stride ldy) for one block q of L hidden units:
// forward, y = x W_hh^T + b_hh (G gates); backward, dh += dz W_hh (G = 1, K = G*H).
template <typename T>
struct Blocked {
  Tensor packed;
  std::optional<Tensor> dense_bias;  // the bias, read as an array (kept alive here)
  int64_t G, H, K, nq;
  const T* P;
  const T* bias;
  static constexpr int64_t L = Vec<T>::size();

  Blocked(const Tensor& w, int64_t G_, const std::optional<Tensor>& b)
      : Blocked(pack_blocks<T>(w, G_), G_, w.size(0) / G_, b) {}

  // from pack_blocks<T>(w, G_) (the op pack_linear), done once by the caller
  Blocked(Tensor packed_, int64_t G_, int64_t H_, const std::optional<Tensor>& b)
      : packed(std::move(packed_)), dense_bias(contiguous(b)), G(G_), H(H_), K(packed.size(1)) {
    TORCH_CHECK(G == 1 || G == 3 || G == 4, "rnnkit native: only 1, 3 or 4 gates");  // checked here, not in
    // operator(), which runs inside the loops' OpenMP team, where an exception cannot be caught
    TORCH_CHECK(packed.dim() == 4 && packed.size(2) == G && packed.size(3) == L && packed.size(0) == (H + L - 1) / L,
                "rnnkit native: a weight not packed by pack_linear for this many gates and outputs");
    TORCH_CHECK(packed.is_contiguous(), "rnnkit native: a packed weight must be contiguous");
    nq = packed.size(0), P = packed.data_ptr<T>(), bias = ptr<T>(dense_bias);
  }

  void operator()(int64_t q, const T* x, int64_t ldx, int64_t B, T* y, int64_t ldy, bool accumulate) const {
    const int64_t j = q * L, n = std::min<int64_t>(L, H - j);
    const T* Pq = P + q * K * G * L;
    switch (G) {
      case 1: return block_all_rows<T, 1, std::min(8, kAccumulators)>(Pq, x, ldx, B, K, y, ldy, H, j, n, bias, accumulate);
      case 3: return block_all_rows<T, 3, kAccumulators / 3>(Pq, x, ldx, B, K, y, ldy, H, j, n, bias, accumulate);
      case 4: return block_all_rows<T, 4, kAccumulators / 4>(Pq, x, ldx, B, K, y, ldy, H, j, n, bias, accumulate);
      default: return;  // G is checked by the constructor
    }
  }

  // blocks per thread chunk: at least about min_macs multiply-adds, below which splitting costs more
  // (32K in the loops' thread team, measured at batch 1, H=128; 128K for a fork and join per call)
  int64_t grain(int64_t B, int64_t min_macs = int64_t(1) << 15) const {
    return std::max<int64_t>(1, min_macs / std::max<int64_t>(1, B * K * G * L));
  }
};

// A recurrent product that is a sum of Blocked products over column ranges of x, for weights that are
// block-diagonal over heads of D units (the sLSTM's): block q of L outputs lies in head q L / D and
// reads only that head's columns, from base[p] + head * D on, part p's K of them. D = 0: one dense
// product per part, from base[p]. The loops over time take it where they take a Blocked.
template <typename T>
struct Heads {
  std::vector<Blocked<T>> parts;
  std::vector<int64_t> base;
  int64_t D = 0, G = 1, H = 0, nq = 0, K = 0;
  Tensor packed;  // the first part's: its options name the dtype
  static constexpr int64_t L = Vec<T>::size();

  Heads(std::vector<Blocked<T>> parts_, std::vector<int64_t> base_, int64_t D_)
      : parts(std::move(parts_)), base(std::move(base_)), D(D_) {
    TORCH_CHECK(!parts.empty() && parts.size() == base.size(), "rnnkit native: Heads: one base per part");
    TORCH_CHECK(D == 0 || D % L == 0, "rnnkit native: Heads: the head size must be a multiple of the SIMD width");
    G = parts[0].G, H = parts[0].H, nq = parts[0].nq, packed = parts[0].packed;
    for (const auto& p : parts) {
      TORCH_CHECK(p.G == G && p.H == H, "rnnkit native: Heads: the parts disagree on their outputs");
      K += p.K;
    }
  }

  void operator()(int64_t q, const T* x, int64_t ldx, int64_t B, T* y, int64_t ldy, bool accumulate) const {
    const int64_t shift = D == 0 ? 0 : (q * L / D) * D;
    for (size_t p = 0; p < parts.size(); ++p) parts[p](q, x + base[p] + shift, ldx, B, y, ldy, accumulate || p > 0);
  }

  int64_t grain(int64_t B, int64_t min_macs = int64_t(1) << 15) const {
    return std::max<int64_t>(1, min_macs / std::max<int64_t>(1, B * K * G * L));
  }
};

// ---------------------------------------------------------------------------------------------
// The loops over time every cell shares, in blocks of L hidden units (columns j .. j+n of each
// gate). Forward, per step t, one parallel pass over the blocks: the block's recurrent product of
// h_{t-1} (hs[now]) into hz, then step(b, t, now, next, row b of hz, j, n) on each row valid at t
// and padded(b, t, now, next, j, n) (state carried, output 0) on the others, where now and next
// are the rows of h_{t-1} and h_t in the states kept (t and t + 1, or in inference t % 2 and
// (t + 1) % 2). Backward, for t = T-1 .. 0: step(b, t, s, j,
// n) on each valid row, which writes the row's d z_t for the block into s (its row of scratch)
// and updates dh there; padded(b, t, j, n) on the others, whose s is zeroed here (no gradient
// into the gates; dh carried); then dh += scratch W_hh. That product of step t and the gate math
// of step t-1 share one parallel pass (a thread owns the same blocks in both), with two scratch
// buffers, so a thread writing step t-1's never meets one still reading step t's.

// body(i, q0, q1) for the passes i = 0 .. passes-1 in order, blocks [0, nq) split over the threads as
// at::parallel_for would (chunks of at least grain), each thread keeping the same blocks in every
// pass. With OpenMP one team of threads lives through all passes, with a barrier between them,
// instead of a fork and a join per pass: at batch 1 and H=128 a pass is a few microseconds, of
// which the fork and join were a large part. Without OpenMP (or inside another parallel region),
// one at::parallel_for per pass. body must not throw: an exception cannot leave an OpenMP region
// (at::parallel_for catches and rethrows; this team does not), so every check runs before.
template <typename Body>
void passes_in_parallel(int64_t passes, int64_t nq, int64_t grain, const Body& body) {
#ifdef _OPENMP
  const int64_t team = std::min<int64_t>(at::get_num_threads(), (nq + grain - 1) / grain);
  if (team > 1 && !at::in_parallel_region()) {
#pragma omp parallel num_threads(team)
    {
      const int64_t n = omp_get_num_threads(), id = omp_get_thread_num();
      const int64_t chunk = (nq + n - 1) / n, q0 = std::min(nq, id * chunk), q1 = std::min(nq, q0 + chunk);
      for (int64_t i = 0; i < passes; ++i) {
        body(i, q0, q1);
#pragma omp barrier
      }
    }
    return;
  }
#endif
  for (int64_t i = 0; i < passes; ++i) at::parallel_for(0, nq, grain, [&](int64_t q0, int64_t q1) { body(i, q0, q1); });
}

// With `inputs` (x (B, T, I) and W_ih packed), each step's block first takes x_t W_ih^T + b_ih
// itself and the recurrent product adds to it (projecting, below); without, the step adds xz_t.
template <typename T_>
struct StepInputs {
  const Blocked<T_>* blocks = nullptr;
  const T_* x = nullptr;
  int64_t I = 0;
  Rows rows = {};  // x's rows; unset (0, 0): batch-major
};

// Zoneout and recurrent dropout inside the forward loop (core/kernels/state_noise.py). Recurrent
// dropout: the product reads h_{t-1} r (r (B, H), scaled) from hd (2, B, H), row t % 2, which the
// caller fills for t = 0 and each step writes for the next. Zoneout: keep (B, T, H) holds 1 where a unit
// keeps its previous state at step t; after a valid step every state field (the S buffers of states,
// (rows, B, H), h first) takes its previous value there, and out (B, T, H) the kept h.
template <typename T_>
struct Noise {
  const T_* r = nullptr;
  T_* hd = nullptr;
  const T_* keep = nullptr;
  T_* states[4] = {nullptr, nullptr, nullptr, nullptr};
  int64_t S = 0;
  T_* out = nullptr;
};

// Noise from the ops' optional tensors (checked against the states' (B, H) and T)
template <typename T_>
Noise<T_> noise_from(const std::optional<Tensor>& r, const std::optional<Tensor>& hd, const std::optional<Tensor>& keep,
                     std::initializer_list<const Tensor*> states, const Tensor& out) {
  Noise<T_> noise;
  const int64_t B = out.size(0), T = out.size(1), H = out.size(2);
  TORCH_CHECK(r.has_value() == hd.has_value(), "rnnkit native: recurrent dropout takes its mask r and the buffer hd");
  if (r.has_value()) {
    check(*r, "the recurrent dropout mask"), check(*hd, "the recurrent dropout buffer");
    TORCH_CHECK(r->sizes() == at::IntArrayRef({B, H}) && hd->sizes() == at::IntArrayRef({2, B, H}) &&
                r->scalar_type() == out.scalar_type() && hd->scalar_type() == out.scalar_type(),
                "rnnkit native: recurrent dropout: r (B, H) and hd (2, B, H), of the states' dtype");
    noise.r = r->data_ptr<T_>(), noise.hd = hd->data_ptr<T_>();
  }
  if (keep.has_value()) {
    check(*keep, "the zoneout mask");
    TORCH_CHECK(keep->sizes() == at::IntArrayRef({B, T, H}) && keep->scalar_type() == out.scalar_type(),
                "rnnkit native: zoneout: keep (B, T, H), of the states' dtype");
    noise.keep = keep->data_ptr<T_>();
  }
  for (const Tensor* s : states) noise.states[noise.S++] = s->data_ptr<T_>();
  TORCH_CHECK(noise.r == nullptr && noise.keep == nullptr || out.is_contiguous(),
              "rnnkit native: zoneout and recurrent dropout run on batch-major buffers");
  noise.out = out.data_ptr<T_>();
  return noise;
}

// Zoneout in a backward step (row b, block j .. j+n of step t): where the unit kept its previous state,
// the gradients reaching its state at step t pass to step t-1 unchanged (prev) and none reaches the
// cell's new values (fresh). Selects rather than products: exact, and a kept unit's recomputed gates
// (which the forward discarded) cannot leak a NaN.
template <typename T_>
struct Zone {
  bool on;
  Vec<T_> kept;
  Zone(const T_* keep, int64_t offset, int64_t n)
      : on(keep != nullptr), kept(on ? Vec<T_>(load(keep + offset, n) != Vec<T_>(T_(0))) : Vec<T_>(T_(0))) {}
  Vec<T_> fresh(const Vec<T_>& g) const { return on ? Vec<T_>::blendv(g, Vec<T_>(T_(0)), kept) : g; }
  Vec<T_> prev(const Vec<T_>& from_cell, const Vec<T_>& g) const {
    return on ? Vec<T_>::blendv(from_cell, g, kept) : from_cell;
  }
};

// A backward op's recurrent dropout mask r (B, H) and zoneout mask keep (B, T, H), checked; r's data
template <typename T_>
const T_* backward_noise(const std::optional<Tensor>& r, const std::optional<Tensor>& keep, int64_t B, int64_t T,
                         int64_t H) {
  const auto dtype = c10::CppTypeToScalarType<T_>::value;
  if (r.has_value()) {
    check(*r, "the recurrent dropout mask");
    TORCH_CHECK(r->sizes() == at::IntArrayRef({B, H}) && r->scalar_type() == dtype,
                "rnnkit native: recurrent dropout: r (B, H), of the gradients' dtype");
  }
  if (keep.has_value()) {
    check(*keep, "the zoneout mask");
    TORCH_CHECK(keep->sizes() == at::IntArrayRef({B, T, H}) && keep->scalar_type() == dtype,
                "rnnkit native: zoneout: keep (B, T, H), of the gradients' dtype");
  }
  return ptr<T_>(r);
}

template <typename T_, typename Rec, typename Step, typename Padded>
void forward_in_time(int64_t T, int64_t S, int64_t B, const bool* m, const Rec& rec, const T_* hsp,
                     const Step& step, const Padded& padded, const StepInputs<T_>& inputs = {},
                     const Noise<T_>& noise = {}) {
  const int64_t H = rec.H, width = rec.G * H;
  const Tensor hz_buffer = at::empty({B, width}, rec.packed.options());  // torch's allocator: cache-line aligned
  T_* hz = hz_buffer.data_ptr<T_>();
  const Vec<T_> zero(T_(0));
  const Rows xr = inputs.rows.sb != 0 || inputs.rows.st != 0 ? inputs.rows : Rows(T * inputs.I, inputs.I);
  passes_in_parallel(T, rec.nq, rec.grain(B), [&](int64_t t, int64_t q0, int64_t q1) {
    const int64_t now = t % S, next = (t + 1) % S;  // S: the states kept, T + 1 or (inference) 2
    const T_* h = noise.r != nullptr ? noise.hd + (t % 2) * B * H : hsp + now * B * H;
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t j = q * rec.L, n = std::min<int64_t>(rec.L, H - j);
      if (inputs.blocks != nullptr) (*inputs.blocks)(q, inputs.x + xr(0, t), xr.sb, B, hz, width, false);
      rec(q, h, H, B, hz, width, inputs.blocks != nullptr);
      for (int64_t b = 0; b < B; ++b) {
        if (m != nullptr && !m[b * T + t]) {
          padded(b, t, now, next, j, n);
        } else {
          step(b, t, now, next, hz + b * width, j, n);
          if (noise.keep != nullptr) {  // zoneout: the kept units take their previous state back
            const Vec<T_> kept = load(noise.keep + (b * T + t) * H + j, n) != zero;
            for (int64_t k = 0; k < noise.S; ++k) {
              T_* sp = noise.states[k] + b * H + j;
              Vec<T_>::blendv(load(sp + next * B * H, n), load(sp + now * B * H, n), kept).store(sp + next * B * H, n);
            }
            load(hsp + (next * B + b) * H + j, n).store(noise.out + (b * T + t) * H + j, n);
          }
        }
        if (noise.r != nullptr) {  // h_t r, the next step's product's input
          const int64_t row = b * H + j;
          (load(hsp + next * B * H + row, n) * load(noise.r + row, n)).store(noise.hd + ((t + 1) % 2) * B * H + row, n);
        }
      }
    }
  });
}

template <typename T_, typename Back, typename Step, typename Padded>
void backward_in_time(int64_t T, int64_t B, int64_t G, const bool* m, const Back& back, T_* dh,
                      const Step& step, const Padded& padded, const T_* r = nullptr) {
  const int64_t H = back.H, width = G * H;
  const Tensor scratch_buffer = at::empty({2, B, width}, back.packed.options());
  T_* scratch = scratch_buffer.data_ptr<T_>();
  auto gates = [&](int64_t t, int64_t j, int64_t n) {  // step t's gate math for one block
    T_* st = scratch + (t % 2) * B * width;
    for (int64_t b = 0; b < B; ++b) {
      T_* s = st + b * width;
      if (m != nullptr && !m[b * T + t]) {
        for (int64_t g = 0; g < G; ++g) Vec<T_>(T_(0)).store(s + g * H + j, n);
        padded(b, t, j, n);
      } else {
        step(b, t, s, j, n);
      }
    }
  };
  // recurrent dropout (r (B, H), see Noise): dh += (d z W_hh) r, the product into rd first
  const Tensor rd_buffer = r != nullptr ? at::empty({B, H}, back.packed.options()) : Tensor();
  T_* rd = r != nullptr ? rd_buffer.data_ptr<T_>() : nullptr;
  auto product = [&](int64_t t, int64_t q) {  // dh += step t's d z W_hh, one block
    if (r == nullptr) return back(q, scratch + (t % 2) * B * width, width, B, dh, H, true);
    back(q, scratch + (t % 2) * B * width, width, B, rd, H, false);
    const int64_t j = q * back.L, n = std::min<int64_t>(back.L, H - j);
    for (int64_t b = 0; b < B; ++b) {
      const int64_t row = b * H + j;
      (load(dh + row, n) + load(rd + row, n) * load(r + row, n)).store(dh + row, n);
    }
  };
  // pass i, t = T - i: the product of step t (t < T), the gates of step t-1 (t > 0)
  passes_in_parallel(T + 1, back.nq, back.grain(B), [&](int64_t i, int64_t q0, int64_t q1) {
    const int64_t t = T - i;
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t j = q * back.L, n = std::min<int64_t>(back.L, H - j);
      if (t < T) product(t, q);
      if (t > 0) gates(t - 1, j, n);
    }
  });
}


}  // namespace
