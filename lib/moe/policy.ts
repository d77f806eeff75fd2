/**
 * When to rebalance: every `periodSteps` steps, once the window holds `windowSteps` steps, compute a new
 * placement from the window and adopt it only if it lowers the imbalance enough.
 *
 * Gain rule: gain = 1 - after / before, where before and after are the mean over layers of the imbalance
 * (max / mean tokens per rank) under the current and the proposed placement. Act when gain >= minImbalanceGain.
 */
import { BadArgumentError } from '../errors.js';
import { balanceExperts, staticPlacement, type BalanceResult, type ExpertPlacement } from './eplb.js';
import { ExpertLoadWindow } from './load-window.js';
import { alignPlacement, expertMoves, type ExpertMove } from './moves.js';

export interface EplbPolicy {
  /** Steps of load the decision looks at. */
  windowSteps: number;
  /** Steps between two decisions. */
  periodSteps: number;
  /** Extra expert slots on every rank. */
  redundantSlotsPerRank: number;
  /** Relative imbalance reduction below which the current placement stays (0.05: 5 %). */
  minImbalanceGain: number;
  numNodes?: number;
  numExpertGroups?: number;
}

/** Decisions an ExpertBalancer keeps (the latest); a serving worker decides every periodSteps for as long as it runs. */
export const EPLB_DECISION_HISTORY = 256;

export const DEFAULT_EPLB_POLICY: EplbPolicy = {
  windowSteps: 1000,
  periodSteps: 1000,
  redundantSlotsPerRank: 1,
  minImbalanceGain: 0.05,
};

export function checkEplbPolicy(p: EplbPolicy): EplbPolicy {
  for (const k of ['windowSteps', 'periodSteps'] as const)
    if (!Number.isInteger(p[k]) || p[k] < 1)
      throw new BadArgumentError(`EPLB policy: ${k} must be an integer >= 1 (got ${p[k]})`);
  if (!Number.isInteger(p.redundantSlotsPerRank) || p.redundantSlotsPerRank < 0)
    throw new BadArgumentError(
      `EPLB policy: redundantSlotsPerRank must be an integer >= 0 (got ${p.redundantSlotsPerRank})`,
    );
  if (!Number.isFinite(p.minImbalanceGain) || p.minImbalanceGain < 0 || p.minImbalanceGain >= 1)
    throw new BadArgumentError(`EPLB policy: minImbalanceGain must be in [0, 1) (got ${p.minImbalanceGain})`);
  return p;
}

function mean(xs: number[]): number {
  return xs.reduce((a, b) => a + b, 0) / xs.length;
}

export interface EplbDecision {
  step: number;
  /** Mean over layers of max/mean tokens per rank, current and proposed. */
  imbalanceBefore: number;
  imbalanceAfter: number;
  gain: number;
  /** The placement was replaced (gain >= minImbalanceGain). */
  applied: boolean;
  /** The proposed placement, its slots aligned with the current one (`alignPlacement`). */
  result: BalanceResult;
  /** The expert copies that adopting it takes (those of the applied placement when `applied`). */
  moves: ExpertMove[];
}

/**
 * The balancer of one MoE model on `numRanks` EP ranks: feed it each step's expert loads; `step()` says when
 * a new placement is to be applied (the caller copies the weights and switches the routing table between steps).
 */
export class ExpertBalancer {
  readonly policy: EplbPolicy;
  readonly window: ExpertLoadWindow;
  private current: ExpertPlacement;
  private stepsSinceDecision = 0;
  private steps = 0;
  /** The latest EPLB_DECISION_HISTORY decisions, oldest first. */
  readonly decisions: EplbDecision[] = [];
  /** Decisions taken, and placements applied, since construction (all of them, beyond the history kept). */
  decisionCount = 0;
  appliedCount = 0;

  constructor(
    numLayers: number,
    numExperts: number,
    readonly numRanks: number,
    policy: EplbPolicy,
  ) {
    this.policy = checkEplbPolicy({ ...policy });
    this.window = new ExpertLoadWindow(numLayers, numExperts, this.policy.windowSteps);
    this.current = staticPlacement(numLayers, numExperts, numRanks, this.policy.redundantSlotsPerRank);
  }

  get placement(): ExpertPlacement {
    return this.current;
  }

  /**
   * Takes `placement` as the one in force (applied from outside the balancer, or what the runner holds after a
   * failed apply); later decisions balance against it.
   */
  adopt(placement: ExpertPlacement): void {
    if (
      placement.numRanks !== this.numRanks ||
      placement.slotsPerRank !== this.current.slotsPerRank ||
      placement.numExperts !== this.current.numExperts ||
      placement.layers.length !== this.current.layers.length
    )
      throw new BadArgumentError(
        `ExpertBalancer.adopt: the placement is ${placement.layers.length} layers x ${placement.numExperts} experts on ` +
          `${placement.numRanks} x ${placement.slotsPerRank} slots; the balancer's is ${this.current.layers.length} x ` +
          `${this.current.numExperts} on ${this.numRanks} x ${this.current.slotsPerRank}`,
      );
    this.current = placement;
  }

  /** Balances the window against the current placement and applies the result if the gain clears the policy. */
  decide(): EplbDecision {
    const result = balanceExperts(
      this.window.totals(),
      {
        numRanks: this.numRanks,
        redundantSlotsPerRank: this.policy.redundantSlotsPerRank,
        numNodes: this.policy.numNodes,
        numExpertGroups: this.policy.numExpertGroups,
      },
      this.current,
    );
    result.placement = alignPlacement(this.current, result.placement);
    const moves = expertMoves(this.current, result.placement);
    const before = mean(result.imbalanceBefore);
    const after = mean(result.imbalanceAfter);
    const gain = before > 0 ? 1 - after / before : 0;
    const applied = gain >= this.policy.minImbalanceGain && gain > 0;
    if (applied) this.current = result.placement;
    const decision = { step: this.steps, imbalanceBefore: before, imbalanceAfter: after, gain, applied, result, moves };
    this.decisions.push(decision);
    if (this.decisions.length > EPLB_DECISION_HISTORY) this.decisions.shift();
    this.decisionCount++;
    if (applied) this.appliedCount++;
    this.stepsSinceDecision = 0;
    return decision;
  }

  /** Records one step's loads (flat, layer-major); returns the decision when one was due this step. */
  step(counts: ArrayLike<number>): EplbDecision | undefined {
    this.window.record(counts);
    this.steps++;
    this.stepsSinceDecision++;
    if (this.stepsSinceDecision < this.policy.periodSteps || this.window.steps < this.policy.windowSteps)
      return undefined;
    return this.decide();
  }
}
