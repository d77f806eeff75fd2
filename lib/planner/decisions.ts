/**
 * Every planner decision as an object with its inputs and outputs, kept in a bounded history (newest last), for
 * the /planner endpoint and /metrics.
 */
import { BadArgumentError } from '../errors.js';

/** The default number of decisions kept. */
export const DEFAULT_HISTORY_SIZE = 256;

export interface Decision<Kind extends string = string, Inputs = unknown, Outputs = unknown> {
  /** 1, 2, 3, ... over the planner's life (kept when older decisions are dropped). */
  id: number;
  /** ISO 8601. */
  at: string;
  kind: Kind;
  inputs: Inputs;
  outputs: Outputs;
  /** One line a person reads. */
  reason: string;
}

export class DecisionHistory<D extends Decision = Decision> {
  private readonly items: D[] = [];
  private nextId = 1;

  constructor(readonly capacity = DEFAULT_HISTORY_SIZE) {
    if (!Number.isSafeInteger(capacity) || capacity < 1)
      throw new BadArgumentError(`history capacity must be a positive integer (got ${String(capacity)})`);
  }

  /** Stamps the decision with its id (and the time, unless given), keeps it, and returns it. */
  record<T extends D>(decision: Omit<T, 'id' | 'at'> & { at?: string }): T {
    const stamped = { ...decision, id: this.nextId++, at: decision.at ?? new Date().toISOString() } as T;
    this.items.push(stamped);
    if (this.items.length > this.capacity) this.items.shift();
    return stamped;
  }

  /** Oldest first. */
  list(): readonly D[] {
    return [...this.items];
  }

  latest(): D | undefined {
    return this.items[this.items.length - 1];
  }

  /** Decisions recorded over the planner's life, dropped ones included. */
  get total(): number {
    return this.nextId - 1;
  }
}
