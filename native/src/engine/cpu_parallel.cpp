#include "cpu_parallel.h"

#include <algorithm>
#include <cstring>
#include <string>

namespace tandem::engine {

void checkParallelConfig(const LlamaConfig& c, const ParallelConfig& p) {
  if (p.tp < 1 || p.pp < 1 || p.ep < 1) throw BadInput("tensor, pipeline and expert parallel sizes must be positive");
  if (p.ep > 1) {
    if (c.moe.numExperts == 0) throw BadInput("expert parallelism needs a mixture-of-experts model");
    if (c.moe.numExperts % p.ep != 0)
      throw BadInput("expert parallel size " + std::to_string(p.ep) + " does not divide the model's " +
                     std::to_string(c.moe.numExperts) + " experts");
    if (p.tp != 1 && p.tp != p.ep)
      throw BadInput("expert parallel size " + std::to_string(p.ep) + " with tensor parallel size " +
                     std::to_string(p.tp) +
                     ": the expert-parallel ranks are the tensor-parallel ranks (tp 1 or tp = ep)");
  } else if (c.moe.numExperts > 0 && c.moe.intermediateSize % p.tp != 0) {
    throw BadInput("tensor parallel size " + std::to_string(p.tp) + " does not divide the experts' intermediate size " +
                   std::to_string(c.moe.intermediateSize));
  } else if (c.moe.sharedIntermediateSize % p.tp != 0) {
    throw BadInput("tensor parallel size " + std::to_string(p.tp) +
                   " does not divide the shared expert's intermediate size " +
                   std::to_string(c.moe.sharedIntermediateSize));
  }
  if (c.numHeads % p.tp != 0)
    throw BadInput("tensor parallel size " + std::to_string(p.tp) + " does not divide the model's " +
                   std::to_string(c.numHeads) + " attention heads");
  if (c.numKvHeads % p.tp != 0 && p.tp % c.numKvHeads != 0)
    throw BadInput("tensor parallel size " + std::to_string(p.tp) + " neither divides the model's " +
                   std::to_string(c.numKvHeads) + " kv heads nor is a multiple of them");
  if ((c.moe.numExperts == 0 || !c.moe.denseLayers.empty()) && c.intermediateSize % p.tp != 0)
    throw BadInput("tensor parallel size " + std::to_string(p.tp) + " does not divide the intermediate size " +
                   std::to_string(c.intermediateSize));
  if (p.pp > c.numLayers)
    throw BadInput("pipeline parallel size " + std::to_string(p.pp) + " is more stages than the model's " +
                   std::to_string(c.numLayers) + " layers");
}

TensorShard tensorShard(const LlamaConfig& c, int size, int rank) {
  TensorShard s;
  s.rank = rank;
  s.size = size;
  int heads = c.numHeads / size, kv = c.numKvHeads, inter = c.intermediateSize / size;
  s.heads = {rank * heads, heads};
  if (kv >= size) {
    s.kvHeads = {rank * kv / size, kv / size};
  } else {
    s.kvHeads = {rank * kv / size, 1};
    s.writesKv = rank == 0 || (rank - 1) * kv / size != s.kvHeads.start;
  }
  s.intermediate = {rank * inter, inter};
  int part = (c.vocabSize + size - 1) / size;
  int start = std::min(c.vocabSize, rank * part);
  s.vocab = {start, std::min(c.vocabSize, start + part) - start};
  return s;
}

ExpertShard expertShard(const LlamaConfig& c, const ParallelConfig& p, int groupRank) {
  ExpertShard s;
  const int experts = c.moe.numExperts, inter = c.moe.intermediateSize;
  const int shared = c.moe.sharedIntermediateSize;
  if (p.ep > 1) {
    s.experts = {groupRank * (experts / p.ep), experts / p.ep};
    s.intermediate = {0, inter};
    s.shared = {0, shared};
  } else {
    s.experts = {0, experts};
    s.intermediate = {groupRank * (inter / p.tp), inter / p.tp};
    s.shared = {groupRank * (shared / p.tp), shared / p.tp};
  }
  return s;
}

std::vector<IndexRange> stageLayers(int numLayers, int pp) {
  std::vector<IndexRange> out;
  int base = numLayers / pp, extra = numLayers % pp, start = 0;
  for (int s = 0; s < pp; ++s) {
    int count = base + (s < extra ? 1 : 0);
    out.push_back({start, count});
    start += count;
  }
  return out;
}

// ---------------------------------------------------------------------------------------------------------------

void BreakableBarrier::arriveAndWait() {
  std::unique_lock<std::mutex> lock(mutex_);
  if (broken_) throw RankGroupBroken();
  if (++waiting_ == count_) {
    waiting_ = 0;
    ++generation_;
    cv_.notify_all();
    return;
  }
  uint64_t gen = generation_;
  cv_.wait(lock, [&] { return broken_ || generation_ != gen; });
  if (generation_ == gen) throw RankGroupBroken();  // broken before everyone arrived
}

void BreakableBarrier::breakAll() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    broken_ = true;
  }
  cv_.notify_all();
}

void BreakableBarrier::reset() {
  std::lock_guard<std::mutex> lock(mutex_);
  broken_ = false;
  waiting_ = 0;
}

void CollectiveClock::takeInto(CollectiveTime& into) {
  into.allReduceNs += allReduceNs.exchange(0, std::memory_order_relaxed);
  into.gatherNs += gatherNs.exchange(0, std::memory_order_relaxed);
  into.barrierNs += barrierNs.exchange(0, std::memory_order_relaxed);
  into.handoverNs += handoverNs.exchange(0, std::memory_order_relaxed);
}

namespace {
// Adds the time from construction to destruction to `sum` (also when the operation throws RankGroupBroken).
class ScopedClock {
 public:
  explicit ScopedClock(std::atomic<int64_t>& sum) : sum_(sum), t0_(CollectiveClock::Clock::now()) {}
  ~ScopedClock() { sum_.fetch_add(CollectiveClock::since(t0_), std::memory_order_relaxed); }
  ScopedClock(const ScopedClock&) = delete;
  ScopedClock& operator=(const ScopedClock&) = delete;

 private:
  std::atomic<int64_t>& sum_;
  CollectiveClock::Clock::time_point t0_;
};
}  // namespace

HostCommunicator::HostCommunicator(int size)
    : size_(size),
      barrier_(size),
      clocks_(size),
      buffers_(size),
      parts_(size),
      partCols_(size),
      reduced_(size) {}

void HostCommunicator::barrier(int rank) {
  ScopedClock clock(clocks_[rank].barrierNs);
  barrier_.arriveAndWait();
}

void HostCommunicator::allReduceSum(int rank, float* data, size_t n) {
  if (size_ == 1) return;
  ScopedClock clock(clocks_[rank].allReduceNs);
  buffers_[rank] = data;
  barrier_.arriveAndWait();  // every rank's buffer published
  size_t begin = n * rank / size_, end = n * (rank + 1) / size_;
  std::vector<float>& mine = reduced_[rank];
  mine.assign(buffers_[0] + begin, buffers_[0] + end);
  for (int r = 1; r < size_; ++r) {
    const float* src = buffers_[r];
    for (size_t i = begin; i < end; ++i) mine[i - begin] += src[i];
  }
  barrier_.arriveAndWait();  // every slice reduced; nobody reads the inputs any more
  for (int r = 0; r < size_; ++r) {
    size_t b = n * r / size_;
    if (!reduced_[r].empty()) std::memcpy(data + b, reduced_[r].data(), reduced_[r].size() * sizeof(float));
  }
  // reduced_[r] is rewritten only by rank r, after the next operation's first barrier, which every rank reaches
  // only once it has finished copying here.
}

void HostCommunicator::gatherColumns(int rank, int root, const float* part, size_t rows, size_t cols, float* out,
                                     size_t totalCols) {
  if (size_ == 1) {
    for (size_t row = 0; row < rows; ++row)
      std::memcpy(out + row * totalCols, part + row * cols, cols * sizeof(float));
    return;
  }
  ScopedClock clock(clocks_[rank].gatherNs);
  parts_[rank] = part;
  partCols_[rank] = cols;
  barrier_.arriveAndWait();
  if (rank == root) {
    size_t offset = 0;
    for (int r = 0; r < size_; ++r) {
      for (size_t row = 0; row < rows; ++row)
        if (partCols_[r] > 0)
          std::memcpy(out + row * totalCols + offset, parts_[r] + row * partCols_[r], partCols_[r] * sizeof(float));
      offset += partCols_[r];
    }
  }
  barrier_.arriveAndWait();  // the parts may be freed
}

// ---------------------------------------------------------------------------------------------------------------

void ActivationChannel::send(std::vector<float> hidden) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (closed_) throw RankGroupBroken();
    queue_.push_back(std::move(hidden));
  }
  cv_.notify_one();
}

std::vector<float> ActivationChannel::receive() {
  ScopedClock clock(clock_.handoverNs);
  std::unique_lock<std::mutex> lock(mutex_);
  cv_.wait(lock, [&] { return closed_ || !queue_.empty(); });
  if (closed_) throw RankGroupBroken();
  std::vector<float> out = std::move(queue_.front());
  queue_.pop_front();
  return out;
}

void ActivationChannel::close() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    closed_ = true;
  }
  cv_.notify_all();
}

void ActivationChannel::reset() {
  std::lock_guard<std::mutex> lock(mutex_);
  closed_ = false;
  queue_.clear();
}

}  // namespace tandem::engine
