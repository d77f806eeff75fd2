// The nccl transfer backend: GPU memory to GPU memory where CUDA IPC cannot reach (another host), as
// grouped ncclSend/ncclRecv on a two-rank communicator per (initiator GPU, target GPU) pair.
//
// Two-sided by nature, so the target takes part. Over the agents' existing connection the initiator
// sends, in order: NcclInit once per link (the unique id and the target GPU), NcclPlan once per plan
// and link (the target-side pieces, validated there against its own registrations), and NcclPost per
// post (plan id, op, notification). Each side submits its half to its nccl::Communicator, which runs
// the group on its own stream and thread, watches deadlines and aborts on error. NCCL matches a
// group's sends and receives to one peer in order, so piece i goes to piece i. The target answers
// every post with Done once its half has completed on its GPU (after delivering the notification of a
// WRITE); the initiator's post settles when its own half and that answer are both in.
//
// Ordering: one direction per link, posts issued in one order on both sides (progress thread here, the
// connection's reader there). A link whose communicator was aborted (timeout, refused post, NCCL
// error) is replaced by a new one at the next post; the target drops aborted links when a new one comes.
#include "nccl.h"

#include <cstring>
#include <map>

#include "../../addon_state.h"
#include "../agent.h"
#include "../connection.h"

namespace tandem::transfer {

namespace {

struct WireNcclPiece {
  uint32_t region;
  uint32_t reserved;
  uint64_t offset;
  uint64_t length;
};
static_assert(sizeof(WireNcclPiece) == 24, "nccl plan piece is 24 bytes");

std::string transferCode(const nccl::Failure& f) {
  if (f.code == "TANDEM_NCCL_TIMEOUT") return "TANDEM_TIMEOUT";
  return f.code;
}

std::string shortName(const std::string& s) { return s.size() > 40 ? s.substr(0, 40) : s; }

// Plans with at least this many pieces (after merging) go through a staging buffer: one kernel gathers
// the pieces into it (or scatters them out of it) and NCCL moves one contiguous message, instead of one
// NCCL send/recv per piece (each costs several microseconds however small it is).
constexpr size_t kStageMinPieces = 4;
constexpr uint64_t kStageMaxBytes = 4ull << 30;  // beyond this the staging memory is not worth it
constexpr uint64_t kStageChunkBytes = 128 << 10;

// Prefixes a target-side refusal that names a region not registered there (answered as kStatusRegionGone).
constexpr const char* kRegionGoneMark = "\x01gone:";

}  // namespace

// One side's staging state for one link. Touched only on that link communicator's thread (in the hooks
// around its batches); its memory belongs to the communicator and is freed with it.
struct NcclStaging {
  nccl::Communicator* comm = nullptr;
  const CudaDriver* cuda = nullptr;
  CUfunction copy = nullptr;  // tandem_copy_chunks, loaded in the device's primary context
  int multiprocessors = 1;
  CUdeviceptr buffer = 0;
  uint64_t size = 0;
  struct Table {
    CUdeviceptr dev = 0;
    unsigned count = 0;
  };
  std::map<uint64_t, Table> tables;  // plan id -> chunk table (valid for the current buffer)
};

// A staged plan as one side sees it: its pieces here, in order, and which way the kernel copies.
struct NcclStagedPlan {
  uint64_t id = 0;
  bool gather = true;  // pieces -> staging (the sender's side); else staging -> pieces
  uint64_t bytes = 0;
  std::vector<std::pair<uint64_t, uint64_t>> pieces;  // (device address, length)
};

namespace {

// Per peer: one two-rank communicator per (local GPU, remote GPU) for transfers this agent initiates
// (rank 0 here, rank 1 at the peer). Guarded by the peer's mutex; made on the progress thread.
struct NcclPeer final : BackendPeerState {
  struct Link {
    uint32_t index = 0;  // names the link on the wire; never reused for this peer
    std::shared_ptr<nccl::Communicator> comm;
    std::shared_ptr<NcclStaging> staging;  // for plans of many pieces
  };
  std::map<std::pair<int, int>, Link> links;
  uint32_t nextLink = 1;
};

// Per plan (progress thread).
struct NcclPlan final : BackendPlanState {
  uint32_t sentOn = 0;  // the link whose target has this plan's pieces (0: none yet)
  std::shared_ptr<NcclStagedPlan> staged;  // set when the plan goes through staging buffers
  bool decided = false;
};

// The target's side, per inbound connection (its reader thread only, but for `shared`).
struct NcclInbound final : BackendInboundState {
  struct Plan {
    std::vector<std::pair<uint64_t, uint64_t>> pieces;  // (device address, length) here
    std::vector<uint32_t> regions;                      // checked again at every post
    std::shared_ptr<NcclStagedPlan> staged;             // set when the initiator stages this plan
  };
  struct Link {
    int device = -1;
    std::shared_ptr<nccl::Communicator> comm;
    std::shared_ptr<NcclStaging> staging;
    std::map<uint64_t, Plan> plans;  // by the initiator's plan id; or why the plan is refused:
    std::map<uint64_t, std::string> refused;
  };
  std::map<uint32_t, Link> links;
  struct Shared {  // reached from the communicators' threads
    std::mutex mutex;
    std::map<uint64_t, std::vector<unsigned char>> notifications;  // token -> bytes to deliver after the data
  };
  std::shared_ptr<Shared> shared = std::make_shared<Shared>();
  ~NcclInbound() override {
    for (auto& [index, link] : links) {
      if (link.comm) link.comm->close();
    }
  }
};

// Grows the staging buffer to `bytes` (chunk tables name its address, so they go too). Throws NativeError.
void ensureStaging(NcclStaging& st, uint64_t bytes) {
  if (st.size >= bytes) return;
  for (auto& [id, t] : st.tables) st.comm->release(t.dev);
  st.tables.clear();
  if (st.buffer) st.comm->release(st.buffer);  // waits for the stream: earlier batches may still use it
  st.buffer = 0;
  st.size = 0;
  st.buffer = st.comm->allocate(bytes);
  st.size = bytes;
}

// Runs on the communicator's thread: makes room, uploads the plan's chunk table once, launches the copy.
CUresult stageCopy(NcclStaging& st, const NcclStagedPlan& plan, CUstream stream, std::string& detail) {
  const CudaDriver& cuda = *st.cuda;
  try {
    ensureStaging(st, plan.bytes);
    auto it = st.tables.find(plan.id);
    if (it == st.tables.end()) {
      std::vector<unsigned long long> entries;  // (src, dst, bytes) triples
      uint64_t pos = 0;
      for (const auto& [addr, len] : plan.pieces) {
        for (uint64_t off = 0; off < len; off += kStageChunkBytes) {
          uint64_t staged = st.buffer + pos + off;
          entries.push_back(plan.gather ? addr + off : staged);
          entries.push_back(plan.gather ? staged : addr + off);
          entries.push_back(std::min(kStageChunkBytes, len - off));
        }
        pos += len;
      }
      NcclStaging::Table t;
      t.count = static_cast<unsigned>(entries.size() / 3);
      t.dev = st.comm->allocate(entries.size() * sizeof(unsigned long long));
      CUresult r = cuda.cuMemcpyHtoDAsync(t.dev, entries.data(), entries.size() * sizeof(unsigned long long), stream);
      if (r == CUDA_SUCCESS) r = cuda.cuStreamSynchronize(stream);  // `entries` goes out of scope
      if (r != CUDA_SUCCESS) {
        st.comm->release(t.dev);
        detail = "upload of the staging chunk table: " + cuda.describe(r);
        return r;
      }
      it = st.tables.emplace(plan.id, t).first;
    }
    unsigned blocks = std::min<unsigned>(it->second.count, static_cast<unsigned>(std::max(1, st.multiprocessors) * 4));
    void* args[] = {&it->second.dev, &it->second.count};
    CUresult r = cuda.cuLaunchKernel(st.copy, blocks, 1, 1, 512, 1, 1, 0, stream, args, nullptr);
    if (r != CUDA_SUCCESS) detail = "launch of tandem_copy_chunks (staging): " + cuda.describe(r);
    return r;
  } catch (const tandem::NativeError& e) {
    detail = std::string("staging buffer: ") + e.what();
    return CUDA_ERROR_OUT_OF_MEMORY;
  }
}

// The NCCL side of a staged transfer: one contiguous send or receive of the staging buffer, and the
// hooks that fill it before the send or empty it after the receive.
void stagedOps(const std::shared_ptr<NcclStaging>& st, const std::shared_ptr<NcclStagedPlan>& plan, bool send, int peer,
               std::vector<nccl::Op>& ops, nccl::Communicator::StreamHook& before, nccl::Communicator::StreamHook& after) {
  ops.assign(1, nccl::Op{});
  ops[0].kind = send ? nccl::OpKind::Send : nccl::OpKind::Recv;
  ops[0].count = plan->bytes;
  ops[0].dtype = nccl::ncclUint8;
  ops[0].peer = peer;
  before = [st, plan, send](CUstream stream, std::vector<nccl::Op>& o, std::string& detail) {
    // The buffer exists only once the first batch has run here; the address is filled in now.
    CUresult r = CUDA_SUCCESS;
    if (send) {
      r = stageCopy(*st, *plan, stream, detail);
    } else {
      try {
        ensureStaging(*st, plan->bytes);  // the copy out runs after the receive
      } catch (const tandem::NativeError& e) {
        detail = std::string("staging buffer: ") + e.what();
        r = CUDA_ERROR_OUT_OF_MEMORY;
      }
    }
    (send ? o[0].send : o[0].recv) = st->buffer;
    return r;
  };
  if (!send) {
    after = [st, plan](CUstream stream, std::vector<nccl::Op>&, std::string& detail) {
      return stageCopy(*st, *plan, stream, detail);
    };
  }
}

}  // namespace

void NcclBackend::post(const std::shared_ptr<Plan>& plan, uint64_t token, std::vector<unsigned char>& notif) {
  std::string error;
  auto conn = agent_.waitConnected(plan->peer, error);
  if (!conn) return agent_.fail(token, agent_.unreachableCode(*plan->peer), error);
  Peer& peer = *plan->peer;
  NcclPeer& links = peer.state<NcclPeer>(Backend::Nccl);
  NcclPlan& state = plan->stateAs<NcclPlan>();
  const std::pair<int, int> key{plan->localDevice, plan->remoteDevice};

  std::shared_ptr<nccl::Communicator> comm, stale;
  std::shared_ptr<NcclStaging> staging;
  uint32_t link = 0;
  {
    std::lock_guard<std::mutex> lock(peer.mutex);
    if (peer.dead) return agent_.fail(token, "TANDEM_REMOTE_DISCONNECTED", peer.deadReason);
    auto it = links.links.find(key);
    if (it != links.links.end()) {
      if (it->second.comm->aborted()) {
        stale = std::move(it->second.comm);
        links.links.erase(it);
      } else {
        comm = it->second.comm;
        staging = it->second.staging;
        link = it->second.index;
      }
    }
  }
  if (stale) stale->close();
  if (!comm) {
    nccl::ncclUniqueId id;
    nccl::ncclResult_t r = nccl_->ncclGetUniqueId(&id);
    if (r != nccl::ncclSuccess) return agent_.fail(token, "TANDEM_NCCL_ERROR", "ncclGetUniqueId failed: " + nccl_->describe(r));
    {
      std::lock_guard<std::mutex> lock(peer.mutex);
      link = links.nextLink++;
    }
    nccl::CommOptions o;
    o.name = "xfer " + shortName(agent_.name()) + ">" + shortName(peer.d.name) + " #" + std::to_string(link);
    o.device = plan->localDevice;
    o.rank = 0;
    o.size = 2;
    o.timeoutMs = agent_.options().timeoutMs;
    comm = std::make_shared<nccl::Communicator>(*nccl_, *agent_.cuda().driver(), o, [this](uint64_t id, const nccl::Failure* f) {
      if (id != 0) settle(id, f);  // init's own failure reaches every post through its abort
    });
    std::vector<unsigned char> init(sizeof(id) + sizeof(int32_t));
    int32_t device = plan->remoteDevice;
    std::memcpy(init.data(), &id, sizeof(id));
    std::memcpy(init.data() + sizeof(id), &device, sizeof(device));
    if (!sendMessage(*conn, Msg::NcclInit, link, 0, init.data(), init.size(), error)) {
      comm->close();
      return agent_.fail(token, "TANDEM_REMOTE_DISCONNECTED", "peer '" + peer.d.name + "': " + error);
    }
    comm->startFromId(id);
    staging = std::make_shared<NcclStaging>();
    staging->comm = comm.get();
    staging->cuda = agent_.cuda().driver();
    CudaState::DeviceKernels& kernels = agent_.cuda().kernelsFor(plan->localDevice);
    staging->copy = kernels.copyChunks;
    staging->multiprocessors = kernels.multiprocessors;
    bool dead = false;
    {
      std::lock_guard<std::mutex> lock(peer.mutex);
      dead = peer.dead;
      if (!dead) links.links[key] = NcclPeer::Link{link, comm, staging};
    }
    if (dead) {
      comm->close();
      return agent_.fail(token, "TANDEM_REMOTE_DISCONNECTED", peer.deadReason);
    }
  }

  if (!state.decided) {
    state.decided = true;
    if (plan->pieces.size() >= kStageMinPieces && plan->bytes <= kStageMaxBytes && staging->copy) {
      auto staged = std::make_shared<NcclStagedPlan>();
      staged->id = plan->id;
      staged->gather = plan->op == Op::Write;  // the sender gathers
      staged->bytes = plan->bytes;
      for (const Piece& p : plan->pieces) staged->pieces.emplace_back(p.local, p.length);
      state.staged = staged;
    }
  }
  if (state.sentOn != link) {
    std::vector<unsigned char> body(8 + plan->pieces.size() * sizeof(WireNcclPiece));
    // reserved word: bit 0 = staged, bit 1 = the plan's op (1: WRITE)
    uint32_t counts[2] = {static_cast<uint32_t>(plan->pieces.size()),
                          (state.staged ? 1u : 0u) | (plan->op == Op::Write ? 2u : 0u)};
    std::memcpy(body.data(), counts, sizeof(counts));
    auto* out = reinterpret_cast<WireNcclPiece*>(body.data() + 8);
    for (size_t i = 0; i < plan->pieces.size(); ++i) {
      const Piece& p = plan->pieces[i];
      out[i] = WireNcclPiece{plan->remotes[p.remoteRegion]->d.id, 0, p.remoteOff, p.length};
    }
    if (!sendMessage(*conn, Msg::NcclPlan, link, plan->id, body.data(), body.size(), error)) {
      return agent_.fail(token, "TANDEM_REMOTE_DISCONNECTED", "peer '" + peer.d.name + "': " + error);
    }
    state.sentOn = link;
  }

  // Two answers: the target's Done and our own half. A READ's notification goes out once the data is here.
  agent_.addPending(token, plan, plan->op == Op::Read ? notif : std::vector<unsigned char>{}, 2);
  // A WRITE's notification rides in the post (after its number, when the target numbers them).
  const bool carries = plan->op == Op::Write && !notif.empty();
  const uint64_t number = carries ? agent_.carriedNumber(peer, notif) : 0;
  const size_t head = number ? 8 : 0;
  std::vector<unsigned char> post(16 + (carries ? head + notif.size() : 0));
  uint64_t planId = plan->id;
  uint32_t fields[2] = {static_cast<uint32_t>(plan->op), static_cast<uint32_t>(post.size() - 16)};
  std::memcpy(post.data(), &planId, 8);
  std::memcpy(post.data() + 8, fields, 8);
  if (number) std::memcpy(post.data() + 16, &number, 8);
  if (carries) std::memcpy(post.data() + 16 + head, notif.data(), notif.size());
  if (!sendMessage(*conn, Msg::NcclPost, link, token, post.data(), post.size(), error)) {
    if (agent_.erasePending(token)) agent_.fail(token, "TANDEM_REMOTE_DISCONNECTED", "peer '" + peer.d.name + "': " + error);
    return;
  }

  std::vector<nccl::Op> ops;
  nccl::Communicator::StreamHook before, after;
  if (state.staged) {
    stagedOps(staging, state.staged, plan->op == Op::Write, 1, ops, before, after);
  } else {
    ops.resize(plan->pieces.size());
    for (size_t i = 0; i < plan->pieces.size(); ++i) {
      const Piece& p = plan->pieces[i];
      nccl::Op& op = ops[i];
      op.kind = plan->op == Op::Write ? nccl::OpKind::Send : nccl::OpKind::Recv;
      (plan->op == Op::Write ? op.send : op.recv) = p.local;
      op.count = p.length;
      op.dtype = nccl::ncclUint8;
      op.peer = 1;
    }
  }
  comm->submit(token, std::move(ops), agent_.options().timeoutMs, std::string("transfer ") + opName(plan->op), nullptr,
               std::move(before), std::move(after));
}

NcclBackend::NcclBackend(Agent& agent) : TransferBackend(agent) {
  const CudaState& cuda = agent.cuda();
  if (!cuda.available()) {
    reason_ = "CUDA unavailable: " + cuda.reason();
  } else if (agent.options().nccl.empty()) {
    reason_ = "no libnccl search path was given";
  } else {
    const nccl::NcclLibrary& lib = nccl::loadNcclLibrary(agent.options().nccl);
    if (lib.available) {
      nccl_ = &lib;
    } else {
      reason_ = "NCCL unavailable: " + lib.reason;
    }
  }
}

void NcclBackend::checkPlan(const PlanShape& shape) const {
  if (!nccl_) Agent::unavailable(id(), reason_);
  if (!(shape.peer.d.backends & bit())) Agent::unavailable(id(), "peer '" + shape.peerName + "' has no NCCL");
  if (!shape.localDevice || !shape.remoteDevice) Agent::unavailable(id(), "nccl moves device memory to device memory only");
  for (const auto& r : shape.remotes) {
    if (r->d.device != shape.remotes[0]->d.device) {
      throw AgentError{"TANDEM_BAD_DESCRIPTOR", "remote device regions span several GPUs (nccl: one GPU per side)"};
    }
  }
}

std::unique_ptr<BackendPlanState> NcclBackend::preparePlan(Plan&) { return std::make_unique<NcclPlan>(); }

std::unique_ptr<BackendPeerState> NcclBackend::openPeer(Peer&) { return std::make_unique<NcclPeer>(); }

void NcclBackend::settle(uint64_t token, const nccl::Failure* failure) {
  if (!failure) return answered(token);
  // One failed half fails the post, whichever answer it was.
  std::shared_ptr<Plan> plan = agent_.pendingPlan(token);
  if (!plan || !agent_.erasePending(token)) return;  // answered already (canceled, timed out, refused)
  const std::shared_ptr<Peer>& peer = plan->peer;
  std::string code = transferCode(*failure);
  {
    std::lock_guard<std::mutex> lock(peer->mutex);
    if (peer->dead && code == "TANDEM_NCCL_ABORTED") {
      return agent_.fail(token, "TANDEM_REMOTE_DISCONNECTED",
                         "nccl transfer with peer '" + peer->d.name + "' ended: " + peer->deadReason);
    }
  }
  agent_.fail(token, code, "nccl transfer with peer '" + peer->d.name + "' failed: " + failure->message);
}

void NcclBackend::answered(uint64_t token) {
  std::shared_ptr<Peer> peer;
  std::vector<unsigned char> notif;
  size_t index;
  bool last;
  if (!agent_.takeAnswer(token, index, last, &notif, nullptr, &peer, true) || !last) return;
  std::string error;
  if (!notif.empty() && !agent_.sendNotify(peer, notif, error)) return agent_.fail(token, "TANDEM_REMOTE_DISCONNECTED", error);
  agent_.succeed(token);
}

bool NcclBackend::answer(const std::shared_ptr<Peer>& peer, Connection& conn, const Header& h,
                         const std::shared_ptr<Plan>& plan, std::string& error) {
  // The target's half of a post: Done, after its side completed on its GPU.
  if (static_cast<Msg>(h.type) != Msg::Done) return false;
  if (h.aux == 0) {
    if (!discard(conn.fd, h.length, error)) return false;
    answered(h.seq);
    return true;
  }
  std::string text(std::min<uint64_t>(h.length, 4096), '\0');
  if (!recvAll(conn.fd, text.data(), text.size(), error) || !discard(conn.fd, h.length - text.size(), error)) return false;
  bool erased = agent_.erasePending(h.seq);
  // Our half waits for a partner that will never come: the link is unusable from here on.
  abortLink(*peer, *plan, "peer '" + peer->d.name + "' refused a transfer: " + text);
  if (!erased) return true;
  if (h.aux == kStatusRegionGone) {
    agent_.fail(h.seq, "TANDEM_REMOTE_REGION_GONE",
                "peer '" + peer->d.name + "': " + text + "; load its metadata again and prepare anew");
  } else {
    agent_.fail(h.seq, "TANDEM_REMOTE_ERROR", "peer '" + peer->d.name + "' refused: " + text);
  }
  return true;
}

void NcclBackend::closePeer(Peer& peer, bool) {
  if (!peer.backendState[static_cast<size_t>(Backend::Nccl)]) return;
  std::map<std::pair<int, int>, NcclPeer::Link> links;
  {
    std::lock_guard<std::mutex> lock(peer.mutex);
    links.swap(peer.state<NcclPeer>(Backend::Nccl).links);
  }
  for (auto& [key, link] : links) link.comm->close();
}

void NcclBackend::abortLink(Peer& peer, const Plan& plan, const std::string& reason) {
  std::shared_ptr<nccl::Communicator> comm;
  {
    std::lock_guard<std::mutex> lock(peer.mutex);
    auto& links = peer.state<NcclPeer>(Backend::Nccl).links;
    auto it = links.find({plan.localDevice, plan.remoteDevice});
    if (it == links.end() || it->second.index != static_cast<const NcclPlan&>(*plan.state).sentOn) return;
    comm = std::move(it->second.comm);
    links.erase(it);  // the next post starts a new link
  }
  comm->requestAbort(reason, nullptr);
  comm->close();
}

bool NcclBackend::serve(const std::shared_ptr<Connection>& connPtr, const Header& h,
                        std::unique_ptr<BackendInboundState>& inbound, std::string& error) {
  Connection& conn = *connPtr;
  if (!inbound) inbound = std::make_unique<NcclInbound>();
  NcclInbound& state = static_cast<NcclInbound&>(*inbound);
  const std::string& self = agent_.name();
  if (h.length > (256u << 20)) return false;  // a corrupt stream; stop serving it
  std::vector<unsigned char> payload(h.length);
  if (!recvAll(conn.fd, payload.data(), payload.size(), error)) return false;
  Msg type = static_cast<Msg>(h.type);

  if (type == Msg::NcclInit) {
    if (payload.size() != sizeof(nccl::ncclUniqueId) + sizeof(int32_t)) return false;
    if (state.links.count(h.aux)) return false;  // link numbers are never reused
    // Links the initiator gave up on (it starts a new one after an abort) are of no further use.
    for (auto it = state.links.begin(); it != state.links.end();) {
      if (it->second.comm && it->second.comm->aborted()) {
        it->second.comm->close();
        it = state.links.erase(it);
      } else {
        ++it;
      }
    }
    nccl::ncclUniqueId id;
    int32_t device;
    std::memcpy(&id, payload.data(), sizeof(id));
    std::memcpy(&device, payload.data() + sizeof(id), sizeof(device));
    NcclInbound::Link& link = state.links[h.aux];
    link.device = device;
    if (!nccl_) return true;  // every post on this link is refused with the reason
    nccl::CommOptions o;
    o.name = "xfer " + shortName(conn.peerName) + ">" + shortName(self) + " #" + std::to_string(h.aux);
    o.device = device;
    o.rank = 1;
    o.size = 2;
    o.timeoutMs = agent_.options().timeoutMs;
    auto shared = state.shared;
    link.comm = std::make_shared<nccl::Communicator>(
        *nccl_, *agent_.cuda().driver(), o, [this, shared, connPtr](uint64_t token, const nccl::Failure* f) {
          if (token == 0) return;
          std::vector<unsigned char> notif;
          {
            std::lock_guard<std::mutex> lock(shared->mutex);
            auto it = shared->notifications.find(token);
            if (it != shared->notifications.end()) {
              notif = std::move(it->second);
              shared->notifications.erase(it);
            }
          }
          std::string err;
          if (f) {
            if (!notif.empty()) agent_.deliveredCarried(*connPtr, std::move(notif), false);
            std::string text = "nccl: " + f->message;
            sendMessage(*connPtr, Msg::Done, 1, token, text.data(), text.size(), err);
            return;
          }
          // The data is in place before the notification is delivered and before the initiator hears Done.
          if (!notif.empty()) agent_.deliveredCarried(*connPtr, std::move(notif), true);
          sendMessage(*connPtr, Msg::Done, 0, token, nullptr, 0, err);
        });
    link.comm->startFromId(id);
    return true;
  }

  auto refuse = [&](const std::string& problem) {
    // A region that is not registered (any more) is reported as gone: ids are never reused.
    const bool gone = problem.rfind(kRegionGoneMark, 0) == 0;
    const std::string text = gone ? problem.substr(std::strlen(kRegionGoneMark)) : problem;
    return sendMessage(conn, Msg::Done, gone ? kStatusRegionGone : kStatusRefused, h.seq, text.data(), text.size(), error);
  };

  if (type == Msg::NcclPlan) {
    if (payload.size() < 8) return false;
    uint32_t count;
    std::memcpy(&count, payload.data(), 4);
    if (payload.size() != 8 + static_cast<uint64_t>(count) * sizeof(WireNcclPiece)) return false;
    auto it = state.links.find(h.aux);
    if (it == state.links.end()) return true;  // posts on an unknown link are refused
    NcclInbound::Link& link = it->second;
    const auto* in = reinterpret_cast<const WireNcclPiece*>(payload.data() + 8);
    NcclInbound::Plan plan;
    plan.pieces.resize(count);
    std::string problem;
    for (uint32_t i = 0; i < count && problem.empty(); ++i) {
      auto region = agent_.region(in[i].region);
      if (!region) {
        problem = kRegionGoneMark + ("region " + std::to_string(in[i].region) + " is not registered at '" + self + "'");
      } else if (region->kind != MemKind::Device || region->device != link.device) {
        problem = "region " + std::to_string(in[i].region) + " is not memory of GPU " + std::to_string(link.device);
      } else if (in[i].length == 0 || in[i].offset > region->size || in[i].length > region->size - in[i].offset) {
        problem = "piece " + std::to_string(i) + " (offset " + std::to_string(in[i].offset) + ", length " +
                  std::to_string(in[i].length) + ") is outside region " + std::to_string(in[i].region) + " of " +
                  std::to_string(region->size) + " bytes";
      } else {
        plan.pieces[i] = {region->dev + in[i].offset, in[i].length};
        if (plan.regions.empty() || plan.regions.back() != in[i].region) plan.regions.push_back(in[i].region);
      }
    }
    uint32_t flags;
    std::memcpy(&flags, payload.data() + 4, 4);
    if (problem.empty() && (flags & 1u)) {
      if (!link.comm) {
        problem = "the nccl backend is unavailable at '" + self + "': " + reason_;
      } else {
        if (!link.staging) {
          int device = link.device;
          auto fn = agent_.onProgress([this, device] {
            CudaState::DeviceKernels& k = agent_.cuda().kernelsFor(device);
            return std::make_pair(k.copyChunks, k.multiprocessors);
          });
          auto st = std::make_shared<NcclStaging>();
          st->comm = link.comm.get();
          st->cuda = agent_.cuda().driver();
          st->copy = fn.first;
          st->multiprocessors = fn.second;
          link.staging = st;
        }
        if (!link.staging->copy) {
          problem = "'" + self + "' cannot stage nccl transfers: its copy kernel is unavailable";
        } else {
          auto staged = std::make_shared<NcclStagedPlan>();
          staged->id = h.seq;
          staged->gather = !(flags & 2u);  // the target sends (gathers) for a READ
          for (const auto& pc : plan.pieces) staged->bytes += pc.second;
          staged->pieces = plan.pieces;
          plan.staged = staged;
        }
      }
    }
    if (problem.empty()) {
      link.plans[h.seq] = std::move(plan);
    } else {
      link.refused[h.seq] = problem;
    }
    return true;
  }

  // NcclPost
  if (payload.size() < 16) return false;
  uint64_t planId;
  uint32_t fields[2];
  std::memcpy(&planId, payload.data(), 8);
  std::memcpy(fields, payload.data() + 8, 8);
  if (payload.size() != 16 + static_cast<uint64_t>(fields[1])) return false;
  // A refused post's notification is never delivered; a poller must still hear that its number is spent.
  auto refusePost = [&](const std::string& problem) {
    if (fields[1]) agent_.deliveredCarried(conn, std::vector<unsigned char>(payload.begin() + 16, payload.end()), false);
    return refuse(problem);
  };
  auto it = state.links.find(h.aux);
  if (it == state.links.end()) return refusePost("no nccl link " + std::to_string(h.aux) + " with '" + conn.peerName + "'");
  NcclInbound::Link& link = it->second;
  if (!link.comm) return refusePost("the nccl backend is unavailable at '" + self + "': " + reason_);
  auto refused = link.refused.find(planId);
  if (refused != link.refused.end()) return refusePost(refused->second);
  auto plan = link.plans.find(planId);
  if (plan == link.plans.end()) return refusePost("unknown nccl plan " + std::to_string(planId));
  for (uint32_t id : plan->second.regions) {
    if (!agent_.region(id)) {
      return refusePost(kRegionGoneMark + ("region " + std::to_string(id) + " was deregistered at '" + self + "'"));
    }
  }
  const auto& pieces = plan->second.pieces;
  Op op = fields[0] == static_cast<uint32_t>(Op::Write) ? Op::Write : Op::Read;
  std::vector<nccl::Op> ops;
  nccl::Communicator::StreamHook before, after;
  if (plan->second.staged) {
    stagedOps(link.staging, plan->second.staged, op == Op::Read, 0, ops, before, after);
  } else {
    ops.resize(pieces.size());
    for (size_t i = 0; i < ops.size(); ++i) {
      ops[i].kind = op == Op::Write ? nccl::OpKind::Recv : nccl::OpKind::Send;
      (op == Op::Write ? ops[i].recv : ops[i].send) = pieces[i].first;
      ops[i].count = pieces[i].second;
      ops[i].dtype = nccl::ncclUint8;
      ops[i].peer = 0;
    }
  }
  if (fields[1]) {
    std::lock_guard<std::mutex> lock(state.shared->mutex);
    state.shared->notifications[h.seq].assign(payload.begin() + 16, payload.end());
  }
  link.comm->submit(h.seq, std::move(ops), agent_.options().timeoutMs, std::string("transfer ") + opName(op) + " (target)",
                    nullptr, std::move(before), std::move(after));
  return true;
}

}  // namespace tandem::transfer
