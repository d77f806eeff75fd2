// cuda-ipc: GPU memory between processes of one host (and host memory to or from it). The peer's device
// regions are opened through CUDA IPC handles, its shared host regions mapped (Agent::mapRemote), and
// the copies issued on a per-peer stream: the copy engines, a chunk-copy kernel, or batched copies,
// whichever timed trials find fastest for the plan. A plan whose strategy is settled is posted on the
// caller's thread itself when nothing of the peer waits on the progress thread (postOnCaller), and a
// notification to a polling peer is committed into its ring by the stream right after the copy.
#pragma once

#include "../../cuda_driver.h"
#include "backend.h"

#include <functional>
#include <map>
#include <memory>

namespace tandem::transfer {

class CudaIpcBackend final : public TransferBackend {
 public:
  explicit CudaIpcBackend(Agent& agent);
  Backend id() const override { return Backend::CudaIpc; }
  uint32_t localMems() const override { return kAllMems; }
  // Plain host memory of another process is out of reach of the GPU (register shared or pinned memory).
  uint32_t remoteMems() const override { return memBit(MemKind::Shared) | memBit(MemKind::Pinned) | memBit(MemKind::Device); }
  bool needsDevice() const override { return true; }
  bool supportsLocal() const override { return true; }
  bool supportsRemote() const override { return false; }
  std::string unavailableReason() const override;

  void checkPlan(const PlanShape& shape) const override;
  std::unique_ptr<BackendPlanState> preparePlan(Plan& plan) override;
  // Issues a post of a settled plan on the peer's stream at once, when nothing of the peer waits on the
  // progress thread; the progress thread only watches for its completion.
  bool postOnCaller(const std::shared_ptr<Plan>& plan, uint64_t token, std::vector<unsigned char>& notif, bool alone,
                    bool& settled) override;
  void queued(Plan& plan) override;
  void dequeued(Plan& plan) override;
  void post(const std::shared_ptr<Plan>& plan, uint64_t token, std::vector<unsigned char>& notif) override;
  std::unique_ptr<BackendPeerState> openPeer(Peer& peer) override;
  void releasePeer(Peer& peer) override;
  void releaseRegion(Peer& peer, RemoteRegion& region) override;
  void releaseOnProgress() override { sweepChunkTables(true); }

  // Does now what the first cuda-ipc transfer with this peer would otherwise pay for: connects, opens
  // the peer's device regions (CUDA IPC), loads the copy kernel and makes the peer's stream, on the
  // device of this agent's first device region. Nothing to do (no CUDA, another host, no device
  // regions on either side) succeeds at once. Succeeds with the number of the peer's device regions
  // open (as the completion's message).
  void warmup(const std::shared_ptr<Peer>& peer, uint64_t token);

 private:
  // A post's notification to a peer that numbers them: numbered when the post is issued, so that it
  // keeps its place among the peer's notifications, and, when it fits, written into the ring at once as
  // a pending record that the stream commits after the copy.
  struct Notice {
    std::vector<unsigned char> bytes;  // empty: no notification
    uint64_t seq = 0;                  // 0: not numbered, sent when the copy has finished (peer does not poll)
    uint32_t* commitWord = nullptr;    // its pending ring record (null: goes over the socket when done)
    bool streamCommits = false;        // the stream writes the commit word after the copy
  };
  Notice reserveNotice(Peer& peer, std::vector<unsigned char> notif);
  // After the copies are issued on `stream`: asks the stream to commit the notice's ring record (a no-op
  // without one). False: the stream could not take the write; the host commits it when the copy is done.
  bool streamCommit(Peer& peer, Notice& notice, CUstream stream, CUdeviceptr ringDevice);
  // Progress thread: the ring's device address in the current context, registering the ring the first time
  // (0: the peer has no ring, or it cannot be registered or written by a stream).
  CUdeviceptr ringOnDevice(Peer& peer);
  // When the copies have finished (ok) or failed: the notice delivered, or its number given up.
  bool settleNotice(const std::shared_ptr<Peer>& peer, Notice& notice, bool ok, std::string& error);
  // What runs when a post's copies have finished (or failed): strategy timing, notification, result.
  std::function<void(CUresult, float)> done(const std::shared_ptr<Plan>& plan, uint64_t token, int use, Notice notice);
  CUdeviceptr openRemote(Peer& peer, RemoteRegion& r, int device);
  void sweepChunkTables(bool all);

  const CudaDriver* cuda_;
  struct ChunkTable {
    std::weak_ptr<Plan> plan;
    int device = -1;
    CUdeviceptr table = 0;
    unsigned count = 0;
  };
  std::map<uint64_t, ChunkTable> chunkTables_;  // plan id -> uploaded chunk table (progress thread)
  bool copyBatchOn_ = true;
  int forcedCopy_ = -1;  // a strategy named by TANDEM_CUDA_COPY, or -1
  bool directPostsOn_ = true;
  bool streamCommitOn_ = true;
};

}  // namespace tandem::transfer
