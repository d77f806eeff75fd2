import { CudaModelRunner } from '../../lib/engine/cuda.js';

/**
 * A GPU runner created with the environment variables of `env` set (a null value unsets one), restored after: the
 * engine reads its A/B switches (TANDEM_ATTENTION, TANDEM_DECODE_GRID, TANDEM_ELEMENTWISE, ...) once, at creation.
 */
export async function createGpuRunnerWith(
  options: Parameters<typeof CudaModelRunner.create>[0],
  env: Record<string, string | null>,
): Promise<CudaModelRunner> {
  const saved = Object.fromEntries(Object.keys(env).map((k) => [k, process.env[k]]));
  for (const [k, v] of Object.entries(env)) {
    if (v === null) delete process.env[k];
    else process.env[k] = v;
  }
  try {
    return await CudaModelRunner.create(options);
  } finally {
    for (const [k, v] of Object.entries(saved)) {
      if (v === undefined) delete process.env[k];
      else process.env[k] = v;
    }
  }
}
