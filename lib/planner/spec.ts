/**
 * The deployment graph's `planner` section (lib/deploy/graph.ts wires it in):
 *
 *   planner:
 *     mode: sla            # off (default): fixed pools; load: the load-based correction only;
 *                          # sla: a plan from the profile every intervalS, corrected by load in between
 *     ttftMs: 500          # SLAs (required unless mode is off)
 *     itlMs: 50
 *     intervalS: 60        # planning interval (default 60)
 *     minReplicas: 1       # fewest replicas of each pool (default 1)
 *     maxGpus: 8           # GPUs both pools may take together (default: the graph's pools' GPUs)
 *     profile: p.json      # `tandem profile` output (required by mode sla)
 *     # the load-based correction (lib/planner/load-correction.ts); seconds become counts of corrections
 *     correctionIntervalS: 5   # mode sla: seconds between corrections (at most intervalS); mode load: intervalS
 *     scaleUpAfterS: 15        # a pool that misses its SLA this long gets a replica (default: 3 corrections)
 *     scaleDownAfterS: 25      # one far inside it this long gives one up (default: 5 corrections)
 *     scaleDownBelow: 0.5      # far inside: under this share of the SLA (default 0.5)
 *     cooldownS: 60            # a pool that changed stays as it is this long (default 60)
 *     reshape: true            # re-shape a pool into another layout of the profile when that wins for the load
 *                              # (2 x TP 1 <-> 1 x TP 2; lib/planner/reshape.ts); needs the profile and connector
 *                              # local (CPU pools). Default false: each pool keeps the graph's layout
 *     connector: local         # local (absent: local): the launcher's processes; kubernetes: the pools' workloads
 *     kubernetes:              # connector kubernetes only
 *       name: tandem           # the workloads are <name>-<pool> (`tandem k8s render --name`; default tandem)
 *       namespace: serving     # default: the kubeconfig context's namespace (in a pod: its own), else default
 *       kubeconfig: kc.yaml    # default: the pod's service account, else $KUBECONFIG, else ~/.kube/config
 *       workloadKind: StatefulSet  # or Deployment (default StatefulSet, what render writes)
 *       readyTimeoutS: 600     # bound on the wait for a scaled pool's pods to be ready (default 600)
 */
import { z } from 'zod';
import type { LoadCorrectionOptions } from './load-correction.js';

export const PLANNER_MODES = ['off', 'load', 'sla'] as const;
export type PlannerMode = (typeof PLANNER_MODES)[number];
export const PLANNER_CONNECTORS = ['local', 'kubernetes'] as const;
export type PlannerConnectorKind = (typeof PLANNER_CONNECTORS)[number];
export const DEFAULT_PLANNING_INTERVAL_S = 60;
/** Seconds between load-based corrections in mode sla (at most intervalS). */
export const CORRECTION_INTERVAL_S = 5;
/** The workloads' prefix when the graph names none (`tandem k8s render`'s default --name). */
export const DEFAULT_K8S_WORKLOAD_PREFIX = 'tandem';
export const DEFAULT_K8S_READY_TIMEOUT_S = 600;

const positive = (what: string) => z.number({ error: `must be ${what}` }).positive({ error: `must be ${what}` });
const positiveInt = () =>
  z
    .number({ error: 'must be a positive integer' })
    .int({ error: 'must be a positive integer' })
    .min(1, { error: 'must be a positive integer' });
const dnsLabel = () =>
  z
    .string({ error: 'must be a Kubernetes name' })
    .regex(/^[a-z0-9]([-a-z0-9]*[a-z0-9])?$/, {
      error:
        "must be a Kubernetes name: lower-case letters, digits and '-', starting and ending with a letter or digit",
    })
    .max(63, { error: 'must be at most 63 characters' });
const seconds = () => positive('a positive number of seconds');

export const KubernetesPlannerSchema = z.strictObject({
  name: dnsLabel().default(DEFAULT_K8S_WORKLOAD_PREFIX),
  namespace: dnsLabel().optional(),
  kubeconfig: z.string({ error: 'must be a path' }).min(1, { error: 'must not be empty' }).optional(),
  workloadKind: z
    .enum(['StatefulSet', 'Deployment'], { error: 'must be StatefulSet or Deployment' })
    .default('StatefulSet'),
  readyTimeoutS: seconds().default(DEFAULT_K8S_READY_TIMEOUT_S),
});
export type KubernetesPlannerSpec = z.output<typeof KubernetesPlannerSchema>;

export const PlannerSpecSchema = z
  .strictObject({
    mode: z.enum(PLANNER_MODES, { error: `must be one of ${PLANNER_MODES.join(', ')}` }).default('off'),
    ttftMs: positive('a positive number of milliseconds').optional(),
    itlMs: positive('a positive number of milliseconds').optional(),
    intervalS: seconds().default(DEFAULT_PLANNING_INTERVAL_S),
    minReplicas: positiveInt().default(1),
    maxGpus: positiveInt().optional(),
    profile: z.string({ error: 'must be a path' }).min(1, { error: 'must not be empty' }).optional(),
    correctionIntervalS: seconds().optional(),
    scaleUpAfterS: seconds().optional(),
    scaleDownAfterS: seconds().optional(),
    scaleDownBelow: z
      .number({ error: 'must be a number in (0, 1)' })
      .gt(0, { error: 'must be a number in (0, 1)' })
      .lt(1, { error: 'must be a number in (0, 1)' })
      .optional(),
    cooldownS: z
      .number({ error: 'must be a number of seconds >= 0' })
      .min(0, { error: 'must be a number of seconds >= 0' })
      .optional(),
    reshape: z.boolean({ error: 'must be true or false' }).optional(),
    connector: z.enum(PLANNER_CONNECTORS, { error: `must be one of ${PLANNER_CONNECTORS.join(', ')}` }).optional(),
    kubernetes: KubernetesPlannerSchema.optional(),
  })
  .superRefine((spec, ctx) => {
    if (spec.kubernetes !== undefined && spec.connector !== 'kubernetes')
      ctx.addIssue({ code: 'custom', path: ['kubernetes'], message: 'is for connector kubernetes only' });
    if (spec.correctionIntervalS !== undefined && spec.mode !== 'sla')
      ctx.addIssue({
        code: 'custom',
        path: ['correctionIntervalS'],
        message: 'is for mode sla only (mode load corrects every intervalS)',
      });
    if (spec.reshape) {
      if (spec.mode === 'off')
        ctx.addIssue({ code: 'custom', path: ['reshape'], message: 'is for mode load or sla (the planner is off)' });
      if (spec.profile === undefined)
        ctx.addIssue({
          code: 'custom',
          path: ['reshape'],
          message: "needs a profile: the layouts are compared on the profile's measurements",
        });
      if (spec.connector === 'kubernetes')
        ctx.addIssue({
          code: 'custom',
          path: ['reshape'],
          message: 'is for connector local only: the kubernetes connector does not re-shape pools',
        });
    }
    if (spec.mode === 'off') return;
    for (const key of ['ttftMs', 'itlMs'] as const)
      if (spec[key] === undefined)
        ctx.addIssue({ code: 'custom', path: [key], message: `is required when mode is ${spec.mode}` });
    if (spec.mode === 'sla' && spec.profile === undefined)
      ctx.addIssue({
        code: 'custom',
        path: ['profile'],
        message: 'is required when mode is sla (write one with tandem profile)',
      });
    const tick = correctionTickS(spec);
    for (const key of ['scaleUpAfterS', 'scaleDownAfterS'] as const) {
      const v = spec[key];
      if (v !== undefined && v < tick)
        ctx.addIssue({
          code: 'custom',
          path: [key],
          message: `must be at least the correction interval (${tick} s): the correction judges once per interval`,
        });
    }
  })
  .transform((spec) =>
    spec.connector === 'kubernetes' && spec.kubernetes === undefined
      ? { ...spec, kubernetes: KubernetesPlannerSchema.parse({}) }
      : spec,
  );

export type PlannerSpecInput = z.input<typeof PlannerSpecSchema>;
export type PlannerSpec = z.output<typeof PlannerSpecSchema>;

/** Seconds between two load-based corrections: mode load, intervalS; mode sla, min(intervalS, correctionIntervalS). */
export function correctionTickS(spec: Pick<PlannerSpec, 'mode' | 'intervalS' | 'correctionIntervalS'>): number {
  return spec.mode === 'sla'
    ? Math.min(spec.intervalS, spec.correctionIntervalS ?? CORRECTION_INTERVAL_S)
    : spec.intervalS;
}

/**
 * The graph's correction knobs as LoadCorrector options: durations become counts of corrections (rounded up, so
 * a pool misses at least as long as asked), the cool-down milliseconds. Knobs the graph leaves out are left out
 * (load-correction.ts has the defaults).
 */
export function correctionOptions(
  spec: Pick<
    PlannerSpec,
    'mode' | 'intervalS' | 'correctionIntervalS' | 'scaleUpAfterS' | 'scaleDownAfterS' | 'scaleDownBelow' | 'cooldownS'
  >,
): Pick<LoadCorrectionOptions, 'scaleUpAfter' | 'scaleDownAfter' | 'scaleDownBelow' | 'cooldownMs'> {
  const tick = correctionTickS(spec);
  // 1e-9: 15 s at 5 s a correction is 3 corrections, not 4 from a rounding error.
  const count = (s: number) => Math.max(1, Math.ceil(s / tick - 1e-9));
  return {
    ...(spec.scaleUpAfterS !== undefined ? { scaleUpAfter: count(spec.scaleUpAfterS) } : {}),
    ...(spec.scaleDownAfterS !== undefined ? { scaleDownAfter: count(spec.scaleDownAfterS) } : {}),
    ...(spec.scaleDownBelow !== undefined ? { scaleDownBelow: spec.scaleDownBelow } : {}),
    ...(spec.cooldownS !== undefined ? { cooldownMs: spec.cooldownS * 1000 } : {}),
  };
}
