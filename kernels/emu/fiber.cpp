// The fiber scheduler and entry point registry of the emulated CUDA device (see fiber.h).
//
// Compiled as part of device.cpp (which defines DL_EMU_DEVICE_TU and includes this file before the
// CUDA shim); compiled on its own it is empty, so that a build that globs *.cpp stays correct.
//
// Context switch: on x86-64 a small assembly routine that saves the callee-saved registers (rbx,
// rbp, r12-r15), MXCSR and the x87 control word on the old stack and loads them from the new one;
// elsewhere, with DL_EMU_UCONTEXT, or under AddressSanitizer (unless DL_EMU_ASAN_ASM), swapcontext,
// which makes a system call per switch. Switches are annotated for AddressSanitizer.
#ifdef DL_EMU_DEVICE_TU

#include "fiber.h"

#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#include <mutex>
#include <new>
#include <string>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define DL_EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define DL_EMU_ASAN 1
#endif
#endif
#ifndef DL_EMU_ASAN
#define DL_EMU_ASAN 0
#endif

#if defined(__x86_64__) && !defined(DL_EMU_UCONTEXT) && (!DL_EMU_ASAN || defined(DL_EMU_ASAN_ASM))
#define DL_EMU_ASM_SWITCH 1
#else
#define DL_EMU_ASM_SWITCH 0
#include <ucontext.h>
#endif

#if DL_EMU_ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

#if DL_EMU_ASM_SWITCH
// dl_emu_ctx_swap(save, load): pushes the callee-saved state on the current stack, stores the
// stack pointer at *save, switches to the stack `load` and pops the same layout from it:
//   [sp+0] MXCSR (4 bytes), x87 control word (2 bytes, at +4)
//   [sp+8] r15, r14, r13, r12, rbx, rbp, return address
// A new fiber's stack holds that layout with the fiber's entry function as the return address.
extern "C" void dl_emu_ctx_swap(void** save, void* load);
#if defined(__CET__)
#define DL_EMU_ENDBR "endbr64\n\t"
#else
#define DL_EMU_ENDBR ""
#endif
asm(".pushsection .text\n\t"
    ".globl dl_emu_ctx_swap\n\t"
    ".hidden dl_emu_ctx_swap\n\t"
    ".type dl_emu_ctx_swap, @function\n\t"
    ".p2align 4\n"
    "dl_emu_ctx_swap:\n\t" DL_EMU_ENDBR
    "pushq %rbp\n\t"
    "pushq %rbx\n\t"
    "pushq %r12\n\t"
    "pushq %r13\n\t"
    "pushq %r14\n\t"
    "pushq %r15\n\t"
    "subq $8, %rsp\n\t"
    "stmxcsr (%rsp)\n\t"
    "fnstcw 4(%rsp)\n\t"
    "movl (%rsp), %eax\n\t"  // same-size reloads: no store-forwarding stall
    "movzwl 4(%rsp), %edx\n\t"
    "movq %rsp, (%rdi)\n\t"
    "movq %rsi, %rsp\n\t"
    "cmpl (%rsp), %eax\n\t"  // load the FP control state only when it differs (rarely)
    "jne 2f\n\t"
    "cmpw 4(%rsp), %dx\n\t"
    "jne 2f\n"
    "1:\n\t"
    "addq $8, %rsp\n\t"
    "popq %r15\n\t"
    "popq %r14\n\t"
    "popq %r13\n\t"
    "popq %r12\n\t"
    "popq %rbx\n\t"
    "popq %rbp\n\t"
    "ret\n"
    "2:\n\t"
    "ldmxcsr (%rsp)\n\t"
    "fldcw 4(%rsp)\n\t"
    "jmp 1b\n\t"
    ".size dl_emu_ctx_swap, .-dl_emu_ctx_swap\n\t"
    ".popsection");
#endif

namespace dl_emu {

__thread View tls_view;

const char* kind_name(Kind k) {
  switch (k) {
    case K_NONE: return "(running)";
    case K_SYNCTHREADS: return "__syncthreads";
    case K_SYNCTHREADS_COUNT: return "__syncthreads_count";
    case K_SYNCTHREADS_AND: return "__syncthreads_and";
    case K_SYNCTHREADS_OR: return "__syncthreads_or";
    case K_SHFL: return "__shfl_sync";
    case K_SHFL_UP: return "__shfl_up_sync";
    case K_SHFL_DOWN: return "__shfl_down_sync";
    case K_SHFL_XOR: return "__shfl_xor_sync";
    case K_BALLOT: return "__ballot_sync";
    case K_ANY: return "__any_sync";
    case K_ALL: return "__all_sync";
    case K_SYNCWARP: return "__syncwarp";
    case K_MATCH_ANY: return "__match_any_sync";
    case K_MATCH_ALL: return "__match_all_sync";
    case K_REDUCE_ADD: return "__reduce_add_sync";
    case K_REDUCE_MIN: return "__reduce_min_sync";
    case K_REDUCE_MAX: return "__reduce_max_sync";
    case K_REDUCE_AND: return "__reduce_and_sync";
    case K_REDUCE_OR: return "__reduce_or_sync";
    case K_REDUCE_XOR: return "__reduce_xor_sync";
    default: return "(unknown barrier)";
  }
}

// ---------------------------------------------------------------------------------------------
// Registry: filled by static constructors before main, read-only afterwards.

namespace {
std::vector<Entry>& registry() {
  static std::vector<Entry>* r = new std::vector<Entry>;  // never destroyed: no exit-order issues
  return *r;
}
}  // namespace

void register_entry(const Entry& e) {
  if (find_entry(e.name)) {
    fprintf(stderr, "dl_emu: kernel %s registered twice; the first registration wins\n", e.name);
    return;
  }
  registry().push_back(e);
}
size_t entry_count() { return registry().size(); }
const Entry* entry_at(size_t i) { return i < registry().size() ? &registry()[i] : nullptr; }
const Entry* find_entry(const char* name) {
  if (!name) return nullptr;
  for (const Entry& e : registry())
    if (strcmp(e.name, name) == 0) return &e;
  return nullptr;
}

// ---------------------------------------------------------------------------------------------
// Scheduler state.

namespace {

constexpr uint32_t MAX_THREADS = 1024;
enum State : uint8_t { S_READY, S_RUNNING, S_WAITING, S_EXITED };

struct Ctx {
#if DL_EMU_ASM_SWITCH
  void* sp = nullptr;
#else
  ucontext_t uc;
#endif
  const void* asan_bottom = nullptr;  // the stack, for AddressSanitizer's fiber annotations
  size_t asan_size = 0;
};

struct Stack {
  char* map = nullptr;  // the mapping, guard page first
  size_t map_size = 0;
  char* lo = nullptr;  // usable stack [lo, lo + size)
  size_t size = 0;
  bool dirty = false;  // a fiber was abandoned on it: AddressSanitizer's shadow may be stale
};

struct Fiber {
  Ctx ctx;
  uint32_t tid = 0;
  uint8_t state = S_READY;
  Kind kind = K_NONE;
  uint32_t mask = 0;  // warp operations
  int32_t param = 0, width = 32;
  uint64_t value = 0, result = 0;
};

struct Sched {
  std::vector<Fiber> fibers;  // reserved for MAX_THREADS: addresses never move
  std::vector<Stack> stacks;
  Ctx main;
  Fiber* cur = nullptr;
  uint32_t queue[MAX_THREADS];
  uint32_t qhead = 0, qcount = 0;
  uint32_t n = 0;  // threads per block
  uint32_t exited = 0, block_arrived = 0;
  uint32_t warp_waiting[MAX_THREADS / 32];  // bit per lane waiting at a warp operation
  bool reverse = false, in_launch = false, failed = false, from_main = false;
  std::string error;
  char fiber_error[512];  // written on a fiber that is then abandoned: no heap (it would leak)
  const Entry* entry = nullptr;
  std::vector<unsigned char> args;
  uint64_t resumes = 0;
  Sched() { fibers.reserve(MAX_THREADS); }
  ~Sched() {
    for (Stack& s : stacks) munmap(s.map, s.map_size);
  }
};

__thread Sched* tls_sched;

// A thread's scheduler (with its fiber stacks) goes back to a process-wide pool when the thread
// exits, for the next thread: test harnesses run every test on a fresh thread.
std::mutex& pool_mutex() {
  static std::mutex* m = new std::mutex;
  return *m;
}
std::vector<Sched*>& pool() {
  static std::vector<Sched*>* p = new std::vector<Sched*>;
  return *p;
}
struct SchedOwner {
  bool armed = false;
  ~SchedOwner() {
    if (!tls_sched) return;
    Sched* s = tls_sched;
    tls_sched = nullptr;
    try {
      std::lock_guard<std::mutex> lock(pool_mutex());
      pool().push_back(s);
    } catch (...) {
      delete s;
    }
  }
};
thread_local SchedOwner tls_owner;

Sched& sched() {
  if (!tls_sched) {
    Sched* s = nullptr;
    {
      std::lock_guard<std::mutex> lock(pool_mutex());
      if (!pool().empty()) {
        s = pool().back();
        pool().pop_back();
      }
    }
    if (!s) s = new Sched;
    tls_sched = s;
    tls_owner.armed = true;  // registers the destructor for this thread
  }
  return *tls_sched;
}

size_t page_size() {
  static const size_t p = size_t(sysconf(_SC_PAGESIZE));
  return p;
}

size_t configured_stack_size() {
  static const size_t s = [] {
    size_t kib = DL_EMU_ASAN ? 128 : 64;
    if (const char* e = getenv("DL_EMU_STACK_KIB")) {
      long v = atol(e);
      if (v >= 16 && v <= 65536) kib = size_t(v);
    }
    const size_t p = page_size();
    return (kib * 1024 + p - 1) / p * p;
  }();
  return s;
}

// ---- switching ----

void after_switch(void* fake_stack) {
#if DL_EMU_ASAN
  const void* old_bottom = nullptr;
  size_t old_size = 0;
  __sanitizer_finish_switch_fiber(fake_stack, &old_bottom, &old_size);
  Sched& S = *tls_sched;
  if (S.from_main) {  // we came from the launching thread's own stack: remember its bounds
    S.main.asan_bottom = old_bottom;
    S.main.asan_size = old_size;
    S.from_main = false;
  }
#else
  (void)fake_stack;
#endif
}

// Switches from the running context `from` to `to`; `dying`: `from` never runs again.
inline void switch_ctx(Ctx& from, Ctx& to, bool dying) {
#if DL_EMU_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(dying ? nullptr : &fake, to.asan_bottom, to.asan_size);
#else
  (void)dying;
#endif
#if DL_EMU_ASM_SWITCH
  dl_emu_ctx_swap(&from.sp, to.sp);
#else
  swapcontext(&from.uc, &to.uc);
#endif
#if DL_EMU_ASAN
  after_switch(fake);
#endif
}

// ---- the ready queue (each fiber is in it at most once) ----

inline void push_back(Sched& S, uint32_t t) {
  S.queue[(S.qhead + S.qcount) & (MAX_THREADS - 1)] = t;
  ++S.qcount;
}
inline void push_front(Sched& S, uint32_t t) {
  S.qhead = (S.qhead - 1) & (MAX_THREADS - 1);
  S.queue[S.qhead] = t;
  ++S.qcount;
}
inline uint32_t pop_front(Sched& S) {
  const uint32_t t = S.queue[S.qhead];
  S.qhead = (S.qhead + 1) & (MAX_THREADS - 1);
  --S.qcount;
  return t;
}

// Makes `nx` the running fiber (the caller then switches to it).
inline void make_current(Sched& S, Fiber* nx) {
  nx->state = S_RUNNING;
  S.cur = nx;
  tls_view.tid = nx->tid;
  ++S.resumes;
}

// The running fiber `f` has stopped (waiting or exited): run the next ready fiber, or go back to
// the launching context when there is none (the block is done, or deadlocked).
inline void run_next(Sched& S, Fiber* f, bool dying) {
  if (S.qcount) {
    Fiber* nx = &S.fibers[pop_front(S)];
    make_current(S, nx);
    if (nx == f) return;  // released by its own arrival and first in line
    switch_ctx(f->ctx, nx->ctx, dying);
  } else {
    S.cur = nullptr;
    switch_ctx(f->ctx, S.main, dying);
  }
  // Resumed: whoever switched here made `f` current. (A fiber left waiting when the block
  // deadlocks is never resumed: its stack is reused.)
}

[[noreturn]] __attribute__((noinline, cold)) void fatal_outside(const char* what) {
  fprintf(stderr, "dl_emu: %s called outside a kernel launch\n", what);
  abort();
}

inline Sched& current(Fiber*& f, Kind k) {
  Sched* S = tls_sched;
  if (__builtin_expect(!S || !S->cur, 0)) fatal_outside(k == K_NONE ? "a CUDA device function" : kind_name(k));
  f = S->cur;
  return *S;
}

std::string vformat(const char* fmt, va_list ap) {
  char buf[512];
  vsnprintf(buf, sizeof buf, fmt, ap);
  return buf;
}
std::string format(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
std::string format(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  std::string s = vformat(fmt, ap);
  va_end(ap);
  return s;
}

// Ends the block from inside a fiber: the launching context sees S.failed and S.fiber_error.
[[noreturn]] void fail_in_fiber(Sched& S, Fiber* f, const char* fmt, ...) __attribute__((format(printf, 3, 4)));
[[noreturn]] void fail_in_fiber(Sched& S, Fiber* f, const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(S.fiber_error, sizeof S.fiber_error, fmt, ap);
  va_end(ap);
  S.failed = true;
  S.cur = nullptr;
  switch_ctx(f->ctx, S.main, true);
  abort();  // unreachable: an abandoned fiber is never resumed
}

void fiber_entry() {
  after_switch(nullptr);
  Sched& S = *tls_sched;
  Fiber* f = S.cur;
  bool threw = false;
  try {
    S.entry->invoke(S.entry->fn, S.args.data());
  } catch (...) {
    threw = true;
  }
  if (threw)
    fail_in_fiber(S, f, "a C++ exception escaped the kernel in block %u, thread %u", tls_view.block_idx, f->tid);
  f->state = S_EXITED;
  ++S.exited;
  run_next(S, f, true);
  abort();  // unreachable
}

// The stacks are a multiple of the page size apart: stagger their tops by a cache line per
// fiber so that the hot frames of a block's fibers do not all fall into the same cache sets.
inline size_t stack_color(uint32_t t) { return size_t(t & 63u) * 64u; }

void init_fiber(Sched& S, Fiber& f, Stack& st, uint32_t t) {
#if DL_EMU_ASAN
  if (st.dirty) {
    ASAN_UNPOISON_MEMORY_REGION(st.lo, st.size);
    st.dirty = false;
  }
#endif
  f.ctx.asan_bottom = st.lo;
  f.ctx.asan_size = st.size;
#if DL_EMU_ASM_SWITCH
  (void)S;
  char* top = reinterpret_cast<char*>(reinterpret_cast<uintptr_t>(st.lo + st.size - stack_color(t)) & ~uintptr_t(15));
  uint64_t* sp = reinterpret_cast<uint64_t*>(top - 72);
  sp[0] = 0x1F80u | (uint64_t(0x037Fu) << 32);  // default MXCSR and x87 control word
  for (int i = 1; i <= 6; ++i) sp[i] = 0;         // r15 r14 r13 r12 rbx rbp
  sp[7] = reinterpret_cast<uint64_t>(&fiber_entry);
  sp[8] = 0;  // fiber_entry's return address: none (ends backtraces)
  f.ctx.sp = sp;
#else
  (void)S;
  f.ctx.uc.uc_stack.ss_sp = st.lo;
  f.ctx.uc.uc_stack.ss_size = st.size - stack_color(t);
  f.ctx.uc.uc_stack.ss_flags = 0;
  f.ctx.uc.uc_link = nullptr;
  makecontext(&f.ctx.uc, &fiber_entry, 0);
#endif
}

// Grows the stack pool to n fibers. Returns false (with err) when memory runs out.
bool ensure_fibers(Sched& S, uint32_t n, std::string& err) {
  const size_t size = configured_stack_size(), guard = page_size();
  while (S.stacks.size() < n) {
    void* m = mmap(nullptr, size + guard, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) {
      err = "out of memory: cannot map a fiber stack";
      return false;
    }
    mprotect(m, guard, PROT_NONE);  // overflow faults instead of corrupting the neighbour
    Stack st;
    st.map = static_cast<char*>(m);
    st.map_size = size + guard;
    st.lo = st.map + guard;
    st.size = size;
    S.stacks.push_back(st);
  }
  while (S.fibers.size() < n) {
    S.fibers.emplace_back();
#if !DL_EMU_ASM_SWITCH
    if (getcontext(&S.fibers.back().ctx.uc) != 0) {
      S.fibers.pop_back();
      err = "getcontext failed";
      return false;
    }
#endif
  }
  return true;
}

// "lanes 0-15 wait at __shfl_down_sync, lanes 16-31 exited": consecutive runs of equal labels.
std::string describe_runs(const char* unit1, const char* unitn, uint32_t first, uint32_t count, uint32_t base,
                          const std::vector<std::string>& labels) {
  std::string out;
  int runs = 0;
  for (uint32_t i = 0; i < count;) {
    uint32_t j = i;
    while (j + 1 < count && labels[j + 1] == labels[i]) ++j;
    if (runs == 8) {
      out += ", ...";
      break;
    }
    if (runs++) out += ", ";
    if (i == j)
      out += format("%s %u %s", unit1, first + i - base, labels[i].c_str());
    else
      out += format("%s %u-%u %s", unitn, first + i - base, first + j - base, labels[i].c_str());
    i = j + 1;
  }
  return out;
}

// Why no fiber of the block can run.
std::string describe_deadlock(Sched& S) {
  const uint32_t n = S.n, b = tls_view.block_idx;
  auto label = [&](const Fiber& f, Kind head, uint32_t head_mask, bool verbose_head) -> std::string {
    if (f.state == S_EXITED) return "exited";
    if (f.state != S_WAITING) return "running";
    const bool warp = f.kind > K_LAST_BLOCK_KIND;
    std::string s;
    if (f.kind == head && (!warp || f.mask == head_mask) && !verbose_head)
      s = "wait";
    else
      s = std::string("wait at ") + kind_name(f.kind);
    if (warp && f.mask != 0xffffffffu) s += format(" (mask 0x%08x)", f.mask);
    return s;
  };
  // An incomplete warp operation is the more precise culprit: report the first such warp.
  for (uint32_t w = 0; w < n / 32; ++w) {
    const Fiber* head = nullptr;
    for (uint32_t l = 0; l < 32 && !head; ++l) {
      const Fiber& f = S.fibers[w * 32 + l];
      if (f.state == S_WAITING && f.kind > K_LAST_BLOCK_KIND) head = &f;
    }
    if (!head) continue;
    std::vector<std::string> labels(32);
    for (uint32_t l = 0; l < 32; ++l) labels[l] = label(S.fibers[w * 32 + l], head->kind, head->mask, true);
    return format("%s in block %u, warp %u: ", kind_name(head->kind), b, w) +
           describe_runs("lane", "lanes", w * 32, 32, w * 32, labels);
  }
  const Fiber* head = nullptr;
  for (uint32_t t = 0; t < n && !head; ++t)
    if (S.fibers[t].state == S_WAITING) head = &S.fibers[t];
  if (!head) return format("block %u stopped with no thread waiting (internal error)", b);
  std::vector<std::string> labels(n);
  for (uint32_t t = 0; t < n; ++t) labels[t] = label(S.fibers[t], head->kind, head->mask, false);
  return format("%s in block %u: ", kind_name(head->kind), b) + describe_runs("thread", "threads", 0, n, 0, labels);
}

// Runs block tls_view.block_idx to completion. False (with S.error) on a trap or deadlock.
bool run_block(Sched& S) {
  const uint32_t n = S.n;
  S.exited = 0;
  S.block_arrived = 0;
  S.failed = false;
  S.qhead = 0;
  S.qcount = 0;
  memset(S.warp_waiting, 0, sizeof S.warp_waiting);
  for (uint32_t t = 0; t < n; ++t) {
    Fiber& f = S.fibers[t];
    f.tid = t;
    f.state = S_READY;
    f.kind = K_NONE;
    init_fiber(S, f, S.stacks[t], t);
    push_back(S, S.reverse ? n - 1 - t : t);
  }
  Fiber* first = &S.fibers[pop_front(S)];
  make_current(S, first);
  S.from_main = true;
  switch_ctx(S.main, first->ctx, false);
  S.from_main = false;
  S.cur = nullptr;
  bool ok = !S.failed;
  if (!ok) S.error = S.fiber_error;
  if (ok && S.exited != n) {
    S.error = describe_deadlock(S);
    ok = false;
  }
  if (!ok)
    for (uint32_t t = 0; t < n; ++t)
      if (S.fibers[t].state != S_EXITED) S.stacks[t].dirty = true;
  return ok;
}

// Pushes the released lanes of `group` (bits, relative to warp w) to the front of the queue in
// the launch's thread order, so that the warp keeps running.
inline void release_warp_front(Sched& S, uint32_t w, uint32_t group) {
  if (!S.reverse) {
    for (int l = 31; l >= 0; --l)
      if (group >> l & 1u) push_front(S, w * 32 + uint32_t(l));
  } else {
    for (int l = 0; l < 32; ++l)
      if (group >> l & 1u) push_front(S, w * 32 + uint32_t(l));
  }
}

inline uint32_t shfl_src(Kind k, uint32_t lane, int32_t param, int32_t width) {
  const uint32_t w = uint32_t(width), seg = lane & ~(w - 1);
  switch (k) {
    case K_SHFL: return seg + (uint32_t(param) & (w - 1));
    case K_SHFL_UP: return (lane - seg) >= uint32_t(param) ? lane - uint32_t(param) : lane;
    case K_SHFL_DOWN: return (lane - seg) + uint64_t(uint32_t(param)) < w ? lane + uint32_t(param) : lane;
    case K_SHFL_XOR: {
      const uint32_t s = lane ^ uint32_t(param);
      return s > (seg | (w - 1)) ? lane : s;  // a later group (or beyond the warp): own value
    }
    default: return lane;
  }
}

// All lanes of `mask` in warp w wait at the same operation: compute every lane's result.
void complete_warp_op(Sched& S, uint32_t w, Kind k, uint32_t mask) {
  Fiber* base = &S.fibers[w * 32];
  switch (k) {
    case K_SHFL:
    case K_SHFL_UP:
    case K_SHFL_DOWN:
    case K_SHFL_XOR:
      for (uint32_t l = 0; l < 32; ++l) {
        if (!(mask >> l & 1u)) continue;
        Fiber& f = base[l];
        const uint32_t s = shfl_src(k, l, f.param, f.width);
        // A source lane outside the mask is undefined on CUDA: poison the value.
        f.result = (s < 32 && (mask >> s & 1u)) ? base[s].value : ~uint64_t(0);
      }
      return;
    case K_BALLOT:
    case K_ANY:
    case K_ALL: {
      uint32_t bits = 0;
      for (uint32_t l = 0; l < 32; ++l)
        if ((mask >> l & 1u) && base[l].value) bits |= 1u << l;
      const uint64_t r = k == K_BALLOT ? bits : k == K_ANY ? (bits != 0) : (bits == mask);
      for (uint32_t l = 0; l < 32; ++l)
        if (mask >> l & 1u) base[l].result = r;
      return;
    }
    case K_MATCH_ANY:
    case K_MATCH_ALL: {
      bool all = true;
      for (uint32_t l = 0; l < 32; ++l) {
        if (!(mask >> l & 1u)) continue;
        uint32_t same = 0;
        for (uint32_t m = 0; m < 32; ++m)
          if ((mask >> m & 1u) && base[m].value == base[l].value) same |= 1u << m;
        base[l].result = same;
        if (same != mask) all = false;
      }
      if (k == K_MATCH_ALL)  // result: mask when all equal, else 0; bit 32: the predicate
        for (uint32_t l = 0; l < 32; ++l)
          if (mask >> l & 1u) base[l].result = all ? (uint64_t(mask) | (uint64_t(1) << 32)) : 0;
      return;
    }
    case K_REDUCE_ADD:
    case K_REDUCE_MIN:
    case K_REDUCE_MAX:
    case K_REDUCE_AND:
    case K_REDUCE_OR:
    case K_REDUCE_XOR: {
      bool have = false;
      uint32_t acc = 0;
      const bool sgn = base[__builtin_ctz(mask)].param != 0;
      for (uint32_t l = 0; l < 32; ++l) {
        if (!(mask >> l & 1u)) continue;
        const uint32_t v = uint32_t(base[l].value);
        if (!have) {
          acc = v;
          have = true;
          continue;
        }
        switch (k) {
          case K_REDUCE_ADD: acc += v; break;
          case K_REDUCE_MIN: acc = sgn ? uint32_t(int32_t(v) < int32_t(acc) ? v : acc) : (v < acc ? v : acc); break;
          case K_REDUCE_MAX: acc = sgn ? uint32_t(int32_t(v) > int32_t(acc) ? v : acc) : (v > acc ? v : acc); break;
          case K_REDUCE_AND: acc &= v; break;
          case K_REDUCE_OR: acc |= v; break;
          default: acc ^= v; break;
        }
      }
      for (uint32_t l = 0; l < 32; ++l)
        if (mask >> l & 1u) base[l].result = acc;
      return;
    }
    default: return;  // __syncwarp
  }
}

const char* current_name() {
  Sched* S = tls_sched;
  return S && S->entry ? S->entry->name : "?";
}

}  // namespace

int block_barrier(Kind k, int pred) {
  Fiber* f;
  Sched& S = current(f, k);
  f->kind = k;
  f->value = pred != 0;
  f->state = S_WAITING;
  if (++S.block_arrived == S.n) {
    // Everyone is at a block barrier; release when all are at the same kind (otherwise nothing
    // can run any more and the launch reports the mismatch).
    bool same = true;
    uint32_t count = 0;
    for (uint32_t t = 0; t < S.n; ++t) {
      same &= S.fibers[t].kind == k;
      count += uint32_t(S.fibers[t].value);
    }
    if (same) {
      const uint64_t r = k == K_SYNCTHREADS_COUNT ? count
                         : k == K_SYNCTHREADS_AND ? (count == S.n)
                         : k == K_SYNCTHREADS_OR  ? (count != 0)
                                                  : 0;
      S.block_arrived = 0;
      for (uint32_t i = 0; i < S.n; ++i) {
        const uint32_t t = S.reverse ? S.n - 1 - i : i;
        S.fibers[t].result = r;
        S.fibers[t].state = S_READY;
        push_back(S, t);
      }
    }
  }
  run_next(S, f, false);
  return int(f->result);
}

uint64_t warp_op(Kind k, uint32_t mask, uint64_t value, int32_t param, int32_t width) {
  Fiber* f;
  Sched& S = current(f, k);
  const uint32_t lane = f->tid & 31u, w = f->tid >> 5;
  if (!(mask >> lane & 1u))
    fail_in_fiber(S, f, "%s in block %u, thread %u: lane %u is not in the mask 0x%08x", kind_name(k),
                  tls_view.block_idx, f->tid, lane, mask);
  if (width < 1 || width > 32 || (width & (width - 1)))
    fail_in_fiber(S, f, "%s in block %u, thread %u: width %d is not a power of two in [1, 32]", kind_name(k),
                  tls_view.block_idx, f->tid, width);
  f->kind = k;
  f->mask = mask;
  f->value = value;
  f->param = param;
  f->width = width;
  f->state = S_WAITING;
  uint32_t& waiting = S.warp_waiting[w];
  waiting |= 1u << lane;
  if ((waiting & mask) == mask) {
    Fiber* base = &S.fibers[w * 32];
    bool same = true;
    for (uint32_t l = 0; l < 32 && same; ++l)
      if (mask >> l & 1u) same = base[l].kind == k && base[l].mask == mask;
    if (same) {
      complete_warp_op(S, w, k, mask);
      waiting &= ~mask;
      for (uint32_t l = 0; l < 32; ++l)
        if (mask >> l & 1u) base[l].state = S_READY;
      release_warp_front(S, w, mask);
    }
  }
  run_next(S, f, false);
  return f->result;
}

void trap(const char* what) {
  Fiber* f;
  Sched& S = current(f, K_NONE);
  fail_in_fiber(S, f, "%s in block %u, thread %u", what, tls_view.block_idx, f->tid);
}

void yield() {
  Fiber* f;
  Sched& S = current(f, K_NONE);
  if (!S.qcount) return;
  f->state = S_READY;
  push_back(S, f->tid);
  run_next(S, f, false);
}

const char* switch_impl() { return DL_EMU_ASM_SWITCH ? "x86-64 asm" : "ucontext"; }
size_t stack_size() { return configured_stack_size(); }
uint64_t resume_count() { return tls_sched ? tls_sched->resumes : 0; }

// The launch itself; rc and err as dl_emu_launch. May throw std::bad_alloc.
int launch(const char* name, uint32_t grid, uint32_t block, const void* args, size_t args_size, int32_t flags,
           std::string& err) {
  const Entry* e = find_entry(name);
  if (!e) {
    err = format("no kernel named %s in the emulated device", name ? name : "(null)");
    return 1;
  }
  if (block == 0 || block > MAX_THREADS || block % 32 != 0) {
    err = format("%s: bad block size %u (a multiple of 32 in [32, %u])", e->name, block, MAX_THREADS);
    return 3;
  }
  if (block > e->max_threads) {
    err = format("%s: %u threads per block exceed the kernel's __launch_bounds__ (%u)", e->name, block,
                 e->max_threads);
    return 3;
  }
  if (grid == 0 || grid > 0x7fffffffu) {
    err = format("%s: bad grid size %u (in [1, 2^31 - 1])", e->name, grid);
    return 3;
  }
  if (args_size != e->args_size) {
    err = format("%s: %zu bytes of arguments given, the kernel takes %zu", e->name, args_size, e->args_size);
    return 3;
  }
  if (args_size && !args) {
    err = format("%s: null arguments", e->name);
    return 3;
  }
  if (flags & ~1) {
    err = format("%s: unknown launch flags 0x%x", e->name, unsigned(flags));
    return 3;
  }
  Sched& S = sched();
  if (S.in_launch) {
    err = format("%s: launched from inside kernel %s (the emulated device does not nest launches)", e->name,
                 current_name());
    return 3;
  }
  if (!ensure_fibers(S, block, err)) return 3;
  S.args.assign(static_cast<const unsigned char*>(args), static_cast<const unsigned char*>(args) + args_size);
  // Restores the thread's state however the launch ends (an exception included).
  struct Guard {
    Sched& S;
    View saved;
    ~Guard() {
      S.in_launch = false;
      S.entry = nullptr;
      S.cur = nullptr;
      S.error.clear();
      tls_view = saved;
    }
  } guard{S, tls_view};
  S.entry = e;
  S.n = block;
  S.reverse = (flags & 1) != 0;
  S.in_launch = true;
  tls_view.block_dim = block;
  tls_view.grid_dim = grid;
  for (uint32_t b = 0; b < grid; ++b) {
    tls_view.block_idx = b;
    if (!run_block(S)) {
      err = std::string(e->name) + ": " + S.error;
      return 2;
    }
  }
  return 0;
}

}  // namespace dl_emu

#endif  // DL_EMU_DEVICE_TU
