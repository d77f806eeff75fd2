/**
 * The deployment graph's `planner` section (lib/serve/graph.ts wires it in):
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
 */
import { z } from 'zod';

export const PLANNER_MODES = ['off', 'load', 'sla'] as const;
export type PlannerMode = (typeof PLANNER_MODES)[number];
export const DEFAULT_PLANNING_INTERVAL_S = 60;

const positive = (what: string) => z.number({ error: `must be ${what}` }).positive({ error: `must be ${what}` });
const positiveInt = () =>
  z
    .number({ error: 'must be a positive integer' })
    .int({ error: 'must be a positive integer' })
    .min(1, { error: 'must be a positive integer' });

export const PlannerSpecSchema = z
  .strictObject({
    mode: z.enum(PLANNER_MODES, { error: `must be one of ${PLANNER_MODES.join(', ')}` }).default('off'),
    ttftMs: positive('a positive number of milliseconds').optional(),
    itlMs: positive('a positive number of milliseconds').optional(),
    intervalS: positive('a positive number of seconds').default(DEFAULT_PLANNING_INTERVAL_S),
    minReplicas: positiveInt().default(1),
    maxGpus: positiveInt().optional(),
    profile: z.string({ error: 'must be a path' }).min(1, { error: 'must not be empty' }).optional(),
  })
  .superRefine((spec, ctx) => {
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
  });

export type PlannerSpecInput = z.input<typeof PlannerSpecSchema>;
export type PlannerSpec = z.output<typeof PlannerSpecSchema>;
