/**
 * The embedded control plane, reached from the launcher's worker processes over their IPC channel: the launcher
 * hosts it (`ControlPlaneRelay`), each worker holds an `IpcControlPlane`, a ControlPlane like the others. A worker
 * registers itself and removes itself through it, and learns its peers from its events, as a worker on etcd does;
 * nothing else relays peers.
 *
 * Watch: the client asks once (`watch`); the host answers with a snapshot of every worker, then relays each
 * 'added', 'removed' and 'suspect' in order on the same channel (one ordered stream: no event is lost or
 * reordered between the snapshot and the events). Loads are not relayed: they travel on the event plane, from
 * each worker to the routers.
 */
import { EventEmitter } from 'node:events';
import type { PoolRole } from '../deploy/graph.js';
import type { WorkerLoad, WorkerRegistration } from '../worker/protocol.js';
import type { ControlPlane, ControlPlaneEvents, LiveWorker } from './control-plane.js';

/** What a client asks of the hosted control plane. */
export type ControlPlaneRequest =
  | { op: 'watch' }
  | { op: 'register'; registration: WorkerRegistration }
  | { op: 'remove'; name: string; reason: string };

/** What the host tells a watching client. */
export type ControlPlaneEvent =
  | { kind: 'snapshot'; workers: { registration: WorkerRegistration; suspect: boolean }[] }
  | { kind: 'added'; registration: WorkerRegistration }
  | { kind: 'removed'; name: string; reason: string }
  | { kind: 'suspect'; name: string; suspect: boolean; reason: string };

function liveWorker(registration: WorkerRegistration): LiveWorker {
  return {
    registration,
    load: { running: 0, waiting: 0, freeBlocks: registration.numBlocks, prefilling: 0 },
    lastHeartbeat: Date.now(),
  };
}

/** A worker process's view of the control plane its launcher hosts; `receive` takes what the launcher relays. */
export class IpcControlPlane extends EventEmitter<ControlPlaneEvents> implements ControlPlane {
  private readonly live = new Map<string, LiveWorker>();
  /** register() calls waiting for their registration to show here, by name. */
  private readonly registering = new Map<string, (() => void)[]>();
  private closed = false;

  /** Starts watching at once: the snapshot and the events after it come to `receive`. */
  constructor(private readonly send: (request: ControlPlaneRequest) => void) {
    super();
    send({ op: 'watch' });
  }

  receive(event: ControlPlaneEvent): void {
    if (this.closed) return;
    switch (event.kind) {
      case 'snapshot': {
        const listed = new Set(event.workers.map((w) => w.registration.name));
        for (const name of [...this.live.keys()]) if (!listed.has(name)) this.drop(name, 'not in the snapshot');
        for (const w of event.workers) {
          this.add(w.registration);
          if (w.suspect) this.live.get(w.registration.name)!.suspect = true;
        }
        return;
      }
      case 'added':
        return this.add(event.registration);
      case 'removed':
        return this.drop(event.name, event.reason);
      case 'suspect': {
        const w = this.live.get(event.name);
        if (!w) return;
        w.suspect = event.suspect;
        this.emit('suspect', event.name, event.suspect, event.reason);
        return;
      }
    }
  }

  private add(registration: WorkerRegistration): void {
    const name = registration.name;
    if (this.live.has(name)) this.drop(name, 'registered again');
    const worker = liveWorker(registration);
    this.live.set(name, worker);
    this.emit('added', worker);
    for (const resolve of this.registering.get(name)?.splice(0) ?? []) resolve();
  }

  private drop(name: string, reason: string): void {
    if (this.live.delete(name)) this.emit('removed', name, reason);
  }

  /** Resolves once the host has taken the registration (its 'added' has come back here). */
  register(registration: WorkerRegistration): Promise<void> {
    const shown = new Promise<void>((resolve) => {
      const waiting = this.registering.get(registration.name) ?? [];
      waiting.push(resolve);
      this.registering.set(registration.name, waiting);
    });
    this.send({ op: 'register', registration });
    return shown;
  }

  /** Only in this view: a worker's load reaches the routers on the event plane, not through here. */
  heartbeat(name: string, load: WorkerLoad): void {
    const w = this.live.get(name);
    if (!w) return;
    w.load = load;
    w.lastHeartbeat = Date.now();
  }

  remove(name: string, reason: string): void {
    this.send({ op: 'remove', name, reason });
  }

  get(name: string): LiveWorker | undefined {
    return this.live.get(name);
  }

  workers(role?: PoolRole): LiveWorker[] {
    return [...this.live.values()].filter((w) => role === undefined || w.registration.role === role);
  }

  /** Stops taking events; register() calls still waiting resolve (the process is going). */
  close(): void {
    this.closed = true;
    for (const waiting of this.registering.values()) for (const resolve of waiting.splice(0)) resolve();
    this.registering.clear();
  }
}

/**
 * Hosts a control plane for clients on message channels (the launcher, for its worker processes). A client
 * registers and removes only the worker of its own name: a worker process speaks for itself.
 */
export class ControlPlaneRelay {
  private readonly watchers = new Map<string, (event: ControlPlaneEvent) => void>();
  private readonly unsubscribe: () => void;

  constructor(
    private readonly plane: ControlPlane,
    private readonly log: (line: string) => void = () => {},
  ) {
    const added = (w: LiveWorker) => this.broadcast({ kind: 'added', registration: w.registration });
    const removed = (name: string, reason: string) => this.broadcast({ kind: 'removed', name, reason });
    const suspect = (name: string, isSuspect: boolean, reason: string) =>
      this.broadcast({ kind: 'suspect', name, suspect: isSuspect, reason });
    plane.on('added', added).on('removed', removed).on('suspect', suspect);
    this.unsubscribe = () => {
      plane.off('added', added).off('removed', removed).off('suspect', suspect);
    };
  }

  /** A request from client `client`; `send` reaches that client (a dead channel drops what it is given). */
  handle(client: string, request: ControlPlaneRequest, send: (event: ControlPlaneEvent) => void): void {
    // A child's message is data: a malformed one is logged and dropped, never thrown into the launcher.
    if (typeof request !== 'object' || request === null) {
      this.log(`[control] ${client} sent a malformed control request: dropped`);
      return;
    }
    const failed = (what: string) => (error: unknown) =>
      this.log(`[control] ${client}: ${what} failed: ${error instanceof Error ? error.message : String(error)}`);
    switch (request.op) {
      case 'watch':
        this.watchers.set(client, send);
        send({
          kind: 'snapshot',
          workers: this.plane.workers().map((w) => ({ registration: w.registration, suspect: w.suspect === true })),
        });
        return;
      case 'register':
        if (request.registration?.name !== client) {
          this.log(`[control] ${client} tried to register '${request.registration?.name}': refused`);
          return;
        }
        Promise.resolve()
          .then(() => this.plane.register(request.registration))
          .catch(failed('register'));
        return;
      case 'remove':
        if (request.name !== client) {
          this.log(`[control] ${client} tried to remove '${request.name}': refused`);
          return;
        }
        Promise.resolve()
          .then(() => this.plane.remove(client, request.reason))
          .catch(failed('remove'));
        return;
      default:
        this.log(`[control] ${client} sent an unknown control request: dropped`);
    }
  }

  /** The client is gone (its process exited): it hears nothing more. */
  drop(client: string): void {
    this.watchers.delete(client);
  }

  private broadcast(event: ControlPlaneEvent): void {
    for (const send of this.watchers.values()) send(event);
  }

  close(): void {
    this.unsubscribe();
    this.watchers.clear();
  }
}
