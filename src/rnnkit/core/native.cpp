// The built-in cells' loops over time (LSTM, GRU, RNN) on the CPU, in C++, and the ops they share.
//
// One op runs one direction of one layer over all time steps, forward or backward. Per step, one
// parallel pass over blocks of hidden units: each block's share of the recurrent matmul (rnnkit's
// own, below) and then its gate math, vectorized with ATen's own SIMD types. The backward op
// computes every gate derivative from the saved activations, so nothing is prepared in Python;
// the weight gradients are then one matmul over all steps (core/kernels/base.py). What a Python loop pays per
// step in interpreter and dispatch overhead (tens of microseconds) becomes about one microsecond.
// native.py compiles this file with pointwise.cpp (a user's compiled cell) and native.h (what both
// share) on first use, with OpenMP (torch's own thread pool); core/kernels/cpp_loops.py calls it.
//
// Layouts, shared with core/kernels/:
//   - per-step tensors are indexed (B, T, .) as the layer sees them: xz, gates, out, dxz, each
//     batch-major (contiguous) or time-major (a transposed view of a contiguous (T, B, .), what a
//     layer fed torch.nn's default (T, B, I) input runs on: no copies either way; `Rows`);
//     the states h_0..h_T (and c) are time-major (T+1, B, H), so h_{t-1} is a (B, H) matrix;
//     in inference the forward ops may keep only two, (2, B, H), h_t in row t % 2;
//   - gates are in torch's order (LSTM i, f, g, o; GRU r, z, n), activated;
//   - `mask` is (B, T) bool: at a step where it is false a sequence keeps its state, its output
//     is 0, and in backward the output's gradient there is ignored;
//   - backward: `dh`, `dc` come in holding the final state's gradient and leave holding the
//     initial state's; `gout` is the output gradient (B, T, H) with a contiguous last dimension.

#include "native.h"

namespace {

// ---------------------------------------------------------------------------------------------
// LSTM: i, f, o = sigmoid, g = tanh of xz_t + h_{t-1} W_hh^T + b_hh; c_t = f c_{t-1} + i g;
// h_t = o tanh(c_t). gates (training only): the activated i, f, g, o, kept for backward.

// forward_in_time's padded step for the state h (B rows of H, rows now and next of hsp): row b keeps
// its h_{t-1}, and its output at step t is 0. The LSTM carries c the same way.
template <typename T_>
auto carry_h(T_* hsp, T_* outp, int64_t B, Rows o, int64_t H) {
  return [=](int64_t b, int64_t t, int64_t now, int64_t next, int64_t j, int64_t n) {
    load(hsp + (now * B + b) * H + j, n).store(hsp + (next * B + b) * H + j, n);
    Vec<T_>(T_(0)).store(outp + o(b, t) + j, n);
  };
}

template <typename T_>
auto carry_h(T_* hsp, T_* outp, int64_t B, int64_t T, int64_t H) {  // out batch-major (B, T, H)
  return carry_h<T_>(hsp, outp, B, Rows(T * H, H), H);
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
               const StepInputs<T_>& inputs, const Noise<T_>& noise = {}) {
  const int64_t B = xz.size(0), T = xz.size(1), H = hs.size(2), S = hs.size(0);
  const Blocked<T_> rec(packed, 4, H, bias);
  const T_* xp = inputs.blocks != nullptr ? nullptr : xz.data_ptr<T_>();
  T_* hsp = hs.data_ptr<T_>();
  T_* csp = cs.data_ptr<T_>();
  T_* outp = out.data_ptr<T_>();
  T_* gp = ptr<T_>(gates);
  const Rows xr(xz), orow(out), gr = gates.has_value() ? Rows(*gates) : Rows();
  auto step = [&](int64_t b, int64_t t, int64_t now, int64_t next, const T_* r, int64_t j, int64_t n) {
    lstm_cell<T_>(xp != nullptr ? xp + xr(b, t) : nullptr, r, csp + (now * B + b) * H, csp + (next * B + b) * H,
                  hsp + (next * B + b) * H, outp + orow(b, t), gp != nullptr ? gp + gr(b, t) : nullptr, H, j, n);
  };
  const auto carry = carry_h<T_>(hsp, outp, B, orow, H);
  auto padded = [&](int64_t b, int64_t t, int64_t now, int64_t next, int64_t j, int64_t n) {
    carry(b, t, now, next, j, n);
    load(csp + (now * B + b) * H + j, n).store(csp + (next * B + b) * H + j, n);
  };
  forward_in_time<T_>(T, S, B, ptr<bool>(mask), rec, hsp, step, padded, inputs, noise);
}

// r, hd, keep: recurrent dropout and zoneout (Noise, native.h), or none
void lstm_forward_noisy(const Tensor& xz, const Tensor& packed, const std::optional<Tensor>& bias, const Tensor& hs,
                  const Tensor& cs, const Tensor& out, const std::optional<Tensor>& gates,
                  const std::optional<Tensor>& mask, const std::optional<Tensor>& r, const std::optional<Tensor>& hd,
                  const std::optional<Tensor>& keep) {
  check_all_rows("an LSTM buffer", xz, out);
  check_all("an LSTM buffer", hs, cs);
  if (gates.has_value()) check_rows(*gates, "gates");
  const int64_t T = xz.size(1), H = hs.size(2), S = hs.size(0);
  TORCH_CHECK(S == T + 1 || (S == 2 && !gates.has_value()), "rnnkit native: lstm_forward keeps T + 1 states (or 2, in inference)");
  check_recurrent(xz, packed, 4, H);
  AT_DISPATCH_FLOATING_TYPES(xz.scalar_type(), "rnnkit_lstm_forward", [&] {
    lstm_loop<scalar_t>(xz, packed, bias, hs, cs, out, gates, mask, {}, noise_from<scalar_t>(r, hd, keep, {&hs, &cs}, out));
  });
}

// Inference with the input projection inside the loop: x (B, T, I) and packed_ih = pack_linear(W_ih, 4).
// Each step's block stores x_t W_ih^T + b_ih into its columns of hz and the recurrent product adds
// h_{t-1} W_hh^T + b_hh to them, so no (B, T, 4H) projection is written and read back (measured
// against projecting first, then the loop: 1.03-1.27x at batch 1-64, H 128 and 512).
void lstm_forward_projecting(const Tensor& x, const Tensor& packed_ih, const std::optional<Tensor>& bias_ih,
                             const Tensor& packed, const std::optional<Tensor>& bias, const Tensor& hs, const Tensor& cs,
                             const Tensor& out, const std::optional<Tensor>& mask) {
  check_all_rows("an LSTM buffer", x, out);
  check_all("an LSTM buffer", hs, cs);
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
    lstm_loop<T_>(x, packed, bias, hs, cs, out, std::nullopt, mask, {&inputs, x.data_ptr<T_>(), I, Rows(x)});
  });
}

// dxz: (B, T, 4H) out, the gradient of xz (and of the recurrent pre-activation).
// r, keep: the forward's recurrent dropout and zoneout masks, or none
void lstm_backward_noisy(const Tensor& gates, const Tensor& cs, const std::optional<Tensor>& gout, const Tensor& w_hh,
                   const Tensor& dh, const Tensor& dc, const Tensor& dxz, const std::optional<Tensor>& mask,
                   const std::optional<Tensor>& r, const std::optional<Tensor>& keep) {
  check_all_rows("an LSTM gradient buffer", gates, dxz);
  check_all("an LSTM gradient buffer", cs, dh, dc);
  const int64_t B = gates.size(0), T = gates.size(1), H = dh.size(1);
  const Rows gr(gates), dr(dxz);
  const Gout go(gout);
  AT_DISPATCH_FLOATING_TYPES(gates.scalar_type(), "rnnkit_lstm_backward", [&] {
    using T_ = scalar_t;
    const Blocked<T_> back(w_hh.t(), 1, std::nullopt);
    const T_* gp = gates.data_ptr<T_>();
    const T_* csp = cs.data_ptr<T_>();
    const T_* rp = backward_noise<T_>(r, keep, B, T, H);
    const T_* kp = ptr<T_>(keep);
    T_* dhp = dh.data_ptr<T_>();
    T_* dcp = dc.data_ptr<T_>();
    T_* dxp = dxz.data_ptr<T_>();
    const Vec<T_> one(T_(1));
    auto step = [&](int64_t b, int64_t t, T_* s, int64_t j, int64_t n) {
      T_* d = dxp + dr(b, t);
      const T_* g = gp + gr(b, t);
      T_* hh = dhp + b * H;
      T_* cc = dcp + b * H;
      Vec<T_> i = load(g + j, n), f = load(g + H + j, n), gg = load(g + 2 * H + j, n), o = load(g + 3 * H + j, n);
      const Vec<T_> dh_all = with_gout(hh, go.row<T_>(b, t), j, n), dc_all = load(cc + j, n);
      const Zone<T_> zone(kp, (b * T + t) * H + j, n);  // zoneout: the kept units' gradients pass to step t-1
      Vec<T_> dht = zone.fresh(dh_all);
      Vec<T_> tc = tanh_(load(csp + ((t + 1) * B + b) * H + j, n));
      Vec<T_> dct = zone.fresh(dc_all) + dht * o * (one - tc * tc);
      Vec<T_> di = dct * gg * i * (one - i);
      Vec<T_> df = dct * load(csp + (t * B + b) * H + j, n) * f * (one - f);
      Vec<T_> dg = dct * i * (one - gg * gg);
      Vec<T_> dout = dht * tc * o * (one - o);
      di.store(d + j, n), df.store(d + H + j, n), dg.store(d + 2 * H + j, n), dout.store(d + 3 * H + j, n);
      di.store(s + j, n), df.store(s + H + j, n), dg.store(s + 2 * H + j, n), dout.store(s + 3 * H + j, n);
      zone.prev(dct * f, dc_all).store(cc + j, n);
      zone.prev(Vec<T_>(T_(0)), dh_all).store(hh + j, n);  // h_t computed, not carried: its gradient goes through the gates
    };
    auto padded = [&](int64_t b, int64_t t, int64_t j, int64_t n) {
      T_* d = dxp + dr(b, t);
      for (int64_t g = 0; g < 4; ++g) Vec<T_>(T_(0)).store(d + g * H + j, n);
    };
    backward_in_time<T_>(T, B, 4, ptr<bool>(mask), back, dhp, step, padded, rp);
  });
}

// ---------------------------------------------------------------------------------------------
// GRU in torch's convention: r, z = sigmoid(xz + h W_hh^T + b_hh), n = tanh(x_n + r * (h W_hn^T
// + b_hn)), h_t = n + z (h_{t-1} - n). Training: gates keeps r, z, n and hzn keeps h W_hn^T + b_hn.

void gru_forward_noisy(const Tensor& xz, const Tensor& packed, const std::optional<Tensor>& bias, const Tensor& hs,
                 const Tensor& out, const std::optional<Tensor>& gates, const std::optional<Tensor>& hzn,
                 const std::optional<Tensor>& mask, const std::optional<Tensor>& r, const std::optional<Tensor>& hd,
                 const std::optional<Tensor>& keep) {
  check_all_rows("a GRU buffer", xz, out);
  check(hs, "a GRU buffer");
  if (gates.has_value()) check_rows(*gates, "gates");
  if (hzn.has_value()) check_rows(*hzn, "hzn");
  const int64_t B = xz.size(0), T = xz.size(1), H = hs.size(2), S = hs.size(0);
  const Rows xr(xz), orow(out), gr = gates.has_value() ? Rows(*gates) : Rows(), kr = hzn.has_value() ? Rows(*hzn) : Rows();
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
      const T_* x = xp + xr(b, t);
      Vec<T_> r = sigmoid(load(x + j, n) + load(hz + j, n));
      Vec<T_> z = sigmoid(load(x + H + j, n) + load(hz + H + j, n));
      Vec<T_> hzn_v = load(hz + 2 * H + j, n);
      Vec<T_> nn = tanh_(load(x + 2 * H + j, n) + r * hzn_v);
      if (gp != nullptr) {
        T_* g = gp + gr(b, t);
        r.store(g + j, n), z.store(g + H + j, n), nn.store(g + 2 * H + j, n), hzn_v.store(kp + kr(b, t) + j, n);
      }
      Vec<T_> h = nn + z * (load(hsp + (now * B + b) * H + j, n) - nn);
      h.store(hsp + (next * B + b) * H + j, n);
      h.store(outp + orow(b, t) + j, n);
    };
    forward_in_time<T_>(T, S, B, ptr<bool>(mask), rec, hsp, step, carry_h<T_>(hsp, outp, B, orow, H), {},
                        noise_from<T_>(r, hd, keep, {&hs}, out));
  });
}

// dxz: (B, T, 3H) out, the gradient of xz; dhn: (B, T, H) out, the n part of the gradient of
// h W_hh^T + b_hh (its r and z parts are dxz's).
void gru_backward_noisy(const Tensor& gates, const Tensor& hzn, const Tensor& hs, const std::optional<Tensor>& gout,
                  const Tensor& w_hh, const Tensor& dh, const Tensor& dxz, const Tensor& dhn,
                  const std::optional<Tensor>& mask, const std::optional<Tensor>& r, const std::optional<Tensor>& keep) {
  check_all_rows("a GRU gradient buffer", gates, hzn, dxz, dhn);
  check_all("a GRU gradient buffer", hs, dh);
  const int64_t B = gates.size(0), T = gates.size(1), H = dh.size(1);
  const Rows gr(gates), kr(hzn), dr(dxz), nr(dhn);
  const Gout go(gout);
  AT_DISPATCH_FLOATING_TYPES(gates.scalar_type(), "rnnkit_gru_backward", [&] {
    using T_ = scalar_t;
    const Blocked<T_> back(w_hh.t(), 1, std::nullopt);
    const T_* gp = gates.data_ptr<T_>();
    const T_* kp = hzn.data_ptr<T_>();
    const T_* rp = backward_noise<T_>(r, keep, B, T, H);
    const T_* zp = ptr<T_>(keep);
    const T_* hsp = hs.data_ptr<T_>();
    T_* dhp = dh.data_ptr<T_>();
    T_* dxp = dxz.data_ptr<T_>();
    T_* dnp = dhn.data_ptr<T_>();
    const Vec<T_> one(T_(1));
    auto step = [&](int64_t b, int64_t t, T_* s, int64_t j, int64_t n) {
      T_* dx = dxp + dr(b, t);
      const T_* g = gp + gr(b, t);
      T_* hh = dhp + b * H;
      Vec<T_> r = load(g + j, n), z = load(g + H + j, n), nn = load(g + 2 * H + j, n);
      const Vec<T_> dh_all = with_gout(hh, go.row<T_>(b, t), j, n);
      const Zone<T_> zone(zp, (b * T + t) * H + j, n);  // zoneout: the kept units' gradients pass to step t-1
      Vec<T_> dht = zone.fresh(dh_all);
      Vec<T_> dn = dht * (one - z) * (one - nn * nn);
      Vec<T_> dr = dn * load(kp + kr(b, t) + j, n) * r * (one - r);
      Vec<T_> dzz = dht * (load(hsp + (t * B + b) * H + j, n) - nn) * z * (one - z);
      Vec<T_> dnr = dn * r;
      dr.store(dx + j, n), dzz.store(dx + H + j, n), dn.store(dx + 2 * H + j, n);
      dnr.store(dnp + nr(b, t) + j, n);
      dr.store(s + j, n), dzz.store(s + H + j, n), dnr.store(s + 2 * H + j, n);
      zone.prev(dht * z, dh_all).store(hh + j, n);
    };
    auto padded = [&](int64_t b, int64_t t, int64_t j, int64_t n) {
      for (int64_t g = 0; g < 3; ++g) Vec<T_>(T_(0)).store(dxp + dr(b, t) + g * H + j, n);
      Vec<T_>(T_(0)).store(dnp + nr(b, t) + j, n);
    };
    backward_in_time<T_>(T, B, 3, ptr<bool>(mask), back, dhp, step, padded, rp);
  });
}

// ---------------------------------------------------------------------------------------------
// Elman RNN: h_t = act(xz_t + h_{t-1} W_hh^T + b_hh), act tanh or relu.

template <typename T_>
inline Vec<T_> activate(const Vec<T_>& v, bool relu) {
  return relu ? at::vec::maximum(v, Vec<T_>(T_(0))) : tanh_(v);
}

void rnn_forward_noisy(const Tensor& xz, const Tensor& packed, const std::optional<Tensor>& bias, const Tensor& hs,
                 const Tensor& out, const std::optional<Tensor>& mask, bool relu, const std::optional<Tensor>& r,
                 const std::optional<Tensor>& hd, const std::optional<Tensor>& keep) {
  check_all_rows("an RNN buffer", xz, out);
  check(hs, "an RNN buffer");
  const int64_t B = xz.size(0), T = xz.size(1), H = hs.size(2), S = hs.size(0);
  const Rows xr(xz), orow(out);
  TORCH_CHECK(S == T + 1 || S == 2, "rnnkit native: rnn_forward keeps T + 1 states (or 2, in inference)");
  check_recurrent(xz, packed, 1, H);
  AT_DISPATCH_FLOATING_TYPES(xz.scalar_type(), "rnnkit_rnn_forward", [&] {
    using T_ = scalar_t;
    const Blocked<T_> rec(packed, 1, H, bias);
    const T_* xp = xz.data_ptr<T_>();
    T_* hsp = hs.data_ptr<T_>();
    T_* outp = out.data_ptr<T_>();
    auto step = [&](int64_t b, int64_t t, int64_t /*now*/, int64_t next, const T_* r, int64_t j, int64_t n) {
      Vec<T_> h = activate(load(xp + xr(b, t) + j, n) + load(r + j, n), relu);
      h.store(hsp + (next * B + b) * H + j, n);
      h.store(outp + orow(b, t) + j, n);
    };
    forward_in_time<T_>(T, S, B, ptr<bool>(mask), rec, hsp, step, carry_h<T_>(hsp, outp, B, orow, H), {},
                        noise_from<T_>(r, hd, keep, {&hs}, out));
  });
}

// dxz: (B, T, H) out, the gradient of the pre-activation.
void rnn_backward_noisy(const Tensor& hs, const std::optional<Tensor>& gout, const Tensor& w_hh, const Tensor& dh,
                  const Tensor& dxz, const std::optional<Tensor>& mask, bool relu, const std::optional<Tensor>& r,
                  const std::optional<Tensor>& keep) {
  check_rows(dxz, "an RNN gradient buffer");
  check_all("an RNN gradient buffer", hs, dh);
  const int64_t B = dxz.size(0), T = dxz.size(1), H = dh.size(1);
  const Rows dr(dxz);
  const Gout go(gout);
  AT_DISPATCH_FLOATING_TYPES(hs.scalar_type(), "rnnkit_rnn_backward", [&] {
    using T_ = scalar_t;
    const Blocked<T_> back(w_hh.t(), 1, std::nullopt);
    const T_* hsp = hs.data_ptr<T_>();
    T_* dhp = dh.data_ptr<T_>();
    T_* dxp = dxz.data_ptr<T_>();
    const Vec<T_> one(T_(1)), zero(T_(0));
    const T_* rp = backward_noise<T_>(r, keep, B, T, H);
    const T_* zp = ptr<T_>(keep);
    auto step = [&](int64_t b, int64_t t, T_* s, int64_t j, int64_t n) {
      T_* hh = dhp + b * H;
      Vec<T_> hv = load(hsp + ((t + 1) * B + b) * H + j, n);
      Vec<T_> slope = relu ? Vec<T_>::blendv(zero, one, hv > zero) : one - hv * hv;
      const Vec<T_> dh_all = with_gout(hh, go.row<T_>(b, t), j, n);
      const Zone<T_> zone(zp, (b * T + t) * H + j, n);  // zoneout: the kept units' gradients pass to step t-1
      Vec<T_> d = zone.fresh(dh_all) * slope;
      d.store(dxp + dr(b, t) + j, n), d.store(s + j, n);
      zone.prev(zero, dh_all).store(hh + j, n);
    };
    auto padded = [&](int64_t b, int64_t t, int64_t j, int64_t n) {
      Vec<T_>(T_(0)).store(dxp + dr(b, t) + j, n);
    };
    backward_in_time<T_>(T, B, 1, ptr<bool>(mask), back, dhp, step, padded, rp);
  });
}

// ---------------------------------------------------------------------------------------------
// sLSTM (core/cells/slstm.py), gates i, f, z, o: a = xz_t + R h_{t-1} + b_hh with R block-diagonal over
// heads of D units (weight_hh (4H, D) holds the blocks); m' = max(a_i, logsigmoid(a_f) + m), or a_i
// where n = 0; i = exp(a_i - m'), f = exp(logsigmoid(a_f) + m - m'); c' = f c + i tanh(a_z);
// n' = f n + i; h' = sigmoid(a_o) c' / n'. Training: gates keeps the pre-activations a, and backward
// recomputes the activations from them and the states.

template <typename T_>
inline Vec<T_> logsigmoid_(const Vec<T_>& v) {  // min(v, 0) - log1p(exp(-|v|)), finite everywhere
  return at::vec::minimum(v, Vec<T_>(T_(0))) - exp_(Vec<T_>(T_(0)) - v.abs()).log1p();
}

// The recurrent product of the sLSTM forward: the diagonal blocks packed for 4 gates (K = D) where D is
// a multiple of the SIMD width; else R written out dense (zeros off the blocks) and packed as the LSTM's.
template <typename T_>
Heads<T_> slstm_recurrent(const Tensor& w_hh, const std::optional<Tensor>& bias, int64_t H) {
  const int64_t D = w_hh.size(1), heads = H / D;
  if (D % Vec<T_>::size() == 0) return Heads<T_>({Blocked<T_>(w_hh.contiguous(), 4, bias)}, {0}, D);
  const Tensor dense = at::einsum("gkij,kl->gkilj", {w_hh.reshape({4, heads, D, D}), at::eye(heads, w_hh.options())});
  return Heads<T_>({Blocked<T_>(dense.reshape({4 * H, H}), 4, bias)}, {0}, 0);
}

// The backward's dh += dz R: per gate g, the blocks transposed (H, D), reading dz's columns g H + head D
// on; or R written out dense and transposed (K = 4H).
template <typename T_>
Heads<T_> slstm_recurrent_back(const Tensor& w_hh, int64_t H) {
  const int64_t D = w_hh.size(1), heads = H / D;
  const Tensor blocks = w_hh.reshape({4, heads, D, D});  // [g, head, i (output unit), j (input unit)]
  if (D % Vec<T_>::size() == 0) {
    std::vector<Blocked<T_>> parts;
    for (int64_t g = 0; g < 4; ++g) parts.emplace_back(blocks.select(0, g).transpose(1, 2).reshape({H, D}), 1, std::nullopt);
    return Heads<T_>(std::move(parts), {0, H, 2 * H, 3 * H}, D);
  }
  const Tensor dense = at::einsum("gkij,kl->gkilj", {blocks, at::eye(heads, w_hh.options())}).reshape({4 * H, H});
  return Heads<T_>({Blocked<T_>(dense.t(), 1, std::nullopt)}, {0}, 0);
}

void check_slstm(const Tensor& w_hh, int64_t H) {
  TORCH_CHECK(w_hh.dim() == 2 && w_hh.size(0) == 4 * H && w_hh.size(1) >= 1 && H % w_hh.size(1) == 0 && w_hh.device().is_cpu(),
              "rnnkit native: the sLSTM's weight_hh is (4H, H / heads), on the CPU");
}

void slstm_forward_noisy(const Tensor& xz, const Tensor& w_hh, const std::optional<Tensor>& bias, const Tensor& hs,
                   const Tensor& cs, const Tensor& ns, const Tensor& ms, const Tensor& out,
                   const std::optional<Tensor>& gates, const std::optional<Tensor>& mask, const std::optional<Tensor>& r,
                   const std::optional<Tensor>& hd, const std::optional<Tensor>& keep) {
  check_all("an sLSTM buffer", xz, hs, cs, ns, ms, out);
  if (gates.has_value()) check(*gates, "gates");
  const int64_t B = xz.size(0), T = xz.size(1), H = hs.size(2), S = hs.size(0);
  TORCH_CHECK(S == T + 1 || (S == 2 && !gates.has_value()), "rnnkit native: slstm_forward keeps T + 1 states (or 2, in inference)");
  TORCH_CHECK(xz.dim() == 3 && xz.size(2) == 4 * H && cs.sizes() == hs.sizes() && ns.sizes() == hs.sizes() &&
              ms.sizes() == hs.sizes() && w_hh.scalar_type() == xz.scalar_type(),
              "rnnkit native: slstm_forward: xz (B, T, 4H), the states (S, B, H), the weight of xz's dtype");
  check_slstm(w_hh, H);
  TORCH_CHECK(!mask.has_value() || (mask->scalar_type() == at::kBool && mask->sizes() == at::IntArrayRef({B, T}) &&
                                    mask->is_contiguous()), "rnnkit native: slstm_forward: mask (B, T) bool");
  AT_DISPATCH_FLOATING_TYPES(xz.scalar_type(), "rnnkit_slstm_forward", [&] {
    using T_ = scalar_t;
    const Heads<T_> rec = slstm_recurrent<T_>(w_hh, bias, H);
    const T_* xp = xz.data_ptr<T_>();
    T_* hsp = hs.data_ptr<T_>();
    T_* csp = cs.data_ptr<T_>();
    T_* nsp = ns.data_ptr<T_>();
    T_* msp = ms.data_ptr<T_>();
    T_* outp = out.data_ptr<T_>();
    T_* gp = ptr<T_>(gates);
    const Vec<T_> zero(T_(0));
    auto step = [&](int64_t b, int64_t t, int64_t now, int64_t next, const T_* r, int64_t j, int64_t n) {
      const int64_t bt = b * T + t, p = (now * B + b) * H + j, q = (next * B + b) * H + j;
      const T_* x = xp + bt * 4 * H;
      Vec<T_> ai = load(x + j, n) + load(r + j, n), af = load(x + H + j, n) + load(r + H + j, n);
      Vec<T_> az = load(x + 2 * H + j, n) + load(r + 2 * H + j, n), ao = load(x + 3 * H + j, n) + load(r + 3 * H + j, n);
      if (gp != nullptr) {
        T_* g = gp + bt * 4 * H;
        ai.store(g + j, n), af.store(g + H + j, n), az.store(g + 2 * H + j, n), ao.store(g + 3 * H + j, n);
      }
      const Vec<T_> c0 = load(csp + p, n), n0 = load(nsp + p, n);
      const Vec<T_> lf = logsigmoid_(af) + load(msp + p, n);
      const Vec<T_> m = Vec<T_>::blendv(at::vec::maximum(ai, lf), ai, n0 == zero);
      const Vec<T_> ig = exp_(ai - m), fg = exp_(lf - m);
      const Vec<T_> c = fg * c0 + ig * tanh_(az), nn = fg * n0 + ig;
      const Vec<T_> h = sigmoid(ao) * c / nn;
      c.store(csp + q, n), nn.store(nsp + q, n), m.store(msp + q, n);
      h.store(hsp + q, n), h.store(outp + bt * H + j, n);
    };
    const auto carry = carry_h<T_>(hsp, outp, B, T, H);
    auto padded = [&](int64_t b, int64_t t, int64_t now, int64_t next, int64_t j, int64_t n) {
      carry(b, t, now, next, j, n);
      const int64_t p = (now * B + b) * H + j, q = (next * B + b) * H + j;
      for (T_* s : {csp, nsp, msp}) load(s + p, n).store(s + q, n);
    };
    forward_in_time<T_>(T, S, B, ptr<bool>(mask), rec, hsp, step, padded, {},
                        noise_from<T_>(r, hd, keep, {&hs, &cs, &ns, &ms}, out));
  });
}

// gates: the forward's pre-activations (B, T, 4H); dh, dc, dn, dm: the final state's gradients in, the
// initial state's out; dxz (B, T, 4H) out, the gradient of xz (and of R h + b_hh).
void slstm_backward_noisy(const Tensor& gates, const Tensor& cs, const Tensor& ns, const Tensor& ms,
                    const std::optional<Tensor>& gout, const Tensor& w_hh, const Tensor& dh, const Tensor& dc,
                    const Tensor& dn, const Tensor& dm, const Tensor& dxz, const std::optional<Tensor>& mask,
                    const std::optional<Tensor>& r, const std::optional<Tensor>& keep) {
  check_all("an sLSTM gradient buffer", gates, cs, ns, ms, dh, dc, dn, dm, dxz);
  const int64_t B = gates.size(0), T = gates.size(1), H = dh.size(1);
  TORCH_CHECK(gates.dim() == 3 && gates.size(2) == 4 * H && dxz.sizes() == gates.sizes() && cs.dim() == 3 &&
              cs.size(0) == T + 1 && cs.size(1) == B && cs.size(2) == H && ns.sizes() == cs.sizes() &&
              ms.sizes() == cs.sizes() && dc.sizes() == dh.sizes() && dn.sizes() == dh.sizes() &&
              dm.sizes() == dh.sizes() && dh.size(0) == B && w_hh.scalar_type() == gates.scalar_type(),
              "rnnkit native: slstm_backward: gates and dxz (B, T, 4H), the states (T + 1, B, H), their gradients (B, H)");
  check_slstm(w_hh, H);
  TORCH_CHECK(!mask.has_value() || (mask->scalar_type() == at::kBool && mask->sizes() == at::IntArrayRef({B, T}) &&
                                    mask->is_contiguous()), "rnnkit native: slstm_backward: mask (B, T) bool");
  const Gout go(gout);
  AT_DISPATCH_FLOATING_TYPES(gates.scalar_type(), "rnnkit_slstm_backward", [&] {
    using T_ = scalar_t;
    const Heads<T_> back = slstm_recurrent_back<T_>(w_hh, H);
    const T_* gp = gates.data_ptr<T_>();
    const T_* csp = cs.data_ptr<T_>();
    const T_* nsp = ns.data_ptr<T_>();
    const T_* msp = ms.data_ptr<T_>();
    T_* dhp = dh.data_ptr<T_>();
    T_* dcp = dc.data_ptr<T_>();
    T_* dnp = dn.data_ptr<T_>();
    T_* dmp = dm.data_ptr<T_>();
    T_* dxp = dxz.data_ptr<T_>();
    const Vec<T_> one(T_(1)), zero(T_(0)), half(T_(0.5));
    const T_* rp = backward_noise<T_>(r, keep, B, T, H);
    const T_* zp = ptr<T_>(keep);
    auto step = [&](int64_t b, int64_t t, T_* s, int64_t j, int64_t n) {
      const int64_t bt = b * T + t, p = (t * B + b) * H + j, q = ((t + 1) * B + b) * H + j, r = b * H + j;
      const T_* a = gp + bt * 4 * H;
      const Vec<T_> ai = load(a + j, n), af = load(a + H + j, n), az = load(a + 2 * H + j, n), ao = load(a + 3 * H + j, n);
      const Vec<T_> c0 = load(csp + p, n), n0 = load(nsp + p, n), c1 = load(csp + q, n), n1 = load(nsp + q, n);
      const Vec<T_> m1 = load(msp + q, n);
      const Vec<T_> lf = logsigmoid_(af) + load(msp + p, n);
      // the share of m's gradient that goes to a_i (torch.maximum's: half each at a tie), the rest to lf
      Vec<T_> to_i = Vec<T_>::blendv(Vec<T_>::blendv(zero, half, ai == lf), one, ai > lf);
      to_i = Vec<T_>::blendv(to_i, one, n0 == zero);
      const Vec<T_> ig = exp_(ai - m1), fg = exp_(lf - m1), zg = tanh_(az), og = sigmoid(ao);
      const Vec<T_> dh_all = with_gout(dhp + b * H, go.row<T_>(b, t), j, n);
      const Vec<T_> dc_all = load(dcp + r, n), dn_all = load(dnp + r, n), dm_all = load(dmp + r, n);
      const Zone<T_> zone(zp, (b * T + t) * H + j, n);  // zoneout: the kept units' gradients pass to step t-1
      const Vec<T_> dht = zone.fresh(dh_all);
      const Vec<T_> inv = one / n1;
      const Vec<T_> dct = zone.fresh(dc_all) + dht * og * inv;
      const Vec<T_> dnt = zone.fresh(dn_all) - dht * og * c1 * inv * inv;
      const Vec<T_> dao_ = dht * c1 * inv * og * (one - og);
      const Vec<T_> gi = (dct * zg + dnt) * ig;  // the gradient of a_i - m'
      const Vec<T_> gf = (dct * c0 + dnt * n0) * fg;  // of lf - m'
      const Vec<T_> daz_ = dct * ig * (one - zg * zg);
      const Vec<T_> dmt = zone.fresh(dm_all) - gi - gf;
      // a kept unit's recomputed gates may overflow (its m is the previous step's): selected away
      const Vec<T_> dai = zone.fresh(gi + to_i * dmt), daz = zone.fresh(daz_);
      const Vec<T_> dlf = zone.fresh(gf + (one - to_i) * dmt), dao = zone.fresh(dao_);
      const Vec<T_> daf = dlf * sigmoid(zero - af);
      T_* d = dxp + bt * 4 * H;
      dai.store(d + j, n), daf.store(d + H + j, n), daz.store(d + 2 * H + j, n), dao.store(d + 3 * H + j, n);
      dai.store(s + j, n), daf.store(s + H + j, n), daz.store(s + 2 * H + j, n), dao.store(s + 3 * H + j, n);
      zone.prev(dct * fg, dc_all).store(dcp + r, n), zone.prev(dnt * fg, dn_all).store(dnp + r, n);
      zone.prev(dlf, dm_all).store(dmp + r, n);
      zone.prev(zero, dh_all).store(dhp + r, n);  // h_t computed, not carried: its gradient goes through the gates
    };
    auto padded = [&](int64_t b, int64_t t, int64_t j, int64_t n) {
      T_* d = dxp + (b * T + t) * 4 * H;
      for (int64_t g = 0; g < 4; ++g) zero.store(d + g * H + j, n);
    };
    backward_in_time<T_>(T, B, 4, ptr<bool>(mask), back, dhp, step, padded, rp);
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

}  // namespace

// An uninitialised CPU tensor of this shape and dtype in a workspace block.
at::Tensor rnnkit::workspace(at::IntArrayRef size, at::ScalarType dtype) {
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

namespace {

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

// One step's two products x W_ih^T + b_ih (zx) and h W_hh^T + b_hh (zh), (B, G*H) each, on the
// weights as stored: at batch 1 the matrix-vector kernel (zh added into zx where `sum`), else
// torch's matmul (BLAS), whose fixed cost is then small against the product.
template <typename T>
void step_products(const Tensor& x, const Tensor& h, const Tensor& w_ih, const std::optional<Tensor>& bi,
                   const Tensor& w_hh, const std::optional<Tensor>& bh, Tensor zx, Tensor zh, bool sum) {
  const int64_t B = zx.size(0), N = zx.size(1), I = w_ih.size(1), H = w_hh.size(1);
  if (B == 1) {
    matvec<T>(w_ih.data_ptr<T>(), x.data_ptr<T>(), ptr<T>(bi), zx.data_ptr<T>(), N, I);
    if (sum) matvec<T>(w_hh.data_ptr<T>(), h.data_ptr<T>(), zx.data_ptr<T>(), zx.data_ptr<T>(), N, H);
    else matvec<T>(w_hh.data_ptr<T>(), h.data_ptr<T>(), ptr<T>(bh), zh.data_ptr<T>(), N, H);
    return;
  }
  const Tensor x2 = x.view({B, I}), h2 = h.view({B, H});
  if (bi.has_value()) at::addmm_out(zx, *bi, x2, w_ih.t());
  else at::mm_out(zx, x2, w_ih.t());
  if (sum) {
    zx.addmm_(h2, w_hh.t());
  } else if (bh.has_value()) {
    at::addmm_out(zh, *bh, h2, w_hh.t());
  } else {
    at::mm_out(zh, h2, w_hh.t());
  }
}

void check_step_rows(const char* name, int64_t G, const Tensor& x, const Tensor& w_ih, const std::optional<Tensor>& b_ih,
                     const Tensor& w_hh, const std::optional<Tensor>& b_hh, std::initializer_list<const Tensor*> states) {
  check_all(name, x, w_ih, w_hh);
  TORCH_CHECK(w_ih.dim() == 2 && w_hh.dim() == 2 && w_hh.size(0) == G * w_hh.size(1) && w_ih.size(0) == w_hh.size(0),
              "rnnkit native: ", name, ": W_ih (G*H, I) and W_hh (G*H, H)");
  const int64_t I = w_ih.size(1), H = w_hh.size(1);
  TORCH_CHECK(x.numel() % I == 0 && x.numel() > 0, "rnnkit native: ", name, ": x holds B rows of I");
  const int64_t B = x.numel() / I;
  for (const Tensor* t : states) {
    check(*t, name);
    TORCH_CHECK(t->numel() == B * H, "rnnkit native: ", name, ": each state holds B rows of H, as x holds rows of I");
  }
  for (const Tensor* t : {&w_ih, &w_hh}) {
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), "rnnkit native: ", name, ": every operand of x's dtype");
  }
  for (const Tensor* t : states) {
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), "rnnkit native: ", name, ": every operand of x's dtype");
  }
  for (const auto* b : {&b_ih, &b_hh}) {
    TORCH_CHECK(!b->has_value() || ((*b)->numel() == G * H && (*b)->scalar_type() == x.scalar_type() && (*b)->device().is_cpu()),
                "rnnkit native: ", name, ": a bias of G*H numbers, of x's dtype, on the CPU");
  }
}

// One LSTM step of B rows on the weights as stored (W_ih (4H, I), W_hh (4H, H), torch's gate order
// i, f, g, o): the lean stepping path (core/step.py). The two products (step_products) and the gate
// math in one call, on the parameters themselves, so nothing packed from them can fall out of date.
void lstm_step_rows(const Tensor& x, const Tensor& h, const Tensor& c, const Tensor& w_ih,
                    const std::optional<Tensor>& b_ih, const Tensor& w_hh, const std::optional<Tensor>& b_hh,
                    const Tensor& h_out, const Tensor& c_out) {
  check_step_rows("lstm_step_rows", 4, x, w_ih, b_ih, w_hh, b_hh, {&h, &c, &h_out, &c_out});
  const int64_t H = w_hh.size(1), B = h.numel() / H;
  const std::optional<Tensor> bi = contiguous(b_ih), bh = contiguous(b_hh);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rnnkit_lstm_step_rows", [&] {
    using T = scalar_t;
    constexpr int64_t L = Vec<T>::size();
    Tensor z_ = at::empty({B, 4 * H}, x.options());
    step_products<T>(x, h, w_ih, bi, w_hh, bh, z_, z_, true);  // z = x W_ih^T + b_ih + h W_hh^T
    const T* b = ptr<T>(bh);
    for (int64_t r = 0; r < B; ++r) {
      const T* z = z_.data_ptr<T>() + r * 4 * H;
      const T* cp = c.data_ptr<T>() + r * H;
      T *hp = h_out.data_ptr<T>() + r * H, *cn = c_out.data_ptr<T>() + r * H;
      for (int64_t j = 0; j < H; j += L) {
        const int64_t n = std::min<int64_t>(L, H - j);
        auto gate = [&](int64_t g) { return b ? load(z + g * H + j, n) + load(b + g * H + j, n) : load(z + g * H + j, n); };
        const Vec<T> c_new = sigmoid<T>(gate(1)) * load(cp + j, n) + sigmoid<T>(gate(0)) * tanh_<T>(gate(2));
        (sigmoid<T>(gate(3)) * tanh_<T>(c_new)).store(hp + j, n);
        c_new.store(cn + j, n);
      }
    }
  });
}

// One GRU step of B rows on the weights as stored (W_ih (3H, I), W_hh (3H, H), torch's r, z, n):
// the two products (step_products) and the gate math (as gru_forward's) in one call.
void gru_step_rows(const Tensor& x, const Tensor& h, const Tensor& w_ih, const std::optional<Tensor>& b_ih,
                   const Tensor& w_hh, const std::optional<Tensor>& b_hh, const Tensor& h_out) {
  check_step_rows("gru_step_rows", 3, x, w_ih, b_ih, w_hh, b_hh, {&h, &h_out});
  const int64_t H = w_hh.size(1), B = h.numel() / H;
  const std::optional<Tensor> bi = contiguous(b_ih), bh = contiguous(b_hh);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rnnkit_gru_step_rows", [&] {
    using T = scalar_t;
    constexpr int64_t L = Vec<T>::size();
    Tensor zx_ = at::empty({B, 3 * H}, x.options()), zh_ = at::empty({B, 3 * H}, x.options());
    step_products<T>(x, h, w_ih, bi, w_hh, bh, zx_, zh_, false);
    for (int64_t r = 0; r < B; ++r) {
      const T* zx = zx_.data_ptr<T>() + r * 3 * H;
      const T* zh = zh_.data_ptr<T>() + r * 3 * H;
      const T* hp = h.data_ptr<T>() + r * H;
      T* ho = h_out.data_ptr<T>() + r * H;
      for (int64_t j = 0; j < H; j += L) {
        const int64_t n = std::min<int64_t>(L, H - j);
        const Vec<T> rg = sigmoid<T>(load(zx + j, n) + load(zh + j, n));
        const Vec<T> zg = sigmoid<T>(load(zx + H + j, n) + load(zh + H + j, n));
        const Vec<T> nn = tanh_<T>(load(zx + 2 * H + j, n) + rg * load(zh + 2 * H + j, n));
        (nn + zg * (load(hp + j, n) - nn)).store(ho + j, n);
      }
    }
  });
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
// torch's addmm keeps that job: kernels/cpp_loops.py's Projection.)
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
// forward loops' recurrent weight (G gates), packed by kernels/cpp_loops.py on every call.
Tensor pack_linear(const Tensor& w, int64_t gates) {
  TORCH_CHECK(w.device().is_cpu() && w.dim() == 2, "rnnkit native: pack_linear takes a matrix on the CPU");
  TORCH_CHECK(gates >= 1 && w.size(0) % gates == 0, "rnnkit native: pack_linear: rows not a multiple of the gates");
  Tensor p;
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "rnnkit_pack_linear", [&] { p = pack_blocks<scalar_t>(w, gates); });
  return p;
}

// y (N, M) = x (N, K) W^T + bias with W packed once by pack_linear: the generic kernel's
// recurrent matmul (kernels/generic.py), one call per step with the same weight.
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


// -- the loops without zoneout and recurrent dropout: the schemas core/ops.cpp and every caller before
// the masks call (the _noisy ops take r, hd and keep as well: Noise, native.h) ---------------------------

using OptT_ = std::optional<Tensor>;

void lstm_forward(const Tensor& xz, const Tensor& packed, const OptT_& bias, const Tensor& hs, const Tensor& cs,
                  const Tensor& out, const OptT_& gates, const OptT_& mask) {
  lstm_forward_noisy(xz, packed, bias, hs, cs, out, gates, mask, std::nullopt, std::nullopt, std::nullopt);
}

void lstm_backward(const Tensor& gates, const Tensor& cs, const OptT_& gout, const Tensor& w_hh, const Tensor& dh,
                   const Tensor& dc, const Tensor& dxz, const OptT_& mask) {
  lstm_backward_noisy(gates, cs, gout, w_hh, dh, dc, dxz, mask, std::nullopt, std::nullopt);
}

void gru_forward(const Tensor& xz, const Tensor& packed, const OptT_& bias, const Tensor& hs, const Tensor& out,
                 const OptT_& gates, const OptT_& hzn, const OptT_& mask) {
  gru_forward_noisy(xz, packed, bias, hs, out, gates, hzn, mask, std::nullopt, std::nullopt, std::nullopt);
}

void gru_backward(const Tensor& gates, const Tensor& hzn, const Tensor& hs, const OptT_& gout, const Tensor& w_hh,
                  const Tensor& dh, const Tensor& dxz, const Tensor& dhn, const OptT_& mask) {
  gru_backward_noisy(gates, hzn, hs, gout, w_hh, dh, dxz, dhn, mask, std::nullopt, std::nullopt);
}

void rnn_forward(const Tensor& xz, const Tensor& packed, const OptT_& bias, const Tensor& hs, const Tensor& out,
                 const OptT_& mask, bool relu) {
  rnn_forward_noisy(xz, packed, bias, hs, out, mask, relu, std::nullopt, std::nullopt, std::nullopt);
}

void rnn_backward(const Tensor& hs, const OptT_& gout, const Tensor& w_hh, const Tensor& dh, const Tensor& dxz,
                  const OptT_& mask, bool relu) {
  rnn_backward_noisy(hs, gout, w_hh, dh, dxz, mask, relu, std::nullopt, std::nullopt);
}

void slstm_forward(const Tensor& xz, const Tensor& w_hh, const OptT_& bias, const Tensor& hs, const Tensor& cs,
                   const Tensor& ns, const Tensor& ms, const Tensor& out, const OptT_& gates, const OptT_& mask) {
  slstm_forward_noisy(xz, w_hh, bias, hs, cs, ns, ms, out, gates, mask, std::nullopt, std::nullopt, std::nullopt);
}

void slstm_backward(const Tensor& gates, const Tensor& cs, const Tensor& ns, const Tensor& ms, const OptT_& gout,
                    const Tensor& w_hh, const Tensor& dh, const Tensor& dc, const Tensor& dn, const Tensor& dm,
                    const Tensor& dxz, const OptT_& mask) {
  slstm_backward_noisy(gates, cs, ns, ms, gout, w_hh, dh, dc, dn, dm, dxz, mask, std::nullopt, std::nullopt);
}

}  // namespace

TORCH_LIBRARY(rnnkit_native, lib) {
  lib.def("linear_rows(Tensor W, Tensor x, Tensor? bias) -> Tensor", &linear_rows);
  lib.def("rows_times(Tensor x, Tensor A, Tensor? bias) -> Tensor", &rows_times);
  lib.def("lstm_step_rows(Tensor x, Tensor h, Tensor c, Tensor w_ih, Tensor? b_ih, Tensor w_hh, Tensor? b_hh, "
          "Tensor(a!) h_out, Tensor(b!) c_out) -> ()", &lstm_step_rows);
  lib.def("gru_step_rows(Tensor x, Tensor h, Tensor w_ih, Tensor? b_ih, Tensor w_hh, Tensor? b_hh, Tensor(a!) h_out) -> ()",
          &gru_step_rows);
  lib.def("linear_blocks(Tensor x, Tensor w, Tensor? bias) -> Tensor", &linear_blocks);
  lib.def("pack_linear(Tensor w, int gates=1) -> Tensor", &pack_linear);
  lib.def("workspace(int[] size, ScalarType dtype) -> Tensor", &rnnkit::workspace);
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
  lib.def("slstm_forward(Tensor xz, Tensor w_hh, Tensor? bias, Tensor(a!) hs, Tensor(b!) cs, Tensor(c!) ns, "
          "Tensor(d!) ms, Tensor(e!) out, Tensor(f!)? gates, Tensor? mask) -> ()", &slstm_forward);
  lib.def("slstm_backward(Tensor gates, Tensor cs, Tensor ns, Tensor ms, Tensor? gout, Tensor w_hh, Tensor(a!) dh, "
          "Tensor(b!) dc, Tensor(c!) dn, Tensor(d!) dm, Tensor(e!) dxz, Tensor? mask) -> ()", &slstm_backward);
  lib.def("rnn_backward(Tensor hs, Tensor? gout, Tensor w_hh, Tensor(a!) dh, Tensor(b!) dxz, Tensor? mask, "
          "bool relu) -> ()", &rnn_backward);
  // the same loops with zoneout and recurrent dropout (core/kernels/state_noise.py): r (B, H) the
  // recurrent dropout mask, hd (2, B, H) its buffer, keep (B, T, H) the zoneout mask (1: keep)
  lib.def("lstm_forward_noisy(Tensor xz, Tensor packed, Tensor? bias, Tensor(a!) hs, Tensor(b!) cs, Tensor(c!) out, "
          "Tensor(d!)? gates, Tensor? mask, Tensor? r, Tensor(e!)? hd, Tensor? keep) -> ()",
          torch::dispatch(c10::DispatchKey::CPU, &lstm_forward_noisy));
  lib.def("lstm_backward_noisy(Tensor gates, Tensor cs, Tensor? gout, Tensor w_hh, Tensor(a!) dh, Tensor(b!) dc, "
          "Tensor(c!) dxz, Tensor? mask, Tensor? r, Tensor? keep) -> ()",
          torch::dispatch(c10::DispatchKey::CPU, &lstm_backward_noisy));
  lib.def("gru_forward_noisy(Tensor xz, Tensor packed, Tensor? bias, Tensor(a!) hs, Tensor(b!) out, Tensor(c!)? gates, "
          "Tensor(d!)? hzn, Tensor? mask, Tensor? r, Tensor(e!)? hd, Tensor? keep) -> ()",
          torch::dispatch(c10::DispatchKey::CPU, &gru_forward_noisy));
  lib.def("gru_backward_noisy(Tensor gates, Tensor hzn, Tensor hs, Tensor? gout, Tensor w_hh, Tensor(a!) dh, "
          "Tensor(b!) dxz, Tensor(c!) dhn, Tensor? mask, Tensor? r, Tensor? keep) -> ()",
          torch::dispatch(c10::DispatchKey::CPU, &gru_backward_noisy));
  lib.def("rnn_forward_noisy(Tensor xz, Tensor packed, Tensor? bias, Tensor(a!) hs, Tensor(b!) out, Tensor? mask, "
          "bool relu, Tensor? r, Tensor(c!)? hd, Tensor? keep) -> ()",
          torch::dispatch(c10::DispatchKey::CPU, &rnn_forward_noisy));
  lib.def("rnn_backward_noisy(Tensor hs, Tensor? gout, Tensor w_hh, Tensor(a!) dh, Tensor(b!) dxz, Tensor? mask, "
          "bool relu, Tensor? r, Tensor? keep) -> ()",
          torch::dispatch(c10::DispatchKey::CPU, &rnn_backward_noisy));
  lib.def("slstm_forward_noisy(Tensor xz, Tensor w_hh, Tensor? bias, Tensor(a!) hs, Tensor(b!) cs, Tensor(c!) ns, "
          "Tensor(d!) ms, Tensor(e!) out, Tensor(f!)? gates, Tensor? mask, Tensor? r, Tensor(g!)? hd, Tensor? keep) -> ()",
          torch::dispatch(c10::DispatchKey::CPU, &slstm_forward_noisy));
  lib.def("slstm_backward_noisy(Tensor gates, Tensor cs, Tensor ns, Tensor ms, Tensor? gout, Tensor w_hh, "
          "Tensor(a!) dh, Tensor(b!) dc, Tensor(c!) dn, Tensor(d!) dm, Tensor(e!) dxz, Tensor? mask, Tensor? r, "
          "Tensor? keep) -> ()",
          torch::dispatch(c10::DispatchKey::CPU, &slstm_backward_noisy));
}

