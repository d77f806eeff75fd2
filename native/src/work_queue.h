// A FIFO of jobs run by one thread that the addon owns (never libuv's pool). Each GPU gets one, so
// that its context is current on exactly one thread; the capability probe gets another.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <string>
#include <thread>

namespace tandem {

class WorkQueue {
 public:
  explicit WorkQueue(std::string name);
  ~WorkQueue();  // stops and joins; jobs not yet started are run first (nothing is dropped)
  WorkQueue(const WorkQueue&) = delete;
  WorkQueue& operator=(const WorkQueue&) = delete;

  // Queues a job. Returns false (and does not run it) once stop() has begun.
  bool post(std::function<void()> job);

  // Runs every queued job, then joins the thread. Idempotent; must not be called from the queue's
  // own thread.
  void stop();

  // While `poll` returns true (work is in flight elsewhere, e.g. on a GPU), the thread does not sleep
  // between jobs: it calls `poll` again at once (yielding the CPU), so completions are seen within
  // microseconds. Set before posting work that needs it; called on the queue's thread only.
  void setPoll(std::function<bool()> poll) { poll_ = std::move(poll); }

  // After it runs out of work the thread keeps watching for new jobs this long before it sleeps, so
  // that a job posted soon after the last is picked up without a futex wake (several microseconds).
  // Costs a core while it spins; zero (the default) sleeps at once. Set before posting work.
  void setSpin(std::chrono::microseconds spin) { spin_ = spin; }

  // Nothing queued and no job running (a snapshot: another thread may post right after). A thread
  // that is the only one posting some kind of job can rely on it for that kind.
  bool idle() const {
    return queued_.load(std::memory_order_acquire) == 0 && !running_.load(std::memory_order_acquire);
  }

  bool onQueueThread() const { return std::this_thread::get_id() == thread_.get_id(); }
  const std::string& name() const { return name_; }

 private:
  void run();

  std::string name_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::deque<std::function<void()>> jobs_;
  std::function<bool()> poll_;
  std::chrono::microseconds spin_{0};
  std::atomic<size_t> queued_{0};  // jobs_.size(), readable without the lock
  std::atomic<bool> running_{false};  // a job taken off jobs_ has not finished yet
  bool stopping_ = false;
  std::thread thread_;
};

}  // namespace tandem
