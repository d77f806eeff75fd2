#include "notify_ring.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <cstring>

namespace tandem::transfer {

namespace {
constexpr uint64_t kMagic = 0x474e495246544e54ull;  // "TNTFRING"
constexpr uint32_t kVersion = 2;
constexpr size_t kHeaderBytes = 4096;
constexpr uint32_t kWrap = 1;
constexpr uint32_t kPending = 2;
constexpr uint32_t kSkipped = 4;
struct Record {
  uint32_t length;
  uint32_t flags;
  uint64_t seq;
};
static_assert(sizeof(Record) == 16, "ring record header is 16 bytes");
uint64_t recordBytes(uint64_t length) { return (sizeof(Record) + length + 15) & ~uint64_t{15}; }
std::string errnoText(const char* what) { return std::string(what) + ": " + std::strerror(errno); }
}  // namespace

struct NotifyRing::Header {
  uint64_t magic;
  uint32_t version;
  uint32_t reserved;
  uint64_t capacity;
  alignas(64) std::atomic<uint64_t> head;
  alignas(64) std::atomic<uint64_t> tail;
};
static_assert(std::atomic<uint64_t>::is_always_lock_free, "ring counters are shared between processes");

std::unique_ptr<NotifyRing> NotifyRing::create(uint64_t capacity, std::string& error) {
  int fd = static_cast<int>(syscall(SYS_memfd_create, "tandem-notify-ring", MFD_CLOEXEC));
  if (fd < 0) {
    error = errnoText("memfd_create");
    return nullptr;
  }
  std::unique_ptr<NotifyRing> ring(new NotifyRing());
  ring->memfd_ = fd;
  if (ftruncate(fd, static_cast<off_t>(kHeaderBytes + capacity)) != 0) {
    error = errnoText("ftruncate");
    return nullptr;
  }
  if (!ring->map(fd, true, capacity, error)) return nullptr;
  return ring;
}

std::unique_ptr<NotifyRing> NotifyRing::open(uint32_t pid, int fd, std::string& error) {
  std::string path = "/proc/" + std::to_string(pid) + "/fd/" + std::to_string(fd);
  int local = ::open(path.c_str(), O_RDWR | O_CLOEXEC);
  if (local < 0) {
    error = errnoText(path.c_str());
    return nullptr;
  }
  std::unique_ptr<NotifyRing> ring(new NotifyRing());
  bool ok = ring->map(local, false, 0, error);
  ::close(local);
  return ok ? std::move(ring) : nullptr;
}

bool NotifyRing::map(int fd, bool create, uint64_t capacity, std::string& error) {
  static_assert(sizeof(Header) <= kHeaderBytes, "ring header fits its page");
  if (!create) {
    off_t size = lseek(fd, 0, SEEK_END);
    if (size < static_cast<off_t>(kHeaderBytes) + 4096) {
      error = "notification ring is too small";
      return false;
    }
    capacity = static_cast<uint64_t>(size) - kHeaderBytes;
  }
  if (capacity < 4096 || (capacity & (capacity - 1)) != 0) {
    error = "notification ring capacity must be a power of two of at least 4 KiB";
    return false;
  }
  void* p = mmap(nullptr, kHeaderBytes + capacity, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) {
    error = errnoText("mmap");
    return false;
  }
  mappedBytes_ = kHeaderBytes + capacity;
  header_ = static_cast<Header*>(p);
  data_ = static_cast<unsigned char*>(p) + kHeaderBytes;
  capacity_ = capacity;
  if (create) {
    new (header_) Header{};  // the pages are zero: this only makes the atomics' lifetime explicit
    header_->capacity = capacity;
    header_->version = kVersion;
    header_->magic = kMagic;
  } else if (header_->magic != kMagic || header_->version != kVersion || header_->capacity != capacity) {
    error = "not a notification ring (or another version)";
    return false;
  }
  return true;
}

NotifyRing::~NotifyRing() {
  if (header_) munmap(header_, mappedBytes_);
  if (memfd_ >= 0) ::close(memfd_);
}

bool NotifyRing::tryWrite(uint64_t seq, const unsigned char* bytes, size_t size, uint32_t** pending) {
  if (broken_ || size > capacity_ / 4) return false;
  const uint64_t need = recordBytes(size);
  const uint64_t head = header_->head.load(std::memory_order_relaxed);  // only this producer writes it
  const uint64_t tail = header_->tail.load(std::memory_order_acquire);
  if (tail > head || head - tail > capacity_) {
    broken_ = true;  // the consumer's counter cannot be right: stop using the ring
    return false;
  }
  const uint64_t offset = head & (capacity_ - 1);
  const uint64_t padding = offset + need > capacity_ ? capacity_ - offset : 0;
  if (head + padding + need - tail > capacity_) return false;  // full for now
  if (padding) {
    Record wrap{0, kWrap, 0};
    std::memcpy(data_ + offset, &wrap, sizeof(wrap));
  }
  unsigned char* at = data_ + ((head + padding) & (capacity_ - 1));
  Record record{static_cast<uint32_t>(size), pending ? kPending : kCommitted, seq};
  std::memcpy(at, &record, sizeof(record));
  if (size) std::memcpy(at + sizeof(record), bytes, size);
  if (pending) *pending = reinterpret_cast<uint32_t*>(at + offsetof(Record, flags));
  header_->head.store(head + padding + need, std::memory_order_release);
  return true;
}

void NotifyRing::commit(uint32_t* word, uint64_t seq, bool ok) {
  uint64_t recordSeq;
  std::memcpy(&recordSeq, reinterpret_cast<unsigned char*>(word) + sizeof(uint32_t), sizeof(recordSeq));
  if (recordSeq != seq) return;  // taken, and the space holds another record now
  uint32_t expected = kPending;
  __atomic_compare_exchange_n(word, &expected, ok ? kCommitted : kSkipped, false, __ATOMIC_RELEASE, __ATOMIC_RELAXED);
}

NotifyRing::Front NotifyRing::peek() {
  while (!broken_) {
    const uint64_t head = header_->head.load(std::memory_order_acquire);
    if (head == tail_) return {};
    if (head < tail_ || head - tail_ > capacity_) break;
    const uint64_t offset = tail_ & (capacity_ - 1);
    Record record;
    std::memcpy(&record, data_ + offset, sizeof(record));
    // The commit word is written by another process's CPU or its GPU: read it on its own, with acquire,
    // so that the record's bytes (and the data it announces) are read after it.
    record.flags = __atomic_load_n(reinterpret_cast<uint32_t*>(data_ + offset + offsetof(Record, flags)), __ATOMIC_ACQUIRE);
    if (record.flags == kWrap) {
      tail_ += capacity_ - offset;
      header_->tail.store(tail_, std::memory_order_release);
      continue;
    }
    if ((record.flags != kCommitted && record.flags != kPending && record.flags != kSkipped) ||
        record.length > capacity_ / 4 || offset + recordBytes(record.length) > capacity_ ||
        recordBytes(record.length) > head - tail_ || record.seq == 0) {
      break;
    }
    return {record.seq, record.flags != kPending};
  }
  broken_ = true;
  return {};
}

bool NotifyRing::take(std::vector<unsigned char>& out) {
  const uint64_t offset = tail_ & (capacity_ - 1);
  Record record;
  std::memcpy(&record, data_ + offset, sizeof(record));
  record.flags = __atomic_load_n(reinterpret_cast<uint32_t*>(data_ + offset + offsetof(Record, flags)), __ATOMIC_ACQUIRE);
  const bool deliver = record.flags == kCommitted;
  if (deliver) out.assign(data_ + offset + sizeof(record), data_ + offset + sizeof(record) + record.length);
  tail_ += recordBytes(record.length);
  header_->tail.store(tail_, std::memory_order_release);
  return deliver;
}

void Inbox::push(uint64_t seq, std::vector<unsigned char> bytes, bool skip) {
  std::lock_guard<std::mutex> lock(mutex);
  if (seq == 0) loose.push_back(std::move(bytes));
  else queued[seq] = Queued{std::move(bytes), skip};
  queuedCount.store(queued.size() + loose.size(), std::memory_order_release);
}

bool Inbox::drain(std::vector<std::vector<unsigned char>>& out, size_t max) {
  while (out.size() < max) {
    const NotifyRing::Front front = ring ? ring->peek() : NotifyRing::Front{};
    const uint64_t next = front.seq;
    if (next != 0 && next <= expected && (front.ready || closed.load(std::memory_order_acquire))) {
      // Below `expected` only after a gap was skipped (see below); deliver it all the same. A record still
      // pending once the connection has ended is given up: its sender is gone, or failed the transfer
      // when its connection went (its commit is never coming, or announces a transfer reported failed).
      std::vector<unsigned char> bytes;
      if (ring->take(bytes)) out.push_back(std::move(bytes));
      if (next == expected) ++expected;
      continue;
    }
    uint64_t queuedNext = 0;
    if (queuedCount.load(std::memory_order_acquire) != 0) {
      std::lock_guard<std::mutex> lock(mutex);
      bool took = false;
      if (!loose.empty()) {
        out.push_back(std::move(loose.front()));
        loose.pop_front();
        took = true;
      } else if (queued.begin()->first <= expected) {
        auto first = queued.begin();
        if (first->first == expected) ++expected;
        if (!first->second.skip) out.push_back(std::move(first->second.bytes));
        queued.erase(first);
        took = true;
      } else {
        queuedNext = queued.begin()->first;
      }
      queuedCount.store(queued.size() + loose.size(), std::memory_order_release);
      if (took) continue;
    }
    if (!closed.load(std::memory_order_acquire)) return false;
    // The connection ended, so everything sent on the socket is queued: a number still missing belongs
    // to a notification whose send failed (its sender was told). Go on past it.
    if (queuedNext == 0 && queuedCount.load(std::memory_order_acquire) != 0) continue;  // queued meanwhile
    if (next == 0 && queuedNext == 0) return true;
    expected = next == 0 ? queuedNext : queuedNext == 0 ? next : std::min(next, queuedNext);
  }
  return false;
}

}  // namespace tandem::transfer
