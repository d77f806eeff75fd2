#include "cuda_moe.h"

#include <algorithm>
#include <string>

#include "cpu_moe.h"  // makeExpertPlacement: the CPU ranks' placement check

namespace tandem::engine {
namespace {

constexpr size_t kAlign = 256;
// moe.cu's limits (namespace tandem_moe) and the grouped GEMM's tiles: 16 x 64 (decode) or 64 x 64 (prefill).
constexpr int kMaxExperts = 1024, kMaxTopK = 32, kWmmaDim = 16;
constexpr int kDecodeTileRows = 16, kPrefillTileRows = 64, kTileCols = 64;
constexpr unsigned kGemmThreads = 128;
constexpr unsigned kMaxGridY = 65535;  // the grouped GEMM's row tiles are its grid's y
// Decode tiles while experts average fewer rows than this (a 64-row tile would be mostly padding).
constexpr size_t kDecodeTilesBelowRowsPerExpert = 32;

size_t alignUp(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

}  // namespace

CudaMoe::CudaMoe(const LlamaConfig& c, const PlaceFn& place, const ExpertLayout& layout)
    : moe_(c.moe), hidden_(static_cast<size_t>(c.hiddenSize)), layout_(layout) {
  const MoeConfig& m = moe_;
  if (m.numExperts <= 0 || m.numExperts > kMaxExperts)
    throw BadInput("the GPU engine runs mixture-of-experts models of 1.." + std::to_string(kMaxExperts) +
                   " experts (got " + std::to_string(m.numExperts) + ")");
  if (m.topK <= 0 || m.topK > std::min(kMaxTopK, m.numExperts))
    throw BadInput("the GPU engine routes each token to 1..min(" + std::to_string(kMaxTopK) +
                   ", numExperts) experts (got topK " + std::to_string(m.topK) + ")");
  if (c.hiddenSize % kWmmaDim != 0 || m.intermediateSize % kWmmaDim != 0)
    throw BadInput("the GPU engine's grouped expert GEMM needs hiddenSize and the experts' intermediateSize to be "
                   "multiples of 16 (got " + std::to_string(c.hiddenSize) + " and " +
                   std::to_string(m.intermediateSize) + "); use the CPU engine");
  if (layout.ranks < 1 || m.numExperts % layout.ranks != 0 || layout.rank < 0 || layout.rank >= layout.ranks)
    throw BadInput("expert parallel size " + std::to_string(layout.ranks) + " must divide the model's " +
                   std::to_string(m.numExperts) + " experts (rank " + std::to_string(layout.rank) + ")");
  if (layout.redundantSlots < 0 || layout.redundantSlots > m.numExperts)
    throw BadInput("redundant expert slots per rank must be 0.." + std::to_string(m.numExperts) + " (got " +
                   std::to_string(layout.redundantSlots) + ")");
  const int own = m.numExperts / layout.ranks;
  slotsPerRank_ = own + layout.redundantSlots;
  const size_t S = slotsPerRank_, h = hidden_, mi = m.intermediateSize, E = m.numExperts;
  layers_.resize(c.numLayers);
  for (LayerOffsets& L : layers_) {
    L.router = place(E * h);
    L.gateUp = place(S * 2 * mi * h);
    L.down = place(S * h * mi);
  }
  // Each rank's own experts in its first slots; redundant slots empty until a placement change fills them.
  std::vector<int32_t> row(static_cast<size_t>(layout.ranks) * S, -1);
  for (int r = 0; r < layout.ranks; ++r)
    for (int j = 0; j < own; ++j) row[static_cast<size_t>(r) * S + j] = r * own + j;
  slotExpert_.assign(c.numLayers, row);
}

bool CudaMoe::holds(const WeightEntry& w) const {
  if (w.role == WeightRole::Router) return true;
  const int own = moe_.numExperts / layout_.ranks;
  return w.expert >= layout_.rank * own && w.expert < (layout_.rank + 1) * own;
}

size_t CudaMoe::slotGateUpBytes() const { return 2 * static_cast<size_t>(moe_.intermediateSize) * hidden_ * 2; }
size_t CudaMoe::slotDownBytes() const { return hidden_ * static_cast<size_t>(moe_.intermediateSize) * 2; }

size_t CudaMoe::tableStride() const {
  return static_cast<size_t>(moe_.numExperts) + 1 + static_cast<size_t>(layout_.ranks) * slotsPerRank_;
}

std::vector<int32_t> CudaMoe::tablesOf(const std::vector<std::vector<int32_t>>& slotExpert) const {
  const int E = moe_.numExperts;
  const size_t T = tableStride();
  std::vector<int32_t> out(slotExpert.size() * T, 0);
  for (size_t l = 0; l < slotExpert.size(); ++l) {
    int32_t* start = out.data() + l * T;
    int32_t* list = start + E + 1;
    const std::vector<int32_t>& row = slotExpert[l];
    for (int32_t e : row)
      if (e >= 0) ++start[e + 1];
    for (int e = 0; e < E; ++e) start[e + 1] += start[e];
    std::vector<int32_t> fill(start, start + E);
    for (size_t slot = 0; slot < row.size(); ++slot)  // ascending slots per expert
      if (row[slot] >= 0) list[fill[row[slot]]++] = static_cast<int32_t>(slot);
  }
  return out;
}

CudaMoe::Placed CudaMoe::placeOf(const WeightEntry& w) const {
  const size_t h = hidden_, mi = moe_.intermediateSize;
  if (w.layer < 0 || w.layer >= static_cast<int>(layers_.size()))
    throw BadInput("tensor '" + w.name + "': layer " + std::to_string(w.layer) + " out of range");
  const LayerOffsets& L = layers_[w.layer];
  if (w.role == WeightRole::Router) return {L.router, static_cast<size_t>(moe_.numExperts), h};
  if (w.expert < 0 || w.expert >= moe_.numExperts)
    throw BadInput("tensor '" + w.name + "': expert " + std::to_string(w.expert) + " out of range");
  if (!holds(w))
    throw BadInput("tensor '" + w.name + "': expert " + std::to_string(w.expert) + " is not on expert-parallel rank " +
                   std::to_string(layout_.rank));
  const size_t e = w.expert - layout_.rank * (moe_.numExperts / layout_.ranks);  // its local slot
  switch (w.role) {
    case WeightRole::ExpertGate: return {L.gateUp + e * 2 * mi * h * 2, mi, h};
    case WeightRole::ExpertUp: return {L.gateUp + (e * 2 * mi + mi) * h * 2, mi, h};
    case WeightRole::ExpertDown: return {L.down + e * h * mi * 2, h, mi};
    default: throw BadInput("tensor '" + w.name + "' is not a mixture-of-experts tensor");
  }
}

void CudaMoe::init(CudaDevice& device) {
  device_ = &device;
  fn_.route = device.function("tandem_moe_route");
  fn_.offsets = device.function("tandem_moe_offsets");
  fn_.scatter = device.function("tandem_moe_scatter");
  fn_.gemmDecode = device.function("tandem_moe_gemm_decode");
  fn_.gemmPrefill = device.function("tandem_moe_gemm_prefill");
  fn_.siluMul = device.function("tandem_llama_silu_mul");
  fn_.combine = device.function("tandem_moe_combine");
  const CudaDriver& d = device.driver();
  const std::vector<int32_t> tables = tablesOf(slotExpert_);
  tables_ = device.allocate(tables.size() * 4, "cuMemAlloc (expert routing tables)");
  const size_t loadBytes = layers_.size() * (static_cast<size_t>(moe_.numExperts) + 1) * 8;
  load_ = device.allocate(loadBytes, "cuMemAlloc (expert load counters)");
  device.check(d.cuMemcpyHtoDAsync(tables_->ptr, tables.data(), tables.size() * 4, device.stream()),
               "cuMemcpyHtoDAsync (expert routing tables)");
  device.check(d.cuMemsetD8Async(load_->ptr, 0, loadBytes, device.stream()), "cuMemsetD8Async (expert load)");
  device.check(d.cuStreamSynchronize(device.stream()), "cuStreamSynchronize (expert routing tables)");
}

void CudaMoe::release() {
  if (!device_) return;
  for (auto* a : {&tables_, &load_, &staging_}) {
    if (*a) {
      try {
        device_->freeAllocation(**a);
      } catch (const std::exception&) {
        // the device frees what it still tracks when it closes
      }
      a->reset();
    }
  }
  staged_ = 0;
}

std::pair<CUdeviceptr, CUdeviceptr> CudaMoe::slotAddress(CUdeviceptr weights, int layer, int slot) const {
  if (layer < 0 || layer >= static_cast<int>(layers_.size()) || slot < 0 || slot >= slotsPerRank_)
    throw BadInput("expert slot (layer " + std::to_string(layer) + ", slot " + std::to_string(slot) +
                   ") out of range: " + std::to_string(layers_.size()) + " layers x " +
                   std::to_string(slotsPerRank_) + " slots");
  const LayerOffsets& L = layers_[layer];
  return {weights + L.gateUp + slot * slotGateUpBytes(), weights + L.down + slot * slotDownBytes()};
}

void CudaMoe::stageExperts(const std::vector<std::pair<CUdeviceptr, CUdeviceptr>>& sources) {
  if (!device_ || !tables_) throw NativeError("TANDEM_INTERNAL", "the GPU MoE was not initialised");
  const CudaDriver& d = device_->driver();
  CUstream stream = device_->stream();
  if (staging_) {
    device_->freeAllocation(*staging_);
    staging_.reset();
  }
  staged_ = 0;
  if (sources.empty()) return;
  const size_t gu = slotGateUpBytes(), dn = slotDownBytes();
  staging_ = device_->allocate(sources.size() * (gu + dn), "cuMemAlloc (expert staging)");
  for (size_t i = 0; i < sources.size(); ++i) {
    const CUdeviceptr at = staging_->ptr + i * (gu + dn);
    device_->check(d.cuMemcpyDtoDAsync(at, sources[i].first, gu, stream), "cuMemcpyDtoDAsync (expert staging)");
    device_->check(d.cuMemcpyDtoDAsync(at + gu, sources[i].second, dn, stream), "cuMemcpyDtoDAsync (expert staging)");
  }
  device_->check(d.cuStreamSynchronize(stream), "cuStreamSynchronize (expert staging)");
  staged_ = sources.size();
}

ExpertCopyStats CudaMoe::commitExperts(CUdeviceptr weights, const std::vector<std::pair<int, int>>& dests,
                                       std::vector<std::vector<int32_t>> slotExpert) {
  if (!device_ || !tables_) throw NativeError("TANDEM_INTERNAL", "the GPU MoE was not initialised");
  if (dests.size() != staged_)
    throw BadInput("commitExperts: " + std::to_string(dests.size()) + " destinations for " + std::to_string(staged_) +
                   " staged experts");
  const ExpertPlacement checked = makeExpertPlacement(static_cast<int>(layers_.size()), moe_.numExperts,
                                                      layout_.ranks, slotsPerRank_, std::move(slotExpert));
  for (const auto& [layer, slot] : dests) slotAddress(weights, layer, slot);  // range checks before any copy
  const CudaDriver& d = device_->driver();
  CUstream stream = device_->stream();
  const size_t gu = slotGateUpBytes(), dn = slotDownBytes();
  ExpertCopyStats stats;
  for (size_t i = 0; i < dests.size(); ++i) {
    const auto [gateUp, down] = slotAddress(weights, dests[i].first, dests[i].second);
    const CUdeviceptr at = staging_->ptr + i * (gu + dn);
    device_->check(d.cuMemcpyDtoDAsync(gateUp, at, gu, stream), "cuMemcpyDtoDAsync (expert slot)");
    device_->check(d.cuMemcpyDtoDAsync(down, at + gu, dn, stream), "cuMemcpyDtoDAsync (expert slot)");
    ++stats.slotsCopied;
    stats.bytes += gu + dn;
  }
  const std::vector<int32_t> tables = tablesOf(checked.slotExpert);
  device_->check(d.cuMemcpyHtoDAsync(tables_->ptr, tables.data(), tables.size() * 4, stream),
                 "cuMemcpyHtoDAsync (expert routing tables)");
  device_->check(d.cuStreamSynchronize(stream), "cuStreamSynchronize (expert placement)");
  slotExpert_ = checked.slotExpert;
  if (staging_) {
    device_->freeAllocation(*staging_);
    staging_.reset();
  }
  staged_ = 0;
  return stats;
}

CudaMoe::Load CudaMoe::takeLoad() {
  if (!device_ || !load_) throw NativeError("TANDEM_INTERNAL", "the GPU MoE was not initialised");
  const CudaDriver& d = device_->driver();
  CUstream stream = device_->stream();
  const size_t E = moe_.numExperts, n = layers_.size() * (E + 1);
  std::vector<uint64_t> raw(n);
  device_->check(d.cuMemcpyDtoHAsync(raw.data(), load_->ptr, n * 8, stream), "cuMemcpyDtoHAsync (expert load)");
  device_->check(d.cuMemsetD8Async(load_->ptr, 0, n * 8, stream), "cuMemsetD8Async (expert load)");
  device_->check(d.cuStreamSynchronize(stream), "cuStreamSynchronize (expert load)");
  Load out;
  out.perExpert.reserve(layers_.size() * E);
  for (size_t l = 0; l < layers_.size(); ++l) {
    out.perExpert.insert(out.perExpert.end(), raw.begin() + l * (E + 1), raw.begin() + l * (E + 1) + E);
    out.pairsRun.push_back(raw[l * (E + 1) + E]);
  }
  return out;
}

bool CudaMoe::decodeTiles(size_t pairs) const {
  return pairs < kDecodeTilesBelowRowsPerExpert * static_cast<size_t>(moe_.numExperts);
}

CudaMoe::Scratch CudaMoe::scratchOf(size_t ntok) const {
  const size_t E = moe_.numExperts, P = ntok * moe_.topK, h = hidden_, mi = moe_.intermediateSize;
  const size_t padded = P + kPrefillTileRows;  // a tile's rows past the last pair are read, never stored
  Scratch s{};
  size_t used = 0;
  auto take = [&](size_t bytes) {
    size_t at = used;
    used += alignUp(bytes);
    return at;
  };
  s.logits = take(ntok * E * 4);
  s.topIds = take(P * 4);
  s.topWeights = take(P * 4);
  s.pairSlot = take(P * 4);
  s.pairRow = take(P * 4);
  const size_t S = slotsPerRank_;
  s.counts = take(S * 4);
  s.offsets = take((S + 1) * 4);
  s.tileStarts = take((S + 1) * 4);
  s.cursor = take(S * 4);
  s.xPerm = take(padded * h * 2);
  s.gateUp = take(P * 2 * mi * 4);
  s.act = take(padded * mi * 2);
  s.y = take(P * h * 4);
  s.bytes = used;
  return s;
}

size_t CudaMoe::scratchBytes(size_t ntok) const { return scratchOf(ntok).bytes; }

void CudaMoe::enqueue(int layer, CUdeviceptr weights, CUdeviceptr xn, size_t ntok, CUdeviceptr scratch,
                      CUdeviceptr out, const GemmFn& gemm) {
  if (ntok == 0) return;
  const CudaDriver& d = device_->driver();
  CUstream stream = device_->stream();
  auto launch = [&](CUfunction fn, unsigned gridX, unsigned gridY, unsigned block, auto... args) {
    void* params[] = {static_cast<void*>(&args)...};
    device_->check(d.cuLaunchKernel(fn, gridX, gridY, 1, block, 1, 1, 0, stream, params, nullptr),
                   "cuLaunchKernel (mixture of experts)");
  };
  const LayerOffsets& L = layers_[layer];
  const Scratch s = scratchOf(ntok);
  const int E = moe_.numExperts, k = moe_.topK, h = static_cast<int>(hidden_), mi = moe_.intermediateSize;
  const int itok = static_cast<int>(ntok), normTopk = moe_.normTopkProb ? 1 : 0;
  const size_t P = ntok * static_cast<size_t>(k);
  const CUdeviceptr logits = scratch + s.logits, topIds = scratch + s.topIds, topWeights = scratch + s.topWeights;
  const CUdeviceptr pairRow = scratch + s.pairRow, counts = scratch + s.counts, offsets = scratch + s.offsets;
  const CUdeviceptr pairSlot = scratch + s.pairSlot;
  const int S = slotsPerRank_, firstSlot = layout_.rank * S;
  const CUdeviceptr slotStart = tables_->ptr + layer * tableStride() * 4, slotList = slotStart + (E + 1) * 4;
  const CUdeviceptr load = load_->ptr + layer * (static_cast<size_t>(E) + 1) * 8;
  const CUdeviceptr tileStarts = scratch + s.tileStarts, cursor = scratch + s.cursor, xPerm = scratch + s.xPerm;
  const CUdeviceptr gateUp = scratch + s.gateUp, act = scratch + s.act, y = scratch + s.y;

  gemm(xn, itok, h, weights + L.router, E, logits);
  device_->check(d.cuMemsetD8Async(counts, 0, static_cast<size_t>(S) * 4, stream), "cuMemsetD8Async (expert counts)");
  launch(fn_.route, (static_cast<unsigned>(ntok) + 3) / 4, 1, 128, logits, itok, E, k, normTopk, slotStart, slotList,
         firstSlot, S, topIds, topWeights, pairSlot, counts, load);
  const bool small = decodeTiles(P);
  const int tileRows = small ? kDecodeTileRows : kPrefillTileRows;
  launch(fn_.offsets, 1, 1, 32, counts, S, tileRows, offsets, tileStarts, cursor);
  launch(fn_.scatter, static_cast<unsigned>(P), 1, 128, pairSlot, k, xn, h, cursor, pairRow, xPerm);
  // Row tiles for the worst routing: sum over local slots of ceil(rows / tileRows) <= ceil(P / tileRows) + slots
  // with rows - 1.
  const unsigned rowTiles = static_cast<unsigned>((P + tileRows - 1) / tileRows + std::min<size_t>(S, P));
  if (rowTiles > kMaxGridY)
    throw BadInput("a batch of " + std::to_string(ntok) + " tokens is more than the GPU engine's expert GEMM takes in "
                   "one pass; schedule fewer tokens per step");
  CUfunction grouped = small ? fn_.gemmDecode : fn_.gemmPrefill;
  const unsigned long long gateUpStride = 2ull * mi * h, downStride = 1ull * h * mi;
  const int twoMi = 2 * mi;
  launch(grouped, static_cast<unsigned>((twoMi + kTileCols - 1) / kTileCols), rowTiles, kGemmThreads, xPerm,
         weights + L.gateUp, gateUpStride, gateUp, offsets, tileStarts, S, twoMi, h);
  launch(fn_.siluMul, static_cast<unsigned>(P), siluMulBlocks(mi), 256, gateUp, mi, act);
  launch(grouped, static_cast<unsigned>((h + kTileCols - 1) / kTileCols), rowTiles, kGemmThreads, act,
         weights + L.down, downStride, y, offsets, tileStarts, S, h, mi);
  launch(fn_.combine, static_cast<unsigned>(ntok), 1, 256, y, pairRow, topIds, topWeights, k, h, out);
}

}  // namespace tandem::engine
