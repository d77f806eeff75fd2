/**
 * Block hashing, the one definition shared by the engine's prefix cache and the router's prefix index: a full
 * block of `blockSize` tokens is named by a 64-bit hash chained over the sequence,
 *
 *   hash(block 0) = kvBlockHash(null, tokens of block 0)
 *   hash(block i) = kvBlockHash(hash(block i-1), tokens of block i)
 *
 * so equal prefixes have equal hashes, and one hash names a whole prefix. Two murmur3-style 32-bit lanes feed
 * each other; the 64-bit value is `hi << 32 | lo`. The engine keys its cache by the bigint (`kvBlockHash`,
 * `kvBlockHashes`); the router works on the two lanes in a Uint32Array (`kvBlockHashLanes`), which is what a
 * BigUint64Array of hashes is on a little-endian machine, so KV events are indexed without a bigint each.
 */

const C1 = 0xcc9e2d51;
const C2 = 0x1b873593;
const C3 = 0x85ebca6b;
const C4 = 0xc2b2ae35;
/** Lanes of a sequence's first block start from these (a parent that does not exist). */
const ROOT_LO = 0x2545f491;
const ROOT_HI = 0x9e3779b9 | 0;

function fmix32(h: number): number {
  h ^= h >>> 16;
  h = Math.imul(h, C3);
  h ^= h >>> 13;
  h = Math.imul(h, C4);
  h ^= h >>> 16;
  return h >>> 0;
}

/** The lanes of the last hash `hashLanes` computed (module scratch: no allocation per block). */
let outLo = 0;
let outHi = 0;

/** Hash of `tokens[start .. start + count)` chained on the parent's lanes; the result in outLo / outHi. */
function hashLanes(parentLo: number, parentHi: number, tokens: ArrayLike<number>, start: number, count: number) {
  let h1 = parentLo | 0;
  let h2 = parentHi | 0;
  for (let i = 0; i < count; i++) {
    const t = tokens[start + i]! | 0;
    let k1 = Math.imul(t, C1);
    k1 = (k1 << 15) | (k1 >>> 17);
    k1 = Math.imul(k1, C2);
    h1 ^= k1;
    h1 = (h1 << 13) | (h1 >>> 19);
    h1 = (Math.imul(h1, 5) + 0xe6546b64) | 0;
    let k2 = Math.imul(t ^ 0x5bd1e995, C3);
    k2 = (k2 << 17) | (k2 >>> 15);
    k2 = Math.imul(k2, C4);
    h2 ^= k2 ^ h1;
    h2 = (h2 << 11) | (h2 >>> 21);
    h2 = (Math.imul(h2, 9) + 0x38b34ae5) | 0;
  }
  h1 ^= count;
  h2 ^= count;
  h1 = (h1 + h2) | 0;
  h2 = (h2 + h1) | 0;
  h1 = fmix32(h1);
  h2 = fmix32(h2);
  h1 = (h1 + h2) | 0;
  h2 = (h2 + h1) | 0;
  outLo = h1 >>> 0;
  outHi = h2 >>> 0;
}

/**
 * Hash of one block of tokens chained on its parent's hash (null for a sequence's first block).
 * `tokens[start .. start + count)` are the block's ids.
 */
export function kvBlockHash(parent: bigint | null, tokens: ArrayLike<number>, start: number, count: number): bigint {
  if (parent === null) hashLanes(ROOT_LO, ROOT_HI, tokens, start, count);
  else hashLanes(Number(parent & 0xffffffffn), Number(parent >> 32n), tokens, start, count);
  return (BigInt(outHi) << 32n) | BigInt(outLo);
}

/** The chained hashes of the first `numBlocks` full blocks of `tokens`, continuing `into` (already hashed ones are kept). */
export function kvBlockHashes(
  tokens: ArrayLike<number>,
  blockSize: number,
  numBlocks = Math.floor(tokens.length / blockSize),
  into: bigint[] = [],
): bigint[] {
  for (let b = into.length; b < numBlocks; b++)
    into.push(kvBlockHash(b === 0 ? null : into[b - 1]!, tokens, b * blockSize, blockSize));
  return into;
}

/**
 * The same chained hashes as `kvBlockHashes`, as lanes: `out[2b]` is the low and `out[2b + 1]` the high 32 bits
 * of block b's hash (the layout of a BigUint64Array's buffer on a little-endian machine). `out` is reused when
 * it is large enough. Returns the lanes of the first `numBlocks` full blocks.
 */
export function kvBlockHashLanes(
  tokens: ArrayLike<number>,
  blockSize: number,
  numBlocks = Math.floor(tokens.length / blockSize),
  out?: Uint32Array,
): Uint32Array {
  const lanes = out && out.length >= 2 * numBlocks ? out : new Uint32Array(2 * numBlocks);
  let lo = ROOT_LO;
  let hi = ROOT_HI;
  for (let b = 0; b < numBlocks; b++) {
    hashLanes(lo, hi, tokens, b * blockSize, blockSize);
    lo = lanes[2 * b] = outLo;
    hi = lanes[2 * b + 1] = outHi;
  }
  return lanes.length === 2 * numBlocks ? lanes : lanes.subarray(0, 2 * numBlocks);
}

/** The lanes of hashes (a view, no copy): the layout kvBlockHashLanes writes. */
export function hashLanesOf(hashes: BigUint64Array): Uint32Array {
  return new Uint32Array(hashes.buffer, hashes.byteOffset, hashes.length * 2);
}
