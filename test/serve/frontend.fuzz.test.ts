import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { BYTE_VOCAB_SIZE } from '../../lib/engine/model/tokenizer-bytes.js';
import { defaultGraph } from '../../lib/deploy/graph.js';
import { startDeployment, type Deployment } from '../../lib/deploy/launcher.js';

// Fuzzing a real deployment (dummy:tiny on CPU, disaggregated: a prefill and a decode worker, every prompt
// prefilled remotely) with seeded requests from fast-check: bad requests of every kind the frontend takes a
// shape for, each of which must get a 4xx with OpenAI's error body, and valid requests at the edges of the
// rules, each of which must be served. After every batch: no worker restarted, /health 200, and a greedy
// reference request gives the text it gave before the fuzzing. Loopback only; a fixed number of cases.
const MODEL = 'dummy:tiny';
const CONTEXT = 4096; // dummy:tiny's maxPositionEmbeddings
const VOCAB = BYTE_VOCAB_SIZE;
const SEED = 21;
const BAD_CASES = 400;
const EDGE_CASES = 96;
const BATCHES = 8;
const REQUEST_BOUND_MS = 20_000;

interface FuzzCase {
  /** What the case is, for the failure message. */
  kind: string;
  path: '/v1/completions' | '/v1/chat/completions';
  contentType: string | undefined;
  body: string | Uint8Array;
}

// ---- building blocks -------------------------------------------------------------------------------------------

/** A JSON value placed verbatim in the body (1e999 parses as Infinity; JSON.stringify cannot write it). */
class RawJson {
  constructor(readonly text: string) {}
}
function toJson(body: Record<string, unknown>): string {
  const raws: string[] = [];
  const text = JSON.stringify(body, (_key, value) => {
    if (value instanceof RawJson) {
      raws.push(value.text);
      return `\u0000raw${raws.length - 1}\u0000`;
    }
    return value;
  });
  return text.replace(/"\\u0000raw(\d+)\\u0000"/g, (_m, i: string) => raws[Number(i)]!);
}

const validId = fc.integer({ min: 0, max: VOCAB - 1 });
const validIds = (min: number, max: number) => fc.array(validId, { minLength: min, maxLength: max });
/** Any JSON value but a number (wrong type for a numeric field). */
const notNumber = fc.oneof(
  fc.string({ maxLength: 8 }),
  fc.constantFrom('NaN', 'Infinity', '-Infinity', '1', '0.5', ''),
  fc.boolean(),
  fc.constant([]),
  fc.dictionary(fc.string({ maxLength: 4 }), fc.integer(), { maxKeys: 2 }),
);
const infinities = fc.constantFrom(new RawJson('1e999'), new RawJson('-1e999'));
const nonInteger = fc.oneof(fc.double({ noNaN: true, noDefaultInfinity: true }).filter((x) => !Number.isInteger(x)));
const unsafeInteger = fc.constantFrom(2 ** 53, -(2 ** 53), 1e20, -1e300, Number.MAX_VALUE);
/** Fields no rule names: ignored, whatever they hold. */
const unknownFields = fc.dictionary(
  fc.string({ minLength: 1, maxLength: 12 }).map((k) => `x_${k}`),
  fc.jsonValue({ maxDepth: 3 }),
  { maxKeys: 3 },
);

/** A rule broken: its name, and the fields that break it. */
type BadField = [kind: string, fields: Record<string, unknown>];
const bad = (kind: string, fields: Record<string, unknown>): BadField => [kind, fields];

const base = (path: FuzzCase['path']): Record<string, unknown> =>
  path === '/v1/completions'
    ? { model: MODEL, prompt: 'Hello', max_tokens: 2 }
    : { model: MODEL, messages: [{ role: 'user', content: 'Hi' }], max_tokens: 2 };

/** A field set to a value that some rule refuses, for either endpoint. */
const badCommonField: fc.Arbitrary<BadField> = fc.oneof(
  // lengths
  fc
    .oneof(
      fc.constant(0),
      fc.integer({ max: -1 }),
      fc.integer({ min: CONTEXT, max: 2 ** 31 }),
      nonInteger,
      notNumber,
      infinities,
      unsafeInteger,
    )
    .map((v) => bad('max_tokens', { max_tokens: v })),
  // sampling
  fc
    .oneof(fc.double({ min: 2.000001, noNaN: true }), fc.double({ max: -1e-9, noNaN: true }), notNumber, infinities)
    .map((v) => bad('temperature', { temperature: v })),
  fc
    .oneof(
      fc.constant(0),
      fc.double({ min: 1.000001, noNaN: true }),
      fc.double({ max: -1e-9, noNaN: true }),
      notNumber,
      infinities,
    )
    .map((v) => bad('top_p', { top_p: v })),
  fc.oneof(fc.integer({ max: -2 }), nonInteger, notNumber).map((v) => bad('top_k', { top_k: v })),
  fc.oneof(nonInteger, unsafeInteger, notNumber, infinities).map((v) => bad('seed', { seed: v })),
  fc.oneof(fc.integer({ min: 2, max: 1000 }), fc.integer({ max: 0 }), notNumber).map((v) => bad('n', { n: v })),
  fc
    .oneof(fc.double({ min: 2.0001, noNaN: true }), notNumber)
    .map((v) => bad('presence_penalty', { presence_penalty: v })),
  fc.double({ max: -2.0001, noNaN: true }).map((v) => bad('frequency_penalty', { frequency_penalty: v })),
  fc
    .oneof(
      fc.dictionary(fc.integer({ min: 0, max: 300 }).map(String), fc.double({ noNaN: true, noDefaultInfinity: true }), {
        minKeys: 1,
        maxKeys: 3,
      }),
      fc.constant([1]),
    )
    .map((v) => bad('logit_bias', { logit_bias: v })),
  fc
    .oneof(fc.double({ max: 0, noNaN: true }), notNumber)
    .map((v) => bad('repetition_penalty', { repetition_penalty: v })),
  // Above the base request's max_tokens (2), negative, not an integer.
  fc
    .oneof(fc.integer({ min: 3, max: 100 }), fc.integer({ max: -1 }), nonInteger, notNumber)
    .map((v) => bad('min_tokens', { min_tokens: v })),
  fc.constant(bad('use_beam_search', { use_beam_search: true })),
  fc.oneof(fc.integer(), fc.string()).map((v) => bad('ignore_eos', { ignore_eos: v })),
  // stop lists
  fc
    .oneof(
      fc.array(fc.string({ minLength: 1, maxLength: 20 }), { minLength: 5, maxLength: 12 }),
      fc.constant(''),
      fc.array(fc.string({ minLength: 1 }), { maxLength: 3 }).map((s) => [...s, '']),
      fc.array(fc.oneof(fc.integer(), fc.constant(null), fc.constant([]), fc.constant({})), {
        minLength: 1,
        maxLength: 3,
      }),
      fc.integer(),
      fc.constant({ stop: 'x' }),
    )
    .map((v) => bad('stop', { stop: v })),
  // streaming
  fc.record({ include_usage: fc.boolean() }).map((v) => bad('stream_options', { stream: false, stream_options: v })),
  fc.oneof(fc.string(), fc.integer()).map((v) => bad('stream', { stream: v })),
  // model
  fc
    .oneof(fc.constantFrom('gpt-4', 'dummy:TINY', ''), fc.integer(), fc.constant(null))
    .map((v) => bad('model', { model: v })),
);

/** Bad completions fields: prompts of token ids and text, logprobs, echo/suffix/best_of. */
// Token ids out of range are what killed workers (issue 21): they get the most cases.
const badCompletionField: fc.Arbitrary<BadField> = fc.oneof(
  {
    weight: 6,
    arbitrary: fc
      .tuple(
        validIds(0, 20),
        fc.oneof(
          fc.integer({ max: -1 }),
          fc.integer({ min: VOCAB, max: 2 ** 31 }),
          fc.constantFrom(VOCAB, VOCAB + 1),
          nonInteger,
          unsafeInteger,
          infinities,
        ),
        validIds(0, 20),
      )
      .map(([a, id, b]) => bad('token id', { prompt: [...a, id, ...b] })),
  },
  {
    weight: 3,
    arbitrary: fc
      .tuple(validIds(1, 5), fc.integer({ min: VOCAB, max: 1e6 }))
      .map(([a, id]) => bad('token id nested', { prompt: [[...a, id]] })),
  },
  fc
    .constantFrom([], [[]], [[[1]]], [[1], [2]], ['a', 'b'], [1, '2'], [null], { ids: [1] }, null, 5, true)
    .map((p) => bad('prompt shape', { prompt: p })),
  validIds(CONTEXT, CONTEXT + 64).map((p) => bad('prompt over context (ids)', { prompt: p })),
  fc
    .integer({ min: CONTEXT, max: CONTEXT + 2000 })
    .map((n) => bad('prompt over context (text)', { prompt: 'x'.repeat(n) })),
  fc
    .integer({ min: 1, max: 64 })
    .map((over) => bad('max_tokens past the room', { prompt: Array(CONTEXT - 100).fill(65), max_tokens: 100 + over })),
  fc
    .oneof(fc.integer({ min: 6, max: 1000 }), fc.integer({ max: -1 }), fc.boolean(), fc.string())
    .chain((v) => fc.boolean().map((stream) => bad('logprobs', { logprobs: v, stream }))),
  fc.constantFrom(bad('echo', { echo: true }), bad('suffix', { suffix: 'end' }), bad('best_of', { best_of: 3 })),
);

/** Bad chat fields: messages, logprobs, tools. */
const badChatField: fc.Arbitrary<BadField> = fc.oneof(
  fc
    .constantFrom<unknown>(
      [],
      'Hi',
      [{ role: 'wizard', content: 'x' }],
      [{ role: 'user', content: 5 }],
      [{ role: 'user', content: [{ type: 'image_url', image_url: { url: 'x' } }] }],
      [{ content: 'no role' }],
      [null],
      null,
    )
    .map((m) => bad('messages', { messages: m })),
  fc
    .integer({ min: CONTEXT, max: CONTEXT + 500 })
    .map((n) => bad('messages over context', { messages: [{ role: 'user', content: 'y'.repeat(n) }] })),
  fc
    .oneof(fc.integer({ min: 21, max: 1000 }), fc.integer({ max: -1 }))
    .chain((top) => fc.boolean().map((stream) => bad('top_logprobs', { logprobs: true, top_logprobs: top, stream }))),
  fc.integer({ min: 0, max: 20 }).map((top) => bad('top_logprobs without logprobs', { top_logprobs: top })),
  fc.oneof(fc.integer(), fc.string()).map((v) => bad('logprobs type', { logprobs: v })),
  fc.constant(bad('max_tokens and max_completion_tokens', { max_tokens: 1, max_completion_tokens: 1 })),
  fc.constant(bad('tools', { tools: [{ type: 'function', function: { name: 'f' } }] })),
  fc.constant(bad('response_format', { response_format: { type: 'json_object' } })),
);

const path = fc.constantFrom<FuzzCase['path']>('/v1/completions', '/v1/chat/completions');

/** A body whose fields break a rule, with unknown fields and stream flags around it. */
const badField: fc.Arbitrary<FuzzCase> = path.chain((p) =>
  fc
    .tuple(
      p === '/v1/completions'
        ? fc.oneof({ weight: 1, arbitrary: badCommonField }, { weight: 2, arbitrary: badCompletionField })
        : fc.oneof(badCommonField, badChatField),
      unknownFields,
      fc.option(fc.boolean(), { nil: undefined }),
    )
    .map(([[kind, fields], extra, stream]) => {
      const body = { ...extra, ...base(p), ...(stream === undefined ? {} : { stream }), ...fields };
      return { kind, path: p, contentType: 'application/json', body: toJson(body) };
    }),
);

/** A valid body sent with a content type that is not JSON. */
const badContentType: fc.Arbitrary<FuzzCase> = fc
  .tuple(
    path,
    fc.constantFrom(
      undefined,
      'text/plain',
      'application/x-www-form-urlencoded',
      'multipart/form-data',
      'application/xml',
      'application/json; charset=latin1',
      'json',
    ),
  )
  .map(([p, type]) => ({ kind: `content type ${type}`, path: p, contentType: type, body: JSON.stringify(base(p)) }));

/** Bodies that are not a JSON object. */
const malformed: fc.Arbitrary<FuzzCase> = fc
  .tuple(
    path,
    fc.oneof(
      // A valid body cut short: never valid JSON.
      fc.tuple(unknownFields, fc.double({ min: 0, max: 0.999, noNaN: true })).map(([extra, at]) => {
        const text = JSON.stringify({ ...base('/v1/completions'), ...extra });
        return text.slice(0, Math.floor(text.length * at));
      }),
      fc.string({ maxLength: 50 }).map((s) => `{"model": "${MODEL}", ${s}`),
      fc.uint8Array({ minLength: 1, maxLength: 64 }).map((bytes) => new Uint8Array([0x7b, ...bytes])),
      fc.constantFrom(
        '',
        'null',
        '[]',
        '[{}]',
        '42',
        '"text"',
        'true',
        '{"model":"dummy:tiny","prompt":"a"}}',
        '\u00ff{}',
      ),
      fc
        .jsonValue()
        .filter((v) => v === null || typeof v !== 'object' || Array.isArray(v))
        .map((v) => JSON.stringify(v)),
    ),
  )
  .map(([p, body]) => ({ kind: 'malformed body', path: p, contentType: 'application/json', body }));

const badRequest = fc.oneof(
  { weight: 6, arbitrary: badField },
  { weight: 1, arbitrary: badContentType },
  { weight: 2, arbitrary: malformed },
);

/** A valid request at the edges of the rules: it must be served. */
const edgeRequest: fc.Arbitrary<FuzzCase & { maxTokens: number; stream: boolean }> = fc
  .record({
    chat: fc.boolean(),
    // Prompts that nearly fill the context are rare: a CPU prefill of 4k tokens takes about a second here.
    promptLength: fc.oneof(
      { weight: 24, arbitrary: fc.integer({ min: 1, max: 64 }) },
      { weight: 1, arbitrary: fc.integer({ min: CONTEXT - 16, max: CONTEXT - 1 }) },
    ),
    ids: fc.boolean(),
    maxTokens: fc.integer({ min: 1, max: 8 }),
    temperature: fc.oneof(fc.constantFrom(0, 2), fc.double({ min: 0, max: 2, noNaN: true })),
    topP: fc.oneof(fc.constantFrom(1, 1e-9), fc.double({ min: 1e-9, max: 1, noNaN: true })),
    topK: fc.oneof(fc.constantFrom(-1, 0, 1, VOCAB, 100_000)),
    seed: fc.oneof(fc.constantFrom(0, -1, Number.MAX_SAFE_INTEGER, Number.MIN_SAFE_INTEGER), fc.integer()),
    stop: fc.array(fc.oneof(fc.string({ minLength: 1, maxLength: 4 }), fc.constant('z'.repeat(5000))), {
      maxLength: 4,
    }),
    logprobs: fc.option(fc.integer({ min: 0, max: 20 }), { nil: undefined }),
    stream: fc.boolean(),
    ignoreEos: fc.boolean(),
    // The engine's penalties at their limits (a tiny repetition penalty multiplies logits by up to 1e9).
    presencePenalty: fc.oneof(fc.constantFrom(0, -2, 2), fc.double({ min: -2, max: 2, noNaN: true })),
    frequencyPenalty: fc.oneof(fc.constantFrom(0, -2, 2), fc.double({ min: -2, max: 2, noNaN: true })),
    repetitionPenalty: fc.option(fc.constantFrom(1, 1e-9, 0.5, 2, 1e9), { nil: undefined }),
    extra: unknownFields,
  })
  .map((c) => {
    const p: FuzzCase['path'] = c.chat ? '/v1/chat/completions' : '/v1/completions';
    // Room for the completion: chat's template adds about 20 tokens.
    const length = c.chat ? Math.min(c.promptLength, CONTEXT - 64) : c.promptLength;
    const maxTokens = Math.min(c.maxTokens, CONTEXT - length - (c.chat ? 40 : 1));
    const prompt = c.ids ? Array.from({ length }, (_, i) => (i * 37) % VOCAB) : 'a'.repeat(Math.max(0, length - 1));
    const body: Record<string, unknown> = {
      ...c.extra,
      model: MODEL,
      ...(c.chat ? { messages: [{ role: 'user', content: 'b'.repeat(length) }] } : { prompt }),
      max_tokens: maxTokens,
      temperature: c.temperature,
      top_p: c.topP,
      top_k: c.topK,
      seed: c.seed,
      stop: c.stop,
      stream: c.stream,
      ...(c.stream ? { stream_options: { include_usage: true } } : {}),
      ignore_eos: c.ignoreEos,
      n: 1,
      presence_penalty: c.presencePenalty,
      frequency_penalty: c.frequencyPenalty,
      ...(c.repetitionPenalty !== undefined ? { repetition_penalty: c.repetitionPenalty } : {}),
      logit_bias: {},
    };
    if (c.logprobs !== undefined) {
      if (c.chat) Object.assign(body, { logprobs: true, top_logprobs: c.logprobs });
      else body.logprobs = Math.min(c.logprobs, 5);
    }
    return {
      kind: 'edge',
      path: p,
      contentType: 'application/json',
      body: JSON.stringify(body),
      maxTokens,
      stream: c.stream,
    };
  });

// ---- the test ---------------------------------------------------------------------------------------------------

function describeCase(c: FuzzCase): string {
  const body = typeof c.body === 'string' ? c.body : `bytes ${Buffer.from(c.body).toString('hex')}`;
  return `${c.kind}: POST ${c.path} (${c.contentType ?? 'no content type'}) ${body.length > 300 ? `${body.slice(0, 300)}... (${body.length} chars)` : body}`;
}

async function send(url: string, c: FuzzCase): Promise<{ status: number; type: string | null; text: string }> {
  const res = await fetch(`${url}${c.path}`, {
    method: 'POST',
    headers: c.contentType === undefined ? {} : { 'content-type': c.contentType },
    body: typeof c.body === 'string' ? c.body : new Blob([c.body]),
    signal: AbortSignal.timeout(REQUEST_BOUND_MS),
  });
  return { status: res.status, type: res.headers.get('content-type'), text: await res.text() };
}

/** OpenAI's error body. */
function isErrorBody(text: string): boolean {
  try {
    const { error } = JSON.parse(text) as { error?: Record<string, unknown> };
    return (
      typeof error?.message === 'string' &&
      typeof error.type === 'string' &&
      (error.param === null || typeof error.param === 'string') &&
      (error.code === null || typeof error.code === 'string')
    );
  } catch {
    return false;
  }
}

describe('fuzzing a disaggregated deployment with bad and edge requests', () => {
  let d: Deployment;
  const logs: string[] = [];
  const reference = {
    path: '/v1/completions' as const,
    contentType: 'application/json',
    kind: 'reference',
    body: JSON.stringify({ model: MODEL, prompt: 'The reference prompt', max_tokens: 8, temperature: 0 }),
  };
  let referenceText = '';

  beforeAll(async () => {
    const g = defaultGraph({ gpus: 0, mode: 'disagg', port: 0, model: MODEL });
    g.disaggregation = { ...g.disaggregation, minRemotePrefillTokens: 1 };
    for (const p of g.pools) p.engine = { ...p.engine, numBlocks: 300, threads: 1 };
    d = await startDeployment(g, { log: (line) => logs.push(line), heartbeatMs: 200, restart: true });
    const r = await send(d.frontend.url, reference);
    expect(r.status).toBe(200);
    referenceText = (JSON.parse(r.text) as { choices: { text: string }[] }).choices[0]!.text;
  }, 120_000);

  afterAll(async () => {
    await d?.stop({ drainMs: 1000 });
  });

  it('every bad request gets a 4xx with an OpenAI error body, every edge request is served, no worker dies', async () => {
    const bad = fc.sample(badRequest, { seed: SEED, numRuns: BAD_CASES });
    const edge = fc.sample(edgeRequest, { seed: SEED, numRuns: EDGE_CASES });
    // The longest prompt served: the context less one token, with the one token of room asked for.
    edge.unshift({
      kind: 'edge: a prompt of contextLength - 1 ids',
      path: '/v1/completions',
      contentType: 'application/json',
      body: JSON.stringify({ model: MODEL, prompt: Array(CONTEXT - 1).fill(VOCAB - 1), max_tokens: 1 }),
      maxTokens: 1,
      stream: false,
    });
    // Two oversized bodies (past the 16 MiB default), one with a Content-Length and one without.
    const oversized: FuzzCase = {
      kind: 'oversized body',
      path: '/v1/completions',
      contentType: 'application/json',
      body: JSON.stringify({ model: MODEL, prompt: 'x'.repeat(17 * 1024 * 1024) }),
    };
    const pids = d.pids();
    expect(Object.keys(pids).sort()).toEqual(['decode-0', 'prefill-0']);
    const perBatch = Math.ceil(bad.length / BATCHES);
    const edgePerBatch = Math.ceil(edge.length / BATCHES);
    const seen = new Map<number, number>();
    for (let b = 0; b < BATCHES; b++) {
      const batch = bad.slice(b * perBatch, (b + 1) * perBatch);
      if (b === 0) batch.push(oversized);
      // A few at a time, as clients do.
      for (let i = 0; i < batch.length; i += 4) {
        const answers = await Promise.all(batch.slice(i, i + 4).map((c) => send(d.frontend.url, c)));
        answers.forEach((r, j) => {
          const c = batch[i + j]!;
          seen.set(r.status, (seen.get(r.status) ?? 0) + 1);
          expect(r.status >= 400 && r.status < 500, `${r.status} ${r.text.slice(0, 200)} for ${describeCase(c)}`).toBe(
            true,
          );
          expect(isErrorBody(r.text), `not an OpenAI error body: ${r.text.slice(0, 200)} for ${describeCase(c)}`).toBe(
            true,
          );
          expect(r.type).toMatch(/^application\/json/);
        });
      }
      for (const c of edge.slice(b * edgePerBatch, (b + 1) * edgePerBatch)) {
        const r = await send(d.frontend.url, c);
        expect(r.status, `${r.text.slice(0, 300)} for ${describeCase(c)}`).toBe(200);
        if (c.stream) {
          expect(r.text.endsWith('data: [DONE]\n\n'), describeCase(c)).toBe(true);
          expect(r.text, describeCase(c)).not.toContain('"error"');
          const usage = r.text
            .split('\n\n')
            .map((e) => e.slice('data: '.length))
            .filter((e) => e.includes('"usage":{'));
          expect(usage, describeCase(c)).toHaveLength(1);
          expect(JSON.parse(usage[0]!).usage.completion_tokens).toBeLessThanOrEqual(c.maxTokens);
        } else {
          const answer = JSON.parse(r.text) as {
            choices: { finish_reason: string }[];
            usage: { completion_tokens: number };
          };
          expect(['stop', 'length']).toContain(answer.choices[0]!.finish_reason);
          expect(answer.usage.completion_tokens).toBeLessThanOrEqual(c.maxTokens);
        }
      }
      expect(
        d.pids(),
        `a worker restarted in batch ${b}: ${logs.filter((l) => /exited|restart/.test(l)).join('\n')}`,
      ).toEqual(pids);
      const health = await fetch(`${d.frontend.url}/health`, { signal: AbortSignal.timeout(REQUEST_BOUND_MS) });
      expect(health.status).toBe(200);
      const again = await send(d.frontend.url, reference);
      expect(again.status).toBe(200);
      expect((JSON.parse(again.text) as { choices: { text: string }[] }).choices[0]!.text).toBe(referenceText);
    }
    // The generator reached the kinds of refusal it aims at.
    expect([...seen.keys()].sort()).toEqual([400, 404, 413, 415]);
    expect(logs.filter((l) => /exited unexpectedly|internal error/.test(l))).toEqual([]);
  }, 120_000);
});
