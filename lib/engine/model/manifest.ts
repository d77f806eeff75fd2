/**
 * The weight manifest: for a model config, every tensor the engines take, with its Hugging Face safetensors name,
 * shape, checkpoint dtype, what it is in the model (`role`, `layer`) and how tensor parallelism splits it
 * (`shard`). It is the one place weight names are written out: the native runners (CpuLlama, CudaLlama) lay their
 * memory out from the manifest's roles and register the names it gives, and checkpoint loading checks files
 * against it.
 *
 *   const manifest = weightManifest(config);
 *   checkCheckpointTensors(manifest, checkpoint, dir);   // CheckpointError naming a missing / extra / misshapen one
 */
import { CheckpointError } from '../../errors.js';
import { isSparseLayer, type ModelConfig, type TorchDtype } from './config.js';

/**
 * How tensor parallelism splits a tensor over ranks (issue 25):
 * - `replicated`: every rank holds all of it (norms, o_proj's bias);
 * - `column`: split along the output dimension (dim 0 of a [out, in] weight, or a bias): q/k/v, gate, up;
 * - `row`: split along the input dimension (dim 1): o_proj, down_proj; partial outputs are summed (all-reduce);
 * - `vocab`: split along the vocabulary (dim 0): the embedding and lm_head;
 * - `expert`: one expert's gate / up / down (issue 28): on the rank its expert is placed on under expert
 *   parallelism (whole; lib/engine/parallel.ts's expertShard, contiguous like lib/moe's staticPlacement), and split
 *   like the dense gate / up (dim 0) and down (dim 1) over the tensor-parallel ranks that share every expert (ep 1);
 * - `shared_expert`: Qwen2-MoE's shared expert's gate / up / down: split like the dense gate / up (dim 0) and down
 *   (dim 1) over the tensor-parallel ranks (ep 1), whole on every rank under expert parallelism (ep > 1), so that
 *   EP ranks compute it exactly as one rank does.
 */
export type ShardRule = 'replicated' | 'column' | 'row' | 'vocab' | 'expert' | 'shared_expert';

/** What a tensor is in a Llama-family decoder; the native runners place tensors by role. */
export const WEIGHT_ROLES = [
  'embed',
  'input_norm',
  'q',
  'q_bias',
  'k',
  'k_bias',
  'v',
  'v_bias',
  'o',
  'o_bias',
  'post_norm',
  'gate',
  'up',
  'down',
  'final_norm',
  'lm_head',
  // Qwen3's per-head q/k RMSNorm, and the mixture-of-experts FFN (router, then each expert's SwiGLU weights).
  'q_norm',
  'k_norm',
  'router',
  'expert_gate',
  'expert_up',
  'expert_down',
  // Qwen2-MoE's shared expert (gate / up / down) and its gate [1, hidden] (sigmoid, scales the shared output).
  'shared_gate',
  'shared_up',
  'shared_down',
  'shared_expert_gate',
] as const;
export type WeightRole = (typeof WEIGHT_ROLES)[number];

/** safetensors dtype names of the checkpoint dtypes the engines read. */
export type CheckpointDtype = 'BF16' | 'F16' | 'F32';

export interface ManifestTensor {
  /** The Hugging Face safetensors name. */
  name: string;
  /** Row-major shape as the checkpoint stores it ([out, in] for a projection). */
  shape: number[];
  /** The dtype config.json declares for the checkpoint (the engines convert BF16/F16/F32 alike). */
  dtype: CheckpointDtype;
  role: WeightRole;
  /** The decoder layer, or -1 for the embedding, final norm and lm_head. */
  layer: number;
  /** The expert of an expert_gate / expert_up / expert_down tensor; absent for the rest. */
  expert?: number;
  shard: ShardRule;
}

const DTYPE_OF: Record<TorchDtype, CheckpointDtype> = { bfloat16: 'BF16', float16: 'F16', float32: 'F32' };

const SHARD_OF: Record<WeightRole, ShardRule> = {
  embed: 'vocab',
  input_norm: 'replicated',
  q: 'column',
  q_bias: 'column',
  k: 'column',
  k_bias: 'column',
  v: 'column',
  v_bias: 'column',
  o: 'row',
  o_bias: 'replicated',
  post_norm: 'replicated',
  gate: 'column',
  up: 'column',
  down: 'row',
  final_norm: 'replicated',
  lm_head: 'vocab',
  q_norm: 'replicated',
  k_norm: 'replicated',
  router: 'replicated',
  expert_gate: 'expert',
  expert_up: 'expert',
  expert_down: 'expert',
  shared_gate: 'shared_expert',
  shared_up: 'shared_expert',
  shared_down: 'shared_expert',
  shared_expert_gate: 'replicated',
};

/**
 * Where a family keeps its MoE tensors under `model.layers.<l>.`: the router, and an expert's gate / up / down
 * projections under `<experts>.<e>.`. These are the checkpoints' per-expert names (transformers 5 fuses experts
 * in memory but saves this layout by default).
 */
const MOE_NAMES: Partial<
  Record<ModelConfig['architecture'], { router: string; experts: string; gate: string; up: string; down: string }>
> = {
  MixtralForCausalLM: {
    router: 'block_sparse_moe.gate.weight',
    experts: 'block_sparse_moe.experts',
    gate: 'w1.weight',
    up: 'w3.weight',
    down: 'w2.weight',
  },
  Qwen3MoeForCausalLM: {
    router: 'mlp.gate.weight',
    experts: 'mlp.experts',
    gate: 'gate_proj.weight',
    up: 'up_proj.weight',
    down: 'down_proj.weight',
  },
  Qwen2MoeForCausalLM: {
    router: 'mlp.gate.weight',
    experts: 'mlp.experts',
    gate: 'gate_proj.weight',
    up: 'up_proj.weight',
    down: 'down_proj.weight',
  },
};

/**
 * The tensors of a config, in checkpoint order (embedding, layers 0..N-1, final norm, lm_head unless tied).
 * Biases appear only where the config has them (Qwen2's q/k/v bias, attentionOutputBias). A mixture-of-experts
 * layer has a router and numExperts x (gate, up, down) in place of the dense gate / up / down, then Qwen2-MoE's
 * shared expert (`mlp.shared_expert.{gate,up,down}_proj`, `mlp.shared_expert_gate`); a dense layer of an MoE
 * model (moe.denseLayers) has the dense gate / up / down.
 */
export function weightManifest(c: ModelConfig): ManifestTensor[] {
  const dtype = DTYPE_OF[c.torchDtype] ?? 'BF16';
  const q = c.numHeads * c.headDim;
  const kv = c.numKvHeads * c.headDim;
  const h = c.hiddenSize;
  const out: ManifestTensor[] = [];
  const add = (name: string, shape: number[], role: WeightRole, layer = -1, expert?: number) =>
    out.push({ name, shape, dtype, role, layer, ...(expert !== undefined && { expert }), shard: SHARD_OF[role] });
  const moe = c.moe ?? null;
  const moeNames = moe && MOE_NAMES[c.architecture];
  if (moe && !moeNames)
    throw new CheckpointError(`${c.architecture}: no mixture-of-experts tensor names for this architecture`);
  add('model.embed_tokens.weight', [c.vocabSize, h], 'embed');
  for (let l = 0; l < c.numLayers; l++) {
    const p = `model.layers.${l}.`;
    add(`${p}input_layernorm.weight`, [h], 'input_norm', l);
    add(`${p}self_attn.q_proj.weight`, [q, h], 'q', l);
    if (c.attentionBias) add(`${p}self_attn.q_proj.bias`, [q], 'q_bias', l);
    if (c.qkNorm) {
      add(`${p}self_attn.q_norm.weight`, [c.headDim], 'q_norm', l);
      add(`${p}self_attn.k_norm.weight`, [c.headDim], 'k_norm', l);
    }
    add(`${p}self_attn.k_proj.weight`, [kv, h], 'k', l);
    if (c.attentionBias) add(`${p}self_attn.k_proj.bias`, [kv], 'k_bias', l);
    add(`${p}self_attn.v_proj.weight`, [kv, h], 'v', l);
    if (c.attentionBias) add(`${p}self_attn.v_proj.bias`, [kv], 'v_bias', l);
    add(`${p}self_attn.o_proj.weight`, [h, q], 'o', l);
    if (c.attentionOutputBias) add(`${p}self_attn.o_proj.bias`, [h], 'o_bias', l);
    add(`${p}post_attention_layernorm.weight`, [h], 'post_norm', l);
    if (moe && moeNames && isSparseLayer(c, l)) {
      const mi = moe.intermediateSize;
      add(`${p}${moeNames.router}`, [moe.numExperts, h], 'router', l);
      for (let e = 0; e < moe.numExperts; e++) {
        const x = `${p}${moeNames.experts}.${e}.`;
        add(`${x}${moeNames.gate}`, [mi, h], 'expert_gate', l, e);
        add(`${x}${moeNames.up}`, [mi, h], 'expert_up', l, e);
        add(`${x}${moeNames.down}`, [h, mi], 'expert_down', l, e);
      }
      const si = moe.sharedExpertIntermediateSize ?? 0;
      if (si > 0) {
        add(`${p}mlp.shared_expert.gate_proj.weight`, [si, h], 'shared_gate', l);
        add(`${p}mlp.shared_expert.up_proj.weight`, [si, h], 'shared_up', l);
        add(`${p}mlp.shared_expert.down_proj.weight`, [h, si], 'shared_down', l);
        add(`${p}mlp.shared_expert_gate.weight`, [1, h], 'shared_expert_gate', l);
      }
      continue;
    }
    add(`${p}mlp.gate_proj.weight`, [c.intermediateSize, h], 'gate', l);
    add(`${p}mlp.up_proj.weight`, [c.intermediateSize, h], 'up', l);
    add(`${p}mlp.down_proj.weight`, [h, c.intermediateSize], 'down', l);
  }
  add('model.norm.weight', [h], 'final_norm');
  if (!c.tieWordEmbeddings) add('lm_head.weight', [c.vocabSize, h], 'lm_head');
  return out;
}

/** Elements of one manifest tensor. */
export function tensorElements(t: { shape: readonly number[] }): number {
  return t.shape.reduce((a, b) => a * b, 1);
}

/** The manifest as the native runners' `tensors` option takes it: name, role and layer of each tensor. */
export function nativeManifest(
  manifest: readonly ManifestTensor[],
): { name: string; role: WeightRole; layer: number; expert?: number }[] {
  return manifest.map(({ name, role, layer, expert }) => ({
    name,
    role,
    layer,
    ...(expert !== undefined && { expert }),
  }));
}

/** What checkCheckpointTensors needs of a checkpoint: its tensor names and each one's shape. */
export interface CheckpointTensorList {
  listTensors(): string[];
  info(name: string): { shape: number[] };
}

/**
 * Checks a checkpoint against a manifest before any weight loads: every manifest tensor present with the
 * manifest's shape, and no tensor the model would not use. Throws CheckpointError naming the first tensor at
 * fault (`where` is the checkpoint's path). A tied model's lm_head.weight, which some checkpoints keep, and
 * rotary tables (`rotary_emb.inv_freq`, computed from the config) are not errors.
 */
export function checkCheckpointTensors(
  manifest: readonly ManifestTensor[],
  checkpoint: CheckpointTensorList,
  where: string,
): void {
  const present = new Set(checkpoint.listTensors());
  const wanted = new Set<string>();
  for (const t of manifest) {
    wanted.add(t.name);
    if (!present.has(t.name))
      throw new CheckpointError(`${where}: checkpoint has no tensor "${t.name}", which this config needs`);
    const shape = checkpoint.info(t.name).shape;
    if (shape.length !== t.shape.length || shape.some((d, i) => d !== t.shape[i]))
      throw new CheckpointError(
        `${where}: tensor "${t.name}" has shape ${JSON.stringify(shape)}; the config needs ${JSON.stringify(t.shape)}`,
      );
  }
  for (const name of present) {
    if (wanted.has(name) || name === 'lm_head.weight' || name.endsWith('rotary_emb.inv_freq')) continue;
    throw new CheckpointError(
      `${where}: checkpoint tensor "${name}" is not part of this model's weight manifest (a config that does not match the checkpoint?)`,
    );
  }
}
