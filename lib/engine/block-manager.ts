/**
 * The engine's KV block pool bookkeeping: which of the runner's `numBlocks` blocks are free, in use (with a
 * reference count), or cached (unreferenced but still holding a full block of a known token prefix).
 *
 * Prefix caching: a full block is named by a 64-bit hash chained over the sequence (lib/kv/hash.ts, the same
 * hashes a KV-aware router computes), `hash(block i) = kvBlockHash(hash(block i-1), tokens of block i)`, so equal
 * prefixes have equal hashes. A block
 * committed under its hash can be shared by any later sequence with the same prefix (a cache hit). Hashes only
 * find blocks: a hit at block i needs the cached block's stored tokens to equal the sequence's, and its parent to
 * be the very block matched at i-1 (same id, not evicted since), so by induction from block 0 its whole prefix
 * equals the sequence's. A hash collision (which repeats down the chain wherever tokens agree) costs a miss,
 * never another prompt's KV.
 *
 * Invariants:
 * - a block with refCount > 0 is in use and is never handed out by `allocate`;
 * - a block with refCount 0 is either free (no hash) or cached (hash, in the LRU list, evictable);
 * - a cached block's KV is immutable: sequences only ever write into blocks they allocated, past their
 *   last full shared block;
 * - a cached block's parent is cached, or was evicted since (its generation moved on), or it is a first block.
 *
 * Events: `stored` when full blocks are committed under new hashes, `removed` when cached blocks are evicted
 * (a KV-aware router keeps its prefix index from these). Releasing a block does not remove it from the cache.
 */
import { BadArgumentError } from '../errors.js';

/** Full blocks were committed to the prefix cache; `hashes[i]` names `blockIds[i]`, chained from `parentHash`. */
export interface KvBlocksStoredEvent {
  type: 'stored';
  /** Hash of the block before `blockIds[0]` in its sequence; null when `blockIds[0]` is the sequence's first. */
  parentHash: bigint | null;
  blockIds: Int32Array;
  hashes: BigUint64Array;
  /** Tokens per block (the token ids of block i are `tokenIds[i * blockSize .. (i + 1) * blockSize)`). */
  blockSize: number;
  tokenIds: Int32Array;
}

/** Cached blocks were evicted; their hashes no longer name any block of this pool. */
export interface KvBlocksRemovedEvent {
  type: 'removed';
  blockIds: Int32Array;
  hashes: BigUint64Array;
}

export type KvEvent = KvBlocksStoredEvent | KvBlocksRemovedEvent;

/** `parentBlock` of a sequence's first block. */
const NO_PARENT = -1;
/** A block whose prefix no cached block is known to hold. */
const UNKNOWN = -2;

export interface KvBlockManagerOptions {
  numBlocks: number;
  blockSize: number;
  /** Keep full blocks for reuse by later sequences with the same prefix. Default true. */
  enablePrefixCaching?: boolean;
  /** Receives every stored/removed event synchronously, as it happens. */
  onEvent?: (event: KvEvent) => void;
}

export class KvBlockManager {
  readonly numBlocks: number;
  readonly blockSize: number;
  readonly enablePrefixCaching: boolean;
  private readonly onEvent: ((event: KvEvent) => void) | undefined;

  private readonly refCounts: Int32Array;
  /** Free blocks without a hash, used as a stack. */
  private readonly freeStack: Int32Array;
  private freeTop = 0;
  /** Cached, unreferenced blocks in LRU order (head evicted first); a doubly linked list over block ids. */
  private readonly lruPrev: Int32Array;
  private readonly lruNext: Int32Array;
  private lruHead = -1;
  private lruTail = -1;
  private lruCount = 0;
  /** Per block: its hash when cached (committed), else undefined. */
  private readonly hashOfBlock: (bigint | undefined)[];
  /** Per cached block: the cached block holding its parent prefix (NO_PARENT: none) and that one's generation. */
  private readonly parentBlock: Int32Array;
  private readonly parentGeneration: Int32Array;
  /** Per block: how many times it has been evicted; a child that recorded an older one is not its child. */
  private readonly generation: Int32Array;
  /**
   * Per block in use that was committed while another block was cached with the same prefix: that block (its
   * twin) and its generation (-1: none). The blocks after it extend the cached chain from there. The duplicate
   * holds a reference on its twin until it is freed, so the twin outlives every block cached after the duplicate:
   * released tail first, the cache stays prefix-closed (a cached block's parent is cached), which a KV-aware
   * router's prefix index relies on.
   */
  private readonly sameAs: Int32Array;
  private readonly sameAsGeneration: Int32Array;
  /** Token ids of every committed block, to verify cache hits. */
  private readonly blockTokens: Int32Array;
  private readonly cache = new Map<bigint, number>();

  /** Counters since construction. */
  hitBlocks = 0;
  queriedBlocks = 0;
  evictedBlocks = 0;

  constructor(options: KvBlockManagerOptions) {
    const { numBlocks, blockSize } = options;
    if (!Number.isSafeInteger(numBlocks) || numBlocks < 1)
      throw new BadArgumentError(`KvBlockManager: numBlocks must be a positive integer (got ${numBlocks})`);
    if (!Number.isSafeInteger(blockSize) || blockSize < 1)
      throw new BadArgumentError(`KvBlockManager: blockSize must be a positive integer (got ${blockSize})`);
    this.numBlocks = numBlocks;
    this.blockSize = blockSize;
    this.enablePrefixCaching = options.enablePrefixCaching ?? true;
    this.onEvent = options.onEvent;
    this.refCounts = new Int32Array(numBlocks);
    this.freeStack = new Int32Array(numBlocks);
    // Lowest ids come out first.
    for (let i = 0; i < numBlocks; i++) this.freeStack[i] = numBlocks - 1 - i;
    this.freeTop = numBlocks;
    this.lruPrev = new Int32Array(numBlocks).fill(-1);
    this.lruNext = new Int32Array(numBlocks).fill(-1);
    this.hashOfBlock = new Array<bigint | undefined>(numBlocks).fill(undefined);
    this.parentBlock = new Int32Array(numBlocks).fill(NO_PARENT);
    this.parentGeneration = new Int32Array(numBlocks);
    this.generation = new Int32Array(numBlocks);
    this.sameAs = new Int32Array(numBlocks).fill(-1);
    this.sameAsGeneration = new Int32Array(numBlocks);
    this.blockTokens = new Int32Array(this.enablePrefixCaching ? numBlocks * blockSize : 0);
  }

  /** Blocks `allocate` can hand out now: free plus cached-but-unreferenced. */
  get numAllocatable(): number {
    return this.freeTop + this.lruCount;
  }

  /** Blocks referenced by at least one owner. */
  get numUsed(): number {
    return this.numBlocks - this.freeTop - this.lruCount;
  }

  /** Blocks holding a committed prefix (referenced or not). */
  get numCached(): number {
    return this.cache.size;
  }

  refCount(blockId: number): number {
    return this.refCounts[blockId]!;
  }

  /** The hash a block is cached under, or undefined. */
  hashOf(blockId: number): bigint | undefined {
    return this.hashOfBlock[blockId];
  }

  /**
   * `n` blocks with reference count 1, or null (nothing taken) when fewer than `n` are allocatable.
   * Never-cached free blocks go first, then the least recently released cached blocks are evicted.
   */
  allocate(n: number): Int32Array | null {
    if (n > this.numAllocatable) return null;
    const out = new Int32Array(n);
    let evicted: number[] | undefined;
    for (let i = 0; i < n; i++) {
      let id: number;
      if (this.freeTop > 0) id = this.freeStack[--this.freeTop]!;
      else {
        id = this.lruHead;
        this.lruRemove(id);
        (evicted ??= []).push(id);
      }
      this.refCounts[id] = 1;
      this.sameAs[id] = -1;
      out[i] = id;
    }
    if (evicted) this.evict(evicted);
    return out;
  }

  /**
   * Takes specific blocks (all of them or none) when each is free or cached-unreferenced; a cached one is
   * evicted first. Throws BadArgumentError naming the first block in use, out of range or repeated.
   */
  allocateSpecific(blockIds: ArrayLike<number>): void {
    const seen = new Set<number>();
    for (let i = 0; i < blockIds.length; i++) {
      const id = blockIds[i]!;
      if (!Number.isSafeInteger(id) || id < 0 || id >= this.numBlocks)
        throw new BadArgumentError(`block id ${id} is out of range (0..${this.numBlocks - 1})`);
      if (seen.has(id)) throw new BadArgumentError(`block id ${id} is listed twice`);
      seen.add(id);
      if (this.refCounts[id]! > 0) throw new BadArgumentError(`block ${id} is in use`);
    }
    const evicted: number[] = [];
    for (const id of seen) {
      if (this.hashOfBlock[id] !== undefined) {
        this.lruRemove(id);
        evicted.push(id);
      } else this.removeFromFreeStack(id);
      this.refCounts[id] = 1;
      this.sameAs[id] = -1;
    }
    if (evicted.length > 0) this.evict(evicted);
  }

  /** Adds a reference to blocks already in use (a second owner). */
  ref(blockIds: ArrayLike<number>): void {
    for (let i = 0; i < blockIds.length; i++) {
      const id = blockIds[i]!;
      if (this.refCounts[id]! <= 0) throw new BadArgumentError(`block ${id} is not in use`);
    }
    for (let i = 0; i < blockIds.length; i++) this.refCounts[blockIds[i]!]!++;
  }

  /**
   * Drops one reference from each block, last block first, so that a sequence's tail blocks are evicted before
   * its head (heads are the more shared prefixes). Unreferenced cached blocks stay cached until evicted. A block
   * may be listed as often as it is referenced; listed more often, it would go to the free list twice and be
   * handed out twice, so that throws (and nothing is freed).
   */
  free(blockIds: ArrayLike<number>): void {
    const listed = blockIds.length > 1 ? new Map<number, number>() : undefined;
    for (let i = 0; i < blockIds.length; i++) {
      const id = blockIds[i]!;
      if (!Number.isSafeInteger(id) || id < 0 || id >= this.numBlocks)
        throw new BadArgumentError(`block id ${id} is out of range (0..${this.numBlocks - 1})`);
      const refs = this.refCounts[id]!;
      if (refs <= 0) throw new BadArgumentError(`block ${id} is not in use`);
      if (listed) {
        const times = (listed.get(id) ?? 0) + 1;
        if (times > refs)
          throw new BadArgumentError(
            `block ${id} is listed ${times} times but has ${refs} reference${refs > 1 ? 's' : ''}`,
          );
        listed.set(id, times);
      }
    }
    for (let i = blockIds.length - 1; i >= 0; i--) this.release(blockIds[i]!);
  }

  /** Drops one reference from a block; unreferenced, it goes to the LRU list (cached) or the free stack, and a
   * duplicate lets go of its twin right after it. */
  private release(id: number): void {
    if (--this.refCounts[id]! > 0) return;
    if (this.hashOfBlock[id] !== undefined) this.lruAppend(id);
    else this.freeStack[this.freeTop++] = id;
    const twin = this.sameAs[id]!;
    if (twin >= 0) {
      this.sameAs[id] = -1;
      this.release(twin);
    }
  }

  /**
   * Takes a reference on the longest run of cached blocks matching `hashes[0..maxBlocks)` (the chained hashes
   * of a sequence's full blocks, whose tokens are `tokens[0 .. maxBlocks * blockSize)`). Returns their ids.
   */
  matchPrefix(hashes: readonly bigint[], tokens: ArrayLike<number>, maxBlocks = hashes.length): number[] {
    const out: number[] = [];
    if (!this.enablePrefixCaching) return out;
    const n = Math.min(maxBlocks, hashes.length);
    this.queriedBlocks += n;
    const bs = this.blockSize;
    for (let b = 0; b < n; b++) {
      const id = this.cache.get(hashes[b]!);
      if (id === undefined || !this.extends(id, b === 0 ? NO_PARENT : out[b - 1]!, tokens, b * bs)) break;
      if (this.refCounts[id] === 0) this.lruRemove(id);
      this.refCounts[id]!++;
      out.push(id);
    }
    this.hitBlocks += out.length;
    return out;
  }

  /**
   * Commits full blocks `from .. to - 1` of a sequence to the prefix cache: `blockIds[b]` holds the KV of
   * `tokens[b * blockSize .. (b + 1) * blockSize)` and is named by `hashes[b]` (chained, as `kvBlockHashes`).
   * A block whose hash already names another block stays uncached (it is freed as a plain block); so does a block
   * whose parent prefix no cached block holds (after a hash collision). Emits one stored event per run of newly
   * cached blocks.
   */
  commit(blockIds: ArrayLike<number>, hashes: readonly bigint[], tokens: ArrayLike<number>, from: number, to: number) {
    if (!this.enablePrefixCaching || from >= to) return;
    const bs = this.blockSize;
    let runStart = -1;
    const flush = (end: number) => {
      if (runStart < 0) return;
      if (this.onEvent) {
        const n = end - runStart;
        const ids = new Int32Array(n);
        const hs = new BigUint64Array(n);
        const toks = new Int32Array(n * bs);
        for (let i = 0; i < n; i++) {
          ids[i] = blockIds[runStart + i]!;
          hs[i] = hashes[runStart + i]!;
        }
        for (let j = 0; j < n * bs; j++) toks[j] = tokens[runStart * bs + j]!;
        this.onEvent({
          type: 'stored',
          parentHash: runStart === 0 ? null : hashes[runStart - 1]!,
          blockIds: ids,
          hashes: hs,
          blockSize: bs,
          tokenIds: toks,
        });
      }
      runStart = -1;
    };
    for (let b = from; b < to; b++) {
      const id = blockIds[b]!;
      const h = hashes[b]!;
      if (this.refCounts[id]! <= 0) throw new BadArgumentError(`commit: block ${id} is not in use`);
      if (this.hashOfBlock[id] !== undefined) {
        // Already cached: shared from the cache, or committed before.
        flush(b);
        continue;
      }
      const parent = b === 0 ? NO_PARENT : this.prefixHolder(blockIds[b - 1]!, hashes[b - 1]!);
      const owner = this.cache.get(h);
      if (owner !== undefined || parent === UNKNOWN) {
        // A duplicate of a cached block (remembered, so that the blocks after it extend the cached chain), a hash
        // collision with one, or a block after a collision.
        if (owner !== undefined && this.extends(owner, parent, tokens, b * bs)) {
          this.sameAs[id] = owner;
          this.sameAsGeneration[id] = this.generation[owner]!;
          if (this.refCounts[owner]!++ === 0) this.lruRemove(owner);
        }
        flush(b);
        continue;
      }
      this.cache.set(h, id);
      this.hashOfBlock[id] = h;
      this.parentBlock[id] = parent;
      this.parentGeneration[id] = parent === NO_PARENT ? 0 : this.generation[parent]!;
      for (let j = 0, base = id * bs, t = b * bs; j < bs; j++) this.blockTokens[base + j] = tokens[t + j]!;
      if (runStart < 0) runStart = b;
    }
    flush(to);
  }

  /**
   * Whether cached block `id` holds the prefix held by cached block `parent` (NO_PARENT: none) followed by
   * `tokens[start .. start + blockSize)`. Never for `parent` UNKNOWN, which no block records.
   */
  private extends(id: number, parent: number, tokens: ArrayLike<number>, start: number): boolean {
    if (this.parentBlock[id] !== parent) return false;
    if (parent !== NO_PARENT && this.parentGeneration[id] !== this.generation[parent]) return false;
    const bs = this.blockSize;
    for (let j = 0, base = id * bs; j < bs; j++) if (this.blockTokens[base + j] !== tokens[start + j]) return false;
    return true;
  }

  /** The cached block holding the prefix of a sequence's block `id` (chained hash `hash`), or UNKNOWN. */
  private prefixHolder(id: number, hash: bigint): number {
    if (this.hashOfBlock[id] === hash) return id;
    const same = this.sameAs[id]!;
    if (same >= 0 && this.generation[same] === this.sameAsGeneration[id] && this.hashOfBlock[same] === hash)
      return same;
    return UNKNOWN;
  }

  /** Evicts every cached, unreferenced block (emits removed). */
  clearCache(): void {
    const ids: number[] = [];
    while (this.lruHead >= 0) {
      const id = this.lruHead;
      this.lruRemove(id);
      ids.push(id);
    }
    if (ids.length > 0) this.evict(ids);
  }

  /** Drops the hashes of blocks just taken out of the LRU list, returns them to use, and emits removed. */
  private evict(ids: number[]): void {
    const hashes = new BigUint64Array(ids.length);
    for (let i = 0; i < ids.length; i++) {
      const id = ids[i]!;
      const h = this.hashOfBlock[id]!;
      hashes[i] = h;
      this.cache.delete(h);
      this.hashOfBlock[id] = undefined;
      this.generation[id] = (this.generation[id]! + 1) | 0;
      // Blocks evicted by clearCache go back to the free stack; those evicted by allocate are already in use.
      if (this.refCounts[id] === 0) this.freeStack[this.freeTop++] = id;
    }
    this.evictedBlocks += ids.length;
    this.onEvent?.({ type: 'removed', blockIds: Int32Array.from(ids), hashes });
  }

  private lruAppend(id: number): void {
    this.lruPrev[id] = this.lruTail;
    this.lruNext[id] = -1;
    if (this.lruTail >= 0) this.lruNext[this.lruTail] = id;
    else this.lruHead = id;
    this.lruTail = id;
    this.lruCount++;
  }

  private lruRemove(id: number): void {
    const p = this.lruPrev[id]!;
    const n = this.lruNext[id]!;
    if (p >= 0) this.lruNext[p] = n;
    else this.lruHead = n;
    if (n >= 0) this.lruPrev[n] = p;
    else this.lruTail = p;
    this.lruPrev[id] = -1;
    this.lruNext[id] = -1;
    this.lruCount--;
  }

  private removeFromFreeStack(id: number): void {
    for (let i = this.freeTop - 1; i >= 0; i--)
      if (this.freeStack[i] === id) {
        this.freeStack[i] = this.freeStack[--this.freeTop]!;
        return;
      }
    throw new BadArgumentError(`block ${id} is not free`);
  }
}
