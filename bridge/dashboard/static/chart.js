// The turn latency chart: an SVG drawn by hand. x: turn number, y: the turn's latency in ms
// (the public log's `turn` events); dashed reference lines for the record's e2e_latency
// percentiles.

import { el, svg } from "./dom.js";

const WIDTH = 640;
const HEIGHT = 260;
const MARGIN = { top: 16, right: 72, bottom: 40, left: 56 };
const LABEL_GAP = 13; // the least vertical distance between two reference labels
const REFERENCES = [
  ["p50", "ref-p50"],
  ["p90", "ref-p90"],
  ["p99", "ref-p99"],
];

/**
 * @param {{t_ms: number, sent_ms?: number, latency_ms: number}[]} turns  in call order (sent_ms: when the answer was sent)
 * @param {{p50?: number, p90?: number, p99?: number} | null} e2e  the record's e2e_latency
 * @param {string} emptyText  what the chart says when there are no turns
 * @returns {SVGSVGElement} with `data-turns` = the number of turns drawn
 */
export function latencyChart(turns, e2e, emptyText = "no turns in this call") {
  const root = svg("svg", {
    viewBox: `0 0 ${WIDTH} ${HEIGHT}`,
    class: "chart",
    role: "img",
    "aria-label": `Turn latency, ${turns.length} turns`,
    "data-turns": turns.length,
  });
  const plot = { x: MARGIN.left, y: MARGIN.top, w: WIDTH - MARGIN.left - MARGIN.right, h: HEIGHT - MARGIN.top - MARGIN.bottom };

  const references = REFERENCES.filter(([name]) => Number.isFinite(e2e?.[name]));
  // an empty chart still gets a sensible scale (a second)
  const floor = turns.length || references.length ? 1 : 1000;
  const highest = Math.max(floor, ...turns.map((t) => t.latency_ms), ...references.map(([name]) => e2e[name]));
  const yTicks = niceTicks(highest * 1.08, 5);
  const yMax = yTicks[yTicks.length - 1];
  const y = (ms) => plot.y + plot.h - (ms / yMax) * plot.h;
  const n = Math.max(turns.length, 1);
  // Turn i (1-based) sits in the middle of its slot, so one turn is not drawn on an axis.
  const x = (i) => plot.x + ((i - 0.5) / n) * plot.w;

  // grid and y axis
  for (const tick of yTicks) {
    root.append(svg("line", { x1: plot.x, x2: plot.x + plot.w, y1: y(tick), y2: y(tick), class: "grid" }));
    root.append(svg("text", { x: plot.x - 8, y: y(tick) + 4, class: "tick", "text-anchor": "end" }, String(tick)));
  }
  root.append(svg("line", { x1: plot.x, x2: plot.x, y1: plot.y, y2: plot.y + plot.h, class: "axis" }));
  root.append(svg("line", { x1: plot.x, x2: plot.x + plot.w, y1: plot.y + plot.h, y2: plot.y + plot.h, class: "axis" }));
  root.append(
    svg("text", { x: 14, y: plot.y + plot.h / 2, class: "axis-label", transform: `rotate(-90 14 ${plot.y + plot.h / 2})`, "text-anchor": "middle" }, "latency (ms)"),
  );
  root.append(svg("text", { x: plot.x + plot.w / 2, y: HEIGHT - 6, class: "axis-label", "text-anchor": "middle" }, "turn"));

  if (turns.length === 0) {
    root.append(svg("text", { x: plot.x + plot.w / 2, y: plot.y + plot.h / 2, class: "chart-empty", "text-anchor": "middle" }, emptyText));
    return root;
  }

  // x ticks: every turn when they fit, else about 10 of them
  const every = Math.max(1, Math.ceil(turns.length / 10));
  for (let i = 1; i <= turns.length; i += every) {
    root.append(svg("line", { x1: x(i), x2: x(i), y1: plot.y + plot.h, y2: plot.y + plot.h + 4, class: "axis" }));
    root.append(svg("text", { x: x(i), y: plot.y + plot.h + 17, class: "tick", "text-anchor": "middle" }, String(i)));
  }

  // the record's percentiles: a line each, labelled on the right (labels kept apart when the
  // values are close: p50 lowest on screen, as its value is)
  let labelY = Infinity;
  for (const [name, cls] of references) {
    const value = e2e[name];
    root.append(svg("line", { x1: plot.x, x2: plot.x + plot.w, y1: y(value), y2: y(value), class: `ref ${cls}` }));
    labelY = Math.min(y(value) + 4, labelY - LABEL_GAP);
    root.append(svg("text", { x: plot.x + plot.w + 6, y: labelY, class: `ref-label ${cls}` }, `${name} ${Math.round(value)}`));
  }

  // the turns: a line through them, and a dot each with its numbers as a tooltip
  const points = turns.map((t, i) => `${x(i + 1).toFixed(1)},${y(t.latency_ms).toFixed(1)}`).join(" ");
  root.append(svg("polyline", { points, class: "series" }));
  turns.forEach((t, i) => {
    const dot = svg("circle", { cx: x(i + 1), cy: y(t.latency_ms), r: turns.length > 60 ? 2 : 3.5, class: "point" });
    dot.append(svg("title", {}, `turn ${i + 1} at ${((t.sent_ms ?? t.t_ms) / 1000).toFixed(2)} s: ${Math.round(t.latency_ms)} ms`));
    root.append(dot);
  });
  return root;
}

/** Round tick values from 0 to at least `max`: steps of 1, 2 or 5 times a power of ten. */
function niceTicks(max, count) {
  const rough = max / count;
  const power = 10 ** Math.floor(Math.log10(rough));
  const step = [1, 2, 5, 10].map((m) => m * power).find((s) => s >= rough);
  const ticks = [];
  for (let v = 0; v < max + step * 0.001; v += step) ticks.push(Math.round(v * 1000) / 1000);
  if (ticks[ticks.length - 1] < max) ticks.push(ticks[ticks.length - 1] + step);
  return ticks;
}

/** A small table of latency percentiles ({p50, p90, p95, p99, min, max, num}), or null. */
export function percentileTable(stats) {
  if (!stats) return null;
  const columns = ["p50", "p90", "p95", "p99", "min", "max"].filter((name) => Number.isFinite(stats[name]));
  return el(
    "table",
    { class: "data-table compact percentiles" },
    el("thead", {}, el("tr", {}, columns.map((name) => el("th", { scope: "col", text: name })), el("th", { scope: "col", text: "samples" }))),
    el(
      "tbody",
      {},
      el(
        "tr",
        {},
        columns.map((name) => el("td", { class: "num", text: `${Math.round(stats[name])} ms` })),
        el("td", { class: "num", text: stats.num ?? "—" }),
      ),
    ),
  );
}
