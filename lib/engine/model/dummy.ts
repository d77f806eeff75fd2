/**
 * `dummy:<preset>` models: real Llama shapes with seeded random weights, for benchmarks and tests without a
 * checkpoint. Weights are a pure function of (seed, tensor name, row), so any tensor, or any range of rows of
 * one, can be generated on its own, in any order, on any process, with the same values.
 *
 * Every dummy model uses the byte-level tokenizer (ids 0..255 are bytes, 256 is BOS, 257 is EOS); the large
 * presets keep their real vocabulary size; their ids above 257 decode to one printable character each.
 */
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { BadArgumentError, ModelConfigError } from '../../errors.js';
import { expectedTensors, toHfConfig, type ModelConfig, type TensorSpec } from './config.js';
import { writeSafetensors, type FloatDtype, type TensorToWrite } from './safetensors.js';
import { BYTE_BOS_ID, BYTE_EOS_ID, BYTE_VOCAB_SIZE, ByteTokenizer } from './tokenizer-bytes.js';

/** Dense Llama-family presets. */
export const DENSE_DUMMY_PRESETS = ['tiny', 'llama-3.2-1b', 'llama-3.1-8b', 'llama-3.1-70b'] as const;
/** Mixture-of-experts presets (Qwen3-MoE, Mixtral and Qwen2-MoE shapes). */
export const MOE_DUMMY_PRESETS = [
  'tiny-moe',
  'tiny-mixtral',
  'tiny-qwen2-moe',
  'qwen3-30b-a3b',
  'mixtral-8x7b',
  'qwen1.5-moe-a2.7b',
] as const;
export const DUMMY_PRESETS = [...DENSE_DUMMY_PRESETS, ...MOE_DUMMY_PRESETS] as const;
export type DummyPreset = (typeof DUMMY_PRESETS)[number];
export const DUMMY_PREFIX = 'dummy:';

const LLAMA3_VOCAB = 128256;
const llama3Scaling = (factor: number) =>
  ({
    type: 'llama3',
    factor,
    lowFreqFactor: 1,
    highFreqFactor: 4,
    originalMaxPositionEmbeddings: 8192,
  }) as const;

function llama(
  shape: Pick<
    ModelConfig,
    | 'vocabSize'
    | 'hiddenSize'
    | 'intermediateSize'
    | 'numLayers'
    | 'numHeads'
    | 'numKvHeads'
    | 'tieWordEmbeddings'
    | 'ropeTheta'
    | 'ropeScaling'
    | 'maxPositionEmbeddings'
    | 'rmsNormEps'
  >,
): ModelConfig {
  return {
    architecture: 'LlamaForCausalLM',
    ...shape,
    headDim: shape.hiddenSize / shape.numHeads,
    attentionBias: false,
    attentionOutputBias: false,
    slidingWindow: null,
    bosTokenId: BYTE_BOS_ID,
    eosTokenIds: [BYTE_EOS_ID],
    torchDtype: 'bfloat16',
  };
}

/** A Qwen3-MoE shape: q/k norm, every layer sparse, top-k renormalised (Qwen3-30B-A3B sets norm_topk_prob). */
function qwen3Moe(
  shape: Pick<
    ModelConfig,
    'vocabSize' | 'hiddenSize' | 'intermediateSize' | 'numLayers' | 'numHeads' | 'numKvHeads' | 'headDim'
  > & { moe: NonNullable<ModelConfig['moe']>; maxPositionEmbeddings: number },
): ModelConfig {
  return {
    architecture: 'Qwen3MoeForCausalLM',
    ...shape,
    rmsNormEps: 1e-6,
    ropeTheta: 1000000,
    ropeScaling: null,
    tieWordEmbeddings: false,
    attentionBias: false,
    attentionOutputBias: false,
    slidingWindow: null,
    bosTokenId: BYTE_BOS_ID,
    eosTokenIds: [BYTE_EOS_ID],
    torchDtype: 'bfloat16',
    qkNorm: true,
  };
}

/** A Qwen2-MoE shape: q/k/v bias, a shared expert beside the routed ones, top-k not renormalised (the family's default). */
function qwen2Moe(
  shape: Pick<
    ModelConfig,
    'vocabSize' | 'hiddenSize' | 'intermediateSize' | 'numLayers' | 'numHeads' | 'numKvHeads' | 'maxPositionEmbeddings'
  > & { moe: NonNullable<ModelConfig['moe']> },
): ModelConfig {
  return {
    architecture: 'Qwen2MoeForCausalLM',
    ...shape,
    headDim: shape.hiddenSize / shape.numHeads,
    rmsNormEps: 1e-6,
    ropeTheta: 1000000,
    ropeScaling: null,
    tieWordEmbeddings: false,
    attentionBias: true,
    attentionOutputBias: false,
    slidingWindow: null,
    bosTokenId: BYTE_BOS_ID,
    eosTokenIds: [BYTE_EOS_ID],
    torchDtype: 'bfloat16',
    qkNorm: false,
  };
}

/** A Mixtral shape: Mistral attention, top-2 of 8 experts (always renormalised), experts of intermediateSize. */
function mixtral(
  shape: Pick<
    ModelConfig,
    'vocabSize' | 'hiddenSize' | 'intermediateSize' | 'numLayers' | 'numHeads' | 'numKvHeads' | 'maxPositionEmbeddings'
  > & { numExperts: number; topK: number },
): ModelConfig {
  const { numExperts, topK, ...rest } = shape;
  return {
    architecture: 'MixtralForCausalLM',
    ...rest,
    headDim: shape.hiddenSize / shape.numHeads,
    rmsNormEps: 1e-5,
    ropeTheta: 1000000,
    ropeScaling: null,
    tieWordEmbeddings: false,
    attentionBias: false,
    attentionOutputBias: false,
    slidingWindow: null,
    bosTokenId: BYTE_BOS_ID,
    eosTokenIds: [BYTE_EOS_ID],
    torchDtype: 'bfloat16',
    qkNorm: false,
    moe: { numExperts, topK, intermediateSize: shape.intermediateSize, normTopkProb: true },
  };
}

const PRESETS: Record<DummyPreset, () => ModelConfig> = {
  // Small enough that a CPU forward pass takes microseconds; untied, so lm_head is exercised.
  tiny: () =>
    llama({
      vocabSize: BYTE_VOCAB_SIZE,
      hiddenSize: 64,
      intermediateSize: 128,
      numLayers: 2,
      numHeads: 4,
      numKvHeads: 2,
      tieWordEmbeddings: false,
      ropeTheta: 10000,
      ropeScaling: null,
      maxPositionEmbeddings: 4096,
      rmsNormEps: 1e-5,
    }),
  'llama-3.2-1b': () =>
    llama({
      vocabSize: LLAMA3_VOCAB,
      hiddenSize: 2048,
      intermediateSize: 8192,
      numLayers: 16,
      numHeads: 32,
      numKvHeads: 8,
      tieWordEmbeddings: true,
      ropeTheta: 500000,
      ropeScaling: llama3Scaling(32),
      maxPositionEmbeddings: 131072,
      rmsNormEps: 1e-5,
    }),
  'llama-3.1-8b': () =>
    llama({
      vocabSize: LLAMA3_VOCAB,
      hiddenSize: 4096,
      intermediateSize: 14336,
      numLayers: 32,
      numHeads: 32,
      numKvHeads: 8,
      tieWordEmbeddings: false,
      ropeTheta: 500000,
      ropeScaling: llama3Scaling(8),
      maxPositionEmbeddings: 131072,
      rmsNormEps: 1e-5,
    }),
  'llama-3.1-70b': () =>
    llama({
      vocabSize: LLAMA3_VOCAB,
      hiddenSize: 8192,
      intermediateSize: 28672,
      numLayers: 80,
      numHeads: 64,
      numKvHeads: 8,
      tieWordEmbeddings: false,
      ropeTheta: 500000,
      ropeScaling: llama3Scaling(8),
      maxPositionEmbeddings: 131072,
      rmsNormEps: 1e-5,
    }),
  // Tiny mixture-of-experts models for tests: 8 experts, top 2, small enough for microsecond CPU passes.
  'tiny-moe': () =>
    qwen3Moe({
      vocabSize: BYTE_VOCAB_SIZE,
      hiddenSize: 64,
      intermediateSize: 128,
      numLayers: 2,
      numHeads: 4,
      numKvHeads: 2,
      headDim: 16,
      maxPositionEmbeddings: 4096,
      moe: { numExperts: 8, topK: 2, intermediateSize: 32, normTopkProb: true },
    }),
  'tiny-mixtral': () =>
    mixtral({
      vocabSize: BYTE_VOCAB_SIZE,
      hiddenSize: 64,
      intermediateSize: 64,
      numLayers: 2,
      numHeads: 4,
      numKvHeads: 2,
      maxPositionEmbeddings: 4096,
      numExperts: 8,
      topK: 2,
    }),
  // Qwen2-MoE for tests: a shared expert of 48 channels, and layer 1 of 3 dense (mlp_only_layers [1]).
  'tiny-qwen2-moe': () =>
    qwen2Moe({
      vocabSize: BYTE_VOCAB_SIZE,
      hiddenSize: 64,
      intermediateSize: 128,
      numLayers: 3,
      numHeads: 4,
      numKvHeads: 2,
      maxPositionEmbeddings: 4096,
      moe: {
        numExperts: 8,
        topK: 2,
        intermediateSize: 32,
        normTopkProb: false,
        sharedExpertIntermediateSize: 48,
        denseLayers: [1],
      },
    }),
  // Qwen/Qwen3-30B-A3B's config.json shapes (30.5 B parameters, 3.3 B active).
  'qwen3-30b-a3b': () =>
    qwen3Moe({
      vocabSize: 151936,
      hiddenSize: 2048,
      intermediateSize: 6144,
      numLayers: 48,
      numHeads: 32,
      numKvHeads: 4,
      headDim: 128,
      maxPositionEmbeddings: 40960,
      moe: { numExperts: 128, topK: 8, intermediateSize: 768, normTopkProb: true },
    }),
  // mistralai/Mixtral-8x7B-v0.1's config.json shapes (46.7 B parameters, 12.9 B active).
  'mixtral-8x7b': () =>
    mixtral({
      vocabSize: 32000,
      hiddenSize: 4096,
      intermediateSize: 14336,
      numLayers: 32,
      numHeads: 32,
      numKvHeads: 8,
      maxPositionEmbeddings: 32768,
      numExperts: 8,
      topK: 2,
    }),
  // Qwen/Qwen1.5-MoE-A2.7B's config.json shapes (14.3 B parameters, 2.7 B active): 60 experts, top 4, a shared
  // expert of 5632 channels.
  'qwen1.5-moe-a2.7b': () =>
    qwen2Moe({
      vocabSize: 151936,
      hiddenSize: 2048,
      intermediateSize: 5632,
      numLayers: 24,
      numHeads: 16,
      numKvHeads: 16,
      maxPositionEmbeddings: 8192,
      moe: {
        numExperts: 60,
        topK: 4,
        intermediateSize: 1408,
        normTopkProb: false,
        sharedExpertIntermediateSize: 5632,
      },
    }),
};

/** True for `dummy:<anything>` model names. */
export function isDummyModel(model: string): boolean {
  return model.startsWith(DUMMY_PREFIX);
}

/** The preset of `dummy:<preset>` (or of a bare preset name). Unknown presets throw ModelConfigError. */
export function parseDummyModel(model: string): DummyPreset {
  const preset = isDummyModel(model) ? model.slice(DUMMY_PREFIX.length) : model;
  if (!(DUMMY_PRESETS as readonly string[]).includes(preset))
    throw new ModelConfigError(
      `${model}: unknown dummy preset "${preset}" (presets: ${DUMMY_PRESETS.map((p) => DUMMY_PREFIX + p).join(', ')})`,
    );
  return preset as DummyPreset;
}

/** The ModelConfig of a preset (`tiny` or `dummy:tiny`); a fresh object each call. */
export function dummyConfig(preset: DummyPreset | string): ModelConfig {
  return PRESETS[parseDummyModel(preset)]();
}

// ---------------------------------------------------------------------------------------------------------------
// PRNG: splitmix32 to seed, xoshiro128** to draw. 32-bit integer math only, so values are identical everywhere.
// ---------------------------------------------------------------------------------------------------------------

function splitmix32(state: number): [next: number, out: number] {
  const s = (state + 0x9e3779b9) | 0;
  let z = s;
  z = Math.imul(z ^ (z >>> 16), 0x21f0aafd);
  z = Math.imul(z ^ (z >>> 15), 0x735a2d97);
  return [s, (z ^ (z >>> 15)) >>> 0];
}

/** xoshiro128** (Blackman and Vigna), seeded from any list of 32-bit keys through splitmix32. */
export class Xoshiro128 {
  private a: number;
  private b: number;
  private c: number;
  private d: number;

  constructor(...keys: number[]) {
    let s = 0x2545f491;
    for (const k of keys) {
      [s] = splitmix32(s ^ (k | 0));
      [s] = splitmix32(s);
    }
    let o: number;
    [s, o] = splitmix32(s);
    this.a = o;
    [s, o] = splitmix32(s);
    this.b = o;
    [s, o] = splitmix32(s);
    this.c = o;
    [s, o] = splitmix32(s);
    this.d = o;
    if ((this.a | this.b | this.c | this.d) === 0) this.a = 1;
  }

  /** Next unsigned 32-bit value. */
  nextU32(): number {
    const result = Math.imul(rotl(Math.imul(this.b, 5), 7), 9) >>> 0;
    const t = this.b << 9;
    this.c ^= this.a;
    this.d ^= this.b;
    this.b ^= this.c;
    this.a ^= this.d;
    this.c ^= t;
    this.d = rotl(this.d, 11);
    return result;
  }

  /** Fills out[start, start + count) with (u - 0.5) * width, u uniform in [0, 1) as `nextFloat` draws it. */
  fillCentered(out: Float32Array, start: number, count: number, width: number): void {
    let { a, b, c, d } = this;
    for (let i = start, end = start + count; i < end; i++) {
      const r = Math.imul(rotl(Math.imul(b, 5), 7), 9) >>> 0;
      const t = b << 9;
      c ^= a;
      d ^= b;
      b ^= c;
      a ^= d;
      c ^= t;
      d = rotl(d, 11);
      out[i] = ((r >>> 8) * 2 ** -24 - 0.5) * width;
    }
    this.a = a;
    this.b = b;
    this.c = c;
    this.d = d;
  }

  /** Uniform in [0, 1) with 24 bits (exact in float32). */
  nextFloat(): number {
    return (this.nextU32() >>> 8) * 2 ** -24;
  }
}

const rotl = (x: number, k: number) => (x << k) | (x >>> (32 - k));

/** FNV-1a over the UTF-16 code units of `s`. */
function hashName(s: string): number {
  let h = 0x811c9dc5;
  for (let i = 0; i < s.length; i++) h = Math.imul(h ^ s.charCodeAt(i), 0x01000193);
  return h >>> 0;
}

function seedKeys(seed: number): [number, number] {
  if (!Number.isSafeInteger(seed) || seed < 0)
    throw new BadArgumentError(`seed must be a non-negative integer, got ${seed}`);
  return [seed % 2 ** 32, Math.floor(seed / 2 ** 32)];
}

// ---------------------------------------------------------------------------------------------------------------
// Weights
// ---------------------------------------------------------------------------------------------------------------

/** Names and shapes of a dummy model's tensors (same as a Hugging Face checkpoint of the config). */
export function dummyTensorSpecs(config: ModelConfig): TensorSpec[] {
  return expectedTensors(config);
}

function specOf(config: ModelConfig, name: string): TensorSpec {
  const spec = expectedTensors(config).find((t) => t.name === name);
  if (!spec) throw new BadArgumentError(`dummy model has no tensor "${name}"`);
  return spec;
}

/**
 * The standard deviation of a tensor's values: 1/sqrt(fan_in) for projections (inputs are RMS-normalised,
 * so outputs have unit scale), 1/sqrt(hidden) for the embedding and lm_head (logits of unit scale, tied or not),
 * 0 for norm weights (all ones).
 */
function stdOf(config: ModelConfig, spec: TensorSpec): number | 'ones' {
  if (spec.name.endsWith('norm.weight')) return 'ones';
  if (spec.name.endsWith('.bias')) return 1 / Math.sqrt(config.hiddenSize);
  if (spec.name === 'model.embed_tokens.weight' || spec.name === 'lm_head.weight')
    return 1 / Math.sqrt(config.hiddenSize);
  return 1 / Math.sqrt(spec.shape[1]!);
}

/**
 * How a dummy tensor's values are made, as the GPU engine's kernel (native/kernels/dummy_init.cu) takes it:
 * `ones`, or `uniform`: row r is xoshiro128** seeded with (keys[0], keys[1], keys[2], r), each draw u (24 bits)
 * giving the float32 nearest to (u - 0.5) * width (computed in double). CPU and GPU compute the same values.
 */
export type DummyRecipe = { kind: 'ones' } | { kind: 'uniform'; keys: [number, number, number]; width: number };

/** The recipe of one tensor of a dummy model (`dummyTensorRows` generates from it). */
export function dummyTensorRecipe(config: ModelConfig, seed: number, name: string): DummyRecipe {
  const [lo, hi] = seedKeys(seed);
  const std = stdOf(config, specOf(config, name));
  if (std === 'ones') return { kind: 'ones' };
  return { kind: 'uniform', keys: [lo, hi, hashName(name)], width: 2 * Math.sqrt(3) * std }; // uniform on [-w/2, w/2) has standard deviation std
}

/**
 * Rows [rowStart, rowStart + rowCount) of a dummy tensor (a 1-D tensor is one row), as float32 values drawn
 * uniformly with the tensor's standard deviation. Row r depends only on (seed, name, r).
 */
export function dummyTensorRows(
  config: ModelConfig,
  seed: number,
  name: string,
  rowStart = 0,
  rowCount?: number,
  out?: Float32Array,
): Float32Array {
  const recipe = dummyTensorRecipe(config, seed, name);
  const spec = specOf(config, name);
  const rows = spec.shape.length === 1 ? 1 : spec.shape[0]!;
  const cols = spec.shape.length === 1 ? spec.shape[0]! : spec.shape.slice(1).reduce((a, b) => a * b, 1);
  const count = rowCount ?? rows - rowStart;
  if (
    !Number.isSafeInteger(rowStart) ||
    !Number.isSafeInteger(count) ||
    rowStart < 0 ||
    count < 0 ||
    rowStart + count > rows
  )
    throw new BadArgumentError(`rows ${rowStart}..${rowStart + count} are outside tensor "${name}" (${rows} rows)`);
  const values = out ?? new Float32Array(count * cols);
  if (values.length < count * cols)
    throw new BadArgumentError(`output holds ${values.length} values, rows need ${count * cols}`);
  if (recipe.kind === 'ones') {
    values.fill(1, 0, count * cols);
    return values;
  }
  const [lo, hi, nameKey] = recipe.keys;
  for (let r = 0; r < count; r++) {
    new Xoshiro128(lo, hi, nameKey, rowStart + r).fillCentered(values, r * cols, cols, recipe.width);
  }
  return values;
}

/** A whole dummy tensor as float32. */
export function dummyTensor(config: ModelConfig, seed: number, name: string): Float32Array {
  return dummyTensorRows(config, seed, name);
}

export interface DummyTensor {
  name: string;
  shape: number[];
  data: Float32Array;
}

/**
 * Every tensor of a dummy model, generated one at a time as the iterator advances (only the current one is held).
 * For the largest presets prefer `dummyTensorRows` over a whole embedding matrix.
 */
export function* dummyWeights(config: ModelConfig, seed: number): Generator<DummyTensor> {
  seedKeys(seed);
  for (const spec of expectedTensors(config))
    yield { name: spec.name, shape: spec.shape, data: dummyTensorRows(config, seed, spec.name) };
}

/**
 * Saves a dummy model as a Hugging Face checkpoint directory (config.json + model.safetensors), generating one
 * tensor at a time. Returns the config written.
 */
export function saveDummyModel(
  dir: string,
  model: DummyPreset | string | ModelConfig,
  seed: number,
  dtype: FloatDtype = 'BF16',
): ModelConfig {
  const config = typeof model === 'string' ? dummyConfig(model) : model;
  seedKeys(seed);
  mkdirSync(dir, { recursive: true });
  const torchDtype = dtype === 'BF16' ? 'bfloat16' : dtype === 'F16' ? 'float16' : 'float32';
  const written: ModelConfig = { ...config, torchDtype };
  writeFileSync(join(dir, 'config.json'), JSON.stringify(toHfConfig(written), null, 2) + '\n');
  const tensors: [string, TensorToWrite][] = expectedTensors(config).map((spec) => [
    spec.name,
    { dtype, shape: spec.shape, data: () => dummyTensorRows(config, seed, spec.name) },
  ]);
  writeSafetensors(join(dir, 'model.safetensors'), tensors, { format: 'pt', tandem_dummy_seed: String(seed) });
  return written;
}

/** The byte-level tokenizer of a dummy model (its vocabulary size, so every id the model can emit decodes). */
export function dummyTokenizer(config: ModelConfig): ByteTokenizer {
  return new ByteTokenizer({ vocabSize: config.vocabSize });
}
