import { spawnSync } from 'node:child_process';
import { describe, expect, it } from 'vitest';
import { packageRoot } from '../lib/native/paths.js';

// Native addons die at exit more often than anywhere else: each case runs in a fresh process and must
// exit by itself, promptly, with the expected code.
function runScript(source: string, timeoutMs = 30_000) {
  return spawnSync(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', source], {
    cwd: packageRoot,
    encoding: 'utf8',
    timeout: timeoutMs,
  });
}

describe('native addon: threads and exit', () => {
  it('a process that probes exits by itself once the Promise has settled', () => {
    const r = runScript(`
      import { capabilities } from './lib/index.ts';
      const c = await capabilities();
      console.log('probed', typeof c.cuda.available);
    `);
    expect(r.signal, r.stderr).toBeNull();
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toContain('probed boolean');
  });

  it('the event loop stays alive while a probe is pending (the result is not lost)', () => {
    const r = runScript(`
      import { loadBinding, libraryCandidates } from './lib/index.ts';
      loadBinding().binding.probe({ libraries: libraryCandidates() }).then(() => console.log('settled'));
    `);
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toContain('settled');
  });

  it('probes from worker threads, and terminating a worker mid-probe neither hangs nor crashes', () => {
    const r = runScript(`
      import { Worker } from 'node:worker_threads';
      const file = new URL('./test/fixtures/probe-worker.mjs', 'file://' + process.cwd() + '/');
      const run = () => new Promise((resolve, reject) => {
        const w = new Worker(file, { workerData: { root: process.cwd() }, execArgv: [] });
        w.on('message', (m) => console.log(m));
        w.on('error', reject); w.on('exit', resolve);
      });
      await Promise.all([run(), run()]);
      for (const delay of [0, 2, 10]) {
        const doomed = new Worker(file, { workerData: { root: process.cwd() }, execArgv: [] });
        setTimeout(() => doomed.terminate(), delay);
        await new Promise((resolve) => doomed.on('exit', resolve));
      }
      console.log('main done');
    `);
    expect(r.signal, r.stderr).toBeNull();
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout.match(/worker boolean/g)?.length).toBe(2);
    expect(r.stdout).toContain('main done');
  });

  it('without a GPU, opening a device rejects with CudaUnavailableError and the process stays healthy', () => {
    const r = runScript(`
      import { CudaDevice, CudaUnavailableError, capabilities } from './lib/index.ts';
      const c = await capabilities();
      if (c.cuda.available) { console.log('gpu host: skipped'); process.exit(0); }
      try { await CudaDevice.open(0); console.log('opened?!'); }
      catch (e) { console.log(e instanceof CudaUnavailableError ? 'typed' : 'untyped', e.message); }
      const again = await capabilities();
      console.log('still healthy', again.schemaVersion);
    `);
    expect(r.status, r.stderr).toBe(0);
    if (r.stdout.includes('gpu host')) return;
    expect(r.stdout).toMatch(/typed CUDA unavailable: libcuda\.so\.1 not found/);
    expect(r.stdout).toContain('still healthy 1');
  });
});
