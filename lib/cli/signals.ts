/**
 * SIGINT and SIGTERM, watched from the moment a command starts rather than from the moment it is ready: a signal
 * that arrives while a worker loads its model or registers in etcd is kept, and the command drains and stops as
 * soon as it is up, instead of Node's default action killing it half-registered (its lease left to expire, its
 * children orphaned).
 */
export interface SignalWatch {
  /** The next signal not yet taken: one already received resolves at once. */
  next(): Promise<NodeJS.Signals>;
  /** Stops watching: the default action applies again. */
  close(): void;
}

export function watchSignals(signals: readonly NodeJS.Signals[] = ['SIGINT', 'SIGTERM']): SignalWatch {
  const received: NodeJS.Signals[] = [];
  const waiting: ((signal: NodeJS.Signals) => void)[] = [];
  const on = (signal: NodeJS.Signals) => {
    const waiter = waiting.shift();
    if (waiter) waiter(signal);
    else received.push(signal);
  };
  for (const s of signals) process.on(s, on);
  return {
    next() {
      const signal = received.shift();
      if (signal) return Promise.resolve(signal);
      return new Promise((resolve) => waiting.push(resolve));
    },
    close() {
      for (const s of signals) process.off(s, on);
    },
  };
}
