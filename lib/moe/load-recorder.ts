/**
 * Expert load from a running model: a ModelRunner wrapped so that each forward pass's tokens per layer and
 * expert (what the CPU runner's takeExpertLoad reports) are recorded as one step of an ExpertLoadWindow, and
 * added to running totals (counters for metrics). The balancer (policy.ts) reads the window.
 */
import { BadArgumentError } from '../errors.js';
import type { ForwardBatch, ModelRunner } from '../engine/runner.js';
import { ExpertLoadWindow } from './load-window.js';

/** A runner that reports expert load: CpuModelRunner on MoE models. */
export interface ExpertLoadSource {
  /** Tokens per layer and expert (layer-major) since the last call, and a reset. */
  takeExpertLoad(): Float64Array;
}

export class ExpertLoadRecorder<R extends ModelRunner & ExpertLoadSource> implements ModelRunner {
  readonly window: ExpertLoadWindow;
  /** Tokens routed per layer and expert since construction (layer-major); monotone, for counters. */
  readonly totals: Float64Array;

  constructor(
    readonly runner: R,
    readonly numLayers: number,
    readonly numExperts: number,
    windowSteps: number,
    /** Called with each step's load after it is recorded (e.g. `(load) => balancer.step(load)`). */
    private readonly onStep?: (load: Float64Array) => void,
  ) {
    this.window = new ExpertLoadWindow(numLayers, numExperts, windowSteps);
    this.totals = new Float64Array(numLayers * numExperts);
  }

  get vocabSize(): number {
    return this.runner.vocabSize;
  }
  get blockSize(): number {
    return this.runner.blockSize;
  }
  get numBlocks(): number {
    return this.runner.numBlocks;
  }
  get maxPositions(): number {
    return this.runner.maxPositions;
  }

  /** The runner's forward, then its expert load recorded as one step. */
  async forward(batch: ForwardBatch): Promise<Float32Array> {
    const logits = await this.runner.forward(batch);
    this.record();
    return logits;
  }

  /** Records the load since the last record as one step (forward does this after every pass). */
  record(): void {
    const load = this.runner.takeExpertLoad();
    if (load.length !== this.totals.length)
      throw new BadArgumentError(
        `ExpertLoadRecorder: the runner reported ${load.length} counts; expected ${this.numLayers} layers x ${this.numExperts} experts`,
      );
    this.window.record(load);
    for (let i = 0; i < load.length; i++) this.totals[i] = this.totals[i]! + load[i]!;
    this.onStep?.(load);
  }

  dispose(): Promise<void> {
    return this.runner.dispose();
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.dispose();
  }
}
