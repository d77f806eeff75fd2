/**
 * Request migration: a GenerationBackend in front of the router that keeps a request alive when its decode (or
 * aggregated) worker dies mid-stream. It re-issues the request to the router, which picks another worker, as
 * the prompt plus the output already streamed (`resume`: the engine counts those tokens as output, so a greedy
 * or seeded request continues with exactly the tokens an undisturbed run gives), up to `limit` times per
 * request. The consumer sees one stream: every token once, in order, one finish.
 *
 * Only a worker's death migrates (the router's TANDEM_WORKER_GONE); any other failure, a request whose client
 * left, a request past its limit, or one that no worker can take any more ends with the error, as without
 * migration. Each attempt runs under its own request id (`<id>#m<n>`), so that a late message of a dead
 * worker's attempt can never land in the next attempt's stream.
 */
import { TandemError } from '../errors.js';
import type { GenerationBackend, GenerationChunk, GenerationRequest } from './backend.js';
import type { ServeMetrics } from './metrics.js';
import { WorkerRequestError } from '../router/router.js';

/** Migrations per request by default (graph `frontend.migrationLimit`, `--migration-limit`). */
export const DEFAULT_MIGRATION_LIMIT = 3;

/** The code the router fails a request with when its worker is gone (Router.workerGone). */
export const WORKER_GONE = 'TANDEM_WORKER_GONE';

/**
 * What became of a request whose worker died: `migrated` (re-issued to another worker), `limit_reached` (its
 * migrations used up; migrationLimit 0 included), `no_worker` (no worker could take it).
 */
export type MigrationOutcome = 'migrated' | 'limit_reached' | 'no_worker';
export const MIGRATION_OUTCOMES: readonly MigrationOutcome[] = ['migrated', 'limit_reached', 'no_worker'];

export interface MigrationOptions {
  /** Migrations per request, >= 0 (0: none). Default DEFAULT_MIGRATION_LIMIT. */
  limit?: number;
  metrics?: ServeMetrics;
  /** One line per migration (info). */
  log?: (line: string) => void;
}

function isWorkerGone(error: unknown): boolean {
  return error instanceof TandemError && error.code === WORKER_GONE;
}

export class MigratingBackend implements GenerationBackend {
  readonly limit: number;

  constructor(
    private readonly inner: GenerationBackend,
    private readonly options: MigrationOptions = {},
  ) {
    const limit = options.limit ?? DEFAULT_MIGRATION_LIMIT;
    if (!Number.isSafeInteger(limit) || limit < 0)
      throw new TypeError(`migration limit must be an integer >= 0 (got ${limit})`);
    this.limit = limit;
  }

  available(): boolean {
    return this.inner.available();
  }

  generate(request: GenerationRequest): AsyncIterable<GenerationChunk> {
    // The first attempt starts now: a request nothing can serve fails here, as the router's own generate does.
    const first = this.inner.generate(request);
    return this.follow(request, first);
  }

  private async *follow(request: GenerationRequest, first: AsyncIterable<GenerationChunk>) {
    const output: number[] = [...(request.resume?.outputTokenIds ?? [])];
    let attempt = first;
    for (let migrations = 0; ;) {
      try {
        for await (const chunk of attempt) {
          for (const t of chunk.tokenIds) output.push(t);
          yield chunk;
          if (chunk.finishReason) return;
        }
        return;
      } catch (error) {
        if (!isWorkerGone(error) || request.signal.aborted) throw error;
        const what = `request ${request.requestId}: ${(error as Error).message}`;
        if (migrations >= this.limit) {
          this.count('limit_reached');
          this.options.log?.(`${what}; not migrated: migration limit (${this.limit}) reached`);
          throw new WorkerRequestError(
            WORKER_GONE,
            `${(error as Error).message} (migration limit ${this.limit} reached)`,
          );
        }
        migrations++;
        try {
          attempt = this.inner.generate({
            ...request,
            requestId: `${request.requestId}#m${migrations}`,
            ...(output.length > 0 ? { resume: { outputTokenIds: [...output] } } : {}),
          });
        } catch (reissue) {
          this.count('no_worker');
          this.options.log?.(`${what}; not migrated: ${(reissue as Error).message}`);
          throw new WorkerRequestError(WORKER_GONE, `${(error as Error).message}; no worker left to migrate it to`);
        }
        this.count('migrated');
        this.options.log?.(
          `${what}; migrated with ${output.length} tokens streamed (migration ${migrations} of ${this.limit})`,
        );
      }
    }
  }

  private count(outcome: MigrationOutcome): void {
    this.options.metrics?.requestMigration(outcome);
  }
}
