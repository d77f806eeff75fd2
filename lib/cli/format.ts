import type { Capabilities } from '../capabilities/index.js';

const gib = (bytes: number) => `${(bytes / 2 ** 30).toFixed(1)} GiB`;
const status = (ok: boolean) => (ok ? 'available' : 'unavailable');

/** Human-readable form of capabilities(), as printed by `tandem info`. */
export function formatCapabilities(c: Capabilities): string {
  const out: string[] = [];
  out.push(`Tandem ${c.tandem.version} (addon ${c.tandem.addonVersion}, ${c.tandem.addonPath})`);
  out.push(
    `Node ${c.node.version}, N-API ${c.node.napiVersion} (addon built for ${c.node.addonNapiVersion}), ` +
      `${c.node.platform}-${c.node.arch}${c.node.glibc ? `, glibc ${c.node.glibc}` : ''}`,
  );
  out.push(
    `CPU: ${c.cpu.cores} cores (${c.cpu.model}), memory ${gib(c.cpu.memoryBytes)} (${gib(c.cpu.freeMemoryBytes)} free)`,
  );
  out.push('');

  out.push(`CUDA: ${status(c.cuda.available)}${c.cuda.driverVersion ? `, driver ${c.cuda.driverVersion}` : ''}`);
  if (c.cuda.reason) out.push(`  reason: ${c.cuda.reason}`);
  if (c.cuda.libraryPath) out.push(`  library: ${c.cuda.libraryPath}`);
  for (const d of c.cuda.devices) {
    out.push(
      `  [${d.ordinal}] ${d.name}: ${gib(d.memoryBytes)}, compute ${d.computeCapability}, ${d.multiprocessors} SMs, ` +
        `~${d.memoryBandwidthGBps} GB/s DRAM`,
    );
    out.push(`      ${d.uuid}  pci ${d.pciBusId}`);
  }
  if (c.cuda.devices.length > 1) {
    out.push('  peer access (row can map column):');
    out.push('        ' + c.cuda.devices.map((d) => `[${d.ordinal}]`.padStart(6)).join(''));
    c.cuda.peerAccess.forEach((row, i) => {
      out.push(`    [${i}] ` + row.map((v, j) => (i === j ? '-' : v ? 'yes' : 'no').padStart(6)).join(''));
    });
    if (c.cuda.nvlink.available) {
      out.push(`  NVLink links (x ${c.cuda.nvlink.perLinkGBps ?? '?'} GB/s per direction):`);
      c.cuda.nvlink.links.forEach((row, i) => {
        out.push(
          `    [${i}] ` +
            row.map((n, j) => (i === j ? '-' : `${n}`).padStart(6)).join('') +
            `   (${row
              .map((_, j) => (i === j ? null : `${c.cuda.nvlink.bandwidthGBps[i]?.[j] ?? 0} GB/s`))
              .filter(Boolean)
              .join(', ')})`,
        );
      });
    } else if (c.cuda.nvlink.reason) {
      out.push(`  NVLink: unknown (${c.cuda.nvlink.reason})`);
    }
  }
  out.push('');

  out.push(`NCCL: ${status(c.nccl.available)}${c.nccl.version ? ` ${c.nccl.version}` : ''}`);
  if (c.nccl.reason) out.push(`  reason: ${c.nccl.reason}`);
  if (c.nccl.libraryPath) out.push(`  library: ${c.nccl.libraryPath}`);

  out.push(`UCX: ${status(c.ucx.available)}${c.ucx.version ? ` ${c.ucx.version}` : ''}`);
  if (c.ucx.reason) out.push(`  reason: ${c.ucx.reason}`);
  if (c.ucx.libraryPath) out.push(`  library: ${c.ucx.libraryPath}`);
  if (c.ucx.available) {
    out.push(`  transports: ${c.ucx.transports.join(', ') || 'none'}`);
    if (c.ucx.modules.length) out.push(`  modules: ${c.ucx.modules.join(', ')}`);
    out.push(`  GPU memory through UCX: ${c.ucx.cudaTransports ? 'yes' : `no (${c.ucx.cudaTransportsReason ?? ''})`}`);
  }

  out.push(`cuBLAS: ${status(c.cublas.available)}${c.cublas.version ? ` ${c.cublas.version}` : ''}`);
  if (c.cublas.reason) out.push(`  reason: ${c.cublas.reason}`);
  if (c.cublas.libraryPath) out.push(`  library: ${c.cublas.libraryPath}`);
  out.push(`  cuBLASLt: ${status(c.cublas.lt.available)}${c.cublas.lt.version ? ` ${c.cublas.lt.version}` : ''}`);
  if (c.cublas.lt.reason) out.push(`    reason: ${c.cublas.lt.reason}`);
  out.push('');

  const k = c.kernels;
  out.push(
    `Kernels: ${k.built ? `built for ${k.architectures.join(', ')} + PTX ${k.ptx.join(', ')}` : 'not built'}; ` +
      `${k.loaded ? 'loaded on device 0' : 'not loaded'}`,
  );
  out.push(`  fatbin: ${k.path}`);
  if (k.reason) out.push(`  reason: ${k.reason}`);
  return out.join('\n');
}
