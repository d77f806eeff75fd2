import OpenAI, { APIError } from 'openai';
import { expect, vi } from 'vitest';
import { defaultGraph, type DeploymentGraph } from '../../lib/deploy/graph.js';
import type { Deployment } from '../../lib/deploy/launcher.js';

/**
 * A CPU deployment of one prefill and two decode workers with small engines, for the planner's end-to-end tests:
 * every prompt goes to the prefill pool (so that prefill workers are exercised), and no request migration (a
 * request cut by a move would fail there rather than be re-issued elsewhere).
 */
export function plannerTestGraph(): DeploymentGraph {
  const g = defaultGraph({ gpus: 0, port: 0 });
  g.pools.find((p) => p.role === 'decode')!.replicas = 2;
  g.disaggregation = { ...g.disaggregation, minRemotePrefillTokens: 1 };
  g.frontend.migrationLimit = 0;
  for (const p of g.pools) p.engine = { ...p.engine, numBlocks: 256, threads: 1 };
  return g;
}

/** One sample of a Prometheus text exposition, by its name and labels as printed, or their start (NaN when absent). */
export function sample(text: string, name: string): number {
  const line = text.split('\n').find((l) => l.startsWith(name));
  return line ? Number(line.split(' ').pop()) : NaN;
}

/** One sample of a deployment's /metrics, as `sample` finds it. */
export async function metric(d: Deployment, name: string): Promise<number> {
  return sample(await (await fetch(`${d.frontend.url}/metrics`)).text(), name);
}

/** Remote and local prefills counted so far. */
export async function prefillCounts(d: Deployment): Promise<{ remote: number; local: number }> {
  return {
    remote: await metric(d, 'tandem_prefills_total{where="remote"}'),
    local: await metric(d, 'tandem_prefills_total{where="local"}'),
  };
}

/** What a streamed completion gave: its text, its usage and finish reason, or the error event that ended it. */
export interface StreamOutcome {
  text: string;
  completionTokens?: number;
  promptTokens?: number;
  finishReason?: string | null;
  error?: APIError;
}

/**
 * Opens a streamed completion with usage in its last chunk. `params`: OpenAI's parameters, and vLLM's
 * (ignore_eos, min_tokens) that the frontend takes too.
 */
export async function openCompletionStream(client: OpenAI, params: Record<string, unknown>) {
  return client.completions.create({
    ...params,
    stream: true,
    stream_options: { include_usage: true },
  } as OpenAI.CompletionCreateParamsStreaming);
}

/**
 * Reads a streamed completion to its end; after its first chunk, calls `onFirstChunk` (which kills workers) and
 * waits for it before reading on. An error event is the outcome's `error`.
 */
export async function streamCompletion(
  client: OpenAI,
  params: Record<string, unknown>,
  onFirstChunk?: () => Promise<void>,
): Promise<StreamOutcome> {
  const out: StreamOutcome = { text: '' };
  const s = await openCompletionStream(client, params);
  let chunks = 0;
  try {
    for await (const chunk of s) {
      const c = chunk.choices[0];
      if (c) {
        out.text += c.text;
        if (c.finish_reason) out.finishReason = c.finish_reason;
      }
      if (chunk.usage) {
        out.completionTokens = chunk.usage.completion_tokens;
        out.promptTokens = chunk.usage.prompt_tokens;
      }
      if (++chunks === 1 && onFirstChunk) await onFirstChunk();
    }
  } catch (error) {
    if (!(error instanceof APIError)) throw error;
    out.error = error;
  }
  return out;
}

type Wait = { timeout: number; interval: number };

/** The serving worker (decode or aggregated) running a request now, from the workers' heartbeats. */
export async function busyWorker(d: Deployment, wait: Wait): Promise<string> {
  let name: string | undefined;
  await vi.waitFor(() => {
    name = d.controlPlane.workers().find((w) => w.registration.role !== 'prefill' && w.load.running > 0)
      ?.registration.name;
    expect(name).toBeDefined();
  }, wait);
  return name!;
}

/** SIGKILL on the pid of the worker running the request; resolves once the launcher has seen it go. */
export async function killBusyWorker(d: Deployment, wait: Wait): Promise<string> {
  const name = await busyWorker(d, wait);
  const pid = d.pids()[name]!;
  process.kill(pid, 'SIGKILL');
  await vi.waitFor(() => expect(d.controlPlane.get(name)?.registration.pid).not.toBe(pid), wait);
  return name;
}

/** Waits until no worker reports a request running (so that a later report of one is about the next request). */
export async function waitIdle(d: Deployment, wait: Wait): Promise<void> {
  await vi.waitFor(() => expect(d.controlPlane.workers().every((w) => w.load.running === 0)).toBe(true), wait);
}
