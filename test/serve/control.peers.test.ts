/**
 * Workers learn their KV-transfer peers from the control plane, never from a parent:
 * - the embedded plane, reached from worker processes over their IPC channel (IpcControlPlane, served by the
 *   launcher's ControlPlaneRelay): list-then-watch, registrations, and what a client may not do;
 * - a launcher's worker under `--control etcd://` learns a worker that joined later through etcd (a separate
 *   `tandem worker --join` process, which the launcher neither owns nor relays), and forgets it when that worker's
 *   lease is lost (its process killed with SIGKILL: nothing revokes the lease, etcd expires it).
 * Loopback only; every wait is bounded; every process is stopped at the end.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from 'vitest';
import {
  ControlPlaneRelay,
  EmbeddedControlPlane,
  IpcControlPlane,
  type ControlPlaneEvent,
  type ControlPlaneRequest,
} from '../../lib/control/index.js';
import { packageRoot } from '../../lib/native/paths.js';
import { defaultGraph } from '../../lib/deploy/graph.js';
import { startDeployment, type Deployment } from '../../lib/deploy/launcher.js';
import { EtcdServer, etcdBinary } from '../helpers/etcd.js';
import { workerRegistration } from '../helpers/fake-worker.js';

const WAIT = { timeout: 30_000, interval: 20 };

describe('the embedded control plane in worker processes (IpcControlPlane over a ControlPlaneRelay)', () => {
  let host: EmbeddedControlPlane;
  let relay: ControlPlaneRelay;
  const refused: string[] = [];

  /** A worker process's client; both directions asynchronous and ordered, as an IPC channel is. */
  const client = (name: string): IpcControlPlane => {
    const toClient = (event: ControlPlaneEvent) => setImmediate(() => c.receive(event));
    const c: IpcControlPlane = new IpcControlPlane((request: ControlPlaneRequest) =>
      setImmediate(() => relay.handle(name, request, toClient)),
    );
    return c;
  };
  const names = (plane: { workers(): { registration: { name: string } }[] }) =>
    plane
      .workers()
      .map((w) => w.registration.name)
      .sort();

  beforeAll(() => {
    host = new EmbeddedControlPlane();
    relay = new ControlPlaneRelay(host, (line) => refused.push(line));
  });
  afterEach(() => {
    for (const w of host.workers()) host.remove(w.registration.name, 'test over');
  });
  afterAll(() => {
    relay.close();
    host.close();
  });

  it('a client sees the workers registered before it watched, then every join and leave', async () => {
    host.register(workerRegistration('early', 'decode'));
    const a = client('a');
    await vi.waitFor(() => expect(names(a)).toEqual(['early']), WAIT);
    const seen: string[] = [];
    a.on('added', (w) => seen.push(`added ${w.registration.name}`));
    a.on('removed', (name, reason) => seen.push(`removed ${name}: ${reason}`));
    host.register(workerRegistration('late', 'prefill'));
    host.remove('early', 'process exited (SIGKILL)');
    await vi.waitFor(() => expect(seen).toEqual(['added late', 'removed early: process exited (SIGKILL)']), WAIT);
    expect(a.get('late')!.registration.role).toBe('prefill');
    expect(names(a)).toEqual(['late']);
    a.close();
  });

  it("a client's registration resolves once its own view shows it, and reaches the host and every other client", async () => {
    const a = client('a');
    const b = client('b');
    await a.register(workerRegistration('a', 'prefill'));
    expect(a.get('a')).toBeDefined();
    expect(host.get('a')!.registration.role).toBe('prefill');
    await vi.waitFor(() => expect(names(b)).toEqual(['a']), WAIT);
    // Registering again (a role switch) replaces it everywhere.
    await a.register(workerRegistration('a', 'decode'));
    await vi.waitFor(() => expect(b.get('a')?.registration.role).toBe('decode'), WAIT);
    a.remove('a', 'leaving');
    await vi.waitFor(() => expect([names(a), names(b), names(host)]).toEqual([[], [], []]), WAIT);
    a.close();
    b.close();
  });

  it("a client cannot register or remove another worker's name", async () => {
    host.register(workerRegistration('b', 'decode'));
    const a = client('a');
    void a.register(workerRegistration('b', 'prefill'));
    a.remove('b', 'not mine');
    await vi.waitFor(() => expect(refused.length).toBe(2), WAIT);
    expect(refused.join('\n')).toMatch(/a tried to register 'b': refused[\s\S]*a tried to remove 'b': refused/);
    expect(host.get('b')!.registration.role).toBe('decode');
    a.close();
  });

  it('drops malformed requests and logs a plane that fails, without throwing into the launcher', async () => {
    const lines: string[] = [];
    const failing = new EmbeddedControlPlane();
    failing.register = () => Promise.reject(new Error('etcd is unreachable'));
    const guarded = new ControlPlaneRelay(failing, (line) => lines.push(line));
    const rejections: unknown[] = [];
    const onRejection = (reason: unknown) => rejections.push(reason);
    process.on('unhandledRejection', onRejection);
    try {
      const send = () => {};
      for (const request of [null, 7, 'watch', {}, { op: 'nonsense' }, { op: 'register' }, { op: 'remove' }])
        expect(() => guarded.handle('a', request as never, send)).not.toThrow();
      guarded.handle('a', { op: 'register', registration: workerRegistration('a', 'decode') }, send);
      await vi.waitFor(
        () => expect(lines.some((l) => /a: register failed: etcd is unreachable/.test(l))).toBe(true),
        WAIT,
      );
      expect(lines.filter((l) => /dropped/.test(l))).toHaveLength(5);
      expect(lines.filter((l) => /refused/.test(l))).toHaveLength(2);
      await new Promise((resolve) => setTimeout(resolve, 20));
      expect(rejections).toEqual([]);
    } finally {
      process.off('unhandledRejection', onRejection);
      guarded.close();
      failing.close();
    }
  });

  it('a closed client hears nothing more', async () => {
    const a = client('a');
    await vi.waitFor(() => expect(names(a)).toEqual([]), WAIT);
    a.close();
    host.register(workerRegistration('c', 'decode'));
    await new Promise((resolve) => setTimeout(resolve, 50));
    expect(a.get('c')).toBeUndefined();
    relay.drop('a');
  });
});

describe("a launcher's workers on the embedded control plane learn their peers from it", () => {
  let d: Deployment;
  const lines: string[] = [];
  const workerLines = (worker: string, text: string) =>
    lines.filter((l) => l.startsWith(`[${worker}] `) && l.includes(text));

  beforeAll(async () => {
    const g = defaultGraph({ gpus: 0, mode: 'disagg', port: 0 });
    for (const p of g.pools) p.engine = { ...p.engine, numBlocks: 64, threads: 1 };
    d = await startDeployment(g, { log: (line) => lines.push(line), heartbeatMs: 100 });
  }, 120_000);
  afterAll(async () => {
    await d?.stop({ drainMs: 500 });
  }, 60_000);

  it('a worker that dies leaves every peer, and joins them again once restarted', async () => {
    await vi.waitFor(() => {
      expect(workerLines('prefill-0', 'peer decode-0 (decode) joined')).toHaveLength(1);
      expect(workerLines('decode-0', 'peer prefill-0 (prefill) joined')).toHaveLength(1);
    }, WAIT);
    const pid = d.pids()['decode-0']!;
    process.kill(pid, 'SIGKILL');
    await vi.waitFor(() => {
      expect(workerLines('prefill-0', 'peer decode-0 left (process exited (SIGKILL))')).toHaveLength(1);
      expect(workerLines('prefill-0', 'peer decode-0 (decode) joined')).toHaveLength(2);
      expect(d.pids()['decode-0']).not.toBe(pid);
    }, WAIT);
    // The restarted worker learns the peer that was there before it (the snapshot), not from a relay.
    expect(workerLines('decode-0', 'peer prefill-0 (prefill) joined')).toHaveLength(2);
  }, 60_000);
});

const binary = etcdBinary();
if (binary.missing) console.log(`skipping the launcher-peers-from-etcd test: ${binary.missing}`);

describe.skipIf(binary.missing !== undefined)("a launcher's workers on etcd learn their peers from etcd", () => {
  const NAMESPACE = `peers${process.pid}`;
  const PEER = 'late-decode';
  let etcd: EtcdServer;
  let d: Deployment;
  let dir: string;
  let peer: ChildProcess | undefined;
  const lines: string[] = [];
  const peerLines: string[] = [];

  beforeAll(async () => {
    etcd = await EtcdServer.start(binary.path!);
    dir = mkdtempSync(join(tmpdir(), 'tandem-peers-'));
    writeFileSync(
      join(dir, 'graph.yaml'),
      `model: dummy:tiny
mode: disagg
pools:
  - { name: prefill, role: prefill, replicas: 1, device: cpu, engine: { numBlocks: 64, threads: 1 } }
  - { name: decode, role: decode, replicas: 1, device: cpu, engine: { numBlocks: 64, threads: 1 } }
`,
    );
    const g = defaultGraph({ gpus: 0, mode: 'disagg', port: 0 });
    for (const p of g.pools) p.engine = { ...p.engine, numBlocks: 64, threads: 1 };
    d = await startDeployment(g, {
      log: (line) => lines.push(line),
      heartbeatMs: 100,
      control: { endpoints: etcd.endpoint, namespace: NAMESPACE, leaseTtlSeconds: 2 },
    });
  }, 120_000);

  afterAll(async () => {
    peer?.kill('SIGKILL');
    await d?.stop({ drainMs: 500 });
    await etcd?.stop();
    if (dir) rmSync(dir, { recursive: true, force: true });
  }, 60_000);

  const workerLines = (worker: string, text: string) =>
    lines.filter((l) => l.startsWith(`[${worker}] `) && l.includes(text));

  it('a worker that joins later through etcd becomes a peer of every launcher worker, and leaves with its lease', async () => {
    // Before it: the launcher's workers know each other, from etcd.
    await vi.waitFor(() => {
      expect(workerLines('prefill-0', 'peer decode-0 (decode) joined')).toHaveLength(1);
      expect(workerLines('decode-0', 'peer prefill-0 (prefill) joined')).toHaveLength(1);
    }, WAIT);

    peer = spawn(
      process.execPath,
      [
        '--import',
        'tsx',
        join(packageRoot, 'lib/cli/main.ts'),
        'worker',
        '--join',
        etcd.endpoint,
        '--namespace',
        NAMESPACE,
        '--pool',
        'decode',
        '--graph',
        join(dir, 'graph.yaml'),
        '--host',
        '127.0.0.1',
        '--name',
        PEER,
      ],
      { cwd: packageRoot, stdio: ['ignore', 'pipe', 'pipe'] },
    );
    for (const stream of [peer.stdout!, peer.stderr!])
      createInterface({ input: stream }).on('line', (line) => peerLines.push(line));

    await vi.waitFor(
      () => {
        expect(peer!.exitCode, peerLines.join('\n')).toBeNull();
        expect(workerLines('prefill-0', `peer ${PEER} (decode) joined`)).toHaveLength(1);
        expect(workerLines('decode-0', `peer ${PEER} (decode) joined`)).toHaveLength(1);
      },
      { timeout: 90_000, interval: 50 },
    );
    // The launcher sees it in etcd, but it is not the launcher's: nothing of the launcher's own speaks of it.
    expect(d.controlPlane.get(PEER)).toBeDefined();
    expect(lines.filter((l) => l.startsWith('[launcher]') && l.includes(PEER))).toEqual([]);

    // Killed: nothing revokes its lease; etcd expires it (TTL 5 s) and every worker forgets the peer.
    peer.kill('SIGKILL');
    await vi.waitFor(
      () => {
        for (const w of ['prefill-0', 'decode-0'])
          expect(workerLines(w, `peer ${PEER} left (its lease expired or its registration was deleted)`)).toHaveLength(
            1,
          );
      },
      { timeout: 30_000, interval: 50 },
    );
    expect(d.controlPlane.get(PEER)).toBeUndefined();
    // The launcher's own workers stay peers of each other.
    expect(workerLines('prefill-0', 'peer decode-0 ')).toHaveLength(1);
  }, 150_000);
});
