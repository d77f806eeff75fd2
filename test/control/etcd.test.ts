/**
 * EtcdControlPlane against a real etcd on loopback (test/helpers/etcd.ts): instances stand for hosts; a child
 * process holds a lease and is killed; etcd itself is killed and restarted, with and without its data.
 */
import { spawn } from 'node:child_process';
import { createServer, type Server, type Socket } from 'node:net';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Etcd3 } from 'etcd3';
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from 'vitest';
import {
  ControlPlaneUnavailableError,
  EtcdControlPlane,
  parseEtcdEndpoints,
  type EtcdControlPlaneOptions,
  type LiveWorker,
} from '../../lib/control/index.js';
import { BadArgumentError } from '../../lib/errors.js';
import { runTs } from '../helpers/cli.js';
import { EtcdServer, etcdBinary, freeLoopbackPort } from '../helpers/etcd.js';
import { workerRegistration } from './registration.js';

const here = dirname(fileURLToPath(import.meta.url));
const binary = etcdBinary();
if (binary.missing) console.log(`skipping the etcd control-plane tests: ${binary.missing}`);

/** Short leases so that expiry shows within a test; the bound on each wait is generous (never a timing assertion). */
const TTL_S = 2;
const GONE = { timeout: TTL_S * 1000 + 8_000, interval: 50 };
const SEEN = { timeout: 10_000, interval: 20 };

let namespaceCount = 0;
const freshNamespace = () => `t${process.pid}-${++namespaceCount}`;

describe.skipIf(binary.missing !== undefined)('EtcdControlPlane with a real etcd', () => {
  let etcd: EtcdServer;
  const planes: EtcdControlPlane[] = [];

  async function host(namespace: string, options: Partial<EtcdControlPlaneOptions> = {}): Promise<EtcdControlPlane> {
    const plane = await EtcdControlPlane.connect({
      endpoints: etcd.endpoint,
      namespace,
      leaseTtlSeconds: TTL_S,
      loadIntervalMs: 100,
      ...options,
    });
    planes.push(plane);
    return plane;
  }

  const names = (plane: EtcdControlPlane, role?: LiveWorker['registration']['role']) =>
    plane
      .workers(role)
      .map((w) => w.registration.name)
      .sort();

  beforeAll(async () => {
    etcd = await EtcdServer.start(binary.path!);
  });
  afterEach(async () => {
    await Promise.all(planes.splice(0).map((p) => p.close()));
  });
  afterAll(async () => {
    await etcd?.stop();
  });

  it('a worker registered on one host is seen, with its load, by another; removal reaches both', async () => {
    const ns = freshNamespace();
    const a = await host(ns);
    const b = await host(ns);
    const added: LiveWorker[] = [];
    const removed: [string, string][] = [];
    b.on('added', (w) => added.push(w));
    b.on('removed', (name, reason) => removed.push([name, reason]));

    const registration = workerRegistration('decode-0', 'decode');
    await a.register(registration);
    await a.register(workerRegistration('prefill-0', 'prefill'));
    // register() resolves once the registering instance's own cache shows the worker
    expect(names(a)).toEqual(['decode-0', 'prefill-0']);
    await vi.waitFor(() => expect(names(b)).toEqual(['decode-0', 'prefill-0']), SEEN);
    expect(names(b, 'prefill')).toEqual(['prefill-0']);
    const seen = b.get('decode-0')!;
    expect(seen.registration).toEqual(registration);
    expect(seen.registration.agentMetadata).toBeInstanceOf(Uint8Array);
    expect(added.map((w) => w.registration.name).sort()).toEqual(['decode-0', 'prefill-0']);

    // heartbeats are throttled, and the newest load wins
    a.heartbeat('decode-0', { running: 1, waiting: 0, freeBlocks: 60, prefilling: 0 });
    a.heartbeat('decode-0', { running: 3, waiting: 2, freeBlocks: 40, prefilling: 0 });
    expect(a.get('decode-0')!.load.running).toBe(3);
    await vi.waitFor(
      () => expect(b.get('decode-0')!.load).toEqual({ running: 3, waiting: 2, freeBlocks: 40, prefilling: 0 }),
      SEEN,
    );

    await a.remove('decode-0', 'worker exited (code 1)');
    await vi.waitFor(() => expect(names(b)).toEqual(['prefill-0']), SEEN);
    expect(removed).toEqual([['decode-0', 'its lease expired or its registration was deleted']]);
    expect(names(a)).toEqual(['prefill-0']);

    // a host may remove a worker it did not register (the launcher that saw it die); its reason goes with it
    const reasons: string[] = [];
    a.on('removed', (_name, reason) => reasons.push(reason));
    await b.remove('prefill-0', 'no heartbeat');
    await vi.waitFor(() => expect(names(a)).toEqual([]), SEEN);
    expect(reasons).toEqual(['its lease expired or its registration was deleted']);
    expect(names(b)).toEqual([]);
  });

  it('the remover sees its own reason; registering a name again replaces the worker', async () => {
    const ns = freshNamespace();
    const a = await host(ns);
    const b = await host(ns);
    const events: string[] = [];
    b.on('added', (w) => events.push(`added ${w.registration.name} pid ${w.registration.pid}`));
    b.on('removed', (name, reason) => events.push(`removed ${name}: ${reason}`));
    await a.register(workerRegistration('w', 'decode', 100));
    await vi.waitFor(() => expect(b.get('w')?.registration.pid).toBe(100), SEEN);
    await a.register(workerRegistration('w', 'decode', 200));
    await vi.waitFor(() => expect(b.get('w')?.registration.pid).toBe(200), SEEN);
    expect(events[0]).toBe('added w pid 100');
    expect(events.at(-1)).toBe('added w pid 200');
    expect(events).toContain('removed w: registered again');

    await b.remove('w', 'drained by the planner');
    await vi.waitFor(() => expect(events.at(-1)).toBe('removed w: drained by the planner'), SEEN);
    await vi.waitFor(() => expect(a.get('w')).toBeUndefined(), SEEN);
  });

  it('a host that joins later lists the workers already registered; namespaces do not mix', async () => {
    const ns = freshNamespace();
    const a = await host(ns);
    await a.register(workerRegistration('early', 'aggregated'));
    const late = await host(ns);
    expect(names(late)).toEqual(['early']);
    const other = await host(freshNamespace());
    expect(names(other)).toEqual([]);
  });

  it('a registration closed with its plane leaves discovery at once (lease revoked)', async () => {
    const ns = freshNamespace();
    const a = await host(ns, { leaseTtlSeconds: 60 });
    const b = await host(ns);
    await a.register(workerRegistration('leaving', 'decode'));
    await vi.waitFor(() => expect(names(b)).toEqual(['leaving']), SEEN);
    await a.close();
    // well before the 60 s lease could expire
    await vi.waitFor(() => expect(names(b)).toEqual([]), SEEN);
  });

  it('a host killed with SIGKILL loses its lease: its worker leaves discovery within the TTL', async () => {
    const ns = freshNamespace();
    const watcher = await host(ns);
    const removed: string[] = [];
    watcher.on('removed', (name) => removed.push(name));
    const child = spawn(
      process.execPath,
      ['--import', 'tsx', join(here, 'lease-holder.ts'), etcd.endpoint, ns, 'remote-prefill-0', String(TTL_S)],
      { stdio: ['ignore', 'pipe', 'inherit'] },
    );
    try {
      await new Promise<void>((resolve, reject) => {
        child.stdout!.on('data', (chunk: Buffer) => chunk.toString().includes('registered') && resolve());
        child.once('exit', (code) => reject(new Error(`lease holder exited early (${code})`)));
      });
      await vi.waitFor(() => expect(names(watcher)).toEqual(['remote-prefill-0']), SEEN);
      expect(watcher.get('remote-prefill-0')!.registration.pid).toBe(child.pid);
      child.kill('SIGKILL');
      await vi.waitFor(() => expect(names(watcher)).toEqual([]), GONE);
      expect(removed).toEqual(['remote-prefill-0']);
    } finally {
      child.kill('SIGKILL');
    }
  });

  it('a value in the namespace that is not a registration is ignored with a warning', async () => {
    const ns = freshNamespace();
    const a = await host(ns);
    const warnings: string[] = [];
    const onWarning = (w: Error) => warnings.push(w.message);
    process.on('warning', onWarning);
    const raw = new Etcd3({ hosts: etcd.endpoint });
    try {
      await raw.put(`/tandem/${ns}/workers/broken`).value('{"name":"broken","role":"cook"}');
      await raw.put(`/tandem/${ns}/workers/junk`).value('not json');
      await a.register(workerRegistration('fine'));
      await vi.waitFor(() => expect(warnings).toHaveLength(2), SEEN);
      expect(names(a)).toEqual(['fine']);
      expect(warnings.join('\n')).toMatch(/workers\/broken: role/);
      expect(warnings.join('\n')).toMatch(/workers\/junk: not JSON/);
    } finally {
      process.off('warning', onWarning);
      raw.close();
    }
  });
});

describe.skipIf(binary.missing !== undefined)('EtcdControlPlane when etcd restarts', () => {
  let etcd: EtcdServer;
  const planes: EtcdControlPlane[] = [];
  beforeAll(async () => {
    etcd = await EtcdServer.start(binary.path!);
  });
  afterAll(async () => {
    await Promise.all(planes.splice(0).map((p) => p.close()));
    await etcd?.stop();
  });

  async function twoHosts(ns: string) {
    const options = { endpoints: etcd.endpoint, namespace: ns, leaseTtlSeconds: TTL_S, connectTimeoutMs: 2_000 };
    const a = await EtcdControlPlane.connect(options);
    const b = await EtcdControlPlane.connect(options);
    planes.push(a, b);
    return { a, b };
  }
  const names = (plane: EtcdControlPlane) =>
    plane
      .workers()
      .map((w) => w.registration.name)
      .sort();
  const RECOVER = { timeout: 30_000, interval: 100 };

  it('after a crash and restart with its data, the workers are still there and new ones are seen', async () => {
    const { a, b } = await twoHosts(freshNamespace());
    await a.register(workerRegistration('a-0'));
    await b.register(workerRegistration('b-0', 'prefill'));
    await vi.waitFor(() => expect(names(a)).toEqual(['a-0', 'b-0']), SEEN);
    await etcd.restart();
    // each host's lease keeps its worker; a registration after the restart reaches the other host's watch
    await a.register(workerRegistration('a-1'));
    await vi.waitFor(() => expect(names(b)).toEqual(['a-0', 'a-1', 'b-0']), RECOVER);
    await vi.waitFor(() => expect(names(a)).toEqual(['a-0', 'a-1', 'b-0']), RECOVER);
  });

  it('a registration while etcd is down rejects with the typed error, and lands once etcd is back', async () => {
    const { a, b } = await twoHosts(freshNamespace());
    await etcd.kill();
    const error = await a.register(workerRegistration('late')).then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(error).toBeInstanceOf(ControlPlaneUnavailableError);
    expect((error as Error).message).toMatch(/did not take the registration of 'late'.*still retrying/);
    // removing a worker while etcd is away neither throws nor hangs
    await a.remove('nobody', 'gone');
    await etcd.restart();
    await vi.waitFor(() => expect(names(b)).toEqual(['late']), RECOVER);
    await vi.waitFor(() => expect(names(a)).toEqual(['late']), RECOVER);
  });

  it('after a restart with an empty store, workers register again and watchers see them', async () => {
    const ns = freshNamespace();
    const { a, b } = await twoHosts(ns);
    await a.register(workerRegistration('a-0'));
    await b.register(workerRegistration('b-0', 'prefill'));
    await vi.waitFor(() => expect(names(a)).toEqual(['a-0', 'b-0']), SEEN);
    await etcd.restart({ fresh: true });
    // nothing of the old store is left: what etcd holds now was put again by the two hosts
    const raw = new Etcd3({ hosts: etcd.endpoint });
    try {
      await vi.waitFor(
        async () =>
          expect((await raw.getAll().prefix(`/tandem/${ns}/workers/`).keys()).sort()).toEqual([
            `/tandem/${ns}/workers/a-0`,
            `/tandem/${ns}/workers/b-0`,
          ]),
        RECOVER,
      );
    } finally {
      raw.close();
    }
    await vi.waitFor(() => expect(names(a)).toEqual(['a-0', 'b-0']), RECOVER);
    await vi.waitFor(() => expect(names(b)).toEqual(['a-0', 'b-0']), RECOVER);
    // and the watches work again: a new worker and a removal travel between the hosts
    await b.register(workerRegistration('b-1', 'prefill'));
    await vi.waitFor(() => expect(names(a)).toEqual(['a-0', 'b-0', 'b-1']), RECOVER);
    await a.remove('a-0', 'gone');
    await vi.waitFor(() => expect(names(b)).toEqual(['b-0', 'b-1']), RECOVER);
  });
});

describe('EtcdControlPlane without etcd', () => {
  it('an endpoint where nothing listens: a typed error naming it, after a bounded wait', async () => {
    const port = await freeLoopbackPort();
    const error = await EtcdControlPlane.connect({
      endpoints: `etcd://127.0.0.1:${port}`,
      connectTimeoutMs: 1_000,
    }).then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(error).toBeInstanceOf(ControlPlaneUnavailableError);
    expect((error as ControlPlaneUnavailableError).code).toBe('TANDEM_CONTROL_PLANE_UNAVAILABLE');
    expect((error as Error).message).toContain(`http://127.0.0.1:${port}`);
    expect((error as ControlPlaneUnavailableError).endpoints).toEqual([`http://127.0.0.1:${port}`]);
  });

  it('an endpoint that accepts and never answers: the same error once the connect timeout passes', async () => {
    const sockets: Socket[] = [];
    const silent: Server = createServer((s) => sockets.push(s));
    await new Promise<void>((resolve) => silent.listen(0, '127.0.0.1', resolve));
    const port = (silent.address() as { port: number }).port;
    try {
      const error = await EtcdControlPlane.connect({ endpoints: `127.0.0.1:${port}`, connectTimeoutMs: 1_000 }).then(
        () => undefined,
        (e: unknown) => e,
      );
      expect(error).toBeInstanceOf(ControlPlaneUnavailableError);
      expect((error as Error).message).toContain(`http://127.0.0.1:${port}`);
    } finally {
      for (const s of sockets) s.destroy();
      silent.close();
    }
  });

  it('without the optional etcd3 package: a typed error that says to install it', () => {
    const r = runTs('test/control/connect-without-etcd3.ts');
    expect(r.status, r.stderr).toBe(0);
    const error = JSON.parse(r.stdout.trim()) as { name: string; code: string; message: string };
    expect(error.name).toBe('BackendUnavailableError');
    expect(error.code).toBe('TANDEM_BACKEND_UNAVAILABLE');
    expect(error.message).toMatch(/the etcd3 package does not load .*npm install etcd3/);
  });

  it('endpoints and options are checked before anything connects', async () => {
    expect(parseEtcdEndpoints('etcd://10.0.0.1:2379,10.0.0.2:2379')).toEqual([
      'http://10.0.0.1:2379',
      'http://10.0.0.2:2379',
    ]);
    expect(parseEtcdEndpoints(['localhost:2379', 'https://etcd.svc:2379'])).toEqual([
      'http://localhost:2379',
      'https://etcd.svc:2379',
    ]);
    for (const bad of ['', 'etcd://nohost', 'ftp://h:1', 'h:99999'])
      expect(() => parseEtcdEndpoints(bad), bad).toThrow(BadArgumentError);
    await expect(EtcdControlPlane.connect({ endpoints: '127.0.0.1:2379', namespace: 'Bad_NS' })).rejects.toThrow(
      /namespace 'Bad_NS': must be a DNS label/,
    );
    await expect(EtcdControlPlane.connect({ endpoints: '127.0.0.1:2379', leaseTtlSeconds: 0.5 })).rejects.toThrow(
      BadArgumentError,
    );
  });
});
