/**
 * Expert parallelism and online expert load balancing (EPLB, issue 28) on the GPU engine's ranks: what
 * CudaModelRunner does with the experts of an MoE model beside its passes (native/src/engine/cuda_moe.h).
 *
 * - ranks: `ep` CudaLlama ranks of one communicator group (every rank on one device today), rank r holding slots
 *   [r * S, (r + 1) * S) of ep * S, S = numExperts / ep + redundant slots; one rank with redundant slots holds
 *   replicas beside its experts (what a single-rank EPLB test exercises, with CUDA graphs on).
 * - load: after every pass each rank's device counters (pairs routed per layer and expert, pairs its slots ran) are
 *   read back and reset, summed here until taken: takeExpertLoad() is the CPU runner's (numLayers x numExperts, what
 *   lib/moe's ExpertLoadWindow records, /metrics and the planner read), takeRankLoad() the per-rank pairs.
 * - placement: applyExpertPlacement copies each slot whose expert changes from a slot holding it now (its own rank's
 *   first), in two phases over every rank (all stage their sources, then all write their slots and switch their
 *   routing tables: a slot is read before it is overwritten), between passes. The routing table is device memory
 *   the route kernel reads, so a captured decode graph follows it without a recapture.
 * - balancer: with the `eplb` policy each pass's load feeds lib/moe's ExpertBalancer; a placement it applies is
 *   applied before the pass resolves (the CPU runner's behaviour).
 */
import { BadArgumentError, native, nativeSync, ParallelLayoutError } from '../errors.js';
import type { RawCudaLlama } from '../native/binding.js';
import { layerPlacementFromSlots, staticPlacement, type ExpertPlacement } from '../moe/eplb.js';
import { ExpertBalancer, type EplbDecision } from '../moe/policy.js';
import type { ExpertPlacementChange } from './cpu.js';
import type { ModelConfig } from './model/config.js';
import { MAX_LOCAL_TP_RANKS } from './cuda-parallel.js';
import { checkParallelConfig } from './parallel.js';

/**
 * Throws ParallelLayoutError unless `ep` expert-parallel ranks beside `tp` fit the model on the GPU engine
 * (lib/engine/parallel.ts's rules: ep divides the experts, tp is 1 or ep; at most MAX_LOCAL_TP_RANKS ranks in the
 * group), and for an MoE model unless tp > 1 comes with ep = tp (the GPU ranks split whole experts; tensor
 * parallelism of the experts' channels runs on CPU ranks). Returns ep.
 */
export function checkCudaExpertParallel(config: ModelConfig, tp: number, ep: unknown, where: string): number {
  if (typeof ep === 'number' && Number.isInteger(ep) && ep > MAX_LOCAL_TP_RANKS)
    throw new ParallelLayoutError(
      `${where}: expert parallel size ${ep} is more than the ${MAX_LOCAL_TP_RANKS} ranks the GPU engine runs`,
    );
  const checked = checkParallelConfig(config, { tp, ep: ep as number }, where).ep;
  if (config.moe && tp > 1 && checked === 1)
    throw new ParallelLayoutError(
      `${where}: the GPU engine splits a mixture-of-experts model's experts over its ranks (ep = tp); tensor ` +
        `parallelism of the experts' channels (tp ${tp} with ep 1) runs on the CPU engine (device 'cpu')`,
    );
  return checked;
}

export class CudaExpertRanks {
  /** With `eplb`: the last automatic placement change that failed (the runner kept its placement, serving on). */
  eplbError?: Error;
  private untakenLoad: Float64Array;
  private untakenRankLoad: Float64Array;
  readonly numExperts: number;
  readonly slotsPerRank: number;

  constructor(
    /** Every rank of the group, rank 0 first. */
    private readonly ranks: readonly RawCudaLlama[],
    private readonly config: ModelConfig,
    readonly balancer?: ExpertBalancer,
  ) {
    this.numExperts = config.moe!.numExperts;
    const first = nativeSync(() => ranks[0]!.expertPlacement());
    this.slotsPerRank = first.slotsPerRank;
    this.untakenLoad = new Float64Array(config.numLayers * this.numExperts);
    this.untakenRankLoad = new Float64Array(config.numLayers * ranks.length);
  }

  get numRanks(): number {
    return this.ranks.length;
  }

  /** After a pass on every rank: reads the ranks' load counters, then feeds the balancer and follows it. */
  async afterPass(): Promise<void> {
    const loads = await Promise.all(this.ranks.map((m) => native(() => m.takeExpertLoad())));
    const step = loads[0]!.perExpert;
    for (let i = 0; i < step.length; i++) this.untakenLoad[i] = this.untakenLoad[i]! + step[i]!;
    const R = this.ranks.length;
    loads.forEach(({ pairsRun }, r) => {
      for (let l = 0; l < pairsRun.length; l++)
        this.untakenRankLoad[l * R + r] = this.untakenRankLoad[l * R + r]! + pairsRun[l]!;
    });
    if (!this.balancer) return;
    const decision: EplbDecision | undefined = this.balancer.step(step);
    if (!decision?.applied) return;
    try {
      await this.apply(decision.result.placement);
    } catch (error) {
      this.eplbError = error as Error;
      if (!this.ranks[0]!.disposed) this.balancer.adopt(this.placement);
    }
  }

  /** Tokens routed per layer and expert (layer-major) by the passes since the last call, and a reset. */
  takeExpertLoad(): Float64Array {
    const out = this.untakenLoad;
    this.untakenLoad = new Float64Array(out.length);
    return out;
  }

  /** (token, choice) pairs each rank's slots ran per layer (layer-major, numLayers x ranks) since the last call. */
  takeRankLoad(): Float64Array {
    const out = this.untakenRankLoad;
    this.untakenRankLoad = new Float64Array(out.length);
    return out;
  }

  /** The placement in force (rank 0's table; every rank holds the same one). Throws while a slot is still empty. */
  get placement(): ExpertPlacement {
    const { ranks, slotsPerRank, slotExpert } = nativeSync(() => this.ranks[0]!.expertPlacement());
    const perLayer = ranks * slotsPerRank;
    const layers = Array.from({ length: this.config.numLayers }, (_, l) =>
      layerPlacementFromSlots(slotExpert.slice(l * perLayer, (l + 1) * perLayer), this.numExperts),
    );
    return { numExperts: this.numExperts, numRanks: ranks, slotsPerRank, layers };
  }

  /** Fills the redundant slots as lib/moe's staticPlacement has them (once, after the weights are in). */
  async fillRedundantSlots(): Promise<void> {
    if (this.slotsPerRank === this.numExperts / this.ranks.length) return;
    const initial = staticPlacement(
      this.config.numLayers,
      this.numExperts,
      this.ranks.length,
      this.slotsPerRank - this.numExperts / this.ranks.length,
    );
    await this.apply(initial);
    this.balancer?.adopt(this.placement);
  }

  /**
   * Applies a placement of this runner's shape (BadArgumentError otherwise, before anything changes): the slots
   * whose expert changes get its weights from a slot holding it now (their own rank's where it has one), then every
   * rank switches its routing table.
   */
  async apply(placement: ExpertPlacement): Promise<ExpertPlacementChange> {
    const where = 'CudaModelRunner.applyExpertPlacement';
    const R = this.ranks.length;
    const S = this.slotsPerRank;
    const L = this.config.numLayers;
    const E = this.numExperts;
    if (
      typeof placement !== 'object' ||
      placement === null ||
      placement.numRanks !== R ||
      placement.slotsPerRank !== S ||
      placement.numExperts !== E ||
      !Array.isArray(placement.layers) ||
      placement.layers.length !== L
    )
      throw new BadArgumentError(
        `${where}: the runner has ${L} layers x ${E} experts on ${R} ranks x ${S} slots; the placement is ` +
          `${placement?.layers?.length} x ${placement?.numExperts} on ${placement?.numRanks} x ${placement?.slotsPerRank}`,
      );
    const perLayer = R * S;
    const next = new Int32Array(L * perLayer);
    placement.layers.forEach((layer, l) => {
      const row = layer?.slotToExpert;
      if (row?.length !== perLayer)
        throw new BadArgumentError(`${where}: layer ${l} has ${row?.length} slots; the runner has ${perLayer}`);
      const held = new Uint8Array(E);
      row.forEach((e, s) => {
        if (!Number.isInteger(e) || e < 0 || e >= E)
          throw new BadArgumentError(`${where}: layer ${l} slot ${s} holds expert ${e}; the model has 0..${E - 1}`);
        held[e] = 1;
      });
      const missing = held.indexOf(0);
      if (missing >= 0) throw new BadArgumentError(`${where}: layer ${l} leaves expert ${missing} without a replica`);
      next.set(row, l * perLayer);
    });
    const current = nativeSync(() => this.ranks[0]!.expertPlacement()).slotExpert;
    // Per destination rank: source addresses and destination (layer, local slot) pairs, in the same order.
    const sources = Array.from({ length: R }, () => [] as number[]);
    const dests = Array.from({ length: R }, () => [] as number[]);
    let crossRankCopies = 0;
    for (let l = 0; l < L; l++) {
      const base = l * perLayer;
      for (let s = 0; s < perLayer; s++) {
        const expert = next[base + s]!;
        if (current[base + s] === expert) continue;
        const rank = Math.floor(s / S);
        let from = -1;
        for (let t = 0; t < perLayer; t++)
          if (current[base + t] === expert && (from < 0 || Math.floor(t / S) === rank)) {
            from = t;
            if (Math.floor(t / S) === rank) break;
          }
        if (from < 0) throw new BadArgumentError(`${where}: layer ${l}: expert ${expert} has no replica to copy from`);
        const sourceRank = Math.floor(from / S);
        if (sourceRank !== rank) crossRankCopies++;
        sources[rank]!.push(...this.ranks[sourceRank]!.expertSlotAddress(l, from % S));
        dests[rank]!.push(l, s % S);
      }
    }
    await Promise.all(this.ranks.map((m, r) => native(() => m.stageExperts(Float64Array.from(sources[r]!)))));
    const done = await Promise.all(
      this.ranks.map((m, r) => native(() => m.commitExperts(Int32Array.from(dests[r]!), next))),
    );
    const change: ExpertPlacementChange = { slotsCopied: 0, crossRankCopies, bytes: 0 };
    for (const d of done) {
      change.slotsCopied += d.slotsCopied;
      change.bytes += d.bytes;
    }
    this.balancer?.adopt(this.placement);
    return change;
  }
}
