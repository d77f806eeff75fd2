// Notifications that a target reads without being woken: agents made with `notifications: 'poll'`.
//
// Such a target gives every initiator that connects from the same host a ring in shared memory (a memfd
// it names in its HelloAck; the initiator maps it through /proc/<pid>/fd). Each notification the
// initiator sends on that connection carries a sequence number, and goes into the ring when it fits or
// over the socket when it does not (larger than a quarter of the ring, or the ring full because the
// target is not reading). The target's JS thread merges the two in sequence order (Inbox::drain), so a
// notification is never lost or overtaken, and the common case costs one copy into shared memory and
// one read of it: no socket, no thread woken on either side.
//
// The ring (single producer: the initiator serializes its threads with Peer::ringMutex; single
// consumer: the target's JS thread): a 4 KiB header page, then `capacity` bytes (a power of two) of
// records, each 16-byte aligned: u32 length | u32 flags | u64 seq | bytes. Flags: 0 ready; 1 padding to the
// end (wrap); 2 pending: written ahead of the data it announces, ready once its commit word (the flags
// themselves) is set to 0, which the initiator's CUDA stream does right after the copy
// (cuStreamWriteValue32), so that no host thread sits between the copy and the target seeing it;
// 4 skipped: its copy failed, nothing to deliver, its number is used up.
// `head` (bytes ever written) is published with release after the record; `tail` (bytes ever consumed)
// with release after the record is copied out. The consumer stops at a pending record: the ring is in
// number order. Neither side trusts the other's counters: a producer that sees a bad tail stops using
// the ring (the socket takes over); a consumer that sees a bad record stops reading it.
#pragma once

#include <atomic>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

namespace tandem::transfer {

class NotifyRing {
 public:
  static constexpr uint64_t kCapacity = 1u << 20;
  // The target's side: a new ring in a memfd. Null (with `error`) when shared memory is unavailable.
  static std::unique_ptr<NotifyRing> create(uint64_t capacity, std::string& error);
  // The initiator's side: maps the ring `fd` of process `pid`. Null (with `error`) when that fails.
  static std::unique_ptr<NotifyRing> open(uint32_t pid, int fd, std::string& error);
  ~NotifyRing();
  NotifyRing(const NotifyRing&) = delete;
  NotifyRing& operator=(const NotifyRing&) = delete;

  int memfd() const { return memfd_; }
  // The whole mapping, for registering it with CUDA (the stream writes pending records' commit words).
  void* mapping() const { return header_; }
  size_t mappedBytes() const { return mappedBytes_; }
  // Producer: copies one record in and publishes it. False when it does not fit now. With `pending`, the
  // record waits for its commit: *pending is set to its commit word (see commit()).
  bool tryWrite(uint64_t seq, const unsigned char* data, size_t size, uint32_t** pending = nullptr);
  // Producer, from the host: commits (ok) or skips the pending record numbered `seq` whose commit word
  // tryWrite gave. Nothing happens unless that word still holds `seq`'s pending record: it could be
  // committed already, taken, and its space reused. The caller serializes producers.
  static void commit(uint32_t* word, uint64_t seq, bool ok);
  static constexpr uint32_t kCommitted = 0;  // the value the stream writes into a commit word
  // Consumer: the record at the front. seq 0: none (or the ring is broken); ready false: its commit is
  // still to come.
  struct Front {
    uint64_t seq = 0;
    bool ready = false;
  };
  Front peek();
  // Consumer: consumes the record peek() saw and frees its space. Its bytes go to `out` unless it was
  // skipped (or is still pending: a consumer that gives up on it), and then it returns false.
  bool take(std::vector<unsigned char>& out);
  bool broken() const { return broken_; }

 private:
  struct Header;
  NotifyRing() = default;
  bool map(int fd, bool create, uint64_t capacity, std::string& error);
  Header* header_ = nullptr;
  unsigned char* data_ = nullptr;
  uint64_t capacity_ = 0;
  size_t mappedBytes_ = 0;
  int memfd_ = -1;
  uint64_t tail_ = 0;  // consumer: where the next record starts (after any wrap padding peek skipped)
  bool broken_ = false;
};

// The target's view of one inbound connection when notifications are polled: its ring (same-host
// initiators) and what arrived over the socket, merged in the initiator's order by the JS thread.
struct Inbox {
  std::string from;
  std::unique_ptr<NotifyRing> ring;  // offered to the sender: then every notification it sends is numbered
  std::mutex mutex;  // queued
  // From the connection's reader (and nccl's threads). Numbered ones by number: threads of the sender
  // may put them on the socket in another order than their numbers. A skipped number belongs to a
  // notification that will never come (its WRITE failed), so that later ones need not wait for it.
  struct Queued {
    std::vector<unsigned char> bytes;
    bool skip;
  };
  std::map<uint64_t, Queued> queued;
  std::deque<std::vector<unsigned char>> loose;  // not numbered (no ring was offered): as they come
  std::atomic<size_t> queuedCount{0};
  std::atomic<bool> closed{false};  // the connection ended: nothing more will be queued
  uint64_t expected = 1;            // JS thread: the next sequence number to deliver

  void push(uint64_t seq, std::vector<unsigned char> bytes, bool skip = false);
  // JS thread: appends up to `max` deliverable notifications to `out` (bytes only, `from` is this
  // inbox's). Returns true when the inbox is finished (closed and empty) and can be dropped.
  bool drain(std::vector<std::vector<unsigned char>>& out, size_t max);
};

}  // namespace tandem::transfer
