// Host emulation of the CUDA features the flash prefill kernels (native/kernels/attention.cu) use, so that their
// fragment layouts can be checked without a GPU: one std::thread per CUDA thread; __syncthreads is a barrier of the
// CTA's threads; warp collectives (ldmatrix, mma.sync m16n8k16, shfl, any) exchange through a per-warp buffer
// between two barriers of the warp's 32 threads, in PTX's documented fragment layouts; cp.async copies at once (its
// waits are then no-ops). Shared memory is a host buffer whose "shared address" 0 is its first byte; the kernel's
// dynamic shared memory starts at an offset the harness picks. Only what the kernels use, and every lane of a warp
// must reach each collective (the kernels branch only on warp-uniform conditions around them).
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

#define __device__
#define __host__
#define __forceinline__ inline
using std::max;
using std::min;
struct float2 { float x, y; };
struct float4 { float x, y, z, w; };
struct uint4 { uint32_t x, y, z, w; };
inline float2 make_float2(float a, float b) { return {a, b}; }
inline uint4 make_uint4(uint32_t a, uint32_t b, uint32_t c, uint32_t d) { return {a, b, c, d}; }
struct __nv_bfloat16 { uint16_t x; };
struct __nv_bfloat162 { __nv_bfloat16 x, y; };
// float -> bf16, round to nearest even (NaN stays NaN), and back.
inline uint16_t f2bf(float f) {
  uint32_t u; memcpy(&u, &f, 4);
  if ((u & 0x7fffffff) > 0x7f800000) return 0x7fc0;
  u += 0x7fff + ((u >> 16) & 1);
  return u >> 16;
}
inline float bf2f(uint16_t b) { uint32_t u = (uint32_t)b << 16; float f; memcpy(&f, &u, 4); return f; }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return {{f2bf(a)}, {f2bf(b)}}; }
struct Dim3 { unsigned x = 0, y = 0, z = 0; };
thread_local Dim3 threadIdx, blockIdx;
Dim3 gridDim;

struct Warp {
  std::barrier<> bar{32};
  uint64_t val[32];
  uint32_t regs[32][6];
  float acc[32][4];
};
struct Cta {
  unsigned char* window;  // the CTA's shared memory: shared address 0
  unsigned char* smem;    // its dynamic shared memory (window + the harness's offset)
  int rowPos[1024];
  std::barrier<> bar;
  Warp warps[32];
  explicit Cta(int threads) : bar(threads) {}
};
thread_local Cta* emuCtaPtr;
inline Cta& emuCta() { return *emuCtaPtr; }
inline Warp& emuWarp() { return emuCta().warps[threadIdx.x / 32]; }
inline int emuLane() { return threadIdx.x % 32; }
inline void __syncthreads() { emuCta().bar.arrive_and_wait(); }

inline uint32_t smemAddr(const void* p) { return (uint32_t)((const unsigned char*)p - emuCta().window); }
inline void cpAsync16(void* dst, const void* src, bool valid) {
  if (valid) memcpy(dst, src, 16); else memset(dst, 0, 16);
}
inline void cpAsyncCommit() {}
template <int N> inline void cpAsyncWait() {}

template <typename T> T exchange(T v, int from) {
  Warp& w = emuWarp();
  uint64_t bits = 0; memcpy(&bits, &v, sizeof(T));
  w.val[emuLane()] = bits;
  w.bar.arrive_and_wait();
  uint64_t got = w.val[from];
  w.bar.arrive_and_wait();
  T r; memcpy(&r, &got, sizeof(T));
  return r;
}
template <typename T> T __shfl_xor_sync(unsigned, T v, int o) { return exchange(v, emuLane() ^ o); }
template <typename T> T __shfl_sync(unsigned, T v, int src) { return exchange(v, src); }
inline bool __any_sync(unsigned, bool p) {
  Warp& w = emuWarp();
  w.val[emuLane()] = p;
  w.bar.arrive_and_wait();
  bool any = false;
  for (int i = 0; i < 32; ++i) any |= w.val[i] != 0;
  w.bar.arrive_and_wait();
  return any;
}
inline uint16_t smemHalf(uint32_t addr) { uint16_t v; memcpy(&v, emuCta().window + addr, 2); return v; }
// ldmatrix.x4: lane 8i + r gives the address of row r of matrix i; lane t receives, of each matrix, row t / 4,
// columns 2 (t % 4) and + 1 (.trans: of the transposed matrix, i.e. rows 2 (t % 4) and + 1 of column t / 4).
inline void ldmatrix(uint32_t* r, uint32_t addr, bool trans) {
  Warp& w = emuWarp();
  const int lane = emuLane();
  if (addr % 16) { fprintf(stderr, "ldmatrix row address %u not 16-byte aligned\n", addr); abort(); }
  w.val[lane] = addr;
  w.bar.arrive_and_wait();
  for (int i = 0; i < 4; ++i) {
    uint16_t lo, hi;
    if (!trans) {
      const uint32_t row = (uint32_t)w.val[8 * i + lane / 4];
      lo = smemHalf(row + 4 * (lane % 4));
      hi = smemHalf(row + 4 * (lane % 4) + 2);
    } else {
      lo = smemHalf((uint32_t)w.val[8 * i + 2 * (lane % 4)] + 2 * (lane / 4));
      hi = smemHalf((uint32_t)w.val[8 * i + 2 * (lane % 4) + 1] + 2 * (lane / 4));
    }
    r[i] = lo | ((uint32_t)hi << 16);
  }
  w.bar.arrive_and_wait();
}
inline void ldmatrixX4(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3, uint32_t addr) {
  uint32_t r[4]; ldmatrix(r, addr, false); r0 = r[0]; r1 = r[1]; r2 = r[2]; r3 = r[3];
}
inline void ldmatrixX4T(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3, uint32_t addr) {
  uint32_t r[4]; ldmatrix(r, addr, true); r0 = r[0]; r1 = r[1]; r2 = r[2]; r3 = r[3];
}
inline void ldmatrixX4(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3, const void* p) { ldmatrixX4(r0, r1, r2, r3, smemAddr(p)); }
inline void ldmatrixX4T(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3, const void* p) { ldmatrixX4T(r0, r1, r2, r3, smemAddr(p)); }
inline float lo16(uint32_t v) { return bf2f(v & 0xffff); }
inline float hi16(uint32_t v) { return bf2f(v >> 16); }
// mma.sync.m16n8k16.row.col, bf16 in, fp32 accumulate. Lane t (g = t / 4, q = t % 4) holds A's rows g and g + 8 at
// columns 2q, 2q + 1 (a0: row g, a1: row g + 8) and 2q + 8, + 9 (a2, a3); B's column g at rows 2q, + 1 (b0) and
// 2q + 8, + 9 (b1); C's rows g (c0, c1) and g + 8 (c2, c3) at columns 2q, 2q + 1. Low half: the lower column / row.
inline void mma16816(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
  Warp& w = emuWarp();
  const int lane = emuLane();
  for (int i = 0; i < 4; ++i) w.regs[lane][i] = a[i];
  w.regs[lane][4] = b0; w.regs[lane][5] = b1;
  w.bar.arrive_and_wait();
  float A[16][16], B[16][8];
  for (int t = 0; t < 32; ++t) {
    const int g = t / 4, tq = t % 4;
    const uint32_t* r = w.regs[t];
    A[g][2 * tq] = lo16(r[0]); A[g][2 * tq + 1] = hi16(r[0]);
    A[g + 8][2 * tq] = lo16(r[1]); A[g + 8][2 * tq + 1] = hi16(r[1]);
    A[g][2 * tq + 8] = lo16(r[2]); A[g][2 * tq + 9] = hi16(r[2]);
    A[g + 8][2 * tq + 8] = lo16(r[3]); A[g + 8][2 * tq + 9] = hi16(r[3]);
    B[2 * tq][g] = lo16(r[4]); B[2 * tq + 1][g] = hi16(r[4]);
    B[2 * tq + 8][g] = lo16(r[5]); B[2 * tq + 9][g] = hi16(r[5]);
  }
  w.bar.arrive_and_wait();
  const int g = lane / 4, tq = lane % 4;
  for (int e = 0; e < 4; ++e) {
    const int row = g + (e >= 2 ? 8 : 0), col = 2 * tq + (e & 1);
    float s = 0.f;
    for (int k = 0; k < 16; ++k) s += A[row][k] * B[k][col];
    c[e] += s;
  }
}
