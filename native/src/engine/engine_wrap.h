// CpuLlama as seen from JavaScript (lib/engine/cpu.ts wraps it). It owns the model's weights, a thread on
// which forward passes run one at a time, the model's worker threads, and a reference to the caller's KV
// buffer so that the memory outlives every pass that writes it.
#pragma once

#include <napi.h>

#include <memory>

#include "../addon_state.h"
#include "../work_queue.h"
#include "cpu_llama.h"

namespace tandem::engine {

// Option helpers shared by the runners' wrappers; each throws TANDEM_BAD_ARGUMENT or a TypeError naming the field.
[[noreturn]] void badArgument(Napi::Env env, const std::string& message);
Napi::Value field(const Napi::Object& o, const char* name);
double number(const Napi::Object& o, const char* name);
int positiveInt(const Napi::Object& o, const char* name);
bool flag(const Napi::Object& o, const char* name);
void viewOf(Napi::Env env, const Napi::Value& value, napi_typedarray_type want, void** data, size_t* length,
            const char* what);
std::vector<int32_t> int32s(Napi::Env env, const Napi::Value& value, const char* what);
// KvLayout from 'block-major' / 'layer-major'.
KvLayout parseLayout(const Napi::Object& o);
// tokens, positions, seqStarts, blockTables, maxBlocksPerSeq, contextLens: forward()'s arguments.
std::shared_ptr<ForwardInput> parseForwardInput(const Napi::CallbackInfo& info);

// The model fields of a runner's options object (ModelConfig); throws TANDEM_BAD_ARGUMENT naming the field.
LlamaConfig parseLlamaConfig(const Napi::Object& options);

class CpuLlamaWrap : public Napi::ObjectWrap<CpuLlamaWrap>, public Closeable {
 public:
  static void Init(Napi::Env env, Napi::Object exports);
  explicit CpuLlamaWrap(const Napi::CallbackInfo& info);
  ~CpuLlamaWrap() override;

  // Stops forward passes (one in progress gives up at its next layer), joins every thread, frees the
  // weights and lets go of the KV buffer. Idempotent.
  void close() override;

 private:
  CpuLlama& live(Napi::Env env);
  Napi::Value SetWeight(const Napi::CallbackInfo& info);
  Napi::Value MissingWeights(const Napi::CallbackInfo& info);
  Napi::Value Ready(const Napi::CallbackInfo& info);
  Napi::Value Forward(const Napi::CallbackInfo& info);
  Napi::Value TakeExpertLoad(const Napi::CallbackInfo& info);
  Napi::Value TakeRankLoad(const Napi::CallbackInfo& info);
  Napi::Value ExpertPlacementTable(const Napi::CallbackInfo& info);
  Napi::Value ApplyExpertPlacement(const Napi::CallbackInfo& info);
  Napi::Value TakeCollectiveTime(const Napi::CallbackInfo& info);
  Napi::Value Dispose(const Napi::CallbackInfo& info);
  Napi::Value FailRankForTest(const Napi::CallbackInfo& info);
  Napi::Value GetRanks(const Napi::CallbackInfo& info);
  Napi::Value GetThreads(const Napi::CallbackInfo& info);
  Napi::Value GetKernel(const Napi::CallbackInfo& info);
  Napi::Value GetDisposed(const Napi::CallbackInfo& info);

  std::shared_ptr<CpuLlama> model_;
  std::unique_ptr<WorkQueue> queue_;
  Napi::ObjectReference kvBuffer_;
  // Forward passes queued or running; touched on the JS thread only, shared with their completions.
  std::shared_ptr<int> inFlight_ = std::make_shared<int>(0);
  unsigned threads_ = 0;
  int ranks_ = 1;
  std::string kernel_;
};

}  // namespace tandem::engine
