import type { Capabilities } from '../capabilities/index.js';

/**
 * What `tandem start` (npm start) runs on this machine: the embedded deployment, a frontend on
 * 127.0.0.1:8000 with one prefill and one decode worker. The GPU assignment follows the machine: two
 * GPUs or more put prefill and decode on different GPUs; one GPU holds both; none runs the CPU engine.
 */
export interface EmbeddedPlan {
  frontend: { host: string; port: number };
  engine: 'cuda' | 'cpu';
  model: string;
  prefillDevice: number | 'cpu';
  decodeDevice: number | 'cpu';
  kvBackend: 'cuda-ipc' | 'shm';
}

export function embeddedPlan(c: Capabilities): EmbeddedPlan {
  const gpus = c.cuda.available ? c.cuda.devices.length : 0;
  if (gpus === 0) {
    return {
      frontend: { host: '127.0.0.1', port: 8000 },
      engine: 'cpu',
      model: 'dummy:tiny',
      prefillDevice: 'cpu',
      decodeDevice: 'cpu',
      kvBackend: 'shm',
    };
  }
  return {
    frontend: { host: '127.0.0.1', port: 8000 },
    engine: 'cuda',
    model: 'dummy:tiny',
    prefillDevice: 0,
    decodeDevice: gpus >= 2 ? 1 : 0,
    kvBackend: 'cuda-ipc',
  };
}

export function planEmbedded(c: Capabilities): string {
  const p = embeddedPlan(c);
  const where = (d: number | 'cpu') => (d === 'cpu' ? 'CPU' : `GPU ${d}`);
  return [
    'Embedded deployment for this machine:',
    `  frontend        http://${p.frontend.host}:${p.frontend.port} (OpenAI-compatible)`,
    `  prefill worker  ${p.engine} engine, model ${p.model}, on ${where(p.prefillDevice)}`,
    `  decode worker   ${p.engine} engine, model ${p.model}, on ${where(p.decodeDevice)}`,
    `  KV transfer     ${p.kvBackend}`,
    '',
    'Serving is not implemented yet in this version: the engine and the frontend land in later releases.',
    'The transfer runtime and NCCL collectives are usable now as a library (see README.md).',
    'This command reports the machine and the deployment it will run.',
  ].join('\n');
}
