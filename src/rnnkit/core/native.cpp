// The fused kernels of core/fused.py for LSTM, GRU and RNN on the CPU, in C++.
//
// One op runs one direction of one layer over all time steps, forward or backward. Per step:
// one matmul for the recurrence (at::mm, the BLAS torch uses; oneDNN's matmul with the weight
// packed once per call; or, at batch 1, the matrix-vector kernels below) and one pass of the gate
// math over the batch, vectorized with ATen's own SIMD types. The backward op computes every gate
// derivative in that pass from the saved activations, so nothing is prepared in Python; the
// weight gradients are then one matmul over all steps (fused.py). What a Python loop pays per
// step in interpreter and dispatch overhead (tens of microseconds) becomes about one microsecond.
// native.py compiles this file on first use; fused.py's _Native* kernels call it.
//
// Layouts, shared with fused.py:
//   - per-step tensors are batch-major as the layer sees them: xz, gates, out, dxz (B, T, .);
//     the states h_0..h_T (and c) are time-major (T+1, B, H), so h_{t-1} is a (B, H) matrix;
//   - gates are in torch's order (LSTM i, f, g, o; GRU r, z, n), activated;
//   - `mask` is (B, T) bool: at a step where it is false a sequence keeps its state, its output
//     is 0, and in backward the output's gradient there is ignored;
//   - backward: `dh`, `dc` come in holding the final state's gradient and leave holding the
//     initial state's; `gout` is the output gradient (B, T, H) with a contiguous last dimension.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <type_traits>

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

// Pointwise work over the B rows of a step, split across threads only when it is large enough
// to pay for it (torch's own grain for pointwise ops is 32768 elements).
template <typename F>
inline void over_rows(int64_t B, int64_t row_width, const F& f) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, row_width));
  at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) f(b);
  });
}

// for (j = 0; j < H; j += lanes) body(j, n) with n the lanes in use (the tail is partial)
template <typename T, typename F>
inline void over_lanes(int64_t H, const F& body) {
  constexpr int64_t L = Vec<T>::size();
  for (int64_t j = 0; j < H; j += L) body(j, std::min<int64_t>(L, H - j));
}

template <typename T>
inline Vec<T> load(const T* p, int64_t n) {
  return n == Vec<T>::size() ? Vec<T>::loadu(p) : Vec<T>::loadu(p, n);
}

template <typename T>
inline T* ptr(const std::optional<Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

void check(const Tensor& t, const char* name) {
  TORCH_CHECK(t.is_contiguous(), "rnnkit native: ", name, " must be contiguous");
  TORCH_CHECK(t.device().is_cpu(), "rnnkit native: ", name, " must be on the CPU");
}

template <typename... Ts>
void check_all(const char* name, const Ts&... tensors) {
  (check(tensors, name), ...);
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
// The recurrent matmul of one step (struct Recurrent below chooses the route).
//
// oneDNN's matmul, x W^T + bias with W packed by mkldnn::_reorder_linear_weight: the op torch's
// own compiler uses for CPU linears, called through the dispatcher.

at::Tensor dnn_linear(const Tensor& x, const Tensor& packed, const std::optional<Tensor>& bias) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mkldnn::_linear_pointwise", "")
                       .typed<Tensor(const Tensor&, const Tensor&, const std::optional<Tensor>&, c10::string_view,
                                     c10::List<std::optional<c10::Scalar>>, std::optional<c10::string_view>)>();
  return op.call(x, packed, bias, "none", c10::List<std::optional<c10::Scalar>>(), std::nullopt);
}

// At batch 1 the recurrent matmuls are a matrix times a vector, where a BLAS call's fixed cost
// is most of the step; the two kernels below stream the weight matrix once, in memory order.
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

// h (B, K) -> h W^T + bias (B, N): at batch 1 matvec, else at::mm (the BLAS torch uses) or
// oneDNN's matmul with the weight packed once per call (mkldnn::_linear_pointwise, the op torch's
// compiler uses for CPU linears), up to twice as fast at large sizes but with a fixed ~15 us a
// call; fused.py chooses between those two by size.
struct Recurrent {
  Tensor w;                       // (K, N): h @ w
  std::optional<Tensor> packed;   // oneDNN's packed (N, K) weight, or absent
  std::optional<Tensor> bias;     // (N) or absent
  Tensor scratch;                 // (B, N), the output of the at::mm and batch-1 routes
  Tensor columns;                 // batch 1, small w: w (K, N) contiguous, for vecmat
  Tensor rows;                    // batch 1, large w: w^T (N, K) contiguous, for matvec

  // At batch 1 a weight that fits in the L2 cache goes to vecmat (no sums across lanes, which
  // cost more than the products when K is small); a larger one to matvec, which reads it in
  // memory order (vecmat would stride across it, a page per row when N is large).
  static constexpr int64_t kSmallBytes = int64_t(1) << 20;

  Recurrent(Tensor w_, std::optional<Tensor> packed_, std::optional<Tensor> bias_, Tensor scratch_)
      : w(std::move(w_)), packed(std::move(packed_)), bias(std::move(bias_)), scratch(std::move(scratch_)) {
    if (bias.has_value()) bias = bias->contiguous();  // the batch-1 kernels read it as an array
    if (packed.has_value() || scratch.size(0) != 1) return;
    if (w.numel() * w.element_size() <= kSmallBytes) columns = w.contiguous();
    else rows = w.t().contiguous();
  }

  Tensor operator()(const Tensor& h) {
    if (packed.has_value()) return dnn_linear(h, *packed, bias);
    if (columns.defined() || rows.defined()) {
      AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "rnnkit_batch1", [&] {
        const scalar_t* x = h.data_ptr<scalar_t>();
        scalar_t* y = scratch.data_ptr<scalar_t>();
        if (columns.defined()) {
          vecmat<scalar_t>(x, columns.data_ptr<scalar_t>(), ptr<scalar_t>(bias), y, w.size(0), w.size(1));
        } else {
          matvec<scalar_t>(rows.data_ptr<scalar_t>(), x, ptr<scalar_t>(bias), y, rows.size(0), rows.size(1));
        }
      });
      return scratch;
    }
    if (bias.has_value()) return at::addmm_out(scratch, *bias, h, w);
    return at::mm_out(scratch, h, w);
  }
};

// dh += dz W, the gradient through one step's recurrent matmul: vecmat at batch 1, else oneDNN
// (packed: its form of W^T) or at::mm. w: (N, K) = W_hh.
struct Backward {
  Tensor w;
  std::optional<Tensor> packed;
  bool vector;

  Backward(const Tensor& w_, std::optional<Tensor> packed_, int64_t batch)
      : w(w_.contiguous()), packed(std::move(packed_)), vector(!packed.has_value() && batch == 1) {}

  void operator()(Tensor& dh, const Tensor& dz) {
    if (packed.has_value()) {
      dh.add_(dnn_linear(dz, *packed, std::nullopt));
    } else if (vector) {
      AT_DISPATCH_FLOATING_TYPES(dh.scalar_type(), "rnnkit_vecmat", [&] {
        scalar_t* d = dh.data_ptr<scalar_t>();
        vecmat<scalar_t>(dz.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), d, d, w.size(0), w.size(1));
      });
    } else {
      dh.addmm_(dz, w);
    }
  }
};

// ---------------------------------------------------------------------------------------------
// The loops over time every cell shares. Forward, per step t: the recurrent matmul of h_{t-1}
// (hs[t]), then step(b, t, that row's h_{t-1} W^T + b) on each row valid at t and padded(b, t)
// (state carried, output 0) on the others. Backward, for t = T-1 .. 0: step(b, t) on each valid
// row, which writes the row's d z_t into scratch and updates dh, and padded(b, t) on the others,
// whose scratch row is zeroed here (no gradient into the gates; dh carried); then dh += scratch W.

template <typename T_, typename Step, typename Padded>
void forward_in_time(int64_t T, int64_t B, int64_t width, const bool* m, Recurrent& rec, const Tensor& hs,
                     const Step& step, const Padded& padded) {
  for (int64_t t = 0; t < T; ++t) {
    const Tensor hz = rec(hs.select(0, t));
    const T_* hzp = hz.data_ptr<T_>();
    over_rows(B, width, [&](int64_t b) {
      if (m != nullptr && !m[b * T + t]) padded(b, t);
      else step(b, t, hzp + b * width);
    });
  }
}

template <typename T_, typename Step, typename Padded>
void backward_in_time(int64_t T, int64_t B, int64_t width, const bool* m, Backward& back, Tensor& dh,
                      const Tensor& scratch, const Step& step, const Padded& padded) {
  T_* sp = scratch.data_ptr<T_>();
  for (int64_t t = T - 1; t >= 0; --t) {
    over_rows(B, width, [&](int64_t b) {
      if (m != nullptr && !m[b * T + t]) {
        std::fill(sp + b * width, sp + (b + 1) * width, T_(0));
        padded(b, t);
      } else {
        step(b, t);
      }
    });
    back(dh, scratch);
  }
}

// ---------------------------------------------------------------------------------------------
// LSTM: i, f, o = sigmoid, g = tanh of xz_t + h_{t-1} W_hh^T + b_hh; c_t = f c_{t-1} + i g;
// h_t = o tanh(c_t). gates (training only): the activated i, f, g, o, kept for backward.

void lstm_forward(const Tensor& xz, const Tensor& w_t, const std::optional<Tensor>& packed,
                  const std::optional<Tensor>& bias, const Tensor& hs, const Tensor& cs, const Tensor& out,
                  const std::optional<Tensor>& gates, const std::optional<Tensor>& mask) {
  check_all("an LSTM buffer", xz, hs, cs, out);
  if (gates.has_value()) check(*gates, "gates");
  const int64_t B = xz.size(0), T = xz.size(1), H = hs.size(2);
  Recurrent rec{w_t, packed, bias, at::empty({B, 4 * H}, xz.options())};
  AT_DISPATCH_FLOATING_TYPES(xz.scalar_type(), "rnnkit_lstm_forward", [&] {
    using T_ = scalar_t;
    const T_* xp = xz.data_ptr<T_>();
    T_* hsp = hs.data_ptr<T_>();
    T_* csp = cs.data_ptr<T_>();
    T_* outp = out.data_ptr<T_>();
    T_* gp = ptr<T_>(gates);
    auto step = [&](int64_t b, int64_t t, const T_* r) {
      const int64_t bt = b * T + t;
      const T_* x = xp + bt * 4 * H;
      T_* g = gp != nullptr ? gp + bt * 4 * H : nullptr;
      const T_* cp = csp + (t * B + b) * H;
      T_* hn = hsp + ((t + 1) * B + b) * H;
      T_* cn = csp + ((t + 1) * B + b) * H;
      T_* o = outp + bt * H;
      over_lanes<T_>(H, [&](int64_t j, int64_t n) {
        Vec<T_> i = sigmoid(load(x + j, n) + load(r + j, n));
        Vec<T_> f = sigmoid(load(x + H + j, n) + load(r + H + j, n));
        Vec<T_> gg = tanh_(load(x + 2 * H + j, n) + load(r + 2 * H + j, n));
        Vec<T_> og = sigmoid(load(x + 3 * H + j, n) + load(r + 3 * H + j, n));
        if (g != nullptr) {
          i.store(g + j, n), f.store(g + H + j, n), gg.store(g + 2 * H + j, n), og.store(g + 3 * H + j, n);
        }
        Vec<T_> c = f * load(cp + j, n) + i * gg;
        c.store(cn + j, n);
        Vec<T_> h = og * tanh_(c);
        h.store(hn + j, n);
        h.store(o + j, n);
      });
    };
    auto padded = [&](int64_t b, int64_t t) {
      const T_* hp = hsp + (t * B + b) * H;
      const T_* cp = csp + (t * B + b) * H;
      T_* o = outp + (b * T + t) * H;
      std::copy(hp, hp + H, hsp + ((t + 1) * B + b) * H), std::copy(cp, cp + H, csp + ((t + 1) * B + b) * H);
      std::fill(o, o + H, T_(0));
    };
    forward_in_time<T_>(T, B, 4 * H, ptr<bool>(mask), rec, hs, step, padded);
  });
}

// dxz: (B, T, 4H) out, the gradient of xz (and of the recurrent pre-activation); scratch (B, 4H).
void lstm_backward(const Tensor& gates, const Tensor& cs, const std::optional<Tensor>& gout, const Tensor& w_hh,
                   const std::optional<Tensor>& packed, Tensor dh, const Tensor& dc, const Tensor& dxz,
                   Tensor scratch, const std::optional<Tensor>& mask) {
  check_all("an LSTM gradient buffer", gates, cs, dh, dc, dxz, scratch);
  const int64_t B = gates.size(0), T = gates.size(1), H = dh.size(1);
  const Gout go(gout);
  Backward back(w_hh, packed, B);
  AT_DISPATCH_FLOATING_TYPES(gates.scalar_type(), "rnnkit_lstm_backward", [&] {
    using T_ = scalar_t;
    const T_* gp = gates.data_ptr<T_>();
    const T_* csp = cs.data_ptr<T_>();
    T_* dhp = dh.data_ptr<T_>();
    T_* dcp = dc.data_ptr<T_>();
    T_* dxp = dxz.data_ptr<T_>();
    T_* sp = scratch.data_ptr<T_>();
    const Vec<T_> one(T_(1));
    auto step = [&](int64_t b, int64_t t) {
      const int64_t bt = b * T + t;
      T_* d = dxp + bt * 4 * H;
      T_* s = sp + b * 4 * H;
      const T_* g = gp + bt * 4 * H;
      const T_* cp = csp + (t * B + b) * H;
      const T_* cn = csp + ((t + 1) * B + b) * H;
      const T_* gr = go.row<T_>(b, t);
      T_* hh = dhp + b * H;
      T_* cc = dcp + b * H;
      over_lanes<T_>(H, [&](int64_t j, int64_t n) {
        Vec<T_> i = load(g + j, n), f = load(g + H + j, n), gg = load(g + 2 * H + j, n), o = load(g + 3 * H + j, n);
        Vec<T_> dht = with_gout(hh, gr, j, n);
        Vec<T_> tc = tanh_(load(cn + j, n));
        Vec<T_> dct = load(cc + j, n) + dht * o * (one - tc * tc);
        Vec<T_> di = dct * gg * i * (one - i);
        Vec<T_> df = dct * load(cp + j, n) * f * (one - f);
        Vec<T_> dg = dct * i * (one - gg * gg);
        Vec<T_> dout = dht * tc * o * (one - o);
        di.store(d + j, n), df.store(d + H + j, n), dg.store(d + 2 * H + j, n), dout.store(d + 3 * H + j, n);
        di.store(s + j, n), df.store(s + H + j, n), dg.store(s + 2 * H + j, n), dout.store(s + 3 * H + j, n);
        (dct * f).store(cc + j, n);
      });
      std::fill(hh, hh + H, T_(0));  // h_t was computed, not carried: its gradient goes through the gates
    };
    auto padded = [&](int64_t b, int64_t t) {
      T_* d = dxp + (b * T + t) * 4 * H;
      std::fill(d, d + 4 * H, T_(0));
    };
    backward_in_time<T_>(T, B, 4 * H, ptr<bool>(mask), back, dh, scratch, step, padded);
  });
}

// ---------------------------------------------------------------------------------------------
// GRU in torch's convention: r, z = sigmoid(xz + h W_hh^T + b_hh), n = tanh(x_n + r * (h W_hn^T
// + b_hn)), h_t = n + z (h_{t-1} - n). Training: gates keeps r, z, n and hzn keeps h W_hn^T + b_hn.

void gru_forward(const Tensor& xz, const Tensor& w_t, const std::optional<Tensor>& packed,
                 const std::optional<Tensor>& bias, const Tensor& hs, const Tensor& out,
                 const std::optional<Tensor>& gates, const std::optional<Tensor>& hzn,
                 const std::optional<Tensor>& mask) {
  check_all("a GRU buffer", xz, hs, out);
  const int64_t B = xz.size(0), T = xz.size(1), H = hs.size(2);
  Recurrent rec{w_t, packed, bias, at::empty({B, 3 * H}, xz.options())};
  AT_DISPATCH_FLOATING_TYPES(xz.scalar_type(), "rnnkit_gru_forward", [&] {
    using T_ = scalar_t;
    const T_* xp = xz.data_ptr<T_>();
    T_* hsp = hs.data_ptr<T_>();
    T_* outp = out.data_ptr<T_>();
    T_* gp = ptr<T_>(gates);
    T_* kp = ptr<T_>(hzn);
    auto step = [&](int64_t b, int64_t t, const T_* hz) {
      const int64_t bt = b * T + t;
      const T_* x = xp + bt * 3 * H;
      T_* g = gp != nullptr ? gp + bt * 3 * H : nullptr;
      T_* keep = kp != nullptr ? kp + bt * H : nullptr;
      const T_* hp = hsp + (t * B + b) * H;
      T_* hn = hsp + ((t + 1) * B + b) * H;
      T_* o = outp + bt * H;
      over_lanes<T_>(H, [&](int64_t j, int64_t n) {
        Vec<T_> r = sigmoid(load(x + j, n) + load(hz + j, n));
        Vec<T_> z = sigmoid(load(x + H + j, n) + load(hz + H + j, n));
        Vec<T_> hzn_v = load(hz + 2 * H + j, n);
        Vec<T_> nn = tanh_(load(x + 2 * H + j, n) + r * hzn_v);
        if (g != nullptr) {
          r.store(g + j, n), z.store(g + H + j, n), nn.store(g + 2 * H + j, n), hzn_v.store(keep + j, n);
        }
        Vec<T_> h = nn + z * (load(hp + j, n) - nn);
        h.store(hn + j, n);
        h.store(o + j, n);
      });
    };
    auto padded = [&](int64_t b, int64_t t) {
      const T_* hp = hsp + (t * B + b) * H;
      T_* o = outp + (b * T + t) * H;
      std::copy(hp, hp + H, hsp + ((t + 1) * B + b) * H), std::fill(o, o + H, T_(0));
    };
    forward_in_time<T_>(T, B, 3 * H, ptr<bool>(mask), rec, hs, step, padded);
  });
}

// dxz: (B, T, 3H) out, the gradient of xz; dhn: (B, T, H) out, the n part of the gradient of
// h W_hh^T + b_hh (its r and z parts are dxz's); scratch (B, 3H).
void gru_backward(const Tensor& gates, const Tensor& hzn, const Tensor& hs, const std::optional<Tensor>& gout,
                  const Tensor& w_hh, const std::optional<Tensor>& packed, Tensor dh, const Tensor& dxz,
                  const Tensor& dhn, Tensor scratch, const std::optional<Tensor>& mask) {
  check_all("a GRU gradient buffer", gates, hzn, hs, dh, dxz, dhn, scratch);
  const int64_t B = gates.size(0), T = gates.size(1), H = dh.size(1);
  const Gout go(gout);
  Backward back(w_hh, packed, B);
  AT_DISPATCH_FLOATING_TYPES(gates.scalar_type(), "rnnkit_gru_backward", [&] {
    using T_ = scalar_t;
    const T_* gp = gates.data_ptr<T_>();
    const T_* kp = hzn.data_ptr<T_>();
    const T_* hsp = hs.data_ptr<T_>();
    T_* dhp = dh.data_ptr<T_>();
    T_* dxp = dxz.data_ptr<T_>();
    T_* dnp = dhn.data_ptr<T_>();
    T_* sp = scratch.data_ptr<T_>();
    const Vec<T_> one(T_(1));
    auto step = [&](int64_t b, int64_t t) {
      const int64_t bt = b * T + t;
      T_* dx = dxp + bt * 3 * H;
      T_* dnr_out = dnp + bt * H;
      T_* s = sp + b * 3 * H;
      const T_* g = gp + bt * 3 * H;
      const T_* k = kp + bt * H;
      const T_* hp = hsp + (t * B + b) * H;
      const T_* gr = go.row<T_>(b, t);
      T_* hh = dhp + b * H;
      over_lanes<T_>(H, [&](int64_t j, int64_t n) {
        Vec<T_> r = load(g + j, n), z = load(g + H + j, n), nn = load(g + 2 * H + j, n);
        Vec<T_> dht = with_gout(hh, gr, j, n);
        Vec<T_> dn = dht * (one - z) * (one - nn * nn);
        Vec<T_> dr = dn * load(k + j, n) * r * (one - r);
        Vec<T_> dzz = dht * (load(hp + j, n) - nn) * z * (one - z);
        Vec<T_> dnr = dn * r;
        dr.store(dx + j, n), dzz.store(dx + H + j, n), dn.store(dx + 2 * H + j, n);
        dnr.store(dnr_out + j, n);
        dr.store(s + j, n), dzz.store(s + H + j, n), dnr.store(s + 2 * H + j, n);
        (dht * z).store(hh + j, n);
      });
    };
    auto padded = [&](int64_t b, int64_t t) {
      const int64_t bt = b * T + t;
      std::fill(dxp + bt * 3 * H, dxp + (bt + 1) * 3 * H, T_(0)), std::fill(dnp + bt * H, dnp + (bt + 1) * H, T_(0));
    };
    backward_in_time<T_>(T, B, 3 * H, ptr<bool>(mask), back, dh, scratch, step, padded);
  });
}

// ---------------------------------------------------------------------------------------------
// Elman RNN: h_t = act(xz_t + h_{t-1} W_hh^T + b_hh), act tanh or relu.

template <typename T_>
inline Vec<T_> activate(const Vec<T_>& v, bool relu) {
  return relu ? at::vec::maximum(v, Vec<T_>(T_(0))) : tanh_(v);
}

void rnn_forward(const Tensor& xz, const Tensor& w_t, const std::optional<Tensor>& packed,
                 const std::optional<Tensor>& bias, const Tensor& hs, const Tensor& out,
                 const std::optional<Tensor>& mask, bool relu) {
  check_all("an RNN buffer", xz, hs, out);
  const int64_t B = xz.size(0), T = xz.size(1), H = hs.size(2);
  Recurrent rec{w_t, packed, bias, at::empty({B, H}, xz.options())};
  AT_DISPATCH_FLOATING_TYPES(xz.scalar_type(), "rnnkit_rnn_forward", [&] {
    using T_ = scalar_t;
    const T_* xp = xz.data_ptr<T_>();
    T_* hsp = hs.data_ptr<T_>();
    T_* outp = out.data_ptr<T_>();
    auto step = [&](int64_t b, int64_t t, const T_* r) {
      const int64_t bt = b * T + t;
      const T_* x = xp + bt * H;
      T_* hn = hsp + ((t + 1) * B + b) * H;
      T_* o = outp + bt * H;
      over_lanes<T_>(H, [&](int64_t j, int64_t n) {
        Vec<T_> h = activate(load(x + j, n) + load(r + j, n), relu);
        h.store(hn + j, n);
        h.store(o + j, n);
      });
    };
    auto padded = [&](int64_t b, int64_t t) {
      const T_* hp = hsp + (t * B + b) * H;
      T_* o = outp + (b * T + t) * H;
      std::copy(hp, hp + H, hsp + ((t + 1) * B + b) * H), std::fill(o, o + H, T_(0));
    };
    forward_in_time<T_>(T, B, H, ptr<bool>(mask), rec, hs, step, padded);
  });
}

// dxz: (B, T, H) out, the gradient of the pre-activation; scratch (B, H).
void rnn_backward(const Tensor& hs, const std::optional<Tensor>& gout, const Tensor& w_hh,
                  const std::optional<Tensor>& packed, Tensor dh, const Tensor& dxz, Tensor scratch,
                  const std::optional<Tensor>& mask, bool relu) {
  check_all("an RNN gradient buffer", hs, dh, dxz, scratch);
  const int64_t B = dxz.size(0), T = dxz.size(1), H = dh.size(1);
  const Gout go(gout);
  Backward back(w_hh, packed, B);
  AT_DISPATCH_FLOATING_TYPES(hs.scalar_type(), "rnnkit_rnn_backward", [&] {
    using T_ = scalar_t;
    const T_* hsp = hs.data_ptr<T_>();
    T_* dhp = dh.data_ptr<T_>();
    T_* dxp = dxz.data_ptr<T_>();
    T_* sp = scratch.data_ptr<T_>();
    const Vec<T_> one(T_(1)), zero(T_(0));
    auto step = [&](int64_t b, int64_t t) {
      const int64_t bt = b * T + t;
      T_* dx = dxp + bt * H;
      T_* s = sp + b * H;
      const T_* h = hsp + ((t + 1) * B + b) * H;
      const T_* gr = go.row<T_>(b, t);
      T_* hh = dhp + b * H;
      over_lanes<T_>(H, [&](int64_t j, int64_t n) {
        Vec<T_> hv = load(h + j, n);
        Vec<T_> slope = relu ? Vec<T_>::blendv(zero, one, hv > zero) : one - hv * hv;
        Vec<T_> d = with_gout(hh, gr, j, n) * slope;
        d.store(dx + j, n), d.store(s + j, n);
      });
      std::fill(hh, hh + H, T_(0));
    };
    auto padded = [&](int64_t b, int64_t t) {
      T_* dx = dxp + (b * T + t) * H;
      std::fill(dx, dx + H, T_(0));
    };
    backward_in_time<T_>(T, B, H, ptr<bool>(mask), back, dh, scratch, step, padded);
  });
}

// ---------------------------------------------------------------------------------------------
// y (B, N) = x (B, K) W^T + bias, W (N, K) row-major, one matvec per row: the lean stepping
// path's matmuls at batch 1 (core/step.py), where a BLAS call's fixed cost dominates.

Tensor linear_rows(const Tensor& W, const Tensor& x, const std::optional<Tensor>& bias) {
  check_all("a linear_rows operand", W, x);
  TORCH_CHECK(x.dim() == 2 && W.dim() == 2 && x.size(1) == W.size(1), "rnnkit native: linear_rows shapes");
  const int64_t B = x.size(0), N = W.size(0), K = W.size(1);
  TORCH_CHECK(!bias.has_value() || bias->numel() == N, "rnnkit native: linear_rows bias size");
  const std::optional<Tensor> b = bias.has_value() ? std::optional<Tensor>(bias->contiguous()) : std::nullopt;
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
  const std::optional<Tensor> b = bias.has_value() ? std::optional<Tensor>(bias->contiguous()) : std::nullopt;
  Tensor y = at::empty({B, M}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rnnkit_rows_times", [&] {
    for (int64_t row = 0; row < B; ++row) {
      vecmat<scalar_t>(x.data_ptr<scalar_t>() + row * K, A.data_ptr<scalar_t>(), ptr<scalar_t>(b),
                       y.data_ptr<scalar_t>() + row * M, K, M);
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(rnnkit_native, lib) {
  lib.def("linear_rows(Tensor W, Tensor x, Tensor? bias) -> Tensor", &linear_rows);
  lib.def("rows_times(Tensor x, Tensor A, Tensor? bias) -> Tensor", &rows_times);
  lib.def("lstm_forward(Tensor xz, Tensor w_t, Tensor? packed, Tensor? bias, Tensor(a!) hs, Tensor(b!) cs, "
          "Tensor(c!) out, Tensor(d!)? gates, Tensor? mask) -> ()", &lstm_forward);
  lib.def("lstm_backward(Tensor gates, Tensor cs, Tensor? gout, Tensor w_hh, Tensor? packed, Tensor(a!) dh, "
          "Tensor(b!) dc, Tensor(c!) dxz, Tensor(d!) scratch, Tensor? mask) -> ()", &lstm_backward);
  lib.def("gru_forward(Tensor xz, Tensor w_t, Tensor? packed, Tensor? bias, Tensor(a!) hs, Tensor(b!) out, "
          "Tensor(c!)? gates, Tensor(d!)? hzn, Tensor? mask) -> ()", &gru_forward);
  lib.def("gru_backward(Tensor gates, Tensor hzn, Tensor hs, Tensor? gout, Tensor w_hh, Tensor? packed, "
          "Tensor(a!) dh, Tensor(b!) dxz, Tensor(c!) dhn, Tensor(d!) scratch, Tensor? mask) -> ()", &gru_backward);
  lib.def("rnn_forward(Tensor xz, Tensor w_t, Tensor? packed, Tensor? bias, Tensor(a!) hs, Tensor(b!) out, "
          "Tensor? mask, bool relu) -> ()", &rnn_forward);
  lib.def("rnn_backward(Tensor hs, Tensor? gout, Tensor w_hh, Tensor? packed, Tensor(a!) dh, Tensor(b!) dxz, "
          "Tensor(c!) scratch, Tensor? mask, bool relu) -> ()", &rnn_backward);
}
