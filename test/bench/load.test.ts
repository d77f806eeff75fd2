import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { LoadProcess, runLoad, timeRequest, type LoadRequest, type LoadTarget } from '../../lib/bench/load.js';

// The load generator against a scripted SSE server on loopback: what it records for streams that complete,
// and the error it records for every way a request can fail. Nothing here depends on how fast the machine is.

let server: Server;
let url: string;
let inFlight = 0;
let maxInFlight = 0;

const chunk = (res: ServerResponse, data: unknown) => res.write(`data: ${JSON.stringify(data)}\n\n`);
const tick = () => new Promise((r) => setTimeout(r, 2));

async function handle(req: IncomingMessage, res: ServerResponse) {
  let raw = '';
  for await (const part of req) raw += part;
  const body = JSON.parse(raw) as { prompt?: string; messages?: { content: string }[]; max_tokens: number };
  const script = body.prompt ?? body.messages![0]!.content;
  const chat = body.messages !== undefined;
  const text = (t: string) => (chat ? { choices: [{ delta: { content: t } }] } : { choices: [{ text: t }] });
  if (script === 'refuse') {
    res.writeHead(400, { 'content-type': 'application/json' });
    res.end(JSON.stringify({ error: { message: 'max_tokens is too large', type: 'invalid_request_error' } }));
    return;
  }
  if (script === 'silent') return; // never answers: the request times out or is stopped
  res.writeHead(200, { 'content-type': 'text/event-stream' });
  if (chat) chunk(res, { choices: [{ delta: { role: 'assistant', content: '' } }] });
  const tokens = script === 'midway' || script === 'cut' || script === 'nodone' ? 2 : body.max_tokens;
  for (let i = 0; i < tokens; i++) {
    await tick();
    chunk(res, text(`t${i}`));
    if (i === 1 && script === 'empty') chunk(res, text('')); // a chunk that carries no text is no token
  }
  if (script === 'midway') chunk(res, { error: { message: 'worker died' } });
  if (script === 'cut') return void res.destroy();
  if (script !== 'nodone') {
    chunk(res, {
      choices: [],
      usage: { prompt_tokens: 33, completion_tokens: script === 'nousage' ? undefined : tokens },
    });
    res.write('data: [DONE]\n\n');
  }
  res.end();
}

beforeAll(async () => {
  server = createServer((req, res) => {
    inFlight++;
    maxInFlight = Math.max(maxInFlight, inFlight);
    res.on('close', () => inFlight--);
    void handle(req, res);
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  url = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
});
afterAll(async () => {
  server.closeAllConnections();
  await new Promise((resolve) => server.close(resolve));
});

const completions = (): LoadTarget => ({ endpointUrl: `${url}/v1/completions`, api: 'completions' });
const request = (index: number, prompt: string, maxTokens = 5, atMs?: number): LoadRequest => ({
  index,
  body: JSON.stringify({ model: 'm', prompt, max_tokens: maxTokens, stream: true }),
  ...(atMs !== undefined ? { atMs } : {}),
});
const clock = () => performance.now();

describe('timing one streamed request', () => {
  it('a completed stream: TTFT, one gap per further chunk with text, the usage counts', async () => {
    const t = await timeRequest(completions(), request(4, 'ok', 5), null, clock, 10_000);
    expect(t).toMatchObject({
      index: 4,
      error: null,
      outputTokens: 5,
      usage: true,
      promptTokens: 33,
      scheduledMs: null,
    });
    expect(t.ttftMs).toBeGreaterThan(0);
    expect(t.itlMs).toHaveLength(4);
    expect(t.e2eMs).toBeGreaterThanOrEqual(t.ttftMs! + t.itlMs.reduce((a, b) => a + b, 0) - 1e-6);
  });

  it('chat: the role chunk and chunks without text are not tokens', async () => {
    const target: LoadTarget = { endpointUrl: `${url}/v1/chat/completions`, api: 'chat' };
    const body = JSON.stringify({ model: 'm', messages: [{ role: 'user', content: 'empty' }], max_tokens: 4 });
    const t = await timeRequest(target, { index: 0, body }, 0, clock, 10_000);
    expect(t).toMatchObject({ error: null, outputTokens: 4 });
    expect(t.itlMs).toHaveLength(3);
  });

  it('without usage, output tokens are the chunks that carried text', async () => {
    const t = await timeRequest(completions(), request(0, 'nousage', 3), null, clock, 10_000);
    expect(t).toMatchObject({ error: null, outputTokens: 3, usage: false });
  });

  it('failures are recorded with what went wrong, never thrown', async () => {
    const fail = async (prompt: string, timeoutMs = 10_000) =>
      (await timeRequest(completions(), request(0, prompt), null, clock, timeoutMs)).error;
    expect(await fail('refuse')).toBe('HTTP 400: max_tokens is too large');
    expect(await fail('midway')).toBe('worker died');
    expect(await fail('nodone')).toBe('the stream ended without [DONE]');
    expect(await fail('cut')).toMatch(/terminated|socket|closed|aborted/i);
    expect(await fail('silent', 200)).toBe('timed out after 200 ms');
    // A port nothing listens on.
    const closed = createServer();
    await new Promise<void>((resolve) => closed.listen(0, '127.0.0.1', resolve));
    const port = (closed.address() as AddressInfo).port;
    await new Promise((resolve) => closed.close(resolve));
    const refused = await timeRequest(
      { endpointUrl: `http://127.0.0.1:${port}/v1/completions`, api: 'completions' },
      request(0, 'ok'),
      null,
      clock,
      5000,
    );
    expect(refused.error).toMatch(/ECONNREFUSED/);
  });
});

describe('runs', () => {
  it('open loop: sent in schedule order, never early; timings come back in request order', async () => {
    const ats = [0, 40, 10, 30, 20, 50];
    const timings = await runLoad(
      completions(),
      ats.map((at, i) => request(i, 'ok', 2, at)),
      { timeoutMs: 10_000 },
    );
    expect(timings.map((t) => t.index)).toEqual([0, 1, 2, 3, 4, 5]);
    expect(timings.map((t) => t.scheduledMs)).toEqual(ats);
    for (const t of timings) expect(t.sentMs).toBeGreaterThanOrEqual(t.scheduledMs!);
    const bySend = [...timings].sort((a, b) => a.sentMs - b.sentMs).map((t) => t.scheduledMs);
    expect(bySend).toEqual([...ats].sort((a, b) => a - b));
    expect(timings.every((t) => t.error === null)).toBe(true);
  });

  it('closed loop: never more requests in flight than the concurrency; progress reported to the end', async () => {
    maxInFlight = 0;
    const seen: number[] = [];
    const timings = await runLoad(
      completions(),
      Array.from({ length: 6 }, (_, i) => request(i, 'ok', 3)),
      { concurrency: 2, timeoutMs: 10_000, onProgress: (p) => seen.push(p.done), progressMs: 5 },
    );
    expect(timings).toHaveLength(6);
    expect(timings.every((t) => t.error === null && t.scheduledMs === null)).toBe(true);
    expect(maxInFlight).toBeLessThanOrEqual(2);
    expect(seen.at(-1)).toBe(6);
  });

  it('in its own process: the same timings; a stopped run records what was in flight as aborted', async () => {
    const load = new LoadProcess();
    try {
      const timings = await load.run(completions(), [request(0, 'ok', 3), request(1, 'refuse')], {
        concurrency: 1,
        timeoutMs: 10_000,
      });
      expect(timings.map((t) => [t.outputTokens, t.error])).toEqual([
        [3, null],
        [0, 'HTTP 400: max_tokens is too large'],
      ]);
      const stopped = load.run(completions(), [request(0, 'silent'), request(1, 'ok', 2, 60_000)], {
        timeoutMs: 60_000,
        onProgress: (p) => {
          if (p.inFlight === 1) load.stop();
        },
      });
      const t = await stopped;
      expect(t.map((x) => [x.index, x.error])).toEqual([[0, 'aborted: the run was stopped']]);
    } finally {
      await load.dispose();
    }
    await expect(load.run(completions(), [], { timeoutMs: 1 })).rejects.toThrow(/exited/);
  });
});
