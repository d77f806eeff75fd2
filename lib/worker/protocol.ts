/**
 * Messages between the launcher (control plane and router) and its worker processes, over the Node IPC
 * channel of each forked worker ('advanced' serialization: typed arrays travel as they are).
 *
 * Disaggregated request (ARCHITECTURE.md, "Life of a disaggregated request"):
 *   router                decides (lib/router): the decode worker, and remote or local prefill on that worker's
 *                         uncached tokens and the prefill pool's queue (lib/router/disagg.ts's rule)
 *   router -> decode      generate { prefill: the prefill worker chosen, or null: prefill here }
 *   decode                allocates blocks for the prompt (no room, or the prefill worker unknown here: local)
 *   decode -> router      needPrefill { blockIds, cachedTokens }            (or it prefills locally)
 *   router -> prefill     prefill { target: decode worker, blockIds, cachedTokens }
 *   prefill               prefillOnly; WRITEs its blocks into the decode worker's pool; notifies it with the
 *                         first token (transfer runtime, after the data); releases its blocks (prefix cache)
 *   decode                decodeFromBlocks on the notification; streams tokens
 *   decode -> router      tokens ... (finishReason on the last)
 * A prefill that fails (worker gone, error) reaches decode as prefillFailed: it prefills locally instead.
 *
 * KV events (lib/kv/events.ts): every worker sends `kvSnapshot` once it is ready, then `kvEvents` batches numbered
 * within its incarnation, one per engine step; `kvSnapshotRequest` asks for a new snapshot (after a gap).
 */
import { deserialize, serialize } from 'node:v8';
import type { KvEventBatch, KvPoolSpec, KvSnapshot } from '../kv/index.js';
import type { FinishReason, SamplingParams, TokenLogprobs } from '../engine/engine.js';
import type { PoolRole } from '../deploy/graph.js';
import type { ControlPlaneEvent, ControlPlaneRequest, EtcdControlPlaneOptions } from '../control/index.js';
import type { EplbPolicy } from '../moe/policy.js';

/**
 * How long a worker told to stop (SIGTERM) lets its requests in flight finish before it exits anyway (those still
 * running then migrate: the frontend re-issues them elsewhere). Kubernetes' terminationGracePeriodSeconds of a
 * worker pod exceeds it (lib/deploy/k8s).
 */
export const DEFAULT_DRAIN_TIMEOUT_MS = 30_000;

export interface WorkerInit {
  /** `<pool>-<replica>`: names the process (its title, log prefix) and its registration. */
  name: string;
  pool: string;
  role: PoolRole;
  model: string;
  device: 'cpu' | 'cuda' | 'auto';
  /** The GPU of a cuda worker. */
  gpu?: number;
  /** The GPU of each tensor-parallel rank, when the pool gives a replica several (openModel's `gpus`). */
  gpus?: number[];
  /** Share of the GPU's free memory the KV pool takes (pools sharing a GPU take less each). */
  kvCacheFraction?: number;
  seed: number;
  blockSize: number;
  numBlocks?: number;
  threads?: number;
  /** Tensor / pipeline / expert parallel ranks of the worker's engine (the pool's; default 1). */
  tensorParallelSize?: number;
  pipelineParallelSize?: number;
  expertParallelSize?: number;
  /** Online expert load balancing of the worker's CPU engine (the pool's `eplb`); absent: the static placement. */
  eplb?: EplbPolicy;
  maxBatchTokens?: number;
  maxSequences?: number;
  heartbeatMs: number;
  /** How long a decode worker waits for a remote prefill before serving the request itself (REMOTE_PREFILL_TIMEOUT_MS). */
  remotePrefillTimeoutMs?: number;
  /** The transfer backend of its KV writes, when forced (`tcp` between hosts on one machine); default: the agent's pick. */
  kvBackend?: 'shm' | 'tcp' | 'ucx';
  /**
   * On SIGTERM the worker drains: it reports `draining` (routers choose it no more), lets its requests in flight
   * finish for up to this long, then exits; those still running then migrate. Default DEFAULT_DRAIN_TIMEOUT_MS.
   */
  drainTimeoutMs?: number;
  /**
   * etcd, when the deployment's control plane is there (`serve --control etcd://`): the worker registers itself in
   * etcd under its own lease and watches it for its peers. Absent: it does both through the launcher's embedded
   * control plane over the IPC channel (lib/control/ipc.ts).
   */
  control?: EtcdControlPlaneOptions;
}

/** What a worker tells the control plane about itself when it registers. */
export interface WorkerRegistration {
  name: string;
  role: PoolRole;
  pid: number;
  /** Its transfer agent's name and metadata blob (for peers' loadRemote). */
  agentName: string;
  agentMetadata: Uint8Array;
  /** Its KV pool (region id in its agent, and layout as lib/kv describes it). */
  kvRegion: number;
  kvPool: KvPoolSpec;
  /**
   * A GPU worker's tensor-parallel ranks each keep their own pool: each rank's region and pool (lib/kv's rank pool),
   * rank 0 first (kvRegion and kvPool are rank 0's). Absent: one pool of every head (kvRegion, kvPool).
   */
  kvRanks?: { region: number; pool: KvPoolSpec }[];
  device: 'cpu' | 'cuda';
  numBlocks: number;
  /** Its pool in the graph (a joined worker's; the launcher knows its own workers' pools). */
  pool?: string;
  /** Where frontends reach it over TCP (lib/worker/request-plane.ts): a joined worker; absent under a launcher (IPC). */
  requestPlane?: { host: string; port: number };
}

export interface WorkerLoad {
  running: number;
  waiting: number;
  freeBlocks: number;
  /** Prefill requests in progress (prefill workers). */
  prefilling: number;
  /** The worker is draining (SIGTERM, or the planner's drain): routers send it nothing new. */
  draining?: boolean;
}

/**
 * A mixture-of-experts worker's expert load, with its heartbeat (bounded: one number per layer, none per expert).
 * `imbalance[layer]`: max / mean tokens per expert over the worker's window (EXPERT_LOAD_WINDOW_HEARTBEATS
 * heartbeats; 1 when nothing was routed); `tokensRouted`: expert assignments since the worker started, a token
 * counting once per MoE layer and expert it is routed to (top-k per layer).
 */
export interface ExpertLoadReport {
  imbalance: number[];
  tokensRouted: number;
  /** With the pool's `eplb`: the balancer's decisions since the worker started, and the placements it applied. */
  eplb?: { decisions: number; applied: number };
}

export type ToWorker =
  | { type: 'init'; init: WorkerInit }
  /** The launcher's embedded control plane, relayed to the worker's IpcControlPlane (its peers come from here). */
  | { type: 'control'; event: ControlPlaneEvent }
  | {
      type: 'generate';
      requestId: string;
      promptIds: number[];
      sampling: SamplingParams;
      /** The router's decision: the prefill worker that computes the prompt; null: prefill here. */
      prefill: { worker: string } | null;
      /**
       * Request migration: output another worker had streamed before it died. The worker prefills prompt and
       * output itself (no remote prefill: the router decides local prefill for it) and continues after them
       * (the engine's ResumeState).
       */
      resume?: { outputTokenIds: number[] };
    }
  | {
      type: 'prefill';
      requestId: string;
      promptIds: number[];
      sampling: SamplingParams;
      target: { worker: string; blockIds: number[]; cachedTokens: number };
    }
  | { type: 'prefillFailed'; requestId: string; reason: string }
  | { type: 'abort'; requestId: string }
  | { type: 'kvSnapshotRequest' }
  /**
   * The planner moves this worker (lib/planner/connectors/local.ts): no new work reaches it (the launcher's
   * routers no longer see it); it answers `drained` once nothing is in flight here. While draining, a remote
   * prefill asked of it is refused (its decode worker prefills locally).
   */
  | { type: 'drain' }
  /** A drain given up (the planner's move did not happen): the worker takes remote prefills again. */
  | { type: 'undrain' }
  /**
   * After a drain: serve as `role` from now on, with the same engine, weights, KV pool and transfer agent; the
   * worker registers again (`ready`, then a KV snapshot), which re-announces it to its peers and routers.
   */
  | { type: 'setRole'; role: PoolRole }
  | { type: 'shutdown' };

export type FromWorker =
  /** The worker is registered (through its control plane) and serves. */
  | { type: 'ready'; registration: WorkerRegistration }
  /** To the launcher's embedded control plane, from the worker's IpcControlPlane. */
  | { type: 'control'; request: ControlPlaneRequest }
  | { type: 'heartbeat'; name: string; load: WorkerLoad; expertLoad?: ExpertLoadReport }
  /** Answer to `drain`: no request is in flight here. */
  | { type: 'drained'; name: string }
  | {
      type: 'tokens';
      requestId: string;
      tokenIds: number[];
      logprobs?: TokenLogprobs[];
      finishReason: FinishReason | null;
      /** On the first message: prompt tokens served from a prefix cache (the prefill worker's, when remote). */
      cachedTokens?: number;
    }
  | { type: 'failed'; requestId: string; code: string; message: string }
  | { type: 'kvEvents'; batch: KvEventBatch }
  | { type: 'kvSnapshot'; snapshot: KvSnapshot }
  | {
      type: 'needPrefill';
      requestId: string;
      promptIds: number[];
      sampling: SamplingParams;
      prefillWorker: string;
      blockIds: number[];
      cachedTokens: number;
    }
  /** ms: the whole remote prefill (compute and transfer); transferMs: the KV write and its notification. */
  | {
      type: 'prefillDone';
      requestId: string;
      ok: boolean;
      bytes: number;
      ms: number;
      transferMs?: number;
      error?: string;
    }
  | { type: 'localPrefill'; requestId: string }
  /** The decode worker served the request itself (its remote prefill timed out): the prefill worker may stop. */
  | { type: 'abandonPrefill'; requestId: string }
  /** The worker could not start (its model, device or KV pool); `code` is the error's (TANDEM_BAD_MODEL, ...). */
  | { type: 'fatal'; code: string; message: string };

/** The notification a prefill worker sends with its KV WRITE (encodePrefillNotice). */
export interface PrefillNotice {
  requestId: string;
  firstToken: number;
  /** Prompt tokens the prefill worker took from its prefix cache. */
  cachedTokens?: number;
  logprobs?: TokenLogprobs;
}

/**
 * A PrefillNotice as bytes, in the structured-clone format the IPC channel uses too: the first token's
 * logprobs keep their typed arrays (topTokenIds, topLogprobs) and non-finite values, which JSON would turn
 * into plain objects and nulls.
 */
export function encodePrefillNotice(notice: PrefillNotice): Uint8Array {
  return serialize(notice);
}

/** The notice encodePrefillNotice wrote; throws on anything else. */
export function decodePrefillNotice(bytes: Uint8Array): PrefillNotice {
  const n = deserialize(bytes) as Partial<PrefillNotice> | null;
  if (!n || typeof n.requestId !== 'string' || typeof n.firstToken !== 'number')
    throw new TypeError('not a prefill notice');
  const lp = n.logprobs;
  if (lp !== undefined && !(lp.topTokenIds instanceof Int32Array && lp.topLogprobs instanceof Float32Array))
    throw new TypeError(`prefill notice of ${n.requestId}: logprobs without typed top alternatives`);
  return n as PrefillNotice;
}
