import { describe, expect, it } from 'vitest';
import { byteTextTokenizer } from '../../lib/engine/tokenizer.js';
import { startFrontend } from '../../lib/frontend/index.js';
import { FakeBackend } from '../helpers/fake-backend.js';

// GET /planner on a frontend by itself: what its planner status provider says, without an API key (like
// /metrics); a frontend with no planner behind it answers 404 in OpenAI's error shape.
function start(plannerStatus?: () => unknown) {
  return startFrontend({
    backend: new FakeBackend(),
    tokenizer: byteTextTokenizer(),
    modelName: 'dummy:tiny',
    contextLength: 256,
    vocabSize: 258,
    port: 0,
    apiKey: 'secret',
    log: () => {},
    ...(plannerStatus ? { plannerStatus } : {}),
  });
}

describe('GET /planner', () => {
  it("answers the planner's status as JSON, read at each request, with no API key", async () => {
    let decisions = 0;
    const f = await start(() => ({ mode: 'load', decisions: ++decisions }));
    try {
      const a = await fetch(`${f.url}/planner`);
      expect(a.status).toBe(200);
      expect(a.headers.get('content-type')).toBe('application/json');
      expect(await a.json()).toEqual({ mode: 'load', decisions: 1 });
      expect(await (await fetch(`${f.url}/planner/`)).json()).toEqual({ mode: 'load', decisions: 2 });
      expect((await fetch(`${f.url}/planner`, { method: 'POST' })).status).toBe(405);
    } finally {
      await f.close({ drainMs: 0 });
    }
  });

  it('404 without a planner behind the frontend', async () => {
    const f = await start();
    try {
      const res = await fetch(`${f.url}/planner`);
      expect(res.status).toBe(404);
      expect(((await res.json()) as { error: { code: string } }).error.code).toBe('not_found');
    } finally {
      await f.close({ drainMs: 0 });
    }
  });
});
