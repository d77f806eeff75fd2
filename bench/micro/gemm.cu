// The GEMMs of Llama-3.1-8B above the GEMV crossover, y[m, n] = x[m, k] . w[n, k]^T (bf16 in, fp32 accumulate),
// through the engine's two paths (native/src/engine/cublas.cpp, compiled in here, loading the libraries as the
// engine does): cublasGemmEx with CUBLAS_GEMM_DEFAULT (TANDEM_GEMM=gemmex) and LtGemm, cublasLtMatmul with the
// heuristic's first algorithm (TANDEM_GEMM=lt, the default), fp32 out; then, to say what the engine leaves on the
// table, the fastest of the heuristic's top 8 timed here ("lt best8": worth autotuning when well under "lt"),
// and the heuristic's first with bf16 out ("lt bf16": what writing y in bf16 would save). Shapes: qkv 6144 x
// 4096, o_proj 4096 x 4096, gate_up 28672 x 4096, down 4096 x 14336, lm_head 128256 x 4096; m = 8 ... 8192.
//
// Checks first, and fails loudly (exit 1): every path (and every timed candidate) against float64 on the host
// for sampled (row, column) entries, error relative to the bound sum |w| |x| (fp32 out: 1e-4; bf16 out: also
// one bf16 rounding of the value); every output element written (outputs poisoned with NaN first, non-finite
// ones counted on the GPU); every cuBLAS status. Inputs are fresh uniform [-1, 1) bf16 per case, never zeros.
// Then times, with CUDA events, the median of 5 batches of launches that rotate over enough weight copies
// (>= 256 MB) that L2 (50 MB) cannot hold them. TFLOP/s counts 2 m n k; GB/s the bytes a GEMM must move
// (w + x read, y written). Last: one 8B forward's layer GEMMs (32 x (qkv + o_proj + gate_up + down)) per m
// and path; the path the engine should keep is the smaller. Then the dense FFN's front half at m >= 256 as the engine
// runs it (native/kernels/llama.cu compiled in): gate_up through lt with fp32 out + tandem_llama_silu_mul (the path
// before, TANDEM_GATEUP_BF16=0) against bf16 out + tandem_llama_silu_mul_bf16 (the default), both checked against
// each other (bf16 act within 2^-5 of the fp32 path's, relative to max(|act|, 1)).
//
//   cd bench/micro && nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -o /tmp/gemm gemm.cu -ldl && /tmp/gemm
// Optional: /tmp/gemm <m> ... (only those m).
#include "micro.h"

#include <cuda_bf16.h>

#include "../../native/src/dynlib.cpp"
#include "../../native/src/engine/cublas.cpp"
#include "../../native/kernels/llama.cu"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace {

using namespace tandem::engine;
typedef __nv_bfloat16 bf16;

float bf16ToFloat(uint16_t v) {
  uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

int failures = 0;
void fail(const std::string& what) {
  std::printf("FAIL: %s\n", what.c_str());
  std::fflush(stdout);
  ++failures;
}

// Uniform in [-1, 1), from a hash of (seed, index).
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

// Non-finite elements of y (fp32 when bf16Out is false), counted on the GPU: outputs are up to 4 GB.
__global__ void countNonFinite(const void* y, size_t count, bool bf16Out, unsigned long long* bad) {
  unsigned long long local = 0;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < count; i += (size_t)gridDim.x * blockDim.x) {
    const float v = bf16Out ? __bfloat162float(static_cast<const bf16*>(y)[i]) : static_cast<const float*>(y)[i];
    if (!isfinite(v)) ++local;
  }
  if (local) atomicAdd(bad, local);
}

unsigned long long nonFinite(const void* y, size_t count, bool bf16Out) {
  static unsigned long long* d = nullptr;
  if (!d) CHECK(cudaMalloc(&d, sizeof(*d)));
  CHECK(cudaMemset(d, 0, sizeof(*d)));
  countNonFinite<<<1024, 256>>>(y, count, bf16Out, d);
  CHECK(cudaGetLastError());
  unsigned long long h = 0;
  CHECK(cudaMemcpy(&h, d, sizeof(h), cudaMemcpyDeviceToHost));
  return h;
}

// Sampled entries of y against float64: the largest |y - ref| / sum |w| |x| beyond the allowance for y's own
// rounding (bf16 out: 2^-8 |ref|, round to nearest; fp32: none). INFINITY for a non-finite sampled value.
struct Sample {
  std::vector<int> rows, cols;  // rows of x (m), columns of y (n)
  std::vector<uint16_t> x, w;   // the sampled rows' and columns' inputs, k each
};

Sample sample(const bf16* dX, const bf16* dW, int m, int n, int k) {
  Sample s;
  for (int i = 0; i < m; i += std::max(1, m / 6)) s.rows.push_back(i);
  s.rows.push_back(m - 1);
  for (int j = 0; j < n; j += std::max(1, n / 23)) s.cols.push_back(j);
  s.cols.push_back(n - 1);
  s.x.resize(s.rows.size() * (size_t)k);
  s.w.resize(s.cols.size() * (size_t)k);
  for (size_t r = 0; r < s.rows.size(); ++r)
    CHECK(cudaMemcpy(&s.x[r * k], dX + (size_t)s.rows[r] * k, (size_t)k * 2, cudaMemcpyDeviceToHost));
  for (size_t c = 0; c < s.cols.size(); ++c)
    CHECK(cudaMemcpy(&s.w[c * k], dW + (size_t)s.cols[c] * k, (size_t)k * 2, cudaMemcpyDeviceToHost));
  return s;
}

double sampledError(const Sample& s, const void* dY, int n, int k, bool bf16Out) {
  double worst = 0;
  for (size_t r = 0; r < s.rows.size(); ++r)
    for (size_t c = 0; c < s.cols.size(); ++c) {
      double dot = 0, mag = 0;
      for (int e = 0; e < k; ++e) {
        const double p = (double)bf16ToFloat(s.w[c * k + e]) * bf16ToFloat(s.x[r * k + e]);
        dot += p;
        mag += std::fabs(p);
      }
      const size_t at = (size_t)s.rows[r] * n + s.cols[c];
      double got;
      if (bf16Out) {
        uint16_t v;
        CHECK(cudaMemcpy(&v, static_cast<const uint16_t*>(dY) + at, 2, cudaMemcpyDeviceToHost));
        got = bf16ToFloat(v);
      } else {
        float v;
        CHECK(cudaMemcpy(&v, static_cast<const float*>(dY) + at, 4, cudaMemcpyDeviceToHost));
        got = v;
      }
      if (!std::isfinite(got)) return INFINITY;
      const double rounding = bf16Out ? std::ldexp(std::fabs(dot), -8) : 0;
      worst = std::max(worst, std::max(0.0, std::fabs(got - dot) - rounding) / std::max(mag, 1e-30));
    }
  return worst;
}

// Of sum |w| |x|: fp32 accumulation of random inputs lands near 1e-6; a wrong index or a lost block of terms is
// O(1e-2) or more.
constexpr double kTolerance = 1e-4;


struct Gemm {
  const char* name;
  int n, k, perForward;  // perForward: times per 8B forward (32 layers; 0: not a layer GEMM)
};

enum Path { kGemmEx, kLt, kLtBest, kLtBf16, kPaths };
const char* kPathNames[kPaths] = {"gemmex", "lt", "lt best8", "lt bf16"};

}  // namespace

int main(int argc, char** argv) {
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s, %d SMs, L2 %d MB\n", prop.name, prop.multiProcessorCount, prop.l2CacheSize >> 20);
  const std::vector<std::string> cublasNames = {"libcublas.so.13", "libcublas.so.12",
                                                "/usr/local/cuda/lib64/libcublas.so.13"};
  const std::vector<std::string> ltNames = {"libcublasLt.so.13", "libcublasLt.so.12",
                                            "/usr/local/cuda/lib64/libcublasLt.so.13"};
  const CublasApi& cublas = loadCublas(cublasNames);
  const CublasLtApi& cublasLt = loadCublasLt(ltNames);
  if (!cublas.available || !cublasLt.available) {
    std::printf("FAIL: cuBLAS: %s; cuBLASLt: %s (set LD_LIBRARY_PATH=/usr/local/cuda/lib64)\n",
                cublas.available ? cublas.path.c_str() : cublas.reason.c_str(),
                cublasLt.available ? cublasLt.path.c_str() : cublasLt.reason.c_str());
    return 1;
  }
  std::printf("cuBLAS: %s, cuBLASLt: %s\n", cublas.path.c_str(), cublasLt.path.c_str());
  cublasHandle handle = nullptr;
  if (int s = cublas.create(&handle)) {
    std::printf("FAIL: cublasCreate: %s\n", cublas.describe(s).c_str());
    return 1;
  }
  constexpr size_t kWorkspaceBytes = 32u << 20;  // as kLtWorkspaceBytes in cuda_llama.cpp
  void* workspace = nullptr;
  CHECK(cudaMalloc(&workspace, kWorkspaceBytes));
  LtGemm lt(cublasLt);
  if (int s = lt.init(reinterpret_cast<CUdeviceptr>(workspace), kWorkspaceBytes)) {
    std::printf("FAIL: cublasLtCreate: %s\n", cublasLt.describe(s).c_str());
    return 1;
  }

  const Gemm gemms[] = {{"qkv", 6144, 4096, 32},
                        {"o_proj", 4096, 4096, 32},
                        {"gate_up", 28672, 4096, 32},
                        {"down", 4096, 14336, 32},
                        {"lm_head", 128256, 4096, 0}};
  std::vector<int> ms = {8, 16, 32, 64, 128, 512, 3000, 8192};
  if (argc > 1) {
    ms.clear();
    for (int i = 1; i < argc; ++i) ms.push_back(std::atoi(argv[i]));
  }
  const int maxM = *std::max_element(ms.begin(), ms.end());
  constexpr size_t kRotateBytes = 256ull << 20;
  constexpr int kCandidates = 8;

  struct Row {
    std::string gemm;
    int m, perForward;
    double flops, bytes[kPaths], ms[kPaths];
  };
  std::vector<Row> table;
  uint32_t seed = 7000;
  for (const Gemm& g : gemms) {
    const size_t wCount = (size_t)g.n * g.k, wBytes = wCount * 2;
    const int copies = (int)std::max<size_t>(1, (kRotateBytes + wBytes - 1) / wBytes);
    std::vector<bf16*> w(copies);
    for (bf16*& p : w) {
      CHECK(cudaMalloc(&p, wBytes));
      fill(p, wCount, seed++);
    }
    bf16* x;
    void* y;
    CHECK(cudaMalloc(&x, (size_t)maxM * g.k * 2));
    CHECK(cudaMalloc(&y, (size_t)maxM * g.n * 4));
    for (int m : ms) {
      fill(x, (size_t)m * g.k, seed++);
      CHECK(cudaDeviceSynchronize());
      const Sample smp = sample(x, w[0], m, g.n, g.k);
      const std::string shape = std::string(g.name) + " m=" + std::to_string(m);
      const CUdeviceptr dx = reinterpret_cast<CUdeviceptr>(x), dy = reinterpret_cast<CUdeviceptr>(y);
      auto wp = [&](int i) { return reinterpret_cast<CUdeviceptr>(w[i % copies]); };
      auto gemmEx = [&](int i) {
        const float one = 1.0f, zero = 0.0f;
        int s = cublas.gemmEx(handle, kCublasOpT, kCublasOpN, g.n, m, g.k, &one, w[i % copies], kCudaR16BF, g.k, x,
                              kCudaR16BF, g.k, &zero, y, kCudaR32F, g.n, kCublasCompute32F, kCublasGemmDefault);
        if (s) {
          std::printf("FAIL: cublasGemmEx (%s): %s\n", shape.c_str(), cublas.describe(s).c_str());
          std::exit(1);
        }
      };
      auto ltRun = [&](int yType) {
        return [&, yType](int i) {
          const char* what = "";
          int s = lt.run(dx, m, g.k, wp(i), g.n, dy, yType, nullptr, &what);
          if (s) {
            std::printf("FAIL: %s (%s): %s\n", what, shape.c_str(), cublasLt.describe(s).c_str());
            std::exit(1);
          }
        };
      };
      // One path's correctness on w[0]: poison, run, every element written, sampled entries against float64.
      auto verify = [&](const std::string& label, bool bf16Out, auto run) {
        const size_t count = (size_t)m * g.n;
        CHECK(cudaMemset(y, 0xff, count * (bf16Out ? 2 : 4)));  // NaN in either type
        run(0);
        CHECK(cudaGetLastError());
        CHECK(cudaDeviceSynchronize());
        const unsigned long long bad = nonFinite(y, count, bf16Out);
        const double err = sampledError(smp, y, g.n, g.k, bf16Out);
        if (bad || !(err < kTolerance))
          fail(shape + " " + label + ": error " + std::to_string(err) + " of sum |w||x| (float64, sampled), " +
               std::to_string(bad) + " non-finite outputs");
      };
      Row row{g.name, m, g.perForward, 2.0 * m * g.n * g.k, {}, {}};
      const double xBytes = (double)m * g.k * 2;
      for (int p = 0; p < kPaths; ++p)
        row.bytes[p] = (double)wBytes + xBytes + (double)m * g.n * (p == kLtBf16 ? 2 : 4);
      // About 20 ms per batch at ~600 TFLOP/s or ~2.5 TB/s, whichever is slower.
      const double estMs = std::max(row.flops / 600e12, row.bytes[kGemmEx] / 2.5e12) * 1e3;
      const int reps = (int)std::clamp(20.0 / estMs, 3.0, 200.0);

      verify("gemmex", false, gemmEx);
      row.ms[kGemmEx] = timeMs(gemmEx, reps);
      verify("lt", false, ltRun(kCudaR32F));
      row.ms[kLt] = timeMs(ltRun(kCudaR32F), reps);
      verify("lt bf16", true, ltRun(kCudaR16BF));
      row.ms[kLtBf16] = timeMs(ltRun(kCudaR16BF), reps);
      int status = 0;
      const std::vector<cublasLtMatmulAlgo> algos = lt.candidates(m, g.n, g.k, kCudaR32F, kCandidates, &status);
      if (status || algos.empty()) fail(shape + ": cublasLtMatmulAlgoGetHeuristic: " + cublasLt.describe(status));
      row.ms[kLtBest] = row.ms[kLt];
      int bestIndex = 0;
      for (size_t a = 0; a < algos.size(); ++a) {
        auto run = [&, a](int i) {
          const char* what = "";
          int s = lt.run(dx, m, g.k, wp(i), g.n, dy, kCudaR32F, nullptr, &what, &algos[a]);
          if (s) {
            std::printf("FAIL: %s, candidate %zu (%s): %s\n", what, a, shape.c_str(), cublasLt.describe(s).c_str());
            std::exit(1);
          }
        };
        verify("lt candidate " + std::to_string(a), false, run);
        const double t = timeMs(run, reps);
        if (t < row.ms[kLtBest]) {
          row.ms[kLtBest] = t;
          bestIndex = (int)a;
        }
      }
      table.push_back(row);
      std::printf("%-8s m=%-5d gemmex %9.1f us  lt %9.1f us  lt best8 %9.1f us (#%d of %zu)  lt bf16 %9.1f us\n",
                  g.name, m, row.ms[kGemmEx] * 1e3, row.ms[kLt] * 1e3, row.ms[kLtBest] * 1e3, bestIndex, algos.size(),
                  row.ms[kLtBf16] * 1e3);
      std::fflush(stdout);
    }
    for (bf16* p : w) CHECK(cudaFree(p));
    CHECK(cudaFree(x));
    CHECK(cudaFree(y));
  }

  std::printf("\n%-8s %5s |", "gemm", "m");
  for (const char* name : kPathNames) std::printf(" %9s us TFLOP/s   GB/s |", name);
  std::printf(" lt/gemmex\n");
  for (const Row& r : table) {
    std::printf("%-8s %5d |", r.gemm.c_str(), r.m);
    for (int p = 0; p < kPaths; ++p)
      std::printf(" %12.1f %7.0f %6.0f |", r.ms[p] * 1e3, r.flops / (r.ms[p] * 1e9), r.bytes[p] / (r.ms[p] * 1e6));
    std::printf(" %8.3f\n", r.ms[kLt] / r.ms[kGemmEx]);
  }
  std::printf("\none 8B forward's layer GEMMs (32 x (qkv + o_proj + gate_up + down)), ms\n%5s", "m");
  for (const char* name : kPathNames) std::printf(" %10s", name);
  std::printf("\n");
  for (int m : ms) {
    double sum[kPaths] = {};
    for (const Row& r : table)
      if (r.m == m)
        for (int p = 0; p < kPaths; ++p) sum[p] += r.perForward * r.ms[p];
    std::printf("%5d", m);
    for (int p = 0; p < kPaths; ++p) std::printf(" %10.3f", sum[p]);
    std::printf("\n");
  }

  // gate_up + SiLU * up, fp32 against bf16 gate_up, as CudaLlama::gateUpAct launches them.
  {
    const int inter = 14336, n = 2 * inter, k = 4096;
    const size_t wCount = (size_t)n * k, wBytes = wCount * 2;
    const int copies = (int)std::max<size_t>(1, (kRotateBytes + wBytes - 1) / wBytes);
    std::vector<bf16*> w(copies);
    for (bf16*& p : w) {
      CHECK(cudaMalloc(&p, wBytes));
      fill(p, wCount, seed++);
    }
    bf16 *x, *act32, *act16;
    void* y;
    CHECK(cudaMalloc(&x, (size_t)maxM * k * 2));
    CHECK(cudaMalloc(&y, (size_t)maxM * n * 4));
    CHECK(cudaMalloc(&act32, (size_t)maxM * inter * 2));
    CHECK(cudaMalloc(&act16, (size_t)maxM * inter * 2));
    std::printf("\ngate_up (%d x %d) + SiLU * up, us: lt fp32 out + silu_mul | lt bf16 out + silu_mul_bf16 | bf16/fp32\n",
                n, k);
    for (int m : ms) {
      if (m < 256) continue;
      fill(x, (size_t)m * k, seed++);
      const dim3 grid(m, (inter + TANDEM_SILU_MUL_CHUNK - 1) / TANDEM_SILU_MUL_CHUNK);
      auto ffn = [&](bool bf16Out, bf16* act) {
        return [&, bf16Out, act](int i) {
          const char* what = "";
          int s = lt.run(reinterpret_cast<CUdeviceptr>(x), m, k, reinterpret_cast<CUdeviceptr>(w[i % copies]), n,
                         reinterpret_cast<CUdeviceptr>(y), bf16Out ? kCudaR16BF : kCudaR32F, nullptr, &what);
          if (s) {
            std::printf("FAIL: %s (gate_up m=%d): %s\n", what, m, cublasLt.describe(s).c_str());
            std::exit(1);
          }
          if (bf16Out)
            tandem_llama_silu_mul_bf16<<<grid, 256>>>(static_cast<const bf16*>(y), inter, act);
          else
            tandem_llama_silu_mul<<<grid, 256>>>(static_cast<const float*>(y), inter, act);
        };
      };
      ffn(false, act32)(0);
      ffn(true, act16)(0);
      CHECK(cudaDeviceSynchronize());
      std::vector<uint16_t> a32((size_t)m * inter), a16(a32.size());
      CHECK(cudaMemcpy(a32.data(), act32, a32.size() * 2, cudaMemcpyDeviceToHost));
      CHECK(cudaMemcpy(a16.data(), act16, a16.size() * 2, cudaMemcpyDeviceToHost));
      double worst = 0;
      for (size_t i = 0; i < a32.size(); ++i) {
        const double ref = bf16ToFloat(a32[i]), got = bf16ToFloat(a16[i]);
        worst = std::isfinite(got) ? std::max(worst, std::fabs(got - ref) / std::max(std::fabs(ref), 1.0)) : INFINITY;
      }
      if (!(worst <= 1.0 / 32))
        fail("gate_up + SiLU m=" + std::to_string(m) + ": bf16 path off the fp32 one by " + std::to_string(worst));
      const double estMs = 2.0 * m * n * k / 600e12 * 1e3;
      const int reps = (int)std::clamp(20.0 / estMs, 3.0, 200.0);
      const double t32 = timeMs(ffn(false, act32), reps), t16 = timeMs(ffn(true, act16), reps);
      std::printf("m=%-5d %12.1f | %12.1f | %.3f (act differs by at most %.2g of max(|act|, 1))\n", m, t32 * 1e3,
                  t16 * 1e3, t16 / t32, worst);
      std::fflush(stdout);
    }
    for (bf16* p : w) CHECK(cudaFree(p));
    for (void* p : {(void*)x, y, (void*)act32, (void*)act16}) CHECK(cudaFree(p));
  }

  lt.release();
  if (failures) {
    std::printf("\nFAIL: %d check(s) failed (see FAIL lines above)\n", failures);
    return 1;
  }
  std::printf("\nall checks passed\n");
  return 0;
}
