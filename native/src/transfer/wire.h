// The agent-to-agent wire protocol. Every message is a fixed 24-byte header followed by `length` bytes.
// One connection per (initiator -> target) direction: the initiator sends requests and notifications,
// the target answers on the same connection. Integers are little-endian (x86-64 and aarch64 both are).
#pragma once

#include <sys/uio.h>

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

namespace tandem::transfer {

// 2: Msg::RegionGone, and status kStatusRegionGone in Done/ReadData.
constexpr uint32_t kWireVersion = 2;  // (and Auth, Refused)

enum class Msg : uint32_t {
  // The handshake. With a shared secret (auth.h) the Hello carries the initiator's nonce, the HelloAck the
  // target's nonce and proof, and the initiator answers with Auth before anything else.
  Hello = 1,       // initiator -> target: u64 incarnation, u16 nameLen, name [, 32-byte nonce]
  HelloAck = 2,    // target -> initiator: u64 incarnation, u16 nameLen, name [, 32-byte nonce, 32-byte proof]
  Notify = 3,      // seq = its number (0: none); aux 0: payload is the notification; aux kNotifySkip: that number will not come
  WriteData = 4,   // aux = region id; payload: u32 pieces, u32 notifLen, pieces x (u64 off, u64 len), data, notif
  ReadRequest = 5, // aux = region id; payload: u32 pieces, u32 reserved, pieces x (u64 off, u64 len)
  ReadData = 6,    // aux = status (0 ok); payload: data (status 0) or error text
  Done = 7,        // aux = status (0 ok); payload: error text when status != 0
  // nccl backend (initiator -> target); the target answers each NcclPost with Done (seq = token).
  NcclInit = 8,    // aux = link; payload: 128-byte ncclUniqueId, i32 target GPU
  NcclPlan = 9,    // seq = plan id, aux = link; payload: u32 pieces, u32 reserved, pieces x (u32 region, u32 0, u64 off, u64 len)
  NcclPost = 10,   // seq = token, aux = link; payload: u64 plan id, u32 op, u32 notifLen, notif
  // target -> initiator, on every inbound connection when the target deregisters a region: aux = its id.
  RegionGone = 11,
  Auth = 12,       // initiator -> target, right after the HelloAck when authenticating: 32-byte proof
  Refused = 13,    // target -> initiator, instead of (or after) the HelloAck: why; the connection ends
};

// Done/ReadData status: 0 ok, 1 refused (the payload says why), kStatusRegionGone: the request named a
// region that is not (any more) registered there. Region ids are never reused within an incarnation, so
// an id that is not registered is one that was deregistered (or never published).
constexpr uint32_t kStatusRefused = 1;
constexpr uint32_t kStatusRegionGone = 2;

constexpr uint32_t kNotifySkip = 1;  // Msg::Notify's aux: the numbered notification's transfer failed

struct Header {
  uint32_t type;
  uint32_t aux;
  uint64_t seq;
  uint64_t length;
};
static_assert(sizeof(Header) == 24, "wire header must be 24 bytes");

// Blocking socket helpers. They return false on EOF or error and set `error`.
bool sendAll(int fd, const void* data, size_t size, std::string& error);
// Sends a vector of buffers, splitting at IOV_MAX, resuming after partial writes.
bool sendVector(int fd, std::vector<iovec>& iov, std::string& error);
bool recvAll(int fd, void* data, size_t size, std::string& error);
bool discard(int fd, uint64_t size, std::string& error);
// Polls `fd` without blocking for up to `spin` (returns early once something can be read, or at EOF):
// called before a blocking read that is likely to be answered soon, it saves the thread's wake-up.
void spinUntilReadable(int fd, std::chrono::microseconds spin);

}  // namespace tandem::transfer
