/**
 * Hugging Face `config.json` for the Llama family (Llama, Qwen2, Mistral) and its mixture-of-experts relatives
 * (Mixtral, Qwen3-MoE, Qwen2-MoE) parsed into a typed `ModelConfig`.
 * Every problem is a `ModelConfigError` whose message names the file and the field.
 */
import { readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { ModelConfigError } from '../../errors.js';
import { weightManifest } from './manifest.js';

export const SUPPORTED_ARCHITECTURES = [
  'LlamaForCausalLM',
  'Qwen2ForCausalLM',
  'MistralForCausalLM',
  'MixtralForCausalLM',
  'Qwen3MoeForCausalLM',
  'Qwen2MoeForCausalLM',
] as const;
export type Architecture = (typeof SUPPORTED_ARCHITECTURES)[number];

/** `model_type` values accepted when `architectures` is absent. */
const MODEL_TYPES: Record<string, Architecture> = {
  llama: 'LlamaForCausalLM',
  qwen2: 'Qwen2ForCausalLM',
  mistral: 'MistralForCausalLM',
  mixtral: 'MixtralForCausalLM',
  qwen3_moe: 'Qwen3MoeForCausalLM',
  qwen2_moe: 'Qwen2MoeForCausalLM',
};

/**
 * The sparse mixture-of-experts FFN that replaces the dense one in its layers (every layer but `denseLayers`):
 * router logits [numExperts], softmax over all experts, the `topK` largest kept, renormalised to sum to 1 when
 * `normTopkProb` (always for Mixtral; the Qwen families' `norm_topk_prob`), each a SwiGLU expert of width
 * `intermediateSize`, their weighted outputs summed.
 */
export interface MoeSpec {
  numExperts: number;
  topK: number;
  intermediateSize: number;
  normTopkProb: boolean;
  /**
   * Qwen2-MoE's shared expert: a SwiGLU MLP of this width that every token goes through, its output scaled by
   * sigmoid(shared_expert_gate . x) and added to the routed experts' sum. Absent or 0: none.
   */
  sharedExpertIntermediateSize?: number;
  /**
   * Layers (ascending) with the dense SwiGLU FFN of the model's `intermediateSize` instead of the sparse one: the
   * Qwen families' `mlp_only_layers` and the layers `decoder_sparse_step` skips. Absent or empty: none.
   */
  denseLayers?: number[];
}

/** Whether decoder layer `layer` of `c` runs the sparse MoE FFN (false for a dense model and its dense layers). */
export function isSparseLayer(c: Pick<ModelConfig, 'moe'>, layer: number): boolean {
  return !!c.moe && !(c.moe.denseLayers ?? []).includes(layer);
}

export type TorchDtype = 'bfloat16' | 'float16' | 'float32';

/** Llama 3.1 frequency-dependent RoPE scaling (`rope_scaling.rope_type == "llama3"`). */
export interface Llama3RopeScaling {
  type: 'llama3';
  factor: number;
  lowFreqFactor: number;
  highFreqFactor: number;
  originalMaxPositionEmbeddings: number;
}

export interface ModelConfig {
  architecture: Architecture;
  vocabSize: number;
  hiddenSize: number;
  intermediateSize: number;
  numLayers: number;
  numHeads: number;
  numKvHeads: number;
  /** `head_dim` when given, else hiddenSize / numHeads. */
  headDim: number;
  rmsNormEps: number;
  ropeTheta: number;
  /** null: plain RoPE. */
  ropeScaling: Llama3RopeScaling | null;
  maxPositionEmbeddings: number;
  /** lm_head shares model.embed_tokens.weight (no lm_head.weight in the checkpoint). */
  tieWordEmbeddings: boolean;
  /** q/k/v projections carry a bias (always for Qwen2; Llama's `attention_bias`). */
  attentionBias: boolean;
  /** o_proj carries a bias too (Llama with `attention_bias: true`; never Qwen2 or Mistral). */
  attentionOutputBias: boolean;
  /** Sliding-window attention width, or null for full attention (Mistral v0.1; Qwen2 with use_sliding_window). */
  slidingWindow: number | null;
  bosTokenId: number | null;
  /** Every id that ends generation (config's `eos_token_id`, a number or a list); may be empty. */
  eosTokenIds: number[];
  /** Dtype the checkpoint was saved in (`torch_dtype`, or `dtype` in newer transformers); float32 when absent. */
  torchDtype: TorchDtype;
  /** Qwen3: each q and k head is RMS-normalised (weights [headDim]) before RoPE. Absent: false. */
  qkNorm?: boolean;
  /** Mixture-of-experts models: the sparse FFN (of every layer but moe.denseLayers). Absent or null: a dense model. */
  moe?: MoeSpec | null;
}

type Json = Record<string, unknown>;

class Fields {
  constructor(
    readonly json: Json,
    readonly source: string,
  ) {}

  fail(field: string, what: string): never {
    throw new ModelConfigError(`${this.source}: field "${field}" ${what}`);
  }

  /** undefined when absent or null. */
  get(field: string): unknown {
    const v = this.json[field];
    return v === null ? undefined : v;
  }

  positiveInt(field: string, fallback?: number): number {
    const v = this.get(field);
    if (v === undefined) {
      if (fallback !== undefined) return fallback;
      this.fail(field, 'is missing (a positive integer is required)');
    }
    if (typeof v !== 'number' || !Number.isSafeInteger(v) || v <= 0)
      this.fail(field, `must be a positive integer, got ${JSON.stringify(v)}`);
    return v;
  }

  nonNegativeIntOrNull(field: string): number | null {
    const v = this.get(field);
    if (v === undefined) return null;
    if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 0)
      this.fail(field, `must be a non-negative integer or null, got ${JSON.stringify(v)}`);
    return v;
  }

  positiveNumber(field: string, fallback: number): number {
    const v = this.get(field);
    if (v === undefined) return fallback;
    if (typeof v !== 'number' || !Number.isFinite(v) || v <= 0)
      this.fail(field, `must be a positive number, got ${JSON.stringify(v)}`);
    return v;
  }

  bool(field: string, fallback: boolean): boolean {
    const v = this.get(field);
    if (v === undefined) return fallback;
    if (typeof v !== 'boolean') this.fail(field, `must be true or false, got ${JSON.stringify(v)}`);
    return v;
  }
}

function architectureOf(f: Fields): Architecture {
  const archs = f.get('architectures');
  if (archs !== undefined) {
    if (!Array.isArray(archs) || archs.length === 0 || !archs.every((a) => typeof a === 'string'))
      f.fail('architectures', `must be a non-empty list of names, got ${JSON.stringify(archs)}`);
    const found = (archs as string[]).find((a): a is Architecture =>
      (SUPPORTED_ARCHITECTURES as readonly string[]).includes(a),
    );
    if (!found)
      f.fail(
        'architectures',
        `names ${JSON.stringify(archs)}, which is not supported (supported: ${SUPPORTED_ARCHITECTURES.join(', ')})`,
      );
    return found;
  }
  const modelType = f.get('model_type');
  if (modelType === undefined)
    f.fail('architectures', `is missing (and so is "model_type"); supported: ${SUPPORTED_ARCHITECTURES.join(', ')}`);
  if (typeof modelType !== 'string' || !(modelType in MODEL_TYPES))
    f.fail(
      'model_type',
      `is ${JSON.stringify(modelType)}, which is not supported (supported: ${Object.keys(MODEL_TYPES).join(', ')})`,
    );
  return MODEL_TYPES[modelType]!;
}

/** transformers 5 writes RoPE settings (theta included) as `rope_parameters`; older files as `rope_scaling`. */
function ropeField(f: Fields): 'rope_scaling' | 'rope_parameters' {
  return f.get('rope_scaling') === undefined && f.get('rope_parameters') !== undefined
    ? 'rope_parameters'
    : 'rope_scaling';
}

function ropeThetaOf(f: Fields): number {
  if (f.get('rope_theta') !== undefined || ropeField(f) !== 'rope_parameters')
    return f.positiveNumber('rope_theta', 10000);
  const rp = f.get('rope_parameters');
  if (typeof rp !== 'object' || rp === null || Array.isArray(rp)) f.fail('rope_parameters', 'must be an object');
  const v = (rp as Record<string, unknown>).rope_theta;
  if (v === undefined) return 10000;
  if (typeof v !== 'number' || !Number.isFinite(v) || v <= 0)
    f.fail('rope_parameters.rope_theta', `must be a positive number, got ${JSON.stringify(v)}`);
  return v;
}

function ropeScalingOf(f: Fields): Llama3RopeScaling | null {
  const name = ropeField(f);
  const rs = f.get(name);
  if (rs === undefined || rs === null) return null;
  if (typeof rs !== 'object' || Array.isArray(rs)) f.fail(name, `must be an object or null`);
  const sub = new Fields(rs as Json, f.source);
  const typeField = sub.get('rope_type') !== undefined ? 'rope_type' : 'type';
  const type = sub.get(typeField);
  if (type === 'default') return null;
  if (type !== 'llama3')
    f.fail(
      `${name}.${typeField}`,
      `is ${JSON.stringify(type)}, which is not supported (supported: "llama3", "default")`,
    );
  const num = (field: string): number => {
    const v = sub.get(field);
    if (typeof v !== 'number' || !Number.isFinite(v) || v <= 0)
      f.fail(
        `${name}.${field}`,
        v === undefined ? 'is missing' : `must be a positive number, got ${JSON.stringify(v)}`,
      );
    return v;
  };
  const scaling: Llama3RopeScaling = {
    type: 'llama3',
    factor: num('factor'),
    lowFreqFactor: num('low_freq_factor'),
    highFreqFactor: num('high_freq_factor'),
    originalMaxPositionEmbeddings: num('original_max_position_embeddings'),
  };
  if (!Number.isSafeInteger(scaling.originalMaxPositionEmbeddings))
    f.fail(`${name}.original_max_position_embeddings`, 'must be an integer');
  if (scaling.highFreqFactor <= scaling.lowFreqFactor)
    f.fail(`${name}.high_freq_factor`, `must be greater than ${name}.low_freq_factor`);
  return scaling;
}

function eosOf(f: Fields): number[] {
  const v = f.get('eos_token_id');
  if (v === undefined) return [];
  const list = Array.isArray(v) ? v : [v];
  for (const id of list)
    if (typeof id !== 'number' || !Number.isSafeInteger(id) || id < 0)
      f.fail('eos_token_id', `must be a token id or a list of token ids, got ${JSON.stringify(v)}`);
  return [...new Set(list as number[])];
}

function dtypeOf(f: Fields): TorchDtype {
  const field = f.get('torch_dtype') !== undefined ? 'torch_dtype' : 'dtype';
  const v = f.get(field);
  if (v === undefined) return 'float32';
  if (v !== 'bfloat16' && v !== 'float16' && v !== 'float32')
    f.fail(field, `is ${JSON.stringify(v)}; supported: "bfloat16", "float16", "float32"`);
  return v;
}

/**
 * Parses the JSON object of a config.json. `source` names the file in error messages.
 * Optional fields take transformers' defaults for the architecture.
 */
export function parseModelConfig(json: unknown, source = 'config.json'): ModelConfig {
  if (typeof json !== 'object' || json === null || Array.isArray(json))
    throw new ModelConfigError(`${source}: not a JSON object`);
  const f = new Fields(json as Json, source);
  const architecture = architectureOf(f);
  const qwen = architecture === 'Qwen2ForCausalLM';
  const mixtral = architecture === 'MixtralForCausalLM';
  const qwen3Moe = architecture === 'Qwen3MoeForCausalLM';
  const qwen2Moe = architecture === 'Qwen2MoeForCausalLM';
  const mistral = architecture === 'MistralForCausalLM' || mixtral;

  const hiddenSize = f.positiveInt('hidden_size');
  const numHeads = f.positiveInt('num_attention_heads');
  const numKvHeads = f.positiveInt('num_key_value_heads', numHeads);
  if (numHeads % numKvHeads !== 0)
    f.fail('num_key_value_heads', `(${numKvHeads}) must divide num_attention_heads (${numHeads})`);
  let headDim: number;
  if (f.get('head_dim') !== undefined) headDim = f.positiveInt('head_dim');
  else {
    if (hiddenSize % numHeads !== 0)
      f.fail(
        'hidden_size',
        `(${hiddenSize}) must be a multiple of num_attention_heads (${numHeads}) when head_dim is absent`,
      );
    headDim = hiddenSize / numHeads;
  }
  if (headDim % 2 !== 0) f.fail('head_dim', `(${headDim}) must be even for RoPE`);

  if (f.bool('mlp_bias', false)) f.fail('mlp_bias', 'is true, which is not supported');
  const llamaBias = (architecture === 'LlamaForCausalLM' || qwen3Moe) && f.bool('attention_bias', false);

  let slidingWindow: number | null = null;
  if (mistral) slidingWindow = f.nonNegativeIntOrNull('sliding_window');
  else if ((qwen || qwen3Moe) && f.bool('use_sliding_window', false))
    slidingWindow = f.nonNegativeIntOrNull('sliding_window');
  else if (qwen2Moe && f.bool('use_sliding_window', false))
    // transformers gives Qwen2-MoE a window on some layers only (layer_types, max_window_layers).
    f.fail('use_sliding_window', 'is true; per-layer sliding windows (Qwen2-MoE) are not supported');

  const hiddenAct = f.get('hidden_act');
  if (hiddenAct !== undefined && hiddenAct !== 'silu')
    f.fail('hidden_act', `is ${JSON.stringify(hiddenAct)}; only "silu" (SwiGLU) is supported`);

  const numLayers = f.positiveInt('num_hidden_layers');
  const moe = mixtral ? mixtralMoe(f) : qwen3Moe || qwen2Moe ? qwenMoeSpec(f, qwen2Moe, numLayers) : null;

  return {
    architecture,
    vocabSize: f.positiveInt('vocab_size'),
    hiddenSize,
    intermediateSize: f.positiveInt('intermediate_size'),
    numLayers,
    numHeads,
    numKvHeads,
    headDim,
    rmsNormEps: f.positiveNumber('rms_norm_eps', mixtral ? 1e-5 : 1e-6),
    ropeTheta: ropeThetaOf(f),
    ropeScaling: ropeScalingOf(f),
    maxPositionEmbeddings: f.positiveInt(
      'max_position_embeddings',
      qwen || qwen3Moe || qwen2Moe ? 32768 : mistral ? 4096 * 32 : 2048,
    ),
    tieWordEmbeddings: f.bool('tie_word_embeddings', false),
    // Qwen2-MoE: q/k/v bias unless qkv_bias is false (transformers 5's field; older files always have it).
    attentionBias: qwen || llamaBias || (qwen2Moe && f.bool('qkv_bias', true)),
    attentionOutputBias: llamaBias,
    slidingWindow,
    bosTokenId: f.nonNegativeIntOrNull('bos_token_id'),
    eosTokenIds: eosOf(f),
    torchDtype: dtypeOf(f),
    ...(moe && { qkNorm: qwen3Moe, moe }),
  };
}

function topKOf(f: Fields, numExperts: number, fallback: number): number {
  const topK = f.positiveInt('num_experts_per_tok', fallback);
  if (topK > numExperts)
    f.fail('num_experts_per_tok', `(${topK}) must be at most the number of experts (${numExperts})`);
  return topK;
}

/** Mixtral: num_local_experts SwiGLU experts of width intermediate_size; the top k always renormalised. */
function mixtralMoe(f: Fields): MoeSpec {
  const numExperts = f.positiveInt('num_local_experts', 8);
  return {
    numExperts,
    topK: topKOf(f, numExperts, 2),
    intermediateSize: f.positiveInt('intermediate_size'),
    normTopkProb: true,
  };
}

/**
 * Qwen3-MoE and Qwen2-MoE: num_experts (or num_local_experts) experts of width moe_intermediate_size, renormalised when norm_topk_prob;
 * Qwen2-MoE adds a shared expert of shared_expert_intermediate_size. As transformers' decoder layers decide it,
 * layer l is sparse unless it is in mlp_only_layers or (l + 1) is not a multiple of decoder_sparse_step; the
 * others are dense (moe.denseLayers).
 */
function qwenMoeSpec(f: Fields, qwen2Moe: boolean, numLayers: number): MoeSpec {
  // transformers 5 writes num_local_experts for these families too (its Qwen3-MoE config renamed num_experts).
  const numExperts =
    f.get('num_experts') !== undefined || f.get('num_local_experts') === undefined
      ? f.positiveInt('num_experts', qwen2Moe ? 60 : 128)
      : f.positiveInt('num_local_experts');
  const step = f.positiveInt('decoder_sparse_step', 1);
  const mlpOnly = f.get('mlp_only_layers') ?? [];
  if (
    !Array.isArray(mlpOnly) ||
    !mlpOnly.every((l) => typeof l === 'number' && Number.isSafeInteger(l) && l >= 0 && l < numLayers)
  )
    f.fail('mlp_only_layers', `must be a list of layer indices 0..${numLayers - 1}, got ${JSON.stringify(mlpOnly)}`);
  const denseLayers: number[] = [];
  for (let l = 0; l < numLayers; l++)
    if ((mlpOnly as number[]).includes(l) || (l + 1) % step !== 0) denseLayers.push(l);
  if (denseLayers.length === numLayers)
    f.fail(
      step > numLayers ? 'decoder_sparse_step' : 'mlp_only_layers',
      `leaves no sparse layer (decoder_sparse_step ${step}, mlp_only_layers ${JSON.stringify(mlpOnly)}, ${numLayers} layers)`,
    );
  const shared = qwen2Moe ? f.positiveInt('shared_expert_intermediate_size', 5632) : 0;
  return {
    numExperts,
    topK: topKOf(f, numExperts, qwen2Moe ? 4 : 8),
    intermediateSize: f.positiveInt('moe_intermediate_size', qwen2Moe ? 1408 : 768),
    normTopkProb: f.bool('norm_topk_prob', false),
    ...(shared > 0 && { sharedExpertIntermediateSize: shared }),
    ...(denseLayers.length > 0 && { denseLayers }),
  };
}

/** Reads and parses `<dir>/config.json` (or the file itself when `path` is a file). */
export function loadModelConfig(path: string): ModelConfig {
  let file = path;
  try {
    if (statSync(path).isDirectory()) file = join(path, 'config.json');
  } catch {
    throw new ModelConfigError(`${path}: no such model directory or config file`);
  }
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (e) {
    throw new ModelConfigError(`${file}: cannot read (${(e as Error).message})`);
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (e) {
    throw new ModelConfigError(`${file}: not valid JSON (${(e as Error).message})`);
  }
  return parseModelConfig(json, file);
}

export interface TensorSpec {
  name: string;
  shape: number[];
}

/**
 * The tensors a checkpoint of this config holds, with Hugging Face names and shapes, in a fixed order
 * (embedding, layers 0..N-1, final norm, lm_head unless tied): the weight manifest's names and shapes
 * (./manifest.ts, which also gives each tensor's role, dtype and sharding rule).
 */
export function expectedTensors(c: ModelConfig): TensorSpec[] {
  return weightManifest(c).map(({ name, shape }) => ({ name, shape }));
}

/** Number of parameters (elements) in the checkpoint of this config. */
export function parameterCount(c: ModelConfig): number {
  return expectedTensors(c).reduce((n, t) => n + t.shape.reduce((a, b) => a * b, 1), 0);
}

/** The config.json object (Hugging Face field names) that `parseModelConfig` reads back as `c`. */
export function toHfConfig(c: ModelConfig): Record<string, unknown> {
  const modelType = Object.entries(MODEL_TYPES).find(([, a]) => a === c.architecture)![0];
  const out: Record<string, unknown> = {
    architectures: [c.architecture],
    model_type: modelType,
    vocab_size: c.vocabSize,
    hidden_size: c.hiddenSize,
    intermediate_size: c.intermediateSize,
    num_hidden_layers: c.numLayers,
    num_attention_heads: c.numHeads,
    num_key_value_heads: c.numKvHeads,
    head_dim: c.headDim,
    hidden_act: 'silu',
    rms_norm_eps: c.rmsNormEps,
    rope_theta: c.ropeTheta,
    rope_scaling: c.ropeScaling && {
      rope_type: 'llama3',
      factor: c.ropeScaling.factor,
      low_freq_factor: c.ropeScaling.lowFreqFactor,
      high_freq_factor: c.ropeScaling.highFreqFactor,
      original_max_position_embeddings: c.ropeScaling.originalMaxPositionEmbeddings,
    },
    max_position_embeddings: c.maxPositionEmbeddings,
    tie_word_embeddings: c.tieWordEmbeddings,
    bos_token_id: c.bosTokenId,
    eos_token_id: c.eosTokenIds.length === 1 ? c.eosTokenIds[0] : c.eosTokenIds,
    torch_dtype: c.torchDtype,
  };
  if (c.architecture === 'LlamaForCausalLM') {
    out.attention_bias = c.attentionOutputBias;
    out.mlp_bias = false;
  } else if (c.architecture === 'MistralForCausalLM') out.sliding_window = c.slidingWindow;
  else if (c.architecture === 'MixtralForCausalLM') {
    out.sliding_window = c.slidingWindow;
    out.num_local_experts = c.moe!.numExperts;
    out.num_experts_per_tok = c.moe!.topK;
    out.intermediate_size = c.moe!.intermediateSize;
  } else if (c.architecture === 'Qwen3MoeForCausalLM' || c.architecture === 'Qwen2MoeForCausalLM') {
    if (c.architecture === 'Qwen3MoeForCausalLM') out.attention_bias = c.attentionOutputBias;
    else out.qkv_bias = c.attentionBias;
    out.use_sliding_window = c.slidingWindow !== null;
    if (c.slidingWindow !== null) out.sliding_window = c.slidingWindow;
    out.num_experts = c.moe!.numExperts;
    out.num_experts_per_tok = c.moe!.topK;
    out.moe_intermediate_size = c.moe!.intermediateSize;
    out.norm_topk_prob = c.moe!.normTopkProb;
    if (c.moe!.sharedExpertIntermediateSize) out.shared_expert_intermediate_size = c.moe!.sharedExpertIntermediateSize;
    out.decoder_sparse_step = 1;
    out.mlp_only_layers = c.moe!.denseLayers ?? [];
  } else {
    out.use_sliding_window = c.slidingWindow !== null;
    if (c.slidingWindow !== null) out.sliding_window = c.slidingWindow;
  }
  return out;
}
