#include "llama_common.h"

#include <algorithm>
#include <cmath>
#include <set>
#include <tuple>
#include <unordered_map>
#include <utility>

namespace tandem::engine {

std::vector<float> ropeFrequencies(const LlamaConfig& c) {
  size_t half = static_cast<size_t>(c.headDim) / 2;
  std::vector<float> out(half);
  for (size_t i = 0; i < half; ++i) {
    double f = 1.0 / std::pow(c.ropeTheta, static_cast<double>(2 * i) / c.headDim);
    if (c.llama3Rope) {
      const double pi = 3.14159265358979323846;
      double lowWavelen = c.ropeOriginalMaxPositions / c.ropeLowFreqFactor;
      double highWavelen = c.ropeOriginalMaxPositions / c.ropeHighFreqFactor;
      double wavelen = 2 * pi / f;
      if (wavelen > lowWavelen) {
        f = f / c.ropeFactor;
      } else if (wavelen >= highWavelen) {
        double smooth = (c.ropeOriginalMaxPositions / wavelen - c.ropeLowFreqFactor) /
                        (c.ropeHighFreqFactor - c.ropeLowFreqFactor);
        f = (1 - smooth) * f / c.ropeFactor + smooth * f;
      }
    }
    out[i] = static_cast<float>(f);
  }
  return out;
}

namespace {
constexpr const char* kRoleNames[] = {"embed", "input_norm", "q",         "q_bias", "k",  "k_bias",
                                      "v",     "v_bias",     "o",         "o_bias", "post_norm", "gate",
                                      "up",    "down",       "final_norm", "lm_head", "q_norm", "k_norm",
                                      "router", "expert_gate", "expert_up", "expert_down", "shared_gate",
                                      "shared_up", "shared_down", "shared_expert_gate"};
constexpr int kRoleCount = static_cast<int>(sizeof(kRoleNames) / sizeof(kRoleNames[0]));
static_assert(kRoleCount == static_cast<int>(WeightRole::SharedExpertGate) + 1, "kRoleNames follows WeightRole");
bool perLayer(WeightRole r) { return r != WeightRole::Embed && r != WeightRole::FinalNorm && r != WeightRole::LmHead; }
bool perExpert(WeightRole r) {
  return r == WeightRole::ExpertGate || r == WeightRole::ExpertUp || r == WeightRole::ExpertDown;
}
}  // namespace

WeightRole parseWeightRole(const std::string& role) {
  for (int i = 0; i < kRoleCount; ++i)
    if (role == kRoleNames[i]) return static_cast<WeightRole>(i);
  throw BadInput("unknown weight role '" + role + "' (lib/engine/model/manifest.ts's WEIGHT_ROLES)");
}

void checkWeightManifest(const LlamaConfig& c) {
  // Which roles this config has (in `layer` for per-layer roles: an MoE model's dense layers have the dense FFN).
  auto wanted = [&](WeightRole r, int layer) {
    switch (r) {
      case WeightRole::QBias:
      case WeightRole::KBias:
      case WeightRole::VBias:
        return c.attentionBias;
      case WeightRole::OBias:
        return c.attentionOutputBias;
      case WeightRole::LmHead:
        return !c.tieWordEmbeddings;
      case WeightRole::QNorm:
      case WeightRole::KNorm:
        return c.qkNorm;
      case WeightRole::Gate:
      case WeightRole::Up:
      case WeightRole::Down:
        return !c.moe.isSparse(layer);
      case WeightRole::Router:
      case WeightRole::ExpertGate:
      case WeightRole::ExpertUp:
      case WeightRole::ExpertDown:
        return c.moe.isSparse(layer);
      case WeightRole::SharedGate:
      case WeightRole::SharedUp:
      case WeightRole::SharedDown:
      case WeightRole::SharedExpertGate:
        return c.moe.isSparse(layer) && c.moe.sharedIntermediateSize > 0;
      default:
        return true;
    }
  };
  std::set<std::tuple<int, int, int>> seen;  // (role, layer, expert)
  std::set<std::string> names;
  for (const WeightEntry& w : c.weights) {
    const std::string role = kRoleNames[static_cast<int>(w.role)];
    if (perLayer(w.role) ? (w.layer < 0 || w.layer >= c.numLayers) : w.layer != -1)
      throw BadInput("weight manifest: tensor '" + w.name + "' (" + role + ") has layer " + std::to_string(w.layer) +
                     (perLayer(w.role) ? "; the model has layers 0.." + std::to_string(c.numLayers - 1)
                                       : "; a model-wide tensor has layer -1"));
    if (!wanted(w.role, w.layer))
      throw BadInput("weight manifest: tensor '" + w.name + "' (" + role + ") is not part of this config" +
                     (w.role == WeightRole::LmHead ? " (it ties lm_head to the embedding)"
                      : c.moe.numExperts > 0 && perLayer(w.role)
                          ? (c.moe.isSparse(w.layer) ? " (layer " + std::to_string(w.layer) + " is sparse)"
                                                     : " (layer " + std::to_string(w.layer) + " is dense)")
                          : ""));
    if (perExpert(w.role) ? (w.expert < 0 || w.expert >= c.moe.numExperts) : w.expert != -1)
      throw BadInput("weight manifest: tensor '" + w.name + "' (" + role + ") has expert " +
                     std::to_string(w.expert) +
                     (perExpert(w.role) ? "; the model has experts 0.." + std::to_string(c.moe.numExperts - 1)
                                        : "; only expert tensors have one"));
    if (!seen.insert({static_cast<int>(w.role), w.layer, w.expert}).second)
      throw BadInput("weight manifest: two tensors for " + role + " of layer " + std::to_string(w.layer) +
                     (w.expert >= 0 ? " expert " + std::to_string(w.expert) : "") + ", the second '" + w.name + "'");
    if (!names.insert(w.name).second) throw BadInput("weight manifest: tensor '" + w.name + "' appears twice");
  }
  for (int r = 0; r < kRoleCount; ++r) {
    WeightRole role = static_cast<WeightRole>(r);
    for (int l = perLayer(role) ? 0 : -1; l < (perLayer(role) ? c.numLayers : 0); ++l) {
      if (!wanted(role, l)) continue;
      for (int e = perExpert(role) ? 0 : -1; e < (perExpert(role) ? c.moe.numExperts : 0); ++e)
        if (!seen.count({r, l, e}))
          throw BadInput(std::string("weight manifest: no tensor for ") + kRoleNames[r] +
                         (l >= 0 ? " of layer " + std::to_string(l) : "") +
                         (e >= 0 ? " expert " + std::to_string(e) : ""));
    }
  }
}

void checkConfig(const LlamaConfig& c) {
  if (c.vocabSize <= 0 || c.hiddenSize <= 0 || c.intermediateSize <= 0 || c.numLayers <= 0 || c.numHeads <= 0 ||
      c.numKvHeads <= 0 || c.headDim <= 0 || c.maxPositions <= 0)
    throw BadInput("every model dimension must be a positive integer");
  if (c.numHeads % c.numKvHeads != 0)
    throw BadInput("numKvHeads (" + std::to_string(c.numKvHeads) + ") must divide numHeads (" +
                   std::to_string(c.numHeads) + ")");
  if (c.headDim % 2 != 0) throw BadInput("headDim must be even for RoPE");
  if (c.slidingWindow < 0) throw BadInput("slidingWindow must be non-negative");
  if (c.moe.numExperts < 0 || (c.moe.numExperts > 0 && (c.moe.topK <= 0 || c.moe.topK > c.moe.numExperts ||
                                                        c.moe.intermediateSize <= 0)))
    throw BadInput("moe: numExperts must be >= 0, and with experts topK in 1..numExperts and intermediateSize > 0");
  if (c.moe.sharedIntermediateSize < 0 || (c.moe.numExperts == 0 && c.moe.sharedIntermediateSize > 0))
    throw BadInput("moe: sharedExpertIntermediateSize must be >= 0, and 0 without experts");
  std::vector<bool> dense(c.numLayers, false);
  for (int l : c.moe.denseLayers) {
    if (l < 0 || l >= c.numLayers || dense[l])
      throw BadInput("moe: denseLayers must be distinct layers 0.." + std::to_string(c.numLayers - 1) + " (got " +
                     std::to_string(l) + ")");
    dense[l] = true;
  }
  checkWeightManifest(c);
}

void validateForward(const LlamaConfig& c, int numBlocks, int blockSize, const ForwardInput& in) {
  auto fail = [](const std::string& m) { throw BadInput(m); };
  auto at = [](const char* what, size_t i) { return std::string(what) + "[" + std::to_string(i) + "]"; };
  if (in.seqStarts.empty()) fail("seqStarts must hold nseq + 1 entries (got none)");
  size_t nseq = in.seqStarts.size() - 1;
  size_t ntok = in.tokens.size();
  if (in.positions.size() != ntok)
    fail("positions has " + std::to_string(in.positions.size()) + " entries; tokens has " + std::to_string(ntok));
  if (in.seqStarts[0] != 0) fail("seqStarts[0] must be 0 (got " + std::to_string(in.seqStarts[0]) + ")");
  if (static_cast<size_t>(in.seqStarts[nseq]) != ntok)
    fail("seqStarts[" + std::to_string(nseq) + "] must equal the number of tokens " + std::to_string(ntok) +
         " (got " + std::to_string(in.seqStarts[nseq]) + ")");
  for (size_t s = 0; s < nseq; ++s)
    if (in.seqStarts[s + 1] <= in.seqStarts[s])
      fail("seqStarts must increase (every sequence has at least one new token); " + at("seqStarts", s + 1) +
           " = " + std::to_string(in.seqStarts[s + 1]) + " <= " + std::to_string(in.seqStarts[s]));
  if (in.contextLens.size() != nseq)
    fail("contextLens has " + std::to_string(in.contextLens.size()) + " entries; there are " +
         std::to_string(nseq) + " sequences");
  if (in.maxBlocksPerSeq <= 0) fail("maxBlocksPerSeq must be positive");
  size_t mb = static_cast<size_t>(in.maxBlocksPerSeq);
  if (in.blockTables.size() != nseq * mb)
    fail("blockTables has " + std::to_string(in.blockTables.size()) + " entries; nseq x maxBlocksPerSeq is " +
         std::to_string(nseq * mb));
  for (size_t t = 0; t < ntok; ++t)
    if (in.tokens[t] < 0 || in.tokens[t] >= c.vocabSize)
      fail(at("tokens", t) + " = " + std::to_string(in.tokens[t]) + " is outside the vocabulary (0.." +
           std::to_string(c.vocabSize - 1) + ")");

  // A block written this step must be read by no other sequence (and appear once in its own table).
  std::unordered_map<int32_t, int> uses;
  std::vector<int32_t> written;
  for (size_t s = 0; s < nseq; ++s) {
    size_t first = in.seqStarts[s], last = in.seqStarts[s + 1] - 1;
    int32_t p0 = in.positions[first];
    if (p0 < 0) fail(at("positions", first) + " = " + std::to_string(p0) + " is negative");
    for (size_t t = first + 1; t <= last; ++t)
      if (in.positions[t] != in.positions[t - 1] + 1)
        fail("the positions of sequence " + std::to_string(s) + " must be consecutive: " + at("positions", t) +
             " = " + std::to_string(in.positions[t]) + " follows " + std::to_string(in.positions[t - 1]));
    int64_t ctx = in.contextLens[s];
    if (ctx != static_cast<int64_t>(in.positions[last]) + 1)
      fail(at("contextLens", s) + " = " + std::to_string(ctx) + " must be the last new position + 1 (" +
           std::to_string(static_cast<int64_t>(in.positions[last]) + 1) + ")");
    if (ctx > c.maxPositions)
      fail("sequence " + std::to_string(s) + " reaches position " + std::to_string(ctx - 1) +
           ", beyond the model's maxPositions " + std::to_string(c.maxPositions));
    if (ctx > static_cast<int64_t>(mb) * blockSize)
      fail("sequence " + std::to_string(s) + " holds " + std::to_string(ctx) + " tokens but its block table has room for " +
           std::to_string(mb * blockSize) + " (maxBlocksPerSeq " + std::to_string(mb) + " x blockSize " +
           std::to_string(blockSize) + ")");
    int64_t firstRead = c.slidingWindow > 0 ? std::max<int64_t>(0, p0 - c.slidingWindow + 1) : 0;
    size_t b0 = static_cast<size_t>(firstRead / blockSize), b1 = static_cast<size_t>((ctx - 1) / blockSize);
    size_t firstWritten = static_cast<size_t>(p0 / blockSize);
    for (size_t b = b0; b <= b1; ++b) {
      int32_t block = in.blockTables[s * mb + b];
      if (block < 0 || block >= numBlocks)
        fail("blockTables[" + std::to_string(s) + "][" + std::to_string(b) + "] = " + std::to_string(block) +
             " is not a block of the pool (0.." + std::to_string(numBlocks - 1) + ")");
      uses[block]++;
      if (b >= firstWritten) written.push_back(block);
    }
  }
  for (int32_t block : written)
    if (uses[block] > 1)
      fail("block " + std::to_string(block) + " receives new tokens this step but appears " +
           std::to_string(uses[block]) + " times in the block tables");
}

}  // namespace tandem::engine
