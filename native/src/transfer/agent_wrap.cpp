// TransferAgent and TransferPlan as seen from JavaScript. Mechanical: argument unpacking, Promises, and
// the hand-off of completions and notifications from agent threads to the JS thread. Policy (region
// bookkeeping, piece generation, errors as classes, AbortSignal) lives in lib/transfer/.
#include "agent_wrap.h"

#include <cmath>
#include <cstring>

#include "../addon_state.h"
#include "../cuda_driver.h"

namespace tandem::transfer {
namespace {

[[noreturn]] void throwAgentError(Napi::Env env, const AgentError& e) { throw makeError(env, e.code, e.message); }

std::string requireString(const Napi::Value& v, const char* what) {
  if (!v.IsString()) throw Napi::TypeError::New(v.Env(), std::string(what) + " must be a string");
  return v.As<Napi::String>().Utf8Value();
}

uint64_t requireSize(const Napi::Value& v, const char* what) {
  if (!v.IsNumber()) throw Napi::TypeError::New(v.Env(), std::string(what) + " must be a number");
  double d = v.As<Napi::Number>().DoubleValue();
  if (!(d > 0) || d > 9007199254740991.0 || d != std::floor(d)) {
    throw makeError(v.Env(), "TANDEM_BAD_ARGUMENT", std::string(what) + " must be a positive integer");
  }
  return static_cast<uint64_t>(d);
}

std::vector<unsigned char> bytesOf(const Napi::Value& v, const char* what) {
  if (v.IsUndefined() || v.IsNull()) return {};
  if (!v.IsTypedArray()) throw Napi::TypeError::New(v.Env(), std::string(what) + " must be a Uint8Array");
  auto t = v.As<Napi::TypedArray>();
  auto* p = static_cast<unsigned char*>(t.ArrayBuffer().Data()) + t.ByteOffset();
  return std::vector<unsigned char>(p, p + t.ByteLength());
}

template <typename T, napi_typedarray_type Type>
const T* typedData(const Napi::Value& v, const char* what, size_t expected, bool optional) {
  if (optional && (v.IsUndefined() || v.IsNull())) return nullptr;
  if (!v.IsTypedArray() || v.As<Napi::TypedArray>().TypedArrayType() != Type) {
    throw Napi::TypeError::New(v.Env(), std::string(what) + " has the wrong typed-array type");
  }
  auto t = v.As<Napi::TypedArray>();
  if (expected != SIZE_MAX && t.ElementLength() != expected) {
    throw makeError(v.Env(), "TANDEM_BAD_DESCRIPTOR", std::string(what) + " has " + std::to_string(t.ElementLength()) +
                                                          " entries; expected " + std::to_string(expected));
  }
  return reinterpret_cast<const T*>(static_cast<const char*>(t.ArrayBuffer().Data()) + t.ByteOffset());
}

Napi::Object regionToJs(Napi::Env env, const Region& r) {
  Napi::Object o = Napi::Object::New(env);
  o.Set("id", r.id);
  o.Set("kind", memKindName(r.kind));
  o.Set("size", static_cast<double>(r.size));
  o.Set("device", r.device);
  o.Set("address", Napi::BigInt::New(env, static_cast<uint64_t>(r.kind == MemKind::Device ? r.dev : reinterpret_cast<uint64_t>(r.host))));
  return o;
}

const char* backendList[] = {"shm", "tcp", "cuda-ipc", "nccl", "ucx"};

}  // namespace

// --------------------------------------------------------------------------------------------------
// TransferPlan

void TransferPlanWrap::Init(Napi::Env env, Napi::Object exports) {
  Napi::Function ctor = DefineClass(env, "TransferPlan",
                                    {
                                        InstanceAccessor<&TransferPlanWrap::GetBackend>("backend"),
                                        InstanceAccessor<&TransferPlanWrap::GetPieces>("pieces"),
                                        InstanceAccessor<&TransferPlanWrap::GetRequestedPieces>("requestedPieces"),
                                        InstanceAccessor<&TransferPlanWrap::GetBytes>("bytes"),
                                        InstanceAccessor<&TransferPlanWrap::GetOp>("op"),
                                        InstanceAccessor<&TransferPlanWrap::GetPeer>("peer"),
                                        InstanceAccessor<&TransferPlanWrap::GetCopyStrategy>("copyStrategy"),
                                        InstanceMethod<&TransferPlanWrap::Post>("post"),
                                    });
  AddonState::of(env).transferPlanConstructor = Napi::Persistent(ctor);
  exports.Set("TransferPlan", ctor);
}

TransferPlanWrap::TransferPlanWrap(const Napi::CallbackInfo& info) : Napi::ObjectWrap<TransferPlanWrap>(info) {
  if (info.Length() != 2 || !info[0].IsExternal() || !info[1].IsObject() ||
      !info[1].As<Napi::Object>().InstanceOf(AddonState::of(info.Env()).transferAgentConstructor.Value())) {
    throw Napi::TypeError::New(info.Env(), "TransferPlan cannot be constructed directly; use TransferAgent.prepare()");
  }
  plan_ = *info[0].As<Napi::External<std::shared_ptr<Plan>>>().Data();
  agent_ = TransferAgentWrap::Unwrap(info[1].As<Napi::Object>());
  agentRef_ = Napi::Persistent(info[1].As<Napi::Object>());
}

Napi::Value TransferPlanWrap::Post(const Napi::CallbackInfo& info) { return agent_->postPlan(info.Env(), plan_, info[0]); }

Napi::Value TransferPlanWrap::GetBackend(const Napi::CallbackInfo& info) { return Napi::String::New(info.Env(), backendName(plan_->backend)); }
Napi::Value TransferPlanWrap::GetPieces(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), static_cast<double>(plan_->pieces.size()));
}
Napi::Value TransferPlanWrap::GetRequestedPieces(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), static_cast<double>(plan_->piecesBeforeCoalescing));
}
Napi::Value TransferPlanWrap::GetBytes(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), static_cast<double>(plan_->bytes)); }
Napi::Value TransferPlanWrap::GetOp(const Napi::CallbackInfo& info) {
  return Napi::String::New(info.Env(), plan_->op == Op::Write ? "WRITE" : "READ");
}
Napi::Value TransferPlanWrap::GetPeer(const Napi::CallbackInfo& info) { return Napi::String::New(info.Env(), plan_->peer->d.name); }
Napi::Value TransferPlanWrap::GetCopyStrategy(const Napi::CallbackInfo& info) {
  const char* strategy = plan_->state ? plan_->state->copyStrategy() : nullptr;
  return strategy ? Napi::String::New(info.Env(), strategy) : info.Env().Undefined();
}

// --------------------------------------------------------------------------------------------------
// TransferAgent

void TransferAgentWrap::Init(Napi::Env env, Napi::Object exports) {
  Napi::Function ctor = DefineClass(
      env, "TransferAgent",
      {
          InstanceMethod<&TransferAgentWrap::RegisterHost>("registerHost"),
          InstanceMethod<&TransferAgentWrap::AllocShared>("allocShared"),
          InstanceMethod<&TransferAgentWrap::RegisterDevice>("registerDevice"),
          InstanceMethod<&TransferAgentWrap::AllocDevice>("allocDevice"),
          InstanceMethod<&TransferAgentWrap::Deregister>("deregister"),
          InstanceMethod<&TransferAgentWrap::Metadata>("metadata"),
          InstanceMethod<&TransferAgentWrap::LoadRemote>("loadRemote"),
          InstanceMethod<&TransferAgentWrap::RemoveRemote>("removeRemote"),
          InstanceMethod<&TransferAgentWrap::Prepare>("prepare"),
          InstanceMethod<&TransferAgentWrap::Cancel>("cancel"),
          InstanceMethod<&TransferAgentWrap::Notify>("notify"),
          InstanceMethod<&TransferAgentWrap::TakeNotifications>("takeNotifications"),
          InstanceMethod<&TransferAgentWrap::Warmup>("warmup"),
          InstanceMethod<&TransferAgentWrap::Dispose>("dispose"),
          InstanceAccessor<&TransferAgentWrap::GetName>("name"),
          InstanceAccessor<&TransferAgentWrap::GetIncarnation>("incarnation"),
          InstanceAccessor<&TransferAgentWrap::GetTcpPort>("tcpPort"),
          InstanceAccessor<&TransferAgentWrap::GetBackends>("backends"),
          InstanceAccessor<&TransferAgentWrap::GetDisposed>("disposed"),
          InstanceAccessor<&TransferAgentWrap::GetUcxReason>("ucxReason"),
          InstanceAccessor<&TransferAgentWrap::GetNcclReason>("ncclReason"),
          InstanceAccessor<&TransferAgentWrap::GetDirectPosts>("directPosts"),
          InstanceAccessor<&TransferAgentWrap::GetStreamCommits>("streamCommits"),
      });
  AddonState::of(env).transferAgentConstructor = Napi::Persistent(ctor);
  exports.Set("TransferAgent", ctor);
}

// new TransferAgent({ name, tcpHost?, tcpPort?, timeoutMs? }, onNotification(from, bytes))
TransferAgentWrap::TransferAgentWrap(const Napi::CallbackInfo& info) : Napi::ObjectWrap<TransferAgentWrap>(info) {
  Napi::Env env = info.Env();
  if (!info[0].IsObject() || !info[1].IsFunction()) {
    throw Napi::TypeError::New(env, "TransferAgent(options, onNotification) expects an object and a function");
  }
  Napi::Object o = info[0].As<Napi::Object>();
  AgentOptions options;
  options.name = requireString(o.Get("name"), "name");
  if (options.name.empty() || options.name.size() > 255) throw makeError(env, "TANDEM_BAD_ARGUMENT", "agent name must be 1..255 characters");
  if (o.Has("tcpHost") && !o.Get("tcpHost").IsUndefined()) options.tcpHost = requireString(o.Get("tcpHost"), "tcpHost");
  if (o.Has("tcpPort") && !o.Get("tcpPort").IsUndefined()) {
    uint32_t port = o.Get("tcpPort").As<Napi::Number>().Uint32Value();
    if (port > 65535) throw makeError(env, "TANDEM_BAD_ARGUMENT", "tcpPort must be 0..65535");
    options.tcpPort = static_cast<uint16_t>(port);
  }
  if (o.Has("timeoutMs") && !o.Get("timeoutMs").IsUndefined()) options.timeoutMs = static_cast<uint32_t>(requireSize(o.Get("timeoutMs"), "timeoutMs"));
  if (o.Has("notifications") && !o.Get("notifications").IsUndefined()) {
    std::string mode = requireString(o.Get("notifications"), "notifications");
    if (mode != "events" && mode != "poll") throw makeError(env, "TANDEM_BAD_ARGUMENT", "notifications must be 'events' or 'poll'");
    options.pollNotifications = mode == "poll";
  }
  if (o.Has("kernels") && o.Get("kernels").IsTypedArray()) options.kernels = bytesOf(o.Get("kernels"), "kernels");
  if (o.Has("secret") && !o.Get("secret").IsUndefined()) options.secret = bytesOf(o.Get("secret"), "secret");
  if (o.Has("allowedUids") && o.Get("allowedUids").IsArray()) {
    Napi::Array list = o.Get("allowedUids").As<Napi::Array>();
    for (uint32_t i = 0; i < list.Length(); ++i) {
      double uid = list.Get(i).IsNumber() ? list.Get(i).As<Napi::Number>().DoubleValue() : -1;
      if (!(uid >= 0) || uid > 4294967295.0 || uid != std::floor(uid)) {
        throw makeError(env, "TANDEM_BAD_ARGUMENT", "allowedUids must hold uids (integers 0..2^32-1)");
      }
      options.allowedUids.push_back(static_cast<uint32_t>(uid));
    }
  }
  if (o.Has("ucp") && o.Get("ucp").IsArray()) {
    Napi::Array list = o.Get("ucp").As<Napi::Array>();
    for (uint32_t i = 0; i < list.Length(); ++i) options.ucp.push_back(requireString(list.Get(i), "ucp candidate"));
  }
  if (o.Has("nccl") && o.Get("nccl").IsArray()) {
    Napi::Array list = o.Get("nccl").As<Napi::Array>();
    for (uint32_t i = 0; i < list.Length(); ++i) options.nccl.push_back(requireString(list.Get(i), "nccl candidate"));
  }
  js_ = std::make_shared<AgentJsState>();
  js_->onNotification = Napi::Persistent(info[1].As<Napi::Function>());

  AddonState& state = AddonState::of(env);
  AgentCallbacks callbacks;
  std::weak_ptr<AgentJsState> weak = js_;
  callbacks.completed = [&state, weak](uint64_t token, bool ok, std::string code, std::string message) {
    state.deliver([weak, token, ok, code = std::move(code), message = std::move(message)](Napi::Env env) {
      auto js = weak.lock();
      if (!js) return;
      auto it = js->pending.find(token);
      if (it == js->pending.end()) return;  // settled already (canceled or disposed)
      Napi::Promise::Deferred deferred = it->second;
      js->pending.erase(it);
      // A success may carry a result (warmup: how many regions are open); transfers carry none.
      if (ok) deferred.Resolve(message.empty() ? env.Undefined() : Napi::String::New(env, message));
      else deferred.Reject(makeError(env, code, message).Value());
    });
  };
  callbacks.notified = [&state, weak](std::string from, std::vector<unsigned char> message) {
    state.deliver([weak, from = std::move(from), message = std::move(message)](Napi::Env env) {
      auto js = weak.lock();
      if (!js || js->disposed) return;
      Napi::Buffer<unsigned char> bytes = Napi::Buffer<unsigned char>::Copy(env, message.data(), message.size());
      js->onNotification.Call({Napi::String::New(env, from), bytes});
    });
  };
  const CudaDriver* cuda = cudaDriverIfLoaded();
  try {
    agent_ = std::make_unique<Agent>(options, std::move(callbacks), cuda);
  } catch (const AgentError& e) {
    throwAgentError(env, e);
  }
  // A live agent keeps the process alive, like a listening server, until dispose().
  state.beginPending(env);
  state.track(this);
}

TransferAgentWrap::~TransferAgentWrap() { close(); }

void TransferAgentWrap::close() {
  if (!agent_) return;
  js_->disposed = true;
  agent_->close();  // joins its threads; completions it raised meanwhile are queued to the JS thread
  agent_.reset();
  Napi::Env env = Env();
  AddonState& state = AddonState::of(env);
  auto pending = std::move(js_->pending);
  js_->pending.clear();
  if (!state.closing()) {  // at environment teardown there is no JS left to tell
    for (auto& [token, deferred] : pending) {
      deferred.Reject(makeError(env, "TANDEM_DISPOSED", "the transfer agent was disposed").Value());
    }
  }
  js_->onNotification.Reset();
  state.endPending(env);
  state.untrack(this);
}

Agent& TransferAgentWrap::live(Napi::Env env) {
  if (!agent_) throw makeError(env, "TANDEM_DISPOSED", "the transfer agent was disposed");
  return *agent_;
}

Napi::Value TransferAgentWrap::RegisterHost(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsTypedArray()) throw Napi::TypeError::New(env, "registerHost expects a typed array (e.g. a Buffer)");
  auto t = info[0].As<Napi::TypedArray>();
  auto* data = static_cast<unsigned char*>(t.ArrayBuffer().Data()) + t.ByteOffset();
  std::shared_ptr<Region> r;
  try {
    r = live(env).registerHost(data, t.ByteLength());
  } catch (const AgentError& e) {
    throwAgentError(env, e);
  }
  // The region keeps the JS buffer alive until it is deregistered and no transfer uses it.
  auto keep = std::make_shared<JsKeepAlive>(env, t);
  AddonState* state = &AddonState::of(env);
  r->onRelease = [state, keep] { state->deliver([keep](Napi::Env) { keep->release(); }); };
  return regionToJs(env, *r);
}

Napi::Value TransferAgentWrap::AllocShared(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  uint64_t bytes = requireSize(info[0], "bytes");
  bool pinned = info[1].IsBoolean() && info[1].As<Napi::Boolean>().Value();
  std::shared_ptr<Region> r;
  try {
    r = live(env).allocShared(bytes, pinned);
  } catch (const AgentError& e) {
    throwAgentError(env, e);
  }
  Napi::Object o = regionToJs(env, *r);
  // The ArrayBuffer shares ownership of the mapping: it stays valid after deregistration until GC.
  auto* hold = new std::shared_ptr<HostMapping>(r->mapping);
  o.Set("buffer", Napi::ArrayBuffer::New(
                      env, r->host, r->size, [](Napi::Env, void*, std::shared_ptr<HostMapping>* h) { delete h; }, hold));
  return o;
}

Napi::Value TransferAgentWrap::RegisterDevice(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsNumber() || !info[1].IsBigInt()) throw Napi::TypeError::New(env, "registerDevice(device, address: bigint, bytes)");
  int device = info[0].As<Napi::Number>().Int32Value();
  bool lossless = true;
  uint64_t address = info[1].As<Napi::BigInt>().Uint64Value(&lossless);
  uint64_t bytes = requireSize(info[2], "bytes");
  try {
    return regionToJs(env, *live(env).registerDevice(device, address, bytes, false));
  } catch (const AgentError& e) {
    throwAgentError(env, e);
  }
}

Napi::Value TransferAgentWrap::AllocDevice(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsNumber()) throw Napi::TypeError::New(env, "allocDevice(device, bytes)");
  int device = info[0].As<Napi::Number>().Int32Value();
  uint64_t bytes = requireSize(info[1], "bytes");
  try {
    return regionToJs(env, *live(env).allocDevice(device, bytes));
  } catch (const AgentError& e) {
    throwAgentError(env, e);
  }
}

Napi::Value TransferAgentWrap::Deregister(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsNumber()) throw Napi::TypeError::New(env, "deregister(regionId)");
  try {
    live(env).deregister(info[0].As<Napi::Number>().Uint32Value());
  } catch (const AgentError& e) {
    throwAgentError(env, e);
  }
  return env.Undefined();
}

Napi::Value TransferAgentWrap::Metadata(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto blob = live(env).metadata();
  return Napi::Buffer<unsigned char>::Copy(env, blob.data(), blob.size());
}

Napi::Value TransferAgentWrap::LoadRemote(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsTypedArray()) throw Napi::TypeError::New(env, "loadRemote expects the peer's metadata as a Uint8Array");
  auto t = info[0].As<Napi::TypedArray>();
  auto* data = static_cast<unsigned char*>(t.ArrayBuffer().Data()) + t.ByteOffset();
  std::shared_ptr<Peer> peer;
  try {
    peer = live(env).loadRemote(data, t.ByteLength());
  } catch (const AgentError& e) {
    throwAgentError(env, e);
  }
  Napi::Object o = Napi::Object::New(env);
  o.Set("name", peer->d.name);
  o.Set("sameHost", peer->sameHost);
  o.Set("incarnation", Napi::BigInt::New(env, peer->d.incarnation));
  Napi::Array backends = Napi::Array::New(env);
  for (uint32_t i = 0, n = 0; i < 5; ++i) {
    if (peer->d.backends & (1u << i)) backends.Set(n++, backendList[i]);
  }
  o.Set("backends", backends);
  std::lock_guard<std::mutex> lock(peer->mutex);
  Napi::Array regions = Napi::Array::New(env, peer->regions.size());
  for (size_t i = 0; i < peer->regions.size(); ++i) {
    const auto& d = peer->regions[i]->d;
    Napi::Object r = Napi::Object::New(env);
    r.Set("id", d.id);
    r.Set("kind", memKindName(d.kind));
    r.Set("size", static_cast<double>(d.size));
    r.Set("device", d.device);
    regions.Set(i, r);
  }
  o.Set("regions", regions);
  return o;
}

Napi::Value TransferAgentWrap::RemoveRemote(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return Napi::Boolean::New(env, live(env).removeRemote(requireString(info[0], "peer name")));
}

// prepare(op, peer, localIds: Uint32Array, remoteIds: Uint32Array, localOffsets: Float64Array,
//         remoteOffsets: Float64Array, lengths: Float64Array | number, localIdx?: Uint32Array,
//         remoteIdx?: Uint32Array, backend?: string)
Napi::Value TransferAgentWrap::Prepare(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string op = requireString(info[0], "op");
  if (op != "READ" && op != "WRITE") throw makeError(env, "TANDEM_BAD_ARGUMENT", "op must be 'READ' or 'WRITE'");
  std::string peer = requireString(info[1], "peer");
  auto ids = [&](const Napi::Value& v, const char* what) {
    auto t = v.As<Napi::TypedArray>();
    const uint32_t* p = typedData<uint32_t, napi_uint32_array>(v, what, SIZE_MAX, false);
    return std::vector<uint32_t>(p, p + t.ElementLength());
  };
  std::vector<uint32_t> localIds = ids(info[2], "local region ids");
  std::vector<uint32_t> remoteIds = ids(info[3], "remote region ids");
  if (!info[4].IsTypedArray()) throw Napi::TypeError::New(env, "localOffsets must be a Float64Array");
  size_t count = info[4].As<Napi::TypedArray>().ElementLength();
  const double* lo = typedData<double, napi_float64_array>(info[4], "localOffsets", count, false);
  const double* ro = typedData<double, napi_float64_array>(info[5], "remoteOffsets", count, false);
  const double* lengths = nullptr;
  double uniform = 0;
  if (info[6].IsNumber()) {
    uniform = info[6].As<Napi::Number>().DoubleValue();
  } else {
    lengths = typedData<double, napi_float64_array>(info[6], "lengths", count, false);
  }
  const uint32_t* li = typedData<uint32_t, napi_uint32_array>(info[7], "localRegionIndex", count, true);
  const uint32_t* ri = typedData<uint32_t, napi_uint32_array>(info[8], "remoteRegionIndex", count, true);
  std::string backend = info[9].IsString() ? info[9].As<Napi::String>().Utf8Value() : "";
  std::shared_ptr<Plan> plan;
  try {
    plan = live(env).prepare(op == "WRITE" ? Op::Write : Op::Read, peer, localIds, remoteIds, lo, ro, lengths, uniform, li, ri,
                             count, backend);
  } catch (const AgentError& e) {
    throwAgentError(env, e);
  }
  auto* payload = new std::shared_ptr<Plan>(plan);
  auto external = Napi::External<std::shared_ptr<Plan>>::New(env, payload, [](Napi::Env, std::shared_ptr<Plan>* p) { delete p; });
  return AddonState::of(env).transferPlanConstructor.New({external, info.This()});
}

Napi::Value TransferAgentWrap::postPlan(Napi::Env env, const std::shared_ptr<Plan>& plan, const Napi::Value& notification) {
  Agent& agent = live(env);
  std::vector<unsigned char> notif = bytesOf(notification, "notification");
  uint64_t token = nextToken_++;
  // With nothing else of this agent's in flight, a post done on this thread is settled already: no earlier
  // completion can still be on its way to overtake it. Then there is no promise to make (undefined).
  if (agent.post(plan, token, std::move(notif), js_->pending.empty())) return env.Undefined();
  auto deferred = Napi::Promise::Deferred::New(env);
  js_->pending.emplace(token, deferred);
  Napi::Object o = Napi::Object::New(env);
  o.Set("token", static_cast<double>(token));
  o.Set("promise", deferred.Promise());
  return o;
}

Napi::Value TransferAgentWrap::Cancel(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsNumber()) throw Napi::TypeError::New(env, "cancel(token)");
  uint64_t token = static_cast<uint64_t>(info[0].As<Napi::Number>().DoubleValue());
  if (agent_ && js_->pending.count(token)) agent_->cancel(token);
  return env.Undefined();
}

Napi::Value TransferAgentWrap::Notify(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Agent& agent = live(env);
  std::string peer = requireString(info[0], "peer");
  std::vector<unsigned char> message = bytesOf(info[1], "message");
  uint64_t token = nextToken_++;
  // As for post: written into the peer's ring on this thread with nothing else in flight, it is done.
  if (agent.notify(peer, token, std::move(message), js_->pending.empty())) return env.Undefined();
  auto deferred = Napi::Promise::Deferred::New(env);
  js_->pending.emplace(token, deferred);
  return deferred.Promise();
}

// takeNotifications(max?: number) -> [{ from, message: Buffer }]
Napi::Value TransferAgentWrap::TakeNotifications(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Agent& agent = live(env);
  if (!agent.pollsNotifications()) {
    throw makeError(env, "TANDEM_BAD_ARGUMENT",
                    "this agent delivers notifications as 'notification' events; create it with notifications: 'poll' to take them");
  }
  size_t max = info[0].IsUndefined() ? SIZE_MAX : static_cast<size_t>(requireSize(info[0], "max"));
  auto taken = agent.takeNotifications(max);
  Napi::Array out = Napi::Array::New(env, taken.size());
  for (size_t i = 0; i < taken.size(); ++i) {
    Napi::Object o = Napi::Object::New(env);
    o.Set("from", Napi::String::New(env, taken[i].first));
    o.Set("message", Napi::Buffer<unsigned char>::Copy(env, taken[i].second.data(), taken[i].second.size()));
    out.Set(static_cast<uint32_t>(i), o);
  }
  return out;
}

Napi::Value TransferAgentWrap::Warmup(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Agent& agent = live(env);
  std::string peer = requireString(info[0], "peer");
  uint64_t token = nextToken_++;
  auto deferred = Napi::Promise::Deferred::New(env);
  js_->pending.emplace(token, deferred);
  agent.warmup(peer, token);
  return deferred.Promise();
}

Napi::Value TransferAgentWrap::Dispose(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  close();
  auto deferred = Napi::Promise::Deferred::New(env);
  deferred.Resolve(env.Undefined());
  return deferred.Promise();
}

Napi::Value TransferAgentWrap::GetName(const Napi::CallbackInfo& info) {
  return Napi::String::New(info.Env(), agent_ ? agent_->name() : std::string());
}
Napi::Value TransferAgentWrap::GetIncarnation(const Napi::CallbackInfo& info) {
  return Napi::BigInt::New(info.Env(), static_cast<uint64_t>(agent_ ? agent_->incarnation() : 0));
}
Napi::Value TransferAgentWrap::GetTcpPort(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), agent_ ? agent_->tcpPort() : 0); }
Napi::Value TransferAgentWrap::GetBackends(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Array out = Napi::Array::New(env);
  uint32_t mask = agent_ ? agent_->backends() : 0;
  for (uint32_t i = 0, n = 0; i < 5; ++i) {
    if (mask & (1u << i)) out.Set(n++, backendList[i]);
  }
  return out;
}
Napi::Value TransferAgentWrap::GetUcxReason(const Napi::CallbackInfo& info) {
  return Napi::String::New(info.Env(), agent_ ? agent_->ucxReason() : std::string());
}

Napi::Value TransferAgentWrap::GetNcclReason(const Napi::CallbackInfo& info) {
  return Napi::String::New(info.Env(), agent_ ? agent_->ncclReason() : std::string());
}
Napi::Value TransferAgentWrap::GetDirectPosts(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), agent_ ? static_cast<double>(agent_->directPosts()) : 0);
}

Napi::Value TransferAgentWrap::GetStreamCommits(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), agent_ ? static_cast<double>(agent_->streamCommits()) : 0);
}
Napi::Value TransferAgentWrap::GetDisposed(const Napi::CallbackInfo& info) { return Napi::Boolean::New(info.Env(), !agent_); }

}  // namespace tandem::transfer
