import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { packageRoot } from '../../lib/native/paths.js';

/** Runs a TypeScript entry point of the package in a fresh Node process (through tsx). */
export function runTs(script: string, args: string[] = [], env: NodeJS.ProcessEnv = {}, timeoutMs = 60_000) {
  const r = spawnSync(process.execPath, ['--import', 'tsx', join(packageRoot, script), ...args], {
    cwd: packageRoot,
    env: { ...process.env, ...env },
    encoding: 'utf8',
    timeout: timeoutMs,
  });
  return { status: r.status, signal: r.signal, stdout: r.stdout, stderr: r.stderr, error: r.error };
}
