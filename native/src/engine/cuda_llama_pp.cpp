#include "cuda_llama_pp.h"

namespace tandem::engine {

void checkPpStage(const LlamaConfig& c, const PpStage& s) {
  if (s.size < 1 || s.size > c.numLayers)
    throw BadInput("pipeline parallel size must be 1.." + std::to_string(c.numLayers) + " (the model's layers; got " +
                   std::to_string(s.size) + ")");
  if (s.stage < 0 || s.stage >= s.size)
    throw BadInput("pipeline stage " + std::to_string(s.stage) + " is not one of 0.." + std::to_string(s.size - 1));
  if (s.layerCount < 1 || s.layerStart < 0 || s.layerStart + s.layerCount > c.numLayers)
    throw BadInput("pipeline stage " + std::to_string(s.stage) + ": layers [" + std::to_string(s.layerStart) + ", " +
                   std::to_string(s.layerStart + s.layerCount) + ") are not a non-empty range of the model's " +
                   std::to_string(c.numLayers));
  if (s.first() != (s.layerStart == 0) || s.last() != (s.layerStart + s.layerCount == c.numLayers))
    throw BadInput("pipeline stage " + std::to_string(s.stage) + " of " + std::to_string(s.size) + ": layers [" +
                   std::to_string(s.layerStart) + ", " + std::to_string(s.layerStart + s.layerCount) +
                   ") must start at 0 exactly on the first stage and end at the last layer exactly on the last");
  if (!s.first() && !s.input) throw BadInput("pipeline stage " + std::to_string(s.stage) + " needs an input channel");
  if (!s.last() && !s.output) throw BadInput("pipeline stage " + std::to_string(s.stage) + " needs an output channel");
}

LocalStageChannel::Slot& LocalStageChannel::slotOf(int slot) {
  if (slot < 0 || slot >= kMaxSlots)
    throw BadInput("micro-batch slot " + std::to_string(slot) + " is not one of 0.." + std::to_string(kMaxSlots - 1));
  if (slots_.size() <= static_cast<size_t>(slot)) slots_.resize(slot + 1);
  return slots_[slot];
}

void LocalStageChannel::send(int slot, const std::vector<CUdeviceptr>& parts, size_t bytes, CudaDevice& device,
                             CUstream stream) {
  const CudaDriver& d = device.driver();
  std::lock_guard<std::mutex> lock(mutex_);
  Slot& s = slotOf(slot);
  const size_t need = parts.size() * bytes;
  if (!s.ready) device.check(d.cuEventCreate(&s.ready, CU_EVENT_DISABLE_TIMING), "cuEventCreate (stage channel)");
  if (!s.buffer || s.buffer->bytes < need) {
    // The receiver may still be copying the old buffer out: wait for that on the host before it goes.
    if (s.consumed) device.check(d.cuEventSynchronize(s.consumed), "cuEventSynchronize (stage channel)");
    if (s.buffer) device.freeAllocation(*s.buffer);
    s.buffer.reset();
    s.buffer = device.allocate(need + need / 4, "cuMemAlloc (pipeline stage channel)");
  } else if (s.consumed) {
    device.check(d.cuStreamWaitEvent(stream, s.consumed, 0), "cuStreamWaitEvent (stage channel)");
  }
  for (size_t i = 0; i < parts.size(); ++i)
    device.check(d.cuMemcpyDtoDAsync(s.buffer->ptr + i * bytes, parts[i], bytes, stream),
                 "cuMemcpyDtoDAsync (stage channel send)");
  device.check(d.cuEventRecord(s.ready, stream), "cuEventRecord (stage channel)");
  s.parts = parts.size();
  s.bytes = bytes;
  s.sent = true;
}

void LocalStageChannel::receive(int slot, const std::vector<CUdeviceptr>& parts, size_t bytes, CudaDevice& device,
                                CUstream stream) {
  const CudaDriver& d = device.driver();
  std::lock_guard<std::mutex> lock(mutex_);
  Slot& s = slotOf(slot);
  if (!s.sent)
    throw BadInput("pipeline micro-batch " + std::to_string(slot) +
                   ": the previous stage has not sent it (stages must run each micro-batch in stage order)");
  if (s.parts != parts.size() || s.bytes != bytes)
    throw BadInput("pipeline micro-batch " + std::to_string(slot) + ": the previous stage sent " +
                   std::to_string(s.parts) + " x " + std::to_string(s.bytes) + " bytes; this stage expects " +
                   std::to_string(parts.size()) + " x " + std::to_string(bytes) +
                   " (the stages were given different batches)");
  if (!s.consumed)
    device.check(d.cuEventCreate(&s.consumed, CU_EVENT_DISABLE_TIMING), "cuEventCreate (stage channel)");
  device.check(d.cuStreamWaitEvent(stream, s.ready, 0), "cuStreamWaitEvent (stage channel)");
  for (size_t i = 0; i < parts.size(); ++i)
    device.check(d.cuMemcpyDtoDAsync(parts[i], s.buffer->ptr + i * bytes, bytes, stream),
                 "cuMemcpyDtoDAsync (stage channel receive)");
  device.check(d.cuEventRecord(s.consumed, stream), "cuEventRecord (stage channel)");
  s.sent = false;
}

void LocalStageChannel::release(CudaDevice& device, bool sender) {
  const CudaDriver& d = device.driver();
  std::lock_guard<std::mutex> lock(mutex_);
  for (Slot& s : slots_) {
    if (sender) {
      if (s.buffer) {
        try {
          device.freeAllocation(*s.buffer);
        } catch (const std::exception&) {
          // the device frees what it still tracks when it closes
        }
        s.buffer.reset();
      }
      if (s.ready) d.cuEventDestroy(s.ready);
      s.ready = nullptr;
      s.sent = false;
    } else {
      if (s.consumed) d.cuEventDestroy(s.consumed);
      s.consumed = nullptr;
    }
  }
}

}  // namespace tandem::engine
