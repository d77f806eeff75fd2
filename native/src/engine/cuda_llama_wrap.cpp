#include "cuda_llama_wrap.h"

#include <cstring>

#include "../device_buffer.h"
#include "engine_wrap.h"

namespace tandem::engine {
namespace {

struct Empty {};
Napi::Value undefinedOf(Napi::Env env, Empty&) { return env.Undefined(); }

// Maps the engine's own exceptions to the addon's error codes, on the device thread.
template <typename Fn>
auto translated(Fn&& fn) -> decltype(fn()) {
  try {
    return fn();
  } catch (const BadInput& e) {
    throw NativeError("TANDEM_BAD_ARGUMENT", e.what());
  } catch (const Aborted& e) {
    throw NativeError("TANDEM_DISPOSED", e.what());
  } catch (const std::bad_alloc&) {
    throw NativeError("TANDEM_OUT_OF_MEMORY", "not enough host memory for the forward pass");
  }
}

}  // namespace

void CudaLlamaWrap::Init(Napi::Env env, Napi::Object exports) {
  Napi::Function ctor = DefineClass(env, "CudaLlama",
                                    {
                                        InstanceMethod<&CudaLlamaWrap::InitModel>("init"),
                                        InstanceMethod<&CudaLlamaWrap::SetWeight>("setWeight"),
                                        InstanceMethod<&CudaLlamaWrap::MissingWeights>("missingWeights"),
                                        InstanceMethod<&CudaLlamaWrap::Ready>("ready"),
                                        InstanceMethod<&CudaLlamaWrap::Forward>("forward"),
                                        InstanceMethod<&CudaLlamaWrap::ForwardSampled>("forwardSampled"),
                                        InstanceMethod<&CudaLlamaWrap::Dispose>("dispose"),
                                        InstanceAccessor<&CudaLlamaWrap::GetWeightBytes>("weightBytes"),
                                        InstanceAccessor<&CudaLlamaWrap::GetDisposed>("disposed"),
                                        InstanceAccessor<&CudaLlamaWrap::GetCudaGraphs>("cudaGraphs"),
                                        InstanceAccessor<&CudaLlamaWrap::GetAttentionKernels>("attentionKernels"),
                                        InstanceAccessor<&CudaLlamaWrap::GetGemvMaxBatch>("gemvMaxBatch"),
                                    });
  exports.Set("CudaLlama", ctor);
}

CudaLlamaWrap::CudaLlamaWrap(const Napi::CallbackInfo& info) : Napi::ObjectWrap<CudaLlamaWrap>(info) {
  Napi::Env env = info.Env();
  AddonState& state = AddonState::of(env);
  if (!info[0].IsObject() || !info[0].As<Napi::Object>().InstanceOf(state.cudaDeviceConstructor.Value()))
    throw Napi::TypeError::New(env, "CudaLlama expects a CudaDevice as its first argument");
  if (!info[1].IsObject()) throw Napi::TypeError::New(env, "CudaLlama expects an options object");
  Napi::Object deviceObject = info[0].As<Napi::Object>();
  Napi::Object o = info[1].As<Napi::Object>();
  device_ = CudaDevice::Unwrap(deviceObject);
  if (!device_->queue()) throw makeError(env, "TANDEM_DISPOSED", "the CUDA device was disposed");

  LlamaConfig c = parseLlamaConfig(o);
  GpuKvPool pool;
  pool.numBlocks = positiveInt(o, "numBlocks");
  pool.blockSize = positiveInt(o, "blockSize");
  pool.layout = parseLayout(o);
  Napi::Value kv = field(o, "kvBuffer");
  if (!kv.IsObject() || !kv.As<Napi::Object>().InstanceOf(state.deviceBufferConstructor.Value()))
    throw Napi::TypeError::New(env, "option 'kvBuffer' must be a DeviceBuffer");
  DeviceBuffer* buffer = DeviceBuffer::Unwrap(kv.As<Napi::Object>());
  if (buffer->owner() != device_)
    badArgument(env, "option 'kvBuffer' lives on another CUDA device than the model");
  kvAllocation_ = buffer->live(env);
  pool.base = kvAllocation_->ptr;
  pool.bytes = kvAllocation_->bytes;

  std::vector<std::string> candidates;
  Napi::Value libs = field(o, "cublas");
  if (libs.IsArray()) {
    Napi::Array a = libs.As<Napi::Array>();
    for (uint32_t i = 0; i < a.Length(); ++i)
      if (a.Get(i).IsString()) candidates.push_back(a.Get(i).As<Napi::String>().Utf8Value());
  }
  if (candidates.empty()) candidates = {"libcublas.so.13", "libcublas.so.12"};
  const CublasApi& cublas = loadCublas(candidates);

  try {
    Napi::Value graphs = field(o, "cudaGraphs");
    model_ = std::make_shared<CudaLlama>(*device_, cublas, c, pool, graphs.IsUndefined() ? true : flag(o, "cudaGraphs"));
  } catch (const BadInput& e) {
    badArgument(env, e.what());
  }
  deviceRef_ = Napi::Persistent(deviceObject);
  kvBufferRef_ = Napi::Persistent(kv.As<Napi::Object>());
  state.track(this);
}

CudaLlamaWrap::~CudaLlamaWrap() { close(); }

void CudaLlamaWrap::close() {
  if (!model_) return;
  model_->abort();
  std::shared_ptr<CudaLlama> model = std::move(model_);
  if (WorkQueue* queue = device_->queue()) queue->post([model] { model->release(); });
  disposed_ = true;
  kvAllocation_.reset();
  deviceRef_.Reset();
  kvBufferRef_.Reset();
  AddonState::of(Env()).untrack(this);
}

WorkQueue& CudaLlamaWrap::liveQueue(Napi::Env env) {
  WorkQueue* queue = model_ ? device_->queue() : nullptr;
  if (!queue) throw makeError(env, "TANDEM_DISPOSED", "the GPU model runner (or its CUDA device) was disposed");
  return *queue;
}

// init(): allocates the weights and sets up cuBLAS on the device thread.
Napi::Value CudaLlamaWrap::InitModel(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::shared_ptr<CudaLlama> model = model_;
  return runAsync<Empty>(
      env, liveQueue(env),
      [model]() {
        translated([&] { model->init(); });
        return Empty{};
      },
      undefinedOf);
}

// setWeight(name, Float32Array) -> Promise: converted to bf16 and copied on the device thread (the array must
// not change until the promise settles). A name or size the model does not expect throws at once.
Napi::Value CudaLlamaWrap::SetWeight(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::shared_ptr<CudaLlama> model = model_;
  WorkQueue& queue = liveQueue(env);
  if (!info[0].IsString()) throw Napi::TypeError::New(env, "setWeight expects a tensor name");
  std::string name = info[0].As<Napi::String>().Utf8Value();
  void* data = nullptr;
  size_t length = 0;
  viewOf(env, info[1], napi_float32_array, &data, &length, ("tensor '" + name + "'").c_str());
  try {
    model->checkWeight(name, length);
  } catch (const BadInput& e) {
    badArgument(env, e.what());
  }
  auto keep = std::make_shared<JsKeepAlive>(env, info[1]);
  const float* values = static_cast<const float*>(data);
  return runAsync<Empty>(
      env, queue,
      [model, name, values, length]() {
        translated([&] { model->setWeight(name, values, length); });
        return Empty{};
      },
      undefinedOf, [keep](Napi::Env) { keep->release(); });
}

Napi::Value CudaLlamaWrap::MissingWeights(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!model_) throw makeError(env, "TANDEM_DISPOSED", "the GPU model runner was disposed");
  auto missing = model_->missingWeights();
  Napi::Array out = Napi::Array::New(env, missing.size());
  for (size_t i = 0; i < missing.size(); ++i) out.Set(static_cast<uint32_t>(i), missing[i]);
  return out;
}

// ready(): throws TANDEM_BAD_ARGUMENT naming the tensors not set yet.
Napi::Value CudaLlamaWrap::Ready(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!model_) throw makeError(env, "TANDEM_DISPOSED", "the GPU model runner was disposed");
  auto missing = model_->missingWeights();
  if (!missing.empty()) {
    std::string list;
    for (size_t i = 0; i < missing.size() && i < 5; ++i) list += (i ? ", " : "") + missing[i];
    if (missing.size() > 5) list += ", ...";
    badArgument(env, std::to_string(missing.size()) + " weight tensor(s) not set: " + list);
  }
  return env.Undefined();
}

// forward(tokens, positions, seqStarts, blockTables, maxBlocksPerSeq, contextLens) -> Promise<Float32Array>
Napi::Value CudaLlamaWrap::Forward(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::shared_ptr<CudaLlama> model = model_;
  WorkQueue& queue = liveQueue(env);
  auto input = parseForwardInput(info);
  return runAsync<std::vector<float>>(
      env, queue, [model, input]() { return translated([&] { return model->forward(*input); }); },
      [](Napi::Env env, std::vector<float>& logits) -> Napi::Value {
        Napi::Float32Array out = Napi::Float32Array::New(env, logits.size());
        if (!logits.empty()) std::memcpy(out.Data(), logits.data(), logits.size() * sizeof(float));
        return out;
      });
}

namespace {

template <typename T>
std::vector<T> copyOf(Napi::Env env, const Napi::Object& o, const char* name, napi_typedarray_type type) {
  void* data = nullptr;
  size_t length = 0;
  viewOf(env, field(o, name), type, &data, &length, (std::string("plan.") + name).c_str());
  const T* p = static_cast<const T*>(data);
  return std::vector<T>(p, p + length);
}

template <typename ArrayT, typename T>
ArrayT typedArray(Napi::Env env, const std::vector<T>& v) {
  ArrayT a = ArrayT::New(env, v.size());
  if (!v.empty()) std::memcpy(a.Data(), v.data(), v.size() * sizeof(T));
  return a;
}

}  // namespace

// forwardSampled(tokens, positions, seqStarts, blockTables, maxBlocksPerSeq, contextLens, plan) -> Promise of
// { maxN, ints, dbl, topIds, topLogits, fullRows, full } (SampledRows in cuda_llama.h); plan: { n, flags: Int32Array,
// invT, topP, u: Float64Array }, one entry per sequence.
Napi::Value CudaLlamaWrap::ForwardSampled(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::shared_ptr<CudaLlama> model = model_;
  WorkQueue& queue = liveQueue(env);
  auto input = parseForwardInput(info);
  if (!info[6].IsObject()) throw Napi::TypeError::New(env, "forwardSampled expects a sampling plan object");
  Napi::Object o = info[6].As<Napi::Object>();
  auto plan = std::make_shared<SamplePlan>();
  plan->n = copyOf<int32_t>(env, o, "n", napi_int32_array);
  plan->flags = copyOf<int32_t>(env, o, "flags", napi_int32_array);
  plan->invT = copyOf<double>(env, o, "invT", napi_float64_array);
  plan->topP = copyOf<double>(env, o, "topP", napi_float64_array);
  plan->u = copyOf<double>(env, o, "u", napi_float64_array);
  return runAsync<SampledRows>(
      env, queue, [model, input, plan]() { return translated([&] { return model->forwardSampled(*input, *plan); }); },
      [](Napi::Env env, SampledRows& rows) -> Napi::Value {
        Napi::Object out = Napi::Object::New(env);
        out.Set("maxN", Napi::Number::New(env, static_cast<double>(rows.maxN)));
        out.Set("ints", typedArray<Napi::Int32Array>(env, rows.ints));
        out.Set("dbl", typedArray<Napi::Float64Array>(env, rows.dbl));
        out.Set("topIds", typedArray<Napi::Int32Array>(env, rows.topIds));
        out.Set("topLogits", typedArray<Napi::Float32Array>(env, rows.topLogits));
        out.Set("fullRows", typedArray<Napi::Int32Array>(env, rows.fullRows));
        out.Set("full", typedArray<Napi::Float32Array>(env, rows.full));
        return out;
      });
}

// dispose() -> Promise: settles once the weights and activations are freed.
Napi::Value CudaLlamaWrap::Dispose(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!model_) {
    auto deferred = Napi::Promise::Deferred::New(env);
    deferred.Resolve(env.Undefined());
    return deferred.Promise();
  }
  std::shared_ptr<CudaLlama> model = model_;
  WorkQueue* queue = device_->queue();
  close();  // aborts, queues the release
  if (!queue) {
    auto deferred = Napi::Promise::Deferred::New(env);
    deferred.Resolve(env.Undefined());
    return deferred.Promise();
  }
  // Runs after the release close() queued (one FIFO thread).
  return runAsync<Empty>(env, *queue, [model]() { return Empty{}; }, undefinedOf);
}

Napi::Value CudaLlamaWrap::GetWeightBytes(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), model_ ? static_cast<double>(model_->weightBytes()) : 0);
}

// { active, reason }: whether decode steps replay CUDA graphs; reason says why not when capture failed.
Napi::Value CudaLlamaWrap::GetCudaGraphs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Object out = Napi::Object::New(env);
  out.Set("active", Napi::Boolean::New(env, model_ && model_->graphsActive()));
  std::string reason = model_ ? model_->graphsReason() : "";
  out.Set("reason", reason.empty() ? env.Null() : Napi::String::New(env, reason));
  return out;
}

// 'flash' (attention.cu) or 'reference' (llama.cu); known once init() has run.
Napi::Value CudaLlamaWrap::GetAttentionKernels(const Napi::CallbackInfo& info) {
  return Napi::String::New(info.Env(), model_ && model_->flashAttention() ? "flash" : "reference");
}

// The largest batch whose GEMMs run through gemv.cu (0: all through cuBLAS); known once init() has run.
Napi::Value CudaLlamaWrap::GetGemvMaxBatch(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), model_ ? model_->gemvMaxBatch() : 0);
}

Napi::Value CudaLlamaWrap::GetDisposed(const Napi::CallbackInfo& info) {
  return Napi::Boolean::New(info.Env(), disposed_);
}

}  // namespace tandem::engine
