/**
 * A host model of what a device returns for a SamplePlan (the contract of `ModelRunner.forwardSampled`, which
 * tandem_sample_* in native/kernels/llama.cu implement on the GPU), and a FakeRunner that offers it, so that the
 * sampler's and the engine's device-sampling paths are checked without a GPU.
 */
import {
  SAMPLE_EXP_SUM,
  SAMPLE_FULL_ROW,
  SAMPLE_LSE,
  SAMPLE_PLAIN,
  SAMPLE_TOP_P,
  type ForwardBatch,
  type SampledLogits,
  type SamplePlan,
} from '../../lib/engine/runner.js';
import { FakeRunner } from './fake-runner.js';

export function sampleOnHost(logits: Float32Array, vocabSize: number, plan: SamplePlan): SampledLogits {
  const V = vocabSize;
  const nseq = plan.n.length;
  let maxN = 1;
  for (const n of plan.n) maxN = Math.max(maxN, n);
  const ints = new Int32Array(nseq * 4);
  const dbl = new Float64Array(nseq * 4);
  const topIds = new Int32Array(nseq * maxN).fill(-1);
  const topLogits = new Float32Array(nseq * maxN).fill(-Infinity);
  const fullRows: number[] = [];
  for (let r = 0; r < nseq; r++) {
    const n = plan.n[r]!;
    if (n <= 0) {
      ints[r * 4] = ints[r * 4 + 1] = -1;
      continue;
    }
    const flags = plan.flags[r]!;
    const row = logits.subarray(r * V, (r + 1) * V);
    const val = (i: number) => (Number.isNaN(row[i]!) ? -Infinity : row[i]!);
    const order = Array.from({ length: V }, (_, i) => i).sort((a, b) => val(b) - val(a) || a - b);
    for (let k = 0; k < Math.min(n, V); k++) {
      topIds[r * maxN + k] = order[k]!;
      topLogits[r * maxN + k] = val(order[k]!);
    }
    const max = val(order[0]!);
    const invT = plan.invT[r]!;
    ints[r * 4] = order[0]!;
    ints[r * 4 + 1] = order[0]!;
    dbl[r * 4] = max;
    if (flags & SAMPLE_LSE) {
      let s = 0;
      for (let i = 0; i < V; i++) s += Math.exp(val(i) - max);
      dbl[r * 4 + 2] = max + Math.log(s);
    }
    if (flags & (SAMPLE_EXP_SUM | SAMPLE_PLAIN | SAMPLE_TOP_P)) {
      let expSum = 0;
      for (let i = 0; i < V; i++) expSum += Math.exp((val(i) - max) * invT);
      dbl[r * 4 + 1] = expSum;
      if (flags & SAMPLE_PLAIN) {
        const target = plan.u[r]! * expSum;
        let acc = 0;
        let last = -1;
        let pick = -1;
        for (let i = 0; i < V && pick < 0; i++) {
          const w = Math.exp((val(i) - max) * invT);
          if (w > 0) last = i;
          acc += w;
          if (acc > target) pick = i;
        }
        ints[r * 4 + 1] = pick >= 0 ? pick : last >= 0 ? last : order[0]!;
        dbl[r * 4 + 3] = row[ints[r * 4 + 1]!]!;
      }
      if (flags & SAMPLE_TOP_P) {
        let cum = 0;
        for (let k = 0; k < Math.min(n, V); k++) cum += Math.exp((val(order[k]!) - max) * invT);
        ints[r * 4 + 2] = cum < plan.topP[r]! * expSum * (1 + 1e-9) ? 1 : 0;
      }
    }
    if (flags & SAMPLE_FULL_ROW || ints[r * 4 + 2]) fullRows.push(r);
  }
  const full = new Float32Array(fullRows.length * V);
  fullRows.forEach((r, i) => full.set(logits.subarray(r * V, (r + 1) * V), i * V));
  return { vocabSize: V, maxN, ints, dbl, topIds, topLogits, fullRows: Int32Array.from(fullRows), full };
}

/** FakeRunner with `forwardSampled`: the same logits, answered through `sampleOnHost`. */
export class FakeSampledRunner extends FakeRunner {
  readonly plans: SamplePlan[] = [];

  async forwardSampled(batch: ForwardBatch, plan: SamplePlan): Promise<SampledLogits> {
    this.plans.push(plan);
    return sampleOnHost(await this.forward(batch), this.vocabSize, plan);
  }
}
