import { randomUUID } from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { defaultGraph } from '../../lib/deploy/graph.js';
import { RESTART_BACKOFF_RESET_MS, startDeployment, type Deployment } from '../../lib/deploy/launcher.js';
import { metric } from '../helpers/serve.js';

// The launcher's supervision of its workers, on CPU: process titles, restarts with a backoff that starts over
// once a worker has been healthy (read off the launcher's log, on a clock the test moves), the restart counter,
// and each worker's KV gauges, which come and go with the worker.
const KV_BLOCKS = 64;
const WAIT = { timeout: 20_000, interval: 20 };

describe('worker supervision (CPU)', () => {
  let d: Deployment;
  const lines: string[] = [];
  let clock = 1_000_000;

  beforeAll(async () => {
    const g = defaultGraph({ gpus: 0, mode: 'disagg', port: 0 });
    for (const p of g.pools) p.engine = { ...p.engine, numBlocks: KV_BLOCKS, threads: 1 };
    d = await startDeployment(g, { log: (l) => lines.push(l), heartbeatMs: 200, now: () => clock });
  }, 120_000);

  afterAll(async () => {
    await d?.stop({ drainMs: 500 });
  });

  it.runIf(existsSync('/proc/self/cmdline'))('worker processes are titled with their pool and index', () => {
    const pids = d.pids();
    expect(Object.keys(pids).sort()).toEqual(['decode-0', 'prefill-0']);
    for (const [name, pid] of Object.entries(pids)) {
      expect(readFileSync(`/proc/${pid}/cmdline`, 'latin1').split('\0')[0]).toBe(`tandem ${name}`);
      expect(readFileSync(`/proc/${pid}/comm`, 'utf8').trim()).toBe(`tandem ${name}`.slice(0, 15));
    }
  });

  it('KV blocks used and total, per worker, from heartbeats', async () => {
    const used = 'tandem_worker_kv_blocks_used{worker="decode-0",pool="decode"}';
    const total = 'tandem_worker_kv_blocks_total{worker="decode-0",pool="decode"}';
    const ratio = 'tandem_worker_kv_usage_ratio{worker="decode-0",pool="decode"}';
    expect(await metric(d, total)).toBe(KV_BLOCKS);
    expect(await metric(d, 'tandem_worker_kv_blocks_total{worker="prefill-0",pool="prefill"}')).toBe(KV_BLOCKS);
    // A request in flight holds blocks of the decode worker; its next heartbeat says so.
    const controller = new AbortController();
    const stream = d.backend.generate({
      requestId: randomUUID(),
      promptIds: Array.from({ length: 100 }, (_, i) => i),
      sampling: { temperature: 0, maxTokens: 100_000 },
      signal: controller.signal,
    });
    const consume = (async () => {
      for await (const _ of stream);
    })();
    try {
      await vi.waitFor(async () => expect(await metric(d, used)).toBeGreaterThanOrEqual(7), WAIT);
      const [u, r] = [await metric(d, used), await metric(d, ratio)];
      expect(r).toBeGreaterThan(0);
      expect(r).toBeLessThanOrEqual(1);
      expect(r * KV_BLOCKS).toBeGreaterThanOrEqual(u - 2); // sampled one scrape apart, the request growing
    } finally {
      controller.abort();
      await consume.catch(() => undefined);
    }
    await vi.waitFor(async () => expect(await metric(d, used)).toBe(0), WAIT);
  });

  it('the restart delay doubles, starts over once a worker has been healthy, and restarts are counted', async () => {
    const restarts = () => lines.filter((l) => l.startsWith('[launcher] restarting decode-0'));
    const crash = async (signal: NodeJS.Signals, expected: string) => {
      const seen = restarts().length;
      const pid = d.pids()['decode-0'];
      d.kill('decode-0', signal);
      await vi.waitFor(() => expect(restarts().length).toBe(seen + 1), WAIT);
      expect(restarts().at(-1)).toBe(`[launcher] restarting decode-0 in ${expected}`);
      // Gone from the control plane, gone from /metrics (until it registers again, after the delay at least).
      expect(await metric(d, 'tandem_worker_kv_blocks_total{worker="decode-0",pool="decode"}')).toBeNaN();
      await vi.waitFor(() => expect(d.pids()['decode-0']).not.toBe(pid), WAIT);
      await d.waitReady('decode-0', 60_000);
    };
    await crash('SIGKILL', '500 ms (restart 1)');
    await crash('SIGTERM', '1000 ms (restart 2)'); // the clock has not moved: not healthy yet
    clock += RESTART_BACKOFF_RESET_MS;
    await crash('SIGKILL', '500 ms (restart 1)');
    expect(lines).toContain('[launcher] decode-0 had been up 60 s: restart backoff reset');

    expect(await metric(d, 'tandem_worker_restarts_total{pool="decode",reason="SIGKILL"}')).toBe(2);
    // Its SIGTERM handler exits with code 0; the launcher had not asked it to stop.
    expect(await metric(d, 'tandem_worker_restarts_total{pool="decode",reason="exit_0"}')).toBe(1);
    expect(await metric(d, 'tandem_worker_restarts_total{pool="prefill"')).toBeNaN();
    // The restarted worker serves, and its KV series is back.
    await vi.waitFor(() => expect(d.controlPlane.get('decode-0')).toBeDefined(), WAIT);
    const r = await fetch(`${d.frontend.url}/v1/completions`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ model: 'dummy:tiny', prompt: 'abc', max_tokens: 3, temperature: 0 }),
    });
    expect(r.status).toBe(200);
    expect(await metric(d, 'tandem_worker_kv_blocks_total{worker="decode-0",pool="decode"}')).toBe(KV_BLOCKS);
  }, 120_000);
});
