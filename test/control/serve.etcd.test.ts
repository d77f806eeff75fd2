/**
 * `tandem serve --control etcd://...`: the single-host launcher with etcd as its control plane (a real etcd,
 * test/helpers/etcd.ts). Its workers are registered in etcd under leases; a crashed worker leaves and comes
 * back; stopping the deployment takes them out. Loopback only; every wait is bounded.
 */
import OpenAI from 'openai';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { EtcdControlPlane } from '../../lib/control/index.js';
import { defaultGraph } from '../../lib/deploy/graph.js';
import { startDeployment, type Deployment } from '../../lib/deploy/launcher.js';
import { EtcdServer, etcdBinary } from '../helpers/etcd.js';
import { prefillCounts } from '../helpers/serve.js';

const binary = etcdBinary();
if (binary.missing) console.log(`skipping the launcher-on-etcd tests: ${binary.missing}`);

const WAIT = { timeout: 30_000, interval: 20 };
const NAMESPACE = `serve${process.pid}`;

describe.skipIf(binary.missing !== undefined)('the launcher with etcd as its control plane', () => {
  let etcd: EtcdServer;
  let d: Deployment;
  let observer: EtcdControlPlane;

  beforeAll(async () => {
    etcd = await EtcdServer.start(binary.path!);
    const g = defaultGraph({ gpus: 0, mode: 'disagg', port: 0 });
    g.disaggregation = { ...g.disaggregation, minRemotePrefillTokens: 1 };
    for (const p of g.pools) p.engine = { ...p.engine, numBlocks: 256, threads: 1 };
    d = await startDeployment(g, {
      log: () => {},
      heartbeatMs: 100,
      control: { endpoints: etcd.endpoint, namespace: NAMESPACE, leaseTtlSeconds: 2 },
    });
    observer = await EtcdControlPlane.connect({ endpoints: etcd.endpoint, namespace: NAMESPACE });
  }, 120_000);

  afterAll(async () => {
    await d?.stop({ drainMs: 500 });
    await observer?.close();
    await etcd?.stop();
  });

  it('registers its workers in etcd and serves through them, prefill remote', async () => {
    const pids = d.pids();
    expect(Object.keys(pids).sort()).toEqual(['decode-0', 'prefill-0']);
    for (const [name, pid] of Object.entries(pids)) expect(observer.get(name)?.registration.pid).toBe(pid);
    const before = await prefillCounts(d);
    const client = new OpenAI({ baseURL: `${d.frontend.url}/v1`, apiKey: 'none', maxRetries: 0, timeout: 30_000 });
    const r = await client.completions.create({ model: 'dummy:tiny', prompt: 'etcd keeps the list', max_tokens: 6 });
    expect(r.usage!.completion_tokens).toBe(6);
    expect((await prefillCounts(d)).remote).toBe((before.remote || 0) + 1);
  });

  it('a crashed worker leaves etcd and registers again once restarted', async () => {
    const pid = d.pids()['decode-0']!;
    const seen: string[] = [];
    observer.on('removed', (name) => seen.push(`removed ${name}`));
    observer.on('added', (w) => seen.push(`added ${w.registration.name}`));
    process.kill(pid, 'SIGKILL');
    await vi.waitFor(() => expect(seen).toEqual(['removed decode-0', 'added decode-0']), WAIT);
    expect(observer.get('decode-0')!.registration.pid).toBe(d.pids()['decode-0']);
    expect(observer.get('decode-0')!.registration.pid).not.toBe(pid);
  });

  it('stopping the deployment takes its workers out of etcd', async () => {
    await d.stop({ drainMs: 500 });
    await vi.waitFor(() => expect(observer.workers()).toEqual([]), WAIT);
  });
});
