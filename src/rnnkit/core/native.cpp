// The fused kernels of core/fused.py for LSTM, GRU and RNN on the CPU, in C++.
//
// One op runs one direction of one layer over all time steps, forward or backward. Per step, one
// parallel pass over blocks of hidden units: each block's share of the recurrent matmul (rnnkit's
// own, below) and then its gate math, vectorized with ATen's own SIMD types. The backward op
// computes every gate derivative from the saved activations, so nothing is prepared in Python;
// the weight gradients are then one matmul over all steps (fused.py). What a Python loop pays per
// step in interpreter and dispatch overhead (tens of microseconds) becomes about one microsecond.
// native.py compiles this file on first use, with OpenMP (torch's own thread pool); fused.py's
// _Native* kernels call it.
//
// Layouts, shared with fused.py:
//   - per-step tensors are batch-major as the layer sees them: xz, gates, out, dxz (B, T, .);
//     the states h_0..h_T (and c) are time-major (T+1, B, H), so h_{t-1} is a (B, H) matrix;
//     in inference the forward ops may keep only two, (2, B, H), h_t in row t % 2;
//   - gates are in torch's order (LSTM i, f, g, o; GRU r, z, n), activated;
//   - `mask` is (B, T) bool: at a step where it is false a sequence keeps its state, its output
//     is 0, and in backward the output's gradient there is ignored;
//   - backward: `dh`, `dc` come in holding the final state's gradient and leave holding the
//     initial state's; `gout` is the output gradient (B, T, H) with a contiguous last dimension.
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

Tensor workspace(at::IntArrayRef size, at::ScalarType dtype);  // below

// A packed weight's buffer: from the workspace from 1 MiB up, like fused.py's large buffers. Packed
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
};

template <typename T_, typename Step, typename Padded>
void forward_in_time(int64_t T, int64_t S, int64_t B, const bool* m, const Blocked<T_>& rec, const T_* hsp,
                     const Step& step, const Padded& padded, const StepInputs<T_>& inputs = {}) {
  const int64_t H = rec.H, width = rec.G * H;
  const Tensor hz_buffer = at::empty({B, width}, rec.packed.options());  // torch's allocator: cache-line aligned
  T_* hz = hz_buffer.data_ptr<T_>();
  passes_in_parallel(T, rec.nq, rec.grain(B), [&](int64_t t, int64_t q0, int64_t q1) {
    const int64_t now = t % S, next = (t + 1) % S;  // S: the states kept, T + 1 or (inference) 2
    const T_* h = hsp + now * B * H;
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t j = q * rec.L, n = std::min<int64_t>(rec.L, H - j);
      if (inputs.blocks != nullptr) (*inputs.blocks)(q, inputs.x + t * inputs.I, T * inputs.I, B, hz, width, false);
      rec(q, h, H, B, hz, width, inputs.blocks != nullptr);
      for (int64_t b = 0; b < B; ++b) {
        if (m != nullptr && !m[b * T + t]) padded(b, t, now, next, j, n);
        else step(b, t, now, next, hz + b * width, j, n);
      }
    }
  });
}

template <typename T_, typename Step, typename Padded>
void backward_in_time(int64_t T, int64_t B, int64_t G, const bool* m, const Blocked<T_>& back, T_* dh,
                      const Step& step, const Padded& padded) {
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
  auto product = [&](int64_t t, int64_t q) {  // dh += step t's d z W_hh, one block
    back(q, scratch + (t % 2) * B * width, width, B, dh, H, true);
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

// ---------------------------------------------------------------------------------------------
// LSTM: i, f, o = sigmoid, g = tanh of xz_t + h_{t-1} W_hh^T + b_hh; c_t = f c_{t-1} + i g;
// h_t = o tanh(c_t). gates (training only): the activated i, f, g, o, kept for backward.

// forward_in_time's padded step for the state h (B rows of H, rows now and next of hsp): row b keeps
// its h_{t-1}, and its output at step t is 0. The LSTM carries c the same way.
template <typename T_>
auto carry_h(T_* hsp, T_* outp, int64_t B, int64_t T, int64_t H) {
  return [=](int64_t b, int64_t t, int64_t now, int64_t next, int64_t j, int64_t n) {
    load(hsp + (now * B + b) * H + j, n).store(hsp + (next * B + b) * H + j, n);
    Vec<T_>(T_(0)).store(outp + (b * T + t) * H + j, n);
  };
}

// One LSTM step for row b, block j .. j+n: r holds the block's pre-activations from h (and, projecting,
// from x too: then x is null); gates, if kept, get the activated i, f, g, o.
template <typename T_>
__attribute__((always_inline)) inline void lstm_cell(const T_* x, const T_* r, const T_* c_prev, T_* c_next,
                                                     T_* h_next, T_* h_out, T_* gates, int64_t H, int64_t j, int64_t n) {
  auto z = [&](int64_t g) { return x != nullptr ? load(x + g * H + j, n) + load(r + g * H + j, n) : load(r + g * H + j, n); };
  Vec<T_> i = sigmoid(z(0)), f = sigmoid(z(1)), gg = tanh_(z(2)), og = sigmoid(z(3));
  if (gates != nullptr) i.store(gates + j, n), f.store(gates + H + j, n), gg.store(gates + 2 * H + j, n), og.store(gates + 3 * H + j, n);
  Vec<T_> c = f * load(c_prev + j, n) + i * gg;
  c.store(c_next + j, n);
  Vec<T_> h = og * tanh_(c);
  h.store(h_next + j, n);
  h.store(h_out + j, n);
}

// The LSTM over all steps: xz (B, T, 4H) projected beforehand, or (projecting) x (B, T, I) with W_ih.
template <typename T_>
void lstm_loop(const Tensor& xz, const Tensor& packed, const std::optional<Tensor>& bias, const Tensor& hs,
               const Tensor& cs, const Tensor& out, const std::optional<Tensor>& gates, const std::optional<Tensor>& mask,
               const StepInputs<T_>& inputs) {
  const int64_t B = xz.size(0), T = xz.size(1), H = hs.size(2), S = hs.size(0);
  const Blocked<T_> rec(packed, 4, H, bias);
  const T_* xp = inputs.blocks != nullptr ? nullptr : xz.data_ptr<T_>();
  T_* hsp = hs.data_ptr<T_>();
  T_* csp = cs.data_ptr<T_>();
  T_* outp = out.data_ptr<T_>();
  T_* gp = ptr<T_>(gates);
  auto step = [&](int64_t b, int64_t t, int64_t now, int64_t next, const T_* r, int64_t j, int64_t n) {
    const int64_t bt = b * T + t;
    lstm_cell<T_>(xp != nullptr ? xp + bt * 4 * H : nullptr, r, csp + (now * B + b) * H, csp + (next * B + b) * H,
                  hsp + (next * B + b) * H, outp + bt * H, gp != nullptr ? gp + bt * 4 * H : nullptr, H, j, n);
  };
  const auto carry = carry_h<T_>(hsp, outp, B, T, H);
  auto padded = [&](int64_t b, int64_t t, int64_t now, int64_t next, int64_t j, int64_t n) {
    carry(b, t, now, next, j, n);
    load(csp + (now * B + b) * H + j, n).store(csp + (next * B + b) * H + j, n);
  };
  forward_in_time<T_>(T, S, B, ptr<bool>(mask), rec, hsp, step, padded, inputs);
}

void lstm_forward(const Tensor& xz, const Tensor& packed, const std::optional<Tensor>& bias, const Tensor& hs,
                  const Tensor& cs, const Tensor& out, const std::optional<Tensor>& gates,
                  const std::optional<Tensor>& mask) {
  check_all("an LSTM buffer", xz, hs, cs, out);
  if (gates.has_value()) check(*gates, "gates");
  const int64_t T = xz.size(1), H = hs.size(2), S = hs.size(0);
  TORCH_CHECK(S == T + 1 || (S == 2 && !gates.has_value()), "rnnkit native: lstm_forward keeps T + 1 states (or 2, in inference)");
  check_recurrent(xz, packed, 4, H);
  AT_DISPATCH_FLOATING_TYPES(xz.scalar_type(), "rnnkit_lstm_forward", [&] {
    lstm_loop<scalar_t>(xz, packed, bias, hs, cs, out, gates, mask, {});
  });
}

// Inference with the input projection inside the loop: x (B, T, I) and packed_ih = pack_linear(W_ih, 4).
// Each step's block stores x_t W_ih^T + b_ih into its columns of hz and the recurrent product adds
// h_{t-1} W_hh^T + b_hh to them, so no (B, T, 4H) projection is written and read back (measured
// against projecting first, then the loop: 1.03-1.27x at batch 1-64, H 128 and 512).
void lstm_forward_projecting(const Tensor& x, const Tensor& packed_ih, const std::optional<Tensor>& bias_ih,
                             const Tensor& packed, const std::optional<Tensor>& bias, const Tensor& hs, const Tensor& cs,
                             const Tensor& out, const std::optional<Tensor>& mask) {
  check_all("an LSTM buffer", x, hs, cs, out);
  TORCH_CHECK(x.dim() == 3 && hs.dim() == 3 && hs.size(0) == 2 && cs.sizes() == hs.sizes(),
              "rnnkit native: lstm_forward_projecting is inference: x (B, T, I), hs and cs (2, B, H)");
  const int64_t B = x.size(0), T = x.size(1), I = x.size(2), H = hs.size(2);
  TORCH_CHECK(hs.size(1) == B && out.dim() == 3 && out.size(0) == B && out.size(1) == T && out.size(2) == H,
              "rnnkit native: lstm_forward_projecting: x, the states and out disagree on B, T or H");
  TORCH_CHECK(packed_ih.dim() == 4 && packed_ih.size(1) == I && packed.dim() == 4 && packed.size(1) == H,
              "rnnkit native: x, the packed weights and the states disagree on the sizes");
  for (const auto* b : {&bias_ih, &bias}) {
    TORCH_CHECK(!b->has_value() || ((*b)->numel() == 4 * H && (*b)->scalar_type() == x.scalar_type() && (*b)->device().is_cpu()),
                "rnnkit native: lstm_forward_projecting: a bias of 4H numbers, of x's dtype, on the CPU");
  }
  TORCH_CHECK(!mask.has_value() || (mask->scalar_type() == at::kBool && mask->sizes() == at::IntArrayRef({B, T})),
              "rnnkit native: lstm_forward_projecting: mask (B, T) bool");
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rnnkit_lstm_forward_projecting", [&] {
    using T_ = scalar_t;
    const Blocked<T_> inputs(packed_ih, 4, H, bias_ih);
    lstm_loop<T_>(x, packed, bias, hs, cs, out, std::nullopt, mask, {&inputs, x.data_ptr<T_>(), I});
  });
}

// dxz: (B, T, 4H) out, the gradient of xz (and of the recurrent pre-activation).
void lstm_backward(const Tensor& gates, const Tensor& cs, const std::optional<Tensor>& gout, const Tensor& w_hh,
                   const Tensor& dh, const Tensor& dc, const Tensor& dxz, const std::optional<Tensor>& mask) {
  check_all("an LSTM gradient buffer", gates, cs, dh, dc, dxz);
  const int64_t B = gates.size(0), T = gates.size(1), H = dh.size(1);
  const Gout go(gout);
  AT_DISPATCH_FLOATING_TYPES(gates.scalar_type(), "rnnkit_lstm_backward", [&] {
    using T_ = scalar_t;
    const Blocked<T_> back(w_hh.t(), 1, std::nullopt);
    const T_* gp = gates.data_ptr<T_>();
    const T_* csp = cs.data_ptr<T_>();
    T_* dhp = dh.data_ptr<T_>();
    T_* dcp = dc.data_ptr<T_>();
    T_* dxp = dxz.data_ptr<T_>();
    const Vec<T_> one(T_(1));
    auto step = [&](int64_t b, int64_t t, T_* s, int64_t j, int64_t n) {
      const int64_t bt = b * T + t;
      T_* d = dxp + bt * 4 * H;
      const T_* g = gp + bt * 4 * H;
      T_* hh = dhp + b * H;
      T_* cc = dcp + b * H;
      Vec<T_> i = load(g + j, n), f = load(g + H + j, n), gg = load(g + 2 * H + j, n), o = load(g + 3 * H + j, n);
      Vec<T_> dht = with_gout(hh, go.row<T_>(b, t), j, n);
      Vec<T_> tc = tanh_(load(csp + ((t + 1) * B + b) * H + j, n));
      Vec<T_> dct = load(cc + j, n) + dht * o * (one - tc * tc);
      Vec<T_> di = dct * gg * i * (one - i);
      Vec<T_> df = dct * load(csp + (t * B + b) * H + j, n) * f * (one - f);
      Vec<T_> dg = dct * i * (one - gg * gg);
      Vec<T_> dout = dht * tc * o * (one - o);
      di.store(d + j, n), df.store(d + H + j, n), dg.store(d + 2 * H + j, n), dout.store(d + 3 * H + j, n);
      di.store(s + j, n), df.store(s + H + j, n), dg.store(s + 2 * H + j, n), dout.store(s + 3 * H + j, n);
      (dct * f).store(cc + j, n);
      Vec<T_>(T_(0)).store(hh + j, n);  // h_t was computed, not carried: its gradient goes through the gates
    };
    auto padded = [&](int64_t b, int64_t t, int64_t j, int64_t n) {
      T_* d = dxp + (b * T + t) * 4 * H;
      for (int64_t g = 0; g < 4; ++g) Vec<T_>(T_(0)).store(d + g * H + j, n);
    };
    backward_in_time<T_>(T, B, 4, ptr<bool>(mask), back, dhp, step, padded);
  });
}

// ---------------------------------------------------------------------------------------------
// GRU in torch's convention: r, z = sigmoid(xz + h W_hh^T + b_hh), n = tanh(x_n + r * (h W_hn^T
// + b_hn)), h_t = n + z (h_{t-1} - n). Training: gates keeps r, z, n and hzn keeps h W_hn^T + b_hn.

void gru_forward(const Tensor& xz, const Tensor& packed, const std::optional<Tensor>& bias, const Tensor& hs,
                 const Tensor& out, const std::optional<Tensor>& gates, const std::optional<Tensor>& hzn,
                 const std::optional<Tensor>& mask) {
  check_all("a GRU buffer", xz, hs, out);
  const int64_t B = xz.size(0), T = xz.size(1), H = hs.size(2), S = hs.size(0);
  TORCH_CHECK(S == T + 1 || (S == 2 && !gates.has_value()), "rnnkit native: gru_forward keeps T + 1 states (or 2, in inference)");
  check_recurrent(xz, packed, 3, H);
  AT_DISPATCH_FLOATING_TYPES(xz.scalar_type(), "rnnkit_gru_forward", [&] {
    using T_ = scalar_t;
    const Blocked<T_> rec(packed, 3, H, bias);
    const T_* xp = xz.data_ptr<T_>();
    T_* hsp = hs.data_ptr<T_>();
    T_* outp = out.data_ptr<T_>();
    T_* gp = ptr<T_>(gates);
    T_* kp = ptr<T_>(hzn);
    auto step = [&](int64_t b, int64_t t, int64_t now, int64_t next, const T_* hz, int64_t j, int64_t n) {
      const int64_t bt = b * T + t;
      const T_* x = xp + bt * 3 * H;
      Vec<T_> r = sigmoid(load(x + j, n) + load(hz + j, n));
      Vec<T_> z = sigmoid(load(x + H + j, n) + load(hz + H + j, n));
      Vec<T_> hzn_v = load(hz + 2 * H + j, n);
      Vec<T_> nn = tanh_(load(x + 2 * H + j, n) + r * hzn_v);
      if (gp != nullptr) {
        T_* g = gp + bt * 3 * H;
        r.store(g + j, n), z.store(g + H + j, n), nn.store(g + 2 * H + j, n), hzn_v.store(kp + bt * H + j, n);
      }
      Vec<T_> h = nn + z * (load(hsp + (now * B + b) * H + j, n) - nn);
      h.store(hsp + (next * B + b) * H + j, n);
      h.store(outp + bt * H + j, n);
    };
    forward_in_time<T_>(T, S, B, ptr<bool>(mask), rec, hsp, step, carry_h<T_>(hsp, outp, B, T, H));
  });
}

// dxz: (B, T, 3H) out, the gradient of xz; dhn: (B, T, H) out, the n part of the gradient of
// h W_hh^T + b_hh (its r and z parts are dxz's).
void gru_backward(const Tensor& gates, const Tensor& hzn, const Tensor& hs, const std::optional<Tensor>& gout,
                  const Tensor& w_hh, const Tensor& dh, const Tensor& dxz, const Tensor& dhn,
                  const std::optional<Tensor>& mask) {
  check_all("a GRU gradient buffer", gates, hzn, hs, dh, dxz, dhn);
  const int64_t B = gates.size(0), T = gates.size(1), H = dh.size(1);
  const Gout go(gout);
  AT_DISPATCH_FLOATING_TYPES(gates.scalar_type(), "rnnkit_gru_backward", [&] {
    using T_ = scalar_t;
    const Blocked<T_> back(w_hh.t(), 1, std::nullopt);
    const T_* gp = gates.data_ptr<T_>();
    const T_* kp = hzn.data_ptr<T_>();
    const T_* hsp = hs.data_ptr<T_>();
    T_* dhp = dh.data_ptr<T_>();
    T_* dxp = dxz.data_ptr<T_>();
    T_* dnp = dhn.data_ptr<T_>();
    const Vec<T_> one(T_(1));
    auto step = [&](int64_t b, int64_t t, T_* s, int64_t j, int64_t n) {
      const int64_t bt = b * T + t;
      T_* dx = dxp + bt * 3 * H;
      const T_* g = gp + bt * 3 * H;
      T_* hh = dhp + b * H;
      Vec<T_> r = load(g + j, n), z = load(g + H + j, n), nn = load(g + 2 * H + j, n);
      Vec<T_> dht = with_gout(hh, go.row<T_>(b, t), j, n);
      Vec<T_> dn = dht * (one - z) * (one - nn * nn);
      Vec<T_> dr = dn * load(kp + bt * H + j, n) * r * (one - r);
      Vec<T_> dzz = dht * (load(hsp + (t * B + b) * H + j, n) - nn) * z * (one - z);
      Vec<T_> dnr = dn * r;
      dr.store(dx + j, n), dzz.store(dx + H + j, n), dn.store(dx + 2 * H + j, n);
      dnr.store(dnp + bt * H + j, n);
      dr.store(s + j, n), dzz.store(s + H + j, n), dnr.store(s + 2 * H + j, n);
      (dht * z).store(hh + j, n);
    };
    auto padded = [&](int64_t b, int64_t t, int64_t j, int64_t n) {
      const int64_t bt = b * T + t;
      for (int64_t g = 0; g < 3; ++g) Vec<T_>(T_(0)).store(dxp + bt * 3 * H + g * H + j, n);
      Vec<T_>(T_(0)).store(dnp + bt * H + j, n);
    };
    backward_in_time<T_>(T, B, 3, ptr<bool>(mask), back, dhp, step, padded);
  });
}

// ---------------------------------------------------------------------------------------------
// Elman RNN: h_t = act(xz_t + h_{t-1} W_hh^T + b_hh), act tanh or relu.

template <typename T_>
inline Vec<T_> activate(const Vec<T_>& v, bool relu) {
  return relu ? at::vec::maximum(v, Vec<T_>(T_(0))) : tanh_(v);
}

void rnn_forward(const Tensor& xz, const Tensor& packed, const std::optional<Tensor>& bias, const Tensor& hs,
                 const Tensor& out, const std::optional<Tensor>& mask, bool relu) {
  check_all("an RNN buffer", xz, hs, out);
  const int64_t B = xz.size(0), T = xz.size(1), H = hs.size(2), S = hs.size(0);
  TORCH_CHECK(S == T + 1 || S == 2, "rnnkit native: rnn_forward keeps T + 1 states (or 2, in inference)");
  check_recurrent(xz, packed, 1, H);
  AT_DISPATCH_FLOATING_TYPES(xz.scalar_type(), "rnnkit_rnn_forward", [&] {
    using T_ = scalar_t;
    const Blocked<T_> rec(packed, 1, H, bias);
    const T_* xp = xz.data_ptr<T_>();
    T_* hsp = hs.data_ptr<T_>();
    T_* outp = out.data_ptr<T_>();
    auto step = [&](int64_t b, int64_t t, int64_t /*now*/, int64_t next, const T_* r, int64_t j, int64_t n) {
      const int64_t bt = b * T + t;
      Vec<T_> h = activate(load(xp + bt * H + j, n) + load(r + j, n), relu);
      h.store(hsp + (next * B + b) * H + j, n);
      h.store(outp + bt * H + j, n);
    };
    forward_in_time<T_>(T, S, B, ptr<bool>(mask), rec, hsp, step, carry_h<T_>(hsp, outp, B, T, H));
  });
}

// dxz: (B, T, H) out, the gradient of the pre-activation.
void rnn_backward(const Tensor& hs, const std::optional<Tensor>& gout, const Tensor& w_hh, const Tensor& dh,
                  const Tensor& dxz, const std::optional<Tensor>& mask, bool relu) {
  check_all("an RNN gradient buffer", hs, dh, dxz);
  const int64_t B = dxz.size(0), T = dxz.size(1), H = dh.size(1);
  const Gout go(gout);
  AT_DISPATCH_FLOATING_TYPES(hs.scalar_type(), "rnnkit_rnn_backward", [&] {
    using T_ = scalar_t;
    const Blocked<T_> back(w_hh.t(), 1, std::nullopt);
    const T_* hsp = hs.data_ptr<T_>();
    T_* dhp = dh.data_ptr<T_>();
    T_* dxp = dxz.data_ptr<T_>();
    const Vec<T_> one(T_(1)), zero(T_(0));
    auto step = [&](int64_t b, int64_t t, T_* s, int64_t j, int64_t n) {
      const int64_t bt = b * T + t;
      T_* hh = dhp + b * H;
      Vec<T_> hv = load(hsp + ((t + 1) * B + b) * H + j, n);
      Vec<T_> slope = relu ? Vec<T_>::blendv(zero, one, hv > zero) : one - hv * hv;
      Vec<T_> d = with_gout(hh, go.row<T_>(b, t), j, n) * slope;
      d.store(dxp + bt * H + j, n), d.store(s + j, n);
      zero.store(hh + j, n);
    };
    auto padded = [&](int64_t b, int64_t t, int64_t j, int64_t n) {
      Vec<T_>(T_(0)).store(dxp + (b * T + t) * H + j, n);
    };
    backward_in_time<T_>(T, B, 1, ptr<bool>(mask), back, dhp, step, padded);
  });
}

// ---------------------------------------------------------------------------------------------
// Workspace: the fused kernels' large buffers (states, gates, outputs, gradients, the input
// projection), kept for reuse when freed instead of going back to the operating system. torch's
// CPU allocator hands large blocks to malloc, which maps them fresh on each call and unmaps them on
// free, so every training step paid again for the kernel to fault in and zero each page (measured:
// about a fifth of a GRU training step at B=64, H=512, T=256). Blocks are whole multiples of 2 MiB,
// aligned to it, with transparent huge pages asked for. A freed block waits for the next request
// of the same rounded size (training repeats the same shapes), newest first; beyond kMaxCached
// bytes waiting, the oldest waiting blocks are freed. release_workspace() frees every waiting block.

class Workspace {
 public:
  static constexpr size_t kAlign = size_t(2) << 20;
  static constexpr size_t kMaxCached = size_t(2) << 30;

  static Workspace& get() {
    static Workspace* pool = new Workspace();  // never destroyed: buffers may be freed during exit
    return *pool;
  }

  void* take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (auto it = waiting_.rbegin(); it != waiting_.rend(); ++it) {  // newest first
        if (it->first == bytes) {
          void* block = it->second;
          waiting_.erase(std::next(it).base());
          cached_ -= bytes;
          return block;
        }
      }
    }
    void* block = std::aligned_alloc(kAlign, bytes);
    TORCH_CHECK(block != nullptr, "rnnkit native: out of memory for a workspace buffer");
#ifdef MADV_HUGEPAGE
    madvise(block, bytes, MADV_HUGEPAGE);  // advice only: fewer page faults where the kernel allows
#endif
    return block;
  }

  void give(void* block, size_t bytes) {
    std::vector<void*> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (bytes > kMaxCached) {
        evicted.push_back(block);
      } else {
        while (cached_ + bytes > kMaxCached) {  // the oldest waiting blocks make room
          evicted.push_back(waiting_.front().second);
          cached_ -= waiting_.front().first;
          waiting_.pop_front();
        }
        waiting_.emplace_back(bytes, block);
        cached_ += bytes;
      }
    }
    for (void* b : evicted) std::free(b);
  }

  int64_t release() {
    std::lock_guard<std::mutex> lock(mutex_);
    const int64_t freed = static_cast<int64_t>(cached_);
    for (auto& [bytes, block] : waiting_) std::free(block);
    waiting_.clear();
    cached_ = 0;
    return freed;
  }

 private:
  std::mutex mutex_;
  std::list<std::pair<size_t, void*>> waiting_;  // oldest first
  size_t cached_ = 0;
};

// An uninitialised CPU tensor of this shape and dtype in a workspace block.
Tensor workspace(at::IntArrayRef size, at::ScalarType dtype) {
  int64_t numel = 1;
  for (int64_t d : size) {
    TORCH_CHECK(d >= 0, "rnnkit native: workspace sizes must be non-negative");
    numel *= d;
  }
  const size_t used = std::max<size_t>(1, static_cast<size_t>(numel) * c10::elementSize(dtype));
  const size_t bytes = (used + Workspace::kAlign - 1) / Workspace::kAlign * Workspace::kAlign;
  void* block = Workspace::get().take(bytes);
  return at::from_blob(block, size, [bytes](void* p) { Workspace::get().give(p, bytes); },
                       at::TensorOptions().dtype(dtype).device(at::kCPU));
}

int64_t release_workspace() { return Workspace::get().release(); }

// ---------------------------------------------------------------------------------------------
// y (B, N) = x (B, K) W^T + bias, W (N, K) row-major, one matvec per row: the lean stepping
// path's matmuls at batch 1 (core/step.py), where a BLAS call's fixed cost dominates.

Tensor linear_rows(const Tensor& W, const Tensor& x, const std::optional<Tensor>& bias) {
  check_all("a linear_rows operand", W, x);
  TORCH_CHECK(x.dim() == 2 && W.dim() == 2 && x.size(1) == W.size(1), "rnnkit native: linear_rows shapes");
  const int64_t B = x.size(0), N = W.size(0), K = W.size(1);
  TORCH_CHECK(!bias.has_value() || bias->numel() == N, "rnnkit native: linear_rows bias size");
  const std::optional<Tensor> b = contiguous(bias);
  Tensor y = at::empty({B, N}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rnnkit_linear_rows", [&] {
    for (int64_t row = 0; row < B; ++row) {
      matvec<scalar_t>(W.data_ptr<scalar_t>(), x.data_ptr<scalar_t>() + row * K, ptr<scalar_t>(b),
                       y.data_ptr<scalar_t>() + row * N, N, K);
    }
  });
  return y;
}

// y (B, M) = x (B, K) A + bias, A (K, M) row-major (a weight stored transposed), one vecmat per row.
Tensor rows_times(const Tensor& x, const Tensor& A, const std::optional<Tensor>& bias) {
  check_all("a rows_times operand", A, x);
  TORCH_CHECK(x.dim() == 2 && A.dim() == 2 && x.size(1) == A.size(0), "rnnkit native: rows_times shapes");
  const int64_t B = x.size(0), K = A.size(0), M = A.size(1);
  TORCH_CHECK(!bias.has_value() || bias->numel() == M, "rnnkit native: rows_times bias size");
  const std::optional<Tensor> b = contiguous(bias);
  Tensor y = at::empty({B, M}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rnnkit_rows_times", [&] {
    for (int64_t row = 0; row < B; ++row) {
      vecmat<scalar_t>(x.data_ptr<scalar_t>() + row * K, A.data_ptr<scalar_t>(), ptr<scalar_t>(b),
                       y.data_ptr<scalar_t>() + row * M, K, M);
    }
  });
  return y;
}

// y (N, M) = x (N, K) W^T + bias through the blocked matmul above, in tiles of rows (a tile of x
// stays in the L2 cache while every block of W passes).
template <typename T>
Tensor tiled(const Blocked<T>& blocks, const Tensor& x_, int64_t M) {
  const Tensor x = x_.contiguous();
  const int64_t N = x.size(0), K = x.size(1);
  Tensor y = at::empty({N, M}, x.options());
  const int64_t rows = std::clamp<int64_t>((int64_t(1) << 16) / std::max<int64_t>(1, K), 8, 256);
  const int64_t tiles = (N + rows - 1) / rows;
  const T* xp = x.data_ptr<T>();
  T* yp = y.data_ptr<T>();
  at::parallel_for(0, tiles * blocks.nq, blocks.grain(std::min(rows, N), int64_t(1) << 17), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {  // tile-major: consecutive tasks share their tile of x
      const int64_t r0 = (i / blocks.nq) * rows;
      blocks(i % blocks.nq, xp + r0 * K, K, std::min(rows, N - r0), yp + r0 * M, M, false);
    }
  });
  return y;
}

// The benchmark's measure of the blocked matmul's peak, beside torch's BLAS and oneDNN: W (M, K)
// packed on each call. (As a layer's input projection it measured 0.8-1.13x of torch's BLAS, so
// torch's addmm keeps that job: fused.py's _Projection.)
Tensor linear_blocks(const Tensor& x, const Tensor& w, const std::optional<Tensor>& bias) {
  check_all("a linear_blocks operand", x, w);
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "rnnkit native: linear_blocks shapes");
  TORCH_CHECK(!bias.has_value() || bias->numel() == w.size(0), "rnnkit native: linear_blocks bias size");
  Tensor y;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rnnkit_linear_blocks", [&] {
    y = tiled(Blocked<scalar_t>(w, 1, bias), x, w.size(0));
  });
  return y;
}

// W (G*H, K) -> its packed form (ceil(H / L), K, G, L): for linear_packed (G = 1; W may be the
// transpose of a row-major matrix, as W_hh^T for the backward's dh += dz W_hh) and for the
// forward loops' recurrent weight (G gates), packed by fused.py on every call.
Tensor pack_linear(const Tensor& w, int64_t gates) {
  TORCH_CHECK(w.device().is_cpu() && w.dim() == 2, "rnnkit native: pack_linear takes a matrix on the CPU");
  TORCH_CHECK(gates >= 1 && w.size(0) % gates == 0, "rnnkit native: pack_linear: rows not a multiple of the gates");
  Tensor p;
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "rnnkit_pack_linear", [&] { p = pack_blocks<scalar_t>(w, gates); });
  return p;
}

// y (N, M) = x (N, K) W^T + bias with W packed once by pack_linear: the generic kernel's
// recurrent matmul (fused.py), one call per step with the same weight.
Tensor linear_packed(const Tensor& x, const Tensor& packed, int64_t M, const std::optional<Tensor>& bias) {
  check(packed, "linear_packed's packed weight");
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == packed.scalar_type(), "rnnkit native: linear_packed: x on the CPU, of the weight's dtype");
  TORCH_CHECK(x.dim() == 2 && packed.dim() == 4 && x.size(1) == packed.size(1) && packed.size(2) == 1,
              "rnnkit native: linear_packed shapes");
  TORCH_CHECK(!bias.has_value() || bias->numel() == M, "rnnkit native: linear_packed bias size");
  TORCH_CHECK(!bias.has_value() || (bias->device().is_cpu() && bias->scalar_type() == packed.scalar_type()),
              "rnnkit native: linear_packed: bias on the CPU, of the weight's dtype");
  const int64_t L = packed.scalar_type() == at::kDouble ? Vec<double>::size() : Vec<float>::size();
  TORCH_CHECK(packed.size(3) == L && packed.size(0) == (M + L - 1) / L,
              "rnnkit native: linear_packed: not packed by pack_linear for that many outputs");
  Tensor y;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rnnkit_linear_packed", [&] {
    y = tiled(Blocked<scalar_t>(packed, 1, M, bias), x, M);
  });
  return y;
}


// -- a user's cell: its combine as a small program (pointwise.py compiles it) ----------------------
//
// One step of a gated cell that only customises ``combine`` is elementwise over (B, H): pointwise.py
// traces ``combine`` (and derives its backward), and hands over a program in registers of
// PW_CHUNK values. pw_items runs it over every row of the batch in chunks of the row, all
// instructions on one chunk while it is in the L1 cache, on all threads: one pass where torch
// would run a dozen single-threaded ops over (B, H) each. The op ``pointwise`` runs a program once;
// ``pointwise_scan`` and its backward, at every step of their loops over time.
//
// program (int64): n_regs, n_in, n_const, n_out, n_instr, then per input (tensor, block), per output
// (register, tensor, block), then per instruction (op, dst, a, b, c). Registers 0..n_in-1 are the
// inputs, then the constants (``consts``), then temporaries; input k is columns
// [block * width, (block + 1) * width) of inputs[tensor], or a (B, 1) column broadcast along the
// row. Same for outputs, which are written at the end of each chunk.
enum PwOp : int64_t { PW_ADD, PW_SUB, PW_MUL, PW_DIV, PW_NEG, PW_SIGMOID, PW_TANH, PW_RELU, PW_EXP, PW_WHERE,
                      PW_GT, PW_GE, PW_OPS };
constexpr int64_t PW_CHUNK = 256;
constexpr int64_t PW_HEADER = 5;
constexpr int64_t PW_MAX_REGS = 1024;  // and at most PW_MAX_OPERANDS inputs and outputs in a scan
constexpr int64_t PW_MAX_OPERANDS = 64;

// A program's parts (checked_program checks every program an op is given).
struct PwCode {
  int64_t n_regs, n_in, n_const, n_out, n_instr;
  const int64_t* in_map;   // (tensor, block) per input
  const int64_t* out_map;  // (register, tensor, block) per output
  const int64_t* code;     // (op, dst, a, b, c) per instruction
  const double* consts;

  PwCode(const int64_t* p, const double* c)
      : n_regs(p[0]), n_in(p[1]), n_const(p[2]), n_out(p[3]), n_instr(p[4]), in_map(p + PW_HEADER),
        out_map(p + PW_HEADER + 2 * p[1]), code(p + PW_HEADER + 2 * p[1] + 3 * p[3]), consts(c) {}

  int64_t grain() const {  // items per thread chunk: about 32K element-instructions
    return std::max<int64_t>(1, (int64_t(1) << 15) / (PW_CHUNK * std::max<int64_t>(1, n_instr)));
  }
};

// One call's operands as pointers: input k's row b at in[k] + b * in_ld[k] (one value if broadcast),
// output k's at out[k] + b * out_ld[k].
template <typename T>
struct PwOperands {
  std::vector<const T*> in;
  std::vector<int64_t> in_ld;
  std::vector<char> broadcast;
  std::vector<T*> out;
  std::vector<int64_t> out_ld;
};

// Items i0 .. i1 (row i / chunks, columns (i % chunks) * PW_CHUNK ..) of a (B, W) program; scratch
// holds n_regs * PW_CHUNK values. Runs inside the loops' thread team: nothing here may throw.
template <typename T>
void pw_items(const PwCode& pc, const PwOperands<T>& ops, int64_t W, int64_t i0, int64_t i1, T* scratch,
              const int64_t* in_off = nullptr, const int64_t* out_off = nullptr) {
  constexpr int64_t VL = Vec<T>::size();
  using V = Vec<T>;
  const int64_t chunks = (W + PW_CHUNK - 1) / PW_CHUNK;
  T* regs[PW_MAX_REGS];
  for (int64_t r = 0; r < pc.n_regs; ++r) regs[r] = scratch + r * PW_CHUNK;
  for (int64_t k = 0; k < pc.n_const; ++k) std::fill_n(regs[pc.n_in + k], PW_CHUNK, T(pc.consts[k]));
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t b = i / chunks, j0 = (i % chunks) * PW_CHUNK, n = std::min(PW_CHUNK, W - j0);
    const int64_t nn = (n + VL - 1) / VL * VL;  // whole vectors: the registers are PW_CHUNK long
    for (int64_t k = 0; k < pc.n_in; ++k) {
      const T* src = ops.in[k] + (in_off != nullptr ? in_off[k] : 0) + b * ops.in_ld[k];
      T* own = scratch + k * PW_CHUNK;
      if (ops.broadcast[k]) {
        std::fill_n(own, nn, src[0]);
        regs[k] = own;
      } else if (n == PW_CHUNK) {
        regs[k] = const_cast<T*>(src + j0);  // read in place; instructions never write an input
      } else {
        std::copy_n(src + j0, n, own);
        std::fill(own + n, own + nn, T(0));
        regs[k] = own;
      }
    }
    for (const int64_t* c = pc.code; c < pc.code + 5 * pc.n_instr; c += 5) {
      T* d = regs[c[1]];
      const T *x = regs[c[2]], *y = regs[c[3]], *z = regs[c[4]];
      auto unary = [&](auto f) {
        for (int64_t j = 0; j < nn; j += VL) f(V::loadu(x + j)).store(d + j);
      };
      auto binary = [&](auto f) {
        for (int64_t j = 0; j < nn; j += VL) f(V::loadu(x + j), V::loadu(y + j)).store(d + j);
      };
      switch (c[0]) {
        case PW_ADD: binary([](const V& a, const V& b) { return a + b; }); break;
        case PW_SUB: binary([](const V& a, const V& b) { return a - b; }); break;
        case PW_MUL: binary([](const V& a, const V& b) { return a * b; }); break;
        case PW_DIV: binary([](const V& a, const V& b) { return a / b; }); break;
        case PW_NEG: unary([](const V& a) { return V(T(0)) - a; }); break;
        case PW_SIGMOID: unary([](const V& a) { return sigmoid(a); }); break;
        case PW_TANH: unary([](const V& a) { return tanh_(a); }); break;
        case PW_RELU: unary([](const V& a) { return at::vec::maximum(a, V(T(0))); }); break;
        case PW_EXP: unary([](const V& a) { return keep_nan(exp_(a), a); }); break;
        case PW_GT: binary([](const V& a, const V& b) { return a.gt(b); }); break;
        case PW_GE: binary([](const V& a, const V& b) { return a.ge(b); }); break;
        case PW_WHERE:  // x != 0 ? y : z
          for (int64_t j = 0; j < nn; j += VL) {
            V::blendv(V::loadu(z + j), V::loadu(y + j), V::loadu(x + j) != V(T(0))).store(d + j);
          }
          break;
      }
    }
    for (int64_t k = 0; k < pc.n_out; ++k) {
      T* dst = ops.out[k] + (out_off != nullptr ? out_off[k] : 0) + b * ops.out_ld[k] + j0;
      std::copy_n(regs[pc.out_map[3 * k]], n, dst);
    }
  }
}

// Per-thread scratch for pw_items, allocated before a thread team starts (which must not allocate).
template <typename T>
struct PwScratch {
  std::vector<T> values;
  int64_t per_thread;
  explicit PwScratch(const PwCode& pc)
      : values(at::get_num_threads() * pc.n_regs * PW_CHUNK), per_thread(pc.n_regs * PW_CHUNK) {}
  T* mine() {  // in passes_in_parallel's own OpenMP team, at::get_thread_num() is 0 on every thread
#ifdef _OPENMP
    const int64_t id = omp_get_thread_num();
#else
    const int64_t id = at::get_thread_num();
#endif
    const int64_t threads = static_cast<int64_t>(values.size()) / per_thread;
    return values.data() + std::min<int64_t>(id, threads - 1) * per_thread;
  }
};

// A program checked whole: header, lengths, every register and op in range, instructions writing
// only temporaries. After this, pw_items cannot read or write outside its registers.
PwCode checked_program(const Tensor& program, const Tensor& consts) {
  TORCH_CHECK(program.device().is_cpu() && program.scalar_type() == at::kLong && program.dim() == 1 &&
              program.is_contiguous() &&
              consts.device().is_cpu() && consts.scalar_type() == at::kDouble && consts.is_contiguous(),
              "rnnkit native: pointwise: the program is an int64 vector and its constants a float64 one");
  const int64_t* p = program.data_ptr<int64_t>();
  const int64_t size = program.numel();
  TORCH_CHECK(size >= PW_HEADER, "rnnkit native: pointwise: the program is shorter than its header");
  const PwCode pc(p, consts.data_ptr<double>());
  TORCH_CHECK(pc.n_in >= 0 && pc.n_const >= 0 && pc.n_out >= 0 && pc.n_instr >= 0 && pc.n_regs >= pc.n_in + pc.n_const &&
              pc.n_regs <= PW_MAX_REGS && size == PW_HEADER + 2 * pc.n_in + 3 * pc.n_out + 5 * pc.n_instr &&
              consts.numel() == pc.n_const,
              "rnnkit native: pointwise: the program's header disagrees with its length or its constants");
  for (int64_t k = 0; k < pc.n_out; ++k)
    TORCH_CHECK(pc.out_map[3 * k] >= 0 && pc.out_map[3 * k] < pc.n_regs,
                "rnnkit native: pointwise: an output reads no register");
  for (int64_t i = 0; i < pc.n_instr; ++i) {
    const int64_t* c = pc.code + 5 * i;
    TORCH_CHECK(c[0] >= 0 && c[0] < PW_OPS && c[1] >= pc.n_in + pc.n_const && c[1] < pc.n_regs &&
                c[2] >= 0 && c[2] < pc.n_regs && c[3] >= 0 && c[3] < pc.n_regs && c[4] >= 0 && c[4] < pc.n_regs,
                "rnnkit native: pointwise: an instruction's op or register is out of range");
  }
  return pc;
}

// The program's operands among `tensors`, each (B, columns) of `dtype` on the CPU with the
// addressed columns inside it at unit stride, or a (B, 1) input broadcast along the row: their
// pointers, advanced by `step[tensor]` values at each step of a scan (0 for pointwise).
template <typename T>
void pw_bind(const PwCode& pc, at::TensorList tensors, bool outputs, int64_t B, int64_t W, PwOperands<T>& ops) {
  const int64_t count = outputs ? pc.n_out : pc.n_in;
  for (int64_t k = 0; k < count; ++k) {
    const int64_t* entry = outputs ? pc.out_map + 3 * k + 1 : pc.in_map + 2 * k;
    const int64_t index = entry[0], block = entry[1];
    TORCH_CHECK(index >= 0 && index < int64_t(tensors.size()), "rnnkit native: pointwise: a program ",
                outputs ? "output" : "input", " names a tensor that was not passed");
    const Tensor& t = tensors[index];
    TORCH_CHECK(t.dim() == 2 && t.device().is_cpu() && t.scalar_type() == c10::CppTypeToScalarType<T>::value &&
                t.size(0) == B,
                "rnnkit native: pointwise: every operand must be (B, columns) on the CPU, of one floating dtype");
    const bool broadcast = !outputs && t.size(1) == 1 && W > 1;
    TORCH_CHECK(broadcast ? block == 0 : (block >= 0 && (block + 1) * W <= t.size(1) && (t.stride(1) == 1 || W == 1)),
                "rnnkit native: pointwise: an operand is narrower than the program's block of it, or not unit-stride");
    const int64_t col = broadcast ? 0 : block * W;
    if (outputs) {
      ops.out.push_back(t.data_ptr<T>() + col);
      ops.out_ld.push_back(t.stride(0));
    } else {
      ops.in.push_back(t.data_ptr<T>() + col);
      ops.in_ld.push_back(t.stride(0));
      ops.broadcast.push_back(broadcast);
    }
  }
}

// Run a program once over (B, width): inputs and outputs as pointwise.py's Compiled describes.
void pointwise(const Tensor& program, const Tensor& consts, at::TensorList inputs, at::TensorList outputs, int64_t width) {
  const PwCode pc = checked_program(program, consts);
  TORCH_CHECK(!inputs.empty() && width >= 1, "rnnkit native: pointwise: no inputs, or no columns");
  const at::ScalarType dtype = inputs[0].scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "rnnkit native: pointwise runs float32 or float64");
  const int64_t B = inputs[0].size(0);
  AT_DISPATCH_FLOATING_TYPES(dtype, "rnnkit_pointwise", [&] {
    PwOperands<scalar_t> ops;
    pw_bind<scalar_t>(pc, inputs, false, B, width, ops);
    pw_bind<scalar_t>(pc, outputs, true, B, width, ops);
    const int64_t chunks = (width + PW_CHUNK - 1) / PW_CHUNK;
    at::parallel_for(0, B * chunks, pc.grain(), [&](int64_t i0, int64_t i1) {
      std::vector<scalar_t> scratch(pc.n_regs * PW_CHUNK);
      pw_items<scalar_t>(pc, ops, width, i0, i1, scratch.data());
    });
  });
}


// A scan's operands: the program's inputs and outputs bound to step 0's views (which checks them),
// then at step t each moved by offset(tensor index, t) values.
template <typename T>
struct PwScanOperands {
  PwOperands<T> ops;
  std::vector<int64_t> in_tensor, out_tensor;

  PwScanOperands(const PwCode& pc, at::TensorList inputs, at::TensorList outputs, int64_t B, int64_t W) {
    TORCH_CHECK(pc.n_in <= PW_MAX_OPERANDS && pc.n_out <= PW_MAX_OPERANDS, "rnnkit native: pointwise: too many operands");
    pw_bind<T>(pc, inputs, false, B, W, ops);
    pw_bind<T>(pc, outputs, true, B, W, ops);
    for (int64_t k = 0; k < pc.n_in; ++k) in_tensor.push_back(pc.in_map[2 * k]);
    for (int64_t k = 0; k < pc.n_out; ++k) out_tensor.push_back(pc.out_map[3 * k + 1]);
  }

  // pw_items for this thread's share [q0, q1) of nq of a pass, items split in proportion
  template <typename InOffset, typename OutOffset>
  void run(const PwCode& pc, int64_t B, int64_t W, int64_t q0, int64_t q1, int64_t nq, T* scratch,
           const InOffset& in_offset, const OutOffset& out_offset) const {
    int64_t in_off[PW_MAX_OPERANDS], out_off[PW_MAX_OPERANDS];
    for (int64_t k = 0; k < pc.n_in; ++k) in_off[k] = in_offset(in_tensor[k]);
    for (int64_t k = 0; k < pc.n_out; ++k) out_off[k] = out_offset(out_tensor[k]);
    const int64_t items = B * ((W + PW_CHUNK - 1) / PW_CHUNK);
    pw_items<T>(pc, ops, W, q0 * items / nq, q1 * items / nq, scratch, in_off, out_off);
  }
};

void check_scan_buffers(at::TensorList tensors, const char* name) {
  for (const Tensor& t : tensors) check(t, name);
}

// The compiled combine over all steps (pointwise.py's forward program), one thread team throughout:
// per step a pass of products over blocks of the G*H outputs, hz_t = h_{t-1} W_hh^T + b_hh (and,
// given W_ih, xz_t = x_t W_ih^T + b_ih: x is then (B, T, I), else xz (B, T, G*H)), each weight
// packed by pack_linear for 1 gate or for the cell's 3 or 4 (a 4-gate cell's products measured
// 1.3x faster so at batch 1, 3 x 512), then a pass of the program over (B, H).
// states: one (rows, B, H) buffer per state field, row 0 the initial
// state, step t's in row t % rows (rows: T + 1, or 2 in inference); hz_all (T, B, G*H) keeps every
// hz_t for the backward; mask (B, T) in x's dtype.
void pointwise_scan(const Tensor& program, const Tensor& consts, const Tensor& x, const std::optional<Tensor>& packed_ih,
                    const std::optional<Tensor>& bias_ih, const Tensor& packed, const std::optional<Tensor>& bias,
                    int64_t width, at::TensorList states, const Tensor& out, const std::optional<Tensor>& hz_all,
                    const std::optional<Tensor>& mask, bool fold) {
  const PwCode pc = checked_program(program, consts);
  check_all("a pointwise_scan buffer", x, packed, out);
  check_scan_buffers(states, "a pointwise_scan state");
  TORCH_CHECK(!states.empty() && x.dim() == 3 && out.dim() == 3 && packed.dim() == 4 && states[0].dim() == 3,
              "rnnkit native: pointwise_scan: x, out and the states are 3-D, the weight packed");
  const int64_t B = x.size(0), T = x.size(1), H = out.size(2), rows = states[0].size(0);
  // the weights packed with G = 1, or with G = the cell's gates (3 or 4: blocks that hold every
  // gate's columns, as the built-in cells' loops read theirs; the (B, G*H) products come out alike)
  const int64_t S = states.size(), L = packed.size(3), GH = width, G = packed.size(2), Hg = GH / std::max<int64_t>(G, 1);
  TORCH_CHECK(out.size(0) == B && out.size(1) == T && packed.size(1) == H && (rows == T + 1 || rows == 2),
              "rnnkit native: pointwise_scan: out (B, T, H), the weight packed for K = H, T + 1 or 2 state rows");
  TORCH_CHECK((G == 1 || G == 3 || G == 4) && GH % G == 0,
              "rnnkit native: pointwise_scan: the weight packed for 1, 3 or 4 gates that divide G*H");
  for (const Tensor& st : states)
    TORCH_CHECK(st.sizes() == states[0].sizes() && st.size(1) == B && st.size(2) == H,
                "rnnkit native: pointwise_scan: states (rows, B, H)");
  const bool projecting = packed_ih.has_value();
  TORCH_CHECK(width >= 1 && packed.size(0) == (Hg + L - 1) / L && (projecting || x.size(2) == width) &&
              (!projecting || (packed_ih->dim() == 4 && packed_ih->size(0) == packed.size(0) &&
                               packed_ih->size(1) == x.size(2) && packed_ih->size(2) == G)) &&
              (!bias.has_value() || bias->numel() == width) && (!bias_ih.has_value() || bias_ih->numel() == width),
              "rnnkit native: pointwise_scan: the packed weights, the biases and x disagree on G*H");
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rnnkit_pointwise_scan", [&] {
    using T_ = scalar_t;
    const Blocked<T_> rec(packed, G, Hg, bias);
    std::optional<Blocked<T_>> proj;
    if (projecting) proj.emplace(*packed_ih, G, Hg, bias_ih);
    // fold: hz_t holds xz_t + hz_t and the program's xz_t reads zeros (a program whose gates see x
    // and h only as their sum, pointwise.py's ``shared``): one buffer fewer to write, keep and read
    const Tensor xz_buffer = fold ? at::zeros({B, GH}, x.options()) : projecting ? at::empty({B, GH}, x.options()) : Tensor();
    const bool keep = hz_all.has_value();
    if (keep) {
      check(*hz_all, "pointwise_scan's hz_all");
      TORCH_CHECK(hz_all->dim() == 3 && hz_all->size(0) == T && hz_all->size(1) == B && hz_all->size(2) == GH,
                  "rnnkit native: pointwise_scan: hz_all (T, B, G*H)");
    }
    const Tensor hz_buffer = keep ? Tensor() : at::empty({B, GH}, x.options());
    if (mask.has_value()) {
      check(*mask, "pointwise_scan's mask");
      TORCH_CHECK(mask->dim() == 2 && mask->size(0) == B && mask->size(1) == T,
                  "rnnkit native: pointwise_scan: mask (B, T)");
    }
    if (T == 0) return;
    std::vector<Tensor> ins = {fold || projecting ? xz_buffer : x.select(1, 0), keep ? hz_all->select(0, 0) : hz_buffer};
    std::vector<Tensor> outs = {out.select(1, 0)};
    for (const Tensor& st : states) ins.push_back(st.select(0, 0)), outs.push_back(st.select(0, 0));
    if (mask.has_value()) ins.push_back(mask->narrow(1, 0, 1));
    const PwScanOperands<T_> bound(pc, ins, outs, B, H);
    PwScratch<T_> scratch(pc);
    T_* xzp = projecting ? xz_buffer.data_ptr<T_>() : nullptr;
    T_* hzp = keep ? hz_all->data_ptr<T_>() : hz_buffer.data_ptr<T_>();
    const T_* xp = x.data_ptr<T_>();
    const T_* h0 = states[0].data_ptr<T_>();
    const int64_t I = x.size(2);
    passes_in_parallel(2 * T, rec.nq, rec.grain(B), [&](int64_t i, int64_t q0, int64_t q1) {
      const int64_t t = i / 2, now = t % rows, next = (t + 1) % rows;
      if (i % 2 == 0) {  // the products
        T_* hz = hzp + (keep ? t * B * GH : 0);
        for (int64_t q = q0; q < q1; ++q) {
          if (fold && projecting) {
            (*proj)(q, xp + t * I, T * I, B, hz, GH, false);
          } else if (fold) {  // xz_t's block into hz_t's, then the product adds to it
            const int64_t j = q * rec.L, n = std::min<int64_t>(rec.L, Hg - j);
            for (int64_t b = 0; b < B; ++b) {
              for (int64_t g = 0; g < G; ++g) {
                load(xp + (b * T + t) * GH + g * Hg + j, n).store(hz + b * GH + g * Hg + j, n);
              }
            }
          } else if (projecting) {
            (*proj)(q, xp + t * I, T * I, B, xzp, GH, false);
          }
          rec(q, h0 + now * B * H, H, B, hz, GH, fold);
        }
        return;
      }
      auto in_offset = [&](int64_t k) -> int64_t {
        if (k == 0) return fold || projecting ? 0 : t * GH;
        if (k == 1) return keep ? t * B * GH : 0;
        if (k < 2 + S) return now * B * H;
        return t;  // the mask
      };
      auto out_offset = [&](int64_t k) -> int64_t { return k == 0 ? t * H : next * B * H; };
      bound.run(pc, B, H, q0, q1, rec.nq, scratch.mine(), in_offset, out_offset);
    });
  });
}

// Back through the steps of pointwise_scan (pointwise.py's backward program): per step t = T-1 .. 0 a
// pass of the program over (B, H), which writes d xz_t (into dxz, (B, T, G*H)), d hz_t (into dhz,
// (T, B, G*H); without dhz the program's d hz_t is d xz_t) and the state's gradient without the path
// through hz_t, then a pass of products over blocks of H adding d hz_t W_hh to d h.
// dstate: one (B, H) per state field, the final state's
// gradient in, the initial state's out. gout (B, T, H) with unit stride along H, or none.
void pointwise_scan_backward(const Tensor& program, const Tensor& consts, const std::optional<Tensor>& xz, const Tensor& hz_all,
                             at::TensorList states, const std::optional<Tensor>& mask, const std::optional<Tensor>& gout,
                             const Tensor& packed_t, at::TensorList dstate, const Tensor& dxz,
                             const std::optional<Tensor>& dhz) {
  const PwCode pc = checked_program(program, consts);
  check_all("a pointwise_scan_backward buffer", hz_all, packed_t, dxz);
  if (xz.has_value()) check(*xz, "pointwise_scan_backward's xz");
  if (dhz.has_value()) check(*dhz, "pointwise_scan_backward's dhz");
  check_scan_buffers(states, "a pointwise_scan_backward state");
  check_scan_buffers(dstate, "a pointwise_scan_backward state gradient");
  TORCH_CHECK(dxz.dim() == 3 && hz_all.dim() == 3 && packed_t.dim() == 4 && !states.empty() && states.size() == dstate.size(),
              "rnnkit native: pointwise_scan_backward: dxz and hz are 3-D, one gradient per state");
  const int64_t B = dxz.size(0), T = dxz.size(1), GH = dxz.size(2), S = states.size();
  const int64_t H = states[0].dim() == 3 ? states[0].size(2) : -1;
  TORCH_CHECK(hz_all.size(0) == T && hz_all.size(1) == B && hz_all.size(2) == GH && (!xz.has_value() || dxz.sizes() == xz->sizes()) &&
              (!dhz.has_value() || dhz->sizes() == hz_all.sizes()) && packed_t.size(1) == GH,
              "rnnkit native: pointwise_scan_backward: xz, hz, their gradients and the weight disagree");
  for (int64_t s = 0; s < S; ++s)
    TORCH_CHECK(states[s].dim() == 3 && states[s].size(0) == T + 1 && states[s].size(1) == B && states[s].size(2) == H &&
                dstate[s].dim() == 2 && dstate[s].size(0) == B && dstate[s].size(1) == H,
                "rnnkit native: pointwise_scan_backward: states (T + 1, B, H), their gradients (B, H)");
  if (mask.has_value()) {
    check(*mask, "pointwise_scan_backward's mask");
    TORCH_CHECK(mask->dim() == 2 && mask->size(0) == B && mask->size(1) == T,
                "rnnkit native: pointwise_scan_backward: mask (B, T)");
  }
  if (gout.has_value())
    TORCH_CHECK(gout->dim() == 3 && gout->size(0) == B && gout->size(1) == T && gout->size(2) == H && gout->stride(2) == 1 &&
                gout->device().is_cpu(), "rnnkit native: pointwise_scan_backward: gout (B, T, H), unit stride along H");
  AT_DISPATCH_FLOATING_TYPES(dxz.scalar_type(), "rnnkit_pointwise_scan_backward", [&] {
    using T_ = scalar_t;
    const Blocked<T_> back(packed_t, 1, H, std::nullopt);
    const Tensor turns = at::empty({2, S, B, H}, dxz.options());  // d state: turn (t + 1) % 2 in, t % 2 out
    for (int64_t s = 0; s < S; ++s) turns[T % 2][s].copy_(dstate[s]);
    const Tensor zero = at::zeros({B, 1}, dxz.options());
    if (T > 0) {
      // without xz (pointwise_scan's fold: hz holds xz + hz), the program's xz_t reads zeros
      const Tensor x0 = xz.has_value() ? xz->select(1, 0) : at::zeros({B, GH}, dxz.options());
      std::vector<Tensor> ins = {x0, hz_all.select(0, 0)};
      for (const Tensor& st : states) ins.push_back(st.select(0, 0));
      if (mask.has_value()) ins.push_back(mask->narrow(1, 0, 1));
      ins.push_back(gout.has_value() ? gout->select(1, 0) : zero);
      for (int64_t s = 0; s < S; ++s) ins.push_back(turns[0][s]);
      // without dhz (the program's d hz_t is its d xz_t), no output may name it: its place holds dxz
      for (int64_t k = 0; k < pc.n_out && !dhz.has_value(); ++k)
        TORCH_CHECK(pc.out_map[3 * k + 1] != 1,
                    "rnnkit native: pointwise_scan_backward: the program writes d hz, and no dhz was passed");
      std::vector<Tensor> outs = {dxz.select(1, 0), dhz.has_value() ? dhz->select(0, 0) : dxz.select(1, 0)};
      for (int64_t s = 0; s < S; ++s) outs.push_back(turns[0][s]);
      const PwScanOperands<T_> bound(pc, ins, outs, B, H);
      PwScratch<T_> scratch(pc);
      const int64_t first_d = 2 + S + (mask.has_value() ? 1 : 0) + 1, gout_index = first_d - 1;
      const int64_t gstride = gout.has_value() ? gout->stride(1) : 0;
      // the product's d hz_t: row b of dhz[t], or of dxz[:, t]
      const T_* dzp = dhz.has_value() ? dhz->data_ptr<T_>() : dxz.data_ptr<T_>();
      const int64_t dz_step = dhz.has_value() ? B * GH : GH, dz_ld = dhz.has_value() ? GH : T * GH;
      T_* turnp = turns.data_ptr<T_>();
      passes_in_parallel(2 * T, back.nq, back.grain(B), [&](int64_t i, int64_t q0, int64_t q1) {
        const int64_t t = T - 1 - i / 2, in_turn = (t + 1) % 2, out_turn = t % 2;
        if (i % 2 == 0) {  // the program
          auto in_offset = [&](int64_t k) -> int64_t {
            if (k == 0) return xz.has_value() ? t * GH : 0;
            if (k == 1) return t * B * GH;
            if (k < 2 + S) return t * B * H;
            if (k < gout_index) return t;  // the mask
            if (k == gout_index) return t * gstride;
            return in_turn * S * B * H;
          };
          auto out_offset = [&](int64_t k) -> int64_t {
            if (k == 0) return t * GH;
            if (k == 1) return t * B * GH;
            return out_turn * S * B * H;
          };
          bound.run(pc, B, H, q0, q1, back.nq, scratch.mine(), in_offset, out_offset);
          return;
        }
        for (int64_t q = q0; q < q1; ++q) back(q, dzp + t * dz_step, dz_ld, B, turnp + out_turn * S * B * H, H, true);
      });
    }
    for (int64_t s = 0; s < S; ++s) dstate[s].copy_(turns[0][s]);
  });
}

}  // namespace

TORCH_LIBRARY(rnnkit_native, lib) {
  lib.def("linear_rows(Tensor W, Tensor x, Tensor? bias) -> Tensor", &linear_rows);
  lib.def("rows_times(Tensor x, Tensor A, Tensor? bias) -> Tensor", &rows_times);
  lib.def("linear_blocks(Tensor x, Tensor w, Tensor? bias) -> Tensor", &linear_blocks);
  lib.def("pack_linear(Tensor w, int gates=1) -> Tensor", &pack_linear);
  lib.def("workspace(int[] size, ScalarType dtype) -> Tensor", &workspace);
  lib.def("release_workspace() -> int", &release_workspace);
  lib.def("linear_packed(Tensor x, Tensor packed, int M, Tensor? bias) -> Tensor", &linear_packed);
  lib.def("lstm_forward(Tensor xz, Tensor packed, Tensor? bias, Tensor(a!) hs, Tensor(b!) cs, Tensor(c!) out, "
          "Tensor(d!)? gates, Tensor? mask) -> ()", &lstm_forward);
  lib.def("lstm_forward_projecting(Tensor x, Tensor packed_ih, Tensor? bias_ih, Tensor packed, Tensor? bias, "
          "Tensor(a!) hs, Tensor(b!) cs, Tensor(c!) out, Tensor? mask) -> ()", &lstm_forward_projecting);
  lib.def("lstm_backward(Tensor gates, Tensor cs, Tensor? gout, Tensor w_hh, Tensor(a!) dh, Tensor(b!) dc, "
          "Tensor(c!) dxz, Tensor? mask) -> ()", &lstm_backward);
  lib.def("gru_forward(Tensor xz, Tensor packed, Tensor? bias, Tensor(a!) hs, Tensor(b!) out, Tensor(c!)? gates, "
          "Tensor(d!)? hzn, Tensor? mask) -> ()", &gru_forward);
  lib.def("gru_backward(Tensor gates, Tensor hzn, Tensor hs, Tensor? gout, Tensor w_hh, Tensor(a!) dh, "
          "Tensor(b!) dxz, Tensor(c!) dhn, Tensor? mask) -> ()", &gru_backward);
  lib.def("rnn_forward(Tensor xz, Tensor packed, Tensor? bias, Tensor(a!) hs, Tensor(b!) out, Tensor? mask, "
          "bool relu) -> ()", &rnn_forward);
  lib.def("pointwise(Tensor program, Tensor consts, Tensor[] inputs, Tensor(a!)[] outputs, int width) -> ()", &pointwise);
  lib.def("pointwise_scan(Tensor program, Tensor consts, Tensor x, Tensor? packed_ih, Tensor? bias_ih, Tensor packed, "
          "Tensor? bias, int width, Tensor(a!)[] states, Tensor(b!) out, Tensor(c!)? hz_all, Tensor? mask, "
          "bool fold=False) -> ()",
          &pointwise_scan);
  lib.def("pointwise_scan_backward(Tensor program, Tensor consts, Tensor? xz, Tensor hz_all, Tensor[] states, Tensor? mask, "
          "Tensor? gout, Tensor packed_t, Tensor(a!)[] dstate, Tensor(b!) dxz, Tensor(c!)? dhz) -> ()",
          &pointwise_scan_backward);
  lib.def("rnn_backward(Tensor hs, Tensor? gout, Tensor w_hh, Tensor(a!) dh, Tensor(b!) dxz, Tensor? mask, "
          "bool relu) -> ()", &rnn_backward);
}
