/**
 * Expert load over a sliding window of steps: tokens routed per layer and expert in each of the last
 * `windowSteps` steps, and their sums. Steps are recorded as flat layer-major counts (layer * numExperts +
 * expert), the shape the engine reports them in.
 */
import { BadArgumentError } from '../errors.js';

export class ExpertLoadWindow {
  private readonly ring: Float64Array;
  private readonly sum: Float64Array;
  private next = 0;
  private filled = 0;
  private recorded = 0;

  constructor(
    readonly numLayers: number,
    readonly numExperts: number,
    readonly windowSteps: number,
  ) {
    for (const [name, v] of [
      ['numLayers', numLayers],
      ['numExperts', numExperts],
      ['windowSteps', windowSteps],
    ] as const)
      if (!Number.isInteger(v) || v < 1)
        throw new BadArgumentError(`ExpertLoadWindow: ${name} must be an integer >= 1 (got ${v})`);
    this.ring = new Float64Array(windowSteps * numLayers * numExperts);
    this.sum = new Float64Array(numLayers * numExperts);
  }

  /** Records one step's tokens per layer and expert (flat, layer-major); the oldest step leaves the window. */
  record(counts: ArrayLike<number>): void {
    const n = this.numLayers * this.numExperts;
    if (counts.length !== n)
      throw new BadArgumentError(
        `ExpertLoadWindow: a step has ${counts.length} counts, expected ${this.numLayers} x ${this.numExperts}`,
      );
    for (let i = 0; i < n; i++) {
      const v = counts[i]!;
      if (!Number.isFinite(v) || v < 0)
        throw new BadArgumentError(`ExpertLoadWindow: count ${i} is ${v}; counts are >= 0`);
    }
    const base = this.next * n;
    for (let i = 0; i < n; i++) {
      this.sum[i] = this.sum[i]! - this.ring[base + i]! + counts[i]!;
      this.ring[base + i] = counts[i]!;
    }
    this.next = (this.next + 1) % this.windowSteps;
    this.filled = Math.min(this.filled + 1, this.windowSteps);
    this.recorded++;
  }

  /** Steps in the window now (at most windowSteps). */
  get steps(): number {
    return this.filled;
  }

  /** Steps recorded since construction or the last clear. */
  get totalSteps(): number {
    return this.recorded;
  }

  /** Tokens per expert summed over the window, one row per layer (copies). */
  totals(): Float64Array[] {
    return Array.from({ length: this.numLayers }, (_, l) =>
      // Subtracting the leaving step can leave -0 or tiny rounding residue; counts are integers in practice.
      Float64Array.from(this.sum.subarray(l * this.numExperts, (l + 1) * this.numExperts), (v) => Math.max(0, v)),
    );
  }

  clear(): void {
    this.ring.fill(0);
    this.sum.fill(0);
    this.next = 0;
    this.filled = 0;
    this.recorded = 0;
  }
}
