// The decode step of decode.py's Decoder in C++: one call per token instead of some fifty small torch operations per
// layer, each with its Python and dispatch overhead, and an attention kernel that splits the keys into blocks so
// that both cores work on every layer (torch's fused kernel parallelises over kv heads only: 3 for 2 threads).
// Within a block it scores 16 keys at a time against all the query rows of their kv head (each key read and
// converted once), takes the exponentials 16 at a time, and sums the weighted values in one pass over the value
// rows with the sums in registers; it reads the cache as the model's dtype or as 8-bit rows with their scales
// (core/store.py), in place either way.
// One call can also take one token for each of several streams (the server's batched decoding): the matrix
// products then serve all of them from one read of the weights, and each attends over its own cache in place.
//
// Built on first use by torch.utils.cpp_extension (native.py). The arithmetic follows decode.py's Python step,
// which follows transformers: norms and rotary in the model dtype with transformers' roundings, attention scores and
// softmax in float32. Products with the model's own weights go to torch's kernels, except the one-row bfloat16
// ones, which use AVX-512 BF16 instructions (float32 sums) where the CPU has them; products with 4- and 8-bit
// weights are this file's integer kernels (VNNI where the CPU has it), which the Python step calls too. Float32
// results match the Python step to float32 rounding (only summation orders differ).
//
// Letters: R streams (rows), H heads, Hkv kv heads, G = H / Hkv, D head dim, N = C + 1 + M key slots (ring, the
// token's own scratch slot, keys recalled from memory), S sinks (ring slots 0..S-1), E hidden size, F MLP width.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t LANES = 16;   // independent partial sums: lets the compiler vectorise dot products
constexpr int64_t BLOCK = 128;  // keys per attention task
// Bytes of the cache's key and value rows asked for ahead of the ones being read: a task's rows and the next
// task's of the same kv head are one run of memory. 4 KB made the attention kernel alone 17-30% faster (1-2 KB
// gave less, 8 KB no more).
constexpr int64_t CACHE_AHEAD = 4096;

template <typename T>
inline float to_float(T v) {
  return static_cast<float>(v);
}

// y = v of y's dtype, or with ``add`` y += v as torch's in-place add of a tensor of that dtype rounds it (v rounded
// to the dtype, the sum in float32, rounded again).
template <typename T>
inline void put_one(T& y, float v, bool add) {
  y = add ? static_cast<T>(to_float(y) + to_float(static_cast<T>(v))) : static_cast<T>(v);
}

#if defined(__AVX512F__)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) {  // bfloat16 is the top half of a float32
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
inline __m512 load16(const int8_t* p) {  // an 8-bit cache row, still to be multiplied by its scale
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

// 16 floats rounded to bfloat16 (to nearest, ties to even), still as float32.
inline __m512 round_bf16(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i up = _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), odd));
  return _mm512_castsi512_ps(_mm512_and_si512(up, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

// 16 float32 results rounded as an operation of dtype T rounds them (bfloat16: to nearest, ties to even).
template <typename T>
inline __m512 in_dtype(__m512 v) {
  if constexpr (std::is_same_v<T, at::BFloat16>) return round_bf16(v);
  return v;
}

inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store16(at::BFloat16* p, __m512 v) {  // v already on the bfloat16 grid: its top halves
  const __m256i top = _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(v), 16));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), top);
}
#endif

// sum_i a[i] * b[i] in float32.
template <typename T>
inline float dot(const float* a, const T* b, int64_t n) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, at::BFloat16> || std::is_same_v<T, int8_t>) {
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

// Runs of rows (or tiles) each thread reads side by side. One core keeps more loads in flight over several runs
// of memory than over one, and how many pays depends on the core. On an Intel Xeon (AMX) 4 runs read a token's
// bfloat16 matrices 1.4x as fast as 1 and 2 runs 1.3x (8 no more than 4), its 4- and 8-bit tiles 1.2x. On an AMD
// EPYC (Zen 5) 2 runs read the bfloat16 and float32 matrices 1.06-1.17x as fast as 4 (1 too was faster than 4),
// and the tiles 1.1x in two runs of three. So 2 on AMD, 4 elsewhere; ``set_runs`` changes it for tests and
// measurements.
int64_t runs_for_cpu() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();  // this runs while the module loads, possibly before the compiler's own initialiser
  if (__builtin_cpu_is("amd")) return 2;
#endif
  return 4;
}
int64_t thread_runs = runs_for_cpu();

// f(std::integral_constant<int64_t, thread_runs>): a kernel with the runs known at compile time.
template <typename F>
inline void with_runs(F&& f) {
  if (thread_runs == 2) return f(std::integral_constant<int64_t, 2>{});
  f(std::integral_constant<int64_t, 4>{});
}

// Bytes of W asked for ahead of the ones being multiplied. A thread's rows are one run of memory, and the
// prefetch walks that run at the pace the products read it: asking 4 KB ahead in the run made the products of a
// token's matrices read W about 1.1x as fast as asking 512 bytes ahead within each row (which leaves the start of
// every row of the next block unasked for), and 2 KB gave less.
constexpr int64_t W_AHEAD = 4096;

#if defined(__AVX512F__)
#if defined(__AVX512BF16__)
// out[r][b] = W[b] . x for B consecutive rows of a bfloat16 matrix (B, K) at each of ``rows[0..S)``: 32 products
// per instruction summed in float32, the S B rows sharing each load of x. Each load of 64 bytes asks for the 64
// bytes W_AHEAD on in its run in step (a block is B K 2 bytes, and it takes B ceil(K / 32) loads).
template <int64_t S, int64_t B>
inline void dot_block(const uint16_t* const* rows, const uint16_t* x, at::BFloat16* const* out, int64_t K,
                      bool add) {
  const char* ahead[S];
  for (int64_t s = 0; s < S; ++s) ahead[s] = reinterpret_cast<const char*>(rows[s]) + W_AHEAD;
  __m512 acc[S * B];
  for (int64_t i = 0; i < S * B; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    const __mmask32 m = K - k >= 32 ? ~__mmask32(0) : (__mmask32(1) << (K - k)) - 1;
    const __m512bh xk = (__m512bh)_mm512_maskz_loadu_epi16(m, x + k);
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t s = 0; s < S; ++s) {
        _mm_prefetch(ahead[s] + 64 * b, _MM_HINT_T0);
        const __m512bh w = (__m512bh)_mm512_maskz_loadu_epi16(m, rows[s] + b * K + k);
        acc[s * B + b] = _mm512_dpbf16_ps(acc[s * B + b], w, xk);
      }
    }
    for (int64_t s = 0; s < S; ++s) ahead[s] += B * 64;
  }
  for (int64_t s = 0; s < S; ++s) {
    for (int64_t b = 0; b < B; ++b) put_one(out[s][b], _mm512_reduce_add_ps(acc[s * B + b]), add);
  }
}
#endif

// The same for float32 weights: 16 products per instruction.
template <int64_t S, int64_t B>
inline void dot_block(const float* const* rows, const float* x, float* const* out, int64_t K, bool add) {
  const char* ahead[S];
  for (int64_t s = 0; s < S; ++s) ahead[s] = reinterpret_cast<const char*>(rows[s]) + W_AHEAD;
  __m512 acc[S * B];
  for (int64_t i = 0; i < S * B; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 m = K - k >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (K - k)) - 1);
    const __m512 xk = _mm512_maskz_loadu_ps(m, x + k);
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t s = 0; s < S; ++s) {
        _mm_prefetch(ahead[s] + 64 * b, _MM_HINT_T0);
        acc[s * B + b] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, rows[s] + b * K + k), xk, acc[s * B + b]);
      }
    }
    for (int64_t s = 0; s < S; ++s) ahead[s] += B * 64;
  }
  for (int64_t s = 0; s < S; ++s) {
    for (int64_t b = 0; b < B; ++b) put_one(out[s][b], _mm512_reduce_add_ps(acc[s * B + b]), add);
  }
}

// out[n] = W[n] . x for rows [begin, end) of W (N, K) of either weight type: the rows cut into S runs, two rows
// of each at a time, the few left over one by one. The loop takes plain pointers and counts: reading them through
// a lambda's captures made the compiler reload and recompute every row's address on every step.
template <int64_t S, typename W, typename O>
void dot_rows(const W* w, const W* x, O* out, int64_t begin, int64_t end, int64_t K, bool add) {
  constexpr int64_t B = 2;
  const int64_t part = (end - begin) / S / B * B;
  for (int64_t n = 0; n < part; n += B) {
    const W* rows[S];
    O* outs[S];
    for (int64_t s = 0; s < S; ++s) {
      rows[s] = w + (begin + s * part + n) * K;
      outs[s] = out + begin + s * part + n;
    }
    dot_block<S, B>(rows, x, outs, K, add);
  }
  for (int64_t n = begin + S * part; n < end; ++n) {
    const W* row = w + n * K;
    O* o = out + n;
    dot_block<1, 1>(&row, x, &o, K, add);
  }
}
#endif

// out (N,) = W x for a 16-bit float matrix W (N, K) and one row x (K,), or with ``add`` out += W x (rounded as
// torch's in-place add): float32 sums, the rows of W split across threads. (Several rows go to torch's matrix
// product, whose oneDNN kernels win once there is more than one.)
template <typename T>
void matvec16(const at::Tensor& W, const at::Tensor& x, T* out, bool add) {
  const int64_t N = W.size(0), K = W.size(1);
  const T* w = W.data_ptr<T>();
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    const at::Tensor xc = x.contiguous();
    const float* xv = xc.data_ptr<float>();
    at::parallel_for(0, N, 16, [=](int64_t begin, int64_t end) {
      with_runs([&](auto S) { dot_rows<decltype(S)::value>(w, xv, out, begin, end, K, add); });
    });
    return;
  }
#endif
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    const at::Tensor xc = x.contiguous();
    const auto* xv = reinterpret_cast<const uint16_t*>(xc.data_ptr<T>());
    const auto* wv = reinterpret_cast<const uint16_t*>(w);
    at::parallel_for(0, N, 16, [=](int64_t begin, int64_t end) {
      with_runs([&](auto S) { dot_rows<decltype(S)::value>(wv, xv, out, begin, end, K, add); });
    });
    return;
  }
#endif
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const float* xv = xf.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) put_one(out[n], dot(xv, w + n * K, K), add);
  });
}

// ---- 4- and 8-bit weights: integer products against x in two 8-bit parts ----
//
// Each row of x is cut into groups of 32 inputs, and each group is written as s * (q + e / 254) with q and e 8-bit
// integers: s = max|x| / 127, q = round(x / s) (GGUF's Q8 blocks stop here) and e = round((x - s q) * 254 / s), the
// rest of x to within s / 508, finer than bfloat16. A weight matrix is kept in tiles of 16 output rows whose bytes
// are placed so that one AVX-512 VNNI instruction multiplies 16 rows by 4 inputs, 64 byte products summed into 16
// 32-bit integers at once; each group's two integer sums are then scaled in float32. Reading a quarter (4-bit) or
// half (8-bit) of the bytes of bfloat16 with a few instructions per 64 weights keeps these products bound by
// memory, not by arithmetic. quant.py lays the tiles out and describes the formats.

constexpr int64_t GROUP = 32;  // inputs per group: one scale of x, one 4-bit grid of W
constexpr int64_t TILE = 16;   // output rows multiplied together
constexpr float FINE = 254.0f;  // e's steps per step of q
// Bytes of tiles asked for ahead of the ones being multiplied. The tiles of a call are one run of memory that each
// thread reads in order, yet the hardware's own prefetch leaves the loads waiting: asking 4 KB ahead made these
// products read their bytes about 1.4x as fast (1-2 KB ahead gave less, 8 KB no more).
constexpr int64_t TILES_AHEAD = 4096;

// Rows of x (R, K) in two 8-bit parts, K padded with zeros to whole groups (Kp): per row and group, s = max|x| / 127,
// q = round(x / s), e = round((x - s q) / s * 254), each half to even (all 0 where the group is all zeros), with
// the group's sum of x (float32, for the 4-bit grids' offsets) and of q and e (for the 8-bit weights' offset 128).
struct Quantized {
  int64_t R = 0, Kp = 0, G = 0;
  std::vector<int8_t> q, e;         // (R, Kp)
  std::vector<float> scale, sum;    // (R, G)
  std::vector<int32_t> qsum, esum;  // (R, G)
};

// Into ``out``, whose vectors keep their room from one call to the next (no allocation per product once warm).
template <typename T>
void quantize_rows(const T* x, int64_t R, int64_t K, Quantized& out) {
  out.R = R;
  out.G = (K + GROUP - 1) / GROUP;
  out.Kp = out.G * GROUP;
  out.q.assign(R * out.Kp, 0);
  out.e.assign(R * out.Kp, 0);
  out.scale.assign(R * out.G, 0.0f);
  out.sum.assign(R * out.G, 0.0f);
  out.qsum.assign(R * out.G, 0);
  out.esum.assign(R * out.G, 0);
  auto byte = [](float v) { return static_cast<int8_t>(std::clamp(std::nearbyint(v), -127.0f, 127.0f)); };
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t g = 0; g < out.G; ++g) {
      const int64_t k0 = g * GROUP, k1 = std::min(K, k0 + GROUP);
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
      if constexpr (std::is_same_v<T, float> || std::is_same_v<T, at::BFloat16>) {
        // the same numbers 16 at a time (the group's sum of x is added in another order)
        __m512 v[2];
        for (int i = 0; i < 2; ++i) {
          const int64_t n = std::clamp<int64_t>(k1 - k0 - 16 * i, 0, 16);
          const __mmask16 m = static_cast<__mmask16>((1u << n) - 1);
          if constexpr (std::is_same_v<T, float>) {
            v[i] = _mm512_maskz_loadu_ps(m, x + r * K + k0 + 16 * i);
          } else {
            const __m256i raw = _mm256_maskz_loadu_epi16(m, x + r * K + k0 + 16 * i);
            v[i] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
          }
        }
        const float top = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v[0]), _mm512_abs_ps(v[1])));
        const float s = top / 127.0f;
        const __m512 inverse = _mm512_set1_ps(s > 0 ? 1.0f / s : 0.0f), step = _mm512_set1_ps(s);
        const __m512 hi = _mm512_set1_ps(127.0f), lo = _mm512_set1_ps(-127.0f);
        constexpr int EVEN = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
        auto whole = [&](__m512 a) { return _mm512_min_ps(_mm512_max_ps(_mm512_roundscale_ps(a, EVEN), lo), hi); };
        __m512i qs = _mm512_setzero_si512(), es = _mm512_setzero_si512();
        for (int i = 0; i < 2; ++i) {
          const __m512 q = whole(_mm512_mul_ps(v[i], inverse));
          const __m512 e = whole(_mm512_mul_ps(_mm512_mul_ps(_mm512_fnmadd_ps(step, q, v[i]), inverse),
                                               _mm512_set1_ps(FINE)));
          const __m512i qi = _mm512_cvtps_epi32(q), ei = _mm512_cvtps_epi32(e);
          _mm_storeu_si128(reinterpret_cast<__m128i*>(out.q.data() + r * out.Kp + k0 + 16 * i),
                           _mm512_cvtepi32_epi8(qi));
          _mm_storeu_si128(reinterpret_cast<__m128i*>(out.e.data() + r * out.Kp + k0 + 16 * i),
                           _mm512_cvtepi32_epi8(ei));
          qs = _mm512_add_epi32(qs, qi);
          es = _mm512_add_epi32(es, ei);
        }
        out.scale[r * out.G + g] = s;
        out.sum[r * out.G + g] = _mm512_reduce_add_ps(_mm512_add_ps(v[0], v[1]));
        out.qsum[r * out.G + g] = _mm512_reduce_add_epi32(qs);
        out.esum[r * out.G + g] = _mm512_reduce_add_epi32(es);
        continue;
      }
#endif
      float top = 0, total = 0;
      for (int64_t k = k0; k < k1; ++k) {
        const float v = to_float(x[r * K + k]);
        top = std::max(top, std::abs(v));
        total += v;
      }
      const float s = top / 127.0f;
      const float inverse = s > 0 ? 1.0f / s : 0.0f;
      int32_t qs = 0, es = 0;
      for (int64_t k = k0; k < k1; ++k) {
        const float v = to_float(x[r * K + k]);
        const int8_t q = byte(v * inverse);
        const int8_t e = byte(std::fma(-s, static_cast<float>(q), v) * inverse * FINE);
        out.q[r * out.Kp + k] = q;
        out.e[r * out.Kp + k] = e;
        qs += q;
        es += e;
      }
      out.scale[r * out.G + g] = s;
      out.sum[r * out.G + g] = total;
      out.qsum[r * out.G + g] = qs;
      out.esum[r * out.G + g] = es;
    }
  }
}

inline int32_t four_bytes(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// n results into y of the model's dtype: y = out, or with ``add`` y += out as torch's in-place add of a tensor
// of that dtype rounds it (out rounded to the dtype, the sum in float32, rounded again).
template <typename T>
inline void put(T* y, const float* out, int64_t n, bool add) {
  for (int64_t j = 0; j < n; ++j) put_one(y[j], out[j], add);
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// out[s] = the 16 results of 4-bit tile t[s] (int4_rows below), for each of S tiles read side by side (thread_runs
// above), against row r of x: per group, 16 rows by 8 inputs per instruction for q and for e, the 4-bit numbers'
// two halves apart.
template <int64_t S>
inline void int4_tiles(const uint8_t* packed, const at::Half* scales, const Quantized& x, int64_t r,
                       const int64_t* t, float (*out)[TILE]) {
  const int64_t G = x.G;
  const int8_t* xq = x.q.data() + r * x.Kp;
  const int8_t* xe = x.e.data() + r * x.Kp;
  const float* xs = x.scale.data() + r * G;
  const float* xsum = x.sum.data() + r * G;
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  const __m512 fine = _mm512_set1_ps(1.0f / FINE);
  __m512 acc[S];
  for (int64_t s = 0; s < S; ++s) acc[s] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    const int8_t* gq = xq + g * GROUP;
    const int8_t* ge = xe + g * GROUP;
    __m512i lq[S], hq[S], le[S], he[S];
    for (int64_t s = 0; s < S; ++s) lq[s] = hq[s] = le[s] = he[s] = _mm512_setzero_si512();
    for (int c = 0; c < 4; ++c) {
      const __m512i q0 = _mm512_set1_epi32(four_bytes(gq + 8 * c)), q1 = _mm512_set1_epi32(four_bytes(gq + 8 * c + 4));
      const __m512i e0 = _mm512_set1_epi32(four_bytes(ge + 8 * c)), e1 = _mm512_set1_epi32(four_bytes(ge + 8 * c + 4));
      for (int64_t s = 0; s < S; ++s) {
        const uint8_t* p = packed + (t[s] * G + g) * 256 + 64 * c;
        _mm_prefetch(reinterpret_cast<const char*>(p) + TILES_AHEAD, _MM_HINT_T0);
        const __m512i v = _mm512_loadu_si512(p);
        const __m512i lo = _mm512_and_si512(v, nibble), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
        lq[s] = _mm512_dpbusd_epi32(lq[s], lo, q0);
        hq[s] = _mm512_dpbusd_epi32(hq[s], hi, q1);
        le[s] = _mm512_dpbusd_epi32(le[s], lo, e0);
        he[s] = _mm512_dpbusd_epi32(he[s], hi, e1);
      }
    }
    for (int64_t s = 0; s < S; ++s) {
      const at::Half* sc = scales + (t[s] * G + g) * 2 * TILE;
      const __m512 step = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sc)));
      const __m512 low = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sc + TILE)));
      const __m512 dot = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(le[s], he[s])), fine,
                                         _mm512_cvtepi32_ps(_mm512_add_epi32(lq[s], hq[s])));
      acc[s] = _mm512_fmadd_ps(dot, _mm512_mul_ps(step, _mm512_set1_ps(xs[g])), acc[s]);
      acc[s] = _mm512_fmadd_ps(low, _mm512_set1_ps(xsum[g]), acc[s]);
    }
  }
  for (int64_t s = 0; s < S; ++s) _mm512_storeu_ps(out[s], acc[s]);
}
#else
// The same as a portable loop, one tile at a time (S = 1).
template <int64_t S>
inline void int4_tiles(const uint8_t* packed, const at::Half* scales, const Quantized& x, int64_t r,
                       const int64_t* t, float (*out)[TILE]) {
  static_assert(S == 1, "one tile at a time");
  const int64_t G = x.G;
  const int8_t* xq = x.q.data() + r * x.Kp;
  const int8_t* xe = x.e.data() + r * x.Kp;
  const float* xs = x.scale.data() + r * G;
  const float* xsum = x.sum.data() + r * G;
  std::fill(out[0], out[0] + TILE, 0.0f);
  for (int64_t g = 0; g < G; ++g) {
    const uint8_t* p = packed + (t[0] * G + g) * 256;
    const int8_t* gq = xq + g * GROUP;
    const int8_t* ge = xe + g * GROUP;
    const at::Half* sc = scales + (t[0] * G + g) * 2 * TILE;
    for (int64_t j = 0; j < TILE; ++j) {
      int32_t dq = 0, de = 0;
      for (int64_t c = 0; c < 4; ++c) {
        for (int64_t b = 0; b < 4; ++b) {
          const uint8_t v = p[64 * c + 4 * j + b];
          const int64_t k = 8 * c + b;
          dq += (v & 0x0F) * gq[k] + (v >> 4) * gq[k + 4];
          de += (v & 0x0F) * ge[k] + (v >> 4) * ge[k + 4];
        }
      }
      const float dot = static_cast<float>(dq) + static_cast<float>(de) / FINE;
      out[0][j] += dot * (static_cast<float>(sc[j]) * xs[g]);
      out[0][j] += static_cast<float>(sc[TILE + j]) * xsum[g];
    }
  }
}
#endif

// The tiles 0..T of a product against each of R rows of x, split across threads, each thread's share read as
// thread_runs runs side by side (with AVX-512 VNNI; one at a time otherwise) and the few left over one by one:
// read(runs, r, t, out) fills out[s] from tile t[s] for each of the runs (a compile-time count) against row r, and
// store(t, r, out) puts one tile's 16 results.
template <typename Read, typename Store>
void tile_runs(int64_t T, int64_t R, const Read& read, const Store& store) {
  auto in_runs = [&](auto runs) {
    constexpr int64_t S = decltype(runs)::value;
    at::parallel_for(0, T, 1, [&](int64_t begin, int64_t end) {
      const int64_t part = (end - begin) / S;
      float out[S][TILE];
      for (int64_t i = 0; i < part; ++i) {
        int64_t t[S];
        for (int64_t s = 0; s < S; ++s) t[s] = begin + s * part + i;
        for (int64_t r = 0; r < R; ++r) {
          read(runs, r, t, out);
          for (int64_t s = 0; s < S; ++s) store(t[s], r, out[s]);
        }
      }
      for (int64_t t = begin + S * part; t < end; ++t) {
        for (int64_t r = 0; r < R; ++r) {
          read(std::integral_constant<int64_t, 1>{}, r, &t, out);
          store(t, r, out[0]);
        }
      }
    });
  };
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  with_runs(in_runs);
#else
  in_runs(std::integral_constant<int64_t, 1>{});
#endif
}

// y (R, N) = x W^T for W in 4-bit tiles: packed (N/16, G, 256) bytes, scales (N/16, G, 2, 16) float16, each
// group's 16 steps then its 16 lows, W[n, k] = low + q * step. Within a group, byte 64 c + 4 j + b holds row j's
// 4-bit number for input 8 c + b in its low half and for input 8 c + 4 + b in its high half. So
// y[n] = sum over groups of step * s * (w4 . q + w4 . e / 254) + low * (sum of x). The tiles are read in runs
// (tile_runs).
template <typename T>
void int4_rows(const uint8_t* packed, const at::Half* scales, const Quantized& x, int64_t N, T* y, bool add) {
  tile_runs(
      N / TILE, x.R,
      [&](auto runs, int64_t r, const int64_t* t, float (*out)[TILE]) {
        int4_tiles<decltype(runs)::value>(packed, scales, x, r, t, out);
      },
      [&](int64_t t, int64_t r, float* out) { put(y + r * N + t * TILE, out, TILE, add); });
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// out[s] = the 16 sums of 8-bit tile t[s] (int8_rows below; before the rows' scales), for each of S tiles read
// side by side, against row r of x: 16 rows by 4 inputs per instruction for q and for e.
template <int64_t S>
inline void int8_tiles(const uint8_t* packed, const Quantized& x, int64_t r, const int64_t* t, float (*out)[TILE]) {
  const int64_t G = x.G, chunks = x.Kp / 4;
  const int8_t* xq = x.q.data() + r * x.Kp;
  const int8_t* xe = x.e.data() + r * x.Kp;
  const float* xs = x.scale.data() + r * G;
  const int32_t* qsum = x.qsum.data() + r * G;
  const int32_t* esum = x.esum.data() + r * G;
  const __m512 fine = _mm512_set1_ps(1.0f / FINE);
  __m512 acc[S];
  for (int64_t s = 0; s < S; ++s) acc[s] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    const int8_t* gq = xq + g * GROUP;
    const int8_t* ge = xe + g * GROUP;
    __m512i dq[S], de[S];
    for (int64_t s = 0; s < S; ++s) dq[s] = de[s] = _mm512_setzero_si512();
    for (int c = 0; c < GROUP / 4; ++c) {
      const __m512i q = _mm512_set1_epi32(four_bytes(gq + 4 * c)), e = _mm512_set1_epi32(four_bytes(ge + 4 * c));
      for (int64_t s = 0; s < S; ++s) {
        const uint8_t* p = packed + (t[s] * chunks + g * (GROUP / 4) + c) * 64;
        _mm_prefetch(reinterpret_cast<const char*>(p) + TILES_AHEAD, _MM_HINT_T0);
        const __m512i v = _mm512_loadu_si512(p);
        dq[s] = _mm512_dpbusd_epi32(dq[s], v, q);
        de[s] = _mm512_dpbusd_epi32(de[s], v, e);
      }
    }
    for (int64_t s = 0; s < S; ++s) {
      const __m512i q = _mm512_sub_epi32(dq[s], _mm512_set1_epi32(128 * qsum[g]));
      const __m512i e = _mm512_sub_epi32(de[s], _mm512_set1_epi32(128 * esum[g]));
      const __m512 dot = _mm512_fmadd_ps(_mm512_cvtepi32_ps(e), fine, _mm512_cvtepi32_ps(q));
      acc[s] = _mm512_fmadd_ps(dot, _mm512_set1_ps(xs[g]), acc[s]);
    }
  }
  for (int64_t s = 0; s < S; ++s) _mm512_storeu_ps(out[s], acc[s]);
}
#else
// The same as a portable loop, one tile at a time (S = 1).
template <int64_t S>
inline void int8_tiles(const uint8_t* packed, const Quantized& x, int64_t r, const int64_t* t, float (*out)[TILE]) {
  static_assert(S == 1, "one tile at a time");
  const int64_t G = x.G, chunks = x.Kp / 4;
  const int8_t* xq = x.q.data() + r * x.Kp;
  const int8_t* xe = x.e.data() + r * x.Kp;
  const float* xs = x.scale.data() + r * G;
  const int32_t* qsum = x.qsum.data() + r * G;
  const int32_t* esum = x.esum.data() + r * G;
  std::fill(out[0], out[0] + TILE, 0.0f);
  for (int64_t g = 0; g < G; ++g) {
    const uint8_t* p = packed + (t[0] * chunks + g * (GROUP / 4)) * 64;
    const int8_t* gq = xq + g * GROUP;
    const int8_t* ge = xe + g * GROUP;
    for (int64_t j = 0; j < TILE; ++j) {
      int32_t dq = 0, de = 0;
      for (int64_t c = 0; c < GROUP / 4; ++c) {
        for (int64_t b = 0; b < 4; ++b) {
          dq += p[64 * c + 4 * j + b] * gq[4 * c + b];
          de += p[64 * c + 4 * j + b] * ge[4 * c + b];
        }
      }
      const float dot = static_cast<float>(dq - 128 * qsum[g]) + static_cast<float>(de - 128 * esum[g]) / FINE;
      out[0][j] += dot * xs[g];
    }
  }
}
#endif

// y (R, N) = x W^T for W in 8-bit tiles: packed (ceil(N/16), Kp/4, 64) bytes holding W + 128, row j's inputs
// 4 c + b at byte 64 c + 4 j + b (rows and inputs past N and K are zeros, i.e. 128); scales (N,) float32 per row,
// W[n, k] = (byte - 128) * scale[n]. The offset comes back out through each group's sums of q and e. The tiles
// are read in runs (tile_runs).
template <typename T>
void int8_rows(const uint8_t* packed, const float* scales, const Quantized& x, int64_t N, T* y, bool add) {
  tile_runs(
      (N + TILE - 1) / TILE, x.R,
      [&](auto runs, int64_t r, const int64_t* t, float (*out)[TILE]) {
        int8_tiles<decltype(runs)::value>(packed, x, r, t, out);
      },
      [&](int64_t t, int64_t r, float* out) {
        const int64_t rows = std::min(TILE, N - t * TILE);
        for (int64_t j = 0; j < rows; ++j) out[j] *= scales[t * TILE + j];
        put(y + r * N + t * TILE, out, rows, add);
      });
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
  i = 0;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, at::BFloat16>) {  // the same roundings, 16 at a time
    const __m512 scale = _mm512_set1_ps(r);
    for (; i + 16 <= n; i += 16) {
      const __m512 normed = in_dtype<T>(_mm512_mul_ps(load16(x + i), scale));
      store16(out + i, in_dtype<T>(_mm512_mul_ps(load16(weight + i), normed)));
    }
  }
#endif
  for (; i < n; ++i) out[i] = weight[i] * static_cast<T>(to_float(x[i]) * r);
}

// x * cos + rotate_half(x) * sin for one head over its first Dr dims (all D, or fewer with partial rotary), each
// product and the sum rounded to the model dtype; the other dims pass through.
template <typename T>
void rotate(const T* x, const T* cos, const T* sin, T* out, int64_t D, int64_t Dr) {
  const int64_t half = Dr / 2;
  int64_t j = 0;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, at::BFloat16>) {  // the same roundings, 16 at a time
    for (; j + 16 <= half; j += 16) {
      const __m512 a = load16(x + j), b = load16(x + j + half);
      const __m512i sign = _mm512_set1_epi32(INT32_MIN);
      const __m512 minus_b = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(b), sign));
      const __m512 lo = _mm512_add_ps(in_dtype<T>(_mm512_mul_ps(a, load16(cos + j))),
                                      in_dtype<T>(_mm512_mul_ps(minus_b, load16(sin + j))));
      const __m512 hi = _mm512_add_ps(in_dtype<T>(_mm512_mul_ps(b, load16(cos + j + half))),
                                      in_dtype<T>(_mm512_mul_ps(a, load16(sin + j + half))));
      store16(out + j, in_dtype<T>(lo));
      store16(out + j + half, in_dtype<T>(hi));
    }
  }
#endif
  for (; j < half; ++j) {
    const T a = x[j], b = x[j + half];
    out[j] = static_cast<T>(a * cos[j]) + static_cast<T>(-b * sin[j]);
    out[j + half] = static_cast<T>(b * cos[j + half]) + static_cast<T>(a * sin[j + half]);
  }
  for (int64_t j = Dr; j < D; ++j) out[j] = x[j];
}

// One row's cache buffer of one layer: Hkv heads of N slots of D numbers, of the model's dtype (KT = T, no scales)
// or 8-bit (KT = int8_t) with a float32 scale per head and slot: x = q * scale, scale = max|x| / 127, as
// core/store.py's quantize (float32 products rounded half to even).
template <typename KT>
struct Buffer {
  KT* data;
  float* scales;  // (Hkv, N), null unless 8-bit
  int64_t N, D;

  static constexpr bool QUANTIZED = std::is_same_v<KT, int8_t>;
  const KT* row(int64_t h, int64_t n) const { return data + (h * N + n) * D; }
  float scale(int64_t h, int64_t n) const {
    if constexpr (QUANTIZED) return scales[h * N + n];
    return 1.0f;
  }
  // Stores x (D numbers of the model's dtype, or float32) at head h, slot n, quantizing where 8-bit.
  template <typename X>
  void put(int64_t h, int64_t n, const X* x) const {
    KT* dst = data + (h * N + n) * D;
    if constexpr (QUANTIZED) {
      float top = 0;
      for (int64_t d = 0; d < D; ++d) top = std::max(top, std::abs(to_float(x[d])));
      const float s = top / 127.0f;
      const float inverse = s > 0 ? 1.0f / s : 0.0f;
      for (int64_t d = 0; d < D; ++d) {
        dst[d] = static_cast<int8_t>(std::clamp(std::nearbyint(to_float(x[d]) * inverse), -127.0f, 127.0f));
      }
      scales[h * N + n] = s;
    } else {
      for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<KT>(to_float(x[d]));
    }
  }
  // The numbers at head h, slot n as float32.
  void get(int64_t h, int64_t n, float* out) const {
    const KT* src = row(h, n);
    const float s = scale(h, n);
    for (int64_t d = 0; d < D; ++d) out[d] = to_float(src[d]) * s;
  }
  // Slot ``from`` of head h copied to slot ``to``, as stored.
  void copy(int64_t h, int64_t from, int64_t to) const {
    std::copy(row(h, from), row(h, from) + D, data + (h * N + to) * D);
    if constexpr (QUANTIZED) scales[h * N + to] = scales[h * N + from];
  }
};

template <typename KT>
Buffer<KT> buffer(const at::Tensor& t, const at::Tensor& scales, int64_t N, int64_t D) {
  return Buffer<KT>{t.data_ptr<KT>(), scales.numel() ? scales.data_ptr<float>() : nullptr, N, D};
}

// The largest of n floats (n >= 1; -inf counts as a number).
inline float max_of(const float* x, int64_t n) {
  int64_t i = 0;
  float top = -std::numeric_limits<float>::infinity();
#if defined(__AVX512F__)
  __m512 tops = _mm512_set1_ps(top);
  for (; i + 16 <= n; i += 16) tops = _mm512_max_ps(tops, _mm512_loadu_ps(x + i));
  top = _mm512_reduce_max_ps(tops);
#endif
  for (; i < n; ++i) top = std::max(top, x[i]);
  return top;
}

// The sum of n floats, in 16 lanes where the CPU has AVX-512.
inline float sum_of(const float* x, int64_t n) {
  int64_t i = 0;
  float total = 0;
#if defined(__AVX512F__)
  __m512 sums = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) sums = _mm512_add_ps(sums, _mm512_loadu_ps(x + i));
  total = _mm512_reduce_add_ps(sums);
#endif
  for (; i < n; ++i) total += x[i];
  return total;
}

#if defined(__AVX512F__)
// e^v for 16 floats: 2^k * p(r) with k = round(v / ln 2), r = v - k ln 2 in two parts, and p Cephes' degree-7
// polynomial for expf (float32 precision). v is held to [-127, 128] first, so -inf gives 0 (e^-127 rounds to 0 in
// float32) and large v infinity, as std::exp does.
inline __m512 exp16(__m512 v) {
  v = _mm512_min_ps(_mm512_max_ps(v, _mm512_set1_ps(-127.0f)), _mm512_set1_ps(128.0f));
  const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(v, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), v);
  r = _mm512_fnmadd_ps(k, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, k);
}

#endif

// x = e^(x - top) over n floats in place, for x <= top or -inf (scores less their maximum); e^-inf is 0. With
// AVX-512: 16 at a time (exp16); the portable loop calls std::exp.
inline void exp_less(float* x, int64_t n, float top) {
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 shift = _mm512_set1_ps(top);
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(x + i, exp16(_mm512_sub_ps(_mm512_loadu_ps(x + i), shift)));
#endif
  for (; i < n; ++i) x[i] = std::exp(x[i] - top);
}

#if defined(__AVX512F__)
// r[i] = the sum of the 16 lanes of v[i], for 16 vectors: pairs, then quadruples within each 128-bit lane, then
// across the lanes (45 instructions for 16 sums, against 8 or so each one by one).
inline __m512 reduce16(const __m512* v) {
  __m512 pairs[8];
  for (int k = 0; k < 8; ++k) {
    pairs[k] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * k], v[2 * k + 1]), _mm512_unpackhi_ps(v[2 * k], v[2 * k + 1]));
  }
  __m512 quads[4];  // each 128-bit lane: the lane's sums of keys 4j .. 4j+3
  for (int j = 0; j < 4; ++j) {
    const __m512d c = _mm512_castps_pd(pairs[2 * j]), d = _mm512_castps_pd(pairs[2 * j + 1]);
    quads[j] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(c, d)), _mm512_castpd_ps(_mm512_unpackhi_pd(c, d)));
  }
  constexpr int EVEN = _MM_SHUFFLE(2, 0, 2, 0), ODD = _MM_SHUFFLE(3, 1, 3, 1);
  const __m512 u = _mm512_add_ps(_mm512_shuffle_f32x4(quads[0], quads[1], EVEN),
                                 _mm512_shuffle_f32x4(quads[0], quads[1], ODD));
  const __m512 w = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2], quads[3], EVEN),
                                 _mm512_shuffle_f32x4(quads[2], quads[3], ODD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(u, w, EVEN), _mm512_shuffle_f32x4(u, w, ODD));
}

// score_keys for head dims of C * 16 (C known at compile time), all of the kv head's query rows from one read of
// each key: 16 keys at a time, each key converted once into C vectors and multiplied by up to 8 query rows (read
// from L1 as the products' operands), each row's 16 dot products then summed together by reduce16.
template <int C, typename KT>
void score_keys_c(const float* q, const Buffer<KT>& keys, int64_t h, int64_t from, int64_t to, int64_t n0,
                  int64_t G, float scale, float* scores) {
  constexpr int64_t D = C * 16, ROWS = 8;
  const KT* rows = keys.row(h, 0);
  int64_t n = from;
  for (; n + 16 <= to; n += 16) {
    for (int64_t g0 = 0; g0 < G; g0 += ROWS) {
      const int64_t rows_now = std::min(ROWS, G - g0);
      __m512 part[ROWS][16];
      for (int i = 0; i < 16; ++i) {
        const KT* k = rows + (n + i) * D;
        if (g0 == 0) {
          for (int64_t b = 0; b < D * int64_t(sizeof(KT)); b += 64) {
            _mm_prefetch(reinterpret_cast<const char*>(k) + CACHE_AHEAD + b, _MM_HINT_T0);
          }
        }
        __m512 kv[C];
        for (int j = 0; j < C; ++j) kv[j] = load16(k + 16 * j);
        for (int64_t g = 0; g < rows_now; ++g) {
          const float* qg = q + (g0 + g) * D;
          __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(qg), kv[0]);
          for (int j = 1; j < C; ++j) acc = _mm512_fmadd_ps(_mm512_loadu_ps(qg + 16 * j), kv[j], acc);
          part[g][i] = acc;
        }
      }
      for (int64_t g = 0; g < rows_now; ++g) {
        __m512 r = _mm512_mul_ps(reduce16(part[g]), _mm512_set1_ps(scale));
        if constexpr (Buffer<KT>::QUANTIZED) r = _mm512_mul_ps(r, _mm512_loadu_ps(keys.scales + h * keys.N + n));
        _mm512_storeu_ps(scores + (g0 + g) * BLOCK - n0 + n, r);
      }
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t m = n; m < to; ++m) {
      scores[g * BLOCK + m - n0] = dot(q + g * D, rows + m * D, D) * keys.scale(h, m) * scale;
    }
  }
}

// add_values for G query rows and CC * 16 dims at a time, both known at compile time: the block's value rows are
// read in order, each converted once, in one pass per CC * 16 dims (one pass in all for the common head dims and
// group sizes, so the rows stream from memory), the G * CC sums held in registers. With eight sums or fewer there
// are two sets of them, so that consecutive keys do not wait on each other's products.
template <int G, int CC, typename KT>
void add_values_g(const Buffer<KT>& values, int64_t h, int64_t n0, int64_t n1, const bool* visible, const float* p,
                  int64_t D, float* acc) {
  constexpr int SETS = G * CC <= 8 ? 2 : 1;
  const KT* rows = values.row(h, 0);
  const float* scales = Buffer<KT>::QUANTIZED ? values.scales + h * values.N : nullptr;
  for (int64_t j0 = 0; j0 < D; j0 += 16 * CC) {
    __m512 sums[SETS][G][CC];
    for (int g = 0; g < G; ++g) {
      for (int c = 0; c < CC; ++c) {
        sums[0][g][c] = _mm512_loadu_ps(acc + g * D + j0 + 16 * c);
        if constexpr (SETS == 2) sums[1][g][c] = _mm512_setzero_ps();
      }
    }
    auto add = [&](int64_t n, __m512 (&into)[G][CC]) {
      for (int64_t b = 0; b < CC * 16 * int64_t(sizeof(KT)); b += 64) {
        _mm_prefetch(reinterpret_cast<const char*>(rows + n * D + j0) + CACHE_AHEAD + b, _MM_HINT_T0);
      }
      __m512 v[CC];
      for (int c = 0; c < CC; ++c) {
        v[c] = load16(rows + n * D + j0 + 16 * c);
        if constexpr (Buffer<KT>::QUANTIZED) v[c] = _mm512_mul_ps(v[c], _mm512_set1_ps(scales[n]));
      }
      for (int g = 0; g < G; ++g) {
        const __m512 w = _mm512_set1_ps(p[g * BLOCK + n - n0]);
        for (int c = 0; c < CC; ++c) into[g][c] = _mm512_fmadd_ps(w, v[c], into[g][c]);
      }
    };
    int64_t n = n0;
    for (; n + 1 < n1; n += 2) {
      if (visible[n]) add(n, sums[0]);
      if (visible[n + 1]) add(n + 1, sums[SETS - 1]);
    }
    if (n < n1 && visible[n]) add(n, sums[0]);
    for (int g = 0; g < G; ++g) {
      for (int c = 0; c < CC; ++c) {
        __m512 total = sums[0][g][c];
        if constexpr (SETS == 2) total = _mm512_add_ps(total, sums[1][g][c]);
        _mm512_storeu_ps(acc + g * D + j0 + 16 * c, total);
      }
    }
  }
}

// add_values_g with as many dims at a time as keep the G rows' sums within 16 registers: CC the largest of 16, 8
// and 4 (2 for groups of 5 to 8) that is at most 16 / G and divides D / 16, else 1.
template <int G, typename KT>
void add_values_fit(const Buffer<KT>& values, int64_t h, int64_t n0, int64_t n1, const bool* visible, const float* p,
                    int64_t D, float* acc) {
  constexpr int MOST = 16 / G;
  const int64_t C = D / 16;
  if constexpr (MOST >= 16) {
    if (C % 16 == 0) return add_values_g<G, 16>(values, h, n0, n1, visible, p, D, acc);
  }
  if constexpr (MOST >= 8) {
    if (C % 8 == 0) return add_values_g<G, 8>(values, h, n0, n1, visible, p, D, acc);
  }
  if constexpr (MOST >= 4) {
    if (C % 4 == 0) return add_values_g<G, 4>(values, h, n0, n1, visible, p, D, acc);
  } else {
    if (C % 2 == 0) return add_values_g<G, 2>(values, h, n0, n1, visible, p, D, acc);
  }
  return add_values_g<G, 1>(values, h, n0, n1, visible, p, D, acc);
}
#endif

// The scores of keys from..to (of kv head h; a block starting at n0) against G query rows q (G, D), times
// ``scale``: scores[g * BLOCK + n - n0].
template <typename KT>
void score_keys(const float* q, const Buffer<KT>& keys, int64_t h, int64_t from, int64_t to, int64_t n0, int64_t G,
                int64_t D, float scale, float* scores) {
#if defined(__AVX512F__)
  constexpr bool loads = std::is_same_v<KT, float> || std::is_same_v<KT, at::BFloat16> || std::is_same_v<KT, int8_t>;
  if constexpr (loads) {
    if (D == 64) return score_keys_c<4>(q, keys, h, from, to, n0, G, scale, scores);
    if (D == 128) return score_keys_c<8>(q, keys, h, from, to, n0, G, scale, scores);
    if (D == 256) return score_keys_c<16>(q, keys, h, from, to, n0, G, scale, scores);
  }
#endif
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t n = from; n < to; ++n) {
      scores[g * BLOCK + n - n0] = dot(q + g * D, keys.row(h, n), D) * keys.scale(h, n) * scale;
    }
  }
}

// acc[g] += sum over the visible keys n0..n1 of p[g][n - n0] * value[n], for the G query rows of kv head h
// (p: G rows of BLOCK weights; acc: G rows of D sums; vrow: D floats of scratch).
template <typename KT>
void add_values(const Buffer<KT>& values, int64_t h, int64_t n0, int64_t n1, const bool* visible, const float* p,
                int64_t G, int64_t D, float* acc, float* vrow) {
#if defined(__AVX512F__)
  constexpr bool loads = std::is_same_v<KT, float> || std::is_same_v<KT, at::BFloat16> || std::is_same_v<KT, int8_t>;
  if constexpr (loads) {
    if (D % 16 == 0) {
      switch (G) {  // the group sizes of common models: 1 (multi-head), 2-8 (grouped-query)
        case 1: return add_values_fit<1>(values, h, n0, n1, visible, p, D, acc);
        case 2: return add_values_fit<2>(values, h, n0, n1, visible, p, D, acc);
        case 3: return add_values_fit<3>(values, h, n0, n1, visible, p, D, acc);
        case 4: return add_values_fit<4>(values, h, n0, n1, visible, p, D, acc);
        case 5: return add_values_fit<5>(values, h, n0, n1, visible, p, D, acc);
        case 6: return add_values_fit<6>(values, h, n0, n1, visible, p, D, acc);
        case 7: return add_values_fit<7>(values, h, n0, n1, visible, p, D, acc);
        case 8: return add_values_fit<8>(values, h, n0, n1, visible, p, D, acc);
        default: break;
      }
    }
  }
#endif
  for (int64_t n = n0; n < n1; ++n) {
    if (!visible[n]) continue;
    values.get(h, n, vrow);
    for (int64_t g = 0; g < G; ++g) {
      const float w = p[g * BLOCK + n - n0];
      float* ag = acc + g * D;
      for (int64_t d = 0; d < D; ++d) ag[d] += w * vrow[d];
    }
  }
}

// The G query heads of each kv head against the visible keys, split into blocks of keys so that every thread has
// work. Each block scores its keys (an invisible one scores -inf), takes the exponentials of the scores less the
// block's maximum in one pass, and sums the weighted values; the blocks' maxima, sums and weighted values are
// merged at the end. Keys from slot ``split`` on (recalled from memory), and the first ``anchored`` ones (the
// sinks in place, where they are not moved), are scored with the turned query ``qa`` instead of ``q``.
template <typename KT, typename T>
void attend(const float* q, const float* qa, int64_t split, int64_t anchored, const Buffer<KT>& keys,
            const Buffer<KT>& values, const bool* visible, int64_t H, int64_t Hkv, int64_t N, int64_t D, float scale,
            T* out) {
  const int64_t G = H / Hkv;
  const int64_t blocks = (N + BLOCK - 1) / BLOCK;
  const float NEG = -std::numeric_limits<float>::infinity();
  // buffers kept per thread from one call to the next: no allocation per layer once warm. The tasks reach the
  // calling thread's through these pointers (a thread_local named inside the lambda would be the worker's own).
  thread_local std::vector<float> maxes_kept, sums_kept, acc_kept, o_kept;
  maxes_kept.assign(Hkv * blocks * G, NEG);
  sums_kept.assign(Hkv * blocks * G, 0.0f);
  acc_kept.assign(Hkv * blocks * G * D, 0.0f);
  float* const maxes = maxes_kept.data();
  float* const sums = sums_kept.data();
  float* const acc = acc_kept.data();
  at::parallel_for(0, Hkv * blocks, 1, [&](int64_t begin, int64_t end) {
    thread_local std::vector<float> scores, vrow;
    scores.resize(G * BLOCK);
    vrow.resize(D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t h = task / blocks, n0 = (task % blocks) * BLOCK, n1 = std::min(N, n0 + BLOCK);
      const int64_t count = n1 - n0;
      const float* Q = q + h * G * D;
      const float* QA = qa + h * G * D;
      float* m = maxes + task * G;
      float* l = sums + task * G;
      float* a = acc + task * G * D;
      bool any = false;
      for (int64_t n = n0; n < n1 && !any; ++n) any = visible[n];
      if (!any) continue;
      // keys before ``anchored`` and from ``split`` on see the turned query
      const int64_t mid0 = std::clamp(anchored, n0, n1), mid1 = std::clamp(split, mid0, n1);
      score_keys(QA, keys, h, n0, mid0, n0, G, D, scale, scores.data());
      score_keys(Q, keys, h, mid0, mid1, n0, G, D, scale, scores.data());
      score_keys(QA, keys, h, mid1, n1, n0, G, D, scale, scores.data());
      for (int64_t n = n0; n < n1; ++n) {
        if (visible[n]) continue;
        for (int64_t g = 0; g < G; ++g) scores[g * BLOCK + n - n0] = NEG;
      }
      for (int64_t g = 0; g < G; ++g) {
        float* sg = scores.data() + g * BLOCK;
        const float top = max_of(sg, count);
        exp_less(sg, count, top);
        m[g] = top;
        l[g] = sum_of(sg, count);
      }
      add_values(values, h, n0, n1, visible, scores.data(), G, D, a, vrow.data());
    }
  });
  for (int64_t h = 0; h < Hkv; ++h) {
    for (int64_t g = 0; g < G; ++g) {
      float top = NEG;
      for (int64_t b = 0; b < blocks; ++b) top = std::max(top, maxes[(h * blocks + b) * G + g]);
      float total = 0;
      std::vector<float>& o = o_kept;
      o.assign(D, 0.0f);
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

// One weight matrix: the model's own (kind 0), 4-bit tiles (kind 1) or 8-bit tiles (kind 2); quant.py's MatVec,
// Int4MatVec and Int8MatVec.
struct Matrix {
  int64_t kind = 0;
  at::Tensor a, b;
  // The integer kinds' tiles, scales and sizes, checked and read off the tensors once: a token runs 121 products,
  // and reading each one's tensor metadata again (cold by then) cost about 0.1 ms a token.
  const uint8_t* tiles = nullptr;
  const void* steps = nullptr;  // float16 steps and lows (kind 1), float32 row scales (kind 2)
  int64_t N = 0, Kp = 0;

  Matrix() = default;
  Matrix(int64_t kind_, at::Tensor a_, at::Tensor b_) : kind(kind_), a(std::move(a_)), b(std::move(b_)) {
    if (kind == 0) return;
    TORCH_CHECK(kind == 1 || kind == 2, "matrix kind: 0, 1 or 2");
    TORCH_CHECK(a.scalar_type() == at::kByte && a.is_contiguous() && b.is_contiguous(), "tiles: contiguous bytes");
    N = kind == 1 ? a.size(0) * TILE : b.size(0);
    Kp = kind == 1 ? a.size(1) * GROUP : a.size(1) * 4;
    TORCH_CHECK(kind == 2 || (b.scalar_type() == at::kHalf && b.numel() == a.size(0) * a.size(1) * 2 * TILE),
                "int4 tiles: float16 steps and lows");
    TORCH_CHECK(kind == 1 || (b.scalar_type() == at::kFloat && a.size(0) == (N + TILE - 1) / TILE),
                "int8 tiles: one float32 scale per row");
    tiles = a.data_ptr<uint8_t>();
    steps = b.data_ptr();
  }

  // x (R, in) -> (R, out)
  at::Tensor operator()(const at::Tensor& x) const {
    if (kind == 0 && !one_row16(x)) return x.size(0) > 1 ? at::mm(x, a.t()) : at::mv(a, x[0]).unsqueeze(0);
    at::Tensor y = at::empty({x.size(0), outputs()}, x.options());
    into(x, y, false);
    return y;
  }

  // y (R, out), of x's dtype: y = x W^T, or with ``add`` y += x W^T (rounded as y.add_ would round it); for one
  // row and 16-bit weights, and for the integer kinds, without a tensor in between.
  void into(const at::Tensor& x, at::Tensor& y, bool add) const {
    if (kind != 0) return integer(x, y, add);
    if (one_row16(x) && y.scalar_type() == a.scalar_type() && y.is_contiguous()) {
      if (a.scalar_type() == at::kBFloat16) return matvec16(a, x[0], y.data_ptr<at::BFloat16>(), add);
      if (a.scalar_type() == at::kFloat) return matvec16(a, x[0], y.data_ptr<float>(), add);
      return matvec16(a, x[0], y.data_ptr<at::Half>(), add);
    }
    add ? y.add_((*this)(x)) : y.copy_((*this)(x));
  }

  int64_t outputs() const { return kind == 0 ? a.size(0) : N; }

 private:
  // one row of x, and W of 16-bit floats of x's dtype, in one piece: matvec16's case
  bool one_row16(const at::Tensor& x) const {
    bool ours = a.scalar_type() == at::kBFloat16 || a.scalar_type() == at::kHalf;
#if defined(__AVX512F__)
    ours = ours || a.scalar_type() == at::kFloat;  // without AVX-512, MKL's float32 product is the faster
#endif
    return x.size(0) == 1 && ours && a.is_contiguous() && x.scalar_type() == a.scalar_type();
  }

  void integer(const at::Tensor& x, at::Tensor& y, bool add) const {
    const int64_t R = x.size(0), K = x.size(1);
    TORCH_CHECK(Kp == (K + GROUP - 1) / GROUP * GROUP, "x: ", K, " inputs for tiles of ", Kp);
    TORCH_CHECK(y.is_contiguous() && y.size(0) == R && y.size(1) == N && y.scalar_type() == x.scalar_type(),
                "y: contiguous (R, out) of x's dtype");
    const at::Tensor xc = x.contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "streamllm_int_matmul", [&] {
      thread_local Quantized xq;  // per calling thread: steps may run in several threads at once
      quantize_rows(xc.data_ptr<scalar_t>(), R, K, xq);
      if (kind == 1) {
        int4_rows(tiles, static_cast<const at::Half*>(steps), xq, N, y.data_ptr<scalar_t>(), add);
      } else {
        int8_rows(tiles, static_cast<const float*>(steps), xq, N, y.data_ptr<scalar_t>(), add);
      }
    });
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

  // R tokens, each of its own stream. x: their embeddings (R, E); cos, sin: their rotary angles (R, Dr), Dr <= D
  // the rotated dims of a head; turn: the rotations that move the sinks to where each token sees them (R, 2 Dr)
  // float32, as cos, cos, -sin, sin of the half-angles, empty without sinks or recalled keys; visible: (R, N)
  // bool, from the cache's plan (slots 0..S-1 the sinks, slots past C keys recalled from memory, both seen by the
  // query turned the other way); keys,
  // values: per layer, per row (1, Hkv, N, D), of the model's dtype or int8; key_scales, value_scales: per layer,
  // per row, the scales (1, Hkv, N) float32 of an int8 buffer, empty for the others; slots: (R,) the slot the plan
  // gives each new token, or -1. Every
  // stream has the same C and S. Each layer's new key and value are left in scratch slot C, and stored at the
  // row's slot after attending when it is not -1 (the cache's commit then only records it). Returns the logits
  // (R, V), float32.
  at::Tensor operator()(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& turn,
                        const at::Tensor& visible, const std::vector<std::vector<at::Tensor>>& keys,
                        const std::vector<std::vector<at::Tensor>>& values,
                        const std::vector<std::vector<at::Tensor>>& key_scales,
                        const std::vector<std::vector<at::Tensor>>& value_scales, const std::vector<int64_t>& slots,
                        int64_t C, int64_t S) {
    const int64_t R = x.size(0);
    TORCH_CHECK(keys.size() == layers_.size() && values.size() == layers_.size(), "one cache buffer per layer");
    TORCH_CHECK(key_scales.size() == layers_.size() && value_scales.size() == layers_.size(), "scales per layer");
    TORCH_CHECK(static_cast<int64_t>(slots.size()) == R, "one slot per row");
    TORCH_CHECK(visible.scalar_type() == at::kBool && visible.is_contiguous(), "visible: contiguous bool");
    TORCH_CHECK(turn.numel() == 0 || (turn.scalar_type() == at::kFloat && turn.is_contiguous()),
                "turn: contiguous float32");
    TORCH_CHECK((S == 0 && visible.size(1) == C + 1) || turn.size(0) == x.size(0), "turn: one per row");
    TORCH_CHECK(turn.numel() == 0 || turn.size(1) == 2 * cos.size(1), "turn: 2 Dr values per row");
    at::Tensor out;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "streamllm_decode_step", [&] {
      out = run<scalar_t>(x, cos.contiguous(), sin.contiguous(), turn, visible, keys, values, key_scales,
                          value_scales, slots, C, S);
    });
    return out;
  }

 private:
  template <typename T>
  at::Tensor run(const at::Tensor& embeddings, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& turn,
                 const at::Tensor& visible, const std::vector<std::vector<at::Tensor>>& keys,
                 const std::vector<std::vector<at::Tensor>>& values,
                 const std::vector<std::vector<at::Tensor>>& key_scales,
                 const std::vector<std::vector<at::Tensor>>& value_scales, const std::vector<int64_t>& slots, int64_t C,
                 int64_t S) {
    const int64_t H = H_, Hkv = Hkv_, D = D_, R = embeddings.size(0), E = embeddings.size(1);
    const int64_t N = visible.size(1);
    const int64_t Dr = cos.size(1);  // rotated dims of each head
    const float eps = static_cast<float>(eps_);
    at::Tensor x = embeddings.contiguous().clone();  // (R, E) the residual streams
    at::Tensor h = at::empty_like(x);               // (R, E) their normalised copies
    at::Tensor rotated = at::empty({H + Hkv, D}, x.options());
    at::Tensor q = at::empty({H, D}, x.options().dtype(at::kFloat));
    at::Tensor qa = at::empty({H, D}, x.options().dtype(at::kFloat));  // q turned to see recalled keys
    const int64_t split = C + 1;  // first slot of the recalled keys (N when there are none)
    at::Tensor attended = at::empty({R, H * D}, x.options());
    at::Tensor qkv, gate_up, act;  // the products' outputs, made once (again only where a layer's shape differs)
    auto sized = [&](at::Tensor& t, int64_t width) {
      if (!t.defined() || t.size(1) != width) t = at::empty({R, width}, x.options());
    };
    for (size_t i = 0; i < layers_.size(); ++i) {
      const Layer& L = layers_[i];
      TORCH_CHECK(static_cast<int64_t>(keys[i].size()) == R && static_cast<int64_t>(values[i].size()) == R,
                  "one cache buffer per row");
      for (int64_t row = 0; row < R; ++row) {
        rms_norm(x.data_ptr<T>() + row * E, L.norm_in.data_ptr<T>(), h.data_ptr<T>() + row * E, E, eps);
      }
      sized(qkv, L.qkv.outputs());  // (R, H D + 2 Hkv D)
      L.qkv.into(h, qkv, false);
      if (L.qkv_bias.defined()) qkv.add_(L.qkv_bias);
      const int64_t width = qkv.size(1);
      for (int64_t row = 0; row < R; ++row) {
        const at::Tensor& kt = keys[i][row];
        const at::Tensor& vt = values[i][row];
        const at::Tensor& ks = key_scales[i][row];
        const at::Tensor& vs = value_scales[i][row];
        TORCH_CHECK(kt.is_contiguous() && vt.is_contiguous() && kt.size(2) == N, "cache buffers: contiguous, N slots");
        T* raw = qkv.data_ptr<T>() + row * width;
        if (L.q_norm.defined()) {  // Qwen3: each head of q and k normalised
          for (int64_t j = 0; j < H + Hkv; ++j) {
            const T* w = (j < H ? L.q_norm : L.k_norm).data_ptr<T>();
            rms_norm(raw + j * D, w, raw + j * D, D, eps);
          }
        }
        T* r = rotated.data_ptr<T>();
        const T* c = cos.data_ptr<T>() + row * Dr;
        const T* s = sin.data_ptr<T>() + row * Dr;
        for (int64_t j = 0; j < H + Hkv; ++j) rotate(raw + j * D, c, s, r + j * D, D, Dr);
        float* qf = q.data_ptr<float>();
        for (int64_t j = 0; j < H * D; ++j) qf[j] = to_float(r[j]);
        float* qt = qa.data_ptr<float>();
        if (S || split < N) turn_query(qf, turn.data_ptr<float>() + row * 2 * Dr, Dr, qt, H, D);
        T* o = attended.data_ptr<T>() + row * H * D;
        const bool* seen = visible.data_ptr<bool>() + row * N;
        if (kt.scalar_type() == at::kChar) {
          TORCH_CHECK(ks.numel() == kt.numel() / D && vs.numel() == ks.numel(), "int8 buffers: one scale per row");
          attend_row(buffer<int8_t>(kt, ks, N, D), buffer<int8_t>(vt, vs, N, D), r, raw + (H + Hkv) * D, qf, qt,
                     split, seen, C, S, slots[row], o);
        } else {
          TORCH_CHECK(kt.scalar_type() == x.scalar_type(), "cache buffers: int8 or the model's dtype");
          attend_row(buffer<T>(kt, ks, N, D), buffer<T>(vt, vs, N, D), r, raw + (H + Hkv) * D, qf, qt, split, seen,
                     C, S, slots[row], o);
        }
      }
      L.o.into(attended, x, true);
      for (int64_t row = 0; row < R; ++row) {
        rms_norm(x.data_ptr<T>() + row * E, L.norm_post.data_ptr<T>(), h.data_ptr<T>() + row * E, E, eps);
      }
      sized(gate_up, L.gate_up.outputs());  // (R, 2 F)
      L.gate_up.into(h, gate_up, false);
      const int64_t F = gate_up.size(1) / 2;
      sized(act, F);
      for (int64_t row = 0; row < R; ++row) {
        silu_mul(gate_up.data_ptr<T>() + row * 2 * F, act.data_ptr<T>() + row * F, F);
      }
      L.down.into(act, x, true);
    }
    for (int64_t row = 0; row < R; ++row) {
      rms_norm(x.data_ptr<T>() + row * E, norm_.data_ptr<T>(), h.data_ptr<T>() + row * E, E, eps);
    }
    return lm_head_(h).to(at::kFloat);
  }

  // One row's attention in one layer, on its cache buffers: the token's key and value (r's last Hkv heads, v) go
  // into scratch slot C, the query attends, and the key and value go into the plan's slot (when it is not -1). The
  // sinks are scored where they are stored (slots 0..S-1) with the turned query ``qa``, as recalled keys are:
  // q . (k M) = (q M^T) . k, so no key is moved (an 8-bit one would be quantized again). An 8-bit buffer
  // quantizes what it is given, the token's own key too.
  template <typename KT, typename T>
  void attend_row(const Buffer<KT>& K, const Buffer<KT>& V, const T* r, const T* v, const float* q, const float* qa,
                  int64_t split, const bool* visible, int64_t C, int64_t S, int64_t slot, T* out) const {
    const int64_t H = H_, Hkv = Hkv_, D = D_;
    for (int64_t k = 0; k < Hkv; ++k) {  // the token sees itself through scratch slot C
      K.put(k, C, r + (H + k) * D);
      V.put(k, C, v + k * D);
    }
    attend(q, qa, split, S, K, V, visible, H, Hkv, K.N, D, static_cast<float>(scale_), out);
    for (int64_t k = 0; slot >= 0 && k < Hkv; ++k) {  // then into the slot the plan gave it
      K.copy(k, C, slot);
      V.copy(k, C, slot);
    }
  }

  // The query (H, D) turned the opposite way of the rotation M that ``values`` (cos, cos, -sin, sin over Dr
  // dims) describe, which moves keys to where the query sees them: q . (k M) = (q M^T) . k. With x M = x cos +
  // rotate_half(x) sin, q M^T = q cos - rotate_half(q) sin over the first Dr dims; the rest pass through.
  static void turn_query(const float* q, const float* values, int64_t Dr, float* out, int64_t H, int64_t D) {
    const int64_t half = Dr / 2;
    const float* cos = values;
    const float* sin = values + Dr + half;
    for (int64_t h = 0; h < H; ++h) {
      const float* x = q + h * D;
      float* y = out + h * D;
      for (int64_t j = 0; j < half; ++j) {
        y[j] = x[j] * cos[j] + x[j + half] * sin[j];
        y[j + half] = x[j + half] * cos[j + half] - x[j] * sin[j];
      }
      for (int64_t j = Dr; j < D; ++j) y[j] = x[j];
    }
  }

  // act(gate) * up with SiLU, each rounded to the model dtype as torch's two operations would.
  template <typename T>
  static void silu_mul(const T* gate_up, T* out, int64_t F) {
    int64_t j = 0;
#if defined(__AVX512F__)
    if constexpr (std::is_same_v<T, float> || std::is_same_v<T, at::BFloat16>) {
      constexpr bool bf16 = std::is_same_v<T, at::BFloat16>;
      for (; j + 16 <= F; j += 16) {
        const __m512 g = load16(gate_up + j);
        const __m512 decay = exp16(_mm512_sub_ps(_mm512_setzero_ps(), g));  // e^-g
        __m512 act = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), decay));
        if constexpr (bf16) act = round_bf16(act);
        const __m512 prod = _mm512_mul_ps(act, load16(gate_up + F + j));
        store16(out + j, bf16 ? round_bf16(prod) : prod);
      }
    }
#endif
    for (; j < F; ++j) {
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

at::Tensor attend_heads(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                        const at::Tensor& key_scales, const at::Tensor& value_scales, const at::Tensor& visible,
                        double scale) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && q.is_contiguous() && q.dim() == 2, "q: contiguous (H, D) float32");
  TORCH_CHECK(keys.dim() == 3 && keys.is_contiguous() && values.is_contiguous(),
              "keys, values: contiguous (Hkv, N, D)");
  TORCH_CHECK(visible.scalar_type() == at::kBool && visible.numel() == keys.size(1), "visible: (N,) bool");
  const int64_t H = q.size(0), D = q.size(1), Hkv = keys.size(0), N = keys.size(1);
  at::Tensor out = at::empty({H, D}, q.options());
  const float* qf = q.data_ptr<float>();
  const bool* seen = visible.data_ptr<bool>();
  const float s = static_cast<float>(scale);
  if (keys.scalar_type() == at::kChar) {
    attend(qf, qf, N, 0, buffer<int8_t>(keys, key_scales, N, D), buffer<int8_t>(values, value_scales, N, D), seen, H,
           Hkv, N, D, s, out.data_ptr<float>());
  } else if (keys.scalar_type() == at::kBFloat16) {
    attend(qf, qf, N, 0, buffer<at::BFloat16>(keys, key_scales, N, D), buffer<at::BFloat16>(values, value_scales, N, D),
           seen, H, Hkv, N, D, s, out.data_ptr<float>());
  } else {
    TORCH_CHECK(keys.scalar_type() == at::kFloat, "keys: int8, bfloat16 or float32");
    attend(qf, qf, N, 0, buffer<float>(keys, key_scales, N, D), buffer<float>(values, value_scales, N, D), seen, H,
           Hkv, N, D, s, out.data_ptr<float>());
  }
  return out;
}

// The code paths this build compiled: the portable loops always, the AVX-512 ones where the target CPU has them.
std::string compiled_for() {
  std::string paths = "portable";
#if defined(__AVX512F__)
  paths += ",avx512f";
#endif
#if defined(__AVX512BF16__)
  paths += ",avx512bf16";
#endif
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  paths += ",avx512vnni";
#endif
  return paths;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("compiled_for", &compiled_for, "the code paths this build compiled, comma-separated");
  m.def("runs", []() { return thread_runs; }, "the runs of rows or tiles each thread reads side by side (2 or 4)");
  m.def("set_runs", [](int64_t runs) {
          TORCH_CHECK(runs == 2 || runs == 4, "runs: 2 or 4, not ", runs);
          thread_runs = runs;
        }, "read 2 or 4 runs of rows or tiles side by side per thread from now on (tests and measurements)");
  m.def("matmul", [](int64_t kind, const at::Tensor& a, const at::Tensor& b, const at::Tensor& x) {
          return Matrix{kind, a, b}(x);
        }, "x W^T for rows x (R, K), as the native step computes it: W the model's own weights a (kind 0), or 4-bit "
        "(kind 1) or 8-bit (kind 2) tiles a with their scales b (quant.py)");
  m.def("attend", &attend_heads, "the step's attention of one token's heads q (H, D) float32 over one layer's cache "
        "buffers keys, values (Hkv, N, D) (int8 with their scales (Hkv, N), or float32/bfloat16 with empty ones) "
        "where visible (N,) bool, scores times scale; -> (H, D) float32");
  pybind11::class_<Step>(m, "Step")
      .def(pybind11::init<const std::vector<std::vector<at::Tensor>>&, const std::vector<std::vector<int64_t>>&,
                          const std::vector<at::Tensor>&, int64_t, int64_t, int64_t, int64_t, double, double>())
      .def("__call__", &Step::operator(), pybind11::call_guard<pybind11::gil_scoped_release>());
}
