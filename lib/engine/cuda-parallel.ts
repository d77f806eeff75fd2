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
import { ParallelLayoutError } from '../errors.js';
import type { ModelConfig } from './model/config.js';
import type { ManifestTensor } from './model/manifest.js';
import { checkParallelConfig, tensorShard, type IndexRange } from './parallel.js';

/** The most ranks one local (single-device) communicator group takes (LocalTpGroup::kMaxRanks). */
export const MAX_LOCAL_TP_RANKS = 8;

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

/**
 * The device ordinal of each rank: `devices` (one per rank) or `device` for all. Ranks run on one device today
 * (the local communicator); ranks on several devices need the NCCL communicator, not written yet: a
 * ParallelLayoutError says so (and how to put the ranks on one GPU).
 */
export function tpDeviceOrdinals(tp: number, device: number, devices: readonly number[] | undefined, where: string) {
  const ordinals = devices ?? Array<number>(tp).fill(device);
  if (ordinals.length !== tp)
    throw new ParallelLayoutError(`${where}: ${ordinals.length} devices for ${tp} tensor-parallel ranks`);
  for (const d of ordinals)
    if (!Number.isInteger(d) || d < 0)
      throw new ParallelLayoutError(`${where}: device ordinals must be non-negative integers (got ${String(d)})`);
  if (new Set(ordinals).size > 1)
    throw new ParallelLayoutError(
      `${where}: tensor-parallel ranks on several GPUs (${ordinals.join(', ')}) need the NCCL communicator, which ` +
        `the GPU engine does not have yet; put every rank on one GPU (the local communicator: a graph pool's ` +
        `gpusPerReplica: 1)`,
    );
  return ordinals;
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
