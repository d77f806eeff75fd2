/**
 * `tandem frontend --join etcd://HOST:2379 --graph FILE [--host ADDR] [--port N]`: the OpenAI API in front of
 * the workers registered in etcd, reached over TCP (lib/frontend/request-plane-frontend.ts). Runs until SIGINT or
 * SIGTERM, then drains and stops.
 */
import { ROUTER_POLICIES } from '../router/index.js';
import { loadGraph } from '../deploy/graph.js';
import { joinFrontend } from '../frontend/request-plane-frontend.js';
import { choiceOption, numberOption, UsageError } from './args.js';
import { watchSignals } from './signals.js';

export interface FrontendArgs {
  join?: string;
  graph?: string;
  host?: string;
  port?: string;
  namespace?: string;
  'api-key'?: string;
  'migration-limit'?: string;
  'router-policy'?: string;
}

export async function frontend(args: FrontendArgs): Promise<number> {
  if (!args.join) throw new UsageError('tandem frontend needs --join etcd://HOST:2379');
  if (!args.graph) throw new UsageError('tandem frontend needs --graph FILE');
  if (args.host === '') throw new UsageError('--host must not be empty');
  if (args['api-key'] === '') throw new UsageError('--api-key must not be empty');
  const port = numberOption('port', args.port, { integer: true, min: 0, max: 65535 });
  const migrationLimit = numberOption('migration-limit', args['migration-limit'], { integer: true, min: 0 });
  const routerPolicy = choiceOption('router-policy', args['router-policy'], ROUTER_POLICIES);
  const graph = loadGraph(args.graph);
  const namespace = args.namespace ?? (process.env.TANDEM_CONTROL_NAMESPACE || undefined);
  if (migrationLimit !== undefined) graph.frontend.migrationLimit = migrationLimit;
  if (routerPolicy) graph.router.policy = routerPolicy;
  // --api-key, else the variable the graph names (joinFrontend reads it), else TANDEM_API_KEY.
  const apiKey = args['api-key'] ?? (graph.frontend.apiKeyEnv ? undefined : process.env.TANDEM_API_KEY || undefined);
  const signals = watchSignals();
  try {
    const joined = await joinFrontend({
      graph,
      control: args.join,
      ...(namespace ? { controlOptions: { namespace } } : {}),
      ...(args.host ? { host: args.host } : {}),
      ...(port !== undefined ? { port } : {}),
      ...(apiKey !== undefined ? { apiKey } : {}),
    });
    console.log(`tandem: frontend on ${joined.frontend.url}/v1, workers from etcd (${args.join})`);
    const signal = await signals.next();
    console.log(`tandem: ${signal}: draining requests in flight (up to 10 s), then stopping`);
    await joined.stop({ drainMs: 10_000 });
  } finally {
    signals.close();
  }
  return 0;
}
