#include "engine_wrap.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <thread>

namespace tandem::engine {

[[noreturn]] void badArgument(Napi::Env env, const std::string& message) {
  throw makeError(env, "TANDEM_BAD_ARGUMENT", message);
}

Napi::Value field(const Napi::Object& o, const char* name) { return o.Has(name) ? o.Get(name) : o.Env().Undefined(); }

double number(const Napi::Object& o, const char* name) {
  Napi::Value v = field(o, name);
  if (!v.IsNumber()) badArgument(o.Env(), std::string("option '") + name + "' must be a number");
  double d = v.As<Napi::Number>().DoubleValue();
  if (!std::isfinite(d)) badArgument(o.Env(), std::string("option '") + name + "' must be finite");
  return d;
}

int positiveInt(const Napi::Object& o, const char* name) {
  double d = number(o, name);
  if (d < 1 || d > 2147483647.0 || d != std::floor(d))
    badArgument(o.Env(), std::string("option '") + name + "' must be a positive 32-bit integer (got " +
                             std::to_string(d) + ")");
  return static_cast<int>(d);
}

bool flag(const Napi::Object& o, const char* name) {
  Napi::Value v = field(o, name);
  if (v.IsUndefined()) return false;
  if (!v.IsBoolean()) badArgument(o.Env(), std::string("option '") + name + "' must be a boolean");
  return v.As<Napi::Boolean>().Value();
}

// The bytes of any typed array, including one over a SharedArrayBuffer or an external ArrayBuffer.
void viewOf(Napi::Env env, const Napi::Value& value, napi_typedarray_type want, void** data, size_t* length,
            const char* what) {
  napi_typedarray_type type;
  napi_value arrayBuffer;
  size_t byteOffset;
  if (!value.IsTypedArray() ||
      napi_get_typedarray_info(env, value, &type, length, data, &arrayBuffer, &byteOffset) != napi_ok ||
      type != want) {
    const char* name = want == napi_uint8_array     ? "a Uint8Array"
                       : want == napi_float32_array ? "a Float32Array"
                       : want == napi_float64_array ? "a Float64Array"
                                                    : "an Int32Array";
    throw Napi::TypeError::New(env, std::string(what) + " must be " + name);
  }
}

std::vector<int32_t> int32s(Napi::Env env, const Napi::Value& value, const char* what) {
  void* data = nullptr;
  size_t length = 0;
  viewOf(env, value, napi_int32_array, &data, &length, what);
  const int32_t* p = static_cast<const int32_t*>(data);
  return std::vector<int32_t>(p, p + length);
}

KvLayout parseLayout(const Napi::Object& o) {
  Napi::Value layout = field(o, "layout");
  std::string layoutName = layout.IsString() ? layout.As<Napi::String>().Utf8Value() : "";
  if (layoutName == "block-major") return KvLayout::BlockMajor;
  else if (layoutName == "layer-major") return KvLayout::LayerMajor;
  badArgument(o.Env(), "option 'layout' must be 'block-major' or 'layer-major'");
}

std::shared_ptr<ForwardInput> parseForwardInput(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto input = std::make_shared<ForwardInput>();
  input->tokens = int32s(env, info[0], "tokens");
  input->positions = int32s(env, info[1], "positions");
  input->seqStarts = int32s(env, info[2], "seqStarts");
  input->blockTables = int32s(env, info[3], "blockTables");
  if (!info[4].IsNumber()) throw Napi::TypeError::New(env, "maxBlocksPerSeq must be a number");
  double mb = info[4].As<Napi::Number>().DoubleValue();
  if (!(mb >= 1 && mb <= 2147483647.0 && mb == std::floor(mb)))
    badArgument(env, "maxBlocksPerSeq must be a positive integer");
  input->maxBlocksPerSeq = static_cast<int>(mb);
  input->contextLens = int32s(env, info[5], "contextLens");
  return input;
}

// The model fields of a runner's options object (lib/engine/model/config.ts's ModelConfig).
LlamaConfig parseLlamaConfig(const Napi::Object& o) {
  Napi::Env env = o.Env();
  LlamaConfig c;
  c.vocabSize = positiveInt(o, "vocabSize");
  c.hiddenSize = positiveInt(o, "hiddenSize");
  c.intermediateSize = positiveInt(o, "intermediateSize");
  c.numLayers = positiveInt(o, "numLayers");
  c.numHeads = positiveInt(o, "numHeads");
  c.numKvHeads = positiveInt(o, "numKvHeads");
  c.headDim = positiveInt(o, "headDim");
  c.rmsNormEps = static_cast<float>(number(o, "rmsNormEps"));
  c.ropeTheta = number(o, "ropeTheta");
  c.maxPositions = positiveInt(o, "maxPositionEmbeddings");
  c.tieWordEmbeddings = flag(o, "tieWordEmbeddings");
  c.attentionBias = flag(o, "attentionBias");
  c.attentionOutputBias = flag(o, "attentionOutputBias");
  // The weight manifest (lib/engine/model/manifest.ts's nativeManifest): [{ name, role, layer }], checkpoint order.
  Napi::Value tensors = field(o, "tensors");
  if (!tensors.IsArray())
    badArgument(env, "option 'tensors' must be the weight manifest: an array of { name, role, layer } "
                     "(lib/engine/model/manifest.ts)");
  Napi::Array list = tensors.As<Napi::Array>();
  for (uint32_t i = 0; i < list.Length(); ++i) {
    Napi::Value item = list.Get(i);
    std::string at = "tensors[" + std::to_string(i) + "]";
    if (!item.IsObject()) badArgument(env, at + " must be an object { name, role, layer }");
    Napi::Object t = item.As<Napi::Object>();
    Napi::Value name = t.Get("name"), role = t.Get("role"), layer = t.Get("layer"), expert = t.Get("expert");
    if (!name.IsString() || !role.IsString() || !layer.IsNumber())
      badArgument(env, at + " must be { name: string, role: string, layer: number }");
    WeightEntry w;
    w.name = name.As<Napi::String>().Utf8Value();
    double l = layer.As<Napi::Number>().DoubleValue();
    if (!(l >= -1 && l <= 1e9 && l == std::floor(l))) badArgument(env, at + ".layer must be an integer >= -1");
    w.layer = static_cast<int>(l);
    if (!expert.IsUndefined()) {
      double e = expert.IsNumber() ? expert.As<Napi::Number>().DoubleValue() : -2;
      if (!(e >= -1 && e <= 1e9 && e == std::floor(e))) badArgument(env, at + ".expert must be an integer >= -1");
      w.expert = static_cast<int>(e);
    }
    try {
      w.role = parseWeightRole(role.As<Napi::String>().Utf8Value());
    } catch (const BadInput& e) {
      badArgument(env, at + ": " + e.what());
    }
    c.weights.push_back(std::move(w));
  }
  c.qkNorm = flag(o, "qkNorm");
  // Mixture of experts (ModelConfig's `moe`): { numExperts, topK, intermediateSize, normTopkProb,
  // sharedExpertIntermediateSize?, denseLayers? } or null.
  Napi::Value moe = field(o, "moe");
  if (!moe.IsUndefined() && !moe.IsNull()) {
    if (!moe.IsObject()) badArgument(env, "option 'moe' must be an object or null");
    Napi::Object m = moe.As<Napi::Object>();
    c.moe.numExperts = positiveInt(m, "numExperts");
    c.moe.topK = positiveInt(m, "topK");
    c.moe.intermediateSize = positiveInt(m, "intermediateSize");
    c.moe.normTopkProb = flag(m, "normTopkProb");
    if (!field(m, "sharedExpertIntermediateSize").IsUndefined() &&
        number(m, "sharedExpertIntermediateSize") != 0)  // 0 and absent: no shared expert
      c.moe.sharedIntermediateSize = positiveInt(m, "sharedExpertIntermediateSize");
    Napi::Value dense = field(m, "denseLayers");
    if (!dense.IsUndefined()) {
      if (!dense.IsArray()) badArgument(env, "option 'moe.denseLayers' must be an array of layer indices");
      Napi::Array layers = dense.As<Napi::Array>();
      for (uint32_t i = 0; i < layers.Length(); ++i) {
        Napi::Value v = layers.Get(i);
        double l = v.IsNumber() ? v.As<Napi::Number>().DoubleValue() : -1;
        if (!(l >= 0 && l <= 1e9 && l == std::floor(l)))
          badArgument(env, "option 'moe.denseLayers' must hold non-negative integers");
        c.moe.denseLayers.push_back(static_cast<int>(l));
      }
    }
  }
  Napi::Value window = field(o, "slidingWindow");
  if (!window.IsUndefined() && !window.IsNull()) c.slidingWindow = positiveInt(o, "slidingWindow");
  Napi::Value scaling = field(o, "ropeScaling");
  if (!scaling.IsUndefined() && !scaling.IsNull()) {
    if (!scaling.IsObject()) badArgument(env, "option 'ropeScaling' must be an object or null");
    Napi::Object s = scaling.As<Napi::Object>();
    Napi::Value type = field(s, "type");
    if (!type.IsString() || type.As<Napi::String>().Utf8Value() != "llama3")
      badArgument(env, "ropeScaling.type must be 'llama3'");
    c.llama3Rope = true;
    c.ropeFactor = number(s, "factor");
    c.ropeLowFreqFactor = number(s, "lowFreqFactor");
    c.ropeHighFreqFactor = number(s, "highFreqFactor");
    c.ropeOriginalMaxPositions = number(s, "originalMaxPositionEmbeddings");
    if (!(c.ropeFactor > 0 && c.ropeLowFreqFactor > 0 && c.ropeHighFreqFactor > c.ropeLowFreqFactor &&
          c.ropeOriginalMaxPositions > 0))
      badArgument(env, "ropeScaling needs factor > 0, 0 < lowFreqFactor < highFreqFactor, originalMaxPositionEmbeddings > 0");
  }
  return c;
}

void CpuLlamaWrap::Init(Napi::Env env, Napi::Object exports) {
  Napi::Function ctor = DefineClass(env, "CpuLlama",
                                    {
                                        InstanceMethod<&CpuLlamaWrap::SetWeight>("setWeight"),
                                        InstanceMethod<&CpuLlamaWrap::MissingWeights>("missingWeights"),
                                        InstanceMethod<&CpuLlamaWrap::Ready>("ready"),
                                        InstanceMethod<&CpuLlamaWrap::Forward>("forward"),
                                        InstanceMethod<&CpuLlamaWrap::Dispose>("dispose"),
                                        InstanceMethod<&CpuLlamaWrap::TakeExpertLoad>("takeExpertLoad"),
                                        InstanceMethod<&CpuLlamaWrap::TakeRankLoad>("takeRankLoad"),
                                        InstanceMethod<&CpuLlamaWrap::ExpertPlacementTable>("expertPlacement"),
                                        InstanceMethod<&CpuLlamaWrap::ApplyExpertPlacement>("applyExpertPlacement"),
                                        InstanceMethod<&CpuLlamaWrap::TakeCollectiveTime>("takeCollectiveTime"),
                                        InstanceMethod<&CpuLlamaWrap::FailRankForTest>("failRankForTest"),
                                        InstanceAccessor<&CpuLlamaWrap::GetThreads>("threads"),
                                        InstanceAccessor<&CpuLlamaWrap::GetRanks>("ranks"),
                                        InstanceAccessor<&CpuLlamaWrap::GetKernel>("kernel"),
                                        InstanceAccessor<&CpuLlamaWrap::GetDisposed>("disposed"),
                                    });
  exports.Set("CpuLlama", ctor);
}

// new CpuLlama({ ...ModelConfig fields, numBlocks, blockSize, layout, kvBuffer, threads?, kernel?,
//                tensorParallelSize?, pipelineParallelSize?, expertParallelSize?, redundantExpertSlots? })
CpuLlamaWrap::CpuLlamaWrap(const Napi::CallbackInfo& info) : Napi::ObjectWrap<CpuLlamaWrap>(info) {
  Napi::Env env = info.Env();
  if (!info[0].IsObject()) throw Napi::TypeError::New(env, "CpuLlama expects an options object");
  Napi::Object o = info[0].As<Napi::Object>();

  LlamaConfig c = parseLlamaConfig(o);

  KvPoolView pool;
  pool.numBlocks = positiveInt(o, "numBlocks");
  pool.blockSize = positiveInt(o, "blockSize");
  pool.layout = parseLayout(o);
  Napi::Value kv = field(o, "kvBuffer");
  void* kvData = nullptr;
  viewOf(env, kv, napi_uint8_array, &kvData, &pool.bytes, "option 'kvBuffer'");
  pool.base = static_cast<float*>(kvData);

  unsigned threads = std::min(8u, std::max(1u, std::thread::hardware_concurrency()));
  if (!field(o, "threads").IsUndefined()) threads = static_cast<unsigned>(positiveInt(o, "threads"));
  if (threads > 256) badArgument(env, "option 'threads' must be at most 256");
  std::string kernel = "auto";
  if (field(o, "kernel").IsString()) kernel = field(o, "kernel").As<Napi::String>().Utf8Value();
  // Tensor / pipeline / expert parallel ranks (lib/engine/parallel.ts checks the layout first).
  ParallelConfig parallel;
  if (!field(o, "tensorParallelSize").IsUndefined()) parallel.tp = positiveInt(o, "tensorParallelSize");
  if (!field(o, "pipelineParallelSize").IsUndefined()) parallel.pp = positiveInt(o, "pipelineParallelSize");
  if (!field(o, "expertParallelSize").IsUndefined()) parallel.ep = positiveInt(o, "expertParallelSize");
  int redundantExpertSlots = 0;
  if (!field(o, "redundantExpertSlots").IsUndefined()) {
    double r = number(o, "redundantExpertSlots");
    if (r < 0 || r > 65536 || r != std::floor(r)) badArgument(env, "option 'redundantExpertSlots' must be an integer >= 0");
    redundantExpertSlots = static_cast<int>(r);
  }
  if (parallel.ranks() > 256)
    badArgument(env, "at most 256 ranks (max(tensorParallelSize, expertParallelSize) x pipelineParallelSize)");

  try {
    model_ = std::make_shared<CpuLlama>(c, pool, threads, kernel, parallel, redundantExpertSlots);
  } catch (const BadInput& e) {
    badArgument(env, e.what());
  } catch (const std::bad_alloc&) {
    throw makeError(env, "TANDEM_OUT_OF_MEMORY", "not enough memory for the model's weights");
  }
  threads_ = model_->threads();
  ranks_ = model_->parallel().ranks();
  kernel_ = model_->kernelName();
  kvBuffer_ = Napi::Persistent(kv.As<Napi::Object>());
  queue_ = std::make_unique<WorkQueue>("tandem-llama");
  AddonState::of(env).track(this);
}

CpuLlamaWrap::~CpuLlamaWrap() { close(); }

void CpuLlamaWrap::close() {
  if (!model_) return;
  model_->abort();
  queue_->stop();  // queued passes run, see the abort and reject with TANDEM_DISPOSED
  queue_.reset();
  model_->stopThreads();
  model_.reset();
  kvBuffer_.Reset();
  AddonState::of(Env()).untrack(this);
}

CpuLlama& CpuLlamaWrap::live(Napi::Env env) {
  if (!model_) throw makeError(env, "TANDEM_DISPOSED", "the CPU model runner was disposed");
  return *model_;
}

// setWeight(name, Float32Array, rank = 0): copies the tensor (rank's slice) in, on the calling thread.
Napi::Value CpuLlamaWrap::SetWeight(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  CpuLlama& model = live(env);
  if (!info[0].IsString()) throw Napi::TypeError::New(env, "setWeight expects a tensor name");
  std::string name = info[0].As<Napi::String>().Utf8Value();
  void* data = nullptr;
  size_t length = 0;
  viewOf(env, info[1], napi_float32_array, &data, &length, ("tensor '" + name + "'").c_str());
  int rank = 0;
  if (info.Length() > 2 && !info[2].IsUndefined()) {
    double r = info[2].IsNumber() ? info[2].As<Napi::Number>().DoubleValue() : -1;
    if (!(r >= 0 && r < 65536 && r == std::floor(r))) badArgument(env, "setWeight's rank must be a non-negative integer");
    rank = static_cast<int>(r);
  }
  if (*inFlight_ > 0) badArgument(env, "setWeight('" + name + "') while a forward pass is running");
  try {
    model.setWeight(name, static_cast<const float*>(data), length, rank);
  } catch (const BadInput& e) {
    badArgument(env, e.what());
  }
  return env.Undefined();
}

Napi::Value CpuLlamaWrap::MissingWeights(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto missing = live(env).missingWeights();
  Napi::Array out = Napi::Array::New(env, missing.size());
  for (size_t i = 0; i < missing.size(); ++i) out.Set(static_cast<uint32_t>(i), missing[i]);
  return out;
}

// ready(): throws TANDEM_BAD_ARGUMENT naming the tensors not set yet.
Napi::Value CpuLlamaWrap::Ready(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto missing = live(env).missingWeights();
  if (!missing.empty()) {
    std::string list;
    for (size_t i = 0; i < missing.size() && i < 5; ++i) list += (i ? ", " : "") + missing[i];
    if (missing.size() > 5) list += ", ...";
    badArgument(env, std::to_string(missing.size()) + " weight tensor(s) not set: " + list);
  }
  return env.Undefined();
}

// forward(tokens, positions, seqStarts, blockTables, maxBlocksPerSeq, contextLens) -> Promise<Float32Array>
Napi::Value CpuLlamaWrap::Forward(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::shared_ptr<CpuLlama> model = model_;
  live(env);
  auto input = parseForwardInput(info);

  std::shared_ptr<int> inFlight = inFlight_;
  ++*inFlight;
  return runAsync<std::vector<float>>(
      env, *queue_,
      [model, input]() {
        try {
          return model->forward(*input);
        } catch (const BadInput& e) {
          throw NativeError("TANDEM_BAD_ARGUMENT", e.what());
        } catch (const Aborted& e) {
          throw NativeError("TANDEM_DISPOSED", e.what());
        } catch (const std::bad_alloc&) {
          throw NativeError("TANDEM_OUT_OF_MEMORY", "not enough memory for the forward pass's activations");
        }
      },
      [](Napi::Env env, std::vector<float>& logits) -> Napi::Value {
        Napi::Float32Array out = Napi::Float32Array::New(env, logits.size());
        if (!logits.empty()) std::memcpy(out.Data(), logits.data(), logits.size() * sizeof(float));
        return out;
      },
      [inFlight](Napi::Env) { --*inFlight; });
}

// takeExpertLoad() -> Float64Array: tokens routed per layer and expert (layer-major) since the last call.
Napi::Value CpuLlamaWrap::TakeExpertLoad(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::vector<int64_t> counts = live(env).takeExpertTokens();
  Napi::Float64Array out = Napi::Float64Array::New(env, counts.size());
  for (size_t i = 0; i < counts.size(); ++i) out[i] = static_cast<double>(counts[i]);
  return out;
}

// takeRankLoad() -> Float64Array: (token, choice) pairs each expert-parallel rank ran per layer (numLayers x ep,
// layer-major) since the last call.
Napi::Value CpuLlamaWrap::TakeRankLoad(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::vector<int64_t> counts = live(env).takeRankTokens();
  Napi::Float64Array out = Napi::Float64Array::New(env, counts.size());
  for (size_t i = 0; i < counts.size(); ++i) out[i] = static_cast<double>(counts[i]);
  return out;
}

// expertPlacement() -> { ranks, slotsPerRank, slotExpert: Int32Array (numLayers x ranks x slotsPerRank) }.
Napi::Value CpuLlamaWrap::ExpertPlacementTable(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  ExpertPlacement p;
  try {
    p = live(env).expertPlacement();
  } catch (const BadInput& e) {
    badArgument(env, e.what());
  }
  Napi::Int32Array table = Napi::Int32Array::New(env, p.slotExpert.size() * static_cast<size_t>(p.slots()));
  size_t i = 0;
  for (const auto& row : p.slotExpert)
    for (int32_t e : row) table[i++] = e;
  Napi::Object out = Napi::Object::New(env);
  out.Set("ranks", p.ranks);
  out.Set("slotsPerRank", p.slotsPerRank);
  out.Set("slotExpert", table);
  return out;
}

// applyExpertPlacement(slotExpert: Int32Array, numLayers x ep x slotsPerRank) -> Promise<{ slotsCopied,
// crossRankCopies, bytes }>. Checked here (TANDEM_BAD_ARGUMENT, nothing changed); applied on the pass thread, after
// the passes queued before it and before those queued after.
Napi::Value CpuLlamaWrap::ApplyExpertPlacement(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::shared_ptr<CpuLlama> model = model_;
  CpuLlama& m = live(env);
  std::vector<int32_t> flat = int32s(env, info[0], "the expert placement");
  const size_t layers = static_cast<size_t>(m.config().numLayers);
  const size_t perLayer = static_cast<size_t>(std::max(1, m.parallel().ep)) * m.expertSlotsPerRank();
  if (flat.size() != layers * perLayer)
    badArgument(env, "the expert placement has " + std::to_string(flat.size()) + " slots; " + std::to_string(layers) +
                         " layers x " + std::to_string(m.parallel().ep) + " ranks x " +
                         std::to_string(m.expertSlotsPerRank()) + " slots make " + std::to_string(layers * perLayer));
  std::vector<std::vector<int32_t>> table(layers);
  for (size_t l = 0; l < layers; ++l) table[l].assign(flat.begin() + l * perLayer, flat.begin() + (l + 1) * perLayer);
  auto placement = std::make_shared<ExpertPlacement>();
  try {
    *placement = m.checkExpertPlacement(std::move(table));
  } catch (const BadInput& e) {
    badArgument(env, e.what());
  }
  return runAsync<ExpertPlacementChange>(
      env, *queue_,
      [model, placement]() {
        try {
          return model->applyExpertPlacement(*placement);
        } catch (const BadInput& e) {
          throw NativeError("TANDEM_BAD_ARGUMENT", e.what());
        } catch (const Aborted& e) {
          throw NativeError("TANDEM_DISPOSED", e.what());
        } catch (const std::bad_alloc&) {
          throw NativeError("TANDEM_OUT_OF_MEMORY", "not enough memory to stage the expert copies");
        }
      },
      [](Napi::Env env, ExpertPlacementChange& change) -> Napi::Value {
        Napi::Object out = Napi::Object::New(env);
        out.Set("slotsCopied", change.slotsCopied);
        out.Set("crossRankCopies", change.crossRankCopies);
        out.Set("bytes", static_cast<double>(change.bytes));
        return out;
      });
}

// takeCollectiveTime() -> [{ allReduceMs, gatherMs, barrierMs, handoverMs }] per rank: host time in collectives since
// the last call.
Napi::Value CpuLlamaWrap::TakeCollectiveTime(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::vector<CollectiveTime> times = live(env).takeCollectiveTime();
  Napi::Array out = Napi::Array::New(env, times.size());
  const auto ms = [&](int64_t ns) { return Napi::Number::New(env, static_cast<double>(ns) / 1e6); };
  for (size_t r = 0; r < times.size(); ++r) {
    Napi::Object t = Napi::Object::New(env);
    t.Set("allReduceMs", ms(times[r].allReduceNs));
    t.Set("gatherMs", ms(times[r].gatherNs));
    t.Set("barrierMs", ms(times[r].barrierNs));
    t.Set("handoverMs", ms(times[r].handoverNs));
    out.Set(static_cast<uint32_t>(r), t);
  }
  return out;
}

Napi::Value CpuLlamaWrap::Dispose(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  close();
  auto deferred = Napi::Promise::Deferred::New(env);
  deferred.Resolve(env.Undefined());
  return deferred.Promise();
}

// failRankForTest(rank, layer): the next forward pass throws in that rank just before that layer (test hook).
Napi::Value CpuLlamaWrap::FailRankForTest(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  CpuLlama& model = live(env);
  if (!info[0].IsNumber() || !info[1].IsNumber()) throw Napi::TypeError::New(env, "failRankForTest(rank, layer)");
  model.failRankForTest(info[0].As<Napi::Number>().Int32Value(), info[1].As<Napi::Number>().Int32Value());
  return env.Undefined();
}

Napi::Value CpuLlamaWrap::GetRanks(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), ranks_); }
Napi::Value CpuLlamaWrap::GetThreads(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), threads_); }
Napi::Value CpuLlamaWrap::GetKernel(const Napi::CallbackInfo& info) { return Napi::String::New(info.Env(), kernel_); }
Napi::Value CpuLlamaWrap::GetDisposed(const Napi::CallbackInfo& info) { return Napi::Boolean::New(info.Env(), !model_); }

}  // namespace tandem::engine
