import { CudaDevice, TransferAgent, type DeviceBuffer, type Region, type RemotePeer } from '../../lib/index.js';
import { fillPatternOnGpu } from './gpu-pattern.js';
import { PeerProcess } from './peer.js';

/**
 * An initiator in this process and a target process, each with `bytes` of device memory filled with a
 * seeded pattern and registered with its agent, each having loaded the other's metadata.
 */
export interface GpuTransferPair {
  target: PeerProcess;
  agent: TransferAgent;
  device: CudaDevice;
  buffer: DeviceBuffer;
  local: Region;
  peer: RemotePeer;
  /** The target's region id. */
  remote: number;
  dispose(): Promise<void>;
}

export async function gpuTransferPair(options: {
  name: string;
  localGpu: number;
  remoteGpu: number;
  bytes: number;
  seedLocal: number;
  seedRemote: number;
  timeoutMs?: number;
  /** How the target receives notifications (its agent's option). */
  notifications?: 'events' | 'poll';
}): Promise<GpuTransferPair> {
  const timeout = options.timeoutMs ? { timeoutMs: options.timeoutMs } : {};
  const target = await PeerProcess.start();
  await target.request('create', {
    name: `${options.name}-target`,
    ...timeout,
    ...(options.notifications ? { notifications: options.notifications } : {}),
  });
  const remote = (
    await target.request<{ region: { id: number } }>('allocDevice', {
      device: options.remoteGpu,
      bytes: options.bytes,
      seed: options.seedRemote,
    })
  ).region.id;
  const agent = await TransferAgent.create({ name: `${options.name}-initiator`, ...timeout });
  const device = await CudaDevice.open(options.localGpu);
  const buffer = await device.alloc(options.bytes);
  await fillPatternOnGpu(device, buffer, options.seedLocal);
  const local = agent.registerDevice(buffer);
  const { metadata } = await target.request<{ metadata: string }>('metadata');
  const peer = agent.loadRemote(Buffer.from(metadata, 'base64'));
  await target.request('load', { metadata: Buffer.from(agent.metadata()).toString('base64') });
  return {
    target,
    agent,
    device,
    buffer,
    local,
    peer,
    remote,
    dispose: async () => {
      await agent.dispose();
      await device.dispose();
      await target.stop();
    },
  };
}
