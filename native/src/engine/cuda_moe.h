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
// hidden], the slots' gate_up [slots][2 * intermediate, hidden] (gate rows, then up rows, as the dense fused
// gate_up) and down [slots][hidden, intermediate], each group contiguous so that slot s is at a fixed stride.
//
// Expert parallelism (ExpertLayout; the CPU engine's scheme, cpu_moe.h): rank r of `ranks` holds slots [r * S,
// (r + 1) * S) of the group's ranks * S physical slots, S = numExperts / ranks + redundantSlots, each a whole expert.
// Per layer a placement says which expert each slot holds (it starts with rank r's own experts [r * E / ranks, ...)
// in its first slots, redundant slots empty until the runner fills them by a placement change); the router is whole
// on every rank, so every rank routes every token alike, and the routing table (device memory: expert -> its slots)
// sends token t's pair with expert e to replica t mod replicas(e). A rank runs only the pairs of its own slots; the
// ranks' outputs are summed by the runner's communicator (CudaLlama). Because the table is read by the route kernel
// on the device, a captured decode graph routes through a table switched after its capture. One rank without
// redundant slots: slot e holds expert e, as before.
//
// Device thread for init() and enqueue(); the kernels run on the device's stream.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <utility>
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

// Which slots a rank holds: rank `rank` of `ranks` expert-parallel ranks, `redundantSlots` beyond numExperts / ranks.
struct ExpertLayout {
  int rank = 0, ranks = 1, redundantSlots = 0;
};

// What one placement change on one rank took.
struct ExpertCopyStats {
  int slotsCopied = 0;
  size_t bytes = 0;
};

class CudaMoe {
 public:
  // y[m, n] = x[m, k] . w[n, k]^T (bf16 in, fp32 out): the runner's GEMM (CudaLlama::gemm).
  using GemmFn = std::function<void(CUdeviceptr x, int m, int k, CUdeviceptr w, int n, CUdeviceptr y)>;
  // Reserves `count` bf16 values in the runner's weights allocation, returns their byte offset (CudaLlama::place).
  using PlaceFn = std::function<size_t(size_t count)>;

  // Any thread: checks the shapes (BadInput: hidden and the experts' width multiples of 16, at most 1024 experts,
  // topK at most 32 and numExperts; ranks dividing numExperts), then places every layer's router and slots.
  CudaMoe(const LlamaConfig& config, const PlaceFn& place, const ExpertLayout& layout = {});

  // Whether this rank holds an MoE tensor of the manifest by name: the router always, an expert's tensors when the
  // expert is one of the rank's own (the initial placement's first numExperts / ranks slots).
  bool holds(const WeightEntry& w) const;
  // Where an MoE tensor this rank holds (roles router, expert_gate, expert_up, expert_down) lies: byte offset into
  // the weights allocation and its [rows, cols]. Throws BadInput for another role or an expert not held.
  struct Placed {
    size_t offset, rows, cols;
  };
  Placed placeOf(const WeightEntry& w) const;

  // Device thread: looks the kernels up, allocates and uploads the routing tables and the load counters.
  void init(CudaDevice& device);
  // Device thread: frees what init() and the placement changes allocated. Idempotent.
  void release();

  int ranks() const { return layout_.ranks; }
  int slotsPerRank() const { return slotsPerRank_; }
  // The placement in force: per layer, ranks * slotsPerRank slots -> expert (-1: a slot not filled yet).
  const std::vector<std::vector<int32_t>>& placement() const { return slotExpert_; }
  // Device addresses of local slot `slot`'s gate_up and down in layer `layer` (`weights`: the runner's allocation).
  // Another rank of the same device reads them as sources of a placement change. Throws BadInput out of range.
  std::pair<CUdeviceptr, CUdeviceptr> slotAddress(CUdeviceptr weights, int layer, int slot) const;
  // Device thread, between passes, phase 1 of a placement change: copies each source expert (gate_up and down
  // addresses, this rank's or another rank's on the same device) into this rank's staging memory, and waits for the
  // copies. Every rank stages before any rank commits, so that a slot is read before it is overwritten.
  void stageExperts(const std::vector<std::pair<CUdeviceptr, CUdeviceptr>>& sources);
  // Device thread, phase 2: the i-th staged expert into local slot dests[i].second of layer dests[i].first, then the
  // new placement (checked first: BadInput names the fault, nothing changes) as the routing tables; waits, frees the
  // staging. dests must match the staged count.
  ExpertCopyStats commitExperts(CUdeviceptr weights, const std::vector<std::pair<int, int>>& dests,
                                std::vector<std::vector<int32_t>> slotExpert);
  // Device thread: the passes' load since the last call, and a reset: pairs routed to each expert (layer-major,
  // numLayers x numExperts; the same on every rank) and pairs this rank's slots ran (per layer). Waits for the stream.
  struct Load {
    std::vector<uint64_t> perExpert, pairsRun;
  };
  Load takeLoad();
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
    size_t logits, topIds, topWeights, pairSlot, pairRow, counts, offsets, tileStarts, cursor, xPerm, gateUp, act, y,
        bytes;
  };
  Scratch scratchOf(size_t ntok) const;
  // Tiles of 16 rows when experts get few rows each (decode), of 64 otherwise.
  bool decodeTiles(size_t pairs) const;

  // int32 per layer of the routing tables: slotStart [numExperts + 1], then slotList [ranks * slotsPerRank].
  size_t tableStride() const;
  // The device tables of a placement (-1 slots left out; an expert without a slot keeps an empty range).
  std::vector<int32_t> tablesOf(const std::vector<std::vector<int32_t>>& slotExpert) const;
  size_t slotGateUpBytes() const;
  size_t slotDownBytes() const;

  CudaDevice* device_ = nullptr;
  MoeConfig moe_;
  size_t hidden_;
  ExpertLayout layout_;
  int slotsPerRank_ = 0;
  std::vector<LayerOffsets> layers_;
  std::vector<std::vector<int32_t>> slotExpert_;
  std::shared_ptr<DeviceAllocation> tables_, load_, staging_;
  size_t staged_ = 0;  // experts in staging_
  struct {
    CUfunction route, offsets, scatter, gemmDecode, gemmPrefill, siluMul, combine;
  } fn_{};
};

}  // namespace tandem::engine
