/**
 * The HTTP server: routes, the API key, content types, request bodies, serving a checked request against the
 * backend (streaming or not), /health, /metrics and the drain on close. Request rules are in request.ts,
 * stop strings in generation.ts, response shapes in responses.ts.
 */
import { createHash, timingSafeEqual } from 'node:crypto';
import { once } from 'node:events';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { MIMEType } from 'node:util';
import type { TextTokenizer } from '../engine/tokenizer.js';
import type { GenerationBackend, GenerationChunk, TokenLogprobs } from './backend.js';
import { DEFAULT_FRONTEND_HOST, DEFAULT_FRONTEND_PORT } from '../deploy/graph.js';
import { ServeMetrics, type Endpoint, type RequestStatus } from './metrics.js';
import {
  badRequest,
  bodyTooLarge,
  ClientDisconnectedError,
  HttpError,
  noWorker,
  shuttingDown,
  toHttpError,
} from './errors.js';
import { Generation, nextChunk, type Delta } from './generation.js';
import { checkChatRequest, checkCompletionRequest, type CheckedRequest, type ServedModel } from './request.js';
import { completionBody, SSE_DONE, sseEvent, StreamChunks } from './responses.js';

/** Largest request body accepted; a prompt of a million tokens fits. */
export const DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024;
/** How long `close()` lets requests in flight finish by default. */
export const DEFAULT_DRAIN_MS = 10_000;
/** After the drain period: how long the requests cut get to write their error before connections close. */
const CUT_GRACE_MS = 1000;

export interface FrontendOptions {
  backend: GenerationBackend;
  tokenizer: TextTokenizer;
  /** The id clients name in `model`, listed by /v1/models. */
  modelName: string;
  /** Longest prompt plus completion the model serves, in tokens. */
  contextLength: number;
  /** The model's vocabulary size (config.json's vocab_size): token ids in prompts must be below it. */
  vocabSize: number;
  /**
   * When set, every /v1/* request must carry `Authorization: Bearer <apiKey>` (else 401 invalid_api_key);
   * /health and /metrics stay open. Must not be empty.
   */
  apiKey?: string;
  /** Default 127.0.0.1: loopback only unless asked. */
  host?: string;
  /** Default 8000 (DEFAULT_FRONTEND_PORT); 0 picks a free port. */
  port?: number;
  metrics?: ServeMetrics;
  /** What GET /planner answers (the launcher's planner, lib/planner/runtime.ts); absent: 404. */
  plannerStatus?: () => unknown;
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
   * Drains, then closes. While draining, /health answers 503 `{status: 'draining'}` and new completion
   * requests 503 `server_shutting_down`; requests in flight get up to `drainMs` (default 10 s) to finish.
   * Then those still running are ended: a stream with an SSE error event (OpenAI error body) and
   * `data: [DONE]`, a request not streaming with a 503; then every connection closes.
   */
  close(options?: { drainMs?: number }): Promise<void>;
}

const sha256 = (text: string) => createHash('sha256').update(text, 'utf8').digest();

function sendJson(res: ServerResponse, status: number, body: unknown): void {
  const text = JSON.stringify(body);
  res.writeHead(status, { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(text) });
  res.end(text);
}

/**
 * Request bodies must be JSON: `application/json`, with a UTF-8 charset if one is named. A missing Content-Type
 * is refused too, as vLLM does: a browser page may send a body without one (or as text/plain) to a server on
 * loopback without a CORS preflight, and only a JSON content type forces that preflight.
 */
function checkContentType(header: string | undefined): void {
  let mime: MIMEType | undefined;
  try {
    if (header) mime = new MIMEType(header);
  } catch {
    // Unparseable: refused below like any other.
  }
  const charset = mime?.params.get('charset')?.toLowerCase();
  if (mime?.essence !== 'application/json' || (charset !== undefined && charset !== 'utf-8' && charset !== 'utf8'))
    throw new HttpError(
      415,
      `Unsupported Media Type: the body must be application/json (Content-Type ${header ? JSON.stringify(header) : 'missing'})`,
      'invalid_request_error',
      null,
      'unsupported_media_type',
    );
}

/** Labels of the request counter, filled in as the request is read. */
interface RequestLabels {
  model: string;
  stream: boolean;
}

interface Route {
  method: 'GET' | 'POST';
  /** Resolves to the outcome counted in the metrics (completion routes). */
  run(core: FrontendCore, req: IncomingMessage, res: ServerResponse, labels: RequestLabels): Promise<RequestStatus>;
}

class FrontendCore {
  readonly backend: GenerationBackend;
  readonly model: ServedModel;
  readonly metrics: ServeMetrics;
  readonly maxBodyBytes: number;
  readonly plannerStatus: (() => unknown) | undefined;
  readonly log: (line: string) => void;
  readonly created = Math.floor(Date.now() / 1000);
  private readonly apiKeyDigest: Buffer | undefined;
  draining = false;
  /** Completion requests being served, for the end of the drain. */
  readonly live = new Set<AbortController>();
  /** Responses not yet handed to the OS (every route), for the drain. */
  private readonly open = new Set<ServerResponse>();
  private idleWaiters: (() => void)[] = [];

  constructor(options: FrontendOptions) {
    if (!Number.isSafeInteger(options.contextLength) || options.contextLength < 2)
      throw new TypeError(`contextLength must be an integer >= 2 (got ${options.contextLength})`);
    if (!Number.isSafeInteger(options.vocabSize) || options.vocabSize < 1)
      throw new TypeError(`vocabSize must be a positive integer (got ${options.vocabSize})`);
    if (options.apiKey !== undefined && (typeof options.apiKey !== 'string' || options.apiKey.length === 0))
      throw new TypeError('apiKey must be a non-empty string (leave it out to serve without a key)');
    this.backend = options.backend;
    this.model = {
      name: options.modelName,
      contextLength: options.contextLength,
      vocabSize: options.vocabSize,
      tokenizer: options.tokenizer,
    };
    this.metrics = options.metrics ?? new ServeMetrics();
    this.maxBodyBytes = options.maxBodyBytes ?? DEFAULT_MAX_BODY_BYTES;
    this.plannerStatus = options.plannerStatus;
    this.log = options.log ?? ((line) => console.error(line));
    this.apiKeyDigest = options.apiKey === undefined ? undefined : sha256(options.apiKey);
  }

  get modelName(): string {
    return this.model.name;
  }
  get tokenizer(): TextTokenizer {
    return this.model.tokenizer;
  }

  async handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    this.open.add(res);
    const settled = () => {
      this.open.delete(res);
      if (this.open.size === 0) for (const w of this.idleWaiters.splice(0)) w();
    };
    res.once('finish', settled).once('close', settled);
    if (this.draining) res.setHeader('Connection', 'close');

    const path = (req.url ?? '/').split('?')[0]!.replace(/\/+$/, '') || '/';
    const route = ROUTES[path];
    const endpoint = COMPLETION_ENDPOINTS[path];
    const labels: RequestLabels = { model: 'unknown', stream: false };
    let status: RequestStatus = 'server_error';
    try {
      if (path.startsWith('/v1/')) this.authenticate(req, res);
      if (!route) throw new HttpError(404, `no route ${req.method} ${path}`, 'not_found_error', null, 'not_found');
      if (req.method !== route.method) {
        res.setHeader('Allow', route.method);
        throw new HttpError(405, `${path} takes ${route.method}, not ${req.method}`, 'invalid_request_error');
      }
      status = await route.run(this, req, res, labels);
    } catch (error) {
      if (error instanceof ClientDisconnectedError) {
        status = 'canceled';
        return;
      }
      const http = toHttpError(error);
      status = http.status >= 500 ? 'server_error' : 'client_error';
      // A stream that failed after its headers has logged already; a 503 is no fault of the server.
      if (http.status >= 500 && http.status !== 503 && !res.headersSent)
        this.log(`frontend: ${req.method} ${path}: ${http.message}`);
      if (!res.headersSent) sendJson(res, http.status, http.body());
      else if (!res.writableEnded) res.end();
    } finally {
      if (endpoint) this.metrics.countRequest(labels.model, endpoint, labels.stream, status);
    }
  }

  /** The API key, when one is set: `Authorization: Bearer <key>`, compared in constant time. */
  private authenticate(req: IncomingMessage, res: ServerResponse): void {
    if (!this.apiKeyDigest) return;
    const match = /^Bearer +(\S+) *$/i.exec(req.headers.authorization ?? '');
    if (match && timingSafeEqual(sha256(match[1]!), this.apiKeyDigest)) return;
    res.setHeader('WWW-Authenticate', 'Bearer');
    throw new HttpError(
      401,
      match ? 'Incorrect API key provided.' : 'No API key provided: send it as the header Authorization: Bearer <key>.',
      'invalid_request_error',
      null,
      'invalid_api_key',
    );
  }

  /** Resolves once every response has been handed to the OS, or at `deadline` (ms since the epoch). */
  async idle(deadline: number): Promise<void> {
    if (this.open.size === 0) return;
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([
      new Promise<void>((resolve) => this.idleWaiters.push(resolve)),
      new Promise<void>((resolve) => (timer = setTimeout(resolve, Math.max(0, deadline - Date.now())))),
    ]);
    clearTimeout(timer);
  }

  /** The body, whole; 413 past maxBodyBytes (the rest is read and dropped, so that the client gets the 413). */
  readBody(req: IncomingMessage): Promise<Buffer> {
    return new Promise((resolve, reject) => {
      const chunks: Buffer[] = [];
      let size = 0;
      let refused = false;
      req.on('data', (chunk: Buffer) => {
        if (refused) return;
        size += chunk.length;
        if (size <= this.maxBodyBytes) return void chunks.push(chunk);
        refused = true;
        chunks.length = 0;
        reject(bodyTooLarge(this.maxBodyBytes));
      });
      req.once('end', () => resolve(Buffer.concat(chunks)));
      // The client went away before the body ended.
      req.once('error', () => reject(new ClientDisconnectedError()));
      req.once('close', () => {
        if (!req.complete) reject(new ClientDisconnectedError());
      });
    });
  }

  async readJson(req: IncomingMessage): Promise<unknown> {
    const length = Number(req.headers['content-length']);
    if (length > this.maxBodyBytes) throw bodyTooLarge(this.maxBodyBytes);
    const body = await this.readBody(req);
    let text: string;
    try {
      text = new TextDecoder('utf-8', { fatal: true }).decode(body);
    } catch {
      throw badRequest('the request body is not valid UTF-8', null, 'invalid_json');
    }
    try {
      return JSON.parse(text);
    } catch (error) {
      throw badRequest(`the request body is not valid JSON (${(error as Error).message})`, null, 'invalid_json');
    }
  }

  async completions(endpoint: Endpoint, req: IncomingMessage, res: ServerResponse, labels: RequestLabels) {
    if (this.draining) throw shuttingDown();
    checkContentType(req.headers['content-type']);
    const body = await this.readJson(req);
    if (body && typeof body === 'object') {
      const b = body as { model?: unknown; stream?: unknown };
      if (b.model === this.modelName) labels.model = b.model;
      labels.stream = b.stream === true;
    }
    const request = endpoint === 'chat' ? checkChatRequest(this.model, body) : checkCompletionRequest(this.model, body);
    return this.serve(request, res);
  }

  /** Runs a checked request against the backend and answers it, streaming or not; counts it in the metrics. */
  async serve(request: CheckedRequest, res: ServerResponse): Promise<RequestStatus> {
    if (!this.backend.available()) throw noWorker();
    const controller = new AbortController();
    const onClose = () => {
      if (!res.writableFinished) controller.abort(new ClientDisconnectedError());
    };
    res.on('close', onClose);
    this.live.add(controller);
    const startedAt = performance.now();
    const generation = new Generation(this, request, controller, startedAt);
    this.metrics.requestStarted();
    let chunks: AsyncIterator<GenerationChunk> | undefined;
    try {
      chunks = this.backend
        .generate({
          requestId: request.id,
          promptIds: request.promptIds,
          sampling: request.sampling,
          signal: controller.signal,
        })
        [Symbol.asyncIterator]();
      // Wait for the first chunk before answering, so that a backend that cannot serve the request still
      // gets its proper status (503, 400) rather than a stream that fails.
      const first = await nextChunk(chunks, controller.signal);
      const deltas = generation.run(chunks, first);
      if (request.stream) await this.stream(request, generation, deltas, res);
      else await this.respond(request, generation, deltas, res);
      if (!generation.cut) return 'success';
    } catch (error) {
      if (!generation.cut) throw error;
    } finally {
      res.off('close', onClose);
      this.live.delete(controller);
      // Whatever ended the request, the backend's iteration is closed, and aborted unless it finished.
      if (generation.finishReason === null) controller.abort(new Error('request ended'));
      void chunks?.return?.().catch(() => undefined);
      this.metrics.tokens(this.modelName, request.promptIds.length, generation.completionTokens);
      this.metrics.requestFinished(this.modelName, (performance.now() - startedAt) / 1000, generation.gotFirstToken);
    }
    // Cut: by the client (nobody left to answer), or by the end of the drain (answered with its error).
    const reason: unknown = controller.signal.reason;
    if (!(reason instanceof HttpError)) throw new ClientDisconnectedError();
    if (!res.headersSent) throw reason;
    if (!res.writableEnded) res.end(sseEvent(reason.body()) + SSE_DONE);
    return 'server_error';
  }

  private async respond(
    request: CheckedRequest,
    generation: Generation,
    deltas: AsyncGenerator<Delta>,
    res: ServerResponse,
  ): Promise<void> {
    let text = '';
    const tokens: TokenLogprobs[] = [];
    for await (const delta of deltas) {
      text += delta.text;
      tokens.push(...delta.tokens);
    }
    if (generation.cut) return;
    sendJson(
      res,
      200,
      completionBody(this.tokenizer, this.modelName, request, {
        text,
        tokens,
        finishReason: generation.finishReason,
        completionTokens: generation.completionTokens,
        cachedTokens: generation.cachedTokens,
      }),
    );
  }

  private async stream(
    request: CheckedRequest,
    generation: Generation,
    deltas: AsyncGenerator<Delta>,
    res: ServerResponse,
  ): Promise<void> {
    res.writeHead(200, {
      'Content-Type': 'text/event-stream; charset=utf-8',
      'Cache-Control': 'no-cache',
      Connection: this.draining ? 'close' : 'keep-alive',
      'X-Accel-Buffering': 'no',
    });
    const chunks = new StreamChunks(this.tokenizer, this.modelName, request);
    const send = async (data: unknown) => {
      if (res.write(sseEvent(data)) || generation.cut) return;
      // A slow reader: wait for room, unless the request ends first.
      await new Promise<void>((resolve) => {
        const signal = generation.signal;
        const done = () => {
          res.off('drain', done).off('close', done);
          signal.removeEventListener('abort', done);
          resolve();
        };
        res.once('drain', done).once('close', done);
        signal.addEventListener('abort', done, { once: true });
      });
    };
    try {
      const first = chunks.first();
      if (first) await send(first);
      for await (const delta of deltas) {
        if (generation.cut) return;
        if (chunks.carries(delta)) await send(chunks.delta(delta));
      }
      if (generation.cut) return;
      await send(chunks.last(generation.finishReason));
      if (request.includeUsage) await send(chunks.usage(generation.completionTokens, generation.cachedTokens));
      res.end(SSE_DONE);
    } catch (error) {
      if (generation.cut) return;
      // Headers are out: the error travels as an SSE event, which OpenAI clients raise as an APIError.
      const http = toHttpError(error);
      this.log(`frontend: stream ${request.id} failed: ${http.message}`);
      if (!res.writableEnded) res.end(sseEvent(http.body()) + SSE_DONE);
      throw error;
    }
  }
}

const COMPLETION_ENDPOINTS: Record<string, Endpoint> = {
  '/v1/chat/completions': 'chat',
  '/v1/completions': 'completions',
};

const ROUTES: Record<string, Route> = {
  '/v1/chat/completions': { method: 'POST', run: (core, req, res, l) => core.completions('chat', req, res, l) },
  '/v1/completions': { method: 'POST', run: (core, req, res, l) => core.completions('completions', req, res, l) },
  '/v1/models': {
    method: 'GET',
    run: async (core, _req, res) => {
      sendJson(res, 200, {
        object: 'list',
        data: [
          {
            id: core.modelName,
            object: 'model',
            created: core.created,
            owned_by: 'tandem',
            max_model_len: core.model.contextLength,
          },
        ],
      });
      return 'success';
    },
  },
  // Liveness: the process answers (also while draining or with no worker); /health is readiness.
  '/live': {
    method: 'GET',
    run: async (core, _req, res) => {
      sendJson(res, 200, { status: 'alive', model: core.modelName });
      return 'success';
    },
  },
  '/health': {
    method: 'GET',
    run: async (core, _req, res) => {
      const status = core.draining ? 'draining' : core.backend.available() ? 'ok' : 'no_worker_available';
      sendJson(res, status === 'ok' ? 200 : 503, { status, model: core.modelName });
      return 'success';
    },
  },
  '/planner': {
    method: 'GET',
    run: async (core, _req, res) => {
      if (!core.plannerStatus)
        throw new HttpError(404, 'no planner behind this frontend', 'not_found_error', null, 'not_found');
      sendJson(res, 200, core.plannerStatus());
      return 'success';
    },
  },
  '/metrics': {
    method: 'GET',
    run: async (core, _req, res) => {
      const text = await core.metrics.text();
      res.writeHead(200, { 'Content-Type': core.metrics.contentType });
      res.end(text);
      return 'success';
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
    close({ drainMs = DEFAULT_DRAIN_MS } = {}) {
      closing ??= (async () => {
        // The listener stays open while draining, so that health checks and new requests get their 503.
        core.draining = true;
        server.closeIdleConnections();
        await core.idle(Date.now() + drainMs);
        for (const controller of core.live) controller.abort(shuttingDown());
        await core.idle(Date.now() + CUT_GRACE_MS);
        const closed = new Promise<void>((resolve) => server.close(() => resolve()));
        server.closeAllConnections();
        await closed;
      })();
      return closing;
    },
  };
}
