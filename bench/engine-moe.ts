/**
 * What bench:engine counts for a mixture-of-experts model (issue 28): a token multiplies only its topK experts' weights
 * (FLOPs), and a decode step reads only the experts its batch routes to (the memory bound). Dense models: every expert
 * term is zero and the counts are the whole layers'.
 *
 * The experts a decode step of B sequences reads in a layer are counted as uniform routing would spread them: each
 * expert escapes all B tokens' top-k with probability (1 - k/E)^B, so E * (1 - (1 - k/E)^B) experts are read (k
 * at B = 1; all E as B grows). Skewed routing reads fewer, so the bound it gives is a little higher than the true one.
 */
import type { ModelConfig } from '../lib/engine/model/config.js';

/** Experts (of `numExperts`, `topK` per token) that a batch of `batch` tokens reaches per layer under uniform routing. */
export function expectedActiveExperts(numExperts: number, topK: number, batch: number): number {
  if (batch <= 0) return 0;
  return numExperts * (1 - (1 - topK / numExperts) ** batch);
}

/** Elements of one expert's gate, up and down projections in every layer together. */
export function expertParamsPerLayerSet(config: ModelConfig): number {
  const moe = config.moe;
  return moe ? config.numLayers * 3 * moe.intermediateSize * config.hiddenSize : 0;
}

/**
 * Weight elements a decode step of `batch` sequences multiplies: `body` (every layer weight and the final norm) with
 * only the routed experts counted, plus the lm_head. For a dense model, body + lmHead whatever the batch.
 */
export function decodeWeightsRead(config: ModelConfig, body: number, lmHead: number, batch: number): number {
  const moe = config.moe;
  if (!moe) return body + lmHead;
  const perExpert = expertParamsPerLayerSet(config);
  return (
    body - moe.numExperts * perExpert + expectedActiveExperts(moe.numExperts, moe.topK, batch) * perExpert + lmHead
  );
}

/** Weight elements one token multiplies in the layers (its FLOPs / 2): `body` with only topK experts per layer. */
export function activeBodyParams(config: ModelConfig, body: number): number {
  const moe = config.moe;
  return moe ? body - (moe.numExperts - moe.topK) * expertParamsPerLayerSet(config) : body;
}
