// Self-test of the emulated CUDA device (no torch): the fiber scheduler with small kernels of its
// own, then every dl_* entry point of kernels.cu (the losses of kernels/losses.def x pass x dtype
// x index width, and dl_finalize_*) against a serial loop over the same element functors (from
// DL_DISPATCH_LOSS), with buffers malloc'ed at exactly their size (AddressSanitizer catches one
// element past the end). Built with device.cpp by scripts/emu-sanitize.sh.
//
//   selftest            run the tests; prints "selftest: N passed, M failed", exits 1 on failure
//   selftest --bench    time a 100-block x 256-thread focal forward (f32)
//   selftest -v         also print every passing check's group
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <functional>
#include <iterator>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "cuda_shim.h"

#include "../dispatch.cuh"

namespace {

// ---------------------------------------------------------------------------------------------
// Checks

int g_pass = 0, g_fail = 0;
bool g_verbose = false;

std::string fmt(const char* f, ...) __attribute__((format(printf, 1, 2)));
std::string fmt(const char* f, ...) {
  char buf[2048];
  va_list ap;
  va_start(ap, f);
  vsnprintf(buf, sizeof buf, f, ap);
  va_end(ap);
  return buf;
}

bool check(bool ok, int line, const std::string& what) {
  if (ok) {
    ++g_pass;
    if (g_verbose) printf("ok   %s\n", what.c_str());
  } else {
    ++g_fail;
    printf("FAIL selftest.cpp:%d: %s\n", line, what.c_str());
    fflush(stdout);
  }
  return ok;
}
#define CHECK(cond, ...) check((cond), __LINE__, fmt(__VA_ARGS__))

struct Res {
  int rc;
  std::string err;
};
template <class P> Res launch(const char* name, uint32_t grid, uint32_t block, const P& p, int flags = 0) {
  char err[1024];
  const int rc = dl_emu_launch(name, grid, block, &p, sizeof(P), flags, err, sizeof err);
  return {rc, rc ? std::string(err) : std::string()};
}
bool contains(const std::string& s, const char* sub) { return s.find(sub) != std::string::npos; }

// A buffer of exactly `bytes` bytes (so that AddressSanitizer flags any access past it).
struct Buf {
  void* p = nullptr;
  size_t bytes = 0;
  Buf() = default;
  explicit Buf(size_t b) : p(malloc(b)), bytes(b) {
    if (!p && b) abort();
  }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
  Buf(Buf&& o) noexcept : p(o.p), bytes(o.bytes) { o.p = nullptr; }
  Buf& operator=(Buf&& o) noexcept {
    std::swap(p, o.p);
    std::swap(bytes, o.bytes);
    return *this;
  }
  ~Buf() { free(p); }
  template <class T> T* as() const { return static_cast<T*>(p); }
  uint64_t addr() const { return reinterpret_cast<uint64_t>(p); }
};

struct Rng {
  uint64_t s;
  explicit Rng(uint64_t seed) : s(seed * 0x9E3779B97F4A7C15ull + 1) {}
  uint64_t next() {
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    return s;
  }
  double uniform() { return double(next() >> 11) * (1.0 / 9007199254740992.0); }  // [0, 1)
  double range(double lo, double hi) { return lo + (hi - lo) * uniform(); }
  int64_t below(int64_t n) { return int64_t(next() % uint64_t(n)); }
};

// The losses of kernels/losses.def: each is a family of entry points dl_<name>_<pass>_<dtype>_<k|k64>.
struct Family {
  const char* name;
  int id;
};
#define DL_SELFTEST_FAMILY(name, id, stages) {#name, id},
const Family kFamilies[] = {DL_LOSSES(DL_SELFTEST_FAMILY)};
#undef DL_SELFTEST_FAMILY
const char* family_name(int loss) {
  for (const Family& f : kFamilies)
    if (f.id == loss) return f.name;
  return "?";
}
const char* const kPasses[] = {"forward", "backward"};
const char* const kDtypes[] = {"f32", "f64", "f16", "bf16"};
const char* const kIndex[] = {"k", "k64"};

// ---------------------------------------------------------------------------------------------
// Scheduler test kernels

struct SumArgs {
  const int* in;
  long long* out;  // one per block
  int n;
};
// Grid-stride load, warp sums by __shfl_down_sync, block sum through shared memory and
// __shfl_xor_sync: exact for integers whatever the order.
extern "C" __global__ void st_block_sum(SumArgs a) {
  __shared__ long long warp_sums[32];
  const unsigned tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nw = blockDim.x / 32;
  long long v = 0;
  for (unsigned i = blockIdx.x * blockDim.x + tid; i < unsigned(a.n); i += gridDim.x * blockDim.x) v += a.in[i];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < nw ? warp_sums[lane] : 0;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0) a.out[blockIdx.x] = v;
  }
}
DL_REGISTER_ENTRY(st_block_sum)

struct PartArgs {
  int* out;
  int bad_block;
  int mode;
};
// mode 0: in block bad_block, threads >= 32 return before __syncthreads.
// mode 1: in warp 2 of block bad_block, lanes >= 16 return before a __shfl_down_sync.
// mode 2: in warp 2 of block bad_block, lanes < 16 shuffle while everyone else syncs.
// mode 3: in warp 0, lanes < 16 __shfl_down_sync, lanes >= 16 __shfl_xor_sync.
// mode 4: threads < 128 __syncthreads_count, the rest __syncthreads.
// mode 5: lane 5 of warp 0 shuffles with a mask that leaves it out.
// mode 6: thread 5 of block bad_block traps.
// mode 7: a shuffle with width 12.
// mode 8: thread 3 throws a C++ exception.
extern "C" __global__ void st_faulty(PartArgs a) {
  const unsigned tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const bool bad = int(blockIdx.x) == a.bad_block;
  int v = int(tid);
  switch (a.mode) {
    case 0:
      if (bad && tid >= 32) return;
      __syncthreads();
      break;
    case 1:
      if (bad && warp == 2 && lane >= 16) return;
      v = __shfl_down_sync(0xffffffffu, v, 1);
      break;
    case 2:
      if (bad && warp == 2 && lane < 16)
        v = __shfl_down_sync(0xffffffffu, v, 1);
      else
        __syncthreads();
      break;
    case 3:
      if (bad && warp == 0 && lane < 16)
        v = __shfl_down_sync(0xffffffffu, v, 1);
      else
        v = __shfl_xor_sync(0xffffffffu, v, 1);
      break;
    case 4:
      if (bad && tid < 128)
        v = __syncthreads_count(1);
      else
        __syncthreads();
      break;
    case 5:
      if (bad && tid == 5)
        v = __shfl_sync(0x1u, v, 0);
      else if (warp == 0 && lane == 0)
        v = __shfl_sync(0x1u, v, 0);
      break;
    case 6:
      if (bad && tid == 5) __trap();
      __syncthreads();
      break;
    case 7:
      v = __shfl_xor_sync(0xffffffffu, v, 1, 12);
      break;
    case 8:
      if (bad && tid == 3) throw 42;
      __syncthreads();
      break;
  }
  a.out[blockIdx.x * blockDim.x + tid] = v;
}
DL_REGISTER_ENTRY(st_faulty)

struct MissArgs {
  int* out;
  int sync;
};
// Each thread reads its neighbour's shared value: without the barrier the result depends on the
// order in which the threads run.
extern "C" __global__ void st_missing_sync(MissArgs a) {
  __shared__ int s[1024];
  const unsigned t = threadIdx.x, n = blockDim.x;
  s[t] = int(blockIdx.x * 100000 + t + 1);
  if (a.sync) __syncthreads();
  a.out[blockIdx.x * n + t] = s[(t + 1) % n];
}
DL_REGISTER_ENTRY(st_missing_sync)

struct StrideArgs {
  unsigned* hits;
  uint64_t base, n;
};
// 64-bit grid-stride loop over [base, base + n), base possibly above 2^32.
extern "C" __global__ void st_stride64(StrideArgs a) {
  for (uint64_t i = a.base + blockIdx.x * uint64_t(blockDim.x) + threadIdx.x; i < a.base + a.n;
       i += uint64_t(gridDim.x) * blockDim.x)
    atomicAdd(&a.hits[i - a.base], 1u);
}
DL_REGISTER_ENTRY(st_stride64)

constexpr int NW_RESULTS = 16;
struct WarpArgs {
  int* out;  // [grid * block * NW_RESULTS]
  int width, delta;
};
extern "C" __global__ void st_warp_ops(WarpArgs a) {
  const unsigned tid = threadIdx.x, lane = tid & 31;
  const int v = int(blockIdx.x * 1000 + tid * 7 + 3);
  int* o = a.out + (size_t(blockIdx.x) * blockDim.x + tid) * NW_RESULTS;
  o[0] = __shfl_sync(0xffffffffu, v, a.delta + int(lane), a.width);
  o[1] = __shfl_up_sync(0xffffffffu, v, unsigned(a.delta), a.width);
  o[2] = __shfl_down_sync(0xffffffffu, v, unsigned(a.delta), a.width);
  o[3] = __shfl_xor_sync(0xffffffffu, v, a.delta, a.width);
  o[4] = int(__ballot_sync(0xffffffffu, v % 3 == 0));
  o[5] = __any_sync(0xffffffffu, lane == 7);
  o[6] = __all_sync(0xffffffffu, lane < 31);
  o[7] = __all_sync(0xffffffffu, 1);
  o[8] = __syncthreads_count(tid % 5 == 0);
  o[9] = __syncthreads_and(tid < 100000);
  o[10] = __syncthreads_or(tid == 17);
  o[11] = int(__reduce_add_sync(0xffffffffu, lane));
  o[12] = int(__match_any_sync(0xffffffffu, lane / 4));
  __syncwarp();
  // Two disjoint half-warp groups at once; lanes 8-15 read lanes 16-23, outside their mask.
  if (lane < 16)
    o[13] = __shfl_down_sync(0x0000ffffu, v, 8);
  else
    o[13] = __shfl_xor_sync(0xffff0000u, v, 1);
  // double through a shuffle
  const double d = __shfl_sync(0xffffffffu, double(v) + 0.25, 31 - int(lane));
  o[14] = int(d * 4.0);
  o[15] = __reduce_max_sync(0xffffffffu, lane == 9 ? -5 : int(lane) - 40);
}
DL_REGISTER_ENTRY(st_warp_ops)

// Several parameters of mixed sizes: the registrar's struct layout.
extern "C" __global__ void st_multi(long long* out, char c, double d, int16_t s) {
  if (threadIdx.x == 0 && blockIdx.x == 0) {
    out[0] = c;
    out[1] = (long long)(d * 8);
    out[2] = s;
  }
}
DL_REGISTER_ENTRY(st_multi)
struct MultiArgs {
  long long* out;
  char c;
  double d;
  int16_t s;
};

std::atomic<int> g_noargs{0};
extern "C" __global__ void st_noargs() {
  if (threadIdx.x == 0) g_noargs.fetch_add(1);
}
DL_REGISTER_ENTRY(st_noargs)

struct SpinArgs {
  int* flag;
  int* out;
};
// Thread 0 spin-waits (with __nanosleep) for the block's last thread.
extern "C" __global__ void st_spin(SpinArgs a) {
  if (threadIdx.x == 0) {
    int spins = 0;
    while (atomicAdd(a.flag + blockIdx.x, 0) == 0) {
      __nanosleep(100);
      ++spins;
    }
    a.out[blockIdx.x] = spins > 0 ? 1 : 2;
  }
  if (threadIdx.x == blockDim.x - 1) atomicExch(a.flag + blockIdx.x, 1);
}
DL_REGISTER_ENTRY(st_spin)

// Registered with its launch bounds.
extern "C" __global__ void __launch_bounds__(64) st_bounded(SpinArgs a) {
  if (threadIdx.x == 0) a.out[blockIdx.x] = int(blockDim.x);
}
DL_REGISTER_ENTRY(st_bounded, 64)

struct NestArgs {
  int* rc;
};
extern "C" __global__ void st_nested(NestArgs a) {
  if (threadIdx.x == 0) {
    char err[256];
    a.rc[0] = dl_emu_launch("st_noargs", 1, 32, nullptr, 0, 0, err, sizeof err);
  }
}
DL_REGISTER_ENTRY(st_nested)

// ---------------------------------------------------------------------------------------------
// Scheduler tests

long long run_block_sum(const std::vector<int>& in, uint32_t grid, uint32_t block, int flags, Res* res) {
  Buf bin(in.size() * sizeof(int)), bout(grid * sizeof(long long));
  if (!in.empty()) memcpy(bin.p, in.data(), in.size() * sizeof(int));
  *res = launch("st_block_sum", grid, block, SumArgs{bin.as<int>(), bout.as<long long>(), int(in.size())}, flags);
  long long s = 0;
  for (uint32_t b = 0; b < grid; ++b) s += bout.as<long long>()[b];
  return s;
}

void test_block_sum() {
  Rng rng(1);
  for (int n : {0, 1, 255, 256, 257, 10000, 70001}) {
    std::vector<int> in(static_cast<size_t>(n));
    long long want = 0;
    for (int& x : in) want += (x = int(rng.below(2000001)) - 1000000);
    for (uint32_t block : {32u, 64u, 256u, 1024u}) {
      const uint32_t need = uint32_t((n + block - 1) / block);
      for (uint32_t grid : {1u, 3u, std::max(1u, need)}) {
        for (int flags : {0, 1}) {
          Res r;
          const long long got = run_block_sum(in, grid, block, flags, &r);
          CHECK(r.rc == 0 && got == want, "block sum n=%d grid=%u block=%u order=%d: rc %d (%s), %lld vs %lld", n, grid,
                block, flags, r.rc, r.err.c_str(), got, want);
        }
      }
    }
  }
}

void test_faults() {
  struct Case {
    int mode, bad_block;
    int rc;
    const char* msg;
  };
  const Case cases[] = {
      {0, 3, 2, "st_faulty: __syncthreads in block 3: threads 0-31 wait, threads 32-255 exited"},
      {1, 0, 2, "st_faulty: __shfl_down_sync in block 0, warp 2: lanes 0-15 wait at __shfl_down_sync, lanes 16-31 exited"},
      {2, 1, 2,
       "st_faulty: __shfl_down_sync in block 1, warp 2: lanes 0-15 wait at __shfl_down_sync, lanes 16-31 wait at "
       "__syncthreads"},
      {3, 0, 2,
       "st_faulty: __shfl_down_sync in block 0, warp 0: lanes 0-15 wait at __shfl_down_sync, lanes 16-31 wait at "
       "__shfl_xor_sync"},
      {4, 2, 2, "st_faulty: __syncthreads_count in block 2: threads 0-127 wait, threads 128-255 wait at __syncthreads"},
      {5, 0, 2, "st_faulty: __shfl_sync in block 0, thread 5: lane 5 is not in the mask 0x00000001"},
      {6, 2, 2, "st_faulty: __trap() in block 2, thread 5"},
      {7, 0, 2, "width 12 is not a power of two"},
      {8, 1, 2, "a C++ exception escaped the kernel in block 1, thread 3"},
  };
  for (const Case& c : cases) {
    for (int flags : {0, 1}) {
      Buf out(4 * 256 * sizeof(int));
      const Res r = launch("st_faulty", 4, 256, PartArgs{out.as<int>(), c.bad_block, c.mode}, flags);
      CHECK(r.rc == c.rc && contains(r.err, c.msg), "fault mode %d order %d: rc %d, \"%s\" (want \"%s\")", c.mode, flags,
            r.rc, r.err.c_str(), c.msg);
    }
    // The thread recovers: the next launch runs on the reused stacks.
    std::vector<int> in(1000, 3);
    Res r;
    const long long got = run_block_sum(in, 2, 256, 0, &r);
    CHECK(r.rc == 0 && got == 3000, "launch after fault mode %d: rc %d, %lld", c.mode, r.rc, got);
  }
  // Every mode runs cleanly where no block is the bad one.
  for (int mode = 0; mode <= 8; ++mode) {
    if (mode == 5 || mode == 7) continue;  // faulty in every block
    Buf out(2 * 256 * sizeof(int));
    const Res r = launch("st_faulty", 2, 256, PartArgs{out.as<int>(), -1, mode});
    CHECK(r.rc == 0, "mode %d without a bad block: rc %d %s", mode, r.rc, r.err.c_str());
  }
}

void test_missing_sync() {
  for (uint32_t block : {64u, 256u}) {
    const uint32_t grid = 3;
    std::vector<int> res[2][2];  // [sync][order]
    for (int sync : {0, 1})
      for (int order : {0, 1}) {
        Buf out(grid * block * sizeof(int));
        const Res r = launch("st_missing_sync", grid, block, MissArgs{out.as<int>(), sync}, order);
        CHECK(r.rc == 0, "missing sync launch: %s", r.err.c_str());
        res[sync][order].assign(out.as<int>(), out.as<int>() + grid * block);
      }
    std::vector<int> want(grid * block);
    for (uint32_t b = 0; b < grid; ++b)
      for (uint32_t t = 0; t < block; ++t) want[b * block + t] = int(b * 100000 + (t + 1) % block + 1);
    CHECK(res[1][0] == want && res[1][1] == want, "with __syncthreads both orders give the right result (block %u)",
          block);
    CHECK(res[0][0] != res[0][1], "a missing __syncthreads changes the result between the orders (block %u)", block);
  }
}

void test_stride() {
  for (uint64_t base : {uint64_t(0), (uint64_t(1) << 32) - 1000, uint64_t(5) << 32}) {
    for (uint64_t n : {uint64_t(1), uint64_t(5000), uint64_t(10007)}) {
      for (uint32_t grid : {1u, 3u, 100u}) {
        Buf hits(n * sizeof(unsigned));
        memset(hits.p, 0, hits.bytes);
        const Res r = launch("st_stride64", grid, 128, StrideArgs{hits.as<unsigned>(), base, n}, int(grid & 1));
        bool ok = r.rc == 0;
        for (uint64_t i = 0; i < n && ok; ++i) ok = hits.as<unsigned>()[i] == 1;
        CHECK(ok, "64-bit grid-stride loop base=%llu n=%llu grid=%u: rc %d %s", (unsigned long long)base,
              (unsigned long long)n, grid, r.rc, r.err.c_str());
      }
    }
  }
}

void test_warp_ops() {
  const int pairs[][2] = {{32, 0}, {32, 1}, {32, 5}, {32, 31}, {16, 3}, {8, 7}, {4, 1}, {2, 1}, {1, 0}};
  for (const auto& pr : pairs) {
    const int width = pr[0], delta = pr[1];
    const uint32_t grid = 2, block = 64;
    for (int order : {0, 1}) {
      Buf out(grid * block * NW_RESULTS * sizeof(int));
      const Res r = launch("st_warp_ops", grid, block, WarpArgs{out.as<int>(), width, delta}, order);
      if (!CHECK(r.rc == 0, "warp ops launch: %s", r.err.c_str())) continue;
      int bad = 0;
      std::string first;
      for (uint32_t b = 0; b < grid; ++b)
        for (uint32_t t = 0; t < block; ++t) {
          const int* o = out.as<int>() + (size_t(b) * block + t) * NW_RESULTS;
          const unsigned lane = t & 31, wbase = t & ~31u;
          auto val = [&](unsigned l) { return int(b * 1000 + (wbase + l) * 7 + 3); };
          const unsigned seg = lane / unsigned(width) * unsigned(width), rel = lane - seg;
          int want[NW_RESULTS];
          want[0] = val(seg + unsigned(delta + int(lane)) % unsigned(width));
          want[1] = rel >= unsigned(delta) ? val(lane - unsigned(delta)) : val(lane);
          want[2] = rel + unsigned(delta) < unsigned(width) ? val(lane + unsigned(delta)) : val(lane);
          want[3] = val(lane ^ unsigned(delta));
          unsigned ballot = 0;
          for (unsigned l = 0; l < 32; ++l)
            if (val(l) % 3 == 0) ballot |= 1u << l;
          want[4] = int(ballot);
          want[5] = 1;
          want[6] = 0;
          want[7] = 1;
          want[8] = int((block + 4) / 5);
          want[9] = 1;
          want[10] = 1;
          want[11] = 31 * 32 / 2;
          want[12] = int(0xfu << (lane / 4 * 4));
          if (lane < 8)
            want[13] = val(lane + 8);
          else if (lane < 16)
            want[13] = -1;  // poison: the source lane is outside the mask
          else
            want[13] = val(lane ^ 1);
          want[14] = val(31 - lane) * 4 + 1;
          want[15] = -5;
          for (int k = 0; k < NW_RESULTS; ++k)
            if (o[k] != want[k]) {
              if (!bad++) first = fmt("block %u thread %u result %d: %d, want %d", b, t, k, o[k], want[k]);
            }
        }
      CHECK(bad == 0, "warp ops width=%d delta=%d order=%d: %d wrong (%s)", width, delta, order, bad, first.c_str());
    }
  }
}

void test_misc() {
  // multiple parameters
  long long out[3] = {0, 0, 0};
  MultiArgs m{out, 'x', 2.5, -1234};
  static_assert(sizeof(MultiArgs) == 32, "layout");
  Res r = launch("st_multi", 1, 32, m);
  CHECK(r.rc == 0 && out[0] == 'x' && out[1] == 20 && out[2] == -1234, "several parameters: rc %d %s, %lld %lld %lld",
        r.rc, r.err.c_str(), out[0], out[1], out[2]);
  // no parameters
  char err[256];
  g_noargs = 0;
  int rc = dl_emu_launch("st_noargs", 5, 64, nullptr, 0, 0, err, sizeof err);
  CHECK(rc == 0 && g_noargs == 5, "no parameters: rc %d, %d", rc, g_noargs.load());
  // spin-wait with __nanosleep
  for (int order : {0, 1}) {
    int flag[3] = {0, 0, 0}, spun[3] = {0, 0, 0};
    r = launch("st_spin", 3, 128, SpinArgs{flag, spun}, order);
    CHECK(r.rc == 0 && spun[0] == (order ? 2 : 1) && spun[2] == spun[0], "spin-wait with __nanosleep, order %d: rc %d %s, %d %d",
          order, r.rc, r.err.c_str(), spun[0], spun[2]);
  }
  // launch bounds given at registration
  {
    int out1[2] = {0, 0};
    r = launch("st_bounded", 2, 64, SpinArgs{nullptr, out1});
    CHECK(r.rc == 0 && out1[0] == 64 && out1[1] == 64, "within __launch_bounds__: rc %d %s", r.rc, r.err.c_str());
    r = launch("st_bounded", 2, 128, SpinArgs{nullptr, out1});
    CHECK(r.rc == 3 && contains(r.err, "__launch_bounds__ (64)"), "beyond __launch_bounds__: rc %d %s", r.rc,
          r.err.c_str());
  }
  // nested launch
  int nested_rc = -1;
  r = launch("st_nested", 1, 32, NestArgs{&nested_rc});
  CHECK(r.rc == 0 && nested_rc == 3, "a launch from a kernel fails with 3: %d", nested_rc);
  // bad launches
  SumArgs sa{nullptr, nullptr, 0};
  rc = dl_emu_launch("no_such_kernel", 1, 32, &sa, sizeof sa, 0, err, sizeof err);
  CHECK(rc == 1 && contains(err, "no_such_kernel"), "unknown kernel: %d %s", rc, err);
  rc = dl_emu_launch("st_block_sum", 1, 32, &sa, sizeof sa - 4, 0, err, sizeof err);
  CHECK(rc == 3 && contains(err, "bytes of arguments"), "argument size mismatch: %d %s", rc, err);
  const std::string first = fmt("dl_%s_forward_f32_k", kFamilies[0].name);
  rc = dl_emu_launch(first.c_str(), 1, 256, &sa, sizeof sa, 0, err, sizeof err);
  CHECK(rc == 3, "argument size mismatch on %s: %d %s", first.c_str(), rc, err);
  for (uint32_t block : {0u, 16u, 48u, 1056u, 2048u}) {
    rc = dl_emu_launch("st_block_sum", 1, block, &sa, sizeof sa, 0, err, sizeof err);
    CHECK(rc == 3 && contains(err, "block size"), "block %u: %d %s", block, rc, err);
  }
  rc = dl_emu_launch("st_block_sum", 0, 32, &sa, sizeof sa, 0, err, sizeof err);
  CHECK(rc == 3 && contains(err, "grid"), "grid 0: %d %s", rc, err);
  rc = dl_emu_launch("st_block_sum", 1, 32, &sa, sizeof sa, 2, err, sizeof err);
  CHECK(rc == 3 && contains(err, "flags"), "unknown flags: %d %s", rc, err);
  rc = dl_emu_launch("st_block_sum", 1, 32, nullptr, sizeof sa, 0, err, sizeof err);
  CHECK(rc == 3, "null arguments: %d %s", rc, err);
  rc = dl_emu_launch("no_such_kernel", 1, 32, &sa, sizeof sa, 0, nullptr, 0);
  CHECK(rc == 1, "no error buffer: %d", rc);
  char tiny[8];
  rc = dl_emu_launch("no_such_kernel", 1, 32, &sa, sizeof sa, 0, tiny, sizeof tiny);
  CHECK(rc == 1 && strlen(tiny) == 7, "short error buffer truncates: \"%s\"", tiny);
  rc = dl_emu_launch(nullptr, 1, 32, &sa, sizeof sa, 0, err, sizeof err);
  CHECK(rc == 1, "null name: %d", rc);
}

void test_threads() {
  // Several OS threads launch at once; each checks its own sums.
  std::atomic<int> bad{0};
  auto work = [&bad](int seed) {
    Rng rng(uint64_t(seed) + 100);
    for (int it = 0; it < 20; ++it) {
      std::vector<int> in(size_t(1000 + rng.below(5000)));
      long long want = 0;
      for (int& x : in) want += (x = int(rng.below(1000)));
      Res r;
      const long long got = run_block_sum(in, 1 + uint32_t(rng.below(8)), 256, it & 1, &r);
      if (r.rc != 0 || got != want) ++bad;
    }
  };
  std::vector<std::thread> ts;
  for (int i = 0; i < 4; ++i) ts.emplace_back(work, i);
  work(99);
  for (auto& t : ts) t.join();
  CHECK(bad == 0, "concurrent launches from 5 OS threads: %d wrong", bad.load());
  // And once more on fresh threads, which take the pooled schedulers of the finished ones.
  ts.clear();
  for (int i = 0; i < 3; ++i) ts.emplace_back(work, 10 + i);
  for (auto& t : ts) t.join();
  CHECK(bad == 0, "launches on threads that reuse pooled schedulers: %d wrong", bad.load());
}

// ---------------------------------------------------------------------------------------------
// The dl_* kernels against a serial loop over the same element functors

template <class T> struct Ty;
template <> struct Ty<float> {
  using A = float;
  static constexpr const char* name = "f32";
  static float load(float v) { return v; }
  static float store(float v) { return v; }
  static constexpr double elem_rel = 1e-6, out_rel = 2.5e-7, sum_rel = 1e-5, abs_tol = 1e-30;
};
template <> struct Ty<double> {
  using A = double;
  static constexpr const char* name = "f64";
  static double load(double v) { return v; }
  static double store(double v) { return v; }
  static constexpr double elem_rel = 1e-14, out_rel = 1e-15, sum_rel = 1e-12, abs_tol = 1e-300;
};
template <> struct Ty<__half> {
  using A = float;
  static constexpr const char* name = "f16";
  static float load(__half v) { return __half2float(v); }
  static __half store(float v) { return __float2half_rn(v); }
  static constexpr double elem_rel = 1e-3, out_rel = 1e-3, sum_rel = 1e-5, abs_tol = 6e-8;
};
template <> struct Ty<__nv_bfloat16> {
  using A = float;
  static constexpr const char* name = "bf16";
  static float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __nv_bfloat16 store(float v) { return __float2bfloat16_rn(v); }
  static constexpr double elem_rel = 8e-3, out_rel = 8e-3, sum_rel = 1e-5, abs_tol = 1e-30;
};

bool close(double got, double want, double rel, double abs_tol) {
  if (std::isnan(got) || std::isnan(want)) return std::isnan(got) && std::isnan(want);
  if (std::isinf(got) || std::isinf(want)) return got == want;
  return std::fabs(got - want) <= abs_tol + rel * std::fabs(want);
}

// What a loss's functor declares it takes (true when it does not say).
template <class E, class = void> struct LabelTargets : std::true_type {};
template <class E>
struct LabelTargets<E, std::void_t<decltype(E::LABEL_TARGETS)>> : std::integral_constant<bool, E::LABEL_TARGETS> {};
template <class E, class = void> struct ElementWeights : std::true_type {};
template <class E>
struct ElementWeights<E, std::void_t<decltype(E::ELEMENT_WEIGHTS)>> : std::integral_constant<bool, E::ELEMENT_WEIGHTS> {};
// Plain: an element functor without per-class parameters, ignored labels or a histogram, which the
// serial reference below covers. The other shapes (row bodies, histogram bodies, CrossEntropyLoss's
// sigmoid form) are checked against torch on the emulated device by the Rust tests
// (tests/fused.rs), not here.
template <class E> constexpr bool plain() {
  return E::SHAPE == dl::SHAPE_ELEMENT && !E::COLUMN_PARAM && !E::IGNORE_INDEX && !E::HISTOGRAM;
}
struct Traits {
  bool label_targets, element_weights, plain;
};
template <class E> Traits traits_of() { return {LabelTargets<E>::value, ElementWeights<E>::value, plain<E>()}; }
Traits family_traits(int loss) {
  dl::Args a;
  memset(&a, 0, sizeof a);
  a.p0 = 2.0;
#define DL_RUN(...) traits_of<__VA_ARGS__>()
  DL_DISPATCH_LOSS(loss, a, float, return (Traits{true, true, false}));
#undef DL_RUN
}

struct Cfg {
  int loss;
  int64_t n, c;
  int tmode;  // dl::TARGET_*
  int wmode;  // 0 none, 1 per row (w_sc = 0), 2 per element
  int red;
  int flags;
  double p0, p1, lw;
  int avg_mode;  // has_avg_factor
  bool odd_labels;  // labels outside [0, C] in rows 1 and 3
  uint32_t cap;     // grid cap
  std::string str() const {
    return fmt("%s n=%lld c=%lld tmode=%d w=%d red=%d flags=%d p0=%g p1=%g lw=%g avg=%d odd=%d cap=%u", family_name(loss),
               (long long)n, (long long)c, tmode, wmode, red, flags, p0, p1, lw, avg_mode, int(odd_labels), cap);
  }
};

std::set<std::string> g_launched;

// The expected outputs (as double) of one launch, from a serial loop.
template <class T> struct Ref {
  using A = typename Ty<T>::A;
  struct Out {
    std::vector<double> v;  // elementwise outputs, or the reduced value
    double scale = 0;       // reduced forward: |lw| * sum |l| / |divisor|, for the tolerance
    bool skip = false;      // not a plain element functor
  };
  template <class E> static Out run(const dl::Args& a, int pass) {
    if constexpr (!plain<E>()) {
      Out o;
      o.skip = true;
      return o;
    } else {
      return run_plain<E>(a, pass);
    }
  }
  template <class E> static Out run_plain(const dl::Args& a, int pass) {
    const E e(a);
    const int64_t n = a.n, c = a.c;
    const T* pred = reinterpret_cast<const T*>(a.pred);
    const bool row_sum = (a.flags & dl::FLAG_ROW_SUM) != 0, reduced = a.reduction != dl::RED_NONE;
    const A lw = A(a.loss_weight), nan = A(NAN);
    double div = 1;
    A div_a = A(1);
    if (a.reduction == dl::RED_MEAN) {
      if (a.has_avg_factor == 1)
        div_a = A(a.avg_factor_value + dl::AVG_FACTOR_EPS);
      else if (a.has_avg_factor == 2)
        div_a = *reinterpret_cast<const A*>(a.avg_factor) + A(dl::AVG_FACTOR_EPS);
      else
        div_a = A(row_sum ? n : n * c);
      div = double(div_a);
    }
    auto tgt = [&](int64_t i, int64_t j, bool* bad) -> A {
      *bad = false;
      if (a.target_mode == dl::TARGET_DENSE) return Ty<T>::load(reinterpret_cast<const T*>(a.target)[i * c + j]);
      const int64_t l = reinterpret_cast<const int64_t*>(a.target)[i];
      *bad = (a.flags & dl::FLAG_STRICT_LABELS) && (l < 0 || l > c);
      if (l != j) return A(0);
      return a.score ? Ty<T>::load(reinterpret_cast<const T*>(a.score)[i]) : A(1);
    };
    auto wt = [&](int64_t i, int64_t j) -> A {
      return a.weight ? Ty<T>::load(reinterpret_cast<const T*>(a.weight)[i * a.w_sn + j * a.w_sc]) : A(1);
    };
    Out o;
    if (pass == dl::PASS_FORWARD) {
      if (!reduced && row_sum) {
        for (int64_t i = 0; i < n; ++i) {
          A s = A(0);
          bool any_bad = false;
          for (int64_t j = 0; j < c; ++j) {
            bool bad;
            const A t = tgt(i, j, &bad);
            any_bad |= bad;
            s += dl::weighted<E::MASKED_WEIGHTS>(e.loss(Ty<T>::load(pred[i * c + j]), t), wt(i, j));
          }
          o.v.push_back(double(Ty<T>::load(Ty<T>::store(any_bad ? nan : lw * s))));
        }
        return o;
      }
      double sum = 0, sabs = 0;
      for (int64_t i = 0; i < n; ++i)
        for (int64_t j = 0; j < c; ++j) {
          bool bad;
          const A t = tgt(i, j, &bad);
          A l = dl::weighted<E::MASKED_WEIGHTS>(e.loss(Ty<T>::load(pred[i * c + j]), t), wt(i, j));
          if (bad) l = nan;
          if (!reduced)
            o.v.push_back(double(Ty<T>::load(Ty<T>::store(lw * l))));
          else {
            sum += double(l);
            sabs += std::fabs(double(l));
          }
        }
      if (reduced) {
        o.v.push_back(double(lw) * sum / div);
        o.scale = std::fabs(double(lw)) * sabs / std::fabs(div);
      }
      return o;
    }
    const A scale = lw / div_a;
    const T* go = reinterpret_cast<const T*>(a.grad_out);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < c; ++j) {
        bool bad;
        const A t = tgt(i, j, &bad);
        const A g = dl::weighted<E::MASKED_WEIGHTS>(e.grad(Ty<T>::load(pred[i * c + j]), t), wt(i, j)) * scale *
                    Ty<T>::load(go[i * a.g_sn + j * a.g_sc]);
        o.v.push_back(double(Ty<T>::load(Ty<T>::store(bad ? nan : g))));
      }
    return o;
  }
  static Out compute(int loss, int pass, const dl::Args& a) {
#define DL_RUN(...) run<__VA_ARGS__>(a, pass)
    DL_DISPATCH_LOSS(loss, a, A, return Out());
#undef DL_RUN
  }
};

template <class T> void fill_t(Rng& rng, const Buf& b, int64_t count, double lo, double hi, double p_zero = 0) {
  for (int64_t k = 0; k < count; ++k) {
    const double v = rng.uniform() < p_zero ? 0.0 : rng.range(lo, hi);
    b.as<T>()[k] = Ty<T>::store(typename Ty<T>::A(v));
  }
}

template <class T> void run_case(const Cfg& cfg, int pass, uint64_t seed) {
  using A = typename Ty<T>::A;
  const int64_t n = cfg.n, c = cfg.c, nc = n * c;
  const bool row_sum = (cfg.flags & dl::FLAG_ROW_SUM) != 0, reduced = cfg.red != dl::RED_NONE;
  const bool act = (cfg.flags & dl::FLAG_ACTIVATED) != 0;
  Rng rng(seed);

  Buf pred(size_t(nc) * sizeof(T));
  if (act) {
    fill_t<T>(rng, pred, nc, 0.02, 0.98);
    if (nc > 2) {
      pred.as<T>()[0] = Ty<T>::store(A(0));
      pred.as<T>()[nc - 1] = Ty<T>::store(A(1));
    }
  } else {
    fill_t<T>(rng, pred, nc, -5.0, 5.0, 0.05);
  }
  Buf target(cfg.tmode == dl::TARGET_DENSE ? size_t(nc) * sizeof(T) : size_t(n) * sizeof(int64_t));
  Buf score;
  if (cfg.tmode == dl::TARGET_DENSE) {
    for (int64_t k = 0; k < nc; ++k) {  // hard 0/1 targets and soft ones (scores, IoUs)
      const double u = rng.uniform();
      const double v = u < 0.5 ? 0.0 : u < 0.7 ? 1.0 : rng.range(0.01, 1.0);
      target.as<T>()[k] = Ty<T>::store(A(v));
    }
  } else {
    for (int64_t i = 0; i < n; ++i) target.as<int64_t>()[i] = rng.uniform() < 0.4 ? c : rng.below(c);
    if (cfg.odd_labels) {
      if (n > 1) target.as<int64_t>()[1] = c + 1;
      if (n > 3) target.as<int64_t>()[3] = -1;
    }
    if (cfg.tmode == dl::TARGET_LABELS_SCORES) {
      score = Buf(size_t(n) * sizeof(T));
      fill_t<T>(rng, score, n, 0.0, 1.0, 0.1);
    }
  }
  Buf weight;
  int64_t w_sn = 0, w_sc = 0;
  if (cfg.wmode == 1) {
    weight = Buf(size_t(n) * sizeof(T));
    fill_t<T>(rng, weight, n, 0.0, 2.0, 0.1);
    w_sn = 1;
  } else if (cfg.wmode == 2) {
    weight = Buf(size_t(nc) * sizeof(T));
    fill_t<T>(rng, weight, nc, 0.0, 2.0, 0.1);
    w_sn = c;
    w_sc = 1;
  }
  Buf avg;
  if (cfg.avg_mode == 2) {
    avg = Buf(sizeof(A));
    *avg.as<A>() = A(7.25);
  }
  int64_t out_count, go_count = 0, g_sn = 0, g_sc = 0;
  if (pass == dl::PASS_FORWARD)
    out_count = reduced ? 1 : row_sum ? n : nc;
  else
    out_count = nc;
  Buf grad_out;
  if (pass == dl::PASS_BACKWARD) {
    if (reduced)
      go_count = 1;
    else if (row_sum)
      go_count = n, g_sn = 1;
    else
      go_count = nc, g_sn = c, g_sc = 1;
    grad_out = Buf(size_t(go_count) * sizeof(T));
    fill_t<T>(rng, grad_out, go_count, -1.0, 1.0);
  }
  const int64_t work = (pass == dl::PASS_FORWARD && row_sum && !reduced) ? n : nc;
  const uint32_t grid = uint32_t(std::min<int64_t>(std::max<int64_t>((work + 255) / 256, 1), cfg.cap));
  Buf out(size_t(out_count) * sizeof(T));
  Buf partials((pass == dl::PASS_FORWARD && reduced) ? grid * sizeof(A) : 0);

  dl::Args a;
  memset(&a, 0, sizeof a);
  a.pred = pred.addr();
  a.target = target.addr();
  a.score = score.addr();
  a.weight = weight.addr();
  a.avg_factor = avg.addr();
  a.grad_out = grad_out.addr();
  a.out = out.addr();
  a.partials = partials.addr();
  a.n = n;
  a.c = c;
  a.w_sn = w_sn;
  a.w_sc = w_sc;
  a.g_sn = g_sn;
  a.g_sc = g_sc;
  a.avg_factor_value = 13.5;
  a.loss_weight = cfg.lw;
  a.p0 = cfg.p0;
  a.p1 = cfg.p1;
  // Slots p2 and p3 (BalancedL1's beta and b) must be non-zero; the other bodies ignore them.
  a.p2 = 1.0;
  a.p3 = 1.0;
  a.flags = cfg.flags;
  a.target_mode = cfg.tmode;
  a.reduction = cfg.red;
  a.has_avg_factor = cfg.avg_mode;
  a.n_partials = (pass == dl::PASS_FORWARD && reduced) ? int32_t(grid) : 0;

  const std::string what = fmt("%s %s %s", pass == dl::PASS_FORWARD ? "forward" : "backward", Ty<T>::name, cfg.str().c_str());
  std::vector<std::vector<unsigned char>> results;
  bool launched = true;
  for (const char* idx : {"k", "k64"}) {
    const std::string name = fmt("dl_%s_%s_%s_%s", family_name(cfg.loss), pass == dl::PASS_FORWARD ? "forward" : "backward",
                                 Ty<T>::name, idx);
    for (int order : {0, 1}) {
      if (out.bytes) memset(out.p, 0xA5, out.bytes);
      if (partials.bytes) memset(partials.p, 0xA5, partials.bytes);
      Res r = launch(name.c_str(), grid, 256, a, order);
      g_launched.insert(name);
      if (r.rc == 0 && pass == dl::PASS_FORWARD && reduced) {
        const std::string fin = fmt("dl_finalize_%s_k", Ty<T>::name);
        r = launch(fin.c_str(), 1, 256, a, order);
        g_launched.insert(fin);
      }
      if (!CHECK(r.rc == 0, "%s via %s order %d: rc %d %s", what.c_str(), name.c_str(), order, r.rc, r.err.c_str()))
        launched = false;
      const unsigned char* p = out.as<unsigned char>();
      results.emplace_back(p, p + out.bytes);
    }
  }
  if (!launched) return;
  bool same = true;
  for (size_t v = 1; v < results.size(); ++v) same &= results[v] == results[0];
  CHECK(same, "%s: k/k64 and both thread orders are bitwise equal", what.c_str());

  const typename Ref<T>::Out ref = Ref<T>::compute(cfg.loss, pass, a);
  if (!CHECK(int64_t(ref.v.size()) == out_count, "%s: reference has %zu values, want %lld", what.c_str(), ref.v.size(),
             (long long)out_count))
    return;
  int bad = 0, nan_rows = 0;
  std::string first;
  for (int64_t k = 0; k < out_count; ++k) {
    const double got = double(Ty<T>::load(out.as<T>()[k])), want = ref.v[size_t(k)];
    nan_rows += std::isnan(want);
    bool ok;
    if (pass == dl::PASS_FORWARD && reduced)
      ok = close(got, want, Ty<T>::out_rel, Ty<T>::abs_tol + Ty<T>::sum_rel * ref.scale);
    else
      ok = close(got, want, Ty<T>::elem_rel, Ty<T>::abs_tol);
    if (!ok && !bad++) first = fmt("[%lld] %.9g vs reference %.9g", (long long)k, got, want);
  }
  CHECK(bad == 0, "%s: %d of %lld values off the reference (%s)", what.c_str(), bad, (long long)out_count, first.c_str());
  if (cfg.odd_labels && (cfg.flags & dl::FLAG_STRICT_LABELS) && n > 1)
    CHECK(nan_rows > 0, "%s: strict labels outside [0, C] give NaN", what.c_str());
}

// The configurations run for every loss: shapes (n * c not a multiple of 256, c = 1, n = 0, a
// capped grid) x reductions x variants of targets, flags and exponents; weights, avg_factor and
// loss_weight rotate. Label targets and per-element weights only where the functor takes them.
std::vector<Cfg> configs(int loss) {
  struct Shape {
    int64_t n, c;
    uint32_t cap;
  };
  const Shape shapes[] = {{37, 7, 1024}, {5, 1, 1024}, {0, 4, 1024}, {300, 3, 1024}, {1000, 3, 2}};
  struct Var {
    int tmode, flags;
    double p0, p1;
    bool odd;
  };
  using namespace dl;
  const Traits tr = family_traits(loss);
  if (!tr.plain) return {};
  std::vector<Var> vars;
  vars.push_back({TARGET_DENSE, 0, 2.0, 0.25, false});
  vars.push_back({TARGET_DENSE, FLAG_IOU_WEIGHTED, 1.5, 0.75, false});
  vars.push_back({TARGET_DENSE, FLAG_ACTIVATED, 2.0, 0.25, false});
  vars.push_back({TARGET_DENSE, FLAG_ROW_SUM | FLAG_ACTIVATED, 1.5, 0.4, false});
  vars.push_back({TARGET_DENSE, FLAG_ROW_SUM, 2.0, 0.6, false});
  if (tr.label_targets) {
    vars.push_back({TARGET_LABELS, 0, 2.0, 0.25, true});
    vars.push_back({TARGET_LABELS, FLAG_STRICT_LABELS, 1.5, 0.25, true});
    vars.push_back({TARGET_LABELS_SCORES, FLAG_ROW_SUM, 2.0, 0.25, false});
    vars.push_back({TARGET_LABELS_SCORES, FLAG_ROW_SUM | FLAG_STRICT_LABELS | FLAG_ACTIVATED, 2.0, 0.25, true});
    vars.push_back({TARGET_LABELS_SCORES, FLAG_ROW_SUM, 1.5, 0.25, true});
  }
  std::vector<Cfg> out;
  int ctr = 0;
  const double lws[] = {1.0, 0.5, 2.0};
  for (const Shape& s : shapes)
    for (int red : {RED_NONE, RED_MEAN, RED_SUM})
      for (const Var& v : vars) {
        Cfg c;
        c.loss = loss;
        c.n = s.n;
        c.c = s.c;
        c.cap = s.cap;
        c.tmode = v.tmode;
        c.flags = v.flags;
        c.p0 = v.p0;
        c.p1 = v.p1;
        c.odd_labels = v.odd;
        c.red = red;
        c.wmode = ctr % (tr.element_weights ? 3 : 2);
        c.avg_mode = red == RED_MEAN ? (ctr / 3) % 3 : 0;
        c.lw = lws[(ctr / 2) % 3];
        ++ctr;
        out.push_back(c);
      }
  return out;
}

template <class T> void test_losses(int stride) {
  int k = 0;
  for (const Family& f : kFamilies)
    for (const Cfg& c : configs(f.id))
      for (int pass : {dl::PASS_FORWARD, dl::PASS_BACKWARD}) {
        if (k++ % stride) continue;
        run_case<T>(c, pass, uint64_t(k) * 7919 + 13);
      }
}

// dl_finalize_* alone with many partials (more than one per thread).
template <class T> void test_finalize() {
  using A = typename Ty<T>::A;
  for (int np : {1, 7, 256, 257, 1000}) {
    for (int red : {dl::RED_SUM, dl::RED_MEAN}) {
      Rng rng(uint64_t(np) * 31 + uint64_t(red));
      Buf partials(size_t(np) * sizeof(A)), out(sizeof(T));
      double sum = 0, sabs = 0;
      for (int i = 0; i < np; ++i) {
        const A v = A(rng.range(-3, 10));
        partials.as<A>()[i] = v;
        sum += double(v);
        sabs += std::fabs(double(v));
      }
      dl::Args a;
      memset(&a, 0, sizeof a);
      a.partials = partials.addr();
      a.n_partials = np;
      a.out = out.addr();
      a.n = 40;
      a.c = 3;
      a.reduction = red;
      a.loss_weight = 0.5;
      const std::string fin = fmt("dl_finalize_%s_k", Ty<T>::name);
      std::vector<unsigned char> first;
      for (int order : {0, 1}) {
        const Res r = launch(fin.c_str(), 1, 256, a, order);
        g_launched.insert(fin);
        CHECK(r.rc == 0, "%s np=%d: %s", fin.c_str(), np, r.err.c_str());
        const double div = red == dl::RED_MEAN ? 120.0 : 1.0;
        const double got = double(Ty<T>::load(*out.as<T>())), want = 0.5 * sum / div;
        CHECK(close(got, want, Ty<T>::out_rel, Ty<T>::sum_rel * 0.5 * sabs / div),
              "%s np=%d red=%d order=%d: %.9g vs %.9g", fin.c_str(), np, red, order, got, want);
        std::vector<unsigned char> bytes(out.as<unsigned char>(), out.as<unsigned char>() + sizeof(T));
        if (order == 0)
          first = bytes;
        else
          CHECK(bytes == first, "%s np=%d: both orders bitwise equal", fin.c_str(), np);
      }
    }
  }
}

void test_registry() {
  std::set<std::string> names;
  const size_t count = dl_emu_kernel_count();
  for (size_t i = 0; i < count; ++i) names.insert(dl_emu_kernel_name(i));
  CHECK(dl_emu_kernel_name(count) == nullptr, "kernel_name past the end is null");
  CHECK(names.size() == count, "registered names are distinct");
  int missing = 0;
  size_t expected = 0;
  for (const Family& f : kFamilies)
    for (const char* pass : kPasses)
      for (const char* dt : kDtypes)
        for (const char* idx : kIndex) {
          ++expected;
          missing += !names.count(fmt("dl_%s_%s_%s_%s", f.name, pass, dt, idx));
        }
  for (const char* dt : kDtypes) {
    ++expected;
    missing += !names.count(fmt("dl_finalize_%s_k", dt));
  }
  CHECK(missing == 0, "all %zu expected dl_* entry points (losses.def) are registered (%d missing)", expected, missing);
  size_t dl = 0;
  for (const std::string& n : names) dl += n.rfind("dl_", 0) == 0;
  printf("selftest: %zu kernels registered (%zu dl_*), context switch: %s, fiber stack %zu KiB\n", count, dl,
         dl_emu::switch_impl(), dl_emu::stack_size() / 1024);
}

void check_coverage() {
  int uncovered = 0;
  for (size_t i = 0; i < dl_emu_kernel_count(); ++i) {
    const std::string n = dl_emu_kernel_name(i);
    if (n.rfind("dl_", 0) == 0 && !g_launched.count(n)) {
      printf("selftest: note: %s is registered but not exercised by this self-test\n", n.c_str());
      ++uncovered;
    }
  }
  (void)uncovered;
  int missing = 0;
  for (const Family& f : kFamilies)
    for (const char* pass : kPasses)
      for (const char* dt : kDtypes)
        for (const char* idx : kIndex)
          missing += family_traits(f.id).plain && !g_launched.count(fmt("dl_%s_%s_%s_%s", f.name, pass, dt, idx));
  for (const char* dt : kDtypes) missing += !g_launched.count(fmt("dl_finalize_%s_k", dt));
  CHECK(missing == 0, "every plain loss and finalize entry point was exercised (%d not)", missing);
}

// ---------------------------------------------------------------------------------------------
// Benchmark: a 100-block x 256-thread focal forward (f32), 'none' (no barriers) and 'sum'
// (block_sum: shuffles and __syncthreads).

int bench(int iters) {
  const int64_t n = 2560, c = 10;  // 25600 elements: 100 blocks of 256
  Rng rng(5);
  std::vector<float> pred(size_t(n * c)), target(size_t(n * c), 0.f), out(size_t(n * c));
  for (float& x : pred) x = float(rng.range(-4, 4));
  for (float& t : target) t = rng.uniform() < 0.1 ? 1.f : 0.f;
  std::vector<float> partials(100);
  dl::Args a;
  memset(&a, 0, sizeof a);
  a.pred = reinterpret_cast<uint64_t>(pred.data());
  a.target = reinterpret_cast<uint64_t>(target.data());
  a.out = reinterpret_cast<uint64_t>(out.data());
  a.partials = reinterpret_cast<uint64_t>(partials.data());
  a.n_partials = 100;
  a.n = n;
  a.c = c;
  a.loss_weight = 1;
  a.p0 = 2;
  a.p1 = 0.25;
  a.target_mode = dl::TARGET_DENSE;
  printf("bench: %s context switch, fiber stack %zu KiB\n", dl_emu::switch_impl(), dl_emu::stack_size() / 1024);
  for (int red : {dl::RED_NONE, dl::RED_SUM}) {
    a.reduction = red;
    Res r = launch("dl_focal_forward_f32_k", 100, 256, a);  // warm-up: stacks mapped and touched
    if (r.rc) {
      printf("bench: launch failed: %s\n", r.err.c_str());
      return 1;
    }
    const uint64_t r0 = dl_emu::resume_count();
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < iters; ++i) launch("dl_focal_forward_f32_k", 100, 256, a, i & 1);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const double resumes = double(dl_emu::resume_count() - r0) / iters;
    printf("bench: dl_focal_forward_f32_k, 100 blocks x 256 threads, reduction %s: %.3f ms per launch "
           "(%.0f fiber resumptions per launch, %.1f ns each)\n",
           red == dl::RED_NONE ? "none" : "sum", s * 1e3 / iters, resumes, s * 1e9 / iters / resumes);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  int stride = 1;
  for (int i = 1; i < argc; ++i) {
    if (!strcmp(argv[i], "--bench")) return bench(i + 1 < argc ? atoi(argv[i + 1]) : 50);
    if (!strcmp(argv[i], "-v")) g_verbose = true;
    if (!strcmp(argv[i], "--stride") && i + 1 < argc) stride = std::max(1, atoi(argv[++i]));
  }
  const auto t0 = std::chrono::steady_clock::now();
  auto phase = [&](const char* name, const std::function<void()>& f) {
    const int before = g_pass + g_fail;
    const auto p0 = std::chrono::steady_clock::now();
    f();
    printf("selftest: %-28s %5d checks, %.2f s\n", name, g_pass + g_fail - before,
           std::chrono::duration<double>(std::chrono::steady_clock::now() - p0).count());
    fflush(stdout);
  };
  test_registry();
  phase("block sum", test_block_sum);
  phase("faults", test_faults);
  phase("missing __syncthreads", test_missing_sync);
  phase("64-bit grid-stride", test_stride);
  phase("warp operations", test_warp_ops);
  phase("launch API", test_misc);
  phase("OS threads", test_threads);
  phase("finalize f32", test_finalize<float>);
  phase("finalize f64", test_finalize<double>);
  phase("finalize f16", test_finalize<__half>);
  phase("finalize bf16", test_finalize<__nv_bfloat16>);
  phase("losses f32", [&] { test_losses<float>(stride); });
  phase("losses f64", [&] { test_losses<double>(stride); });
  phase("losses f16", [&] { test_losses<__half>(stride); });
  phase("losses bf16", [&] { test_losses<__nv_bfloat16>(stride); });
  check_coverage();
  printf("selftest: total %.1f s\n", std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  printf("selftest: %d passed, %d failed\n", g_pass, g_fail);
  return g_fail ? 1 : 0;
}
