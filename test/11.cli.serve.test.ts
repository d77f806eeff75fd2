import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, copyFileSync, writeFileSync } from 'node:fs';
import { createServer, type AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { describe, expect, it, vi } from 'vitest';
import { capabilities } from '../lib/capabilities/index.js';
import { packageRoot } from '../lib/native/paths.js';
import { runTs } from './helpers/cli.js';

// The README's commands: `tandem start` (what npm start runs) serving until SIGINT or SIGTERM, `tandem serve
// -f`, `tandem generate`; how they fail (a missing model, a worker that cannot start, a busy port: one line,
// exit 1, before any weights load where it can). Loopback, an ephemeral port, bounded waits.
const alive = (pid: number) => {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
};
const FIXTURE = join(packageRoot, 'test/fixtures/hf-tiny-llama');
const cudaAvailable = (await capabilities()).cuda.available;
const GONE = { timeout: 20_000, interval: 50 };

interface Serving {
  child: ChildProcess;
  /** stdout and stderr lines so far. */
  lines: string[];
  url: string;
  /** Every process of the deployment: the launcher and its workers, from the banner. */
  pids: number[];
  exited: Promise<number | null>;
}

/** Spawns a command that starts a deployment and resolves once its banner is out (bounded). */
async function serving(command: string, args: string[], env: NodeJS.ProcessEnv = {}): Promise<Serving> {
  const child = spawn(command, args, {
    cwd: packageRoot,
    env: { ...process.env, ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const lines: string[] = [];
  const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
  createInterface({ input: child.stderr! }).on('line', (l) => lines.push(l));
  const url = await new Promise<string>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no banner within 90 s:\n${lines.join('\n')}`)), 90_000);
    void exited.then((code) => reject(new Error(`exited (${code}) before its banner:\n${lines.join('\n')}`)));
    createInterface({ input: child.stdout! }).on('line', (l) => {
      lines.push(l);
      const m = /OpenAI API: (http:\/\/127\.0\.0\.1:\d+)\/v1/.exec(l);
      if (m) {
        clearTimeout(timer);
        resolve(m[1]!);
      }
    });
  });
  const text = lines.join('\n');
  const pids = [...text.matchAll(/\(pid (\d+)\)|launcher pid (\d+)/g)].map((m) => Number(m[1] ?? m[2]));
  return { child, lines, url, pids, exited };
}

const tandemStart = (args: string[], env: NodeJS.ProcessEnv = {}) =>
  serving(process.execPath, ['--import', 'tsx', join(packageRoot, 'lib/cli/main.ts'), ...args], env);

/** True when nothing accepts connections at `url` any more. */
const refused = (url: string) =>
  fetch(`${url}/health`).then(
    () => false,
    () => true,
  );

const chat = (url: string, headers: Record<string, string> = {}) =>
  fetch(`${url}/v1/chat/completions`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', ...headers },
    body: JSON.stringify({ model: 'dummy:tiny', messages: [{ role: 'user', content: 'Hello' }], max_tokens: 8 }),
  });

describe('tandem start / serve / generate', () => {
  it('start serves the embedded deployment until SIGINT, then stops every worker; TANDEM_API_KEY guards it', async () => {
    const s = await tandemStart(['start', '--port', '0'], { TANDEM_API_KEY: 'test-key-1' });
    try {
      const text = s.lines.join('\n');
      expect(text).toMatch(/prefill-0 registered \(prefill, cpu/);
      expect(text).toMatch(/decode-0 registered \(decode, cpu/);
      expect(text).toContain('starting 2 workers for dummy:tiny');
      expect(text).toContain('API key required');
      expect(text).not.toContain('WARNING'); // loopback
      expect(s.pids.length).toBe(3);
      expect((await chat(s.url)).status).toBe(401);
      const r = await chat(s.url, { authorization: 'Bearer test-key-1' });
      expect(r.status).toBe(200);
      const body = (await r.json()) as { usage: { completion_tokens: number } };
      expect(body.usage.completion_tokens).toBeGreaterThan(0);
      s.child.kill('SIGINT');
      expect(await s.exited, s.lines.join('\n')).toBe(0);
      expect(s.lines.join('\n')).toContain('tandem: stopped');
      for (const pid of s.pids) expect(alive(pid), `process ${pid} outlived the launcher`).toBe(false);
    } finally {
      if (s.child.exitCode === null) s.child.kill('SIGKILL');
    }
  }, 120_000);

  it.each(['SIGTERM', 'SIGINT'] as const)(
    '%s to the npm start process stops the whole deployment (launcher and workers) and frees the port',
    async (signal) => {
      expect(existsSync(join(packageRoot, 'dist/cli/main.js')), 'npm start runs dist/: npm run build:ts').toBe(true);
      const npm = await serving('npm', ['start', '--', '--port', '0']);
      try {
        expect(npm.pids.length).toBe(3);
        expect((await chat(npm.url)).status).toBe(200);
        npm.child.kill(signal); // npm alone, as a process manager or `kill` does: not the process group
        await vi.waitFor(() => expect(npm.child.exitCode !== null || npm.child.signalCode !== null).toBe(true), GONE);
        await vi.waitFor(() => expect(npm.pids.filter(alive)).toEqual([]), GONE);
        expect(await refused(npm.url)).toBe(true);
      } finally {
        for (const pid of npm.pids.filter(alive)) process.kill(pid, 'SIGKILL');
        if (npm.child.exitCode === null) npm.child.kill('SIGKILL');
      }
    },
    120_000,
  );

  it.runIf(existsSync('/proc/self/task'))(
    'workers exit by themselves when the launcher is killed (SIGKILL), also while they load',
    async () => {
      for (const when of ['loading', 'serving'] as const) {
        const child = spawn(
          process.execPath,
          ['--import', 'tsx', join(packageRoot, 'lib/cli/main.ts'), 'start', '--port', '0'],
          { cwd: packageRoot, stdio: ['ignore', 'pipe', 'inherit'] },
        );
        const workers: number[] = [];
        try {
          await new Promise<void>((resolve, reject) => {
            const timer = setTimeout(() => reject(new Error(`${when}: not reached within 90 s`)), 90_000);
            createInterface({ input: child.stdout! }).on('line', (l) => {
              if (
                (when === 'loading' && /starting 2 workers/.test(l)) ||
                (when === 'serving' && /OpenAI API/.test(l))
              ) {
                clearTimeout(timer);
                resolve();
              }
            });
          });
          const children = () =>
            readFileSync(`/proc/${child.pid}/task/${child.pid}/children`, 'utf8').trim().split(/\s+/).filter(Boolean);
          await vi.waitFor(() => expect(children()).toHaveLength(2), GONE);
          workers.push(...children().map(Number));
          child.kill('SIGKILL');
          await vi.waitFor(() => expect(workers.filter(alive), when).toEqual([]), GONE);
        } finally {
          for (const pid of workers.filter(alive)) process.kill(pid, 'SIGKILL');
          if (child.exitCode === null) child.kill('SIGKILL');
        }
      }
    },
    120_000,
  );

  it('a missing model, a worker that cannot load its model: one line, exit 1, no restarts', () => {
    const missing = runTs('lib/cli/main.ts', ['start', '--port', '0', '--model', '/nonexistent/dir']);
    expect(missing.status).toBe(1);
    expect(missing.stderr).toBe('tandem: /nonexistent/dir: no such model directory or config file\n');
    expect(missing.stdout).not.toContain('starting'); // checked before any worker started

    // Config and tokenizer, no weights: the workers fail to load, and the start fails at once with their error.
    const dir = mkdtempSync(join(tmpdir(), 'tandem-model-'));
    try {
      for (const f of ['config.json', 'tokenizer.json', 'tokenizer_config.json'])
        copyFileSync(join(FIXTURE, f), join(dir, f));
      const r = runTs('lib/cli/main.ts', ['start', '--port', '0', '--model', dir], {}, 60_000);
      expect(r.status, r.stdout + r.stderr).toBe(1);
      expect(r.stderr).toMatch(
        new RegExp(`^tandem: worker (prefill|decode)-0 failed to start: ${dir}: no model\\.safetensors.*\\n$`),
      );
      expect(r.stdout).not.toMatch(/restarting|registered/);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  }, 90_000);

  // A worker that cannot start (CUDA asked for on a machine without it) while the other still loads its model
  // (dummy:llama-3.2-1b on the CPU takes seconds): the start fails at once, the loading worker is stopped, and
  // the process exits. The loading worker's wait for its registration used to keep the process alive until the
  // 120 s start timeout.
  it.skipIf(cudaAvailable)(
    'a worker that fails while another still loads: exit 1 without waiting for the start timeout',
    () => {
      const dir = mkdtempSync(join(tmpdir(), 'tandem-graph-'));
      try {
        const file = join(dir, 'graph.yaml');
        writeFileSync(
          file,
          [
            'model: dummy:llama-3.2-1b',
            'mode: disagg',
            'frontend: { host: 127.0.0.1, port: 0 }',
            'pools:',
            '  - { name: prefill, role: prefill, replicas: 1, device: cpu, engine: { numBlocks: 64, threads: 1 } }',
            '  - { name: decode, role: decode, replicas: 1, device: cuda, engine: { numBlocks: 64 } }',
          ].join('\n'),
        );
        const r = runTs('lib/cli/main.ts', ['serve', '-f', file], {}, 60_000);
        expect(r.status, r.stdout + r.stderr).toBe(1);
        expect(r.stderr).toMatch(/^tandem: worker decode-0 failed to start: CUDA unavailable: .*\n$/);
      } finally {
        rmSync(dir, { recursive: true, force: true });
      }
    },
    90_000,
  );

  it('a busy port: one line naming it, exit 1, before any worker starts', async () => {
    const holder = createServer();
    await new Promise<void>((resolve) => holder.listen(0, '127.0.0.1', resolve));
    const port = (holder.address() as AddressInfo).port;
    try {
      const r = runTs('lib/cli/main.ts', ['start', '--port', String(port)]);
      expect(r.status).toBe(1);
      expect(r.stderr).toBe(
        `tandem: cannot listen on 127.0.0.1:${port}: the port is in use (stop what holds it, or pick another with --port)\n`,
      );
      expect(r.stdout).not.toContain('starting');
    } finally {
      holder.close();
    }
  });

  it('a host other than loopback without an API key: a warning', () => {
    // 192.0.2.1 (TEST-NET-1) is no address of this machine: nothing is ever exposed; the warning comes first.
    const r = runTs('lib/cli/main.ts', ['start', '--host', '192.0.2.1', '--port', '0']);
    expect(r.status).toBe(1);
    expect(r.stdout).toMatch(
      /WARNING: the API on 192\.0\.2\.1 is reachable from other machines and has no authentication/,
    );
    expect(r.stderr).toBe('tandem: cannot listen on 192.0.2.1:0: no such address on this machine\n');
    const keyed = runTs('lib/cli/main.ts', ['start', '--host', '192.0.2.1', '--port', '0', '--api-key', 'k']);
    expect(keyed.stdout).not.toContain('WARNING');
  });

  it('serve -f: the API key comes from the variable the graph names (never from the file)', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'tandem-graph-'));
    try {
      const file = join(dir, 'graph.yaml');
      writeFileSync(
        file,
        'model: dummy:tiny\nmode: agg\nfrontend: { port: 0, apiKeyEnv: MY_TANDEM_KEY }\n' +
          'pools:\n  - { name: agg, role: aggregated, device: cpu, engine: { numBlocks: 64, threads: 1 } }\n',
      );
      const unset = runTs('lib/cli/main.ts', ['serve', '-f', file], { MY_TANDEM_KEY: '' });
      expect(unset.status).toBe(1);
      expect(unset.stderr).toBe('tandem: frontend.apiKeyEnv names MY_TANDEM_KEY, which is not set (or is empty)\n');
      const s = await tandemStart(['serve', '-f', file], { MY_TANDEM_KEY: 'graph-key', TANDEM_API_KEY: 'other' });
      try {
        expect(s.lines.join('\n')).toContain('starting 1 worker for dummy:tiny');
        expect((await chat(s.url, { authorization: 'Bearer other' })).status).toBe(401);
        expect((await chat(s.url, { authorization: 'Bearer graph-key' })).status).toBe(200);
        s.child.kill('SIGTERM');
        expect(await s.exited).toBe(0);
      } finally {
        if (s.child.exitCode === null) s.child.kill('SIGKILL');
      }
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  }, 120_000);

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
