/**
 * Byte-range pieces for the transfer runtime: block-id lists between two KV pools, and strided lists.
 * See lib/kv/index.ts for the layouts.
 */
import { BadArgumentError } from '../errors.js';
import { asPool, checkInteger, type KvPool, type KvPoolSpec } from './pool.js';

/**
 * A list of byte-range copies: piece i moves `lengths[i]` bytes between `localOffsets[i]` and `remoteOffsets[i]`.
 * `bytes` is the sum of `lengths`; `pieces` the number of entries.
 */
export interface KvPieces {
  localOffsets: Float64Array;
  remoteOffsets: Float64Array;
  lengths: Float64Array;
  bytes: number;
  pieces: number;
}

/** A strided list: piece i is `length` bytes at localStart + i*localStride and remoteStart + i*remoteStride. */
export interface KvStridedSpec {
  localStart: number;
  localStride: number;
  remoteStart: number;
  remoteStride: number;
  count: number;
  length: number;
}

export type KvBlockIds = Uint32Array | number[];

const WHERE = 'kvTransferPieces';

/** The largest pool for which duplicate destination ids are found with a bitset rather than a Set. */
const BITSET_MAX_BLOCKS = 1 << 27;

function checkBlockList(name: string, list: unknown): KvBlockIds {
  if (!(list instanceof Uint32Array) && !Array.isArray(list)) {
    throw new BadArgumentError(`${WHERE}: ${name} must be a Uint32Array or an array of numbers`);
  }
  return list;
}

function copyIds(name: string, side: string, list: KvBlockIds, numBlocks: number): Uint32Array {
  const n = list.length;
  if (list instanceof Uint32Array) {
    for (let i = 0; i < n; i++) {
      const id = list[i]!;
      if (id >= numBlocks) {
        throw new BadArgumentError(
          `${WHERE}: ${name}[${i}] = ${id} is out of range for ${side} (numBlocks ${numBlocks})`,
        );
      }
    }
    return list;
  }
  const ids = new Uint32Array(n);
  for (let i = 0; i < n; i++) {
    const id: unknown = list[i];
    if (typeof id !== 'number' || !Number.isInteger(id) || id < 0) {
      throw new BadArgumentError(
        `${WHERE}: ${name}[${i}] must be a non-negative integer block id (got ${typeof id === 'number' ? id : typeof id})`,
      );
    }
    if (id >= numBlocks) {
      throw new BadArgumentError(
        `${WHERE}: ${name}[${i}] = ${id} is out of range for ${side} (numBlocks ${numBlocks})`,
      );
    }
    ids[i] = id;
  }
  return ids;
}

function checkNoDuplicates(ids: Uint32Array, numBlocks: number): void {
  const n = ids.length;
  if (n < 2) return;
  if (numBlocks <= BITSET_MAX_BLOCKS) {
    const seen = new Uint32Array((numBlocks + 31) >>> 5);
    for (let i = 0; i < n; i++) {
      const id = ids[i]!;
      const word = id >>> 5;
      const bit = 1 << (id & 31);
      if ((seen[word]! & bit) !== 0) throw duplicate(ids, i);
      seen[word] = seen[word]! | bit;
    }
  } else {
    const seen = new Set<number>();
    for (let i = 0; i < n; i++) {
      const id = ids[i]!;
      if (seen.has(id)) throw duplicate(ids, i);
      seen.add(id);
    }
  }
}

function duplicate(ids: Uint32Array, i: number): BadArgumentError {
  const id = ids[i]!;
  const first = ids.indexOf(id);
  return new BadArgumentError(
    `${WHERE}: duplicate destination block id ${id} (dstBlocks[${first}] and dstBlocks[${i}]); each destination block may be written once`,
  );
}

/** Pools of one model: the same model layers, kv heads, head dim, dtype and block size. */
const MODEL_FIELDS = ['modelLayers', 'headDim', 'dtype', 'blockSize', 'kvHeads'] as const;
/** Pools that also hold the same layers (a whole model's, or one pipeline stage's). */
const SAME_LAYERS_FIELDS = ['layers', 'layerStart', ...MODEL_FIELDS] as const;

function checkCompatible(
  s: KvPool,
  d: KvPool,
  sName = 'src',
  dName = 'dst',
  fields: readonly (keyof KvPool)[] = SAME_LAYERS_FIELDS,
): void {
  for (const field of fields) {
    if (s[field] !== d[field]) {
      throw new BadArgumentError(
        `${WHERE}: ${sName} and ${dName} disagree on ${field} (${sName} ${s[field]}, ${dName} ${d[field]})`,
      );
    }
  }
}

/** Accumulates pieces into preallocated arrays, merging a piece into the previous one when both sides continue it. */
class PieceBuilder {
  readonly local: Float64Array;
  readonly remote: Float64Array;
  readonly length: Float64Array;
  count = 0;
  bytes = 0;

  constructor(capacity: number) {
    this.local = new Float64Array(capacity);
    this.remote = new Float64Array(capacity);
    this.length = new Float64Array(capacity);
  }

  push(local: number, remote: number, length: number): void {
    this.bytes += length;
    const k = this.count;
    if (k > 0) {
      const last = this.length[k - 1]!;
      if (this.local[k - 1]! + last === local && this.remote[k - 1]! + last === remote) {
        this.length[k - 1] = last + length;
        return;
      }
    }
    this.local[k] = local;
    this.remote[k] = remote;
    this.length[k] = length;
    this.count = k + 1;
  }

  result(): KvPieces {
    const k = this.count;
    return {
      localOffsets: this.local.subarray(0, k),
      remoteOffsets: this.remote.subarray(0, k),
      lengths: this.length.subarray(0, k),
      bytes: this.bytes,
      pieces: k,
    };
  }
}

/**
 * The byte-range pieces that copy blocks `srcBlocks[i]` of `src` into blocks `dstBlocks[i]` of `dst`, for every
 * layer, K and V, and every head the two pools share. Offsets include each pool's baseOffset. `localOffsets` address
 * `src` and `remoteOffsets` address `dst` (a WRITE from src into dst; for a READ pass the pools the other way round).
 *
 * Pieces are generated block by block (layer by layer when both pools are layer-major, so that consecutive block
 * ids there merge too), and a piece is merged into the one before it when both its offsets continue that one.
 */
export function kvTransferPieces(
  src: KvPoolSpec | KvPool,
  dst: KvPoolSpec | KvPool,
  srcBlocks: KvBlockIds,
  dstBlocks: KvBlockIds,
): KvPieces {
  const s = asPool(src, `${WHERE}: src`);
  const d = asPool(dst, `${WHERE}: dst`);
  checkCompatible(s, d);
  const [sIds, dIds] = checkBlockLists(srcBlocks, dstBlocks);
  copyIds('srcBlocks', 'src', sIds, s.numBlocks);
  checkDestination(dIds, d.numBlocks);

  // The heads both pools hold.
  const lo = Math.max(s.headStart, d.headStart);
  const hi = Math.min(s.headStart + s.localHeads, d.headStart + d.localHeads);
  if (lo >= hi) {
    throw new BadArgumentError(
      `${WHERE}: src and dst share no KV heads (src tpSize ${s.tpSize} tpRank ${s.tpRank} holds heads [${s.headStart}, ${s.headStart + s.localHeads}), dst tpSize ${d.tpSize} tpRank ${d.tpRank} holds heads [${d.headStart}, ${d.headStart + d.localHeads})`,
    );
  }
  return headPieces(s, d, sIds, dIds, lo, hi, s.layerStart, s.layerStart + s.layers);
}

/** Both block lists as Uint32Arrays of equal length (ids not yet checked against a pool). */
function checkBlockLists(srcBlocks: KvBlockIds, dstBlocks: KvBlockIds): [Uint32Array, Uint32Array] {
  checkBlockList('srcBlocks', srcBlocks);
  checkBlockList('dstBlocks', dstBlocks);
  if (srcBlocks.length !== dstBlocks.length) {
    throw new BadArgumentError(
      `${WHERE}: srcBlocks and dstBlocks must have the same length (srcBlocks ${srcBlocks.length}, dstBlocks ${dstBlocks.length})`,
    );
  }
  return [copyIds('srcBlocks', 'src', srcBlocks, Infinity), copyIds('dstBlocks', 'dst', dstBlocks, Infinity)];
}

/** Destination ids in range, each once. */
function checkDestination(dIds: Uint32Array, numBlocks: number): void {
  copyIds('dstBlocks', 'dst', dIds, numBlocks);
  checkNoDuplicates(dIds, numBlocks);
}

/**
 * The pieces of heads [lo, hi) of model layers [layerLo, layerHi) (held by both pools) of blocks sIds[i] of s into
 * blocks dIds[i] of d.
 */
function headPieces(
  s: KvPool,
  d: KvPool,
  sIds: Uint32Array,
  dIds: Uint32Array,
  lo: number,
  hi: number,
  layerLo: number,
  layerHi: number,
): KvPieces {
  const overlap = hi - lo;
  const n = sIds.length;
  const tiles = (layerHi - layerLo) * 2;
  const blockSize = s.blockSize;
  const rowBytes = s.headDim * s.dtypeBytes; // one head of one token

  // Tile (layer*2+kv, block) of a pool starts at base + block*perBlock + lk*perTile.
  const sBase = s.baseOffset;
  const dBase = d.baseOffset;
  const sPerBlock = s.layout === 'block-major' ? s.blockBytes : s.tileBytes;
  const sPerTile = s.layout === 'block-major' ? s.tileBytes : s.numBlocks * s.tileBytes;
  const dPerBlock = d.layout === 'block-major' ? d.blockBytes : d.tileBytes;
  const dPerTile = d.layout === 'block-major' ? d.tileBytes : d.numBlocks * d.tileBytes;
  // Inside a tile, (token t, global head h) starts at t*perToken + (h - headStart)*perHead.
  const sPerToken = s.headLayout === 'NHD' ? s.localHeads * rowBytes : rowBytes;
  const sPerHead = s.headLayout === 'NHD' ? rowBytes : blockSize * rowBytes;
  const dPerToken = d.headLayout === 'NHD' ? d.localHeads * rowBytes : rowBytes;
  const dPerHead = d.headLayout === 'NHD' ? rowBytes : blockSize * rowBytes;
  // Each pool's first tile of the layers moved: (layer - layerStart) * 2.
  const sHead0 = (lo - s.headStart) * sPerHead + (layerLo - s.layerStart) * 2 * sPerTile;
  const dHead0 = (lo - d.headStart) * dPerHead + (layerLo - d.layerStart) * 2 * dPerTile;
  const sameLayers =
    s.layerStart === layerLo && d.layerStart === layerLo && s.layers === layerHi - layerLo && d.layers === s.layers;

  // Both pools hold exactly the heads moved.
  const sameHeads = s.headStart === lo && d.headStart === lo && s.localHeads === overlap && d.localHeads === overlap;
  const sameHeadLayout = s.headLayout === d.headLayout;

  // Whole blocks: one contiguous chunk on both sides.
  if (sameHeads && sameLayers && sameHeadLayout && s.layout === 'block-major' && d.layout === 'block-major') {
    const out = new PieceBuilder(n);
    const len = s.blockBytes;
    for (let i = 0; i < n; i++) out.push(sBase + sIds[i]! * len, dBase + dIds[i]! * len, len);
    return out.result();
  }

  // Each tile gives pieces at (sTile, dTile); `perTile` pieces per tile at most.
  let perTile: number;
  let emit: (out: PieceBuilder, sTile: number, dTile: number) => void;
  if (sameHeadLayout && (sameHeads || s.headLayout === 'HND')) {
    // Whole tiles, or the contiguous run of shared heads in an HND tile.
    perTile = 1;
    const len = overlap * blockSize * rowBytes;
    emit = (out, sTile, dTile) => out.push(sTile + sHead0, dTile + dHead0, len);
  } else if (s.headLayout === 'NHD' && d.headLayout === 'NHD') {
    // One row of shared heads per token.
    perTile = blockSize;
    const len = overlap * rowBytes;
    emit = (out, sTile, dTile) => {
      let so = sTile + sHead0;
      let dOff = dTile + dHead0;
      for (let t = 0; t < blockSize; t++, so += sPerToken, dOff += dPerToken) out.push(so, dOff, len);
    };
  } else {
    // Different head layouts: one head of one token at a time.
    perTile = blockSize * overlap;
    emit = (out, sTile, dTile) => {
      for (let t = 0; t < blockSize; t++) {
        let so = sTile + sHead0 + t * sPerToken;
        let dOff = dTile + dHead0 + t * dPerToken;
        for (let h = 0; h < overlap; h++, so += sPerHead, dOff += dPerHead) out.push(so, dOff, rowBytes);
      }
    };
  }

  const out = new PieceBuilder(n * tiles * perTile);
  if (s.layout === 'layer-major' && d.layout === 'layer-major') {
    for (let lk = 0; lk < tiles; lk++) {
      const sLk = sBase + lk * sPerTile;
      const dLk = dBase + lk * dPerTile;
      for (let i = 0; i < n; i++) emit(out, sLk + sIds[i]! * sPerBlock, dLk + dIds[i]! * dPerBlock);
    }
  } else {
    for (let i = 0; i < n; i++) {
      const sBlock = sBase + sIds[i]! * sPerBlock;
      const dBlock = dBase + dIds[i]! * dPerBlock;
      for (let lk = 0; lk < tiles; lk++) emit(out, sBlock + lk * sPerTile, dBlock + lk * dPerTile);
    }
  }
  return out.result();
}

/** Pieces between several regions: piece i goes from local region `localRegionIndex[i]` to remote `remoteRegionIndex[i]`. */
export interface KvRankPieces extends KvPieces {
  localRegionIndex: Uint32Array;
  remoteRegionIndex: Uint32Array;
}

const RANKS_WHERE = 'kvRankTransferPieces';

/** Whether pool `p` holds model layer `layer`. */
const holdsLayer = (p: KvPool, layer: number) => layer >= p.layerStart && layer < p.layerStart + p.layers;

/**
 * A rank list's pools, checked: at least one, the same model, and every kv head of every layer held by one of them
 * (pipeline stages' pools each hold their layers).
 */
function rankPools(side: 'src' | 'dst', list: readonly (KvPoolSpec | KvPool)[]): KvPool[] {
  if (!Array.isArray(list) || list.length === 0)
    throw new BadArgumentError(`${RANKS_WHERE}: ${side} must be a non-empty list of rank pools`);
  const pools = list.map((p, i) => asPool(p, `${RANKS_WHERE}: ${side}[${i}]`));
  for (let i = 1; i < pools.length; i++)
    checkCompatible(pools[0]!, pools[i]!, `${side}[0]`, `${side}[${i}]`, MODEL_FIELDS);
  for (let layer = 0; layer < pools[0]!.modelLayers; layer++) {
    const held = new Uint8Array(pools[0]!.kvHeads);
    const holders = pools.filter((p) => holdsLayer(p, layer));
    for (const p of holders) held.fill(1, p.headStart, p.headStart + p.localHeads);
    const missing = held.indexOf(0);
    if (missing >= 0)
      throw new BadArgumentError(
        `${RANKS_WHERE}: no ${side} rank pool holds kv head ${missing}` +
          `${pools[0]!.modelLayers > 1 && holders.length < pools.length ? ` of layer ${layer}` : ''} (${side} holds ` +
          `${holders.map((p) => `[${p.headStart}, ${p.headStart + p.localHeads})`).join(', ')} of ${held.length})`,
      );
  }
  return pools;
}

/**
 * The model layer where the next layer range of a list of pools starts after `layer`: within [layer, the result)
 * every pool holds every layer or none.
 */
function nextLayerBoundary(pools: readonly KvPool[], layer: number, end: number): number {
  let next = end;
  for (const p of pools) {
    if (p.layerStart > layer) next = Math.min(next, p.layerStart);
    if (holdsLayer(p, layer)) next = Math.min(next, p.layerStart + p.layers);
  }
  return next;
}

/**
 * The pieces that copy blocks `srcBlocks[i]` of an engine's KV into blocks `dstBlocks[i]` of another's, when each
 * engine keeps its KV in one pool per tensor-parallel rank (`src[r]`: rank r's pool, as registered in local region r;
 * `dst[r]` in remote region r), one per (pipeline stage, tensor-parallel rank) (each of its stage's layers:
 * `layerStart` / `layers`), or in one pool of every layer and head (a list of one). Every kv head of every destination rank
 * is written once, from the first source rank (in list order) that holds it: a head replicated over several source
 * ranks is read from one, a head replicated over several destination ranks lands in each. Both lists must be the same
 * model (model layers, kv heads, head dim, dtype, block size) and each must hold every kv head of every layer, each
 * layer from the first source pool holding it likewise; block ids are checked
 * against every pool, destination ids once each. With one pool on each side the result is kvTransferPieces' (and its
 * region indices all 0).
 *
 *   const p = kvRankTransferPieces([rank0, rank1], [whole], srcIds, dstIds);   // TP 2 -> TP 1
 *   agent.prepare({ op: 'WRITE', peer, local: [r0, r1], remote: [regionOfWhole], pieces: p });
 */
export function kvRankTransferPieces(
  src: readonly (KvPoolSpec | KvPool)[],
  dst: readonly (KvPoolSpec | KvPool)[],
  srcBlocks: KvBlockIds,
  dstBlocks: KvBlockIds,
): KvRankPieces {
  const s = rankPools('src', src);
  const d = rankPools('dst', dst);
  checkCompatible(s[0]!, d[0]!, 'src', 'dst', MODEL_FIELDS);
  const [sIds, dIds] = checkBlockLists(srcBlocks, dstBlocks);
  for (const p of s) copyIds('srcBlocks', 'src', sIds, p.numBlocks);
  for (const p of d) checkDestination(dIds, p.numBlocks);
  const parts: { pieces: KvPieces; from: number; to: number }[] = [];
  d.forEach((dp, to) => {
    const end = dp.headStart + dp.localHeads;
    const layerEnd = dp.layerStart + dp.layers;
    for (let layer = dp.layerStart; layer < layerEnd;) {
      const layerHi = nextLayerBoundary(s, layer, layerEnd);
      for (let head = dp.headStart; head < end;) {
        const from = s.findIndex(
          (sp) => holdsLayer(sp, layer) && head >= sp.headStart && head < sp.headStart + sp.localHeads,
        );
        const hi = Math.min(end, s[from]!.headStart + s[from]!.localHeads);
        parts.push({ pieces: headPieces(s[from]!, dp, sIds, dIds, head, hi, layer, layerHi), from, to });
        head = hi;
      }
      layer = layerHi;
    }
  });
  const count = parts.reduce((n, p) => n + p.pieces.pieces, 0);
  const out: KvRankPieces = {
    localOffsets: new Float64Array(count),
    remoteOffsets: new Float64Array(count),
    lengths: new Float64Array(count),
    localRegionIndex: new Uint32Array(count),
    remoteRegionIndex: new Uint32Array(count),
    bytes: 0,
    pieces: count,
  };
  let at = 0;
  for (const { pieces, from, to } of parts) {
    out.localOffsets.set(pieces.localOffsets, at);
    out.remoteOffsets.set(pieces.remoteOffsets, at);
    out.lengths.set(pieces.lengths, at);
    out.localRegionIndex.fill(from, at, at + pieces.pieces);
    out.remoteRegionIndex.fill(to, at, at + pieces.pieces);
    out.bytes += pieces.bytes;
    at += pieces.pieces;
  }
  return out;
}

/**
 * Expands a strided list into pieces: piece i is `length` bytes at localStart + i*localStride (local) and
 * remoteStart + i*remoteStride (remote). Pieces are not merged, so `pieces === count`.
 */
export function kvStridedPieces(spec: KvStridedSpec): KvPieces {
  const where = 'kvStridedPieces';
  if (typeof spec !== 'object' || spec === null) {
    throw new BadArgumentError(`${where}: the argument must be an object`);
  }
  const localStart = checkInteger(where, 'localStart', spec.localStart, 0);
  const localStride = checkInteger(where, 'localStride', spec.localStride, 0);
  const remoteStart = checkInteger(where, 'remoteStart', spec.remoteStart, 0);
  const remoteStride = checkInteger(where, 'remoteStride', spec.remoteStride, 0);
  const count = checkInteger(where, 'count', spec.count, 1);
  const length = checkInteger(where, 'length', spec.length, 1);
  const lastLocal = localStart + (count - 1) * localStride + length;
  const lastRemote = remoteStart + (count - 1) * remoteStride + length;
  const bytes = count * length;
  if (!Number.isSafeInteger(lastLocal) || !Number.isSafeInteger(lastRemote) || !Number.isSafeInteger(bytes)) {
    throw new BadArgumentError(`${where}: the pieces run past 2^53 - 1 bytes (count ${count}, length ${length})`);
  }
  const localOffsets = new Float64Array(count);
  const remoteOffsets = new Float64Array(count);
  const lengths = new Float64Array(count).fill(length);
  for (let i = 0, l = localStart, r = remoteStart; i < count; i++, l += localStride, r += remoteStride) {
    localOffsets[i] = l;
    remoteOffsets[i] = r;
  }
  return { localOffsets, remoteOffsets, lengths, bytes, pieces: count };
}
