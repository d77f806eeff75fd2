/**
 * A slow, obviously-correct Llama-family forward pass in float64, for checking the native CPU runner. One
 * sequence at a time, one token at a time, with a contiguous KV cache (no paging): each token runs through
 * every layer, appends its K and V to its layer's cache, and attends over the cache so far. Follows
 * transformers' LlamaForCausalLM / Qwen2ForCausalLM / MistralForCausalLM line by line.
 */
import { isSparseLayer, type ModelConfig } from '../../lib/engine/model/config.js';
import { weightManifest } from '../../lib/engine/model/manifest.js';
import { moeBlock, type MoeBlockWeights } from '../moe/moe-reference.js';

export type Weights = ReadonlyMap<string, Float32Array>;

/** theta^(-2i/d) as float32 (as transformers computes it), with llama3 scaling when the config has it. */
export function ropeInvFreq(c: ModelConfig): number[] {
  const out: number[] = [];
  for (let i = 0; i < c.headDim / 2; i++) {
    let f = 1 / Math.pow(c.ropeTheta, (2 * i) / c.headDim);
    const s = c.ropeScaling;
    if (s) {
      const lowFreqWavelen = s.originalMaxPositionEmbeddings / s.lowFreqFactor;
      const highFreqWavelen = s.originalMaxPositionEmbeddings / s.highFreqFactor;
      const wavelen = (2 * Math.PI) / f;
      if (wavelen > lowFreqWavelen) f = f / s.factor;
      else if (wavelen >= highFreqWavelen) {
        const smooth =
          (s.originalMaxPositionEmbeddings / wavelen - s.lowFreqFactor) / (s.highFreqFactor - s.lowFreqFactor);
        f = ((1 - smooth) * f) / s.factor + smooth * f;
      }
    }
    out.push(Math.fround(f));
  }
  return out;
}

/** y = W x (+ b): W is [rows, cols] row-major, as in Hugging Face checkpoints (y = x W^T). */
function matvec(w: Float32Array, x: ArrayLike<number>, rows: number, cols: number, bias?: Float32Array): Float64Array {
  const y = new Float64Array(rows);
  for (let r = 0; r < rows; r++) {
    let s = 0;
    const o = r * cols;
    for (let c = 0; c < cols; c++) s += w[o + c]! * x[c]!;
    y[r] = s + (bias ? bias[r]! : 0);
  }
  return y;
}

function rmsNorm(x: Float64Array, weight: Float32Array, eps: number): Float64Array {
  let ss = 0;
  for (const v of x) ss += v * v;
  const scale = 1 / Math.sqrt(ss / x.length + eps);
  return x.map((v, i) => weight[i]! * v * scale);
}

/** HF rotate_half RoPE on one head in place: out = x * cos + rotate_half(x) * sin. */
function rope(head: Float64Array, pos: number, invFreq: number[]): void {
  const half = head.length / 2;
  for (let i = 0; i < half; i++) {
    const angle = Math.fround(pos * invFreq[i]!);
    const cos = Math.cos(angle);
    const sin = Math.sin(angle);
    const a = head[i]!;
    const b = head[i + half]!;
    head[i] = a * cos - b * sin;
    head[i + half] = b * cos + a * sin;
  }
}

export class ReferenceSequence {
  /** k[layer][position]: K of that position after RoPE, kvHeads * headDim values ([head][dim]). */
  readonly k: Float64Array[][];
  readonly v: Float64Array[][];
  constructor(layers: number) {
    this.k = Array.from({ length: layers }, () => []);
    this.v = Array.from({ length: layers }, () => []);
  }
  get length(): number {
    return this.k[0]!.length;
  }
}

export class LlamaReference {
  private readonly invFreq: number[];
  /** MoE models: tokens routed per layer and expert (layer-major) since construction. */
  readonly expertTokens: number[];

  constructor(
    readonly config: ModelConfig,
    private readonly weights: Weights,
  ) {
    this.invFreq = ropeInvFreq(config);
    this.expertTokens = new Array<number>(config.numLayers * (config.moe?.numExperts ?? 0)).fill(0);
  }

  /** Layer l's router and experts (and shared expert), by the manifest's roles. */
  private moeWeights(l: number): MoeBlockWeights {
    const m = weightManifest(this.config).filter((t) => t.layer === l);
    const byRole = (role: string, e?: number) => this.w(m.find((t) => t.role === role && t.expert === e)!.name);
    return {
      ...(this.config.moe!.sharedExpertIntermediateSize && {
        shared: {
          gate: byRole('shared_gate'),
          up: byRole('shared_up'),
          down: byRole('shared_down'),
          expertGate: byRole('shared_expert_gate'),
        },
      }),
      router: byRole('router'),
      experts: Array.from({ length: this.config.moe!.numExperts }, (_, e) => ({
        gate: byRole('expert_gate', e),
        up: byRole('expert_up', e),
        down: byRole('expert_down', e),
      })),
    };
  }

  private w(name: string): Float32Array {
    const t = this.weights.get(name);
    if (!t) throw new Error(`reference: no tensor ${name}`);
    return t;
  }

  newSequence(): ReferenceSequence {
    return new ReferenceSequence(this.config.numLayers);
  }

  /** Appends `tokens` to `seq` and returns the logits of the last one. */
  forward(seq: ReferenceSequence, tokens: readonly number[]): Float64Array {
    let logits: Float64Array = new Float64Array(0);
    for (const token of tokens) logits = this.step(seq, token);
    return logits;
  }

  private step(seq: ReferenceSequence, token: number): Float64Array {
    const c = this.config;
    const H = c.hiddenSize;
    const hd = c.headDim;
    const pos = seq.length;
    const embed = this.w('model.embed_tokens.weight');
    let x = Float64Array.from(embed.subarray(token * H, (token + 1) * H));
    for (let l = 0; l < c.numLayers; l++) {
      const p = `model.layers.${l}.`;
      const bias = (n: string) => (c.attentionBias ? this.w(`${p}self_attn.${n}_proj.bias`) : undefined);
      const xn = rmsNorm(x, this.w(`${p}input_layernorm.weight`), c.rmsNormEps);
      const q = matvec(this.w(`${p}self_attn.q_proj.weight`), xn, c.numHeads * hd, H, bias('q'));
      const k = matvec(this.w(`${p}self_attn.k_proj.weight`), xn, c.numKvHeads * hd, H, bias('k'));
      const v = matvec(this.w(`${p}self_attn.v_proj.weight`), xn, c.numKvHeads * hd, H, bias('v'));
      if (c.qkNorm) {
        // Qwen3: RMSNorm over each head's dimensions before RoPE
        const normHeads = (t: Float64Array, n: number, w: Float32Array) => {
          for (let h = 0; h < n; h++) t.set(rmsNorm(t.slice(h * hd, (h + 1) * hd), w, c.rmsNormEps), h * hd);
        };
        normHeads(q, c.numHeads, this.w(`${p}self_attn.q_norm.weight`));
        normHeads(k, c.numKvHeads, this.w(`${p}self_attn.k_norm.weight`));
      }
      for (let h = 0; h < c.numHeads; h++) rope(q.subarray(h * hd, (h + 1) * hd), pos, this.invFreq);
      for (let h = 0; h < c.numKvHeads; h++) rope(k.subarray(h * hd, (h + 1) * hd), pos, this.invFreq);
      seq.k[l]!.push(k);
      seq.v[l]!.push(v);

      const attn = new Float64Array(c.numHeads * hd);
      const group = c.numHeads / c.numKvHeads;
      const first = c.slidingWindow ? Math.max(0, pos - c.slidingWindow + 1) : 0;
      for (let h = 0; h < c.numHeads; h++) {
        const kvh = Math.floor(h / group);
        const scores: number[] = [];
        for (let j = first; j <= pos; j++) {
          let s = 0;
          const kj = seq.k[l]![j]!;
          for (let d = 0; d < hd; d++) s += q[h * hd + d]! * kj[kvh * hd + d]!;
          scores.push(s / Math.sqrt(hd));
        }
        const max = Math.max(...scores);
        const e = scores.map((s) => Math.exp(s - max));
        const sum = e.reduce((a, b) => a + b, 0);
        for (let j = first; j <= pos; j++) {
          const vj = seq.v[l]![j]!;
          const pj = e[j - first]! / sum;
          for (let d = 0; d < hd; d++) attn[h * hd + d] = attn[h * hd + d]! + pj * vj[kvh * hd + d]!;
        }
      }
      const o = matvec(
        this.w(`${p}self_attn.o_proj.weight`),
        attn,
        H,
        c.numHeads * hd,
        c.attentionOutputBias ? this.w(`${p}self_attn.o_proj.bias`) : undefined,
      );
      x = x.map((v, i) => v + o[i]!);

      const xn2 = rmsNorm(x, this.w(`${p}post_attention_layernorm.weight`), c.rmsNormEps);
      if (c.moe && isSparseLayer(c, l)) {
        const counts = new Array<number>(c.moe.numExperts).fill(0);
        const y = moeBlock(c.moe, this.moeWeights(l), xn2, counts);
        counts.forEach((n, e) => (this.expertTokens[l * c.moe!.numExperts + e]! += n));
        x = x.map((v, i) => v + y[i]!);
        continue;
      }
      const I = c.intermediateSize;
      const gate = matvec(this.w(`${p}mlp.gate_proj.weight`), xn2, I, H);
      const up = matvec(this.w(`${p}mlp.up_proj.weight`), xn2, I, H);
      const act = gate.map((g, i) => (g / (1 + Math.exp(-g))) * up[i]!);
      const down = matvec(this.w(`${p}mlp.down_proj.weight`), act, H, I);
      x = x.map((v, i) => v + down[i]!);
    }
    const final = rmsNorm(x, this.w('model.norm.weight'), c.rmsNormEps);
    const head = c.tieWordEmbeddings ? embed : this.w('lm_head.weight');
    return matvec(head, final, c.vocabSize, H);
  }
}
