import OpenAI, { APIError } from 'openai';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { byteTextTokenizer } from '../../lib/engine/tokenizer.js';
import { NoWorkerAvailableError } from '../../lib/frontend/backend.js';
import { startFrontend, type RunningFrontend } from '../../lib/frontend/index.js';
import { METRIC_NAMES } from '../../lib/frontend/metrics.js';
import { FakeBackend } from '../helpers/fake-backend.js';

const MODEL = 'dummy:tiny';
const CONTEXT = 256;
const EOS = 257;
const VOCAB = 258;
const tokenizer = byteTextTokenizer();

let backend: FakeBackend;
let frontend: RunningFrontend;
let client: OpenAI;
const logged: string[] = [];

beforeAll(async () => {
  backend = new FakeBackend();
  frontend = await startFrontend({
    backend,
    tokenizer,
    modelName: MODEL,
    contextLength: CONTEXT,
    vocabSize: VOCAB,
    port: 0,
    log: (line) => logged.push(line),
  });
  client = new OpenAI({ baseURL: `${frontend.url}/v1`, apiKey: 'unused', maxRetries: 0, timeout: 10_000 });
});
afterAll(async () => {
  await frontend?.close({ drainMs: 1000 });
});
beforeEach(() => backend.reset());

const messages = [{ role: 'user' as const, content: 'Hi' }];
const chatPromptTokens = tokenizer.encode(tokenizer.applyChatTemplate(messages), { addBos: false }).length;

async function raw(path: string, init?: RequestInit) {
  const res = await fetch(`${frontend.url}${path}`, init);
  return { status: res.status, body: await res.text(), type: res.headers.get('content-type') };
}
const post = (path: string, body: string) =>
  raw(path, { method: 'POST', body, headers: { 'content-type': 'application/json' } });

/** The APIError that `p` rejects with. */
async function apiError(p: Promise<unknown>): Promise<APIError> {
  try {
    await p;
  } catch (error) {
    expect(error).toBeInstanceOf(APIError);
    return error as APIError;
  }
  throw new Error('the request succeeded');
}

describe('frontend, through the openai client', () => {
  it('listens on loopback by default', () => {
    expect(frontend.host).toBe('127.0.0.1');
    expect(frontend.url).toMatch(/^http:\/\/127\.0\.0\.1:\d+$/);
  });

  it('chat, not streaming', async () => {
    const r = await client.chat.completions.create({ model: MODEL, messages, seed: 7, temperature: 0.5, top_p: 0.9 });
    expect(r.object).toBe('chat.completion');
    expect(r.id).toMatch(/^chatcmpl-/);
    expect(r.model).toBe(MODEL);
    expect(r.choices).toHaveLength(1);
    expect(r.choices[0]!.message).toMatchObject({ role: 'assistant', content: backend.reply });
    expect(r.choices[0]!.finish_reason).toBe('stop');
    expect(r.usage).toEqual({
      prompt_tokens: chatPromptTokens,
      completion_tokens: Buffer.byteLength(backend.reply) + 1, // + EOS
      total_tokens: chatPromptTokens + Buffer.byteLength(backend.reply) + 1,
      prompt_tokens_details: { cached_tokens: 0 },
    });
    // The backend got token ids of the templated prompt and the sampling parameters.
    const req = backend.requests.at(-1)!;
    expect(tokenizer.decode([...req.promptIds])).toBe(tokenizer.applyChatTemplate(messages));
    expect(req.sampling).toMatchObject({
      seed: 7,
      temperature: 0.5,
      topP: 0.9,
      maxTokens: CONTEXT - chatPromptTokens,
      stopTokenIds: [EOS],
    });
    expect(req.sampling.stop).toBeUndefined();
  });

  it('chat, streaming, with a final usage chunk', async () => {
    const stream = await client.chat.completions.create({
      model: MODEL,
      messages,
      stream: true,
      stream_options: { include_usage: true },
    });
    let text = '';
    const finishes: (string | null)[] = [];
    let usage;
    let chunks = 0;
    for await (const chunk of stream) {
      chunks++;
      expect(chunk.object).toBe('chat.completion.chunk');
      if (chunk.choices.length) {
        text += chunk.choices[0]!.delta.content ?? '';
        finishes.push(chunk.choices[0]!.finish_reason);
        expect(chunk.usage).toBeNull();
      } else usage = chunk.usage;
    }
    expect(text).toBe(backend.reply);
    expect(chunks).toBeGreaterThan(3);
    expect(finishes.at(-1)).toBe('stop');
    expect(finishes.slice(0, -1).every((f) => f === null)).toBe(true);
    expect(usage).toMatchObject({
      prompt_tokens: chatPromptTokens,
      completion_tokens: Buffer.byteLength(backend.reply) + 1,
    });
  });

  it('completions, streaming and not; max_tokens ends with length', async () => {
    const r = await client.completions.create({ model: MODEL, prompt: 'Once upon', max_tokens: 5 });
    expect(r.object).toBe('text_completion');
    expect(r.choices[0]!.text).toBe(backend.reply.slice(0, 5));
    expect(r.choices[0]!.finish_reason).toBe('length');
    expect(r.usage).toEqual({
      prompt_tokens: 10, // BOS + 9 bytes
      completion_tokens: 5,
      total_tokens: 15,
      prompt_tokens_details: { cached_tokens: 0 },
    });
    expect(backend.requests.at(-1)!.promptIds).toEqual(tokenizer.encode('Once upon'));

    const stream = await client.completions.create({
      model: MODEL,
      prompt: [256, 79, 110],
      stream: true,
      stream_options: { include_usage: true },
    });
    let text = '';
    let usage;
    let finish;
    for await (const chunk of stream) {
      if (chunk.choices.length) {
        text += chunk.choices[0]!.text;
        finish = chunk.choices[0]!.finish_reason ?? finish;
      } else usage = chunk.usage;
    }
    expect(text).toBe(backend.reply);
    expect(finish).toBe('stop');
    expect(usage).toMatchObject({ prompt_tokens: 3 });
    expect(backend.requests.at(-1)!.promptIds).toEqual([256, 79, 110]);
  });

  it('stop strings cut the text before them and stop the backend request', async () => {
    const r = await client.chat.completions.create({ model: MODEL, messages, stop: ['How', '!!'] });
    expect(r.choices[0]!.message.content).toBe('Hello there! ');
    expect(r.choices[0]!.finish_reason).toBe('stop');
    expect(backend.aborted).toContain(backend.requests.at(-1)!.requestId);

    // Streaming: no piece of a stop string ever reaches the client.
    backend.reply = 'abc STOP def';
    const stream = await client.completions.create({ model: MODEL, prompt: 'x', stop: 'STOP', stream: true });
    const pieces: string[] = [];
    for await (const chunk of stream) pieces.push(chunk.choices[0]?.text ?? '');
    expect(pieces.join('')).toBe('abc ');
    expect(pieces.some((p) => p.includes('S'))).toBe(false);

    // A stop string split over several tokens, at the very start.
    backend.reply = 'STOP now';
    const s = await client.completions.create({ model: MODEL, prompt: 'x', stop: 'STOP' });
    expect(s.choices[0]!.text).toBe('');
    expect(s.choices[0]!.finish_reason).toBe('stop');
  });

  it('min_tokens: a stop string ends the request only once min_tokens tokens precede its last token', async () => {
    // 'Hello there! How are you?': 'How' is completed by token 16.
    const withMin = (min_tokens: number) =>
      client.completions.create({ model: MODEL, prompt: 'x', stop: 'How', min_tokens } as never);
    const cut = await withMin(15);
    expect(cut.choices[0]).toMatchObject({ text: 'Hello there! ', finish_reason: 'stop' });
    const whole = await withMin(16);
    expect(whole.choices[0]!.text).toBe('Hello there! How are you?');
    expect(backend.requests.at(-1)!.sampling.minTokens).toBe(16);
  });

  it('chat logprobs and top_logprobs', async () => {
    backend.reply = 'ab';
    const r = await client.chat.completions.create({ model: MODEL, messages, logprobs: true, top_logprobs: 2 });
    expect(backend.requests.at(-1)!.sampling.logprobs).toBe(2);
    const content = r.choices[0]!.logprobs!.content!;
    expect(content.map((c) => c.token)).toEqual(['a', 'b', '']);
    expect(content[0]).toEqual({
      token: 'a',
      logprob: -0.5,
      bytes: [97],
      top_logprobs: [
        { token: 'a', logprob: -0.5, bytes: [97] },
        { token: 'x', logprob: -1.5, bytes: [120] },
      ],
    });
    const plain = await client.chat.completions.create({ model: MODEL, messages });
    expect(plain.choices[0]!.logprobs).toBeNull();

    const stream = await client.chat.completions.create({ model: MODEL, messages, logprobs: true, stream: true });
    const tokens: string[] = [];
    for await (const chunk of stream)
      for (const c of chunk.choices[0]?.logprobs?.content ?? []) {
        tokens.push(c.token);
        expect(c.top_logprobs).toEqual([]);
      }
    expect(tokens).toEqual(['a', 'b', '']);
  });

  it('GET /v1/models lists the model', async () => {
    const models = await client.models.list();
    expect(models.data.map((m) => m.id)).toEqual([MODEL]);
  });
});

describe('frontend errors', () => {
  it('malformed JSON: 400 with an OpenAI error body', async () => {
    const r = await post('/v1/chat/completions', '{"model": ');
    expect(r.status).toBe(400);
    const body = JSON.parse(r.body);
    expect(body.error).toMatchObject({ type: 'invalid_request_error', code: 'invalid_json', param: null });
    expect(body.error.message).toMatch(/not valid JSON/);
  });

  it('wrong-typed and out-of-range fields: 400 naming the field', async () => {
    const cases: [Record<string, unknown>, string][] = [
      [{ messages: 'hi' }, 'messages'],
      [{ messages: [{ role: 'user', content: 5 }] }, 'messages[0].content'],
      [{ messages: [{ role: 'wizard', content: 'x' }] }, 'messages[0].role'],
      [{ messages, temperature: 'hot' }, 'temperature'],
      [{ messages, temperature: 3 }, 'temperature'],
      [{ messages, top_p: 0 }, 'top_p'],
      [{ messages, max_tokens: 0 }, 'max_tokens'],
      [{ messages, max_tokens: 1.5 }, 'max_tokens'],
      [{ messages, stop: ['a', 'b', 'c', 'd', 'e'] }, 'stop'],
      [{ messages, stream: 'yes' }, 'stream'],
      [{ messages, n: 2 }, 'n'],
      [{ messages, top_logprobs: 3 }, 'top_logprobs'],
      [{}, 'messages'],
    ];
    for (const [fields, param] of cases) {
      const e = await apiError(client.chat.completions.create({ model: MODEL, ...fields } as never));
      expect(e.status, JSON.stringify(fields)).toBe(400);
      expect(e.param, JSON.stringify(fields)).toBe(param);
      expect(e.type).toBe('invalid_request_error');
    }
    const e = await apiError(client.completions.create({ model: MODEL, prompt: 'x', max_tokens: -1 }));
    expect(e.status).toBe(400);
    expect(e.param).toBe('max_tokens');
    expect((await apiError(client.completions.create({ model: MODEL, prompt: ['a', 'b'] }))).status).toBe(400);
  });

  it('prompt longer than the context, or max_tokens past it: 400 context_length_exceeded', async () => {
    const long = await apiError(client.completions.create({ model: MODEL, prompt: 'x'.repeat(CONTEXT) }));
    expect(long.status).toBe(400);
    expect(long.code).toBe('context_length_exceeded');
    expect(long.param).toBe('prompt');
    const chat = await apiError(
      client.chat.completions.create({ model: MODEL, messages: [{ role: 'user', content: 'x'.repeat(CONTEXT) }] }),
    );
    expect(chat.code).toBe('context_length_exceeded');
    expect(chat.param).toBe('messages');
    const max = await apiError(client.completions.create({ model: MODEL, prompt: 'hi', max_tokens: CONTEXT }));
    expect(max.status).toBe(400);
    expect(max.code).toBe('context_length_exceeded');
    expect(max.param).toBe('max_tokens');
    expect(max.message).toMatch(/maximum context length is 256 tokens/);
    // Exactly at the limit is fine.
    const ok = await client.completions.create({ model: MODEL, prompt: 'hi', max_tokens: CONTEXT - 3 });
    expect(ok.choices[0]!.finish_reason).toBe('stop');
  });

  it('unknown model: 404', async () => {
    const e = await apiError(client.chat.completions.create({ model: 'gpt-4', messages }));
    expect(e.status).toBe(404);
    expect(e.code).toBe('model_not_found');
    expect(e.param).toBe('model');
  });

  it('no worker: 503, whether known up front or found by the backend', async () => {
    backend.up = false;
    const e = await apiError(client.chat.completions.create({ model: MODEL, messages }));
    expect(e.status).toBe(503);
    expect(e.code).toBe('no_worker_available');
    expect((await raw('/health')).status).toBe(503);
    backend.up = true;
    backend.failWith = new NoWorkerAvailableError('all decode workers are gone');
    const s = await apiError(client.chat.completions.create({ model: MODEL, messages, stream: true }));
    expect(s.status).toBe(503);
    expect(s.message).toMatch(/all decode workers are gone/);
  });

  it('a backend failure mid-stream ends the stream with an error event', async () => {
    backend.failWith = new Error('decode worker died');
    backend.failAfter = 3;
    const stream = await client.chat.completions.create({ model: MODEL, messages, stream: true });
    const e = await apiError(
      (async () => {
        for await (const _ of stream);
      })(),
    );
    expect(e.message).toMatch(/decode worker died/);
    expect(logged.some((l) => l.includes('decode worker died'))).toBe(true);
  });

  it('unknown path 404, wrong method 405; the server stays up', async () => {
    expect((await raw('/v2/nothing')).status).toBe(404);
    expect((await raw('/v1/chat/completions')).status).toBe(405);
    expect(JSON.parse((await raw('/v1/chat/completions')).body).error.message).toMatch(/takes POST/);
    const r = await client.chat.completions.create({ model: MODEL, messages });
    expect(r.choices[0]!.message.content).toBe(backend.reply);
  });
});

describe('frontend lifecycle', () => {
  it('a client that disconnects mid-stream aborts its backend request', async () => {
    backend.endless = true;
    backend.delayMs = 2;
    const abort = backend.nextAbort();
    const stream = await client.chat.completions.create({ model: MODEL, messages, stream: true });
    let seen = 0;
    for await (const _ of stream) if (++seen === 5) break; // break aborts the HTTP request
    await abort;
    const req = backend.requests.at(-1)!;
    expect(req.signal.aborted).toBe(true);
    expect(backend.aborted).toContain(req.requestId);
  });

  it('a client that gives up on a non-streaming request aborts it too', async () => {
    backend.endless = true;
    backend.delayMs = 2;
    const abort = backend.nextAbort();
    const controller = new AbortController();
    const pending = client.chat.completions.create({ model: MODEL, messages }, { signal: controller.signal });
    setTimeout(() => controller.abort(), 50);
    await expect(pending).rejects.toThrow();
    await abort;
    expect(backend.requests.at(-1)!.signal.aborted).toBe(true);
  });

  it('/health answers ok', async () => {
    const r = await raw('/health');
    expect(r.status).toBe(200);
    expect(JSON.parse(r.body)).toEqual({ status: 'ok', model: MODEL });
  });

  it('/metrics has every named metric, with counts', async () => {
    const r = await raw('/metrics');
    expect(r.status).toBe(200);
    expect(r.type).toMatch(/^text\/plain/);
    for (const name of Object.values(METRIC_NAMES)) expect(r.body, name).toContain(`# TYPE ${name} `);
    expect(r.body).toMatch(
      new RegExp(`${METRIC_NAMES.requests}\\{model="${MODEL}",endpoint="chat",stream="false",status="success"\\} \\d+`),
    );
    expect(r.body).toMatch(new RegExp(`${METRIC_NAMES.requests}\\{[^}]*status="canceled"\\} [1-9]`));
    // Refused requests are client errors, a failed backend a server error: the two are told apart.
    expect(r.body).toMatch(
      new RegExp(`${METRIC_NAMES.requests}\\{model="unknown",[^}]*status="client_error"\\} [1-9]`),
    );
    expect(r.body).toMatch(
      new RegExp(`${METRIC_NAMES.requests}\\{model="${MODEL}",[^}]*status="client_error"\\} [1-9]`),
    );
    expect(r.body).toMatch(
      new RegExp(`${METRIC_NAMES.requests}\\{model="${MODEL}",[^}]*status="server_error"\\} [1-9]`),
    );
    expect(r.body).not.toMatch(/status="error"/);
    expect(r.body).toMatch(new RegExp(`${METRIC_NAMES.timeToFirstToken}_count\\{model="${MODEL}"\\} [1-9]`));
    expect(r.body).toMatch(new RegExp(`${METRIC_NAMES.interTokenLatency}_count\\{model="${MODEL}"\\} [1-9]`));
    expect(r.body).toMatch(new RegExp(`${METRIC_NAMES.outputTokens}\\{model="${MODEL}"\\} [1-9]`));
    expect(r.body).toMatch(new RegExp(`${METRIC_NAMES.prefills}\\{where="remote"\\} 0`));
    // Nothing is left in flight or queued once every request is over.
    expect(r.body).toMatch(new RegExp(`^${METRIC_NAMES.inflightRequests} 0$`, 'm'));
    expect(r.body).toMatch(new RegExp(`^${METRIC_NAMES.queuedRequests} 0$`, 'm'));
  });

  it('close() stops the server', async () => {
    const other = await startFrontend({
      backend,
      tokenizer,
      modelName: MODEL,
      contextLength: CONTEXT,
      vocabSize: VOCAB,
      port: 0,
    });
    expect((await fetch(`${other.url}/health`)).status).toBe(200);
    await other.close({ drainMs: 100 });
    await expect(fetch(`${other.url}/health`)).rejects.toThrow();
  });
});
