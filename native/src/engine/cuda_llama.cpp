#include "cuda_llama.h"

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <string>

#include <fcntl.h>
#include <unistd.h>

namespace tandem::engine {
namespace {

constexpr size_t kAlign = 256;
constexpr size_t kStagingBytes = 16u << 20;  // pinned staging for weight uploads (bf16 values)
constexpr size_t kFileChunkBytes = 64u << 20;  // one read of a checkpoint file; two such pinned buffers

size_t alignUp(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

uint16_t toBf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu) != 0) return 0x7fc0;  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
  return static_cast<uint16_t>(u >> 16);
}

// IEEE half to float (exact).
float f16ToF32(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ffu, u;
  if (exp == 0) {
    if (mant == 0) {
      u = sign;
    } else {  // subnormal: normalise
      int e = -1;
      do {
        ++e;
        mant <<= 1;
      } while ((mant & 0x400u) == 0);
      u = sign | static_cast<uint32_t>(127 - 15 - e) << 23 | (mant & 0x3ffu) << 13;
    }
  } else if (exp == 31) {
    u = sign | 0x7f800000u | mant << 13;
  } else {
    u = sign | (exp + 127 - 15) << 23 | mant << 13;
  }
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// Reads exactly `bytes` at `offset`; throws NativeError naming the file position on a short read or an error.
void readAt(int fd, void* into, size_t bytes, uint64_t offset) {
  uint8_t* p = static_cast<uint8_t*>(into);
  while (bytes > 0) {
    ssize_t n = ::pread(fd, p, bytes, static_cast<off_t>(offset));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0)
      throw NativeError("TANDEM_BAD_CHECKPOINT", std::string("checkpoint read at byte ") + std::to_string(offset) +
                                                     (n == 0 ? ": unexpected end of file" : ": " + std::string(std::strerror(errno))));
    p += n;
    bytes -= static_cast<size_t>(n);
    offset += static_cast<uint64_t>(n);
  }
}

std::string shapeText(size_t rows, size_t cols) {
  return rows == 0 ? "[" + std::to_string(cols) + "]" : "[" + std::to_string(rows) + ", " + std::to_string(cols) + "]";
}

unsigned normThreads(int hidden) {
  unsigned t = static_cast<unsigned>((hidden / 4 + 31) / 32 * 32);
  return std::clamp(t, 32u, 1024u);
}

// Carves consecutive 256-byte-aligned pieces out of one allocation.
// Sampling kernels' geometry (native/kernels/llama.cu, namespace tandem_sample).
constexpr size_t kSampleChunk = 8192, kSampleMerge = 4096;
constexpr unsigned kSampleThreads = 512;
// tandem_llama_rope_kv2's geometry (llama.cu): heads per block, threads, the largest headDim / 2.
constexpr int kRope2Heads = 8, kRope2MaxHalf = 256;
constexpr unsigned kRope2Threads = 128;
// tandem_llama_attention_tiled's limits (llama.cu).
constexpr int kTiledMaxDim = 128, kTiledMaxGroup = 16;
// The flash kernels' geometry (attention.cu, namespace tandem_attn): query rows per prefill tile, keys per
// tile, threads, the largest GQA group, a decode split's partial-result stride (floats), and the prefill
// kernel's dynamic shared memory (two stages of K and V tiles).
constexpr int kFlashRows = 64, kFlashKeys = 64, kFlashMaxGroup = 16;
constexpr unsigned kFlashThreads = 128;
int flashPartialStride(int headDim) { return headDim + 4; }
unsigned flashPrefillSmem(int headDim) { return 2u * 2u * kFlashKeys * static_cast<unsigned>(headDim) * 2u; }
// Decode attention is split along the context until the grid has this many CTAs per multiprocessor.
constexpr int kFlashDecodeCtasPerSm = 2;
// The second flash kernels (attention.cu, tandem_flash_prefill2 / tandem_flash_decode2): used where they are in the
// loaded fatbin, this is true and TANDEM_ATTENTION is not `flash1` (or `reference`). Prefill: tiles of up to
// kFlash2Rows tokens, kFlash2Threads threads, three cp.async stages of K and V tiles. Decode: GQA groups up to
// kFlash2MaxGroup, splits of a multiple of kFlashKeys keys, enough for kFlash2DecodeCtasPerSm CTAs per
// multiprocessor, at most kFlash2MaxSplits, merged in the same launch by the last CTA of each (row, kv head),
// which an atomic counter finds; the counters (kFlash2Counters ints, zeroed once, reset by every launch) limit
// split decode to rows * kv heads <= kFlash2Counters (more rows than that fill the GPU unsplit anyway).
// kFlash2PrefillWarps picks the prefill kernel: 8 warps (tandem_flash_prefill2: 128-row tiles, one CTA per
// multiprocessor) or 4 (tandem_flash_prefill2w4: 64-row tiles, two CTAs); bench/micro/attention.cu times both
// (columns new and new4).
constexpr bool kFlash2Enabled = true;
constexpr int kFlash2PrefillWarps = 8;
static_assert(kFlash2PrefillWarps == 8 || kFlash2PrefillWarps == 4, "prefill2 comes with 8 or 4 warps");
constexpr int kFlash2Rows = 16 * kFlash2PrefillWarps, kFlash2MaxGroup = 8, kFlash2MaxSplits = 64;
constexpr int kFlash2DecodeCtasPerSm = 3;
constexpr unsigned kFlash2Threads = 32 * kFlash2PrefillWarps;
const char* const kFlash2PrefillName = kFlash2PrefillWarps == 8 ? "tandem_flash_prefill2_d" : "tandem_flash_prefill2w4_d";
constexpr size_t kFlash2Counters = 4096;
// Decode steps of at most this many sequences take the second decode kernel, larger ones the third (below) or the
// first: measured on one H100 (bench/micro/attention.cu, 8B shape, per layer), the second wins where the context
// is split across many CTAs (batch 1 at 3032 keys: 18 us against 25; batch 16 at 544: 26 against 29) and loses
// once the batch alone fills the GPU (batch 16 at 3032: 111 against 103 us; batch 64 at 3032: 388 against 323 us).
constexpr size_t kFlash2DecodeMaxRows = 8;
// Steps of more than kFlash2DecodeMaxRows sequences take the third decode kernel (attention.cu, tandem_flash_decode3:
// the GQA group on tensor cores, three cp.async stages of 64-key tiles, splits merged in the same launch as
// decode2's) where the group is 4 or 8, the first otherwise. Measured on one H100 (bench:engine, 8B,
// TANDEM_ATTENTION=decode1 against decode3, whole decode steps, eighteenth session): decode3 at 16 / 64 / 128
// sequences of 3072 keys 9.18 / 16.3 / 25.8 ms against decode1's 9.66 / 17.3 / 28.8, at 16 of 8192 13.0 against
// 14.5. (Before its splits were fixed, below, it lost from 64 sequences on: 64 at 3072 18.8 against 17.8; 128 at 3072: 31.7
// against 29.0). Its splits minimise waves x (tiles per split + kFlash3SplitOverheadTiles), a wave being
// kFlash3DecodeCtasPerSm CTAs (its shared memory's limit) on every multiprocessor, at most kFlash2MaxSplits: a
// split pays its pipeline's fill and the merge whatever its length, so a batch that fills the GPU on its own runs
// unsplit. (Waves / splits alone, the rule before, split 128 sequences of 3072 keys 24 ways into CTAs of two tiles.)
// TANDEM_ATTENTION=decode1 / decode2 / decode3 forces one decode kernel for every batch, TANDEM_DECODE_SPLITS=n
// the splits of decode2 / decode3 (A/B measurements).
// The largest step runner.decodeAttention reports as `medium` (decode3 runs every larger one too).
constexpr size_t kFlash3DecodeMaxRows = 16;
constexpr int kFlash3DecodeCtasPerSm = 2;
constexpr int kFlash3SplitOverheadTiles = 2;
unsigned flash3DecodeSmem(int headDim) { return 3u * 2u * kFlashKeys * static_cast<unsigned>(headDim) * 2u; }
int flash3DecodeSplits(int ctas, int chunks, int slots) {
  int best = 1;
  long long bestCost = -1;
  for (int s = 1; s <= std::min(chunks, kFlash2MaxSplits); ++s) {
    const long long waves = (static_cast<long long>(ctas) * s + slots - 1) / slots;
    const long long cost = waves * ((chunks + s - 1) / s + kFlash3SplitOverheadTiles);
    if (bestCost < 0 || cost < bestCost) best = s, bestCost = cost;
  }
  return best;
}
unsigned flash2PrefillSmem(int headDim) { return 3u * 2u * kFlashKeys * static_cast<unsigned>(headDim) * 2u; }
// The third prefill kernel (attention.cu, tandem_flash_prefill3: prefill2's tiles on 4 warps of 32 query rows, two
// CTAs per multiprocessor): the default where the fatbin has it, prefill2 with TANDEM_ATTENTION=prefill2 (measured on
// one H100, bench:engine 8B: 8192 tokens 246.6 ms against 265.8, 3000 79.0 against 80.1, 512 equal). It takes
// prefill2's tiles (planBatch), so they must fit its kFlash3PrefillRows rows.
// Shared memory (attention.cu, prefill3SmemBytes): 1 KiB of alignment slack, then at head dim 128 the tile's
// queries (kFlash3PrefillRows x 128 bf16) and 2 stages of K and V tiles, at 64 3 stages and no queries.
constexpr int kFlash3PrefillRows = 128;
constexpr unsigned kFlash3PrefillThreads = 128;
static_assert(kFlash2Rows <= kFlash3PrefillRows, "prefill3 takes prefill2's tiles");
unsigned flash3PrefillSmem(int headDim) {
  const unsigned d = static_cast<unsigned>(headDim);
  const bool queries = headDim > 64;
  return 1024u + (queries ? kFlash3PrefillRows * d * 2u : 0u) + (queries ? 2u : 3u) * 2u * kFlashKeys * d * 2u;
}
// The skinny GEMM's geometry (gemv.cu, namespace tandem_gemv): threads per CTA, the largest batch with a kernel,
// and weight rows per CTA (any grid is correct there; this one gives each CTA one row group).
constexpr unsigned kGemvThreads = 128;
constexpr int kGemvKernelMaxM = 16;
constexpr int gemvRows(int m) { return m <= 2 ? 2 : 4; }
// GEMMs with at most this many rows of x (decode batches) run through gemv.cu, larger ones through cuBLAS.
// Measured crossover (bench/micro/gemv.cu, one H100, 2026-12-06; GEMM time of one 8B decode step, 32 layers +
// lm_head): m = 4 GEMV 5.68 ms vs cuBLAS 5.75 ms, m = 8 GEMV 6.92 ms vs cuBLAS 5.79 ms; per GEMM the kernel
// stops winning at m = 4 (qkv 22.7 vs 22.4 us, down 46.0 vs 45.1 us) and loses 12-25% at m = 8.
// TANDEM_GEMV=off (or 0) forces cuBLAS; TANDEM_GEMV=<1..16> moves the crossover.
constexpr int kGemvMaxBatch = 4;
// cuBLASLt's workspace: what its large-m kernels (split-k, stream-k) may use; allocated once per runner.
constexpr size_t kLtWorkspaceBytes = 32u << 20;
// cuBLASLt autotuning (tuneGemm): the heuristic's top candidates timed per new shape, each run once untimed then
// between two events as many times (kGemmTuneRuns .. kGemmTuneMaxRuns) as make kGemmTuneMinMs with the first
// candidate, so that a decode shape of ~20 us is not timed on event resolution; tuning stops (later shapes keep
// the heuristic's first) once a runner has spent kGemmTuneBudgetMs on it or would with the shape at hand. An 8B
// prefill of 8192 tokens tunes its 4 layer shapes in ~0.15 s by arithmetic (8 x 4 runs of 2.5 + 1.2 + 0.5 +
// 0.4 ms), a decode batch's 5 shapes in ~15 ms; the top 8 held the fastest at m = 64..8192 (bench/micro/gemm.cu).
constexpr int kGemmTuneCandidates = 8;
constexpr int kGemmTuneRuns = 3, kGemmTuneMaxRuns = 32;
constexpr double kGemmTuneMinMs = 0.3;
constexpr double kGemmTuneBudgetMs = 2000;
// "0" or "1" from an on/off switch of the environment (unset: `fallback`); anything else is a typed error.
bool envSwitch(const char* name, bool fallback) {
  const char* v = std::getenv(name);
  if (!v) return fallback;
  const std::string s = v;
  if (s == "0" || s == "1") return s == "1";
  throw NativeError("TANDEM_BAD_ARGUMENT", std::string(name) + " must be 0 or 1; got '" + s + "'");
}
// One of `choices` from the environment ("" when unset or empty); anything else is a typed error listing them.
std::string envChoice(const char* name, std::initializer_list<const char*> choices) {
  const char* v = std::getenv(name);
  if (!v || !*v) return "";
  std::string list;
  size_t i = 0;
  for (const char* c : choices) {
    if (v == std::string(c)) return v;
    list += std::string(i == 0 ? "" : i + 1 == choices.size() ? " or " : ", ") + "'" + c + "'";
    ++i;
  }
  throw NativeError("TANDEM_BAD_ARGUMENT", std::string(name) + " must be " + list + "; got '" + v + "'");
}
// Decode graphs kept at once (one per batch shape seen); all are dropped when the cache fills.
constexpr size_t kMaxGraphs = 64;

struct Carver {
  size_t used = 0;
  size_t take(size_t bytes) {
    size_t at = used;
    used += alignUp(bytes);
    return at;
  }
};

}  // namespace

CudaLlama::CudaLlama(CudaDevice& device, const CublasApi& cublas, const CublasLtApi& cublasLt, const LlamaConfig& config,
                     const GpuKvPool& pool, bool cudaGraphs, std::shared_ptr<TpCommunicator> tp,
                     const ExpertLayout& experts, bool replicatedAttention, const PpStage* pp)
    : device_(device),
      cublas_(cublas),
      cublasLt_(cublasLt),
      config_(config),
      tp_(std::move(tp)),
      pool_(pool),
      cudaGraphs_(cudaGraphs),
      graphs_(device, kMaxGraphs) {
  checkConfig(config_);
  const int group = tp_ ? tp_->size() : 1;
  if (config_.moe.numExperts > 0 && group > 1 && experts.ranks != group)
    throw BadInput("the GPU engine splits a mixture-of-experts model's experts over its ranks (expert parallel size = "
                   "the group's " + std::to_string(group) + " ranks); tensor parallelism of the experts' channels "
                   "(ep 1 with tp > 1) runs on the CPU engine");
  if (experts.ranks != 1 && (config_.moe.numExperts == 0 || experts.ranks != group || experts.rank != tp_->rank()))
    throw BadInput("expert parallelism needs a mixture-of-experts model and a communicator group of its " +
                   std::to_string(experts.ranks) + " ranks");
  if (experts.redundantSlots > 0 && config_.moe.numExperts == 0)
    throw BadInput("redundant expert slots need a mixture-of-experts model");
  if (replicatedAttention && config_.moe.numExperts == 0)
    throw BadInput("replicated attention beside expert parallelism needs a mixture-of-experts model");
  if (config_.moe.sharedIntermediateSize > 0 || !config_.moe.denseLayers.empty())
    throw BadInput("the GPU engine runs mixture-of-experts models whose every layer is sparse and has no shared "
                   "expert (Mixtral, Qwen3-MoE); this one (a shared expert or dense layers among the sparse ones, as "
                   "Qwen2-MoE) runs on the CPU engine");
  shard_ = tp_ && !replicatedAttention ? tpShardOf(config_, tp_->size(), tp_->rank()) : tpShardOf(config_, 1, 0);
  if (pp) {
    stage_ = *pp;
  } else {
    stage_.layerCount = config_.numLayers;
  }
  checkPpStage(config_, stage_);
  if (pipelineParallel() && config_.moe.numExperts > 0)
    throw BadInput("the GPU engine runs mixture-of-experts models in one pipeline stage (no pipeline parallelism on "
                   "the GPU for them yet); use the CPU engine's ranks");
  local_ = config_;
  local_.numLayers = stage_.layerCount;  // this stage's layers: layers_ and the KV pool are indexed from its first
  local_.numHeads = shard_.heads;
  local_.numKvHeads = shard_.kvHeads;
  local_.intermediateSize = shard_.inter;
  local_.vocabSize = shard_.vocabRows;
  for (int r = 0; r < shard_.size; ++r) vocabRowsPerRank_.push_back(tpShardOf(config_, shard_.size, r).vocabRows);
  if (pipelineParallel() && cudaGraphs_) {
    cudaGraphs_ = false;
    graphsReason_ = "pipeline stages run decode steps eagerly (a stage's input arrives from another stream, and "
                    "micro-batch shapes vary)";
  }
  if (grouped() && cudaGraphs_) {
    cudaGraphs_ = false;
    graphsReason_ = "tensor-parallel and expert-parallel ranks run decode steps eagerly (the local communicator's "
                    "host barriers cannot be captured in a CUDA graph; NCCL's collectives are not captured yet)";
  }
  const LlamaConfig& c = local_;  // this rank's shapes
  if (c.headDim > 256) throw BadInput("the GPU engine supports headDim up to 256 (got " + std::to_string(c.headDim) + ")");
  if (pool.numBlocks <= 0 || pool.blockSize <= 0) throw BadInput("numBlocks and blockSize must be positive");
  if (pool.base % 2 != 0) throw BadInput("the KV pool must start at a multiple of 2 bytes (bf16)");
  size_t need = static_cast<size_t>(pool.numBlocks) * c.numLayers * 2 * pool.blockSize * c.numKvHeads * c.headDim * 2;
  if (pool.bytes < need)
    throw BadInput("the KV buffer holds " + std::to_string(pool.bytes) + " bytes; the pool needs " + std::to_string(need));

  const size_t h = c.hiddenSize, inter = c.intermediateSize, vocab = c.vocabSize;
  qDim_ = static_cast<size_t>(c.numHeads) * c.headDim;
  kvDim_ = static_cast<size_t>(c.numKvHeads) * c.headDim;
  qkvDim_ = qDim_ + 2 * kvDim_;
  invFreq_ = ropeFrequencies(c);

  // Fused q|k|v and gate|up projections, so each is one GEMM; names come from the weight manifest
  // (lib/engine/model/manifest.ts; checkConfig checked that it is complete).
  // A stage holds the embedding when it is the first, or the last with lm_head tied to it (lib/engine/parallel.ts's
  // tensorStages); the final norm and lm_head on the last only.
  const bool holdsEmbed = stage_.first() || (stage_.last() && c.tieWordEmbeddings);
  embed_ = holdsEmbed ? place(vocab * h) : 0;
  layers_.resize(c.numLayers);
  for (LayerOffsets& L : layers_) {
    L.inputNorm = place(h);
    L.wqkv = place(qkvDim_ * h);
    L.bqkv = c.attentionBias ? place(qkvDim_) : 0;
    L.wo = place(h * qDim_);
    L.bo = c.attentionOutputBias ? place(h) : 0;
    L.postNorm = place(h);
    L.qNorm = c.qkNorm ? place(c.headDim) : 0;
    L.kNorm = c.qkNorm ? place(c.headDim) : 0;
    const bool dense = c.moe.numExperts == 0;  // an MoE config's FFN is moe_'s
    L.wgateUp = dense ? place(2 * inter * h) : 0;
    L.wdown = dense ? place(h * inter) : 0;
  }
  if (c.moe.numExperts > 0)
    moe_ = std::make_unique<CudaMoe>(c, [this](size_t count) { return place(count); }, experts);
  finalNorm_ = stage_.last() ? place(h) : 0;
  lmHead_ = !stage_.last() ? 0 : c.tieWordEmbeddings ? embed_ : place(vocab * h);
  // Each tensor's slice of the whole one (lib/engine/model/manifest.ts's shard rules): column (q/k/v, gate/up, their
  // biases) and vocab (embedding, lm_head) take rows, row (o_proj, down_proj) takes columns, replicated all of it.
  const TpShard& t = shard_;
  const size_t D = c.headDim, fullQ = static_cast<size_t>(config_.numHeads) * D;
  const size_t fullKv = static_cast<size_t>(config_.numKvHeads) * D, fullInter = config_.intermediateSize;
  const size_t fullVocab = config_.vocabSize;
  const size_t q0 = t.headStart * D, kv0 = t.kvHeadStart * D, i0 = t.interStart, v0 = t.vocabStart;
  auto whole = [](size_t rows, size_t cols) { return SliceOf{rows, cols, 0, rows, 0, cols}; };
  auto rowsOf = [](size_t fullRows, size_t cols, size_t start, size_t n) { return SliceOf{fullRows, cols, start, n, 0, cols}; };
  auto colsOf = [](size_t rows, size_t fullCols, size_t start, size_t n) { return SliceOf{rows, fullCols, 0, rows, start, n}; };
  auto elementsOf = [](size_t full, size_t start, size_t n) { return SliceOf{0, full, 0, 0, start, n}; };
  for (const WeightEntry& w : c.weights) {
    // Another stage's tensors are not this runner's.
    if (w.layer >= 0 && (w.layer < stage_.layerStart || w.layer >= stage_.layerStart + stage_.layerCount)) continue;
    if (w.role == WeightRole::Embed && !holdsEmbed) continue;
    if ((w.role == WeightRole::FinalNorm || w.role == WeightRole::LmHead) && !stage_.last()) continue;
    const LayerOffsets* L = w.layer >= 0 ? &layers_[w.layer - stage_.layerStart] : nullptr;
    switch (w.role) {
      case WeightRole::Embed: addSlot(w.name, embed_, rowsOf(fullVocab, h, v0, vocab)); break;
      case WeightRole::InputNorm: addSlot(w.name, L->inputNorm, whole(0, h)); break;
      case WeightRole::Q: addSlot(w.name, L->wqkv, rowsOf(fullQ, h, q0, qDim_)); break;
      case WeightRole::QBias: addSlot(w.name, L->bqkv, elementsOf(fullQ, q0, qDim_)); break;
      case WeightRole::K: addSlot(w.name, L->wqkv + qDim_ * h * 2, rowsOf(fullKv, h, kv0, kvDim_)); break;
      case WeightRole::KBias: addSlot(w.name, L->bqkv + qDim_ * 2, elementsOf(fullKv, kv0, kvDim_)); break;
      case WeightRole::V: addSlot(w.name, L->wqkv + (qDim_ + kvDim_) * h * 2, rowsOf(fullKv, h, kv0, kvDim_)); break;
      case WeightRole::VBias: addSlot(w.name, L->bqkv + (qDim_ + kvDim_) * 2, elementsOf(fullKv, kv0, kvDim_)); break;
      case WeightRole::O: addSlot(w.name, L->wo, colsOf(h, fullQ, q0, qDim_)); break;
      case WeightRole::OBias: addSlot(w.name, L->bo, whole(0, h)); break;
      case WeightRole::PostNorm: addSlot(w.name, L->postNorm, whole(0, h)); break;
      case WeightRole::Gate: addSlot(w.name, L->wgateUp, rowsOf(fullInter, h, i0, inter)); break;
      case WeightRole::Up: addSlot(w.name, L->wgateUp + inter * h * 2, rowsOf(fullInter, h, i0, inter)); break;
      case WeightRole::Down: addSlot(w.name, L->wdown, colsOf(h, fullInter, i0, inter)); break;
      case WeightRole::FinalNorm: addSlot(w.name, finalNorm_, whole(0, h)); break;
      case WeightRole::LmHead: addSlot(w.name, lmHead_, rowsOf(fullVocab, h, v0, vocab)); break;
      case WeightRole::QNorm: addSlot(w.name, L->qNorm, whole(0, D)); break;
      case WeightRole::KNorm: addSlot(w.name, L->kNorm, whole(0, D)); break;
      case WeightRole::Router:
      case WeightRole::ExpertGate:
      case WeightRole::ExpertUp:
      case WeightRole::ExpertDown: {
        if (!moe_->holds(w)) break;  // another expert-parallel rank's expert
        const CudaMoe::Placed at = moe_->placeOf(w);
        addSlot(w.name, at.offset, whole(at.rows, at.cols));
        break;
      }
    }
  }
}

CudaLlama::~CudaLlama() = default;  // the owner calls release() on the device thread first

size_t CudaLlama::place(size_t count) {
  size_t at = weightBytes_;
  weightBytes_ += alignUp(count * 2);
  return at;
}

void CudaLlama::addSlot(const std::string& name, size_t offset, const SliceOf& s) {
  const bool oneD = s.fullRows == 0;
  Slot slot{offset, 0, oneD ? 1 : s.rows, s.cols, oneD ? 1 : s.fullRows, s.fullCols, s.rowStart, s.colStart, "", false};
  slot.count = slot.rows * slot.cols;
  slot.shape = shapeText(oneD ? 0 : slot.rows, slot.cols);
  if (!slot.whole())
    slot.shape += " (tensor-parallel rank " + std::to_string(shard_.rank) + " of " + std::to_string(shard_.size) +
                  ": a slice of " + shapeText(s.fullRows, s.fullCols) + ")";
  slots_[name] = slot;
  order_.push_back(name);
}

void CudaLlama::init() {
  if (!cublas_.available) throw NativeError("TANDEM_BACKEND_UNAVAILABLE", "cuBLAS unavailable: " + cublas_.reason);
  device_.checkOpen();
  fn_.embed = device_.function("tandem_llama_embed");
  fn_.addRmsNorm = device_.function("tandem_llama_add_rmsnorm");
  fn_.addBias = device_.function("tandem_llama_add_bias");
  fn_.ropeKv = device_.function("tandem_llama_rope_kv");
  fn_.attention = device_.function("tandem_llama_attention");
  fn_.attentionTiled = device_.function("tandem_llama_attention_tiled");
  fn_.siluMul = device_.function("tandem_llama_silu_mul");
  gateUpBf16_ = envSwitch("TANDEM_GATEUP_BF16", true);
  if (gateUpBf16_) fn_.siluMulBf16 = device_.function("tandem_llama_silu_mul_bf16");
  fn_.sampleChunkTop = device_.function("tandem_sample_chunk_top");
  fn_.sampleFinish = device_.function("tandem_sample_finish");
  const CudaDriver& drv = device_.driver();
  const int D = local_.headDim, group = local_.numHeads / local_.numKvHeads;
  const std::string attention = envChoice(
      "TANDEM_ATTENTION", {"reference", "flash1", "prefill2", "prefill3", "decode1", "decode2", "decode3"});
  // TANDEM_DECODE_GRID: heads (the default) or rows, the order of decode1's and decode3's grids. On one H100 heads
  // was 0.9-1.7% faster than rows at 16 to 128 sequences of 3072 keys (decode3; bench:engine --torch off, same
  // session), and GPU test 16 checks both against the CPU engine.
  decodeHeadsFastest_ = envChoice("TANDEM_DECODE_GRID", {"rows", "heads"}) != "rows";
  flash2_ = false;
  prefill3_ = false;
  if (attention != "reference" && (D == 64 || D == 128) && local_.numHeads % local_.numKvHeads == 0 &&
      group <= kFlashMaxGroup) {
    const std::string d = std::to_string(D);
    fn_.flashPrefill = device_.function("tandem_flash_prefill_d" + d);
    const std::string order = decodeHeadsFastest_ ? "_h" : "";
    fn_.flashDecode = device_.function("tandem_flash_decode" + order + "_d" + d);
    fn_.flashCombine = device_.function("tandem_flash_decode_combine");
    check(drv.cuFuncSetAttribute(fn_.flashPrefill, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                 static_cast<int>(flashPrefillSmem(D))),
          "cuFuncSetAttribute (flash prefill shared memory)");
    flash_ = true;
    if (kFlash2Enabled && attention != "flash1" && group <= kFlash2MaxGroup && (group & (group - 1)) == 0) {
      // A fatbin built before the second kernels lacks them: keep the first ones then.
      try {
        fn_.flash2Prefill = device_.function(kFlash2PrefillName + d);
        fn_.flash2Decode = device_.function("tandem_flash_decode2_d" + d + "_g" + std::to_string(group));
        check(drv.cuFuncSetAttribute(fn_.flash2Prefill, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                     static_cast<int>(flash2PrefillSmem(D))),
              "cuFuncSetAttribute (flash2 prefill shared memory)");
        flash2_ = true;
      } catch (const NativeError& e) {
        if (e.code != "TANDEM_BAD_ARGUMENT") throw;
      }
      if (flash2_ && attention != "prefill2") {
        // A fatbin built before prefill3 lacks it: prefill2 then.
        try {
          fn_.flash3Prefill = device_.function("tandem_flash_prefill3_d" + d);
          check(drv.cuFuncSetAttribute(fn_.flash3Prefill, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                       static_cast<int>(flash3PrefillSmem(D))),
                "cuFuncSetAttribute (flash3 prefill shared memory)");
          // All shared memory, no L1: room for two CTAs (97 KiB each at head dim 128).
          check(drv.cuFuncSetAttribute(fn_.flash3Prefill, CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT, 100),
                "cuFuncSetAttribute (flash3 prefill carveout)");
          prefill3_ = true;
        } catch (const NativeError& e) {
          if (e.code != "TANDEM_BAD_ARGUMENT") throw;
          fn_.flash3Prefill = nullptr;
        }
      }
      if (flash2_ && (group == 4 || group == 8)) {
        try {
          fn_.flash3Decode = device_.function("tandem_flash_decode3" + order + "_d" + d + "_g" + std::to_string(group));
          check(drv.cuFuncSetAttribute(fn_.flash3Decode, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                       static_cast<int>(flash3DecodeSmem(D))),
                "cuFuncSetAttribute (flash3 decode shared memory)");
          // All shared memory, no L1 (its loads bypass L1): room for kFlash3DecodeCtasPerSm CTAs.
          check(drv.cuFuncSetAttribute(fn_.flash3Decode, CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT, 100),
                "cuFuncSetAttribute (flash3 decode carveout)");
        } catch (const NativeError& e) {
          if (e.code != "TANDEM_BAD_ARGUMENT") throw;
          fn_.flash3Decode = nullptr;
        }
      }
    }
    if (attention == "decode1" || attention == "decode2" || attention == "decode3") forcedDecode_ = attention[6] - '0';
  }
  forcedSplits_ = 0;
  if (const char* splits = std::getenv("TANDEM_DECODE_SPLITS")) {
    const std::string v = splits;
    char* end = nullptr;
    const long parsed = std::strtol(v.c_str(), &end, 10);
    if (v.empty() || *end != '\0' || parsed < 1 || parsed > kFlash2MaxSplits)
      throw NativeError("TANDEM_BAD_ARGUMENT", "TANDEM_DECODE_SPLITS must be a whole number of splits from 1 to " +
                                                   std::to_string(kFlash2MaxSplits) + "; got '" + v + "'");
    forcedSplits_ = static_cast<int>(parsed);
  }
  int gemvMax = kGemvMaxBatch;
  if (const char* gemv = std::getenv("TANDEM_GEMV")) {
    const std::string v = gemv;
    char* end = nullptr;
    const long parsed = std::strtol(v.c_str(), &end, 10);
    if (v == "off")
      gemvMax = 0;
    else if (!v.empty() && *end == '\0' && parsed >= 0 && parsed <= kGemvKernelMaxM)
      gemvMax = static_cast<int>(parsed);
    else
      throw NativeError("TANDEM_BAD_ARGUMENT", "TANDEM_GEMV must be 'off' or the largest batch (0.." +
                                                   std::to_string(kGemvKernelMaxM) + ") for the GEMV kernels; got '" +
                                                   v + "'");
  }
  gemv_.clear();
  gemvSwiglu_.clear();
  for (int m = 1; m <= gemvMax; ++m) {
    gemv_.push_back(device_.function("tandem_gemv_m" + std::to_string(m)));
    gemvSwiglu_.push_back(device_.function("tandem_gemv_swiglu_m" + std::to_string(m)));
  }
  gemvMaxBatch_ = gemvMax;
  // TANDEM_GEMM: lt (the default where libcublasLt loaded) or gemmex; lt asked for but absent is an error.
  bool useLt = cublasLt_.available;
  const std::string gemm = envChoice("TANDEM_GEMM", {"lt", "gemmex"});
  if (gemm == "gemmex")
    useLt = false;
  else if (gemm == "lt" && !cublasLt_.available)
    throw NativeError("TANDEM_BACKEND_UNAVAILABLE", "TANDEM_GEMM=lt but cuBLASLt is unavailable: " +
                                                        cublasLt_.reason + " (set TANDEM_LIBCUBLASLT, or TANDEM_GEMM=gemmex)");
  // Programmatic dependent launch of the GEMV kernels (pdl.cuh), with TANDEM_GEMV_PDL=1. Measured on one H100
  // before the norm and decode-attention kernels let their dependents launch early: no gain (batch 1 at 3072 keys
  // 6.32 ms against 6.33). With those triggers in, the A/B again showed nothing beyond the runs' spread (nineteenth
  // session, docs/measurements.md), so it stays off by default.
  gemvPdl_ = envSwitch("TANDEM_GEMV_PDL", false);
  // o_proj and down add into the residual stream in cuBLASLt's epilogue (gemmAdd) unless TANDEM_RESIDUAL_GEMM=0.
  residualGemm_ = envSwitch("TANDEM_RESIDUAL_GEMM", true);
  // TANDEM_ELEMENTWISE: 2 (the default) the wide-access rope_kv2 and add_rmsnorm2 (llama.cu), 1 rope_kv and
  // add_rmsnorm. The wide ones give the same K, V and rotated q bit for bit and norms within a bf16 place
  // (bench/micro/emulate checks both on the CPU; GPU test 05 against the CPU engine); on one H100 they took 2.4%
  // off prefill 8192 and 1.7% off prefill 3000, and 1.5-4% off decode steps. A fatbin built before them, or a
  // head dim past rope_kv2's shared cos / sin, keeps the first ones.
  elementwise2_ = false;
  fn_.ropeKv2 = fn_.addRmsNorm2 = nullptr;
  if (envChoice("TANDEM_ELEMENTWISE", {"1", "2"}) != "1" && local_.headDim <= 2 * kRope2MaxHalf) {
    try {
      fn_.ropeKv2 = device_.function("tandem_llama_rope_kv2");
      fn_.addRmsNorm2 = device_.function("tandem_llama_add_rmsnorm2");
      elementwise2_ = true;
    } catch (const NativeError& e) {
      if (e.code != "TANDEM_BAD_ARGUMENT") throw;
      fn_.ropeKv2 = fn_.addRmsNorm2 = nullptr;
    }
  }
  CUdevice dev = 0;
  check(drv.cuDeviceGet(&dev, device_.ordinal()), "cuDeviceGet");
  check(drv.cuDeviceGetAttribute(&multiprocessors_, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, dev),
        "cuDeviceGetAttribute (multiprocessors)");
  cublasStatus s = cublas_.create(&handle_);
  if (s != 0) {
    handle_ = nullptr;
    throw NativeError("TANDEM_CUDA_ERROR", "cublasCreate on CUDA device " + std::to_string(device_.ordinal()) + ": " +
                                               cublas_.describe(s));
  }
  s = cublas_.setStream(handle_, device_.stream());
  if (s != 0) throw NativeError("TANDEM_CUDA_ERROR", "cublasSetStream: " + cublas_.describe(s));
  if (useLt) {
    ltWorkspace_ = device_.allocate(kLtWorkspaceBytes, "cuMemAlloc (cuBLASLt workspace)");
    lt_ = std::make_unique<LtGemm>(cublasLt_);
    s = lt_->init(ltWorkspace_->ptr, kLtWorkspaceBytes);
    if (s != 0) throw NativeError("TANDEM_CUDA_ERROR", "cublasLtCreate: " + cublasLt_.describe(s));
  }
  gemmLt_ = useLt;
  gemmTune_ = envSwitch("TANDEM_GEMM_TUNE", true) && useLt;
  if (gemmTune_)
    for (CUevent& e : tuneEvents_) check(drv.cuEventCreate(&e, 0), "cuEventCreate (GEMM tuning)");
  if (tensorParallel()) fn_.embedShard = device_.function("tandem_tp_embed_vocab_shard");
  if (grouped()) tp_->init(device_);
  if (local_.qkNorm) fn_.qkNorm = device_.function("tandem_qk_rmsnorm");
  if (moe_) moe_->init(device_);
  weights_ = device_.allocate(weightBytes_, "cuMemAlloc (model weights)");
  invFreqMem_ = device_.allocate(invFreq_.size() * sizeof(float), "cuMemAlloc (RoPE frequencies)");
  const CudaDriver& d = device_.driver();
  if (flash2_) {
    flash2Counters_ = device_.allocate(kFlash2Counters * 4, "cuMemAlloc (flash decode counters)");
    check(d.cuMemsetD8Async(flash2Counters_->ptr, 0, kFlash2Counters * 4, device_.stream()), "cuMemsetD8Async");
  }
  check(d.cuMemcpyHtoDAsync(invFreqMem_->ptr, invFreq_.data(), invFreq_.size() * sizeof(float), device_.stream()),
        "cuMemcpyHtoDAsync");
  check(d.cuStreamSynchronize(device_.stream()), "cuStreamSynchronize");
}

void CudaLlama::release() {
  if (released_) return;
  released_ = true;
  const CudaDriver& d = device_.driver();
  d.cuStreamSynchronize(device_.stream());
  graphs_.clear();
  if (handle_) cublas_.destroy(handle_);
  handle_ = nullptr;
  lt_.reset();
  for (CUevent& e : tuneEvents_) {
    if (e) d.cuEventDestroy(e);
    e = nullptr;
  }
  for (auto* a : {&weights_, &invFreqMem_, &scratch_, &ltWorkspace_, &flash2Counters_}) {
    if (*a) {
      try {
        device_.freeAllocation(**a);
      } catch (const std::exception&) {
        // a failed free leaves nothing to retry: the device frees what it still tracks when it closes
      }
      a->reset();
    }
  }
  if (pinned_) d.cuMemFreeHost(pinned_);
  pinned_ = nullptr;
  pinnedBytes_ = 0;
  if (moe_) moe_->release();
  if (tp_) tp_->release();
  if (stage_.input) stage_.input->release(device_, false);
  if (stage_.output) stage_.output->release(device_, true);
}

const CudaMoe& CudaLlama::moe() const {
  if (!moe_) throw BadInput("the model is not a mixture-of-experts model");
  return *moe_;
}

std::pair<CUdeviceptr, CUdeviceptr> CudaLlama::expertSlotAddress(int layer, int slot) const {
  if (!weights_) throw NativeError("TANDEM_INTERNAL", "the GPU model runner was not initialised");
  return moe().slotAddress(weights_->ptr, layer, slot);
}

void CudaLlama::stageExperts(const std::vector<std::pair<CUdeviceptr, CUdeviceptr>>& sources) {
  if (aborted_.load() || released_) throw Aborted("the model was disposed");
  moe();
  moe_->stageExperts(sources);
}

ExpertCopyStats CudaLlama::commitExperts(const std::vector<std::pair<int, int>>& dests,
                                         std::vector<std::vector<int32_t>> slotExpert) {
  if (aborted_.load() || released_) throw Aborted("the model was disposed");
  moe();
  if (!weights_) throw NativeError("TANDEM_INTERNAL", "the GPU model runner was not initialised");
  return moe_->commitExperts(weights_->ptr, dests, std::move(slotExpert));
}

CudaMoe::Load CudaLlama::takeExpertLoad() {
  if (aborted_.load() || released_) throw Aborted("the model was disposed");
  moe();
  return moe_->takeLoad();
}

const CudaLlama::Slot& CudaLlama::slotOf(const std::string& name) const {
  auto it = slots_.find(name);
  if (it == slots_.end()) {
    std::string hint = name == "lm_head.weight" && config_.tieWordEmbeddings
                           ? " (this config ties lm_head to model.embed_tokens.weight)"
                           : "";
    throw BadInput("tensor '" + name + "' is not part of this model" + hint);
  }
  return it->second;
}

void CudaLlama::markSet(const std::string& name) {
  std::lock_guard<std::mutex> lock(slotsMutex_);
  slots_.at(name).set = true;
}

void CudaLlama::checkWeight(const std::string& name, size_t count) const {
  const Slot& slot = slotOf(name);
  if (count != slot.count)
    throw BadInput("tensor '" + name + "' has " + std::to_string(count) + " elements; this config needs " +
                   std::to_string(slot.count) + " (shape " + slot.shape + ")");
}

void CudaLlama::setWeight(const std::string& name, const float* data, size_t count) {
  checkWeight(name, count);
  if (released_ || !weights_) throw NativeError("TANDEM_DISPOSED", "the GPU model runner was disposed");
  ensureScratch(0, kStagingBytes);
  const CudaDriver& d = device_.driver();
  // Two halves of the staging buffer: the host converts into one while the copy out of the other runs.
  size_t perChunk = pinnedBytes_ / 4;
  uint16_t* halves[2] = {static_cast<uint16_t*>(pinned_), static_cast<uint16_t*>(pinned_) + perChunk};
  CUevent copied[2] = {nullptr, nullptr};
  for (CUevent& e : copied) check(d.cuEventCreate(&e, CU_EVENT_DISABLE_TIMING), "cuEventCreate (weights)");
  CUdeviceptr dest = weight(slotOf(name).offset);
  try {
    int k = 0;
    for (size_t done = 0; done < count; done += perChunk, k ^= 1) {
      size_t n = std::min(perChunk, count - done);
      check(d.cuEventSynchronize(copied[k]), "cuEventSynchronize (weights)");  // this half's last copy is done
      uint16_t* staging = halves[k];
      for (size_t i = 0; i < n; ++i) staging[i] = toBf16(data[done + i]);
      check(d.cuMemcpyHtoDAsync(dest + done * 2, staging, n * 2, device_.stream()), "cuMemcpyHtoDAsync (weights)");
      check(d.cuEventRecord(copied[k], device_.stream()), "cuEventRecord (weights)");
    }
    check(d.cuStreamSynchronize(device_.stream()), "cuStreamSynchronize (weights)");
  } catch (...) {
    d.cuStreamSynchronize(device_.stream());
    for (CUevent e : copied) d.cuEventDestroy(e);
    throw;
  }
  for (CUevent e : copied) d.cuEventDestroy(e);
  markSet(name);
}

void CudaLlama::fillDummy(const std::string& name, bool ones, uint32_t key0, uint32_t key1, uint32_t key2,
                          double width) {
  const Slot& slot = slotOf(name);
  if (released_ || !weights_) throw NativeError("TANDEM_DISPOSED", "the GPU model runner was disposed");
  const CudaDriver& d = device_.driver();
  CUdeviceptr dest = weight(slot.offset);
  constexpr unsigned kThreads = 128;
  if (ones) {
    if (!fn_.dummyFill) fn_.dummyFill = device_.function("tandem_dummy_fill_bf16");
    unsigned long long count = slot.count;
    unsigned int one = 0x3f80;  // bf16 1.0
    launch(fn_.dummyFill, static_cast<unsigned>(std::min<unsigned long long>((count + kThreads - 1) / kThreads, 4096)),
           1, kThreads, dest, count, one);
  } else if (slot.whole()) {
    if (!fn_.dummyUniform) fn_.dummyUniform = device_.function("tandem_dummy_uniform_bf16");
    unsigned long long rows = slot.rows, cols = slot.count / slot.rows;
    launch(fn_.dummyUniform, static_cast<unsigned>((rows + kThreads - 1) / kThreads), 1, kThreads, dest, rows, cols,
           static_cast<unsigned int>(key0), static_cast<unsigned int>(key1), static_cast<unsigned int>(key2), width);
  } else if (slot.count > 0) {
    // A tensor-parallel rank's slice: element (i, j) is element (rowStart + i, colStart + j) of the whole tensor.
    if (!fn_.dummySlice) fn_.dummySlice = device_.function("tandem_dummy_uniform_slice_bf16");
    unsigned long long rows = slot.rows, cols = slot.cols, rowStart = slot.rowStart, colStart = slot.colStart;
    launch(fn_.dummySlice, static_cast<unsigned>((rows + kThreads - 1) / kThreads), 1, kThreads, dest, rows, cols,
           rowStart, colStart, static_cast<unsigned int>(key0), static_cast<unsigned int>(key1),
           static_cast<unsigned int>(key2), width);
  }
  check(d.cuStreamSynchronize(device_.stream()), "cuStreamSynchronize (dummy weights)");
  markSet(name);
}

void CudaLlama::checkFileTensor(const FileTensor& t) const {
  const Slot& slot = slotOf(t.name);
  size_t width = t.dtype == FileDtype::F32 ? 4 : 2;
  const size_t fullCount = slot.fullRows * slot.fullCols;
  if (t.bytes != fullCount * width)
    throw BadInput("tensor '" + t.name + "' holds " + std::to_string(t.bytes) + " bytes in the file; shape " + slot.shape +
                   " needs " + std::to_string(fullCount * width));
}

void CudaLlama::loadFromFile(int fd, std::vector<FileTensor> tensors, double* bytesDone) {
  for (const FileTensor& t : tensors) checkFileTensor(t);
  if (released_ || !weights_) throw NativeError("TANDEM_DISPOSED", "the GPU model runner was disposed");
  std::sort(tensors.begin(), tensors.end(), [](const FileTensor& a, const FileTensor& b) { return a.offset < b.offset; });
  ::posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL);
  const CudaDriver& d = device_.driver();
  CUstream stream = device_.stream();
  void* staging[2] = {nullptr, nullptr};
  CUevent copied[2] = {nullptr, nullptr};
  std::vector<uint8_t> raw;  // F16 / F32 file bytes before rounding
  auto cleanup = [&] {
    d.cuStreamSynchronize(stream);
    for (CUevent e : copied)
      if (e) d.cuEventDestroy(e);
    for (void* p : staging)
      if (p) d.cuMemFreeHost(p);
  };
  try {
    for (int k = 0; k < 2; ++k) {
      check(d.cuMemAllocHost(&staging[k], kFileChunkBytes), "cuMemAllocHost (checkpoint staging)");
      check(d.cuEventCreate(&copied[k], CU_EVENT_DISABLE_TIMING), "cuEventCreate (checkpoint staging)");
    }
    int k = 0;
    double done = 0;
    // A piece: a run of one tensor's bytes that fits a chunk (its file range and where it goes).
    struct Piece {
      uint64_t offset, bytes;
      CUdeviceptr dest;
    };
    std::vector<Piece> run;
    auto flushRun = [&] {  // one read of the consecutive BF16 pieces in `run`, then their copies
      if (run.empty()) return;
      uint64_t start = run.front().offset, end = run.back().offset + run.back().bytes;
      check(d.cuEventSynchronize(copied[k]), "cuEventSynchronize (checkpoint staging)");
      readAt(fd, staging[k], end - start, start);
      for (const Piece& p : run)
        check(d.cuMemcpyHtoDAsync(p.dest, static_cast<uint8_t*>(staging[k]) + (p.offset - start), p.bytes, stream),
              "cuMemcpyHtoDAsync (checkpoint)");
      check(d.cuEventRecord(copied[k], stream), "cuEventRecord (checkpoint staging)");
      k ^= 1;
      done += static_cast<double>(end - start);
      if (bytesDone) *bytesDone = done;
      run.clear();
    };
    // A tensor-parallel rank's columns of a row-parallel tensor (o_proj, down_proj): whole rows are read, the rank's
    // columns go (rounded to bf16 where the file is not) densely into staging, one copy per chunk of rows.
    auto loadColumns = [&](const FileTensor& t, const Slot& slot) {
      const size_t width = t.dtype == FileDtype::F32 ? 4 : 2;
      const size_t rowBytes = slot.fullCols * width;
      const size_t rowsPerChunk =
          std::max<size_t>(1, std::min(kFileChunkBytes / rowBytes, kFileChunkBytes / (slot.cols * 2)));
      const CUdeviceptr dest = weight(slot.offset);
      for (size_t r = 0; r < slot.rows; r += rowsPerChunk) {
        const size_t n = std::min(rowsPerChunk, slot.rows - r);
        raw.resize(n * rowBytes);
        readAt(fd, raw.data(), n * rowBytes, t.offset + (slot.rowStart + r) * rowBytes);
        check(d.cuEventSynchronize(copied[k]), "cuEventSynchronize (checkpoint staging)");
        uint16_t* out = static_cast<uint16_t*>(staging[k]);
        for (size_t i = 0; i < n; ++i) {
          const uint8_t* from = raw.data() + i * rowBytes + slot.colStart * width;
          uint16_t* to = out + i * slot.cols;
          if (t.dtype == FileDtype::BF16) {
            std::memcpy(to, from, slot.cols * 2);
          } else if (width == 4) {
            for (size_t j = 0; j < slot.cols; ++j) {
              float f;
              std::memcpy(&f, from + j * 4, 4);
              to[j] = toBf16(f);
            }
          } else {
            for (size_t j = 0; j < slot.cols; ++j) {
              uint16_t h;
              std::memcpy(&h, from + j * 2, 2);
              to[j] = toBf16(f16ToF32(h));
            }
          }
        }
        check(d.cuMemcpyHtoDAsync(dest + r * slot.cols * 2, out, n * slot.cols * 2, stream),
              "cuMemcpyHtoDAsync (checkpoint)");
        check(d.cuEventRecord(copied[k], stream), "cuEventRecord (checkpoint staging)");
        k ^= 1;
        done += static_cast<double>(n * rowBytes);
        if (bytesDone) *bytesDone = done;
      }
    };
    for (const FileTensor& t : tensors) {
      const Slot& slot = slotOf(t.name);
      CUdeviceptr dest = weight(slot.offset);
      const size_t width = t.dtype == FileDtype::F32 ? 4 : 2;
      if (slot.cols != slot.fullCols) {
        flushRun();
        loadColumns(t, slot);
        continue;
      }
      // The whole tensor, or a tensor-parallel rank's rows of it: one contiguous range of the file.
      const uint64_t first = t.offset + slot.rowStart * slot.fullCols * width, bytes = slot.count * width;
      if (t.dtype == FileDtype::BF16) {
        for (uint64_t at = 0; at < bytes;) {
          uint64_t n = std::min<uint64_t>(kFileChunkBytes, bytes - at);
          uint64_t runBytes = run.empty() ? 0 : run.back().offset + run.back().bytes - run.front().offset;
          bool contiguous = !run.empty() && run.back().offset + run.back().bytes == first + at;
          if (!contiguous || runBytes + n > kFileChunkBytes) flushRun();
          run.push_back(Piece{first + at, n, dest + at});
          at += n;
        }
      } else {
        flushRun();
        const size_t perChunk = kFileChunkBytes / 2;  // bf16 values per staging buffer
        const size_t count = bytes / width;
        raw.resize(std::min(perChunk, count) * width);
        for (size_t at = 0; at < count; at += perChunk) {
          size_t n = std::min(perChunk, count - at);
          readAt(fd, raw.data(), n * width, first + at * width);
          check(d.cuEventSynchronize(copied[k]), "cuEventSynchronize (checkpoint staging)");
          uint16_t* out = static_cast<uint16_t*>(staging[k]);
          if (width == 4) {
            for (size_t i = 0; i < n; ++i) {
              float f;
              std::memcpy(&f, raw.data() + i * 4, 4);
              out[i] = toBf16(f);
            }
          } else {
            for (size_t i = 0; i < n; ++i) {
              uint16_t h;
              std::memcpy(&h, raw.data() + i * 2, 2);
              out[i] = toBf16(f16ToF32(h));
            }
          }
          check(d.cuMemcpyHtoDAsync(dest + at * 2, out, n * 2, stream), "cuMemcpyHtoDAsync (checkpoint)");
          check(d.cuEventRecord(copied[k], stream), "cuEventRecord (checkpoint staging)");
          k ^= 1;
          done += static_cast<double>(n * width);
          if (bytesDone) *bytesDone = done;
        }
      }
    }
    flushRun();
    check(d.cuStreamSynchronize(stream), "cuStreamSynchronize (checkpoint)");
  } catch (...) {
    cleanup();
    throw;
  }
  cleanup();
  for (const FileTensor& t : tensors) markSet(t.name);
}

std::vector<uint16_t> CudaLlama::readWeight(const std::string& name) {
  const Slot& slot = slotOf(name);
  if (released_ || !weights_) throw NativeError("TANDEM_DISPOSED", "the GPU model runner was disposed");
  std::vector<uint16_t> out(slot.count);
  const CudaDriver& d = device_.driver();
  check(d.cuStreamSynchronize(device_.stream()), "cuStreamSynchronize");
  check(d.cuMemcpyDtoHAsync(out.data(), weight(slot.offset), slot.count * 2, device_.stream()),
        "cuMemcpyDtoHAsync (weights)");
  check(d.cuStreamSynchronize(device_.stream()), "cuStreamSynchronize");
  return out;
}

std::vector<std::string> CudaLlama::missingWeights() const {
  std::lock_guard<std::mutex> lock(slotsMutex_);
  std::vector<std::string> out;
  for (const auto& name : order_)
    if (!slots_.at(name).set) out.push_back(name);
  return out;
}

void CudaLlama::ensureScratch(size_t deviceBytes, size_t hostBytes) {
  const CudaDriver& d = device_.driver();
  if (deviceBytes > 0 && (!scratch_ || scratch_->bytes < deviceBytes)) {
    check(d.cuStreamSynchronize(device_.stream()), "cuStreamSynchronize");
    if (scratch_) device_.freeAllocation(*scratch_);
    scratch_.reset();
    // A little headroom, so that batches that grow slowly do not reallocate every step.
    scratch_ = device_.allocate(alignUp(deviceBytes + deviceBytes / 4), "cuMemAlloc (activations)");
    ++scratchGeneration_;  // graphs captured on the old scratch are stale
  }
  if (hostBytes > pinnedBytes_) {
    check(d.cuStreamSynchronize(device_.stream()), "cuStreamSynchronize");
    if (pinned_) d.cuMemFreeHost(pinned_);
    pinned_ = nullptr;
    pinnedBytes_ = 0;
    size_t bytes = alignUp(std::max(hostBytes, kStagingBytes));
    check(d.cuMemAllocHost(&pinned_, bytes), "cuMemAllocHost (staging)");
    pinnedBytes_ = bytes;
  }
}

template <typename... Args>
void CudaLlama::launch(CUfunction fn, unsigned gridX, unsigned gridY, unsigned block, Args... args) {
  void* params[] = {static_cast<void*>(&args)...};
  check(device_.driver().cuLaunchKernel(fn, gridX, gridY, 1, block, 1, 1, 0, device_.stream(), params, nullptr),
        "cuLaunchKernel");
}

template <typename... Args>
void CudaLlama::launch3(CUfunction fn, unsigned gridX, unsigned gridY, unsigned gridZ, unsigned block,
                        unsigned sharedBytes, Args... args) {
  void* params[] = {static_cast<void*>(&args)...};
  check(device_.driver().cuLaunchKernel(fn, gridX, gridY, gridZ, block, 1, 1, sharedBytes, device_.stream(), params,
                                        nullptr),
        "cuLaunchKernel");
}

template <typename... Args>
void CudaLlama::launchGemv(CUfunction fn, unsigned grid, Args... args) {
  if (!gemvPdl_) {
    launch(fn, grid, 1, kGemvThreads, args...);
    return;
  }
  void* params[] = {static_cast<void*>(&args)...};
  CUlaunchAttribute attr{};
  attr.id = CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
  attr.value.programmaticStreamSerializationAllowed = 1;
  CUlaunchConfig config{};
  config.gridDimX = grid;
  config.gridDimY = config.gridDimZ = 1;
  config.blockDimX = kGemvThreads;
  config.blockDimY = config.blockDimZ = 1;
  config.hStream = device_.stream();
  config.attrs = &attr;
  config.numAttrs = 1;
  check(device_.driver().cuLaunchKernelEx(&config, fn, params, nullptr), "cuLaunchKernelEx (GEMV)");
}

// y[m, n] = x[m, k] . w[n, k]^T, x and w bf16 row-major, y fp32 (or bf16 where yType says so). A small m goes to
// gemv.cu (one launch, no workspace: capturable in a decode graph; fp32 out); otherwise cuBLASLt (LtGemm: per
// shape the fastest of the heuristic's top candidates as tuneGemm timed them, or its first with tuning off or out
// of budget, chosen once, for a decode graph before its capture by prepareGemms; the workspace is the runner's)
// or cublasGemmEx, in whose column-major terms y^T (n x m) = w (k x n, transposed) . x^T (k x m).
// o_proj's and down's residual add: gemmAdd, below (not on the GEMV path, which writes y).
void CudaLlama::gemm(CUdeviceptr x, int m, int k, CUdeviceptr w, int n, CUdeviceptr y, int yType) {
  if (m >= 1 && m <= gemvMaxBatch_) {
    if (yType != kCudaR32F) throw NativeError("TANDEM_INTERNAL", "the GEMV kernels write fp32 only");
    const unsigned rows = static_cast<unsigned>(gemvRows(m));
    launchGemv(gemv_[m - 1], (static_cast<unsigned>(n) + rows - 1) / rows, x, w, y, n, k);
    return;
  }
  matmul(x, m, k, w, n, y, yType, 0.0f, y);
}

// cuBLASLt's C = D = y with beta 1: the product joins the residual stream in the GEMM's epilogue, so the norm after
// it reads x alone instead of reading x and the product and writing x back (two fp32 passes over ntok x hidden
// fewer per fused GEMM, and for a prefill of 8192 tokens 64 of them, ~270 MB each).
void CudaLlama::gemmAdd(CUdeviceptr x, int m, int k, CUdeviceptr w, int n, CUdeviceptr y, CUdeviceptr scratch) {
  if (m <= gemvMaxBatch_) throw NativeError("TANDEM_INTERNAL", "gemmAdd below the GEMV's largest batch");
  matmul(x, m, k, w, n, y, kCudaR32F, 1.0f, scratch);
}

void CudaLlama::matmul(CUdeviceptr x, int m, int k, CUdeviceptr w, int n, CUdeviceptr y, int yType, float beta,
                       CUdeviceptr tuneY) {
  // The shape for an error message, built only when one is thrown (this runs for every GEMM of every pass).
  auto shape = [&] {
    return " (" + std::to_string(m) + " x " + std::to_string(n) + " x " + std::to_string(k) +
           (beta != 0.0f ? ", adding)" : ")");
  };
  if (gemmLt_) {
    // New shapes outside a capture only: prepareGemms has seen every shape of a decode graph before it.
    if (gemmTune_ && !lt_->has(m, n, k, yType)) tuneGemm(x, m, k, w, n, tuneY, yType);
    const char* what = "cublasLtMatmul";
    cublasStatus s = lt_->run(x, m, k, w, n, y, yType, device_.stream(), &what, nullptr, beta);
    if (s != 0) throw NativeError("TANDEM_CUDA_ERROR", std::string(what) + shape() + ": " + cublasLt_.describe(s));
    return;
  }
  const float one = 1.0f;
  cublasStatus s = cublas_.gemmEx(handle_, kCublasOpT, kCublasOpN, n, m, k, &one, reinterpret_cast<const void*>(w),
                                  kCudaR16BF, k, reinterpret_cast<const void*>(x), kCudaR16BF, k, &beta,
                                  reinterpret_cast<void*>(y), yType, n, kCublasCompute32F, kCublasGemmDefault);
  if (s != 0) throw NativeError("TANDEM_CUDA_ERROR", "cublasGemmEx" + shape() + ": " + cublas_.describe(s));
}

bool CudaLlama::downAddsIntoX(const BatchPlan& plan, int layer) const {
  return plan.residualInGemm && !moe_ && (stage_.last() || layer != local_.numLayers - 1);
}

void CudaLlama::tuneGemm(CUdeviceptr x, int m, int k, CUdeviceptr w, int n, CUdeviceptr y, int yType) {
  const int ordinal = device_.ordinal();
  auto keep = [&](const cublasLtMatmulAlgo& algo) {
    const char* what = "";
    if (cublasStatus s = lt_->choose(m, n, k, yType, algo, &what))
      throw NativeError("TANDEM_CUDA_ERROR", std::string(what) + " (" + std::to_string(m) + " x " + std::to_string(n) +
                                                 " x " + std::to_string(k) + "): " + cublasLt_.describe(s));
  };
  // Another runner of this process on this device tuned the shape: the same algorithm, at no cost.
  cublasLtMatmulAlgo shared{};
  if (tunedAlgo(ordinal, m, n, k, yType, &shared)) {
    keep(shared);
    gemmTunedShapes_.fetch_add(1);
    return;
  }
  if (gemmTuneMs_.load() >= kGemmTuneBudgetMs) return;
  const auto started = std::chrono::steady_clock::now();
  cublasStatus status = 0;
  const std::vector<cublasLtMatmulAlgo> algos = lt_->candidates(m, n, k, yType, kGemmTuneCandidates, &status);
  if (status != 0 || algos.size() < 2) return;  // run() reports a failing heuristic; one candidate needs no timing
  const CudaDriver& d = device_.driver();
  CUstream stream = device_.stream();
  // ms per run of `runs` timed runs after an untimed one; negative where a run failed (the heuristic vouched for
  // the candidate, but nothing depends on it: skipped).
  auto timeAlgo = [&](const cublasLtMatmulAlgo& algo, int runs) -> float {
    const char* what = "";
    if (lt_->run(x, m, k, w, n, y, yType, stream, &what, &algo) != 0) return -1;
    check(d.cuEventRecord(tuneEvents_[0], stream), "cuEventRecord (GEMM tuning)");
    bool ok = true;
    for (int r = 0; r < runs && ok; ++r) ok = lt_->run(x, m, k, w, n, y, yType, stream, &what, &algo) == 0;
    check(d.cuEventRecord(tuneEvents_[1], stream), "cuEventRecord (GEMM tuning)");
    check(d.cuEventSynchronize(tuneEvents_[1]), "GEMM tuning");
    float ms = 0;
    check(d.cuEventElapsedTime(&ms, tuneEvents_[0], tuneEvents_[1]), "cuEventElapsedTime (GEMM tuning)");
    return ok ? ms / static_cast<float>(runs) : -1;
  };
  int runs = kGemmTuneRuns;
  float first = timeAlgo(algos[0], runs);
  bool within = true;  // the budget allows this shape (else run() keeps the heuristic's first)
  if (first >= 0) {
    runs = std::clamp(static_cast<int>(std::ceil(kGemmTuneMinMs / std::max(first, 1e-4f))), kGemmTuneRuns,
                      kGemmTuneMaxRuns);
    const double projected = static_cast<double>(first) * (runs + 1) * static_cast<double>(algos.size());
    within = gemmTuneMs_.load() + projected <= kGemmTuneBudgetMs;
    if (within && runs > kGemmTuneRuns) first = timeAlgo(algos[0], runs);
  }
  const cublasLtMatmulAlgo* best = within && first >= 0 ? &algos[0] : nullptr;
  float bestMs = first;
  for (size_t a = 1; within && a < algos.size(); ++a) {
    const float ms = timeAlgo(algos[a], runs);
    if (ms >= 0 && (!best || ms < bestMs)) {
      best = &algos[a];
      bestMs = ms;
    }
  }
  // Where another runner registered the shape while this one timed it, that one's choice holds for both.
  if (best) keep(registerTunedAlgo(ordinal, m, n, k, yType, *best));
  if (within) gemmTunedShapes_.fetch_add(1);
  const double spent = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - started).count();
  gemmTuneMs_.store(gemmTuneMs_.load() + spent);
}

void CudaLlama::prepareGemms(const BatchPlan& plan, const BatchBuffers& b) {
  if (!gemmLt_) return;
  const LlamaConfig& c = local_;
  const int h = c.hiddenSize, inter = c.intermediateSize, tokens = static_cast<int>(plan.ntok);
  const int sequences = static_cast<int>(plan.nseq);
  // The pass's shapes, each with the batch's own x and y buffers (sizes as the pass uses them; the pass then
  // overwrites y) to be tuned on, and the start of the weights as w (any n x k bf16 times the same: the tuned
  // algorithm is the one an eager pass would choose). An MoE config: the router in gate_up's place, no down (the
  // experts' grouped kernel does it).
  struct Shape {
    int m, n, k, yType;
    CUdeviceptr x, y;
  };
  std::vector<Shape> shapes = {{tokens, static_cast<int>(qkvDim_), h, kCudaR32F, b.xn, b.qkv},
                               {tokens, h, static_cast<int>(qDim_), kCudaR32F, b.attn, b.tmp},
                               {sequences, c.vocabSize, h, kCudaR32F, b.last, b.logits}};
  if (moe_)
    shapes.push_back({tokens, moe_->routerRows(), h, kCudaR32F, b.xn, b.moe});
  else {
    shapes.push_back({tokens, 2 * inter, h, gateUpBf16_ ? kCudaR16BF : kCudaR32F, b.xn, b.gateUp});
    shapes.push_back({tokens, h, inter, kCudaR32F, b.act, b.tmp});
  }
  for (const Shape& s : shapes) {
    if (s.m <= gemvMaxBatch_ || lt_->has(s.m, s.n, s.k, s.yType)) continue;
    if (gemmTune_ && static_cast<size_t>(s.n) * s.k * 2 <= weightBytes_)
      tuneGemm(s.x, s.m, s.k, weights_->ptr, s.n, s.y, s.yType);
    const char* what = "";
    if (cublasStatus st = lt_->prepare(s.m, s.n, s.k, s.yType, &what))
      throw NativeError("TANDEM_CUDA_ERROR", std::string(what) + " (" + std::to_string(s.m) + " x " +
                                                 std::to_string(s.n) + " x " + std::to_string(s.k) +
                                                 "): " + cublasLt_.describe(st));
  }
}

void CudaLlama::gateUpAct(CUdeviceptr x, int m, int k, CUdeviceptr wgateUp, int inter, CUdeviceptr gateUp,
                          CUdeviceptr act) {
  if (m >= 1 && m <= gemvMaxBatch_) {
    const unsigned pairs = static_cast<unsigned>(gemvRows(m) / 2);  // gate and up rows per CTA
    launchGemv(gemvSwiglu_[m - 1], (static_cast<unsigned>(inter) + pairs - 1) / pairs, x, wgateUp, act, inter, k);
    return;
  }
  // bf16 gate_up: fp32 accumulation, one rounding of each gate and up value (transformers rounds them too).
  gemm(x, m, k, wgateUp, 2 * inter, gateUp, gateUpBf16_ ? kCudaR16BF : kCudaR32F);
  launch(gateUpBf16_ ? fn_.siluMulBf16 : fn_.siluMul, static_cast<unsigned>(m), siluMulBlocks(inter), 256, gateUp,
         inter, act);
}

int CudaLlama::decodeKernel(size_t rows) const {
  const bool few = rows <= kFlash2DecodeMaxRows;
  const int k = !flash2_ ? 1 : forcedDecode_ ? forcedDecode_ : few ? 2 : 3;
  return k == 3 && !fn_.flash3Decode ? (few ? 2 : 1) : k;
}
size_t CudaLlama::decode2MaxRows() { return kFlash2DecodeMaxRows; }
size_t CudaLlama::decode3MaxRows() { return kFlash3DecodeMaxRows; }

CudaLlama::BatchPlan CudaLlama::planBatch(const ForwardInput& in, size_t extraDevice, size_t extraHost) const {
  validateForward(config_, pool_.numBlocks, pool_.blockSize, in);
  const LlamaConfig& c = config_;
  BatchPlan p;
  const size_t ntok = in.tokens.size(), nseq = in.seqStarts.size() - 1;
  p.ntok = ntok;
  p.nseq = nseq;
  // Activations are this rank's shapes; the logits the whole vocabulary's.
  const size_t h = c.hiddenSize, inter = local_.intermediateSize, vocab = c.vocabSize;
  const int bs = pool_.blockSize, mb = in.maxBlocksPerSeq;
  p.maxBlocks = mb;

  // Per-token sequence and destination block, each sequence's last token: uploaded with the batch.
  std::vector<int32_t>& ints = p.ints;
  ints.reserve(4 * ntok + nseq * mb + nseq);
  ints.insert(ints.end(), in.tokens.begin(), in.tokens.end());
  ints.insert(ints.end(), in.positions.begin(), in.positions.end());
  for (size_t s = 0; s < nseq; ++s)
    for (int32_t t = in.seqStarts[s]; t < in.seqStarts[s + 1]; ++t) ints.push_back(static_cast<int32_t>(s));
  for (size_t s = 0; s < nseq; ++s)
    for (int32_t t = in.seqStarts[s]; t < in.seqStarts[s + 1]; ++t)
      ints.push_back(in.blockTables[s * mb + in.positions[t] / bs]);
  ints.insert(ints.end(), in.blockTables.begin(), in.blockTables.end());
  for (size_t s = 0; s < nseq; ++s) ints.push_back(in.seqStarts[s + 1] - 1);
  // Flash attention's plan: prefill tiles (token start, count, sequence) of up to kFlashRows tokens of one
  // sequence, and decode rows (the token of each sequence with exactly one token in the batch), the latter
  // split along the context so that the grid fills the GPU. A decode step's plan depends only on (sequences,
  // blocks per sequence), the key of its CUDA graph.
  p.tilesAt = ints.size();
  p.decodeAt = p.tilesAt;
  p.flash2 = flash2_;
  // One rank only: with tensor parallelism the product is a partial sum, all-reduced before it joins x.
  p.residualInGemm = residualGemm_ && !tensorParallel() && static_cast<int>(ntok) > gemvMaxBatch_;
  if (flash_) {
    const int32_t tileRows = p.flash2 ? kFlash2Rows : kFlashRows;
    for (size_t s = 0; s < nseq; ++s) {
      const int32_t first = in.seqStarts[s], n = in.seqStarts[s + 1] - first;
      if (n == 1) continue;
      for (int32_t a = 0; a < n; a += tileRows) {
        ints.push_back(first + a);
        ints.push_back(std::min<int32_t>(tileRows, n - a));
        ints.push_back(static_cast<int32_t>(s));
      }
    }
    p.decodeAt = ints.size();
    for (size_t s = 0; s < nseq; ++s)
      if (in.seqStarts[s + 1] - in.seqStarts[s] == 1) ints.push_back(in.seqStarts[s]);
    p.decodeRows = ints.size() - p.decodeAt;
    p.decodeKernel = decodeKernel(p.decodeRows);
    if (p.decodeRows) {
      const int ctx = c.slidingWindow > 0 ? std::min(c.slidingWindow, mb * bs) : mb * bs;
      const int chunks = (ctx + kFlashKeys - 1) / kFlashKeys;
      const int ctas = static_cast<int>(p.decodeRows) * local_.numKvHeads;
      const int perSm = p.decodeKernel == 2 ? kFlash2DecodeCtasPerSm : kFlashDecodeCtasPerSm;
      int want = std::max(1, (perSm * multiprocessors_ + ctas - 1) / ctas);
      if (p.decodeKernel == 3) want = flash3DecodeSplits(ctas, chunks, kFlash3DecodeCtasPerSm * multiprocessors_);
      // decode2 and decode3 merge splits through one counter per (row, kv head).
      if (p.decodeKernel >= 2 && forcedSplits_) want = forcedSplits_;
      if (p.decodeKernel >= 2)
        want = static_cast<size_t>(ctas) <= kFlash2Counters ? std::min(want, kFlash2MaxSplits) : 1;
      p.splits = std::max(1, std::min(want, chunks));
      p.keysPerSplit = (chunks + p.splits - 1) / p.splits * kFlashKeys;
      p.splits = (ctx + p.keysPerSplit - 1) / p.keysPerSplit;
    }
  }
  p.flashTiles = (p.decodeAt - p.tilesAt) / 3;

  Carver carve;
  p.oInts = carve.take(ints.size() * 4);
  p.oX = carve.take(ntok * h * 4);
  p.oTmp = carve.take(ntok * h * 4);
  p.oXn = carve.take(ntok * h * 2);
  p.oQkv = carve.take(ntok * qkvDim_ * 4);
  p.oAttn = carve.take(ntok * qDim_ * 2);
  p.oGateUp = carve.take(moe_ ? 0 : ntok * 2 * inter * (gateUpBf16_ ? 2 : 4));
  p.oAct = carve.take(moe_ ? 0 : ntok * inter * 2);
  p.oMoe = carve.take(moe_ ? moe_->scratchBytes(ntok) : 0);
  p.oLast = carve.take(nseq * h * 2);
  p.oLogits = carve.take(stage_.last() ? nseq * vocab * 4 : 0);
  p.oPartial =
      carve.take(p.splits > 1 ? p.decodeRows * local_.numHeads * p.splits * flashPartialStride(c.headDim) * 4 : 0);
  p.oRankLogits = carve.take(tensorParallel() && stage_.last() ? nseq * static_cast<size_t>(local_.vocabSize) * 4 : 0);
  p.oExtra = carve.take(extraDevice);
  p.deviceBytes = carve.used;
  p.hostExtraAt = alignUp(ints.size() * 4);
  p.hostBytes = p.hostExtraAt + extraHost;
  return p;
}

CudaLlama::BatchBuffers CudaLlama::uploadBatch(const BatchPlan& p) {
  ensureScratch(p.deviceBytes, p.hostBytes);
  const size_t ntok = p.ntok, nseq = p.nseq;
  const CUdeviceptr base = scratch_->ptr, dInts = base + p.oInts;
  BatchBuffers b{};
  b.tokens = dInts;
  b.positions = dInts + ntok * 4;
  b.tokenSeqs = dInts + 2 * ntok * 4;
  b.tokenBlocks = dInts + 3 * ntok * 4;
  b.tables = dInts + 4 * ntok * 4;
  b.lastRows = b.tables + nseq * p.maxBlocks * 4;
  b.flashTiles = dInts + p.tilesAt * 4;
  b.decodeRows = dInts + p.decodeAt * 4;
  b.x = base + p.oX;
  b.tmp = base + p.oTmp;
  b.xn = base + p.oXn;
  b.qkv = base + p.oQkv;
  b.attn = base + p.oAttn;
  b.gateUp = base + p.oGateUp;
  b.act = base + p.oAct;
  b.last = base + p.oLast;
  b.logits = base + p.oLogits;
  b.partial = base + p.oPartial;
  b.extra = base + p.oExtra;
  b.rankLogits = base + p.oRankLogits;
  b.moe = base + p.oMoe;
  std::memcpy(pinned_, p.ints.data(), p.ints.size() * 4);
  check(device_.driver().cuMemcpyHtoDAsync(dInts, pinned_, p.ints.size() * 4, device_.stream()),
        "cuMemcpyHtoDAsync (batch)");
  return b;
}

void CudaLlama::enqueueDenseLayer(int l, const BatchPlan& p, const BatchBuffers& b) {
  const LlamaConfig& c = local_;  // this rank's heads, kv heads and intermediate channels
  const LayerOffsets& W = layers_[l];
  const int H = c.numHeads, KVH = c.numKvHeads, D = c.headDim, L = c.numLayers;
  const int bs = pool_.blockSize, mb = p.maxBlocks;
  const int hidden = c.hiddenSize, nb = pool_.numBlocks, blockMajor = pool_.layout == KvLayout::BlockMajor;
  const int itok = static_cast<int>(p.ntok), iinter = c.intermediateSize, iq = static_cast<int>(qkvDim_);
  const float eps = c.rmsNormEps, scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)));
  const unsigned nt = normThreads(hidden);
  // One query's keys are all the work in decode: more warps per (token, head) there (see llama.cu). Large
  // prefills go to the tiled kernel (K/V through shared memory, shared by the GQA group) where it applies.
  const unsigned attnThreads = p.ntok <= 256 ? 512 : 128;
  const int group = H / KVH;
  const bool tiled = p.ntok > 256 && D % 2 == 0 && D <= kTiledMaxDim && group <= kTiledMaxGroup;
  const CUdeviceptr kv = pool_.base, invFreq = invFreqMem_->ptr, null = 0;
  const CUdeviceptr counters = p.flash2 ? flash2Counters_->ptr : 0;
  const unsigned flashTiles = static_cast<unsigned>(p.flashTiles), decodeRows = static_cast<unsigned>(p.decodeRows);
  const int keysPerSplit = p.keysPerSplit;

  // The model's first layer starts from the embedding alone; every other one adds the previous layer's output (a
  // later pipeline stage's first layer: the one the previous stage handed over with x).
  const bool firstLayer = l == 0 && stage_.first();
  const CUfunction addRmsNorm = elementwise2_ ? fn_.addRmsNorm2 : fn_.addRmsNorm;
  // The previous layer's output: in b.tmp to add here, or already in x (its down added into x; a later stage's first
  // layer receives {x, tmp} from a stage whose last down did not).
  const bool pending = !firstLayer && (l == 0 || !downAddsIntoX(p, l - 1));
  launch(addRmsNorm, itok, 1, nt, b.x, pending ? b.tmp : null, weight(W.inputNorm), hidden, eps, null, b.xn);
  gemm(b.xn, itok, hidden, weight(W.wqkv), iq, b.qkv);
  // The q / k / v bias goes in as rope_kv2 reads the row (no pass of its own), unless a q / k norm comes between.
  const bool biasInRope = c.attentionBias && elementwise2_ && !c.qkNorm;
  if (c.attentionBias && !biasInRope) launch(fn_.addBias, itok, 1, 256, b.qkv, weight(W.bqkv), iq);
  if (c.qkNorm) launch(fn_.qkNorm, itok, H + KVH, 32, b.qkv, weight(W.qNorm), weight(W.kNorm), H, KVH, D, eps);
  if (elementwise2_)
    launch(fn_.ropeKv2, itok, static_cast<unsigned>((H + KVH + kRope2Heads - 1) / kRope2Heads), kRope2Threads, b.qkv,
           b.positions, b.tokenBlocks, invFreq, H, KVH, D, kv, l, L, nb, bs, blockMajor,
           biasInRope ? weight(W.bqkv) : null);
  else
    launch(fn_.ropeKv, itok, static_cast<unsigned>(H + KVH + 1), 64, b.qkv, b.positions, b.tokenBlocks, invFreq, H,
           KVH, D, kv, l, L, nb, bs, blockMajor);
  if (flash_) {
    if (flashTiles && p.flash2 && prefill3_)
      launch3(fn_.flash3Prefill, H, flashTiles, 1, kFlash3PrefillThreads, flash3PrefillSmem(D), b.qkv, b.positions,
              b.flashTiles, b.tables, mb, kv, l, L, nb, bs, blockMajor, H, KVH, c.slidingWindow, scale, b.attn);
    else if (flashTiles && p.flash2)
      launch3(fn_.flash2Prefill, H, flashTiles, 1, kFlash2Threads, flash2PrefillSmem(D), b.qkv, b.positions,
              b.flashTiles, b.tables, mb, kv, l, L, nb, bs, blockMajor, H, KVH, c.slidingWindow, scale, b.attn);
    else if (flashTiles)
      launch3(fn_.flashPrefill, flashTiles, H, 1, kFlashThreads, flashPrefillSmem(D), b.qkv, b.positions,
              b.flashTiles, b.tables, mb, kv, l, L, nb, bs, blockMajor, H, KVH, c.slidingWindow, scale, b.attn);
    // TANDEM_DECODE_GRID=heads: decode1 / decode3 take their grid as (kv heads, rows, splits) (attention.cu).
    const unsigned gx = decodeHeadsFastest_ ? KVH : decodeRows, gy = decodeHeadsFastest_ ? decodeRows : KVH;
    if (decodeRows && p.decodeKernel == 3)
      launch3(fn_.flash3Decode, gx, gy, static_cast<unsigned>(p.splits), kFlashThreads, flash3DecodeSmem(D),
              b.qkv, b.positions, b.decodeRows, b.tokenSeqs, b.tables, mb, kv, l, L, nb, bs, blockMajor, H, KVH,
              c.slidingWindow, scale, keysPerSplit, b.partial, counters, b.attn);
    else if (decodeRows && p.decodeKernel == 2)
      launch3(fn_.flash2Decode, decodeRows, KVH, static_cast<unsigned>(p.splits), kFlashThreads, 0, b.qkv,
              b.positions, b.decodeRows, b.tokenSeqs, b.tables, mb, kv, l, L, nb, bs, blockMajor, H, KVH,
              c.slidingWindow, scale, keysPerSplit, b.partial, counters, b.attn);
    else if (decodeRows) {
      launch3(fn_.flashDecode, gx, gy, static_cast<unsigned>(p.splits), kFlashThreads, 0, b.qkv,
              b.positions, b.decodeRows, b.tokenSeqs, b.tables, mb, kv, l, L, nb, bs, blockMajor, H, KVH,
              c.slidingWindow, scale, keysPerSplit, b.partial, b.attn);
      if (p.splits > 1)
        launch3(fn_.flashCombine, decodeRows, H, 1, kFlashThreads, 0, b.partial, b.decodeRows, H, D, p.splits,
                b.attn);
    }
  } else if (tiled)
    launch(fn_.attentionTiled, itok, KVH, static_cast<unsigned>(group) * 32, b.qkv, b.positions, b.tokenSeqs,
           b.tables, mb, kv, l, L, nb, bs, blockMajor, H, KVH, D, c.slidingWindow, scale, b.attn);
  else
    launch(fn_.attention, itok, H, attnThreads, b.qkv, b.positions, b.tokenSeqs, b.tables, mb, kv, l, L, nb, bs,
           blockMajor, H, KVH, D, c.slidingWindow, scale, b.attn);
  if (p.residualInGemm && !c.attentionOutputBias) {
    gemmAdd(b.attn, itok, static_cast<int>(qDim_), weight(W.wo), hidden, b.x, b.tmp);
    launch(addRmsNorm, itok, 1, nt, b.x, null, weight(W.postNorm), hidden, eps, null, b.xn);
  } else {
    gemm(b.attn, itok, static_cast<int>(qDim_), weight(W.wo), hidden, b.tmp);
    allReduce(b.tmp, p.ntok);  // row-parallel o_proj: the ranks' partial sums (the bias, replicated, after)
    if (c.attentionOutputBias) launch(fn_.addBias, itok, 1, 256, b.tmp, weight(W.bo), hidden);
    launch(addRmsNorm, itok, 1, nt, b.x, b.tmp, weight(W.postNorm), hidden, eps, null, b.xn);
  }
  if (moe_) {
    moe_->enqueue(l, weights_->ptr, b.xn, p.ntok, b.moe, b.tmp,
                  [this](CUdeviceptr x, int m, int k, CUdeviceptr w, int n, CUdeviceptr y) { gemm(x, m, k, w, n, y); });
    // Expert parallel: each rank's output holds the pairs its slots ran; the sum over the group is the whole MoE.
    if (grouped())
      tp_->allReduceSum(b.tmp, p.ntok * static_cast<size_t>(config_.hiddenSize), device_.stream());
    return;
  }
  gateUpAct(b.xn, itok, hidden, weight(W.wgateUp), iinter, b.gateUp, b.act);
  if (downAddsIntoX(p, l)) {
    gemmAdd(b.act, itok, iinter, weight(W.wdown), hidden, b.x, b.tmp);
    return;
  }
  gemm(b.act, itok, iinter, weight(W.wdown), hidden, b.tmp);
  allReduce(b.tmp, p.ntok);  // row-parallel down_proj
}

void CudaLlama::allReduce(CUdeviceptr buf, size_t tokens) {
  if (tensorParallel()) tp_->allReduceSum(buf, tokens * static_cast<size_t>(config_.hiddenSize), device_.stream());
}

void CudaLlama::enqueuePass(const BatchPlan& p, const BatchBuffers& b, bool capturing) {
  const LlamaConfig& c = config_;
  const int hidden = c.hiddenSize;
  const float eps = c.rmsNormEps;
  const unsigned nt = normThreads(hidden);
  const size_t streamBytes = p.ntok * static_cast<size_t>(hidden) * 4;
  if (!stage_.first()) {
    // A later pipeline stage: the residual stream (x, and the last layer's output in tmp) from the previous one.
    stage_.input->receive(stageSlot_, {b.x, b.tmp}, streamBytes, device_, device_.stream());
  } else if (!tensorParallel()) {
    launch(fn_.embed, static_cast<int>(p.ntok), 1, 256, weight(embed_), b.tokens, hidden, b.x);
  } else {
    // Vocabulary-parallel embedding: each rank writes the rows it holds, zeros elsewhere; the sum is the embedding.
    launch(fn_.embedShard, static_cast<int>(p.ntok), 1, 256, weight(embed_), b.tokens, hidden, shard_.vocabStart,
           shard_.vocabRows, b.x);
    allReduce(b.x, p.ntok);
  }
  for (int l = 0; l < local_.numLayers; ++l) {  // this stage's layers (all of them without pipeline stages)
    if (!capturing && aborted_.load()) {
      device_.driver().cuStreamSynchronize(device_.stream());
      throw Aborted("the model was disposed during a forward pass");
    }
    enqueueDenseLayer(l, p, b);
  }
  if (!stage_.last()) {
    stage_.output->send(stageSlot_, {b.x, b.tmp}, streamBytes, device_, device_.stream());
    return;
  }
  const CUdeviceptr lastRows = b.lastRows;
  const CUdeviceptr lastDelta = downAddsIntoX(p, local_.numLayers - 1) ? 0 : b.tmp;
  launch(elementwise2_ ? fn_.addRmsNorm2 : fn_.addRmsNorm, static_cast<unsigned>(p.nseq), 1, nt, b.x, lastDelta,
         weight(finalNorm_), hidden, eps, lastRows, b.last);
  if (!tensorParallel()) {
    gemm(b.last, static_cast<int>(p.nseq), hidden, weight(lmHead_), c.vocabSize, b.logits);
  } else {
    // Vocabulary-parallel lm_head: each rank's columns of the logits, gathered side by side in rank order.
    if (shard_.vocabRows > 0) gemm(b.last, static_cast<int>(p.nseq), hidden, weight(lmHead_), shard_.vocabRows, b.rankLogits);
    tp_->allGatherColumns(b.rankLogits, p.nseq, vocabRowsPerRank_, b.logits, device_.stream());
  }
}

CUdeviceptr CudaLlama::runModel(const ForwardInput& in, size_t extraDevice, size_t extraHost, CUdeviceptr& extraDev,
                                uint8_t*& extraHostPtr) {
  if (aborted_.load() || released_) throw Aborted("the model was disposed");
  if (!weights_) throw NativeError("TANDEM_INTERNAL", "the GPU model runner was not initialised");
  auto missing = missingWeights();
  if (!missing.empty())
    throw BadInput(std::to_string(missing.size()) + " weight tensor(s) not set, first '" + missing[0] + "'");
  const BatchPlan plan = planBatch(in, extraDevice, extraHost);
  if (plan.nseq == 0) {
    extraDev = 0;
    extraHostPtr = nullptr;
    return 0;
  }
  if (grouped()) {
    // A rank that fails here would leave the others waiting in a collective: break the group so that they stop too.
    try {
      const BatchBuffers b = uploadBatch(plan);
      enqueuePass(plan, b, false);
      extraDev = b.extra;
      extraHostPtr = static_cast<uint8_t*>(pinned_) + plan.hostExtraAt;
      return b.logits;
    } catch (const std::exception& e) {
      tp_->abort(std::string("rank ") + std::to_string(shard_.rank) + " failed: " + e.what());
      throw;
    }
  }
  const BatchBuffers b = uploadBatch(plan);
  CUstream stream = device_.stream();
  if (cudaGraphs_ && plan.ntok == plan.nseq) {
    // Decode: replay the pass captured for this shape (kernel arguments are baked in: scratch addresses, sizes).
    graphs_.keepOnlyGeneration(scratchGeneration_);
    const DecodeGraphCache::Key key{plan.nseq, plan.maxBlocks};
    CUgraphExec exec = graphs_.find(key);
    if (!exec) {
      prepareGemms(plan, b);  // no cuBLASLt set-up while capturing
      try {
        exec = graphs_.capture(key, stream, [&] { enqueuePass(plan, b, true); });
      } catch (const NativeError& e) {
        // Something in the pass cannot be captured here: run eagerly from now on, and say why (graphsReason()).
        cudaGraphs_ = false;
        {
          std::lock_guard<std::mutex> lock(slotsMutex_);
          graphsReason_ = e.what();
        }
        enqueuePass(plan, b, false);
      }
    }
    if (exec) graphs_.launch(exec, stream);
  } else {
    enqueuePass(plan, b, false);
  }
  extraDev = b.extra;
  extraHostPtr = static_cast<uint8_t*>(pinned_) + plan.hostExtraAt;
  return b.logits;
}

void CudaLlama::setStageSlot(int slot) {
  if (slot < 0 || slot >= StageChannel::kMaxSlots)
    throw BadInput("micro-batch slot " + std::to_string(slot) + " is not one of 0.." +
                   std::to_string(StageChannel::kMaxSlots - 1));
  stageSlot_ = slot;
}

std::vector<float> CudaLlama::forward(const ForwardInput& in) {
  if (!stage_.last())
    throw BadInput("pipeline stage " + std::to_string(stage_.stage) + " computes no logits (the last stage does): "
                   "run its passes with forwardWithoutLogits");
  const size_t nseq = in.seqStarts.empty() ? 0 : in.seqStarts.size() - 1, vocab = config_.vocabSize;
  CUdeviceptr extraDev = 0;
  uint8_t* host = nullptr;
  CUdeviceptr logits = runModel(in, 0, nseq * vocab * 4, extraDev, host);
  if (nseq == 0) return {};
  const CudaDriver& d = device_.driver();
  check(d.cuMemcpyDtoHAsync(host, logits, nseq * vocab * 4, device_.stream()), "cuMemcpyDtoHAsync (logits)");
  check(d.cuStreamSynchronize(device_.stream()), "forward pass");
  std::vector<float> out(nseq * vocab);
  std::memcpy(out.data(), host, out.size() * 4);
  return out;
}

void CudaLlama::forwardWithoutLogits(const ForwardInput& in) {
  CUdeviceptr extraDev = 0;
  uint8_t* host = nullptr;
  runModel(in, 0, 0, extraDev, host);
  check(device_.driver().cuStreamSynchronize(device_.stream()), "forward pass");
}

SampledRows CudaLlama::forwardSampled(const ForwardInput& in, const SamplePlan& plan) {
  if (!stage_.last())
    throw BadInput("pipeline stage " + std::to_string(stage_.stage) + " computes no logits (the last stage does): "
                   "run its passes with forwardWithoutLogits");
  const size_t nseq = in.seqStarts.empty() ? 0 : in.seqStarts.size() - 1, vocab = config_.vocabSize;
  if (plan.n.size() != nseq || plan.flags.size() != nseq || plan.invT.size() != nseq || plan.topP.size() != nseq ||
      plan.u.size() != nseq)
    throw BadInput("the sampling plan has " + std::to_string(plan.n.size()) + " rows; the batch has " +
                   std::to_string(nseq) + " sequences");
  int32_t maxN = 1;
  for (size_t r = 0; r < nseq; ++r) {
    if (plan.n[r] < 0 || plan.n[r] > kSampleMaxCandidates)
      throw BadInput("sampling plan row " + std::to_string(r) + ": candidates must be 0.." +
                     std::to_string(kSampleMaxCandidates) + " (got " + std::to_string(plan.n[r]) + ")");
    if (!(plan.invT[r] >= 0) || !std::isfinite(plan.invT[r]) || !(plan.topP[r] > 0 && plan.topP[r] <= 1) ||
        !(plan.u[r] >= 0 && plan.u[r] < 1))
      throw BadInput("sampling plan row " + std::to_string(r) + ": invT must be finite >= 0, topP in (0, 1], u in [0, 1)");
    maxN = std::max(maxN, plan.n[r]);
  }
  const size_t chunks = (vocab + kSampleChunk - 1) / kSampleChunk;
  if (chunks * static_cast<size_t>(maxN) > kSampleMerge)
    throw BadInput("a vocabulary of " + std::to_string(vocab) + " allows at most " +
                   std::to_string(kSampleMerge / chunks) + " sampling candidates per row");
  SampledRows out;
  out.nseq = nseq;
  out.maxN = static_cast<size_t>(maxN);
  // Device: plan (n, flags, invT, topP as 4-byte values; u), candidates of pass 1, the outputs.
  Carver carve;
  size_t oPlan = carve.take(nseq * 8), oDoubles = carve.take(nseq * 24);
  size_t oCandV = carve.take(nseq * chunks * maxN * 4), oCandI = carve.take(nseq * chunks * maxN * 4);
  size_t oTopV = carve.take(nseq * maxN * 4), oTopI = carve.take(nseq * maxN * 4);
  size_t oInts = carve.take(nseq * 16), oDbl = carve.take(nseq * 32);
  // Host: the plan going up, the outputs coming back (contiguous from oTopV), whole rows after.
  size_t outBytes = oDbl + nseq * 32 - oTopV;
  size_t hPlan = 0, hOut = alignUp(nseq * 32), hFull = hOut + alignUp(outBytes);
  size_t fullCap = 0;
  for (size_t r = 0; r < nseq; ++r)
    if (plan.n[r] > 0 && (plan.flags[r] & (kSampleFullRow | kSampleTopP))) ++fullCap;
  CUdeviceptr dev = 0;
  uint8_t* host = nullptr;
  CUdeviceptr logits = runModel(in, carve.used, hFull + fullCap * vocab * 4, dev, host);
  if (nseq == 0) return out;
  const CudaDriver& d = device_.driver();
  CUstream stream = device_.stream();

  uint8_t* hp = host + hPlan;
  std::memcpy(hp, plan.n.data(), nseq * 4);
  std::memcpy(hp + nseq * 4, plan.flags.data(), nseq * 4);
  std::memcpy(hp + nseq * 8, plan.invT.data(), nseq * 8);
  std::memcpy(hp + nseq * 16, plan.topP.data(), nseq * 8);
  std::memcpy(hp + nseq * 24, plan.u.data(), nseq * 8);
  check(d.cuMemcpyHtoDAsync(dev + oPlan, hp, nseq * 8, stream), "cuMemcpyHtoDAsync (sampling plan)");
  check(d.cuMemcpyHtoDAsync(dev + oDoubles, hp + nseq * 8, nseq * 24, stream), "cuMemcpyHtoDAsync (sampling plan)");
  CUdeviceptr dN = dev + oPlan, dFlags = dN + nseq * 4;
  CUdeviceptr dInvT = dev + oDoubles, dTopP = dInvT + nseq * 8, dU = dTopP + nseq * 8, candV = dev + oCandV, candI = dev + oCandI, topV = dev + oTopV, topI = dev + oTopI;
  CUdeviceptr ints = dev + oInts, dbl = dev + oDbl;
  const int V = static_cast<int>(vocab), ichunks = static_cast<int>(chunks);
  launch(fn_.sampleChunkTop, static_cast<unsigned>(nseq), static_cast<unsigned>(chunks), kSampleThreads, logits, V, dN,
         maxN, candV, candI);
  launch(fn_.sampleFinish, static_cast<unsigned>(nseq), 1, kSampleThreads, logits, V, ichunks, maxN, candV, candI, dN,
         dFlags, dInvT, dTopP, dU, topV, topI, ints, dbl);
  check(d.cuMemcpyDtoHAsync(host + hOut, topV, outBytes, stream), "cuMemcpyDtoHAsync (sampling)");
  check(d.cuStreamSynchronize(stream), "forward pass");
  const uint8_t* ho = host + hOut;
  out.topLogits.resize(nseq * maxN);
  out.topIds.resize(nseq * maxN);
  out.ints.resize(nseq * 4);
  out.dbl.resize(nseq * 4);
  std::memcpy(out.topLogits.data(), ho, nseq * maxN * 4);
  std::memcpy(out.topIds.data(), ho + (oTopI - oTopV), nseq * maxN * 4);
  std::memcpy(out.ints.data(), ho + (oInts - oTopV), nseq * 16);
  std::memcpy(out.dbl.data(), ho + (oDbl - oTopV), nseq * 32);

  for (size_t r = 0; r < nseq; ++r)
    if (plan.n[r] > 0 && ((plan.flags[r] & kSampleFullRow) || out.ints[r * 4 + 2])) out.fullRows.push_back(static_cast<int32_t>(r));
  if (!out.fullRows.empty()) {
    for (size_t i = 0; i < out.fullRows.size(); ++i)
      check(d.cuMemcpyDtoHAsync(host + hFull + i * vocab * 4, logits + static_cast<size_t>(out.fullRows[i]) * vocab * 4,
                                vocab * 4, stream),
            "cuMemcpyDtoHAsync (logits rows)");
    check(d.cuStreamSynchronize(stream), "cuStreamSynchronize (logits rows)");
    out.full.resize(out.fullRows.size() * vocab);
    std::memcpy(out.full.data(), host + hFull, out.full.size() * 4);
  }
  return out;
}

}  // namespace tandem::engine
