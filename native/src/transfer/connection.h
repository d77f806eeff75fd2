// A connection between two agents (one per initiator -> target direction) and how messages go out on
// it. Internal to the transfer agent; shared by agent.cpp and the backends.
#pragma once

#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <atomic>
#include <memory>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include "wire.h"

namespace tandem::transfer {

struct Inbox;  // notify_ring.h

struct Connection {
  explicit Connection(int fd) : fd(fd) {}
  ~Connection() {
    if (fd >= 0) ::close(fd);
  }
  void shutdown() {
    if (open.exchange(false)) ::shutdown(fd, SHUT_RDWR);
  }
  int fd;
  std::mutex sendMutex;
  std::atomic<bool> open{true};
  std::string peerName;
  uint64_t peerIncarnation = 0;
  std::shared_ptr<Inbox> inbox;  // inbound, when the agent polls its notifications
  bool inbound = false;          // accepted by this agent (it serves the peer's requests on it)
  std::atomic<bool> greeted{false};  // inbound: the HelloAck went out (later messages may follow it)
};

// One message (header + payload), sent whole under the connection's send lock.
inline bool sendMessage(Connection& c, Msg type, uint32_t aux, uint64_t seq, const void* payload, size_t size,
                        std::string& error) {
  Header h{static_cast<uint32_t>(type), aux, seq, size};
  std::vector<iovec> iov{{&h, sizeof(h)}};
  if (size) iov.push_back({const_cast<void*>(payload), size});
  std::lock_guard<std::mutex> lock(c.sendMutex);
  return sendVector(c.fd, iov, error);
}

}  // namespace tandem::transfer
