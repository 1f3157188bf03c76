// fastkd's fused KD loss on the device: the same contract as fastkd/_triton_kd.py, written for
// instruction economy. Device code only (CUDA headers, no torch), so that a counting build can
// compile one variant with its flags fixed (FASTKD_FIXED_*; see kernels/cuda_sass_count.py).
//
// The story of a row. Each row is split into parts held in registers by a group of threads: a
// few lanes of a warp for short rows, several warps, or (Hopper) the CTAs of a thread-block
// cluster for long ones. Every thread then works on its own slice first: the maximum of its
// student and teacher logits, then one sum of exp2 with log2(e)/T folded into one FFMA, relative
// to that maximum (and, for KL, the teacher-weighted sum of t - s). The slices' statistics are
// merged by (max, rescaled sums) pairs: lanes by shuffles; for a row over several warps, its first
// warp merges the warps' parts (shared memory) and, in a cluster, the CTAs' parts (distributed
// shared memory), then hands the row's statistics to the other warps. From the merged row
// statistics every thread writes the gradient of its slice from registers: a row is read once
// and written once. Rows too long for that loop over chunks (two sweeps; three for JSD).
//
// Log-sum-exps are kept in log2 units: with M the rounded product max * log2(e)/T used as the
// exponent offset, L = M + log2(sum) is exact up to the sum's rounding, whatever the size of M.
#pragma once

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace fastkd {
namespace device {

constexpr int kBlock = 256;  // threads per CTA, every kernel
constexpr int kWarps = kBlock / 32;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.69314718055994531f;
constexpr float kMaxFloat = 3.402823466e38f;
constexpr int kNoColumn = 0x7fffffff;

// ---------------------------------------------------------------------------------------------
// What one launch computes. Flags are uniform over the launch; branches on them sit outside the
// per-element loops.
struct Flags {
  int divergence;        // 0 KL(p_t || p_s), 1 KL(p_s || p_t), 2 generalised JSD
  bool has_labels;       // rows may be ignored (label == ignore_index)
  bool has_ce;           // the hard-label cross-entropy at T = 1
  bool same_temp;        // T == 1: the T = 1 statistics are the tempered ones
  bool grad_s, grad_t;   // which gradients to write
  bool meter_s, meter_t; // calibration histograms of the student / teacher
  bool count_on_device;  // 1 / rows that count is read from a device tensor
};

struct Params {
  int64_t n_rows;
  int n_cols;
  int64_t stride_s, stride_t, stride_gs, stride_gt;  // row strides in elements
  // layout, chosen by the host (kernels/launch_limits.h)
  int group;       // threads per row part: 1, 2, ..., 32 lanes, or 64, 128, 256 (whole warps)
  int vec;         // elements per vector access: 1, 2, 4 or 8
  int cluster;     // CTAs per row (a thread-block cluster); 1 otherwise
  int part_cols;   // columns per CTA of a cluster (a multiple of vec)
  int flush_tiles; // tiles between two flushes of the meters' fp32 partials
  Flags flags;
  float inv_temp, k_temp;  // 1/T and log2(e)/T
  float kd_scale, ce_scale, beta;
  int64_t ignore_index;
  const int64_t* labels;
  const int64_t* row_count;
  float inv_count;  // 1 / rows that count when the host knows it
  float grad_unit;  // 0: gradients times the row scale; > 0: times grad_unit (fp16, see KDSpec)
  int num_bins;
  const float* edges;  // num_bins + 2 (last = +inf)
  float* loss;
  double* meter_s;
  double* meter_t;
};

// Kernels come in two builds. LIGHT: KL(p_t || p_s) with the student's gradient (labels, the
// cross-entropy and the student's meter stay run-time flags), registers capped for 2 CTAs per SM.
// Heavy: every variant (reverse KL, JSD, teacher gradient, teacher meter), 1 CTA per SM with up to
// 255 registers: all their paths in one kernel spill under the light build's cap.
constexpr bool is_light(const Flags& f) { return f.divergence == 0 && !f.grad_t && !f.meter_t; }

template <bool LIGHT>
constexpr int min_ctas_per_sm() { return LIGHT ? 2 : 1; }

// A counting build fixes the flags and the layout at compile time, so that the SASS holds only
// the path one variant takes; the launcher never defines these.
template <bool LIGHT>
__device__ __forceinline__ Flags flags_of(const Params& p) {
#ifdef FASTKD_FIXED_FLAGS
  (void)p;
  return Flags FASTKD_FIXED_FLAGS;
#else
  Flags f = p.flags;
  if (LIGHT) f.divergence = 0, f.grad_t = false, f.meter_t = false;  // known at compile time
  return f;
#endif
}
#ifdef FASTKD_FIXED_GROUP
__device__ __forceinline__ int group_of(const Params&) { return FASTKD_FIXED_GROUP; }
__device__ __forceinline__ int vec_of(const Params&) { return FASTKD_FIXED_VEC; }
__device__ __forceinline__ int cluster_of(const Params&) { return FASTKD_FIXED_CLUSTER; }
#else
__device__ __forceinline__ int group_of(const Params& p) { return p.group; }
__device__ __forceinline__ int vec_of(const Params& p) { return p.vec; }
__device__ __forceinline__ int cluster_of(const Params& p) { return p.cluster; }
#endif

// The counting build (kernels/cuda_sass_count.py) counts the common path: it tells the compiler that the
// rare cases named with this do not happen. The launcher never defines FASTKD_COUNTING.
#ifdef FASTKD_COUNTING
#define FASTKD_COMMON_CASE(cond) \
  do {                           \
    if (!(cond)) __builtin_unreachable(); \
  } while (0)
#else
#define FASTKD_COMMON_CASE(cond) \
  do {                           \
  } while (0)
#endif

// Thread coordinates. The warp index is broadcast from lane 0 so that the compiler knows it is
// warp-uniform: branches on it then need no collective fallback around the shuffles inside. A
// counting build fixes it (FASTKD_COUNTING_WARP), to count what each warp role executes.
__device__ __forceinline__ int lane_index() { return static_cast<int>(threadIdx.x % 32); }
#ifdef FASTKD_COUNTING_WARP
__device__ __forceinline__ int warp_index() { return FASTKD_COUNTING_WARP; }
#else
__device__ __forceinline__ int warp_index() { return __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x / 32), 0); }
#endif
__device__ __forceinline__ int thread_index() { return warp_index() * 32 + lane_index(); }

// ---------------------------------------------------------------------------------------------
// Fast math: one MUFU each. ex2.approx is within about 2 ulp; the ftz forms flush results below 2^-126,
// which carry no weight next to the row's maximum (exp2(0) = 1).
__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float lg2(float x) {
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// x clamped from below to -FLT_MAX: -inf (a masked class) and NaN (-inf - -inf) become finite, so
// that a zero probability times it stays zero (0 log 0 = 0).
__device__ __forceinline__ float finite_below(float x) { return fmaxf(x, -kMaxFloat); }

// The exponent offset of a slice whose maximum is m: the rounded product m * k (never contracted
// into an FMA: every use must see the same value), or 0 for an empty slice (all -inf).
__device__ __forceinline__ float offset_of(float m, float k) { return m == -INFINITY ? 0.f : __fmul_rn(m, k); }

// Brings sums taken relative to offset_of(m_part) to the offset of the merged maximum m_all: the
// factor is exp2 of the difference of the two rounded offsets, the ones the exponentials used.
__device__ __forceinline__ float rescale(float m_part, float m_all, float k) {
  return m_part == -INFINITY ? 0.f : ex2(offset_of(m_part, k) - offset_of(m_all, k));
}

// ---------------------------------------------------------------------------------------------
// Elements in registers: a slice of K logits kept as raw 32-bit words (one fp32, or a pair of
// 16-bit values), converted to fp32 where used.
template <typename E>
struct Elem;

// (torch builds with __CUDA_NO_HALF_CONVERSIONS__ and friends: conversions are spelled out.)
template <>
struct Elem<float> {
  static constexpr uint32_t kNegInfWord = 0xff800000u;
  __device__ static float get(uint32_t w, int) { return __uint_as_float(w); }
  __device__ static float to_float(float x) { return x; }
  __device__ static float from_float(float x) { return x; }
};

template <>
struct Elem<__nv_bfloat16> {
  static constexpr uint32_t kNegInfWord = 0xff80ff80u;
  static constexpr uint16_t kNegInfHalf = 0xff80u;
  __device__ static float get(uint32_t w, int half) {
    return __uint_as_float(half ? (w & 0xffff0000u) : (w << 16));
  }
  __device__ static uint32_t max2(uint32_t a, uint32_t b) {
    __nv_bfloat162 m = __hmax2(*reinterpret_cast<__nv_bfloat162*>(&a), *reinterpret_cast<__nv_bfloat162*>(&b));
    return *reinterpret_cast<uint32_t*>(&m);
  }
  __device__ static uint32_t pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  __device__ static uint16_t pack1(float a) { return __bfloat16_as_ushort(__float2bfloat16_rn(a)); }
  __device__ static float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  __device__ static __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
};

template <>
struct Elem<__half> {
  static constexpr uint32_t kNegInfWord = 0xfc00fc00u;
  static constexpr uint16_t kNegInfHalf = 0xfc00u;
  __device__ static float get(uint32_t w, int half) {
    return __half2float(__ushort_as_half(static_cast<uint16_t>(half ? w >> 16 : w & 0xffffu)));
  }
  __device__ static uint32_t max2(uint32_t a, uint32_t b) {
    __half2 m = __hmax2(*reinterpret_cast<__half2*>(&a), *reinterpret_cast<__half2*>(&b));
    return *reinterpret_cast<uint32_t*>(&m);
  }
  __device__ static uint32_t pack(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  __device__ static uint16_t pack1(float a) { return __half_as_ushort(__float2half_rn(a)); }
  __device__ static float to_float(__half x) { return __half2float(x); }
  __device__ static __half from_float(float x) { return __float2half_rn(x); }
};

template <typename E, int K>
struct Slice {
  static constexpr bool kPacked = sizeof(E) == 2;
  static constexpr int kWords = K * static_cast<int>(sizeof(E)) / 4;
  uint32_t w[kWords];

  __device__ __forceinline__ float operator[](int j) const {
    if constexpr (kPacked) return Elem<E>::get(w[j >> 1], j & 1);
    else return Elem<E>::get(w[j], 0);
  }
};

// The largest element of a slice (NaN is ignored, as by fmaxf; it reaches the sums instead).
template <int K>
__device__ __forceinline__ float slice_max(const Slice<float, K>& x) {
  float m[4] = {x[0], x[1], x[2], x[3]};  // four chains for latency
#pragma unroll
  for (int j = 4; j < K; ++j) m[j & 3] = fmaxf(m[j & 3], x[j]);
  return fmaxf(fmaxf(m[0], m[1]), fmaxf(m[2], m[3]));
}

template <typename E, int K>
__device__ __forceinline__ float slice_max(const Slice<E, K>& x) {  // 16-bit: pairs at a time
  uint32_t m[2] = {x.w[0], x.w[1]};
#pragma unroll
  for (int j = 2; j < Slice<E, K>::kWords; ++j) m[j & 1] = Elem<E>::max2(m[j & 1], x.w[j]);
  uint32_t both = Elem<E>::max2(m[0], m[1]);
  return fmaxf(Elem<E>::get(both, 0), Elem<E>::get(both, 1));
}

// ---------------------------------------------------------------------------------------------
// Memory: a thread's slice is made of K / V vectors of V elements; vector i of the thread is
// vector (first + i * stride) of the part, so that consecutive lanes read consecutive vectors.
template <int V, typename E>
__device__ __forceinline__ void load_vector(uint32_t* w, int i, const E* src) {
  constexpr int kBytes = V * static_cast<int>(sizeof(E));
  if constexpr (kBytes == 16) {
    uint4 u = __ldg(reinterpret_cast<const uint4*>(src));
    w[4 * i] = u.x, w[4 * i + 1] = u.y, w[4 * i + 2] = u.z, w[4 * i + 3] = u.w;
  } else if constexpr (kBytes == 8) {
    uint2 u = __ldg(reinterpret_cast<const uint2*>(src));
    w[2 * i] = u.x, w[2 * i + 1] = u.y;
  } else if constexpr (kBytes == 4) {
    w[i] = __ldg(reinterpret_cast<const unsigned int*>(src));
  } else {  // one 16-bit element: half of a word
    uint32_t h = __ldg(reinterpret_cast<const unsigned short*>(src));
    w[i >> 1] = (i & 1) ? (w[i >> 1] & 0xffffu) | (h << 16) : (w[i >> 1] & 0xffff0000u) | h;
  }
}

template <int V, typename E>
__device__ __forceinline__ void fill_vector(uint32_t* w, int i) {  // an absent vector: -inf
  constexpr int kBytes = V * static_cast<int>(sizeof(E));
  if constexpr (kBytes >= 4) {
#pragma unroll
    for (int k = 0; k < kBytes / 4; ++k) w[kBytes / 4 * i + k] = Elem<E>::kNegInfWord;
  } else {
    uint32_t h = Elem<E>::kNegInfHalf;
    w[i >> 1] = (i & 1) ? (w[i >> 1] & 0xffffu) | (h << 16) : (w[i >> 1] & 0xffff0000u) | h;
  }
}

template <int V, typename E, int K>
__device__ __forceinline__ void load_slice_v(Slice<E, K>& x, const E* part, int first, int stride, int n_vecs) {
#pragma unroll
  for (int i = 0; i < K / V; ++i) {
    const int v = first + i * stride;
    if (v < n_vecs)
      load_vector<V>(x.w, i, part + static_cast<int64_t>(v) * V);
    else
      fill_vector<V, E>(x.w, i);
  }
}

// The same with the vector width known only at run time (uniform over the launch).
template <typename E, int K>
__device__ __forceinline__ void load_slice(Slice<E, K>& x, int vec, const E* part, int first, int stride,
                                           int n_vecs) {
  if (sizeof(E) == 2 && vec == 8) load_slice_v<(sizeof(E) == 2 ? 8 : 4)>(x, part, first, stride, n_vecs);
  else if (vec >= 4) load_slice_v<4>(x, part, first, stride, n_vecs);
  else if (vec == 2) load_slice_v<2>(x, part, first, stride, n_vecs);
  else load_slice_v<1>(x, part, first, stride, n_vecs);
}

template <int V, typename E>
__device__ __forceinline__ void store_vector(E* dst, const float* g) {
  constexpr int kBytes = V * static_cast<int>(sizeof(E));
  if constexpr (sizeof(E) == 4) {
    if constexpr (V == 4) {
      __stcs(reinterpret_cast<float4*>(dst), make_float4(g[0], g[1], g[2], g[3]));
    } else if constexpr (V == 2) {
      __stcs(reinterpret_cast<float2*>(dst), make_float2(g[0], g[1]));
    } else {
      __stcs(reinterpret_cast<float*>(dst), g[0]);
    }
  } else if constexpr (kBytes == 16) {
    __stcs(reinterpret_cast<uint4*>(dst), make_uint4(Elem<E>::pack(g[0], g[1]), Elem<E>::pack(g[2], g[3]),
                                                      Elem<E>::pack(g[4], g[5]), Elem<E>::pack(g[6], g[7])));
  } else if constexpr (kBytes == 8) {
    __stcs(reinterpret_cast<uint2*>(dst), make_uint2(Elem<E>::pack(g[0], g[1]), Elem<E>::pack(g[2], g[3])));
  } else if constexpr (kBytes == 4) {
    __stcs(reinterpret_cast<unsigned int*>(dst), Elem<E>::pack(g[0], g[1]));
  } else {
    __stcs(reinterpret_cast<unsigned short*>(dst), Elem<E>::pack1(g[0]));
  }
}

// Gradients are computed and stored kChunk slots at a time (one 16-byte vector of 16-bit values),
// so that a whole slice of them is never live in registers.
constexpr int kChunk = 8;

template <int V, typename E>
__device__ __forceinline__ void store_chunk_v(E* part, const float (&g)[kChunk], int chunk, int first, int stride,
                                              int n_vecs) {
#pragma unroll
  for (int k = 0; k < kChunk / V; ++k) {
    const int v = first + (chunk * (kChunk / V) + k) * stride;
    if (v < n_vecs) store_vector<V>(part + static_cast<int64_t>(v) * V, g + k * V);
  }
}

template <typename E>
__device__ __forceinline__ void store_chunk(E* part, int vec, const float (&g)[kChunk], int chunk, int first,
                                            int stride, int n_vecs) {
  if (sizeof(E) == 2 && vec == 8) store_chunk_v<(sizeof(E) == 2 ? 8 : 4)>(part, g, chunk, first, stride, n_vecs);
  else if (vec >= 4) store_chunk_v<4>(part, g, chunk, first, stride, n_vecs);
  else if (vec == 2) store_chunk_v<2>(part, g, chunk, first, stride, n_vecs);
  else store_chunk_v<1>(part, g, chunk, first, stride, n_vecs);
}

// Where a thread's slots lie in its part: slot j is element j % vec of vector first + (j / vec) * stride.
struct SliceMap {
  int vec, first, stride, n_vecs;

  __device__ __forceinline__ int column_of_slot(int j) const {  // relative to the part
    return (first + (j / vec) * stride) * vec + j % vec;
  }
  // Whether this thread holds part column c (0 <= c < n_vecs * vec).
  __device__ __forceinline__ bool holds(int c) const {
    const int v = c / vec;
    return v >= first && (v - first) % stride == 0;
  }
};


// Stores grad_of(j) for every slot j of a thread's slice, chunk by chunk.
template <typename E, int K, typename GradOf>
__device__ __forceinline__ void store_grad_slice(E* part, const SliceMap& map, GradOf grad_of) {
  static_assert(K % kChunk == 0, "slices are whole chunks");
#pragma unroll
  for (int c = 0; c < K / kChunk; ++c) {
    float g[kChunk];
#pragma unroll
    for (int j = 0; j < kChunk; ++j) g[j] = grad_of(c * kChunk + j);
    store_chunk(part, map.vec, g, c, map.first, map.stride, map.n_vecs);
  }
}

// The column (relative to the part) of the first element of a slice equal to m, kNoColumn if none.
// Slots run in column order, so the first slot found is the first column.
template <typename E, int K>
__device__ __forceinline__ int first_column_of(const Slice<E, K>& x, float m, const SliceMap& map) {
  int slot = -1;
#pragma unroll
  for (int j = K - 1; j >= 0; --j) slot = x[j] == m ? j : slot;
  return slot < 0 ? kNoColumn : map.column_of_slot(slot);
}

// ---------------------------------------------------------------------------------------------
// Softmax statistics of a part of a row (a slice, a warp's, a CTA's or the whole row's). m_*: raw
// maxima. The sums are relative to offset_of(m, k): z_s, z_t and d with k = log2(e)/T; z1, z2
// (student) and z1t, z2t (teacher) with k = log2(e), i.e. at T = 1 for the cross-entropy and the
// meters (z2: sum of squares, relative to twice the offset). d: for KL the teacher-weighted sum of
// t - s, for reverse KL the student-weighted sum of s - t (JSD needs the probabilities first).
struct Part {
  float m_s, m_t;
  float z_s, z_t, d;
  float z1, z2, z1t, z2t;
  int arg_s, arg_t;  // first column of the maximum (meters), kNoColumn when none
};

__device__ __forceinline__ Part empty_part() {
  return {-INFINITY, -INFINITY, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, kNoColumn, kNoColumn};
}

__device__ __forceinline__ bool needs_student_t1(const Flags& f) { return f.has_ce || f.meter_s; }

// Hides a slice's words from the compiler's value numbering (no instruction): each later loop then
// converts its 16-bit logits again instead of keeping a whole fp32 copy of the slice live, which
// is what spills at K = 64.
template <typename E, int K>
__device__ __forceinline__ void launder(Slice<E, K>& x) {
  if constexpr (Slice<E, K>::kPacked) {
#pragma unroll
    for (int i = 0; i < Slice<E, K>::kWords; ++i) asm volatile("" : "+r"(x.w[i]));
  }
}

// The tempered sums of a slice in one loop: z_s, z_t += exp2(x k - off), and the divergence's
// weighted differences: KL d += e_t (y - x), reverse KL d += e_s (x - y), none for JSD (masked
// classes, whose exponential is 0, add nothing: finite_below keeps 0 * -inf out). With KEEP the
// exponentials stay in es / et.
template <bool KEEP, int DIV, typename S, typename T, int K>
__device__ __forceinline__ void sum_tempered(const Slice<S, K>& x, const Slice<T, K>& y, float k, float off_s,
                                             float off_t, Part& part, float (&es)[K], float (&et)[K]) {
  float z_s = 0.f, z_t = 0.f, d = 0.f;
#pragma unroll
  for (int j = 0; j < K; ++j) {
    const float xj = x[j], yj = y[j];
    const float e_s = ex2(fmaf(xj, k, -off_s)), e_t = ex2(fmaf(yj, k, -off_t));
    z_s += e_s;
    z_t += e_t;
    if constexpr (DIV == 0) d = fmaf(e_t, finite_below(yj - xj), d);
    if constexpr (DIV == 1) d = fmaf(e_s, finite_below(xj - yj), d);
    if constexpr (KEEP) es[j] = e_s, et[j] = e_t;
  }
  part.z_s = z_s, part.z_t = z_t, part.d = d;
}

// The T = 1 sums of a slice whose maximum is m: z1 = sum exp2(a log2(e) - off1) and, for a meter
// (Z2), z2 its sum of squares. With T == 1 they are the tempered exponentials (e, or recomputed).
template <bool KEEP, bool Z2, typename A, int K>
__device__ __forceinline__ void sum_exps_t1(const Slice<A, K>& a, float m, bool same_temp, float k_temp, float z_temp,
                                            const float (&e)[K], float& z1, float& z2) {
  z1 = 0.f, z2 = 0.f;
  if (same_temp) {
    z1 = z_temp;
    if constexpr (Z2) {
      const float off = offset_of(m, k_temp);
#pragma unroll
      for (int j = 0; j < K; ++j) {
        const float ej = KEEP ? e[j] : ex2(fmaf(a[j], k_temp, -off));
        z2 = fmaf(ej, ej, z2);
      }
    }
  } else {
    const float off = offset_of(m, kLog2e);
#pragma unroll
    for (int j = 0; j < K; ++j) {
      const float e1 = ex2(fmaf(a[j], kLog2e, -off));
      z1 += e1;
      if constexpr (Z2) z2 = fmaf(e1, e1, z2);
    }
  }
}

// The statistics of one slice: maxima first, then the tempered sums in one loop, then the T = 1
// sums in their own (so that only the logits stay live between loops). With KEEP the tempered
// exponentials are left in es / et (relative to the slice's own offsets) for the gradient.
template <bool KEEP, typename S, typename T, int K>
__device__ __forceinline__ Part slice_stats(Slice<S, K>& x, Slice<T, K>& y, const Flags& f, float k_temp,
                                            const SliceMap& map, int col0, float (&es)[K], float (&et)[K]) {
  Part part = empty_part();
  part.m_s = slice_max(x);
  part.m_t = slice_max(y);
  launder(x);  // no conversion is hoisted above the maxima (the max of 16-bit pairs needs none)
  launder(y);
  const float off_s = offset_of(part.m_s, k_temp), off_t = offset_of(part.m_t, k_temp);
  if (f.divergence == 0)
    sum_tempered<KEEP, 0>(x, y, k_temp, off_s, off_t, part, es, et);
  else if (f.divergence == 1)
    sum_tempered<KEEP, 1>(x, y, k_temp, off_s, off_t, part, es, et);
  else
    sum_tempered<KEEP, 2>(x, y, k_temp, off_s, off_t, part, es, et);
  if (needs_student_t1(f)) {
    launder(x);
    if (f.meter_s)
      sum_exps_t1<KEEP, true>(x, part.m_s, f.same_temp, k_temp, part.z_s, es, part.z1, part.z2);
    else  // the cross-entropy alone needs no sum of squares
      sum_exps_t1<KEEP, false>(x, part.m_s, f.same_temp, k_temp, part.z_s, es, part.z1, part.z2);
  }
  if (f.meter_t) {
    launder(y);
    sum_exps_t1<KEEP, true>(y, part.m_t, f.same_temp, k_temp, part.z_t, et, part.z1t, part.z2t);
  }
  if (f.meter_s) {
    const int c = first_column_of(x, part.m_s, map);
    part.arg_s = c == kNoColumn ? c : col0 + c;
  }
  if (f.meter_t) {
    const int c = first_column_of(y, part.m_t, map);
    part.arg_t = c == kNoColumn ? c : col0 + c;
  }
  launder(x);
  launder(y);
  return part;
}

// Re-expresses a part's sums relative to the maxima m_s, m_t of a larger part containing it.
// The argmax of a part that does not hold the maximum drops out.
__device__ __forceinline__ void rebase(Part& p, float m_s, float m_t, const Flags& f, float k_temp) {
  const float fs = rescale(p.m_s, m_s, k_temp), ft = rescale(p.m_t, m_t, k_temp);
  p.z_s *= fs;
  p.z_t *= ft;
  p.d *= f.divergence == 0 ? ft : fs;
  if (needs_student_t1(f)) {
    const float f1 = rescale(p.m_s, m_s, kLog2e);
    p.z1 *= f1;
    p.z2 *= f1 * f1;
  }
  if (f.meter_t) {
    const float f1 = rescale(p.m_t, m_t, kLog2e);
    p.z1t *= f1;
    p.z2t *= f1 * f1;
  }
  if (p.m_s != m_s) p.arg_s = kNoColumn;
  if (p.m_t != m_t) p.arg_t = kNoColumn;
  p.m_s = m_s;
  p.m_t = m_t;
}

// Adds b's sums to a's (both already relative to the same maxima).
__device__ __forceinline__ void add_sums(Part& a, const Part& b, const Flags& f) {
  a.z_s += b.z_s;
  a.z_t += b.z_t;
  a.d += b.d;
  if (needs_student_t1(f)) a.z1 += b.z1, a.z2 += b.z2;
  if (f.meter_t) a.z1t += b.z1t, a.z2t += b.z2t;
  a.arg_s = min(a.arg_s, b.arg_s);
  a.arg_t = min(a.arg_t, b.arg_t);
}

// a and b merged, within one thread (the looping path's chunks).
__device__ __forceinline__ Part combine(Part a, Part b, const Flags& f, float k_temp) {
  const float m_s = fmaxf(a.m_s, b.m_s), m_t = fmaxf(a.m_t, b.m_t);
  rebase(a, m_s, m_t, f, k_temp);
  rebase(b, m_s, m_t, f, k_temp);
  add_sums(a, b, f);
  return a;
}

__device__ __forceinline__ float shfl_xor(float v, int o) { return __shfl_xor_sync(0xffffffffu, v, o); }
__device__ __forceinline__ int shfl_xor(int v, int o) { return __shfl_xor_sync(0xffffffffu, v, o); }

// Merges the parts of `width` aligned lanes (a power of 2, at most 32): the maxima first, then
// each lane rebases its sums once, then the sums. Every lane ends with the merged part.
__device__ __forceinline__ void merge_lanes(Part& p, int width, const Flags& f, float k_temp) {
  if (width <= 1) return;
  float m_s = p.m_s, m_t = p.m_t;
  for (int o = 1; o < width; o <<= 1) {
    m_s = fmaxf(m_s, shfl_xor(m_s, o));
    m_t = fmaxf(m_t, shfl_xor(m_t, o));
  }
  rebase(p, m_s, m_t, f, k_temp);
  for (int o = 1; o < width; o <<= 1) {
    p.z_s += shfl_xor(p.z_s, o);
    p.z_t += shfl_xor(p.z_t, o);
    if (f.divergence != 2) p.d += shfl_xor(p.d, o);
    if (needs_student_t1(f)) p.z1 += shfl_xor(p.z1, o);
    if (f.meter_s) p.z2 += shfl_xor(p.z2, o);
    if (f.meter_t) {
      p.z1t += shfl_xor(p.z1t, o);
      p.z2t += shfl_xor(p.z2t, o);
    }
    if (f.meter_s) p.arg_s = min(p.arg_s, shfl_xor(p.arg_s, o));
    if (f.meter_t) p.arg_t = min(p.arg_t, shfl_xor(p.arg_t, o));
  }
}

__device__ __forceinline__ void sum_lanes(float2& v, int width) {
  for (int o = 1; o < width; o <<= 1) {
    v.x += shfl_xor(v.x, o);
    v.y += shfl_xor(v.y, o);
  }
}

__device__ __forceinline__ int pow2_at_least(int n) { return n <= 1 ? 1 : 1 << (32 - __clz(n - 1)); }

// ---------------------------------------------------------------------------------------------
// Reductions over the threads of a row: lanes by shuffles; then, for a row spread over several
// warps, the group's first warp merges the warps' parts (shared memory) and, in a cluster, the CTAs'
// parts (distributed shared memory), and hands the result to the others through shared memory.
// Slots are double-buffered by round parity: a slot is rewritten two rounds later, after a barrier
// that every reader of the previous round has passed.
template <typename V>
struct RowSlots {
  V warp[2][kWarps];  // each warp's part
  V cta[2];           // this CTA's part, read by the cluster's first warps
  V row[2][kWarps];   // each group's merged part, for its warps
};

// Thread-block clusters exist in code compiled for sm_90 and later only; the host launches a
// cluster only when the kernel's loaded code is such (launch_limits.h: max_cluster_for).
#define FASTKD_CLUSTER_ARCH 900

__device__ __forceinline__ int cluster_rank_of(int cluster) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= FASTKD_CLUSTER_ARCH
  if (cluster > 1) return static_cast<int>(cooperative_groups::this_cluster().block_rank());
#endif
  return 0;
}

__device__ __forceinline__ void cluster_barrier() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= FASTKD_CLUSTER_ARCH
  cooperative_groups::this_cluster().sync();
#else
  __trap();  // unreachable: the launcher takes clusters only for code compiled with them
#endif
}

// Value held in CTA `rank`'s shared memory at `local` (this CTA's address of the same variable).
template <typename V>
__device__ __forceinline__ V read_cta(V* local, int rank) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= FASTKD_CLUSTER_ARCH
  return *cooperative_groups::this_cluster().map_shared_rank(local, rank);
#else
  return *local;
#endif
}

template <typename V, typename MergeLanes>
__device__ __forceinline__ void reduce_row(V& v, V empty, int group, int cluster, RowSlots<V>& slots, int parity,
                                           MergeLanes merge) {
  merge(v, group < 32 ? group : 32);
  if (group <= 32) return;  // (a cluster's CTAs always hold whole warps per row: group == kBlock)
  const int lane = lane_index(), warp = warp_index();
  const int warps = group / 32, first_warp = warp - warp % warps;
  if (lane == 0) slots.warp[parity][warp] = v;
  __syncthreads();
  if (warp == first_warp) {
    v = lane < warps ? slots.warp[parity][warp + lane] : empty;
    merge(v, warps);
  }
  if (cluster > 1) {
    if (warp == 0 && lane == 0) slots.cta[parity] = v;
    cluster_barrier();
    if (warp == 0) {
      v = lane < cluster ? read_cta(&slots.cta[parity], lane) : empty;
      merge(v, pow2_at_least(cluster));
    }
  }
  if (warp == first_warp && lane == 0) slots.row[parity][warp / warps] = v;
  __syncthreads();
  v = slots.row[parity][warp / warps];
}

// ---------------------------------------------------------------------------------------------
// A row's merged statistics, in every thread of its group. Its log-sum-exp2s are kept as (offset,
// log2 of the sum relative to it), for s and t at k = log2(e)/T (_s, _t) and at log2(e) (1, 1t):
// x k - offset is exact in one FFMA, and subtracting the small log2 of the sum afterwards keeps a
// probability's relative precision whatever the logits' size (rounding offset + lz into one
// float would lose it). mu: KL, the mean of t - s under p_t; reverse KL, the mean of s - t under
// p_s. div: the divergence (nats).
struct RowStats {
  float off_s, lz_s, off_t, lz_t, off1, lz1, off1t, lz1t;
  float mu, div;
  float ds2, dt2;  // JSD: sum p_s log2(p_s / m), sum p_t log2(p_t / m)
};

// log2(z) for a sum of exponentials: the exponent plus lg2 of the mantissa in [1, 2), where
// lg2.approx's error is absolute (about 2^-22); 0, inf and NaN go through lg2 itself.
__device__ __forceinline__ float log2_of_sum(float z) {
  const int bits = __float_as_int(z);
  const float mantissa = __int_as_float((bits & 0x007fffff) | 0x3f800000);
  const float exponent = static_cast<float>((bits >> 23) - 127);
  return z >= 1.17549435e-38f && z <= 3.40282347e38f ? exponent + lg2(mantissa) : lg2(z);
}

__device__ __forceinline__ RowStats row_stats(const Part& p, const Flags& f, const Params& prm) {
  RowStats r;
  r.off_s = offset_of(p.m_s, prm.k_temp), r.lz_s = log2_of_sum(p.z_s);
  r.off_t = offset_of(p.m_t, prm.k_temp), r.lz_t = log2_of_sum(p.z_t);
  r.off1 = r.lz1 = r.off1t = r.lz1t = 0.f;
  if (needs_student_t1(f)) r.off1 = offset_of(p.m_s, kLog2e), r.lz1 = log2_of_sum(p.z1);
  if (f.meter_t) r.off1t = offset_of(p.m_t, kLog2e), r.lz1t = log2_of_sum(p.z1t);
  r.mu = __fdividef(p.d, f.divergence == 0 ? p.z_t : p.z_s);
  const float ls_minus_lt = kLn2 * ((r.off_s - r.off_t) + (r.lz_s - r.lz_t));  // lse(s/T) - lse(t/T)
  r.div = prm.inv_temp * r.mu + (f.divergence == 0 ? ls_minus_lt : -ls_minus_lt);
  r.ds2 = r.dt2 = 0.f;
  return r;
}

// A probability from its logit: exp2(x k - off - lz).
__device__ __forceinline__ float prob(float x, float k, float off, float lz) { return ex2(fmaf(x, k, -off) - lz); }

// -log softmax(x)[label] at T = 1 for a row with maximum m: (m - x) + ln(sum exp(x - m)), the
// latter from the offset's exact rounding residual and the log2 of the sum.
__device__ __forceinline__ float nll_of(float x_label, float m, float off1, float lz1) {
  return (m - x_label) + kLn2 * (lz1 - fmaf(m, kLog2e, -off1));
}

// JSD, one element: p_s, p_t and log2(p / m) with m = beta p_t + (1 - beta) p_s, clamped below so
// that where p = 0 the product p log2(p / m) is 0. m is kept from below at the smallest normal
// float (lg2.approx.ftz flushes smaller ones to -inf); there p < 2^-125 and the term is negligible.
struct JsdTerms {
  float ps, pt, hs, ht;
};

__device__ __forceinline__ JsdTerms jsd_terms(float x, float y, const RowStats& r, float k_temp, float beta) {
  JsdTerms e;
  const float la = fmaf(x, k_temp, -r.off_s) - r.lz_s, lb = fmaf(y, k_temp, -r.off_t) - r.lz_t;
  e.ps = ex2(la);
  e.pt = ex2(lb);
  const float lm = lg2(fmaxf(fmaf(beta, e.pt, (1.f - beta) * e.ps), 1.17549435e-38f));
  e.hs = finite_below(la - lm);
  e.ht = finite_below(lb - lm);
  return e;
}

// ---------------------------------------------------------------------------------------------
// Gradients. Per row: scale = the gradient factor (0 for ignored rows, NaN for out-of-range
// labels, else grad_unit or the row scale). Coefficients on the per-element terms:
struct GradCoef {
  float kd;      // scale * kd_scale / T: on differences of tempered probabilities
  float kd_t;    // kd / T: on p (x - y - mu) (reverse KL student, KL teacher)
  float js, jt;  // JSD: kd (1 - beta) ln2 and kd beta ln2, on p (h - d)
  float ce;      // scale * ce_scale: the one-hot at the label (0 without CE)
  float ce_p1;   // the CE's softmax term when T != 1 (times p1); 0 when folded into p_s (T == 1)
};

__device__ __forceinline__ GradCoef grad_coef(float scale, const Flags& f, const Params& p) {
  GradCoef c;
  c.kd = scale * p.kd_scale * p.inv_temp;
  c.kd_t = c.kd * p.inv_temp;
  c.js = c.kd * (1.f - p.beta) * kLn2;
  c.jt = c.kd * p.beta * kLn2;
  c.ce = f.has_ce ? scale * p.ce_scale : 0.f;
  c.ce_p1 = f.same_temp ? 0.f : c.ce;
  return c;
}

// Student gradient of one element from its tempered probabilities (no one-hot, no T = 1 term
// unless folded: with T == 1 the CE's softmax is p_s itself).
template <int DIV>
__device__ __forceinline__ float student_term(float x, float y, float ps, float pt, const RowStats& r,
                                              const GradCoef& c, float ce_fold, float k_temp, float beta) {
  if constexpr (DIV == 0) {
    return fmaf(ps, c.kd + ce_fold, -pt * c.kd);
  } else if constexpr (DIV == 1) {
    return fmaf(ps * c.kd_t, finite_below((x - y) - r.mu), ps * ce_fold);
  } else {
    const JsdTerms e = jsd_terms(x, y, r, k_temp, beta);
    return fmaf(e.ps * c.js, finite_below(e.hs - r.ds2), e.ps * ce_fold);
  }
}

template <int DIV>
__device__ __forceinline__ float teacher_term(float x, float y, float ps, float pt, const RowStats& r,
                                              const GradCoef& c, float k_temp, float beta) {
  if constexpr (DIV == 0) {
    return (pt * c.kd_t) * finite_below((y - x) - r.mu);
  } else if constexpr (DIV == 1) {
    return c.kd * (pt - ps);
  } else {
    const JsdTerms e = jsd_terms(x, y, r, k_temp, beta);
    return (e.pt * c.jt) * finite_below(e.ht - r.dt2);
  }
}

// The full student gradient of one column, from scalars (the label's column).
template <int DIV>
__device__ __forceinline__ float student_grad_at(float x, float y, const RowStats& r, const GradCoef& c,
                                                 const Flags& f, const Params& p) {
  const float ps = prob(x, p.k_temp, r.off_s, r.lz_s), pt = prob(y, p.k_temp, r.off_t, r.lz_t);
  float g = student_term<DIV>(x, y, ps, pt, r, c, f.same_temp ? c.ce : 0.f, p.k_temp, p.beta);
  if (f.has_ce && !f.same_temp) g = fmaf(c.ce_p1, prob(x, kLog2e, r.off1, r.lz1), g);
  return g;
}

// Per-thread factors turning the slice's kept exponentials into probabilities: exp2(offset of the
// slice - offset of the row) / row sum.
struct KeptScale {
  float fs, ft;
};

// Writes the gradients of one slice. KEEP: the tempered exponentials of slice_stats are reused;
// otherwise every probability is computed again from the logits.
template <int DIV, bool KEEP, typename S, typename T, int K>
__device__ __forceinline__ void write_grads(const Slice<S, K>& x, const Slice<T, K>& y, const float (&es)[K],
                                            const float (&et)[K], KeptScale kept, const RowStats& r,
                                            const GradCoef& c, const Flags& f, const Params& p,
                                            const SliceMap& map, S* gs_part, T* gt_part) {
  const float k_temp = p.k_temp, beta = p.beta;
  const float ce_fold = f.same_temp ? c.ce : 0.f;
  const auto ps_of = [&](int j) {
    if constexpr (KEEP) return es[j] * kept.fs;
    else return prob(x[j], k_temp, r.off_s, r.lz_s);
  };
  const auto pt_of = [&](int j) {
    if constexpr (KEEP) return et[j] * kept.ft;
    else return prob(y[j], k_temp, r.off_t, r.lz_t);
  };
  if (f.grad_s) {
    // KL with kept exponentials: the slice's factors folded in, two instructions an element
    const float a = KEEP ? kept.fs * (c.kd + ce_fold) : c.kd + ce_fold, b = KEEP ? kept.ft * c.kd : c.kd;
    const auto base = [&](int j) {
      if constexpr (DIV == 0) {
        if constexpr (KEEP) return fmaf(es[j], a, -et[j] * b);
        else return fmaf(ps_of(j), a, -pt_of(j) * b);
      } else if constexpr (DIV == 1) {
        return student_term<1>(x[j], y[j], ps_of(j), 0.f, r, c, ce_fold, k_temp, beta);
      } else {
        return student_term<2>(x[j], y[j], 0.f, 0.f, r, c, ce_fold, k_temp, beta);
      }
    };
    if (f.has_ce && !f.same_temp)  // the CE's own softmax, at T = 1
      store_grad_slice<S, K>(gs_part, map,
                             [&](int j) { return fmaf(c.ce_p1, prob(x[j], kLog2e, r.off1, r.lz1), base(j)); });
    else
      store_grad_slice<S, K>(gs_part, map, base);
  }
  if (f.grad_t) {
    store_grad_slice<T, K>(gt_part, map, [&](int j) {
      if constexpr (DIV == 0) return teacher_term<0>(x[j], y[j], 0.f, pt_of(j), r, c, k_temp, beta);
      else if constexpr (DIV == 1) return teacher_term<1>(x[j], y[j], ps_of(j), pt_of(j), r, c, k_temp, beta);
      else return teacher_term<2>(x[j], y[j], 0.f, 0.f, r, c, k_temp, beta);
    });
  }
}

template <typename S, typename T, int K>
__device__ __forceinline__ void write_zero_grads(const Flags& f, const SliceMap& map, S* gs_part, T* gt_part) {
  const auto zero = [](int) { return 0.f; };
  if (f.grad_s) store_grad_slice<S, K>(gs_part, map, zero);
  if (f.grad_t) store_grad_slice<T, K>(gt_part, map, zero);
}

// ---------------------------------------------------------------------------------------------
// One row's bookkeeping: its label, whether it counts, and the factors its outputs carry.
struct RowInfo {
  bool ok;         // the row exists (the last tile may be short)
  bool keep;       // not ignored
  bool bad_label;  // kept, but the label lies outside [0, C) (validate_labels=False): NaN out
  int64_t label;   // the label, or 0 where it must not be read
  float w;         // loss scale: 1 / rows that count, 0 for ignored rows
  float gscale;    // gradient scale: 0 ignored, NaN bad label, else grad_unit or w
};

__device__ __forceinline__ RowInfo row_info(int64_t row, const Flags& f, const Params& p, float inv_count) {
  RowInfo info;
  info.ok = row < p.n_rows;
  const int64_t label = f.has_labels && info.ok ? p.labels[row] : 0;
  info.keep = info.ok && (!f.has_labels || label != p.ignore_index);
  info.bad_label = info.keep && f.has_labels && (label < 0 || label >= p.n_cols);
  info.label = info.keep && !info.bad_label ? label : 0;
  info.w = info.keep ? inv_count : 0.f;
  info.gscale = !info.keep ? 0.f : (info.bad_label ? NAN : (p.grad_unit > 0.f ? p.grad_unit : inv_count));
  return info;
}

// ---------------------------------------------------------------------------------------------
// Calibration meters: per CTA, fp32 partial histograms in shared memory laid out as the meter's
// state (count, confidence sum and correct count per bin, then NLL and Brier totals; counts as
// 32-bit integers, exact), flushed with one fp64 atomic per non-zero bin. Rows' NLL and Brier
// accumulate in the leaders' registers and meet in shared memory at the flush only.
struct MeterSmem {
  uint32_t* count;
  float* conf;
  uint32_t* correct;
  float* totals;  // NLL, Brier
};

__device__ __forceinline__ MeterSmem meter_smem(uint32_t* base, int num_bins) {
  const int nb = num_bins + 1;
  return {base, reinterpret_cast<float*>(base + nb), base + 2 * nb, reinterpret_cast<float*>(base + 3 * nb)};
}

__device__ __forceinline__ int meter_words(int num_bins) { return 3 * (num_bins + 1) + 2; }

struct MeterTotals {
  float nll, brier;
};

// The histogram bin of a confidence: bucketize(right=True) - 1 on the meter's fp32 edges; NaN
// (an all -inf or NaN row) goes to the last bin, as in CalibrationMeter.update.
__device__ __forceinline__ int confidence_bin(float conf, const Params& p) {
  if (isnan(conf)) return p.num_bins;
  int b = min(max(static_cast<int>(conf * p.num_bins), 0), p.num_bins);
  if (conf < __ldg(p.edges + b)) b -= 1;
  if (conf >= __ldg(p.edges + b + 1)) b += 1;
  return min(max(b, 0), p.num_bins);
}

// Adds one labelled row: m its maximum, z1, z2 its T = 1 sums relative to the offset off1 and lz1 =
// log2 z1, x_label its label's logit (NaN for an out-of-range label, which is then never correct).
// The confidence is the top class's probability, exp2(m log2(e) - off1 - lz1): not 1 / z1, since the
// top class's exponential is exp2 of the offset's rounding residual, not exactly 1.
__device__ __forceinline__ void meter_add(MeterSmem h, MeterTotals& acc, float m, float z1, float z2, float off1,
                                          float lz1, float x_label, int arg, int64_t label, bool bad_label,
                                          const Params& p) {
  const float conf = isfinite(z1) && z1 > 0.f ? prob(m, kLog2e, off1, lz1) : NAN;
  const int b = confidence_bin(conf, p);
  atomicAdd(h.count + b, 1u);
  atomicAdd(h.conf + b, conf);
  if (!bad_label && arg == label) atomicAdd(h.correct + b, 1u);
  acc.nll += nll_of(x_label, m, off1, lz1);
  acc.brier += __fdividef(z2, z1 * z1) - 2.f * prob(x_label, kLog2e, off1, lz1) + 1.f;
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += shfl_xor(v, o);
  return v;
}

// Block-wide: moves a CTA's partial histogram into the meter's fp64 state and clears it.
__device__ __forceinline__ void flush_meter(MeterSmem h, MeterTotals& acc, double* state, int num_bins) {
  const float nll = warp_sum(acc.nll), brier = warp_sum(acc.brier);
  acc.nll = acc.brier = 0.f;
  if (lane_index() == 0) {
    atomicAdd(h.totals, nll);
    atomicAdd(h.totals + 1, brier);
  }
  __syncthreads();
  const int nb = num_bins + 1;
  for (int i = thread_index(); i < meter_words(num_bins); i += kBlock) {
    const bool counted = i < nb || (i >= 2 * nb && i < 3 * nb);
    uint32_t* word = h.count + i;  // the layout is one array of 32-bit words
    const double v = counted ? static_cast<double>(*word) : static_cast<double>(__uint_as_float(*word));
    if (v != 0.0 || isnan(v)) atomicAdd(state + i, v);
    *word = 0u;  // 0 is also +0.0f
  }
  __syncthreads();
}

__device__ __forceinline__ void zero_words(uint32_t* words, int n) {
  for (int i = thread_index(); i < n; i += kBlock) words[i] = 0u;
}

// ---------------------------------------------------------------------------------------------
// What each kernel's rows share: the launch-wide constants, the meters' shared memory, and the
// per-row epilogue (loss, meters).
struct Launch {
  Flags f;
  float inv_count;
  MeterSmem hist_s, hist_t;
  MeterTotals acc_s, acc_t;
  int tiles_since_flush;
};

template <bool LIGHT>
__device__ __forceinline__ Launch begin_launch(const Params& p, uint32_t* smem) {
  Launch L;
  L.f = flags_of<LIGHT>(p);
  L.inv_count = L.f.count_on_device ? 1.f / fmaxf(static_cast<float>(__ldg(p.row_count)), 1.f) : p.inv_count;
  L.hist_s = meter_smem(smem, p.num_bins);
  L.hist_t = meter_smem(smem + (L.f.meter_s ? meter_words(p.num_bins) : 0), p.num_bins);
  L.acc_s = L.acc_t = {0.f, 0.f};
  L.tiles_since_flush = 0;
  if (L.f.meter_s || L.f.meter_t) {
    zero_words(smem, ((L.f.meter_s ? 1 : 0) + (L.f.meter_t ? 1 : 0)) * meter_words(p.num_bins));
    __syncthreads();
  }
  return L;
}

__device__ __forceinline__ void flush_meters(Launch& L, const Params& p) {
  if (L.f.meter_s) flush_meter(L.hist_s, L.acc_s, p.meter_s, p.num_bins);
  if (L.f.meter_t) flush_meter(L.hist_t, L.acc_t, p.meter_t, p.num_bins);
  L.tiles_since_flush = 0;
}

// After each tile: flushes every flush_tiles tiles, so that the fp32 partials stay short sums.
__device__ __forceinline__ void end_tile(Launch& L, const Params& p) {
  if (!L.f.meter_s && !L.f.meter_t) return;
  const bool flush = ++L.tiles_since_flush == p.flush_tiles;
  FASTKD_COMMON_CASE(!flush);  // counted apart: once per 1024 rows
  if (flush) flush_meters(L, p);
}

// The row's loss and meter updates, by its leader. x_label / y_label: the label's logits.
__device__ __forceinline__ void finish_row(Launch& L, const Params& p, int64_t row, const RowInfo& info,
                                           const Part& part, const RowStats& r, float x_label, float y_label) {
  const Flags& f = L.f;
  float loss = p.kd_scale * r.div;
  if (f.has_ce) loss += p.ce_scale * nll_of(x_label, part.m_s, r.off1, r.lz1);
  p.loss[row] = info.keep ? (info.bad_label ? NAN : loss * info.w) : 0.f;
  if (!info.keep) return;
  if (f.meter_s)
    meter_add(L.hist_s, L.acc_s, part.m_s, part.z1, part.z2, r.off1, r.lz1, x_label, part.arg_s, info.label,
              info.bad_label, p);
  if (f.meter_t)
    meter_add(L.hist_t, L.acc_t, part.m_t, part.z1t, part.z2t, r.off1t, r.lz1t, y_label, part.arg_t, info.label,
              info.bad_label, p);
}

template <typename E>
__device__ __forceinline__ float label_logit(const E* row, const RowInfo& info, bool needed) {
  if (!needed || !info.keep) return 0.f;
  return info.bad_label ? NAN : Elem<E>::to_float(row[info.label]);
}

// ---------------------------------------------------------------------------------------------
// Rows held in registers: group threads per CTA part (lanes, or whole warps), cluster CTAs per row.
template <typename S, typename T, int K>
struct RowKernel {
  // reuse the exponentials where registers allow it: 2 K more, next to K (fp32) or K / 2 (16-bit)
  static constexpr bool kKeep = K <= 16;

  template <int DIV>
  __device__ static void grads(const Slice<S, K>& x, const Slice<T, K>& y, const float (&es)[K],
                               const float (&et)[K], KeptScale kept, const RowStats& r, const GradCoef& c,
                               const Flags& f, const Params& p, const SliceMap& map, S* gs_part, T* gt_part) {
    write_grads<DIV, kKeep>(x, y, es, et, kept, r, c, f, p, map, gs_part, gt_part);
  }
};

// The JSD's second round: sums of p log2(p / m) over the slice, then over the row.
template <typename S, typename T, int K>
__device__ __forceinline__ float2 jsd_slice_sums(const Slice<S, K>& x, const Slice<T, K>& y, const RowStats& r,
                                                 const Params& p) {
  float2 d = {0.f, 0.f};
#pragma unroll
  for (int j = 0; j < K; ++j) {
    const JsdTerms e = jsd_terms(x[j], y[j], r, p.k_temp, p.beta);
    d.x = fmaf(e.ps, e.hs, d.x);
    d.y = fmaf(e.pt, e.ht, d.y);
  }
  return d;
}

__device__ __forceinline__ void set_jsd(RowStats& r, float2 d, float beta) {
  r.ds2 = d.x;
  r.dt2 = d.y;
  r.div = kLn2 * (beta * d.y + (1.f - beta) * d.x);
}

template <typename S, typename T, int K, bool LIGHT>
__global__ void __launch_bounds__(kBlock, min_ctas_per_sm<LIGHT>())
    kd_rows_kernel(const S* __restrict__ s, const T* __restrict__ t, S* __restrict__ gs, T* __restrict__ gt,
                   const __grid_constant__ Params p) {
  extern __shared__ uint32_t meter_words_smem[];
  __shared__ RowSlots<Part> part_slots;
  __shared__ RowSlots<float2> sum_slots;
  Launch L = begin_launch<LIGHT>(p, meter_words_smem);
  const Flags& f = L.f;
  const int group = group_of(p), vec = vec_of(p), cluster = cluster_of(p);
  const int rank = cluster_rank_of(cluster);
  const int in_group = thread_index() & (group - 1);
  const int rows_per_tile = kBlock / group;
  const int col0 = rank * p.part_cols;
  const int part_cols = min(p.part_cols, p.n_cols - col0);
  const int64_t n_tiles = (p.n_rows + rows_per_tile - 1) / rows_per_tile;
  const auto merge_parts = [&](Part& v, int width) { merge_lanes(v, width, f, p.k_temp); };
  int round = 0;

  for (int64_t tile = blockIdx.x / cluster; tile < n_tiles; tile += gridDim.x / cluster) {
    const int64_t row = tile * rows_per_tile + thread_index() / group;
    const RowInfo info = row_info(row, f, p, L.inv_count);
    FASTKD_COMMON_CASE(info.ok && info.keep && !info.bad_label && info.gscale != 0.f);
    const int64_t safe_row = info.ok ? row : 0;
    const S* s_row = s + safe_row * p.stride_s;
    const T* t_row = t + safe_row * p.stride_t;
    const SliceMap map = {vec, in_group, group, info.ok ? part_cols / vec : 0};
    const int load_vecs = info.keep ? map.n_vecs : 0;  // an ignored row is not read

    Slice<S, K> x;
    Slice<T, K> y;
    load_slice(x, vec, s_row + col0, map.first, map.stride, load_vecs);
    load_slice(y, vec, t_row + col0, map.first, map.stride, load_vecs);
    const float x_label = label_logit(s_row, info, f.has_ce || f.meter_s);
    const float y_label = label_logit(t_row, info, f.meter_t || (f.has_ce && f.grad_s));

    float es[K], et[K];
    Part part = slice_stats<RowKernel<S, T, K>::kKeep>(x, y, f, p.k_temp, map, col0, es, et);
    const float m_s_slice = part.m_s, m_t_slice = part.m_t;
    reduce_row(part, empty_part(), group, cluster, part_slots, round++ & 1, merge_parts);
    RowStats r = row_stats(part, f, p);
    if (f.divergence == 2) {
      float2 d = jsd_slice_sums(x, y, r, p);
      reduce_row(d, make_float2(0.f, 0.f), group, cluster, sum_slots, round++ & 1,
                 [](float2& v, int width) { sum_lanes(v, width); });
      set_jsd(r, d, p.beta);
    }

    if (info.ok && in_group == 0 && rank == 0) finish_row(L, p, row, info, part, r, x_label, y_label);
    if ((f.grad_s || f.grad_t) && info.ok) {
      S* gs_part = f.grad_s ? gs + row * p.stride_gs + col0 : nullptr;
      T* gt_part = f.grad_t ? gt + row * p.stride_gt + col0 : nullptr;
      if (info.gscale == 0.f) {
        write_zero_grads<S, T, K>(f, map, gs_part, gt_part);
      } else {
        const GradCoef c = grad_coef(info.gscale, f, p);
        const KeptScale kept = {__fdividef(rescale(m_s_slice, part.m_s, p.k_temp), part.z_s),
                                __fdividef(rescale(m_t_slice, part.m_t, p.k_temp), part.z_t)};
        if (f.divergence == 0)
          RowKernel<S, T, K>::template grads<0>(x, y, es, et, kept, r, c, f, p, map, gs_part, gt_part);
        else if (f.divergence == 1)
          RowKernel<S, T, K>::template grads<1>(x, y, es, et, kept, r, c, f, p, map, gs_part, gt_part);
        else
          RowKernel<S, T, K>::template grads<2>(x, y, es, et, kept, r, c, f, p, map, gs_part, gt_part);
        // the one-hot: the thread holding the label's column writes it once more, corrected
        const int label_col = static_cast<int>(info.label) - col0;
        if (f.grad_s && f.has_ce && !info.bad_label && label_col >= 0 && label_col < part_cols &&
            map.holds(label_col)) {
          float g;
          if (f.divergence == 0) g = student_grad_at<0>(x_label, y_label, r, c, f, p);
          else if (f.divergence == 1) g = student_grad_at<1>(x_label, y_label, r, c, f, p);
          else g = student_grad_at<2>(x_label, y_label, r, c, f, p);
          gs_part[label_col] = Elem<S>::from_float(g - c.ce);
        }
      }
    }
    end_tile(L, p);
  }
  flush_meters(L, p);
  if (cluster > 1) cluster_barrier();  // no CTA leaves while others may still read its slots
}

// ---------------------------------------------------------------------------------------------
// Rows too long for registers: one row per CTA, in chunks of kBlock * K columns. Sweep 1 gathers
// the statistics (chunks merged within each thread), sweep 2 writes the gradients (JSD: sweep 2
// sums its divergence, sweep 3 writes). Traffic: 5 units (7 for JSD) instead of 3.
template <typename S, typename T, bool LIGHT>
__global__ void __launch_bounds__(kBlock, min_ctas_per_sm<LIGHT>())
    kd_loop_kernel(const S* __restrict__ s, const T* __restrict__ t, S* __restrict__ gs, T* __restrict__ gt,
                   const __grid_constant__ Params p) {
  constexpr int K = 16;
  extern __shared__ uint32_t meter_words_smem[];
  __shared__ RowSlots<Part> part_slots;
  __shared__ RowSlots<float2> sum_slots;
  Launch L = begin_launch<LIGHT>(p, meter_words_smem);
  const Flags& f = L.f;
  const int vec = vec_of(p);
  const int chunk_cols = kBlock * K;
  const auto merge_parts = [&](Part& v, int width) { merge_lanes(v, width, f, p.k_temp); };
  const auto sum_pairs = [](float2& v, int width) { sum_lanes(v, width); };
  int round = 0;

  for (int64_t row = blockIdx.x; row < p.n_rows; row += gridDim.x) {
    const RowInfo info = row_info(row, f, p, L.inv_count);
    FASTKD_COMMON_CASE(info.keep && !info.bad_label && info.gscale != 0.f);
    const S* s_row = s + row * p.stride_s;
    const T* t_row = t + row * p.stride_t;
    const float x_label = label_logit(s_row, info, f.has_ce || f.meter_s);
    const float y_label = label_logit(t_row, info, f.meter_t || (f.has_ce && f.grad_s));
    auto chunk_map = [&](int c0) {
      return SliceMap{vec, thread_index(), kBlock, min(chunk_cols, p.n_cols - c0) / vec};
    };
    if (!info.keep) {  // an ignored row: zeros, read nothing (uniform over the CTA)
      if (thread_index() == 0) p.loss[row] = 0.f;
      for (int c0 = 0; c0 < p.n_cols; c0 += chunk_cols)
        write_zero_grads<S, T, K>(f, chunk_map(c0), f.grad_s ? gs + row * p.stride_gs + c0 : nullptr,
                                  f.grad_t ? gt + row * p.stride_gt + c0 : nullptr);
      continue;
    }

    Part part = empty_part();
    for (int c0 = 0; c0 < p.n_cols; c0 += chunk_cols) {  // sweep 1
      const SliceMap map = chunk_map(c0);
      Slice<S, K> x;
      Slice<T, K> y;
      load_slice(x, vec, s_row + c0, map.first, map.stride, map.n_vecs);
      load_slice(y, vec, t_row + c0, map.first, map.stride, map.n_vecs);
      float es[K], et[K];
      part = combine(part, slice_stats<false>(x, y, f, p.k_temp, map, c0, es, et), f, p.k_temp);
    }
    reduce_row(part, empty_part(), kBlock, 1, part_slots, round++ & 1, merge_parts);
    RowStats r = row_stats(part, f, p);
    if (f.divergence == 2) {  // sweep 2 of JSD: its divergence
      float2 d = {0.f, 0.f};
      for (int c0 = 0; c0 < p.n_cols; c0 += chunk_cols) {
        const SliceMap map = chunk_map(c0);
        Slice<S, K> x;
        Slice<T, K> y;
        load_slice(x, vec, s_row + c0, map.first, map.stride, map.n_vecs);
        load_slice(y, vec, t_row + c0, map.first, map.stride, map.n_vecs);
        const float2 dc = jsd_slice_sums(x, y, r, p);
        d.x += dc.x;
        d.y += dc.y;
      }
      reduce_row(d, make_float2(0.f, 0.f), kBlock, 1, sum_slots, round++ & 1, sum_pairs);
      set_jsd(r, d, p.beta);
    }
    if (thread_index() == 0) finish_row(L, p, row, info, part, r, x_label, y_label);

    if (f.grad_s || f.grad_t) {  // the last sweep: gradients
      S* gs_row = f.grad_s ? gs + row * p.stride_gs : nullptr;
      T* gt_row = f.grad_t ? gt + row * p.stride_gt : nullptr;
      const GradCoef c = grad_coef(info.gscale, f, p);
      const float es[K] = {}, et[K] = {};
      for (int c0 = 0; c0 < p.n_cols; c0 += chunk_cols) {
        const SliceMap map = chunk_map(c0);
        if (info.gscale == 0.f) {
          write_zero_grads<S, T, K>(f, map, gs_row ? gs_row + c0 : nullptr, gt_row ? gt_row + c0 : nullptr);
          continue;
        }
        Slice<S, K> x;
        Slice<T, K> y;
        load_slice(x, vec, s_row + c0, map.first, map.stride, map.n_vecs);
        load_slice(y, vec, t_row + c0, map.first, map.stride, map.n_vecs);
        S* gs_chunk = gs_row ? gs_row + c0 : nullptr;
        T* gt_chunk = gt_row ? gt_row + c0 : nullptr;
        if (f.divergence == 0)
          write_grads<0, false>(x, y, es, et, KeptScale{1.f, 1.f}, r, c, f, p, map, gs_chunk, gt_chunk);
        else if (f.divergence == 1)
          write_grads<1, false>(x, y, es, et, KeptScale{1.f, 1.f}, r, c, f, p, map, gs_chunk, gt_chunk);
        else
          write_grads<2, false>(x, y, es, et, KeptScale{1.f, 1.f}, r, c, f, p, map, gs_chunk, gt_chunk);
      }
      if (f.grad_s && f.has_ce && !info.bad_label && info.gscale != 0.f) {
        __syncthreads();  // the chunk stores above come first (another thread wrote the label's vector)
        if (thread_index() == 0) {
          float g;
          if (f.divergence == 0) g = student_grad_at<0>(x_label, y_label, r, c, f, p);
          else if (f.divergence == 1) g = student_grad_at<1>(x_label, y_label, r, c, f, p);
          else g = student_grad_at<2>(x_label, y_label, r, c, f, p);
          gs_row[info.label] = Elem<S>::from_float(g - c.ce);
        }
      }
    }
    end_tile(L, p);
  }
  flush_meters(L, p);
}

// ---------------------------------------------------------------------------------------------
// The backward: grad *= factor in fp32, a factor per row or one for all; rows whose factor is 1
// (the usual loss.backward()) are skipped, so the backward moves no data. One CTA row-chunk per
// (row, chunk of columns): no division per element.
template <typename E, int V>
__global__ void __launch_bounds__(kBlock)
    scale_grad_kernel(E* __restrict__ grad, const float* __restrict__ factor, int64_t n_rows, int64_t n_cols,
                      int64_t stride, bool per_row) {
  const int64_t vecs_per_row = n_cols / V;
  for (int64_t row = blockIdx.y; row < n_rows; row += gridDim.y) {
    const float fct = __ldg(factor + (per_row ? row : 0));
    if (fct == 1.f) continue;
    E* g_row = grad + row * stride;
    for (int64_t v = static_cast<int64_t>(blockIdx.x) * kBlock + threadIdx.x; v < vecs_per_row;
         v += static_cast<int64_t>(gridDim.x) * kBlock) {
      uint32_t w[V * sizeof(E) / 4 > 0 ? V * sizeof(E) / 4 : 1];
      load_vector<V>(w, 0, g_row + v * V);
      float g[V];
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const float x = sizeof(E) == 4 ? __uint_as_float(w[j]) : Elem<E>::get(w[(j * sizeof(E)) / 4], j & 1);
        g[j] = x * fct;
      }
      store_vector<V>(g_row + v * V, g);
    }
  }
}

}  // namespace device
}  // namespace fastkd
