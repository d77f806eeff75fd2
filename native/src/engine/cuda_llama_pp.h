// Pipeline parallelism for CudaLlama (issue 25): a runner that holds one pipeline stage (a contiguous range of the
// decoder layers, the embedding on the first stage, the final norm and lm_head on the last) and the channel that
// hands one micro-batch's hidden state from a stage's rank to the same tensor-parallel rank of the next stage.
//
// The layer split is lib/engine/parallel.ts's stageLayers (the CPU ranks' too, cpu_parallel.h): as even as possible,
// earlier stages taking the extra layer; lib/engine/cuda-pipeline.ts passes each stage its range.
//
// What crosses a stage boundary is the residual stream as the layer step leaves it: x (the residual sum so far) and
// tmp (the last layer's output, added by the next layer's input norm), [tokens, hidden] fp32 each, so a stage's
// first layer does exactly what it would do in one runner and PP N gives PP 1's bits.
//
// StageChannel is the seam: LocalStageChannel hands activations between runners on one CUDA device (one primary
// context; each rank its own CudaDevice thread and stream) with a device-to-device copy ordered by events. NCCL
// send/recv between GPUs is the next implementation of the same interface (TODO: NcclStageChannel over
// native/src/nccl's communicator, ncclSend / ncclRecv on the ranks' streams; not written yet).
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "../cuda_device.h"
#include "llama_common.h"

namespace tandem::engine {

class StageChannel;

// The part of the model a pipeline-stage runner holds, and its channels (null at the ends of the pipeline).
struct PpStage {
  int stage = 0, size = 1;
  int layerStart = 0, layerCount = 0;  // decoder layers [layerStart, layerStart + layerCount)
  std::shared_ptr<StageChannel> input;   // from the previous stage (null on the first)
  std::shared_ptr<StageChannel> output;  // to the next stage (null on the last)
  bool first() const { return stage == 0; }
  bool last() const { return stage == size - 1; }
};

// Throws BadInput unless the stage fits the config: 0 <= stage < size <= numLayers, the range inside the model and
// not empty, channels where a neighbour exists.
void checkPpStage(const LlamaConfig& config, const PpStage& stage);

// Hands micro-batch `slot`'s activations (`parts`, each `bytes` long) from one stage's rank to the next's. Both ends
// call in micro-batch order, each on its own device thread and stream; a micro-batch's send is called (on the host)
// before its receive. Every operation is enqueued on the caller's stream: the receiver's stream waits for the
// sender's data, the sender's next use of a slot waits for the receiver to have copied it out.
class StageChannel {
 public:
  static constexpr int kMaxSlots = 64;  // micro-batches in flight at once
  virtual ~StageChannel() = default;
  // Sender's device thread.
  virtual void send(int slot, const std::vector<CUdeviceptr>& parts, size_t bytes, CudaDevice& device,
                    CUstream stream) = 0;
  // Receiver's device thread: copies micro-batch `slot`'s parts into `parts` (the same count and size as sent).
  virtual void receive(int slot, const std::vector<CUdeviceptr>& parts, size_t bytes, CudaDevice& device,
                       CUstream stream) = 0;
  // Device thread of one end, once, when that end's runner is released (its stream idle).
  virtual void release(CudaDevice& device, bool sender) = 0;
};

// Both ends on one CUDA device: the sender copies into a per-slot buffer it owns and records `ready`; the receiver's
// stream waits for `ready`, copies out and records `consumed`, which the sender's stream waits for before it writes
// the slot again (a buffer that must grow is replaced once `consumed` has completed).
class LocalStageChannel : public StageChannel {
 public:
  void send(int slot, const std::vector<CUdeviceptr>& parts, size_t bytes, CudaDevice& device,
            CUstream stream) override;
  void receive(int slot, const std::vector<CUdeviceptr>& parts, size_t bytes, CudaDevice& device,
               CUstream stream) override;
  void release(CudaDevice& device, bool sender) override;

 private:
  struct Slot {
    std::shared_ptr<DeviceAllocation> buffer;  // the sender's
    size_t parts = 0, bytes = 0;               // what the last send put in it
    CUevent ready = nullptr;                   // the sender's, recorded after its copy in
    CUevent consumed = nullptr;                // the receiver's, recorded after its copy out
    bool sent = false;                         // a send since the last receive
  };
  Slot& slotOf(int slot);

  std::mutex mutex_;
  std::vector<Slot> slots_;
};

}  // namespace tandem::engine
