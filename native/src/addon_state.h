// Per-environment state (the main thread and each worker_thread has its own): the channel that
// carries results from addon-owned threads back to JavaScript, and the registry of native objects
// that must be closed when the environment is torn down.
#pragma once

#include <napi.h>

#include <functional>
#include <memory>
#include <mutex>
#include <set>
#include <stdexcept>
#include <string>

#include "work_queue.h"

namespace tandem {

// An error raised on an addon thread. `code` becomes the JS error's `code` property; the TypeScript
// layer maps codes to typed error classes (lib/errors.ts).
struct NativeError : std::runtime_error {
  NativeError(std::string code, const std::string& message)
      : std::runtime_error(message), code(std::move(code)) {}
  std::string code;
};

Napi::Error makeError(Napi::Env env, const std::string& code, const std::string& message);

// Keeps a JS value (a host buffer being copied) alive while an addon thread uses its memory. Release it
// on the JS thread; if the environment is already gone the reference is simply abandoned.
class JsKeepAlive {
 public:
  JsKeepAlive(Napi::Env env, Napi::Value value) : env_(env) { napi_create_reference(env, value, 1, &ref_); }
  void release() {
    if (ref_) napi_delete_reference(env_, ref_);
    ref_ = nullptr;
  }

 private:
  napi_env env_;
  napi_ref ref_ = nullptr;
};

// Something that owns threads or native resources and must be closed before the environment exits.
class Closeable {
 public:
  virtual ~Closeable() = default;
  virtual void close() = 0;  // idempotent; called on the JS thread
};

class AddonState {
 public:
  static AddonState& of(Napi::Env env);
  static void init(Napi::Env env, Napi::Object exports);

  // Delivers `fn` to the JS thread. Callable from any thread; a no-op once the environment is closing.
  void deliver(std::function<void(Napi::Env)> fn);

  // Bookkeeping for pending work: while anything is pending the event loop stays alive.
  void beginPending(Napi::Env env);
  void endPending(Napi::Env env);

  void track(Closeable* object);
  void untrack(Closeable* object);

  WorkQueue& probeQueue();

  bool closing() const { return closing_; }

  Napi::FunctionReference cudaDeviceConstructor;
  Napi::FunctionReference transferAgentConstructor;
  Napi::FunctionReference transferPlanConstructor;
  Napi::FunctionReference ncclCommConstructor;  // native/src/nccl/
  Napi::FunctionReference deviceBufferConstructor;

 private:
  static void cleanup(void* arg);

  Napi::ThreadSafeFunction completions_;
  int pending_ = 0;
  bool closing_ = false;
  std::mutex trackedMutex_;
  std::set<Closeable*> tracked_;
  std::unique_ptr<WorkQueue> probeQueue_;
};

// Runs `work` on `queue` and settles the returned Promise on the JS thread with `toJs(env, result)`.
// A NativeError thrown by `work` rejects with that code; any other exception rejects with
// TANDEM_INTERNAL. `finally`, if given, runs on the JS thread before the Promise settles (to release
// references that kept JS memory alive during the work).
template <typename Result>
Napi::Promise runAsync(Napi::Env env, WorkQueue& queue, std::function<Result()> work,
                       std::function<Napi::Value(Napi::Env, Result&)> toJs,
                       std::function<void(Napi::Env)> finally = nullptr) {
  auto deferred = std::make_shared<Napi::Promise::Deferred>(env);
  AddonState& state = AddonState::of(env);
  state.beginPending(env);
  bool queued = queue.post([&state, deferred, work = std::move(work), toJs = std::move(toJs), finally]() {
    std::shared_ptr<Result> result;
    std::string code, message;
    try {
      result = std::make_shared<Result>(work());
    } catch (const NativeError& e) {
      code = e.code;
      message = e.what();
    } catch (const std::exception& e) {
      code = "TANDEM_INTERNAL";
      message = e.what();
    }
    state.deliver([&state, deferred, result, code, message, toJs, finally](Napi::Env env) {
      state.endPending(env);
      if (finally) finally(env);
      if (result) {
        try {
          deferred->Resolve(toJs(env, *result));
        } catch (const Napi::Error& e) {
          deferred->Reject(e.Value());
        }
      } else {
        deferred->Reject(makeError(env, code, message).Value());
      }
    });
  });
  if (!queued) {
    state.endPending(env);
    if (finally) finally(env);
    deferred->Reject(makeError(env, "TANDEM_DISPOSED", "the object was disposed").Value());
  }
  return deferred->Promise();
}

}  // namespace tandem
