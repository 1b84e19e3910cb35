// The layer-normalised LSTM and GRU (core/cells/ln_lstm.py, ln_gru.py) over time on the CPU, in C++,
// forward and backward (core/kernels/layernorm_loops.py calls them). Compiled with native.cpp into
// one library (core/native.py); what both share is in native.h.
//
// The GRU's input projection and its normalisation, LN(x W_ih^T; gamma_ih, b_ih), are computed for
// all steps beforehand with torch ops (their gradients by autograd): xz below holds them. The LSTM's
// loop takes the projection unnormalised, xr = x W_ih^T (one matmul into a workspace buffer), and
// normalises each row itself (see its section). Per step the recurrent projection h_{t-1} W_hh^T is
// normalised over all G*H gates (a reduction across the whole row), and the LSTM normalises its cell
// state over H on the way to the output, a second one. Those reductions would need every thread's
// blocks of a row between the product and the gate math, two barriers a step, if the threads split
// hidden units as the built-in loops do. Here they split the batch instead: a thread runs its rows
// through every step, product (rnnkit's blocked matmul on its rows), normalisations and gate math,
// and never waits for another thread until the end. The rows of a batch are independent, so nothing
// else is shared; each thread streams the whole recurrent weight per step, where the built-in loops
// stream a share.
//
// Layouts as native.cpp's: xz, xr, gates, hhat, out, dxz, dhz batch-major (B, T, .); the states
// h_0..h_T (and c) time-major (T+1, B, H), or (2, B, H) in inference; mask (B, T) bool, false where
// a sequence is padded (state carried, output 0, no gradient into its gates).
// The GRU saves for backward (training): gates, the activated r, z, n; hhat, the normalised
// recurrent projection before its gain; rstd (B, T), its 1 / sqrt(var + eps). What the LSTM saves
// is in its section. Backward: dh (and dc) come in holding the final state's gradient and leave
// holding the initial state's; dxz gets the gradient of xz (the LSTM's dxr that of xr), dhz that of
// h_{t-1} W_hh^T (zero at padded steps: dW_hh = sum dhz^T h_{t-1} is one matmul afterwards);
// dparams (B, .) each row's sums over time of the gradients of the gains and normalisation biases,
// summed over rows afterwards.
//
// Zoneout and recurrent dropout (core/kernels/state_noise.py) run in the same loops, the *_noisy ops
// at the end (the ops without them keep their schemas), with native.cpp's masks (Noise, native.h):
// the product reads h_{t-1} r where recurrent dropout is on, and a unit zoneout keeps takes its
// previous state back after the step; with it, dW_hh = sum dhz^T (h_{t-1} r).

#include "native.h"

#include <cmath>

namespace {

// Rows per thread at least: fewer would each stream the whole recurrent weight for little work.
constexpr int64_t kLnMinRows = 4;

// mean and 1 / sqrt(var + eps) of v[0 .. m), the variance biased (torch's layer_norm)
template <typename T>
inline std::pair<T, T> moments(const T* v, int64_t m, double eps) {
  constexpr int64_t L = Vec<T>::size();
  Vec<T> s(T(0));
  for (int64_t j = 0; j < m; j += L) s = s + load(v + j, std::min<int64_t>(L, m - j));
  const T mean = lane_sum(s) / T(m);
  const Vec<T> mv(mean), zero(T(0));
  Vec<T> q(T(0));
  for (int64_t j = 0; j < m; j += L) {
    const int64_t n = std::min<int64_t>(L, m - j);
    Vec<T> d = load(v + j, n) - mv;
    if (n < L) d = Vec<T>::set(zero, d, n);
    q = q + d * d;
  }
  return {mean, T(1) / std::sqrt(lane_sum(q) / T(m) + T(eps))};
}

template <typename T>
inline Vec<T> opt(const T* p, int64_t j, int64_t n) {  // an optional bias: zero when absent
  return p != nullptr ? load(p + j, n) : Vec<T>(T(0));
}

// The layer norm's backward over one row of m: given dhat (the gradient of the normalised values
// vhat, the gain already applied) in place, dv = rstd (dhat - mean(dhat) - vhat mean(dhat vhat)).
template <typename T>
inline void ln_backward_row(T* dhat, const T* vhat, int64_t m, T rstd) {
  constexpr int64_t L = Vec<T>::size();
  Vec<T> s1(T(0)), s2(T(0));
  for (int64_t k = 0; k < m; k += L) {
    const int64_t n = std::min<int64_t>(L, m - k);
    const Vec<T> d = load(dhat + k, n);
    s1 = s1 + d;
    s2 = s2 + d * load(vhat + k, n);
  }
  const Vec<T> m1(lane_sum(s1) / T(m)), m2(lane_sum(s2) / T(m)), r(rstd);
  for (int64_t k = 0; k < m; k += L) {
    const int64_t n = std::min<int64_t>(L, m - k);
    ((load(dhat + k, n) - m1 - load(vhat + k, n) * m2) * r).store(dhat + k, n);
  }
}

// The recurrent projection's share of the backward, once dz (the gradient of LN(hz; gamma_hh,
// beta_hh), G*H) is in dz: the gain's and bias's sums for the row (dgh, dbh), then dz becomes the
// gradient of hz itself.
template <typename T>
inline void recurrent_ln_backward(T* dz, const T* hhat, const T* gamma, T* dgh, T* dbh, int64_t m, T rstd) {
  constexpr int64_t L = Vec<T>::size();
  for (int64_t k = 0; k < m; k += L) {
    const int64_t n = std::min<int64_t>(L, m - k);
    const Vec<T> d = load(dz + k, n), hk = load(hhat + k, n);
    (load(dgh + k, n) + d * hk).store(dgh + k, n);
    (load(dbh + k, n) + d).store(dbh + k, n);
    (d * load(gamma + k, n)).store(dz + k, n);
  }
  ln_backward_row(dz, hhat, m, rstd);
}

// Each thread's rows [b0, b1) of hz (B, G*H) = h (B, H) W_hh^T, all blocks of hidden units.
template <typename T>
inline void rows_product(const Blocked<T>& rec, const T* h, int64_t ldh, int64_t b0, int64_t b1, T* y, int64_t ldy,
                         bool accumulate) {
  for (int64_t q = 0; q < rec.nq; ++q) rec(q, h + b0 * ldh, ldh, b1 - b0, y + b0 * ldy, ldy, accumulate);
}

// Recurrent dropout (Noise, native.h): the product of step t reads h_{t-1} r, row t % 2 of hd, where
// the caller wrote h_0 r and each step writes its h_t r for the next; without it, h_{t-1} itself.
// A thread reads and writes only its own rows, so one step's row and the next's never meet.
template <typename T>
inline const T* noisy_input(const Noise<T>& noise, const T* hsp, int64_t now, int64_t t, int64_t B, int64_t H) {
  return noise.r != nullptr ? noise.hd + (t % 2) * B * H : hsp + now * B * H;
}

template <typename T>
inline void drop_next(const Noise<T>& noise, const T* h_next, int64_t t, int64_t b, int64_t B, int64_t H) {
  if (noise.r == nullptr) return;
  constexpr int64_t L = Vec<T>::size();
  T* hd = noise.hd + ((t + 1) % 2) * B * H + b * H;
  const T* r = noise.r + b * H;
  for (int64_t j = 0; j < H; j += L) {
    const int64_t n = std::min<int64_t>(L, H - j);
    (load(h_next + j, n) * load(r + j, n)).store(hd + j, n);
  }
}

// Backward, each thread's rows [b0, b1): dh += dhz_t W_hh, or with recurrent dropout (r (B, H))
// dh += (dhz_t W_hh) r, the product into rd (B, H) first.
template <typename T>
inline void rows_product_back(const Blocked<T>& back, const T* dz, int64_t ldz, int64_t b0, int64_t b1, T* dh,
                              const T* r, T* rd, int64_t H) {
  if (r == nullptr) return rows_product(back, dz, ldz, b0, b1, dh, H, true);
  constexpr int64_t L = Vec<T>::size();
  rows_product(back, dz, ldz, b0, b1, rd, H, false);
  for (int64_t k = b0 * H; k < b1 * H; k += L) {
    const int64_t n = std::min<int64_t>(L, b1 * H - k);
    (load(dh + k, n) + load(rd + k, n) * load(r + k, n)).store(dh + k, n);
  }
}

// ---------------------------------------------------------------------------------------------
// LSTM: z = LN(xr_t; gamma_ih, beta_ih) + LN(h_{t-1} W_hh^T; gamma_hh, beta_hh), xr = x W_ih^T the
// input projection as one matmul, normalised here row by row; i, f, o = sigmoid, g = tanh;
// c_t = f c_{t-1} + i g; h_t = o tanh(LN(c_t; gamma_c, beta_c)).
//
// Training keeps, besides the states, hhat (B, T, 4H) and stats (B, T, 5): per row the input
// projection's mean and 1 / std, the recurrent projection's 1 / std, c_t's mean and 1 / std. The
// backward computes the gates again from xr, hhat and the stats, and c_t's normalised values from
// cs, with the forward's own operations (ln_lstm_gates), and writes the gradient of
// h_{t-1} W_hh^T over hhat, row by row (the row read into scratch first). So a training call holds
// three (B, T, 4H) tensors at most (xr, hhat, the gradient of xr), against the LSTM's two, and
// seven with the projection normalised by torch ops and the gates kept (the projection, its
// normalised copy and that one's gradient, the gates, hhat, dxz, dhz). At long sequences each is
// larger than any cache and, beyond what the workspace keeps, fresh memory each call: held that
// way, at T=4096 (B=32, H=512, one thread) the backward spent about a third of its time in the
// kernel faulting pages in, against an eighth for the LSTM's.

constexpr int64_t kLnLstmStats = 5;  // stats per row and step: input mean, input 1/std, recurrent 1/std, c mean, c 1/std

template <typename T>
struct LnLstmParams {
  const T* gih;  // gamma_ih
  const T* bih;  // beta_ih (the cell's bias_ih), or null
  const T* ghh;  // gamma_hh
  const T* bhh;  // beta_hh, or null
};

// The activated i, f, g, o of block j .. j+n of one row from xr's row x (its mean and 1 / std as
// vectors) and the normalised recurrent projection v: forward and backward both call this, so the
// backward's gates are the forward's.
template <typename T>
__attribute__((always_inline)) inline void ln_lstm_gates(const T* x, const Vec<T>* v, const LnLstmParams<T>& p,
                                                         const Vec<T>& xm, const Vec<T>& xs, int64_t H, int64_t j,
                                                         int64_t n, Vec<T>* a) {
  Vec<T> z[4];
  for (int64_t k = 0; k < 4; ++k) {
    const int64_t o = k * H + j;
    const Vec<T> xn = (load(x + o, n) - xm) * xs;
    z[k] = xn * load(p.gih + o, n) + opt(p.bih, o, n) + v[k] * load(p.ghh + o, n) + opt(p.bhh, o, n);
  }
  a[0] = sigmoid(z[0]), a[1] = sigmoid(z[1]), a[2] = tanh_(z[2]), a[3] = sigmoid(z[3]);
}

// r, hd, keep: recurrent dropout and zoneout (Noise, native.h), or none. With zoneout, stats keep the
// new c_t's moments (the normalisation the output read), not the kept state's.
void ln_lstm_forward_noisy(const Tensor& xr, const Tensor& gamma_ih, const std::optional<Tensor>& beta_ih,
                           const Tensor& w_hh, const Tensor& gamma_hh, const std::optional<Tensor>& beta_hh,
                           const Tensor& gamma_c, const std::optional<Tensor>& beta_c, const Tensor& hs,
                           const Tensor& cs, const Tensor& out, const std::optional<Tensor>& hhat,
                           const std::optional<Tensor>& stats, const std::optional<Tensor>& mask, double eps,
                           const std::optional<Tensor>& r, const std::optional<Tensor>& hd,
                           const std::optional<Tensor>& keep) {
  check_all("a layer-normalised LSTM buffer", xr, hs, cs, out, gamma_ih, gamma_hh, gamma_c);
  const int64_t B = xr.size(0), T = xr.size(1), H = hs.size(2), S = hs.size(0);
  TORCH_CHECK(xr.size(2) == 4 * H && w_hh.size(0) == 4 * H && w_hh.size(1) == H,
              "rnnkit native: xr, W_hh and the states disagree on the hidden size");
  TORCH_CHECK(hhat.has_value() == stats.has_value(), "rnnkit native: training keeps hhat and stats together");
  if (hhat.has_value()) {
    check_all("a layer-normalised LSTM buffer", *hhat, *stats);
    TORCH_CHECK(hhat->sizes() == xr.sizes() && stats->numel() == B * T * kLnLstmStats && S == T + 1,
                "rnnkit native: training keeps hhat (B, T, 4H), stats (B, T, 5) and T + 1 states");
  }
  const auto bi = contiguous(beta_ih), bh = contiguous(beta_hh), bc = contiguous(beta_c);
  AT_DISPATCH_FLOATING_TYPES(xr.scalar_type(), "rnnkit_ln_lstm_forward", [&] {
    using T_ = scalar_t;
    constexpr int64_t L = Vec<T_>::size();
    const Blocked<T_> rec(w_hh, 4, std::nullopt);
    const Tensor hz_buffer = at::empty({B, 4 * H}, xr.options());
    T_* hz = hz_buffer.data_ptr<T_>();
    const T_* xp = xr.data_ptr<T_>();
    const LnLstmParams<T_> prm{gamma_ih.data_ptr<T_>(), ptr<T_>(bi), gamma_hh.data_ptr<T_>(), ptr<T_>(bh)};
    const T_* gc = gamma_c.data_ptr<T_>();
    const T_* bcp = ptr<T_>(bc);
    T_* hsp = hs.data_ptr<T_>();
    T_* csp = cs.data_ptr<T_>();
    T_* outp = out.data_ptr<T_>();
    T_* hhp = ptr<T_>(hhat);
    T_* sp = ptr<T_>(stats);
    const bool* m = ptr<bool>(mask);
    const Noise<T_> noise = noise_from<T_>(r, hd, keep, {&hs, &cs}, out);
    at::parallel_for(0, B, kLnMinRows, [&](int64_t b0, int64_t b1) {
      for (int64_t t = 0; t < T; ++t) {
        const int64_t now = t % S, next = (t + 1) % S;
        rows_product(rec, noisy_input(noise, hsp, now, t, B, H), H, b0, b1, hz, 4 * H, false);
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t bt = b * T + t;
          const T_* c_prev = csp + (now * B + b) * H;
          const T_* h_prev = hsp + (now * B + b) * H;
          T_* c_next = csp + (next * B + b) * H;
          T_* h_next = hsp + (next * B + b) * H;
          if (m != nullptr && !m[bt]) {  // padded: the state carried, the output 0
            for (int64_t j = 0; j < H; j += L) {
              const int64_t n = std::min<int64_t>(L, H - j);
              load(c_prev + j, n).store(c_next + j, n);
              load(h_prev + j, n).store(h_next + j, n);
              Vec<T_>(T_(0)).store(outp + bt * H + j, n);
            }
            drop_next(noise, h_next, t, b, B, H);
            continue;
          }
          const T_* x = xp + bt * 4 * H;
          const auto [xmean, xrs] = moments(x, 4 * H, eps);
          T_* r = hz + b * 4 * H;  // its output gate is written over its own block once read
          const auto [mean, rs] = moments(r, 4 * H, eps);
          const Vec<T_> mv(mean), rv(rs), xm(xmean), xs(xrs);
          T_* hh = hhp != nullptr ? hhp + bt * 4 * H : nullptr;
          for (int64_t j = 0; j < H; j += L) {
            const int64_t n = std::min<int64_t>(L, H - j);
            Vec<T_> v[4], a[4];
            for (int64_t k = 0; k < 4; ++k) {
              v[k] = (load(r + k * H + j, n) - mv) * rv;
              if (hh != nullptr) v[k].store(hh + k * H + j, n);
            }
            ln_lstm_gates(x, v, prm, xm, xs, H, j, n, a);
            a[3].store(r + 3 * H + j, n);
            (a[1] * load(c_prev + j, n) + a[0] * a[2]).store(c_next + j, n);
          }
          const auto [cmean, crs] = moments(c_next, H, eps);
          const Vec<T_> cm(cmean), cr(crs);
          for (int64_t j = 0; j < H; j += L) {
            const int64_t n = std::min<int64_t>(L, H - j);
            const Vec<T_> c = load(c_next + j, n), v = (c - cm) * cr;
            Vec<T_> h = load(r + 3 * H + j, n) * tanh_(v * load(gc + j, n) + opt(bcp, j, n));
            if (noise.keep != nullptr) {  // zoneout: the kept units take their previous h and c back
              const Vec<T_> kept = kept_lanes<T_>(noise.keep + bt * H + j, n);
              h = Vec<T_>::blendv(h, load(h_prev + j, n), kept);
              Vec<T_>::blendv(c, load(c_prev + j, n), kept).store(c_next + j, n);
            }
            h.store(h_next + j, n);
            h.store(outp + bt * H + j, n);
          }
          if (sp != nullptr) {
            T_* s = sp + bt * kLnLstmStats;
            s[0] = xmean, s[1] = xrs, s[2] = rs, s[3] = cmean, s[4] = crs;
          }
          drop_next(noise, h_next, t, b, B, H);
        }
      }
    });
  });
}

// hhat comes in holding the forward's normalised recurrent projections and leaves holding the
// gradient of h_{t-1} W_hh^T (zero at padded steps); dxr gets the gradient of xr; dparams (B, 18H)
// each row's sums of the gradients of gamma_hh, beta_hh (4H each), gamma_c, beta_c (H each),
// gamma_ih, beta_ih (4H each). r, keep: the forward's recurrent dropout and zoneout masks, or none.
// Zoneout: a kept unit's h_t and c_t are its h_{t-1} and c_{t-1}, so the gradients reaching them pass
// to step t-1; its new c_t (f c_{t-1} + i g, computed again here: cs holds the kept one) was discarded
// but still entered the normalisation of c_t over H that the other units' outputs read, so its gates
// and c_{t-1} take that share of the gradient too.
void ln_lstm_backward_noisy(const Tensor& xr, const Tensor& hhat, const Tensor& stats, const Tensor& cs,
                            const std::optional<Tensor>& gout, const Tensor& w_hh, const Tensor& gamma_ih,
                            const std::optional<Tensor>& beta_ih, const Tensor& gamma_hh,
                            const std::optional<Tensor>& beta_hh, const Tensor& gamma_c,
                            const std::optional<Tensor>& beta_c, const Tensor& dh, const Tensor& dc, const Tensor& dxr,
                            const Tensor& dparams, const std::optional<Tensor>& mask, const std::optional<Tensor>& r,
                            const std::optional<Tensor>& keep) {
  check_all("a layer-normalised LSTM gradient buffer", xr, hhat, stats, cs, dh, dc, dxr, dparams, gamma_ih, gamma_hh,
            gamma_c);
  const int64_t B = xr.size(0), T = xr.size(1), H = dh.size(1);
  TORCH_CHECK(w_hh.is_contiguous() && dparams.size(1) == 18 * H && hhat.sizes() == xr.sizes() &&
                  dxr.sizes() == xr.sizes() && stats.numel() == B * T * kLnLstmStats,
              "rnnkit native: W_hh, hhat, dxr, stats or dparams malformed");
  const Gout go(gout);
  const auto bi = contiguous(beta_ih), bh = contiguous(beta_hh), bc = contiguous(beta_c);
  AT_DISPATCH_FLOATING_TYPES(xr.scalar_type(), "rnnkit_ln_lstm_backward", [&] {
    using T_ = scalar_t;
    constexpr int64_t L = Vec<T_>::size();
    const Blocked<T_> back(w_hh.t(), 1, std::nullopt);
    // per row: the gates (4H), a saved row (4H: xr's normalised values, then hhat's), the gradient of
    // z (4H), of the normalised c_t (H) and c_t's normalised values (H)
    const Tensor scratch_buffer = at::empty({B, 14 * H}, xr.options());
    T_* scratch = scratch_buffer.data_ptr<T_>();
    const T_* xp = xr.data_ptr<T_>();
    T_* hhp = hhat.data_ptr<T_>();
    const T_* sp = stats.data_ptr<T_>();
    const T_* csp = cs.data_ptr<T_>();
    const T_* rp = backward_noise<T_>(r, keep, B, T, H);
    const bool* kp = ptr<bool>(keep);
    const Tensor rd_buffer = rp != nullptr ? at::empty({B, H}, xr.options()) : Tensor();
    T_* rd = rp != nullptr ? rd_buffer.data_ptr<T_>() : nullptr;
    const LnLstmParams<T_> prm{gamma_ih.data_ptr<T_>(), ptr<T_>(bi), gamma_hh.data_ptr<T_>(), ptr<T_>(bh)};
    const T_* gih = prm.gih;
    const T_* ghh = prm.ghh;
    const T_* gc = gamma_c.data_ptr<T_>();
    const T_* bcp = ptr<T_>(bc);
    T_* dhp = dh.data_ptr<T_>();
    T_* dcp = dc.data_ptr<T_>();
    T_* dxp = dxr.data_ptr<T_>();
    T_* dpp = dparams.data_ptr<T_>();
    const bool* m = ptr<bool>(mask);
    const Vec<T_> one(T_(1)), zero(T_(0));
    at::parallel_for(0, B, kLnMinRows, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        for (int64_t k = 0; k < 18 * H; ++k) dpp[b * 18 * H + k] = T_(0);
      }
      for (int64_t t = T - 1; t >= 0; --t) {
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t bt = b * T + t;
          T_* dx = dxp + bt * 4 * H;
          T_* hh = hhp + bt * 4 * H;  // hhat in, the gradient of h_{t-1} W_hh^T out
          if (m != nullptr && !m[bt]) {  // padded: no gradient into the gates; dh, dc carried
            for (int64_t k = 0; k < 4 * H; k += L) {
              const int64_t n = std::min<int64_t>(L, 4 * H - k);
              zero.store(dx + k, n), zero.store(hh + k, n);
            }
            continue;
          }
          const T_* x = xp + bt * 4 * H;
          const T_* st = sp + bt * kLnLstmStats;
          T_* g = scratch + b * 14 * H;
          T_* saved = g + 4 * H;
          T_* d = g + 8 * H;
          T_* dch = g + 12 * H;
          T_* ch = g + 13 * H;
          const T_* c_t = csp + ((t + 1) * B + b) * H;
          const T_* c_prev = csp + (t * B + b) * H;
          T_* hrow = dhp + b * H;
          T_* crow = dcp + b * H;
          T_* dp = dpp + b * 18 * H;  // dgamma_hh, dbeta_hh (4H each), dgamma_c, dbeta_c (H each), dgamma_ih, dbeta_ih
          const T_* go_row = go.row<T_>(b, t);
          {
            const Vec<T_> xm(st[0]), xs(st[1]);
            for (int64_t j = 0; j < H; j += L) {  // the forward's gates again
              const int64_t n = std::min<int64_t>(L, H - j);
              Vec<T_> v[4], a[4];
              for (int64_t k = 0; k < 4; ++k) v[k] = load(hh + k * H + j, n);
              ln_lstm_gates(x, v, prm, xm, xs, H, j, n, a);
              for (int64_t k = 0; k < 4; ++k) a[k].store(g + k * H + j, n);
            }
          }
          // h_t = o tanh(y), y = gamma_c chat + beta_c: the output gate's and y's gradients
          const Vec<T_> cm(st[3]), cr(st[4]);
          for (int64_t j = 0; j < H; j += L) {
            const int64_t n = std::min<int64_t>(L, H - j);
            const Zone<T_> zone(kp, bt * H + j, n);
            Vec<T_> c = load(c_t + j, n);
            if (zone.on) {  // a kept unit's new c_t, as the forward computed it
              const Vec<T_> fresh = load(g + H + j, n) * load(c_prev + j, n) + load(g + j, n) * load(g + 2 * H + j, n);
              c = Vec<T_>::blendv(c, fresh, zone.kept);
            }
            const Vec<T_> c_hat = (c - cm) * cr;  // as the forward computed it
            c_hat.store(ch + j, n);
            const Vec<T_> dht = zone.fresh(with_gout(hrow, go_row, j, n)), o = load(g + 3 * H + j, n);
            const Vec<T_> th = tanh_(c_hat * load(gc + j, n) + opt(bcp, j, n));
            const Vec<T_> dy = dht * o * (one - th * th);
            (dht * th * o * (one - o)).store(d + 3 * H + j, n);
            (load(dp + 8 * H + j, n) + dy * c_hat).store(dp + 8 * H + j, n);
            (load(dp + 9 * H + j, n) + dy).store(dp + 9 * H + j, n);
            (dy * load(gc + j, n)).store(dch + j, n);
          }
          ln_backward_row(dch, ch, H, st[4]);  // dch: the gradient of c_t through the output
          for (int64_t j = 0; j < H; j += L) {
            const int64_t n = std::min<int64_t>(L, H - j);
            const Zone<T_> zone(kp, bt * H + j, n);  // zoneout: the kept units' gradients pass to step t-1
            const Vec<T_> dc_all = load(crow + j, n);
            const Vec<T_> dct = zone.fresh(dc_all) + load(dch + j, n);
            const Vec<T_> i = load(g + j, n), f = load(g + H + j, n), gg = load(g + 2 * H + j, n);
            (dct * gg * i * (one - i)).store(d + j, n);
            (dct * load(c_prev + j, n) * f * (one - f)).store(d + H + j, n);
            (dct * i * (one - gg * gg)).store(d + 2 * H + j, n);
            zone.prev(dct * f, dct * f + dc_all).store(crow + j, n);
            // h_t was computed: its gradient goes on through the product below (a kept one's to h_{t-1})
            zone.prev(zero, with_gout(hrow, go_row, j, n)).store(hrow + j, n);
          }
          // the input projection's normalisation: dgamma_ih, dbeta_ih and the gradient of xr
          {
            const Vec<T_> xm(st[0]), xs(st[1]);
            for (int64_t k = 0; k < 4 * H; k += L) {
              const int64_t n = std::min<int64_t>(L, 4 * H - k);
              const Vec<T_> xhat = (load(x + k, n) - xm) * xs, dz = load(d + k, n);
              xhat.store(saved + k, n);
              (load(dp + 10 * H + k, n) + dz * xhat).store(dp + 10 * H + k, n);
              (load(dp + 14 * H + k, n) + dz).store(dp + 14 * H + k, n);
              (dz * load(gih + k, n)).store(dx + k, n);
            }
            ln_backward_row(dx, saved, 4 * H, st[1]);
          }
          // the recurrent projection's, into hhat's row
          for (int64_t k = 0; k < 4 * H; k += L) {
            const int64_t n = std::min<int64_t>(L, 4 * H - k);
            load(hh + k, n).store(saved + k, n);
            load(d + k, n).store(hh + k, n);
          }
          recurrent_ln_backward(hh, saved, ghh, dp, dp + 4 * H, 4 * H, st[2]);
        }
        rows_product_back(back, hhp + t * 4 * H, T * 4 * H, b0, b1, dhp, rp, rd, H);  // dh += dhz_t W_hh
      }
    });
  });
}

// ---------------------------------------------------------------------------------------------
// GRU: a = xz_t, hb = LN(h_{t-1} W_hh^T; gamma_hh, beta_hh); r, z = sigmoid(a + hb);
// n = tanh(a_n + r hb_n); h_t = n + z (h_{t-1} - n).

// r, hd, keep: recurrent dropout and zoneout (Noise, native.h), or none; the product reads h_{t-1} r,
// the z (h_{t-1} - n) term h_{t-1} itself. gates keep the new r, z, n of every unit, kept or not.
void ln_gru_forward_noisy(const Tensor& xz, const Tensor& w_hh, const Tensor& gamma_hh,
                          const std::optional<Tensor>& beta_hh, const Tensor& hs, const Tensor& out,
                          const std::optional<Tensor>& gates, const std::optional<Tensor>& hhat,
                          const std::optional<Tensor>& rstd, const std::optional<Tensor>& mask, double eps,
                          const std::optional<Tensor>& r, const std::optional<Tensor>& hd,
                          const std::optional<Tensor>& keep) {
  check_all("a layer-normalised GRU buffer", xz, hs, out, gamma_hh);
  const int64_t B = xz.size(0), T = xz.size(1), H = hs.size(2), S = hs.size(0);
  TORCH_CHECK(xz.size(2) == 3 * H && w_hh.size(0) == 3 * H && w_hh.size(1) == H,
              "rnnkit native: xz, W_hh and the states disagree on the hidden size");
  TORCH_CHECK(!gates.has_value() || (hhat.has_value() && rstd.has_value()),
              "rnnkit native: training keeps gates, hhat and rstd together");
  const auto bh = contiguous(beta_hh);
  AT_DISPATCH_FLOATING_TYPES(xz.scalar_type(), "rnnkit_ln_gru_forward", [&] {
    using T_ = scalar_t;
    constexpr int64_t L = Vec<T_>::size();
    const Blocked<T_> rec(w_hh, 3, std::nullopt);
    const Tensor hz_buffer = at::empty({B, 3 * H}, xz.options());
    T_* hz = hz_buffer.data_ptr<T_>();
    const T_* xp = xz.data_ptr<T_>();
    const T_* gh = gamma_hh.data_ptr<T_>();
    const T_* bhp = ptr<T_>(bh);
    T_* hsp = hs.data_ptr<T_>();
    T_* outp = out.data_ptr<T_>();
    T_* gp = ptr<T_>(gates);
    T_* hhp = ptr<T_>(hhat);
    T_* rp = ptr<T_>(rstd);
    const bool* m = ptr<bool>(mask);
    const Noise<T_> noise = noise_from<T_>(r, hd, keep, {&hs}, out);
    at::parallel_for(0, B, kLnMinRows, [&](int64_t b0, int64_t b1) {
      for (int64_t t = 0; t < T; ++t) {
        const int64_t now = t % S, next = (t + 1) % S;
        rows_product(rec, noisy_input(noise, hsp, now, t, B, H), H, b0, b1, hz, 3 * H, false);
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t bt = b * T + t;
          const T_* h_prev = hsp + (now * B + b) * H;
          T_* h_next = hsp + (next * B + b) * H;
          if (m != nullptr && !m[bt]) {
            for (int64_t j = 0; j < H; j += L) {
              const int64_t n = std::min<int64_t>(L, H - j);
              load(h_prev + j, n).store(h_next + j, n);
              Vec<T_>(T_(0)).store(outp + bt * H + j, n);
            }
            drop_next(noise, h_next, t, b, B, H);
            continue;
          }
          const T_* r = hz + b * 3 * H;
          const auto [mean, rs] = moments(r, 3 * H, eps);
          const Vec<T_> mv(mean), rv(rs);
          const T_* x = xp + bt * 3 * H;
          T_* g = gp != nullptr ? gp + bt * 3 * H : nullptr;
          T_* hh = hhp != nullptr ? hhp + bt * 3 * H : nullptr;
          for (int64_t j = 0; j < H; j += L) {
            const int64_t n = std::min<int64_t>(L, H - j);
            Vec<T_> hb[3];
            for (int64_t k = 0; k < 3; ++k) {
              const int64_t o = k * H + j;
              const Vec<T_> v = (load(r + o, n) - mv) * rv;
              if (hh != nullptr) v.store(hh + o, n);
              hb[k] = v * load(gh + o, n) + opt(bhp, o, n);
            }
            const Vec<T_> rr = sigmoid(load(x + j, n) + hb[0]), zz = sigmoid(load(x + H + j, n) + hb[1]);
            const Vec<T_> nn = tanh_(load(x + 2 * H + j, n) + rr * hb[2]);
            if (g != nullptr) rr.store(g + j, n), zz.store(g + H + j, n), nn.store(g + 2 * H + j, n);
            const Vec<T_> hp = load(h_prev + j, n);
            Vec<T_> h = nn + zz * (hp - nn);
            if (noise.keep != nullptr) h = Vec<T_>::blendv(h, hp, kept_lanes<T_>(noise.keep + bt * H + j, n));
            h.store(h_next + j, n);
            h.store(outp + bt * H + j, n);
          }
          if (rp != nullptr) rp[bt] = rs;
          drop_next(noise, h_next, t, b, B, H);
        }
      }
    });
  });
}

// r, keep: the forward's recurrent dropout and zoneout masks, or none
void ln_gru_backward_noisy(const Tensor& gates, const Tensor& hhat, const Tensor& rstd, const Tensor& hs,
                           const std::optional<Tensor>& gout, const Tensor& w_hh, const Tensor& gamma_hh,
                           const std::optional<Tensor>& beta_hh, const Tensor& dh, const Tensor& dxz,
                           const Tensor& dhz, const Tensor& dparams, const std::optional<Tensor>& mask,
                           const std::optional<Tensor>& r, const std::optional<Tensor>& keep) {
  check_all("a layer-normalised GRU gradient buffer", gates, hhat, rstd, hs, dh, dxz, dhz, dparams, gamma_hh);
  const int64_t B = gates.size(0), T = gates.size(1), H = dh.size(1);
  TORCH_CHECK(w_hh.is_contiguous() && dparams.size(1) == 6 * H, "rnnkit native: W_hh or dparams malformed");
  const Gout go(gout);
  const auto bh = contiguous(beta_hh);
  AT_DISPATCH_FLOATING_TYPES(gates.scalar_type(), "rnnkit_ln_gru_backward", [&] {
    using T_ = scalar_t;
    constexpr int64_t L = Vec<T_>::size();
    const Blocked<T_> back(w_hh.t(), 1, std::nullopt);
    const T_* gp = gates.data_ptr<T_>();
    const T_* hhp = hhat.data_ptr<T_>();
    const T_* rp = rstd.data_ptr<T_>();
    const T_* hsp = hs.data_ptr<T_>();
    const T_* gh = gamma_hh.data_ptr<T_>();
    const T_* bhp = ptr<T_>(bh);
    T_* dhp = dh.data_ptr<T_>();
    T_* dxp = dxz.data_ptr<T_>();
    T_* dzp = dhz.data_ptr<T_>();
    T_* dpp = dparams.data_ptr<T_>();
    const bool* m = ptr<bool>(mask);
    const T_* dropp = backward_noise<T_>(r, keep, B, T, H);
    const bool* kp = ptr<bool>(keep);
    const Tensor rd_buffer = dropp != nullptr ? at::empty({B, H}, gates.options()) : Tensor();
    T_* rd = dropp != nullptr ? rd_buffer.data_ptr<T_>() : nullptr;
    const Vec<T_> one(T_(1)), zero(T_(0));
    at::parallel_for(0, B, kLnMinRows, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        for (int64_t k = 0; k < 6 * H; ++k) dpp[b * 6 * H + k] = T_(0);
      }
      for (int64_t t = T - 1; t >= 0; --t) {
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t bt = b * T + t;
          T_* d = dxp + bt * 3 * H;
          T_* dz = dzp + bt * 3 * H;
          if (m != nullptr && !m[bt]) {
            for (int64_t k = 0; k < 3 * H; k += L) {
              const int64_t n = std::min<int64_t>(L, 3 * H - k);
              zero.store(d + k, n), zero.store(dz + k, n);
            }
            continue;
          }
          const T_* g = gp + bt * 3 * H;
          const T_* hh = hhp + bt * 3 * H;
          const T_* h_prev = hsp + (t * B + b) * H;
          T_* hrow = dhp + b * H;
          const T_* go_row = go.row<T_>(b, t);
          for (int64_t j = 0; j < H; j += L) {
            const int64_t n = std::min<int64_t>(L, H - j);
            const Zone<T_> zone(kp, bt * H + j, n);  // zoneout: the kept units' gradients pass to step t-1
            const Vec<T_> dh_all = with_gout(hrow, go_row, j, n), dht = zone.fresh(dh_all);
            const Vec<T_> rr = load(g + j, n), zz = load(g + H + j, n), nn = load(g + 2 * H + j, n);
            const Vec<T_> dpn = dht * (one - zz) * (one - nn * nn);  // of n's pre-activation
            const Vec<T_> hb_n = load(hh + 2 * H + j, n) * load(gh + 2 * H + j, n) + opt(bhp, 2 * H + j, n);
            const Vec<T_> dr = dpn * hb_n * rr * (one - rr);
            const Vec<T_> dzz = dht * (load(h_prev + j, n) - nn) * zz * (one - zz);
            dr.store(d + j, n), dzz.store(d + H + j, n), dpn.store(d + 2 * H + j, n);
            dr.store(dz + j, n), dzz.store(dz + H + j, n), (dpn * rr).store(dz + 2 * H + j, n);
            zone.prev(dht * zz, dh_all).store(hrow + j, n);  // the direct path; the product below adds the gates'
          }
          T_* dp = dpp + b * 6 * H;
          recurrent_ln_backward(dz, hh, gh, dp, dp + 3 * H, 3 * H, rp[bt]);
        }
        rows_product_back(back, dzp + t * 3 * H, T * 3 * H, b0, b1, dhp, dropp, rd, H);
      }
    });
  });
}

// -- the loops without zoneout and recurrent dropout: their schemas as before the masks ------------

void ln_lstm_forward(const Tensor& xr, const Tensor& gamma_ih, const std::optional<Tensor>& beta_ih, const Tensor& w_hh,
                     const Tensor& gamma_hh, const std::optional<Tensor>& beta_hh, const Tensor& gamma_c,
                     const std::optional<Tensor>& beta_c, const Tensor& hs, const Tensor& cs, const Tensor& out,
                     const std::optional<Tensor>& hhat, const std::optional<Tensor>& stats,
                     const std::optional<Tensor>& mask, double eps) {
  ln_lstm_forward_noisy(xr, gamma_ih, beta_ih, w_hh, gamma_hh, beta_hh, gamma_c, beta_c, hs, cs, out, hhat, stats, mask,
                        eps, std::nullopt, std::nullopt, std::nullopt);
}

void ln_lstm_backward(const Tensor& xr, const Tensor& hhat, const Tensor& stats, const Tensor& cs,
                      const std::optional<Tensor>& gout, const Tensor& w_hh, const Tensor& gamma_ih,
                      const std::optional<Tensor>& beta_ih, const Tensor& gamma_hh,
                      const std::optional<Tensor>& beta_hh, const Tensor& gamma_c, const std::optional<Tensor>& beta_c,
                      const Tensor& dh, const Tensor& dc, const Tensor& dxr, const Tensor& dparams,
                      const std::optional<Tensor>& mask) {
  ln_lstm_backward_noisy(xr, hhat, stats, cs, gout, w_hh, gamma_ih, beta_ih, gamma_hh, beta_hh, gamma_c, beta_c, dh, dc,
                         dxr, dparams, mask, std::nullopt, std::nullopt);
}

void ln_gru_forward(const Tensor& xz, const Tensor& w_hh, const Tensor& gamma_hh, const std::optional<Tensor>& beta_hh,
                    const Tensor& hs, const Tensor& out, const std::optional<Tensor>& gates,
                    const std::optional<Tensor>& hhat, const std::optional<Tensor>& rstd,
                    const std::optional<Tensor>& mask, double eps) {
  ln_gru_forward_noisy(xz, w_hh, gamma_hh, beta_hh, hs, out, gates, hhat, rstd, mask, eps, std::nullopt, std::nullopt,
                       std::nullopt);
}

void ln_gru_backward(const Tensor& gates, const Tensor& hhat, const Tensor& rstd, const Tensor& hs,
                     const std::optional<Tensor>& gout, const Tensor& w_hh, const Tensor& gamma_hh,
                     const std::optional<Tensor>& beta_hh, const Tensor& dh, const Tensor& dxz, const Tensor& dhz,
                     const Tensor& dparams, const std::optional<Tensor>& mask) {
  ln_gru_backward_noisy(gates, hhat, rstd, hs, gout, w_hh, gamma_hh, beta_hh, dh, dxz, dhz, dparams, mask, std::nullopt,
                        std::nullopt);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(rnnkit_native, lib) {
  lib.def("ln_lstm_forward(Tensor xr, Tensor gamma_ih, Tensor? beta_ih, Tensor w_hh, Tensor gamma_hh, Tensor? beta_hh, "
          "Tensor gamma_c, Tensor? beta_c, Tensor(a!) hs, Tensor(b!) cs, Tensor(c!) out, Tensor(d!)? hhat, "
          "Tensor(e!)? stats, Tensor? mask, float eps) -> ()", &ln_lstm_forward);
  lib.def("ln_lstm_backward(Tensor xr, Tensor(a!) hhat, Tensor stats, Tensor cs, Tensor? gout, Tensor w_hh, "
          "Tensor gamma_ih, Tensor? beta_ih, Tensor gamma_hh, Tensor? beta_hh, Tensor gamma_c, Tensor? beta_c, "
          "Tensor(b!) dh, Tensor(c!) dc, Tensor(d!) dxr, Tensor(e!) dparams, Tensor? mask) -> ()", &ln_lstm_backward);
  lib.def("ln_gru_forward(Tensor xz, Tensor w_hh, Tensor gamma_hh, Tensor? beta_hh, Tensor(a!) hs, Tensor(b!) out, "
          "Tensor(c!)? gates, Tensor(d!)? hhat, Tensor(e!)? rstd, Tensor? mask, float eps) -> ()", &ln_gru_forward);
  lib.def("ln_gru_backward(Tensor gates, Tensor hhat, Tensor rstd, Tensor hs, Tensor? gout, Tensor w_hh, "
          "Tensor gamma_hh, Tensor? beta_hh, Tensor(a!) dh, Tensor(b!) dxz, Tensor(c!) dhz, Tensor(d!) dparams, "
          "Tensor? mask) -> ()", &ln_gru_backward);
  // the same loops with zoneout and recurrent dropout (core/kernels/state_noise.py), as native.cpp's
  // *_noisy ops: r (B, H) the recurrent dropout mask, hd (2, B, H) its buffer, keep (B, T, H) the
  // zoneout mask (bool, true: keep); CPU kernels, their fakes in core/kernels/base.py
  lib.def("ln_lstm_forward_noisy(Tensor xr, Tensor gamma_ih, Tensor? beta_ih, Tensor w_hh, Tensor gamma_hh, "
          "Tensor? beta_hh, Tensor gamma_c, Tensor? beta_c, Tensor(a!) hs, Tensor(b!) cs, Tensor(c!) out, "
          "Tensor(d!)? hhat, Tensor(e!)? stats, Tensor? mask, float eps, Tensor? r, Tensor(f!)? hd, "
          "Tensor? keep) -> ()",
          torch::dispatch(c10::DispatchKey::CPU, &ln_lstm_forward_noisy));
  lib.def("ln_lstm_backward_noisy(Tensor xr, Tensor(a!) hhat, Tensor stats, Tensor cs, Tensor? gout, Tensor w_hh, "
          "Tensor gamma_ih, Tensor? beta_ih, Tensor gamma_hh, Tensor? beta_hh, Tensor gamma_c, Tensor? beta_c, "
          "Tensor(b!) dh, Tensor(c!) dc, Tensor(d!) dxr, Tensor(e!) dparams, Tensor? mask, Tensor? r, "
          "Tensor? keep) -> ()",
          torch::dispatch(c10::DispatchKey::CPU, &ln_lstm_backward_noisy));
  lib.def("ln_gru_forward_noisy(Tensor xz, Tensor w_hh, Tensor gamma_hh, Tensor? beta_hh, Tensor(a!) hs, "
          "Tensor(b!) out, Tensor(c!)? gates, Tensor(d!)? hhat, Tensor(e!)? rstd, Tensor? mask, float eps, Tensor? r, "
          "Tensor(f!)? hd, Tensor? keep) -> ()",
          torch::dispatch(c10::DispatchKey::CPU, &ln_gru_forward_noisy));
  lib.def("ln_gru_backward_noisy(Tensor gates, Tensor hhat, Tensor rstd, Tensor hs, Tensor? gout, Tensor w_hh, "
          "Tensor gamma_hh, Tensor? beta_hh, Tensor(a!) dh, Tensor(b!) dxz, Tensor(c!) dhz, Tensor(d!) dparams, "
          "Tensor? mask, Tensor? r, Tensor? keep) -> ()",
          torch::dispatch(c10::DispatchKey::CPU, &ln_gru_backward_noisy));
}
