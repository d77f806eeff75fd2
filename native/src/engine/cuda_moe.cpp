#include "cuda_moe.h"

#include <algorithm>
#include <string>

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

CudaMoe::CudaMoe(const LlamaConfig& c, const PlaceFn& place) : moe_(c.moe), hidden_(static_cast<size_t>(c.hiddenSize)) {
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
  const size_t E = m.numExperts, h = hidden_, mi = m.intermediateSize;
  layers_.resize(c.numLayers);
  for (LayerOffsets& L : layers_) {
    L.router = place(E * h);
    L.gateUp = place(E * 2 * mi * h);
    L.down = place(E * h * mi);
  }
}

CudaMoe::Placed CudaMoe::placeOf(const WeightEntry& w) const {
  const size_t h = hidden_, mi = moe_.intermediateSize;
  if (w.layer < 0 || w.layer >= static_cast<int>(layers_.size()))
    throw BadInput("tensor '" + w.name + "': layer " + std::to_string(w.layer) + " out of range");
  const LayerOffsets& L = layers_[w.layer];
  if (w.role == WeightRole::Router) return {L.router, static_cast<size_t>(moe_.numExperts), h};
  if (w.expert < 0 || w.expert >= moe_.numExperts)
    throw BadInput("tensor '" + w.name + "': expert " + std::to_string(w.expert) + " out of range");
  const size_t e = w.expert;
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
  s.pairRow = take(P * 4);
  s.counts = take(E * 4);
  s.offsets = take((E + 1) * 4);
  s.tileStarts = take((E + 1) * 4);
  s.cursor = take(E * 4);
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
  const CUdeviceptr tileStarts = scratch + s.tileStarts, cursor = scratch + s.cursor, xPerm = scratch + s.xPerm;
  const CUdeviceptr gateUp = scratch + s.gateUp, act = scratch + s.act, y = scratch + s.y;

  gemm(xn, itok, h, weights + L.router, E, logits);
  device_->check(d.cuMemsetD8Async(counts, 0, static_cast<size_t>(E) * 4, stream), "cuMemsetD8Async (expert counts)");
  launch(fn_.route, (static_cast<unsigned>(ntok) + 3) / 4, 1, 128, logits, itok, E, k, normTopk, topIds, topWeights,
         counts);
  const bool small = decodeTiles(P);
  const int tileRows = small ? kDecodeTileRows : kPrefillTileRows;
  launch(fn_.offsets, 1, 1, 32, counts, E, tileRows, offsets, tileStarts, cursor);
  launch(fn_.scatter, static_cast<unsigned>(P), 1, 128, topIds, k, xn, h, cursor, pairRow, xPerm);
  // Row tiles for the worst routing: sum over experts of ceil(rows / tileRows) <= ceil(P / tileRows) + experts with
  // rows - 1.
  const unsigned rowTiles = static_cast<unsigned>((P + tileRows - 1) / tileRows + std::min<size_t>(E, P));
  if (rowTiles > kMaxGridY)
    throw BadInput("a batch of " + std::to_string(ntok) + " tokens is more than the GPU engine's expert GEMM takes in "
                   "one pass; schedule fewer tokens per step");
  CUfunction grouped = small ? fn_.gemmDecode : fn_.gemmPrefill;
  const unsigned long long gateUpStride = 2ull * mi * h, downStride = 1ull * h * mi;
  const int twoMi = 2 * mi;
  launch(grouped, static_cast<unsigned>((twoMi + kTileCols - 1) / kTileCols), rowTiles, kGemmThreads, xPerm,
         weights + L.gateUp, gateUpStride, gateUp, offsets, tileStarts, E, twoMi, h);
  launch(fn_.siluMul, static_cast<unsigned>(P), siluMulBlocks(mi), 256, gateUp, mi, act);
  launch(grouped, static_cast<unsigned>((h + kTileCols - 1) / kTileCols), rowTiles, kGemmThreads, act,
         weights + L.down, downStride, y, offsets, tileStarts, E, h, mi);
  launch(fn_.combine, static_cast<unsigned>(ntok), 1, 256, y, pairRow, topIds, topWeights, k, h, out);
}

}  // namespace tandem::engine
