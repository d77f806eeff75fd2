/**
 * KV-cache pools and the byte-range pieces that move blocks between them.
 *
 * A pool is one contiguous memory region (starting at `baseOffset`, default 0) holding `numBlocks` blocks of
 * `blockSize` tokens for every layer, K and V. Its smallest unit is a tile: one (layer, K-or-V, block), of
 * `tileBytes = blockSize * localHeads * headDim * dtypeBytes` bytes, where a pool of tensor-parallel rank `tpRank`
 * of `tpSize` holds the `localHeads = kvHeads / tpSize` heads [tpRank * localHeads, (tpRank + 1) * localHeads).
 *
 *   layout 'block-major':  [numBlocks][layers][2: K, V][tile]   one block = one contiguous chunk of layers*2 tiles
 *   layout 'layer-major':  [layers][2: K, V][numBlocks][tile]   one block = layers*2 separate tiles (vLLM-like
 *                                                              per-layer K and V caches in one region)
 *
 *   headLayout 'NHD' (default):  tile = [blockSize tokens][localHeads][headDim]
 *   headLayout 'HND':            tile = [localHeads][blockSize tokens][headDim]
 *
 * `kvTransferPieces(src, dst, srcBlocks, dstBlocks)` turns "blocks srcBlocks[i] of src go to blocks dstBlocks[i] of
 * dst" into pieces (local = src offset, remote = dst offset, length): whole blocks when both pools are block-major
 * with the same heads, whole tiles when the layouts differ, and, when the TP sizes differ, only the heads both
 * pools hold: one piece per (layer, K-or-V, token) with NHD, one per tile with HND. Pieces that continue each
 * other on both sides are merged.
 *
 * An engine whose tensor-parallel ranks each keep their own pool (the GPU engine: rank r's pool holds its kv heads,
 * `tpSize` / `tpRank` set, one head per rank when there are more ranks than heads) is a list of rank pools, each in
 * its own memory region; an engine whose ranks share one pool (the CPU engine) is a list of one. `kvRankTransferPieces
 * (srcRanks, dstRanks, srcBlocks, dstBlocks)` maps head slices between two such lists (TP 2 -> TP 1, TP 1 -> TP 2,
 * ...): each destination rank gets each of its heads once, from the first source rank holding it, and every piece
 * names its local and remote region (the rank's index in its list), as the transfer agent's PieceList takes them.
 *
 * Block hashing (hash.ts): the chained 64-bit hashes that name full blocks, one definition for the engine's prefix
 * cache and the router's prefix index.
 */
export { KV_DTYPE_BYTES, kvBlockOffset, kvPool } from './pool.js';
export type { KvDtype, KvHeadLayout, KvLayout, KvPool, KvPoolSpec } from './pool.js';
export { kvRankTransferPieces, kvStridedPieces, kvTransferPieces } from './pieces.js';
export type { KvBlockIds, KvPieces, KvRankPieces, KvStridedSpec } from './pieces.js';
export { hashLanesOf, kvBlockHash, kvBlockHashes, kvBlockHashLanes } from './hash.js';
export { KV_EVENT_REMOVED, KV_EVENT_STORED, KvEventPublisher, newIncarnation } from './events.js';
export type { KvEventBatch, KvHashEvent, KvSnapshot } from './events.js';
