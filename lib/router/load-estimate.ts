/**
 * The routers' load estimate: per worker, what the routers sharing it have sent there and not yet seen end:
 * requests in flight, and cost.ts's load terms (prompt blocks queued for prefill, blocks held in decode), updated
 * when a request is routed, at its first token and at its end.
 *
 * The routers of one launcher (one per frontend, `frontend.replicas`) share one estimate, so each sees the
 * requests the others have in flight and a burst that arrives through several frontends is spread over the
 * workers instead of piling onto the one each router alone would find idle. Best-effort: routers in other
 * processes are not counted (a worker's heartbeat, the policies' tie-break, carries its own report), and what
 * one router adds the same router takes away, to the entry it added to: a worker that leaves and comes back under
 * its name starts from a new entry, which the old process's requests do not touch.
 */
export interface WorkerLoadEstimate {
  /** Requests in flight there (a remote prefill counts on its prefill worker too). */
  inflight: number;
  /** Uncached prompt blocks of the requests routed there that have no first token yet. */
  queuedPrefillBlocks: number;
  /** Blocks the requests routed there and not ended hold there (each request's uncached blocks). */
  decodeBlocks: number;
}

export class LoadEstimate {
  private readonly entries = new Map<string, WorkerLoadEstimate>();

  /** The entry of `worker`, created empty when it has none. */
  of(worker: string): WorkerLoadEstimate {
    let e = this.entries.get(worker);
    if (!e) {
      e = { inflight: 0, queuedPrefillBlocks: 0, decodeBlocks: 0 };
      this.entries.set(worker, e);
    }
    return e;
  }

  /** The entry of `worker`, if it has one (reading creates nothing). */
  peek(worker: string): Readonly<WorkerLoadEstimate> | undefined {
    return this.entries.get(worker);
  }

  /** The worker is gone: its entry is dropped (requests still holding it release into the dropped object). */
  forget(worker: string): void {
    this.entries.delete(worker);
  }
}
