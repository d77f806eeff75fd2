// The reference engine's GPU model: the same Llama-family decoder as CpuLlama (llama_common.h), in bf16 with
// fp32 accumulation. GEMMs go through cuBLASLt (or cublasGemmEx: TANDEM_GEMM; both dlopened, cublas.h), those
// of a small batch (decode) through Tandem's skinny GEMM (native/kernels/gemv.cu); embedding, fused residual + RMSNorm, RoPE
// with the KV write, paged attention and SwiGLU are Tandem's kernels (native/kernels/llama.cu). The KV pool
// is caller-owned device memory in lib/kv's layout (bf16, NHD), so a worker can register it with the
// transfer agent and move blocks to another GPU.
//
// Every method but the constructor, slot checks and abort() runs on the owning CudaDevice's thread, where its
// context is current; the kernels run on that device's stream.
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "../cuda_device.h"
#include "cublas.h"
#include "cuda_llama_graphs.h"
#include "cuda_llama_pp.h"
#include "cuda_llama_tp.h"
#include "cuda_moe.h"
#include "llama_common.h"

namespace tandem::engine {

struct GpuKvPool {
  CUdeviceptr base = 0;
  size_t bytes = 0;
  int numBlocks = 0;
  int blockSize = 0;
  KvLayout layout = KvLayout::BlockMajor;
};

// What the sampler (lib/engine/sampler.ts) needs from each row of logits, per row: n best candidates (0: skip
// the row), flags (kSample* below), 1 / temperature, top-p and the uniform for the plain draw.
struct SamplePlan {
  std::vector<int32_t> n, flags;
  std::vector<double> invT, topP, u;
};
constexpr int32_t kSampleLse = 1, kSampleExpSum = 2, kSamplePlain = 4, kSampleTopP = 8, kSampleFullRow = 16;
// The largest n a plan may ask for.
constexpr int32_t kSampleMaxCandidates = 64;

struct SampledRows {
  size_t nseq = 0, maxN = 0;
  std::vector<int32_t> ints;       // nseq x 4: best id, drawn id (plain), needs the whole row (top-p), 0
  std::vector<double> dbl;         // nseq x 4: max logit, sum exp((l - max) / T), log-sum-exp, drawn logit
  std::vector<int32_t> topIds;     // nseq x maxN, best first (-1 past the last)
  std::vector<float> topLogits;    // nseq x maxN
  std::vector<int32_t> fullRows;   // rows whose whole logits follow (asked with kSampleFullRow, or top-p short)
  std::vector<float> full;         // fullRows.size() x vocab
};

class CudaLlama {
 public:
  // Any thread: checks the config and the pool's size, lays the weights out. Throws BadInput.
  // cudaGraphs: decode steps (one token per sequence) replay a CUDA graph captured once per (sequences,
  // blocks per sequence) instead of issuing their ~10 launches per layer one by one.
  // cublasLt may be unavailable: GEMMs then go through cublasGemmEx.
  // tp (issue 25): this runner is one tensor-parallel rank of tp->size() (cuda_llama_tp.h): it holds its slice of
  // every sharded tensor (tensor names and element counts are then the slice's), its kv heads in `pool`, and calls
  // tp's collectives in its layer step. Null: the whole model (one rank). With several ranks decode steps run
  // eagerly (graphsReason() says why).
  // experts (issue 28, MoE configs): expert parallelism over the communicator's group (experts.ranks its size,
  // experts.rank the communicator's rank; cuda_moe.h): this rank holds its experts' tensors only (holds()), and the
  // MoE output is summed over the group. replicatedAttention: attention, embedding and lm_head whole on every rank
  // (tp 1 beside ep) instead of split over the group (tp = ep). Redundant slots need no group (one rank: replicas
  // within it).
  // pp (issue 25, cuda_llama_pp.h): this runner is one pipeline stage: it holds that stage's layers (its KV pool too:
  // `pool` has layerCount layers), the embedding only on the first stage and the final norm and lm_head only on the
  // last; a later stage takes its input from pp.input, an earlier one hands its hidden state to pp.output instead of
  // computing logits. Null (size 1): the whole model. With several stages decode steps run eagerly.
  CudaLlama(CudaDevice& device, const CublasApi& cublas, const CublasLtApi& cublasLt, const LlamaConfig& config,
            const GpuKvPool& pool, bool cudaGraphs = true, std::shared_ptr<TpCommunicator> tp = nullptr,
            const ExpertLayout& experts = {}, bool replicatedAttention = false, const PpStage* pp = nullptr);
  ~CudaLlama();
  CudaLlama(const CudaLlama&) = delete;
  CudaLlama& operator=(const CudaLlama&) = delete;

  // Device thread: the cuBLAS handle, the weights' memory, the kernels. Throws NativeError.
  void init();
  // Device thread: frees everything init() and forward() allocated. Idempotent; afterwards forward() throws.
  void release();

  // Any thread: the element count a tensor must have; throws BadInput naming it when it is not one of this
  // model's tensors or `count` differs.
  void checkWeight(const std::string& name, size_t count) const;
  // Any thread: the element count of one of this model's tensors; throws BadInput naming an unknown one.
  size_t elementsOf(const std::string& name) const { return slotOf(name).count; }
  // Device thread: converts fp32 to bf16 (round to nearest even) and copies it to the tensor's place (this rank's
  // slice: the caller slices; `count` is the slice's).
  void setWeight(const std::string& name, const float* data, size_t count);
  // Device thread: fills the tensor in place with dummy values (native/kernels/dummy_init.cu, the same values
  // lib/engine/model/dummy.ts generates): all ones, or uniform rows seeded with (key0, key1, key2, row). A tensor-
  // parallel rank generates its slice of the same whole tensor.
  void fillDummy(const std::string& name, bool ones, uint32_t key0, uint32_t key1, uint32_t key2, double width);
  // One tensor of a safetensors file for loadFromFile: where its data is and how it is stored.
  enum class FileDtype { BF16, F16, F32 };
  struct FileTensor {
    std::string name;
    uint64_t offset = 0;  // absolute byte offset in the file
    uint64_t bytes = 0;
    FileDtype dtype = FileDtype::BF16;
  };
  // Any thread: throws BadInput naming a tensor that is not this model's or whose byte size does not match (the whole
  // tensor's, also on a tensor-parallel rank, which reads its slice of it).
  void checkFileTensor(const FileTensor& t) const;
  // Device thread: reads the tensors from the open file `fd` with large sequential reads (consecutive tensors in
  // one read, up to kFileChunkBytes) into two pinned staging buffers, copying one to the GPU while the next is
  // read. BF16 goes to the GPU as read; F16 and F32 are rounded to bf16 on the host first. *bytesDone (when
  // given) counts file bytes done, for progress (written from this thread, read by JavaScript's).
  void loadFromFile(int fd, std::vector<FileTensor> tensors, double* bytesDone);
  // Device thread: the tensor's bf16 bit patterns as they are on the GPU (tests compare them with the host's).
  std::vector<uint16_t> readWeight(const std::string& name);
  std::vector<std::string> missingWeights() const;
  size_t weightBytes() const { return weightBytes_; }
  // Whether decode steps replay CUDA graphs; when capture failed, why (and they run eagerly).
  bool graphsActive() const { return cudaGraphs_; }
  // Whether attention runs through the flash kernels (set by init()), and whether through the second ones.
  bool flashAttention() const { return flash_; }
  bool flash2Attention() const { return flash2_; }
  // Within flash2: whether prefill runs tandem_flash_prefill3 (the default) instead of _prefill2
  // (TANDEM_ATTENTION=prefill2, or a fatbin without prefill3).
  bool prefill3Attention() const { return prefill3_; }
  // The decode kernel a step with `rows` decode rows runs (within flash_): 1, 2, 3 = tandem_flash_decode,
  // _decode2, _decode3 (cuda_llama.cpp, kFlash2DecodeMaxRows and TANDEM_ATTENTION=decode<n>).
  int decodeKernel(size_t rows) const;
  static size_t decode2MaxRows();
  static size_t decode3MaxRows();
  // GEMMs with at most this many rows of x run through gemv.cu's kernels, larger ones through cuBLAS (0: all
  // through cuBLAS, TANDEM_GEMV=off). Set by init().
  int gemvMaxBatch() const { return gemvMaxBatch_; }
  // The GEMMs above the GEMV: "lt" (cublasLtMatmul, heuristic algorithm per shape) or "gemmex" (cublasGemmEx,
  // CUBLAS_GEMM_DEFAULT). TANDEM_GEMM=lt|gemmex; by default lt where libcublasLt loads. Set by init().
  std::string gemmPath() const { return gemmLt_ ? "lt" : "gemmex"; }
  // cuBLASLt autotuning (TANDEM_GEMM_TUNE, on by default on the lt path): each new GEMM shape's top
  // kGemmTuneCandidates heuristic algorithms are timed on the stream the first time the shape runs eagerly (or in
  // prepareGemms before a decode-graph capture) and the fastest is kept, until kGemmTuneBudgetMs of tuning have
  // been spent; a shape another runner of the process tuned on this device takes that one's choice (cublas.h's
  // tunedAlgo). gateUpBf16: the dense gate_up GEMM writes bf16 (TANDEM_GATEUP_BF16, on by default). Set by
  // init(). shapes: shapes running a tuned algorithm so far (timed here or taken from another runner); ms: this
  // runner's time spent timing them.
  struct GemmTuning {
    bool tune = false, gateUpBf16 = false;
    int shapes = 0;
    double ms = 0;
  };
  GemmTuning gemmTuning() const {
    return {gemmTune_.load(), gateUpBf16_.load(), gemmTunedShapes_.load(), gemmTuneMs_.load()};
  }
  std::string graphsReason() const {
    std::lock_guard<std::mutex> lock(slotsMutex_);
    return graphsReason_;
  }

  // Any thread: throws BadInput when forward() would refuse the batch (validateForward), without running it. A
  // pipeline checks a whole step this way before it runs any micro-batch, so a bad step writes no KV anywhere.
  void checkForward(const ForwardInput& in) const { validateForward(config_, pool_.numBlocks, pool_.blockSize, in); }
  // Device thread: as CpuLlama::forward (same validation, same contract), on the GPU.
  std::vector<float> forward(const ForwardInput& in);
  // Device thread: the pass with no logits coming back: a tensor-parallel rank other than the one whose logits are
  // used runs this while that one runs forward() or forwardSampled() (every rank's pass calls the same collectives).
  void forwardWithoutLogits(const ForwardInput& in);
  // This rank's part of the model (the whole model for a single rank).
  const TpShard& tpShard() const { return shard_; }
  // Any thread: whether this rank holds the tensor (an expert-parallel rank holds its own experts only).
  bool holds(const std::string& name) const { return slots_.count(name) > 0; }
  // MoE configs (BadInput otherwise), device thread where noted; CudaMoe's methods of the same names:
  // the placement in force, a slot's weight addresses, the two phases of a placement change, the load counters.
  const CudaMoe& moe() const;
  std::pair<CUdeviceptr, CUdeviceptr> expertSlotAddress(int layer, int slot) const;
  void stageExperts(const std::vector<std::pair<CUdeviceptr, CUdeviceptr>>& sources);
  ExpertCopyStats commitExperts(const std::vector<std::pair<int, int>>& dests,
                                std::vector<std::vector<int32_t>> slotExpert);
  CudaMoe::Load takeExpertLoad();
  // The pipeline stage this runner holds (stage 0 of 1, every layer, without pipeline parallelism).
  const PpStage& ppStage() const { return stage_; }
  // Device thread: the micro-batch slot of the stage channels that the next pass sends to and receives from
  // (lib/engine/cuda-pipeline.ts sets it before each pass of a micro-batch). Throws BadInput out of range.
  void setStageSlot(int slot);
  // Device thread: the same pass, then the sampling kernels over the logits; only what `plan` asks for comes
  // back to the host. Throws BadInput on a malformed plan.
  SampledRows forwardSampled(const ForwardInput& in, const SamplePlan& plan);
  void abort() {
    aborted_.store(true);
    if (tp_) tp_->abort("a rank's model was disposed");
  }

 private:
  struct Slot {
    size_t offset;  // bytes into the weights allocation
    size_t count;   // elements this rank holds: rows x cols
    size_t rows;    // 1 for a 1-D tensor
    size_t cols;
    // The whole tensor (fullRows 1 for a 1-D tensor) and where this rank's slice starts in it.
    size_t fullRows, fullCols, rowStart, colStart;
    std::string shape;
    bool set = false;
    bool whole() const { return rows == fullRows && cols == fullCols; }
  };
  // A rank's part of a [fullRows, fullCols] tensor (fullRows 0: a 1-D tensor of fullCols).
  struct SliceOf {
    size_t fullRows, fullCols, rowStart, rows, colStart, cols;
  };
  struct LayerOffsets {
    size_t inputNorm, postNorm, wqkv, bqkv, wo, bo, wgateUp, wdown;
    size_t qNorm, kNorm;  // Qwen3's per-head q/k RMSNorm weights, where config.qkNorm
  };

  // Batch set-up, host side: what one pass uploads (token ids, positions, per-token sequence and KV block, block
  // tables, last rows, the flash-attention plan), its kernels' launch geometry and where each activation lies in
  // the scratch allocation (offsets; bound to addresses by bindBatch once the scratch is large enough).
  struct BatchPlan {
    size_t ntok = 0, nseq = 0;
    int maxBlocks = 0;            // blocks per sequence in the block tables
    std::vector<int32_t> ints;    // uploaded as one copy; the offsets below are into it, in int32 units
    size_t tilesAt = 0, decodeAt = 0;
    size_t flashTiles = 0, decodeRows = 0;
    int splits = 1, keysPerSplit = 0;
    bool flash2 = false;
    int decodeKernel = 0;  // decode rows' attention: 1, 2, 3 = tandem_flash_decode, _decode2, _decode3
    // o_proj and down add their product into the residual stream x themselves (gemmAdd), instead of writing b.tmp
    // for the next norm to add: residualGemm_, one rank, and a batch above the GEMV (see downAddsIntoX).
    bool residualInGemm = false;
    // Scratch (device) byte offsets, and its size; host: the staging offset of the caller's extra bytes.
    size_t oInts = 0, oX = 0, oTmp = 0, oXn = 0, oQkv = 0, oAttn = 0, oGateUp = 0, oAct = 0, oLast = 0, oLogits = 0;
    size_t oPartial = 0, oExtra = 0, deviceBytes = 0, hostExtraAt = 0, hostBytes = 0;
    size_t oRankLogits = 0;  // tensor parallel: this rank's vocabulary columns before the gather
    size_t oMoe = 0;         // the MoE FFN's activations (CudaMoe::scratchBytes), for an MoE config
  };
  // A planned batch's device addresses in the current scratch allocation.
  struct BatchBuffers {
    CUdeviceptr tokens, positions, tokenSeqs, tokenBlocks, tables, lastRows, flashTiles, decodeRows;
    CUdeviceptr x, tmp, xn, qkv, attn, gateUp, act, last, logits, partial, extra, rankLogits, moe;
  };
  // Validates the batch and plans it (no device work). extraDevice / extraHost bytes are reserved after the
  // pass's own scratch and staging.
  BatchPlan planBatch(const ForwardInput& in, size_t extraDevice, size_t extraHost) const;
  // Grows the scratch for `plan` and copies its ints to the device (on the stream); the buffers' addresses.
  BatchBuffers uploadBatch(const BatchPlan& plan);
  // Validates and runs the model on the stream (not synchronised); returns the logits' device address
  // (nseq x vocab fp32). extraDevice / extraHost bytes are reserved after the pass's own scratch and
  // staging and returned through the last two arguments.
  CUdeviceptr runModel(const ForwardInput& in, size_t extraDevice, size_t extraHost, CUdeviceptr& extraDev,
                       uint8_t*& extraHostPtr);
  // One pass on the stream (eager, or while capturing a decode graph): embedding, the layers, final norm, lm_head.
  void enqueuePass(const BatchPlan& plan, const BatchBuffers& b, bool capturing);
  // The layer step of the Llama / Qwen2 decoder: input norm (+ the previous layer's residual), QKV GEMM (+ bias),
  // Qwen3's q/k norm where the config has it, RoPE with the KV write, attention, o_proj (+ bias), residual + post
  // norm, gate/up with SwiGLU, down (an MoE config: moe_'s FFN in their place). Leaves the layer's output in b.tmp
  // for the next step's residual add, or already added to b.x (downAddsIntoX).
  void enqueueDenseLayer(int layer, const BatchPlan& plan, const BatchBuffers& b);
  size_t place(size_t count);  // reserves count bf16 values in the weights allocation, 256-byte aligned
  void addSlot(const std::string& name, size_t offset, const SliceOf& slice);
  // The sharded (Megatron) step: attention and the dense FFN split over the ranks. Not for expert-parallel ranks
  // beside one tensor-parallel rank (attention replicated); also for an NCCL group of one rank (runsAlone).
  bool tensorParallel() const { return shard_.size > 1 || (tp_ && tp_->runsAlone()); }
  // Ranks share collectives (tensor or expert parallel, or an NCCL group of one): passes run eagerly, a failing rank
  // breaks the group.
  bool grouped() const { return tp_ && (tp_->size() > 1 || tp_->runsAlone()); }
  bool pipelineParallel() const { return stage_.size > 1; }
  // Sums a [tokens, hidden] fp32 buffer over the tensor-parallel ranks (nothing with one rank).
  void allReduce(CUdeviceptr buf, size_t tokens);
  const Slot& slotOf(const std::string& name) const;  // throws BadInput naming an unknown tensor
  void markSet(const std::string& name);
  CUdeviceptr weight(size_t offset) const { return weights_->ptr + offset; }
  void ensureScratch(size_t deviceBytes, size_t hostBytes);
  // y in fp32 (kCudaR32F) or bf16 (kCudaR16BF, above the GEMV only: gemv.cu writes fp32).
  void gemm(CUdeviceptr x, int m, int k, CUdeviceptr w, int n, CUdeviceptr y, int yType = kCudaR32F);
  // y[m, n] += x . w^T in fp32 (cuBLASLt's C = D = y with beta 1, or cublasGemmEx's), for m above the GEMV only.
  // Autotuning of a shape new to lt_ writes `scratch` (m x n fp32), never y.
  void gemmAdd(CUdeviceptr x, int m, int k, CUdeviceptr w, int n, CUdeviceptr y, CUdeviceptr scratch);
  // The cuBLAS product behind both: y = x . w^T + beta * y; tuning of a new shape writes tuneY.
  void matmul(CUdeviceptr x, int m, int k, CUdeviceptr w, int n, CUdeviceptr y, int yType, float beta,
              CUdeviceptr tuneY);
  // Whether layer `layer`'s down_proj added into x (plan.residualInGemm; not for an MoE FFN, which leaves its output
  // in b.tmp, nor for the last layer of a pipeline stage that hands {x, tmp} to the next).
  bool downAddsIntoX(const BatchPlan& plan, int layer) const;
  // Times the heuristic's top algorithms for a shape new to lt_ on these buffers (y is overwritten) and keeps the
  // fastest; nothing when tuning is off, the budget is spent or the heuristic offers one. Eager stream only: it
  // synchronises on events.
  void tuneGemm(CUdeviceptr x, int m, int k, CUdeviceptr w, int n, CUdeviceptr y, int yType);
  // Chooses (and tunes, on the batch's own buffers) cuBLASLt's algorithms for a pass's GEMM shapes ahead of a
  // decode-graph capture, so that only stream work happens while capturing. No-op on the gemmex path.
  void prepareGemms(const BatchPlan& plan, const BatchBuffers& b);
  // act[m, inter] = bf16(silu(gate) * up) of x . wgateUp^T: one fused GEMV launch for small m, else the GEMM into
  // gateUp (bf16 scratch, or fp32 with TANDEM_GATEUP_BF16=0) and tandem_llama_silu_mul(_bf16).
  void gateUpAct(CUdeviceptr x, int m, int k, CUdeviceptr wgateUp, int inter, CUdeviceptr gateUp, CUdeviceptr act);
  template <typename... Args>
  void launch(CUfunction fn, unsigned gridX, unsigned gridY, unsigned block, Args... args);
  // A GEMV kernel (gemv.cu, kGemvThreads threads), with programmatic stream serialization when gemvPdl_.
  template <typename... Args>
  void launchGemv(CUfunction fn, unsigned grid, Args... args);
  template <typename... Args>
  void launch3(CUfunction fn, unsigned gridX, unsigned gridY, unsigned gridZ, unsigned block, unsigned sharedBytes,
               Args... args);
  void check(CUresult r, const char* what) const { device_.check(r, what); }

  CudaDevice& device_;
  const CublasApi& cublas_;
  const CublasLtApi& cublasLt_;
  LlamaConfig config_;
  // This rank's shapes: config_ with its heads, kv heads, intermediate size and vocabulary rows (config_ itself for
  // a single rank). config_ keeps the whole model's (batch checks, logits).
  LlamaConfig local_;
  TpShard shard_;
  std::shared_ptr<TpCommunicator> tp_;
  PpStage stage_;
  int stageSlot_ = 0;  // device thread only
  std::vector<int> vocabRowsPerRank_;
  GpuKvPool pool_;
  size_t qDim_, kvDim_, qkvDim_;
  std::vector<float> invFreq_;

  size_t weightBytes_ = 0;
  size_t embed_ = 0, finalNorm_ = 0, lmHead_ = 0;
  std::vector<LayerOffsets> layers_;
  // The mixture-of-experts FFN (issue 28), in place of the dense one in every layer of an MoE config; null otherwise.
  std::unique_ptr<CudaMoe> moe_;
  std::map<std::string, Slot> slots_;
  std::vector<std::string> order_;
  mutable std::mutex slotsMutex_;  // guards Slot::set and graphsReason_ (written on the device thread, read on JS's)

  // Device thread only:
  cublasHandle handle_ = nullptr;
  // cuBLASLt's GEMMs and their workspace (kLtWorkspaceBytes, allocated by init() when TANDEM_GEMM is lt).
  std::unique_ptr<LtGemm> lt_;
  std::shared_ptr<DeviceAllocation> ltWorkspace_;
  std::atomic<bool> gemmLt_{false};
  std::atomic<bool> gemmTune_{false}, gateUpBf16_{false};  // set by init() (read by gemmTuning() on any thread)
  std::atomic<int> gemmTunedShapes_{0};
  std::atomic<double> gemmTuneMs_{0};
  CUevent tuneEvents_[2] = {nullptr, nullptr};  // created by init() when tuning
  std::shared_ptr<DeviceAllocation> weights_, invFreqMem_, scratch_;
  std::shared_ptr<DeviceAllocation> flash2Counters_;  // tandem_flash_decode2's split counters: zero between launches
  void* pinned_ = nullptr;
  size_t pinnedBytes_ = 0;
  struct {
    CUfunction embed, addRmsNorm, addBias, ropeKv, attention, attentionTiled, siluMul, sampleChunkTop, sampleFinish;
    CUfunction siluMulBf16;  // where gateUpBf16_
    CUfunction flashPrefill, flashDecode, flashCombine;  // attention.cu, for head dims 64 and 128
    CUfunction flash2Prefill, flash2Decode;              // attention.cu's second kernels, where flash2_
    CUfunction flash3Decode;                             // tandem_flash_decode3 (GQA groups 4, 8), where flash2_
    CUfunction flash3Prefill;                            // tandem_flash_prefill3, where prefill3_
    CUfunction dummyUniform, dummyFill, dummySlice;      // dummy_init.cu, looked up on first use
    CUfunction embedShard;                               // tp.cu, with several tensor-parallel ranks
    CUfunction qkNorm;                                   // moe.cu's tandem_qk_rmsnorm, where config.qkNorm
    CUfunction ropeKv2, addRmsNorm2;                     // llama.cu's wide-access kernels, where elementwise2_
  } fn_{};
  // Attention through the flash kernels (attention.cu) where the shape allows and TANDEM_ATTENTION is not
  // `reference`; otherwise through llama.cu's tandem_llama_attention(_tiled).
  std::atomic<bool> flash_{false};
  // Within flash_: the second kernels (tandem_flash_prefill2 / _decode2) where they exist, the GQA group is a power
  // of two up to 8 and TANDEM_ATTENTION is not `flash1`.
  std::atomic<bool> flash2_{false};
  // Within flash2_: prefill through tandem_flash_prefill3 (where the fatbin has it and TANDEM_ATTENTION is not
  // `prefill2`).
  std::atomic<bool> prefill3_{false};
  // TANDEM_ATTENTION=decode1 / decode2 / decode3: every decode step's attention through that decode kernel (where
  // loaded); 0: chosen by rows (planBatch).
  int forcedDecode_ = 0;
  int forcedSplits_ = 0;              // TANDEM_DECODE_SPLITS (0: the planner's)
  bool decodeHeadsFastest_ = true;  // TANDEM_DECODE_GRID: heads (default) or rows
  std::vector<CUfunction> gemv_;        // tandem_gemv_m<m> at index m - 1, m = 1..gemvMaxBatch_
  std::vector<CUfunction> gemvSwiglu_;  // tandem_gemv_swiglu_m<m>, likewise
  std::atomic<int> gemvMaxBatch_{0};
  // TANDEM_GEMV_PDL=1: GEMV kernels start before the kernel ahead of them ends (programmatic dependent launch)
  // and stream their first weights meanwhile. Off by default until measured.
  bool gemvPdl_ = false;
  // TANDEM_ELEMENTWISE=2: every rope_kv and add_rmsnorm launch through tandem_llama_rope_kv2 / _add_rmsnorm2
  // (float4 accesses, one cos / sin per token; llama.cu) where the fatbin has them. Off by default until measured.
  bool elementwise2_ = false;
  // TANDEM_RESIDUAL_GEMM (default 1): o_proj and down add into the residual stream in cuBLASLt's epilogue, and the
  // norms after them read x alone (BatchPlan::residualInGemm); 0 keeps the separate add in tandem_llama_add_rmsnorm.
  bool residualGemm_ = true;
  int multiprocessors_ = 0;
  bool released_ = false;
  std::atomic<bool> cudaGraphs_{true};
  std::string graphsReason_;
  // Decode graphs by (sequences, blocks per sequence), valid for the scratch allocation they were captured on.
  DecodeGraphCache graphs_;
  uint64_t scratchGeneration_ = 0;
  std::atomic<bool> aborted_{false};
};

}  // namespace tandem::engine
