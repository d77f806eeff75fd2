/** A worker registration as a worker process sends it, for the control-plane tests and their lease holder. */
import type { WorkerRegistration } from '../../lib/worker/protocol.js';
import type { PoolRole } from '../../lib/deploy/graph.js';

export function workerRegistration(name: string, role: PoolRole = 'decode', pid = process.pid): WorkerRegistration {
  return {
    name,
    role,
    pid,
    agentName: `agent-${name}`,
    // Bytes that do not survive a careless text round trip: a zero, high bytes, a byte that is not UTF-8.
    agentMetadata: new Uint8Array([0, 1, 2, 0xfe, 0xff, 0x80, name.length]),
    kvRegion: 3,
    kvPool: { layers: 2, kvHeads: 2, headDim: 8, numBlocks: 64, dtype: 'fp32', layout: 'block-major' },
    device: 'cpu',
    numBlocks: 64,
  };
}
