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

// ---------------------------------------------------------------------------------------------------------------
// One rank
// ---------------------------------------------------------------------------------------------------------------

CpuLlamaRank::CpuLlamaRank(const LlamaConfig& config, const KvPoolView& pool, const ParallelConfig& parallel,
                           int stage, int groupRank, unsigned threads, const GemmKernel& gemm,
                           int redundantExpertSlots)
    : config_(config),
      pool_(pool),
      gemm_(gemm),
      stage_(stage),
      groupRank_(groupRank),
      groupSize_(parallel.group()),
      // tp 1 in a larger group (expert parallelism beside replicated attention): every rank holds all of it.
      shard_(tensorShard(config, parallel.tp, parallel.tp == 1 ? 0 : groupRank)),
      layers_range_(stageLayers(config.numLayers, parallel.pp)[stage]),
      firstStage_(stage == 0),
      lastStage_(stage == parallel.pp - 1),
      replicatedKv_(config.numKvHeads < parallel.tp || (parallel.tp == 1 && parallel.group() > 1)),
      pool_threads_(threads),
      epRank_(parallel.ep > 1 ? groupRank : 0) {
  const LlamaConfig& c = config_;
  const size_t h = c.hiddenSize, hd = c.headDim;
  // Replicas of the whole attention (tp 1): the group's rank 0 writes the KV pool, the others read it.
  if (parallel.tp == 1 && groupRank > 0) shard_.writesKv = false;
  qDim_ = static_cast<size_t>(shard_.heads.count) * hd;
  kvDim_ = static_cast<size_t>(shard_.kvHeads.count) * hd;
  qkvDim_ = qDim_ + 2 * kvDim_;
  inter_ = static_cast<size_t>(shard_.intermediate.count);
  kvStride_ = static_cast<size_t>(c.numKvHeads) * hd;
  const size_t vocab = static_cast<size_t>(shard_.vocab.count);
  invFreq_ = ropeFrequencies(c);

  const bool holdsEmbed = firstStage_ || (lastStage_ && c.tieWordEmbeddings);
  if (holdsEmbed) embed_.resize(vocab * h);
  if (lastStage_) {
    finalNorm_.resize(h);
    if (!c.tieWordEmbeddings) lmHead_.resize(vocab * h);
  }
  layerWeights_.resize(layers_range_.count);
  for (int l = 0; l < layers_range_.count; ++l) {
    Layer& L = layerWeights_[l];
    L.inputNorm.resize(h);
    L.wqkv.resize(qkvDim_ * h);
    if (c.attentionBias) L.bqkv.resize(qkvDim_);
    L.wo.resize(h * qDim_);
    if (c.attentionOutputBias) L.bo.resize(h);
    L.postAttentionNorm.resize(h);
    if (c.qkNorm) L.qNorm.resize(hd), L.kNorm.resize(hd);
    if (c.moe.isSparse(layers_range_.start + l)) continue;
    L.wgateUp.resize(2 * inter_ * h);
    L.wdown.resize(h * inter_);
  }
  const ExpertShard experts = expertShard(c, parallel, groupRank);
  const size_t moeInter = static_cast<size_t>(experts.intermediate.count);
  if (c.moe.numExperts > 0) {
    // Weights load into the slots of the rank's own experts (slot e - first); the redundant slots after them are
    // filled by CpuLlama from the owners (fillReplicas).
    const int slots = experts.experts.count + (parallel.ep > 1 ? redundantExpertSlots : 0);
    moe_ = std::make_unique<CpuMoe>(c, layers_range_.start, layers_range_.count, slots, moeInter,
                                    static_cast<size_t>(experts.shared.count));
    expertTokens_.assign(static_cast<size_t>(c.numLayers) * c.moe.numExperts, 0);
    rankPairs_.assign(static_cast<size_t>(c.numLayers), 0);
  }
  auto holdsExpert = [&](int e) {
    return e >= experts.experts.start && e < experts.experts.start + experts.experts.count;
  };
  const int firstExpert = experts.experts.start;
  // Names come from the weight manifest (lib/engine/model/manifest.ts; checkConfig checked it is complete).
  for (const WeightEntry& w : c.weights) {
    Layer* L = nullptr;
    if (w.layer >= 0) {
      if (w.layer < layers_range_.start || w.layer >= layers_range_.start + layers_range_.count) continue;
      L = &layerWeights_[w.layer - layers_range_.start];
    }
    switch (w.role) {
      case WeightRole::Embed:
        if (holdsEmbed) registerSlot(w.name, embed_, 0, vocab, h);
        break;
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
      case WeightRole::Gate: registerSlot(w.name, L->wgateUp, 0, inter_, h); break;
      case WeightRole::Up: registerSlot(w.name, L->wgateUp, inter_ * h, inter_, h); break;
      case WeightRole::Down: registerSlot(w.name, L->wdown, 0, h, inter_); break;
      case WeightRole::FinalNorm:
        if (lastStage_) registerSlot(w.name, finalNorm_, 0, 0, h);
        break;
      case WeightRole::LmHead:
        if (lastStage_) registerSlot(w.name, lmHead_, 0, vocab, h);
        break;
      case WeightRole::QNorm: registerSlot(w.name, L->qNorm, 0, 0, hd); break;
      case WeightRole::KNorm: registerSlot(w.name, L->kNorm, 0, 0, hd); break;
      case WeightRole::Router:
        registerSlot(w.name, moe_->router(w.layer - layers_range_.start), 0, c.moe.numExperts, h);
        break;
      case WeightRole::ExpertGate:
      case WeightRole::ExpertUp:
        if (holdsExpert(w.expert))
          registerSlot(w.name, moe_->gateUp(w.layer - layers_range_.start),
                       moe_->gateUpOffset(w.expert - firstExpert, w.role == WeightRole::ExpertUp), moeInter, h);
        break;
      case WeightRole::ExpertDown:
        if (holdsExpert(w.expert))
          registerSlot(w.name, moe_->down(w.layer - layers_range_.start), moe_->downOffset(w.expert - firstExpert), h,
                       moeInter);
        break;
      case WeightRole::SharedGate:
      case WeightRole::SharedUp:
        registerSlot(w.name, moe_->sharedGateUp(w.layer - layers_range_.start),
                     w.role == WeightRole::SharedUp ? experts.shared.count * h : 0, experts.shared.count, h);
        break;
      case WeightRole::SharedDown:
        registerSlot(w.name, moe_->sharedDown(w.layer - layers_range_.start), 0, h, experts.shared.count);
        break;
      case WeightRole::SharedExpertGate:
        registerSlot(w.name, moe_->sharedGate(w.layer - layers_range_.start), 0, 1, h);
        break;
    }
  }
}

void CpuLlamaRank::registerSlot(const std::string& name, std::vector<float>& storage, size_t offset, size_t rows,
                                size_t cols) {
  slots_[name] = Slot{storage.data() + offset, (rows == 0 ? 1 : rows) * cols, shapeText(rows, cols)};
  order_.push_back(name);
}

void CpuLlamaRank::setWeight(const std::string& name, const float* data, size_t count) {
  Slot& slot = slots_.at(name);
  if (count != slot.count)
    throw BadInput("tensor '" + name + "' has " + std::to_string(count) + " elements; this " +
                   (shard_.size > 1 || !firstStage_ || !lastStage_ ? "rank's slice" : "config") + " needs " +
                   std::to_string(slot.count) + " (shape " + slot.shape + ")");
  if (count) std::memcpy(slot.dest, data, count * sizeof(float));
  slot.set = true;
}

void CpuLlamaRank::takeExpertTokens(std::vector<int64_t>& into) {
  for (size_t i = 0; i < expertTokens_.size(); ++i) into[i] += expertTokens_[i];
  std::fill(expertTokens_.begin(), expertTokens_.end(), 0);
}

void CpuLlamaRank::takeRankPairs(std::vector<int64_t>& into, int epRanks) {
  if (groupRank_ < epRanks)
    for (size_t l = 0; l < rankPairs_.size(); ++l) into[l * epRanks + groupRank_] += rankPairs_[l];
  std::fill(rankPairs_.begin(), rankPairs_.end(), 0);
}

std::vector<std::string> CpuLlamaRank::missingWeights() const {
  std::vector<std::string> out;
  for (const auto& name : order_)
    if (!slots_.at(name).set) out.push_back(name);
  return out;
}

float* CpuLlamaRank::kvTile(int layer, int kv, int block) const {
  size_t tile = static_cast<size_t>(pool_.blockSize) * kvStride_;
  size_t lk = static_cast<size_t>(layer) * 2 + kv;
  size_t index = pool_.layout == KvLayout::BlockMajor
                     ? static_cast<size_t>(block) * config_.numLayers * 2 + lk
                     : lk * pool_.numBlocks + block;
  return pool_.base + index * tile;
}

void CpuLlamaRank::matmul(const float* x, size_t rows, size_t k, const float* w, const float* bias, size_t n,
                          float* y) {
  // Chunks of output rows, a multiple of 4 (the kernels' panel width), each worth at least kMinMacsPerChunk.
  size_t perRow = std::max<size_t>(1, rows * k);
  size_t grain = std::max<size_t>(16, (kMinMacsPerChunk + perRow - 1) / perRow);
  grain = (grain + 3) & ~size_t(3);
  GemmFn fn = gemm_.fn;
  pool_threads_.parallelFor(n, grain, [&](size_t n0, size_t n1) { fn(x, rows, k, w, n0, n1, bias, y, n); });
}

void CpuLlamaRank::attention(const ForwardInput& in, int layer, const float* qkv, float* out,
                             const std::vector<int>& seqOf) {
  const LlamaConfig& c = config_;
  const size_t hd = c.headDim, heads = shard_.heads.count, group = c.numHeads / c.numKvHeads;
  const size_t firstHead = shard_.heads.start;
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
      size_t t = task / heads, h = task % heads, kvh = (firstHead + h) / group;  // kvh: the pool's head index
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

void CpuLlamaRank::begin(const ForwardInput& in, Step& step) const {
  const size_t ntok = in.tokens.size(), nseq = in.seqStarts.size() - 1;
  const size_t h = config_.hiddenSize, half = config_.headDim / 2;
  step.in = &in;
  step.seqOf.resize(ntok);
  for (size_t s = 0; s < nseq; ++s)
    for (int32_t t = in.seqStarts[s]; t < in.seqStarts[s + 1]; ++t) step.seqOf[t] = static_cast<int>(s);
  // cos and sin of every token's position, shared by all layers and heads.
  step.cosv.resize(ntok * half);
  step.sinv.resize(ntok * half);
  for (size_t t = 0; t < ntok; ++t)
    for (size_t i = 0; i < half; ++i) {
      float angle = static_cast<float>(in.positions[t]) * invFreq_[i];
      step.cosv[t * half + i] = static_cast<float>(std::cos(static_cast<double>(angle)));
      step.sinv[t * half + i] = static_cast<float>(std::sin(static_cast<double>(angle)));
    }
  step.x.resize(ntok * h);
  step.xn.resize(ntok * h);
  step.tmp.resize(ntok * h);
  step.qkv.resize(ntok * qkvDim_);
  step.attn.resize(ntok * qDim_);
  const bool denseFfn = !moe_ || !config_.moe.denseLayers.empty();  // a dense model, or an MoE one's dense layers
  step.gateUp.resize(denseFfn ? ntok * 2 * inter_ : 0);
  step.act.resize(denseFfn ? ntok * inter_ : 0);
}

void CpuLlamaRank::embed(Step& step, HostCommunicator& comm) {
  const ForwardInput& in = *step.in;
  const size_t h = config_.hiddenSize;
  const int32_t first = shard_.vocab.start, count = shard_.vocab.count;
  // Vocabulary-parallel: each rank fills the rows of its tokens, zeros elsewhere; the sum is exact.
  for (size_t t = 0; t < in.tokens.size(); ++t) {
    int32_t row = in.tokens[t] - first;
    float* dst = &step.x[t * h];
    if (row >= 0 && row < count) std::memcpy(dst, &embed_[static_cast<size_t>(row) * h], h * sizeof(float));
    else std::fill(dst, dst + h, 0.0f);
  }
  tpAllReduce(comm, step.x.data(), step.x.size());
}

void CpuLlamaRank::tpAllReduce(HostCommunicator& comm, float* data, size_t n) {
  if (shard_.size > 1) comm.allReduceSum(groupRank_, data, n);
}

void CpuLlamaRank::attentionBlock(const Layer& L, int layer, Step& step, HostCommunicator& comm) {
  const LlamaConfig& c = config_;
  const ForwardInput& in = *step.in;
  const size_t ntok = in.tokens.size(), h = c.hiddenSize, hd = c.headDim, half = hd / 2;
  const size_t bs = pool_.blockSize, mb = in.maxBlocksPerSeq;
  const int ropeHeads = shard_.heads.count + shard_.kvHeads.count;  // q heads, then k heads (contiguous)
  const size_t kvOffset = static_cast<size_t>(shard_.kvHeads.start) * hd;  // this rank's heads in a token's slot
  for (size_t t = 0; t < ntok; ++t) rmsNorm(&step.x[t * h], L.inputNorm.data(), h, c.rmsNormEps, &step.xn[t * h]);
  matmul(step.xn.data(), ntok, h, L.wqkv.data(), c.attentionBias ? L.bqkv.data() : nullptr, qkvDim_,
         step.qkv.data());
  for (size_t t = 0; t < ntok; ++t) {
    float* row = &step.qkv[t * qkvDim_];
    if (c.qkNorm)  // Qwen3: each q and k head RMS-normalised over headDim (one weight for all heads), before RoPE
      for (int hh = 0; hh < ropeHeads; ++hh) {
        const float* w = hh < shard_.heads.count ? L.qNorm.data() : L.kNorm.data();
        rmsNorm(row + hh * hd, w, hd, c.rmsNormEps, row + hh * hd);
      }
    for (int hh = 0; hh < ropeHeads; ++hh) applyRope(row + hh * hd, &step.cosv[t * half], &step.sinv[t * half], half);
    if (!shard_.writesKv) continue;
    // K and V of this token into its slot: NHD, [token][head][dim]; this rank's kv heads only.
    int32_t p = in.positions[t];
    int32_t block = in.blockTables[step.seqOf[t] * mb + p / bs];
    size_t slot = static_cast<size_t>(p % bs) * kvStride_ + kvOffset;
    std::memcpy(kvTile(layer, 0, block) + slot, row + qDim_, kvDim_ * sizeof(float));
    std::memcpy(kvTile(layer, 1, block) + slot, row + qDim_ + kvDim_, kvDim_ * sizeof(float));
  }
  // A replicated kv head is written by its first holder: the others wait for it before reading.
  if (replicatedKv_) comm.barrier(groupRank_);
  attention(in, layer, step.qkv.data(), step.attn.data(), step.seqOf);
  // Row-parallel o_proj: partial sums over this rank's heads; its bias is added once, by rank 0.
  const float* bias = c.attentionOutputBias && shard_.rank == 0 ? L.bo.data() : nullptr;
  matmul(step.attn.data(), ntok, qDim_, L.wo.data(), bias, h, step.tmp.data());
  tpAllReduce(comm, step.tmp.data(), ntok * h);
  for (size_t i = 0; i < ntok * h; ++i) step.x[i] += step.tmp[i];
}

void CpuLlamaRank::mlpBlock(const Layer& L, int layer, Step& step, HostCommunicator& comm) {
  const LlamaConfig& c = config_;
  const size_t ntok = step.in->tokens.size(), h = c.hiddenSize, inter = inter_;
  for (size_t t = 0; t < ntok; ++t)
    rmsNorm(&step.x[t * h], L.postAttentionNorm.data(), h, c.rmsNormEps, &step.xn[t * h]);
  if (moe_ && c.moe.isSparse(layer)) {
    // Every rank of the group holds every token's xn (the residual stream is whole on each rank), so dispatch is
    // selecting: each rank runs its expert slots (or its channels of every expert) over the pairs routed to them.
    // Expert parallel: the pairs' outputs are summed over the group (each pair is one rank's), then combined in
    // expert order, as one rank would (cpu_moe.h). Tensor parallel: each rank's partial FFN output is all-reduced.
    // Either way a fixed-order sum, so results do not depend on thread timing.
    int64_t* counts = groupRank_ == 0 ? &expertTokens_[static_cast<size_t>(layer) * c.moe.numExperts] : nullptr;
    const bool expertParallel = step.placement->ranks > 1;
    int64_t* ran = !expertParallel && groupRank_ > 0 ? nullptr : &rankPairs_[static_cast<size_t>(layer)];
    const MatmulFn moeMatmul = [this](const float* a, size_t rows, size_t k, const float* w, size_t n, float* y) {
      matmul(a, rows, k, w, nullptr, n, y);
    };
    moe_->forward(layer - layers_range_.start, step.xn.data(), ntok, *step.placement, layer, epRank_,
                  step.routedBefore + static_cast<size_t>(layer) * c.moe.numExperts, moeMatmul, step.moePairs,
                  step.moeChosen, counts, ran);
    if (expertParallel) comm.allReduceSum(groupRank_, step.moePairs.data(), step.moePairs.size());
    moe_->combine(step.moePairs, step.moeChosen, ntok, step.tmp.data());
    // The shared expert: whole on each EP rank (after the combine, as one rank adds it), a tensor-parallel rank's
    // channels of it otherwise (its partial sum joins the routed one in the all-reduce).
    moe_->addSharedExpert(layer - layers_range_.start, step.xn.data(), ntok, moeMatmul, step.tmp.data());
    if (!expertParallel && groupSize_ > 1) comm.allReduceSum(groupRank_, step.tmp.data(), ntok * h);
    for (size_t i = 0; i < ntok * h; ++i) step.x[i] += step.tmp[i];
    return;
  }
  matmul(step.xn.data(), ntok, h, L.wgateUp.data(), nullptr, 2 * inter, step.gateUp.data());
  for (size_t t = 0; t < ntok; ++t) {
    const float* g = &step.gateUp[t * 2 * inter];
    const float* u = g + inter;
    float* a = &step.act[t * inter];
    for (size_t i = 0; i < inter; ++i) a[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
  }
  matmul(step.act.data(), ntok, inter, L.wdown.data(), nullptr, h, step.tmp.data());
  tpAllReduce(comm, step.tmp.data(), ntok * h);
  for (size_t i = 0; i < ntok * h; ++i) step.x[i] += step.tmp[i];
}

void CpuLlamaRank::layerStep(int layer, Step& step, HostCommunicator& comm) {
  const Layer& L = layerWeights_[layer - layers_range_.start];
  attentionBlock(L, layer, step, comm);
  mlpBlock(L, layer, step, comm);
}

void CpuLlamaRank::logits(Step& step, HostCommunicator& comm, float* out) {
  const LlamaConfig& c = config_;
  const ForwardInput& in = *step.in;
  const size_t nseq = in.seqStarts.size() - 1, h = c.hiddenSize, vocab = shard_.vocab.count;
  // Final norm and logits for each sequence's last new token only.
  std::vector<float> last(nseq * h);
  for (size_t s = 0; s < nseq; ++s)
    rmsNorm(&step.x[static_cast<size_t>(in.seqStarts[s + 1] - 1) * h], finalNorm_.data(), h, c.rmsNormEps,
            &last[s * h]);
  const float* head = c.tieWordEmbeddings ? embed_.data() : lmHead_.data();
  if (shard_.size == 1) {  // the whole vocabulary: rank 0 writes it, replicas (tp 1 beside ep) need not compute it
    if (out) matmul(last.data(), nseq, h, head, nullptr, vocab, out);
    return;
  }
  std::vector<float> part(nseq * vocab);
  matmul(last.data(), nseq, h, head, nullptr, vocab, part.data());
  comm.gatherColumns(shard_.rank, 0, part.data(), nseq, vocab, out, static_cast<size_t>(c.vocabSize));
}

// ---------------------------------------------------------------------------------------------------------------
// The runner group
// ---------------------------------------------------------------------------------------------------------------

CpuLlama::CpuLlama(const LlamaConfig& config, const KvPoolView& pool, unsigned threads, const std::string& kernel,
                   const ParallelConfig& parallel, int redundantExpertSlots)
    : config_(config), pool_(pool), parallel_(parallel) {
  const LlamaConfig& c = config_;
  checkConfig(c);
  checkParallelConfig(c, parallel_);
  if (pool.numBlocks <= 0 || pool.blockSize <= 0) throw BadInput("numBlocks and blockSize must be positive");
  if (reinterpret_cast<uintptr_t>(pool.base) % alignof(float) != 0)
    throw BadInput("the KV buffer must start at a multiple of 4 bytes (fp32)");
  size_t need = static_cast<size_t>(pool.numBlocks) * c.numLayers * 2 * pool.blockSize * c.numKvHeads * c.headDim *
                sizeof(float);
  if (pool.bytes < need)
    throw BadInput("the KV buffer holds " + std::to_string(pool.bytes) + " bytes; the pool needs " +
                   std::to_string(need));
  if (redundantExpertSlots < 0) throw BadInput("redundant expert slots must be >= 0");
  if (redundantExpertSlots > 0 && parallel_.ep < 2)
    throw BadInput("redundant expert slots need expert parallelism (ep > 1)");
  if (redundantExpertSlots > c.moe.numExperts)
    throw BadInput("at most " + std::to_string(c.moe.numExperts) + " redundant expert slots per rank (one per expert)");
  try {
    gemm_ = selectGemmKernel(kernel);
  } catch (const std::invalid_argument& e) {
    throw BadInput(e.what());
  }
  const int ranks = parallel_.ranks(), group = parallel_.group();
  const unsigned perRank = std::max(1u, std::max(1u, threads) / static_cast<unsigned>(ranks));
  for (int r = 0; r < ranks; ++r)
    ranks_.push_back(
        std::make_unique<CpuLlamaRank>(config_, pool_, parallel_, r / group, r % group, perRank, gemm_,
                                       redundantExpertSlots));
  for (int s = 0; s < parallel_.pp; ++s) comms_.push_back(std::make_unique<HostCommunicator>(group));
  for (int i = 0; i < (parallel_.pp - 1) * group; ++i) channels_.push_back(std::make_unique<ActivationChannel>());
  if (c.moe.numExperts > 0) {
    expertTokens_.assign(static_cast<size_t>(c.numLayers) * c.moe.numExperts, 0);
    const int epRanks = parallel_.ep > 1 ? parallel_.ep : 1;
    placement_ = std::make_shared<const ExpertPlacement>(
        staticExpertPlacement(c.numLayers, c.moe.numExperts, epRanks, parallel_.ep > 1 ? redundantExpertSlots : 0));
    slotsPerRank_ = placement_->slotsPerRank;
    rankTokens_.assign(static_cast<size_t>(c.numLayers) * epRanks, 0);
    routedSincePlacement_.assign(expertTokens_.size(), 0);
    replicasFilled_ = redundantExpertSlots == 0;
  }
  for (int r = 1; r < ranks; ++r)
    rankThreads_.emplace_back([this, r] {
      pthread_setname_np(pthread_self(), ("tandem-rank-" + std::to_string(r)).substr(0, 15).c_str());
      rankLoop(r);
    });
}

CpuLlama::~CpuLlama() { stopThreads(); }

unsigned CpuLlama::threads() const {
  unsigned total = 0;
  for (const auto& r : ranks_) total += r->threads();
  return total;
}

void CpuLlama::stopThreads() {
  {
    std::lock_guard<std::mutex> lock(jobMutex_);
    stopping_ = true;
  }
  jobWake_.notify_all();
  for (auto& t : rankThreads_)
    if (t.joinable()) t.join();
  rankThreads_.clear();
  for (auto& r : ranks_) r->stopThreads();
}

void CpuLlama::setWeight(const std::string& name, const float* data, size_t count, int rank) {
  if (rank < 0 || rank >= parallel_.ranks())
    throw BadInput("rank " + std::to_string(rank) + " is not one of 0.." + std::to_string(parallel_.ranks() - 1));
  CpuLlamaRank& r = *ranks_[rank];
  if (!r.holds(name)) {
    bool known = false;
    for (const WeightEntry& w : config_.weights) known = known || w.name == name;
    std::string hint = name == "lm_head.weight" && config_.tieWordEmbeddings
                           ? " (this config ties lm_head to model.embed_tokens.weight)"
                           : "";
    if (!known) throw BadInput("tensor '" + name + "' is not part of this model" + hint);
    throw BadInput("tensor '" + name + "' is not held by rank " + std::to_string(rank) + " (pipeline stage " +
                   std::to_string(r.stage()) + ", layers " + std::to_string(r.layers().start) + ".." +
                   std::to_string(r.layers().start + r.layers().count - 1) + ")");
  }
  if (expertsMoved_)
    for (const WeightEntry& w : config_.weights)
      if (w.name == name && (w.role == WeightRole::ExpertGate || w.role == WeightRole::ExpertUp ||
                             w.role == WeightRole::ExpertDown))
        throw BadInput("tensor '" + name + "': expert weights are set before the first forward pass or expert " +
                       "placement (the experts' slots have moved since)");
  r.setWeight(name, data, count);
}

std::vector<int64_t> CpuLlama::takeExpertTokens() {
  std::lock_guard<std::mutex> lock(expertMutex_);
  std::vector<int64_t> out = expertTokens_;
  std::fill(expertTokens_.begin(), expertTokens_.end(), 0);
  return out;
}

std::vector<int64_t> CpuLlama::takeRankTokens() {
  std::lock_guard<std::mutex> lock(expertMutex_);
  std::vector<int64_t> out = rankTokens_;
  std::fill(rankTokens_.begin(), rankTokens_.end(), 0);
  return out;
}

ExpertPlacement CpuLlama::expertPlacement() const {
  if (!placement_) throw BadInput("the model has no experts");
  std::lock_guard<std::mutex> lock(expertMutex_);
  return *placement_;
}

ExpertPlacement CpuLlama::checkExpertPlacement(std::vector<std::vector<int32_t>> slotExpert) const {
  if (!placement_) throw BadInput("an expert placement needs a mixture-of-experts model");
  if (parallel_.ep < 2) throw BadInput("an expert placement needs expert parallelism (ep > 1)");
  ExpertPlacement p =
      makeExpertPlacement(config_.numLayers, config_.moe.numExperts, parallel_.ep, slotsPerRank_, std::move(slotExpert));
  auto missing = missingWeights();
  if (!missing.empty())
    throw BadInput("an expert placement is applied once every weight is set; " + std::to_string(missing.size()) +
                   " not set, first '" + missing[0] + "'");
  return p;
}

ExpertPlacementChange CpuLlama::applyExpertPlacement(const ExpertPlacement& placement) {
  if (aborted_.load()) throw Aborted("the model was disposed");
  std::lock_guard<std::mutex> pass(passMutex_);
  if (!replicasFilled_) fillReplicas();
  ExpertPlacementChange change = moveExperts(placement_->slotExpert, placement);
  std::lock_guard<std::mutex> lock(expertMutex_);
  placement_ = std::make_shared<const ExpertPlacement>(placement);
  std::fill(routedSincePlacement_.begin(), routedSincePlacement_.end(), 0);
  return change;
}

void CpuLlama::fillReplicas() {
  // The slots as loaded: each rank's own experts, its redundant slots empty.
  std::vector<std::vector<int32_t>> loaded = placement_->slotExpert;
  const int own = config_.moe.numExperts / placement_->ranks;
  for (auto& row : loaded)
    for (size_t s = 0; s < row.size(); ++s)
      if (static_cast<int>(s) % slotsPerRank_ >= own) row[s] = -1;
  moveExperts(loaded, *placement_);
  replicasFilled_ = true;
}

ExpertPlacementChange CpuLlama::moveExperts(const std::vector<std::vector<int32_t>>& from, const ExpertPlacement& to) {
  ExpertPlacementChange change;
  const int group = parallel_.group(), S = to.slotsPerRank;
  for (int stage = 0; stage < parallel_.pp; ++stage) {
    const IndexRange layers = ranks_[static_cast<size_t>(stage) * group]->layers();
    auto moeOf = [&](int slot) { return ranks_[static_cast<size_t>(stage) * group + slot / S]->moe(); };
    for (int l = layers.start; l < layers.start + layers.count; ++l) {
      if (!config_.moe.isSparse(l)) continue;  // a dense layer: its placement row routes nothing, holds no experts
      const int local = l - layers.start;
      const std::vector<int32_t>& now = from[l];
      const std::vector<int32_t>& next = to.slotExpert[l];
      // Each rewritten slot's source: a slot holding its expert now, on its own rank when one does (a local copy),
      // else on the rank that has sent the fewest so far.
      std::vector<std::pair<int, int>> copies;  // (destination slot, source slot)
      std::vector<int> sent(to.ranks, 0);
      for (int d = 0; d < static_cast<int>(next.size()); ++d) {
        if (now[d] == next[d]) continue;
        int source = -1;
        for (int s = 0; s < static_cast<int>(now.size()); ++s) {
          if (now[s] != next[d]) continue;
          if (s / S == d / S) {
            source = s;
            break;
          }
          if (source < 0 || sent[s / S] < sent[source / S]) source = s;
        }
        if (source < 0) throw BadInput("layer " + std::to_string(l) + ": expert " + std::to_string(next[d]) +
                                       " has no slot to copy from");  // makeExpertPlacement rules this out
        if (source / S != d / S) ++sent[source / S], ++change.crossRankCopies;
        copies.push_back({d, source});
      }
      // Staged: every source is read before any slot is written, so two slots may trade experts.
      std::vector<std::vector<float>> staged;
      for (auto [d, s] : copies) {
        CpuMoe* src = moeOf(s);
        const float* gu = src->gateUp(local).data() + src->gateUpOffset(s % S, false);
        const float* dn = src->down(local).data() + src->downOffset(s % S);
        std::vector<float> buf(gu, gu + src->gateUpSize());
        buf.insert(buf.end(), dn, dn + src->downSize());
        staged.push_back(std::move(buf));
      }
      for (size_t i = 0; i < copies.size(); ++i) {
        const int d = copies[i].first;
        CpuMoe* dst = moeOf(d);
        const std::vector<float>& buf = staged[i];
        std::memcpy(dst->gateUp(local).data() + dst->gateUpOffset(d % S, false), buf.data(),
                    dst->gateUpSize() * sizeof(float));
        std::memcpy(dst->down(local).data() + dst->downOffset(d % S), buf.data() + dst->gateUpSize(),
                    dst->downSize() * sizeof(float));
        change.bytes += buf.size() * sizeof(float);
      }
      change.slotsCopied += static_cast<int>(copies.size());
    }
  }
  if (change.slotsCopied > 0) expertsMoved_ = true;
  return change;
}

std::vector<CollectiveTime> CpuLlama::takeCollectiveTime() {
  const int group = parallel_.group();
  std::vector<CollectiveTime> out(ranks_.size());
  for (size_t r = 0; r < ranks_.size(); ++r) {
    const int stage = static_cast<int>(r) / group, groupRank = static_cast<int>(r) % group;
    comms_[stage]->takeTime(groupRank, out[r]);
    if (stage > 0) channels_[(stage - 1) * group + groupRank]->takeTime(out[r]);  // the channel rank r receives on
  }
  return out;
}

std::vector<std::string> CpuLlama::missingWeights() const {
  std::vector<std::string> out;
  for (size_t r = 0; r < ranks_.size(); ++r)
    for (auto& name : ranks_[r]->missingWeights())
      out.push_back(ranks_.size() == 1 ? name : name + " (rank " + std::to_string(r) + ")");
  return out;
}

void CpuLlama::validate(const ForwardInput& in) const {
  validateForward(config_, pool_.numBlocks, pool_.blockSize, in);
}

void CpuLlama::breakGroup() {
  for (auto& c : comms_) c->breakAll();
  for (auto& ch : channels_) ch->close();
}

void CpuLlama::runRank(int rank) {
  try {
    CpuLlamaRank& R = *ranks_[rank];
    const int stage = R.stage(), groupRank = R.groupRank(), group = parallel_.group();
    HostCommunicator& comm = *comms_[stage];
    const IndexRange layers = R.layers();
    const bool first = stage == 0, last = stage == parallel_.pp - 1;
    CpuLlamaRank::Step step;
    for (size_t m = 0; m < microBatches_->size(); ++m) {
      const ForwardInput& in = (*microBatches_)[m];
      R.begin(in, step);
      step.placement = activePlacement_.get();
      step.routedBefore = routedSincePlacement_.data();
      if (first) R.embed(step, comm);
      else step.x = channels_[(stage - 1) * group + groupRank]->receive();
      for (int l = layers.start; l < layers.start + layers.count; ++l) {
        if (aborted_.load()) throw Aborted("the model was disposed during a forward pass");
        if (failRank_.load() == rank && failLayer_.load() == l) {
          failRank_.store(-1);
          throw std::runtime_error("injected fault in rank " + std::to_string(rank) + " before layer " +
                                   std::to_string(l) + " (test hook)");
        }
        R.layerStep(l, step, comm);
      }
      if (last) {
        const size_t row = microBatchFirstSeq_[m] * static_cast<size_t>(config_.vocabSize);
        float* out = groupRank == 0 ? logits_ + row : nullptr;
        R.logits(step, comm, out);
      } else {
        channels_[stage * group + groupRank]->send(std::move(step.x));
        step.x = {};
      }
    }
  } catch (...) {
    bool isBreak = false;
    try {
      throw;
    } catch (const RankGroupBroken&) {
      isBreak = true;
    } catch (...) {
    }
    {
      std::lock_guard<std::mutex> lock(jobMutex_);
      // The failing rank's own error wins over the peers' "a peer rank failed".
      if (!error_ || (errorIsBreak_ && !isBreak)) {
        error_ = std::current_exception();
        errorIsBreak_ = isBreak;
      }
    }
    breakGroup();
  }
}

void CpuLlama::rankLoop(int rank) {
  uint64_t seen = 0;
  std::unique_lock<std::mutex> lock(jobMutex_);
  for (;;) {
    jobWake_.wait(lock, [&] { return stopping_ || jobGeneration_ != seen; });
    if (stopping_) return;
    seen = jobGeneration_;
    lock.unlock();
    runRank(rank);
    lock.lock();
    if (--jobPending_ == 0) jobDone_.notify_one();
  }
}

std::vector<float> CpuLlama::forward(const ForwardInput& in) {
  if (aborted_.load() || rankThreads_.size() + 1 < ranks_.size()) throw Aborted("the model was disposed");
  std::lock_guard<std::mutex> pass(passMutex_);
  auto missing = missingWeights();
  if (!missing.empty())
    throw BadInput(std::to_string(missing.size()) + " weight tensor(s) not set, first '" + missing[0] + "'");
  validate(in);
  const size_t nseq = in.seqStarts.size() - 1;
  if (nseq == 0) return {};
  if (!replicasFilled_) fillReplicas();
  activePlacement_ = placement_;

  // As many micro-batches as stages (fewer with fewer sequences), so that stage s works on micro-batch m while
  // stage s + 1 works on m - 1. Each is a ForwardInput of its own sequences.
  std::vector<ForwardInput> micro;
  std::vector<size_t> firstSeq;
  const size_t parts = std::min<size_t>(static_cast<size_t>(parallel_.pp), nseq);
  if (parts == 1) {
    micro.push_back(in);
    firstSeq.push_back(0);
  }
  for (size_t m = 0; parts > 1 && m < parts; ++m) {
    size_t s0 = nseq * m / parts, s1 = nseq * (m + 1) / parts, mbs = in.maxBlocksPerSeq;
    ForwardInput part;
    int32_t t0 = in.seqStarts[s0], t1 = in.seqStarts[s1];
    part.tokens.assign(in.tokens.begin() + t0, in.tokens.begin() + t1);
    part.positions.assign(in.positions.begin() + t0, in.positions.begin() + t1);
    for (size_t s = s0; s <= s1; ++s) part.seqStarts.push_back(in.seqStarts[s] - t0);
    part.blockTables.assign(in.blockTables.begin() + s0 * mbs, in.blockTables.begin() + s1 * mbs);
    part.maxBlocksPerSeq = in.maxBlocksPerSeq;
    part.contextLens.assign(in.contextLens.begin() + s0, in.contextLens.begin() + s1);
    micro.push_back(std::move(part));
    firstSeq.push_back(s0);
  }

  std::vector<float> logits(nseq * static_cast<size_t>(config_.vocabSize));
  {
    std::lock_guard<std::mutex> lock(jobMutex_);
    microBatches_ = &micro;
    microBatchFirstSeq_ = std::move(firstSeq);
    logits_ = logits.data();
    error_ = nullptr;
    errorIsBreak_ = false;
    jobPending_ = static_cast<int>(rankThreads_.size());
    ++jobGeneration_;
  }
  jobWake_.notify_all();
  runRank(0);
  std::exception_ptr error;
  {
    std::unique_lock<std::mutex> lock(jobMutex_);
    jobDone_.wait(lock, [&] { return jobPending_ == 0; });
    microBatches_ = nullptr;
    logits_ = nullptr;
    error = error_;
    error_ = nullptr;
  }
  if (config_.moe.numExperts > 0) {  // a failed pass's counts are dropped with it
    std::vector<int64_t> counts(expertTokens_.size(), 0);
    std::vector<int64_t> pairs(rankTokens_.size(), 0);
    const int epRanks = placement_->ranks;
    for (auto& r : ranks_) {
      r->takeExpertTokens(counts);
      r->takeRankPairs(pairs, epRanks);
    }
    std::lock_guard<std::mutex> lock(expertMutex_);
    if (!error) {
      for (size_t i = 0; i < counts.size(); ++i) expertTokens_[i] += counts[i];
      for (size_t i = 0; i < counts.size(); ++i) routedSincePlacement_[i] += counts[i];
      for (size_t i = 0; i < pairs.size(); ++i) rankTokens_[i] += pairs[i];
    }
  }
  if (error) {
    // Every rank has returned: the group can be mended for the next forward.
    for (auto& c : comms_) c->reset();
    for (auto& ch : channels_) ch->reset();
    std::rethrow_exception(error);
  }
  return logits;
}

}  // namespace tandem::engine
