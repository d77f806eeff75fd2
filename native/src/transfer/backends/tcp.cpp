#include "tcp.h"

#include <algorithm>

#include "../agent.h"
#include "../connection.h"

namespace tandem::transfer {

namespace {

struct WirePiece {
  uint64_t offset;
  uint64_t length;
};

// The plan's messages: [first, last) piece ranges, one per run of pieces on one remote region.
struct TcpPlan final : BackendPlanState {
  std::vector<std::pair<size_t, size_t>> groups;
};

bool isHostKind(MemKind k) { return k != MemKind::Device; }

}  // namespace

void TcpBackend::checkPlan(const PlanShape& shape) const {
  if (shape.localDevice || shape.remoteDevice) Agent::unavailable(id(), "tcp moves host memory only");
}

std::unique_ptr<BackendPlanState> TcpBackend::preparePlan(Plan& plan) {
  auto state = std::make_unique<TcpPlan>();
  for (size_t i = 0; i < plan.pieces.size(); ++i) {
    if (state->groups.empty() || plan.pieces[state->groups.back().first].remoteRegion != plan.pieces[i].remoteRegion) {
      state->groups.push_back({i, i + 1});
    } else {
      state->groups.back().second = i + 1;
    }
  }
  return state;
}

void TcpBackend::post(const std::shared_ptr<Plan>& plan, uint64_t token, std::vector<unsigned char>& notif) {
  std::string error;
  auto conn = agent_.waitConnected(plan->peer, error);
  if (!conn) return agent_.fail(token, agent_.unreachableCode(*plan->peer), error);
  Peer& peer = *plan->peer;
  const auto& groups = plan->stateAs<TcpPlan>().groups;
  // A READ's notification goes out once the data is here (answer()); a WRITE carries its own.
  agent_.addPending(token, plan, plan->op == Op::Read ? notif : std::vector<unsigned char>{}, groups.size());
  for (size_t g = 0; g < groups.size(); ++g) {
    auto [first, last] = groups[g];
    bool lastGroup = g + 1 == groups.size();
    const bool carries = plan->op == Op::Write && lastGroup && !notif.empty();
    const uint64_t number = carries ? agent_.carriedNumber(peer, notif) : 0;
    uint32_t notifLen = carries ? static_cast<uint32_t>(notif.size() + (number ? 8 : 0)) : 0;
    std::vector<WirePiece> table;
    table.reserve(last - first);
    uint64_t data = 0;
    for (size_t i = first; i < last; ++i) {
      table.push_back({plan->pieces[i].remoteOff, plan->pieces[i].length});
      data += plan->pieces[i].length;
    }
    uint32_t counts[2] = {static_cast<uint32_t>(table.size()), notifLen};
    Msg type = plan->op == Op::Write ? Msg::WriteData : Msg::ReadRequest;
    uint64_t length = sizeof(counts) + table.size() * sizeof(WirePiece) + (plan->op == Op::Write ? data + notifLen : 0);
    Header h{static_cast<uint32_t>(type), plan->remotes[plan->pieces[first].remoteRegion]->d.id, token, length};
    std::vector<iovec> iov{{&h, sizeof(h)}, {counts, sizeof(counts)}, {table.data(), table.size() * sizeof(WirePiece)}};
    if (plan->op == Op::Write) {
      for (size_t i = first; i < last; ++i) iov.push_back({reinterpret_cast<void*>(plan->pieces[i].local), plan->pieces[i].length});
      if (number) iov.push_back({const_cast<uint64_t*>(&number), 8});
      if (notifLen) iov.push_back({notif.data(), notif.size()});
    }
    bool sent;
    {
      std::lock_guard<std::mutex> lock(conn->sendMutex);
      sent = sendVector(conn->fd, iov, error);
    }
    if (!sent) {
      if (agent_.erasePending(token)) agent_.fail(token, "TANDEM_REMOTE_DISCONNECTED", "peer '" + peer.d.name + "': " + error);
      return;
    }
  }
  // Completion arrives on the peer's reader thread (answer()).
}

bool TcpBackend::serve(const std::shared_ptr<Connection>& connPtr, const Header& h,
                       std::unique_ptr<BackendInboundState>& state, std::string& error) {
  Connection& conn = *connPtr;
  const Msg type = static_cast<Msg>(h.type);
  uint32_t counts[2];
  if (h.length < sizeof(counts) || !recvAll(conn.fd, counts, sizeof(counts), error)) return false;
  uint64_t pieceCount = counts[0];
  uint64_t notifLen = type == Msg::WriteData ? counts[1] : 0;
  if (pieceCount * sizeof(WirePiece) + sizeof(counts) > h.length) return false;
  std::vector<WirePiece> pieces(pieceCount);
  if (!recvAll(conn.fd, pieces.data(), pieces.size() * sizeof(WirePiece), error)) return false;
  uint64_t dataBytes = h.length - sizeof(counts) - pieces.size() * sizeof(WirePiece);
  const std::string& self = agent_.name();

  // Validate against our own registration: the initiator's checks are not trusted.
  std::string problem;
  uint32_t status = kStatusRefused;
  std::shared_ptr<Region> region = agent_.region(h.aux);
  uint64_t total = 0;
  if (!region) {
    // Region ids are never reused: this one was deregistered (the initiator's metadata is older).
    status = kStatusRegionGone;
    problem = "region " + std::to_string(h.aux) + " is not registered at '" + self + "'";
  } else if (!isHostKind(region->kind)) {
    problem = "region " + std::to_string(h.aux) + " is device memory; tcp moves host memory only";
  } else {
    for (size_t i = 0; i < pieces.size() && problem.empty(); ++i) {
      if (pieces[i].length == 0 || pieces[i].offset > region->size || pieces[i].length > region->size - pieces[i].offset) {
        problem = "piece " + std::to_string(i) + " (offset " + std::to_string(pieces[i].offset) + ", length " +
                  std::to_string(pieces[i].length) + ") is outside region " + std::to_string(h.aux) + " of " +
                  std::to_string(region->size) + " bytes";
      }
      total += pieces[i].length;
    }
    if (problem.empty() && type == Msg::WriteData && total + notifLen != dataBytes) {
      problem = "WRITE payload size does not match its pieces";
    }
  }

  if (type == Msg::WriteData) {
    if (!problem.empty()) {
      // The refused WRITE's notification is not delivered, but a poller must hear its number is spent.
      bool carried = notifLen >= 8 && notifLen <= dataBytes && conn.inbox && conn.inbox->ring;
      if (!discard(conn.fd, dataBytes - (carried ? notifLen : 0), error)) return false;
      if (carried) {
        std::vector<unsigned char> notif(notifLen);
        if (!recvAll(conn.fd, notif.data(), notif.size(), error)) return false;
        agent_.deliveredCarried(conn, std::move(notif), false);
      }
      return sendMessage(conn, Msg::Done, status, h.seq, problem.data(), problem.size(), error);
    }
    for (const auto& p : pieces) {
      if (!recvAll(conn.fd, region->host + p.offset, p.length, error)) return false;
    }
    std::vector<unsigned char> notif(notifLen);
    if (notifLen && !recvAll(conn.fd, notif.data(), notif.size(), error)) return false;
    // The data is in place before the notification is delivered, and before the initiator hears Done.
    if (notifLen) agent_.deliveredCarried(conn, std::move(notif), true);
    return sendMessage(conn, Msg::Done, 0, h.seq, nullptr, 0, error);
  }
  if (!problem.empty() || dataBytes != 0) {
    if (problem.empty()) problem = "READ request carries unexpected payload";
    if (!discard(conn.fd, dataBytes, error)) return false;
    return sendMessage(conn, Msg::ReadData, status, h.seq, problem.data(), problem.size(), error);
  }
  Header rh{static_cast<uint32_t>(Msg::ReadData), 0, h.seq, total};
  std::vector<iovec> iov;
  iov.reserve(pieces.size() + 1);
  iov.push_back({&rh, sizeof(rh)});
  for (const auto& p : pieces) iov.push_back({region->host + p.offset, p.length});
  std::lock_guard<std::mutex> lock(conn.sendMutex);
  return sendVector(conn.fd, iov, error);
}

bool TcpBackend::answer(const std::shared_ptr<Peer>& peer, Connection& conn, const Header& h,
                        const std::shared_ptr<Plan>& pendingPlan, std::string& error) {
  const int fd = conn.fd;
  const Msg type = static_cast<Msg>(h.type);
  // Which of the post's messages this answers (none: canceled or timed out meanwhile).
  std::shared_ptr<Plan> plan;
  std::pair<size_t, size_t> group{0, 0};
  std::vector<unsigned char> notif;
  size_t index = 0;
  bool last = false;
  if (agent_.takeAnswer(h.seq, index, last, &notif, &plan, nullptr, false)) {
    group = plan->stateAs<TcpPlan>().groups[index];
  }
  if (h.aux != 0) {  // an error answer carries text
    std::string text(std::min<uint64_t>(h.length, 4096), '\0');
    if (!recvAll(fd, text.data(), text.size(), error) || !discard(fd, h.length - text.size(), error)) return false;
    bool erased = agent_.erasePending(h.seq);
    if (!erased && !plan) return true;
    if (h.aux == kStatusRegionGone && plan) {
      const uint32_t id = plan->remotes[plan->pieces[group.first].remoteRegion]->d.id;
      agent_.fail(h.seq, "TANDEM_REMOTE_REGION_GONE", agent_.regionGone(peer, id, "peer '" + peer->d.name + "': " + text));
      return true;
    }
    agent_.fail(h.seq, "TANDEM_REMOTE_ERROR", "peer '" + peer->d.name + "' refused: " + text);
    return true;
  }
  if (type == Msg::ReadData) {
    uint64_t expected = 0;
    if (plan) {
      for (size_t i = group.first; i < group.second; ++i) expected += plan->pieces[i].length;
    }
    if (!plan || expected != h.length) {
      if (!discard(fd, h.length, error)) return false;
      if (plan) {
        agent_.erasePending(h.seq);
        agent_.fail(h.seq, "TANDEM_REMOTE_ERROR", "READ answer size does not match the request");
      }
      return true;
    }
    for (size_t i = group.first; i < group.second; ++i) {
      if (!recvAll(fd, reinterpret_cast<void*>(plan->pieces[i].local), plan->pieces[i].length, error)) return false;
    }
  } else if (h.length) {
    if (!discard(fd, h.length, error)) return false;
  }
  if (!plan || !last) return true;
  if (!agent_.erasePending(h.seq)) return true;  // canceled or timed out while we read
  if (type == Msg::ReadData && !notif.empty()) {
    std::string notifyError;
    if (!agent_.notifyOn(*peer, conn, notif, notifyError)) {
      agent_.fail(h.seq, "TANDEM_REMOTE_DISCONNECTED", "peer '" + peer->d.name + "': " + notifyError);
      return false;
    }
  }
  agent_.succeed(h.seq);
  return true;
}

}  // namespace tandem::transfer
