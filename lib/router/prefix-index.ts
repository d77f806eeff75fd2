/**
 * The router's prefix index: which worker holds which KV block, by the block's chained hash (lib/kv/hash.ts).
 * Because a block hash names its whole prefix, "how many leading blocks of this request does worker w hold"
 * is a walk down the request's hash chain, dropping each worker at the first block it lacks.
 *
 * Layout, for the router's hot paths (a decision per request, an update per KV event):
 * - one open-addressing table (linear probing, backward-shift deletion, no tombstones) in one Uint32Array: a
 *   slot is the hash's two 32-bit lanes followed by a bitset of the workers holding the block (32 workers a
 *   word), so a lookup touches one cache line; no bigint, no object, no Map entry per block;
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
  /** Uint32s a slot: its two hash lanes, then its worker bitset (one cache line holds a slot and its probes). */
  private stride: number;
  private capacity: number;
  private shift: number;
  /** Slot i at `i * stride`: lo, hi, bitset words. Empty when its bitset is all zero (the invariant above). */
  private slots: Uint32Array;
  private size = 0;
  private blocksOf: Int32Array;
  /** Scratch of `overlaps`: the workers still matching. */
  private alive: Uint32Array;

  constructor(options: PrefixIndexOptions = {}) {
    this.words = Math.max(1, Math.ceil((options.maxWorkers ?? 64) / 32));
    this.stride = 2 + this.words;
    this.capacity = capacityFor(options.expectedBlocks ?? MIN_CAPACITY);
    this.shift = 32 - Math.log2(this.capacity);
    this.slots = new Uint32Array(this.capacity * this.stride);
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

  private occupied(base: number): boolean {
    const slots = this.slots;
    for (let k = base + 2, end = base + this.stride; k < end; k++) if (slots[k] !== 0) return true;
    return false;
  }

  /** The offset of hash (lo, hi)'s slot, or -1. */
  private find(lo: number, hi: number): number {
    const mask = this.capacity - 1;
    const slots = this.slots;
    const stride = this.stride;
    for (let i = this.home(lo, hi); ; i = (i + 1) & mask) {
      const base = i * stride;
      if (slots[base] === lo && slots[base + 1] === hi && this.occupied(base)) return base;
      if (!this.occupied(base)) return -1;
    }
  }

  /** Worker `w` holds block (lo, hi). */
  add(w: number, lo: number, hi: number): void {
    lo >>>= 0;
    hi >>>= 0;
    if (w >= this.words * 32) this.ensureWorkers(w + 1);
    const mask = this.capacity - 1;
    const stride = this.stride;
    let i = this.home(lo, hi);
    let base = i * stride;
    for (; this.occupied(base); i = (i + 1) & mask, base = i * stride)
      if (this.slots[base] === lo && this.slots[base + 1] === hi) break;
    if (!this.occupied(base)) {
      if ((this.size + 1) / this.capacity > MAX_LOAD) {
        this.rebuild(this.capacity * 2, this.words);
        return this.add(w, lo, hi);
      }
      this.slots[base] = lo;
      this.slots[base + 1] = hi;
      this.size++;
    }
    const at = base + 2 + (w >>> 5);
    const bit = 1 << (w & 31);
    if ((this.slots[at]! & bit) === 0) {
      this.slots[at]! |= bit;
      this.blocksOf[w]!++;
    }
  }

  /** Worker `w` no longer holds block (lo, hi) (a no-op when it did not). */
  remove(w: number, lo: number, hi: number): void {
    if (w >= this.words * 32) return;
    const base = this.find(lo >>> 0, hi >>> 0);
    if (base < 0) return;
    const at = base + 2 + (w >>> 5);
    const bit = 1 << (w & 31);
    if ((this.slots[at]! & bit) === 0) return;
    this.slots[at]! &= ~bit;
    this.blocksOf[w]!--;
    if (!this.occupied(base)) this.deleteSlot(base / this.stride);
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
    const keep = ~(1 << (w & 31));
    const at = 2 + (w >>> 5);
    for (let base = 0; base < this.slots.length; base += this.stride) this.slots[base + at]! &= keep;
    this.blocksOf[w] = 0;
    // Slots left without a worker are empty now, mid-run: a rebuild restores the probing invariant.
    this.rebuild(this.capacity, this.words);
  }

  /**
   * For a request's hash chain (`lanes`, `numBlocks` blocks), writes into `out[w]` the number of leading blocks
   * worker w holds, for every w below maxWorkers (0 for workers holding none). Returns the largest. One probe a
   * block, and exact whatever the holdings; the router asks `overlapsPrefixClosed`, which gives the same answer
   * in a few probes when holdings are prefix-closed (as the engine keeps them).
   */
  overlaps(lanes: Uint32Array, numBlocks: number, out: Int32Array | Uint32Array): number {
    const words = this.words;
    const slots = this.slots;
    const alive = this.alive;
    alive.fill(0xffffffff);
    out.fill(0, 0, Math.min(out.length, words * 32));
    let b = 0;
    for (; b < numBlocks; b++) {
      const slot = this.find(lanes[2 * b]!, lanes[2 * b + 1]!);
      if (slot < 0) break;
      let any = 0;
      for (let k = 0; k < words; k++) {
        const before = alive[k]!;
        const now = before & slots[slot + 2 + k]!;
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

  /**
   * `overlaps`' answer in O(changes * log numBlocks) probes instead of one probe a block, for holdings that are
   * prefix-closed: a worker that holds a chain's block b holds its blocks 0 .. b - 1 too. Then the holders of
   * block b shrink as b grows, so a run of blocks whose first and last have the same holders has those holders
   * throughout, and only runs whose ends differ need a probe in the middle (a bisection per holder that drops
   * out). A request of 128 blocks whose prefix a few workers hold takes ~9 probes instead of 128.
   *
   * The engine keeps its holdings prefix-closed: it frees a sequence's blocks whole, last block first, so a
   * block's cached descendants enter its LRU list before it and are evicted first; when two sequences computed
   * the same prompt side by side, the second one's duplicate blocks hold their cached twins until freed, so the
   * blocks it caches after them are evicted before the twins too (block-manager.ts;
   * test/router/router.prefix-closed.test.ts, test/engine/engine.block-manager.test.ts).
   */
  overlapsPrefixClosed(lanes: Uint32Array, numBlocks: number, out: Int32Array | Uint32Array): number {
    const words = this.words;
    out.fill(0, 0, Math.min(out.length, words * 32));
    if (numBlocks <= 0) return 0;
    const first = this.find(lanes[0]!, lanes[1]!);
    if (first < 0) return 0;
    const lastBlock = numBlocks - 1;
    const last = lastBlock === 0 ? first : this.find(lanes[2 * lastBlock]!, lanes[2 * lastBlock + 1]!);
    let longest = 0;
    if (last >= 0) {
      // Holders of the last block hold the whole chain.
      const slots = this.slots;
      for (let k = 0; k < words; k++)
        for (let left = slots[last + 2 + k]!; left !== 0; left &= left - 1)
          out[k * 32 + (31 - Math.clz32(left & -left))] = numBlocks;
      longest = numBlocks;
    }
    if (lastBlock > 0) longest = Math.max(longest, this.refine(lanes, 0, first, lastBlock, last, out));
    return longest;
  }

  /**
   * Between block `lo` (slot `loSlot`, held) and block `hi` (slot `hiSlot`, -1 when nobody holds it), credits
   * each worker that holds `lo` but not `hi` with its number of leading blocks; returns the largest such number.
   */
  private refine(
    lanes: Uint32Array,
    lo: number,
    loSlot: number,
    hi: number,
    hiSlot: number,
    out: Int32Array | Uint32Array,
  ): number {
    const slots = this.slots;
    const words = this.words;
    let same = true;
    for (let k = 0; k < words && same; k++) same = slots[loSlot + 2 + k] === (hiSlot < 0 ? 0 : slots[hiSlot + 2 + k]);
    if (same) return 0;
    if (hi === lo + 1) {
      for (let k = 0; k < words; k++)
        for (
          let left = slots[loSlot + 2 + k]! & ~(hiSlot < 0 ? 0 : slots[hiSlot + 2 + k]!);
          left !== 0;
          left &= left - 1
        )
          out[k * 32 + (31 - Math.clz32(left & -left))] = hi;
      return hi;
    }
    const mid = (lo + hi) >>> 1;
    const midSlot = this.find(lanes[2 * mid]!, lanes[2 * mid + 1]!);
    // Nobody holds block mid: nobody holds a block after it either.
    if (midSlot < 0) return this.refine(lanes, lo, loSlot, mid, -1, out);
    return Math.max(
      this.refine(lanes, lo, loSlot, mid, midSlot, out),
      this.refine(lanes, mid, midSlot, hi, hiSlot, out),
    );
  }

  /** Linear probing's backward-shift deletion: later entries of the probe run move up; no tombstones. */
  private deleteSlot(i: number): void {
    const mask = this.capacity - 1;
    const stride = this.stride;
    const slots = this.slots;
    let hole = i;
    for (let j = (hole + 1) & mask; this.occupied(j * stride); j = (j + 1) & mask) {
      const home = this.home(slots[j * stride]!, slots[j * stride + 1]!);
      // The entry at j may move to the hole when its home is not cyclically within (hole, j].
      const between = hole <= j ? home > hole && home <= j : home > hole || home <= j;
      if (between) continue;
      slots.copyWithin(hole * stride, j * stride, j * stride + stride);
      hole = j;
    }
    slots.fill(0, hole * stride, hole * stride + stride);
    this.size--;
  }

  /** Re-inserts every slot that still has a worker into a table of `capacity` slots and `words` words a slot. */
  private rebuild(capacity: number, words: number): void {
    const { slots: old, stride: oldStride, words: oldWords } = this;
    this.capacity = capacity;
    this.shift = 32 - Math.log2(capacity);
    this.words = words;
    this.stride = 2 + words;
    this.slots = new Uint32Array(capacity * this.stride);
    this.alive = new Uint32Array(words);
    if (this.blocksOf.length < words * 32) {
      const counts = new Int32Array(words * 32);
      counts.set(this.blocksOf);
      this.blocksOf = counts;
    }
    this.size = 0;
    const mask = capacity - 1;
    for (let s = 0; s < old.length; s += oldStride) {
      let any = 0;
      for (let k = 0; k < oldWords; k++) any |= old[s + 2 + k]!;
      if (any === 0) continue;
      const lo = old[s]!;
      const hi = old[s + 1]!;
      let i = this.home(lo, hi);
      while (this.occupied(i * this.stride)) i = (i + 1) & mask;
      const base = i * this.stride;
      this.slots[base] = lo;
      this.slots[base + 1] = hi;
      this.slots.set(old.subarray(s + 2, s + 2 + oldWords), base + 2);
      this.size++;
    }
  }
}

function capacityFor(blocks: number): number {
  let c = MIN_CAPACITY;
  while (blocks / c > MAX_LOAD) c *= 2;
  return c;
}
