/**
 * The router's prefix index: which worker holds which KV block, by the block's chained hash (lib/kv/hash.ts).
 * Because a block hash names its whole prefix, "how many leading blocks of this request does worker w hold"
 * is a walk down the request's hash chain, dropping each worker at the first block it lacks.
 *
 * Layout, for the router's hot paths (a decision per request, an update per KV event):
 * - one open-addressing table (linear probing, backward-shift deletion, no tombstones) keyed by the hash's two
 *   32-bit lanes in a Uint32Array: no bigint, no object, no Map entry per block;
 * - per table slot, a bitset of the workers holding that block (`words` Uint32 per slot, 32 workers a word);
 * - per worker, its block count.
 * A worker's removal (gone, restarted) clears its bit in every slot and rebuilds the table once: O(capacity),
 * which is rare next to events and decisions.
 *
 * Invariant: a slot is occupied if and only if at least one worker's bit is set in it.
 */

/** Keep the table at most this full: linear probing stays short. */
const MAX_LOAD = 0.5;
const MIN_CAPACITY = 1024;
/** Fibonacci hashing's multiplier (2^32 / golden ratio). */
const GOLDEN = 0x9e3779b1;

export interface PrefixIndexOptions {
  /** Worker ids the index takes, 0 .. maxWorkers - 1; grows on demand (a rebuild). Default 64. */
  maxWorkers?: number;
  /** Blocks to size the table for at first. Default 1024. */
  expectedBlocks?: number;
}

export class KvPrefixIndex {
  private words: number;
  private capacity: number;
  private shift: number;
  private keys: Uint32Array;
  private occupied: Uint8Array;
  private bits: Uint32Array;
  private size = 0;
  private blocksOf: Int32Array;
  /** Scratch of `overlaps`: the workers still matching. */
  private alive: Uint32Array;

  constructor(options: PrefixIndexOptions = {}) {
    this.words = Math.max(1, Math.ceil((options.maxWorkers ?? 64) / 32));
    this.capacity = capacityFor(options.expectedBlocks ?? MIN_CAPACITY);
    this.shift = 32 - Math.log2(this.capacity);
    this.keys = new Uint32Array(2 * this.capacity);
    this.occupied = new Uint8Array(this.capacity);
    this.bits = new Uint32Array(this.capacity * this.words);
    this.blocksOf = new Int32Array(this.words * 32);
    this.alive = new Uint32Array(this.words);
  }

  /** Worker ids the index takes now (a multiple of 32). */
  get maxWorkers(): number {
    return this.words * 32;
  }

  /** Distinct block hashes held by any worker. */
  get blocks(): number {
    return this.size;
  }

  /** Blocks worker `w` holds. */
  blocksOfWorker(w: number): number {
    return w < this.blocksOf.length ? this.blocksOf[w]! : 0;
  }

  /** Makes room for worker ids below `n` (rebuilds the table when the bitsets must widen). */
  ensureWorkers(n: number): void {
    const words = Math.ceil(n / 32);
    if (words <= this.words) return;
    this.rebuild(this.capacity, words);
  }

  private home(lo: number, hi: number): number {
    return Math.imul(lo ^ Math.imul(hi, 0x85ebca6b), GOLDEN) >>> this.shift;
  }

  /** The slot of hash (lo, hi), or -1. */
  private find(lo: number, hi: number): number {
    const mask = this.capacity - 1;
    const keys = this.keys;
    for (let i = this.home(lo, hi); this.occupied[i]; i = (i + 1) & mask)
      if (keys[2 * i] === lo && keys[2 * i + 1] === hi) return i;
    return -1;
  }

  /** Worker `w` holds block (lo, hi). */
  add(w: number, lo: number, hi: number): void {
    lo >>>= 0;
    hi >>>= 0;
    if (w >= this.words * 32) this.ensureWorkers(w + 1);
    const mask = this.capacity - 1;
    let i = this.home(lo, hi);
    for (; this.occupied[i]; i = (i + 1) & mask) if (this.keys[2 * i] === lo && this.keys[2 * i + 1] === hi) break;
    if (!this.occupied[i]) {
      if ((this.size + 1) / this.capacity > MAX_LOAD) {
        this.rebuild(this.capacity * 2, this.words);
        return this.add(w, lo, hi);
      }
      this.occupied[i] = 1;
      this.keys[2 * i] = lo;
      this.keys[2 * i + 1] = hi;
      this.size++;
    }
    const at = i * this.words + (w >>> 5);
    const bit = 1 << (w & 31);
    if ((this.bits[at]! & bit) === 0) {
      this.bits[at]! |= bit;
      this.blocksOf[w]!++;
    }
  }

  /** Worker `w` no longer holds block (lo, hi) (a no-op when it did not). */
  remove(w: number, lo: number, hi: number): void {
    if (w >= this.words * 32) return;
    const i = this.find(lo >>> 0, hi >>> 0);
    if (i < 0) return;
    const base = i * this.words;
    const bit = 1 << (w & 31);
    if ((this.bits[base + (w >>> 5)]! & bit) === 0) return;
    this.bits[base + (w >>> 5)]! &= ~bit;
    this.blocksOf[w]!--;
    for (let k = 0; k < this.words; k++) if (this.bits[base + k] !== 0) return;
    this.deleteSlot(i);
  }

  /** Applies a run of block hashes as lanes (`lanes[2k]` low, `lanes[2k + 1]` high) stored or removed by `w`. */
  apply(w: number, stored: boolean, lanes: Uint32Array, from = 0, count = lanes.length / 2 - from): void {
    const end = 2 * (from + count);
    if (stored) for (let k = 2 * from; k < end; k += 2) this.add(w, lanes[k]!, lanes[k + 1]!);
    else for (let k = 2 * from; k < end; k += 2) this.remove(w, lanes[k]!, lanes[k + 1]!);
  }

  /** Forgets every block of worker `w` (it is gone, or restarted with an empty cache). */
  dropWorker(w: number): void {
    if (w >= this.words * 32 || this.blocksOf[w] === 0) return;
    const word = w >>> 5;
    const keep = ~(1 << (w & 31));
    for (let i = 0; i < this.capacity; i++) if (this.occupied[i]) this.bits[i * this.words + word]! &= keep;
    this.blocksOf[w] = 0;
    this.rebuild(this.capacity, this.words);
  }

  /**
   * For a request's hash chain (`lanes`, `numBlocks` blocks), writes into `out[w]` the number of leading blocks
   * worker w holds, for every w below maxWorkers (0 for workers holding none). Returns the largest.
   */
  overlaps(lanes: Uint32Array, numBlocks: number, out: Int32Array | Uint32Array): number {
    const words = this.words;
    const alive = this.alive;
    alive.fill(0xffffffff);
    out.fill(0, 0, Math.min(out.length, words * 32));
    let b = 0;
    for (; b < numBlocks; b++) {
      const slot = this.find(lanes[2 * b]!, lanes[2 * b + 1]!);
      if (slot < 0) break;
      const base = slot * words;
      let any = 0;
      for (let k = 0; k < words; k++) {
        const before = alive[k]!;
        const now = before & this.bits[base + k]!;
        alive[k] = now;
        any |= now;
        // Workers that lack block b hold exactly b leading blocks.
        for (let dropped = before & ~now; dropped !== 0; dropped &= dropped - 1)
          out[k * 32 + (31 - Math.clz32(dropped & -dropped))] = b;
      }
      if (any === 0) return b;
    }
    for (let k = 0; k < words; k++)
      for (let left = alive[k]!; left !== 0; left &= left - 1) out[k * 32 + (31 - Math.clz32(left & -left))] = b;
    return b;
  }

  /** Linear probing's backward-shift deletion: later entries of the probe run move up; no tombstones. */
  private deleteSlot(i: number): void {
    const mask = this.capacity - 1;
    const words = this.words;
    let hole = i;
    for (let j = (hole + 1) & mask; this.occupied[j]; j = (j + 1) & mask) {
      const home = this.home(this.keys[2 * j]!, this.keys[2 * j + 1]!);
      // The entry at j may move to the hole when its home is not cyclically within (hole, j].
      const between = hole <= j ? home > hole && home <= j : home > hole || home <= j;
      if (between) continue;
      this.keys[2 * hole] = this.keys[2 * j]!;
      this.keys[2 * hole + 1] = this.keys[2 * j + 1]!;
      this.bits.copyWithin(hole * words, j * words, j * words + words);
      hole = j;
    }
    this.occupied[hole] = 0;
    this.bits.fill(0, hole * words, hole * words + words);
    this.size--;
  }

  /** Re-inserts every slot that still has a worker into a table of `capacity` slots and `words` words a slot. */
  private rebuild(capacity: number, words: number): void {
    const { keys, occupied, bits, words: oldWords, capacity: oldCapacity } = this;
    this.capacity = capacity;
    this.shift = 32 - Math.log2(capacity);
    this.words = words;
    this.keys = new Uint32Array(2 * capacity);
    this.occupied = new Uint8Array(capacity);
    this.bits = new Uint32Array(capacity * words);
    this.alive = new Uint32Array(words);
    if (this.blocksOf.length < words * 32) {
      const counts = new Int32Array(words * 32);
      counts.set(this.blocksOf);
      this.blocksOf = counts;
    }
    this.size = 0;
    const mask = capacity - 1;
    for (let s = 0; s < oldCapacity; s++) {
      if (!occupied[s]) continue;
      let any = 0;
      for (let k = 0; k < oldWords; k++) any |= bits[s * oldWords + k]!;
      if (any === 0) continue;
      const lo = keys[2 * s]!;
      const hi = keys[2 * s + 1]!;
      let i = this.home(lo, hi);
      while (this.occupied[i]) i = (i + 1) & mask;
      this.occupied[i] = 1;
      this.keys[2 * i] = lo;
      this.keys[2 * i + 1] = hi;
      this.bits.set(bits.subarray(s * oldWords, s * oldWords + oldWords), i * words);
      this.size++;
    }
  }
}

function capacityFor(blocks: number): number {
  let c = MIN_CAPACITY;
  while (blocks / c > MAX_LOAD) c *= 2;
  return c;
}
