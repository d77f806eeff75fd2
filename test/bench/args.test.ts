import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { UsageError } from '../../lib/cli/args.js';
import { parseBenchServeArgs, QUICK } from '../../lib/bench/command.js';

// bench serve's command line: the defaults, --quick, and every wrong combination as one UsageError line.
const parse = (args: string, env: NodeJS.ProcessEnv = {}) => parseBenchServeArgs(args.split(' ').filter(Boolean), env);

function usage(args: string): string {
  try {
    parse(args);
  } catch (error) {
    expect(error).toBeInstanceOf(UsageError);
    return (error as Error).message;
  }
  throw new Error(`accepted: ${args}`);
}

describe('bench serve arguments', () => {
  it('defaults: the embedded deployment, a Poisson rate sweep, DistServe-style SLOs', () => {
    const { config, json, charts } = parse('');
    expect(config.targets).toEqual([{ kind: 'default', model: 'dummy:tiny', mode: 'disagg' }]);
    expect(config.sweep).toEqual({
      kind: 'rate',
      arrival: { kind: 'poisson', burstiness: 1 },
      rates: [1, 2, 4, 8, 16, 32],
    });
    expect(config.workload).toMatchObject({
      seed: 0,
      numRequests: 100,
      isl: { kind: 'fixed', value: 512 },
      osl: { kind: 'fixed', value: 128 },
    });
    expect(config).toMatchObject({
      api: 'completions',
      slo: { ttftMs: 2000, itlMs: 25 },
      minAttainment: 0.5,
      forceLength: true,
    });
    expect([json, charts]).toEqual(['bench-results/serve.json', true]);
  });

  it('--quick: short lengths and a short sweep; explicit options still win', () => {
    const quick = parse('--quick').config;
    expect(quick.sweep).toMatchObject({ rates: QUICK.rates });
    expect(quick.workload).toMatchObject({ numRequests: QUICK.numRequests, isl: { kind: 'fixed', value: 640 } });
    expect(parse('--quick --rate 3 --isl uniform:10:20').config).toMatchObject({
      sweep: { rates: [3] },
      workload: { isl: { kind: 'uniform', min: 10, max: 20 } },
    });
  });

  it('targets, labels, the API key from the environment', () => {
    const { config } = parse('--deploy a.yaml,b.yaml --label agg,disagg', { OPENAI_API_KEY: 'sk-1' });
    expect(config.targets).toEqual([
      { kind: 'deploy', file: 'a.yaml' },
      { kind: 'deploy', file: 'b.yaml' },
    ]);
    expect(config.labels).toEqual(['agg', 'disagg']);
    expect(config.apiKey).toBe('sk-1');
    expect(parse('--url http://h:1 --api-key k', { TANDEM_API_KEY: 't' }).config.apiKey).toBe('k');
    expect(parse('--mode agg').config.targets).toEqual([{ kind: 'default', model: 'dummy:tiny', mode: 'agg' }]);
  });

  it('load shapes: gamma by burstiness, closed loop, a trace with time scales', () => {
    expect(parse('--burstiness 0.5 --rate 2,4').config.sweep).toEqual({
      kind: 'rate',
      arrival: { kind: 'gamma', burstiness: 0.5 },
      rates: [2, 4],
    });
    expect(parse('--arrival constant').config.sweep).toMatchObject({ arrival: { kind: 'constant', burstiness: 1 } });
    expect(parse('--concurrency 1,8').config.sweep).toEqual({ kind: 'concurrency', values: [1, 8] });
    const dir = mkdtempSync(join(tmpdir(), 'tandem-args-'));
    const trace = join(dir, 't.jsonl');
    writeFileSync(trace, '{"timestamp": 0, "input_length": 10, "output_length": 2}\n'.repeat(3));
    const t = parse(`--trace ${trace} --trace-time-scale 2,0.5`).config;
    expect(t.sweep).toEqual({ kind: 'trace', timeScales: [2, 0.5] });
    expect(t.workload.numRequests).toBe(3);
    expect(t.workload.trace!.blockTokens).toBe(512);
    expect(usage(`--trace ${trace} --isl 5`)).toBe('--isl does not go with --trace (the trace sets it)');
    const badTrace = join(dir, 'bad.jsonl');
    writeFileSync(badTrace, '{"timestamp": 0, "input_length": 10, "output_length": 2}\n{"timestamp": 1}\n');
    expect(() => parse(`--trace ${badTrace}`)).toThrow(`${badTrace}:2: input_length: is required`);
  });

  it('wrong lines: one message each', () => {
    expect(usage('--bogus')).toBe('unknown option --bogus (see tandem bench serve --help)');
    expect(usage('--rate')).toBe('--rate needs a value (see tandem bench serve --help)');
    expect(usage('--quick=yes')).toBe('--quick takes no value (see tandem bench serve --help)');
    expect(usage('--seed -3')).toMatch(/^--seed must be an integer >= 0 \(got -3\)/);
    expect(usage('--rate 2 --concurrency 4')).toBe(
      '--rate (open loop) and --concurrency (closed loop) exclude each other',
    );
    expect(usage('--rate 0')).toBe('--rate must be a number > 0 (got 0)');
    expect(usage('--rate 1,,2')).toBe("--rate has an empty item (got '1,,2')");
    expect(usage('--concurrency 1.5')).toMatch(/^--concurrency must be a positive integer/);
    expect(usage('--arrival poisson --burstiness 2')).toBe(
      "--burstiness is gamma's shape; it does not go with --arrival poisson",
    );
    expect(usage('--concurrency 2 --arrival gamma')).toMatch(/not --concurrency/);
    expect(usage('--isl 0')).toMatch(/^--isl must be N, uniform:MIN:MAX or normal:MEAN:STD/);
    expect(usage('--osl uniform:9:3')).toMatch(/^--osl must be/);
    expect(usage('--prefixes 4')).toBe('--prefixes needs --prefix-len');
    expect(usage('--prefix-len 4')).toBe('--prefix-len and --prefix-share need --prefixes');
    expect(usage('--prefixes 2 --prefix-len 8 --prefix-share 1.5')).toMatch(
      /^--prefix-share must be a number in 0\.\.1/,
    );
    expect(usage('--min-attainment 2')).toMatch(/^--min-attainment must be a number in 0\.\.1/);
    expect(usage('--slo-itl-ms 0')).toBe('--slo-itl-ms must be a number > 0 (got 0)');
    expect(usage('--api grpc')).toBe('--api must be completions or chat (got grpc)');
    expect(usage('--extra-body {')).toMatch(/^--extra-body is not JSON/);
    expect(usage('--extra-body [1]')).toBe('--extra-body must be a JSON object');
    expect(usage('--url http://h:1 --mode agg')).toMatch(/^--mode is for the embedded deployment/);
    expect(usage('--url a,b --label x')).toBe('--label names 1 targets; there are 2');
    expect(usage('--trace-time-scale 2')).toBe('--trace-time-scale and --trace-block-size need --trace');
  });
});
