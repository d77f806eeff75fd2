// NcclComm as seen from JavaScript, and the module functions ncclLoad, ncclUniqueId, ncclInit and
// ncclInitAll. Mechanical: argument unpacking, Promises, and the hand-off of settlements from the
// communicator's threads to the JS thread. Defaults, buffer validation and the public API live in
// lib/collectives/.
#pragma once

#include <napi.h>

#include <functional>
#include <map>
#include <memory>
#include <vector>

#include "../addon_state.h"
#include "communicator.h"

namespace tandem::nccl {

// JS-thread state of one communicator. Deliveries from its threads reach it through a weak_ptr, so a
// settlement that arrives after the wrapper is gone finds nothing, safely.
struct CommJsState {
  std::shared_ptr<Communicator> core;
  // Weak while nothing is outstanding; strong while init, an operation or an abort is, so that the
  // wrapper (and the Promises it settles) cannot be collected under them.
  Napi::ObjectReference self;
  std::map<uint64_t, Napi::Promise::Deferred> pending;
  std::vector<Napi::Promise::Deferred> readyWaiters;
  bool initDone = false;
  std::unique_ptr<Failure> initFailure;
  size_t outstanding = 0;

  void hold();
  void drop();
  void settle(Napi::Env env, uint64_t id, const Failure* failure);
  void settleReady(Napi::Env env, Napi::Promise::Deferred& deferred);
};

class NcclCommWrap : public Napi::ObjectWrap<NcclCommWrap>, public Closeable {
 public:
  static void Init(Napi::Env env, Napi::Object exports);
  explicit NcclCommWrap(const Napi::CallbackInfo& info);
  ~NcclCommWrap() override;
  void close() override;

  // Makes a communicator and its JS object; `start` begins its init.
  static Napi::Object Make(Napi::Env env, CommOptions options,
                           const std::function<void(const std::shared_ptr<Communicator>&)>& start);

 private:
  Communicator& live(Napi::Env env);
  Napi::Value Ready(const Napi::CallbackInfo& info);
  Napi::Value Split(const Napi::CallbackInfo& info);
  Napi::Value Submit(const Napi::CallbackInfo& info);
  Napi::Value Alloc(const Napi::CallbackInfo& info);
  Napi::Value Free(const Napi::CallbackInfo& info);
  Napi::Value CopyToDevice(const Napi::CallbackInfo& info);
  Napi::Value CopyToHost(const Napi::CallbackInfo& info);
  Napi::Value Memset(const Napi::CallbackInfo& info);
  Napi::Value Abort(const Napi::CallbackInfo& info);
  Napi::Value Dispose(const Napi::CallbackInfo& info);
  Napi::Value GetName(const Napi::CallbackInfo& info);
  Napi::Value GetDevice(const Napi::CallbackInfo& info);
  Napi::Value GetRank(const Napi::CallbackInfo& info);
  Napi::Value GetSize(const Napi::CallbackInfo& info);
  Napi::Value GetMember(const Napi::CallbackInfo& info);
  Napi::Value GetDisposed(const Napi::CallbackInfo& info);
  Napi::Value GetAborted(const Napi::CallbackInfo& info);
  Napi::Value GetAbortReason(const Napi::CallbackInfo& info);

  // Registers an operation whose settlement comes back through the communicator's Settle.
  Napi::Promise track(Napi::Env env, uint64_t id);
  Napi::Value copy(const Napi::CallbackInfo& info, OpKind kind);

  std::shared_ptr<CommJsState> js_;
  bool disposed_ = false;
  bool closed_ = false;
  uint64_t nextId_ = 1;  // 0 is init's
};

}  // namespace tandem::nccl
