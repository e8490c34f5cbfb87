// Decode kernels for x86 CPUs with AVX512-BF16, -VNNI and -VBMI: one token's matrix-vector products, which read
// every weight once and are bound by memory bandwidth, and products of a few rows.
//
// Why our own: PyTorch's bf16 GEMV (torch.mv -> MKL) reads the large expert matrices at ~90% of the bandwidth
// but pays ~40 us per call, so the small attention matrices run at 8-13 GB/s; torch.compile lowers a GEMV to a
// single-accumulator loop at 0.6-0.7x torch.mv. Here each thread reads its share of the rows as one
// sequential stream with `vdpbf16ps` (bf16 pairs multiplied and added into float32).
//
// What is here: bf16 GEMV (`dot_rows`) and a bf16 GEMM for a few rows (`gemm_tile`, a handful of tokens: where
// oneDNN is slow); one expert on a few rows in one call (`gate_up`, `swiglu`: a prefill), also on int8 weights
// dequantized a block at a time (`Int8Rows`; on AVX2 the GEMV's integer sums for several rows at once, `tile_i8`)
// and on int4 weights with the GEMV's integer sums for several rows at once (`block_rows_i4`); int8 and int4 GEMV
// with integer dot products (`Fixed`, `dot_i8`, `Int4Input`, `dot_blocks_i4`);
// one token's chosen experts in one call (`experts_row`); attention of one query row (`attend_heads`); and a whole
// decoder layer for one token (`decode_layer`), which saves the dispatch of ~40 small PyTorch ops per layer. Each
// has the PyTorch path beside it as the reference (tests/test_cpu_kernels.py).
//
// Numerics follow the eager PyTorch path: products accumulate in float32 and each linear's output is
// rounded to bf16 once; the expert block rounds where `moe.swiglu` does (w1 x, w3 x, silu, the product,
// w2 h) and weights and sums the k experts in float32, rounded once at the end.
// One exception: on AVX2 the int4 kernels take x in int8 per group of columns, as llama.cpp's Q4_0 x Q8_0 does
// (`Int4Input`; docs/kernels.md says why).

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <omp.h>
#include <torch/extension.h>

#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <mutex>
#include <thread>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

namespace {

// ---- parallel regions ------------------------------------------------------------------------------------------
// `parallel(begin, end, grain, f)` runs f(b0, b1) over [begin, end) as an OpenMP region while those run on cores of
// their own (`omp_region`), and on the calling thread and a pool of its own (at::get_num_threads() - 1 workers)
// while they do not. Why the pool: a region of OpenMP ends in a barrier that waits for every thread of the team to
// have run its share, so on a machine whose cores are shared with other processes each of the ~50 regions of a
// decode step waits for the thread the OS descheduled last (docs/kernels.md has the figures). Here
// the range is cut into about g_chunks_per_thread chunks per thread, every thread, the caller included, claims
// chunks from one atomic counter, and the region ends when every chunk is done, not when every thread has arrived: a
// worker that has not started by then finds nothing left and never delays the caller. A worker spins g_spin_us for
// the next region, then sleeps on a futex. The chunks are of the same units as before and f computes each unit the
// same way: a split never changes a result (the tests compare the pool with OpenMP regions, `set_parallel`).
// f must not throw: the ops check their inputs before.
namespace pool {

// Runtime knobs (`set_parallel`), for the tests and the A/B measurements of docs/kernels.md: mode 1 the pool, 0 OpenMP
// regions as before (the reference), 2 the pool without the back-off below, 3 (the default) OpenMP regions while
// none of them waits for a descheduled thread, the pool (mode 1) for a while after one did (see `omp_region`).
std::atomic<int> g_mode{3};
std::atomic<int> g_chunks_per_thread{4};
std::atomic<int> g_spin_us{50};
std::atomic<int> g_stall_us{300};
std::atomic<int> g_backoff_max_us{200000};
std::atomic<int64_t> g_stalls{0};

using Clock = std::chrono::steady_clock;

inline int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch()).count();
}

// A back-off after stalls. A region whose calling thread, done with its own share, waited longer than g_stall_us
// plus the time of that share waited for a thread the OS descheduled: the cores are shared. The back-off is then on
// for 1 ms, doubled at each such wait up to g_backoff_max_us; 256 regions without one reset it. In a quiet machine
// no region waits that long and nothing changes. Atomics: mode 3's OpenMP regions may run on several threads at once.
struct Backoff {
  std::atomic<int64_t> until_ns{0}, us{0}, clean{0};

  bool on(int64_t now) const { return us.load(std::memory_order_relaxed) > 0 && now < until_ns.load(); }

  void record(bool stalled, int64_t now) {
    if (stalled) {
      g_stalls.fetch_add(1, std::memory_order_relaxed);
      const int64_t next = std::min<int64_t>(std::max<int64_t>(2 * us.load(), 1000), g_backoff_max_us.load());
      us.store(next);
      until_ns.store(now + 1000 * next);
      clean.store(0);
    } else if (clean.fetch_add(1, std::memory_order_relaxed) + 1 >= 256) {
      us.store(0);
    }
  }
};

// The pool's (its caller's, under `owner`): while on, the regions run on the caller alone (the workers go to sleep and
// leave their cores to the other processes), then the pool is tried again.
Backoff serial;
// Mode 3's: while on, regions go to the pool instead of OpenMP (see `omp_region`).
Backoff omp_off;

using Call = void (*)(const void*, int64_t, int64_t);

// One job at a time. ticket = (generation << 24) | next chunk: a claim is a compare-and-swap on both, so a worker
// that read the fields of a finished job (or half of the next one's) fails its claim instead of running them.
constexpr int kChunkBits = 24;
constexpr uint64_t kChunkMask = (uint64_t{1} << kChunkBits) - 1;
std::atomic<uint64_t> ticket{0};
std::atomic<uint32_t> done{0};      // chunks of the current job finished
std::atomic<uint32_t> wake{0};      // bumped when a job is posted; sleeping workers wait on it (futex)
std::atomic<int> sleepers{0};
std::atomic<bool> stop{false};
std::atomic<const void*> job_fn{nullptr};
std::atomic<Call> job_call{nullptr};
std::atomic<int64_t> job_begin{0}, job_end{0}, job_chunk{1}, job_chunks{0};

std::mutex owner;  // one caller at a time; another thread's region runs on its own thread
int64_t n_workers = 0;
std::atomic<int> alive{0};  // workers running (they are detached: none is left to join at exit)
thread_local bool in_region = false;

inline void cpu_relax() { _mm_pause(); }

void futex_wait(std::atomic<uint32_t>* a, uint32_t v) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(a), FUTEX_WAIT_PRIVATE, v, nullptr, nullptr, 0);
}
void futex_wake_all(std::atomic<uint32_t>* a) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(a), FUTEX_WAKE_PRIVATE, INT32_MAX, nullptr, nullptr, 0);
}

// Claims and runs chunks of the current job until none is left.
void run_chunks() {
  uint64_t t = ticket.load(std::memory_order_acquire);
  for (;;) {
    const int64_t chunks = job_chunks.load(std::memory_order_relaxed);
    const int64_t i = static_cast<int64_t>(t & kChunkMask);
    if (i >= chunks) return;
    const Call call = job_call.load(std::memory_order_relaxed);
    const void* fn = job_fn.load(std::memory_order_relaxed);
    const int64_t begin = job_begin.load(std::memory_order_relaxed), end = job_end.load(std::memory_order_relaxed);
    const int64_t chunk = job_chunk.load(std::memory_order_relaxed);
    if (!ticket.compare_exchange_weak(t, t + 1, std::memory_order_acq_rel, std::memory_order_acquire)) continue;
    const int64_t b0 = begin + i * chunk;
    call(fn, b0, std::min(end, b0 + chunk));
    done.fetch_add(1, std::memory_order_acq_rel);
    t = ticket.load(std::memory_order_acquire);
  }
}

void worker_main() {
  in_region = true;  // a kernel called from a chunk runs serially
  uint32_t seen = wake.load(std::memory_order_acquire);
  for (;;) {
    const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(g_spin_us.load());
    for (int spins = 0; wake.load(std::memory_order_acquire) == seen && !stop.load(std::memory_order_relaxed);) {
      cpu_relax();
      if (++spins % 64 == 0 && std::chrono::steady_clock::now() > until) {
        sleepers.fetch_add(1);
        while (wake.load() == seen && !stop.load()) futex_wait(&wake, seen);
        sleepers.fetch_sub(1);
      }
    }
    if (stop.load()) {
      alive.fetch_sub(1);
      return;
    }
    seen = wake.load(std::memory_order_acquire);
    run_chunks();
  }
}

void stop_workers() {
  stop.store(true);
  wake.fetch_add(1);
  futex_wake_all(&wake);
  while (alive.load() > 0) sched_yield();
  n_workers = 0;
  stop.store(false);
}

// After a fork the child has none of the parent's workers: it starts its own on its first region. The lock may
// have been held by another thread of the parent: a new one.
void after_fork_in_child() {
  n_workers = 0;
  alive.store(0);
  sleepers.store(0);
  new (&owner) std::mutex();
}

void ensure_workers(int64_t n) {
  static const bool registered = (pthread_atfork(nullptr, nullptr, after_fork_in_child), true);
  (void)registered;
  if (n_workers == n) return;
  stop_workers();
  for (int64_t i = 0; i < n; ++i) {
    alive.fetch_add(1);
    std::thread(worker_main).detach();
  }
  n_workers = n;
}

}  // namespace pool

// One OpenMP region, one static range per thread. Why OpenMP at all, beside the pool: ATen's own parallel ops run on
// OpenMP's threads, which spin for a while after each of its regions; the pool's workers then share the cores with
// spinning threads between ATen's ops and ours (an int4 decode step of the 8x7B shape: ~1.2x slower on the pool on a
// quiet machine), where OpenMP regions run on the very threads that spin. With `timed`, the calling thread (thread
// 0) compares its wait at the closing barrier with its own share: a wait longer than its share + g_stall_us is a
// thread the OS descheduled (the cores are shared), and the next regions go to the pool (mode 3).
template <class F>
void omp_region(int64_t begin, int64_t end, int64_t threads, const F& f, bool timed) {
  const int64_t n = end - begin, t0 = timed ? pool::now_ns() : 0;
  int64_t own_ns = 0;
#pragma omp parallel num_threads(threads)
  {
    const int64_t t = omp_get_thread_num(), chunk = (n + omp_get_num_threads() - 1) / omp_get_num_threads();
    const int64_t b0 = begin + t * chunk;
    if (b0 < end) f(b0, std::min(end, b0 + chunk));
    if (timed && t == 0) own_ns = pool::now_ns() - t0;
  }
  if (!timed) return;
  const int64_t t2 = pool::now_ns(), wait_ns = t2 - t0 - own_ns;
  pool::omp_off.record(wait_ns > own_ns + 1000 * int64_t{pool::g_stall_us.load(std::memory_order_relaxed)}, t2);
}

template <class F>
void parallel(int64_t begin, int64_t end, int64_t grain, const F& f) {
  const int64_t n = end - begin;
  if (n <= 0) return;
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), (n + grain - 1) / grain);
  if (threads <= 1 || omp_in_parallel() || pool::in_region) return f(begin, end);
  const int first_mode = pool::g_mode.load(std::memory_order_relaxed);
  if (first_mode == 0) return omp_region(begin, end, threads, f, false);
  if (first_mode == 3 && !pool::omp_off.on(pool::now_ns())) return omp_region(begin, end, threads, f, true);
  std::unique_lock<std::mutex> lock(pool::owner, std::try_to_lock);
  if (!lock.owns_lock()) return f(begin, end);  // another thread's region is running: this one runs here
  const int mode = pool::g_mode.load(std::memory_order_relaxed);
  if (mode != 2 && pool::serial.on(pool::now_ns())) return f(begin, end);
  pool::ensure_workers(at::get_num_threads() - 1);
  // chunks of at least `grain` units, about kChunksPerThread per thread
  const int64_t units = (n + grain - 1) / grain;
  const int64_t want = std::min<int64_t>(units, threads * pool::g_chunks_per_thread.load(std::memory_order_relaxed));
  const int64_t chunk = (units + want - 1) / want * grain, chunks = (n + chunk - 1) / chunk;
  pool::job_fn.store(&f, std::memory_order_relaxed);
  pool::job_call.store([](const void* p, int64_t b0, int64_t b1) { (*static_cast<const F*>(p))(b0, b1); },
                       std::memory_order_relaxed);
  pool::job_begin.store(begin, std::memory_order_relaxed);
  pool::job_end.store(end, std::memory_order_relaxed);
  pool::job_chunk.store(chunk, std::memory_order_relaxed);
  pool::job_chunks.store(chunks, std::memory_order_relaxed);
  pool::done.store(0, std::memory_order_relaxed);
  const uint64_t gen = (pool::ticket.load(std::memory_order_relaxed) >> pool::kChunkBits) + 1;
  pool::ticket.store(gen << pool::kChunkBits, std::memory_order_release);
  pool::wake.fetch_add(1);
  if (pool::sleepers.load() > 0) pool::futex_wake_all(&pool::wake);
  const auto t0 = pool::Clock::now();
  pool::in_region = true;
  pool::run_chunks();
  pool::in_region = false;
  // The last chunks may be running on workers; one descheduled while it holds a chunk is the only wait left.
  // The caller spins while the wait is short enough to be a worker finishing its chunk, then gives its core away:
  // the worker it waits for may be queued behind it.
  const auto t1 = pool::Clock::now();
  const auto stall = t1 - t0 + std::chrono::microseconds(pool::g_stall_us.load(std::memory_order_relaxed));
  bool stalled = false;
  for (int spins = 0; pool::done.load(std::memory_order_acquire) < chunks;) {
    pool::cpu_relax();
    if (++spins % 64 == 0 && (stalled || pool::Clock::now() - t1 > stall)) {
      stalled = true;
      sched_yield();
    }
  }
  if (mode != 2) pool::serial.record(stalled, pool::now_ns());
}

constexpr int64_t kRows = 8;           // rows per block of work handed to a thread (bf16, int8)
constexpr int64_t kStep = 32;          // bf16 elements per 512-bit register

inline float bf16_to_float(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint16_t float_to_bf16(float f) {  // round to nearest, ties to even; NaN stays NaN
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline float round_bf16(float f) { return bf16_to_float(float_to_bf16(f)); }

// ---- the SIMD layer -------------------------------------------------------------------------------------------
// The kernels are written once against a vector of 16 float32 (`V16`) and 32 bf16 taken as a dot-product operand
// (`Bf16x32`, multiplied by `dp`), built for one of two instruction sets, chosen by the compiler flags (`cpu.py`):
//   - AVX512-BF16/VNNI/VBMI (Zen 4, Sapphire Rapids): a V16 is one __m512, `dp` one `vdpbf16ps`;
//   - AVX2 with FMA: a V16 is two __m256, and `dp` two FMAs per 8 pairs: a bf16 is the upper half of a float32,
//     so the even elements of 16 bf16 are their dwords shifted left by 16 and the odd ones their dwords with the
//     lower half masked off (bf16 products are exact in float32, so acc + a b + c d with two FMAs is
//     `vdpbf16ps` up to denormals, which it flushes). Lanes past the end of a row are read with a scalar copy.
// The integer dot products of the quantized GEMVs (`Fixed`, `dot_i8`, `dot_blocks_i4`) have a version per set:
// `vpdpbusd` on AVX-512; on AVX2 `vpmaddwd` on x as one int16 per element (exact: see `Fixed`) for int8 weights,
// and for int4 `vpmaddubsw` on x in int8 per group of columns (see `Int4Input`: not exact, as llama.cpp's Q4_0).
#if defined(__AVX512BF16__) && defined(__AVX512VNNI__) && defined(__AVX512VBMI__) && defined(__AVX512BW__)
#define MIXTRAL_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__)
#define MIXTRAL_AVX512 0
#else
#error "cpu_decode.cpp needs AVX512-BF16/VNNI/VBMI, or AVX2 with FMA (see cpu.py for the flags)"
#endif

#if MIXTRAL_AVX512
struct V16 {
  __m512 v;
};
struct Bf16x32 {  // 32 bf16: 16 pairs
  __m512bh v;
};

inline V16 v_zero() { return {_mm512_setzero_ps()}; }
inline V16 v_set1(float f) { return {_mm512_set1_ps(f)}; }
inline V16 v_load(const float* p) { return {_mm512_loadu_ps(p)}; }
inline void v_store(float* p, V16 a) { _mm512_storeu_ps(p, a.v); }
inline V16 operator+(V16 a, V16 b) { return {_mm512_add_ps(a.v, b.v)}; }
inline V16 operator-(V16 a, V16 b) { return {_mm512_sub_ps(a.v, b.v)}; }
inline V16 operator*(V16 a, V16 b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline V16 operator/(V16 a, V16 b) { return {_mm512_div_ps(a.v, b.v)}; }
inline V16 v_max(V16 a, V16 b) { return {_mm512_max_ps(a.v, b.v)}; }  // b where either is NaN
inline V16 v_fmadd(V16 a, V16 b, V16 c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }    // a b + c
inline V16 v_fnmadd(V16 a, V16 b, V16 c) { return {_mm512_fnmadd_ps(a.v, b.v, c.v)}; }  // c - a b
inline float v_sum(V16 a) { return _mm512_reduce_add_ps(a.v); }
inline V16 v_round_int(V16 a) { return {_mm512_roundscale_ps(a.v, _MM_FROUND_TO_NEAREST_INT)}; }
inline V16 v_scale2(V16 p, V16 n) { return {_mm512_scalef_ps(p.v, n.v)}; }  // p 2^n, n integral, rounded once
inline V16 v_from_bf16(const uint16_t* p) {  // bf16 -> float32 is a 16-bit shift
  return {_mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16))};
}
inline V16 v_from_i8(const int8_t* q) {
  return {_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q))))};
}
// A mask of the first min(n, 16) lanes.
inline __mmask16 first_lanes(int64_t n) { return n >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << n) - 1); }
inline V16 v_load_first(const float* p, int64_t n) { return {_mm512_maskz_loadu_ps(first_lanes(n), p)}; }
inline void v_store_first(float* p, int64_t n, V16 a) { _mm512_mask_storeu_ps(p, first_lanes(n), a.v); }
inline V16 v_from_bf16_first(const uint16_t* p, int64_t n) {
  const __m256i bits = _mm256_maskz_loadu_epi16(first_lanes(n), p);
  return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16))};
}
// a where allowed[i] for the first min(n, 16) lanes, else 0.
inline V16 v_keep_allowed(V16 a, const bool* allowed, int64_t n) {
  const __mmask16 in = first_lanes(n);
  const __mmask16 live = _mm_mask_cmpneq_epi8_mask(in, _mm_maskz_loadu_epi8(in, allowed), _mm_setzero_si128());
  return {_mm512_maskz_mov_ps(live, a.v)};
}
// a + b c with the product rounded, then the sum (the rounding-mode forms are never contracted into an FMA).
inline V16 v_add_product(V16 a, V16 b, V16 c) {
  const __m512 prod = _mm512_mul_round_ps(b.v, c.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return {_mm512_add_round_ps(a.v, prod, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)};
}

inline Bf16x32 bf16x32(const uint16_t* p) { return {(__m512bh)_mm512_loadu_si512(p)}; }
inline Bf16x32 bf16_pair(const uint16_t* p) {  // the pair p[0], p[1] in every lane
  int32_t pair;
  std::memcpy(&pair, p, 4);
  return {(__m512bh)_mm512_set1_epi32(pair)};
}
// acc[i] + a[2i] b[2i] + a[2i + 1] b[2i + 1] for the 16 pairs.
inline V16 dp(V16 acc, Bf16x32 a, Bf16x32 b) { return {_mm512_dpbf16_ps(acc.v, a.v, b.v)}; }

// The sums of four float32 vectors, as 4 floats: [sum a, sum b, sum c, sum d].
inline __m128 reduce4(V16 va, V16 vb, V16 vc, V16 vd) {
  const __m512 a = va.v, b = vb.v, c = vc.v, d = vd.v;
  // 128-bit quarters: ab = [a0 + a2, a1 + a3, b0 + b2, b1 + b3], likewise cd
  const __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xee));
  const __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, 0x44), _mm512_shuffle_f32x4(c, d, 0xee));
  // quarters: one per vector, 4 partial sums each; then within each quarter: lane 0 = the quarter's sum
  const __m512 q = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xdd));
  const __m512 pairs = _mm512_add_ps(_mm512_unpacklo_ps(q, q), _mm512_unpackhi_ps(q, q));
  const __m512 sums = _mm512_add_ps(pairs, _mm512_permute_ps(pairs, 0x4e));
  const __m512i lane0 = _mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 12, 8, 4, 0);
  return _mm512_castps512_ps128(_mm512_permutexvar_ps(lane0, sums));
}

// 16 floats rounded to bf16 (to nearest, ties to even, as `float_to_bf16`; NaN stays NaN), kept as the float32
// values they round to: the 16-bit patterns are the upper halves.
inline __m512i round16_bits(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
  r = _mm512_mask_or_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), u, _mm512_set1_epi32(0x400000));
  return _mm512_and_si512(r, _mm512_set1_epi32(static_cast<int>(0xffff0000u)));
}

inline V16 round16(V16 v) { return {_mm512_castsi512_ps(round16_bits(v.v))}; }

// The same 16 values as bf16.
inline __m256i to_bf16x16(V16 v) { return _mm512_cvtepi32_epi16(_mm512_srli_epi32(round16_bits(v.v), 16)); }

#else  // AVX2
struct V16 {
  __m256 lo, hi;
};
struct Bf16x32 {  // 32 bf16 as float32: the even elements of each half of 16, then the odd ones
  __m256 even[2], odd[2];
};

inline V16 v_zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline V16 v_set1(float f) { return {_mm256_set1_ps(f), _mm256_set1_ps(f)}; }
inline V16 v_load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline void v_store(float* p, V16 a) {
  _mm256_storeu_ps(p, a.lo);
  _mm256_storeu_ps(p + 8, a.hi);
}
inline V16 operator+(V16 a, V16 b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
inline V16 operator-(V16 a, V16 b) { return {_mm256_sub_ps(a.lo, b.lo), _mm256_sub_ps(a.hi, b.hi)}; }
inline V16 operator*(V16 a, V16 b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
inline V16 operator/(V16 a, V16 b) { return {_mm256_div_ps(a.lo, b.lo), _mm256_div_ps(a.hi, b.hi)}; }
inline V16 v_max(V16 a, V16 b) { return {_mm256_max_ps(a.lo, b.lo), _mm256_max_ps(a.hi, b.hi)}; }
inline V16 v_fmadd(V16 a, V16 b, V16 c) {
  return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
}
inline V16 v_fnmadd(V16 a, V16 b, V16 c) {
  return {_mm256_fnmadd_ps(a.lo, b.lo, c.lo), _mm256_fnmadd_ps(a.hi, b.hi, c.hi)};
}
inline float sum8(__m256 a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
inline float v_sum(V16 a) { return sum8(_mm256_add_ps(a.lo, a.hi)); }
inline V16 v_round_int(V16 a) {
  constexpr int kMode = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  return {_mm256_round_ps(a.lo, kMode), _mm256_round_ps(a.hi, kMode)};
}
// p 2^n for integral n >= -152 (NaN stays NaN), rounded once as vscalefps: n is capped at 152 (p 2^152 is inf for p
// near 1, as is any larger power), p 2^(n - n / 2) is exact for p near 1 (a normal float32), then times 2^(n / 2)
// rounds once.
inline __m256 scale2(__m256 p, __m256 n) {
  const __m256i ni = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_set1_ps(152.0f), n));  // (min returns n if NaN)
  const __m256i half = _mm256_srai_epi32(ni, 1), rest = _mm256_sub_epi32(ni, half);
  auto pow2 = [](__m256i e) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(e, _mm256_set1_epi32(127)), 23));
  };
  return _mm256_mul_ps(_mm256_mul_ps(p, pow2(rest)), pow2(half));
}
inline V16 v_scale2(V16 p, V16 n) { return {scale2(p.lo, n.lo), scale2(p.hi, n.hi)}; }
inline __m256 from_bf16x8(__m128i b) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(b), 16)); }
inline V16 v_from_bf16(const uint16_t* p) {
  return {from_bf16x8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))),
          from_bf16x8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)))};
}
inline V16 v_from_i8(const int8_t* q) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
  return {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)), _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8)))};
}
inline V16 v_load_first(const float* p, int64_t n) {
  if (n >= 16) return v_load(p);
  alignas(32) float buf[16] = {};
  std::memcpy(buf, p, n * sizeof(float));
  return v_load(buf);
}
inline void v_store_first(float* p, int64_t n, V16 a) {
  if (n >= 16) return v_store(p, a);
  alignas(32) float buf[16];
  v_store(buf, a);
  std::memcpy(p, buf, n * sizeof(float));
}
inline V16 v_from_bf16_first(const uint16_t* p, int64_t n) {
  if (n >= 16) return v_from_bf16(p);
  alignas(32) uint16_t buf[16] = {};
  std::memcpy(buf, p, n * sizeof(uint16_t));
  return v_from_bf16(buf);
}
inline V16 v_keep_allowed(V16 a, const bool* allowed, int64_t n) {
  alignas(32) int32_t keep[16] = {};
  for (int64_t i = 0; i < std::min<int64_t>(n, 16); ++i) keep[i] = allowed[i] ? -1 : 0;
  return {_mm256_and_ps(a.lo, _mm256_load_ps(reinterpret_cast<const float*>(keep))),
          _mm256_and_ps(a.hi, _mm256_load_ps(reinterpret_cast<const float*>(keep + 8)))};
}
// a + b c with the product rounded, then the sum: the empty asm keeps the compiler from contracting the two into
// an FMA.
inline V16 v_add_product(V16 a, V16 b, V16 c) {
  __m256 lo = _mm256_mul_ps(b.lo, c.lo), hi = _mm256_mul_ps(b.hi, c.hi);
  asm("" : "+x"(lo), "+x"(hi));
  return {_mm256_add_ps(a.lo, lo), _mm256_add_ps(a.hi, hi)};
}

inline Bf16x32 bf16x32(const uint16_t* p) {
  const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16));
  const __m256i top = _mm256_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
  return {{_mm256_castsi256_ps(_mm256_slli_epi32(a, 16)), _mm256_castsi256_ps(_mm256_slli_epi32(b, 16))},
          {_mm256_castsi256_ps(_mm256_and_si256(a, top)), _mm256_castsi256_ps(_mm256_and_si256(b, top))}};
}
inline Bf16x32 bf16_pair(const uint16_t* p) {
  const __m256 e = _mm256_set1_ps(bf16_to_float(p[0])), o = _mm256_set1_ps(bf16_to_float(p[1]));
  return {{e, e}, {o, o}};
}
// acc[i] + a[2i] b[2i] + a[2i + 1] b[2i + 1] for the 16 pairs (`vdpbf16ps`: the odd product first).
inline V16 dp(V16 acc, const Bf16x32& a, const Bf16x32& b) {
  acc.lo = _mm256_fmadd_ps(a.even[0], b.even[0], _mm256_fmadd_ps(a.odd[0], b.odd[0], acc.lo));
  acc.hi = _mm256_fmadd_ps(a.even[1], b.even[1], _mm256_fmadd_ps(a.odd[1], b.odd[1], acc.hi));
  return acc;
}

// The sums of four float32 vectors, as 4 floats: [sum a, sum b, sum c, sum d].
inline __m128 reduce4(V16 a, V16 b, V16 c, V16 d) {
  const __m256 ab = _mm256_hadd_ps(_mm256_add_ps(a.lo, a.hi), _mm256_add_ps(b.lo, b.hi));
  const __m256 cd = _mm256_hadd_ps(_mm256_add_ps(c.lo, c.hi), _mm256_add_ps(d.lo, d.hi));
  const __m256 s = _mm256_hadd_ps(ab, cd);  // [a, b, c, d] over each 128-bit half
  return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
}

// 8 floats rounded to bf16 as `float_to_bf16`, kept as the float32 values they round to (see the AVX-512 one).
inline __m256i round8_bits(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff)));
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_or_si256(u, _mm256_set1_epi32(0x400000)), nan);
  return _mm256_and_si256(r, _mm256_set1_epi32(static_cast<int>(0xffff0000u)));
}

inline V16 round16(V16 v) {
  return {_mm256_castsi256_ps(round8_bits(v.lo)), _mm256_castsi256_ps(round8_bits(v.hi))};
}

// The same 16 values as bf16.
inline __m256i to_bf16x16(V16 v) {
  const __m256i lo = _mm256_srli_epi32(round8_bits(v.lo), 16), hi = _mm256_srli_epi32(round8_bits(v.hi), 16);
  return _mm256_permute4x64_epi64(_mm256_packus_epi32(lo, hi), 0xD8);  // (packs within 128-bit halves)
}
#endif

inline void v_store_bf16(uint16_t* p, V16 v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_bf16x16(v)); }

// e^x for 16 floats, within ~2 ulp: e^x = 2^n e^r with n = round(x / ln 2) and |r| <= ln(2) / 2 (ln 2 in two
// parts, so r is exact), e^r by its Taylor polynomial of degree 6 (error < r^7 / 7! ~ 1.2e-7), 2^n applied by
// `v_scale2`. x is clamped below at -104 (e^x rounds to 0 there); NaN stays NaN.
inline V16 exp16(V16 x) {
  x = v_max(v_set1(-104.0f), x);  // (the second operand is returned when either is NaN)
  const V16 n = v_round_int(x * v_set1(1.44269504f));
  V16 r = v_fnmadd(n, v_set1(0.693145751953125f), x);
  r = v_fnmadd(n, v_set1(1.428606765330187e-6f), r);
  V16 p = v_set1(1.0f / 720);
  for (const float c : {1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f}) p = v_fmadd(p, r, v_set1(c));
  return v_scale2(p, n);
}

// Accumulators per row of the bf16 GEMV, to hide the latency of `dp` (AVX2: 2, each two chains of two FMAs).
constexpr int kAcc = MIXTRAL_AVX512 ? 4 : 2;

// A row's dot product once its first KA columns (a multiple of kAcc x 32) are summed in acc: the last columns, then
// the sum of the accumulators (so the row's result does not depend on how many rows were read together).
inline float finish_row(V16 (&acc)[kAcc], const uint16_t* w, const uint16_t* x, int64_t KA, int64_t K) {
  for (int64_t k = KA; k < K; k += kStep) acc[0] = dp(acc[0], bf16x32(w + k), bf16x32(x + k));
  if constexpr (kAcc == 4) return v_sum((acc[0] + acc[1]) + (acc[2] + acc[3]));
  return v_sum(acc[0] + acc[1]);
}

// y[r] = dot(W[r, :], x) in float32 for rows [r0, r1) of a row-major W with K columns (K % 32 == 0), kAcc
// accumulators per row. Two rows at a time, one from each half of the range, so each thread reads two sequential
// streams: on our AMD EPYC (Zen 4) the bf16 decode step runs 1.06-1.18x faster than with one stream (rows one
// after another), 0.98x with three or four (A/B of kernel builds in one process). Reading 8 neighbouring rows
// together with software prefetch was 10-20% slower than one stream.
void dot_rows(const uint16_t* W, const uint16_t* x, float* y, int64_t r0, int64_t r1, int64_t K) {
  constexpr int kStreams = 2;
  const int64_t part = (r1 - r0) / kStreams, KA = K / (kAcc * kStep) * (kAcc * kStep);
  for (int64_t i = r0; i < r0 + part; ++i) {
    V16 acc[kStreams][kAcc];
    for (auto& a : acc)
      for (auto& v : a) v = v_zero();
    for (int64_t k = 0; k < KA; k += kAcc * kStep)
      for (int s = 0; s < kStreams; ++s)
        for (int u = 0; u < kAcc; ++u)
          acc[s][u] = dp(acc[s][u], bf16x32(W + (i + s * part) * K + k + u * kStep), bf16x32(x + k + u * kStep));
    for (int s = 0; s < kStreams; ++s) y[i + s * part] = finish_row(acc[s], W + (i + s * part) * K, x, KA, K);
  }
  for (int64_t r = r0 + kStreams * part; r < r1; ++r) {  // the last row of an odd count
    V16 acc[kAcc];
    for (auto& v : acc) v = v_zero();
    for (int64_t k = 0; k < KA; k += kAcc * kStep)
      for (int u = 0; u < kAcc; ++u)
        acc[u] = dp(acc[u], bf16x32(W + r * K + k + u * kStep), bf16x32(x + k + u * kStep));
    y[r] = finish_row(acc, W + r * K, x, KA, K);
  }
}
// A few rows of x times a few rows of W (a GEMM of a handful of tokens: prefill of short prompts, the tokens of
// one expert, decode at batch 2-96). y[i, j] = dot(X[i, :], W[j, :]) in float32 for MR rows of X and NR rows of W,
// both row-major with K columns (K % 32 == 0); y has row stride ldy; `next` is the next `next_rows` rows of W, to
// prefetch. Both operands are read along K, so `vdpbf16ps` takes them as stored (no repacking of W) and each of the
// MR x NR sums is reduced across its lanes at the end. oneDNN's bf16 matmul runs at ~1/3-1/2 of the machine's peak
// below ~48 rows and reads W at ~1/2 of the bandwidth for under ~8 rows; this reads W once per MR rows of X, near
// the bandwidth for a few rows (measured on our Zen 4).
template <int MR, int NR>
void gemm_tile(const uint16_t* X, const uint16_t* W, const uint16_t* next, int next_rows, float* y, int64_t K,
               int64_t ldy) {
  V16 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = v_zero();
  for (int64_t k = 0; k < K; k += kStep) {
    // The next block of W (where the caller goes next), a step ahead of its first use: without it each tile
    // waits on NR interleaved streams from memory (1.3x slower at 16-32 rows, cold W). Into L2 (T1), not L1 (T0):
    // with T0 an expert on 4-16 rows of cold weights took the time of its reads plus its arithmetic, with T1 about
    // the larger of the two (1.2-1.4x faster at 4-16 rows, measured on our Zen 4).
    for (int j = 0; j < next_rows; ++j) _mm_prefetch(reinterpret_cast<const char*>(next + j * K + k), _MM_HINT_T1);
    Bf16x32 x[MR];
    for (int i = 0; i < MR; ++i) x[i] = bf16x32(X + i * K + k);
    for (int j = 0; j < NR; ++j) {
      const Bf16x32 w = bf16x32(W + j * K + k);
      for (int i = 0; i < MR; ++i) acc[i][j] = dp(acc[i][j], x[i], w);
    }
  }
  for (int i = 0; i < MR; ++i) {
    int j = 0;
    for (; j + 4 <= NR; j += 4)
      _mm_storeu_ps(y + i * ldy + j, reduce4(acc[i][j], acc[i][j + 1], acc[i][j + 2], acc[i][j + 3]));
    for (; j < NR; ++j) y[i * ldy + j] = v_sum(acc[i][j]);
  }
}

// Rows of x per tile: AVX-512, 6 x 4 accumulators + 6 x rows + 1 W row in 32 registers; AVX2, whose V16 is two
// registers of 16, as many as spill little.
constexpr int kTileRows = MIXTRAL_AVX512 ? 6 : 2;
constexpr int kTileCols = 4;  // rows of W per tile (the output columns a thread takes at once)

// y[i, j] = dot(X[i, :], W[j, :]) for all M rows of X and the NR rows of W; y is [M, ldy]; next as in gemm_tile.
template <int NR>
void gemm_cols(const uint16_t* X, int64_t M, const uint16_t* W, const uint16_t* next, int next_rows, int64_t K,
               float* y, int64_t ldy) {
  int64_t i = 0;
  for (; i + kTileRows <= M; i += kTileRows)
    gemm_tile<kTileRows, NR>(X + i * K, W, next, next_rows, y + i * ldy, K, ldy);
  const uint16_t* x = X + i * K;
  float* yi = y + i * ldy;
  switch (M - i) {  // the last rows: one smaller tile
    case 5: gemm_tile<5, NR>(x, W, next, next_rows, yi, K, ldy); break;
    case 4: gemm_tile<4, NR>(x, W, next, next_rows, yi, K, ldy); break;
    case 3: gemm_tile<3, NR>(x, W, next, next_rows, yi, K, ldy); break;
    case 2: gemm_tile<2, NR>(x, W, next, next_rows, yi, K, ldy); break;
    case 1: gemm_tile<1, NR>(x, W, next, next_rows, yi, K, ldy); break;
    default: break;
  }
}

// A GEMM's W, kTileCols rows at a time, as `gemm_cols` reads them (bf16, K contiguous). `rows(r, n, buf)`: rows
// r .. r + n - 1; `next(r)`: where rows r on lie in bf16 to prefetch (null: the rows fetch themselves).
struct Bf16Rows {  // a bf16 matrix as stored
  const uint16_t* W;
  int64_t K;
  static constexpr bool kBuffered = false;
  const uint16_t* rows(int64_t r, int64_t, uint16_t*) const { return W + r * K; }
  const uint16_t* next(int64_t r) const { return W + r * K; }
};

// Y [M, N] = X [M, K] W[N, K]^T rounded to bf16 once; W's rows split over the threads in blocks of kTileCols.
template <class Rows>
void gemm_rows(const uint16_t* X, int64_t M, const Rows& W, int64_t N, int64_t K, uint16_t* Y) {
  parallel(0, (N + kTileCols - 1) / kTileCols, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> y(M * kTileCols);
    std::vector<uint16_t> buf(Rows::kBuffered ? kTileCols * K : 0);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * kTileCols, cols = std::min<int64_t>(kTileCols, N - n0);
      const int more = static_cast<int>(std::clamp<int64_t>(N - n0 - kTileCols, 0, kTileCols));
      const uint16_t* next = more ? W.next(n0 + kTileCols) : nullptr;
      const uint16_t* w = W.rows(n0, cols, buf.data());
      if (cols == kTileCols)
        gemm_cols<kTileCols>(X, M, w, next ? next : w, next ? more : 0, K, y.data(), kTileCols);
      else
        for (int64_t j = 0; j < cols; ++j) gemm_cols<1>(X, M, w + j * K, w, 0, K, y.data() + j, kTileCols);
      static_assert(kTileCols == 4, "16 sums: 4 rows of 4 columns");
      int64_t i = 0;
      if (cols == kTileCols)
        for (; i + 4 <= M; i += 4) {  // 4 rows' 4 sums, one rounding of 16
          const __m256i b = to_bf16x16(v_load(y.data() + i * kTileCols));
          const __m128i lo = _mm256_castsi256_si128(b), hi = _mm256_extracti128_si256(b, 1);
          _mm_storel_epi64(reinterpret_cast<__m128i*>(Y + i * N + n0), lo);
          _mm_storel_epi64(reinterpret_cast<__m128i*>(Y + (i + 1) * N + n0), _mm_unpackhi_epi64(lo, lo));
          _mm_storel_epi64(reinterpret_cast<__m128i*>(Y + (i + 2) * N + n0), hi);
          _mm_storel_epi64(reinterpret_cast<__m128i*>(Y + (i + 3) * N + n0), _mm_unpackhi_epi64(hi, hi));
        }
      for (; i < M; ++i)
        for (int64_t j = 0; j < cols; ++j) Y[i * N + n0 + j] = float_to_bf16(y[i * kTileCols + j]);
    }
  });
}

void gemm_bf16(const uint16_t* X, int64_t M, const uint16_t* W, int64_t N, int64_t K, uint16_t* Y) {
  gemm_rows(X, M, Bf16Rows{W, K}, N, K, Y);
}

// h[0..16) = silu(a) * b for 16 float32 products a and b, with moe.swiglu's bf16 roundings (a, silu, b, the
// product), as bf16.
inline void silu_mul16(const float* a, const float* b, uint16_t* h) {
  const V16 g = round16(v_load(a));
  const V16 e = exp16(v_zero() - g);
  const V16 s = round16(g / (v_set1(1.0f) + e));
  v_store_bf16(h, s * round16(v_load(b)));
}

// H [M, F] = silu(X W1^T) * (X W3^T) for a few rows of X [M, K] (one expert's tokens in a prefill), with
// moe.swiglu's bf16 roundings (X W1^T, silu, X W3^T, the product), W1 and W3 [F, K], F a multiple of 16. Blocks of
// 16 features split over the threads; each block's two products come from `gemm_cols` (the same sums as
// `gemm_rows`), then silu and the product for the block's 16 features of a row at once: the two [M, F] products are
// never written out and read back, as F.silu and the multiplication would.
template <class Rows>
void gate_up(const uint16_t* X, int64_t M, const Rows& W1, const Rows& W3, int64_t F, int64_t K, uint16_t* H) {
  constexpr int64_t kBlock = 16;
  parallel(0, F / kBlock, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> y1(M * kBlock), y3(M * kBlock);
    std::vector<uint16_t> buf(Rows::kBuffered ? 2 * kTileCols * K : 0);
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t c = 0; c < kBlock; c += kTileCols) {  // W1's 4 rows (W3's next), then W3's (W1's next 4, if any)
        const int64_t f = b * kBlock + c;
        const uint16_t* w1 = W1.rows(f, kTileCols, buf.data());
        const uint16_t* w3 = W3.rows(f, kTileCols, buf.data() + buf.size() / 2);
        const uint16_t *n3 = W3.next(f), *n1 = f + kTileCols < F ? W1.next(f + kTileCols) : nullptr;
        gemm_cols<kTileCols>(X, M, w1, n3 ? n3 : w1, n3 ? static_cast<int>(kTileCols) : 0, K, y1.data() + c, kBlock);
        gemm_cols<kTileCols>(X, M, w3, n1 ? n1 : w3, n1 ? static_cast<int>(kTileCols) : 0, K, y3.data() + c, kBlock);
      }
      for (int64_t i = 0; i < M; ++i)
        silu_mul16(y1.data() + i * kBlock, y3.data() + i * kBlock, H + i * F + b * kBlock);
    }
  });
}

// int8 weights (weight-only quantization, one scale per row) times a bf16 x, with integer dot products.
//
// Converting each weight to float32 for an FMA costs ~3 instructions per 16 weights, which made the int8 GEMV
// compute-bound at half the bandwidth. Instead x is written once per product as 15-bit fixed point,
// x ~= t * (128 * hi + lo) with t a power of two, hi in [-128, 127] and lo in [0, 127], and each row's
// sum(q * x) is two `vpdpbusd` (64 byte products each) per 64 weights. `vpdpbusd` multiplies unsigned by signed
// bytes, so the weights are read as q + 128 (a flip of the top bit) and 128 * sum(hi) and 128 * sum(lo) are
// subtracted once. The integer sums are exact; the only rounding is x's: an element within ~2^7 of the largest
// |x| is exact (bf16 has 8 significant bits) and a smaller one is off by at most t / 2 = max|x| * 2^-15, far
// below the bf16 rounding of the output. y[r] = scale[r] * t * sum(q * (128 hi + lo)), rounded once.
#if MIXTRAL_AVX512
struct Fixed {
  std::vector<int8_t> hi, lo;  // padded with zeros to a multiple of 64
  int64_t hi_sum = 0, lo_sum = 0;
  double step = 1.0;  // t

  Fixed() = default;
  Fixed(const uint16_t* x, int64_t K) : hi((K + 63) / 64 * 64, 0), lo((K + 63) / 64 * 64, 0) {
    // The largest |x| from the bits: a bf16's magnitude orders as its low 15 bits do; 0x7f80 and up is inf or NaN.
    const __m512i magnitude = _mm512_set1_epi16(0x7fff);
    __m512i top16 = _mm512_setzero_si512();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32)
      top16 = _mm512_max_epu16(top16, _mm512_and_si512(_mm512_loadu_si512(x + k), magnitude));
    alignas(64) uint16_t lanes[32];
    _mm512_store_si512(lanes, top16);
    uint16_t top_bits = *std::max_element(lanes, lanes + 32);
    for (; k < K; ++k) top_bits = std::max<uint16_t>(top_bits, x[k] & 0x7fff);
    if (top_bits >= 0x7f80) {  // inf or NaN in x: the result is NaN (float32 arithmetic would give NaN or inf)
      step = std::nan("");
      return;
    }
    if (top_bits == 0) return;
    int e;
    std::frexp(bf16_to_float(top_bits), &e);  // top < 2^e, so |x| / t < 2^14 with t = 2^(e - 14)
    step = std::ldexp(1.0, e - 14);
    k = 0;
    if (e > -100) {  // 1 / t is a float32 (it is not for |x| below ~2^-113: those take the loop below)
      // x / t as x * (1 / t): exact (a power of two), rounded to the nearest integer, ties to even (as nearbyint)
      const __m512 inv = _mm512_set1_ps(static_cast<float>(std::ldexp(1.0, 14 - e)));
      __m512i hs = _mm512_setzero_si512(), ls = _mm512_setzero_si512();
      for (; k + 16 <= K; k += 16) {
        const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + k));
        const __m512 xf = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
        const __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(xf, inv));
        const __m512i h = _mm512_srai_epi32(v, 7), l = _mm512_and_si512(v, _mm512_set1_epi32(127));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(hi.data() + k), _mm512_cvtepi32_epi8(h));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(lo.data() + k), _mm512_cvtepi32_epi8(l));
        hs = _mm512_add_epi32(hs, h);
        ls = _mm512_add_epi32(ls, l);
      }
      hi_sum = _mm512_reduce_add_epi32(hs);
      lo_sum = _mm512_reduce_add_epi32(ls);
    }
    for (; k < K; ++k) {
      const int32_t v = static_cast<int32_t>(std::nearbyint(bf16_to_float(x[k]) / step));
      hi[k] = static_cast<int8_t>(v >> 7);  // floor division: lo = v - 128 hi is in [0, 127]
      lo[k] = static_cast<int8_t>(v & 127);
      hi_sum += hi[k];
      lo_sum += lo[k];
    }
  }
};

// sum_k q_j[k] * (128 hi_i[k] + lo_i[k]) for R rows of K int8 weights (R streams from memory) and MX rows of x, each
// 64 weights read once for all of x's rows (out[j * MX + i]), in the integers of x's fixed point: exact, so the same
// for any R and MX.
template <int R, int MX>
__attribute__((always_inline)) inline void dot_i8_tile(const int8_t* const* q, const Fixed* const* xs, int64_t K,
                                                       int64_t* out) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));  // q + 128 as an unsigned byte
  __m512i h[R][MX][2], l[R][MX][2];
  for (int j = 0; j < R; ++j)
    for (int i = 0; i < MX; ++i) h[j][i][0] = h[j][i][1] = l[j][i][0] = l[j][i][1] = _mm512_setzero_si512();
  int64_t k = 0;
  for (; k + 128 <= K; k += 128)
    for (int j = 0; j < R; ++j) {
      const __m512i u0 = _mm512_xor_si512(_mm512_loadu_si512(q[j] + k), flip);
      const __m512i u1 = _mm512_xor_si512(_mm512_loadu_si512(q[j] + k + 64), flip);
      for (int i = 0; i < MX; ++i) {
        const int8_t *hi = xs[i]->hi.data(), *lo = xs[i]->lo.data();
        h[j][i][0] = _mm512_dpbusd_epi32(h[j][i][0], u0, _mm512_loadu_si512(hi + k));
        l[j][i][0] = _mm512_dpbusd_epi32(l[j][i][0], u0, _mm512_loadu_si512(lo + k));
        h[j][i][1] = _mm512_dpbusd_epi32(h[j][i][1], u1, _mm512_loadu_si512(hi + k + 64));
        l[j][i][1] = _mm512_dpbusd_epi32(l[j][i][1], u1, _mm512_loadu_si512(lo + k + 64));
      }
    }
  for (; k < K; k += 64) {  // x's padding is zero, so the weights past K (read as 0 + 128) add nothing
    const __mmask64 m = K - k >= 64 ? ~__mmask64{0} : (__mmask64{1} << (K - k)) - 1;
    for (int j = 0; j < R; ++j) {
      const __m512i u = _mm512_xor_si512(_mm512_maskz_loadu_epi8(m, q[j] + k), flip);
      for (int i = 0; i < MX; ++i) {
        h[j][i][0] = _mm512_dpbusd_epi32(h[j][i][0], u, _mm512_loadu_si512(xs[i]->hi.data() + k));
        l[j][i][0] = _mm512_dpbusd_epi32(l[j][i][0], u, _mm512_loadu_si512(xs[i]->lo.data() + k));
      }
    }
  }
  // |sum| <= 255 * 128 * K: int32 holds it for K up to ~65k
  for (int j = 0; j < R; ++j)
    for (int i = 0; i < MX; ++i) {
      const int64_t dh = _mm512_reduce_add_epi32(_mm512_add_epi32(h[j][i][0], h[j][i][1])) - 128 * xs[i]->hi_sum;
      const int64_t dl = _mm512_reduce_add_epi32(_mm512_add_epi32(l[j][i][0], l[j][i][1])) - 128 * xs[i]->lo_sum;
      out[j * MX + i] = 128 * dh + dl;
    }
}

// The same for one row of x (the GEMV).
template <int R>
__attribute__((always_inline)) inline void dot_i8(const int8_t* const* q, const Fixed& x, int64_t K, int64_t* out) {
  const Fixed* xs[1] = {&x};
  dot_i8_tile<R, 1>(q, xs, K, out);
}
#else  // AVX2
// On AVX2 x's fixed point is kept as one int16 per element, v = 128 hi + lo (|v| < 2^14: see above), and each row's
// sum(q * v) is one `vpmaddwd` per 16 weights (sign-extended to int16): pairs of products summed into int32, exact
// (|q v| < 2^21). The same integers as the AVX-512 sums, so the same results.
struct Fixed {
  std::vector<int16_t> v;  // padded with zeros to a multiple of 64
  double step = 1.0;       // t

  Fixed() = default;
  Fixed(const uint16_t* x, int64_t K) : v((K + 63) / 64 * 64, 0) {
    // The largest |x| from the bits: a bf16's magnitude orders as its low 15 bits do; 0x7f80 and up is inf or NaN.
    const __m256i magnitude = _mm256_set1_epi16(0x7fff);
    __m256i top16 = _mm256_setzero_si256();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16)
      top16 = _mm256_max_epu16(
          top16, _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + k)), magnitude));
    alignas(32) uint16_t lanes[16];
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), top16);
    uint16_t top_bits = *std::max_element(lanes, lanes + 16);
    for (; k < K; ++k) top_bits = std::max<uint16_t>(top_bits, x[k] & 0x7fff);
    if (top_bits >= 0x7f80) {  // inf or NaN in x: the result is NaN (float32 arithmetic would give NaN or inf)
      step = std::nan("");
      return;
    }
    if (top_bits == 0) return;
    int e;
    std::frexp(bf16_to_float(top_bits), &e);  // top < 2^e, so |x| / t < 2^14 with t = 2^(e - 14)
    step = std::ldexp(1.0, e - 14);
    k = 0;
    if (e > -100) {  // 1 / t is a float32 (it is not for |x| below ~2^-113: those take the loop below)
      // x / t as x * (1 / t): exact (a power of two), rounded to the nearest integer, ties to even (as nearbyint)
      const __m256 inv = _mm256_set1_ps(static_cast<float>(std::ldexp(1.0, 14 - e)));
      for (; k + 16 <= K; k += 16) {
        const __m256i lo = _mm256_cvtps_epi32(_mm256_mul_ps(
            from_bf16x8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + k))), inv));
        const __m256i hi = _mm256_cvtps_epi32(_mm256_mul_ps(
            from_bf16x8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + k + 8))), inv));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(v.data() + k),
                            _mm256_permute4x64_epi64(_mm256_packs_epi32(lo, hi), 0xD8));
      }
    }
    for (; k < K; ++k) v[k] = static_cast<int16_t>(std::nearbyint(bf16_to_float(x[k]) / step));
  }
};

// sum_k q[i][k] * v[k] for R rows of K int8 weights at once (R streams from memory): exact, so the same for any R.
template <int R>
__attribute__((always_inline)) inline void dot_i8(const int8_t* const* q, const Fixed& x, int64_t K, int64_t* out) {
  // An int32 lane takes one pair of products (< 2^22) per 32 columns and accumulator: kFlush columns (< 2^29)
  // before the lanes are added into int64.
  constexpr int64_t kFlush = 4096;
  const int16_t* v = x.v.data();
  const int64_t K16 = K / 16 * 16;
  int64_t total[R] = {};
  for (int64_t k0 = 0; k0 < K16; k0 += kFlush) {
    const int64_t k1 = std::min(K16, k0 + kFlush);
    __m256i acc[R][2];
    for (int i = 0; i < R; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_si256();
    int64_t k = k0;
    auto madd = [&](int i, int u, int64_t c) {
      const __m256i w = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q[i] + c)));
      acc[i][u] = _mm256_add_epi32(
          acc[i][u], _mm256_madd_epi16(w, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + c))));
    };
    for (; k + 32 <= k1; k += 32)
      for (int i = 0; i < R; ++i) {
        madd(i, 0, k);
        madd(i, 1, k + 16);
      }
    for (; k < k1; k += 16)
      for (int i = 0; i < R; ++i) madd(i, 0, k);
    for (int i = 0; i < R; ++i) {
      alignas(32) int32_t lanes[8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), _mm256_add_epi32(acc[i][0], acc[i][1]));
      for (const int32_t l : lanes) total[i] += l;
    }
  }
  for (int i = 0; i < R; ++i) {
    for (int64_t k = K16; k < K; ++k) total[i] += static_cast<int64_t>(q[i][k]) * v[k];
    out[i] = total[i];
  }
}
#endif

// y[r] = scale[r] * dot(Q[r, :], x) for rows [r0, r1): two rows at a time, one from each half of the range (two
// sequential streams per thread, as `dot_rows`): int8 decode 1.09x one stream (A/B in one process).
void dot_rows_i8(const int8_t* Q, const uint16_t* scale, const Fixed& x, float* y, int64_t r0, int64_t r1, int64_t K) {
  auto put = [&](int64_t r, int64_t d) {
    y[r] = static_cast<float>(static_cast<double>(d) * x.step * bf16_to_float(scale[r]));
  };
  const int64_t part = (r1 - r0) / 2;
  for (int64_t r = r0; r < r0 + part; ++r) {
    const int8_t* q[2] = {Q + r * K, Q + (r + part) * K};
    int64_t d[2];
    dot_i8<2>(q, x, K, d);
    put(r, d[0]);
    put(r + part, d[1]);
  }
  for (int64_t r = r0 + 2 * part; r < r1; ++r) {
    const int8_t* q[1] = {Q + r * K};
    int64_t d[1];
    dot_i8<1>(q, x, K, d);
    put(r, d[0]);
  }
}

#if MIXTRAL_AVX512
// Y [M, N] = X [M, K] Q^T * scale, each row as `gemv_int8` computes it (`dot_rows_i8`'s integers and rounding), the
// matrix read once for all rows (4 at a time); the rows of Q split over the threads. (AVX2's is below.)
void gemm_i8(const uint16_t* X, int64_t M, const int8_t* Q, const uint16_t* scale, int64_t N, int64_t K, uint16_t* Y) {
  std::vector<Fixed> xs;
  xs.reserve(M);
  for (int64_t i = 0; i < M; ++i) xs.emplace_back(X + i * K, K);
  parallel(0, N, kRows, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int8_t* q[1] = {Q + r * K};
      const double s = bf16_to_float(scale[r]);
      for (int64_t i = 0; i < M; i += 4) {
        const int64_t n = std::min<int64_t>(4, M - i);
        const Fixed* x4[4] = {};
        for (int64_t j = 0; j < n; ++j) x4[j] = &xs[i + j];
        int64_t d[4];
        switch (n) {
          case 4: dot_i8_tile<1, 4>(q, x4, K, d); break;
          case 3: dot_i8_tile<1, 3>(q, x4, K, d); break;
          case 2: dot_i8_tile<1, 2>(q, x4, K, d); break;
          default: dot_i8_tile<1, 1>(q, x4, K, d); break;
        }
        for (int64_t j = 0; j < n; ++j)  // as `dot_rows_i8` puts it, then rounded to bf16 once
          Y[(i + j) * N + r] = float_to_bf16(static_cast<float>(static_cast<double>(d[j]) * xs[i + j].step * s));
      }
    }
  });
}
#endif

#if MIXTRAL_AVX512  // (AVX2: `gemm_i8`, below)
// Rows of an int8 matrix Q [N, K] with bf16 scales [N] (weight-only), dequantized n at a time into `buf` as
// QuantizedView.dequantize does (q * scale rounded to bf16 once), for `gemm_rows` and `gate_up`: a prefill reads
// the int8 bytes, half of bf16's, and multiplies with the bf16 tiles. The next rows are prefetched as it goes.
struct Int8Rows {
  const int8_t* Q;
  const uint16_t* scale;
  int64_t K;
  static constexpr bool kBuffered = true;
  const uint16_t* rows(int64_t r, int64_t n, uint16_t* buf) const {
    for (int64_t i = 0; i < n; ++i) {
      const int8_t* q = Q + (r + i) * K;
      const V16 s = v_set1(bf16_to_float(scale[r + i]));
      for (int64_t k = 0; k < K; k += 16) {
        if (k % 64 == 0) _mm_prefetch(reinterpret_cast<const char*>(q + n * K + k), _MM_HINT_T0);
        v_store_bf16(buf + i * K + k, v_from_i8(q + k) * s);
      }
    }
    return buf;
  }
  const uint16_t* next(int64_t) const { return nullptr; }
};
#endif

// int4 weights as `quantize.int4_blocks` lays them out, uint8 [N / 64, K / group, group * 32 + 256]: rows in
// blocks of 64, and for each block and group of `group` columns, first the group's columns in PyTorch's int4pack
// order (what torch._weight_int4pack_mm_for_cpu reads: for each column k, 32 bytes whose byte j holds row j (low
// nibble) and row 32 + j (high nibble), values q in [0, 15]), then the block's 64 bf16 (scale, zero) pairs of the
// group, with w = (q - 8) * scale + zero. A block is one sequential read, its scales inline: with the scales in
// an array of their own (two streams per thread) int4 decode ran 1.06x slower (A/B in one process).
// So for one row
//   y = sum_g scale_g * sum_{k in g} q_k x_k + (zero_g - 8 scale_g) * sum_{k in g} x_k.
// The first sum with integer dot products on x's fixed-point bytes (see `Fixed`): for 4 columns of the block, one
// `vpermi2b` gathers 16 rows' 4 bytes into 16 dwords (twice, for the 32 byte columns), a shift and a mask split the
// nibbles (64 rows x 4 weights, the unsigned operand of `vpdpbusd`), and 8 `vpdpbusd` multiply them with the 4
// columns' hi and lo bytes of x. ATen's kernel converts every weight to float32 and reads at ~1/4 of the bandwidth.
constexpr int64_t kInt4Rows = 64;

// Bytes of one group of one block: the group's int4pack columns, then 64 (scale, zero) pairs.
constexpr int64_t int4_group_bytes(int64_t group) { return group * kInt4Rows / 2 + kInt4Rows * 4; }

// Group g (columns [g0, g0 + group)) of block b of an int4 matrix P of K columns: `columns + k * 32` is column k's
// 32 bytes, `pairs` the 64 rows' (scale, zero) pairs.
struct Int4Group {
  const uint8_t* columns;
  const uint16_t* pairs;
  Int4Group(const uint8_t* P, int64_t K, int64_t group, int64_t b, int64_t g) {
    const uint8_t* start = P + (b * (K / group) + g) * int4_group_bytes(group);
    columns = start - g * group * 32;
    pairs = reinterpret_cast<const uint16_t*>(start + group * 32);
  }
};

#if MIXTRAL_AVX512
// x for an int4 product on AVX-512: in fixed point (`Fixed`), with its sum over each group of columns.
struct Int4Input {
  Fixed fixed;
  std::vector<float> sums;
  Int4Input() = default;
  Int4Input(const uint16_t* x, int64_t K, int64_t group) : fixed(x, K), sums(K / group, 0.0f) {
    for (int64_t g = 0; g < K / group; ++g) {  // groups are multiples of 16 columns (`check_int4`)
      V16 s = v_zero();
      for (int64_t k = g * group; k < (g + 1) * group; k += 16) s = s + v_from_bf16(x + k);
      sums[g] = v_sum(s);
    }
  }
};

struct GatherIndex {  // byte 4i + c of `lo` selects column c, byte i of the 4 x 32 bytes; `hi` byte 16 + i
  __m512i lo, hi;
  GatherIndex() {
    alignas(64) uint8_t a[64], b[64];
    for (int i = 0; i < 16; ++i)
      for (int c = 0; c < 4; ++c) {
        a[4 * i + c] = static_cast<uint8_t>(c * 32 + i);
        b[4 * i + c] = static_cast<uint8_t>(c * 32 + 16 + i);
      }
    lo = _mm512_load_si512(a);
    hi = _mm512_load_si512(b);
  }
};

// Columns k .. k + 3 of a block's group (`at.columns`) as the 64 rows' nibbles, one byte each: q[v] byte 4i + c is
// row 16 v + i, column k + c.
__attribute__((always_inline)) inline void split4_i4(const uint8_t* columns, int64_t k, __m512i* q) {
  static const GatherIndex index;
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  const __m512i A = _mm512_loadu_si512(columns + k * 32), B = _mm512_loadu_si512(columns + k * 32 + 64);
  const __m512i r0 = _mm512_permutex2var_epi8(A, index.lo, B), r1 = _mm512_permutex2var_epi8(A, index.hi, B);
  q[0] = _mm512_and_si512(r0, nibble);                         // rows 0-15
  q[1] = _mm512_and_si512(r1, nibble);                         // rows 16-31
  q[2] = _mm512_and_si512(_mm512_srli_epi16(r0, 4), nibble);   // rows 32-47
  q[3] = _mm512_and_si512(_mm512_srli_epi16(r1, 4), nibble);   // rows 48-63
}

// out[v] += a group's contribution to the block's 64 rows (16 per v), from the integer sums dh, dl of its columns
// and x's fixed-point step and sum over the group: t (128 dh + dl) scale + (zero - 8 scale) sum(x).
__attribute__((always_inline)) inline void finish_group_i4(const __m512i* dh, const __m512i* dl, const uint16_t* pairs,
                                                           float step, float x_sum, __m512* out) {
  const __m512i top = _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
  const __m512 t = _mm512_set1_ps(step), xs = _mm512_set1_ps(x_sum), eight = _mm512_set1_ps(8.0f);
  for (int v = 0; v < 4; ++v) {  // 16 rows' (scale, zero) pairs: as dwords, scale in the low half
    const __m512i pair = _mm512_loadu_si512(pairs + 16 * v * 2);
    const __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(pair, 16));
    const __m512 zero = _mm512_castsi512_ps(_mm512_and_si512(pair, top));
    // |128 dh + dl| <= 15 * 2^14 * group: exact in int32, and in float32 for groups up to 64
    const __m512i sum = _mm512_add_epi32(_mm512_slli_epi32(dh[v], 7), dl[v]);
    const __m512 d = _mm512_mul_ps(_mm512_cvtepi32_ps(sum), t);
    out[v] = _mm512_fmadd_ps(d, scale, out[v]);
    out[v] = _mm512_fmadd_ps(_mm512_fnmadd_ps(eight, scale, zero), xs, out[v]);
  }
}

// y[64 b .. 64 b + 64) for each block b of bs[0..R) of an int4 matrix P of K columns, the blocks group by group in
// turn (R sequential streams).
template <int R>
void dot_blocks_i4(const uint8_t* P, const Int4Input& in, int64_t K, int64_t group, const int64_t* bs, float* y) {
  const Fixed& x = in.fixed;
  const int8_t *hi = x.hi.data(), *lo = x.lo.data();
  __m512 out[R][4];
  for (int i = 0; i < R; ++i)
    for (int v = 0; v < 4; ++v) out[i][v] = _mm512_setzero_ps();
  for (int64_t g = 0, g0 = 0; g0 < K; ++g, g0 += group) {
    for (int i = 0; i < R; ++i) {
      const Int4Group at(P, K, group, bs[i], g);
      __m512i dh[4], dl[4];
      for (int v = 0; v < 4; ++v) dh[v] = dl[v] = _mm512_setzero_si512();
      for (int64_t k = g0; k < g0 + group; k += 4) {
        __m512i q[4];
        split4_i4(at.columns, k, q);
        int32_t h4, l4;
        std::memcpy(&h4, hi + k, 4);
        std::memcpy(&l4, lo + k, 4);
        const __m512i xh = _mm512_set1_epi32(h4), xl = _mm512_set1_epi32(l4);
        for (int v = 0; v < 4; ++v) {
          dh[v] = _mm512_dpbusd_epi32(dh[v], q[v], xh);
          dl[v] = _mm512_dpbusd_epi32(dl[v], q[v], xl);
        }
      }
      finish_group_i4(dh, dl, at.pairs, static_cast<float>(x.step), in.sums[g], out[i]);
    }
  }
  for (int i = 0; i < R; ++i)
    for (int v = 0; v < 4; ++v) _mm512_storeu_ps(y + bs[i] * kInt4Rows + 16 * v, out[i][v]);
}
#else  // AVX2
// x for an int4 product on AVX2: in int8 per group of the weights' columns, for `vpmaddubsw` (unsigned bytes, the
// nibbles, times signed bytes: 16 pairs of products per instruction, where `vpmaddwd` on an int16 x takes 8, and
// the nibbles need one split fewer). For group g, t_g = max |x_k| / 127 and q_k = round(x_k / t_g) (in double
// precision, ties to even), so x_k = t_g q_k up to t_g / 2; then
//   y = sum_g t_g (scale_g sum_{k in g} w_k q_k + (zero_g - 8 scale_g) sum_{k in g} q_k),
// the inner sums exact in integers. This is the rounding llama.cpp's Q4_0 x Q8_0 product makes (its blocks: 32
// columns); `ops.int4_product_reference` computes the same.
struct Int4Input {
  std::vector<int8_t> q;    // [K]
  std::vector<float> step;  // [K / group]: t_g (0 for a group of zeros, NaN for one that holds inf or NaN)
  std::vector<float> sum;   // [K / group]: t_g sum_{k in g} q_k
  Int4Input() = default;
  Int4Input(const uint16_t* x, int64_t K, int64_t group) : q(K, 0), step(K / group, 0.0f), sum(K / group, 0.0f) {
    const __m256i magnitude = _mm256_set1_epi16(0x7fff);
    for (int64_t g = 0; g < K / group; ++g) {  // groups are multiples of 16 columns (`check_int4`)
      const uint16_t* xg = x + g * group;
      // The largest |x| from the bits: a bf16's magnitude orders as its low 15 bits do; 0x7f80 and up is inf or NaN.
      __m256i top16 = _mm256_setzero_si256();
      for (int64_t k = 0; k < group; k += 16)
        top16 = _mm256_max_epu16(
            top16, _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xg + k)), magnitude));
      alignas(32) uint16_t lanes[16];
      _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), top16);
      const uint16_t top_bits = *std::max_element(lanes, lanes + 16);
      if (top_bits >= 0x7f80) {  // the group's products are NaN (float32 arithmetic would give NaN or inf)
        step[g] = sum[g] = std::numeric_limits<float>::quiet_NaN();
        continue;
      }
      if (top_bits == 0) continue;
      const double top = bf16_to_float(top_bits);
      const __m256d inv = _mm256_set1_pd(127.0 / top);  // |x| inv <= 127 (rounded up at most to 127 + 2^-45)
      __m128i total = _mm_setzero_si128();
      for (int64_t k = 0; k < group; k += 16) {
        __m128i part[4];  // 4 int32 each, rounded to nearest, ties to even (the default rounding mode)
        for (int j = 0; j < 4; ++j) {
          const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(xg + k + 4 * j));
          const __m128 f = _mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(b), 16));
          part[j] = _mm256_cvtpd_epi32(_mm256_mul_pd(_mm256_cvtps_pd(f), inv));
          total = _mm_add_epi32(total, part[j]);
        }
        const __m128i lo = _mm_packs_epi32(part[0], part[1]), hi = _mm_packs_epi32(part[2], part[3]);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(q.data() + g * group + k), _mm_packs_epi16(lo, hi));
      }
      alignas(16) int32_t t[4];
      _mm_store_si128(reinterpret_cast<__m128i*>(t), total);
      step[g] = static_cast<float>(top / 127.0);
      sum[g] = step[g] * static_cast<float>(t[0] + t[1] + t[2] + t[3]);  // |sum q| <= 127 group: exact in float32
    }
  }
};

// For columns k, k + 1 of a block's group (`columns` as `Int4Group` gives them; A, B: 32 bytes each), the 4
// vectors whose 16-bit lanes hold one row's two weights as bytes, as `vpmaddubsw` takes them: the bytes of A and B
// interleaved (per 128-bit half: bytes 0-7 in the low half, 16-23 in the high one, then 8-15 and 24-31), the low
// nibbles for rows 0-31 and the high ones, shifted down, for rows 32-63. So the lanes of q[0] are rows 0-7 | 16-23,
// q[1] 8-15 | 24-31, q[2] 32-39 | 48-55, q[3] 40-47 | 56-63.
inline void split_pair_i4(const uint8_t* columns, int64_t k, __m256i (&q)[4]) {
  const __m256i nibble = _mm256_set1_epi8(0x0F);
  const __m256i A = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(columns + k * 32));
  const __m256i B = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(columns + k * 32 + 32));
  const __m256i lo = _mm256_unpacklo_epi8(A, B), hi = _mm256_unpackhi_epi8(A, B);
  q[0] = _mm256_and_si256(lo, nibble);
  q[1] = _mm256_and_si256(hi, nibble);
  q[2] = _mm256_and_si256(_mm256_srli_epi16(lo, 4), nibble);
  q[3] = _mm256_and_si256(_mm256_srli_epi16(hi, 4), nibble);
}

// Columns summed in int16 lanes before they are widened: 16 columns of |w q| <= 15 * 127 stay below 2^15.
constexpr int64_t kInt16Columns = 16;

// The first of the 8 rows of each int32 vector `widen_i4` adds into.
constexpr int kSplitRows[8] = {0, 16, 8, 24, 32, 48, 40, 56};

// d[2v], d[2v + 1] += the int16 lanes of acc[v] (the rows of `split_pair_i4`'s q[v]) as int32: rows
// kSplitRows[2v] .. + 8 and kSplitRows[2v + 1] .. + 8.
inline void widen_i4(const __m256i (&acc)[4], __m256i (&d)[8]) {
  for (int v = 0; v < 4; ++v) {
    d[2 * v] = _mm256_add_epi32(d[2 * v], _mm256_cvtepi16_epi32(_mm256_castsi256_si128(acc[v])));
    d[2 * v + 1] = _mm256_add_epi32(d[2 * v + 1], _mm256_cvtepi16_epi32(_mm256_extracti128_si256(acc[v], 1)));
  }
}

// out[0..64) += one group's part of a row's products from its integer sums d (as `widen_i4` leaves them; |d| <=
// 15 * 127 * group, exact in float32 for groups up to 8192), with the group's (scale, zero) pairs and x's t_g and
// t_g sum q.
inline void finish_group_i4(const __m256i (&d)[8], const uint16_t* pairs, float step, float x_sum, float* out) {
  const __m256i top = _mm256_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
  const __m256 st = _mm256_set1_ps(step), eight = _mm256_set1_ps(8.0f), xs = _mm256_set1_ps(x_sum);
  for (int j = 0; j < 8; ++j) {  // 8 rows' (scale, zero) pairs: as dwords, scale in the low half
    const int r = kSplitRows[j];
    const __m256i pair = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pairs + 2 * r));
    const __m256 scale = _mm256_castsi256_ps(_mm256_slli_epi32(pair, 16));
    const __m256 zero = _mm256_castsi256_ps(_mm256_and_si256(pair, top));
    const __m256 dj = _mm256_mul_ps(_mm256_cvtepi32_ps(d[j]), st);
    __m256 o = _mm256_fmadd_ps(dj, scale, _mm256_loadu_ps(out + r));
    o = _mm256_fmadd_ps(_mm256_fnmadd_ps(eight, scale, zero), xs, o);
    _mm256_storeu_ps(out + r, o);
  }
}

// x's bytes k, k + 1 in every 16-bit lane.
inline __m256i int8_pair(const int8_t* q) {
  int16_t pair;
  std::memcpy(&pair, q, 2);
  return _mm256_set1_epi16(pair);
}

template <int R>
void dot_blocks_i4(const uint8_t* P, const Int4Input& x, int64_t K, int64_t group, const int64_t* bs, float* y) {
  alignas(32) float out[R][kInt4Rows] = {};
  for (int64_t g = 0, g0 = 0; g0 < K; ++g, g0 += group) {
    for (int i = 0; i < R; ++i) {
      const Int4Group at(P, K, group, bs[i], g);
      __m256i d[8];
      for (auto& a : d) a = _mm256_setzero_si256();
      for (int64_t c = g0; c < g0 + group; c += kInt16Columns) {
        __m256i acc[4];
        for (auto& a : acc) a = _mm256_setzero_si256();
        for (int64_t k = c; k < c + kInt16Columns; k += 2) {
          __m256i q[4];
          split_pair_i4(at.columns, k, q);
          const __m256i xv = int8_pair(x.q.data() + k);
          for (int v = 0; v < 4; ++v) acc[v] = _mm256_add_epi16(acc[v], _mm256_maddubs_epi16(q[v], xv));
        }
        widen_i4(acc, d);
      }
      finish_group_i4(d, at.pairs, x.step[g], x.sum[g], out[i]);
    }
  }
  for (int i = 0; i < R; ++i) std::memcpy(y + bs[i] * kInt4Rows, out[i], sizeof out[i]);
}
#endif

// y for rows [r0, r1) (whole blocks) of an int4 matrix: two blocks at a time, one from each half of the range (two
// sequential streams per thread, as `dot_rows`): int4 decode 1.053x one block at a time (A/B of kernel builds in one
// process, 514 rounds of 48 steps; 1.033x in the rounds whose bandwidth probe read below 36 GB/s, 1.058x above
// 42). With the scales in a tensor of their own (four streams), reading two blocks at once had run 0.81x.
void dot_rows_i4(const uint8_t* P, const Int4Input& x, int64_t K, int64_t group, float* y, int64_t r0, int64_t r1) {
  const int64_t b0 = r0 / kInt4Rows, b1 = r1 / kInt4Rows, part = (b1 - b0) / 2;
  for (int64_t b = b0; b < b0 + part; ++b) {
    const int64_t bs[2] = {b, b + part};
    dot_blocks_i4<2>(P, x, K, group, bs, y);
  }
  for (int64_t b = b0 + 2 * part; b < b1; ++b) dot_blocks_i4<1>(P, x, K, group, &b, y);
}

// An int4 matrix for the prefill kernels (the layout above).
struct Int4Matrix {
  const uint8_t* P;
  int64_t N, K, group;
};

#if MIXTRAL_AVX512
// The int4 GEMV of a few rows at once on AVX-512 (a decode step of several sequences, an expert's few tokens): row by
// row the GEMV reads the whole matrix from memory once per row. Here each group of a block has its nibbles split
// once into the bytes `vpdpbusd` takes (`split_group_i4`: group * 64 bytes, in L1), which then serve every row of X,
// 2 at a time (16 int32 accumulators). The integer sums and the float32 arithmetic per group are the GEMV's
// (`dot_blocks_i4`), in its order, so each row of the result is bit for bit `gemv_int4`'s, at every M.

// Group `at` (columns [g0, g0 + group)) split as `dot_blocks_i4` splits it: 4 columns of the 64 rows in q[4 (k - g0)
// / 4 + v], rows 16 v .. 16 v + 15.
void split_group_i4(const Int4Group& at, int64_t g0, int64_t group, __m512i* q) {
  for (int64_t k = g0; k < g0 + group; k += 4, q += 4) split4_i4(at.columns, k, q);
}

// out[i][0..64) += group g of a block (split in q, (scale, zero) pairs in `pairs`) times x_i, for NR rows.
template <int NR>
void tile_group_i4(const __m512i* q, const uint16_t* pairs, int64_t g, int64_t g0, int64_t group,
                   const Int4Input* const* xs, float* const* out) {
  __m512i dh[NR][4], dl[NR][4];
  for (int i = 0; i < NR; ++i)
    for (int v = 0; v < 4; ++v) dh[i][v] = dl[i][v] = _mm512_setzero_si512();
  for (int64_t k = g0; k < g0 + group; k += 4, q += 4) {
    __m512i xh[NR], xl[NR];
    for (int i = 0; i < NR; ++i) {
      int32_t h4, l4;
      std::memcpy(&h4, xs[i]->fixed.hi.data() + k, 4);
      std::memcpy(&l4, xs[i]->fixed.lo.data() + k, 4);
      xh[i] = _mm512_set1_epi32(h4);
      xl[i] = _mm512_set1_epi32(l4);
    }
    for (int v = 0; v < 4; ++v) {
      const __m512i w = _mm512_loadu_si512(q + v);
      for (int i = 0; i < NR; ++i) {
        dh[i][v] = _mm512_dpbusd_epi32(dh[i][v], w, xh[i]);
        dl[i][v] = _mm512_dpbusd_epi32(dl[i][v], w, xl[i]);
      }
    }
  }
  for (int i = 0; i < NR; ++i) {  // as `dot_blocks_i4` finishes a group, the running sums kept in out[i]
    __m512 acc[4];
    for (int v = 0; v < 4; ++v) acc[v] = _mm512_loadu_ps(out[i] + 16 * v);
    finish_group_i4(dh[i], dl[i], pairs, static_cast<float>(xs[i]->fixed.step), xs[i]->sums[g], acc);
    for (int v = 0; v < 4; ++v) _mm512_storeu_ps(out[i] + 16 * v, acc[v]);
  }
}

// y [M, 64] (zeroed by the caller) = block b of W times every row of X, given as `Int4Input`s; q a buffer of
// group vectors.
void block_rows_i4(const Int4Matrix& W, int64_t b, const std::vector<Int4Input>& xs, __m512i* q, float* y) {
  const int64_t M = static_cast<int64_t>(xs.size());
  for (int64_t g = 0, g0 = 0; g0 < W.K; ++g, g0 += W.group) {
    const Int4Group at(W.P, W.K, W.group, b, g);
    split_group_i4(at, g0, W.group, q);
    int64_t i = 0;
    for (; i + 2 <= M; i += 2) {
      const Int4Input* x2[2] = {&xs[i], &xs[i + 1]};
      float* o2[2] = {y + i * kInt4Rows, y + (i + 1) * kInt4Rows};
      tile_group_i4<2>(q, at.pairs, g, g0, W.group, x2, o2);
    }
    if (i < M) {
      const Int4Input* x1[1] = {&xs[i]};
      float* o1[1] = {y + i * kInt4Rows};
      tile_group_i4<1>(q, at.pairs, g, g0, W.group, x1, o1);
    }
  }
}

std::vector<Int4Input> int4_rows(const uint16_t* X, int64_t M, int64_t K, int64_t group) {
  std::vector<Int4Input> xs;
  xs.reserve(M);
  for (int64_t i = 0; i < M; ++i) xs.emplace_back(X + i * K, K, group);
  return xs;
}

// Y [M, N] = X W^T, W int4, each row as `gemv_int4` computes it; the 64-row blocks split over the threads.
void gemm_i4(const uint16_t* X, int64_t M, const Int4Matrix& W, uint16_t* Y) {
  const std::vector<Int4Input> xs = int4_rows(X, M, W.K, W.group);
  parallel(0, W.N / kInt4Rows, 1, [&](int64_t b0, int64_t b1) {
    std::vector<__m512i> q(W.group);
    std::vector<float> y(M * kInt4Rows);
    for (int64_t b = b0; b < b1; ++b) {
      std::fill(y.begin(), y.end(), 0.0f);
      block_rows_i4(W, b, xs, q.data(), y.data());
      for (int64_t i = 0; i < M; ++i)
        for (int64_t r = 0; r < kInt4Rows; ++r) Y[i * W.N + b * kInt4Rows + r] = float_to_bf16(y[i * kInt4Rows + r]);
    }
  });
}

// H = silu(X W1^T) * (X W3^T) with W1, W3 int4 (as `gate_up`), 64 features at a time.
void gate_up_i4(const uint16_t* X, int64_t M, const Int4Matrix& W1, const Int4Matrix& W3, uint16_t* H) {
  const int64_t F = W1.N;
  const std::vector<Int4Input> xs = int4_rows(X, M, W1.K, W1.group);
  parallel(0, F / kInt4Rows, 1, [&](int64_t b0, int64_t b1) {
    std::vector<__m512i> q(W1.group);
    std::vector<float> y1(M * kInt4Rows), y3(M * kInt4Rows);
    for (int64_t b = b0; b < b1; ++b) {
      std::fill(y1.begin(), y1.end(), 0.0f);
      std::fill(y3.begin(), y3.end(), 0.0f);
      block_rows_i4(W1, b, xs, q.data(), y1.data());
      block_rows_i4(W3, b, xs, q.data(), y3.data());
      for (int64_t i = 0; i < M; ++i)
        for (int64_t c = 0; c < kInt4Rows; c += 16)
          silu_mul16(y1.data() + i * kInt4Rows + c, y3.data() + i * kInt4Rows + c, H + i * F + b * kInt4Rows + c);
    }
  });
}
#endif

// A matrix-vector product's weights: bf16 [N, K]; int8 [N, K] with bf16 scales [N]; or int4 as above (scales
// inline).
enum class Format { kBF16, kInt8, kInt4 };

struct Weights {
  Format format;
  const void* data;
  const uint16_t* scale;  // int8: [N]; bf16, int4: null
  int64_t N, K, group;
  int64_t block() const { return format == Format::kInt4 ? kInt4Rows : kRows; }  // rows a thread takes at once
};

// x for a product: bf16 as given; for int8 weights also in fixed point, for int4 as `Int4Input`.
struct Vector {
  const uint16_t* bf16;
  Fixed fixed;
  Int4Input int4;
  Vector(const uint16_t* x, int64_t K, Format format, int64_t group = 0) : bf16(x) {
    if (format == Format::kInt8) fixed = Fixed(x, K);
    if (format == Format::kInt4) int4 = Int4Input(x, K, group);
  }
};

// y[r] = dot(W[r, :], x) for rows [r0, r1) (multiples of W.block(), or r1 = N).
void dot_any(const Weights& W, const Vector& x, float* y, int64_t r0, int64_t r1) {
  switch (W.format) {
    case Format::kBF16:
      dot_rows(static_cast<const uint16_t*>(W.data), x.bf16, y, r0, r1, W.K);
      break;
    case Format::kInt8:
      dot_rows_i8(static_cast<const int8_t*>(W.data), W.scale, x.fixed, y, r0, r1, W.K);
      break;
    case Format::kInt4:
      dot_rows_i4(static_cast<const uint8_t*>(W.data), x.int4, W.K, W.group, y, r0, r1);
      break;
  }
}

#if !MIXTRAL_AVX512
// int4 products of a few rows on AVX2 (an expert's tokens in a prefill), with the GEMV's integer dot products: AVX2
// has no bf16 dot product, so bf16 tiles of dequantized weights (the AVX-512 path above) cost a conversion per use,
// and row by row the GEMV reads the whole matrix from memory once per row. Here each group of a block has its
// nibbles split once into the bytes `vpmaddubsw` takes (`split_group_i4`: group * 64 bytes, in L1), which then
// serve every row of X, 3 rows at a time (12 int16 accumulators and 3 broadcasts of x in the 16 registers). The
// integer sums and the float32 arithmetic per group are the GEMV's (`dot_blocks_i4`), so each row of the result is
// bit for bit `gemv_int4`'s, at every M.

// Group `at` (columns [g0, g0 + group)) split as `dot_blocks_i4` splits it: for column pair n, q[4 n + v] is
// `split_pair_i4`'s q[v].
void split_group_i4(const Int4Group& at, int64_t g0, int64_t group, __m256i* q) {
  for (int64_t k = g0; k < g0 + group; k += 2, q += 4) {
    __m256i parts[4];
    split_pair_i4(at.columns, k, parts);
    for (int v = 0; v < 4; ++v) _mm256_storeu_si256(q + v, parts[v]);
  }
}

template <int NR>
void tile_group_i4(const __m256i* q, const Int4Group& at, int64_t g, int64_t g0, int64_t group, const Vector* xs,
                   float* out) {
  __m256i d[NR][8];
  for (int i = 0; i < NR; ++i)
    for (auto& a : d[i]) a = _mm256_setzero_si256();
  for (int64_t c = 0; c < group; c += kInt16Columns) {
    __m256i acc[NR][4];
    for (int i = 0; i < NR; ++i)
      for (auto& a : acc[i]) a = _mm256_setzero_si256();
    for (int64_t k = c; k < c + kInt16Columns; k += 2) {
      __m256i xv[NR];
      for (int i = 0; i < NR; ++i) xv[i] = int8_pair(xs[i].int4.q.data() + g0 + k);
      for (int v = 0; v < 4; ++v) {
        const __m256i w = _mm256_loadu_si256(q + 2 * k + v);
        for (int i = 0; i < NR; ++i) acc[i][v] = _mm256_add_epi16(acc[i][v], _mm256_maddubs_epi16(w, xv[i]));
      }
    }
    for (int i = 0; i < NR; ++i) widen_i4(acc[i], d[i]);
  }
  for (int i = 0; i < NR; ++i)
    finish_group_i4(d[i], at.pairs, xs[i].int4.step[g], xs[i].int4.sum[g], out + i * kInt4Rows);
}

// y [M, 64] (zeroed by the caller) = block b of W times every row of X, given as `Vector`s; q a buffer of
// group * 2 vectors.
void block_rows_i4(const Int4Matrix& W, int64_t b, const std::vector<Vector>& xs, __m256i* q, float* y) {
  const int64_t M = static_cast<int64_t>(xs.size());
  for (int64_t g = 0, g0 = 0; g0 < W.K; ++g, g0 += W.group) {
    const Int4Group at(W.P, W.K, W.group, b, g);
    split_group_i4(at, g0, W.group, q);
    int64_t i = 0;
    for (; i + 3 <= M; i += 3) tile_group_i4<3>(q, at, g, g0, W.group, xs.data() + i, y + i * kInt4Rows);
    if (M - i == 2) tile_group_i4<2>(q, at, g, g0, W.group, xs.data() + i, y + i * kInt4Rows);
    if (M - i == 1) tile_group_i4<1>(q, at, g, g0, W.group, xs.data() + i, y + i * kInt4Rows);
  }
}

// The rows of X [M, K] as the GEMV of `format` takes x (fixed point; int4: `Int4Input`).
std::vector<Vector> fixed_rows(const uint16_t* X, int64_t M, int64_t K, Format format, int64_t group = 0) {
  std::vector<Vector> xs;
  xs.reserve(M);
  for (int64_t i = 0; i < M; ++i) xs.emplace_back(X + i * K, K, format, group);
  return xs;
}

// Y [M, N] = X W^T, W int4, each row as `gemv_int4` computes it; the 64-row blocks split over the threads.
void gemm_i4(const uint16_t* X, int64_t M, const Int4Matrix& W, uint16_t* Y) {
  const std::vector<Vector> xs = fixed_rows(X, M, W.K, Format::kInt4, W.group);
  parallel(0, W.N / kInt4Rows, 1, [&](int64_t b0, int64_t b1) {
    std::vector<int64_t> q(W.group * 8);  // group * 2 vectors
    std::vector<float> y(M * kInt4Rows);
    for (int64_t b = b0; b < b1; ++b) {
      std::fill(y.begin(), y.end(), 0.0f);
      block_rows_i4(W, b, xs, reinterpret_cast<__m256i*>(q.data()), y.data());
      for (int64_t i = 0; i < M; ++i)
        for (int64_t r = 0; r < kInt4Rows; ++r) Y[i * W.N + b * kInt4Rows + r] = float_to_bf16(y[i * kInt4Rows + r]);
    }
  });
}

// H = silu(X W1^T) * (X W3^T) with W1, W3 int4 (as `gate_up`), 64 features at a time.
void gate_up_i4(const uint16_t* X, int64_t M, const Int4Matrix& W1, const Int4Matrix& W3, uint16_t* H) {
  const int64_t F = W1.N;
  const std::vector<Vector> xs = fixed_rows(X, M, W1.K, Format::kInt4, W1.group);
  parallel(0, F / kInt4Rows, 1, [&](int64_t b0, int64_t b1) {
    std::vector<int64_t> q(W1.group * 8);
    std::vector<float> y1(M * kInt4Rows), y3(M * kInt4Rows);
    for (int64_t b = b0; b < b1; ++b) {
      std::fill(y1.begin(), y1.end(), 0.0f);
      std::fill(y3.begin(), y3.end(), 0.0f);
      block_rows_i4(W1, b, xs, reinterpret_cast<__m256i*>(q.data()), y1.data());
      block_rows_i4(W3, b, xs, reinterpret_cast<__m256i*>(q.data()), y3.data());
      for (int64_t i = 0; i < M; ++i)
        for (int64_t c = 0; c < kInt4Rows; c += 16)
          silu_mul16(y1.data() + i * kInt4Rows + c, y3.data() + i * kInt4Rows + c, H + i * F + b * kInt4Rows + c);
    }
  });
}

// int8 products of a few rows on AVX2, for the same reason: the GEMV's exact integer sums (`dot_i8`) for 4 rows of
// W and 3 rows of X at a time (12 accumulators; each 16 weights sign-extended once for the 3 rows of X), so each
// row of the result is bit for bit `gemv_int8`'s; W is read once for all rows.
constexpr int kInt8Tile = 4;  // rows of W per tile

// d[i][j] = sum_k Q[j][k] * x_i[k] (x_i in fixed point) for the 4 rows of Q [4, K] and NR rows of X.
template <int NR>
void tile_i8(const int8_t* Q, int64_t K, const Vector* xs, int64_t (*d)[kInt8Tile]) {
  // Each lane takes one pair of products (< 2^22) per 16 columns: kFlush columns (< 2^30) before the lanes are
  // added into int64.
  constexpr int64_t kFlush = 4096;
  const int64_t K16 = K / 16 * 16;
  const int16_t* x[NR];
  for (int i = 0; i < NR; ++i) x[i] = xs[i].fixed.v.data();
  for (int i = 0; i < NR; ++i)
    for (int j = 0; j < kInt8Tile; ++j) d[i][j] = 0;
  for (int64_t k0 = 0; k0 < K16; k0 += kFlush) {
    const int64_t k1 = std::min(K16, k0 + kFlush);
    __m256i acc[NR][kInt8Tile];
    for (int i = 0; i < NR; ++i)
      for (int j = 0; j < kInt8Tile; ++j) acc[i][j] = _mm256_setzero_si256();
    for (int64_t k = k0; k < k1; k += 16) {
      __m256i xv[NR];
      for (int i = 0; i < NR; ++i) xv[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[i] + k));
      for (int j = 0; j < kInt8Tile; ++j) {
        const __m256i w = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(Q + j * K + k)));
        for (int i = 0; i < NR; ++i) acc[i][j] = _mm256_add_epi32(acc[i][j], _mm256_madd_epi16(w, xv[i]));
      }
    }
    for (int i = 0; i < NR; ++i)
      for (int j = 0; j < kInt8Tile; ++j) {
        alignas(32) int32_t lanes[8];
        _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), acc[i][j]);
        for (const int32_t l : lanes) d[i][j] += l;
      }
  }
  for (int i = 0; i < NR; ++i)
    for (int j = 0; j < kInt8Tile; ++j)
      for (int64_t k = K16; k < K; ++k) d[i][j] += static_cast<int64_t>(Q[j * K + k]) * x[i][k];
}

// y[i * stride + j] (i < M, j < 4) = row r + j of Q [N, K] (scales `scale`) times row i of X (`xs`), in float32 as
// `dot_rows_i8`.
void tile_rows_i8(const int8_t* Q, const uint16_t* scale, int64_t K, int64_t r, const std::vector<Vector>& xs,
                  float* y, int64_t stride) {
  const int64_t M = static_cast<int64_t>(xs.size());
  int64_t d[3][kInt8Tile];
  auto put = [&](int n, int64_t i0) {
    for (int i = 0; i < n; ++i)
      for (int j = 0; j < kInt8Tile; ++j)
        y[(i0 + i) * stride + j] =
            static_cast<float>(static_cast<double>(d[i][j]) * xs[i0 + i].fixed.step * bf16_to_float(scale[r + j]));
  };
  int64_t i = 0;
  for (; i + 3 <= M; i += 3) {
    tile_i8<3>(Q + r * K, K, xs.data() + i, d);
    put(3, i);
  }
  if (M - i == 2) tile_i8<2>(Q + r * K, K, xs.data() + i, d);
  if (M - i == 1) tile_i8<1>(Q + r * K, K, xs.data() + i, d);
  put(static_cast<int>(M - i), i);
}

// Y [M, N] = X Q^T * scale, each row as `gemv_int8` computes it; the tiles split over the threads, the last N % 4
// rows of W by the GEMV's own loop.
void gemm_i8(const uint16_t* X, int64_t M, const int8_t* Q, const uint16_t* scale, int64_t N, int64_t K,
             uint16_t* Y) {
  const std::vector<Vector> xs = fixed_rows(X, M, K, Format::kInt8);
  parallel(0, N / kInt8Tile, 4, [&](int64_t t0, int64_t t1) {
    std::vector<float> y(M * kInt8Tile);
    for (int64_t t = t0; t < t1; ++t) {
      tile_rows_i8(Q, scale, K, t * kInt8Tile, xs, y.data(), kInt8Tile);
      for (int64_t i = 0; i < M; ++i)
        for (int j = 0; j < kInt8Tile; ++j) Y[i * N + t * kInt8Tile + j] = float_to_bf16(y[i * kInt8Tile + j]);
    }
  });
  const int64_t r0 = N / kInt8Tile * kInt8Tile;
  if (r0 == N) return;
  std::vector<float> y(N);
  for (int64_t i = 0; i < M; ++i) {
    dot_rows_i8(Q, scale, xs[i].fixed, y.data(), r0, N, K);
    for (int64_t r = r0; r < N; ++r) Y[i * N + r] = float_to_bf16(y[r]);
  }
}

// H = silu(X W1^T) * (X W3^T) with int8 W1, W3 [F, K] (as `gate_up`), 16 features at a time.
void gate_up_i8(const uint16_t* X, int64_t M, const int8_t* Q1, const uint16_t* s1, const int8_t* Q3,
                const uint16_t* s3, int64_t F, int64_t K, uint16_t* H) {
  constexpr int64_t kBlock = 16;
  const std::vector<Vector> xs = fixed_rows(X, M, K, Format::kInt8);
  parallel(0, F / kBlock, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> y1(M * kBlock), y3(M * kBlock);
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t c = 0; c < kBlock; c += kInt8Tile) {
        tile_rows_i8(Q1, s1, K, b * kBlock + c, xs, y1.data() + c, kBlock);
        tile_rows_i8(Q3, s3, K, b * kBlock + c, xs, y3.data() + c, kBlock);
      }
      for (int64_t i = 0; i < M; ++i)
        silu_mul16(y1.data() + i * kBlock, y3.data() + i * kBlock, H + i * F + b * kBlock);
    }
  });
}
#endif

const uint16_t* bf16_data(const torch::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr()); }
uint16_t* bf16_out(torch::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr()); }

void check_weight(const torch::Tensor& w, const char* name, int64_t dims) {
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == torch::kBFloat16 && w.is_contiguous() && w.dim() == dims,
              name, " must be a contiguous bfloat16 CPU tensor with ", dims, " dims, got ", w.sizes(), " ",
              w.scalar_type());
}

void check_int8(const torch::Tensor& q, const torch::Tensor& scale, int64_t dims) {
  TORCH_CHECK(q.device().is_cpu() && q.scalar_type() == torch::kChar && q.is_contiguous() && q.dim() == dims,
              "int8 weights must be a contiguous int8 CPU tensor with ", dims, " dims, got ", q.sizes(), " ",
              q.scalar_type());
  check_weight(scale, "scale", dims - 1);
  TORCH_CHECK(scale.sizes() == q.sizes().slice(0, dims - 1), "scales ", scale.sizes(), " for int8 weights ", q.sizes());
}

void check_swiglu_shapes(const torch::Tensor& x, at::IntArrayRef w1, at::IntArrayRef w2, at::IntArrayRef w3) {
  const int64_t D = x.size(1), F = w1[0];
  TORCH_CHECK(w1 == w3 && w1[1] == D && w2[0] == D && w2[1] == F && D % kStep == 0 && F % kStep == 0, "swiglu: x ",
              x.sizes(), ", w1 ", w1, ", w2 ", w2, " and w3 ", w3,
              " need w1 and w3 [F, D], w2 [D, F] for x [M, D], D and F multiples of 32");
}

// int4 weights of `dims` dims (a matrix: 3, [N / 64, K / group, group bytes]; a stack of experts: 4).
void check_int4(const torch::Tensor& w, int64_t dims, int64_t group) {
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == torch::kByte && w.is_contiguous() && w.dim() == dims,
              "int4 weights must be a contiguous uint8 CPU tensor [..., N / 64, K / group, group * 32 + 256] with ",
              dims, " dims, got ", w.sizes(), " ", w.scalar_type());
  TORCH_CHECK(group > 0 && group % 16 == 0 && w.size(-1) == int4_group_bytes(group), "int4 weights ", w.sizes(),
              " do not fit the group size ", group, " (a multiple of 16, with ", int4_group_bytes(group),
              " bytes per group of a block)");
}

// The rows and columns (N, K) of int4 weights (a matrix, or each matrix of a stack).
std::pair<int64_t, int64_t> int4_shape(const torch::Tensor& w, int64_t group) {
  return {w.size(-3) * kInt4Rows, w.size(-2) * group};
}

// The format of a weight given to an op as its tensors: [W] bf16; [Q, scale] int8; [blocks] (uint8) int4.
Format format_of(const std::vector<torch::Tensor>& ts, const char* name) {
  TORCH_CHECK(ts.size() == 1 || ts.size() == 2, name,
              ": one tensor (bf16 weights or int4 blocks) or two (int8 weights and scales), got ", ts.size());
  if (ts.size() == 2) return Format::kInt8;
  return ts[0].scalar_type() == torch::kByte ? Format::kInt4 : Format::kBF16;
}

// Checks a weight of `dims` dims (a matrix: 2; a stack of experts: 3) and its scales against its format.
void check_format(Format format, const torch::Tensor& w, const torch::Tensor* sc, int64_t dims, int64_t group,
                  const char* name) {
  if (format == Format::kBF16)
    check_weight(w, name, dims);
  else if (format == Format::kInt8)
    check_int8(w, *sc, dims);
  else
    check_int4(w, dims + 1, group);
}

// A matrix given to an op as its tensors (see `format_of`): bf16 [N, K], int8 [N, K] or int4 blocks.
Weights matrix(const std::vector<torch::Tensor>& ts, int64_t group, const char* name) {
  const Format format = format_of(ts, name);
  check_format(format, ts[0], ts.size() > 1 ? &ts[1] : nullptr, 2, group, name);
  const int64_t N = ts[0].size(0), K = ts[0].size(1);
  switch (format) {
    case Format::kBF16:
      return Weights{format, ts[0].data_ptr(), nullptr, N, K, 0};
    case Format::kInt8:
      return Weights{format, ts[0].data_ptr(), bf16_data(ts[1]), N, K, 0};
    default: {
      const auto [n, k] = int4_shape(ts[0], group);
      return Weights{format, ts[0].data_ptr(), nullptr, n, k, group};
    }
  }
}

// [W_0; W_1; ...] x for matrices of one format and K columns, their row blocks split over the threads together
// (one parallel region for e.g. wq, wk and wv); out [sum N_i] bf16, each output rounded once.
void project(const std::vector<Weights>& Ws, const Vector& x, uint16_t* out) {
  std::vector<int64_t> first_block{0}, offset{0};  // where each matrix starts: block index, output row
  for (const auto& W : Ws) {
    first_block.push_back(first_block.back() + (W.N + W.block() - 1) / W.block());
    offset.push_back(offset.back() + W.N);
  }
  std::vector<float> y(offset.back());
  parallel(0, first_block.back(), 1, [&](int64_t b0, int64_t b1) {
    for (size_t m = 0; m < Ws.size(); ++m) {  // the part of [b0, b1) inside matrix m
      const int64_t lo = std::max(b0, first_block[m]) - first_block[m];
      const int64_t hi = std::min(b1, first_block[m + 1]) - first_block[m];
      if (lo >= hi) continue;
      const int64_t block = Ws[m].block(), r0 = lo * block, r1 = std::min(Ws[m].N, hi * block);
      float* ym = y.data() + offset[m];
      dot_any(Ws[m], x, ym, r0, r1);
      for (int64_t r = r0; r < r1; ++r) out[offset[m] + r] = float_to_bf16(ym[r]);
    }
  });
}

// RMSNorm of one bf16 row as `model.RMSNorm` computes it: x / sqrt(mean(x^2) + eps) in float32, rounded to bf16,
// times the bf16 weight (the product rounded to bf16).
void rms_row(const uint16_t* x, const uint16_t* w, int64_t D, float eps, uint16_t* out) {
  float ss = 0.0f;
  for (int64_t i = 0; i < D; ++i) ss += bf16_to_float(x[i]) * bf16_to_float(x[i]);
  const float inv = 1.0f / std::sqrt(ss / static_cast<float>(D) + eps);
  for (int64_t i = 0; i < D; ++i) out[i] = float_to_bf16(bf16_to_float(w[i]) * round_bf16(bf16_to_float(x[i]) * inv));
}

// N query heads (q: N rows of d, one after another) that share a key/value head, over S cached keys and values
// (rows `k_stride` and `v_stride` elements apart): scores q.k (bf16 products, float32 sums) times `scale`, softmax
// and the weighted sum of values in float32, rounded to bf16 once; out: N rows of d. Each key and value row is read
// once for the N heads (grouped-query attention), and the value sums stay in registers. `allowed[s]` false: slot s
// is not attended to; a head with no slot allowed gives zeros. score [N * S] is scratch.
template <int N>
void attend_heads(const uint16_t* q, const uint16_t* k, const uint16_t* v, int64_t k_stride, int64_t v_stride,
                  const bool* allowed, int64_t S, int64_t d, float scale, float* score, uint16_t* out) {
  // 1. scores, and each head's largest
  float top[N];
  std::fill(top, top + N, -INFINITY);
  for (int64_t s = 0; s < S; ++s) {
    if (!allowed[s]) continue;
    V16 dot[4] = {v_zero(), v_zero(), v_zero(), v_zero()};
    for (int64_t c = 0; c < d; c += kStep) {
      const Bf16x32 kc = bf16x32(k + s * k_stride + c);
      for (int j = 0; j < N; ++j) dot[j] = dp(dot[j], kc, bf16x32(q + j * d + c));
    }
    alignas(16) float sums[4];
    _mm_store_ps(sums, reduce4(dot[0], dot[1], dot[2], dot[3]));
    for (int j = 0; j < N; ++j) {
      score[j * S + s] = sums[j] * scale;
      top[j] = std::max(top[j], score[j * S + s]);
    }
  }
  // 2. score -> e^(score - top), 0 where not allowed (and for a head without a top), 16 slots at a time
  float inv[N];
  for (int j = 0; j < N; ++j) {
    float* sc = score + j * S;
    if (!(top[j] > -INFINITY)) {
      std::fill(sc, sc + S, 0.0f);
      inv[j] = 0.0f;
      continue;
    }
    const V16 t = v_set1(top[j]);
    V16 total = v_zero();
    for (int64_t s = 0; s < S; s += 16) {
      const V16 e = v_keep_allowed(exp16(v_load_first(sc + s, S - s) - t), allowed + s, S - s);
      v_store_first(sc + s, S - s, e);
      total = total + e;
    }
    const float sum = v_sum(total);
    inv[j] = sum > 0.0f ? 1.0f / sum : 0.0f;
  }
  // 3. the weighted sums of values, 16 columns at a time for the N heads
  for (int64_t c = 0; c < d; c += 16) {
    V16 acc[N];
    for (int j = 0; j < N; ++j) acc[j] = v_zero();
    for (int64_t s = 0; s < S; ++s) {
      if (!allowed[s]) continue;
      const V16 x = v_from_bf16(v + s * v_stride + c);
      for (int j = 0; j < N; ++j) acc[j] = v_fmadd(v_set1(score[j * S + s]), x, acc[j]);
    }
    for (int j = 0; j < N; ++j) {
      alignas(64) float o[16];
      v_store(o, acc[j] * v_set1(inv[j]));
      for (int i = 0; i < 16; ++i) out[j * d + c + i] = float_to_bf16(o[i]);
    }
  }
}

constexpr int64_t kHeadsAtOnce = 4;

// Attention of one query row for the query heads [h0, h0 + n) (n <= kHeadsAtOnce) of one key/value head; q and out
// point at head h0; score [kHeadsAtOnce * S] scratch (see `attend_heads`).
void attend(const uint16_t* q, int64_t n, const uint16_t* k, const uint16_t* v, int64_t k_stride, int64_t v_stride,
            const bool* allowed, int64_t S, int64_t d, float scale, float* score, uint16_t* out) {
  switch (n) {
    case 4: return attend_heads<4>(q, k, v, k_stride, v_stride, allowed, S, d, scale, score, out);
    case 3: return attend_heads<3>(q, k, v, k_stride, v_stride, allowed, S, d, scale, score, out);
    case 2: return attend_heads<2>(q, k, v, k_stride, v_stride, allowed, S, d, scale, score, out);
    default: return attend_heads<1>(q, k, v, k_stride, v_stride, allowed, S, d, scale, score, out);
  }
}

// A stack of E matrices [E, N, K] (the experts' w1, w2 or w3) in one format; `(e)` is expert e's matrix.
struct Stack {
  Format format;
  const torch::Tensor& w;   // bf16 [E, N, K], int8 [E, N, K] or int4 blocks [E, N / 64, K / group, group bytes]
  const torch::Tensor* sc;  // int8 scales [E, N]; null otherwise
  int64_t group;

  // From an op's tensors (see `format_of`).
  static Stack of(const std::vector<torch::Tensor>& ts, int64_t group, const char* name) {
    const Format format = format_of(ts, name);
    return Stack{format, ts[0], ts.size() > 1 ? &ts[1] : nullptr, format == Format::kInt4 ? group : 0};
  }
  void check(const char* name) const { check_format(format, w, sc, 3, group, name); }
  int64_t N() const { return format == Format::kInt4 ? int4_shape(w, group).first : w.size(1); }
  int64_t K() const { return format == Format::kInt4 ? int4_shape(w, group).second : w.size(2); }
  Weights operator()(int64_t e) const {
    const int64_t n = N(), k = K();
    switch (format) {
      case Format::kBF16:
        return Weights{format, bf16_data(w) + e * n * k, nullptr, n, k, 0};
      case Format::kInt8:
        return Weights{format, static_cast<const int8_t*>(w.data_ptr()) + e * n * k, bf16_data(*sc) + e * n, n, k, 0};
      default:
        return Weights{format, static_cast<const uint8_t*>(w.data_ptr()) + e * w.stride(0), nullptr, n, k, group};
    }
  }
};

// Checks that w1, w3 [E, F, D] and w2 [E, D, F] fit together and D and F are multiples of 32.
void check_experts(const Stack& w1, const Stack& w2, const Stack& w3, int64_t D) {
  w1.check("w1");
  w2.check("w2");
  w3.check("w3");
  const int64_t E = w1.w.size(0), F = w1.N();
  TORCH_CHECK(w2.format == w1.format && w3.format == w1.format && w3.w.sizes() == w1.w.sizes() &&
                  w2.w.size(0) == E && w1.K() == D && w2.N() == D && w2.K() == F,
              "experts: w1 ", w1.w.sizes(), ", w2 ", w2.w.sizes(), " and w3 ", w3.w.sizes(),
              " do not fit together and with x of ", D, " elements");
  TORCH_CHECK(D % kStep == 0 && F % kStep == 0, "experts: dim ", D, " and hidden dim ", F, " must be multiples of 32");
}

// One token through its k chosen experts: out = sum_j wt[j] * w2[e_j] (silu(w1[e_j] x) * (w3[e_j] x)), bf16 [D].
void experts_row(const uint16_t* x, const Stack& w1, const Stack& w2, const Stack& w3, const float* wt,
                 const int64_t* ids, int64_t k, uint16_t* out) {
  const int64_t F = w1.N(), D = w1.K(), E = w1.w.size(0);
  for (int64_t j = 0; j < k; ++j)
    TORCH_CHECK(ids[j] >= 0 && ids[j] < E, "experts: expert id ", ids[j], " is out of range for ", E, " experts");
  // Two parallel regions for all k experts (a region per product would cost a thread barrier each):
  // 1. w1 x and w3 x of every chosen expert, row blocks split over the threads, then h = silu(w1 x) * (w3 x)
  //    with moe.swiglu's bf16 roundings (w1 x, silu, w3 x, the product);
  std::vector<float> h1(k * F), h3(k * F), acc(D, 0.0f);
  std::vector<uint16_t> h(k * F);
  const Vector xv(x, D, w1.format, w1.group);
  const int64_t up_block = w1(0).block(), up_blocks = (F + up_block - 1) / up_block;
  parallel(0, k * up_blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t j = b0 / up_blocks; j < k && j * up_blocks < b1; ++j) {  // the experts this range touches
      const int64_t r0 = std::max(b0 - j * up_blocks, int64_t{0}) * up_block;
      const int64_t r1 = std::min(F, (b1 - j * up_blocks) * up_block);
      dot_any(w1(ids[j]), xv, h1.data() + j * F, r0, r1);
      dot_any(w3(ids[j]), xv, h3.data() + j * F, r0, r1);
      for (int64_t r = j * F + r0; r < j * F + r1; ++r) {
        const float g = round_bf16(h1[r]);
        const float s = round_bf16(g / (1.0f + std::exp(-g)));
        h[r] = float_to_bf16(s * round_bf16(h3[r]));
      }
    }
  });
  // 2. w2 h of every chosen expert, output rows split over the threads; each row's k results rounded to bf16,
  //    weighted and summed in float32 in expert order (as experts_decode does).
  std::vector<Vector> hv;
  for (int64_t j = 0; j < k; ++j) hv.emplace_back(h.data() + j * F, F, w2.format, w2.group);
  std::vector<float> y(k * D);
  const int64_t down_block = w2(0).block();
  parallel(0, (D + down_block - 1) / down_block, 1, [&](int64_t b0, int64_t b1) {
    const int64_t r0 = b0 * down_block, r1 = std::min(D, b1 * down_block);
    for (int64_t j = 0; j < k; ++j) {
      float* yj = y.data() + j * D;
      dot_any(w2(ids[j]), hv[j], yj, r0, r1);
      for (int64_t r = r0; r < r1; ++r) acc[r] += round_bf16(yj[r]) * wt[j];
    }
  });
  for (int64_t r = 0; r < D; ++r) out[r] = float_to_bf16(acc[r]);
}

// `rope.apply_rope` on one head of d elements, in place: x * cos + rotate_half(x) * sin with bf16 roundings after
// each product and the sum, as the eager bf16 ops round.
void rope_head(uint16_t* x, const uint16_t* cos, const uint16_t* sin, int64_t d) {
  const int64_t half = d / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float a = bf16_to_float(x[i]), b = bf16_to_float(x[i + half]);
    x[i] = float_to_bf16(round_bf16(a * bf16_to_float(cos[i])) + round_bf16(-b * bf16_to_float(sin[i])));
    x[i + half] =
        float_to_bf16(round_bf16(b * bf16_to_float(cos[i + half])) + round_bf16(a * bf16_to_float(sin[i + half])));
  }
}

}  // namespace

// W [N, K] @ x [K] -> [N], bf16 (float32 accumulation, rounded once). K must be a multiple of 32.
torch::Tensor gemv(const torch::Tensor& W, const torch::Tensor& x) {
  check_weight(W, "W", 2);
  check_weight(x, "x", 1);
  const int64_t N = W.size(0), K = W.size(1);
  TORCH_CHECK(x.size(0) == K && K % kStep == 0, "gemv: W ", W.sizes(), " and x ", x.sizes(),
              " need x of W's columns, a multiple of 32");
  auto out = torch::empty({N}, x.options());
  project({matrix({W}, 0, "W")}, Vector(bf16_data(x), K, Format::kBF16), bf16_out(out));
  return out;
}

// x [M, K] @ W [N, K]^T -> [M, N] bf16 for a handful of rows (see `gemm_tile`); K must be a multiple of 32.
torch::Tensor gemm(const torch::Tensor& x, const torch::Tensor& W) {
  check_weight(W, "W", 2);
  check_weight(x, "x", 2);
  const int64_t M = x.size(0), N = W.size(0), K = W.size(1);
  TORCH_CHECK(x.size(1) == K && K % kStep == 0, "gemm: x ", x.sizes(), " and W ", W.sizes(),
              " need x of W's columns, a multiple of 32");
  auto out = torch::empty({M, N}, x.options());
  if (M > 0) gemm_bf16(bf16_data(x), M, bf16_data(W), N, K, bf16_out(out));
  return out;
}

// One SwiGLU expert on a few rows of x [M, D]: up(x, M, h) writes h [M, F] = silu(w1 x) * (w3 x), then
// down(h, M, out) its down projection; -> [M, D] bf16.
template <class Up, class Down>
torch::Tensor swiglu_rows(const torch::Tensor& x, int64_t F, const Up& up, const Down& down) {
  const int64_t M = x.size(0);
  auto h = torch::empty({M, F}, x.options());
  auto out = torch::empty({M, x.size(1)}, x.options());
  if (M > 0) {
    up(bf16_data(x), M, bf16_out(h));
    down(bf16_data(h), M, bf16_out(out));
  }
  return out;
}

// The same with W's rows as `gemm_rows` and `gate_up` read them (bf16 as stored, int8 dequantized).
template <class Rows>
torch::Tensor swiglu_rows(const torch::Tensor& x, const Rows& w1, const Rows& w2, const Rows& w3, int64_t F) {
  const int64_t D = x.size(1);
  return swiglu_rows(
      x, F, [&](const uint16_t* X, int64_t M, uint16_t* H) { gate_up(X, M, w1, w3, F, D, H); },
      [&](const uint16_t* H, int64_t M, uint16_t* Y) { gemm_rows(H, M, w2, D, F, Y); });
}

// One SwiGLU expert on a few rows: w2 (silu(w1 x) * (w3 x)) for x [M, D], w1 and w3 [F, D], w2 [D, F] -> [M, D]
// bf16, with moe.swiglu's roundings (see `gate_up`); D and F multiples of 32.
torch::Tensor swiglu(const torch::Tensor& x, const torch::Tensor& w1, const torch::Tensor& w2,
                     const torch::Tensor& w3) {
  check_weight(x, "x", 2);
  check_weight(w1, "w1", 2);
  check_weight(w2, "w2", 2);
  check_weight(w3, "w3", 2);
  check_swiglu_shapes(x, w1.sizes(), w2.sizes(), w3.sizes());
  const int64_t D = x.size(1), F = w1.size(0);
  return swiglu_rows(x, Bf16Rows{bf16_data(w1), D}, Bf16Rows{bf16_data(w2), F}, Bf16Rows{bf16_data(w3), D}, F);
}

// The same with int8 weights (q [F, D] / [D, F] int8, scales [F] / [D] bf16): the expert
// QuantizedView.dequantize's weights would give, reading the int8 bytes (see `Int8Rows`).
torch::Tensor swiglu_int8(const torch::Tensor& x, const torch::Tensor& q1, const torch::Tensor& s1,
                          const torch::Tensor& q2, const torch::Tensor& s2, const torch::Tensor& q3,
                          const torch::Tensor& s3) {
  check_weight(x, "x", 2);
  check_int8(q1, s1, 2);
  check_int8(q2, s2, 2);
  check_int8(q3, s3, 2);
  check_swiglu_shapes(x, q1.sizes(), q2.sizes(), q3.sizes());
  const int64_t D = x.size(1), F = q1.size(0);
#if MIXTRAL_AVX512
  auto rows = [](const torch::Tensor& q, const torch::Tensor& s, int64_t K) {
    return Int8Rows{q.data_ptr<int8_t>(), bf16_data(s), K};
  };
  return swiglu_rows(x, rows(q1, s1, D), rows(q2, s2, F), rows(q3, s3, D), F);
#else
  const int8_t *p1 = q1.data_ptr<int8_t>(), *p2 = q2.data_ptr<int8_t>(), *p3 = q3.data_ptr<int8_t>();
  const uint16_t *c1 = bf16_data(s1), *c2 = bf16_data(s2), *c3 = bf16_data(s3);
  return swiglu_rows(
      x, F, [&](const uint16_t* X, int64_t M, uint16_t* H) { gate_up_i8(X, M, p1, c1, p3, c3, F, D, H); },
      [&](const uint16_t* H, int64_t M, uint16_t* Y) { gemm_i8(H, M, p2, c2, D, F, Y); });
#endif
}

// The same with int4 weights (blocks as `dot_blocks_i4` reads them): each product as the GEMV computes it, on
// unrounded weights and x in fixed point (`Int4Input`: 15 bits on AVX-512, int8 per group on AVX2; `block_rows_i4`).
torch::Tensor swiglu_int4(const torch::Tensor& x, const torch::Tensor& b1, const torch::Tensor& b2,
                          const torch::Tensor& b3, int64_t group) {
  check_weight(x, "x", 2);
  for (const auto* b : {&b1, &b2, &b3}) check_int4(*b, 3, group);
  auto shape = [group](const torch::Tensor& b) {
    const auto [N, K] = int4_shape(b, group);
    return std::vector<int64_t>{N, K};
  };
  check_swiglu_shapes(x, shape(b1), shape(b2), shape(b3));
  auto matrix = [group](const torch::Tensor& b) {
    const auto [N, K] = int4_shape(b, group);
    return Int4Matrix{b.data_ptr<uint8_t>(), N, K, group};
  };
  const Int4Matrix w1 = matrix(b1), w2 = matrix(b2), w3 = matrix(b3);
  return swiglu_rows(
      x, w1.N, [&](const uint16_t* X, int64_t M, uint16_t* H) { gate_up_i4(X, M, w1, w3, H); },
      [&](const uint16_t* H, int64_t M, uint16_t* Y) { gemm_i4(H, M, w2, Y); });
}

// x [M, K] @ W^T -> [M, N] bf16 for a few rows, W int8 [N, K] with bf16 scales [N]: the product with the weight
// QuantizedView.dequantize gives (bit for bit `gemm` on it), reading the int8 bytes (see `Int8Rows`).
torch::Tensor gemm_int8(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scale) {
  check_weight(x, "x", 2);
  check_int8(q, scale, 2);
  const int64_t M = x.size(0), N = q.size(0), K = q.size(1);
  TORCH_CHECK(x.size(1) == K && K % kStep == 0, "gemm_int8: x ", x.sizes(), " and weights ", q.sizes(),
              " need x of the weights' columns, a multiple of 32");
  auto out = torch::empty({M, N}, x.options());
#if MIXTRAL_AVX512
  if (M > 0) gemm_rows(bf16_data(x), M, Int8Rows{q.data_ptr<int8_t>(), bf16_data(scale), K}, N, K, bf16_out(out));
#else
  if (M > 0) gemm_i8(bf16_data(x), M, q.data_ptr<int8_t>(), bf16_data(scale), N, K, bf16_out(out));
#endif
  return out;
}

// The same for int4 weights: each row bit for bit `gemv_int4`'s (see `block_rows_i4`).
torch::Tensor gemm_int4(const torch::Tensor& x, const torch::Tensor& blocks, int64_t group) {
  check_weight(x, "x", 2);
  check_int4(blocks, 3, group);
  const auto [N, K] = int4_shape(blocks, group);
  const int64_t M = x.size(0);
  TORCH_CHECK(x.size(1) == K, "gemm_int4: x ", x.sizes(), " and weights of ", K, " columns");
  auto out = torch::empty({M, N}, x.options());
  const Int4Matrix W{blocks.data_ptr<uint8_t>(), N, K, group};
  if (M > 0) gemm_i4(bf16_data(x), M, W, bf16_out(out));
  return out;
}

// W x for x [K] -> [N], or for x [M, K] -> [M, N]: int8 and int4 read W once for all rows (`gemm_i8`, `gemm_i4`),
// each row's result as alone; bf16 one row after another, each reading W again.
torch::Tensor gemv_rows(const Weights& W, const torch::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 1 || x.dim() == 2, name, ": x must be [K] or [M, K], got ", x.sizes());
  check_weight(x, "x", x.dim());
  TORCH_CHECK(x.size(-1) == W.K, name, ": weights of ", W.K, " columns and x ", x.sizes());
  const int64_t M = x.dim() == 1 ? 1 : x.size(0);
  auto out = x.dim() == 1 ? torch::empty({W.N}, x.options()) : torch::empty({M, W.N}, x.options());
  if (W.format == Format::kInt8 && M > 1) {  // the matrix read once for all rows, each row as below
    gemm_i8(bf16_data(x), M, static_cast<const int8_t*>(W.data), W.scale, W.N, W.K, bf16_out(out));
    return out;
  }
  if (W.format == Format::kInt4 && M > 1) {
    gemm_i4(bf16_data(x), M, Int4Matrix{static_cast<const uint8_t*>(W.data), W.N, W.K, W.group}, bf16_out(out));
    return out;
  }
  for (int64_t i = 0; i < M; ++i)
    project({W}, Vector(bf16_data(x) + i * W.K, W.K, W.format, W.group), bf16_out(out) + i * W.N);
  return out;
}

// int8 weight-only: (Q [N, K] @ x [K]) * scale [N] -> [N] bf16, the function torch._weight_int8pack_mm computes
// (with x in 15-bit fixed point, see `Fixed`; rounded once); x [M, K] -> [M, N] (see `gemv_rows`).
torch::Tensor gemv_int8(const torch::Tensor& Q, const torch::Tensor& scale, const torch::Tensor& x) {
  check_int8(Q, scale, 2);  // (not `matrix`: it would take non-int8 weights for another format)
  return gemv_rows(Weights{Format::kInt8, Q.data_ptr(), bf16_data(scale), Q.size(0), Q.size(1), 0}, x, "gemv_int8");
}

// int4 weight-only: the int4 matrix `blocks` [N / 64, K / group, group * 32 + 256] (see `dot_blocks_i4`) times x
// [K] -> [N] bf16, the function torch._weight_int4pack_mm_for_cpu computes on the same numbers (x in fixed point,
// see `Fixed`; on AVX2 x in int8 per group, see `Int4Input`); x [M, K] -> [M, N] (see `gemv_rows`).
torch::Tensor gemv_int4(const torch::Tensor& blocks, const torch::Tensor& x, int64_t group) {
  check_int4(blocks, 3, group);  // (not `matrix`: it would take weights of another format)
  const auto [N, K] = int4_shape(blocks, group);
  return gemv_rows(Weights{Format::kInt4, blocks.data_ptr(), nullptr, N, K, group}, x, "gemv_int4");
}

// [W_0; W_1; ...] @ x: one call for several bf16 matrices of K columns (e.g. wq, wk, wv), their rows split over
// the threads together; -> [sum N_i] bf16.
torch::Tensor gemv_cat(const std::vector<torch::Tensor>& Ws, const torch::Tensor& x) {
  check_weight(x, "x", 1);
  const int64_t K = x.size(0);
  TORCH_CHECK(K % kStep == 0, "gemv_cat: x has ", K, " elements, not a multiple of 32");
  std::vector<Weights> ms;
  for (const auto& W : Ws) {
    ms.push_back(matrix({W}, 0, "W"));
    TORCH_CHECK(W.size(1) == K, "gemv_cat: a matrix of ", W.sizes(), " for x of ", K, " elements");
  }
  const int64_t N =
      std::accumulate(ms.begin(), ms.end(), int64_t{0}, [](int64_t n, const Weights& W) { return n + W.N; });
  auto out = torch::empty({N}, x.options());
  project(ms, Vector(bf16_data(x), K, Format::kBF16), bf16_out(out));
  return out;
}

// One token through its k chosen experts: sum_j weights[j] * w2[e_j] (silu(w1[e_j] x) * (w3[e_j] x)).
// x [D] (or [1, D]) bf16; w1, w3 [E, F, D] and w2 [E, D, F] as `Stack`s of one format; weights [k] (or [1, k])
// float32; idx likewise, int64 -> x's shape, bf16.
torch::Tensor experts_any(const torch::Tensor& x, const Stack& w1, const Stack& w2, const Stack& w3,
                          const torch::Tensor& weights, const torch::Tensor& idx) {
  TORCH_CHECK(x.dim() == 1 || (x.dim() == 2 && x.size(0) == 1), "experts: x must be [D] or [1, D], got ", x.sizes());
  check_weight(x, "x", x.dim());
  check_experts(w1, w2, w3, x.size(-1));
  auto idx64 = idx.to(torch::kLong).contiguous();
  auto wts = weights.to(torch::kFloat).contiguous();
  TORCH_CHECK(idx64.numel() == wts.numel(), "experts: ", idx64.numel(), " ids for ", wts.numel(), " weights");
  auto out = torch::empty(x.sizes(), x.options());
  experts_row(bf16_data(x), w1, w2, w3, wts.data_ptr<float>(), idx64.data_ptr<int64_t>(), idx64.numel(), bf16_out(out));
  return out;
}

torch::Tensor experts(const torch::Tensor& x, const torch::Tensor& w1, const torch::Tensor& w2, const torch::Tensor& w3,
                      const torch::Tensor& weights, const torch::Tensor& idx) {
  return experts_any(x, Stack{Format::kBF16, w1, nullptr, 0}, Stack{Format::kBF16, w2, nullptr, 0},
                     Stack{Format::kBF16, w3, nullptr, 0}, weights, idx);
}

torch::Tensor experts_int8(const torch::Tensor& x, const torch::Tensor& q1, const torch::Tensor& s1,
                           const torch::Tensor& q2, const torch::Tensor& s2, const torch::Tensor& q3,
                           const torch::Tensor& s3, const torch::Tensor& weights, const torch::Tensor& idx) {
  return experts_any(x, Stack{Format::kInt8, q1, &s1, 0}, Stack{Format::kInt8, q2, &s2, 0},
                     Stack{Format::kInt8, q3, &s3, 0}, weights, idx);
}

torch::Tensor experts_int4(const torch::Tensor& x, const torch::Tensor& b1, const torch::Tensor& b2,
                           const torch::Tensor& b3, const torch::Tensor& weights, const torch::Tensor& idx,
                           int64_t group) {
  return experts_any(x, Stack{Format::kInt4, b1, nullptr, group}, Stack{Format::kInt4, b2, nullptr, group},
                     Stack{Format::kInt4, b3, nullptr, group}, weights, idx);
}

// RMSNorm of bf16 rows (see `rms_row`). x [..., D] contiguous, weight [D] -> x's shape.
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  check_weight(weight, "weight", 1);
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kBFloat16 && x.is_contiguous() && x.dim() >= 1 &&
                  x.size(-1) == weight.size(0),
              "rms_norm: x must be contiguous bfloat16 [..., ", weight.size(0), "], got ", x.sizes(), " ",
              x.scalar_type());
  const int64_t D = weight.size(0), rows = D ? x.numel() / D : 0;
  auto out = torch::empty_like(x);
  parallel(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      rms_row(bf16_data(x) + r * D, bf16_data(weight), D, static_cast<float>(eps), bf16_out(out) + r * D);
  });
  return out;
}

// Attention of one new token per sequence over its cached keys and values (decode):
// q [B, H, 1, d] bf16; k, v [B, G, S, d] bf16 (views of the cache: any strides but a contiguous last dim);
// mask [B, 1, 1, S] bool (true: attend) -> [B, H, 1, d] bf16. Query head h reads key/value head h / (H / G).
// PyTorch's CPU flash attention pays ~250 us a call at one query row (its blocking is made for long
// queries); this is a few microseconds per head.
torch::Tensor decode_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                               const torch::Tensor& mask, double scale) {
  for (auto [t, name] : {std::pair{&q, "q"}, std::pair{&k, "k"}, std::pair{&v, "v"}})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == torch::kBFloat16 && t->dim() == 4 && t->stride(3) == 1,
                "decode_attention: ", name,
                " must be a bfloat16 CPU tensor [B, heads, T, d] with contiguous rows, got ", t->sizes(), " ",
                t->scalar_type());
  const int64_t B = q.size(0), H = q.size(1), d = q.size(3), G = k.size(1), S = k.size(2);
  TORCH_CHECK(q.size(2) == 1 && q.is_contiguous(), "decode_attention: q must be contiguous [B, H, 1, d], got ",
              q.sizes());
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == B && k.size(3) == d && G > 0 && H % G == 0 && d % kStep == 0,
              "decode_attention: q ", q.sizes(), ", k ", k.sizes(), ", v ", v.sizes(),
              " do not fit (heads a multiple of key/value heads, head dim a multiple of 32)");
  TORCH_CHECK(mask.scalar_type() == torch::kBool && mask.is_contiguous() && mask.dim() == 4 && mask.size(0) == B &&
                  mask.size(1) == 1 && mask.size(2) == 1 && mask.size(3) == S,
              "decode_attention: mask must be contiguous bool [", B, ", 1, 1, ", S, "], got ", mask.sizes(), " ",
              mask.scalar_type());
  auto out = torch::empty_like(q);
  const bool* allowed = mask.data_ptr<bool>();
  const int64_t R = H / G, chunks = (R + kHeadsAtOnce - 1) / kHeadsAtOnce;  // query heads per key/value head
  parallel(0, B * G * chunks, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> score(kHeadsAtOnce * S);
    for (int64_t i = i0; i < i1; ++i) {  // heads [h0, h0 + n) of row b, all reading key/value head g
      const int64_t b = i / (G * chunks), g = i % (G * chunks) / chunks, h0 = g * R + i % chunks * kHeadsAtOnce;
      attend(bf16_data(q) + (b * H + h0) * d, std::min(kHeadsAtOnce, g * R + R - h0),
             bf16_data(k) + b * k.stride(0) + g * k.stride(1), bf16_data(v) + b * v.stride(0) + g * v.stride(1),
             k.stride(2), v.stride(2), allowed + b * S, S, d, static_cast<float>(scale), score.data(),
             bf16_out(out) + (b * H + h0) * d);
    }
  });
  return out;
}

// One decoder layer for one token of one sequence (decode at batch 1), `model.Block` in one call:
//   h = x + wo attention(rope(wq n), rope(wk n), wv n),  n = attn_norm(x), with k and v written to cache slot `slot`
//       and the attention over slots [0, S) where mask [1, 1, 1, S] allows;
//   out = h + experts(ffn_norm(h)) over the top_k experts of router(ffn_norm(h)) (softmax over the chosen logits).
// The same roundings as the eager bf16 ops and the kernels above; the point is to skip ~40 small PyTorch ops per
// layer, whose dispatch cost ~2-3 ms a token on the 791M benchmark model. Matrices are given as their tensors (see
// `matrix`); cos and sin [d] bf16 for this position; cache_k and cache_v [1, G, slots, d]. -> (out [1, 1, D],
// router logits [1, E]).
std::tuple<torch::Tensor, torch::Tensor> decode_layer(
    const torch::Tensor& x, const torch::Tensor& attn_norm, const torch::Tensor& ffn_norm, double eps,
    const std::vector<torch::Tensor>& wq, const std::vector<torch::Tensor>& wk, const std::vector<torch::Tensor>& wv,
    const std::vector<torch::Tensor>& wo, const torch::Tensor& cos, const torch::Tensor& sin, torch::Tensor& cache_k,
    torch::Tensor& cache_v, int64_t slot, const torch::Tensor& mask, const torch::Tensor& router,
    const std::vector<torch::Tensor>& w1, const std::vector<torch::Tensor>& w2, const std::vector<torch::Tensor>& w3,
    int64_t top_k, int64_t group) {
  check_weight(x, "x", 3);
  const int64_t D = x.size(2);
  TORCH_CHECK(x.size(0) == 1 && x.size(1) == 1, "decode_layer: x must be [1, 1, D], got ", x.sizes());
  check_weight(attn_norm, "attn_norm", 1);
  check_weight(ffn_norm, "ffn_norm", 1);
  check_weight(cos, "cos", 1);
  check_weight(sin, "sin", 1);
  check_weight(cache_k, "cache_k", 4);
  check_weight(cache_v, "cache_v", 4);
  const Weights q = matrix(wq, group, "wq"), k = matrix(wk, group, "wk"), v = matrix(wv, group, "wv");
  const Weights gate = matrix({router}, 0, "router");
  const Weights o = matrix(wo, group, "wo");
  const int64_t d = cos.size(0), G = cache_k.size(1), slots = cache_k.size(2), H = q.N / std::max(d, int64_t{1});
  const int64_t S = mask.size(-1), E = gate.N;
  TORCH_CHECK(attn_norm.size(0) == D && ffn_norm.size(0) == D && sin.size(0) == d && d % kStep == 0 &&
                  q.format == k.format && k.format == v.format && q.K == D && k.K == D && v.K == D && q.N == H * d &&
                  k.N == G * d && v.N == G * d && o.K == H * d && o.N == D && G > 0 && H % G == 0 &&
                  cache_k.sizes() == cache_v.sizes() && cache_k.size(0) == 1 && cache_k.size(3) == d &&
                  gate.K == D && top_k >= 1 && top_k <= E,
              "decode_layer: shapes do not fit: x ", x.sizes(), ", wq/wk/wv/wo ", q.N, "x", q.K, "/", k.N, "x", k.K,
              "/", v.N, "x", v.K, "/", o.N, "x", o.K, ", cos ", cos.sizes(), ", cache ", cache_k.sizes(), ", router ",
              router.sizes(), ", top_k ", top_k);
  TORCH_CHECK(slot >= 0 && slot < slots && S <= slots && mask.scalar_type() == torch::kBool && mask.is_contiguous() &&
                  mask.numel() == S,
              "decode_layer: slot ", slot, " and mask ", mask.sizes(), " for a cache of ", slots, " slots");
  const Stack s1 = Stack::of(w1, group, "w1"), s2 = Stack::of(w2, group, "w2"), s3 = Stack::of(w3, group, "w3");
  check_experts(s1, s2, s3, D);

  const uint16_t* xs = bf16_data(x);
  std::vector<uint16_t> n(D), qkv((H + 2 * G) * d), att(H * d), attn_out(D), f(D), moe(D);
  rms_row(xs, bf16_data(attn_norm), D, static_cast<float>(eps), n.data());
  project({q, k, v}, Vector(n.data(), D, q.format, q.group), qkv.data());
  for (int64_t j = 0; j < H + G; ++j) rope_head(qkv.data() + j * d, bf16_data(cos), bf16_data(sin), d);
  uint16_t *ck = bf16_out(cache_k), *cv = bf16_out(cache_v);
  for (int64_t g = 0; g < G; ++g) {
    std::memcpy(ck + (g * slots + slot) * d, qkv.data() + (H + g) * d, d * sizeof(uint16_t));
    std::memcpy(cv + (g * slots + slot) * d, qkv.data() + (H + G + g) * d, d * sizeof(uint16_t));
  }
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  const int64_t R = H / G, chunks = (R + kHeadsAtOnce - 1) / kHeadsAtOnce;  // query heads per key/value head
  parallel(0, G * chunks, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> score(kHeadsAtOnce * S);
    for (int64_t i = i0; i < i1; ++i) {  // heads [h0, h0 + n), all reading key/value head g
      const int64_t g = i / chunks, h0 = g * R + i % chunks * kHeadsAtOnce, base = g * slots * d;
      attend(qkv.data() + h0 * d, std::min(kHeadsAtOnce, g * R + R - h0), ck + base, cv + base, d, d,
             mask.data_ptr<bool>(), S, d, scale, score.data(), att.data() + h0 * d);
    }
  });
  project({o}, Vector(att.data(), H * d, o.format, o.group), attn_out.data());
  auto out = torch::empty_like(x);
  uint16_t* h = bf16_out(out);  // h first, then out in place
  for (int64_t i = 0; i < D; ++i) h[i] = float_to_bf16(bf16_to_float(xs[i]) + bf16_to_float(attn_out[i]));
  rms_row(h, bf16_data(ffn_norm), D, static_cast<float>(eps), f.data());

  auto logits = torch::empty({1, E}, x.options());
  project({gate}, Vector(f.data(), D, Format::kBF16), bf16_out(logits));
  // top_k of the logits (larger first, ties to the lower id, NaN first as torch.topk puts it), softmax over them in
  // float32 (moe.route)
  std::vector<int64_t> ids(E);
  std::iota(ids.begin(), ids.end(), 0);
  const uint16_t* lg = bf16_data(logits);
  auto key = [&](int64_t e) {
    const float v = bf16_to_float(lg[e]);
    return std::isnan(v) ? INFINITY : v;
  };
  std::stable_sort(ids.begin(), ids.end(), [&](int64_t a, int64_t b) { return key(a) > key(b); });
  std::vector<float> wt(top_k);
  float total = 0.0f;
  for (int64_t j = 0; j < top_k; ++j) total += wt[j] = std::exp(bf16_to_float(lg[ids[j]]) - bf16_to_float(lg[ids[0]]));
  for (int64_t j = 0; j < top_k; ++j) wt[j] /= total;
  experts_row(f.data(), s1, s2, s3, wt.data(), ids.data(), top_k, moe.data());
  for (int64_t i = 0; i < D; ++i) h[i] = float_to_bf16(bf16_to_float(h[i]) + bf16_to_float(moe[i]));
  return {out, logits};
}

// Every layer of the model for one token (decode at batch 1): `decode_layer` for layer 0, 1, ... each taking the
// previous one's output (~40 us a layer of module calls and op dispatch saved). Per-layer arguments come as lists
// over the layers: norms [attn_0, ffn_0, attn_1, ...]; wq, wk, wv, wo, w1, w2, w3 the layers' tensors one after
// another (the same number per layer, see `format_of`); router and the caches one per layer.
// -> (out [1, 1, D], router logits [L, 1, E]).
std::tuple<torch::Tensor, torch::Tensor> decode_layers(
    const torch::Tensor& x, const std::vector<torch::Tensor>& norms, double eps, const std::vector<torch::Tensor>& wq,
    const std::vector<torch::Tensor>& wk, const std::vector<torch::Tensor>& wv, const std::vector<torch::Tensor>& wo,
    const torch::Tensor& cos, const torch::Tensor& sin, const std::vector<torch::Tensor>& cache_k,
    const std::vector<torch::Tensor>& cache_v, int64_t slot, const torch::Tensor& mask,
    const std::vector<torch::Tensor>& router, const std::vector<torch::Tensor>& w1, const std::vector<torch::Tensor>& w2,
    const std::vector<torch::Tensor>& w3, int64_t top_k, int64_t group) {
  const size_t L = cache_k.size();
  bool fits = L > 0 && cache_v.size() == L && norms.size() == 2 * L && router.size() == L;
  for (const auto* ts : {&wq, &wk, &wv, &wo, &w1, &w2, &w3}) fits = fits && L > 0 && ts->size() % L == 0;
  TORCH_CHECK(fits, "decode_layers: per-layer lists do not fit ", L, " layers: norms ", norms.size(), ", wq ",
              wq.size(), ", wk ", wk.size(), ", wv ", wv.size(), ", wo ", wo.size(), ", router ", router.size(),
              ", w1 ", w1.size(), ", w2 ", w2.size(), ", w3 ", w3.size(), ", caches ", cache_k.size(), "/",
              cache_v.size());
  auto part = [L](const std::vector<torch::Tensor>& ts, size_t l) {  // layer l's tensors of a list
    const size_t n = ts.size() / L;
    return std::vector<torch::Tensor>(ts.begin() + l * n, ts.begin() + (l + 1) * n);
  };
  torch::Tensor h = x;
  std::vector<torch::Tensor> logits;
  for (size_t l = 0; l < L; ++l) {
    torch::Tensor ck = cache_k[l], cv = cache_v[l];
    torch::Tensor lg;
    std::tie(h, lg) = decode_layer(h, norms[2 * l], norms[2 * l + 1], eps, part(wq, l), part(wk, l), part(wv, l),
                                   part(wo, l), cos, sin, ck, cv, slot, mask, router[l], part(w1, l), part(w2, l),
                                   part(w3, l), top_k, group);
    logits.push_back(lg);
  }
  return {h, torch::stack(logits)};
}

// A whole decode step of one sequence (batch 1) in one call, `model.Transformer` for one token: the embedding row
// of `token`, the rotary angles of position `pos`, the cache slot and mask, every layer (`decode_layers`), the
// final norm and the LM head. After the layers have streamed their weights through the caches, each small PyTorch
// op in Python costs tens of microseconds (its code and objects come back from memory): ~0.9 ms a step of the
// 791M benchmark model in the ~25 ops this replaces, 15% of an int4 step. The same roundings as the op-by-op code:
//   - cos and sin as `model.rope_cos_sin`: angles float(pos) * inv_freq (float32 [d / 2], `model.rope_inv_freq`)
//     for both halves, ATen's cos and sin in float32, rounded to bf16;
//   - slot and mask as `KVCache` plans them for one token: slot pos % slots, where slot_pos [1, slots] (int64, the
//     position each slot holds, -1 empty) is updated; the attention covers all slots of a rolling buffer, else
//     slots up to the last one in use, and sees a slot holding position p iff 0 <= p <= pos (and pos - window < p
//     for a sliding window; window 0: none);
//   - norms: [attn_0, ffn_0, ..., attn_{L-1}, ffn_{L-1}, final]; head: the LM head's tensors (see `matrix`; for
//     tied embeddings the embedding itself), head_group its int4 group size (0 otherwise).
// -> (logits [1, 1, V], router logits [L, 1, E]).
std::tuple<torch::Tensor, torch::Tensor> decode_token(
    int64_t token, int64_t pos, const torch::Tensor& embed, const torch::Tensor& inv_freq, torch::Tensor& slot_pos,
    int64_t window, bool rolling, const std::vector<torch::Tensor>& norms, double eps,
    const std::vector<torch::Tensor>& wq, const std::vector<torch::Tensor>& wk, const std::vector<torch::Tensor>& wv,
    const std::vector<torch::Tensor>& wo, const std::vector<torch::Tensor>& cache_k,
    const std::vector<torch::Tensor>& cache_v, const std::vector<torch::Tensor>& router,
    const std::vector<torch::Tensor>& w1, const std::vector<torch::Tensor>& w2, const std::vector<torch::Tensor>& w3,
    int64_t top_k, int64_t group, const std::vector<torch::Tensor>& head, int64_t head_group) {
  check_weight(embed, "embed", 2);
  TORCH_CHECK(!norms.empty(), "decode_token: needs the final norm after the layers' norms");
  const torch::Tensor& final_norm = norms.back();
  check_weight(final_norm, "final norm", 1);
  const int64_t V = embed.size(0), D = embed.size(1);
  TORCH_CHECK_INDEX(token >= 0 && token < V, "decode_token: token id ", token, " is outside the vocabulary of ", V,
                    " (valid: 0 to ", V - 1, ")");
  TORCH_CHECK(inv_freq.device().is_cpu() && inv_freq.scalar_type() == torch::kFloat && inv_freq.dim() == 1 &&
                  inv_freq.is_contiguous(),
              "decode_token: inv_freq must be a contiguous float32 CPU vector, got ", inv_freq.sizes(), " ",
              inv_freq.scalar_type());
  TORCH_CHECK(slot_pos.device().is_cpu() && slot_pos.scalar_type() == torch::kLong && slot_pos.dim() == 2 &&
                  slot_pos.size(0) == 1 && slot_pos.size(1) > 0 && slot_pos.is_contiguous(),
              "decode_token: slot_pos must be a contiguous int64 CPU tensor [1, slots], got ", slot_pos.sizes(), " ",
              slot_pos.scalar_type());
  TORCH_CHECK(pos >= 0 && window >= 0 && final_norm.size(0) == D, "decode_token: position ", pos, ", window ", window,
              ", final norm ", final_norm.sizes(), " for embeddings of ", D);

  // rotary angles for both halves, float32, then cos and sin rounded to bf16 (ATen's kernels, as in Python)
  const int64_t half = inv_freq.size(0);
  auto angles = torch::empty({2 * half}, torch::dtype(torch::kFloat));
  const float* inv = inv_freq.data_ptr<float>();
  float* a = angles.data_ptr<float>();
  for (int64_t i = 0; i < half; ++i) a[i] = a[half + i] = static_cast<float>(pos) * inv[i];
  const torch::Tensor cos = angles.cos().to(torch::kBFloat16), sin = angles.sin().to(torch::kBFloat16);

  // the slot this token goes to, and which slots it attends to once it is there
  const int64_t slots = slot_pos.size(1);
  int64_t* sp = slot_pos.data_ptr<int64_t>();
  TORCH_CHECK_VALUE(rolling || pos < slots, "decode_token: position ", pos, " does not fit a cache of ", slots,
                    " positions");
  const int64_t slot = pos % slots;
  sp[slot] = pos;
  const int64_t S = rolling ? slots : std::min(std::max(*std::max_element(sp, sp + slots) + 1, int64_t{1}), slots);
  auto mask = torch::empty({S}, torch::dtype(torch::kBool));
  bool* m = mask.data_ptr<bool>();
  for (int64_t s = 0; s < S; ++s) m[s] = sp[s] >= 0 && sp[s] <= pos && (window == 0 || sp[s] > pos - window);

  const torch::Tensor x = embed[token].reshape({1, 1, D});  // a view: the layers only read it
  const std::vector<torch::Tensor> layer_norms(norms.begin(), norms.end() - 1);
  auto [h, router_logits] = decode_layers(x, layer_norms, eps, wq, wk, wv, wo, cos, sin, cache_k, cache_v, slot, mask,
                                          router, w1, w2, w3, top_k, group);
  std::vector<uint16_t> n(D);
  rms_row(bf16_data(h), bf16_data(final_norm), D, static_cast<float>(eps), n.data());
  const Weights W = matrix(head, head_group, "head");
  TORCH_CHECK(W.K == D, "decode_token: an LM head of ", W.N, " x ", W.K, " for embeddings of ", D);
  auto logits = torch::empty({1, 1, W.N}, embed.options());
  project({W}, Vector(n.data(), D, W.format, W.group), bf16_out(logits));
  return {logits, router_logits};
}

// The grouped MoE's last step (`moe.combine`): out[t] = sum over the pairs p of token t, in order, of
// float32(ys[p]) * weights[p], summed in float32 from 0 and rounded to bf16 once, where the pairs' outputs ys are
// the experts' results one after another (a list of [rows, D] bf16 tensors, as each expert returned it). The same
// products and sums as the PyTorch path (ys.float() * weights, index_add_ in pair order, .to(bf16)), in one pass
// over 64 columns of every pair at a time, without the float32 [pairs, D] copy, the [tokens, D] float32 sums and
// the concatenation of the experts' outputs (~1 ms a layer in a 128-token prefill of the 791M model, most of it
// faulting in the pages of those fresh buffers).
torch::Tensor combine(const std::vector<torch::Tensor>& ys, const torch::Tensor& weights, const torch::Tensor& token_of,
                      int64_t T) {
  TORCH_CHECK(weights.scalar_type() == torch::kFloat && weights.dim() == 1 && weights.is_contiguous() &&
                  token_of.scalar_type() == torch::kLong && token_of.sizes() == weights.sizes() &&
                  token_of.is_contiguous() && weights.device().is_cpu() && token_of.device().is_cpu(),
              "combine: weights must be contiguous float32 [P] and token_of int64 [P] on the CPU, got ",
              weights.sizes(), " ", weights.scalar_type(), " and ", token_of.sizes(), " ", token_of.scalar_type());
  TORCH_CHECK(!ys.empty() && T >= 0, "combine: needs the experts' outputs and a token count >= 0");
  const int64_t D = ys[0].size(-1), P = weights.size(0);
  std::vector<const uint16_t*> row;  // each pair's output row
  row.reserve(P);
  for (const auto& y : ys) {
    TORCH_CHECK(y.device().is_cpu() && y.scalar_type() == torch::kBFloat16 && y.dim() == 2 && y.size(1) == D &&
                    y.is_contiguous(),
                "combine: each expert output must be a contiguous bfloat16 CPU tensor [rows, ", D, "], got ",
                y.sizes(), " ", y.scalar_type());
    for (int64_t i = 0; i < y.size(0); ++i) row.push_back(bf16_data(y) + i * D);
  }
  TORCH_CHECK(static_cast<int64_t>(row.size()) == P, "combine: ", row.size(), " output rows for ", P, " pairs");
  const float* w = weights.data_ptr<float>();
  const int64_t* tok = token_of.data_ptr<int64_t>();
  for (int64_t p = 0; p < P; ++p)
    TORCH_CHECK(tok[p] >= 0 && tok[p] < T, "combine: pair ", p, " names token ", tok[p], " of ", T);
  auto out = torch::empty({T, D}, torch::dtype(torch::kBFloat16));
  uint16_t* o = bf16_out(out);
  constexpr int64_t kCols = 64;
  parallel(0, (D + kCols - 1) / kCols, 1, [&](int64_t c0, int64_t c1) {
    std::vector<float> acc(T * kCols);
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t d0 = c * kCols, n = std::min(kCols, D - d0);
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t p = 0; p < P; ++p) {
        float* a = acc.data() + tok[p] * kCols;
        const uint16_t* y = row[p] + d0;
        const V16 wp = v_set1(w[p]);
        for (int64_t j = 0; j < n; j += 16)  // 16 columns (fewer at the end of a row): a product, then a sum
          v_store_first(a + j, n - j, v_add_product(v_load_first(a + j, n - j), v_from_bf16_first(y + j, n - j), wp));
      }
      for (int64_t t = 0; t < T; ++t)
        for (int64_t j = 0; j < n; ++j) o[t * D + d0 + j] = float_to_bf16(acc[t * kCols + j]);
    }
  });
  return out;
}

// How `parallel` runs regions: mode 3 OpenMP regions that give way to the pool after a stall (the default), 1 the
// pool, 2 the pool without its back-off, 0 OpenMP regions (the reference); chunks per thread, the workers' spin
// before sleeping, a region's wait that counts as a stall and the longest back-off, in microseconds; a negative value
// leaves that one as it is. -> the previous five, then the number of stalls so far.
std::vector<int64_t> set_parallel(int64_t mode, int64_t chunks_per_thread, int64_t spin_us, int64_t stall_us,
                                  int64_t backoff_max_us) {
  std::vector<int64_t> old{pool::g_mode.load(),     pool::g_chunks_per_thread.load(), pool::g_spin_us.load(),
                           pool::g_stall_us.load(), pool::g_backoff_max_us.load(),    pool::g_stalls.load()};
  TORCH_CHECK(mode <= 3 && chunks_per_thread <= 1024 && spin_us <= 1000000 && stall_us <= 1000000 &&
                  backoff_max_us <= 10000000,
              "set_parallel: out of range");
  if (mode >= 0) pool::g_mode.store(static_cast<int>(mode));
  if (chunks_per_thread > 0) pool::g_chunks_per_thread.store(static_cast<int>(chunks_per_thread));
  if (spin_us >= 0) pool::g_spin_us.store(static_cast<int>(spin_us));
  if (stall_us >= 0) pool::g_stall_us.store(static_cast<int>(stall_us));
  if (backoff_max_us >= 0) pool::g_backoff_max_us.store(static_cast<int>(backoff_max_us));
  return old;
}

TORCH_LIBRARY(mixtral_cpu, m) {
  m.def("set_parallel(int mode, int chunks_per_thread, int spin_us, int stall_us, int backoff_max_us) -> int[]",
        &set_parallel);  // no tensor: any key
  m.def("gemv(Tensor W, Tensor x) -> Tensor");
  m.def("gemm(Tensor x, Tensor W) -> Tensor");
  m.def("gemm_int8(Tensor x, Tensor q, Tensor scale) -> Tensor");
  m.def("gemm_int4(Tensor x, Tensor blocks, int group) -> Tensor");
  m.def("swiglu(Tensor x, Tensor w1, Tensor w2, Tensor w3) -> Tensor");
  m.def("swiglu_int8(Tensor x, Tensor q1, Tensor s1, Tensor q2, Tensor s2, Tensor q3, Tensor s3) -> Tensor");
  m.def("swiglu_int4(Tensor x, Tensor b1, Tensor b2, Tensor b3, int group) -> Tensor");
  m.def("gemv_cat(Tensor[] Ws, Tensor x) -> Tensor");
  m.def("combine(Tensor[] ys, Tensor weights, Tensor token_of, int T) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("gemv_int8(Tensor Q, Tensor scale, Tensor x) -> Tensor");
  m.def("gemv_int4(Tensor blocks, Tensor x, int group) -> Tensor");
  m.def("experts(Tensor x, Tensor w1, Tensor w2, Tensor w3, Tensor weights, Tensor idx) -> Tensor");
  m.def(
      "experts_int8(Tensor x, Tensor q1, Tensor s1, Tensor q2, Tensor s2, Tensor q3, Tensor s3, Tensor weights, "
      "Tensor idx) -> Tensor");
  m.def(
      "experts_int4(Tensor x, Tensor b1, Tensor b2, Tensor b3, Tensor weights, Tensor idx, int group) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor mask, float scale) -> Tensor");
  m.def(
      "decode_layer(Tensor x, Tensor attn_norm, Tensor ffn_norm, float eps, Tensor[] wq, Tensor[] wk, Tensor[] wv, "
      "Tensor[] wo, Tensor cos, Tensor sin, Tensor(a!) cache_k, Tensor(b!) cache_v, int slot, Tensor mask, "
      "Tensor router, Tensor[] w1, Tensor[] w2, Tensor[] w3, int top_k, int group) -> (Tensor, Tensor)");
  m.def(
      "decode_token(int token, int pos, Tensor embed, Tensor inv_freq, Tensor(a!) slot_pos, int window, bool rolling, "
      "Tensor[] norms, float eps, Tensor[] wq, Tensor[] wk, Tensor[] wv, Tensor[] wo, Tensor(b!)[] cache_k, "
      "Tensor(c!)[] cache_v, Tensor[] router, Tensor[] w1, Tensor[] w2, Tensor[] w3, int top_k, int group, "
      "Tensor[] head, int head_group) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(mixtral_cpu, CPU, m) {
  m.impl("gemv", &gemv);
  m.impl("gemm", &gemm);
  m.impl("gemm_int8", &gemm_int8);
  m.impl("gemm_int4", &gemm_int4);
  m.impl("swiglu", &swiglu);
  m.impl("swiglu_int8", &swiglu_int8);
  m.impl("swiglu_int4", &swiglu_int4);
  m.impl("gemv_cat", &gemv_cat);
  m.impl("combine", &combine);
  m.impl("rms_norm", &rms_norm);
  m.impl("gemv_int8", &gemv_int8);
  m.impl("gemv_int4", &gemv_int4);
  m.impl("experts", &experts);
  m.impl("experts_int8", &experts_int8);
  m.impl("experts_int4", &experts_int4);
  m.impl("decode_attention", &decode_attention);
  m.impl("decode_token", &decode_token);
  m.impl("decode_layer", &decode_layer);
}
