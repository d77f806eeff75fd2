/**
 * Two processes, one KV-like transfer: a "prefill" process WRITEs scattered blocks into a "decode"
 * process's memory and notifies it; the decode process checks the bytes when the notification arrives.
 *
 *   npx tsx examples/transfer-two-process.ts            (host memory: shm; add --tcp to force tcp)
 *
 * Metadata travels over the parent/child IPC channel here; in a deployment it goes through the
 * control plane. Any channel that carries bytes will do.
 */
import { fork } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { TransferAgent } from '../lib/index.js';

const BLOCK = 64 << 10; // one KV block
const BLOCKS = 256;

if (process.argv[2] === 'decode') {
  // --- the decode side: owns the destination pool, waits for blocks ---
  const agent = await TransferAgent.create({ name: 'decode-0' });
  const pool = agent.allocShared(BLOCK * BLOCKS);
  agent.on('notification', (from, message) => {
    const { blocks, fill } = JSON.parse(message.toString()) as { blocks: number[]; fill: number };
    // The notification is delivered after the data is in place: check it now.
    const ok = blocks.every((b) => pool.view!.subarray(b * BLOCK, (b + 1) * BLOCK).every((x) => x === fill));
    process.send!({ verified: ok, from, blocks: blocks.length });
    void agent.dispose().then(() => process.exit(0));
  });
  process.send!({ metadata: Buffer.from(agent.metadata()).toString('base64') });
} else {
  // --- the prefill side: computes blocks, pushes them into decode's pool ---
  const child = fork(fileURLToPath(import.meta.url), ['decode'], { execArgv: ['--import', 'tsx'] });
  const first = await new Promise<{ metadata: string }>((resolve) => child.once('message', resolve as never));
  const agent = await TransferAgent.create({ name: 'prefill-0' });
  const local = agent.allocShared(BLOCK * 16);
  local.view!.fill(42); // "KV" computed by prefill
  const peer = agent.loadRemote(Buffer.from(first.metadata, 'base64'));

  const dstBlocks = [3, 9, 10, 11, 12, 40, 41, 100, 101, 102, 150, 200, 201, 202, 250, 255];
  const plan = agent.prepare({
    op: 'WRITE',
    peer: peer.name,
    local,
    remote: peer.regions[0]!,
    pieces: {
      localOffsets: Float64Array.from(dstBlocks, (_, i) => i * BLOCK),
      remoteOffsets: Float64Array.from(dstBlocks, (b) => b * BLOCK),
      lengths: BLOCK,
    },
    ...(process.argv.includes('--tcp') ? { backend: 'tcp' as const } : {}),
  });
  console.log(
    `plan: ${plan.requestedPieces} pieces (${plan.pieces} after merging adjacent ones), ${plan.bytes} bytes, backend ${plan.backend}`,
  );
  const verdict = new Promise<{ verified: boolean; blocks: number }>((resolve) =>
    child.once('message', resolve as never),
  );
  await plan.post({ notify: JSON.stringify({ blocks: dstBlocks, fill: 42 }) });
  const result = await verdict;
  console.log(
    `decode-0 checked ${result.blocks} blocks on notification: ${result.verified ? 'all correct' : 'MISMATCH'}`,
  );
  await agent.dispose();
  process.exitCode = result.verified ? 0 : 1;
}
