#include "cuda_llama_wrap.h"

#include <cmath>
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
                                        InstanceMethod<&CudaLlamaWrap::FillDummy>("fillDummy"),
                                        InstanceMethod<&CudaLlamaWrap::LoadFromFile>("loadFromFile"),
                                        InstanceMethod<&CudaLlamaWrap::ReadWeight>("readWeight"),
                                        InstanceMethod<&CudaLlamaWrap::MissingWeights>("missingWeights"),
                                        InstanceMethod<&CudaLlamaWrap::Ready>("ready"),
                                        InstanceMethod<&CudaLlamaWrap::Forward>("forward"),
                                        InstanceMethod<&CudaLlamaWrap::ForwardSampled>("forwardSampled"),
                                        InstanceMethod<&CudaLlamaWrap::ForwardWithoutLogits>("forwardWithoutLogits"),
                                        InstanceMethod<&CudaLlamaWrap::CheckForward>("checkForward"),
                                        InstanceMethod<&CudaLlamaWrap::TakeCollectiveTime>("takeCollectiveTime"),
                                        InstanceMethod<&CudaLlamaWrap::Dispose>("dispose"),
                                        InstanceMethod<&CudaLlamaWrap::Holds>("holds"),
                                        InstanceMethod<&CudaLlamaWrap::ExpertPlacement>("expertPlacement"),
                                        InstanceMethod<&CudaLlamaWrap::ExpertSlotAddress>("expertSlotAddress"),
                                        InstanceMethod<&CudaLlamaWrap::StageExperts>("stageExperts"),
                                        InstanceMethod<&CudaLlamaWrap::CommitExperts>("commitExperts"),
                                        InstanceMethod<&CudaLlamaWrap::TakeExpertLoad>("takeExpertLoad"),
                                        InstanceAccessor<&CudaLlamaWrap::GetWeightBytes>("weightBytes"),
                                        InstanceAccessor<&CudaLlamaWrap::GetDisposed>("disposed"),
                                        InstanceAccessor<&CudaLlamaWrap::GetCudaGraphs>("cudaGraphs"),
                                        InstanceAccessor<&CudaLlamaWrap::GetAttentionKernels>("attentionKernels"),
                                        InstanceAccessor<&CudaLlamaWrap::GetDecodeAttention>("decodeAttention"),
                                        InstanceAccessor<&CudaLlamaWrap::GetGemvMaxBatch>("gemvMaxBatch"),
                                        InstanceAccessor<&CudaLlamaWrap::GetGemmPath>("gemmPath"),
                                        InstanceAccessor<&CudaLlamaWrap::GetGemmTuning>("gemmTuning"),
                                        InstanceAccessor<&CudaLlamaWrap::GetTensorParallel>("tensorParallel"),
                                    });
  exports.Set("CudaLlama", ctor);
  CudaTpGroupWrap::Init(env, exports);
  CudaStageChannelWrap::Init(env, exports);
}

namespace {
// Marks CudaTpGroup objects, so that a CudaLlama can tell one from any other object (napi_type_tag).
const napi_type_tag kTpGroupTag = {0x7a1d3c0e5b8f4a21ULL, 0x9c6e2f4b1d8a7e53ULL};
}  // namespace

void CudaTpGroupWrap::Init(Napi::Env env, Napi::Object exports) {
  exports.Set("CudaTpGroup", DefineClass(env, "CudaTpGroup",
                                         {InstanceAccessor<&CudaTpGroupWrap::GetSize>("size"),
                                          InstanceAccessor<&CudaTpGroupWrap::GetCommunicator>("communicator")}));
}

CudaTpGroupWrap::CudaTpGroupWrap(const Napi::CallbackInfo& info) : Napi::ObjectWrap<CudaTpGroupWrap>(info) {
  Napi::Env env = info.Env();
  double size = info[0].IsNumber() ? info[0].As<Napi::Number>().DoubleValue() : 0;
  if (!(size >= 1 && size <= LocalTpGroup::kMaxRanks && size == std::floor(size)))
    badArgument(env, "CudaTpGroup: size must be an integer 1.." + std::to_string(LocalTpGroup::kMaxRanks));
  std::string communicator = "local";
  if (info[1].IsObject()) {
    Napi::Value kind = info[1].As<Napi::Object>().Get("communicator");
    if (!kind.IsUndefined()) communicator = kind.IsString() ? kind.As<Napi::String>().Utf8Value() : "";
  }
  if (communicator == "local") {
    local_ = std::make_shared<LocalTpGroup>(static_cast<int>(size));
  } else if (communicator == "nccl") {
    Napi::Object o = info[1].As<Napi::Object>();
    std::vector<std::string> candidates;
    Napi::Value libs = o.Get("nccl");
    if (libs.IsArray()) {
      Napi::Array a = libs.As<Napi::Array>();
      for (uint32_t i = 0; i < a.Length(); ++i)
        if (a.Get(i).IsString()) candidates.push_back(a.Get(i).As<Napi::String>().Utf8Value());
    }
    if (candidates.empty()) candidates = {"libnccl.so.2"};
    Napi::Value t = o.Get("timeoutMs");
    double timeoutMs = t.IsNumber() ? t.As<Napi::Number>().DoubleValue() : 0;
    if (!(timeoutMs >= 1 && timeoutMs <= 4294967295.0 && timeoutMs == std::floor(timeoutMs)))
      badArgument(env, "CudaTpGroup: timeoutMs must be a positive integer of milliseconds");
    const nccl::NcclLibrary& library = nccl::loadNcclLibrary(candidates);
    if (!library.available) throw makeError(env, "TANDEM_NCCL_UNAVAILABLE", "NCCL unavailable: " + library.reason);
    try {
      nccl_ = std::make_shared<NcclTpGroup>(library, static_cast<int>(size), static_cast<uint32_t>(timeoutMs));
    } catch (const NativeError& e) {
      throw makeError(env, e.code, e.what());
    }
  } else {
    badArgument(env, "CudaTpGroup: communicator must be 'local' or 'nccl'");
  }
  napi_status status = napi_type_tag_object(env, info.This(), &kTpGroupTag);
  if (status != napi_ok) throw Napi::Error::New(env, "CudaTpGroup: napi_type_tag_object failed");
}

namespace {
CudaTpGroupWrap* tpGroupOf(Napi::Env env, const Napi::Value& value) {
  if (!value.IsObject()) return nullptr;
  bool tagged = false;
  if (napi_check_object_type_tag(env, value, &kTpGroupTag, &tagged) != napi_ok || !tagged) return nullptr;
  return CudaTpGroupWrap::Unwrap(value.As<Napi::Object>());
}
}  // namespace

int CudaTpGroupWrap::sizeOf(Napi::Env env, const Napi::Value& value) {
  CudaTpGroupWrap* group = tpGroupOf(env, value);
  return group ? group->size() : 0;
}

std::shared_ptr<TpCommunicator> CudaTpGroupWrap::communicatorOf(Napi::Env env, const Napi::Value& value, int rank) {
  CudaTpGroupWrap* group = tpGroupOf(env, value);
  if (!group) return nullptr;
  if (group->local_) return std::make_shared<LocalTpCommunicator>(group->local_, rank);
  return std::make_shared<NcclTpCommunicator>(group->nccl_, rank);
}

Napi::Value CudaTpGroupWrap::GetSize(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), size()); }

Napi::Value CudaTpGroupWrap::GetCommunicator(const Napi::CallbackInfo& info) {
  return Napi::String::New(info.Env(), nccl_ ? "nccl" : "local");
}

namespace {
// Marks CudaStageChannel objects (napi_type_tag), as kTpGroupTag marks tensor-parallel groups.
const napi_type_tag kStageChannelTag = {0x3e8b5d1f7a2c4e90ULL, 0xb47d19e36c0a5f28ULL};

// The optional trailing micro-batch slot of a forward call (argument `index`): 0 when absent.
int stageSlotArg(const Napi::CallbackInfo& info, size_t index) {
  if (info.Length() <= index || info[index].IsUndefined()) return 0;
  double slot = info[index].IsNumber() ? info[index].As<Napi::Number>().DoubleValue() : -1;
  if (!(slot >= 0 && slot < StageChannel::kMaxSlots && slot == std::floor(slot)))
    badArgument(info.Env(), "the micro-batch slot must be an integer 0.." + std::to_string(StageChannel::kMaxSlots - 1));
  return static_cast<int>(slot);
}
}  // namespace

void CudaStageChannelWrap::Init(Napi::Env env, Napi::Object exports) {
  exports.Set("CudaStageChannel", DefineClass(env, "CudaStageChannel", {}));
}

CudaStageChannelWrap::CudaStageChannelWrap(const Napi::CallbackInfo& info)
    : Napi::ObjectWrap<CudaStageChannelWrap>(info), channel_(std::make_shared<LocalStageChannel>()) {
  napi_status status = napi_type_tag_object(info.Env(), info.This(), &kStageChannelTag);
  if (status != napi_ok) throw Napi::Error::New(info.Env(), "CudaStageChannel: napi_type_tag_object failed");
}

std::shared_ptr<StageChannel> CudaStageChannelWrap::channelOf(Napi::Env env, const Napi::Value& value) {
  if (!value.IsObject()) return nullptr;
  bool tagged = false;
  if (napi_check_object_type_tag(env, value, &kStageChannelTag, &tagged) != napi_ok || !tagged) return nullptr;
  return CudaStageChannelWrap::Unwrap(value.As<Napi::Object>())->channel_;
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
  std::vector<std::string> ltCandidates;
  Napi::Value ltLibs = field(o, "cublasLt");
  if (ltLibs.IsArray()) {
    Napi::Array a = ltLibs.As<Napi::Array>();
    for (uint32_t i = 0; i < a.Length(); ++i)
      if (a.Get(i).IsString()) ltCandidates.push_back(a.Get(i).As<Napi::String>().Utf8Value());
  }
  if (ltCandidates.empty()) ltCandidates = {"libcublasLt.so.13", "libcublasLt.so.12"};
  const CublasLtApi& cublasLt = loadCublasLt(ltCandidates);

  std::shared_ptr<TpCommunicator> tp;
  Napi::Value tpOption = field(o, "tp");
  if (!tpOption.IsUndefined()) {
    if (!tpOption.IsObject()) badArgument(env, "option 'tp' must be { group: CudaTpGroup, rank }");
    Napi::Object t = tpOption.As<Napi::Object>();
    const int size = CudaTpGroupWrap::sizeOf(env, t.Get("group"));
    if (size == 0) badArgument(env, "option 'tp.group' must be a CudaTpGroup");
    Napi::Value rankValue = t.Get("rank");
    double rank = rankValue.IsNumber() ? rankValue.As<Napi::Number>().DoubleValue() : -1;
    if (!(rank >= 0 && rank < size && rank == std::floor(rank)))
      badArgument(env, "option 'tp.rank' must be an integer 0.." + std::to_string(size - 1));
    tp = CudaTpGroupWrap::communicatorOf(env, t.Get("group"), static_cast<int>(rank));
  }

  ExpertLayout experts;
  bool replicatedAttention = false;
  Napi::Value epOption = field(o, "ep");
  if (!epOption.IsUndefined()) {
    if (!epOption.IsObject()) badArgument(env, "option 'ep' must be { size, redundantSlots, replicatedAttention }");
    Napi::Object e = epOption.As<Napi::Object>();
    auto count = [&](const char* name, double fallback) {
      Napi::Value v = e.Get(name);
      double n = v.IsUndefined() ? fallback : v.IsNumber() ? v.As<Napi::Number>().DoubleValue() : -1;
      if (!(n >= 0 && n <= 1024 && n == std::floor(n)))
        badArgument(env, std::string("option 'ep.") + name + "' must be an integer 0..1024");
      return static_cast<int>(n);
    };
    experts.ranks = count("size", 1);
    experts.rank = tp ? tp->rank() : 0;
    experts.redundantSlots = count("redundantSlots", 0);
    replicatedAttention = e.Get("replicatedAttention").ToBoolean().Value();
  }

  // pp: { stage, size, layerStart, layerCount, input?: CudaStageChannel, output?: CudaStageChannel }; the
  // constructor checks the numbers against the model (checkPpStage).
  std::unique_ptr<PpStage> pp;
  Napi::Value ppOption = field(o, "pp");
  if (!ppOption.IsUndefined()) {
    if (!ppOption.IsObject())
      badArgument(env, "option 'pp' must be { stage, size, layerStart, layerCount, input?, output? }");
    Napi::Object p = ppOption.As<Napi::Object>();
    pp = std::make_unique<PpStage>();
    auto integer = [&](const char* name) {
      Napi::Value v = p.Get(name);
      double n = v.IsNumber() ? v.As<Napi::Number>().DoubleValue() : -1;
      if (!(n >= 0 && n <= 1e6 && n == std::floor(n)))
        badArgument(env, std::string("option 'pp.") + name + "' must be a non-negative integer");
      return static_cast<int>(n);
    };
    pp->stage = integer("stage");
    pp->size = integer("size");
    pp->layerStart = integer("layerStart");
    pp->layerCount = integer("layerCount");
    for (const char* end : {"input", "output"}) {
      Napi::Value v = p.Get(end);
      if (v.IsUndefined() || v.IsNull()) continue;
      std::shared_ptr<StageChannel> channel = CudaStageChannelWrap::channelOf(env, v);
      if (!channel) badArgument(env, std::string("option 'pp.") + end + "' must be a CudaStageChannel");
      (std::string(end) == "input" ? pp->input : pp->output) = channel;
    }
  }

  try {
    Napi::Value graphs = field(o, "cudaGraphs");
    model_ = std::make_shared<CudaLlama>(*device_, cublas, cublasLt, c, pool, graphs.IsUndefined() ? true : flag(o, "cudaGraphs"),
                                         tp, experts, replicatedAttention, pp.get());
    tp_ = tp;
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

// fillDummy(name, recipe) -> Promise: generates the tensor on the GPU (lib/engine/model/dummy.ts's DummyRecipe:
// { kind: 'ones' } or { kind: 'uniform', keys: [k0, k1, k2] (uint32), width }).
Napi::Value CudaLlamaWrap::FillDummy(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::shared_ptr<CudaLlama> model = model_;
  WorkQueue& queue = liveQueue(env);
  if (!info[0].IsString()) throw Napi::TypeError::New(env, "fillDummy expects a tensor name");
  if (!info[1].IsObject()) throw Napi::TypeError::New(env, "fillDummy expects a recipe object");
  std::string name = info[0].As<Napi::String>().Utf8Value();
  Napi::Object recipe = info[1].As<Napi::Object>();
  Napi::Value kind = recipe.Get("kind");
  std::string k = kind.IsString() ? kind.As<Napi::String>().Utf8Value() : "";
  if (k != "ones" && k != "uniform") badArgument(env, "fillDummy: recipe.kind must be 'ones' or 'uniform'");
  bool ones = k == "ones";
  uint32_t keys[3] = {0, 0, 0};
  double width = 0;
  if (!ones) {
    Napi::Value list = recipe.Get("keys");
    if (!list.IsArray() || list.As<Napi::Array>().Length() != 3)
      badArgument(env, "fillDummy: recipe.keys must hold 3 unsigned 32-bit integers");
    for (uint32_t i = 0; i < 3; ++i) {
      Napi::Value v = list.As<Napi::Array>().Get(i);
      double x = v.IsNumber() ? v.As<Napi::Number>().DoubleValue() : -1;
      if (!(x >= 0 && x <= 4294967295.0 && x == static_cast<double>(static_cast<uint32_t>(x))))
        badArgument(env, "fillDummy: recipe.keys must hold 3 unsigned 32-bit integers");
      keys[i] = static_cast<uint32_t>(x);
    }
    Napi::Value w = recipe.Get("width");
    width = w.IsNumber() ? w.As<Napi::Number>().DoubleValue() : -1;
    if (!(width >= 0 && std::isfinite(width))) badArgument(env, "fillDummy: recipe.width must be a finite number >= 0");
  }
  try {
    model->elementsOf(name);
  } catch (const BadInput& e) {
    badArgument(env, e.what());
  }
  return runAsync<Empty>(
      env, queue,
      [model, name, ones, keys, width]() {
        translated([&] { model->fillDummy(name, ones, keys[0], keys[1], keys[2], width); });
        return Empty{};
      },
      undefinedOf);
}

// loadFromFile(fd, tensors: [{ name, offset, bytes, dtype: 'BF16' | 'F16' | 'F32' }], progress?: Float64Array)
// -> Promise: the tensors read from the open safetensors file on the device thread (CudaLlama::loadFromFile);
// progress[0] counts the file bytes done meanwhile. The caller keeps fd open until the promise settles.
Napi::Value CudaLlamaWrap::LoadFromFile(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::shared_ptr<CudaLlama> model = model_;
  WorkQueue& queue = liveQueue(env);
  double fdValue = info[0].IsNumber() ? info[0].As<Napi::Number>().DoubleValue() : -1;
  if (!(fdValue >= 0 && fdValue <= 2147483647.0 && fdValue == std::floor(fdValue)))
    throw Napi::TypeError::New(env, "loadFromFile expects an open file descriptor");
  if (!info[1].IsArray()) throw Napi::TypeError::New(env, "loadFromFile expects an array of tensors");
  Napi::Array list = info[1].As<Napi::Array>();
  std::vector<CudaLlama::FileTensor> tensors;
  for (uint32_t i = 0; i < list.Length(); ++i) {
    std::string at = "tensors[" + std::to_string(i) + "]";
    Napi::Value item = list.Get(i);
    if (!item.IsObject()) badArgument(env, at + " must be { name, offset, bytes, dtype }");
    Napi::Object o = item.As<Napi::Object>();
    Napi::Value name = o.Get("name"), offset = o.Get("offset"), bytes = o.Get("bytes"), dtype = o.Get("dtype");
    if (!name.IsString() || !offset.IsNumber() || !bytes.IsNumber() || !dtype.IsString())
      badArgument(env, at + " must be { name: string, offset: number, bytes: number, dtype: string }");
    CudaLlama::FileTensor t;
    t.name = name.As<Napi::String>().Utf8Value();
    double off = offset.As<Napi::Number>().DoubleValue(), n = bytes.As<Napi::Number>().DoubleValue();
    if (!(off >= 0 && n >= 0 && off <= 9007199254740991.0 && n <= 9007199254740991.0 && off == std::floor(off) &&
          n == std::floor(n)))
      badArgument(env, at + ": offset and bytes must be non-negative integers");
    t.offset = static_cast<uint64_t>(off);
    t.bytes = static_cast<uint64_t>(n);
    std::string d = dtype.As<Napi::String>().Utf8Value();
    if (d == "BF16") t.dtype = CudaLlama::FileDtype::BF16;
    else if (d == "F16") t.dtype = CudaLlama::FileDtype::F16;
    else if (d == "F32") t.dtype = CudaLlama::FileDtype::F32;
    else badArgument(env, "tensor '" + t.name + "' is stored as " + d + "; the GPU engine reads BF16, F16 and F32");
    try {
      model->checkFileTensor(t);
    } catch (const BadInput& e) {
      badArgument(env, e.what());
    }
    tensors.push_back(std::move(t));
  }
  double* progress = nullptr;
  std::shared_ptr<JsKeepAlive> keep;
  if (!info[2].IsUndefined()) {
    void* data = nullptr;
    size_t length = 0;
    viewOf(env, info[2], napi_float64_array, &data, &length, "progress");
    if (length < 1) badArgument(env, "progress must hold at least one value");
    progress = static_cast<double*>(data);
    keep = std::make_shared<JsKeepAlive>(env, info[2]);
  }
  int fd = static_cast<int>(fdValue);
  return runAsync<Empty>(
      env, queue,
      [model, fd, tensors = std::move(tensors), progress]() mutable {
        translated([&] { model->loadFromFile(fd, std::move(tensors), progress); });
        return Empty{};
      },
      undefinedOf, [keep](Napi::Env) {
        if (keep) keep->release();
      });
}

// readWeight(name) -> Promise<Uint16Array>: the tensor's bf16 bit patterns as the GPU holds them.
Napi::Value CudaLlamaWrap::ReadWeight(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::shared_ptr<CudaLlama> model = model_;
  WorkQueue& queue = liveQueue(env);
  if (!info[0].IsString()) throw Napi::TypeError::New(env, "readWeight expects a tensor name");
  std::string name = info[0].As<Napi::String>().Utf8Value();
  try {
    model->elementsOf(name);
  } catch (const BadInput& e) {
    badArgument(env, e.what());
  }
  return runAsync<std::vector<uint16_t>>(
      env, queue, [model, name]() { return translated([&] { return model->readWeight(name); }); },
      [](Napi::Env env, std::vector<uint16_t>& bits) -> Napi::Value {
        Napi::Uint16Array out = Napi::Uint16Array::New(env, bits.size());
        if (!bits.empty()) std::memcpy(out.Data(), bits.data(), bits.size() * 2);
        return out;
      });
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

// forward(tokens, positions, seqStarts, blockTables, maxBlocksPerSeq, contextLens, slot?) -> Promise<Float32Array>
// (slot: a pipeline stage's micro-batch slot, CudaLlama::setStageSlot; 0 when absent, as for the two calls below)
Napi::Value CudaLlamaWrap::Forward(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::shared_ptr<CudaLlama> model = model_;
  WorkQueue& queue = liveQueue(env);
  auto input = parseForwardInput(info);
  const int slot = stageSlotArg(info, 6);
  return runAsync<std::vector<float>>(
      env, queue,
      [model, input, slot]() {
        return translated([&] {
          model->setStageSlot(slot);
          return model->forward(*input);
        });
      },
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

// forwardSampled(tokens, positions, seqStarts, blockTables, maxBlocksPerSeq, contextLens, plan, slot?) -> Promise of
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
  const int slot = stageSlotArg(info, 7);
  return runAsync<SampledRows>(
      env, queue,
      [model, input, plan, slot]() {
        return translated([&] {
          model->setStageSlot(slot);
          return model->forwardSampled(*input, *plan);
        });
      },
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

// forwardWithoutLogits(tokens, positions, seqStarts, blockTables, maxBlocksPerSeq, contextLens, slot?) -> Promise<void>:
// a tensor-parallel rank's pass whose logits nobody reads (rank 0 runs forward or forwardSampled meanwhile), or a
// pipeline stage's before the last (it hands its hidden state to the next stage).
Napi::Value CudaLlamaWrap::ForwardWithoutLogits(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::shared_ptr<CudaLlama> model = model_;
  WorkQueue& queue = liveQueue(env);
  auto input = parseForwardInput(info);
  const int slot = stageSlotArg(info, 6);
  return runAsync<Empty>(
      env, queue,
      [model, input, slot]() {
        translated([&] {
          model->setStageSlot(slot);
          model->forwardWithoutLogits(*input);
        });
        return Empty{};
      },
      undefinedOf);
}

// checkForward(tokens, positions, seqStarts, blockTables, maxBlocksPerSeq, contextLens): throws TANDEM_BAD_ARGUMENT
// (synchronously, nothing queued) when forward() would refuse the batch.
Napi::Value CudaLlamaWrap::CheckForward(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!model_) throw makeError(env, "TANDEM_DISPOSED", "the GPU model runner (or its CUDA device) was disposed");
  auto input = parseForwardInput(info);
  try {
    model_->checkForward(*input);
  } catch (const BadInput& e) {
    badArgument(env, e.what());
  }
  return env.Undefined();
}

// takeCollectiveTime() -> Promise<{ allReduceMs, gatherMs }>: this rank's stream time in collectives since the last
// call (TpCommunicator::takeTime; the first call starts the timing and gives zeros); zeros for one rank.
Napi::Value CudaLlamaWrap::TakeCollectiveTime(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  WorkQueue& queue = liveQueue(env);
  std::shared_ptr<TpCommunicator> tp = tp_;
  return runAsync<TpCollectiveTime>(
      // A group of one (one rank with redundant expert slots) has no collectives and no initialised communicator;
      // an NCCL group of one (runsAlone) has both.
      env, queue,
      [tp]() {
        return tp && (tp->size() > 1 || tp->runsAlone()) ? translated([&] { return tp->takeTime(); })
                                                         : TpCollectiveTime{};
      },
      [](Napi::Env env, TpCollectiveTime& t) -> Napi::Value {
        Napi::Object out = Napi::Object::New(env);
        out.Set("allReduceMs", Napi::Number::New(env, t.allReduceMs));
        out.Set("gatherMs", Napi::Number::New(env, t.gatherMs));
        return out;
      });
}

// { rank, size, heads: [start, count], kvHeads, intermediate, vocab }: what this rank holds (the whole model for
// one rank).
Napi::Value CudaLlamaWrap::GetTensorParallel(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!model_) return env.Null();
  const TpShard& s = model_->tpShard();
  Napi::Object out = Napi::Object::New(env);
  auto range = [&](int start, int count) {
    Napi::Array a = Napi::Array::New(env, 2);
    a.Set(0u, Napi::Number::New(env, start));
    a.Set(1u, Napi::Number::New(env, count));
    return a;
  };
  out.Set("rank", Napi::Number::New(env, s.rank));
  out.Set("size", Napi::Number::New(env, s.size));
  out.Set("heads", range(s.headStart, s.heads));
  out.Set("kvHeads", range(s.kvHeadStart, s.kvHeads));
  out.Set("intermediate", range(s.interStart, s.inter));
  out.Set("vocab", range(s.vocabStart, s.vocabRows));
  return out;
}

// holds(name) -> boolean: whether this rank holds the tensor (an expert-parallel rank: its own experts' only).
Napi::Value CudaLlamaWrap::Holds(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!model_) throw makeError(env, "TANDEM_DISPOSED", "the GPU model runner was disposed");
  if (!info[0].IsString()) throw Napi::TypeError::New(env, "holds expects a tensor name");
  return Napi::Boolean::New(env, model_->holds(info[0].As<Napi::String>().Utf8Value()));
}

// expertPlacement() -> { ranks, slotsPerRank, slotExpert: Int32Array (layers x ranks x slotsPerRank, -1: empty) }:
// the placement in force (read between placement changes).
Napi::Value CudaLlamaWrap::ExpertPlacement(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!model_) throw makeError(env, "TANDEM_DISPOSED", "the GPU model runner was disposed");
  try {
    const CudaMoe& moe = model_->moe();
    const auto& rows = moe.placement();
    size_t n = 0;
    for (const auto& row : rows) n += row.size();
    Napi::Int32Array table = Napi::Int32Array::New(env, n);
    size_t at = 0;
    for (const auto& row : rows)
      for (int32_t e : row) table[at++] = e;
    Napi::Object out = Napi::Object::New(env);
    out.Set("ranks", Napi::Number::New(env, moe.ranks()));
    out.Set("slotsPerRank", Napi::Number::New(env, moe.slotsPerRank()));
    out.Set("slotExpert", table);
    return out;
  } catch (const BadInput& e) {
    badArgument(env, e.what());
  }
}

// expertSlotAddress(layer, slot) -> [gateUp, down]: device addresses of this rank's local expert slot (sources of
// another rank's stageExperts on the same device).
Napi::Value CudaLlamaWrap::ExpertSlotAddress(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!model_) throw makeError(env, "TANDEM_DISPOSED", "the GPU model runner was disposed");
  if (!info[0].IsNumber() || !info[1].IsNumber())
    throw Napi::TypeError::New(env, "expertSlotAddress expects (layer, slot)");
  try {
    const auto [gateUp, down] =
        model_->expertSlotAddress(info[0].As<Napi::Number>().Int32Value(), info[1].As<Napi::Number>().Int32Value());
    Napi::Array out = Napi::Array::New(env, 2);
    out.Set(0u, Napi::Number::New(env, static_cast<double>(gateUp)));
    out.Set(1u, Napi::Number::New(env, static_cast<double>(down)));
    return out;
  } catch (const BadInput& e) {
    badArgument(env, e.what());
  } catch (const NativeError& e) {
    throw makeError(env, e.code, e.what());
  }
}

// stageExperts(Float64Array [gateUp, down] per expert) -> Promise: phase 1 of a placement change (CudaMoe).
Napi::Value CudaLlamaWrap::StageExperts(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::shared_ptr<CudaLlama> model = model_;
  WorkQueue& queue = liveQueue(env);
  if (!info[0].IsTypedArray() || info[0].As<Napi::TypedArray>().TypedArrayType() != napi_float64_array)
    throw Napi::TypeError::New(env, "stageExperts expects a Float64Array of [gateUp, down] addresses");
  Napi::Float64Array a = info[0].As<Napi::Float64Array>();
  if (a.ElementLength() % 2 != 0) badArgument(env, "stageExperts: an odd number of addresses");
  auto sources = std::make_shared<std::vector<std::pair<CUdeviceptr, CUdeviceptr>>>();
  for (size_t i = 0; i + 1 < a.ElementLength(); i += 2)
    sources->emplace_back(static_cast<CUdeviceptr>(a[i]), static_cast<CUdeviceptr>(a[i + 1]));
  return runAsync<Empty>(
      env, queue,
      [model, sources]() {
        translated([&] { model->stageExperts(*sources); });
        return Empty{};
      },
      undefinedOf);
}

// commitExperts(Int32Array [layer, slot] per staged expert, Int32Array placement (layers x ranks x slotsPerRank))
// -> Promise<{ slotsCopied, bytes }>: phase 2 (CudaMoe::commitExperts).
Napi::Value CudaLlamaWrap::CommitExperts(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::shared_ptr<CudaLlama> model = model_;
  WorkQueue& queue = liveQueue(env);
  auto isInt32 = [](const Napi::Value& v) {
    return v.IsTypedArray() && v.As<Napi::TypedArray>().TypedArrayType() == napi_int32_array;
  };
  if (!isInt32(info[0]) || !isInt32(info[1]))
    throw Napi::TypeError::New(env, "commitExperts expects (Int32Array destinations, Int32Array placement)");
  Napi::Int32Array d = info[0].As<Napi::Int32Array>(), t = info[1].As<Napi::Int32Array>();
  if (d.ElementLength() % 2 != 0) badArgument(env, "commitExperts: an odd number of destination values");
  auto dests = std::make_shared<std::vector<std::pair<int, int>>>();
  for (size_t i = 0; i + 1 < d.ElementLength(); i += 2) dests->emplace_back(d[i], d[i + 1]);
  auto rows = std::make_shared<std::vector<std::vector<int32_t>>>();
  try {
    const CudaMoe& moe = model->moe();
    const size_t perLayer = static_cast<size_t>(moe.ranks()) * moe.slotsPerRank();
    const size_t layers = moe.placement().size();
    if (t.ElementLength() != layers * perLayer)
      badArgument(env, "commitExperts: the placement has " + std::to_string(t.ElementLength()) + " values; " +
                           std::to_string(layers) + " layers x " + std::to_string(perLayer) + " slots make " +
                           std::to_string(layers * perLayer));
    for (size_t l = 0; l < layers; ++l) rows->emplace_back(t.Data() + l * perLayer, t.Data() + (l + 1) * perLayer);
  } catch (const BadInput& e) {
    badArgument(env, e.what());
  }
  return runAsync<ExpertCopyStats>(
      env, queue,
      [model, dests, rows]() { return translated([&] { return model->commitExperts(*dests, std::move(*rows)); }); },
      [](Napi::Env env, ExpertCopyStats& s) -> Napi::Value {
        Napi::Object out = Napi::Object::New(env);
        out.Set("slotsCopied", Napi::Number::New(env, s.slotsCopied));
        out.Set("bytes", Napi::Number::New(env, static_cast<double>(s.bytes)));
        return out;
      });
}

// takeExpertLoad() -> Promise<{ perExpert: Float64Array (layers x experts), pairsRun: Float64Array (layers) }>: the
// passes' routing since the last call, and a reset.
Napi::Value CudaLlamaWrap::TakeExpertLoad(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::shared_ptr<CudaLlama> model = model_;
  WorkQueue& queue = liveQueue(env);
  return runAsync<CudaMoe::Load>(
      env, queue, [model]() { return translated([&] { return model->takeExpertLoad(); }); },
      [](Napi::Env env, CudaMoe::Load& load) -> Napi::Value {
        auto array = [&](const std::vector<uint64_t>& v) {
          Napi::Float64Array a = Napi::Float64Array::New(env, v.size());
          for (size_t i = 0; i < v.size(); ++i) a[i] = static_cast<double>(v[i]);
          return a;
        };
        Napi::Object out = Napi::Object::New(env);
        out.Set("perExpert", array(load.perExpert));
        out.Set("pairsRun", array(load.pairsRun));
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

// 'flash', 'flash2' or 'prefill3' (attention.cu) or 'reference' (llama.cu); known once init() has run.
Napi::Value CudaLlamaWrap::GetAttentionKernels(const Napi::CallbackInfo& info) {
  if (!model_ || !model_->flashAttention()) return Napi::String::New(info.Env(), "reference");
  if (model_->prefill3Attention()) return Napi::String::New(info.Env(), "prefill3");
  return Napi::String::New(info.Env(), model_->flash2Attention() ? "flash2" : "flash");
}

// The flash decode kernels: { small, medium, large, smallMaxRows, mediumMaxRows } (steps of at most smallMaxRows
// decode rows run `small`, of at most mediumMaxRows `medium`, larger ones `large`), each 'decode1' | 'decode2' |
// 'decode3'; null without the flash kernels.
Napi::Value CudaLlamaWrap::GetDecodeAttention(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!model_ || !model_->flashAttention()) return env.Null();
  const size_t maxRows = CudaLlama::decode2MaxRows(), mediumRows = CudaLlama::decode3MaxRows();
  Napi::Object o = Napi::Object::New(env);
  o.Set("small", "decode" + std::to_string(model_->decodeKernel(maxRows)));
  o.Set("medium", "decode" + std::to_string(model_->decodeKernel(mediumRows)));
  o.Set("large", "decode" + std::to_string(model_->decodeKernel(mediumRows + 1)));
  o.Set("smallMaxRows", static_cast<double>(maxRows));
  o.Set("mediumMaxRows", static_cast<double>(mediumRows));
  return o;
}

// The largest batch whose GEMMs run through gemv.cu (0: all through cuBLAS); known once init() has run.
Napi::Value CudaLlamaWrap::GetGemvMaxBatch(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), model_ ? model_->gemvMaxBatch() : 0);
}

// 'lt' (cublasLtMatmul) or 'gemmex' (cublasGemmEx) for the GEMMs above the GEMV; known once init() has run.
Napi::Value CudaLlamaWrap::GetGemmPath(const Napi::CallbackInfo& info) {
  return Napi::String::New(info.Env(), model_ ? model_->gemmPath() : "gemmex");
}

// { tune, gateUpBf16, shapes, ms }: cuBLASLt autotuning and the gate_up GEMM's output type (CudaLlama::gemmTuning).
Napi::Value CudaLlamaWrap::GetGemmTuning(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const CudaLlama::GemmTuning t = model_ ? model_->gemmTuning() : CudaLlama::GemmTuning{};
  Napi::Object out = Napi::Object::New(env);
  out.Set("tune", Napi::Boolean::New(env, t.tune));
  out.Set("gateUpBf16", Napi::Boolean::New(env, t.gateUpBf16));
  out.Set("shapes", Napi::Number::New(env, t.shapes));
  out.Set("ms", Napi::Number::New(env, t.ms));
  return out;
}

Napi::Value CudaLlamaWrap::GetDisposed(const Napi::CallbackInfo& info) {
  return Napi::Boolean::New(info.Env(), disposed_);
}

}  // namespace tandem::engine
