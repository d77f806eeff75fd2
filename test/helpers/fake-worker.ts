import type { PoolRole } from '../../lib/deploy/graph.js';
import type { WorkerRegistration } from '../../lib/worker/protocol.js';

/** The registration of a worker that exists only as a name (router tests over an embedded control plane). */
export function workerRegistration(name: string, role: PoolRole = 'aggregated'): WorkerRegistration {
  return {
    name,
    role,
    pid: 0,
    agentName: name,
    agentMetadata: new Uint8Array(0),
    kvRegion: 0,
    kvPool: { layers: 1, kvHeads: 1, headDim: 8, numBlocks: 64, dtype: 'fp32', layout: 'block-major' },
    device: 'cpu',
    numBlocks: 64,
  };
}
