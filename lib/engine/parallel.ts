/**
 * Tensor, pipeline and expert parallel layouts (issues 25, 28): which part of the model each rank holds. One
 * engine instance runs group x pp ranks, group = max(tp, ep); rank `stage * group + groupRank` holds its part of
 * the layers of pipeline stage `stage`. The arithmetic here is the one the CPU runner group
 * (native/src/engine/cpu_parallel.h) and the GPU runners follow; each tensor's slice is cut by its manifest shard
 * rule (model/manifest.ts):
 *
 * - `column` (dim 0): q rows by attention head (head-major: head * headDim), k/v rows by kv head, gate/up rows and
 *   q/k/v biases likewise;
 * - `row` (dim 1): o_proj columns by attention head, down_proj columns by intermediate channel;
 * - `vocab` (dim 0): embedding and lm_head rows in ceil(vocab / tp) parts (the last rank may hold fewer);
 * - `replicated`: the whole tensor (norms, Qwen3's q_norm / k_norm, the MoE router);
 * - `expert`: an expert's gate / up / down, on the ranks its expert is placed on and, among the ranks that share
 *   an expert, split like the dense gate / up (rows) and down (columns) by moe intermediate channel;
 * - `shared_expert` (Qwen2-MoE): the shared expert's gate / up / down, split like the dense ones by its own
 *   channels over the tensor-parallel ranks (ep 1), whole on every rank under expert parallelism.
 *
 * Mixture-of-experts models (the Megatron / vLLM convention: the expert-parallel ranks are the tensor-parallel
 * ranks of a stage):
 * - ep 1: every rank holds every expert, tensor-parallel (moe intermediate / tp channels each); the router whole;
 * - ep > 1: rank i of the group holds experts [i * E / ep, (i + 1) * E / ep) whole; attention, the embedding and
 *   lm_head are tensor-parallel over the same ranks (tp = ep) or replicated on each (tp 1). Tokens need no
 *   dispatch on CPU ranks (each rank has every token's activations); each rank runs its experts over the tokens
 *   routed to them and the combine is a sum over the group in rank order, so results do not depend on timing.
 *
 * KV heads are split when tp divides them; when kvHeads < tp (tp a multiple of kvHeads) they are replicated:
 * rank r holds kv head floor(r * kvHeads / tp), and the first rank holding a head writes it to the KV pool.
 *
 *   const parallel = checkParallelConfig(config, { tp: 2, pp: 2 });   // ParallelLayoutError when it does not fit
 *   const slice = sliceTensor(config, parallel.tp, rank, tensor, data);
 */
import { ParallelLayoutError } from '../errors.js';
import type { ModelConfig } from './model/config.js';
import type { ManifestTensor } from './model/manifest.js';

/**
 * Tensor parallel size (ranks that split every layer), pipeline parallel size (stages of layers) and expert
 * parallel size (ranks that split an MoE model's experts; they are the tensor-parallel ranks, so tp is 1 or ep).
 */
export interface ParallelConfig {
  tp: number;
  pp: number;
  ep: number;
}

/** One rank, no parallelism. */
export const SINGLE_RANK: Readonly<ParallelConfig> = Object.freeze({ tp: 1, pp: 1, ep: 1 });

/** Ranks of one pipeline stage: max(tp, ep). */
export const groupSize = (p: Pick<ParallelConfig, 'tp' | 'ep'>): number => Math.max(p.tp, p.ep);
/** Ranks of the whole layout: groupSize x pp. */
export const rankCount = (p: ParallelConfig): number => groupSize(p) * p.pp;

/** A half-open range [start, start + count) of heads, channels, rows or layers. */
export interface IndexRange {
  start: number;
  count: number;
}

/** What tensor-parallel rank `rank` of `size` holds of every layer and of the vocabulary. */
export interface TensorShard {
  rank: number;
  size: number;
  /** Attention (query) heads. */
  heads: IndexRange;
  /** KV heads (one replicated head when kvHeads < size). */
  kvHeads: IndexRange;
  /** Whether this rank writes its kv heads to the KV pool (false for a replica of a head another rank owns). */
  writesKv: boolean;
  /** Intermediate (MLP) channels. */
  intermediate: IndexRange;
  /** Vocabulary rows of the embedding and lm_head (ceil-div parts; the last may be shorter or empty). */
  vocab: IndexRange;
}

const isSize = (n: unknown): n is number => typeof n === 'number' && Number.isInteger(n) && n >= 1;

/**
 * Checks a layout against a model before any memory is taken; returns it with defaults filled (tp 1, pp 1, ep 1).
 * Throws ParallelLayoutError naming the size and the dimension it does not fit, after `where: ` (none when empty).
 */
export function checkParallelConfig(
  config: ModelConfig,
  parallel: Partial<ParallelConfig> | undefined,
  where = 'parallel layout',
): ParallelConfig {
  const tp = parallel?.tp ?? 1;
  const pp = parallel?.pp ?? 1;
  const ep = parallel?.ep ?? 1;
  const fail = (what: string): never => {
    throw new ParallelLayoutError(where ? `${where}: ${what}` : what);
  };
  if (!isSize(tp)) fail(`tensor parallel size must be a positive integer (got ${String(tp)})`);
  if (!isSize(pp)) fail(`pipeline parallel size must be a positive integer (got ${String(pp)})`);
  if (!isSize(ep)) fail(`expert parallel size must be a positive integer (got ${String(ep)})`);
  if (config.numHeads % tp !== 0)
    fail(`tensor parallel size ${tp} does not divide the model's ${config.numHeads} attention heads`);
  if (config.numKvHeads % tp !== 0 && tp % config.numKvHeads !== 0)
    fail(
      `tensor parallel size ${tp} neither divides the model's ${config.numKvHeads} kv heads nor is a multiple ` +
        `of them (kv heads are split, or replicated when there are fewer than ranks)`,
    );
  const moe = config.moe ?? null;
  if (ep > 1) {
    if (!moe) fail(`expert parallel size ${ep} needs a mixture-of-experts model (this one is dense)`);
    else if (moe.numExperts % ep !== 0)
      fail(`expert parallel size ${ep} does not divide the model's ${moe.numExperts} experts`);
    if (tp !== 1 && tp !== ep)
      fail(
        `expert parallel size ${ep} with tensor parallel size ${tp}: the expert-parallel ranks are the ` +
          `tensor-parallel ranks, so tp must be 1 (attention replicated) or ${ep} (attention split)`,
      );
  } else if (moe && moe.intermediateSize % tp !== 0) {
    fail(`tensor parallel size ${tp} does not divide the experts' intermediate size ${moe.intermediateSize}`);
  } else if (moe && (moe.sharedExpertIntermediateSize ?? 0) % tp !== 0) {
    fail(
      `tensor parallel size ${tp} does not divide the shared expert's intermediate size ${moe.sharedExpertIntermediateSize}`,
    );
  }
  // An MoE model has a dense FFN only in its dense layers (moe.denseLayers); without them its intermediate size
  // splits nothing.
  if ((!moe || (moe.denseLayers ?? []).length > 0) && config.intermediateSize % tp !== 0)
    fail(`tensor parallel size ${tp} does not divide the model's intermediate size ${config.intermediateSize}`);
  if (pp > config.numLayers)
    fail(`pipeline parallel size ${pp} is more stages than the model's ${config.numLayers} layers`);
  return { tp, pp, ep };
}

/** The vocabulary rows of tensor-parallel rank `rank` of `size`: ceil(vocab / size) each, the last fewer. */
export function vocabRange(vocabSize: number, size: number, rank: number): IndexRange {
  const part = Math.ceil(vocabSize / size);
  const start = Math.min(vocabSize, rank * part);
  return { start, count: Math.min(vocabSize, start + part) - start };
}

/** What tensor-parallel rank `rank` of `size` holds. The layout must have passed checkParallelConfig. */
export function tensorShard(config: ModelConfig, size: number, rank: number): TensorShard {
  if (!Number.isInteger(rank) || rank < 0 || rank >= size)
    throw new ParallelLayoutError(`tensor parallel rank ${rank} is not one of 0..${size - 1}`);
  const heads = config.numHeads / size;
  const kv = config.numKvHeads;
  const kvHeads =
    kv >= size ? { start: (rank * kv) / size, count: kv / size } : { start: Math.floor((rank * kv) / size), count: 1 };
  // A replicated kv head is written by the first rank that holds it.
  const writesKv = kv >= size || rank === 0 || Math.floor(((rank - 1) * kv) / size) !== kvHeads.start;
  const inter = config.intermediateSize / size;
  return {
    rank,
    size,
    heads: { start: rank * heads, count: heads },
    kvHeads,
    writesKv,
    intermediate: { start: rank * inter, count: inter },
    vocab: vocabRange(config.vocabSize, size, rank),
  };
}

/**
 * What rank `groupRank` of a stage group holds of an MoE FFN: its whole experts, and its channels of each; and its
 * channels of the shared expert (count 0 without one).
 */
export interface ExpertShard {
  experts: IndexRange;
  intermediate: IndexRange;
  shared: IndexRange;
}

/** The MoE part of rank `groupRank` of a stage group (see the file's doc comment); the model must be MoE. */
export function expertShard(config: ModelConfig, parallel: ParallelConfig, groupRank: number): ExpertShard {
  const moe = config.moe;
  if (!moe) throw new ParallelLayoutError('expertShard: the model has no experts');
  const shared = moe.sharedExpertIntermediateSize ?? 0;
  if (parallel.ep > 1) {
    const per = moe.numExperts / parallel.ep;
    return {
      experts: { start: groupRank * per, count: per },
      intermediate: { start: 0, count: moe.intermediateSize },
      shared: { start: 0, count: shared },
    };
  }
  const inter = moe.intermediateSize / parallel.tp;
  const sharedPer = shared / parallel.tp;
  return {
    experts: { start: 0, count: moe.numExperts },
    intermediate: { start: groupRank * inter, count: inter },
    shared: { start: groupRank * sharedPer, count: sharedPer },
  };
}

/** The layers of each pipeline stage, in order: as even as possible, earlier stages taking the extra layer. */
export function stageLayers(numLayers: number, pp: number): IndexRange[] {
  const base = Math.floor(numLayers / pp);
  const extra = numLayers % pp;
  const out: IndexRange[] = [];
  let start = 0;
  for (let s = 0; s < pp; s++) {
    const count = base + (s < extra ? 1 : 0);
    out.push({ start, count });
    start += count;
  }
  return out;
}

/**
 * The pipeline stages that hold a tensor: its layer's stage; the embedding on stage 0 (and on the last stage
 * too when lm_head is tied to it); the final norm and lm_head on the last stage.
 */
export function tensorStages(
  config: ModelConfig,
  pp: number,
  tensor: Pick<ManifestTensor, 'role' | 'layer'>,
): number[] {
  const last = pp - 1;
  if (tensor.layer >= 0) {
    const stages = stageLayers(config.numLayers, pp);
    return [stages.findIndex((s) => tensor.layer >= s.start && tensor.layer < s.start + s.count)];
  }
  if (tensor.role === 'embed') return config.tieWordEmbeddings && last > 0 ? [0, last] : [0];
  return [last];
}

/** Rows [start, start + count) of a row-major [rows, cols] tensor: a view, no copy. */
function rowsOf(data: Float32Array, cols: number, range: IndexRange): Float32Array {
  return data.subarray(range.start * cols, (range.start + range.count) * cols);
}

/** Columns [start, start + count) of a row-major [rows, cols] tensor, copied. */
function columnsOf(data: Float32Array, rows: number, cols: number, range: IndexRange): Float32Array {
  const out = new Float32Array(rows * range.count);
  for (let r = 0; r < rows; r++)
    out.set(data.subarray(r * cols + range.start, r * cols + range.start + range.count), r * range.count);
  return out;
}

const scaled = (range: IndexRange, by: number): IndexRange => ({ start: range.start * by, count: range.count * by });

/**
 * Tensor-parallel rank `rank`'s slice of a whole float32 tensor, by its manifest shard rule (see the file's doc
 * comment; an expert's tensor as with ep 1: every rank its channels). Row slices are views of `data`; column
 * slices are copies.
 */
export function sliceTensor(
  config: ModelConfig,
  tp: number,
  rank: number,
  tensor: Pick<ManifestTensor, 'name' | 'shape' | 'role' | 'shard'>,
  data: Float32Array,
): Float32Array {
  if (tensor.shard === 'replicated' || tp === 1) return data;
  const shard = tensorShard(config, tp, rank);
  const expertChannels = () => expertShard(config, { tp, pp: 1, ep: 1 }, rank).intermediate;
  const sharedChannels = () => expertShard(config, { tp, pp: 1, ep: 1 }, rank).shared;
  const hd = config.headDim;
  const cols = tensor.shape.length === 2 ? tensor.shape[1]! : 1;
  switch (tensor.role) {
    case 'q':
    case 'q_bias':
      return rowsOf(data, cols, scaled(shard.heads, hd));
    case 'k':
    case 'k_bias':
    case 'v':
    case 'v_bias':
      return rowsOf(data, cols, scaled(shard.kvHeads, hd));
    case 'gate':
    case 'up':
      return rowsOf(data, cols, shard.intermediate);
    case 'embed':
    case 'lm_head':
      return rowsOf(data, cols, shard.vocab);
    case 'o':
      return columnsOf(data, tensor.shape[0]!, cols, scaled(shard.heads, hd));
    case 'down':
      return columnsOf(data, tensor.shape[0]!, cols, shard.intermediate);
    case 'expert_gate':
    case 'expert_up':
      return rowsOf(data, cols, expertChannels());
    case 'expert_down':
      return columnsOf(data, tensor.shape[0]!, cols, expertChannels());
    case 'shared_gate':
    case 'shared_up':
      return rowsOf(data, cols, sharedChannels());
    case 'shared_down':
      return columnsOf(data, tensor.shape[0]!, cols, sharedChannels());
    default:
      throw new ParallelLayoutError(`tensor "${tensor.name}" (${tensor.role}) has no ${tensor.shard} split`);
  }
}

/**
 * Rank `groupRank` of a stage group's part of a whole float32 tensor (any layout, see the file's doc comment), or
 * undefined when the rank does not hold it (an expert placed on another rank).
 */
export function rankSlice(
  config: ModelConfig,
  parallel: ParallelConfig,
  groupRank: number,
  tensor: Pick<ManifestTensor, 'name' | 'shape' | 'role' | 'shard' | 'expert'>,
  data: Float32Array,
): Float32Array | undefined {
  if (tensor.shard === 'expert' && parallel.ep > 1) {
    const { experts } = expertShard(config, parallel, groupRank);
    const e = tensor.expert ?? -1;
    return e >= experts.start && e < experts.start + experts.count ? data : undefined;
  }
  if (tensor.shard === 'shared_expert' && parallel.ep > 1) return data;
  // tp 1 beside ep: every rank of the group holds what a single rank holds.
  return sliceTensor(config, parallel.tp, parallel.tp === 1 ? 0 : groupRank, tensor, data);
}

/**
 * A layout in words, for `tandem info` and start-up logs: "tp 2 x pp 2 (4 ranks; stage layers 0-7, 8-15)",
 * "tp 1 x ep 4 x pp 1 (4 ranks; 2 experts per rank, attention replicated)".
 */
export function describeParallel(config: ModelConfig, parallel: ParallelConfig): string {
  const ranks = rankCount(parallel);
  if (ranks === 1) return 'single rank (tp 1, pp 1)';
  const stages = stageLayers(config.numLayers, parallel.pp)
    .map((s) => (s.count === 1 ? `${s.start}` : `${s.start}-${s.start + s.count - 1}`))
    .join(', ');
  const kv = config.numKvHeads < parallel.tp ? `, kv heads replicated ${parallel.tp / config.numKvHeads}x` : '';
  const ep =
    parallel.ep > 1 && config.moe
      ? `; ${config.moe.numExperts / parallel.ep} experts per rank${parallel.tp === 1 ? ', attention replicated' : ''}`
      : '';
  const sizes = `tp ${parallel.tp}${parallel.ep > 1 ? ` x ep ${parallel.ep}` : ''} x pp ${parallel.pp}`;
  return `${sizes} (${ranks} ranks; stage layers ${stages}${kv}${ep})`;
}
