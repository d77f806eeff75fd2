#pragma once

#include <napi.h>

#include <map>
#include <memory>

#include "../addon_state.h"
#include "agent.h"

namespace tandem::transfer {

class TransferAgentWrap;

class TransferPlanWrap : public Napi::ObjectWrap<TransferPlanWrap> {
 public:
  static void Init(Napi::Env env, Napi::Object exports);
  explicit TransferPlanWrap(const Napi::CallbackInfo& info);

 private:
  // post(notification?) on the plan itself: V8 checks the receiver's class (the method's signature), so
  // the hot path needs no instanceof and one unwrap, not two (a third of the call's cost for small posts).
  Napi::Value Post(const Napi::CallbackInfo& info);
  Napi::Value GetBackend(const Napi::CallbackInfo& info);
  Napi::Value GetPieces(const Napi::CallbackInfo& info);
  Napi::Value GetRequestedPieces(const Napi::CallbackInfo& info);
  Napi::Value GetBytes(const Napi::CallbackInfo& info);
  Napi::Value GetOp(const Napi::CallbackInfo& info);
  Napi::Value GetPeer(const Napi::CallbackInfo& info);
  Napi::Value GetCopyStrategy(const Napi::CallbackInfo& info);
  std::shared_ptr<Plan> plan_;
  TransferAgentWrap* agent_ = nullptr;  // the agent that prepared it, kept alive by agentRef_
  Napi::ObjectReference agentRef_;
};

// State the agent's threads reach through deliver(): touched only on the JS thread, and shared so
// that a completion queued before the wrapper was collected still finds valid memory.
struct AgentJsState {
  std::map<uint64_t, Napi::Promise::Deferred> pending;
  Napi::FunctionReference onNotification;
  bool disposed = false;
};

class TransferAgentWrap : public Napi::ObjectWrap<TransferAgentWrap>, public Closeable {
 public:
  static void Init(Napi::Env env, Napi::Object exports);
  explicit TransferAgentWrap(const Napi::CallbackInfo& info);
  ~TransferAgentWrap() override;
  void close() override;
  // TransferPlan.post: { token, promise }, or undefined when the post finished during the call.
  Napi::Value postPlan(Napi::Env env, const std::shared_ptr<Plan>& plan, const Napi::Value& notification);

 private:
  Agent& live(Napi::Env env);
  Napi::Value RegisterHost(const Napi::CallbackInfo& info);
  Napi::Value AllocShared(const Napi::CallbackInfo& info);
  Napi::Value RegisterDevice(const Napi::CallbackInfo& info);
  Napi::Value AllocDevice(const Napi::CallbackInfo& info);
  Napi::Value Deregister(const Napi::CallbackInfo& info);
  Napi::Value Metadata(const Napi::CallbackInfo& info);
  Napi::Value LoadRemote(const Napi::CallbackInfo& info);
  Napi::Value RemoveRemote(const Napi::CallbackInfo& info);
  Napi::Value Prepare(const Napi::CallbackInfo& info);
  Napi::Value Cancel(const Napi::CallbackInfo& info);
  Napi::Value Notify(const Napi::CallbackInfo& info);
  Napi::Value TakeNotifications(const Napi::CallbackInfo& info);
  Napi::Value Warmup(const Napi::CallbackInfo& info);
  Napi::Value Dispose(const Napi::CallbackInfo& info);
  Napi::Value GetName(const Napi::CallbackInfo& info);
  Napi::Value GetIncarnation(const Napi::CallbackInfo& info);
  Napi::Value GetTcpPort(const Napi::CallbackInfo& info);
  Napi::Value GetBackends(const Napi::CallbackInfo& info);
  Napi::Value GetDisposed(const Napi::CallbackInfo& info);
  Napi::Value GetUcxReason(const Napi::CallbackInfo& info);
  Napi::Value GetNcclReason(const Napi::CallbackInfo& info);
  Napi::Value GetDirectPosts(const Napi::CallbackInfo& info);
  Napi::Value GetStreamCommits(const Napi::CallbackInfo& info);

  std::unique_ptr<Agent> agent_;
  std::shared_ptr<AgentJsState> js_;
  uint64_t nextToken_ = 1;
};

}  // namespace tandem::transfer
