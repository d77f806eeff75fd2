/**
 * Offline validation of manifests against the Kubernetes API's OpenAPI schemas (Kubernetes 1.27, as the
 * kubernetes-models package carries them): types, required fields, enums and formats. Like the API server's
 * schema, it does not refuse unknown fields.
 */
import { Deployment, StatefulSet } from 'kubernetes-models/apps/v1';
import { Role, RoleBinding } from 'kubernetes-models/rbac.authorization.k8s.io/v1';
import { ConfigMap, Namespace, Secret, Service, ServiceAccount } from 'kubernetes-models/v1';
import { TandemError } from '../../errors.js';

/** One or more manifests do not validate; `problems` has one line per problem: `Kind/name: path message`. */
export class K8sManifestError extends TandemError {
  constructor(readonly problems: readonly string[]) {
    super(
      'TANDEM_BAD_K8S_MANIFEST',
      `manifests do not validate against the Kubernetes schemas:\n${problems.join('\n')}`,
    );
  }
}

interface Validatable {
  validate(): void;
}
type ModelClass = new (data: never) => Validatable;

/** The kinds the renderer writes (and a few it may write), by `apiVersion/kind`. */
const MODELS: Record<string, ModelClass> = {
  'v1/ConfigMap': ConfigMap,
  'v1/Namespace': Namespace,
  'v1/Secret': Secret,
  'v1/Service': Service,
  'v1/ServiceAccount': ServiceAccount,
  'apps/v1/Deployment': Deployment,
  'apps/v1/StatefulSet': StatefulSet,
  'rbac.authorization.k8s.io/v1/Role': Role,
  'rbac.authorization.k8s.io/v1/RoleBinding': RoleBinding,
} as unknown as Record<string, ModelClass>;

/** The problems of each manifest (empty when all validate). */
export function manifestProblems(objects: readonly unknown[]): string[] {
  const problems: string[] = [];
  objects.forEach((object, i) => {
    const o = (object ?? {}) as { apiVersion?: unknown; kind?: unknown; metadata?: { name?: unknown } };
    const where = `${String(o.kind ?? `document ${i + 1}`)}/${String(o.metadata?.name ?? '?')}`;
    const Model = MODELS[`${String(o.apiVersion)}/${String(o.kind)}`];
    if (!Model) {
      problems.push(
        `${where}: apiVersion ${String(o.apiVersion)} kind ${String(o.kind)} is not a kind this validator knows`,
      );
      return;
    }
    try {
      new Model(object as never).validate();
    } catch (error) {
      for (const line of (error as Error).message.split(/,\s*(?=data)|\n/))
        problems.push(`${where}: ${line.replace(/^data\/?/, '/')}`);
    }
  });
  return problems;
}

/** Throws K8sManifestError listing every problem. */
export function validateManifests(objects: readonly unknown[]): void {
  const problems = manifestProblems(objects);
  if (problems.length) throw new K8sManifestError(problems);
}
