/**
 * Tensor parallelism of the GPU engine (issue 25): which part of the model each CudaLlama rank holds, checked
 * before any GPU memory is taken. The split is lib/engine/parallel.ts's (tensorShard, the CPU ranks' too), which
 * native/src/engine/cuda_llama_tp.cpp's tpShardOf mirrors:
 *
 * - rank r of tp holds q heads [r * H/tp, (r+1) * H/tp) (o_proj's columns likewise);
 * - kv heads [r * KVH/tp, (r+1) * KVH/tp) when tp divides KVH; else (tp a multiple of KVH) the one kv head
 *   floor(r * KVH / tp), replicated on tp / KVH ranks, each writing it to its own KV pool;
 * - intermediate channels [r * I/tp, (r+1) * I/tp) (gate/up rows, down_proj columns);
 * - vocabulary rows [r * ceil(V/tp), min(V, (r+1) * ceil(V/tp))) of the embedding and lm_head;
 * - norms and o_proj's bias whole.
 *
 * Manifest shard rules (model/manifest.ts): `column` and `vocab` tensors are cut along rows, `row` tensors along
 * columns, `replicated` ones not at all.
 *
 *   checkCudaTensorParallel(config, 2, 'CudaModelRunner.create');   // ParallelLayoutError when it does not fit
 *   const { rows, cols } = tensorSlice(config, 2, 1, tensor);         // rank 1's part of a [out, in] tensor
 */
import { BadArgumentError, ParallelLayoutError } from '../errors.js';
import type { DeviceBuffer } from '../cuda/index.js';
import type { KvLayout, KvPool } from '../kv/pool.js';
import { libraryCandidates } from '../native/libraries.js';
import { nativeModelFields } from './cpu.js';
import type { ModelConfig } from './model/config.js';
import { weightManifest, type ManifestTensor } from './model/manifest.js';
import { checkParallelConfig, tensorShard, type IndexRange } from './parallel.js';

/** The most ranks one runner group takes, on one GPU or on several (LocalTpGroup::kMaxRanks). */
export const MAX_LOCAL_TP_RANKS = 8;

/**
 * The options every native CudaLlama shares, whether it is a whole model, a tensor-parallel rank or a pipeline
 * stage's rank: the model's fields, its KV pool's geometry and buffer, the cuBLAS libraries to load and CUDA graphs.
 */
export function cudaLlamaFields(
  config: ModelConfig,
  pool: KvPool,
  layout: KvLayout,
  kvBuffer: DeviceBuffer,
  cudaGraphs: boolean | undefined,
) {
  const libraries = libraryCandidates();
  return {
    ...nativeModelFields(config),
    numBlocks: pool.numBlocks,
    blockSize: pool.blockSize,
    layout,
    kvBuffer: kvBuffer.raw,
    cublas: libraries.cublas,
    cublasLt: libraries.cublasLt,
    cudaGraphs: cudaGraphs ?? true,
  };
}

/**
 * Throws ParallelLayoutError unless `tp` ranks fit the model on the GPU engine: an integer 1..MAX_LOCAL_TP_RANKS
 * that divides the attention heads and the intermediate size, and divides the kv heads or is a multiple of them.
 */
export function checkCudaTensorParallel(config: ModelConfig, tp: unknown, where: string): number {
  if (typeof tp === 'number' && Number.isInteger(tp) && tp > MAX_LOCAL_TP_RANKS)
    throw new ParallelLayoutError(
      `${where}: tensor parallel size ${tp} is more than the ${MAX_LOCAL_TP_RANKS} ranks the GPU engine runs`,
    );
  return checkParallelConfig(config, { tp: tp as number }, where).tp;
}

/** How a runner group's ranks exchange partial results: 'local' (every rank on one GPU) or 'nccl' (one GPU each). */
export type TpCommunicatorKind = 'local' | 'nccl';

/** Where each tensor-parallel rank runs (its device ordinal) and the communicator between the ranks. */
export interface TpPlacement {
  ordinals: number[];
  communicator: TpCommunicatorKind;
}

/**
 * The device ordinal of each rank (`devices`, one per rank, or `device` for all) and the communicator: 'local' when
 * every rank is on one GPU, 'nccl' when each has its own (the default follows the ordinals; `communicator` forces
 * one, so a single rank can run through NCCL). Throws ParallelLayoutError for a layout neither runs (ranks on
 * several GPUs with 'local', two ranks on one GPU with 'nccl', some ranks sharing a GPU and some not) and
 * BadArgumentError for a communicator that is neither. Pure: nothing is opened.
 */
export function tpPlacement(
  tp: number,
  device: number,
  devices: readonly number[] | undefined,
  communicator: unknown,
  where: string,
): TpPlacement {
  const ordinals = [...(devices ?? Array<number>(tp).fill(device))];
  if (ordinals.length !== tp)
    throw new ParallelLayoutError(`${where}: ${ordinals.length} devices for ${tp} tensor-parallel ranks`);
  for (const d of ordinals)
    if (!Number.isInteger(d) || d < 0)
      throw new ParallelLayoutError(`${where}: device ordinals must be non-negative integers (got ${String(d)})`);
  if (communicator !== undefined && communicator !== 'local' && communicator !== 'nccl')
    throw new BadArgumentError(
      `${where}: communicator must be 'local' or 'nccl' (got ${JSON.stringify(communicator)})`,
    );
  const distinct = new Set(ordinals).size;
  const list = ordinals.join(', ');
  if (communicator === 'local' && distinct > 1)
    throw new ParallelLayoutError(
      `${where}: the local communicator runs every rank on one GPU; ranks on GPUs ${list} need communicator 'nccl' ` +
        `(the default when every rank has its own GPU)`,
    );
  if (communicator === 'nccl' && distinct < ordinals.length)
    throw new ParallelLayoutError(
      `${where}: NCCL runs one tensor-parallel rank per GPU, and ranks share a GPU here (${list}); give each rank ` +
        `its own GPU, or put every rank on one GPU with communicator 'local'`,
    );
  if (distinct > 1 && distinct < ordinals.length)
    throw new ParallelLayoutError(
      `${where}: some tensor-parallel ranks share a GPU and others do not (${list}); give each rank its own GPU ` +
        `(NCCL) or every rank the same one (the local communicator)`,
    );
  return {
    ordinals,
    communicator: (communicator as TpCommunicatorKind | undefined) ?? (distinct > 1 ? 'nccl' : 'local'),
  };
}

/** Throws ParallelLayoutError unless every ordinal names a GPU of this host (`deviceCount` of them). */
export function checkTpDevicesPresent(ordinals: readonly number[], deviceCount: number, where: string): void {
  const missing = ordinals.filter((d) => d >= deviceCount);
  if (missing.length > 0)
    throw new ParallelLayoutError(
      `${where}: tensor-parallel ranks on GPUs ${ordinals.join(', ')}, but this host has ${deviceCount} ` +
        `GPU${deviceCount === 1 ? '' : 's'} (ordinals 0..${deviceCount - 1}); GPU ${missing[0]} is not there (every ` +
        `rank on one GPU: the same ordinal for all, a graph pool's gpusPerReplica: 1)`,
    );
}

/** bf16 bytes of rank `rank`'s weights: its slice of every manifest tensor (replicated tensors whole). */
export function rankWeightBytes(config: ModelConfig, tp: number, rank: number): number {
  let elements = 0;
  for (const t of weightManifest(config)) {
    const { rows, cols } = tensorSlice(config, tp, rank, t);
    elements += rows.count * cols.count;
  }
  return elements * 2;
}

/** One rank's share of a GPU when sizing the KV pools from free memory. */
export interface RankMemory {
  /** The rank's GPU and that GPU's free bytes (ranks on one GPU see the same figure). */
  ordinal: number;
  freeBytes: number;
  weightBytes: number;
  /** Bytes of one block of the rank's KV pool (its kv heads). */
  blockBytes: number;
}

/**
 * The KV blocks every rank's pool can have (each rank holds numBlocks blocks of its kv heads): per GPU, its free
 * bytes less the weights of the ranks on it and `reserveBytes` for each of them, times `fraction`, over the bytes
 * of one block of each of them; the least over the GPUs, and the GPU that sets it.
 */
export function kvBlocksFromFreeMemory(
  ranks: readonly RankMemory[],
  reserveBytes: number,
  fraction: number,
): { numBlocks: number; ordinal: number; freeBytes: number; weightBytes: number } {
  const gpus = new Map<number, { freeBytes: number; weightBytes: number; blockBytes: number; ranks: number }>();
  for (const r of ranks) {
    const g = gpus.get(r.ordinal) ?? { freeBytes: r.freeBytes, weightBytes: 0, blockBytes: 0, ranks: 0 };
    g.weightBytes += r.weightBytes;
    g.blockBytes += r.blockBytes;
    g.ranks += 1;
    gpus.set(r.ordinal, g);
  }
  let best = { numBlocks: Infinity, ordinal: -1, freeBytes: 0, weightBytes: 0 };
  for (const [ordinal, g] of gpus) {
    const numBlocks = Math.floor(((g.freeBytes - g.weightBytes - g.ranks * reserveBytes) * fraction) / g.blockBytes);
    if (numBlocks < best.numBlocks) best = { numBlocks, ordinal, freeBytes: g.freeBytes, weightBytes: g.weightBytes };
  }
  return best;
}

/**
 * Rank `rank`'s part of a manifest tensor seen as a [rows, cols] matrix (a 1-D tensor of n is [1, n]): the rows and
 * the columns it holds. The whole tensor for `replicated` tensors and for one rank.
 */
export function tensorSlice(
  config: ModelConfig,
  tp: number,
  rank: number,
  tensor: Pick<ManifestTensor, 'name' | 'shape' | 'role'>,
): { rows: IndexRange; cols: IndexRange; fullRows: number; fullCols: number } {
  const oneD = tensor.shape.length === 1;
  const fullRows = oneD ? 1 : tensor.shape[0]!;
  const fullCols = oneD ? tensor.shape[0]! : tensor.shape[1]!;
  const all = { rows: { start: 0, count: fullRows }, cols: { start: 0, count: fullCols }, fullRows, fullCols };
  if (tp === 1) return all;
  const s = tensorShard(config, tp, rank);
  const d = config.headDim;
  const byHead = (r: IndexRange): IndexRange => ({ start: r.start * d, count: r.count * d });
  // Along a 2-D tensor's rows, or along a bias's only dimension.
  const cut = (range: IndexRange) => (oneD ? { ...all, cols: range } : { ...all, rows: range });
  switch (tensor.role) {
    case 'q':
    case 'q_bias':
      return cut(byHead(s.heads));
    case 'k':
    case 'k_bias':
    case 'v':
    case 'v_bias':
      return cut(byHead(s.kvHeads));
    case 'gate':
    case 'up':
      return cut(s.intermediate);
    case 'embed':
    case 'lm_head':
      return cut(s.vocab);
    case 'o':
      return { ...all, cols: byHead(s.heads) };
    case 'down':
      return { ...all, cols: s.intermediate };
    case 'input_norm':
    case 'post_norm':
    case 'final_norm':
    case 'o_bias':
    case 'q_norm':
    case 'k_norm':
      return all;
    case 'router':
    case 'expert_gate':
    case 'expert_up':
    case 'expert_down':
      // Whole: with several GPU ranks an MoE model's experts are split over them (ep = tp), each rank holding its
      // experts whole (CudaModelRunner skips the experts a rank does not hold), and the router is on every rank.
      return all;
    case 'shared_gate':
    case 'shared_up':
    case 'shared_down':
    case 'shared_expert_gate':
      throw new ParallelLayoutError(
        `${tensor.name}: the GPU engine runs no shared expert (Qwen2-MoE) on several ranks; use the CPU engine's ranks`,
      );
  }
}

/** Rank `rank`'s part of a whole float32 tensor (row-major), as tensorSlice cuts it; the tensor itself when whole. */
export function sliceHostTensor(
  config: ModelConfig,
  tp: number,
  rank: number,
  tensor: Pick<ManifestTensor, 'name' | 'shape' | 'role'>,
  data: Float32Array,
): Float32Array {
  const { rows, cols, fullRows, fullCols } = tensorSlice(config, tp, rank, tensor);
  if (data.length !== fullRows * fullCols)
    throw new ParallelLayoutError(
      `tensor "${tensor.name}" has ${data.length} values; its shape ${JSON.stringify(tensor.shape)} needs ${fullRows * fullCols}`,
    );
  if (rows.count === fullRows && cols.count === fullCols) return data;
  if (cols.count === fullCols) return data.subarray(rows.start * fullCols, (rows.start + rows.count) * fullCols);
  const out = new Float32Array(rows.count * cols.count);
  for (let r = 0; r < rows.count; r++) {
    const from = (rows.start + r) * fullCols + cols.start;
    out.set(data.subarray(from, from + cols.count), r * cols.count);
  }
  return out;
}
