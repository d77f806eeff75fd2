/**
 * `tandem plan --profile FILE --isl N --osl N --rate R --ttft-ms T --itl-ms I --gpus G [--json]`
 *
 * The replicas and layouts of each pool that the planner would choose for this load (lib/planner/capacity.ts),
 * without starting anything. A table (each pool's layout, then every layout considered), or with --json the plan
 * as one object: `prefillReplicas`, `decodeReplicas`, each pool's `parallelism`, `alternatives` (per pool, every
 * layout of the profile with its replicas and devices, or why it cannot meet the SLA), and the whole plan under
 * `plan`. It writes no graph: a pool's layout goes into the graph by hand (its tensorParallelSize,
 * pipelineParallelSize, expertParallelSize, gpusPerReplica and replicas).
 * Exit status: 0 the SLAs are met within the budget; 1 they are not (over budget: the best effort is printed;
 * or no size meets them: the reason, on stderr); 2 a wrong command line.
 */
import { loadProfile, planCapacity, type CapacityPlan } from '../planner/index.js';
import { formatPlan } from '../planner/report.js';
import { numberOption, UsageError } from './args.js';

export interface PlanArgs {
  profile?: string;
  isl?: string;
  osl?: string;
  rate?: string;
  'ttft-ms'?: string;
  'itl-ms'?: string;
  gpus?: string;
  json?: boolean;
}

/** What `tandem plan --json` prints. */
export function planJson(plan: CapacityPlan) {
  const pool = (p: CapacityPlan['prefill'] | CapacityPlan['decode']) => ({
    layout: p.layout,
    parallelism: p.parallelism,
    gpusPerReplica: p.gpusPerReplica,
    replicas: p.replicas,
    replicasNeeded: p.replicasNeeded,
    gpus: p.gpus,
  });
  return {
    status: plan.status,
    meetsSla: plan.status === 'ok',
    prefillReplicas: plan.prefill.replicas,
    decodeReplicas: plan.decode.replicas,
    prefill: pool(plan.prefill),
    decode: pool(plan.decode),
    gpusNeeded: plan.gpusNeeded,
    gpusUsed: plan.gpusUsed,
    gpuBudget: plan.request.gpus,
    servableRate: plan.servableRate,
    /** Every layout considered per pool, the chosen one marked, with its numbers or why it cannot meet the SLA. */
    alternatives: plan.alternatives,
    plan,
  };
}

export async function plan(args: PlanArgs): Promise<number> {
  const required = (name: keyof PlanArgs & string, what: string) => {
    if (args[name] === undefined) throw new UsageError(`--${name} is required (${what})`);
  };
  required('profile', 'a profile written by tandem profile');
  required('isl', 'prompt tokens per request');
  required('osl', 'output tokens per request');
  required('rate', 'requests per second');
  required('ttft-ms', 'the time-to-first-token SLA');
  required('itl-ms', 'the inter-token latency SLA');
  required('gpus', 'the GPU budget of both pools');
  const isl = numberOption('isl', args.isl, { integer: true, min: 1 })!;
  const osl = numberOption('osl', args.osl, { integer: true, min: 1 })!;
  const rate = numberOption('rate', args.rate)!;
  const ttftMs = numberOption('ttft-ms', args['ttft-ms'])!;
  const itlMs = numberOption('itl-ms', args['itl-ms'])!;
  const gpus = numberOption('gpus', args.gpus, { integer: true, min: 1 })!;
  for (const [name, v] of [
    ['rate', rate],
    ['ttft-ms', ttftMs],
    ['itl-ms', itlMs],
  ] as const)
    if (v === 0) throw new UsageError(`--${name} must be a number > 0 (got 0)`);

  const result = planCapacity(loadProfile(args.profile!), { rate, isl, osl, ttftMs, itlMs, gpus });
  console.log(args.json ? JSON.stringify(planJson(result), null, 2) : formatPlan(result));
  if (result.status === 'ok') return 0;
  process.stderr.write(
    `tandem: the SLAs need ${result.gpusNeeded} GPUs, over the budget of ${gpus}: the best effort printed serves ${+result.servableRate.toPrecision(3)} of ${rate} req/s\n`,
  );
  return 1;
}
