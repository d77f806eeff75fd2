/**
 * Routing policies: how one worker is picked among candidates. One interface, a factory, one small class
 * each. Every policy sees the same candidates, with what the prefix index and the load estimate know of them;
 * only `kv` uses the cache (cost.ts).
 */
import { chooseByCost, type CostWeights } from './cost.js';

export const ROUTER_POLICIES = ['kv', 'least-load', 'round-robin', 'random'] as const;
export type RouterPolicyName = (typeof ROUTER_POLICIES)[number];
export const DEFAULT_ROUTER_POLICY: RouterPolicyName = 'kv';

/** The candidates of one decision, as parallel arrays (index i is candidate i of n; the arrays may be longer). */
export interface Candidates {
  n: number;
  /** cost.ts's cost of each candidate. */
  costs: Float64Array;
  /** Requests in flight there from the routers sharing a load estimate (a launcher's frontends). */
  inflight: Float64Array;
  /** Load the worker reports (running + waiting + prefilling). */
  reportedLoad: Float64Array;
}

export interface RoutingPolicy {
  readonly name: RouterPolicyName;
  /**
   * The index of the chosen candidate; `pool` names the candidate set (round-robin keeps a turn per pool);
   * `workers` are the candidates themselves, by name.
   */
  choose(candidates: Candidates, pool: string, workers: readonly { name: string }[]): number;
}

/** The cheapest worker by cost.ts (or a softmax draw over costs with a temperature). */
class KvPolicy implements RoutingPolicy {
  readonly name = 'kv';
  constructor(
    private readonly weights: CostWeights,
    private readonly random: () => number,
  ) {}
  choose(c: Candidates): number {
    return chooseByCost(c.n, c.costs, c.inflight, c.reportedLoad, this.weights.temperature, this.random);
  }
}

/** Fewest requests in flight (from the routers sharing a load estimate), then the lightest reported load, then the first. */
class LeastLoadPolicy implements RoutingPolicy {
  readonly name = 'least-load';
  choose(c: Candidates): number {
    let best = 0;
    for (let i = 1; i < c.n; i++) {
      const d = c.inflight[i]! - c.inflight[best]!;
      if (d < 0 || (d === 0 && c.reportedLoad[i]! < c.reportedLoad[best]!)) best = i;
    }
    return best;
  }
}

/** Each pool's candidates in turn. */
class RoundRobinPolicy implements RoutingPolicy {
  readonly name = 'round-robin';
  private readonly turns = new Map<string, number>();
  choose(c: Candidates, pool: string): number {
    const turn = this.turns.get(pool) ?? 0;
    this.turns.set(pool, turn + 1);
    return turn % c.n;
  }
}

/** Uniformly at random. */
class RandomPolicy implements RoutingPolicy {
  readonly name = 'random';
  constructor(private readonly random: () => number) {}
  choose(c: Candidates): number {
    return Math.min(c.n - 1, Math.floor(this.random() * c.n));
  }
}

export function createPolicy(name: RouterPolicyName, weights: CostWeights, random: () => number): RoutingPolicy {
  switch (name) {
    case 'kv':
      return new KvPolicy(weights, random);
    case 'least-load':
      return new LeastLoadPolicy();
    case 'round-robin':
      return new RoundRobinPolicy();
    case 'random':
      return new RandomPolicy(random);
  }
}
