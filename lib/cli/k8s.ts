/**
 * `tandem k8s render -f graph.yaml [--out DIR] ...`: the Kubernetes manifests of a deployment graph, checked
 * against the Kubernetes schemas before anything is written. Without --out, one YAML stream on stdout
 * (`| kubectl apply -f -`); with it, one file per component. Notes (what the reader must provide) go to stderr.
 */
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { parseEtcdEndpoints } from '../control/index.js';
import {
  DEFAULT_DEPLOYMENT_NAME,
  DEFAULT_ETCD_IMAGE,
  DEFAULT_IMAGE,
  DEFAULT_K8S_NAMESPACE,
  DEFAULT_TOKEN_SECRET,
  manifestsToYaml,
  renderKubernetes,
  validateManifests,
} from '../deploy/index.js';
import { BadArgumentError } from '../errors.js';
import { loadGraph } from '../deploy/graph.js';
import { UsageError } from './args.js';

export const K8S_HELP = `Usage: tandem k8s render -f graph.yaml [options]

Writes the Kubernetes manifests of a deployment graph: a ConfigMap with the graph, RBAC for the planner
when it scales the pools (planner.connector kubernetes), etcd (StatefulSet + Service) unless --etcd names
one, the frontend (Deployment + Service) and one StatefulSet with a headless Service per pool (replicas and
nvidia.com/gpu from the graph). They are validated against the Kubernetes 1.27 schemas before they are
written.

Options:
  -f, --file FILE         the deployment graph (required)
  --out DIR               write one file per component into DIR (created); default: one stream on stdout
  --image IMAGE           image of the frontend and workers (default ${DEFAULT_IMAGE})
  --namespace NS          Kubernetes namespace of every object (default ${DEFAULT_K8S_NAMESPACE})
  --name NAME             prefix of the objects' names and the etcd key namespace (default ${DEFAULT_DEPLOYMENT_NAME})
  --etcd etcd://HOST:PORT use this etcd instead of rendering one
  --etcd-image IMAGE      image of the rendered etcd (default ${DEFAULT_ETCD_IMAGE})
  --token-secret NAME     Secret with the shared token (key token; key api-key when the graph names
                          frontend.apiKeyEnv) (default ${DEFAULT_TOKEN_SECRET})
  -h, --help              this help`;

const OPTIONS = {
  help: { type: 'boolean', short: 'h' },
  file: { type: 'string', short: 'f' },
  out: { type: 'string' },
  image: { type: 'string' },
  namespace: { type: 'string' },
  name: { type: 'string' },
  etcd: { type: 'string' },
  'etcd-image': { type: 'string' },
  'token-secret': { type: 'string' },
} as const;

/** `tandem k8s ...` (argv after `k8s`). Throws UsageError, GraphError, K8sRenderError. */
export function k8sMain(argv: string[]): number {
  if (argv[0] === '--help' || argv[0] === '-h') {
    console.log(K8S_HELP);
    return 0;
  }
  if (argv[0] !== 'render')
    throw new UsageError(
      `k8s needs render (got ${argv[0] === undefined ? 'nothing' : `'${argv[0]}'`}) (see tandem k8s --help)`,
    );
  let values: ReturnType<typeof parseArgs<{ options: typeof OPTIONS }>>['values'];
  try {
    ({ values } = parseArgs({ args: argv.slice(1), options: OPTIONS, strict: true, allowPositionals: false }));
  } catch (error) {
    // node's message, first sentence: "Unknown option '--bogus'", "Option '--out <value>' argument missing"
    const first = (error as Error).message.split(/\.\s|\n/)[0]!;
    throw new UsageError(`${first} (see tandem k8s --help)`);
  }
  if (values.help) {
    console.log(K8S_HELP);
    return 0;
  }
  if (!values.file) throw new UsageError('tandem k8s render needs -f graph.yaml');
  for (const name of ['out', 'image', 'namespace', 'name', 'etcd', 'etcd-image', 'token-secret'] as const)
    if (values[name] === '') throw new UsageError(`--${name} must not be empty`);
  if (values.etcd !== undefined) {
    try {
      parseEtcdEndpoints(values.etcd);
    } catch (error) {
      if (error instanceof BadArgumentError) throw new UsageError(`--etcd: ${error.message}`);
      throw error;
    }
  }

  const graph = loadGraph(values.file);
  const rendering = renderKubernetes(graph, {
    ...(values.name !== undefined ? { name: values.name } : {}),
    ...(values.namespace !== undefined ? { namespace: values.namespace } : {}),
    ...(values.image !== undefined ? { image: values.image } : {}),
    ...(values.etcd !== undefined ? { etcd: values.etcd } : {}),
    ...(values['etcd-image'] !== undefined ? { etcdImage: values['etcd-image'] } : {}),
    ...(values['token-secret'] !== undefined ? { tokenSecret: values['token-secret'] } : {}),
  });
  // A manifest that does not validate is the renderer's bug; nothing is written then.
  validateManifests(rendering.files.flatMap((f) => f.objects));
  for (const note of rendering.notes) console.error(`tandem: note: ${note}`);
  if (values.out === undefined) {
    process.stdout.write(manifestsToYaml(rendering.files.flatMap((f) => f.objects)));
    return 0;
  }
  mkdirSync(values.out, { recursive: true });
  for (const { file, objects } of rendering.files) writeFileSync(join(values.out, file), manifestsToYaml(objects));
  console.log(
    `tandem: wrote ${rendering.files.length} files to ${values.out}: ${rendering.files.map((f) => f.file).join(', ')}`,
  );
  return 0;
}
