/**
 * The OpenAI-compatible HTTP frontend: POST /v1/chat/completions and /v1/completions (streaming over SSE in
 * OpenAI's chunk format, or not), GET /v1/models, /health and /metrics. It tokenizes and applies the chat
 * template; the backend gets token ids. Stop strings are matched here, on text, and end the backend request
 * through its AbortSignal, as a client that disconnects does.
 *
 * A bad request never takes the server down: it gets an OpenAI-style error body
 * `{ error: { message, type, param, code } }` with 400 (malformed or out of range), 404 (unknown model or
 * path), 405, 413, 503 (no worker) or 500.
 */
import { randomUUID } from 'node:crypto';
import { once } from 'node:events';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { z } from 'zod';
import { TandemError } from '../errors.js';
import type { ChatMessage, StreamDecoder, TextTokenizer } from '../engine/tokenizer.js';
import {
  NoWorkerAvailableError,
  type FinishReason,
  type GenerationBackend,
  type GenerationChunk,
  type SamplingParams,
  type TokenLogprobs,
} from './backend.js';
import { DEFAULT_FRONTEND_HOST, DEFAULT_FRONTEND_PORT } from './graph.js';
import { ServeMetrics, type Endpoint, type RequestStatus } from './metrics.js';

/** Largest request body accepted; a prompt of a million tokens fits. */
export const DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024;
/** OpenAI's limits. */
export const MAX_STOP_STRINGS = 4;
export const MAX_TOP_LOGPROBS = 20;
export const MAX_COMPLETION_LOGPROBS = 5;

export interface FrontendOptions {
  backend: GenerationBackend;
  tokenizer: TextTokenizer;
  /** The id clients name in `model`, listed by /v1/models. */
  modelName: string;
  /** Longest prompt plus completion the model serves, in tokens. */
  contextLength: number;
  /** Default 127.0.0.1: loopback only unless asked. */
  host?: string;
  /** Default 8000 (DEFAULT_FRONTEND_PORT); 0 picks a free port. */
  port?: number;
  metrics?: ServeMetrics;
  maxBodyBytes?: number;
  /** Server-side errors (500s, failed streams); default console.error. */
  log?: (line: string) => void;
}

export interface RunningFrontend {
  readonly host: string;
  readonly port: number;
  /** `http://host:port` */
  readonly url: string;
  readonly metrics: ServeMetrics;
  /**
   * Stops accepting connections, lets requests in flight finish for up to `drainMs` (default 10 s), then
   * aborts what is left and closes every connection.
   */
  close(options?: { drainMs?: number }): Promise<void>;
}

// ---- errors ------------------------------------------------------------------------------------------------

type ErrorType = 'invalid_request_error' | 'not_found_error' | 'server_error' | 'service_unavailable_error';

/** An error answered as an OpenAI error body with its HTTP status. */
export class HttpError extends TandemError {
  constructor(
    readonly status: number,
    message: string,
    readonly type: ErrorType = 'invalid_request_error',
    readonly param: string | null = null,
    readonly errorCode: string | null = null,
  ) {
    super('TANDEM_HTTP_ERROR', message);
  }
  body() {
    return { error: { message: this.message, type: this.type, param: this.param, code: this.errorCode } };
  }
}

const badRequest = (message: string, param: string | null = null, code: string | null = null) =>
  new HttpError(400, message, 'invalid_request_error', param, code);

/** Errors thrown by a backend, as HTTP: nothing to serve it (503), a request it can never serve (400), else 500. */
function backendError(error: unknown): HttpError {
  if (error instanceof HttpError) return error;
  if (error instanceof NoWorkerAvailableError)
    return new HttpError(503, error.message, 'service_unavailable_error', null, 'no_worker_available');
  const code = error instanceof TandemError ? error.code : undefined;
  if (code === 'TANDEM_PROMPT_TOO_LONG')
    return badRequest((error as Error).message, 'messages', 'context_length_exceeded');
  if (code === 'TANDEM_BAD_ARGUMENT') return badRequest((error as Error).message);
  return new HttpError(500, `internal error: ${(error as Error)?.message ?? String(error)}`, 'server_error');
}

// ---- request schemas ---------------------------------------------------------------------------------------

// Fields are checked for type and range; fields the schema does not name are ignored (clients send extras).
const int = () => z.number().int().refine(Number.isSafeInteger, 'must be a safe integer');
const optional = <T extends z.ZodType>(t: T) => t.nullish();

const TextPart = z.looseObject({ type: z.literal('text'), text: z.string() });
const ChatMessageSchema = z.looseObject({
  role: z.enum(['system', 'developer', 'user', 'assistant', 'tool']),
  content: z.union([z.string(), z.array(z.looseObject({ type: z.string() }))]).nullish(),
  name: z.string().optional(),
});

const SamplingFields = {
  model: z.string(),
  stream: optional(z.boolean()),
  stream_options: optional(z.looseObject({ include_usage: optional(z.boolean()) })),
  temperature: optional(z.number().min(0).max(2)),
  top_p: optional(z.number().gt(0).max(1)),
  seed: optional(int()),
  n: optional(int().min(1)),
  max_tokens: optional(int().min(1)),
  stop: optional(z.union([z.string(), z.array(z.string()).max(MAX_STOP_STRINGS)])),
  presence_penalty: optional(z.number().min(-2).max(2)),
  frequency_penalty: optional(z.number().min(-2).max(2)),
  user: optional(z.string()),
};

const ChatRequestSchema = z.looseObject({
  ...SamplingFields,
  messages: z.array(ChatMessageSchema).min(1),
  max_completion_tokens: optional(int().min(1)),
  logprobs: optional(z.boolean()),
  top_logprobs: optional(int().min(0).max(MAX_TOP_LOGPROBS)),
  tools: optional(z.array(z.unknown())),
  response_format: optional(z.looseObject({ type: z.string() })),
});

const TokenIds = z.array(int().min(0));
const CompletionRequestSchema = z.looseObject({
  ...SamplingFields,
  prompt: z.union([z.string(), z.array(z.string()), TokenIds, z.array(TokenIds)]),
  logprobs: optional(int().min(0).max(MAX_COMPLETION_LOGPROBS)),
  echo: optional(z.boolean()),
  suffix: optional(z.string()),
  best_of: optional(int().min(1)),
});

type ChatRequest = z.output<typeof ChatRequestSchema>;
type CompletionRequest = z.output<typeof CompletionRequestSchema>;

function parseBody<S extends z.ZodType>(schema: S, body: unknown): z.output<S> {
  const result = schema.safeParse(body);
  if (result.success) return result.data;
  const issue = result.error.issues[0]!;
  const param = issue.path
    .map((k) => (typeof k === 'number' ? `[${k}]` : String(k)))
    .join('.')
    .replace(/\.\[/g, '[');
  const missing = issue.code === 'invalid_type' && /received undefined/.test(issue.message);
  throw badRequest(`${param || 'body'}: ${missing ? 'is required' : issue.message}`, param || null, 'invalid_value');
}

// ---- the generation common to both endpoints ---------------------------------------------------------------

/** What both endpoints resolve a request to, once checked. */
interface Prepared {
  endpoint: Endpoint;
  id: string;
  promptIds: number[];
  sampling: SamplingParams;
  stop: string[];
  stream: boolean;
  includeUsage: boolean;
  /** Chat: top_logprobs count when logprobs was asked; completions: the logprobs count. */
  logprobs: number | undefined;
}

interface Delta {
  text: string;
  tokens: TokenLogprobs[];
}

/**
 * Runs one request against the backend: turns token chunks into text deltas, holding back the text that could
 * still become a stop string, and ends the backend request on a stop string through `controller`.
 */
class Generation {
  completionTokens = 0;
  finishReason: 'stop' | 'length' | null = null;
  private readonly decoder: StreamDecoder;
  private pending = '';
  private readonly holdBack: number;
  private lastTokenAt = 0;
  private firstTokenAt = 0;

  constructor(
    private readonly frontend: FrontendCore,
    private readonly request: Prepared,
    private readonly controller: AbortController,
    private readonly startedAt: number,
  ) {
    this.decoder = frontend.tokenizer.decoder();
    this.holdBack = Math.max(0, ...request.stop.map((s) => s.length - 1));
  }

  get gotFirstToken(): boolean {
    return this.firstTokenAt !== 0;
  }

  /** Yields deltas (text and the logprobs of the tokens that arrived with it) until the request finishes. */
  async *run(chunks: AsyncIterator<GenerationChunk>, first: IteratorResult<GenerationChunk>): AsyncGenerator<Delta> {
    for (let next = first; !next.done; next = await chunks.next()) {
      const delta = this.take(next.value);
      if (delta.text || delta.tokens.length) yield delta;
      if (this.finishReason) return;
    }
    // The backend ended without a finish reason: treat as a natural end.
    const rest = this.finish('stop');
    if (rest.text) yield rest;
  }

  private take(chunk: GenerationChunk): Delta {
    const now = performance.now();
    const n = chunk.tokenIds.length;
    const metrics = this.frontend.metrics;
    if (n) {
      if (!this.firstTokenAt) {
        this.firstTokenAt = now;
        metrics.firstToken(this.frontend.modelName, (now - this.startedAt) / 1000);
        for (let i = 1; i < n; i++) metrics.interToken(this.frontend.modelName, 0);
      } else {
        for (let i = 0; i < n; i++) metrics.interToken(this.frontend.modelName, (now - this.lastTokenAt) / 1000 / n);
      }
      this.lastTokenAt = now;
      this.completionTokens += n;
    }
    const tokens = this.request.logprobs === undefined ? [] : (chunk.logprobs ?? []);
    this.pending += this.decoder.push(chunk.tokenIds);
    const stopped = this.matchStop();
    if (stopped) return { text: stopped, tokens };
    if (chunk.finishReason) {
      if (chunk.finishReason === 'abort')
        throw new HttpError(500, 'the backend aborted the request', 'server_error', null, 'aborted');
      return { ...this.finish(chunk.finishReason), tokens };
    }
    // Emit all but the tail that could be the start of a stop string; never split a surrogate pair.
    let cut = this.pending.length - this.holdBack;
    if (cut > 0 && /[\uD800-\uDBFF]/.test(this.pending[cut - 1] ?? '')) cut--;
    if (cut <= 0) return { text: '', tokens };
    const text = this.pending.slice(0, cut);
    this.pending = this.pending.slice(cut);
    return { text, tokens };
  }

  /** On a stop string: the text before it (possibly ''), the request marked finished and the backend stopped. */
  private matchStop(): string | undefined {
    let at = -1;
    for (const s of this.request.stop) {
      const i = this.pending.indexOf(s);
      if (i >= 0 && (at < 0 || i < at)) at = i;
    }
    if (at < 0) return undefined;
    const text = this.pending.slice(0, at);
    this.pending = '';
    this.finishReason = 'stop';
    this.controller.abort(new Error('stop string matched'));
    return text;
  }

  private finish(reason: FinishReason): Delta {
    this.pending += this.decoder.flush();
    const stopped = this.matchStop();
    if (stopped !== undefined) return { text: stopped, tokens: [] };
    const text = this.pending;
    this.pending = '';
    this.finishReason = reason === 'length' ? 'length' : 'stop';
    return { text, tokens: [] };
  }
}

// ---- response shapes ---------------------------------------------------------------------------------------

function utf8Bytes(s: string): number[] {
  return [...Buffer.from(s, 'utf8')];
}

/** OpenAI chat logprobs entries for some tokens. */
function chatLogprobs(tokenizer: TextTokenizer, tokens: readonly TokenLogprobs[], top: number) {
  return tokens.map((t) => {
    const token = tokenizer.decode([t.tokenId]);
    const alternatives = [];
    for (let i = 0; i < Math.min(top, t.topTokenIds.length); i++) {
      const alt = tokenizer.decode([t.topTokenIds[i]!]);
      alternatives.push({ token: alt, logprob: t.topLogprobs[i]!, bytes: utf8Bytes(alt) });
    }
    return { token, logprob: t.logprob, bytes: utf8Bytes(token), top_logprobs: alternatives };
  });
}

/** OpenAI (legacy) completions logprobs for some tokens; `offset` is the text offset of the first. */
function completionLogprobs(tokenizer: TextTokenizer, tokens: readonly TokenLogprobs[], top: number, offset: number) {
  const out = {
    tokens: [] as string[],
    token_logprobs: [] as number[],
    top_logprobs: [] as Record<string, number>[],
    text_offset: [] as number[],
  };
  for (const t of tokens) {
    const token = tokenizer.decode([t.tokenId]);
    out.tokens.push(token);
    out.token_logprobs.push(t.logprob);
    const alternatives: Record<string, number> = {};
    for (let i = 0; i < Math.min(top, t.topTokenIds.length); i++)
      alternatives[tokenizer.decode([t.topTokenIds[i]!])] ??= t.topLogprobs[i]!;
    out.top_logprobs.push(alternatives);
    out.text_offset.push(offset);
    offset += token.length;
  }
  return out;
}

// ---- the server --------------------------------------------------------------------------------------------

class FrontendCore {
  readonly backend: GenerationBackend;
  readonly tokenizer: TextTokenizer;
  readonly modelName: string;
  readonly contextLength: number;
  readonly metrics: ServeMetrics;
  readonly maxBodyBytes: number;
  readonly log: (line: string) => void;
  readonly created = Math.floor(Date.now() / 1000);
  /** Requests in flight, for drain and shutdown. */
  readonly live = new Set<AbortController>();

  constructor(options: FrontendOptions) {
    if (!Number.isSafeInteger(options.contextLength) || options.contextLength < 2)
      throw new TypeError(`contextLength must be an integer >= 2 (got ${options.contextLength})`);
    this.backend = options.backend;
    this.tokenizer = options.tokenizer;
    this.modelName = options.modelName;
    this.contextLength = options.contextLength;
    this.metrics = options.metrics ?? new ServeMetrics();
    this.maxBodyBytes = options.maxBodyBytes ?? DEFAULT_MAX_BODY_BYTES;
    this.log = options.log ?? ((line) => console.error(line));
  }

  async handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const path = (req.url ?? '/').split('?')[0]!.replace(/\/+$/, '') || '/';
    const route = ROUTES[path];
    try {
      if (!route) throw new HttpError(404, `no route ${req.method} ${path}`, 'not_found_error', null, 'not_found');
      if (req.method !== route.method) {
        res.setHeader('Allow', route.method);
        throw new HttpError(405, `${path} takes ${route.method}, not ${req.method}`, 'invalid_request_error');
      }
      await route.run(this, req, res);
    } catch (error) {
      const http = backendError(error);
      // A stream that failed after its headers has logged already.
      if (http.status >= 500 && http.status !== 503 && !res.headersSent)
        this.log(`frontend: ${req.method} ${path}: ${http.message}`);
      if (!res.headersSent) sendJson(res, http.status, http.body());
      else if (!res.writableEnded) res.end();
    }
  }

  async readJson(req: IncomingMessage): Promise<unknown> {
    const chunks: Buffer[] = [];
    let size = 0;
    for await (const chunk of req as AsyncIterable<Buffer>) {
      size += chunk.length;
      if (size > this.maxBodyBytes)
        throw new HttpError(413, `request body larger than ${this.maxBodyBytes} bytes`, 'invalid_request_error');
      chunks.push(chunk);
    }
    const text = Buffer.concat(chunks).toString('utf8');
    try {
      return JSON.parse(text);
    } catch (error) {
      throw badRequest(`the request body is not valid JSON (${(error as Error).message})`, null, 'invalid_json');
    }
  }

  checkModel(model: string): void {
    if (model !== this.modelName)
      throw new HttpError(
        404,
        `The model '${model}' does not exist (this server serves '${this.modelName}')`,
        'not_found_error',
        'model',
        'model_not_found',
      );
  }

  /** Checks the fields both endpoints share and fills in the sampling parameters. */
  prepare(
    endpoint: Endpoint,
    body: ChatRequest | CompletionRequest,
    promptIds: number[],
    maxTokens: number | null | undefined,
    maxTokensParam: string,
    logprobs: number | undefined,
  ): Prepared {
    if ((body.n ?? 1) !== 1) throw badRequest('only n=1 is supported', 'n', 'unsupported_value');
    for (const k of ['presence_penalty', 'frequency_penalty'] as const)
      if ((body[k] ?? 0) !== 0) throw badRequest(`${k} is not supported (only 0)`, k, 'unsupported_value');
    const limit = this.contextLength;
    const promptParam = endpoint === 'chat' ? 'messages' : 'prompt';
    if (promptIds.length === 0) throw badRequest('the prompt is empty', promptParam, 'invalid_value');
    if (promptIds.length >= limit)
      throw badRequest(
        `This model's maximum context length is ${limit} tokens. However, your prompt is ${promptIds.length} tokens, ` +
          `which leaves no room for a completion.`,
        promptParam,
        'context_length_exceeded',
      );
    const room = limit - promptIds.length;
    if (maxTokens != null && maxTokens > room)
      throw badRequest(
        `This model's maximum context length is ${limit} tokens. However, you requested ` +
          `${promptIds.length + maxTokens} tokens (${promptIds.length} in the prompt, ${maxTokens} in the completion). ` +
          `Please reduce the prompt or the completion length.`,
        maxTokensParam,
        'context_length_exceeded',
      );
    const stop = body.stop == null ? [] : typeof body.stop === 'string' ? [body.stop] : body.stop;
    if (stop.some((s) => s.length === 0)) throw badRequest('stop strings must not be empty', 'stop', 'invalid_value');
    const sampling: SamplingParams = {
      temperature: body.temperature ?? 1,
      topP: body.top_p ?? 1,
      maxTokens: maxTokens ?? room,
      stopTokenIds: this.tokenizer.eosIds,
    };
    if (body.seed != null) sampling.seed = body.seed;
    if (logprobs !== undefined) sampling.logprobs = logprobs;
    const stream = body.stream ?? false;
    if (!stream && body.stream_options != null)
      throw badRequest('stream_options is only allowed with stream: true', 'stream_options', 'invalid_value');
    return {
      endpoint,
      id: `${endpoint === 'chat' ? 'chatcmpl' : 'cmpl'}-${randomUUID().replace(/-/g, '')}`,
      promptIds,
      sampling,
      stop,
      stream,
      includeUsage: body.stream_options?.include_usage ?? false,
      logprobs,
    };
  }

  chatRequest(body: ChatRequest): Prepared {
    this.checkModel(body.model);
    if (body.tools?.length) throw badRequest('tools are not supported', 'tools', 'unsupported_value');
    if (body.response_format && body.response_format.type !== 'text')
      throw badRequest('only response_format text is supported', 'response_format', 'unsupported_value');
    if (body.top_logprobs != null && !body.logprobs)
      throw badRequest('top_logprobs needs logprobs: true', 'top_logprobs', 'invalid_value');
    if (body.max_tokens != null && body.max_completion_tokens != null)
      throw badRequest('set max_tokens or max_completion_tokens, not both', 'max_tokens', 'invalid_value');
    const messages: ChatMessage[] = body.messages.map((m, i) => {
      if (m.content == null) return { role: m.role, content: '' };
      if (typeof m.content === 'string') return { role: m.role, content: m.content };
      return {
        role: m.role,
        content: m.content
          .map((part, j) => {
            const text = TextPart.safeParse(part);
            if (!text.success)
              throw badRequest(
                `messages[${i}].content[${j}]: only text content parts are supported`,
                `messages[${i}].content[${j}]`,
                'unsupported_value',
              );
            return text.data.text;
          })
          .join(''),
      };
    });
    // The template puts BOS in where the model wants it; encoding must not add a second one.
    const prompt = this.tokenizer.applyChatTemplate(messages, { addGenerationPrompt: true });
    const promptIds = this.tokenizer.encode(prompt, { addBos: false });
    const maxParam = body.max_completion_tokens != null ? 'max_completion_tokens' : 'max_tokens';
    return this.prepare(
      'chat',
      body,
      promptIds,
      body.max_completion_tokens ?? body.max_tokens,
      maxParam,
      body.logprobs ? (body.top_logprobs ?? 0) : undefined,
    );
  }

  completionRequest(body: CompletionRequest): Prepared {
    this.checkModel(body.model);
    if (body.echo) throw badRequest('echo is not supported', 'echo', 'unsupported_value');
    if (body.suffix) throw badRequest('suffix is not supported', 'suffix', 'unsupported_value');
    if ((body.best_of ?? 1) !== 1) throw badRequest('only best_of=1 is supported', 'best_of', 'unsupported_value');
    const p = body.prompt;
    let promptIds: number[];
    if (typeof p === 'string') promptIds = this.tokenizer.encode(p);
    else if (p.length === 0) throw badRequest('the prompt is empty', 'prompt', 'invalid_value');
    else if (p.length > 1 && typeof p[0] !== 'number')
      throw badRequest('one prompt per request is supported', 'prompt', 'unsupported_value');
    else if (typeof p[0] === 'string') promptIds = this.tokenizer.encode(p[0]);
    else if (typeof p[0] === 'number') promptIds = [...(p as number[])];
    else promptIds = [...(p[0] as number[])];
    return this.prepare('completions', body, promptIds, body.max_tokens, 'max_tokens', body.logprobs ?? undefined);
  }

  /** Runs a checked request and answers it, streaming or not; counts it in the metrics. */
  async serve(prepared: Prepared, req: IncomingMessage, res: ServerResponse): Promise<RequestStatus> {
    if (!this.backend.available())
      throw new HttpError(
        503,
        'no worker is available to serve the request',
        'service_unavailable_error',
        null,
        'no_worker_available',
      );
    const controller = new AbortController();
    const onClose = () => {
      if (!res.writableFinished) controller.abort(new Error('client disconnected'));
    };
    res.on('close', onClose);
    this.live.add(controller);
    const startedAt = performance.now();
    const generation = new Generation(this, prepared, controller, startedAt);
    this.metrics.requestStarted();
    let iterator: AsyncIterator<GenerationChunk> | undefined;
    try {
      iterator = this.backend
        .generate({
          requestId: prepared.id,
          promptIds: prepared.promptIds,
          sampling: prepared.sampling,
          signal: controller.signal,
        })
        [Symbol.asyncIterator]();
      // Wait for the first chunk before answering, so that a backend that cannot serve the request still
      // gets its proper status (503, 400) rather than a stream that fails.
      const first = await iterator.next();
      if (controller.signal.aborted && generation.finishReason === null) return 'canceled';
      const deltas = generation.run(iterator, first);
      if (prepared.stream) await this.stream(prepared, generation, deltas, res, controller.signal);
      else await this.respond(prepared, generation, deltas, res, controller.signal);
      return controller.signal.aborted && generation.finishReason === null ? 'canceled' : 'success';
    } catch (error) {
      if (controller.signal.aborted && generation.finishReason === null) return 'canceled';
      throw error;
    } finally {
      res.off('close', onClose);
      this.live.delete(controller);
      // Whatever ended the request, the backend's iteration is closed, and aborted unless it finished.
      if (generation.finishReason === null) controller.abort(new Error('request ended'));
      void iterator?.return?.().catch(() => undefined);
      this.metrics.tokens(this.modelName, prepared.promptIds.length, generation.completionTokens);
      this.metrics.requestFinished(this.modelName, (performance.now() - startedAt) / 1000, generation.gotFirstToken);
    }
  }

  private usage(prepared: Prepared, generation: Generation) {
    return {
      prompt_tokens: prepared.promptIds.length,
      completion_tokens: generation.completionTokens,
      total_tokens: prepared.promptIds.length + generation.completionTokens,
    };
  }

  private async respond(
    prepared: Prepared,
    generation: Generation,
    deltas: AsyncGenerator<Delta>,
    res: ServerResponse,
    signal: AbortSignal,
  ): Promise<void> {
    let text = '';
    const tokens: TokenLogprobs[] = [];
    for await (const delta of deltas) {
      text += delta.text;
      tokens.push(...delta.tokens);
      if (signal.aborted && generation.finishReason === null) return;
    }
    const top = prepared.logprobs ?? 0;
    const base = { id: prepared.id, created: Math.floor(Date.now() / 1000), model: this.modelName };
    if (prepared.endpoint === 'chat') {
      sendJson(res, 200, {
        ...base,
        object: 'chat.completion',
        choices: [
          {
            index: 0,
            message: { role: 'assistant', content: text, refusal: null },
            logprobs: prepared.logprobs === undefined ? null : { content: chatLogprobs(this.tokenizer, tokens, top) },
            finish_reason: generation.finishReason,
          },
        ],
        usage: this.usage(prepared, generation),
      });
    } else {
      sendJson(res, 200, {
        ...base,
        object: 'text_completion',
        choices: [
          {
            index: 0,
            text,
            logprobs: prepared.logprobs === undefined ? null : completionLogprobs(this.tokenizer, tokens, top, 0),
            finish_reason: generation.finishReason,
          },
        ],
        usage: this.usage(prepared, generation),
      });
    }
  }

  private async stream(
    prepared: Prepared,
    generation: Generation,
    deltas: AsyncGenerator<Delta>,
    res: ServerResponse,
    signal: AbortSignal,
  ): Promise<void> {
    res.writeHead(200, {
      'Content-Type': 'text/event-stream; charset=utf-8',
      'Cache-Control': 'no-cache',
      Connection: 'keep-alive',
      'X-Accel-Buffering': 'no',
    });
    const created = Math.floor(Date.now() / 1000);
    const chat = prepared.endpoint === 'chat';
    const top = prepared.logprobs ?? 0;
    const usageField = prepared.includeUsage ? { usage: null } : {};
    let offset = 0;
    const chunk = (choice: Record<string, unknown>) => ({
      id: prepared.id,
      object: chat ? 'chat.completion.chunk' : 'text_completion',
      created,
      model: this.modelName,
      choices: [{ index: 0, ...choice }],
      ...usageField,
    });
    const send = async (data: unknown) => {
      if (!res.write(`data: ${JSON.stringify(data)}\n\n`) && !signal.aborted)
        await Promise.race([once(res, 'drain'), once(res, 'close')]);
    };
    try {
      if (chat) await send(chunk({ delta: { role: 'assistant', content: '' }, logprobs: null, finish_reason: null }));
      for await (const delta of deltas) {
        if (signal.aborted && generation.finishReason === null) return;
        if (!delta.text && !(prepared.logprobs !== undefined && delta.tokens.length)) continue;
        const logprobs =
          prepared.logprobs === undefined
            ? null
            : chat
              ? { content: chatLogprobs(this.tokenizer, delta.tokens, top) }
              : completionLogprobs(this.tokenizer, delta.tokens, top, offset);
        offset += delta.text.length;
        await send(
          chat
            ? chunk({ delta: { content: delta.text }, logprobs, finish_reason: null })
            : chunk({ text: delta.text, logprobs, finish_reason: null }),
        );
      }
      await send(
        chat
          ? chunk({ delta: {}, logprobs: null, finish_reason: generation.finishReason })
          : chunk({ text: '', logprobs: null, finish_reason: generation.finishReason }),
      );
      if (prepared.includeUsage)
        await send({
          id: prepared.id,
          object: chat ? 'chat.completion.chunk' : 'text_completion',
          created,
          model: this.modelName,
          choices: [],
          usage: this.usage(prepared, generation),
        });
      res.end('data: [DONE]\n\n');
    } catch (error) {
      if (signal.aborted && generation.finishReason === null) return;
      // Headers are out: the error travels as an SSE event, which OpenAI clients raise as an APIError.
      const http = backendError(error);
      this.log(`frontend: stream ${prepared.id} failed: ${http.message}`);
      if (!res.writableEnded) res.end(`data: ${JSON.stringify(http.body())}\n\ndata: [DONE]\n\n`);
      throw error;
    }
  }

  async completions(endpoint: Endpoint, req: IncomingMessage, res: ServerResponse): Promise<void> {
    let model = 'unknown';
    let stream = false;
    let status: RequestStatus = 'error';
    try {
      const body = await this.readJson(req);
      if (body && typeof body === 'object') {
        const b = body as { model?: unknown; stream?: unknown };
        if (typeof b.model === 'string') model = b.model === this.modelName ? b.model : 'unknown';
        stream = b.stream === true;
      }
      const prepared =
        endpoint === 'chat'
          ? this.chatRequest(parseBody(ChatRequestSchema, body))
          : this.completionRequest(parseBody(CompletionRequestSchema, body));
      status = await this.serve(prepared, req, res);
    } finally {
      this.metrics.countRequest(model, endpoint, stream, status);
    }
  }
}

function sendJson(res: ServerResponse, status: number, body: unknown): void {
  const text = JSON.stringify(body);
  res.writeHead(status, { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(text) });
  res.end(text);
}

interface Route {
  method: 'GET' | 'POST';
  run(core: FrontendCore, req: IncomingMessage, res: ServerResponse): Promise<void>;
}

const ROUTES: Record<string, Route> = {
  '/v1/chat/completions': { method: 'POST', run: (core, req, res) => core.completions('chat', req, res) },
  '/v1/completions': { method: 'POST', run: (core, req, res) => core.completions('completions', req, res) },
  '/v1/models': {
    method: 'GET',
    run: async (core, _req, res) =>
      sendJson(res, 200, {
        object: 'list',
        data: [
          {
            id: core.modelName,
            object: 'model',
            created: core.created,
            owned_by: 'tandem',
            max_model_len: core.contextLength,
          },
        ],
      }),
  },
  '/health': {
    method: 'GET',
    run: async (core, _req, res) => {
      const ready = core.backend.available();
      sendJson(res, ready ? 200 : 503, { status: ready ? 'ok' : 'no_worker_available', model: core.modelName });
    },
  },
  '/metrics': {
    method: 'GET',
    run: async (core, _req, res) => {
      const text = await core.metrics.text();
      res.writeHead(200, { 'Content-Type': core.metrics.contentType });
      res.end(text);
    },
  },
};

/** Starts the frontend and resolves once it listens. */
export async function startFrontend(options: FrontendOptions): Promise<RunningFrontend> {
  const core = new FrontendCore(options);
  const server: Server = createServer((req, res) => {
    core.handle(req, res).catch((error: unknown) => {
      core.log(`frontend: unexpected failure: ${(error as Error)?.stack ?? String(error)}`);
      if (!res.headersSent) sendJson(res, 500, new HttpError(500, 'internal error', 'server_error').body());
      else res.destroy();
    });
  });
  const host = options.host ?? DEFAULT_FRONTEND_HOST;
  server.listen(options.port ?? DEFAULT_FRONTEND_PORT, host);
  await Promise.race([
    once(server, 'listening'),
    once(server, 'error').then(([error]) => {
      throw error;
    }),
  ]);
  const port = (server.address() as AddressInfo).port;
  let closing: Promise<void> | undefined;
  return {
    host,
    port,
    url: `http://${host.includes(':') ? `[${host}]` : host}:${port}`,
    metrics: core.metrics,
    close({ drainMs = 10_000 } = {}) {
      closing ??= (async () => {
        const closed = new Promise<void>((resolve) => server.close(() => resolve()));
        server.closeIdleConnections();
        const deadline = Date.now() + drainMs;
        while (core.live.size && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
        for (const controller of core.live) controller.abort(new Error('frontend shutting down'));
        server.closeAllConnections();
        await closed;
      })();
      return closing;
    },
  };
}
