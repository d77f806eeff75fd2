/**
 * Start-up logging: how long each phase of opening a model takes, and progress through long ones
 * ("loading weights 37% (5.9/16.1 GB, 2.1 GB/s)"), at most one progress line per interval.
 */

/** A line of start-up log (a worker writes it to stderr, which the launcher prefixes with the worker's name). */
export type StartLog = (line: string) => void;

/** Progress lines of one long phase come at most this often. */
export const PROGRESS_INTERVAL_MS = 1000;

const gb = (bytes: number) => (bytes / 1e9).toFixed(1);

/** Times phases: `await phases.run('open device', () => ...)` logs "open device: 812 ms". */
export class StartPhases {
  private readonly began: number;
  constructor(
    private readonly log: StartLog | undefined,
    private readonly clock: () => number = () => performance.now(),
  ) {
    this.began = clock();
  }

  async run<T>(phase: string, work: () => Promise<T> | T): Promise<T> {
    const t0 = this.clock();
    const out = await work();
    this.log?.(`${phase}: ${(this.clock() - t0).toFixed(0)} ms`);
    return out;
  }

  /** Milliseconds since this object was made. */
  elapsedMs(): number {
    return this.clock() - this.began;
  }
}

/** Counts bytes through a long phase and logs throttled progress (with the time left), then a summary line. */
export class ByteProgress {
  private done = 0;
  private readonly began: number;
  private lastLog: number;

  constructor(
    private readonly what: string,
    private readonly totalBytes: number,
    private readonly log: StartLog | undefined,
    private readonly clock: () => number = () => performance.now(),
    private readonly intervalMs = PROGRESS_INTERVAL_MS,
  ) {
    this.began = clock();
    this.lastLog = this.began;
  }

  add(bytes: number): void {
    this.done += bytes;
    const now = this.clock();
    if (this.log && now - this.lastLog >= this.intervalMs && this.done < this.totalBytes) {
      this.lastLog = now;
      const pct = this.totalBytes > 0 ? Math.floor((100 * this.done) / this.totalBytes) : 100;
      this.log(
        `${this.what} ${pct}% (${gb(this.done)}/${gb(this.totalBytes)} GB, ${this.rate(now)} GB/s${this.eta(now)})`,
      );
    }
  }

  finish(): void {
    const now = this.clock();
    this.log?.(`${this.what}: ${gb(this.done)} GB in ${(now - this.began).toFixed(0)} ms (${this.rate(now)} GB/s)`);
  }

  /** The time left at the rate so far. */
  private eta(now: number): string {
    const s = (now - this.began) / 1000;
    return s > 0 && this.done > 0 ? `, ETA ${Math.ceil(((this.totalBytes - this.done) * s) / this.done)} s` : '';
  }

  private rate(now: number): string {
    const s = (now - this.began) / 1000;
    return s > 0 ? (this.done / 1e9 / s).toFixed(1) : '-';
  }
}
