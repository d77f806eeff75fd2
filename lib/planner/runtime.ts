/**
 * The planner at work in a deployment (the launcher starts one when the graph's `planner.mode` is load or sla):
 * every tick it reads an interval of the frontend's metrics (observe.ts), decides (planner.ts), logs the decision
 * with its inputs, counts it in /metrics, and has its connector bring the pools to the decided replicas, one
 * replica at a time. /planner shows the same (`status()`).
 *
 * Ticks: mode load, every intervalS, a load-based correction from the interval's TTFT (prefill) and ITL (decode).
 * Mode sla, a plan from the profile every intervalS and load-based corrections every min(intervalS,
 * correctionIntervalS) in between (spec.ts, `correctionTickS`). The frontend measures TTFT and ITL per request, not per engine, so each
 * pool is judged by one value (the interval's mean): "every engine misses" reads "the pool's requests miss".
 * A tick that comes while an action is still being carried out (a drain can take a while) is skipped: the next
 * one sees the result.
 *
 * Layouts: the connector says what each pool's replicas run (the launcher's workers, tp/pp/ep each); the planner
 * starts from the layouts they share, plans with them, and with `reshape` on may decide another (planner.ts,
 * reshape.ts); the connector then re-shapes the pool before any other action. /planner shows both, current (per
 * replica) and desired, in `tandem plan`'s vocabulary.
 */
import { BadArgumentError } from '../errors.js';
import type { ServeMetrics } from '../frontend/metrics.js';
import type { PlannerConnector, PoolLayout } from './connectors/index.js';
import type { LoadCorrectionOptions, Pool } from './load-correction.js';
import { MetricsWindow, type PlannerWindow } from './observe.js';
import { Planner, type PlannerDecision, type PoolLayouts } from './planner.js';
import type { Parallelism, Profile } from './profile.js';
import { correctionTickS, type PlannerMode } from './spec.js';

export { CORRECTION_INTERVAL_S } from './spec.js';
/** Actions kept for /planner. */
const ACTIONS_KEPT = 64;
/** Decisions /planner shows. */
const DECISIONS_SHOWN = 32;

export interface PlannerAction {
  at: string;
  /** The decision that asked for it. */
  decision: number;
  action: 'add' | 'remove' | 'move' | 'reshape';
  from?: Pool;
  to?: Pool;
  pool?: Pool;
  /** A re-shape's layouts, before and after. */
  layouts?: { from: string; to: string };
  worker?: string;
  /** A re-shape's workers started. */
  workers?: string[];
  outcome: 'done' | 'failed';
  error?: string;
  ms: number;
}

export interface PlannerRuntimeOptions {
  mode: Exclude<PlannerMode, 'off'>;
  ttftMs: number;
  itlMs: number;
  intervalS: number;
  /** Mode sla: seconds between load-based corrections (default CORRECTION_INTERVAL_S, at most intervalS). */
  correctionIntervalS?: number;
  minReplicas: number;
  /** GPUs (on CPU: workers) both pools may take together. */
  maxGpus: number;
  /** GPUs (on CPU: 1) one replica of each pool takes, for the load-based correction. */
  gpusPerReplica?: Record<Pool, number>;
  /** Mode sla; with `reshape`, any mode. */
  profile?: Profile;
  /** Re-shape pools into another layout of the profile when that wins for the observed load (reshape.ts). */
  reshape?: boolean;
  connector: PlannerConnector;
  /** What the planner observes. */
  window: () => MetricsWindow;
  metrics?: ServeMetrics;
  /** Hysteresis and cool-down of the load-based correction (defaults: load-correction.ts). */
  correction?: Pick<LoadCorrectionOptions, 'scaleUpAfter' | 'scaleDownAfter' | 'scaleDownBelow' | 'cooldownMs'>;
  log?: (line: string) => void;
  /** Milliseconds on a monotonic clock. */
  now?: () => number;
}

export class PlannerRuntime {
  readonly planner: Planner;
  private readonly log: (line: string) => void;
  private readonly now: () => number;
  private readonly correctionWindow: MetricsWindow;
  private readonly planWindow: MetricsWindow;
  private readonly actions: PlannerAction[] = [];
  private timer?: NodeJS.Timeout;
  private running?: Promise<void>;
  private acting = false;
  private stopped = false;
  private lastPlanMs: number;

  constructor(private readonly options: PlannerRuntimeOptions) {
    if (options.mode === 'sla' && !options.profile) throw new BadArgumentError('planner mode sla needs a profile');
    if (options.reshape && !options.profile) throw new BadArgumentError('re-shaping pools needs a profile');
    if (!(options.intervalS > 0)) throw new BadArgumentError(`intervalS must be > 0 (got ${options.intervalS})`);
    this.log = options.log ?? (() => {});
    this.now = options.now ?? (() => performance.now());
    this.planner = new Planner({
      ttftMs: options.ttftMs,
      itlMs: options.itlMs,
      maxGpus: options.maxGpus,
      minReplicas: options.minReplicas,
      ...(options.gpusPerReplica ? { gpusPerReplica: options.gpusPerReplica } : {}),
      ...options.correction,
      ...(options.profile ? { profile: options.profile } : {}),
      replicas: options.connector.replicas(),
      layouts: sharedLayouts(options.connector.layouts()),
      ...(options.reshape ? { reshape: true } : {}),
    });
    this.correctionWindow = options.window();
    this.planWindow = options.window();
    this.lastPlanMs = this.now();
    this.publishPools();
  }

  /** Seconds between ticks. */
  get tickS(): number {
    const { mode, intervalS, correctionIntervalS } = this.options;
    return correctionTickS({ mode, intervalS, ...(correctionIntervalS !== undefined ? { correctionIntervalS } : {}) });
  }

  async start(): Promise<void> {
    await Promise.all([this.correctionWindow.start(), this.planWindow.start()]);
    this.lastPlanMs = this.now();
    this.log(
      `planner on: mode ${this.options.mode}, TTFT ${this.options.ttftMs} ms, ITL ${this.options.itlMs} ms, ` +
        `every ${this.options.intervalS} s, ${this.options.maxGpus} GPUs (workers) at most, connector ${this.options.connector.kind}`,
    );
    this.schedule();
  }

  private schedule(): void {
    if (this.stopped) return;
    this.timer = setTimeout(() => {
      this.running = this.tick()
        .then(() => undefined)
        .catch((error: unknown) => this.log(`tick failed: ${(error as Error)?.stack ?? String(error)}`))
        .finally(() => this.schedule());
    }, this.tickS * 1000);
    this.timer.unref();
  }

  /** Stops ticking; resolves when a tick in progress has decided (an action under way goes on). */
  async stop(): Promise<void> {
    this.stopped = true;
    clearTimeout(this.timer);
    await this.running;
  }

  /** One tick: observe, decide, log, act. Resolves with the decision (undefined when skipped). */
  async tick(): Promise<PlannerDecision | undefined> {
    if (this.acting) {
      this.log('tick skipped: an action is still under way');
      return undefined;
    }
    // Pools that can change without the connector (a person scaling a workload) are read again first.
    if (this.options.connector.refresh) {
      await this.options.connector.refresh();
      const have = this.options.connector.replicas();
      const want = this.planner.replicas;
      // Only on a change: a resync starts the hysteresis counts again.
      if (have.prefill !== want.prefill || have.decode !== want.decode) {
        this.log(`pools changed outside the planner: prefill ${have.prefill}, decode ${have.decode}`);
        this.planner.resync(have);
      }
    }
    const atMs = this.now();
    let decision: PlannerDecision;
    if (this.options.mode === 'sla' && atMs - this.lastPlanMs >= this.options.intervalS * 1000 - 1) {
      this.lastPlanMs = atMs;
      const w = await this.planWindow.next();
      await this.correctionWindow.next();
      decision = this.planner.planInterval({ rate: w.rate, isl: w.isl, osl: w.osl }, atMs);
      this.record(decision, w, 'plan');
    } else {
      const w = await this.correctionWindow.next();
      decision = this.planner.observeLoad({
        atMs,
        prefillTtftMs: w.ttftMs === null ? [] : [w.ttftMs],
        decodeItlMs: w.itlMs === null ? [] : [w.itlMs],
        load: { rate: w.rate, isl: w.isl, osl: w.osl },
      });
      this.record(decision, w, decision.kind === 'load' ? decision.outputs.action.kind : 'plan');
    }
    void this.reconcile(decision.id);
    return decision;
  }

  private record(decision: PlannerDecision, window: PlannerWindow, action: string): void {
    (decision as PlannerDecision & { window?: PlannerWindow }).window = window;
    this.options.metrics?.plannerDecision(decision.kind, action);
    const r = this.planner.replicas;
    const l = this.planner.layouts;
    const layout = (pool: Pool) => (l[pool] ? ` ${l[pool].layout}` : '');
    this.log(
      `decision #${decision.id} ${decision.kind} ${action}: ${decision.reason}; replicas prefill ${r.prefill}${layout('prefill')}, ` +
        `decode ${r.decode}${layout('decode')}; inputs ${JSON.stringify({ window, ...(decision.kind === 'load' ? {} : decision.inputs) })}`,
    );
    this.publishPools();
  }

  private publishPools(): void {
    const desired = this.planner.replicas;
    const serving = this.options.connector.replicas();
    for (const pool of ['prefill', 'decode'] as const)
      this.options.metrics?.plannerPool(pool, desired[pool], serving[pool]);
  }

  /**
   * Brings the pools to the planner's layouts and replicas, one action at a time: re-shapes first, then moves, then
   * adds, then removals.
   */
  private async reconcile(decision: number): Promise<void> {
    if (this.acting) return;
    this.acting = true;
    try {
      for (let guard = 0; guard < 64 && !this.stopped; guard++) {
        const want = this.planner.replicas;
        const have = this.options.connector.replicas();
        const wantLayouts = this.planner.layouts;
        const haveLayouts = this.options.connector.layouts();
        const reshape = (['prefill', 'decode'] as const).find(
          (p) =>
            wantLayouts[p] && haveLayouts[p].replicas.length > 0 && haveLayouts[p].layout !== wantLayouts[p]!.layout,
        );
        const up = (['prefill', 'decode'] as const).find((p) => want[p] > have[p]);
        const down = (['prefill', 'decode'] as const).find((p) => want[p] < have[p]);
        if (!reshape && !up && !down) break;
        const started = this.now();
        const base = { at: new Date().toISOString(), decision };
        let entry: Omit<PlannerAction, 'outcome' | 'ms'>;
        let run: () => Promise<string>;
        if (reshape) {
          const to = wantLayouts[reshape]!;
          entry = {
            ...base,
            action: 'reshape',
            pool: reshape,
            layouts: { from: haveLayouts[reshape].layout!, to: to.layout },
          };
          run = async () => {
            const workers = await this.options.connector.reshapePool(reshape, to.parallelism, want[reshape]);
            entry.workers = workers;
            return workers.join(', ');
          };
        } else if (up && down) {
          entry = { ...base, action: 'move', from: down, to: up };
          run = () => this.options.connector.moveReplica(down, up);
        } else if (up) {
          entry = { ...base, action: 'add', pool: up };
          run = () => this.options.connector.addReplica(up);
        } else {
          entry = { ...base, action: 'remove', pool: down! };
          run = () => this.options.connector.removeReplica(down!);
        }
        try {
          const worker = await run();
          this.done({ ...entry, worker, outcome: 'done', ms: this.now() - started });
        } catch (error) {
          this.done({ ...entry, outcome: 'failed', error: (error as Error).message, ms: this.now() - started });
          // The pools are as the connector says: the planner counts from there. A pool a re-shape left running
          // two layouts keeps its desired layout and replicas: the next reconcile carries the re-shape on.
          const layouts = this.options.connector.layouts();
          const replicas = this.options.connector.replicas();
          for (const pool of ['prefill', 'decode'] as const)
            if (layouts[pool].layout === 'mixed') replicas[pool] = this.planner.replicas[pool];
          this.planner.resync(replicas, sharedLayouts(layouts));
          break;
        }
      }
    } finally {
      this.acting = false;
      this.publishPools();
    }
  }

  private done(action: PlannerAction): void {
    this.actions.push(action);
    if (this.actions.length > ACTIONS_KEPT) this.actions.shift();
    this.options.metrics?.plannerAction(action.action, action.outcome);
    const what =
      action.action === 'move'
        ? `move ${action.from} -> ${action.to}`
        : action.action === 'reshape'
          ? `reshape ${action.pool} ${action.layouts!.from} -> ${action.layouts!.to}`
          : `${action.action} ${action.pool}`;
    this.log(
      `action for decision #${action.decision}: ${what} ${action.outcome}` +
        `${action.worker ? ` (${action.worker})` : ''} in ${Math.round(action.ms)} ms${action.error ? `: ${action.error}` : ''}`,
    );
  }

  /** What GET /planner answers. */
  status(): PlannerStatus {
    const o = this.options;
    return {
      mode: o.mode,
      connector: o.connector.kind,
      slas: { ttftMs: o.ttftMs, itlMs: o.itlMs },
      intervalS: o.intervalS,
      minReplicas: o.minReplicas,
      maxGpus: o.maxGpus,
      replicas: { current: o.connector.replicas(), desired: this.planner.replicas },
      layouts: { current: o.connector.layouts(), desired: this.planner.layouts },
      reshape: o.reshape === true,
      acting: this.acting,
      decisionsTotal: this.planner.history.total,
      decisions: this.planner.history.list().slice(-DECISIONS_SHOWN),
      actions: [...this.actions],
    };
  }
}

export interface PlannerStatus {
  mode: PlannerMode;
  connector?: string;
  slas?: { ttftMs: number; itlMs: number };
  intervalS?: number;
  minReplicas?: number;
  maxGpus?: number;
  replicas: { current: Record<Pool, number>; desired?: Record<Pool, number> };
  /** Each pool's replicas' layouts (tp/pp/ep each), and the layouts the planner wants (`tandem plan`'s vocabulary). */
  layouts: { current: Record<Pool, PoolLayout>; desired?: PoolLayouts };
  /** Whether the planner may re-shape pools. */
  reshape?: boolean;
  acting?: boolean;
  decisionsTotal?: number;
  /** Oldest first; each with its inputs (and the metrics window it was made from), outputs and reason. */
  decisions?: readonly PlannerDecision[];
  actions?: readonly PlannerAction[];
}

/** The layouts pools' replicas share (a pool with none, or running several, left out). */
export function sharedLayouts(layouts: Record<Pool, PoolLayout>): Partial<Record<Pool, Parallelism>> {
  const out: Partial<Record<Pool, Parallelism>> = {};
  for (const pool of ['prefill', 'decode'] as const) {
    const p = layouts[pool].parallelism;
    if (p) out[pool] = p;
  }
  return out;
}
