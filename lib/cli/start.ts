/**
 * `tandem start` (npm start) and `tandem serve -f graph.yaml`: run a deployment on this machine until
 * SIGINT/SIGTERM, then drain and stop. Without a file: the embedded default graph, a frontend on
 * 127.0.0.1:8000 with one prefill and one decode worker.
 */
import { capabilities } from '../capabilities/index.js';
import { ROUTER_POLICIES } from '../router/index.js';
import { defaultGraph, loadGraph, SERVING_MODES, type DeploymentGraph } from '../deploy/graph.js';
import { banner, startDeployment } from '../deploy/launcher.js';
import { choiceOption, numberOption, UsageError } from './args.js';
import { watchSignals } from './signals.js';

export interface StartArgs {
  file?: string;
  mode?: string;
  model?: string;
  host?: string;
  port?: string;
  seed?: string;
  'api-key'?: string;
  'router-policy'?: string;
  'migration-limit'?: string;
  /** serve only: etcd as the control plane (`etcd://HOST:2379`), and its namespace. */
  control?: string;
  namespace?: string;
}

/**
 * The deployment graph the command line describes: the file's, or the embedded default; the options that
 * override a graph applied. Throws UsageError or GraphError.
 */
export async function graphOf(args: StartArgs): Promise<DeploymentGraph> {
  const mode = choiceOption('mode', args.mode, SERVING_MODES);
  const port = numberOption('port', args.port, { integer: true, min: 0, max: 65535 });
  const routerPolicy = choiceOption('router-policy', args['router-policy'], ROUTER_POLICIES);
  const migrationLimit = numberOption('migration-limit', args['migration-limit'], { integer: true, min: 0 });
  if (args.host === '') throw new UsageError('--host must not be empty');
  if (args['api-key'] === '') throw new UsageError('--api-key must not be empty');
  let graph: DeploymentGraph;
  if (args.file) {
    graph = loadGraph(args.file);
    if (mode && mode !== graph.mode)
      throw new UsageError(`--mode ${mode} differs from the graph's mode ${graph.mode}; edit the file`);
    if (port !== undefined) {
      // --port P: the frontends listen on P, P + 1, ... whatever ports the file lists.
      graph.frontend.port = port;
      delete graph.frontend.ports;
    }
    if (args.host) graph.frontend.host = args.host;
  } else {
    const caps = await capabilities();
    const gpus = caps.cuda.available ? caps.cuda.devices.length : 0;
    if (gpus > 0) {
      console.log(
        gpus >= 2
          ? `tandem: ${gpus} GPUs found: prefill on GPU 0, decode on GPU 1 (GPU engine, bf16)`
          : 'tandem: 1 GPU found: prefill and decode share GPU 0 (GPU engine, bf16)',
      );
    }
    graph = defaultGraph({
      gpus,
      ...(args.model ? { model: args.model } : {}),
      ...(mode ? { mode } : {}),
      ...(args.host ? { host: args.host } : {}),
      ...(port !== undefined ? { port } : {}),
    });
  }
  if (routerPolicy) graph.router.policy = routerPolicy;
  if (migrationLimit !== undefined) graph.frontend.migrationLimit = migrationLimit;
  return graph;
}

export async function start(args: StartArgs): Promise<number> {
  const seed = numberOption('seed', args.seed, { integer: true }) ?? 0;
  if (args.namespace !== undefined && !args.control)
    throw new UsageError('--namespace goes with --control etcd://HOST:2379');
  const graph = await graphOf(args);
  // --api-key, else the variable the graph names (the launcher reads it), else TANDEM_API_KEY.
  const apiKey = args['api-key'] ?? (graph.frontend.apiKeyEnv ? undefined : process.env.TANDEM_API_KEY || undefined);
  // Watched from here: a signal while the workers start stops the deployment once it is up, children included.
  const signals = watchSignals();
  try {
    const deployment = await startDeployment(graph, {
      seed,
      ...(apiKey !== undefined ? { apiKey } : {}),
      ...(args.control
        ? { control: { endpoints: args.control, ...(args.namespace ? { namespace: args.namespace } : {}) } }
        : {}),
    });
    console.log(banner(deployment));
    const signal = await signals.next();
    console.log(`tandem: ${signal}: draining requests in flight (up to 10 s), then stopping the workers`);
    await deployment.stop({ drainMs: 10_000 });
    console.log('tandem: stopped');
  } finally {
    signals.close();
  }
  return 0;
}
