// CudaLlama's CUDA-graph cache: decode steps (one token per sequence) replay a graph captured once per batch
// shape instead of issuing their ~10 launches per layer one by one. A graph bakes in its kernels' arguments
// (scratch addresses, sizes), so the cache is keyed by what decides them (sequences, blocks per sequence) and
// is valid only for the scratch allocation it was captured on: a new allocation (a new generation) drops it.
//
// Device thread only (the owning CudaDevice's), like everything CudaLlama does on the GPU.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <utility>

#include "../cuda_device.h"

namespace tandem::engine {

class DecodeGraphCache {
 public:
  // A decode batch's shape: (sequences, blocks per sequence).
  using Key = std::pair<size_t, int>;

  DecodeGraphCache(CudaDevice& device, size_t maxGraphs) : device_(device), maxGraphs_(maxGraphs) {}
  ~DecodeGraphCache() = default;  // the owner calls clear() on the device thread first
  DecodeGraphCache(const DecodeGraphCache&) = delete;
  DecodeGraphCache& operator=(const DecodeGraphCache&) = delete;

  // Drops every graph unless they were captured on scratch generation `generation`.
  void keepOnlyGeneration(uint64_t generation);
  // The graph captured for `key`, or null.
  CUgraphExec find(const Key& key) const;
  // Captures what `enqueue` issues on `stream` and keeps it under `key` (when the cache is full, every graph is
  // dropped first). Throws NativeError when capturing or instantiating fails; nothing is kept then and the stream
  // is out of capture mode. Other exceptions from `enqueue` end the capture and propagate.
  CUgraphExec capture(const Key& key, CUstream stream, const std::function<void()>& enqueue);
  // Enqueues a replay of `exec` on `stream`.
  void launch(CUgraphExec exec, CUstream stream) const;
  // Destroys every graph. Idempotent.
  void clear();
  size_t size() const { return graphs_.size(); }

 private:
  CudaDevice& device_;
  const size_t maxGraphs_;
  std::map<Key, CUgraphExec> graphs_;
  uint64_t generation_ = 0;
};

}  // namespace tandem::engine
