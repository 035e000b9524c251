// The decode step of decode.py's Decoder in C++: one call per token instead of some fifty small torch operations per
// layer, each with its Python and dispatch overhead, and an attention kernel that splits the keys into blocks so
// that both cores work on every layer (torch's fused kernel parallelises over kv heads only: 3 for 2 threads).
//
// Built on first use by torch.utils.cpp_extension (native.py). The arithmetic follows decode.py's Python step,
// which follows transformers: norms and rotary in the model dtype with transformers' roundings, matrix products by
// the same torch kernels, attention scores and softmax in float32. Float32 results match the Python step to
// float32 rounding (only summation orders differ).
//
// Letters: H heads, Hkv kv heads, G = H / Hkv, D head dim, N = C + 1 + S key slots (ring, the token's own
// scratch slot, the moved sinks), E hidden size, F MLP width.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t LANES = 16;   // independent partial sums: lets the compiler vectorise dot products
constexpr int64_t BLOCK = 128;  // keys per attention task

template <typename T>
inline float to_float(T v) {
  return static_cast<float>(v);
}

#if defined(__AVX512F__)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) {  // bfloat16 is the top half of a float32
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
#endif

// sum_i a[i] * b[i] in float32.
template <typename T>
inline float dot(const float* a, const T* b, int64_t n) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, at::BFloat16>) {
    if (n % 16 == 0) {  // head dims: 64, 128
      __m512 acc = _mm512_setzero_ps();
      for (int64_t i = 0; i < n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), load16(b + i), acc);
      return _mm512_reduce_add_ps(acc);
    }
  }
#endif
  float acc[LANES] = {0};
  int64_t i = 0;
  for (; i + LANES <= n; i += LANES) {
    for (int64_t l = 0; l < LANES; ++l) acc[l] += a[i + l] * to_float(b[i + l]);
  }
  float sum = 0;
  for (; i < n; ++i) sum += a[i] * to_float(b[i]);
  for (int64_t l = 0; l < LANES; ++l) sum += acc[l];
  return sum;
}

// y = W x for a 16-bit float matrix W (N, K): float32 sums, the rows split across threads.
template <typename T>
at::Tensor matvec16(const at::Tensor& W, const at::Tensor& x) {
  const int64_t N = W.size(0), K = W.size(1);
  at::Tensor y = at::empty({N}, x.options());
  const T* w = W.data_ptr<T>();
  T* out = y.data_ptr<T>();
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    // AVX-512 BF16: 32 products per instruction, summed in float32, four rows at a time sharing each load of x.
    const at::Tensor xc = x.contiguous();
    const auto* xv = reinterpret_cast<const uint16_t*>(xc.data_ptr<T>());
    const auto* wv = reinterpret_cast<const uint16_t*>(w);
    at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
      constexpr int64_t R = 4;
      int64_t n = begin;
      for (; n + R <= end; n += R) {
        __m512 acc[R];
        for (int64_t r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
        for (int64_t k = 0; k < K; k += 32) {
          const __mmask32 m = K - k >= 32 ? ~__mmask32(0) : (__mmask32(1) << (K - k)) - 1;
          const __m512bh xk = (__m512bh)_mm512_maskz_loadu_epi16(m, xv + k);
          for (int64_t r = 0; r < R; ++r) {
            acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_maskz_loadu_epi16(m, wv + (n + r) * K + k), xk);
          }
        }
        for (int64_t r = 0; r < R; ++r) out[n + r] = static_cast<T>(_mm512_reduce_add_ps(acc[r]));
      }
      for (; n < end; ++n) {
        __m512 acc = _mm512_setzero_ps();
        for (int64_t k = 0; k < K; k += 32) {
          const __mmask32 m = K - k >= 32 ? ~__mmask32(0) : (__mmask32(1) << (K - k)) - 1;
          acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_maskz_loadu_epi16(m, wv + n * K + k),
                                 (__m512bh)_mm512_maskz_loadu_epi16(m, xv + k));
        }
        out[n] = static_cast<T>(_mm512_reduce_add_ps(acc));
      }
    });
    return y;
  }
#endif
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const float* xv = xf.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) out[n] = static_cast<T>(dot(xv, w + n * K, K));
  });
  return y;
}

// transformers' RMSNorm: normalise in float32, round to the model dtype, then scale (a product in the model dtype).
template <typename T>
void rms_norm(const T* x, const T* weight, T* out, int64_t n, float eps) {
  float acc[LANES] = {0};
  int64_t i = 0;
  for (; i + LANES <= n; i += LANES) {
    for (int64_t l = 0; l < LANES; ++l) acc[l] += to_float(x[i + l]) * to_float(x[i + l]);
  }
  float sum = 0;
  for (; i < n; ++i) sum += to_float(x[i]) * to_float(x[i]);
  for (int64_t l = 0; l < LANES; ++l) sum += acc[l];
  const float r = 1.0f / std::sqrt(sum / static_cast<float>(n) + eps);
  for (i = 0; i < n; ++i) out[i] = weight[i] * static_cast<T>(to_float(x[i]) * r);
}

// x * cos + rotate_half(x) * sin for one head, each product and the sum rounded to the model dtype.
template <typename T>
void rotate(const T* x, const T* cos, const T* sin, T* out, int64_t D) {
  const int64_t half = D / 2;
  for (int64_t j = 0; j < half; ++j) {
    const T a = x[j], b = x[j + half];
    out[j] = static_cast<T>(a * cos[j]) + static_cast<T>(-b * sin[j]);
    out[j + half] = static_cast<T>(b * cos[j + half]) + static_cast<T>(a * sin[j + half]);
  }
}

// The G query heads of each kv head against the visible keys, split into blocks of keys so that every thread has
// work; each block keeps its own running maximum, sum and weighted values, merged at the end.
template <typename T>
void attend(const float* q, const T* keys, const T* values, const bool* visible, int64_t H, int64_t Hkv, int64_t N,
            int64_t D, float scale, T* out) {
  const int64_t G = H / Hkv;
  const int64_t blocks = (N + BLOCK - 1) / BLOCK;
  const float NEG = -std::numeric_limits<float>::infinity();
  std::vector<float> maxes(Hkv * blocks * G, NEG), sums(Hkv * blocks * G, 0.0f), acc(Hkv * blocks * G * D, 0.0f);
  at::parallel_for(0, Hkv * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(G * BLOCK), vrow(D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t h = task / blocks, n0 = (task % blocks) * BLOCK, n1 = std::min(N, n0 + BLOCK);
      const T* K = keys + h * N * D;
      const T* V = values + h * N * D;
      const float* Q = q + h * G * D;
      float* m = maxes.data() + task * G;
      float* l = sums.data() + task * G;
      float* a = acc.data() + task * G * D;
      for (int64_t n = n0; n < n1; ++n) {
        if (!visible[n]) continue;
        for (int64_t g = 0; g < G; ++g) {
          const float s = dot(Q + g * D, K + n * D, D) * scale;
          scores[g * BLOCK + n - n0] = s;
          m[g] = std::max(m[g], s);
        }
      }
      for (int64_t n = n0; n < n1; ++n) {
        if (!visible[n]) continue;
        for (int64_t d = 0; d < D; ++d) vrow[d] = to_float(V[n * D + d]);
        for (int64_t g = 0; g < G; ++g) {
          const float p = std::exp(scores[g * BLOCK + n - n0] - m[g]);
          l[g] += p;
          float* ag = a + g * D;
          for (int64_t d = 0; d < D; ++d) ag[d] += p * vrow[d];
        }
      }
    }
  });
  for (int64_t h = 0; h < Hkv; ++h) {
    for (int64_t g = 0; g < G; ++g) {
      float top = NEG;
      for (int64_t b = 0; b < blocks; ++b) top = std::max(top, maxes[(h * blocks + b) * G + g]);
      float total = 0;
      std::vector<float> o(D, 0.0f);
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t i = (h * blocks + b) * G + g;
        if (sums[i] == 0.0f) continue;
        const float w = std::exp(maxes[i] - top);
        total += sums[i] * w;
        for (int64_t d = 0; d < D; ++d) o[d] += acc[i * D + d] * w;
      }
      T* dst = out + (h * G + g) * D;
      for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(o[d] / total);
    }
  }
}

// One weight matrix: the model's own (kind 0), 4-bit groups of 32 (kind 1) or 8-bit rows (kind 2); decode.py's
// _MatVec, _Int4MatVec and _Int8MatVec.
struct Matrix {
  int64_t kind;
  at::Tensor a, b;

  at::Tensor operator()(const at::Tensor& x) const {
    if (kind == 0) {
      if (a.scalar_type() == at::kBFloat16 && a.is_contiguous()) return matvec16<at::BFloat16>(a, x);
      if (a.scalar_type() == at::kHalf && a.is_contiguous()) return matvec16<at::Half>(a, x);
      return at::mv(a, x);
    }
    const at::Tensor x16 = x.to(at::kBFloat16).unsqueeze(0);
    const at::Tensor y = kind == 1 ? at::_weight_int4pack_mm_for_cpu(x16, a, 32, b) : at::_weight_int8pack_mm(x16, a, b);
    return y.squeeze(0).to(x.scalar_type());
  }
};

struct Layer {
  Matrix qkv, o, gate_up, down;
  at::Tensor qkv_bias, norm_in, norm_post, q_norm, k_norm;  // empty where the model has none
};

at::Tensor present(const at::Tensor& t) { return t.numel() ? t : at::Tensor(); }

class Step {
 public:
  // layers: per layer [qkv a, qkv b, o a, o b, gate_up a, gate_up b, down a, down b, qkv bias, norm_in, norm_post,
  // q_norm, k_norm] (empty tensors for what is absent); kinds: per layer the 4 matrices' kinds; head: [final norm,
  // lm_head a, lm_head b].
  Step(const std::vector<std::vector<at::Tensor>>& layers, const std::vector<std::vector<int64_t>>& kinds,
       const std::vector<at::Tensor>& head, int64_t head_kind, int64_t H, int64_t Hkv, int64_t D, double eps,
       double scale)
      : H_(H), Hkv_(Hkv), D_(D), eps_(eps), scale_(scale) {
    TORCH_CHECK(layers.size() == kinds.size(), "one list of kinds per layer");
    for (size_t i = 0; i < layers.size(); ++i) {
      const auto& t = layers[i];
      const auto& k = kinds[i];
      TORCH_CHECK(t.size() == 13 && k.size() == 4, "layer ", i, ": 13 tensors and 4 kinds expected");
      layers_.push_back(Layer{Matrix{k[0], t[0], t[1]}, Matrix{k[1], t[2], t[3]}, Matrix{k[2], t[4], t[5]},
                              Matrix{k[3], t[6], t[7]}, present(t[8]), t[9], t[10], present(t[11]),
                              present(t[12])});
    }
    TORCH_CHECK(head.size() == 3, "head: final norm, lm_head a, lm_head b");
    norm_ = head[0];
    lm_head_ = Matrix{head_kind, head[1], head[2]};
  }

  // x: the token's embedding (E,); cos, sin: its rotary angles (D,); turn: the sinks' rotation (D, D) float32,
  // empty without sinks; visible: (N,) bool; keys, values: per layer (1, Hkv, N, D). Returns the logits (V,),
  // float32.
  at::Tensor operator()(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& turn,
                        const at::Tensor& visible, const std::vector<at::Tensor>& keys,
                        const std::vector<at::Tensor>& values, int64_t slot, int64_t C, int64_t S) {
    TORCH_CHECK(keys.size() == layers_.size() && values.size() == layers_.size(), "one cache buffer per layer");
    TORCH_CHECK(visible.scalar_type() == at::kBool && visible.is_contiguous(), "visible: contiguous bool");
    at::Tensor out;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "streamllm_decode_step", [&] {
      out = run<scalar_t>(x, cos.contiguous(), sin.contiguous(), turn, visible, keys, values, slot, C, S);
    });
    return out;
  }

 private:
  template <typename T>
  at::Tensor run(const at::Tensor& embedding, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& turn,
                 const at::Tensor& visible, const std::vector<at::Tensor>& keys, const std::vector<at::Tensor>& values,
                 int64_t slot, int64_t C, int64_t S) {
    const int64_t H = H_, Hkv = Hkv_, D = D_, E = embedding.numel();
    const float eps = static_cast<float>(eps_);
    at::Tensor x = embedding.clone();  // (E,) the residual stream
    at::Tensor h = at::empty_like(x);  // (E,) its normalised copy
    at::Tensor rotated = at::empty({H + Hkv, D}, x.options());
    at::Tensor q = at::empty({H, D}, x.options().dtype(at::kFloat));
    at::Tensor attended = at::empty({H * D}, x.options());
    const T* c = cos.data_ptr<T>();
    const T* s = sin.data_ptr<T>();
    const bool* vis = visible.data_ptr<bool>();
    for (size_t i = 0; i < layers_.size(); ++i) {
      const Layer& L = layers_[i];
      TORCH_CHECK(keys[i].is_contiguous() && values[i].is_contiguous(), "cache buffers must be contiguous");
      const int64_t N = keys[i].size(2);
      T* K = keys[i].data_ptr<T>();
      T* V = values[i].data_ptr<T>();
      rms_norm(x.data_ptr<T>(), L.norm_in.data_ptr<T>(), h.data_ptr<T>(), E, eps);
      at::Tensor qkv = L.qkv(h);  // (H D + 2 Hkv D,)
      if (L.qkv_bias.defined()) qkv = qkv + L.qkv_bias;
      T* raw = qkv.data_ptr<T>();
      if (L.q_norm.defined()) {  // Qwen3: each head of q and k normalised
        for (int64_t j = 0; j < H + Hkv; ++j) {
          const T* w = (j < H ? L.q_norm : L.k_norm).data_ptr<T>();
          rms_norm(raw + j * D, w, raw + j * D, D, eps);
        }
      }
      T* r = rotated.data_ptr<T>();
      for (int64_t j = 0; j < H + Hkv; ++j) rotate(raw + j * D, c, s, r + j * D, D);
      const T* v = raw + (H + Hkv) * D;
      for (int64_t k = 0; k < Hkv; ++k) {  // the token sees itself through scratch slot C
        std::copy(r + (H + k) * D, r + (H + k + 1) * D, K + (k * N + C) * D);
        std::copy(v + k * D, v + (k + 1) * D, V + (k * N + C) * D);
      }
      if (S) move_sinks(K, V, turn.data_ptr<float>(), Hkv, N, C, S, D);
      float* qf = q.data_ptr<float>();
      for (int64_t j = 0; j < H * D; ++j) qf[j] = to_float(r[j]);
      attend(qf, K, V, vis, H, Hkv, N, D, static_cast<float>(scale_), attended.data_ptr<T>());
      for (int64_t k = 0; k < Hkv; ++k) {  // then into its own slot
        std::copy(r + (H + k) * D, r + (H + k + 1) * D, K + (k * N + slot) * D);
        std::copy(v + k * D, v + (k + 1) * D, V + (k * N + slot) * D);
      }
      x.add_(L.o(attended));
      rms_norm(x.data_ptr<T>(), L.norm_post.data_ptr<T>(), h.data_ptr<T>(), E, eps);
      at::Tensor gate_up = L.gate_up(h);  // (2 F,)
      const int64_t F = gate_up.numel() / 2;
      at::Tensor act = at::empty({F}, x.options());
      silu_mul(gate_up.data_ptr<T>(), act.data_ptr<T>(), F);
      x.add_(L.down(act));
    }
    rms_norm(x.data_ptr<T>(), norm_.data_ptr<T>(), h.data_ptr<T>(), E, eps);
    return lm_head_(h).to(at::kFloat);
  }

  // The sinks' keys, rotated at 0..S-1, moved to where the token sees them (x @ turn in float32), and their values,
  // into the scratch slots C+1..C+S.
  template <typename T>
  static void move_sinks(T* K, T* V, const float* turn, int64_t Hkv, int64_t N, int64_t C, int64_t S, int64_t D) {
    std::vector<float> row(D), moved(D);
    for (int64_t k = 0; k < Hkv; ++k) {
      for (int64_t i = 0; i < S; ++i) {
        const T* src = K + (k * N + i) * D;
        for (int64_t d = 0; d < D; ++d) row[d] = to_float(src[d]);
        std::fill(moved.begin(), moved.end(), 0.0f);
        for (int64_t d = 0; d < D; ++d) {
          const float* t = turn + d * D;
          for (int64_t e = 0; e < D; ++e) moved[e] += row[d] * t[e];
        }
        T* dst = K + (k * N + C + 1 + i) * D;
        for (int64_t e = 0; e < D; ++e) dst[e] = static_cast<T>(moved[e]);
        std::copy(V + (k * N + i) * D, V + (k * N + i + 1) * D, V + (k * N + C + 1 + i) * D);
      }
    }
  }

  // act(gate) * up with SiLU, each rounded to the model dtype as torch's two operations would.
  template <typename T>
  static void silu_mul(const T* gate_up, T* out, int64_t F) {
    for (int64_t j = 0; j < F; ++j) {
      const float g = to_float(gate_up[j]);
      out[j] = static_cast<T>(g / (1.0f + std::exp(-g))) * gate_up[F + j];
    }
  }

  std::vector<Layer> layers_;
  at::Tensor norm_;
  Matrix lm_head_;
  int64_t H_, Hkv_, D_;
  double eps_, scale_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("matvec", [](const at::Tensor& W, const at::Tensor& x) { return Matrix{0, W, at::Tensor()}(x); },
        "y = W x as the native step computes it (the model's own weights)");
  pybind11::class_<Step>(m, "Step")
      .def(pybind11::init<const std::vector<std::vector<at::Tensor>>&, const std::vector<std::vector<int64_t>>&,
                          const std::vector<at::Tensor>&, int64_t, int64_t, int64_t, int64_t, double, double>())
      .def("__call__", &Step::operator(), pybind11::call_guard<pybind11::gil_scoped_release>());
}
