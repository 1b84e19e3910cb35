// The parallel-scan cells' recurrence on the CPU, in C++ (core/parallel_scan.py calls it): minGRU and
// minLSTM (core/cells/mingru.py, minlstm.py), h_t = (1 - z_t) h_{t-1} + z_t g(v_t), stepped, read
// straight from the input projection xz (B, T, G*H) and its gradient written straight into dxz.
// Compiled with native.cpp into one library (core/native.py); what they share is in native.h.
//
// The state of each hidden unit depends on its own past only, so the threads split (row, chunk of
// hidden units) pairs and each runs its pairs through every step without meeting another thread;
// a step's work on a chunk is a few vectors in registers. Where torch ops run one op over all
// (B, H) values of a step at a time, a dozen a step forward and back, here a step's values are
// read once and nothing else is written but the states (forward) and the gradients (backward).
//
//   minGRU  (G = 2, gates z, h):     z = sigmoid(k_z)
//   minLSTM (G = 3, gates f, i, h):  z = i / (f + i), f = sigmoid(k_f), i = sigmoid(k_i)
//   both: g(v) = v + 1/2 (v >= 0), sigmoid(v) (v < 0), v = the candidate gate h
//
// minLSTM's z is computed as A / (A + C) with A = e^-m + e^(-k_f - m), C = e^-m + e^(-k_i - m),
// m = max(0, -k_f, -k_i) (z = (1 + e^-k_f) / ((1 + e^-k_f) + (1 + e^-k_i)) scaled): every exp at
// most 1 and the sum at least 1, so it neither overflows nor divides 0 by 0 where f and i both
// vanish; equal to sigmoid(softplus(-k_f) - softplus(-k_i)), the cell's own form.
//
// mask (B, T) bool: false at a padded step, where z = 0 (the state carried, no gradient into k, v).
// Forward writes every h_t into hs (B, T, H). Backward, with lambda_t = dL/dh_t = grad_t +
// (1 - z_{t+1}) lambda_{t+1}: dk_t = lambda_t z_t (g_t - h_t), dv_t = lambda_t z_t g'(v_t), and for
// minLSTM dk_f = -dk (1 - f), dk_i = dk (1 - i); dh0 = (1 - z_1) lambda_1 (all recomputed from xz).

#include "native.h"

namespace {

constexpr int64_t kScanChunk = 256;  // hidden units a thread's item covers (a few KiB of each gate per step)

template <typename T>
struct Coefficients {
  Vec<T> z, g, dg;  // the candidate's share, the candidate g(v), g'(v)
  Vec<T> f1, i1;     // minLSTM: 1 - f and 1 - i
};

template <typename T>
inline Coefficients<T> coefficients(const T* x, int64_t H, int64_t j, int64_t n, bool lstm, bool grads) {
  const Vec<T> one(T(1)), zero(T(0)), half(T(0.5));
  Coefficients<T> c;
  const Vec<T> v = load(x + (lstm ? 2 : 1) * H + j, n);
  const Vec<T> below = sigmoid(at::vec::minimum(v, zero));
  const Vec<T> nonneg = v >= zero;
  c.g = Vec<T>::blendv(below, v + half, nonneg);
  if (grads) c.dg = Vec<T>::blendv(below * (one - below), one, nonneg);
  if (lstm) {
    const Vec<T> kf = load(x + j, n), ki = load(x + H + j, n);
    const Vec<T> nf = zero - kf, ni = zero - ki;
    const Vec<T> m = at::vec::maximum(zero, at::vec::maximum(nf, ni));
    const Vec<T> em = exp_(zero - m);
    const Vec<T> a = em + exp_(nf - m), b = em + exp_(ni - m);
    c.z = a / (a + b);
    if (grads) c.f1 = sigmoid(nf), c.i1 = sigmoid(ni);
  } else {
    c.z = sigmoid(load(x + j, n));
  }
  return c;
}

// items: (row b, chunk of hidden units) pairs, split over the threads
template <typename Body>
void over_items(int64_t B, int64_t H, const Body& body) {
  const int64_t chunks = (H + kScanChunk - 1) / kScanChunk;
  at::parallel_for(0, B * chunks, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / chunks, j0 = (i % chunks) * kScanChunk;
      body(b, j0, std::min<int64_t>(H, j0 + kScanChunk));
    }
  });
}

void gate_scan_forward(const Tensor& xz, const Tensor& h0, const Tensor& hs, const std::optional<Tensor>& mask,
                       bool lstm) {
  check_all("a scan buffer", xz, h0, hs);
  const int64_t B = xz.size(0), T = xz.size(1), H = hs.size(2), G = lstm ? 3 : 2;
  TORCH_CHECK(xz.size(2) == G * H && h0.size(0) == B && h0.size(1) == H && hs.size(1) == T,
              "rnnkit native: xz, h0 and hs disagree on the sizes");
  AT_DISPATCH_FLOATING_TYPES(xz.scalar_type(), "rnnkit_gate_scan_forward", [&] {
    using T_ = scalar_t;
    constexpr int64_t L = Vec<T_>::size();
    const T_* xp = xz.data_ptr<T_>();
    const T_* h0p = h0.data_ptr<T_>();
    T_* hp = hs.data_ptr<T_>();
    const bool* m = ptr<bool>(mask);
    over_items(B, H, [&](int64_t b, int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; j += L) {
        const int64_t n = std::min<int64_t>(L, j1 - j);
        Vec<T_> h = load(h0p + b * H + j, n);
        for (int64_t t = 0; t < T; ++t) {
          const int64_t bt = b * T + t;
          if (m == nullptr || m[bt]) {
            const auto c = coefficients<T_>(xp + bt * G * H, H, j, n, lstm, false);
            h = h + c.z * (c.g - h);
          }
          h.store(hp + bt * H + j, n);
        }
      }
    });
  });
}

void gate_scan_backward(const Tensor& xz, const Tensor& h0, const Tensor& hs, const Tensor& grad, const Tensor& dxz,
                        const Tensor& dh0, const std::optional<Tensor>& mask, bool lstm) {
  check_all("a scan gradient buffer", xz, h0, hs, dxz, dh0);
  const int64_t B = xz.size(0), T = xz.size(1), H = hs.size(2), G = lstm ? 3 : 2;
  TORCH_CHECK(grad.dim() == 3 && grad.size(0) == B && grad.size(1) == T && grad.size(2) == H &&
                  (H == 1 || grad.stride(2) == 1),
              "rnnkit native: the scan's gradient must be (B, T, H) with a contiguous last dimension");
  AT_DISPATCH_FLOATING_TYPES(xz.scalar_type(), "rnnkit_gate_scan_backward", [&] {
    using T_ = scalar_t;
    constexpr int64_t L = Vec<T_>::size();
    const T_* xp = xz.data_ptr<T_>();
    const T_* hp = hs.data_ptr<T_>();
    const T_* gp = grad.data_ptr<T_>();
    const int64_t gb = grad.stride(0), gt = grad.stride(1);
    T_* dp = dxz.data_ptr<T_>();
    T_* dh0p = dh0.data_ptr<T_>();
    const bool* m = ptr<bool>(mask);
    const Vec<T_> one(T_(1)), zero(T_(0));
    over_items(B, H, [&](int64_t b, int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; j += L) {
        const int64_t n = std::min<int64_t>(L, j1 - j);
        Vec<T_> lam(T_(0)), a_next(T_(1));  // lambda_{t+1} and 1 - z_{t+1}
        for (int64_t t = T - 1; t >= 0; --t) {
          const int64_t bt = b * T + t;
          T_* d = dp + bt * G * H;
          lam = load(gp + b * gb + t * gt + j, n) + a_next * lam;
          if (m != nullptr && !m[bt]) {  // padded: z = 0, the state carried
            for (int64_t g = 0; g < G; ++g) zero.store(d + g * H + j, n);
            a_next = one;
            continue;
          }
          const auto c = coefficients<T_>(xp + bt * G * H, H, j, n, lstm, true);
          const Vec<T_> lz = lam * c.z;
          const Vec<T_> dk = lz * (c.g - load(hp + bt * H + j, n));
          (lz * c.dg).store(d + (G - 1) * H + j, n);
          if (lstm) {
            (zero - dk * c.f1).store(d + j, n);
            (dk * c.i1).store(d + H + j, n);
          } else {
            dk.store(d + j, n);
          }
          a_next = one - c.z;
        }
        (a_next * lam).store(dh0p + b * H + j, n);
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(rnnkit_native, lib) {
  lib.def("gate_scan_forward(Tensor xz, Tensor h0, Tensor(a!) hs, Tensor? mask, bool lstm) -> ()", &gate_scan_forward);
  lib.def("gate_scan_backward(Tensor xz, Tensor h0, Tensor hs, Tensor grad, Tensor(a!) dxz, Tensor(b!) dh0, "
          "Tensor? mask, bool lstm) -> ()", &gate_scan_backward);
}
