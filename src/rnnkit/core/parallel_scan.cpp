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
// keep (B, T, H) bool, zoneout (core/kernels/state_noise.py): true where a unit keeps its previous state
// at step t. h_t = h_{t-1} there is the same recurrence with z_t = 0, so the unit's z is selected to 0
// (not multiplied: a select is exact whatever the gate), forward and backward alike: its state carried
// exactly, lambda passed to step t-1 whole (1 - z = 1), no gradient into its k and v.
// bias (G*H), if given, is added to xz as it is read (xz then projected without it: one pass fewer
// over it than addmm's, which first copies the bias into every row). Forward writes every h_t into hs (B, T, H). Backward, with lambda_t = dL/dh_t = grad_t +
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
inline Coefficients<T> coefficients(const T* x, const T* bias, int64_t H, int64_t j, int64_t n, bool lstm, bool grads) {
  const Vec<T> one(T(1)), zero(T(0)), half(T(0.5));
  Coefficients<T> c;
  // gate k's pre-activation at units j .. j+n: xz, plus the bias where xz was projected without it
  auto pre = [&](int64_t k) { return bias != nullptr ? load(x + k * H + j, n) + load(bias + k * H + j, n) : load(x + k * H + j, n); };
  const Vec<T> v = pre(lstm ? 2 : 1);
  const Vec<T> below = sigmoid(at::vec::minimum(v, zero));
  const Vec<T> nonneg = v >= zero;
  c.g = Vec<T>::blendv(below, v + half, nonneg);
  if (grads) c.dg = Vec<T>::blendv(below * (one - below), one, nonneg);
  if (lstm) {
    const Vec<T> kf = pre(0), ki = pre(1);
    const Vec<T> nf = zero - kf, ni = zero - ki;
    const Vec<T> m = at::vec::maximum(zero, at::vec::maximum(nf, ni));
    const Vec<T> em = exp_(zero - m);
    const Vec<T> a = em + exp_(nf - m), b = em + exp_(ni - m);
    c.z = a / (a + b);
    if (grads) c.f1 = sigmoid(nf), c.i1 = sigmoid(ni);
  } else {
    c.z = sigmoid(pre(0));
  }
  return c;
}

// zoneout's keep (B, T, H) bool, checked, or nullptr without zoneout
const bool* zoneout_mask(const std::optional<Tensor>& keep, int64_t B, int64_t T, int64_t H) {
  if (!keep.has_value()) return nullptr;
  check(*keep, "the zoneout mask");
  TORCH_CHECK(keep->sizes() == at::IntArrayRef({B, T, H}) && keep->scalar_type() == at::kBool,
              "rnnkit native: zoneout: keep (B, T, H), bool");
  return keep->data_ptr<bool>();
}

// zoneout flags of units j .. j+n (bool, one byte each) as a lane mask, all ones where the unit keeps its
// state: a whole vector's converted in a loop of fixed trip count, which the compiler vectorises (native.h's
// kept_lanes, for any n, converts lane by lane: measured 1.4x the scan's time at 64 x 32 x 256, 1 thread)
template <typename T>
inline Vec<T> kept(const bool* keep, int64_t n) {
  constexpr int64_t L = Vec<T>::size();
  if (n != L) return kept_lanes<T>(keep, n);
  alignas(64) T v[L];
  const auto* bytes = reinterpret_cast<const uint8_t*>(keep);
  for (int64_t k = 0; k < L; ++k) v[k] = static_cast<T>(bytes[k]);
  return Vec<T>::loadu(v) != Vec<T>(T(0));
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

void gate_scan_forward(const Tensor& xz, const std::optional<Tensor>& bias, const Tensor& h0, const Tensor& hs,
                       const std::optional<Tensor>& mask, bool lstm, const std::optional<Tensor>& keep) {
  check_all("a scan buffer", xz, h0, hs);
  const int64_t B = xz.size(0), T = xz.size(1), H = hs.size(2), G = lstm ? 3 : 2;
  TORCH_CHECK(xz.size(2) == G * H && h0.size(0) == B && h0.size(1) == H && hs.size(1) == T,
              "rnnkit native: xz, h0 and hs disagree on the sizes");
  TORCH_CHECK(!bias.has_value() || bias->numel() == G * H, "rnnkit native: the bias has not G*H values");
  const bool* kp = zoneout_mask(keep, B, T, H);
  const auto b_dense = contiguous(bias);
  AT_DISPATCH_FLOATING_TYPES(xz.scalar_type(), "rnnkit_gate_scan_forward", [&] {
    using T_ = scalar_t;
    constexpr int64_t L = Vec<T_>::size();
    const T_* xp = xz.data_ptr<T_>();
    const T_* bp = ptr<T_>(b_dense);
    const T_* h0p = h0.data_ptr<T_>();
    T_* hp = hs.data_ptr<T_>();
    const bool* m = ptr<bool>(mask);
    over_items(B, H, [&](int64_t b, int64_t j0, int64_t j1) {
      // the item's states in place in hs: step t reads row t - 1 (or h0), a few KiB still in L1
      for (int64_t t = 0; t < T; ++t) {
        const int64_t bt = b * T + t;
        const T_* prev = t == 0 ? h0p + b * H : hp + (bt - 1) * H;
        T_* next = hp + bt * H;
        const bool valid = m == nullptr || m[bt];
        for (int64_t j = j0; j < j1; j += L) {
          const int64_t n = std::min<int64_t>(L, j1 - j);
          Vec<T_> h = load(prev + j, n);
          if (valid) {
            auto c = coefficients<T_>(xp + bt * G * H, bp, H, j, n, lstm, false);
            if (kp != nullptr) c.z = Vec<T_>::blendv(c.z, Vec<T_>(T_(0)), kept<T_>(kp + bt * H + j, n));
            h = h + c.z * (c.g - h);
          }
          h.store(next + j, n);
        }
      }
    });
  });
}

void gate_scan_backward(const Tensor& xz, const std::optional<Tensor>& bias, const Tensor& h0, const Tensor& hs,
                        const Tensor& grad, const Tensor& dxz, const Tensor& dh0, const std::optional<Tensor>& mask,
                        bool lstm, const std::optional<Tensor>& keep) {
  check_all("a scan gradient buffer", xz, h0, hs, dxz, dh0);
  const int64_t B = xz.size(0), T = xz.size(1), H = hs.size(2), G = lstm ? 3 : 2;
  TORCH_CHECK(grad.dim() == 3 && grad.size(0) == B && grad.size(1) == T && grad.size(2) == H &&
                  (H == 1 || grad.stride(2) == 1 || grad.stride(2) == 0),
              "rnnkit native: the scan's gradient must be (B, T, H) with a last dimension of stride 1 or 0");
  const int64_t gs = H == 1 ? 1 : grad.stride(2);
  TORCH_CHECK(!bias.has_value() || bias->numel() == G * H, "rnnkit native: the bias has not G*H values");
  const bool* kp = zoneout_mask(keep, B, T, H);
  const auto b_dense = contiguous(bias);
  AT_DISPATCH_FLOATING_TYPES(xz.scalar_type(), "rnnkit_gate_scan_backward", [&] {
    using T_ = scalar_t;
    constexpr int64_t L = Vec<T_>::size();
    const T_* xp = xz.data_ptr<T_>();
    const T_* bp = ptr<T_>(b_dense);
    const T_* hp = hs.data_ptr<T_>();
    const T_* gp = grad.data_ptr<T_>();
    const int64_t gb = grad.stride(0), gt = grad.stride(1);
    T_* dp = dxz.data_ptr<T_>();
    T_* dh0p = dh0.data_ptr<T_>();
    const bool* m = ptr<bool>(mask);
    const Vec<T_> one(T_(1)), zero(T_(0));
    over_items(B, H, [&](int64_t b, int64_t j0, int64_t j1) {
      // lambda_{t+1} and 1 - z_{t+1} of the item's units, carried from step to step in L1
      T_ lam_buf[kScanChunk], a_buf[kScanChunk];
      for (int64_t j = j0; j < j1; ++j) lam_buf[j - j0] = T_(0), a_buf[j - j0] = T_(1);
      for (int64_t t = T - 1; t >= 0; --t) {
        const int64_t bt = b * T + t;
        T_* d = dp + bt * G * H;
        const T_* go = gp + b * gb + t * gt;
        const bool valid = m == nullptr || m[bt];
        for (int64_t j = j0; j < j1; j += L) {
          const int64_t n = std::min<int64_t>(L, j1 - j);
          T_* lp = lam_buf + (j - j0);
          T_* ap = a_buf + (j - j0);
          const Vec<T_> gv = gs == 1 ? load(go + j, n) : Vec<T_>(go[0]);  // a last dim of stride 0: one value
          const Vec<T_> lam = gv + load(ap, n) * load(lp, n);
          lam.store(lp, n);
          if (!valid) {  // padded: z = 0, the state carried
            for (int64_t g = 0; g < G; ++g) zero.store(d + g * H + j, n);
            one.store(ap, n);
            continue;
          }
          auto c = coefficients<T_>(xp + bt * G * H, bp, H, j, n, lstm, true);
          if (kp != nullptr) c.z = Vec<T_>::blendv(c.z, zero, kept<T_>(kp + bt * H + j, n));
          const Vec<T_> lz = lam * c.z;
          const Vec<T_> dk = lz * (c.g - load(hp + bt * H + j, n));
          (lz * c.dg).store(d + (G - 1) * H + j, n);
          if (lstm) {
            (zero - dk * c.f1).store(d + j, n);
            (dk * c.i1).store(d + H + j, n);
          } else {
            dk.store(d + j, n);
          }
          (one - c.z).store(ap, n);
        }
      }
      for (int64_t j = j0; j < j1; j += L) {
        const int64_t n = std::min<int64_t>(L, j1 - j);
        (load(a_buf + (j - j0), n) * load(lam_buf + (j - j0), n)).store(dh0p + b * H + j, n);
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(rnnkit_native, lib) {
  lib.def("gate_scan_forward(Tensor xz, Tensor? bias, Tensor h0, Tensor(a!) hs, Tensor? mask, bool lstm, "
          "Tensor? keep=None) -> ()", &gate_scan_forward);
  lib.def("gate_scan_backward(Tensor xz, Tensor? bias, Tensor h0, Tensor hs, Tensor grad, Tensor(a!) dxz, Tensor(b!) dh0, "
          "Tensor? mask, bool lstm, Tensor? keep=None) -> ()", &gate_scan_backward);
}
