import { capabilities, type Capabilities } from '../../lib/index.js';

/**
 * Decides whether GPU tests run here. Without a GPU they are skipped and the reason is printed; with
 * TANDEM_REQUIRE_GPU=1 (npm run test:gpu) a missing GPU is a failure instead.
 */
export async function gpuGate(minDevices = 1): Promise<{ run: boolean; caps: Capabilities; reason?: string }> {
  const caps = await capabilities();
  const count = caps.cuda.available ? caps.cuda.devices.length : 0;
  if (count >= minDevices) return { run: true, caps };
  const reason = caps.cuda.available
    ? `needs ${minDevices} CUDA devices, found ${count}`
    : `CUDA unavailable: ${caps.cuda.reason}`;
  if (process.env.TANDEM_REQUIRE_GPU === '1') {
    throw new Error(`TANDEM_REQUIRE_GPU=1 but ${reason}`);
  }
  console.warn(`[skipped] GPU tests: ${reason}`);
  return { run: false, caps, reason };
}
