/** The load generator's process (LoadProcess in load.ts): runs what its parent sends, one run at a time. */
import { runLoad, type FromLoadProcess, type ToLoadProcess } from './load.js';

const send = (m: FromLoadProcess) => process.send!(m);
let stop: AbortController | undefined;

process.on('message', (m: ToLoadProcess) => {
  if (m.type === 'stop') {
    stop?.abort();
    return;
  }
  stop = new AbortController();
  runLoad(m.target, m.requests, {
    ...(m.concurrency !== undefined ? { concurrency: m.concurrency } : {}),
    timeoutMs: m.timeoutMs,
    signal: stop.signal,
    onProgress: (progress) => send({ type: 'progress', progress }),
  }).then(
    (timings) => send({ type: 'done', timings }),
    (error: unknown) => send({ type: 'failed', message: (error as Error)?.message ?? String(error) }),
  );
});
// The parent gone (killed, crashed): nothing left to measure for.
process.on('disconnect', () => process.exit(0));
