import { existsSync, mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { loadProfile, planCapacity, QUICK_SWEEP, writeProfile } from '../../lib/planner/index.js';
import { runTs } from '../helpers/cli.js';
import { prefillCost, syntheticLayout, syntheticProfile } from './synthetic.js';

const tandem = (...args: string[]) => runTs('lib/cli/main.ts', args, {}, 120_000);
const dir = mkdtempSync(join(tmpdir(), 'tandem-plan-cli-'));

describe('tandem profile', () => {
  it('--quick on dummy:tiny (CPU engine): a valid profile, its table, its chart, progress on stderr', () => {
    const out = join(dir, 'tiny.json');
    const r = tandem('profile', '--model', 'dummy:tiny', '--device', 'cpu', '--quick', '--out', out);
    expect(r.status, r.stderr).toBe(0);
    const profile = loadProfile(out);
    expect(profile.model).toBe('dummy:tiny');
    expect(profile.device.kind).toBe('cpu');
    expect(profile.engine.dtype).toBe('fp32');
    expect(profile.measurement.quick).toBe(true);
    const [layout] = profile.layouts;
    expect(layout!.parallelism).toEqual({ tp: 1, pp: 1, ep: 1 });
    expect(layout!.prefill.map((p) => p.isl)).toEqual(QUICK_SWEEP.isl);
    expect(layout!.decode.map((d) => [d.batch, d.context])).toEqual(
      QUICK_SWEEP.context.flatMap((c) => QUICK_SWEEP.batch.map((b) => [b, c])),
    );
    expect(layout!.decode.every((d) => d.samples >= QUICK_SWEEP.decodeSteps)).toBe(true);
    expect(r.stdout).toContain('prefill ISL  ms (p50)');
    expect(r.stdout).toContain(`profile written to ${out}`);
    expect(readFileSync(join(dir, 'tiny.svg'), 'utf8')).toMatch(/^<svg/);
    const total = QUICK_SWEEP.isl.length + QUICK_SWEEP.batch.length * QUICK_SWEEP.context.length;
    expect(r.stderr).toContain(`profile dummy:tiny: ${total}/${total} done`);
    // The profile plans.
    const plan = tandem(
      'plan',
      '--profile',
      out,
      '--isl',
      '256',
      '--osl',
      '32',
      '--rate',
      '1',
      '--ttft-ms',
      '5000',
      '--itl-ms',
      '500',
      '--gpus',
      '4',
      '--json',
    );
    expect(plan.status, plan.stderr).toBe(0);
    expect(JSON.parse(plan.stdout).prefillReplicas).toBeGreaterThanOrEqual(1);
  });

  it('--isl, --batch, --context lists; points that do not fit the engine are left out and said so', () => {
    const out = join(dir, 'lists.json');
    const r = tandem(
      'profile',
      '--model',
      'dummy:tiny',
      '--device',
      'cpu',
      '--out',
      out,
      '--isl',
      '64,32',
      '--batch',
      '2,1',
      '--context',
      '64,5000',
    );
    expect(r.status, r.stderr).toBe(0);
    const [layout] = loadProfile(out).layouts;
    expect(layout!.prefill.map((p) => p.isl)).toEqual([32, 64]);
    expect(layout!.decode.map((d) => [d.batch, d.context])).toEqual([
      [1, 64],
      [2, 64],
    ]);
    expect(r.stderr).toContain('profile: decode batch 1 context 5000 left out: ');
  });

  it('--tp 1,2,3: one entry per layout the model allows, the others left out and said so; plan weighs them', () => {
    const out = join(dir, 'layouts.json');
    const r = tandem(
      'profile',
      ...['--model', 'dummy:tiny', '--device', 'cpu', '--out', out, '--tp', '1,2,3'],
      ...['--isl', '32,64', '--batch', '1,2', '--context', '64'],
    );
    expect(r.status, r.stderr).toBe(0);
    const profile = loadProfile(out);
    expect(profile.layouts.map((l) => [l.parallelism.tp, l.gpusPerReplica])).toEqual([
      [1, 1],
      [2, 2],
    ]);
    expect(profile.skippedLayouts.map((l) => l.parallelism.tp)).toEqual([3]);
    expect(r.stderr).toContain(
      "profile: layout tp3 left out: dummy:tiny: tensor parallel size 3 does not divide the model's 4 attention heads\n",
    );
    expect(r.stdout).toContain('layout tp2: 2 device(s) per replica (CPU ranks)');

    const load = ['--isl', '64', '--osl', '8', '--rate', '1', '--ttft-ms', '5000', '--itl-ms', '500', '--gpus', '4'];
    const json = tandem('plan', '--profile', out, ...load, '--json');
    expect(json.status, json.stderr).toBe(0);
    const plan = JSON.parse(json.stdout);
    for (const pool of ['prefill', 'decode']) {
      expect(plan.alternatives[pool].map((a: { layout: string }) => a.layout)).toEqual(['tp1', 'tp2']);
      const chosen = plan.alternatives[pool].filter((a: { chosen: boolean }) => a.chosen);
      expect(chosen).toHaveLength(1);
      expect(chosen[0].layout).toBe(plan[pool].layout);
    }
    const table = tandem('plan', '--profile', out, ...load);
    expect(table.status, table.stderr).toBe(0);
    expect(table.stdout).toContain(
      'layouts considered (the fewest devices that meet the SLA; ties: the lower latency):',
    );
    expect(table.stdout).toMatch(/\nprefill +tp2 +2 +1 +2 /);
  });

  it('wrong command lines: exit status 2, one line', () => {
    const cases: [string[], string][] = [
      [['profile', '--out', 'x.json'], '--model is required (a checkpoint directory or dummy:<preset>)'],
      [['profile', '--model', 'dummy:tiny'], '--out is required (the profile JSON file to write)'],
      [
        ['profile', '--model', 'dummy:tiny', '--out', 'x.json', '--isl', '128,x'],
        '--isl must be a positive integer (got x)',
      ],
      [
        ['profile', '--model', 'dummy:tiny', '--out', 'x.json', '--batch', '0'],
        '--batch must be a positive integer (got 0)',
      ],
      [
        ['profile', '--model', 'dummy:tiny', '--out', 'x.json', '--tp', '1,0'],
        '--tp must be a positive integer (got 0)',
      ],
      [
        ['profile', '--model', 'dummy:tiny', '--out', 'x.json', '--rate', '1'],
        'unknown option --rate for profile (see tandem --help)',
      ],
    ];
    for (const [args, message] of cases) {
      const r = tandem(...args);
      expect(r.status, args.join(' ')).toBe(2);
      expect(r.stderr).toBe(`tandem: ${message}\n`);
    }
    expect(existsSync('x.json')).toBe(false);
  });
});

describe('tandem plan', () => {
  const file = join(dir, 'synthetic.json');
  const profile = syntheticProfile([syntheticLayout(), syntheticLayout({ tp: 2, speedup: 2.5 })]);
  writeProfile(file, profile);
  const args = [
    '--profile',
    file,
    '--isl',
    '1024',
    '--osl',
    '256',
    '--rate',
    '100',
    '--ttft-ms',
    '500',
    '--itl-ms',
    '30',
  ];

  it("--json: replica counts and each pool's parallelism, as planCapacity computes them", () => {
    const r = tandem('plan', ...args, '--gpus', '64', '--json');
    expect(r.status, r.stderr).toBe(0);
    const json = JSON.parse(r.stdout);
    const plan = planCapacity(profile, { rate: 100, isl: 1024, osl: 256, ttftMs: 500, itlMs: 30, gpus: 64 });
    expect(json).toMatchObject({
      status: 'ok',
      meetsSla: true,
      prefillReplicas: plan.prefill.replicas,
      decodeReplicas: plan.decode.replicas,
      prefill: { layout: 'tp2', parallelism: { tp: 2, pp: 1, ep: 1 }, gpusPerReplica: 2, gpus: plan.prefill.gpus },
      decode: { layout: plan.decode.layout, parallelism: plan.decode.parallelism, replicas: plan.decode.replicas },
      gpusUsed: plan.gpusUsed,
      gpuBudget: 64,
    });
    expect(json.plan.prefill.prefillMs).toBeCloseTo(prefillCost(1024) / 2.5, 9);
    expect(r.stderr).toBe('');
  });

  it('without --json: a table', () => {
    const r = tandem('plan', ...args, '--gpus', '64');
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/^load 100 req\/s, ISL 1024, OSL 256; SLA TTFT 500 ms, ITL 30 ms; budget 64 GPUs\n/);
    expect(r.stdout).toMatch(/\nprefill {2}tp2 /);
    expect(r.stdout).toMatch(/\ndecode {3}tp\d /);
  });

  it('over budget: the best effort on stdout, why on stderr, exit status 1', () => {
    const r = tandem('plan', ...args, '--gpus', '3', '--json');
    expect(r.status).toBe(1);
    const json = JSON.parse(r.stdout);
    expect(json.status).toBe('over-budget');
    expect(json.gpusUsed).toBeLessThanOrEqual(3);
    expect(r.stderr).toMatch(
      /^tandem: the SLAs need \d+ GPUs, over the budget of 3: the best effort printed serves [\d.]+ of 100 req\/s\n$/,
    );
  });

  it('impossible SLAs and bad profiles: a clear error, exit status 1', () => {
    const slow = tandem('plan', ...args.slice(0, -4), '--ttft-ms', '1', '--itl-ms', '30', '--gpus', '8');
    expect(slow.status).toBe(1);
    expect(slow.stderr).toMatch(
      /^tandem: no prefill replica meets the SLA: one prompt of 1024 tokens alone takes .* over the TTFT SLA of 1 ms; /,
    );
    const bad = join(dir, 'bad.json');
    writeFileSync(bad, JSON.stringify({ ...profile, version: 9 }));
    const r = tandem('plan', ...['--profile', bad, ...args.slice(2)], '--gpus', '8');
    expect(r.status).toBe(1);
    expect(r.stderr).toBe(`tandem: ${bad}: version: Invalid input: expected 2\n`);
    expect(r.stdout).toBe('');
  });

  it('wrong command lines: exit status 2, one line', () => {
    const cases: [string[], string][] = [
      [['plan', ...args], '--gpus is required (the GPU budget of both pools)'],
      [['plan', '--gpus', '8'], '--profile is required (a profile written by tandem profile)'],
      [['plan', ...args, '--gpus', '0'], '--gpus must be a positive integer (got 0)'],
      [
        ['plan', ...args.slice(0, 4), '--osl', '-3', ...args.slice(6), '--gpus', '8'],
        '--osl must be a positive integer (got -3)',
      ],
      [
        ['plan', ...args.slice(0, 6), '--rate', '0', ...args.slice(8), '--gpus', '8'],
        '--rate must be a number > 0 (got 0)',
      ],
      [['plan', ...args, '--gpus', '8', '--quick'], 'unknown option --quick for plan (see tandem --help)'],
    ];
    for (const [a, message] of cases) {
      const r = tandem(...a);
      expect(r.status, a.join(' ')).toBe(2);
      expect(r.stderr).toBe(`tandem: ${message}\n`);
    }
  });
});
