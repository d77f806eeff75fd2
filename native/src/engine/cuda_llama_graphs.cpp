#include "cuda_llama_graphs.h"

namespace tandem::engine {

void DecodeGraphCache::keepOnlyGeneration(uint64_t generation) {
  if (generation_ == generation) return;
  clear();
  generation_ = generation;
}

CUgraphExec DecodeGraphCache::find(const Key& key) const {
  auto it = graphs_.find(key);
  return it == graphs_.end() ? nullptr : it->second;
}

CUgraphExec DecodeGraphCache::capture(const Key& key, CUstream stream, const std::function<void()>& enqueue) {
  if (graphs_.size() >= maxGraphs_) clear();
  const CudaDriver& d = device_.driver();
  CUgraph graph = nullptr;
  CUgraphExec exec = nullptr;
  try {
    device_.check(d.cuStreamBeginCapture(stream, CU_STREAM_CAPTURE_MODE_THREAD_LOCAL), "cuStreamBeginCapture");
    try {
      enqueue();
    } catch (...) {
      d.cuStreamEndCapture(stream, &graph);
      throw;
    }
    device_.check(d.cuStreamEndCapture(stream, &graph), "cuStreamEndCapture");
    device_.check(d.cuGraphInstantiateWithFlags(&exec, graph, 0), "cuGraphInstantiateWithFlags");
  } catch (...) {
    if (graph) d.cuGraphDestroy(graph);
    throw;
  }
  d.cuGraphDestroy(graph);
  graphs_.emplace(key, exec);
  return exec;
}

void DecodeGraphCache::launch(CUgraphExec exec, CUstream stream) const {
  device_.check(device_.driver().cuGraphLaunch(exec, stream), "cuGraphLaunch");
}

void DecodeGraphCache::clear() {
  for (auto& [key, exec] : graphs_) device_.driver().cuGraphExecDestroy(exec);
  graphs_.clear();
}

}  // namespace tandem::engine
