// rnnkit's operators (torch.ops.rnnkit): their schemas and CPU kernels, in C++.
//
// What torch.compile, torch.export and AOTInductor record of a layer: one operator per (layer,
// direction) (core/ops.py says what each computes). Defined here, in the library native.py builds,
// so that a process can run an exported or AOTInductor-compiled model with nothing of rnnkit but
// `torch.ops.load_library(<this library>)`; core/ops.py adds, in Python, the fake kernels (shapes
// from shapes), the autograd formula and the kernels for other devices. Per cell kind K:
//
//   K_scan(x, w_ih, b_ih?, w_hh, b_hh?, *state, mask?, relu) -> (out, *final)      inference
//   K_scan_train(xz, w_hh, b_hh?, *state, mask?, relu) -> (out, *final, *saved)    training
//   K_scan_backward(*saved, w_hh, mask?, grad_out?, *grad_state?, relu) -> (d_xz, d_w_hh, d_b_hh, *d_state)
//
// The kernels are the eager routes' own (core/kernels/cpp_loops.py), called through the
// dispatcher: inference runs the LSTM's loop that projects its input per step (the cpp-projecting
// route) and the GRU's and RNN's loops after one matmul (cpp-loops); one step (T = 1) is the eager
// stepping path's (core/step.py: the products on the weights as stored, nothing cached); training
// and its backward are the cpp-loops route's. Half precision and bfloat16 run in float32.

#include "native.h"

#include <array>
#include <cstring>
#include <functional>
#include <tuple>

namespace {

using OptT = std::optional<Tensor>;
using Two = std::tuple<Tensor, Tensor>;
using Three = std::tuple<Tensor, Tensor, Tensor>;

// An operator of native.cpp, looked up once (at first use: the two files' registrations run in
// either order when the library loads).
template <typename Sig>
c10::TypedOperatorHandle<Sig> native_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// Buffers as native.py's `buffer`: 1 MiB or more from the workspace, smaller ones fresh.
Tensor buffer(at::IntArrayRef size, const Tensor& like) {
  const int64_t bytes = c10::multiply_integers(size) * static_cast<int64_t>(like.element_size());
  return bytes >= (int64_t(1) << 20) ? rnnkit::workspace(size, like.scalar_type()) : at::empty(size, like.options());
}

Tensor pack(const Tensor& w, int64_t gates) {
  static const auto op = native_op<Tensor(const Tensor&, int64_t)>("rnnkit_native::pack_linear");
  return op.call(w, gates);
}

// -- one step (T = 1): on the weights as stored ------------------------------------------------
// As the eager stepping path (core/step.py): nothing packed or cached, so every step reads the
// parameters as they are at that call, whatever wrote them (an optimizer, load_state_dict, or a
// write through `.data`, which bypasses the version counter). The LSTM's and the GRU's whole step
// is one C++ call (lstm_step_rows, gru_step_rows: the two products and the gate math) where
// step.py makes it one; otherwise the products at batch 1 are the matrix-vector kernels, whose
// fixed cost is far below a BLAS call's, and torch's matmul on the weights transposed in place.

constexpr int64_t ROWS_MAX_BYTES = int64_t(32) << 20;  // step.py's NATIVE_MAX_BYTES

bool by_rows(const Tensor& x, const Tensor& w) {
  return x.size(0) == 1 && x.is_contiguous() && w.is_contiguous() && w.numel() * w.element_size() <= ROWS_MAX_BYTES;
}

// step.py's _step_ops: whether the one-call step takes these operands (dense, of one dtype; at
// batch 1 weights up to ROWS_MAX_BYTES)
bool one_call(const Tensor& x, const Tensor& w_ih, const Tensor& w_hh, std::initializer_list<const Tensor*> states) {
  if (x.size(0) == 1 && std::max(w_ih.numel(), w_hh.numel()) * w_ih.element_size() > ROWS_MAX_BYTES) return false;
  if (!(x.is_contiguous() && w_ih.is_contiguous() && w_hh.is_contiguous())) return false;
  for (const Tensor* t : {&w_ih, &w_hh}) {
    if (t->scalar_type() != x.scalar_type()) return false;
  }
  for (const Tensor* t : states) {
    if (!t->is_contiguous() || t->scalar_type() != x.scalar_type()) return false;
  }
  return true;
}

// x W^T + b (B, N) for (B, K) x and W (N, K) as stored
Tensor linear_stored(const Tensor& x, const Tensor& w, const OptT& b) {
  static const auto rows = native_op<Tensor(const Tensor&, const Tensor&, const OptT&)>("rnnkit_native::linear_rows");
  if (by_rows(x, w)) return rows.call(w, x, b);
  return b.has_value() ? at::addmm(*b, x, w.t()) : at::mm(x, w.t());
}

// (B, 1, H) out and the final state from one step's new state `fresh` (B, H) parts: at a padded
// step (mask false) the output is zero and the state the one before
template <size_t N>
std::array<Tensor, N + 1> stepped(std::array<Tensor, N> fresh, const std::array<Tensor, N>& before, const OptT& mask) {
  std::array<Tensor, N + 1> result;
  if (mask.has_value()) {
    const Tensor valid = mask->reshape({-1, 1});  // (B, 1)
    result[0] = (fresh[0] * valid).unsqueeze(1);
    for (size_t i = 0; i < N; ++i) result[i + 1] = at::where(valid, fresh[i], before[i]);
  } else {
    result[0] = fresh[0].unsqueeze(1).clone();  // the outputs may not alias each other
    for (size_t i = 0; i < N; ++i) result[i + 1] = std::move(fresh[i]);
  }
  return result;
}

Three lstm_step(const Tensor& x, const Tensor& w_ih, const OptT& b_ih, const Tensor& w_hh, const OptT& b_hh,
                const Tensor& h0, const Tensor& c0, const OptT& mask) {
  static const auto step = native_op<void(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptT&,
                                          const Tensor&, const OptT&, const Tensor&, const Tensor&)>(
      "rnnkit_native::lstm_step_rows");
  const int64_t B = x.size(0), H = w_hh.size(1);
  const Tensor xt = x.reshape({B, -1});
  Tensor h, c;
  if (one_call(xt, w_ih, w_hh, {&h0, &c0})) {
    h = at::empty({B, H}, x.options());
    c = at::empty({B, H}, x.options());
    step.call(xt, h0, c0, w_ih, b_ih, w_hh, b_hh, h, c);
  } else {  // torch's gate order i, f, g, o
    Tensor z = linear_stored(xt, w_ih, b_ih).add_(linear_stored(h0, w_hh, b_hh));
    z.narrow(1, 0, 2 * H).sigmoid_();
    z.narrow(1, 3 * H, H).sigmoid_();
    const Tensor g = z.narrow(1, 2 * H, H).tanh_();
    c = z.narrow(1, H, H) * c0;
    c.addcmul_(z.narrow(1, 0, H), g);
    h = z.narrow(1, 3 * H, H) * at::tanh(c);
  }
  auto [out, h1, c1] = stepped<2>({h, c}, {h0, c0}, mask);
  return {out, h1, c1};
}

Two gru_step(const Tensor& x, const Tensor& w_ih, const OptT& b_ih, const Tensor& w_hh, const OptT& b_hh,
             const Tensor& h0, const OptT& mask) {
  static const auto step = native_op<void(const Tensor&, const Tensor&, const Tensor&, const OptT&, const Tensor&,
                                          const OptT&, const Tensor&)>("rnnkit_native::gru_step_rows");
  const int64_t B = x.size(0), H = w_hh.size(1);
  const Tensor xt = x.reshape({B, -1});
  Tensor h;
  if (one_call(xt, w_ih, w_hh, {&h0})) {
    h = at::empty({B, H}, x.options());
    step.call(xt, h0, w_ih, b_ih, w_hh, b_hh, h);
  } else {
    const Tensor zx = linear_stored(xt, w_ih, b_ih), zh = linear_stored(h0, w_hh, b_hh);  // (B, 3H), gates r, z, n
    const Tensor rz = zx.narrow(1, 0, 2 * H).add_(zh.narrow(1, 0, 2 * H)).sigmoid_();
    const Tensor n = zx.narrow(1, 2 * H, H).addcmul_(rz.narrow(1, 0, H), zh.narrow(1, 2 * H, H)).tanh_();
    h = at::lerp(n, h0, rz.narrow(1, H, H));  // n + z (h - n)
  }
  auto [out, h1] = stepped<1>({h}, {h0}, mask);
  return {out, h1};
}

Two rnn_step(const Tensor& x, const Tensor& w_ih, const OptT& b_ih, const Tensor& w_hh, const OptT& b_hh,
             const Tensor& h0, const OptT& mask, bool relu) {
  const Tensor z = linear_stored(x.reshape({x.size(0), -1}), w_ih, b_ih).add_(linear_stored(h0, w_hh, b_hh));
  auto [out, h1] = stepped<1>({relu ? z.clamp_min_(0) : z.tanh_()}, {h0}, mask);
  return {out, h1};
}

OptT dense(const OptT& t) { return t.has_value() ? OptT(t->contiguous()) : t; }

// (S, B, H) states with row 0 the initial state: S = T + 1 in training (every step's state is
// kept for backward), 2 in inference (step t's state in row t % 2).
Tensor states(const Tensor& first, int64_t S) {
  Tensor s = buffer({S, first.size(0), first.size(1)}, first);
  s[0].copy_(first);
  return s;
}

// x W^T + b for (B, T, I) x: (B, T, G*H), in a workspace buffer when large (the Projection of
// core/kernels/cpp_loops.py).
Tensor project(const Tensor& x, const Tensor& w, const OptT& b) {
  const int64_t B = x.size(0), T = x.size(1);
  Tensor xz = buffer({B, T, w.size(0)}, x);
  Tensor flat = xz.view({B * T, w.size(0)});
  if (b.has_value()) {
    at::addmm_out(flat, *b, x.reshape({B * T, x.size(2)}), w.t());
  } else {
    at::mm_out(flat, x.reshape({B * T, x.size(2)}), w.t());
  }
  return xz;
}

// zeros at padded steps of a saved (B, T, .) buffer, which the loops leave unwritten there (their
// backward never reads them), so that an operator's outputs are a function of its inputs: only
// the padded rows written, each one memset (a masked_fill_ would pass over the whole buffer)
void zero_padded(const Tensor& saved, const OptT& mask) {
  if (!mask.has_value()) return;
  const Tensor valid = mask->to(at::kBool).contiguous();  // (B, T), as `saved` (contiguous)
  const bool* m = valid.data_ptr<bool>();
  const int64_t steps = valid.numel(), row = saved.numel() / std::max<int64_t>(1, steps);
  const size_t bytes = static_cast<size_t>(row * saved.element_size());
  char* data = static_cast<char*>(saved.data_ptr());
  for (int64_t i = 0; i < steps; ++i) {
    if (!m[i]) std::memset(data + i * bytes, 0, bytes);
  }
}

// an incoming state gradient as a fresh buffer the backward loop updates in place
Tensor grad_in(const OptT& grad, const Tensor& like) {
  return grad.has_value() ? grad->clone(at::MemoryFormat::Contiguous) : at::zeros_like(like, at::MemoryFormat::Contiguous);
}

// the output gradient with a contiguous last dimension, as the loops read it
OptT grad_rows(const OptT& g) {
  if (!g.has_value() || g->stride(-1) == 1) return g;
  return buffer(g->sizes(), *g).copy_(*g);
}

// h_0 .. h_{T-1} of time-major (T+1, B, H) states as a batch-major (B*T, H) copy
Tensor batch_major_states(const Tensor& hs) {
  const int64_t T = hs.size(0) - 1, B = hs.size(1), H = hs.size(2);
  return buffer({B, T, H}, hs).copy_(hs.narrow(0, 0, T).transpose(0, 1)).view({B * T, H});
}

// -- half precision and bfloat16: in float32 ---------------------------------------------------

bool native_dtype(const Tensor& t) { return t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble; }

Tensor up(const Tensor& t) { return t.is_floating_point() ? t.to(at::kFloat) : t; }
OptT up(const OptT& t) { return t.has_value() ? OptT(up(*t)) : t; }
bool up(bool b) { return b; }

// fn's result with every floating argument in float32, its outputs back in dtype
template <typename R, typename... A>
R in_float(R (*fn)(A...), at::ScalarType dtype, std::type_identity_t<A>... args) {
  R result = fn(up(args)...);
  std::apply([&](auto&... t) { ((t = t.to(dtype)), ...); }, result);
  return result;
}

// -- the operators ------------------------------------------------------------------------------
// Each runs without autograd: a program from torch.export may call the inference operators with
// weights that require grad, and the kernels' buffers are written with out= calls.

Three lstm_scan(const Tensor& x, const Tensor& w_ih, const OptT& b_ih, const Tensor& w_hh, const OptT& b_hh,
                const Tensor& h0, const Tensor& c0, const OptT& mask, bool relu) {
  const at::NoGradGuard no_grad;
  if (!native_dtype(x)) return in_float(&lstm_scan, x.scalar_type(), x, w_ih, b_ih, w_hh, b_hh, h0, c0, mask, relu);
  static const auto loop = native_op<void(const Tensor&, const Tensor&, const OptT&, const Tensor&, const OptT&,
                                          const Tensor&, const Tensor&, const Tensor&, const OptT&)>(
      "rnnkit_native::lstm_forward_projecting");
  const int64_t B = x.size(0), T = x.size(1), H = w_hh.size(1);
  if (T == 1) return lstm_step(x, w_ih, b_ih, w_hh, b_hh, h0, c0, mask);
  Tensor hs = states(h0, 2), cs = states(c0, 2), out = buffer({B, T, H}, x);
  loop.call(x.contiguous(), pack(w_ih, 4), b_ih, pack(w_hh, 4), b_hh, hs, cs, out, dense(mask));
  return {out, hs[T % 2].clone(), cs[T % 2].clone()};
}

Two gru_scan(const Tensor& x, const Tensor& w_ih, const OptT& b_ih, const Tensor& w_hh, const OptT& b_hh,
             const Tensor& h0, const OptT& mask, bool relu) {
  const at::NoGradGuard no_grad;
  if (!native_dtype(x)) return in_float(&gru_scan, x.scalar_type(), x, w_ih, b_ih, w_hh, b_hh, h0, mask, relu);
  static const auto loop = native_op<void(const Tensor&, const Tensor&, const OptT&, const Tensor&, const Tensor&,
                                          const OptT&, const OptT&, const OptT&)>("rnnkit_native::gru_forward");
  const int64_t B = x.size(0), T = x.size(1), H = w_hh.size(1);
  if (T == 1) return gru_step(x, w_ih, b_ih, w_hh, b_hh, h0, mask);
  Tensor hs = states(h0, 2), out = buffer({B, T, H}, x);
  loop.call(project(x, w_ih, b_ih), pack(w_hh, 3), b_hh, hs, out, std::nullopt, std::nullopt,
            dense(mask));
  return {out, hs[T % 2].clone()};
}

Two rnn_scan(const Tensor& x, const Tensor& w_ih, const OptT& b_ih, const Tensor& w_hh, const OptT& b_hh,
             const Tensor& h0, const OptT& mask, bool relu) {
  const at::NoGradGuard no_grad;
  if (!native_dtype(x)) return in_float(&rnn_scan, x.scalar_type(), x, w_ih, b_ih, w_hh, b_hh, h0, mask, relu);
  static const auto loop = native_op<void(const Tensor&, const Tensor&, const OptT&, const Tensor&, const Tensor&,
                                          const OptT&, bool)>("rnnkit_native::rnn_forward");
  const int64_t T = x.size(1);
  if (T == 1) return rnn_step(x, w_ih, b_ih, w_hh, b_hh, h0, mask, relu);
  Tensor xz = project(x, w_ih, b_ih), hs = states(h0, 2), out = buffer(xz.sizes(), x);
  loop.call(xz, pack(w_hh, 1), b_hh, hs, out, dense(mask), relu);
  return {out, hs[T % 2].clone()};
}

using LSTMTrain = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;
using GRUTrain = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;
using RNNTrain = std::tuple<Tensor, Tensor, Tensor>;

LSTMTrain lstm_scan_train(const Tensor& xz_, const Tensor& w_hh, const OptT& b_hh, const Tensor& h0, const Tensor& c0,
                          const OptT& mask, bool relu) {
  const at::NoGradGuard no_grad;
  if (!native_dtype(xz_)) return in_float(&lstm_scan_train, xz_.scalar_type(), xz_, w_hh, b_hh, h0, c0, mask, relu);
  static const auto loop = native_op<void(const Tensor&, const Tensor&, const OptT&, const Tensor&, const Tensor&,
                                          const Tensor&, const OptT&, const OptT&)>("rnnkit_native::lstm_forward");
  const Tensor xz = xz_.contiguous();
  const int64_t B = xz.size(0), T = xz.size(1), H = w_hh.size(1);
  Tensor hs = states(h0, T + 1), cs = states(c0, T + 1), out = buffer({B, T, H}, xz), gates = buffer(xz.sizes(), xz);
  const OptT m = dense(mask);
  loop.call(xz, pack(w_hh, 4), b_hh, hs, cs, out, gates, m);
  zero_padded(gates, m);
  return {out, hs[T].clone(), cs[T].clone(), gates, hs, cs};
}

GRUTrain gru_scan_train(const Tensor& xz_, const Tensor& w_hh, const OptT& b_hh, const Tensor& h0, const OptT& mask,
                        bool relu) {
  const at::NoGradGuard no_grad;
  if (!native_dtype(xz_)) return in_float(&gru_scan_train, xz_.scalar_type(), xz_, w_hh, b_hh, h0, mask, relu);
  static const auto loop = native_op<void(const Tensor&, const Tensor&, const OptT&, const Tensor&, const Tensor&,
                                          const OptT&, const OptT&, const OptT&)>("rnnkit_native::gru_forward");
  const Tensor xz = xz_.contiguous();
  const int64_t B = xz.size(0), T = xz.size(1), H = w_hh.size(1);
  Tensor hs = states(h0, T + 1), out = buffer({B, T, H}, xz), gates = buffer(xz.sizes(), xz),
         hzn = buffer({B, T, H}, xz);
  const OptT m = dense(mask);
  loop.call(xz, pack(w_hh, 3), b_hh, hs, out, gates, hzn, m);
  zero_padded(gates, m);
  zero_padded(hzn, m);
  return {out, hs[T].clone(), gates, hzn, hs};
}

RNNTrain rnn_scan_train(const Tensor& xz_, const Tensor& w_hh, const OptT& b_hh, const Tensor& h0, const OptT& mask,
                        bool relu) {
  const at::NoGradGuard no_grad;
  if (!native_dtype(xz_)) return in_float(&rnn_scan_train, xz_.scalar_type(), xz_, w_hh, b_hh, h0, mask, relu);
  static const auto loop = native_op<void(const Tensor&, const Tensor&, const OptT&, const Tensor&, const Tensor&,
                                          const OptT&, bool)>("rnnkit_native::rnn_forward");
  const Tensor xz = xz_.contiguous();
  const int64_t T = xz.size(1);
  Tensor hs = states(h0, T + 1), out = buffer(xz.sizes(), xz);
  loop.call(xz, pack(w_hh, 1), b_hh, hs, out, dense(mask), relu);
  return {out, hs[T].clone(), hs};
}

// dW = dxz^T h_prev, db = sum dxz over all steps, for batch-major dxz (B, T, G*H) and states (T+1, B, H)
Two weight_grads(const Tensor& dxz, const Tensor& hs) {
  const Tensor flat = dxz.view({-1, dxz.size(-1)});
  return {flat.t().mm(batch_major_states(hs)), flat.sum(0)};
}

using LSTMGrads = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;
using Grads = std::tuple<Tensor, Tensor, Tensor, Tensor>;

LSTMGrads lstm_scan_backward(const Tensor& gates, const Tensor& hs, const Tensor& cs, const Tensor& w_hh,
                             const OptT& mask, const OptT& grad_out, const OptT& grad_h, const OptT& grad_c,
                             bool relu) {
  const at::NoGradGuard no_grad;
  if (!native_dtype(w_hh))
    return in_float(&lstm_scan_backward, w_hh.scalar_type(), gates, hs, cs, w_hh, mask, grad_out, grad_h, grad_c, relu);
  static const auto loop = native_op<void(const Tensor&, const Tensor&, const OptT&, const Tensor&, const Tensor&,
                                          const Tensor&, const Tensor&, const OptT&)>("rnnkit_native::lstm_backward");
  Tensor dh = grad_in(grad_h, hs[0]), dc = grad_in(grad_c, cs[0]), dxz = buffer(gates.sizes(), gates);
  loop.call(gates.contiguous(), cs.contiguous(), grad_rows(grad_out), w_hh, dh, dc, dxz, dense(mask));
  auto [dw, db] = weight_grads(dxz, hs);
  return {dxz, dw, db, dh, dc};
}

Grads gru_scan_backward(const Tensor& gates, const Tensor& hzn, const Tensor& hs, const Tensor& w_hh, const OptT& mask,
                        const OptT& grad_out, const OptT& grad_h, bool relu) {
  const at::NoGradGuard no_grad;
  if (!native_dtype(w_hh))
    return in_float(&gru_scan_backward, w_hh.scalar_type(), gates, hzn, hs, w_hh, mask, grad_out, grad_h, relu);
  static const auto loop =
      native_op<void(const Tensor&, const Tensor&, const Tensor&, const OptT&, const Tensor&, const Tensor&,
                     const Tensor&, const Tensor&, const OptT&)>("rnnkit_native::gru_backward");
  const int64_t H = hzn.size(-1);
  Tensor dh = grad_in(grad_h, hs[0]), dxz = buffer(gates.sizes(), gates), dhn = buffer(hzn.sizes(), hzn);
  loop.call(gates.contiguous(), hzn.contiguous(), hs.contiguous(), grad_rows(grad_out), w_hh, dh, dxz, dhn,
            dense(mask));
  // d hz's r and z parts are d xz's; its n part is dhn
  const Tensor rz = dxz.view({-1, 3 * H}).narrow(1, 0, 2 * H), n = dhn.view({-1, H});
  const Tensor h_prev = batch_major_states(hs);
  Tensor dw = at::cat({rz.t().mm(h_prev), n.t().mm(h_prev)});
  Tensor db = at::cat({rz.sum(0), n.sum(0)});
  return {dxz, dw, db, dh};
}

Grads rnn_scan_backward(const Tensor& hs, const Tensor& w_hh, const OptT& mask, const OptT& grad_out,
                        const OptT& grad_h, bool relu) {
  const at::NoGradGuard no_grad;
  if (!native_dtype(w_hh))
    return in_float(&rnn_scan_backward, w_hh.scalar_type(), hs, w_hh, mask, grad_out, grad_h, relu);
  static const auto loop = native_op<void(const Tensor&, const OptT&, const Tensor&, const Tensor&, const Tensor&,
                                          const OptT&, bool)>("rnnkit_native::rnn_backward");
  const int64_t T = hs.size(0) - 1, B = hs.size(1), H = hs.size(2);
  Tensor dh = grad_in(grad_h, hs[0]), dxz = buffer({B, T, H}, hs);
  loop.call(hs.contiguous(), grad_rows(grad_out), w_hh, dh, dxz, dense(mask), relu);
  auto [dw, db] = weight_grads(dxz, hs);
  return {dxz, dw, db, dh};
}

// The schemas (core/ops.py's `schemas` writes the same ones: tests/test_export_ops.py compares them).
void define(torch::Library& lib) {
  lib.def("lstm_scan(Tensor x, Tensor w_ih, Tensor? b_ih, Tensor w_hh, Tensor? b_hh, Tensor h0, Tensor c0, "
          "Tensor? mask, bool relu) -> (Tensor, Tensor, Tensor)");
  lib.def("gru_scan(Tensor x, Tensor w_ih, Tensor? b_ih, Tensor w_hh, Tensor? b_hh, Tensor h0, Tensor? mask, "
          "bool relu) -> (Tensor, Tensor)");
  lib.def("rnn_scan(Tensor x, Tensor w_ih, Tensor? b_ih, Tensor w_hh, Tensor? b_hh, Tensor h0, Tensor? mask, "
          "bool relu) -> (Tensor, Tensor)");
  lib.def("lstm_scan_train(Tensor xz, Tensor w_hh, Tensor? b_hh, Tensor h0, Tensor c0, Tensor? mask, bool relu) "
          "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  lib.def("gru_scan_train(Tensor xz, Tensor w_hh, Tensor? b_hh, Tensor h0, Tensor? mask, bool relu) "
          "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  lib.def("rnn_scan_train(Tensor xz, Tensor w_hh, Tensor? b_hh, Tensor h0, Tensor? mask, bool relu) "
          "-> (Tensor, Tensor, Tensor)");
  lib.def("lstm_scan_backward(Tensor saved0, Tensor saved1, Tensor saved2, Tensor w_hh, Tensor? mask, "
          "Tensor? grad_out, Tensor? grad_h, Tensor? grad_c, bool relu) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  lib.def("gru_scan_backward(Tensor saved0, Tensor saved1, Tensor saved2, Tensor w_hh, Tensor? mask, "
          "Tensor? grad_out, Tensor? grad_h, bool relu) -> (Tensor, Tensor, Tensor, Tensor)");
  lib.def("rnn_scan_backward(Tensor saved0, Tensor w_hh, Tensor? mask, Tensor? grad_out, Tensor? grad_h, bool relu) "
          "-> (Tensor, Tensor, Tensor, Tensor)");
}

void implement(torch::Library& lib) {
  lib.impl("lstm_scan", &lstm_scan);
  lib.impl("gru_scan", &gru_scan);
  lib.impl("rnn_scan", &rnn_scan);
  lib.impl("lstm_scan_train", &lstm_scan_train);
  lib.impl("gru_scan_train", &gru_scan_train);
  lib.impl("rnn_scan_train", &rnn_scan_train);
  lib.impl("lstm_scan_backward", &lstm_scan_backward);
  lib.impl("gru_scan_backward", &gru_scan_backward);
  lib.impl("rnn_scan_backward", &rnn_scan_backward);
}

// Registered when the library loads, unless the operators exist already (defined in Python by
// core/ops.py where this library was not loaded first): a second definition would abort the process.
struct Registration {
  std::optional<torch::Library> defs, cpu;
  Registration() {
    if (c10::Dispatcher::singleton().findSchema({"rnnkit::lstm_scan", ""}).has_value()) return;
    defs.emplace(torch::Library::FRAGMENT, "rnnkit", std::nullopt, __FILE__, __LINE__);
    define(*defs);
    cpu.emplace(torch::Library::IMPL, "rnnkit", c10::DispatchKey::CPU, __FILE__, __LINE__);
    implement(*cpu);
  }
};
const Registration registration;

}  // namespace
