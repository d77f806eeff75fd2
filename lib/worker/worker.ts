/**
 * A worker process: one engine (prefill, decode or aggregated role) with its KV pool in shared memory
 * registered with a transfer agent, driven by the launcher over the IPC channel (lib/worker/protocol.ts).
 * Started by the launcher with `fork()`; `runWorker()` is its main.
 *
 * Its three planes: the control plane (a `ControlPlane`: the launcher's embedded one over IPC, or etcd), where it
 * registers itself and learns its KV-transfer peers from the joins and leaves; the request plane (requests in,
 * their tokens out) and the event plane (its load and KV events out, to every router), both on the IPC channel
 * under a launcher and on TCP connections from the frontends when joined (worker-join.ts).
 */
import { KvEventPublisher, kvPool, kvRankTransferPieces, type KvPoolSpec } from '../kv/index.js';
import { KvCacheFullError, TandemError } from '../errors.js';
import type { EngineOutput, RequestHandle, SamplingParams } from '../engine/engine.js';
import { CudaModelRunner } from '../engine/cuda.js';
import { warmUpRunner } from '../engine/runner.js';
import { openModel, type OpenedModel } from '../engine/open.js';
import { TransferAgent, type AgentOptions, type Region } from '../transfer/index.js';
import { ExpertLoadWindow, imbalance, type ExpertBalancer } from '../moe/index.js';
import { EtcdControlPlane, IpcControlPlane, type ControlPlane, type LiveWorker } from '../control/index.js';
import {
  DEFAULT_DRAIN_TIMEOUT_MS,
  decodePrefillNotice,
  encodePrefillNotice,
  type ExpertLoadReport,
  type FromWorker,
  type PrefillNotice,
  type ToWorker,
  type WorkerInit,
  type WorkerRegistration,
} from './protocol.js';

/** A decode worker waits this long for a remote prefill before computing the prompt itself. */
export const REMOTE_PREFILL_TIMEOUT_MS = 30_000;

/** The sliding window of a MoE worker's expert load (`tandem_moe_expert_imbalance`): its last this many heartbeats. */
export const EXPERT_LOAD_WINDOW_HEARTBEATS = 60;

/** How often a draining worker looks whether its last request has ended. */
const DRAIN_POLL_MS = 20;

/** How long a worker whose launcher is gone (or that was told to stop) waits for its engine to dispose. */
const EXIT_GRACE_MS = 5_000;

function send(message: FromWorker): void {
  process.send?.(message);
}

/** The code a request's failure travels with (the frontend maps TANDEM_BAD_ARGUMENT and the like to 400). */
function errorCode(error: unknown): string {
  return error instanceof TandemError ? error.code : 'TANDEM_INTERNAL';
}

function errorMessage(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}

/**
 * A request whose prompt a prefill worker computes into `blockIds` of this worker's pool. Those blocks stay
 * reserved until that worker is done with them: its KV and notification have landed (onNotice), or the router
 * says it is done without them (prefillFailed: it failed, stopped when told to, or is gone; relayed also after
 * the request has ended). Released earlier, a late WRITE would land in blocks another request holds by then.
 */
interface PendingRemote {
  promptIds: number[];
  sampling: SamplingParams;
  blockIds: Int32Array;
  timer: NodeJS.Timeout;
  /** The client went away: nothing is served when the prefill answers. */
  aborted: boolean;
  /** Served here instead (the remote prefill timed out): the answer only gives the blocks back. */
  abandoned: boolean;
}

export class Worker {
  private readonly handles = new Map<string, RequestHandle>();
  private readonly remote = new Map<string, PendingRemote>();
  private readonly prefilling = new Set<string>();
  private readonly peers = new Map<string, WorkerRegistration>();
  private heartbeat?: NodeJS.Timeout;
  /** The role served now: the init's, until the planner switches it (setRole). */
  private role: WorkerInit['role'];
  /** From `drain` to `setRole` or `undrain` (or the end): remote prefills are refused. */
  private draining = false;
  /** Draining to exit (SIGTERM): neither `undrain` nor `setRole` ends it. */
  private exiting = false;
  /** While draining and not yet idle: polls until nothing is in flight, then answers `drained`. */
  private drainPoll?: NodeJS.Timeout;
  /** The engine's KV events, batched per engine step and numbered, to the routers (lib/kv/events.ts). */
  private readonly kvEvents: KvEventPublisher;
  private readonly stopKvEvents: () => void;
  private readonly stopWatchingPeers: () => void;

  constructor(
    /** Where the worker's messages go: the launcher (IPC), or the request plane's connections (TCP). */
    private readonly deliver: (message: FromWorker) => void,
    private readonly init: WorkerInit,
    private readonly model: OpenedModel,
    private readonly agent: TransferAgent,
    private readonly kvRegion: Region,
    /** Where it registers itself and learns its peers (every other worker registered there). */
    private readonly controlPlane: ControlPlane,
    /** The region of each rank pool (model.kvRankPoolSpecs), rank 0 first: several for GPU tensor-parallel ranks. */
    private readonly kvRankRegions: readonly Region[] = [kvRegion],
  ) {
    this.role = init.role;
    this.kvEvents = new KvEventPublisher((batch) => this.out({ type: 'kvEvents', batch }));
    agent.on('notification', (_from, message) => this.onNotice(message));
    this.stopKvEvents = model.engine.onKvEvent((event) => this.kvEvents.add(event));
    const added = (w: LiveWorker) => this.peerJoined(w.registration);
    const removed = (name: string, reason: string) => this.peerLeft(name, reason);
    controlPlane.on('added', added).on('removed', removed);
    this.stopWatchingPeers = () => controlPlane.off('added', added).off('removed', removed);
    for (const w of controlPlane.workers()) this.peerJoined(w.registration);
    this.heartbeat = setInterval(() => this.sendHeartbeat(), init.heartbeatMs);
    this.heartbeat.unref();
  }

  private sendHeartbeat(): void {
    const s = this.model.engine.stats();
    const expertLoad = this.expertLoad();
    this.out({
      type: 'heartbeat',
      name: this.init.name,
      load: {
        running: s.running,
        waiting: s.waiting,
        freeBlocks: s.numBlocks - s.usedBlocks,
        prefilling: this.prefilling.size,
        // Only a drain to exit is reported: a planner's drain is the launcher's own (its routing view leaves the
        // worker out and takes it back at undrain at once; a reported flag would keep it out until the next beat).
        ...(this.exiting ? { draining: true } : {}),
      },
      ...(expertLoad ? { expertLoad } : {}),
    });
  }

  /**
   * A worker joined the control plane: its transfer agent is loaded, so that prefill can write KV into its pool.
   * A prefill worker opens the transfer path now rather than on the first request (CUDA IPC mappings cost tens of
   * milliseconds); a failure shows again, with the same error, on the transfer that needs the peer, where the
   * request falls back to a local prefill. TANDEM_WARMUP=0 turns the warm-up off (to measure a cold first transfer).
   */
  private peerJoined(peer: WorkerRegistration): void {
    if (peer.name === this.init.name || this.disposed) return;
    try {
      this.agent.loadRemote(peer.agentMetadata);
    } catch (error) {
      process.stderr.write(
        `tandem worker ${this.init.name}: peer ${peer.name}'s transfer agent does not load: ${errorMessage(error)}\n`,
      );
      return;
    }
    this.peers.set(peer.name, peer);
    process.stderr.write(`tandem worker ${this.init.name}: peer ${peer.name} (${peer.role}) joined\n`);
    if (this.role === 'prefill' && process.env.TANDEM_WARMUP !== '0') {
      this.agent.warmup(peer.agentName).catch((error: Error) => {
        process.stderr.write(
          `tandem worker ${this.init.name}: warm-up of transfers to ${peer.agentName} failed: ${error.message}\n`,
        );
      });
    }
  }

  /** A worker left the control plane: its agent is forgotten too, which closes our mappings of its memory. */
  private peerLeft(name: string, reason: string): void {
    const gone = this.peers.get(name);
    if (!gone || this.disposed) return;
    this.peers.delete(name);
    this.agent.removeRemote(gone.agentName);
    process.stderr.write(`tandem worker ${this.init.name}: peer ${name} left (${reason})\n`);
  }

  /** Registers this worker (its current role) in the control plane; resolves once the plane shows it. */
  async register(): Promise<void> {
    await this.controlPlane.register(this.registration());
  }

  /** MoE models: tokens per layer and expert over the last heartbeats (one window step per heartbeat). */
  private expertWindow?: ExpertLoadWindow;
  private tokensRouted = 0;

  /**
   * The expert load since the last heartbeat, recorded as one step of the window, and the report it gives;
   * undefined for a dense model (or a runner that does not count expert load).
   */
  private expertLoad(): ExpertLoadReport | undefined {
    const numExperts = this.model.config.moe?.numExperts;
    const runner = this.model.runner as Partial<{ takeExpertLoad(): Float64Array }>;
    if (!numExperts || typeof runner.takeExpertLoad !== 'function') return undefined;
    const load = runner.takeExpertLoad();
    if (load.length === 0 || load.length % numExperts !== 0) return undefined;
    this.expertWindow ??= new ExpertLoadWindow(load.length / numExperts, numExperts, EXPERT_LOAD_WINDOW_HEARTBEATS);
    this.expertWindow.record(load);
    for (const v of load) this.tokensRouted += v;
    const balancer = (runner as Partial<{ expertBalancer: ExpertBalancer }>).expertBalancer;
    return {
      imbalance: this.expertWindow.totals().map((perExpert) => imbalance(perExpert)),
      tokensRouted: this.tokensRouted,
      ...(balancer && {
        eplb: { decisions: balancer.decisionCount, applied: balancer.appliedCount },
      }),
    };
  }

  /**
   * The worker is to stop (SIGTERM): it reports `draining` at once (routers choose it no more), and resolves once
   * nothing is in flight here (true) or after `timeoutMs` (false: the caller exits anyway, and the requests still
   * running migrate when the frontend sees this worker go).
   */
  drainForExit(timeoutMs = this.init.drainTimeoutMs ?? DEFAULT_DRAIN_TIMEOUT_MS): Promise<boolean> {
    this.drain();
    this.exiting = true;
    this.sendHeartbeat();
    return new Promise((resolve) => {
      const poll = setInterval(() => {
        if (!this.idle()) return;
        finish(true);
      }, DRAIN_POLL_MS);
      const timer = setTimeout(() => finish(false), timeoutMs);
      const finish = (drained: boolean) => {
        clearInterval(poll);
        clearTimeout(timer);
        resolve(drained);
      };
      if (this.idle()) finish(true);
    });
  }

  /** Requests in flight here (streams, remote prefills lent or served). */
  get inFlight(): number {
    return new Set([...this.handles.keys(), ...this.remote.keys(), ...this.prefilling]).size;
  }

  /**
   * Set by dispose(): nothing more is said. Requests still in flight then end as the worker's death (the frontend
   * sees the process exit or the connection close) and migrate, rather than fail with the engine's disposal.
   */
  private disposed = false;

  private out(message: FromWorker): void {
    if (!this.disposed) this.deliver(message);
  }

  /** What a router's index starts from: every block this worker holds, numbered (sent at registration and on request). */
  sendKvSnapshot(to: (message: FromWorker) => void = (m) => this.out(m)): void {
    to({ type: 'kvSnapshot', snapshot: this.kvEvents.snapshot() });
  }

  /** Set by a joined worker: what its registration adds (its pool, and where frontends reach it). */
  registrationExtras: Pick<WorkerRegistration, 'pool' | 'requestPlane'> = {};

  registration(): WorkerRegistration {
    return {
      ...this.registrationExtras,
      name: this.init.name,
      role: this.role,
      pid: process.pid,
      agentName: this.agent.name,
      agentMetadata: this.agent.metadata(),
      kvRegion: this.kvRegion.id,
      kvPool: this.model.kvPoolSpec,
      ...(this.kvRankRegions.length > 1
        ? {
            kvRanks: this.kvRankRegions.map((r, i) => ({ region: r.id, pool: this.model.kvRankPoolSpecs[i]! })),
          }
        : {}),
      device: this.model.device,
      numBlocks: this.model.runner.numBlocks,
    };
  }

  /**
   * Every message from the launcher goes through here. Whatever a request makes the engine throw (a token id
   * outside the vocabulary, a prompt too long, bad sampling) is answered as that request's error, and the
   * worker goes on serving every other request: a request never takes a worker down.
   */
  handle(message: ToWorker): void {
    try {
      this.dispatch(message);
    } catch (error) {
      // A prefill that cannot start is answered as failed, so that its decode worker serves the request itself.
      if (message.type === 'prefill') this.prefillFailed(message.requestId, errorMessage(error));
      else this.requestFailed('requestId' in message ? message.requestId : undefined, message.type, error);
    }
  }

  /**
   * A request failed before it had a stream, and the router hears of it (`failed`). A remote prefill still pending for it is
   * abandoned: its prefill worker is asked to stop, and its blocks wait for that worker's answer.
   */
  private requestFailed(requestId: string | undefined, what: string, error: unknown): void {
    if (requestId === undefined) {
      process.stderr.write(`tandem worker ${this.init.name}: ${what} failed: ${errorMessage(error)}\n`);
      return;
    }
    const p = this.remote.get(requestId);
    if (p && !p.abandoned) {
      clearTimeout(p.timer);
      p.abandoned = true;
      this.out({ type: 'abandonPrefill', requestId });
    }
    this.out({ type: 'failed', requestId, code: errorCode(error), message: errorMessage(error) });
  }

  /** A prefill this worker will not do: its decode worker hears so and serves the request itself. */
  private prefillFailed(requestId: string, error: string): void {
    this.out({ type: 'prefillDone', requestId, ok: false, bytes: 0, ms: 0, error });
  }

  private dispatch(message: ToWorker): void {
    switch (message.type) {
      case 'generate':
        this.generate(message);
        return;
      case 'prefill':
        if (this.draining) {
          this.prefillFailed(message.requestId, `prefill worker ${this.init.name} is draining`);
          return;
        }
        // A prefill that throws before its own handling (a malformed message) is answered as failed, like one
        // that cannot start: nothing of it may reject unhandled, which would end this process.
        this.prefill(message).catch((error: unknown) => this.prefillFailed(message.requestId, errorMessage(error)));
        return;
      case 'drain':
        this.drain();
        return;
      case 'setRole':
        this.setRole(message.role);
        return;
      case 'undrain':
        this.endDrain();
        return;
      case 'prefillFailed': {
        // The prefill worker is done with this request's blocks, having written nothing we wait for.
        const p = this.remote.get(message.requestId);
        if (!p) return;
        this.prefillEnded(message.requestId, p);
        if (p.abandoned) return; // already served here
        if (p.aborted) return this.finishAborted(message.requestId);
        this.out({ type: 'localPrefill', requestId: message.requestId });
        this.stream(message.requestId, this.model.engine.addRequest(this.request(message.requestId, p)));
        return;
      }
      case 'abort':
        this.abort(message.requestId);
        return;
      case 'kvSnapshotRequest':
        this.sendKvSnapshot();
        return;
      case 'init':
      case 'control': // the process's control plane takes these (runWorker)
      case 'shutdown':
        return;
    }
  }

  private idle(): boolean {
    return this.handles.size === 0 && this.remote.size === 0 && this.prefilling.size === 0;
  }

  /** Answers `drained` once nothing is in flight (requests that arrive meanwhile are served, then counted). */
  private drain(): void {
    if (this.draining) return;
    this.draining = true;
    const check = () => {
      if (!this.idle()) return;
      clearInterval(this.drainPoll);
      this.drainPoll = undefined;
      this.out({ type: 'drained', name: this.init.name });
    };
    this.drainPoll = setInterval(check, DRAIN_POLL_MS);
    check();
  }

  /**
   * Changes role in place: the engine, its weights and KV pool (prefix cache included) and the transfer agent
   * stay. Registering again makes the control plane drop the old registration (routers forget this worker's
   * blocks, peers its agent) and add the new one (peers load the same agent again; routers read the snapshot).
   */
  private setRole(role: WorkerInit['role']): void {
    this.endDrain();
    this.role = role;
    this.register().then(
      () => {
        this.out({ type: 'ready', registration: this.registration() });
        this.sendKvSnapshot();
      },
      (error: unknown) =>
        process.stderr.write(
          `tandem worker ${this.init.name}: registration as ${role} failed: ${errorMessage(error)}\n`,
        ),
    );
  }

  private endDrain(): void {
    if (this.exiting) return;
    this.draining = false;
    clearInterval(this.drainPoll);
    this.drainPoll = undefined;
  }

  /** The prefill worker is done with `p`'s blocks: they come back to the pool. */
  private prefillEnded(requestId: string, p: PendingRemote): void {
    this.remote.delete(requestId);
    clearTimeout(p.timer);
    this.model.engine.releaseBlocks(p.blockIds);
  }

  /**
   * The remote prefill did not answer in time: this worker serves the request itself (new blocks), asks the
   * prefill worker to stop, and keeps the blocks it lent until that worker answers or leaves.
   */
  private remotePrefillTimedOut(requestId: string): void {
    const p = this.remote.get(requestId);
    if (!p || p.abandoned) return;
    p.abandoned = true;
    this.out({ type: 'abandonPrefill', requestId });
    if (p.aborted) return this.finishAborted(requestId);
    this.out({ type: 'localPrefill', requestId });
    this.stream(requestId, this.model.engine.addRequest(this.request(requestId, p)));
  }

  private request(
    requestId: string,
    r: { promptIds: number[]; sampling: SamplingParams; resume?: { outputTokenIds: number[] } },
  ) {
    return { requestId, promptTokenIds: r.promptIds, sampling: r.sampling, ...(r.resume ? { resume: r.resume } : {}) };
  }

  private generate(m: Extract<ToWorker, { type: 'generate' }>): void {
    const engine = this.model.engine;
    // A migrated request (resume) is prefilled here: its prompt and resumed output, in one engine request.
    if (m.prefill && !m.resume && this.peers.has(m.prefill.worker)) {
      let alloc: { blockIds: Int32Array; cachedTokens: number } | undefined;
      try {
        alloc = engine.allocateBlocks(m.promptIds);
      } catch (error) {
        // No room now: the local path queues the request instead. Anything else is the request's own error.
        if (!(error instanceof KvCacheFullError)) throw error;
        alloc = undefined;
      }
      // The router decided on remote prefill (lib/router); this worker only lends the blocks.
      if (alloc) {
        const timer = setTimeout(() => {
          try {
            this.remotePrefillTimedOut(m.requestId);
          } catch (error) {
            this.requestFailed(m.requestId, 'generate', error);
          }
        }, this.init.remotePrefillTimeoutMs ?? REMOTE_PREFILL_TIMEOUT_MS);
        timer.unref();
        this.remote.set(m.requestId, {
          promptIds: m.promptIds,
          sampling: m.sampling,
          blockIds: alloc.blockIds,
          timer,
          aborted: false,
          abandoned: false,
        });
        this.out({
          type: 'needPrefill',
          requestId: m.requestId,
          promptIds: m.promptIds,
          sampling: m.sampling,
          prefillWorker: m.prefill.worker,
          blockIds: [...alloc.blockIds],
          cachedTokens: alloc.cachedTokens,
        });
        return;
      }
    }
    this.out({ type: 'localPrefill', requestId: m.requestId });
    this.stream(m.requestId, engine.addRequest(this.request(m.requestId, m)));
  }

  /** The prefill worker's KV of this request has landed here (the notification follows the data). */
  private onNotice(message: Buffer): void {
    let notice: PrefillNotice;
    try {
      notice = decodePrefillNotice(message);
    } catch (error) {
      process.stderr.write(`tandem worker ${this.init.name}: unreadable prefill notice: ${errorMessage(error)}\n`);
      return;
    }
    const p = this.remote.get(notice.requestId);
    if (!p) return;
    clearTimeout(p.timer);
    if (p.abandoned) return this.prefillEnded(notice.requestId, p); // served here meanwhile
    if (p.aborted) {
      this.prefillEnded(notice.requestId, p);
      return this.finishAborted(notice.requestId);
    }
    let handle: RequestHandle;
    try {
      handle = this.model.engine.decodeFromBlocks(
        this.request(notice.requestId, p),
        p.blockIds,
        notice.firstToken,
        notice.logprobs,
      );
    } catch (error) {
      this.prefillEnded(notice.requestId, p); // the prefill worker is done with them: its data has landed
      return this.requestFailed(notice.requestId, 'decode', error);
    }
    // From here the engine owns the blocks.
    this.remote.delete(notice.requestId);
    this.stream(notice.requestId, handle, notice.cachedTokens ?? 0);
  }

  /**
   * Relays a request's outputs. `cachedTokens`: the prompt tokens served from a prefix cache, when the prompt was
   * computed elsewhere (remote prefill); else the engine's own count, which comes with the first output.
   */
  private stream(requestId: string, handle: RequestHandle, cachedTokens?: number): void {
    this.handles.set(requestId, handle);
    void (async () => {
      try {
        for await (const out of handle as AsyncIterable<EngineOutput>) {
          const cached = out.cachedPromptTokens === undefined ? undefined : (cachedTokens ?? out.cachedPromptTokens);
          // The blocks a finished request leaves in the prefix cache reach the router before its end does: a
          // client's next request is routed knowing them.
          if (out.finishReason) this.kvEvents.flush();
          this.out({
            type: 'tokens',
            requestId,
            tokenIds: out.tokenIds,
            ...(out.logprobs ? { logprobs: out.logprobs } : {}),
            finishReason: out.finishReason,
            ...(cached !== undefined ? { cachedTokens: cached } : {}),
          });
        }
      } catch (error) {
        this.out({ type: 'failed', requestId, code: errorCode(error), message: errorMessage(error) });
      } finally {
        this.handles.delete(requestId);
      }
    })();
  }

  private finishAborted(requestId: string): void {
    this.out({ type: 'tokens', requestId, tokenIds: [], finishReason: 'abort' });
  }

  /**
   * A frontend is gone (its request-plane connection closed): every request whose id starts with `prefix` (that
   * frontend's) is aborted, and its blocks freed as on an abort.
   */
  abortAll(prefix: string): void {
    const ids = new Set([...this.handles.keys(), ...this.remote.keys(), ...this.prefilling]);
    for (const id of ids) if (id.startsWith(prefix)) this.abort(id);
  }

  private abort(requestId: string): void {
    this.handles.get(requestId)?.abort();
    const p = this.remote.get(requestId);
    if (p) p.aborted = true; // its blocks are released when the prefill answers (it may still be writing them)
    if (this.prefilling.has(requestId)) this.model.engine.abort(requestId);
  }

  private async prefill(m: Extract<ToWorker, { type: 'prefill' }>): Promise<void> {
    const t0 = performance.now();
    const target = this.peers.get(m.target.worker);
    const fail = (error: string) =>
      this.out({
        type: 'prefillDone',
        requestId: m.requestId,
        ok: false,
        bytes: 0,
        ms: performance.now() - t0,
        error,
      });
    if (!target) return fail(`decode worker ${m.target.worker} is not known here`);
    this.prefilling.add(m.requestId);
    let blocks: Int32Array | undefined;
    try {
      const result = await this.model.engine.prefillOnly(this.request(m.requestId, m));
      blocks = result.blockIds;
      // Blocks the decode worker already holds (its prefix cache) are not sent again.
      const blockSize = this.model.runner.blockSize;
      const skip = Math.floor(m.target.cachedTokens / blockSize);
      const count = Math.ceil(m.promptIds.length / blockSize);
      const notice: PrefillNotice = {
        requestId: m.requestId,
        firstToken: result.firstToken,
        cachedTokens: result.cachedTokens,
        ...(result.logprobs ? { logprobs: result.logprobs } : {}),
      };
      let bytes = 0;
      const sent = performance.now(); // the KV transfer (and its notification) starts here
      if (count > skip) {
        // Head slices from each of this engine's rank pools into each of the target's (one each but for GPU TP).
        const targetRanks = target.kvRanks ?? [{ region: target.kvRegion, pool: target.kvPool }];
        const pieces = kvRankTransferPieces(
          this.model.kvRankPoolSpecs,
          targetRanks.map((r) => r.pool),
          Uint32Array.from(result.blockIds.subarray(skip, count)),
          Uint32Array.from(m.target.blockIds.slice(skip, count)),
        );
        bytes = pieces.bytes;
        const plan = this.agent.prepare({
          op: 'WRITE',
          peer: target.agentName,
          local: this.kvRankRegions,
          remote: targetRanks.map((r) => r.region),
          pieces,
          ...(this.init.kvBackend ? { backend: this.init.kvBackend } : {}),
        });
        await plan.post({ notify: encodePrefillNotice(notice) });
      } else {
        await this.agent.notify(target.agentName, encodePrefillNotice(notice));
      }
      const now = performance.now();
      this.out({
        type: 'prefillDone',
        requestId: m.requestId,
        ok: true,
        bytes,
        ms: now - t0,
        transferMs: now - sent,
      });
    } catch (error) {
      fail(errorMessage(error));
    } finally {
      this.prefilling.delete(m.requestId);
      // They stay as prefix cache where there is room.
      if (blocks) this.model.engine.releaseBlocks(blocks);
    }
  }

  /** The role served now. */
  get currentRole(): WorkerInit['role'] {
    return this.role;
  }

  async dispose(): Promise<void> {
    this.disposed = true;
    this.stopWatchingPeers();
    clearInterval(this.heartbeat);
    clearInterval(this.drainPoll);
    this.stopKvEvents();
    for (const p of this.remote.values()) clearTimeout(p.timer);
    await this.model.dispose();
    await this.agent.dispose();
  }
}

/**
 * Opens a worker's transfer agent, model and KV pool (shared memory on CPU, device memory on GPU) and the
 * Worker that serves them; its messages go to `out`, its peers come from `controlPlane`. `agentOptions`: where the
 * agent listens for peers on other hosts (a joined worker, lib/cli/worker.ts).
 */
export async function openWorker(
  init: WorkerInit,
  out: (message: FromWorker) => void,
  controlPlane: ControlPlane,
  agentOptions: Omit<AgentOptions, 'name'> = {},
): Promise<Worker> {
  const agent = await TransferAgent.create({ name: `${init.name}-${process.pid}`, ...agentOptions });
  let region: Region | undefined;
  let rankRegions: Region[] | undefined;
  const model = await openModel({
    model: init.model,
    device: init.device === 'cuda' ? 'cuda' : 'cpu',
    ...(init.gpu !== undefined ? { gpu: init.gpu } : {}),
    ...(init.gpus !== undefined ? { gpus: init.gpus } : {}),
    ...(init.kvCacheFraction !== undefined ? { kvCacheFraction: init.kvCacheFraction } : {}),
    seed: init.seed,
    log: (line) => process.stderr.write(`tandem worker ${init.name}: ${line}\n`),
    blockSize: init.blockSize,
    ...(init.numBlocks !== undefined ? { numBlocks: init.numBlocks } : {}),
    ...(init.threads !== undefined ? { threads: init.threads } : {}),
    ...(init.tensorParallelSize !== undefined ? { tensorParallelSize: init.tensorParallelSize } : {}),
    ...(init.pipelineParallelSize !== undefined ? { pipelineParallelSize: init.pipelineParallelSize } : {}),
    ...(init.expertParallelSize !== undefined ? { expertParallelSize: init.expertParallelSize } : {}),
    ...(init.eplb !== undefined ? { eplb: init.eplb } : {}),
    engine: {
      ...(init.maxBatchTokens !== undefined ? { maxNumBatchedTokens: init.maxBatchTokens } : {}),
      ...(init.maxSequences !== undefined ? { maxNumSeqs: init.maxSequences } : {}),
    },
    // CPU engine: the pool lives in shared memory that peers on this host map (shm backend).
    kvBufferFor: (spec: KvPoolSpec) => {
      region = agent.allocShared(kvPool(spec).poolBytes);
      return region.view!;
    },
  });
  // GPU engine: the pool is device memory; peers reach it through CUDA IPC (cuda-ipc backend).
  if (model.runner instanceof CudaModelRunner) {
    // One region per tensor-parallel rank's pool (one for a single rank).
    rankRegions = model.runner.kvDeviceBuffers.map((buffer) => agent.registerDevice(buffer));
    region = rankRegions[0];
    // The first forward pass on a GPU loads kernels: do it now rather than in the first request.
    if (process.env.TANDEM_WARMUP !== '0') {
      const ms = await warmUpRunner(model.runner);
      const t = model.runner.gemmTuning;
      const tuning = t.tune ? `GEMM autotuning ${t.shapes} shapes in ${t.ms.toFixed(0)} ms` : 'GEMM autotuning off';
      process.stderr.write(`tandem worker ${init.name}: engine warm-up ${ms.toFixed(0)} ms (${tuning})\n`);
    }
  }
  return new Worker(out, init, model, agent, region!, controlPlane, rankRegions);
}

/** The worker's main: waits for `init`, opens the model with its KV pool in shared memory, registers. */
export async function runWorker(): Promise<void> {
  if (!process.send) throw new Error('runWorker: this process has no IPC channel (start it with fork())');
  // `ps` and `top` show which worker this is (`tandem decode-0`), also while the model loads.
  if (process.env.TANDEM_WORKER_NAME) process.title = `tandem ${process.env.TANDEM_WORKER_NAME}`;
  let worker: Worker | undefined;
  let controlPlane: ControlPlane | undefined;
  let exiting = false;
  /** Leaves the control plane, disposes the engine (bounded: a stuck dispose does not keep the process) and exits. */
  const exit = (code: number) => {
    if (exiting) return;
    exiting = true;
    setTimeout(() => process.exit(code), EXIT_GRACE_MS).unref();
    void Promise.allSettled([controlPlane?.close(), worker?.dispose()]).finally(() => process.exit(code));
  };
  // The launcher is gone (it exited, or was killed): nothing will ask for work any more. This also holds
  // while the model is still loading.
  process.on('disconnect', () => exit(0));
  if (!process.connected) return exit(0); // it was gone before this process got here
  const init = await new Promise<WorkerInit>((resolve) => {
    const onMessage = (m: ToWorker) => {
      if (m.type !== 'init') return;
      process.off('message', onMessage);
      resolve(m.init);
    };
    process.on('message', onMessage);
  });
  // The control plane: etcd when the deployment's is there, else the launcher's embedded one over this channel.
  const ipcControlPlane = init.control
    ? undefined
    : new IpcControlPlane((request) => send({ type: 'control', request }));
  const early: ToWorker[] = [];
  process.on('message', (m: ToWorker) => {
    if (m.type === 'shutdown') return exit(0);
    if (m.type === 'control') return ipcControlPlane?.receive(m.event);
    if (worker) worker.handle(m);
    else early.push(m);
  });
  // SIGTERM: drain (routers choose this worker no more; its requests in flight finish, up to the drain timeout),
  // then exit; the launcher restarts it like any exited worker. A second SIGTERM, or SIGINT during the drain, exits
  // at once; the requests still running migrate (the frontend re-issues them elsewhere) either way.
  let draining = false;
  process.on('SIGTERM', () => {
    if (draining || !worker) return exit(0);
    draining = true;
    const timeoutMs = init.drainTimeoutMs ?? DEFAULT_DRAIN_TIMEOUT_MS;
    process.stderr.write(
      `tandem worker ${init.name}: SIGTERM: draining ${worker.inFlight} request(s) in flight (up to ` +
        `${timeoutMs / 1000} s; a second SIGTERM exits at once)\n`,
    );
    void worker.drainForExit(timeoutMs).then((drained) => {
      if (!drained)
        process.stderr.write(
          `tandem worker ${init.name}: drain timeout: exiting with ${worker!.inFlight} request(s) in flight ` +
            '(they migrate)\n',
        );
      exit(0);
    });
  });
  // Ctrl-C reaches the whole process group: the launcher decides when workers stop (it drains first).
  process.on('SIGINT', () => {
    if (draining) exit(0);
  });
  try {
    controlPlane = ipcControlPlane ?? (await EtcdControlPlane.connect(init.control!));
    const plane = controlPlane;
    // Its load goes to the routers on the event plane (this channel); etcd also stores it (the load key).
    const out = (m: FromWorker) => {
      if (m.type === 'heartbeat') plane.heartbeat(m.name, m.load);
      send(m);
    };
    worker = await openWorker(init, out, plane);
    await worker.register();
    send({ type: 'ready', registration: worker.registration() });
    worker.sendKvSnapshot();
    for (const m of early.splice(0)) worker.handle(m);
  } catch (error) {
    // Exit once the message is out: the launcher stops a starting deployment on it, with this message.
    process.send({ type: 'fatal', code: errorCode(error), message: errorMessage(error) } satisfies FromWorker, () =>
      process.exit(1),
    );
  }
}
