#include "work_queue.h"

#include <pthread.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace tandem {

namespace {

inline void cpuRelax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

}  // namespace

WorkQueue::WorkQueue(std::string name) : name_(std::move(name)) {
  thread_ = std::thread([this] { run(); });
}

WorkQueue::~WorkQueue() { stop(); }

bool WorkQueue::post(std::function<void()> job) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (stopping_) return false;
    jobs_.push_back(std::move(job));
    queued_.store(jobs_.size(), std::memory_order_release);
  }
  wake_.notify_one();
  return true;
}

void WorkQueue::stop() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  wake_.notify_one();
  if (thread_.joinable()) thread_.join();
}

void WorkQueue::run() {
  // Linux limits thread names to 15 characters.
  pthread_setname_np(pthread_self(), name_.substr(0, 15).c_str());
  for (;;) {
    std::function<void()> job;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      bool spun = false;
      while (jobs_.empty() && !stopping_) {
        if (poll_) {
          lock.unlock();
          bool busy = poll_();
          if (busy) std::this_thread::yield();
          lock.lock();
          if (busy) continue;
        }
        if (!spun && spin_.count() > 0) {
          spun = true;
          lock.unlock();
          auto until = std::chrono::steady_clock::now() + spin_;
          for (unsigned i = 0; queued_.load(std::memory_order_acquire) == 0; ++i) {
            cpuRelax();
            if ((i & 63) == 63 && std::chrono::steady_clock::now() >= until) break;
          }
          lock.lock();
          continue;
        }
        if (jobs_.empty() && !stopping_) wake_.wait(lock);
      }
      if (jobs_.empty()) {
        lock.unlock();
        // Stopping: let in-flight work finish before the thread ends.
        while (poll_ && poll_()) std::this_thread::yield();
        return;
      }
      job = std::move(jobs_.front());
      jobs_.pop_front();
      running_.store(true, std::memory_order_release);  // before queued_ drops: never both look idle
      queued_.store(jobs_.size(), std::memory_order_release);
    }
    job();
    if (poll_) poll_();
    running_.store(false, std::memory_order_release);
  }
}

}  // namespace tandem
