/**
 * A real etcd for tests: one member on free loopback ports with its data in a temporary directory, started and
 * stopped by the test (bounded waits), killed if the test process exits first. The binary is Debian's
 * etcd-server (`/usr/bin/etcd`), or ETCD_BIN.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';

const START_TIMEOUT_MS = 20_000;
const STOP_TIMEOUT_MS = 5_000;

/** The etcd binary, or undefined with the reason it is missing (for a test's skip message). */
export function etcdBinary(): { path?: string; missing?: string } {
  const path = process.env.ETCD_BIN ?? 'etcd';
  const probe = spawnSync(path, ['--version'], { encoding: 'utf8', timeout: 10_000 });
  if (probe.error || probe.status !== 0)
    return {
      missing: `no etcd binary (${path}: ${probe.error?.message ?? `exit ${probe.status}`}); install etcd-server (apt-get install etcd-server) or set ETCD_BIN`,
    };
  return { path };
}

/** A port nothing listens on right now (the kernel's pick for 127.0.0.1:0). */
export async function freeLoopbackPort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve, reject) => server.once('error', reject).listen(0, '127.0.0.1', resolve));
  const port = (server.address() as { port: number }).port;
  await new Promise<void>((resolve) => server.close(() => resolve()));
  return port;
}

const running = new Set<ChildProcess>();
process.once('exit', () => {
  for (const child of running) child.kill('SIGKILL');
});

export class EtcdServer {
  private child: ChildProcess | undefined;
  private stderr = '';
  private dataDir: string;

  private constructor(
    private readonly binary: string,
    readonly clientPort: number,
    readonly peerPort: number,
  ) {
    this.dataDir = mkdtempSync(join(tmpdir(), 'tandem-etcd-'));
  }

  /** Starts etcd and waits until it reports healthy. */
  static async start(binary: string): Promise<EtcdServer> {
    const server = new EtcdServer(binary, await freeLoopbackPort(), await freeLoopbackPort());
    await server.launch();
    return server;
  }

  get endpoint(): string {
    return `http://127.0.0.1:${this.clientPort}`;
  }

  get pid(): number | undefined {
    return this.child?.pid;
  }

  private async launch(): Promise<void> {
    const client = `http://127.0.0.1:${this.clientPort}`;
    const peer = `http://127.0.0.1:${this.peerPort}`;
    this.stderr = '';
    const child = spawn(
      this.binary,
      [
        '--name=test',
        `--data-dir=${this.dataDir}`,
        `--listen-client-urls=${client}`,
        `--advertise-client-urls=${client}`,
        `--listen-peer-urls=${peer}`,
        `--initial-advertise-peer-urls=${peer}`,
        `--initial-cluster=test=${peer}`,
        '--initial-cluster-state=new',
        '--logger=zap',
        '--log-level=error',
      ],
      { stdio: ['ignore', 'ignore', 'pipe'] },
    );
    child.stderr!.on('data', (chunk: Buffer) => {
      this.stderr = (this.stderr + chunk.toString()).slice(-4_000);
    });
    this.child = child;
    running.add(child);
    child.once('exit', () => running.delete(child));
    const deadline = Date.now() + START_TIMEOUT_MS;
    while (Date.now() < deadline) {
      if (child.exitCode !== null || child.signalCode !== null)
        throw new Error(`etcd exited (${child.exitCode ?? child.signalCode}) while starting: ${this.stderr}`);
      try {
        const res = await fetch(`${client}/health`, { signal: AbortSignal.timeout(1_000) });
        if (res.ok && ((await res.json()) as { health?: string }).health === 'true') return;
      } catch {
        // not listening yet
      }
      await sleep(100);
    }
    await this.kill();
    throw new Error(`etcd did not become healthy within ${START_TIMEOUT_MS} ms: ${this.stderr}`);
  }

  /** SIGKILL, as a crash: no clean shutdown. */
  async kill(): Promise<void> {
    await this.signal('SIGKILL');
  }

  /** Starts it again on the same ports; `fresh` with an empty data directory (etcd lost its state). */
  async restart(options: { fresh?: boolean } = {}): Promise<void> {
    await this.kill();
    if (options.fresh) {
      rmSync(this.dataDir, { recursive: true, force: true });
      this.dataDir = mkdtempSync(join(tmpdir(), 'tandem-etcd-'));
    }
    await this.launch();
  }

  /** SIGTERM, then SIGKILL after a bound; removes the data directory. */
  async stop(): Promise<void> {
    await this.signal('SIGTERM');
    rmSync(this.dataDir, { recursive: true, force: true });
  }

  private async signal(signal: NodeJS.Signals): Promise<void> {
    const child = this.child;
    this.child = undefined;
    if (!child || child.exitCode !== null || child.signalCode !== null) return;
    const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
    child.kill(signal);
    const timer = setTimeout(() => child.kill('SIGKILL'), STOP_TIMEOUT_MS);
    await exited;
    clearTimeout(timer);
  }
}
