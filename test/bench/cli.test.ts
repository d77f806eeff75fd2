import { describe, expect, it } from 'vitest';
import { runTs } from '../helpers/cli.js';

// `tandem bench serve`: the same command as npm run bench:serve, reached from the tandem CLI; wrong lines are
// one line and exit status 2, as for every tandem command.
const tandem = (...args: string[]) => runTs('lib/cli/main.ts', args);

describe('tandem bench serve', () => {
  it('is listed in tandem --help and has its own --help', () => {
    expect(tandem('--help').stdout).toMatch(/^ {2}tandem bench serve \[--quick\]/m);
    const help = tandem('bench', 'serve', '--help');
    expect(help.status).toBe(0);
    expect(help.stdout).toMatch(/^Usage: tandem bench serve \[options\]/);
    for (const option of ['--url', '--deploy', '--rate', '--concurrency', '--trace', '--slo-ttft-ms', '--quick'])
      expect(help.stdout).toContain(option);
  });

  it('wrong lines: one line, exit status 2', () => {
    for (const [args, message] of [
      [['bench'], 'tandem: bench needs serve (got nothing) (see tandem --help)'],
      [['bench', 'client'], "tandem: bench needs serve (got 'client') (see tandem --help)"],
      [['bench', 'serve', '--rate', '-1'], 'tandem: --rate must be a number >= 0 (got -1)'],
      [['bench', 'serve', '--isl', 'normal:5'], /^tandem: --isl must be N, uniform:MIN:MAX or normal:MEAN:STD/],
      [['bench', 'serve', '--bogus'], 'tandem: unknown option --bogus (see tandem bench serve --help)'],
      [['bench', 'serve', '--rate'], 'tandem: --rate needs a value (see tandem bench serve --help)'],
      [['bench', 'serve', '--rate', '--quick'], 'tandem: --rate needs a value (see tandem bench serve --help)'],
      [['bench', 'serve', 'fast'], "tandem: unexpected argument 'fast' (see tandem bench serve --help)"],
    ] as const) {
      const r = tandem(...args);
      expect(r.status, args.join(' ')).toBe(2);
      expect(r.stdout).toBe('');
      if (typeof message === 'string') expect(r.stderr.trim()).toBe(message);
      else expect(r.stderr.trim()).toMatch(message);
    }
  });
});
