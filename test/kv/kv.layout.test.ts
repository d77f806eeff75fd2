import { describe, expect, it } from 'vitest';
import { BadArgumentError } from '../../lib/errors.js';
import {
  KV_DTYPE_BYTES,
  kvBlockOffset,
  kvPool,
  kvStridedPieces,
  kvTransferPieces,
  type KvPieces,
  type KvPoolSpec,
} from '../../lib/kv/index.js';

// ---------------------------------------------------------------------------------------------------------------
// Independent reference: byte positions straight from the layout description, pools as plain byte buffers.
// ---------------------------------------------------------------------------------------------------------------

interface Ref {
  layers: number;
  kvHeads: number;
  headDim: number;
  blockSize: number;
  numBlocks: number;
  eb: number;
  blockMajor: boolean;
  nhd: boolean;
  localHeads: number;
  headStart: number;
  base: number;
  bytes: number;
}

const DTYPE_SIZE: Record<string, number> = { bf16: 2, fp16: 2, fp32: 4, fp8: 1, int8: 1 };

function ref(spec: KvPoolSpec): Ref {
  const tpSize = spec.tpSize ?? 1;
  const tpRank = spec.tpRank ?? 0;
  const blockSize = spec.blockSize ?? 16;
  const localHeads = spec.kvHeads / tpSize;
  const eb = DTYPE_SIZE[spec.dtype]!;
  const base = spec.baseOffset ?? 0;
  return {
    layers: spec.layers,
    kvHeads: spec.kvHeads,
    headDim: spec.headDim,
    blockSize,
    numBlocks: spec.numBlocks,
    eb,
    blockMajor: spec.layout === 'block-major',
    nhd: (spec.headLayout ?? 'NHD') === 'NHD',
    localHeads,
    headStart: tpRank * localHeads,
    base,
    bytes: base + spec.numBlocks * spec.layers * 2 * blockSize * localHeads * spec.headDim * eb,
  };
}

/** Byte offset of element (block, layer, kv, token, local head, dim). */
function elemOffset(r: Ref, block: number, layer: number, kv: number, token: number, head: number, dim: number) {
  const tileElems = r.blockSize * r.localHeads * r.headDim;
  const tile = r.blockMajor ? (block * r.layers + layer) * 2 + kv : (layer * 2 + kv) * r.numBlocks + block;
  const inTile = r.nhd
    ? (token * r.localHeads + head) * r.headDim + dim
    : (head * r.blockSize + token) * r.headDim + dim;
  return r.base + (tile * tileElems + inTile) * r.eb;
}

/** Deterministic, never-zero byte `b` of element (block, layer, kv, token, global head, dim). */
function value(block: number, layer: number, kv: number, token: number, head: number, dim: number, b: number) {
  let h = 2166136261;
  for (const x of [block, layer, kv, token, head, dim, b]) {
    h ^= x + 0x9e37;
    h = Math.imul(h, 16777619) >>> 0;
  }
  return (h % 255) + 1;
}

/** A pool buffer where every element encodes where it is (its global head included); the prefix is 0xEE. */
function fillPool(spec: KvPoolSpec): Uint8Array {
  const r = ref(spec);
  const buf = new Uint8Array(r.bytes);
  buf.fill(0xee, 0, r.base);
  for (let blk = 0; blk < r.numBlocks; blk++)
    for (let l = 0; l < r.layers; l++)
      for (let kv = 0; kv < 2; kv++)
        for (let t = 0; t < r.blockSize; t++)
          for (let h = 0; h < r.localHeads; h++)
            for (let d = 0; d < r.headDim; d++) {
              const off = elemOffset(r, blk, l, kv, t, h, d);
              for (let b = 0; b < r.eb; b++) buf[off + b] = value(blk, l, kv, t, r.headStart + h, d, b);
            }
  return buf;
}

/** Writes into `expected` what dst should hold after blocks srcIds[i] of src (global heads `heads`) land. */
function expectInto(
  expected: Uint8Array,
  srcSpec: KvPoolSpec,
  dstSpec: KvPoolSpec,
  srcIds: readonly number[],
  dstIds: readonly number[],
): number {
  const s = ref(srcSpec);
  const d = ref(dstSpec);
  const lo = Math.max(s.headStart, d.headStart);
  const hi = Math.min(s.headStart + s.localHeads, d.headStart + d.localHeads);
  let bytes = 0;
  srcIds.forEach((sb, i) => {
    const db = dstIds[i]!;
    for (let l = 0; l < d.layers; l++)
      for (let kv = 0; kv < 2; kv++)
        for (let t = 0; t < d.blockSize; t++)
          for (let h = lo; h < hi; h++)
            for (let dim = 0; dim < d.headDim; dim++) {
              const off = elemOffset(d, db, l, kv, t, h - d.headStart, dim);
              for (let b = 0; b < d.eb; b++) expected[off + b] = value(sb, l, kv, t, h, dim, b);
              bytes += d.eb;
            }
  });
  return bytes;
}

/** Applies the pieces with plain byte copies, checking bounds and that no destination byte is written twice. */
function apply(p: KvPieces, src: Uint8Array, dst: Uint8Array): void {
  expect(p.localOffsets.length).toBe(p.pieces);
  expect(p.remoteOffsets.length).toBe(p.pieces);
  expect(p.lengths.length).toBe(p.pieces);
  let sum = 0;
  const spans: [number, number][] = [];
  for (let i = 0; i < p.pieces; i++) {
    const l = p.localOffsets[i]!;
    const r = p.remoteOffsets[i]!;
    const n = p.lengths[i]!;
    expect(n).toBeGreaterThan(0);
    expect(l + n).toBeLessThanOrEqual(src.length);
    expect(r + n).toBeLessThanOrEqual(dst.length);
    dst.set(src.subarray(l, l + n), r);
    spans.push([r, r + n]);
    sum += n;
  }
  expect(sum).toBe(p.bytes);
  spans.sort((a, b) => a[0] - b[0]);
  for (let i = 1; i < spans.length; i++) expect(spans[i]![0]).toBeGreaterThanOrEqual(spans[i - 1]![1]);
}

function expectSameBytes(actual: Uint8Array, expected: Uint8Array): void {
  expect(actual.length).toBe(expected.length);
  for (let i = 0; i < actual.length; i++) {
    if (actual[i] !== expected[i]) {
      expect.fail(`byte ${i}: got ${actual[i]}, expected ${expected[i]}`);
    }
  }
}

/** Builds the pieces, copies src into a zeroed dst, and compares every dst byte with the reference. */
function check(srcSpec: KvPoolSpec, dstSpec: KvPoolSpec, srcIds: number[], dstIds: number[]): KvPieces {
  const p = kvTransferPieces(kvPool(srcSpec), kvPool(dstSpec), srcIds, dstIds);
  const src = fillPool(srcSpec);
  const dst = new Uint8Array(ref(dstSpec).bytes);
  apply(p, src, dst);
  const expected = new Uint8Array(dst.length);
  const bytes = expectInto(expected, srcSpec, dstSpec, srcIds, dstIds);
  expect(p.bytes).toBe(bytes);
  expectSameBytes(dst, expected);
  return p;
}

const small = (over: Partial<KvPoolSpec> = {}): KvPoolSpec => ({
  layers: 3,
  kvHeads: 4,
  headDim: 4,
  blockSize: 4,
  numBlocks: 10,
  dtype: 'fp32',
  layout: 'block-major',
  ...over,
});

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

// ---------------------------------------------------------------------------------------------------------------

describe('kvPool', () => {
  it('fills defaults, computes sizes and freezes the result', () => {
    const p = kvPool({ layers: 80, kvHeads: 8, headDim: 128, numBlocks: 100, dtype: 'bf16', layout: 'layer-major' });
    expect(p).toMatchObject({
      blockSize: 16,
      headLayout: 'NHD',
      tpSize: 1,
      tpRank: 0,
      baseOffset: 0,
      localHeads: 8,
      headStart: 0,
      dtypeBytes: 2,
      tileBytes: 16 * 8 * 128 * 2,
      blockBytes: 80 * 2 * 16 * 8 * 128 * 2,
      poolBytes: 100 * 80 * 2 * 16 * 8 * 128 * 2,
    });
    expect(Object.isFrozen(p)).toBe(true);
    const q = kvPool({ ...small(), tpSize: 2, tpRank: 1, dtype: 'int8' });
    expect(q).toMatchObject({ localHeads: 2, headStart: 2, tileBytes: 4 * 2 * 4, blockBytes: 3 * 2 * 32 });
    expect(KV_DTYPE_BYTES).toEqual({ bf16: 2, fp16: 2, fp32: 4, fp8: 1, int8: 1 });
  });

  it('kvBlockOffset matches the reference for both layouts, both head layouts and a base offset', () => {
    for (const layout of ['block-major', 'layer-major'] as const)
      for (const headLayout of ['NHD', 'HND'] as const) {
        const spec = small({ layout, headLayout, baseOffset: 96, tpSize: 2, tpRank: 1 });
        const r = ref(spec);
        const p = kvPool(spec);
        for (let b = 0; b < r.numBlocks; b++)
          for (let l = 0; l < r.layers; l++)
            for (const kv of [0, 1] as const) expect(kvBlockOffset(p, b, l, kv)).toBe(elemOffset(r, b, l, kv, 0, 0, 0));
        // the last tile ends where the pool ends, in both layouts
        expect(kvBlockOffset(spec, 9, 2, 1) + p.tileBytes).toBe(p.baseOffset + p.poolBytes);
      }
  });

  it('rejects bad specs, naming the field and the value', () => {
    expectBad(
      () => kvPool(small({ dtype: 'fp64' as never })),
      /dtype must be one of bf16, fp16, fp32, fp8, int8 \(got "fp64"\)/,
    );
    expectBad(() => kvPool(small({ layout: 'row-major' as never })), /layout must be one of .*"row-major"/);
    expectBad(() => kvPool(small({ headLayout: 'NDH' as never })), /headLayout .*"NDH"/);
    expectBad(
      () => kvPool(small({ kvHeads: 6, tpSize: 4 })),
      /kvHeads 6 must be divisible by tpSize, or tpSize a multiple of kvHeads \(got tpSize 4\)/,
    );
    expectBad(() => kvPool(small({ tpSize: 2, tpRank: 2 })), /tpRank must be less than tpSize 2 \(got 2\)/);
    expectBad(() => kvPool(small({ layers: 0 })), /layers must be a positive integer \(got 0\)/);
    expectBad(() => kvPool(small({ headDim: 1.5 })), /headDim must be a positive integer \(got 1\.5\)/);
    expectBad(() => kvPool(small({ numBlocks: -1 })), /numBlocks must be a positive integer \(got -1\)/);
    expectBad(() => kvPool(small({ blockSize: Number.NaN })), /blockSize .*NaN/);
    expectBad(() => kvPool(small({ tpRank: -1 })), /tpRank must be a non-negative integer \(got -1\)/);
    expectBad(
      () => kvPool(small({ baseOffset: '0' as never })),
      /baseOffset must be a non-negative integer \(got "0"\)/,
    );
    expectBad(() => kvPool(small({ numBlocks: 2 ** 50 })), /too large/);
    expectBad(() => kvPool(null as never), /spec must be an object/);
    const p = kvPool(small());
    expectBad(() => kvBlockOffset(p, 10, 0, 0), /blockId 10 is out of range \(numBlocks 10\)/);
    expectBad(() => kvBlockOffset(p, 0, 3, 0), /layer 3 is out of range \(layers 3\)/);
    expectBad(() => kvBlockOffset(p, 0, 0, 2 as never), /kv must be 0 \(K\) or 1 \(V\) \(got 2\)/);
  });
});

describe('kvTransferPieces: same TP size', () => {
  it('block-major -> block-major, consecutive ids coalesce to one piece', () => {
    const p = check(small(), small({ numBlocks: 12 }), [3, 4, 5, 6], [0, 1, 2, 3]);
    expect(p.pieces).toBe(1);
    expect(p.lengths[0]).toBe(4 * kvPool(small()).blockBytes);
    expect(p.localOffsets[0]).toBe(3 * kvPool(small()).blockBytes);
    expect(p.remoteOffsets[0]).toBe(0);
  });

  it('block-major -> block-major, scattered ids: one piece per run', () => {
    const p = check(small(), small({ numBlocks: 12 }), [7, 1, 2, 9, 0, 5], [2, 11, 0, 1, 3, 4]);
    expect(p.pieces).toBe(6);
    const q = check(small(), small({ numBlocks: 12 }), [0, 1, 5, 6, 7, 2], [4, 5, 8, 9, 10, 0]);
    expect(q.pieces).toBe(3);
  });

  it('accepts Uint32Array ids, repeated source ids, and empty lists', () => {
    const a = kvTransferPieces(small(), small(), new Uint32Array([1, 2, 8]), new Uint32Array([3, 4, 0]));
    const b = kvTransferPieces(small(), small(), [1, 2, 8], [3, 4, 0]);
    expect(a).toEqual(b);
    expect(a.pieces).toBe(2);
    check(small(), small(), [2, 2, 2], [7, 0, 4]);
    const e = kvTransferPieces(small(), small(), [], []);
    expect(e).toMatchObject({ pieces: 0, bytes: 0 });
    expect(e.lengths).toBeInstanceOf(Float64Array);
    expect(e.lengths.length).toBe(0);
  });

  it('layer-major -> layer-major, one piece per tile; consecutive ids merge per tile', () => {
    const src = small({ layout: 'layer-major' });
    const dst = small({ layout: 'layer-major', numBlocks: 13 });
    const p = check(src, dst, [7, 1, 4, 9], [2, 11, 0, 6]);
    expect(p.pieces).toBe(3 * 2 * 4);
    expect(Array.from(p.lengths).every((n) => n === kvPool(src).tileBytes)).toBe(true);
    const q = check(src, dst, [4, 5, 6], [10, 11, 12]);
    expect(q.pieces).toBe(3 * 2);
  });

  it('block-major -> layer-major and back: per-tile pieces', () => {
    const bm = small();
    const lm = small({ layout: 'layer-major', numBlocks: 11 });
    const p = check(bm, lm, [0, 3, 9], [10, 1, 5]);
    expect(p.pieces).toBe(3 * 2 * 3);
    const q = check(lm, bm, [10, 1, 5], [0, 3, 9]);
    expect(q.pieces).toBe(3 * 2 * 3);
  });

  it('HND on both sides, with base offsets and bf16', () => {
    const src = small({ headLayout: 'HND', baseOffset: 40, dtype: 'bf16' });
    const dst = small({ headLayout: 'HND', layout: 'layer-major', baseOffset: 1000, dtype: 'bf16' });
    const p = check(src, dst, [2, 3, 4], [4, 5, 6]);
    expect(p.pieces).toBe(3 * 3 * 2);
    expect(check(src, small({ headLayout: 'HND', baseOffset: 8, dtype: 'bf16' }), [2, 3], [8, 9]).pieces).toBe(1);
  });

  it('different head layouts (NHD -> HND, HND -> NHD): per head-row pieces', () => {
    const p = check(small(), small({ headLayout: 'HND' }), [1, 6], [0, 2]);
    // one piece per (tile, token, head), except that the last row of a tile continues into the next tile of the
    // same block on both sides (both block-major), so those merge: 5 per block
    expect(p.pieces).toBe(2 * 3 * 2 * 4 * 4 - 2 * 5);
    check(small({ headLayout: 'HND', layout: 'layer-major' }), small(), [9, 0, 3], [3, 4, 5]);
  });

  it('int8 and fp8 pools of one head', () => {
    const one = (over: Partial<KvPoolSpec>) => small({ kvHeads: 1, dtype: 'int8', ...over });
    check(one({}), one({ layout: 'layer-major' }), [5, 6], [1, 2]);
    // one head: an NHD tile is laid out as an HND tile, so the rows merge back into whole tiles
    const p = check(one({ dtype: 'fp8' }), one({ dtype: 'fp8', headLayout: 'HND' }), [5], [1]);
    expect(p.pieces).toBe(1);
  });
});

describe('kvTransferPieces: different TP sizes (head slices)', () => {
  const rowBytes = 4 * 4; // headDim 4, fp32

  for (const headLayout of ['NHD', 'HND'] as const) {
    it(`TP2 rank 0 and rank 1 -> TP1 (${headLayout}): each rank lands its heads, together all heads`, () => {
      const srcIds = [8, 0, 3];
      const dstIds = [1, 2, 7];
      const dstSpec = small({ headLayout, numBlocks: 9 });
      const dst = new Uint8Array(ref(dstSpec).bytes);
      const expected = new Uint8Array(dst.length);
      let bytes = 0;
      for (const tpRank of [0, 1]) {
        const srcSpec = small({ headLayout, tpSize: 2, tpRank });
        const p = kvTransferPieces(kvPool(srcSpec), kvPool(dstSpec), srcIds, dstIds);
        if (headLayout === 'NHD') {
          expect(p.pieces).toBe(3 * 3 * 2 * 4); // blocks * layers * K,V * tokens
          expect(Array.from(p.lengths).every((n) => n === 2 * rowBytes)).toBe(true);
        } else {
          expect(p.pieces).toBe(3 * 3 * 2); // blocks * layers * K,V
          expect(Array.from(p.lengths).every((n) => n === 2 * 4 * rowBytes)).toBe(true);
        }
        apply(p, fillPool(srcSpec), dst);
        const one = new Uint8Array(dst.length);
        expect(p.bytes).toBe(expectInto(one, srcSpec, dstSpec, srcIds, dstIds));
        bytes += expectInto(expected, srcSpec, dstSpec, srcIds, dstIds);
        // check each rank alone too
        const alone = new Uint8Array(dst.length);
        apply(p, fillPool(srcSpec), alone);
        expectSameBytes(alone, one);
      }
      // Both ranks together fill every head: the same as a TP1 -> TP1 copy.
      const full = new Uint8Array(dst.length);
      expect(bytes).toBe(expectInto(full, small({ headLayout }), dstSpec, srcIds, dstIds));
      expectSameBytes(expected, full);
      expectSameBytes(dst, full);
    });

    it(`TP1 -> TP2 rank 1 (${headLayout}): only the rank's slice lands`, () => {
      const src = small({ headLayout });
      const dst = small({ headLayout, tpSize: 2, tpRank: 1, layout: 'layer-major' });
      const p = check(src, dst, [0, 4, 5], [5, 1, 2]);
      expect(p.bytes).toBe(3 * 3 * 2 * 4 * 2 * rowBytes);
      expect(p.pieces).toBe(headLayout === 'NHD' ? 3 * 3 * 2 * 4 : 3 * 3 * 2);
    });
  }

  it('TP2 -> TP4 and TP4 -> TP2 with mixed layouts and head layouts', () => {
    const heads8 = (over: Partial<KvPoolSpec>) => small({ kvHeads: 8, ...over });
    for (const r of [0, 1])
      check(
        heads8({ tpSize: 2, tpRank: 1, layout: 'layer-major' }),
        heads8({ tpSize: 4, tpRank: 2 + r, headLayout: 'HND' }),
        [1, 2],
        [9, 3],
      );
    check(heads8({ tpSize: 4, tpRank: 3, headLayout: 'HND' }), heads8({ tpSize: 2, tpRank: 1 }), [4], [4]);
  });

  it('throws when the head ranges do not overlap', () => {
    expectBad(
      () => kvTransferPieces(small({ tpSize: 2, tpRank: 0 }), small({ tpSize: 2, tpRank: 1 }), [0], [0]),
      /share no KV heads .*src tpSize 2 tpRank 0 holds heads \[0, 2\).*dst tpSize 2 tpRank 1 holds heads \[2, 4\)/,
    );
    expectBad(
      () =>
        kvTransferPieces(
          small({ kvHeads: 8, tpSize: 4, tpRank: 0 }),
          small({ kvHeads: 8, tpSize: 2, tpRank: 1 }),
          [0],
          [0],
        ),
      /share no KV heads/,
    );
  });
});

describe('kvTransferPieces: errors', () => {
  it('rejects pools that disagree on shape', () => {
    for (const [field, value] of [
      ['layers', 4],
      ['headDim', 8],
      ['dtype', 'fp16'],
      ['blockSize', 8],
      ['kvHeads', 8],
    ] as const) {
      expectBad(
        () => kvTransferPieces(small(), small({ [field]: value }), [0], [0]),
        new RegExp(`src and dst disagree on ${field} \\(src ${String(small()[field])}, dst ${value}\\)`),
      );
    }
    // same local heads but different totals
    expectBad(
      () => kvTransferPieces(small({ kvHeads: 8, tpSize: 2 }), small({ kvHeads: 4 }), [0], [0]),
      /disagree on kvHeads \(src 8, dst 4\)/,
    );
    expectBad(
      () => kvTransferPieces(small(), small({ dtype: 'bf64' as never }), [0], [0]),
      /dst: dtype must be one of/,
    );
  });

  it('rejects ids out of range, bad ids, duplicates and length mismatches', () => {
    const src = kvPool(small());
    const dst = kvPool(small({ numBlocks: 5 }));
    expectBad(
      () => kvTransferPieces(src, dst, [0, 10], [0, 1]),
      /srcBlocks\[1\] = 10 is out of range for src \(numBlocks 10\)/,
    );
    expectBad(
      () => kvTransferPieces(src, dst, [9, 8], [0, 5]),
      /dstBlocks\[1\] = 5 is out of range for dst \(numBlocks 5\)/,
    );
    expectBad(
      () => kvTransferPieces(src, dst, new Uint32Array([0, 12]), new Uint32Array([0, 1])),
      /srcBlocks\[1\] = 12 is out of range/,
    );
    expectBad(
      () => kvTransferPieces(src, dst, [0, -1], [0, 1]),
      /srcBlocks\[1\] must be a non-negative integer block id \(got -1\)/,
    );
    expectBad(() => kvTransferPieces(src, dst, [0, 1.5], [0, 1]), /srcBlocks\[1\] .*\(got 1\.5\)/);
    expectBad(() => kvTransferPieces(src, dst, [0, 1], [0, '1' as never]), /dstBlocks\[1\] .*\(got string\)/);
    expectBad(
      () => kvTransferPieces(src, dst, [0, 1, 2], [3, 4, 3]),
      /duplicate destination block id 3 \(dstBlocks\[0\] and dstBlocks\[2\]\)/,
    );
    expectBad(
      () => kvTransferPieces(src, dst, new Uint32Array([0, 1]), new Uint32Array([4, 4])),
      /duplicate destination block id 4/,
    );
    expectBad(() => kvTransferPieces(src, dst, [0, 1, 2], [0, 1]), /same length \(srcBlocks 3, dstBlocks 2\)/);
    expectBad(
      () => kvTransferPieces(src, dst, new Int32Array([0]) as never, [0]),
      /srcBlocks must be a Uint32Array or an array/,
    );
  });
});

describe('kvTransferPieces: model-sized pools', () => {
  const llama70b = (numBlocks: number): KvPoolSpec => ({
    layers: 80,
    kvHeads: 8,
    headDim: 128,
    blockSize: 16,
    numBlocks,
    dtype: 'bf16',
    layout: 'layer-major',
  });

  it('Llama-3.1-70B shape, 256 scattered blocks layer-major: 80*2*256 tile pieces', () => {
    const src = kvPool(llama70b(4096));
    const dst = kvPool(llama70b(3000));
    const srcIds = Array.from({ length: 256 }, (_, i) => (i * 37 + 11) % 4096);
    const dstIds = Array.from({ length: 256 }, (_, i) => (i * 101 + 5) % 3000);
    const p = kvTransferPieces(src, dst, srcIds, dstIds);
    expect(p.pieces).toBe(80 * 2 * 256);
    expect(src.tileBytes).toBe(16 * 8 * 128 * 2);
    expect(p.bytes).toBe(256 * src.blockBytes);
    expect(p.bytes).toBe(80 * 2 * 256 * 32768);
    expect(Array.from(p.lengths).every((n) => n === 32768)).toBe(true);
    // spot-check offsets against kvBlockOffset
    for (const k of [0, 1, 255, 256, 40959]) {
      const lk = Math.floor(k / 256);
      const i = k % 256;
      const layer = lk >> 1;
      const kv = (lk & 1) as 0 | 1;
      expect(p.localOffsets[k]).toBe(kvBlockOffset(src, srcIds[i]!, layer, kv));
      expect(p.remoteOffsets[k]).toBe(kvBlockOffset(dst, dstIds[i]!, layer, kv));
    }
  });

  // Speed is measured by bench:transfer (prepare time), not asserted here.
  it('builds 16,384 layer-major pieces for 256 scattered blocks of 32 layers', () => {
    const spec = { ...llama70b(4096), layers: 32 };
    const src = kvPool(spec);
    const dst = kvPool(spec);
    const srcIds = new Uint32Array(Array.from({ length: 256 }, (_, i) => (i * 37 + 11) % 4096));
    const dstIds = new Uint32Array(Array.from({ length: 256 }, (_, i) => (i * 53 + 7) % 4096));
    const p = kvTransferPieces(src, dst, srcIds, dstIds);
    expect(p.pieces).toBe(16384);
    expect(p.bytes).toBe(16384 * src.tileBytes);
  });
});

describe('kvStridedPieces', () => {
  it('expands a strided list', () => {
    const p = kvStridedPieces({
      localStart: 100,
      localStride: 64,
      remoteStart: 7,
      remoteStride: 4096,
      count: 4,
      length: 32,
    });
    expect(Array.from(p.localOffsets)).toEqual([100, 164, 228, 292]);
    expect(Array.from(p.remoteOffsets)).toEqual([7, 4103, 8199, 12295]);
    expect(Array.from(p.lengths)).toEqual([32, 32, 32, 32]);
    expect(p).toMatchObject({ bytes: 128, pieces: 4 });
    expect(p.lengths).toBeInstanceOf(Float64Array);
    const big = kvStridedPieces({
      localStart: 0,
      localStride: 1 << 20,
      remoteStart: 0,
      remoteStride: 1 << 20,
      count: 16384,
      length: 4096,
    });
    expect(big.pieces).toBe(16384);
    expect(big.localOffsets[16383]).toBe(16383 * 2 ** 20);
  });

  it('validates its fields', () => {
    const ok = { localStart: 0, localStride: 8, remoteStart: 0, remoteStride: 8, count: 2, length: 8 };
    expectBad(() => kvStridedPieces({ ...ok, count: 0 }), /count must be a positive integer \(got 0\)/);
    expectBad(() => kvStridedPieces({ ...ok, length: 0 }), /length must be a positive integer \(got 0\)/);
    expectBad(() => kvStridedPieces({ ...ok, localStart: -8 }), /localStart must be a non-negative integer \(got -8\)/);
    expectBad(
      () => kvStridedPieces({ ...ok, remoteStride: 0.5 }),
      /remoteStride must be a non-negative integer \(got 0\.5\)/,
    );
    expectBad(() => kvStridedPieces({ ...ok, localStride: undefined as never }), /localStride .*\(got undefined\)/);
    expectBad(() => kvStridedPieces({ ...ok, remoteStart: 2 ** 53 }), /remoteStart/);
    expectBad(() => kvStridedPieces({ ...ok, localStride: 2 ** 52, count: 4 }), /past 2\^53/);
  });
});
