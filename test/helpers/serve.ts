import type { Deployment } from '../../lib/serve/launcher.js';

/** One sample of a deployment's /metrics, by its name and labels as printed (NaN when absent). */
export async function metric(d: Deployment, name: string): Promise<number> {
  const text = await (await fetch(`${d.frontend.url}/metrics`)).text();
  const line = text.split('\n').find((l) => l.startsWith(name));
  return line ? Number(line.split(' ').pop()) : NaN;
}

/** Remote and local prefills counted so far. */
export async function prefillCounts(d: Deployment): Promise<{ remote: number; local: number }> {
  return {
    remote: await metric(d, 'tandem_prefills_total{where="remote"}'),
    local: await metric(d, 'tandem_prefills_total{where="local"}'),
  };
}
