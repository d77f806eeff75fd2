/**
 * What the router and the launcher rely on, checked on both control planes: EmbeddedControlPlane (one host)
 * and EtcdControlPlane (a real etcd). Events and views may arrive later on etcd, so every check waits for them.
 */
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from 'vitest';
import { EmbeddedControlPlane, EtcdControlPlane, type ControlPlane } from '../../lib/control/index.js';
import { EtcdServer, etcdBinary } from '../helpers/etcd.js';
import { workerRegistration } from './registration.js';

const binary = etcdBinary();
if (binary.missing) console.log(`skipping the etcd half of the control-plane conformance tests: ${binary.missing}`);
const SEEN = { timeout: 10_000, interval: 20 };

let etcd: EtcdServer | undefined;
let namespaceCount = 0;
const planes: ControlPlane[] = [];

beforeAll(async () => {
  if (!binary.missing) etcd = await EtcdServer.start(binary.path!);
});
afterEach(async () => {
  await Promise.all(planes.splice(0).map((p) => p.close()));
});
afterAll(async () => {
  await etcd?.stop();
});

const kinds: { kind: string; make: () => Promise<ControlPlane>; skip: boolean }[] = [
  { kind: 'embedded', make: async () => new EmbeddedControlPlane(), skip: false },
  {
    kind: 'etcd',
    make: () =>
      EtcdControlPlane.connect({
        endpoints: etcd!.endpoint,
        namespace: `conformance-${process.pid}-${++namespaceCount}`,
        leaseTtlSeconds: 2,
        loadIntervalMs: 50,
      }),
    skip: binary.missing !== undefined,
  },
];

describe.each(kinds)('$kind control plane', ({ make, skip }) => {
  const plane = async () => {
    const p = await make();
    planes.push(p);
    return p;
  };

  it.skipIf(skip)('register, heartbeat, filter by role, remove with a reason, register again', async () => {
    const p = await plane();
    const events: string[] = [];
    p.on('added', (w) => events.push(`added ${w.registration.name}`));
    p.on('removed', (name, reason) => events.push(`removed ${name}: ${reason}`));

    await p.register(workerRegistration('d0', 'decode', 1));
    await p.register(workerRegistration('p0', 'prefill'));
    await vi.waitFor(
      () =>
        expect(
          p
            .workers()
            .map((w) => w.registration.name)
            .sort(),
        ).toEqual(['d0', 'p0']),
      SEEN,
    );
    expect(p.workers('prefill').map((w) => w.registration.name)).toEqual(['p0']);
    expect(p.workers('aggregated')).toEqual([]);
    // a new worker starts with its whole KV pool free
    expect(p.get('d0')!.load).toEqual({ running: 0, waiting: 0, freeBlocks: 64, prefilling: 0 });

    const load = { running: 2, waiting: 1, freeBlocks: 10, prefilling: 0 };
    p.heartbeat('d0', load);
    await vi.waitFor(() => expect(p.get('d0')!.load).toEqual(load), SEEN);
    p.heartbeat('unknown', load); // ignored

    await p.register(workerRegistration('d0', 'decode', 2));
    await vi.waitFor(() => expect(p.get('d0')?.registration.pid).toBe(2), SEEN);

    await p.remove('p0', 'worker exited (code 1)');
    await vi.waitFor(() => expect(p.get('p0')).toBeUndefined(), SEEN);
    await p.remove('p0', 'twice'); // nothing left to remove: no event
    await vi.waitFor(() => expect(events).toContain('removed p0: worker exited (code 1)'), SEEN);
    expect(events.filter((e) => e.startsWith('added')).sort()).toEqual(['added d0', 'added d0', 'added p0']);
    expect(events).toContain('removed d0: registered again');
    expect(events).not.toContain('removed p0: twice');
  });
});
