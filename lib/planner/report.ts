/** What `tandem profile` and `tandem plan` print and draw: tables of a profile and a plan, a chart of a profile. */
import { axisFor, colourScheme, PANEL_HEIGHT, PANEL_WIDTH, panels, type ChartSpec } from '../bench/chart.js';
import { formatTable, plain, sig } from '../bench/table.js';
import type { CapacityPlan } from './capacity.js';
import { layoutName, type Profile } from './profile.js';

/** A profile's header line and its prefill and decode tables, one pair per layout. */
export function formatProfile(profile: Profile): string {
  const out: string[] = [];
  const d = profile.device;
  out.push(
    `${profile.model} on ${d.kind} (${d.name}${d.threads ? `, ${d.threads} threads` : ''}), ` +
      `block ${profile.engine.blockSize}, ${profile.engine.maxNumBatchedTokens} tokens per step, ${profile.engine.dtype}` +
      `${profile.measurement.quick ? ', quick' : ''}; ${profile.createdAt}`,
  );
  for (const layout of profile.layouts) {
    out.push('');
    out.push(
      `layout ${layoutName(layout.parallelism)}: ${layout.gpusPerReplica} device(s) per replica (${profile.device.kind === 'cpu' ? 'CPU ranks' : 'GPUs'}), ` +
        `KV cache ${layout.kvCapacityTokens} tokens, ${layout.maxModelLen} tokens per sequence`,
    );
    out.push('');
    out.push(
      formatTable(
        ['prefill ISL', 'ms (p50)', 'min', 'max', 'tokens/s'],
        layout.prefill.map((p) => [String(p.isl), sig(p.ms), sig(p.msMin), sig(p.msMax), plain((p.isl * 1000) / p.ms)]),
      ),
    );
    out.push('');
    out.push(
      formatTable(
        ['decode batch', 'context', 'step ms (p50)', 'min', 'max', 'tokens/s'],
        [...layout.decode]
          .sort((a, b) => a.context - b.context || a.batch - b.batch)
          .map((p) => [
            String(p.batch),
            String(p.context),
            sig(p.stepMs),
            sig(p.stepMsMin),
            sig(p.stepMsMax),
            plain((p.batch * 1000) / p.stepMs),
          ]),
      ),
    );
  }
  return out.join('\n');
}

/** A plan as a table: one row per pool, then the totals and, over budget, what the deployment serves. */
export function formatPlan(plan: CapacityPlan): string {
  const r = plan.request;
  const { prefill: p, decode: d } = plan;
  const mark = (extrapolated: boolean) => (extrapolated ? ' *' : '');
  const lines = [
    `load ${plain(r.rate)} req/s, ISL ${r.isl}, OSL ${r.osl}; SLA TTFT ${plain(r.ttftMs)} ms, ITL ${plain(r.itlMs)} ms; ` +
      `budget ${r.gpus} GPUs`,
    '',
    formatTable(
      ['pool', 'layout', 'replicas', 'needed', 'GPUs', 'req/s per replica', 'at'],
      [
        [
          'prefill',
          p.layout,
          String(p.replicas),
          String(p.replicasNeeded),
          String(p.gpus),
          sig(p.ratePerReplica),
          `prefill ${sig(p.prefillMs)} ms, busy ${Math.round(p.utilization * 100)}%${mark(p.extrapolated)}`,
        ],
        [
          'decode',
          d.layout,
          String(d.replicas),
          String(d.replicasNeeded),
          String(d.gpus),
          sig(d.ratePerReplica),
          `batch ${d.batch} (ITL ${d.itlBatch}, KV ${d.kvBatch}), step ${sig(d.stepMs)} ms at ${Math.round(d.context)} tokens${mark(d.extrapolated)}`,
        ],
      ],
      ['left', 'left', 'right', 'right', 'right', 'right', 'left'],
    ),
    '',
    plan.status === 'ok'
      ? `${plan.gpusUsed} GPUs; serves up to ${sig(plan.servableRate)} req/s within the SLAs`
      : `over budget: the SLAs need ${plan.gpusNeeded} GPUs; best effort with ${plan.gpusUsed} serves ${sig(plan.servableRate)} req/s within the SLAs`,
  ];
  if (p.extrapolated || d.extrapolated)
    lines.push("* outside the profile's measured range (extrapolated; see lib/planner/performance-model.ts)");
  lines.push('', 'layouts considered (the fewest devices that meet the SLA; ties: the lower latency):', '');
  const rows = (['prefill', 'decode'] as const).flatMap((pool) =>
    plan.alternatives[pool].map((a) => [
      pool,
      `${a.layout}${a.chosen ? ' <' : ''}`,
      String(a.gpusPerReplica),
      a.replicasNeeded === undefined ? '-' : String(a.replicasNeeded),
      a.gpus === undefined ? '-' : String(a.gpus),
      a.latencyMs === undefined ? '-' : sig(a.latencyMs),
      a.reason ?? `${sig(a.ratePerReplica!)} req/s per replica`,
    ]),
  );
  lines.push(
    formatTable(['pool', 'layout', 'devices/replica', 'replicas', 'devices', 'latency ms', 'note'], rows, [
      'left',
      'left',
      'right',
      'right',
      'right',
      'right',
      'left',
    ]),
    '< chosen; latency: prefill of one prompt alone, or a decode step at the planned batch',
  );
  return lines.join('\n');
}

/** Two panels: prefill time against ISL; decode step time against batch, one line per context (and layout). */
export function profileChart(profile: Profile): ChartSpec {
  const multi = profile.layouts.length > 1;
  const prefill = profile.layouts.flatMap((l) =>
    l.prefill.map((p) => ({ series: layoutName(l.parallelism), isl: p.isl, ms: p.ms })),
  );
  const decode = profile.layouts.flatMap((l) =>
    l.decode.map((p) => ({
      series: `${multi ? `${layoutName(l.parallelism)}, ` : ''}context ${p.context}`,
      context: p.context,
      batch: p.batch,
      ms: p.stepMs,
    })),
  );
  const decodeSeries = [...new Set([...decode].sort((a, b) => a.context - b.context).map((p) => p.series))];
  // The panels share one colour scale: with several layouts, one sorted domain over both (prefill's layouts first).
  const colourDomain = multi ? [...new Set(prefill.map((p) => p.series)), ...decodeSeries] : decodeSeries;
  const d = profile.device;
  return panels(
    {
      text: `Profile of ${profile.model}`,
      subtitle: `${d.kind}: ${d.name}${d.threads ? `, ${d.threads} threads` : ''}; ${profile.createdAt.slice(0, 10)}`,
    },
    [
      {
        title: 'prefill: one prompt alone',
        width: PANEL_WIDTH,
        height: PANEL_HEIGHT,
        data: { values: prefill },
        mark: { type: 'line', point: true },
        encoding: {
          x: axisFor(
            'isl',
            'input length (tokens)',
            prefill.map((p) => p.isl),
            {
              base: 2,
              zero: false,
              labelExpr: "format(datum.value, 'd')",
              ticks: [...new Set(prefill.map((p) => p.isl))],
            },
          ),
          y: axisFor(
            'ms',
            'prefill time (ms)',
            prefill.map((p) => p.ms),
          ),
          // One colour per layout; with one layout, no legend.
          ...(multi
            ? {
                color: {
                  field: 'series',
                  type: 'nominal',
                  title: 'layout',
                  sort: colourDomain,
                  scale: { scheme: colourScheme(colourDomain.length) },
                },
              }
            : {}),
        },
      },
      {
        title: 'decode: one step of the batch',
        width: PANEL_WIDTH,
        height: PANEL_HEIGHT,
        data: { values: decode },
        mark: { type: 'line', point: true },
        encoding: {
          x: axisFor(
            'batch',
            'batch (sequences)',
            decode.map((p) => p.batch),
            {
              base: 2,
              zero: false,
              labelExpr: "format(datum.value, 'd')",
              ticks: [...new Set(decode.map((p) => p.batch))],
            },
          ),
          y: axisFor(
            'ms',
            'step time (ms)',
            decode.map((p) => p.ms),
          ),
          color: {
            field: 'series',
            type: 'nominal',
            title: 'KV context per sequence (tokens)',
            sort: colourDomain,
            scale: { scheme: colourScheme(colourDomain.length) },
          },
        },
      },
    ],
  );
}
