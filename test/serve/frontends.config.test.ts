import { describe, expect, it } from 'vitest';
import { parseCommandLine } from '../../lib/cli/args.js';
import { frontendPorts, GraphError, parseGraph } from '../../lib/deploy/graph.js';
import { requestPlaneId, parseRequestPlaneId } from '../../lib/deploy/launcher.js';
import { runTs } from '../helpers/cli.js';

// The frontend section of the graph: replicas and their ports, migrationLimit; the --migration-limit flag; the
// request-plane ids that route a worker's messages to the frontend that owns the request.
const MINIMAL = `model: dummy:tiny
pools:
  - { name: prefill, role: prefill, device: cpu }
  - { name: decode, role: decode, device: cpu }
`;

function errorOf(text: string): string {
  try {
    parseGraph(text);
  } catch (error) {
    expect(error).toBeInstanceOf(GraphError);
    return (error as Error).message;
  }
  throw new Error('the graph parsed');
}

describe('graph: frontend replicas and migration', () => {
  it('defaults: one frontend, three migrations', () => {
    const g = parseGraph(MINIMAL);
    expect(g.frontend).toEqual({ host: '127.0.0.1', port: 8000, replicas: 1, migrationLimit: 3 });
    expect(frontendPorts(g.frontend)).toEqual([8000]);
  });

  it('replicas listen on port, port + 1, ...; or on the ports listed; port 0 picks free ports', () => {
    const g = parseGraph(`${MINIMAL}frontend: { port: 9000, replicas: 3, migrationLimit: 0 }\n`);
    expect(g.frontend).toMatchObject({ port: 9000, replicas: 3, migrationLimit: 0 });
    expect(frontendPorts(g.frontend)).toEqual([9000, 9001, 9002]);
    const listed = parseGraph(`${MINIMAL}frontend: { replicas: 2, ports: [8100, 8080] }\n`);
    expect(listed.frontend.port).toBe(8100);
    expect(frontendPorts(listed.frontend)).toEqual([8100, 8080]);
    expect(frontendPorts(parseGraph(`${MINIMAL}frontend: { port: 0, replicas: 2 }\n`).frontend)).toEqual([0, 0]);
  });

  it('bad values are refused where they are', () => {
    expect(errorOf(`${MINIMAL}frontend: { migrationLimit: -1 }\n`)).toBe(
      'graph.yaml:5:29: frontend.migrationLimit: must be an integer >= 0',
    );
    expect(errorOf(`${MINIMAL}frontend: { replicas: 0 }\n`)).toBe(
      'graph.yaml:5:23: frontend.replicas: must be a positive integer',
    );
    expect(errorOf(`${MINIMAL}frontend: { replicas: 2, ports: [8000] }\n`)).toBe(
      'graph.yaml:5:33: frontend.ports: must list one port per replica (2; got 1)',
    );
    expect(errorOf(`${MINIMAL}frontend: { replicas: 2, ports: [8000, 8000] }\n`)).toBe(
      'graph.yaml:5:33: frontend.ports: must not repeat a port (0 excepted)',
    );
    expect(errorOf(`${MINIMAL}frontend: { port: 8000, ports: [8000] }\n`)).toBe(
      'graph.yaml:5:32: frontend.ports: set port or ports, not both',
    );
    expect(errorOf(`${MINIMAL}frontend: { ports: [70000] }\n`)).toBe(
      'graph.yaml:5:21: frontend.ports[0]: must be an integer in 0..65535',
    );
    expect(errorOf(`${MINIMAL}frontend: { port: 65535, replicas: 2 }\n`)).toBe(
      'graph.yaml:5:36: frontend.replicas: 2 frontends from port 65535 go past port 65535',
    );
    expect(errorOf(`${MINIMAL}frontend: { migration_limit: 1 }\n`)).toBe(
      "graph.yaml:5:13: frontend: unknown key 'migration_limit' (did you mean 'migrationLimit'?)",
    );
  });

  it('--migration-limit is a serving option, an integer >= 0', () => {
    expect(parseCommandLine(['serve', '-f', 'g.yaml', '--migration-limit', '0']).values['migration-limit']).toBe('0');
    expect(parseCommandLine(['start', '--migration-limit', '5']).values['migration-limit']).toBe('5');
    expect(() => parseCommandLine(['generate', '--migration-limit', '1'])).toThrow(
      'unknown option --migration-limit for generate',
    );
    const r = runTs('lib/cli/main.ts', ['start', '--migration-limit', '-1']);
    expect(r.status).toBe(2);
    expect(r.stderr).toBe('tandem: --migration-limit must be an integer >= 0 (got -1)\n');
  });
});

describe('request-plane ids', () => {
  it('carry the frontend that owns the request, whatever its id holds', () => {
    for (const id of ['chatcmpl-abc', 'a/b#m1', '', 'f2/x'])
      expect(parseRequestPlaneId(requestPlaneId(3, id))).toEqual({ frontend: 3, requestId: id });
    expect(parseRequestPlaneId('chatcmpl-abc')).toBeUndefined();
    expect(parseRequestPlaneId('fx/1')).toBeUndefined();
  });
});
