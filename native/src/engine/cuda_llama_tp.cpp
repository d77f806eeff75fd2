#include "cuda_llama_tp.h"

#include <algorithm>
#include <cstdint>

namespace tandem::engine {
namespace {

// tandem_tp_sum_f32's sources (native/kernels/tp.cu declares the same struct): up to kMaxRanks addresses, by value.
struct TpSources {
  CUdeviceptr p[LocalTpGroup::kMaxRanks];
};
constexpr unsigned kThreads = 256;
constexpr unsigned kMaxSumBlocks = 4096;

}  // namespace

TpShard tpShardOf(const LlamaConfig& c, int size, int rank) {
  if (size < 1) throw BadInput("tensor parallel size must be at least 1 (got " + std::to_string(size) + ")");
  if (rank < 0 || rank >= size)
    throw BadInput("tensor parallel rank " + std::to_string(rank) + " is not one of 0.." + std::to_string(size - 1));
  if (c.numHeads % size != 0)
    throw BadInput("tensor parallel size " + std::to_string(size) + " does not divide the model's " +
                   std::to_string(c.numHeads) + " attention heads");
  if (c.numKvHeads % size != 0 && size % c.numKvHeads != 0)
    throw BadInput("tensor parallel size " + std::to_string(size) + " neither divides the model's " +
                   std::to_string(c.numKvHeads) + " kv heads nor is a multiple of them");
  if (c.intermediateSize % size != 0)
    throw BadInput("tensor parallel size " + std::to_string(size) + " does not divide the model's intermediate size " +
                   std::to_string(c.intermediateSize));
  TpShard s;
  s.rank = rank;
  s.size = size;
  s.heads = c.numHeads / size;
  s.headStart = rank * s.heads;
  if (c.numKvHeads >= size) {
    s.kvHeads = c.numKvHeads / size;
    s.kvHeadStart = rank * s.kvHeads;
  } else {
    s.kvHeads = 1;
    s.kvHeadStart = static_cast<int>(static_cast<int64_t>(rank) * c.numKvHeads / size);
  }
  s.inter = c.intermediateSize / size;
  s.interStart = rank * s.inter;
  const int part = (c.vocabSize + size - 1) / size;
  s.vocabStart = std::min(c.vocabSize, rank * part);
  s.vocabRows = std::min(c.vocabSize, s.vocabStart + part) - s.vocabStart;
  return s;
}

LocalTpGroup::LocalTpGroup(int size)
    : size_(size), published_(size, 0), ready_(size, nullptr), done_(size, nullptr), released_(size, false) {
  if (size < 1 || size > kMaxRanks)
    throw BadInput("a local tensor-parallel group holds 1.." + std::to_string(kMaxRanks) + " ranks (got " +
                   std::to_string(size) + ")");
}

void LocalTpGroup::arrive() {
  std::unique_lock<std::mutex> lock(mutex_);
  if (aborted_) throw Aborted(why_);
  const uint64_t generation = generation_;
  if (++arrived_ == size_) {
    arrived_ = 0;
    ++generation_;
    changed_.notify_all();
    return;
  }
  changed_.wait(lock, [&] { return aborted_ || generation_ != generation; });
  if (generation_ == generation) throw Aborted(why_);
}

void LocalTpGroup::abort(const std::string& why) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (aborted_) return;
  aborted_ = true;
  why_ = "the tensor-parallel group was stopped: " + why;
  changed_.notify_all();
}

LocalTpCommunicator::LocalTpCommunicator(std::shared_ptr<LocalTpGroup> group, int rank)
    : group_(std::move(group)), rank_(rank) {
  if (rank < 0 || rank >= group_->size())
    throw BadInput("tensor parallel rank " + std::to_string(rank) + " is not one of 0.." +
                   std::to_string(group_->size() - 1));
}

void LocalTpCommunicator::init(CudaDevice& device) {
  device_ = &device;
  timer_.init(device);
  const CudaDriver& d = device.driver();
  sum_ = device.function("tandem_tp_sum_f32");
  copyColumns_ = device.function("tandem_tp_copy_columns_f32");
  CUevent ready = nullptr, done = nullptr;
  device.check(d.cuEventCreate(&ready, CU_EVENT_DISABLE_TIMING), "cuEventCreate (tensor parallel)");
  if (CUresult r = d.cuEventCreate(&done, CU_EVENT_DISABLE_TIMING)) {
    d.cuEventDestroy(ready);
    device.check(r, "cuEventCreate (tensor parallel)");
  }
  std::lock_guard<std::mutex> lock(group_->mutex_);
  group_->ready_[rank_] = ready;
  group_->done_[rank_] = done;
}

void LocalTpCommunicator::exchange(CUdeviceptr buf, CUstream stream) {
  const CudaDriver& d = device_->driver();
  LocalTpGroup& g = *group_;
  // Written before the barrier, read by the others after it; rewritten only after the next barrier.
  g.published_[rank_] = buf;
  device_->check(d.cuEventRecord(g.ready_[rank_], stream), "cuEventRecord (tensor parallel)");
  g.arrive();
  for (int s = 0; s < g.size_; ++s)
    if (s != rank_) device_->check(d.cuStreamWaitEvent(stream, g.ready_[s], 0), "cuStreamWaitEvent (tensor parallel)");
}

void LocalTpCommunicator::finish(CUstream stream) {
  const CudaDriver& d = device_->driver();
  LocalTpGroup& g = *group_;
  device_->check(d.cuEventRecord(g.done_[rank_], stream), "cuEventRecord (tensor parallel)");
  g.arrive();
  for (int s = 0; s < g.size_; ++s)
    if (s != rank_) device_->check(d.cuStreamWaitEvent(stream, g.done_[s], 0), "cuStreamWaitEvent (tensor parallel)");
}

void LocalTpCommunicator::ensureAccumulator(size_t bytes, CUstream stream) {
  if (accumulator_ && accumulator_->bytes >= bytes) return;
  // Only this rank's stream touches its accumulator: once that is idle the old one can go.
  device_->check(device_->driver().cuStreamSynchronize(stream), "cuStreamSynchronize (tensor parallel)");
  if (accumulator_) device_->freeAllocation(*accumulator_);
  accumulator_.reset();
  accumulator_ = device_->allocate(bytes + bytes / 4, "cuMemAlloc (tensor-parallel all-reduce)");
}

size_t TpCollectiveTimer::begin(CUstream stream) {
  if (!timing_) return SIZE_MAX;
  if (usedSpans_ == kMaxSpans) fold();
  const CudaDriver& d = device_->driver();
  if (usedSpans_ == spans_.size()) {
    Span span;
    device_->check(d.cuEventCreate(&span.start, 0), "cuEventCreate (tensor-parallel timing)");
    if (CUresult r = d.cuEventCreate(&span.end, 0)) {
      d.cuEventDestroy(span.start);
      device_->check(r, "cuEventCreate (tensor-parallel timing)");
    }
    spans_.push_back(span);
  }
  Span& span = spans_[usedSpans_];
  span.ended = false;
  device_->check(d.cuEventRecord(span.start, stream), "cuEventRecord (tensor-parallel timing)");
  return usedSpans_++;
}

void TpCollectiveTimer::end(size_t index, bool gather, CUstream stream) {
  if (index == SIZE_MAX) return;
  Span& span = spans_[index];
  span.gather = gather;
  device_->check(device_->driver().cuEventRecord(span.end, stream), "cuEventRecord (tensor-parallel timing)");
  span.ended = true;
}

void TpCollectiveTimer::fold() {
  const CudaDriver& d = device_->driver();
  // A span whose collective threw (the group was stopped) has no end: it is left out.
  for (size_t i = usedSpans_; i-- > 0;)
    if (spans_[i].ended) {
      device_->check(d.cuEventSynchronize(spans_[i].end), "cuEventSynchronize (tensor-parallel timing)");
      break;
    }
  for (size_t i = 0; i < usedSpans_; ++i) {
    float ms = 0;
    if (!spans_[i].ended || d.cuEventElapsedTime(&ms, spans_[i].start, spans_[i].end) != CUDA_SUCCESS) continue;
    (spans_[i].gather ? folded_.gatherMs : folded_.allReduceMs) += ms;
  }
  usedSpans_ = 0;
}

TpCollectiveTime TpCollectiveTimer::take() {
  if (!device_) throw NativeError("TANDEM_INTERNAL", "the tensor-parallel communicator was not initialised");
  if (!timing_) {
    timing_ = true;
    return {};
  }
  fold();
  TpCollectiveTime out = folded_;
  folded_ = {};
  return out;
}

void TpCollectiveTimer::release() {
  if (device_)
    for (Span& span : spans_) {
      device_->driver().cuEventDestroy(span.start);
      device_->driver().cuEventDestroy(span.end);
    }
  spans_.clear();
  usedSpans_ = 0;
}

TpCollectiveTime LocalTpCommunicator::takeTime() { return timer_.take(); }

void LocalTpCommunicator::allReduceSum(CUdeviceptr buf, size_t count, CUstream stream) {
  if (!device_) throw NativeError("TANDEM_INTERNAL", "the tensor-parallel communicator was not initialised");
  if (group_->size() == 1 || count == 0) return;
  ensureAccumulator(count * 4, stream);
  const size_t span = timer_.begin(stream);
  exchange(buf, stream);
  LocalTpGroup& g = *group_;
  TpSources sources{};
  for (int s = 0; s < g.size_; ++s) sources.p[s] = g.published_[s];
  CUdeviceptr out = accumulator_->ptr;
  unsigned long long n = count;
  int nsrc = g.size_;
  void* params[] = {&out, &n, &nsrc, &sources};
  const unsigned blocks = static_cast<unsigned>(std::min<size_t>((count + kThreads - 1) / kThreads, kMaxSumBlocks));
  device_->check(device_->driver().cuLaunchKernel(sum_, blocks, 1, 1, kThreads, 1, 1, 0, stream, params, nullptr),
                 "cuLaunchKernel (tensor-parallel sum)");
  finish(stream);
  device_->check(device_->driver().cuMemcpyDtoDAsync(buf, out, count * 4, stream),
                 "cuMemcpyDtoDAsync (tensor-parallel sum)");
  timer_.end(span, false, stream);
}

void LocalTpCommunicator::allGatherColumns(CUdeviceptr in, size_t rows, const std::vector<int>& cols, CUdeviceptr out,
                                           CUstream stream) {
  if (!device_) throw NativeError("TANDEM_INTERNAL", "the tensor-parallel communicator was not initialised");
  LocalTpGroup& g = *group_;
  if (static_cast<int>(cols.size()) != g.size_)
    throw BadInput("allGatherColumns: " + std::to_string(cols.size()) + " column counts for " +
                   std::to_string(g.size_) + " ranks");
  int outCols = 0;
  for (int c : cols) outCols += c;
  const size_t span = timer_.begin(stream);
  exchange(in, stream);
  int col0 = 0;
  for (int s = 0; s < g.size_; ++s) {
    CUdeviceptr src = g.published_[s];
    int n = cols[s], r = static_cast<int>(rows);
    if (n > 0 && rows > 0) {
      void* params[] = {&out, &outCols, &col0, &src, &r, &n};
      device_->check(device_->driver().cuLaunchKernel(copyColumns_, static_cast<unsigned>(rows), 1, 1, kThreads, 1, 1,
                                                      0, stream, params, nullptr),
                     "cuLaunchKernel (tensor-parallel gather)");
    }
    col0 += n;
  }
  finish(stream);
  timer_.end(span, true, stream);
}

void LocalTpCommunicator::release() {
  if (accumulator_ && device_) {
    try {
      device_->freeAllocation(*accumulator_);
    } catch (const std::exception&) {
      // the device frees what it still tracks when it closes
    }
  }
  accumulator_.reset();
  timer_.release();
  LocalTpGroup& g = *group_;
  std::lock_guard<std::mutex> lock(g.mutex_);
  if (g.released_[rank_]) return;
  g.released_[rank_] = true;
  // Another rank may still wait on this rank's events (it stops at the next barrier once aborted): the last rank
  // to release, when every rank's stream is idle, destroys them all. Same primary context, so any rank's thread can.
  if (++g.releasedCount_ < g.size_ || !device_) return;
  const CudaDriver& d = device_->driver();
  for (int s = 0; s < g.size_; ++s) {
    if (g.ready_[s]) d.cuEventDestroy(g.ready_[s]);
    if (g.done_[s]) d.cuEventDestroy(g.done_[s]);
    g.ready_[s] = g.done_[s] = nullptr;
  }
}

}  // namespace tandem::engine
