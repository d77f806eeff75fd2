#include "addon_state.h"

#include <vector>

namespace tandem {

Napi::Error makeError(Napi::Env env, const std::string& code, const std::string& message) {
  Napi::Error error = Napi::Error::New(env, message);
  error.Set("code", Napi::String::New(env, code));
  return error;
}

AddonState& AddonState::of(Napi::Env env) { return *env.GetInstanceData<AddonState>(); }

void AddonState::init(Napi::Env env, Napi::Object exports) {
  auto* state = new AddonState();
  env.SetInstanceData<AddonState>(state);  // deleted by node-addon-api when the env goes away
  state->completions_ = Napi::ThreadSafeFunction::New(
      env, Napi::Function::New(env, [](const Napi::CallbackInfo&) {}), "tandem-completions", 0, 1);
  state->completions_.Unref(env);
  napi_add_env_cleanup_hook(env, &AddonState::cleanup, state);
  (void)exports;
}

void AddonState::cleanup(void* arg) {
  auto* state = static_cast<AddonState*>(arg);
  state->closing_ = true;
  std::vector<Closeable*> objects;
  {
    std::lock_guard<std::mutex> lock(state->trackedMutex_);
    objects.assign(state->tracked_.begin(), state->tracked_.end());
  }
  // Close objects (which joins their threads) before the completion channel goes away.
  for (Closeable* object : objects) object->close();
  if (state->probeQueue_) state->probeQueue_->stop();
  state->completions_.Release();
}

void AddonState::deliver(std::function<void(Napi::Env)> fn) {
  auto* boxed = new std::function<void(Napi::Env)>(std::move(fn));
  napi_status status = completions_.BlockingCall(
      boxed, [](Napi::Env env, Napi::Function, std::function<void(Napi::Env)>* call) {
        // env is null when the environment is shutting down: drop the result, free the box.
        if (env != nullptr) (*call)(env);
        delete call;
      });
  if (status != napi_ok) delete boxed;
}

void AddonState::beginPending(Napi::Env env) {
  if (pending_++ == 0 && !closing_) completions_.Ref(env);
}

void AddonState::endPending(Napi::Env env) {
  if (--pending_ == 0 && !closing_) completions_.Unref(env);
}

void AddonState::track(Closeable* object) {
  std::lock_guard<std::mutex> lock(trackedMutex_);
  tracked_.insert(object);
}

void AddonState::untrack(Closeable* object) {
  std::lock_guard<std::mutex> lock(trackedMutex_);
  tracked_.erase(object);
}

WorkQueue& AddonState::probeQueue() {
  if (!probeQueue_) probeQueue_ = std::make_unique<WorkQueue>("tandem-probe");
  return *probeQueue_;
}

}  // namespace tandem
