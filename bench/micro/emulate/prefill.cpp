// The flash prefill kernels of native/kernels/attention.cu (flashPrefill2 with 8 warps, flashPrefill3), run on the
// CPU through warp.h against a float64 reference: paged K / V in a shuffled block table, a chunk behind cached
// tokens, several tiles, lengths that are not multiples of 64, GQA, sliding windows, both pool layouts, and the
// kernel's dynamic shared memory at an address that is not 1 KiB-aligned. run.mjs extracts the kernels' source
// into kernels.inc and builds this; exit 1 when any case's error is above 2e-2 of the output's scale (a wrong
// fragment layout gives errors of order 1; bf16 K, V, Q and P give a few 1e-3).
//   node bench/micro/emulate/run.mjs [prefill2|prefill3] [--quick]
#include "warp.h"

#include "kernels.inc"

#include <random>
#include <string>

struct Shape {
  int numHeads, numKvHeads, window, blockMajor;
};

template <int D, int kKernel>
bool run(const Shape& shape, unsigned seed) {
  using namespace std;
  const int numHeads = shape.numHeads, numKvHeads = shape.numKvHeads, window = shape.window;
  const int numLayers = 2, layer = 1, blockSize = 16, numBlocks = 64, mb = 24;
  const int kvDim = numKvHeads * D, qDim = numHeads * D, rowStride = qDim + 2 * kvDim;
  const int rowsPerTile = kKernel == 3 ? kRows3 : kRows2;
  const int threads = kKernel == 3 ? kThreads3 : kThreads2;
  const int smemBytes = kKernel == 3 ? prefill3SmemBytes(D) : prefill2SmemBytes(D);
  // (cached tokens, new tokens) per sequence.
  const vector<pair<int, int>> seqs = {{100, 200}, {0, 77}, {37, 64}};
  mt19937 rng(seed);
  uniform_real_distribution<float> uniform(-1.f, 1.f);
  vector<int> blockTables(seqs.size() * mb, -1), blocks(numBlocks);
  for (int i = 0; i < numBlocks; ++i) blocks[i] = i;
  shuffle(blocks.begin(), blocks.end(), rng);
  int used = 0;
  for (size_t s = 0; s < seqs.size(); ++s)
    for (int b = 0; b < (seqs[s].first + seqs[s].second + blockSize - 1) / blockSize; ++b)
      blockTables[s * mb + b] = blocks[used++];
  vector<uint16_t> pool((size_t)numLayers * 2 * numBlocks * blockSize * kvDim);
  for (auto& v : pool) v = f2bf(uniform(rng));
  vector<int> positions, tiles, tokenSeq;
  for (size_t s = 0; s < seqs.size(); ++s) {
    const int start = positions.size();
    for (int i = 0; i < seqs[s].second; ++i) {
      positions.push_back(seqs[s].first + i);
      tokenSeq.push_back(s);
    }
    for (int a = 0; a < seqs[s].second; a += rowsPerTile) {
      tiles.push_back(start + a);
      tiles.push_back(min(rowsPerTile, seqs[s].second - a));
      tiles.push_back(s);
    }
  }
  const int ntok = positions.size(), ntiles = tiles.size() / 3;
  vector<float> qkv((size_t)ntok * rowStride);
  for (auto& v : qkv) v = 2.f * uniform(rng);
  vector<__nv_bfloat16> out((size_t)ntok * qDim, {0x7fc0});  // NaN: unwritten outputs show
  const float scale = 1.f / sqrtf((float)D);

  // Grid (heads, tiles), one CTA at a time. Dynamic shared memory 16 bytes past a 1 KiB boundary (past 512 bytes of
  // static shared memory, as the compiler may place it); every byte NaN before the CTA starts.
  gridDim = {(unsigned)numHeads, (unsigned)ntiles, 1};
  const int offset = 528;
  vector<unsigned char> shared(offset + smemBytes);
  for (int by = 0; by < ntiles; ++by)
    for (int bx = 0; bx < numHeads; ++bx) {
      Cta cta(threads);
      memset(shared.data(), 0xff, shared.size());
      cta.window = shared.data();
      cta.smem = shared.data() + offset;
      vector<thread> ts;
      for (int t = 0; t < threads; ++t)
        ts.emplace_back([&, t] {
          threadIdx = {(unsigned)t, 0, 0};
          blockIdx = {(unsigned)bx, (unsigned)by, 0};
          emuCtaPtr = &cta;
          const bf16* kv = reinterpret_cast<const bf16*>(pool.data());
          if constexpr (kKernel == 3)
            flashPrefill3<D>(qkv.data(), positions.data(), tiles.data(), blockTables.data(), mb, kv, layer, numLayers,
                             numBlocks, blockSize, shape.blockMajor, numHeads, numKvHeads, window, scale, out.data());
          else
            flashPrefill2<D, kWarps2>(qkv.data(), positions.data(), tiles.data(), blockTables.data(), mb, kv, layer,
                                      numLayers, numBlocks, blockSize, shape.blockMajor, numHeads, numKvHeads, window,
                                      scale, out.data());
        });
      for (auto& t : ts) t.join();
    }

  // Reference: float64, fp32 queries, bf16 K and V from the pool.
  double worst = 0;
  const int group = numHeads / numKvHeads;
  for (int t = 0; t < ntok; ++t) {
    const int p = positions[t], s = tokenSeq[t], lo = window > 0 ? max(0, p - window + 1) : 0;
    for (int h = 0; h < numHeads; ++h) {
      auto row = [&](int kv, int j) {
        const int block = blockTables[s * mb + j / blockSize];
        return &pool[kvTile(layer, kv, block, numLayers, numBlocks, shape.blockMajor) * blockSize * kvDim +
                     (size_t)(j % blockSize) * kvDim + (size_t)(h / group) * D];
      };
      vector<double> w;
      double mx = -1e300, sum = 0;
      for (int j = lo; j <= p; ++j) {
        double d = 0;
        for (int i = 0; i < D; ++i) d += (double)qkv[(size_t)t * rowStride + h * D + i] * bf2f(row(0, j)[i]);
        w.push_back(d * scale);
        mx = max(mx, d * scale);
      }
      for (auto& v : w) sum += v = exp(v - mx);
      double err = 0, norm = 0;
      for (int i = 0; i < D; ++i) {
        double o = 0;
        for (int j = lo; j <= p; ++j) o += w[j - lo] * bf2f(row(1, j)[i]);
        o /= sum;
        const double got = bf2f(out[(size_t)t * qDim + h * D + i].x);
        err = fabs(got - o) <= 1e30 ? max(err, fabs(got - o)) : INFINITY;  // NaN: unwritten or poisoned
        norm = max(norm, fabs(o));
      }
      worst = max(worst, err / max(norm, 1e-3));
    }
  }
  const bool ok = worst < 2e-2;
  printf("prefill%d head dim %d, heads %d / %d, window %d, %s: %d tokens, %d tiles; worst error / max |out| %.2e%s\n",
         kKernel, D, numHeads, numKvHeads, window, shape.blockMajor ? "block-major" : "layer-major", ntok, ntiles,
         worst, ok ? "" : "  FAILED");
  return ok;
}

template <int kKernel>
bool runAll(bool quick) {
  bool ok = run<128, kKernel>({4, 1, 0, 0}, 1);
  ok = run<64, kKernel>({8, 1, 100, 0}, 4) && ok;
  if (quick) return ok;
  ok = run<64, kKernel>({4, 2, 0, 1}, 2) && ok;
  ok = run<128, kKernel>({2, 1, 50, 1}, 3) && ok;
  return ok;
}

int main(int argc, char** argv) {
  std::string kernel = "prefill3";
  bool quick = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--quick") quick = true;
    else kernel = a;
  }
  const bool ok = kernel == "prefill2" ? runAll<2>(quick) : runAll<3>(quick);
  printf(ok ? "ok\n" : "FAILED\n");
  return ok ? 0 : 1;
}
