// The sparse mixture-of-experts FFN of the CPU model (Mixtral, Qwen3-MoE), fp32: a router, softmax over the
// experts, the top k per token (renormalised to sum to 1 where the family does), and SwiGLU experts run over
// the tokens routed to them (tokens grouped by expert, each expert's GEMMs over its group), their outputs
// combined with the routing weights. CpuLlama owns one and calls forward() in place of the dense FFN.
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
  // Allocates every layer's router and experts; config.moe.numExperts > 0.
  explicit CpuMoe(const LlamaConfig& config);

  // Weight storage, for CpuLlama's tensor registration. router: [numExperts, hidden]; gateUp: per expert
  // [2 * intermediate, hidden] (gate rows, then up rows); down: per expert [hidden, intermediate].
  std::vector<float>& router(int layer) { return layers_[layer].router; }
  std::vector<float>& gateUp(int layer) { return layers_[layer].gateUp; }
  std::vector<float>& down(int layer) { return layers_[layer].down; }
  size_t gateUpOffset(int expert, bool up) const;
  size_t downOffset(int expert) const;

  // out[t] = sum over token t's top-k experts e of weight(t, e) * expert_e(x[t]); x and out are [ntok, hidden].
  // Adds the tokens routed to each expert to tokensPerExpert[0..numExperts).
  void forward(int layer, const float* x, size_t ntok, float* out, const MatmulFn& matmul,
               int64_t* tokensPerExpert) const;

 private:
  struct Layer {
    std::vector<float> router, gateUp, down;
  };
  MoeConfig moe_;
  size_t hidden_;
  std::vector<Layer> layers_;
};

}  // namespace tandem::engine
