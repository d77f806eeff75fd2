#include "cpu_moe.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>

namespace tandem::engine {

CpuMoe::CpuMoe(const LlamaConfig& c, int numLayers, int firstExpert, int numExperts, size_t intermediate)
    : moe_(c.moe),
      hidden_(static_cast<size_t>(c.hiddenSize)),
      inter_(intermediate),
      firstExpert_(firstExpert),
      localExperts_(numExperts) {
  const size_t local = static_cast<size_t>(localExperts_);
  layers_.resize(numLayers);
  for (Layer& L : layers_) {
    L.router.resize(static_cast<size_t>(moe_.numExperts) * hidden_);
    L.gateUp.resize(local * 2 * inter_ * hidden_);
    L.down.resize(local * hidden_ * inter_);
  }
}

size_t CpuMoe::gateUpOffset(int expert, bool up) const {
  return (static_cast<size_t>(expert - firstExpert_) * 2 + (up ? 1 : 0)) * inter_ * hidden_;
}

size_t CpuMoe::downOffset(int expert) const { return static_cast<size_t>(expert - firstExpert_) * hidden_ * inter_; }

void CpuMoe::forward(int layer, const float* x, size_t ntok, float* out, const MatmulFn& matmul,
                     int64_t* tokensPerExpert) const {
  const Layer& L = layers_[layer];
  const size_t numExperts = moe_.numExperts, k = moe_.topK, inter = inter_, h = hidden_;

  // Routing: softmax over the router logits, the k largest probabilities (ties: the lower expert index), then
  // renormalised over the k when the family says so (Mixtral always; Qwen3-MoE with norm_topk_prob).
  std::vector<float> logits(ntok * numExperts);
  matmul(x, ntok, h, L.router.data(), numExperts, logits.data());
  std::vector<int> chosen(ntok * k);
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

  // Group the (token, choice) pairs by expert, tokens ascending within an expert.
  std::vector<size_t> start(numExperts + 1, 0);
  for (int e : chosen) ++start[e + 1];
  for (size_t e = 0; e < numExperts; ++e) {
    if (tokensPerExpert) tokensPerExpert[e] += static_cast<int64_t>(start[e + 1]);
    start[e + 1] += start[e];
  }
  std::vector<size_t> fill(start.begin(), start.end() - 1);
  std::vector<size_t> pairOf(ntok * k);
  for (size_t p = 0; p < ntok * k; ++p) pairOf[fill[chosen[p]]++] = p;

  // Each held expert over its tokens; contributions added in expert order (the order transformers adds them in).
  std::memset(out, 0, ntok * h * sizeof(float));
  const size_t first = static_cast<size_t>(firstExpert_), end = first + static_cast<size_t>(localExperts_);
  size_t most = 0;
  for (size_t e = first; e < end; ++e) most = std::max(most, start[e + 1] - start[e]);
  std::vector<float> in(most * h), gateUp(most * 2 * inter), act(most * inter), y(most * h);
  for (size_t e = first; e < end; ++e) {
    const size_t n = start[e + 1] - start[e];
    if (n == 0) continue;
    for (size_t i = 0; i < n; ++i)
      std::memcpy(&in[i * h], x + (pairOf[start[e] + i] / k) * h, h * sizeof(float));
    // gate and up rows are adjacent in storage: one GEMM gives [n, 2 * inter] (gate, then up).
    matmul(in.data(), n, h, L.gateUp.data() + gateUpOffset(static_cast<int>(e), false), 2 * inter, gateUp.data());
    for (size_t i = 0; i < n; ++i) {
      const float* g = &gateUp[i * 2 * inter];
      const float* u = g + inter;
      float* a = &act[i * inter];
      for (size_t j = 0; j < inter; ++j) a[j] = g[j] / (1.0f + std::exp(-g[j])) * u[j];
    }
    matmul(act.data(), n, inter, L.down.data() + downOffset(static_cast<int>(e)), h, y.data());
    for (size_t i = 0; i < n; ++i) {
      size_t p = pairOf[start[e] + i];
      float w = weight[p];
      float* o = out + (p / k) * h;
      const float* yi = &y[i * h];
      for (size_t d = 0; d < h; ++d) o[d] += w * yi[d];
    }
  }
}

}  // namespace tandem::engine
