#include "cpu_llama.h"

#include <pthread.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <unordered_map>

namespace tandem::engine {

// ---------------------------------------------------------------------------------------------------------------
// ThreadPool
// ---------------------------------------------------------------------------------------------------------------

ThreadPool::ThreadPool(unsigned threads) {
  for (unsigned i = 1; i < std::max(1u, threads); ++i) {
    workers_.emplace_back([this, i] {
      pthread_setname_np(pthread_self(), ("tandem-cpu-" + std::to_string(i)).substr(0, 15).c_str());
      workerLoop();
    });
  }
}

ThreadPool::~ThreadPool() { stop(); }

void ThreadPool::stop() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  wake_.notify_all();
  for (auto& t : workers_)
    if (t.joinable()) t.join();
  workers_.clear();
}

void ThreadPool::runChunks() {
  for (;;) {
    size_t begin = next_.fetch_add(1, std::memory_order_relaxed) * grain_;
    if (begin >= count_) return;
    try {
      (*body_)(begin, std::min(count_, begin + grain_));
    } catch (...) {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!error_) error_ = std::current_exception();
    }
  }
}

void ThreadPool::workerLoop() {
  uint64_t seen = 0;
  std::unique_lock<std::mutex> lock(mutex_);
  for (;;) {
    wake_.wait(lock, [&] { return stopping_ || generation_ != seen; });
    if (stopping_) return;
    seen = generation_;
    lock.unlock();
    runChunks();
    lock.lock();
    if (--busy_ == 0) done_.notify_one();
  }
}

void ThreadPool::parallelFor(size_t count, size_t grain, const std::function<void(size_t, size_t)>& body) {
  if (count == 0) return;
  grain = std::max<size_t>(1, grain);
  if (workers_.empty() || count <= grain) {
    body(0, count);
    return;
  }
  {
    std::lock_guard<std::mutex> lock(mutex_);
    body_ = &body;
    count_ = count;
    grain_ = grain;
    next_.store(0, std::memory_order_relaxed);
    busy_ = static_cast<unsigned>(workers_.size());
    error_ = nullptr;
    ++generation_;
  }
  wake_.notify_all();
  runChunks();
  std::exception_ptr error;
  {
    // Every helper passes through each generation (the next cannot start before busy_ reaches 0), so none
    // can still be reading body_ after this.
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [&] { return busy_ == 0; });
    body_ = nullptr;
    error = error_;
    error_ = nullptr;
  }
  if (error) std::rethrow_exception(error);
}

// ---------------------------------------------------------------------------------------------------------------
// Model
// ---------------------------------------------------------------------------------------------------------------

namespace {

std::string shapeText(size_t rows, size_t cols) {
  return rows == 0 ? "[" + std::to_string(cols) + "]" : "[" + std::to_string(rows) + ", " + std::to_string(cols) + "]";
}

void rmsNorm(const float* x, const float* weight, size_t n, float eps, float* out) {
  double sum = 0;
  for (size_t i = 0; i < n; ++i) sum += static_cast<double>(x[i]) * x[i];
  float scale = static_cast<float>(1.0 / std::sqrt(sum / static_cast<double>(n) + eps));
  for (size_t i = 0; i < n; ++i) out[i] = weight[i] * (x[i] * scale);
}

// HF rotate_half: the first and second halves of a head are the two coordinates of each rotated pair.
void applyRope(float* head, const float* cosv, const float* sinv, size_t half) {
  for (size_t i = 0; i < half; ++i) {
    float a = head[i], b = head[i + half];
    head[i] = a * cosv[i] - b * sinv[i];
    head[i + half] = b * cosv[i] + a * sinv[i];
  }
}

constexpr size_t kMinMacsPerChunk = 1 << 15;  // below this a chunk is not worth a thread hand-off

}  // namespace

CpuLlama::CpuLlama(const LlamaConfig& config, const KvPoolView& pool, unsigned threads, const std::string& kernel)
    : config_(config), pool_(pool), pool_threads_(threads) {
  const LlamaConfig& c = config_;
  checkConfig(c);
  if (pool.numBlocks <= 0 || pool.blockSize <= 0) throw BadInput("numBlocks and blockSize must be positive");
  if (reinterpret_cast<uintptr_t>(pool.base) % alignof(float) != 0)
    throw BadInput("the KV buffer must start at a multiple of 4 bytes (fp32)");
  size_t need = static_cast<size_t>(pool.numBlocks) * c.numLayers * 2 * pool.blockSize * c.numKvHeads * c.headDim *
                sizeof(float);
  if (pool.bytes < need)
    throw BadInput("the KV buffer holds " + std::to_string(pool.bytes) + " bytes; the pool needs " +
                   std::to_string(need));
  try {
    gemm_ = selectGemmKernel(kernel);
  } catch (const std::invalid_argument& e) {
    throw BadInput(e.what());
  }

  const size_t h = c.hiddenSize, inter = c.intermediateSize;
  qDim_ = static_cast<size_t>(c.numHeads) * c.headDim;
  kvDim_ = static_cast<size_t>(c.numKvHeads) * c.headDim;
  qkvDim_ = qDim_ + 2 * kvDim_;
  invFreq_ = ropeFrequencies(c);

  embed_.resize(static_cast<size_t>(c.vocabSize) * h);
  layers_.resize(c.numLayers);
  for (Layer& L : layers_) {
    L.inputNorm.resize(h);
    L.wqkv.resize(qkvDim_ * h);
    if (c.attentionBias) L.bqkv.resize(qkvDim_);
    L.wo.resize(h * qDim_);
    if (c.attentionOutputBias) L.bo.resize(h);
    L.postAttentionNorm.resize(h);
    if (c.qkNorm) L.qNorm.resize(c.headDim), L.kNorm.resize(c.headDim);
    if (c.moe.numExperts > 0) continue;
    L.wgateUp.resize(2 * inter * h);
    L.wdown.resize(h * inter);
  }
  if (c.moe.numExperts > 0) {
    moe_ = std::make_unique<CpuMoe>(c);
    expertTokens_.assign(static_cast<size_t>(c.numLayers) * c.moe.numExperts, 0);
  }
  const size_t moeInter = c.moe.intermediateSize;
  finalNorm_.resize(h);
  if (!c.tieWordEmbeddings) lmHead_.resize(static_cast<size_t>(c.vocabSize) * h);
  // Names come from the weight manifest (lib/engine/model/manifest.ts; checkConfig checked it is complete).
  for (const WeightEntry& w : c.weights) {
    Layer* L = w.layer >= 0 ? &layers_[w.layer] : nullptr;
    switch (w.role) {
      case WeightRole::Embed: registerSlot(w.name, embed_, 0, c.vocabSize, h); break;
      case WeightRole::InputNorm: registerSlot(w.name, L->inputNorm, 0, 0, h); break;
      case WeightRole::Q: registerSlot(w.name, L->wqkv, 0, qDim_, h); break;
      case WeightRole::QBias: registerSlot(w.name, L->bqkv, 0, 0, qDim_); break;
      case WeightRole::K: registerSlot(w.name, L->wqkv, qDim_ * h, kvDim_, h); break;
      case WeightRole::KBias: registerSlot(w.name, L->bqkv, qDim_, 0, kvDim_); break;
      case WeightRole::V: registerSlot(w.name, L->wqkv, (qDim_ + kvDim_) * h, kvDim_, h); break;
      case WeightRole::VBias: registerSlot(w.name, L->bqkv, qDim_ + kvDim_, 0, kvDim_); break;
      case WeightRole::O: registerSlot(w.name, L->wo, 0, h, qDim_); break;
      case WeightRole::OBias: registerSlot(w.name, L->bo, 0, 0, h); break;
      case WeightRole::PostNorm: registerSlot(w.name, L->postAttentionNorm, 0, 0, h); break;
      case WeightRole::Gate: registerSlot(w.name, L->wgateUp, 0, inter, h); break;
      case WeightRole::Up: registerSlot(w.name, L->wgateUp, inter * h, inter, h); break;
      case WeightRole::Down: registerSlot(w.name, L->wdown, 0, h, inter); break;
      case WeightRole::FinalNorm: registerSlot(w.name, finalNorm_, 0, 0, h); break;
      case WeightRole::LmHead: registerSlot(w.name, lmHead_, 0, c.vocabSize, h); break;
      case WeightRole::QNorm: registerSlot(w.name, L->qNorm, 0, 0, c.headDim); break;
      case WeightRole::KNorm: registerSlot(w.name, L->kNorm, 0, 0, c.headDim); break;
      case WeightRole::Router: registerSlot(w.name, moe_->router(w.layer), 0, c.moe.numExperts, h); break;
      case WeightRole::ExpertGate:
        registerSlot(w.name, moe_->gateUp(w.layer), moe_->gateUpOffset(w.expert, false), moeInter, h);
        break;
      case WeightRole::ExpertUp:
        registerSlot(w.name, moe_->gateUp(w.layer), moe_->gateUpOffset(w.expert, true), moeInter, h);
        break;
      case WeightRole::ExpertDown:
        registerSlot(w.name, moe_->down(w.layer), moe_->downOffset(w.expert), h, moeInter);
        break;
    }
  }
}

void CpuLlama::registerSlot(const std::string& name, std::vector<float>& storage, size_t offset, size_t rows,
                            size_t cols) {
  slots_[name] = Slot{storage.data() + offset, (rows == 0 ? 1 : rows) * cols, shapeText(rows, cols)};
  order_.push_back(name);
}

void CpuLlama::setWeight(const std::string& name, const float* data, size_t count) {
  auto it = slots_.find(name);
  if (it == slots_.end()) {
    std::string hint = name == "lm_head.weight" && config_.tieWordEmbeddings
                           ? " (this config ties lm_head to model.embed_tokens.weight)"
                           : "";
    throw BadInput("tensor '" + name + "' is not part of this model" + hint);
  }
  Slot& slot = it->second;
  if (count != slot.count)
    throw BadInput("tensor '" + name + "' has " + std::to_string(count) + " elements; this config needs " +
                   std::to_string(slot.count) + " (shape " + slot.shape + ")");
  std::memcpy(slot.dest, data, count * sizeof(float));
  slot.set = true;
}

std::vector<std::string> CpuLlama::missingWeights() const {
  std::vector<std::string> out;
  for (const auto& name : order_)
    if (!slots_.at(name).set) out.push_back(name);
  return out;
}

std::vector<int64_t> CpuLlama::takeExpertTokens() {
  std::lock_guard<std::mutex> lock(expertMutex_);
  std::vector<int64_t> out = expertTokens_;
  std::fill(expertTokens_.begin(), expertTokens_.end(), 0);
  return out;
}

float* CpuLlama::kvTile(int layer, int kv, int block) const {
  size_t tile = static_cast<size_t>(pool_.blockSize) * kvDim_;
  size_t lk = static_cast<size_t>(layer) * 2 + kv;
  size_t index = pool_.layout == KvLayout::BlockMajor
                     ? static_cast<size_t>(block) * config_.numLayers * 2 + lk
                     : lk * pool_.numBlocks + block;
  return pool_.base + index * tile;
}

void CpuLlama::validate(const ForwardInput& in) const {
  validateForward(config_, pool_.numBlocks, pool_.blockSize, in);
}

void CpuLlama::matmul(const float* x, size_t rows, size_t k, const float* w, const float* bias, size_t n, float* y) {
  // Chunks of output rows, a multiple of 4 (the kernels' panel width), each worth at least kMinMacsPerChunk.
  size_t perRow = std::max<size_t>(1, rows * k);
  size_t grain = std::max<size_t>(16, (kMinMacsPerChunk + perRow - 1) / perRow);
  grain = (grain + 3) & ~size_t(3);
  GemmFn fn = gemm_.fn;
  pool_threads_.parallelFor(n, grain, [&](size_t n0, size_t n1) { fn(x, rows, k, w, n0, n1, bias, y, n); });
}

void CpuLlama::attention(const ForwardInput& in, int layer, const float* qkv, float* out,
                         const std::vector<int>& seqOf) {
  const LlamaConfig& c = config_;
  const size_t hd = c.headDim, heads = c.numHeads, group = c.numHeads / c.numKvHeads;
  const size_t bs = pool_.blockSize, mb = in.maxBlocksPerSeq;
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(hd)));
  const size_t ntok = in.tokens.size();
  int64_t longest = 1;
  for (int32_t len : in.contextLens) longest = std::max<int64_t>(longest, len);
  size_t perTask = static_cast<size_t>(longest) * hd * 2;
  size_t grain = std::max<size_t>(1, kMinMacsPerChunk / perTask);
  pool_threads_.parallelFor(ntok * heads, grain, [&](size_t begin, size_t end) {
    std::vector<float> scores(static_cast<size_t>(longest));
    std::vector<float> acc(hd);
    for (size_t task = begin; task < end; ++task) {
      size_t t = task / heads, h = task % heads, kvh = h / group;
      const int32_t* table = in.blockTables.data() + seqOf[t] * mb;
      int64_t p = in.positions[t];
      int64_t start = c.slidingWindow > 0 ? std::max<int64_t>(0, p - c.slidingWindow + 1) : 0;
      const float* q = qkv + t * qkvDim_ + h * hd;
      float maxScore = -INFINITY;
      for (int64_t j = start; j <= p; ++j) {
        const float* kRow = kvTile(layer, 0, table[j / bs]) + ((j % bs) * c.numKvHeads + kvh) * hd;
        float s = dot(q, kRow, hd) * scale;
        scores[j - start] = s;
        maxScore = std::max(maxScore, s);
      }
      float sum = 0;
      for (int64_t j = start; j <= p; ++j) {
        float e = std::exp(scores[j - start] - maxScore);
        scores[j - start] = e;
        sum += e;
      }
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t j = start; j <= p; ++j) {
        const float* vRow = kvTile(layer, 1, table[j / bs]) + ((j % bs) * c.numKvHeads + kvh) * hd;
        float wj = scores[j - start];
        for (size_t d = 0; d < hd; ++d) acc[d] += wj * vRow[d];
      }
      float inv = 1.0f / sum;
      float* o = out + t * qDim_ + h * hd;
      for (size_t d = 0; d < hd; ++d) o[d] = acc[d] * inv;
    }
  });
}

std::vector<float> CpuLlama::forward(const ForwardInput& in) {
  if (aborted_.load()) throw Aborted("the model was disposed");
  auto missing = missingWeights();
  if (!missing.empty())
    throw BadInput(std::to_string(missing.size()) + " weight tensor(s) not set, first '" + missing[0] + "'");
  validate(in);

  const LlamaConfig& c = config_;
  const size_t ntok = in.tokens.size(), nseq = in.seqStarts.size() - 1;
  const size_t h = c.hiddenSize, inter = c.intermediateSize, hd = c.headDim, half = hd / 2;
  const size_t bs = pool_.blockSize, mb = in.maxBlocksPerSeq;
  if (nseq == 0) return {};

  std::vector<int> seqOf(ntok);
  for (size_t s = 0; s < nseq; ++s)
    for (int32_t t = in.seqStarts[s]; t < in.seqStarts[s + 1]; ++t) seqOf[t] = static_cast<int>(s);

  // cos and sin of every token's position, shared by all layers and heads.
  std::vector<float> cosv(ntok * half), sinv(ntok * half);
  for (size_t t = 0; t < ntok; ++t)
    for (size_t i = 0; i < half; ++i) {
      float angle = static_cast<float>(in.positions[t]) * invFreq_[i];
      cosv[t * half + i] = static_cast<float>(std::cos(static_cast<double>(angle)));
      sinv[t * half + i] = static_cast<float>(std::sin(static_cast<double>(angle)));
    }

  std::vector<float> x(ntok * h), xn(ntok * h), tmp(ntok * h);
  std::vector<float> qkv(ntok * qkvDim_), attn(ntok * qDim_);
  std::vector<float> gateUp(moe_ ? 0 : ntok * 2 * inter), act(moe_ ? 0 : ntok * inter);
  std::vector<int64_t> expertTokens(moe_ ? expertTokens_.size() : 0);
  const MatmulFn moeMatmul = [this](const float* a, size_t rows, size_t k, const float* w, size_t n, float* y) {
    matmul(a, rows, k, w, nullptr, n, y);
  };
  for (size_t t = 0; t < ntok; ++t)
    std::memcpy(&x[t * h], &embed_[static_cast<size_t>(in.tokens[t]) * h], h * sizeof(float));

  for (int l = 0; l < c.numLayers; ++l) {
    if (aborted_.load()) throw Aborted("the model was disposed during a forward pass");
    const Layer& L = layers_[l];
    for (size_t t = 0; t < ntok; ++t) rmsNorm(&x[t * h], L.inputNorm.data(), h, c.rmsNormEps, &xn[t * h]);
    matmul(xn.data(), ntok, h, L.wqkv.data(), c.attentionBias ? L.bqkv.data() : nullptr, qkvDim_, qkv.data());
    for (size_t t = 0; t < ntok; ++t) {
      float* row = &qkv[t * qkvDim_];
      if (c.qkNorm)  // Qwen3: each q and k head RMS-normalised over headDim, before RoPE
        for (int hh = 0; hh < c.numHeads + c.numKvHeads; ++hh) {
          const float* w = hh < c.numHeads ? L.qNorm.data() : L.kNorm.data();
          rmsNorm(row + hh * hd, w, hd, c.rmsNormEps, row + hh * hd);
        }
      for (int hh = 0; hh < c.numHeads + c.numKvHeads; ++hh)  // q heads, then k heads (contiguous)
        applyRope(row + hh * hd, &cosv[t * half], &sinv[t * half], half);
      // K and V of this token into its slot: NHD, [token][head][dim].
      int32_t p = in.positions[t];
      int32_t block = in.blockTables[seqOf[t] * mb + p / bs];
      size_t slot = static_cast<size_t>(p % bs) * kvDim_;
      std::memcpy(kvTile(l, 0, block) + slot, row + qDim_, kvDim_ * sizeof(float));
      std::memcpy(kvTile(l, 1, block) + slot, row + qDim_ + kvDim_, kvDim_ * sizeof(float));
    }
    attention(in, l, qkv.data(), attn.data(), seqOf);
    matmul(attn.data(), ntok, qDim_, L.wo.data(), c.attentionOutputBias ? L.bo.data() : nullptr, h, tmp.data());
    for (size_t i = 0; i < ntok * h; ++i) x[i] += tmp[i];

    for (size_t t = 0; t < ntok; ++t) rmsNorm(&x[t * h], L.postAttentionNorm.data(), h, c.rmsNormEps, &xn[t * h]);
    if (moe_) {
      int64_t* layerTokens = &expertTokens[static_cast<size_t>(l) * c.moe.numExperts];
      moe_->forward(l, xn.data(), ntok, tmp.data(), moeMatmul, layerTokens);
      for (size_t i = 0; i < ntok * h; ++i) x[i] += tmp[i];
      continue;
    }
    matmul(xn.data(), ntok, h, L.wgateUp.data(), nullptr, 2 * inter, gateUp.data());
    for (size_t t = 0; t < ntok; ++t) {
      const float* g = &gateUp[t * 2 * inter];
      const float* u = g + inter;
      float* a = &act[t * inter];
      for (size_t i = 0; i < inter; ++i) a[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
    }
    matmul(act.data(), ntok, inter, L.wdown.data(), nullptr, h, tmp.data());
    for (size_t i = 0; i < ntok * h; ++i) x[i] += tmp[i];
  }

  if (moe_) {
    std::lock_guard<std::mutex> lock(expertMutex_);
    for (size_t i = 0; i < expertTokens.size(); ++i) expertTokens_[i] += expertTokens[i];
  }

  // Final norm and logits for each sequence's last new token only.
  std::vector<float> last(nseq * h);
  for (size_t s = 0; s < nseq; ++s)
    rmsNorm(&x[static_cast<size_t>(in.seqStarts[s + 1] - 1) * h], finalNorm_.data(), h, c.rmsNormEps, &last[s * h]);
  std::vector<float> logits(nseq * static_cast<size_t>(c.vocabSize));
  const float* head = c.tieWordEmbeddings ? embed_.data() : lmHead_.data();
  matmul(last.data(), nseq, h, head, nullptr, c.vocabSize, logits.data());
  return logits;
}

}  // namespace tandem::engine
