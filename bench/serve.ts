/**
 * npm run bench:serve [-- options]: goodput of OpenAI-compatible servers under SLOs (lib/bench/serve.ts);
 * the same command as `tandem bench serve`. `-- --help` lists the options; `-- --quick` is the CI run.
 */
import { TandemError } from '../lib/errors.js';
import { UsageError } from '../lib/cli/args.js';
import { benchServeMain } from '../lib/bench/index.js';

try {
  process.exitCode = await benchServeMain(process.argv.slice(2));
} catch (error) {
  if (!(error instanceof TandemError)) throw error;
  console.error(`bench:serve: ${error.message}`);
  process.exitCode = error instanceof UsageError ? 2 : 1;
}
