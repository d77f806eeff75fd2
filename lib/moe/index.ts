/**
 * Mixture-of-experts serving concerns that are policy, not kernels:
 *
 *   eplb.ts         expert replication and placement over EP ranks (global and hierarchical), routing table
 *   load-window.ts  tokens per layer and expert over a sliding window of steps
 *   load-recorder.ts  a model runner whose passes' expert load feeds a window and running totals
 *   moves.ts        applying a placement: slots aligned with the current one, the expert copies it takes
 *   policy.ts       when to rebalance (window, period, redundant slots, minimum gain) and the balancer
 *   skewed-dummy.ts dummy MoE weights whose gates favour a few experts (tests, bench:eplb; import it directly)
 */
export {
  balanceExperts,
  imbalance,
  layerPlacementFromSlots,
  packBalanced,
  rankLoads,
  rankOfSlot,
  replicate,
  routeToSlots,
  slotsPerRank,
  staticPlacement,
  type BalanceOptions,
  type BalanceResult,
  type ExpertLoads,
  type ExpertPlacement,
  type LayerPlacement,
} from './eplb.js';
export { ExpertLoadWindow } from './load-window.js';
export { alignPlacement, expertMoves, type ExpertMove } from './moves.js';
export { ExpertLoadRecorder, type ExpertLoadSource } from './load-recorder.js';
export {
  checkEplbPolicy,
  DEFAULT_EPLB_POLICY,
  EPLB_DECISION_HISTORY,
  ExpertBalancer,
  type EplbDecision,
  type EplbPolicy,
} from './policy.js';
