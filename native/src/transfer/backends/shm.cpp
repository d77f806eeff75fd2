#include "shm.h"

#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <climits>
#include <cstring>

#include "../agent.h"

namespace tandem::transfer {

namespace {

// Shm transfers of at most 1 MiB run on the caller's thread when nothing is queued or running on the
// progress thread: no hand-off, and the source is often still in this core's cache (one 1 MiB post: 43-45%
// of a memcpy through the progress thread, 84-89% here). At most 1 MiB: tens of microseconds of copying on
// the JS thread. From 256 KiB up they always may; below, only when the caller has nothing else in flight
// (`alone`): posts issued back to back go faster when the progress thread copies while the JS thread posts
// the next, and a small copy is shorter than the hand-off it saves only when its completion need not wait
// behind earlier ones either.
constexpr uint64_t kInlineShmMinBytes = 256 << 10;
constexpr uint64_t kInlineShmMaxBytes = 1 << 20;

}  // namespace

void ShmBackend::checkPlan(const PlanShape& shape) const {
  if (!shape.peer.sameHost) Agent::unavailable(id(), "peer '" + shape.peerName + "' is on another host");
  if (shape.localDevice || shape.remoteDevice) {
    Agent::unavailable(id(), "shm moves host memory only; use cuda-ipc for device memory");
  }
  for (const auto& r : shape.remotes) {
    if (r->d.memfd < 0 && r->d.kind != MemKind::Host) {
      Agent::unavailable(id(), "remote region " + std::to_string(r->d.id) + " cannot be mapped");
    }
  }
}

bool ShmBackend::postOnCaller(const std::shared_ptr<Plan>& plan, uint64_t token, std::vector<unsigned char>& notif,
                              bool alone, bool& settled) {
  // A notification means a socket write, which could block: those go through the progress thread.
  if (!notif.empty() || !(alone || plan->bytes >= kInlineShmMinBytes) || plan->bytes > kInlineShmMaxBytes ||
      !copyInline(*plan)) {
    return false;
  }
  if (alone) {
    settled = true;
    return true;
  }
  agent_.succeed(token);  // after completions already on their way to the caller
  return true;
}

bool ShmBackend::copyInline(const Plan& plan) {
  if (agent_.closing() || !agent_.progress().idle()) return false;
  for (uint32_t id : plan.localRegionIds) {
    if (!agent_.region(id)) return false;  // the queued path reports it
  }
  Peer& peer = *plan.peer;
  // releasePeer unmaps under this lock; the peer's regions were mapped by an earlier post that has
  // finished (the queue is idle), so reading `mapped` here sees that post's write.
  std::lock_guard<std::mutex> lock(peer.mutex);
  if (peer.dead || peer.connecting || !peer.conn) return false;
  for (const auto& p : plan.pieces) {
    const RemoteRegion& r = *plan.remotes[p.remoteRegion];
    if (r.d.kind == MemKind::Host || !r.mapped) return false;
  }
  for (const auto& p : plan.pieces) {
    unsigned char* remote = plan.remotes[p.remoteRegion]->mapped + p.remoteOff;
    auto* local = reinterpret_cast<unsigned char*>(p.local);
    if (plan.op == Op::Write) std::memcpy(remote, local, p.length);
    else std::memcpy(local, remote, p.length);
  }
  return true;
}

void ShmBackend::post(const std::shared_ptr<Plan>& plan, uint64_t token, std::vector<unsigned char>& notif) {
  Peer& peer = *plan->peer;
  std::string error;
  // The connection proves the peer is alive; without it, data "in place" in a dead peer means nothing.
  if (!agent_.waitConnected(plan->peer, error)) return agent_.fail(token, agent_.unreachableCode(*plan->peer), error);
  bool cma = false;
  for (const auto& p : plan->pieces) {
    if (plan->remotes[p.remoteRegion]->d.kind == MemKind::Host) cma = true;
  }
  if (!cma) {
    for (const auto& p : plan->pieces) {
      unsigned char* remote = agent_.mapRemote(peer, *plan->remotes[p.remoteRegion]) + p.remoteOff;
      auto* local = reinterpret_cast<unsigned char*>(p.local);
      if (plan->op == Op::Write) {
        std::memcpy(remote, local, p.length);
      } else {
        std::memcpy(local, remote, p.length);
      }
    }
  } else {
    // Plain (unshared) host memory of another process: cross-memory attach, IOV_MAX pieces per call.
    std::vector<iovec> localIov, remoteIov;
    for (const auto& p : plan->pieces) {
      RemoteRegion& rr = *plan->remotes[p.remoteRegion];
      uint64_t remoteAddr = rr.d.kind == MemKind::Host ? rr.d.address : reinterpret_cast<uint64_t>(agent_.mapRemote(peer, rr));
      localIov.push_back({reinterpret_cast<void*>(p.local), p.length});
      remoteIov.push_back({reinterpret_cast<void*>(remoteAddr + p.remoteOff), p.length});
    }
    if (peer.d.pid == static_cast<uint32_t>(getpid())) {
      for (size_t i = 0; i < localIov.size(); ++i) {
        if (plan->op == Op::Write) std::memcpy(remoteIov[i].iov_base, localIov[i].iov_base, localIov[i].iov_len);
        else std::memcpy(localIov[i].iov_base, remoteIov[i].iov_base, localIov[i].iov_len);
      }
    } else {
      for (size_t i = 0; i < localIov.size(); i += IOV_MAX) {
        size_t n = std::min<size_t>(IOV_MAX, localIov.size() - i);
        uint64_t want = 0;
        for (size_t k = i; k < i + n; ++k) want += localIov[k].iov_len;
        ssize_t done = plan->op == Op::Write
                           ? process_vm_writev(peer.d.pid, &localIov[i], n, &remoteIov[i], n, 0)
                           : process_vm_readv(peer.d.pid, &localIov[i], n, &remoteIov[i], n, 0);
        if (done < 0 || static_cast<uint64_t>(done) != want) {
          std::string why = done < 0 ? std::strerror(errno) : "short copy";
          return agent_.fail(token, errno == ESRCH ? "TANDEM_REMOTE_DISCONNECTED" : "TANDEM_BACKEND_UNAVAILABLE",
                             "shm: cannot reach plain host memory of peer '" + peer.d.name + "' (" + why +
                                 "); register shared memory with allocShared() instead");
        }
      }
    }
  }
  std::atomic_thread_fence(std::memory_order_release);
  {
    std::lock_guard<std::mutex> lock(peer.mutex);
    if (peer.dead) return agent_.fail(token, "TANDEM_REMOTE_DISCONNECTED", peer.deadReason);
  }
  if (!notif.empty() && !agent_.sendNotify(plan->peer, notif, error)) {
    return agent_.fail(token, "TANDEM_REMOTE_DISCONNECTED", error);
  }
  agent_.succeed(token);
}

}  // namespace tandem::transfer
