#include "cpu_moe.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <string>

namespace tandem::engine {

ExpertPlacement makeExpertPlacement(int numLayers, int numExperts, int ranks, int slotsPerRank,
                                    std::vector<std::vector<int32_t>> slotExpert) {
  ExpertPlacement p;
  p.numExperts = numExperts;
  p.ranks = ranks;
  p.slotsPerRank = slotsPerRank;
  const size_t slots = static_cast<size_t>(ranks) * slotsPerRank;
  if (slotExpert.size() != static_cast<size_t>(numLayers))
    throw BadInput("the expert placement has " + std::to_string(slotExpert.size()) + " layers; the model has " +
                   std::to_string(numLayers));
  p.expertSlots.resize(numLayers);
  for (int l = 0; l < numLayers; ++l) {
    const std::vector<int32_t>& row = slotExpert[l];
    if (row.size() != slots)
      throw BadInput("layer " + std::to_string(l) + " of the expert placement has " + std::to_string(row.size()) +
                     " slots; " + std::to_string(ranks) + " ranks x " + std::to_string(slotsPerRank) +
                     " slots make " + std::to_string(slots));
    std::vector<std::vector<int32_t>>& of = p.expertSlots[l];
    of.assign(numExperts, {});
    for (size_t s = 0; s < slots; ++s) {
      if (row[s] < 0 || row[s] >= numExperts)
        throw BadInput("layer " + std::to_string(l) + " slot " + std::to_string(s) + " holds expert " +
                       std::to_string(row[s]) + "; the model has experts 0.." + std::to_string(numExperts - 1));
      of[row[s]].push_back(static_cast<int32_t>(s));
    }
    for (int e = 0; e < numExperts; ++e)
      if (of[e].empty())
        throw BadInput("layer " + std::to_string(l) + " of the expert placement leaves expert " + std::to_string(e) +
                       " without a replica");
  }
  p.slotExpert = std::move(slotExpert);
  return p;
}

ExpertPlacement staticExpertPlacement(int numLayers, int numExperts, int ranks, int redundantSlotsPerRank) {
  const int own = numExperts / ranks, perRank = own + redundantSlotsPerRank;
  std::vector<int32_t> row(static_cast<size_t>(ranks) * perRank);
  for (size_t s = 0; s < row.size(); ++s)
    row[s] = static_cast<int32_t>((static_cast<int>(s) / perRank * own + static_cast<int>(s) % perRank) % numExperts);
  return makeExpertPlacement(numLayers, numExperts, ranks, perRank, std::vector<std::vector<int32_t>>(numLayers, row));
}

CpuMoe::CpuMoe(const LlamaConfig& c, int firstLayer, int numLayers, int slots, size_t intermediate,
               size_t sharedIntermediate)
    : moe_(c.moe),
      hidden_(static_cast<size_t>(c.hiddenSize)),
      inter_(intermediate),
      sharedInter_(sharedIntermediate),
      slots_(slots) {
  const size_t n = static_cast<size_t>(slots_);
  layers_.resize(numLayers);
  for (int l = 0; l < numLayers; ++l) {
    if (!moe_.isSparse(firstLayer + l)) continue;  // a dense layer: the rank's dense FFN
    Layer& L = layers_[l];
    L.router.resize(static_cast<size_t>(moe_.numExperts) * hidden_);
    L.gateUp.resize(n * gateUpSize());
    L.down.resize(n * downSize());
    if (moe_.sharedIntermediateSize == 0) continue;
    L.sharedGateUp.resize(2 * sharedInter_ * hidden_);
    L.sharedDown.resize(hidden_ * sharedInter_);
    L.sharedGate.resize(hidden_);
  }
}

size_t CpuMoe::gateUpOffset(int slot, bool up) const {
  return static_cast<size_t>(slot) * gateUpSize() + (up ? inter_ * hidden_ : 0);
}

size_t CpuMoe::downOffset(int slot) const { return static_cast<size_t>(slot) * downSize(); }

void CpuMoe::forward(int layer, const float* x, size_t ntok, const ExpertPlacement& placement, int placementLayer,
                     int rank, const int64_t* routedBefore, const MatmulFn& matmul, std::vector<float>& pairs, std::vector<int>& chosen,
                     int64_t* tokensPerExpert, int64_t* pairsRun) const {
  const Layer& L = layers_[layer];
  const size_t numExperts = moe_.numExperts, k = moe_.topK, inter = inter_, h = hidden_;

  // Routing: softmax over the router logits, the k largest probabilities (ties: the lower expert index), then
  // renormalised over the k when the family says so (Mixtral always; Qwen3-MoE with norm_topk_prob).
  std::vector<float> logits(ntok * numExperts);
  matmul(x, ntok, h, L.router.data(), numExperts, logits.data());
  chosen.resize(ntok * k);
  std::vector<float> weight(ntok * k);
  std::vector<int> order(numExperts);
  std::vector<float> prob(numExperts);
  for (size_t t = 0; t < ntok; ++t) {
    const float* row = &logits[t * numExperts];
    float maxLogit = *std::max_element(row, row + numExperts);
    float sum = 0;
    for (size_t e = 0; e < numExperts; ++e) sum += prob[e] = std::exp(row[e] - maxLogit);
    for (size_t e = 0; e < numExperts; ++e) prob[e] /= sum;
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + k, order.end(),
                      [&](int a, int b) { return prob[a] > prob[b] || (prob[a] == prob[b] && a < b); });
    float kept = 0;
    for (size_t j = 0; j < k; ++j) kept += prob[order[j]];
    for (size_t j = 0; j < k; ++j) {
      chosen[t * k + j] = order[j];
      weight[t * k + j] = moe_.normTopkProb ? prob[order[j]] / kept : prob[order[j]];
    }
  }
  if (tokensPerExpert)
    for (int e : chosen) ++tokensPerExpert[e];

  // Each pair to a slot: the j-th pair routed to expert e (earlier passes' first, then this one's in pair order) goes
  // to replica j mod replicas(e). Then
  // the pairs of this rank's slots grouped by slot, pairs ascending within a slot.
  const int firstSlot = rank * placement.slotsPerRank;
  const std::vector<std::vector<int32_t>>& replicas = placement.expertSlots[placementLayer];
  std::vector<uint64_t> seen(routedBefore, routedBefore + numExperts);
  std::vector<int> slotOf(ntok * k);
  std::vector<size_t> start(slots_ + 1, 0);
  for (size_t p = 0; p < ntok * k; ++p) {
    const std::vector<int32_t>& of = replicas[chosen[p]];
    const int local = of[seen[chosen[p]]++ % of.size()] - firstSlot;
    slotOf[p] = local >= 0 && local < slots_ ? local : -1;
    if (slotOf[p] >= 0) ++start[slotOf[p] + 1];
  }
  for (int s = 0; s < slots_; ++s) start[s + 1] += start[s];
  if (pairsRun) *pairsRun += static_cast<int64_t>(start[slots_]);
  std::vector<size_t> fill(start.begin(), start.end() - 1);
  std::vector<size_t> pairAt(start[slots_]);
  for (size_t p = 0; p < ntok * k; ++p)
    if (slotOf[p] >= 0) pairAt[fill[slotOf[p]]++] = p;

  pairs.assign(ntok * k * h, 0.0f);
  size_t most = 0;
  for (int s = 0; s < slots_; ++s) most = std::max(most, start[s + 1] - start[s]);
  std::vector<float> in(most * h), gateUp(most * 2 * inter), act(most * inter), y(most * h);
  for (int s = 0; s < slots_; ++s) {
    const size_t n = start[s + 1] - start[s];
    if (n == 0) continue;
    for (size_t i = 0; i < n; ++i) std::memcpy(&in[i * h], x + (pairAt[start[s] + i] / k) * h, h * sizeof(float));
    // gate and up rows are adjacent in storage: one GEMM gives [n, 2 * inter] (gate, then up).
    matmul(in.data(), n, h, L.gateUp.data() + gateUpOffset(s, false), 2 * inter, gateUp.data());
    for (size_t i = 0; i < n; ++i) {
      const float* g = &gateUp[i * 2 * inter];
      const float* u = g + inter;
      float* a = &act[i * inter];
      for (size_t j = 0; j < inter; ++j) a[j] = g[j] / (1.0f + std::exp(-g[j])) * u[j];
    }
    matmul(act.data(), n, inter, L.down.data() + downOffset(s), h, y.data());
    for (size_t i = 0; i < n; ++i) {
      const size_t p = pairAt[start[s] + i];
      const float w = weight[p];
      float* o = &pairs[p * h];
      const float* yi = &y[i * h];
      for (size_t d = 0; d < h; ++d) o[d] = w * yi[d];
    }
  }
}

void CpuMoe::addSharedExpert(int layer, const float* x, size_t ntok, const MatmulFn& matmul, float* out) const {
  const Layer& L = layers_[layer];
  const size_t inter = sharedInter_, h = hidden_;
  if (moe_.sharedIntermediateSize == 0 || ntok == 0) return;
  std::vector<float> gate(ntok), gateUp(ntok * 2 * inter), act(ntok * inter), y(ntok * h);
  matmul(x, ntok, h, L.sharedGate.data(), 1, gate.data());
  matmul(x, ntok, h, L.sharedGateUp.data(), 2 * inter, gateUp.data());
  for (size_t t = 0; t < ntok; ++t) {
    const float* g = &gateUp[t * 2 * inter];
    const float* u = g + inter;
    float* a = &act[t * inter];
    for (size_t j = 0; j < inter; ++j) a[j] = g[j] / (1.0f + std::exp(-g[j])) * u[j];
  }
  matmul(act.data(), ntok, inter, L.sharedDown.data(), h, y.data());
  // As transformers: the routed sum, then + sigmoid(gate) * shared (the product rounded first).
  for (size_t t = 0; t < ntok; ++t) {
    const float s = 1.0f / (1.0f + std::exp(-gate[t]));
    float* o = out + t * h;
    const float* yt = &y[t * h];
    for (size_t d = 0; d < h; ++d) o[d] += s * yt[d];
  }
}

void CpuMoe::combine(const std::vector<float>& pairs, const std::vector<int>& chosen, size_t ntok, float* out) const {
  const size_t k = moe_.topK, h = hidden_;
  std::vector<size_t> byExpert(k);
  for (size_t t = 0; t < ntok; ++t) {
    std::iota(byExpert.begin(), byExpert.end(), t * k);
    std::sort(byExpert.begin(), byExpert.end(), [&](size_t a, size_t b) { return chosen[a] < chosen[b]; });
    float* o = out + t * h;
    std::fill(o, o + h, 0.0f);
    // The order transformers adds the experts' outputs in (and one rank's, whatever the placement).
    for (size_t p : byExpert) {
      const float* c = &pairs[p * h];
      for (size_t d = 0; d < h; ++d) o[d] += c[d];
    }
  }
}

}  // namespace tandem::engine
