// The sparse mixture-of-experts FFN of the GPU model (issue 28; Mixtral, Qwen3-MoE), bf16 weights with fp32
// accumulation like CudaLlama's dense FFN, which it replaces in every layer of an MoE config: the router GEMM
// (CudaLlama's gemm: cuBLAS, or the GEMV for decode batches), then native/kernels/moe.cu: fused gating (softmax over
// the experts, top k, the family's renormalisation), the permutation of (token, choice) pairs by expert (counts,
// offsets and scatter on the device), a grouped GEMM over the experts for gate_up and for down (tensor cores,
// reading the experts' row offsets from device memory), SiLU * up (llama.cu's tandem_llama_silu_mul), and the
// weighted combine back into token order.
//
// Why our own grouped GEMM rather than cuBLAS per expert or cublasGemmGroupedBatchedEx: those take each expert's row
// count on the host, so every MoE layer would wait for the routing to come back (a host sync per layer) and decode
// steps could no longer be replayed as one CUDA graph. With the offsets on the device the whole layer is stream work
// of a shape fixed by the token count; the grid covers the worst routing and surplus CTAs return.
//
// Weights live in CudaLlama's one allocation (placed through its `place`): per layer the router [numExperts,
// hidden], the experts' gate_up [numExperts][2 * intermediate, hidden] (gate rows, then up rows, as the dense fused
// gate_up) and down [numExperts][hidden, intermediate], each group contiguous so that expert e is at a fixed stride.
// One rank only: no tensor or expert parallelism on the GPU yet (the CPU engine's ranks have both).
//
// Device thread for init() and enqueue(); the kernels run on the device's stream.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <vector>

#include "../cuda_device.h"
#include "llama_common.h"

namespace tandem::engine {

// Channels per block of llama.cu's tandem_llama_silu_mul (its TANDEM_SILU_MUL_CHUNK), shared by the dense FFN
// (cuda_llama.cpp) and the experts: a launch is (rows, siluMulBlocks(channels)) blocks of 256 threads.
constexpr int kSiluMulChunk = 1024;
inline unsigned siluMulBlocks(int channels) {
  return static_cast<unsigned>((channels + kSiluMulChunk - 1) / kSiluMulChunk);
}

class CudaMoe {
 public:
  // y[m, n] = x[m, k] . w[n, k]^T (bf16 in, fp32 out): the runner's GEMM (CudaLlama::gemm).
  using GemmFn = std::function<void(CUdeviceptr x, int m, int k, CUdeviceptr w, int n, CUdeviceptr y)>;
  // Reserves `count` bf16 values in the runner's weights allocation, returns their byte offset (CudaLlama::place).
  using PlaceFn = std::function<size_t(size_t count)>;

  // Any thread: checks the shapes (BadInput: hidden and the experts' width multiples of 16, at most 1024 experts,
  // topK at most 32 and numExperts), then places every layer's router and experts.
  CudaMoe(const LlamaConfig& config, const PlaceFn& place);

  // Where an MoE tensor of the manifest (roles router, expert_gate, expert_up, expert_down) lies: byte offset into
  // the weights allocation and its [rows, cols]. Throws BadInput for another role.
  struct Placed {
    size_t offset, rows, cols;
  };
  Placed placeOf(const WeightEntry& w) const;

  // Device thread: looks the kernels up.
  void init(CudaDevice& device);
  // Activation bytes a pass of `ntok` tokens needs (CudaLlama::planBatch reserves them in its scratch).
  size_t scratchBytes(size_t ntok) const;
  // The router GEMM's [n, k] (CudaLlama::prepareGemms chooses its cuBLASLt algorithm before a graph capture).
  int routerRows() const { return moe_.numExperts; }

  // Enqueues layer `layer`'s FFN on the device's stream: out[ntok, hidden] (fp32) = the MoE of xn[ntok, hidden]
  // (bf16). `weights`: the runner's weights allocation; `scratch`: scratchBytes(ntok) bytes, 256-byte aligned.
  void enqueue(int layer, CUdeviceptr weights, CUdeviceptr xn, size_t ntok, CUdeviceptr scratch, CUdeviceptr out,
               const GemmFn& gemm);

 private:
  struct LayerOffsets {
    size_t router, gateUp, down;
  };
  // The scratch of a pass: byte offsets (the permuted inputs carry a tile of padding rows past the last pair).
  struct Scratch {
    size_t logits, topIds, topWeights, pairRow, counts, offsets, tileStarts, cursor, xPerm, gateUp, act, y, bytes;
  };
  Scratch scratchOf(size_t ntok) const;
  // Tiles of 16 rows when experts get few rows each (decode), of 64 otherwise.
  bool decodeTiles(size_t pairs) const;

  CudaDevice* device_ = nullptr;
  MoeConfig moe_;
  size_t hidden_;
  std::vector<LayerOffsets> layers_;
  struct {
    CUfunction route, offsets, scatter, gemmDecode, gemmPrefill, siluMul, combine;
  } fn_{};
};

}  // namespace tandem::engine
