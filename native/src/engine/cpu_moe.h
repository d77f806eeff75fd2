// The sparse mixture-of-experts FFN of the CPU model (Mixtral, Qwen3-MoE, Qwen2-MoE), fp32: a router, softmax over
// the experts, the top k per token (renormalised to sum to 1 where the family does), and SwiGLU experts run over
// the tokens routed to them (tokens grouped by expert, each expert's GEMMs over its group); Qwen2-MoE's shared
// expert beside them (addSharedExpert). Each CpuLlamaRank owns one for its stage's layers and calls forward() in
// place of the dense FFN in the sparse ones (a dense layer of an MoE model has no storage here).
//
// Weights live in physical expert slots. Under tensor parallelism (ep 1) slot e holds expert e, and of each only
// some intermediate channels (gate/up rows and down columns). Under expert parallelism (ep > 1) rank r holds slots
// [r * S, (r + 1) * S) of a stage group's ep * S slots (S = numExperts / ep + redundant slots per rank), each a
// whole expert; an ExpertPlacement (per layer: slot -> logical expert) says which, and may give an expert several
// replicas (EPLB, lib/moe/eplb.ts). The router is whole on every rank, so every rank routes every token alike and
// spreads each expert's tokens over its replicas alike: round robin, the j-th (token, choice) pair routed to expert e
// since the placement took effect goes to replica j mod replicas(e) (within one pass from a fresh count, what lib/moe's
// routeToSlots does; carried over passes, so that decode steps of a few tokens reach every replica too).
//
// The combine does not depend on the placement: forward() writes each (token, choice) pair's weighted expert output
// (zero for pairs another rank runs), the stage group sums those over its ranks (exact: one rank's value plus
// zeros), and combine() adds a token's pairs in ascending expert order, as one rank would. The shared expert is
// whole on every EP rank, which adds it to the combined sum as one rank does. So EP ranks under any placement give
// the logits of one rank bit for bit.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <vector>

#include "llama_common.h"

namespace tandem::engine {

// y[m, n] = x[m, :] . w[n, :] for m < rows; w is [n, k] row-major (CpuLlama::matmul without bias).
using MatmulFn = std::function<void(const float* x, size_t rows, size_t k, const float* w, size_t n, float* y)>;

// Where the experts of every layer live among a stage group's physical slots (slot s is on rank s / slotsPerRank).
struct ExpertPlacement {
  int numExperts = 0, ranks = 1, slotsPerRank = 0;
  std::vector<std::vector<int32_t>> slotExpert;                // [layer][slot] -> logical expert
  std::vector<std::vector<std::vector<int32_t>>> expertSlots;  // [layer][expert] -> its slots, ascending
  int slots() const { return ranks * slotsPerRank; }
};

// Checks a table (every layer numLayers' slots in [0, numExperts), every expert with a replica in every layer) and
// derives expertSlots; throws BadInput naming the first fault.
ExpertPlacement makeExpertPlacement(int numLayers, int numExperts, int ranks, int slotsPerRank,
                                    std::vector<std::vector<int32_t>> slotExpert);
// lib/moe's staticPlacement: rank r's slot j holds expert (r * numExperts / ranks + j) % numExperts, so rank r holds
// its own experts first, then replicas of the next ranks' first ones.
ExpertPlacement staticExpertPlacement(int numLayers, int numExperts, int ranks, int redundantSlotsPerRank);

class CpuMoe {
 public:
  // Allocates the routers and `slots` physical expert slots, every slot `intermediate` channels wide, and the
  // shared expert's `sharedIntermediate` channels (0 without one), of each sparse layer among layers
  // [firstLayer, firstLayer + numLayers); config.moe.numExperts > 0.
  CpuMoe(const LlamaConfig& config, int firstLayer, int numLayers, int slots, size_t intermediate,
         size_t sharedIntermediate);

  // Weight storage (layer: 0.. numLayers - 1; slot: this instance's local slot 0.. slots - 1), for the rank's tensor
  // registration and for copying experts between slots. router: [numExperts, hidden] (all experts); gateUp: per slot
  // [2 * intermediate, hidden] (gate rows, then up rows); down: per slot [hidden, intermediate].
  std::vector<float>& router(int layer) { return layers_[layer].router; }
  std::vector<float>& gateUp(int layer) { return layers_[layer].gateUp; }
  std::vector<float>& down(int layer) { return layers_[layer].down; }
  size_t gateUpOffset(int slot, bool up) const;
  size_t downOffset(int slot) const;
  size_t gateUpSize() const { return 2 * inter_ * hidden_; }  // one slot's elements
  size_t downSize() const { return hidden_ * inter_; }
  int slots() const { return slots_; }
  size_t intermediate() const { return inter_; }
  // The shared expert: sharedGateUp [2 * sharedIntermediate, hidden] (gate rows, then up rows), sharedDown
  // [hidden, sharedIntermediate], sharedGate [hidden] (shared_expert_gate's one row).
  std::vector<float>& sharedGateUp(int layer) { return layers_[layer].sharedGateUp; }
  std::vector<float>& sharedDown(int layer) { return layers_[layer].sharedDown; }
  std::vector<float>& sharedGate(int layer) { return layers_[layer].sharedGate; }
  size_t sharedIntermediate() const { return sharedInter_; }

  // Routes x ([ntok, hidden]) and runs this instance's slots (rank `rank`'s slots of `placement`, layer
  // `placementLayer`; routedBefore[e]: pairs routed to expert e under it by earlier passes) over the pairs routed to them: pairs[(t * topK + j) * hidden ..] = weight(t, j) *
  // expert(x[t]) for the pairs this rank runs, zero for the others; `chosen` gets each pair's expert. Adds the
  // tokens routed to each expert (all experts) to tokensPerExpert[0..numExperts) unless null, and the pairs this rank
  // ran to *pairsRun unless null.
  void forward(int layer, const float* x, size_t ntok, const ExpertPlacement& placement, int placementLayer, int rank,
               const int64_t* routedBefore, const MatmulFn& matmul, std::vector<float>& pairs, std::vector<int>& chosen, int64_t* tokensPerExpert,
               int64_t* pairsRun) const;
  // out[t] = sum over token t's pairs in ascending expert order of pairs[pair] (out is [ntok, hidden]).
  void combine(const std::vector<float>& pairs, const std::vector<int>& chosen, size_t ntok, float* out) const;
  // The shared expert (transformers' Qwen2MoeSparseMoeBlock): out[t] += sigmoid(sharedGate . x[t]) *
  // down(silu(gate x[t]) * up x[t]) over this instance's shared channels (all of them, or a tensor-parallel rank's
  // share, whose partial sums the group adds). Nothing without a shared expert.
  void addSharedExpert(int layer, const float* x, size_t ntok, const MatmulFn& matmul, float* out) const;

 private:
  struct Layer {
    std::vector<float> router, gateUp, down;
    std::vector<float> sharedGateUp, sharedDown, sharedGate;
  };
  MoeConfig moe_;
  size_t hidden_, inter_, sharedInter_;
  int slots_;
  std::vector<Layer> layers_;
};

}  // namespace tandem::engine
