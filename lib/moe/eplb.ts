/**
 * Expert-parallel load balancing (EPLB): from the tokens each expert received over a window, decide which
 * experts get redundant replicas and which rank holds each replica, so that no rank waits on the busiest one.
 *
 * The problem, as DeepSeek's EPLB describes it (the algorithm here is written from that description):
 *   - replication: there are `numExperts + numRanks * redundantSlotsPerRank` physical slots. Every expert has
 *     one replica; each redundant slot goes, one at a time, to the expert whose load per replica is highest
 *     (its tokens are then spread evenly over its replicas, see `routeToSlots`).
 *   - placement: the replicas are packed onto ranks, every rank holding the same number of slots, so that
 *     the busiest rank's load is as low as we can make it: heaviest replica first, onto the least-loaded
 *     rank that has a free slot and (where it can) does not hold that expert already.
 *   - hierarchical: when experts come in groups (group-limited routing) and ranks in nodes, the groups are
 *     first packed onto nodes (same number of groups per node, heaviest first onto the least-loaded node),
 *     then each node replicates and places its own experts on its own ranks, so that a token's experts stay
 *     on one node. Global balancing is the same with one node and one group.
 *
 * Loads are tokens (any non-negative number); a rank's load is the sum over its slots of
 * load(expert) / replicas(expert). Imbalance is max / mean of the rank loads (1 when nothing was routed).
 */
import { BadArgumentError } from '../errors.js';

/** Where every expert of one layer lives. Physical slot s is on rank floor(s / slotsPerRank). */
export interface LayerPlacement {
  /** physical slot -> logical expert; length numRanks * slotsPerRank. */
  slotToExpert: Int32Array;
  /** logical expert -> its physical slots, ascending; every expert has at least one. */
  expertToSlots: number[][];
  /** logical expert -> number of replicas (expertToSlots[e].length). */
  replicaCount: Int32Array;
}

export interface ExpertPlacement {
  numExperts: number;
  numRanks: number;
  slotsPerRank: number;
  layers: LayerPlacement[];
}

export interface BalanceOptions {
  numRanks: number;
  /** Extra slots on every rank beyond numExperts / numRanks; 0 balances by placement alone. */
  redundantSlotsPerRank: number;
  /** Nodes the ranks are spread over (ranks numbered node-major); 1 (default) is global balancing. */
  numNodes?: number;
  /** Expert groups of group-limited routing (experts numbered group-major); used when numNodes > 1. */
  numExpertGroups?: number;
}

export interface BalanceResult {
  placement: ExpertPlacement;
  /** Per layer, max/mean tokens per rank under the placement balanced against (the static one if none). */
  imbalanceBefore: number[];
  /** Per layer, max/mean tokens per rank under the new placement. */
  imbalanceAfter: number[];
}

/** Per-layer per-expert loads: one row per layer, one entry per expert. */
export type ExpertLoads = ArrayLike<number>[];

function checkInt(name: string, v: number, min: number): void {
  if (!Number.isInteger(v) || v < min) throw new BadArgumentError(`${name} must be an integer >= ${min} (got ${v})`);
}

/** Validates the loads and returns numExperts. */
function checkLoads(loads: ExpertLoads): number {
  if (!Array.isArray(loads) || loads.length === 0)
    throw new BadArgumentError('expert loads must have at least one layer');
  const numExperts = loads[0]!.length;
  if (numExperts === 0) throw new BadArgumentError('expert loads must have at least one expert');
  loads.forEach((row, layer) => {
    if (row.length !== numExperts)
      throw new BadArgumentError(`expert loads: layer ${layer} has ${row.length} experts, layer 0 has ${numExperts}`);
    for (let e = 0; e < numExperts; e++) {
      const v = row[e]!;
      if (!Number.isFinite(v) || v < 0)
        throw new BadArgumentError(`expert loads: layer ${layer} expert ${e} is ${v}; loads are finite and >= 0`);
    }
  });
  return numExperts;
}

/** The slot count every rank gets; throws when the experts do not divide evenly over the ranks. */
export function slotsPerRank(numExperts: number, opts: BalanceOptions): number {
  checkInt('numRanks', opts.numRanks, 1);
  checkInt('redundantSlotsPerRank', opts.redundantSlotsPerRank, 0);
  checkInt('numExperts', numExperts, 1);
  if (opts.numRanks > numExperts + opts.numRanks * opts.redundantSlotsPerRank)
    throw new BadArgumentError(`more ranks (${opts.numRanks}) than physical expert slots`);
  if (numExperts % opts.numRanks !== 0)
    throw new BadArgumentError(
      `${numExperts} experts do not divide over ${opts.numRanks} ranks (every rank holds the same number of slots)`,
    );
  return numExperts / opts.numRanks + opts.redundantSlotsPerRank;
}

/**
 * Replica counts for `numSlots` slots: each extra slot to the expert with the highest load per replica (ties:
 * lowest index). An expert gets at most `maxReplicas` (the rank count, so that replicas can sit on distinct
 * ranks) while another expert is still below it.
 */
export function replicate(load: ArrayLike<number>, numSlots: number, maxReplicas = Infinity): Int32Array {
  const n = load.length;
  if (numSlots < n) throw new BadArgumentError(`${numSlots} slots cannot hold ${n} experts`);
  const replicas = new Int32Array(n).fill(1);
  for (let extra = numSlots - n; extra > 0; extra--) {
    let best = -1;
    let bestCapped = -1;
    for (let e = 0; e < n; e++) {
      const capped = replicas[e]! >= maxReplicas;
      if (capped) {
        if (bestCapped < 0 || load[e]! / replicas[e]! > load[bestCapped]! / replicas[bestCapped]!) bestCapped = e;
      } else if (best < 0 || load[e]! / replicas[e]! > load[best]! / replicas[best]!) best = e;
    }
    replicas[best >= 0 ? best : bestCapped]!++;
  }
  return replicas;
}

/**
 * Packs weighted items into `numBins` bins of exactly `capacity` items each: heaviest first onto the
 * least-loaded bin with room (ties: lowest bin) that does not hold an item of the same `kind` when such a
 * bin exists. Returns the bin of each item.
 */
export function packBalanced(
  weights: ArrayLike<number>,
  kinds: ArrayLike<number>,
  numBins: number,
  capacity: number,
): Int32Array {
  const n = weights.length;
  if (n !== numBins * capacity) throw new BadArgumentError(`${n} items do not fill ${numBins} bins of ${capacity}`);
  const order = Array.from({ length: n }, (_, i) => i).sort(
    (a, b) => weights[b]! - weights[a]! || kinds[a]! - kinds[b]! || a - b,
  );
  const binLoad = new Float64Array(numBins);
  const binCount = new Int32Array(numBins);
  const binKinds: Set<number>[] = Array.from({ length: numBins }, () => new Set());
  const binOf = new Int32Array(n);
  for (const i of order) {
    let best = -1;
    let bestDup = -1;
    for (let b = 0; b < numBins; b++) {
      if (binCount[b]! >= capacity) continue;
      if (binKinds[b]!.has(kinds[i]!)) {
        if (bestDup < 0 || binLoad[b]! < binLoad[bestDup]!) bestDup = b;
      } else if (best < 0 || binLoad[b]! < binLoad[best]!) best = b;
    }
    const b = best >= 0 ? best : bestDup;
    binOf[i] = b;
    binLoad[b]! += weights[i]!;
    binCount[b]!++;
    binKinds[b]!.add(kinds[i]!);
  }
  return binOf;
}

/** One layer's placement from its slot -> expert table (expertToSlots and replicaCount derived). */
export function layerPlacementFromSlots(slotToExpert: Int32Array, numExperts: number): LayerPlacement {
  const expertToSlots: number[][] = Array.from({ length: numExperts }, () => []);
  slotToExpert.forEach((e, s) => expertToSlots[e]!.push(s));
  const replicaCount = Int32Array.from(expertToSlots, (s) => s.length);
  return { slotToExpert, expertToSlots, replicaCount };
}

/**
 * The placement without balancing: rank r holds experts r*n .. r*n+n-1 (n = numExperts / numRanks), in order,
 * then its redundant slots hold replicas of the experts that follow (the next ranks' first ones), so that no
 * rank holds an expert twice while redundantSlotsPerRank <= numExperts - n.
 */
export function staticPlacement(
  numLayers: number,
  numExperts: number,
  numRanks: number,
  redundantSlotsPerRank = 0,
): ExpertPlacement {
  const perRank = slotsPerRank(numExperts, { numRanks, redundantSlotsPerRank });
  const own = numExperts / numRanks;
  const slots = Int32Array.from({ length: numRanks * perRank }, (_, s) => {
    const r = Math.floor(s / perRank);
    const j = s % perRank;
    return (r * own + j) % numExperts;
  });
  const layers = Array.from({ length: numLayers }, () => layerPlacementFromSlots(Int32Array.from(slots), numExperts));
  return { numExperts, numRanks, slotsPerRank: perRank, layers };
}

/** Tokens per rank for one layer when every expert's tokens are spread evenly over its replicas. */
export function rankLoads(placement: ExpertPlacement, layer: number, load: ArrayLike<number>): Float64Array {
  const lp = placement.layers[layer]!;
  const out = new Float64Array(placement.numRanks);
  lp.slotToExpert.forEach((e, s) => {
    out[Math.floor(s / placement.slotsPerRank)]! += load[e]! / lp.replicaCount[e]!;
  });
  return out;
}

/** max / mean of the rank loads; 1 when nothing was routed. */
export function imbalance(rankLoad: ArrayLike<number>): number {
  let max = 0;
  let sum = 0;
  for (let i = 0; i < rankLoad.length; i++) {
    max = Math.max(max, rankLoad[i]!);
    sum += rankLoad[i]!;
  }
  return sum === 0 ? 1 : max / (sum / rankLoad.length);
}

/** Balances one layer's experts; returns slot -> expert. */
function balanceLayer(load: ArrayLike<number>, opts: Required<BalanceOptions>, perRank: number): Int32Array {
  const numExperts = load.length;
  const { numRanks, numNodes, numExpertGroups } = opts;
  const ranksPerNode = numRanks / numNodes;
  const groupSize = numExperts / numExpertGroups;
  // 1. expert groups onto nodes, the same number of groups per node.
  const groupLoad = new Float64Array(numExpertGroups);
  for (let e = 0; e < numExperts; e++) groupLoad[Math.floor(e / groupSize)]! += load[e]!;
  const groupIds = Int32Array.from({ length: numExpertGroups }, (_, g) => g);
  const nodeOfGroup = packBalanced(groupLoad, groupIds, numNodes, numExpertGroups / numNodes);
  const slotToExpert = new Int32Array(numRanks * perRank);
  for (let node = 0; node < numNodes; node++) {
    // 2. replicas of the node's experts within its slots.
    const experts: number[] = [];
    for (let g = 0; g < numExpertGroups; g++)
      if (nodeOfGroup[g] === node) for (let e = g * groupSize; e < (g + 1) * groupSize; e++) experts.push(e);
    const nodeLoad = experts.map((e) => load[e]!);
    const replicas = replicate(nodeLoad, ranksPerNode * perRank, ranksPerNode);
    // 3. replicas onto the node's ranks.
    const weights: number[] = [];
    const kinds: number[] = [];
    experts.forEach((e, i) => {
      for (let r = 0; r < replicas[i]!; r++) {
        weights.push(nodeLoad[i]! / replicas[i]!);
        kinds.push(e);
      }
    });
    const rankOf = packBalanced(weights, kinds, ranksPerNode, perRank);
    for (let localRank = 0; localRank < ranksPerNode; localRank++) {
      // Within a rank, slots in expert order: the same set always yields the same slots.
      const held = kinds.filter((_, i) => rankOf[i] === localRank).sort((a, b) => a - b);
      const base = (node * ranksPerNode + localRank) * perRank;
      held.forEach((e, j) => (slotToExpert[base + j] = e));
    }
  }
  return slotToExpert;
}

/**
 * Computes a balanced placement for every layer from `loads` (tokens per layer and expert over a window),
 * with the imbalance before (under `current`, or the static placement) and after.
 */
export function balanceExperts(loads: ExpertLoads, options: BalanceOptions, current?: ExpertPlacement): BalanceResult {
  const numExperts = checkLoads(loads);
  const perRank = slotsPerRank(numExperts, options);
  const opts: Required<BalanceOptions> = {
    ...options,
    numNodes: options.numNodes ?? 1,
    numExpertGroups: options.numExpertGroups ?? 1,
  };
  checkInt('numNodes', opts.numNodes, 1);
  checkInt('numExpertGroups', opts.numExpertGroups, 1);
  if (opts.numNodes === 1) opts.numExpertGroups = 1;
  if (opts.numRanks % opts.numNodes !== 0)
    throw new BadArgumentError(`${opts.numRanks} ranks do not divide over ${opts.numNodes} nodes`);
  if (numExperts % opts.numExpertGroups !== 0)
    throw new BadArgumentError(`${numExperts} experts do not divide into ${opts.numExpertGroups} groups`);
  if (opts.numExpertGroups % opts.numNodes !== 0)
    throw new BadArgumentError(
      `${opts.numExpertGroups} expert groups do not divide over ${opts.numNodes} nodes (hierarchical balancing packs whole groups)`,
    );
  const before = current ?? staticPlacement(loads.length, numExperts, opts.numRanks);
  if (before.numExperts !== numExperts || before.numRanks !== opts.numRanks || before.layers.length !== loads.length)
    throw new BadArgumentError(
      `current placement is for ${before.layers.length} layers x ${before.numExperts} experts on ${before.numRanks} ranks, ` +
        `loads are ${loads.length} x ${numExperts} on ${opts.numRanks}`,
    );
  const placement: ExpertPlacement = {
    numExperts,
    numRanks: opts.numRanks,
    slotsPerRank: perRank,
    layers: loads.map((load) => layerPlacementFromSlots(balanceLayer(load, opts, perRank), numExperts)),
  };
  return {
    placement,
    imbalanceBefore: loads.map((load, l) => imbalance(rankLoads(before, l, load))),
    imbalanceAfter: loads.map((load, l) => imbalance(rankLoads(placement, l, load))),
  };
}

/**
 * The routing table: maps each token's logical expert to a physical slot, spreading an expert's tokens over
 * its replicas in turn (the j-th token routed to expert e in this call goes to replica j mod replicas(e)), so
 * each replica gets load(e) / replicas(e) tokens within one.
 */
export function routeToSlots(placement: ExpertPlacement, layer: number, expertIds: ArrayLike<number>): Int32Array {
  const lp = placement.layers[layer];
  if (lp === undefined)
    throw new BadArgumentError(`layer ${layer} is not in the placement (${placement.layers.length} layers)`);
  const seen = new Int32Array(placement.numExperts);
  const out = new Int32Array(expertIds.length);
  for (let t = 0; t < expertIds.length; t++) {
    const e = expertIds[t]!;
    const slots = lp.expertToSlots[e];
    if (slots === undefined)
      throw new BadArgumentError(`expert ${e} is out of range (${placement.numExperts} experts)`);
    const j = seen[e]!;
    seen[e] = j + 1;
    out[t] = slots[j % slots.length]!;
  }
  return out;
}

/** The rank that holds a physical slot. */
export function rankOfSlot(placement: ExpertPlacement, slot: number): number {
  return Math.floor(slot / placement.slotsPerRank);
}
