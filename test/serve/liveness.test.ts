import OpenAI from 'openai';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { defaultGraph, type DeploymentGraph } from '../../lib/deploy/graph.js';
import { startDeployment, type Deployment } from '../../lib/deploy/launcher.js';
import { METRIC_NAMES } from '../../lib/frontend/metrics.js';
import { busyWorker, killBusyWorker, metric, streamCompletion, waitIdle } from '../helpers/serve.js';

// Liveness under CPU starvation, on CPU workers with the official openai client (loopback): a worker whose process
// is frozen (SIGSTOP: no heartbeat, as under a starved event loop) for longer than the old 3 s window becomes
// suspect: new requests go to the other worker, its own request in flight is neither failed nor migrated, and
// completes with the text of an undisturbed run once it runs again (SIGCONT). A SIGKILLed worker is still dropped
// at once (its process exited) and its request migrates. Every wait is bounded; the deployment stops at the end.
const MODEL = 'dummy:tiny';
const MAX_TOKENS = 2000;
const WAIT = { timeout: 20_000, interval: 10 };
/** The suspect window of heartbeatMs 50 (5 heartbeats, at least 3 s): the old drop window. */
const SUSPECT_WINDOW_MS = 3000;

function graph(): DeploymentGraph {
  const g = defaultGraph({ gpus: 0, mode: 'agg', port: 0 });
  g.frontend.migrationLimit = 1;
  g.pools[0]!.replicas = 2;
  for (const p of g.pools) p.engine = { ...p.engine, numBlocks: 512, threads: 1 };
  return g;
}

const PROMPT = 'A slow worker is not a dead worker';
const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

describe('worker liveness: suspect on silence, dropped on a certain signal', () => {
  let d: Deployment;
  let client: OpenAI;
  const lines: string[] = [];
  const migrated = () => metric(d, `${METRIC_NAMES.requestMigrations}{outcome="migrated"}`);
  const stream = (onFirstChunk?: () => Promise<void>) =>
    streamCompletion(client, { model: MODEL, prompt: PROMPT, max_tokens: MAX_TOKENS, temperature: 0 }, onFirstChunk);

  beforeAll(async () => {
    d = await startDeployment(graph(), { log: (l) => lines.push(l), heartbeatMs: 50 });
    client = new OpenAI({ baseURL: `${d.frontend.url}/v1`, apiKey: 'none', maxRetries: 0, timeout: 60_000 });
  }, 120_000);

  afterAll(async () => {
    await d?.stop({ drainMs: 500 });
  });

  it('a frozen worker past the old window is suspect, keeps its request, which completes unchanged', async () => {
    const undisturbed = await stream();
    expect(undisturbed.finishReason).toBe('length');
    await waitIdle(d, WAIT);
    const before = await migrated();
    let frozen = '';
    let pid = 0;
    const out = await stream(async () => {
      frozen = await busyWorker(d, WAIT);
      pid = d.pids()[frozen]!;
      process.kill(pid, 'SIGSTOP');
      try {
        await vi.waitFor(() => expect(d.controlPlane.get(frozen)?.suspect).toBe(true), WAIT);
        // Past the old window (a worker silent that long was dropped and its requests failed): still registered.
        await sleep(SUSPECT_WINDOW_MS);
        expect(d.controlPlane.get(frozen)?.registration.pid).toBe(pid);
        // A new request goes to the other worker (the frozen one could not answer it).
        const other = await client.completions.create({ model: MODEL, prompt: 'hello', max_tokens: 4 });
        expect(other.choices[0]!.finish_reason).toBeDefined();
      } finally {
        process.kill(pid, 'SIGCONT');
      }
    });
    expect(out.error).toBeUndefined();
    expect(out.text).toBe(undisturbed.text);
    expect(out.completionTokens).toBe(undisturbed.completionTokens);
    expect(await migrated()).toBe(before);
    await vi.waitFor(() => expect(d.controlPlane.get(frozen)?.suspect).toBe(false), WAIT);
    expect(lines.some((l) => l.includes(`${frozen} is suspect`))).toBe(true);
    expect(lines.some((l) => l.includes(`${frozen} dropped`))).toBe(false);
  }, 60_000);

  it('a SIGKILLed worker is dropped at once (its process exited) and its request migrates', async () => {
    await Promise.all(Object.keys(d.pids()).map((name) => d.waitReady(name)));
    const undisturbed = await stream();
    await waitIdle(d, WAIT);
    const before = await migrated();
    let killed = '';
    const out = await stream(async () => {
      killed = await killBusyWorker(d, WAIT);
    });
    expect(out.error).toBeUndefined();
    expect(out.text).toBe(undisturbed.text);
    expect(await migrated()).toBe(before + 1);
    expect(lines.some((l) => l.includes(`${killed} dropped: process exited`))).toBe(true);
  }, 60_000);
});

describe('EmbeddedControlPlane: suspect, then dropped', () => {
  it('a silent worker is suspect, a heartbeat clears it, a longer silence drops it; routers prefer the others', async () => {
    const { EmbeddedControlPlane, preferResponsive } = await import('../../lib/control/control-plane.js');
    const plane = new EmbeddedControlPlane(150, 1500);
    const events: string[] = [];
    plane.on('suspect', (name, suspect) => events.push(`${name} ${suspect ? 'suspect' : 'back'}`));
    plane.on('removed', (name, reason) => events.push(`${name} removed: ${reason}`));
    try {
      const reg = (name: string) => ({ name, role: 'decode', numBlocks: 8 }) as Parameters<typeof plane.register>[0];
      plane.register(reg('a'));
      plane.register(reg('b'));
      const load = { running: 1, waiting: 0, freeBlocks: 8, prefilling: 0 };
      // b keeps answering; a goes silent.
      const beat = setInterval(() => plane.heartbeat('b', load), 20);
      try {
        await vi.waitFor(() => expect(plane.get('a')?.suspect).toBe(true), WAIT);
        expect(preferResponsive(plane.workers('decode')).map((w) => w.registration.name)).toEqual(['b']);
        plane.heartbeat('a', load);
        expect(plane.get('a')?.suspect).toBe(false);
        expect(preferResponsive(plane.workers('decode')).map((w) => w.registration.name)).toEqual(['a', 'b']);
        await vi.waitFor(() => expect(plane.get('a')).toBeUndefined(), WAIT);
      } finally {
        clearInterval(beat);
      }
      expect(events).toEqual(['a suspect', 'a back', 'a suspect', 'a removed: no heartbeat for 1500 ms']);
      // Every one suspect: they are still chosen among (a slow worker beats none).
      await vi.waitFor(() => expect(plane.get('b')?.suspect).toBe(true), WAIT);
      expect(preferResponsive(plane.workers('decode')).map((w) => w.registration.name)).toEqual(['b']);
      expect(() => new EmbeddedControlPlane(1000, 500)).toThrow(RangeError);
    } finally {
      plane.close();
    }
  });
});
