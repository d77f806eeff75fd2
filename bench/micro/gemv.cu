// The decode GEMMs of Llama-3.1-8B, y[m, n] = x[m, k] . w[n, k]^T (bf16 in, fp32 out), through Tandem's skinny
// GEMM (native/kernels/gemv.cu: the engine's entry points tandem_gemv_m<M> and other geometries of the same
// template) against cublasGemmEx (dlopened as the engine does) and a device-to-device copy of the same weight
// bytes. Shapes: QKV 6144 x 4096, o_proj 4096 x 4096, gate_up 28672 x 4096, down 4096 x 14336,
// lm_head 128256 x 4096; m = 1, 2, 4, 8, 16.
//
// Checks first, and fails loudly (exit 1): every entry point m = 1..16 and every geometry against a float64
// CPU reference on odd shapes (k not a multiple of 8, n not a multiple of the rows per CTA, n smaller than one
// CTA's rows) and on sampled rows of every 8B case; every output element written (outputs poisoned with NaN
// first); the kernel against cuBLAS (relative L2 error). Then times, with CUDA events, the median of 5 batches
// of launches that rotate over enough copies of the weights (>= 256 MB) that L2 (50 MB) cannot hold them.
// GB/s counts the bytes a GEMM must move (w + x read, y written); the copy counts bytes read + written; "% copy"
// is the first over the second. Last: the GEMM time of one 8B decode step (32 layers + lm_head) per m, for
// the kernel, cuBLAS and the copy bound: where the kernel stops beating cuBLAS is the engine's crossover
// (kGemvMaxBatch in native/src/engine/cuda_llama.cpp; TANDEM_GEMV=<m> moves it without a rebuild).
// gate_up also runs as the engine runs it up to the crossover, tandem_gemv_swiglu_m<M> (the GEMV with SiLU * up
// fused, bf16 out), checked (as is cuBLAS + tandem_llama_silu_mul) against float64 silu(g) * u from the same bf16
// inputs (two bf16 ulps plus the fp32 accumulation error; see swigluMismatches) and timed against the unfused
// pair (GEMV + silu_mul).
//
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -o gemv gemv.cu -ldl && ./gemv
#include "micro.h"

#include "../../native/kernels/gemv.cu"
#include "../../native/kernels/llama.cu"

#include <dlfcn.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

namespace {

typedef __nv_bfloat16 bf16;
using tandem_gemv::kThreads;
using tandem_gemv::rowsFor;

float bf16ToFloat(uint16_t v) {
  uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// ---- cuBLAS, dlopened (no link-time dependency, as native/src/engine/cublas.cpp) ----
struct Cublas {
  void* handle = nullptr;
  int (*create)(void**) = nullptr;
  int (*setStream)(void*, cudaStream_t) = nullptr;
  int (*gemmEx)(void*, int, int, int, int, int, const void*, const void*, int, int, const void*, int, int,
                const void*, void*, int, int, int, int) = nullptr;
  std::string path;
};

Cublas loadCublas() {
  Cublas c;
  const char* candidates[] = {"libcublas.so.13", "libcublas.so.12", "/usr/local/cuda/lib64/libcublas.so.13",
                              "/usr/local/cuda/lib64/libcublas.so.12", "libcublas.so"};
  void* lib = nullptr;
  for (const char* name : candidates)
    if ((lib = dlopen(name, RTLD_NOW | RTLD_LOCAL))) {
      c.path = name;
      break;
    }
  if (!lib) {
    std::printf("FAIL: cuBLAS not found (tried libcublas.so.13/.12; set LD_LIBRARY_PATH=/usr/local/cuda/lib64)\n");
    std::exit(1);
  }
  c.create = reinterpret_cast<decltype(c.create)>(dlsym(lib, "cublasCreate_v2"));
  c.setStream = reinterpret_cast<decltype(c.setStream)>(dlsym(lib, "cublasSetStream_v2"));
  c.gemmEx = reinterpret_cast<decltype(c.gemmEx)>(dlsym(lib, "cublasGemmEx"));
  if (!c.create || !c.setStream || !c.gemmEx) {
    std::printf("FAIL: %s lacks cublasCreate_v2 / cublasSetStream_v2 / cublasGemmEx\n", c.path.c_str());
    std::exit(1);
  }
  if (int s = c.create(&c.handle)) {
    std::printf("FAIL: cublasCreate: %d\n", s);
    std::exit(1);
  }
  return c;
}

// The engine's call (CudaLlama::gemm): y^T (n x m) = w (k x n)^T . x^T (k x m) in column-major terms.
void cublasGemm(const Cublas& c, const bf16* x, int m, int k, const bf16* w, int n, float* y) {
  const float one = 1.0f, zero = 0.0f;
  int s = c.gemmEx(c.handle, 1 /*T*/, 0 /*N*/, n, m, k, &one, w, 14 /*bf16*/, k, x, 14, k, &zero, y, 0 /*fp32*/, n,
                   68 /*compute 32F*/, -1 /*default algo*/);
  if (s) {
    std::printf("FAIL: cublasGemmEx (%d x %d x %d): status %d\n", m, n, k, s);
    std::exit(1);
  }
}

// ---- kernels under test ----
typedef void (*EntryKernel)(const bf16*, const bf16*, float*, int, int);
const EntryKernel kEntries[tandem_gemv::kMaxM] = {
    tandem_gemv_m1,  tandem_gemv_m2,  tandem_gemv_m3,  tandem_gemv_m4,  tandem_gemv_m5,  tandem_gemv_m6,
    tandem_gemv_m7,  tandem_gemv_m8,  tandem_gemv_m9,  tandem_gemv_m10, tandem_gemv_m11, tandem_gemv_m12,
    tandem_gemv_m13, tandem_gemv_m14, tandem_gemv_m15, tandem_gemv_m16};

template <int M, int ROWS, int THREADS, int UNROLL>
__global__ void __launch_bounds__(THREADS) geometry(const bf16* x, const bf16* w, float* y, int n, int k) {
  tandem_gemv::gemv<M, ROWS, THREADS, UNROLL>(x, w, y, n, k);
}

struct Variant {
  std::string name;
  void (*launch)(const bf16*, const bf16*, float*, int n, int k, int grid);  // grid 0: ceil(n / rows)
};

template <int M, int ROWS, int THREADS, int UNROLL>
Variant variant() {
  char name[64];
  std::snprintf(name, sizeof(name), "r%d u%d t%d", ROWS, UNROLL, THREADS);
  return {name, [](const bf16* x, const bf16* w, float* y, int n, int k, int grid) {
            geometry<M, ROWS, THREADS, UNROLL><<<grid ? grid : (n + ROWS - 1) / ROWS, THREADS>>>(x, w, y, n, k);
          }};
}

// The engine's entry point first, then other geometries (rows per CTA, loads in flight, threads per CTA).
template <int M>
std::vector<Variant> variants() {
  std::vector<Variant> v;
  v.push_back({"engine", [](const bf16* x, const bf16* w, float* y, int n, int k, int grid) {
                 const int rows = rowsFor(M);
                 kEntries[M - 1]<<<grid ? grid : (n + rows - 1) / rows, kThreads>>>(x, w, y, n, k);
               }});
  v.push_back(variant<M, 1, 128, 8>());
  v.push_back(variant<M, 2, 128, 4>());
  v.push_back(variant<M, 2, 256, 4>());
  v.push_back(variant<M, 4, 128, 2>());
  v.push_back(variant<M, 4, 256, 2>());
  if (M <= 8) v.push_back(variant<M, 8, 128, 2>());
  return v;
}

std::vector<Variant> variantsFor(int m) {
  switch (m) {
    case 1: return variants<1>();
    case 2: return variants<2>();
    case 4: return variants<4>();
    case 8: return variants<8>();
    case 16: return variants<16>();
  }
  return {};
}

typedef void (*SwigluKernel)(const bf16*, const bf16*, bf16*, int, int);
const SwigluKernel kSwiglu[tandem_gemv::kMaxM] = {
    tandem_gemv_swiglu_m1,  tandem_gemv_swiglu_m2,  tandem_gemv_swiglu_m3,  tandem_gemv_swiglu_m4,
    tandem_gemv_swiglu_m5,  tandem_gemv_swiglu_m6,  tandem_gemv_swiglu_m7,  tandem_gemv_swiglu_m8,
    tandem_gemv_swiglu_m9,  tandem_gemv_swiglu_m10, tandem_gemv_swiglu_m11, tandem_gemv_swiglu_m12,
    tandem_gemv_swiglu_m13, tandem_gemv_swiglu_m14, tandem_gemv_swiglu_m15, tandem_gemv_swiglu_m16};

void launchSwiglu(int m, const bf16* x, const bf16* w, bf16* act, int inter, int k) {
  const int pairs = rowsFor(m) / 2;
  kSwiglu[m - 1]<<<(inter + pairs - 1) / pairs, kThreads>>>(x, w, act, inter, k);
}

// act[m, inter] (bf16, device) = silu(g) * u, g and u the gate and up rows of w (gate rows 0..inter-1, up rows
// inter..2 inter-1) against float64 on the host for the given rows, from the same bf16 inputs. Every element must
// be finite; each may be off by two bf16 ulps of the reference (the rounding to bf16 of a result whose fp32
// sums differ from float64 in order) plus the fp32 accumulation error of g and u (kTolerance of sum |w| |x|)
// carried through silu(g) * u. Near-ties and silu's slope make the first term matter; a wrong index or a lost
// term is O(|ref|) and fails. Returns the number of elements outside that.
size_t swigluMismatches(const bf16* dAct, const bf16* dX, const bf16* dW, int m, int inter, int k,
                        const std::vector<int>& rows, double accumulation) {
  std::vector<uint16_t> x((size_t)m * k), gRow(k), uRow(k), act((size_t)m * inter);
  CHECK(cudaMemcpy(x.data(), dX, x.size() * 2, cudaMemcpyDeviceToHost));
  CHECK(cudaMemcpy(act.data(), dAct, act.size() * 2, cudaMemcpyDeviceToHost));
  size_t bad = 0;
  for (uint16_t v : act)
    if (!std::isfinite(bf16ToFloat(v))) ++bad;
  for (int r : rows) {
    if (r >= inter) continue;
    CHECK(cudaMemcpy(gRow.data(), dW + (size_t)r * k, (size_t)k * 2, cudaMemcpyDeviceToHost));
    CHECK(cudaMemcpy(uRow.data(), dW + (size_t)(inter + r) * k, (size_t)k * 2, cudaMemcpyDeviceToHost));
    for (int i = 0; i < m; ++i) {
      double g = 0, u = 0, gMag = 0, uMag = 0;
      for (int e = 0; e < k; ++e) {
        const double xe = bf16ToFloat(x[(size_t)i * k + e]);
        const double pg = bf16ToFloat(gRow[e]) * xe, pu = bf16ToFloat(uRow[e]) * xe;
        g += pg;
        u += pu;
        gMag += std::fabs(pg);
        uMag += std::fabs(pu);
      }
      const double sig = 1 / (1 + std::exp(-g)), silu = g * sig, slope = sig * (1 + g * (1 - sig));
      const double ref = silu * u;
      const double tol = std::ldexp(std::fabs(ref), -6) + 1e-30 +  // two bf16 ulps (8 significant bits)
                         accumulation * (std::fabs(slope * u) * gMag + std::fabs(silu) * uMag);
      const double got = bf16ToFloat(act[(size_t)i * inter + r]);
      if (!(std::fabs(got - ref) <= tol)) ++bad;
    }
  }
  return bad;
}

void launchEntry(int m, const bf16* x, const bf16* w, float* y, int n, int k, int grid = 0) {
  const int rows = rowsFor(m);
  kEntries[m - 1]<<<grid ? grid : (n + rows - 1) / rows, kThreads>>>(x, w, y, n, k);
}

// Uniform in [-1, 1), from a hash of (seed, index): fresh inputs per case without a host round-trip.
__global__ void fillBf16(bf16* p, size_t count, uint32_t seed) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < count; i += (size_t)gridDim.x * blockDim.x) {
    uint32_t h = (uint32_t)i * 0x9e3779b1u ^ seed ^ (uint32_t)(i >> 32) * 0x85ebca6bu;
    h ^= h >> 16;
    h *= 0x7feb352du;
    h ^= h >> 15;
    h *= 0x846ca68bu;
    h ^= h >> 16;
    p[i] = __float2bfloat16((float)(h >> 8) * (2.0f / 16777216.0f) - 1.0f);
  }
}

void fill(bf16* p, size_t count, uint32_t seed) {
  fillBf16<<<1024, 256>>>(p, count, seed);
  CHECK(cudaGetLastError());
}

int failures = 0;
void fail(const std::string& what) {
  std::printf("FAIL: %s\n", what.c_str());
  ++failures;
}

// y (device, m x n) against float64 on the host for the given rows; every element of those rows must be finite.
// Returns the largest |y - ref| / (sum |w| |x| of that dot product), a bound-relative error immune to
// cancellation (fp32 accumulation of exact bf16 products lands near 1e-7).
double checkRows(const float* dY, const bf16* dX, const bf16* dW, int m, int n, int k, const std::vector<int>& rows) {
  std::vector<uint16_t> x((size_t)m * k), wrow(k);
  CHECK(cudaMemcpy(x.data(), dX, x.size() * 2, cudaMemcpyDeviceToHost));
  std::vector<float> y((size_t)m * n);
  CHECK(cudaMemcpy(y.data(), dY, y.size() * 4, cudaMemcpyDeviceToHost));
  double worst = 0;
  for (int row : rows) {
    CHECK(cudaMemcpy(wrow.data(), dW + (size_t)row * k, (size_t)k * 2, cudaMemcpyDeviceToHost));
    for (int i = 0; i < m; ++i) {
      double dot = 0, mag = 0;
      for (int e = 0; e < k; ++e) {
        const double p = (double)bf16ToFloat(wrow[e]) * bf16ToFloat(x[(size_t)i * k + e]);
        dot += p;
        mag += std::fabs(p);
      }
      const float got = y[(size_t)i * n + row];
      if (!std::isfinite(got)) return INFINITY;
      worst = std::max(worst, std::fabs(got - dot) / std::max(mag, 1e-30));
    }
  }
  return worst;
}

bool allFinite(const float* dY, size_t count) {
  std::vector<float> y(count);
  CHECK(cudaMemcpy(y.data(), dY, count * 4, cudaMemcpyDeviceToHost));
  for (float v : y)
    if (!std::isfinite(v)) return false;
  return true;
}

// ||a - b|| / ||b|| over two device arrays.
double relativeL2(const float* dA, const float* dB, size_t count) {
  std::vector<float> a(count), b(count);
  CHECK(cudaMemcpy(a.data(), dA, count * 4, cudaMemcpyDeviceToHost));
  CHECK(cudaMemcpy(b.data(), dB, count * 4, cudaMemcpyDeviceToHost));
  double num = 0, den = 0;
  for (size_t i = 0; i < count; ++i) {
    num += ((double)a[i] - b[i]) * ((double)a[i] - b[i]);
    den += (double)b[i] * b[i];
  }
  return std::sqrt(num / den);
}

constexpr double kTolerance = 1e-5;  // of the bound sum |w| |x|; a wrong index or a lost term is O(1e-2) or more

// Correctness on shapes the 8B model does not have: every entry point, odd k and n, grids smaller than the
// row count (the kernel strides over row groups), and misaligned x (the scalar path).
void checkOddShapes() {
  struct Shape {
    int n, k;
    const char* why;
  };
  const Shape shapes[] = {{1000, 1032, "k % 8 == 0"},  {4099, 4100, "k % 8 == 4: scalar path"},
                          {3, 4096, "n < rows per CTA"}, {257, 7, "k < 8"},
                          {128, 64, "dummy:tiny"},       {4097, 4104, "n % 4 == 1"}};
  size_t maxW = 0, maxX = 0, maxY = 0;
  for (const Shape& s : shapes) {
    maxW = std::max(maxW, (size_t)s.n * s.k);
    maxX = std::max(maxX, (size_t)16 * s.k + 8);
    maxY = std::max(maxY, (size_t)16 * s.n);
  }
  bf16 *w, *x;
  float* y;
  CHECK(cudaMalloc(&w, maxW * 2));
  CHECK(cudaMalloc(&x, maxX * 2));
  CHECK(cudaMalloc(&y, maxY * 4));
  uint32_t seed = 1;
  int checked = 0;
  for (const Shape& s : shapes) {
    std::vector<int> rows;
    for (int r = 0; r < s.n; r += std::max(1, s.n / 61)) rows.push_back(r);
    rows.push_back(s.n - 1);
    for (int m = 1; m <= tandem_gemv::kMaxM; ++m) {
      fill(w, (size_t)s.n * s.k, seed++);
      fill(x, (size_t)m * s.k + 8, seed++);
      for (int grid : {0, 3}) {
        for (int misaligned : {0, 1}) {
          if (misaligned && grid) continue;
          const bf16* xs = x + misaligned;  // 2 bytes off: the vector path must not be taken
          CHECK(cudaMemset(y, 0xff, (size_t)m * s.n * 4));
          launchEntry(m, xs, w, y, s.n, s.k, grid);
          CHECK(cudaGetLastError());
          CHECK(cudaDeviceSynchronize());
          const bool written = allFinite(y, (size_t)m * s.n);
          const double err = checkRows(y, xs, w, m, s.n, s.k, rows);
          ++checked;
          if (!written || !(err < kTolerance))
            fail("tandem_gemv_m" + std::to_string(m) + " n=" + std::to_string(s.n) + " k=" + std::to_string(s.k) +
                 " (" + s.why + ") grid=" + std::to_string(grid) + (misaligned ? " misaligned x" : "") +
                 ": error " + std::to_string(err) + (written ? "" : ", unwritten outputs"));
        }
      }
    }
    for (int m : {1, 2, 4, 8, 16})
      for (const Variant& v : variantsFor(m)) {
        fill(x, (size_t)m * s.k, seed++);
        CHECK(cudaMemset(y, 0xff, (size_t)m * s.n * 4));
        v.launch(x, w, y, s.n, s.k, 0);
        CHECK(cudaGetLastError());
        CHECK(cudaDeviceSynchronize());
        const bool written = allFinite(y, (size_t)m * s.n);
        const double err = checkRows(y, x, w, m, s.n, s.k, rows);
        ++checked;
        if (!written || !(err < kTolerance))
          fail("geometry " + v.name + " m=" + std::to_string(m) + " n=" + std::to_string(s.n) +
               " k=" + std::to_string(s.k) + ": error " + std::to_string(err));
      }
  }
  std::printf("odd shapes: %d runs checked against float64 (%d failures)\n", checked, failures);
  CHECK(cudaFree(w));
  CHECK(cudaFree(x));
  CHECK(cudaFree(y));
}


struct Gemm {
  const char* name;
  int n, k, perStep;  // perStep: how many times one 8B decode step runs it
};

}  // namespace

int main() {
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s, %d SMs, L2 %d MB\n", prop.name, prop.multiProcessorCount, prop.l2CacheSize >> 20);
  Cublas cublas = loadCublas();
  std::printf("cuBLAS: %s\n", cublas.path.c_str());

  checkOddShapes();

  const Gemm gemms[] = {{"qkv", 6144, 4096, 32},
                        {"o_proj", 4096, 4096, 32},
                        {"gate_up", 28672, 4096, 32},
                        {"down", 4096, 14336, 32},
                        {"lm_head", 128256, 4096, 1}};
  const int ms[] = {1, 2, 4, 8, 16};
  constexpr size_t kRotateBytes = 256ull << 20;

  struct Row {
    std::string gemm;
    int m;
    double weightBytes, bytes, ours, best, cublas, copy;  // bytes: w + x read, y written; times in ms
    std::string bestName;
  };
  std::vector<Row> table;
  struct Swiglu {
    int m;
    double fused, split;  // ms
  };
  std::vector<Swiglu> swiglu;
  uint32_t seed = 1000;
  for (const Gemm& g : gemms) {
    const size_t wCount = (size_t)g.n * g.k, wBytes = wCount * 2;
    const int copies = (int)std::max<size_t>(1, (kRotateBytes + wBytes - 1) / wBytes);
    std::vector<bf16*> w(copies);
    for (bf16*& p : w) {
      CHECK(cudaMalloc(&p, wBytes));
      fill(p, wCount, seed++);
    }
    bf16 *x, *copyDst;
    float *y, *yRef;
    CHECK(cudaMalloc(&x, (size_t)16 * g.k * 2));
    CHECK(cudaMalloc(&y, (size_t)16 * g.n * 4));
    CHECK(cudaMalloc(&yRef, (size_t)16 * g.n * 4));
    CHECK(cudaMalloc(&copyDst, wBytes));
    // Enough launches per batch that a batch moves >= 16 GB (and at least 20).
    const int reps = (int)std::max<size_t>(20, (16ull << 30) / wBytes);
    const double copyMs =
        timeMs([&](int i) { CHECK(cudaMemcpyAsync(copyDst, w[i % copies], wBytes, cudaMemcpyDeviceToDevice)); }, reps);
    bf16 *act = nullptr, *actRef = nullptr;
    const int inter = g.n / 2;
    if (std::string(g.name) == "gate_up") {
      CHECK(cudaMalloc(&act, (size_t)16 * inter * 2));
      CHECK(cudaMalloc(&actRef, (size_t)16 * inter * 2));
    }
    std::vector<int> rows;
    for (int r = 0; r < g.n; r += g.n / 37) rows.push_back(r);
    rows.push_back(g.n - 1);

    for (int m : ms) {
      fill(x, (size_t)m * g.k, seed++);
      // Correctness on w[0]: cuBLAS and every geometry against float64 on sampled rows, then against cuBLAS.
      CHECK(cudaMemset(yRef, 0xff, (size_t)m * g.n * 4));
      cublasGemm(cublas, x, m, g.k, w[0], g.n, yRef);
      CHECK(cudaDeviceSynchronize());
      const double cublasErr = checkRows(yRef, x, w[0], m, g.n, g.k, rows);
      if (!(cublasErr < 1e-3)) fail(std::string("cuBLAS itself disagrees with float64 on ") + g.name);
      Row row{g.name, m, (double)wBytes, (double)wBytes + (double)m * g.k * 2 + (double)m * g.n * 4, 0, 1e30, 0,
              copyMs, ""};
      for (const Variant& v : variantsFor(m)) {
        CHECK(cudaMemset(y, 0xff, (size_t)m * g.n * 4));
        v.launch(x, w[0], y, g.n, g.k, 0);
        CHECK(cudaGetLastError());
        CHECK(cudaDeviceSynchronize());
        const bool written = allFinite(y, (size_t)m * g.n);
        const double err = checkRows(y, x, w[0], m, g.n, g.k, rows);
        const double vsCublas = relativeL2(y, yRef, (size_t)m * g.n);
        if (!written || !(err < kTolerance) || !(vsCublas < 1e-4))
          fail(std::string(g.name) + " m=" + std::to_string(m) + " " + v.name + ": error " + std::to_string(err) +
               " (float64), " + std::to_string(vsCublas) + " (relative L2 against cuBLAS)" +
               (written ? "" : ", unwritten outputs"));
        const double t = timeMs([&](int i) { v.launch(x, w[i % copies], y, g.n, g.k, 0); }, reps);
        if (v.name == "engine") row.ours = t;
        if (t < row.best) {
          row.best = t;
          row.bestName = v.name;
        }
      }
      row.cublas = timeMs([&](int i) { cublasGemm(cublas, x, m, g.k, w[i % copies], g.n, y); }, reps);
      table.push_back(row);
      if (act) {
        CHECK(cudaMemset(act, 0xff, (size_t)m * inter * 2));
        launchSwiglu(m, x, w[0], act, inter, g.k);
        tandem_llama_silu_mul<<<m, 256>>>(yRef, inter, actRef);  // yRef: cuBLAS's gate_up of w[0] above
        CHECK(cudaGetLastError());
        CHECK(cudaDeviceSynchronize());
        // Both paths the engine takes (fused GEMV up to the crossover, cuBLAS + silu_mul above) against float64.
        for (const auto& [path, out] : {std::pair<const char*, const bf16*>{"fused GEMV", act}, {"cuBLAS + silu_mul", actRef}}) {
          const size_t bad = swigluMismatches(out, x, w[0], m, inter, g.k, rows, kTolerance);
          if (bad) fail("gate_up swiglu m=" + std::to_string(m) + " (" + path + "): " + std::to_string(bad) +
                        " outputs non-finite or off float64 silu(g) * u by more than 2 bf16 ulps + accumulation");
        }
        const double fused = timeMs([&](int i) { launchSwiglu(m, x, w[i % copies], act, inter, g.k); }, reps);
        const double split = timeMs(
            [&](int i) {
              launchEntry(m, x, w[i % copies], y, g.n, g.k);
              tandem_llama_silu_mul<<<m, 256>>>(y, inter, act);
            },
            reps);
        std::printf("gate_up  m=%-2d swiglu-fused %7.1f us  GEMV + silu_mul %7.1f us\n", m, fused * 1e3, split * 1e3);
        swiglu.push_back({m, fused, split});
      }
      std::printf("%-8s m=%-2d engine %7.1f us  best %7.1f us (%s)  cuBLAS %7.1f us  copy %7.1f us\n", g.name, m,
                  row.ours * 1e3, row.best * 1e3, row.bestName.c_str(), row.cublas * 1e3, copyMs * 1e3);
      std::fflush(stdout);
    }
    for (bf16* p : w) CHECK(cudaFree(p));
    CHECK(cudaFree(x));
    CHECK(cudaFree(y));
    CHECK(cudaFree(yRef));
    CHECK(cudaFree(copyDst));
    if (act) {
      CHECK(cudaFree(act));
      CHECK(cudaFree(actRef));
    }
  }

  std::printf("\n%-8s %3s %9s | %9s %8s %6s | %9s %6s %-14s | %9s %8s %6s | %7s\n", "gemm", "m", "MB", "engine us",
              "GB/s", "%copy", "best us", "%copy", "best geometry", "cuBLAS us", "GB/s", "%copy", "speedup");
  for (const Row& r : table) {
    const double copyRate = 2.0 * r.weightBytes / (r.copy * 1e6);  // GB/s, bytes read + written
    auto gbs = [&](double ms) { return r.bytes / (ms * 1e6); };
    std::printf("%-8s %3d %9.1f | %9.1f %8.0f %5.1f%% | %9.1f %5.1f%% %-14s | %9.1f %8.0f %5.1f%% | %6.2fx\n",
                r.gemm.c_str(), r.m, r.bytes / 1e6, r.ours * 1e3, gbs(r.ours), 100 * gbs(r.ours) / copyRate,
                r.best * 1e3, 100 * gbs(r.best) / copyRate, r.bestName.c_str(), r.cublas * 1e3, gbs(r.cublas),
                100 * gbs(r.cublas) / copyRate, r.cublas / r.ours);
  }

  std::printf("\nGEMMs of one 8B decode step (32 layers + lm_head):\n%3s %12s %12s %12s %14s\n", "m", "engine ms",
              "cuBLAS ms", "copy ms", "faster");
  for (int m : ms) {
    double ours = 0, cub = 0, copy = 0;
    for (const Row& r : table) {
      if (r.m != m) continue;
      const int per = r.gemm == "lm_head" ? 1 : 32;
      ours += per * r.ours;
      cub += per * r.cublas;
      copy += per * r.copy / 2;  // the copy moves the weight bytes twice
    }
    std::printf("%3d %12.3f %12.3f %12.3f %14s\n", m, ours, cub, copy, ours < cub ? "engine kernel" : "cuBLAS");
  }
  std::printf("\ngate_up with SiLU * up fused (what the engine runs up to the crossover), 32 layers:\n%3s %12s %18s\n",
              "m", "fused ms", "GEMV+silu_mul ms");
  for (const Swiglu& s : swiglu) std::printf("%3d %12.3f %18.3f\n", s.m, 32 * s.fused, 32 * s.split);
  if (failures) {
    std::printf("\nFAIL: %d check(s) failed (see FAIL lines above)\n", failures);
    return 1;
  }
  std::printf("\nall checks passed\n");
  return 0;
}
