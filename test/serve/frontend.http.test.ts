import { connect } from 'node:net';
import OpenAI, { AuthenticationError } from 'openai';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { byteTextTokenizer } from '../../lib/engine/tokenizer.js';
import { startFrontend, type FrontendOptions, type RunningFrontend } from '../../lib/frontend/index.js';
import { METRIC_NAMES } from '../../lib/frontend/metrics.js';
import { FakeBackend } from '../helpers/fake-backend.js';

// The HTTP side of the frontend: content types, the API key, body limits, clients that go away, and the drain
// on close. Every server here listens on loopback and is closed by its test.
const MODEL = 'dummy:tiny';
const tokenizer = byteTextTokenizer();
const completionBody = JSON.stringify({ model: MODEL, prompt: 'Hi', max_tokens: 3 });

function start(backend: FakeBackend, logged: string[], options: Partial<FrontendOptions> = {}) {
  return startFrontend({
    backend,
    tokenizer,
    modelName: MODEL,
    contextLength: 256,
    vocabSize: 258,
    port: 0,
    log: (line) => logged.push(line),
    ...options,
  });
}

async function call(url: string, init?: RequestInit) {
  const res = await fetch(url, init);
  const text = await res.text();
  let json: { error?: { message: string; type: string; param: string | null; code: string | null } } | undefined;
  try {
    json = JSON.parse(text);
  } catch {
    json = undefined;
  }
  return { status: res.status, headers: res.headers, text, json };
}

/** The sample of the request counter with these labels (0 when absent). */
async function requestCount(frontend: RunningFrontend, labels: string): Promise<number> {
  const text = await frontend.metrics.text();
  const line = text.split('\n').find((l) => l.startsWith(`${METRIC_NAMES.requests}{${labels}}`));
  return line ? Number(line.split(' ').pop()) : 0;
}

/** Polls `condition` (bounded) until true. */
async function until(condition: () => boolean | Promise<boolean>, what: string): Promise<void> {
  for (let i = 0; i < 500; i++) {
    if (await condition()) return;
    await new Promise((r) => setTimeout(r, 10));
  }
  throw new Error(`timed out waiting for ${what}`);
}

describe('content type, body size, token ids', () => {
  const backend = new FakeBackend();
  const logged: string[] = [];
  let frontend: RunningFrontend;
  beforeAll(async () => {
    frontend = await start(backend, logged, { maxBodyBytes: 4096 });
  });
  afterAll(() => frontend?.close({ drainMs: 100 }));
  beforeEach(() => backend.reset());

  const post = (body: RequestInit['body'], contentType?: string, path = '/v1/completions') =>
    call(`${frontend.url}${path}`, {
      method: 'POST',
      body,
      headers: contentType === undefined ? {} : { 'content-type': contentType },
    });

  it('a body that is not application/json: 415 with an OpenAI error body; JSON with a UTF-8 charset is fine', async () => {
    for (const type of [
      'text/plain',
      'application/x-www-form-urlencoded',
      'application/json-patch+json',
      'application/json; charset=latin1',
      'not a media type',
    ]) {
      const r = await post(completionBody, type);
      expect(r.status, type).toBe(415);
      expect(r.json?.error).toMatchObject({ type: 'invalid_request_error', code: 'unsupported_media_type' });
      expect(r.json?.error?.message).toMatch(/application\/json/);
    }
    // No Content-Type at all (a Blob without a type sends none): refused too, as vLLM does.
    const missing = await post(new Blob([completionBody]));
    expect(missing.status).toBe(415);
    expect(missing.json?.error?.message).toMatch(/Content-Type missing/);
    // The curl: a token-id prompt sent as text/plain.
    expect((await post('{"model":"dummy:tiny","prompt":[258],"max_tokens":1}', 'text/plain')).status).toBe(415);
    for (const type of ['application/json', 'Application/JSON; charset=UTF-8', 'application/json;charset=utf-8']) {
      const r = await post(completionBody, type);
      expect(r.status, type).toBe(200);
    }
    expect(backend.requests).toHaveLength(3);
  });

  it('a token id outside the vocabulary: 400 naming prompt, nothing sent to the backend', async () => {
    const r = await post('{"model":"dummy:tiny","prompt":[258],"max_tokens":1}', 'application/json');
    expect(r.status).toBe(400);
    expect(r.json?.error).toMatchObject({ type: 'invalid_request_error', param: 'prompt', code: 'invalid_value' });
    expect(r.json?.error?.message).toMatch(/token id 258 .* out of the vocabulary/);
    expect(backend.requests).toHaveLength(3);
    const ok = await post('{"model":"dummy:tiny","prompt":[257],"max_tokens":1}', 'application/json');
    expect(ok.status).toBe(200);
  });

  it('a body that is not UTF-8 or not an object: 400', async () => {
    const bad = await post(new Uint8Array([0x7b, 0xff, 0xfe, 0x7d]), 'application/json');
    expect(bad.status).toBe(400);
    expect(bad.json?.error?.code).toBe('invalid_json');
    const list = await post('[1, 2]', 'application/json');
    expect(list.status).toBe(400);
    expect(list.json?.error?.message).toMatch(/JSON object/);
  });

  it('a body over maxBodyBytes: 413, with or without Content-Length; the connection stays usable', async () => {
    const big = JSON.stringify({ model: MODEL, prompt: 'x'.repeat(5000) });
    const sized = await post(big, 'application/json');
    expect(sized.status).toBe(413);
    expect(sized.json?.error).toMatchObject({ code: 'request_too_large' });
    // Chunked: the limit is found while reading.
    const chunks = new ReadableStream({
      start(c) {
        for (let i = 0; i < 64; i++) c.enqueue(new TextEncoder().encode('x'.repeat(1000)));
        c.close();
      },
    });
    const chunked = await call(`${frontend.url}/v1/completions`, {
      method: 'POST',
      body: chunks,
      headers: { 'content-type': 'application/json' },
      duplex: 'half',
    } as RequestInit);
    expect(chunked.status).toBe(413);
    expect((await post(completionBody, 'application/json')).status).toBe(200);
  });

  it('a client that disconnects mid-body is counted as canceled and not logged as an error', async () => {
    const labels = `model="unknown",endpoint="completions",stream="false",status="canceled"`;
    const before = await requestCount(frontend, labels);
    const socket = connect(frontend.port, '127.0.0.1');
    await new Promise((resolve) => socket.once('connect', resolve));
    // With Expect: 100-continue the server answers "100 Continue" as it hands the request to the frontend.
    socket.write(
      'POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n' +
        'Expect: 100-continue\r\n\r\n',
    );
    await new Promise((resolve) => socket.once('data', resolve));
    socket.write('{"model":');
    socket.destroy();
    await until(async () => (await requestCount(frontend, labels)) === before + 1, 'the canceled count');
    expect(logged).toEqual([]);
    expect(
      await requestCount(frontend, `model="unknown",endpoint="completions",stream="false",status="server_error"`),
    ).toBe(0);
  });
});

describe('API key', () => {
  const backend = new FakeBackend();
  const logged: string[] = [];
  const KEY = 'sk-tandem-test-key';
  let frontend: RunningFrontend;
  beforeAll(async () => {
    frontend = await start(backend, logged, { apiKey: KEY });
  });
  afterAll(() => frontend?.close({ drainMs: 100 }));

  it('every /v1 route needs Authorization: Bearer <key>: 401 invalid_api_key otherwise', async () => {
    for (const authorization of [
      undefined,
      KEY,
      `Bearer ${KEY}x`,
      `Bearer ${KEY.slice(0, -1)}`,
      'Bearer',
      'Basic abc',
    ]) {
      const headers: Record<string, string> = { 'content-type': 'application/json' };
      if (authorization) headers.authorization = authorization;
      for (const [method, path] of [
        ['GET', '/v1/models'],
        ['POST', '/v1/completions'],
        ['POST', '/v1/chat/completions'],
        ['GET', '/v1/no-such-route'],
      ] as const) {
        const r = await call(`${frontend.url}${path}`, {
          method,
          headers,
          ...(method === 'POST' ? { body: completionBody } : {}),
        });
        expect(r.status, `${authorization} ${path}`).toBe(401);
        expect(r.json?.error).toMatchObject({ type: 'invalid_request_error', code: 'invalid_api_key', param: null });
        expect(r.headers.get('www-authenticate')).toBe('Bearer');
      }
    }
    expect(backend.requests).toHaveLength(0);
    expect(
      await requestCount(frontend, `model="unknown",endpoint="completions",stream="false",status="client_error"`),
    ).toBeGreaterThan(0);
  });

  it('the right key is served; the openai client sends it', async () => {
    const client = new OpenAI({ baseURL: `${frontend.url}/v1`, apiKey: KEY, maxRetries: 0, timeout: 10_000 });
    const r = await client.completions.create({ model: MODEL, prompt: 'Hi', max_tokens: 5 });
    expect(r.choices[0]!.text).toBe(backend.reply.slice(0, 5));
    expect((await client.models.list()).data[0]!.id).toBe(MODEL);
    const lowercase = await call(`${frontend.url}/v1/models`, { headers: { authorization: `bearer ${KEY}` } });
    expect(lowercase.status).toBe(200);
    const wrong = new OpenAI({ baseURL: `${frontend.url}/v1`, apiKey: 'sk-wrong', maxRetries: 0, timeout: 10_000 });
    await expect(wrong.models.list()).rejects.toBeInstanceOf(AuthenticationError);
  });

  it('/health and /metrics stay open', async () => {
    expect((await call(`${frontend.url}/health`)).status).toBe(200);
    expect((await call(`${frontend.url}/metrics`)).status).toBe(200);
  });

  it('an empty key is refused at start', async () => {
    await expect(start(backend, logged, { apiKey: '' })).rejects.toThrow(/apiKey must be a non-empty string/);
  });
});

describe('drain on close', () => {
  it('draining: /health 503, new requests 503; streams still open at the end get an error event and [DONE]', async () => {
    const backend = new FakeBackend();
    const logged: string[] = [];
    const frontend = await start(backend, logged);
    backend.endless = true;
    backend.delayMs = 5;
    const streaming = await fetch(`${frontend.url}/v1/completions`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ model: MODEL, prompt: 'Hi', max_tokens: 200, stream: true }),
    });
    expect(streaming.status).toBe(200);
    const reader = streaming.body!.getReader();
    await reader.read(); // the stream is running
    const waiting = fetch(`${frontend.url}/v1/chat/completions`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ model: MODEL, messages: [{ role: 'user', content: 'Hi' }], max_tokens: 200 }),
    });
    await until(() => backend.requests.length === 2, 'both requests at the backend');

    const closed = frontend.close({ drainMs: 300 });
    const health = await call(`${frontend.url}/health`);
    expect(health.status).toBe(503);
    expect(health.json).toEqual({ status: 'draining', model: MODEL });
    const late = await call(`${frontend.url}/v1/completions`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: completionBody,
    });
    expect(late.status).toBe(503);
    expect(late.json?.error).toMatchObject({ type: 'service_unavailable_error', code: 'server_shutting_down' });
    expect(backend.requests).toHaveLength(2);

    // The drain period ends with both requests still running: each is answered, not reset.
    let text = '';
    const decoder = new TextDecoder();
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      text += decoder.decode(value, { stream: true });
    }
    const events = text.trim().split('\n\n');
    expect(events.at(-1)).toBe('data: [DONE]');
    expect(JSON.parse(events.at(-2)!.slice('data: '.length))).toEqual({
      error: {
        message: 'the server is shutting down',
        type: 'service_unavailable_error',
        param: null,
        code: 'server_shutting_down',
      },
    });
    const cut = await waiting;
    expect(cut.status).toBe(503);
    expect(((await cut.json()) as { error: { code: string } }).error.code).toBe('server_shutting_down');
    await closed;
    // The backend requests were aborted, and nothing was logged as a server failure.
    expect(backend.aborted).toEqual(expect.arrayContaining(backend.requests.map((r) => r.requestId)));
    expect(logged).toEqual([]);
    await expect(fetch(`${frontend.url}/health`)).rejects.toThrow();
  });

  it('requests that finish within the drain period are answered in full', async () => {
    const backend = new FakeBackend();
    const frontend = await start(backend, []);
    backend.delayMs = 5;
    const client = new OpenAI({ baseURL: `${frontend.url}/v1`, apiKey: 'none', maxRetries: 0, timeout: 10_000 });
    const pending = client.completions.create({ model: MODEL, prompt: 'Hi', max_tokens: 10 });
    await until(() => backend.requests.length === 1, 'the request at the backend');
    await frontend.close({ drainMs: 10_000 });
    const r = await pending;
    expect(r.choices[0]!.text).toBe(backend.reply.slice(0, 10));
    expect(r.choices[0]!.finish_reason).toBe('length');
  });
});
