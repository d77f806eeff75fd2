import { spawn, type ChildProcess } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { EventEmitter } from 'node:events';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { packageRoot } from '../../lib/native/paths.js';

export interface PeerEvent {
  event: string;
  from?: string;
  text?: string;
  sha256?: string;
  /** process.hrtime.bigint() at arrival, as a decimal string */
  t?: string;
}

/** How to start the peer process: as another user (root only), with another environment. */
export interface PeerOptions {
  uid?: number;
  gid?: number;
  env?: NodeJS.ProcessEnv;
}

/** A transfer-peer process (test/fixtures/transfer-peer.ts) driven over stdin/stdout. */
export class PeerProcess extends EventEmitter<{ event: [PeerEvent] }> {
  readonly child: ChildProcess;
  private nextId = 1;
  private readonly waiting = new Map<
    number,
    { resolve: (v: Record<string, unknown>) => void; reject: (e: Error) => void }
  >();
  readonly events: PeerEvent[] = [];
  readonly exited: Promise<number | null>;
  stderr = '';

  private constructor(options: PeerOptions) {
    super();
    this.child = spawn(process.execPath, ['--import', 'tsx', join(packageRoot, 'test/fixtures/transfer-peer.ts')], {
      cwd: packageRoot,
      stdio: ['pipe', 'pipe', 'pipe'],
      ...(options.uid !== undefined ? { uid: options.uid } : {}),
      ...(options.gid !== undefined ? { gid: options.gid } : {}),
      ...(options.env ? { env: options.env } : {}),
    });
    this.child.stderr!.on('data', (d: Buffer) => (this.stderr += d.toString()));
    this.exited = new Promise((resolve) => this.child.on('exit', (code) => resolve(code)));
    this.child.on('exit', () => {
      for (const w of this.waiting.values()) w.reject(new Error(`peer process exited\n${this.stderr}`));
      this.waiting.clear();
    });
    createInterface({ input: this.child.stdout! }).on('line', (line) => {
      const msg = JSON.parse(line) as Record<string, unknown> & {
        id?: number;
        error?: { name: string; code: string; message: string };
      };
      if (msg.id === undefined) {
        this.events.push(msg as unknown as PeerEvent);
        this.emit('event', msg as unknown as PeerEvent);
        return;
      }
      const w = this.waiting.get(msg.id);
      this.waiting.delete(msg.id);
      if (!w) return;
      if (msg.error) w.reject(Object.assign(new Error(msg.error.message), msg.error));
      else w.resolve(msg);
    });
  }

  static async start(options: PeerOptions = {}): Promise<PeerProcess> {
    const p = new PeerProcess(options);
    await p.nextEvent((e) => e.event === 'ready', 30_000);
    return p;
  }

  request<T = Record<string, unknown>>(cmd: string, args: Record<string, unknown> = {}): Promise<T> {
    const id = this.nextId++;
    return new Promise<T>((resolve, reject) => {
      this.waiting.set(id, { resolve: resolve as (v: Record<string, unknown>) => void, reject });
      this.child.stdin!.write(JSON.stringify({ id, cmd, ...args }) + '\n');
    });
  }

  nextEvent(match: (e: PeerEvent) => boolean, timeoutMs = 10_000): Promise<PeerEvent> {
    const seen = this.events.find(match);
    if (seen) {
      this.events.splice(this.events.indexOf(seen), 1);
      return Promise.resolve(seen);
    }
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.off('event', listener);
        reject(new Error(`no matching peer event within ${timeoutMs} ms\n${this.stderr}`));
      }, timeoutMs);
      const listener = (e: PeerEvent) => {
        if (!match(e)) return;
        this.events.splice(this.events.indexOf(e), 1);
        clearTimeout(timer);
        this.off('event', listener);
        resolve(e);
      };
      this.on('event', listener);
    });
  }

  /** SIGSTOPs the process and waits until the kernel reports it stopped (the signal is asynchronous). */
  async freeze(): Promise<void> {
    this.child.kill('SIGSTOP');
    const deadline = Date.now() + 5_000;
    while (Date.now() < deadline) {
      const stat = readFileSync(`/proc/${this.child.pid}/stat`, 'utf8');
      if (/^\d+ \(.*\) [Tt] /.test(stat)) return;
      await new Promise((r) => setTimeout(r, 2));
    }
    throw new Error('the peer process did not stop');
  }

  /** SIGKILLs the process (no cleanup of any kind in it) and waits until it is gone. */
  async kill(): Promise<void> {
    if (this.child.exitCode !== null || this.child.signalCode !== null) return;
    this.child.kill('SIGKILL');
    await this.exited;
  }

  async stop(): Promise<void> {
    if (this.child.exitCode !== null || this.child.signalCode !== null) return;
    this.child.stdin!.end();
    const timer = setTimeout(() => this.child.kill('SIGKILL'), 5_000);
    await this.exited;
    clearTimeout(timer);
  }
}
