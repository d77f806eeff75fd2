import { spawn } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { describe, expect, it } from 'vitest';
import { packageRoot } from '../lib/native/paths.js';
import { runTs } from './helpers/cli.js';

// The README's commands: `tandem start` (what npm start runs) serving until SIGINT, `tandem serve -f`,
// `tandem generate`. Loopback, an ephemeral port, bounded waits.
const alive = (pid: number) => {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
};

describe('tandem start / serve / generate', () => {
  it('start serves the embedded deployment until SIGINT, then stops every worker', async () => {
    const child = spawn(
      process.execPath,
      ['--import', 'tsx', join(packageRoot, 'lib/cli/main.ts'), 'start', '--port', '0'],
      {
        cwd: packageRoot,
        stdio: ['ignore', 'pipe', 'pipe'],
      },
    );
    const lines: string[] = [];
    createInterface({ input: child.stderr! }).on('line', (l) => lines.push(l));
    const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
    try {
      const url = await new Promise<string>((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error(`no banner within 60 s:\n${lines.join('\n')}`)), 60_000);
        createInterface({ input: child.stdout! }).on('line', (l) => {
          lines.push(l);
          const m = /OpenAI API: (http:\/\/127\.0\.0\.1:\d+)\/v1/.exec(l);
          if (m) {
            clearTimeout(timer);
            resolve(m[1]!);
          }
        });
      });
      expect(lines.join('\n')).toMatch(/prefill-0 registered \(prefill, cpu/);
      expect(lines.join('\n')).toMatch(/decode-0 registered \(decode, cpu/);
      const pids = [...lines.join('\n').matchAll(/\(pid (\d+)\)/g)].map((m) => Number(m[1]));
      expect(pids.length).toBeGreaterThanOrEqual(2);
      const r = await fetch(`${url}/v1/chat/completions`, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ model: 'dummy:tiny', messages: [{ role: 'user', content: 'Hello' }], max_tokens: 8 }),
      });
      expect(r.status).toBe(200);
      const body = (await r.json()) as {
        choices: { message: { content: string } }[];
        usage: { completion_tokens: number };
      };
      expect(body.usage.completion_tokens).toBeGreaterThan(0);
      child.kill('SIGINT');
      expect(await exited, lines.join('\n')).toBe(0);
      expect(lines.join('\n')).toContain('tandem: stopped');
      for (const pid of pids) expect(alive(pid), `worker ${pid} outlived the launcher`).toBe(false);
    } finally {
      if (child.exitCode === null) child.kill('SIGKILL');
    }
  }, 90_000);

  it('serve -f reports a bad graph at its line and column', () => {
    const dir = mkdtempSync(join(tmpdir(), 'tandem-graph-'));
    try {
      const file = join(dir, 'graph.yaml');
      writeFileSync(file, 'model: dummy:tiny\npools:\n  - name: p\n    role: prefill\n    replicas: -1\n');
      const r = runTs('lib/cli/main.ts', ['serve', '-f', file]);
      expect(r.status).toBe(1);
      expect(r.stderr).toMatch(/graph\.yaml:5:\d+: pools\[0\]\.replicas/);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('generate --json reproduces transformers on the fixture; bad input is a clear error', () => {
    const dir = join(packageRoot, 'test/fixtures/hf-tiny-llama');
    const expected = JSON.parse(readFileSync(join(dir, 'expected.json'), 'utf8')) as {
      prompt: string;
      greedy: number[];
    };
    const r = runTs('lib/cli/main.ts', [
      'generate',
      '--model',
      dir,
      '--prompt',
      expected.prompt,
      '--max-tokens',
      '32',
      '--json',
    ]);
    expect(r.status, r.stderr).toBe(0);
    const out = JSON.parse(r.stdout) as { tokenIds: number[]; finishReason: string; timings: { loadMs: number } };
    expect(out.tokenIds).toEqual(expected.greedy);
    expect(out.finishReason).toBe('length');
    const missing = runTs('lib/cli/main.ts', ['generate', '--model', join(dir, 'nope'), '--prompt', 'x']);
    expect(missing.status).toBe(1);
    expect(missing.stderr).toMatch(/no such model directory/);
    const cuda = runTs('lib/cli/main.ts', ['generate', '--model', 'dummy:tiny', '--prompt', 'x', '--device', 'cuda']);
    expect(cuda.status).toBe(1);
    expect(cuda.stderr).toMatch(/CUDA unavailable/);
  });
});
