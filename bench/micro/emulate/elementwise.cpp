// The elementwise kernels of native/kernels/llama.cu, old and new (TANDEM_ELEMENTWISE=2), run on the CPU through
// warp.h on the same random inputs: tandem_llama_rope_kv2 must give tandem_llama_rope_kv's qkv rows and KV pool
// bit for bit (every byte of both, so a stray write shows too), and tandem_llama_add_rmsnorm2 the residual x of
// tandem_llama_add_rmsnorm bit for bit and its bf16 output within one place (its sum of squares adds in another
// order). Shapes: head dims 16, 64, 128 (float4 path) and 12, 20 (scalar path), GQA 32 / 8, 8 / 1, 4 / 4, tokens
// at scattered positions in shuffled slots of both pool layouts; hidden sizes 4096, 64, 20480 (past the registers
// the new norm keeps) and 1030 (not a multiple of 4), with and without delta and output rows. run.mjs extracts the
// kernels' source into kernels.inc and builds this; exit 1 when any case differs.
//   node bench/micro/emulate/run.mjs elementwise [--quick]
#include "warp.h"

Dim3 blockDim;
// __shared__ declarations (run.mjs rewrites them to emuShared): consecutive 16-byte-aligned pieces of the CTA's
// shared memory. Every thread of a CTA runs the same declarations in the same order, so all get the same pieces.
constexpr size_t kEmuSmem = 16384;
thread_local size_t emuSharedUsed;
template <typename T> T* emuShared(size_t n) {
  const size_t at = (emuSharedUsed + 15) & ~size_t(15);
  emuSharedUsed = at + n * sizeof(T);
  if (emuSharedUsed > kEmuSmem) { fprintf(stderr, "emulated shared memory exhausted\n"); abort(); }
  return reinterpret_cast<T*>(emuCta().smem + at);
}
struct uint2 { uint32_t x, y; };
inline __nv_bfloat16 __float2bfloat16(float f) { return {f2bf(f)}; }
inline float __bfloat162float(__nv_bfloat16 b) { return bf2f(b.x); }
inline float2 __bfloat1622float2(__nv_bfloat162 v) { return {bf2f(v.x.x), bf2f(v.y.x)}; }
inline float rsqrtf(float v) { return 1.0f / std::sqrt(v); }
namespace tandem_pdl { inline void letDependentsLaunch() {} }
#define __global__
#define __launch_bounds__(...)

#include "kernels.inc"

#include <functional>
#include <random>
#include <string>

// Runs `kernel` over a (gx, gy) grid of `threads`-thread CTAs, one CTA at a time; the CTA's threads are made once
// and step through the grid together. Shared memory is NaN (0xff bytes) when each CTA starts.
void launch(unsigned gx, unsigned gy, unsigned threads, const std::function<void()>& kernel) {
  gridDim = {gx, gy, 1};
  blockDim = {threads, 1, 1};
  Cta cta(threads);
  std::vector<unsigned char> shared(kEmuSmem);
  cta.window = cta.smem = shared.data();
  std::vector<std::thread> ts;
  for (unsigned t = 0; t < threads; ++t)
    ts.emplace_back([&, t] {
      threadIdx = {t, 0, 0};
      emuCtaPtr = &cta;
      for (unsigned by = 0; by < gy; ++by)
        for (unsigned bx = 0; bx < gx; ++bx) {
          if (t == 0) memset(shared.data(), 0xff, shared.size());
          cta.bar.arrive_and_wait();
          blockIdx = {bx, by, 0};
          emuSharedUsed = 0;
          kernel();
          cta.bar.arrive_and_wait();
        }
    });
  for (auto& t : ts) t.join();
}

template <typename T> size_t differing(const std::vector<T>& a, const std::vector<T>& b) {
  size_t n = 0;
  for (size_t i = 0; i < a.size(); ++i) n += memcmp(&a[i], &b[i], sizeof(T)) != 0;
  return n;
}

// withBias: the old path adds the q / k / v bias in tandem_llama_add_bias first, rope_kv2 as it reads the row.
bool ropeCase(int D, int H, int KVH, int blockMajor, int ntok, unsigned seed, bool withBias = false) {
  using namespace std;
  const int numLayers = 3, layer = 1, blockSize = 16, numBlocks = (ntok + blockSize - 1) / blockSize + 5;
  const int kvDim = KVH * D, qDim = H * D, rowStride = qDim + 2 * kvDim, half = D / 2;
  mt19937 rng(seed);
  uniform_real_distribution<float> uniform(-4.f, 4.f);
  vector<float> invFreq(half);
  for (int i = 0; i < half; ++i) invFreq[i] = (float)(1.0 / pow(500000.0, 2.0 * i / D));
  // Distinct slots (no two tokens write one place), each at a position of its slot's offset in the block.
  vector<int> slots(numBlocks * blockSize), positions(ntok), tokenBlocks(ntok);
  for (size_t i = 0; i < slots.size(); ++i) slots[i] = i;
  shuffle(slots.begin(), slots.end(), rng);
  for (int t = 0; t < ntok; ++t) {
    tokenBlocks[t] = slots[t] / blockSize;
    positions[t] = blockSize * (int)(rng() % 700) + slots[t] % blockSize;
  }
  vector<float> qkv((size_t)ntok * rowStride);
  for (auto& v : qkv) v = uniform(rng);
  vector<__nv_bfloat16> pool((size_t)numLayers * 2 * numBlocks * blockSize * kvDim);
  for (auto& v : pool) v = {f2bf(uniform(rng))};
  vector<__nv_bfloat16> bias(withBias ? rowStride : 0);
  for (auto& v : bias) v = {f2bf(uniform(rng))};
  const __nv_bfloat16* biasPtr = withBias ? bias.data() : nullptr;
  vector<float> qkvOld = qkv, qkvNew = qkv;
  vector<__nv_bfloat16> poolOld = pool, poolNew = pool;
  if (withBias) launch(ntok, 1, 256, [&] { tandem_llama_add_bias(qkvOld.data(), bias.data(), rowStride); });
  launch(ntok, H + KVH + 1, 64, [&] {
    tandem_llama_rope_kv(qkvOld.data(), positions.data(), tokenBlocks.data(), invFreq.data(), H, KVH, D,
                         poolOld.data(), layer, numLayers, numBlocks, blockSize, blockMajor);
  });
  launch(ntok, (H + KVH + kRope2Heads - 1) / kRope2Heads, kRope2Threads, [&] {
    tandem_llama_rope_kv2(qkvNew.data(), positions.data(), tokenBlocks.data(), invFreq.data(), H, KVH, D,
                          poolNew.data(), layer, numLayers, numBlocks, blockSize, blockMajor, biasPtr);
  });
  // The new kernel's K and V slots hold the bf16 of its rotated k and its v (where they went, independently of
  // the old kernel), and the rotation changed the q and k heads.
  size_t misplaced = 0;
  const size_t tile = (size_t)blockSize * kvDim;
  for (int t = 0; t < ntok; ++t)
    for (int kv = 0; kv < 2; ++kv) {
      const size_t at = kvTile(layer, kv, tokenBlocks[t], numLayers, numBlocks, blockMajor) * tile +
                        (size_t)(positions[t] % blockSize) * kvDim;
      for (int e = 0; e < kvDim; ++e) {
        const size_t i = (size_t)t * rowStride + qDim + kv * kvDim + e;
        // K: the row's rotated k; V: v + bias, the row's v part staying as it was.
        const float want = kv == 0 ? qkvNew[i] : withBias ? qkv[i] + bf2f(bias[i % rowStride].x) : qkvNew[i];
        misplaced += poolNew[at + e].x != f2bf(want);
      }
    }
  // With a bias, the rows' v parts differ by design (add_bias wrote them, rope_kv2 leaves them): compared are
  // the q and k parts against the old path, and the v parts against the untouched input.
  size_t qkvDiff = 0, vTouched = 0;
  for (size_t i = 0; i < qkv.size(); ++i) {
    const bool vPart = (int)(i % rowStride) >= qDim + kvDim;
    if (withBias && vPart) vTouched += memcmp(&qkv[i], &qkvNew[i], sizeof(float)) != 0;
    else qkvDiff += memcmp(&qkvOld[i], &qkvNew[i], sizeof(float)) != 0;
  }
  const size_t rotated = differing(qkv, qkvNew), poolDiff = differing(poolOld, poolNew);
  const bool ok = qkvDiff == 0 && vTouched == 0 && poolDiff == 0 && misplaced == 0 &&
                  rotated > (size_t)ntok * (qDim + kvDim) / 2;
  printf("rope_kv2 head dim %d, heads %d / %d, %s%s: %d tokens; qkv floats differing %zu of %zu, pool values "
         "differing %zu of %zu, K / V slots not the bf16 of qkv %zu%s\n",
         D, H, KVH, blockMajor ? "block-major" : "layer-major", withBias ? ", bias" : "", ntok, qkvDiff + vTouched,
         qkv.size(), poolDiff, pool.size(), misplaced, ok ? "" : "  FAILED");
  return ok;
}

// tandem_llama_add_rmsnorm's block size in the engine (cuda_llama.cpp normThreads).
unsigned normThreads(int hidden) { return std::clamp((unsigned)((hidden / 4 + 31) / 32 * 32), 32u, 1024u); }

// bf16 places between two finite values (ordered as integers).
int bf16Places(uint16_t a, uint16_t b) {
  auto ordered = [](uint16_t v) { return v & 0x8000 ? -(int)(v & 0x7fff) : (int)v; };
  return abs(ordered(a) - ordered(b));
}

bool normCase(int hidden, int outRows, bool withDelta, bool withRows, unsigned seed) {
  using namespace std;
  mt19937 rng(seed);
  uniform_real_distribution<float> uniform(-2.f, 2.f);
  const int residualRows = withRows ? 3 * outRows : outRows;
  vector<float> x((size_t)residualRows * hidden), delta(x.size());
  for (auto& v : x) v = uniform(rng);
  for (auto& v : delta) v = uniform(rng);
  vector<__nv_bfloat16> w(hidden);
  for (auto& v : w) v = {f2bf(0.5f * uniform(rng) + 0.2f)};
  vector<int> rows(residualRows);
  for (int i = 0; i < residualRows; ++i) rows[i] = i;
  shuffle(rows.begin(), rows.end(), rng);
  rows.resize(outRows);
  vector<float> xOld = x, xNew = x;
  vector<__nv_bfloat16> outOld((size_t)outRows * hidden, {0x7fc0}), outNew = outOld;
  const float eps = 1e-5f;
  const float* d = withDelta ? delta.data() : nullptr;
  const int32_t* r = withRows ? rows.data() : nullptr;
  const unsigned threads = normThreads(hidden);
  launch(outRows, 1, threads, [&] { tandem_llama_add_rmsnorm(xOld.data(), d, w.data(), hidden, eps, r, outOld.data()); });
  launch(outRows, 1, threads, [&] { tandem_llama_add_rmsnorm2(xNew.data(), d, w.data(), hidden, eps, r, outNew.data()); });
  int worst = 0;
  size_t off = 0, nan = 0;
  for (size_t i = 0; i < outOld.size(); ++i) {
    const float a = bf2f(outOld[i].x), b = bf2f(outNew[i].x);
    if (std::isnan(a) || std::isnan(b)) { ++nan; continue; }
    const int places = bf16Places(outOld[i].x, outNew[i].x);
    worst = max(worst, places);
    off += places != 0;
  }
  const size_t xDiff = differing(xOld, xNew), added = differing(x, xNew);
  // delta is added to the output rows' residual rows (most of their values change), and no other.
  const size_t touched = (size_t)outRows * hidden;
  const bool ok = xDiff == 0 && nan == 0 && worst <= 1 && (withDelta ? added > touched / 2 && added <= touched : added == 0);
  printf("add_rmsnorm2 hidden %d, %d rows%s%s, %u threads: x floats differing %zu of %zu; out values differing %zu "
         "of %zu, most places off %d, NaN %zu%s\n",
         hidden, outRows, withDelta ? ", delta" : "", withRows ? ", rows" : "", threads, xDiff, x.size(), off,
         outOld.size(), worst, nan, ok ? "" : "  FAILED");
  return ok;
}

int main(int argc, char** argv) {
  bool quick = false;
  for (int i = 1; i < argc; ++i) quick |= std::string(argv[i]) == "--quick";
  bool ok = true;
  ok = ropeCase(128, 32, 8, 1, quick ? 64 : 300, 1) && ok;
  ok = ropeCase(64, 8, 1, 0, quick ? 64 : 300, 2) && ok;
  ok = ropeCase(16, 4, 4, 1, quick ? 64 : 300, 3) && ok;
  ok = ropeCase(20, 4, 2, 0, quick ? 32 : 200, 4) && ok;
  ok = ropeCase(128, 28, 4, 1, quick ? 32 : 300, 12, true) && ok;  // Qwen2 7B's heads, with its q / k / v bias
  ok = ropeCase(20, 4, 2, 0, quick ? 32 : 200, 13, true) && ok;    // the scalar path, with a bias
  if (!quick) {
    ok = ropeCase(128, 32, 8, 0, 300, 5) && ok;
    ok = ropeCase(64, 8, 1, 1, 300, 6) && ok;
    ok = ropeCase(16, 4, 4, 0, 300, 7) && ok;
    ok = ropeCase(128, 8, 1, 0, 300, 8) && ok;
    ok = ropeCase(64, 32, 8, 1, 300, 9) && ok;
    ok = ropeCase(16, 32, 8, 0, 300, 10) && ok;
    ok = ropeCase(12, 3, 3, 1, 200, 11) && ok;
  }
  ok = normCase(4096, quick ? 16 : 64, true, false, 21) && ok;
  ok = normCase(1030, quick ? 8 : 32, true, false, 22) && ok;
  ok = normCase(20480, 3, true, false, 23) && ok;
  ok = normCase(64, 16, true, true, 24) && ok;
  if (!quick) {
    ok = normCase(4096, 32, false, false, 25) && ok;
    ok = normCase(4096, 8, true, true, 26) && ok;
    ok = normCase(1030, 8, false, true, 27) && ok;
    ok = normCase(16, 8, true, false, 28) && ok;
  }
  printf(ok ? "ok\n" : "FAILED\n");
  return ok ? 0 : 1;
}
