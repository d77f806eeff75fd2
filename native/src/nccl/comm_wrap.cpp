#include "comm_wrap.h"

#include <cmath>
#include <cstring>
#include <set>

#include "../cuda_driver.h"
#include "nccl_library.h"

namespace tandem::nccl {
namespace {

struct Empty {};
Napi::Value undefinedOf(Napi::Env env, Empty&) { return env.Undefined(); }

constexpr uint32_t kDescriptorWords = 7;  // kind, send, recv, count, dtype, redop, peer

Napi::Error failureError(Napi::Env env, const Failure& f) {
  Napi::Error error = makeError(env, f.code, f.message);
  error.Set("communicator", Napi::String::New(env, f.communicator));
  if (!f.operation.empty()) error.Set("operation", Napi::String::New(env, f.operation));
  if (!f.ncclResult.empty()) error.Set("ncclResult", Napi::String::New(env, f.ncclResult));
  return error;
}

Napi::Promise resolved(Napi::Env env, Napi::Value value) {
  auto deferred = Napi::Promise::Deferred::New(env);
  deferred.Resolve(value);
  return deferred.Promise();
}

std::string requireString(const Napi::Value& v, const char* what) {
  if (!v.IsString()) throw Napi::TypeError::New(v.Env(), std::string(what) + " must be a string");
  return v.As<Napi::String>().Utf8Value();
}

// An integer in [lo, hi], as a double on the way in.
int64_t requireInteger(const Napi::Value& v, const char* what, double lo, double hi) {
  if (!v.IsNumber()) throw Napi::TypeError::New(v.Env(), std::string(what) + " must be a number");
  double d = v.As<Napi::Number>().DoubleValue();
  if (!(d >= lo && d <= hi) || d != std::floor(d)) {
    throw makeError(v.Env(), "TANDEM_BAD_ARGUMENT",
                    std::string(what) + " must be an integer in [" + std::to_string(static_cast<int64_t>(lo)) + ", " +
                        std::to_string(static_cast<int64_t>(hi)) + "], got " + v.ToString().Utf8Value());
  }
  return static_cast<int64_t>(d);
}

uint32_t requireTimeout(const Napi::Value& v) {
  return static_cast<uint32_t>(requireInteger(v, "timeoutMs", 1, 2147483647.0));
}

uint64_t requireAddress(const Napi::Value& v, const char* what) {
  if (!v.IsBigInt()) throw Napi::TypeError::New(v.Env(), std::string(what) + " must be a BigInt device address");
  bool lossless = true;
  uint64_t address = v.As<Napi::BigInt>().Uint64Value(&lossless);
  if (!lossless || address == 0) {
    throw makeError(v.Env(), "TANDEM_BAD_ARGUMENT", std::string(what) + " must be a non-null 64-bit device address");
  }
  return address;
}

// NCCL and a GPU, or the reason why not, as a TANDEM_NCCL_UNAVAILABLE error.
const NcclLibrary& requireNccl(Napi::Env env, bool needGpu) {
  const NcclLibrary* nccl = ncclLibraryIfLoaded();
  if (!nccl) {
    throw makeError(env, "TANDEM_NCCL_UNAVAILABLE", "NCCL unavailable: NCCL has not been loaded yet (call ncclLoad first)");
  }
  if (!nccl->available) throw makeError(env, "TANDEM_NCCL_UNAVAILABLE", "NCCL unavailable: " + nccl->reason);
  if (needGpu) {
    const CudaDriver* cuda = cudaDriverIfLoaded();
    if (!cuda || !cuda->available) {
      std::string reason = cuda ? cuda->reason : "the CUDA driver has not been probed yet";
      throw makeError(env, "TANDEM_NCCL_UNAVAILABLE", "NCCL unavailable: no usable GPU (CUDA unavailable: " + reason + ")");
    }
  }
  return *nccl;
}

int requireDevice(const Napi::Value& v) {
  const CudaDriver* cuda = cudaDriverIfLoaded();
  int count = cuda ? cuda->deviceCount : 0;
  int device = static_cast<int>(requireInteger(v, "device", 0, 1e6));
  if (device >= count) {
    throw makeError(v.Env(), "TANDEM_BAD_ARGUMENT",
                    "no CUDA device " + std::to_string(device) + " (this machine has " + std::to_string(count) + ")");
  }
  return device;
}

// Releases a JS host buffer on the JS thread once the communicator thread is done with its memory.
struct HostKeepAlive {
  HostKeepAlive(AddonState* owner, std::shared_ptr<JsKeepAlive> held) : state(owner), keep(std::move(held)) {}
  HostKeepAlive(const HostKeepAlive&) = delete;
  HostKeepAlive& operator=(const HostKeepAlive&) = delete;
  AddonState* state;
  std::shared_ptr<JsKeepAlive> keep;
  ~HostKeepAlive() {
    auto k = keep;
    state->deliver([k](Napi::Env) { k->release(); });
  }
};

}  // namespace

// --------------------------------------------------------------------------------------------------
// CommJsState

void CommJsState::hold() {
  if (outstanding++ == 0 && !self.IsEmpty()) self.Ref();
}

void CommJsState::drop() {
  if (outstanding > 0 && --outstanding == 0 && !self.IsEmpty()) self.Unref();
}

void CommJsState::settleReady(Napi::Env env, Napi::Promise::Deferred& deferred) {
  if (initFailure) deferred.Reject(failureError(env, *initFailure).Value());
  else deferred.Resolve(Napi::Boolean::New(env, core->member()));
}

void CommJsState::settle(Napi::Env env, uint64_t id, const Failure* failure) {
  if (id == 0) {
    initDone = true;
    if (failure) initFailure = std::make_unique<Failure>(*failure);
    for (auto& deferred : readyWaiters) settleReady(env, deferred);
    readyWaiters.clear();
  } else {
    auto it = pending.find(id);
    if (it == pending.end()) return;
    Napi::Promise::Deferred deferred = it->second;
    pending.erase(it);
    if (failure) deferred.Reject(failureError(env, *failure).Value());
    else deferred.Resolve(env.Undefined());
  }
  drop();
}

// --------------------------------------------------------------------------------------------------
// NcclComm

Napi::Object NcclCommWrap::Make(Napi::Env env, CommOptions options,
                                const std::function<void(const std::shared_ptr<Communicator>&)>& start) {
  const NcclLibrary& nccl = requireNccl(env, true);
  AddonState& state = AddonState::of(env);
  auto js = std::make_shared<CommJsState>();
  std::weak_ptr<CommJsState> weak = js;
  AddonState* statePtr = &state;
  Communicator::Settle settle = [statePtr, weak](uint64_t id, const Failure* failure) {
    std::shared_ptr<Failure> copy = failure ? std::make_shared<Failure>(*failure) : nullptr;
    statePtr->deliver([statePtr, weak, id, copy](Napi::Env env) {
      statePtr->endPending(env);
      if (auto js = weak.lock()) js->settle(env, id, copy.get());
    });
  };
  js->core = std::make_shared<Communicator>(nccl, *cudaDriverIfLoaded(), std::move(options), std::move(settle));
  auto* payload = new std::shared_ptr<CommJsState>(js);
  auto external = Napi::External<std::shared_ptr<CommJsState>>::New(
      env, payload, [](Napi::Env, std::shared_ptr<CommJsState>* p) { delete p; });
  Napi::Object object = state.ncclCommConstructor.New({external});
  // Init is outstanding until its settlement arrives (id 0).
  js->hold();
  state.beginPending(env);
  start(js->core);
  return object;
}

void NcclCommWrap::Init(Napi::Env env, Napi::Object exports) {
  Napi::Function ctor = DefineClass(env, "NcclComm",
                                    {
                                        InstanceMethod<&NcclCommWrap::Ready>("ready"),
                                        InstanceMethod<&NcclCommWrap::Split>("split"),
                                        InstanceMethod<&NcclCommWrap::Submit>("submit"),
                                        InstanceMethod<&NcclCommWrap::Alloc>("alloc"),
                                        InstanceMethod<&NcclCommWrap::Free>("free"),
                                        InstanceMethod<&NcclCommWrap::CopyToDevice>("copyToDevice"),
                                        InstanceMethod<&NcclCommWrap::CopyToHost>("copyToHost"),
                                        InstanceMethod<&NcclCommWrap::Memset>("memset"),
                                        InstanceMethod<&NcclCommWrap::Abort>("abort"),
                                        InstanceMethod<&NcclCommWrap::Dispose>("dispose"),
                                        InstanceAccessor<&NcclCommWrap::GetName>("name"),
                                        InstanceAccessor<&NcclCommWrap::GetDevice>("device"),
                                        InstanceAccessor<&NcclCommWrap::GetRank>("rank"),
                                        InstanceAccessor<&NcclCommWrap::GetSize>("size"),
                                        InstanceAccessor<&NcclCommWrap::GetMember>("member"),
                                        InstanceAccessor<&NcclCommWrap::GetDisposed>("disposed"),
                                        InstanceAccessor<&NcclCommWrap::GetAborted>("aborted"),
                                        InstanceAccessor<&NcclCommWrap::GetAbortReason>("abortReason"),
                                    });
  AddonState::of(env).ncclCommConstructor = Napi::Persistent(ctor);
  exports.Set("NcclComm", ctor);

  // ncclLoad(candidates: string[]) -> Promise<{ available, reason?, libraryPath?, versionCode, version?, fp8 }>
  exports.Set("ncclLoad", Napi::Function::New(
                              env,
                              [](const Napi::CallbackInfo& info) -> Napi::Value {
                                Napi::Env env = info.Env();
                                if (!info[0].IsArray()) throw Napi::TypeError::New(env, "ncclLoad expects an array of library candidates");
                                Napi::Array list = info[0].As<Napi::Array>();
                                std::vector<std::string> candidates;
                                for (uint32_t i = 0; i < list.Length(); ++i) {
                                  candidates.push_back(requireString(list.Get(i), "library candidate"));
                                }
                                struct Status {
                                  const NcclLibrary* library;
                                };
                                return runAsync<Status>(
                                    env, AddonState::of(env).probeQueue(),
                                    [candidates]() { return Status{&loadNcclLibrary(candidates)}; },
                                    [](Napi::Env env, Status& s) -> Napi::Value {
                                      const NcclLibrary& n = *s.library;
                                      Napi::Object o = Napi::Object::New(env);
                                      o.Set("available", n.available);
                                      if (!n.reason.empty()) o.Set("reason", n.reason);
                                      if (!n.libraryPath.empty()) o.Set("libraryPath", n.libraryPath);
                                      o.Set("versionCode", n.versionCode);
                                      if (n.versionCode > 0) o.Set("version", n.version());
                                      o.Set("fp8", n.available && n.hasFp8());
                                      return o;
                                    });
                              },
                              "ncclLoad"));

  // ncclUniqueId() -> Promise<Buffer> (128 bytes). Needs NCCL, not a GPU: the process that makes the id
  // runs NCCL's bootstrap root and must live until every rank has joined.
  exports.Set("ncclUniqueId", Napi::Function::New(
                                  env,
                                  [](const Napi::CallbackInfo& info) -> Napi::Value {
                                    Napi::Env env = info.Env();
                                    const NcclLibrary* nccl = &requireNccl(env, false);
                                    using Bytes = std::vector<char>;
                                    return runAsync<Bytes>(
                                        env, AddonState::of(env).probeQueue(),
                                        [nccl]() {
                                          ncclUniqueId id{};
                                          ncclResult_t r = nccl->ncclGetUniqueId(&id);
                                          if (r != ncclSuccess) {
                                            throw NativeError("TANDEM_NCCL_ERROR", "ncclGetUniqueId failed: " + nccl->describe(r));
                                          }
                                          return Bytes(id.internal, id.internal + kUniqueIdBytes);
                                        },
                                        [](Napi::Env env, Bytes& bytes) -> Napi::Value {
                                          return Napi::Buffer<uint8_t>::Copy(env, reinterpret_cast<uint8_t*>(bytes.data()),
                                                                             bytes.size());
                                        });
                                  },
                                  "ncclUniqueId"));

  // ncclInit({ name, device, rank, size, id, timeoutMs }) -> NcclComm (init under way; see ready())
  exports.Set("ncclInit", Napi::Function::New(
                              env,
                              [](const Napi::CallbackInfo& info) -> Napi::Value {
                                Napi::Env env = info.Env();
                                requireNccl(env, true);
                                if (!info[0].IsObject()) throw Napi::TypeError::New(env, "ncclInit expects an options object");
                                Napi::Object o = info[0].As<Napi::Object>();
                                CommOptions options;
                                options.name = requireString(o.Get("name"), "name");
                                options.device = requireDevice(o.Get("device"));
                                options.size = static_cast<int>(requireInteger(o.Get("size"), "size", 1, 1 << 24));
                                options.rank = static_cast<int>(requireInteger(o.Get("rank"), "rank", 0, options.size - 1));
                                options.timeoutMs = requireTimeout(o.Get("timeoutMs"));
                                Napi::Value idValue = o.Get("id");
                                if (!idValue.IsTypedArray() || idValue.As<Napi::TypedArray>().ByteLength() != kUniqueIdBytes) {
                                  throw makeError(env, "TANDEM_BAD_ARGUMENT",
                                                  "id must be the " + std::to_string(kUniqueIdBytes) +
                                                      " bytes that createUniqueId() returned");
                                }
                                Napi::TypedArray t = idValue.As<Napi::TypedArray>();
                                ncclUniqueId id{};
                                std::memcpy(id.internal, static_cast<const char*>(t.ArrayBuffer().Data()) + t.ByteOffset(),
                                            kUniqueIdBytes);
                                return Make(env, std::move(options),
                                            [id](const std::shared_ptr<Communicator>& c) { c->startFromId(id); });
                              },
                              "ncclInit"));

  // ncclInitAll({ names: string[], devices: number[], timeoutMs }) -> NcclComm[] (rank i on devices[i])
  exports.Set("ncclInitAll", Napi::Function::New(
                                 env,
                                 [](const Napi::CallbackInfo& info) -> Napi::Value {
                                   Napi::Env env = info.Env();
                                   requireNccl(env, true);
                                   if (!info[0].IsObject()) throw Napi::TypeError::New(env, "ncclInitAll expects an options object");
                                   Napi::Object o = info[0].As<Napi::Object>();
                                   if (!o.Get("devices").IsArray() || !o.Get("names").IsArray()) {
                                     throw Napi::TypeError::New(env, "ncclInitAll expects devices and names arrays");
                                   }
                                   Napi::Array devices = o.Get("devices").As<Napi::Array>();
                                   Napi::Array names = o.Get("names").As<Napi::Array>();
                                   uint32_t n = devices.Length();
                                   if (n == 0 || names.Length() != n) {
                                     throw makeError(env, "TANDEM_BAD_ARGUMENT", "devices must be non-empty, with one name per device");
                                   }
                                   uint32_t timeoutMs = requireTimeout(o.Get("timeoutMs"));
                                   std::vector<CommOptions> all;
                                   std::set<int> seen;
                                   for (uint32_t i = 0; i < n; ++i) {
                                     CommOptions c;
                                     c.name = requireString(names.Get(i), "name");
                                     c.device = requireDevice(devices.Get(i));
                                     if (!seen.insert(c.device).second) {
                                       throw makeError(env, "TANDEM_BAD_ARGUMENT",
                                                       "device " + std::to_string(c.device) + " is listed twice");
                                     }
                                     c.rank = static_cast<int>(i);
                                     c.size = static_cast<int>(n);
                                     c.timeoutMs = timeoutMs;
                                     all.push_back(std::move(c));
                                   }
                                   std::vector<std::shared_ptr<Communicator>> cores;
                                   Napi::Array out = Napi::Array::New(env, n);
                                   for (uint32_t i = 0; i < n; ++i) {
                                     out.Set(i, Make(env, all[i], [&cores](const std::shared_ptr<Communicator>& c) {
                                               cores.push_back(c);
                                             }));
                                   }
                                   Communicator::startGroup(cores);
                                   return out;
                                 },
                                 "ncclInitAll"));
}

// Constructed only by Make(): new NcclComm(external)
NcclCommWrap::NcclCommWrap(const Napi::CallbackInfo& info) : Napi::ObjectWrap<NcclCommWrap>(info) {
  Napi::Env env = info.Env();
  if (info.Length() != 1 || !info[0].IsExternal()) {
    throw Napi::TypeError::New(env, "NcclComm cannot be constructed directly; use Communicator.init()");
  }
  js_ = *info[0].As<Napi::External<std::shared_ptr<CommJsState>>>().Data();
  js_->self = Napi::Reference<Napi::Object>::New(info.This().As<Napi::Object>(), 0);
  AddonState::of(env).track(this);
}

NcclCommWrap::~NcclCommWrap() { close(); }

void NcclCommWrap::close() {
  if (closed_) return;
  closed_ = true;
  disposed_ = true;
  // Fails what is still pending (delivered to the JS thread, unless the environment is going away)
  // and joins the communicator's threads.
  js_->core->close();
  AddonState::of(Env()).untrack(this);
}

Communicator& NcclCommWrap::live(Napi::Env env) {
  if (disposed_) {
    throw makeError(env, "TANDEM_DISPOSED", js_->core->label() + " was disposed");
  }
  return *js_->core;
}

Napi::Promise NcclCommWrap::track(Napi::Env env, uint64_t id) {
  auto deferred = Napi::Promise::Deferred::New(env);
  js_->pending.emplace(id, deferred);
  js_->hold();
  AddonState::of(env).beginPending(env);
  return deferred.Promise();
}

Napi::Value NcclCommWrap::Ready(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto deferred = Napi::Promise::Deferred::New(env);
  if (js_->initDone) js_->settleReady(env, deferred);
  else js_->readyWaiters.push_back(deferred);
  return deferred.Promise();
}

// split(color, key, name, timeoutMs) -> NcclComm (init under way; ready() resolves false when color
// is NCCL_SPLIT_NOCOLOR, -1)
Napi::Value NcclCommWrap::Split(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Communicator& parent = live(env);
  CommOptions options;
  int color = static_cast<int>(requireInteger(info[0], "color", -1, 2147483647.0));
  int key = static_cast<int>(requireInteger(info[1], "key", -2147483648.0, 2147483647.0));
  options.name = requireString(info[2], "name");
  options.timeoutMs = requireTimeout(info[3]);
  options.device = parent.options().device;
  std::shared_ptr<Communicator> parentCore = js_->core;
  return Make(env, std::move(options), [parentCore, color, key](const std::shared_ptr<Communicator>& c) {
    c->startFromParent(parentCore, color, key);
  });
}

// submit(descriptor: BigUint64Array (7 words per operation), timeoutMs, label?) -> Promise<void>
Napi::Value NcclCommWrap::Submit(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Communicator& core = live(env);
  if (!info[0].IsTypedArray() || info[0].As<Napi::TypedArray>().TypedArrayType() != napi_biguint64_array) {
    throw Napi::TypeError::New(env, "submit expects a BigUint64Array descriptor");
  }
  Napi::TypedArray t = info[0].As<Napi::TypedArray>();
  size_t words = t.ElementLength();
  if (words == 0 || words % kDescriptorWords != 0) {
    throw makeError(env, "TANDEM_BAD_ARGUMENT", "the descriptor must hold 7 words per operation");
  }
  const uint64_t* d =
      reinterpret_cast<const uint64_t*>(static_cast<const char*>(t.ArrayBuffer().Data()) + t.ByteOffset());
  uint32_t timeoutMs = requireTimeout(info[1]);
  std::string label = info[2].IsString() ? info[2].As<Napi::String>().Utf8Value() : std::string();
  const NcclLibrary& nccl = *ncclLibraryIfLoaded();
  const uint64_t dtypeLimit = nccl.hasFp8() ? ncclNumTypes : ncclFloat8e4m3;
  const int size = core.size();
  std::vector<Op> ops(words / kDescriptorWords);
  for (size_t i = 0; i < ops.size(); ++i) {
    const uint64_t* w = d + i * kDescriptorWords;
    std::string where = "operation " + std::to_string(i);
    if (w[0] >= kNcclOpKinds) throw makeError(env, "TANDEM_BAD_ARGUMENT", where + ": unknown kind " + std::to_string(w[0]));
    if (w[4] >= dtypeLimit) {
      throw makeError(env, "TANDEM_BAD_ARGUMENT",
                      where + ": dtype " + std::to_string(w[4]) + " is not supported by NCCL " + nccl.version());
    }
    if (w[5] >= static_cast<uint64_t>(ncclNumOps)) {
      throw makeError(env, "TANDEM_BAD_ARGUMENT", where + ": unknown reduction " + std::to_string(w[5]));
    }
    Op& op = ops[i];
    op.kind = static_cast<OpKind>(w[0]);
    op.send = w[1];
    op.recv = w[2];
    op.count = w[3];
    op.dtype = static_cast<int>(w[4]);
    op.redop = static_cast<int>(w[5]);
    bool rooted = op.kind == OpKind::Broadcast || op.kind == OpKind::Reduce || op.kind == OpKind::Send ||
                  op.kind == OpKind::Recv;
    if (rooted && (size <= 0 || w[6] >= static_cast<uint64_t>(size))) {
      throw makeError(env, "TANDEM_BAD_ARGUMENT",
                      where + ": rank " + std::to_string(w[6]) + " is out of range for " + core.label());
    }
    op.peer = static_cast<int>(w[6]);
    bool reads = op.kind != OpKind::Recv && op.kind != OpKind::Broadcast;  // broadcast reads only at the root
    bool writes = op.kind != OpKind::Send && op.kind != OpKind::Reduce;    // reduce writes only at the root
    if ((reads && op.send == 0) || (writes && op.recv == 0)) {
      throw makeError(env, "TANDEM_BAD_ARGUMENT", where + ": null device address");
    }
  }
  uint64_t id = nextId_++;
  Napi::Promise promise = track(env, id);
  core.submit(id, std::move(ops), timeoutMs, std::move(label), nullptr);
  return promise;
}

// alloc(bytes) -> Promise<bigint>: device memory on this communicator's GPU, freed at dispose.
Napi::Value NcclCommWrap::Alloc(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Communicator& core = live(env);
  size_t bytes = static_cast<size_t>(requireInteger(info[0], "bytes", 1, 9007199254740991.0));
  std::shared_ptr<Communicator> c = js_->core;
  return runAsync<uint64_t>(
      env, *core.queue(), [c, bytes]() { return c->allocate(bytes); },
      [](Napi::Env env, uint64_t& address) -> Napi::Value { return Napi::BigInt::New(env, address); });
}

Napi::Value NcclCommWrap::Free(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  uint64_t address = requireAddress(info[0], "address");
  if (disposed_) return resolved(env, env.Undefined());  // freed with the communicator
  std::shared_ptr<Communicator> c = js_->core;
  return runAsync<Empty>(
      env, *c->queue(),
      [c, address]() {
        c->release(address);
        return Empty{};
      },
      undefinedOf);
}

// copyToDevice(address, source, timeoutMs) / copyToHost(address, target, timeoutMs): ordered on the
// communicator's stream with its collectives. The address range must lie in one alloc() of this
// communicator.
Napi::Value NcclCommWrap::copy(const Napi::CallbackInfo& info, OpKind kind) {
  Napi::Env env = info.Env();
  Communicator& core = live(env);
  uint64_t address = requireAddress(info[0], "address");
  if (!info[1].IsTypedArray()) throw Napi::TypeError::New(env, "the host side of a copy must be a typed array");
  Napi::TypedArray view = info[1].As<Napi::TypedArray>();
  uint32_t timeoutMs = requireTimeout(info[2]);
  size_t bytes = view.ByteLength();
  if (!core.ownsRange(address, bytes)) {
    throw makeError(env, "TANDEM_OUT_OF_BOUNDS",
                    "a copy of " + std::to_string(bytes) + " bytes at that address does not lie inside one buffer of " +
                        core.label());
  }
  Op op;
  op.kind = kind;
  op.count = bytes;
  op.host = static_cast<uint8_t*>(view.ArrayBuffer().Data()) + view.ByteOffset();
  if (kind == OpKind::CopyToDevice) op.recv = address;
  else op.send = address;
  auto owner = std::make_shared<HostKeepAlive>(&AddonState::of(env), std::make_shared<JsKeepAlive>(env, view));
  uint64_t id = nextId_++;
  Napi::Promise promise = track(env, id);
  core.submit(id, {op}, timeoutMs, std::string(), owner);
  return promise;
}

Napi::Value NcclCommWrap::CopyToDevice(const Napi::CallbackInfo& info) { return copy(info, OpKind::CopyToDevice); }
Napi::Value NcclCommWrap::CopyToHost(const Napi::CallbackInfo& info) { return copy(info, OpKind::CopyToHost); }

// memset(address, byte, bytes, timeoutMs)
Napi::Value NcclCommWrap::Memset(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Communicator& core = live(env);
  uint64_t address = requireAddress(info[0], "address");
  int value = static_cast<int>(requireInteger(info[1], "byte", 0, 255));
  size_t bytes = static_cast<size_t>(requireInteger(info[2], "bytes", 0, 9007199254740991.0));
  uint32_t timeoutMs = requireTimeout(info[3]);
  if (!core.ownsRange(address, bytes)) {
    throw makeError(env, "TANDEM_OUT_OF_BOUNDS",
                    "a fill of " + std::to_string(bytes) + " bytes at that address does not lie inside one buffer of " +
                        core.label());
  }
  Op op;
  op.kind = OpKind::Memset;
  op.recv = address;
  op.count = bytes;
  op.redop = value;
  uint64_t id = nextId_++;
  Napi::Promise promise = track(env, id);
  core.submit(id, {op}, timeoutMs, std::string(), nullptr);
  return promise;
}

// abort(reason?) -> Promise<void>: fails everything pending and aborts the NCCL communicators.
Napi::Value NcclCommWrap::Abort(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (disposed_) return resolved(env, env.Undefined());
  std::string reason = info[0].IsString() ? info[0].As<Napi::String>().Utf8Value() : std::string();
  auto deferred = std::make_shared<Napi::Promise::Deferred>(env);
  AddonState* state = &AddonState::of(env);
  std::weak_ptr<CommJsState> weak = js_;
  js_->hold();
  state->beginPending(env);
  js_->core->requestAbort(reason, [state, weak, deferred]() {
    state->deliver([state, weak, deferred](Napi::Env env) {
      state->endPending(env);
      deferred->Resolve(env.Undefined());
      if (auto js = weak.lock()) js->drop();
    });
  });
  return deferred->Promise();
}

// dispose() -> Promise<void>: waits for what was submitted (each bounded by its timeout), destroys the
// communicator, frees its buffers and joins its threads.
Napi::Value NcclCommWrap::Dispose(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (disposed_) return resolved(env, env.Undefined());
  disposed_ = true;
  std::shared_ptr<Communicator> c = js_->core;
  WorkQueue* queue = c->queue();
  if (!queue) {
    close();
    return resolved(env, env.Undefined());
  }
  auto selfRef = std::make_shared<Napi::ObjectReference>(Napi::Persistent(Value()));
  return runAsync<Empty>(
      env, *queue,
      [c]() {
        c->shutdownOnThread();
        return Empty{};
      },
      undefinedOf, [selfRef](Napi::Env) { NcclCommWrap::Unwrap(selfRef->Value())->close(); });
}

Napi::Value NcclCommWrap::GetName(const Napi::CallbackInfo& info) {
  return Napi::String::New(info.Env(), js_->core->options().name);
}
Napi::Value NcclCommWrap::GetDevice(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), js_->core->options().device);
}
Napi::Value NcclCommWrap::GetRank(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), js_->core->rank()); }
Napi::Value NcclCommWrap::GetSize(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), js_->core->size()); }
Napi::Value NcclCommWrap::GetMember(const Napi::CallbackInfo& info) {
  return Napi::Boolean::New(info.Env(), js_->core->member());
}
Napi::Value NcclCommWrap::GetDisposed(const Napi::CallbackInfo& info) { return Napi::Boolean::New(info.Env(), disposed_); }
// True once the communicator was aborted (a timeout, an NCCL error, abort()); disposal is not an abort.
Napi::Value NcclCommWrap::GetAborted(const Napi::CallbackInfo& info) {
  std::string code = js_->core->abortCode();
  return Napi::Boolean::New(info.Env(), !code.empty() && code != "TANDEM_DISPOSED");
}
Napi::Value NcclCommWrap::GetAbortReason(const Napi::CallbackInfo& info) {
  std::string reason = js_->core->abortReason();
  return reason.empty() ? info.Env().Undefined() : Napi::String::New(info.Env(), reason);
}

}  // namespace tandem::nccl
