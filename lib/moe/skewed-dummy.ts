/**
 * Dummy MoE weights whose gates favour a few experts, for EPLB tests and bench:eplb: every token's embedding gets
 * a large first coordinate, so the normalised FFN input has a near-constant one (about hidden / sqrt(4 + 1) ~ 7
 * after RMSNorm for dummy:tiny-moe), and router weights on that coordinate act as per-expert biases falling with
 * Zipf(1) over a random order of experts per layer.
 */
import type { NamedTensor } from '../engine/cpu.js';
import type { ModelConfig } from '../engine/model/config.js';
import { dummyWeights } from '../engine/model/dummy.js';

const FIRST = 2;
const NORMALISED_FIRST = 7;

/** `dummyWeights(config, seed)` with skewed gates; `random` (uniform in [0, 1)) draws each layer's expert order. */
export function skewedMoeWeights(config: ModelConfig, seed: number, random: () => number): NamedTensor[] {
  const numExperts = config.moe?.numExperts ?? 0;
  return [...dummyWeights(config, seed)].map((t) => {
    if (t.name === 'model.embed_tokens.weight')
      for (let row = 0; row < config.vocabSize; row++) t.data[row * config.hiddenSize] = FIRST;
    if (t.name.endsWith('.mlp.gate.weight')) {
      const order = Array.from({ length: numExperts }, (_, i) => i);
      for (let i = numExperts - 1; i > 0; i--) {
        const j = Math.floor(random() * (i + 1));
        [order[i], order[j]] = [order[j]!, order[i]!];
      }
      order.forEach((e, rank) => (t.data[e * config.hiddenSize] = (-Math.log(rank + 1) / NORMALISED_FIRST) * 3));
    }
    return { name: t.name, data: t.data };
  });
}
