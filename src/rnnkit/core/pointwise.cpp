// A user's cell on the CPU, in C++: its combine as a small program of registers (core/pointwise.py
// traces and compiles it, and derives its backward), run once (``pointwise``) or at every step of
// a loop over time with the blocked recurrent matmul (``pointwise_scan`` and its backward). Compiled
// with native.cpp into one library (core/native.py); what both share is in native.h.

#include "native.h"

namespace {

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
void pointwise_scan_noisy(const Tensor& program, const Tensor& consts, const Tensor& x, const std::optional<Tensor>& packed_ih,
                    const std::optional<Tensor>& bias_ih, const Tensor& packed, const std::optional<Tensor>& bias,
                    int64_t width, at::TensorList states, const Tensor& out, const std::optional<Tensor>& hz_all,
                    const std::optional<Tensor>& mask, bool fold, const std::optional<Tensor>& r,
                    const std::optional<Tensor>& hd, const std::optional<Tensor>& zoneout) {
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
    // zoneout and recurrent dropout (Noise, native.h): after the program, on the items it ran
    const Noise<T_> noise = noise_from<T_>(r, hd, zoneout, {}, out);
    std::vector<T_*> sp;
    for (const Tensor& st : states) sp.push_back(st.data_ptr<T_>());
    const T_* mp = mask.has_value() ? mask->data_ptr<T_>() : nullptr;
    const int64_t chunks = (H + PW_CHUNK - 1) / PW_CHUNK, items = B * chunks;
    auto after = [&](int64_t t, int64_t now, int64_t next, int64_t i0, int64_t i1) {
      for (int64_t it = i0; it < i1; ++it) {
        const int64_t b = it / chunks, c0 = (it % chunks) * PW_CHUNK, c1 = std::min(H, c0 + PW_CHUNK);
        const bool valid = mp == nullptr || mp[b * T + t] != T_(0);
        if (noise.keep != nullptr && valid) {
          const T_* k = noise.keep + (b * T + t) * H;
          for (int64_t c = c0; c < c1; ++c) {
            if (k[c] == T_(0)) continue;
            for (T_* st : sp) st[(next * B + b) * H + c] = st[(now * B + b) * H + c];
            noise.out[(b * T + t) * H + c] = sp[0][(now * B + b) * H + c];
          }
        }
        if (noise.r != nullptr) {
          for (int64_t c = c0; c < c1; ++c)
            noise.hd[((t + 1) % 2) * B * H + b * H + c] = sp[0][(next * B + b) * H + c] * noise.r[b * H + c];
        }
      }
    };
    const bool noisy = noise.keep != nullptr || noise.r != nullptr;
    const T_* h_in = noise.r != nullptr ? noise.hd : h0;  // the products' h_{t-1} (times r: hd, row t % 2)
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
          rec(q, h_in + (noise.r != nullptr ? t % 2 : now) * B * H, H, B, hz, GH, fold);
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
      if (noisy) after(t, now, next, q0 * items / rec.nq, q1 * items / rec.nq);  // run's items
    });
  });
}

// Back through the steps of pointwise_scan (pointwise.py's backward program): per step t = T-1 .. 0 a
// pass of the program over (B, H), which writes d xz_t (into dxz, (B, T, G*H)), d hz_t (into dhz,
// (T, B, G*H); without dhz the program's d hz_t is d xz_t) and the state's gradient without the path
// through hz_t, then a pass of products over blocks of H adding d hz_t W_hh to d h.
// dstate: one (B, H) per state field, the final state's
// gradient in, the initial state's out. gout (B, T, H) with unit stride along H, or none.
void pointwise_scan_backward_noisy(const Tensor& program, const Tensor& consts, const std::optional<Tensor>& xz, const Tensor& hz_all,
                             at::TensorList states, const std::optional<Tensor>& mask, const std::optional<Tensor>& gout,
                             const Tensor& packed_t, at::TensorList dstate, const Tensor& dxz,
                             const std::optional<Tensor>& dhz, const std::optional<Tensor>& r,
                             const std::optional<Tensor>& keep) {
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
    const T_* rp = backward_noise<T_>(r, keep, B, T, H);
    const T_* kp = ptr<T_>(keep);
    const Tensor turns = at::empty({2, S, B, H}, dxz.options());  // d state: turn (t + 1) % 2 in, t % 2 out
    for (int64_t s = 0; s < S; ++s) turns[T % 2][s].copy_(dstate[s]);
    const Tensor zero = at::zeros({B, 1}, dxz.options());
    if (T > 0) {
      // without xz (pointwise_scan's fold: hz holds xz + hz), the program's xz_t reads zeros
      const Tensor x0 = xz.has_value() ? xz->select(1, 0) : at::zeros({B, GH}, dxz.options());
      std::vector<Tensor> ins = {x0, hz_all.select(0, 0)};
      for (const Tensor& st : states) ins.push_back(st.select(0, 0));
      if (mask.has_value()) ins.push_back(mask->narrow(1, 0, 1));
      // zoneout: the program reads d out_t from gz (B, H), zero at the kept units, and the kept units'
      // state gradients pass to step t-1 (carried, (S, B, H)); recurrent dropout: the products into rd
      const Tensor gz = kp != nullptr ? at::zeros({B, H}, dxz.options()) : Tensor();
      const Tensor carried = kp != nullptr ? at::empty({S, B, H}, dxz.options()) : Tensor();
      const Tensor rd = rp != nullptr ? at::empty({B, H}, dxz.options()) : Tensor();
      ins.push_back(kp != nullptr ? gz : gout.has_value() ? gout->select(1, 0) : zero);
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
      const T_* mp = mask.has_value() ? mask->data_ptr<T_>() : nullptr;
      const int64_t chunks = (H + PW_CHUNK - 1) / PW_CHUNK, items = B * chunks;
      const T_* gp = gout.has_value() ? gout->data_ptr<T_>() : nullptr;
      const int64_t gsb = gout.has_value() ? gout->stride(0) : 0;
      T_* gzp = kp != nullptr ? gz.data_ptr<T_>() : nullptr;
      T_* cp = kp != nullptr ? carried.data_ptr<T_>() : nullptr;
      T_* rdp = rp != nullptr ? rd.data_ptr<T_>() : nullptr;
      // zoneout around the program, on the items it runs: before, the kept units' incoming gradients
      // set aside and zeroed; after, passed on as the state's gradient at step t-1
      auto zone = [&](int64_t t, int64_t in_turn, int64_t out_turn, int64_t i0, int64_t i1, bool before) {
        for (int64_t it = i0; it < i1; ++it) {
          const int64_t b = it / chunks, c0 = (it % chunks) * PW_CHUNK, c1 = std::min(H, c0 + PW_CHUNK);
          const bool valid = mp == nullptr || mp[b * T + t] != T_(0);
          const T_* k = kp + (b * T + t) * H;
          const T_* g = gp != nullptr ? gp + b * gsb + t * gstride : nullptr;
          for (int64_t c = c0; c < c1; ++c) {
            const bool kept = valid && k[c] != T_(0);
            for (int64_t s = 0; s < S; ++s) {
              T_* in = turnp + ((in_turn * S + s) * B + b) * H + c;
              T_* out = turnp + ((out_turn * S + s) * B + b) * H + c;
              T_* keep_s = cp + (s * B + b) * H + c;
              if (before) {
                *keep_s = *in + (s == 0 && g != nullptr ? g[c] : T_(0));
                if (kept) *in = T_(0);
              } else if (kept) {
                *out = *keep_s;
              }
            }
            if (before) gzp[b * H + c] = kept || g == nullptr ? T_(0) : g[c];
          }
        }
      };
      passes_in_parallel(2 * T, back.nq, back.grain(B), [&](int64_t i, int64_t q0, int64_t q1) {
        const int64_t t = T - 1 - i / 2, in_turn = (t + 1) % 2, out_turn = t % 2;
        if (i % 2 == 0) {  // the program
          const int64_t i0 = q0 * items / back.nq, i1 = q1 * items / back.nq;  // the items run() takes
          if (kp != nullptr) zone(t, in_turn, out_turn, i0, i1, true);
          auto in_offset = [&](int64_t k) -> int64_t {
            if (k == 0) return xz.has_value() ? t * GH : 0;
            if (k == 1) return t * B * GH;
            if (k < 2 + S) return t * B * H;
            if (k < gout_index) return t;  // the mask
            if (k == gout_index) return kp != nullptr ? 0 : t * gstride;
            return in_turn * S * B * H;
          };
          auto out_offset = [&](int64_t k) -> int64_t {
            if (k == 0) return t * GH;
            if (k == 1) return t * B * GH;
            return out_turn * S * B * H;
          };
          bound.run(pc, B, H, q0, q1, back.nq, scratch.mine(), in_offset, out_offset);
          if (kp != nullptr) zone(t, in_turn, out_turn, i0, i1, false);
          return;
        }
        for (int64_t q = q0; q < q1; ++q) {
          if (rp == nullptr) {
            back(q, dzp + t * dz_step, dz_ld, B, turnp + out_turn * S * B * H, H, true);
            continue;
          }
          back(q, dzp + t * dz_step, dz_ld, B, rdp, H, false);  // recurrent dropout: d h_{t-1} += (d hz W) r
          const int64_t j = q * back.L, n = std::min<int64_t>(back.L, H - j);
          T_* dh = turnp + out_turn * S * B * H;
          for (int64_t b = 0; b < B; ++b) {
            const int64_t row = b * H + j;
            (load(dh + row, n) + load(rdp + row, n) * load(rp + row, n)).store(dh + row, n);
          }
        }
      });
    }
    for (int64_t s = 0; s < S; ++s) dstate[s].copy_(turns[0][s]);
  });
}


// without zoneout and recurrent dropout: the schemas before the masks (the _noisy ops take them)
void pointwise_scan(const Tensor& program, const Tensor& consts, const Tensor& x, const std::optional<Tensor>& packed_ih,
                    const std::optional<Tensor>& bias_ih, const Tensor& packed, const std::optional<Tensor>& bias,
                    int64_t width, at::TensorList states, const Tensor& out, const std::optional<Tensor>& hz_all,
                    const std::optional<Tensor>& mask, bool fold) {
  pointwise_scan_noisy(program, consts, x, packed_ih, bias_ih, packed, bias, width, states, out, hz_all, mask, fold,
                       std::nullopt, std::nullopt, std::nullopt);
}

void pointwise_scan_backward(const Tensor& program, const Tensor& consts, const std::optional<Tensor>& xz,
                             const Tensor& hz_all, at::TensorList states, const std::optional<Tensor>& mask,
                             const std::optional<Tensor>& gout, const Tensor& packed_t, at::TensorList dstate,
                             const Tensor& dxz, const std::optional<Tensor>& dhz) {
  pointwise_scan_backward_noisy(program, consts, xz, hz_all, states, mask, gout, packed_t, dstate, dxz, dhz,
                                std::nullopt, std::nullopt);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(rnnkit_native, lib) {
  lib.def("pointwise(Tensor program, Tensor consts, Tensor[] inputs, Tensor(a!)[] outputs, int width) -> ()", &pointwise);
  lib.def("pointwise_scan(Tensor program, Tensor consts, Tensor x, Tensor? packed_ih, Tensor? bias_ih, Tensor packed, "
          "Tensor? bias, int width, Tensor(a!)[] states, Tensor(b!) out, Tensor(c!)? hz_all, Tensor? mask, "
          "bool fold=False) -> ()",
          &pointwise_scan);
  lib.def("pointwise_scan_backward(Tensor program, Tensor consts, Tensor? xz, Tensor hz_all, Tensor[] states, Tensor? mask, "
          "Tensor? gout, Tensor packed_t, Tensor(a!)[] dstate, Tensor(b!) dxz, Tensor(c!)? dhz) -> ()",
          &pointwise_scan_backward);
  // the same with zoneout and recurrent dropout (Noise, native.h; core/kernels/state_noise.py)
  lib.def("pointwise_scan_noisy(Tensor program, Tensor consts, Tensor x, Tensor? packed_ih, Tensor? bias_ih, "
          "Tensor packed, Tensor? bias, int width, Tensor(a!)[] states, Tensor(b!) out, Tensor(c!)? hz_all, "
          "Tensor? mask, bool fold, Tensor? r, Tensor(d!)? hd, Tensor? keep) -> ()",
          torch::dispatch(c10::DispatchKey::CPU, &pointwise_scan_noisy));
  lib.def("pointwise_scan_backward_noisy(Tensor program, Tensor consts, Tensor? xz, Tensor hz_all, Tensor[] states, "
          "Tensor? mask, Tensor? gout, Tensor packed_t, Tensor(a!)[] dstate, Tensor(b!) dxz, Tensor(c!)? dhz, Tensor? r, "
          "Tensor? keep) -> ()",
          torch::dispatch(c10::DispatchKey::CPU, &pointwise_scan_backward_noisy));
}
