/**
 * The CPU runner's threads at exit: each case runs in a fresh process that must exit by itself, promptly,
 * with status 0, whether runners are disposed, left to the environment's cleanup, or torn down with their
 * worker thread in the middle of a forward pass.
 */
import { spawnSync } from 'node:child_process';
import { describe, expect, it } from 'vitest';
import { packageRoot } from '../../lib/native/paths.js';

function runScript(source: string, timeoutMs = 60_000) {
  return spawnSync(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', source], {
    cwd: packageRoot,
    encoding: 'utf8',
    timeout: timeoutMs,
  });
}

const WORKER = `
  import { Worker } from 'node:worker_threads';
  const file = new URL('./test/fixtures/cpu-runner-worker.mjs', 'file://' + process.cwd() + '/');
  const start = (data) => new Worker(file, { workerData: { root: process.cwd(), ...data }, execArgv: [] });
  const finish = (w) => new Promise((resolve, reject) => {
    w.on('message', (m) => console.log(m));
    w.on('error', reject);
    w.on('exit', resolve);
  });
`;

describe('CpuModelRunner: threads and exit', () => {
  it('a process that never disposes its runner exits by itself (cleanup joins the threads)', () => {
    const r = runScript(`
      import { CpuModelRunner } from './lib/engine/cpu.ts';
      import { dummyConfig } from './lib/engine/model/index.ts';
      const runner = await CpuModelRunner.create({ config: dummyConfig('tiny'), numBlocks: 4, weights: 'dummy:tiny', threads: 4 });
      const logits = await runner.forward({
        tokens: Int32Array.of(256, 1, 2), positions: Int32Array.of(0, 1, 2), seqStarts: Int32Array.of(0, 3),
        blockTables: Int32Array.of(2), maxBlocksPerSeq: 1, contextLens: Int32Array.of(3),
      });
      console.log('logits', logits.length, runner.threads);
    `);
    expect(r.signal, r.stderr).toBeNull();
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toContain('logits 258 4');
  });

  it('runners in worker threads: disposed, left to cleanup, and two at once', () => {
    const r = runScript(`${WORKER}
      await finish(start({ dispose: true, passes: 2 }));
      await finish(start({ dispose: false }));
      await Promise.all([finish(start({ dispose: true })), finish(start({ dispose: false }))]);
      console.log('main done');
    `);
    expect(r.signal, r.stderr).toBeNull();
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout.match(/logits 258 finite true/g)?.length).toBe(5);
    expect(r.stdout.match(/done disposed=true/g)?.length).toBe(2);
    expect(r.stdout.match(/done disposed=false/g)?.length).toBe(2);
    expect(r.stdout).toContain('main done');
  });

  it('terminating a worker in the middle of forward passes neither hangs nor crashes', () => {
    const r = runScript(`${WORKER}
      for (const delay of [0, 20, 80, 200]) {
        const w = start({ hidden: 256, layers: 4, tokens: 128, passes: 50 });
        setTimeout(() => w.terminate(), delay);
        await new Promise((resolve) => w.on('exit', resolve));
      }
      console.log('main done');
    `);
    expect(r.signal, r.stderr).toBeNull();
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toContain('main done');
  });
});
