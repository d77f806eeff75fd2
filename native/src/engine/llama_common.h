// What the CPU and GPU Llama runners share: the model's configuration, one step's input as
// lib/engine/runner.ts's ForwardBatch describes it, the check of that input, and the RoPE frequencies.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace tandem::engine {

// An argument that breaks the contract (unknown tensor, wrong size, index out of range). The wrapper maps it
// to TANDEM_BAD_ARGUMENT.
struct BadInput : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

// forward() gave up because the model was closed meanwhile. The wrapper maps it to TANDEM_DISPOSED.
struct Aborted : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// What a weight tensor is in the decoder: lib/engine/model/manifest.ts's WEIGHT_ROLES, in the same order.
enum class WeightRole {
  Embed, InputNorm, Q, QBias, K, KBias, V, VBias, O, OBias, PostNorm, Gate, Up, Down, FinalNorm, LmHead,
  QNorm, KNorm, Router, ExpertGate, ExpertUp, ExpertDown, SharedGate, SharedUp, SharedDown, SharedExpertGate
};

// One entry of the weight manifest (lib/engine/model/manifest.ts, which owns the tensor names): the runners lay
// their memory out by role and layer and register the tensor under `name`.
struct WeightEntry {
  std::string name;
  WeightRole role = WeightRole::Embed;
  int layer = -1;  // -1: embedding, final norm, lm_head
  int expert = -1;  // the expert of an expert_gate / expert_up / expert_down tensor; -1 for the rest
};

// A sparse mixture-of-experts FFN in place of the dense one in every layer but `denseLayers` (Mixtral, Qwen3-MoE,
// Qwen2-MoE): a router [numExperts, hidden], softmax over experts, the top `topK`, optionally renormalised to sum to
// 1, and SwiGLU experts of width `intermediateSize`; with sharedIntermediateSize > 0 (Qwen2-MoE) a shared SwiGLU
// expert every token goes through, scaled by sigmoid(shared_expert_gate . x) and added to the routed sum.
struct MoeConfig {
  int numExperts = 0;  // 0: a dense model
  int topK = 0;
  int intermediateSize = 0;
  bool normTopkProb = false;
  int sharedIntermediateSize = 0;  // 0: no shared expert
  std::vector<int> denseLayers;    // layers with the dense FFN (the config's intermediateSize) instead
  bool isSparse(int layer) const {
    if (numExperts == 0) return false;
    for (int l : denseLayers)
      if (l == layer) return false;
    return true;
  }
};

struct LlamaConfig {
  int vocabSize = 0;
  int hiddenSize = 0;
  int intermediateSize = 0;
  int numLayers = 0;
  int numHeads = 0;
  int numKvHeads = 0;
  int headDim = 0;
  float rmsNormEps = 1e-5f;
  double ropeTheta = 10000;
  // llama3 frequency-dependent RoPE scaling (Llama 3.1+); off: plain RoPE.
  bool llama3Rope = false;
  double ropeFactor = 1, ropeLowFreqFactor = 1, ropeHighFreqFactor = 4, ropeOriginalMaxPositions = 8192;
  int maxPositions = 0;
  bool tieWordEmbeddings = false;
  bool attentionBias = false;        // q/k/v bias
  bool attentionOutputBias = false;  // o_proj bias
  int slidingWindow = 0;             // 0: full attention; w: a token at p sees positions (p - w, p]
  bool qkNorm = false;               // Qwen3: RMSNorm over each q and k head (weights [headDim]) before RoPE
  MoeConfig moe;
  std::vector<WeightEntry> weights;  // the weight manifest, checkpoint order (checkWeightManifest)
};

// The role named as manifest.ts spells it ('q', 'gate', 'final_norm', ...); throws BadInput for another.
WeightRole parseWeightRole(const std::string& role);

// Throws BadInput unless config.weights holds exactly the tensors the config needs: every (role, layer) once
// (biases only where the config has them, lm_head only when untied), layers in range, names distinct.
void checkWeightManifest(const LlamaConfig& config);

enum class KvLayout { BlockMajor, LayerMajor };

// One step, as lib/engine/runner.ts's ForwardBatch describes it. Owned copies: forward() runs on another thread.
struct ForwardInput {
  std::vector<int32_t> tokens;
  std::vector<int32_t> positions;
  std::vector<int32_t> seqStarts;
  std::vector<int32_t> blockTables;
  int maxBlocksPerSeq = 0;
  std::vector<int32_t> contextLens;
};

// Throws BadInput unless every dimension is positive and consistent (heads, even headDim, window).
void checkConfig(const LlamaConfig& config);

// Throws BadInput (before anything is written) unless every index in `in` is in range and consistent with a
// pool of numBlocks blocks of blockSize tokens: one place, so both runners refuse the same batches.
void validateForward(const LlamaConfig& config, int numBlocks, int blockSize, const ForwardInput& in);

// The RoPE frequencies as transformers computes them: theta^(-2i/d), then for rope_type llama3 long
// wavelengths divided by `factor`, short ones kept, and those in between interpolated. headDim / 2 values.
std::vector<float> ropeFrequencies(const LlamaConfig& config);

}  // namespace tandem::engine
