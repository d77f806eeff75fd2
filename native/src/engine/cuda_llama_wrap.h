// CudaLlama as seen from JavaScript (lib/engine/cuda.ts wraps it). Its work runs on the CudaDevice's thread
// and stream; it holds references to the device and to the KV pool's DeviceBuffer so that both outlive it.
#pragma once

#include <napi.h>

#include <memory>

#include "../addon_state.h"
#include "../cuda_device.h"
#include "cuda_llama.h"
#include "cuda_llama_nccl.h"

namespace tandem::engine {

// new CudaTpGroup(size, options?): the ranks of one tensor-parallel runner group. Each rank is a CudaLlama built
// with { tp: { group, rank } } on its own CudaDevice (its own thread and stream). Without options (or with
// { communicator: 'local' }) every rank is on the same device ordinal (LocalTpGroup in cuda_llama_tp.h); with
// { communicator: 'nccl', nccl: string[] (library candidates), timeoutMs } each rank is on its own GPU and the
// ranks talk through NCCL (NcclTpGroup in cuda_llama_nccl.h; the unique id is made here). Holds no GPU memory.
class CudaTpGroupWrap : public Napi::ObjectWrap<CudaTpGroupWrap> {
 public:
  static void Init(Napi::Env env, Napi::Object exports);
  explicit CudaTpGroupWrap(const Napi::CallbackInfo& info);
  // Rank `rank`'s communicator when `value` is a CudaTpGroup (BadInput for a rank out of range), else null.
  static std::shared_ptr<TpCommunicator> communicatorOf(Napi::Env env, const Napi::Value& value, int rank);
  // The group's size when `value` is a CudaTpGroup, else 0.
  static int sizeOf(Napi::Env env, const Napi::Value& value);

 private:
  Napi::Value GetSize(const Napi::CallbackInfo& info);
  Napi::Value GetCommunicator(const Napi::CallbackInfo& info);
  int size() const { return local_ ? local_->size() : nccl_ ? nccl_->size() : 0; }
  std::shared_ptr<LocalTpGroup> local_;  // exactly one of these two
  std::shared_ptr<NcclTpGroup> nccl_;
};

// new CudaStageChannel(): hands micro-batches' hidden states from one pipeline stage's rank to the next stage's on one
// CUDA device (LocalStageChannel in cuda_llama_pp.h): a CudaLlama built with { pp: { ..., output: channel } } sends,
// the next stage's with { pp: { ..., input: channel } } receives. Holds GPU memory only while stages use it.
class CudaStageChannelWrap : public Napi::ObjectWrap<CudaStageChannelWrap> {
 public:
  static void Init(Napi::Env env, Napi::Object exports);
  explicit CudaStageChannelWrap(const Napi::CallbackInfo& info);
  // The channel of a JS value when it is a CudaStageChannel, else null.
  static std::shared_ptr<StageChannel> channelOf(Napi::Env env, const Napi::Value& value);

 private:
  std::shared_ptr<StageChannel> channel_;
};

class CudaLlamaWrap : public Napi::ObjectWrap<CudaLlamaWrap>, public Closeable {
 public:
  static void Init(Napi::Env env, Napi::Object exports);
  // new CudaLlama(device, { ...ModelConfig fields, numBlocks, blockSize, layout, kvBuffer: DeviceBuffer,
  //                         cublas: string[] (library candidates), tp?: { group: CudaTpGroup, rank },
  //                         ep?: { size, redundantSlots, replicatedAttention } (MoE: expert parallel over tp's
  //                         group, size = its size or 1; cuda_moe.h),
  //                         pp?: { stage, size, layerStart, layerCount, input?, output?: CudaStageChannel } })
  explicit CudaLlamaWrap(const Napi::CallbackInfo& info);
  ~CudaLlamaWrap() override;

  // Stops forward passes and frees the weights and activations on the device thread. Idempotent.
  void close() override;

 private:
  WorkQueue& liveQueue(Napi::Env env);
  Napi::Value InitModel(const Napi::CallbackInfo& info);
  Napi::Value SetWeight(const Napi::CallbackInfo& info);
  Napi::Value FillDummy(const Napi::CallbackInfo& info);
  Napi::Value LoadFromFile(const Napi::CallbackInfo& info);
  Napi::Value ReadWeight(const Napi::CallbackInfo& info);
  Napi::Value MissingWeights(const Napi::CallbackInfo& info);
  Napi::Value Ready(const Napi::CallbackInfo& info);
  Napi::Value Forward(const Napi::CallbackInfo& info);
  Napi::Value ForwardSampled(const Napi::CallbackInfo& info);
  Napi::Value ForwardWithoutLogits(const Napi::CallbackInfo& info);
  Napi::Value CheckForward(const Napi::CallbackInfo& info);
  Napi::Value TakeCollectiveTime(const Napi::CallbackInfo& info);
  Napi::Value GetTensorParallel(const Napi::CallbackInfo& info);
  Napi::Value Holds(const Napi::CallbackInfo& info);
  Napi::Value ExpertPlacement(const Napi::CallbackInfo& info);
  Napi::Value ExpertSlotAddress(const Napi::CallbackInfo& info);
  Napi::Value StageExperts(const Napi::CallbackInfo& info);
  Napi::Value CommitExperts(const Napi::CallbackInfo& info);
  Napi::Value TakeExpertLoad(const Napi::CallbackInfo& info);
  Napi::Value Dispose(const Napi::CallbackInfo& info);
  Napi::Value GetWeightBytes(const Napi::CallbackInfo& info);
  Napi::Value GetDisposed(const Napi::CallbackInfo& info);
  Napi::Value GetCudaGraphs(const Napi::CallbackInfo& info);
  Napi::Value GetAttentionKernels(const Napi::CallbackInfo& info);
  Napi::Value GetDecodeAttention(const Napi::CallbackInfo& info);
  Napi::Value GetGemvMaxBatch(const Napi::CallbackInfo& info);
  Napi::Value GetGemmPath(const Napi::CallbackInfo& info);
  Napi::Value GetGemmTuning(const Napi::CallbackInfo& info);

  std::shared_ptr<CudaLlama> model_;
  std::shared_ptr<TpCommunicator> tp_;  // the model's communicator (null for one rank), for its timing
  CudaDevice* device_ = nullptr;
  Napi::ObjectReference deviceRef_, kvBufferRef_;
  std::shared_ptr<DeviceAllocation> kvAllocation_;
  bool disposed_ = false;
};

}  // namespace tandem::engine
