/**
 * watchSignals (lib/cli/signals.ts), what `tandem start`, `worker` and `frontend` wait on: a signal that comes
 * before anyone waits is kept, each signal is taken once and in order, and close() removes the listeners. The
 * signals are emitted on this process's emitter, not sent: nothing is killed if a listener is missing.
 */
import { describe, expect, it } from 'vitest';
import { watchSignals } from '../../lib/cli/signals.js';

describe('watchSignals', () => {
  it('keeps a signal that comes before the wait, hands each out once and in order, and lets go on close', async () => {
    const before = process.listenerCount('SIGTERM');
    const watch = watchSignals();
    expect(process.listenerCount('SIGTERM')).toBe(before + 1);
    expect(process.listenerCount('SIGINT')).toBeGreaterThan(0);
    process.emit('SIGTERM', 'SIGTERM');
    process.emit('SIGINT', 'SIGINT');
    expect(await watch.next()).toBe('SIGTERM');
    expect(await watch.next()).toBe('SIGINT');
    let third: NodeJS.Signals | undefined;
    const waiting = watch.next().then((s) => (third = s));
    await new Promise((r) => setImmediate(r));
    expect(third).toBeUndefined();
    process.emit('SIGTERM', 'SIGTERM');
    await waiting;
    expect(third).toBe('SIGTERM');
    watch.close();
    expect(process.listenerCount('SIGTERM')).toBe(before);
  });
});
