/**
 * KV transfer between engines whose tensor-parallel ranks each keep their own pool (the GPU engine) or share one
 * (the CPU engine): kvRankTransferPieces maps head slices from a list of source rank pools to a list of destination
 * rank pools, each piece naming its regions. Checked against an independent reference (every byte of every
 * destination rank's pool, plain copies that must not overlap), over a seeded fuzz of layouts, and bad layouts are
 * typed errors.
 */
import { describe, expect, it } from 'vitest';
import { BadArgumentError } from '../../lib/errors.js';
import {
  kvPool,
  kvRankTransferPieces,
  kvTransferPieces,
  type KvPoolSpec,
  type KvRankPieces,
} from '../../lib/kv/index.js';
import { tensorShard } from '../../lib/engine/parallel.js';
import { dummyConfig } from '../../lib/engine/model/dummy.js';

const DTYPE_SIZE: Record<string, number> = { bf16: 2, fp16: 2, fp32: 4, fp8: 1, int8: 1 };

/** The heads a rank pool holds, by the engines' rule (tensorShard), written out independently of lib/kv. */
function headsOf(spec: KvPoolSpec): { start: number; count: number } {
  const tp = spec.tpSize ?? 1;
  const rank = spec.tpRank ?? 0;
  if (spec.kvHeads >= tp) return { start: (rank * spec.kvHeads) / tp, count: spec.kvHeads / tp };
  return { start: Math.floor((rank * spec.kvHeads) / tp), count: 1 };
}

function bytesOf(spec: KvPoolSpec): number {
  const bs = spec.blockSize ?? 16;
  return (
    (spec.baseOffset ?? 0) +
    spec.numBlocks * spec.layers * 2 * bs * headsOf(spec).count * spec.headDim * DTYPE_SIZE[spec.dtype]!
  );
}

/** Byte offset of element (block, layer, kv, token, local head, dim). */
function elemOffset(spec: KvPoolSpec, block: number, layer: number, kv: number, t: number, h: number, dim: number) {
  const bs = spec.blockSize ?? 16;
  const local = headsOf(spec).count;
  const tileElems = bs * local * spec.headDim;
  const tile =
    spec.layout === 'block-major' ? (block * spec.layers + layer) * 2 + kv : (layer * 2 + kv) * spec.numBlocks + block;
  const inTile =
    (spec.headLayout ?? 'NHD') === 'NHD' ? (t * local + h) * spec.headDim + dim : (h * bs + t) * spec.headDim + dim;
  return (spec.baseOffset ?? 0) + (tile * tileElems + inTile) * DTYPE_SIZE[spec.dtype]!;
}

/** Never-zero byte `b` of element (block, layer, kv, token, global head, dim). */
function value(...xs: number[]): number {
  let h = 2166136261;
  for (const x of xs) {
    h ^= x + 0x9e37;
    h = Math.imul(h, 16777619) >>> 0;
  }
  return (h % 255) + 1;
}

/**
 * Calls fn for every element byte of `blocks` of a pool: (offset, block, model layer, kv, token, global head, dim, b).
 */
function eachByte(spec: KvPoolSpec, blocks: readonly number[], fn: (off: number, ...at: number[]) => void): void {
  const { start, count } = headsOf(spec);
  const eb = DTYPE_SIZE[spec.dtype]!;
  for (const blk of blocks)
    for (let l = 0; l < spec.layers; l++)
      for (let kv = 0; kv < 2; kv++)
        for (let t = 0; t < (spec.blockSize ?? 16); t++)
          for (let h = 0; h < count; h++)
            for (let d = 0; d < spec.headDim; d++)
              for (let b = 0; b < eb; b++)
                fn(elemOffset(spec, blk, l, kv, t, h, d) + b, blk, (spec.layerStart ?? 0) + l, kv, t, start + h, d, b);
}

/** A rank pool whose every byte encodes where it is (its global head included). */
function fillPool(spec: KvPoolSpec): Uint8Array {
  const buf = new Uint8Array(bytesOf(spec));
  const all = Array.from({ length: spec.numBlocks }, (_, i) => i);
  eachByte(spec, all, (off, blk, l, kv, t, h, d, b) => (buf[off] = value(blk, l, kv, t, h, d, b)));
  return buf;
}

/**
 * Applies the pieces region by region (plain copies, bounds checked, no destination byte written twice) and checks
 * every byte of every destination pool against the reference: dst block dstIds[i] holds src block srcIds[i] of every
 * head the rank holds, every other byte is untouched (0).
 */
function checkRanks(src: KvPoolSpec[], dst: KvPoolSpec[], srcIds: number[], dstIds: number[]): KvRankPieces {
  const p = kvRankTransferPieces(src, dst, srcIds, dstIds);
  const srcBufs = src.map(fillPool);
  const dstBufs = dst.map((s) => new Uint8Array(bytesOf(s)));
  const written = dst.map((s) => new Uint8Array(bytesOf(s)));
  let sum = 0;
  for (let i = 0; i < p.pieces; i++) {
    const from = p.localRegionIndex[i]!;
    const to = p.remoteRegionIndex[i]!;
    const [l, r, n] = [p.localOffsets[i]!, p.remoteOffsets[i]!, p.lengths[i]!];
    expect(n).toBeGreaterThan(0);
    expect(l + n).toBeLessThanOrEqual(srcBufs[from]!.length);
    expect(r + n).toBeLessThanOrEqual(dstBufs[to]!.length);
    dstBufs[to]!.set(srcBufs[from]!.subarray(l, l + n), r);
    for (let k = r; k < r + n; k++) {
      if (written[to]![k]) expect.fail(`region ${to} byte ${k} written twice`);
      written[to]![k] = 1;
    }
    sum += n;
  }
  expect(sum).toBe(p.bytes);
  let expectedBytes = 0;
  dst.forEach((spec, r) => {
    const expected = new Uint8Array(bytesOf(spec));
    const byDst = new Map(dstIds.map((id, i) => [id, srcIds[i]!]));
    eachByte(spec, dstIds, (off, blk, l, kv, t, h, d, b) => {
      expected[off] = value(byDst.get(blk)!, l, kv, t, h, d, b);
      expectedBytes++;
    });
    const got = dstBufs[r]!;
    for (let i = 0; i < got.length; i++)
      if (got[i] !== expected[i]) expect.fail(`dst rank ${r} byte ${i}: got ${got[i]}, expected ${expected[i]}`);
  });
  expect(p.bytes).toBe(expectedBytes);
  return p;
}

const base = (over: Partial<KvPoolSpec> = {}): KvPoolSpec => ({
  layers: 2,
  kvHeads: 4,
  headDim: 4,
  blockSize: 4,
  numBlocks: 8,
  dtype: 'bf16',
  layout: 'block-major',
  ...over,
});

/** The pools of an engine's tp ranks (a list of one for tp 1, or for the CPU engine's shared pool). */
const ranks = (tp: number, over: Partial<KvPoolSpec> = {}): KvPoolSpec[] =>
  Array.from({ length: tp }, (_, r) => base({ ...(tp > 1 ? { tpSize: tp, tpRank: r } : {}), ...over }));

const expectBad = (fn: () => unknown, message: RegExp) => {
  let error: unknown;
  try {
    fn();
  } catch (e) {
    error = e;
  }
  expect(error).toBeInstanceOf(BadArgumentError);
  expect((error as BadArgumentError).code).toBe('TANDEM_BAD_ARGUMENT');
  expect((error as Error).message).toMatch(message);
};

describe('kvPool: replicated kv heads (more ranks than heads)', () => {
  it("rank r holds the one head floor(r * kvHeads / tpSize), the engines' split", () => {
    const config = { ...dummyConfig('dummy:tiny'), numKvHeads: 2, numHeads: 8, intermediateSize: 64 };
    for (const tp of [4, 8])
      for (let r = 0; r < tp; r++) {
        const pool = kvPool(base({ kvHeads: 2, tpSize: tp, tpRank: r }));
        expect(pool.localHeads).toBe(1);
        expect(pool.headStart).toBe(tensorShard(config, tp, r).kvHeads.start);
        expect(pool.poolBytes).toBe(kvPool(base({ kvHeads: 1 })).poolBytes);
      }
  });

  it('a tpSize that neither divides kvHeads nor is a multiple of them is refused', () => {
    expectBad(
      () => kvPool(base({ kvHeads: 4, tpSize: 6 })),
      /kvHeads 4 must be divisible by tpSize, or tpSize a multiple of kvHeads \(got tpSize 6\)/,
    );
  });
});

describe('kvRankTransferPieces', () => {
  it('TP 2 -> TP 1 (GPU prefill ranks into one pool): each rank lands its heads, region indices name the rank', () => {
    const p = checkRanks(ranks(2), ranks(1), [3, 0, 5], [1, 2, 7]);
    expect(new Set(p.localRegionIndex)).toEqual(new Set([0, 1]));
    expect(new Set(p.remoteRegionIndex)).toEqual(new Set([0]));
    // NHD: one row of the rank's 2 heads per (block, layer, K/V, token) and rank.
    expect(p.pieces).toBe(2 * 3 * 2 * 2 * 4);
  });

  it('TP 1 -> TP 2 (one pool into GPU decode ranks): every rank gets its slice', () => {
    const p = checkRanks(ranks(1), ranks(2, { layout: 'layer-major' }), [0, 4], [5, 1]);
    expect(new Set(p.localRegionIndex)).toEqual(new Set([0]));
    expect(new Set(p.remoteRegionIndex)).toEqual(new Set([0, 1]));
  });

  it('same ranks on both sides (TP 2 -> TP 2, block-major): whole blocks rank to rank', () => {
    const p = checkRanks(ranks(2), ranks(2), [1, 2, 3], [4, 5, 6]);
    expect(p.pieces).toBe(2); // consecutive ids merge into one piece per rank
    expect(Array.from(p.localRegionIndex)).toEqual([0, 1]);
    expect(Array.from(p.remoteRegionIndex)).toEqual([0, 1]);
  });

  it('one pool each side is kvTransferPieces, with region indices 0', () => {
    const src = base({ layout: 'layer-major' });
    const dst = base({ headLayout: 'HND' });
    const one = kvRankTransferPieces([src], [dst], [1, 3], [2, 0]);
    const plain = kvTransferPieces(src, dst, [1, 3], [2, 0]);
    expect(Array.from(one.localOffsets)).toEqual(Array.from(plain.localOffsets));
    expect(Array.from(one.remoteOffsets)).toEqual(Array.from(plain.remoteOffsets));
    expect(Array.from(one.lengths)).toEqual(Array.from(plain.lengths));
    expect(one.bytes).toBe(plain.bytes);
    expect(one.localRegionIndex.every((i) => i === 0) && one.remoteRegionIndex.every((i) => i === 0)).toBe(true);
  });

  it('replicated heads: TP 4 of 2 kv heads -> TP 1 reads each head once; TP 1 -> TP 4 writes every replica', () => {
    const four = ranks(4, { kvHeads: 2 });
    const one = ranks(1, { kvHeads: 2 });
    const gather = checkRanks(four, one, [2, 6], [0, 1]);
    // Rank 0 holds head 0, rank 2 head 1; ranks 1 and 3 are replicas nothing is read from.
    expect(new Set(gather.localRegionIndex)).toEqual(new Set([0, 2]));
    const scatter = checkRanks(one, four, [2, 6], [0, 1]);
    expect(new Set(scatter.remoteRegionIndex)).toEqual(new Set([0, 1, 2, 3]));
    checkRanks(four, ranks(2, { kvHeads: 2, layout: 'layer-major' }), [7], [7]);
  });

  it('a seeded fuzz of layouts: every destination byte right, none written twice', () => {
    let seed = 12345;
    const rand = (n: number) => {
      seed = (Math.imul(seed, 1103515245) + 12345) >>> 0;
      return (seed >>> 8) % n;
    };
    const pick = <T>(xs: readonly T[]): T => xs[rand(xs.length)]!;
    for (let round = 0; round < 60; round++) {
      const kvHeads = pick([1, 2, 4, 8]);
      const tps = [1, 2, 4, 8].filter((t) => kvHeads % t === 0 || t % kvHeads === 0);
      const shape = { kvHeads, layers: 1 + rand(3), headDim: pick([2, 4]), blockSize: pick([1, 2, 4]), numBlocks: 6 };
      const side = () => ({
        dtype: pick(['bf16', 'fp32', 'int8'] as const),
        layout: pick(['block-major', 'layer-major'] as const),
        headLayout: pick(['NHD', 'HND'] as const),
        baseOffset: pick([0, 64]),
      });
      const s = side();
      const d = { ...side(), dtype: s.dtype };
      const n = 1 + rand(4);
      const perm = (k: number) => {
        const ids = Array.from({ length: 6 }, (_, i) => i);
        for (let i = ids.length - 1; i > 0; i--) {
          const j = rand(i + 1);
          [ids[i], ids[j]] = [ids[j]!, ids[i]!];
        }
        return ids.slice(0, k);
      };
      const srcIds = Array.from({ length: n }, () => rand(6)); // a source block may repeat
      checkRanks(ranks(pick(tps), { ...shape, ...s }), ranks(pick(tps), { ...shape, ...d }), srcIds, perm(n));
    }
  });

  it('bad layouts are typed errors naming what is wrong', () => {
    // Rank 1's heads are nowhere in the source list.
    expectBad(
      () => kvRankTransferPieces([ranks(2)[0]!], ranks(1), [0], [0]),
      /no src rank pool holds kv head 2 \(src holds \[0, 2\) of 4\)/,
    );
    expectBad(() => kvRankTransferPieces(ranks(1), [], [0], [0]), /dst must be a non-empty list of rank pools/);
    expectBad(
      () => kvRankTransferPieces([base(), base({ tpSize: 2, tpRank: 1, layers: 3 })], ranks(1), [0], [0]),
      /src\[0\] and src\[1\] disagree on modelLayers/,
    );
    expectBad(() => kvRankTransferPieces(ranks(2), ranks(1, { dtype: 'fp32' }), [0], [0]), /disagree on dtype/);
    expectBad(
      () => kvRankTransferPieces(ranks(2), [base({ kvHeads: 8 })], [0], [0]),
      /disagree on kvHeads \(src 4, dst 8\)/,
    );
    // A destination rank's pool with fewer blocks than the ids name.
    expectBad(
      () =>
        kvRankTransferPieces(
          ranks(1),
          [base({ tpSize: 2, tpRank: 0 }), base({ tpSize: 2, tpRank: 1, numBlocks: 3 })],
          [0],
          [5],
        ),
      /dstBlocks\[0\] = 5 is out of range for dst \(numBlocks 3\)/,
    );
    expectBad(() => kvRankTransferPieces(ranks(2), ranks(1), [0, 1], [2, 2]), /duplicate destination block id 2/);
    expectBad(() => kvRankTransferPieces(ranks(2), ranks(1), [0, 1], [2]), /same length/);
    expectBad(() => kvRankTransferPieces(ranks(2), ranks(1), [9], [2]), /srcBlocks\[0\] = 9 is out of range/);
    expectBad(() => kvRankTransferPieces([base({ tpSize: 3 })], ranks(1), [0], [0]), /must be divisible by tpSize/);
  });
});

/**
 * The pools of an engine of pp stages x tp ranks, stage-major (stage s's ranks at s * tp + r): stage s holds layers
 * [s * L / pp, ...) as lib/engine/parallel.ts's stageLayers splits them (earlier stages taking the extra layer).
 */
const stageRanks = (pp: number, tp: number, over: Partial<KvPoolSpec> = {}): KvPoolSpec[] => {
  const layers = over.layers ?? base().layers;
  const out: KvPoolSpec[] = [];
  let start = 0;
  for (let st = 0; st < pp; st++) {
    const count = Math.floor(layers / pp) + (st < layers % pp ? 1 : 0);
    for (const pool of ranks(tp, { ...over, layers: count, layerStart: start, modelLayers: layers })) out.push(pool);
    start += count;
  }
  return out;
};

describe('kvRankTransferPieces: pipeline stages (each pool holds its layers)', () => {
  it('kvPool: a stage pool holds its layers only, and may not run past the model', () => {
    const stage = kvPool(base({ layers: 1, layerStart: 1, modelLayers: 2 }));
    expect(stage.blockBytes).toBe(kvPool(base()).blockBytes / 2);
    expect(kvPool(base()).modelLayers).toBe(2);
    expectBad(
      () => kvPool(base({ layers: 2, layerStart: 1, modelLayers: 2 })),
      /layers \[1, 3\) run past the model's 2/,
    );
  });

  it('PP 2 -> PP 1: each stage lands its layers, region indices name the stage pool', () => {
    const p = checkRanks(stageRanks(2, 1, { layers: 3 }), ranks(1, { layers: 3 }), [3, 0, 5], [1, 2, 7]);
    expect(new Set(p.localRegionIndex)).toEqual(new Set([0, 1]));
    expect(new Set(p.remoteRegionIndex)).toEqual(new Set([0]));
  });

  it('TP 1 -> TP 2 x PP 2, and TP 2 x PP 2 -> PP 4 x TP 1 (layer-major, HND): every byte from the pool holding it', () => {
    const one = ranks(1, { layers: 4 });
    const grid = stageRanks(2, 2, { layers: 4 });
    const p = checkRanks(one, grid, [0, 4], [5, 1]);
    expect(new Set(p.remoteRegionIndex)).toEqual(new Set([0, 1, 2, 3]));
    const q = checkRanks(
      grid,
      stageRanks(4, 1, { layers: 4, layout: 'layer-major', headLayout: 'HND' }),
      [2, 3],
      [0, 6],
    );
    expect(new Set(q.localRegionIndex)).toEqual(new Set([0, 1, 2, 3]));
    // Uneven stages on both sides (5 layers: 3 + 2 against 2 + 2 + 1), replicated heads.
    checkRanks(stageRanks(2, 4, { layers: 5, kvHeads: 2 }), stageRanks(3, 1, { layers: 5, kvHeads: 2 }), [1], [2]);
  });

  it('same stages and ranks on both sides (block-major): whole blocks pool to pool', () => {
    const p = checkRanks(stageRanks(2, 2, { layers: 4 }), stageRanks(2, 2, { layers: 4 }), [1, 2], [4, 5]);
    expect(p.pieces).toBe(4);
  });

  it('a layer no source pool holds, or pools of different models, are typed errors', () => {
    const [first] = stageRanks(2, 1, { layers: 4 });
    expectBad(
      () => kvRankTransferPieces([first!], ranks(1, { layers: 4 }), [0], [0]),
      /no src rank pool holds kv head 0 of layer 2 \(src holds {2}of 4\)/,
    );
    expectBad(
      () => kvRankTransferPieces(stageRanks(2, 1, { layers: 4 }), ranks(1, { layers: 3 }), [0], [0]),
      /src and dst disagree on modelLayers \(src 4, dst 3\)/,
    );
    // A pair of pools (kvTransferPieces) must hold the same layers.
    expectBad(
      () => kvTransferPieces(stageRanks(2, 1, { layers: 4 })[0]!, stageRanks(2, 1, { layers: 4 })[1]!, [0], [0]),
      /src and dst disagree on layerStart \(src 0, dst 2\)/,
    );
  });
});
