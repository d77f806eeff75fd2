// Many-piece copies in one launch: the gather/scatter engine behind cuda-ipc transfers with many small
// pieces (one cudaMemcpy per piece costs microseconds of launch each; this costs one launch).
//
// The host splits every piece into chunks of at most kChunkBytes and uploads the chunk table once per
// prepared transfer. Blocks stride over chunks; threads move 16-byte vectors, four in flight each.
#include <cstdint>

struct TandemCopyChunk {
  unsigned long long src;
  unsigned long long dst;
  unsigned long long bytes;
};

extern "C" __global__ void __launch_bounds__(512) tandem_copy_chunks(const TandemCopyChunk* __restrict__ chunks, unsigned int count) {
  for (unsigned int c = blockIdx.x; c < count; c += gridDim.x) {
    const TandemCopyChunk k = chunks[c];
    if (((k.src | k.dst | k.bytes) & 15ull) == 0) {
      const uint4* __restrict__ s = reinterpret_cast<const uint4*>(k.src);
      uint4* __restrict__ d = reinterpret_cast<uint4*>(k.dst);
      const unsigned long long n = k.bytes >> 4;
      unsigned long long i = threadIdx.x;
      const unsigned long long step = blockDim.x;
      for (; i + 3 * step < n; i += 4 * step) {
        uint4 a = s[i], b = s[i + step], e = s[i + 2 * step], f = s[i + 3 * step];
        d[i] = a;
        d[i + step] = b;
        d[i + 2 * step] = e;
        d[i + 3 * step] = f;
      }
      for (; i < n; i += step) d[i] = s[i];
    } else {
      const unsigned char* s = reinterpret_cast<const unsigned char*>(k.src);
      unsigned char* d = reinterpret_cast<unsigned char*>(k.dst);
      for (unsigned long long i = threadIdx.x; i < k.bytes; i += blockDim.x) d[i] = s[i];
    }
  }
}
