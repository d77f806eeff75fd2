/**
 * KV events on the wire: what a worker's engine stored into or removed from its prefix cache, by block hash
 * (hash.ts), for the routers' prefix indexes.
 *
 * Numbering: a worker process has an `incarnation` (random, new at every start) and numbers its batches 1, 2,
 * 3 ... within it. A router that sees a gap in the numbers, or an incarnation it does not know, asks the worker
 * for a snapshot (every block it holds, with the number of the last batch the snapshot includes) and ignores
 * batches until it arrives. A worker that registers sends a snapshot of its own accord.
 *
 * Batches are flat typed arrays (no object and no bigint per block): event i is stored (`kinds[i] === 1`) or
 * removed (0) and covers `counts[i]` blocks, whose hash lanes follow those of the events before it in `lanes`
 * (low, high 32 bits a block; the layout of `hashLanesOf`). Events apply in order.
 */
import { randomInt } from 'node:crypto';
import { hashLanesOf } from './hash.js';

export const KV_EVENT_STORED = 1;
export const KV_EVENT_REMOVED = 0;

export interface KvEventBatch {
  incarnation: number;
  /** 1 for an incarnation's first batch, then one more each batch. */
  seq: number;
  kinds: Uint8Array;
  counts: Uint32Array;
  lanes: Uint32Array;
}

export interface KvSnapshot {
  incarnation: number;
  /** The last batch this snapshot includes (0: none yet); the next batch is seq + 1. */
  seq: number;
  /** Every block the worker holds in its prefix cache, as hash lanes. */
  lanes: Uint32Array;
}

/** The engine's view of an event: stored or removed blocks with their 64-bit hashes. */
export interface KvHashEvent {
  type: 'stored' | 'removed';
  hashes: BigUint64Array;
}

/** A new incarnation number: 47 random bits (a safe integer; restarts of one worker never share one). */
export function newIncarnation(): number {
  return randomInt(1, 2 ** 47);
}

/**
 * The worker's side: collects the engine's events into one batch per engine step (every event emitted in one
 * turn of the event loop, which is how the engine emits a step's events), keeps the set of blocks it holds for
 * snapshots, and hands each batch to `publish`.
 */
export class KvEventPublisher {
  readonly incarnation: number;
  private seq = 0;
  private kinds: number[] = [];
  private counts: number[] = [];
  private chunks: Uint32Array[] = [];
  private laneCount = 0;
  private scheduled = false;
  /** Held blocks: high lane -> low lanes (no bigint and no string per block). */
  private readonly held = new Map<number, Set<number>>();
  private heldCount = 0;

  constructor(
    private readonly publish: (batch: KvEventBatch) => void,
    incarnation = newIncarnation(),
  ) {
    this.incarnation = incarnation;
  }

  /** Blocks the worker holds now (what a snapshot would list). */
  get blocks(): number {
    return this.heldCount;
  }

  /** Batches published so far in this incarnation. */
  get published(): number {
    return this.seq;
  }

  /** Takes one engine event (call it from the engine's onKvEvent listener). */
  add(event: KvHashEvent): void {
    if (event.hashes.length === 0) return;
    const lanes = Uint32Array.from(hashLanesOf(event.hashes));
    const stored = event.type === 'stored';
    for (let k = 0; k < lanes.length; k += 2) this.track(stored, lanes[k]!, lanes[k + 1]!);
    this.kinds.push(stored ? KV_EVENT_STORED : KV_EVENT_REMOVED);
    this.counts.push(event.hashes.length);
    this.chunks.push(lanes);
    this.laneCount += lanes.length;
    if (!this.scheduled) {
      this.scheduled = true;
      setImmediate(() => this.flush());
    }
  }

  /** Publishes what was collected now (nothing when nothing was). */
  flush(): void {
    this.scheduled = false;
    if (this.kinds.length === 0) return;
    const lanes = new Uint32Array(this.laneCount);
    let at = 0;
    for (const c of this.chunks) {
      lanes.set(c, at);
      at += c.length;
    }
    const batch: KvEventBatch = {
      incarnation: this.incarnation,
      seq: ++this.seq,
      kinds: Uint8Array.from(this.kinds),
      counts: Uint32Array.from(this.counts),
      lanes,
    };
    this.kinds = [];
    this.counts = [];
    this.chunks = [];
    this.laneCount = 0;
    this.publish(batch);
  }

  /** Every block held now, after publishing what is pending (so `seq` covers everything listed). */
  snapshot(): KvSnapshot {
    this.flush();
    const lanes = new Uint32Array(2 * this.heldCount);
    let at = 0;
    for (const [hi, los] of this.held)
      for (const lo of los) {
        lanes[at++] = lo;
        lanes[at++] = hi;
      }
    return { incarnation: this.incarnation, seq: this.seq, lanes };
  }

  private track(stored: boolean, lo: number, hi: number): void {
    let los = this.held.get(hi);
    if (stored) {
      if (!los) this.held.set(hi, (los = new Set()));
      if (!los.has(lo)) {
        los.add(lo);
        this.heldCount++;
      }
    } else if (los?.delete(lo)) {
      this.heldCount--;
      if (los.size === 0) this.held.delete(hi);
    }
  }
}
