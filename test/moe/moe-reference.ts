/**
 * The sparse MoE block in float64, written from transformers' MixtralSparseMoeBlock / Qwen3MoeSparseMoeBlock /
 * Qwen2MoeSparseMoeBlock with plain loops: router logits, softmax over all experts, the top k (ties: the lower
 * index), renormalised over the k when normTopkProb, each chosen expert's SwiGLU (down(silu(gate x) * up x))
 * weighted and summed; then Qwen2-MoE's shared expert, its SwiGLU scaled by sigmoid(shared_expert_gate . x), added.
 */
import type { MoeSpec } from '../../lib/engine/model/config.js';

export interface MoeBlockWeights {
  /** [numExperts, hidden] */
  router: Float32Array;
  /** per expert: gate [inter, hidden], up [inter, hidden], down [hidden, inter] */
  experts: { gate: Float32Array; up: Float32Array; down: Float32Array }[];
  /** Qwen2-MoE: the shared expert (gate / up [sharedInter, hidden], down [hidden, sharedInter]) and its gate [1, hidden]. */
  shared?: { gate: Float32Array; up: Float32Array; down: Float32Array; expertGate: Float32Array };
}

function matvec(w: Float32Array, x: ArrayLike<number>, rows: number, cols: number): Float64Array {
  const y = new Float64Array(rows);
  for (let r = 0; r < rows; r++) {
    let s = 0;
    for (let c = 0; c < cols; c++) s += w[r * cols + c]! * x[c]!;
    y[r] = s;
  }
  return y;
}

/** The experts token x goes to, with their weights, in the order chosen. */
export function routeToken(
  spec: MoeSpec,
  router: Float32Array,
  x: ArrayLike<number>,
): { expert: number; weight: number }[] {
  const logits = matvec(router, x, spec.numExperts, x.length);
  const max = Math.max(...logits);
  const e = logits.map((v) => Math.exp(v - max));
  const sum = e.reduce((a, b) => a + b, 0);
  const prob = e.map((v) => v / sum);
  const order = Array.from({ length: spec.numExperts }, (_, i) => i).sort((a, b) => prob[b]! - prob[a]! || a - b);
  const top = order.slice(0, spec.topK);
  const kept = top.reduce((s, i) => s + prob[i]!, 0);
  return top.map((i) => ({ expert: i, weight: spec.normTopkProb ? prob[i]! / kept : prob[i]! }));
}

function swiglu(
  ex: { gate: Float32Array; up: Float32Array; down: Float32Array },
  x: Float64Array,
  I: number,
): Float64Array {
  const H = x.length;
  const gate = matvec(ex.gate, x, I, H);
  const up = matvec(ex.up, x, I, H);
  const act = gate.map((g, i) => (g / (1 + Math.exp(-g))) * up[i]!);
  return matvec(ex.down, act, H, I);
}

/** The block's output for one token; adds 1 to `tokensPerExpert[e]` for each expert it routes to. */
export function moeBlock(spec: MoeSpec, w: MoeBlockWeights, x: Float64Array, tokensPerExpert?: number[]): Float64Array {
  const H = x.length;
  const out = new Float64Array(H);
  for (const { expert, weight } of routeToken(spec, w.router, x)) {
    if (tokensPerExpert) tokensPerExpert[expert] = (tokensPerExpert[expert] ?? 0) + 1;
    const down = swiglu(w.experts[expert]!, x, spec.intermediateSize);
    for (let d = 0; d < H; d++) out[d] = out[d]! + weight * down[d]!;
  }
  if (w.shared) {
    const scale = 1 / (1 + Math.exp(-matvec(w.shared.expertGate, x, 1, H)[0]!));
    const down = swiglu(w.shared, x, spec.sharedExpertIntermediateSize!);
    for (let d = 0; d < H; d++) out[d] = out[d]! + scale * down[d]!;
  }
  return out;
}
