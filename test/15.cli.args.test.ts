import { describe, expect, it } from 'vitest';
import { runTs } from './helpers/cli.js';

// A wrong command line is one clear line on stderr, `tandem: ...`, and exit status 2, for every command;
// nothing is started or loaded.
const tandem = (...args: string[]) => runTs('lib/cli/main.ts', args);

function expectUsageError(args: string[], message: string) {
  const r = tandem(...args);
  expect(r.status, `${args.join(' ')}: ${r.stderr}`).toBe(2);
  expect(r.stderr).toBe(`tandem: ${message}\n`);
  expect(r.stdout).toBe('');
}

describe('tandem command-line errors', () => {
  it('an unknown option, for every command', () => {
    expectUsageError(['generate', '--bogus'], 'unknown option --bogus (see tandem --help)');
    expectUsageError(['start', '--bogus=3'], 'unknown option --bogus (see tandem --help)');
    expectUsageError(['info', '-x'], 'unknown option -x (see tandem --help)');
    expectUsageError(['--bogus'], 'unknown option --bogus (see tandem --help)');
    // An option of another command.
    expectUsageError(['start', '--prompt', 'hi'], 'unknown option --prompt for start (see tandem --help)');
    expectUsageError(['serve', '-f', 'g.yaml', '--model', 'm'], 'unknown option --model for serve (see tandem --help)');
  });

  it('numbers out of range, negative numbers included', () => {
    expectUsageError(
      ['generate', '--model', 'dummy:tiny', '--prompt', 'x', '--max-tokens', '-5'],
      '--max-tokens must be a positive integer (got -5)',
    );
    expectUsageError(
      ['generate', '--model', 'dummy:tiny', '--prompt', 'x', '--max-tokens', '2.5'],
      '--max-tokens must be a positive integer (got 2.5)',
    );
    expectUsageError(
      ['generate', '--model', 'dummy:tiny', '--prompt', 'x', '--temperature', '-0.5'],
      '--temperature must be a number >= 0 (got -0.5)',
    );
    expectUsageError(['start', '--port', '70000'], '--port must be an integer in 0..65535 (got 70000)');
    expectUsageError(['start', '--port', 'http'], '--port must be an integer in 0..65535 (got http)');
    expectUsageError(['serve', '-f', 'g.yaml', '--seed', '-1.5'], '--seed must be an integer >= 0 (got -1.5)');
  });

  it('choices, missing values, values given to flags, stray arguments', () => {
    expectUsageError(['start', '--mode', 'fast'], '--mode must be disagg or agg (got fast)');
    expectUsageError(
      ['start', '--router-policy', 'prefix'],
      '--router-policy must be one of kv, least-load, round-robin, random (got prefix)',
    );
    expectUsageError(['serve', '-f', 'g.yaml', '--router-policy'], '--router-policy needs a value');
    expectUsageError(
      ['generate', '--router-policy', 'kv'],
      'unknown option --router-policy for generate (see tandem --help)',
    );
    expectUsageError(
      ['generate', '--model', 'dummy:tiny', '--prompt', 'x', '--device', 'tpu'],
      '--device must be one of cpu, cuda, auto (got tpu)',
    );
    expectUsageError(['generate', '--model'], '--model needs a value');
    expectUsageError(['generate', '--model', '--json'], '--model needs a value');
    expectUsageError(['info', '--json=yes'], "--json takes no value (got 'yes')");
    expectUsageError(['generate', 'extra'], "unexpected argument 'extra' (see tandem --help)");
    expectUsageError(['frobnicate'], "unknown command 'frobnicate' (see tandem --help)");
    expectUsageError(['serve'], 'tandem serve needs -f graph.yaml (or run tandem start)');
    expectUsageError(['generate', '--prompt', 'x'], '--model is required (a checkpoint directory or dummy:<preset>)');
  });

  it('a value that starts with a dash is taken where it is written inline', () => {
    // `--prompt=-x` is the prompt "-x": the command gets past argument parsing (and fails on the model).
    const r = tandem('generate', '--model', '/nonexistent/model', '--prompt=-x');
    expect(r.status).toBe(1);
    expect(r.stderr).toBe('tandem: /nonexistent/model: no such model directory or config file\n');
  });
});
