// The sparse mixture-of-experts FFN of the CPU model (Mixtral, Qwen3-MoE), fp32: a router, softmax over the
// experts, the top k per token (renormalised to sum to 1 where the family does), and SwiGLU experts run over
// the tokens routed to them (tokens grouped by expert, each expert's GEMMs over its group), their outputs
// combined with the routing weights. Each CpuLlamaRank owns one for its stage's layers and calls forward() in place
// of the dense FFN. A rank may hold only some experts (expert parallelism: whole experts [first, first + count))
// and of each only some intermediate channels (tensor parallelism: gate/up rows and down columns); the router is
// whole on every rank, so every rank routes every token alike, and forward() adds only the rank's own experts'
// (partial) outputs: the sum over the ranks of a stage (CpuLlamaRank's all-reduce, in rank order) is the FFN.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <vector>

#include "llama_common.h"

namespace tandem::engine {

// y[m, n] = x[m, :] . w[n, :] for m < rows; w is [n, k] row-major (CpuLlama::matmul without bias).
using MatmulFn = std::function<void(const float* x, size_t rows, size_t k, const float* w, size_t n, float* y)>;

class CpuMoe {
 public:
  // Allocates `numLayers` layers' routers and the experts [experts.start, + experts.count) of each, every expert
  // `intermediate` channels wide; config.moe.numExperts > 0.
  CpuMoe(const LlamaConfig& config, int numLayers, int firstExpert, int numExperts, size_t intermediate);

  // Weight storage (layer: 0.. numLayers - 1; expert: a global index this instance holds), for the rank's tensor
  // registration. router: [numExperts, hidden] (all experts); gateUp: per local expert [2 * intermediate, hidden]
  // (gate rows, then up rows); down: per local expert [hidden, intermediate].
  std::vector<float>& router(int layer) { return layers_[layer].router; }
  std::vector<float>& gateUp(int layer) { return layers_[layer].gateUp; }
  std::vector<float>& down(int layer) { return layers_[layer].down; }
  size_t gateUpOffset(int expert, bool up) const;
  size_t downOffset(int expert) const;
  bool holdsExpert(int expert) const { return expert >= firstExpert_ && expert < firstExpert_ + localExperts_; }
  size_t intermediate() const { return inter_; }

  // out[t] = sum over token t's top-k experts e that this instance holds, in expert order, of
  // weight(t, e) * expert_e(x[t]) (with a slice of the channels, a partial output); x and out are [ntok, hidden].
  // Adds the tokens routed to each expert (all experts, held or not) to tokensPerExpert[0..numExperts) unless null.
  void forward(int layer, const float* x, size_t ntok, float* out, const MatmulFn& matmul,
               int64_t* tokensPerExpert) const;

 private:
  struct Layer {
    std::vector<float> router, gateUp, down;
  };
  MoeConfig moe_;
  size_t hidden_, inter_;
  int firstExpert_, localExperts_;
  std::vector<Layer> layers_;
};

}  // namespace tandem::engine
