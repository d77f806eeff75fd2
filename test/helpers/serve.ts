import type { Deployment } from '../../lib/serve/launcher.js';

/** One sample of a Prometheus text exposition, by its name and labels as printed, or their start (NaN when absent). */
export function sample(text: string, name: string): number {
  const line = text.split('\n').find((l) => l.startsWith(name));
  return line ? Number(line.split(' ').pop()) : NaN;
}

/** One sample of a deployment's /metrics, as `sample` finds it. */
export async function metric(d: Deployment, name: string): Promise<number> {
  return sample(await (await fetch(`${d.frontend.url}/metrics`)).text(), name);
}

/** Remote and local prefills counted so far. */
export async function prefillCounts(d: Deployment): Promise<{ remote: number; local: number }> {
  return {
    remote: await metric(d, 'tandem_prefills_total{where="remote"}'),
    local: await metric(d, 'tandem_prefills_total{where="local"}'),
  };
}
