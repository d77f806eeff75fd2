/**
 * KV-cache pool description: shape, byte layout and tensor-parallel head slice of one pool.
 * See lib/kv/index.ts for the layouts.
 */
import { BadArgumentError } from '../errors.js';

export type KvDtype = 'bf16' | 'fp16' | 'fp32' | 'fp8' | 'int8';
export type KvLayout = 'block-major' | 'layer-major';
export type KvHeadLayout = 'NHD' | 'HND';

/** Bytes per element of each KV dtype. */
export const KV_DTYPE_BYTES: Readonly<Record<KvDtype, number>> = Object.freeze({
  bf16: 2,
  fp16: 2,
  fp32: 4,
  fp8: 1,
  int8: 1,
});

const LAYOUTS: readonly KvLayout[] = ['block-major', 'layer-major'];
const HEAD_LAYOUTS: readonly KvHeadLayout[] = ['NHD', 'HND'];

/** What a caller says about a pool; `kvPool()` fills the defaults and checks it. */
export interface KvPoolSpec {
  /** Transformer layers this pool holds (all of the model's, unless a pipeline stage's: see layerStart). */
  layers: number;
  /**
   * First model layer this pool holds: a pipeline stage's pool holds layers [layerStart, layerStart + layers) of
   * the model's `modelLayers` (lib/engine/parallel.ts's stageLayers). Default 0.
   */
  layerStart?: number;
  /** Layers of the whole model. Default layerStart + layers. */
  modelLayers?: number;
  /** Total KV heads of the model (all TP ranks together). */
  kvHeads: number;
  /** Elements per head. */
  headDim: number;
  /** Tokens per block. Default 16. */
  blockSize?: number;
  /** Blocks in this pool. */
  numBlocks: number;
  dtype: KvDtype;
  layout: KvLayout;
  /** Order inside one (layer, K-or-V, block) tile. Default 'NHD'. */
  headLayout?: KvHeadLayout;
  /**
   * Tensor-parallel size. Default 1. It divides kvHeads, or is a multiple of them: then rank r holds the one head
   * floor(r * kvHeads / tpSize), replicated on tpSize / kvHeads ranks (the engines' split, lib/engine/parallel.ts).
   */
  tpSize?: number;
  /** Tensor-parallel rank of this pool. Default 0. */
  tpRank?: number;
  /** Added to every byte offset in the pool. Default 0. */
  baseOffset?: number;
}

/** A checked, frozen pool description with its computed sizes. Made by `kvPool()`. */
export interface KvPool extends Readonly<Required<KvPoolSpec>> {
  /** Bytes per element. */
  readonly dtypeBytes: number;
  /** Heads held by this pool: kvHeads / tpSize (1 when tpSize is a multiple of kvHeads: a replicated head). */
  readonly localHeads: number;
  /** First (global) head held by this pool: tpRank * localHeads (floor(tpRank * kvHeads / tpSize) when replicated). */
  readonly headStart: number;
  /** Bytes of one (layer, K-or-V, block) tile: blockSize * localHeads * headDim * dtypeBytes. */
  readonly tileBytes: number;
  /** Bytes of one block over the pool's layers, K and V: layers * 2 * tileBytes. */
  readonly blockBytes: number;
  /** Bytes of the whole pool (not counting baseOffset): numBlocks * blockBytes. */
  readonly poolBytes: number;
}

const made = new WeakSet<object>();

function describe(value: unknown): string {
  if (typeof value === 'string') return JSON.stringify(value);
  if (typeof value === 'number' || typeof value === 'boolean' || typeof value === 'bigint') return String(value);
  if (value === undefined) return 'undefined';
  if (value === null) return 'null';
  if (Array.isArray(value)) return 'an array';
  return `a ${typeof value}`;
}

/** Throws unless `value` is a safe integer >= `min`. */
export function checkInteger(where: string, field: string, value: unknown, min: number): number {
  if (typeof value !== 'number' || !Number.isSafeInteger(value) || value < min) {
    const what = min === 0 ? 'a non-negative integer' : min === 1 ? 'a positive integer' : `an integer >= ${min}`;
    throw new BadArgumentError(`${where}: ${field} must be ${what} (got ${describe(value)})`);
  }
  return value;
}

function checkChoice<T extends string>(where: string, field: string, value: unknown, choices: readonly T[]): T {
  if (typeof value !== 'string' || !(choices as readonly string[]).includes(value)) {
    throw new BadArgumentError(`${where}: ${field} must be one of ${choices.join(', ')} (got ${describe(value)})`);
  }
  return value as T;
}

/** Normalizes and checks a spec; `where` prefixes error messages. */
export function normalizePool(spec: KvPoolSpec, where: string): KvPool {
  if (typeof spec !== 'object' || spec === null || Array.isArray(spec)) {
    throw new BadArgumentError(`${where}: the pool spec must be an object (got ${describe(spec)})`);
  }
  const layers = checkInteger(where, 'layers', spec.layers, 1);
  const kvHeads = checkInteger(where, 'kvHeads', spec.kvHeads, 1);
  const headDim = checkInteger(where, 'headDim', spec.headDim, 1);
  const blockSize = checkInteger(where, 'blockSize', spec.blockSize ?? 16, 1);
  const numBlocks = checkInteger(where, 'numBlocks', spec.numBlocks, 1);
  const dtype = checkChoice(where, 'dtype', spec.dtype, Object.keys(KV_DTYPE_BYTES) as KvDtype[]);
  const layout = checkChoice(where, 'layout', spec.layout, LAYOUTS);
  const headLayout = checkChoice(where, 'headLayout', spec.headLayout ?? 'NHD', HEAD_LAYOUTS);
  const tpSize = checkInteger(where, 'tpSize', spec.tpSize ?? 1, 1);
  const tpRank = checkInteger(where, 'tpRank', spec.tpRank ?? 0, 0);
  const baseOffset = checkInteger(where, 'baseOffset', spec.baseOffset ?? 0, 0);
  const layerStart = checkInteger(where, 'layerStart', spec.layerStart ?? 0, 0);
  const modelLayers = checkInteger(where, 'modelLayers', spec.modelLayers ?? layerStart + layers, 1);
  if (layerStart + layers > modelLayers) {
    throw new BadArgumentError(
      `${where}: layers [${layerStart}, ${layerStart + layers}) run past the model's ${modelLayers} (modelLayers)`,
    );
  }
  if (tpRank >= tpSize) {
    throw new BadArgumentError(`${where}: tpRank must be less than tpSize ${tpSize} (got ${tpRank})`);
  }
  if (kvHeads % tpSize !== 0 && tpSize % kvHeads !== 0) {
    throw new BadArgumentError(
      `${where}: kvHeads ${kvHeads} must be divisible by tpSize, or tpSize a multiple of kvHeads (got tpSize ${tpSize})`,
    );
  }
  const dtypeBytes = KV_DTYPE_BYTES[dtype];
  // More ranks than heads: each rank holds one head, replicated on tpSize / kvHeads ranks (lib/engine/parallel.ts).
  const localHeads = kvHeads >= tpSize ? kvHeads / tpSize : 1;
  const headStart = kvHeads >= tpSize ? tpRank * localHeads : Math.floor((tpRank * kvHeads) / tpSize);
  const tileBytes = blockSize * localHeads * headDim * dtypeBytes;
  const blockBytes = layers * 2 * tileBytes;
  const poolBytes = numBlocks * blockBytes;
  if (!Number.isSafeInteger(poolBytes) || !Number.isSafeInteger(poolBytes + baseOffset)) {
    throw new BadArgumentError(
      `${where}: the pool is too large to address exactly (numBlocks ${numBlocks} * blockBytes ${blockBytes} + baseOffset ${baseOffset} > 2^53 - 1)`,
    );
  }
  const pool: KvPool = Object.freeze({
    layers,
    layerStart,
    modelLayers,
    kvHeads,
    headDim,
    blockSize,
    numBlocks,
    dtype,
    layout,
    headLayout,
    tpSize,
    tpRank,
    baseOffset,
    dtypeBytes,
    localHeads,
    headStart,
    tileBytes,
    blockBytes,
    poolBytes,
  });
  made.add(pool);
  return pool;
}

/** Fills the defaults of `spec`, checks it, and returns the frozen pool with its computed sizes. */
export function kvPool(spec: KvPoolSpec): KvPool {
  return normalizePool(spec, 'kvPool');
}

/** `pool` itself when `kvPool()` made it, otherwise the checked form of the spec. */
export function asPool(pool: KvPoolSpec | KvPool, where: string): KvPool {
  return typeof pool === 'object' && pool !== null && made.has(pool) ? (pool as KvPool) : normalizePool(pool, where);
}

/** Byte offset (baseOffset included) of the (layer, K=0 / V=1) tile of block `blockId`; `layer` counts from the pool's first (layerStart). */
export function kvBlockOffset(pool: KvPoolSpec | KvPool, blockId: number, layer: number, kv: 0 | 1): number {
  const where = 'kvBlockOffset';
  const p = asPool(pool, `${where}: pool`);
  checkInteger(where, 'blockId', blockId, 0);
  checkInteger(where, 'layer', layer, 0);
  if (blockId >= p.numBlocks) {
    throw new BadArgumentError(`${where}: blockId ${blockId} is out of range (numBlocks ${p.numBlocks})`);
  }
  if (layer >= p.layers) {
    throw new BadArgumentError(`${where}: layer ${layer} is out of range (layers ${p.layers})`);
  }
  if (kv !== 0 && kv !== 1) {
    throw new BadArgumentError(`${where}: kv must be 0 (K) or 1 (V) (got ${describe(kv)})`);
  }
  const lk = layer * 2 + kv;
  return p.layout === 'block-major'
    ? p.baseOffset + blockId * p.blockBytes + lk * p.tileBytes
    : p.baseOffset + (lk * p.numBlocks + blockId) * p.tileBytes;
}
