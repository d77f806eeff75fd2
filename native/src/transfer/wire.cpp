#include "wire.h"

#include <sys/socket.h>

#include <chrono>
#include <cerrno>
#include <climits>
#include <cstring>

namespace tandem::transfer {

void spinUntilReadable(int fd, std::chrono::microseconds spin) {
  if (spin.count() <= 0) return;
  auto until = std::chrono::steady_clock::now() + spin;
  char c;
  for (;;) {
    ssize_t n = ::recv(fd, &c, 1, MSG_PEEK | MSG_DONTWAIT);
    if (n != -1 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) return;  // data, EOF or error
    if (std::chrono::steady_clock::now() >= until) return;
  }
}

bool sendAll(int fd, const void* data, size_t size, std::string& error) {
  const char* p = static_cast<const char*>(data);
  while (size > 0) {
    ssize_t n = ::send(fd, p, size, MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR) continue;
      error = std::string("send: ") + std::strerror(errno);
      return false;
    }
    p += n;
    size -= static_cast<size_t>(n);
  }
  return true;
}

bool sendVector(int fd, std::vector<iovec>& iov, std::string& error) {
  size_t index = 0;
  while (index < iov.size()) {
    int count = static_cast<int>(std::min<size_t>(iov.size() - index, IOV_MAX));
    msghdr msg{};
    msg.msg_iov = &iov[index];
    msg.msg_iovlen = count;
    ssize_t n = ::sendmsg(fd, &msg, MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR) continue;
      error = std::string("sendmsg: ") + std::strerror(errno);
      return false;
    }
    // Advance past what was written, trimming a partially written entry in place.
    size_t written = static_cast<size_t>(n);
    while (written > 0 && index < iov.size()) {
      if (written >= iov[index].iov_len) {
        written -= iov[index].iov_len;
        ++index;
      } else {
        iov[index].iov_base = static_cast<char*>(iov[index].iov_base) + written;
        iov[index].iov_len -= written;
        written = 0;
      }
    }
    while (index < iov.size() && iov[index].iov_len == 0) ++index;
  }
  return true;
}

bool recvAll(int fd, void* data, size_t size, std::string& error) {
  char* p = static_cast<char*>(data);
  while (size > 0) {
    ssize_t n = ::recv(fd, p, size, MSG_WAITALL);
    if (n == 0) {
      error = "connection closed by peer";
      return false;
    }
    if (n < 0) {
      if (errno == EINTR) continue;
      error = std::string("recv: ") + std::strerror(errno);
      return false;
    }
    p += n;
    size -= static_cast<size_t>(n);
  }
  return true;
}

bool discard(int fd, uint64_t size, std::string& error) {
  char scratch[65536];
  while (size > 0) {
    size_t chunk = static_cast<size_t>(std::min<uint64_t>(size, sizeof(scratch)));
    if (!recvAll(fd, scratch, chunk, error)) return false;
    size -= chunk;
  }
  return true;
}

}  // namespace tandem::transfer
