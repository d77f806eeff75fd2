/**
 * Tensor and pipeline parallel layouts (issue 25): which part of the model each rank holds. One engine instance
 * runs tp x pp ranks; rank `stage * tp + tpRank` holds tensor-parallel slice `tpRank` of the layers of pipeline
 * stage `stage`. The arithmetic here is the one the CPU runner group (native/src/engine/cpu_parallel.h) and the
 * GPU runners follow; each tensor's slice is cut by its manifest shard rule (model/manifest.ts):
 *
 * - `column` (dim 0): q rows by attention head (head-major: head * headDim), k/v rows by kv head, gate/up rows and
 *   q/k/v biases likewise;
 * - `row` (dim 1): o_proj columns by attention head, down_proj columns by intermediate channel;
 * - `vocab` (dim 0): embedding and lm_head rows in ceil(vocab / tp) parts (the last rank may hold fewer);
 * - `replicated`: the whole tensor.
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

/** Tensor parallel size (ranks that split every layer) and pipeline parallel size (stages of layers). */
export interface ParallelConfig {
  tp: number;
  pp: number;
}

/** One rank, no parallelism. */
export const SINGLE_RANK: Readonly<ParallelConfig> = Object.freeze({ tp: 1, pp: 1 });

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
 * Checks a layout against a model before any memory is taken; returns it with defaults filled (tp 1, pp 1).
 * Throws ParallelLayoutError naming the size and the dimension it does not fit, after `where: ` (none when empty).
 */
export function checkParallelConfig(
  config: ModelConfig,
  parallel: Partial<ParallelConfig> | undefined,
  where = 'parallel layout',
): ParallelConfig {
  const tp = parallel?.tp ?? 1;
  const pp = parallel?.pp ?? 1;
  const fail = (what: string): never => {
    throw new ParallelLayoutError(where ? `${where}: ${what}` : what);
  };
  if (!isSize(tp)) fail(`tensor parallel size must be a positive integer (got ${String(tp)})`);
  if (!isSize(pp)) fail(`pipeline parallel size must be a positive integer (got ${String(pp)})`);
  if (config.numHeads % tp !== 0)
    fail(`tensor parallel size ${tp} does not divide the model's ${config.numHeads} attention heads`);
  if (config.numKvHeads % tp !== 0 && tp % config.numKvHeads !== 0)
    fail(
      `tensor parallel size ${tp} neither divides the model's ${config.numKvHeads} kv heads nor is a multiple ` +
        `of them (kv heads are split, or replicated when there are fewer than ranks)`,
    );
  if (config.intermediateSize % tp !== 0)
    fail(`tensor parallel size ${tp} does not divide the model's intermediate size ${config.intermediateSize}`);
  if (pp > config.numLayers)
    fail(`pipeline parallel size ${pp} is more stages than the model's ${config.numLayers} layers`);
  return { tp, pp };
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
 * comment). Row slices are views of `data`; column slices are copies.
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
    default:
      throw new ParallelLayoutError(`tensor "${tensor.name}" (${tensor.role}) has no ${tensor.shard} split`);
  }
}

/** A layout in words, for `tandem info` and start-up logs: "tp 2 x pp 2 (4 ranks; stages: layers 0-7, 8-15)". */
export function describeParallel(config: ModelConfig, parallel: ParallelConfig): string {
  const ranks = parallel.tp * parallel.pp;
  if (ranks === 1) return 'single rank (tp 1, pp 1)';
  const stages = stageLayers(config.numLayers, parallel.pp)
    .map((s) => (s.count === 1 ? `${s.start}` : `${s.start}-${s.start + s.count - 1}`))
    .join(', ');
  const kv = config.numKvHeads < parallel.tp ? `, kv heads replicated ${parallel.tp / config.numKvHeads}x` : '';
  return `tp ${parallel.tp} x pp ${parallel.pp} (${ranks} ranks; stage layers ${stages}${kv})`;
}
