import { spawnSync } from 'node:child_process';
import { describe, expect, it } from 'vitest';
import {
  BackendUnavailableError,
  BadArgumentError,
  Communicator,
  NcclUnavailableError,
  createUniqueId,
  ncclInfo,
} from '../lib/index.js';
import { packageRoot } from '../lib/native/paths.js';

// Where NCCL (or a GPU) is absent the collectives API exists and every call rejects with
// NcclUnavailableError ("NCCL unavailable: <reason>"); nothing crashes and the process exits normally.
const info = await ncclInfo();

function runScript(source: string, env: NodeJS.ProcessEnv = {}) {
  return spawnSync(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', source], {
    cwd: packageRoot,
    encoding: 'utf8',
    timeout: 60_000,
    env: { ...process.env, ...env },
  });
}

const ID = new Uint8Array(128);

describe.skipIf(info.available)('collectives without NCCL', () => {
  it('ncclInfo says why, naming every place searched', () => {
    expect(info.available).toBe(false);
    expect(info.fp8).toBe(false);
    expect(info.reason).toMatch(/^libnccl\.so\.2 not found \(searched: .*libnccl\.so\.2/);
  });

  it('createUniqueId, init and initAll reject with NcclUnavailableError', async () => {
    const calls: [string, () => Promise<unknown>][] = [
      ['createUniqueId', () => createUniqueId()],
      ['init', () => Communicator.init({ id: ID, rank: 0, size: 2, device: 0 })],
      ['initAll', () => Communicator.initAll({ devices: [0, 1] })],
    ];
    for (const [what, call] of calls) {
      const error = await call().then(
        () => undefined,
        (e: unknown) => e,
      );
      expect(error, what).toBeInstanceOf(NcclUnavailableError);
      const e = error as NcclUnavailableError;
      expect(e).toBeInstanceOf(BackendUnavailableError);
      expect(e.code).toBe('TANDEM_NCCL_UNAVAILABLE');
      expect(e.backend).toBe('NCCL');
      expect(e.reason).toBe(info.reason);
      expect(e.message).toBe(`NCCL unavailable: ${info.reason}`);
    }
  });

  it('bad arguments are reported as such before availability', async () => {
    await expect(Communicator.init({ id: ID, rank: 2, size: 2, device: 0 })).rejects.toBeInstanceOf(BadArgumentError);
    await expect(Communicator.init({ id: ID, rank: 0, size: 2, device: 0, timeoutMs: 0 })).rejects.toBeInstanceOf(
      BadArgumentError,
    );
  });

  it('TANDEM_LIBNCCL is searched first and named in the reason; the process exits normally', () => {
    const r = runScript(
      `
      import { createUniqueId, ncclInfo } from './lib/index.ts';
      const info = await ncclInfo();
      console.log('reason:', info.reason);
      try { await createUniqueId(); console.log('made an id?!'); }
      catch (e) { console.log('rejected:', e.name, e.message); }
    `,
      { TANDEM_LIBNCCL: '/nonexistent/tandem-test/libnccl.so.2' },
    );
    expect(r.signal, r.stderr).toBeNull();
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toContain(
      'reason: libnccl.so.2 not found (searched: /nonexistent/tandem-test/libnccl.so.2, libnccl.so.2',
    );
    expect(r.stdout).toContain('rejected: NcclUnavailableError NCCL unavailable: libnccl.so.2 not found');
  });
});

describe('collectives: loading a library that is not NCCL', () => {
  it('reports the missing entry points instead of crashing', () => {
    // libm loads everywhere and has none of NCCL's symbols.
    const r = runScript(
      `
      import { ncclInfo, createUniqueId, loadBinding } from './lib/index.ts';
      const info = await ncclInfo();
      console.log('available:', info.available);
      console.log('reason:', info.reason);
      await createUniqueId().catch((e) => console.log('rejected:', e.name));
      try { loadBinding().binding.ncclInit({}); } catch (e) { console.log('raw init:', e.code); }
    `,
      { TANDEM_LIBNCCL: 'libm.so.6' },
    );
    expect(r.signal, r.stderr).toBeNull();
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toContain('available: false');
    expect(r.stdout).toMatch(
      /reason: \S*libm\.so\.6 lacks NCCL entry points Tandem needs: ncclGetVersion, ncclGetUniqueId/,
    );
    expect(r.stdout).toContain('rejected: NcclUnavailableError');
    expect(r.stdout).toContain('raw init: TANDEM_NCCL_UNAVAILABLE');
  });
});
