/** Entry point of a worker process (forked by lib/deploy/launcher.ts). */
import { runWorker } from './worker.js';

runWorker().catch((error: unknown) => {
  console.error(error instanceof Error ? error.message : error);
  process.exit(1);
});
