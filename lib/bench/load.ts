/**
 * The load generator: sends a workload's requests to an OpenAI-compatible server, streaming, and times each
 * one (RequestTiming, stats.ts). Open loop: each request goes at its scheduled time whatever is in flight
 * (Poisson, gamma, constant, a trace). Closed loop: `concurrency` clients, each sending its next request when
 * the last one ends.
 *
 * Requests are plain fetch POSTs; the SSE stream is split by eventsource-parser and each event is timed as it
 * is parsed. This runs in its own process (load-process.ts), so that its parsing never shares an event loop
 * with a frontend it measures.
 */
import { fork, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { EventSourceParserStream } from 'eventsource-parser/stream';
import type { RequestTiming } from './stats.js';

/** Where requests go. */
export interface LoadTarget {
  /** The endpoint, e.g. http://127.0.0.1:8000/v1/completions. */
  endpointUrl: string;
  api: 'completions' | 'chat';
  apiKey?: string;
}

/** One request of a run: its JSON body, and when to send it (ms from the start; open loop only). */
export interface LoadRequest {
  index: number;
  body: string;
  atMs?: number;
}

export interface LoadProgress {
  sent: number;
  done: number;
  failed: number;
  inFlight: number;
  elapsedMs: number;
}

export interface LoadOptions {
  /** Closed loop at this concurrency; absent: open loop on the requests' `atMs`. */
  concurrency?: number;
  /** Bound on one request, first byte to last. */
  timeoutMs: number;
  /** Called at most every `progressMs` while the run goes on, and once at its end. */
  onProgress?: (p: LoadProgress) => void;
  progressMs?: number;
  /** Ends the run: requests in flight are aborted and recorded as failed, no new ones are sent. */
  signal?: AbortSignal;
}

/** The text of a streamed chunk, and the usage it carries; an `error` object in the stream is thrown. */
function readChunk(api: LoadTarget['api'], data: string): { text: string; usage?: Record<string, unknown> } {
  const chunk = JSON.parse(data) as {
    choices?: { text?: string | null; delta?: { content?: string | null } }[];
    usage?: Record<string, unknown> | null;
    error?: { message?: string } | string;
  };
  if (chunk.error !== undefined)
    throw new Error(
      typeof chunk.error === 'string' ? chunk.error : (chunk.error.message ?? JSON.stringify(chunk.error)),
    );
  const choice = chunk.choices?.[0];
  const text = (api === 'chat' ? choice?.delta?.content : choice?.text) ?? '';
  return chunk.usage ? { text, usage: chunk.usage } : { text };
}

/** The error message of a refused request: OpenAI's `{error: {message}}`, else the body's start. */
async function refusal(res: Response): Promise<string> {
  const body = await res.text().catch(() => '');
  let message = body.slice(0, 200);
  try {
    const json = JSON.parse(body) as { error?: { message?: string } | string; message?: string };
    message = (typeof json.error === 'string' ? json.error : json.error?.message) ?? json.message ?? message;
  } catch {
    // not JSON: the body's start
  }
  return `HTTP ${res.status}: ${message}`;
}

/**
 * Sends one streaming request and times it against `clock` (ms). Never throws: a failure is the timing's
 * `error` (HTTP status and message, a stream error event, a timeout, a dropped connection).
 */
export async function timeRequest(
  target: LoadTarget,
  request: LoadRequest,
  scheduledMs: number | null,
  clock: () => number,
  timeoutMs: number,
  signal?: AbortSignal,
): Promise<RequestTiming> {
  const sentMs = clock();
  const timing: RequestTiming = {
    index: request.index,
    scheduledMs,
    sentMs,
    ttftMs: null,
    itlMs: [],
    e2eMs: 0,
    outputTokens: 0,
    usage: false,
    promptTokens: null,
    cachedTokens: null,
    error: null,
  };
  const timeout = AbortSignal.timeout(timeoutMs);
  const abort = signal ? AbortSignal.any([signal, timeout]) : timeout;
  let last = 0;
  let chunks = 0;
  try {
    const headers: Record<string, string> = { 'content-type': 'application/json', accept: 'text/event-stream' };
    if (target.apiKey) headers.authorization = `Bearer ${target.apiKey}`;
    const res = await fetch(target.endpointUrl, { method: 'POST', headers, body: request.body, signal: abort });
    if (!res.ok || !res.body) throw new Error(await refusal(res));
    const events = res.body.pipeThrough(new TextDecoderStream()).pipeThrough(new EventSourceParserStream());
    const reader = events.getReader();
    let finished = false;
    for (;;) {
      const { value: event, done } = await reader.read();
      if (done) break;
      if (event.data === '[DONE]') {
        finished = true;
        break;
      }
      if (event.event === 'error') throw new Error(`stream error event: ${event.data.slice(0, 200)}`);
      const { text, usage } = readChunk(target.api, event.data);
      if (text.length > 0) {
        const now = clock();
        if (timing.ttftMs === null) timing.ttftMs = now - sentMs;
        else timing.itlMs.push(now - last);
        last = now;
        chunks++;
      }
      if (usage) {
        if (typeof usage.completion_tokens === 'number') {
          timing.outputTokens = usage.completion_tokens;
          timing.usage = true;
        }
        if (typeof usage.prompt_tokens === 'number') timing.promptTokens = usage.prompt_tokens;
        const details = usage.prompt_tokens_details as { cached_tokens?: unknown } | null | undefined;
        if (typeof details?.cached_tokens === 'number') timing.cachedTokens = details.cached_tokens;
      }
    }
    await reader.cancel().catch(() => {});
    if (!finished) throw new Error('the stream ended without [DONE]');
    if (!timing.usage) timing.outputTokens = chunks;
    if (timing.ttftMs === null) throw new Error('the stream carried no text');
  } catch (error) {
    const e = error as Error;
    timing.error = timeout.aborted
      ? `timed out after ${timeoutMs} ms`
      : signal?.aborted
        ? 'aborted: the run was stopped'
        : (e.cause instanceof Error ? `${e.message}: ${e.cause.message}` : e.message) || String(error);
  }
  timing.e2eMs = clock() - sentMs;
  return timing;
}

/** Runs `requests` against `target`, open or closed loop; the timings come back in request order. */
export async function runLoad(
  target: LoadTarget,
  requests: readonly LoadRequest[],
  options: LoadOptions,
): Promise<RequestTiming[]> {
  const t0 = performance.now();
  const clock = () => performance.now() - t0;
  const timings: RequestTiming[] = new Array(requests.length);
  const progress: LoadProgress = { sent: 0, done: 0, failed: 0, inFlight: 0, elapsedMs: 0 };
  const report = () => options.onProgress?.({ ...progress, elapsedMs: clock() });
  const ticker = options.onProgress ? setInterval(report, options.progressMs ?? 250) : undefined;

  const send = async (slot: number, scheduledMs: number | null) => {
    progress.sent++;
    progress.inFlight++;
    const t = await timeRequest(target, requests[slot]!, scheduledMs, clock, options.timeoutMs, options.signal);
    timings[slot] = t;
    progress.inFlight--;
    progress.done++;
    if (t.error !== null) progress.failed++;
  };

  try {
    if (options.concurrency !== undefined) {
      let next = 0;
      const client = async () => {
        while (next < requests.length && !options.signal?.aborted) await send(next++, null);
      };
      await Promise.all(Array.from({ length: Math.min(options.concurrency, requests.length) }, client));
    } else {
      const order = requests.map((_, i) => i).sort((a, b) => (requests[a]!.atMs ?? 0) - (requests[b]!.atMs ?? 0));
      const inFlight: Promise<void>[] = [];
      for (const slot of order) {
        if (options.signal?.aborted) break;
        const at = requests[slot]!.atMs ?? 0;
        // Timers may fire a fraction of a millisecond early: never send before the schedule.
        for (let wait = at - clock(); wait > 0 && !options.signal?.aborted; wait = at - clock())
          await sleep(wait, options.signal);
        if (options.signal?.aborted) break;
        inFlight.push(send(slot, at));
      }
      await Promise.all(inFlight);
    }
  } finally {
    if (ticker) clearInterval(ticker);
  }
  report();
  // Requests a stopped run never sent are left out.
  return timings.filter((t) => t !== undefined);
}

function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    const timer = setTimeout(done, ms);
    function done() {
      clearTimeout(timer);
      signal?.removeEventListener('abort', done);
      resolve();
    }
    signal?.addEventListener('abort', done, { once: true });
  });
}

// ---- the load generator's own process ---------------------------------------------------------------------------

/** Parent to the load process. */
export type ToLoadProcess =
  | { type: 'run'; target: LoadTarget; requests: LoadRequest[]; concurrency?: number; timeoutMs: number }
  | { type: 'stop' };

/** The load process to its parent. */
export type FromLoadProcess =
  | { type: 'progress'; progress: LoadProgress }
  | { type: 'done'; timings: RequestTiming[] }
  | { type: 'failed'; message: string };

const here = dirname(fileURLToPath(import.meta.url));

/** The load process's entry: the built JS next to this file, or the TypeScript source under tsx. */
function childEntry(): { file: string; execArgv: string[] } {
  const js = join(here, 'load-child.js');
  if (existsSync(js)) return { file: js, execArgv: [] };
  return { file: join(here, 'load-child.ts'), execArgv: ['--import', 'tsx'] };
}

/**
 * The load generator in a child process, one run at a time. `dispose()` ends it; it also exits by itself when
 * this process goes away.
 */
export class LoadProcess {
  private readonly child: ChildProcess;
  private pending: { resolve: (t: RequestTiming[]) => void; reject: (e: Error) => void } | undefined;
  private onProgress: ((p: LoadProgress) => void) | undefined;
  private exited = false;

  constructor() {
    const { file, execArgv } = childEntry();
    this.child = fork(file, [], {
      execArgv,
      serialization: 'advanced',
      stdio: ['ignore', 'inherit', 'inherit', 'ipc'],
    });
    this.child.on('message', (m: FromLoadProcess) => {
      if (m.type === 'progress') this.onProgress?.(m.progress);
      else if (m.type === 'done') this.settle()?.resolve(m.timings);
      else this.settle()?.reject(new Error(`the load generator failed: ${m.message}`));
    });
    this.child.on('error', () => {}); // a send to a process that is exiting; 'exit' reports it
    this.child.on('exit', (code, signal) => {
      this.exited = true;
      this.settle()?.reject(new Error(`the load generator exited (${signal ?? `code ${code}`})`));
    });
  }

  /** Runs requests in the child; resolves with their timings in request order. */
  run(
    target: LoadTarget,
    requests: LoadRequest[],
    options: { concurrency?: number; timeoutMs: number; onProgress?: (p: LoadProgress) => void },
  ): Promise<RequestTiming[]> {
    if (this.pending) return Promise.reject(new Error('a run is already going on'));
    if (this.exited) return Promise.reject(new Error('the load generator has exited'));
    this.onProgress = options.onProgress;
    const done = new Promise<RequestTiming[]>((resolve, reject) => (this.pending = { resolve, reject }));
    const message: ToLoadProcess = { type: 'run', target, requests, timeoutMs: options.timeoutMs };
    if (options.concurrency !== undefined) message.concurrency = options.concurrency;
    this.child.send(message);
    return done;
  }

  /** Stops the run in progress: what was sent is timed (in flight: as aborted), nothing more goes. */
  stop(): void {
    if (this.pending && !this.exited) this.child.send({ type: 'stop' } satisfies ToLoadProcess);
  }

  async dispose(): Promise<void> {
    if (this.exited) return;
    const exited = new Promise<void>((resolve) => this.child.once('exit', () => resolve()));
    this.child.kill('SIGTERM');
    await exited;
  }

  private settle() {
    const p = this.pending;
    this.pending = undefined;
    this.onProgress = undefined;
    return p;
  }
}
